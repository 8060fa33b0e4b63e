"""The library API: ``AnomalyModel().fit(images)``, ``.score(image)``, ``.save(path)``, ``AnomalyModel.load(path)``.

Data flows one way: image -> preprocessing -> backbone features -> patch embeddings -> selected dimensions ->
kNN against the coreset bank -> patch scores -> image score and anomaly map -> calibrated decision. The CLI and the
HTTP service are thin shells over this class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import torch

from . import __version__
from .artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    arrays_to_bytes,
    bytes_to_arrays,
    read_artifact,
    write_artifact,
)
from .autoencoder import AE_KINDS, AEConfig, ReconstructionScorer
from .backbones import LoadedBackbone, get_spec, load_backbone
from .calibration import Calibration, calibrate
from .coreset import coreset_size, greedy_coreset
from .device import resolve_device
from .errors import ConfigError, ImageLoadError, ModelFormatError, NotFittedError
from .features import embed_patches, layer_dims
from .fusion import FUSION_RULES, fuse
from .heatmap import anomaly_map
from .images import DEFAULT_LIMITS, ImageInput, ImageLimits, load_image
from .index import (
    INDEX_KINDS,
    build_index,
    describe_search,
    deserialize,
    resolve_precision,
    serialize,
    to_search_device,
)
from .onnx_backbone import OnnxExtractor, resolve_runtime
from .preprocessing import Preprocessing
from .progress import progress_bar
from .scoring import IMAGE_SCORE_MODES, image_score, patch_scores
from .selection import SELECTION_MODES, select_features

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Everything that defines a fitted model. Defaults are the measured best (see README, benchmarks/)."""

    backbone: str = "resnet50"
    image_size: int = 256  # longer side at the network's input (of the median training image), aspect kept
    resize: str = "fixed-scale"  # fixed-scale | longer-side (see preprocessing.py)
    target_dim: int = 1024  # embedding dimension before selection (PatchCore's projection)
    layer_balance: bool = True  # equal weight per layer in the distance, as PatchCore pools them (features.py)
    selection: str = "std"  # std | random | none
    selection_keep: float = 0.5  # fraction (<= 1) or count (> 1) of embedding dimensions kept
    coreset_ratio: float = 0.1
    coreset_max: int | None = None  # optional cap on the bank size, for very large normal sets
    projection_dim: int = 128  # random projection used only for coreset distances
    k: int = 1  # nearest neighbours averaged into a patch score
    image_score: str = "map-max"  # map-max (hottest heatmap pixel) | max (raw patch max) | reweighted (paper's Eq. 7)
    reweight_neighbours: int = 9
    index: str = "flat"  # flat | ivf | ivfpq
    nprobe: int = 8
    sigma: float = 4.0  # Gaussian smoothing of the map, in working-resolution pixels
    calibration_fraction: float = 0.1  # normal images held out of the bank to set the threshold
    threshold_sigma: float = 3.0
    batch_size: int = 8
    seed: int = 0
    # optional second opinion (see autoencoder.py, fusion.py); off by default: it must earn its place per line
    autoencoder: str = "none"  # none | features | pixels
    ae_epochs: int = 60
    fusion: str = "mean"  # mean | max | knn | autoencoder
    fusion_weight: float = 0.5  # weight of the kNN opinion in the mean

    def validate(self) -> None:
        get_spec(self.backbone)
        checks = [
            (self.selection in SELECTION_MODES, f"selection must be one of {SELECTION_MODES}"),
            (self.image_score in IMAGE_SCORE_MODES, f"image_score must be one of {IMAGE_SCORE_MODES}"),
            (self.index in INDEX_KINDS, f"index must be one of {INDEX_KINDS}"),
            (0 < self.coreset_ratio <= 1, "coreset_ratio must be in (0, 1]"),
            (self.selection_keep > 0, "selection_keep must be > 0"),
            (self.image_size >= 32, "image_size must be >= 32"),
            (self.resize in ("fixed-scale", "longer-side"), "resize must be fixed-scale or longer-side"),
            (self.k >= 1, "k must be >= 1"),
            (0 <= self.calibration_fraction < 1, "calibration_fraction must be in [0, 1)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.sigma >= 0, "sigma must be >= 0"),
            (self.autoencoder in ("none", *AE_KINDS), f"autoencoder must be none or one of {AE_KINDS}"),
            (self.fusion in FUSION_RULES, f"fusion must be one of {FUSION_RULES}"),
            (0.0 <= self.fusion_weight <= 1.0, "fusion_weight must be in [0, 1]"),
            (self.ae_epochs >= 1, "ae_epochs must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass
class ScoreResult:
    """One image's verdict. ``anomaly_map`` has the input's height and width, in the same units as ``score``."""

    score: float
    normalized_score: float
    is_anomaly: bool
    threshold: float
    anomaly_map: np.ndarray
    image_width: int
    image_height: int
    timing_ms: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    # with an autoencoder: each scorer's own opinion {"knn": {...}, "autoencoder": {...}}; the fields above are
    # then the fused decision
    scorers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def normalized_map(self) -> np.ndarray:
        """The map on the model's global scale: 0 = typical normal pixel, 1.0 = the decision threshold."""
        assert self.calibration is not None
        return np.asarray(self.calibration.normalize(self.anomaly_map), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        out = {"score": self.score, "normalized_score": self.normalized_score, "is_anomaly": self.is_anomaly,
               "threshold": self.threshold, "image_width": self.image_width, "image_height": self.image_height,
               "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}
        if self.scorers:
            out["scorers"] = self.scorers
        return out


def _pixel_sample(amap: np.ndarray, n: int = 4096) -> np.ndarray:
    """About ``n`` evenly spaced pixels of a map: enough for the calibration floor, cheap for big images."""
    return amap.ravel()[:: max(1, amap.size // n)]


def _hash_inputs(digests: list[str]) -> str:
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()


class AnomalyModel:
    """PatchCore anomaly detector with a calibrated decision threshold.

    >>> model = AnomalyModel(backbone="efficientnet_lite0").fit(paths_of_good_images)
    >>> result = model.score("photo.png"); result.is_anomaly, result.anomaly_map.shape
    >>> model.save("models/bottle"); AnomalyModel.load("models/bottle")
    """

    def __init__(self, config: ModelConfig | None = None, *, weights: str | Path | None = None,
                 device: str = "auto", progress: bool = True, limits: ImageLimits = DEFAULT_LIMITS,
                 knn_precision: str = "auto", runtime: str = "auto", **params: Any):
        config = dataclasses.replace(config or ModelConfig(), **params)
        config.validate()
        resolve_precision(knn_precision)  # fail on a bad value now, not at the first search
        self._onnx: OnnxExtractor | None = None
        # runtime only (not saved): fp32, bf16 shortlist + exact re-rank, or auto (bf16 where the CPU has it)
        self.knn_precision = knn_precision
        self.config = config
        self.weights = weights
        self.device = resolve_device(device)
        # backbone execution (not saved): onnx = ONNX Runtime on the CPU; auto = onnx when it is installed
        self.requested_runtime = runtime
        self.runtime = resolve_runtime(runtime, self.device.type)
        self.progress = progress
        self.limits = limits
        self._backbone: LoadedBackbone | None = None
        self.preprocessing = Preprocessing(config.image_size, get_spec(config.backbone).mean,
                                           get_spec(config.backbone).std, get_spec(config.backbone).stride)
        # fitted state
        self.index_: faiss.Index | None = None
        self._search_index: faiss.Index | None = None
        self.selected_indices_: np.ndarray | None = None
        self._selected_t: torch.Tensor | None = None
        self.calibration_: Calibration | None = None  # of the final decision (fused when there is an autoencoder)
        self.scorer_calibrations_: dict[str, Calibration] = {}
        self.autoencoder_: ReconstructionScorer | None = None
        self._holdout_raw: list[dict[str, tuple[float, np.ndarray]]] = []
        self.manifest_: dict[str, Any] | None = None

    @property
    def knn_search(self) -> str | None:
        """Which kNN search scoring runs on this machine (None until fitted or loaded)."""
        return describe_search(self._search_index)

    # ------------------------------------------------------------------ features
    @property
    def backbone(self) -> LoadedBackbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.config.backbone, self.weights, self.device, progress=self.progress)
        return self._backbone

    def _prepare_runtime(self) -> None:
        """Export the extractor to ONNX Runtime once; under ``auto`` a failed export falls back to PyTorch."""
        if self.runtime != "onnx" or self._onnx is not None:
            return
        try:
            self._onnx = OnnxExtractor(self.backbone.extractor)
        except Exception as exc:  # export or session errors vary by op and version
            if self.requested_runtime == "onnx":
                raise ConfigError(f"could not run the backbone in ONNX Runtime: {exc}") from exc
            log.warning("ONNX Runtime unavailable for this backbone (%s); using PyTorch", exc)
            self.runtime = "torch"

    def _extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's tapped maps, through ONNX Runtime when asked (CPU only) or PyTorch."""
        self._prepare_runtime()
        if self._onnx is not None and self.runtime == "onnx":
            return self._onnx(x)
        return self.backbone.extractor(x)

    def _embed_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Images (same working size) -> list of ``(h, w, D)`` full embeddings (before selection)."""
        size = self.preprocessing.working_size(*images[0].shape[:2])
        x = torch.stack([self.preprocessing.to_tensor(im, size) for im in images]).to(self.device)
        maps = self._extract(x)
        emb = embed_patches(maps, self.config.target_dim, self.config.layer_balance)
        return list(emb)

    def _grouped(self, images: Sequence[np.ndarray]) -> Iterator[list[int]]:
        """Batches of indices whose images share a working size (so they stack into one tensor)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.preprocessing.working_size(*im.shape[:2]), []).append(i)
        for idxs in groups.values():
            for s in range(0, len(idxs), self.config.batch_size):
                yield idxs[s : s + self.config.batch_size]

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> "AnomalyModel":
        """Fit the memory bank on normal images (paths, bytes or arrays); unreadable ones are skipped with a log."""
        cfg = self.config
        t_start = time.perf_counter()
        backbone = self.backbone  # fails here, before any image work, if weights are unavailable
        arrays, digests, skipped = self._load_all(images, names)
        if len(arrays) < 2:
            raise ConfigError(f"need at least 2 readable normal images to fit, got {len(arrays)}")
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(arrays))
        n_cal = int(round(len(arrays) * cfg.calibration_fraction))
        n_cal = min(max(n_cal, 1 if cfg.calibration_fraction > 0 else 0), len(arrays) - 1)
        cal_ids, train_ids = np.sort(order[:n_cal]), np.sort(order[n_cal:])
        if cfg.resize == "fixed-scale":
            ref = float(np.median([max(a.shape[:2]) for a in arrays]))
            self.preprocessing = dataclasses.replace(self.preprocessing, reference_side=ref)
        train = [arrays[i] for i in train_ids]

        # 1. patch embeddings of every training image
        feats: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        with progress_bar(self.progress, total=len(train), desc="features", unit="img") as bar:
            for batch in self._grouped(train):
                for e in self._embed_batch([train[i] for i in batch]):
                    feats.append(e.reshape(-1, e.shape[-1]))
                    grids.append((e.shape[0], e.shape[1]))
                bar.update(len(batch))
        bank = torch.cat(feats)
        del feats
        n_patches, full_dim = bank.shape
        # 2. std-based feature selection over the whole normal bank
        selected = select_features(bank, cfg.selection, cfg.selection_keep, cfg.seed)
        sel_t = torch.from_numpy(selected).to(bank.device)
        bank = bank.index_select(1, sel_t)
        ae_samples: list[torch.Tensor] = []
        if cfg.autoencoder == "features":  # per-image grids of the selected features (views of the bank)
            ae_samples = [t.reshape(h, w, -1) for t, (h, w) in zip(torch.split(bank, [h * w for h, w in grids]), grids)]
        # 3. greedy coreset
        n_core = coreset_size(n_patches, cfg.coreset_ratio, cfg.coreset_max)
        t_core = time.perf_counter()
        core_ids = greedy_coreset(bank, n_core, cfg.projection_dim, cfg.seed, progress=self.progress)
        coreset_seconds = time.perf_counter() - t_core
        memory = bank[torch.from_numpy(core_ids).to(bank.device)].cpu().numpy().astype(np.float32)
        del bank
        # 4. index
        self.index_ = build_index(memory, cfg.index, nprobe=cfg.nprobe, seed=cfg.seed)
        self.selected_indices_ = selected
        self._prepare_search()
        # 5. optional autoencoder on the same normal images
        ae_stats: dict[str, float] = {}
        if cfg.autoencoder != "none":
            if cfg.autoencoder == "pixels":
                ae_samples = [self.preprocessing.to_tensor(im, self.preprocessing.working_size(*im.shape[:2]))
                              .to(self.device) for im in train]
            t_ae = time.perf_counter()
            self.autoencoder_ = ReconstructionScorer(AEConfig(kind=cfg.autoencoder, epochs=cfg.ae_epochs,
                                                              seed=cfg.seed), ae_samples[0].shape[-1]
                                                     if cfg.autoencoder == "features" else 3)
            ae_stats = self.autoencoder_.fit(ae_samples, progress=self.progress)
            ae_stats["seconds"] = round(time.perf_counter() - t_ae, 2)
        del ae_samples
        # 6. calibration on held-out normals
        if n_cal:
            cal_images = [arrays[i] for i in cal_ids]
        else:  # no hold-out asked for: scores of training images are optimistic, so the threshold is too
            log.warning("calibration_fraction=0: threshold from training images, expect more false alarms")
            cal_images = train[: min(len(train), 20)]
        self._calibrate(cal_images)
        fit_seconds = time.perf_counter() - t_start
        self.manifest_ = self._manifest(
            backbone, full_dim, n_patches, len(train), n_cal, digests, skipped, fit_seconds, coreset_seconds
        )
        if self.autoencoder_ is not None:
            self.manifest_["autoencoder"] = {"version": 1, **self.autoencoder_.describe(), "training": ae_stats}
        log.info("fitted on %d images (%d held out) in %.1fs; bank %d of %d patches",
                 len(train), n_cal, fit_seconds, n_core, n_patches)
        return self

    def _calibrate(self, images: list[np.ndarray]) -> None:
        """Set each scorer's threshold, and the fused one, from held-out normal images."""
        cfg = self.config
        per: dict[str, tuple[list[float], list[np.ndarray]]] = {}
        raws = []
        for raw, _, _ in self._raw_many(images, desc="calibration"):
            raws.append(raw)
            for name, (score, amap) in raw.items():
                scores, pixels = per.setdefault(name, ([], []))
                scores.append(score)
                pixels.append(_pixel_sample(amap))
        self.scorer_calibrations_ = {name: calibrate(np.array(s), np.concatenate(p), cfg.threshold_sigma)
                                     for name, (s, p) in per.items()}
        if self.autoencoder_ is None:
            self.calibration_ = self.scorer_calibrations_["knn"]
            self.scorer_calibrations_ = {}
            return
        self._holdout_raw = raws  # kept in memory so set_fusion can re-calibrate without re-fitting
        self._calibrate_fused()

    def _calibrate_fused(self) -> None:
        fused_scores, fused_pixels = [], []
        for raw in self._holdout_raw:
            score, amap = self._fuse(raw)
            fused_scores.append(score)
            fused_pixels.append(_pixel_sample(amap))
        self.calibration_ = calibrate(np.array(fused_scores), np.concatenate(fused_pixels),
                                      self.config.threshold_sigma)

    def set_fusion(self, rule: str, weight: float | None = None) -> "AnomalyModel":
        """Change how the scorers combine, right after ``fit`` (re-calibrated on the same held-out normals)."""
        if self.autoencoder_ is None:
            raise ConfigError("set_fusion needs a model fitted with an autoencoder")
        if not self._holdout_raw:
            raise ConfigError("set_fusion works right after fit(); for a loaded model, re-fit with --fusion")
        self.config = dataclasses.replace(self.config, fusion=rule,
                                          fusion_weight=self.config.fusion_weight if weight is None else weight)
        self.config.validate()
        self._calibrate_fused()
        if self.manifest_ is not None:
            self.manifest_["config"] = dataclasses.asdict(self.config)
            self.manifest_["calibration"] = self.calibration_.to_dict() if self.calibration_ else None
        return self

    def _fuse(self, raw: dict[str, tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
        """Raw per-scorer results -> fused (score, map) on the scorers' normalised scales."""
        k, a = self.scorer_calibrations_["knn"], self.scorer_calibrations_["autoencoder"]
        cfg = self.config
        score = fuse(float(k.normalize(raw["knn"][0])), float(a.normalize(raw["autoencoder"][0])), cfg.fusion,
                     cfg.fusion_weight)
        amap = fuse(k.normalize(raw["knn"][1]), a.normalize(raw["autoencoder"][1]), cfg.fusion, cfg.fusion_weight)
        return float(score), np.asarray(amap, dtype=np.float32)

    def _load_all(self, images: Sequence[ImageInput], names: Sequence[str] | None):
        arrays, digests, skipped = [], [], []
        for i, src in enumerate(progress_bar(self.progress, images, desc="loading", unit="img")):
            name = names[i] if names is not None else (str(src) if isinstance(src, (str, Path)) else f"image[{i}]")
            try:
                arr = load_image(src, self.limits, name=name)
            except ImageLoadError as exc:
                log.warning("skipped: %s", exc)
                skipped.append(str(exc))
                continue
            arrays.append(arr)
            digests.append(hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest())
        return arrays, digests, skipped

    def _prepare_search(self) -> None:
        assert self.index_ is not None and self.selected_indices_ is not None
        self._selected_t = torch.from_numpy(self.selected_indices_).to(self.device)
        self._search_index = to_search_device(self.index_, self.device.type == "cuda", self.knn_precision,
                                              device=str(self.device))

    def _manifest(self, backbone: LoadedBackbone, full_dim: int, n_patches: int, n_train: int, n_cal: int,
                  digests: list[str], skipped: list[str], fit_seconds: float, coreset_seconds: float) -> dict[str, Any]:
        import torchvision

        cfg = self.config
        spec = backbone.spec
        assert self.index_ is not None and self.selected_indices_ is not None and self.calibration_ is not None
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg),
            "backbone": {"name": spec.name, "layers": list(spec.layers), "weights_source": backbone.source,
                         "weights_sha256": backbone.checksum},
            "preprocessing": self.preprocessing.to_dict(),
            "features": {"aggregation": "3x3 average pool per layer, deeper layer resized to the first grid",
                         "layer_dims": layer_dims(spec.channels, cfg.target_dim), "dim": full_dim},
            "selection": {"mode": cfg.selection, "keep": cfg.selection_keep,
                          "n_selected": int(len(self.selected_indices_)), "of": full_dim},
            "coreset": {"ratio": cfg.coreset_ratio, "size": int(self.index_.ntotal), "from_patches": n_patches,
                        "projection_dim": cfg.projection_dim, "seconds": round(coreset_seconds, 2)},
            "index": {"kind": cfg.index, "dim": int(self.index_.d), "ntotal": int(self.index_.ntotal)},
            "scoring": {"k": cfg.k, "image_score": cfg.image_score, "reweight_neighbours": cfg.reweight_neighbours,
                        "sigma": cfg.sigma},
            "calibration": self.calibration_.to_dict(),
            "training": {"n_images": n_train, "n_calibration_images": n_cal, "n_skipped": len(skipped),
                         "images_sha256": _hash_inputs(digests), "fit_seconds": round(fit_seconds, 2),
                         "device": str(self.device)},
            "library_versions": {"anomaly_service": __version__, "torch": torch.__version__,
                                 "torchvision": torchvision.__version__, "faiss": faiss.__version__,
                                 "numpy": np.__version__, "python": platform.python_version()},
        }

    # ------------------------------------------------------------------ score
    def _check_fitted(self) -> None:
        if self.index_ is None:
            raise NotFittedError("the model is not fitted; call fit() or AnomalyModel.load()")

    def score(self, image: ImageInput) -> ScoreResult:
        """Score one image (path, bytes, array or PIL image)."""
        return next(iter(self.score_many([image])))

    def score_many(self, images: Sequence[ImageInput], desc: str | None = None) -> Iterator[ScoreResult]:
        """Score images in input order, batching those that share a working size through the backbone."""
        self._check_fitted()
        decode_ms = []
        arrays = []
        for src in images:
            t0 = time.perf_counter()
            arrays.append(load_image(src, self.limits))
            decode_ms.append((time.perf_counter() - t0) * 1000)
        for i, (raw, timing, shape) in enumerate(self._raw_many(arrays, desc)):
            timing = {"decode": decode_ms[i], **timing}
            yield self._result(raw, timing, shape)

    def _result(self, raw: dict[str, tuple[float, np.ndarray]], timing: dict[str, float],
                shape: tuple[int, ...]) -> ScoreResult:
        cal = self.calibration_
        assert cal is not None, "not calibrated"
        scorers: dict[str, dict[str, Any]] = {}
        if self.autoencoder_ is None:
            score, amap = raw["knn"]
        else:
            t0 = time.perf_counter()
            score, amap = self._fuse(raw)
            timing["fuse"] = (time.perf_counter() - t0) * 1000
            for name, (s, _) in raw.items():
                c = self.scorer_calibrations_[name]
                scorers[name] = {"score": s, "normalized_score": float(c.normalize(s)), "threshold": c.threshold,
                                 "is_anomaly": bool(s > c.threshold)}
        timing["total"] = sum(timing.values())
        return ScoreResult(score=score, normalized_score=float(cal.normalize(score)),
                           is_anomaly=bool(score > cal.threshold), threshold=cal.threshold, anomaly_map=amap,
                           image_width=shape[1], image_height=shape[0], timing_ms=timing, calibration=cal,
                           scorers=scorers)

    def _raw_many(self, arrays: list[np.ndarray], desc: str | None = None
                  ) -> Iterator[tuple[dict[str, tuple[float, np.ndarray]], dict[str, float], tuple[int, ...]]]:
        """Per image, in input order: each scorer's raw (score, map), per-stage milliseconds, image shape."""
        results: dict[int, tuple] = {}
        bar = progress_bar(self.progress and len(arrays) > 1, total=len(arrays), desc=desc or "scoring", unit="img")
        next_out = 0
        for batch in self._grouped(arrays):
            for i, (raw, timing) in zip(batch, self._score_batch([arrays[i] for i in batch])):
                results[i] = (raw, timing, arrays[i].shape)
            bar.update(len(batch))
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
        bar.close()

    def _score_batch(self, images: list[np.ndarray]) -> list[tuple[dict[str, tuple[float, np.ndarray]], dict[str, float]]]:
        cfg = self.config
        assert self.index_ is not None and self._selected_t is not None and self._search_index is not None
        n = len(images)
        t0 = time.perf_counter()
        size = self.preprocessing.working_size(*images[0].shape[:2])
        x = torch.stack([self.preprocessing.to_tensor(im, size) for im in images]).to(self.device)
        t1 = time.perf_counter()
        maps = self._extract(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        # pooled, selected and aggregated in one pass: only the kept dimensions are ever computed
        emb = embed_patches(maps, cfg.target_dim, cfg.layer_balance, keep=self._selected_t)
        t_sel = time.perf_counter()
        _, h, w, d = emb.shape
        queries = emb.reshape(-1, d).float().cpu().numpy()
        t3 = time.perf_counter()
        scores, nearest = patch_scores(self._search_index, queries, cfg.k)
        t4 = time.perf_counter()
        ae_grids = None
        if self.autoencoder_ is not None:
            ae_grids = self.autoencoder_.error_grid(emb if self.autoencoder_.config.kind == "features" else x)
            ae_grids = ae_grids.float().cpu().numpy()
        t_ae = (time.perf_counter() - t4) * 1000 / n
        out = []
        per = h * w
        for j, im in enumerate(images):
            t5 = time.perf_counter()
            s = scores[j * per : (j + 1) * per]
            amap = anomaly_map(s.reshape(h, w), size, im.shape[:2], cfg.sigma)
            img_score = image_score(s, queries[j * per : (j + 1) * per], nearest[j * per : (j + 1) * per],
                                    self.index_, cfg.image_score, cfg.reweight_neighbours, amap)
            raw = {"knn": (img_score, amap)}
            if ae_grids is not None:
                ae_map = anomaly_map(ae_grids[j], size, im.shape[:2], cfg.sigma)
                raw["autoencoder"] = (float(ae_map.max()), ae_map)
            t6 = time.perf_counter()
            timing = {"preprocess": (t1 - t0) * 1000 / n, "backbone": (t2 - t1) * 1000 / n,
                      "embed": (t_sel - t2) * 1000 / n, "select": (t3 - t_sel) * 1000 / n,
                      "knn": (t4 - t3) * 1000 / n, "map": (t6 - t5) * 1000}
            if ae_grids is not None:
                timing["autoencoder"] = t_ae
            out.append((raw, timing))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the model atomically as a directory (see artifact.py); returns the resolved path."""
        self._check_fitted()
        assert self.index_ is not None and self.selected_indices_ is not None and self.manifest_ is not None
        arrays = {"selected_indices": self.selected_indices_}
        manifest = dict(self.manifest_)
        manifest["calibration"] = self.calibration_.to_dict() if self.calibration_ else None
        files = {"index.faiss": serialize(self.index_), "arrays.npz": arrays_to_bytes(arrays)}
        if self.autoencoder_ is not None:
            files["autoencoder.pt"] = self.autoencoder_.to_bytes()
            manifest["autoencoder"] = {**manifest["autoencoder"],
                                       "calibration": self.scorer_calibrations_["autoencoder"].to_dict()}
            manifest["fusion"] = {"rule": self.config.fusion, "weight": self.config.fusion_weight,
                                  "knn_calibration": self.scorer_calibrations_["knn"].to_dict()}
        return write_artifact(path, manifest, files)

    @classmethod
    def load(cls, path: str | Path, *, weights: str | Path | None = None, device: str = "auto",
             progress: bool = False, limits: ImageLimits = DEFAULT_LIMITS, knn_precision: str = "auto",
             runtime: str = "auto") -> "AnomalyModel":
        """Load and validate a saved model. The backbone weights are re-loaded and checked against the manifest."""
        manifest, files = read_artifact(path)
        try:
            # manifests written before the layer_balance option existed were fitted without it
            config = ModelConfig(**{"layer_balance": False, **manifest["config"]})
            config.validate()
        except (TypeError, ConfigError) as exc:
            raise ModelFormatError(f"{path}: manifest config is invalid ({exc})") from None
        if weights is None:
            src = manifest["backbone"].get("weights_source", "")
            if src.startswith("file:") and Path(src[5:]).is_file():
                weights = src[5:]
        model = cls(config, weights=weights, device=device, progress=progress, limits=limits,
                    knn_precision=knn_precision, runtime=runtime)
        arrays = bytes_to_arrays(files["arrays.npz"])
        if "selected_indices" not in arrays:
            raise ModelFormatError(f"{path}: arrays.npz lacks selected_indices")
        model.index_ = deserialize(files["index.faiss"])
        model.selected_indices_ = arrays["selected_indices"].astype(np.int64)
        sel = model.selected_indices_
        full_dim = manifest["features"]["dim"]
        if model.index_.d != len(sel) or (len(sel) and (sel.min() < 0 or sel.max() >= full_dim)):
            raise ModelFormatError(f"{path}: index dimension {model.index_.d} does not match "
                                   f"{len(sel)} selected features of {full_dim}")
        if model.index_.ntotal != manifest["coreset"]["size"]:
            raise ModelFormatError(f"{path}: index holds {model.index_.ntotal} patches, manifest says "
                                   f"{manifest['coreset']['size']}")
        if manifest["calibration"] is None:
            raise ModelFormatError(f"{path}: model has no calibration")
        model.calibration_ = Calibration.from_dict(manifest["calibration"])
        if manifest.get("autoencoder"):
            ae = manifest["autoencoder"]
            if "autoencoder.pt" not in files or "fusion" not in manifest:
                raise ModelFormatError(f"{path}: manifest lists an autoencoder but its weights or fusion are missing")
            if ae.get("version") != 1:
                raise ModelFormatError(f"{path}: autoencoder format version {ae.get('version')} is not supported")
            model.autoencoder_ = ReconstructionScorer.from_bytes(files["autoencoder.pt"], ae["config"],
                                                                 ae["channels"], model.device)
            model.scorer_calibrations_ = {"knn": Calibration.from_dict(manifest["fusion"]["knn_calibration"]),
                                          "autoencoder": Calibration.from_dict(ae["calibration"])}
        pp = manifest["preprocessing"]
        try:  # the model's own normalisation, so a model keeps scoring as it was fitted if a default changes
            mean = tuple(float(v) for v in pp.get("mean", model.preprocessing.mean))
            std = tuple(float(v) for v in pp.get("std", model.preprocessing.std))
        except (TypeError, ValueError):
            mean = std = ()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ModelFormatError(f"{path}: manifest preprocessing mean/std must be three numbers (std > 0)")
        model.preprocessing = dataclasses.replace(model.preprocessing, reference_side=pp.get("reference_side"),
                                                  mean=mean, std=std)
        model.manifest_ = manifest
        # Load the backbone now (not lazily) so a weights mismatch fails at load time, not on the first request.
        model._backbone = load_backbone(config.backbone, weights, model.device, progress=progress,
                                        expected_checksum=manifest["backbone"]["weights_sha256"])
        if hasattr(model.index_, "nprobe"):
            model.index_.nprobe = config.nprobe
        model._prepare_search()
        model._prepare_runtime()  # export now: a failure shows at load (serve start-up), not on the first request
        return model

    def __repr__(self) -> str:
        state = f"bank={self.index_.ntotal}" if self.index_ is not None else "unfitted"
        return f"AnomalyModel(backbone={self.config.backbone!r}, {state})"
