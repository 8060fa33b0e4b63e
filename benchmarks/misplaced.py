"""Whole-part faults on real photos: does the whole-image branch catch a part that sits wrong in the frame?

    python benchmarks/misplaced.py [--categories mvtec_ad/bottle ...] [--data ../shared/data]

The shared categories hold no logical anomaly (a missing, extra or moved component), so this makes the nearest
one from their own good test photos: the whole part moved off its place (8% and 15% of the frame) or made smaller
(85%: another variant of the part), the uncovered border filled with the photo's own edge. Every patch of such a
photo looks like a good patch somewhere, so the patch kNN has little to go on; only the layout is wrong. This is a
fault only where parts sit in a fixture, which is what a layout strength of 0.5 or more says (layout.py).

One default fit per category (every training image, the leave-one-out threshold; the branch where the layout
says so). The kNN alone is read off the same results: its score and its own decision (``scorers["knn"]``, whose
threshold is the decision's), so both opinions see the same bank; so is the branch's own opinion. Prints, per
fault: AUROC of the fault against the good test photos and recall at the threshold, for the kNN alone, the branch
alone and the default decision (the good photos' row: each one's false-alarm rate).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"


def moved(img: np.ndarray, share: float, direction: int) -> np.ndarray:
    """The photo's content moved by ``share`` of its size in one of four directions, the border repeated."""
    h, w = img.shape[:2]
    dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][direction % 4]
    sy, sx = int(round(dy * share * h)), int(round(dx * share * w))
    pad = np.pad(img, ((abs(sy), abs(sy)), (abs(sx), abs(sx)), (0, 0)), mode="edge")
    y0, x0 = abs(sy) - sy, abs(sx) - sx
    return np.ascontiguousarray(pad[y0 : y0 + h, x0 : x0 + w])


def smaller(img: np.ndarray, scale: float) -> np.ndarray:
    """The part shrunk about the photo's centre to ``scale``, the border repeated around it."""
    h, w = img.shape[:2]
    sh, sw = int(round(h * scale)), int(round(w * scale))
    small = np.asarray(Image.fromarray(img).resize((sw, sh), Image.Resampling.BILINEAR))
    top, left = (h - sh) // 2, (w - sw) // 2
    return np.ascontiguousarray(np.pad(small, ((top, h - sh - top), (left, w - sw - left), (0, 0)), mode="edge"))


FAULTS = {
    "moved 2%": lambda img, i: moved(img, 0.02, i),
    "moved 4%": lambda img, i: moved(img, 0.04, i),
    "moved 8%": lambda img, i: moved(img, 0.08, i),
    "smaller 95%": lambda img, i: smaller(img, 0.95),
    "smaller 90%": lambda img, i: smaller(img, 0.90),
}


def auroc(good: list[float], bad: list[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0] * len(good) + [1] * len(bad), list(good) + list(bad)))


def run(category_dir: Path) -> list[tuple[str, ...]]:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    train, samples = read_category(category_dir)
    model = AnomalyModel(backbone="efficientnet_lite0", progress=False, device="cpu").fit(train)
    second = model.manifest_.training.second_opinion or {}
    goods = [load_image(s.path) for s in samples if s.label == 0]

    def opinions(images: list[np.ndarray]) -> dict[str, tuple[list[float], list[bool]]]:
        """Per opinion (the kNN's, the branch's when fused, the decision), each photo's score and flag."""
        rs = list(model.score_many(images))
        out = {"kNN": ([r.score for r in rs], [r.scorers["knn"]["is_anomaly"] if r.scorers else r.is_anomaly
                                               for r in rs])}
        if model.autoencoder_ is not None:
            out["branch"] = ([r.scorers["autoencoder"]["score"] for r in rs],
                             [r.scorers["autoencoder"]["is_anomaly"] for r in rs])
        out["default"] = ([r.normalized_score for r in rs], [r.is_anomaly for r in rs])
        return out

    good = opinions(goods)
    rows = [(category_dir.name, f"{second.get('layout_strength', float('nan')):.2f}",
             "fused" if second.get("fused") else "kNN alone", "good test photos", str(len(goods)),
             *(f"FPR {np.mean(good[k][1]):.3f}" if k in good else "" for k in OPINIONS))]
    for name, fault in FAULTS.items():
        bad = opinions([fault(img, i) for i, img in enumerate(goods)])
        rows.append((category_dir.name, "", "", name, str(len(goods)),
                     *(f"{auroc(good[k][0], bad[k][0]):.3f} / {np.mean(bad[k][1]):.2f}" if k in bad else ""
                       for k in OPINIONS)))
    return rows


OPINIONS = ("kNN", "branch", "default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle"])
    args = parser.parse_args()
    head = ("category", "layout", "default fit", "photos", "n", *(f"{k}: AUROC / recall" for k in OPINIONS))
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for cat in args.categories:
        for row in run(args.data / cat):
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
