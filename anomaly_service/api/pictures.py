"""Whether a browser would show a photo as its model reads it: where it would not, the service sends the photo
drawn as the model read it. The scoring and the inspection routes both ask, so it lives with neither.
"""

from __future__ import annotations

from typing import Any

# formats a browser shows (the Netpbm family and TIFF it does not)
BROWSER_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP"})


def needs_drawing(photo: bytes) -> bool:
    """Whether a browser would show a stored photo otherwise than its model reads it, or not at all: a 16-bit or
    wider grey photo or a 16-bit colour one (a 12-bit camera's white, 4095 in a 16-bit file, shows near black as
    uploaded; the model reads it against the white its good images set, bit_depth.py), a TIFF or a PPM; or a photo
    the model reads turned (EXIF orientation) where a browser does not turn it the same way, which would put the
    regions and the heatmap beside the part. Every browser turns a JPEG by its EXIF block; none reads the XMP
    orientation Pillow also takes, and Chromium turns no WebP, nor a PNG whose eXIf chunk follows its pixels: only a
    JPEG's EXIF turn is left to the browser. An animated GIF, PNG or WebP is played by a browser, but the model read
    one frame of it. Reads the header (and a PNG's chunks, a GIF's frame headers), no pixel."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import ImageLoadError
    from ..images import SIXTEEN_BIT_MODES, declared_orientation, declared_size, opened_admitted, sixteen_bit_colour

    try:
        with opened_admitted(photo) as img:
            if img.format not in BROWSER_FORMATS or img.mode in (*SIXTEEN_BIT_MODES, "I", "F") or \
                    sixteen_bit_colour(img):
                return True
            if img.format != "MPO" and getattr(img, "is_animated", False):  # a browser plays it; one frame was read
                return True
            shown = _browser_turn(img)
    except UnidentifiedImageError:  # a float colour TIFF, which decoding reads (images.py), is drawn
        try:
            return declared_size(photo)[2] == "TIFF"
        except ImageLoadError:
            return False
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False  # sent as it is: the page says it cannot be shown
    return declared_orientation(photo) != shown


def _browser_turn(img: Any) -> int:
    """The EXIF orientation every browser applies to ``img``: a JPEG's own EXIF block's, 1 for any other format."""
    from PIL import Image

    from ..images import JPEG_FORMATS

    raw = img.info.get("exif") if img.format in JPEG_FORMATS else None
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        turn = int(exif.get(0x0112, 1))
    except Exception:  # a broken EXIF block: decoding ignores it too  # noqa: BLE001
        return 1
    return turn if turn in range(1, 9) else 1
