"""Operator reviews: an append-only reviews table, and the latest verdict copied onto each inspection.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = 'every review and verdict (the earlier schema has no reviews)'


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(36), sa.ForeignKey("inspections.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("verdict", sa.String(8), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_inspections_verdict", "inspections", ["verdict"])


def downgrade() -> None:
    op.drop_index("ix_inspections_verdict", "inspections")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("reviewed_at")
        batch.drop_column("verdict")
    op.drop_table("reviews")
