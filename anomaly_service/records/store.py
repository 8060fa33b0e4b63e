"""``RecordStore``: the inspection records in a real database (SQLAlchemy 2), their files, and their queries.

SQLite (one file under the data directory, WAL mode so readers never wait for the writer, a busy timeout so
concurrent writers queue instead of failing) is the embedded default for one process. PostgreSQL
(``postgresql+psycopg://...``) is for several replicas: SQLite's lock is per host and per file system, so
replicas on several machines must not share one file. The schema is only created or changed by the Alembic
scripts under ``migrations/`` (:meth:`RecordStore.upgrade`): an older database is upgraded, never recreated.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine, Text, cast, create_engine, event, func, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from ..images import as_text
from ..spellings import composed, unicode_forms
from .files import PRIVATE, FileStore, RetentionInterrupted, StoredFile
from .models import (FILES_EXPIRED, FILES_FAILED, FILES_REMOVED, FILES_STORED, UNREVIEWED, VERDICTS, Inspection,
                     Review, continue_after, forget_database_time, new_id, set_database_time, utcnow)
from .stats import UTC, Zone, aggregate

log = logging.getLogger(__name__)



class ReviewConflict(Exception):
    """A review that named the verdict it replaces, while another review had already replaced that one; or an undo
    of a review that is no longer the inspection's latest."""

    def __init__(self, current: str) -> None:
        super().__init__(f"the inspection's latest verdict is now {current}")
        self.current = current


class UnknownReview(LookupError):
    """An undo named a review the inspection does not have."""


class UndoRefused(ValueError):
    """An undo named a review that is itself an undo: only a verdict is undone (a verdict again redoes it)."""

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_FILE = "records.db"
BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another's lock before an error (then the batch retries)
SQLITE_READONLY = 8  # SQLite's primary result code for a write through a connection that cannot write the file
# rows one stats answer aggregates (the newest, past it): the database sorts them, which must end well inside the
# records gate's deadline on SQLite
STATS_MAX_ROWS = 1_000_000
# a column a release adds goes at the end: a plant's spreadsheet or ETL job reads the CSV export by position
RECORD_COLUMNS = ["id", "created_at", "model", "model_version", "decision", "score", "normalized_score",
                  "threshold", "image_width", "image_height", "image_bytes", "image_sha256", "part_id", "line",
                  "station", "meta", "regions", "timing_ms", "warnings", "source", "files_state", "verdict",
                  "reviewed_at", "scorers", "request_id", "files_changed_at", "runtime", "knn_search", "device",
                  "threads", "embedding_x", "embedding_y"]
