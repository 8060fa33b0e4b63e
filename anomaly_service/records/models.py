"""The record tables (SQLAlchemy 2 declarative) and the id scheme.

These classes describe the *current* schema for queries; the database itself is only ever created and changed by
the Alembic scripts in ``migrations/versions`` (so an older database is upgraded, never recreated). A test checks
that the two agree.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates
from sqlalchemy.types import TypeDecorator

from ..spellings import composed_if_other

# What an inspection's stored files are now: the API's image URLs answer from this, never from a guess.
FILES_STORED = "stored"  # photo (and heatmap) on disk
FILES_NOT_KEPT = "not_kept"  # --keep-images said not to keep them
FILES_EXPIRED = "expired"  # removed by retention, by age
FILES_REMOVED = "removed"  # removed by retention, by total size
FILES_FAILED = "failed"  # the write to the file store failed (disk full, permissions): counted and logged

VERDICTS = ("defect", "good")
UNREVIEWED = "unreviewed"  # the verdict of an inspection nobody has reviewed, as the API names it

_id_lock = threading.Lock()
_last_ms = 0
_seq = 0
# The records' clock: (this process's monotonic seconds, the database's Unix seconds) at its last reading, or None
_database_time: tuple[float, float] | None = None


def records_time() -> float:
    """Unix seconds as the records database's clock says them, counted on from its last reading by the monotonic
    clock; this host's wall clock before the first reading, and with SQLite (the database is on this host).

    Why: replicas on several hosts write into one PostgreSQL, and each dated and ordered its records by its own
    clock. A replica whose clock ran ten minutes ahead listed every part it scored above the others' later ones,
    and one two hours behind wrote parts dated two hours back, among ids a client polling "the last minutes" had
    passed long ago. One clock for every replica's records, the database's, whatever each host's says; carried by
    the monotonic clock between readings, so a step of this host's clock moves none of them."""
    read = _database_time
    if read is None:
        return time.time()
    return read[1] + (time.monotonic() - read[0])


def set_database_time(unix_s: float, at_monotonic: float) -> float:
    """The database's clock read as ``unix_s`` at ``at_monotonic`` (this process's monotonic clock, the middle of
    the round trip); returns how far this host's wall clock is ahead of it (negative: behind), for a warning."""
    global _database_time
    _database_time = (at_monotonic, unix_s)
    return time.time() - (unix_s + (time.monotonic() - at_monotonic))


def forget_database_time() -> None:
    """Back to this host's wall clock (a process that moves to another records database)."""
    global _database_time
    _database_time = None


def new_id(now_ms: int | None = None) -> str:
    """A UUIDv7 string (RFC 9562): 48-bit Unix milliseconds, then a per-process sequence, then random bits.

    Its text sorts in time order, so the primary key doubles as the keyset-pagination order and the index on it
    serves "newest first" without a second sort key; the sequence keeps ids from one process strictly increasing
    within a millisecond and after the clock steps back (the last millisecond is kept until the clock passes it).
    ``now_ms``: the clock's reading, when the caller has one."""
    global _last_ms, _seq
    with _id_lock:
        ms = int(records_time() * 1000) if now_ms is None else now_ms
        if ms <= _last_ms:
            ms, _seq = _last_ms, _seq + 1
            if _seq > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms, _seq = ms + 1, 0
        else:
            _seq = 0
        _last_ms = ms
        seq = _seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def continue_after(newest: str | None) -> None:
    """Make this process's next ids sort after ``newest``, the newest id a database holds (read when the process
    first reaches it: RecordStore.upgrade).

    Why: a process starts counting from its own clock. One started after the wall clock stepped back (a clock that
    ran fast, corrected; a restart on another host) would make ids older than records already there, and "newest
    first" would list its inspections under those until the clock caught up. Its ids keep the newest one's
    millisecond instead, counted on by the sequence, as after a step back within one process. An id that is not a
    UUIDv7 (written by hand, or by another tool) is ignored."""
    global _last_ms, _seq
    digits = (newest or "").replace("-", "")
    if len(digits) != 32 or digits[12] != "7":
        return
    try:
        ms, seq = int(digits[:12], 16), int(digits[13:16], 16)
    except ValueError:
        return
    with _id_lock:
        if (ms, seq) > (_last_ms, _seq):
            _last_ms, _seq = ms, seq


def utcnow() -> datetime:
    """The records' present (:func:`records_time`): what a record, a review or a files change is dated."""
    return datetime.fromtimestamp(records_time(), timezone.utc)


