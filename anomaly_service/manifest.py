"""The model's manifest, typed: one reader with validation and migrations, used by every part that reads one.

A manifest is the self-describing half of the artifact (artifact.py writes and reads the files): what was
fitted, how, from what, and each file's size and SHA-256. :func:`parse_manifest` is the only way one is read, so a
malformed manifest fails in one place with one clear :class:`~anomaly_service.errors.ModelFormatError` naming the
field, and a model saved by an older release is migrated here (and only here) before validation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, ValidationError, field_validator,
                      model_validator)

from . import map_sample
from .calibration import Calibration, threshold_problem
from .config import ModelConfig
from .errors import ConfigError, ModelFormatError, validation_message
from .options import MODEL_OPTIONS, REMOVED_CHOICES
from .preprocessing import CHANNELS

FORMAT_NAME = "anomaly-service/patchcore-model"
FORMAT_VERSION = 1
# The revision of FORMAT_VERSION this release writes: a field the earlier releases of that format version ignore, so
# they still read every model it saves. From DIGEST_SINCE_REVISION on every manifest carries its own checksum
# (DIGEST_KEY), so one without it was cut short or edited; absent, it is the first revision: written before the
# checksum existed, or by a release that wrote the checksum but not yet the revision.
# A release that adds a field an update must act on raises the revision: releases before it still read and score
# such a model, but refuse to update it (feedback.update_model).
REVISION_KEY = "format_revision"
FORMAT_REVISION = 2
DIGEST_SINCE_REVISION = 2
MANIFEST = "manifest.json"
# config keys that older releases wrote and this one ignores (their options were removed; see docs/decisions.md)
RETIRED_CONFIG_KEYS = ("reweight_neighbours",)  # the key as older releases spelled it
# config keys every release of format 1 wrote (the first saved the whole config): a manifest without one is not an
# older model but a broken one, and today's default in its place would score differently from what was fitted
ALWAYS_WRITTEN = ("backbone", "image_size", "target_dim", "selection", "selection_keep", "coreset_ratio",
                  "coreset_max", "projection_dim", "k", "image_score", "index", "nprobe", "sigma",
                  "calibration_fraction", "threshold_sigma", "batch_size", "seed")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# :func:`plain_name`'s rule in words, for the messages that refuse a name ("letters" alone read as taking an umlaut)
PLAIN_NAME_RULE = ("ASCII letters (A-Z, a-z), digits, '_', '-' and '.' (at most 128, starting with a letter or digit, "
                   "no '..')")
_SHA256 = r"^[0-9a-f]{64}$"


def plain_name(name: str) -> bool:
    """A single path component: no separators, no ``..``, nothing hidden. Model names, version ids and a model's file
    names are all joined to a directory, so all are held to it (fullmatch: ``$`` would let a final newline in)."""
    return bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name


def _choices(option: str) -> tuple[str, ...]:
    """What a saved model may hold for a fit option: the options table's choices, legacy ones included."""
    entry = MODEL_OPTIONS[option]
    assert entry.choices is not None
    return entry.choices + entry.legacy


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields a later release adds survive a read-and-write


class BackboneInfo(_Section):
    name: str
    layers: list[str]
    weights_source: str
    weights_sha256: str = Field(pattern=_SHA256)


