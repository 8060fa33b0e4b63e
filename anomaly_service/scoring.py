"""Patch and image anomaly scores from kNN distances to the memory bank (PatchCore Sec. 3.3)."""

from __future__ import annotations

import faiss
import numpy as np

from .errors import ConfigError
from .index import search

# map-max: the maximum of the smoothed anomaly map (computed where the map is, in model.py), so a part is flagged
# exactly when some pixel of its heatmap crosses the threshold; max / reweighted: from the raw patch scores
IMAGE_SCORE_MODES = ("map-max", "max", "reweighted")


def patch_scores(index: faiss.Index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Score of each query patch = mean L2 distance to its ``k`` nearest bank patches (k=1: the paper's).

    Returns ``(scores, nearest_ids)``; ``nearest_ids`` is the single nearest bank entry per patch.
    """
    dist, ids = search(index, queries, k)
    return dist.mean(axis=1), ids[:, 0]


def image_score(
    scores: np.ndarray,
    queries: np.ndarray,
    nearest_ids: np.ndarray,
    index: faiss.Index,
    mode: str = "max",
    neighbours: int = 9,
) -> float:
    """Image score from its patch scores: the maximum, optionally reweighted as in the paper's Eq. 7.

    Reweighting scales the max by ``1 - softmax(d)[0]``, ``d`` the distances from the test patch to ``m*`` (its
    nearest bank patch) and to ``m*``'s ``b`` nearest bank neighbours: when ``m*`` is itself isolated in the bank
    (a rare normal pattern, or a poor match) the weight nears 1; in a dense region it drops towards ``1 - 1/b``.
    """
    i = int(np.argmax(scores))
    s_max = float(scores[i])
    if mode == "max":
        return s_max
    if mode != "reweighted":
        raise ConfigError(f"unknown patch-level image score {mode!r}; choose max or reweighted")
    m_star = index.reconstruct(int(nearest_ids[i]))
    b = min(neighbours, index.ntotal)
    _, nb_ids = search(index, m_star[None, :], b)
    nb = np.stack([index.reconstruct(int(j)) for j in nb_ids[0] if j >= 0])
    d = np.linalg.norm(nb - queries[i][None, :], axis=1)
    d = d - d.max()  # softmax is shift-invariant; this keeps exp() finite for large distances
    w = np.exp(d) / np.exp(d).sum()
    return float((1.0 - w[0]) * s_max)
