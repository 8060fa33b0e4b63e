"""Behaviour-preservation check for refactors: record a model's scores and maps, then compare against them.

    python benchmarks/equivalence.py record OUT_DIR   # fit defaults on the shared categories, save models + scores
    python benchmarks/equivalence.py check OUT_DIR    # load the saved models, re-score, re-fit: compare

``check`` prints, per category, the largest relative difference of image scores and maps between the recorded
and re-loaded model, and whether a fresh fit with the same seed gives the same memory bank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402,F401  (before FAISS: one OpenMP thread pool, parallelism.py; the package no longer brings it)
import faiss  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
PARAMS = {"backbone": "efficientnet_lite0"}  # the offline default; every other option at its default


def _bank(model_dir: Path) -> np.ndarray:
    index = faiss.read_index(str(model_dir / "index.faiss"))
    return index.reconstruct_n(0, index.ntotal)


def _score(model, paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    results = list(model.score_many(paths))
    return np.array([r.score for r in results]), [r.anomaly_map for r in results]


def record(out: Path) -> None:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    for cat in CATEGORIES:
        train, samples = read_category(DATA / cat)
        dest = out / cat.replace("/", "_")
        t0 = time.perf_counter()
        model = AnomalyModel(progress=False, **PARAMS).fit(train)
        model.save(dest / "model")
        scores, maps = _score(model, [s.path for s in samples])
        np.savez_compressed(dest / "scores.npz", scores=scores, **{f"map{i}": m for i, m in enumerate(maps)})
        (dest / "paths.json").write_text(json.dumps([str(s.path) for s in samples]))
        print(f"{cat}: recorded {len(samples)} images, bank {_bank(dest / 'model').shape}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)


def check(out: Path) -> int:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    worst = 0.0
    for cat in CATEGORIES:
        dest = out / cat.replace("/", "_")
        paths = [Path(p) for p in json.loads((dest / "paths.json").read_text())]
        rec = np.load(dest / "scores.npz")
        model = AnomalyModel.load(dest / "model")
        scores, maps = _score(model, paths)
        d_score = float(np.max(np.abs(scores - rec["scores"]) / np.maximum(np.abs(rec["scores"]), 1e-12)))
        d_map = max(float(np.max(np.abs(m - rec[f"map{i}"]) / np.maximum(np.abs(rec[f"map{i}"]).max(), 1e-12)))
                    for i, m in enumerate(maps))
        train, _ = read_category(DATA / cat)
        refit = AnomalyModel(progress=False, **PARAMS).fit(train)
        refit.save(dest / "refit")
        same_bank = bool(np.array_equal(_bank(dest / "refit"), _bank(dest / "model")))
        worst = max(worst, d_score, d_map)
        print(f"{cat}: max rel diff score {d_score:.2e}, map {d_map:.2e}; refit bank identical: {same_bank}",
              flush=True)
        if not same_bank:
            worst = float("inf")
    print("PASS" if worst <= 1e-6 else "FAIL")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    if a.mode == "record":
        record(a.out)
    else:
        sys.exit(check(a.out))
