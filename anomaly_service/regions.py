"""Regions above the threshold as bounding boxes, so a dashboard can draw boxes without decoding a heatmap.

A region is a connected component (8-connectivity) of the normalized anomaly map at or above 1.0 (the model's
calibrated threshold). Boxes are in the uploaded image's pixel coordinates, largest peak first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from .evidence import NearestNormal


@dataclass(frozen=True)
class Region:
    x: int  # left, pixels
    y: int  # top, pixels
    width: int
    height: int
    area: int  # pixels above the level inside the component
    peak_score: float  # highest normalized score in the region (1.0 = threshold)
    peak_x: int
    peak_y: int
    # the closest good region seen in training (evidence.py); None when the model keeps no evidence
    nearest_normal: NearestNormal | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_regions(normalized_map: np.ndarray, level: float = 1.0, min_area: int = 16,
                 max_regions: int = 20) -> list[Region]:
    """Connected components of ``normalized_map >= level`` with at least ``min_area`` pixels, and the one holding
    the map's hottest pixel however small: that pixel is the part's score (map-max), so a part flagged by a peak
    just over the threshold, whose area above it is a few pixels, was an anomaly with no region to show where."""
    mask = normalized_map >= level
    if not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    hottest = int(labels.flat[int(np.argmax(normalized_map))])  # 0 where the map's maximum is NaN
    regions = []
    # Per-component work on each component's bounding box only: whole-image label statistics would scan the full
    # map once per component, so a large map with many small components would cost far more than its regions.
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):  # label numbers 1..n, each one found
        inside = labels[sl] == i
        area = int(inside.sum())
        if area < min_area and i != hottest:
            continue
        values = np.where(inside, normalized_map[sl], -np.inf)
        py, px = np.unravel_index(int(np.argmax(values)), values.shape)
        ys, xs = sl
        regions.append(Region(x=int(xs.start), y=int(ys.start), width=int(xs.stop - xs.start),
                              height=int(ys.stop - ys.start), area=area, peak_score=float(values[py, px]),
                              peak_x=int(xs.start + px), peak_y=int(ys.start + py)))
    regions.sort(key=lambda r: -r.peak_score)
    return regions[:max_regions]
