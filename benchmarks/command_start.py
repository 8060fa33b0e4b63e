"""What a command costs to start: wall time and peak memory of the `anomaly` commands that run no network.

A container runs `anomaly healthcheck` every few seconds (deploy/Dockerfile's HEALTHCHECK, docker-compose.yml), on
the cores and in the memory limit of the service it probes; `anomaly db upgrade` runs before a rollout, often as a
job of its own. Each command here runs as its own process (as the probe runs it) ``--rounds`` times; printed: the
median wall seconds and the largest peak RSS, and whether torch was loaded. With ``--repo DIR`` the commands run
from another checkout's package (its ``anomaly_service``, through this interpreter), for a before/after.

    python benchmarks/command_start.py                       # this checkout, 5 rounds
    python benchmarks/command_start.py --repo ../before --rounds 5
    python benchmarks/command_start.py --score               # also: a one-photo `anomaly score`, by graph cache

``--score`` fits a small synthetic model (efficientnet_lite0) and times `anomaly score --model M photo.png`, which
loads the model as `anomaly serve` does, three ways: with the backbone graph cache off (every process builds the
network from timm and exports it to ONNX, as before the cache), cold (this run exports and keeps the graph) and warm
(a later process reads it back); then `anomaly serve` over that model, from its start to its first 200 on
`/readyz`, with the cache off and warm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the command as a probe runs it, reporting its own peak memory and whether torch came in, whatever it exits with
_RUN = ("import atexit, resource, sys; atexit.register(lambda: print('peak', resource.getrusage("
        "resource.RUSAGE_SELF).ru_maxrss, 'torch' in sys.modules, file=sys.stderr)); "
        "from anomaly_service.cli import main; main()")


def commands(data: Path) -> dict[str, list[str]]:
    return {
        "healthcheck (no service: refused)": ["healthcheck", "--url", "http://127.0.0.1:9/healthz", "--timeout", "1"],
        "db upgrade (at head already)": ["db", "upgrade", "--data-dir", str(data)],
        "records export (empty)": ["records", "export", "--data-dir", str(data), "--format", "jsonl"],
        "--version": ["--version"],
    }


def timed_command(args: list[str], repo: Path = REPO, check: bool = False,
                  env: dict[str, str] | None = None) -> tuple[float, float, bool]:
    """(wall s, peak RSS MB, torch loaded) of one ``anomaly ARGS`` in a process of its own, with ``repo``'s package
    (``check``: a failing command raises; ``env``: added to this environment)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=repo, capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    last = [line for line in done.stderr.splitlines() if line.startswith("peak ")][-1].split()
    return wall, int(last[1]) / 1024, last[2] == "True"


def measure(repo: Path, args: list[str], rounds: int, env: dict[str, str] | None = None) -> tuple[float, float, bool]:
    """(median wall s, largest peak RSS MB, torch loaded) of ``rounds`` runs of ``anomaly ARGS`` from ``repo``."""
    runs = [timed_command(args, repo, env=env) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs), any(r[2] for r in runs)


def score_rows(repo: Path, tmp: Path, rounds: int) -> None:
    """`anomaly score` of one photo by a small fitted model: graph cache off, cold, warm (module docstring)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    good = tmp / "good"
    good.mkdir()
    for i in range(12):  # a textured part on a belt, as the tests' synthetic parts
        img = np.clip(110 + 40 * np.sin(np.arange(128) / 3.0)[None, :, None] + rng.normal(0, 12, (128, 128, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(good / f"{i:02d}.png")
    model = tmp / "models" / "part"
    subprocess.run([sys.executable, "-c", _RUN, "fit", "--normal-dir", str(good), "--out", str(model), "--backbone",
                    "efficientnet_lite0", "--image-size", "128", "-q"], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "ANOMALY_CACHE_DIR": "none"})
    args = ["score", "--model", str(model), str(good / "00.png")]
    cache = tmp / "graph-cache"
    off = measure(repo, args, rounds, {"ANOMALY_CACHE_DIR": "none"})
    cold = [timed_command(args, repo, True, {"ANOMALY_CACHE_DIR": str(tmp / f"cold-{i}")}) for i in range(rounds)]
    timed_command(args, repo, True, {"ANOMALY_CACHE_DIR": str(cache)})  # fills the cache the warm rounds read
    warm = measure(repo, args, rounds, {"ANOMALY_CACHE_DIR": str(cache)})
    cold_row = (statistics.median(r[0] for r in cold), max(r[1] for r in cold), any(r[2] for r in cold))
    for name, (wall, peak, torch) in (("graph cache off", off), ("graph cache cold", cold_row),
                                      ("graph cache warm", warm)):
        print(f"| `anomaly score` one photo, {name} | {wall:.2f} | {peak:.0f} | {'yes' if torch else 'no'} |",
              flush=True)
    for name, env in (("graph cache off", "none"), ("graph cache warm", str(cache))):
        runs = [serve_until_ready(repo, model.parent, tmp / "records", env) for _ in range(rounds)]
        print(f"| `anomaly serve` until ready, {name} | {statistics.median(r[0] for r in runs):.2f} | "
              f"{max(r[1] for r in runs):.0f} | yes |", flush=True)


def serve_until_ready(repo: Path, model_dir: Path, data: Path, cache: str) -> tuple[float, float]:
    """(wall s from the start of `anomaly serve` to its first 200 on /readyz, peak RSS MB by then)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RUN, "serve", "--model-dir", str(model_dir), "--port", str(port),
                             "--data-dir", str(data), "--reload-interval", "0"], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ANOMALY_CACHE_DIR": cache})
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"anomaly serve stopped: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        status = Path(f"/proc/{proc.pid}/status").read_text()  # its peak so far: ready, no photo scored yet
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose package runs the commands")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--score", action="store_true", help="also time a one-photo `anomaly score` by graph cache")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="anomaly-command-start-") as tmp:
        data = Path(tmp) / "records"
        subprocess.run([sys.executable, "-c", _RUN, "db", "upgrade", "--data-dir", str(data)], cwd=a.repo,
                       check=True, capture_output=True)
        print(f"{a.repo.resolve()}, {a.rounds} rounds each\n")
        print("| command | wall s (median) | peak RSS MB (largest) | torch loaded |\n| --- | ---: | ---: | --- |")
        for name, args in commands(data).items():
            wall, peak, torch = measure(a.repo, args, a.rounds)
            print(f"| `anomaly {name}` | {wall:.2f} | {peak:.0f} | {'yes' if torch else 'no'} |", flush=True)
        if a.score:
            score_rows(a.repo, Path(tmp), a.rounds)


if __name__ == "__main__":
    main()