class PreprocessingInfo(_Section):
    image_size: int = Field(ge=1)
    stride: int = Field(ge=1)
    reference_side: float | None = Field(None, gt=0)
    # the training photos' longer sides, least and most (preprocessing.scale_warning); absent in older models
    sides: tuple[FiniteFloat, FiniteFloat] | None = None
    mean: tuple[FiniteFloat, FiniteFloat, FiniteFloat] | None = None  # absent in the earliest models
    std: tuple[FiniteFloat, FiniteFloat, FiniteFloat] | None = None
    # the bits of a 16-bit grey image that read as white (bit_depth.py); absent: 16, as older models read them
    bit_depth: Literal[8, 10, 12, 14, 16] | None = None
    # the same for a 16-bit colour image's channels; absent: their top bytes (Pillow's reading), as older models
    colour_bit_depth: Literal[8, 10, 12, 14, 16] | None = None
    # what the good photos were (preprocessing.channels_warning); absent in older models, which do not warn
    channels: Literal[(*CHANNELS, "both")] | None = None  # type: ignore[valid-type]
    # the good colour photos' red-minus-blue lean, mean and spread (preprocessing.swap_warning); absent: no warning
    red_blue: tuple[FiniteFloat, FiniteFloat] | None = None
    # the good photos' lowest JPEG quality, the best where none was a JPEG (compression.py); absent: no warning
    jpeg_quality: int | None = Field(None, ge=1, le=100)
    # how the pixels a transparency key names are read (images.keyed): transparent, black as every transparent pixel;
    # absent: as the key's colour, as models saved before it was kept were fitted on them
    transparency_key: Literal["transparent", "opaque"] | None = None
    # how an 8-bit colour photo's embedded ICC profile is read (colour_profile.py): srgb, its colours converted to
    # sRGB; absent: its values as stored, as models saved before it was kept were fitted on them
    colour_profile: Literal["srgb", "as_stored"] | None = None
    # the good photos' least images.blank_spread, which tells a dark frame with noise from them; absent: only a frame
    # of one level is blank
    flattest: FiniteFloat | None = Field(None, ge=0)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("std must be three numbers > 0")
        return v


class FeaturesInfo(_Section):
    dim: int = Field(ge=1)
    layer_dims: list[int]


class SelectionInfo(_Section):
    mode: str
    n_selected: int = Field(ge=1)
    of: int = Field(ge=1)


class CoresetInfo(_Section):
    ratio: float
    size: int = Field(ge=1)
    from_patches: int = Field(ge=1)
    # where the fit's greedy stopped (projected space); updates grow the bank to the same radius. Older models
    # lack it and the radius is recovered from the bank (coreset.radius_from_bank)
    coverage_radius: FiniteFloat | None = Field(None, ge=0)


class IndexInfo(_Section):
    kind: str
    dim: int = Field(ge=1)
    ntotal: int = Field(ge=1)


class ScoringInfo(_Section):
    k: int = Field(ge=1)
    image_score: str
    sigma: float = Field(ge=0)


# No score comes near it: the load keeps bank features below 1e6 (index.ROW_MAX_ABS), so a kNN distance stays below
# 2e6 x 256 (65,536 dims), and the whole-image branch and the fused scale are smaller. A threshold of 1e300 passed
# every part as normal (normalized 0.000), a floor of -1e300 flagged every part at 1.000
SCORE_MAX_ABS = 1e9


class CalibrationInfo(_Section):
    # a NaN or infinite threshold would pass every part as normal
    threshold: FiniteFloat = Field(ge=-SCORE_MAX_ABS, le=SCORE_MAX_ABS)
    floor: FiniteFloat = Field(ge=-SCORE_MAX_ABS, le=SCORE_MAX_ABS)
    method: str
    n_images: int = Field(ge=0)
    # the scores the threshold was set from; a NaN silenced the drift monitor's score reference
    holdout_scores: list[FiniteFloat] = Field(default_factory=list)
    holdout_distances: list[FiniteFloat] = Field(default_factory=list)  # absent in models before drift tracking
    pixel_sample: Literal[map_sample.KINDS] = "flat"  # type: ignore[valid-type]  # absent before grid: flat

    @model_validator(mode="after")
    def _ordered(self) -> "CalibrationInfo":
        if not self.threshold > self.floor:
            raise ValueError("threshold must be above the floor")
        return self

    def to_calibration(self) -> Calibration:
        return Calibration(threshold=self.threshold, floor=self.floor, method=self.method, n_images=self.n_images,
                           holdout_scores=list(self.holdout_scores), holdout_distances=list(self.holdout_distances),
                           pixel_sample=self.pixel_sample)


class SuspectInfo(_Section):
    """A training image the contamination guard flagged (contamination.py)."""

    name: str
    score: FiniteFloat
    z: FiniteFloat
    ratio: FiniteFloat
    threshold: FiniteFloat | None = None


