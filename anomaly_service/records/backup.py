"""Back up and restore the embedded SQLite records database while the line runs.

Copying ``records.db`` with ``cp`` while the service writes gives a file without the pages still in its write-ahead
log, or one torn mid-write; restoring a copy next to the old ``-wal`` file replays the old log into it. SQLite's
online backup API reads one consistent snapshot (in WAL mode the writer is never blocked meanwhile), and a restore
checks the copy, refuses while a service holds the data directory, and puts the file in place with no stale log
beside it. PostgreSQL has its own tools (``pg_dump``, base backups); nothing here re-implements them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..dir_lock import one_at_a_time
from ..whole_file import sync_dir
from .store import (BUSY_TIMEOUT_MS, CLAIMS_LOCK_FILE, CORE_COLUMNS, PICTURES_LOCK_FILE, SCHEMA_LOCK_SUFFIX,
                    SQLITE_FILE, kept_elsewhere, unescaped_database)

log = logging.getLogger(__name__)
SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database file while it is open


WAL_MODE = 2  # a database file's read and write format versions (header bytes 18 and 19) in WAL mode


class BackupError(RuntimeError):
    """A backup or restore that cannot be done as asked: the message says why and what to do."""


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    records: int
    reviews: int
    schema: str | None
    bytes: int
    seconds: float


def read_only_uri(path: Path) -> str:
    """SQLite's URI that opens ``path`` read-only. The path is percent-encoded: in a URI a '#' starts a fragment and
    a '?' the options, so a backup named 'Sicherung #3.db' was read as '.Sicherung ' (an empty database made
    there, the read-only option cut off with the rest) and refused as no records database."""
    return f"file:{quote(os.fsencode(path))}?mode=ro"


def _check(path: Path) -> tuple[int, int, str | None]:
    """(records, reviews, schema revision) of a database file that passes SQLite's integrity check."""
    try:
        con = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise BackupError(f"{path} cannot be opened as a SQLite database ({exc})") from None
    try:
        problems = [r[0] for r in con.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise BackupError(f"{path} fails SQLite's integrity check: {'; '.join(problems)}")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"inspections", "alembic_version"} <= tables:  # reviews came with schema 0002
            raise BackupError(f"{path} is a SQLite database but not an inspection records database "
                              f"(tables: {', '.join(sorted(tables)) or 'none'})")
        columns = {r[1] for r in con.execute("PRAGMA table_info(inspections)")}
        if missing := [c for c in CORE_COLUMNS if c not in columns]:
            raise BackupError(f"{path} has an inspections table, but not this product's (no {', '.join(missing)}): "
                              "a database of another program?")
        records = con.execute("SELECT count(*) FROM inspections").fetchone()[0]
        reviews = con.execute("SELECT count(*) FROM reviews").fetchone()[0] if "reviews" in tables else 0
        schema = con.execute("SELECT version_num FROM alembic_version").fetchone()
        return records, reviews, schema[0] if schema else None
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a readable SQLite database ({exc})") from None
    finally:
        con.close()


def _copy(source: Path, dest: Path) -> None:
    """``source``, with whatever its log beside it holds, as a new self-contained file ``dest``: SQLite's online
    backup in one step reads one snapshot, so the copy is consistent while a writer goes on."""
    src = sqlite3.connect(read_only_uri(source), uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=DELETE")  # no log to carry beside it
        finally:
            dst.close()
    finally:
        src.close()
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())


def _discard(path: Path) -> None:
    """A copy that did not make it, and the rollback journal SQLite may have left beside it."""
    for leftover in (path, path.with_name(path.name + "-journal")):
        with contextlib.suppress(OSError):
            leftover.unlink()


