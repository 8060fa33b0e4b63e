"""Near-duplicate good images in ./good: does a twin in the bank bias what the fit learns from leave-one-out scores?

On a line ./good holds burst shots of one part, the same part photographed on two passes, one photo re-saved at
another JPEG quality. The fit drops only byte-identical repeats; a near-copy stays, and under leave-one-out its twin's
patches are still in the bank. For each shared category a seeded share of the training images gets one realistic
near-copy each (cycling: a JPEG re-encode at quality 90, a 1-2 px shift with the edge repeated, a burst shot's
brightness jitter of 1-3%), written to a scratch folder outside the repository. Each set is
fitted with the defaults and reports the threshold, the good false-alarm rate and defect recall at it on the test
set, image AUROC and PRO, the guard's suspects, the drift reference (median typical distance of the calibration
images) and the fit seconds. Level 0 is the clean set, fitted with each seed: the noise a row is read against.

    python benchmarks/near_duplicates.py                       # three categories, clean and 10/25/50%, seeds 0-2
    python benchmarks/near_duplicates.py --categories mvtec_ad/bottle --levels 0.25 --seeds 0
    python benchmarks/near_duplicates.py --categories magnetic_tile/mt --train-limit 240
    python benchmarks/near_duplicates.py --detectors   # could a cheap signal find the copies? (50%)
    python benchmarks/near_duplicates.py --categories kolektorsdd/kos --levels 0 0.5 --seeds 0 1 --grouped

``--grouped`` also fits every twinned set with ``part_id`` (:data:`PART_ID`): each copy is named after its original
(``kos01_Part0.png`` -> ``kos01_Part0_jpeg90.jpg``), as a plant names a part's shots, and the pattern takes the
original's name as the part id, so the leave-one-out threshold leaves an image and its copy out together. Each
twinned set is then fitted twice per seed, without and with the grouping, beside the clean fits.

``--detectors`` measures the signals a fit could find the copies by: for each category it plants the copies at the
largest level and prints, per kind of copy, its distance to its original over the median distance of a clean image
to its nearest other image, by two cheap signals a fit could group images with (each image's pooled patch feature; a
small grey thumbnail with its mean and contrast removed), next to the smallest such ratio among the clean images: a
signal that finds the copies must put every copy well below every clean pair. It then fits the twinned set once and
prints the patch-level signal the leave-one-out shortlist holds: the largest share of an image's patches whose
nearest other-image row comes from one image, for clean images, originals and copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
VARIANTS = ("jpeg90", "shift", "burst")
# --grouped: a copy's part id is its original's file name (its own without the _<variant> near_copy added)
PART_ID = r"([^/]+?)(?:_(?:" + "|".join(VARIANTS) + r"))?\.\w+$"


def near_copy(src: Path, kind: str, rng: np.random.Generator, out_dir: Path) -> Path:
    """A near-copy of the good image ``src`` of one ``kind`` (:data:`VARIANTS`), written under ``out_dir``."""
    from PIL import Image

    img = Image.open(src)
    img.load()
    stem = f"{src.stem}_{kind}"
    if kind == "jpeg90":  # the same photo re-saved at another quality
        out = out_dir / f"{stem}.jpg"
        img.convert("L" if img.mode in ("L", "I;16", "I") else "RGB").save(out, quality=90)
        return out
    a = np.asarray(img)
    if kind == "shift":  # the part a pixel or two further along: the frame moves, the edge repeats
        dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 3, size=2))
        pad = [(2, 2), (2, 2)] + [(0, 0)] * (a.ndim - 2)
        p = np.pad(a, pad, mode="edge")
        a = p[2 + dy: 2 + dy + a.shape[0], 2 + dx: 2 + dx + a.shape[1]]
    else:  # a burst shot: the light a little different (no noise added: the category's own photos are smoothed by
        # their down-scaling, and fresh noise on a copy alone made the guard list the copies for their noise)
        gain = 1.0 + rng.choice([-1, 1]) * rng.uniform(0.01, 0.03)
        a = np.clip(np.rint(a.astype(np.float64) * gain), 0, 255).astype(np.uint8)
    out = out_dir / f"{stem}.png"
    Image.fromarray(a).save(out)
    return out


def with_twins(train: list[Path], share: float, seed: int, out_dir: Path) -> tuple[list[Path], list[Path]]:
    """``train`` with a near-copy of a seeded ``share`` of its images (each right after its original, as a burst
    lands in the folder), and the originals that got one."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(train), size=int(round(share * len(train))), replace=False).tolist())
    copies = {i: near_copy(train[i], VARIANTS[n % len(VARIANTS)], rng, out_dir) for n, i in enumerate(picked)}
    out: list[Path] = []
    for i, p in enumerate(train):
        out.append(p)
        if i in copies:
            out.append(copies[i])
    return out, [train[i] for i in picked]


