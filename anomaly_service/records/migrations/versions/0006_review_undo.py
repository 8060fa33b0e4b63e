"""An operator can undo their review: the undo is a row of its own in the append-only reviews table.

``undoes`` names the review it withdraws; its ``verdict`` is the verdict on record after it (the one before the
undone review), null when the part is unreviewed again, so every row's verdict is the inspection's verdict after
that row. On SQLite, making ``verdict`` nullable copies the reviews table (batch mode).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = ("each undone review and its undo (the earlier schema cannot say an undo); every verdict stays as it "
         "is")


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.alter_column("verdict", existing_type=sa.String(8), nullable=True)
        batch.add_column(sa.Column("undoes", sa.Integer(), nullable=True))


def downgrade() -> None:
    # The older schema cannot say an undo. An undo puts back exactly what was on record before the review it
    # withdrew, so dropping both leaves each inspection's verdict and its remaining history agreeing; its
    # reviewed_at becomes the time of the last review left (none: unreviewed, as the verdict says).
    op.execute("DELETE FROM reviews WHERE id IN (SELECT undoes FROM reviews WHERE undoes IS NOT NULL)")
    op.execute("UPDATE inspections SET reviewed_at = (SELECT max(r.created_at) FROM reviews r WHERE "
               "r.inspection_id = inspections.id AND r.undoes IS NULL) WHERE id IN "
               "(SELECT inspection_id FROM reviews WHERE undoes IS NOT NULL)")
    op.execute("DELETE FROM reviews WHERE undoes IS NOT NULL")
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("undoes")
        batch.alter_column("verdict", existing_type=sa.String(8), nullable=False)
