"""A surface's grain: read which way it runs, and turn a photo so that it runs the way the good images' does.

Why: a surface with a directional grain (ground, brushed or drawn metal, a tile's streaks) turned under the camera
is a texture the upright bank never held, and turned copies in the bank cover every angle of it only thinly
within the bank's size cap (docs/decisions.md, "Parts in any orientation"). When the good images' grain runs one
way, the angle of a new photo's grain can be read off the photo itself: the structure tensor's main direction
(the mean outer product of the image's gradients), which is exact for a straight grain and needs no reference
image. Turning the photo back by that angle leaves the bank's own grain to match, at any angle, with no copy
for it. Only modulo 180 degrees, and not a mirror: a grain turned half round or mirrored runs the same way, and the
copies in the bank (each a turned photo turned back by this same reading) hold what remains.

A turned photo does not fill an upright frame. The corners it leaves are filled along the grain (each line of
pixels along the streaks mirrored at the ends of its run of real pixels), so the streaks run on into the corners
as they would on a larger surface; a plain colour or the picture mirrored at its edges would draw a seam the bank
never saw. The map is read on the photo's own pixels only: turned back onto the photo, so the fill never enters
the score, the map or the regions.

The fit keeps the alignment only where it reads turns reliably (:meth:`GrainAlignment.fit`): it turns a sample of
the good images by known angles, cuts them as a turned camera frames a surface, and reads the turns back. A grain
too weak or too isotropic to read (a fine speckle, a part on a background) keeps the turned copies alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .anomaly_map import resize_map
from .orientation import Turn, cells_at, plain_background, random_turns
from .scorer import MatchedScore, PatchMatches, RawScore

WorkingSize = Callable[[int, int], tuple[int, int]]

# turns smaller than this (degrees) are not undone: the bank's own images vary by about as much, and a turn costs a
# resampling and a fill at the corners
MIN_TURN = 2.0
# the fit keeps the alignment when, on its good images turned by known angles, 90% of the turns are read back
# within this many degrees (docs/decisions.md)
MAX_READ_ERROR = 5.0
# good images the fit turns and reads back
CHECK_IMAGES = 64
# a photo whose grain is less clear (structure-tensor coherence) than CLEAR_MARGIN times the clarity this share of
# the fit's good images turned and cut reach is scored as it came: a defect that breaks the grain reads as a turn
# it is not (docs/decisions.md); the margin keeps a new good photo a little less clear than the fit's checks read
CLEAR_SHARE = 0.98
CLEAR_MARGIN = 0.6
# the bicubic turn mixes the fill into this many pixels at the edge of the turned photo: they are filled too
EDGE = 2
# a large photo is read and turned at this many times the network's working size (each side), not its own: the
# canvas is resampled to the working size afterwards anyway, and a turn or a grain reading at full resolution cost
# a 20-megapixel photo many times what scoring it upright does (docs/decisions.md)
OVERSAMPLE = 2
# a reading is made again this many times on the photo turned back by it: the grain then lies at the reference's
# angle to the pixel grid, where the derivative's bias against the grid is the reference's own and cancels
# (docs/decisions.md)
READ_ROUNDS = 1
# the upright box of a turned photo that a reading is refined on keeps at least this many pixels a side
MIN_REFINE_SIDE = 16


def shrunk(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` shrunk by ``factor`` (antialiased bilinear; 1 or more: as it is)."""
    if factor >= 1.0:
        return image
    h, w = image.shape[:2]
    return resize_picture(image, (max(1, int(round(h * factor))), max(1, int(round(w * factor)))))


