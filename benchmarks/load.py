"""Load benchmark: N concurrent clients against a real ``anomaly serve`` process on loopback.

For each server mode (micro-batching on, and off = one image per backbone pass) and each client count, clients
POST real photos back to back for a bounded time. Prints p50/p95/p99 latency, images/s, errors, and the server's
RSS at the start, peak and end of each phase (flat = no growth under load).

The "big images" scenario (``--scenario big``) asks what a burst of huge photos does to everyone else: small
clients post back to back, and a few seconds in, ``--big-count`` clients each post one 6000x6000 JPEG photo at
once. Rows, each on a fresh server with the default settings: the small clients alone (the baseline), then with
the burst; and the burst again with recording off (``--record false``), which leaves only the memory that
admission control bounds. Printed: how many big photos got an early 503 (and how fast), the small photos'
p50/p99 latency, and the server's peak RSS (VmHWM of the server process).

    python benchmarks/load.py                                  # lite0 model fitted on shared bottle, 1/4/16 clients
    python benchmarks/load.py --model-dir models --model bottle --clients 1,4,16,32 --duration 30 --json out.json
    python benchmarks/load.py --scenario big                   # 24 big photos next to 4 small clients
    python benchmarks/load.py --scenario pixel-cost            # peak memory of one big photo, per answer kind
    python benchmarks/load.py --scenario soak --soak-requests 20000   # memory, files and threads over a long run
    python benchmarks/load.py --scenario dashboard --records-dir DIR  # scoring beside dashboards polling stats
    python benchmarks/load.py --scenario retained               # memory kept after huge photos, per allocator

The "soak" scenario asks whether a server that runs for months stays the same size: one server with recording on
(SQLite, every picture kept) scores ``--soak-requests`` photos that all differ (a test photo with a counter
stamped into one corner, so every record and stored picture is new), while a reviewer lists the newest
inspections and reviews some at every checkpoint and /metrics is scraped. At each checkpoint it prints the
server's RSS, open file descriptors, threads, records written and the data directory's size; the last line gives
the growth of RSS per 1,000 photos after the first checkpoint (allocator warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB; ``field="VmHWM"``: its peak since it started."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc: where the cores went."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class RssSampler:
    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            time.sleep(self.every)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_mb(self.pid))


def training_photos(category: Path, train_limit: int) -> tuple[list[Any], str]:
    """At most ``train_limit`` of the category's good training photos, evenly spaced (synthetic parts where the
    shared data is absent), and what they are, for the table's header."""
    sys.path.insert(0, str(REPO))
    from anomaly_service.images import list_images

    if (category / "train" / "good").is_dir():
        train, _ = list_images(category / "train" / "good")
        train = train[:: max(1, len(train) // train_limit)][:train_limit]
        return train, f"mvtec_ad/bottle ({len(train)} train images)"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import textured_part

    rng = np.random.default_rng(0)
    return [textured_part(rng, 256, 256) for _ in range(train_limit)], f"synthetic ({train_limit} images)"


def prepare_model(model_dir: Path | None, train_limit: int) -> tuple[Path, str]:
    """Use the given model directory, or fit an efficientnet_lite0 model (shared bottle, else synthetic)."""
    if model_dir is not None:
        return model_dir, ""
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel

    root = Path(tempfile.mkdtemp(prefix="anomaly-load-"))
    train, source = training_photos(SHARED, train_limit)
    print(f"fitting efficientnet_lite0 on {source} ...", file=sys.stderr)
    AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train).save(root / "load")
    return root, source


def load_images(limit: int = 16) -> list[bytes]:
    if (SHARED / "test").is_dir():
        files = sorted(p for p in (SHARED / "test").rglob("*.png"))
        return [p.read_bytes() for p in files[:: max(1, len(files) // limit)][:limit]]
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import png_bytes, textured_part

    rng = np.random.default_rng(1)
    return [png_bytes(textured_part(rng, 256, 256)) for _ in range(limit)]


def start_server(model_dir: Path, port: int, batch_max_size: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "ANOMALY_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(model_dir), "--port", str(port),
           "--batch-max-size", str(batch_max_size), "--reload-interval", "0", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server exited during start-up")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


@contextlib.contextmanager
def warm_server(model_dir: Path, batch_max_size: int, extra: list[str], images: list[bytes], heatmap: str,
                model: str | None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A fresh server on a free port, warmed by two clients for a few seconds, stopped (SIGTERM) afterwards."""
    port = free_port()
    proc = start_server(model_dir, port, batch_max_size, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_clients(url, images, 2, 3.0, heatmap, model))  # warm-up
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def run_clients(url: str, images: list[bytes], clients: int, duration: float, heatmap: str,
                      model: str | None) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    params = {"heatmap": heatmap, **({"model": model} if model else {})}
    stop_at = time.perf_counter() + duration

    async def client(i: int, c: httpx.AsyncClient) -> None:
        k = i
        while time.perf_counter() < stop_at:
            data = images[k % len(images)]
            k += clients
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/score", params=params, files={"file": ("img.png", data, "image/png")})
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                ok, key = False, type(exc).__name__
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t_start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    elapsed = time.perf_counter() - t_start
    lat = np.array(latencies) * 1000.0
    return {"requests": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "images_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "max_ms": float(lat.max()) if len(lat) else float("nan")}


def write_json(args: argparse.Namespace, source: str, rows: list[dict[str, Any]]) -> None:
    """The rows as ``--json`` asks, for any scenario."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"source": source, "heatmap": args.heatmap, "rows": rows}, indent=2))


def big_photo(side: int = 6000) -> bytes:
    """A ``side`` x ``side`` JPEG photo: a test photo scaled up (smooth, so it compresses like a real one)."""
    import io

    from PIL import Image

    if (SHARED / "test").is_dir():
        img = Image.open(sorted((SHARED / "test").rglob("*.png"))[0]).convert("RGB")
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import textured_part

        img = Image.fromarray(textured_part(np.random.default_rng(2), 256, 256))
    buf = io.BytesIO()
    img.resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def run_burst(url: str, images: list[bytes], clients: int, duration: float, heatmap: str,
                    model: str | None, big: bytes, big_count: int, big_at: float) -> dict[str, Any]:
    """Small clients back to back for ``duration`` s; at ``big_at`` s, ``big_count`` one-shot big photos at once."""
    outcomes: list[tuple[int | str, float, str]] = []
    params = {"heatmap": heatmap, **({"model": model} if model else {})}

    async def one_big(c: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        try:
            r = await c.post(f"{url}/score", params=params, files={"file": ("big.jpg", big, "image/jpeg")})
            status: int | str = r.status_code
            retry = r.headers.get("retry-after", "")
        except httpx.HTTPError as exc:
            status, retry = type(exc).__name__, ""
        outcomes.append((status, time.perf_counter() - t0, retry))

    async def bigs() -> None:
        await asyncio.sleep(big_at)
        limits = httpx.Limits(max_connections=big_count, max_keepalive_connections=big_count)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            await asyncio.gather(*(one_big(c) for _ in range(big_count)))

    burst = asyncio.create_task(bigs()) if big_count else None
    res = await run_clients(url, images, clients, duration, heatmap, model)
    if burst is not None:
        await burst
    refused = [t for s, t, _ in outcomes if s == 503]
    served = [t for s, t, _ in outcomes if s == 200]
    res.update(big=big_count, big_503=len(refused), big_200=len(served),
               big_other=len(outcomes) - len(refused) - len(served),
               big_503_max_ms=max(refused) * 1000.0 if refused else float("nan"),
               big_200_max_s=max(served) if served else float("nan"),
               retry_after=sorted({r for s, _, r in outcomes if s == 503}))
    return res


def big_scenario(args: argparse.Namespace, model_dir: Path, images: list[bytes], source: str) -> None:
    clients = args.small_clients
    big = big_photo()
    rows = []
    plans = [(0, "records-sqlite"), (args.big_count, "records-sqlite"), (args.big_count, "records-off")]
    for big_count, records in plans:
        flags = args.server_args.split() + record_args(records, args.postgres_url)
        with warm_server(model_dir, args.batch_max_size, flags, images, args.heatmap, args.model) as (url, proc):
            idle = rss_mb(proc.pid)
            res = asyncio.run(run_burst(url, images, clients, args.duration, args.heatmap, args.model, big,
                                        big_count, args.big_at))
            res.update(clients=clients, rss_idle_mb=idle, rss_peak_mb=rss_mb(proc.pid, "VmHWM"),
                       records="off" if records == "records-off" else "on (SQLite)")
            rows.append(res)
            print(f"{big_count} big: small p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, big 503 "
                  f"{res['big_503']}, peak RSS {res['rss_peak_mb']:.0f} MB", file=sys.stderr)

    print(f"\nserver: anomaly serve {args.server_args}, efficientnet_lite0 model{' on ' + source if source else ''}; "
          f"heatmap={args.heatmap}; {clients} small clients back to back for {args.duration:g} s; big photos: "
          f"6000x6000 JPEG ({len(big) / 1e6:.1f} MB), all at once {args.big_at:g} s in, one request each; "
          f"{os.cpu_count()} CPUs\n")
    print("| big photos | records | big: early 503 / 200 / other | slowest 503 ms | slowest big 200 s | "
          "small photos | small p50 ms | small p99 ms | small max ms | small errors | server RSS idle / peak "
          "(VmHWM) MB |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        big_cells = (f"{r['big_503']} / {r['big_200']} / {r['big_other']} | {r['big_503_max_ms']:.0f} | "
                     f"{r['big_200_max_s']:.1f}") if r["big"] else "- | - | -"
        print(f"| {r['big']} | {r['records']} | {big_cells} | {r['requests']} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['errors']} | {r['rss_idle_mb']:.0f} / "
              f"{r['rss_peak_mb']:.0f} |")
    write_json(args, source, rows)


def pixel_cost_child(model_dir: Path, kind: str) -> None:
    """In this fresh process: the service in-process, warmed, then one 6000x6000 photo; print the peak growth."""
    sys.path.insert(0, str(REPO))
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    big, small = big_photo(), load_images(1)[0]
    heatmap, headers = ("none", {"Accept": "image/png"}) if kind == "picture" else (kind, {})
    # recording off: what remains is the memory admission control bounds (records have their own buffer)
    with TestClient(create_app(ServiceSettings(model_dir=model_dir, reload_interval=0, record=False))) as c:
        for _ in range(3):
            c.post("/score", params={"heatmap": heatmap}, files={"file": ("s.png", small)}, headers=headers)
        before = rss_mb(os.getpid(), "VmHWM")
        t0 = time.perf_counter()
        r = c.post("/score", params={"heatmap": heatmap}, files={"file": ("big.jpg", big)}, headers=headers)
        seconds = time.perf_counter() - t0
        peak = rss_mb(os.getpid(), "VmHWM")
    print(json.dumps({"kind": kind, "status": r.status_code, "seconds": seconds, "before_mb": before,
                      "peak_mb": peak}))


def pixel_cost(model_dir: Path) -> None:
    """Peak memory one 6000x6000 photo adds, per answer kind, each in a fresh process (VmHWM is per process)."""
    rows = []
    for kind in ("none", "png", "overlay", "picture"):
        out = subprocess.run([sys.executable, __file__, "--pixel-cost-child", kind, "--model-dir", str(model_dir)],
                             capture_output=True, text=True, check=True, env={**os.environ, "ANOMALY_LOG_LEVEL":
                                                                              "warning"}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    pixels = 6000 * 6000
    print("\n| answer | status | seconds | peak RSS before / with the photo MB | added MB | bytes per pixel |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        added = r["peak_mb"] - r["before_mb"]
        print(f"| {r['kind']} | {r['status']} | {r['seconds']:.1f} | {r['before_mb']:.0f} / {r['peak_mb']:.0f} | "
              f"{added:.0f} | {added * 1024 * 1024 / pixels:.1f} |")


def stamped(image: bytes, n: int) -> bytes:
    """``image`` with ``n`` written into the first 4 pixels of its top row: every request a new photo (new
    content hash, new record, new stored picture) at almost no cost to what the model sees."""
    import io

    from PIL import Image

    arr = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
    arr[0, :4, :] = np.frombuffer(int(n).to_bytes(12, "little"), dtype=np.uint8).reshape(4, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def process_counts(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of a process."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
        return fds, threads
    except (OSError, StopIteration, ValueError):
        return -1, -1


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


async def soak_clients(url: str, images: list[bytes], clients: int, start: int, count: int,
                       heatmap: str) -> dict[str, Any]:
    """``count`` distinct photos (numbered from ``start``) over ``clients`` connections; every answer checked."""
    next_n, errors, latencies = start, {}, []

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal next_n
        while next_n < start + count:
            n, next_n = next_n, next_n + 1
            data = await asyncio.to_thread(stamped, images[n % len(images)], n)
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/score", params={"heatmap": heatmap, "part_id": f"part-{n}"},
                                 files={"file": (f"part-{n}.png", data, "image/png")})
                key = "" if r.status_code == 200 else str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key:
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return {"errors": errors, "p50_ms": float(np.percentile(np.array(latencies) * 1000, 50)) if latencies else
            float("nan")}


def review_some(url: str, n: int) -> int:
    """A reviewer's round: the newest flagged inspections, ``n`` of them reviewed; the page's stats read too."""
    r = httpx.get(f"{url}/inspections", params={"limit": n, "decision": "anomaly", "verdict": "unreviewed"}, timeout=30)
    r.raise_for_status()
    done = 0
    for item in r.json()["items"]:
        httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good", "note": "soak"},
                   headers={"X-Reviewer": "soak"}, timeout=30).raise_for_status()
        done += 1
    httpx.get(f"{url}/inspections/stats", timeout=30).raise_for_status()
    httpx.get(f"{url}/metrics", timeout=30).raise_for_status()
    return done


def dashboard_scenario(args: argparse.Namespace, model_dir: Path, images: list[bytes], source: str) -> None:
    """Scoring beside dashboards that poll ``GET /inspections/stats`` (the last 24 hours by hour) back to back, on a
    records database that already holds a line's months (``--records-dir``, filled by
    ``benchmarks/records_scale.py --stats --data-dir DIR``). Rows: 0, 1 and 3 dashboards; each row's scoring
    p50/p95, and the stats answers' median time and status codes."""
    if args.records_dir is None:
        raise SystemExit("--scenario dashboard needs --records-dir (a data directory with records in it)")
    rows = []
    flags = args.server_args.split() + ["--data-dir", str(args.records_dir), "--keep-images", "none"]
    with warm_server(model_dir, args.batch_max_size, flags, images, args.heatmap, args.model) as (url, _):
        for dashboards in (0, 1, 3):
            stop = threading.Event()
            answers: list[tuple[int, float]] = []

            def poll() -> None:
                with httpx.Client(timeout=60) as c:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            code = c.get(f"{url}/inspections/stats", params={"bucket": "hour"}).status_code
                        except httpx.HTTPError:
                            code = 0
                        answers.append((code, time.perf_counter() - t0))

            pollers = [threading.Thread(target=poll, daemon=True) for _ in range(dashboards)]
            for t in pollers:
                t.start()
            res = asyncio.run(run_clients(url, images, args.small_clients, args.duration, args.heatmap, args.model))
            stop.set()
            for t in pollers:
                t.join()
            codes: dict[int, int] = {}
            for code, _ in answers:
                codes[code] = codes.get(code, 0) + 1
            stats_ms = float(np.median([t for _, t in answers]) * 1000) if answers else float("nan")
            rows.append({"dashboards": dashboards, **res, "stats_answers": len(answers), "stats_codes": codes,
                         "stats_p50_ms": stats_ms})
            print(f"| {dashboards} | {res['p50_ms']:.0f} | {res['p95_ms']:.0f} | {res['images_per_s']:.1f} | "
                  f"{len(answers)} | {stats_ms:.0f} | {', '.join(f'{k}: {v}' for k, v in sorted(codes.items()))} |",
                  flush=True)
    write_json(args, source, rows)


ALLOCATOR_SETTINGS = {"glibc defaults": {}, "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
                      "MALLOC_MMAP_THRESHOLD_=1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                      "both (the images' setting)": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}}


def retained_scenario(args: argparse.Namespace, model_dir: Path, images: list[bytes], source: str) -> None:
    """What a server keeps after very large photos, per allocator setting: a fresh server each, five 36-40 MP
    photos one after another (squares and an 8 x 5,000,000 strip, overlay answers), its idle RSS after each and
    its peak. glibc keeps freed memory in per-thread arenas and raises its threshold for returning big blocks."""
    import io

    from PIL import Image

    def png_strip() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 1, 3), np.uint8)).resize((8, 5_000_000)) \
            .save(buf, "PNG", compress_level=1)
        return buf.getvalue()

    photos = [("40 MP", big_photo(6324)), ("strip", png_strip()), ("36 MP", big_photo(6000)),
              ("40 MP", big_photo(6324)), ("strip", png_strip())]
    print(f"| allocator | idle MB | {' | '.join(f'after {n}' for n, _ in photos)} | peak (VmHWM) MB |\n"
          f"| --- | ---: | {' | '.join('---:' for _ in photos)} | ---: |", flush=True)
    rows = []
    for label, env in ALLOCATOR_SETTINGS.items():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            port = free_port()
            proc = start_server(model_dir, port, args.batch_max_size, ["--record", "false"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            idle, after = rss_mb(proc.pid), []
            for _, data in photos:
                r = httpx.post(f"http://127.0.0.1:{port}/score", params={"heatmap": "overlay"}, timeout=300,
                               files={"file": ("big", data)})
                r.raise_for_status()
                time.sleep(2)
                after.append(rss_mb(proc.pid))
            peak = rss_mb(proc.pid, "VmHWM")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        rows.append({"allocator": label, "idle_mb": idle, "after_mb": after, "peak_mb": peak})
        print(f"| {label} | {idle:.0f} | {' | '.join(f'{a:.0f}' for a in after)} | {peak:.0f} |", flush=True)
    write_json(args, source, rows)


def soak_scenario(args: argparse.Namespace, model_dir: Path, images: list[bytes], source: str) -> None:
    data = Path(tempfile.mkdtemp(prefix="anomaly-soak-data-"))
    flags = args.server_args.split() + ["--data-dir", str(data), "--keep-images", "all"]
    rows: list[dict[str, Any]] = []
    done = reviewed = 0
    with warm_server(model_dir, args.batch_max_size, flags, images, args.heatmap, args.model) as (url, proc):
        def checkpoint(p50: float, errors: dict[str, int]) -> None:
            fds, threads = process_counts(proc.pid)
            rows.append({"photos": done, "rss_mb": rss_mb(proc.pid), "fds": fds, "threads": threads,
                         "records": records_written(url, settle=True), "reviewed": reviewed,
                         "data_mb": dir_mb(data), "p50_ms": p50, "errors": dict(errors)})
            r = rows[-1]
            print(f"{done:6d} photos: RSS {r['rss_mb']:.0f} MB, fds {fds}, threads {threads}, records "
                  f"{r['records']}, p50 {p50:.0f} ms, errors {errors or 0}", file=sys.stderr)

        checkpoint(float("nan"), {})
        while done < args.soak_requests:
            step = min(args.soak_every, args.soak_requests - done)
            res = asyncio.run(soak_clients(url, images, args.small_clients, done, step, args.heatmap))
            done += step
            reviewed += review_some(url, 5)
            checkpoint(res["p50_ms"], res["errors"])

    print(f"\nserver: anomaly serve {' '.join(flags[:-4])} --data-dir TMP --keep-images all, efficientnet_lite0 "
          f"model{' on ' + source if source else ''}; heatmap={args.heatmap}; {args.small_clients} clients; every "
          f"photo distinct; {os.cpu_count()} CPUs\n")
    print("| photos scored | server RSS MB | open fds | threads | records written | reviewed | data dir MB | "
          "p50 ms | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        p50 = "-" if r["p50_ms"] != r["p50_ms"] else f"{r['p50_ms']:.0f}"
        print(f"| {r['photos']} | {r['rss_mb']:.0f} | {r['fds']} | {r['threads']} | {r['records']} | "
              f"{r['reviewed']} | {r['data_mb']:.0f} | {p50} | {sum(r['errors'].values()) or 0} |")
    if len(rows) >= 3:
        first, last = rows[1], rows[-1]
        per_k = (last["rss_mb"] - first["rss_mb"]) / max(1, last["photos"] - first["photos"]) * 1000
        print(f"\nRSS from {first['photos']} to {last['photos']} photos: {first['rss_mb']:.0f} -> "
              f"{last['rss_mb']:.0f} MB ({per_k:+.2f} MB per 1,000 photos); records written in the soak: "
              f"{last['records'] - rows[0]['records']} of {last['photos']} photos scored")
    write_json(args, source, rows)


def record_args(mode: str, postgres_url: str | None) -> list[str]:
    """``anomaly serve`` flags of a records mode: off, SQLite in a fresh directory, or PostgreSQL."""
    if mode == "records-off":
        return ["--record", "false"]
    data = tempfile.mkdtemp(prefix="anomaly-load-data-")
    if mode == "records-postgresql":
        if not postgres_url:
            raise SystemExit("records-postgresql needs --postgres-url postgresql+psycopg://...")
        return ["--data-dir", data, "--database-url", postgres_url]
    return ["--data-dir", data]  # records-sqlite, and the default of the other modes: recording is on by default


def records_written(url: str, settle: bool = False) -> int:
    """anomaly_records_written_total from /metrics; ``settle``: once the record buffer is empty."""
    deadline = time.time() + (30 if settle else 0)
    while True:
        values = {}
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(("anomaly_records_written_total ", "anomaly_record_buffer_depth ")):
                name, value = line.split()
                values[name] = float(value)
        if not settle or values.get("anomaly_record_buffer_depth", 0) == 0 or time.time() > deadline:
            time.sleep(0.5 if settle else 0)  # the writer's last batch commits after it leaves the buffer
            return int(values.get("anomaly_records_written_total", 0))
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="Serve these models (default: fit one)")
    ap.add_argument("--model", default=None, help="Model name to score with")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds per (mode, clients) phase")
    ap.add_argument("--heatmap", default="png", choices=["none", "png", "overlay", "array"])
    ap.add_argument("--modes", default="batched,unbatched",
                    help="batched, unbatched, and for the inspection records: records-off, records-sqlite, "
                         "records-postgresql (batched, recording off / to SQLite / to --postgres-url)")
    ap.add_argument("--postgres-url", default=None, help="postgresql+psycopg://... for records-postgresql")
    ap.add_argument("--batch-max-size", type=int, default=8)
    ap.add_argument("--train-limit", type=int, default=60)
    ap.add_argument("--server-args", default="", help="Extra 'anomaly serve' flags, e.g. '--cpu-workers 1'")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scenario", default="clients", choices=["clients", "big", "pixel-cost", "soak", "dashboard",
                                                             "retained"],
                    help="clients: the client-count rows; big: a burst of big photos next to small clients; "
                         "pixel-cost: the peak memory one big photo adds, per answer kind; soak: memory, files "
                         "and threads over a long run of distinct photos; dashboard: scoring beside dashboards "
                         "polling the stats of a large records database (--records-dir); retained: what a server "
                         "keeps after very large photos, per allocator setting")
    ap.add_argument("--records-dir", type=Path, default=None, help="A data directory whose records database the "
                    "dashboard scenario serves (benchmarks/records_scale.py --stats --data-dir fills one)")
    ap.add_argument("--soak-requests", type=int, default=20000, help="Photos in the soak (--scenario soak)")
    ap.add_argument("--soak-every", type=int, default=1000, help="Photos between soak checkpoints")
    ap.add_argument("--pixel-cost-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--big-count", type=int, default=24, help="Big photos in the burst (--scenario big)")
    ap.add_argument("--big-at", type=float, default=3.0, help="Seconds into the row when the burst starts")
    ap.add_argument("--small-clients", type=int, default=4, help="Small-photo clients (--scenario big)")
    args = ap.parse_args()

    if args.pixel_cost_child:
        pixel_cost_child(args.model_dir, args.pixel_cost_child)
        return
    model_dir, source = prepare_model(args.model_dir, args.train_limit)
    if args.scenario == "pixel-cost":
        pixel_cost(model_dir)
        return
    images = load_images()
    if args.scenario == "big":
        big_scenario(args, model_dir, images, source)
        return
    if args.scenario == "soak":
        soak_scenario(args, model_dir, images, source)
        return
    if args.scenario == "retained":
        retained_scenario(args, model_dir, images, source)
        return
    if args.scenario == "dashboard":
        print(f"{args.small_clients} scoring clients, {args.duration:.0f} s a row, records in {args.records_dir}\n\n"
              "| dashboards polling stats | scoring p50 ms | p95 ms | images/s | stats answers | stats p50 ms | "
              "stats status codes |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
        dashboard_scenario(args, model_dir, images, source)
        return
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for mode in args.modes.split(","):
        batch = args.batch_max_size if mode != "unbatched" else 1
        flags = args.server_args.split() + record_args(mode, args.postgres_url)
        with warm_server(model_dir, batch, flags, images, args.heatmap, args.model) as (url, proc):
            for n in clients:
                cpu0, client0, t0 = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                with RssSampler(proc.pid) as rss:
                    written0 = records_written(url, settle=True)  # the previous phase's records are all in
                    res = asyncio.run(run_clients(url, images, n, args.duration, args.heatmap, args.model))
                wall = time.perf_counter() - t0
                res["records"] = records_written(url, settle=True) - written0  # == requests: nothing lost
                # cores busy on average: a server near os.cpu_count() at 1 client has no idle CPU left to fill
                res.update(server_cores=(cpu_seconds(proc.pid) - cpu0) / wall,
                           client_cores=(time.process_time() - client0) / wall)
                half = len(rss.samples) // 2
                res.update(mode=mode, clients=n, rss_start_mb=rss.samples[0], rss_peak_mb=max(rss.samples),
                           rss_end_mb=rss.samples[-1], rss_peak_first_half_mb=max(rss.samples[: max(1, half)]),
                           rss_peak_second_half_mb=max(rss.samples[half:]))
                rows.append(res)
                print(f"{mode:9s} {n:3d} clients: {res['images_per_s']:.1f} img/s, p50 {res['p50_ms']:.0f} ms, "
                      f"errors {res['errors']}", file=sys.stderr)

    print(f"\nserver: anomaly serve, efficientnet_lite0 model{' on ' + source if source else ''}; heatmap="
          f"{args.heatmap}; {args.duration:g} s per row; {os.cpu_count()} CPUs; images: "
          f"{'mvtec_ad/bottle test (320x320 PNG)' if (SHARED / 'test').is_dir() else 'synthetic 256x256'}\n")
    head = ("| mode | clients | images/s | p50 ms | p95 ms | p99 ms | errors | server RSS start / peak / end MB "
            "| RSS peak 1st / 2nd half MB | CPU cores server / clients |")
    print(head)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f} / "
              f"{r['rss_end_mb']:.0f} | {r['rss_peak_first_half_mb']:.0f} / {r['rss_peak_second_half_mb']:.0f} | "
              f"{r['server_cores']:.2f} / {r['client_cores']:.2f} |")
    if any(r["mode"].startswith("records-") for r in rows):
        print("\n| mode | clients | successful answers | records written |\n| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['records']} |")
    for mode in args.modes.split(","):
        mrows = {r["clients"]: r for r in rows if r["mode"] == mode}
        if 1 in mrows and max(mrows) > 1:
            top = max(mrows)
            print(f"\n{mode}: throughput at {top} clients / 1 client = "
                  f"{mrows[top]['images_per_s'] / mrows[1]['images_per_s']:.2f}x")
    write_json(args, source, rows)


if __name__ == "__main__":
    main()