def one_fit(category: str, level: float, seed: int, train: list[Path], samples: list, twinned: list[Path],
            set_params: dict[str, Any]) -> dict[str, Any]:
    """Fit ``train`` with fit seed ``seed`` and measure it on the test ``samples``."""
    from anomaly_service.model import AnomalyModel

    from contamination import decision, metrics, scored

    t0 = time.perf_counter()
    model = AnomalyModel(backbone="efficientnet_lite0", progress=False, seed=seed, **set_params).fit(train)
    fit_s = time.perf_counter() - t0
    results = scored(model, samples)
    auroc, pro = metrics(results, samples)
    cal = model.decision.calibration
    manifest = model.manifest_.model_dump() if model.manifest_ is not None else {}
    training = manifest.get("training", {})
    outliers = set(training.get("left_out_of_threshold", []))
    loo = dict(zip([n for n in model.catalog_.names if n not in outliers], cal.holdout_scores))
    twins = {str(p) for p in twinned}
    originals = [v for n, v in loo.items() if n in twins]
    copies = [v for n, v in loo.items() if n not in twins and Path(n).stem.rsplit("_", 1)[-1] in VARIANTS]
    rest = [v for n, v in loo.items() if n not in twins and Path(n).stem.rsplit("_", 1)[-1] not in VARIANTS]
    groups = training.get("part_groups") or {}
    return {"category": category, "level": level, "seed": seed, "train": len(train), "threshold": cal.threshold,
            "part_id": set_params.get("part_id"), "n_groups": groups.get("n_groups"),
            "calibrated": cal.n_images, "auroc": auroc, "pro": pro, "suspects": len(model.suspects_),
            "drift_ref": float(np.median(cal.holdout_distances)) if cal.holdout_distances else None,
            "loo_median": {"untouched": _median(rest), "originals": _median(originals), "copies": _median(copies)},
            "fit_s": fit_s,
            "holdout_scores": list(cal.holdout_scores),  # for the clean fit's tail read at another threshold
            **decision(results, samples)}


def _pooled(paths: list[Path]) -> np.ndarray:
    """Each image's mean patch feature (all dimensions), as the fit pools it for the image map."""
    from anomaly_service.images import load_image
    from anomaly_service.model import AnomalyModel

    model = AnomalyModel(backbone="efficientnet_lite0", progress=False)
    images = [load_image(p) for p in paths]
    model.embedder.fit_scale([i.shape for i in images], model.config.resize)
    out = []
    for i in range(0, len(images), 16):
        for e in model.embedder.embed(images[i:i + 16]).per_image():
            out.append(e.reshape(-1, e.shape[-1]).float().mean(0).numpy())
    return np.stack(out)


def _thumbnails(paths: list[Path], side: int = 64) -> np.ndarray:
    """Each image as a ``side`` x ``side`` grey thumbnail, its mean and contrast removed (a brightness change gone)."""
    from PIL import Image

    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("L").resize((side, side), Image.BILINEAR), dtype=np.float64).ravel()
        out.append((a - a.mean()) / (a.std() + 1e-9) / side)
    return np.stack(out)


def detectors(category: str, mixed: list[Path], twinned: list[Path]) -> None:
    """Print how far each kind of copy lies from its original by each signal, against the clean images' nearest."""
    kind = [p.stem.rsplit("_", 1)[-1] if p.stem.rsplit("_", 1)[-1] in VARIANTS else None for p in mixed]
    originals = {str(p) for p in twinned}
    clean = np.array([k is None and str(p) not in originals for p, k in zip(mixed, kind)])
    for signal, features in (("pooled feature", _pooled(mixed)), ("thumbnail 64 px", _thumbnails(mixed))):
        d = np.sqrt(np.maximum(((features[:, None] - features[None]) ** 2).sum(-1), 0))
        np.fill_diagonal(d, np.inf)
        scale = float(np.median(d.min(1)[clean]))
        ratios = {v: [d[i, i - 1] / scale for i, k in enumerate(kind) if k == v] for v in VARIANTS}
        print(f"{category} {signal}: " + "; ".join(f"{v} {min(r):.2f}-{max(r):.2f}" for v, r in ratios.items() if r)
              + f"; clean images' nearest from {float(d.min(1)[clean].min()) / scale:.2f}", flush=True)


