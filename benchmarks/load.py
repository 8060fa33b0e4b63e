"""Load benchmark: N concurrent clients against a real ``anomaly serve`` process on loopback.

For each server mode (micro-batching on, and off = one image per backbone pass) and each client count, clients
POST real photos back to back for a bounded time. Prints p50/p95/p99 latency, images/s, errors, and the server's
RSS at the start, peak and end of each phase (flat = no growth under load).

    python benchmarks/load.py                                  # lite0 model fitted on shared bottle, 1/4/16 clients
    python benchmarks/load.py --model-dir models --model bottle --clients 1,4,16,32 --duration 30 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
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


def prepare_model(model_dir: Path | None, train_limit: int) -> tuple[Path, str]:
    """Use the given model directory, or fit an efficientnet_lite0 model (shared bottle, else synthetic)."""
    if model_dir is not None:
        return model_dir, ""
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel
    from anomaly_service.images import list_images

    root = Path(tempfile.mkdtemp(prefix="anomaly-load-"))
    if (SHARED / "train" / "good").is_dir():
        train, _ = list_images(SHARED / "train" / "good")
        train = train[:: max(1, len(train) // train_limit)][:train_limit]
        source = f"mvtec_ad/bottle ({len(train)} train images)"
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import textured_part

        rng = np.random.default_rng(0)
        train = [textured_part(rng, 256, 256) for _ in range(train_limit)]
        source = f"synthetic ({train_limit} images)"
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
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


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
    args = ap.parse_args()

    model_dir, source = prepare_model(args.model_dir, args.train_limit)
    images = load_images()
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for mode in args.modes.split(","):
        port = free_port()
        proc = start_server(model_dir, port, args.batch_max_size if mode != "unbatched" else 1,
                            args.server_args.split() + record_args(mode, args.postgres_url))
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_clients(url, images, 2, 3.0, args.heatmap, args.model))  # warm-up
            for n in clients:
                cpu0, client0, t0 = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                with RssSampler(proc.pid) as rss:
                    written0 = records_written(url)
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
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"source": source, "heatmap": args.heatmap, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
