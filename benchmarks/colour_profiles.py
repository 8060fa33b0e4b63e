"""A camera switched to another colour space between the fit and the line: what reading its photos' embedded ICC
profile as sRGB (colour_profile.py) gives back, and what it costs a photo.

A category's test photos are written, in a scratch folder, as a camera set to the given profile (Adobe RGB by
default) writes them: each photo's colours converted there through littlecms, and the profile embedded, so that any
viewer shows the same picture; masks are kept. The model is fitted on the original (sRGB, untagged) training
photos and evaluates the originals, the re-saved photos read through their profile (the product), and the same
photos read as stored (how every release before did, and how a model saved before still does). One row each: image
AUROC, pixel AUROC, PRO, good false alarms and defect recall at the threshold, and how far each photo's score moved
from its original's. Then the decode time of a large photo with such a profile, with and without the conversion.

    python benchmarks/colour_profiles.py --categories mvtec_ad/bottle \\
        --profile /usr/share/color/icc/colord/AdobeRGB1998.icc

The profile files come with the operating system's colour packages (Debian: colord-data); any RGB ICC profile
will do.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bit_depth import rewritten  # noqa: E402
DEFAULT_PROFILE = Path("/usr/share/color/icc/colord/AdobeRGB1998.icc")


def resaved(src: Path, dst: Path, profile: bytes) -> int:
    """``src``'s test photos (an MVTec-layout category) written to ``dst`` in ``profile``'s colour space, the
    profile embedded, in their own format; masks copied, the training folder linked. Returns how many photos."""
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    to_profile = ImageCms.buildTransform(srgb, ImageCms.ImageCmsProfile(io.BytesIO(profile)), "RGB", "RGB")
    (dst / "train").symlink_to(src / "train")

    def write(path: Path, out: Path) -> None:
        with Image.open(path) as img:
            fmt = img.format
            colour = ImageCms.applyTransform(img.convert("RGB"), to_profile)
        colour.save(out, fmt, icc_profile=profile, **({"quality": 95} if fmt == "JPEG" else {}))

    return rewritten(src, dst, write, ("test", "ground_truth"))


def scores_of(model, samples) -> tuple[dict, np.ndarray]:
    from anomaly_service.evaluate import evaluate_model

    metrics = evaluate_model(model, samples)
    return metrics, np.array([model.score(s.path).score for s in samples])


def decode_ms(photo: bytes, limits, repeats: int) -> float:
    from anomaly_service.images import load_image

    load_image(photo, limits)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        load_image(photo, limits)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle"])
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="an RGB ICC profile file")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--large", default="2448x2048", help="the large photo timed, WIDTHxHEIGHT")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not args.profile.is_file():
        sys.exit(f"error: no profile at {args.profile}: give --profile an RGB ICC file (Debian: colord-data)")
    import logging

    from PIL import Image

    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    logging.getLogger("anomaly_service").setLevel(logging.ERROR)
    profile = args.profile.read_bytes()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {platform.machine()}, {os.cpu_count()} cores, {args.backbone}, "
          f"test photos re-saved in {args.profile.name}")
    print("| category | test photos | read as | image AUROC | pixel AUROC | PRO | good FPR | recall | "
          "score moved (mean / max) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cat in args.categories:
        train, samples = read_category(args.data / cat)
        model = AnomalyModel(backbone=args.backbone, progress=False).fit(train)
        with tempfile.TemporaryDirectory() as scratch:
            resaved(args.data / cat, Path(scratch), profile)
            _, others = read_category(scratch)
            base, base_scores = scores_of(model, samples)
            rows = [("original (no profile)", "as stored", base, base_scores)]
            rows.append((args.profile.name, "sRGB (the product)", *scores_of(model, others)))
            model.limits = dataclasses.replace(model.limits, colour_profiles=False)
            rows.append((args.profile.name, "as stored (before)", *scores_of(model, others)))
            model.limits = dataclasses.replace(model.limits, colour_profiles=True)
        for photos, how, m, scores in rows:
            moved = np.abs(scores - base_scores)
            print(f"| {cat} | {photos} | {how} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['pro']:.4f} | "
                  f"{m['good_fpr']:.3f} | {m['defect_recall']:.3f} | {moved.mean():.2f} / {moved.max():.2f} |")
    # decode time of a large photo carrying the profile: the conversion runs on the whole frame
    width, height = map(int, args.large.split("x"))
    src = sorted((args.data / args.categories[0] / "test" / "good").iterdir())[0]
    big = Image.open(src).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    photos = {}
    for name, extra in (("no profile", {}), (args.profile.name, {"icc_profile": profile})):
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=95, **extra)
        photos[name] = buf.getvalue()
    from anomaly_service.images import DEFAULT_LIMITS

    limits = dataclasses.replace(DEFAULT_LIMITS, max_pixels=max(DEFAULT_LIMITS.max_pixels, width * height))
    print()
    print(f"| decode of a {width}x{height} JPEG (q95) | ms (median of {args.repeats}) | ms per megapixel |")
    print("| --- | --- | --- |")
    mp = width * height / 1e6
    for name, how, lim in (("no profile", "", limits),
                           (args.profile.name, ", as stored", dataclasses.replace(limits, colour_profiles=False)),
                           (args.profile.name, ", read as sRGB", limits)):
        ms = decode_ms(photos[name], lim, args.repeats)
        print(f"| {name}{how} | {ms:.1f} | {ms / mp:.1f} |")


if __name__ == "__main__":
    main()
