"""Two backbones' features side by side: does Lite0 + Lite2 beat either alone?

    python benchmarks/two_backbones.py [--categories mvtec_ad/bottle ...] [--data ../shared/data]

Each category is fitted three times with the defaults (leave-one-out threshold, one process per fit): Lite0,
Lite2, and both. "Both" runs the two networks on the same input and hands the four tapped maps (each network's
stride-8 and stride-16 stage) to the same embedding: every map gets an equal share of the embedding width and,
with layer balance, an equal weight in the distance, so neither network dominates. Not a product option: this
measures whether it would earn one (docs/decisions.md). Prints image AUROC / pixel AUROC / PRO, recall at 1%, 2%
and 5% false alarms, fit seconds and milliseconds per photo.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]


def _run(category_dir: str, which: str, limit: int = 0) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import torch
    from torch import nn

    from anomaly_service import AnomalyModel
    from anomaly_service.backbones import LoadedBackbone, load_backbone
    from anomaly_service.evaluate import evaluate_model, read_category

    train, samples = read_category(category_dir)
    if limit:  # a quick look: fewer training images, every test image
        train = train[:: max(1, len(train) // limit)][:limit]
    first = "efficientnet_lite2" if which == "lite2" else "efficientnet_lite0"
    model = AnomalyModel(backbone=first, progress=False, device="cpu", runtime="torch")
    if which == "both":
        lite0 = model.backbone.extractor
        lite2 = load_backbone("efficientnet_lite2", device="cpu", progress=False).extractor

        class Both(nn.Module):
            """Lite0's two tapped maps, then Lite2's, from the same input (same strides, so the same grids)."""

            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = lite0, lite2

            def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
                return list(self.a(x)) + list(self.b(x))

        lite = model.embedder.backbone  # a backbone of this model's own: the shared one is left as it was
        model.embedder._backbone = LoadedBackbone(lite.spec, lite.checksum, lite.source, extractor=Both())
    model.backbone  # noqa: B018 - weights load is not part of fit time
    t0 = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - t0
    metrics = evaluate_model(model, samples, fit_seconds=fit_seconds)
    metrics["dim"] = model.knn.stats_["full_dim"]
    return metrics


def run_isolated(category_dir: str, which: str, limit: int = 0) -> dict[str, Any]:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_run, category_dir, which, limit).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--train-limit", type=int, default=0, help="Fit on at most N evenly spaced train images.")
    args = ap.parse_args()
    print("| category | backbone | img AUROC / pix AUROC / PRO | recall @1/2/5% FPR | fit s | ms/img | dims |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cat in args.categories:
        for which in ("lite0", "lite2", "both"):
            m = run_isolated(str(args.data / cat), which, args.train_limit)
            curve = " / ".join("-" if v is None else f"{v:.2f}" for v in m.get("recall_at_fpr", {}).values())
            print(f"| {cat} | {which} | {m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / {m['pro']:.3f} | {curve} | "
                  f"{m['fit_seconds']:.1f} | {m['score_ms_per_image']:.1f} | {m['dim']} |", flush=True)


if __name__ == "__main__":
    main()
