"""Each record keeps the SHA-256 of its photo's decoded pixels (``pixels_sha256``), as a model keeps its training
images' (the catalog's and the manifest's digests), beside the uploaded file's (``image_sha256``).

The review queue offers the flagged parts reviewed as actually good that the served version has not learnt. A part
whose photo has the pixels of one of the version's own training or held-out images (the very file, or another
encoding of it) is in the model already: an update skips it, yet the file's digest could not say so, and the queue
offered it after every teaching. Kept for the records whose photo is kept (only those can be taught); older rows
have none (null) and are read by their file's digest as before; nothing is rewritten (the digest needs the photo
decoded as its model read it).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = "each record's digest of its photo's decoded pixels (pixels_sha256)"


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("pixels_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("pixels_sha256")
