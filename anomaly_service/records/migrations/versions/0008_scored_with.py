"""Each record keeps how its part was scored on the machine that scored it: the backbone runtime (``runtime``:
onnx or torch), the kNN search as ``GET /models`` words it (``knn_search``: exact bf16 shortlist or fp32, an
inverted file, FAISS or torch on a GPU), the device and the intra-op threads of the pass (``threads``). The score is
bit-identical on the CPU with the defaults, but torch's differs from ONNX Runtime's and moves with the thread
count, and a GPU is another case again: a part that passed in March and fails on a re-score in June could not be
told from the record alone whether the model or the machine changed. Older rows have none (null); nothing is
rewritten.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = "how each record was scored (the runtime, the kNN search, the device and the threads)"


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("runtime", sa.String(16), nullable=True))
        batch.add_column(sa.Column("knn_search", sa.Text(), nullable=True))
        batch.add_column(sa.Column("device", sa.String(32), nullable=True))
        batch.add_column(sa.Column("threads", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("threads")
        batch.drop_column("device")
        batch.drop_column("knn_search")
        batch.drop_column("runtime")
