"""Small defects on large photos: tiled scoring (``--tile``) against shrinking the whole frame.

Each category's images are upsampled ``--factor`` times (bicubic), so the frame is several times larger than the
photos the category was made from. Real defects are cut from the defect test images with their ground-truth masks
and pasted, at their ORIGINAL pixel size, into upsampled good test images (at the same relative place, so they sit
on the part): the defect keeps its real pixels and becomes small relative to the frame, as a 20 px scratch on a line
camera's 2448x2048 photo is. Everything is made in memory; no image is written.

Two models per category, fitted on the same upsampled training subset (``--train``, evenly spaced):

* ``whole``: today's path, the whole frame shrunk to ``--image-size`` (256) on its longer side;
* ``tile``: ``--tile`` source pixels per tile (default: the category's own median longer side, so a tile is seen
  at the zoom the original photos are normally seen at), overlapping tiles, one stitched map;
* ``big`` (with ``--paths ... big``): no tiles, ``--image-size`` raised so that the whole frame is seen at the
  tiles' zoom in one pass: what tiling is to be weighed against.

Printed: per defect-area bucket (the pasted mask's area in source pixels), the share of defects each path flags at
its own calibrated threshold, and the share it also localises (its normalized map reaches 1.0 within 16 px of the
defect); the good images' false-alarm rate; fit seconds and bank sizes.

    python benchmarks/tiling.py --save-dir /tmp/tiling-models           # quality tables (slow: fits 6 models)
    flock /work/.timing.lock nice -n 0 python benchmarks/tiling.py --latency --save-dir /tmp/tiling-models

``--latency`` loads the saved models and times ``score()`` of upsampled good images per path (median of
``--repeats`` after a warm-up), as milliseconds per image and per megapixel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
BUCKETS = [0, 64, 256, 1024, 4096, 10**9]  # defect area in source pixels
NEAR = 16  # px: "at the defect" means the normalized map reaches 1.0 within this distance of the pasted mask


def upsample(image: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.BICUBIC))


def paste(host: np.ndarray, defect: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``host`` with the masked pixels of ``defect`` (its own size) pasted at the same relative place; returns the
    image and the pasted mask in the host's pixels."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop, cmask = defect[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    H, W = host.shape[:2]
    cy = int((y0 + y1) / 2 / mask.shape[0] * H) - (y1 - y0) // 2
    cx = int((x0 + x1) / 2 / mask.shape[1] * W) - (x1 - x0) // 2
    cy, cx = min(max(cy, 0), H - (y1 - y0)), min(max(cx, 0), W - (x1 - x0))
    out = host.copy()
    region = out[cy : cy + (y1 - y0), cx : cx + (x1 - x0)]
    region[cmask] = crop[cmask]
    full = np.zeros((H, W), bool)
    full[cy : cy + (y1 - y0), cx : cx + (x1 - x0)] = cmask
    return out, full


def test_set(category_dir: Path, factor: int, n_defects: int, n_goods: int, seed: int = 0
             ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(upsampled good test images, the same with one pasted defect each, the pasted masks)."""
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    _, samples = read_category(category_dir)
    goods = [s for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1 and s.mask_path is not None]
    goods = [goods[i] for i in np.linspace(0, len(goods) - 1, min(n_goods, len(goods))).astype(int)]
    picks = [defects[i] for i in np.linspace(0, len(defects) - 1, min(n_defects, len(defects))).astype(int)]
    hosts = [upsample(load_image(s.path), factor) for s in goods]
    pasted, masks = [], []
    for i, s in enumerate(picks):
        from PIL import Image

        mask = np.asarray(Image.open(s.mask_path).convert("L")) > 127
        if not mask.any():
            continue
        img, m = paste(hosts[i % len(hosts)], load_image(s.path), mask)
        pasted.append(img)
        masks.append(m)
    return hosts, pasted, masks


def train_set(category_dir: Path, factor: int, n: int) -> list[np.ndarray]:
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    train, _ = read_category(category_dir)
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(n, len(train))).astype(int)]
    return [upsample(load_image(p), factor) for p in chosen]


def near_defect(normalized: np.ndarray, mask: np.ndarray) -> bool:
    from scipy.ndimage import binary_dilation

    zone = binary_dilation(mask, iterations=NEAR)
    return bool(np.nanmax(np.where(zone, normalized, 0)) >= 1.0)


