"""What one step of the greedy coreset costs on this machine, and what bounds it.

A dense greedy step is one matrix-vector product over ``patches x dims`` float32 values. That product is
memory-bound on a CPU, so how fast a machine streams memory decides the fit time more than its arithmetic; the
product's pruned step (coreset.py) first rules out whole leaves of a kd-tree by their boxes, bounds the patches of
the other leaves from ``bound dims + 1`` numbers each and computes the exact distance of the few patches the bound
cannot rule out; on a texture, where the boxes rule out little, it hands over to one product a step over every
patch's bound numbers (the column says at which step). This script fits a category (holdout calibration, so the fit
stops soon after the coreset), times the product's greedy on the very patches the fit gave it, and times one dense
step's product by each kernel at hand, with the bandwidth it reaches.

    python benchmarks/greedy.py                                        # bottle and mt's CI subset (240 images)
    python benchmarks/greedy.py --categories kolektorsdd/kos --train 0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def _ms(f: Callable[[], Any], rounds: int = 30) -> float:
    """Median milliseconds of ``f`` over ``rounds`` calls after one warm-up."""
    f()
    took = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        took.append((time.perf_counter() - t0) * 1000)
    return float(np.median(took))


def _cpu_name() -> str:
    """The CPU's model name as Linux reports it (the machine the table was measured on), else what Python knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def run(category: str, n_train: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    from anomaly_service import AnomalyModel
    from anomaly_service.coreset import GreedyCoresetSampler, _bound_basis, random_projection
    from anomaly_service.evaluate import read_category

    train, _ = read_category(DATA / category)
    if n_train:
        train = train[:: max(1, len(train) // n_train)][:n_train]
    seen: dict[str, Any] = {}

    class Recording(GreedyCoresetSampler):
        """The product's sampler; it keeps what it was given and how long the greedy took."""

        def sample(self, bank: Any, size: int | None = None) -> np.ndarray:
            t0 = time.perf_counter()
            out = super().sample(bank, size)
            seen.update(bank=bank, steps=len(out), seconds=time.perf_counter() - t0)
            return out

    from anomaly_service import coreset

    leaves, products = coreset._leaves, coreset._greedy_products

    def counted_leaves(coords: np.ndarray, leaf_rows: int) -> Any:
        order, starts = leaves(coords, leaf_rows)
        seen["leaves"] = len(starts) - 1
        return order, starts

    def recorded_products(*args: Any, **kwargs: Any) -> int:
        seen["handed_over"] = len(args[4].base) - len(args[4])  # ``selected[done:]``: the steps before it
        return products(*args, **kwargs)

    coreset._leaves, coreset._greedy_products = counted_leaves, recorded_products
    model = AnomalyModel(backbone="efficientnet_lite0", progress=False, calibration="holdout", autoencoder="none")
    s = model.knn.sampler
    model.knn.sampler = Recording(s.ratio, s.max_size, s.proj_dim, s.seed, progress=False)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    if "bank" not in seen:
        print(f"| {category} | {len(train)} | streamed: one greedy per chunk, not timed here |")
        return
    x = random_projection(seen["bank"], s.proj_dim, s.seed)
    x = (x - x.mean(0, keepdim=True)).numpy().astype(np.float32)
    n, d = x.shape
    c = x[n // 2].copy()
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    xb, cb = xt.to(torch.bfloat16), ct.to(torch.bfloat16)
    numpy_ms = _ms(lambda: x @ c)
    with threadpool_limits(1):
        numpy_1 = _ms(lambda: x @ c)
    torch_ms, bf16_ms = _ms(lambda: torch.mv(xt, ct)), _ms(lambda: torch.mv(xb, cb))
    step_ms = 1000 * seen["seconds"] / seen["steps"]
    gbs = x.nbytes / numpy_ms / 1e6
    k = _bound_basis(x).shape[1]
    handed = seen.get("handed_over")
    print(f"| {category} | {len(train)} | {n} x {d} | {k} | {seen.get('leaves', '-')} | "
          f"{'-' if handed is None else handed} | {seen['steps']} | {fit_s:.1f} | {seen['seconds']:.1f} | "
          f"{step_ms:.2f} | {numpy_ms:.2f} | {numpy_1:.2f} | {torch_ms:.2f} | {bf16_ms:.2f} | {gbs:.1f} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle", "magnetic_tile/mt"])
    ap.add_argument("--train", type=int, nargs="+", default=[0, 240],
                    help="training images per category, evenly spaced (0: all); one value or one per category")
    args = ap.parse_args()
    counts = args.train * len(args.categories) if len(args.train) == 1 else args.train
    cpu = _cpu_name()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu}")
    print("| category | images | patches x dims | bound dims | leaves | handed over at step | steps | fit s | "
          "greedy s | ms per step | NumPy GEMV ms | same, 1 thread | torch.mv ms | torch.mv bf16 ms | NumPy GB/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for category, k in zip(args.categories, counts):
        run(category, k)


if __name__ == "__main__":
    main()
