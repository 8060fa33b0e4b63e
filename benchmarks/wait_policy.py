"""What OpenMP's idle spinning costs a photo when the machine also runs other work, per wait setting.

torch's OpenMP threads (GNU libgomp on Linux) spin for a while after each parallel region before they sleep, so that
the next region starts at once. On a machine of its own that is the fastest way to score a photo. On a machine that
also runs other work (a camera's software, a second service, another replica), a spinning thread holds a core the
other thread of the same pass is waiting for, and every region's barrier waits for a thread that has no core.

This times one photo at a time through ``AnomalyModel.score`` (file bytes to score and map, the README's speed
measure) in a fresh process per setting (libgomp reads its settings when torch loads it), beside 0, 1 or 2 busy
processes (a pure-Python loop each: a core's worth of other work), in interleaved rounds, and prints the median
milliseconds a photo:

    python benchmarks/wait_policy.py                            # models/bottle, as README's main command saves it
    python benchmarks/wait_policy.py --model models/NAME --images DIR --busy 0,2 --rounds 5
    python benchmarks/wait_policy.py --settings GOMP_SPINCOUNT=300000,product,OMP_WAIT_POLICY=PASSIVE
    python benchmarks/wait_policy.py --busy 0 --photos 83 --side-by-side 2   # shards side by side, batched

``--quota CPUS`` runs every scoring process in a cgroup of its own with that CPU quota (root, and a writable cgroup
v1 ``cpu`` hierarchy or v2 with its cpu controller), as a systemd unit's ``CPUQuota=`` or a container's ``--cpus``
holds it; ``--settings product,OMP_NUM_THREADS=2`` then compares the threads the product picks there with one per
core, which it ran before it read a quota below the cgroup mount's root:

    python benchmarks/wait_policy.py --quota 1 --settings OMP_NUM_THREADS=2,product --busy 0

``--side-by-side N`` also scores every photo batched (``score_many``, as ``anomaly score`` and a shard do) in N
processes at once, each on every core, against one alone: the images a second each keeps.

A setting is ``product`` (neither variable set: the package picks the spin, anomaly_service.OMP_SPIN_COUNT) or
NAME=VALUE pairs joined by ``+``; ``GOMP_SPINCOUNT=300000`` is libgomp's own default, which the package had before.
Ratios are to the first setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
PRODUCT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _busy() -> None:
    """A core's worth of other work."""
    while True:
        pass


def _child(model_dir: str, images: list[str], warm: int) -> None:
    """Score each photo once, after ``warm`` warm-up photos; print the per-photo milliseconds as JSON."""
    from anomaly_service import AnomalyModel

    model = AnomalyModel.load(model_dir)
    blobs = [Path(p).read_bytes() for p in images]
    for b in blobs[:warm]:
        model.score(b)
    times = []
    for b in blobs:
        t0 = time.perf_counter()
        model.score(b)
        times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps(times))


def _idle_child() -> None:
    """CPU milliseconds the process burns while its main thread sleeps right after a parallel region (torch on every
    core): what the spinning threads hold of the cores for nothing. Printed as JSON, one value per trial."""
    import anomaly_service  # noqa: F401  (its spin setting comes before torch, as in the product)
    import torch

    x = torch.randn(1000, 1000)
    burnt = []
    for _ in range(21):
        (x @ x).sum()
        c0 = time.process_time()
        time.sleep(0.1)
        burnt.append((time.process_time() - c0) * 1000)
    print(json.dumps(burnt))


def _fit_child(train: list[str]) -> None:
    """Fit the defaults on ``train`` with the offline backbone; print the seconds as JSON."""
    from anomaly_service import AnomalyModel

    t0 = time.perf_counter()
    AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
    print(json.dumps([time.perf_counter() - t0]))


def _batch_child(model_dir: str, images: list[str]) -> None:
    """Score every photo through ``score_many`` (batched, as ``anomaly score`` and a shard do), after a warm-up
    batch; print the images a second as JSON."""
    from anomaly_service import AnomalyModel

    model = AnomalyModel.load(model_dir, progress=False)
    list(model.score_many(images[:4]))
    t0 = time.perf_counter()
    for _ in model.score_many(images):
        pass
    print(json.dumps([len(images) / (time.perf_counter() - t0)]))


def _setting_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PRODUCT_SETTINGS}
    if setting != "product":
        for pair in setting.split("+"):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


