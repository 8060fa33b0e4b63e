"""The inspections table: one row per scored image.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("normalized_score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("image_bytes", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("timing_ms", sa.JSON(), nullable=False),
        sa.Column("part_id", sa.String(200), nullable=True),
        sa.Column("line", sa.String(100), nullable=True),
        sa.Column("station", sa.String(100), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("image_file", sa.String(200), nullable=True),
        sa.Column("heatmap_file", sa.String(200), nullable=True),
        sa.Column("files_state", sa.String(16), nullable=False),
        sa.Column("files_changed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_inspections_created_at", "inspections", ["created_at"])
    op.create_index("ix_inspections_model", "inspections", ["model"])
    op.create_index("ix_inspections_decision", "inspections", ["decision"])
    op.create_index("ix_inspections_image_sha256", "inspections", ["image_sha256"])
    op.create_index("ix_inspections_part_id", "inspections", ["part_id"])
    op.create_index("ix_inspections_line_station", "inspections", ["line", "station"])
    op.create_index("ix_inspections_image_file", "inspections", ["image_file"])


def downgrade() -> None:
    op.drop_table("inspections")
