"""Recording off the request path: a bounded buffer and one background writer thread.

A request only appends to the buffer (never waits, never fails): hashing, the file writes, the heatmap PNG and the
database insert happen on the writer thread, in batches (one transaction per batch). If the database is slow or
down the batch is retried with back-off while the buffer absorbs new records; when the buffer is full, new
records are dropped and counted (``anomaly_records_dropped_total{reason}``), so scoring never slows down or fails
because of its records. A clean stop flushes what is buffered.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..log_throttle import Throttle
from ..steady_clock import SteadyWallClock
from .files import extension_of
from .models import FILES_FAILED, FILES_NOT_KEPT, FILES_STORED, Inspection, new_id, utcnow

if TYPE_CHECKING:
    from datetime import datetime

    from ..decision import ScoredWith
    from ..evidence import MapPoint
    from .store import RecordStore

log = logging.getLogger(__name__)

BATCH_MAX = 256  # rows per transaction: one commit (one fsync) amortized over a burst
# how long the idle writer waits for a first record before checking whether it should stop: a service's shutdown
# (a rolling restart, a test client) waits this long at most; an idle wake-up costs next to nothing
FLUSH_WAIT_S = 0.05
CLOCK_STEP_SAID_S = 60.0  # a forward step of the clock this large is logged (retention ignores every one)
BATCH_LINGER_S = 0.5  # after the first record, how long it lets a batch gather before writing it
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # then every 8 s ...
# ... for this long, then the batch is dropped and counted: a database restart or failover takes minutes, and the
# batch in hand is kept through it while the buffer takes (or, full, counts) the new records
RETRY_FOR_S = 600.0
FILES_FAILED_LOG_EVERY_S = 60.0  # a picture that cannot be stored is logged at most this often
# a stop retries a database that is down until this long before its timeout, so the writer counts its own batch
# (as shutdown) before the stop gives up waiting for it
STOP_MARGIN_S = 1.0
# how long a stop (the service's, the CLI's) waits for the buffered records to be written; read at each stop, so a
# test of a stop that gives up need not wait out the whole of it
STOP_TIMEOUT_S = 15.0
# Buffered records hold the upload and, when its pictures are kept, the anomaly map: the buffer is bounded in
# bytes as well as in records, so a slow database never grows memory past this.
BUFFER_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class PartContext:
    """What the client says about the part (all optional)."""

    part_id: str | None = None
    line: str | None = None
    station: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class PendingRecord:
    """One scored image waiting to be written. Built on the request path from what is already in memory."""

    data: bytes  # the upload as received
    model: str
    model_version: str
    score: float
    normalized_score: float
    threshold: float
    is_anomaly: bool
    regions: list[dict[str, Any]]
    image_width: int
    image_height: int
    timing_ms: dict[str, float]
    context: PartContext
    warnings: list[str] = field(default_factory=list)  # the answer's: why the score may not mean what it says
    normalized_map: Callable[[], np.ndarray] | None = None  # the heatmap source, when pictures are kept
    heatmap_png: bytes | None = None  # already rendered for the answer: reused
    source: str = "api"
    request_id: str | None = None  # the call's X-Request-ID (the API's; the CLI has none)
    # the result's ``scorers`` as it is (a model with a second opinion; None with one): made JSON on the writer
    scorers: dict[str, dict[str, Any]] | None = None
    # how the result was computed on this machine (runtime, kNN search, device, threads): the result's own
    scored_with: ScoredWith | None = None
    # the part's place on its version's image map, as the answer gave it (None: the model keeps no map)
    embedding: MapPoint | None = None
    # the photo as its model read it, given where its picture is kept: the writer hashes its pixels for the record
    # (``pixels_sha256``), off the request path, and lets go of it
    pixels: np.ndarray | None = None
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)
    map_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.map_bytes + (0 if self.pixels is None else int(self.pixels.nbytes)) + 2048


class Recorder:
    """The bounded buffer and its writer thread. ``submit`` never blocks."""

    def __init__(self, store: RecordStore, keep_images: str = "anomalies", buffer_size: int = 10_000,
                 metrics: Any = None, retention: tuple[float | None, int | None, float] | None = None,
                 min_free_bytes: int = 0, clock: SteadyWallClock | None = None):
        self.store = store
        self.keep_images = keep_images
        self.buffer_size = buffer_size
        self.metrics = metrics  # Telemetry, or None (the CLI)
        self.retention = retention  # (max age days, max bytes, seconds between passes)
        self.min_free_bytes = min_free_bytes  # below this free on the volume, pictures are not stored
        # what retention counts pictures' ages to: read from now on, a forward step of the clock is not believed
        self.clock = clock or SteadyWallClock()
        self._step_logged = 0.0  # the forward step last said in the log
        self._volume_behind_logged = 0.0  # how far the picture volume's time was behind this host's, last said
        self._retain_now = threading.Event()  # a low-disk skip wakes retention before its next pass is due
        self._low_disk_logged = 0.0
        self._files_failed = Throttle(FILES_FAILED_LOG_EVERY_S)  # pictures that could not be stored
        self._queue: queue.Queue[PendingRecord] = queue.Queue()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hurry = threading.Event()  # set by a stop and by flush(): the batch in hand is written without its linger
        self._stop_by = float("inf")  # after stop(): when the writer gives up on a database that is down
        self._abandoned = False  # stop() gave up on the writer and counted what it held
        self._thread: threading.Thread | None = None
        self._retention_thread: threading.Thread | None = None
        self._schema_ready = False
        self._writing = 0  # records of the batch the writer holds now
        # the ids of the records buffered or being written: a client that asks for its inspection a moment after
        # its answer is told it is on its way (:meth:`holds`), not that there is no such inspection
        self._unwritten: set[str] = set()
        self.retrying = False  # the database refuses the batch in hand now (it is retried): /readyz says so
        self.written = 0
        self.dropped: dict[str, int] = {}

    # --------------------------------------------------------------------------------------------- intake
    def keeps(self, is_anomaly: bool) -> bool:
        return self.keep_images == "all" or (self.keep_images == "anomalies" and is_anomaly)

    def submit(self, record: PendingRecord) -> bool:
        """Buffer one record; False (and counted) when the buffer is full."""
        size = record.nbytes
        with self._lock:
            if self._stop.is_set():
                reason = "stopped"
            elif self._queue.qsize() >= self.buffer_size or (self._bytes + size > BUFFER_MAX_BYTES and self._bytes):
                reason = "buffer_full"  # one record larger than the cap (a 36 MP photo's maps) is taken alone
            else:
                self._bytes += size
                self._unwritten.add(record.id)
                self._queue.put(record)
                reason = None
        if reason is not None:
            self._drop(reason, 1)
            return False
        self._depth()
        return True

    def submit_wait(self, record: PendingRecord, poll_s: float = 0.05) -> bool:
        """Buffer one record, waiting for room instead of dropping it: for the CLI, whose only client is itself,
        so nothing is lost to a full buffer (the writer still drops, and counts, what the database refuses).
        False (and counted) when the recorder has stopped."""
        size = record.nbytes
        while True:
            with self._lock:
                if self._stop.is_set():
                    break
                if self._queue.qsize() < self.buffer_size and (self._bytes + size <= BUFFER_MAX_BYTES
                                                               or self._queue.qsize() == 0):
                    self._bytes += size
                    self._unwritten.add(record.id)
                    self._queue.put(record)
                    return True
            time.sleep(poll_s)
        self._drop("stopped", 1)
        return False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def holds(self, inspection_id: str) -> bool:
        """Whether the record of ``inspection_id`` is buffered or being written now: its answer has gone, its row
        is not in the database yet (a batch lingers :data:`BATCH_LINGER_S` to gather others)."""
        with self._lock:
            return inspection_id in self._unwritten

    def hurry(self) -> None:
        """Write the batch in hand without the rest of its linger: someone waits for one of its records."""
        self._hurry.set()

    def _settled(self, batch: list[PendingRecord]) -> None:
        """The records of ``batch`` are written or given up: no longer on their way."""
        with self._lock:
            self._unwritten.difference_update(r.id for r in batch)

    # --------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()
        if self.retention is not None and (self.retention[0] or self.retention[1] or self.min_free_bytes):
            self._retention_thread = threading.Thread(target=self._retain, name="record-retention", daemon=True)
            self._retention_thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking records, write what is buffered (within ``timeout``, :data:`STOP_TIMEOUT_S` unless given: a
        database that is down meanwhile is retried until shortly before it), then stop the threads. What could not
        be written is counted as ``shutdown``."""
        if timeout is None:
            timeout = STOP_TIMEOUT_S
        self._stop_by = time.monotonic() + max(0.0, timeout - STOP_MARGIN_S)
        self._stop.set()
        self._hurry.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck on the database: its batch and the buffer are lost, and counted
                lost = self.depth + self._writing
                log.error("records: the writer did not finish within %.0f s; %d record(s) lost (%d being written, "
                          "%d buffered)", timeout, lost, self._writing, self.depth)
                self._drop("shutdown", lost)
                self._abandoned = True  # counted here: the writer, if it ever returns, counts nothing again
        left = self._take(self.depth) if self._thread is None or not self._thread.is_alive() else []
        if left:
            self._settled(left)
            self._drop("shutdown", len(left))
        self._retain_now.set()
        if self._retention_thread is not None:
            self._retention_thread.join(5)

    def flush(self, timeout: float = 10.0) -> bool:
        """Write what is buffered now, without the batch's linger (as a stop does), and wait until the buffer is
        empty and written (tests, the CLI): False if it is not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            self._hurry.set()  # again on every look: the writer clears it once it has taken a batch
            time.sleep(0.01)
        return False

    # --------------------------------------------------------------------------------------------- writer
    def _take(self, n: int) -> list[PendingRecord]:
        out = []
        while len(out) < n:
            try:
                rec = self._queue.get_nowait()
            except queue.Empty:
                break
            out.append(rec)
        with self._lock:
            self._bytes -= sum(r.nbytes for r in out)
        return out

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=FLUSH_WAIT_S)
            except queue.Empty:
                self._files_failed_since(final=self._stop.is_set())
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                self._bytes -= first.nbytes
            # linger for a batch: one transaction (and its commit's fsync) per batch, not per record, is what keeps
            # recording off the scoring threads' backs at a line's steady pace; records land this much later
            if self._queue.qsize() < BATCH_MAX:  # a stop or a flush ends the wait: what is buffered is written at once
                self._hurry.wait(BATCH_LINGER_S)
            if not self._stop.is_set():
                self._hurry.clear()  # a flush hurries what was buffered when it asked; later batches linger again
            batch = [first, *self._take(BATCH_MAX - 1)]
            self._writing = len(batch)
            try:
                self._write(batch)
            except Exception:  # the writer must never die: a bug here loses this batch, counted
                log.exception("records: unexpected failure writing %d record(s)", len(batch))
                self._drop("error", len(batch))
            finally:
                self._writing = 0
                self._settled(batch)
                for _ in batch:
                    self._queue.task_done()
                self._depth()

    def _write(self, batch: list[PendingRecord]) -> None:
        """Store the batch's pictures, then insert its rows. The pictures are held from their store until the rows
        are in the database (or given up): this process's retention in between can neither delete them under a row
        that says "stored" nor mark a row about pictures it keeps. Another process's retention does not see the
        holds: the insert writes back what such a pass deleted, under the lock it takes (``RecordStore.add_many``),
        so the batch keeps its pictures' bytes until then."""
        held: list[str] = []
        pictures: dict[str, bytes] = {}
        try:
            self._insert([self._row(r, held, pictures) for r in batch], pictures)
        finally:
            if held and self.store.files is not None:
                self.store.files.release(held)

    def _insert(self, rows: list[Inspection], pictures: dict[str, bytes]) -> None:
        from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        from .store import PicturesBusy

        if self._schema_ready and self.store.file_replaced():
            self._schema_ready = False  # a deleted SQLite file: make a new one rather than write to the ghost
        started = time.monotonic()
        already = 0  # rows a lost commit answer had written after all (found on a retry)
        for attempt in itertools.count():
            pause = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
            try:
                if not self._schema_ready:
                    self.store.upgrade()
                    self._schema_ready = True
                    self._hold_data_dir()
                if attempt:  # the last attempt may have committed before its connection was lost: not twice
                    present = self.store.ids_present(r.id for r in rows)
                    if present:
                        rows = [r for r in rows if r.id not in present]
                        already += len(present)
                        log.info("records: %d record(s) were written before the database's answer was lost; "
                                 "not written again", len(present))
                        self._written(len(present))
                if rows:
                    self.store.add_many(rows, pictures)
                    self._written(len(rows))
                if attempt:  # the warnings said it was down: say it is back, or the log leaves it in doubt
                    log.info("records: database %s takes records again after %.0f s of retries; %d record(s) "
                             "written", self._where(), time.monotonic() - started, len(rows) + already)
                return
            except (IntegrityError, DataError, UnicodeError):  # something in the batch the database refuses (or
                # the driver cannot encode: a lone surrogate from a file name in another code page): one by one
                self._write_singly([_fresh(r) for r in rows], pictures)
                return
            except (DBAPIError, PoolTimeout, PicturesBusy) as exc:  # unreachable, timed out, locked, every pooled
                # connection busy (API reads waiting on a lock), read-only (a failover to a standby), a table
                # missing (a database back empty, set up again below), the pictures' lock held by a pass elsewhere:
                # the database's state, not the rows', so wait and retry the whole batch
                if self._stop.is_set() and time.monotonic() >= self._stop_by:  # the stop's grace is over
                    log.error("records: database %s unavailable at shutdown, %d record(s) dropped: %s",
                              self._where(), len(rows), _short(exc))
                    self._drop("shutdown", len(rows))
                    return
                if time.monotonic() - started > RETRY_FOR_S:
                    log.error("records: database %s unavailable, %d record(s) dropped: %s", self._where(),
                              len(rows), _short(exc))
                    self._drop("database", len(rows))
                    return
                if attempt < len(RETRY_BACKOFF_S) or attempt % 8 == 0:
                    log.warning("records: database %s unavailable (%s); %d record(s) in hand, retrying in %.1f s",
                                self._where(), _short(exc), len(rows), pause)
                self.retrying = True
                if _schema_missing(exc):  # a database back without its data: set it up again, as at start-up
                    self._schema_ready = False
                self.store.reconnect_if_read_only(exc)  # a SQLite file made writable again: opened anew
                rows = [_fresh(r) for r in rows]
                self._stop.wait(pause) if not self._stop.is_set() else time.sleep(min(pause, 0.5))
            except Exception as exc:  # noqa: BLE001 - schema errors (newer database) and the like
                log.error("records: cannot write %d record(s): %s", len(rows), _short(exc))
                self._drop("database", len(rows))
                return

    def _where(self) -> str:
        """The database, password hidden, for a line that says it is unavailable: which file or server to check."""
        from .store import redact

        return redact(self.store.url)

    def _write_singly(self, rows: list[Inspection], pictures: dict[str, bytes]) -> None:
        for row in rows:
            try:
                self.store.add_many([row], pictures)
                self._written(1)
            except Exception as exc:  # noqa: BLE001
                if self._landed(row.id):  # an earlier attempt's commit, still under way when the retry looked
                    log.info("records: record %s was written before the database's answer was lost; not written "
                             "again", row.id)
                    self._written(1)
                    continue
                log.error("records: record %s refused by the database: %s", row.id, _short(exc))
                self._drop("invalid", 1)

    def _landed(self, inspection_id: str) -> bool:
        """Whether the database holds this record already; False where it cannot say."""
        try:
            return inspection_id in self.store.ids_present([inspection_id])
        except Exception:  # noqa: BLE001 - the refusal stands as it was
            return False

    def _row(self, r: PendingRecord, held: list[str], pictures: dict[str, bytes]) -> Inspection:
        """Hash, store the files the policy keeps (their keys added to ``held``: the caller releases them once the
        row is written; their bytes to ``pictures``, for the insert to write back), and build the row (on the
        writer thread)."""
        digest = hashlib.sha256(r.data).hexdigest()
        pixels = None
        if r.pixels is not None:
            from ..training_set import pixel_digest  # here: the records' commands import this module without it

            pixels = pixel_digest(r.pixels)
            r.pixels = None  # the batch is held while the database is retried: the photo need not be
        image_key = heatmap_key = None
        state = FILES_NOT_KEPT
        if self.keeps(r.is_anomaly) and self.store.files is not None:
            if self._low_disk(len(r.data)):
                state = FILES_FAILED  # the row still goes in: the trace of every part matters more than its picture
            else:
                try:
                    image_key = self.store.files.put(r.data, extension_of(r.data), digest, hold=True)
                    held.append(image_key)
                    pictures[image_key] = r.data
                    png = r.heatmap_png
                    if png is None and r.normalized_map is not None:
                        from ..heatmap import heatmap_png

                        png = heatmap_png(r.normalized_map())
                    if png is not None:
                        heatmap_key = self.store.files.put(png, "png", hold=True)
                        held.append(heatmap_key)
                        pictures[heatmap_key] = png
                    state = FILES_STORED
                except OSError as exc:  # disk full, permissions: the record is still written, and says so
                    self._file_failed(r.id, exc)
                    image_key = heatmap_key = None
                    state = FILES_FAILED
                    if self.metrics is not None:
                        self.metrics.record_files_not_stored.labels("error").inc()
        from ..decision import decision_word  # here: decision.py brings the scoring stack (torch), which the
        # records' commands (`anomaly db`, `records export`) import this module without

        c = r.context
        return Inspection(
            id=r.id, created_at=r.created_at, model=r.model, model_version=r.model_version, score=r.score,
            normalized_score=r.normalized_score, threshold=r.threshold, scorers=opinions(r.scorers),
            decision=decision_word(r.is_anomaly), regions=r.regions, image_width=r.image_width,
            image_height=r.image_height, image_bytes=len(r.data), image_sha256=digest, pixels_sha256=pixels,
            timing_ms=r.timing_ms,
            part_id=c.part_id, line=c.line, station=c.station, meta=c.meta, warnings=list(r.warnings), source=r.source,
            request_id=r.request_id, image_file=image_key, heatmap_file=heatmap_key, files_state=state,
            view_token=secrets.token_urlsafe(16), **how_scored(r.scored_with), **map_place(r.embedding))

    def _low_disk(self, nbytes: int) -> bool:
        """True (counted, logged now and then, retention woken) when storing ``nbytes`` more would leave the
        volume under ``min_free_bytes`` free."""
        if not self.min_free_bytes or self.store.files is None:
            return False
        free = self.store.files.free_bytes()
        if free is None or free - nbytes >= self.min_free_bytes:
            return False
        if self.metrics is not None:
            self.metrics.record_files_not_stored.labels("low_disk").inc()
        now = time.monotonic()
        if now - self._low_disk_logged > 60:
            self._low_disk_logged = now
            log.warning("records: %d bytes free on the data volume, under the %d kept free "
                        "(--retention-min-free-bytes): records are written without their pictures, and retention "
                        "removes the oldest pictures", free, self.min_free_bytes)
            self._retain_now.set()
        return True

    def _file_failed(self, record_id: str, exc: OSError) -> None:
        """Log a picture that could not be stored, at most once a minute: a full or read-only volume fails every
        part's, and one line per part (ten a second on a busy line) buried the rest of the log."""
        said = self._files_failed.event()
        if said is None:
            return
        assert self.store.files is not None
        more = said - 1
        log.error("records: cannot store the photo of %s under %s: %s; its record is written without it%s", record_id,
                  self.store.files.root, exc.strerror or exc,
                  f" ({more} more since the last such line)" if more else
                  " (the next such failures are logged once a minute; anomaly_record_files_not_stored_total counts "
                  "each)")

    def _files_failed_since(self, final: bool = False) -> None:
        """The line for the pictures not stored since the last one, once the minute is over (or the writer stops),
        though no failure follows to say it: the last minute's of a full volume were never said, and a burst
        read in the log as the one part the line before it named."""
        held = self._files_failed.release(wait=not final)
        if not held:
            return
        assert self.store.files is not None
        log.error("records: %d more photo(s) not stored under %s since the last such line; their records are "
                  "written without them", held, self.store.files.root)

    def _hold_data_dir(self) -> None:
        """Take the data directory's lock if start-up could not (a full volume refused its file): without it,
        ``anomaly db restore`` would replace the database under this writer, and a second service on the same
        directory would not be warned."""
        try:
            self.store.warn_if_shared()
        except OSError as exc:  # the lock only guards and warns: the records go on without it
            log.warning("records: cannot lock the data directory (%s)", _short(exc))

    # --------------------------------------------------------------------------------------------- retention
    def _retain(self) -> None:
        assert self.retention is not None
        max_days, max_bytes, every = self.retention
        while True:
            self._retain_now.wait(min(every, 5.0) if not self._schema_ready else every)
            self._retain_now.clear()
            if self._stop.is_set():
                return
            if not self._schema_ready:
                continue  # the first pass waits until the database has answered once
            try:
                result = self.store.apply_retention(max_days, max_bytes, self.min_free_bytes, self._retention_now())
                if self.metrics is not None:
                    self.metrics.record_files_retired.labels("age").inc(result["expired"])
                    self.metrics.record_files_retired.labels("size").inc(result["removed"])
                    self.metrics.record_files_retired.labels("free_space").inc(result["free_space"])
            except Exception as exc:  # noqa: BLE001 - nothing was deleted that the records do not know about
                log.warning("records: retention pass failed, next one in %.0f s: %s", every, _short(exc))

    def _retention_now(self) -> float:
        """The time retention counts ages to (:attr:`clock`), never past the time the picture volume gives a file
        made now; a forward step of the wall clock since the service started is said in the log, once per step.

        Why the volume's: replicas share it, and a picture is dated by the clock of the host (or file server) that
        wrote it. A replica whose clock ran two hours ahead counted the others' pictures two hours older than
        they were, and with a short ``--retention-days`` removed those written seconds before."""
        now = self.clock()
        volume = self.store.files.volume_now() if self.store.files is not None else None
        if volume is not None and volume < now:
            behind = now - volume
            if behind > CLOCK_STEP_SAID_S and abs(behind - self._volume_behind_logged) > CLOCK_STEP_SAID_S:
                log.warning("records: this host's clock is %.0f s ahead of the time the picture volume dates a new "
                            "file by; retention counts pictures' ages to the volume's time, so none is removed "
                            "early. Sync this host's clock (docs/service.md, replicas' clocks)", behind)
                self._volume_behind_logged = behind
            now = volume
        ahead = self.clock.ahead_s
        if ahead > CLOCK_STEP_SAID_S and abs(ahead - self._step_logged) > CLOCK_STEP_SAID_S:
            log.warning("records: the clock stepped forward %.0f s past the time the service has counted since it "
                        "started; retention counts pictures' ages to the earlier time, so none is removed early. "
                        "If the new time is right (the host started before its time was synced), restart the "
                        "service: its passes remove pictures by age again from the new time", ahead)
            self._step_logged = ahead
        elif ahead <= CLOCK_STEP_SAID_S:
            self._step_logged = 0.0
        return now

    # --------------------------------------------------------------------------------------------- metrics
    def _written(self, n: int) -> None:
        self.written += n
        self.retrying = False
        if self.metrics is not None:
            self.metrics.records_written.inc(n)

    def _drop(self, reason: str, n: int) -> None:
        if self._abandoned:  # stop() has counted everything the writer held
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        if self.metrics is not None:
            self.metrics.records_dropped.labels(reason).inc(n)
        if reason != "buffer_full" or self.dropped[reason] in (1, 10, 100) or self.dropped[reason] % 1000 == 0:
            log.warning("records: %d record(s) dropped (%s); %d dropped so far for this reason", n, reason,
                        self.dropped[reason])

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.record_buffer_depth.set(self._queue.qsize())


