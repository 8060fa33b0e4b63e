"""Inspection masks on a real category: what ``--mask auto`` (or a mask file) costs on clean test images, and what
it saves when something that is not the part changes from photo to photo.

Each category's test set is scored twice: as it is, and "labelled": every test image gets a printed label (a
light sticker with a random 6-digit number) in a random corner of the frame, the way a fixture tag or a printed
date would appear next to the part. The labels are drawn in memory (no image is written). One row per (category,
mask, test set): image AUROC, good FPR and defect recall at the calibrated threshold, and what the mask inspects.

    python benchmarks/mask.py                                   # bottle: no mask, then --mask auto
    python benchmarks/mask.py --categories mvtec_ad/bottle --masks none auto path/to/mask.png
    python benchmarks/mask.py --synthetic                       # why the input is masked, not only the map

``--synthetic`` fits the synthetic parts of the tests (tests/conftest.py) with the left half inspected and scores
one defect at several distances to the right of the mask's edge, once as the product masks (the network's input
and the map) and once masking only the map, and prints the normalized image score of each (1.0 = threshold) and
of good parts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"


def with_label(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image with a sticker (about 1/7 of the width) printed with a random number in a random corner."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    lw, lh = max(16, w // 7), max(8, h // 16)
    margin = max(2, w // 80)
    x = margin if rng.random() < 0.5 else w - margin - lw
    y = margin if rng.random() < 0.5 else h - margin - lh
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    draw.rectangle([x, y, x + lw, y + lh], fill=(236, 228, 170))
    draw.text((x + 2, y + 1), f"{int(rng.integers(0, 10**6)):06d}", fill=(20, 20, 20))
    return np.asarray(img)


def run(category_dir: Path, mask: str | None, backbone: str) -> list[dict[str, Any]]:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image
    from anomaly_service.metrics import image_auroc

    train, samples = read_category(category_dir)
    model = AnomalyModel(backbone=backbone, progress=False, mask=mask)
    model.backbone  # noqa: B018 - weights load is not part of fit time
    t0 = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - t0
    images = [load_image(s.path) for s in samples]
    labels = np.array([s.label for s in samples])
    rng = np.random.default_rng(0)
    rows = []
    for test_set, batch in (("as is", images), ("labelled", [with_label(im, rng) for im in images])):
        results = list(model.score_many(batch))
        scores = np.array([r.score for r in results])
        flagged = np.array([r.is_anomaly for r in results])
        rows.append({"test set": test_set, "image_auroc": image_auroc(labels, scores),
                     "good_fpr": float(flagged[labels == 0].mean()),
                     "defect_recall": float(flagged[labels == 1].mean()),
                     "fit_seconds": fit_seconds,
                     "inspected": model.manifest_.mask.inspected if model.manifest_.mask else 1.0,
                     "found": (model.manifest_.mask.model_extra or {}).get("found") if model.manifest_.mask else None})
    return rows


def synthetic(distances: tuple[int, ...] = (8, 16, 24, 36)) -> None:
    """Normalized score of a defect ``distance`` px right of the mask's edge: input and map masked, map only."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import add_defect, textured_part

    from PIL import Image

    from anomaly_service import AnomalyModel

    rng = np.random.default_rng(0)
    train = [textured_part(rng) for _ in range(14)]
    pixels = np.zeros((128, 128), np.uint8)
    pixels[:, :64] = 255
    part = textured_part(np.random.default_rng(5))
    goods = [textured_part(np.random.default_rng(100 + i)) for i in range(40)]
    print("| masked | " + " | ".join(f"defect {d} px outside" for d in distances)
          + " | 40 good parts: median / 90% / max |")
    print("|---" * (len(distances) + 2) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "left.png"
        Image.fromarray(pixels).save(path)
        for name in ("input and map", "map only"):
            model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                                 calibration_fraction=0.25, mask=str(path))
            if name == "map only":  # not a product option: the network sees the whole frame, scorers mask maps
                embedder, embed = model.embedder, model.embedder.embed

                def embed_unmasked(*args: Any, **kwargs: Any) -> Any:
                    mask, embedder.inspect = embedder.inspect, None
                    try:
                        out = embed(*args, **kwargs)
                    finally:
                        embedder.inspect = mask
                    out.inspect = mask
                    return out

                embedder.embed = embed_unmasked  # type: ignore[method-assign]
            model.fit(train)
            scores = [model.score(add_defect(part, 64, 68 + d)[0]).normalized_score for d in distances]
            good = np.quantile([r.normalized_score for r in model.score_many(goods)], [0.5, 0.9, 1.0])
            print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in scores) + " | "
                  + " / ".join(f"{g:.2f}" for g in good) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle"])
    ap.add_argument("--masks", nargs="+", default=["none", "auto"], help="none, auto or mask files")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--synthetic", action="store_true", help="Only the synthetic input-masking comparison.")
    args = ap.parse_args()
    if args.synthetic:
        synthetic()
        return
    print(f"| {'category':18s} | {'mask':10s} | {'test set':9s} | inspected | img AUROC | good FPR | recall | fit s |")
    print("|" + "|".join(["-" * 20, "-" * 12, "-" * 11, "-" * 11, "-" * 11, "-" * 10, "-" * 8, "-" * 7]) + "|")
    for cat in args.categories:
        for mask in args.masks:
            for r in run(args.data / cat, None if mask == "none" else mask, args.backbone):
                print(f"| {cat:18s} | {Path(mask).name:10s} | {r['test set']:9s} | {r['inspected']:9.3f} | "
                      f"{r['image_auroc']:9.3f} | {r['good_fpr']:8.3f} | {r['defect_recall']:6.3f} | "
                      f"{r['fit_seconds']:5.1f} |", flush=True)


if __name__ == "__main__":
    main()
