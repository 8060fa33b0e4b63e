"""Decoding images from disk or bytes into plain RGB arrays, safely.

Everything downstream sees ``uint8`` arrays of shape ``(H, W, 3)`` in the orientation a person sees the photo
(EXIF rotation applied). Odd modes (16-bit, float, CMYK, palette, alpha) are converted here so that no other
module has to care, and size limits are checked from the header *before* pixels are decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, TiffImagePlugin, UnidentifiedImageError

from . import float_tiff
from .colour_profile import as_srgb, torn_profile
from .compression import JPEG_FORMATS, UNCOMPRESSED, compression_warning, jpeg_quality
from .errors import ImageLoadError

# the file names a folder listing takes as images: those of every accepted format (ImageLimits.formats; PPM is
# Pillow's name for the whole Netpbm family)
IMAGE_EXTENSIONS = frozenset({".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".bmp", ".dib", ".tif",
                              ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm"})

ImageInput = Union[str, Path, bytes, np.ndarray, Image.Image]


@dataclass(frozen=True)
class ImageLimits:
    """Limits that protect a service from decompression bombs and oversized uploads."""

    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding
    max_bytes: int = 50 * 1024 * 1024
    min_side: int = 8
    # Formats decoded, as Pillow names them after sniffing the bytes (never the file name). Pillow can open many
    # more (PSD, EPS, ICO, ...); a service has no reason to expose their decoders to uploads.
    formats: frozenset[str] | None = frozenset({"PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM"})
    # how many of a 16-bit grey image's bits carry the picture: a mono camera's 10-, 12- or 14-bit pixels, stored in
    # a 16-bit file, fill only the low part of its range, and read against 16 bits they decode to a few dark grey
    # levels. A model records its own (bit_depth.py); None: all 16
    bit_depth: int | None = None
    # the same for a 16-bit colour image's channels: a colour camera's fewer bits in a 16-bit PNG or TIFF. None:
    # each channel as Pillow reads it, its top byte, as models saved before colour depth was kept read them
    colour_bit_depth: int | None = None
    # the lowest JPEG quality of the model's good photos (compression.py; its best where none was a JPEG): a flagged
    # photo compressed harder is warned of. None: no warning (an array's compression is unknown, and older models
    # did not keep it)
    jpeg_quality: int | None = None
    # whether a depth of None says the model's good photos of that kind held no 16-bit photo (a model saved by a
    # release that keeps its photos' channels, which keeps their depths too), so that a 16-bit photo of a camera's
    # fewer bits, read against 16-bit white, is unlike every good photo and is warned of (:func:`depth_warning`);
    # False: a model saved before, whose None is only how it always read them, or no model yet
    depths_kept: bool = False
    # whether the pixels a transparency key names (one grey or colour: a PNG's tRNS chunk, :func:`keyed`) read as
    # transparent, black as every other transparent pixel reads, so that a picture scores the same saved with a
    # palette, an alpha channel or a key. False: as the key's colour, as models saved before the model kept how it
    # reads them (manifest: preprocessing.transparency_key) were fitted on them
    transparency_keys: bool = True
    # whether an 8-bit colour photo that carries an ICC profile is read as sRGB (colour_profile.py), so that the same
    # colours score the same whatever space they were saved in. False: its values as stored, as models saved before
    # the model kept how it reads them (manifest: preprocessing.colour_profile) were fitted on them
    colour_profiles: bool = True

    @property
    def white(self) -> float:
        """The 16-bit value that decodes to white in a grey image."""
        return float(2 ** (self.bit_depth or 16) - 1)

    @property
    def colour_white(self) -> float:
        """The 16-bit value that decodes to full intensity in a colour image's channel."""
        return float(2 ** (self.colour_bit_depth or 16) - 1)


DEFAULT_LIMITS = ImageLimits()
# no limit of ours: for a file held to them already, or a header only (opened_admitted)
_ANY_SIZE = ImageLimits(max_pixels=2**62, max_bytes=2**62, min_side=0, formats=None)

# What Pillow's readers (and float_tiff's) raise for a file whose bytes do not hold together, besides the OSError and
# ValueError of a truncated one: a tag of the wrong type (a TIFF's strip offsets stored as a float or a fraction) is
# a TypeError, a compression no table names a KeyError, a GIF cut inside a frame's header an IndexError, a value too
# wide for its field a struct.error. Each is a broken upload, the client's to fix, not a fault of the service.
BROKEN_FILE_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, SyntaxError, ArithmeticError, TypeError, KeyError, IndexError, EOFError, struct.error,
    Image.DecompressionBombError)


ALPHA_MODES = ("RGBA", "LA", "PA")  # Pillow modes that carry transparency
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# What Pillow's tag reader says (a UserWarning) of each tag it skips in a broken EXIF block or TIFF header: data
# past the end of the block, a truncated directory, a MakerNote that does not parse. Decoding reads such a photo as
# if the tags it could not read were absent (its orientation too, as :func:`_orientation` does), so the complaint
# tells a person nothing to act on; an application silences it (the CLI does, for every command, the service too)
PILLOW_TAG_WARNINGS = (r"(possibly )?corrupt exif|tag data larger than file|tag offset too large|"
                       r"metadata warning")


def quiet_pillow_tag_warnings() -> None:
    """Stop Python printing Pillow's complaints about skipped tags (:data:`PILLOW_TAG_WARNINGS`) in this process.
    A process-wide filter, set once by an application at its start: decoding itself changes no filter, since one
    changed around each decode would leak between decoding threads."""
    import warnings

    warnings.filterwarnings("ignore", message=PILLOW_TAG_WARNINGS, category=UserWarning, module=r"PIL\.")


def sixteen_bit(img: Image.Image) -> bool:
    """Whether ``img`` holds 16-bit grey values: a 16-bit PNG or TIFF, or a PGM whose maximum is over 255 (Pillow
    opens it as 32-bit, already scaled from its maximum to 65535)."""
    return img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PPM")


# the sample depths line cameras store (GenICam's Mono8 ... Mono16); a set whose largest value needs 11 bits is a
# 12-bit camera's, however bright its photos were
DEPTHS = (8, 10, 12, 14, 16)
# how the depth warning begins: an update leaves out a photo so warned of (feedback.py)
DEPTH_WARNING_START = "this photo is 16-bit"


def fewest_bits(top: int) -> int:
    """The fewest of :data:`DEPTHS` that hold the value ``top``."""
    return next(d for d in DEPTHS if top < 2**d)


def depth_warning(kind: str, top: int, depth: int | None, limits: ImageLimits) -> str | None:
    """Why this 16-bit photo's score may not mean what the threshold says, from its values (up to ``top``) and the
    bits ``depth`` the model reads its ``kind`` photos with (bit_depth.py); None where they agree. Its values need
    more bits than the model's white holds (a camera now writing more of them, or at the top of the 16): every
    level above that white reads as white. Or the model learnt no 16-bit ``kind`` photo (``depth`` None, its good
    photos saved as 8-bit files, say by the camera's viewer) and reads this one against 16-bit white, though its
    values need fewer bits (a 10-, 12- or 14-bit camera's, or 8-bit values held in 16): every level some times
    darker than the camera gave it. Either is a part the model never saw, flagged whole. A model that did not keep
    its depths (``limits.depths_kept``) says nothing of the second: its None is only how it always read them."""
    bits = fewest_bits(top)
    if depth is not None:
        if bits <= depth:
            return None
        return (f"{DEPTH_WARNING_START} and its values need {bits} bits, more than the {depth} (white {2**depth - 1}) "
                f"the model read its good {kind} photos with: every value above that white reads as white, so the "
                "part may be flagged whole. If the camera now writes more bits (or puts them at the top of the 16), "
                "re-fit on its photos (a fit reads them against their camera's white: --bit-depth)")
    if not limits.depths_kept or bits >= 16:
        return None
    return (f"{DEPTH_WARNING_START} and its values need only {bits} bits (white {2**bits - 1}), and the model learnt "
            f"no 16-bit {kind} photo: it reads this one against 16-bit white (65535), {2 ** (16 - bits)}x darker "
            "than its camera gave it, so the part may be flagged whole. Send photos saved as the good ones were, or "
            "re-fit on this camera's 16-bit photos (a fit reads them against their camera's white: --bit-depth)")


# the raw modes Pillow reads a 16-bit colour PNG or TIFF with: into a byte a channel, each value's top byte
SIXTEEN_BIT_COLOUR_RAWMODES = frozenset({"RGB;16B", "RGB;16L", "RGB;16N", "RGBA;16B", "RGBA;16L", "RGBA;16N"})
# a raw mode's byte order (its last letter) against which its top byte is the value's other byte
_OTHER_BYTE = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def _rawmode(tile: tuple) -> str | None:
    """The raw mode a tile of a lazily opened image is decoded with (its args are the raw mode, or start with it)."""
    args = tile[3]
    first = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
    return first if isinstance(first, str) else None


