"""The records store on SQLite and on a real PostgreSQL server: migrations, writes, queries, reviews, retention,
and the background recorder when the database goes away."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import threading
import os
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from anomaly_service.cli import app as cli
from anomaly_service.records import (FILES_EXPIRED, FILES_FAILED, FILES_NOT_KEPT, FILES_REMOVED, FILES_STORED, Filters,
                                     Inspection, PartContext, PendingRecord, Recorder, RecordStore, new_id)
from anomaly_service.records.models import Review
from anomaly_service.records.store import SchemaError, database_url, inspection_dict
from anomaly_service.spellings import unicode_forms
from conftest import allow_connections, png_bytes, textured_part

import numpy as np


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> RecordStore:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    s = RecordStore.open(url, tmp_path / "data")
    yield s
    s.close()


def row(i: int = 0, *, at: datetime | None = None, **kw) -> Inspection:
    at = at or datetime.now(timezone.utc)
    base = dict(id=new_id(int(at.timestamp() * 1000)), created_at=at, model="part", model_version="v1",
                score=1.0 + i, normalized_score=0.5 + i / 10, threshold=2.0, decision="normal", regions=[],
                image_width=8, image_height=8, image_bytes=10, image_sha256="0" * 64, timing_ms={"total": 1.0},
                part_id=f"P{i}", line="L1", station=None, meta={"i": i}, source="api", image_file=None,
                heatmap_file=None, files_state=FILES_NOT_KEPT)
    base.update(kw)
    return Inspection(**base)


# a fused decision's opinions as a result gives them: the branch flagged the layout, the kNN saw normal patches
OPINIONS = {"knn": {"score": 1.8, "normalized_score": 0.9, "threshold": 2.0, "is_anomaly": False, "reads": "patches"},
            "autoencoder": {"score": 0.3, "normalized_score": 2.5, "threshold": 0.12, "is_anomaly": True,
                            "reads": "layout"}}


def pending(data: bytes, anomaly: bool = True, level: float = 1.2, scorers: dict | None = None,
            **ctx) -> PendingRecord:
    return PendingRecord(data=data, model="part", model_version="v1", score=3.0, normalized_score=1.5 if anomaly
                         else 0.4, threshold=2.0, is_anomaly=anomaly, regions=[], image_width=16, image_height=16,
                         timing_ms={"total": 2.0}, context=PartContext(**ctx), scorers=scorers,
                         normalized_map=lambda: np.full((16, 16), level, np.float32))


def test_migrations_upgrade_a_database_made_by_the_first_schema(store):
    assert store.upgrade("0001") == (None, "0001")
    with store.engine.begin() as conn:  # a row as the first release wrote it
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, source, "
            "files_state) VALUES ('old-1', :t, 'part', 'v0', 1.5, 0.7, 2.0, 'normal', '[]', 4, 4, 9, :h, '{}', "
            "'api', 'not_kept')"), {"t": datetime(2024, 5, 1, tzinfo=timezone.utc), "h": "a" * 64})
    assert store.upgrade() == ("0001", store.head_revision())
    kept = store.get("old-1")
    assert kept is not None and kept.model_version == "v0" and kept.verdict is None and kept.reviews == []
    assert kept.created_at == datetime(2024, 5, 1, tzinfo=timezone.utc)
    store.review("old-1", "good", "qa")  # the new revision's table works on the old row
    assert store.get("old-1").verdict == "good"
    assert store.upgrade() == (store.head_revision(), store.head_revision())  # idempotent, nothing recreated


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_upgrade_says_once_what_it_changed_and_never_the_password(database, request, tmp_path, caplog):
    """The log line an operator reads after a start or `anomaly db upgrade` (or a downgrade): the schema before and
    after, once, under the URL without its password (PostgreSQL's trust login here takes any); a start on an
    up-to-date database, or a downgrade run again, says nothing."""
    url = None
    if database == "postgresql":
        url = request.getfixturevalue("postgres_url").replace("postgres@", "postgres:s3cret-pw@")
    store = RecordStore.open(url, tmp_path / "data")
    shown = store.url if url is None else url.replace("s3cret-pw", "***")
    try:
        with caplog.at_level(logging.INFO, logger="anomaly_service.records.store"):
            caplog.clear()
            store.upgrade("0005")
            store.upgrade()
            store.upgrade()
            assert store.downgrade("0008") == (store.head_revision(), "0008")
            assert store.downgrade("0008") == ("0008", "0008")
        said = [r.getMessage() for r in caplog.records if "graded from schema" in r.getMessage()]
        assert said == [f"records database {shown} upgraded from schema empty to 0005",
                        f"records database {shown} upgraded from schema 0005 to {store.head_revision()}",
                        f"records database {shown} downgraded from schema {store.head_revision()} to 0008"], said
        assert "s3cret" not in caplog.text
    finally:
        store.close()


def test_a_database_of_the_previous_schema_upgrades_to_keep_request_ids(store):
    """Revision 0007 adds each record's X-Request-ID and each opinion of a fused decision (scorers): records made
    before it have neither (null), nothing is rewritten, and a downgrade says what it loses."""
    store.upgrade("0006")
    old = row(1)
    with store.engine.begin() as conn:  # a row as the previous release wrote it
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, source, "
            "files_state) VALUES (:i, :t, 'part', 'v1', 1.5, 0.7, 2.0, 'normal', '[]', 4, 4, 9, :h, '{}', 'SN-1', "
            "'api', 'not_kept')"), {"i": old.id, "t": datetime(2026, 9, 1, tzinfo=timezone.utc), "h": "a" * 64})
    assert store.upgrade() == ("0006", store.head_revision())
    kept = store.get(old.id)
    assert kept.part_id == "SN-1" and kept.request_id is None and kept.scorers is None
    assert inspection_dict(kept)["scorers"] is None
    store.add_many([row(2, request_id="MES-4711", scorers=OPINIONS)])
    assert [r.part_id for r in store.query(Filters(request_id="MES-4711"))] == ["P2"]
    assert inspection_dict(store.query(Filters(part_id="P2"))[0])["scorers"] == OPINIONS
    assert ("0007", "each record's X-Request-ID (the client's id of the call that scored it) and, of a model with a "
            "second opinion, each opinion's score and threshold (scorers)") in store.downgrade_plan("0006")


def test_a_database_at_revision_0007_upgrades_to_keep_how_each_part_was_scored(store):
    """Revision 0008 keeps how each part was scored on the machine that scored it: the runtime, the kNN search, the
    device and the pass's threads (under --runtime torch a score moves with the threads, and torch's differs from
    ONNX Runtime's), which a record did not say, so a re-score that decided otherwise could not be told from a model
    that changed. A database at 0007 holding rows, made by the real migrations, upgrades in place: the old rows keep
    every value and read (as the API gives them too) with the four null; every new record has them, as the result
    gave them, in the list and the export; a downgrade to 0007 says what it loses and keeps every row."""
    import csv
    import dataclasses
    import io

    from anomaly_service.api.schemas import InspectionOut
    from anomaly_service.decision import ScoredWith

    assert store.upgrade("0007") == (None, "0007")
    t = datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
    old = [new_id(int(t.timestamp() * 1000) + i) for i in range(2)]
    insert = sa.text(  # as the release at 0007 wrote its rows: the second of a fused model, through the service
        "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, decision, "
        "regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, meta, warnings, source, "
        "request_id, scorers, files_state, view_token) VALUES (:i, :t, 'part', 'v7', 1.5, 0.7, 2.0, 'normal', :r, 4, "
        "4, 9, :h, :ms, :p, :m, :w, 'api', :q, :s, 'not_kept', 'tok')").bindparams(
        *(sa.bindparam(name, type_=sa.JSON) for name in ("r", "ms", "m", "w", "s")))
    with store.engine.begin() as conn:
        for n, (i, scorers) in enumerate(zip(old, (None, OPINIONS))):
            conn.execute(insert, {"i": i, "t": t + timedelta(seconds=n), "r": [], "h": "a" * 64,
                                  "ms": {"total": 2.5}, "p": f"SN-{n}", "m": {"lot": n}, "w": ["far"],
                                  "q": f"MES-{n}", "s": scorers})
    before = _rows(store)
    assert store.upgrade("0008") == ("0007", "0008")
    unknown = {"runtime": None, "knn_search": None, "device": None, "threads": None}
    assert _rows(store) == {i: {**r, **unknown} for i, r in before.items()}  # every value as it was
    store.upgrade()  # and this release's later revisions, which it reads and records with
    for n, i in enumerate(old):  # and read as ever, in the API's shape too
        got = inspection_dict(store.get(i))
        assert got["part_id"] == f"SN-{n}" and got["request_id"] == f"MES-{n}" and got["meta"] == {"lot": n}
        assert got["scorers"] == (None, OPINIONS)[n] and got["warnings"] == ["far"]
        assert {k: got[k] for k in unknown} == unknown and InspectionOut.from_record(got).runtime is None

    here = ScoredWith(runtime="torch", knn_search="exact, fp32", device="cpu", threads=1)
    rec = Recorder(store, "none")
    rec.start()
    new, unsaid = dataclasses.replace(pending(b"new", part_id="SN-new"), scored_with=here), pending(b"unsaid")
    assert rec.submit(new) and rec.submit(unsaid)
    rec.stop()
    assert rec.written == 2, rec.dropped
    listed = {r.id: inspection_dict(r) for r in store.query(Filters(), 10)}
    assert set(listed) == {*old, new.id, unsaid.id}
    scored = {"runtime": "torch", "knn_search": "exact, fp32", "device": "cpu", "threads": 1}
    assert {k: listed[new.id][k] for k in scored} == scored and {k: listed[unsaid.id][k] for k in unknown} == unknown
    assert InspectionOut.from_record(listed[new.id]).model_dump(include=set(scored)) == scored

    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    exported = CliRunner().invoke(cli, ["records", "export", *where, "--format", "csv"])
    assert exported.exit_code == 0, exported.output
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(exported.stdout))}
    assert {k: rows[new.id][k] for k in scored} == {k: str(v) for k, v in scored.items()}
    assert all(rows[i][k] == "" for i in old for k in unknown)  # empty where null, as every null cell
    exported = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl"])
    lines = {x["id"]: x for x in map(json.loads, exported.stdout.splitlines())}
    assert {k: lines[new.id][k] for k in scored} == scored and all(lines[i]["threads"] is None for i in old)

    assert ("0008", "how each record was scored (the runtime, the kNN search, the device and the threads)") in \
        store.downgrade_plan("0007")
    assert store.downgrade("0007") == (store.head_revision(), "0007")
    assert not set(unknown) & set(_columns(store, "inspections"))
    with store.engine.connect() as conn:
        kept = dict(conn.execute(sa.text("SELECT id, part_id FROM inspections")).all())
    assert kept == {old[0]: "SN-0", old[1]: "SN-1", new.id: "SN-new", unsaid.id: None}
    assert {i: r for i, r in _rows(store).items() if i in old} == before
    assert store.upgrade() == ("0007", store.head_revision())
    assert {k: inspection_dict(store.get(new.id))[k] for k in unknown} == unknown  # lost, as the downgrade said


def test_a_database_at_revision_0009_upgrades_to_keep_each_parts_place_on_the_map(store):
    """Revision 0010 keeps the part's place on its version's image map (the answer's ``embedding``), which the queue
    and History draw a reviewed part by: the records kept none, so a part reviewed from its record was never drawn.
    A database at 0009 holding rows, made by the real migrations, upgrades in place: every old value stays and the
    old rows read (in the API's shape too) with no place; a new record keeps the place it was given, in the list and
    the export; a downgrade to 0009 says what it loses and keeps every row."""
    import csv
    import dataclasses
    import io

    from anomaly_service.api.schemas import InspectionOut
    from anomaly_service.evidence import MapPoint

    assert store.upgrade("0009") == (None, "0009")
    t = datetime(2026, 12, 5, 8, tzinfo=timezone.utc)
    old = new_id(int(t.timestamp() * 1000))
    with store.engine.begin() as conn:  # as the release at 0009 wrote a row
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, source, "
            "runtime, threads, files_state, view_token) VALUES (:i, :t, 'part', 'v9', 1.5, 0.7, 2.0, 'normal', '[]', "
            "4, 4, 9, :h, '{}', 'SN-old', 'api', 'onnx', 2, 'not_kept', 'tok')"),
            {"i": old, "t": t, "h": "a" * 64})
    before = _rows(store)
    assert store.upgrade("0010") == ("0009", "0010")
    place = ("embedding_x", "embedding_y")
    assert _rows(store) == {i: {**r, **dict.fromkeys(place)} for i, r in before.items()}  # nothing rewritten
    store.upgrade()
    got = inspection_dict(store.get(old))
    assert got["part_id"] == "SN-old" and got["runtime"] == "onnx" and got["threads"] == 2
    assert InspectionOut.from_record(got).embedding is None

    rec = Recorder(store, "none")
    rec.start()
    # a place as the answer gives it: float32 coordinates made floats; a place that is not finite is none
    here = MapPoint(float(np.float32(3.4)), float(np.float32(-1.2)))
    new = dataclasses.replace(pending(b"new", part_id="SN-new"), embedding=here)
    lost = dataclasses.replace(pending(b"lost", part_id="SN-nan"), embedding=MapPoint(float("nan"), 1.0))
    assert rec.submit(new) and rec.submit(lost) and rec.submit(pending(b"none", part_id="SN-none"))
    rec.stop()
    assert rec.written == 3, rec.dropped
    listed = {r.part_id: inspection_dict(r) for r in store.query(Filters(), 10)}
    assert (listed["SN-new"]["embedding_x"], listed["SN-new"]["embedding_y"]) == (here.x, here.y)  # exactly
    assert InspectionOut.from_record(listed["SN-new"]).model_dump()["embedding"] == {"x": here.x, "y": here.y}
    for part in ("SN-nan", "SN-none", "SN-old"):
        assert [listed[part][k] for k in place] == [None, None]
        assert InspectionOut.from_record(listed[part]).embedding is None

    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    exported = CliRunner().invoke(cli, ["records", "export", *where, "--format", "csv"])
    assert exported.exit_code == 0, exported.output
    rows = {r["part_id"]: r for r in csv.DictReader(io.StringIO(exported.stdout))}
    assert [float(rows["SN-new"][k]) for k in place] == [here.x, here.y]
    assert [rows["SN-old"][k] for k in place] == ["", ""]
    exported = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl"])
    lines = {x["part_id"]: x for x in map(json.loads, exported.stdout.splitlines())}
    assert [lines["SN-new"][k] for k in place] == [here.x, here.y] and lines["SN-old"]["embedding_x"] is None

    assert ("0010", "each record's place on its model's image map (embedding_x, embedding_y)") in \
        store.downgrade_plan("0009")
    assert store.downgrade("0009") == (store.head_revision(), "0009")
    assert not set(place) & set(_columns(store, "inspections"))
    with store.engine.connect() as conn:
        kept = dict(conn.execute(sa.text("SELECT part_id, runtime FROM inspections")).all())
    assert kept == {"SN-old": "onnx", "SN-new": None, "SN-nan": None, "SN-none": None}
    assert store.upgrade() == ("0009", store.head_revision())
    assert inspection_dict(store.get(new.id))["embedding_x"] is None  # lost, as the downgrade said


def test_a_database_at_revision_0010_upgrades_to_keep_each_kept_photos_pixel_digest(store):
    """Revision 0011 keeps the digest of a kept photo's decoded pixels, as a model keeps its training images': the
    queue's teaching tells by it a part whose photo is one of the model's own images in another file. A database at
    0010 holding a row upgrades in place (nothing rewritten, no digest for the old row); the writer hashes the photo
    it is handed where the picture is kept, off the request path, and lets go of it; a downgrade says what it loses
    and keeps every row."""
    from anomaly_service.training_set import pixel_digest

    assert store.upgrade("0010") == (None, "0010")
    t = datetime(2026, 12, 6, 8, tzinfo=timezone.utc)
    old = new_id(int(t.timestamp() * 1000))
    with store.engine.begin() as conn:  # as the release at 0010 wrote a row
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, source, "
            "files_state, view_token) VALUES (:i, :t, 'part', 'v10', 1.5, 0.7, 2.0, 'anomaly', '[]', 4, 4, 9, :h, "
            "'{}', 'SN-old', 'api', 'stored', 'tok')"), {"i": old, "t": t, "h": "a" * 64})
    before = _rows(store)
    assert store.upgrade() == ("0010", "0011")
    assert _rows(store) == {i: {**r, "pixels_sha256": None} for i, r in before.items()}  # nothing rewritten

    photo = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)[..., ::-1]  # a view, as a
    # photo turned by its EXIF tag is
    kept = pending(b"kept", part_id="SN-kept")
    kept.pixels = photo
    with_photo = kept.nbytes
    rec = Recorder(store, "none")
    rec.start()
    assert rec.submit(kept) and rec.submit(pending(b"not-kept", part_id="SN-none"))
    rec.stop()
    assert rec.written == 2, rec.dropped
    assert with_photo - kept.nbytes == photo.nbytes and kept.pixels is None  # counted while buffered, then let go
    got = {r.part_id: r.pixels_sha256 for r in store.query(Filters(), 10)}
    assert got == {"SN-kept": pixel_digest(photo), "SN-none": None, "SN-old": None}
    assert ("0011", "each record's digest of its photo's decoded pixels (pixels_sha256)") in \
        store.downgrade_plan("0010")
    assert store.downgrade("0010") == ("0011", "0010")
    assert "pixels_sha256" not in _columns(store, "inspections") and len(_rows(store)) == 3


def test_the_recorder_writes_each_opinion_as_the_result_gives_it(store):
    """Each opinion of a fused result is kept as plain JSON, its score, normalized score, threshold, decision and
    what it reads, whatever types the scorer gave (a NumPy float, which JSON cannot write, failed the whole batch);
    a result of one opinion keeps none (its score and threshold are the record's own)."""
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    given = {name: {**s, "score": np.float32(s["score"]), "is_anomaly": np.bool_(s["is_anomaly"])}
             for name, s in OPINIONS.items()}
    fused, alone = pending(b"fused", scorers=given), pending(b"alone")
    assert rec.submit(fused) and rec.submit(alone)
    rec.stop()
    assert rec.written == 2, rec.dropped
    kept = inspection_dict(store.get(fused.id))["scorers"]
    assert kept == {name: {**s, "score": pytest.approx(s["score"])} for name, s in OPINIONS.items()}
    assert all(type(v) in (float, bool, str) for s in kept.values() for v in s.values())
    assert store.get(alone.id).scorers is None

def test_the_tables_match_the_migrations(tmp_path):
    """The ORM classes (used for queries) and the Alembic scripts (which make the schema) describe one schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from anomaly_service.records.models import Base

    s = RecordStore.open(None, tmp_path)
    s.upgrade()
    with s.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_a_database_from_a_newer_release_is_left_alone(tmp_path):

    s = RecordStore.open(None, tmp_path)
    s.upgrade()
    with s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="9999"):
        s.upgrade()
    with s.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "9999"


def test_another_applications_alembic_database_is_not_called_a_newer_releases(store, tmp_path):
    """A database another application manages with Alembic (its revision, its tables, none of ours) was refused as
    one "made by a newer release" of anomaly: operators looked for a release that does not exist. Ours at a
    revision this release does not know still says so, with the way back. Its tables are named as other lists of
    names are (training_set.listing): the first few and how many more."""
    others = ["users", *(f"v{i}" for i in range(6))]
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('3f2a9c1b7d4e')"))
        for table in others:
            conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)"))
    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    run = CliRunner().invoke
    for args in (["db", "upgrade"], ["records", "export"], ["db", "downgrade", "--to", "0001", "--yes"]):
        r = run(cli, [*args, *where])
        assert r.exit_code != 0 and "not an inspection records database" in r.output and "users" in r.output \
            and "3f2a9c1b7d4e" in r.output and "newer release" not in r.output, (args, r.output)
        assert "(tables: users; v0; v1; v2; v3; and 2 more)" in " ".join(r.output.split()), r.output
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version", *others}  # left untouched
    ours = RecordStore.open(None, tmp_path / "ours")
    ours.upgrade()
    with ours.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    for args in (["db", "upgrade"], ["records", "export"], ["db", "downgrade", "--to", "0001", "--yes"]):
        r = run(cli, [*args, "--data-dir", str(tmp_path / "ours")])
        assert r.exit_code != 0 and "made by a newer release of anomaly" in r.output, (args, r.output)
    ours.close()


@pytest.mark.parametrize("revision", ["0001", "0006", "0007"])
def test_another_applications_database_numbered_as_ours_is_refused_untouched(store, revision):
    """Another application whose Alembic revisions are numbered as ours (0001, 0002, ...) was taken for our database
    at that revision: the upgrade ran our migrations on it, which made their tables there (reviews, at 0001) and
    then failed with 'no such table: inspections'; an export failed so, and a downgrade ran ours backwards."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    for args in (["db", "upgrade"], ["records", "export"], ["db", "downgrade", "--to", "0001", "--yes"]):
        r = CliRunner().invoke(cli, [*args, *where])
        assert r.exit_code != 0 and "not an inspection records database" in r.output and "users" in r.output \
            and f"revision {revision}" in r.output, (args, r.output)
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version", "users"}  # left untouched
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == revision
    with pytest.raises(SchemaError, match="not an inspection records database"):  # a service's start says so too
        store.upgrade()


def test_a_database_holding_our_tables_without_a_revision_is_refused_untouched(store, tmp_path):
    """A database with no Alembic revision was taken for an empty one whatever it held: with another application's
    ``inspections`` table, or this product's records copied without their version table, the first migration
    failed with "table inspections already exists" and left an empty version table in it."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE inspections (id INTEGER PRIMARY KEY, what TEXT)"))
    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    for args in (["db", "upgrade"], ["records", "export"]):
        r = CliRunner().invoke(cli, [*args, *where])
        assert r.exit_code != 0 and "no schema revision" in r.output and "another application" in r.output \
            and "already exists" not in r.output, (args, r.output)
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"inspections"}  # left untouched
    with pytest.raises(SchemaError, match="no schema revision"):  # a service's start says so too
        store.upgrade()
    ours = RecordStore.open(None, tmp_path / "ours")
    ours.upgrade()
    with ours.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
    r = CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(tmp_path / "ours")])
    assert r.exit_code != 0 and "this product's inspection records" in r.output, r.output
    ours.close()
    empty_but_others = RecordStore.open(None, tmp_path / "shared")  # a database with unrelated tables is ours to use
    with empty_but_others.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))
    assert empty_but_others.upgrade()[1] == empty_but_others.head_revision()
    empty_but_others.close()


def test_a_database_holding_a_view_named_as_our_table_is_refused_untouched(store):
    """Another application's view named ``inspections`` is no table, and the check looked at tables only: the
    first migration failed with a raw "view inspections already exists" (SQLite; PostgreSQL's "relation ... already
    exists") and, on SQLite, left an empty version table in that application's database."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE parts (id INTEGER PRIMARY KEY, what TEXT)"))
        conn.execute(sa.text("CREATE VIEW inspections AS SELECT id, what FROM parts"))
    where = ["--database-url", store.url] if store.dialect == "postgresql" else ["--data-dir", str(store.data_dir)]
    r = CliRunner().invoke(cli, ["db", "upgrade", *where])
    assert r.exit_code != 0 and "no schema revision" in r.output and "another application" in r.output \
        and "already exists" not in r.output, r.output
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"parts"}  # no version table left behind


def test_queries_filter_and_page_newest_first(store):
    store.upgrade()
    t0 = datetime(2025, 3, 1, 8, tzinfo=timezone.utc)
    rows = [row(i, at=t0 + timedelta(minutes=i), decision="anomaly" if i % 3 == 0 else "normal",
                line="L1" if i % 2 else "L2", model="part" if i < 20 else "other") for i in range(25)]
    assert store.add_many(rows) == 25
    seen, before = [], None
    while True:
        page = store.query(Filters(), limit=7, before_id=before)
        seen += [r.id for r in page]
        if len(page) < 7:
            break
        before = page[-1].id
    assert seen == [r.id for r in reversed(rows)]  # every record once, newest first
    assert {r.id for r in store.query(Filters(decision="anomaly", model="part"), 100)} == \
        {r.id for r in rows[:20] if r.decision == "anomaly"}
    assert [r.part_id for r in store.query(Filters(part_id="P4"))] == ["P4"]
    window = store.query(Filters(since=t0 + timedelta(minutes=5), until=t0 + timedelta(minutes=8)), 100)
    assert [r.part_id for r in window] == ["P7", "P6", "P5"]
    assert store.count(Filters(line="L2")) == 13
    stats = store.stats(Filters(since=t0), "hour")
    total = {(b["model"], b["line"]): b for b in stats["buckets"]}
    assert sum(b["count"] for b in stats["buckets"]) == 25 and not stats["truncated"]
    part_l2 = total[("part", "L2")]
    assert part_l2["anomaly"] == sum(1 for r in rows[:20] if r.line == "L2" and r.decision == "anomaly")
    assert part_l2["score_p50"] == pytest.approx(np.median([r.normalized_score for r in rows[:20] if r.line == "L2"]))


def test_a_record_written_late_lands_behind_what_a_client_read_and_an_overlap_finds_it(store):
    """docs/service.md: pages never repeat a record, but one written after its id's time (the writer's batch, a
    database outage) can land among ids a client has paged past; re-reading a few minutes back finds it."""
    store.upgrade()
    t0 = datetime.now(timezone.utc) - timedelta(minutes=1)
    first, late, last = (row(i, at=t0 + timedelta(seconds=i)) for i in (1, 2, 3))  # ids in scoring order
    store.add_many([first, last])
    read = [r.id for r in store.query(Filters(), limit=50)]
    store.add_many([late])  # scored between the two, written after the client read them
    assert store.query(Filters(), limit=50, before_id=read[-1]) == []  # paging on from the cursor: not there
    assert store.query(Filters(), limit=1)[0].id == read[0]  # nothing newer than the newest id it had
    assert [r.id for r in store.query(Filters(since=t0), limit=50) if r.id not in read] == [late.id]


def test_ids_keep_the_order_parts_were_scored_in_when_the_clock_steps_back(store, monkeypatch):
    """The id is the list's order and its cursor. After the wall clock steps back an hour, the ids this process makes,
    and those of a process started after the step, still sort after every recorded one: each record is paged once,
    newest first in the order the parts were scored, while created_at keeps the clock's time."""
    from anomaly_service.records import models

    def paged(limit: int = 2) -> list[str]:
        seen, before = [], None
        while page := store.query(Filters(), limit=limit, before_id=before):
            seen, before = seen + [r.id for r in page], page[-1].id
        return seen

    t0 = datetime(2025, 3, 1, 8, tzinfo=timezone.utc)
    back = t0 - timedelta(hours=1)
    monkeypatch.setattr(models, "_last_ms", 0)  # a process that has made no id yet
    store.upgrade()
    scored = [row(i, at=t0 + timedelta(seconds=i)) for i in range(3)]  # row(): an id from the clock's reading
    scored += [row(3 + i, at=back + timedelta(seconds=i)) for i in range(3)]  # the clock stepped back
    store.add_many(scored)
    assert paged() == [r.id for r in reversed(scored)]
    monkeypatch.setattr(models, "_last_ms", 0)  # a process started after the step, its clock still an hour back
    store.upgrade()  # its first contact with the database
    later = [row(6 + i, at=back + timedelta(seconds=10 + i)) for i in range(2)]
    store.add_many(later)
    scored += later
    assert paged() == [r.id for r in reversed(scored)]  # its parts at the top, not under the hour before the step
    newest = store.query(Filters(), limit=1)[0]
    assert newest.part_id == "P7" and newest.created_at == back + timedelta(seconds=11)
    assert [r.part_id for r in store.query(Filters(since=back, until=t0), limit=50)] == ["P7", "P6", "P5", "P4", "P3"]


@pytest.mark.parametrize("bucket", ["minute", "hour", "day"])
def test_stats_aggregated_by_the_database_match_numpy_per_bucket(store, bucket):
    """Counts, the backlog and numpy's linear quantiles per (UTC bucket, model, line), with lines left empty,
    groups of one and two, ties, and a window that cuts a bucket."""
    store.upgrade()
    rng = np.random.default_rng(7)
    t0 = datetime(2025, 3, 1, 22, 58, 30, tzinfo=timezone.utc)  # crosses a minute, an hour and a day
    rows = []
    for i in range(400):
        at = t0 + timedelta(seconds=float(rng.uniform(0, 3 * 3600)))
        ns = float(np.round(rng.gamma(2.0, 0.3), 2))  # rounded: ties
        rows.append(row(i, at=at, normalized_score=ns, decision="anomaly" if ns > 1 else "normal",
                        model=["a", "b"][i % 2], line=[None, "L1", "L2"][i % 3],
                        verdict="defect" if ns > 1 and i % 4 == 0 else None))
    rows.append(row(900, at=t0 + timedelta(hours=5), model="lone"))  # a group of one
    rows += [row(901 + j, at=t0 + timedelta(hours=6), model="pair", normalized_score=s) for j, s in enumerate([2, 1])]
    store.add_many(rows)
    since = t0 + timedelta(seconds=45)
    # timestamps from a UTC+2 client: the same instant
    got = store.stats(Filters(since=since.astimezone(timezone(timedelta(hours=2)))), bucket)
    step = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}[bucket]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    want: dict = {}
    for r in rows:
        if r.created_at >= since:
            want.setdefault((epoch + step * ((r.created_at - epoch) // step), r.model, r.line), []).append(r)
    assert [(b["start"], b["model"], b["line"]) for b in got["buckets"]] == \
        sorted(want, key=lambda k: (k[0], k[1], k[2] or ""))
    for b in got["buckets"]:
        members = want[(b["start"], b["model"], b["line"])]
        scores = [m.normalized_score for m in members]
        anomalies = sum(m.decision == "anomaly" for m in members)
        assert (b["count"], b["anomaly"], b["normal"]) == (len(members), anomalies, len(members) - anomalies)
        assert b["anomaly_rate"] == pytest.approx(anomalies / len(members))
        assert b["unreviewed_anomalies"] == sum(m.decision == "anomaly" and m.verdict is None for m in members)
        for name, q in (("score_p50", 0.5), ("score_p90", 0.9), ("score_p99", 0.99)):
            assert b[name] == pytest.approx(float(np.quantile(scores, q)), abs=1e-9), (b, name)
    assert store.stats(Filters(since=t0 + timedelta(days=30)), bucket)["buckets"] == []


def test_stats_count_a_line_recorded_in_two_unicode_spellings_as_one(store):
    """A line named by a station typed composed (NFC) and by a camera PC that sends it decomposed (NFD, a Mac's
    folder name) was two lines in the dashboard's stats that look the same. It is one, named composed, its quantiles
    still exact over both spellings' parts; the records keep their spelling."""
    import unicodedata

    store.upgrade()
    t0 = datetime(2025, 3, 1, 8, 10, tzinfo=timezone.utc)
    nfc, nfd = (unicodedata.normalize(form, "Prüflinie Süd") for form in ("NFC", "NFD"))
    assert nfc != nfd
    scores = {nfc: [0.2, 0.4, 1.5], nfd: [0.3, 2.5], "L2": [0.1]}
    rows = [row(10 * k + j, at=t0 + timedelta(seconds=10 * k + j), line=line, normalized_score=sc,
                decision="anomaly" if sc > 1 else "normal")
            for k, (line, values) in enumerate(scores.items()) for j, sc in enumerate(values)]
    store.add_many(rows)
    got = {b["line"]: b for b in store.stats(Filters(), "hour")["buckets"]}
    assert sorted(got) == sorted(["L2", nfc])
    both = scores[nfc] + scores[nfd]
    assert (got[nfc]["count"], got[nfc]["anomaly"]) == (5, 2)
    for name, q in (("score_p50", 0.5), ("score_p90", 0.9), ("score_p99", 0.99)):
        assert got[nfc][name] == pytest.approx(float(np.quantile(both, q)), abs=1e-9)
    assert got["L2"]["count"] == 1
    assert {r.line for r in store.query(Filters(), limit=50)} == {nfc, nfd, "L2"}  # kept as they came


# one name spelt four ways: composed, decomposed, mixed (a decomposed folder name with a composed suffix typed
# after it) and with U+212B ANGSTROM SIGN, which NFC replaces by U+00C5
SPELT = ("Pr\u00fcflinie \u00c5s", "Pru\u0308flinie A\u030as", "Pru\u0308flinie \u00c5s", "Pr\u00fcflinie \u212bs")


def test_a_name_is_found_in_every_spelling_the_records_hold(store):
    """A filter matched a name as typed, composed and decomposed, but the stats grouped a line also with its mixed
    spellings and those holding a character NFC replaces: the dashboard counted parts its list of that line did
    not show. Every spelling a record holds is now found, from whichever one is typed; the stats group them in one
    query; the records keep what came."""
    import unicodedata

    store.upgrade()
    nfc = SPELT[0]
    assert len({unicodedata.normalize("NFC", s) for s in SPELT}) == 1 and len(set(SPELT)) == 4
    assert not set(SPELT[2:]) & (unicode_forms(nfc) | unicode_forms(SPELT[1]))  # what the filter missed
    t0 = datetime(2025, 3, 1, 8, 10, tzinfo=timezone.utc)
    store.add_many([row(k, at=t0 + timedelta(seconds=k), line=spelt, station=spelt, part_id=spelt + f"-{k}",
                        normalized_score=0.1 * (k + 1)) for k, spelt in enumerate(SPELT)]
                   + [row(9, at=t0 + timedelta(seconds=9), line="L2", station="S2")])
    for typed in SPELT:
        for field in ("line", "station"):
            assert {r.line for r in store.query(Filters(**{field: typed}))} == set(SPELT), (typed, field)
            assert store.count(Filters(**{field: typed})) == 4
        assert [r.line for r in store.iter_all(Filters(line=typed))] == list(SPELT)
        assert [r.part_id for r in store.query(Filters(part_id=typed + "-3"))] == [SPELT[3] + "-3"]
    assert store.count(Filters(line="L2")) == 1
    got = {b["line"]: b["count"] for b in store.stats(Filters(), "hour")["buckets"]}
    assert got == {nfc: 4, "L2": 1}
    assert store.stats(Filters(line=SPELT[3]), "hour")["buckets"][0]["count"] == 4


def test_a_database_of_the_previous_schema_upgrades_to_find_every_spelling(store):
    """Revision 0009 keeps each name's composed spelling where it came spelt otherwise: the upgrade fills it for the
    records already there, so a filter finds their mixed spellings too; a downgrade says what it loses."""
    store.upgrade("0008")
    with store.engine.begin() as conn:  # rows as the previous release wrote them
        for k, spelt in enumerate(SPELT + ("L2",)):
            conn.execute(sa.text(
                "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
                "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, line, "
                "station, source, files_state) VALUES (:i, :t, 'part', 'v1', 1.5, 0.7, 2.0, 'normal', '[]', 4, 4, "
                "9, :h, '{}', :p, :l, :l, 'api', 'not_kept')"),
                {"i": f"old-{k}", "t": datetime(2026, 9, 1, 0, k, tzinfo=timezone.utc), "h": "a" * 64,
                 "p": f"{spelt}-{k}", "l": spelt})
    assert store.upgrade() == ("0008", store.head_revision())
    assert [r.line for r in store.iter_all(Filters(line=SPELT[0]))] == list(SPELT)
    assert [r.id for r in store.query(Filters(part_id=SPELT[1] + "-3"))] == ["old-3"]
    kept = store.get("old-2")
    assert (kept.line, kept.line_composed, kept.station_composed) == (SPELT[2], SPELT[0], SPELT[0])
    assert store.get("old-0").line_composed is None and store.get("old-4").part_id_composed is None
    assert {b["line"]: b["count"] for b in store.stats(Filters(), "day")["buckets"]} == {SPELT[0]: 4, "L2": 1}
    assert any(rev == "0009" and "composed spelling" in loses for rev, loses in store.downgrade_plan("0008"))


def test_the_upgrade_fills_many_names_composed_spellings_in_few_statements(store):
    """Part ids from a Mac's folders are decomposed, one per part: the 0009 upgrade filled each with a statement of
    its own, a round trip per part id (3.4 s for 20,000 on PostgreSQL, minutes for a million, every replica's start
    waiting on it). Many names go in one statement run now."""
    import unicodedata

    store.upgrade("0008")
    names = [unicodedata.normalize("NFD", f"Bild_\u00fc_{k}.png") for k in range(300)]
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, "
            "source, files_state) VALUES (:i, :t, 'part', 'v1', 1.5, 0.7, 2.0, 'normal', '[]', 4, 4, 9, :h, "
            "'{}', :p, 'api', 'not_kept')"),
            [{"i": f"old-{k:04d}", "t": datetime(2026, 9, 1, tzinfo=timezone.utc), "h": "a" * 64, "p": name}
             for k, name in enumerate(names)] + [{"i": "old-ascii", "t": datetime(2026, 9, 1, tzinfo=timezone.utc),
                                                   "h": "a" * 64, "p": "P-1"}])
    updates = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE INSPECTIONS"):
            updates.append(executemany)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert store.upgrade() == ("0008", store.head_revision())
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert len(updates) <= 3, len(updates)
    with store.engine.connect() as conn:  # every one of them, the first run's first name too
        filled = dict(conn.execute(sa.text("SELECT id, part_id_composed FROM inspections WHERE part_id_composed "
                                           "IS NOT NULL")).all())
    assert filled == {f"old-{k:04d}": unicodedata.normalize("NFC", name) for k, name in enumerate(names)}
    assert store.get("old-ascii").part_id_composed is None
    assert store.count(Filters(part_id=unicodedata.normalize("NFC", names[7]))) == 1


def test_stats_group_the_spellings_of_a_replica_that_ran_on_through_the_upgrade(store):
    """In a rolling update a replica of the previous release runs on after another has upgraded the database to
    0009, and its records lack the composed spellings the upgrade filled for the rows before it: the stats split
    their line in two (one line to that release's stats). They are one again, named composed."""
    store.upgrade()
    t0 = datetime(2026, 9, 1, 8, 0, tzinfo=timezone.utc)
    store.add_many([row(0, at=t0, line=SPELT[0]), row(1, at=t0 + timedelta(seconds=1), line=SPELT[2])])
    with store.engine.begin() as conn:  # as the previous release's writer inserts: the columns it knows
        for k, spelt in enumerate(SPELT[1:3], 2):
            conn.execute(sa.text(
                "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
                "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, line, "
                "source, files_state) VALUES (:i, :t, 'part', 'v1', 1.5, 0.7, 2.0, 'normal', '[]', 4, 4, 9, :h, "
                "'{}', :p, :l, 'api', 'not_kept')"),
                {"i": f"old-{k}", "t": t0 + timedelta(seconds=k), "h": "a" * 64, "p": f"P{k}", "l": spelt})
    assert store.get("old-2").line_composed is None
    assert {b["line"]: b["count"] for b in store.stats(Filters(), "hour")["buckets"]} == {SPELT[0]: 4}
    # found: the decomposed spelling as the filter spells it, the mixed one as a newer record with a key spells it
    assert store.count(Filters(line=SPELT[0])) == 4
    assert store.stats(Filters(line=SPELT[1]), "hour")["buckets"][0]["line"] == SPELT[0]


@pytest.mark.parametrize("bucket", ["minute", "hour", "day"])
@pytest.mark.parametrize("tz", ["Europe/Berlin", "Asia/Kolkata", "America/St_Johns"])
def test_stats_cut_in_a_plants_time_zone_follow_its_clock(store, bucket, tz):
    """Buckets were cut in UTC only: a plant in Kolkata saw its day from 05:30 to 05:30 and its hours at half past.
    In a zone, a day runs from local midnight to midnight (23 or 25 hours where the clocks change), an hour that
    daylight saving repeats is two buckets, and each start carries the offset of that moment; both databases
    alike."""
    from zoneinfo import ZoneInfo

    from anomaly_service.records.stats import Zone

    store.upgrade()
    zone = ZoneInfo(tz)
    rng = np.random.default_rng(3)
    # around Europe's autumn change (01:00 UTC on 2025-10-26) and over two local midnights
    t0 = datetime(2025, 10, 25, 18, 0, tzinfo=timezone.utc)
    span = timedelta(hours=2) if bucket == "minute" else timedelta(hours=36)
    if bucket == "minute":
        t0 = datetime(2025, 10, 26, 0, 10, tzinfo=timezone.utc)  # the repeated hour, minute by minute
    rows = [row(i, at=t0 + span * float(rng.uniform(0, 1)), model="m", line="L1") for i in range(300)]
    store.add_many(rows)
    got = store.stats(Filters(since=t0, until=t0 + span), bucket, Zone.over(zone, t0, t0 + span))
    want: dict[str, int] = {}
    for r in rows:
        local = r.created_at.astimezone(zone)
        if bucket == "day":
            start = datetime(local.year, local.month, local.day, tzinfo=zone)
        else:
            cut = dict(minute=local.minute) if bucket == "minute" else {}
            start = datetime(local.year, local.month, local.day, local.hour, **cut, tzinfo=local.tzinfo)
            start = start.replace(tzinfo=timezone(local.utcoffset()))
        want[start.isoformat()] = want.get(start.isoformat(), 0) + 1
    in_order = sorted(want.items(), key=lambda kv: datetime.fromisoformat(kv[0]))
    assert [(b["start"].isoformat(), b["count"]) for b in got["buckets"]] == in_order
    assert sum(want.values()) == len(rows)
    if tz == "Europe/Berlin" and bucket == "hour":  # 02:00 local twice, an hour apart
        assert "2025-10-26T02:00:00+02:00" in want and "2025-10-26T02:00:00+01:00" in want
    if tz == "Europe/Berlin" and bucket == "day":  # the day the clocks went back: 25 hours, one bucket
        assert "2025-10-26T00:00:00+02:00" in want


@pytest.mark.parametrize("bucket", ["minute", "hour", "day"])
def test_stats_in_a_zone_put_the_last_instant_of_a_bucket_in_it(store, bucket):
    """SQLite's datetime() rounds a time's fraction to the millisecond: a part scored in the last half millisecond
    of a local minute, hour or day was counted in the next one (at Lord Howe's half-hour change, in an hour that
    never was on its clock), where PostgreSQL counted it in its own."""
    from zoneinfo import ZoneInfo

    from anomaly_service.records.stats import Zone

    store.upgrade()
    zone = ZoneInfo("Australia/Lord_Howe")
    change = datetime(2024, 4, 6, 15, 0, tzinfo=timezone.utc)  # 02:00 +11:00 becomes 01:30 +10:30
    last = timedelta(microseconds=1)
    times = [change - last, datetime(2024, 4, 6, 16, 0, tzinfo=timezone.utc) - last * 400,
             datetime(2024, 4, 6, 13, 0, tzinfo=timezone.utc) - last]
    store.add_many([row(i, at=t, model="m", line="L1") for i, t in enumerate(times)])
    t0, t1 = change - timedelta(hours=3), change + timedelta(hours=3)
    got = store.stats(Filters(since=t0, until=t1), bucket, Zone.over(zone, t0, t1))["buckets"]
    want: dict[str, int] = {}
    for t in times:
        local = t.astimezone(zone)
        cut = {"minute": local.replace(second=0, microsecond=0),
               "hour": local.replace(minute=0, second=0, microsecond=0),
               "day": datetime(local.year, local.month, local.day, tzinfo=zone)}[bucket]
        start = cut.replace(tzinfo=timezone(local.utcoffset())) if bucket != "day" else cut
        want[start.isoformat()] = want.get(start.isoformat(), 0) + 1
    assert [(b["start"].isoformat(), b["count"]) for b in got] == sorted(
        want.items(), key=lambda kv: datetime.fromisoformat(kv[0]))


def test_a_day_whose_midnight_the_clocks_skipped_starts_at_its_first_wall_time(store):
    """Sao Paulo's 2018-11-04 began at 01:00 -02:00 (the clocks went from 23:59:59 to 01:00): its bucket was labelled
    00:00 -03:00, the right instant at a wall time the plant's clock never showed."""
    from zoneinfo import ZoneInfo

    from anomaly_service.records.stats import Zone

    store.upgrade()
    t0, t1 = datetime(2018, 11, 3, 12, tzinfo=timezone.utc), datetime(2018, 11, 5, 12, tzinfo=timezone.utc)
    store.add_many([row(i, at=datetime(2018, 11, 3 + i, 14, tzinfo=timezone.utc)) for i in range(2)])
    got = store.stats(Filters(since=t0, until=t1), "day", Zone.over(ZoneInfo("America/Sao_Paulo"), t0, t1))
    assert [b["start"].isoformat() for b in got["buckets"]] == ["2018-11-03T00:00:00-03:00",
                                                                 "2018-11-04T01:00:00-02:00"]


def test_stats_past_their_row_bound_count_the_newest_and_say_so(store, monkeypatch):
    from anomaly_service.records import store as store_module

    store.upgrade()
    t0 = datetime(2025, 3, 1, 8, tzinfo=timezone.utc)
    store.add_many([row(i, at=t0 + timedelta(minutes=i), model="a" if i % 2 else "b") for i in range(30)])
    monkeypatch.setattr(store_module, "STATS_MAX_ROWS", 12)
    got = store.stats(Filters(since=t0), "hour")
    assert got["truncated"] and sum(b["count"] for b in got["buckets"]) == 12
    newest = [0.5 + i / 10 for i in range(18, 30)]
    assert max(b["score_p99"] for b in got["buckets"]) <= max(newest) and \
        min(b["score_p50"] for b in got["buckets"]) >= min(newest)
    one = store.stats(Filters(since=t0, model="a"), "hour")  # 15 rows of a: still over the bound, its newest
    assert one["truncated"] and [b["count"] for b in one["buckets"]] == [12]
    assert not store.stats(Filters(since=t0 + timedelta(minutes=20)), "hour")["truncated"]
    exact = store.stats(Filters(since=t0 + timedelta(minutes=18)), "hour")  # as many rows as the bound: all of them
    assert not exact["truncated"] and sum(b["count"] for b in exact["buckets"]) == 12


def test_reviews_keep_their_history_and_feed_the_model_side(store):
    store.upgrade()
    rec = Recorder(store, "all")
    rec.start()
    photos = [png_bytes(textured_part(np.random.default_rng(i), 16, 16)) for i in range(3)]
    ids = [pending(p) for p in photos]
    for p in ids:
        assert rec.submit(p)
    rec.stop()
    a, b, c = (p.id for p in ids)
    store.review(a, "defect", "ann", "scratch")
    store.review(a, "good", "bob", "dust on the lens")
    store.review(b, "good", "ann")
    store.review(c, "defect", "ann")
    got = store.get(a)
    assert got.verdict == "good" and [(r.verdict, r.reviewer) for r in got.reviews] == [("defect", "ann"),
                                                                                         ("good", "bob")]
    good = store.reviewed_images("part", "good")
    assert [i for i, _ in good] == [a, b]
    for (iid, path), data in zip(good, photos):
        assert path.read_bytes() == data and hashlib.sha256(data).hexdigest() in path.name
    assert [i for i, _ in store.reviewed_images("part", "defect")] == [c]
    assert store.reviewed_images("other", "good") == []
    assert [r.id for r in store.query(Filters(verdict="unreviewed"))] == []
    with pytest.raises(KeyError):
        store.review("nope", "good", "ann")


def test_an_undo_puts_back_the_verdict_before_the_review_it_withdraws(store):
    """On both databases (the undo's verdict is null for a part unreviewed again, a column the first schema made
    NOT NULL): the verdict before the undone review comes back, the model side sees it, only the latest entry goes."""
    from anomaly_service.records import ReviewConflict, UndoRefused, UnknownReview

    store.upgrade()
    a, b = row(1), row(2)
    store.add_many([a, b])
    first = store.review(a.id, "good", "ann").reviews[-1]
    got = store.undo_review(a.id, first.id, "ann")
    assert got.verdict is None and got.reviewed_at is None
    assert [(r.verdict, r.undoes) for r in got.reviews] == [("good", None), (None, first.id)]
    assert [r.id for r in store.query(Filters(verdict="unreviewed"))] == [b.id, a.id]
    store.review(a.id, "defect", "ann")
    second = store.review(a.id, "good", "bob").reviews[-1]
    got = store.undo_review(a.id, second.id, "bob")
    assert got.verdict == "defect" and got.reviewed_at is not None and store.count(Filters(verdict="defect")) == 1
    with pytest.raises(UndoRefused):
        store.undo_review(a.id, got.reviews[-1].id, "bob")
    with pytest.raises(ReviewConflict):
        store.undo_review(a.id, second.id, "ann")  # bob's undo came in since: ann's is not his
    with pytest.raises(UnknownReview):
        store.undo_review(b.id, second.id, "bob")
    with pytest.raises(KeyError):
        store.undo_review("nope", second.id, "bob")


def test_an_export_reads_every_record_once_oldest_first_across_its_chunks(store):
    """An export reads the records in chunks (``iter_all``), each after the last id of the one before: every record
    once, oldest first, the filter kept in every chunk, and each one's reviews with it. Every export in the tests
    held fewer records than one chunk."""
    store.upgrade()
    t0 = datetime(2025, 3, 1, 8, tzinfo=timezone.utc)
    rows = [row(i, at=t0 + timedelta(minutes=i), model="part" if i % 3 else "other") for i in range(9)]
    store.add_many(rows)
    store.review(rows[4].id, "defect", "ann")
    for chunk in (1, 2, 3, 6, 7):
        got = list(store.iter_all(Filters(model="part"), chunk=chunk, reviews=True))
        assert [r.id for r in got] == [r.id for r in rows if r.model == "part"], chunk
        assert [[v.reviewer for v in r.reviews] for r in got] == [["ann"] if r.id == rows[4].id else [] for r in got]
    assert [r.id for r in store.iter_all(chunk=4)] == [r.id for r in rows]


def test_a_record_unreviewed_again_names_no_reviewer_and_an_old_one_no_warnings(store):
    """The export's and the API's dict of a record: a verdict withdrawn back to unreviewed is on record by no one
    (its trail keeps the undo and who made it), and a record from before warnings were kept (revision 0005: null)
    has none, not null."""
    store.upgrade()
    a, b = row(1), row(2, warnings=None)
    store.add_many([a, b])
    first = store.review(a.id, "defect", "ann").reviews[-1]
    store.undo_review(a.id, first.id, "bob")
    got = inspection_dict(store.get(a.id), reviews=True)
    assert got["verdict"] is None and got["reviewed_by"] is None
    assert [(e["reviewer"], e["undoes"]) for e in got["reviews"]] == [("ann", None), ("bob", first.id)]
    assert inspection_dict(store.get(b.id))["warnings"] == []
    store.review(a.id, "good", "carol")
    assert inspection_dict(store.get(a.id), reviews=True)["reviewed_by"] == "carol"


def test_the_model_sides_reads_refuse_an_unknown_verdict_and_a_store_without_pictures_has_none(tmp_path):
    """The reviewed photos an update learns from or guards with: a verdict that is neither ``defect`` nor ``good``
    is refused (not an empty answer that reads as no reviews), and a store that keeps no pictures (a database with
    no data directory) hands out none and counts every reviewed record as without its photo."""
    store = RecordStore.open(f"sqlite:///{tmp_path / 'r.db'}", None)
    try:
        store.upgrade()
        a, b = row(1, files_state=FILES_STORED, image_file="ab/x.png"), row(2)
        store.add_many([a, b])
        for rid in (a.id, b.id):
            store.review(rid, "good", "ann")
        for ask in (lambda: store.reviewed_images("part", "unreviewed"),
                    lambda: store.reviewed_without_photo("part", "unreviewed"),
                    lambda: store.reviewed_among("part", "Good", [a.id]),
                    lambda: store.reviewed_unlearnt("part", "unreviewed", None, ())):
            with pytest.raises(ValueError, match="defect, good"):
                ask()
        assert store.reviewed_images("part", "good") == []
        assert store.reviewed_without_photo("part", "good") == 2
        assert store.reviewed_unlearnt("part", "good", None, ()) == ([], 0, 0, 2, 0)
    finally:
        store.close()


def test_the_model_sides_reads_count_only_their_models_reviews_and_the_photos_here(store):
    """What an update learns from and what it cannot check: only the model's own records with that latest verdict,
    each stored photo found here (one the records say is stored that this data directory lacks is counted as
    without its photo, as are those never kept), never another model's, another verdict's or an unreviewed one."""
    store.upgrade()
    here = store.files.put(b"photo", "png")
    kw = {"files_state": FILES_STORED}
    rows = {"kept": row(1, image_file=here, **kw), "lost": row(2, image_file="ab/elsewhere.png", **kw),
            "unkept": row(3), "other": row(4, model="other", image_file=here, **kw),
            "other_unkept": row(5, model="other"), "defect": row(6, image_file=here, **kw), "unreviewed": row(7)}
    store.add_many(rows.values())
    for name, r in rows.items():
        if name != "unreviewed":
            store.review(r.id, "defect" if name == "defect" else "good", "ann")
    assert [i for i, _ in store.reviewed_images("part", "good")] == [rows["kept"].id]
    assert store.reviewed_without_photo("part", "good") == 2  # lost, unkept
    assert store.reviewed_without_photo("other", "good") == 1
    assert store.reviewed_without_photo("part", "defect") == 0
    assert store.reviewed_among("part", "good", [r.id for r in rows.values()]) == \
        [rows[n].id for n in ("kept", "lost", "unkept")]


def test_a_review_refuses_an_unknown_verdict_and_a_conflict_names_the_verdict_on_record(store):
    """A verdict that is neither ``defect`` nor ``good`` is refused and writes nothing (stored, the model side never
    counted it); a conflict names the verdict on record, which the operator's page shows them (unreviewed for
    none)."""
    from anomaly_service.records import ReviewConflict

    store.upgrade()
    a = row(1)
    store.add_many([a])
    for verdict in ("unreviewed", "Good", ""):
        with pytest.raises(ValueError, match="defect, good"):
            store.review(a.id, verdict, "ann")
    assert store.get(a.id).reviews == [] and store.get(a.id).verdict is None
    first = store.review(a.id, "defect", "ann").reviews[-1]
    with pytest.raises(ReviewConflict) as seen:
        store.review(a.id, "good", "bob", replaces="unreviewed")
    assert seen.value.current == "defect"
    with pytest.raises(ReviewConflict) as seen:
        store.review(a.id, "good", "bob", replaces="good")
    assert seen.value.current == "defect"
    store.undo_review(a.id, first.id, "ann")
    with pytest.raises(ReviewConflict) as seen:
        store.review(a.id, "good", "bob", replaces="defect")
    assert seen.value.current == "unreviewed"
    with pytest.raises(ReviewConflict) as seen:
        store.undo_review(a.id, first.id, "bob")  # ann's undo is the latest entry now
    assert seen.value.current == "unreviewed"
    second = store.review(a.id, "good", "bob").reviews[-1]
    store.review(a.id, "defect", "carol")
    with pytest.raises(ReviewConflict) as seen:
        store.undo_review(a.id, second.id, "bob")
    assert seen.value.current == "defect"


def test_the_false_alarms_count_each_reviewed_part_once_by_what_keeps_it_from_the_update(store):
    """``reviewed_unlearnt`` on SQLite and PostgreSQL, each rule on a part of its own: the flagged parts reviewed
    good, not learnt, with their photo here are listed oldest first (the first ``listed``, the rest counted as
    the records say); learnt by id, by the very bytes of a learnt one's photo, or by the decoded pixels of the
    model's own images; unlike the fit's photos (told each one's size and which warning beginnings it carries); or
    without a photo here (never kept, kept elsewhere, removed). Another model's, another decision's, another
    verdict's are none of these."""
    store.upgrade()
    here = [store.files.put(f"photo {i}".encode(), "png") for i in range(4)]
    stored = {"files_state": FILES_STORED}
    parts = {
        "a": row(1, image_file=here[0], image_sha256="a" * 64, **stored),
        "learnt": row(2, image_file=here[1], image_sha256="b" * 64, **stored),
        "same_bytes": row(3, image_file=here[1], image_sha256="b" * 64, **stored),
        "same_pixels": row(4, image_file=here[2], image_sha256="c" * 64, pixels_sha256="p" * 64, **stored),
        "unlike": row(5, image_file=here[3], image_sha256="d" * 64, image_width=9, **stored),
        "warned": row(6, image_file=here[3], image_sha256="e" * 64, warnings=["frame 2 of 3 scored", "dim: x"],
                      **stored),
        "unkept": row(7, image_sha256="f" * 64),
        "elsewhere": row(8, image_file="ab/elsewhere.png", image_sha256="g" * 64, **stored),
        "b": row(9, image_file=here[0], image_sha256="h" * 64, **stored),
        "c": row(10, image_file=here[3], image_sha256="i" * 64, **stored),
        "normal": row(11, image_file=here[0], image_sha256="j" * 64, decision="normal", **stored),
        "other": row(12, image_file=here[0], image_sha256="k" * 64, model="other", **stored),
        "defect": row(13, image_file=here[0], image_sha256="m" * 64, **stored),
        "unreviewed": row(14, image_file=here[0], image_sha256="n" * 64, **stored),
    }
    for name, r in parts.items():
        if name != "normal":
            r.decision = "anomaly"
    store.add_many(parts.values())
    for name, r in parts.items():
        if name != "unreviewed":
            store.review(r.id, "defect" if name == "defect" else "good", "ann")
    told = []

    def unlike(height: int, width: int, warned: frozenset[str]) -> bool:
        told.append((height, width, warned))
        return width != 8 or "dim:" in warned

    ids = {name: r.id for name, r in parts.items()}
    got = store.reviewed_unlearnt("part", "good", "anomaly", {ids["learnt"]}, None, unlike, ("dim:", "frame"),
                                  {"p" * 64})
    assert got == ([ids["a"], ids["b"], ids["c"]], 3, 3, 2, 2)
    assert (8, 8, frozenset({"dim:", "frame"})) in told and (8, 9, frozenset()) in told
    assert store.reviewed_unlearnt("part", "good", "anomaly", {ids["learnt"]}, 2, unlike, ("dim:",), {"p" * 64}) \
        == ([ids["a"], ids["b"]], 3, 3, 2, 2)
    # none listed: the stored ones counted as the records say, the one kept elsewhere too
    assert store.reviewed_unlearnt("part", "good", "anomaly", (), 0) == ([], 9, 0, 1, 0)
    everything = store.reviewed_unlearnt("part", "good", None, ())
    assert everything[0][-1] == ids["normal"] and everything[1:] == (9, 0, 2, 0)
    assert store.reviewed_unlearnt("part", "defect", None, ()) == ([ids["defect"]], 1, 0, 0, 0)


def test_a_resumed_rescoring_finds_each_part_its_source_recorded_for_that_model_version_once(store):
    """``recorded_parts``, what a re-scoring run resumed finds done, read in chunks: every part the re-scoring
    recorded for that model under any of its version's names, once, oldest first; never another model's, another
    version's, another source's, nor a record without a part id."""
    store.upgrade()
    mine = [row(i, source="rescore") for i in range(5)]
    others = [row(10, source="rescore", model="other"), row(11, source="rescore", model_version="v0"),
              row(12, source="api"), row(13, source="rescore", part_id=None)]
    store.add_many(mine + others)
    for chunk in (1, 2, 5, 6):
        assert list(store.recorded_parts("part", ["v1", "old name of v1"], "rescore", chunk=chunk)) == \
            [(r.part_id, r.id) for r in mine], chunk
    assert list(store.recorded_parts("part", ["v0", "v1"], "rescore", chunk=3)) == \
        [(r.part_id, r.id) for r in [*mine, others[1]]]
    assert list(store.recorded_parts("part", ["v2"], "rescore")) == []


def test_a_retried_batch_finds_which_of_its_records_are_in_already(store):
    """The recorder's retry after a commit whose answer was lost: exactly the ids the database holds."""
    store.upgrade()
    a, b = row(1), row(2)
    store.add_many([a])
    assert store.ids_present([a.id, b.id, "nope"]) == {a.id}
    assert store.ids_present(iter([b.id])) == set() and store.ids_present([]) == set()
    assert store.add_many(r for r in [b]) == 1 and store.ids_present(iter([b.id])) == {b.id}  # any iterable
    assert store.add_many([]) == 0


def test_a_review_or_undo_sent_again_after_its_answer_was_lost_is_answered_as_the_stored_one(store):
    """When the database drops the connection as a review commits, the review is stored and its answer lost (a
    503): the operator sends it again, naming the verdict they saw. That second send was refused as a conflict
    naming their own review as another's, or, without ``replaces``, written twice. A review that repeats the part's
    latest entry exactly (verdict, reviewer, note) is that entry now: nothing is written and the record is
    answered as it stands. Another reviewer, verdict or note is still a conflict; an undo sent again likewise."""
    import threading

    from anomaly_service.records import ReviewConflict

    store.upgrade()
    a = row(1)
    store.add_many([a])
    first = store.review(a.id, "defect", "ann", "scratch", replaces="unreviewed")
    again = store.review(a.id, "defect", "ann", "scratch", replaces="unreviewed")
    assert [(r.id, r.verdict, r.reviewer, r.note) for r in again.reviews] == \
        [(first.reviews[0].id, "defect", "ann", "scratch")] and again.reviewed_at == first.reviewed_at
    assert len(store.review(a.id, "defect", "ann", "scratch").reviews) == 1  # without replaces: not written twice
    for other in [("defect", "bob", "scratch"), ("good", "ann", "scratch"), ("defect", "ann", None)]:
        with pytest.raises(ReviewConflict):
            store.review(a.id, *other, replaces="unreviewed")
    undone = store.undo_review(a.id, first.reviews[0].id, "ann")
    entries = [(r.id, r.verdict, r.undoes) for r in undone.reviews]
    assert [(r.id, r.verdict, r.undoes) for r in store.undo_review(a.id, first.reviews[0].id, "ann").reviews] == \
        entries  # its answer lost too
    with pytest.raises(ReviewConflict):
        store.undo_review(a.id, first.reviews[0].id, "bob")  # another's undo of it is not this one's
    # the review again after its undo is a new decision, not a repeat of the undone one
    assert [r.verdict for r in store.review(a.id, "defect", "ann", "scratch").reviews] == ["defect", None, "defect"]
    # sent twice at once (a retry while the first still commits): one entry, both answered with it
    b = row(2)
    store.add_many([b])
    start, out = threading.Barrier(3), []
    threads = [threading.Thread(target=lambda: (start.wait(), out.append(
        store.review(b.id, "good", "ann", None, replaces="unreviewed")))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len(store.get(b.id).reviews) == 1


def test_operators_reviewing_one_part_at_once_see_one_win_and_the_others_a_conflict(store):
    """Two operators on one queue send their verdicts on a part at the same moment, each naming the verdict it saw
    (``replaces``); the same for an undo of its latest review. Exactly one may be written, the others get
    ReviewConflict. On SQLite the check read the row outside any transaction (the driver begins one only at the
    first write), so several passed it and wrote over each other unseen: 4 reviewers at once on each of 40 parts
    of a real service left 20 with two to four winning reviews. PostgreSQL locks the row."""
    import threading

    from anomaly_service.records import ReviewConflict

    store.upgrade()
    parts = [row(i) for i in range(12)]
    store.add_many(parts)

    def at_once(calls: list) -> list[object]:
        """Run the calls on threads released together; what each returned or raised."""
        start, out = threading.Barrier(len(calls)), [None] * len(calls)

        def run(i: int) -> None:
            start.wait()
            try:
                out[i] = calls[i]()
            except ReviewConflict as exc:
                out[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    for part in parts:
        got = at_once([lambda who=who: store.review(part.id, ("good", "defect")[who % 2], f"op{who}",
                                                    replaces="unreviewed") for who in range(4)])
        won = [g for g in got if not isinstance(g, ReviewConflict)]
        assert len(won) == 1, got
        reviews = store.get(part.id).reviews
        assert len(reviews) == 1 and store.get(part.id).verdict == reviews[0].verdict == won[0].verdict
        got = at_once([lambda who=who: store.undo_review(part.id, reviews[0].id, f"op{who}") for who in range(3)])
        assert sum(not isinstance(g, ReviewConflict) for g in got) == 1, got
        assert [r.undoes for r in store.get(part.id).reviews] == [None, reviews[0].id]


def test_an_earlier_release_replica_keeps_writing_into_the_upgraded_schema(store):
    """A rolling update runs replicas of an earlier release beside this one on the schema the first new replica
    upgraded (docs/service.md, "Going back to an earlier release"). Their writes name only the columns of
    revision 0004, as that release wrote them: no later revision may add a column they cannot fill, and this
    release reads, lists, exports, reviews and undoes their rows."""
    store.upgrade()
    t = datetime(2026, 12, 4, 18, tzinfo=timezone.utc)
    with store.engine.begin() as conn:  # an inspection and a review as the release at schema 0004 wrote them
        conn.execute(sa.text(
            "INSERT INTO inspections (id, created_at, model, model_version, score, normalized_score, threshold, "
            "decision, regions, image_width, image_height, image_bytes, image_sha256, timing_ms, part_id, line, "
            "station, meta, source, image_file, heatmap_file, files_state, files_changed_at, verdict, reviewed_at, "
            "view_token) VALUES (:id, :t, 'part', 'v0', 3.0, 1.5, 2.0, 'anomaly', '[]', 4, 4, 9, :h, '{}', 'P1', "
            "'L1', NULL, NULL, 'api', NULL, NULL, 'not_kept', NULL, 'defect', :t, 'tok')"),
            {"id": new_id(int(t.timestamp() * 1000)), "t": t, "h": "a" * 64})
        old_id = conn.execute(sa.text("SELECT id FROM inspections")).scalar()
        conn.execute(sa.text("INSERT INTO reviews (inspection_id, verdict, note, reviewer, created_at) "
                             "VALUES (:i, 'defect', 'old replica', 'ann', :t)"), {"i": old_id, "t": t})
    got = store.get(old_id)
    assert got is not None and got.verdict == "defect" and got.warnings is None
    assert [(r.verdict, r.undoes) for r in got.reviews] == [("defect", None)]
    assert [r.id for r in store.query(Filters(verdict="defect"))] == [old_id]
    assert [r.id for r in store.iter_all()] == [old_id]
    undone = store.undo_review(old_id, got.reviews[0].id, "bob")
    assert undone.verdict is None and [r.undoes for r in undone.reviews] == [None, got.reviews[0].id]
    assert store.review(old_id, "good", "bob", replaces="unreviewed").verdict == "good"


def test_a_volume_under_its_free_floor_keeps_the_records_and_gives_up_the_oldest_pictures(store):
    """Below ``min_free_bytes`` free, a record is written without its picture (counted), and retention removes the
    oldest pictures until the floor is back, marking their records. The floors are set against the volume's free
    space as it is now, so the test does not depend on how full the machine's disk is."""
    from anomaly_service.telemetry import Telemetry
    from conftest import mounted

    store.upgrade()
    # the pictures on a volume of their own: the floors are read against its free space, which nothing else writes
    # to (the suite's other process, another job on the machine) between the reading and the retention
    with mounted(store.files.root, "64m"):
        big = _written(store, [pending(np.random.default_rng(i).bytes(2**20)) for i in range(3)])  # no floor: stored
        assert {store.get(p.id).files_state for p in big} == {FILES_STORED}
        for i, p in enumerate(big):  # oldest first, a second apart
            r = store.get(p.id)
            for key in (r.image_file, r.heatmap_file):
                t = time.time() - 100 + i
                os.utime(store.files.path(key), (t, t))
        free = store.files.free_bytes()
        telemetry = Telemetry()
        rec = Recorder(store, "all", metrics=telemetry, min_free_bytes=free + 2**30)  # far under the floor now
        rec.start()
        starved = pending(np.random.default_rng(9).bytes(1000))
        rec.submit(starved)
        rec.stop()
        row = store.get(starved.id)
        assert row is not None and row.files_state == FILES_FAILED and row.image_file is None
        assert telemetry.record_files_not_stored.labels("low_disk")._value.get() == 1
        # 1.5 MB short of the floor: the two oldest photos (and their heatmaps) go, the newest stays
        result = store.apply_retention(None, None, min_free_bytes=store.files.free_bytes() + 3 * 2**19)
        assert result["free_space"] >= 2 and result["bytes"] >= 3 * 2**19
        assert [store.get(p.id).files_state for p in big] == [FILES_REMOVED, FILES_REMOVED, FILES_STORED]
        assert store.files.path(store.get(big[2].id).image_file).is_file()
        assert store.apply_retention(None, None, min_free_bytes=1)["free_space"] == 0  # room enough: nothing goes
        root, blocker = store.files.root, store.files.root.parent / "blocker"
        blocker.write_text("")
        store.files.root = blocker / "files"  # a write that fails (as root, permissions restrict nothing)
        rec = Recorder(store, "all", metrics=telemetry)
        rec.start()
        failed = pending(np.random.default_rng(10).bytes(1000))
        rec.submit(failed)
        rec.stop()
        store.files.root = root
        assert store.get(failed.id).files_state == FILES_FAILED
        assert telemetry.record_files_not_stored.labels("error")._value.get() == 1


def test_pictures_a_full_volume_refuses_are_one_log_line_not_one_per_part(tmp_path, caplog):
    """A full (or read-only) picture volume fails every flagged part's photo: that was an error line per part,
    ten a second on a busy line, burying everything else. One line says it, with the directory and why; the metric
    counts each."""
    from anomaly_service.telemetry import Telemetry
    from conftest import fill, mounted

    store = RecordStore.open(None, tmp_path)
    store.upgrade()
    with mounted(tmp_path / "files", "1m") as files:
        filler = fill(files)
        telemetry = Telemetry()
        rec = Recorder(store, "all", metrics=telemetry)
        rec.start()
        parts = [pending(np.random.default_rng(i).bytes(4096)) for i in range(20)]
        with caplog.at_level(logging.ERROR, logger="anomaly_service.records"):
            for p in parts:
                rec.submit(p)
            rec.stop()
        filler.unlink()
    lines = [r.getMessage() for r in caplog.records if "photo" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("records: cannot store the photo")
    assert str(files) in lines[0] and "No space left on device" in lines[0], lines[0]
    # the rest are said when the writer stops, though no failure follows: the count read as a single one before
    assert lines[1].startswith(f"records: {len(parts) - 1} more photo(s) not stored under {files}"), lines[1]
    assert {store.get(p.id).files_state for p in parts} == {FILES_FAILED}  # every record is written all the same
    assert telemetry.record_files_not_stored.labels("error")._value.get() == len(parts)
    store.close()


def test_a_database_back_after_a_full_disk_says_so_in_the_log(tmp_path, caplog, monkeypatch):
    """The writer warned while the disk was full, then went silent once it was freed: the on-call engineer could
    not tell from the log whether records flow again. One line says so."""
    from anomaly_service.records import recorder as recorder_module
    from conftest import fill, mounted

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    with mounted(tmp_path / "vol", "2m") as vol:
        store = RecordStore.open(None, vol)
        store.upgrade()
        filler = fill(vol)
        rec = Recorder(store, "none")
        rec.start()
        with caplog.at_level(logging.INFO, logger="anomaly_service.records"):
            parts = [pending(b"x" * 50_000, part_id=f"p{i}") for i in range(20)]
            for p in parts:
                rec.submit(p)
            deadline = time.time() + 10
            while not rec.retrying and time.time() < deadline:
                time.sleep(0.05)
            assert rec.retrying, "the full disk never refused a write"
            filler.unlink()
            rec.stop()
        store.close()
        messages = [r.getMessage() for r in caplog.records]
        assert any(f"database sqlite:///{vol}/records.db unavailable (" in m for m in messages), messages
        back = [m for m in messages if "takes records again" in m]
        assert len(back) == 1 and "record(s) written" in back[0], messages
        assert rec.written == len(parts)


def _written(store, items: list[PendingRecord], keep: str = "all") -> list[PendingRecord]:
    """``items`` recorded (the recorder started, given them, stopped), with their pictures unless ``keep`` says."""
    rec = Recorder(store, keep)
    rec.start()
    for p in items:
        rec.submit(p)
    rec.stop()
    return items


def _recorded_alone(data: os.PathLike[str], part: PendingRecord) -> None:
    """A records database at ``data`` that holds ``part`` alone, no picture kept (what an export reads)."""
    store = RecordStore.open(None, data)
    store.upgrade()
    _written(store, [part], keep="none")
    store.close()


def _parts(n: int) -> list[PendingRecord]:
    """``n`` records of distinct photos and heatmaps: files are content-addressed, and a file two records share
    goes when its newest does."""
    return [pending(png_bytes(textured_part(np.random.default_rng(i), 32, 32)), level=0.1 * i) for i in range(n)]


def test_retention_removes_old_files_and_says_so_in_the_records(store):
    store.upgrade()
    items = _written(store, _parts(6))
    files = store.files
    day = 86400
    for i, p in enumerate(items[:2]):  # two inspections' files are 10 days old
        r = store.get(p.id)
        for key in (r.image_file, r.heatmap_file):
            t = time.time() - 10 * day - i
            os.utime(files.path(key), (t, t))
    result = store.apply_retention(max_age_days=5, max_bytes=None)
    assert result["expired"] >= 2
    states = {p.id: store.get(p.id).files_state for p in items}
    assert [states[p.id] for p in items[:2]] == [FILES_EXPIRED] * 2
    assert all(states[p.id] == FILES_STORED for p in items[2:])
    store.apply_retention(max_age_days=None, max_bytes=1)  # a budget nothing fits in: every file goes
    assert {store.get(p.id).files_state for p in items[2:]} == {FILES_REMOVED}
    assert store.reviewed_images("part", "good") == []
    # whatever happened, no record says "stored" about a file that is not there
    for r in store.query(Filters(), 100):
        if r.files_state == FILES_STORED:
            assert files.path(r.image_file).is_file()
    assert [f for f in files.files()] == []


def test_a_record_whose_pictures_retention_removed_says_when_in_the_export(store):
    """An auditor asking for a part's photo months later read `expired` and no date: whether the photo was gone
    before or after the complaint came in was not in the export or the API. The record says when its pictures went
    (`files_changed_at`, UTC with its offset), and null while they are kept."""
    store.upgrade()
    items = _written(store, _parts(2))
    old = store.get(items[0].id)
    for key in (old.image_file, old.heatmap_file):
        t = time.time() - 10 * 86400
        os.utime(store.files.path(key), (t, t))
    before = datetime.now(timezone.utc)
    store.apply_retention(max_age_days=5, max_bytes=None)
    where = ["--data-dir", str(store.data_dir)] if store.dialect == "sqlite" else ["--database-url", store.url]
    r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    got = {x["id"]: x for x in map(json.loads, r.stdout.splitlines())}
    gone, kept = got[items[0].id], got[items[1].id]
    assert gone["files_state"] == FILES_EXPIRED and kept["files_state"] == FILES_STORED
    # the records' clock is the database's, read as an offset from this host's clock: within its read, not to the
    # microsecond
    slack = timedelta(seconds=1)
    assert before - slack <= datetime.fromisoformat(gone["files_changed_at"]) <= datetime.now(timezone.utc) + slack
    assert gone["files_changed_at"].endswith("+00:00") and kept["files_changed_at"] is None
    assert inspection_dict(store.get(items[0].id))["files_changed_at"] == gone["files_changed_at"]


def test_a_record_written_late_during_a_retention_pass_keeps_its_pictures_and_says_so(store, monkeypatch):
    """A part scored before a retention pass and written while it runs (the writer's batch, a slow database) must
    never be marked as having lost pictures that are kept, nor left saying "stored" about pictures the pass deleted.
    Both orders of the writer's two steps (store the pictures, then insert the row) around the pass's scan are run
    here with the real recorder and the real pass, one step of each put where the race puts it."""
    store.upgrade()
    rec = Recorder(store, "all")
    rec.start()
    photo = png_bytes(textured_part(np.random.default_rng(0), 32, 32))
    first = pending(photo)
    rec.submit(first)
    rec.flush()
    old = time.time() - 10 * 86400
    for key in (store.get(first.id).image_file, store.get(first.id).heatmap_file):
        os.utime(store.files.path(key), (old, old))
    # the same part photographed again, scored before the pass and written after the pass listed its old pictures
    again = pending(photo)
    scan = store.files.select_expired

    def scan_then_write(*args, **kwargs):
        out = scan(*args, **kwargs)
        rec.submit(again)
        rec.flush()
        return out

    monkeypatch.setattr(store.files, "select_expired", scan_then_write)
    store.apply_retention(max_age_days=5, max_bytes=None)
    monkeypatch.undo()
    got = store.get(again.id)
    assert got.files_state == FILES_STORED and store.files.path(got.image_file).is_file()
    assert store.get(first.id).files_state == FILES_STORED  # its file was kept: re-referenced, so it is young again

    # a pass between a batch's pictures and its insert, its budget taking every file, the batch's own too
    fresh = pending(png_bytes(textured_part(np.random.default_rng(1), 32, 32)))
    insert = store.add_many

    def retain_then_insert(rows, *args, **kwargs):
        store.apply_retention(max_age_days=None, max_bytes=1)
        return insert(rows, *args, **kwargs)

    monkeypatch.setattr(store, "add_many", retain_then_insert)
    rec.submit(fresh)
    rec.flush()
    monkeypatch.undo()
    rec.stop()
    got = store.get(fresh.id)
    assert got.files_state == FILES_STORED and store.files.path(got.image_file).is_file()
    assert store.files.path(got.heatmap_file).is_file()
    # once written, its pictures are retention's like any others
    store.apply_retention(max_age_days=None, max_bytes=1)
    assert store.get(fresh.id).files_state == FILES_REMOVED
    for r in store.query(Filters(), 100):  # no record says "stored" about a file that is not there
        if r.files_state == FILES_STORED:
            assert store.files.path(r.image_file).is_file() and store.files.path(r.heatmap_file).is_file()


# Another replica, as a process of its own on the same database and picture volume: ``write`` records one part
# with the real recorder, its pictures stored and its insert held until the test says "go" on its stdin;
# ``retain`` runs one retention pass whose budget takes every picture and prints what it did.
REPLICA = r"""
import io, json, sys
import numpy as np
from PIL import Image
from anomaly_service.records import PartContext, PendingRecord, Recorder, RecordStore

url, data_dir, job = sys.argv[1] or None, sys.argv[2], sys.argv[3]
store = RecordStore.open(url, data_dir)
if job == "retain":
    print(json.dumps(store.apply_retention(max_age_days=None, max_bytes=1)), flush=True)
else:
    insert = store.add_many

    def held_insert(rows, *args, **kwargs):
        print("stored", flush=True)
        sys.stdin.readline()
        print("inserting", flush=True)
        return insert(rows, *args, **kwargs)

    store.add_many = held_insert
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "PNG")
    part = PendingRecord(data=buf.getvalue(), model="part", model_version="v1", score=3.0, normalized_score=1.5,
                         threshold=2.0, is_anomaly=True, regions=[], image_width=32, image_height=32,
                         timing_ms={"total": 2.0}, context=PartContext(),
                         normalized_map=lambda: np.full((32, 32), 1.2, np.float32))
    rec = Recorder(store, "all")
    rec.start()
    rec.submit(part)
    rec.flush(60)
    rec.stop()
    print(part.id, flush=True)
store.close()
"""


class Replica:
    """A ``REPLICA`` process and the lines it prints, read on a thread so that a test never hangs on it."""

    def __init__(self, store: RecordStore, job: str, tmp_path):
        import queue
        import subprocess
        import sys

        from conftest import REPO

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        url = store.url if store.dialect == "postgresql" else ""
        self.log = tmp_path / f"replica-{job}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", REPLICA, url, str(store.data_dir), job], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line.strip()) for line in self.proc.stdout],
                         daemon=True).start()

    def line(self, timeout: float = 120) -> str:
        import queue

        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"the other process said nothing in {timeout} s:\n{self.log.read_text()}")

    def say(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def done(self) -> None:
        assert self.proc.wait(120) == 0, self.log.read_text()


def test_a_picture_stored_again_while_the_clock_is_behind_keeps_its_later_date(store, tmp_path):
    """Storing a picture that is there already touches it: retention counts from the newest record. A process
    whose clock was behind (a replica on a host that booted before its time synced; here libfaketime, 200 days
    back) storing the same picture touched it to its own time, 200 days before the record written today: the first
    pass after removed the picture of the part scored today. A touch never dates a picture earlier than it was."""
    import glob
    import subprocess
    import sys

    from conftest import REPO

    lib = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), None)
    if lib is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    store.upgrade()
    [part] = _written(store, _parts(1))
    row = store.get(part.id)
    photo = store.files.path(row.image_file)
    before = photo.stat().st_mtime
    env = {**os.environ, "LD_PRELOAD": lib, "FAKETIME": "-200d",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    again = ("import sys, pathlib\n"
             "from anomaly_service.records.files import FileStore\n"
             "print(FileStore(pathlib.Path(sys.argv[1])).put(pathlib.Path(sys.argv[2]).read_bytes(), 'png'))\n")
    done = subprocess.run([sys.executable, "-c", again, str(store.data_dir), str(photo)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == row.image_file, done.stderr
    assert photo.stat().st_mtime >= before
    store.apply_retention(max_age_days=90, max_bytes=None)
    assert store.get(part.id).files_state == FILES_STORED and photo.is_file()


# A replica on a host whose wall clock is off (libfaketime; its monotonic clock left alone, as on such a host): it
# opens the records, says "ready", then for each inspection id read on its stdin records one part, reviews that
# inspection and prints the part's id. (libfaketime 0.9.10 fails Python's time.sleep with EINVAL when it leaves
# the monotonic clock alone, and hangs timed waits when it fakes it: no recorder thread runs here.)
SKEWED = r"""
import sys
from anomaly_service.records import RecordStore
from anomaly_service.records.models import Inspection, new_id, utcnow

store = RecordStore.open(sys.argv[1], sys.argv[2])
store.upgrade()
print("ready", flush=True)
for line in sys.stdin:  # dated and named as the recorder's PendingRecord dates and names a part
    part = Inspection(id=new_id(), created_at=utcnow(), model="part", model_version="v1", score=1.0,
                      normalized_score=0.5, threshold=2.0, decision="normal", regions=[], image_width=8,
                      image_height=8, image_bytes=10, image_sha256="0" * 64, timing_ms={"total": 1.0}, source="api",
                      files_state="not_kept")
    store.add_many([part])
    store.review(line.strip(), "good", "skewed", None)
    print(part.id, flush=True)
store.close()
"""


@pytest.mark.parametrize("offset", ["-2h"])
def test_a_replica_whose_clock_is_off_dates_and_orders_its_records_by_the_databases_clock(postgres_url, tmp_path,
                                                                                         offset):
    """Replicas on hosts whose clocks disagree share one PostgreSQL. Each dated its records, reviews and ids by its
    own clock: the parts of one two hours behind were dated two hours back (outside any "since the last minutes")
    and its ids stayed at the newest id it found at start, under every part the others scored since; one ten
    minutes ahead dated its parts in the future and listed them above the others' later ones. Both take the
    database's clock now."""
    import glob
    import subprocess
    import sys

    from conftest import REPO

    lib = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), None)
    if lib is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    store = RecordStore.open(postgres_url, tmp_path / "data")
    store.upgrade()
    first = row(0)
    store.add_many([first])
    env = {**os.environ, "LD_PRELOAD": lib, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", SKEWED, postgres_url, str(tmp_path / "skewed")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        second = row(1)  # after the other replica started
        store.add_many([second])
        # the replicas' parts a second apart: a replica knows the database's time to within half its query's round
        # trip, which a loaded machine stretched past the few milliseconds between two parts (their order flipped)
        time.sleep(1.0)
        proc.stdin.write(first.id + "\n")
        proc.stdin.flush()
        skewed = proc.stdout.readline().strip()
        assert skewed, proc.stderr.read()
        time.sleep(1.0)
        third = row(2)
        store.add_many([third])
        proc.stdin.close()
        said = proc.stderr.read()  # its log (warnings go to stderr): said once, where on-call looks
        assert proc.wait(60) == 0, said
    finally:
        if proc.poll() is None:
            proc.kill()
    assert said.count("this host's clock is 7200 s behind the records database's") == 1, said
    # newest first, in the order the parts were scored, whichever replica scored them
    assert [r.id for r in store.query(Filters(), 10)] == [third.id, skewed, second.id, first.id]
    now = datetime.now(timezone.utc)
    got = store.get(skewed)
    assert abs((got.created_at - now).total_seconds()) < 60, got.created_at
    assert [r.id for r in store.query(Filters(since=now - timedelta(minutes=1)), 10)][1] == skewed
    [review] = store.get(first.id).reviews
    assert abs((review.created_at - now).total_seconds()) < 60, review.created_at
    store.close()


def test_a_record_another_process_writes_during_a_retention_pass_keeps_its_pictures(store, monkeypatch, tmp_path):
    """Replicas share the database and the picture volume, not their processes' locks: another process's writer
    had stored its part's pictures and was inserting the row while this process's pass marked and deleted them
    (their holds are not visible here), and its record said "stored" about pictures that were gone. Its insert now
    waits for the chunk's mark-and-delete and writes the pictures back."""
    store.upgrade()
    writer = Replica(store, "write", tmp_path)
    assert writer.line() == "stored"  # its pictures on the volume, its row not in the database yet
    mark = store.mark_files
    raced = []

    def mark_then_let_it_insert(keys: list[str], state: str, **kw) -> int:
        changed = mark(keys, state, **kw)
        if not raced:  # between this chunk's marking and its deletion, the other process inserts
            raced.append(keys)
            writer.say("go")
            assert writer.line() == "inserting"
            time.sleep(1)
        return changed

    monkeypatch.setattr(store, "mark_files", mark_then_let_it_insert)
    result = store.apply_retention(max_age_days=None, max_bytes=1)
    monkeypatch.undo()
    inspection_id = writer.line()
    writer.done()
    assert len(raced[0]) == 2 and result["removed"] == 2  # this pass deleted both of its pictures ...
    got = store.get(inspection_id)  # ... and its record, written after, has them back
    assert got.files_state == FILES_STORED
    assert store.files.path(got.image_file).is_file() and store.files.path(got.heatmap_file).is_file()
    # once written, they are retention's like any others
    assert store.apply_retention(max_age_days=None, max_bytes=1)["removed"] == 2
    assert store.get(inspection_id).files_state == FILES_REMOVED
    assert not store.files.path(got.image_file).exists()


def test_an_insert_writes_back_a_picture_deleted_since_it_was_stored_or_says_it_failed(store):
    """What the insert does with its pictures, whoever deleted them: one gone is written back from the bytes the
    writer kept; one that cannot be written (here a file where its directory was) leaves its record saying
    ``failed`` rather than ``stored``."""
    store.upgrade()
    gone, blocked = (png_bytes(textured_part(np.random.default_rng(seed), 32, 32)) for seed in (0, 1))
    gone_key, blocked_key = store.files.put(gone, "png"), store.files.put(blocked, "png")
    store.files.path(gone_key).unlink()
    where = store.files.path(blocked_key).parent
    for f in where.iterdir():
        f.unlink()
    where.rmdir()
    where.write_bytes(b"")
    a, b = row(0, image_file=gone_key, files_state=FILES_STORED), row(1, image_file=blocked_key,
                                                                     files_state=FILES_STORED)
    assert store.add_many([a, b], {gone_key: gone, blocked_key: blocked}) == 2
    assert store.get(a.id).files_state == FILES_STORED and store.files.read(gone_key) == gone
    got = store.get(b.id)
    assert got.files_state == FILES_FAILED and got.image_file is None


def test_replicas_take_turns_at_retention(store, monkeypatch, tmp_path):
    """Two processes' passes at once both marked and deleted the same pictures and both counted them
    (``anomaly_record_files_retired_total`` summed over replicas counted each twice): a pass that finds another
    process's running is skipped, and the next one runs."""
    store.upgrade()
    rec = Recorder(store, "all")
    rec.start()
    for seed in (0, 1):
        rec.submit(pending(png_bytes(textured_part(np.random.default_rng(seed), 32, 32)), level=1.1 + seed))
    rec.stop()
    mark = store.mark_files
    others: list[dict] = []

    def mark_while_another_process_retains(keys: list[str], state: str, **kw) -> int:
        if not others:
            other = Replica(store, "retain", tmp_path)
            others.append(json.loads(other.line()))
            other.done()
        return mark(keys, state, **kw)

    monkeypatch.setattr(store, "mark_files", mark_while_another_process_retains)
    result = store.apply_retention(max_age_days=None, max_bytes=1)
    monkeypatch.undo()
    assert others[0].get("skipped") == 1 and others[0]["removed"] == 0
    assert result["removed"] == 4 and result["skipped"] == 0  # two photos and their heatmaps, counted once
    assert all(r.files_state == FILES_REMOVED for r in store.query(Filters(), 10))
    assert store.files.files() == []
    rec = Recorder(store, "all")  # the turn is given back: the other process's next pass runs
    rec.start()
    rec.submit(pending(png_bytes(textured_part(np.random.default_rng(2), 32, 32)), level=3.1))
    rec.stop()
    size = sum(f.bytes for f in store.files.files())
    other = Replica(store, "retain", tmp_path)
    assert json.loads(other.line()) == {"expired": 0, "removed": 2, "free_space": 0, "bytes": size, "skipped": 0}
    other.done()


def test_a_replica_whose_clock_is_ahead_removes_no_picture_another_just_wrote(store, caplog):
    """Replicas share the picture volume, and a picture is dated by the clock of the host that wrote it. A replica
    whose clock ran two hours ahead (here its retention clock's wall clock) counted every picture two hours older
    than it was: with ``--retention-days`` of an hour it removed those written a second before (reproduced on two
    real replicas, one under libfaketime), and took a file another replica was writing for one a crash left an
    hour before. Ages are counted to the time the volume dates a new file by, at most."""
    from anomaly_service.steady_clock import SteadyWallClock

    store.upgrade()
    items = _written(store, _parts(2))
    writing = store.files.path(store.get(items[0].id).image_file).parent / ".tmp-being-written"  # another's write
    writing.write_bytes(b"half a photo")
    rec = Recorder(store, "all", retention=(1 / 24, None, 3600),
                   clock=SteadyWallClock(wall=lambda: time.time() + 7200))
    with caplog.at_level("WARNING", logger="anomaly_service.records.recorder"):
        result = store.apply_retention(1 / 24, None, now=rec._retention_now())
    assert writing.is_file()  # an hour old to that clock: taken for one a crash left
    assert result["expired"] == 0
    assert [store.get(p.id).files_state for p in items] == [FILES_STORED, FILES_STORED]
    assert sum("ahead of the time the picture volume" in m for m in caplog.messages) == 1
    assert not list(store.files.root.glob(".tmp-*"))  # the volume's time was read from a file made and removed


def test_a_forward_step_of_the_clock_removes_no_picture_early(store, caplog):
    """Retention counted pictures' ages to the wall clock: stepped a year forward while the service ran (a wrong
    time server), its next pass removed the photos of parts scored seconds before. The service's retention clock
    moves forward no faster than the monotonic one (here the wall clock is the clock's seam, the monotonic one the
    real one) and says the step in the log once; a picture that is old by that clock still goes, and a step back
    is followed."""
    from anomaly_service.steady_clock import SteadyWallClock

    store.upgrade()
    items = _written(store, _parts(3))
    r = store.get(items[0].id)
    old = time.time() - 40 * 86400
    for key in (r.image_file, r.heatmap_file):  # one part's pictures are 40 days old
        os.utime(store.files.path(key), (old, old))
    step = [0.0]
    rec = Recorder(store, "all", retention=(30, None, 3600),
                   clock=SteadyWallClock(wall=lambda: time.time() + step[0]))
    step[0] = 365 * 86400.0
    with caplog.at_level("WARNING", logger="anomaly_service.records.recorder"):
        result = store.apply_retention(30, None, now=rec._retention_now())
        rec._retention_now()  # the same step, at the next pass
    assert result["expired"] == 2
    assert [store.get(p.id).files_state for p in items] == [FILES_EXPIRED, FILES_STORED, FILES_STORED]
    assert sum("clock stepped forward" in m for m in caplog.messages) == 1
    step[0] = -3600.0  # set right, then an hour behind: the clock follows it back
    assert abs(rec.clock() - (time.time() - 3600)) < 60 and rec.clock.ahead_s < 60


def test_retention_skips_a_directory_it_cannot_list_and_cleans_up_the_rest(store, caplog):
    """One directory under files/ that cannot be listed (here a link that loops; on a real volume one without
    permission) made every pass fail, so no picture was removed again: it is skipped, logged once, and the old
    pictures still go. ``lost+found`` of a volume mounted at files/ is not retention's to clean."""
    store.upgrade()
    rec = Recorder(store, "all")
    rec.start()
    item = pending(png_bytes(textured_part(np.random.default_rng(0), 32, 32)))
    rec.submit(item)
    rec.stop()
    files, r = store.files, store.get(item.id)
    old = time.time() - 10 * 86400
    for key in (r.image_file, r.heatmap_file):
        os.utime(files.path(key), (old, old))
    lost = files.root / "lost+found"
    lost.mkdir()
    (lost / "#1234").write_bytes(b"a block fsck found")
    os.utime(lost / "#1234", (old, old))
    loop = next(files.root / n for n in ("fd", "fe", "ff") if not (files.root / n).exists())
    os.symlink(loop.name, loop)  # listing it fails (ELOOP), as a directory without permission would
    with caplog.at_level("WARNING", logger="anomaly_service.records.files"):
        assert store.apply_retention(max_age_days=5, max_bytes=None)["expired"] == 2
        assert store.apply_retention(max_age_days=5, max_bytes=None)["expired"] == 0
    assert store.get(item.id).files_state == FILES_EXPIRED
    assert not files.path(r.image_file).exists() and (lost / "#1234").exists()
    assert sum("cannot be listed" in m and loop.name in m for m in caplog.messages) == 1


def _pass_backend(admin, lock: int) -> int:
    """The PostgreSQL backend (pid) that holds the advisory lock ``lock`` in this test's database."""
    return admin.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = %s AND "
                         "database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                         (lock,)).fetchone()[0]


@pytest.mark.parametrize("moment", ["after_marking", "while_setting_aside"])
def test_a_pass_whose_connection_drops_mid_chunk_deletes_no_picture_an_insert_came_for(postgres_url, tmp_path,
                                                                                       monkeypatch, moment):
    """The pass's locks are session locks on its connection: when PostgreSQL ends that session (a failover, a
    killed backend, a network cut) it releases them, and another replica's insert, no longer excluded, touched
    the chunk's picture (or wrote it back) and wrote its row as ``stored`` while this pass went on deleting. The
    pass now finds out that it lost its locks before any file of the chunk is gone for good, puts the chunk's
    files back (keeping the copy an insert wrote back), and stops. The session is ended here after the chunk's
    marking, and after the chunk set its file aside."""
    import psycopg

    from anomaly_service.records import files as files_module
    from anomaly_service.records import store as store_module
    from anomaly_service.records.store import PICTURES_LOCK, RETENTION_LOCK

    store = RecordStore.open(postgres_url, tmp_path / "data")
    store.upgrade()
    replica = RecordStore.open(postgres_url, tmp_path / "data")  # another process: its own file store lock
    photo = png_bytes(textured_part(np.random.default_rng(0), 32, 32))
    key = store.files.put(photo, "png")
    old = time.time() - 10 * 86400
    os.utime(store.files.path(key), (old, old))
    first = row(0, image_file=key, files_state=FILES_STORED)
    store.add_many([first])
    again = row(1, image_file=key, files_state=FILES_STORED)  # the same part scored again on the other replica
    killed = []

    def lose_the_connection_and_let_the_other_insert() -> None:
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
            pid = _pass_backend(admin, PICTURES_LOCK)
            assert pid == _pass_backend(admin, RETENTION_LOCK)
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        killed.append(pid)
        replica.add_many([again], {key: photo})  # not excluded any more: it waits for the session to end only

    if moment == "after_marking":
        mark = store.mark_files

        def mark_then_lose(keys: list[str], state: str, **kw) -> int:
            changed = mark(keys, state, **kw)
            lose_the_connection_and_let_the_other_insert()
            return changed

        monkeypatch.setattr(store, "mark_files", mark_then_lose)
    else:
        set_aside = files_module._set_aside

        def set_aside_then_lose(path):
            moved = set_aside(path)
            lose_the_connection_and_let_the_other_insert()  # its insert finds the picture gone: writes it back
            return moved

        monkeypatch.setattr(files_module, "_set_aside", set_aside_then_lose)
    failed: Exception | None = None
    try:
        store.apply_retention(max_age_days=None, max_bytes=1)
    except Exception as exc:  # noqa: BLE001 - which error is asserted below, after what matters more
        failed = exc
    monkeypatch.undo()
    assert killed
    # the row the other replica wrote while the pass had lost its lock says stored, and its picture is there
    assert store.get(again.id).files_state == FILES_STORED
    assert store.files.path(key).is_file() and store.files.read(key) == photo
    for r in store.query(Filters(), 10):  # no row says stored about a file that is gone
        if r.files_state == FILES_STORED:
            assert store.files.path(r.image_file).is_file()
    if moment == "while_setting_aside":  # the copy the insert wrote is kept: as young as its record
        assert store.files.path(key).stat().st_mtime > old + 86400
    assert isinstance(failed, store_module.RetentionInterrupted), failed  # the pass stopped and said why
    assert not list(store.files.root.rglob(".tmp-*"))  # nothing left aside
    # the next pass has locks of its own again, and its turn
    assert store.apply_retention(max_age_days=None, max_bytes=1)["removed"] == 1
    assert store.get(again.id).files_state == FILES_REMOVED and not store.files.path(key).exists()
    replica.close()
    store.close()


def test_a_file_a_stopped_pass_left_aside_is_put_back(tmp_path):
    """A pass that dies between setting a chunk's files aside and deleting them does not know whether its lock
    held: the next pass puts such a file back where none was written back since (at worst served as gone), and
    keeps the copy written back otherwise."""
    from anomaly_service.records.files import ASIDE_PREFIX, FileStore

    files = FileStore(tmp_path)
    gone, back = files.put(b"g" * 100, "png"), files.put(b"b" * 100, "png")
    for key in (gone, back):
        os.rename(files.path(key), files.path(key).with_name(ASIDE_PREFIX + files.path(key).name))
    files.put(b"b" * 100, "png")  # an insert wrote this one back
    files.clean_temporaries()
    assert files.read(gone) == b"g" * 100 and files.read(back) == b"b" * 100
    assert not list(files.root.rglob(".tmp-*")) and len(files.files()) == 2


def test_a_file_a_dead_pass_left_aside_is_served_until_it_is_put_back(store):
    """The double fault: a chunk's session ended (so another process's insert recorded the photo as stored, the
    file still in place) and the process died after setting the file aside, before putting it back. Until the
    next pass puts it back, the photo, its thumbnail and the operators' corrections still find it."""
    from anomaly_service.records.files import ASIDE_PREFIX

    store.upgrade()
    photo = png_bytes(textured_part(np.random.default_rng(0), 32, 32))
    key = store.files.put(photo, "png")
    store.add_many([row(0, image_file=key, files_state=FILES_STORED)])
    store.review(store.query()[0].id, "defect", "op")
    thumb = store.files.put_derived(key, "thumb", b"t" * 10)
    assert thumb is not None
    path = store.files.path(key)
    os.rename(path, path.with_name(ASIDE_PREFIX + path.name))  # the dead chunk's state
    assert store.files.read(key) == photo
    assert store.files.read_derived(key, "thumb") == b"t" * 10
    assert [p.read_bytes() for _, p in store.reviewed_images("part", "defect")] == [photo]
    store.files.clean_temporaries()  # the next pass
    assert path.is_file() and store.files.read(key) == photo and not list(store.files.root.rglob(".tmp-*"))
    os.unlink(path)
    assert store.files.read(key) is None and store.files.read_derived(key, "thumb") is None
    assert store.files.read("../../etc/passwd") is None

def test_no_thumbnail_outlives_its_photo_after_a_pass(store, monkeypatch):
    """A thumbnail is kept beside its photo and goes with it. It outlived its photo when drawn after the pass
    listed the photo (the chunk deleted what the listing had seen beside it), when another process drew it while
    the pass deleted the photo (its check that the photo is stored came first), and when it was left on its own
    (a crash between the two deletes): an age limit judged it by its own, younger, age."""
    from anomaly_service.records import files as files_module
    from anomaly_service.records.files import DERIVED_MARK, FileStore, derived_key

    def orphans() -> list:
        return [p for p in store.files.root.rglob(f"*{DERIVED_MARK}*")
                if not (p.parent / p.name.split(DERIVED_MARK, 1)[0]).exists()]

    store.upgrade()
    photos = [png_bytes(textured_part(np.random.default_rng(i), 32, 32)) for i in range(3)]
    keys = [store.files.put(p, "png") for p in photos]
    store.add_many([row(i, image_file=k, files_state=FILES_STORED) for i, k in enumerate(keys)])
    old = time.time() - 10 * 86400
    for k in keys:
        os.utime(store.files.path(k), (old, old))
    # drawn in this process after the pass listed the photo, before the chunk deleted it
    scan = store.files.select_expired

    def scan_then_draw(*args, **kwargs):
        out = scan(*args, **kwargs)
        assert store.files.put_derived(keys[0], "thumb256-16bit.jpg", b"t" * 50) is not None
        return out

    monkeypatch.setattr(store.files, "select_expired", scan_then_draw)
    assert store.apply_retention(max_age_days=5, max_bytes=None)["expired"] == 3
    monkeypatch.undo()
    assert not store.files.path(keys[0]).exists() and orphans() == []

    # drawn by another process sharing the volume: it saw the photo stored, then the pass deleted it
    keys = [store.files.put(p, "png") for p in photos]
    store.add_many([row(i, image_file=k, files_state=FILES_STORED) for i, k in enumerate(keys)])
    other = FileStore(store.data_dir)
    write = files_module._write_private

    def retain_then_write(target, data):
        if DERIVED_MARK in target.name:
            assert store.apply_retention(max_age_days=None, max_bytes=1)["removed"] == 3
        write(target, data)

    monkeypatch.setattr(files_module, "_write_private", retain_then_write)
    assert other.put_derived(keys[1], "thumb256-12bit.jpg", b"u" * 50) is None  # its photo went: none kept
    monkeypatch.undo()
    assert not store.files.path(keys[1]).exists() and orphans() == []

    # left on its own before a pass whose age limit would keep it: the pass removes it all the same
    keys = [store.files.put(p, "png") for p in photos]
    store.files.put_derived(keys[2], "thumb256-16bit.jpg", b"v" * 50)
    store.files.path(keys[2]).unlink()
    assert len(orphans()) == 1
    store.apply_retention(max_age_days=5, max_bytes=None)
    assert orphans() == [] and store.files.path(keys[0]).is_file()  # young pictures stay
    assert store.files.read_derived(keys[2], "thumb256-16bit.jpg") is None
    assert not store.files.path(derived_key(keys[2], "thumb256-16bit.jpg")).exists()


def test_a_pass_holds_one_pooled_connection(store):
    """On PostgreSQL a pass held the connection of its locks and took a second one to mark the records: with the
    pool taken by readers (or a pool of one) it waited, and a pool of one could never give it. It marks on the
    connection that holds its locks."""
    from sqlalchemy.orm import sessionmaker

    store.upgrade()
    keys = [store.files.put(png_bytes(textured_part(np.random.default_rng(i), 32, 32)), "png") for i in range(2)]
    store.add_many([row(i, image_file=k, files_state=FILES_STORED) for i, k in enumerate(keys)])
    store.engine.dispose()
    store.engine = sa.create_engine(store.url, pool_size=1, max_overflow=0, pool_timeout=2)
    store.sessions = sessionmaker(store.engine, expire_on_commit=False)
    out, peak = [0], [0]

    def checkout(*_args) -> None:
        out[0] += 1
        peak[0] = max(peak[0], out[0])

    def checkin(*_args) -> None:
        out[0] -= 1

    sa.event.listen(store.engine, "checkout", checkout)
    sa.event.listen(store.engine, "checkin", checkin)
    assert store.apply_retention(max_age_days=None, max_bytes=1)["removed"] == 2
    assert peak[0] == 1
    assert {r.files_state for r in store.query(Filters(), 10)} == {FILES_REMOVED}
    assert store.files.files() == []


def test_the_recorder_rides_out_a_database_outage(postgres_url, tmp_path):
    """The database refuses connections: submit never blocks, losses beyond the buffer are counted, and what
    was buffered is written once the database is back."""
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    def allow(on: bool) -> None:
        allow_connections(postgres_url, on)

    rec = Recorder(store, "none", buffer_size=5)
    rec.start()
    allow(False)
    try:
        t0 = time.perf_counter()
        accepted = sum(rec.submit(pending(b"x" * 10, anomaly=False)) for _ in range(40))
        assert time.perf_counter() - t0 < 0.5  # never waits for the database
        assert accepted <= 6 + 1 and rec.dropped["buffer_full"] == 40 - accepted
    finally:
        allow(True)
    rec.stop()
    assert rec.written == accepted and store.count() == accepted
    store.close()


def test_the_batch_in_hand_outlives_its_back_off_while_the_database_is_down(postgres_url, tmp_path, monkeypatch):
    """A database restart takes longer than the back-off steps: the writer keeps the batch it holds and retries
    it (every last step, for RETRY_FOR_S) instead of dropping records the buffer had room for."""
    from anomaly_service.records import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))  # the steps, shortened
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    allow_connections(postgres_url, False)
    try:
        for _ in range(3):
            assert rec.submit(pending(b"x", anomaly=False))
        time.sleep(2.0)  # many times the shortened back-off
    finally:
        allow_connections(postgres_url, True)
    assert rec.flush(30)
    rec.stop()
    assert rec.dropped.get("database", 0) == 0 and rec.written == 3 and store.count() == 3
    store.close()


def test_a_read_only_database_is_waited_out_not_counted_as_invalid_records(postgres_url, tmp_path, monkeypatch):
    """A failover leaves the service on a standby, which refuses writes (read-only transactions): the database's
    state, not the rows'. The batch is retried until the primary is back; every row was dropped as "invalid"."""
    import psycopg

    from anomaly_service.records import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    name = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {str(on).lower()}')
        store.engine.dispose()  # new connections take the setting, as after a failover

    rec = Recorder(store, "none")
    rec.start()
    read_only(True)
    try:
        for _ in range(3):
            assert rec.submit(pending(b"x", anomaly=False))
        time.sleep(1.0)
        assert store.count() == 0 and rec.dropped.get("invalid", 0) == 0
    finally:
        read_only(False)
    assert rec.flush(30)
    rec.stop()
    assert sum(rec.dropped.values()) == 0 and rec.written == 3 and store.count() == 3
    store.close()


@pytest.mark.parametrize("how", ["ended", "cut"])
def test_a_commit_whose_answer_is_lost_is_not_written_twice_nor_counted_lost(postgres_url, tmp_path, monkeypatch,
                                                                            how):
    """The connection goes while the server commits a batch (a restart, a network cut, a synchronous standby that
    does not answer): the rows are in, the writer never hears so and retries. The retry's duplicate keys were taken
    for rows the database refused: each was logged as refused and counted as dropped, \"invalid\", and the alert
    on losses fired for records that were all there (the operations drill of session 59). A real commit lost so:
    the server waits for a standby that does not exist, after the local commit, and its session is ended while it
    waits (``ended``: the retry finds the rows); or the client's end of the connection is cut and the server's
    commit ends only once the retry waits on its rows (``cut``: the retry's insert is refused as their duplicate)."""
    import socket

    import psycopg

    from anomaly_service.records import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.3, 0.3))
    name = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:  # the tests' server turns it off: commits wait here
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    sockets: list[int] = []
    sa.event.listen(store.engine, "connect", lambda dbapi, _record: sockets.append(dbapi.pgconn.socket))
    store.engine.dispose()  # every connection from here on is seen
    rec = Recorder(store, "none")
    rec.start()
    with psycopg.connect(admin, autocommit=True) as conn:
        try:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'no_such_standby'")
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.2)  # the server reads its configuration again
            for _ in range(2):
                assert rec.submit(pending(b"x", anomaly=False))
            deadline = time.monotonic() + 20
            # the batch's commit, waiting for the standby
            waiting = _sessions_waiting(conn, name, "wait_event = 'SyncRep'", deadline)
            assert waiting, "the batch's commit never waited for the standby"
            if how == "ended":  # committed locally; the client is told only that its connection ended
                for (pid,) in waiting:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            else:
                for fd in sockets:  # the network cut at the client's end: the server still waits to commit
                    with contextlib.suppress(OSError):
                        socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_RDWR)
                # the retry's insert, waiting on the rows
                blocked = _sessions_waiting(conn, name, "wait_event_type = 'Lock'", deadline)
                assert blocked, "the retry's insert never waited on the committing rows"
        finally:
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            conn.execute("SELECT pg_reload_conf()")
    assert rec.flush(30)
    rec.stop()
    assert store.count() == 2 and rec.written == 2
    assert sum(rec.dropped.values()) == 0, rec.dropped
    store.close()


