"""The library API: ``AnomalyModel().fit(images)``, ``.score(image)``, ``.save(path)``, ``AnomalyModel.load(path)``.

A short facade over the stages, which data crosses one way: the :class:`~.embedder.Embedder` (image ->
patch embeddings), the scorers behind one protocol (:class:`~.knn_scorer.KnnScorer`, optionally the
:class:`~.autoencoder.ReconstructionScorer`), and the :class:`~.decision.Decision` (raw scores -> calibrated
verdict). The manifest (manifest.py) and the artifact (artifact.py) describe and store the result. The CLI and the
HTTP service are thin shells over this class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import torch
from PIL import Image

from . import __version__
from .artifact import fingerprint, model_version_id, read_artifact, version_id, write_artifact
from .autoencoder import AEConfig, ReconstructionScorer
from .backbones import LoadedBackbone
from .calibration import Calibration
from .calibration_set import CALIBRATION_FILE, CALIBRATION_SET_SIZE, calibration_set_bytes
from .config import ModelConfig
from .contamination import GUARD_TAIL, MIN_IMAGES, MIN_RATIO, SUPPORT, Suspect, find_suspects, threshold_sample
from .coreset import GreedyCoresetSampler
from .decision import GATED_RULES, KNN, Decision, ScoreResult, calibration_sample, fusion_rule
from .device import resolve_device
from .embedder import Embedder
from .errors import ConfigError, ContaminationError, ImageLoadError, ModelFormatError, NotFittedError
from .features import layer_dims
from .image_map import ImageMap
from .images import DEFAULT_LIMITS, ImageInput, ImageLimits, load_image
from .inspection_mask import MASK_FILE, InspectionMask, mask_for_fit
from .knn_scorer import KnnScorer
from .manifest import FORMAT_NAME, FORMAT_VERSION, Manifest
from .options import MODEL_OPTIONS, RUNTIME_OPTIONS, validate
from .layout import LAYOUT_STRENGTH, layout_strength, sample_ids
from .orientation import (TurnedCopies, left_out_turned, posed_grids, surface_warning, upright_only_threshold,
                          worst_pose)
from .preprocessing import Preprocessing
from .parallelism import intra_op_threads
from .progress import progress_bar
from .patch_store import PatchStore
from .provenance import CATALOG_FILE, THUMBNAIL_SIDE, TrainingCatalog, thumbnail
from .scorer import RawScore, Scorer
from .selection import make_selector
from .tiling import check_tile, tile_section
from .timing import StageTimer
from .training_set import TrainingImages, pixel_digest

log = logging.getLogger(__name__)

__all__ = ["AnomalyModel", "ModelConfig", "ScoreResult"]


def load_inputs(images: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits, progress: bool,
                what: str = "image") -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """Decoded images, their pixel digests (provenance in the manifest) and names; unreadable ones are skipped
    with a log and returned as the last list."""
    arrays, digests, kept, skipped = [], [], [], []
    for i, src in enumerate(progress_bar(progress, images, desc="loading", unit="img")):
        name = names[i] if names is not None else (str(src) if isinstance(src, (str, Path)) else f"{what}[{i}]")
        try:
            arr = load_image(src, limits, name=name)
        except ImageLoadError as exc:
            log.warning("skipped: %s", exc)
            skipped.append(str(exc))
            continue
        arrays.append(arr)
        digests.append(pixel_digest(arr))
        kept.append(name)
    return arrays, digests, kept, skipped


@dataclasses.dataclass(frozen=True)
class SeenImage:
    """What a fit keeps of a training image after its patches are stored: the catalog's entry."""

    name: str
    digest: str
    shape: tuple[int, ...]
    thumbnail: bytes


class StoredGrids(Sequence):
    """The kept images' grids in the kept dimensions, each read from the store when asked for: the branch's training
    reads them one at a time, so a streamed fit (patch_store.py) never holds them all."""

    def __init__(self, store: PatchStore, ids: list[int], keep: torch.Tensor):
        self.store, self.ids, self.keep = store, ids, keep

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, p):  # type: ignore[override]
        return self.store.grid(self.ids[p], self.keep)


def train_timed(scorer: ReconstructionScorer, samples: Sequence[torch.Tensor], progress: bool,
                stop: threading.Event | None = None) -> dict[str, Any]:
    """Train ``scorer`` on ``samples``; its training statistics with the seconds it took."""
    t0 = time.perf_counter()
    stats = scorer.fit(samples, progress=progress, stop=stop)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats


