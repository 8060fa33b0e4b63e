"""A score as every surface shows it: the decision word, the regions above the threshold and the heatmap pictures.

The HTTP answers, ``anomaly score`` (its JSON lines and its ``--heatmap-dir`` files) and the evaluation report all
render a :class:`ScoreResult` here, so one result shows the same regions and the same pictures wherever it is
seen. Pure functions of the result and the decoded image: no files, no HTTP.

Everything is drawn from ``result.normalized_map()``: the decision's map on its calibrated scale, 1.0 = the
threshold, on one global color scale for all images (with a second opinion fused its peak can be below the score:
docs/service.md#heatmaps). Given the model's evidence (evidence.py), each region also
carries the closest good region seen in training, and the verdict the part's place on the image map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

from .decision import decision_word
from .evidence import MapPoint, TrainingEvidence
from .anomaly_map import resize_map
from .heatmap import DISPLAY_MAX, colorize, heatmap_png, overlay, to_png
from .regions import Region, find_regions

if TYPE_CHECKING:
    from . import ScoreResult

HEATMAP_KINDS = ("png", "overlay", "array")
ARRAY_MAX_SIDE = 128  # longer side of an ``array`` heatmap unless the caller says otherwise
# what a caller may ask a picture's longer side to be (max_side): smaller is no picture to read, and larger than any
# photo the limits admit (a side past it is the photo's own)
MIN_PICTURE_SIDE, MAX_PICTURE_SIDE = 16, 65535
COLOR_SCALE = (f"turbo color map, normalized score 0 to {DISPLAY_MAX} (1.0 = threshold, two thirds up the "
               "scale)")
ARRAY_SCALE = "normalized score per cell (1.0 = threshold); cells cover the image evenly"


@dataclass(frozen=True)
class Heatmap:
    """One rendering of the normalized map, ready to send or write."""

    kind: str  # png (color map) | overlay (color map blended over the image) | array (float16 cells)
    media_type: str
    width: int  # of the image the map covers
    height: int
    scale: str  # what the colors or values mean
    data: bytes  # the PNG file, or the raw little-endian float16 cells, row-major
    # array: (rows, columns) of the cells; png and overlay: the picture's own (rows, columns) where ``max_side`` drew
    # it smaller than the image (None: the image's size)
    shape: tuple[int, int] | None = None
    dtype: str | None = None  # array only
    byte_order: str | None = None  # array only


@dataclass(frozen=True)
class Verdict:
    """What a person or a client is shown for one scored image."""

    decision: str  # "anomaly" or "normal": the model's decision (the API's X-Anomaly-Decision)
    regions: list[Region]  # connected regions at or above the threshold, highest peak first, with their evidence
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)  # the renderings asked for, by kind
    embedding: MapPoint | None = None  # the part's place on the model's image map (None: the model has none)

    @property
    def label(self) -> str:
        """The decision for a person's eyes (the web page, the CLI table, the report): ANOMALY or normal."""
        return self.decision.upper() if self.decision == "anomaly" else self.decision


def overlay_pixels(image: np.ndarray, normalized_map: np.ndarray) -> np.ndarray:
    """The heatmap overlay: the color map blended over the ``(H, W, 3)`` image, as ``(H, W, 3)`` uint8."""
    return overlay(image, colorize(normalized_map))


def overlay_png(image: np.ndarray, normalized_map: np.ndarray, max_side: int | None = None) -> bytes:
    """:func:`overlay_pixels` as a PNG file: the API's overlay and the CLI's ``*_overlay.png``; with ``max_side``,
    drawn at most that many pixels a side (:func:`picture_size`)."""
    size = picture_size(normalized_map.shape, max_side)
    return to_png(overlay_pixels(shrink_photo(image, size), shrink_map(normalized_map, size)))


