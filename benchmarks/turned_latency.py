"""Where a turned photo's time goes: saved models (a ``fixed`` one first, then ``orientation=any`` ones) score the same
test photos, upright and turned, and the table gives each model's median milliseconds per photo, wall clock and by
stage (the ``timing_ms`` every score reports), and its ratio to the first model.

The turned photos are the rotated protocol's (benchmarks/quality.py): each test photo turned by a seeded random
angle (mirrored half the time) and cut to its largest upright rectangle of real pixels, as a camera turned over a
surface frames it; a part on a plain background stays whole. Every photo goes through each model in turn, so a
neighbour's burst slows them alike; the first photos are scored once before timing (first-call costs out).

    python benchmarks/turned_latency.py --models models/mt-fixed models/mt-any \
        --category ../shared/data/magnetic_tile/mt
    python benchmarks/turned_latency.py --repo /tmp/base --models models/mt-fixed models/mt-any \
        --category ../shared/data/magnetic_tile/mt             # the same models through another checkout's code
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_SEED = 0
STAGES = ("align", "preprocess", "backbone", "embed", "knn", "map")


def photos(category_dir: str, every: int) -> dict[str, list[np.ndarray]]:
    """Every ``every``-th test photo of the category, upright and turned (the module docstring)."""
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image
    from anomaly_service.orientation import plain_background, random_turns

    _, samples = read_category(category_dir)
    turns = random_turns(len(samples), np.random.default_rng(PROTOCOL_SEED))[::every]
    upright = [load_image(s.path) for s in samples[::every]]
    turned = []
    for img, t in zip(upright, turns):
        y, x, h, w = t.inscribed_box(img.shape)
        whole = plain_background(img) is not None or min(h, w) < 32
        turned.append(t.image(img) if whole else np.ascontiguousarray(t.image(img)[y : y + h, x : x + w]))
    return {"upright": upright, "turned": turned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="Saved models; the first is the reference (fixed).")
    ap.add_argument("--category", required=True, help="MVTec-layout category whose test photos are scored.")
    ap.add_argument("--every", type=int, default=0, help="Every n-th test photo (0: about 60 photos).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=REPO, help="Checkout whose anomaly_service scores (default: this).")
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    from anomaly_service import AnomalyModel

    from anomaly_service.evaluate import read_category

    every = args.every or max(1, len(read_category(args.category)[1]) // 60)
    sets = photos(args.category, every)
    models = [AnomalyModel.load(p) for p in args.models]
    for m in models:
        list(m.score_many(sets["upright"][:4]))
    print(f"code: {args.repo}; {len(sets['upright'])} photos x {args.rounds} rounds; median ms per photo")
    print()
    print("| photos | model | wall | ratio | " + " | ".join(STAGES) + " |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " |")
    for name, images in sets.items():
        wall: list[list[float]] = [[] for _ in models]
        stages: list[dict[str, list[float]]] = [{} for _ in models]
        for _ in range(args.rounds):
            for img in images:
                for i, m in enumerate(models):
                    t0 = time.perf_counter()
                    result = m.score(img)
                    wall[i].append((time.perf_counter() - t0) * 1000)
                    for stage in STAGES:
                        stages[i].setdefault(stage, []).append(result.timing_ms.get(stage, 0.0))
        ref = float(np.median(wall[0]))
        for i, path in enumerate(args.models):
            ms = float(np.median(wall[i]))
            cells = " | ".join(f"{np.median(stages[i][s]):.2f}" for s in STAGES)
            print(f"| {name} | {Path(path).name} | {ms:.2f} | {ms / ref:.2f} | {cells} |")


if __name__ == "__main__":
    main()
