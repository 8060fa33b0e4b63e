"""`anomaly db backup` and `anomaly db restore`: a consistent copy of the SQLite records taken while the service
writes, and a restore that checks the copy, waits for the service to stop and never replays an old log into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from anomaly_service.cli import app as cli
from anomaly_service.dir_lock import BACKUP_LOCK
from anomaly_service.records import Filters, RecordStore
from conftest import cli_under_flock, flock_held_elsewhere, mounted
from test_records import row


def _count(path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT count(*) FROM inspections").fetchone()[0]
    finally:
        con.close()


def _recorded(data: Path, rows) -> Path:
    """A records database in ``data`` holding ``rows``, closed as a stopped service leaves it."""
    store = RecordStore.open(None, data)
    store.upgrade()
    store.add_many(list(rows))
    store.close()
    return data


def test_a_backup_taken_while_the_service_writes_is_consistent_and_restores(tmp_path):
    data, out = tmp_path / "data", tmp_path / "backups" / "records-monday.db"
    store = RecordStore.open(None, data)
    store.upgrade()
    assert not store.warn_if_shared()  # the service holds the data directory, as `anomaly serve` does
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    written, stop, failed = [0], threading.Event(), []

    def line() -> None:
        try:
            while not stop.is_set():
                n = written[0]
                store.add_many([row(n + i, at=t0 + timedelta(seconds=n + i)) for i in range(50)])
                written[0] = n + 50
        except BaseException as exc:  # a write that fails (a full disk) fails the test instead of hanging it
            failed.append(exc)
            raise

    def wait_for(count: int) -> None:
        while written[0] < count and writer.is_alive():
            stop.wait(0.01)
        assert not failed and written[0] >= count, f"the line stopped writing: {failed}"

    writer = threading.Thread(target=line)
    writer.start()
    try:
        wait_for(500)
        before = written[0]
        result = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(out)])
        after = written[0]
        wait_for(after + 200)  # the line went on during and after the backup
    finally:
        stop.set()
        writer.join()
    assert result.exit_code == 0, result.output
    kept = _count(out)
    assert before <= kept <= after + 50 and kept % 50 == 0  # whole transactions only
    assert f"{kept} inspections" in result.output and "schema" in result.output
    assert not list(out.parent.glob(".*partial"))  # nothing half-written left beside it

    refused = CliRunner().invoke(cli, ["db", "restore", "--from", str(out), "--data-dir", str(data)])
    assert refused.exit_code != 0 and "stop the service first" in refused.output
    total = store.count()
    assert total == written[0]  # the refused restore touched nothing
    store.close()

    restored = CliRunner().invoke(cli, ["db", "restore", "--from", str(out), "--data-dir", str(data)])
    assert restored.exit_code == 0, restored.output
    back = RecordStore.open(None, data)
    assert back.upgrade()[0] == back.head_revision() and back.count() == kept
    back.add_many([row(10**6, at=t0)])  # the restored database takes new records
    assert back.count(Filters(part_id=f"P{10**6}")) == 1
    back.close()
    replaced = list(data.glob("records.db.replaced-*"))
    assert len(replaced) == 1 and _count(replaced[0]) == total  # the database it replaced is kept


def test_the_kept_database_is_named_by_the_utc_time_of_the_restore(tmp_path, monkeypatch):
    """Named in the host's local time without a zone, a database kept by a restore in Kolkata read 5.5 hours off
    every time the records keep, and two restores in the hour a DST change repeats were named out of order."""
    data = tmp_path / "data"
    store = RecordStore.open(None, data)
    store.upgrade()
    store.add_many([row(1, at=datetime(2025, 3, 1, tzinfo=timezone.utc))])
    store.close()
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(tmp_path / "b.db")]) \
        .exit_code == 0
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(tmp_path / "b.db"), "--data-dir", str(data)])
        after = datetime.now(timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert result.exit_code == 0, result.output
    kept = [p.name for p in data.glob("records.db.replaced-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and kept[0].endswith("Z"), kept
    stamp = datetime.strptime(kept[0].removeprefix("records.db.replaced-"), "%Y%m%dT%H%M%SZ")
    assert before <= stamp.replace(tzinfo=timezone.utc) <= after


def test_a_restore_never_replays_the_old_log_into_the_backup(tmp_path):
    data = tmp_path / "data"
    store = RecordStore.open(None, data)
    store.upgrade()
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    store.add_many([row(i, at=t0 + timedelta(seconds=i)) for i in range(10)])
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(tmp_path / "b.db")]) \
        .exit_code == 0
    # a crash leaves a log beside the database: rows the backup does not have, not yet in the main file
    live = sqlite3.connect(data / "records.db")
    live.execute("PRAGMA wal_autocheckpoint=0")
    live.execute("DELETE FROM inspections")
    shutil.copy(data / "records.db-wal", tmp_path / "crash-wal")
    live.close()
    store.close()
    shutil.copy(tmp_path / "crash-wal", data / "records.db-wal")
    result = CliRunner().invoke(cli, ["db", "restore", "--from", str(tmp_path / "b.db"), "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert not (data / "records.db-wal").exists()
    assert _count(data / "records.db") == 10
    replaced = next(p for p in data.glob("records.db.replaced-*") if not p.name.endswith(("-wal", "-shm")))
    assert (replaced.parent / (replaced.name + "-wal")).is_file()  # the old log went with the old file


def test_restore_refuses_what_is_not_a_good_records_backup(tmp_path):
    data = tmp_path / "data"
    _recorded(data, [row(i) for i in range(200)])
    good = tmp_path / "good.db"
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(good)]).exit_code == 0

    noise = tmp_path / "noise.db"
    noise.write_bytes(b"not a database at all" * 100)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    # another program's Alembic database with an inspections table of its own: restored, the service recorded nothing
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.executescript("CREATE TABLE inspections (serial TEXT, passed INTEGER); CREATE TABLE alembic_version "
                      "(version_num TEXT); INSERT INTO alembic_version VALUES ('0006');")
    con.close()
    torn = tmp_path / "torn.db"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    newer = tmp_path / "newer.db"
    shutil.copy(good, newer)
    con = sqlite3.connect(newer)
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    for bad, says in ((noise, "not a readable SQLite database"), (other, "not an inspection records database"),
                      (foreign, "not this product's (no id, created_at"),
                      (torn, "malformed"), (newer, "9999"), (tmp_path / "missing.db", "no backup file")):
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(bad), "--data-dir", str(data)])
        assert result.exit_code != 0 and says in result.output, (bad.name, result.output)
        assert "Traceback" not in result.output
    assert _count(data / "records.db") == 200 and not list(data.glob("records.db.replaced-*"))


def test_backup_says_what_to_do_where_it_cannot(tmp_path):
    runner = CliRunner()
    pg = runner.invoke(cli, ["db", "backup", "--database-url", "postgresql+psycopg://u:secret@db/records",
                             "--out", str(tmp_path / "x.db")])
    assert pg.exit_code != 0 and "pg_dump" in pg.output and "secret" not in pg.output
    # pg_dump takes a libpq URL: SQLAlchemy's +driver suffix would make it fail on the command it was told to run
    command = pg.output.split("`")[1]
    assert command.startswith("pg_dump ") and command.split()[-1] == "postgresql://u@db/records", command
    query = runner.invoke(cli, ["db", "backup", "--database-url", "postgresql+psycopg://u@db/records?sslmode=require",
                                "--out", str(tmp_path / "x.db")])
    assert "pg_dump --format=custom --file records.dump 'postgresql://u@db/records?sslmode=require'" in query.output
    # the restore's command too, and that it goes into an empty database: one whose tables a service already made
    # takes nothing from pg_restore, which fails on each of them
    back = runner.invoke(cli, ["db", "restore", "--database-url", "postgresql+psycopg://u:secret@db/records",
                               "--from", str(tmp_path / "records.dump")])
    assert back.exit_code != 0 and "secret" not in back.output and "empty database" in back.output
    assert back.output.split("`")[1] == "pg_restore --no-owner --dbname postgresql://u@db/records records.dump"
    earlier = tmp_path / "earlier.db"
    earlier.write_bytes(b"yesterday's backup")
    missing = runner.invoke(cli, ["db", "backup", "--data-dir", str(tmp_path / "nowhere"), "--out", str(earlier)])
    assert missing.exit_code != 0 and "no records database" in missing.output
    assert earlier.read_bytes() == b"yesterday's backup"  # a failed backup never replaces an earlier one


def test_backup_never_writes_over_the_live_databases_own_files(tmp_path):
    """--out records.db-wal while the service wrote made every new reader fail and lost records at a kill;
    --out records.db.owner removed the lock that keeps a restore out while the service runs (an adversarial
    review)."""
    data = tmp_path / "data"
    store = RecordStore.open(None, data)
    store.upgrade()
    store.add_many([row(i) for i in range(5)])
    for name in ("records.db-wal", "records.db-shm", "records.db.owner", "records.db.replaced-20250101-000000"):
        result = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(data / name)])
        assert result.exit_code != 0 and "side files" in result.output, name
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out",
                                    str(data / "copy-monday.db")]).exit_code == 0  # another name there is fine
    assert store.count() == 5
    store.close()


def test_a_restore_takes_the_backups_own_log_and_keeps_every_replaced_database(tmp_path):
    """A kept records.db.replaced-* keeps its log beside it: restoring it byte for byte lost the rows in the log,
    while the message counted them. Two restores in one second kept only the second replaced database."""
    src = tmp_path / "src"
    src.mkdir()
    _recorded(src, [row(i) for i in range(100)])
    live = sqlite3.connect(src / "records.db")
    live.execute("PRAGMA wal_autocheckpoint=0")
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    for i in range(50):  # rows only the log holds
        r = row(1000 + i, at=t0)
        live.execute("INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, "
                     "threshold, decision, regions, image_width, image_height, image_bytes, image_sha256, "
                     "timing_ms, source, files_state) VALUES (?, '2025-03-01 00:00:00.000000', 'part', 'v1', 1, "
                     "0.5, 2, 'normal', '[]', 8, 8, 10, ?, '{}', 'api', 'not_kept')", (r.id, "0" * 64))
    live.commit()
    shutil.copy(src / "records.db", tmp_path / "old.db")
    shutil.copy(src / "records.db-wal", tmp_path / "old.db-wal")
    live.close()
    data = tmp_path / "data"
    for _ in range(2):  # twice within a second
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(tmp_path / "old.db"), "--data-dir",
                                          str(data)])
        assert result.exit_code == 0 and "restored 150 inspections" in result.output, result.output
        assert _count(data / "records.db") == 150
    assert len([p for p in data.glob("records.db.replaced-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    CliRunner().invoke(cli, ["db", "restore", "--from", str(tmp_path / "old.db"), "--data-dir", str(data)])
    assert len([p for p in data.glob("records.db.replaced-*") if not p.name.endswith(("-wal", "-shm"))]) == 2


def test_a_backup_of_the_first_schema_restores_and_is_upgraded(tmp_path):
    """The reviews table came with schema 0002: a 0001 backup was refused as 'not a records database'."""
    old = tmp_path / "old"
    store = RecordStore.open(None, old)
    store.upgrade("0001")
    store.close()
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(old), "--out", str(tmp_path / "b.db")]) \
        .exit_code == 0
    result = CliRunner().invoke(cli, ["db", "restore", "--from", str(tmp_path / "b.db"), "--data-dir",
                                      str(tmp_path / "data")])
    assert result.exit_code == 0 and "schema 0001" in result.output, result.output
    back = RecordStore.open(None, tmp_path / "data")
    assert back.upgrade() == ("0001", back.head_revision())
    back.close()


SERVICE_UID = 54321  # the service's user: no name needed to own files or to run as it


@contextlib.contextmanager
def _host(owned: str) -> Iterator[Path]:
    """A directory the service's user can reach (pytest's are root's alone) holding ``owned``, made and given to that
    user as a plant makes the service's directory; removed after."""
    host = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        host.chmod(0o755)
        (host / owned).mkdir()
        os.chown(host / owned, SERVICE_UID, SERVICE_UID)
        yield host
    finally:
        shutil.rmtree(host, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_restore_run_as_root_leaves_the_database_to_the_services_user(tmp_path):
    """`sudo anomaly db restore` into the data directory of a service that runs as its own user left a root-owned
    database and lock: started again, the service could not take its lock (permission denied) and recorded no part.
    The restored files now belong to whom the database they replace belonged (else the directory's owner)."""
    data = tmp_path / "data"
    _recorded(data, [row(i) for i in range(20)])
    backup = tmp_path / "b.db"
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(backup)]).exit_code == 0
    with _host("data") as host:
        new_data = host / "data"
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(backup), "--data-dir", str(new_data)])
        assert result.exit_code == 0, result.output
        assert _service_records(new_data, SERVICE_UID)
        assert {(new_data / f).stat().st_uid for f in ("records.db", "records.db.owner")} == {SERVICE_UID}


