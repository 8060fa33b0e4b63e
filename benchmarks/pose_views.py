"""Exact half-turned and mirrored views of the good images among a grain-aligned model's own rows: what they would
cost and buy (docs/decisions.md, "A threshold per pose").

A grain reads the same turned half round, and mirrored along or across it where it runs along an axis, so an
aligned ``--orientation any`` model leaves photos in those poses as they came and searches them against the
images' own rows, which hold only upright patches. This script adds such views of every training image to the own
rows (what the bank leaves uncovered at the fit's radius, half turns first, then each mirror), and prints, for the
model as saved and with the views: the bank's size, the upright test's quality, and the good test photos in each
pose the grain reading leaves as they came (the share above the model's threshold, and their median score).

    python benchmarks/pose_views.py --model models/mt_any --category ../shared/data/magnetic_tile/mt

``--model``: a saved model fitted with ``--orientation any`` on a surface whose grain it turns back to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_service import AnomalyModel  # noqa: E402
from anomaly_service.coreset import StreamingCover  # noqa: E402
from anomaly_service.images import load_image  # noqa: E402
from anomaly_service.index import build_index  # noqa: E402
from anomaly_service.metrics import image_auroc, pixel_auroc, pro_score  # noqa: E402
from anomaly_service.progress import progress_bar  # noqa: E402

POSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upright": lambda a: a,
    "half turn": lambda a: a[::-1, ::-1],
    "mirrored top to bottom": lambda a: a[::-1],
    "mirrored left to right": lambda a: a[:, ::-1],
}
VIEWS = ["half turn", "mirrored top to bottom", "mirrored left to right"]


def view_rows(model: AnomalyModel, train: list[Path], radius: float, batch: int = 32) -> dict[str, np.ndarray]:
    """Per view kind, the patches of that view of every training image that the own rows (and the views before it)
    leave uncovered at ``radius``, as the fit's streamed coreset adds a chunk's."""
    knn, emb = model.knn, model.embedder
    own = knn.bank()[~knn.copies_]
    cover = StreamingCover(torch.from_numpy(own), radius, knn.sampler.proj_dim, knn.seed)
    out: dict[str, list[np.ndarray]] = {v: [] for v in VIEWS}
    bar = progress_bar(True, total=len(train) * len(VIEWS), desc="views", unit="img")
    for view in VIEWS:
        for start in range(0, len(train), batch):
            images = [np.ascontiguousarray(POSES[view](load_image(f))) for f in train[start : start + batch]]
            feats = []
            for group in emb.groups(images):
                embedded = emb.embed([images[j] for j in group], keep=knn.keep)
                feats += [f.reshape(-1, f.shape[-1]).float().cpu() for f in embedded.features]
            x = torch.cat(feats)
            out[view].append(x[torch.from_numpy(cover.extend(x))].numpy())
            bar.update(len(images))
    bar.close()
    return {v: np.concatenate(rows) for v, rows in out.items()}


def with_own_rows(model: AnomalyModel, rows: np.ndarray, kind: str) -> None:
    """The model's bank with ``rows`` added as the images' own (searched for photos left as they came)."""
    knn = model.knn
    bank, copies = knn.bank(), knn.copies_
    knn.index_ = build_index(np.concatenate([bank, rows]).astype(np.float32), kind, nprobe=knn.nprobe, seed=knn.seed)
    knn.provenance_ = np.concatenate([knn.provenance_, np.zeros((len(rows), 3), np.int32)])
    knn.copies_ = np.concatenate([copies, np.zeros(len(rows), bool)])
    knn.place(torch.device("cpu"), knn._placement[1])


def measure(model: AnomalyModel, category: Path, threshold: float) -> dict[str, object]:
    tests = sorted(p for p in (category / "test").glob("*/*") if p.is_file())
    labels, scores, maps, masks = [], [], [], []
    for path, r in zip(tests, model.score_many([load_image(p) for p in tests])):
        kind = path.parent.name
        labels.append(kind != "good")
        scores.append(r.score)
        if kind == "good":
            mask = np.zeros(r.anomaly_map.shape, bool)
        else:
            mask_path = category / "ground_truth" / kind / f"{path.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        maps.append(r.anomaly_map)
        masks.append(mask)
    out: dict[str, object] = {"quality": (image_auroc(np.array(labels), np.array(scores)), pixel_auroc(maps, masks),
                                          pro_score(maps, masks))}
    goods = [load_image(p) for p in sorted((category / "test" / "good").iterdir())]
    work = model.embedder.preprocessing.working_size
    for pose, turn in POSES.items():
        views = [np.ascontiguousarray(turn(a)) for a in goods]
        came = [v for v in views if model.alignment_.turn_for(v, work) is None]
        s = np.array([r.score for r in model.score_many(came)])
        out[pose] = (len(came), len(views), float(np.mean(s > threshold)), float(np.median(s)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--category", type=Path, required=True)
    args = ap.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    radius, kind = manifest["coreset"]["coverage_radius"], manifest["index"]["kind"]
    model = AnomalyModel.load(args.model, device="cpu")
    if model.alignment_ is None or model.knn.copies_ is None:
        sys.exit("the model does not turn photos back to a grain (fit --orientation any on a surface with one)")
    threshold = float(model.decision.calibration.threshold)
    train = sorted(p for p in (args.category / "train" / "good").iterdir() if p.is_file())
    views = view_rows(model, train, radius)
    own = int((~model.knn.copies_).sum())
    rows = [("as saved", model.knn.bank_size, measure(model, args.category, threshold))]
    with_own_rows(model, views["half turn"], kind)
    rows.append(("+ half-turned views", model.knn.bank_size, measure(model, args.category, threshold)))
    with_own_rows(model, np.concatenate([views[v] for v in VIEWS[1:]]), kind)
    rows.append(("+ half-turned and mirrored views", model.knn.bank_size, measure(model, args.category, threshold)))
    print(f"threshold {threshold:.2f}; own rows {own}; view rows added: "
          + ", ".join(f"{v} {len(r)}" for v, r in views.items()))
    print("| own rows | bank (x own) | upright img / pix / PRO | " + " | ".join(
        f"{p}: flagged, median" for p in POSES) + " |")
    print("| --- " * (3 + len(POSES)) + "|")
    for name, size, m in rows:
        img, pix, pro = m["quality"]  # type: ignore[misc]
        cells = [f"{m[p][2]:.1%}, {m[p][3]:.1f}" for p in POSES]  # type: ignore[index]
        print(f"| {name} | {size} ({size / own:.1f}x) | {img:.3f} / {pix:.3f} / {pro:.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