class BranchBeside:
    """The whole-image branch trained on a thread of its own while the coreset is chosen.

    Why: on a CPU the greedy's compiled loop (coreset_kernel.py) holds one core and releases the GIL, and the
    branch's small convolutions run on one intra-op thread (autoencoder.py), so side by side the fit pays for
    the longer of the two instead of both. Where it outlasts the greedy, the leave-one-out pass starts beside it
    on one thread and takes every core once it is done (:meth:`running`): a third thread on two cores stalls the
    pass's products. The network and its initial weights are made on the calling thread, from the config's seed:
    the branch trained beside the greedy is the one trained after it."""

    def __init__(self, store: PatchStore, images: list[int], config: AEConfig, sigma: float, progress: bool):
        self.store, self.images, self.config, self.sigma, self.progress = store, list(images), config, sigma, progress
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Set by the thread when it ends. Waits go on it, not on Thread.join: on Python 3.11 a join that Ctrl-C
        # interrupts marks the still-training thread as stopped, so a later join returned at once and the
        # interpreter aborted on the thread at exit.
        self._done = threading.Event()
        self.scorer: ReconstructionScorer | None = None
        self.stats: dict[str, Any] = {}
        self.error: BaseException | None = None

    def start(self, selected: np.ndarray) -> None:
        """Begin training on the ``selected`` dimensions (KnnScorer.fit calls this once they are chosen)."""
        samples = StoredGrids(self.store, self.images, torch.from_numpy(selected))
        self.scorer = ReconstructionScorer(self.config, samples[0].shape[-1], sigma=self.sigma)
        self._thread = threading.Thread(target=self._train, args=(samples,), name="whole-image-branch", daemon=True)
        self._thread.start()

    def _train(self, samples: StoredGrids) -> None:
        try:
            assert self.scorer is not None
            self.stats = train_timed(self.scorer, samples, self.progress, self._stop)
        except BaseException as e:  # noqa: BLE001 - raised on the fit's thread by result()
            self.error = e
        finally:
            self._done.set()

    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def cancel(self) -> None:
        """Stop the training after its current epoch and wait for the thread: a fit that fails (or is interrupted)
        beside the branch leaves no thread training on a closed patch store."""
        self._stop.set()
        if self._thread is not None:
            self._done.wait()

    def result(self) -> tuple[ReconstructionScorer, dict[str, Any]]:
        """Wait for the training; the trained branch and its statistics (its error, raised here)."""
        if self._thread is None or self.scorer is None:
            raise RuntimeError("the whole-image branch was never started")
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.scorer, self.stats


