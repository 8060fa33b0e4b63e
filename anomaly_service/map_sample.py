"""The pixels of a map that stand for all of it. The calibration's floor, the drift monitor's typical distance and
the level given to uninspected pixels each read about :data:`SAMPLE_SIZE` pixels of a map, not all of it.

Models fitted before ``grid`` took every k-th pixel in reading order (``flat``). On a map whose width is a small
multiple of k (1024 or 2448 px wide at the photo's size) that is two to four whole columns, one of them the
frame's left edge: the typical distance a line camera's drift is judged by read a sliver of the part. ``grid``
takes every few rows and columns over the whole frame. A model keeps the kind it was fitted with, since its drift
reference and floor were read that way.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_SIZE = 4096
KINDS = ("flat", "grid")  # grid: models fitted since it; flat: those fitted before (their manifests say none)
FITTED = "grid"


def sample(amap: np.ndarray, kind: str) -> np.ndarray:
    """About :data:`SAMPLE_SIZE` pixels of ``amap`` (1-D, at most twice that). A 1-D array is a sample already (a
    fit keeps each calibration map's sample only) and is read as ``flat``, which leaves one of under twice
    :data:`SAMPLE_SIZE` values whole: sampling a sample changes nothing."""
    if kind not in KINDS:
        raise ValueError(f"unknown pixel sample {kind!r}; one of {', '.join(KINDS)}")
    a = np.asarray(amap)
    if kind == "grid" and a.ndim == 2 and a.size > SAMPLE_SIZE:
        rows, cols = a.shape
        # the frame's own proportions, at most one column's worth of rows: a strip thinner than that takes one
        # column, and rows counted for a fraction of a column made its sample grow with its length
        n_rows = min(rows, SAMPLE_SIZE, max(1, round(math.sqrt(SAMPLE_SIZE * rows / cols))))
        n_cols = min(cols, math.ceil(SAMPLE_SIZE / n_rows))
        return np.ascontiguousarray(a[:: math.ceil(rows / n_rows), :: math.ceil(cols / n_cols)]).ravel()
    flat = a.ravel()
    return flat[:: max(1, flat.size // SAMPLE_SIZE)]


def typical_distance(anomaly_map: np.ndarray, kind: str) -> float:
    """A part's typical patch distance to the bank: the median of its raw map, sampled as the model's reference was.
    Here, not in drift.py, because the decision computes it for the calibration images (the drift reference) and
    the decision comes before the monitor that reads it."""
    return float(np.median(sample(anomaly_map, kind)))
