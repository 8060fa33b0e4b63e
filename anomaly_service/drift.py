"""Drift on the line: do the parts seen lately still look like the normal images the threshold was set on?

A camera that slowly loses focus, a lamp that ages, a fixture that shifts: every part drifts towards the threshold
(or the threshold stops meaning anything) long before parts are flagged. The monitor keeps, per model, a sliding
window of three cheap per-part quantities and compares each with the same quantity on the calibration images:

* the part's normalized image score (1.0 = threshold), which the decision already computes;
* the part's *typical* patch distance to the bank (the median of its raw kNN map): a whole-image statistic that
  moves with lighting, blur or a camera shift even when no single region stands out;
* the part's *feature distance* (image_map.py): its pooled feature's distance to the training images' mean,
  whitened over their main directions. A dimmer lamp or a lost contrast can leave every patch near some bank
  patch (the typical distance barely moves) while the image as a whole leaves the directions the training
  images vary in; its reference is the training images' out-of-fold distances.

Each comparison is a one-sided two-sample Kolmogorov-Smirnov test (scipy) of the window against the reference: does
the window sit *above* it (further from the training images)? The drift value is the largest KS statistic (0 = not
above, 1 = wholly above). One-sided because the reference is biased upwards: a training image scored leave-one-out
faces a bank that lost the rows chosen to cover it, so on a small fit the line's good parts sit below their
reference far enough to pass the effect floor, while every change a line suffers that was measured moved the
quantities up (docs/decisions.md). The alarm needs both a significant
difference (p-value below ``alpha``, with at least ``min_parts`` parts in the window) and a large one (statistic at
least ``min_effect``): with a full window any small, harmless difference between the calibration images and the
line's good parts becomes significant, while the changes a line suffers (light, focus, a moved camera) separate
the distributions almost completely (docs/benchmarks.md). benchmarks/drift.py measures the
detection delay and the false-alarm rate of this test against the population-stability index (docs/decisions.md).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .compression import learnt
from .map_sample import typical_distance

STATISTICS = ("normalized_score", "typical_distance", "feature_distance")
EXACT_PAIRS = 10_000  # window x reference sizes up to which the KS p-value is computed exactly


def feature_distance(image_map: Any, pooled: np.ndarray | None) -> float | None:
    """The part's feature distance on the model's image map (None: no map, no distance kept, no pooled feature)."""
    if image_map is None or pooled is None or np.shape(pooled) != (image_map.dim,):
        return None
    d = image_map.feature_distance(pooled)
    return None if d is None else float(d)


@dataclass(frozen=True)
class DriftStatus:
    """What dashboards and the page show for one model."""

    drift: float  # the largest one-sided KS statistic (the window above the reference) of the quantities, 0..1
    alarm: bool
    parts: int  # parts in the window
    window: int
    min_parts: int
    min_effect: float
    p_values: dict[str, float]
    statistics: dict[str, float]  # KS statistic per quantity
    window_median: dict[str, float]
    reference_median: dict[str, float]
    # parts each quantity's window holds: a part without a feature distance is left out of that window only, and a
    # quantity with fewer than min_parts has no say in the alarm, however large its statistic
    quantity_parts: dict[str, int]
    # the quantity that sounds the alarm, for a person to be told what moved (None: no alarm)
    driven_by: str | None
    # parts of the window that were JPEGs compressed harder than every good photo the model learnt, and the lowest
    # quality among them (None: none): compression alone moves the quantities of a model fitted on uncompressed
    # photos, so an alarm over such parts may be the line's encoding, not its camera, light or parts
    compressed_harder: int = 0
    lowest_quality: int | None = None
    fitted_quality: int | None = None  # the good photos' lowest JPEG quality, 100: none was a JPEG (compression.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compression_said(status: DriftStatus) -> str | None:
    """The words for an alarm over parts compressed harder than the good photos (None: none were): a client that
    saves its photos as JPEGs, or at a lower quality than the good ones were, moves every quantity the monitor tracks
    with no change at the camera, the light or the parts (docs/decisions.md), and an operator told to check those
    finds nothing."""
    if not status.compressed_harder or status.fitted_quality is None:
        return None
    said = (f"{status.compressed_harder} of the window's {status.parts} parts were JPEGs down to quality "
            f"{status.lowest_quality}, and the model's good photos were {learnt(status.fitted_quality)}: ")
    q = status.driven_by
    # the KS statistic is at most the share of the window that moved: where the compressed parts are a smaller share
    # than the alarm's statistic, the rest moved too, and the camera, the light and the parts are still to be looked at
    if q is not None and status.compressed_harder < status.statistics[q] * status.quantity_parts[q] - 1e-6:
        return said + (f"compression moves these quantities, but so few parts cannot move the {q} as far as it went "
                       f"(KS {status.statistics[q]:.2f} over {status.quantity_parts[q]} parts): check the camera, "
                       "lighting and the parts too.")
    return said + ("compression alone moves these quantities. Send the photos as the good ones were saved, or re-fit "
                   "on photos saved as these are.")


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """Population-stability index of ``window`` against ``reference`` over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if edges.size < 3:
        return 0.0
    inner = edges[1:-1]
    ref = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=inner.size + 1) / reference.size
    win = np.bincount(np.searchsorted(inner, window, side="right"), minlength=inner.size + 1) / window.size
    ref, win = np.clip(ref, 1e-4, None), np.clip(win, 1e-4, None)
    return float(np.sum((win - ref) * np.log(win / ref)))


