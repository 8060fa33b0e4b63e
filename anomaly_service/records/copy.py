"""Copy the inspection records, their reviews and their pictures from one records database into another: one
host's SQLite into the PostgreSQL that several replicas share when the line grows past one machine, or back.

Why not a dump: ``db backup`` is SQLite's own file and ``pg_dump`` PostgreSQL's, and neither reads the other's.
Rows are read and written here through the tables the service itself uses, so each column converts on the way
(JSON, UTC times), and nothing is written that the service could not have written. Inspection ids (UUIDv7) are
kept: their pictures' URLs and view tokens go on working, a copy stopped part way is finished by running it again
(what is already there is skipped, a chunk of inspections and their reviews lands whole or not at all), and the
records of two hosts can be brought into one database. Reviews are numbered by the database they land in, so an
undo names the copy of the review it withdraws.

Pictures are content-addressed files (files.py): each one a copied record says is stored is copied beside the
destination's records with its modification time, since retention ages a picture by it, and never over a file of
the same key. Their rows go in under the lock a retention pass takes, and a picture such a pass removed after it
was copied is copied again first, as an insert of the service writes its pictures back.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import JSON, Connection, bindparam, func, insert, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from .backup import make_owned_dir
from .files import PRIVATE, FileStore
from .models import FILES_STORED, Inspection, Review
from .store import PICTURES_LOCK, PicturesBusy, RecordStore, SchemaError, redact

log = logging.getLogger(__name__)

INSPECTIONS, REVIEWS = Inspection.__table__, Review.__table__
# inspections a transaction copies: a copy stopped part way loses one chunk's work at most, and IN lists stay short
CHUNK = 500
# what a destination says of a row it cannot hold (a value too long for PostgreSQL's column, a NUL character), or of
# one another copy put in meanwhile: not a reason to stop the rows after it
REFUSED = (DataError, IntegrityError)
# tries at a transaction whose lock stays taken past its wait (PostgreSQL's lock_timeout, SQLite's busy timeout)
LOCK_TRIES = 12
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock not taken within lock_timeout


class CopyError(RuntimeError):
    """A copy that cannot be done as asked: the message says why and what to do."""


@dataclass
class CopyInfo:
    inspections: int = 0  # copied by this run
    already: int = 0  # found in the destination already (an earlier run, or the same part recorded twice)
    reviews: int = 0
    pictures: int = 0  # files copied
    pictures_there: int = 0  # files the destination already held
    pictures_missing: int = 0  # files a copied record says are stored that the source no longer holds
    refused: list[tuple[str, str]] = field(default_factory=list)  # (inspection id, why) the destination refused
    # reviews of inspections the destination held already that it does not hold (made at the source after their
    # inspection was copied): (inspection id, how many)
    reviews_left: list[tuple[str, int]] = field(default_factory=list)
    upgraded: tuple[str, str] | None = None  # the destination's schema revision before the copy and after (upgraded)
    seconds: float = 0.0


def same_database(a: RecordStore, b: RecordStore) -> bool:
    """Whether two stores are one database: a copy into itself would skip every row and say all was well."""
    ua, ub = make_url(a.url), make_url(b.url)
    if ua.get_backend_name() != ub.get_backend_name():
        return False
    if ua.get_backend_name() == "sqlite":
        pa, pb = Path(ua.database or ""), Path(ub.database or "")
        with contextlib.suppress(OSError):
            return pa.samefile(pb)
        return pa.resolve() == pb.resolve()
    ia, ib = _server_database(a), _server_database(b)
    if ia is not None and ib is not None:
        return ia == ib
    return _where(ua) == _where(ub)


def _where(u: URL) -> tuple[object, ...]:
    """A PostgreSQL URL's server and database as written (libpq also takes the host and port as parameters)."""
    return u.host or u.query.get("host"), u.port or u.query.get("port"), u.database


# one database of one running server, whatever name, address or user reaches it: a URL's spelling told an address
# from the host name it belongs to, and two servers' same-named databases behind unix sockets (no host in the URL)
# apart from nothing
_SERVER_DATABASE = text("SELECT pg_postmaster_start_time(), current_setting('port'), oid, datname FROM pg_database "
                        "WHERE datname = current_database()")


def _server_database(store: RecordStore) -> tuple[object, ...] | None:
    """PostgreSQL: the server's start and port and the database's oid and name; None where it cannot be asked (the
    copy then says why it cannot reach it)."""
    try:
        with store.engine.connect() as conn:
            return tuple(conn.execute(_SERVER_DATABASE).one())
    except Exception:  # noqa: BLE001 - unreachable: the URLs are compared as written
        return None


