"""Image -> normalized tensor at the network's working resolution, keeping the whole frame.

There is deliberately no centre crop: a defect at the border must reach the model. The aspect ratio is kept and
each side is rounded to a multiple of the backbone's stride so the two feature grids align exactly.

Two resize policies. ``longer-side`` maps every image's longer side to ``image_size``. ``fixed-scale`` (set by
fitting) applies one scale factor to every image, ``image_size / reference_side`` with ``reference_side`` the
median longer side of the training images: a fixed camera sees parts at one physical scale, and CNN patch
features are not scale-invariant, so crops of varying size must not be zoomed by varying amounts. For
uniformly sized images the two policies are identical. A working side is capped at ``2 * image_size``.
``squash`` resizes every image to ``image_size`` square whatever its aspect, as anomalib and most PatchCore setups
do: on a tall or wide part the patches then see more of the part along its long side, at a distorted aspect
(docs/decisions.md has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .row_blocks import row_blocks
from .images import is_blank, is_grey

if TYPE_CHECKING:
    import torch

CHANNELS = ("grey", "colour")  # what a photo is; a set of good photos may be "both"


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # target length of the longer side, in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    reference_side: float | None = None  # set for the fixed-scale policy
    squash: bool = False  # the squash policy: every image to image_size square
    sides: tuple[float, float] | None = None  # the training photos' longer sides, least and most (scale_warning)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the network sees for an image of the given size."""
        if self.squash:
            side = max(self.stride * 2, int(round(self.image_size / self.stride)) * self.stride)
            return side, side
        longer = max(height, width)
        scale = self.image_size / (self.reference_side or longer)
        scale = min(scale, 2 * self.image_size / longer)

        def snap(side: int) -> int:
            return max(self.stride * 2, int(round(side * scale / self.stride)) * self.stride)
        return snap(height), snap(width)

    @property
    def cell(self) -> int:
        """The patch grid's cell in working pixels: the finer of the two layers' strides."""
        return self.stride // 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid of an image of the given size (its working sides are multiples of the
        stride, so the cells tile them exactly)."""
        work_h, work_w = self.working_size(height, width)
        return work_h // self.cell, work_w // self.cell

    def to_tensor(self, image: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` float32, resized with antialiasing and normalized."""
        import torch  # here, not with the module: the manifest reads this module, and a command that only reads
        import torch.nn.functional as F  # a manifest (or none) need not pay torch's import

        h, w = size or self.working_size(image.shape[0], image.shape[1])
        # made float on 0-1 by NumPy, a block of rows at a time (one pass through a line camera's photo, not two):
        # it reads any view (a turned or sliced array) and a read-only decoded photo, over which torch warns of a
        # tensor it may not write. Each of the 256 values is what torch's float().div_(255.0) gives it (tested).
        pixels = np.asarray(image, dtype=np.uint8)
        floats = np.empty(pixels.shape, np.float32)
        for rows in row_blocks(pixels.shape):
            np.divide(pixels[rows], np.float32(255.0), out=floats[rows], dtype=np.float32)
        x = torch.from_numpy(floats).permute(2, 0, 1).unsqueeze(0)
        height, width = x.shape[-2:]
        if h != height and w != width and (h < height) != (w < width):
            # one side shrinks and the other grows: torch resizes the width first, at the full height, so a strip
            # widened to the stride's minimum held a copy several times the photo's size (docs/decisions.md).
            # Shrinking first keeps every step within the photo's size; the same operator.
            first = (h, width) if h < height else (height, w)
            x = F.interpolate(x, size=first, mode="bilinear", align_corners=False, antialias=True)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).squeeze(0)

    def to_dict(self) -> dict:
        policy = "squash" if self.squash else "fixed-scale" if self.reference_side else "longer-side"
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "stride": self.stride,
                "reference_side": self.reference_side, "resize": policy, "crop": "none",
                **({"sides": list(self.sides)} if self.sides else {}),
                "interpolation": "bilinear, antialiased; " + ("aspect not kept" if self.squash else "aspect kept")
                + "; sides rounded to the stride"}