def _sessions_waiting(conn, database: str, where: str, deadline: float) -> list:
    """The server sessions of ``database`` that wait as ``where`` says, polled until one does or ``deadline``."""
    found: list = []
    while not found and time.monotonic() < deadline:
        found = conn.execute(f"SELECT pid FROM pg_stat_activity WHERE datname = %s AND {where}", (database,)).fetchall()
        time.sleep(0.05)
    return found


def test_a_database_that_comes_back_empty_gets_its_schema_again(postgres_url, tmp_path):
    """A PostgreSQL that comes back without its data (a container restarted without its volume, a database dropped
    and made again): the schema was set up once at start-up and never again, so every batch was retried against
    the missing table for 10 minutes and dropped, until a restart. The writer sets the schema up again, as it does
    for a SQLite file deleted under it."""
    import psycopg

    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    try:
        before = pending(b"a", anomaly=False)
        assert rec.submit(before) and rec.flush(10) and store.count() == 1
        name = postgres_url.rsplit("/", 1)[1]
        admin = postgres_url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        after = pending(b"b", anomaly=False)
        assert rec.submit(after)
        assert rec.flush(30), "the record waits on a schema nobody sets up"
        assert rec.dropped == {} and store.get(after.id) is not None and store.get(before.id) is None
    finally:
        rec.stop()
        store.close()


