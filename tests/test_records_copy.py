"""`anomaly db copy`: a line that grows from one host (SQLite) to replicas on PostgreSQL keeps its records, its
operators' reviews and its stored pictures, and one that shrinks back keeps them too."""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from anomaly_service.cli import app as cli
from anomaly_service.records import RecordStore
from anomaly_service.records.copy import copy_records
from anomaly_service.records.models import FILES_STORED
from test_backup import SERVICE_UID, _host, _recorded
from test_inspections_api import BAD, GOOD, flushed, make_client, score
from test_records import row


def _copy(*args: str) -> str:
    result = CliRunner().invoke(cli, ["db", "copy", "-q", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _listed(client) -> list[dict]:
    """Every inspection the service lists, newest first, with its reviews."""
    items = client.get("/inspections", params={"limit": 500}).json()["items"]
    return [client.get(f"/inspections/{i['id']}").json() for i in items]


def _same(a: dict, b: dict) -> dict:
    """An inspection as two services list it, less what names the service (its URLs' host is the same here)."""
    return {k: v for k, v in a.items() if k not in ("reviews",)} | {
        "reviews": [{k: v for k, v in r.items() if k not in ("id", "undoes")} for r in a["reviews"]]}


def test_a_line_moved_from_sqlite_to_postgresql_keeps_its_records_reviews_and_pictures(model_dir, tmp_path,
                                                                                       postgres_url):
    """One host's service recorded parts, kept the flagged ones' pictures, and its operators reviewed and undid; the
    copy into PostgreSQL and the replicas' shared picture volume lists the same parts with the same history, and
    every picture URL the old host gave out opens the same picture on the new one."""
    old, shared = tmp_path / "old", tmp_path / "shared"
    with make_client(model_dir, tmp_path, data_dir=old, keep_images="anomalies") as c:
        for i, image in enumerate((BAD, GOOD, BAD, GOOD)):
            score(c, image, params={"part_id": f"SN-{i}", "line": "L1"})
        flushed(c)
        first = c.get("/inspections", params={"part_id": "SN-0"}).json()["items"][0]["id"]
        for verdict, who in (("defect", "ann"), ("good", "bob")):
            assert c.post(f"/inspections/{first}/review", json={"verdict": verdict},
                          headers={"X-Reviewer": who}).status_code == 200
        undone = c.get(f"/inspections/{first}").json()["reviews"][-1]["id"]
        assert c.post(f"/inspections/{first}/reviews/{undone}/undo", headers={"X-Reviewer": "bob"}).status_code == 200
        before = _listed(c)
        pictures = {i["id"]: c.get(i["overlay_url"]).content for i in before if i["overlay_url"]}
    assert len(before) == 4 and len(pictures) == 2 and before[-1]["verdict"] == "defect"

    out = _copy("--from-data-dir", str(old), "--to-database-url", postgres_url, "--to-data-dir", str(shared))
    assert "4 inspections copied with 3 reviews, 0 already there; 2 pictures copied" in out
    kept = next((old / "files").rglob("*.png"))
    copied = shared / "files" / kept.relative_to(old / "files")
    assert copied.stat().st_mtime_ns == kept.stat().st_mtime_ns  # retention ages it by its file's time

    with make_client(model_dir, tmp_path, data_dir=shared, database_url=postgres_url, keep_images="anomalies") as c:
        after = _listed(c)
        assert [_same(a, {}) for a in after] == [_same(b, {}) for b in before]
        undo = after[-1]["reviews"][-1]
        assert undo["undoes"] == after[-1]["reviews"][-2]["id"]  # the undo names the copy of what it withdrew
        for i in after:
            if i["id"] in pictures:
                assert c.get(i["overlay_url"]).content == pictures[i["id"]]  # the old URL, token and all
        score(c, BAD, params={"part_id": "SN-new"})  # the replicas record on after the copied records
        flushed(c)
        assert c.get("/inspections").json()["items"][0]["part_id"] == "SN-new"

    again = _copy("--from-data-dir", str(old), "--to-database-url", postgres_url, "--to-data-dir", str(shared))
    assert "0 inspections copied with 0 reviews, 4 already there; 0 pictures copied, 2 already there" in again

    back = tmp_path / "back"  # and back to one host: PostgreSQL into a new SQLite directory
    out = _copy("--from-database-url", postgres_url, "--from-data-dir", str(shared), "--to-data-dir", str(back))
    assert "5 inspections copied with 3 reviews, 0 already there; 2 pictures copied" in out  # one photo, one map
    with make_client(model_dir, tmp_path, data_dir=back) as c:
        assert [_same(a, {}) for a in _listed(c)[1:]] == [_same(b, {}) for b in before]


def _stored_rows(store: RecordStore, n: int, t0: datetime) -> list:
    rows = []
    for i in range(n):
        r = row(i, at=t0 + timedelta(seconds=i))
        if i % 3 == 0:
            r.image_file, r.files_state = store.files.put(f"photo {i}".encode(), "png"), FILES_STORED
        rows.append(r)
    return rows


def test_a_copy_stopped_part_way_is_finished_by_running_it_again(tmp_path, postgres_url):
    """Each chunk lands whole (its inspections with their reviews) or not at all; run again, the copy skips what is
    there and copies the rest, and no review is copied twice."""
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    rows = _stored_rows(src, 230, datetime(2026, 3, 1, tzinfo=timezone.utc))
    src.add_many(rows)
    for r in rows[::7]:
        src.review(r.id, "defect", "ann")
    dest = RecordStore.open(postgres_url, tmp_path / "shared")
    done = []

    def stop_after_two_chunks(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt  # Ctrl-C, as it arrives between two chunks

    with pytest.raises(KeyboardInterrupt):
        copy_records(src, dest, chunk=100, step=stop_after_two_chunks)
    assert dest.count() == 200
    info = copy_records(src, dest, chunk=100)
    assert (info.inspections, info.already, info.reviews) == (30, 200, 4)
    with dest.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*), count(DISTINCT inspection_id) FROM reviews").one() == (33, 33)
    assert {r.id for r in dest.iter_all()} == {r.id for r in rows}
    assert sum(1 for _ in (tmp_path / "shared" / "files").rglob("*.png")) == 77
    src.close()
    dest.close()


def test_two_hosts_records_brought_into_one_database(tmp_path, postgres_url):
    """Two stations that each recorded on their own host: their records (ids made apart, never the same) and their
    reviews go into the one database their replicas now share."""
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    a = _recorded(tmp_path / "a", [row(i, at=t0 + timedelta(minutes=i), station="A") for i in range(30)])
    b = _recorded(tmp_path / "b", [row(i, at=t0 + timedelta(minutes=i), station="B") for i in range(20)])
    for data in (a, b):
        store = RecordStore.open(None, data)
        store.review(next(store.iter_all()).id, "good", "qa")
        store.close()
    for data in (a, b):
        _copy("--from-data-dir", str(data), "--to-database-url", postgres_url)
    dest = RecordStore.open(postgres_url, None)
    try:
        assert dest.count() == 50
        assert sorted(r.station for r in dest.iter_all() if r.verdict == "good") == ["A", "B"]
    finally:
        dest.close()


def test_copy_says_what_is_wrong_and_changes_nothing(tmp_path):
    data = _recorded(tmp_path / "data", [row(i) for i in range(3)])
    runner = CliRunner()

    def refused(*args: str) -> str:
        result = runner.invoke(cli, ["db", "copy", "-q", *args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        return result.output

    assert "is the destination too" in refused("--from-data-dir", str(data), "--to-data-dir", str(data))
    assert "no directory" in refused("--from-data-dir", str(tmp_path / "nope"), "--to-data-dir", str(tmp_path / "x"))
    # asked after the flag this command has: it has no --data-dir
    assert (f"error: the source: no records database under {tmp_path} (is the --from-data-dir right?"
            in refused("--from-data-dir", str(tmp_path), "--to-data-dir", str(tmp_path / "x")))
    assert "name the records to copy" in refused("--to-data-dir", str(tmp_path / "x"))
    assert "name where to copy them" in refused("--from-data-dir", str(data))
    old = tmp_path / "old"  # an older release's records: upgraded by their owner first, never by a copy
    store = RecordStore.open(None, old)
    store.upgrade("0001")
    store.close()
    assert "anomaly db upgrade" in refused("--from-data-dir", str(old), "--to-data-dir", str(tmp_path / "y"))
    with sqlite3.connect(old / "records.db") as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
    assert not (tmp_path / "y" / "records.db").exists() or RecordStore.open(None, tmp_path / "y").count() == 0
    newer = _recorded(tmp_path / "newer", [row(9)])  # a newer release's records: the message says which side
    with sqlite3.connect(newer / "records.db") as con:
        con.execute("UPDATE alembic_version SET version_num = '9999'")
    said = refused("--from-data-dir", str(data), "--to-data-dir", str(newer))
    assert said.startswith("error: the destination: ") and "newer release" in said
    said = refused("--from-data-dir", str(newer), "--to-data-dir", str(tmp_path / "z"))
    assert said.startswith("error: the source: ") and "newer release" in said
    assert RecordStore.open(None, newer).count() == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_copy_run_as_root_leaves_the_pictures_and_database_to_the_services_user(tmp_path):
    """Run with sudo into the service's directory: a root-owned picture (private to its owner) was one the service,
    running as its own user, could not serve."""
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 6, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    src.close()
    with _host("data") as host:
        _copy("--from-data-dir", str(tmp_path / "old"), "--to-data-dir", str(host / "data"))
        made = [p for p in (host / "data").rglob("*") if not p.name.startswith(".")]
        assert len([p for p in made if p.suffix == ".png"]) == 2
        assert {p.stat().st_uid for p in made} == {SERVICE_UID}, [(p, p.stat().st_uid) for p in made]


def test_pictures_the_source_lost_are_counted_not_invented(tmp_path):
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    rows = _stored_rows(src, 6, datetime(2026, 3, 1, tzinfo=timezone.utc))
    src.add_many(rows)
    Path(src.files.path(rows[3].image_file)).unlink()  # removed by hand after the record was written
    src.close()
    result = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-data-dir", str(tmp_path / "old"),
                                      "--to-data-dir", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert "1 pictures copied" in result.output and "1 pictures the copied records say are stored" in result.output


def test_pictures_left_behind_by_a_first_copy_come_with_the_next(tmp_path, postgres_url):
    """A first copy named no picture folder (the records only); run again with them, it copies the pictures of the
    records it had copied, which say stored."""
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 9, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    src.close()
    first = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-data-dir", str(tmp_path / "old"),
                                     "--to-database-url", postgres_url])
    assert first.exit_code == 0 and "0 pictures copied" in first.output and "rsync -a" in first.output
    out = _copy("--from-data-dir", str(tmp_path / "old"), "--to-database-url", postgres_url,
                "--to-data-dir", str(tmp_path / "shared"))
    assert "0 inspections copied with 0 reviews, 9 already there; 3 pictures copied" in out


def test_rows_the_destination_refuses_are_named_and_the_others_copied(tmp_path, postgres_url):
    """SQLite holds what PostgreSQL refuses: a part id longer than its column (`anomaly score` records a file's
    name, up to 255 characters), NaN in a JSON column, a NUL in a review's note (edited in by another tool). One such
    row stopped the copy at its chunk with the database's message, which named neither the row nor the column, and so
    did every run after."""
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    rows = [row(i, at=t0 + timedelta(seconds=i)) for i in range(12)]
    rows[3].part_id = "x" * 230
    rows[5].timing_ms = {"total": float("nan")}  # SQLite's JSON is Python's text, which writes NaN
    data = _recorded(tmp_path / "a", rows)
    store = RecordStore.open(None, data)
    store.review(rows[7].id, "defect", "ann", note="scratch\x00")
    store.review(rows[8].id, "good", "bob")
    store.close()
    for _ in range(2):  # run again: the same two named, nothing doubled
        result = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-data-dir", str(data),
                                          "--to-database-url", postgres_url])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "3 inspections the destination refused were not copied" in result.output
        assert f"{rows[3].id}: its part_id is 230 characters, the destination's column holds 200" in result.output
        assert f"{rows[5].id}: its timing_ms holds NaN or Infinity" in result.output
        assert f"{rows[7].id}: its note holds a NUL character" in result.output
    dest = RecordStore.open(postgres_url, None)
    try:
        assert {r.id for r in dest.iter_all()} == {r.id for r in rows} - {rows[3].id, rows[5].id, rows[7].id}
        assert dest.get(rows[8].id).verdict == "good" and len(dest.get(rows[8].id).reviews) == 1
    finally:
        dest.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_copy_run_as_root_and_stopped_leaves_the_database_to_the_services_user(tmp_path, monkeypatch):
    """Stopped part way (Ctrl-C), a copy run with sudo left the SQLite database it had made, and the pictures' lock,
    root's: the service, as its own user, recorded nothing there until a later run went to its end."""
    from anomaly_service.records import copy as copying

    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 6, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    src.close()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(copying, "_copy_reviews", interrupted)
    with _host("data") as host:
        result = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-data-dir", str(tmp_path / "old"),
                                          "--to-data-dir", str(host / "data")])
        assert result.exit_code == 130, result.output
        made = [p for p in (host / "data").rglob("*") if p.name.startswith("records.db")]
        assert {p.name for p in made} >= {"records.db", "records.db.pictures-lock"}
        assert {p.stat().st_uid for p in made} == {SERVICE_UID}, [(p, p.stat().st_uid) for p in made]


