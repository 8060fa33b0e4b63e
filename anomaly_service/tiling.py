"""Tiled scoring of large photos: one global zoom, overlapping tiles, one stitched patch grid per image.

Shrinking a whole 5-20 megapixel frame to the network's working size (``image_size``, 256 px on the longer side)
makes a 20 px scratch two pixels wide, and it vanishes. With ``tile`` set, every image is instead resized once by
one zoom, ``image_size / tile`` (a tile of ``tile`` source pixels is seen by the network at ``image_size``), and
cut into overlapping tiles of the working size. All tiles of all images share that zoom, so the bank, built from
the tiles of the good images, and the scored tiles see parts at one physical scale.

The flow stays one way: image -> resized once -> tiles (their origins on the stride, so each tile's patch grid
sits exactly on the image's) -> features of every tile (batched through the backbone) -> kNN patch scores of every
tile -> the image's patch grid, stitched -> the usual smoothing, mask, image score and decision.

Stitching. A patch near a tile's border sees the zero padding of that tile, not the part beyond it, and scores a
little differently from the same patch seen in the middle of a tile. Tiles overlap by :data:`OVERLAP` of their
side and a cell's score is the mean of its tiles' scores weighted by a steep power of how far the cell is from
each tile's nearest edge, so a cell is scored almost only by the tiles that see it centrally, the weights cross-fade
smoothly in the overlaps, and no seam shows at the tile borders. Things that are one value per cell (the bank row a
patch matched, for the evidence) come from that most central tile.

The bank's provenance keeps, for each row, the training image and the cell in that image's stitched grid: every
tile of an image carries the image's index, so leave-one-out leaves all of them out together, and the evidence
boxes are in the training image's pixels as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

OVERLAP = 0.25  # share of a tile's side that neighbouring tiles overlap (>= 2x the margin padding disturbs)
WINDOW_POWER = 4  # a tile's weight of a cell: (distance to the tile's nearest edge) ** this (TileLayout.weights)


def _snap(side: float, stride: int) -> int:
    return max(stride * 2, int(round(side / stride)) * stride)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side of ``length`` working pixels: the first at 0, the last flush with the end,
    evenly spread with at least :data:`OVERLAP` overlap, each on the ``stride``."""
    if length <= tile:
        return [0]
    step = tile * (1 - OVERLAP)
    n = int(math.ceil((length - tile) / step)) + 1
    span = length - tile  # a multiple of the stride: both sides are
    return sorted({int(round(i * span / (n - 1) / stride)) * stride for i in range(n)})


