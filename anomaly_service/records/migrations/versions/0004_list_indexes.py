"""Indexes that end in the id, so a filtered list reads its newest rows in order instead of sorting every match.

Measured at a million records and more (docs/benchmarks.md, "Records after months on a line"): the review queue
(decision + unreviewed), a model's or a line's list and a model's export sorted every matching row on SQLite, and
the queue ran past the records gate's deadline. Retention looked stored heatmaps up by key with no index. The
single-column indexes these replace are dropped: each new one serves their lookups too.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = 'nothing (indexes only; lists and exports of a large database get slower)'

NEW = {
    "ix_inspections_model_id": ["model", "id"],
    "ix_inspections_decision_id": ["decision", "id"],
    "ix_inspections_queue": ["decision", "verdict", "id"],
    "ix_inspections_verdict_id": ["verdict", "id"],
    "ix_inspections_line_station_id": ["line", "station", "id"],
    "ix_inspections_heatmap_file": ["heatmap_file"],
}
OLD = {
    "ix_inspections_model": ["model"],
    "ix_inspections_decision": ["decision"],
    "ix_inspections_verdict": ["verdict"],
    "ix_inspections_line_station": ["line", "station"],
}


def upgrade() -> None:
    for name, columns in NEW.items():
        op.create_index(name, "inspections", columns)
    for name in OLD:
        op.drop_index(name, "inspections")


def downgrade() -> None:
    for name, columns in OLD.items():
        op.create_index(name, "inspections", columns)
    for name in NEW:
        op.drop_index(name, "inspections")