def test_one_postgresql_database_spelt_two_ways_is_refused_as_its_own_destination(tmp_path, postgres_url):
    """By name instead of address, the host and port as libpq's parameters: the URLs differed, and the copy into
    itself skipped every row and said all was well, the refusal's whole point."""
    from sqlalchemy.engine import make_url

    u = make_url(postgres_url)
    _recorded(tmp_path / "a", [row(i) for i in range(3)])
    _copy("--from-data-dir", str(tmp_path / "a"), "--to-database-url", postgres_url)
    other = f"postgresql+psycopg://{u.username}@/{u.database}?host=localhost&port={u.port}"
    result = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-database-url", postgres_url,
                                      "--to-database-url", other])
    assert result.exit_code != 0 and "is the destination too" in result.output, result.output


def test_a_picture_whose_copy_a_replicas_sweep_took_is_copied_again(tmp_path, monkeypatch):
    """The copy carries its picture's time before it is linked in, so a replica's retention pass that sweeps
    temporary files (those an hour old are a crash's) took it in between, and the copy failed on the file gone."""
    from anomaly_service.records import copy as copying

    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    rows = _stored_rows(src, 3, datetime(2026, 3, 1, tzinfo=timezone.utc))
    src.add_many(rows)
    old = time.time() - 40 * 86400
    os.utime(src.files.path(rows[0].image_file), (old, old))
    dest = RecordStore.open(None, tmp_path / "new")
    link, swept = os.link, []

    def sweep_first(tmp, target, **folders):
        if not swept:
            swept.append(tmp)
            dest.files.clean_temporaries()  # a replica's pass, between the copy's two steps
        return link(tmp, target, **folders)

    monkeypatch.setattr(copying.os, "link", sweep_first)
    info = copy_records(src, dest)
    assert swept and not list((tmp_path / "new" / "files").rglob(".tmp-*")) and info.pictures == 1
    assert dest.files.path(rows[0].image_file).stat().st_mtime == pytest.approx(old)
    src.close()
    dest.close()


