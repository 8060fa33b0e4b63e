"""How many bits of a 16-bit grey photo carry the picture, decided once per model from its good images.

Why: mono line cameras give 10, 12 or 14 bits a pixel, and their software stores them in 16-bit PNG or TIFF files,
often as they came (a 12-bit camera's white is 4095, not 65535). Read against 16 bits such a photo decodes to the
bottom sixteenth of the grey scale: a few dark levels, in which a faint defect vanishes. Stretching each photo to its
own range would hide what the line must see (a dimmer lamp, a darker part), so the model takes one white for every
photo: the fewest bits a camera stores (:data:`DEPTHS`) that hold every good image's values, or the depth the user
gives. The fit records it (``preprocessing.bit_depth``), and every photo scored, shown or learnt for that model is
decoded with it (:attr:`~anomaly_service.images.ImageLimits.bit_depth`); a value above it decodes as white.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageLoadError
from .images import ImageInput, ImageLimits, declared_shape, sixteen_bit
from .progress import progress_bar
from .training_set import input_name

log = logging.getLogger(__name__)

# the sample depths line cameras store (GenICam's Mono8 ... Mono16); a set whose largest value needs 11 bits is a
# 12-bit camera's, however bright its photos were
DEPTHS = (8, 10, 12, 14, 16)


def bits_needed(source: ImageInput) -> int | None:
    """The fewest of :data:`DEPTHS` that hold ``source``'s values, for a 16-bit grey image (a file, its bytes, a
    Pillow image or a ``uint16`` array); None for any other (its depth is its own)."""
    if isinstance(source, np.ndarray):
        values = source if source.dtype == np.uint16 else None
    elif isinstance(source, Image.Image):
        values = np.asarray(source) if sixteen_bit(source) else None
    else:  # a path, or bytes-like as load_image reads it (bytes, bytearray, memoryview)
        try:
            with Image.open(source if isinstance(source, (str, Path)) else io.BytesIO(bytes(source))) as img:
                values = np.asarray(img) if sixteen_bit(img) else None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot read image ({exc})") from None
    if values is None or values.size == 0:
        return None
    top = int(values.max())
    return next(d for d in DEPTHS if top < 2**d)


def resolve(option: str, sources: Sequence[ImageInput], progress: bool = False,
            names: Sequence[str] | None = None) -> int | None:
    """The bit depth a fit records: ``option`` as given ("8" ... "16"), or for "auto" the fewest bits that hold every
    16-bit grey image among ``sources`` (None when there is none: every image keeps its own depth). Only the 16-bit
    images' headers are opened twice; an image that does not read is left to the fit to report. A depth given below
    what a good image holds is refused, as an update refuses such an image: it would be learnt clipped to white."""
    given = None if option == "auto" else int(option)
    if given == 16:  # nothing is above 16-bit white: no image needs reading
        return given
    depth: int | None = None
    clipped: list[str] = []
    with progress_bar(progress and len(sources) > 1, total=len(sources), desc="reading bit depth",
                      unit="img") as bar:
        for i, src in enumerate(sources):
            try:
                bits = bits_needed(src)
            except ImageLoadError:
                bits = None
            if bits is not None:
                depth = bits if depth is None else max(depth, bits)
                if given is not None and bits > given:
                    clipped.append(input_name(src, i, names))
            bar.update(1)
    if clipped:
        raise ConfigError(f"--bit-depth {given}: {len(clipped)} good image(s) hold values above its white "
                          f"({2**given - 1}) and would be learnt clipped to white ({', '.join(clipped[:5])}"
                          f"{', ...' if len(clipped) > 5 else ''}); they need {depth} bits: give --bit-depth "
                          f"{depth}, or auto")
    if given is not None:
        return given
    if depth is not None and depth < 16:
        log.info("16-bit grey images whose values fit in %d bits: read with %d as white (--bit-depth)", depth,
                 2**depth - 1)
    return depth


def described(depth: int) -> str:
    """How a model reads 16-bit grey photos, for a person (fit's and info's output)."""
    return f"read as {depth}-bit: {2**depth - 1} is white"


def with_depth(limits: ImageLimits, depth: int | None) -> ImageLimits:
    """``limits`` decoding 16-bit grey images with ``depth`` bits."""
    return limits if limits.bit_depth == depth else replace(limits, bit_depth=depth)


def above_white(sources: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits) -> list[str]:
    """The names of the 16-bit grey images among ``sources`` holding a value above ``limits``' white. Decoded, they
    would read clipped to white: fine for a photo scored (it does not look like the good ones), wrong for one an
    update learns as good. Only images whose header passes ``limits`` are decoded here; the others, and those that
    do not read, are left to decoding to report."""
    if limits.bit_depth is None or limits.bit_depth >= 16:
        return []
    out = []
    for i, src in enumerate(sources):
        try:
            declared_shape(src, limits)
            bits = bits_needed(src)
        except ImageLoadError:
            continue
        if bits is not None and bits > limits.bit_depth:
            out.append(input_name(src, i, names))
    return out
