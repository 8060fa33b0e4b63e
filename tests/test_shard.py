"""Re-scoring an archive in shards (``anomaly score --shard K/N``): the partition, and resuming a stopped shard.

The shards of one listing must give together exactly the results of one unsharded run, each image once, in the
results files and in the records; a shard killed mid-way and run again must finish without a duplicate."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service.artifact import model_version_id
from anomaly_service.cli import app
from anomaly_service.errors import ConfigError
from anomaly_service.records.store import RecordStore
from anomaly_service.rescore import PART_ID_MAX, part_id
from anomaly_service.sharding import ResultsFile, Shard, list_archive, shard_of

from conftest import add_defect, as_other_user, textured_part


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def _loaded_models() -> dict:
    return {}


@pytest.fixture(autouse=True)
def load_each_model_once(monkeypatch, _loaded_models):
    """Every in-process ``anomaly score`` here loads the same model: load it once (the export of its backbone to
    ONNX Runtime dominates a small run), so each test's time goes to what it tests."""
    from anomaly_service.model import AnomalyModel

    real = AnomalyModel.load

    def load(path, **kwargs):
        key = (str(Path(path).resolve()), tuple(sorted(kwargs.items())))
        if key not in _loaded_models:
            _loaded_models[key] = real(path, **kwargs)
        return _loaded_models[key]

    monkeypatch.setattr(AnomalyModel, "load", staticmethod(load))


def make_archive(root: Path, layout: dict[str, int], seed: int = 3) -> set[str]:
    """Synthetic parts under ``root``: ``{"sub/dir": count}``; returns the image keys."""
    rng = np.random.default_rng(seed)
    keys = set()
    for sub, count in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            key = f"{sub}/{i:03d}.png".lstrip("./")
            Image.fromarray(textured_part(rng, 64, 64)).save(root / key)
            keys.add(key)
    return keys


@pytest.fixture
def archive(tmp_path) -> tuple[Path, set[str]]:
    """A nested archive with a non-image file and one broken image among the good ones."""
    root = tmp_path / "archive"
    keys = make_archive(root, {"line1": 5, "line1/station2": 4, "line2": 5, ".": 2})
    defect, _ = add_defect(textured_part(np.random.default_rng(4), 64, 64), 30, 30, radius=8)
    Image.fromarray(defect).save(root / "line2" / "defect.png")
    keys.add("line2/defect.png")
    (root / "line2" / "notes.txt").write_text("not an image")
    (root / "line1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root, keys


def read_rows(*files: Path) -> list[dict]:
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def recorded_parts(data_dir: Path) -> Counter:
    store = RecordStore.open(None, data_dir)
    try:
        rows = list(store.iter_all())
    finally:
        store.close()
    assert all(r.source == "rescore" and r.model == "part" for r in rows)
    return Counter(r.part_id for r in rows)


# ----------------------------------------------------------------------------------------------- the partition
def test_shards_partition_a_listing_whatever_its_order():
    keys = [f"line{i % 3}/{i:04d}.png" for i in range(300)]
    for n in (1, 2, 3, 7):
        owned = [[k for k in keys if Shard(i, n).owns(k)] for i in range(n)]
        assert sorted(k for part in owned for k in part) == sorted(keys)  # each key in exactly one shard
        assert all(part for part in owned)
        shuffled = random.Random(n).sample(keys, len(keys))
        assert [sorted(k for k in shuffled if Shard(i, n).owns(k)) for i in range(n)] == [sorted(p) for p in owned]
    # a fixed hash: if a release changed it, a shard resumed after an upgrade would redo other shards' images
    assert [shard_of(k, 5) for k in ("a.png", "line1/0001.png", "ü/ß.png")] == [2, 0, 4]


@pytest.mark.parametrize("text, env, expected", [("0/1", {}, Shard(0, 1)), ("2/3", {}, Shard(2, 3)),
                                                 (" 1 / 2 ", {}, Shard(1, 2)),
                                                 ("auto/4", {"JOB_COMPLETION_INDEX": "3"}, Shard(3, 4))])
def test_shard_is_k_of_n_counted_from_zero_or_the_job_completion_index(text, env, expected):
    assert Shard.parse(text, env) == expected


@pytest.mark.parametrize("text, env, phrase", [("3/3", {}, "below N"), ("0/0", {}, "below N"),
                                               ("-1/2", {}, "K/N"), ("1", {}, "K/N"),
                                               ("auto/2", {}, "JOB_COMPLETION_INDEX"),
                                               ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "below N"),
                                               # runs of another count take turns by it: two counts past a 32-bit
                                               # lock key took one turn and scored the same images at once
                                               (f"0/{2**31}", {}, "at most 2147483647")])
def test_bad_shards_are_refused(text, env, phrase):
    with pytest.raises(ConfigError, match=phrase):
        Shard.parse(text, env)


def test_keys_are_relative_to_the_listing_root_wherever_it_is_mounted(archive, tmp_path):
    root, keys = archive
    images, skipped = list_archive([root])
    assert {im.key for im in images} == keys | {"line1/broken.png"}
    assert [p.name for p in skipped] == ["notes.txt"]
    moved = tmp_path / "elsewhere" / "mnt"
    shutil.copytree(root, moved)
    assert [im.key for im in list_archive([moved])[0]] == [im.key for im in images]
    # several inputs: keys relative to their common directory; an input inside another adds nothing twice
    both = list_archive([root / "line1", root / "line2", root / "line1" / "station2"])[0]
    assert len(both) == len({im.key for im in both}) == 16
    assert {im.key for im in both} == {k for k in keys | {"line1/broken.png"} if k.startswith("line")}


def test_a_key_too_long_for_the_part_id_column_stays_unique():
    a, b = "x" * 300 + "/a.png", "x" * 300 + "/b.png"
    assert len(part_id(a)) == PART_ID_MAX and part_id(a) != part_id(b) and part_id("short.png") == "short.png"


