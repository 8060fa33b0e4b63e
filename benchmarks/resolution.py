"""A photo at another resolution: what a fixed-scale model's decision does when the camera's resolution changes.

A fitted model (defaults: fixed-scale resize) scores each category's good test photos resized by a factor, as a
camera with more or fewer pixels over the same field of view would take them. Printed per factor: the good photos
flagged (false alarms), the defects flagged at factor 1 for reference, and how many photos get the scale warning
(preprocessing.SCALE_TOLERANCE). Why the warning's margin is what it is.

    python benchmarks/resolution.py                                  # bottle and kos, 60 training images each
    python benchmarks/resolution.py --categories mvtec_ad/bottle --train 0 --factors 0.5 0.8 1 1.25 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def main() -> None:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image
    from anomaly_service.preprocessing import SCALE_TOLERANCE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle", "kolektorsdd/kos"])
    ap.add_argument("--train", type=int, default=60, help="Evenly spaced training images (0: all)")
    ap.add_argument("--factors", nargs="+", type=float, default=[0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0])
    a = ap.parse_args()
    print(f"scale warning beyond the training photos' longer sides / and x {SCALE_TOLERANCE}\n")
    print("| category | resize factor | good photos flagged | photos warned |")
    print("| --- | ---: | --- | --- |")
    for cat in a.categories:
        train, samples = read_category(DATA / cat)
        if a.train:
            train = train[:: max(1, len(train) // a.train)][: a.train]
        model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
        goods = [load_image(s.path) for s in samples if s.label == 0]
        for f in a.factors:
            photos = [np.asarray(Image.fromarray(g).resize((max(8, round(g.shape[1] * f)),
                                                            max(8, round(g.shape[0] * f))), Image.BICUBIC))
                      for g in goods]
            res = list(model.score_many(photos))
            print(f"| {cat} | {f:g} | {sum(r.is_anomaly for r in res)} of {len(res)} | "
                  f"{sum(bool(r.warnings) for r in res)} of {len(res)} |", flush=True)


if __name__ == "__main__":
    main()
