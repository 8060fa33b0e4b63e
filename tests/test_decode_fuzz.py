"""Photo decoding under mutated files: whatever bytes arrive, decoding gives an RGB picture or an ImageLoadError
(a 4xx from the service), never another exception (a 500), a hang or memory for what a header merely declares.

Each fault the mutation fuzzer found has a plain test here with its bytes built in the test.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from anomaly_service.bit_depth import needed
from anomaly_service.errors import ImageLoadError
from anomaly_service.images import FRAMES_SEARCHED, ImageLimits, declared_shape, decode_image


def _noise(seed: int, height: int = 24, width: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff_pages(*pages: Image.Image) -> bytes:
    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf, new=True) as tiff:
        for page in pages:
            page.save(tiff, format="TIFF")
            tiff.newFrame()
    return buf.getvalue()


def _float_colour_tiff() -> bytes:
    import tifffile

    buf = io.BytesIO()
    values = np.random.default_rng(3).random((24, 32, 3)).astype(np.float32)
    tifffile.imwrite(buf, values, photometric="rgb", compression="zlib")
    return buf.getvalue()


def _tiff_entries(data: bytes) -> tuple[str, list[dict[int, int]]]:
    """The TIFF's byte order and, for each page, where each tag's directory entry starts."""
    order = "<" if data[:2] == b"II" else ">"
    at = struct.unpack(order + "L", data[4:8])[0]
    pages = []
    while at:
        count = struct.unpack(order + "H", data[at:at + 2])[0]
        entries = [at + 2 + 12 * i for i in range(count)]
        pages.append({struct.unpack(order + "H", data[e:e + 2])[0]: e for e in entries})
        at = struct.unpack(order + "L", data[at + 2 + 12 * count:at + 6 + 12 * count])[0]
    return order, pages


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_gif_cut_inside_a_later_frames_header_is_read_at_its_first_frame():
    """A GIF cut off after a later frame's image descriptor made Pillow's frame count index an empty read: an
    IndexError out of decoding, a 500. Its frames up to the cut read; the first is the photo."""
    frames = [_noise(s).convert("P") for s in (1, 2)]
    data = _saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
    second = data.index(b"\x2c", data.index(b"\x21\xf9", data.index(b"\x2c") + 10))  # after its control block
    flags = data[second + 9]
    palette = 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0
    cut = data[:second + 10 + palette]  # the descriptor and its palette, and not the byte that opens its pixels
    np.testing.assert_array_equal(decode_image(cut).array, decode_image(_saved(frames[0], "GIF")).array)
    assert declared_shape(cut) == (24, 32)


def test_a_tiff_whose_later_page_names_an_unknown_compression_is_read_at_its_first_page():
    """Walking a multi-page TIFF's pages to find its photo, a later page whose compression no table names raised
    Pillow's KeyError: a 500. The pages before it read, as after any other broken later page."""
    data = bytearray(_tiff_pages(_noise(1), _noise(2)))
    order, pages = _tiff_entries(bytes(data))
    at = pages[1][259]  # the second page's compression: a SHORT, its value in the entry
    data[at + 8:at + 10] = struct.pack(order + "H", 10825)
    got = decode_image(bytes(data))
    np.testing.assert_array_equal(got.array, np.asarray(_noise(1)))
    assert declared_shape(bytes(data)) == (24, 32)


@pytest.mark.parametrize("kind", [2, 5, 7, 10, 11, 12], ids=["ascii", "rational", "undefined", "srational",
                                                              "float", "double"])