# an auditor's export names who put each verdict on record and carries the whole review trail: a verdict and its
# time without the reviewer is a link of the chain missing from the report. The photo's pixel digest is the name a
# model gives its own images (a region's nearest normal, the embedding's points): without it no export joins a
# recorded part with the training image it became
EXPORT_COLUMNS = [*RECORD_COLUMNS, "reviewed_by", "reviews", "pixels_sha256"]


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this release (made by a newer one, or another application's)."""


# columns of the inspections table since its first revision: a file of another program that names its tables as
# this one does (an inspections table, Alembic's version table) lacks them
# the tables the shipped migrations create: a database without a revision that holds one is no empty database
MIGRATED_TABLES = ("inspections", "reviews")
CORE_COLUMNS = ("id", "created_at", "model", "model_version", "score", "threshold", "decision", "image_sha256",
                "files_state")


def _others_tables(conn: Connection) -> list[str] | None:
    """None when the database holds this product's inspections table; else the tables it holds (another
    application's, which Alembic may manage too: its version table names a revision no release of ours made)."""
    from sqlalchemy import inspect

    inspector = inspect(conn)
    tables = sorted(inspector.get_table_names())
    if "inspections" in tables:
        columns = {c["name"] for c in inspector.get_columns("inspections")}
        if all(c in columns for c in CORE_COLUMNS):
            return None
    return [t for t in tables if t != "alembic_version"]


def _unknown_revision(conn: Connection, url: str, revision: str, then: str) -> SchemaError:
    """The refusal of a database at a revision this release's migrations do not know. With our tables it was made
    by a newer release (``then`` says the way back); without them it is another application's database, which
    said it was a newer release's and sent operators looking for one."""
    tables = _others_tables(conn)
    if tables is None:
        return SchemaError(f"the records database is at schema revision {revision}, which this release does not "
                           f"know: it was made by a newer release of anomaly; {then}")
    return _others_database(url, revision, tables)


def _refusal(conn: Connection, url: str, revision: str | None, known: set[str], then: str) -> SchemaError | None:
    """Why this release leaves a database at ``revision`` alone, or None (ours, or no revision yet): a revision
    it does not ``know`` (:func:`_unknown_revision`), or one it knows on a database that holds none of its tables:
    another application's whose Alembic revisions are numbered as ours (0001, 0002, ...). Upgraded, that one was
    run our migrations, which failed on a table it lacks ('no such table: inspections') after some had made theirs
    in it."""
    if revision is None:
        return _unrevised(conn, url)
    if revision not in known:
        return _unknown_revision(conn, url, revision, then)
    tables = _others_tables(conn)
    return None if tables is None else _others_database(url, revision, tables)


def _unrevised(conn: Connection, url: str) -> SchemaError | None:
    """Why a database with no Alembic revision is left alone, or None (empty, or holding none of the tables our
    migrations make). One that holds such a table (another application's ``inspections``, or our records made
    without ``anomaly db upgrade``, say by a restore that left the version table out) was taken for an empty one:
    the first migration failed on it with "table inspections already exists" and left a version table behind. A
    view of that name clashes as a table does ("view inspections already exists")."""
    from sqlalchemy import inspect

    inspector = inspect(conn)
    names = {*inspector.get_table_names(), *inspector.get_view_names()}
    clash = sorted(t for t in names if t in MIGRATED_TABLES)
    if not clash:
        return None
    whose = ("this product's inspection records" if _others_tables(conn) is None
             else "tables of another application")
    return SchemaError(f"{redact(url)} holds {', '.join(clash)} ({whose}) but no schema revision (no Alembic "
                       "version table, or an empty one), so no release can tell which migrations it has had; it was "
                       "left untouched. Give --data-dir / --database-url of a records database or an empty one; "
                       "records of this product are brought back with `anomaly db restore` from a backup")


def _others_database(url: str, revision: str, tables: list[str]) -> SchemaError:
    from ..training_set import LISTED_NAMES, listing  # only on this refusal: the database commands start without it

    shown = listing(tables, LISTED_NAMES)
    return SchemaError(f"{redact(url)} is not an inspection records database: it is another application's, at its "
                       f"Alembic revision {revision} (tables: {shown or 'none'}), and was left untouched. Give "
                       "--data-dir / --database-url of the records database, or an empty database for new records")


def database_url(url: str | None, data_dir: Path | None) -> str:
    """The URL given, or the embedded SQLite file under ``data_dir``."""
    if url:
        return url
    if data_dir is None:
        raise ValueError("recording needs --data-dir (for SQLite and the image files) or --database-url")
    # a URL's database part is percent-decoded and ends at a '?': a --data-dir named 'Linie %C3%BC' or 'Prüfung?2'
    # kept its pictures there and its records in 'Linie ü' or 'Prüfung', where export and restore did not look
    path = str((Path(data_dir) / SQLITE_FILE).resolve()).replace("%", "%25").replace("?", "%3F")
    return f"sqlite:///{path}"


def unescaped_database(data_dir: Path) -> Path | None:
    """The records database an earlier release kept for ``data_dir`` elsewhere than in it, where its name's '%XX'
    and '?' were read as a URL's (``Linie %C3%BC`` kept its records in ``Linie ü``); None when there is none, or
    the data directory holds its own. Opened as it is, the data directory got a new empty database: a plant's
    history was no longer listed, exported or backed up, and new records went to another file than the old."""
    own = (Path(data_dir) / SQLITE_FILE).resolve()
    if "%" not in str(own) and "?" not in str(own) or own.exists():
        return None
    try:
        database = make_url(f"sqlite:///{own}").database
    except Exception:  # noqa: BLE001 - a name no release could have opened either
        return None
    other = Path(database) if database else None
    if other is None or other == own or not other.is_file():
        return None
    try:
        with open(other, "rb") as fh:
            return other if fh.read(16) == b"SQLite format 3\x00" else None
    except OSError:
        return None


def kept_elsewhere(data_dir: Path, elsewhere: Path) -> str:
    """What to say of a data directory whose records are at :func:`unescaped_database`'s ``elsewhere``."""
    return (f"the records of --data-dir {data_dir} are in {elsewhere}, where an earlier release kept them (it read "
            "the folder's '%' and '?' as a URL's); with no service or command using it, move it, with any -wal and "
            f"-shm file beside it, to {data_dir / SQLITE_FILE}")


# libpq also takes a password as a query parameter (``?password=...``): SQLAlchemy's hide_password masks only the
# one before the host, and the service's start-up line printed the other in clear
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


def _secret_key(key: str) -> bool:
    return key.strip().lower() in SECRET_QUERY_KEYS


def _whole_password(u: URL) -> URL:
    """``u`` with a password that holds an unencoded ``@`` taken whole: SQLAlchemy ends the password at its first
    ``@`` and reads the rest as the host, so the masked URL showed the password's tail in clear."""
    if u.host and "@" in u.host:
        tail, host = u.host.rsplit("@", 1)
        return u.set(password=f"{u.password or ''}@{tail}", host=host)
    return u


def parsed_url(url: str) -> URL:
    """The URL as SQLAlchemy reads it, or a :class:`ValueError` that quotes no part of it. SQLAlchemy ends a password
    at its first ``@`` and reads what follows as the host and port, so a password such as ``p@ss:word`` failed with
    "invalid literal for int() with base 10: 'word@host'": the password's tail in the command's error, the service's
    log and the records routes' answer, and no word of which setting was wrong."""
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - ValueError (the port), ArgumentError (no scheme): said alike, quoting nothing
        raise ValueError("the records database URL (--database-url, ANOMALY_DATABASE_URL) cannot be read: write it "
                         "as postgresql+psycopg://user:password@host:port/database, with an '@' in the password as "
                         "%40 and a '%' as %25, and the port a number") from None


def unencoded_at(url: str) -> bool:
    """Whether the URL's password holds an ``@`` not written as ``%40`` (no host parses from it). Asked of a URL
    :func:`parsed_url` has read (the store's, in :func:`_make_engine`)."""
    return "@" in (make_url(url).host or "")


def redact(url: str) -> str:
    """The URL without its password (before the host or in the query), for logs and messages."""
    try:
        u = _whole_password(make_url(url))
        u = u.set(query={k: ("***" if _secret_key(k) else v) for k, v in u.query.items()})
        return u.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except Exception:  # noqa: BLE001 - a malformed URL is reported by create_engine with its own message
        return "<unparsable database URL>"


def libpq_url(url: str) -> str | None:
    """The URL as PostgreSQL's own tools take it: pg_dump misreads SQLAlchemy's ``postgresql+psycopg://``, and the
    password is left out (not masked, which libpq would send as the password): they ask or read ~/.pgpass.
    None when the URL cannot be parsed."""
    try:
        u = _whole_password(make_url(url))  # built anew: URL.set(password=None) keeps the password
        query = {k: v for k, v in u.query.items() if not _secret_key(k)}
        return URL.create(u.get_backend_name(), username=u.username, host=u.host, port=u.port, database=u.database,
                          query=query).render_as_string(hide_password=False)
    except Exception:  # noqa: BLE001 - as in redact: a malformed URL is reported elsewhere
        return None


LOCK_TIMEOUT_MS = 5000  # PostgreSQL: how long a statement waits for a lock before it fails (and is retried)
# PostgreSQL advisory lock keys, one per thing replicas take turns at: the schema, a retention pass, and the stored
# pictures (a pass's mark-and-delete of a chunk, exclusive; a batch's insert with its pictures, shared)
SCHEMA_LOCK = 7253001
RETENTION_LOCK = 7253002
PICTURES_LOCK = 7253003
# SQLite: the same two locks between the processes of one host, as files in the data directory (named after the
# database file, so that a backup refuses to write over them)
RETENTION_LOCK_FILE = SQLITE_FILE + ".retention-lock"
PICTURES_LOCK_FILE = SQLITE_FILE + ".pictures-lock"
# SQLite: claims (:meth:`RecordStore.claim`), one byte each of this file beside the database's
CLAIMS_LOCK_SUFFIX = ".claims-lock"
CLAIMS_LOCK_FILE = SQLITE_FILE + CLAIMS_LOCK_SUFFIX
# SQLite: processes migrating one database file take turns on this file beside it (RecordStore.upgrade)
SCHEMA_LOCK_SUFFIX = ".schema-lock"
# PostgreSQL: how often the writer reads the database's clock again (models.records_time carries it between readings)
CLOCK_READ_EVERY_S = 60.0
# a host whose clock is this far from the database's is said in the log: its records take the database's time, but
# what it dates by its own clock (pictures' ages, model versions) does not
CLOCK_WARN_S = 2.0
# a re-scoring family's turn (RecordStore.claim): the two-key advisory locks (family, count), count 0 its gate
_FAMILY, _COUNT = "CAST(:f AS integer)", "CAST(:n AS integer)"
_OTHER_COUNTS = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND "
                     "database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND "
                     "classid = CAST(:f AS oid) AND objid NOT IN (0, CAST(:n AS oid))")


class PicturesBusy(RuntimeError):
    """The stored pictures' lock stayed taken past the busy timeout (a retention pass of another process that
    hangs): the writer retries its batch as it does for a locked database."""


def _json_text(text: str) -> Any:
    """A JSON column as text the API can encode: records made before training names were made text could name a
    file in another code page as a lone surrogate (SQLite kept it; PostgreSQL refused the row)."""
    value = json.loads(text)
    return as_text(value) if "\\ud" in text else value


# PostgreSQL: how many of the two advisory locks of a pass's turn (RETENTION_LOCK, PICTURES_LOCK) this session holds
_LOCKS_HELD = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
                   "AND classid = 0 AND objsubid = 1 AND objid IN (:r, :p)")


