"""Large photos on a model that turns each photo back to its surface's grain (grain.py): the turn made on a copy of
the photo shrunk towards the network's working size (``grain.OVERSAMPLE`` times it), against the turn made at the
photo's full size (the path before it).

A category's images are upsampled ``--factor`` times (bicubic), as a camera with more pixels over the same field of
view would take them. One ``orientation="any"`` model is fitted on an evenly spaced subset of the upsampled training
images (``--train``), and one ``fixed`` model on the same subset for the latency reference. The test photos are turned
by seeded random angles and cut to their largest upright rectangle of real pixels (as a camera turned over a
surface frames it; benchmarks/quality.py's rotated protocol, "turned, cut"), then upsampled. Each path scores the
same photos; printed: image AUROC, pixel AUROC and PRO (maps resized to the cut's source size), good photos flagged
at the threshold, the good photos' scores against the full-size path's, and milliseconds per photo and per
megapixel.

    python benchmarks/aligned_large.py                                  # magnetic_tile/mt, 4x, 240 training images
    flock /work/.timing.lock python benchmarks/aligned_large.py --factor 6 --every 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
PROTOCOL_SEED = 0


def upsample(image: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--category", default="magnetic_tile/mt")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--train", type=int, default=240, help="training images (evenly spaced)")
    ap.add_argument("--every", type=int, default=2, help="score every N-th test photo")
    ap.add_argument("--oversample", type=float, nargs="*", default=[2.0, 3.0],
                    help="grain.OVERSAMPLE values to score with, beside the full-size turn")
    args = ap.parse_args()

    import anomaly_service.grain as grain
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import _load_mask, read_category
    from anomaly_service.anomaly_map import resize_map
    from anomaly_service.images import load_image
    from anomaly_service.metrics import image_auroc, numbered_regions, pixel_auroc, pro_score
    from anomaly_service.orientation import random_turns

    train_paths, samples = read_category(args.data / args.category)
    picked = np.linspace(0, len(train_paths) - 1, min(args.train, len(train_paths))).round().astype(int)
    train = [upsample(load_image(train_paths[i]), args.factor) for i in picked]
    models, fit_s = {}, {}
    for orientation in ("fixed", "any"):
        t0 = time.perf_counter()
        models[orientation] = AnomalyModel(backbone="efficientnet_lite0", orientation=orientation, progress=False,
                                           device="cpu").fit(train)
        fit_s[orientation] = time.perf_counter() - t0
    aligned = models["any"].alignment_
    print(f"{args.category} x{args.factor}: {len(train)} training images, fit fixed {fit_s['fixed']:.0f} s, "
          f"any {fit_s['any']:.0f} s; alignment {aligned}")
    if aligned is None:
        print("the fit kept no alignment: nothing to compare")
        return

    samples = samples[:: args.every]
    upright = [load_image(s.path) for s in samples]
    masks = [_load_mask(s, img.shape[:2]) for s, img in zip(samples, upright)]
    turns = random_turns(len(samples), np.random.default_rng(PROTOCOL_SEED))
    photos, cut_masks, kept = [], [], []
    for s, img, mask, turn in zip(samples, upright, masks, turns):
        y, x, h, w = turn.inscribed_box(img.shape)
        if min(h, w) < 16:
            continue
        # the upright regions carried through the turn: a crack the turn breaks stays one region for PRO
        cut_mask = None if mask is None else turn.regions(numbered_regions(mask), img)[y : y + h, x : x + w]
        if s.label == 1 and (cut_mask is None or not cut_mask.any()):
            continue  # the cut lost the defect
        photos.append(upsample(np.ascontiguousarray(turn.image(img)[y : y + h, x : x + w]), args.factor))
        cut_masks.append(cut_mask)
        kept.append(s)
    labels = np.array([s.label for s in kept])
    mp = float(np.mean([p.shape[0] * p.shape[1] for p in photos])) / 1e6
    print(f"{len(photos)} turned and cut test photos ({int(labels.sum())} defective), {mp:.2f} MP on average")

    paths: list[tuple[str, AnomalyModel, float, float | None]] = [
        ("fixed", models["fixed"], grain.OVERSAMPLE, None),
        ("any, read and turned at full size", models["any"], 1e9, None)]
    paths += [(f"any, read and turned at {o:g}x the working size", models["any"], o, o) for o in args.oversample]
    rows, reference = [], None
    for name, model, oversample, read_scale in paths:
        grain.OVERSAMPLE = oversample
        if model is models["any"]:
            model.alignment_ = dataclasses.replace(aligned, read_scale=read_scale)
        model.score(photos[0])  # warm-up
        scores, maps, t0 = [], [], time.perf_counter()
        for p in photos:
            r = model.score(p)
            scores.append(r.normalized_score)
            maps.append(r.normalized_map())
        ms = (time.perf_counter() - t0) * 1000 / len(photos)
        # to the cut's source size, where its mask was drawn (after the timing: a resize is no part of scoring)
        maps = [resize_map(m, k.shape) if k is not None else m for m, k in zip(maps, cut_masks)]
        s = np.array(scores)
        if name == "any, read and turned at full size":
            reference = s
        ratio = "" if reference is None or model is not models["any"] else \
            f"{float(np.median(s[labels == 0] / reference[labels == 0])):.3f}"
        has = [(m, k) for m, k in zip(maps, cut_masks) if k is not None]
        rows.append((name, image_auroc(labels, s), pixel_auroc(*zip(*has)),
                     pro_score(*zip(*has), regions=[k for _, k in has]),
                     float((s[labels == 0] > 1.0).mean()), ratio, ms, ms / mp))
    grain.OVERSAMPLE = 2
    print("\n| path | image AUROC | pixel AUROC | PRO | good flagged | good score / full-size's (median) "
          "| ms / photo | ms / MP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ia, pa, pro, fpr, ratio, ms, per_mp in rows:
        print(f"| {name} | {ia:.3f} | {pa:.3f} | {pro:.3f} | {fpr:.1%} | {ratio or '-'} | {ms:.0f} | {per_mp:.0f} |")


if __name__ == "__main__":
    main()