def test_a_copy_waits_out_a_retention_pass_that_holds_the_pictures_lock_past_its_wait(tmp_path, postgres_url,
                                                                                      monkeypatch):
    """A replica's retention pass holds the pictures' lock for a chunk of deletions, which on a slow share outlasts
    PostgreSQL's lock_timeout: the copy's insert failed on it and ended the whole copy, where the service's writer
    tries its batch again. Here the wait is shortened and the pass's turn outlasts it."""
    import threading

    import psycopg

    from anomaly_service.records import store as store_module
    from anomaly_service.records.store import PICTURES_LOCK

    monkeypatch.setattr(store_module, "LOCK_TIMEOUT_MS", 300)
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 9, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    dest = RecordStore.open(postgres_url, tmp_path / "shared")
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as retention:
        retention.execute("SELECT pg_advisory_lock(%s)", (PICTURES_LOCK,))
        done = threading.Timer(1.0, retention.execute, ("SELECT pg_advisory_unlock(%s)", (PICTURES_LOCK,)))
        done.start()
        try:
            info = copy_records(src, dest)
        finally:
            done.join()
    assert (info.inspections, info.pictures) == (9, 3) and dest.count() == 9
    src.close()
    dest.close()


def test_a_photo_two_hosts_recorded_is_aged_by_its_newest_record(tmp_path):
    """Pictures are content-addressed: the same photo from two hosts is one file. Copied second, the host that recorded
    it yesterday found it there at the other host's two-month-old time, and the first retention pass removed it from
    yesterday's record too; a service storing a photo again touches it to its newest record's time."""
    now = time.time()
    dest = RecordStore.open(None, tmp_path / "one")
    for host, days in (("a", 60), ("b", 1)):
        src = RecordStore.open(None, tmp_path / host)
        src.upgrade()
        r = row(0, at=datetime.now(timezone.utc) - timedelta(days=days), station=host)
        r.image_file, r.files_state = src.files.put(b"a blank frame", "png"), FILES_STORED
        os.utime(src.files.path(r.image_file), (now - days * 86400,) * 2)
        src.add_many([r])
        copy_records(src, dest)
        src.close()
    assert dest.apply_retention(30, None)["expired"] == 0
    assert {r.station: r.files_state for r in dest.iter_all()} == {"a": FILES_STORED, "b": FILES_STORED}
    dest.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root follows another user's link into where they cannot write")