def sixteen_bit_colour(img: Image.Image) -> bool:
    """Whether ``img``, opened and not yet decoded, is a colour image of 16 bits a channel (RGB or RGBA PNG or
    TIFF): Pillow holds it as 8 bits a channel, so only its tiles tell. An image made in memory (``fromarray``,
    ``convert``) is never such; current Pillow gives it no ``tile`` at all, which failed every fit given one."""
    tiles = getattr(img, "tile", None)
    return bool(tiles) and all(_rawmode(t) in SIXTEEN_BIT_COLOUR_RAWMODES for t in tiles)


def _low_bytes(data: bytes, frame: int) -> Image.Image:
    """The low byte of each channel of frame ``frame`` of the 16-bit colour image in ``data``. Pillow has no mode of
    16 bits a channel and decodes such a file to each value's top byte; decoded again with the raw mode of the other
    byte order (the same decoder and filters, the same bits a pixel), the top byte it takes is the low one."""
    low = opened_admitted(data)
    if frame:
        low.seek(frame)
    tiles = []
    for tile in low.tile:  # the frame decoding read, whose tiles are 16-bit colour (sixteen_bit_colour)
        raw = str(_rawmode(tile))
        other = raw[:-1] + _OTHER_BYTE[raw[-1]]
        args = other if isinstance(tile[3], str) else (other, *tile[3][1:])
        tiles.append(tile._replace(args=args))  # a named tuple in every Pillow the project takes
    low.tile = tiles
    _tiff_past_pillows_limit(low, _ANY_SIZE)
    low.load()
    return low


def _file_bytes(img: Image.Image, label: str, limits: ImageLimits) -> bytes | None:
    """The bytes of the file a lazily opened Pillow image reads from (None: it has none, or is decoded already)."""
    data = opened_file(img, limits.max_bytes + 1)
    if data is not None:
        _check_bytes(len(data), label, limits)
    return data


# pixels of a 16-bit colour photo scaled to 8 bits at once: its values in float64 take four times its 16-bit copy,
# and scaled whole, then clipped into a second such array, a large photo held several times the service's pixel
# budget allows (memory_room.PEAK_BYTES_PER_PIXEL); a block of rows this size costs a few megabytes
SCALED_ROWS_PIXELS = 1 << 18


def _to_rgb_array(img: Image.Image, limits: ImageLimits, deep: bool | None = None,
                  low: Image.Image | None = None, hidden: np.ndarray | None = None) -> np.ndarray:
    """Convert any PIL mode to uint8 RGB, scaling 16-bit data by ``limits.white`` (values above it are white).
    ``deep``: whether it is 16-bit (:func:`sixteen_bit`), told when ``img`` is a copy that lost its format.
    ``low``: the low bytes of a 16-bit colour image whose top bytes ``img`` holds (:func:`_low_bytes`), its values
    scaled by ``limits.colour_white``. ``hidden``: the pixels a transparency key names (:func:`transparent`),
    which read black (:func:`_keyed_on_black`)."""
    if hidden is not None:
        return _keyed_on_black(_to_rgb_array(img, limits, deep, low), hidden)
    mode = img.mode
    if low is not None:
        values = (np.asarray(img, dtype=np.uint16) << 8) | np.asarray(low, dtype=np.uint16)
        rgb = np.empty(values.shape[:2] + (3,), np.uint8)
        step = max(1, SCALED_ROWS_PIXELS // max(1, values.shape[1]))
        for top in range(0, values.shape[0], step):  # scaled in float64 a block of rows at a time: see the constant
            scaled = values[top:top + step, :, :3] * (255.0 / limits.colour_white)
            scaled += 0.5
            rgb[top:top + step] = np.clip(scaled, 0, 255, out=scaled)
        del values
        if mode != "RGBA":
            return rgb
        alpha = np.asarray(img, dtype=np.uint8)[:, :, 3:]  # its top byte, as Pillow reads it: enough for a blend
        return np.asarray(_on_black(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")).convert("RGB"),
                          dtype=np.uint8)
    if mode in SIXTEEN_BIT_MODES + ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if sixteen_bit(img) if deep is None else deep:
            arr = arr / limits.white
        else:  # 32-bit int or float images have no fixed range: stretch their own range
            arr = _stretched(arr)
        gray = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        img = _on_black(img.convert("RGBA"))
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # convert copies RGB too


def _stretched(arr: np.ndarray) -> np.ndarray:
    """Values of no fixed range (a 32-bit integer or a float image, grey or colour) on 0 to 1: the photo's least
    and greatest finite values are black and white, every channel alike; not-a-number reads black and an infinity
    as the end it points to (one would otherwise stretch every finite value to black)."""
    return _stretched_on(arr, _finite_range(arr))


def _finite_range(arr: np.ndarray) -> tuple[float, float] | None:
    """The least and greatest finite values of ``arr`` (None: it has none), without a float copy of it."""
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(arr)
        if not finite.any():
            return None
        lo = float(np.min(arr, where=finite, initial=np.inf))
        hi = float(np.max(arr, where=finite, initial=-np.inf))
    return lo, hi


def _stretched_on(arr: np.ndarray, span: tuple[float, float] | None) -> np.ndarray:
    """:func:`_stretched` with the photo's finite range ``span`` given: a part of a photo (a block of its rows) is
    stretched as the whole is. In float64 whatever ``arr``'s own precision."""
    if span is None or span[1] <= span[0]:
        return np.zeros(arr.shape)
    out = np.subtract(arr, span[0], dtype=np.float64)
    out /= span[1] - span[0]
    return np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)


def _on_black(rgba: Image.Image) -> Image.Image:
    """Transparent regions carry no part: composite on black rather than expose undefined colour values (files and
    arrays alike, so one picture gives one score however it arrives). An alpha of zero everywhere is no
    transparency but a fourth byte left unused (a camera SDK's or Windows' 32-bit RGBX frames): the colours are
    the photo, which blended on black would be a black square."""
    if rgba.getchannel("A").getextrema()[1] == 0:
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)


