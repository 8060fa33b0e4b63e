"""Images -> locally aware patch embeddings: preprocessing, the frozen backbone and its runtime, one ``embed()``.

The backbone loads lazily (a config can be built and validated without weights), runs in ONNX Runtime on the
CPU when asked or available (``auto`` falls back to PyTorch if the export fails), and images are grouped by
working size so that each group stacks into one tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .backbones import LoadedBackbone, get_spec, load_backbone
from .errors import ConfigError
from .features import embed_patches
from .onnx_backbone import OnnxExtractor, resolve_runtime
from .preprocessing import Preprocessing
from .timing import StageTimer

if TYPE_CHECKING:
    from .inspection_mask import InspectionMask

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """One batch of same-size images after the embedder: what every scorer reads."""

    features: torch.Tensor  # (B, h, w, D) patch embeddings (only the kept dimensions when a selection is given)
    work_size: tuple[int, int]  # (h, w) the network saw
    shapes: list[tuple[int, ...]]  # each input image's own shape
    inspect: InspectionMask | None = None  # the pixels that were seen and count (inspection_mask.py); None: all


class Embedder:
    """Preprocessing + backbone + runtime + patch embedding, for one model's settings."""

    def __init__(self, backbone: str, *, image_size: int, target_dim: int, layer_balance: bool, batch_size: int,
                 weights: str | Path | None, device: torch.device, runtime: str = "auto", progress: bool = True):
        spec = get_spec(backbone)
        self.backbone_name = backbone
        self.target_dim = target_dim
        self.layer_balance = layer_balance
        self.batch_size = batch_size
        self.weights = weights
        self.device = device
        self.progress = progress
        self.requested_runtime = runtime
        self.runtime = resolve_runtime(runtime, device.type)  # what actually runs; may fall back to torch
        self.preprocessing = Preprocessing(image_size, spec.mean, spec.std, spec.stride)
        self._backbone: LoadedBackbone | None = None
        self._onnx: OnnxExtractor | None = None
        self.inspect: InspectionMask | None = None  # the inspection mask: the network sees nothing outside it

    # ------------------------------------------------------------------ backbone
    @property
    def backbone(self) -> LoadedBackbone:
        """The frozen network, loaded on first use (fails here if the weights cannot be had)."""
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name, self.weights, self.device, progress=self.progress)
        return self._backbone

    def load_backbone(self, expected_checksum: str) -> None:
        """Load now and check the weights are those a saved model was fitted with."""
        self._backbone = load_backbone(self.backbone_name, self.weights, self.device, progress=self.progress,
                                       expected_checksum=expected_checksum)

    def prepare_runtime(self) -> None:
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

    @property
    def onnx_session_threads(self) -> list[int]:
        """Thread budgets with a built ONNX Runtime session (empty under PyTorch)."""
        return self._onnx.session_threads if self._onnx is not None else []

    def _extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.prepare_runtime()
        if self._onnx is not None and self.runtime == "onnx":
            return self._onnx(x)
        return self.backbone.extractor(x)

    # ------------------------------------------------------------------ images
    def fit_scale(self, shapes: Sequence[tuple[int, ...]], policy: str) -> None:
        """``fixed-scale``: one zoom for every image, from the median longer side of the training images
        (``shapes``: their ``(height, width, ...)``)."""
        if policy == "fixed-scale":
            ref = float(np.median([max(s[:2]) for s in shapes]))
            self.preprocessing = dataclasses.replace(self.preprocessing, reference_side=ref)

    def groups(self, images: Sequence[np.ndarray]) -> Iterator[list[int]]:
        """Batches of indices whose images share a working size (so they stack into one tensor)."""
        return self.groups_by_shape([im.shape for im in images])

    def groups_by_shape(self, shapes: Sequence[tuple[int, ...]]) -> Iterator[list[int]]:
        """:meth:`groups` from the images' ``(height, width, ...)`` alone (a fit batches before it decodes)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, sh in enumerate(shapes):
            by_size.setdefault(self.preprocessing.working_size(*sh[:2]), []).append(i)
        for idxs in by_size.values():
            for s in range(0, len(idxs), self.batch_size):
                yield idxs[s : s + self.batch_size]

    def embed(self, images: Sequence[np.ndarray], keep: torch.Tensor | None = None,
              timer: StageTimer | None = None) -> Embedded:
        """Same-size images -> ``(B, h, w, D)`` embeddings; with ``keep`` only those dimensions are computed."""
        timer = timer or StageTimer()
        n = len(images)
        with timer.stage("preprocess", per=n):
            size = self.preprocessing.working_size(*images[0].shape[:2])
            x = torch.stack([self.preprocessing.to_tensor(im, size) for im in images]).to(self.device)
            if self.inspect is not None:  # outside: the normalization's mean colour, so no feature sees it
                x = x * torch.tensor(self.inspect.at(size), dtype=x.dtype, device=x.device)
        with timer.stage("backbone", per=n):
            maps = self._extract(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        with timer.stage("embed", per=n):
            # pooled, selected and aggregated in one pass: only the kept dimensions are ever computed
            emb = embed_patches(maps, self.target_dim, self.layer_balance, keep=keep)
        return Embedded(features=emb, work_size=size, shapes=[im.shape for im in images], inspect=self.inspect)
