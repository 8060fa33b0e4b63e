"""Shrinking a photo to its working size in 8 bits instead of float32 (preprocessing.py ``shrink_in``): what it
changes in quality, and what it saves on large photos.

Quality: each category is fitted twice on its training photos, once shrinking them in 8 bits (the product since
this change) and once in float32 (every release before, and every model saved before), and each model evaluates
the test photos read its own way: image AUROC, pixel AUROC, PRO, good false alarms and defect recall at the
threshold, and the fit's time. Cost: one good test photo enlarged to each of the given sizes, shrunk to the working
size of a 256-pixel longer side both ways (the step alone), and scored end to end by a model fitted with
``--resize longer-side`` (so every size is scored at the same working size, as a model fitted on that camera's
photos scores them), median of the repeats after a warm-up.

    python benchmarks/shrink_in.py --categories mvtec_ad/bottle magnetic_tile/mt kolektorsdd/kos
    python benchmarks/shrink_in.py --categories mvtec_ad/bottle --skip-quality --sizes 1 5 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
SHRINKS = ("uint8", "float32")


def fitted(train, shrink_in: str, **params):
    """A model fitted on ``train`` with its photos shrunk in ``shrink_in``, and the fit's seconds."""
    from anomaly_service import AnomalyModel

    model = AnomalyModel(backbone=params.pop("backbone"), progress=False, **params)
    model.embedder.preprocessing = dataclasses.replace(model.embedder.preprocessing, shrink_in=shrink_in)
    t0 = time.perf_counter()
    model.fit(train)
    return model, time.perf_counter() - t0


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle"])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", nargs="+", type=float, default=[1, 5, 20], help="megapixels of the timed photos")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-quality", action="store_true", help="only the cost on large photos")
    args = ap.parse_args()
    import logging

    from PIL import Image

    from anomaly_service.evaluate import evaluate_model, read_category

    logging.getLogger("anomaly_service").setLevel(logging.ERROR)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {platform.machine()}, {os.cpu_count()} cores, {args.backbone}")
    if not args.skip_quality:
        print("| category | shrunk in | image AUROC | pixel AUROC | PRO | good FPR | recall | fit s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for cat in args.categories:
            train, samples = read_category(args.data / cat)
            for shrink_in in SHRINKS:
                model, seconds = fitted(train, shrink_in, backbone=args.backbone)
                m = evaluate_model(model, samples)
                print(f"| {cat} | {shrink_in} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['pro']:.4f} | "
                      f"{m['good_fpr']:.3f} | {m['defect_recall']:.3f} | {seconds:.1f} |", flush=True)
    # the cost on large photos: the shrink alone, and the whole score at one working size
    cat = args.categories[0]
    train, _ = read_category(args.data / cat)
    model, _ = fitted(train, "uint8", backbone=args.backbone, resize="longer-side")
    src = Image.open(sorted((args.data / cat / "test" / "good").iterdir())[0]).convert("RGB")
    print()
    print(f"| photo | shrink to {model.embedder.preprocessing.image_size} px, uint8 / float32 (ms) | "
          f"score, uint8 / float32 (ms) | score saved |")
    print("| --- | --- | --- | --- |")
    pp = model.embedder.preprocessing
    for mp in args.sizes:
        side = int(round((mp * 1e6) ** 0.5))
        photo = np.asarray(src.resize((side, side), Image.Resampling.BICUBIC))
        shrink, score = {}, {}
        for shrink_in in SHRINKS:
            model.embedder.preprocessing = dataclasses.replace(pp, shrink_in=shrink_in)
            shrink[shrink_in] = median_ms(lambda: model.embedder.preprocessing.to_tensor(photo), args.repeats)
            score[shrink_in] = median_ms(lambda: model.score(photo), args.repeats)
        saved = 1 - score["uint8"] / score["float32"]
        print(f"| {side}x{side} ({side * side / 1e6:.1f} MP) | {shrink['uint8']:.1f} / {shrink['float32']:.1f} | "
              f"{score['uint8']:.0f} / {score['float32']:.0f} | {100 * saved:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