def _service_records(data: Path, uid: int) -> bool:
    """Whether the service, run as ``uid``, can take its lock in ``data``, write a record's change and make the
    pictures' folder: a forked process that gives up root as the service's user does."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            open(data / "records.db.owner", "a+").close()
            con = sqlite3.connect(data / "records.db")
            con.execute("UPDATE inspections SET line = 'L9'")
            con.commit()
            con.close()
            (data / "files").mkdir(exist_ok=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_restore_run_as_root_into_a_new_data_directory_leaves_it_to_the_services_user(tmp_path):
    """`sudo anomaly db restore --data-dir DIR` on a new host, DIR not made yet under the directory made for the
    service: DIR, its database and lock were root's, and the service, started as its own user, recorded nothing.
    What the restore makes now belongs to the owner of the directory it is made in; where that is root too, it
    says the service's user must be given it."""
    data = tmp_path / "data"
    _recorded(data, [row(i) for i in range(20)])
    backup = tmp_path / "b.db"
    assert CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(backup)]).exit_code == 0
    with _host("srv") as host:
        new_data = host / "srv" / "anomaly" / "data"
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(backup), "--data-dir", str(new_data)])
        assert result.exit_code == 0 and "note:" not in result.output, result.output
        assert _service_records(new_data, SERVICE_UID)
        assert {p.stat().st_uid for p in (new_data.parent, new_data, new_data / "records.db")} == {SERVICE_UID}
        root_owned = host / "root" / "data"
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(backup), "--data-dir", str(root_owned)])
        assert result.exit_code == 0 and f"chown -R USER {root_owned}" in result.output, result.output
        assert (root_owned / "records.db").stat().st_uid == 0