def resize_picture(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (one channel or several) resized to ``shape`` (h, w), bilinear."""
    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR))


def keep_factor(shape: tuple[int, ...], work: tuple[int, int], times: float) -> float:
    """How far an image of ``shape`` can shrink with each side still ``times`` its working size ``work`` (at most
    1): a thin strip keeps its short side."""
    return min(1.0, times * max(work[0] / shape[0], work[1] / shape[1]))


def one_channel(image: np.ndarray) -> np.ndarray:
    """A grey photo (a mono camera's, decoded to three equal channels) as its one channel; any other as it is.
    Turning, filling and reading one channel costs a third of three, with the same values."""
    if image.ndim == 3 and image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 1]) \
            and np.array_equal(image[..., 0], image[..., 2]):
        return np.ascontiguousarray(image[..., 0])
    return image


def as_channels(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``image`` (from :func:`one_channel` of ``like``) with ``like``'s channels again."""
    if image.ndim == like.ndim:
        return image
    # a stack of the channel: a broadcast view copied to C order is a strided copy several times slower
    return np.stack([image] * like.shape[2], axis=2)


def grain_angle(image: np.ndarray, factor: float = 1.0) -> tuple[float, float]:
    """The direction of the image's strongest gradients in degrees modulo 180 (0: intensity changes along x,
    so streaks run along y; image axes, y down), and its coherence (0: isotropic, 1: one direction only).
    ``factor``: read off the image shrunk by it (1: at its own size)."""
    if factor < 1.0:
        image = shrunk(image, factor)
    image = one_channel(image)  # the channels' mean, read from one when they are equal
    g = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    if min(g.shape) > 4:  # the edge pixels' gradient across the edge reads as none (reflected): a thin photo's bias
        # one channel of whole levels: the slices give ndimage's values exactly; the mean of unequal channels is no
        # whole number, and only ndimage's one rounding of a double sum gives its values
        whole = image.ndim == 2 and image.dtype.kind in "ui" and image.dtype.itemsize <= 2
        if whole:
            gx, gy = _inner_sobel(g)
        else:
            gx, gy = ndimage.sobel(g, axis=1)[1:-1, 1:-1], ndimage.sobel(g, axis=0)[1:-1, 1:-1]
    else:
        gx, gy = ndimage.sobel(g, axis=1), ndimage.sobel(g, axis=0)
    jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
    angle = 0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy)) % 180.0
    return angle, math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy + 1e-12)