def backup(data_dir: Path, out: Path) -> BackupInfo:
    """A consistent copy of ``data_dir``'s records database at ``out``, checked, written atomically (a backup that
    fails half-way never replaces an earlier one at that path)."""
    source = Path(data_dir) / SQLITE_FILE
    if not source.is_file():
        elsewhere = unescaped_database(Path(data_dir))
        if elsewhere is not None:
            raise BackupError(kept_elsewhere(Path(data_dir), elsewhere))
        raise BackupError(f"no records database under {data_dir} (is the --data-dir right?)")
    out = Path(out)
    if out.resolve().parent == source.resolve().parent and out.name.startswith(SQLITE_FILE):
        # the live file, its log (-wal, -shm), the service's lock (.owner) or a kept one: replacing any of them
        # under a running service corrupts it or lets a restore in while it writes
        raise BackupError(f"{out} is the live database or one of its side files: back up to another path")
    partial = out.with_name(f".{out.name}.partial")
    t0 = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot write {out}: {exc.strerror or exc}") from None
    # one at a time into a folder: a second backup to ``out`` removed the first's partial copy and wrote its own
    # there, which the first then checked and renamed into place half-written
    with one_at_a_time(out.parent, "db backup"):
        try:
            partial.unlink(missing_ok=True)  # a killed backup's
            with _openable(source, out.parent) as readable:  # a dead host's disk mounted read-only
                _copy(readable, partial)
            records, reviews, schema = _check(partial)
            os.replace(partial, out)
            sync_dir(out.parent)  # the new name on the disk too (the copy's bytes are, _copy): a power cut keeps it
        except (sqlite3.Error, OSError) as exc:
            raise BackupError(f"backup of {source} to {out} failed: {exc}") from None
        finally:
            _discard(partial)
    return BackupInfo(out, records, reviews, schema, out.stat().st_size, time.perf_counter() - t0)


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def _hand_over(owner: tuple[int, int], *paths: Path) -> None:
    """Give ``paths`` the service's user and group, as the data directory's files show them. Only root makes files
    another user's: a restore or downgrade run with sudo left a root-owned database and lock, and the service,
    started again as its own user, recorded nothing (the lock's permission denied; the file read-only)."""
    if os.geteuid() != 0 or owner[0] == 0:
        return
    for path in paths:
        _give(path, owner)