class UtcDateTime(TypeDecorator):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: records are kept in UTC")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    """One scored image: what the model said, about which part, and where its photo and heatmap are kept."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    normalized_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    # each opinion of a model with a second opinion (the answer's ``scorers``): why a fused decision differs from
    # what score and threshold say (revision 0007; a model with one opinion, and older rows: None)
    scorers: Mapped[dict[str, dict[str, Any]] | None] = mapped_column(JSON)
    regions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_bytes: Mapped[int] = mapped_column(Integer)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    timing_ms: Mapped[dict[str, float]] = mapped_column(JSON)
    part_id: Mapped[str | None] = mapped_column(String(200), index=True)
    line: Mapped[str | None] = mapped_column(String(100))
    station: Mapped[str | None] = mapped_column(String(100))
    # each name's composed spelling where it came spelt otherwise (decomposed, mixed, U+212B), else None: what a
    # filter finds every spelling of a name by, and what the stats group a line by (revision 0009; older rows are
    # filled by the upgrade). Set with the name (:meth:`_composed_too`); the names themselves keep their spelling.
    # NFC can make a text up to three times as long.
    part_id_composed: Mapped[str | None] = mapped_column(String(600))
    line_composed: Mapped[str | None] = mapped_column(String(300))
    station_composed: Mapped[str | None] = mapped_column(String(300))
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the score's warnings (which frame was scored, a photo far from the training size): the record is read without
    # the answer, and the decision may not mean what the threshold says (revision 0005; older rows: None)
    warnings: Mapped[list[str] | None] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16))  # api, cli or rescore: who recorded it
    # the X-Request-ID of the call that scored it: the link to an integrator's own log (revision 0007; older rows
    # and the CLI's: None)
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    # how it was scored on the machine that scored it (decision.ScoredWith): the backbone runtime, the kNN search as
    # GET /models words it, the device and the pass's intra-op threads; torch's scores move with the thread count
    # and differ from ONNX Runtime's (revision 0008; older rows: None)
    runtime: Mapped[str | None] = mapped_column(String(16))
    knn_search: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(32))
    threads: Mapped[int | None] = mapped_column(Integer)
    # the part's place on the image map of its own version (the answer's ``embedding``): the queue and History draw a
    # reviewed part among the training images as the live view draws an upload (revision 0010; older rows, and a
    # model saved before its map was kept: None)
    embedding_x: Mapped[float | None] = mapped_column(Float)
    embedding_y: Mapped[float | None] = mapped_column(Float)
    # SHA-256 of the photo's decoded pixels as its model read them (training_set.pixel_digest, what a model keeps of
    # its training images): a part whose photo repeats one of them, in any encoding, is in the model already, which
    # the file's digest cannot tell (revision 0011; a record whose photo is not kept, and older rows: None)
    pixels_sha256: Mapped[str | None] = mapped_column(String(64))
    image_file: Mapped[str | None] = mapped_column(String(200))  # file-store key, content-addressed
    heatmap_file: Mapped[str | None] = mapped_column(String(200))
    # a random capability for the picture URLs: a dashboard <img> cannot send X-API-Key (records before it: None)
    view_token: Mapped[str | None] = mapped_column(String(32))
    files_state: Mapped[str] = mapped_column(String(16))  # FILES_* above
    files_changed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the latest review, copied here so filters and the model-feedback query need no join (revision 0002)
    verdict: Mapped[str | None] = mapped_column(String(8))
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    reviews: Mapped[list[Review]] = relationship(back_populates="inspection", order_by="Review.id",
                                                 cascade="all, delete-orphan")

    # filters end in the id, the list order: a filtered page reads its newest rows in order, not every match sorted
    # (revision 0004; the queue is decision + unreviewed)
    __table_args__ = (Index("ix_inspections_model_id", "model", "id"),
                      Index("ix_inspections_decision_id", "decision", "id"),
                      Index("ix_inspections_queue", "decision", "verdict", "id"),
                      Index("ix_inspections_verdict_id", "verdict", "id"),
                      Index("ix_inspections_line_station_id", "line", "station", "id"),
                      Index("ix_inspections_image_file", "image_file"),
                      Index("ix_inspections_heatmap_file", "heatmap_file"),
                      *(Index(f"ix_inspections_{name}", name, sqlite_where=text(f"{name} IS NOT NULL"),
                              postgresql_where=text(f"{name} IS NOT NULL"))
                        for name in ("part_id_composed", "line_composed", "station_composed")))

    @validates("part_id", "line", "station")
    def _composed_too(self, key: str, value: str | None) -> str | None:
        """Keep each name's composed spelling beside it, whoever makes the record (the recorder, an import)."""
        setattr(self, f"{key}_composed", composed_if_other(value))
        return value


class Review(Base):
    """One operator's verdict on an inspection, or their undo of one. Never updated: a later review, and an undo, is
    a new row (the audit trail)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    # the inspection's verdict after this row: an undo's is the one it brings back, None for unreviewed (revision 0006)
    verdict: Mapped[str | None] = mapped_column(String(8))
    undoes: Mapped[int | None] = mapped_column(Integer)  # an undo: the id of the review it withdraws
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    inspection: Mapped[Inspection] = relationship(back_populates="reviews")
