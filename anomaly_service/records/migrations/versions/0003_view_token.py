"""A per-inspection view token: picture URLs a dashboard can embed without the API key.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = "each record's view token: picture links handed out before no longer open"


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("view_token", sa.String(32), nullable=True))  # older rows: the API key only


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("view_token")
