"""What a command costs to start: wall time and peak memory of the `anomaly` commands that run no network.

A container runs `anomaly healthcheck` every few seconds (deploy/Dockerfile's HEALTHCHECK, docker-compose.yml), on
the cores and in the memory limit of the service it probes; `anomaly db upgrade` runs before a rollout, often as a
job of its own. Each command here runs as its own process (as the probe runs it) ``--rounds`` times; printed: the
median wall seconds and the largest peak RSS, and whether torch was loaded. With ``--repo DIR`` the commands run
from another checkout's package (its ``anomaly_service``, through this interpreter), for a before/after.

    python benchmarks/command_start.py                       # this checkout, 5 rounds
    python benchmarks/command_start.py --repo ../before --rounds 5
"""

from __future__ import annotations

import argparse
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


def timed_command(args: list[str], repo: Path = REPO, check: bool = False) -> tuple[float, float, bool]:
    """(wall s, peak RSS MB, torch loaded) of one ``anomaly ARGS`` in a process of its own, with ``repo``'s package
    (``check``: a failing command raises)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=repo, capture_output=True, text=True, check=check)
    wall = time.perf_counter() - t0
    last = [line for line in done.stderr.splitlines() if line.startswith("peak ")][-1].split()
    return wall, int(last[1]) / 1024, last[2] == "True"


def measure(repo: Path, args: list[str], rounds: int) -> tuple[float, float, bool]:
    """(median wall s, largest peak RSS MB, torch loaded) of ``rounds`` runs of ``anomaly ARGS`` from ``repo``."""
    runs = [timed_command(args, repo) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs), any(r[2] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose package runs the commands")
    ap.add_argument("--rounds", type=int, default=5)
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


if __name__ == "__main__":
    main()
