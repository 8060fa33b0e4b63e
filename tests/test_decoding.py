"""Decoding's edges the seventh mutation round found free (docs/decisions.md, session 69): each test holds a
behaviour of images.py, bit_depth.py or float_tiff.py against a reference written here, on photos made in the test."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from anomaly_service.errors import ImageLoadError
from anomaly_service.images import ImageLimits, decode_image, declared_shape, declared_size, load_image
from conftest import pages_file


def _file(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def colour_png16(values: np.ndarray) -> bytes:
    """A 16-bit RGB (or RGBA) PNG of ``values``, which Pillow does not write (as test_bit_depth's)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, c = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _share_of(values: np.ndarray, white: int) -> np.ndarray:
    """What a 16-bit value reads as against ``white``: its share of 255, rounded half up, white above it."""
    return np.minimum(np.floor(values.astype(np.float64) * 255.0 / white + 0.5), 255).astype(np.uint8)


def test_every_sixteen_bit_level_reads_as_its_share_of_the_white():
    """All 65536 grey levels, from a PNG and from an array, against 16-bit white and a 10- and 12-bit camera's:
    each is its share of 255 rounded, and every level above the white reads white."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    png = _file(Image.fromarray(ramp))
    for bits in (None, 10, 12):
        limits = ImageLimits(bit_depth=bits)
        want = np.repeat(_share_of(ramp, 2 ** (bits or 16) - 1)[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(load_image(png, limits), want, err_msg=str(bits))
        np.testing.assert_array_equal(load_image(ramp, limits), want, err_msg=str(bits))


def test_a_sixteen_bit_colour_level_above_the_white_reads_white():
    """A colour camera's photo read against its 12-bit white: a value above it (a brighter lamp, a camera now
    writing more bits) is white, in the file and the array alike, not wrapped round to black."""
    values = np.zeros((16, 24, 3), np.uint16)
    values[:, :8] = 4095
    values[:, 8:16] = 4096
    values[:, 16:] = 65535
    values[0, 0] = (0, 2047, 2048)
    twelve = ImageLimits(colour_bit_depth=12)
    for got in (load_image(colour_png16(values), twelve), load_image(values, twelve)):
        np.testing.assert_array_equal(got[1:], np.full((15, 24, 3), 255, np.uint8))
        assert tuple(got[0, 0]) == (0, 127, 128)


def test_the_fewest_bits_of_a_value_at_each_depths_edge():
    """A camera's white is 2**bits - 1: that value needs those bits, one more needs the next depth."""
    from anomaly_service.bit_depth import needed
    from anomaly_service.images import DEPTHS, fewest_bits

    for low, high in zip(DEPTHS, DEPTHS[1:]):
        assert fewest_bits(2**low - 1) == low and fewest_bits(2**low) == high
    assert fewest_bits(0) == 8 and fewest_bits(65535) == 16
    assert needed(np.full((8, 8), 4095, np.uint16)) == ("grey", 12)
    assert needed(np.full((8, 8), 4096, np.uint16)) == ("grey", 14)