def _ready(source: RecordStore, dest: RecordStore) -> tuple[str, str] | None:
    """The source at this release's schema (read, never migrated: it is someone's records), the destination
    created or upgraded as a service starting on it would. Returns the destination's revisions before and after
    where it upgraded one that held a schema already: the replicas' database, which their release, if older, refuses
    from its next start (a copy run with a newer release on an operator's machine upgraded it unsaid)."""
    if same_database(source, dest):
        raise CopyError(f"{redact(source.url)} is the destination too: nothing to copy")
    current, head = source.current_revision(), source.head_revision()
    if current is None:
        raise CopyError(f"{redact(source.url)} holds no records (no schema)")
    if current != head:
        refused = source.schema_refusal(current, "copy it with the release that wrote it")
        raise CopyError(str(refused) if refused is not None else
                        f"{redact(source.url)} is at schema revision {current}, this release's is {head}: upgrade it "
                        "first (`anomaly db upgrade` with the same --data-dir / --database-url)")
    try:
        before, after = dest.upgrade()
    except SchemaError as exc:
        raise CopyError(f"the destination: {exc}") from None
    return (before, after) if before is not None and after is not None and before != after else None


def _copy_picture(src: FileStore, dest: FileStore, key: str, info: CopyInfo, owner: tuple[int, int] | None) -> None:
    """Copy one stored picture (and what was drawn from it stays behind: it is drawn again when asked for) unless the
    destination holds it; written whole beside its name and linked in, so a file of that key is never replaced."""
    target = dest.path(key)
    there = dest.locate(key)
    if there is not None:
        info.pictures_there += 1
        _touch_forward(there, src.locate(key))
        return
    found = src.locate(key)
    if found is None:
        info.pictures_missing += 1
        return
    make_owned_dir(target.parent)  # run as root: the service's user's, as the folders it makes itself
    for _ in range(SWEPT_TRIES - 1):
        with contextlib.suppress(_Swept):
            return _write_picture(found, target, info, owner)
    _write_picture(found, target, info, owner)


def _touch_forward(there: Path, found: Path | None) -> None:
    """Give the destination's file the source's time where that is newer, never an older one: its newest record's
    age is its age, as a service that stores a photo again touches it (files.py). Kept at another host's older time,
    a photo both hosts recorded (a blank frame, a reference part) went at the first retention pass with that host's
    old records, and with the picture of the other host's record from yesterday."""
    if found is None:
        return
    with contextlib.suppress(OSError):  # one a pass removed meanwhile is copied again under the lock
        mine, theirs = os.stat(there), os.stat(found)
        if theirs.st_mtime_ns > mine.st_mtime_ns:
            os.utime(there, ns=(mine.st_atime_ns, theirs.st_mtime_ns), follow_symlinks=False)


class _Swept(Exception):
    """The temporary copy went before it was linked in: a retention pass of a replica sweeping temporaries."""


# tries at a picture whose temporary copy is swept before it is linked in: its file time, set before the link, is
# the picture's, older than the hour after which a pass's sweep takes a temporary file for a crash's leftover
SWEPT_TRIES = 3


def _write_picture(found: Path, target: Path, info: CopyInfo, owner: tuple[int, int] | None) -> None:
    """Write ``found`` beside ``target`` with its times and owner, and link it in unless a file of that name came.
    Every step is taken in the folder opened once, never through a link: the folders are the service's user's, and
    one swapped for a link between the look and the write had a copy run as root write there, the file that user's."""
    try:
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise CopyError(f"{target.parent} is a link, not a picture folder the service made: nothing was written "
                        "through it; remove it, then copy again") from None
    tmp = f".tmp-{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE, dir_fd=folder)
        try:
            with open(found, "rb") as fin, os.fdopen(fd, "wb", closefd=False) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            os.fsync(fd)
            st = os.stat(found)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))  # its age is its records' age: retention reads it
            if owner is not None:
                os.fchown(fd, *owner)
            both = {"src_dir_fd": folder, "dst_dir_fd": folder}
            try:
                os.link(tmp, target.name, **both)
            except FileExistsError:  # a replica stored the same photo meanwhile: the same bytes, and newer
                info.pictures_there += 1
                return
            except OSError as exc:  # a file system without hard links (some network shares): renamed in, if still
                if not _in(folder, tmp):  # not there
                    raise _Swept(f"{tmp} went before it was linked in as {target}") from exc
                if _in(folder, target.name):
                    info.pictures_there += 1
                    return
                try:
                    os.replace(tmp, target.name, **both)
                except FileNotFoundError as gone:
                    raise _Swept(f"{tmp} went before it was renamed to {target}") from gone
            with contextlib.suppress(OSError):  # a file system that cannot sync a folder: as durable as it makes it
                os.fsync(folder)
            info.pictures += 1
        finally:
            os.close(fd)
    finally:  # also when an interrupt came as the file was made: what a crash leaves is swept by its name's age
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        os.close(folder)


