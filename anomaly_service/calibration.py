"""Decision threshold and score normalization from normal images only.

A plant has no labelled defects at first fit, so the threshold comes from normal images the bank has not seen: every
training image scored against the bank without its own patches (leave-one-out, the default), or images held out of
the bank. With enough of them (``TAIL_MIN_IMAGES``) the threshold is the score a good part exceeds with probability
``TAIL_P``, from an exponential fit to the tail of their scores (peaks over the 80th percentile): a tail fit
extrapolates past the largest score seen, so the threshold does not creep up with the number of images as the
largest score does. Exponential, not a generalized Pareto fit with a shape of its own: the peaks of a few hundred
images do not pin a shape down, and the fitted shape moved the threshold of two fits of the same images by up to a
third (the coreset's sampling moves a few scores, and the shape follows them). With fewer images (or a degenerate
fit) it is ``max(mean + z * std, max)`` of their scores (z=3 by default). docs/decisions.md has the measurements.
Normalized scores are ``(s - floor) / (threshold - floor)`` with ``floor`` the median *pixel* score of those
images, so 1.0 is the threshold and 0 a typical normal pixel; the same affine map colors every heatmap, which
keeps one global color scale across images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass
class Calibration:
    threshold: float
    floor: float
    method: str
    n_images: int
    # one number per calibration image (thousands on a line), left out of the repr: a notebook showing a score's
    # result printed them all
    holdout_scores: list[float] = field(default_factory=list, repr=False)
    # each held-out image's typical patch distance to the bank: the drift monitor's reference (drift.py)
    holdout_distances: list[float] = field(default_factory=list, repr=False)
    # how the maps' pixels were sampled for the floor and the distances (map_sample.py); flat: fitted before grid
    pixel_sample: str = "flat"

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        return (score - self.floor) / (self.threshold - self.floor)

    def to_dict(self) -> dict:
        return asdict(self)


# the good part's chance to exceed the threshold, on the calibration images' distribution: new parts sit a little
# further out than training images, so this is set well below the false-alarm rate a plant can live with
TAIL_P = 0.002
TAIL_MIN_IMAGES = 50  # fewer scores than this leave too few exceedances for a tail fit
TAIL_FROM = 0.8  # the tail is the scores above this quantile


def _peaks(scores: np.ndarray) -> tuple[float, np.ndarray] | None:
    """The ``TAIL_FROM`` quantile of ``scores`` and their excesses over it; None when too few scores or peaks, or
    no spread among the peaks, leave a tail to fit."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < TAIL_MIN_IMAGES:
        return None
    u = float(np.quantile(s, TAIL_FROM))
    excess = s[s > u] - u
    return (u, excess) if excess.size >= 5 and np.ptp(excess) > 0 else None


def tail_threshold(scores: np.ndarray, p: float = TAIL_P) -> float | None:
    """The score exceeded with probability ``p`` by an exponential fit to the peaks over the ``TAIL_FROM`` quantile
    (their mean is the maximum-likelihood scale); None when there is no tail to fit (:func:`_peaks`)."""
    peaks = _peaks(scores)
    if peaks is None:
        return None
    u, excess = peaks
    t = u + float(excess.mean()) * math.log((1.0 - TAIL_FROM) / p)
    return t if math.isfinite(t) else None


def pareto_tail_threshold(scores: np.ndarray, p: float = TAIL_P) -> float | None:
    """As :func:`tail_threshold`, with a generalized Pareto fit (its shape by maximum likelihood too). The line's
    threshold used it until its shape was seen to swing between fits; the contamination guard keeps it, because
    on the same support scores it lists more of the planted defects (contamination.py says why that side wins)."""
    from scipy import stats

    peaks = _peaks(scores)
    if peaks is None:
        return None
    u, excess = peaks
    shape, _, scale = stats.genpareto.fit(excess, floc=0)
    t = u + float(stats.genpareto.ppf(1.0 - p / (1.0 - TAIL_FROM), shape, 0, scale))
    return t if np.isfinite(t) and t > u else None


