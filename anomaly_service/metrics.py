"""Quality metrics: image AUROC, pixel AUROC and PRO (the MVTec AD per-region-overlap score).

Image AUROC comes from scikit-learn; pixel AUROC is the same statistic computed from sorts (tens of millions of
pixels). PRO follows Bergmann et al. (MVTec AD, IJCV 2021): the mean, over every connected ground-truth region
(8-connectivity), of the fraction of that region above a threshold, plotted against the false-positive rate over
all defect-free pixels; the area under that curve up to FPR 0.3, divided by 0.3. It is computed exactly, at every
distinct score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
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
    """Exact pixel AUROC as the Mann-Whitney statistic (ties count half), from sorts rather than an argsort.

    A test split holds tens of millions of pixels: numpy's vectorised sort of the values is many times faster than
    the argsort behind ``roc_auc_score``, and the value is the same (the trapezoid under the ROC equals it). Maps
    are compared as float32, as the model makes them; a NaN is refused, as scikit-learn refuses it."""
    negative, positive = _split_pixels(maps, masks)
    if negative.size == 0 or positive.size == 0:
        return float("nan")
    negative.sort()
    positive.sort()  # sorted queries keep the searches in cache
    below = np.searchsorted(negative, positive, side="left").sum(dtype=np.float64)
    at_or_below = np.searchsorted(negative, positive, side="right").sum(dtype=np.float64)
    return float((below + at_or_below) / 2.0 / (positive.size * negative.size))


def _split_pixels(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every map's values (float32) outside its mask and inside it, each side in one array filled map by map: a
    validation set of megapixel photos holds billions of bytes of maps, and concatenating them, then casting and
    splitting the copy, held three more copies of every pixel at once. A NaN is refused."""
    inside = [int(np.count_nonzero(np.asarray(m) > 0)) for m in masks]
    negative = np.empty(sum(np.asarray(a).size for a in maps) - sum(inside), np.float32)
    positive = np.empty(sum(inside), np.float32)
    at_negative = at_positive = 0
    for amap, mask, n_inside in zip(maps, masks, inside):
        a = _float_map(amap)
        m = np.asarray(mask) > 0
        negative[at_negative:at_negative + a.size - n_inside] = a[~m]
        positive[at_positive:at_positive + n_inside] = a[m]
        at_negative += a.size - n_inside
        at_positive += n_inside
    return negative, positive


def _float_map(amap: np.ndarray) -> np.ndarray:
    """A map as the metrics compare it: float32, as the model makes it; a NaN is refused, as scikit-learn refuses
    it."""
    a = np.asarray(amap, dtype=np.float32)
    if np.isnan(a).any():
        raise ValueError("anomaly maps contain NaN")
    return a


def numbered_regions(mask: np.ndarray) -> np.ndarray:
    """A defect mask's regions as PRO counts them (8-connected), numbered from 1 (int32, 0: no defect): carried
    through a turn or a cut (``Turn.regions``) and given to :func:`pro_score` as ``regions``."""
    return ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), dtype=bool))[0].astype(np.int32)


_CURVE_BLOCK = 1 << 16  # thresholds read at a time by pro_curve


def pro_curve(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float | None = None,
              regions: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at every distinct score threshold, from high to low threshold (both increasing).

    With ``fpr_limit``, the curve stops at the first point past it (all that the area up to the limit needs).
    ``regions``: per mask, its defect regions already numbered (0: no defect; a number may label pixels that no
    longer touch), used instead of the mask's own 8-connected regions. A region labelled before a resampling that
    breaks it (a thin crack turned by nearest neighbour) then stays one region, as it was on the part.
    Maps are compared as float32, as the model makes them; a NaN is refused, as :func:`pixel_auroc` refuses it.
    Normal pixels only move the FPR and defect pixels only the PRO, so each side is sorted on its own (a value sort
    for the many normal pixels, an argsort only for the few defect ones) and read at every threshold by search."""
    defect_scores, weights = [], []
    n_regions = 0
    # the normal pixels, the many, filled into one array map by map and sorted in place (as pixel_auroc's)
    normal = np.empty(sum(np.asarray(a).size for a in maps)
                      - sum(int(np.count_nonzero(np.asarray(m if regions is None else regions[i]) > 0))
                            for i, m in enumerate(masks)), np.float32)
    at = 0
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        a = _float_map(amap)
        numbered = numbered_regions(mask) if regions is None else regions[i]
        m = numbered > 0
        _, index = np.unique(numbered[m], return_inverse=True)  # numbers from 1 without gaps, for bincount
        index = index.ravel() + 1
        n = int(index.max()) if index.size else 0
        if n:
            sizes = np.bincount(index)
            defect_scores.append(a[m])
            weights.append(1.0 / sizes[index])
        n_regions += n
        outside = a.size - int(np.count_nonzero(m))
        normal[at:at + outside] = a[~m]
        at += outside
    normal.sort()  # ascending
    if n_regions == 0 or normal.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 0.0])
    defect = np.concatenate(defect_scores)
    order = np.argsort(defect)
    defect, weight = defect[order], np.concatenate(weights)[order]
    weight_at_or_above = np.r_[np.cumsum(weight[::-1])[::-1], 0.0]  # [i]: total weight of defect[i:]
    lowest = min(normal[0], defect[0])  # a region has at least one pixel, so defect is not empty
    if fpr_limit is not None:  # the threshold at which more than fpr_limit of the normal pixels lie at or above it
        k = min(normal.size - 1, int(np.floor(fpr_limit * normal.size)))
        lowest = normal[normal.size - 1 - k]
    # distinct, high first; each side sorted, so what lies at or above ``lowest`` is its tail (a view, not a copy)
    candidates = np.concatenate([normal[np.searchsorted(normal, lowest, side="left"):],
                                 defect[np.searchsorted(defect, lowest, side="left"):]])
    candidates.sort()  # in place: np.unique sorts a copy of its own
    distinct = np.empty(candidates.size, bool)
    distinct[:1] = True
    np.not_equal(candidates[1:], candidates[:-1], out=distinct[1:])
    thresholds = candidates[distinct][::-1]
    del candidates, distinct
    # a threshold for each of up to fpr_limit of the normal pixels: the curve is written into its own arrays behind
    # its leading 0, a block of thresholds at a time, where whole-curve temporaries and copies outweighed the pixels
    fpr, pro = np.zeros(thresholds.size + 1), np.zeros(thresholds.size + 1)
    for start in range(0, thresholds.size, _CURVE_BLOCK):
        block = thresholds[start:start + _CURVE_BLOCK]
        end = start + 1 + block.size
        fpr[start + 1:end] = normal.size - np.searchsorted(normal, block, side="left")
        pro[start + 1:end] = weight_at_or_above[np.searchsorted(defect, block, side="left")]
    fpr[1:] /= normal.size
    pro[1:] /= n_regions
    return fpr, pro


def pro_score(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3,
              regions: list[np.ndarray] | None = None) -> float:
    """Normalized area under the PRO curve for FPR in ``[0, fpr_limit]`` (1.0 is perfect); ``regions`` as in
    :func:`pro_curve`."""
    if not any((m > 0).any() for m in (masks if regions is None else regions)):
        return float("nan")
    fpr, pro = pro_curve(maps, masks, fpr_limit, regions)
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size and x[-1] < fpr_limit:  # interpolate the curve's value at the limit, which lies between them
        x1, x2, y1, y2 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_lim = y1 + (y2 - y1) * (fpr_limit - x1) / (x2 - x1)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(trapezoid(y, x) / fpr_limit)  # numpy has one only from 2.0; the range admits 1.26
