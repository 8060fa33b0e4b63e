"""What the library's methods take as a set of images: a sequence of images, or a folder of them.

``fit``, ``score_many`` and ``update`` iterate what they are given. A folder named by a string was iterated
character by character (each "skipped" as a missing file), a ``Path`` or ``None`` failed deep in the image reader
with a bare ``TypeError``, and one image given alone was iterated row by row. Each is told here, once, in the
product's own errors; a folder is read as the CLI reads ``--normal-dir`` (its image files, sorted by name).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageLoadError
from .images import ImageInput, list_images, skip_reason

log = logging.getLogger(__name__)


def image_set(images: Sequence[ImageInput] | str | Path, names: Sequence[str] | None = None,
              what: str = "images") -> tuple[Sequence[ImageInput], Sequence[str] | None]:
    """``images`` as a sequence of single images with ``names`` checked against it. A ``str`` or ``Path`` is a
    folder, read for its image files (others are skipped with a warning); ``what`` names the argument in errors."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            kind = "missing" if not folder.exists() else "not_image"
            raise ImageLoadError(f"{what}: {folder} is not a folder; give a folder of images or a list of images "
                                 "(one image alone: a list of one)", kind)
        if names is not None:
            raise ConfigError(f"{what}: names go with a list of images, not with a folder (its files name them)")
        found, skipped = list_images(folder)
        for s in skipped:
            log.warning("skipping %s: %s", s, skip_reason(s))
        return found, None
    if isinstance(images, (bytes, bytearray, memoryview, Image.Image)) or (
            isinstance(images, np.ndarray) and (images.ndim < 3 or images.ndim == 3 and images.shape[2] in (1, 3, 4))):
        raise ImageLoadError(f"{what}: one image was given where a list of images is expected; wrap it in a list "
                             "(a stack of images as one array is N x H x W or N x H x W x C)", "not_image")
    if not isinstance(images, Iterable):
        raise ImageLoadError(f"{what}: {type(images).__name__} is neither a list of images nor a folder",
                             "not_image")
    if names is None:
        return images, None
    if isinstance(names, str):
        raise ConfigError(f"{what}: names is one string; give one name per image")
    images, names = list(images), list(names)
    if len(names) != len(images):
        raise ConfigError(f"{what}: {len(names)} name(s) for {len(images)} image(s); give one name per image")
    return images, names
