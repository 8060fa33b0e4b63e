"""Decision threshold and score normalization from normal images only.

A plant has no labelled defects at first fit, so the threshold comes from normal images held out of the
memory bank: ``threshold = max(mean + z * std, max)`` of their image scores (z=3 by default), i.e. above every
held-out normal and ~3 sigma above their mean. Normalized scores are ``(s - floor) / (threshold - floor)``
with ``floor`` the median held-out *pixel* score, so 1.0 is the threshold and 0 a typical normal pixel; the same
affine map colors every heatmap, which keeps one global color scale across images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass
class Calibration:
    threshold: float
    floor: float
    method: str
    n_images: int
    holdout_scores: list[float] = field(default_factory=list)
    # each held-out image's typical patch distance to the bank: the drift monitor's reference (drift.py)
    holdout_distances: list[float] = field(default_factory=list)

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        return (score - self.floor) / (self.threshold - self.floor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in ("threshold", "floor", "method", "n_images", "holdout_scores")},
                   holdout_distances=list(d.get("holdout_distances", [])))


def calibrate(image_scores: np.ndarray, pixel_scores: np.ndarray, z: float = 3.0) -> Calibration:
    """Threshold and normalization from held-out normal image scores and a sample of their pixel scores."""
    s = np.asarray(image_scores, dtype=np.float64)
    if s.size == 0:
        raise ConfigError("calibration needs at least one held-out normal image")
    std = float(s.std(ddof=1)) if s.size > 1 else 0.0
    threshold = max(float(s.mean()) + z * std, float(s.max()))
    floor = float(np.median(pixel_scores))
    if not threshold > floor:  # degenerate (e.g. identical images): keep the scale finite and positive
        threshold = floor + max(abs(floor), 1.0) * 1e-3
    return Calibration(threshold=threshold, floor=floor, method=f"max(mean+{z:g}*std, max) of held-out normals",
                       n_images=int(s.size), holdout_scores=[float(v) for v in s])
