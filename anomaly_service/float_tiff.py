"""Float colour TIFFs, which Pillow does not open: RGB (or RGBA) pages of 16-, 32- or 64-bit floating-point samples.

Why: image-processing software (a flat-field correction, an HDR merge, a radiometric pipeline) writes its colour
results as float TIFFs. Pillow holds floats in one channel only (mode ``F``), so it refuses such a file outright and
the service answered 415, while the same pipeline's grey output was scored. A float colour photo is now read as a
float grey one is (images.py): the photo's own range, the same for its three channels, is stretched to 8 bits.

How, without a second TIFF decoder exposed to uploads: the page's tags are read with Pillow's tag reader, and each
band of its strips or tiles is described to Pillow again as what its bytes also are, rows of 8-bit grey samples as
many bytes wide as the page's rows. Pillow (libtiff, for a compressed page) decompresses them as it would the page
itself, never past the size the band declares; numpy then reads the bytes as floats, undoing the floating-point
predictor (which reorders each row's bytes: libtiff would undo it for the page, not for the grey band).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, TiffImagePlugin

# the TIFF tags read here, by their numbers in the TIFF specification
_SUBFILE, _WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC = 254, 256, 257, 258, 259, 262
_STRIP_OFFSETS, _ORIENTATION, _SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS = 273, 274, 277, 278, 279
_PLANAR, _PREDICTOR, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = 284, 317, 322, 323, 324, 325
_EXTRA_SAMPLES, _SAMPLE_FORMAT = 338, 339
_RGB, _IEEE_FLOAT, _SEPARATE_PLANES = 2, 3, 2
_NO_PREDICTOR, _FLOAT_PREDICTOR = 1, 3
_UNASSOCIATED_ALPHA = 2  # ExtraSamples: a colour not yet multiplied by its alpha
# a band of a page is at most this many bytes (unless one strip or tile is larger): described to Pillow, far below
# its decompression-bomb warning, and a large page is read a band at a time rather than copied whole first
BAND_BYTES = 1 << 24


def is_tiff(head: bytes) -> bool:
    """Whether ``head`` starts a classic TIFF (either byte order)."""
    return head[:4] in (b"II*\0", b"MM\0*")


@dataclass(frozen=True)
class FloatColourPage:
    """A float colour page, its tags read and no pixel decoded."""

    tags: dict[int, tuple[int, ...]]
    prefix: bytes  # the file's byte order, b"II" or b"MM"

    def tag(self, tag: int, default: int | None = None) -> int:
        """The tag's (first) value; ``default`` where the page has none (without one: ValueError)."""
        values = self.tags.get(tag)
        if not values:
            if default is None:
                raise ValueError(f"the page has no tag {tag}")
            return default
        return int(values[0])

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as Pillow gives an image's size."""
        return self.tag(_WIDTH), self.tag(_LENGTH)

    @property
    def orientation(self) -> int:
        """Its orientation tag (1 to 8), as Pillow's EXIF turn reads a TIFF's (any other value: as stored)."""
        turn = self.tag(_ORIENTATION, 1)
        return turn if turn in range(1, 9) else 1


def _values(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, tuple) else (value,)
    return tuple(int(v) for v in values if isinstance(v, (int, float)))


def pages(fp: BinaryIO, most: int) -> tuple[bytes, list[dict[int, tuple[int, ...]]]] | None:
    """The byte order (b"II" or b"MM") and the tags of the first ``most`` pages of the classic TIFF in ``fp`` (read
    from its start, left where it was); None when it is not one. The list ends at the first page that does not
    read."""
    was = fp.tell()
    try:
        fp.seek(0)
        head = fp.read(8)
        if len(head) < 8 or not is_tiff(head):
            return None
        order = "<" if head[:2] == b"II" else ">"
        offset = struct.unpack(order + "L", head[4:8])[0]
        found: list[dict[int, tuple[int, ...]]] = []
        seen: set[int] = set()
        while offset and offset not in seen and len(found) < most:
            seen.add(offset)  # a directory that points back at an earlier one ends the list
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head)
            try:
                fp.seek(offset)
                ifd.load(fp)
            except (OSError, ValueError, struct.error):
                break
            tags: dict[int, tuple[int, ...]] = {}
            for tag in list(ifd.keys()):
                try:
                    tags[tag] = _values(ifd[tag])
                except Exception:  # noqa: BLE001 - a value Pillow's reader cannot parse is read as absent, as it does
                    continue
            found.append(tags)
            offset = ifd.next
        return head[:2], found
    finally:
        fp.seek(was)