def _in(folder: int, name: str) -> bool:
    """Whether ``folder`` holds ``name`` (a link counts)."""
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _owner(dest: RecordStore) -> tuple[int, int] | None:
    """Who the copied pictures belong to when root copies them: the data directory's owner (the service's user)."""
    if os.geteuid() != 0 or dest.data_dir is None or not dest.data_dir.exists():
        return None
    st = dest.data_dir.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def copy_records(source: RecordStore, dest: RecordStore, *, chunk: int = CHUNK,
                 step: Callable[[int], None] | None = None) -> CopyInfo:
    """Copy every inspection of ``source`` that ``dest`` does not hold, oldest first, with its reviews and, where
    both stores have a data directory, the pictures it says are stored. ``step(n)``: n more inspections done
    (copied or found there already), for a progress bar."""
    upgraded = _ready(source, dest)
    started = time.monotonic()
    info = CopyInfo(upgraded=upgraded)
    pictures = source.files is not None and dest.files is not None
    owner = _owner(dest) if pictures else None
    after: str | None = None
    while True:
        with source.engine.connect() as sc:
            stmt = select(INSPECTIONS).order_by(INSPECTIONS.c.id).limit(chunk)
            if after is not None:
                stmt = stmt.where(INSPECTIONS.c.id > after)
            rows = [dict(r) for r in sc.execute(stmt).mappings()]
            if not rows:
                break
            ids = [r["id"] for r in rows]
            reviews = [dict(r) for r in sc.execute(select(REVIEWS).where(REVIEWS.c.inspection_id.in_(ids))
                                                   .order_by(REVIEWS.c.id)).mappings()]
        after = ids[-1]
        with dest.engine.connect() as dc:
            there = dict(dc.execute(select(INSPECTIONS.c.id, INSPECTIONS.c.files_state)
                                    .where(INSPECTIONS.c.id.in_(ids))).all())
        new = [r for r in rows if r["id"] not in there]
        _reviews_left(dest, [v for v in reviews if v["inspection_id"] in there], info)
        # the pictures of the rows to copy, and of those copied before whose copies say stored: a first run without
        # the picture folders copied no picture, and running it again with them copies them
        keys = _keys([r for r in rows if there.get(r["id"], FILES_STORED) == FILES_STORED]) if pictures else []
        for key in keys:  # before the rows, as the service stores a picture before the record that names it
            _copy_picture(source.files, dest.files, key, info, owner)  # type: ignore[arg-type]
        if new:
            land = functools.partial(_land, source, dest, info, owner, reviews, pictures)
            with dest.engine.connect() as dc:
                try:
                    land(dc, new)
                except REFUSED:  # a row the destination cannot hold stopped every later run here: each row
                    for r in new:  # alone then, so the others go in and that one is named
                        try:
                            land(dc, [r])
                        except REFUSED as exc:
                            with dc.begin():
                                found = dc.scalar(select(INSPECTIONS.c.id).where(INSPECTIONS.c.id == r["id"]))
                            if found is not None:
                                info.already += 1  # another copy running at once put it in
                            else:
                                info.refused.append((r["id"], _why(r, [v for v in reviews
                                                                     if v["inspection_id"] == r["id"]], exc)))
        info.already += len(rows) - len(new)
        if step is not None:
            step(len(rows))
    info.seconds = time.monotonic() - started
    return info


def _review_key(review: dict) -> tuple[object, ...]:
    """A review as both databases hold it: a copy keeps every column but the ids (an undo's names its own copy)."""
    return (review["inspection_id"], review["created_at"], review["reviewer"], review["verdict"],
            review["undoes"] is None, review["note"])


def _reviews_left(dest: RecordStore, reviews: list[dict], info: CopyInfo) -> None:
    """Count the source's ``reviews`` of inspections the destination holds already that it holds no copy of: made
    at the source after their inspection was copied (its service left running through the move). A copy adds
    nothing to an inspection already there (two histories are not merged), and a run again to finish said all was
    there while the replicas never saw an operator's defect, which guards an update against it. Said, not passed
    over."""
    if not reviews:
        return
    ids = sorted({v["inspection_id"] for v in reviews})
    with dest.engine.connect() as dc:
        held = {_review_key(dict(v)) for v in dc.execute(select(REVIEWS).where(REVIEWS.c.inspection_id.in_(ids)))
                .mappings()}
    left: dict[str, int] = {}
    for v in reviews:
        if _review_key(v) not in held:
            left[v["inspection_id"]] = left.get(v["inspection_id"], 0) + 1
    info.reviews_left += sorted(left.items())