@pytest.mark.parametrize("log", ["checkpointed", "with its log", "log without shared memory"])
def test_a_live_database_on_a_read_only_disk_restores_with_what_its_log_holds(tmp_path, log):
    """A plant restoring from the dead host's disk mounted read-only, or from a read-only snapshot of the data
    directory, gives the service's own records.db (WAL mode), with its log where the host died mid-write. SQLite
    opens such a file only where it can make its shared-memory file beside it: the restore, and a backup of that
    directory, failed with 'unable to open database file'."""
    disk = tmp_path / "disk"
    _recorded(disk, [row(i) for i in range(50)])
    if log != "checkpointed":
        pid = os.fork()
        if pid == 0:  # the host dies with a write in the log: a writer gone before any checkpoint
            con = sqlite3.connect(disk / "records.db")
            con.execute("PRAGMA wal_autocheckpoint=0")
            con.execute("UPDATE inspections SET line = 'L7'")
            con.commit()
            os._exit(0)
        os.waitpid(pid, 0)
        assert (disk / "records.db-wal").stat().st_size > 0
        if log == "log without shared memory":
            (disk / "records.db-shm").unlink()
    new, copy = tmp_path / "new", tmp_path / "from-the-disk.db"
    with mounted(disk):
        result = CliRunner().invoke(cli, ["db", "restore", "--from", str(disk / "records.db"), "--data-dir", str(new)])
        backup = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(disk), "--out", str(copy)])
    assert result.exit_code == 0, result.output
    assert backup.exit_code == 0, backup.output
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != BACKUP_LOCK)
    assert _count(copy) == 50 and left == ["disk", "from-the-disk.db", "new"]
    con = sqlite3.connect(new / "records.db")
    lines = {r[0] for r in con.execute("SELECT line FROM inspections")}
    con.close()
    assert _count(new / "records.db") == 50 and (lines == {"L7"}) == (log != "checkpointed")
    assert sorted(p.name for p in new.iterdir()) == ["records.db", "records.db.owner"]  # no copy left behind