class DuplicateInfo(_Section):
    """A good image the fit left out because its pixels repeat an earlier one's exactly (training_set.Repeat)."""

    name: str
    of: str


class HeldOutInfo(_Section):
    """A good image held out of the bank to set the threshold (holdout calibration), by its pixels: an update must
    not teach the bank an image the threshold is read from."""

    name: str
    sha256: str


class TrainingInfo(_Section):
    n_images: int = Field(ge=0)
    n_calibration_images: int = Field(ge=0)  # held out of the bank (0 with leave-one-out calibration)
    n_skipped: int = Field(0, ge=0)
    images_sha256: str
    fit_seconds: float
    device: str
    # absent in models before leave-one-out
    calibration: Literal[_choices("calibration")] = "holdout"  # type: ignore[valid-type]
    left_out_seconds: float = 0.0  # of fit_seconds, scoring the training images leave-one-out
    suspects: list[SuspectInfo] = Field(default_factory=list)
    # what the fit did with them
    suspects_action: Literal[_choices("contamination")] | None = None  # type: ignore[valid-type]
    # training images kept out of the threshold: those plain leave-one-out marks as outliers (contamination.py)
    left_out_of_threshold: list[str] = Field(default_factory=list)
    # exact duplicates left out of the bank and the threshold, each with the image it repeats; absent in older models
    duplicates: list[DuplicateInfo] = Field(default_factory=list)
    # holdout calibration: the held-out images (name, pixel digest); absent in older models and with leave-one-out
    held_out: list[HeldOutInfo] = Field(default_factory=list)
    # orientation="any": the turned copies' settings, patches offered to the bank, and how many images' thresholds
    # came from their turned pose (orientation.py)
    turned_copies: dict[str, Any] | None = None
    # share of the good images' pixel variance their position explains (layout.py); absent in older models
    layout_strength: float | None = None
    # autoencoder="global": fused or not, and why (layout.py); an autoencoder section only when fused
    second_opinion: dict[str, Any] | None = None
    # part_id: the groups the leave-one-out threshold left out whole (part_groups.py): pattern, n_groups,
    # grouped_images, largest, unmatched; absent in models fitted without it
    part_groups: dict[str, Any] | None = None


class FileInfo(_Section):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)


class AutoencoderInfo(_Section):
    version: Literal[1]
    config: dict[str, Any]
    channels: int = Field(ge=1)
    calibration: CalibrationInfo


class FusionInfo(_Section):
    rule: str
    weight: float
    knn_calibration: CalibrationInfo


class CalibrationSetInfo(_Section):
    """What an update needs to re-calibrate without the original images: the held-out calibration images'
    patch-embedding grids (kept dimensions) and shapes, in the listed file."""

    file: str
    n_images: int = Field(ge=1)
    dtype: Literal["float16"]
    dim: int = Field(ge=1)


class EvidenceInfo(_Section):
    """The training images the bank's patches came from (names, digests, thumbnails; provenance.py)."""

    file: str
    n_images: int = Field(ge=1)
    thumbnail_side: int = Field(ge=1)


class MaskInfo(_Section):
    """The inspection mask (inspection_mask.py): the listed PNG, in the training images' frame, nonzero =
    inspected; ``source`` says how it was given (png, polygons) or found (auto)."""

    file: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    source: Literal["png", "polygons", "auto"]
    inspected: float = Field(gt=0, le=1)  # share of the frame


class LineageInfo(_Section):
    """What made this version: a fit, or an update of the version ``parent`` with ``images_added`` good images
    that added ``patches_added`` patches to the bank."""

    made_by: Literal["fit", "update"]
    parent: str | None = None
    images_added: int = Field(0, ge=0)
    patches_added: int = Field(0, ge=0)
    updates: int = Field(0, ge=0)  # updates since the fit
    forced: bool = False
    seconds: float | None = None


