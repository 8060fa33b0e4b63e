"""The contamination guard on real images: defective parts hidden in ./good, caught or not, and what they cost.

For each shared category and each contamination level, a seeded share of the category's defective test images
(spread over its defect types) is moved into the training set. Fit with the defaults (efficientnet_lite0,
leave-one-out calibration, ``--contamination warn``) and report:

* caught: how many of the planted defects the guard lists; clean flagged: how many genuine good images it lists;
* image AUROC and PRO on the remaining test images for the clean fit, the contaminated fit, and the contaminated
  fit with ``--contamination drop``.

    python benchmarks/contamination.py                          # three categories, 2/5/10%
    python benchmarks/contamination.py --categories mvtec_ad/bottle --levels 0.05
    python benchmarks/contamination.py --categories magnetic_tile/mt --train-limit 240
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]


def planted(samples: list, share: float, seed: int = 0) -> list:
    """``share`` of the defective samples (at least one), drawn round-robin over defect types with a seeded order."""
    rng = np.random.default_rng(seed)
    by_type: dict[str, list] = {}
    for s in samples:
        if s.label == 1:
            by_type.setdefault(s.defect_type, []).append(s)
    n_defects = sum(len(v) for v in by_type.values())
    want = max(1, int(round(share * n_defects)))
    queues = {t: [v[i] for i in rng.permutation(len(v))] for t, v in sorted(by_type.items())}
    out: list = []
    while len(out) < want:
        for t in sorted(queues):
            if queues[t] and len(out) < want:
                out.append(queues[t].pop())
    return out


def fit(train: list[Path], backbone: str, contamination: str) -> tuple[Any, float]:
    from anomaly_service.model import AnomalyModel

    t0 = time.perf_counter()
    model = AnomalyModel(backbone=backbone, progress=False, contamination=contamination).fit(train)
    return model, time.perf_counter() - t0


def scored(model: Any, samples: list) -> dict[str, tuple[float, np.ndarray]]:
    """Each sample's decision score and normalized map, scored once (metrics on subsets reuse them)."""
    return {str(s.path): (r.normalized_score, r.normalized_map())
            for s, r in zip(samples, model.score_many([s.path for s in samples]))}


def metrics(results: dict[str, tuple[float, np.ndarray]], samples: list) -> tuple[float, float]:
    """Image AUROC and PRO of the scored ``samples``."""
    from anomaly_service.evaluate import _load_mask
    from anomaly_service.metrics import image_auroc, pro_score

    labels = np.array([s.label for s in samples])
    scores = np.array([results[str(s.path)][0] for s in samples])
    maps, masks = [], []
    for s in samples:
        amap = results[str(s.path)][1]
        mask = _load_mask(s, amap.shape)
        if mask is not None:
            maps.append(amap)
            masks.append(mask)
    return image_auroc(labels, scores), pro_score(maps, masks)


def decision(results: dict[str, tuple[float, np.ndarray]], samples: list) -> dict[str, Any]:
    """The default fit's decision on the test set: false alarms and recall at its threshold, and the operating
    curve around it (the clean row doubles as the threshold's after-measurement)."""
    from anomaly_service.evaluate import recall_at_fpr

    labels = np.array([s.label for s in samples])
    scores = np.array([results[str(s.path)][0] for s in samples])
    return {"good_fpr": float(np.mean(scores[labels == 0] > 1.0)),
            "defect_recall": float(np.mean(scores[labels == 1] > 1.0)),
            "recall_at_fpr": {f"{f:g}": recall_at_fpr(labels, scores, f) for f in (0.01, 0.02, 0.05)}}


def best_at(guard_scores: dict[str, float], bad_paths: set[str], clean_share: float = 0.01) -> int:
    """The most planted images any cut-off of the guard's scores catches while it flags at most ``clean_share`` of
    the clean ones: what the guard's ranking allows, whatever rule sets the cut-off."""
    ranked = sorted(guard_scores, key=lambda n: -guard_scores[n])
    allowed = int(clean_share * sum(n not in bad_paths for n in ranked))
    caught = best = clean = 0
    for name in ranked:
        if name in bad_paths:
            caught += 1
        else:
            clean += 1
            if clean > allowed:
                break
        best = max(best, caught)
    return best