def test_a_stop_while_the_database_is_down_retries_in_its_grace_then_counts_shutdown(postgres_url, tmp_path):
    """SIGTERM with the database down (docs: a stop is given its timeout, and what could not be written is counted
    as shutdown). The writer dropped its buffer within a second, counted as "database", a plant trial found.
    Back within the grace, the records are written; still down at its end, they are counted as shutdown."""
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    try:
        rec = Recorder(store, "none")
        rec.start()
        allow_connections(postgres_url, False)
        for _ in range(3):
            assert rec.submit(pending(b"x", anomaly=False))
        back = threading.Timer(1.5, allow_connections, (postgres_url, True))
        back.start()
        rec.stop(timeout=20)
        back.join()
        assert rec.written == 3 and rec.dropped == {} and store.count() == 3

        rec = Recorder(store, "none")
        rec.start()
        allow_connections(postgres_url, False)
        for _ in range(4):
            assert rec.submit(pending(b"x", anomaly=False))
        rec.stop(timeout=3)
        assert rec.dropped == {"shutdown": 4} and rec.written == 0
    finally:
        allow_connections(postgres_url, True)
    store.close()


def test_a_review_waiting_on_a_locked_row_fails_in_seconds(postgres_url, tmp_path, monkeypatch):
    """Another session holds the inspection's row (PostgreSQL): the review fails after the lock timeout instead of
    waiting as long as that session does (and holding a pooled connection the record writer needs). The test sets
    the timeout short for itself, as the suite does for every bound it waits out."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from anomaly_service.records import store as records_store

    monkeypatch.setattr(records_store, "LOCK_TIMEOUT_MS", LOCK_TIMEOUT_MS := 500)  # read as each engine is made
    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    store.add_many([row(0)])
    [target] = store.query(Filters(), 1)
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=False) as holder:
        holder.execute("SELECT id FROM inspections WHERE id = %s FOR UPDATE", (target.id,))
        t0 = time.perf_counter()
        with pytest.raises(OperationalError, match="lock"):
            store.review(target.id, "good", "ann")
        assert time.perf_counter() - t0 < LOCK_TIMEOUT_MS / 1000 + 5
        holder.rollback()
    assert store.review(target.id, "good", "ann").verdict == "good"
    store.close()


def test_cli_records_scores_and_exports(tmp_path, model_dir):
    rng = np.random.default_rng(5)
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(textured_part(rng)))
    data = tmp_path / "data"
    r = r_score = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data),
                                           "--keep-images", "all", str(tmp_path / "img0.png"),
                                           str(tmp_path / "img1.png"), str(tmp_path / "img2.png")])
    assert r.exit_code == 0, r.output
    assert "recorded 3 inspection(s)" in r.output
    out = tmp_path / "report.jsonl"
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "jsonl", "--since",
                                 "2000-01-01", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["part_id"] for x in lines] == ["img0.png", "img1.png", "img2.png"]
    # each output line names the record it made, as the API's inspection_id does: the last column
    printed = [line.split("\t") for line in r_score.stdout.splitlines()]
    assert [row[0] for row in printed] == [str(tmp_path / f"img{i}.png") for i in range(3)]
    assert [row[4] for row in printed] == [x["id"] for x in lines]
    assert all(x["source"] == "cli" and x["model"] == "part" and x["files_state"] == "stored" for x in lines)
    assert all(x["scorers"] is None for x in lines)  # one opinion: the record's own score and threshold
    assert lines[0]["image_sha256"] == hashlib.sha256((tmp_path / "img0.png").read_bytes()).hexdigest()
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "csv"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("id,created_at,model")
    assert len(r.stdout.splitlines()) == 4
    r = CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(data)])
    assert r.exit_code == 0 and "up to date" in r.output
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data), "--json",
                                 str(tmp_path / "img0.png")])
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout.splitlines()[0])
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "jsonl", "--since",
                                 "2000-01-01", "--out", str(out)])
    assert answer["inspection_id"] == json.loads(out.read_text().splitlines()[-1])["id"]


def test_an_export_and_the_api_carry_the_photos_pixel_digest_by_which_the_model_names_its_images(model_dir,
                                                                                                  rng_images,
                                                                                                  tmp_path):
    """A model names its training images by their pixel digest (a region's ``nearest_normal.sha256``, the embedding's
    points), the records named a part by its file's digest alone: a plant asking which recorded parts a model was
    fitted on (photos copied into ./good, re-saved in another encoding) could join an export with nothing. The record
    keeps the pixel digest since revision 0011; the API and both exports carry it, as the last column of the CSV (a
    spreadsheet reads by position), empty where the photo was not kept."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.records.store import EXPORT_COLUMNS
    from anomaly_service.settings import ServiceSettings

    assert EXPORT_COLUMNS[-1] == "pixels_sha256"
    data = tmp_path / "data"
    settings = ServiceSettings(model_dir=model_dir, reload_interval=0, device="cpu", data_dir=data,
                               keep_images="all")
    trained = png_bytes(rng_images[0], compress_level=0)  # a training image, saved again in another encoding
    with TestClient(create_app(settings)) as client:
        kept = client.post("/score?model=part", files={"file": ("a.png", trained)}).json()
        assert client.app.state.service.recorder.flush()
        names = {p["sha256"] for p in client.get("/models/part/embedding").json()["points"]}
        got = client.get(f"/inspections/{kept['inspection_id']}").json()
        assert got["pixels_sha256"] in names and got["pixels_sha256"] != got["image_sha256"]
    photo = tmp_path / "p.png"
    photo.write_bytes(png_bytes(rng_images[1]))
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data),
                                 "--keep-images", "none", str(photo)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "jsonl"])
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["pixels_sha256"] for x in lines] == [got["pixels_sha256"], None]
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "csv"])
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == EXPORT_COLUMNS and [row[-1] for row in rows[1:]] == [got["pixels_sha256"], ""]