def _fresh(row: Inspection) -> Inspection:
    """A copy of a row not attached to any (failed) session, for the retry."""
    from sqlalchemy import inspect

    mapper = inspect(Inspection)
    return Inspection(**{c.key: getattr(row, c.key) for c in mapper.column_attrs})


def _schema_missing(exc: BaseException) -> bool:
    """Whether the database answered that a table of the records is missing (PostgreSQL's undefined_table, SQLite's
    "no such table"): a database that came back empty, which :meth:`RecordStore.upgrade` sets up again (it changes
    nothing where the schema is there)."""
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return state == "42P01" or "no such table" in str(exc)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


class RecordingUnavailable(Exception):
    """Recording was asked for (``record`` on) but cannot start: an unwritable ``--data-dir``, a bad database URL.
    The service scores all the same; every part it cannot record is counted as dropped (``unavailable``)."""


def open_recording(settings: Any, metrics: Any = None) -> tuple[RecordStore, Recorder]:
    """The store and a started recorder for the service's settings (``record`` on).

    The schema upgrade is tried here; if the database cannot be reached yet the service still starts, and the
    writer upgrades on its first batch (records are buffered meanwhile, then dropped and counted). Raises
    :class:`RecordingUnavailable` where recording cannot start at all."""
    from sqlalchemy.exc import ArgumentError

    from .store import RecordStore, SchemaError, redact

    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    try:
        store = RecordStore.open(url, settings.data_dir)
        store.warn_if_shared()
    except (OSError, ValueError, ImportError, ArgumentError) as exc:  # an unwritable --data-dir, a bad URL or one
        # whose driver is not installed (psycopg2, mysql) must not keep parts unscored
        log.error("records: cannot record (%s); scoring goes on WITHOUT records, and every part is counted in "
                  "anomaly_records_dropped_total{reason=\"unavailable\"}: fix --data-dir / --database-url and "
                  "restart, or set --record false", _short(exc))
        raise RecordingUnavailable(_short(exc)) from exc
    recorder = Recorder(store, settings.keep_images, settings.record_buffer_size, metrics,
                        retention=(settings.retention_days, settings.retention_max_bytes, settings.retention_interval),
                        min_free_bytes=settings.retention_min_free_bytes)
    try:
        store.upgrade()
        recorder._schema_ready = True
        log.info("recording every inspection to %s (photos: %s, under %s)", redact(store.url), settings.keep_images,
                 settings.data_dir)
    except SchemaError as exc:  # another release's database: no retry can fix it, so recording is unavailable
        log.error("records: %s; scoring goes on WITHOUT records, and every part is counted in "
                  "anomaly_records_dropped_total{reason=\"unavailable\"}", exc)
        store.close()
        raise RecordingUnavailable(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a refused login or a database that does not exist is the URL's fault
        if not _refused_login(exc):
            log.error("records: database %s unavailable at start-up (%s); scoring goes on and the writer retries",
                      redact(store.url), _short(exc))
            recorder.retrying = True  # /readyz: not "on" while the database has refused every try (a full volume)
        else:
            log.error("records: database %s refuses this URL (%s); scoring goes on WITHOUT records, and every part "
                      "is counted in anomaly_records_dropped_total{reason=\"unavailable\"}: fix --database-url and "
                      "restart", redact(store.url), _short(exc))
            store.close()
            raise RecordingUnavailable(_short(exc)) from exc
    recorder.start()
    return store, recorder


# what PostgreSQL says when it refuses a connection's URL itself (a connection that fails carries no SQLSTATE in
# psycopg, only the server's message; a server set to another language falls back to retrying, as for an outage)
REFUSED_URL = re.compile(r'(database|role) "[^"]*" does not exist|password authentication failed|no pg_hba\.conf entry')


def _refused_login(exc: BaseException) -> bool:
    """Whether PostgreSQL refused the URL itself: a login it rejects (SQLSTATE class 28) or a database that does not
    exist (3D000). No wait fixes those, unlike a server that is down or starting."""
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return state.startswith("28") or state == "3D000" or REFUSED_URL.search(str(exc)) is not None


def pending_from(scored: Any, data: bytes, context: PartContext, keep: bool, source: str = "api",
                 request_id: str | None = None) -> PendingRecord:
    """A record of one scored upload (an ``api.lifecycle.Scored``), from what the answer was made of;
    ``request_id``: the call's X-Request-ID.

    Only references are taken here (no copy, no encoding): the request path pays nothing for its record."""
    res, verdict, out = scored.result, scored.verdict, scored.out
    shown = verdict.heatmaps.get("png")
    if shown is not None and shown.shape is not None:  # drawn smaller (max_side): the record keeps the map's own size
        shown = None
    return PendingRecord(
        data=data, model=out.model, model_version=out.model_version, score=float(res.score),
        normalized_score=float(res.normalized_score), threshold=float(res.threshold),
        is_anomaly=bool(res.is_anomaly), regions=[r.to_dict() for r in verdict.regions],
        image_width=int(res.image_width), image_height=int(res.image_height), timing_ms=dict(out.timing_ms),
        context=context, warnings=list(out.warnings), normalized_map=res.normalized_map if keep else None,
        heatmap_png=shown.data if shown is not None and keep else None, source=source, request_id=request_id,
        scorers=res.scorers or None, scored_with=res.scored_with, embedding=verdict.embedding,
        pixels=scored.image if keep else None, map_bytes=_maps_bytes(res) if keep else 0)


def opinions(scorers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """A result's ``scorers`` as the record keeps them: the answer's keys, in plain JSON values whatever a scorer
    hands back (a NumPy float, which the JSON column cannot write, would fail its whole batch). None stays None: one
    opinion, the record's own."""
    if not scorers:
        return None
    return {name: {"score": float(s["score"]), "normalized_score": float(s["normalized_score"]),
                   "threshold": float(s["threshold"]), "is_anomaly": bool(s["is_anomaly"]),
                   "reads": s.get("reads")} for name, s in scorers.items()}


def how_scored(scored_with: ScoredWith | None) -> dict[str, Any]:
    """A result's ``scored_with`` as the record's columns, in plain values (None: a result that does not say, each
    column null as in a record made before they were kept). The runtime and device are cut to their columns' width:
    a longer name (a device string of a later torch) must not cost the record, which its batch would retry in vain."""
    if scored_with is None:
        return {"runtime": None, "knn_search": None, "device": None, "threads": None}
    return {"runtime": str(scored_with.runtime)[:16],
            "knn_search": None if scored_with.knn_search is None else str(scored_with.knn_search),
            "device": str(scored_with.device)[:32], "threads": int(scored_with.threads)}


def map_place(point: MapPoint | None) -> dict[str, float | None]:
    """The part's place on the image map as the record's columns (both null: no place, as in a record made before
    they were kept). A coordinate that is not finite is no place: no map draws it, and SQLite would store NaN as
    null in one column and not the other."""
    if point is None or not (math.isfinite(point.x) and math.isfinite(point.y)):
        return {"embedding_x": None, "embedding_y": None}
    return {"embedding_x": float(point.x), "embedding_y": float(point.y)}


def _maps_bytes(res: Any) -> int:
    """The bytes of the photo-sized maps a kept record holds until its heatmap is drawn: the kNN's, and a fused
    part's decision map beside it."""
    return sum(int(m.nbytes) for m in (res.anomaly_map, getattr(res, "decision_map", None)) if m is not None)