def test_a_restore_under_a_running_service_is_refused_before_it_copies_a_read_only_source(tmp_path):
    """A database on a read-only disk is read through a copy made in the data directory. Refused only after that
    copy, a restore run by mistake under a live service wrote a whole database's size onto the service's volume
    first: on a volume without that room it failed for the room, not for the service it would have stopped."""
    disk, data = tmp_path / "disk", tmp_path / "data"
    _recorded(disk, [row(i, meta={"i": i, "pad": "x" * 4000}) for i in range(300)])  # over a megabyte
    with mounted(data, tmpfs_size="256k"):
        service = RecordStore.open(None, data)  # a service recording there holds the directory's lock
        service.upgrade()
        assert not service.warn_if_shared()  # the service holds the data directory, as `anomaly serve` does
        try:
            with mounted(disk):
                assert (disk / "records.db").stat().st_size > 1 << 20
                result = CliRunner().invoke(cli, ["db", "restore", "--from", str(disk / "records.db"),
                                                  "--data-dir", str(data)])
        finally:
            service.close()
        assert result.exit_code != 0 and "stop the service first" in result.output, result.output
        assert not [p for p in data.iterdir() if ".reading-" in p.name]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_downgrade_run_as_root_leaves_the_database_to_the_services_user():
    """`sudo anomaly db downgrade` gave the service's user the lock only. Into a data directory with no database
    yet (a wrong --data-dir, a host not restored yet) it made the directory and an empty records.db, root's, and
    the service, started as its own user, could not write it; a database root owned (an earlier command run with
    sudo) stayed so. Now the first is refused with nothing made, and the database is the service's after it."""
    with _host("data") as host:
        data = host / "data"
        for where in (data, host / "not-made"):
            result = CliRunner().invoke(cli, ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(where)])
            assert result.exit_code != 0 and "no records database under" in result.output, result.output
        assert sorted(p.name for p in host.iterdir()) == ["data"] and list(data.iterdir()) == []
        _recorded(data, [row(i) for i in range(5)])  # root's: as a command run with sudo left it
        result = CliRunner().invoke(cli, ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(data)])
        head = RecordStore("sqlite://", None).head_revision()  # the newest revision this release knows
        assert result.exit_code == 0 and f"schema {head} -> 0005" in result.output, result.output
        assert {p.name: p.stat().st_uid for p in data.iterdir()} == {"records.db": SERVICE_UID,
                                                                     "records.db.owner": SERVICE_UID,
                                                                     "records.db.schema-lock": SERVICE_UID}
        assert _service_records(data, SERVICE_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_db_upgrade_run_as_root_leaves_the_database_to_the_services_user():
    """`sudo anomaly db upgrade --data-dir DIR`, run ahead of a rollout (docs/service.md), made DIR and a new
    records.db root's: the service, started as its own user, opened it read-only and recorded nothing. What it
    makes belongs to the owner of the directory it is made in, as a restore's does."""
    with _host("srv") as host:
        data = host / "srv" / "data"
        result = CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(data)])
        assert result.exit_code == 0 and "schema empty ->" in result.output, result.output
        assert {p.stat().st_uid for p in (data, *data.iterdir())} == {SERVICE_UID}
        _recorded(data, [row(0)])  # a record to change
        assert _service_records(data, SERVICE_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
@pytest.mark.parametrize("command", ["upgrade", "downgrade", "lock"])
def test_a_command_run_as_root_gives_no_file_away_through_a_link(command):
    """The data directory is the service's user's, so the links in it are too: a records.db or lock that links to a
    file in a directory only root reaches had that file made and given to the user by `sudo anomaly db upgrade` or
    `downgrade` (the hand-over followed the link), a way to own any file on the host. A database reached through a
    link is left root's; a lock that is a link, or a database link to nothing yet, is refused, with nothing made
    where it points."""
    with _host("data") as host:
        data, root_only = host / "data", host / "root-only"
        root_only.mkdir(mode=0o700)
        (root_only / "secret").write_text("root's\n")
        if command == "upgrade":  # a database made where the link points
            (data / "records.db").symlink_to(root_only / "nologin")
            args = ["db", "upgrade", "--data-dir", str(data)]
        else:  # a database that exists there
            _recorded(root_only, [row(i) for i in range(3)])
            (data / "records.db").symlink_to(root_only / "records.db")
            args = ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(data)]
        if command == "lock":  # and a lock that names a file of root's, and one not made yet
            (data / "records.db.owner").symlink_to(root_only / "nologin")
        result = CliRunner().invoke(cli, args)
        if command in ("lock", "upgrade"):
            assert result.exit_code != 0 and "is a link" in result.output, result.output
            assert not (root_only / "nologin").exists()
        else:
            assert result.exit_code == 0, result.output
        assert {p.name for p in root_only.iterdir() if p.stat().st_uid != 0} == set()