def test_an_eight_bit_pgm_reads_as_its_levels_and_a_32_bit_tiff_is_stretched():
    """Only a PGM whose white is above 255 is a 16-bit photo: an 8-bit one reads as its levels, not as a sixteenth
    of them. A 32-bit integer TIFF has no fixed white: its own range is stretched."""
    levels = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    pgm = "P5 12 10 255\n".encode() + levels.tobytes()
    np.testing.assert_array_equal(load_image(pgm)[:, :, 0], levels)
    wide = (np.arange(120, dtype=np.int32).reshape(10, 12) * 1000 + 7000)
    got = load_image(_file(Image.fromarray(wide, "I"), "TIFF"))[:, :, 0]
    want = np.floor((wide - 7000) / (119 * 1000) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_a_palette_photos_transparent_colour_reads_black():
    """A palette PNG whose transparent index is red: its transparent pixels are black, as any transparent pixel."""
    p = Image.new("P", (10, 10), 1)
    p.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    p.paste(0, (0, 0, 10, 5))
    got = load_image(_file(p, transparency=0))
    assert got[:5].max() == 0 and (got[5:] == (0, 200, 0)).all()


def test_a_folder_a_missing_file_and_what_is_no_image_are_said_so(tmp_path):
    with pytest.raises(ImageLoadError, match="a folder, not an image file") as exc:
        load_image(tmp_path)
    assert exc.value.kind == "not_image" and str(exc.value).startswith(str(tmp_path))
    with pytest.raises(ImageLoadError, match="no such file") as exc:
        load_image(tmp_path / "gone.png")
    assert exc.value.kind == "missing" and str(exc.value).startswith(str(tmp_path / "gone.png"))
    for source in (None, 5, [1, 2]):
        with pytest.raises(ImageLoadError, match=f"{type(source).__name__} is not an image") as exc:
            load_image(source)  # type: ignore[arg-type]
        assert exc.value.kind == "not_image"
    with pytest.raises(ImageLoadError, match="is not an image"):
        declared_shape(None)  # type: ignore[arg-type]


def test_a_file_of_exactly_the_byte_limit_is_read_and_a_larger_one_is_not_read_at_all(tmp_path):
    png = _file(Image.new("L", (16, 16), 40))
    path = tmp_path / "a.png"
    path.write_bytes(png)
    assert load_image(path, ImageLimits(max_bytes=len(png))).shape == (16, 16, 3)
    assert declared_size(png, ImageLimits(max_bytes=len(png)))[:2] == (16, 16)
    for source in (path, png):
        with pytest.raises(ImageLoadError, match="larger than the limit") as exc:
            load_image(source, ImageLimits(max_bytes=len(png) - 1))
        assert exc.value.kind == "too_large"
    with pytest.raises(ImageLoadError) as exc:
        declared_size(png, ImageLimits(max_bytes=len(png) - 1))
    assert exc.value.kind == "too_large"
    with pytest.raises(ImageLoadError) as exc:
        declared_size(b"", ImageLimits())
    assert exc.value.kind == "empty"
    with pytest.raises(ImageLoadError) as exc:  # one byte is a file, of no image
        load_image(b"P")
    assert exc.value.kind == "not_image"
    big = tmp_path / "big.png"  # a file far above the limit is refused from its size, never read into memory
    with open(big, "wb") as f:
        f.write(png)
        f.truncate(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError, match="larger than the limit"):
            load_image(big, ImageLimits(max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_pillow_image_is_read_at_the_frame_the_caller_left_it_on():
    """A Pillow image at its first frame is read as its file would be (a pyramid at its largest page, said so);
    one a caller moved to another page is read there, without a word."""
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    data = pages_file(photo.resize((30, 20)), photo, reduced=(0,))
    got = decode_image(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(got.array, np.asarray(photo))
    assert len(got.warnings) == 1 and "frame 2" in got.warnings[0]
    stack = pages_file(photo, photo.resize((30, 20)))
    img = Image.open(io.BytesIO(stack))
    img.seek(1)
    got = decode_image(img)
    assert got.array.shape == (20, 30, 3) and got.warnings == ()


def test_a_coloured_area_the_size_of_the_grid_step_makes_a_photo_colour():
    """Grey or colour is told on a grid of about GREY_SAMPLE pixels: in a photo of a megapixel every fourth row and
    column, so a coloured area four pixels a side is seen wherever it lies; in a smaller photo every pixel."""
    from anomaly_service.images import is_grey

    for offset in range(4):
        big = np.full((1024, 1024, 3), 90, np.uint8)
        big[500 + offset:504 + offset, 700 + offset:704 + offset] = (200, 60, 60)
        assert not is_grey(big), offset
    small = np.full((64, 64, 3), 90, np.uint8)
    small[33, 17] = (200, 60, 60)
    assert not is_grey(small) and is_grey(np.full((64, 64, 3), 90, np.uint8))


def test_declared_shape_refuses_what_decoding_refuses_and_names_the_file(tmp_path):
    """The header look a fit plans with: an array of no image's shape, a folder and a broken file are refused as
    decoding refuses them, a file's error named by its path."""
    for shape in ((12,), (8, 8, 3, 2)):
        with pytest.raises(ImageLoadError, match="is not an image") as exc:
            declared_shape(np.zeros(shape, np.uint8))
        assert exc.value.kind == "bad_array"
    assert declared_shape(np.zeros((9, 11), np.uint8)) == (9, 11)
    with pytest.raises(ImageLoadError, match="a folder, not an image file") as exc:
        declared_shape(tmp_path)
    assert exc.value.kind == "not_image"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture at all, only text")
    with pytest.raises(ImageLoadError) as exc:
        declared_shape(broken)
    assert str(exc.value).startswith(str(broken))
    with pytest.raises(ImageLoadError) as exc:
        load_image(broken)
    assert str(exc.value).startswith(str(broken))


def test_declared_shape_is_the_decoded_shape_for_every_orientation():
    """Each of the eight EXIF orientations, from a file's bytes and from a Pillow image: the shape the header gives
    is the shape decoding gives (the four that swap the sides are 5 to 8)."""
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _file(photo, exif=exif.tobytes())
        shape = load_image(data).shape[:2]
        assert shape == ((20, 12) if orientation >= 5 else (12, 20)), orientation
        assert declared_shape(data) == shape == declared_shape(Image.open(io.BytesIO(data))), orientation


def test_declared_orientation_is_the_turn_decoding_applies():
    """What the page learns of a photo's turn: each orientation of a JPEG, a PNG (its EXIF before or after the
    pixels) and a float colour TIFF, as decoding turns it; an orientation no viewer knows, a broken file and bytes
    of no image are as stored."""
    import struct
    import zlib

    import tifffile

    from anomaly_service.images import declared_orientation

    photo = Image.fromarray(np.random.default_rng(5).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        png = _file(photo, exif=exif.tobytes())
        plain = _file(photo)
        body = b"eXIf" + exif.tobytes()[6:]  # the chunk after the pixel data, as the PNG extension allows
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        after = plain[:plain.rindex(b"IEND") - 4] + chunk + plain[plain.rindex(b"IEND") - 4:]
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((12, 20, 3), np.float32), photometric="rgb",
                         extratags=[(274, "H", 1, orientation, True)])
        for name, data in {"jpeg": _file(photo, "JPEG", exif=exif.tobytes()), "png": png, "png after": after,
                           "float tiff": buf.getvalue()}.items():
            assert declared_orientation(data) == orientation, (name, orientation)
    exif = Image.Exif()
    exif[0x0112] = 9
    assert declared_orientation(_file(photo, "JPEG", exif=exif.tobytes())) == 1
    assert declared_orientation(b"no image") == 1 and declared_orientation(_file(photo)) == 1
    exif = Image.Exif()
    exif[0x0131] = "a line camera"  # an EXIF block without an orientation: as stored
    assert declared_orientation(_file(photo, exif=exif.tobytes())) == 1


def test_a_decompression_bomb_is_refused_with_the_pixels_it_declares():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    for look in (load_image, lambda data: declared_size(data, ImageLimits())):
        with pytest.raises(ImageLoadError, match="^image: 2500000000 pixels exceeds the limit") as exc:
            look(bomb)
        assert exc.value.kind == "too_large"
    # given no limits, what the header declares, read without decoding (Pillow's own limit is not ours)
    assert declared_size(bomb) == (50000, 50000, "PNG")


def test_a_photo_of_exactly_the_pixel_limit_is_read_in_strips_or_tiles():
    """The pixel limit is the most a photo may hold: a tiled TIFF whose page and tile are exactly that many pixels
    is read, one pixel fewer allowed is refused from the header."""
    import tifffile

    values = np.random.default_rng(6).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for kw in ({}, {"tile": (16, 16)}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, values, photometric="rgb", **kw)
        data = buf.getvalue()
        np.testing.assert_array_equal(load_image(data, ImageLimits(max_pixels=256)), values)
        assert declared_size(data, ImageLimits(max_pixels=256)) == (16, 16, "TIFF")
        for look in (load_image, declared_size):
            with pytest.raises(ImageLoadError) as exc:
                look(data, ImageLimits(max_pixels=255))
            assert exc.value.kind == "too_large"


def test_of_equally_large_pages_the_first_is_the_photo():
    """A pyramid whose full-size page comes twice (the photo and a copy after it): the first of the largest is read,
    and the answer says so."""
    rng = np.random.default_rng(7)
    first, second = (Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(2))
    got = decode_image(pages_file(first.resize((30, 20)), first, second, reduced=(0,)))
    np.testing.assert_array_equal(got.array, np.asarray(first))
    assert "3 frames" in got.warnings[0] and "frame 2 (the largest" in got.warnings[0]
    two = decode_image(pages_file(first, second))
    np.testing.assert_array_equal(two.array, np.asarray(first))
    assert len(two.warnings) == 1 and "2 frames" in two.warnings[0]


def test_a_jpeg_of_exactly_the_most_scans_is_read():
    """The scans are counted from the file's start-of-scan markers (an upper bound: here a comment holds the rest):
    MAX_JPEG_SCANS of them are read, one more is refused before decoding."""
    from anomaly_service.images import MAX_JPEG_SCANS

    photo = Image.fromarray(np.random.default_rng(8).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    own = _file(photo, "JPEG", progressive=True).count(b"\xff\xda")
    for extra, refused in ((0, False), (1, True)):
        data = _file(photo, "JPEG", progressive=True, comment=b"\xff\xda" * (MAX_JPEG_SCANS - own + extra))
        assert data.count(b"\xff\xda") == MAX_JPEG_SCANS + extra
        if refused:
            with pytest.raises(ImageLoadError, match=f"a JPEG of {MAX_JPEG_SCANS + 1} scans"):
                decode_image(data)
        else:
            assert decode_image(data).array.shape == (24, 32, 3)
            assert decode_image(Image.open(io.BytesIO(data))).array.shape == (24, 32, 3)
    with pytest.raises(ImageLoadError, match="scans"):  # a Pillow image's file is counted too
        decode_image(Image.open(io.BytesIO(data)))


def test_a_thumbnail_of_a_jpeg_is_decoded_at_the_fraction_that_still_covers_it():
    """``reduce_to``: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size, the smallest whose longer side is still at
    least the one asked for; another format, or no ``reduce_to``, is decoded whole."""
    photo = Image.fromarray(np.random.default_rng(9).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    jpeg = _file(photo, "JPEG")
    assert decode_image(jpeg, reduce_to=100).array.shape == (75, 100, 3)
    assert decode_image(jpeg, reduce_to=101).array.shape == (150, 200, 3)
    assert decode_image(jpeg, reduce_to=50).array.shape == (38, 50, 3)
    assert decode_image(jpeg).array.shape == (300, 400, 3)
    assert decode_image(_file(photo), reduce_to=100).array.shape == (300, 400, 3)
    tall = _file(photo.transpose(Image.Transpose.ROTATE_90), "JPEG")
    assert decode_image(tall, reduce_to=100).array.shape == (100, 75, 3)


def _png16(values: np.ndarray) -> bytes:
    return _file(Image.fromarray(values))


def test_the_depths_a_fit_records_from_its_good_photos(caplog):
    """``resolve``: for auto the fewest bits holding every 16-bit photo of each kind, None for a kind with none; a
    depth given holds for both kinds, 16 without a look at any photo; a depth below a photo's values is refused,
    naming at most five of them; a photo that does not read is the fit's to report."""
    from anomaly_service.bit_depth import Depths, resolve
    from anomaly_service.errors import ConfigError

    ten, twelve = np.full((8, 8), 1023, np.uint16), np.full((8, 8), 4095, np.uint16)
    colour = np.full((8, 8, 3), 1023, np.uint16)
    eight = _file(Image.new("L", (8, 8), 200))
    assert resolve("auto", [_png16(ten), _png16(twelve), eight]) == Depths(12, None)
    assert resolve("auto", [_png16(twelve), _png16(ten)]) == Depths(12, None)
    caplog.clear()  # a worker whose logging an earlier test set to INFO has already caught the two calls above
    with caplog.at_level("INFO", logger="anomaly_service.bit_depth"):
        assert resolve("auto", [b"broken", colour_png16(colour), _png16(ten)]) == Depths(10, 10)
    assert sorted(r.getMessage() for r in caplog.records) == [
        "16-bit colour images whose values fit in 10 bits: read with 1023 as white (--bit-depth)",
        "16-bit grey images whose values fit in 10 bits: read with 1023 as white (--bit-depth)"]
    caplog.clear()
    with caplog.at_level("INFO", logger="anomaly_service.bit_depth"):
        assert resolve("auto", [_png16(np.full((8, 8), 65535, np.uint16))]) == Depths(16, None)
    assert caplog.records == []  # all 16 bits: nothing to say
    assert resolve("auto", [eight]) == Depths(None, None) and resolve("auto", []) == Depths(None, None)
    assert resolve("16", [b"broken"]) == Depths(16, 16)
    assert resolve("12", [_png16(twelve), colour_png16(colour)]) == Depths(12, 12)
    with pytest.raises(ConfigError, match=r"^--bit-depth 10: 1 good image\(s\) hold values above its white \(1023\)"
                                          r" .*\(b\.png\); they need 12 bits: give --bit-depth 12, or auto$"):
        resolve("10", [_png16(ten), _png16(twelve)], names=["a.png", "b.png"])
    many = [_png16(twelve)] * 6
    with pytest.raises(ConfigError, match=r"6 good image\(s\) .*\(image\[0\], image\[1\], image\[2\], image\[3\], "
                                          r"image\[4\], \.\.\.\)"):
        resolve("8", many)
    with pytest.raises(ConfigError, match=r"\(image\[0\], image\[1\], image\[2\], image\[3\], image\[4\]\);"):
        resolve("8", many[:5])
    with pytest.raises(ConfigError, match="they need 14 bits"):  # the most any kind needs
        resolve("10", [_png16(twelve), colour_png16(np.full((8, 8, 3), 5000, np.uint16))])


def test_the_depth_pre_pass_shows_its_progress_only_when_asked_and_over_several_photos(capfd):
    from anomaly_service.bit_depth import resolve

    photo = _png16(np.full((8, 8), 1000, np.uint16))
    resolve("auto", [photo, photo])
    resolve("auto", [photo], progress=True)
    assert capfd.readouterr().err == ""
    resolve("auto", [photo, photo], progress=True)
    err = capfd.readouterr().err
    assert "reading bit depth: 100%" in err and "2/2" in err


def test_how_a_models_depths_are_said():
    from anomaly_service.bit_depth import described, white_described, with_depth

    assert described(12) == "read as 12-bit: 4095 is white"
    assert white_described(ImageLimits()) == "16-bit white (65535)"
    assert white_described(ImageLimits(bit_depth=12)) == "12-bit white (4095)"
    assert white_described(ImageLimits(colour_bit_depth=10)) == "10-bit white (1023)"
    assert white_described(ImageLimits(bit_depth=12, colour_bit_depth=12)) == "12-bit white (4095)"
    assert white_described(ImageLimits(bit_depth=12, colour_bit_depth=10)) == \
        "12-bit grey white (4095) and 10-bit colour white (1023)"
    limits = ImageLimits(bit_depth=12, colour_bit_depth=10, jpeg_quality=80)
    assert with_depth(limits, 12, 10) is limits
    assert with_depth(limits, 14) == ImageLimits(bit_depth=14, jpeg_quality=80)
    assert with_depth(limits, 12, 12) == ImageLimits(bit_depth=12, colour_bit_depth=12, jpeg_quality=80)


def test_the_photos_an_update_would_learn_clipped_to_white():
    """``above_white``: the 16-bit photos holding a value above the white of their kind, by name; an 8-bit photo,
    one within its white, one whose header the limits refuse and one that does not read are not named; with no
    depth below 16 nothing is read."""
    from anomaly_service.bit_depth import above_white

    twelve, fourteen = np.full((8, 8), 4095, np.uint16), np.full((8, 8), 4096, np.uint16)
    colour12 = np.full((8, 8, 3), 4096, np.uint16)
    colour12[..., 1] = 0
    sources = [_png16(twelve), _png16(fourteen), colour_png16(colour12), _file(Image.new("L", (8, 8), 255)),
               b"broken", _png16(np.full((4, 4), 65535, np.uint16))]
    names = [f"{i}.png" for i in range(len(sources))]
    assert above_white(sources, names, ImageLimits(bit_depth=12)) == ["1.png"]
    assert above_white(sources, names, ImageLimits(bit_depth=12, colour_bit_depth=12)) == ["1.png", "2.png"]
    assert above_white(sources, names, ImageLimits(colour_bit_depth=14)) == []
    assert above_white(sources, None, ImageLimits(bit_depth=12, min_side=1)) == ["image[1]", "image[5]"]
    assert above_white(sources, names, ImageLimits(bit_depth=16, colour_bit_depth=16)) == []
    assert above_white(sources, names, ImageLimits()) == []


def test_the_bits_a_photo_needs_by_kind():
    """``needed``: a 16-bit photo's kind and bits from a file, its bytes in any bytes-like form, a Pillow image or
    an array; a colour photo's alpha is no camera's depth; anything not 16-bit has its own depth (None)."""
    from anomaly_service.bit_depth import needed
    from anomaly_service.errors import ImageLoadError as LoadError

    grey = np.full((8, 8), 1000, np.uint16)
    png = _png16(grey)
    for source in (png, bytearray(png), memoryview(png), Image.open(io.BytesIO(png)), grey):
        assert needed(source) == ("grey", 10), type(source)
    rgba = np.full((8, 8, 4), 65535, np.uint16)
    rgba[..., :3] = 1000
    assert needed(colour_png16(rgba)) == ("colour", 10) and needed(rgba) == ("colour", 10)
    assert needed(np.full((8, 8, 1), 5000, np.uint16)) == ("grey", 14)
    assert needed(np.zeros((0, 8), np.uint16)) is None and needed(grey.astype(np.int32)) is None
    assert needed(_file(Image.new("RGB", (8, 8)))) is None
    with pytest.raises(LoadError, match="cannot read image"):
        needed(b"broken")


def _grey(values, shape=(8, 8)) -> np.ndarray:
    return np.broadcast_to(np.asarray(values), shape).copy()


def test_an_arrays_values_are_read_on_the_scale_they_are_on():
    """Floats within 0-1 (give or take UNIT_SLACK) are a share of 255, other floats and integers are levels and
    must lie in 0-255; not-a-number is black and infinities are left out of the range; a bool is white where
    True; numbers in an object array are numbers; what holds no numbers is refused."""
    from anomaly_service.images import UNIT_SLACK

    def read(arr):  # tiled to the least side, read back at its own width
        return load_image(np.tile(arr, (1, 4)))[:, :arr.shape[1], 0]

    np.testing.assert_array_equal(read(_grey([0.0, 0.5, 1.0, 0.2], (8, 4))), _grey([0, 127, 255, 51], (8, 4)))
    np.testing.assert_array_equal(read(_grey([-UNIT_SLACK, 1 + UNIT_SLACK, 0.5, 1.0], (8, 4))),
                                  _grey([0, 255, 127, 255], (8, 4)))  # a resize's ringing, clipped
    np.testing.assert_array_equal(read(_grey([0.0, 1.3, 200.0, 255.0], (8, 4))), _grey([0, 1, 200, 255], (8, 4)))
    np.testing.assert_array_equal(read(_grey([0.0, 1.3, 0.5, 2.0], (8, 4))), _grey([0, 1, 0, 2], (8, 4)))  # levels
    np.testing.assert_array_equal(read(_grey([np.nan, np.inf, 0.5, 1.0], (8, 4))), _grey([0, 255, 127, 255], (8, 4)))
    np.testing.assert_array_equal(read(_grey([np.nan, 0.0, 100.0, 255.0], (8, 4))), _grey([0, 0, 100, 255], (8, 4)))
    np.testing.assert_array_equal(read(np.full((8, 8), np.nan)), np.zeros((8, 8), np.uint8))
    np.testing.assert_array_equal(read(_grey([0, 1, 254, 255], (8, 4)).astype(np.int64)), _grey([0, 1, 254, 255],
                                                                                              (8, 4)))
    np.testing.assert_array_equal(read(_grey([True, False], (8, 2)).repeat(4, axis=1)),
                                  _grey([255, 255, 255, 255, 0, 0, 0, 0], (8, 8)))
    np.testing.assert_array_equal(read(_grey([0, 128, 255], (8, 3)).repeat(3, axis=1).astype(object)),
                                  _grey([0, 0, 0, 128, 128, 128, 255, 255, 255], (8, 9)))
    for values, said in (([-1, 0, 3], "from -1 to 3"), ([0, 256, 3], "from 0 to 256"),
                         ([-0.5, 0.2, 1.0], "from -0.5 to 1"), ([0.0, 255.5, 1.0], "from 0 to 255.5")):
        with pytest.raises(ImageLoadError, match=f"with values {said} is not on a pixel scale") as exc:
            load_image(_grey(values, (8, 3)).repeat(3, axis=1))
        assert exc.value.kind == "bad_array"
    for arr in (np.full((8, 8), "a"), np.full((8, 8), 1 + 1j), np.full((8, 8), "a", dtype=object)):
        with pytest.raises(ImageLoadError, match="holds no pixels") as exc:
            load_image(arr)
        assert exc.value.kind == "bad_array"


def test_an_arrays_shape_and_size_are_checked_as_a_files():
    """HxW, HxWx1, 3 or 4 (an alpha blended on black); the pixel limit and the least side at their edges."""
    rng = np.random.default_rng(10)
    grey = rng.integers(0, 255, (8, 10), dtype=np.uint8)
    for arr in (grey, grey[:, :, None]):
        np.testing.assert_array_equal(load_image(arr), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = rng.integers(0, 255, (8, 10, 4), dtype=np.uint8)
    rgba[:, :5, 3] = 0
    rgba[:, 5:, 3] = 255
    got = load_image(rgba)
    assert got[:, :5].max() == 0 and np.array_equal(got[:, 5:], rgba[:, 5:, :3])
    for shape in ((8, 10, 2), (8, 10, 5), (8, 10, 3, 1)):
        with pytest.raises(ImageLoadError, match="is not an image") as exc:
            load_image(np.zeros(shape, np.uint8))
        assert exc.value.kind == "bad_array"
    assert load_image(grey, ImageLimits(max_pixels=80, min_side=8)).shape == (8, 10, 3)
    with pytest.raises(ImageLoadError, match="exceeds the limit of 79 pixels") as exc:
        load_image(grey, ImageLimits(max_pixels=79))
    assert exc.value.kind == "too_large"
    with pytest.raises(ImageLoadError, match="array 10x8 is smaller than 9 px") as exc:
        load_image(grey, ImageLimits(min_side=9))
    assert exc.value.kind == "too_small"


def test_a_sixteen_bit_array_reads_as_its_file_does_and_is_warned_of_alike():
    """A uint16 array against the model's white of its kind (a colour one against the grey white where the model has
    no colour depth), with the depth warning its file would carry."""
    from anomaly_service.images import DEPTH_WARNING_START

    grey = np.full((8, 8), 1000, np.uint16)
    colour = np.full((8, 8, 3), 1000, np.uint16)
    colour[..., 2] = 5000
    assert (load_image(grey, ImageLimits(bit_depth=10)) == 249).all()
    np.testing.assert_array_equal(load_image(colour, ImageLimits(bit_depth=14))[0, 0], (16, 16, 78))
    np.testing.assert_array_equal(load_image(colour, ImageLimits(bit_depth=14, colour_bit_depth=16))[0, 0],
                                  (4, 4, 19))
    warned = {}
    for kind, arr, file in (("grey", grey, _png16(grey)), ("colour", colour, colour_png16(colour))):
        for name, limits in {"ten": ImageLimits(bit_depth=10, colour_bit_depth=10),
                             "none learnt": ImageLimits(depths_kept=True),
                             "sixteen": ImageLimits(bit_depth=16, colour_bit_depth=16, depths_kept=True),
                             "colour ten": ImageLimits(bit_depth=16, colour_bit_depth=10, depths_kept=True),
                             "grey eight": ImageLimits(bit_depth=8, colour_bit_depth=16, depths_kept=True),
                             "older model": ImageLimits()}.items():
            said = decode_image(arr, limits).warnings
            assert said == decode_image(file, limits).warnings, (kind, name)
            assert all(s.startswith(DEPTH_WARNING_START) for s in said)
            warned[kind, name] = len(said)
    assert warned == {("grey", "ten"): 0, ("grey", "none learnt"): 1, ("grey", "sixteen"): 0,
                      ("grey", "older model"): 0, ("colour", "ten"): 1, ("colour", "none learnt"): 1,
                      ("colour", "sixteen"): 0, ("colour", "older model"): 0, ("grey", "colour ten"): 0,
                      ("colour", "colour ten"): 1, ("grey", "grey eight"): 1, ("colour", "grey eight"): 0}
    rgba = np.full((8, 8, 4), 65535, np.uint16)  # an opaque alpha is no camera's depth
    rgba[..., :3] = 1000
    said = decode_image(rgba, ImageLimits(depths_kept=True)).warnings
    assert len(said) == 1 and "need only 10 bits" in said[0]
    one = np.full((8, 8, 1), 5000, np.uint16)  # one channel: grey
    got = decode_image(one, ImageLimits(bit_depth=16, colour_bit_depth=10, depths_kept=True))
    assert got.warnings == () and (got.array == 19).all()
    assert decode_image(np.zeros((8, 8), np.uint8), ImageLimits(depths_kept=True)).warnings == ()


def test_a_sixteen_bit_colour_files_depth_warning_reads_its_brightest_colour_channel():
    """The bits a 16-bit colour file needs are its brightest colour channel's, not its dimmest's, nor its alpha's."""
    from anomaly_service.images import DEPTH_WARNING_START

    values = np.full((8, 8, 4), 65535, np.uint16)  # an opaque alpha
    values[..., :3] = (100, 3000, 200)  # a 12-bit camera's
    for channels in (3, 4):
        data = colour_png16(values[..., :channels])
        said = decode_image(data, ImageLimits(colour_bit_depth=10)).warnings
        assert len(said) == 1 and "need 12 bits, more than the 10" in said[0], channels
        said = decode_image(data, ImageLimits(depths_kept=True)).warnings
        assert len(said) == 1 and said[0].startswith(DEPTH_WARNING_START) and "need only 12 bits" in said[0]
        assert decode_image(data, ImageLimits(colour_bit_depth=12)).warnings == ()


def test_a_float_colour_tiffs_alpha_and_rows_read_in_blocks(monkeypatch):
    """A float colour TIFF's unassociated alpha weighs each colour by its share, clipped to 0-1 (not-a-number is
    transparent), and a page scaled a few rows at a time reads as one scaled whole; so does a 16-bit colour photo."""
    import tifffile

    from anomaly_service import images

    rng = np.random.default_rng(11)
    values = rng.random((13, 10, 3)).astype(np.float32)
    values[0, 0] = (0.0, 0.0, 0.0)
    values[0, 1] = (1.0, 1.0, 1.0)  # the range is exactly 0-1
    alpha = np.ones((13, 10, 1), np.float32)
    alpha[5:, :, 0] = (0.5, 2.0, np.nan, 0.25, 1.0, 0.0, -1.0, 0.5, 0.5, 0.5)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.concatenate([values, alpha], axis=2), photometric="rgb", extrasamples=["unassalpha"])
    weight = np.clip(np.nan_to_num(alpha), 0, 1)
    want = np.clip(values.astype(np.float64) * weight * 255.0 + 0.5, 0, 255).astype(np.uint8)
    whole = load_image(buf.getvalue())
    np.testing.assert_array_equal(whole, want)
    deep = (rng.random((13, 10, 3)) * 4096).astype(np.uint16)
    twelve = ImageLimits(colour_bit_depth=12)
    deep_whole = load_image(colour_png16(deep), twelve)
    monkeypatch.setattr(images, "SCALED_ROWS_PIXELS", 30)  # three rows a block, the last block one row
    np.testing.assert_array_equal(load_image(buf.getvalue()), whole)
    np.testing.assert_array_equal(load_image(colour_png16(deep), twelve), deep_whole)
    np.testing.assert_array_equal(deep_whole, _share_of(deep, 4095))


def test_why_a_listing_skipped_a_path_and_names_as_text(tmp_path):
    from anomaly_service.images import as_text, list_images, path_text, skip_reason

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.tga").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    (tmp_path / "notes.lnk").symlink_to(tmp_path / "notes.txt")  # a link to a file that is there: what it links
    (tmp_path / "b.png").write_bytes(_file(Image.new("L", (8, 8))))
    images, skipped = list_images(tmp_path)
    assert images == [tmp_path / "b.png"]
    reasons = {p.name: skip_reason(p) for p in skipped}
    assert reasons["sub"].startswith("a folder") and reasons["gone.png"] == "a link to nothing"
    assert reasons["a.tga"].startswith("not an image file of an accepted format (its name says TGA; accepted: BMP")
    assert reasons["notes.txt"] == reasons["notes.lnk"] == "not an image file"
    assert list_images(str(tmp_path / "b.png")) == ([tmp_path / "b.png"], [])
    (tmp_path / "sub" / "c.png").write_bytes(_file(Image.new("L", (8, 8))))
    deep, skipped = list_images(tmp_path, recursive=True)  # folders searched, not reported; a dead link still is
    assert deep == [tmp_path / "b.png", tmp_path / "sub" / "c.png"]
    assert sorted(p.name for p in skipped) == ["a.tga", "gone.png", "notes.lnk", "notes.txt"]
    with pytest.raises(ImageLoadError, match="no such file or directory") as exc:
        list_images([tmp_path / "none.png"])
    assert exc.value.kind == "missing"
    odd = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a name written under another code page
    assert path_text(odd) == "caf\\xe9.png" and path_text("plain.png") == "plain.png"
    assert path_text("\udc80\ud800") == "\\udc80\\ud800"  # a surrogate that stands for no byte: its own escape
    assert as_text({"a": [odd, 3, {"b": odd}], "c": None}) == {"a": ["caf\\xe9.png", 3, {"b": "caf\\xe9.png"}],
                                                                "c": None}


def test_a_folder_lists_every_file_named_as_an_accepted_format(tmp_path):
    """Every extension Pillow names an accepted format by is listed: a float map (.pfm, Netpbm's float member, read
    as PPM) and an animated PNG (.apng) were skipped as "not an image file", though each decodes."""
    from anomaly_service.images import IMAGE_EXTENSIONS, list_images

    named = {ext for ext, fmt in Image.registered_extensions().items() if fmt in ImageLimits().formats}
    assert named <= IMAGE_EXTENSIONS
    Image.fromarray(np.random.default_rng(12).random((10, 12)).astype(np.float32), "F").save(tmp_path / "a.pfm",
                                                                                             format="PPM")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "b.apng", format="PNG")
    images, skipped = list_images(tmp_path)
    assert [p.name for p in images] == ["a.pfm", "b.apng"] and skipped == []
    assert all(load_image(p).shape[:2] == (10, p.stem == "a" and 12 or 10) for p in images)


def _rgb_tiff(values: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", **kw)
    return buf.getvalue()


def test_a_tiffs_pages_are_read_to_the_first_that_does_not_read():
    """``pages``: the byte order and each page's tags, up to ``most``, ending at a directory that points back or
    does not read; None for what is no classic TIFF; the file left where it was."""
    import struct

    from anomaly_service import float_tiff

    values = np.zeros((8, 9, 3), np.float32)
    buf = io.BytesIO()
    import tifffile

    with tifffile.TiffWriter(buf) as tif:
        for _ in range(3):
            tif.write(values, photometric="rgb")
    data = buf.getvalue()
    fp = io.BytesIO(data)
    fp.seek(5)
    prefix, found = float_tiff.pages(fp, 10)
    assert prefix == b"II" and len(found) == 3 and fp.tell() == 5
    assert [(t[256], t[257], t[277]) for t in found] == [((9,), (8,), (3,))] * 3
    assert len(float_tiff.pages(io.BytesIO(data), 2)[1]) == 2
    big = _rgb_tiff(values, byteorder=">")
    assert float_tiff.pages(io.BytesIO(big), 1)[0] == b"MM"
    assert float_tiff.pages(io.BytesIO(b"II*\0"), 1) is None and float_tiff.pages(io.BytesIO(_file(
        Image.new("L", (8, 8)))), 1) is None
    first = struct.unpack("<L", data[4:8])[0]
    count = struct.unpack("<H", data[first:first + 2])[0]
    next_at = first + 2 + 12 * count
    loop = data[:next_at] + struct.pack("<L", first) + data[next_at + 4:]  # the first page points back at itself
    assert len(float_tiff.pages(io.BytesIO(loop), 10)[1]) == 1


def test_which_pages_are_float_colour_and_what_their_tags_say():
    from anomaly_service import float_tiff

    tags = {256: (9,), 257: (8,), 258: (32, 32, 32), 262: (2,), 277: (3,), 339: (3, 3, 3)}
    page = float_tiff.float_colour(tags, b"II")
    assert page is not None and page.size == (9, 8) and page.orientation == 1
    assert float_tiff.float_colour({**tags, 277: (4,), 258: (16,) * 4, 339: (3,) * 4}, b"II") is not None
    assert float_tiff.float_colour({**tags, 258: (64, 64, 64)}, b"II") is not None
    for change in ({262: (1,)}, {277: (2,)}, {277: (5,)}, {339: (3, 3, 1)}, {339: (1, 1, 1)}, {258: (32, 32, 16)},
                   {258: (8, 8, 8)}, {258: (24, 24, 24)}, {256: ()}, {257: ()}, {262: ()}):
        assert float_tiff.float_colour({**tags, **change}, b"II") is None, change
    no_samples = {k: v for k, v in tags.items() if k != 277}  # one sample a pixel when the tag is absent
    assert float_tiff.float_colour(no_samples, b"II") is None
    assert page.tag(274, 7) == 7 and page.tag(256) == 9
    with pytest.raises(ValueError, match="no tag 274"):
        page.tag(274)
    for turn, read in ((0, 1), (1, 1), (5, 5), (8, 8), (9, 1)):
        assert float_tiff.FloatColourPage({**tags, 274: (turn,)}, b"II").orientation == read
    alpha = {**tags, 277: (4,), 258: (32,) * 4, 339: (3,) * 4}
    assert float_tiff.unassociated_alpha(float_tiff.FloatColourPage({**alpha, 338: (2,)}, b"II"))
    assert not float_tiff.unassociated_alpha(float_tiff.FloatColourPage({**alpha, 338: (1,)}, b"II"))
    assert not float_tiff.unassociated_alpha(float_tiff.FloatColourPage(alpha, b"II"))
    assert not float_tiff.unassociated_alpha(float_tiff.FloatColourPage({**tags, 338: (2,)}, b"II"))


def test_a_float_pages_layout_that_does_not_hold_together_is_refused(monkeypatch):
    """``decode``'s checks on forged tags, each a ValueError (a broken file): a predictor not for floats, strips of
    no size or not covering the page, a strip with fewer bytes than its rows, a compressed strip larger than is
    decoded at once; and a page read whole in strips of several rows."""
    from anomaly_service import float_tiff

    values = np.random.default_rng(13).random((8, 9, 3)).astype(np.float32)
    data = _rgb_tiff(values, rowsperstrip=3)
    prefix, found = float_tiff.pages(io.BytesIO(data), 1)
    tags = found[0]
    page = float_tiff.FloatColourPage(tags, prefix)
    np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(data), page), values)
    for change, said in (({317: (2,)}, "predictor 2"), ({278: (0,)}, "no size"), ({256: (0,)}, "no size"),
                         ({273: tags[273][:2]}, "do not cover"), ({279: tags[279][:2]}, "do not cover"),
                         ({278: (2,)}, "do not cover"), ({279: (tags[279][0] - 1,) + tags[279][1:]}, "fewer bytes"),
                         ({279: (tags[279][0] + len(data),) + tags[279][1:]}, "past the end")):
        with pytest.raises(ValueError, match=said):
            float_tiff.decode(io.BytesIO(data), float_tiff.FloatColourPage({**tags, **change}, prefix))
    last_at = tags[273][-1]  # the last strip's count, to the file's end exactly: read; one byte more: refused
    to_end = float_tiff.FloatColourPage({**tags, 279: tags[279][:-1] + (len(data) - last_at,)}, prefix)
    np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(data), to_end), values)
    past = float_tiff.FloatColourPage({**tags, 279: tags[279][:-1] + (len(data) - last_at + 1,)}, prefix)
    with pytest.raises(ValueError, match="past the end"):
        float_tiff.decode(io.BytesIO(data), past)
    deflated = _rgb_tiff(values, rowsperstrip=3, compression="zlib")
    prefix, found = float_tiff.pages(io.BytesIO(deflated), 1)
    page = float_tiff.FloatColourPage(found[0], prefix)
    monkeypatch.setattr(float_tiff, "BAND_BYTES", 3 * 9 * 3 * 4)  # a band a strip
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3 * 9 * 3 * 4)  # a strip's bytes: read
    np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(deflated), page), values)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3 * 9 * 3 * 4 - 1)
    with pytest.raises(ValueError, match="a compressed strip or tile of 324 bytes is more than is decoded at once"):
        float_tiff.decode(io.BytesIO(deflated), page)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit: read
    np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(deflated), page), values)