class DriftMonitor:
    """Sliding-window drift of one model against its calibration images. Thread-safe; ``observe`` is O(1)."""

    alternative = "less"  # scipy's name for the window above the reference; benchmarks/drift.py compares "two-sided"

    def __init__(self, reference: dict[str, np.ndarray], window: int = 200, min_parts: int = 30,
                 alpha: float = 1e-3, min_effect: float = 0.7, distinct: bool = False,
                 fitted_quality: int | None = None):
        """``reference``: per quantity of STATISTICS, its values on the calibration images (models fitted before
        a quantity was recorded have none: only the quantities given are tracked). ``distinct``: a photo the window
        holds already is not counted again (:meth:`observe`), as the service's windows count parts.
        ``fitted_quality``: the good photos' lowest JPEG quality (None: unknown), against which the window's parts
        are told compressed harder."""
        finite = {k: np.asarray(v, dtype=np.float64) for k, v in reference.items() if k in STATISTICS}
        finite = {k: np.sort(v[np.isfinite(v)]) for k, v in finite.items()}
        self.reference = {k: v for k, v in finite.items() if len(v) >= 2}
        if not self.reference:
            raise ValueError("drift needs at least two reference values of one of " + ", ".join(STATISTICS))
        self.window, self.min_parts, self.alpha, self.min_effect = window, min_parts, alpha, min_effect
        self._recent: dict[str, deque[float]] = {s: deque(maxlen=window) for s in self.reference}
        # what each part of the window measured, to tell a photo sent again (a client's retry, a replay) from a part
        self._parts: deque[tuple[float | None, ...]] = deque(maxlen=window)
        self._counted: Counter[tuple[float | None, ...]] = Counter()
        self._qualities: deque[int | None] = deque(maxlen=window)  # each part's JPEG quality, as ``_parts``
        self.distinct, self.fitted_quality = distinct, fitted_quality
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, calibration: Any, image_map: Any = None, **kwargs: Any) -> "DriftMonitor":
        """A monitor whose reference is a model's calibration images (see decision.py) and, when its catalog
        keeps one, the training images' feature distances (image_map.py)."""
        ref = {"normalized_score": np.asarray(calibration.normalize(np.asarray(calibration.holdout_scores))),
               "typical_distance": np.asarray(calibration.holdout_distances)}
        if image_map is not None and image_map.distances is not None:
            ref["feature_distance"] = np.asarray(image_map.distances)
        return cls(ref, **kwargs)

    def observe(self, normalized_score: float, distance: float, feature_distance: float | None = None,
                jpeg_quality: int | None = None) -> bool:
        """One scored part; a quantity it lacks (no feature distance from a scorer without patch matches) is
        left out of that quantity's window only. ``jpeg_quality``: its file's (compression.jpeg_quality; None:
        unknown, an array). With ``distinct``, a photo the window holds already, its three
        quantities the same to the last bit (scoring gives one photo one answer), is one part sent again and is not
        counted again: a client's retry was a second part, and one photo resent in a loop filled the window. False
        for it."""
        values = {"normalized_score": normalized_score, "typical_distance": distance,
                  "feature_distance": feature_distance}
        part = tuple(None if v is None else float(v) for v in values.values())
        with self._lock:
            if self.distinct and self._counted[part]:
                return False
            if len(self._parts) == self._parts.maxlen:
                gone = self._parts[0]
                self._counted[gone] -= 1
                if not self._counted[gone]:
                    del self._counted[gone]
            self._parts.append(part)
            self._qualities.append(jpeg_quality)
            self._counted[part] += 1
            for s, d in self._recent.items():
                v = values[s]
                if v is not None and np.isfinite(v):
                    d.append(float(v))
        return True

    def reset(self) -> None:
        """Forget the window (after a re-fit or an acknowledged change on the line)."""
        with self._lock:
            for d in self._recent.values():
                d.clear()
            self._parts.clear()
            self._qualities.clear()
            self._counted.clear()

    def status(self) -> DriftStatus:
        with self._lock:
            recent = {s: np.fromiter(d, dtype=np.float64) for s, d in self._recent.items()}
            fitted = self.fitted_quality
            harder = [] if fitted is None else [q for q in self._qualities if q is not None and q < fitted]
        # imported here: scipy.stats takes longer to import than the rest of the package's own modules, and every
        # command and worker would pay for it at start-up while only drift status reads it
        from scipy.stats import ks_2samp

        n = max(len(v) for v in recent.values())
        stats, pvals, med = {}, {}, {}
        for s in self.reference:
            if len(recent[s]) >= 2:
                # "less": the window's distribution function lies below the reference's, its values above them. The
                # exact one-sided p-value fails (with a warning) on large samples, where the asymptotic one holds
                exact = len(recent[s]) * len(self.reference[s]) <= EXACT_PAIRS
                res = ks_2samp(recent[s], self.reference[s], alternative=self.alternative,
                               method="exact" if exact else "asymp")
                stats[s], pvals[s] = float(res.statistic), float(res.pvalue)
                med[s] = float(np.median(recent[s]))
            else:
                stats[s], pvals[s], med[s] = 0.0, 1.0, float("nan")
        decided = [s for s in stats if len(recent[s]) >= self.min_parts]  # a quantity with too few parts has no say
        drift = max((stats[s] for s in decided), default=0.0)
        alarming = [s for s in decided if pvals[s] < self.alpha and stats[s] >= self.min_effect]
        # of those that alarm, the one that moved most: a larger statistic on a short window may be chance
        driven_by = max(alarming, key=lambda s: stats[s], default=None)
        return DriftStatus(drift=drift, alarm=bool(alarming), parts=n, window=self.window, min_parts=self.min_parts,
                           min_effect=self.min_effect,
                           p_values=pvals, statistics=stats, window_median=med,
                           reference_median={s: float(np.median(v)) for s, v in self.reference.items()},
                           quantity_parts={s: len(recent[s]) for s in self.reference}, driven_by=driven_by,
                           compressed_harder=len(harder), lowest_quality=min(harder, default=None),
                           fitted_quality=fitted)


