"""Where a line camera's large photo spends its time: one saved model scores the same photo enlarged to several
sizes, as JPEG bytes the way the service receives them, and the table gives the median milliseconds of each step
(decode, the score's own ``timing_ms`` stages, the render of regions and evidence) and in all.

The photo is a bottle test photo (a defect, so the render has a region to find) enlarged with Pillow's bicubic and
saved at JPEG quality 92. The model is fitted with ``--resize longer-side`` (every photo shrunk whole to the working
size), as a line that photographs its parts at full resolution would fit it; ``--model DIR`` scores with a saved
one instead. Every size is scored once before timing (first-call costs out) and the sizes take turns each round, so
a neighbour's burst slows them alike.

    python benchmarks/large_photo.py                                  # fits a small model first (about a minute)
    python benchmarks/large_photo.py --model /tmp/bottle-ls --repo /tmp/base   # another checkout's code, same model
    python benchmarks/large_photo.py --heatmap overlay --max-side 1920          # with the picture a page asks for

``--heatmap`` renders that heatmap kind too (``render`` then includes its drawing and PNG encoding), and
``--max-side`` draws it at most that many pixels a side, as ``/score?max_side=`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
STAGES = ("preprocess", "backbone", "embed", "knn", "map", "autoencoder", "fuse")


def _photo_bytes(side: int) -> bytes:
    """A bottle defect photo (or a synthetic one where the shared data is absent) enlarged to ``side`` px, as JPEG."""
    from PIL import Image

    found = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))
    if found:
        src = Image.open(found[0]).convert("RGB")
    else:
        rng = np.random.default_rng(0)
        src = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    src.resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _fit(out: Path, n_train: int) -> None:
    from anomaly_service.config import ModelConfig
    from anomaly_service.model import AnomalyModel

    files = sorted((BOTTLE / "train" / "good").glob("*.png"))
    if not files:
        sys.exit(f"no training photos under {BOTTLE}: give --model DIR")
    step = max(1, len(files) // n_train)
    model = AnomalyModel(ModelConfig(backbone="efficientnet_lite0", resize="longer-side"))
    model.fit([str(f) for f in files[::step][:n_train]])
    model.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="A saved model (default: fit one on bottle photos).")
    ap.add_argument("--sides", nargs="+", type=int, default=[1000, 2236, 4472],
                    help="Sides of the square photos, px (default: about 1, 5 and 20 megapixels).")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--train", type=int, default=40, help="Training photos of the model this fits.")
    ap.add_argument("--repo", type=Path, default=REPO, help="Checkout whose anomaly_service scores (default: this).")
    ap.add_argument("--heatmap", choices=("none", "png", "overlay"), default="none",
                    help="Also render this heatmap kind (its drawing and PNG encoding count in render).")
    ap.add_argument("--max-side", type=int, default=None, help="Draw the heatmap at most this many pixels a side.")
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    from anomaly_service.evidence import TrainingEvidence
    from anomaly_service.images import decode_image
    from anomaly_service.model import AnomalyModel
    from anomaly_service.render import render

    model_dir = args.model
    if model_dir is None:
        import tempfile

        model_dir = Path(tempfile.mkdtemp(prefix="large-photo-")) / "bottle"
        _fit(model_dir, args.train)
    model = AnomalyModel.load(model_dir)
    evidence = TrainingEvidence.of(model)
    limits = dataclasses.replace(model.limits, max_pixels=max(model.limits.max_pixels, max(args.sides) ** 2))
    photos = {side: _photo_bytes(side) for side in args.sides}
    times: dict[int, list[dict[str, float]]] = {side: [] for side in args.sides}
    kinds = [] if args.heatmap == "none" else [args.heatmap]
    drawn = {} if args.max_side is None else {"max_side": args.max_side}  # a checkout before max_side takes none
    for rnd in range(args.rounds + 1):
        for side, data in photos.items():
            t0 = time.perf_counter()
            image = decode_image(data, limits).array
            t1 = time.perf_counter()
            result = model.score(image)
            t2 = time.perf_counter()
            verdict = render(result, image, kinds, 1024, evidence, **drawn)
            t3 = time.perf_counter()
            if rnd:  # round 0 warms up
                row = {"decode": 1000 * (t1 - t0), "render": 1000 * (t3 - t2), "total": 1000 * (t3 - t0)}
                row.update({s: result.timing_ms.get(s, 0.0) for s in STAGES})
                row["picture KB"] = sum(len(h.data) for h in verdict.heatmaps.values()) / 1000
                times[side].append(row)
            del image, result, verdict
    cols = ["decode", *STAGES, "render", "total"] + (["picture KB"] if kinds else [])
    print(f"code: {args.repo}; model: {model_dir}; {args.rounds} rounds; heatmap {args.heatmap}, max side "
          f"{args.max_side or 'the photo'}; median ms per photo")
    print("| photo | MP | " + " | ".join(cols) + " | ms / MP |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for side, rows in times.items():
        med = {c: float(np.median([r[c] for r in rows])) for c in cols}
        mp_ = side * side / 1e6
        print(f"| {side}x{side} | {mp_:.1f} | " + " | ".join(f"{med[c]:.1f}" for c in cols)
              + f" | {med['total'] / mp_:.0f} |")
    if kinds:
        print("picture KB: the heatmap's PNG as the answer carries it before base64 (which adds a third)")


if __name__ == "__main__":
    main()
