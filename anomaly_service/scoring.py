"""Patch and image anomaly scores from kNN distances to the memory bank (PatchCore Sec. 3.3)."""

from __future__ import annotations

import torch  # noqa: F401  (first: FAISS then shares its OpenMP pool, parallelism.load_faiss_after_torch)
import faiss
import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .index import search


def patch_scores(index: faiss.Index, queries: np.ndarray, k: int = ModelConfig.k) -> tuple[np.ndarray, np.ndarray]:
    """Score of each query patch = mean L2 distance to its ``k`` nearest bank patches (k=1: the paper's).

    Returns ``(scores, nearest_ids)``; ``nearest_ids`` is the single nearest bank entry per patch.
    """
    dist, ids = search(index, queries, k)
    return dist.mean(axis=1), ids[:, 0]


def image_score(patch_scores: np.ndarray, anomaly_map: np.ndarray, mode: str = ModelConfig.image_score) -> float:
    """The smoothed ``anomaly_map``'s maximum (``map-max``) or the raw patch maximum (``max``, the paper's).

    ``map-max`` flags a part exactly when some pixel of its heatmap crosses the threshold, so decision and heatmap
    agree; the raw maximum sits above the smoothed map's and can flag a part whose heatmap stays below it.
    """
    if mode == "map-max":
        return float(anomaly_map.max())
    if mode == "max":
        return float(patch_scores.max())
    raise ConfigError(f"unknown image score {mode!r}; choose map-max or max")