def hash_inputs(digests: list[str]) -> str:
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()


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
        config = dataclasses.replace(config or ModelConfig(), **params)
        config.validate()
        self._setup(config, weights, device, progress, limits, knn_precision, runtime)

    def _setup(self, config: ModelConfig, weights: str | Path | None, device: str, progress: bool,
               limits: ImageLimits, knn_precision: str, runtime: str) -> None:
        validate({"knn_precision": knn_precision, "runtime": runtime}, RUNTIME_OPTIONS)  # fail now, not later
        self.config = config
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
        self.defects_passing_: list[str] = []  # after a forced update: the known defects now below the threshold
        self.catalog_: TrainingCatalog | None = None  # the training images the bank's patches came from
        self.suspects_: list[Suspect] = []  # training images the contamination guard flagged at fit
        self.guard_scores_: dict[str, float] = {}  # every training image's support score (contamination.py)

    # ------------------------------------------------------------------ what runs here
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

    def use_knn_precision(self, precision: str) -> "AnomalyModel":
        """Switch the CPU kNN search between ``fp32``, ``bf16`` (shortlist + exact re-rank) and ``auto``."""
        validate({"knn_precision": precision}, RUNTIME_OPTIONS)
        self._check_fitted()
        self.knn_precision = precision
        self.knn.place(self.device, precision)
        return self

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
    def fit(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> "AnomalyModel":
        """Fit the memory bank on normal images (paths, bytes or arrays); unreadable ones are skipped with a log.

        With ``calibration="leave-one-out"`` (the default) every image goes into the bank and each is scored
        against the bank without its own patches; those scores set the threshold and feed the contamination
        guard (contamination.py). ``holdout`` keeps ``calibration_fraction`` of the images out of the bank
        instead (the feature autoencoder, whose fused opinion has no leave-one-out view, always uses it; the
        whole-image branch calibrates on its own validation split beside the kNN's leave-one-out threshold)."""
        cfg = self.config
        if self.knn.selector is None:
            raise ConfigError(f"selection={cfg.selection} is no longer offered for new fits; use std or none")
        t_start = time.perf_counter()
        self.autoencoder_ = None  # a re-fit starts clean: this fit decides again whether there is a second opinion
        self.decision.scorer_calibrations = {}
        self.embedder.backbone  # noqa: B018 - fails here, before any image work, if weights are unavailable
        source = TrainingImages(images, names, self.limits)
        if len(source) < 2:
            raise ConfigError(f"need at least 2 readable normal images to fit, got {len(source)}")
        self._second: dict[str, Any] = {}  # the whole-image branch: trained or not, and why
        # the whole-image branch calibrates on the images it did not learn, beside the kNN's leave-one-out threshold
        # (decision.py, rule "excess"); the feature autoencoder's fusion needs one held-out sample for both
        left_out = cfg.calibration == "leave-one-out" and cfg.autoencoder != "features"
        if cfg.calibration == "leave-one-out" and not left_out:
            log.warning("the feature autoencoder is calibrated on held-out images: calibration=holdout for this fit")
        order = np.random.default_rng(cfg.seed).permutation(len(source))
        n_cal = 0 if left_out else int(round(len(source) * cfg.calibration_fraction))
        if not left_out:
            n_cal = min(max(n_cal, 1 if cfg.calibration_fraction > 0 else 0), len(source) - 1)
        cal_ids, train_ids = np.sort(order[:n_cal]), np.sort(order[n_cal:])
        check_tile(cfg.tile, cfg.image_size, self.embedder.preprocessing.stride, source.shapes)
        self.embedder.fit_scale(source.shapes, cfg.resize)
        self.mask_ = mask_for_fit(cfg.mask, source, source.subset(train_ids), self.embedder)
        # orientation="any": turned and mirrored copies of every image join the bank as its own (orientation.py)
        copies = TurnedCopies(self.embedder, cfg.seed) if cfg.orientation == "any" else None
        with (PatchStore() as store, copies if copies is not None else contextlib.nullcontext(),
              contextlib.ExitStack() as cleanup):
            # 1. patch embeddings of every training image, decoded one batch at a time (training_set.py)
            seen = self._embed_training(source, train_ids, store, copies)
            digests = [s.digest for s in seen]  # the manifest's images_sha256 covers every decoded image
            # how much of the part's look its place in the frame fixes (layout.py), from the kept thumbnails: the
            # whole-image branch is trained only where the part has a layout
            self._layout = layout_strength([np.asarray(Image.open(io.BytesIO(seen[i].thumbnail)).convert("RGB"))
                                            for i in sample_ids(len(seen))])
            second_opinion = self._trains_second_opinion(self._layout)
            if len(store) < 2:
                raise ConfigError(f"need at least 2 readable normal images to fit, got {len(store)}")
            # 2-4. selection, coreset and index
            kept = list(range(len(store)))  # the images of the bank, as store indices (catalog order)
            # on a CPU the whole-image branch trains beside the coreset greedy (BranchBeside)
            beside = (BranchBeside(store, kept, AEConfig.for_kind(cfg.ae_kind, cfg.ae_epochs, cfg.seed), cfg.sigma,
                                   self.progress)
                      if second_opinion and cfg.ae_kind == "global" and self.device.type == "cpu" else None)
            if beside is not None:  # on the way out, before the store closes; after result(), it does nothing
                cleanup.callback(beside.cancel)
            self.knn.fit(store, extra=copies, on_selected=beside.start if beside is not None else None)
            keep = torch.from_numpy(self.knn.selected_)
            self.suspects_, self.guard_scores_ = [], {}
            self._left_out_seconds = 0.0
            self._outliers: list[str] = []
            n_turned_poses = 0  # orientation="any": images whose threshold score came from their turned copy
            upright_threshold = None  # orientation="any": the threshold the upright poses alone would set
            if left_out:
                # 5. leave-one-out scores of every training image; the guard on what went into ./good
                raws, support_scores = self._left_out_raws(store, kept, seen,
                                                           SUPPORT if len(kept) >= MIN_IMAGES else 0, beside)
                names = [seen[i].name for i in kept]
                self.guard_scores_ = dict(zip(names, map(float, support_scores)))
                self.suspects_ = find_suspects(support_scores, names, cfg.threshold_sigma, min_ratio=MIN_RATIO,
                                               tail=GUARD_TAIL)
                self._guard(self.suspects_)
                suspect_names = {s.name for s in self.suspects_}
                if self.suspects_ and cfg.contamination == "drop":
                    if beside is not None:  # it learnt the suspects too: one for the kept images trains below
                        beside.cancel()
                    kept = [i for i in kept if seen[i].name not in suspect_names]
                    self.knn.fit(store, images=kept, extra=copies)
                    raws, _ = self._left_out_raws(store, kept, seen)  # the branch was cancelled above
                    log.warning("contamination=drop: re-fitted without %d suspect image(s)", len(self.suspects_))
            branch = beside.result() if beside is not None else None
            self.knn.place(self.device, self.knn_precision)
            self.catalog_ = TrainingCatalog()
            for i in kept:
                lay = store.layouts[i]  # tiled: the boxes are cells of the image's stitched grid
                self.catalog_.add_entry(seen[i].name, seen[i].digest, seen[i].shape,
                                        lay.grid if lay is not None else store.grids[i], seen[i].thumbnail)
            # the page's map (image_map.py): each image's mean patch, in the kept dimensions
            self.catalog_.image_map = ImageMap.fit(np.stack([store.pooled[i][self.knn.selected_] for i in kept]))
            # 6. optional autoencoder on the same patches (each image's grid in the kept dimensions)
            ae_stats: dict[str, Any] = {}
            if second_opinion:
                samples = StoredGrids(store, kept, keep)
                if branch is not None and kept == list(range(len(store))):
                    self.autoencoder_, ae_stats = branch
                else:  # not on a CPU, or contamination=drop left images out: trained now, on the kept images
                    ae_config = AEConfig.for_kind(cfg.ae_kind, cfg.ae_epochs, cfg.seed)
                    self.autoencoder_ = ReconstructionScorer(ae_config, samples[0].shape[-1], sigma=cfg.sigma)
                    ae_stats = train_timed(self.autoencoder_, samples, self.progress)
                if left_out:  # the branch's own threshold: its opinion of the images it kept out of training
                    for j, opinion in zip(self.autoencoder_.val_ids_,
                                          self._branch_raws(samples, self.autoencoder_.val_ids_, seen, kept)):
                        raws[j]["autoencoder"] = opinion
                del samples
            # 7. calibration: leave-one-out scores of the training images (suspects left out), or held-out normals
            if left_out:
                # orientation="any": each image's whole turned copy, scored leave-one-out; the threshold takes each
                # image's worse pose, so good parts that arrive turned pass
                t_turned = time.perf_counter()
                turned = [] if copies is None else left_out_turned(self.knn, self.embedder, copies, kept,
                                                                   self.knn.left_out_search(len(kept)))
                self._left_out_seconds += time.perf_counter() - t_turned
                posed = worst_pose(raws, turned)
                n_turned_poses = sum(1 for a, b in zip(raws, posed) if a is not b)
                # the threshold leaves out the images plain leave-one-out marks as outliers (contamination.py), each
                # in the pose that sets its score
                names = [seen[i].name for i in kept]
                self._outliers, calibrated_ids = threshold_sample([r[KNN][0] for r in posed], names,
                                                                  cfg.threshold_sigma)
                unseen_good = sum("autoencoder" in posed[j] for j in calibrated_ids)
                if self.autoencoder_ is not None and unseen_good < min(3, len(self.autoencoder_.val_ids_)):
                    # the images the branch kept out of its training are (nearly) all kNN outliers (defects in
                    # ./good): too few good images it has not learnt are left to set its threshold, so it is not fused
                    log.warning("whole-image branch not fused: %d of the %d images it kept out of training are left "
                                "out of the threshold as outliers, too few good ones remain to set its own",
                                len(self.autoencoder_.val_ids_) - unseen_good, len(self.autoencoder_.val_ids_))
                    self.autoencoder_, ae_stats = None, {}
                    self._second.update(fused=False, why_not="calibration")
                    posed = [{KNN: p[KNN]} for p in posed]  # the kNN's opinions alone calibrate the decision
                self.decision.calibrate([posed[j] for j in calibrated_ids])
                if turned:  # what the upright photos alone would set, the same way: how far the turned pose raised it
                    upright_threshold = upright_only_threshold(raws, names, cfg.threshold_sigma)
                # what an update re-scores: a spread-out sample of the training images' grids, with their ids
                cal_arr = np.array(calibrated_ids)
                pick = cal_arr[np.unique(np.linspace(0, len(cal_arr) - 1, min(len(cal_arr), CALIBRATION_SET_SIZE))
                                         .astype(int))]
                half = [store.grid(kept[j], keep).to(torch.float16).numpy() for j in pick]
                half, shapes = posed_grids(pick, half, [seen[kept[j]].shape for j in pick], turned, posed,
                                           lambda p: copies.checks.grid(kept[p], keep).to(torch.float16).numpy())
                self.calibration_set_ = calibration_set_bytes(half, shapes, image_ids=pick, calibrated_ids=cal_arr)
                n_set = len(pick)
            else:
                if n_cal:
                    _, cal_images = source.decoded(cal_ids)
                    digests.extend(pixel_digest(a) for a in cal_images)
                else:  # no hold-out asked for: scores of training images are optimistic, so the threshold is too
                    log.warning("calibration_fraction=0: threshold from training images, expect more false alarms")
                    _, cal_images = source.decoded(train_ids[: min(len(train_ids), 20)])
                cal_grids: dict[int, np.ndarray] = {}
                self.decision.calibrate([raw for raw, _, _ in self._raw_many(cal_images, desc="calibration",
                                                                             grids=cal_grids)])
                self.calibration_set_ = calibration_set_bytes([cal_grids[i] for i in range(len(cal_images))],
                                                               [a.shape for a in cal_images])
                n_set = len(cal_images)
            n_train, streamed = len(kept), store.spilled
            # orientation="any": what the manifest says of the copies
            self._turned = {} if copies is None else {
                "per_image": copies.per_image, "patch_share": copies.patch_share, "bank_factor": copies.factor,
                "patches": sum(len(copies.cells[i]) for i in kept),  # the copies the bank was offered
                "surface_images": sum(copies.surface[i] for i in kept), "surface_copies": copies.surface_copies,
                # of the images the fit scored in both poses (an update adds images, not poses)
                **({"n_turned_poses": n_turned_poses, "n_posed_images": len(raws)} if left_out else {}),
                **({"upright_threshold": upright_threshold} if upright_threshold is not None else {})}
            # over the images the model keeps (a drop re-fit leaves suspects out), as the manifest's n_images counts
            warning = None if copies is None else surface_warning(self._turned["surface_images"], len(kept),
                                                                  self.decision.calibration.threshold,
                                                                  upright_threshold)
            if warning is not None:
                log.warning(warning)
        fit_seconds = time.perf_counter() - t_start
        self.manifest_ = self._manifest(n_train, n_cal, digests, source.skipped, fit_seconds, ae_stats, n_set,
                                        "leave-one-out" if left_out else "holdout", streamed)
        log.info("fitted on %d images (%s) in %.1fs; bank %d of %d patches", n_train,
                 "leave-one-out calibration" if left_out else f"{n_cal} held out", fit_seconds,
                 self.knn.bank_size, self.knn.stats_["from_patches"])
        return self

    def _embed_training(self, source: TrainingImages, train_ids: np.ndarray, store: PatchStore,
                        copies: TurnedCopies | None = None) -> list[SeenImage]:
        """Decode, embed and store the training images ``train_ids`` of ``source``, one batch of a working size at
        a time, and their turned ``copies`` when given; returns, per stored image, what the catalog keeps of it
        (its pixels are not kept)."""
        train = source.subset(train_ids)
        seen: list[SeenImage] = []
        with progress_bar(self.progress, total=len(train), desc="features", unit="img") as bar:
            for batch in self.embedder.groups_by_shape(train.shapes):
                ok, arrays = train.decoded(batch)
                if arrays:
                    first = len(store)
                    for e, img in zip(self.embedder.embed(arrays).per_image(), arrays):
                        store.add(e, self.embedder.layout(img.shape))  # tiled: (tiles, h, w, d) and its layout
                    if copies is not None:
                        copies.add(arrays, store.grids[first:])
                    for j, img in zip(ok, arrays):
                        seen.append(SeenImage(train.names[j], pixel_digest(img), img.shape, thumbnail(img)))
                bar.update(len(batch))
        return seen

    def _left_out_raws(self, store: PatchStore, kept: list[int], seen: list[SeenImage], support: int = 0,
                       beside: BranchBeside | None = None) -> tuple[list[dict[str, RawScore]], list[float]]:
        """Each of the ``kept`` training images' kNN opinion against the bank without its own patches
        (knn_scorer.py; the bank numbers them by their place in ``kept``) and, with ``support`` > 0, its support
        score for the contamination guard (contamination.py), from the same search. On one thread while the
        whole-image branch ``beside`` still trains: it holds the other core."""
        t0 = time.perf_counter()
        self.knn.place(self.device, self.knn_precision)
        keep = torch.from_numpy(self.knn.selected_)
        shortlist = self.knn.left_out_search(len(kept))
        out: list[dict[str, RawScore]] = [{} for _ in kept]
        supported: list[float] = [0.0] * len(kept) if support > 0 else []
        shapes = [tuple(seen[i].shape) for i in kept]
        # several images to a search (one image's patches are too few to pay for a search call), grouped as the
        # backbone groups them; a tiled image's grid is its own, so those go one at a time
        groups = (self.embedder.groups_by_shape(shapes) if self.embedder.tile is None
                  else ([p] for p in range(len(kept))))
        with progress_bar(self.progress, total=len(kept), desc="leave-one-out", unit="img") as bar:
            for ids in groups:
                emb = self.embedder.wrap_many([store.grid(kept[p], keep) for p in ids], [shapes[p] for p in ids])
                with intra_op_threads(1) if beside is not None and beside.running() else contextlib.nullcontext():
                    if support > 0:
                        raws, scores = self.knn.score_left_out_supported(emb, ids, support, shortlist=shortlist)
                        for p, v in zip(ids, scores):
                            supported[p] = v
                    else:
                        raws = self.knn.score_left_out(emb, ids, shortlist=shortlist)
                for p, (score, amap) in zip(ids, raws):
                    out[p] = {KNN: (score, calibration_sample(amap))}  # all the calibration reads of the map
                bar.update(len(ids))
        self._left_out_seconds += time.perf_counter() - t0
        return out, supported

    def _branch_raws(self, grids: list[torch.Tensor], ids: list[int], seen: list[SeenImage], kept: list[int]
                     ) -> list[RawScore]:
        """The second opinion of the images ``ids`` (places in ``kept``) from their kept-dimension ``grids``, each
        map reduced to what calibration reads, as :meth:`_left_out_raws` keeps the kNN's."""
        assert self.autoencoder_ is not None
        timer, out = StageTimer(), []
        for p in ids:
            emb = self.embedder.wrap_many([grids[p]], [tuple(seen[kept[p]].shape)])
            score, amap = self.autoencoder_.score(emb, timer)[0]
            out.append((score, calibration_sample(amap)))
        return out

    def _trains_second_opinion(self, strength: float | None) -> bool:
        """Whether this fit trains a second opinion: the feature autoencoder when asked; the whole-image branch
        where the part has a layout (layout.py), or with ``ae_keep=always``. Without one, the fit calibrates
        leave-one-out as a plain kNN fit does."""
        cfg = self.config
        if cfg.ae_kind != "global":
            return cfg.ae_kind is not None
        always = cfg.autoencoder == "global" and cfg.ae_keep == "always"
        # auto gives way to what the branch does not combine with: turned parts and tiles have no one layout
        clash = cfg.autoencoder == "auto" and (cfg.orientation == "any" or cfg.tile is not None)
        fused = always or (not clash and strength is not None and strength >= LAYOUT_STRENGTH)
        self._second = {"branch": "global", "rule": "always" if always else "layout",
                        "layout_strength": strength, "needs": LAYOUT_STRENGTH, "fused": fused}
        if clash:
            log.info("whole-image branch not trained: it reads one layout per part, which %s does not give",
                     "--orientation any" if cfg.orientation == "any" else "--tile")
            self._second["why_not"] = "orientation any" if cfg.orientation == "any" else "tile"
        elif not fused:
            why = ("too few images to tell" if strength is None else
                   f"position explains {strength:.2f} of the good images' pixel variance, below {LAYOUT_STRENGTH}")
            # a warning only where the branch was asked for by name; by default this is the usual case of a surface
            log.log(logging.WARNING if cfg.autoencoder == "global" else logging.INFO,
                    "whole-image branch not trained, the kNN decides alone (a plain kNN fit): the part shows no fixed "
                    "layout (%s: a surface, or parts that lie any way round); --autoencoder global --ae-keep always "
                    "trains it anyway", why)
        else:
            log.info("whole-image branch fused: layout strength %s", "not tested" if strength is None
                     else f"{strength:.2f} >= {LAYOUT_STRENGTH}")
        return fused

    def _guard(self, suspects: list[Suspect]) -> None:
        """Tell about training images that look unlike the rest; stop the fit when asked to."""
        if not suspects:
            return
        listing = "; ".join(f"{s.name} (score {s.score:.4g} > {s.threshold:.4g} set by the others, "
                            f"{s.ratio:.2f}x the median)" for s in suspects)
        if self.config.contamination == "fail":
            raise ContaminationError(f"{len(suspects)} training image(s) look unlike the other good ones and may be "
                                     f"defective: {listing}. Check them, remove them from the training folder, or "
                                     "fit with --contamination drop", suspects)
        log.warning("%d training image(s) look unlike the other good ones and may be defective: %s", len(suspects),
                    listing)

    def _manifest(self, n_train: int, n_cal: int, digests: list[str], skipped: list[str], fit_seconds: float,
                  ae_stats: dict[str, Any], n_set: int, calibration: str, streamed: bool = False) -> Manifest:
        import torchvision

        cfg = self.config
        backbone = self.embedder.backbone
        spec = backbone.spec
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # without tile when it is off: such models load in releases before it; likewise without autoencoder
            # "auto" where it trained nothing: a plain kNN model, which a release before "auto" reads as "none" and
            # this one as the default it was fitted with
            "config": {k: v for k, v in cfg.to_dict().items()
                       if not (k == "autoencoder" and v == "auto" and self.autoencoder_ is None)},
            "backbone": {"name": spec.name, "layers": list(spec.layers), "weights_source": backbone.source,
                         "weights_sha256": backbone.checksum},
            "preprocessing": {**self.embedder.preprocessing.to_dict(), **tile_section(cfg.tile, cfg.image_size)},
            "features": {"aggregation": "3x3 average pool per layer, deeper layer resized to the first grid",
                         "layer_dims": layer_dims(spec.channels, cfg.target_dim), "dim": self.knn.stats_["full_dim"]},
            **self.knn.describe(),
            **self.decision.sections(),
            "training": {"n_images": n_train, "n_calibration_images": n_cal, "n_skipped": len(skipped),
                         "images_sha256": hash_inputs(digests), "fit_seconds": round(fit_seconds, 2),
                         "device": str(self.device), "calibration": calibration,
                         "left_out_seconds": round(self._left_out_seconds, 2),
                         "patches_on_disk": streamed,
                         "suspects": [s.to_dict() for s in self.suspects_],
                         "suspects_action": cfg.contamination if self.suspects_ else None,
                         "left_out_of_threshold": self._outliers,
                         **({"turned_copies": self._turned} if self._turned else {}),
                         **({"second_opinion": self._second} if self._second else {}),
                         **({"layout_strength": round(self._layout, 4)} if self._layout is not None else {})},
            "library_versions": {"anomaly_service": __version__, "torch": torch.__version__,
                                 "torchvision": torchvision.__version__, "faiss": faiss.__version__,
                                 "numpy": np.__version__, "python": platform.python_version()},
        }
        if self.autoencoder_ is not None:
            out["autoencoder"] = {"version": 1, **self.autoencoder_.describe(), "training": ae_stats,
                                  "calibration": self.decision.scorer_calibrations["autoencoder"].to_dict()}
        out["calibration_set"] = {"file": CALIBRATION_FILE, "n_images": n_set, "dtype": "float16",
                                  "dim": int(self.knn.index_.d)}
        if self.catalog_ is not None and self.knn.provenance_ is not None:
            out["evidence"] = {"file": CATALOG_FILE, "n_images": len(self.catalog_),
                               "thumbnail_side": THUMBNAIL_SIDE}
        if self.mask_ is not None:
            out["mask"] = self.mask_.describe()
        out["lineage"] = {"made_by": "fit"}
        return Manifest.model_validate(out)

    # ------------------------------------------------------------------ update
    @property
    def updatable(self) -> bool:
        """Whether :meth:`update` can run: the model keeps what re-calibration needs (models fitted by this
        release do; older ones need one re-fit)."""
        return self.calibration_set_ is not None and self.manifest_ is not None and \
            self.manifest_.calibration_set is not None

    def update(self, good_images: Sequence[ImageInput], known_defects: Sequence[ImageInput] = (),
               force: bool = False, *, names: Sequence[str] | None = None,
               defect_names: Sequence[str] | None = None) -> "AnomalyModel":
        """A new model whose bank also covers ``good_images``, re-calibrated; this model is left untouched
        (feedback.py says how). ``known_defects`` (images reviewed as defects) guard it: see
        :func:`~anomaly_service.feedback.update_model`."""
        from .feedback import update_model

        return update_model(self, good_images, known_defects, force, names=names, defect_names=defect_names)

    # ------------------------------------------------------------------ score
    def _check_fitted(self) -> None:
        if self.knn.index_ is None or self.decision.calibration is None:
            raise NotFittedError("the model is not fitted; call fit() or AnomalyModel.load()")

    def score(self, image: ImageInput) -> ScoreResult:
        """Score one image (path, bytes, array or PIL image)."""
        return next(iter(self.score_many([image])))

    def score_many(self, images: Sequence[ImageInput], desc: str | None = None) -> Iterator[ScoreResult]:
        """Score images in input order, batching those that share a working size through the backbone."""
        self._check_fitted()
        decode_ms, arrays = [], []
        for src in images:
            t0 = time.perf_counter()
            arrays.append(load_image(src, self.limits))
            decode_ms.append((time.perf_counter() - t0) * 1000)
        for i, (raw, ms, shape) in enumerate(self._raw_many(arrays, desc)):
            yield self.decision.result(raw, StageTimer(ms={"decode": decode_ms[i], **ms}), shape)

    def _raw_many(self, arrays: list[np.ndarray], desc: str | None = None, grids: dict[int, np.ndarray] | None = None
                  ) -> Iterator[tuple[dict[str, RawScore], dict[str, float], tuple[int, ...]]]:
        """Per image, in input order: each scorer's raw (score, map), per-stage milliseconds, image shape.
        With ``grids``, each image's patch-embedding grid (kept dimensions, float16) is stored there by index."""
        results: dict[int, tuple[dict[str, RawScore], dict[str, float], tuple[int, ...]]] = {}
        next_out = 0
        with progress_bar(self.progress and len(arrays) > 1, total=len(arrays), desc=desc or "scoring",
                          unit="img") as bar:
            for batch in self.embedder.groups(arrays):
                timer = StageTimer()
                embedded = self.embedder.embed([arrays[i] for i in batch], keep=self.knn.keep, timer=timer)
                opinions = {s.name: s.score(embedded, timer) for s in self.scorers}
                if grids is not None:
                    half = [e.to(torch.float16).cpu().numpy() for e in embedded.per_image()]
                    grids.update({i: half[j] for j, i in enumerate(batch)})
                for j, i in enumerate(batch):
                    results[i] = ({name: out[j] for name, out in opinions.items()}, timer.ms, arrays[i].shape)
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
        manifest, files = read_artifact(path)
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
                model.mask_ = InspectionMask.from_model(manifest.mask, files)
            except ModelFormatError as exc:
                raise ModelFormatError(f"{path}: {exc}") from None
        pp = manifest.preprocessing
        base = model.embedder.preprocessing
        # the model's own normalization, so a model keeps scoring as it was fitted if a default changes
        model.embedder.preprocessing = dataclasses.replace(
            base, reference_side=pp.reference_side, mean=tuple(pp.mean) if pp.mean else base.mean,
            std=tuple(pp.std) if pp.std else base.std, squash=model.config.resize == "squash")
        model.manifest_ = manifest
        try:
            model.version_id_ = version_id(manifest.created_at, fingerprint(path))
        except OSError:  # the version label is informational; the model itself was read and verified
            model.version_id_ = None
        # the backbone now (not lazily): a weights mismatch fails at load time, not on the first request
        model.embedder.load_backbone(manifest.backbone.weights_sha256)
        model.knn.place(model.device, knn_precision)
        model.embedder.prepare_runtime()  # export now: a failure shows at load (serve start-up), not per request
        return model

    def __repr__(self) -> str:
        state = f"bank={self.knn.bank_size}" if self.knn.index_ is not None else "unfitted"
        return f"AnomalyModel(backbone={self.config.backbone!r}, {state})"
