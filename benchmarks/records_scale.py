"""Records after months on a line: the operations an operator, a dashboard and retention run, at a million rows.

A line scoring 5-10 parts a second keeps millions of records within a 90-day retention. This fills a fresh records
database through the product's own store (synthetic rows: 3 models, 4 lines x 3 stations, 3% anomalies with stored
picture keys, a few thousand reviews; the last day dense, the 89 before sparse) and times each operation twice on
the same rows: with revision 0004's indexes taken out again (its own downgrade, on the head schema) and at head, so
the table shows what the indexes that end in the id change.

    python benchmarks/records_scale.py                       # SQLite, 1,000,000 rows (about 5 minutes)
    python benchmarks/records_scale.py --rows 200000 --database-url postgresql+psycopg://user@host/db
    python benchmarks/records_scale.py --stats --data-dir /tmp/records  # the dashboard's stats only (kept rows)
    python benchmarks/records_scale.py --upgrade-0009 [--decomposed 0.01]  # revision 0009's upgrade at a million
    python benchmarks/records_scale.py --copy-to postgresql+psycopg://user@host/empty_db  # `anomaly db copy` of them

``--upgrade-0009`` fills the rows with a share of part ids (and one line) spelt decomposed, as a macOS folder name
gives them, takes the database back to 0008 and times ``anomaly db upgrade`` (a process of its own, as an operator
runs it before the replicas start) with the peak memory that process took.

``--copy-to URL`` fills the SQLite rows and times ``anomaly db copy`` of them into ``URL`` (an empty database), in
a process of its own, then once more (everything already there: what a resumed copy pays to skip). Records only:
the synthetic rows' picture keys name no files.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fill(store, n: int, seed: int = 0, decomposed: float = 0.0) -> list[str]:
    """``n`` synthetic inspections and their reviews; returns the heatmap keys of stored anomalies. ``decomposed``:
    the share of parts whose id is spelt decomposed (NFD, a suffix with a letter that composes), and then one of
    the four lines too."""
    import unicodedata

    from sqlalchemy import insert, update

    from anomaly_service.records.models import Inspection, Review, new_id

    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    dense = min(432_000, int(n * 0.45))  # the last day at 5 parts/s; the rest over the 89 days before
    times = sorted([now - timedelta(days=90) + timedelta(days=89) * rng.random() for _ in range(n - dense)]
                   + [now - timedelta(days=1) * rng.random() for _ in range(dense)])
    models, lines, stations = ["main"] * 12 + ["second"] * 5 + ["third"] * 3, [f"line-{i}" for i in range(1, 5)], \
        ["cam-top", "cam-side", "cam-bottom"]
    if decomposed:
        lines[3] = unicodedata.normalize("NFD", "Linie Süd")
    suffix = unicodedata.normalize("NFD", "-Å")

    def spelt(part: int) -> bool:  # a fixed share of parts, spread over the rows
        return (part * 7919) % 10_000 < decomposed * 10_000
    heatmaps, anomalies = [], []
    for start in range(0, n, 20_000):
        rows = []
        for i in range(start, min(n, start + 20_000)):
            t, part, anomaly = times[i], i // 3, rng.random() < 0.03
            ns = rng.uniform(1.0, 3.0) if anomaly else abs(rng.gauss(0.45, 0.15))
            rid, sha = new_id(int(t.timestamp() * 1000)), os.urandom(32).hex()
            heat = f"{sha[2:4]}/{sha[::-1]}.png" if anomaly else None
            rows.append(dict(id=rid, created_at=t, model=models[part % 20], model_version="v1", score=ns * 56.0,
                             normalized_score=ns, threshold=56.0, decision="anomaly" if anomaly else "normal",
                             regions=[], image_width=900, image_height=900, image_bytes=300_000, image_sha256=sha,
                             timing_ms={"total": 50.0}, part_id=f"SN-{part:08d}" + (suffix if spelt(part) else ""),
                             line=lines[(part // 7) % 4],
                             station=stations[i % 3], meta=None, source="api",
                             image_file=f"{sha[:2]}/{sha}.png" if anomaly else None, heatmap_file=heat,
                             view_token=None, files_state="stored" if anomaly else "not_kept", files_changed_at=None,
                             verdict=None, reviewed_at=None))
            if anomaly:
                heatmaps.append(heat)
                anomalies.append((rid, t))
        with store.engine.begin() as conn:
            conn.execute(insert(Inspection), rows)
        print(f"  {start + len(rows)} rows", file=sys.stderr, flush=True)
    reviews = rng.sample(anomalies, min(3000, len(anomalies)))
    with store.engine.begin() as conn:
        conn.execute(insert(Review), [dict(inspection_id=rid, verdict=rng.choice(["defect", "good"]), note=None,
                                           reviewer="bench", created_at=t) for rid, t in reviews])
        for rid, t in reviews:
            conn.execute(update(Inspection).where(Inspection.id == rid).values(verdict="defect", reviewed_at=t))
    return heatmaps


def timed(fn, repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1000.0


def operations(store, heatmaps: list[str]) -> dict[str, float]:
    from itertools import islice

    from anomaly_service.records.store import Filters

    keys = heatmaps[len(heatmaps) // 2:][:500]
    return {
        "first page, no filter": timed(lambda: store.query(Filters(), 50)),
        "review queue: anomalies unreviewed (100)": timed(lambda: store.query(
            Filters(decision="anomaly", verdict="unreviewed"), 100)),
        "normal parts unreviewed (100)": timed(lambda: store.query(Filters(decision="normal", verdict="unreviewed"),
                                                                   100)),
        "one model's page (50)": timed(lambda: store.query(Filters(model="third"), 50)),
        "anomalies' page (50)": timed(lambda: store.query(Filters(decision="anomaly"), 50)),
        "a line and station's page (50)": timed(lambda: store.query(Filters(line="line-2", station="cam-side"), 50)),
        "export of one model, first 20,000 rows": timed(lambda: list(islice(store.iter_all(Filters(model="third")),
                                                                             20_000)), repeat=1),
        "retention marks 500 heatmap keys": timed(lambda: store.mark_files(keys, "stored"), repeat=1),  # stays stored
        "stats, last 24 h": timed(lambda: store.stats(Filters(since=datetime.now(timezone.utc)
                                                              - timedelta(days=1))), repeat=1),
    }


def list_indexes(store, direction: str) -> None:
    """Revision 0004's own ``downgrade`` (the single-column indexes before it) or ``upgrade`` run on the head
    schema: a downgrade to 0003 would also drop the columns later revisions added, which the store's queries read."""
    import importlib.util

    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    from anomaly_service.records.store import MIGRATIONS

    spec = importlib.util.spec_from_file_location("revision_0004", MIGRATIONS / "versions" / "0004_list_indexes.py")
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    with store.engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        getattr(revision, direction)()


