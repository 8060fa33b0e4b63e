"""The guard on what goes into ./good: training images that look unlike the other good ones.

Leave-one-out calibration (model.py) scores every training image against the bank built from the others. A
defective part hidden among the good ones has patches no other image has, so its leave-one-out score stands out;
once in the bank, its defect would never be flagged again. A training image is a suspect when its score is above
the threshold the others set (calibration.threshold_rule): it would be flagged if it arrived on the line. So that
the suspects do not raise the bar they are judged by, the threshold is set without the clear outliers first
(robust z of the log score above ``SCREEN_Z``). ``warn`` lists the suspects, ``drop`` re-fits without them,
``fail`` stops the fit; they never enter the calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# robust z (MAD-sigmas of the log score) past which an image is kept out of the threshold it is judged by
SCREEN_Z = 3.0
# a training image's patches are judged against the bank without their own image and the SUPPORT other images
# nearest to each: a defect must look like no more than SUPPORT other training images to stand out
SUPPORT = 3


@dataclass(frozen=True)
class Suspect:
    """One training image the guard flags: its leave-one-out score and how far above the rest it sits."""

    name: str
    score: float
    z: float  # robust z of its log score among all training images
    ratio: float  # its score over the median training image's
    threshold: float  # the threshold the other images set

    def to_dict(self) -> dict:
        return asdict(self)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(log s - median) / (1.4826 * MAD) over the log scores: scale-free, and blind to a few outliers."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med))) * 1.4826
    return (logs - med) / max(mad, 1e-9)


def find_suspects(scores: Sequence[float], names: Sequence[str], z: float = 3.0) -> list[Suspect]:
    """Training images whose leave-one-out score is above the threshold the others set, worst first.

    ``z``: the fallback rule's sigma (calibration.threshold_rule) when there are too few images for a tail fit."""
    from .calibration import threshold_rule

    s = np.asarray(scores, dtype=np.float64)
    if s.size < 5:  # too few to tell an outlier from the spread
        return []
    zs = robust_z(s)
    threshold, _ = threshold_rule(s[zs <= SCREEN_Z], z)
    med = float(np.median(s))
    out = [Suspect(name=names[i], score=float(s[i]), z=round(float(zs[i]), 2), ratio=round(float(s[i] / med), 3),
                   threshold=float(threshold)) for i in np.flatnonzero(s > threshold)]
    return sorted(out, key=lambda x: -x.score)
