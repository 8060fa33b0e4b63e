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


def fit_and_evaluate(train: list[Path], test: list, backbone: str, contamination: str) -> tuple[Any, dict]:
    from anomaly_service.evaluate import evaluate_model
    from anomaly_service.model import AnomalyModel

    t0 = time.perf_counter()
    model = AnomalyModel(backbone=backbone, progress=False, contamination=contamination).fit(train)
    fit_s = time.perf_counter() - t0
    return model, {**evaluate_model(model, test, fit_seconds=fit_s), "suspects": [s.name for s in model.suspects_]}


def run(category: str, levels: list[float], backbone: str, train_limit: int | None) -> list[dict[str, Any]]:
    from anomaly_service.evaluate import evaluate_model, read_category

    train, samples = read_category(DATA / category)
    if train_limit and len(train) > train_limit:  # evenly spaced, as quality.py's --train-limit
        train = train[:: max(1, len(train) // train_limit)][:train_limit]
    rows = []
    clean_model, clean = fit_and_evaluate(train, samples, backbone, "warn")
    rows.append({"category": category, "level": 0.0, "planted": 0, "caught": 0, "train": len(train),
                 "clean_flagged": len(clean["suspects"]), "auroc": clean["image_auroc"], "pro": clean["pro"],
                 "fit_s": clean["fit_seconds"], "suspects": clean["suspects"]})
    print(_line(rows[-1]), flush=True)
    for level in levels:
        bad = planted(samples, level)
        bad_paths = {str(s.path) for s in bad}
        test = [s for s in samples if str(s.path) not in bad_paths]
        clean_here = evaluate_model(clean_model, test)  # the clean fit on the same test images
        mixed = train + [s.path for s in bad]
        _, warn = fit_and_evaluate(mixed, test, backbone, "warn")
        _, drop = fit_and_evaluate(mixed, test, backbone, "drop")
        flagged = set(warn["suspects"])
        row = {"category": category, "level": level, "planted": len(bad), "train": len(mixed),
               "caught": len(flagged & bad_paths), "clean_flagged": len(flagged - bad_paths),
               "auroc_clean": clean_here["image_auroc"], "pro_clean": clean_here["pro"],
               "auroc": warn["image_auroc"], "pro": warn["pro"],
               "auroc_drop": drop["image_auroc"], "pro_drop": drop["pro"],
               "fit_s": warn["fit_seconds"], "fit_drop_s": drop["fit_seconds"], "suspects": sorted(flagged)}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _line(r: dict[str, Any]) -> str:
    if r["level"] == 0:
        return (f"| {r['category']} | clean | 0 | - | {r['clean_flagged']} of {r['train']} | {_pct(r['auroc'])} / "
                f"{_pct(r['pro'])} | | |")
    return (f"| {r['category']} | {100 * r['level']:.0f}% | {r['planted']} | {r['caught']} of {r['planted']} | "
            f"{r['clean_flagged']} of {r['train'] - r['planted']} | {_pct(r['auroc_clean'])} / {_pct(r['pro_clean'])} | "
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
