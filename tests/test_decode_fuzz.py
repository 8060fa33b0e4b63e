"""Photo decoding under mutated files: whatever bytes arrive, decoding gives an RGB picture or an ImageLoadError
(a 4xx from the service), never another exception (a 500), a hang or memory for what a header merely declares.

Each fault the mutation fuzzer found has a plain test here with its bytes built in the test; beside them a short
derandomized fuzz over small seed files of every accepted format (built here too, no binary file in the repository)
and a sample of the same mutations through the real app, which keeps serving after them.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, TiffImagePlugin

from anomaly_service.bit_depth import needed
from anomaly_service.errors import ImageLoadError
from anomaly_service.images import (FRAMES_SEARCHED, ImageLimits, declared_orientation, declared_shape,
                                    decode_image, quiet_pillow_tag_warnings)

# a mutated file may take this much of the process's CPU time to decode or to be refused; the seeds decode in
# milliseconds, so only a decoder stuck in a loop comes near it. CPU time, not wall time: a mutation that declares a
# photo near the pixel limit is seconds of honest work, and on a runner loaded by other processes its wall time
# grew past the bound (a hypothesis "flaky" failure) while its CPU time did not
SECONDS_PER_FILE = 10.0


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
    pages: list[dict[int, int]] = []
    seen = set()
    while at and at not in seen:  # a mutated file's directories may point back at one another
        seen.add(at)
        count = struct.unpack(order + "H", data[at:at + 2])[0]
        entries = [at + 2 + 12 * i for i in range(count)]
        pages.append({struct.unpack(order + "H", data[e:e + 2])[0]: e for e in entries})
        at = struct.unpack(order + "L", data[at + 2 + 12 * count:at + 6 + 12 * count])[0]
    return order, pages


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _refused_or_read(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray | None:
    """The picture ``data`` decodes to, or None when decoding refuses it in its own words; any other exception
    fails the test."""
    try:
        got = decode_image(data, limits).array
    except ImageLoadError:
        return None
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
    return got


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


def test_a_tiff_whose_tile_is_larger_than_any_photo_the_limits_admit_is_refused_before_decoding():
    """libtiff sets a tile's buffer aside by the tile's size, not the page's: a compressed 100x100 TIFF of about a
    kilobyte whose one tile was declared 16 pixels wide and 33 million tall took 1.6 GB before it was found broken.
    A tile of more pixels than the limit is refused from the header, by decoding and by the look admission takes,
    as a page of that size is."""
    import tifffile

    from anomaly_service.images import declared_size

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((100, 100, 3), np.uint8), photometric="rgb", tile=(16, 16), compression="zlib")
    data = bytearray(buf.getvalue())
    order, pages = _tiff_entries(bytes(data))
    at = pages[0][323]  # TileLength, a SHORT or a LONG: written as a LONG, its type with it
    data[at + 2:at + 12] = struct.pack(order + "HLL", 4, 1, 1 << 22)
    assert len(data) < 2048
    for read in (decode_image, declared_size):
        with pytest.raises(ImageLoadError, match="tiles of 16x4194304 pixels exceed the limit") as exc:
            read(bytes(data), ImageLimits())
        assert exc.value.kind == "too_large"
    assert decode_image(buf.getvalue()).array.shape == (100, 100, 3)  # its own tiles read


def test_a_jpeg_of_thousands_of_scans_is_refused_before_libjpeg_passes_over_the_photo_for_each():
    """libjpeg passes over the whole photo for every scan of a progressive JPEG: a 6 MB file of 6000x6000 pixels
    whose ten scans were repeated to two hundred thousand decoded for four minutes of a core. A JPEG of more scans
    than MAX_JPEG_SCANS is refused before it is decoded; one as encoders write it reads."""
    from anomaly_service.images import MAX_JPEG_SCANS

    data = _saved(_noise(0), "JPEG", progressive=True)
    first, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    scans = data[first:end]
    each = scans.count(b"\xff\xda")
    repeats = MAX_JPEG_SCANS // each + 1
    many = data[:first] + scans * repeats + data[end:]
    assert decode_image(data).array.shape == (24, 32, 3)
    with pytest.raises(ImageLoadError, match=f"a JPEG of {repeats * each} scans") as exc:
        decode_image(many)
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


def _seeds() -> dict[str, bytes]:
    """Small valid files of every accepted format and the variants a line sends: 16-bit, palette with
    transparency, alpha, EXIF turns, APNG, progressive and CMYK JPEG, TIFF compressions, pages and tiles, float
    TIFFs, animated GIF and WebP, 16-bit PGM."""
    rgb, grey = _noise(0), _noise(0).convert("L")
    sixteen = Image.fromarray(np.random.default_rng(1).integers(0, 4096, (24, 32)).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    import tifffile

    colour16 = io.BytesIO()
    tifffile.imwrite(colour16, np.random.default_rng(2).integers(0, 65536, (24, 32, 3)).astype(np.uint16),
                     photometric="rgb")
    tiled = io.BytesIO()
    tifffile.imwrite(tiled, np.asarray(rgb), photometric="rgb", tile=(16, 16), compression="zlib")
    return {
        "png": _saved(rgb, "PNG"), "png16": _saved(sixteen, "PNG"),
        "png-palette": _saved(rgb.convert("P"), "PNG", transparency=3), "png-alpha": _saved(rgb.convert("RGBA"), "PNG"),
        "png-exif": _saved(rgb, "PNG", exif=exif.tobytes()),
        "apng": _saved(rgb, "PNG", save_all=True, append_images=[grey.convert("RGB")]),
        "jpeg": _saved(rgb, "JPEG"), "jpeg-progressive": _saved(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _saved(rgb.convert("CMYK"), "JPEG"), "jpeg-exif": _saved(rgb, "JPEG", exif=exif.tobytes()),
        "tiff-lzw": _saved(rgb, "TIFF", compression="tiff_lzw"), "tiff16": _saved(sixteen, "TIFF"),
        "tiff-float": _saved(Image.fromarray(np.random.default_rng(4).random((24, 32)).astype(np.float32)), "TIFF"),
        "tiff-pages": _tiff_pages(rgb, _noise(5, 12, 16), rgb), "tiff-exif": _saved(rgb, "TIFF", exif=exif.tobytes()),
        "tiff16-colour": colour16.getvalue(), "tiff-tiled": tiled.getvalue(), "tiff-float-colour": _float_colour_tiff(),
        "bmp": _saved(rgb.convert("P"), "BMP"), "webp": _saved(rgb, "WEBP", lossless=True),
        "webp-animated": _saved(rgb, "WEBP", save_all=True, append_images=[grey.convert("RGB")]),
        "gif": _saved(rgb.convert("P"), "GIF", save_all=True, append_images=[grey.convert("P")]),
        "ppm": _saved(rgb, "PPM"), "pgm16": b"P5\n32 24\n4095\n" + np.asarray(sixteen).astype(">u2").tobytes(),
    }


SEEDS = _seeds()
# values a header field is set to: the edges of its width, orientations out of range, a camera's bit depths
FIELD_VALUES = (0, 1, 2, 3, 8, 9, 12, 16, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)
# a TIFF tag's type set to text, fractions, bytes, signed and floating-point kinds and ones the format has not
TIFF_TYPES = (0, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 19, 0xFFFF)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with a few mutations: bit flips, byte runs written or inserted, truncation, a slice repeated,
    a header field (a TIFF tag's type, count or value, an EXIF orientation, a PNG's IHDR, a JPEG's frame header)
    set to an edge value."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    spot = draw(st.randoms(use_true_random=False))  # places spread over the file, not drawn towards its first byte
    for _ in range(draw(st.integers(1, 3))):
        at = spot.randrange(len(data))
        how = draw(st.sampled_from(["flip", "run", "insert", "cut", "repeat", "field", "tiff", "tiff", "frames",
                                    "orientation"]))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "run":
            size = draw(st.sampled_from([2, 16, 256]))
            data[at:at + size] = bytes([draw(st.sampled_from([0, 0xFF]))]) * size
        elif how == "insert":
            data[at:at] = bytes([draw(st.integers(0, 255))]) * draw(st.sampled_from([1, 64, 4096]))
        elif how == "cut":
            del data[max(1, at):]
        elif how == "repeat":
            piece = data[at:at + draw(st.integers(1, 256))]
            where = spot.randrange(len(data) + 1)
            data[where:where] = piece * draw(st.sampled_from([1, 2, 20]))
        elif how == "field":
            width, order = draw(st.sampled_from([(1, "B"), (2, "H"), (4, "L")])), draw(st.sampled_from("<>"))
            value = draw(st.sampled_from(FIELD_VALUES)) & ((1 << 8 * width[0]) - 1)
            if data[:8] == b"\x89PNG\r\n\x1a\n" and draw(st.booleans()):  # IHDR, its checksum kept right
                ihdr = bytearray(data[16:29])
                field = spot.randrange(len(ihdr) - width[0] + 1)
                ihdr[field:field + width[0]] = struct.pack(">" + width[1], value)
                data[8:33] = _png_chunk(b"IHDR", bytes(ihdr))
            elif data[:2] == b"\xff\xd8" and (b"\xff\xc0" in data or b"\xff\xc2" in data):  # the frame header
                sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
                field = sof + spot.randrange(4, 10)
                data[field:field + width[0]] = struct.pack(">" + width[1], value)
            else:
                data[at:at + width[0]] = struct.pack(order + width[1], value)
        elif how == "tiff" and data[:4] in (b"II*\0", b"MM\0*"):
            try:
                order, pages = _tiff_entries(bytes(data))
            except struct.error:
                continue
            entries = [e for page in pages for e in page.values()]
            if entries:
                entry = spot.choice(entries)
                field, size = draw(st.sampled_from([(2, 2), (4, 4), (8, 4)]))  # type, count, value
                values = TIFF_TYPES if field == 2 else FIELD_VALUES
                value = draw(st.sampled_from(values)) & ((1 << 8 * size) - 1)
                data[entry + field:entry + field + size] = struct.pack(order + ("H" if size == 2 else "L"), value)
        elif how == "frames" and b"acTL" in data:  # the frame count an APNG declares, its checksum kept right
            actl = data.index(b"acTL")
            # counts past the frames searched, not the billions of the fixed case: on a regression those would
            # fill the runner's memory
            count = draw(st.sampled_from([0, 1, 2, FRAMES_SEARCHED + 1, 0x10000]))
            body = struct.pack(">I", count) + bytes(data[actl + 8:actl + 12])
            data[actl - 4:actl + 16] = _png_chunk(b"acTL", body)
        elif how == "orientation":
            for tag in (b"\x01\x12\x00\x03", b"\x12\x01\x03\x00"):  # the EXIF or TIFF orientation tag, either order
                found = data.find(tag)
                if found >= 0:
                    order = ">" if tag[0] == 1 else "<"
                    data[found + 8:found + 10] = struct.pack(order + "H", draw(st.sampled_from([0, 9, 255, 65535])))
                    break
        if not data:
            data = bytearray(b"\0")
    return bytes(data)


@settings(derandomize=True, deadline=None, max_examples=2000, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_decode_or_are_refused_in_bounded_time_and_memory(data):
    """Every entry point that reads an upload's bytes (decoding with the default limits and with a model's camera
    depths, the header-only looks admission and the page use, the fit's depth look) answers or refuses in its own
    words, in bounded time, with memory near what the limits allow."""
    quiet_pillow_tag_warnings()
    start = time.process_time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for limits in (ImageLimits(), ImageLimits(bit_depth=12, colour_bit_depth=12)):
        _refused_or_read(data, limits)
    for look in (declared_shape, declared_orientation, needed):
        try:
            look(data)
        except ImageLoadError:
            pass
    assert time.process_time() - start < SECONDS_PER_FILE
    # the peak resident memory never grows by more than a photo at the pixel limit costs decoded (kilobytes here)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2 * 1024 * 1024


@pytest.fixture(scope="module")
def client(model_dir):
    from test_api import client_for

    with client_for(model_dir) as c:
        yield c


@settings(derandomize=True, deadline=None, max_examples=60, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_the_service_answers_mutated_photos_with_a_4xx_not_a_5xx(client, data):
    """A sample of the same mutations posted to /score: each is scored or refused with a 4xx, never a 5xx."""
    from test_api import post

    r = post(client, data, "photo.bin", "application/octet-stream")
    assert r.status_code < 500, (r.status_code, r.text)


def test_the_service_keeps_serving_after_the_mutated_photos(client):
    """After the mutated photos (the test above, on the same app) a good photo is scored."""
    from conftest import png_bytes, textured_part
    from test_api import post

    r = post(client, png_bytes(textured_part(np.random.default_rng(7))))
    assert r.status_code == 200, r.text
