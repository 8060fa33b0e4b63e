"""How hard a photo was JPEG-compressed, against the good photos a model was fitted on.

PatchCore's bank holds the good photos' patches down to their sensor noise. JPEG at a lower quality smooths that
noise into blocks: a model fitted on PNGs read good bottle photos re-saved as JPEGs as defects, with nothing said
(decisions.md, session 62), where kos's good photos, smooth already, were flagged no more as JPEGs. So the warning
goes with a flag only: it says why a flagged part may be good. The quality is read from the file's own
luminance table, as the IJG library scaled it, before any pixel is decoded (a TIFF compressed as JPEG, from the
tables its strips share); a photo of any other format counts as uncompressed, a lossy WebP too (its quantizer is
not on JPEG's scale)."""

from __future__ import annotations

import re
from typing import Any

from PIL import Image

# the IJG library's luminance table at quality 50, which its other qualities scale
STANDARD_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14,
                 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49,
                 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
UNCOMPRESSED = 100  # a PNG, TIFF, BMP: the pixels as the camera gave them, the best a JPEG's quality reads
JPEG_FORMATS = ("JPEG", "MPO")  # as Pillow names a JPEG file: an MPO is a JPEG with other pictures after it
# quality points below the good photos' lowest that scoring warns of: where bottle's good photos, fitted as PNGs,
# began to be flagged as JPEGs (decisions.md, session 62)
MARGIN = 10


def jpeg_quality(img: Image.Image) -> int | None:
    """The quality (1-100) an opened JPEG's luminance table was scaled from; :data:`UNCOMPRESSED` for another
    format; None for a JPEG without the table (or a PIL image made in memory, whose history is unknown)."""
    if img.format == "TIFF" and img.info.get("compression") in ("jpeg", "tiff_jpeg"):
        # a TIFF whose strips are JPEGs: it was read as uncompressed, a photo at quality 40 counted as a PNG is
        luma = _tiff_jpeg_luma(img)
    elif img.format not in JPEG_FORMATS:
        return UNCOMPRESSED if img.format else None
    else:
        tables: Any = getattr(img, "quantization", None)
        luma = tables.get(0) if tables else None
    if not luma:
        return None
    total = sum(luma)
    return min(LUMA_SUMS, key=lambda q: abs(LUMA_SUMS[q] - total))


def _tiff_jpeg_luma(img: Image.Image) -> list[int] | None:
    """The luminance table of a TIFF page compressed as JPEG, from its JPEGTables tag (the tables its strips share;
    the order of the entries does not matter to their sum); None where the tag is absent (the tables inside each
    strip, or the old-style JPEG compression) or holds no table 0: its quality is unknown."""
    tag = getattr(img, "tag_v2", None)
    data = tag.get(347) if tag is not None else None
    if not isinstance(data, bytes):
        return None
    i = 2 if data[:2] == b"\xff\xd8" else 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if data[i + 1] == 0xDB:  # DQT: tables of 64 entries, of 8 or 16 bits each, each after its id
            j = 0
            while j < len(segment):
                wide, table = segment[j] >> 4, segment[j] & 15
                size = 128 if wide else 64
                values = segment[j + 1:j + 1 + size]
                if len(values) < size:
                    return None
                if table == 0:
                    return list(values) if not wide else [int.from_bytes(values[k:k + 2], "big")
                                                          for k in range(0, size, 2)]
                j += 1 + size
        i += 2 + length
    return None


def _luma_sum(quality: int) -> int:
    """The sum of the luminance table the IJG library writes at ``quality``: each entry scaled, rounded and held
    between 1 and 255. Read back by the unheld formula, the lowest qualities' tables (entries stuck at 255) and the
    highest's (entries stuck at 1) were misread (decisions.md, session 64)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sum(min(max((v * scale + 50) // 100, 1), 255) for v in STANDARD_LUMA)


# every quality's table sum, each its own: a file's sum names the quality whose table is nearest
LUMA_SUMS = {q: _luma_sum(q) for q in range(1, UNCOMPRESSED + 1)}


# the first build whose fit read a JPEG's quality by the table sums (session 64): a fit by an earlier one recorded
# the unheld formula's reading, in the manifest's library_versions
TABLE_SUMS_SINCE = (0, 1, 1, 1650)
# the number every release before setuptools-scm carried, and the one a build from a tree without git is given today
# (pyproject.toml's fallback_version): a fit that kept its photos' quality under it may be of either side of the fix
UNNUMBERED = "0.1.0"
_STANDARD_SUM = sum(STANDARD_LUMA)


def unheld_reading(quality: int) -> int:
    """What the formula before the table sums read for a JPEG the IJG library wrote at ``quality``: its scale from
    the table's sum, unheld, rounded into 1-100."""
    scale = LUMA_SUMS[quality] * 100 / _STANDARD_SUM
    read = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(round(min(max(read, 1), UNCOMPRESSED)))