# ----------------------------------------------------------------------------------------------- shards together
def test_shards_together_score_exactly_what_one_run_scores(model_dir, archive, tmp_path):
    root, keys = archive
    model = str(model_dir / "part")
    version = model_version_id(model)  # as `anomaly versions` names it
    one = tmp_path / "one.jsonl"
    res = run("score", "--model", model, "--output", str(one), str(root))
    assert res.exit_code == 0, res.output
    assert "17 scored, 0 skipped as already done, 1 failed" in res.output and "broken.png" in res.output
    outputs = []
    for k in range(3):  # as the pods of an Indexed Job: K from $JOB_COMPLETION_INDEX
        res = run("score", "--model", model, "--shard", "auto/3", "--output", str(tmp_path / "three"),
                  "--data-dir", str(tmp_path / "records"), str(root), env={"JOB_COMPLETION_INDEX": str(k)})
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    assert sum("1 failed" in out for out in outputs) == 1  # the broken image is one shard's, and only fails it
    files = sorted((tmp_path / "three").glob("*.jsonl"))  # beside the lock counts take turns on
    assert [f.name for f in files] == [f"shard-{k}-of-3.jsonl" for k in range(3)]
    assert {f.name for f in (tmp_path / "three").iterdir()} - {f.name for f in files} == {".anomaly-shards.lock"}
    whole, sharded = read_rows(one), read_rows(*files)
    assert Counter(r["key"] for r in sharded) == Counter(r["key"] for r in whole) == Counter(keys)
    by_key = {r["key"]: r for r in whole}
    for r in sharded:
        assert r["normalized_score"] == pytest.approx(by_key[r["key"]]["normalized_score"], rel=1e-4)
        assert r["is_anomaly"] == by_key[r["key"]]["is_anomaly"]
        assert r["model"] == "part" and r["model_version"] == version and r["path"].endswith(r["key"])
        assert {"score", "threshold", "image_width", "regions", "embedding", "timing_ms"} <= set(r)
    assert recorded_parts(tmp_path / "records") == Counter(keys)
    ids = [r["inspection_id"] for r in sharded]  # each line names the record its run made of the image
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
    # a line is what `score --json` prints for the image, plus its key and the model
    plain = json.loads(run("score", "--model", model, "--json", str(root / "line2/defect.png")).stdout)
    row = next(r for r in sharded if r["key"] == "line2/defect.png")
    assert set(row) - set(plain) == {"key", "model", "model_version"} and set(plain) <= set(row)
    assert row["is_anomaly"] and row["regions"] and row["regions"][0]["nearest_normal"]  # with its evidence
    assert row["regions"] == plain["regions"] and row["embedding"] == plain["embedding"]


# ----------------------------------------------------------------------------------------------- resuming
@pytest.mark.slow  # a real process, killed: its start-up (imports, backbone export) is most of the time
def test_a_killed_shard_resumed_finishes_without_duplicates(model_dir, tmp_path):
    root = tmp_path / "archive"
    keys = make_archive(root, {"a": 24, "b": 24})
    out, records = tmp_path / "out", tmp_path / "records"
    args = ["score", "--model", str(model_dir / "part"), "--shard", "0/1", "--output", str(out), "--data-dir",
            str(records), str(root)]
    results = out / "shard-0-of-1.jsonl"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.stat().st_size) and proc.poll() is None:
            assert time.monotonic() < deadline, "no result line within 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)  # mid-way: its first batch of lines is out, the rest is not
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    before = len(results.read_bytes().splitlines())
    assert 0 < before < len(keys)
    with open(results, "ab") as f:
        f.write(b'{"key": "a/0')  # and a line the kill cut in the middle of its write
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "cut off a partial last line" in res.output
    rows = read_rows(results)  # every line is whole again
    assert Counter(r["key"] for r in rows) == Counter(keys)
    # the records written so far (their writer batches) plus those the resume made up: each image once
    assert recorded_parts(records) == Counter(keys)
    again = run(*args)
    assert f"0 scored, {len(keys)} skipped as already done, 0 failed" in again.output
    assert len(read_rows(results)) == len(keys)


def test_a_resume_skips_what_the_record_store_holds_and_fills_only_what_is_missing(model_dir, archive, tmp_path):
    root, keys = archive
    base = ["score", "--model", str(model_dir / "part"), "--shard", "1/2", "--data-dir", str(tmp_path / "rec"),
            str(root)]
    first = run(*base)
    assert first.exit_code == 0, first.output
    mine = {k for k in keys if Shard(1, 2).owns(k)}
    assert recorded_parts(tmp_path / "rec") == Counter(mine)
    again = run(*base)
    assert f"0 scored, {len(mine)} skipped as already done" in again.output
    assert "recorded 0 inspection(s)" in again.output
    # a results file asked for later is filled from scratch; the records, which have every image, get nothing
    with_file = run(*base, "--output", str(tmp_path / "out"))
    assert f"{len(mine)} scored, 0 skipped" in with_file.output and "recorded 0 inspection(s)" in with_file.output
    assert Counter(r["key"] for r in read_rows(tmp_path / "out" / "shard-1-of-2.jsonl")) == Counter(mine)
    assert recorded_parts(tmp_path / "rec") == Counter(mine)


def record_ids(data_dir: Path) -> dict[str, str]:
    store = RecordStore.open(None, data_dir)
    try:
        return {r.part_id: r.id for r in store.iter_all()}
    finally:
        store.close()


def test_a_line_and_its_record_lost_apart_by_a_kill_name_one_record_after_the_resume(model_dir, archive, tmp_path):
    """A kill -9 loses the records still in the writer's buffer while their lines are out (each names its record's
    id), or the line of a record already written: the resume must write the missing one under the id the other
    names, not under a new one (a line naming a record that never was)."""
    import sqlite3

    root, keys = archive
    out, records = tmp_path / "out", tmp_path / "records"
    args = ["score", "--model", str(model_dir / "part"), "--shard", "0/1", "--output", str(out), "--data-dir",
            str(records), str(root)]
    assert run(*args).exit_code == 0  # the broken image is warned of and counted
    results = out / "shard-0-of-1.jsonl"
    rows = read_rows(results)
    no_record, no_line = rows[1]["key"], rows[2]["key"]
    with sqlite3.connect(records / "records.db") as db:  # what a kill leaves: a line whose record is lost ...
        db.execute("DELETE FROM inspections WHERE part_id = ?", (no_record,))
    db.close()
    results.write_text("".join(json.dumps(r) + "\n" for r in rows if r["key"] != no_line))  # ... and the reverse
    res = run(*args)
    assert "2 scored" in res.output, res.output
    ids = record_ids(records)
    assert {r["key"]: r["inspection_id"] for r in read_rows(results)} == ids
    assert ids[no_record] == rows[1]["inspection_id"] and ids[no_line] == rows[2]["inspection_id"]


def test_a_full_disk_stops_the_shard_with_one_line_and_leaves_whole_lines(model_dir, archive, tmp_path):
    from conftest import fill, mounted

    root, keys = archive
    with mounted(tmp_path / "small", "64k") as small:
        results = small / "r.jsonl"
        filler = fill(small)
        filler.unlink()
        with open(filler, "wb") as f:  # room for a line or two
            f.write(bytes(os.statvfs(small).f_bavail * os.statvfs(small).f_frsize - 4096))
        args = ["score", "--model", str(model_dir / "part"), "--output", str(results), str(root)]
        res = run(*args)
        assert res.exit_code == 1, res.output
        assert "cannot write results (No space left on device)" in res.output and "Traceback" not in res.output
        assert results.read_bytes().endswith(b"\n") or not results.read_bytes()
        before = len(read_rows(results))
        assert before < len(keys)
        filler.unlink()
        again = run(*args)
        assert again.exit_code == 0 and "partial last line" not in again.output
        assert Counter(r["key"] for r in read_rows(results)) == Counter(keys)