def test_a_copy_run_as_root_writes_no_picture_through_a_link_the_services_user_put_in(tmp_path, monkeypatch):
    """The picture folders are the service's user's: one swapped for a link between the copy's look and its write
    (here, right after it made the folder) had root write a picture, given to that user, into the folder the link
    names, one that user may not write."""
    from anomaly_service.records import copy as copying

    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 1, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    src.close()
    made = copying.make_owned_dir

    with _host("data") as host:
        elsewhere = host / "root-only"
        elsewhere.mkdir()

        def swapped(path):
            made(path)
            if path.parent.name == "files":
                path.rmdir()
                path.symlink_to(elsewhere)

        monkeypatch.setattr(copying, "make_owned_dir", swapped)
        result = CliRunner().invoke(cli, ["db", "copy", "-q", "--from-data-dir", str(tmp_path / "old"),
                                          "--to-data-dir", str(host / "data")])
        assert [(p.name, p.stat().st_uid) for p in elsewhere.iterdir()] == []
        assert result.exit_code != 0 and "is a link" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_a_copy_run_as_root_and_stopped_with_sigterm_stops_as_ctrl_c_does(tmp_path):
    """A copy run under `timeout`, or as a job its supervisor stops, gets SIGTERM: it died at once, leaving the SQLite
    database it made root's: the service recorded nothing there."""
    import signal
    import subprocess
    import sys

    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 3000, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    src.close()
    with _host("data") as host:
        data = host / "data"
        copying = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "db", "copy", "-q",
                                    "--from-data-dir", str(tmp_path / "old"), "--to-data-dir", str(data)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not any((data / "files").rglob("*.png")) and copying.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        copying.send_signal(signal.SIGTERM)
        out, _ = copying.communicate(timeout=60)
        assert copying.returncode == 130 and "interrupted" in out, out
        made = [p for p in data.iterdir() if p.name.startswith("records.db")]
        assert {p.stat().st_uid for p in made} == {SERVICE_UID}, [(p, p.stat().st_uid) for p in made]