def test_folders_and_backups_named_with_hash_percent_and_question_marks(model_dir, tmp_path):
    """Paths reach SQLite inside URLs, where '#' starts a fragment, '?' the options and '%C3' is an escape. A backup
    named 'Sicherung #3.db' was checked as '.Sicherung ' (an empty database made there) and refused, so no backup
    of that name could be taken; a --data-dir named 'Linie %C3%BC ?2' kept its pictures there and its records in
    'Linie ü ', where export, backup and restore did not find them. Each path is now the folder or file named."""
    data = tmp_path / "Linie %C3%BC #1 ?2"
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(_photo(tmp_path)),
                                 "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Linie %C3%BC #1 ?2", "photo.png"]
    backup = tmp_path / "Sicherung #3 ?x %41.db"
    r = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(backup)])
    assert r.exit_code == 0 and "1 inspections" in r.output, r.output
    assert [p.name for p in tmp_path.iterdir()
            if p.name.startswith(".") and p.name != BACKUP_LOCK] == []  # no stray database beside it
    restored = tmp_path / "wieder #2 %41"
    r = CliRunner().invoke(cli, ["db", "restore", "--from", str(backup), "--data-dir", str(restored)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(restored), "--format", "jsonl"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1, r.output



@pytest.mark.parametrize("folder, earlier", [("Linie %C3%BC", "Linie ü/records.db"), ("Prüfung ?2", "Prüfung ")])
def test_records_an_earlier_release_kept_beside_an_escaped_data_dir_are_named_not_left(model_dir, tmp_path, folder,
                                                                                      earlier):
    """An earlier release opened the URL with the folder's '%XX' and '?' unescaped: a plant's records are in 'Linie
    ü/records.db' (or the file 'Prüfung '). This one, opening the folder named, made a new empty database there and
    went on recording into it: the history was not exported or backed up, and records were split over two files.
    Each command names where they are and how to move them; after the move they are all found."""
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(_photo(tmp_path)), "--data-dir",
                                 str(tmp_path / "old-release")])
    assert r.exit_code == 0, r.output
    (tmp_path / earlier).parent.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "old-release" / "records.db", tmp_path / earlier)  # where an earlier release put it
    data = tmp_path / folder
    for args in (["records", "export", "--format", "jsonl"], ["db", "backup", "--out", str(tmp_path / "b.db")],
                 ["score", "--model", str(model_dir / "part"), str(tmp_path / "photo.png")]):
        r = CliRunner().invoke(cli, [*args, "--data-dir", str(data)])
        assert r.exit_code != 0 and str(tmp_path / earlier) in r.output and "move it" in r.output, r.output
        assert not (data / "records.db").exists()
    data.mkdir(exist_ok=True)
    (tmp_path / earlier).rename(data / "records.db")
    r = CliRunner().invoke(cli, ["records", "export", "--format", "jsonl", "--data-dir", str(data)])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1, r.output