_HOLD_UNTIL_TOLD = """
import fcntl, sys
f = open(sys.argv[1], "ab")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def _let_go_once_waited_for(monkeypatch, holder: subprocess.Popen) -> None:
    """The holder lets go once the run under test has begun to wait for it: a holder that let go after a fixed
    pause was found free by a run slower to reach the lock than that pause (a loaded machine), which then had
    nothing to wait for. Every wait of a shard's run goes through ``in_turns``."""
    from anomaly_service import dir_lock, sharding

    real = dir_lock.in_turns

    def in_turns(take, waiting=None, poll_s=1.0):
        def told():
            if waiting is not None:
                waiting()
            if holder.stdin is not None and not holder.stdin.closed:
                holder.stdin.write("go\n")
                holder.stdin.flush()
        real(take, told, poll_s)

    monkeypatch.setattr(dir_lock, "in_turns", in_turns)
    monkeypatch.setattr(sharding, "in_turns", in_turns)


def test_a_second_run_of_a_shard_under_way_waits_for_it_not_appending_twice(model_dir, archive, tmp_path,
                                                                            monkeypatch):
    """A cron line that overlaps last night's run, or a pod started again while the old one still writes: each run
    scored every image, and the results file held each twice. The second now waits for the first."""
    root, keys = archive
    results = tmp_path / "r.jsonl"
    args = ["score", "--model", str(model_dir / "part"), "--output", str(results), str(root)]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_UNTIL_TOLD, str(results)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    _let_go_once_waited_for(monkeypatch, holder)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        res = run(*args)  # goes on once the run under way (which here wrote nothing) has ended
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # a .jsonl file holds every shard's lines: the run it waits for may be of any shard (`--shard 0/2` for a 0/3)
    assert res.exit_code == 0 and "being written by another run (of any shard) into this one file" in res.output, \
        res.output
    assert "0 skipped" in res.output
    again = run(*args)
    assert f"0 scored, {len(keys)} skipped as already done" in again.output and "waiting" not in again.output
    assert Counter(r["key"] for r in read_rows(results)) == Counter(keys)


_HOLD_CLAIM = """
import sys
from pathlib import Path
from anomaly_service.records.store import RecordStore
store = RecordStore.open(None, Path(sys.argv[1]))
with store.claim(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("database", ["sqlite", "sqlite-url", "postgresql"])
def test_a_second_run_of_a_shard_into_the_same_records_waits_for_the_first(model_dir, archive, tmp_path, database,
                                                                           request, monkeypatch):
    """Records only (no results file to hold): the second run waits on the records' own claim, which holds between
    processes on SQLite and between hosts on PostgreSQL, and then skips what the first recorded. ``sqlite-url``: the
    second run names the same SQLite file by its URL alone (``--database-url sqlite:///...``, no ``--data-dir``),
    where the claim asserted a data directory and the run ended in a traceback before scoring."""
    from anomaly_service.model import AnomalyModel
    from anomaly_service.rescore import model_identity

    root, keys = archive
    name, names = model_identity(model_dir / "part", AnomalyModel.load(model_dir / "part"))
    claim = f"rescore {name} {names[0]} shard 0/1"
    if database.startswith("sqlite"):
        where, held_in = ["--data-dir", str(tmp_path / "rec")], [str(tmp_path / "rec")]
        (tmp_path / "rec").mkdir()
        if database == "sqlite-url":
            where = ["--database-url", f"sqlite:///{tmp_path / 'rec' / 'records.db'}"]
    else:
        url = request.getfixturevalue("postgres_url")
        where, held_in = ["--database-url", url], [url]
    args = ["score", "--model", str(model_dir / "part"), "--shard", "0/1", *where, str(root)]
    script = _HOLD_CLAIM if database.startswith("sqlite") else _HOLD_CLAIM.replace(
        "RecordStore.open(None, Path(sys.argv[1]))", "RecordStore.open(sys.argv[1], None)")
    holder = subprocess.Popen([sys.executable, "-c", script, *held_in, claim], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    _let_go_once_waited_for(monkeypatch, holder)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        res = run(*args)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert res.exit_code == 0 and "is being recorded by another run" in res.output, res.output
    again = run(*args)
    assert again.exit_code == 0 and "recorded 0 inspection(s)" in again.output, again.output
    assert "waiting" not in again.output


_HOLD_TURN = """
import sys
from pathlib import Path
from anomaly_service.records.store import RecordStore
from anomaly_service.sharding import counts_in_turn
kind, where, family = sys.argv[1:]
store = None if kind == "directory" else (RecordStore.open(where, None) if kind == "postgresql" else
                                          RecordStore.open(None, Path(where)))
for count in (3, 2):  # a shard of the run's own count until told, then one of another count for a while
    with (counts_in_turn(Path(where), family, count) if store is None else
          store.claim(family + " shard 9/" + str(count), turn=(family, count))):
        print("held", flush=True)
        sys.stdin.readline()  # told to go on, then to let go
"""


@pytest.mark.parametrize("where", ["directory", "sqlite", "postgresql"])
def test_shards_of_another_count_take_turns_and_shards_of_one_count_do_not(model_dir, archive, tmp_path, where,
                                                                          request, monkeypatch):
    """Shards 1/2 and 1/3 of one archive claim different names and write different files, yet their images overlap:
    run at once into one records database, each recorded the shared images (40 photos gave 40 records of 31 parts),
    and into one directory both files held them. A run of another count now waits for the one under way, and then
    skips what it did; shards of the run's own count (a shard of it held here) go on at once, each its own part."""
    from anomaly_service.model import AnomalyModel
    from anomaly_service.rescore import model_identity

    root, keys = archive
    name, names = model_identity(model_dir / "part", AnomalyModel.load(model_dir / "part"))
    held_in = where_args = None
    if where == "directory":
        held_in, where_args = str(tmp_path / "out"), ["--output", str(tmp_path / "out")]
    elif where == "sqlite":
        (tmp_path / "rec").mkdir()
        held_in, where_args = str(tmp_path / "rec"), ["--data-dir", str(tmp_path / "rec")]
    else:
        held_in = request.getfixturevalue("postgres_url")
        where_args = ["--database-url", held_in]

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_TURN, where, held_in, f"rescore {name} {names[0]}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    score = ["score", "--model", str(model_dir / "part"), *where_args, str(root)]
    try:
        assert holder.stdin is not None and holder.stdout is not None and holder.stdout.readline() == "held\n"
        same = run(*score, "--shard", "1/3")  # a shard of the same count under way: no wait
        holder.stdin.write("next\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "held\n"
        _let_go_once_waited_for(monkeypatch, holder)  # the other count's hold, once the run waits for it
        other = run(*score, "--shard", "0/3")
    finally:
        holder.stdin.close()  # a holder still waiting to be told goes
        holder.wait(timeout=60)
    assert same.exit_code == 0 and "waiting" not in same.output, same.output
    assert other.exit_code == 0, other.output
    assert "waiting" in other.output and "another number of shards than 3" in other.output, other.output
    assert f"{sum(Shard(0, 3).owns(k) for k in keys)} scored, 0 skipped" in other.output


def test_a_results_directory_resumed_with_another_count_scores_no_image_twice(model_dir, archive, tmp_path):
    """Each count writes its own files (shard-K-of-N.jsonl): resumed with three shards after two, every image was
    scored again into the new files and the directory held each twice. What another count's files hold is done."""
    root, keys = archive
    base = ["score", "--model", str(model_dir / "part"), "--output", str(tmp_path / "out"), str(root)]
    assert run(*base, "--shard", "0/2").exit_code == 0
    (tmp_path / "out" / "shard-0-of-2.jsonl").open("ab").write(b'{"key": "line1/00')  # a line a kill cut short
    for k in range(3):
        assert run(*base, "--shard", f"{k}/3").exit_code == 0
    rows = read_rows(*sorted((tmp_path / "out").glob("shard-*-of-3.jsonl")))
    assert {r["key"] for r in rows} == {k for k in keys if not Shard(0, 2).owns(k)}
    lines = [line for f in sorted((tmp_path / "out").glob("*.jsonl")) for line in f.read_bytes().splitlines()]
    assert Counter(json.loads(line)["key"] for line in lines if line.endswith(b"}")) == Counter(keys)


@pytest.mark.slow  # two real processes: their start-up (imports, the model's session) is most of the time
def test_shards_at_once_into_a_new_postgresql_database_record_each_image_once(model_dir, archive, tmp_path,
                                                                             postgres_url):
    """Two real shard processes started together on one PostgreSQL database that has no schema yet, as an Indexed
    Job's first pods meet it: both migrate (in turns) and record at once, and every image is recorded exactly once
    (the shards' claims were tested one at a time)."""
    root, keys = archive
    base = [sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model_dir / "part"), "--quiet",
            "--database-url", postgres_url, str(root)]
    procs = []
    for k in range(2):
        with open(tmp_path / f"{k}.log", "w") as log:
            procs.append(subprocess.Popen([*base, "--shard", f"{k}/2"], stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"{k}.log").read_text() for k in range(2)]
    assert codes == [0, 0], logs
    store = RecordStore.open(postgres_url, None)
    try:
        rows = list(store.iter_all())
    finally:
        store.close()
    assert Counter(r.part_id for r in rows) == Counter(keys), logs
    assert all(r.source == "rescore" and r.model == "part" for r in rows)


def test_a_photo_past_pillows_pixel_warning_is_one_line_in_the_log_not_pythons_warning(model_dir, tmp_path):
    """An archive holds anything: a photo whose header declares more pixels than Pillow's warning threshold (above
    our own limit) wrote Python's raw two-line DecompressionBombWarning into the night's log beside our line."""
    root = tmp_path / "archive"
    root.mkdir()
    Image.new("1", (12000, 12000)).save(root / "huge.png")  # a small file: the size is in its header
    Image.fromarray(textured_part(np.random.default_rng(1), 64, 64)).save(root / "part.png")
    res = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model_dir / "part"),
                          "--output", str(tmp_path / "out"), "-q", str(root)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "huge.png: 12000x12000 pixels exceeds the limit" in res.stderr
    assert "DecompressionBombWarning" not in res.stderr and "warnings.warn" not in res.stderr, res.stderr