def float_colour(tags: dict[int, tuple[int, ...]], prefix: bytes) -> FloatColourPage | None:
    """The page of ``tags`` when it holds float colour samples (RGB, optionally with an extra sample such as alpha,
    16, 32 or 64 bits each); None otherwise."""
    page = FloatColourPage(tags, prefix)
    formats, bits = tags.get(_SAMPLE_FORMAT, ()), tags.get(_BITS, ())
    try:
        samples = page.tag(_SAMPLES, 1)
        colour = page.tag(_PHOTOMETRIC) == _RGB and samples in (3, 4)
        if not colour or set(formats) != {_IEEE_FLOAT} or len(set(bits)) != 1 or bits[0] not in (16, 32, 64):
            return None
        page.size  # noqa: B018 - a page without its size is no photo
    except ValueError:
        return None
    return page


def decode(fp: BinaryIO, page: FloatColourPage) -> np.ndarray:
    """The samples of ``page`` of the TIFF in ``fp``, ``(height, width, samples)``, floats of the page's own precision
    (a float64 copy of a float32 page would double what it holds). Raises ValueError or
    OSError for a page whose layout or data does not hold together, as Pillow does for a broken file."""
    width, height = page.size
    samples = page.tag(_SAMPLES)
    nbytes = page.tag(_BITS) // 8
    planes = samples if page.tag(_PLANAR, 1) == _SEPARATE_PLANES else 1
    per_plane = samples // planes  # samples a pixel in each plane
    predictor = page.tag(_PREDICTOR, _NO_PREDICTOR)
    if predictor not in (_NO_PREDICTOR, _FLOAT_PREDICTOR):
        raise ValueError(f"predictor {predictor} is not one for float samples")
    tiled = _TILE_WIDTH in page.tags
    if tiled:
        seg_w, seg_h = page.tag(_TILE_WIDTH), page.tag(_TILE_LENGTH)
        offsets, counts = page.tags.get(_TILE_OFFSETS, ()), page.tags.get(_TILE_COUNTS, ())
    else:
        seg_w, seg_h = width, min(page.tag(_ROWS_PER_STRIP, height), height)
        offsets, counts = page.tags.get(_STRIP_OFFSETS, ()), page.tags.get(_STRIP_COUNTS, ())
    if min(width, height, seg_w, seg_h) <= 0:
        raise ValueError("its strips or tiles have no size")
    across, down = -(-width // seg_w), -(-height // seg_h)
    if len(offsets) != len(counts) or len(offsets) != across * down * planes:
        raise ValueError("its strips or tiles do not cover the page")
    seg_bytes = seg_w * per_plane * nbytes  # a row of one strip or tile
    row_bytes = across * seg_bytes
    compressed = page.tag(_COMPRESSION, 1) != 1
    limit = Image.MAX_IMAGE_PIXELS
    if compressed and limit is not None and seg_bytes * seg_h > limit:
        raise ValueError(f"a compressed strip or tile of {seg_bytes * seg_h} bytes is more than is decoded at once "
                         f"({limit}): write the file in strips of fewer rows, or uncompressed")
    band_rows = max(1, BAND_BYTES // (row_bytes * seg_h))  # rows of strips or tiles a band holds
    size = fp.seek(0, io.SEEK_END)
    # each band is written into the page as it is read: the bands gathered first, joined, then joined across planes
    # and cast to float64 held four copies of the page at once, and a compressed page of few bytes may declare a
    # large one
    out = np.empty((height, width, samples), np.dtype(f"f{nbytes}"))
    for plane in range(planes):
        for first in range(0, down, band_rows):
            last = min(down, first + band_rows)
            ids = [plane * across * down + r * across + c for r in range(first, last) for c in range(across)]
            rows = (min(last * seg_h, height) if not tiled else last * seg_h) - first * seg_h
            segments = [_read(fp, offsets[i], counts[i], size) for i in ids]
            if compressed:
                raw = _grey_band(page, row_bytes, rows, seg_bytes if tiled else None, seg_h, segments)
            else:
                raw = _raw_band(segments, rows, seg_h, seg_bytes, across)
            del segments
            if predictor == _FLOAT_PREDICTOR:
                values = _undo_float_predictor(raw, across, nbytes, per_plane)
            else:
                values = raw.view(np.dtype((">" if page.prefix == b"MM" else "<") + f"f{nbytes}"))
            top = first * seg_h
            take = min(rows, height - top)  # a tile's rows below the page are cut off
            out[top:top + take, :, plane * per_plane:(plane + 1) * per_plane] = \
                values.reshape(rows, across * seg_w, per_plane)[:take, :width]
    return out


def _read(fp: BinaryIO, offset: int, count: int, size: int) -> bytes:
    if offset + count > size:  # checked first: a count forged to gigabytes is not allocated
        raise ValueError("a strip or tile runs past the end of the file")
    fp.seek(offset)
    return fp.read(count)


def _raw_band(segments: list[bytes], rows: int, seg_h: int, seg_bytes: int, across: int) -> np.ndarray:
    """Uncompressed strips or tiles (``across`` a row of them) laid out as the band's ``rows`` rows of bytes."""
    need = [min(seg_h, rows - (i // across) * seg_h) * seg_bytes for i in range(len(segments))]
    if any(len(seg) < n for seg, n in zip(segments, need)):
        raise ValueError("a strip or tile holds fewer bytes than its rows")
    if across == 1:
        return np.frombuffer(b"".join(seg[:n] for seg, n in zip(segments, need)), np.uint8).reshape(rows, seg_bytes)
    tiles = np.frombuffer(b"".join(seg[:seg_h * seg_bytes] for seg in segments), np.uint8)
    grid = tiles.reshape(rows // seg_h, across, seg_h, seg_bytes).transpose(0, 2, 1, 3)
    return grid.reshape(rows, across * seg_bytes)


def _grey_band(page: FloatColourPage, row_bytes: int, height: int, tile_bytes: int | None, seg_h: int,
               segments: list[bytes]) -> np.ndarray:
    """One band's segments decoded by Pillow as an 8-bit grey page ``row_bytes`` wide and ``height`` tall (tiled
    ``tile_bytes`` wide when given), with the page's compression: its bytes, ``(height, row_bytes)`` uint8."""
    tags = {_WIDTH: row_bytes, _LENGTH: height, _BITS: 8, _COMPRESSION: page.tag(_COMPRESSION, 1),
            _PHOTOMETRIC: 1, _SAMPLES: 1, _PLANAR: 1}
    if tile_bytes is not None:
        tags.update({_TILE_WIDTH: tile_bytes, _TILE_LENGTH: seg_h})
    else:
        tags[_ROWS_PER_STRIP] = seg_h
    with Image.open(io.BytesIO(_tiff(page.prefix, tags, segments, tile_bytes is not None))) as img:
        if img.mode != "L" or img.size != (row_bytes, height):
            raise ValueError("its strips or tiles do not read as the page declares")
        img.load()
        return np.asarray(img, dtype=np.uint8)


def _tiff(prefix: bytes, tags: dict[int, int], segments: list[bytes], tiled: bool) -> bytes:
    """A one-page classic TIFF holding ``segments``, described by ``tags`` (each one LONG) and their offsets and
    byte counts."""
    order = "<" if prefix == b"II" else ">"
    offsets, at = [], 8
    for seg in segments:
        offsets.append(at)
        at += len(seg)
    body = b"".join(segments)
    ifd_at = 8 + len(body) + (len(body) & 1)  # a directory starts on a word boundary
    entries = {k: (v,) for k, v in tags.items()}
    entries[_TILE_OFFSETS if tiled else _STRIP_OFFSETS] = tuple(offsets)
    entries[_TILE_COUNTS if tiled else _STRIP_COUNTS] = tuple(len(s) for s in segments)
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    directory, extra = [struct.pack(order + "H", len(entries))], []
    for tag in sorted(entries):
        values = entries[tag]
        packed = struct.pack(order + "L" * len(values), *values)
        if len(values) == 1:
            directory.append(struct.pack(order + "HHL", tag, 4, 1) + packed)
        else:
            directory.append(struct.pack(order + "HHLL", tag, 4, len(values), extra_at))
            extra.append(packed)
            extra_at += len(packed)
    directory.append(struct.pack(order + "L", 0))
    head = prefix + struct.pack(order + "HL", 42, ifd_at)
    return head + body + b"\0" * (len(body) & 1) + b"".join(directory) + b"".join(extra)


def _undo_float_predictor(raw: np.ndarray, across: int, nbytes: int, stride: int) -> np.ndarray:
    """The float samples of rows coded with TIFF's floating-point predictor, as big-endian floats: in each row of a
    strip or tile, its samples' bytes grouped by significance (the most significant first), each byte then the
    difference from the byte ``stride`` before it (libtiff's fpDiff)."""
    rows, row_bytes = raw.shape
    seg_bytes = row_bytes // across
    summed = raw.reshape(rows, across, seg_bytes // stride, stride).cumsum(axis=2, dtype=np.uint8)
    grouped = summed.reshape(rows, across, nbytes, seg_bytes // nbytes)
    ordered = np.ascontiguousarray(grouped.transpose(0, 1, 3, 2)).reshape(rows, row_bytes)
    return ordered.view(np.dtype(f">f{nbytes}"))


def unassociated_alpha(page: FloatColourPage) -> bool:
    """Whether the page's fourth sample is an alpha its colours are not yet multiplied by (an associated alpha is in
    them already, and any other extra sample means nothing to a photo's look)."""
    return page.tag(_SAMPLES) == 4 and page.tag(_EXTRA_SAMPLES, 0) == _UNASSOCIATED_ALPHA
