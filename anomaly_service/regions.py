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
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    # Every component lies in the box that holds every pixel at the level, and labelled there it gets the same
    # number (the box keeps the pixels' reading order): a line camera's photo with a small defect labels the
    # defect's box, not its many megapixels.
    top, left = int(rows[0]), int(cols[0])
    labels, n = ndimage.label(mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1],
                              structure=np.ones((3, 3), dtype=bool))
    peak_y, peak_x = np.unravel_index(int(np.argmax(normalized_map)), normalized_map.shape)
    in_box = 0 <= peak_y - top < labels.shape[0] and 0 <= peak_x - left < labels.shape[1]
    hottest = int(labels[peak_y - top, peak_x - left]) if in_box else 0  # 0 where the map's maximum is NaN
    regions = []
    # Per-component work on each component's bounding box only: whole-image label statistics would scan the full
    # map once per component, so a large map with many small components would cost far more than its regions.
    for i, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):  # label numbers 1..n, each one found
        inside = labels[ys, xs] == i
        area = int(inside.sum())
        if area < min_area and i != hottest:
            continue
        y0, y1, x0, x1 = ys.start + top, ys.stop + top, xs.start + left, xs.stop + left
        values = np.where(inside, normalized_map[y0:y1, x0:x1], -np.inf)
        py, px = np.unravel_index(int(np.argmax(values)), values.shape)
        regions.append(Region(x=int(x0), y=int(y0), width=int(x1 - x0), height=int(y1 - y0), area=area,
                              peak_score=float(values[py, px]), peak_x=int(x0 + px), peak_y=int(y0 + py)))
    regions.sort(key=lambda r: -r.peak_score)
    return regions[:max_regions]