def test_a_partial_last_line_is_cut_and_the_next_line_starts_clean(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = json.dumps({"key": "a.png", "model": "m", "model_version": "v"}) + "\n"
    path.write_text(whole + '{"key": "b.p')
    results = ResultsFile(path, "m", "v")
    assert results.open() == {"a.png": None} and results.dropped_partial == len('{"key": "b.p')
    results.write({"key": "b.png", "model": "m", "model_version": "v"})
    results.close()
    assert [r["key"] for r in read_rows(path)] == ["a.png", "b.png"]


def test_sigterm_stops_a_shard_as_an_interrupt_so_its_records_are_flushed():
    import os

    from anomaly_service.rescore import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
    assert signal.getsignal(signal.SIGTERM) == before


def test_results_of_another_model_version_are_not_mixed_in(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"key": "a.png", "model": "part", "model_version": "0123456789abcdef"}) + "\n")
    assert ResultsFile(path, "part", "0123456789abcdef").open().keys() == {"a.png"}
    with pytest.raises(ConfigError, match="give another --output"):
        ResultsFile(path, "part", "fedcba9876543210").open()
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="not a result line"):
        ResultsFile(path, "part", "0123456789abcdef").open()


def test_garbage_lines_in_results_files_are_told_or_passed_over_not_a_traceback(tmp_path):
    """A line that is JSON but no result: in the shard's own file it is named (a model version that is a list
    stopped the run with a TypeError), and in another count's file it is not one of this run's (a key JSON holds but
    UTF-8 does not, a lone surrogate, stopped it with a UnicodeEncodeError while hashing it into a shard)."""
    from anomaly_service.sharding import done_by_other_counts

    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"key": "a.png", "model": "part", "model_version": ["v"]}) + "\n")
    with pytest.raises(ConfigError, match="not a result line"):
        ResultsFile(own, "part", "v").open()
    good = {"key": "b.png", "model": "part", "model_version": "v"}
    (tmp_path / "shard-0-of-2.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {**good, "key": "\ud800"}, {**good, "key": 7}, {**good, "model_version": ["v"]}, ["x"], good)))
    assert done_by_other_counts(tmp_path, Shard(shard_of("b.png", 3), 3), "part", ["v"]) == {"b.png": None}


def test_a_turn_lock_that_cannot_be_opened_is_said_not_passed_over_silently(tmp_path, caplog):
    """A lock file another user made (a run under sudo) cannot be opened, and the run goes on unguarded, as where
    locks fail: it did so without a word, and a run of another shard count then scored the same images beside it
    with nothing to say why. (A directory in the lock's place fails to open for root too, as the other user's file
    fails for the service's user.)"""
    from anomaly_service.sharding import SHARDS_LOCK, counts_in_turn

    (tmp_path / "out" / SHARDS_LOCK).mkdir(parents=True)
    with counts_in_turn(tmp_path / "out", "rescore part v", 3):
        pass
    assert f"cannot open {SHARDS_LOCK}" in caplog.text and "not kept apart" in caplog.text, caplog.text
    caplog.clear()
    (tmp_path / "rec").mkdir()
    store = RecordStore.open(None, tmp_path / "rec")
    try:
        (tmp_path / "rec" / "records.db.claims-lock").mkdir()
        with store.claim("rescore part v shard 0/3", turn=("rescore part v", 3)):
            pass
    finally:
        store.close()
    assert "records.db.claims-lock" in caplog.text and "not kept apart" in caplog.text, caplog.text


def test_a_run_begun_before_version_ids_resumes_under_the_versions_id(tmp_path, model_dir):
    """Results and records made before answers named a version by its id say the first 16 hex digits of its
    manifest's SHA-256: a run resumed after the upgrade finds them its own, and finds another version's not."""
    from datetime import datetime, timezone

    from anomaly_service.model import AnomalyModel
    from anomaly_service.records.models import FILES_NOT_KEPT, Inspection, new_id
    from anomaly_service.rescore import RECORD_SOURCE, model_identity, recorded

    model = AnomalyModel.load(model_dir / "part")
    name, names = model_identity(model_dir / "part", model)
    assert names[0] == model.version_id_ and names[1] == model.manifest_sha256_[:16]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"key": "a.png", "model": "part", "model_version": names[1]}) + "\n")
    assert ResultsFile(path, name, names[0], earlier=names[1:]).open().keys() == {"a.png"}
    with pytest.raises(ConfigError, match="give another --output"):
        ResultsFile(path, name, names[0]).open()
    store = RecordStore.open(None, tmp_path / "rec")
    try:
        store.upgrade()
        at = datetime.now(timezone.utc)
        store.add_many([Inspection(
            id=new_id(int(at.timestamp() * 1000) + i), created_at=at, model="part", model_version=v, score=1.0,
            normalized_score=0.5, threshold=2.0, decision="normal", regions=[], image_width=8, image_height=8,
            image_bytes=10, image_sha256="0" * 64, timing_ms={"total": 1.0}, part_id=key, line=None, station=None,
            meta=None, source=RECORD_SOURCE, image_file=None, heatmap_file=None, files_state=FILES_NOT_KEPT)
            for i, (key, v) in enumerate([("a.png", names[1]), ("b.png", names[0]), ("c.png", "0123456789abcdef")])])
        assert recorded(store, name, names, ["a.png", "b.png", "c.png"]).keys() == {"a.png", "b.png"}
    finally:
        store.close()