class Manifest(_Section):
    format: Literal["anomaly-service/patchcore-model"]
    format_version: Literal[1]
    format_revision: StrictInt = Field(1, ge=1)  # absent: the first; check_digest says which need the checksum
    created_at: str
    config: dict[str, Any]
    backbone: BackboneInfo
    preprocessing: PreprocessingInfo
    features: FeaturesInfo
    selection: SelectionInfo
    coreset: CoresetInfo
    index: IndexInfo
    scoring: ScoringInfo
    calibration: CalibrationInfo
    training: TrainingInfo
    library_versions: dict[str, str]
    files: dict[str, FileInfo] = Field(default_factory=dict)
    autoencoder: AutoencoderInfo | None = None
    fusion: FusionInfo | None = None
    calibration_set: CalibrationSetInfo | None = None  # absent in models saved before updates existed
    lineage: LineageInfo | None = None  # absent: made by a fit
    evidence: EvidenceInfo | None = None  # absent in models saved before provenance was kept
    mask: MaskInfo | None = None  # absent: every pixel is inspected (and in models saved before masks existed)

    @field_validator("files")
    @classmethod
    def _plain_names(cls, v: dict[str, FileInfo]) -> dict[str, FileInfo]:
        for name in v:  # the loader joins these to the model directory: no paths, no "..", nothing hidden
            if not plain_name(name):
                raise ValueError(f"file name {name!r} is not a plain file name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if (self.autoencoder is None) != (self.fusion is None):
            raise ValueError("autoencoder and fusion must be given together")
        if self.index.ntotal != self.coreset.size:
            raise ValueError(f"index.ntotal {self.index.ntotal} differs from coreset.size {self.coreset.size}")
        if (self.config.get("mask") is None) != (self.mask is None):
            raise ValueError("config.mask and the mask section must be given together")
        return self

    def fit_config(self) -> ModelConfig:
        """The validated :class:`ModelConfig` the model was fitted with (after migrations)."""
        return ModelConfig(**self.config)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        for key in ("autoencoder", "fusion", "calibration_set", "lineage", "evidence", "mask"):
            if out.get(key) is None:
                out.pop(key, None)
        if out["coreset"].get("coverage_radius") is None:
            out["coreset"].pop("coverage_radius", None)
        return out


def _fitted_resize(raw: dict[str, Any]) -> str:
    """The resize policy a model without ``config.resize`` was fitted with. Only the first release wrote none, and it
    brought every image's longer side to ``image_size`` (its ``preprocessing.resize`` is a sentence starting
    "longer-side"): today's default, fixed-scale, would misname it (``anomaly info``, the config an update saves)
    and a re-fit from it would change its zoom. Every later fit records its policy in ``preprocessing.resize`` too,
    so a policy named there is the one the fit applied (a squashed model read as any other scores unsquashed)."""
    preprocessing = raw.get("preprocessing")
    recorded = preprocessing.get("resize") if isinstance(preprocessing, dict) else None
    return recorded if recorded in _choices("resize") else "longer-side"


def migrate(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring an older release's manifest to this release's shape, or say clearly why it cannot be."""
    raw = copy.deepcopy(raw)
    config = raw.get("config")
    if not isinstance(config, dict):
        return raw  # validation reports it
    config.setdefault("layer_balance", False)  # written before the option existed: fitted unbalanced
    config.setdefault("calibration", "holdout")  # written before leave-one-out calibration: held out
    config.setdefault("mask", None)  # written before masks existed: every pixel inspected
    config.setdefault("resize", _fitted_resize(raw))
    for key in RETIRED_CONFIG_KEYS:
        config.pop(key, None)
    if isinstance(raw.get("scoring"), dict):
        raw["scoring"].pop("reweight_neighbours", None)
    for key, replacements in REMOVED_CHOICES.items():
        value = config.get(key)
        if isinstance(value, str) and value in replacements:
            raise ModelFormatError(
                f"{where}: this model was fitted with {key}={value}, which this release no longer offers "
                f"(docs/decisions.md says why); re-fit it with `anomaly fit` (default {key}={replacements[value]})")
    return raw


DIGEST_KEY = "manifest_sha256"


def manifest_digest(raw: dict[str, Any]) -> str:
    """The SHA-256 of a manifest's content without its own digest, in one canonical JSON spelling (sorted keys,
    no spaces), so that it is the same for the dict written and the dict read back."""
    import hashlib

    body = {k: v for k, v in raw.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_digest(raw: Any, where: str = "model") -> None:
    """Refuse a manifest whose content does not match its digest: the files' checksums live in the manifest, so
    without its own a flipped bit in the threshold or the preprocessing would load and change every decision.
    Manifests of a revision before the digest have none and load as before; one of a later revision without it
    is refused, or deleting the digest would let any edit through that way."""
    if not isinstance(raw, dict):
        return  # parse_manifest says what is wrong
    if DIGEST_KEY not in raw:
        revision = raw.get(REVISION_KEY, 1)
        if type(revision) is int and revision < DIGEST_SINCE_REVISION:  # a bool, string or float is no older one
            return
        raise ModelFormatError(
            f"{where}: {MANIFEST} has no checksum ({DIGEST_KEY}), which every manifest of format revision "
            f"{DIGEST_SINCE_REVISION} or later carries ({REVISION_KEY} here: {repr(revision)[:40]}): it was cut "
            "short or edited; restore the model from a copy, roll back, or re-fit")
    if raw[DIGEST_KEY] != manifest_digest(raw):
        raise ModelFormatError(f"{where}: {MANIFEST} was altered or is corrupt: its content does not match its "
                               f"checksum ({DIGEST_KEY}); restore the model from a copy, roll back, or re-fit")


def parse_manifest(raw: Any, where: str = "model") -> Manifest:
    """Validate a manifest's JSON value (migrating older releases') or raise one clear ModelFormatError."""
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where}: {MANIFEST} is not a JSON object")
    if raw.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{where} is not an anomaly-service model (format {raw.get('format')!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:  # not true, which equals 1
        raise ModelFormatError(
            f"{where} has model format version {version!r}; this release reads version {FORMAT_VERSION}. "
            "Re-fit the model with this release (anomaly fit) or use the release that wrote it.")
    raw = migrate(raw, where)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {validation_message(e)}"
                             for e in exc.errors()[:4])
        more = f" (and {exc.error_count() - 4} more)" if exc.error_count() > 4 else ""
        raise ModelFormatError(f"{where}: {MANIFEST} is invalid: {problems}{more}") from None
    missing = [key for key in ALWAYS_WRITTEN if key not in manifest.config]
    if missing:
        raise ModelFormatError(f"{where}: {MANIFEST} is invalid: config lacks {', '.join(missing)}, which every "
                               "release writes; restore the model from a copy, roll back, or re-fit")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(manifest.config) - known)
    if unknown:
        raise ModelFormatError(f"{where}: config has options this release does not know ({', '.join(unknown)}); "
                               "load it with the release that wrote it, or re-fit")
    try:
        config = ModelConfig(**manifest.config)
        config.validate(loading=True)
    except (TypeError, ConfigError) as exc:
        raise ModelFormatError(f"{where}: manifest config is invalid ({exc})") from None
    _check_thresholds(manifest, config.threshold_sigma, where)
    return manifest


def _check_thresholds(manifest: Manifest, z: float, where: str) -> None:
    """Each calibration's threshold against the scores it keeps (calibration.threshold_problem)."""
    sections = [("calibration", manifest.calibration, None)]
    if manifest.fusion is not None:
        sections.append(("fusion.knn_calibration", manifest.fusion.knn_calibration, None))
    if manifest.autoencoder is not None:
        training = (manifest.autoencoder.model_extra or {}).get("training")
        bound = training.get("learnt_bound") if isinstance(training, dict) else None
        learnt = bound.get("threshold") if isinstance(bound, dict) else None
        sections.append(("autoencoder.calibration", manifest.autoencoder.calibration,
                         float(learnt) if isinstance(learnt, (int, float)) else None))
    for name, cal, learnt in sections:
        problem = threshold_problem(cal.to_calibration(), z, learnt)
        if problem:
            raise ModelFormatError(f"{where}: {MANIFEST} is invalid: {name}: {problem}; restore the model from a "
                                   "copy, roll back, or re-fit")
