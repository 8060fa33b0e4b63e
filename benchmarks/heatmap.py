"""What building one anomaly map costs: the three steps one after another, against one matrix per axis.

A map is built for every photo scored and, at fit, twice for every training image the leave-one-out pass scores
(its own map and its support map). ``anomaly_map`` (heatmap.py) computes bilinear upsampling to the working size,
the Gaussian (sigma 4, replicated edges) and the resize to the photo's size as ``A_rows @ grid @ A_cols.T``. This
script times both ways on the shapes the shared categories and a tiled large photo give, and prints the largest
difference between them relative to the map's peak.

    python benchmarks/heatmap.py
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (patch grid, working size, photo size, label): Lite0's stride-8 grid, 256 px on the longer side (or tiles)
SHAPES = [
    ((32, 32), (256, 256), (320, 320), "bottle as shared (320x320)"),
    ((32, 13), (256, 101), (320, 126), "kos as shared (126x320)"),
    ((32, 21), (256, 170), (320, 213), "mt as shared (213x320)"),
    ((32, 32), (256, 256), (900, 900), "a 900x900 photo (MVTec's originals)"),
    ((256, 306), (2048, 2448), (2048, 2448), "a tiled 5-megapixel photo"),
]


def three_steps(grid: np.ndarray, work: tuple[int, int], out: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """The map as the steps define it (the reference the product's operator is tested against)."""
    from scipy.ndimage import gaussian_filter

    from anomaly_service.anomaly_map import resize_map

    m = resize_map(grid.astype(np.float32), work)
    m = gaussian_filter(m, sigma=sigma, mode="nearest", truncate=4.0)
    return resize_map(m, out).astype(np.float32, copy=False)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median of ``repeat`` timed calls after one warm call (which builds and caches the operator)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    from anomaly_service.anomaly_map import anomaly_map

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| shape | grid | photo | three steps ms | one matrix per axis ms | speed-up | max diff / peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for grid_shape, work, out, label in SHAPES:
        grid = (rng.random(grid_shape) * 50).astype(np.float32)
        repeat = 5 if grid_shape[0] > 100 else 50
        old = median_ms(lambda: three_steps(grid, work, out), repeat)
        new = median_ms(lambda: anomaly_map(grid, work, out), repeat)
        ref = three_steps(grid, work, out)
        diff = float(np.abs(anomaly_map(grid, work, out) - ref).max() / np.abs(ref).max())
        print(f"| {label} | {grid_shape[0]}x{grid_shape[1]} | {out[1]}x{out[0]} | {old:.2f} | {new:.2f} | "
              f"{old / new:.0f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