def test_grey_or_colour_at_the_tolerance_on_either_scale():
    """Channels within GREY_TOLERANCE levels are one grey: on the 0-255 scale exactly 2 apart is grey, 3 colour; a
    float photo within 0-1 is judged in its share of that (0.005 apart grey, 0.05 colour); a float photo reaching
    above 1 is on the 0-255 scale; an 8-bit photo of levels 0 and 1 is on its own scale, not a 0-1 one."""
    from anomaly_service.images import is_grey

    def photo(r, g, b, dtype):
        out = np.zeros((16, 16, 3), dtype)
        out[4:8, 4:8] = (r, g, b)
        return out

    assert is_grey(photo(100, 102, 100, np.uint8)) and not is_grey(photo(100, 103, 100, np.uint8))
    assert is_grey(photo(0, 1, 0, np.uint8))
    assert is_grey(photo(0.5, 0.505, 0.5, np.float32)) and not is_grey(photo(0.5, 0.55, 0.5, np.float32))
    assert is_grey(photo(1.5, 0.2, 1.5, np.float32)) and not is_grey(photo(4.0, 0.5, 4.0, np.float32))


def test_how_flat_a_frame_is_and_when_it_shows_nothing():
    """``blank_spread``: the widest channel's spread of 8x8 block means (too few blocks: infinite);
    ``flattest_part``: the least spread above a blank frame's (BLANK_SPREAD, or a third of the median), else the
    least; ``is_blank``: one level within GREY_TOLERANCE, or blocks within both bounds of the model's flattest."""
    from anomaly_service.images import blank_spread, flattest_part, is_blank

    frame = np.full((64, 64, 3), 30, np.uint8)
    assert blank_spread(frame) == 0.0
    halves = frame.copy()
    halves[:, 32:, 1] = 70  # one channel's blocks 40 levels apart
    assert blank_spread(halves) == 40.0
    assert blank_spread(np.full((15, 64, 3), 30, np.uint8)) == float("inf")  # one row of blocks
    assert blank_spread(np.full((64, 15, 3), 30, np.uint8)) == float("inf")
    assert blank_spread(np.full((16, 16, 3), 30, np.uint8)) == 0.0  # two blocks a side: enough
    assert flattest_part([]) is None and flattest_part([float("inf")]) is None
    assert flattest_part([40.0, 5.0, 60.0, float("inf")]) == 40.0  # a blank frame's 5 is not a part's
    assert flattest_part([30.0, 60.0, 90.0, 13.0]) == 13.0  # the least above BLANK_SPREAD
    assert flattest_part([1.0, 3.0, 6.0, 9.0]) == 3.0  # dim photos: the least above a third of the median (6)
    assert flattest_part([3.0, 4.0, 5.0]) == 3.0
    assert flattest_part([1.0, 2.0, 9.0, 12.0, 15.0]) == 9.0  # the median (9), not a lower one, sets the bound
    assert flattest_part([0.0]) == 0.0 and flattest_part([0.0, 0.0]) == 0.0  # none above: the least
    assert flattest_part([12.0, 50.0, 60.0]) == 50.0  # exactly BLANK_SPREAD is a blank frame's
    assert is_blank(np.zeros((0, 0, 3), np.uint8))
    noisy = frame.copy()
    noisy[::2, ::2] = 32  # within 2 levels
    assert is_blank(noisy) and not is_blank(halves)
    dark = frame.copy()
    dark[:, 32:] = 36  # blocks 6 levels apart: a dark frame's noise beside a model whose flattest part spreads 30
    assert not is_blank(dark) and is_blank(dark, 30.0) and is_blank(dark, 18.0) and not is_blank(dark, 17.0)
    wide = frame.copy()
    wide[:, 32:] = 42  # 12 levels apart: at BLANK_SPREAD, blank; 13 not
    assert is_blank(wide, 100.0) and not is_blank(wide + (wide > 30), 100.0)


