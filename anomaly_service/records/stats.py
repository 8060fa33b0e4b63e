"""Dashboard statistics aggregated by the database, not in Python.

A dashboard asks for a day of a busy line: hundreds of thousands of records. Reading them into Python held the
interpreter for seconds per call and slowed scoring beside it; the database's own sort and sum release it and read
no row object. The time bucket is cut from the stored UTC timestamp as text (SQLite stores its ISO form, PostgreSQL
formats it), so both databases bucket alike. In a plant's time zone the timestamp is first moved by the zone's
offset, read per span between the zone's offset changes (daylight saving) in Python's tz database, so both databases
cut the same local days whatever tz data the server has.

The quantiles are exact, as numpy's default method computes them: a window numbers each group's scores in order,
only the ranks around each quantile's position are kept, and one row per group comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from sqlalchemy import and_, case, func, literal_column, or_, select
from sqlalchemy.orm import Session

from .models import Inspection
from ..spellings import composed_if_other

BUCKETS = ("minute", "hour", "day")
STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
# time buckets one answer may cover: two days of minutes, four months of hours. Each comes back as a row per model
# and line, so the range, not the number of records, sets an answer's size.
MAX_BUCKETS = 2880
# the stored timestamp's text prefix per bucket, and how each database writes it
_PREFIX = {"minute": 16, "hour": 13, "day": 10}
_PG_FORMAT = {"minute": "YYYY-MM-DD HH24:MI", "hour": "YYYY-MM-DD HH24", "day": "YYYY-MM-DD"}
_PARSE = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H", "day": "%Y-%m-%d"}
# the dashboard's quantiles, in per mille so that the positions are integer arithmetic on both databases
QUANTILES = (("score_p50", 500), ("score_p90", 900), ("score_p99", 990))


@dataclass(frozen=True)
class Zone:
    """Where buckets are cut: a time zone and its UTC offsets (minutes) over the range asked, ``spans`` as
    ``(until, offset)`` in time order, the last one open-ended (records that land after the range's end)."""

    tz: tzinfo
    spans: tuple[tuple[datetime | None, int], ...]

    @classmethod
    def over(cls, tz: tzinfo, start: datetime, end: datetime) -> Zone:
        """The zone's offsets from ``start`` to ``end`` (aware), found by stepping through the range and narrowing
        each change down to the second."""
        def offset(t: datetime) -> int:
            try:
                local = t.astimezone(tz)
            except OverflowError:  # within a day of year 1 or 9999: the zone's offset at that wall time will do
                local = t.replace(tzinfo=None).replace(tzinfo=tz)
            return int(local.utcoffset().total_seconds() // 60)

        spans: list[tuple[datetime | None, int]] = []
        step, t, current = timedelta(hours=6), start, offset(start)
        while t < end:
            nxt = min(t + step, end)
            if offset(nxt) != current:
                lo, hi = t, nxt  # the change lies in (lo, hi]
                while hi - lo > timedelta(seconds=1):
                    mid = lo + (hi - lo) / 2
                    lo, hi = (lo, mid) if offset(mid) != current else (mid, hi)
                spans.append((hi.replace(microsecond=0), current))
                current = offset(hi)
            t = nxt
        spans.append((None, current))
        return cls(tz, tuple(spans))

    @property
    def is_utc(self) -> bool:
        return self.spans == ((None, 0),)


UTC = Zone(timezone.utc, ((None, 0),))


def _bucket(dialect: str, bucket: str, zone: Zone = UTC) -> Any:
    """The bucket's start as text: 'YYYY-MM-DD HH' for an hour, in the zone's local time. In a zone with offsets,
    minute and hour buckets end in '|offset': an hour that daylight saving repeats is two buckets, not one of two
    hours (a day is one bucket, of 23 or 25 hours where the clocks change)."""
    c = Inspection.created_at
    if zone.is_utc:
        if dialect == "postgresql":
            return func.to_char(func.timezone(_inline("'UTC'"), c), _inline(f"'{_PG_FORMAT[bucket]}'"))
        # SQLite keeps the UTC timestamp as 'YYYY-MM-DD HH:MM:SS.ffffff' (UtcDateTime converts before binding)
        return func.substr(c, _inline("1"), _inline(str(_PREFIX[bucket])))

    def local(minutes: int) -> Any:
        if dialect == "postgresql":
            moved = func.timezone(_inline("'UTC'"), c) + _inline(f"interval '{minutes} minutes'")
            text_ = func.to_char(moved, _inline(f"'{_PG_FORMAT[bucket]}'"))
        else:
            # whole seconds first: SQLite's datetime() rounds a fraction to the millisecond, so 10:59:59.9996
            # came out as 11:00:00 and fell in the next bucket, where PostgreSQL's to_char truncates
            whole = func.substr(c, _inline("1"), _inline("19"))
            text_ = func.substr(func.datetime(whole, _inline(f"'{minutes:+d} minutes'")), _inline("1"),
                                _inline(str(_PREFIX[bucket])))
        return text_ if bucket == "day" else text_.op("||")(_inline(f"'|{minutes}'"))

    whens = []
    for until, minutes in zone.spans[:-1]:
        bound = until.astimezone(timezone.utc)
        literal = (f"TIMESTAMPTZ '{bound:%Y-%m-%d %H:%M:%S}+00'" if dialect == "postgresql"
                   else f"'{bound:%Y-%m-%d %H:%M:%S}'")  # SQLite compares the stored ISO text
        whens.append((c < _inline(literal), local(minutes)))
    last = local(zone.spans[-1][1])
    return case(*whens, else_=last) if whens else last


def _start(text: str, bucket: str, zone: Zone) -> datetime:
    """A bucket's start as an aware time in the zone, from its text (:func:`_bucket`)."""
    if zone.is_utc:
        return datetime.strptime(text, _PARSE[bucket]).replace(tzinfo=timezone.utc)
    local, _, minutes = text.partition("|")
    naive = datetime.strptime(local, _PARSE[bucket])
    if bucket == "day":  # the day's first instant: local midnight, or where a clock change skips midnight
        try:  # (Sao Paulo's 2018-11-04 began at 01:00 -02:00) the first wall time after it, not one never shown
            return naive.replace(tzinfo=zone.tz).astimezone(timezone.utc).astimezone(zone.tz)
        except OverflowError:  # within a day of year 1 or 9999
            return naive.replace(tzinfo=zone.tz)
    return naive.replace(tzinfo=timezone(timedelta(minutes=int(minutes))))


def _inline(sql: str) -> Any:
    """A constant written into the statement: the database must see the bucket in every window as one expression
    (with bound parameters it sorts once per window)."""
    return literal_column(sql)


def aggregate(session: Session, dialect: str, where: Sequence[Any], bucket: str, zone: Zone = UTC
              ) -> list[dict[str, Any]]:
    """One dict per (bucket start, model, line), in that order: counts by decision, the review backlog and the
    normalized score's 50th, 90th and 99th percentiles. Buckets are cut in ``zone`` (:meth:`Zone.over`). A line
    recorded in several Unicode spellings (a station's name typed composed, another's sent decomposed) is one line,
    named in its composed spelling: grouped by the database on the composed spelling each record keeps, so its
    quantiles stay exact. A record without it (written by a replica of a release before revision 0009 that ran on
    during the upgrade, after the upgrade filled the older rows) comes back under its own spelling: then the lines
    are grouped once more, each such spelling mapped to its composed one, as before the records kept it."""
    out = _aggregate(session, dialect, where, bucket, zone, {})
    line_as = {line: name for line, name in ((row["line"], composed_if_other(row["line"])) for row in out)
               if name is not None}
    return _aggregate(session, dialect, where, bucket, zone, line_as) if line_as else out


def _aggregate(session: Session, dialect: str, where: Sequence[Any], bucket: str, zone: Zone,
               line_as: dict[str, str]) -> list[dict[str, Any]]:
    """:func:`aggregate`, each line (its composed spelling where the record keeps one) in ``line_as`` grouped and
    named as the line it maps to."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    c = Inspection
    start = _bucket(dialect, bucket, zone).label("start")
    kept = func.coalesce(c.line_composed, c.line)
    line = (case(*((kept == spelling, name) for spelling, name in line_as.items()), else_=kept)
            if line_as else kept).label("line")
    group = (start, c.model, line)
    window = dict(partition_by=group, order_by=c.normalized_score)
    whole = dict(window, rows=(None, None))  # the numbering's own sort serves the whole-group columns too
    anomaly = c.decision == "anomaly"
    ranked = select(
        start, c.model, line, c.normalized_score.label("s"),
        func.row_number().over(**window).label("rn"),
        func.count().over(**whole).label("n"),
        func.sum(case((anomaly, 1), else_=0)).over(**whole).label("anomaly"),
        func.sum(case((and_(anomaly, c.verdict.is_(None)), 1), else_=0)).over(**whole).label("unreviewed"),
    ).where(*where).subquery()
    r = ranked.c
    # ranks lo + 1 and lo + 2 (1-based) around the position (n - 1) * q; SQLAlchemy's // floors on both databases.
    # One row per group comes back: a row fetched is a pass through the interpreter, which scoring shares
    around, ranks = [], []
    for name, per_mille in QUANTILES:
        lo = (r.n - 1) * per_mille // 1000
        around += [func.max(case((r.rn == lo + 1, r.s))).label(f"{name}_lo"),
                   func.max(case((r.rn == lo + 2, r.s))).label(f"{name}_hi")]
        ranks += [r.rn == lo + 1, r.rn == lo + 2]
    stmt = (select(r.start, r.model, r.line, func.max(r.n).label("n"), func.max(r.anomaly).label("anomaly"),
                   func.max(r.unreviewed).label("unreviewed"), *around)
            .where(or_(*ranks)).group_by(r.start, r.model, r.line))
    out = []
    rows = [(_start(row.start, bucket, zone), row) for row in session.execute(stmt)]
    for begins, row in sorted(rows, key=lambda g: (g[0], g[1].model, g[1].line or "")):
        n, anomalies = int(row.n), int(row.anomaly)
        out.append({
            "start": begins,
            "model": row.model, "line": row.line, "count": n, "anomaly": anomalies, "normal": n - anomalies,
            "anomaly_rate": anomalies / n, "unreviewed_anomalies": int(row.unreviewed),
            **{name: _interpolate(getattr(row, f"{name}_lo"), getattr(row, f"{name}_hi"), n, per_mille)
               for name, per_mille in QUANTILES}})
    return out


def _interpolate(below: float, above: float | None, n: int, per_mille: int) -> float:
    """numpy's linear quantile from the values ranked just below and above its position."""
    rest = (n - 1) * per_mille % 1000
    return float(below) if rest == 0 else float(below) + (float(above) - float(below)) * rest / 1000
