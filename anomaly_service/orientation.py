"""Parts in any orientation (``orientation="any"``): the memory bank also holds turned and mirrored copies of
the good images.

Why: a bank fitted on parts that all lie one way holds no patch of an edge, a streak or a print at another angle,
so every part that arrives turned is flagged. Three levers were measured (docs/decisions.md): copies in the bank,
test-time turns with the minimum over them, and aligning each photo to a reference. Copies in the bank cost no
time per photo, so they are what ``any`` does; the other two stay in benchmarks/quality.py.

A copy shows what a camera would see of the same thing turned. A part on a plain background (the image's outermost
pixels nearly all of one colour) keeps the whole image: the canvas grows to hold the turned picture and the
uncovered corners take that colour, as a part turned on its background shows. A surface that runs out of the frame
(a strip of a commutator, a tile) is cut to the largest upright rectangle of its own pixels: a camera turned over a
surface sees more surface, framed upright, never a fill. A fill teaches the bank what no photo shows: a flat
colour's straight seam with the texture would pass straight edges, which hides cracks, and the surface mirrored
at its edges (earlier models' copies) set the threshold at its seams and lost what the frame's upright edges
tell the network (docs/decisions.md). A turn whose rectangle would be too small to hold a patch's context keeps
the mirrored canvas. Each copy's patches carry their source image in the bank's
provenance, so leave-one-out calibration leaves an image's copies out with it, and the evidence shown for a flagged
region points at the source image's cell the copy's patch came from. The copies' patches wait in a
:class:`~.patch_store.PatchStore` of their own (on disk beyond its budget), like the originals'.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .decision import KNN, Decision, calibration_sample
from .patch_store import PatchStore, default_memory_budget
from .scorer import RawScore

# turned copies of each good image (random angle, mirrored half of the time)
COPIES_PER_IMAGE = 4
# patches the copies add, as a share of the originals' patch count (a random subset of each copy's patches):
# copies repeat much of what the originals hold, and the greedy coreset's cost grows with every patch it sees
COPY_PATCH_SHARE = 1.0
# the bank with copies may hold this many times the patches the same fit keeps without them
BANK_FACTOR = 2.0
# how a turned copy of a surface is made: "cut" to the largest upright rectangle of real pixels, or "fill"ed by
# mirroring the surface into the grown canvas (models fitted before "cut" existed; a benchmark lever)
SURFACE_COPIES = "cut"
# a cut with a shorter side than this (source pixels) keeps the mirrored canvas: too little frame for a patch's
# context. A cut the working size would have to zoom past the fit's scale (under two of the network's largest
# strides a side at that scale: Preprocessing.working_size's floor) keeps it too (TurnedCopies.min_cut_side)
MIN_CUT_SIDE = 32
SURFACE_COPY_KINDS = ("cut", "fill", "aligned")
# an aligned copy's bank rows come from the cells that show its photo only: scoring never searches a cell of pure
# fill (grain.fill_sources), so a row from one would spend the bank's room on a patch no photo is judged by.
# True: from every cell, as models fitted before did (a benchmark lever)
FILL_ROWS = False


@dataclass(frozen=True)
class Turn:
    """A rotation by ``angle`` degrees counter-clockwise about the image centre, after an optional left-right
    mirror; the canvas grows to keep the whole image."""

    angle: float
    flip: bool = False

    def _matrix(self) -> np.ndarray:
        """2x2 map of (x, y) offsets from the centre, source -> turned (y points down, so a counter-clockwise
        turn on screen is a clockwise one in these axes)."""
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        rot = np.array([[c, s], [-s, c]])
        mirror = np.diag([-1.0, 1.0]) if self.flip else np.eye(2)
        return rot @ mirror

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(height, width)`` of the turned canvas for a source of ``shape``; quarter turns swap the sides
        exactly."""
        h, w = shape[:2]
        if self.is_quarter:
            return (w, h) if round(self.angle / 90.0) % 2 else (h, w)
        m = np.abs(self._matrix())
        ow, oh = m @ np.array([w, h], dtype=float)
        return int(math.ceil(oh - 1e-6)), int(math.ceil(ow - 1e-6))

    def to_source(self, xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Points ``(N, 2)`` (x, y) in the turned canvas -> the same points in the source image of ``shape``."""
        h, w = shape[:2]
        oh, ow = self.out_shape(shape)
        inv = np.linalg.inv(self._matrix())
        return (np.asarray(xy, float) - [ow / 2, oh / 2]) @ inv.T + [w / 2, h / 2]

    def cut_to_source(self, shape: tuple[int, ...], top: int = 0, left: int = 0, mirrored: bool = False
                      ) -> Callable[[np.ndarray], np.ndarray]:
        """The map of points ``(N, 2)`` (x, y) in a cut of the turned canvas whose top-left corner is at
        (``top``, ``left``) onto the source image of ``shape``: what a copy's evidence cells are read through.
        ``mirrored``: the canvas beyond the source is its mirror image (a surface's, :meth:`image`), so a point
        there maps onto the source pixel it shows, not past the source's edge."""
        if mirrored:
            return lambda xy: mirrored_into(self.to_source(np.asarray(xy, float) + [left, top], shape), shape)
        return lambda xy: self.to_source(np.asarray(xy, float) + [left, top], shape)

    def from_source(self, xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Points ``(N, 2)`` (x, y) in the source image of ``shape`` -> the same points in the turned canvas."""
        h, w = shape[:2]
        oh, ow = self.out_shape(shape)
        return (np.asarray(xy, float) - [w / 2, h / 2]) @ self._matrix().T + [ow / 2, oh / 2]

    def image(self, image: np.ndarray) -> np.ndarray:
        """The turned ``(H, W, 3)`` uint8 image, its uncovered corners filled as the module says. Quarter turns
        and mirrors move pixels exactly."""
        if self.is_quarter:
            return self._quarter(image)
        colour = plain_background(image)
        if colour is not None:
            return self._turned(image, Image.Resampling.BICUBIC, 0, tuple(int(v) for v in colour))
        return self._turned(image, Image.Resampling.BICUBIC, self.mirror_pad(image.shape))

    def inscribed_box(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` in the turned canvas of the largest centred upright rectangle that holds
        only pixels of the turned source of ``shape``: the turned rectangle's largest inscribed axis-aligned one,
        a pixel clear of its resampled border each side (the bicubic filter may still read the mirrored edge pixels
        there, which repeat the photo's own)."""
        h, w = shape[:2]
        oh, ow = self.out_shape(shape)
        if self.is_quarter:
            return 0, 0, oh, ow
        a = math.radians(self.angle)
        sin_a, cos_a = abs(math.sin(a)), abs(math.cos(a))
        long_side, short_side = max(w, h), min(w, h)
        if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
            # half-constrained: two corners of the rectangle touch the longer sides
            x = 0.5 * short_side
            cw, ch = (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
        else:  # fully constrained: the rectangle touches all four sides
            cos_2a = cos_a * cos_a - sin_a * sin_a
            cw, ch = (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a
        ch, cw = int(math.floor(ch)) - 2, int(math.floor(cw)) - 2
        return (oh - ch) // 2, (ow - cw) // 2, ch, cw

    def copy_of(self, image: np.ndarray, surface_copies: str | None = None, min_side: int = MIN_CUT_SIDE
                ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """The turned copy of a training image (module docstring), and the box of the turned canvas it was cut
        to (None: the whole canvas). ``surface_copies="fill"``: a surface keeps its mirrored canvas too; a cut
        with a side under ``min_side`` source pixels keeps it as well."""
        out = self.image(image)
        if (surface_copies or SURFACE_COPIES) != "cut" or self.is_quarter or plain_background(image) is not None:
            return out, None
        y, x, h, w = self.inscribed_box(image.shape)
        if min(h, w) < max(MIN_CUT_SIDE, min_side):
            return out, None
        return np.ascontiguousarray(out[y : y + h, x : x + w]), (y, x, h, w)

    def mask(self, mask: np.ndarray, image: np.ndarray) -> np.ndarray:
        """The turned boolean mask of ``image``: filled as the image is (a defect mirrored into a corner is a
        defect there too; a plain corner is none)."""
        return self.regions(mask.astype(np.int32), image) > 0

    def regions(self, labels: np.ndarray, image: np.ndarray) -> np.ndarray:
        """:meth:`mask` for a mask's numbered defect regions (int32, 0: none): each keeps its number where the turn
        moves it, so a thin crack that the nearest-neighbour turn breaks into pieces is still one region."""
        if self.is_quarter:
            return self._quarter(labels)
        pad = 0 if plain_background(image) is not None else self.mirror_pad(labels.shape)
        return self._turned(np.ascontiguousarray(labels, dtype=np.int32), Image.Resampling.NEAREST, pad, 0)

    def mirror_pad(self, shape: tuple[int, ...]) -> int:
        """Pixels of its own mirror image a source of ``shape`` is padded with before it is turned, so that every
        pixel of the canvas, its corners too, shows the photo or its mirror image: how far the canvas's corners lie
        outside the source once turned back, and two more for the bicubic filter's reach. Half the canvas's longer
        side fell short of a thin photo's corners near 45 degrees, which read past the padding (black)."""
        h, w = shape[:2]
        oh, ow = self.out_shape(shape)
        corners = self.to_source(np.array([[0, 0], [ow, 0], [0, oh], [ow, oh]], float), shape)
        beyond = float(np.max(np.concatenate([-corners, corners - [w, h]], axis=1)))
        return int(math.ceil(max(0.0, beyond))) + 2

    def _turned(self, a: np.ndarray, resample: int, pad: int, fill: int | tuple[int, ...] = 0,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Turn ``a`` after padding it with ``pad`` pixels of its own mirror image (0: uncovered pixels take
        ``fill``). ``box``: only that ``(top, left, height, width)`` of the turned canvas."""
        h, w = a.shape[:2]
        full_h, full_w = self.out_shape(a.shape)
        top, left, oh, ow = (0, 0, full_h, full_w) if box is None else box
        if pad:
            a = np.pad(a, ((pad, pad), (pad, pad)) + (((0, 0),) if a.ndim == 3 else ()), mode="symmetric")
        inv = np.linalg.inv(self._matrix())
        # PIL samples the source at inv @ (p_out - c_out) + c_src (+ pad) for every output pixel centre (p_out
        # counted from the box's corner)
        offset = np.array([w / 2 + pad, h / 2 + pad]) - inv @ np.array([full_w / 2 - left, full_h / 2 - top])
        coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
        out = Image.fromarray(a).transform((ow, oh), Image.Transform.AFFINE, coeffs, resample=resample,
                                           fillcolor=fill)
        return np.asarray(out)

    def map_back(self, amap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A map over the turned canvas -> the same map over the source image of ``shape`` (bilinear; PIL's affine
        transform of a float image, which reads each source pixel's centre in the canvas as :meth:`from_source`
        places it)."""
        h, w = shape[:2]
        oh, ow = self.out_shape(shape)
        m = self._matrix()
        offset = np.array([ow / 2, oh / 2]) - m @ np.array([w / 2, h / 2])
        coeffs = (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1])
        canvas = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))  # mode F
        out = canvas.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.float32)

    @property
    def is_quarter(self) -> bool:
        return abs(self.angle / 90.0 - round(self.angle / 90.0)) < 1e-9

    def _quarter(self, a: np.ndarray) -> np.ndarray:
        out = a[:, ::-1] if self.flip else a
        return np.ascontiguousarray(np.rot90(out, k=int(round(self.angle / 90.0)) % 4))


# a plain background: this share of the outermost pixels within PLAIN_TOLERANCE grey levels of their median
PLAIN_SHARE = 0.9
PLAIN_TOLERANCE = 12


def plain_background(image: np.ndarray) -> np.ndarray | None:
    """The colour of the background the part lies on, when the image's outermost pixels are nearly all of it;
    None when the picture runs out of the frame (a surface)."""
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(-1, *image.shape[2:])
    ring = ring.reshape(len(ring), -1).astype(np.int32)
    colour = np.median(ring, axis=0)
    near = (np.abs(ring - colour).max(axis=1) <= PLAIN_TOLERANCE).mean()
    return colour.astype(np.uint8) if near >= PLAIN_SHARE else None


def mirrored_into(xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Points ``(N, 2)`` (x, y) around an image of ``shape`` padded with its own mirror image (numpy's
    ``symmetric`` padding, which repeats every two sides) -> the points of the image whose pixels they show."""
    size = np.array([shape[1], shape[0]], float)
    at = np.mod(xy, 2 * size)
    return np.where(at > size, 2 * size - at, at)


def random_turns(n: int, rng: np.random.Generator) -> list[Turn]:
    """``n`` turns by uniform random angles, mirrored half of the time."""
    return [Turn(float(rng.uniform(0, 360)), bool(rng.random() < 0.5)) for _ in range(n)]


def source_cells(turn: Turn, grid: tuple[int, int], src_shape: tuple[int, ...], src_grid: tuple[int, int],
                 box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``(h*w, 2)`` (row, col) in the source image's feature grid of each cell of a turned copy's ``grid``
    (the cell its centre comes from; cells over the filled corners take the nearest source cell). ``box``:
    ``(top, left, height, width)`` of the canvas the copy was cut to, when it was (default: the whole canvas)."""
    y0, x0, oh, ow = box if box is not None else (0, 0, *turn.out_shape(src_shape))
    return cells_at(turn.cut_to_source(src_shape, y0, x0), grid, (oh, ow), src_shape, src_grid)


def cells_at(to_source: Any, grid: tuple[int, int], copy_shape: tuple[int, ...], src_shape: tuple[int, ...],
             src_grid: tuple[int, int]) -> np.ndarray:
    """``(h*w, 2)`` (row, col) in the source image's feature grid of each cell of a copy's ``grid``, for a copy of
    ``copy_shape`` whose points ``to_source`` maps ((N, 2) x, y) onto the source image of ``src_shape``."""
    gh, gw = grid
    oh, ow = copy_shape[:2]
    rr, cc = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    xy = np.stack([(cc.ravel() + 0.5) * ow / gw, (rr.ravel() + 0.5) * oh / gh], axis=1)
    src = to_source(xy)
    h, w = src_shape[:2]
    row = np.clip(np.floor(src[:, 1] * src_grid[0] / h), 0, src_grid[0] - 1)
    col = np.clip(np.floor(src[:, 0] * src_grid[1] / w), 0, src_grid[1] - 1)
    return np.stack([row, col], axis=1).astype(np.int32)


def row_cells(alignment: Any, real: np.ndarray | None, grid: tuple[int, int], inner: np.ndarray | None = None
              ) -> np.ndarray:
    """The cells (flat) of a turned canvas's ``grid`` (``real``: which of its pixels show the photo) that bank rows
    may come from: those a photo's scoring searches, not an aligned canvas's pure fill (unless :data:`FILL_ROWS`).
    The fit's turned copies and an update's turned-back photos are chosen alike."""
    every = np.arange(grid[0] * grid[1])
    src = None if FILL_ROWS or alignment is None else alignment.fill_cells(real, grid, inner)
    return every if src is None else np.flatnonzero(src == every)


class TurnedCopies:
    """Turned copies of the training images, made batch by batch as the fit embeds the originals. Entry ``i`` of
    :attr:`rows` and of :attr:`checks` belongs to training image ``i`` (the fit's store index):

    * :attr:`rows`: a random share of the patches of the image's copies, ``(1, n, D)``, with :attr:`cells`, the
      ``(n, 2)`` (row, col) in the source image's grid each came from (its evidence);
    * :attr:`checks`: the image's first copy whole, ``(h, w, D)``, scored leave-one-out for the threshold, with
      the copy's shape in :attr:`check_shapes`.
    """

    def __init__(self, embedder: Any, seed: int, per_image: int | None = None, patch_share: float | None = None,
                 keep: torch.Tensor | None = None, with_checks: bool = True, stream: int = 0,
                 surface_copies: str | None = None, alignment: Any = None):
        self.embedder, self.keep, self.with_checks = embedder, keep, with_checks
        # a surface whose grain the fit reads (grain.py): each copy is a turned photo as scoring sees it, turned back
        self.alignment = alignment
        self.surface_copies = "aligned" if alignment is not None else (
            SURFACE_COPIES if surface_copies is None else surface_copies)
        if self.surface_copies not in SURFACE_COPY_KINDS:
            raise ValueError(f"surface copies {self.surface_copies!r}: expected one of {SURFACE_COPY_KINDS}")
        self.factor = BANK_FACTOR  # the bank with copies: at most this many times the one without (knn_scorer.py)
        # this module's constants read at call time, so a benchmark can vary them
        self.per_image = COPIES_PER_IMAGE if per_image is None else per_image
        self.patch_share = COPY_PATCH_SHARE if patch_share is None else patch_share
        self.rng = np.random.default_rng([abs(seed), 0x7E, stream])  # stream: an update's own turns
        # the copies' two stores share the originals' memory budget: past it they spill to disk as the originals do
        budget = default_memory_budget() // 2
        self.rows = PatchStore(budget)
        self.cells: list[np.ndarray] = []
        self.checks = PatchStore(budget)
        self.check_shapes: list[tuple[int, ...]] = []
        # per check copy: which of its pixels show the photo (None: all); an aligned copy's fill never counts
        self.check_real: list[np.ndarray | None] = []
        # per image: it runs out of the frame (no plain background), so its copies are cut (or mirror-filled)
        self.surface: list[bool] = []

    def min_cut_side(self, shape: tuple[int, ...]) -> int:
        """Source pixels a cut of an image of ``shape`` must keep a side so the working size needs no zoom past
        the fit's scale: the network's input is never under two of its largest strides a side."""
        pp = self.embedder.preprocessing
        scale = min(pp.image_size / (pp.reference_side or max(shape[:2])), 2 * pp.image_size / max(shape[:2]))
        return int(math.ceil(2 * pp.stride / scale))

    def add(self, images: Sequence[np.ndarray], grids: Sequence[tuple[int, int]]) -> None:
        """Embed ``per_image`` randomly turned copies of each of ``images`` (the next training images in the fit's
        order; ``grids``: their own feature grids) and keep ``patch_share`` of each image's patch count from them,
        spread evenly over its copies."""
        turns = [(i, t) for i in range(len(images)) for t in random_turns(self.per_image, self.rng)]
        self.surface += [plain_background(im) is None for im in images]
        made = [self._copy(images[i], t) for i, t in turns]
        copies, to_source = [c for c, _, _ in made], [f for _, f, _ in made]
        picked: list[list[torch.Tensor]] = [[] for _ in images]
        cells: list[list[np.ndarray]] = [[] for _ in images]
        whole: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
        for batch in self.embedder.groups(copies):
            embedded = self.embedder.embed([copies[j] for j in batch], keep=self.keep)
            for e, j in zip(embedded.features, batch):
                i, turn = turns[j]
                h, w = grids[i]
                per_copy = max(1, int(round(h * w * self.patch_share / max(1, self.per_image))))
                if self.with_checks and j % self.per_image == 0:  # each image's first copy, whole
                    whole[i] = (e.float().cpu(), copies[j].shape, made[j][2])
                at = cells_at(to_source[j], (e.shape[0], e.shape[1]), copies[j].shape, images[i].shape, grids[i])
                pool = self._row_cells(made[j][2], (e.shape[0], e.shape[1]))
                pick = np.sort(pool[self.rng.choice(len(pool), size=min(per_copy, len(pool)), replace=False)])
                picked[i].append(e.reshape(-1, e.shape[-1])[torch.from_numpy(pick).to(e.device)].float().cpu())
                cells[i].append(at[pick])
        for i in range(len(images)):
            rows = torch.cat(picked[i])
            self.rows.add(rows[None])
            self.cells.append(np.concatenate(cells[i]).astype(np.int32))
            if self.with_checks:
                grid, shape, real = whole[i]
                self.checks.add(grid)
                self.check_shapes.append(tuple(shape))
                self.check_real.append(real)

    def _row_cells(self, real: np.ndarray | None, grid: tuple[int, int]) -> np.ndarray:
        """The cells (flat) of a copy's ``grid`` its bank rows may come from (:func:`row_cells`)."""
        return row_cells(self.alignment, real, grid)

    def _copy(self, image: np.ndarray, turn: Turn) -> tuple[np.ndarray, Any, np.ndarray | None]:
        """One turned copy of ``image``, the map of its points ((N, 2) x, y) back onto ``image``, and which of its
        pixels are the photo's (None: all of them, the fill being part of what the copy shows)."""
        if self.alignment is not None and plain_background(image) is None:
            return self.alignment.copy_of(image, turn, max(MIN_CUT_SIDE, self.min_cut_side(image.shape)),
                                          self.embedder.preprocessing.working_size)
        copy, box = turn.copy_of(image, "cut" if self.surface_copies == "aligned" else self.surface_copies,
                                 self.min_cut_side(image.shape))
        y0, x0 = box[:2] if box is not None else (0, 0)
        # a surface's whole canvas is mirrored round it: a row from there names the place its mirror image shows
        mirrored = box is None and plain_background(image) is None
        return copy, turn.cut_to_source(image.shape, y0, x0, mirrored), None

    def sources(self, images: Sequence[int], place: Sequence[int]) -> np.ndarray:
        """``(N, 3)`` bank provenance of the copies' rows of ``images`` (in that order): the source image
        numbered ``place[k]``, and the source cell."""
        parts = [np.column_stack([np.full(len(self.cells[i]), p), self.cells[i]]) for i, p in zip(images, place)]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, 3), np.int32)

    def close(self) -> None:
        self.rows.close()
        self.checks.close()

    def __enter__(self) -> "TurnedCopies":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TurnedOpinion:
    """A whole turned copy's leave-one-out kNN opinion, its map cut to the pixels calibration reads (as the
    upright images' are: decision.calibration_sample)."""

    source: int  # the image's place among the fit's kept images
    raw: RawScore
    shape: tuple[int, ...]


def surface_warning(n_surfaces: int, n_images: int, threshold: float | None = None,
                    upright_threshold: float | None = None, aligned: bool = False) -> str | None:
    """What to tell a user who fits ``orientation="any"`` on a surface (most images run out of the frame), else
    None. A surface's grain turned is covered more thinly than upright (the bank holds its upright patches and at
    most as many again from turned copies), so a turned good photo, left out, can score above an upright one; the
    threshold takes each image's worse pose so that turned good parts pass, and on one of the surfaces measured it
    then rose above almost every defect."""
    if n_images == 0 or n_surfaces / n_images <= 0.5:
        return None
    here = "" if threshold is None or not upright_threshold else (
        f" (here {threshold:.4g}, {threshold / upright_threshold - 1:+.0%} on the {upright_threshold:.4g} the "
        "upright photos alone set)")
    grain = ", each photo turned to the good images' grain first" if aligned else ""
    return (f"orientation any on a surface ({n_surfaces} of {n_images} good images run out of the frame{grain}): the "
            "threshold lets turned good photos pass, and where a turned surface scores above an upright one it can "
            f"rise above most defects{here} (docs/decisions.md). Check recall on known defects with anomaly "
            "evaluate, or hold the surface one way round (a jig) and fit with --orientation fixed")


def left_out_turned(knn: Any, embedder: Any, copies: TurnedCopies | None, kept: Sequence[int],
                    shortlist: Any = None, numbers: Sequence[int] | None = None) -> list[TurnedOpinion]:
    """Each kept image's whole turned copy scored against the bank without its source image's patches (its own
    copies included): what a good part turned scores, for the threshold to let it pass. Copies of one working
    size are searched together, as the originals are. ``numbers``: the bank's number of each kept image (default:
    its place among them, as the fit numbers them; an update's are numbered after the model's images)."""
    if copies is None or not copies.with_checks:
        return []
    keep = torch.from_numpy(knn.selected_) if copies.keep is None else None  # an update's are kept dimensions
    shapes = [copies.check_shapes[i] for i in kept]
    out: list[TurnedOpinion] = []
    for ids in embedder.groups_by_shape(shapes):
        grids = [copies.checks.grid(kept[p], keep) for p in ids]
        batch = embedder.wrap_many(grids, [shapes[p] for p in ids])
        if copies.alignment is not None:  # an aligned copy's pure fill takes its scores as scoring's does
            cells = [copies.alignment.fill_cells(copies.check_real[kept[p]], g.shape[:2]) for p, g in zip(ids, grids)]
            batch = dataclasses.replace(batch, copied=cells)
        raws = knn.score_left_out(batch, ids if numbers is None else [numbers[p] for p in ids], shortlist=shortlist)
        for p, raw in zip(ids, raws):
            score, amap = own_pixels(raw, copies.check_real[kept[p]])
            out.append(TurnedOpinion(p, (score, calibration_sample(amap)), shapes[p]))
    return sorted(out, key=lambda t: t.source)


def own_pixels(raw: RawScore, real: np.ndarray | None) -> RawScore:
    """An aligned copy's opinion read as a photo's is (grain.py): its map on its own pixels (``real``; the fill is
    not inspected) and the score their hottest. ``real`` None: the opinion as it is."""
    if real is None:
        return raw
    amap = np.where(real, raw[1], np.nan)
    return float(np.nanmax(amap)), amap


def worst_pose(raws: list[dict[str, RawScore]], turned: list[TurnedOpinion]) -> list[dict[str, RawScore]]:
    """Each training image's calibration opinion: its turned copy's when that scores higher than the upright one.
    One score per image keeps the threshold's statistics those of one population (pooling both poses would
    make it two, and widen its spread)."""
    out = list(raws)
    for t in turned:
        if t.raw[0] > out[t.source][KNN][0]:
            out[t.source] = {KNN: t.raw}
    return out


def upright_only_threshold(raws: list[dict[str, RawScore]], names: Sequence[str], sigma: float) -> float:
    """The threshold the upright poses alone would set (their outliers left out, as the fit leaves out its own):
    against the fit's, how far the turned pose raised it (the manifest, the surface warning, ``anomaly info``)."""
    from .contamination import threshold_sample

    _, ids = threshold_sample([r[KNN][0] for r in raws], names, sigma)
    decision = Decision(sigma)
    decision.calibrate([{KNN: raws[j][KNN]} for j in ids])
    assert decision.calibration is not None
    return float(decision.calibration.threshold)


def posed_grids(image_ids: Sequence[int], grids: list[np.ndarray], shapes: list[tuple[int, ...]],
                turned: list[TurnedOpinion], posed: list[dict[str, RawScore]], turned_grid: Any,
                turned_real: Any = None) -> tuple[list[np.ndarray], list[tuple[int, ...]], list[np.ndarray | None]]:
    """The calibration set's grids and shapes with each image's turned copy where that pose set its score, so
    that an update re-scores the pose the threshold was taken from (``turned_grid(place)``: that copy's grid in
    the kept dimensions, read only for the images the set keeps)."""
    by_source = {t.source: t for t in turned}
    grids, shapes, reals = list(grids), list(shapes), [None] * len(grids)
    for j, i in enumerate(image_ids):
        t = by_source.get(int(i))
        if t is not None and posed[int(i)][KNN] is t.raw:
            grids[j], shapes[j] = turned_grid(int(i)), t.shape
            reals[j] = None if turned_real is None else turned_real(int(i))
    return grids, shapes, reals


def with_turned_copies(model: Any, images: list[np.ndarray], grids: list[tuple[int, ...]], patches: torch.Tensor,
                       sources: np.ndarray | None, first_image: int, copies: TurnedCopies
                       ) -> tuple[torch.Tensor, np.ndarray | None, dict[str, int]]:
    """An update's new patches (kept dimensions) and sources, followed by those of turned ``copies``
    (:func:`update_copies`) of its new ``images`` (the copies' sources name the new images, numbered from
    ``first_image``), and what the manifest's ``training.turned_copies`` counts of them (``patches``,
    ``surface_images``)."""
    for start in range(0, len(images), model.embedder.batch_size):
        copies.add(images[start : start + model.embedder.batch_size],
                   [tuple(g) for g in grids[start : start + model.embedder.batch_size]])
    ids = list(range(len(images)))
    turned = copies.rows.gather(ids).to(patches.dtype)
    patches = torch.cat([patches, turned])
    if sources is not None:
        sources = np.concatenate([sources, copies.sources(ids, [first_image + i for i in ids])])
    counts = {"patches": int(turned.shape[0]), "surface_images": sum(copies.surface)}
    return patches, sources, counts


def update_copies(model: Any, first_image: int, with_checks: bool) -> TurnedCopies:
    """The turned copies an update makes of its new images (:func:`with_turned_copies`), with each image's first
    copy kept whole when ``with_checks`` (the update calibrates on its images' worse pose, as the fit does)."""
    # turns of their own: seeded by where the new images start, not the fit's first turns again
    # the copies made as the fit made its own (a model fitted before surfaces were cut mirrored them)
    made = (model.manifest_.training.turned_copies or {}).get("surface_copies", "fill")
    return TurnedCopies(model.embedder, model.config.seed, keep=model.knn.keep, with_checks=with_checks,
                        stream=first_image + 1, surface_copies=made, alignment=model.alignment_)