# How far past the training photos' longer sides a photo may be before scoring warns. A fixed-scale or tiled model
# sees every photo at the training photos' zoom, so a photo taken at another resolution shows the part larger or
# smaller than any good part it learnt, and every patch looks new (docs/benchmarks.md, "A photo at another
# resolution"); within this margin the scores hold.
SCALE_TOLERANCE = 1.25


def scale_warning(pp: Preprocessing, tile: int | None, height: int, width: int, turned: bool = False) -> str | None:
    """Why this photo's score may not mean what the threshold says, when its size is far from the training photos'
    under a policy that keeps their zoom (fixed-scale, tiles of ``tile`` source pixels); None otherwise. Models saved
    before the sides were kept compare with their reference side alone. The way out it names is one the fit takes:
    a tiled model or one of ``turned`` parts (orientation any) refuses ``--resize longer-side``, so theirs is a re-fit
    (tiled: with the tile scaled as the photos are, so a tile still covers as much of the part)."""
    if pp.squash or not (tile is not None or pp.reference_side):
        return None  # longer-side and squash bring every photo to the working size: its resolution is not a scale
    bounds = pp.sides or ((pp.reference_side, pp.reference_side) if pp.reference_side else None)
    if bounds is None:  # a tiled model saved before the sides were kept, with no reference side either
        return None
    lo, hi = bounds
    longer = max(height, width)
    if lo / SCALE_TOLERANCE <= longer <= hi * SCALE_TOLERANCE:
        return None
    size = f"{lo:g} px" if lo == hi else f"{lo:g}-{hi:g} px"
    ratio = longer / hi if longer > hi else lo / longer
    if tile is not None:
        scaled = max(16, round(tile * longer / (hi if longer > hi else lo)))
        way = (f"re-fit on photos from it with --tile about {scaled} (this model's --tile {tile} at their "
               "resolution: a tile then covers as much of the part as before)")
    elif turned:
        way = "re-fit on photos from it (--orientation any keeps one zoom for every photo)"
    else:
        way = "re-fit on photos from it (or fit with --resize longer-side, which brings every photo to one size)"
    return (f"this photo is {longer} px on its longer side and the model's training photos {size}: it sees every "
            f"photo at their zoom, so the part looks {ratio:.1f}x {'larger' if longer > hi else 'smaller'} than any "
            f"good part it learnt and may be flagged whole. If the camera or its resolution changed, {way}")


def photo_channels(image: np.ndarray) -> str:
    """``grey`` or ``colour``: what a decoded photo is (:func:`~anomaly_service.images.is_grey`)."""
    return "grey" if is_grey(image) else "colour"


def channels_of(kinds: set[str]) -> str | None:
    """What the good photos were, from each one's :func:`photo_channels`, for the manifest's
    ``preprocessing.channels``: ``grey``, ``colour``, or ``both`` (a set that mixes a mono camera's photos and a
    colour camera's); None for no photo."""
    return None if not kinds else next(iter(kinds)) if len(kinds) == 1 else "both"


def joined_channels(before: str | None, added: str | None) -> str | None:
    """The good photos' channels once an update adds photos of ``added`` channels to a model of ``before``."""
    if before is None or added is None:  # a model saved before it was kept: still unknown
        return before
    return before if added == before else "both"


# how the warnings of a photo unlike the good ones in its pixels begin: a record keeps what scoring said, which tells
# the parts an update would leave out (AnomalyModel.recorded_unlike) without reading their photos again
BLANK_SAID = "this photo is one level throughout"
GREY_SAID = "this photo is grey (its three channels are one picture) and the model's good photos were in colour"
COLOUR_SAID = "this photo is in colour and the model's good photos were grey"
SWAPPED_SAID = "this photo's red and blue look swapped against the model's good photos"
PIXELS_SAID = (BLANK_SAID, GREY_SAID, COLOUR_SAID, SWAPPED_SAID)