def test_every_stored_time_is_written_with_microseconds_and_its_offset(store, tmp_path):
    """A record scored on a whole second was written 2026-12-04T08:00:00+00:00, the others with six decimals: a
    client parsing one fixed format (strptime's %f, a spreadsheet's import) failed on about one row in a million."""
    store.upgrade()
    whole = datetime(2026, 12, 4, 8, 0, 0, tzinfo=timezone.utc)
    store.add_many([row(1, at=whole), row(2, at=whole.replace(microsecond=250000))])
    reviewed = store.review(store.query(Filters(part_id="P1"))[0].id, "good", "ann")
    with store.sessions.begin() as s:  # a review on a whole second too
        s.execute(sa.update(Review).values(created_at=whole))
        s.execute(sa.update(Inspection).where(Inspection.id == reviewed.id).values(reviewed_at=whole))
    got = inspection_dict(store.get(reviewed.id), reviews=True)
    assert got["created_at"] == got["reviewed_at"] == got["reviews"][0]["created_at"]
    assert got["created_at"] == "2026-12-04T08:00:00.000000+00:00"
    where = ["--data-dir", str(store.data_dir)] if store.dialect == "sqlite" else ["--database-url", store.url]
    r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "csv"])
    assert r.exit_code == 0, r.output
    times = [line.split(",")[1] for line in r.stdout.splitlines()[1:]]
    assert times == ["2026-12-04T08:00:00.000000+00:00", "2026-12-04T08:00:00.250000+00:00"]
    assert all(datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f%z") for t in times)


def record_one(store: RecordStore, part_id: str) -> None:
    """One inspection written through the recorder, which is then stopped; the store is closed."""
    rec = Recorder(store, "none")
    rec.start()
    rec.submit(pending(b"x", part_id=part_id))
    rec.stop()
    store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files another user's")
def test_scoring_as_root_into_the_services_data_directory_is_refused_and_writes_nothing(tmp_path, model_dir):
    """Run with sudo, `anomaly score --data-dir` made the database, its lock and the picture directories root's in
    the service's directory, and the service, writing as its own user, could then record nothing there."""
    photo = tmp_path / "img.png"
    photo.write_bytes(png_bytes(textured_part(np.random.default_rng(5))))
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 54321, 54321)
    for where in (data, data / "sub"):  # the directory the records would be made in is the service's
        r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(where),
                                     "--keep-images", "all", str(photo)])
        assert r.exit_code != 0 and "belongs to user" in r.output and "sudo -u" in r.output, r.output
    assert list(data.iterdir()) == []
    os.chown(data, 0, 0)  # root's own directory: recorded as before
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data), str(photo)])
    assert r.exit_code == 0 and "recorded 1 inspection(s)" in r.output, r.output