def picture_size(shape: tuple[int, ...], max_side: int | None) -> tuple[int, int]:
    """The ``(rows, columns)`` a picture of an image of ``shape`` is drawn at: the image's own, or scaled down (never
    up) so its longer side is ``max_side``. A screen shows a line camera's 20 MP photo a few hundred pixels wide;
    drawn and encoded at full size its overlay took seconds and tens of megabytes for pixels no one sees."""
    h, w = int(shape[0]), int(shape[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def shrink_map(normalized_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map at ``size``, each pixel the average of those it covers (antialiased): a small hot spot keeps its
    place and its share of heat instead of falling between the pixels a plain resize samples. Pixels outside an
    inspection mask (NaN) are left out of each average (averaged in, they spread a column into the inspected part);
    a pixel that covers none but them stays NaN."""
    if normalized_map.shape == tuple(size):
        return normalized_map
    outside = np.isnan(normalized_map)
    if not outside.any():
        return resize_map(normalized_map, size, antialias=True)
    inside = resize_map((~outside).astype(np.float32), size, antialias=True)
    heat = resize_map(np.where(outside, np.float32(0.0), normalized_map), size, antialias=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inside > 1e-6, heat / inside, np.float32(np.nan)).astype(np.float32)


def shrink_photo(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ``(H, W, 3)`` photo at ``size`` (Pillow's antialiased bilinear filter, reduced by whole steps first)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR,
                                                    reducing_gap=2.0))


def heatmap_cells(normalized_map: np.ndarray, max_side: int = ARRAY_MAX_SIDE) -> np.ndarray:
    """The normalized map downscaled so its longer side is at most ``max_side`` cells (never upscaled)."""
    return resize_map(normalized_map, picture_size(normalized_map.shape, max_side))


def render_heatmap(kind: str, normalized_map: np.ndarray, image: np.ndarray | None = None,
                   array_max_side: int = ARRAY_MAX_SIDE, max_side: int | None = None) -> Heatmap:
    """One heatmap rendering; ``overlay`` needs the image the map was scored from. ``max_side``: ``png`` and
    ``overlay`` are drawn at most that many pixels a side (their ``shape`` then says their own size)."""
    h, w = normalized_map.shape
    size = picture_size((h, w), max_side)
    drawn = None if size == (h, w) else size
    if kind == "png":
        return Heatmap("png", "image/png", w, h, COLOR_SCALE, heatmap_png(shrink_map(normalized_map, size)),
                       shape=drawn)
    if kind == "overlay":
        if image is None:
            raise ValueError("an overlay heatmap needs the image")
        return Heatmap("overlay", "image/png", w, h, COLOR_SCALE, overlay_png(image, normalized_map, max_side),
                       shape=drawn)
    if kind == "array":
        cells = heatmap_cells(normalized_map, array_max_side)
        return Heatmap("array", "application/octet-stream", w, h, ARRAY_SCALE, cells.astype("<f2").tobytes(),
                       shape=(int(cells.shape[0]), int(cells.shape[1])), dtype="float16", byte_order="little")
    raise ValueError(f"unknown heatmap kind {kind!r}; choose one of {', '.join(HEATMAP_KINDS)}")


def render(result: ScoreResult, image: np.ndarray | None = None, heatmaps: Iterable[str] = (),
           array_max_side: int = ARRAY_MAX_SIDE, evidence: TrainingEvidence | None = None,
           max_side: int | None = None) -> Verdict:
    """The verdict of one result, with the heatmap renderings named in ``heatmaps`` (none by default), and with
    ``evidence`` (``TrainingEvidence.of(model)``) each region's closest good region and the part's map place.
    ``max_side``: the pictures (``png``, ``overlay``) drawn at most that many pixels a side; the regions stay in the
    image's pixels."""
    norm = result.normalized_map()  # computed once: regions and every rendering share it
    regions = find_regions(norm)
    if evidence is not None:
        regions = evidence.annotate(result, regions)
    return Verdict(decision=decision_word(result.is_anomaly), regions=regions,
                   heatmaps={kind: render_heatmap(kind, norm, image, array_max_side, max_side) for kind in heatmaps},
                   embedding=evidence.position(result) if evidence is not None else None)