@pytest.mark.parametrize("extra, phrase", [(["--shard", "2/2", "--output", "o"], "below N"),
                                           (["--shard", "auto/2", "--output", "o"], "JOB_COMPLETION_INDEX"),
                                           (["--shard", "0/2"], "somewhere to write"),
                                           (["--output", "o", "--json"], "--json")])
def test_bad_shard_options_give_one_error_line(model_dir, archive, tmp_path, extra, phrase):
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(archive[0]), *extra],
                             env={"JOB_COMPLETION_INDEX": None, "ANOMALY_DATABASE_URL": None})
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert phrase in res.output


def test_quiet_hides_the_archive_progress_bar(model_dir, archive, tmp_path, monkeypatch):
    """``-q`` turns the shard's progress bar off, as it does for the other long commands."""
    from anomaly_service import rescore

    seen: list[bool] = []
    real = rescore.progress_bar

    def spy(enabled, *args, **kwargs):
        seen.append(enabled)
        return real(enabled, *args, **kwargs)

    monkeypatch.setattr(rescore, "progress_bar", spy)
    root, _ = archive
    for flags, shown in (([], True), (["-q"], False)):
        seen.clear()
        out = tmp_path / f"out{len(flags)}.jsonl"
        res = run("score", "--model", str(model_dir / "part"), "--output", str(out), *flags, str(root))
        assert res.exit_code == 0, res.output
        assert seen == [shown]


def test_an_archive_holding_a_name_that_is_not_utf8_is_scored_recorded_and_resumed(model_dir, tmp_path):
    """One file named under another code page must not stop the re-scoring of a whole archive: its key spells the
    byte that is not UTF-8 as an escape, in the results, the records and the resume."""
    root = tmp_path / "archive"
    keys = make_archive(root, {"line1": 2})
    Image.fromarray(textured_part(np.random.default_rng(9), 64, 64)).save(root / os.fsdecode(b"line1/caf\xe9.png"))
    keys.add("line1/caf\\xe9.png")
    base = ["score", "--model", str(model_dir / "part"), "--shard", "0/1", "--data-dir", str(tmp_path / "rec"),
            "--output", str(tmp_path / "out"), "-q", str(root)]
    first = run(*base)
    assert first.exit_code == 0, first.output
    assert {r["key"] for r in read_rows(tmp_path / "out" / "shard-0-of-1.jsonl")} == keys
    assert recorded_parts(tmp_path / "rec") == Counter(keys)
    again = run(*base)
    assert again.exit_code == 0 and f"0 scored, {len(keys)} skipped as already done" in again.output


def test_a_re_score_records_how_it_was_scored_not_how_the_original_was(model_dir, tmp_path):
    """A part scored on the line in March with the defaults and re-scored from the archive in June under another
    runtime and search: each record says how its own score was computed (runtime, kNN search, device, threads), so
    the two scores' last digits differing is explained by the machine, not taken for a model that changed."""
    import torch

    from anomaly_service.model import AnomalyModel

    root = tmp_path / "archive"
    make_archive(root, {"line1": 2})
    data = ["--data-dir", str(tmp_path / "rec")]
    model = str(model_dir / "part")
    assert run("score", "--model", model, *data, str(root / "line1" / "000.png")).exit_code == 0
    again = run("score", "--model", model, "--shard", "0/1", *data, "--runtime", "torch", "--knn-precision", "fp32",
                "-q", str(root))
    assert again.exit_code == 0 and "2 scored" in again.output, again.output
    exported = run("records", "export", *data, "--format", "jsonl")
    how = ("runtime", "knn_search", "device", "threads")
    rows = sorted((r["source"], r["part_id"], *(r[k] for k in how))
                  for r in map(json.loads, exported.stdout.splitlines()))
    served = AnomalyModel.load(model)  # the defaults, as the line's record was made
    threads = torch.get_num_threads()
    assert rows == [("cli", "000.png", served.runtime, served.knn_search, "cpu", threads),
                    ("rescore", "line1/000.png", "torch", "exact, fp32", "cpu", threads),
                    ("rescore", "line1/001.png", "torch", "exact, fp32", "cpu", threads)]
    # score --json says it as the record does
    said = run("score", "--model", model, "--json", str(root / "line1" / "000.png"))
    assert said.exit_code == 0, said.output
    assert json.loads(said.stdout)["scored_with"] == dict(zip(how, rows[0][2:]))


