"""The good images of a fit, read lazily: their sizes from the headers first, their pixels one batch at a time.

A fit used to decode every image before it started; ten thousand 5-megapixel photos are 150 GB of pixels. The fit
needs only the sizes up front (to fix the scale and batch images of one working size together), and each image's
pixels once, while it passes through the backbone (its patches, digest and thumbnail are taken then). A few
steps look at pixels again (held-out calibration images, the sample ``--mask auto`` learns from) and decode them
again: a handful, not all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

import numpy as np

from .errors import ImageLoadError
from .images import DEFAULT_LIMITS, ImageInput, ImageLimits, decode_each, declared_shape, load_image, path_text
from .progress import progress_bar

log = logging.getLogger(__name__)


def pixel_digest(image: np.ndarray) -> str:
    """SHA-256 of an image's decoded pixels and shape: the provenance the manifest and the catalog keep, and what a
    record keeps of a photo whose picture is kept. The pixels are hashed where they lie (a contiguous view; the same
    bytes as ``tobytes()``), not copied first: the records' writer hashes every kept photo."""
    h = hashlib.sha256(np.ascontiguousarray(image).reshape(-1).view(np.uint8))
    h.update(str(image.shape).encode())
    return h.hexdigest()


def hash_inputs(digests: list[str]) -> str:
    """One digest of a set of images (the manifest's ``images_sha256``), whatever their order."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Repeat:
    """A good image whose decoded pixels are byte-identical to an earlier one's (``of``). It is left out of the bank
    and of the calibration: the bank keeps one copy's patches, so leave-one-out scores the copy whose patches it
    kept against nothing like it, and that score alone can set a threshold every defect passes."""

    name: str
    of: str
    digest: str
    known: bool = False  # ``of`` is an image the model had before (FirstCopies' ``known``), not one given with it

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "of": self.of}

    def __str__(self) -> str:
        """For messages. A part offered again under its own name (an inspection an earlier update added, a folder
        given again) would otherwise read ``A repeats A``, as if the image were its own duplicate."""
        if self.name != self.of:
            return f"{self.name} repeats {self.of}"
        return f"{self.name} is in the model already" if self.known else f"{self.name} is given twice"


class FirstCopies:
    """The first image of each pixel digest, by name; every later one is recorded as a :class:`Repeat`. ``known``:
    ``(name, digest)`` of images already kept (an update's model's)."""

    def __init__(self, known: Iterable[tuple[str, str]] = ()):
        self.first: dict[str, str] = {}  # digest -> the name of the image kept
        for name, digest in known:
            self.first.setdefault(digest, name)
        self.known = set(self.first)  # digests of the images kept before any was given
        self.repeats: list[Repeat] = []

    def keep(self, name: str, digest: str) -> bool:
        """Whether the image ``name`` is the first with these pixels (and is kept); if not, it is a repeat."""
        first = self.first.get(digest)
        if first is None:
            self.first[digest] = name
            return True
        self.repeats.append(Repeat(name, first, digest, digest in self.known))
        return False

    def listing(self, limit: int | None = None) -> str:
        """``b.png repeats a.png; ...``: for messages; ``limit``: name at most that many (:func:`listing`)."""
        return listing(self.repeats, limit)


# names an error or warning line lists before it counts the rest: a folder of one photo copied many times made a
# one-line error of every copy's path
LISTED_NAMES = 5


def listing(items: Iterable[object], limit: int | None = None) -> str:
    """``b.png repeats a.png; ...``: names (images, repeats, a database's tables) in one line, for messages; with
    ``limit``, the first ``limit`` and how many more."""
    said = list(map(str, items))
    if limit is None or len(said) <= limit:
        return "; ".join(said)
    return "; ".join(said[:limit]) + f"; and {len(said) - limit} more"


def input_name(source: ImageInput, i: int, names: Sequence[str] | None, what: str = "image") -> str:
    """How input ``i`` is named in messages and the manifest: the name given, else its path, else ``what[i]``; as
    text JSON can carry (a file name in another code page spelt with escapes, not as lone surrogates)."""
    if names is not None:
        return path_text(names[i])
    return path_text(str(source)) if isinstance(source, (str, Path)) else f"{what}[{i}]"


def _readable(images: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits, progress: bool,
              what: str, skipped: list[str]
              ) -> Iterator[tuple[ImageInput, str, np.ndarray, tuple[str, ...], int | None]]:
    """Each of ``images`` that decodes, with its name, pixels, what decoding it said (which frame of a file of
    several was read) and its file's JPEG quality (None: unknown), one at a time; one that does not is skipped
    with a log and its reason appended to ``skipped``."""
    named = [input_name(src, i, names, what) for i, src in enumerate(images)]

    def skip(_: int, exc: ImageLoadError) -> None:
        log.warning("skipped: %s", exc)
        skipped.append(str(exc))

    # none given (an update without known defects): no bar, which logged "loading: 0img" on every update
    bar = progress_bar(progress and len(images) > 0, images, desc="loading", unit="img")
    for i, decoded in decode_each(bar, limits, named, skip):
        yield images[i], named[i], decoded.array, tuple(decoded.warnings), decoded.jpeg_quality


def load_inputs(images: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits, progress: bool,
                what: str = "image", notes: list[tuple[str, ...]] | None = None,
                qualities: list[int | None] | None = None) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """Decoded images, their pixel digests (provenance in the manifest) and names; unreadable ones are skipped
    with a log and returned as the last list. For the few images an update adds, which are all decoded at once.
    ``notes``, when given, gets what decoding said of each kept image: the pixels alone no longer tell which frame
    of a file of several was read, which the update's answer says; ``qualities`` each one's JPEG quality."""
    arrays, digests, kept, skipped = [], [], [], []
    for _, name, arr, said, quality in _readable(images, names, limits, progress, what, skipped):
        if notes is not None:
            notes.append(said)
        if qualities is not None:
            qualities.append(quality)
        arrays.append(arr)
        digests.append(pixel_digest(arr))
        kept.append(name)
    return arrays, digests, kept, skipped


def digest_inputs(images: Sequence[ImageInput], names: Sequence[str] | None, limits: ImageLimits, progress: bool,
                  what: str = "image") -> tuple[list[ImageInput], list[str], list[str]]:
    """The readable ones of ``images`` with their pixel digests and names, each decoded and let go: for inputs that
    can be many (every defect the records hold), which their user reads again a few at a time. Unreadable ones are
    skipped with a log, as :func:`load_inputs` skips them."""
    sources, digests, kept = [], [], []
    for src, name, arr, _, _ in _readable(images, names, limits, progress, what, []):
        sources.append(src)
        digests.append(pixel_digest(arr))
        kept.append(name)
    return sources, digests, kept


class TrainingImages(Sequence[np.ndarray]):
    """Images whose headers read, with their names and ``(height, width)``; indexing decodes (a slice decodes
    each image in it). Images whose header cannot be read are left out and listed in ``skipped``."""

    def __init__(self, sources: Sequence[ImageInput], names: Sequence[str] | None = None,
                 limits: ImageLimits = DEFAULT_LIMITS, what: str = "image"):
        self.limits = limits
        self.sources: list[ImageInput] = []
        self.names: list[str] = []
        self.shapes: list[tuple[int, int]] = []
        self.skipped: list[str] = []
        for i, src in enumerate(sources):
            name = input_name(src, i, names, what)
            try:
                shape = declared_shape(src, limits, name)
            except ImageLoadError as exc:
                self.skip(str(exc))
                continue
            self.sources.append(src)
            self.names.append(name)
            self.shapes.append(shape)

    def skip(self, reason: str) -> None:
        log.warning("skipped: %s", reason)
        self.skipped.append(reason)

    def __len__(self) -> int:
        return len(self.sources)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):  # those that decode
            return self.decoded(range(*i.indices(len(self))))[1]
        return load_image(self.sources[i], self.limits, name=self.names[i])

    def decoded(self, ids: Sequence[int]) -> tuple[list[int], list[np.ndarray]]:
        """The images ``ids`` that decode, and their pixels; the others are skipped with their reason."""
        kept, arrays = [], []
        for i in ids:
            try:
                arrays.append(self[i])
            except ImageLoadError as exc:
                self.skip(str(exc))
                continue
            kept.append(i)
        return kept, arrays

    def subset(self, ids: Sequence[int]) -> "TrainingImages":
        """A view of the images ``ids``, in that order (nothing decoded)."""
        out = TrainingImages.__new__(TrainingImages)
        out.limits, out.skipped = self.limits, self.skipped
        out.sources = [self.sources[i] for i in ids]
        out.names = [self.names[i] for i in ids]
        out.shapes = [self.shapes[i] for i in ids]
        return out