class DriftBook:
    """One monitor per served model, started from that model's calibration and restarted whenever the registry
    swaps in another version of it (re-fit, update, rollback): a new serving means a new window.

    Keyed by registry.ModelEntry.drift_window, not the version: an update rolled back to the same version would
    otherwise find its old window again, alarm included. Keys only grow, so the first part or read after a swap
    starts the new window, and a part of the replaced load that finishes late is left out of it. A load of the very
    version it replaces (files touched or copied again, a reload) keeps the key, and so the window and its alarm."""

    def __init__(self, window: int = 200, min_parts: int = 30, alpha: float = 1e-3, min_effect: float = 0.7):
        self.window, self.min_parts, self.alpha, self.min_effect = window, min_parts, alpha, min_effect
        self._monitors: dict[str, tuple[int, DriftMonitor | None]] = {}
        self._lock = threading.Lock()

    def _monitor(self, name: str, serial: int, calibration: Any, image_map: Any,
                 fitted_quality: int | None = None) -> tuple[int, DriftMonitor | None]:
        """The newest load's ``(serial, monitor)``: a new one when ``serial`` is newer than the one kept."""
        with self._lock:
            known = self._monitors.get(name)
            if known is None or known[0] < serial:
                try:
                    monitor = DriftMonitor.for_model(calibration, image_map, window=self.window,
                                                     min_parts=self.min_parts, alpha=self.alpha,
                                                     min_effect=self.min_effect, distinct=True,
                                                     fitted_quality=fitted_quality)
                except ValueError:  # too few calibration images to compare with: nothing to track
                    monitor = None
                known = self._monitors[name] = (serial, monitor)
            return known

    def observe(self, name: str, serial: int, calibration: Any, image_map: Any, normalized_score: float,
                anomaly_map: np.ndarray, pooled: np.ndarray | None, jpeg_quality: int | None = None,
                fitted_quality: int | None = None) -> None:
        """One part scored by that load of the model: its normalized score, raw map and pooled feature (None: not
        known), and its file's JPEG quality against the good photos' (``fitted_quality``; None: unknown). A part of
        a load already replaced belongs to no window."""
        current, monitor = self._monitor(name, serial, calibration, image_map, fitted_quality)
        if monitor is not None and current == serial:
            kind = getattr(calibration, "pixel_sample", "flat")  # as the reference distances were read
            monitor.observe(normalized_score, typical_distance(anomaly_map, kind),
                            feature_distance(image_map, pooled), jpeg_quality)

    def status(self, name: str, serial: int, calibration: Any, image_map: Any,
               fitted_quality: int | None = None) -> DriftStatus | None:
        """The window of the model's newest load (None: too few calibration images to compare with)."""
        monitor = self._monitor(name, serial, calibration, image_map, fitted_quality)[1]
        return None if monitor is None else monitor.status()

    def forget(self, keep: set[str]) -> None:
        """Drop monitors of models no longer served."""
        with self._lock:
            for name in set(self._monitors) - keep:
                del self._monitors[name]
