"""The contamination guard at several training-set sizes, and what a floor on the suspects' score ratio changes.

For each category and training-set size (evenly spaced train images), fit the defaults on the clean set and on the
set with a planted share of defective test images (contamination.py's seeded draw), keep every training image's
guard (support) score, and list for several ratio floors how many planted defects the guard still lists and how
many clean images it lists. The floor is applied to the stored scores, so one pair of fits serves every floor.

    python benchmarks/guard_sizes.py                                    # 30/60/120 images, 5% planted
    python benchmarks/guard_sizes.py --sizes 0 --levels 0.05 0.10        # 0: every training image
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contamination import CATEGORIES, DATA, evenly_spaced, planted  # noqa: E402

FLOORS = (1.0, 1.10, 1.15, 1.20, 1.25)


def fits(category: str, sizes: list[int], levels: list[float], backbone: str) -> list[dict]:
    from anomaly_service.evaluate import read_category
    from anomaly_service.model import AnomalyModel

    train_all, samples = read_category(DATA / category)
    rows = []
    for n in sizes:
        train = evenly_spaced(train_all, n)
        for level in [0.0, *levels]:
            bad = planted(samples, level) if level else []
            t0 = time.perf_counter()
            model = AnomalyModel(backbone=backbone, progress=False, contamination="warn").fit(
                train + [s.path for s in bad])
            rows.append({"category": category, "train": len(train), "level": level,
                         "planted": [str(s.path) for s in bad], "scores": model.guard_scores_,
                         "fit_s": time.perf_counter() - t0})
            print(f"  {category} {len(train)} images, {100 * level:.0f}% planted: fitted in {rows[-1]['fit_s']:.1f} s",
                  file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    from anomaly_service.contamination import GUARD_TAIL, find_suspects

    head = "| category | train | planted | " + " | ".join(f"ratio >= {f:.2f}" for f in FLOORS) + " |"
    lines = [head, "| --- | ---: | ---: |" + " --- |" * len(FLOORS)]
    for r in rows:
        names = list(r["scores"])
        scores = np.array([r["scores"][n] for n in names])
        bad = set(r["planted"])
        cells = []
        for floor in FLOORS:
            listed = {s.name for s in find_suspects(scores, names, min_ratio=floor, tail=GUARD_TAIL)}
            caught = len(listed & bad)
            cells.append(f"{caught} of {len(bad)} / {len(listed - bad)}" if bad else f"- / {len(listed)}")
        lines.append(f"| {r['category']} | {r['train']} | {len(bad)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--sizes", nargs="+", type=int, default=[30, 60, 120], help="0: every training image")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.05])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--scores", type=Path, default=None, help="Read stored fits' scores (JSON) instead of fitting.")
    ap.add_argument("--json", type=Path, default=None, help="Write the fits' scores here.")
    args = ap.parse_args()
    if args.scores:
        rows = json.loads(args.scores.read_text())
    else:
        rows = [r for c in args.categories for r in fits(c, args.sizes, args.levels, args.backbone)]
    if args.json:
        args.json.write_text(json.dumps(rows))
    print("Cells: planted defects listed / clean images listed.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