def blank_warning(image: np.ndarray, flattest: float | None = None) -> str | None:
    """Why this photo's score may not mean what the threshold says, when it is one level throughout
    (:func:`~anomaly_service.images.is_blank`); None otherwise. Such a frame was told grey, and a colour model's
    operators were sent to the colour camera or to a re-fit on grey photos, when the lamp, the lens or the trigger
    was what failed. ``flattest``: the model's flattest good photo (the manifest's ``preprocessing.flattest``),
    which lets a dark frame with its sensor's noise be told too."""
    if not is_blank(image, flattest):
        return None
    level = int(round(float(np.median(image[::max(1, image.shape[0] // 64), ::max(1, image.shape[1] // 64)]))))
    return (f"{BLANK_SAID} ({level} of 255): it shows no part, as a lamp that is off, a covered "
            "lens or a trigger before the part came give, so the part may be flagged whole. Check the camera and "
            "its light")


def channels_warning(channels: str | None, image: np.ndarray) -> str | None:
    """Why this photo's score may not mean what the threshold says, when it is grey and the model's good photos
    were all in colour, or the reverse; None otherwise (and for models saved before their photos' channels were
    kept). Not asked of a blank frame, whose channels tell nothing (:func:`blank_warning` says what it is). The
    network reads colour: a grey photo of a part it learnt in colour is a picture it never saw."""
    if channels not in CHANNELS:
        return None
    grey = is_grey(image)
    if grey and channels == "colour":
        return (f"{GREY_SAID}: "
                "it reads every part of it as unlike what it learnt, so the part may be flagged whole, and a defect "
                "seen by its colour can pass. Send the colour camera's photos, or re-fit on grey ones")
    if not grey and channels == "grey":
        return (f"{COLOUR_SAID}: it reads colours it never learnt, "
                "so the part may be flagged whole. If the camera changed, re-fit on its photos (or send grey ones)")
    return None


# red-blue statistics: a set whose every photo leans one way by this many standard deviations of the set, and by at
# least SWAP_MIN_LEAN grey levels, has a colour a reversed photo cannot pass for
SWAP_MIN_IMAGES = 5
SWAP_MIN_LEAN = 10.0
SWAP_SIGMAS = 4.0


def red_blue(image: np.ndarray) -> float:
    """How far a colour photo's red channel lies above its blue one, on average (0-255 levels; every fourth row and
    column, which tells a lean as well as every pixel)."""
    sample = image[::4, ::4]
    return float(sample[..., 0].mean(dtype=np.float64) - sample[..., 2].mean(dtype=np.float64))


def red_blue_of(leans: list[float], channels: str | None) -> tuple[float, float] | None:
    """The good colour photos' :func:`red_blue` as ``(mean, standard deviation)``, for the manifest's
    ``preprocessing.red_blue``; None unless every good photo was in colour and there are enough of them."""
    if channels != "colour" or len(leans) < SWAP_MIN_IMAGES:
        return None
    return float(np.mean(leans)), float(np.std(leans))


def swap_warning(stats: tuple[float, float] | None, image: np.ndarray) -> str | None:
    """Why this photo's score may not mean what the threshold says, when its red and blue look swapped against
    the good photos' (OpenCV gives frames as BGR, and one passed on as RGB, or saved so, reads a warm part as a
    cold one: every patch unlike what the model learnt); None otherwise, for a grey photo, and where the good
    photos lean too little or too variously to tell (``stats`` None: fewer than five, or saved before it was
    kept)."""
    if stats is None or is_grey(image):
        return None
    mean, spread = stats
    if abs(mean) < max(SWAP_MIN_LEAN, SWAP_SIGMAS * spread):
        return None
    lean = red_blue(image)
    if abs(lean + mean) > max(SWAP_SIGMAS * spread, abs(mean) / 2):
        # not near the mirror of the good photos' lean: a photo nearer the lean itself is never near it (the lean
        # is at least SWAP_SIGMAS spreads from grey, above)
        return None
    return (f"{SWAPPED_SAID} (OpenCV reads and captures "
            "frames as BGR): it reads every part of it as unlike what it learnt, so the part may be flagged whole. "
            "Send RGB (reverse an OpenCV frame's channels: frame[..., ::-1]) or re-fit on photos sent as these are")