@contextlib.contextmanager
def _quota_group(cpus: float | None) -> Iterator[list[str]]:
    """A command prefix that runs its process in a new cgroup holding ``cpus`` CPUs' worth of time a period (none:
    no prefix); the group is removed afterwards."""
    if cpus is None:
        yield []
        return
    period = 100_000
    v1 = Path("/sys/fs/cgroup/cpu")
    group = (v1 if (v1 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")) / f"anomaly-bench-{os.getpid()}"
    try:
        group.mkdir()
        if group.parent == v1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(round(cpus * period)))
        else:
            (group / "cpu.max").write_text(f"{round(cpus * period)} {period}")
    except OSError as exc:
        sys.exit(f"error: cannot make a cgroup with a CPU quota ({exc}): run as root on a machine whose cgroups "
                 "take writes")
    try:
        yield ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    finally:
        group.rmdir()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "bottle"), help="a saved model (default: models/bottle)")
    ap.add_argument("--images", default=str(BOTTLE / "test"), help="a folder of photos (searched recursively)")
    ap.add_argument("--photos", type=int, default=30, help="photos timed per process")
    ap.add_argument("--warm", type=int, default=3, help="photos scored before timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every setting and load")
    ap.add_argument("--busy", default="0,1,2", help="busy processes beside the scoring, comma-separated counts")
    ap.add_argument("--settings", default="GOMP_SPINCOUNT=300000,product,GOMP_SPINCOUNT=10000,OMP_WAIT_POLICY=PASSIVE",
                    help="comma-separated; ratios are to the first")
    ap.add_argument("--train", default=str(BOTTLE / "train" / "good"), help="good photos to time a fit on")
    ap.add_argument("--fit-images", type=int, default=0,
                    help="also time a fit of the defaults on this many of --train's photos, alone (0: no fit)")
    ap.add_argument("--side-by-side", type=int, default=0,
                    help="also score --images batched in this many processes at once, each on every core (shards "
                         "side by side), against one alone: images a second (0: not run)")
    ap.add_argument("--quota", type=float, help="score in a cgroup with this many CPUs' worth of quota (root)")
    ap.add_argument("--child", choices=("score", "fit", "idle", "batch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    images = sorted(str(p) for p in Path(args.images).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg",
                                                                                          ".bmp", ".tif", ".tiff"})
    images = [p for p in images if "ground_truth" not in p and not p.endswith("_mask.png")][: args.photos]
    train = sorted(str(p) for p in Path(args.train).glob("*.png"))[: args.fit_images]
    if args.child == "score":
        _child(args.model, images, args.warm)
        return
    if args.child == "fit":
        _fit_child(train)
        return
    if args.child == "idle":
        _idle_child()
        return
    if args.child == "batch":
        _batch_child(args.model, images)
        return
    if not Path(args.model).is_dir():
        sys.exit(f"error: {args.model}: no saved model (run README's main command, or give --model)")
    if not images:
        sys.exit(f"error: {args.images}: no photos")
    settings = args.settings.split(",")
    loads = [int(b) for b in args.busy.split(",")]
    cores = len(os.sched_getaffinity(0))
    quota = "" if args.quota is None else f", scoring under a CPU quota of {args.quota:g}"
    print(f"commit {_commit()}, {_cpu()}, {cores} cores, {len(images)} photos of {args.images}, model {args.model}, "
          f"{args.rounds} rounds{quota}", flush=True)
    print("| setting | CPU ms burnt while idle after a parallel region (median of 21) |")
    print("| --- | ---: |")
    for s in settings:
        out = subprocess.run([sys.executable, __file__, "--child", "idle"], env=_setting_env(s), capture_output=True,
                             text=True, check=True).stdout
        print(f"| {s} | {statistics.median(json.loads(out.strip().splitlines()[-1])):.2f} |", flush=True)
    print()
    medians: dict[tuple[str, int], list[float]] = {(s, b): [] for s in settings for b in loads}
    tails: dict[tuple[str, int], list[float]] = {(s, b): [] for s in settings for b in loads}  # each run's 90th
    for r in range(args.rounds):
        for b in loads:
            busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(b)]
            for p in busy:
                p.start()
            try:
                for s in settings:
                    cmd = [sys.executable, __file__, "--child", "score", "--model", args.model, "--images",
                           args.images, "--photos", str(args.photos), "--warm", str(args.warm)]
                    with _quota_group(args.quota) as prefix:
                        out = subprocess.run([*prefix, *cmd], env=_setting_env(s), capture_output=True, text=True,
                                             check=True).stdout
                    times = json.loads(out.strip().splitlines()[-1])
                    ms, tail = statistics.median(times), statistics.quantiles(times, n=10)[-1]
                    medians[(s, b)].append(ms)
                    tails[(s, b)].append(tail)
                    print(f"round {r + 1}, {b} busy, {s}: {ms:.1f} ms (90th percentile {tail:.1f})", flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.join()
    print()
    print("| setting | " + " | ".join(f"{b} busy: ms a photo (x first), 90th percentile" for b in loads) + " |")
    print("| --- | " + " | ".join("---:" for _ in loads) + " |")
    for s in settings:
        cells = []
        for b in loads:
            ms = statistics.median(medians[(s, b)])
            base = statistics.median(medians[(settings[0], b)])
            tail = statistics.median(tails[(s, b)])
            cells.append(f"{ms:.1f} ({ms / base:.2f}x), 90th {tail:.1f}")
        print(f"| {s} | " + " | ".join(cells) + " |")
    if args.side_by_side:
        n = args.side_by_side
        print()
        print(f"| setting | one process alone: images/s | {n} at once, each (total) | rounds |")
        print("| --- | ---: | ---: | ---: |")
        cmd = [sys.executable, __file__, "--child", "batch", "--model", args.model, "--images", args.images,
               "--photos", str(args.photos)]
        for s in settings:
            alone, each = [], []
            for _ in range(args.rounds):
                out = subprocess.run(cmd, env=_setting_env(s), capture_output=True, text=True, check=True).stdout
                alone.append(json.loads(out.strip().splitlines()[-1])[0])
                procs = [subprocess.Popen(cmd, env=_setting_env(s), stdout=subprocess.PIPE, text=True)
                         for _ in range(n)]
                rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])[0] for p in procs]
                each.append(statistics.median(rates))
            a, e = statistics.median(alone), statistics.median(each)
            print(f"| {s} | {a:.1f} | {e:.1f} ({e * n:.1f}) | {args.rounds} |", flush=True)
    if train:
        print()
        print(f"| setting | fit of {len(train)} good photos, nothing beside it: s (x first) |")
        print("| --- | ---: |")
        fits = {}
        for s in settings:
            out = subprocess.run([sys.executable, __file__, "--child", "fit", "--train", args.train, "--fit-images",
                                  str(args.fit_images)], env=_setting_env(s), capture_output=True, text=True,
                                 check=True).stdout
            fits[s] = json.loads(out.strip().splitlines()[-1])[0]
            print(f"| {s} | {fits[s]:.1f} ({fits[s] / fits[settings[0]]:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
