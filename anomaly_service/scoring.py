"""Patch and image anomaly scores from kNN distances to the memory bank (PatchCore Sec. 3.3)."""

from __future__ import annotations

import faiss
import numpy as np

from .errors import ConfigError
from .index import search

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
    anomaly_map: np.ndarray | None = None,
) -> float:
    """Image score: the smoothed ``anomaly_map``'s maximum (``map-max``), or from the raw patch scores their
    maximum (``max``, the paper's), optionally reweighted as in the paper's Eq. 7 (``reweighted``).

    ``map-max`` flags a part exactly when some pixel of its heatmap crosses the threshold, so decision and heatmap
    agree; the raw maximum sits above the smoothed map's and can flag a part whose heatmap stays below it.
    Reweighting scales the max by ``1 - softmax(d)[0]``, ``d`` the distances from the test patch to ``m*`` (its
    nearest bank patch) and to ``m*``'s ``b`` nearest bank neighbours: when ``m*`` is itself isolated in the bank
    (a rare normal pattern, or a poor match) the weight nears 1; in a dense region it drops towards ``1 - 1/b``.
    """
    if mode not in IMAGE_SCORE_MODES:
        raise ConfigError(f"unknown image score {mode!r}; choose one of {', '.join(IMAGE_SCORE_MODES)}")
    if mode == "map-max":
        if anomaly_map is None:
            raise ValueError("image score map-max needs the anomaly map")
        return float(anomaly_map.max())
    i = int(np.argmax(scores))
    s_max = float(scores[i])
    if mode == "max":
        return s_max
    m_star = index.reconstruct(int(nearest_ids[i]))
    b = min(neighbours, index.ntotal)
    _, nb_ids = search(index, m_star[None, :], b)
    nb = np.stack([index.reconstruct(int(j)) for j in nb_ids[0] if j >= 0])
    d = np.linalg.norm(nb - queries[i][None, :], axis=1)
    d = d - d.max()  # softmax is shift-invariant; this keeps exp() finite for large distances
    w = np.exp(d) / np.exp(d).sum()
    return float((1.0 - w[0]) * s_max)
