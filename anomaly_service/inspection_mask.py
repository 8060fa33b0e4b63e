"""The inspection mask: which pixels of the part are inspected, so fixtures, labels, conveyor edges and printed
dates that change from part to part are never reported as defects.

A mask is given at fit as a PNG the size of the training images (nonzero = inspect, zero = ignore) or as a JSON
file of polygons in the training images' pixel coordinates, or it is found from the good images (``auto``,
foreground.py). It is stored in the model (``mask.png``) and applied twice, at fit, scoring and update alike:

* on the network's input (embedder.py): outside pixels become the normalization's mean colour, so no patch
  feature sees what is there (a feature sees well beyond its own patch: a printed date next to the inspected
  area would otherwise still move the scores inside it);
* on the maps, after smoothing (:func:`score_inside`): outside pixels are marked not inspected (NaN) in each
  scorer's raw map and never enter an image score. The decision (decision.py) calibrates on inspected pixels only
  and shows an uninspected pixel at the image's typical inspected level (its median, kept below the threshold),
  so it is never part of a region and the drift statistic (the map's median) reads the inspected area.

The mask for one image is a function of the mask and the image's shape (:meth:`InspectionMask.at`): when parts
are aligned later, the alignment's transform of that image is applied there, and the mask follows the part.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from . import map_sample
from .errors import ConfigError, ModelFormatError
from .images import decodable_admitted, opened_admitted, opened_within, transparent
from .scoring import image_score

if TYPE_CHECKING:
    from .embedder import Embedder

log = logging.getLogger(__name__)

MASK_FILE = "mask.png"
AUTO = "auto"


@dataclass(frozen=True, eq=False)
class InspectionMask:
    """Inspected pixels (True) in the frame of the training images."""

    pixels: np.ndarray  # (H, W) bool
    source: str  # png, polygons or auto
    details: dict[str, Any] = field(default_factory=dict)  # how it was made (recorded in the manifest)
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != bool:
            raise ValueError("an inspection mask is a 2-D boolean array")
        if not self.pixels.any():
            # "all zero" misled where the file is white and every pixel transparent (erased whole in an editor)
            raise ConfigError("the inspection mask inspects no pixel (each is black or transparent, or outside every "
                              "polygon): nothing would be inspected")

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the frame the mask was drawn for."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @functools.cached_property
    def everything(self) -> bool:
        """Whether every pixel is inspected (``auto`` that found no background): stretched over a photo of any
        shape it is still every pixel, with no edge to move."""
        return bool(self.pixels.all())

    @property
    def inspected(self) -> float:
        """Share of the frame that is inspected."""
        return float(self.pixels.mean())

    def at(self, shape: Sequence[int]) -> np.ndarray:
        """Inspected pixels of an image (or a patch grid) of ``shape`` ``(h, w, ...)``: the mask stretched over it.

        Each target pixel is inspected when at least half of the mask area it covers is (the nearest mask pixel
        when enlarging); a target so coarse that no pixel qualifies takes every one the mask touches, so an
        image is never left with nothing inspected. Cached per shape (read-only arrays)."""
        key = (int(shape[0]), int(shape[1]))
        out = self._cache.get(key)
        if out is None:
            out = _stretch(self.pixels, key)
            out.flags.writeable = False
            if len(self._cache) < 64:  # a line sees few sizes; bound the cache anyway
                self._cache[key] = out
        return out

    # ------------------------------------------------------------------ storage
    def stretch_warning(self, height: int, width: int, work: tuple[int, int], cell: int,
                        learnt: Iterable[tuple[int, int]] = ()) -> str | None:
        """Why a photo's score may not mean what the threshold says when it is of another shape than the frame the
        mask was drawn for (None otherwise): the mask is stretched over it (:meth:`at`), so its edges no longer lie
        on the part where they were drawn. ``work``: the photo's size as the network sees it, ``cell``: a feature
        cell there; a shift of less than a cell moves no patch in or out of the inspected area. ``learnt``: the
        ``(h, w)`` of the good photos the model learnt; a fit on photos of several shapes stretched the mask over
        each of them (it warned then), so a photo of one of their shapes is scored as they were, which its threshold
        was read from, and says nothing: it said to send the training photos' shape, which it was. A mask of every
        pixel says nothing either: it has no edge to move."""
        frame_w, frame_h = self.size
        if width * frame_h == height * frame_w or self.everything:
            return None
        shift, pixels = _stretch_shift(frame_w, frame_h, height, width, work)
        if shift <= cell or any(_stretch_shift(w, h, height, width, work)[0] <= cell for h, w in learnt):
            return None
        return (f"this photo is {width}x{height} px, another shape than the {frame_w}x{frame_h} frame the model's "
                f"inspection mask was drawn for: the mask is stretched over it, so its edges move by up to "
                f"{pixels:.0f} px off where they were drawn on the part (inspected areas may go unseen, ignored ones "
                "count). Send photos of the training photos' shape, or re-fit with a mask drawn for this one")

    def to_png(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    def describe(self) -> dict[str, Any]:
        """The manifest's ``mask`` section."""
        width, height = self.size
        return {"file": MASK_FILE, "width": width, "height": height, "source": self.source,
                "inspected": round(self.inspected, 6), **self.details}

    @classmethod
    def from_model(cls, section: Any, files: dict[str, bytes], admitted: int | None = None) -> "InspectionMask":
        """The mask a saved model lists in its manifest's ``mask`` section, checked against it; ``admitted``: the
        pixels of the photos the model is loaded to read (past Pillow's own limit, a mask within it is read)."""
        if section.file not in files:
            raise ModelFormatError(f"the manifest lists an inspection mask but {section.file} is missing")
        try:
            pixels = _png_pixels(files[section.file], admitted=admitted)
        except ConfigError as exc:
            raise ModelFormatError(f"{section.file}: {exc}") from None
        if pixels.shape != (section.height, section.width):
            raise ModelFormatError(f"{section.file} is {pixels.shape[1]}x{pixels.shape[0]}, the manifest says "
                                   f"{section.width}x{section.height}")
        details = {k: v for k, v in section.model_dump().items()
                   if k not in ("file", "width", "height", "source", "inspected")}
        try:
            return cls(pixels, section.source, details)
        except ConfigError as exc:
            raise ModelFormatError(f"{section.file}: {exc}") from None