# each reading of the earlier formula that was not its own quality, to the highest quality read so: several
# qualities read alike (1 and 2 read 11), and the highest warns of every photo the true one would
_UNHELD = {read: max(q for q in LUMA_SUMS if unheld_reading(q) == read)
           for read in {unheld_reading(q) for q in LUMA_SUMS if unheld_reading(q) != q}}


def _release(version: str | None) -> tuple[int, ...] | None:
    """A build number as this package's builds have it (``0.1.1.dev1650+g40390667c``, ``0.2.0``) as a tuple that
    sorts as they do; None where it does not say (``0+unknown``, an image built without its number, and
    :data:`UNNUMBERED`, a tree built without git)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(?:\.dev(\d+))?(?:\+.*)?", version or "")
    if m is None or m.group(1) == "0" or (m.group(1) == UNNUMBERED and m.group(2) is None):
        return None
    release = tuple(int(p) for p in m.group(1).split("."))
    release += (0,) * (3 - len(release))
    return release + ((int(m.group(2)),) if m.group(2) else (1 << 62,))


def build_named(version: str | None) -> bool:
    """Whether a build's number says which side of the table sums it is on (not ``0+unknown``, nor
    :data:`UNNUMBERED`)."""
    return _release(version) is not None


def fitted_as_read(recorded: int | None, fitted_by: str | None) -> int | None:
    """The good photos' lowest quality a model warns from: the manifest's ``jpeg_quality``, or, for a fit by a
    build before the table sums (``fitted_by``: its version), the highest quality its reading stands for, which
    warns of every photo the true quality would and of none as compressed as the good ones. Where the build does
    not say, the higher of the two readings. The manifest keeps what the fit wrote."""
    if recorded is None or recorded not in _UNHELD:
        return recorded
    release = _release(fitted_by)
    if release is not None and release >= TABLE_SUMS_SINCE:
        return recorded
    return _UNHELD[recorded] if release is not None else max(recorded, _UNHELD[recorded])


def fitted_quality(qualities: list[int | None]) -> int | None:
    """The good photos' lowest quality, for the manifest's ``preprocessing.jpeg_quality``; None when any photo's is
    unknown (an array): a bank that may have learnt harder compression than is known warns of nothing."""
    if not qualities or any(q is None for q in qualities):
        return None
    return min(q for q in qualities if q is not None)


WARNING_START = "this photo is a JPEG at quality"


def learnt_harder(notes: list[tuple[str, ...]]) -> bool:
    """Whether photos an update adds were warned of as compressed harder than the good ones: the bank learns them,
    so the model's quality no longer says what it has seen, and it warns of none after."""
    return any(note.startswith(WARNING_START) for said in notes for note in said)


def compression_warning(fitted: int | None, quality: int | None) -> str | None:
    """Why this photo's score may not mean what the threshold says, when it was JPEG-compressed harder than any good
    photo the model learnt; None otherwise, and for models saved before their photos' quality was kept."""
    if fitted is None or quality is None or quality >= fitted - MARGIN:
        return None
    return (f"{WARNING_START} {quality} and the model's good photos were {learnt(fitted)}: the compression "
            "smooths the surface into blocks it never learnt, and the flag may come from it, not from a defect. Send "
            "the photos as the good ones were saved (or at a higher quality), or re-fit on photos saved as these are")


def learnt(fitted: int) -> str:
    """What the good photos were, as the warning and ``anomaly info`` both say it."""
    return "uncompressed (PNG, TIFF or BMP)" if fitted >= UNCOMPRESSED else f"JPEG at quality {fitted} or better"


def fitted_described(fitted: int) -> str:
    """``anomaly info``'s account of the manifest's quality: what the good photos were, and below which quality a
    flagged JPEG is scored with the warning, so an operator reading a warning can tell where it starts."""
    return (f"{fitted}, the good photos were {learnt(fitted)}: a flagged JPEG below quality {fitted - MARGIN} is "
            "scored with a warning")


def said_with(notes: tuple[str, ...] | list[str], flagged: bool) -> list[str]:
    """What decoding said of a photo, as its score's warnings: the compression warning only with a flag (a part
    that passes was not flagged for its blocks, and a line sending every photo so would see it on every part)."""
    return [n for n in notes if flagged or not n.startswith(WARNING_START)]
