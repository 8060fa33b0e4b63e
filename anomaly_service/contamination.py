"""The guard on what goes into ./good: training images that look unlike the other good ones.

Leave-one-out calibration (model.py) scores every training image against the bank built from the others. A
defective part hidden among the good ones has patches no other image has, so its leave-one-out score stands out
above the rest; once in the bank, its defect would never be flagged again. Outliers are judged on a robust scale
(median and median absolute deviation of the log scores), so the suspects themselves do not widen the yardstick
they are measured with. ``warn`` lists them, ``drop`` re-fits without them, ``fail`` stops the fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# robust z (in MAD-sigmas of the log score) above which a training image is a suspect (docs/decisions.md)
SUSPECT_Z = 5.0


@dataclass(frozen=True)
class Suspect:
    """One training image the guard flags: its leave-one-out score and how far above the rest it sits."""

    name: str
    score: float
    z: float  # robust z of its log score among all training images
    ratio: float  # its score over the median training image's

    def to_dict(self) -> dict:
        return asdict(self)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(log s - median) / (1.4826 * MAD) over the log scores: scale-free, and blind to a few outliers."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med))) * 1.4826
    return (logs - med) / max(mad, 1e-9)


def find_suspects(scores: Sequence[float], names: Sequence[str], z: float = SUSPECT_Z) -> list[Suspect]:
    """Training images whose leave-one-out score sits more than ``z`` robust sigmas above the rest, worst first."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 5:  # too few to tell an outlier from the spread
        return []
    zs = robust_z(s)
    med = float(np.median(s))
    out = [Suspect(name=names[i], score=float(s[i]), z=round(float(zs[i]), 2), ratio=round(float(s[i] / med), 3))
           for i in np.flatnonzero(zs > z)]
    return sorted(out, key=lambda x: -x.z)