def test_an_export_says_who_reviewed_each_part_and_keeps_the_whole_review_trail(store):
    """An auditor's export had each part's verdict and its time but not who gave it: the reviewer was only in the
    API's record of one part. Each row now names whoever put its verdict on record and carries every review."""
    store.upgrade()
    store.add_many([row(1), row(2), row(3)])
    first, second, third = (store.query(Filters(part_id=p))[0].id for p in ("P1", "P2", "P3"))
    store.review(first, "defect", "alice", note="crack at the neck")
    slip = store.review(second, "good", "bob").reviews[-1].id
    store.review(second, "defect", "carol")
    store.undo_review(second, store.get(second).reviews[-1].id, "dave")  # carol's verdict withdrawn: bob's is back
    where = ["--data-dir", str(store.data_dir)] if store.dialect == "sqlite" else ["--database-url", store.url]
    r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    got = {x["id"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert (got[first]["verdict"], got[first]["reviewed_by"]) == ("defect", "alice")
    assert [(e["verdict"], e["reviewer"], e["note"]) for e in got[first]["reviews"]] == \
        [("defect", "alice", "crack at the neck")]
    assert (got[second]["verdict"], got[second]["reviewed_by"]) == ("good", "dave")
    trail = got[second]["reviews"]
    assert [(e["verdict"], e["reviewer"], e["undoes"]) for e in trail] == \
        [("good", "bob", None), ("defect", "carol", None), ("good", "dave", trail[1]["id"])]
    assert trail[0]["id"] == slip and all(e["created_at"].endswith("+00:00") for e in trail)
    assert (got[third]["verdict"], got[third]["reviewed_by"], got[third]["reviews"]) == (None, None, [])
    r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "csv"])
    assert r.exit_code == 0, r.output
    import csv
    import io

    rows = {x["id"]: x for x in csv.DictReader(io.StringIO(r.stdout))}
    assert rows[first]["reviewed_by"] == "alice" and rows[third]["reviewed_by"] == ""
    assert [e["reviewer"] for e in json.loads(rows[second]["reviews"])] == ["bob", "carol", "dave"]


