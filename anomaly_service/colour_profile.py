"""A photo's embedded colour profile: its values read as sRGB.

A JPEG, PNG or TIFF may carry an ICC profile that says what its numbers mean (a camera set to Adobe RGB, a phone's
Display P3). A viewer converts them to the screen's colours; read as they are stored, the same scene saved in
another colour space is other numbers, paler or more saturated, and a model fitted on one scores the other as
anomalous (or learns it). So a model that records it (manifest ``preprocessing.colour_profile: srgb``) reads every
8-bit colour photo that carries a profile as sRGB, through littlecms (Pillow's ImageCms, which ships with Pillow's
wheels): the same colours whatever space they were saved in. A photo with no profile is taken as sRGB, the web's
and every camera SDK's convention. Grey, palette and 16-bit photos keep their values: Pillow's colour management
has no 16-bit colour mode, and a grey profile is a tone curve that a mono camera does not write.

A profile is read once per distinct profile (its digest is the key: a JPEG's profile may be megabytes): an sRGB
one (every camera's default, written by many makers in slightly different bytes) is found to change no colour of a
grid by more than a level, and is then passed over at no cost per photo.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

# the colour modes converted: 8-bit RGB with or without alpha (the alpha is kept)
CONVERTED_MODES = ("RGB", "RGBA")
# a profile whose conversion moves no colour of the grid by more than this many levels is taken as sRGB itself
SAME_AS_SRGB_LEVELS = 1
# the grid of colours that tells an sRGB profile: every channel at 16 levels, 0 to 255
_GRID_STEP = 17
# a profile whose conversion leaves fewer of the grid's colours distinct than this share is taken as broken: a zeroed
# tone curve or colorant (a tag a writer left empty) turns every photo into a few flat colours, which littlecms
# converts without a word; the widest real gamut clipped into sRGB keeps most of them apart
MIN_DISTINCT_SHARE = 1 / 8
# distinct profiles whose conversion is kept: a line has one or two cameras
KEPT_PROFILES = 16

_lock = threading.Lock()
# the profile's SHA-256 -> {mode: transform}, None (sRGB) or the ProfileError it raised; not its bytes, which a
# photo may make megabytes long and distinct, held until other profiles pushed them out
_kept: OrderedDict[bytes, dict[str, object] | ProfileError | None] = OrderedDict()


class ProfileError(ValueError):
    """An embedded colour profile that littlecms cannot read or convert from."""


def _grid() -> Image.Image:
    levels = np.arange(0, 256, _GRID_STEP, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    side = int(np.sqrt(len(cube)))
    return Image.fromarray(cube.reshape(side, side, 3), "RGB")


def _transforms(profile: bytes) -> dict[str, object] | None:
    """The conversions of ``profile`` to sRGB per mode, or None when it is sRGB already (within a level)."""
    from PIL import features

    # a Pillow built from source without littlecms (a distribution's or a conda build, an Alpine image without
    # lcms2) has ImageCms but not its extension, and its first use raised ImportError, out of every such photo
    if not features.check_module("littlecms2"):
        raise ProfileError("this Pillow was built without littlecms, which ImageCms needs to convert it")
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if source.profile.xcolor_space.strip() != "RGB":
            raise ProfileError(f"a {source.profile.xcolor_space.strip()} profile on a colour photo")
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        # NOCACHE: littlecms otherwise keeps the last pixel converted inside the transform, which decoding threads
        # converting at once would share
        made = {mode: ImageCms.buildTransform(source, srgb, mode, mode, flags=ImageCms.Flags.NOCACHE)
                for mode in CONVERTED_MODES}
        grid = _grid()
        converted = np.asarray(ImageCms.applyTransform(grid, made["RGB"]), dtype=np.int16)
        moved = np.abs(converted - np.asarray(grid, dtype=np.int16)).max()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        raise ProfileError(str(exc) or type(exc).__name__) from None
    kept = len(np.unique(converted.reshape(-1, 3), axis=0))
    if kept < MIN_DISTINCT_SHARE * grid.width * grid.height:
        raise ProfileError(f"it turns {grid.width * grid.height} distinct colours into {kept}: a broken profile")
    return None if moved <= SAME_AS_SRGB_LEVELS else made


def _conversion(profile: bytes, mode: str) -> object | None:
    key = hashlib.sha256(profile).digest()
    with _lock:
        found = _kept.get(key, _kept)
        if found is not _kept:
            _kept.move_to_end(key)
    if found is _kept:
        try:
            found = _transforms(profile)  # outside the lock: a new profile does not hold up the others' photos
        except ProfileError as exc:
            found = exc
        with _lock:
            _kept[key] = found
            while len(_kept) > KEPT_PROFILES:
                _kept.popitem(last=False)
    if isinstance(found, ProfileError):
        raise found
    return None if found is None else found[mode]  # type: ignore[index]


def torn_profile(img: Image.Image) -> str | None:
    """A note for the photo's warnings when ``img`` (opened, a JPEG) carries parts of a colour profile that Pillow
    could not put together (one of its APP2 markers missing or doubled: a file cut by a tool that keeps the first
    marker only). Pillow then drops the profile without a word, and the colours would be read as sRGB as if the
    camera had saved none. Read from the markers that Pillow keeps on the opened file, before any copy drops them."""
    if img.info.get("icc_profile") or img.mode not in CONVERTED_MODES:
        return None
    if any(marker == "APP2" and body.startswith(b"ICC_PROFILE\0") for marker, body in getattr(img, "applist", ())):
        return "its embedded colour profile is incomplete (a part of it is missing); its values were read as sRGB"
    return None


def as_srgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """``img`` (decoded) with its colours read as sRGB where it carries another colour profile, and a note for the
    photo's warnings when its profile could not be read (its values are then read as they are stored)."""
    profile = img.info.get("icc_profile")
    if not profile or img.mode not in CONVERTED_MODES:
        return img, None
    try:
        transform = _conversion(bytes(profile), img.mode)
    except ProfileError as exc:
        return img, f"its embedded colour profile could not be read ({exc}); its values were read as sRGB"
    if transform is None:
        return img, None
    from PIL import ImageCms

    return ImageCms.applyTransform(img, transform), None