def _stretch_shift(frame_w: int, frame_h: int, height: int, width: int, work: tuple[int, int]) -> tuple[float, float]:
    """How far stretching a ``frame_w`` x ``frame_h`` frame over a photo moves its far edge: in the network's pixels
    (``work``: the photo's size as it sees it) and in the photo's. The frame kept to its shape and fitted to the
    photo's height (or width); the better of the two fits is the one the photo may have meant."""
    by_height = abs(1 - frame_w * height / (frame_h * width)) * work[1]
    by_width = abs(1 - frame_h * width / (frame_w * height)) * work[0]
    shift = min(by_height, by_width)
    return shift, shift * (width / work[1] if by_height <= by_width else height / work[0])


def _stretch(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to ``size`` ``(h, w)``: area share >= 1/2 (see :meth:`InspectionMask.at`)."""
    if pixels.shape == size:
        return pixels.copy()
    h, w = size
    share = np.asarray(Image.fromarray(pixels.astype(np.float32)).resize((w, h), Image.BOX))
    out = share >= 0.5 - 1e-6
    if not out.any():
        out = share > 0
    return out


# ---------------------------------------------------------------------------------------------- applying it
def score_inside(patch_grid: np.ndarray, amap: np.ndarray, mode: str, mask: InspectionMask | None
                 ) -> tuple[float, np.ndarray]:
    """A scorer's raw (image score, map) with the mask applied after smoothing: the map is NaN (not inspected)
    outside, and the image score reads inspected pixels only (``max``: the patches of the inspected cells of the
    ``(h, w)`` grid). Without a mask: :func:`~anomaly_service.scoring.image_score` unchanged."""
    if mask is None:
        return image_score(patch_grid.ravel(), amap, mode), amap
    inside = mask.at(amap.shape)
    if not amap.flags.writeable:
        amap = amap.copy()
    amap[~inside] = np.nan
    return image_score(patch_grid[mask.at(patch_grid.shape)], amap[inside], mode), amap


def inspected_values(values: np.ndarray) -> np.ndarray:
    """The values of inspected pixels (drops the NaN a masked scorer puts outside the mask)."""
    return values[~np.isnan(values)]


def fill_uninspected(amap: np.ndarray, ceiling: float, kind: str) -> np.ndarray:
    """The map with its uninspected (NaN) pixels set to the median of its inspected ones (sampled as ``kind``
    says: map_sample.py), at most ``ceiling`` (a value below the threshold); the map itself when it has none."""
    nan = np.isnan(amap)
    if not nan.any():
        return amap
    sample = inspected_values(map_sample.sample(amap, kind))
    typical = float(np.median(sample if sample.size else amap[~nan]))
    return np.where(nan, np.float32(min(typical, ceiling)), amap)


# ---------------------------------------------------------------------------------------------- reading it
def _png_pixels(data: bytes, name: str = "mask", max_pixels: int | None = None,
                admitted: int | None = None) -> np.ndarray:
    """Inspected pixels of a mask image: nonzero gray value (and not transparent: by an alpha channel, a palette's
    transparent index, or the one grey or colour a PNG's transparency key names, which an editor shows as erased,
    and which read as drawn inspected it). Turned by
    its EXIF orientation as the training photos are (images.py): a mask drawn in an editor that keeps a camera
    photo's orientation tag holds its pixels as stored, and read as stored it lay turned on the part. One of more
    than ``max_pixels`` (the frame's) is refused from its header, before it is decoded. A mask the size of a photo
    past Pillow's own pixel limit (a line camera's) is read as that photo is: within ``max_pixels``, or without it
    within ``admitted`` (a saved model's, against the photos it is loaded to read). Pillow refused it as a
    decompression bomb, and the fit with it."""
    try:
        with _opened(data, max_pixels, admitted) as opened:
            _within(opened.width, opened.height, max_pixels, name)
            decodable_admitted(opened)
            opened.load()
            img = ImageOps.exif_transpose(opened)
            gray = np.asarray(img.convert("L")) > 0
            hidden = transparent(img, data)
            if hidden is not None:
                gray &= ~hidden
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow names the in-memory stream it was given (<_io.BytesIO object at 0x...>), not the file
        why = "cannot identify image file" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ConfigError(f"{name} is not a readable image ({why})") from None
    return gray


def _opened(data: bytes, max_pixels: int | None, admitted: int | None) -> Image.Image:
    """The mask image opened, not decoded: held to ``max_pixels`` from its header by the caller (:func:`_within`),
    or to ``admitted`` here past Pillow's own limit, or else to Pillow's."""
    if max_pixels is not None:
        return opened_admitted(data)
    if admitted is not None:
        return opened_within(data, admitted)
    return Image.open(io.BytesIO(data))


def _finite_number(v: Any) -> bool:
    """A JSON number a float can hold, finite: JSON's integers have any length, and one past a float's range made
    ``math.isfinite`` raise OverflowError, a traceback where a polygon file deserves a sentence."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _points(poly: Any, where: str, size: tuple[int, int]) -> list[tuple[float, float]]:
    if not isinstance(poly, list) or len(poly) < 3:
        raise ConfigError(f"{where} must be a list of at least 3 [x, y] points")
    out = []
    for p in poly:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(_finite_number(v) for v in p)):
            raise ConfigError(f"{where} has a point that is not [x, y] in pixels: {p!r}")
        out.append((float(p[0]), float(p[1])))
    w, h = size
    if all(x < 0 or x > w or y < 0 or y > h for x, y in out):
        log.warning("%s lies entirely outside the %dx%d frame", where, w, h)
    return out


class _LargerThanImages(ConfigError):
    """A mask of more pixels than the training images, refused from its header or its polygons' frame; carries its
    size, so that a fit names it beside the images' as it does a smaller mask's."""

    def __init__(self, message: str, size: tuple[int, int]) -> None:
        super().__init__(message)
        self.size = size


def _within(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """Refuse a mask of more than ``max_pixels`` (the training images') before its pixels are allocated: a polygon
    file of a few bytes that said a width and height of a million each asked for a terabyte."""
    if max_pixels is not None and width * height > max_pixels:
        raise _LargerThanImages(f"{name} is {width}x{height} pixels, more than the training images' {max_pixels} "
                                "pixels: draw the mask on a training image", (width, height))


def rasterise_polygons(spec: Any, name: str = "polygons", max_pixels: int | None = None) -> np.ndarray:
    """Polygons JSON -> inspected pixels. ``{"width": W, "height": H, "inspect": [polygon, ...],
    "ignore": [polygon, ...]}``, a polygon being ``[[x, y], ...]`` in pixels of the training images; without
    ``inspect`` the whole frame is inspected, and ``ignore`` is cut out of it."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{name} must be a JSON object with width, height and inspect and/or ignore polygons")
    unknown = sorted(set(spec) - {"width", "height", "inspect", "ignore"})
    if unknown:
        raise ConfigError(f"{name} has unknown keys {', '.join(unknown)}; expected width, height, inspect, ignore")
    w, h = spec.get("width"), spec.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise ConfigError(f"{name} needs width and height: the training images' size in pixels")
    inspect, ignore = spec.get("inspect"), spec.get("ignore", [])
    if inspect is None and not ignore:
        raise ConfigError(f"{name} has no polygons: give inspect and/or ignore")
    for key, value in (("inspect", inspect), ("ignore", ignore)):
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{name}: {key} must be a list of polygons")
    _within(w, h, max_pixels, name)
    img = Image.new("L", (w, h), 0 if inspect is not None else 255)
    draw = ImageDraw.Draw(img)
    for fill, key in ((255, "inspect"), (0, "ignore")):
        for i, poly in enumerate(spec.get(key) or []):
            draw.polygon(_points(poly, f"{name}: {key}[{i}]", (w, h)), fill=fill, outline=fill)
    return np.asarray(img) > 0


# a polygons file of this size holds millions of points already, far beyond any drawn by hand or by a tool; parsed,
# each point takes many times its bytes
MAX_POLYGON_BYTES = 16 << 20


def read_mask(path: str | Path, max_pixels: int | None = None) -> InspectionMask:
    """A mask file: ``.json`` polygons (:func:`rasterise_polygons`), otherwise a mask image; one of more than
    ``max_pixels`` is refused before its pixels are allocated."""
    path = Path(path)
    polygons = path.suffix.lower() == ".json"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_POLYGON_BYTES + 1) if polygons else fh.read()
    except OSError as exc:
        raise ConfigError(f"mask {path}: {exc.strerror or exc}") from None
    if polygons:
        if len(data) > MAX_POLYGON_BYTES:
            raise ConfigError(f"mask {path} is larger than {MAX_POLYGON_BYTES >> 20} MB, far beyond any polygons "
                              "drawn on a part: simplify them, or give the mask as a PNG")
        try:
            spec = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"mask {path} is not valid JSON ({exc})") from None
        except RecursionError:  # its traceback was all a fit said
            raise ConfigError(f"mask {path} is nested too deeply to be polygons") from None
        return InspectionMask(rasterise_polygons(spec, f"mask {path}", max_pixels), "polygons", {"from": path.name})
    return InspectionMask(_png_pixels(data, f"mask {path}", max_pixels), "png", {"from": path.name})


def _frame_shapes(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """``(h, w)`` of each image; a lazily read set (training_set.py) answers from its headers, decoding none."""
    shapes = getattr(images, "shapes", None) or [a.shape for a in images]
    return [(int(s[0]), int(s[1])) for s in shapes]


def frame_shape(images: Sequence[np.ndarray]) -> tuple[int, int]:
    """``(h, w)`` of the training images (the most common one when their sizes differ)."""
    return _most_common(_frame_shapes(images))


def _most_common(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    return Counter(shapes).most_common(1)[0][0]


def mask_for_fit(spec: str | None, images: Sequence[np.ndarray], embedder: Embedder) -> InspectionMask | None:
    """The mask of a fit on ``images``: None, or read from the file ``spec`` and checked against the images' size.
    ``auto`` is the fit's to find (foreground.py), which reads this module: asking it here made the two import
    each other."""
    if spec is None:
        return None
    if spec == AUTO:
        raise ValueError("mask_for_fit reads a mask file; the fit finds --mask auto's foreground itself")
    shapes = _frame_shapes(images)
    h, w = _most_common(shapes)  # frame_shape's, from the shapes read once
    mixed = len(set(shapes)) > 1

    def other_size(size: tuple[int, int]) -> ConfigError:
        return ConfigError(f"mask {spec} is {size[0]}x{size[1]} pixels but the training images "
                           + ("differ in size and the most common is " if mixed else "are ")
                           + f"{w}x{h} (width x height); draw the mask on a training image")

    try:
        mask = read_mask(spec, max_pixels=max(fh * fw for fh, fw in shapes))
    except _LargerThanImages as exc:  # a pixel count alone names no size to draw the mask at
        raise other_size(exc.size) from None
    if mask.size != (w, h):
        raise other_size(mask.size)
    if mixed:
        log.warning("training images differ in size: the mask is stretched over each image")
    # one feature cell (the stride, at the working size) in the frame's pixels: less cannot be scored, and a
    # fit on it ended in a manifest that did not validate. Tiled, at the tiles' zoom: their cells are finer
    pre = embedder.preprocessing
    tiles = embedder.layout((h, w))
    work_h, work_w = tiles.work_size if tiles is not None else pre.working_size(h, w)
    cell = pre.cell * (h / work_h) * pre.cell * (w / work_w)
    inspected = int(mask.pixels.sum())
    if inspected < cell:
        raise ConfigError(f"mask {spec} inspects {inspected} pixels, less than one feature cell (about "
                          f"{cell:.0f} pixels of these images): draw a larger inspected area")
    return mask