def _inner_sobel(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel's x and y derivatives of ``g`` at its inner pixels (one in from every edge), as ``ndimage.sobel`` gives
    them there when ``g`` holds whole levels of at most sixteen bits, from shifted slices: no pass over the edges the
    reading drops, and none in double precision (such sums are exact in float32 either way)."""
    dx = g[:, 2:] - g[:, :-2]
    dy = g[2:] - g[:-2]
    return dx[:-2] + 2 * dx[1:-1] + dx[2:], dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]


def _read_factor(image: np.ndarray, read_scale: float | None, working_size: WorkingSize | None) -> float:
    """How far ``image`` is shrunk to read its grain: each side ``read_scale`` times its working size's (1: at its
    own size, as models without ``read_scale`` read it)."""
    if read_scale is None or working_size is None:
        return 1.0
    return keep_factor(image.shape, working_size(*image.shape[:2]), read_scale)


def _wrap90(angle: float) -> float:
    """An angle modulo 180 degrees, as the equivalent in [-90, 90)."""
    return (angle + 90.0) % 180.0 - 90.0


def _mean_direction(angles: Sequence[float]) -> tuple[float, float]:
    """The circular mean of directions modulo 180 degrees and its resultant length (1: all the same)."""
    doubled = np.radians(2.0 * np.asarray(angles, float))
    s, c = float(np.sin(doubled).mean()), float(np.cos(doubled).mean())
    return (math.degrees(math.atan2(s, c)) / 2.0) % 180.0, math.hypot(s, c)


@dataclass(frozen=True)
class GrainAlignment:
    """Turns photos so their grain runs at ``reference`` degrees (:func:`grain_angle`'s convention)."""

    reference: float
    read_error_p90: float  # degrees, on the fit's good images turned by known angles (recorded, not used)
    resultant: float  # how alike the good images' directions are (1: the same)
    min_coherence: float = 0.0  # a photo's grain less clear than this is not read (CLEAR_SHARE)
    # a photo's grain is read with each side this many times the side the network sees (OVERSAMPLE), when it is
    # larger; None: at the photo's own size, as models fitted before it was recorded read it
    read_scale: float | None = None
    # how many times a reading is refined (READ_ROUNDS); 0: read once, as models fitted before it was recorded read
    read_rounds: int = 0
    # a turned canvas's pure-fill cells take the scores of the cells they repeat, unsearched (fill_sources), and
    # give the bank no rows; False: searched like the rest, as models fitted before it was recorded were calibrated
    fill_copied: bool = False

    @property
    def along_columns(self) -> bool:
        """The fill runs along columns when the streaks run nearer the y axis than the x axis."""
        return abs(_wrap90(self.reference)) < 45.0

    def turn_for(self, image: np.ndarray, working_size: WorkingSize | None = None) -> Turn | None:
        """The turn that brings ``image``'s grain to the reference, or None when it is already within
        :data:`MIN_TURN` or its grain is too unclear to read (``min_coherence``). ``working_size``: the embedder's
        ((h, w) -> (h, w)), for :attr:`read_scale`."""
        return self._turn(*self._reading(image, working_size))

    def _reading(self, image: np.ndarray, working_size: WorkingSize | None) -> tuple[float, float]:
        """``image``'s grain angle and coherence (:func:`grain_angle`), refined :attr:`read_rounds` times."""
        image = one_channel(shrunk(image, _read_factor(image, self.read_scale, working_size)))
        angle, coherence = grain_angle(image)
        return self._refined(image, angle, coherence), coherence

    def _refined(self, image: np.ndarray, angle: float, coherence: float) -> float:
        """``angle``, read off ``image``, read again on the upright box of ``image`` turned back by it: what the
        second reading finds off the reference is what the first missed. A photo the first reading leaves as it
        came (:meth:`_turn`) is not read again."""
        for _ in range(self.read_rounds):
            turn = self._turn(angle, coherence)
            if turn is None:
                break
            y0, x0, h, w = turn.inscribed_box(image.shape)
            if min(h, w) < MIN_REFINE_SIDE:
                break
            box = turn._turned(image, Image.Resampling.BICUBIC, 0, 0, box=(y0, x0, h, w))
            angle += _wrap90(grain_angle(box)[0] - self.reference)
        return angle

    def _turn(self, angle: float, coherence: float) -> Turn | None:
        """:meth:`turn_for` from a reading already made (:func:`grain_angle`)."""
        off = _wrap90(self.reference - angle)
        # Turn is counter-clockwise on screen, which lowers an angle measured with y down
        return None if abs(off) < MIN_TURN or coherence < self.min_coherence else Turn(-off)

    def view(self, image: np.ndarray, working_size: WorkingSize) -> "TurnedView | None":
        """What scoring embeds of ``image``, and an update learns of a good one (None: the photo as it came): turned
        back to the grain on its canvas, from the photo shrunk to :data:`OVERSAMPLE` times the canvas's working size
        (``working_size``: the embedder's, (h, w) -> (h, w)) when it is larger, so that the turn's cost does not grow
        with the camera's resolution. The network sees the canvas at the working size of the full-size canvas
        either way (:attr:`TurnedView.work`)."""
        grey = one_channel(image)  # read, turned and filled as one channel, once
        turn = self.turn_for(grey, working_size)
        if turn is None:
            return None
        full = turn.out_shape(image.shape)
        work = working_size(*full)
        photo = shrunk(grey, keep_factor(full, work, OVERSAMPLE))
        canvas, real, inner = self._canvas(photo, turn)
        return TurnedView(turn, as_channels(canvas, image), photo.shape[:2] + image.shape[2:], work, real, inner, self)

    def fill_cells(self, real: np.ndarray | None, grid: tuple[int, ...], inner: np.ndarray | None = None
                   ) -> np.ndarray | None:
        """:func:`fill_sources` of a canvas this alignment turned and filled, whose own pixels are ``real`` (None:
        searched whole: no fill, or a model fitted before its fill's cells were copied, which searches them as it
        was calibrated)."""
        if real is None or not self.fill_copied:
            return None
        return fill_sources(real, self.along_columns, (int(grid[0]), int(grid[1])), inner)

    def canvas(self, image: np.ndarray, turn: Turn) -> np.ndarray:
        """``image`` turned by ``turn`` on the grown canvas, its uncovered corners filled along the grain."""
        return self._canvas(image, turn)[0]

    def _canvas(self, image: np.ndarray, turn: Turn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`canvas`, which of its pixels show the photo (True) rather than the fill, and which of those lie
        inside the band the fill covers too (:func:`real_pixels`)."""
        grey = one_channel(image)
        turned = turn._turned(grey, Image.Resampling.BICUBIC, 0, (0,) * grey.shape[2] if grey.ndim == 3 else 0)
        real, inner = real_pixels(turn, image.shape)
        canvas = as_channels(fill_along(turned, inner, self.along_columns), image)
        return canvas, real, inner

    def _to_photo(self, turn: Turn, shape: tuple[int, ...], inner: np.ndarray | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
        """The map of points ``(N, 2)`` (x, y) in the canvas :meth:`canvas` makes of an image of ``shape`` onto that
        image: a point of the fill onto the place whose value the fill copied (:func:`filled_from`), not the place
        past the image's edge it lies over. ``inner``: :func:`real_pixels`' second mask, when already made."""
        if inner is None:
            inner = real_pixels(turn, shape)[1]
        return lambda xy: turn.to_source(filled_from(xy, inner, self.along_columns), shape)

    def copy_of(self, image: np.ndarray, turn: Turn, min_side: int, working_size: WorkingSize | None = None
                ) -> tuple[np.ndarray, Any, np.ndarray | None]:
        """A training image as a turned camera would frame it (turned by ``turn``, cut to real pixels) and as
        scoring would then see it (turned back by the grain read off the cut): the copy, how to map the copy's
        points back to ``image`` (``(N, 2)`` x, y -> x, y), and which of the copy's pixels are the photo's (None:
        all of them)."""
        y0, x0, h, w = turn.inscribed_box(image.shape)
        if min(h, w) < min_side:  # too small a cut to read or to hold a patch's context: the whole turned canvas
            return turn.image(image), turn.cut_to_source(image.shape, mirrored=plain_background(image) is None), None
        cut = np.ascontiguousarray(turn.image(image)[y0 : y0 + h, x0 : x0 + w])
        from_cut = turn.cut_to_source(image.shape, y0, x0)
        back = self.turn_for(cut, working_size)
        if back is None:
            return cut, from_cut, None
        full = back.out_shape(cut.shape)
        factor = 1.0 if working_size is None else keep_factor(full, working_size(*full), OVERSAMPLE)
        if factor < 1.0:
            # a large photo: turned as scoring turns it (:meth:`view`, from a shrunk copy), so that the bank holds
            # the edges and fill scoring's canvases show; the canvas and its masks keep the full-size geometry
            real, inner = real_pixels(back, cut.shape)
            small = self._canvas(shrunk(cut, factor), back)[0]
            canvas = as_channels(resize_picture(one_channel(small), full), cut)
        else:
            canvas, real, inner = self._canvas(cut, back)
        to_cut = self._to_photo(back, cut.shape, inner)
        return canvas, lambda xy: from_cut(to_cut(xy)), real

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GrainAlignment":
        read_scale = d.get("read_scale")
        return cls(float(d["reference"]), float(d["read_error_p90"]), float(d["resultant"]),
                   float(d["min_coherence"]), None if read_scale is None else float(read_scale),
                   int(d.get("read_rounds") or 0), bool(d.get("fill_copied", False)))

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], seed: int, working_size: WorkingSize | None = None
            ) -> tuple["GrainAlignment | None", dict[str, Any]]:
        """The alignment the good ``images`` allow, or None, and what the check measured. Kept only for a
        surface (most images run out of the frame) whose turns, cut as a turned camera frames them, are read
        back within :data:`MAX_READ_ERROR` degrees for 90% of the images. ``images``: the sample to check (the fit
        decodes at most :data:`CHECK_IMAGES` of its good images for it); ``working_size``: the embedder's, to read
        grains at :data:`OVERSAMPLE` times the size the network sees (None: at the images' own size)."""
        images = list(images)
        if not images:
            return None, {"kept": False, "why": "no images"}
        surfaces = sum(plain_background(im) is None for im in images)
        if surfaces * 2 <= len(images):
            return None, {"kept": False, "why": "not a surface"}
        read_scale = None if working_size is None else float(OVERSAMPLE)
        reference, resultant = _mean_direction([grain_angle(im, _read_factor(im, read_scale, working_size))[0]
                                                for im in images])
        probe = cls(reference, 0.0, resultant, read_scale=read_scale, read_rounds=READ_ROUNDS)
        errors, clear = [], []
        for im, drawn in zip(images, random_turns(len(images), np.random.default_rng([abs(seed), 0x6A]))):
            turn = Turn(drawn.angle)  # not mirrored: a mirror also turns a grain that runs obliquely to the frame
            y0, x0, h, w = turn.inscribed_box(im.shape)
            if min(h, w) < 8:
                continue
            cut = turn.image(im)[y0 : y0 + h, x0 : x0 + w]
            angle, coherence = probe._reading(cut, working_size)
            clear.append(coherence)
            back = probe._turn(angle, coherence)
            read = 0.0 if back is None else back.angle  # the turn that undoes it: -turn.angle modulo 180
            errors.append(abs(_wrap90(read + turn.angle)))
        if not errors:
            return None, {"kept": False, "why": "no image large enough to read a turn off"}
        p90 = float(np.percentile(errors, 90))
        min_coherence = CLEAR_MARGIN * float(np.percentile(clear, 100 * (1 - CLEAR_SHARE)))
        details = {"kept": p90 <= MAX_READ_ERROR, "reference": reference, "resultant": resultant,
                   "read_error_p90": p90, "min_coherence": min_coherence, "checked": len(errors),
                   "read_scale": read_scale, "read_rounds": READ_ROUNDS, "fill_copied": True}
        if p90 > MAX_READ_ERROR:
            details["why"] = f"turns read back within {p90:.1f} degrees (90%), over {MAX_READ_ERROR:g}"
            return None, details
        return cls(reference, p90, resultant, min_coherence, read_scale, READ_ROUNDS, True), details


def real_pixels(turn: Turn, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Which pixels of the canvas ``turn`` makes of an image of ``shape`` show the image (True) rather than the
    fill, and which of them also lie :data:`EDGE` pixels inside its edge (the bicubic turn mixes the fill into the
    rest): the nearest turn of the image's footprint, eroded by a diamond of that radius (what iterating the
    cross-shaped erosion :data:`EDGE` times does, as slices of one padded array rather than passes over it)."""
    real = turn._turned(np.full(shape[:2], 255, np.uint8), Image.Resampling.NEAREST, 0, 0) > 127
    return real, inner_pixels(real)


def inner_pixels(real: np.ndarray) -> np.ndarray:
    """The pixels of ``real`` at least :data:`EDGE` pixels inside its edge (a diamond erosion, as slices of one
    padded array): those the fill leaves as they are."""
    h, w = real.shape
    padded = np.pad(real, EDGE)  # outside the canvas counts as fill
    inner = real.copy()
    for dy in range(-EDGE, EDGE + 1):
        for dx in range(abs(dy) - EDGE, EDGE - abs(dy) + 1):
            if dy or dx:
                inner &= padded[EDGE + dy : EDGE + dy + h, EDGE + dx : EDGE + dx + w]
    return inner


def fill_sources(real: np.ndarray, along_columns: bool, grid: tuple[int, int], inner: np.ndarray | None = None
                 ) -> np.ndarray | None:
    """For each cell of a ``grid`` laid over a canvas whose photo pixels are ``real`` (the rest filled along the
    grain by :func:`fill_along`), the flat index of the cell whose patch score it takes: its own where it holds a
    pixel of the photo, else the cell its centre's fill was copied from. None when every cell holds one.

    Why: a cell of pure fill is never read (the map is read on the photo's own pixels), but its score reaches the
    photo's edge through the map's smoothing. The fill repeats the photo's pixels, so the score of the cell it
    repeats stands for it (a defect near the edge still shows in its mirror image), and the kNN need not search
    it: on a turned photo's canvas that is a large share of the search."""
    h, w = int(grid[0]), int(grid[1])
    height, width = real.shape
    searched = _touched(_touched(real, h), w, axis=1)
    if searched.all() or not searched.any():
        return None
    rr, cc = np.nonzero(~searched)
    xy = np.stack([(cc + 0.5) * width / w, (rr + 0.5) * height / h], axis=1)
    src = filled_from(xy, inner_pixels(real) if inner is None else inner, along_columns)
    sr = np.clip(np.floor(src[:, 1] * h / height), 0, h - 1).astype(np.int64)
    sc = np.clip(np.floor(src[:, 0] * w / width), 0, w - 1).astype(np.int64)
    stray = ~searched[sr, sc]
    if stray.any():  # a source cell that holds no photo pixel (a fill copied from a sliver): the nearest that does
        _, (nr, nc) = ndimage.distance_transform_edt(~searched, return_indices=True)
        sr[stray], sc[stray] = nr[sr[stray], sc[stray]], nc[sr[stray], sc[stray]]
    out = np.arange(h * w, dtype=np.int64)
    out[rr * w + cc] = sr * w + sc
    return out


@dataclass(frozen=True)
class TurnedView:
    """A photo as an aligned model embeds it (:meth:`GrainAlignment.view`)."""

    turn: Turn
    canvas: np.ndarray
    shape: tuple[int, ...]  # the photo the canvas was turned from: the photo's own shape, or its shrunk copy's
    work: tuple[int, int]  # the working size the canvas is embedded at: the full-size canvas's
    real: np.ndarray | None = None  # which canvas pixels show the photo (:func:`real_pixels`)
    inner: np.ndarray | None = None  # and which of those the fill leaves as they are
    alignment: GrainAlignment | None = None  # the alignment that turned and filled it

    def cell_sources(self, grid: tuple[int, int]) -> np.ndarray | None:
        """:meth:`GrainAlignment.fill_cells` of the canvas for its feature ``grid`` (None: every cell searched)."""
        return None if self.alignment is None else self.alignment.fill_cells(self.real, grid, self.inner)


def _touched(mask: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """``mask`` reduced along ``axis`` to ``n`` equal spans: True where any pixel a span touches (partly or whole)
    is True. Each span runs from the pixel its start falls in to the one its end falls in."""
    size = mask.shape[axis]
    edges = np.arange(n + 1) * size / n
    starts = np.floor(edges[:-1]).astype(np.int64)
    out = np.logical_or.reduceat(mask, starts, axis=axis)  # [start, next start): the pixels wholly inside
    # a span whose end falls inside a pixel also touches that pixel, the next span's first
    ends = np.ceil(edges[1:]).astype(np.int64)
    more = np.flatnonzero(ends[:-1] > starts[1:])
    if len(more):
        if axis == 0:
            out[more] |= mask[starts[more + 1]]
        else:
            out[:, more] |= mask[:, starts[more + 1]]
    return out


def fill_along(image: np.ndarray, real: np.ndarray, along_columns: bool) -> np.ndarray:
    """``image`` with every pixel outside ``real`` filled from its line along the grain (a column, or a row):
    the line's run of real pixels (first to last) mirrored at both its ends, repeated as far as needed. A line with
    fewer than two real pixels takes its nearest such neighbour line's fill."""
    from .grain_kernel import fill_columns  # compiled on first use, then cached on disk

    a = image if along_columns else np.swapaxes(image, 0, 1)
    runs = _runs(real if along_columns else real.T)
    if runs is None:
        return image.copy()
    cols, top, bottom = runs
    out = np.empty_like(a)
    fill_columns(a, out, cols, top, bottom)
    # C order either way: the network's input is read without a copy (preprocessing.to_tensor)
    return out if along_columns else np.ascontiguousarray(np.swapaxes(out, 0, 1))


def warm_fill() -> None:
    """Compile (or load from numba's cache) :func:`fill_along`'s kernel for the arrays a turned photo hands it, both
    ways along the grain, so that the first photo an aligned model scores does not pay for it. Through a canvas, as
    scoring makes one: numba compiles a kernel per kind of array, and a turn hands it Pillow's read-only pixels of
    one channel (a grey photo) or three (uint8, as every photo decodes)."""
    grey = np.zeros((16, 16), np.uint8)
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 1] = 1  # channels apart: a colour photo is filled as three
    for image in (grey, colour):
        for reference in (0.0, 90.0):  # along columns, and along rows
            GrainAlignment(reference, 0.0, 1.0).canvas(image, Turn(30.0))


def filled_from(xy: np.ndarray, real: np.ndarray, along_columns: bool) -> np.ndarray:
    """Points ``(N, 2)`` (x, y) of an image :func:`fill_along` filled outside ``real`` -> the points whose pixels
    they show: a pixel it left as it was, its point as it is; a filled one, the centre of the pixel its value was
    copied from. A bank row from the fill names the place of the photo the fill repeats, not the place beyond the
    photo's edge where the fill lies."""
    xy = np.asarray(xy, float)
    runs = _runs(real if along_columns else real.T)
    if runs is None:
        return xy
    height, width = real.shape
    px = np.clip(np.floor(xy[:, 0]), 0, width - 1).astype(np.int64)
    py = np.clip(np.floor(xy[:, 1]), 0, height - 1).astype(np.int64)
    line, at = (px, py) if along_columns else (py, px)
    cols, top, bottom = runs
    src_line = cols[line]
    src_at = _from_run(at.astype(np.int32), top[line], bottom[line])
    sx, sy = (src_line, src_at) if along_columns else (src_at, src_line)
    kept = (src_line == line) & (src_at == at)  # a pixel fill_along leaves as it is
    return np.where(kept[:, None], xy, np.stack([sx + 0.5, sy + 0.5], axis=1))


def _runs(real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For each column of ``real``, the column its fill is read from and that column's run of real pixels (first
    and last row): its own, or its nearest column with a run of two or more (the left one on a tie). None when no
    column has one (nothing to fill from)."""
    height, width = real.shape
    has = real.any(axis=0)
    top = np.where(has, real.argmax(axis=0), 0).astype(np.int32)
    bottom = np.where(has, height - 1 - real[::-1].argmax(axis=0), 0).astype(np.int32)
    done = has & (bottom > top)
    if not done.any():
        return None
    cols = np.arange(width, dtype=np.int32)
    if not done.all():  # lines with no run: their nearest filled line (the left one on a tie)
        have = np.flatnonzero(done).astype(np.int32)
        right = np.clip(np.searchsorted(have, cols), 0, len(have) - 1)
        left = np.clip(right - 1, 0, len(have) - 1)
        nearest = np.where(np.abs(have[left] - cols) <= np.abs(have[right] - cols), have[left], have[right])
        cols, top, bottom = nearest, top[nearest], bottom[nearest]
    return cols, top, bottom


def _from_run(rows: np.ndarray, t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The row of the run ``t``..``b`` (first to last real row, broadcast with ``rows``) whose value each of
    ``rows`` takes: its own inside the run; outside, the run mirrored at each end, which repeats every 2n rows."""
    n = b - t + 1
    j = np.where(rows < t, (2 * n - (t - rows)) % (2 * n), np.where(rows > b, (n - 1 + rows - b) % (2 * n), rows - t))
    return t + np.where(j < n, j, 2 * n - 1 - j)


def turned_back(view: TurnedView, raw: RawScore, photo_shape: tuple[int, ...]) -> RawScore:
    """A scorer's opinion of a turned canvas -> its opinion of the photo of ``photo_shape``: the map turned back
    onto the photo's own pixels, the image score its hottest pixel there (the fill never counts), and the kNN's
    matched patches on the photo's grid (for the evidence of its regions). A canvas turned from a shrunk copy of
    the photo has its map turned back at that copy's size and resized to the photo's."""
    turn, canvas_shape, shape = view.turn, view.canvas.shape, view.shape
    amap = turn.map_back(raw[1], shape)
    score = float(np.nanmax(amap)) if np.isfinite(amap).any() else float(raw[0])
    amap = resize_map(amap, tuple(photo_shape[:2]))
    if isinstance(raw, MatchedScore):
        m = raw.matches
        matches = PatchMatches(nearest=grid_back(turn, m.nearest, canvas_shape, shape),
                               distance=grid_back(turn, m.distance, canvas_shape, shape), pooled=m.pooled)
        return MatchedScore(score, amap, matches)
    return score, amap


def photo_cells(alignment: GrainAlignment, turn: Turn, canvas_grid: tuple[int, int], canvas_shape: tuple[int, ...],
                photo_shape: tuple[int, ...], photo_grid: tuple[int, int], inner: np.ndarray | None = None
                ) -> np.ndarray:
    """``(h, w, 2)``: for each cell of a canvas's feature grid (the photo of ``photo_shape`` turned by ``turn`` and
    filled by ``alignment``), the ``(row, col)`` of the photo's own ``photo_grid`` it shows (a cell of the fill: the
    one whose pixels the fill copied). An update learns a turned photo from its canvas; its bank rows name these
    cells, so that their evidence is a place in the photo as it came, the image its name, digest and thumbnail
    stand for. ``photo_shape`` may be a shrunk copy's (:meth:`GrainAlignment.view`): the cells are read in
    proportion, on the grid of the photo at its own size. ``inner``: :func:`real_pixels`' second mask, when made."""
    to_photo = alignment._to_photo(turn, photo_shape, inner)
    return cells_at(to_photo, canvas_grid, canvas_shape, photo_shape, photo_grid).reshape(*canvas_grid, 2)


def grid_back(turn: Turn, grid: np.ndarray, canvas_shape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A feature-grid array over the turned canvas -> one over the photo of ``shape``, at the same cell size (each
    photo cell takes the canvas cell its centre falls in)."""
    gh, gw = grid.shape[:2]
    ch, cw = canvas_shape[:2]
    h, w = shape[:2]
    ph, pw = max(1, int(round(gh * h / ch))), max(1, int(round(gw * w / cw)))
    rr, cc = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    xy = np.stack([(cc.ravel() + 0.5) * w / pw, (rr.ravel() + 0.5) * h / ph], axis=1)
    at = turn.from_source(xy, shape)
    row = np.clip(np.floor(at[:, 1] * gh / ch), 0, gh - 1).astype(np.int64)
    col = np.clip(np.floor(at[:, 0] * gw / cw), 0, gw - 1).astype(np.int64)
    return grid[row, col].reshape(ph, pw, *grid.shape[2:])