def test_a_results_file_begun_before_answers_said_how_they_were_scored_resumes(model_dir, archive, tmp_path):
    """A re-score's lines carry `scored_with` as `score --json` does; a file a release before wrote (its lines
    without it) resumes by key and model version, the old lines kept, the new ones saying how they were scored."""
    root, keys = archive
    model, out = str(model_dir / "part"), tmp_path / "results.jsonl"
    assert run("score", "--model", model, "--output", str(out), str(root)).exit_code == 0
    old = [{k: v for k, v in r.items() if k != "scored_with"} for r in read_rows(out)[:10]]
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    res = run("score", "--model", model, "--output", str(out), str(root))
    assert res.exit_code == 0 and "10 skipped as already done" in res.output, res.output
    rows = read_rows(out)
    assert Counter(r["key"] for r in rows) == Counter(keys) and rows[:10] == old
    assert all(set(r["scored_with"]) == {"runtime", "knn_search", "device", "threads"} for r in rows[10:])


# ------------------------------------------------------------------------------------- locks older releases take
_PROBE = """
import fcntl, json, sys
with open(sys.argv[1], "a+") as f:
    free = []
    for at in json.loads(sys.argv[2]):
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, at)
            fcntl.lockf(f, fcntl.LOCK_UN, 1, at)
            free.append(True)
        except OSError:
            free.append(False)
print(json.dumps(free))
"""
# taken from the releases before one hash helper served them all: a process of an older release takes these same
# keys and bytes, so a changed value would let it and a new one score the same images at once
_NAME, _FAMILY = "rescore ü/ß v9 shard 2/7", "rescore ü/ß v9"
_CLAIM_KEY = 319309875978692919  # PostgreSQL's advisory key of the claim, and the SQLite lock byte
_EMPTY_KEY = -2039914840885289964  # a key whose hash has its top bit set: signed, as PostgreSQL's bigint
_FAMILY_OID = 1185561678  # PostgreSQL's first key of the turn (pg_locks' classid)
_FAMILY_BYTES = 4829962053654035534  # where the turn's bytes start in the records' lock file
_DIRECTORY_BYTES = 852640762604092  # where they start in an output directory's lock file
# a family whose hash has bit 60 set: its turn's bytes start where only the modulus 2**60 puts them
_FAMILY_HIGH, _FAMILY_HIGH_BYTES = "rescore part v1", 4979268067462928504


def test_lock_keys_and_bytes_are_those_older_releases_take(tmp_path, postgres_url):
    """One hash (sharding.fixed_hash) picks every shard, lock key and lock byte; its values are pinned here, and
    checked on the locks themselves: held while claimed, the neighbours free. The records' other advisory keys
    (the schema's, retention's, the pictures') are an older release's too: a replica of each meets the other's."""
    from anomaly_service.records.store import CLAIMS_LOCK_FILE, PICTURES_LOCK, RETENTION_LOCK, SCHEMA_LOCK
    from anomaly_service.sharding import SHARDS_LOCK, counts_in_turn

    assert (SCHEMA_LOCK, RETENTION_LOCK, PICTURES_LOCK) == (7253001, 7253002, 7253003)

    assert [shard_of(k, n) for k in ("a.png", "ü/ß.png") for n in (2, 1000, 2**31 - 1)] == [
        0, 672, 2121130948, 1, 559, 662622181]
    count = 7

    def probe(path: Path, offsets: list[int]) -> list[bool]:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(offsets)], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    store = RecordStore.open(None, tmp_path / "rec")
    try:
        with store.claim(_NAME, turn=(_FAMILY, count)), counts_in_turn(tmp_path / "out", _FAMILY, count):
            held = [_CLAIM_KEY, _FAMILY_BYTES + count]
            assert probe(tmp_path / "rec" / CLAIMS_LOCK_FILE, held + [_CLAIM_KEY + 1, _FAMILY_BYTES + count + 1]) == [
                False, False, True, True]
            assert probe(tmp_path / "out" / SHARDS_LOCK, [_DIRECTORY_BYTES + count, _DIRECTORY_BYTES + count + 1]) == [
                False, True]
        with store.claim(_NAME, turn=(_FAMILY_HIGH, count)):
            assert probe(tmp_path / "rec" / CLAIMS_LOCK_FILE, [_FAMILY_HIGH_BYTES + count]) == [False]
    finally:
        store.close()

    import psycopg

    store = RecordStore.open(postgres_url, None)
    try:
        with (store.claim(_NAME, turn=(_FAMILY, count)), store.claim(""),
              psycopg.connect(postgres_url.replace("+psycopg", "")) as conn):
            rows = conn.execute("SELECT classid::bigint, objid::bigint, objsubid FROM pg_locks "
                                "WHERE locktype = 'advisory' AND granted").fetchall()
        held = {(c, o, s) for c, o, s in rows}
        assert {(k >> 32 & 0xFFFFFFFF, k & 0xFFFFFFFF, 1) for k in (_CLAIM_KEY, _EMPTY_KEY)} <= held, held
        assert (_FAMILY_OID, count, 2) in held, held
    finally:
        store.close()


def test_a_postgresql_claim_holds_outside_a_transaction_and_is_let_go_with_its_block(postgres_url):
    """The claim's session holds its locks idle, not idle in a transaction (a server's
    idle_in_transaction_session_timeout, common on managed PostgreSQL, ends such a session and with it the claim,
    and an open transaction holds back vacuum for the whole run), and lets go of them when the block ends, not when
    the store is closed: its connection goes back to the pool with them otherwise."""
    import psycopg

    store = RecordStore.open(postgres_url, None)
    mine = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' " \
           "AND l.granted AND a.datname = current_database() AND a.pid <> pg_backend_pid()"
    try:
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
            with store.claim(_NAME, turn=(_FAMILY, 3)):
                assert conn.execute(mine).fetchone()[0] == 2  # the name's lock, the count's shared turn
                states = conn.execute("SELECT DISTINCT a.state FROM pg_locks l JOIN pg_stat_activity a ON "
                                      "a.pid = l.pid WHERE l.locktype = 'advisory' AND a.pid <> pg_backend_pid() "
                                      "AND a.datname = current_database()").fetchall()
                assert states == [("idle",)], states
            assert conn.execute(mine).fetchone()[0] == 0  # the store still open, its connection pooled
            with store.claim(_NAME):  # taken again at once
                assert conn.execute(mine).fetchone()[0] == 1
    finally:
        store.close()