def _photo(tmp_path: Path) -> Path:
    import numpy as np

    from conftest import png_bytes, textured_part

    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(textured_part(np.random.default_rng(4))))
    return path


def test_a_backup_waits_for_one_under_way_into_the_same_folder(tmp_path, caplog):
    """Two `db backup` runs to one ``--out`` at once (the nightly one and one by hand) each removed the other's
    partial copy and wrote over it: both failed ('disk I/O error', 'attempt to write a readonly database') and, had
    one passed its check, it would have renamed the other's half-written copy into place. A backup now waits, and
    says so, for one under way into the same folder."""
    data, out = _recorded(tmp_path / "data", [row(i) for i in range(20)]), tmp_path / "usb" / "records.db"
    out.parent.mkdir()
    partial = out.with_name(".records.db.partial")
    result: dict = {}
    with flock_held_elsewhere(out.parent / BACKUP_LOCK):  # the first, under way
        partial.write_bytes(b"the first backup's copy, half-written")
        runner = threading.Thread(target=lambda: result.setdefault(
            "run", CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(out)])))
        runner.start()
        runner.join(3.0)
        assert runner.is_alive() and partial.read_bytes().startswith(b"the first")  # left to the first
        assert "db backup: another backup into" in caplog.text
    runner.join(60)  # the first died: its copy is a leftover the second replaces
    assert result["run"].exit_code == 0, result["run"].output
    assert _count(out) == 20 and not partial.exists()


def test_a_backup_run_under_flock_on_its_folder_ends(tmp_path):
    """A cron line that keeps its jobs apart with ``flock FOLDER anomaly db backup --out FOLDER/x``: the backup took
    the folder's own flock, which ``flock`` holds until the backup exits, and waited for it for ever."""
    data, out = _recorded(tmp_path / "data", [row(i) for i in range(5)]), tmp_path / "usb" / "records.db"
    out.parent.mkdir()
    done = cli_under_flock(out.parent, "db", "backup", "--data-dir", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert _count(out) == 5