def evenly_spaced(train: list[Any], n: int | None) -> list[Any]:
    """At most ``n`` of ``train``, evenly spaced, as quality.py's --train-limit (None or 0: all of them)."""
    if n and len(train) > n:
        return train[:: max(1, len(train) // n)][:n]
    return train


def run(category: str, levels: list[float], backbone: str, train_limit: int | None) -> list[dict[str, Any]]:
    from anomaly_service.evaluate import read_category

    train, samples = read_category(DATA / category)
    train = evenly_spaced(train, train_limit)
    rows = []
    clean_model, fit_s = fit(train, backbone, "warn")
    clean = scored(clean_model, samples)
    auroc, pro = metrics(clean, samples)
    rows.append({"category": category, "level": 0.0, "planted": 0, "caught": 0, "train": len(train),
                 "clean_flagged": len(clean_model.suspects_), "auroc": auroc, "pro": pro, "fit_s": fit_s,
                 "suspects": [s.name for s in clean_model.suspects_], **decision(clean, samples)})
    print(_line(rows[-1]), flush=True)
    print(f"  clean fit at its threshold: good FPR {rows[-1]['good_fpr']:.3f}, defect recall "
          f"{rows[-1]['defect_recall']:.3f}; recall at 1/2/5% FPR {rows[-1]['recall_at_fpr']}", flush=True)
    for level in levels:
        bad = planted(samples, level)
        bad_paths = {str(s.path) for s in bad}
        test = [s for s in samples if str(s.path) not in bad_paths]
        mixed = train + [s.path for s in bad]
        warn_model, warn_s = fit(mixed, backbone, "warn")
        drop_model, drop_s = fit(mixed, backbone, "drop")
        flagged = {s.name for s in warn_model.suspects_}
        row = {"category": category, "level": level, "planted": len(bad), "train": len(mixed),
               "caught": len(flagged & bad_paths), "clean_flagged": len(flagged - bad_paths),
               "best_at_1pct": best_at(warn_model.guard_scores_, bad_paths),
               "fit_s": warn_s, "fit_drop_s": drop_s, "suspects": sorted(flagged)}
        row["auroc_clean"], row["pro_clean"] = metrics(clean, test)  # the clean fit on the same test images
        row["auroc"], row["pro"] = metrics(scored(warn_model, test), test)
        row["auroc_drop"], row["pro_drop"] = metrics(scored(drop_model, test), test)
        rows.append(row)
        print(_line(row), flush=True)
        print(f"  at most 1% of clean images flagged, the guard's ranking catches at best {row['best_at_1pct']} of "
              f"{len(bad)}", flush=True)
    return rows


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _line(r: dict[str, Any]) -> str:
    if r["level"] == 0:
        return (f"| {r['category']} | clean | 0 | - | {r['clean_flagged']} of {r['train']} | {_pct(r['auroc'])} / "
                f"{_pct(r['pro'])} | | |")
    return (f"| {r['category']} | {100 * r['level']:.0f}% | {r['planted']} | {r['caught']} of {r['planted']} | "
            f"{r['clean_flagged']} of {r['train'] - r['planted']} | "
            f"{_pct(r['auroc_clean'])} / {_pct(r['pro_clean'])} | "
            f"{_pct(r['auroc'])} / {_pct(r['pro'])} | {_pct(r['auroc_drop'])} / {_pct(r['pro_drop'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--levels", nargs="+", type=float, default=[0.02, 0.05, 0.10])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--train-limit", type=int, default=None, help="Fit on at most N evenly spaced train images.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print("| category | planted share | planted | caught | clean flagged | clean fit AUROC / PRO | contaminated | "
          "contaminated + drop |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [r for c in args.categories for r in run(c, args.levels, args.backbone, args.train_limit)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