@dataclass(frozen=True)
class _Turn:
    """A process's turn at a retention pass: what each chunk takes and checks, and where it marks the records."""

    chunk: Callable[[], contextlib.AbstractContextManager[object]]  # the exclusive pictures' lock around a chunk
    held: Callable[[], bool]  # whether that lock and the turn's were held without a break since the chunk took it
    connection: Connection | None = None  # PostgreSQL: the session holding the locks, on which the pass marks


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, json_deserializer=_json_text)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers (the API) never block the writer, nor it them
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # FULL: the log is synced at every commit. NORMAL (WAL's usual pairing) syncs it only at checkpoints, so
            # a power cut rolled back every commit since the last one: reviews an operator was told were saved, and
            # records of parts that had shipped (SQLite's docs: "might roll back following a power loss")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql:") or url.startswith("postgres:"):
        raise ValueError("use the psycopg 3 driver: postgresql+psycopg://user:password@host/db")
    if unencoded_at(url):  # the driver's error named the password's tail as the host it could not resolve
        raise ValueError(f"{redact(url)}: its password holds an '@': write it as %40 (and a '%' as %25)")
    # pre-ping: a connection the server closed (restart, failover) is replaced instead of failing a batch.
    # Deadlines, so that no call waits as long as a hung database does: a lock another session holds (a review on
    # a row being written, a replica's migration) fails after lock_timeout and is retried; keepalives and the TCP
    # user timeout end a connection whose network stalls instead of waiting out the kernel's retransmissions.
    # UTF-8 on the wire whatever the database's encoding: libpq takes the database's by default, and one made under
    # LANG=C (SQL_ASCII) handed every text over as bytes, so that no command could open it at all
    psycopg = "psycopg" in url
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=10,
                           connect_args={"connect_timeout": 5, "client_encoding": "utf8",
                                         "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                                         "keepalives_count": 3, "tcp_user_timeout": 30_000}
                           if psycopg else {})
    if psycopg:
        @event.listens_for(engine, "connect")
        def _lock_timeout(dbapi_conn: Any, _record: Any) -> None:
            # set by a statement, not in libpq's startup `options`: PgBouncer refuses a client whose startup packet
            # carries a setting it does not track (lock_timeout is one), so no connection through it was made
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
            dbapi_conn.commit()

    return engine


# fields that take a person's or a file's text (spellings.py): each spelling finds the other; the record keeps what
# came (a re-scoring run finds its archive's files by it)
SPELLED_TWO_WAYS = ("part_id", "line", "station")


@dataclass(frozen=True)
class Filters:
    """What ``GET /inspections`` and the export select; ``None`` means any."""

    model: str | None = None
    decision: str | None = None  # anomaly | normal
    verdict: str | None = None  # defect | good | unreviewed
    since: datetime | None = None
    until: datetime | None = None
    part_id: str | None = None
    request_id: str | None = None
    line: str | None = None
    station: str | None = None

    def where(self, session: Session | None = None) -> list[Any]:
        """The conditions; with ``session``, a name matches every spelling the records hold of it (read from their
        composed spellings' sparse index), without one only its spellings as typed, composed and decomposed."""
        c = Inspection
        out: list[Any] = []
        for name in ("model", "decision", "part_id", "request_id", "line", "station"):
            value = getattr(self, name)
            if value is None or value == "":  # ?model= from an empty dropdown means any, not a model named ""
                continue
            if name in SPELLED_TWO_WAYS:
                out.append(getattr(c, name).in_(sorted(_spellings(session, name, value))))
            else:
                out.append(getattr(c, name) == value)
        if self.verdict == "unreviewed":
            out.append(c.verdict.is_(None))
        elif self.verdict is not None:
            out.append(c.verdict == self.verdict)
        if self.since is not None:
            out.append(c.created_at >= self.since)
        if self.until is not None:
            out.append(c.created_at < self.until)
        return out


# at most this many spellings of one name are read back: each is a way to write it, never a list of parts
SPELLINGS_READ = 64


def _spellings(session: Session | None, name: str, value: str) -> set[str]:
    """``value`` as typed, composed and decomposed, and with a session every other spelling of it a record holds
    (mixed, or with a character NFC replaces): the rows whose ``NAME_composed`` is its composed spelling."""
    forms = unicode_forms(value)
    if session is not None:
        column, key = getattr(Inspection, name), getattr(Inspection, f"{name}_composed")
        forms |= set(session.scalars(select(column).distinct().where(key == composed(value)).limit(SPELLINGS_READ)))
    return forms


def narrow_encoding_warning(encoding: str, url: str) -> None:
    """Warn of a PostgreSQL database whose encoding cannot hold every name: a record whose part id, line, station or
    meta it cannot spell (Chinese in LATIN1, an emoji in any but UTF-8) is refused by the database and lost, one at a
    time, each only an error line. SQL_ASCII stores the bytes as they come, which the UTF-8 connection reads back."""
    if encoding not in ("UTF8", "SQL_ASCII"):
        log.warning("records database %s is in %s: a record with a name that encoding cannot spell (a part id in "
                    "Chinese, an emoji) is refused and lost; make the database with ENCODING 'UTF8' (createdb -E "
                    "UTF8 -T template0) and move the records there with pg_dump and pg_restore", redact(url),
                    encoding)


def disk_full(exc: OSError) -> bool:
    """A volume out of space or quota: a state that passes (retention, an operator freeing space), unlike a
    directory that takes no writes."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def make_dir_unless_full(path: Path) -> None:
    """Make the data directory; on a full volume leave it to the next try (the writer's retries make it with the
    database), so that a full disk at start-up is retried as it is later, not recording lost until a restart."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not disk_full(exc):
            raise
        log.warning("records: cannot make %s yet (%s); the writer tries again", path, exc.strerror or exc)


