"""The library API: ``AnomalyModel().fit(images)``, ``.score(image)``, ``.save(path)``, ``AnomalyModel.load(path)``.

A short facade over the stages, which data crosses one way: the :class:`~.embedder.Embedder` (image ->
patch embeddings), the scorers behind one protocol (:class:`~.knn_scorer.KnnScorer`, optionally the
:class:`~.autoencoder.ReconstructionScorer`), and the :class:`~.decision.Decision` (raw scores -> calibrated
verdict). The manifest (manifest.py) and the artifact (artifact.py) describe and store the result. The CLI and the
HTTP service are thin shells over this class.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence, Sized

import torch  # first: FAISS then shares its OpenMP pool (parallelism.load_faiss_after_torch)
import faiss
import numpy as np

from .anomalib_names import said_of
from .artifact import model_version_id, read_artifact, version_id, write_artifact
from .autoencoder import ReconstructionScorer
from .backbones import LoadedBackbone
from .bit_depth import with_depth
from .calibration import Calibration
from .compression import fitted_as_read, said_with
from .config import ModelConfig
from .contamination import Suspect
from .coreset import GreedyCoresetSampler
from . import map_sample
from .decision import GATED_RULES, Decision, ScoredWith, ScoreResult, fusion_rule
from .device import resolve_device
from .embedder import Embedder
from .errors import ConfigError, ModelFormatError, NotFittedError
from .fitting import Fit
from .grain import GrainAlignment, TurnedView, turned_back, warm_fill
from .images import DEFAULT_LIMITS, ImageInput, ImageLimits, decode_image
from .inputs import image_set
from .inspection_mask import MASK_FILE, InspectionMask
from .knn_scorer import KnnScorer
from .manifest import Manifest
from .options import MODEL_OPTIONS, RUNTIME_OPTIONS, validate
from .parallelism import thread_budget
from .preprocessing import (BLANK_SAID, CHANNELS, COLOUR_SAID, GREY_SAID, SWAPPED_SAID, Preprocessing, blank_warning,
                            channels_warning, scale_warning, swap_warning)
from .progress import progress_bar
from .provenance import TrainingCatalog
from .scorer import RawScore, Scorer
from .selection import make_selector
from .timing import StageTimer
from .training_set import Repeat, input_name

log = logging.getLogger(__name__)

__all__ = ["AnomalyModel", "ModelConfig", "ScoreResult"]

# images score_many decodes at once: a few backbone batches, not a folder of a shift's photos
SCORE_CHUNK = 64

FIT_PARAMS = tuple(f.name for f in dataclasses.fields(ModelConfig))  # the keyword fit options of the constructor


def _check_names(params: dict[str, Any], known: Sequence[str]) -> None:
    """Refuse parameter names the model does not have, naming the nearest (a typo was ModelConfig's TypeError), or
    what stands for one of anomalib's here."""
    import difflib

    for name in params:
        if name not in known:
            said = said_of(name, str)  # anomalib's name (num_neighbors, layers): what stands for it here
            if said:
                raise ConfigError(f"AnomalyModel has no parameter {name!r}: {said}")
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; parameters: {', '.join(known)}"
            raise ConfigError(f"AnomalyModel has no parameter {name!r}{hint}")


class AnomalyModel:
    """PatchCore anomaly detector with a calibrated decision threshold.

    >>> model = AnomalyModel(backbone="efficientnet_lite0").fit(paths_of_good_images)
    >>> result = model.score("photo.png"); result.is_anomaly, result.anomaly_map.shape
    >>> model.save("models/bottle"); AnomalyModel.load("models/bottle")

    ``knn_precision``, ``runtime`` and ``device`` say how the model runs on this machine; they are not saved.
    """

    def __init__(self, config: ModelConfig | None = None, *, weights: str | Path | None = None,
                 device: str = "auto", progress: bool = True, limits: ImageLimits = DEFAULT_LIMITS,
                 knn_precision: str = "auto", runtime: str = "auto", **params: Any):
        _check_names(params, FIT_PARAMS)
        if config is not None and not isinstance(config, ModelConfig):
            raise ConfigError(f"config must be a ModelConfig, not a {type(config).__name__}; options can also be given "
                              "as keywords: AnomalyModel(k=3, ...)")
        config = dataclasses.replace(config or ModelConfig(), **params)
        config.validate()
        self._setup(config, weights, device, progress, limits, knn_precision, runtime)

    def _setup(self, config: ModelConfig, weights: str | Path | None, device: str, progress: bool,
               limits: ImageLimits, knn_precision: str, runtime: str) -> None:
        validate({"knn_precision": knn_precision, "runtime": runtime}, RUNTIME_OPTIONS)  # fail now, not later
        if not isinstance(limits, ImageLimits):  # a dict failed deep in the fit
            raise ConfigError(f"limits must be an ImageLimits, not a {type(limits).__name__}")
        # the run options as given (get_params): ``device`` resolves and a fit sets the limits' bit depth below
        self._run_params: dict[str, Any] = dict(weights=weights, device=device, progress=progress, limits=limits,
                                                knn_precision=knn_precision, runtime=runtime)
        self._config = config
        self.weights = weights
        self.device = resolve_device(device)
        self.progress = progress
        self.limits = limits
        self.knn_precision = knn_precision
        self.embedder = Embedder(config.backbone, image_size=config.image_size, target_dim=config.target_dim,
                                 layer_balance=config.layer_balance, batch_size=config.batch_size, weights=weights,
                                 device=self.device, runtime=runtime, progress=progress, tile=config.tile)
        offered = MODEL_OPTIONS["selection"].choices or ()
        selector = make_selector(config.selection, config.selection_keep) if config.selection in offered else None
        sampler = GreedyCoresetSampler(config.coreset_ratio, config.coreset_max, config.projection_dim, config.seed,
                                       progress)
        self.knn = KnnScorer(selector=selector, sampler=sampler,
                             index_kind=config.index, nprobe=config.nprobe, k=config.k,
                             image_score=config.image_score, sigma=config.sigma, seed=config.seed)
        self.autoencoder_: ReconstructionScorer | None = None
        self.decision = Decision(config.threshold_sigma, fusion_rule(config.ae_kind, config.fusion),
                                 config.fusion_weight)
        self.manifest_: Manifest | None = None
        # what an update re-scores to re-calibrate (calibration.npz); None for models saved before updates existed
        self.calibration_set_: bytes | None = None
        self.version_id_: str | None = None  # the saved version this model was loaded from (artifact.version_id)
        self.manifest_sha256_: str | None = None  # that version's fingerprint (artifact.fingerprint), from its load
        self.defects_passing_: list[str] = []  # after a forced update: the known defects now below the threshold
        self.defects_checked_ = 0  # after an update: the known defects its guard read and scored
        self.still_flagged_: list[str] = []  # after an update: added good images the model still flags
        self.update_warnings_: list[str] = []  # after an update: what scoring warned of an added image
        # after an update: good images left out as unlike the photos the model was fitted on, with why (unlike_fit)
        self.unlike_: list[tuple[str, str]] = []
        # after an update with contamination="drop": added good images it still flagged, left out
        self.left_out_: list[str] = []
        self.duplicates_: list[Repeat] = []  # after an update: good images skipped as exact duplicates
        self.catalog_: TrainingCatalog | None = None  # the training images the bank's patches came from
        self._learnt: tuple[tuple[int, int], frozenset[tuple[int, int]]] | None = None  # _learnt_shapes' cache
        self.suspects_: list[Suspect] = []  # training images the contamination guard flagged at fit
        self.guard_scores_: dict[str, float] = {}  # every training image's support score (contamination.py)
        # orientation="any" on a surface with a grain: each photo turned to the good images' grain (grain.py)
        self.alignment_: GrainAlignment | None = None

    # ------------------------------------------------------------------ what runs here
    @property
    def config(self) -> ModelConfig:
        """The fit options this model's stages were built from (read-only: :meth:`set_params` changes them)."""
        return self._config

    @config.setter
    def config(self, value: ModelConfig) -> None:
        raise ConfigError("model.config cannot be replaced: the model's stages are built from it. Use "
                          "model.set_params(...) on an unfitted model, or AnomalyModel(config=...)")

    @property
    def scorers(self) -> list[Scorer]:
        return [self.knn] + ([self.autoencoder_] if self.autoencoder_ is not None else [])

    @property
    def backbone(self) -> LoadedBackbone:
        """The frozen network (loaded on first use: touch it to fail early when the weights cannot be had)."""
        return self.embedder.backbone

    @property
    def preprocessing(self) -> Preprocessing:
        return self.embedder.preprocessing

    @property
    def runtime(self) -> str:
        """Backbone execution in use (``onnx`` or ``torch``): ``auto`` resolves per machine, a failed export falls
        back to torch."""
        return self.embedder.runtime

    @property
    def knn_search(self) -> str | None:
        """Which kNN search scoring runs on this machine (None until fitted or loaded)."""
        return self.knn.search_description

    def scored_with(self) -> ScoredWith:
        """How a photo scored now, in the calling thread, is computed: the runtime that ran (a failed ONNX export
        has fallen back to torch by then), the kNN search, the device and this thread's intra-op budget (the
        service gives a pass every thread alone, a share beside another). What a record keeps of it."""
        return ScoredWith(runtime=self.runtime, knn_search=self.knn_search, device=str(self.device),
                          threads=thread_budget())

    def use_knn_precision(self, precision: str) -> "AnomalyModel":
        """Switch the CPU kNN search between ``fp32``, ``bf16`` (shortlist + exact re-rank) and ``auto``."""
        validate({"knn_precision": precision}, RUNTIME_OPTIONS)
        self._check_fitted()
        self.knn_precision = precision
        self._run_params = {**self._run_params, "knn_precision": precision}  # a copy.copy of this model keeps its own
        self._place_search()
        return self

    # ------------------------------------------------------------------ parameters (scikit-learn's conventions)
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments: every fit option (``config`` spelt out) and the run options as given, so that
        ``AnomalyModel(**model.get_params())`` (``sklearn.base.clone``) is this model, unfitted."""
        return {**{name: getattr(self.config, name) for name in FIT_PARAMS}, **self._run_params}

    def set_params(self, **params: Any) -> "AnomalyModel":
        """Change parameters of an unfitted model, checked as the constructor checks them (nothing changes if one
        is refused). A fitted model refuses: its bank and threshold were made with the parameters it has
        (docs/decisions.md); ``sklearn.base.clone(model).set_params(...)`` is the unfitted copy to change."""
        if not params:
            return self
        _check_names(params, FIT_PARAMS + tuple(self._run_params))
        if self._fitted():
            raise ConfigError(f"set_params({', '.join(params)}) on a fitted model: its bank and threshold were made "
                              "with its parameters; change a copy, sklearn.base.clone(model).set_params(...), and fit "
                              "it")
        fresh = type(self)(**{**self.get_params(), **params})
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        """For ``sklearn.utils.validation.check_is_fitted``: fitted attributes exist (as None) before a fit."""
        return self._fitted()

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's default tags (check_is_fitted reads them); sklearn is imported only by a caller of it."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False))

    def _place_search(self) -> None:
        """Put the kNN search where scoring runs; an aligned model's search over its images' own rows is built now
        too, not on the first photo it leaves as it came."""
        self.knn.place(self.device, self.knn_precision)
        if self.alignment_ is not None:
            self.knn.own_search()

    @property
    def mask_(self) -> InspectionMask | None:
        """The inspection mask (inspection_mask.py), None: every pixel is inspected. The embedder holds it, so
        every path that embeds images (fit, score, update) masks them alike."""
        return self.embedder.inspect

    @mask_.setter
    def mask_(self, mask: InspectionMask | None) -> None:
        self.embedder.inspect = mask

    @property
    def calibration_(self) -> Calibration | None:
        """The decision's calibration (threshold and normalization)."""
        return self.decision.calibration

    @property
    def index_(self) -> faiss.Index | None:
        return self.knn.index_

    @property
    def selected_indices_(self) -> np.ndarray | None:
        return self.knn.selected_

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageInput] | str | Path, names: Sequence[str] | None = None, *,
            relative_to: str | Path | None = None) -> "AnomalyModel":
        """Fit the memory bank on normal images (paths, bytes, arrays or PIL images, or a folder of image files);
        unreadable ones are skipped with a log.

        With ``part_id`` (a regular expression) the images of one part are left out together when one is scored
        leave-one-out (part_groups.py): it is searched in each image's name (its path, or the ``names`` given)
        relative to ``relative_to``: by default the folder given, or the images' common folder.

        With ``calibration="leave-one-out"`` (the default) every image goes into the bank and each is scored
        against the bank without its own patches; those scores set the threshold and feed the contamination
        guard (contamination.py). ``holdout`` keeps ``calibration_fraction`` of the images out of the bank
        instead (the feature autoencoder, whose fused opinion has no leave-one-out view, always uses it; the
        whole-image branch calibrates on its own validation split beside the kNN's leave-one-out threshold)."""
        if relative_to is None and isinstance(images, (str, Path)):
            relative_to = images
        unread = self.config.unread_second_opinion_option()
        if unread:  # said, not refused: a clone of a model saved so, or a grid search's candidate, fits as before
            log.warning("fit: %s", unread)
        images, names = image_set(images, names)
        # the fit runs on a copy and replaces this model's state only when it ends: a refit that failed or was
        # interrupted left this model half reset (no second opinion, another bit depth) and still scoring, with
        # other verdicts and no sign of it. The stages a fit reassigns are copied; the network and stage settings
        # (selector, sampler) are shared
        trial = copy.copy(self)
        trial.knn, trial.decision, trial.embedder = (copy.copy(self.knn), copy.copy(self.decision),
                                                     copy.copy(self.embedder))
        trial.version_id_ = None  # a refit is no saved version, nor the outcome of an update
        trial.decision.pixel_sample = map_sample.FITTED  # a new reference, read as a fit reads one (a loaded
        # older model's flat sampling was kept for the reference it was fitted with)
        trial.defects_passing_, trial.still_flagged_, trial.update_warnings_ = [], [], []
        trial.defects_checked_ = 0
        trial.unlike_, trial.left_out_, trial.duplicates_ = [], [], []
        Fit(trial).run(images, names, relative_to)
        self.__dict__.update(trial.__dict__)
        return self

    # ------------------------------------------------------------------ update
    @property
    def updatable(self) -> bool:
        """Whether :meth:`update` can run: the model keeps what re-calibration needs (models fitted by this
        release do; older ones need one re-fit)."""
        return self.calibration_set_ is not None and self.manifest_ is not None and \
            self.manifest_.calibration_set is not None

    def update(self, good_images: Sequence[ImageInput] | str | Path,
               known_defects: Sequence[ImageInput] | str | Path = (),
               force: bool = False, *, names: Sequence[str] | None = None,
               defect_names: Sequence[str] | None = None, contamination: str = "warn") -> "AnomalyModel":
        """A new model whose bank also covers ``good_images``, re-calibrated; this model is left untouched
        (feedback.py says how). ``known_defects`` (images reviewed as defects) guard it, and ``contamination`` says
        what becomes of added images it still flags: see :func:`~anomaly_service.feedback.update_model`."""
        from .feedback import update_model

        good_images, names = image_set(good_images, names, "good_images")
        known_defects, defect_names = image_set(known_defects, defect_names, "known_defects")
        return update_model(self, good_images, known_defects, force, names=names, defect_names=defect_names,
                            contamination=contamination)

    # ------------------------------------------------------------------ score
    def _fitted(self) -> bool:
        return self.knn.index_ is not None and self.decision.calibration is not None

    def _check_fitted(self) -> None:
        if not self._fitted():
            raise NotFittedError("the model is not fitted; call fit() or AnomalyModel.load()")

    def score(self, image: ImageInput) -> ScoreResult:
        """Score one image (path, bytes, RGB array or PIL image)."""
        self._check_fitted()
        return next(self._score_chunk([image], None, None))

    def score_many(self, images: Sequence[ImageInput] | str | Path, desc: str | None = None
                   ) -> Iterator[ScoreResult]:
        """Score images in input order (a folder's image files sorted by name), batching those that share a working
        size through the backbone. They are read :data:`SCORE_CHUNK` at a time: a shift's photos, all decoded before
        the first result, did not fit in memory. An input that does not decode raises its error (naming it) after
        the results of every input before it, so a caller can keep those and go on from the next one."""
        self._check_fitted()
        given = image_set(images)[0]
        total = len(given) if isinstance(given, Sized) else None
        pending = iter(given)
        shown = self.progress and (total is None or total > 1)  # none or one image: no bar
        with progress_bar(shown, total=total, desc=desc or "scoring", unit="img") as bar:
            start = 0
            while chunk := list(itertools.islice(pending, SCORE_CHUNK)):
                yield from self._score_chunk(chunk, start, bar)
                start += len(chunk)

    def _score_chunk(self, images: list[ImageInput], start: int | None, bar: Any) -> Iterator[ScoreResult]:
        """The results of ``images``, the inputs from number ``start`` on: an error names the input as ``image[i]``
        (or its path), not "image" of hundreds; ``start`` None: one image, which needs no number."""
        decode_ms, arrays, notes = [], [], []
        failed: Exception | None = None
        for i, src in enumerate(images, start or 0):
            t0 = time.perf_counter()
            try:  # what reading the file said (which frame) goes with its score
                decoded = decode_image(src, self.limits, name=None if start is None else input_name(src, i, None))
            except Exception as e:  # the inputs before it are scored first: their results are not lost with it
                failed = e
                break
            arrays.append(decoded.array)
            notes.append(decoded.warnings)
            decode_ms.append((time.perf_counter() - t0) * 1000)
        if arrays:
            how: ScoredWith | None = None  # read at the first result: a failed ONNX export has fallen back by then
            for i, (raw, ms, shape) in enumerate(self._raw_many(arrays, bar=bar)):
                result = self.decision.result(raw, StageTimer(ms={"decode": decode_ms[i], **ms}), shape)
                result.warnings.extend(said_with(notes[i], result.is_anomaly))
                result.warnings.extend(self.unlike_fit(arrays[i]))
                result.scored_with = how = how or self.scored_with()
                yield result
        if failed is not None:
            raise failed

    def size_unlike(self, height: int, width: int) -> str | None:
        """The warning for a photo of ``height`` x ``width`` far from the size of the good photos this model was
        fitted on (None: near it): read off a recorded photo's size alone, for the parts an update would leave out."""
        return scale_warning(self.embedder.preprocessing, self.embedder.tile, height, width,
                             turned=self.config.orientation == "any")

    def recorded_unlike(self, height: int, width: int, said: Collection[str]) -> bool:
        """Whether an update of this model would leave out a recorded photo of ``height`` x ``width`` whose scoring
        gave warnings beginning with each of ``said`` (preprocessing.PIXELS_SAID; :meth:`unlike_fit`), read off its
        record alone: its size and shape against this model's photos and mask, and what scoring said of its pixels
        (one level throughout, grey or colour against these good photos, red and blue swapped). Why: the review
        queue offered such parts after every teaching, which left them out, and a teaching of them alone was
        refused; reading every photo again after each review is not affordable."""
        if self.size_unlike(height, width) is not None or self._mask_warning((height, width)) is not None:
            return True
        pp = self.manifest_.preprocessing if self.manifest_ is not None else None
        unlike = {BLANK_SAID}  # the channels and the lean as this model's good photos have them, not the scorer's
        if pp is not None and pp.channels in CHANNELS:
            unlike.add(GREY_SAID if pp.channels == "colour" else COLOUR_SAID)
        if pp is not None and pp.red_blue is not None:
            unlike.add(SWAPPED_SAID)
        return not unlike.isdisjoint(said)

    def unlike_fit(self, image: np.ndarray) -> list[str]:
        """What scoring warns of a photo unlike the good photos this model was fitted on (far from their size, one
        level throughout, grey where they were colour or the reverse, red and blue swapped, another shape than the
        inspection mask's frame): an update leaves such a photo out, as learning it would put a part seen at another
        zoom, in other colours, under a stretched mask or not at all into the bank."""
        shape = image.shape
        scale = self.size_unlike(shape[0], shape[1])
        pp = self.manifest_.preprocessing if self.manifest_ is not None else None
        blank = blank_warning(image, pp.flattest if pp is not None else None)
        # a blank frame's channels tell nothing: it was told grey, and sent to the colour camera or a re-fit
        channels = None if blank else channels_warning(pp.channels if pp is not None else None, image)
        swapped = swap_warning(pp.red_blue if pp is not None else None, image)
        return [w for w in (scale, blank, channels, swapped, self._mask_warning(shape)) if w is not None]

    def _mask_warning(self, shape: tuple[int, ...]) -> str | None:
        """The inspection mask's warning for a photo of ``shape`` (InspectionMask.stretch_warning); None without."""
        if self.mask_ is None:
            return None
        layout = self.embedder.layout(shape)
        pp = self.embedder.preprocessing
        work = layout.work_size if layout is not None else pp.working_size(shape[0], shape[1])
        return self.mask_.stretch_warning(shape[0], shape[1], work, pp.cell, self._learnt_shapes())

    def _learnt_shapes(self) -> frozenset[tuple[int, int]]:
        """The ``(h, w)`` of the good photos the bank learnt, read from its catalog once per catalog (none for a
        model saved without one); a catalog holds every training image, and scoring asks for each photo."""
        cat = self.catalog_
        if cat is None:
            return frozenset()
        key = (id(cat), len(cat))
        if self._learnt is None or self._learnt[0] != key:
            self._learnt = (key, frozenset(cat.shapes))
        return self._learnt[1]

    def _raw_many(self, arrays: list[np.ndarray], desc: str | None = None, grids: dict[int, np.ndarray] | None = None,
                  bar: Any = None) -> Iterator[tuple[dict[str, RawScore], dict[str, float], tuple[int, ...]]]:
        """Per image, in input order: each scorer's raw (score, map), per-stage milliseconds, image shape.
        With ``grids``, each image's patch-embedding grid (kept dimensions, float16) is stored there by index.
        ``bar``: a progress bar of the caller's that these images advance (else one of their own)."""
        results: dict[int, tuple[dict[str, RawScore], dict[str, float], tuple[int, ...]]] = {}
        next_out = 0
        photos = arrays
        turns: dict[int, TurnedView] = {}
        # each photo turned to the good images' grain and read back on its own pixels. Only held-out calibration
        # keeps grids (upright, re-scored by an update against the photos' own shapes), and it never meets an aligned
        # model (Fit.calibrate_holdout): a turned view's grid would need its turn kept too
        assert grids is None or self.alignment_ is None, "held-out calibration of an aligned model"
        if self.alignment_ is not None:
            t0 = time.perf_counter()
            arrays = list(arrays)
            for i, img in enumerate(photos):
                view = self.alignment_.view(img, self.embedder.preprocessing.working_size)
                if view is not None:
                    turns[i], arrays[i] = view, view.canvas
            align_ms = (time.perf_counter() - t0) * 1000 / max(1, len(photos))
        with contextlib.nullcontext(bar) if bar is not None else \
                progress_bar(self.progress and len(arrays) > 1, total=len(arrays), desc=desc or "scoring",
                             unit="img") as bar:
            sizes = [turns[i].work if i in turns else None for i in range(len(arrays))]
            for batch in self.embedder.groups(arrays, sizes=sizes):
                timer = StageTimer()
                if turns:
                    timer.ms["align"] = align_ms
                embedded = self.embedder.embed([arrays[i] for i in batch], keep=self.knn.keep, timer=timer,
                                               size=sizes[batch[0]])
                if self.alignment_ is not None:
                    grid = (int(embedded.features.shape[1]), int(embedded.features.shape[2]))
                    copied = None
                    if embedded.tiles is None and any(i in turns for i in batch):
                        with timer.stage("align", per=len(batch)):
                            copied = [turns[i].cell_sources(grid) if i in turns else None for i in batch]
                    embedded = dataclasses.replace(embedded, turned=[i in turns for i in batch], copied=copied)
                opinions = {s.name: s.score(embedded, timer) for s in self.scorers}
                for j, i in enumerate(batch):
                    if i in turns:
                        with timer.stage("align", per=len(batch)):
                            for name, out in opinions.items():
                                out[j] = turned_back(turns[i], out[j], photos[i].shape)
                if grids is not None:
                    half = [e.to(torch.float16).cpu().numpy() for e in embedded.per_image()]
                    grids.update({i: half[j] for j, i in enumerate(batch)})
                for j, i in enumerate(batch):
                    results[i] = ({name: out[j] for name, out in opinions.items()}, timer.ms, photos[i].shape)
                bar.update(len(batch))
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, keep_versions: int = 0) -> Path:
        """Write the model atomically as a directory (see artifact.py); returns the resolved path.

        ``keep_versions`` > 0: the model this replaces is archived under ``.versions/`` (at most that many kept;
        see :meth:`update` and ``artifact.rollback``)."""
        self._check_fitted()
        assert self.manifest_ is not None
        files = {name: data for s in self.scorers for name, data in s.files().items()}
        if self.calibration_set_ is not None and self.manifest_.calibration_set is not None:
            files[self.manifest_.calibration_set.file] = self.calibration_set_
        if self.catalog_ is not None and self.manifest_.evidence is not None:
            files[self.manifest_.evidence.file] = self.catalog_.to_bytes()
        if self.mask_ is not None:
            files[MASK_FILE] = self.mask_.to_png()
        out = write_artifact(path, self.manifest_.to_dict(), files, keep_versions=keep_versions)
        self.version_id_ = model_version_id(out)
        return out

    @classmethod
    def load(cls, path: str | Path, *, weights: str | Path | None = None, device: str = "auto",
             progress: bool = False, limits: ImageLimits = DEFAULT_LIMITS, knn_precision: str = "auto",
             runtime: str = "auto") -> "AnomalyModel":
        """Load and validate a saved model. The backbone weights are re-loaded and checked against the manifest."""
        digest: list[str] = []  # the fingerprint of the manifest read, not of one read again after a save
        manifest, files = read_artifact(path, digest=digest)
        config = manifest.fit_config()
        if weights is None:
            src = manifest.backbone.weights_source
            if src.startswith("file:") and Path(src[5:]).is_file():
                weights = src[5:]
        model = cls.__new__(cls)
        model._setup(config, weights, device, progress, limits, knn_precision, runtime)
        try:
            model.knn.load_files(files, manifest.features.dim, manifest.coreset.size)
            if manifest.autoencoder is not None and manifest.fusion is not None:
                if ReconstructionScorer.FILE not in files:
                    raise ModelFormatError("the manifest lists an autoencoder but its weights are missing")
                ae = manifest.autoencoder
                model.autoencoder_ = ReconstructionScorer.from_bytes(files[ReconstructionScorer.FILE], ae.config,
                                                                     ae.channels, model.device, sigma=config.sigma)
                model.decision.scorer_calibrations = {"knn": manifest.fusion.knn_calibration.to_calibration(),
                                                      "autoencoder": ae.calibration.to_calibration()}
                if manifest.fusion.rule in GATED_RULES:  # the branch's models score by the rule they were fitted with
                    model.decision.fusion = manifest.fusion.rule
        except ModelFormatError as exc:
            raise ModelFormatError(f"{path}: {exc}") from None
        model.decision.calibration = manifest.calibration.to_calibration()
        model.decision.pixel_sample = manifest.calibration.pixel_sample  # flat in models fitted before grid
        if manifest.calibration_set is not None:
            if manifest.calibration_set.file not in files:
                raise ModelFormatError(f"{path}: the manifest lists a calibration set but its file is missing")
            model.calibration_set_ = files[manifest.calibration_set.file]
        if manifest.evidence is not None:
            if manifest.evidence.file not in files or model.knn.provenance_ is None:
                raise ModelFormatError(f"{path}: the manifest lists training-image evidence but its files are missing")
            try:
                model.catalog_ = TrainingCatalog.from_bytes(files[manifest.evidence.file])
            except ModelFormatError as exc:
                raise ModelFormatError(f"{path}: {exc}") from None
            if len(model.knn.provenance_) and int(model.knn.provenance_[:, 0].max()) >= len(model.catalog_):
                raise ModelFormatError(f"{path}: bank_sources name training images the catalog does not hold")
        if manifest.mask is not None:
            try:
                model.mask_ = InspectionMask.from_model(manifest.mask, files, limits.max_pixels)
            except ModelFormatError as exc:
                raise ModelFormatError(f"{path}: {exc}") from None
        aligned = (manifest.training.turned_copies or {}).get("alignment") or {}
        if aligned.get("kept"):
            try:
                model.alignment_ = GrainAlignment.from_dict(aligned)
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFormatError(f"{path}: training.turned_copies.alignment is malformed ({exc})") from None
            warm_fill()  # its compiled fill, so that the first turned photo does not wait for it
        pp = manifest.preprocessing
        base = model.embedder.preprocessing
        # the model's own normalization, so a model keeps scoring as it was fitted if a default changes
        model.embedder.preprocessing = dataclasses.replace(
            base, reference_side=pp.reference_side, sides=tuple(pp.sides) if pp.sides else None,
            mean=tuple(pp.mean) if pp.mean else base.mean,
            std=tuple(pp.std) if pp.std else base.std, squash=model.config.resize == "squash")
        # 16-bit photos read as the good images were (an older model's colour ones as Pillow reads them, as before)
        # (a model that kept its photos' channels kept their depths: a None depth there means no 16-bit photo)
        model.limits = dataclasses.replace(with_depth(model.limits, pp.bit_depth, pp.colour_bit_depth),
                                           # and a harder JPEG warned of, an earlier reading corrected
                                           jpeg_quality=fitted_as_read(
                                               pp.jpeg_quality, manifest.library_versions.get("anomaly_service")),
                                           depths_kept=pp.channels is not None,
                                           # a key's colour kept where the model was fitted on it so
                                           transparency_keys=pp.transparency_key == "transparent",
                                           # and a colour profile's values as stored likewise
                                           colour_profiles=pp.colour_profile == "srgb")
        model.manifest_ = manifest
        model.manifest_sha256_ = digest[0]
        model.version_id_ = version_id(manifest.created_at, digest[0])
        # the backbone now (not lazily): a weights mismatch fails at load time, not on the first request
        model.embedder.load_backbone(manifest.backbone.weights_sha256, manifest.backbone.weights_source)
        model._place_search()
        model.embedder.prepare_runtime()  # export now: a failure shows at load (serve start-up), not per request
        return model

    def __repr__(self) -> str:
        state = f"bank={self.knn.bank_size}" if self.knn.index_ is not None else "unfitted"
        return f"AnomalyModel(backbone={self.config.backbone!r}, {state})"
