"""The score's warnings kept with its record: which frame of a multi-frame file was scored, a photo far from the
training photos' size. The live answer carried them and the record did not, so History showed such a part without
the reason its score may not mean what the threshold says. Older rows have none (null).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = "each record's warnings (a photo far from the training size, of another kind)"


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("warnings")