def test_an_export_selects_one_part_or_one_call(store):
    """An audit starts from a part id (or an integrator's request id): the export finds its inspections from the
    records alone, with the service down, rather than a date range searched by hand."""
    store.upgrade()
    store.add_many([row(1), row(2), row(3, part_id="P1", request_id="MES-4711"), row(4, request_id="MES-4711")])
    where = ["--data-dir", str(store.data_dir)] if store.dialect == "sqlite" else ["--database-url", store.url]

    def exported(*args: str) -> list[tuple[str, str | None]]:
        r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl", *args])
        assert r.exit_code == 0, r.output
        return sorted((x["part_id"], x["request_id"] or "") for x in map(json.loads, r.stdout.splitlines()))

    assert exported("--part-id", "P1") == [("P1", ""), ("P1", "MES-4711")]
    assert exported("--request-id", "MES-4711") == [("P1", "MES-4711"), ("P4", "MES-4711")]
    assert exported("--part-id", "P1", "--request-id", "MES-4711") == [("P1", "MES-4711")]
    assert exported("--part-id", "P9") == []
    assert exported("--part-id", "P1%") == exported("--part-id", "P_") == []  # no pattern: the id as it is


def test_a_part_named_on_macos_is_found_by_the_name_as_typed(store):
    """A folder made on macOS and copied to Linux spells 'ü' as 'u' and a combining mark (NFD); a part recorded from
    a photo in it (`anomaly score` records the file's name) was not found by the same name typed on the line's PC
    (NFC), nor a line named so by the other. Each spelling finds both; the records keep what came."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Bild_ü_0.png") for form in ("NFC", "NFD"))
    line_nfc, line_nfd = (unicodedata.normalize(form, "Linie Süd") for form in ("NFC", "NFD"))
    store.upgrade()
    store.add_many([row(1, part_id=nfd, line=line_nfc), row(2, part_id=nfc, line=line_nfd), row(3, part_id="Bild_u_0")])
    where = ["--data-dir", str(store.data_dir)] if store.dialect == "sqlite" else ["--database-url", store.url]

    def exported(*args: str) -> list[str]:
        r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "jsonl", *args])
        assert r.exit_code == 0, r.output
        return [x["part_id"] for x in map(json.loads, r.stdout.splitlines())]

    for typed in (nfc, nfd):
        assert sorted(exported("--part-id", typed)) == sorted([nfd, nfc])  # each as it was recorded
    for typed in (line_nfc, line_nfd):
        assert sorted(r.part_id for r in store.query(Filters(line=typed))) == sorted([nfd, nfc])
        since = datetime.now(timezone.utc) - timedelta(hours=1)
        assert sum(b["count"] for b in store.stats(Filters(line=typed, since=since))["buckets"]) == 2


def test_a_postgresql_database_made_under_lang_c_holds_names_in_any_script(postgres_server, tmp_path):
    """A PostgreSQL cluster initialised under LANG=C makes SQL_ASCII databases, and libpq then hands every text
    over as bytes: `db upgrade`, `score` and `records export` each ended in "records database ...: cannot use a
    string pattern on a bytes-like object", and the service could record nothing. The connection speaks UTF-8
    whatever the database's encoding, so the names come back as they were sent."""
    import psycopg

    name = f"sql_ascii_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with psycopg.connect(postgres_server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    url = f"{postgres_server}/{name}"
    r = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert r.exit_code == 0, r.output
    store = RecordStore.open(url, tmp_path)
    rec = Recorder(store, "none")
    rec.start()
    rec.submit(pending(b"x", part_id="Prüfteil Ø12 😀", line="零件/良品"))
    rec.stop()
    store.close()
    assert rec.written == 1 and not rec.dropped
    r = CliRunner().invoke(cli, ["records", "export", "--database-url", url, "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    [record] = map(json.loads, r.stdout.splitlines())
    assert (record["part_id"], record["line"]) == ("Prüfteil Ø12 😀", "零件/良品")


def test_a_postgresql_database_that_cannot_spell_every_name_is_warned_of(postgres_server, tmp_path, caplog):
    """A LATIN1 database (an older plant server's) refuses a record whose part id it cannot spell, and the part's
    record is lost with an error line of its own, a record at a time; nothing said so beforehand. Opening it for
    records now warns, naming the encoding and how to move to UTF-8."""
    import logging

    import psycopg

    name = f"latin1_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with psycopg.connect(postgres_server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    store = RecordStore.open(f"{postgres_server}/{name}", tmp_path)
    with caplog.at_level(logging.WARNING):
        store.upgrade()
    assert "is in LATIN1" in caplog.text and "ENCODING 'UTF8'" in caplog.text
    rec = Recorder(store, "none")
    rec.start()
    rec.submit(pending(b"x", part_id="Prüfteil Ø12"))  # Latin-1 spells it
    rec.submit(pending(b"y", part_id="零件"))  # it does not: that record is the one lost
    rec.stop()
    assert rec.written == 1 and rec.dropped == {"invalid": 1}
    assert [r.part_id for r in store.query(Filters())] == ["Prüfteil Ø12"]
    store.close()
    utf8 = RecordStore.open(postgres_server_db(postgres_server), tmp_path / "other")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        utf8.upgrade()
    utf8.close()
    assert "records database" not in caplog.text


def postgres_server_db(server: str) -> str:
    """A new UTF-8 database on the test server (its template's encoding)."""
    import psycopg

    name = f"utf8_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with psycopg.connect(server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.mark.parametrize("option", ["--part-id", "--request-id", "--model"])
def test_an_export_of_one_part_refuses_an_empty_id(tmp_path, option):
    """`records export --part-id "$SERIAL"` from an audit script whose variable came out empty exported every
    part's inspections as that part's (an empty filter means any, as an empty dropdown on the page does)."""
    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    store.add_many([row(1), row(2)])
    store.close()
    out = tmp_path / "audit.csv"
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), option, "",
                                 "--out", str(out)])
    assert r.exit_code == 2 and f"{option} is empty" in r.output, r.output
    assert not out.exists()


def test_an_export_reads_and_never_creates_or_migrates(tmp_path):
    """A report is read-only: a wrong --data-dir is an error, not a new empty database and "exported 0"; a database
    at an older schema is left for its owner's `anomaly db upgrade`; times take offsets as the HTTP API does."""
    missing = tmp_path / "typo"
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(missing)])
    assert r.exit_code == 2 and "no records database" in r.output and not missing.exists()
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(missing),
                                 "--since", "0001-01-01T00:00:00+01:00"])
    assert r.exit_code == 2 and "in range" in r.output  # no UTC equivalent: said, not a traceback
    old = tmp_path / "old"
    store = RecordStore.open(None, old)
    store.upgrade("0002")
    store.close()
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(old)])
    assert r.exit_code == 2 and "anomaly db upgrade" in r.output
    store = RecordStore.open(None, old)
    assert store.current_revision() == "0002"  # untouched
    store.upgrade()
    record_one(store, "p1")
    for since, rows in (("2000-01-01T00:00:00+02:00", 1), ("2999-01-01T00:00:00Z", 0)):
        r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(old), "--format", "jsonl",
                                     "--since", since])
        assert r.exit_code == 0, r.output
        assert len(r.stdout.splitlines()) == rows
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(old), "--since", "2026-12-02",
                                 "--until", "2026-12-01T23:00:00+02:00"])  # 21:00Z, before since
    assert r.exit_code == 2 and "is after --until" in r.output


def test_a_select_only_reporting_role_exports(postgres_url, tmp_path, monkeypatch):
    """deploy/README.md gives a reporting role SELECT on inspections and reviews; the export runs with just that
    (it used to migrate first, which needs far more, and a plant trial's role failed on alembic_version)."""
    import psycopg

    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    record_one(store, "r1")
    role = f"reporter_{os.getpid()}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON inspections, reviews TO {role}")
    url = postgres_url.replace("//postgres@", f"//{role}@")
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)  # no ./data here: the pictures' directory is not needed
    r = CliRunner().invoke(cli, ["records", "export", "--database-url", url, "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["part_id"] for line in r.stdout.splitlines()] == ["r1"]


def test_db_upgrade_of_an_unreachable_database_is_one_error_line(tmp_path):
    r = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none"])
    assert r.exit_code == 2 and r.output.startswith("error: records database") and "Traceback" not in r.output


def test_a_database_password_in_the_urls_query_is_never_shown(tmp_path):
    """libpq takes the password as a query parameter too: the commands' messages (and the service's log lines,
    which print the same redacted URL) showed that one in clear."""
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none?sslmode=disable&password=hunter2pw&sslpassword=keypw"
    r = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert r.exit_code == 2 and "127.0.0.1:1/none" in r.output, r.output
    assert "hunter2pw" not in r.output and "keypw" not in r.output and "password=***" in r.output, r.output
    backup = CliRunner().invoke(cli, ["db", "backup", "--database-url", url, "--out", str(tmp_path / "x.db")])
    command = backup.output.split("`")[1]  # the pg_dump line it suggests: a password there is in every shell history
    assert command.endswith("'postgresql://nobody@127.0.0.1:1/none?sslmode=disable'"), backup.output
    assert "hunter2pw" not in backup.output and "keypw" not in backup.output


@pytest.mark.parametrize("url", ["postgresql+psycopg://nobody:p@ss:w0rd9@127.0.0.1:1/none",
                                 "postgresql+psycopg://nobody:w0rd9@127.0.0.1:54x32/none", "not a url w0rd9"])
def test_a_url_that_cannot_be_read_is_one_error_naming_the_setting_and_no_part_of_it(url):
    """SQLAlchemy ends a password at its first '@' and reads the rest as host and port: a password holding an '@'
    before a ':' failed with "invalid literal for int() with base 10: 'w0rd9@127.0.0.1:1'", its tail in clear and no
    word of which setting was wrong. Every URL that cannot be read now says so, quoting none of it."""
    for args in (["db", "upgrade", "--database-url", url], ["records", "export", "--database-url", url]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "w0rd9" not in r.output and "database URL" in r.output, r.output
        assert "Traceback" not in r.output


def test_a_password_with_an_unencoded_at_sign_is_never_shown_in_part(tmp_path):
    """A password holding an '@' not written as %40: SQLAlchemy ends it at the first '@' and reads the rest as the
    host, so the masked URL (in the commands' messages, the service's start-up line, the suggested pg_dump command)
    and the driver's 'failed to resolve host' showed the password's tail in clear. It is refused, saying how."""
    url = "postgresql+psycopg://nobody:pa@ss-tail-9@127.0.0.1:1/none"
    r = CliRunner().invoke(cli, ["db", "upgrade", "--database-url", url])
    assert r.exit_code == 2 and "ss-tail-9" not in r.output, r.output
    assert "nobody:***@127.0.0.1:1/none" in r.output and "%40" in r.output, r.output
    backup = CliRunner().invoke(cli, ["db", "backup", "--database-url", url, "--out", str(tmp_path / "x.db")])
    assert "ss-tail-9" not in backup.output and "records.dump postgresql://nobody@127.0.0.1:1/none`" in backup.output, \
        backup.output
    assert RecordStore.open(url.replace("pa@ss", "pa%40ss"), None).url.endswith("@127.0.0.1:1/none")  # encoded: fine


def test_a_csv_export_never_carries_a_formula(tmp_path):
    """Part ids and context come from clients; a cell starting with = + - @ would run as a formula in a
    spreadsheet, so the export shows it as text."""
    _recorded_alone(tmp_path, pending(b"x", part_id='=HYPERLINK("http://x/?"&A1,"click")', line="-1+2",
                                      station="@SUM(A1)"))
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path), "--format", "csv"])
    assert r.exit_code == 0, r.output
    import csv
    import io

    [row] = list(csv.DictReader(io.StringIO(r.stdout)))
    assert row["part_id"] == "'=HYPERLINK(\"http://x/?\"&A1,\"click\")"
    assert row["line"] == "'-1+2" and row["station"] == "'@SUM(A1)" and float(row["score"]) == 3.0


def test_a_csv_export_starts_no_formula_where_a_semicolon_or_spaces_start_a_cell(tmp_path):
    """A spreadsheet in a decimal-comma locale splits a .csv on semicolons, where the comma's quoting does not hold:
    a part id 'SN3;=cmd|...;x' was exported as it came, and its middle became a cell of its own that runs as a formula
    (as does ' =1+1' in a spreadsheet that trims cells). Read the export as either kind of spreadsheet does. A JSON
    cell (meta) reads back as the values the client sent: the guard's ' went inside its strings ('A;'-2+3')."""
    import csv
    import io

    meta = {"lot": "A;-2+3", "a": "=1+1", "b": "+1", "c": "-1", "d": "@SUM(A1)", "e": ";=1", "f": 'x;"@y', "g": "; @z"}
    _recorded_alone(tmp_path, pending(b"x", part_id="SN3;=cmd|' /C calc'!A0;x", line=" =1+1",
                                      station='lot;"@SUM(A1)', meta=meta))
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path), "--format", "csv"])
    assert r.exit_code == 0, r.output
    for separator in (",", ";"):
        cells = [c for row in csv.reader(io.StringIO(r.stdout), delimiter=separator) for c in row]
        formulas = [c for c in cells if c.lstrip(' "')[:1] in ("=", "+", "-", "@")]
        assert not formulas, (separator, formulas)
    [row] = list(csv.DictReader(io.StringIO(r.stdout)))  # the text is all there, marked where a cell could start
    assert row["part_id"] == "SN3;'=cmd|' /C calc'!A0;x" and row["line"] == "' =1+1"
    assert row["station"] == "lot;'\"@SUM(A1)" and json.loads(row["meta"]) == meta and ";" not in row["meta"]


def test_a_csv_export_for_excel_carries_the_utf8_mark_and_every_name_whole(tmp_path):
    """A plant opens the export by double-clicking it: Excel reads a CSV without a byte order mark in its own code
    page, so 'Prüfteil Ø12' showed as 'PrÃ¼fteil Ã˜12' and Chinese names as noise. --bom starts the file with the
    mark; without it the file stays as scripts read it (a first column named `id`), and JSON lines refuse it."""
    import csv
    import io

    _recorded_alone(tmp_path / "data", pending(b"x", part_id="Prüfteil Ø12 😀", line="零件/良品", station="Linie Süd"))
    out = tmp_path / "Bericht Prüfung.csv"
    base = ["records", "export", "--data-dir", str(tmp_path / "data"), "--format", "csv", "--out", str(out)]
    r = CliRunner().invoke(cli, [*base, "--bom"])
    assert r.exit_code == 0, r.output
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfid,created_at,") and raw.count(b"\xef\xbb\xbf") == 1
    [row] = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    assert (row["part_id"], row["line"], row["station"]) == ("Prüfteil Ø12 😀", "零件/良品", "Linie Süd")
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--format", "csv",
                                 "--bom"])  # to stdout, as a script pipes it into a file
    assert r.exit_code == 0 and r.stdout_bytes.startswith(b"\xef\xbb\xbfid,"), r.output
    assert CliRunner().invoke(cli, base).exit_code == 0 and out.read_bytes().startswith(b"id,created_at,")
    r = CliRunner().invoke(cli, [*base[:-4], "--format", "jsonl", "--bom"])
    assert r.exit_code == 2 and "--bom" in r.output and "--format csv only" in r.output


def test_an_export_to_a_full_disk_fails_in_one_line_and_leaves_the_earlier_file(tmp_path):
    """`records export --out` on a volume that fills up: a traceback, and the file at --out cut short (an earlier
    export there overwritten by a part of this one), which a quality report then read as complete. The export is
    written beside it and renamed once whole: an error line, and the earlier file as it was."""
    from conftest import fill, mounted

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    for i in range(40):  # more than the page the earlier file frees when it is truncated
        rec.submit(pending(b"x", part_id=f"p{i}"))
    rec.stop()
    store.close()
    with mounted(tmp_path / "reports", "1m") as reports:
        out = reports / "parts.csv"
        r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                                     "--model", "other"])  # last week's: no part of this model
        assert r.exit_code == 0, r.output
        earlier = out.read_bytes()
        filler = fill(reports)
        r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                                     "--format", "jsonl"])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output  # an exception would exit 1
        assert "error: cannot write the export to" in r.output and "No space left on device" in r.output
        assert out.read_bytes() == earlier and sorted(p.name for p in reports.iterdir()) == ["filler", "parts.csv"]
        filler.unlink()
        r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                                     "--format", "jsonl"])
        assert r.exit_code == 0 and len(out.read_text().splitlines()) == 40, r.output
    import stat

    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", "/dev/null"])
    assert r.exit_code == 0 and stat.S_ISCHR(os.stat("/dev/null").st_mode), r.output  # a device: written, not replaced


def test_an_export_renamed_over_an_earlier_one_keeps_its_mode(tmp_path):
    """`records export --out` renames a new file over the earlier one: a report made private (0600) came back 0644,
    readable by every user of the machine, reviewers' names included. It keeps the earlier file's mode now; a new
    file gets the umask's, as before."""
    import stat

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    store.close()
    private, fresh = tmp_path / "private.csv", tmp_path / "fresh.csv"
    private.write_text("last week\n")
    private.chmod(0o600)
    old = os.umask(0o022)
    try:
        for out in (private, fresh):
            r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
            assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    assert private.read_text().startswith("id,") and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_an_export_to_a_file_whose_name_takes_the_whole_limit_is_written(tmp_path):
    """The partial file beside --out was named `.NAME.<random>.partial`: for a name near the file system's limit
    (255 bytes) that name did not fit, and the export failed. It takes its name as every file written whole does
    (whole_file.open_beside: the start of the name only)."""
    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    store.close()
    out = tmp_path / ("r" * 240 + ".csv")
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith("id,") and [p.name for p in tmp_path.iterdir() if p.name != "data"] == [out.name]


def test_two_exports_to_one_file_at_once_each_rename_a_whole_file(postgres_url, tmp_path):
    """Two `records export --out FILE` at once (cron runs that overlap) shared one partial file beside FILE: the one
    renamed last was a mix of both exports, the first said it had exported them all, and the other said the file
    there was unchanged. Each export writes its own partial file now: FILE is whichever finished last, whole."""
    import subprocess
    import sys

    import psycopg

    store = RecordStore.open(postgres_url, tmp_path)
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    for i in range(3):
        rec.submit(pending(b"x", part_id=f"pg{i}"))
    rec.stop()
    store.close()
    local = RecordStore.open(None, tmp_path / "data")
    local.upgrade()
    record_one(local, "sqlite")
    local.close()
    out = tmp_path / "parts.csv"
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as lock:  # holds the first export at its query
        lock.execute("LOCK TABLE inspections IN ACCESS EXCLUSIVE MODE")
        first = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "records", "export", "--database-url",
                                  postgres_url, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".parts.csv*partial")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.glob(".parts.csv*partial")), "the first export never began writing"
        r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
        assert r.exit_code == 0 and out.read_text().splitlines()[1].count("sqlite") == 1, r.output
        lock.rollback()
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "exported 3 inspection(s)" in output, output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,") and len(lines) == 4 and "sqlite" not in out.read_text(), lines
    assert not list(tmp_path.glob(".parts.csv*")), "a partial file was left"


def test_a_sqlite_file_deleted_while_recording_is_made_again(tmp_path, caplog):
    """Deleted under a running service, the SQLite file kept taking records through pooled connections, all lost
    at the next restart: the writer now notices, logs it, and records into a new file at the path; a file put in
    its place is said so and taken; batches into the file as it was say nothing (each said it was replaced, had the
    check compared nothing)."""
    store = RecordStore.open(None, tmp_path)
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    before = pending(b"a")
    with caplog.at_level("ERROR"):
        caplog.clear()
        for data in (b"a0", b"a1"):  # batches into the file as it was: nothing said
            rec.submit(pending(data))
            assert rec.flush(10)
        rec.submit(before)
        assert rec.flush(10)
        assert "while the service ran" not in caplog.text, caplog.text
        for f in tmp_path.glob("records.db*"):
            f.unlink()
        after = pending(b"b")
        rec.submit(after)
        assert rec.flush(10)
        assert "was deleted while the service ran; records now go to a new file at that path" in caplog.text
        reopened = RecordStore.open(None, tmp_path)  # what a restart sees
        assert reopened.get(after.id) is not None and reopened.get(before.id) is None
        reopened.close()
        caplog.clear()
        import shutil

        shutil.copy(tmp_path / "records.db", tmp_path / "copy.db")  # a file put in its place (a restore by hand)
        os.replace(tmp_path / "copy.db", tmp_path / "records.db")
        last = pending(b"c")
        rec.submit(last)
        assert rec.flush(10)
        assert "was replaced while the service ran; records now go to the file now at that path" in caplog.text
    rec.stop()
    store.close()
    reopened = RecordStore.open(None, tmp_path)
    assert reopened.get(last.id) is not None
    reopened.close()


def test_a_sqlite_file_read_only_when_connected_is_written_again_once_it_is_writable(tmp_path, monkeypatch):
    """A records.db the service could only open read-only (a restore left it read-only, a volume mounted so):
    SQLite opens such a file read-only and the pooled connection stays so. Once the file was writable again every
    retry still said "attempt to write a readonly database", and after 10 minutes each batch was dropped, until a
    restart. The writer now opens its connections again on that error, and the records resume."""
    from anomaly_service.records import recorder as recorder_module

    from conftest import mounted

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    store = RecordStore.open(None, tmp_path)
    store.upgrade()
    store.engine.dispose()  # no connection opened before the file is read-only
    rec = Recorder(store, "none")
    rec.start()
    try:
        with mounted(tmp_path / "records.db"):  # read-only for every opener, root too
            assert rec.submit(pending(b"x", anomaly=False))
            time.sleep(1.0)  # several retries, each refused
            assert rec.written == 0 and rec.dropped.get("invalid", 0) == 0
        assert rec.flush(10)  # writable again: no restart
        assert rec.written == 1 and sum(rec.dropped.values()) == 0
    finally:
        rec.stop()
        store.close()
    reopened = RecordStore.open(None, tmp_path)
    assert reopened.count() == 1
    reopened.close()


@contextlib.contextmanager
def _recording_after_its_data_dir_went(data, monkeypatch):
    """A recorder that keeps no pictures, quick to retry, whose first record is written before ``data`` (its whole
    --data-dir) is removed under it; a restart's store must then hold the record submitted after."""
    import shutil

    from anomaly_service.records import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    store = RecordStore.open(None, data)
    store.upgrade()
    rec = Recorder(store, "none")
    rec.start()
    after = pending(b"b")
    try:
        rec.submit(pending(b"a"))
        assert rec.flush(10)
        shutil.rmtree(data)
        yield rec, after
    finally:
        rec.stop()
        store.close()
    reopened = RecordStore.open(None, data)  # what a restart sees
    assert reopened.get(after.id) is not None
    reopened.close()


def test_a_data_directory_removed_while_recording_is_made_again(tmp_path, monkeypatch):
    """The whole --data-dir removed under a running service that keeps no pictures: SQLite cannot make a file in a
    directory that is not there, so every retry said "unable to open database file" and each batch was dropped
    after 10 minutes, until a restart (a picture to store made the directory again, which hid it). The writer now
    makes the directory again with the database."""
    with _recording_after_its_data_dir_went(tmp_path / "data", monkeypatch) as (rec, after):
        rec.submit(after)
        assert rec.flush(10) and rec.written == 2 and sum(rec.dropped.values()) == 0


def test_a_data_directory_removed_where_it_cannot_be_made_again_yet_is_retried_not_dropped(tmp_path, monkeypatch):
    """The --data-dir removed and its parent read-only for a while (a volume remounted read-only): making the
    directory again raised an OSError the writer does not retry, so every batch was dropped at once, as "cannot
    write", while /readyz said recording "on". It is a database that cannot be opened yet: retried, /readyz says
    "retrying", and the records go in once the directory can be made."""
    from conftest import mounted

    volume = tmp_path / "volume"
    with _recording_after_its_data_dir_went(volume / "data", monkeypatch) as (rec, after):
        with mounted(volume):
            rec.submit(after)
            deadline = time.monotonic() + 10
            while not rec.retrying and not rec.dropped and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rec.retrying and not rec.dropped, rec.dropped
        assert rec.flush(10) and rec.written == 2 and not rec.dropped and not rec.retrying


