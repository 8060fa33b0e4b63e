"""Each record keeps the part's place on its model's image map (``embedding_x``, ``embedding_y``): the score
answer's ``embedding``, in the coordinates of the map of the record's own version.

The page drew a part on the map only from the upload's answer: a part the line scored, which an operator reviews
in the queue and History from its record, was never drawn, for the record kept no place. Older rows, and records
of a model saved before its map was kept, have none (null); nothing is rewritten (the place needs the photo scored
again by the version that scored it).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = "each record's place on its model's image map (embedding_x, embedding_y)"


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("embedding_x", sa.Float(), nullable=True))
        batch.add_column(sa.Column("embedding_y", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("embedding_y")
        batch.drop_column("embedding_x")
