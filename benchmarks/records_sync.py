"""What SQLite's FULL sync costs the records: commits of the sizes the service makes, FULL against NORMAL.

The service runs SQLite in WAL mode with ``synchronous=FULL`` (the log synced at every commit; decisions.md "Power
cuts and kills"), where NORMAL, WAL's usual pairing, syncs only at checkpoints and may roll back every commit since
the last one after a power loss. This times the product's own store committing batches of 1 (a review, a single
part), 10 and 100 records (the recorder's batches, one transaction each) on the disk under ``--data-dir``, once
with the product's FULL and once with the same store set to NORMAL, alternated in rounds, and prints the median
milliseconds per commit and per record.

    python benchmarks/records_sync.py                      # in a temporary directory (the disk /tmp is on)
    python benchmarks/records_sync.py --data-dir /data/bench --commits 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def open_store(data_dir: Path, synchronous: str):
    """The product's store over ``data_dir``, its connections set to ``synchronous`` after the product's own
    pragmas (a listener added after them runs after them)."""
    from sqlalchemy import event

    from anomaly_service.records import RecordStore

    store = RecordStore.open(None, data_dir)
    if synchronous != "FULL":
        @event.listens_for(store.engine, "connect")
        def _sync(dbapi_conn, _record) -> None:  # noqa: ANN001 (SQLAlchemy's listener signature)
            dbapi_conn.execute(f"PRAGMA synchronous={synchronous}")
    store.upgrade()
    with store.engine.connect() as conn:
        got = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    assert got == {"FULL": 2, "NORMAL": 1}[synchronous], (synchronous, got)
    return store


def rows(start: int, n: int) -> list:
    from anomaly_service.records.models import Inspection, new_id

    t0 = datetime.now(timezone.utc)
    out = []
    for i in range(start, start + n):
        at = t0 + timedelta(milliseconds=i)
        out.append(Inspection(
            id=new_id(int(at.timestamp() * 1000)), created_at=at, model="part", model_version="v1", score=50.0,
            normalized_score=0.5, threshold=56.0, decision="normal", regions=[], image_width=900, image_height=900,
            image_bytes=300_000, image_sha256=os.urandom(32).hex(), timing_ms={"total": 50.0}, part_id=f"SN-{i}",
            line="line-1", station="cam-top", meta=None, source="api", image_file=None, files_state="not_kept"))
    return out


def commit_ms(store, batch: int, commits: int, start: int) -> list[float]:
    out = []
    for k in range(commits):
        batch_rows = rows(start + k * batch, batch)
        t0 = time.perf_counter()
        store.add_many(batch_rows)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="where the two databases go (default: a temporary "
                    "directory)")
    ap.add_argument("--commits", type=int, default=100, help="commits of each size per mode and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, FULL and NORMAL alternated in each")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(dir=args.data_dir) as scratch:
        stores = {mode: open_store(Path(scratch) / mode.lower(), mode) for mode in ("FULL", "NORMAL")}
        times: dict[tuple[str, int], list[float]] = {}
        start = 0
        for _ in range(args.rounds):
            for batch in args.batches:
                for mode, store in stores.items():
                    times.setdefault((mode, batch), []).extend(commit_ms(store, batch, args.commits, start))
                    start += batch * args.commits
        for store in stores.values():
            store.close()
        print(f"commit {commit}, {platform.machine()}, {os.cpu_count()} cores, data under {scratch}, "
              f"{args.commits} commits x {args.rounds} rounds per cell, median")
    print("| records per commit | NORMAL ms per commit | FULL ms per commit | FULL - NORMAL, ms per record |")
    print("| --- | --- | --- | --- |")
    for batch in args.batches:
        normal, full = (statistics.median(times[(m, batch)]) for m in ("NORMAL", "FULL"))
        print(f"| {batch} | {normal:.2f} | {full:.2f} | {(full - normal) / batch:.3f} |")


if __name__ == "__main__":
    main()