def test_every_sqlite_connection_keeps_foreign_keys_on_after_a_migration_turned_them_off(tmp_path):
    """The migrations run with SQLite's foreign keys off (a table copy and drop would otherwise delete every review)
    on a connection that then goes back to the pool: each connection the store hands out has them on again, so a
    review of no inspection is refused by the database itself."""
    store = RecordStore.open(None, tmp_path / "data")
    try:
        store.upgrade("0005")
        store.upgrade()
        store.downgrade("0008")
        store.upgrade()
        with contextlib.ExitStack() as held:  # the migrations' pooled connection and new ones, at once
            for conn in [held.enter_context(store.engine.connect()) for _ in range(3)]:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO reviews (inspection_id, verdict, reviewer, created_at) "
                                 "VALUES ('none', 'good', 'qa', '2024-01-01 00:00:00')"))
    finally:
        store.close()


def test_a_migration_that_would_leave_a_review_of_no_inspection_changes_nothing(tmp_path):
    """SQLite's foreign keys are off while the migrations copy and drop tables; their check before the commit is
    what stands between a migration and reviews that lost their inspection. A database holding one already (written
    with the keys off) is refused whole: the schema and the review as they were."""
    store = RecordStore.open(None, tmp_path / "data")
    try:
        store.upgrade("0008")
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
            conn.execute(sa.text("INSERT INTO reviews (inspection_id, verdict, reviewer, created_at) "
                                 "VALUES ('none', 'good', 'qa', '2024-01-01 00:00:00')"))
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()
        store.engine.dispose()
        with pytest.raises(SchemaError, match="reviews of no inspection; nothing was changed"):
            store.upgrade()
        assert store.current_revision() == "0008"
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT inspection_id FROM reviews")).scalars().all() == ["none"]
    finally:
        store.close()


def test_a_downgrade_of_a_database_without_a_schema_says_so_and_touches_nothing(tmp_path):
    store = RecordStore.open(None, tmp_path / "data")
    try:
        with pytest.raises(SchemaError, match="has no schema yet: nothing to downgrade"):
            store.downgrade("0005")
        assert store.current_revision() is None
    finally:
        store.close()


def test_database_url_defaults_to_sqlite_under_the_data_dir(tmp_path):
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'records.db'}"
    with pytest.raises(ValueError, match="psycopg"):
        RecordStore("postgresql://u@h/db", tmp_path)


def test_a_second_process_on_one_sqlite_file_is_warned_about(tmp_path, caplog):
    """The warning names the process that holds the data directory (its pid and host, written in the lock file); the
    holder asked again (a data directory a full volume refused, made since) is told nothing of itself."""
    (tmp_path / "records.db.owner").write_text("pid 1 on a-host-long-gone-and-its-pid-too\n")  # a killed holder's
    a, b = RecordStore.open(None, tmp_path), RecordStore.open(None, tmp_path)
    with caplog.at_level("WARNING"):
        caplog.clear()
        assert a.warn_if_shared() is False
        assert a.warn_if_shared() is False
        assert caplog.text == ""
        assert b.warn_if_shared() is True
    assert "PostgreSQL" in caplog.text
    assert f"records: pid {os.getpid()} on {os.uname().nodename} already writes" in caplog.text, caplog.text
    assert "long-gone" not in caplog.text
    a.close(), b.close()


def test_a_picture_drawn_from_a_stored_file_goes_with_it(tmp_path):
    """A photo's thumbnail is kept beside it: retention counts its bytes with the photo's, judges it by the photo's
    age and removes it with the photo; none is kept for a photo already gone; one left without its photo (a crash
    between the two deletes) is no stored file: it is not listed, and ``remove_orphans`` removes it, whatever the
    rules (test_no_thumbnail_outlives_its_photo_after_a_pass runs the races through a pass)."""
    from anomaly_service.records.files import DERIVED_MARK, FileStore, derived_key

    files = FileStore(tmp_path)
    photo = files.put(b"p" * 1000, "png")
    other = files.put(b"q" * 1000, "png")
    assert files.put_derived(photo, "thumb256-16bit.jpg", b"t" * 100) == derived_key(photo, "thumb256-16bit.jpg")
    assert files.read_derived(photo, "thumb256-16bit.jpg") == b"t" * 100
    assert files.read_derived(other, "thumb256-16bit.jpg") is None
    old = time.time() - 10 * 86400
    os.utime(files.path(photo), (old, old))
    listed = files.files()
    assert [(f.path, f.bytes) for f in listed] == [(files.path(photo), 1100), (files.path(other), 1000)]
    assert listed[0].derived == (files.path(derived_key(photo, "thumb256-16bit.jpg")),)
    expired, over, _ = files.select_expired(5 * 86400, None)
    assert expired == listed[:1] and over == []
    assert files.remove(expired) == 1100
    assert not files.path(photo).exists() and not list(files.root.rglob(f"*{DERIVED_MARK}*"))
    assert files.put_derived(photo, "thumb256-16bit.jpg", b"t") is None  # its photo is gone: nothing kept
    assert files.read_derived(photo, "thumb256-16bit.jpg") is None
    # a thumbnail whose photo went by another way is not a stored file: it is removed on its own
    files.put_derived(other, "thumb256-12bit.jpg", b"u" * 10)
    files.path(other).unlink()
    assert files.files() == [] and files.select_expired(None, 1) == ([], [], [])
    assert files.remove_orphans() == 10 and not list(files.root.rglob(f"*{DERIVED_MARK}*"))


def test_one_record_the_database_cannot_encode_costs_only_itself_not_its_batch(store):
    """A lone surrogate (a file name in another code page, read by Python) has no UTF-8 form: the driver refuses
    that row before the database sees it. The batch it came in with must still be written."""
    store.upgrade()
    rec = Recorder(store, "none")
    batch = [pending(b"a", part_id="P1"), pending(b"b", part_id="caf\udce9.png"), pending(b"c", part_id="P3")]
    for p in batch:  # submitted before the writer starts: one batch
        assert rec.submit(p)
    rec.start()
    rec.stop()
    assert rec.written == 2 and rec.dropped == {"invalid": 1}
    assert sorted(r.part_id for r in store.query(Filters())) == ["P1", "P3"]


def test_cli_records_a_file_whose_name_is_not_utf8(tmp_path, model_dir):
    """A photo named under another code page (a Latin-1 name copied from an old PC) is recorded like any other:
    its part id spells the byte that is not UTF-8 as an escape, readable in every export."""
    path = tmp_path / os.fsdecode(b"caf\xe9.png")
    path.write_bytes(png_bytes(textured_part(np.random.default_rng(5))))
    data = tmp_path / "data"
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data), "--json",
                                 str(path)])
    assert r.exit_code == 0, r.output
    assert "recorded 1 inspection(s)" in r.output and "lost" not in r.output
    store = RecordStore.open(None, data)
    try:
        assert [x.part_id for x in store.iter_all()] == ["caf\\xe9.png"]
    finally:
        store.close()


def test_cli_records_a_file_whose_name_is_longer_than_the_part_id_column(tmp_path, model_dir, postgres_url):
    """A photo's file name may take a file system's whole limit, longer than the part id column: PostgreSQL refused
    the record (lost, exit 1), and SQLite kept one `db copy` could not take to PostgreSQL. Its part id is the name's
    head and a hash of the whole, as a re-scoring run names a long key, and the name is in the record's meta."""
    name = "L" * 230 + ".png"
    (tmp_path / name).write_bytes(png_bytes(textured_part(np.random.default_rng(5))))
    r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--database-url", postgres_url,
                                 "--json", str(tmp_path / name)])
    assert r.exit_code == 0 and "recorded 1 inspection(s)" in r.output, r.output
    store = RecordStore.open(postgres_url, None)
    try:
        [got] = store.iter_all()
        assert len(got.part_id) == 200 and got.part_id.startswith("LLL") and got.meta == {"file_name": name}
    finally:
        store.close()


def test_a_record_bigger_than_the_buffer_bytes_is_kept_when_the_buffer_is_empty(tmp_path):
    """A 36 MP anomaly (within --max-pixels) holds two photo-sized float maps until its heatmap is drawn, more than
    the buffer's byte cap: it was dropped as buffer_full on an idle service, so the very parts worth keeping were
    never recorded. Alone in the buffer it is taken, as the admission budgets take an image larger than themselves."""
    from anomaly_service.records.recorder import BUFFER_MAX_BYTES

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    rec = Recorder(store, "all")
    big = pending(b"big", part_id="P36MP")
    big.map_bytes = BUFFER_MAX_BYTES
    assert rec.submit(big)
    second = pending(b"next")
    second.map_bytes = BUFFER_MAX_BYTES
    assert not rec.submit(second) and rec.dropped == {"buffer_full": 1}  # the cap still holds beside it
    rec.start()
    rec.stop()
    assert [r.part_id for r in store.query(Filters())] == ["P36MP"]
    store.close()


def test_a_record_saved_with_a_name_in_another_code_page_reads_back_as_text(tmp_path):
    """Before training names were made text, a flagged part's regions named a training file in another code page
    as a lone surrogate; SQLite kept it, and every page of /inspections holding that record failed to encode."""
    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    store.add_many([row(regions=[{"nearest_normal": {"name": "good/p\udce9.png"}}])], {})
    got = store.query(Filters())[0]
    assert got.regions == [{"nearest_normal": {"name": "good/p\\xe9.png"}}]
    store.close()


def test_cli_score_exits_1_when_a_record_could_not_be_written(tmp_path, model_dir, monkeypatch):
    """A script that scores and records must see that a part's record is missing: the line printed its id and the
    exit code said success while the database refused it (here another process holds it locked throughout)."""
    import sqlite3

    from anomaly_service.records import recorder

    monkeypatch.setattr(recorder, "STOP_TIMEOUT_S", 2.0)  # the stop gives up as it would at its 15 s, only sooner
    photo = tmp_path / "part.png"
    photo.write_bytes(png_bytes(textured_part(np.random.default_rng(5))))
    data = tmp_path / "data"
    assert CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(data)]).exit_code == 0
    holder = sqlite3.connect(data / "records.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), "--data-dir", str(data),
                                     str(photo)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "1 lost" in r.output
    assert r.exit_code == 1 and "could not be written" in r.output, r.output


def test_cli_score_stopped_by_sigterm_writes_the_records_of_the_ids_it_printed(tmp_path, model_dir):
    """A systemd or container stop of `anomaly score --data-dir` killed it at once: the ids it had printed named
    records still in its buffer, never written, and the exit said nothing (an adversarial pass: 2 printed, 0 in the
    database). A stop ends it as Ctrl-C does, after the buffered records are written."""
    import signal
    import sqlite3
    import subprocess
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    data = png_bytes(textured_part(np.random.default_rng(6)))
    for i in range(400):  # far more than it scores before the stop
        (photos / f"p{i:03d}.png").write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model_dir / "part"),
                             "--data-dir", str(tmp_path / "data"), str(photos)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = [proc.stdout.readline(), proc.stdout.readline()]
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    ids = [line.split("\t")[-1].strip() for line in printed + rest.splitlines() if line.strip()]
    assert proc.returncode == 130 and "error: interrupted" in err, err
    assert 2 <= len(ids) < 400 and "recorded " in err  # a part stopped between its record and its line: one more
    with sqlite3.connect(tmp_path / "data" / "records.db") as db:
        written = {row[0] for row in db.execute("SELECT id FROM inspections")}
    assert set(ids) <= written


def _reviews(store: RecordStore, inspection_id: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT verdict, created_at FROM reviews WHERE inspection_id = :i ORDER BY id"), {"i": inspection_id})]


def _rows(store: RecordStore) -> dict[str, dict]:
    """Every inspection as the database holds it, by id, whatever the schema's revision (the classes read only
    the newest)."""
    with store.engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM inspections")).mappings()}


def _columns(store: RecordStore, table: str) -> dict[str, bool]:
    return {c["name"]: c["nullable"] for c in sa.inspect(store.engine).get_columns(table)}


def test_a_downgrade_takes_the_schema_back_keeping_what_the_earlier_one_holds(store):
    """Going back to an earlier release meant restoring a backup, losing every record made since. A downgrade keeps
    them: an undone review goes with its undo, so each verdict and its remaining history still agree, and the
    schema comes back up to one that matches the tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from anomaly_service.records.models import Base

    store.upgrade()
    t0 = datetime(2026, 1, 5, 8, tzinfo=timezone.utc)
    a, b, c = row(0, at=t0, warnings=["far from the training size"], request_id="MES-1", scorers=OPINIONS), \
        row(1, at=t0 + timedelta(seconds=1)), row(2, at=t0 + timedelta(seconds=2))
    store.add_many([a, b, c])
    store.review(a.id, "good", "qa")
    kept_at = store.get(a.id).reviewed_at
    bad = store.review(a.id, "defect", "qa").reviews[-1].id
    store.undo_review(a.id, bad, "qa")                                  # a: good, as before the slip
    store.undo_review(b.id, store.review(b.id, "defect", "qa").reviews[-1].id, "qa")  # b: unreviewed again
    store.review(c.id, "defect", "qa")
    assert [r for r, _ in store.downgrade_plan("0004")] == ["0011", "0010", "0009", "0008", "0007", "0006", "0005"]
    assert store.downgrade("0008") == (store.head_revision(), "0008")
    assert not {"part_id_composed", "line_composed"} & set(_columns(store, "inspections"))
    assert store.downgrade("0006") == ("0008", "0006")
    assert not {"request_id", "scorers", "runtime", "threads"} & set(_columns(store, "inspections"))
    assert store.downgrade("0005") == ("0006", "0005")
    assert "undoes" not in _columns(store, "reviews") and _columns(store, "reviews")["verdict"] is False
    assert [v for v, _ in _reviews(store, a.id)] == ["good"] and _reviews(store, b.id) == []
    assert [v for v, _ in _reviews(store, c.id)] == ["defect"]
    with store.engine.connect() as conn:
        got = dict(conn.execute(sa.text("SELECT id, verdict FROM inspections")).all())
        at = dict(conn.execute(sa.text("SELECT id, reviewed_at FROM inspections")).all())
    assert got == {a.id: "good", b.id: None, c.id: "defect"} and at[b.id] is None
    assert _reviews(store, a.id)[0][1] == at[a.id]  # reviewed when its remaining review was made, not at the undo
    assert store.downgrade("0004") == ("0005", "0004") and "warnings" not in _columns(store, "inspections")
    assert store.upgrade() == ("0004", store.head_revision())  # and up again, to tables that match the classes
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    back = store.get(a.id)
    assert back.verdict == "good" and back.reviewed_at == kept_at and not back.warnings and back.request_id is None
    assert back.scorers is None
    assert [r.id for r in store.query(Filters(), 10)] == [c.id, b.id, a.id]


def _schema(store: RecordStore) -> dict[str, tuple]:
    """Each table of ours as the database describes it: columns (type, nullable, default), primary key, indexes
    (columns, unique, a partial index's condition) and foreign keys (what they point at and their ON DELETE)."""
    insp = sa.inspect(store.engine)
    out = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        columns = sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                         for c in insp.get_columns(table))
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]),
                          str(sorted((k, str(v)) for k, v in (i.get("dialect_options") or {}).items())))
                         for i in insp.get_indexes(table))
        keys = sorted((tuple(k["constrained_columns"]), k["referred_table"], tuple(k["referred_columns"]),
                       str(sorted((k.get("options") or {}).items()))) for k in insp.get_foreign_keys(table))
        out[table] = (columns, tuple(insp.get_pk_constraint(table)["constrained_columns"]), indexes, keys)
    return out


def test_a_downgrade_to_each_revision_leaves_the_schema_that_revision_made(store, tmp_path):
    """Each step down is the undoing of its step up: the tables, columns, indexes and keys a downgrade to a revision
    leaves are those an upgrade to it made (no test went below 0002, and none compared what the steps it took left:
    a downgrade that kept an index, a column or a table of a later revision passed)."""
    order = sorted(store.known_revisions())
    made = {}
    for revision in order:  # made step by step on the fixture's database
        store.upgrade(revision)
        made[revision] = _schema(store)
    assert len({str(v) for v in made.values()}) == len(order)  # every revision changes what is described
    for revision in reversed(order[:-1]):  # and taken back down step by step
        assert store.downgrade(revision)[1] == revision
        assert _schema(store) == made[revision], revision


def test_db_downgrade_says_what_it_loses_asks_and_refuses_what_it_cannot_do(tmp_path):
    data = tmp_path / "data"
    s = RecordStore.open(None, data)
    s.upgrade()
    s.add_many([row(0)])
    run = CliRunner().invoke
    r = run(cli, ["db", "downgrade", "--to", "0099", "--yes", "--data-dir", str(data)])
    assert r.exit_code != 0 and "no schema revision 0099" in r.output, r.output
    r = run(cli, ["db", "downgrade", "--to", "0005", "--data-dir", str(data)], input="n\n")
    head = s.head_revision()
    assert r.exit_code != 0 and "0006: each undone review" in r.output and s.current_revision() == head
    assert not s.warn_if_shared()  # a service holds the directory, as `anomaly serve` does
    r = run(cli, ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(data)])
    assert r.exit_code != 0 and "stop the service first, then downgrade" in r.output and \
        s.current_revision() == head
    s.close()
    r = run(cli, ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(data)])
    assert r.exit_code == 0 and f"schema {head} -> 0005" in r.output, r.output
    # run again (a retry whose first answer was lost, a playbook run twice): nothing to undo, as a second upgrade
    r = run(cli, ["db", "downgrade", "--to", "0005", "--yes", "--data-dir", str(data)])
    assert r.exit_code == 0 and "schema 0005 already, nothing to undo" in r.output, r.output
    r = run(cli, ["db", "downgrade", "--to", "0006", "--yes", "--data-dir", str(data)])
    assert r.exit_code != 0 and "older than 0006" in r.output and s.current_revision() == "0005", r.output
    newer = RecordStore.open(None, data)  # an earlier release names the way back from a database newer than it
    with newer.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match=f"anomaly db downgrade --to {newer.head_revision()}"):
        newer.upgrade()
    newer.close()


def test_a_downgrade_past_a_copied_inspections_table_keeps_every_review(store):
    """On SQLite, undoing 0005 (or 0003) copies the inspections table and drops the old one; with foreign keys on,
    the drop deleted every review (ON DELETE CASCADE), while the downgrade said it lost only warnings. The keys
    are on again afterwards: deleting a record still deletes its reviews."""
    store.upgrade()
    a, b = row(0), row(1)
    store.add_many([a, b])
    store.review(a.id, "good", "qa")
    store.review(b.id, "defect", "qa")
    store.downgrade("0002")
    assert [v for v, _ in _reviews(store, a.id)] == ["good"] and [v for v, _ in _reviews(store, b.id)] == ["defect"]
    store.upgrade()
    assert [r.verdict for r in store.get(a.id).reviews] == ["good"]
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM inspections WHERE id = :i"), {"i": b.id})
    assert _reviews(store, b.id) == [] and len(_reviews(store, a.id)) == 1


def test_a_new_sqlite_database_is_private_as_the_pictures_are(tmp_path):
    """SQLite made records.db (and its -wal and -shm, which take its mode) 0644 under the usual umask, while the
    pictures beside it are 0600: any local user of the host read the view tokens in it, which open those pictures
    over HTTP. A database made now is the service user's alone; one that exists keeps the mode it was given."""
    import stat

    from anomaly_service.records import RecordStore

    old = os.umask(0o022)
    try:
        s = RecordStore.open(None, tmp_path / "data")
        s.upgrade()
        s.add_many([row(1)])
        made = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("records.db")
                and p.name.endswith(("db", "-wal", "-shm"))]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in made}  # while it is open: its log beside it
        s.close()
        given = tmp_path / "given"
        given.mkdir()
        (given / "records.db").touch(mode=0o640)
        s = RecordStore.open(None, given)
        s.upgrade()
        s.close()
    finally:
        os.umask(old)
    assert modes == {"records.db": 0o600, "records.db-wal": 0o600, "records.db-shm": 0o600}
    assert stat.S_IMODE((given / "records.db").stat().st_mode) == 0o640


_UPGRADE_AT_ONCE = """
import sys, time
from pathlib import Path
from anomaly_service.records.store import RecordStore
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready for the start
while not go.exists():
    time.sleep(0.001)
try:
    RecordStore.open(None, Path(sys.argv[1])).upgrade()
    print("ok")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_processes_that_start_on_a_new_sqlite_database_together_each_get_its_schema(tmp_path):
    """Two shards of a cron line started in the same minute on a new data directory: SQLite runs the migrations'
    DDL outside a transaction, so one saw the other's tables before their revision was stamped and refused the
    database as of no release (exit 2, its shard not run)."""
    import subprocess
    import sys

    rounds = [(tmp_path / f"data{n}", tmp_path / f"go{n}") for n in range(2)]  # a race: twice, four at once each
    ready = [tmp_path / f"ready{n}" for n in range(4 * len(rounds))]
    procs = [subprocess.Popen([sys.executable, "-c", _UPGRADE_AT_ONCE, str(data), str(go), str(ready.pop())],
                              stdout=subprocess.PIPE, text=True) for data, go in rounds for _ in range(4)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.02)  # each has imported what it needs and waits for the start
    for _, go in rounds:
        go.touch()
    said = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert said == ["ok"] * len(procs), said


_SHARED_RANGE_LOCKED = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
want = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0x40000002, 510, 0)  # SQLite's shared byte range of a database file
print(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, want))[0] != fcntl.F_UNLCK)
"""


def test_a_migration_keeps_the_locks_another_thread_of_its_process_holds_on_the_database(tmp_path):
    """The turns migrations take on a new SQLite database are a lock file's, not the database's own: a descriptor of
    the database file opened and closed beside SQLite let go of every POSIX lock the process held on it, a reader's
    of another thread (the service's pool) included, so another process could write under it."""
    import sqlite3
    import subprocess
    import sys

    s = RecordStore.open(None, tmp_path)
    s.upgrade()
    reader = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM inspections").fetchall()  # a read under way: its shared lock held

        def locked() -> str:
            return subprocess.run([sys.executable, "-c", _SHARED_RANGE_LOCKED, str(tmp_path / "records.db")],
                                  capture_output=True, text=True, check=True).stdout.strip()

        assert locked() == "True"
        s.upgrade()  # a second store start-up in this process (the recorder's, after its database came back)
        assert locked() == "True"
    finally:
        reader.close()
        s.close()


def test_retention_selects_by_age_budget_and_free_space_exactly_at_their_bounds(tmp_path):
    """Which pictures a pass selects, file by file at each bound: an age of exactly the limit stays, a budget met
    exactly keeps the rest, the free space still needed counts what age and budget already give back, and the
    oldest go first. The pass-level tests remove every file or two of three, which a bound moved by one file passed."""
    from anomaly_service.records.files import FileStore

    files = FileStore(tmp_path)
    now = 1_000_000.0
    keys = [files.put(bytes([i]) * 100 * (i + 1), "png") for i in range(5)]  # 100, 200, ... 500 bytes
    for i, key in enumerate(keys):  # the first the oldest
        os.utime(files.path(key), (now - 50 + i, now - 50 + i))
    sizes = lambda fs: [f.bytes for f in fs]  # noqa: E731 - the files named by their sizes
    assert files.select_expired(50, None, now) == ([], [], [])  # exactly at the age limit: kept
    old, over, short = files.select_expired(49.5, None, now)
    assert sizes(old) == [100] and over == [] and short == []
    assert sizes(files.select_expired(None, 1500, now)[1]) == []  # within the budget (1500 bytes in all)
    assert sizes(files.select_expired(None, 1200, now)[1]) == [100, 200]  # 300 over: the two oldest give it exactly
    assert sizes(files.select_expired(None, 1199, now)[1]) == [100, 200, 300]
    assert sizes(files.select_expired(48.5, 800, now)[1]) == [300, 400]  # over, once the two old ones are gone
    old, over, short = files.select_expired(49.5, 1200, now, free_needed=600)
    assert (sizes(old), sizes(over), sizes(short)) == ([100], [200], [300])  # 300 given, 300 more needed
    assert sizes(files.select_expired(None, None, now, free_needed=301)[2]) == [100, 200, 300]
    assert files.select_expired(None, None, now, free_needed=0) == ([], [], [])


def test_retention_keeps_a_held_picture_and_marks_one_already_gone(tmp_path):
    """What a pass may delete, file by file: not a picture held for a record still on its way to the database (it
    goes once released), and a picture already gone from the disk is marked all the same, so no record keeps saying
    "stored" about it."""
    from anomaly_service.records.files import FileStore

    files = FileStore(tmp_path)
    held = files.put(b"h" * 100, "png", hold=True)
    gone = files.put(b"g" * 100, "png")
    listed = {files.key_of(f.path): f for f in files.files()}
    os.unlink(files.path(gone))
    marked: list[str] = []
    freed = files.remove(list(listed.values()), mark=marked.extend)
    assert marked == [gone] and freed == 0 and files.path(held).is_file()
    files.release([held])
    assert files.remove(files.files(), mark=marked.extend) == 100 and marked == [gone, held]
    assert not files.path(held).exists()


