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


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.alter_column("verdict", existing_type=sa.String(8), nullable=True)
        batch.add_column(sa.Column("undoes", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM reviews WHERE undoes IS NOT NULL")  # the older schema has no way to say them
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("undoes")
        batch.alter_column("verdict", existing_type=sa.String(8), nullable=False)
