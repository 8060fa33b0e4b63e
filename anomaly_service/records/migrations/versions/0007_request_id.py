"""Each record keeps the X-Request-ID of the call that scored it: an integrator's log names its calls by that id,
and the service's access lines that tied the id to the record are rotated away long before a customer complains
about a part. Older rows have none (null); nothing is rewritten. Indexed: it is looked up like a part id.

And each opinion of a model with a second opinion (``scorers``: the kNN's and the whole-image branch's score,
normalized score, threshold and decision): the record kept the kNN's score and threshold beside the fused decision,
and a part flagged for its layout read "score below threshold, decision anomaly" with nothing in it that said why.
Null for a model with one opinion (its score and threshold are the decision, as the answer has no ``scorers``) and
for older rows.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = ("each record's X-Request-ID (the client's id of the call that scored it) and, of a model with a second "
         "opinion, each opinion's score and threshold (scorers)")


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("scorers", sa.JSON(), nullable=True))
    op.create_index("ix_inspections_request_id", "inspections", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_inspections_request_id", "inspections")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("scorers")
        batch.drop_column("request_id")