def test_a_pass_lists_only_the_stored_pictures_of_the_key_directories(tmp_path, caplog):
    """What a pass counts and may delete, without a database: nothing before the first picture (no files directory
    yet), then a stored picture with what was drawn from it, and not a picture still being written (its
    temporary), one a dead pass left set aside (put back later), a file named as a key directory or the volume's
    ``lost+found``; none of them is deleted by a budget of nothing, and a stray file is no directory to warn of."""
    from anomaly_service.records.files import ASIDE_PREFIX, FileStore

    files = FileStore(tmp_path)
    assert files.files() == [] and files.select_expired(0, 0) == ([], [], []) and files.remove_orphans() == 0
    key = files.put(b"a" * 100, "png")
    thumb = files.put_derived(key, "thumb", b"t" * 10)
    folder = files.path(key).parent
    writing = folder / ".tmp-writing"
    writing.write_bytes(b"w" * 50)
    aside = folder / (ASIDE_PREFIX + "f" * 64 + ".png")
    aside.write_bytes(b"s" * 70)
    (files.root / "ab").write_bytes(b"stray")
    (files.root / "lost+found").mkdir()
    (files.root / "lost+found" / "x.png").write_bytes(b"l" * 30)
    with caplog.at_level(logging.WARNING, logger="anomaly_service.records"):
        listed = files.files()
        assert [(f.path, f.bytes, f.derived) for f in listed] == [(files.path(key), 110, (files.path(thumb),))]
        assert files.remove(files.select_expired(None, 0)[1]) == 110
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert writing.is_file() and aside.is_file() and (files.root / "lost+found" / "x.png").is_file()
    assert not files.path(key).exists() and not files.path(thumb).exists()


def test_a_temporary_older_than_an_hour_is_swept_by_a_pass_at_the_clocks_time_or_the_one_given(tmp_path):
    """A picture a crash left half written is swept once it is more than an hour old (a write in progress is
    younger), at the clock's time when the pass gives none."""
    from anomaly_service.records.files import FileStore

    files = FileStore(tmp_path)
    folder = files.path(files.put(b"a" * 100, "png")).parent
    now = 1_000_000.0
    old, hour, young = folder / ".tmp-old.tmp", folder / ".tmp-hour.tmp", folder / ".tmp-young.tmp"
    for path, age in ((old, 3600.5), (hour, 3600), (young, 3599.5)):
        path.write_bytes(b"t")
        os.utime(path, (now - age, now - age))
    top_old, top_young = files.root / ".tmp-clock-old", files.root / ".tmp-clock-young"  # volume_now's, left by a crash
    for path, age in ((top_old, 3600.5), (top_young, 3599.5)):
        path.write_bytes(b"")
        os.utime(path, (now - age, now - age))
    files.clean_temporaries(now=now)
    assert not old.exists() and hour.exists() and young.exists()  # an hour exactly: not more than an hour
    assert not top_old.exists() and top_young.exists()
    files.clean_temporaries()  # the clock's time: years later
    assert not hour.exists() and not young.exists() and len(files.files()) == 1


def test_the_free_space_of_a_store_with_no_picture_yet_is_its_volumes(tmp_path, monkeypatch):
    """The free-space rule reads the volume from the first pass on: before the first picture (no files directory
    yet) it is the free space of the nearest directory there is (on the data volume, not the root's), then of the
    files directory itself."""
    import shutil
    from pathlib import Path

    from anomaly_service.records import files as files_module

    asked: list[Path] = []
    usage = shutil.disk_usage
    monkeypatch.setattr(files_module.shutil, "disk_usage", lambda p: asked.append(Path(p)) or usage(p))
    store = files_module.FileStore(tmp_path / "data")
    assert store.free_bytes() is not None and asked == [tmp_path]
    store.put(b"a", "png")
    assert store.free_bytes() is not None and asked[-1] == tmp_path / "data" / "files"


def test_a_pass_counts_marks_and_logs_what_each_rule_removed_and_sweeps_what_a_crash_left(tmp_path, caplog):
    """One pass at the store's level, rule by rule: a limit of 0 is none; the files past the age limit are marked
    expired, those over the budget once they are gone removed, each counted in the answer and the log line with the
    bytes freed and the records marked; the volume's floor, which the pictures left cannot give back, takes them all
    and says so; and the pass sweeps a crash's half-written temporary and puts back a file set aside."""
    from anomaly_service.records.files import ASIDE_PREFIX

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    items = _written(store, _parts(4))
    now = time.time()
    keys = []
    for i, p in enumerate(items):  # the first a second or two past five days old, the others an hour, oldest first
        r = store.get(p.id)
        keys.append((r.image_file, r.heatmap_file))
        for j, key in enumerate(keys[-1]):
            t = now - (5 * 86400 + 2 if i == 0 else 3600) + 10 * i + j
            os.utime(store.files.path(key), (t, t))
    size = {store.files.key_of(f.path): f.bytes for f in store.files.files()}
    folder = store.files.path(keys[3][0]).parent
    (folder / ".tmp-crash.tmp").write_bytes(b"t")
    os.utime(folder / ".tmp-crash.tmp", (now - 7200, now - 7200))
    os.rename(store.files.path(keys[3][1]), folder.parent / keys[3][1].split("/")[0] / (
        ASIDE_PREFIX + keys[3][1].split("/")[1]))
    assert store.apply_retention(0, 0, 0, now=now) == {"expired": 0, "removed": 0, "free_space": 0, "bytes": 0,
                                                     "skipped": 0}
    assert not (folder / ".tmp-crash.tmp").exists() and store.files.path(keys[3][1]).is_file()
    budget = sum(size.values()) - size[keys[0][0]] - size[keys[0][1]] - size[keys[1][0]] - 1  # its image gives a byte
    # too few: its heatmap goes too
    with caplog.at_level(logging.INFO, logger="anomaly_service.records"):
        result = store.apply_retention(5, budget, now=now)
    freed = sum(size[k] for k in (*keys[0], *keys[1]))
    assert result == {"expired": 2, "removed": 2, "free_space": 0, "bytes": freed, "skipped": 0}
    assert [store.get(p.id).files_state for p in items] == [FILES_EXPIRED, FILES_REMOVED, FILES_STORED, FILES_STORED]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retention:")]
    assert said == [f"retention: 2 file(s) past the age limit, 2 over the size budget, 0 for free space on the volume "
                    f"(0 kept for records written meanwhile); {freed} bytes freed; 2 record(s) marked"]
    caplog.clear()
    floor = store.files.free_bytes() + 2**40
    with caplog.at_level(logging.INFO, logger="anomaly_service.records"):
        result = store.apply_retention(None, None, floor, now=now)
    assert result["free_space"] == 4 and result["bytes"] == sum(size[k] for k in (*keys[2], *keys[3]))
    assert [store.get(p.id).files_state for p in items[2:]] == [FILES_REMOVED, FILES_REMOVED]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"under the {floor} kept free" in warned[0] and "cannot give back the rest" in warned[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"retention: 0 file(s) past the age limit, 0 over the size budget, 4 for free space on the volume (0 kept for "
        f"records written meanwhile); {result['bytes']} bytes freed; 2 record(s) marked"]
    store.close()


def test_a_store_that_keeps_no_pictures_has_no_retention_to_run(tmp_path):
    """Records without a data directory keep no pictures: a pass there removes nothing and says so in its answer,
    instead of failing on the pictures it does not have."""
    store = RecordStore.open(f"sqlite:///{tmp_path / 'records.db'}", None)
    assert store.files is None
    assert store.apply_retention(1, 1, 1) == {"expired": 0, "removed": 0, "free_space": 0, "bytes": 0, "skipped": 0}
    store.close()


def test_a_pass_while_another_process_holds_the_turn_is_skipped_and_says_so(tmp_path, caplog):
    """Replicas sharing the pictures take turns: while another process's pass holds the retention lock, this one
    removes nothing, answers ``skipped`` and logs why."""
    import fcntl

    from anomaly_service.records.store import RETENTION_LOCK_FILE

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    _written(store, _parts(1))
    with open(tmp_path / "data" / RETENTION_LOCK_FILE, "a+") as other:  # another open file: another process's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with caplog.at_level(logging.INFO, logger="anomaly_service.records"):
            result = store.apply_retention(None, 1)
    assert result == {"expired": 0, "removed": 0, "free_space": 0, "bytes": 0, "skipped": 1}
    assert any("another process's pass is running" in r.getMessage() for r in caplog.records)
    assert len(store.files.files()) == 2
    assert store.apply_retention(None, 1)["removed"] == 2
    store.close()


def test_a_second_pass_of_this_release_waits_its_turn_as_another_process_does(tmp_path):
    """Two replicas of this release on one data directory: while one's pass holds the turn, the other's is skipped
    (each takes the lock as the other does: exclusive, never shared by two passes)."""
    store, other = RecordStore.open(None, tmp_path / "data"), RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    _written(store, _parts(1))
    with other._retention_turn() as turn:
        assert turn is not None
        assert store.apply_retention(None, 1)["skipped"] == 1 and len(store.files.files()) == 2
    assert store.apply_retention(None, 1)["removed"] == 2  # its turn, once the other's pass has ended
    store.close()
    other.close()


def test_a_record_whose_pictures_lock_stays_taken_is_retried_not_lost(tmp_path, monkeypatch):
    """An insert with pictures waits for the pictures' lock (a retention chunk of another process) up to the busy
    timeout, then says so (``PicturesBusy``), which the writer retries as a locked database: the record is written
    once the lock is let go, with its pictures, and nothing is dropped."""
    import fcntl

    from anomaly_service.records import store as store_module
    from anomaly_service.records.store import PICTURES_LOCK_FILE, PicturesBusy

    store = RecordStore.open(None, tmp_path / "data")
    store.upgrade()
    photo = png_bytes(textured_part(np.random.default_rng(0), 16, 16))
    key = store.files.put(photo, "png")
    lock = tmp_path / "data" / PICTURES_LOCK_FILE
    held = open(lock, "a+")  # noqa: SIM115 - another open file: another process's lock
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.3, held.close).start()  # a chunk that ends within the wait: the insert waits for it
    assert store.add_many([row(1, files_state=FILES_STORED, image_file=key)], {key: photo}) == 1 and held.closed
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 50)  # the wait for the lock, not the database's
    rec = Recorder(store, "all")
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        open_files = len(os.listdir("/proc/self/fd"))
        with pytest.raises(PicturesBusy):
            store.add_many([row(2, files_state=FILES_STORED, image_file=key)], {key: photo})
        assert len(os.listdir("/proc/self/fd")) == open_files  # the lock file it gave up on is closed
        rec.start()
        p = pending(photo)
        assert rec.submit(p)
        deadline = time.monotonic() + 20
        while not rec.retrying and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.retrying and store.get(p.id) is None
    rec.stop()
    got = store.get(p.id)
    assert got is not None and got.files_state == FILES_STORED and sum(rec.dropped.values()) == 0
    assert store.files.locate(got.image_file).read_bytes() == photo
    store.close()


def test_records_through_pgbouncer_in_session_mode_keep_their_lock_timeout(postgres_url, tmp_path):
    """PgBouncer in front of PostgreSQL (a plant's database team pools its clients): the store connects through it,
    migrates, writes and reads, and each connection still waits at most LOCK_TIMEOUT_MS for a lock. The timeout
    went in libpq's startup `options`, which PgBouncer refuses ("unsupported startup parameter"): no connection
    through it was made at all (pgbouncer/pgbouncer#875)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from anomaly_service.records.store import LOCK_TIMEOUT_MS
    from conftest import PG_USER, eventually, free_port

    bouncer = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if bouncer is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PgBouncer is not installed (README's test command installs it with apt-get)")
        pytest.skip("PgBouncer is not installed: apt-get install pgbouncer")
    target = make_url(postgres_url)
    root = Path(tempfile.mkdtemp(prefix="anomaly-pgbouncer-"))
    port = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"[databases]\n{target.database} = host=127.0.0.1 port={target.port} dbname={target.database}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n"
        f"auth_file = {root / 'users.txt'}\npool_mode = session\n")
    run_as = {}
    if os.geteuid() == 0:  # PgBouncer refuses to run as root, as PostgreSQL does
        shutil.chown(root, PG_USER, PG_USER)
        run_as = {"user": PG_USER, "group": PG_USER}
    proc = subprocess.Popen([bouncer, str(root / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **run_as)
    try:
        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False

        eventually(listening)
        store = RecordStore.open(target.set(port=port).render_as_string(hide_password=False), tmp_path)
        store.upgrade()
        store.add_many([row(0), row(1)])
        assert store.count() == 2 and {r.part_id for r in store.query(Filters(), 10)} == {"P0", "P1"}
        with store.engine.connect() as conn:
            timeout = conn.scalar(sa.text("SELECT setting FROM pg_settings WHERE name = 'lock_timeout'"))
            assert timeout == str(LOCK_TIMEOUT_MS)
        store.close()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_the_false_alarms_query_reads_alike_on_sqlite_and_postgresql(store):
    """reviewed_unlearnt and reviewed_among on both databases: only this model's flagged parts reviewed good, the
    learnt ones by id and by their photo's bytes (another model's same photo is not learnt here), and which
    beginnings of warnings each record's warnings hold, found by the database (none for records from before
    warnings were kept, and none for a beginning found only inside a warning or in another language's)."""
    store.upgrade()
    t0 = datetime.now(timezone.utc) - timedelta(minutes=10)
    rows = [row(i, at=t0 + timedelta(seconds=i), decision="anomaly", image_sha256=f"{i:064d}") for i in range(7)]
    rows[1].image_sha256 = rows[0].image_sha256  # the learnt part's photo sent again
    rows[5].pixels_sha256, rows[6].pixels_sha256 = "f" * 64, "e" * 64  # the pixels of one of the model's images, not
    rows[3].warnings = ["which frame was scored", "this photo is one level throughout (90 of 255): it shows no part"]
    rows[2].warnings = ["as said: this photo is one level throughout", "100 of the partXid"]  # % and _ as such
    other = row(9, at=t0, decision="anomaly", model="other", image_sha256=rows[2].image_sha256)
    passed = row(8, at=t0, decision="normal", image_sha256="8" * 64)
    assert store.add_many([*rows, other, passed]) == 9
    for r in [*rows, other, passed]:
        store.review(r.id, "good", "qa")
    store.review(rows[4].id, "defect", "qa")
    found: list = []
    unlike = lambda h, w, said: found.append(said) or bool(said)  # noqa: E731
    learnt = {rows[0].id, other.id}  # the other model's part, taught there: its photo is not learnt here
    starts = ("this photo is one level throughout", "100% of the part_id", "frame was scored")
    here, n_here, n_learnt, gone, n_unlike = store.reviewed_unlearnt("part", "good", "anomaly", learnt, 1, unlike,
                                                                     starts, {"f" * 64, rows[2].image_sha256})
    assert (here, n_here, n_learnt, gone, n_unlike) == ([], 0, 3, 2, 1)
    assert found == [frozenset(), frozenset(starts[:1]), frozenset()]  # oldest first
    assert store.reviewed_among("part", "defect", {rows[4].id, rows[0].id, other.id}) == [rows[4].id]


def _scored_id(client, photo: bytes) -> str:
    """The inspection id of ``photo`` scored on the test's service (its model ``part``)."""
    answer = client.post("/score?model=part", files={"file": ("a.png", photo)})
    assert answer.status_code == 200
    return answer.json()["inspection_id"]


def test_a_client_asking_for_its_inspection_as_soon_as_it_is_answered_finds_it(model_dir, rng_images, tmp_path):
    """A record is written a moment after its answer (its batch lingers to gather others): an MES that fetched the
    inspection, its photo or reviewed the part as soon as it had the answer was told 404 "no inspection with id"
    for the id it had just been given (a real server: 404 at 0 and 0.2 s, 200 after a second). Such a request now
    waits for its record; an id the service never handed out is 404 at once, and a record the database cannot
    take yet (its write lock held elsewhere) is 503 records_unavailable within the records' timeout, not 404."""
    import sqlite3

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    data = tmp_path / "data"
    settings = ServiceSettings(model_dir=model_dir, reload_interval=0, device="cpu", data_dir=data,
                               keep_images="all", records_timeout=2)
    photo = png_bytes(rng_images[0])
    with TestClient(create_app(settings)) as client:
        iid = _scored_id(client, photo)
        got = client.get(f"/inspections/{iid}")
        assert got.status_code == 200 and got.json()["id"] == iid
        iid = _scored_id(client, photo)
        reviewed = client.post(f"/inspections/{iid}/review", json={"verdict": "defect"}, headers={"X-Reviewer": "ann"})
        assert reviewed.status_code == 200 and reviewed.json()["verdict"] == "defect"
        iid = _scored_id(client, photo)
        assert client.get(f"/inspections/{iid}/image").content == photo
        assert client.get("/inspections/01a252da-7672-7000-9624-b4cc0638ea35").status_code == 404
        # the database's write lock held by another process's transaction: the record waits in the buffer
        holder = sqlite3.connect(data / "records.db", timeout=30)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            iid = _scored_id(client, photo)
            waiting = client.get(f"/inspections/{iid}")
            assert waiting.status_code == 503 and waiting.json()["error"] == "records_unavailable"
            assert "not written yet" in waiting.json()["detail"] and waiting.headers["retry-after"]
        finally:
            holder.rollback()
            holder.close()
        assert client.app.state.service.recorder.flush(30)
        assert client.get(f"/inspections/{iid}").status_code == 200


def test_a_record_written_between_the_lookup_and_the_wait_is_found_not_404(model_dir, rng_images, tmp_path):
    """The wait for a record on its way asked the recorder whether it held the id only after the database had said
    it had no such row: a batch committed in between (the writer's linger ends at any moment) was no longer held,
    and the request was 404 for an inspection that was there. The store is the real one; its lookup only lets the
    writer finish its batch right after the query, the moment the race needs. An id never handed out is still
    looked up once, not twice."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    settings = ServiceSettings(model_dir=model_dir, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all", records_timeout=5)
    photo = png_bytes(rng_images[0])
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service
        store, recorder = service.records, service.recorder

        def racing(name: str):
            real = getattr(store, name)

            def call(*args):
                try:
                    return real(*args)
                finally:
                    assert recorder.flush(30)  # the batch commits after the query found nothing

            return call

        for name, ask in [("get", lambda iid: client.get(f"/inspections/{iid}")),
                          ("review", lambda iid: client.post(f"/inspections/{iid}/review", json={"verdict": "good"},
                                                             headers={"X-Reviewer": "ann"}))]:
            answer = client.post("/score?model=part", files={"file": ("a.png", photo)})
            assert answer.status_code == 200
            iid = answer.json()["inspection_id"]
            setattr(store, name, racing(name))
            try:
                got = ask(iid)
            finally:
                delattr(store, name)
            assert got.status_code == 200, (name, got.json())
            assert got.json()["id"] == iid
            assert not recorder.holds(iid)
        # an id this service never handed out is looked up once: it waits for nothing and is not looked up again
        looked = []
        real_get = store.get
        store.get = lambda *args: looked.append(args) or real_get(*args)
        try:
            assert client.get("/inspections/01a252da-7672-7000-9624-b4cc0638ea35").status_code == 404
        finally:
            del store.get
        assert len(looked) == 1



def test_a_request_waiting_for_its_record_hurries_the_writer_and_leaves_the_event_loop_free(model_dir, rng_images,
                                                                                           tmp_path, monkeypatch):
    """The wait hurries the writer's batch (without it the record came only at the linger's end: here a linger
    longer than the records' timeout, so only the hurry answers 200), and it waits on the event loop without holding
    it: while one request waits for a record the database cannot take yet (its write lock held elsewhere), another
    request is answered before the waiting one ends."""
    import sqlite3
    import threading
    import time

    from fastapi.testclient import TestClient

    import anomaly_service.records.recorder as recorder_module
    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    monkeypatch.setattr(recorder_module, "BATCH_LINGER_S", 120.0)
    data = tmp_path / "data"
    settings = ServiceSettings(model_dir=model_dir, reload_interval=0, device="cpu", data_dir=data,
                               keep_images="all", records_timeout=4)  # the waiter's 503 comes at its end
    photo = png_bytes(rng_images[0])
    with TestClient(create_app(settings)) as client:
        iid = _scored_id(client, photo)
        assert client.get(f"/inspections/{iid}").status_code == 200
        holder = sqlite3.connect(data / "records.db", timeout=30)
        order: list[str] = []
        try:
            holder.execute("BEGIN EXCLUSIVE")
            iid = _scored_id(client, photo)
            def wait() -> None:
                order.append(f"wait {client.get(f'/inspections/{iid}').status_code}")

            waiter = threading.Thread(target=wait)
            waiter.start()
            recorder = client.app.state.service.recorder
            for _ in range(6000):  # until the waiting request hurries the writer: it is in its wait
                if recorder._hurry.is_set():
                    break
                time.sleep(0.01)
            order.append(f"health {client.get('/healthz').status_code}")
            waiter.join(60)
        finally:
            holder.rollback()
            holder.close()
        assert order == ["health 200", "wait 503"]


def test_a_record_dated_in_another_zone_is_kept_at_its_instant_and_found_by_it(store):
    """SQLite keeps no zone: a store that writes an aware time as its wall clock and reads it back as UTC moves a
    record dated 13:30 at -08:00 eight hours early, and a since or until given in a zone compares wall clocks
    (MemMachine#1558, Opentrons#10053). A record dated in a zone (a library caller's or a copied record's) is kept
    at its instant, read back in UTC, and found by a bound written in any zone, on SQLite as on PostgreSQL."""
    store.upgrade()
    at = datetime(2026, 12, 7, 13, 30, 45, tzinfo=timezone(timedelta(hours=-8)))
    store.add_many([row(at=at)])
    kept = store.query(Filters())[0]
    assert kept.created_at == at and kept.created_at.utcoffset() == timedelta(0)
    assert kept.created_at.hour == 21  # 13:30 at -08:00 is 21:30 UTC, not 13:30 UTC
    east = timezone(timedelta(hours=5, minutes=30))
    second = timedelta(seconds=1)
    assert [r.id for r in store.query(Filters(since=(at - second).astimezone(east)))] == [kept.id]
    assert store.query(Filters(since=(at + second).astimezone(east))) == []
    assert [r.id for r in store.query(Filters(until=(at + second).astimezone(east)))] == [kept.id]
    assert store.count(Filters(until=(at - second).astimezone(timezone.utc))) == 0


def test_every_time_a_record_keeps_is_an_instant_in_postgresql_whatever_the_sessions_zone(postgres_url, tmp_path):
    """A ``timestamp without time zone`` column holds a wall clock: Grafana's PostgreSQL source reads it as UTC, so
    a writer or a session in another zone drew every point hours off (grafana#22888, grafana#9921). Every time the
    records keep is a ``timestamptz`` in PostgreSQL, so a session set to a plant's zone (the records dashboard's, a
    report's) finds a record by its UTC instant."""
    s = RecordStore.open(postgres_url, tmp_path / "data")
    try:
        s.upgrade()
        at = datetime(2026, 12, 7, 23, 30, tzinfo=timezone.utc)
        s.add_many([row(at=at)])
        with s.engine.connect() as conn:
            kinds = conn.execute(sa.text(
                "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND (column_name LIKE '%\\_at' OR data_type LIKE 'timestamp%')")).all()
            assert kinds and all(k == "timestamp with time zone" for _, _, k in kinds), kinds
            conn.execute(sa.text("SET TIME ZONE 'Asia/Tokyo'"))  # 08:30 of the next day there
            found = conn.execute(sa.text(
                "SELECT count(*) FROM inspections WHERE created_at BETWEEN '2026-12-07T23:29:00Z' AND "
                "'2026-12-07T23:31:00Z'")).scalar()
            local = conn.execute(sa.text("SELECT to_char(created_at, 'YYYY-MM-DD HH24:MI') FROM inspections")).scalar()
        assert found == 1 and local == "2026-12-08 08:30"
    finally:
        s.close()
