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
