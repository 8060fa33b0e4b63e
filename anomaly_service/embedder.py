"""Images -> locally aware patch embeddings: preprocessing, the frozen backbone and its runtime, one ``embed()``.

The backbone loads lazily (a config can be built and validated without weights), runs in ONNX Runtime on the
CPU when asked or available (``auto`` falls back to PyTorch if the export fails), and images are grouped by
working size so that each group stacks into one tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .backbones import LoadedBackbone, get_spec, load_backbone, load_fitted_backbone
from .errors import ConfigError, WeightsUnavailableError
from .features import embed_patches, layer_dims
from .memory_room import PEAK_BYTES_PER_PIXEL
from .onnx_backbone import OnnxExtractor, resolve_runtime, shared_extractor
from .packing import runs_within
from .preprocessing import Preprocessing
from .timing import StageTimer

from .tiling import TileLayout, layout

if TYPE_CHECKING:
    from .inspection_mask import InspectionMask

log = logging.getLogger(__name__)

TILES_PER_GROUP = 4  # tiled: a group of images holds at most this many backbone passes' tiles (one image at least)
# a batch holds at most batch_size images of this many working pixels (the default --image-size's square), fewer
# of larger ones, one at least: the backbone's activations grow with the pixels of the whole batch
BATCH_REFERENCE_PIXELS = 256 * 256
# Peak bytes a tiled photo takes beyond its own pixels (Embedder.tile_bytes): per pixel of its tiles as the network
# is given them, the overlaps in each (the photo at the tile zoom in float, one pass's stacked tiles, patch scores),
# plus its features (FEATURE_BYTES for each kept dimension of each patch: a ResNet-50 keeps several times a Lite's),
# and per pixel of one backbone pass's tiles, the network's activations (BackboneSpec.pass_bytes): measured on a
# running service, benchmarks/tile_memory.py, docs/decisions.md "Tiled photos in the memory admission"
TILE_BYTES_PER_PIXEL = 16
FEATURE_BYTES = 4


@dataclass
class Embedded:
    """One batch of same-size images after the embedder: what every scorer reads."""

    features: torch.Tensor  # (B, h, w, D) patch embeddings (only the kept dimensions when a selection is given)
    work_size: tuple[int, int]  # (h, w) the network saw
    shapes: list[tuple[int, ...]]  # each input image's own shape
    inspect: InspectionMask | None = None  # the pixels that were seen and count (inspection_mask.py); None: all
    # with tiling (tiling.py): each image's tiles, whose grids follow each other in ``features`` image by image;
    # None: one grid per image, and ``work_size`` is each image's
    tiles: list[TileLayout] | None = None
    # an aligned model's batch (grain.py): which images are turned views; the kNN searches the others against the
    # images' own rows (knn_scorer.py). None: every image against the whole bank
    turned: list[bool] | None = None
    # per image (untiled only): for each cell of its grid, the flat index of the cell whose kNN score it takes
    # (grain.fill_sources: a turned canvas's pure-fill cells take the score of the cells they repeat); None: its own
    copied: list[np.ndarray | None] | None = None

    def searched(self) -> np.ndarray | None:
        """Which rows of ``features`` the kNN searches (the others copy a searched row's result); None: all."""
        if self.copied is None or self.tiles is not None or all(c is None for c in self.copied):
            return None
        per = int(self.features.shape[1] * self.features.shape[2])
        own = np.arange(per)
        return np.concatenate([np.ones(per, bool) if c is None else c == own for c in self.copied])

    def spread(self, values: np.ndarray, searched: np.ndarray | None) -> np.ndarray:
        """Per-row results of the ``searched`` rows -> one per row, each copied row taking its source's. With
        ``searched`` None, ``values`` holds every row: the copied rows are overwritten from their sources."""
        if self.copied is None or self.tiles is not None:
            return values
        if searched is None:
            out = values.copy()
        else:
            out = np.empty(len(searched), values.dtype)
            out[searched] = values
        per = int(self.features.shape[1] * self.features.shape[2])
        for j, c in enumerate(self.copied):
            if c is not None:
                part = out[j * per : (j + 1) * per]
                part[:] = part[c]
        return out

    def rows(self) -> list[int]:
        """How many patch rows of ``features`` each image has."""
        per = int(self.features.shape[1] * self.features.shape[2])
        return [per * t.n_tiles for t in self.tiles] if self.tiles is not None else [per] * len(self.shapes)

    def per_image(self) -> list[torch.Tensor]:
        """Each image's features: ``(h, w, D)``, or ``(T, h, w, D)`` for its tiles."""
        if self.tiles is None:
            return list(self.features)
        return list(torch.split(self.features, [t.n_tiles for t in self.tiles]))

    def image_work_size(self, j: int) -> tuple[int, int]:
        """The working size of image ``j`` as a whole (at the tile zoom when tiled)."""
        return self.tiles[j].work_size if self.tiles is not None else self.work_size

    def image_grids(self, values: np.ndarray, pick: bool = False) -> list[np.ndarray]:
        """Per-patch ``values`` (one per row of ``features``, in order) -> one ``(rows, cols)`` grid per image.
        Tiled, the tiles' grids are stitched (tiling.py): weighted mean, or with ``pick`` each cell's value from
        its most central tile (for values that cannot be averaged, such as bank rows)."""
        _, h, w = self.features.shape[:3]
        if self.tiles is None:
            per = h * w
            return [values[j * per : (j + 1) * per].reshape(h, w) for j in range(len(self.shapes))]
        out, start = [], 0
        for t in self.tiles:
            if t.tile_grid != (h, w):
                raise ValueError(f"tile grid {(h, w)} does not match the layout's {t.tile_grid}")
            part = values[start : start + t.n_tiles * h * w].reshape(t.n_tiles, h, w)
            out.append(t.pick(part) if pick else t.stitch(part))
            start += t.n_tiles * h * w
        return out


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` stands for an interrupt: a KeyboardInterrupt raised while a C extension ran (onnxruntime's
    module being imported, its session being made) comes back as that extension's error, with the interrupt as its
    cause (pybind11's "initialization failed"). Taken for an export that failed, it was logged as such, the fit
    went on in PyTorch, and a container's stop was lost."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        if isinstance(at, KeyboardInterrupt):
            return True
        seen.add(id(at))
        at = at.__cause__ or at.__context__
    return False


class Embedder:
    """Preprocessing + backbone + runtime + patch embedding, for one model's settings."""

    def __init__(self, backbone: str, *, image_size: int, target_dim: int, layer_balance: bool, batch_size: int,
                 weights: str | Path | None, device: torch.device, runtime: str = "auto", progress: bool = True,
                 tile: int | None = None):
        self.spec = spec = get_spec(backbone)
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
        self.tile = tile  # source pixels per tile (tiling.py); None: the whole frame at once
        # the dimensions of each patch's embedding before a selection keeps some (features.embed_patches)
        self.dims = sum(layer_dims(spec.channels, target_dim))

    # ------------------------------------------------------------------ backbone
    @property
    def backbone(self) -> LoadedBackbone:
        """The frozen network, loaded on first use (fails here if the weights cannot be had)."""
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name, self.weights, self.device, progress=self.progress,
                                           defer_build=self.runtime == "onnx")
        return self._backbone

    def load_backbone(self, expected_checksum: str, recorded_source: str | None = None) -> None:
        """Load now the weights a saved model was fitted with (backbones.load_fitted_backbone)."""
        self._backbone = load_fitted_backbone(self.backbone_name, self.weights, self.device, self.progress,
                                              expected_checksum, recorded_source,
                                              defer_build=self.runtime == "onnx")

    def prepare_runtime(self) -> None:
        """Export the extractor to ONNX Runtime once per backbone (shared by the models that use it); under ``auto``
        a failed export falls back to PyTorch."""
        if self.runtime != "onnx" or self._onnx is not None:
            return
        try:
            self._onnx = shared_extractor(self.backbone)
        except WeightsUnavailableError:  # the deferred build refused the weights: theirs to fix, not ONNX Runtime's
            raise
        except Exception as exc:  # export or session errors vary by op and version
            if _interrupted(exc):  # Ctrl-C or a stop's SIGTERM, met inside a C extension that re-raised it as its own
                raise KeyboardInterrupt from exc
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
        (``shapes``: their ``(height, width, ...)``); ``squash``: every image to the working size square."""
        longer = [float(max(s[:2])) for s in shapes]
        self.preprocessing = dataclasses.replace(self.preprocessing, squash=policy == "squash",
                                                 sides=(min(longer), max(longer)) if longer else None)
        if policy == "fixed-scale":
            ref = float(np.median(longer))
            self.preprocessing = dataclasses.replace(self.preprocessing, reference_side=ref)

    def layout(self, shape: Sequence[int]) -> TileLayout | None:
        """How an image of ``shape`` is cut into tiles (tiling.py); None without tiling."""
        if self.tile is None:
            return None
        pp = self.preprocessing
        return layout(tuple(shape), self.tile, pp.image_size, pp.stride)

    def warm_pass(self, keep: torch.Tensor | None = None) -> None:
        """Tiled: embed one backbone pass of blank tiles (:meth:`per_pass` of them, with ``keep``'s dimensions), so
        that the runtime's buffers are grown to a whole pass before the first photo (nothing untiled: a photo's
        blank at the working size grows them). Why: warmed with one tile, the first photo of a full pass grew them
        after the pixel budget had read the memory left, and beyond the photo's count (:meth:`tile_bytes`). The
        tiles are made at the working scale, where the network sees them: a blank in the source's scale whose row
        of tiles fills a pass is ``per_pass`` tiles wide, at ``--tile 2048`` a photo of tens of megapixels made,
        resized and mapped to warm buffers that depend only on the tiles' working size."""
        if self.tile is None:
            return
        lay = self.layout((self.tile, self.tile))  # a whole tile: the working size every full tile has
        assert lay is not None
        th, tw = lay.tile_size
        blank = torch.zeros(3, th, tw)  # the normalization's mean colour
        self._embed_crops([blank] * self.per_pass((th, tw)), keep, StageTimer(), 1)

    def tile_bytes(self, height: int, width: int, dims: int | None = None) -> int:
        """Peak bytes scoring a ``height`` x ``width`` photo takes beyond what its own pixels take
        (memory_room.PEAK_BYTES_PER_PIXEL): 0 untiled; tiled, what the network is given, counted from the layout
        alone (nothing decoded): every tile at its size, the overlaps counted in each, every tile's features at
        ``dims`` kept dimensions a patch (None: every dimension this embedder makes, :attr:`dims`), and one backbone
        pass of :meth:`per_pass` tiles. Why: the admission counted a tiled photo as its pixels at the tile zoom, and
        the tiles' overlap, which the network sees twice or four times, went uncounted; and a count blind to the
        features' width let a ResNet-50 photo take four times what it had counted."""
        lay = self.layout((height, width))
        if lay is None:
            return 0
        th, tw = lay.tile_size
        cell = self.preprocessing.stride // 2  # the first tapped stage's stride: one patch a cell
        features = lay.n_tiles * (th // cell) * (tw // cell) * (self.dims if dims is None else dims) * FEATURE_BYTES
        one_pass = min(lay.n_tiles, self.per_pass(lay.tile_size)) * th * tw
        return lay.n_tiles * th * tw * TILE_BYTES_PER_PIXEL + features + one_pass * self.spec.pass_bytes

    def bytes_per_pixel(self, pixels: int, dims: int | None = None) -> float:
        """Peak bytes a pixel of a square photo of ``pixels`` takes, its tiles counted (:meth:`tile_bytes`, with
        ``dims``): what the start-up pixel budget counts a pixel at. Tiled, a photo wider than a few dozen tiles is
        counted at that width: past it each pixel takes the same, and the layout of the largest photo allowed is
        long to draw."""
        side = max(1, math.isqrt(max(1, pixels)))
        if self.tile is not None:
            side = min(side, 64 * self.tile)
        return PEAK_BYTES_PER_PIXEL + self.tile_bytes(side, side, dims) / (side * side)

    def groups(self, images: Sequence[np.ndarray], whole: bool = False,
               sizes: Sequence[tuple[int, int] | None] | None = None) -> Iterator[list[int]]:
        """Batches of indices whose images share a working size (so they stack into one tensor). Tiled (unless
        ``whole``), images whose tiles share a size, at most ``TILES_PER_GROUP`` backbone passes of tiles
        (one image at least): the features of a group are held at once. ``sizes``: a working size chosen for an
        image (None: its own), as for a photo already shrunk towards it (grain.py)."""
        return self.groups_by_shape([im.shape for im in images], whole, sizes)

    def groups_by_shape(self, shapes: Sequence[tuple[int, ...]], whole: bool = False,
                        sizes: Sequence[tuple[int, int] | None] | None = None) -> Iterator[list[int]]:
        """:meth:`groups` from the images' ``(height, width, ...)`` alone (a fit batches before it decodes). A batch
        of a large working size holds fewer images (:data:`BATCH_REFERENCE_PIXELS`): eight photos of a camera's 4 MP
        at ``--image-size 2048`` went through the backbone at once and took more memory than a line PC has."""
        if self.tile is not None and not whole:
            yield from self._tile_groups(shapes)
            return
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, sh in enumerate(shapes):
            size = sizes[i] if sizes is not None else None
            by_size.setdefault(size or self.preprocessing.working_size(*sh[:2]), []).append(i)
        for size, idxs in by_size.items():
            step = self.per_pass(size)
            for s in range(0, len(idxs), step):
                yield idxs[s : s + step]

    def per_pass(self, size: tuple[int, int]) -> int:
        """How many photos (or tiles) of working ``size`` ``(h, w)`` go through the backbone at once:
        ``batch_size`` of :data:`BATCH_REFERENCE_PIXELS` or fewer pixels, fewer of larger ones, one at least. Tiles
        count as photos do: a tile is ``--image-size`` pixels square, so ``--tile`` with a large ``--image-size``
        passed ``batch_size`` such tiles at a time."""
        h, w = size
        return max(1, min(self.batch_size, self.batch_size * BATCH_REFERENCE_PIXELS // max(1, h * w)))

    def _tile_groups(self, shapes: Sequence[tuple[int, ...]]) -> Iterator[list[int]]:
        by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, shape in enumerate(shapes):
            lay = self.layout(shape)
            assert lay is not None
            by_size.setdefault(lay.tile_size, []).append((i, lay.n_tiles))
        for size, items in by_size.items():
            yield from runs_within(items, TILES_PER_GROUP * self.per_pass(size))

    def embed(self, images: Sequence[np.ndarray], keep: torch.Tensor | None = None,
              timer: StageTimer | None = None, whole: bool = False, size: tuple[int, int] | None = None) -> Embedded:
        """Same-size images -> ``(B, h, w, D)`` embeddings; with ``keep`` only those dimensions are computed.
        Tiled (unless ``whole``: the whole frame, e.g. to find the part), images whose tiles share a size ->
        ``(sum of their tiles, h, w, D)``, image by image. ``size``: the working size (None: the images' own,
        :meth:`Preprocessing.working_size`)."""
        timer = timer or StageTimer()
        if self.tile is not None and not whole:
            return self._embed_tiles(images, keep, timer)
        n = len(images)
        with timer.stage("preprocess", per=n):
            size = size or self.preprocessing.working_size(*images[0].shape[:2])
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

    def _embed_tiles(self, images: Sequence[np.ndarray], keep: torch.Tensor | None, timer: StageTimer) -> Embedded:
        """Each image resized once to its size at the tile zoom (and masked), cut into its tiles; the tiles of
        all ``images`` go through the backbone :meth:`per_pass` at a time. The tiles are views of the resized image
        until their pass stacks them: all stacked at once, they held the image again with every overlap."""
        n = len(images)
        layouts = [self.layout(im.shape) for im in images]
        with timer.stage("preprocess", per=n):
            crops = []
            for im, lay in zip(images, layouts):
                assert lay is not None
                x = self.preprocessing.to_tensor(im, lay.work_size)
                if self.inspect is not None:
                    x = x * torch.tensor(self.inspect.at(lay.work_size), dtype=x.dtype)
                crops += [x[:, rows, cols] for rows, cols in lay.crops()]
        emb = self._embed_crops(crops, keep, timer, n)
        return Embedded(features=emb, work_size=layouts[0].tile_size, shapes=[im.shape for im in images],  # type: ignore[union-attr]
                        inspect=self.inspect, tiles=layouts)  # type: ignore[arg-type]

    def _embed_crops(self, crops: Sequence[torch.Tensor], keep: torch.Tensor | None, timer: StageTimer,
                     n: int) -> torch.Tensor:
        """Tiles of one working size (``(3, h, w)`` each, normalized) -> their embeddings, one tensor, through the
        backbone :meth:`per_pass` at a time; ``n``: the images they are of, for the timer."""
        # each pass's embeddings written into one tensor: kept apart and joined, they were held twice at the end
        emb: torch.Tensor | None = None
        step = self.per_pass(tuple(crops[0].shape[1:]))  # type: ignore[arg-type]
        for s in range(0, len(crops), step):
            with timer.stage("preprocess", per=n):
                chunk = torch.stack(crops[s : s + step]).to(self.device)
            with timer.stage("backbone", per=n):
                maps = self._extract(chunk)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            with timer.stage("embed", per=n):
                part = embed_patches(maps, self.target_dim, self.layer_balance, keep=keep)
                if emb is None:
                    emb = part.new_empty((len(crops), *part.shape[1:]))
                emb[s : s + len(part)] = part
        assert emb is not None
        return emb

    def wrap(self, features: torch.Tensor, shape: Sequence[int]) -> Embedded:
        """One image's stored features (``(h, w, D)``, or ``(T, h, w, D)`` tiled, as :meth:`Embedded.per_image`
        gives them) as a batch a scorer reads: for re-scoring without the image (leave-one-out, updates)."""
        lay = self.layout(shape) if features.dim() == 4 else None
        if lay is None:
            return Embedded(features=features[None], work_size=self.preprocessing.working_size(*shape[:2]),
                            shapes=[tuple(shape)], inspect=self.inspect)
        return Embedded(features=features, work_size=lay.tile_size, shapes=[tuple(shape)], inspect=self.inspect,
                        tiles=[lay])

    def wrap_many(self, features: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]]) -> Embedded:
        """:meth:`wrap` for several images at once: untiled images of one working size (a group of
        :meth:`groups_by_shape`) stack into one batch; a single image may be tiled."""
        if len(features) == 1:
            return self.wrap(features[0], shapes[0])
        return Embedded(features=torch.stack(list(features)), work_size=self.preprocessing.working_size(*shapes[0][:2]),
                        shapes=[tuple(s) for s in shapes], inspect=self.inspect)