def quality(args: argparse.Namespace, category: str) -> list[dict[str, Any]]:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    cat_dir = args.data / category
    train = train_set(cat_dir, args.factor, args.train)
    goods, pasted, masks = test_set(cat_dir, args.factor, args.defects, args.goods)
    areas = np.array([m.sum() for m in masks])
    ref = read_category(cat_dir)[0]
    tile = args.tile or int(np.median([max(load_image(p).shape[:2]) for p in ref[:: max(1, len(ref) // 20)]]))
    rows = []
    for path in args.paths:
        params: dict[str, Any] = dict(backbone=args.backbone, image_size=args.image_size, progress=False)
        if path == "tile":
            params.update(tile=tile, coreset_max=args.coreset_max)
        if path == "big":  # the frame's median longer side at the tiles' zoom, on the stride
            side = float(np.median([max(a.shape[:2]) for a in train]))
            params.update(image_size=int(round(side * args.image_size / tile / 16)) * 16,
                          coreset_max=args.coreset_max)
        model = AnomalyModel(**params)
        model.backbone  # noqa: B018 - the weights load is not fit time
        t0 = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - t0
        if args.save_dir:
            model.save(args.save_dir / category.replace("/", "_") / path)
        flagged_good = [r.is_anomaly for r in model.score_many(goods)]
        detected, localised = [], []
        for r, m in zip(model.score_many(pasted), masks):
            detected.append(r.is_anomaly)
            localised.append(r.is_anomaly and near_defect(r.normalized_map(), m))
        lay = model.embedder.layout(goods[0].shape)
        rows.append({"category": category, "path": path, "tile": tile if path == "tile" else None,
                     "image_size": model.config.image_size,
                     "tiles": lay.n_tiles if lay else 1, "frame": goods[0].shape[:2], "fit_s": fit_s,
                     "bank": model.knn.bank_size, "patches": model.knn.stats_["from_patches"],
                     "good_fpr": float(np.mean(flagged_good)), "n_good": len(goods),
                     "detected": np.array(detected), "localised": np.array(localised), "areas": areas})
        print(f"  {category} {path}: fit {fit_s:.0f}s, bank {model.knn.bank_size}", file=sys.stderr, flush=True)
        del model
    return rows


def print_quality(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    labels = [f"{lo}-{hi}" if hi < 10**9 else f">={lo}" for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:])]
    print(f"\nDefects pasted at source size into {args.factor}x upsampled good test images; {args.train} training "
          f"images (evenly spaced subset), {args.backbone}, image_size {args.image_size}; tiled coreset capped at "
          f"{args.coreset_max} (and big's). Path: whole/big IMAGE_SIZE, tile SIZE. Cells: flagged / also localised "
          f"(map >= 1.0 within {NEAR} px), n per bucket.\n")
    print("| category | path | frame (px) | tiles | " + " | ".join(f"area {b} px" for b in labels)
          + " | all defects | good FPR | smallest flagged (px) | fit s | bank / patches |")
    print("|---" * (len(labels) + 9) + "|")
    for r in rows:
        cells = []
        for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
            sel = (r["areas"] >= lo) & (r["areas"] < hi)
            cells.append("-" if not sel.any() else
                         f"{r['detected'][sel].mean():.2f} / {r['localised'][sel].mean():.2f} (n={int(sel.sum())})")
        smallest = int(r["areas"][r["detected"]].min()) if r["detected"].any() else "-"
        path = r["path"] + (f" {r['tile']}" if r["tile"] else f" {r['image_size']}")
        print(f"| {r['category']} | {path} | {r['frame'][1]}x{r['frame'][0]} | {r['tiles']} | " + " | ".join(cells)
              + f" | {r['detected'].mean():.2f} / {r['localised'].mean():.2f} (n={len(r['areas'])}) | "
              f"{r['good_fpr']:.2f} (n={r['n_good']}) | {smallest} | {r['fit_s']:.0f} | "
              f"{r['bank']} / {r['patches']} |", flush=True)


def latency(args: argparse.Namespace) -> None:
    from anomaly_service import AnomalyModel

    print("\n| category | path | frame (px) | MP | tiles | ms / image (median) | ms / MP |")
    print("|---|---|---|---|---|---|---|")
    for category in args.categories:
        goods, _, _ = test_set(args.data / category, args.factor, 0, 4)
        for path in args.paths:
            model = AnomalyModel.load(args.save_dir / category.replace("/", "_") / path, device="cpu")
            model.score(goods[0])  # warm-up
            times = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                model.score(goods[i % len(goods)])
                times.append((time.perf_counter() - t0) * 1000)
            ms = float(np.median(times))
            mp = goods[0].shape[0] * goods[0].shape[1] / 1e6
            lay = model.embedder.layout(goods[0].shape)
            label = path + (f" {model.config.tile}" if model.config.tile else f" {model.config.image_size}")
            print(f"| {category} | {label} | {goods[0].shape[1]}x{goods[0].shape[0]} | {mp:.2f} | "
                  f"{lay.n_tiles if lay else 1} | {ms:.0f} | {ms / mp:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--factor", type=int, default=3, help="Upsampling of every image (the frame grows, not the "
                    "defects).")
    ap.add_argument("--train", type=int, default=30, help="Training images (an evenly spaced subset).")
    ap.add_argument("--defects", type=int, default=40, help="Defects pasted per category.")
    ap.add_argument("--goods", type=int, default=30, help="Good test images per category (hosts and FPR).")
    ap.add_argument("--tile", type=int, default=None, help="Source px per tile (default: the category's median "
                    "longer side).")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--coreset-max", type=int, default=16384, help="Cap on the tiled bank (fit time).")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--save-dir", type=Path, default=None, help="Where the fitted models go (for --latency).")
    ap.add_argument("--paths", nargs="+", default=["whole", "tile"], choices=["whole", "tile", "big"])
    ap.add_argument("--latency", action="store_true", help="Only time the saved models.")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    if args.latency:
        latency(args)
        return
    rows = []
    for cat in args.categories:
        rows += quality(args, cat)
        print_quality(rows[-len(args.paths):], args)
    print("\nAll categories:")
    print_quality(rows, args)


if __name__ == "__main__":
    main()
