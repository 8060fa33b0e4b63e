"""Patch and image anomaly scores from kNN distances to the memory bank (PatchCore Sec. 3.3)."""

from __future__ import annotations

import torch  # noqa: F401  (first: FAISS then shares its OpenMP pool, parallelism.load_faiss_after_torch)
import faiss
import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .index import search

# Queries searched at once. A search's working arrays grow with its queries (a bf16 copy of them, shortlists, the
# re-ranked rows): a large tiled photo's hundreds of thousands of patches, searched at once, took several times the
# memory of its features. A query's answer depends on it alone, so the blocks change no result.
SEARCH_BLOCK = 16384


def patch_scores(index: faiss.Index, queries: np.ndarray, k: int = ModelConfig.k) -> tuple[np.ndarray, np.ndarray]:
    """Score of each query patch = mean L2 distance to its ``k`` nearest bank patches (k=1: the paper's).

    Returns ``(scores, nearest_ids)``; ``nearest_ids`` is the single nearest bank entry per patch.
    """
    scores, nearest = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for s in range(0, len(queries), SEARCH_BLOCK):
        dist, ids = search(index, queries[s : s + SEARCH_BLOCK], k)
        scores[s : s + len(dist)], nearest[s : s + len(dist)] = dist.mean(axis=1), ids[:, 0]
    return scores, nearest


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
