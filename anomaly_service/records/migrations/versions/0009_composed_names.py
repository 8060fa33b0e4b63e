"""Each record keeps the composed spelling (NFC) of its part id, line and station where they came spelt otherwise.

A filter matched a name as typed, composed and decomposed. A name can also come mixed (a decomposed folder name
with a composed suffix typed after it) or hold a character that NFC replaces (U+212B ANGSTROM SIGN by U+00C5): the
stats grouped such a line with its composed spelling, but a filter for that line missed its records. Neither
database can compose a text itself (SQLite has no Unicode normalisation), so the record keeps the composed spelling
where it differs: None for nearly every name, so the partial indexes stay small and no row of a name spelt one way
is written twice. The upgrade fills older rows: each distinct name that is not composed, one UPDATE.

Revision ID: 0009
Revises: 0008
"""

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None
# what `anomaly db downgrade` past this revision loses (it prints it and asks first)
LOSES = ("nothing recorded (each name's composed spelling, which the upgrade fills again); a filter then misses "
         "records whose name came mixed or with a character composing replaces")

COLUMNS = {"part_id": 600, "line": 300, "station": 300}  # NFC can make a text up to three times as long
BACKFILL_CHUNK = 5000  # names filled by one statement run


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        for name, length in COLUMNS.items():
            batch.add_column(sa.Column(f"{name}_composed", sa.String(length), nullable=True))
    for name in COLUMNS:
        where = sa.text(f"{name}_composed IS NOT NULL")
        op.create_index(f"ix_inspections_{name}_composed", "inspections", [f"{name}_composed"],
                        sqlite_where=where, postgresql_where=where)
    table = sa.table("inspections", *(sa.column(n) for n in COLUMNS), *(sa.column(f"{n}_composed") for n in COLUMNS))
    bind = op.get_bind()
    for name in COLUMNS:
        column, key = table.c[name], table.c[f"{name}_composed"]
        # ASCII is composed: only a name with another character can be spelt two ways (a part id per part: many)
        # streamed (a server-side cursor on PostgreSQL): a million part ids are not held at once, only the few
        # spelt otherwise
        spelt = bind.execute(sa.select(column).distinct().where(column.is_not(None)),
                             execution_options={"stream_results": True, "yield_per": 10_000}).scalars()
        pairs = [{"spelt": v, "composed": unicodedata.normalize("NFC", v)} for v in spelt if not v.isascii()]
        pairs = [p for p in pairs if p["composed"] != p["spelt"]]
        # one statement run for many names (psycopg pipelines it): one round trip a name took 3.4 s for 20,000
        # decomposed part ids on PostgreSQL, minutes for a million, with every replica's start waiting
        fill = sa.update(table).where(column == sa.bindparam("spelt")).values({key: sa.bindparam("composed")})
        for start in range(0, len(pairs), BACKFILL_CHUNK):
            bind.execute(fill, pairs[start : start + BACKFILL_CHUNK])


def downgrade() -> None:
    for name in COLUMNS:
        op.drop_index(f"ix_inspections_{name}_composed", "inspections")
    with op.batch_alter_table("inspections") as batch:
        for name in COLUMNS:
            batch.drop_column(f"{name}_composed")
