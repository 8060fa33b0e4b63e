"""A category as a mono camera with more than 8 bits stores it: what reading its 16-bit files against 16 bits costs,
and whether the model's own bit depth (``--bit-depth auto``, bit_depth.py) gives the 8-bit quality back.

Each image of a grey category is written, in a scratch folder, as a 16-bit PNG holding ``--bits``-bit values (as
the camera's software stores them, not scaled to the top of the range); masks are copied as they are. The category
is then fitted and evaluated three ways: the original files, the 16-bit files read with ``--bit-depth 16`` (how
every release before the option read them) and with ``--bit-depth auto``. One row each: image AUROC, pixel AUROC,
PRO and the threshold.

    python benchmarks/bit_depth.py --categories magnetic_tile/mt
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"


def rewritten(src: Path, dst: Path, write: Callable[[Path, Path], None], folders: tuple[str, ...] | None = None
              ) -> int:
    """``src`` (an MVTec-layout category) copied to ``dst``: each photo passed to ``write(photo, out)``, each mask
    under ``ground_truth`` copied; only the top-level ``folders`` given (None: all). Returns how many photos. Also
    what colour_profiles.py copies a category with."""
    import shutil

    from anomaly_service.images import IMAGE_EXTENSIONS

    roots = [src] if folders is None else [src / f for f in folders]
    n = 0
    for path in sorted(p for root in roots for p in root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in path.relative_to(src).parts:
            shutil.copy(path, out)
            continue
        write(path, out)
        n += 1
    return n


def stored_deep(src: Path, dst: Path, bits: int) -> int:
    """``src`` (an MVTec-layout category) with every photo written to ``dst`` as a 16-bit PNG of ``bits``-bit
    values; ground-truth masks copied. Returns how many photos were written."""
    from PIL import Image

    def write(path: Path, out: Path) -> None:
        grey = np.asarray(Image.open(path).convert("L"), np.float64)
        Image.fromarray(np.round(grey * (2**bits - 1) / 255.0).astype(np.uint16)).save(out.with_suffix(".png"))

    return rewritten(src, dst, write)


def evaluate(category: Path, backbone: str, bit_depth: str) -> dict[str, float]:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import evaluate_model, read_category

    train, samples = read_category(category)
    model = AnomalyModel(backbone=backbone, bit_depth=bit_depth, progress=False).fit(train)
    metrics = evaluate_model(model, samples)
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], "pro": metrics["pro"],
            "threshold": metrics["threshold"], "read_as": model.limits.bit_depth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["magnetic_tile/mt"])
    ap.add_argument("--bits", type=int, default=12, choices=(10, 12, 14))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    import logging

    logging.getLogger("anomaly_service").setLevel(logging.ERROR)  # the table only (the fit's warnings are mt's own)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {platform.machine()}, {args.backbone}, photos stored as {args.bits}-bit in 16-bit PNG")
    print("| category | files | read as | image AUROC | pixel AUROC | PRO | threshold |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cat in args.categories:
        with tempfile.TemporaryDirectory() as scratch:
            deep = Path(scratch) / "deep"
            stored_deep(args.data / cat, deep, args.bits)
            for files, root, depth in (("original", args.data / cat, "auto"), (f"{args.bits}-bit", deep, "16"),
                                       (f"{args.bits}-bit", deep, "auto")):
                r = evaluate(root, args.backbone, depth)
                read = "as stored" if r["read_as"] is None else f"{r['read_as']}-bit (--bit-depth {depth})"
                print(f"| {cat} | {files} | {read} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                      f"{r['pro']:.4f} | {r['threshold']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