def test_a_float_photos_range_leaves_out_what_is_not_finite():
    """Float grey and colour TIFFs: -inf reads black and +inf white beside a range stretched over the finite values,
    not-a-number reads black, and a photo of one value, or of no finite value, reads black."""
    grey = np.linspace(2.0, 6.0, 8 * 12, dtype=np.float32).reshape(8, 12)
    grey[0, :3] = (-np.inf, np.inf, np.nan)
    finite = grey[np.isfinite(grey)]
    want = np.floor((grey.astype(np.float64) - finite.min()) / (finite.max() - finite.min()) * 255 + 0.5)
    want[0, :3] = (0, 255, 0)
    for data in (_file(Image.fromarray(grey, "F"), "TIFF"), _rgb_tiff(np.repeat(grey[:, :, None], 3, axis=2))):
        np.testing.assert_array_equal(load_image(data)[:, :, 0], want.astype(np.uint8))
    for flat in (np.full((8, 12), 3.5, np.float32), np.full((8, 12), np.nan, np.float32),
                 np.full((8, 12), np.inf, np.float32)):
        for data in (_file(Image.fromarray(flat, "F"), "TIFF"), _rgb_tiff(np.repeat(flat[:, :, None], 3, 2))):
            assert load_image(data).max() == 0


def test_a_sixteen_bit_colour_photo_read_from_a_later_page_or_a_pillow_image():
    """A 16-bit colour TIFF whose photo is its second page (a preview first) reads that page's values whole against
    the colour white; a Pillow image of such a file reads as its bytes do, and within the byte limit only."""
    import tifffile

    rng = np.random.default_rng(14)
    values = (rng.random((16, 20, 3)) * 4096).astype(np.uint16)
    twelve = ImageLimits(colour_bit_depth=12)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(values[::2, ::2], photometric="rgb", subfiletype=1)
        tif.write(values, photometric="rgb")
    pyramid = buf.getvalue()
    got = decode_image(pyramid, twelve)
    np.testing.assert_array_equal(got.array, _share_of(values, 4095))
    assert "frame 2 (the largest" in got.warnings[0]
    for data in (colour_png16(values), _rgb_tiff(values), _rgb_tiff(values, compression="zlib")):
        np.testing.assert_array_equal(decode_image(Image.open(io.BytesIO(data)), twelve).array,
                                      _share_of(values, 4095))
        exact = ImageLimits(colour_bit_depth=12, max_bytes=len(data))
        np.testing.assert_array_equal(load_image(Image.open(io.BytesIO(data)), exact), _share_of(values, 4095))
        with pytest.raises(ImageLoadError, match="larger than the limit") as exc:
            load_image(Image.open(io.BytesIO(data)), ImageLimits(colour_bit_depth=12, max_bytes=len(data) - 1))
        assert exc.value.kind == "too_large"