def shortlist_shares(category: str, mixed: list[Path], twinned: list[Path]) -> None:
    """Fit the twinned set once and read, per training image, the patch-level signal the leave-one-out search
    already has: which other image holds each patch's nearest bank row, and the largest share of the image's
    patches one other image holds (its top image); print that share per kind of image, and how often the top image
    is the twin."""
    from anomaly_service.images import load_image
    from anomaly_service.index import search
    from anomaly_service.model import AnomalyModel

    model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(mixed)
    knn, names = model.knn, model.catalog_.names
    source = knn.provenance_[:, 0]
    shortlist = knn.left_out_search(len(names))
    by_stem = {Path(n).stem: n for n in names}
    originals = {str(p) for p in twinned}
    found: dict[str, list[tuple[float, bool]]] = {}
    for j, name in enumerate(names):
        feats = model.embedder.embed([load_image(name)], keep=knn.keep).features
        queries = feats.reshape(-1, feats.shape[-1]).float().cpu().numpy()
        _, ids = search(shortlist, queries, knn.k + 16)
        near = source[ids]
        nearest = near[np.arange(len(near)), np.argmax(near != j, axis=1)]  # each patch's nearest other image
        counts = np.bincount(nearest, minlength=len(names))
        stem, tail = (Path(name).stem.rsplit("_", 1) + [""])[:2]
        twin = (by_stem.get(stem) if tail in VARIANTS else
                next((by_stem[f"{Path(name).stem}_{v}"] for v in VARIANTS if f"{Path(name).stem}_{v}" in by_stem),
                     None) if name in originals else None)
        kind = tail if tail in VARIANTS else "original" if name in originals else "clean"
        found.setdefault(kind, []).append((counts.max() / len(queries), twin is not None and
                                           names[int(counts.argmax())] == twin))
    for kind, rows in found.items():
        share = np.array([r[0] for r in rows])
        print(f"{category} top-image share, {kind} ({len(rows)}): min {share.min():.3f} median "
              f"{np.median(share):.3f} max {share.max():.3f}; above 0.10: {int((share > 0.10).sum())}, above 0.15: "
              f"{int((share > 0.15).sum())}; the top image is the twin for {sum(r[1] for r in rows)}", flush=True)


def _median(v: list[float]) -> float | None:
    return float(np.median(v)) if v else None


def _line(r: dict[str, Any]) -> str:
    med = r["loo_median"]
    parts = "/".join("-" if med[k] is None else f"{med[k]:.1f}" for k in ("untouched", "originals", "copies"))
    drift = "-" if r["drift_ref"] is None else f"{r['drift_ref']:.3f}"
    level = f"{100 * r['level']:.0f}%" + (f", grouped ({r['n_groups']} parts)" if r.get("part_id") else "")
    return (f"| {r['category']} | {level} | {r['seed']} | {r['train']} | {r['threshold']:.2f} | "
            f"{r['good_fpr']:.3f} | {r['defect_recall']:.3f} | {100 * r['auroc']:.1f} / {100 * r['pro']:.1f} | "
            f"{r['suspects']} | {drift} | {parts} | {r['fit_s']:.1f} |")


def main() -> None:
    from anomaly_service.evaluate import read_category

    from contamination import evenly_spaced

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.10, 0.25, 0.50],
                    help="Shares of the training images given a near-copy (0: the clean set).")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Fit seeds (clean and twinned sets).")
    ap.add_argument("--twin-seed", type=int, default=0, help="Which images get a near-copy, and how.")
    ap.add_argument("--train-limit", type=int, default=None, help="Fit on at most N evenly spaced train images.")
    ap.add_argument("--scratch", type=Path, default=None, help="Where the near-copies are written (default: a "
                    "temporary folder, removed after).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grouped", action="store_true", help="Also fit each twinned set with part_id grouping every "
                    "copy with its original (the docstring says how).")
    ap.add_argument("--detectors", action="store_true", help="How far the copies lie from their originals by "
                    "cheap signals, against the clean images (the docstring says more); one fit per category.")
    args = ap.parse_args()
    if args.detectors:
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            for category in args.categories:
                train = evenly_spaced(read_category(DATA / category)[0], args.train_limit)
                out_dir = Path(scratch) / category.replace("/", "_")
                out_dir.mkdir(parents=True)
                mixed, twinned = with_twins(train, max(args.levels), args.twin_seed, out_dir)
                detectors(category, mixed, twinned)
                shortlist_shares(category, mixed, twinned)
        return
    print("| category | near-copies of | fit seed | images | threshold | good FPR | defect recall | AUROC / PRO | "
          "suspects | drift ref | LOO median untouched/originals/copies | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for category in args.categories:
            train, samples = read_category(DATA / category)
            train = evenly_spaced(train, args.train_limit)
            for level in args.levels:
                out_dir = Path(scratch) / category.replace("/", "_") / f"{level:g}"
                out_dir.mkdir(parents=True, exist_ok=True)
                mixed, twinned = with_twins(train, level, args.twin_seed, out_dir) if level else (train, [])
                for seed in args.seeds:
                    for params in ({}, {"part_id": PART_ID}) if args.grouped and level else ({},):
                        rows.append(one_fit(category, level, seed, mixed, samples, twinned, params))
                        print(_line(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