TAILS = {"exponential": tail_threshold, "generalized Pareto": pareto_tail_threshold}


def threshold_rule(scores: np.ndarray, z: float = 3.0, tail: str = "exponential") -> tuple[float, str]:
    """The threshold for these unseen normal image scores, and how it was set (the module docstring says why);
    ``tail``: which of :data:`TAILS` fits the tail."""
    s = np.asarray(scores, dtype=np.float64)
    t = TAILS[tail](s)
    if t is not None:
        return t, f"{tail} tail fit, P(exceed)={TAIL_P:g}"
    return sigma_threshold(s, z), f"max(mean+{z:g}*std, max)"


def sigma_threshold(scores: np.ndarray, z: float) -> float:
    """``max(mean + z * std, max)`` of ``scores``: the rule below the tail fit's image count, and every threshold's
    before it."""
    s = np.asarray(scores, dtype=np.float64)
    std = float(s.std(ddof=1)) if s.size > 1 else 0.0
    return max(float(s.mean()) + z * std, float(s.max()))


def just_above(floor: float) -> float:
    """The threshold where the rule fell to the floor (degenerate scores): a finite, positive scale above it."""
    return floor + max(abs(floor), 1.0) * 1e-3


def calibrate(image_scores: np.ndarray, pixel_scores: np.ndarray, z: float = 3.0, pixel_sample: str = "flat"
              ) -> Calibration:
    """Threshold and normalization from unseen normal images' scores and a sample of their pixel scores, taken
    from each map as ``pixel_sample`` says (map_sample.py)."""
    s = np.asarray(image_scores, dtype=np.float64)
    if s.size == 0:
        raise ConfigError("calibration needs at least one held-out normal image")
    threshold, method = threshold_rule(s, z)
    floor = float(np.median(pixel_scores))
    if not threshold > floor:  # degenerate (e.g. identical images): keep the scale finite and positive
        threshold = just_above(floor)
    return Calibration(threshold=threshold, floor=floor, method=f"{method} of {s.size} unseen normals",
                       n_images=int(s.size), holdout_scores=[float(v) for v in s], pixel_sample=pixel_sample)


def threshold_problem(cal: Calibration, z: float, learnt: float | None = None) -> str | None:
    """Why ``cal``'s threshold is none that a fit or an update sets from its own ``holdout_scores``, or None.

    Every release sets a threshold by one rule over the scores it keeps beside it: the exponential tail (the
    generalized Pareto one in the releases before it, named in ``method``), ``max(mean + z * std, max)`` (``z``:
    the model's ``threshold_sigma``), or just above the floor when that rule falls below it; the whole-image branch's
    may be raised to its ``learnt`` bound. So a threshold edited on its own is told from an honest one: 1e5 against
    scores near 20 passed every part. A model that kept no scores has nothing to check against."""
    s = np.asarray(cal.holdout_scores, dtype=np.float64)
    if not s.size:
        return None
    rules = [threshold_rule(s, z)[0], sigma_threshold(s, z)]
    exact = rules + ([learnt] if learnt is not None else [])
    # just above the floor, where the rule fell to it: the floor is a median of pixels of the same maps, none above
    # its map's score, so it lies at or below the highest score (else a floor edited up with the threshold passed)
    if min(rules) <= cal.floor <= float(s.max()) + 1e-6 * abs(float(s.max())):
        exact.append(just_above(cal.floor))
    if any(math.isclose(cal.threshold, t, rel_tol=1e-9, abs_tol=1e-12) for t in exact):
        return None
    if "generalized Pareto" in cal.method:  # an optimizer's fit: scipy's versions may move its last digits
        pareto = pareto_tail_threshold(s)
        if pareto is not None and math.isclose(cal.threshold, pareto, rel_tol=0.01):
            return None
    return (f"threshold {cal.threshold:.6g} is not what its {s.size} holdout_scores (up to {s.max():.6g}) give by "
            f"any calibration rule ({exact[0]:.6g} by this release's)")