def _give(path: Path, owner: tuple[int, int]) -> None:
    """Give ``path`` to ``owner`` where root owns it (made by this run, or left by an earlier one with sudo), never
    through a link: the directory is the service's user's, and a link of theirs named as the database or its lock
    had root make and hand over a file anywhere on the host. Opened without following a link and changed through
    that descriptor, so a link put in its place meanwhile is not followed either; a file with other hard links is
    left too (one of them may be outside the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link
            log.warning("%s is a link: left as it is, not given to the data directory's owner", path)
            return
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != 0:
            return
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
            log.warning("%s is not a file of its own: left as it is, not given to the data directory's owner", path)
            return
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def hand_over_database(data_dir: Path) -> None:
    """Give ``data_dir``'s records database and its side files to the directory's owner (the service's user) where
    root owns them: a command run with sudo that made the file, or found it left so by an earlier one."""
    data_dir = Path(data_dir)
    _hand_over(_owner(data_dir), *(data_dir / (SQLITE_FILE + s) for s in ("", *SIDE_FILES)),
               data_dir / PICTURES_LOCK_FILE,  # a copy's inserts take it (records.copy): the service opens it to write
               data_dir / CLAIMS_LOCK_FILE,  # a re-scoring shard's claim (RecordStore.claim)
               data_dir / (SQLITE_FILE + SCHEMA_LOCK_SUFFIX))  # migrations take turns on it (RecordStore.upgrade)


def make_owned_dir(path: Path) -> None:
    """Make ``path`` and its missing parents, each given the owner of the nearest directory that exists: the
    directory a plant made for the service (its user's). Run as root, a restore into a data directory not made yet
    made it root's, and the service, started as its own user, could neither take its lock nor write a record."""
    path = Path(path)
    new = existing_ancestor(path)
    owner = _owner(new)
    for part in path.relative_to(new).parts:
        new = new / part
        new.mkdir(exist_ok=True)
        _hand_over(owner, new)


def existing_ancestor(path: Path) -> Path:
    """``path``, or its nearest parent that exists: the directory whose owner what is made below it is meant for."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def no_service_in(data_dir: Path, then: str) -> Iterator[None]:
    """Hold ``data_dir``'s lock (the one a service recording there holds) for the block: a restore or a downgrade
    under a running service would change the database beneath its writer. :class:`BackupError` naming the holder
    when one runs; ``then`` is what to do once it is stopped."""
    path = Path(data_dir) / (SQLITE_FILE + ".owner")
    try:  # never through a link: run as root, it made the file the link names, anywhere (an empty /etc/nologin)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise BackupError(f"{path} is a link, not the data directory's lock: remove it, then {then}") from None
    with os.fdopen(fd, "a+") as lock:
        _hand_over(_owner(Path(data_dir)), path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise BackupError(f"{holder} is recording into {data_dir}: stop the service first, then {then}") \
                from None
        yield


@contextlib.contextmanager
def _openable(path: Path, scratch: Path) -> Iterator[Path]:
    """``path``; or, for a WAL-mode database in a directory that takes no writes (a read-only snapshot, a dead
    host's disk mounted read-only), a copy of it and its log in ``scratch``, a directory the caller writes anyway.
    SQLite opens such a file only where it can make its shared-memory file beside it: a restore or backup from
    there failed with 'unable to open database file'."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(header) < 20 or header[18] != WAL_MODE or os.access(path.parent, os.W_OK):
        yield path
        return
    try:
        make_owned_dir(scratch)
        copy = Path(tempfile.mkdtemp(prefix=f".{SQLITE_FILE}.reading-", dir=scratch))
    except OSError as exc:
        raise BackupError(f"cannot write {scratch}: {exc.strerror or exc}") from None
    try:
        try:
            for suffix in ("", "-wal"):  # no -shm: SQLite rebuilds it from the log
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(path.with_name(path.name + suffix), copy / (SQLITE_FILE + suffix))
        except OSError as exc:
            raise BackupError(f"cannot copy {path} to read it in {scratch}: {exc.strerror or exc}") from None
        yield copy / SQLITE_FILE
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def restore(backup_file: Path, data_dir: Path, known_schemas: set[str]) -> BackupInfo:
    """Put a backup in place as ``data_dir``'s records database. Refused while a service records into the
    directory; the database it replaces is kept beside it as ``records.db.replaced-<time>`` (with its log)."""
    backup_file = Path(backup_file)
    if not backup_file.is_file():
        raise BackupError(f"no backup file {backup_file}")
    if Path(data_dir).is_dir():  # before a read-only source is copied there to be read: on a live service's volume
        with no_service_in(Path(data_dir), "restore"):  # (checked again, held, when the restore swaps the file)
            pass
    with _openable(backup_file, Path(data_dir)) as source:
        return _restore(source, backup_file, Path(data_dir), known_schemas)


def _restore(source: Path, backup_file: Path, data_dir: Path, known_schemas: set[str]) -> BackupInfo:
    """:func:`restore` from ``source``, a file SQLite can open (``backup_file`` itself or a copy of it)."""
    t0 = time.perf_counter()
    try:
        records, reviews, schema = _check(source)
    except BackupError as exc:
        raise BackupError(str(exc).replace(str(source), str(backup_file))) from None
    if schema not in known_schemas:
        raise BackupError(f"{backup_file} is at schema {schema or 'empty'}, which this release does not know "
                          "(made by a newer release?)")
    data_dir = Path(data_dir)
    try:
        make_owned_dir(data_dir)
    except OSError as exc:
        raise BackupError(f"cannot make {data_dir}: {exc.strerror or exc}") from None
    target = data_dir / SQLITE_FILE
    with no_service_in(data_dir, "restore"):
        staged = data_dir / f".{SQLITE_FILE}.restoring"
        try:
            staged.unlink(missing_ok=True)
            # through SQLite, not byte for byte: a backup file with its own -wal beside it (a kept
            # records.db.replaced-*, a copy taken with its log) counted what the log holds; a byte copy lost it
            _copy(source, staged)
        except (sqlite3.Error, OSError) as exc:
            _discard(staged)
            raise BackupError(f"cannot stage the restore in {data_dir}: {exc}; the database there is unchanged") \
                from None
        # UTC, said so: in local time a restore in the hour a DST change repeats, or on a host in another zone,
        # named the kept database out of order with the earlier ones and with every other time the records keep
        stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
        kept = data_dir / f"{SQLITE_FILE}.replaced-{stamp}"
        n = 1
        while any(kept.with_name(kept.name + x).exists() for x in ("", *SIDE_FILES)):  # never over an earlier one
            kept, n = data_dir / f"{SQLITE_FILE}.replaced-{stamp}-{n}", n + 1
        owner = _owner(target if target.exists() else data_dir)  # the service's, which it must go on writing as
        if target.exists():
            target.rename(kept)
        for suffix in SIDE_FILES:  # the old log goes with the old file: replayed into the restored one, it corrupts
            with contextlib.suppress(FileNotFoundError):
                (data_dir / (SQLITE_FILE + suffix)).rename(kept.with_name(kept.name + suffix))
        _hand_over(owner, staged)
        os.replace(staged, target)
        sync_dir(data_dir)  # the renames on the disk before the command says the restore is done
    return BackupInfo(target, records, reviews, schema, target.stat().st_size, time.perf_counter() - t0)