@dataclass(frozen=True, eq=False)
class TileLayout:
    """How one image of ``shape`` is cut: its size at the tile zoom, the tiles' origins and the patch grids."""

    work_size: tuple[int, int]  # (h, w) of the whole image at the tile zoom
    tile_size: tuple[int, int]  # (h, w) of one tile as the network sees it (every tile of the image alike)
    origins: np.ndarray  # (T, 2) int: each tile's top-left (row, col) in working pixels
    cell: int  # working pixels per patch-grid cell
    _weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_tiles(self) -> int:
        return int(len(self.origins))

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the image's stitched patch grid."""
        return self.work_size[0] // self.cell, self.work_size[1] // self.cell

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.tile_size[0] // self.cell, self.tile_size[1] // self.cell

    def crops(self) -> list[tuple[slice, slice]]:
        """Each tile's rows and columns in the image resized to :attr:`work_size`."""
        th, tw = self.tile_size
        return [(slice(int(r), int(r) + th), slice(int(c), int(c) + tw)) for r, c in self.origins]

    def cells(self) -> np.ndarray:
        """``(T, h, w, 2)`` int32: the stitched-grid cell ``(row, col)`` of every tile's every patch."""
        gh, gw = self.tile_grid
        rr, cc = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        base = self.origins // self.cell
        return np.stack([base[:, 0, None, None] + rr, base[:, 1, None, None] + cc], axis=-1).astype(np.int32)

    def weights(self) -> np.ndarray:
        """``(T, h, w)`` float32: each tile's weight of its cells, ``d ** WINDOW_POWER`` with ``d`` the cell's
        distance to the tile's nearest edge (in cells, 0.5 for an edge cell). Steep on purpose: where another
        tile sees a cell centrally, a tile whose edge it is contributes almost nothing (an edge cell weighs
        1/16 of a cell one step in, 1/2401 of one three steps in), and every cell inside the image is at least
        half the overlap from the edges of one of its tiles."""
        if self._weights is None:
            gh, gw = self.tile_grid
            dr = np.minimum(np.arange(gh) + 0.5, gh - np.arange(gh) - 0.5)
            dc = np.minimum(np.arange(gw) + 0.5, gw - np.arange(gw) - 0.5)
            window = (np.minimum(dr[:, None], dc[None, :]) ** WINDOW_POWER).astype(np.float32)
            object.__setattr__(self, "_weights", np.broadcast_to(window, (self.n_tiles, gh, gw)))
        return self._weights  # type: ignore[return-value]

    def stitch(self, values: np.ndarray) -> np.ndarray:
        """``(T, h, w)`` per-tile patch values -> ``(rows, cols)`` of the image: the weighted mean."""
        gh, gw = self.tile_grid
        total = np.zeros(self.grid, np.float64)
        weight = np.zeros(self.grid, np.float64)
        w = self.weights()
        for t, (r, c) in enumerate(self.origins // self.cell):
            total[r : r + gh, c : c + gw] += w[t] * values[t]
            weight[r : r + gh, c : c + gw] += w[t]
        return (total / weight).astype(values.dtype, copy=False)

    def pick(self, values: np.ndarray) -> np.ndarray:
        """``(T, h, w)`` per-tile values -> ``(rows, cols)``: each cell's value from its most central tile."""
        gh, gw = self.tile_grid
        best = np.full(self.grid, -1.0)
        out = np.zeros(self.grid, values.dtype)
        w = self.weights()
        for t, (r, c) in enumerate(self.origins // self.cell):
            win = (slice(r, r + gh), slice(c, c + gw))
            better = w[t] > best[win]
            out[win][better] = values[t][better]
            best[win][better] = w[t][better]
        return out


def layout(shape: tuple[int, ...], tile: int, image_size: int, stride: int) -> TileLayout:
    """The tiles of an image of ``shape``: zoom ``image_size / tile``, tiles of ``image_size`` working pixels
    (fewer along a side that is shorter), overlapping by :data:`OVERLAP`, origins on the ``stride``."""
    scale = image_size / tile
    h, w = (_snap(s * scale, stride) for s in shape[:2])
    side = _snap(image_size, stride)
    th, tw = min(side, h), min(side, w)
    rows, cols = _starts(h, th, stride), _starts(w, tw, stride)
    origins = np.array([(r, c) for r in rows for c in cols], dtype=np.int64)
    return TileLayout(work_size=(h, w), tile_size=(th, tw), origins=origins, cell=stride // 2)


def check_tile(tile: int | None, image_size: int, stride: int, shapes: Sequence[tuple[int, int]]) -> None:
    """Refuse a tile larger than every training photo's longest side, before any work: each photo would be one tile
    shrunk by ``image_size / tile``, more than the untiled path shrinks it, and small defects would vanish while the
    fit says nothing (a tile of exactly the longest side shrinks it as much as the untiled path: allowed). A tile
    under the working size enlarges every photo: allowed, with a warning of its cost."""
    if tile is None or not shapes:
        return
    longest = max(max(int(s[0]), int(s[1])) for s in shapes)
    if tile > longest:
        fix = (f"drop --tile, or set it between {image_size} and {longest}" if longest > image_size
               else f"these photos are no larger than the working size (--image-size {image_size}): drop --tile")
        raise ConfigError(f"--tile {tile} is larger than every training photo (the longest side is {longest} px): "
                          f"each photo would be one tile seen at {image_size / tile:.2f}x, and small defects would "
                          f"vanish. Tiling is for photos larger than the working size; {fix}")
    if tile < image_size:
        n = max(layout(s, tile, image_size, stride).n_tiles for s in set(shapes))
        log.warning("--tile %d is smaller than the working size (--image-size %d): photos are enlarged %.1fx and "
                    "cut into up to %d tiles each; the fit and every score cost that many network passes",
                    tile, image_size, image_size / tile, n)


def tile_section(tile: int | None, image_size: int) -> dict:
    """The manifest's record of tiling, inside its ``preprocessing`` section (empty when off)."""
    if tile is None:
        return {}
    return {"tile": {"size": tile, "overlap": OVERLAP, "zoom": image_size / tile,
                     "stitch": f"mean of the overlapping tiles' patch scores weighted by (distance to the tile's "
                               f"edge) ** {WINDOW_POWER}"}}
