"""Quality metrics: image AUROC, pixel AUROC and PRO (the MVTec AD per-region-overlap score).

AUROC comes from scikit-learn. PRO follows Bergmann et al. (MVTec AD, IJCV 2021): the mean, over every connected
ground-truth region (8-connectivity), of the fraction of that region above a threshold, plotted against the
false-positive rate over all defect-free pixels; the area under that curve up to FPR 0.3, divided by 0.3. It is
computed exactly, at every distinct score, from one sort of all pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def image_roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def pixel_auroc(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    y = np.concatenate([(m > 0).ravel() for m in masks])
    if y.all() or not y.any():
        return float("nan")
    s = np.concatenate([a.ravel() for a in maps]).astype(np.float32)
    return float(roc_auc_score(y, s))


def pro_curve(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at every distinct score threshold, from high to low threshold (both increasing)."""
    scores, weights, normal = [], [], []
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for amap, mask in zip(maps, masks):
        m = mask > 0
        labels, n = ndimage.label(m, structure=structure)
        w = np.zeros(m.shape, dtype=np.float64)
        if n:
            sizes = np.bincount(labels.ravel())
            w[m] = 1.0 / sizes[labels[m]]
        n_regions += n
        scores.append(amap.ravel())
        weights.append(w.ravel())
        normal.append(~m.ravel())
    s = np.concatenate(scores)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    w = np.concatenate(weights)[order]
    nrm = np.concatenate(normal)[order]
    n_normal = nrm.sum()
    if n_regions == 0 or n_normal == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 0.0])
    fpr = np.cumsum(nrm) / n_normal
    pro = np.cumsum(w) / n_regions
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last pixel of each run of equal scores
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def pro_score(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalized area under the PRO curve for FPR in ``[0, fpr_limit]`` (1.0 is perfect)."""
    if not any((m > 0).any() for m in masks):
        return float("nan")
    fpr, pro = pro_curve(maps, masks)
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size and x[-1] < fpr_limit:  # interpolate the curve's value at the limit
        x1, x2, y1, y2 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_lim = y1 + (y2 - y1) * (fpr_limit - x1) / (x2 - x1) if x2 > x1 else y2
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)