class RecordStore:
    """The records database and the file store beside it. Thread-safe: every call opens its own session."""

    def __init__(self, url: str, data_dir: Path | None):
        self.url = url
        self.dialect = parsed_url(url).get_backend_name()
        self.engine = _make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._clock_due = 0.0  # when the writer next reads the database's clock (monotonic)
        self._clock_said = 0.0  # the difference from this host's clock last said in the log
        self.files = FileStore(self.data_dir) if self.data_dir is not None else None
        self._lock_file: Any = None
        self._file_seen: tuple[int, int] | None = None  # SQLite: the (device, inode) the schema was last set up in

    @classmethod
    def open(cls, database_url_: str | None, data_dir: Path | None) -> RecordStore:
        """A store for these settings (nothing is connected yet: :meth:`upgrade` is the first contact)."""
        if data_dir is not None and not database_url_:
            elsewhere = unescaped_database(Path(data_dir))
            if elsewhere is not None:  # refused: records split over two files are not joined again
                raise ValueError(kept_elsewhere(Path(data_dir), elsewhere))
        if data_dir is not None:
            make_dir_unless_full(Path(data_dir))
        return cls(database_url(database_url_, data_dir), data_dir)

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---------------------------------------------------------------------------------------------- schema
    def _alembic_config(self, connection: Any) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config(None)).get_current_head()
        assert head is not None
        return head

    @staticmethod
    def known_revisions() -> set[str]:
        """The schema revisions this release's migrations know (a database at another was made by a newer one, or
        is another application's: :meth:`schema_refusal`). Needs no database: a restore asks before it makes one."""
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}

    def schema_refusal(self, revision: str | None, then: str) -> SchemaError | None:
        """Why this release leaves this database at ``revision`` alone (:func:`_refusal`: a newer release's
        records, ``then`` saying what to do, or another application's database), or None."""
        with self.engine.connect() as conn:
            return _refusal(conn, self.url, revision, self.known_revisions(), then)

    def downgrade_plan(self, revision: str) -> list[tuple[str, str]]:
        """The revisions a downgrade to ``revision`` undoes, newest first, each with what it loses (the migration's
        ``LOSES``); none where the database is at ``revision`` already, so that a downgrade run again (a retry, a
        playbook run twice) ends as a second ``db upgrade`` does. :class:`SchemaError` where the database is older
        than ``revision`` or either is unknown."""
        from alembic.script import ScriptDirectory

        scripts = ScriptDirectory.from_config(self._alembic_config(None))
        order = [sc.revision for sc in scripts.walk_revisions()]  # head first
        current = self.current_revision()
        if revision not in order:
            raise SchemaError(f"no schema revision {revision}: this release knows {', '.join(reversed(order))}")
        if current is None:
            raise SchemaError("the records database has no schema yet: nothing to downgrade")
        if (refused := self.schema_refusal(current, "downgrade it with the release that upgraded it")) is not None:
            raise refused
        if order.index(revision) < order.index(current):
            raise SchemaError(f"the records database is at schema revision {current}, older than {revision}: "
                              "nothing to downgrade (`anomaly db upgrade` takes it forward)")
        undone = order[order.index(current):order.index(revision)]
        return [(r, getattr(scripts.get_revision(r).module, "LOSES", "nothing")) for r in undone]

    def downgrade(self, revision: str) -> tuple[str | None, str | None]:
        """Bring the schema back to ``revision`` with the shipped scripts' downgrades, for an earlier release to
        read (see :meth:`downgrade_plan` for what is lost); returns (before, after). On PostgreSQL under the same
        advisory lock as :meth:`upgrade`."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        if not self.downgrade_plan(revision):  # checked first: nothing is touched for a revision it refuses
            return revision, revision
        with self._migrating() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})
            before = MigrationContext.configure(conn).get_current_revision()
            command.downgrade(self._alembic_config(conn), revision)
            after = MigrationContext.configure(conn).get_current_revision()
        log.info("records database %s downgraded from schema %s to %s", redact(self.url), before, after)
        return before, after

    @contextlib.contextmanager
    def _migrating(self) -> Iterator[Connection]:
        """A connection in a transaction for the migrations. On SQLite its foreign-key actions are off meanwhile: a
        migration that alters ``inspections`` copies the table and drops the old one, and the drop, with them on,
        deleted every review (ON DELETE CASCADE). A downgrade past 0005 lost every review that way, though it
        said it lost only warnings. The keys are checked before the commit."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":  # a no-op inside a transaction: set before the migrations' begins
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            try:
                with conn.begin():
                    yield conn
                    if self.dialect == "sqlite" and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                        raise SchemaError("the migration left reviews of no inspection; nothing was changed")
            finally:
                if self.dialect == "sqlite":  # the connection goes back to the pool: as every other one is
                    conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                    conn.commit()

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Bring the schema to ``revision`` with the shipped Alembic scripts; returns (before, after).

        On PostgreSQL an advisory lock makes replicas that start together take turns. A database made by a newer
        release raises :class:`SchemaError` and is left untouched."""
        from alembic import command
        from alembic.script import ScriptDirectory

        database = make_url(self.url).database if self.dialect == "sqlite" else None
        if database and database != ":memory:":  # a data directory removed under a running service: SQLite makes
            # a file, never the directory it goes in. One that cannot be made yet (a read-only volume) is left to
            # SQLite's "unable to open database file", which the writer retries: an OSError here dropped each batch
            with contextlib.suppress(OSError):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # private, as the pictures are (files.PRIVATE): the rows hold the view tokens that open them over HTTP,
            # and SQLite made the file (and so its -wal and -shm, which take its mode) readable by every local user
            with contextlib.suppress(OSError):
                os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE))
        # SQLite runs the migrations' DDL outside a transaction: two processes that started on a new database
        # together (two shards of a cron line) saw the other's tables before its revision was stamped, and one
        # refused the database as of no release. They take turns on a lock file beside it, as replicas on
        # PostgreSQL's advisory lock. Not on the database file itself: closing any descriptor of it lets go of every
        # POSIX lock this process holds there, SQLite's readers' and writers' of other threads included (SQLite's
        # "How To Corrupt An SQLite Database File", 2.2)
        from ..dir_lock import holding

        turns = Path(database + SCHEMA_LOCK_SUFFIX) if database and database != ":memory:" else None
        if turns is not None:
            with contextlib.suppress(OSError):  # read-only is enough for flock: one made by root locks out no one
                os.close(os.open(turns, os.O_RDONLY | os.O_CREAT, 0o644))
        with (holding(turns) if turns is not None else contextlib.nullcontext()), self._migrating() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})
                narrow_encoding_warning(conn.scalar(text("SHOW server_encoding")), self.url)
            from alembic.runtime.migration import MigrationContext

            before = MigrationContext.configure(conn).get_current_revision()
            cfg = self._alembic_config(conn)
            scripts = ScriptDirectory.from_config(cfg)
            head = scripts.get_current_head()
            refused = _refusal(conn, self.url, before, {s.revision for s in scripts.walk_revisions()},
                               f"it was left untouched. This release reads up to {head}: the release that upgraded "
                               f"it can take it back to that (`anomaly db downgrade --to {head}`)")
            if refused is not None:
                raise refused
            command.upgrade(cfg, revision)
            after = MigrationContext.configure(conn).get_current_revision()
            self._read_clock(conn)
            if after is not None:  # this process's ids sort after every recorded one, whatever its clock says
                continue_after(conn.scalar(select(func.max(Inspection.id))))
        if before != after:
            log.info("records database %s upgraded from schema %s to %s", redact(self.url), before or "empty",
                     after)
        self._file_seen = self._file_identity()
        return before, after

    # ---------------------------------------------------------------------------------------------- the file
    def _file_identity(self) -> tuple[int, int] | None:
        """SQLite: the database file's (device, inode), None if it is missing (or the database is not a file)."""
        database = make_url(self.url).database if self.dialect == "sqlite" else None
        if not database or database == ":memory:":
            return None
        try:
            st = os.stat(database)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def file_replaced(self) -> bool:
        """SQLite: True when the database file was deleted or replaced since the schema was set up in it. Pooled
        connections still write to a deleted file, which is gone for good at the next restart: the pool is then
        emptied, so that the next :meth:`upgrade` makes (or adopts) the file at the path. Cheap: one ``stat``."""
        if self._file_seen is None:
            return False
        now = self._file_identity()
        if now == self._file_seen:
            return False
        log.error("records: the database file %s was %s while the service ran; records now go to %s",
                  make_url(self.url).database, "deleted" if now is None else "replaced",
                  "a new file at that path" if now is None else "the file now at that path")
        self._file_seen = None
        self.engine.dispose()
        return True

    def reconnect_if_read_only(self, exc: BaseException) -> None:
        """SQLite: empty the pool when ``exc`` says a connection cannot write the file. SQLite opens a file it may
        not write (its permissions, a read-only mount) read-only, and that connection stays read-only once the file
        is writable again: without this every retry failed until a restart. Reopening is cheap."""
        if self.dialect != "sqlite":
            return
        code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == SQLITE_READONLY or "readonly database" in str(exc):
            self.engine.dispose()

    def warn_if_shared(self) -> bool:
        """SQLite only: warn (and return True) when another live process holds this data directory's lock.

        Several replicas writing one SQLite file queue behind its single write lock, and on a network file system
        its locking is unreliable: replicas above one need PostgreSQL."""
        if self.dialect != "sqlite" or self.data_dir is None or self._lock_file is not None:
            return False  # held already: called again once a data directory a full volume refused was made
        import fcntl

        path = self.data_dir / (SQLITE_FILE + ".owner")
        try:  # held open for the life of the store (the lock is the open file); unbuffered: a write a full volume
            # refuses fails once, below, not again at close
            f = open(path, "a+b", buffering=0)  # noqa: SIM115
        except OSError as exc:
            if not disk_full(exc) and exc.errno != errno.ENOENT:  # ENOENT: a data directory a full volume did not take
                raise
            log.warning("records: cannot make %s (%s): whether another process writes this data directory is not "
                        "checked", path, exc.strerror or exc)
            return False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            other = f.read().decode(errors="replace").strip() or "another process"
            f.close()
            log.warning("records: %s already writes %s; several processes sharing one SQLite file queue behind "
                        "its write lock, and replicas on several hosts must not share it: use PostgreSQL "
                        "(--database-url postgresql+psycopg://...) for more than one replica", other,
                        self.data_dir / SQLITE_FILE)
            return True
        try:  # who holds the lock, for the warning above: a full volume leaves the file empty, the lock held
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        except OSError as exc:
            if not disk_full(exc):
                f.close()
                raise
        self._lock_file = f
        return False

    # ---------------------------------------------------------------------------------------------- writes
    def ids_present(self, ids: Iterable[str]) -> set[str]:
        """Which of these inspection ids are in the database already: a batch whose connection was lost during its
        commit may have been committed all the same (the server commits, its answer never arrives), and its retry
        must not insert those rows again, which the database refuses as duplicates."""
        ids = list(ids)
        with self.sessions() as s:
            return set(s.scalars(select(Inspection.id).where(Inspection.id.in_(ids)))) if ids else set()

    def add_many(self, rows: Iterable[Inspection], pictures: Mapping[str, bytes] | None = None) -> int:
        """Insert inspections in one transaction; returns how many. ``pictures`` (key to bytes) holds the files
        the rows say are stored: in the same transaction, under the lock a retention pass of any process takes
        around its mark-and-delete, each is touched, or written back when such a pass deleted it since it was
        stored, so that no pass comes between the check and the insert. A row whose file cannot be written back
        says ``failed``."""
        rows = list(rows)
        if not rows:
            return 0
        keys: list[str] = []
        if pictures and self.files is not None:
            keys = sorted({k for r in rows if r.files_state == FILES_STORED for k in (r.image_file, r.heatmap_file)
                           if k in pictures})
        with self._pictures_shared() if keys else contextlib.nullcontext():
            with self.sessions.begin() as s:
                if keys and self.dialect == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": PICTURES_LOCK})
                if time.monotonic() >= self._clock_due:
                    self._read_clock(s.connection())
                if keys:
                    assert self.files is not None and pictures is not None
                    lost = self.files.restore({k: pictures[k] for k in keys})
                    for r in rows:
                        if r.image_file in lost or r.heatmap_file in lost:
                            r.image_file = r.heatmap_file = None
                            r.files_state = FILES_FAILED
                s.add_all(rows)
        return len(rows)

    def _read_clock(self, conn: Connection) -> None:
        """Take the records' time from PostgreSQL's clock (models.records_time), read now on ``conn``: one clock
        for the records of every replica, whichever host's clock is wrong. SQLite's database is on this host: its
        clock is this host's."""
        self._clock_due = time.monotonic() + CLOCK_READ_EVERY_S
        if self.dialect != "postgresql":
            forget_database_time()
            return
        before = time.monotonic()
        db = float(conn.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
        ahead = set_database_time(db, (before + time.monotonic()) / 2)
        if abs(ahead) > CLOCK_WARN_S and abs(ahead - self._clock_said) > CLOCK_WARN_S:
            log.warning("this host's clock is %.0f s %s the records database's (%s): records, reviews and their ids "
                        "take the database's time, but model versions, the models' change log and the log's lines "
                        "are dated by this host's; sync its clock (docs/service.md, replicas' clocks)", abs(ahead),
                        "ahead of" if ahead > 0 else "behind", redact(self.url))
            self._clock_said = ahead
        elif abs(ahead) <= CLOCK_WARN_S and self._clock_said:
            log.info("this host's clock agrees with the records database's again")
            self._clock_said = 0.0

    # ---------------------------------------------------------------------------------------------- locks
    @contextlib.contextmanager
    def _pictures_shared(self) -> Iterator[None]:
        """SQLite: the pictures' lock, shared among writers, around a whole insert (its commit included). On
        PostgreSQL the insert's transaction takes the advisory lock itself, released by its commit."""
        if self.dialect == "postgresql":
            yield
            return
        with self._pictures_file_lock(exclusive=False):
            yield

    @contextlib.contextmanager
    def _pictures_file_lock(self, exclusive: bool) -> Iterator[None]:
        """SQLite: the pictures' lock file, taken within the busy timeout, as a writer waits for the database."""
        f = self._lock_file_taken(PICTURES_LOCK_FILE, exclusive, wait_s=BUSY_TIMEOUT_MS / 1000)
        if f is None:
            raise PicturesBusy(f"the stored pictures' lock stayed taken for {BUSY_TIMEOUT_MS / 1000:.0f} s")
        with f:
            yield

    def _lock_file_taken(self, name: str, exclusive: bool, wait_s: float) -> IO[str] | None:
        """SQLite: the lock file ``name`` in the data directory, opened and locked (shared or exclusive), waiting at
        most ``wait_s``; it stays locked until closed. None when it is still taken then. A lock of its own per
        call: two threads of one process exclude each other as two processes do."""
        import fcntl

        assert self.data_dir is not None
        f = open(self.data_dir / name, "a+")  # noqa: SIM115 - the caller holds it: the lock is the open file
        deadline = time.monotonic() + wait_s
        pause = 0.002
        try:
            while True:
                try:
                    fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                    return f
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        f.close()
                        return None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except BaseException:
            f.close()
            raise

    @contextlib.contextmanager
    def _retention_turn(self) -> Iterator[_Turn | None]:
        """This process's turn at a retention pass, which replicas sharing the database and the pictures take one
        at a time, or None when another process's pass runs now (this one is skipped). SQLite: lock files in the
        data directory, which hold for as long as this process keeps them open.

        PostgreSQL: session advisory locks on one pooled connection, the pass's only one: its records are marked
        on it too, so a pass never waits for a second connection (a small pool, taken by the API's reads) while
        it holds the lock every insert waits for. The server releases those locks when it ends the session, and
        a connection that breaks is not seen until it is used: so each chunk, once its files are set aside, asks
        on that connection whether its session still holds both locks (``pg_backend_pid``, not only a live
        connection: SQLAlchemy may have connected again), and one that does not puts the files back and stops
        the pass (``FileStore.remove``). Not a lock of the marking's transaction: it would end with the commit,
        before the files go, or the files would go before the commit, which a dropped connection then undoes."""
        if self.dialect != "postgresql":
            turn = self._lock_file_taken(RETENTION_LOCK_FILE, exclusive=True, wait_s=0)
            if turn is None:
                yield None
                return
            with turn:
                yield _Turn(lambda: self._pictures_file_lock(exclusive=True), lambda: True)
            return
        with self.engine.connect() as conn:
            try:
                got = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": RETENTION_LOCK})
                conn.commit()
                if not got:
                    yield None
                    return

                @contextlib.contextmanager
                def pictures() -> Iterator[None]:
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PICTURES_LOCK})  # lock_timeout bounds it
                    conn.commit()
                    yield  # a chunk that fails ends the pass, whose end releases every lock
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PICTURES_LOCK})
                    conn.commit()

                def held() -> bool:
                    try:
                        n = conn.scalar(_LOCKS_HELD, {"r": RETENTION_LOCK, "p": PICTURES_LOCK})
                        conn.commit()
                    except DBAPIError:
                        return False
                    return n == 2

                yield _Turn(pictures, held, conn)
            finally:
                try:  # a session lock left on a pooled connection would stop every writer: end them, or the session
                    conn.execute(text("SELECT pg_advisory_unlock_all()"))
                    conn.commit()
                except Exception:  # noqa: BLE001 - closing the connection ends its session and its locks
                    conn.invalidate()

    @contextlib.contextmanager
    def _deciding(self) -> Iterator[Session]:
        """A transaction whose writes depend on what it reads first (a review's check of the verdict it replaces).
        PostgreSQL locks the row read (``with_for_update``); SQLite's driver begins a transaction only at the first
        write, so the read was taken outside it and two reviews at once both passed the check: the transaction
        begins here with SQLite's write lock (waiting for it up to the busy timeout), and the read is under it."""
        with self.sessions.begin() as s:
            if self.dialect == "sqlite":
                s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield s

    def review(self, inspection_id: str, verdict: str, reviewer: str, note: str | None = None,
               replaces: str | None = None) -> Inspection:
        """Append a review and make it the inspection's latest verdict. KeyError: no such inspection.
        ``replaces``: the latest verdict the reviewer saw ("unreviewed" for none); when another review has come in
        since, nothing is written and :class:`ReviewConflict` says what it was (two operators on one queue).
        A review that repeats the inspection's latest entry exactly (verdict, reviewer and note) is that review sent
        again, after its answer was lost as it committed: nothing is written, and the inspection is returned as it
        stands, as the first send would have been answered (docs/decisions.md, the drill of session 59)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        now = utcnow()
        with self._deciding() as s:
            row = s.get(Inspection, inspection_id, with_for_update=self.dialect == "postgresql")
            if row is None:
                raise KeyError(inspection_id)
            last = s.scalars(select(Review).where(Review.inspection_id == inspection_id)
                             .order_by(Review.id.desc()).limit(1)).first()
            repeated = (last is not None and last.undoes is None and row.verdict == verdict
                        and (last.verdict, last.reviewer, last.note) == (verdict, reviewer, note))
            if not repeated:
                if replaces is not None and (row.verdict or UNREVIEWED) != replaces:
                    raise ReviewConflict(row.verdict or UNREVIEWED)
                s.add(Review(inspection_id=inspection_id, verdict=verdict, note=note, reviewer=reviewer,
                             created_at=now))
                row.verdict, row.reviewed_at = verdict, now
        got = self.get(inspection_id)
        assert got is not None
        return got

    def undo_review(self, inspection_id: str, review_id: int, reviewer: str) -> Inspection:
        """Withdraw review ``review_id``: append an undo that puts back the verdict on record before it (unreviewed
        when it was the first), and make that the inspection's verdict. The review must still be the inspection's
        latest entry, else :class:`ReviewConflict` (another operator reviewed, or undid, since: their entry is never
        overwritten unseen). KeyError: no such inspection; :class:`UnknownReview`: not one of its reviews;
        :class:`UndoRefused`: an undo itself. An undo whose latest entry is already this reviewer's undo of
        ``review_id`` is that undo sent again (its answer lost): nothing is written, the inspection is returned."""
        now = utcnow()
        with self._deciding() as s:
            row = s.get(Inspection, inspection_id, with_for_update=self.dialect == "postgresql")
            if row is None:
                raise KeyError(inspection_id)
            entries = list(s.scalars(select(Review).where(Review.inspection_id == inspection_id)
                                     .order_by(Review.id)))
            at = next((i for i, e in enumerate(entries) if e.id == review_id), None)
            if at is None:
                raise UnknownReview(review_id)
            if entries[at].undoes is not None:
                raise UndoRefused(review_id)
            last = entries[-1]
            repeated = at == len(entries) - 2 and last.undoes == review_id and last.reviewer == reviewer
            if at != len(entries) - 1 and not repeated:
                raise ReviewConflict(row.verdict or UNREVIEWED)
            if not repeated:
                back = entries[at - 1].verdict if at else None
                s.add(Review(inspection_id=inspection_id, verdict=back, note=None, reviewer=reviewer,
                             created_at=now, undoes=review_id))
                row.verdict, row.reviewed_at = back, now if back is not None else None
        got = self.get(inspection_id)
        assert got is not None
        return got

    def mark_files(self, keys: list[str], state: str, connection: Connection | None = None) -> int:
        """Say in the records that their files are gone (before the files are deleted); returns rows changed.
        ``connection``: one outside any transaction to mark on (a retention pass's own), else a pooled one.
        Every record of a key is marked, however late it was written: retention calls this under the file store's
        lock and the pictures' lock between processes for the files it is about to delete, and keeps the files of
        this process's records still on their way (``FileStore.remove``); another process's insert writes back
        what it deletes (``add_many``). A cut-off on ``created_at`` (the time the part was scored) marked a record
        written late about a file retention then kept, and left unmarked one scored after the pass began about a
        file it deleted. One transaction for the keys given: retention gives one chunk of its files at a time
        (``FileStore.remove``, ``files.RETIRE_CHUNK``), so a pass over thousands of pictures never holds the
        database's write lock (SQLite has one writer) for longer than a chunk, and the recorder's writes go on
        between chunks. A pass that fails midway leaves some records saying their files are gone while they are
        still there (served as gone), never the reverse."""
        changed = 0
        now = utcnow()
        with contextlib.ExitStack() as stack:
            if connection is None:
                run: Any = stack.enter_context(self.sessions.begin())
            else:
                stack.enter_context(connection.begin())  # committed at the end, rolled back on an error
                run = connection
            for col in (Inspection.image_file, Inspection.heatmap_file):
                res = run.execute(update(Inspection)
                                  .where(col.in_(keys), Inspection.files_state == FILES_STORED)
                                  .values(files_state=state, files_changed_at=now))
                changed += res.rowcount or 0
        return changed

    def apply_retention(self, max_age_days: float | None, max_bytes: int | None,
                        min_free_bytes: int = 0, now: float | None = None) -> dict[str, int]:
        """One retention pass over the file store: records first say their files are gone, then the files go.
        Past the age and the size budget, the oldest pictures also go while the volume has less than
        ``min_free_bytes`` free, as a line recorder overwrites its oldest footage: the records themselves must
        still find room.

        If the database cannot be updated nothing is deleted, so a record never points at a missing file
        without saying so. A file referenced again after the listing, or held for a record the writer has not
        inserted yet, is kept and its records are left alone. Processes sharing the database and the pictures
        (replicas) take turns: while another one's pass runs this one is skipped (``skipped`` 1), and each chunk's
        mark-and-delete excludes every process's inserts (``add_many``), which write back a picture deleted
        under a record on its way. ``now``: the Unix time pictures' ages are counted to (the clock's, by default;
        the service's SteadyWallClock, which a forward step of the clock does not move)."""
        result = {"expired": 0, "removed": 0, "free_space": 0, "bytes": 0, "skipped": 0}
        if self.files is None:
            return result
        with self._retention_turn() as turn:
            if turn is None:
                log.info("retention: another process's pass is running; this one is skipped")
                return {**result, "skipped": 1}
            return {**result, **self._retention_pass(turn, max_age_days, max_bytes, min_free_bytes, now)}

    def _retention_pass(self, turn: _Turn, max_age_days: float | None, max_bytes: int | None,
                        min_free_bytes: int, now: float | None = None) -> dict[str, int]:
        """The pass itself, in this process's turn (the locks each chunk takes and checks, the connection it marks
        on). However it ends, no picture drawn from a file it deleted is left (``FileStore.remove_orphans``)."""
        assert self.files is not None
        max_age_s = max_age_days * 86400 if max_age_days else None
        free = self.files.free_bytes() if min_free_bytes else None
        needed = max(0, min_free_bytes - free) if free is not None else 0
        old, over, short = self.files.select_expired(max_age_s, max_bytes or None, now, free_needed=needed)
        freed = 0
        marked = {"expired": 0, "removed": 0, "free_space": 0}
        gone = dict.fromkeys(marked, 0)  # files deleted by each rule: those kept for a record meanwhile are not
        try:
            for files, state, name in ((old, FILES_EXPIRED, "expired"), (over, FILES_REMOVED, "removed"),
                                       (short, FILES_REMOVED, "free_space")):

                def mark(keys: list[str], state: str = state, name: str = name) -> None:
                    marked[name] += self.mark_files(keys, state, connection=turn.connection)
                    gone[name] += len(keys)

                if files:
                    freed += self.files.remove(files, mark, turn.chunk, turn.held)
        finally:  # drawn after the listing from a file deleted since, or left by a crash: even if a chunk failed
            freed += self.files.remove_orphans()
        self.files.clean_temporaries(now=now)
        if old or over or short:
            log.info("retention: %d file(s) past the age limit, %d over the size budget, %d for free space on the "
                     "volume (%d kept for records written meanwhile); %d bytes freed; %d record(s) marked",
                     gone["expired"], gone["removed"], gone["free_space"],
                     len(old) + len(over) + len(short) - sum(gone.values()), freed, sum(marked.values()))
        if needed > freed:
            log.warning("retention: the data volume has %d bytes free, under the %d kept free "
                        "(--retention-min-free-bytes), and the stored pictures cannot give back the rest: new "
                        "pictures are not stored until there is room", free, min_free_bytes)
        return {**gone, "bytes": freed}

    # ---------------------------------------------------------------------------------------------- reads
    def get(self, inspection_id: str) -> Inspection | None:
        with self.sessions() as s:
            return s.scalars(select(Inspection).options(selectinload(Inspection.reviews))
                             .where(Inspection.id == inspection_id)).first()

    def query(self, filters: Filters = Filters(), limit: int = 50, before_id: str | None = None) -> list[Inspection]:
        """Newest first; ``before_id``: the keyset cursor (ids sort in the order parts were scored: models.new_id)."""
        with self.sessions() as s:
            stmt = select(Inspection).where(*filters.where(s)).order_by(Inspection.id.desc()).limit(limit)
            if before_id is not None:
                stmt = stmt.where(Inspection.id < before_id)
            return list(s.scalars(stmt))

    def count(self, filters: Filters = Filters()) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Inspection).where(*filters.where(s))) or 0)

    def iter_all(self, filters: Filters = Filters(), chunk: int = 1000, reviews: bool = False) -> Iterator[Inspection]:
        """Every matching inspection, oldest first, in bounded chunks (for exports of any size); ``reviews``: with
        each one's reviews (one more query per chunk)."""
        after: str | None = None
        with self.sessions() as s:
            where = filters.where(s)
        while True:
            stmt = select(Inspection).where(*where).order_by(Inspection.id).limit(chunk)
            if reviews:
                stmt = stmt.options(selectinload(Inspection.reviews))
            if after is not None:
                stmt = stmt.where(Inspection.id > after)
            with self.sessions() as s:
                rows = list(s.scalars(stmt))
            yield from rows
            if len(rows) < chunk:
                return
            after = rows[-1].id

    @contextlib.contextmanager
    def claim(self, name: str, waiting: Callable[[], None] | None = None, poll_s: float = 1.0, *,
              turn: tuple[str, int] | None = None, waiting_turn: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold ``name`` for the block against every other process writing this database (PostgreSQL: on every
        host), waiting while another holds it (``waiting`` is called once first, to say why this stands still).
        What a re-scoring shard holds, so a second run of it (a cron line that overlaps the last night's, a pod
        started again while the old one still runs) does not score every image a second time, but waits and then
        finds them done. PostgreSQL: a session advisory lock on a connection of its own, tried in turn (a wait in
        the server would end at the lock timeout); SQLite: a byte of a lock file in the data directory picked by
        the name, which dies with its process.

        ``turn``: ``(family, count)``, taken first: claims of one family and count are held at once, and one of
        another count waits until none of them is left (``waiting_turn`` says so once). Shards 1/2 and 1/3 of one
        archive claim different names, yet their images overlap: each scored the shared ones, recorded twice.
        PostgreSQL: a shared advisory lock on (family, count), kept only while pg_locks shows no other count of the
        family held, looked at under the family's gate; SQLite: :func:`dir_lock.count_turn` on the same file."""
        import fcntl

        from ..dir_lock import count_turn, in_turns
        from ..sharding import fixed_hash

        key = fixed_hash(name, signed=True)  # PostgreSQL's bigint
        family = fixed_hash(turn[0]) % (1 << 31) if turn is not None else 0  # an oid pg_locks shows as classid
        count = min(max(turn[1], 1), (1 << 31) - 1) if turn is not None else 0

        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                pair = {"f": family, "n": count}

                def take_turn() -> bool:
                    if not conn.scalar(text(f"SELECT pg_try_advisory_lock({_FAMILY}, 0)"), pair):
                        conn.commit()
                        return False
                    try:
                        conn.execute(text(f"SELECT pg_advisory_lock_shared({_FAMILY}, {_COUNT})"), pair)
                        others = conn.scalar(_OTHER_COUNTS, pair)
                        if others:
                            conn.execute(text(f"SELECT pg_advisory_unlock_shared({_FAMILY}, {_COUNT})"), pair)
                        return not others
                    finally:
                        conn.execute(text(f"SELECT pg_advisory_unlock({_FAMILY}, 0)"), pair)
                        conn.commit()

                def take_pg() -> bool:
                    got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
                    conn.commit()
                    return got

                if turn is not None:
                    in_turns(take_turn, waiting_turn, poll_s)
                in_turns(take_pg, waiting, poll_s)
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    if turn is not None:
                        conn.execute(text(f"SELECT pg_advisory_unlock_shared({_FAMILY}, {_COUNT})"), pair)
                    conn.commit()
            return
        # beside the database file, which is what is claimed: a store opened by its URL alone (--database-url
        # sqlite:///..., no --data-dir) has no data directory, and its shards failed on an assert before scoring
        database = make_url(self.url).database
        if not database or database == ":memory:":  # a database no other process opens: nothing to keep apart
            yield
            return
        path = Path(database + CLAIMS_LOCK_SUFFIX)
        try:
            f = open(path, "a+")  # noqa: SIM115 - the lock is the open file
        except OSError as exc:  # another user's lock file (a run under sudo made it): unguarded, as where locks
            # fail, but said
            log.warning("records: cannot open %s (%s): another run of this shard, or of another shard count, "
                        "recording here is not kept apart and may record the same images; let every user that runs "
                        "shards write it (or delete it while none runs)", path, exc.strerror or exc)
            yield
            return

        def take_file() -> bool:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, abs(key) % (1 << 62))
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                return False
            return True

        with f:  # closed, it lets go of both
            if turn is not None:  # above the claims' bytes
                in_turns(count_turn(f, (1 << 62) + fixed_hash(turn[0]) % (1 << 60), count), waiting_turn, poll_s)
            in_turns(take_file, waiting, poll_s)
            yield

    def recorded_parts(self, model: str, model_versions: Sequence[str], source: str,
                       chunk: int = 5000) -> Iterator[tuple[str, str]]:
        """``(part id, inspection id)`` of every inspection of this model version that ``source`` recorded, in
        bounded chunks: what a resumed re-scoring run finds already done, and the id its results line names.
        ``model_versions``: the names records give the version (artifact.recorded_names: its id, and what records
        of earlier releases say)."""
        after: str | None = None
        while True:
            stmt = (select(Inspection.id, Inspection.part_id)
                    .where(Inspection.model == model, Inspection.model_version.in_(list(model_versions)),
                           Inspection.source == source, Inspection.part_id.is_not(None))
                    .order_by(Inspection.id).limit(chunk))
            if after is not None:
                stmt = stmt.where(Inspection.id > after)
            with self.sessions() as s:
                rows = s.execute(stmt).all()
            yield from ((part, id_) for id_, part in rows)
            if len(rows) < chunk:
                return
            after = rows[-1][0]

    def stats(self, filters: Filters, bucket: str = "hour", zone: Zone = UTC) -> dict[str, Any]:
        """Counts by decision, anomaly rate, normalized-score quantiles and review backlog per time bucket (cut in
        ``zone``), model and line, aggregated by the database (stats.py)."""
        with self.sessions() as s:
            where = filters.where(s)
            truncated = s.scalar(select(func.count()).select_from(Inspection).where(*where)) > STATS_MAX_ROWS
            if truncated:  # the newest rows only: one answer's work stays bounded, whatever the range
                where.append(Inspection.id >= s.scalar(select(Inspection.id).where(*where)
                                                       .order_by(Inspection.id.desc()).offset(STATS_MAX_ROWS - 1)
                                                       .limit(1)))
            buckets = aggregate(s, self.dialect, where, bucket, zone)
        return {"bucket": bucket, "buckets": buckets, "truncated": truncated}

    def reviewed_photos(self, model: str, verdict: str) -> tuple[list[tuple[str, Path]], int]:
        """(inspection id, stored photo path) of ``model``'s inspections whose latest review says ``verdict`` and
        whose photo is still stored, the operators' corrections for the model-feedback side; and how many such
        inspections have no photo here (not kept by --keep-images, removed by retention, never stored, or recorded
        as stored but not under this store's directory: a --data-dir that is not the service's), which an update's
        known-defect guard cannot see, so the update says how many it could not check. From one listing: read
        twice, a photo another replica's retention removed between the two reads counted in both or in neither.
        Retention may still delete a photo before the update reads its path: the update skips it as a photo gone
        (its decoding says so) and counts it with those without a photo."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        stmt = (select(Inspection.id, Inspection.image_file, Inspection.files_state)
                .where(Inspection.model == model, Inspection.verdict == verdict).order_by(Inspection.id))
        with self.sessions() as s:
            rows = s.execute(stmt).all()
        out, without = [], 0
        for rid, key, state in rows:
            path = (self.files.locate(key) if self.files is not None and key is not None and state == FILES_STORED
                    else None)
            if path is None:
                without += 1
            else:
                out.append((rid, path))
        return out, without

    def reviewed_images(self, model: str, verdict: str) -> list[tuple[str, Path]]:
        """The stored photos of :meth:`reviewed_photos`."""
        return self.reviewed_photos(model, verdict)[0]

    def reviewed_without_photo(self, model: str, verdict: str) -> int:
        """How many of :meth:`reviewed_photos` have no photo here."""
        return self.reviewed_photos(model, verdict)[1]

    def reviewed_among(self, model: str, verdict: str, ids: Collection[str]) -> list[str]:
        """Which of ``ids`` are ``model``'s inspections whose latest review says ``verdict``, oldest first: those a
        version learnt as good that an operator reviewed as a real defect since."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        wanted = set(ids)
        stmt = (select(Inspection.id).where(Inspection.model == model, Inspection.verdict == verdict)
                .order_by(Inspection.id))
        with self.sessions() as s:
            return [str(i) for i in s.scalars(stmt) if str(i) in wanted]

    def reviewed_unlearnt(self, model: str, verdict: str, decision: str | None, learnt: Collection[str],
                          listed: int | None = None,
                          unlike: Callable[[int, int, frozenset[str]], bool] | None = None, said: Sequence[str] = (),
                          pixels: Collection[str] = ()) -> tuple[list[str], int, int, int, int]:
        """Of ``model``'s inspections whose latest review says ``verdict`` (and, given, whose decision was
        ``decision``) and are not in ``learnt``: the ids whose photo is here, oldest first (the first ``listed``
        of them, given), and how many there are; then how many are in ``learnt``; how many are neither (their
        photo not here); how many of the others ``unlike`` says an update would leave out, their photo unlike those
        the model was fitted on (another size, grey, a lamp off): it is given each one's height, width and which of
        ``said`` (beginnings of warnings) its scoring's warnings begin with, looked for by the database, as reading
        every warning made the query several times slower where the parts warned alike. An
        inspection whose photo has the very bytes of a learnt one's counts as learnt: the same photo sent again (an
        MES that re-sent it) teaches nothing, an update refuses it as a duplicate, and it was offered for ever. So
        does one whose photo's decoded pixels (``pixels_sha256``, kept since revision 0011) are among ``pixels``, the
        model's own images' (its training and held-out images, in whatever encoding the part's photo came): an
        update skips it as an image the model has; a record without that digest is read by the rest alone. One
        query, and a look on disk only for the ones listed: past them a photo is counted as the records say (stored
        or not). Looking for every photo, the learnt ones too, after every review took seconds of the records' time
        once tens of thousands were reviewed."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        # a warning is a JSON string in the list: its beginning follows a quote (none of them holds one to escape)
        warned = [cast(Inspection.warnings, Text).contains(f'"{start}', autoescape=True) for start in said]
        where = [Inspection.model == model, Inspection.verdict == verdict]
        if decision is not None:  # decision.DECISIONS; any when not given
            where.append(Inspection.decision == decision)
        stmt = (select(Inspection.id, Inspection.files_state, Inspection.image_file, Inspection.image_sha256,
                       Inspection.pixels_sha256, Inspection.image_height, Inspection.image_width, *warned)
                .where(*where).order_by(Inspection.id))
        with self.sessions() as s:
            rows = s.execute(stmt).all()
        known, held = set(learnt), set(pixels)
        photos = {row[3] for row in rows if str(row[0]) in known}
        here: list[str] = []
        n_here = n_learnt = gone = n_unlike = 0
        for rid, state, key, sha, seen, height, width, *found in rows:
            if str(rid) in known or sha in photos or (seen is not None and seen in held):
                n_learnt += 1
            elif unlike is not None and unlike(height, width, frozenset(s for s, f in zip(said, found) if f)):
                n_unlike += 1
            elif state != FILES_STORED or key is None or self.files is None:
                gone += 1
            elif listed is not None and len(here) >= listed:
                n_here += 1  # as the records say: an update that names it says if the photo is gone since
            elif self.files.locate(key) is not None:
                here.append(str(rid))
                n_here += 1
            else:
                gone += 1
        return here, n_here, n_learnt, gone, n_unlike


def iso_time(t: datetime) -> str:
    """A stored time as the API and the export write it: always with microseconds. ``isoformat()`` leaves them out
    of a time on a whole second (one record in a million), and a client that parses one fixed format (a
    spreadsheet import, ``strptime`` with ``%f``) failed on exactly those rows."""
    return t.isoformat(timespec="microseconds")


def inspection_dict(row: Inspection, reviews: bool = False) -> dict[str, Any]:
    """A record as plain JSON-able values (the export and the API read it)."""
    out = {c: getattr(row, c) for c in RECORD_COLUMNS}
    for k in ("created_at", "files_changed_at", "reviewed_at"):
        if out[k] is not None:
            out[k] = iso_time(out[k])
    out["warnings"] = list(row.warnings or [])
    out["has_heatmap"] = row.heatmap_file is not None
    out["view_token"] = row.view_token
    out["pixels_sha256"] = row.pixels_sha256
    if reviews:
        out["reviews"] = [{"id": r.id, "verdict": r.verdict, "undoes": r.undoes, "note": r.note,
                           "reviewer": r.reviewer, "created_at": iso_time(r.created_at)} for r in row.reviews]
        # the latest entry put the verdict on record (a review, or an undo that brought an earlier one back), as
        # reviewed_at says when
        out["reviewed_by"] = row.reviews[-1].reviewer if row.verdict is not None and row.reviews else None
    return out


__all__ = ["Filters", "PicturesBusy", "RecordStore", "RetentionInterrupted", "ReviewConflict", "SchemaError",
           "StoredFile", "UndoRefused", "UnknownReview", "database_url", "inspection_dict", "libpq_url", "new_id",
           "redact"]
