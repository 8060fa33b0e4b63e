"""Where each memory-bank patch came from: which training image, and where in it.

Two uses. Leave-one-out calibration scores every training image against the bank without the patches it
contributed (knn_scorer.py), which needs each bank row's source image. And an operator asking "why was this part
flagged?" is shown the closest normal evidence: the training image and the place in it whose patch was nearest to
the flagged region, from the small thumbnail kept here (the training images themselves may be long gone).

A bank row's source is ``(image, row, col)``: the index into the :class:`TrainingCatalog` and the patch's cell in
that image's feature grid. The catalog keeps, per training image, its name (the path it was given as), the digest
of its pixels, its size, its feature grid and a JPEG thumbnail, and, for models fitted since it was kept, the
images' map (image_map.py): where each sits among the others, so a scored part can be shown among them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from .artifact import arrays_to_bytes, bytes_to_arrays
from .errors import ModelFormatError
from .image_map import ImageMap
from .images import path_text

if TYPE_CHECKING:
    from .tiling import TileLayout

CATALOG_FILE = "training_images.npz"
THUMBNAIL_SIDE = 256  # longer side of a kept thumbnail: enough to show a region's surroundings, small on disk


def patch_sources(grids: list[tuple[int, ...]], first_image: int = 0,
                  layouts: Sequence[TileLayout | None] | None = None,
                  image_ids: Sequence[int] | None = None) -> np.ndarray:
    """``(N, 3)`` int32 ``(image, row, col)`` of every patch of images with these feature ``grids``, in the
    order the fit concatenates them (image by image, row-major). The images are numbered from ``first_image``,
    or are ``image_ids`` (one per grid) when given. A tiled image (its ``layouts`` entry, grid ``(T, h, w)``) has
    every patch of every tile, each with its cell in the image's stitched grid (tiling.py): all of them name the
    image."""
    ids = range(first_image, first_image + len(grids)) if image_ids is None else image_ids
    parts = []
    for n, (i, grid) in enumerate(zip(ids, grids)):
        lay = layouts[n] if layouts is not None else None
        if lay is not None:
            cells = lay.cells().reshape(-1, 2)
            parts.append(np.column_stack([np.full(len(cells), i), cells]))
            continue
        h, w = grid
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        parts.append(np.stack([np.full(h * w, i), rr.ravel(), cc.ravel()], axis=1))
    if not parts:
        return np.zeros((0, 3), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32)


def cell_box(row: int, col: int, shape: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """Cell ``(row, col)`` of a feature ``grid`` as ``(x0, y0, x1, y1)`` in the pixels of an image of ``shape``
    ``(height, width)``: the grid covers the whole frame evenly (preprocessing.py keeps it, uncropped)."""
    (h, w), (gh, gw) = shape, grid
    return (int(col * w / gw), int(row * h / gh), int(np.ceil((col + 1) * w / gw)), int(np.ceil((row + 1) * h / gh)))


def thumbnail(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of ``image`` with its longer side at most ``side`` pixels."""
    img = Image.fromarray(image if image.ndim == 3 else image.squeeze())
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dataclass
class TrainingCatalog:
    """The training images a bank was built from, in bank-source order."""

    names: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of the image as fitted
    grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols) of its feature grid
    thumbnails: list[bytes] = field(default_factory=list)
    image_map: ImageMap | None = None  # each image's place on the map of image features; None in older models

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, digest: str, image: np.ndarray, grid: tuple[int, int]) -> int:
        """Append one image; returns its index (the ``image`` of its patches' sources)."""
        return self.add_entry(name, digest, image.shape, grid, thumbnail(image))

    def add_entry(self, name: str, digest: str, shape: tuple[int, ...], grid: tuple[int, int], thumb: bytes) -> int:
        """Append one image from what a streamed fit kept of it (its pixels are gone by then)."""
        self.names.append(name)
        self.digests.append(digest)
        self.shapes.append((int(shape[0]), int(shape[1])))
        self.grids.append((int(grid[0]), int(grid[1])))
        self.thumbnails.append(thumb)
        return len(self.names) - 1

    def box(self, image: int, row: int, col: int) -> tuple[int, int, int, int]:
        """The patch cell ``(row, col)`` of training image ``image`` as ``(x0, y0, x1, y1)`` in its pixels."""
        return cell_box(row, col, self.shapes[image], self.grids[image])

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "names": np.array(self.names, dtype=np.str_), "digests": np.array(self.digests, dtype=np.str_),
            "shapes": np.array(self.shapes, dtype=np.int32).reshape(-1, 2),
            "grids": np.array(self.grids, dtype=np.int32).reshape(-1, 2)}
        for i, t in enumerate(self.thumbnails):
            arrays[f"thumb_{i:05d}"] = np.frombuffer(t, dtype=np.uint8)
        if self.image_map is not None:
            arrays.update(self.image_map.to_arrays())
        return arrays_to_bytes(arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrainingCatalog":
        a = bytes_to_arrays(data, CATALOG_FILE)
        try:
            n = len(a["names"])
            # models saved before names were made text kept a name in another code page as lone surrogates
            cat = cls(names=[path_text(str(s)) for s in a["names"]], digests=[str(s) for s in a["digests"]],
                      shapes=[(int(h), int(w)) for h, w in a["shapes"]],
                      grids=[(int(h), int(w)) for h, w in a["grids"]],
                      thumbnails=[a[f"thumb_{i:05d}"].tobytes() for i in range(n)])
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFormatError(f"{CATALOG_FILE} is incomplete ({exc})") from None
        if not (len(cat.digests) == len(cat.shapes) == len(cat.grids) == n):
            raise ModelFormatError(f"{CATALOG_FILE}: its lists differ in length")
        try:
            cat.image_map = ImageMap.from_arrays(a, n)
        except ModelFormatError as exc:
            raise ModelFormatError(f"{CATALOG_FILE}: {exc}") from None
        return cat