def test_a_run_of_another_count_waiting_for_its_turn_holds_none_of_it_on_postgresql(postgres_url):
    """While a run of another count waits for its turn (a shard of N=2 while the one shard of N=1 runs: a count of 1
    is a count as any other), a further run of the running count starts at once, without a word: the waiting run
    lets go of its count's lock after each look, or the running count's shards waited for it as it waits for them.
    Each store is a session of its own, as each run's process is."""
    import threading

    stores = [RecordStore.open(postgres_url, None) for _ in range(3)]
    asked, held, told, threads = threading.Event(), threading.Event(), [], []

    def claim(store, name, count, said, then):
        with store.claim(name, turn=(_FAMILY, count), waiting_turn=said, poll_s=0.05):
            then.set()

    try:
        with stores[0].claim(_FAMILY + " shard 0/1", turn=(_FAMILY, 1)):
            threads.append(threading.Thread(target=claim, daemon=True, args=(
                stores[1], _FAMILY + " shard 0/2", 2, asked.set, threading.Event())))
            threads[-1].start()
            assert asked.wait(60)  # the other count waits for its turn
            threads.append(threading.Thread(target=claim, daemon=True, args=(
                stores[2], _FAMILY + " shard 0/1 again", 1, lambda: told.append("waiting"), held)))
            threads[-1].start()
            deadline = time.monotonic() + 60
            while not held.is_set() and not told and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(60)
        assert held.is_set() and told == [], told
    finally:
        for store in stores:
            store.close()


def test_a_new_output_directory_is_made_with_its_turn_lock_and_nothing_said(tmp_path, caplog):
    """counts_in_turn makes an --output directory that does not exist yet, and its lock file in it: the first run
    into a new directory is guarded like the rest, not told that its lock could not be opened."""
    from anomaly_service.sharding import SHARDS_LOCK, counts_in_turn

    out = tmp_path / "new" / "out"
    with counts_in_turn(out, "rescore part v", 2):
        assert (out / SHARDS_LOCK).is_file()
    assert "cannot open" not in caplog.text


class _FullDisk:
    """A results file's handle whose next write the disk refuses part way (no space left)."""

    def __init__(self, real):
        self.real = real

    def write(self, data) -> int:
        raise OSError(28, "No space left on device")

    def fileno(self) -> int:
        return self.real.fileno()


def test_a_refused_write_after_a_resume_or_earlier_writes_keeps_every_whole_line(tmp_path):
    """A write the disk refuses is cut back to the end of the last whole line: after lines written in this run, and
    after a resume (the lines an earlier run wrote), never to an earlier point. A results file in a folder that
    does not exist yet is made; a file closed before it was opened is no error."""
    from anomaly_service.sharding import ResultsFile, ResultsWriteError

    path = tmp_path / "new" / "out" / "shard-0-of-1.jsonl"
    ResultsFile(path, "part", "v1").close()
    row = {"model": "part", "model_version": "v1"}
    first = ResultsFile(path, "part", "v1")
    assert first.open() == {}
    first.write({**row, "key": "a"})
    first.write({**row, "key": "b"})
    real, first._file = first._file, _FullDisk(first._file)
    with pytest.raises(ResultsWriteError):
        first.write({**row, "key": "c"})
    first._file = real
    first.close()
    written = path.read_bytes()
    assert [json.loads(line)["key"] for line in written.splitlines()] == ["a", "b"]
    resumed = ResultsFile(path, "part", "v1")
    assert resumed.open() == {"a": None, "b": None}
    real, resumed._file = resumed._file, _FullDisk(resumed._file)
    with pytest.raises(ResultsWriteError):
        resumed.write({**row, "key": "c"})
    resumed._file = real
    resumed.close()
    assert path.read_bytes() == written
    path.write_bytes(written + b"{not json\n")
    with pytest.raises(ConfigError, match=r"shard-0-of-1.jsonl:3 is not a result line"):
        ResultsFile(path, "part", "v1").open()


