"""The guard on what goes into ./good: training images that look unlike the other good ones.

Leave-one-out calibration (fitting.py) scores every training image against the bank built from the others. A
defective part hidden among the good ones has patches no other image has, so its score stands out; once in the
bank, its defect would never be flagged again. But defects come in kinds: two or three scratches of one kind in
./good each find the others' patches under leave-one-out and score low (they cover each other). So the guard reads
each image's support score instead (knn_scorer.py): every patch against the bank without its own image and the
``SUPPORT`` other images nearest to it. A normal patch has many images like it and barely moves; a defect shared by
a few images loses its cover. A training image is a suspect when its support score is above the threshold the
others set (calibration.threshold_rule): the line's rule, but with the generalized Pareto tail (``GUARD_TAIL``),
which lists more planted defects than the line's exponential one; and, so that a tight set's clean images a few
percent above its median are not listed, at least ``MIN_RATIO`` times the median. So
that the suspects do not raise the bar they are judged by, the threshold is set without the outliers first (robust
z of the log score above ``SCREEN_Z``: 3, as at 5 the 5-10% planted defects of the benchmark kept enough weight in
the tail fit to hide themselves). ``warn`` lists the suspects, ``drop`` re-fits without them, ``fail`` stops the
fit. The calibration's threshold stays on the plain leave-one-out scores, without the images those mark as
outliers (``CALIBRATION_SCREEN_Z``). docs/decisions.md has the measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# robust z (MAD-sigmas of the log score) past which an image is kept out of the threshold it is judged by
SCREEN_Z = 3.0
# the calibration leaves out only the images plain leave-one-out marks as outliers at this robust z: the support
# score also lists clean images of a heavy-tailed set, and leaving those out of the threshold would lower it and
# raise the false alarms on the line
CALIBRATION_SCREEN_Z = 5.0
# a training image's patches are judged against the bank without their own image and the SUPPORT other images
# nearest to each: a defect must look like no more than SUPPORT other training images to stand out
SUPPORT = 3
MIN_IMAGES = 5  # fewer training images than this are too few to tell an outlier from the spread
# the least spread (of the log score) the robust z divides by: the same image's score moves by about this much
# between two fits of the same images (the coreset's sampling), so a tighter spread is the fit's noise, and most
# images of a tight cluster would otherwise sit "3 sigma" from its median (docs/decisions.md)
MIN_SPREAD = 0.02
# the least a suspect's score must exceed the median training image's, as a factor: on a tight set the spread floor
# alone lists clean images a few percent above the median, which are neither unlike the others in practice nor a
# risk to the bank; every planted defect the guard caught in the measurements scored further out
# (docs/decisions.md)
MIN_RATIO = 1.10
# the guard's threshold keeps the generalized Pareto tail the line's threshold left (calibration.py): on the same
# support scores the exponential tail listed fewer clean images but fewer planted defects too, and the two errors
# do not cost the same. A defect let into the bank is never flagged again; a clean image listed costs a look (with
# drop, one good image fewer). docs/decisions.md has the measurements
GUARD_TAIL = "generalized Pareto"


@dataclass(frozen=True)
class Suspect:
    """One training image the guard flags: its leave-one-out score and how far above the rest it sits."""

    name: str
    score: float  # its support score (the module docstring says what it is)
    z: float  # robust z of its log score among all training images
    ratio: float  # its score over the median training image's
    threshold: float  # the threshold the other images set

    def to_dict(self) -> dict:
        return asdict(self)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(log s - median) / (1.4826 * MAD) over the log scores: scale-free, and blind to a few outliers. The spread
    is at least :data:`MIN_SPREAD`."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med))) * 1.4826
    return (logs - med) / max(mad, MIN_SPREAD)


def threshold_sample(scores: Sequence[float], names: Sequence[str], z: float) -> tuple[list[str], list[int]]:
    """What a line threshold is set from: the names of the images plain leave-one-out marks as outliers (robust z
    past :data:`CALIBRATION_SCREEN_Z`, then above the threshold the rest set), sorted, and the places of the
    others (of all, should every image be an outlier). ``z``: the fallback rule's sigma."""
    outliers = {s.name for s in find_suspects(scores, names, z, screen_z=CALIBRATION_SCREEN_Z)}
    return sorted(outliers), [j for j, name in enumerate(names) if name not in outliers] or list(range(len(names)))


def find_suspects(scores: Sequence[float], names: Sequence[str], z: float = 3.0, screen_z: float = SCREEN_Z,
                  min_ratio: float = 1.0, tail: str = "exponential") -> list[Suspect]:
    """Training images whose (support) score is above the threshold the others set, worst first.

    ``z``: the fallback rule's sigma (calibration.threshold_rule) when there are too few images for a tail fit;
    ``screen_z``: the robust z past which an image is set aside before that threshold is fitted; ``min_ratio``:
    the least factor over the median score a listed image must reach (the guard passes :data:`MIN_RATIO`);
    ``tail``: the tail fit that sets the threshold (the guard passes :data:`GUARD_TAIL`)."""
    from .calibration import threshold_rule

    s = np.asarray(scores, dtype=np.float64)
    if s.size < MIN_IMAGES:  # too few to tell an outlier from the spread
        return []
    zs = robust_z(s)
    threshold, _ = threshold_rule(s[zs <= screen_z], z, tail)
    med = float(np.median(s))
    out = [Suspect(name=names[i], score=float(s[i]), z=round(float(zs[i]), 2), ratio=round(float(s[i] / med), 3),
                   threshold=float(threshold)) for i in np.flatnonzero((s > threshold) & (s >= min_ratio * med))]
    return sorted(out, key=lambda x: -x.score)
