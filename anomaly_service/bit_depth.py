"""How many bits of a 16-bit photo carry the picture, decided once per model from its good images.

Why: line cameras give 10, 12 or 14 bits a pixel (a colour camera as many a channel), and their software stores them
in 16-bit PNG or TIFF files, often as they came (a 12-bit camera's white is 4095, not 65535). Read against 16 bits
such a photo decodes to the bottom sixteenth of the scale: a few dark levels, in which a faint defect vanishes.
Stretching each photo to its own range would hide what the line must see (a dimmer lamp, a darker part), so the model
takes one white for every photo: the fewest bits a camera stores (images.DEPTHS) that hold every good image's
values, or the depth the user gives. Grey and colour photos each get their own (a set may hold a mono and a colour
camera's). The fit records them (``preprocessing.bit_depth``, ``preprocessing.colour_bit_depth``), and every photo
scored, shown or learnt for that model is decoded with them (:class:`~anomaly_service.images.ImageLimits`); a value
above the white decodes as white. A model saved before the colour depth was kept reads a 16-bit colour photo as
Pillow does, each channel's top 8 bits, as it always did.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageLoadError
from .images import (BROKEN_FILE_ERRORS, ImageInput, ImageLimits, decodable_admitted, declared_shape, fewest_bits,
                     keyed, opened_admitted, opened_file, shown_values, sixteen_bit, sixteen_bit_colour)
from .preprocessing import CHANNELS
from .progress import progress_bar
from .training_set import input_name

log = logging.getLogger(__name__)


class Depths(NamedTuple):
    """The bits a model reads 16-bit photos with, grey and colour; None: that kind's reading before depths were
    kept (grey against 65535, colour as each channel's top 8 bits)."""

    grey: int | None
    colour: int | None


def _top_of(img: Image.Image, data: bytes | None = None, keys: bool = True) -> tuple[str, int] | None:
    """``(kind, largest value)`` of a 16-bit image opened and not yet decoded (``data``: its file, where at hand);
    None for any other. A colour image's channels are read as Pillow reads them, their top bytes: those alone say
    how many bits its values need. Where a transparency key's pixels read black (``keys``, as
    ``ImageLimits.transparency_keys``), their value is no camera's and is left out (images.shown_values)."""
    grey = sixteen_bit(img)
    if not grey and not sixteen_bit_colour(img):
        return None
    decodable_admitted(img)
    hidden = None
    if keys and keyed(img):
        img, hidden = shown_values(img, data)
    values = np.asarray(img) if grey else np.asarray(img)[:, :, :3]  # not an alpha channel: no camera's depth
    if hidden is not None:
        values = values[~hidden]
    if not values.size:
        return None
    return ("grey", int(values.max())) if grey else ("colour", (int(values.max()) << 8) | 0xFF)


def needed(source: ImageInput, keys: bool = True) -> tuple[str, int] | None:
    """``("grey" or "colour", the fewest of DEPTHS that hold its values)`` for a 16-bit image (a file, its bytes, a
    Pillow image or a ``uint16`` array, colour when it has several channels); None for any other (its depth is its
    own). ``keys``: whether a transparency key's pixels read black (:func:`_top_of`)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint16 or source.size == 0:
            return None
        colour = source.ndim == 3 and source.shape[2] > 1
        return ("colour" if colour else "grey"), fewest_bits(int((source[:, :, :3] if colour else source).max()))
    if isinstance(source, Image.Image):
        # measured on a copy opened from its file, where it has one: decoded here, the caller's image lost its
        # tiles, and a fit or an update then read a 16-bit colour photo as its top bytes, and a key at 8 bits
        data = opened_file(source) if sixteen_bit(source) or sixteen_bit_colour(source) else None
        if data is None:
            found = _top_of(source, keys=keys)
        else:
            try:
                with opened_admitted(data) as img:  # past Pillow's pixel limit too: held to ours when decoded
                    img.seek(source.tell())
                    found = _top_of(img, data, keys)
            except BROKEN_FILE_ERRORS as exc:
                raise ImageLoadError(f"cannot read image ({exc})") from None
    else:  # a path, or bytes-like as load_image reads it (bytes, bytearray, memoryview)
        data = None if isinstance(source, (str, Path)) else bytes(source)
        try:
            with contextlib.ExitStack() as held:  # opened past Pillow's pixel limit: held to ours when decoded
                img = held.enter_context(opened_admitted(io.BytesIO(data) if data is not None
                                                         else held.enter_context(open(source, "rb"))))
                found = _top_of(img, data, keys)
        except BROKEN_FILE_ERRORS as exc:
            raise ImageLoadError(f"cannot read image ({exc})") from None
    return None if found is None else (found[0], fewest_bits(found[1]))


def resolve(option: str, sources: Sequence[ImageInput], progress: bool = False,
            names: Sequence[str] | None = None) -> Depths:
    """The bit depths a fit records: ``option`` as given ("8" ... "16") for grey and colour photos alike, or for
    "auto" the fewest bits that hold every 16-bit grey image among ``sources``, and those that hold every 16-bit
    colour image (None where there is none: every image of that kind keeps its own depth). Only the 16-bit images'
    headers are opened twice; an image that does not read is left to the fit to report. A depth given below what a
    good image holds is refused, as an update refuses such an image: it would be learnt clipped to white."""
    given = None if option == "auto" else int(option)
    if given == 16:  # nothing is above 16-bit white: no image needs reading
        return Depths(given, given)
    found: dict[str, int] = {}
    clipped: list[str] = []
    with progress_bar(progress and len(sources) > 1, total=len(sources), desc="reading bit depth",
                      unit="img") as bar:
        for i, src in enumerate(sources):
            try:
                kind_bits = needed(src)
            except ImageLoadError:
                kind_bits = None
            if kind_bits is not None:
                kind, bits = kind_bits
                found[kind] = max(found.get(kind, bits), bits)
                if given is not None and bits > given:
                    clipped.append(input_name(src, i, names))
            bar.update(1)
    if clipped:
        depth = max(found.values())
        raise ConfigError(f"--bit-depth {given}: {len(clipped)} good image(s) hold values above its white "
                          f"({2**given - 1}) and would be learnt clipped to white ({', '.join(clipped[:5])}"
                          f"{', ...' if len(clipped) > 5 else ''}); they need {depth} bits: give --bit-depth "
                          f"{depth}, or auto")
    if given is not None:
        return Depths(given, given)
    for kind, depth in found.items():
        if depth < 16:
            log.info("16-bit %s images whose values fit in %d bits: read with %d as white (--bit-depth)", kind, depth,
                     2**depth - 1)
    return Depths(found.get("grey"), found.get("colour"))


def described(depth: int) -> str:
    """How a model reads 16-bit photos of one kind, for a person (fit's and info's output)."""
    return f"read as {depth}-bit: {2**depth - 1} is white"


def with_depth(limits: ImageLimits, depth: int | None, colour: int | None = None) -> ImageLimits:
    """``limits`` decoding 16-bit grey images with ``depth`` bits and 16-bit colour ones with ``colour``."""
    if (limits.bit_depth, limits.colour_bit_depth) == (depth, colour):
        return limits
    return replace(limits, bit_depth=depth, colour_bit_depth=colour)


def _depth_of(kind: str, limits: ImageLimits) -> int | None:
    return limits.bit_depth if kind == "grey" else limits.colour_bit_depth


def white_described(limits: ImageLimits) -> str:
    """The whites ``limits`` read 16-bit photos against, for a person: "12-bit white (4095)", or each kind's."""
    whites = {kind: depth for kind in CHANNELS if (depth := _depth_of(kind, limits)) is not None}
    if len(set(whites.values())) <= 1:
        depth = next(iter(whites.values()), 16)
        return f"{depth}-bit white ({2**depth - 1})"
    return " and ".join(f"{depth}-bit {kind} white ({2**depth - 1})" for kind, depth in whites.items())


def above_white(sources: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits) -> list[str]:
    """The names of the 16-bit images among ``sources`` holding a value above ``limits``' white for their kind.
    Decoded, they would read clipped to white: fine for a photo scored (it does not look like the good ones), wrong
    for one an update learns as good. Only images whose header passes ``limits`` are decoded here; the others, and
    those that do not read, are left to decoding to report."""
    if all(d is None or d >= 16 for d in (limits.bit_depth, limits.colour_bit_depth)):
        return []
    out = []
    for i, src in enumerate(sources):
        try:
            declared_shape(src, limits)
            found = needed(src, limits.transparency_keys)
        except ImageLoadError:
            continue
        if found is not None and (depth := _depth_of(found[0], limits)) is not None and found[1] > depth:
            out.append(input_name(src, i, names))
    return out