def _keys(rows: list[dict]) -> list[str]:
    """The pictures these rows say are stored."""
    return sorted({k for r in rows if r["files_state"] == FILES_STORED for k in (r["image_file"], r["heatmap_file"])
                   if k})


def _land(source: RecordStore, dest: RecordStore, info: CopyInfo, owner: tuple[int, int] | None,
          reviews: list[dict], pictures: bool, dc: Connection, rows: list[dict]) -> None:
    """Insert ``rows`` with their reviews in one transaction, under the lock an insert of the service takes against
    another process's retention pass (RecordStore.add_many: SQLite's lock file around the whole transaction,
    PostgreSQL's shared advisory lock inside it, which its commit releases), copying again first each of their
    pictures such a pass removed since it was copied. Tried again while that lock stays taken past its wait, as the
    service's writer tries its batch again: a pass's turn on a slow share outlasts it."""
    keys = _keys(rows) if pictures else []
    ids = {r["id"] for r in rows}
    for attempt in range(1, LOCK_TRIES + 1):
        try:
            with dest._pictures_shared() if keys else contextlib.nullcontext(), dc.begin():
                if keys and dest.dialect == "postgresql":
                    dc.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": PICTURES_LOCK})
                again = CopyInfo()
                for key in keys:
                    _copy_picture(source.files, dest.files, key, again, owner)  # type: ignore[arg-type]
                dc.execute(insert(INSPECTIONS), rows)
                n = _copy_reviews(dc, [r for r in reviews if r["inspection_id"] in ids])
            break
        except (PicturesBusy, OperationalError) as exc:
            if attempt == LOCK_TRIES or not _busy(exc):
                raise
            log.info("copy: the destination's lock is taken (a retention pass?); trying again (%d)", attempt)
    info.pictures += again.pictures
    info.inspections += len(rows)
    info.reviews += n


def _busy(exc: Exception) -> bool:
    """A lock that stayed taken past its wait: the pictures' (a retention pass), or SQLite's write lock."""
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, PicturesBusy) or code == LOCK_NOT_AVAILABLE or "database is locked" in str(exc)


def _why(row: dict, reviews: list[dict], exc: Exception) -> str:
    """Why the destination refused an inspection, naming the column where it is one PostgreSQL refuses for its
    value (its messages name only the type): too long, a NUL character, a number JSON has no word for (SQLite's JSON
    is text, and Python writes NaN). Else the database's first line."""
    for table, values in ((INSPECTIONS, [row]), (REVIEWS, reviews)):
        for column in table.columns:
            limit = getattr(column.type, "length", None)
            for value in (v.get(column.name) for v in values):
                if isinstance(value, str) and limit is not None and len(value) > limit:
                    return f"its {column.name} is {len(value)} characters, the destination's column holds {limit}"
                if isinstance(value, str) and "\x00" in value:
                    return f"its {column.name} holds a NUL character"
                if isinstance(column.type, JSON) and value is not None:
                    try:
                        json.dumps(value, allow_nan=False)
                    except ValueError:
                        return f"its {column.name} holds NaN or Infinity, which JSON cannot"
    said = str(getattr(exc, "orig", None) or exc)
    return said.splitlines()[0] if said else type(exc).__name__


def _copy_reviews(dc: Connection, reviews: list[dict]) -> int:
    """Insert reviews (oldest first) with the destination's own ids; an undo then names its review's new id."""
    if not reviews:
        return 0
    old_ids = [r["id"] for r in reviews]
    undoes = [r["undoes"] for r in reviews]
    new_ids = list(dc.scalars(insert(REVIEWS).returning(REVIEWS.c.id, sort_by_parameter_order=True),
                              [{**{k: v for k, v in r.items() if k != "id"}, "undoes": None} for r in reviews]))
    renamed = dict(zip(old_ids, new_ids))
    fixes = [{"rid": new, "target": renamed.get(old)} for new, old in zip(new_ids, undoes) if old is not None]
    if fixes:
        dc.execute(update(REVIEWS).where(REVIEWS.c.id == bindparam("rid")).values(undoes=bindparam("target")), fixes)
    return len(reviews)


def count(store: RecordStore) -> int:
    """How many inspections ``store`` holds (the progress bar's total)."""
    with store.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(INSPECTIONS)) or 0)