def test_a_tiff_whose_strip_offsets_are_not_integers_is_corrupt_not_a_crash(kind):
    """Strip offsets stored as text, a fraction or a float: Pillow seeks to them and raised TypeError out of
    decoding (a 500), and out of a fit's bit-depth look (bit_depth.needed), which stopped the whole fit."""
    data = bytearray(_saved(_noise(0), "TIFF"))
    order, pages = _tiff_entries(bytes(data))
    at = pages[0][273]
    data[at + 2:at + 4] = struct.pack(order + "H", kind)
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as exc:
        decode_image(bytes(data))
    assert exc.value.kind == "corrupt"
    sixteen = bytearray(_saved(Image.fromarray(np.full((24, 32), 4000, np.uint16)), "TIFF"))
    order, pages = _tiff_entries(bytes(sixteen))
    at = pages[0][273]
    sixteen[at + 2:at + 4] = struct.pack(order + "H", kind)
    with pytest.raises(ImageLoadError):
        needed(bytes(sixteen))


def test_a_float_colour_tiff_with_a_negative_compression_is_corrupt_not_a_crash():
    """A float colour TIFF whose compression is a signed -1: its strips were re-described to Pillow with that
    value, which struct could not pack (struct.error, a 500)."""
    data = bytearray(_float_colour_tiff())
    order, pages = _tiff_entries(bytes(data))
    at = pages[0][259]
    data[at + 2:at + 12] = struct.pack(order + "HLHH", 8, 1, 0xFFFF, 0)  # a signed SHORT of all ones
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as exc:
        decode_image(bytes(data))
    assert exc.value.kind == "corrupt"


def test_an_apng_declaring_millions_of_frames_costs_no_memory_for_them():
    """An APNG's frame count is what its acTL chunk declares: a 2 KB file declaring two billion frames made
    decoding build a list of that many frame sizes (16 GB, a minute of a core). The frames are counted as a TIFF's
    are, to :data:`FRAMES_SEARCHED`."""
    png = _saved(_noise(0), "PNG")
    declared = 20_000_000  # enough to show the list as it was built, little enough for a runner if it is again
    actl = _png_chunk(b"acTL", struct.pack(">II", declared, 0))
    data = png[:33] + actl + png[33:]  # after the signature and IHDR
    tracemalloc.start()
    try:
        got = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
    np.testing.assert_array_equal(got.array, np.asarray(_noise(0)))
    assert f"more than {FRAMES_SEARCHED} frames" in got.warnings[0]


@pytest.mark.parametrize("kind", ["float colour", "16-bit colour"])
def test_a_large_float_or_16_bit_colour_photo_decodes_within_the_services_pixel_budget(kind, monkeypatch):
    """The service admits a photo by its pixels, each at PEAK_BYTES_PER_PIXEL for its whole way through. A float
    colour TIFF was joined from its bands, joined across planes and cast to float64, then stretched and clipped
    into new arrays: a page a few kilobytes compressed held three times the budget while it decoded. A 16-bit
    colour photo read at a camera's depth was scaled whole into float64 and clipped into a second such array. Both
    now work a band or a block of rows at a time; the band and block sizes are made small here, so a small photo
    stands for a large one."""
    import tifffile

    from anomaly_service import float_tiff, images
    from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL

    monkeypatch.setattr(float_tiff, "BAND_BYTES", 1 << 16)
    monkeypatch.setattr(images, "SCALED_ROWS_PIXELS", 1 << 13, raising=False)  # raising: a name new with it
    height, width = 600, 800
    buf = io.BytesIO()
    if kind == "float colour":
        values = np.zeros((height, width, 3), np.float32)
        values[::7] = 1.0
        tifffile.imwrite(buf, values, photometric="rgb", compression="zlib", rowsperstrip=16)
        limits = ImageLimits()
    else:
        values = np.random.default_rng(0).integers(0, 4096, (height, width, 3)).astype(np.uint16)
        tifffile.imwrite(buf, values, photometric="rgb", compression="zlib")
        limits = ImageLimits(colour_bit_depth=12)
    tracemalloc.start()
    try:
        got = decode_image(buf.getvalue(), limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.array.shape == (height, width, 3)
    assert peak < PEAK_BYTES_PER_PIXEL * height * width, peak / (height * width)