def test_other_counts_files_are_read_for_this_shards_keys_and_stray_names_passed_over(tmp_path):
    """done_by_other_counts reads the files of every other shard count (this shard's keys among them, this model
    version's lines only) and neither this count's own files nor a file whose name only looks like a shard's."""
    from anomaly_service.sharding import Shard, done_by_other_counts

    shard = Shard(0, 2)
    keys = [f"k{i}.png" for i in range(40)]
    mine = [k for k in keys if shard.owns(k)]

    def lines(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    assert not set(mine[-4:]) & set(keys[:20])
    (tmp_path / "shard-0-of-2.jsonl").write_text(lines([{"key": mine[-1], "model": "m", "model_version": "v"}]))
    (tmp_path / "shard-1-of-3.jsonl").write_text(lines(
        [{"key": k, "model": "m", "model_version": "v", "inspection_id": f"r{k}"} for k in keys[:20]]
        + [{"key": mine[-2], "model": "m", "model_version": "w"}]))
    (tmp_path / "shard-0-of-4.jsonl").write_text("{not json\n" + lines([{"key": mine[-4], "model": "m",
                                                                        "model_version": "v", "inspection_id": 7}]))
    (tmp_path / "shard-x-of-y.jsonl").write_text(lines([{"key": mine[-3], "model": "m", "model_version": "v"}]))
    done = done_by_other_counts(tmp_path, shard, "m", ["v"])
    assert done == {**{k: f"r{k}" for k in keys[:20] if shard.owns(k)}, mine[-4]: None}  # an id that is no name


def test_the_largest_shard_count_is_accepted_and_one_more_refused():
    from anomaly_service.sharding import MAX_SHARDS, Shard

    assert Shard.parse(f"{MAX_SHARDS - 1}/{MAX_SHARDS}") == Shard(MAX_SHARDS - 1, MAX_SHARDS)
    with pytest.raises(ConfigError, match="at most"):
        Shard.parse(f"0/{MAX_SHARDS + 1}")
    with pytest.raises(ConfigError, match=r"JOB_COMPLETION_INDEX \(set in .*\), which is not set: give K/2"):
        Shard.parse("auto/2", {})
    with pytest.raises(ConfigError, match=r"which is 'x1': give K/2"):
        Shard.parse("auto/2", {"JOB_COMPLETION_INDEX": "x1"})


def test_an_archive_that_lists_no_image_is_an_error_not_a_finished_shard(model_dir, tmp_path):
    # the archive's share not mounted: its mount point is an empty folder, and the job said shard done, exit 0
    (tmp_path / "archive").mkdir()
    res = run("score", "--model", str(model_dir / "part"), "--shard", "0/2", "--output", str(tmp_path / "out"),
              str(tmp_path / "archive"))
    assert res.exit_code == 2, res.output
    assert f"error: no image files in {tmp_path / 'archive'}" in res.output
    assert not list((tmp_path / "out").glob("*.jsonl"))


def test_a_folder_the_run_cannot_read_is_said_and_counted_not_passed_over(tmp_path):
    """A folder of the archive another user made (mode 700) was left out unsaid (os.walk passes over a folder it
    cannot list): its images were in no count, the shard exited 0 and the results looked whole."""
    prefix = as_other_user(tmp_path)
    root = tmp_path / "archive"
    keys = make_archive(root, {"open": 2, "closed": 2})
    os.chmod(root / "closed", 0o700)
    os.chown(root / "closed", 65534, 65534)
    listed = subprocess.run([*prefix, sys.executable, "-c", (
        "import sys; from pathlib import Path; from anomaly_service.images import skip_reason; "
        "from anomaly_service.sharding import list_archive; images, skipped = list_archive([Path(sys.argv[1])]); "
        "print(sorted(i.key for i in images)); print([(p.name, skip_reason(p)) for p in skipped])"), str(root)],
        capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    found, skipped = listed.stdout.splitlines()
    assert found == str(sorted(k for k in keys if k.startswith("open/")))
    assert "('closed', 'a folder that cannot be read (Permission denied): its images are left out')" in skipped
    # an archive of nothing but such folders: an error naming them, not a shard done (before any model loads)
    os.chmod(root / "open", 0o700)
    os.chown(root / "open", 65534, 65534)
    res = subprocess.run([*prefix, sys.executable, "-m", "anomaly_service.cli", "score", "--model",
                          str(tmp_path / "no-model-needed"), "--shard", "0/1", "--output", str(tmp_path / "out"),
                          str(root)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"warning: skipping {root / 'closed'}: a folder that cannot be read" in res.stderr
    assert f"error: no image files in {root} (2 folder(s) could not be read)" in res.stderr


def test_the_last_line_counts_the_folders_that_could_not_be_read():
    from anomaly_service.rescore import Summary

    summary = Summary(Shard(0, 1), listed=4, mine=4, skipped=0, scored=4, seconds=1.0, unreadable=1)
    assert summary.line().endswith("; 1 folder(s) could not be read, their images not listed")
    assert "could not be read" not in Summary(Shard(0, 1), 4, 4, 0, 4).line()


def test_a_shard_resumed_with_part_of_its_inputs_keeps_the_keys_it_was_begun_with(model_dir, tmp_path):
    """The cron line gave ``archive/a archive/b``; run again by hand with ``archive/a`` alone, the inputs' common
    folder was another, so every key: each image of a/ was scored again and written twice, under two keys, and a
    shard begun on the new keys split the archive otherwise than its sibling begun on the old ones."""
    root = tmp_path / "archive"
    keys = make_archive(root, {"a": 6, "b": 6})
    out = tmp_path / "out"
    model = str(model_dir / "part")
    first = run("score", "--model", model, "--shard", "0/2", "--output", str(out), "-q", str(root / "a"),
                str(root / "b"))
    assert first.exit_code == 0, first.output
    again = run("score", "--model", model, "--shard", "0/2", "--output", str(out), "-q", str(root / "a"))
    assert again.exit_code == 0, again.output
    assert " 0 scored," in again.output
    other = run("score", "--model", model, "--shard", "1/2", "--output", str(out), "-q", str(root / "a"))
    assert other.exit_code == 0, other.output  # a new file of the directory: keyed as its sibling was begun
    rest = run("score", "--model", model, "--shard", "1/2", "--output", str(out), "-q", str(root / "b"))
    assert rest.exit_code == 0, rest.output
    rows = read_rows(out / "shard-0-of-2.jsonl", out / "shard-1-of-2.jsonl")
    assert Counter(r["key"] for r in rows) == Counter(keys)  # each image once, under the key it was begun with


def test_a_results_file_begun_on_part_of_the_archive_is_not_resumed_on_the_whole(model_dir, tmp_path):
    root = tmp_path / "archive"
    make_archive(root, {"a": 2, "b": 2})
    out = tmp_path / "out.jsonl"
    model = str(model_dir / "part")
    assert run("score", "--model", model, "--output", str(out), "-q", str(root / "a")).exit_code == 0
    whole = run("score", "--model", model, "--output", str(out), "-q", str(root))
    assert whole.exit_code == 2, whole.output
    assert (f"error: {out} was begun on {root / 'a'}, inside this run's {root}: its images would be scored again "
            "under other keys") in whole.output
    assert len(read_rows(out)) == 2


def test_shards_of_one_directory_scored_by_two_versions_of_the_model_are_said_to_mix(model_dir, tmp_path):
    """An update (an operator's teaching on the page) landed between two pods of one re-scoring job: the
    directory's results held half the archive scored by one version and half by the other, and nothing said so."""
    from conftest import write_manifest

    root = tmp_path / "archive"
    make_archive(root, {"a": 6})
    out = tmp_path / "out"
    before, after = tmp_path / "before" / "part", tmp_path / "after" / "part"  # one model, as it was and as updated
    shutil.copytree(model_dir / "part", before)
    shutil.copytree(model_dir / "part", after)
    manifest = json.loads((after / "manifest.json").read_text())
    manifest["created_at"] = "2030-01-01T00:00:00+00:00"
    write_manifest(after, manifest)
    assert model_version_id(after) != model_version_id(before)
    first = run("score", "--model", str(before), "--shard", "0/2", "--output", str(out), "-q", str(root))
    assert first.exit_code == 0 and "warning" not in first.output, first.output
    second = run("score", "--model", str(after), "--shard", "1/2", "--output", str(out), "-q", str(root))
    assert second.exit_code == 0, second.output
    assert (f"warning: {out / 'shard-0-of-2.jsonl'} holds results of part version {model_version_id(before)}, and "
            f"this shard scores with version {model_version_id(after)}") in second.output
    again = run("score", "--model", str(before), "--shard", "0/2", "--output", str(out), "-q", str(root))
    assert "mix two versions" in again.output  # said by every run of either while the directory mixes them


def test_another_tools_file_given_as_the_output_is_not_cut(tmp_path):
    """A JSON file written without its last newline (one object, as json.dump writes it) given as ``--output``: its
    only line was taken for a line a kill cut short and cut off, the file emptied."""
    other = tmp_path / "metrics.jsonl"
    other.write_bytes(b'{"auroc": 0.99}')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:1 is not a result line, nor the start of one"):
        ResultsFile(other, "part", "v").open()
    assert other.read_bytes() == b'{"auroc": 0.99}'
    for cut in (b"{", b'{"ke', b'{"key": "a/0.p'):  # what a kill leaves of a line: cut, as before
        ours = tmp_path / "ours.jsonl"
        ours.write_bytes(json.dumps({"key": "b.png", "model": "part", "model_version": "v"}).encode() + b"\n" + cut)
        results = ResultsFile(ours, "part", "v")
        assert results.open().keys() == {"b.png"} and results.dropped_partial == len(cut)
        results.close()


def test_an_output_file_that_cannot_be_opened_is_one_error_line(model_dir, archive, tmp_path):
    (tmp_path / "x.jsonl").mkdir()  # a directory with a results file's name: a traceback said it
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), "--output", str(tmp_path / "x.jsonl"),
                                   "-q", str(archive[0])])
    assert res.exit_code == 2, res.output
    assert f"error: {tmp_path / 'x.jsonl'}: cannot open it to write results (Is a directory)" in res.output