def _keyed_on_black(rgb: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """A decoded photo with the pixels its transparency key names (``hidden``) black, as :func:`_on_black` reads
    every fully transparent pixel: a picture saved with a key, a palette's transparent entry or an alpha channel
    reads the same. A key that names every pixel is no transparency, as an alpha of zero everywhere is not: the
    photo is its colours."""
    hidden = _hiding(hidden, rgb.shape[:2])
    return rgb if hidden is None else np.where(hidden[:, :, None], np.uint8(0), rgb)


def _hiding(hidden: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``hidden`` (the pixels a key names) where they read black: None where it names none, or every pixel (no
    transparency, :func:`_keyed_on_black`)."""
    if hidden is None or hidden.shape != tuple(shape) or hidden.all() or not hidden.any():
        return None
    return hidden


def opened_file(img: Image.Image, at_most: int = -1) -> bytes | None:
    """The whole file a Pillow image opened and not yet decoded reads from (None: it has none, or is decoded
    already), read to its end or ``at_most`` bytes (by default its size was checked by whoever opened it), its place
    in it kept."""
    fp = getattr(img, "fp", None)
    if fp is None or not getattr(img, "tile", None):
        return None
    here = fp.tell()
    try:
        fp.seek(0)
        return fp.read(at_most)
    finally:
        fp.seek(here)


def shown_values(img: Image.Image, data: bytes | None) -> tuple[Image.Image, np.ndarray | None]:
    """``img`` (opened, not yet decoded; ``data``: its file, or None to read it from ``img``'s) decoded and turned
    as its EXIF says, and the pixels its transparency key hides (None: it names none, or every pixel). The values of
    a 16-bit photo that say how many bits its camera gives are the others: the hidden ones read black whatever
    their value (a sentinel of 65535 in a 12-bit camera's file set 16-bit white for a fit, and a 12-bit model warned
    of the photo and refused to learn it)."""
    if data is None:
        data = opened_file(img)
    img.load()
    turned = ImageOps.exif_transpose(img)
    hidden = transparent(turned, data or b"")
    return turned, _hiding(hidden, (turned.height, turned.width))


def keyed(img: Image.Image) -> bool:
    """Whether ``img`` (opened, decoded or not) names its transparent pixels by a key, one grey or colour (a PNG's
    tRNS chunk in a grey or RGB file, or a PIL image given with such an ``info``), rather than by an alpha channel or
    a palette entry, which convert to an alpha channel and read as every alpha does."""
    return "transparency" in img.info and img.mode not in (*ALPHA_MODES, "P")


def transparent(img: Image.Image, data: bytes, low: Image.Image | None = None) -> np.ndarray | None:
    """The pixels of a decoded image (``data``: its file) that show nothing: by an alpha channel, a palette's
    transparent index, or the one grey or colour a PNG's transparency key names; None where it has none. What an
    editor or a browser shows as erased, whatever colour lies under it: a photo reads them black
    (:func:`_to_rgb_array`), an inspection mask and a ground-truth mask (inspection_mask.py, evaluate.py) as not
    drawn, where the white left under an erased layer read as defect over the whole photo. ``low``: the low bytes
    of a 16-bit colour image, turned as ``img`` is, where its decoding read them already (:func:`_low_bytes`), so a
    colour key is compared with them rather than with a second decoding of the file."""
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"))[:, :, 3] == 0
    if "transparency" in img.info:  # a grey or colour key
        return _keyed(img, data, low)
    return None


def _keyed(img: Image.Image, data: bytes, low: Image.Image | None = None) -> np.ndarray:
    """The pixels of the one grey or colour a PNG's transparency key names, compared in the file's own scale.

    Why not Pillow's conversion to RGBA: it compares a 16-bit grey's key with the pixels cut to 8 bits (a key of
    white made every grey from 255 up transparent, and a mask drawn in them inspected nothing) and a 2- or 4-bit
    grey's key unscaled while the pixels are stretched to 8 bits (it matched none: the white an editor shows as
    erased, or an optimiser's smaller copy of it, was inspected). A 16-bit colour key with no file to read the low
    bytes from (a PIL image given decoded) is compared at the top bytes Pillow holds: it named no pixel, and the
    keyed pixels read as the key's colour where the same file reads them black."""
    key = img.info["transparency"]
    pixels = np.asarray(img)
    depth = data[24] if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" else 8
    if isinstance(key, tuple):  # a colour
        if depth == 16:
            return np.all(_colour16(img, data, low) == np.asarray(key[:3]), axis=-1)
        if max(key[:3]) > 255 and pixels.dtype == np.uint8:  # a 16-bit file's key, its file gone (a PIL image given
            # decoded): the pixels are their values' top bytes, as Pillow holds them, and so is the key
            return np.all(pixels[..., :3] == np.asarray(key[:3]) >> 8, axis=-1)
        return np.all(pixels[..., :3] == np.asarray(key[:3]), axis=-1)
    if img.mode == "1":
        return pixels == bool(key)
    if depth in (2, 4):  # stretched to 8 bits as the pixels are
        key = int(key) * (255 // ((1 << depth) - 1))
    return pixels == key


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _colour16(img: Image.Image, data: bytes, low: Image.Image | None = None) -> np.ndarray:
    """The 16-bit colours of a decoded 16-bit colour PNG (``data``: its file; ``img``: its pixels, turned as its
    EXIF says). Why: Pillow keeps only each sample's high byte, and a key compared with those made every colour
    sharing the key's high bytes transparent: a mask drawn a step off the keyed white inspected nothing. The low
    bytes are read as a 16-bit colour photo's are (:func:`_low_bytes`), or given (``low``, turned as ``img`` is)
    where the photo's decoding read them for its values already."""
    high = np.asarray(img, dtype=np.uint16)[..., :3]
    if low is not None:
        return high << 8 | np.asarray(low, dtype=np.uint16)[..., :3]
    with opened_admitted(data) as other:
        if not sixteen_bit_colour(other):  # not as Pillow reads such a file now: high bytes alone
            return high << 8
    with _low_bytes(data, 0) as low:
        return high << 8 | np.asarray(ImageOps.exif_transpose(low), dtype=np.uint16)[..., :3]


# channels that differ by no more than this are one grey: what a grey photo's colour conversions round to (a grey
# JPEG's chroma); a colour camera's pixels differ by more, even on a grey part, through its colour filters' noise
GREY_TOLERANCE = 2
# a photo is told grey or colour from a grid of about this many of its pixels: a colour camera's noise is in every
# pixel, and a grid this fine still lands in any coloured area large enough to matter
GREY_SAMPLE = 1 << 16


def sampled(image: np.ndarray) -> np.ndarray:
    """The grid of about :data:`GREY_SAMPLE` pixels a photo's channels and levels are judged on (a view, no copy)."""
    h, w = image.shape[:2]
    step = max(1, int((h * w / GREY_SAMPLE) ** 0.5))
    return image[::step, ::step]


def is_grey(image: np.ndarray) -> bool:
    """Whether a decoded ``(H, W, 3)`` photo is grey, its three channels one picture (a mono camera's, or any grey
    file), rather than a colour camera's."""
    if image.ndim < 3 or image.shape[2] < 3:
        return True
    sample = sampled(image)
    # the tolerance is in 8-bit steps: a float photo in [0, 1] gets its share of that range
    floating = np.issubdtype(sample.dtype, np.floating)
    tolerance = GREY_TOLERANCE / 255.0 if floating and float(np.nanmax(sample, initial=0.0)) <= 1.0 else GREY_TOLERANCE
    # each pair of channels by itself (elementwise, which streams): a peak-to-peak over the short channel axis cost
    # many times the whole decode check on every scored photo
    r, g, b = (sample[..., c].astype(np.float32 if floating else np.int32) for c in range(3))
    return all(float(np.abs(x - y).max(initial=0)) <= tolerance for x, y in ((r, g), (r, b), (g, b)))


# a frame with its sensor's noise is told by the means of its blocks of this many sampled pixels a side: the noise
# averages out over a block, a part's shading and edges do not (decisions.md, session 65)
BLANK_BLOCK = 8
# blocks' means within this many levels in every channel are one level with noise: well above what a dark frame's
# sensor noise spreads them by, well below the flattest good photos of the shared data (decisions.md, session 65)
BLANK_SPREAD = 12
# and the frame is that many times flatter than the flattest good photo of its model: a model fitted on dim photos
# (a deep camera's read against a deeper white) has good photos as flat as a noisy dark frame, and they are parts
BLANK_BELOW = 3


def blank_spread(image: np.ndarray) -> float:
    """How far apart the means of a decoded ``(H, W, 3)`` photo's blocks lie, in levels, the widest channel's (on the
    grid :func:`is_grey` reads): a few for a frame of one level and its sensor's noise, tens for a part. Infinite
    where the photo has too few blocks to compare."""
    sample = sampled(image)
    rows, cols = sample.shape[0] // BLANK_BLOCK, sample.shape[1] // BLANK_BLOCK
    if rows < 2 or cols < 2:
        return float("inf")
    cut = sample[:rows * BLANK_BLOCK, :cols * BLANK_BLOCK].reshape(rows, BLANK_BLOCK, cols, BLANK_BLOCK, -1)
    means = cut.mean(axis=(1, 3), dtype=np.float32)
    return float((means.max(axis=(0, 1)) - means.min(axis=(0, 1))).max())


def flattest_part(spreads: Sequence[float]) -> float | None:
    """The least :func:`blank_spread` of a fit's good photos that show a part, which :func:`is_blank` tells a dark
    frame from: a good photo as flat as a blank frame is against the typical one (the median) is a blank frame
    itself (a trigger before the part came while the photos were taken). As the least, such a frame made every dark
    frame with its sensor's noise pass for a part of the model. None where no photo has blocks to compare."""
    finite = sorted(s for s in spreads if math.isfinite(s))
    if not finite:
        return None
    typical = finite[len(finite) // 2]
    return next((s for s in finite if s > min(BLANK_SPREAD, typical / BLANK_BELOW)), finite[0])


def is_blank(image: np.ndarray, flattest: float | None = None) -> bool:
    """Whether a decoded ``(H, W, 3)`` uint8 photo is one level throughout (on the grid :func:`is_grey` reads): a
    frame that shows nothing (a lamp off, a covered lens, a trigger before the part came), which is no grey camera's
    photo either. Every channel within :data:`GREY_TOLERANCE` of one value; or, where the model's flattest good photo
    is known (``flattest``, its :func:`blank_spread`), one level and a sensor's noise of a few levels: blocks'
    means within :data:`BLANK_SPREAD` and :data:`BLANK_BELOW` times flatter than that photo."""
    if image.size == 0:
        return True
    sample = sampled(image)
    if float(sample.max()) - float(sample.min()) <= GREY_TOLERANCE:
        return True
    return flattest is not None and blank_spread(image) <= min(BLANK_SPREAD, flattest / BLANK_BELOW)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded photo and what a person should know about how it was read (the score's ``warnings``)."""

    array: np.ndarray
    warnings: tuple[str, ...] = ()
    # the file's JPEG quality as compression.jpeg_quality reads it (100: not a JPEG; None: unknown, an array): the
    # drift monitor counts the parts compressed harder than the good photos
    jpeg_quality: int | None = None


def load_image(source: ImageInput, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None) -> np.ndarray:
    """Decode ``source`` (path, bytes, array or PIL image) into an ``(H, W, 3)`` uint8 RGB array.

    Raises :class:`ImageLoadError` with a one-line reason for anything that is not a usable image.
    """
    return decode_image(source, limits, name).array


def _not_a_file(path: Path, label: str) -> ImageLoadError:
    """The error for a path to no file: a folder is named so (it was "no such file", as if it were not there)."""
    if path.is_dir():
        return ImageLoadError(f"{label}: a folder, not an image file", "not_image")
    return _missing(label)


def _missing(label: str) -> ImageLoadError:
    """The error for an image file that is not there, also for one deleted between the look and the open: a
    recorded photo that retention removes after the records handed out its path (``RecordStore.reviewed_images``)
    is a photo gone, which an update skips as it skips any other, not an OSError that failed the whole update."""
    return ImageLoadError(f"{label}: no such file", "missing")


def _bytes_like(source: object, label: str) -> bytes | bytearray | memoryview:
    """``source`` if it is a file's bytes. Anything else (None, a list, an open file) was handed to ``bytes()``,
    which failed with a bare TypeError, or, given an int, made that many zero bytes (an int of a billion: a
    gigabyte) and called it not an image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source
    raise ImageLoadError(f"{label}: {type(source).__name__} is not an image; give a path, the file's bytes, a numpy "
                         "array or a PIL image", "not_image")


def decode_image(source: ImageInput, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None,
                 reduce_to: int | None = None) -> DecodedImage:
    """:func:`load_image`, with the warnings a score should carry: a file of several frames is read at one of
    them (:func:`_choose_frame`), and the answer must say which. ``reduce_to``: the caller wants a picture whose
    longer side is about that many pixels (a thumbnail), so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (never
    below it); the pixel limits still apply to the full size."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, np.ndarray):
        return DecodedImage(_validate_array(source, label, limits), _array_depth_note(source, limits))
    if isinstance(source, Image.Image):  # one a caller moved to a later frame is read there: they chose it
        return _decode(source, label, limits, reduce_to, choose=source.tell() == 0)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise _not_a_file(path, label)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise _missing(label) from None
        with fh:  # open, a file reads whole even if it is deleted now
            if os.fstat(fh.fileno()).st_size > limits.max_bytes:
                raise ImageLoadError(f"{label}: file is larger than the limit of {limits.max_bytes} bytes",
                                     "too_large")
            data = fh.read()
    else:
        data = bytes(_bytes_like(source, label))
    _check_bytes(len(data), label, limits)
    opened = _open(_EndTold(data), label, limits)
    if isinstance(opened, _FloatTiff):
        return _decode_float(opened, label, limits)
    return _decode(opened, label, limits, reduce_to, data=data)


def decode_each(sources: Iterable[ImageInput], limits: ImageLimits = DEFAULT_LIMITS,
                names: Sequence[str | None] | None = None,
                skip: Callable[[int, ImageLoadError], None] | None = None) -> Iterator[tuple[int, DecodedImage]]:
    """Each of ``sources`` that decodes, one at a time, with its place among them (``names[i]`` labels it in
    messages). One that does not is handed to ``skip`` with its error and passed over: a fit, an update or an
    evaluation of many files goes on past a bad one, and says so in its own words."""
    for i, src in enumerate(sources):
        try:
            decoded = decode_image(src, limits, name=None if names is None else names[i])
        except ImageLoadError as exc:
            if skip is not None:
                skip(i, exc)
            continue
        yield i, decoded


def declared_size(source: bytes | BinaryIO, limits: ImageLimits | None = None,
                  name: str | None = None) -> tuple[int, int, str]:
    """``(width, height, format)`` as the file's header declares them, without decoding a pixel.

    ``source`` is the file's bytes or a binary file object (read from its start, left where it was). This
    is cheap (Pillow reads the header only), so a service can learn what decoding an upload would cost before it
    commits to it. With ``limits`` the header checks of :func:`load_image` apply too (size in bytes, format,
    pixel count, smallest side) and fail with the same :class:`ImageLoadError`: what decoding would refuse is
    refused here first.
    """
    label = name or "image"
    checks = limits or _ANY_SIZE
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    was = fp.tell()
    try:
        _check_bytes(fp.seek(0, io.SEEK_END), label, checks)
        fp.seek(0)
        img = _open(fp, label, checks)
        if isinstance(img, _FloatTiff):
            (width, height), fmt = img.page.size, "TIFF"
        else:
            _choose_frame(img)  # the frame decoding reads: its size is what decoding costs and what the limits see
            width, height, fmt = img.width, img.height, str(img.format)
            _check_tiles(img, label, checks)
    finally:
        fp.seek(was)
    _check_pixels(width, height, label, checks)
    return width, height, fmt


def declared_shape(source: ImageInput, limits: ImageLimits = DEFAULT_LIMITS, name: str | None = None
                   ) -> tuple[int, int]:
    """``(height, width)`` that :func:`load_image` would return for ``source``, read from the header only (EXIF
    rotations by a quarter turn swap the two), with its header checks: a fit can plan its batches and its scale
    before it decodes a pixel."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, np.ndarray):  # the rest of the checks run when it is "decoded" (_validate_array)
        if source.ndim not in (2, 3):
            raise ImageLoadError(f"{label}: array of shape {source.shape} is not an image (expected HxW, "
                                 "HxWx1/3/4)", "bad_array")
        return int(source.shape[0]), int(source.shape[1])
    if isinstance(source, Image.Image):
        width, height = source.size
        # a PNG opened and not yet decoded is read from its file: Pillow decodes one to look for its EXIF chunk
        # after the pixels, and a photo so decoded has lost what its tiles say (a 16-bit colour photo then read as
        # its top bytes, a transparency key at 8 bits) before the fit or the update that asked decodes it
        data = opened_file(source) if source.format == "PNG" else None
        if _size_turned(source):
            orientation = 1
        elif data is not None:  # read as decoding reads it (declared_orientation), from a copy of the file
            orientation = declared_orientation(data)
        else:
            orientation = source.getexif().get(0x0112, 1)
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise _not_a_file(path, label)
            try:
                fp: BinaryIO = open(path, "rb")
            except FileNotFoundError:
                raise _missing(label) from None
        else:
            fp = io.BytesIO(bytes(_bytes_like(source, label)))
        with fp:
            width, height, fmt = declared_size(fp, limits, label)
            orientation = _orientation(fp, fmt)
            if fmt == "TIFF" and orientation in (5, 6, 7, 8):
                fp.seek(0)
                with contextlib.suppress(UnidentifiedImageError):  # a float TIFF: its page's size is as stored
                    if _size_turned(opened_admitted(fp)):
                        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _size_turned(img: Image.Image) -> bool:
    """Whether Pillow reports ``img``'s size already turned by its orientation tag, as recent releases do for a
    TIFF (the stored width and height then read the other way round): turned again, a turned TIFF's declared
    shape was the stored one, not the one decoding gives."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None:
        return False
    return (tags.get(256), tags.get(257)) == (img.height, img.width) != (img.width, img.height)


def declared_orientation(data: bytes) -> int:
    """The EXIF orientation (1 to 8; 1 = as stored) that :func:`load_image` turns the image in ``data`` by, read
    from its header where it can be. Pillow also takes it from XMP and from a PNG's chunks after the pixels, which
    browsers do not: a page that shows the photo needs to know the turn the regions are in."""
    fp = io.BytesIO(data)
    try:
        fmt = str(opened_admitted(fp).format)
    except UnidentifiedImageError:  # a float colour TIFF, which Pillow does not open, is turned by its page's tag
        fmt = "TIFF"
    except Exception:  # not an image: decoding refuses it, nothing is turned  # noqa: BLE001
        return 1
    turn = _orientation(fp, fmt)
    return turn if turn in range(1, 9) else 1  # exif_transpose ignores any other value


def _orientation(fp: BinaryIO, fmt: str) -> int:
    """The EXIF orientation of the image in ``fp`` (of format ``fmt``), as decoding reads it."""
    try:
        orientation = _png_orientation(fp) if fmt == "PNG" else None
        if orientation is None:  # not a PNG (its EXIF is in the header), or one only decoding can tell
            fp.seek(0)
            try:
                img = opened_admitted(fp)
            except UnidentifiedImageError:  # a float colour TIFF (float_tiff.py): its page's own tag
                found = _float_tiff(fp)
                return found.page.orientation if found is not None else 1
            if fmt == "PNG":
                img.load()  # as load_image reads it: the chunks after the pixel data too
            orientation = img.getexif().get(0x0112, 1)
        return int(orientation)
    except Exception:  # a broken EXIF block: decoding ignores it too  # noqa: BLE001
        return 1


# PNG text chunks Pillow also reads an orientation from: XMP, and ImageMagick's EXIF profile written as text
_PNG_ORIENTATION_TEXT = (b"XML:com.adobe.xmp", b"Raw profile type exif")


def _png_orientation(fp: BinaryIO) -> int | None:
    """A PNG's EXIF orientation, its pixels left undecoded; None where only Pillow's own reading can tell what
    decoding will apply (an orientation in a text chunk, several eXIf chunks). Pillow's ``getexif`` decodes the whole
    image to find an eXIf chunk that may follow the pixel data, which made planning a fit cost a second decode of
    every training image; so the chunks are walked with Pillow's own reader and the pixel data skipped."""
    from PIL import PngImagePlugin

    size = fp.seek(0, io.SEEK_END)
    fp.seek(8)  # past the signature
    chunks = PngImagePlugin.ChunkStream(fp)
    found: int | None = None
    while True:
        cid, pos, length = chunks.read()
        if cid == b"IEND":
            return 1 if found is None else found
        if pos + length + 4 > size:  # a chunk longer than the file: truncated or forged, nothing more to read
            return 1
        if cid == b"eXIf":
            if found is not None:
                return None
            exif = Image.Exif()
            exif.load(fp.read(length))
            found = int(exif.get(0x0112, 1))
        elif cid in (b"tEXt", b"zTXt", b"iTXt") and \
                fp.read(min(length, 80)).split(b"\0", 1)[0] in _PNG_ORIENTATION_TEXT:
            return None
        fp.seek(pos + length + 4)  # the chunk's data and its CRC


def _check_bytes(size: int, label: str, limits: ImageLimits) -> None:
    if size <= 0:
        raise ImageLoadError(f"{label}: empty file", "empty")
    if size > limits.max_bytes:
        raise ImageLoadError(f"{label}: file is larger than the limit of {limits.max_bytes} bytes", "too_large")


def _open(fp: BinaryIO, label: str, limits: ImageLimits) -> Image.Image | _FloatTiff:
    """Pillow's lazy image over ``fp``: the header is read, no pixel is decoded. A float colour TIFF, which Pillow
    does not open, is its page's tags (read here: decoding it is :func:`_decode_float`'s)."""
    try:
        img: Image.Image | _FloatTiff = _pillow_open(fp, limits)
    except UnidentifiedImageError:
        found = _float_tiff(fp)
        if found is None:
            other = _targa(fp, limits.formats) or _heif(fp, limits.formats) or _unaccepted(fp, limits.formats)
            if other is not None:
                raise ImageLoadError(f"{label}: image format {other} is not accepted (accepted: "
                                     f"{', '.join(sorted(limits.formats or ()))})", "unsupported_format") from None
            meant = _signature(fp)
            if meant is not None:  # a photo damaged on its way, not a file of another kind
                raise ImageLoadError(f"{label}: corrupt image (a damaged {meant} file: its header does not "
                                     f"decode)", "corrupt") from None
            raise ImageLoadError(f"{label}: not a recognized image format", "not_image") from None
        img = found
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own header check (its warning is an exception only if some caller's filter says so): either
        # way the header declares more pixels than anyone should decode. Said against our limit, not Pillow's.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        if declared is not None and int(declared.group(1)) <= limits.max_pixels:
            # within ours, refused by a format's opener that makes Pillow's check itself (_pillow_open): only
            # Pillow's process-wide limit opens it, which the anomaly command raises to --max-pixels
            raise ImageLoadError(f"{label}: {declared.group(1)} pixels is within the limit of {limits.max_pixels} "
                                 f"pixels but past Pillow's own for a {_claimed(fp)} file (twice its "
                                 "MAX_IMAGE_PIXELS): raise PIL.Image.MAX_IMAGE_PIXELS in this process (the anomaly "
                                 "command raises it to --max-pixels)", "too_large") from None
        raise ImageLoadError(f"{label}: {declared.group(1) if declared else 'its declared'} pixels exceeds the limit "
                             f"of {limits.max_pixels} pixels", "too_large") from None
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{label}: cannot read image ({exc})") from None
    fmt = "TIFF" if isinstance(img, _FloatTiff) else img.format
    if limits.formats is not None and fmt not in limits.formats:
        raise ImageLoadError(f"{label}: image format {fmt} is not accepted "
                             f"(accepted: {', '.join(sorted(limits.formats))})", "unsupported_format")
    return img


def _pillow_open(fp: BinaryIO, limits: ImageLimits) -> Image.Image:
    """``Image.open``, but a header within ``limits.max_pixels`` is opened whatever Pillow's own pixel limit.

    Pillow refuses a header past twice its process-wide ``MAX_IMAGE_PIXELS`` (about 179 MP) as a decompression bomb,
    and warns from half that: a line camera's photo within a ``--max-pixels`` raised for it was refused, and said
    to exceed a limit it did not exceed. Ours is checked from the same header, so such a file is opened by its
    format's own opener, as Pillow's would, without that check (Pillow's limit is a global other code in the
    process may rely on: it is left as it is)."""
    openers = _openers(limits.formats)
    try:
        return Image.open(fp, formats=openers)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        if declared is None or int(declared.group(1)) > limits.max_pixels:
            raise
    fp.seek(0)
    prefix = fp.read(16)
    Image.init()
    for fmt in openers if openers is not None else tuple(Image.ID):
        factory, accept = Image.OPEN[fmt]
        found = not accept or accept(prefix)
        if found and not isinstance(found, str):  # a string is a plugin's reason not to
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _claimed(fp: BinaryIO) -> str:
    """The format a file's first bytes claim, by its plugin's own check of them, for a message."""
    fp.seek(0)
    head = fp.read(16)
    return next((fmt for fmt, (_, accept) in Image.OPEN.items() if accept is not None and accept(head) is True),
                "such")


def admit_in_pillow(max_pixels: int) -> None:
    """Raise Pillow's process-wide pixel limit to ``max_pixels`` where it is lower, for a process that is the
    service's or the command line's own. :func:`_pillow_open` reads past Pillow's check at the header, but some
    formats' openers make it again themselves (WebP's, before its decoder sets aside the canvas; a GIF's frame, an
    MPO's picture, a crop): only the global reaches those. A library caller's process keeps its own."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def opened_admitted(data: bytes | BinaryIO) -> Image.Image:
    """``Image.open`` of a file held to our limits already (a stored photo, a heatmap the service drew, a photo
    being decoded opened again, or only its header read), whatever Pillow's own pixel limit (:func:`_pillow_open`)."""
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return _pillow_open(fp, _ANY_SIZE)


def opened_within(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` of a file that is not a photo but is read as one of its size is (an inspection mask drawn on
    a training image): Pillow's own pixel limit refuses nothing within ``max_pixels`` (:func:`_pillow_open`). Decode
    it past that limit with :func:`decodable_admitted`."""
    return _pillow_open(io.BytesIO(data), ImageLimits(max_pixels=max_pixels, max_bytes=_ANY_SIZE.max_bytes,
                                                      min_side=0, formats=None))


def decodable_admitted(img: Image.Image) -> None:
    """Let ``img`` (opened by :func:`opened_admitted`, not yet decoded) decode past Pillow's pixel limit, which a
    TIFF's decoder checks again (:func:`_tiff_past_pillows_limit`)."""
    _tiff_past_pillows_limit(img, _ANY_SIZE)


def source_quality(source: object) -> int | None:
    """:func:`compression.jpeg_quality` of an image input read from its header alone; None for an array (or anything
    that does not open): a photo whose compression is unknown. Opened past Pillow's pixel limit: a photo is held to
    ours as it is decoded."""
    try:
        if isinstance(source, Image.Image):
            return jpeg_quality(source)
        if isinstance(source, (bytes, bytearray)):
            with opened_admitted(bytes(source)) as img:
                return jpeg_quality(img)
        if isinstance(source, (str, Path)):
            with open(source, "rb") as fp, opened_admitted(fp) as img:
                return jpeg_quality(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return None


def _tiff_past_pillows_limit(img: Image.Image, limits: ImageLimits) -> None:
    """A TIFF's page is checked against Pillow's pixel limit again as it is decoded (the buffer it is decoded into
    is made then): a page past it and within ours, checked from the header, is given that buffer here, as Pillow's
    decoder would make it, so the check is not made a second time against a limit that is not the service's."""
    size = getattr(img, "_tile_size", None)
    pillows = Image.MAX_IMAGE_PIXELS
    if (not isinstance(img, TiffImagePlugin.TiffImageFile) or getattr(img, "_im", True) is not None or size is None
            or pillows is None):
        return
    if pillows < size[0] * size[1] <= limits.max_pixels:
        img.im = Image.core.new(img.mode, size)


def _openers(accepted: frozenset[str] | None) -> tuple[str, ...] | None:
    """Pillow's openers for the ``accepted`` formats (None: all). Pillow otherwise runs every plugin's header parser
    on the bytes until one takes them, unaccepted formats' too: its EPS parser spent 27 s of a core on an 18.7 MB
    upload of comment lines before the service answered 415."""
    if accepted is None:
        return None
    Image.init()
    return tuple(f for f in accepted if f in Image.OPEN)  # MPO has none of its own: the JPEG opener makes it


def _unaccepted(fp: BinaryIO, accepted: frozenset[str] | None) -> str | None:
    """The format outside ``accepted`` whose signature the first bytes carry, by its plugin's own check of them
    (no header is parsed): a 415 that names it, as when Pillow parsed it."""
    if accepted is None:
        return None
    fp.seek(0)
    head = fp.read(64)
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in accepted and accept is not None:
            with contextlib.suppress(Exception):
                if accept(head):
                    return fmt
    return None


# the brands of an ISO base media file (its ftyp box) that say its picture is HEVC-coded HEIF: a phone's photo
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# a HEIF photo's names, which Pillow registers only with a plugin for them
_HEIF_EXTENSIONS = {".heic": "HEIF", ".heif": "HEIF", ".hif": "HEIF"}


def _heif(fp: BinaryIO, accepted: frozenset[str] | None) -> str | None:
    """``"HEIF"`` for a HEIF photo (a phone's own format, often renamed ``.jpg`` on its way) where it is not accepted:
    Pillow has no reader for it without a plugin, so it was "not a recognized image format", as if it were no
    picture at all. Told by the brands of its ``ftyp`` box; an AVIF, which shares the box, is left to Pillow's
    plugin to name."""
    if accepted is None or "HEIF" in accepted:
        return None
    fp.seek(0)
    head = fp.read(64)
    if head[4:8] != b"ftyp":
        return None
    size = min(int.from_bytes(head[:4], "big"), len(head))
    brands = {head[8:12], *(head[i:i + 4] for i in range(16, size - 3, 4))}
    return "HEIF" if brands & _HEIF_BRANDS and not brands & _AVIF_BRANDS else None


_TGA_FOOTER = b"TRUEVISION-XFILE.\0"  # the last bytes of a TGA 2.0 file (Pillow's among them)
# a TGA header's image types with their pixels stored plainly: colour-mapped, true colour, grey
_TGA_PLAIN = (1, 2, 3)


def _targa(fp: BinaryIO, accepted: frozenset[str] | None) -> str | None:
    """``"TGA"`` for a Targa file where it is not accepted: its header has no signature (a true-colour one starts as
    a Windows cursor does, and was refused as CUR; a grey or run-length one as no image at all), so it is told by
    the footer a TGA 2.0 file ends with, or by a header whose plain pixels fill the file. Never read: without a
    signature Pillow's reader takes bytes of many other kinds for a picture and would score noise."""
    if accepted is None or "TGA" in accepted:
        return None
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    if size >= 18 + len(_TGA_FOOTER):
        fp.seek(size - len(_TGA_FOOTER))
        if fp.read(len(_TGA_FOOTER)) == _TGA_FOOTER:
            return "TGA"
    fp.seek(0)
    head = fp.read(18)
    if len(head) < 18:
        return None
    id_len, mapped, kind = head[0], head[1], head[2]
    map_entries, map_bits = int.from_bytes(head[5:7], "little"), head[7]
    width, height, depth = int.from_bytes(head[12:14], "little"), int.from_bytes(head[14:16], "little"), head[16]
    if (mapped != int(kind == 1) or kind not in _TGA_PLAIN or not width or not height
            or depth not in (8, 15, 16, 24, 32) or head[17] & 0xC0):
        return None
    pixels = 18 + id_len + (map_entries * ((map_bits + 7) // 8) if mapped else 0) + width * height * ((depth + 7) // 8)
    return "TGA" if pixels <= size <= pixels + 1024 else None


# not TIFF: a TIFF Pillow cannot identify is as often a variant it does not read as a damaged file
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))


def _signature(fp: BinaryIO) -> str | None:
    """The format a file's first bytes claim (only signatures no text file starts with), or None."""
    fp.seek(0)
    head = fp.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _check_tiles(img: Image.Image, label: str, limits: ImageLimits) -> None:
    """Refuse a TIFF page whose tiles are larger than the largest photo the limits admit. libtiff, which Pillow
    decodes a compressed page with, sets aside one tile's buffer by the tile's own size, whatever the page's: a
    TIFF of a few hundred bytes declaring a small page in one tall tile made it take gigabytes before it found the
    data missing."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    if tags is None or 322 not in tags:  # TileWidth: a page in strips, whose buffer is never taller than the page
        return
    try:
        width, length = int(tags.get(322) or 0), int(tags.get(323) or 0)  # and TileLength
    except (TypeError, ValueError):  # not numbers: Pillow refuses the page itself
        return
    if width * length > limits.max_pixels:
        raise ImageLoadError(f"{label}: its tiles of {width}x{length} pixels exceed the limit of {limits.max_pixels} "
                             "pixels", "too_large")


# Scans a JPEG may hold. libjpeg makes a pass over the whole photo for each scan of a progressive JPEG, however few
# bytes the scan holds: a file of the pixel limit whose dozen scans were repeated to many thousands decoded for
# minutes. An encoder writes a handful (libjpeg's progressive script, mozjpeg's); a thumbnail or an MPO's other
# pictures add theirs.
MAX_JPEG_SCANS = 256
_START_OF_SCAN = b"\xff\xda"  # never inside a scan's coded data, where a marker's first byte is stuffed


def _check_scans(img: Image.Image, data: bytes | None, label: str, limits: ImageLimits) -> None:
    """Refuse a JPEG of more scans than :data:`MAX_JPEG_SCANS` before libjpeg reads one: its markers are counted
    in the file's bytes (``data``, or those ``img`` reads from), an upper bound of the photo's own."""
    if img.format not in JPEG_FORMATS:
        return
    whole = data if data is not None else _file_bytes(img, label, limits)
    scans = 0 if whole is None else whole.count(_START_OF_SCAN)
    if scans > MAX_JPEG_SCANS:
        raise ImageLoadError(f"{label}: corrupt image (a JPEG of {scans} scans, more than any encoder writes; each is "
                             f"a pass over the whole photo, and at most {MAX_JPEG_SCANS} are read)")


def _check_pixels(width: int, height: int, label: str, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            f"{label}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels", "too_large"
        )
    if min(width, height) < limits.min_side:
        raise ImageLoadError(f"{label}: {width}x{height} is smaller than the minimum side of {limits.min_side}",
                             "too_small")


# A multi-frame file is searched this far for its photo: a camera's stack or pyramid holds a few frames, and a
# forged TIFF of a million tiny pages is not walked page by page (each page's tags are parsed to find the next)
FRAMES_SEARCHED = 64
_REDUCED_RESOLUTION = 1  # bit 0 of a TIFF page's NewSubfileType (tag 254): a reduced-resolution copy of another


def _choose_frame(img: Image.Image) -> str | None:
    """Leave ``img`` at the frame that is the photo, and say so when the file holds more than one (None: it does
    not). A TIFF that marks a page as a reduced-resolution copy (a pyramid, a preview beside the full image) is a
    photo with its copies: its largest page is the photo, wherever it sits. Any other multi-frame file (a stack of
    exposures, an animation) is read at its first frame. An MPO's first picture is by its standard the primary
    image (the others are previews or other views), so it is read there without a word, as every browser does."""
    if img.format == "MPO":
        return None
    sizes: list[tuple[int, int]] = []
    reduced = False
    more = False
    try:
        if img.format == "TIFF":
            for i in range(FRAMES_SEARCHED + 1):
                img.seek(i)  # EOFError past the last page
                if i == FRAMES_SEARCHED:
                    more = True
                    break
                sizes.append(img.size)
                reduced |= bool(int(img.tag_v2.get(254, 0) or 0) & _REDUCED_RESOLUTION)
        else:  # an APNG's or WebP's count is what its header declares: a forged one made a list of that many sizes
            count = int(getattr(img, "n_frames", 1))
            more = count > FRAMES_SEARCHED
            sizes = [img.size] * min(count, FRAMES_SEARCHED)
    except EOFError:
        pass
    except BROKEN_FILE_ERRORS:  # a broken later page: read what came before it
        pass
    if not sizes:
        sizes = [img.size]
    pick, note = _frame_choice(sizes, reduced, more)
    try:
        img.seek(pick)
    except BROKEN_FILE_ERRORS:
        raise ImageLoadError("cannot seek to the photo in a multi-frame file") from None
    return note


def _frame_choice(sizes: list[tuple[int, int]], reduced: bool, more: bool) -> tuple[int, str | None]:
    """The frame that is the photo among frames of ``sizes`` (:func:`_choose_frame`), and what the score says of
    it (None: there is one frame)."""
    pick = max(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], -i)) if reduced else 0
    if len(sizes) < 2:
        return pick, None
    count = f"more than {FRAMES_SEARCHED}" if more else str(len(sizes))
    why = "the largest: the others are reduced-resolution copies" if reduced else "the first"
    return pick, (f"the file holds {count} frames (pages); only frame {pick + 1} ({why}, {sizes[pick][0]}x"
                  f"{sizes[pick][1]}) was scored: send one photo per file to be sure which one is judged")


@dataclass(frozen=True)
class _FloatTiff:
    """A float colour TIFF, which Pillow refuses (float_tiff.py): the page that is its photo, chosen among its pages
    as :func:`_choose_frame` chooses, what the score says of its frames, and the file it is read from."""

    page: float_tiff.FloatColourPage
    note: str | None
    fp: BinaryIO


def _float_tiff(fp: BinaryIO) -> _FloatTiff | None:
    """The float colour TIFF in ``fp`` (None: ``fp`` holds none, or its photo is some other page), no pixel read."""
    read = float_tiff.pages(fp, FRAMES_SEARCHED + 1)
    if read is None:
        return None
    prefix, found = read
    sizes: list[tuple[int, int]] = []
    reduced = False
    for tags in found[:FRAMES_SEARCHED]:
        if not tags.get(256) or not tags.get(257):  # a page without a size ends the walk, as a broken page does
            break
        sizes.append((tags[256][0], tags[257][0]))
        reduced |= bool((tags.get(254) or (0,))[0] & _REDUCED_RESOLUTION)
    if not sizes:
        return None
    pick, note = _frame_choice(sizes, reduced, len(found) > FRAMES_SEARCHED)
    page = float_tiff.float_colour(found[pick], prefix)
    return None if page is None else _FloatTiff(page, note, fp)


class _EndTold(io.BytesIO):
    """A file's bytes that remember whether Pillow's decoding ran out of them: Pillow's decoders ask past the end only
    of a file cut short, which Pillow refuses, unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set. That switch is
    process-wide, and other code in a library caller's process turns it on to read its own damaged files (many
    training scripts do): a photo cut short on its way was then decoded with its missing part grey or black, and
    scored or learnt as a part. Ours refuses it whatever the switch, as it refuses it where the switch is off.

    Only the reads of Pillow's decoding loop count (:func:`_told_reads`), the very reads it calls truncated when
    they find nothing: a reader of its own may look past a whole file's end (a plain PGM's last value, a PNG's
    missing IEND chunk), which Pillow reads whatever the switch."""

    ran_out = False
    watching = False  # inside a read of Pillow's decoding loop: a format's own (JPEG's) reads the file within it

    def read(self, size: int | None = -1, /) -> bytes:
        out = super().read(size)
        if not out and size != 0 and self.watching:
            self.ran_out = True  # JPEG's own read answers Pillow's loop with an end marker of its making, not b""
        return out


def _told_reads(img: Image.Image, told: _EndTold) -> Callable[[int], bytes]:
    """The read Pillow's ``ImageFile.load`` would use for ``img`` (its format's ``load_read``, or its file's read,
    looked up at each call: WebP's replaces its file), telling ``told`` where Pillow's switch-off loading would have
    called the file truncated: a read that finds nothing (in it, the file's: JPEG's read hides that), or a header
    cut inside (``struct.error``, ``IndexError``)."""
    own = getattr(img, "load_read", None)

    def read(size: int) -> bytes:
        told.watching = True
        try:
            out = own(size) if own is not None else img.fp.read(size)  # type: ignore[union-attr]
        except (IndexError, struct.error):
            told.ran_out = True
            raise
        finally:
            told.watching = False
        if not out:
            told.ran_out = True
        return out

    return read


def _decode(img: Image.Image, label: str, limits: ImageLimits, reduce_to: int | None = None,
            choose: bool = True, data: bytes | None = None) -> DecodedImage:
    """``img`` decoded; ``data``: the bytes it was opened from (a 16-bit colour image is decoded from them twice, once
    for each byte of its values; without them they are read from ``img``'s file)."""
    try:
        note = _choose_frame(img) if choose else None
    except ImageLoadError as exc:
        raise ImageLoadError(f"{label}: {exc}") from None
    _check_pixels(*img.size, label, limits)
    _check_tiles(img, label, limits)
    _check_scans(img, data, label, limits)
    # our limit is checked above from the header, before any pixel is decoded, with no process-wide state: a
    # warnings filter changed here would leak between decoding threads (catch_warnings is not thread-safe)
    try:
        if reduce_to and img.format == "JPEG":  # decoded at a fraction of its size: a thumbnail, not a score
            longer = max(img.size)
            img.draft(img.mode, (max(1, img.width * reduce_to // longer), max(1, img.height * reduce_to // longer)))
        low = None  # a 16-bit colour image read against the model's colour white: its values' low bytes too
        deep_colour = sixteen_bit_colour(img)  # from its tiles, which decoding drops
        # a transparency key is compared at the file's own depth (:func:`transparent`), which its header tells
        key = limits.transparency_keys and keyed(img)
        whole = data
        if whole is None and ((limits.colour_bit_depth is not None and deep_colour) or key):
            whole = _file_bytes(img, label, limits)
        if limits.colour_bit_depth is not None and deep_colour and whole is not None:
            low = _low_bytes(whole, img.tell())
        _tiff_past_pillows_limit(img, limits)
        ends = getattr(img, "fp", None)
        ends = ends if isinstance(ends, _EndTold) else None
        if ends is not None:
            ends.ran_out = False  # what opening the header read does not count
            img.load_read = _told_reads(img, ends)  # type: ignore[attr-defined]
        try:
            img.load()  # decode now so truncation surfaces here, not deep in the pipeline
        finally:
            if ends is not None:
                del img.load_read  # type: ignore[attr-defined]  # the format's own again (PNG's for its next frame)
        if ends is not None and ends.ran_out and ImageFile.LOAD_TRUNCATED_IMAGES:
            raise OSError("image file is truncated: its pixels ran past the end of the file (the rest would "
                          "be filled in only because PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process)")
        deep = sixteen_bit(img)  # before the transpose: its copy has no format
        quality = jpeg_quality(img)
        squeezed = compression_warning(limits.jpeg_quality, quality)
        if low is not None and (low.size, low.mode) != (img.size, img.mode):
            raise ValueError("its two readings differ in size")
        # a JPEG's profile that Pillow dropped as incomplete, told from its markers, which the turned copy lacks
        torn = torn_profile(img) if limits.colour_profiles and low is None else None
        img = upright(img)
        if low is not None:  # the same file's EXIF turn
            low = upright(low)
        hidden = transparent(img, whole or b"", low) if key else None
        # what the photo's camera gives, told by the pixels that show: a key's read black, whatever their value
        darkened = _depth_note(img, deep, deep_colour, limits, _hiding(hidden, (img.height, img.width)))
        # an 8-bit colour photo's values in sRGB where it carries another colour profile
        img, profiled = as_srgb(img) if limits.colour_profiles and low is None else (img, None)
    # ArithmeticError: a size in the header too large for Pillow's decoder to hold (a forged TIFF tile width)
    except BROKEN_FILE_ERRORS as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated image ({exc})") from None
    if img.width * img.height > limits.max_pixels:  # a multi-frame or odd file may decode to another size
        raise ImageLoadError(f"{label}: decoded size exceeds the limit of {limits.max_pixels} pixels", "too_large")
    return DecodedImage(_to_rgb_array(img, limits, deep, low, hidden),
                        tuple(n for n in (note, squeezed, darkened, torn, profiled) if n), quality)


def _depth_note(img: Image.Image, deep: bool, deep_colour: bool, limits: ImageLimits,
                hidden: np.ndarray | None = None) -> str | None:
    """:func:`depth_warning` of a decoded 16-bit file (a colour one is held as its values' top bytes, which tell
    the bits it needs as well: a white of 8 bits or more ends in a full low byte); ``hidden``: the pixels its
    transparency key hides, which read black and say nothing of its camera."""
    if not (deep or deep_colour):
        return None
    kind, depth = ("grey", limits.bit_depth) if deep else ("colour", limits.colour_bit_depth)
    if depth is None and not limits.depths_kept:
        return None
    if not img.width or not img.height:
        return None
    if hidden is not None:  # a keyed photo (rare): the values that show
        values = np.asarray(img)
        top = int((values if deep else values[..., :3])[~hidden].max())
    else:
        extrema = img.getextrema()  # read in place: no copy of the photo's values
        top = int(extrema[1]) if deep else max(int(band[1]) for band in extrema[:3])
    return depth_warning(kind, top if deep else (top << 8) | 0xFF, depth, limits)


# the turn each EXIF (and TIFF) orientation asks for, as Pillow's exif_transpose makes it
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def upright(img: Image.Image) -> Image.Image:
    """``img`` (decoded) turned as its EXIF orientation says: Pillow's ``exif_transpose``, which copies a photo
    that needs no turn, as most do; a line camera's photo of many megapixels is then held twice for nothing."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNS:
        return img
    return ImageOps.exif_transpose(img)


def _decode_float(found: _FloatTiff, label: str, limits: ImageLimits) -> DecodedImage:
    """A float colour TIFF's photo read as a float grey one is (:func:`_stretched`, its three channels alike),
    an alpha channel composited on black, turned by its orientation tag."""
    _check_pixels(*found.page.size, label, limits)
    try:
        values = float_tiff.decode(found.fp, found.page)
    except BROKEN_FILE_ERRORS as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated image ({exc})") from None
    # stretched to 8 bits a block of rows at a time, as 16-bit colour is scaled (SCALED_ROWS_PIXELS): in float64
    # whole, with its copies, the page held several times what the service's pixel budget allows a photo
    colours, span = values[:, :, :3], _finite_range(values[:, :, :3])
    alpha = float_tiff.unassociated_alpha(found.page)  # an associated one is in the colours already
    if alpha and not np.nanmax(values[:, :, 3]) > 0:  # zero everywhere: an unused channel, as in _on_black
        alpha = False
    rgb = np.empty(values.shape[:2] + (3,), np.uint8)
    step = max(1, SCALED_ROWS_PIXELS // max(1, values.shape[1]))
    for top in range(0, values.shape[0], step):
        colour = _stretched_on(colours[top:top + step], span)
        if alpha:
            colour *= np.clip(np.nan_to_num(values[top:top + step, :, 3:4]), 0.0, 1.0)
        colour *= 255.0
        colour += 0.5
        rgb[top:top + step] = np.clip(colour, 0, 255, out=colour)
    del values
    turn = _TURNS.get(found.page.orientation)
    if turn is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(turn), dtype=np.uint8)
    return DecodedImage(np.ascontiguousarray(rgb), (found.note,) if found.note else (), UNCOMPRESSED)


# How far a 0-1 float photo may overshoot its range and still be read on it (clipped): a bicubic or Lanczos resize
# rings past its input's range at sharp edges, and such a photo was read on the 0-255 scale, black. PyTorch's and
# OpenCV's bicubic kernel rings further than Pillow's at a thin bright wire, so the slack is wider than the ringing
# measured (docs/how-it-works.md). A photo on the 0-255 scale whose every value is this low is black
# whichever way it is read, and a normalized one (-1 to 1 or ImageNet's) still reaches well below it.
UNIT_SLACK = 0.25


def _in_pixel_range(arr: np.ndarray, label: str) -> np.ndarray:
    """A float or integer array's pixels on the 0-255 scale: floats whose finite values lie in [0, 1] (give or take
    :data:`UNIT_SLACK`; the caller's clip to 0-255 takes the overshoot off) are scaled up, other values must lie in
    [0, 255]. Values outside were clipped: a 16-bit photo held as int32 or float32 read as a white picture, a
    normalized one (-1 to 1, or ImageNet's mean and std) half black, and scored so."""
    if arr.dtype.kind == "O":  # an object array of numbers, say
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            pass
    if arr.dtype.kind not in "iuf":  # text, dates, complex numbers
        raise ImageLoadError(f"{label}: an array of {arr.dtype} holds no pixels (give uint8, uint16, bool or float "
                             "values)", "bad_array")
    finite = arr
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # only then a copy of the finite values
        finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if arr.dtype.kind == "f" and lo >= -UNIT_SLACK and hi <= 1.0 + UNIT_SLACK:
        return arr * 255.0  # clipped with every other scale in _validate_array: one pass over the photo, not two
    if lo < 0.0 or hi > 255.0:
        raise ImageLoadError(f"{label}: an array of {arr.dtype} with values from {lo:g} to {hi:g} is not on a pixel "
                             "scale: give values in 0-255 (floats also 0-1), or uint16 for a 16-bit photo", "bad_array")
    return arr


def _array_depth_note(arr: np.ndarray, limits: ImageLimits) -> tuple[str, ...]:
    """:func:`depth_warning` of a ``uint16`` array, read against the white :func:`_validate_array` takes (a colour
    one against the grey white where the model has no colour depth)."""
    if arr.dtype != np.uint16 or not arr.size or arr.ndim not in (2, 3):
        return ()
    colour = arr.ndim == 3 and arr.shape[2] > 1
    depth = limits.colour_bit_depth if colour and limits.colour_bit_depth is not None else limits.bit_depth
    said = depth_warning("colour" if colour else "grey", int((arr[:, :, :3] if colour else arr).max()), depth, limits)
    return (said,) if said else ()


def _validate_array(arr: np.ndarray, label: str, limits: ImageLimits) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"{label}: array of shape {arr.shape} is not an image (expected HxW, HxWx1/3/4)",
                             "bad_array")
    if arr.shape[0] * arr.shape[1] > limits.max_pixels:
        raise ImageLoadError(f"{label}: array exceeds the limit of {limits.max_pixels} pixels", "too_large")
    if min(arr.shape[0], arr.shape[1]) < limits.min_side:
        raise ImageLoadError(f"{label}: array {arr.shape[1]}x{arr.shape[0]} is smaller than {limits.min_side} px",
                             "too_small")
    if arr.dtype == np.bool_:  # as Pillow reads a 1-bit image: white where True, not the darkest grey level
        arr = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype != np.uint8:
        if arr.dtype == np.uint16:  # rounded as a 16-bit file's pixels are (_to_rgb_array)
            colour = arr.shape[2] > 1 and limits.colour_bit_depth is not None
            arr = arr * (255.0 / (limits.colour_white if colour else limits.white)) + 0.5
        else:
            arr = _in_pixel_range(arr, label)
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = np.asarray(_on_black(Image.fromarray(np.ascontiguousarray(arr), "RGBA")).convert("RGB"), np.uint8)
    return np.ascontiguousarray(arr)


def skip_reason(path: Path) -> str:
    """Why :func:`list_images` skipped ``path``, for a warning a person reads."""
    if path.is_dir():
        try:  # opened, not listed: a skipped folder may hold a hundred thousand photos
            with os.scandir(path) as entries:
                next(entries, None)
        except OSError as exc:  # searched, and could not be listed: said, not passed over (_walk)
            return f"a folder that cannot be read ({exc.strerror or exc}): its images are left out"
        return "a folder (folders are not searched: name it to use its images)"
    if path.is_symlink() and not path.exists():
        return "a link to nothing"
    named = Image.registered_extensions().get(path.suffix.lower()) or _HEIF_EXTENSIONS.get(path.suffix.lower())
    # a picture of a format the service does not read (a TGA, an ICO): said by its name
    if named is not None and named not in (DEFAULT_LIMITS.formats or ()):
        return (f"not an image file of an accepted format (its name says {named}; accepted: "
                f"{', '.join(sorted(DEFAULT_LIMITS.formats or ()))})")
    return "not an image file"


def path_text(name: str) -> str:
    """A file name as text every database, driver and JSON reader can hold: bytes that are not UTF-8 (a name
    written under another code page) are spelt as ``\\xNN`` escapes, not as the lone surrogates Python reads
    them as, which have no UTF-8 form and made the record (or a whole archive's re-scoring) fail. A surrogate that
    stands for no byte (a hand-edited JSON file's) is spelt as its own escape."""
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def as_text(value: Any) -> Any:
    """``value`` (parsed JSON) with every string passed through :func:`path_text`: for what was saved with lone
    surrogates before names were made text."""
    if isinstance(value, str):
        return path_text(value)
    if isinstance(value, list):
        return [as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: as_text(v) for k, v in value.items()}
    return value


def _walk(root: Path, unreadable: list[Path]) -> Iterator[Path]:
    """Every file and link under ``root``, hidden folders passed over and links to folders followed, each real
    folder once (a link back up the tree is no loop). ``Path.rglob`` follows no link: a day's photos linked into
    the folder were neither read nor reported. A folder that cannot be listed goes into ``unreadable``: os.walk
    passes over it unsaid, and an archive's folder of another user's (mode 700) was left out of a re-scoring whose
    counts and exit code said nothing of it."""
    seen = {os.path.realpath(root)}
    for top, folders, files in os.walk(root, followlinks=True, onerror=lambda exc: unreadable.append(
            Path(exc.filename) if exc.filename is not None else root)):
        kept = []
        for name in sorted(folders, key=lambda n: (os.path.islink(os.path.join(top, n)), n)):  # real ones first
            real = os.path.realpath(os.path.join(top, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        folders[:] = kept
        yield from (Path(top) / name for name in files)


def list_images(paths: list[Path] | list[str] | Path | str, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """Expand files and directories into image paths, sorted; returns ``(images, skipped_non_images)``.

    A directory contributes the files whose extension is an image format; everything else in it (other files,
    subfolders when not ``recursive``, folders that cannot be listed when it is, links to nothing) is returned as
    skipped so the caller can report it (:func:`skip_reason`). Hidden entries (a leading dot) are passed over unsaid,
    and so is everything under a hidden folder when ``recursive``: a file manager's trash (``.Trash-1000``), a NAS's
    thumbnails (``.@__thumb``) hold copies and deleted photos, not parts to judge. An explicitly named file or folder
    is always taken.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    images: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            unreadable: list[Path] = []
            entries = sorted(_walk(p, unreadable) if recursive else p.iterdir())
            skipped += sorted(unreadable)
            for f in entries:
                if f.name.startswith("."):
                    continue
                if f.is_file():
                    (images if f.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(f)
                elif not recursive or not f.is_dir():  # a subfolder not searched, a link to nothing
                    skipped.append(f)
        elif p.is_file():
            images.append(p)
        else:
            from .spellings import spelling_hint

            raise ImageLoadError(f"{p}: no such file or directory{spelling_hint(p)}", "missing")
    return images, skipped
