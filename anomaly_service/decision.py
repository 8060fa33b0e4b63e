"""Raw scores -> a decision: each scorer's calibration, their fusion, and the :class:`ScoreResult`.

Every scorer is calibrated on normal images held out of the bank (calibration.py), which puts it on a scale where
1.0 is its threshold. With one scorer (the default, kNN alone) that calibration is the decision. With the optional
autoencoder both opinions are fused on their calibrated scales and the fused score is calibrated again on the same
held-out normals, so 1.0 is always the decision threshold. Fusion rules:

* ``mean``: ``w * knn + (1 - w) * autoencoder`` (``w`` = ``fusion_weight``), for images and maps;
* ``max``: the more alarmed of the two, per image and per pixel;
* ``excess`` (the whole-image branch): the kNN's opinion plus what the branch sees beyond its own threshold, on the
  kNN's own scale. On a good part the branch adds nothing, so the decision's calibration *is* the kNN's: it needs no
  fused sample, and the kNN can take its threshold leave-one-out while the branch takes its own from the images it
  was not trained on;
* ``gated``: the same sum on the normalized scales, calibrated again on held-out normals (models of the release
  that introduced the branch; they keep loading and scoring as fitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .calibration import Calibration, calibrate
from . import map_sample
from .map_sample import typical_distance
from .config import ModelConfig
from .errors import ConfigError
from .inspection_mask import fill_uninspected, inspected_values
from .scorer import MatchedScore, PatchMatches, RawScore
from .row_blocks import row_blocks
from .timing import StageTimer

KNN = "knn"
DECISIONS = ("anomaly", "normal")  # the decision's two words, as the records, the metrics and the API name them


def decision_word(is_anomaly: bool) -> str:
    """The decision as a word (:data:`DECISIONS`)."""
    return DECISIONS[0] if is_anomaly else DECISIONS[1]


@dataclass(frozen=True)
class ScoredWith:
    """How this machine computed a result, where the model does not fix it: the backbone runtime (``onnx`` or
    ``torch``), the kNN search as ``GET /models`` words it, the device and the intra-op threads of the pass. Under
    ``--runtime torch`` a score depends on the thread count, and torch's differs from ONNX Runtime's in its last
    digits (docs/decisions.md "Same photo, same answer"): a record keeps these so that a re-score that decides
    otherwise can be told from a model that changed."""

    runtime: str
    knn_search: str | None
    device: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """As the score answer, ``score --json`` and the records name it."""
        return {"runtime": self.runtime, "knn_search": self.knn_search, "device": self.device,
                "threads": self.threads}


@dataclass
class ScoreResult:
    """One image's verdict.

    ``score``, ``threshold`` and ``anomaly_map`` are always the kNN memory bank's opinion, in kNN distance units
    (the image score is the smoothed map's hottest pixel by default). ``normalized_score``, ``is_anomaly`` and
    :meth:`normalized_map` are always on the decision's calibrated scale, where 1.0 is the threshold: the kNN
    opinion itself, or with an autoencoder the fused one (``scorers`` then holds each opinion). A fused map shows
    where and can peak below the score (a part the kNN flags shows the kNN's map; docs/service.md#heatmaps).
    """

    score: float
    normalized_score: float
    is_anomaly: bool
    threshold: float
    anomaly_map: np.ndarray = field(repr=False)  # (H, W) of the input, kNN distance units (its size is in the repr)
    image_width: int
    image_height: int
    timing_ms: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None  # of the decision
    scorers: dict[str, dict[str, Any]] = field(default_factory=dict)
    decision_map: np.ndarray | None = field(default=None, repr=False)  # fused map, when the decision is fused
    # the bank row each patch matched and the image's pooled feature (kNN scoring; None for other sources)
    matches: PatchMatches | None = field(default=None, repr=False)
    # why this score may not mean what the threshold says (a photo far from the training photos' size)
    warnings: list[str] = field(default_factory=list)
    # how it was computed here (AnomalyModel's scoring fills it; None for a result made otherwise)
    scored_with: ScoredWith | None = None

    def normalized_map(self) -> np.ndarray:
        """The decision's map on the model's global scale: 0 = typical normal pixel, 1.0 = the threshold."""
        assert self.calibration is not None
        raw = np.asarray(self.anomaly_map if self.decision_map is None else self.decision_map)
        out = np.empty(raw.shape, np.float32)
        for rows in row_blocks(raw.shape):  # as the fusion: no whole-map temporary of a line camera's photo
            out[rows] = self.calibration.normalize(raw[rows])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The result as ``score --json`` and an archive re-score's rows give it; ``warnings`` is always there, a
        list (empty when none), as in the API's answer, so a reader need not tell a missing key from no warning."""
        out = {"score": self.score, "normalized_score": self.normalized_score, "is_anomaly": self.is_anomaly,
               "threshold": self.threshold, "image_width": self.image_width, "image_height": self.image_height,
               "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}, "warnings": list(self.warnings)}
        if self.scorers:
            out["scorers"] = self.scorers
        if self.scored_with is not None:
            out["scored_with"] = self.scored_with.to_dict()
        return out


def fuse(knn: float | np.ndarray, ae: float | np.ndarray, rule: str = ModelConfig.fusion,
         weight: float = ModelConfig.fusion_weight) -> float | np.ndarray:
    """Combine two normalized scores (or maps of equal shape) by ``rule``: ``mean`` or ``max``. The rules of
    :data:`GATED_RULES` are the kNN's opinion lifted by the branch's excess, which :class:`Decision` applies."""
    if rule == "mean":
        return weight * knn + (1.0 - weight) * ae
    if rule == "max":
        return np.maximum(knn, ae)
    raise ConfigError(f"unknown fusion rule {rule!r}; choose mean or max")


# rules whose decision is the kNN's opinion plus the branch's excess (the whole-image branch's)
GATED_RULES = ("excess", "gated")


def fusion_rule(ae_kind: str | None, fusion: str) -> str:
    """The rule a model fuses by (``ae_kind``: ModelConfig.ae_kind): the whole-image branch always ``excess``. Its
    map has 8x8 cells, and averaged into the kNN's map it blurs where a local defect lies (docs/decisions.md); gated
    by its own threshold, it adds only what lies beyond it (on a good part, nothing), and its map only on a part the
    kNN does not flag itself, so a part flagged for its layout still shows where."""
    return "excess" if ae_kind == "global" else fusion


def _pixel_sample(amap: np.ndarray, kind: str) -> np.ndarray:
    """The map's pixels the calibration floor reads (map_sample.py), inspected ones only: those outside an
    inspection mask (NaN) say nothing about normal parts."""
    return inspected_values(map_sample.sample(amap, kind))


def calibration_sample(amap: np.ndarray, kind: str = map_sample.FITTED) -> np.ndarray:
    """The pixels of a map that :meth:`Decision.calibrate` reads (:func:`_pixel_sample` and
    map_sample.typical_distance), as a 1-D map that calibrates exactly as the full one: a fit of thousands of images
    keeps these instead of every leave-one-out map (tested). ``kind``: the model's (an update of an older one)."""
    return np.ascontiguousarray(map_sample.sample(amap, kind))


def _below(cal: Calibration) -> float:
    """The highest value an uninspected pixel may show: just under the threshold, so never a region."""
    return cal.floor + 0.99 * (cal.threshold - cal.floor)


def raise_to_learnt(own: Calibration, bound: dict[str, Any] | None) -> None:
    """The whole-image branch's calibration ``own`` raised, where lower, to the threshold the scores of the images
    it learnt give (``bound``: the manifest's ``autoencoder.training.learnt_bound``; None in older models): they
    score no higher than unseen ones, and they are many more than the few it kept out (fitting.bound_branch)."""
    if bound is not None and bound["threshold"] > own.threshold:
        own.threshold = float(bound["threshold"])
        own.method += f", raised to the {bound['method']} of {bound['n_images']} images it learnt"


class Decision:
    """Owns the thresholds: calibrates from held-out normals, then turns raw scores into :class:`ScoreResult`."""

    def __init__(self, threshold_sigma: float = ModelConfig.threshold_sigma, fusion: str = ModelConfig.fusion,
                 fusion_weight: float = ModelConfig.fusion_weight, pixel_sample: str = map_sample.FITTED):
        self.threshold_sigma, self.fusion, self.fusion_weight = threshold_sigma, fusion, fusion_weight
        self.pixel_sample = pixel_sample  # how its maps' pixels are sampled (map_sample.py): a loaded model's own
        self.calibration: Calibration | None = None  # of the final decision
        self.scorer_calibrations: dict[str, Calibration] = {}  # each opinion's, when there are several

    @property
    def fused(self) -> bool:
        return len(self.scorer_calibrations) > 1

    def calibrate(self, raws: list[dict[str, RawScore]], known: Sequence[tuple[float, float]] = (),
                  kept: dict[str, Calibration] | None = None) -> None:
        """Set each scorer's threshold, and the fused one, from the raw scores of normal images unseen by that
        scorer (held out of the bank, or left out of it; for the whole-image branch, images it was not trained on:
        a scorer's sample is the raws that hold its opinion). ``known``: ``(kNN image score, typical distance)`` of
        further such images whose maps are not at hand (an update keeps them from the fit). ``kept``: scorers
        whose calibration stands as it is (an update that cannot re-score the branch on unseen images)."""
        if known and self.fusion not in GATED_RULES and len(raws[0]) > 1:
            raise ConfigError("scores without maps calibrate only a decision on the kNN's scale")
        per: dict[str, tuple[list[float], list[np.ndarray]]] = {}
        for raw in raws:
            for name, (score, amap) in raw.items():
                if kept and name in kept:
                    continue
                scores, pixels = per.setdefault(name, ([], []))
                scores.append(score)
                pixels.append(_pixel_sample(amap, self.pixel_sample))
        per[KNN][0].extend(s for s, _ in known)
        cals = {name: calibrate(np.array(s), np.concatenate(p), self.threshold_sigma, self.pixel_sample)
                for name, (s, p) in per.items()}
        cals.update(kept or {})
        if len(cals) == 1:
            self.calibration, self.scorer_calibrations = cals[KNN], {}
        elif self.fusion == "excess":  # a good part's decision is the kNN's own: so is its calibration
            self.scorer_calibrations, self.calibration = cals, cals[KNN]
        else:
            self.scorer_calibrations = cals
            fused = [self._fuse(raw) for raw in raws]
            self.calibration = calibrate(np.array([s for s, _ in fused]),
                                         np.concatenate([_pixel_sample(m, self.pixel_sample) for _, m in fused]),
                                         self.threshold_sigma, self.pixel_sample)
        # the drift monitor's reference for the kNN map's typical distance (drift.py), of the map results show
        knn_cal = self.scorer_calibrations.get(KNN, self.calibration)
        kind = self.pixel_sample
        self.calibration.holdout_distances = [
            typical_distance(fill_uninspected(raw[KNN][1], _below(knn_cal), kind), kind) for raw in raws
        ] + [d for _, d in known]

    def _fuse(self, raw: dict[str, RawScore]) -> RawScore:
        """Raw per-scorer results -> fused (score, map) on the scorers' normalized scales; the maps a block of rows
        at a time (row_blocks.py), each pixel as the whole-map expression gives it (tested).

        Rules ``excess`` and ``gated``: the kNN's score and map plus the whole-image branch's excess over its own
        threshold; the score is the kNN's own or the hottest read pixel of the lifted map, whichever is higher, so a
        part flagged for its layout has a region to show; a part the kNN flags itself shows the kNN's map, since
        the branch's coarse cells would only blur where."""
        k, a = self.scorer_calibrations[KNN], self.scorer_calibrations["autoencoder"]
        knn, ae = np.asarray(raw[KNN][1]), np.asarray(raw["autoencoder"][1])
        if knn.shape != ae.shape:
            raise ValueError(f"the scorers' maps differ in shape: {knn.shape} and {ae.shape}")
        if self.fusion not in GATED_RULES:
            score = fuse(float(k.normalize(raw[KNN][0])), float(a.normalize(raw["autoencoder"][0])), self.fusion,
                         self.fusion_weight)
            amap = np.empty(knn.shape, np.float32)
            for rows in row_blocks(knn.shape):
                amap[rows] = fuse(k.normalize(knn[rows]), a.normalize(ae[rows]), self.fusion, self.fusion_weight)
            return float(score), amap
        if self.fusion == "excess":  # on the kNN's own scale: the excess in kNN units, read only where it lies
            knn_score, scale = float(raw[KNN][0]), k.threshold - k.floor
            flagged = knn_score > k.threshold
            own = np.asarray(knn, dtype=np.float32)
        else:  # gated: on the normalized scales, read over every inspected pixel
            knn_score, scale = float(k.normalize(raw[KNN][0])), None
            flagged = knn_score >= 1.0
            own = None
        out = own if flagged and own is not None else None  # the kNN's own map, as it came
        hot = None
        for rows in row_blocks(knn.shape):
            excess = np.maximum(np.asarray(a.normalize(ae[rows]), dtype=np.float32) - 1.0, 0.0)
            if own is not None:
                amap = own[rows]
                lifted, read = amap + excess * scale, np.isfinite(amap) & (excess > 0)
            else:
                amap = np.asarray(k.normalize(knn[rows]), dtype=np.float32)
                lifted, read = amap + excess, np.isfinite(amap) & np.isfinite(excess)
            shown = amap if flagged else lifted
            if out is None:
                out = np.empty(knn.shape, shown.dtype)
            if out is not own:
                out[rows] = shown
            if read.any():
                top = lifted[read].max()
                hot = top if hot is None else max(hot, top)
        assert out is not None  # row_blocks gives one block at least
        return (max(knn_score, float(hot)) if hot is not None else knn_score), out

    def result(self, raw: dict[str, RawScore], timer: StageTimer, shape: tuple[int, ...]) -> ScoreResult:
        cal = self.calibration
        if cal is None:
            raise ConfigError("the decision is not calibrated")
        knn_score, knn_map = raw[KNN]
        knn_cal = self.scorer_calibrations.get(KNN, cal)
        scorers: dict[str, dict[str, Any]] = {}
        decision_map = None
        if self.fused:
            with timer.stage("fuse"):
                score, decision_map = self._fuse(raw)
            for name, (s, _) in raw.items():
                c = self.scorer_calibrations[name]
                scorers[name] = {"score": s, "normalized_score": float(c.normalize(s)), "threshold": c.threshold,
                                 "is_anomaly": bool(s > c.threshold),
                                 # what the opinion looks at: the whole-image branch (fused by excess or gated) the
                                 # part's layout; the kNN and the feature autoencoder each patch
                                 "reads": "layout" if name != KNN and self.fusion in GATED_RULES else "patches"}
        else:
            score = knn_score
        # pixels outside an inspection mask show the image's typical inspected level, never a region
        knn_map = fill_uninspected(knn_map, _below(knn_cal), self.pixel_sample)
        if decision_map is not None:
            decision_map = fill_uninspected(decision_map, _below(cal), self.pixel_sample)
        timing = dict(timer.ms)
        timing["total"] = sum(timing.values())
        return ScoreResult(score=knn_score, normalized_score=float(cal.normalize(score)),
                           is_anomaly=bool(score > cal.threshold), threshold=knn_cal.threshold, anomaly_map=knn_map,
                           image_width=shape[1], image_height=shape[0], timing_ms=timing, calibration=cal,
                           scorers=scorers, decision_map=decision_map,
                           matches=raw[KNN].matches if isinstance(raw[KNN], MatchedScore) else None)

    # ------------------------------------------------------------------ manifest
    def sections(self) -> dict[str, Any]:
        """The manifest's ``calibration`` (and, when fused, ``fusion``) sections."""
        assert self.calibration is not None
        out: dict[str, Any] = {"calibration": self.calibration.to_dict()}
        if self.fused:
            out["fusion"] = {"rule": self.fusion, "weight": self.fusion_weight,
                             "knn_calibration": self.scorer_calibrations[KNN].to_dict()}
        return out