def test_a_picture_volume_without_hard_links_takes_the_copy_by_rename(tmp_path, monkeypatch):
    """Some network shares refuse a hard link: the picture is renamed in instead, with its time, and a file of that
    key already there is still never replaced."""
    from anomaly_service.records import copy as copying

    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    rows = _stored_rows(src, 6, datetime(2026, 3, 1, tzinfo=timezone.utc))
    src.add_many(rows)
    dest = RecordStore.open(None, tmp_path / "share")
    kept = dest.files.put(b"photo 3", "png")  # the same photo, stored by the destination's service already
    os.utime(dest.files.path(kept), (1e9, 2e9))

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(copying.os, "link", no_links)
    info = copy_records(src, dest)
    assert (info.pictures, info.pictures_there) == (1, 1)
    copied = dest.files.path(rows[0].image_file)
    assert copied.stat().st_mtime_ns == src.files.path(rows[0].image_file).stat().st_mtime_ns
    assert dest.files.path(kept).stat().st_mtime == 2e9 and not list((tmp_path / "share").rglob(".tmp-*"))
    src.close()
    dest.close()


def test_reviews_made_at_the_source_after_their_inspection_was_copied_are_named_not_passed_over(tmp_path,
                                                                                                 postgres_url):
    """The old host's service left running through the move: an operator marked a copied part a defect there, and
    the copy run again to finish said all was there (exit 0) while the replicas never saw the review, which is
    what guards an update against that defect."""
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    rows = _stored_rows(src, 6, datetime(2026, 3, 1, tzinfo=timezone.utc))
    src.add_many(rows)
    src.review(rows[0].id, "good", "ann")
    src.close()
    args = ["--from-data-dir", str(tmp_path / "old"), "--to-database-url", postgres_url]
    assert "6 inspections copied with 1 reviews" in _copy(*args)
    again = _copy(*args)  # copied before either review below: nothing left behind yet
    assert "warning" not in again
    src = RecordStore.open(None, tmp_path / "old")
    src.review(rows[0].id, "defect", "bob")  # after the copy, on the old host
    src.review(rows[3].id, "defect", "bob")
    src.close()
    left = CliRunner().invoke(cli, ["db", "copy", "-q", *args])
    assert left.exit_code == 1, left.output
    assert "0 inspections copied with 0 reviews, 6 already there" in left.output
    assert (f"error: 2 reviews at the source are not in the destination (made after their inspection was copied; "
            f"a copy adds no review to an inspection already there): {rows[0].id}, {rows[3].id}") in left.output
    # and back: every review the replicas hold is the old host's own, each known as its copy (no false alarm)
    back = _copy("--from-database-url", postgres_url, "--to-data-dir", str(tmp_path / "old"))
    assert "0 inspections copied with 0 reviews, 6 already there" in back and "error" not in back


def test_a_destination_at_an_older_schema_is_upgraded_and_said_so(tmp_path):
    """The replicas run the release before; the copy, run with this one, upgraded their database unsaid, and the
    replicas' next start refused it. Said; and one at this release's schema, or made new, says nothing."""
    src = RecordStore.open(None, tmp_path / "old")
    src.upgrade()
    src.add_many(_stored_rows(src, 3, datetime(2026, 3, 1, tzinfo=timezone.utc)))
    head = src.current_revision()
    src.close()
    older = RecordStore.open(None, tmp_path / "replicas")
    older.upgrade("0010")
    older.close()
    out = _copy("--from-data-dir", str(tmp_path / "old"), "--to-data-dir", str(tmp_path / "replicas"))
    assert (f"note: the destination's records database was upgraded from schema revision 0010 to {head} (this "
            "release's): a service of an older release refuses it from its next start") in out
    assert "3 inspections copied" in out
    again = _copy("--from-data-dir", str(tmp_path / "old"), "--to-data-dir", str(tmp_path / "replicas"))
    new = _copy("--from-data-dir", str(tmp_path / "old"), "--to-data-dir", str(tmp_path / "new"))
    assert "upgraded" not in again and "upgraded" not in new