def _python_work(stop: threading.Event, ticks: list[int]) -> None:
    """Pure-Python work in a loop: what scoring's Python side gets of the interpreter meanwhile."""
    while not stop.is_set():
        sum(range(2000))
        ticks[0] += 1


def timed_beside_python(fn) -> tuple[float, float]:
    """(ms of one call alone, ms of one call while another thread runs Python in a loop, as scoring's glue does:
    every row a driver hands back then waits for the interpreter)."""
    t0 = time.perf_counter()
    fn()
    alone_ms = (time.perf_counter() - t0) * 1000.0
    stop = threading.Event()
    worker = threading.Thread(target=_python_work, args=(stop, [0]))
    worker.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    fn()
    beside_ms = (time.perf_counter() - t0) * 1000.0
    stop.set()
    worker.join()
    return alone_ms, beside_ms


def stats_table(store) -> None:
    """The dashboard's stats over a few ranges: time alone and beside a thread that runs Python."""
    from anomaly_service.records.store import Filters

    now = datetime.now(timezone.utc)
    cases = [("last hour, by minute", timedelta(hours=1), "minute"),
             ("last 24 h, by hour", timedelta(days=1), "hour"),
             ("last 24 h, one model, by hour", timedelta(days=1), "hour"),
             ("90 days, by day", timedelta(days=90), "day")]
    print("| stats | ms alone | ms beside a busy Python thread | buckets | records |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, span, bucket in cases:
        filters = Filters(since=now - span, model="third" if "one model" in name else None)
        out: dict = {}
        alone, beside = timed_beside_python(lambda: out.update(store.stats(filters, bucket)))
        counted = sum(b["count"] for b in out["buckets"])
        print(f"| {name} | {alone:.0f} | {beside:.0f} | {len(out['buckets'])} | {counted:,}"
              f"{' (truncated)' if out['truncated'] else ''} |", flush=True)


def upgrade_0009(store, a: argparse.Namespace, data: Path) -> None:
    """Fill, take the schema back to 0008, and time ``anomaly db upgrade`` in a process of its own."""
    from sqlalchemy import func, select

    from anomaly_service.records.models import Inspection
    from anomaly_service.records.store import RecordStore

    t0 = time.perf_counter()
    fill(store, a.rows, decomposed=a.decomposed)
    print(f"filled {a.rows} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    store.downgrade("0008")
    store.close()
    from command_start import timed_command  # the command as an operator runs it, reporting its own peak

    upgrade = ["db", "upgrade", *(["--database-url", a.database_url] if a.database_url else ["--data-dir", str(data)])]
    seconds, peak_mb, _ = timed_command(upgrade, check=True)
    idle_seconds, idle_mb, _ = timed_command(upgrade, check=True)  # nothing left to do: its start (imports) alone
    store = RecordStore.open(a.database_url, data)
    with store.engine.connect() as conn:
        filled = {c: conn.scalar(select(func.count()).where(getattr(Inspection, f"{c}_composed").is_not(None)))
                  for c in ("part_id", "line")}
    store.close()
    kind = "PostgreSQL" if a.database_url else "SQLite"
    print(f"\n| {kind} records | decomposed part ids | `anomaly db upgrade` 0008 -> 0009, s (at head already) "
          f"| its peak RSS, MB (at head already) | rows given a composed part id / line |\n"
          f"| ---: | ---: | ---: | ---: | ---: |\n"
          f"| {a.rows:,} | {a.decomposed:.0%} | {seconds:.1f} ({idle_seconds:.1f}) | {peak_mb:.0f} ({idle_mb:.0f}) "
          f"| {filled['part_id']:,} / {filled['line']:,} |")


def copy_to(store, a: argparse.Namespace, data: Path) -> None:
    """Fill the SQLite rows, then time ``anomaly db copy`` of them into ``a.copy_to``, and again with all there."""
    from sqlalchemy import func, select

    from anomaly_service.records.models import Review

    t0 = time.perf_counter()
    fill(store, a.rows)
    with store.engine.connect() as conn:
        reviews = conn.scalar(select(func.count()).select_from(Review))
    store.close()
    print(f"filled {a.rows} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    from command_start import timed_command  # the command as an operator runs it, reporting its own peak

    copy = ["db", "copy", "-q", "--from-data-dir", str(data), "--to-database-url", a.copy_to]
    seconds, peak_mb, torch_loaded = timed_command(copy, check=True)
    again_s, again_mb, _ = timed_command(copy, check=True)
    print(f"torch imported by the copy: {torch_loaded}", file=sys.stderr)
    print(f"\n| SQLite -> PostgreSQL | reviews | `anomaly db copy`, s | records a second | peak RSS, MB "
          f"| run again (all there), s / MB |\n| ---: | ---: | ---: | ---: | ---: | ---: |\n"
          f"| {a.rows:,} | {reviews:,} | {seconds:.1f} | {a.rows / seconds:,.0f} | {peak_mb:.0f} "
          f"| {again_s:.1f} / {again_mb:.0f} |")


def main() -> None:
    from anomaly_service.records.store import RecordStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--database-url", default=None, help="PostgreSQL (an empty database); default SQLite in a "
                    "temporary directory")
    ap.add_argument("--stats", action="store_true", help="only the stats table (time alone and beside a "
                    "thread that runs Python), at head")
    ap.add_argument("--data-dir", type=Path, default=None, help="keep the SQLite database here; one that already "
                    "holds records is measured as it is, not filled again")
    ap.add_argument("--upgrade-0009", action="store_true", help="time revision 0009's upgrade (each name's composed "
                    "spelling) from 0008 on the filled rows, and its peak memory")
    ap.add_argument("--decomposed", type=float, default=0.01, help="with --upgrade-0009: the share of part ids "
                    "spelt decomposed")
    ap.add_argument("--copy-to", metavar="URL", default=None, help="time `anomaly db copy` of the filled SQLite rows "
                    "into this (empty) database")
    a = ap.parse_args()
    data = a.data_dir or Path(tempfile.mkdtemp(prefix="anomaly-records-scale-"))
    store = RecordStore.open(a.database_url, data)
    store.upgrade()
    if a.upgrade_0009:
        upgrade_0009(store, a, data)
        return
    if a.copy_to:
        if a.database_url:
            raise SystemExit("--copy-to copies SQLite rows: leave out --database-url")
        copy_to(store, a, data)
        return
    if a.stats and store.count() > 0:
        print(f"measuring the {store.count():,} records already in {data}", file=sys.stderr)
        stats_table(store)
        return
    t0 = time.perf_counter()
    heatmaps = fill(store, a.rows)
    print(f"filled {a.rows} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.stats:
        stats_table(store)
        return
    list_indexes(store, "downgrade")  # the indexes before the ones that end in the id
    before = operations(store, heatmaps)
    t0 = time.perf_counter()
    list_indexes(store, "upgrade")
    upgrade_s = time.perf_counter() - t0
    after = operations(store, heatmaps)
    kind = "PostgreSQL" if a.database_url else "SQLite"
    print(f"\n{kind}, {a.rows:,} records; median ms of 3 calls (export, retention and stats: one)\n")
    print("| operation | before 0004 ms | at head ms |\n| --- | ---: | ---: |")
    for name in before:
        print(f"| {name} | {before[name]:.1f} | {after[name]:.1f} |")
    print(f"\nrevision 0004's upgrade (building the indexes) on {a.rows:,} records: {upgrade_s:.1f} s")
    store.close()


if __name__ == "__main__":
    main()