def test_pillows_complaints_about_skipped_tags_are_silenced_by_the_applications_filter():
    """A JPEG whose EXIF block declares entries it does not hold decodes; Pillow's complaint about it is silenced by
    the filter an application sets (quiet_pillow_tag_warnings), and said without it."""
    import warnings

    from anomaly_service.images import quiet_pillow_tag_warnings

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert load_image(buf.getvalue()).shape == (16, 16, 3)
    assert any("Corrupt EXIF" in str(w.message) for w in said)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        quiet_pillow_tag_warnings()
        assert load_image(buf.getvalue()).shape == (16, 16, 3)
    assert not any("Corrupt EXIF" in str(w.message) for w in said)


def test_a_float_pages_tags_left_at_their_defaults_and_its_odd_layouts(monkeypatch):
    """Tags a writer may leave out read at the TIFF defaults (no compression, one plane, one BitsPerSample value for
    every sample); a strip of one row; tiles that do not divide the page; deflated strips and tiles."""
    from anomaly_service import float_tiff

    values = np.random.default_rng(15).random((20, 24, 3)).astype(np.float32)
    data = _rgb_tiff(values, rowsperstrip=1)
    prefix, found = float_tiff.pages(io.BytesIO(data), 1)
    tags = found[0]
    assert len(tags[273]) == 20  # a strip a row
    for drop in ((), (259,), (284,), (259, 284)):
        page = float_tiff.float_colour({k: v for k, v in tags.items() if k not in drop}, prefix)
        np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(data), page), values, err_msg=str(drop))
    one_bits = float_tiff.float_colour({**tags, 258: (32,)}, prefix)
    assert one_bits is not None
    np.testing.assert_array_equal(float_tiff.decode(io.BytesIO(data), one_bits), values)
    for kw in ({"tile": (16, 16)}, {"tile": (16, 16), "compression": "zlib"}, {"compression": "zlib",
                                                                              "rowsperstrip": 7}):
        np.testing.assert_array_equal(load_image(_rgb_tiff(values, **kw)), load_image(data), err_msg=str(kw))
    monkeypatch.setattr(float_tiff, "BAND_BYTES", 1)  # a band a row of tiles: the last one's rows cut at the page
    np.testing.assert_array_equal(load_image(_rgb_tiff(values, tile=(16, 16))), load_image(data))


def test_a_single_picture_carries_no_frame_note_and_an_mpo_is_read_at_its_primary_picture():
    """A BMP (Pillow gives it no frame count) and a plain PNG are one frame, said of nothing; an MPO's first picture
    is its primary image by its standard, read without a word as browsers do."""
    rng = np.random.default_rng(16)
    first, second = (Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)) for _ in range(2))
    for fmt in ("BMP", "PNG"):
        assert decode_image(_file(first, fmt)).warnings == ()
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    got = decode_image(buf.getvalue())
    assert got.warnings == ()
    np.testing.assert_array_equal(got.array, load_image(_file(first, "JPEG", quality=95)))
