import io
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_service.errors import ConfigError, ImageLoadError
from anomaly_service.images import ImageLimits, declared_shape, list_images, load_image
from conftest import pages_file


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_roundtrip():
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = load_image(_png(Image.fromarray(arr)))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_channels():
    out = load_image(_png(Image.new("L", (16, 12), 77)))
    assert out.shape == (12, 16, 3) and (out == 77).all()


def test_16bit_scaled_by_full_range():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    out = load_image(_png(Image.fromarray(arr)))
    assert out[5, 5, 0] == 255 and out[0, 0, 0] == 0


def test_cmyk_jpeg():
    out = load_image(_png(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert out.shape == (16, 16, 3)
    assert out[8, 8, 0] > 200 and out[8, 8, 1] < 60  # cyan/magenta/yellow=0,255,255 is red


def test_palette_with_transparency_and_alpha():
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    assert load_image(_png(p, transparency=0)).shape == (10, 10, 3)
    rgba = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 1))  # transparent white, one pixel barely visible -> black
    assert load_image(_png(rgba))[1:].max() == 0


def test_an_alpha_of_zero_everywhere_is_an_unused_byte_not_a_transparent_photo():
    """Camera SDKs and Windows hand over 32-bit RGBX frames whose fourth byte is 0: read as transparency, every
    such photo was blended to a black square, scored as one and warned of as grey. Files, arrays and float TIFFs
    alike read their colours."""
    import tifffile

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    arr[:, :, 3] = 0
    np.testing.assert_array_equal(load_image(arr), arr[:, :, :3])
    np.testing.assert_array_equal(load_image(_png(Image.fromarray(arr, "RGBA"))), arr[:, :, :3])
    values = np.concatenate([rng.random((40, 60, 3), dtype=np.float32), np.zeros((40, 60, 1), np.float32)], axis=2)
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", extrasamples=["unassalpha"])
    assert load_image(buf.getvalue()).min(axis=2).mean() > 20  # the colours, not black


def test_an_rgba_array_loads_as_its_png_file_does():
    """One picture, one score, however it arrives: an array's transparent pixels are composited on black too,
    not stripped of their alpha to show the colour hidden under it (which would even turn a part on a transparent
    background into a surface for orientation any)."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    arr[:8, :, 3] = 0  # a transparent band over random colours
    from_file, from_array = load_image(_png(Image.fromarray(arr, "RGBA"))), load_image(arr)
    np.testing.assert_array_equal(from_array, from_file)
    assert from_array[:8].max() == 0


def _keyed_png(values: np.ndarray, key: tuple[int, ...]) -> bytes:
    """A 16-bit grey (``(H, W)``) or colour (``(H, W, 3)``) PNG of ``values`` whose transparency key is ``key``,
    written by hand: Pillow writes no 16-bit colour PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = values.shape[:2]
    raw = b"".join(b"\0" + r.astype(">u2").tobytes() for r in values)
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if values.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _saved_each_way(photo: np.ndarray, hidden: np.ndarray) -> dict[str, bytes]:
    """``photo`` (a colour of few levels, or grey) with the pixels ``hidden`` transparent, saved every way a file
    says so: a palette's transparent entry, an alpha channel, and a transparency key (the one colour, or grey, that
    ``hidden`` alone holds), at 8 bits and at 16."""
    grey = photo.ndim == 2
    key = photo[hidden][0]
    alpha = np.where(hidden, 0, 255).astype(np.uint8)[:, :, None]
    colours = photo[:, :, None] if grey else photo
    out = {"alpha": _png(Image.fromarray(np.concatenate([colours, alpha], axis=2), "LA" if grey else "RGBA")),
           "key": _png(Image.fromarray(photo), transparency=int(key) if grey else tuple(int(v) for v in key)),
           "key16": _keyed_png(photo.astype(np.uint16) * 257, tuple(int(v) * 257 for v in np.atleast_1d(key)))}
    palette = Image.fromarray(photo).convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE)
    index = int(np.asarray(palette)[hidden][0])
    assert (np.asarray(palette) == index).sum() == hidden.sum()  # the key's colour is one entry, no other pixel's
    out["palette"] = _png(palette, transparency=index)
    return out


@pytest.mark.parametrize("grey", [False, True])
def test_a_picture_reads_the_same_with_its_transparent_pixels_named_by_a_key_a_palette_or_an_alpha(grey):
    """A PNG names its transparent pixels by an alpha channel, a palette's transparent entries, or, grey or RGB, by a
    key: one grey or colour (its tRNS chunk), at the file's own depth. Browsers show all of them transparent; a
    palette's and an alpha's transparent pixels read black, but a key's read as the key's colour, so the same
    picture saved the two ways (an optimiser turns one into the other) scored differently. All read black now, a
    16-bit key compared with the whole 16-bit values, and a model saved before reads the key's colour as it was
    fitted on it (transparency_keys False)."""
    rng = np.random.default_rng(5)
    photo = (rng.integers(1, 6, (24, 32) if grey else (24, 32, 3)) * 40).astype(np.uint8)  # no pixel is white
    hidden = np.zeros((24, 32), bool)
    hidden[3:9, 4:20] = True
    photo[hidden] = 255  # the key: white, which no visible pixel is
    want = np.where(hidden[:, :, None], 0, photo[:, :, None] if grey else photo).astype(np.uint8)
    want = np.broadcast_to(want, (24, 32, 3))
    for how, data in _saved_each_way(photo, hidden).items():
        np.testing.assert_array_equal(load_image(data), want, err_msg=how)
        np.testing.assert_array_equal(load_image(data, ImageLimits(colour_bit_depth=16, bit_depth=16)), want,
                                      err_msg=how)
    colours = np.broadcast_to((photo[:, :, None] if grey else photo), (24, 32, 3))
    older = ImageLimits(transparency_keys=False)
    for how, data in _saved_each_way(photo, hidden).items():
        if how.startswith("key"):
            np.testing.assert_array_equal(load_image(data, older), colours, err_msg=how)
    with Image.open(io.BytesIO(_saved_each_way(photo, hidden)["key"])) as opened:  # a PIL image given as it is
        np.testing.assert_array_equal(load_image(opened), want)


def test_a_sixteen_bit_key_names_its_own_value_only_and_a_key_of_every_pixel_is_no_transparency():
    """A 16-bit key is one value of 65536: a step off it is a visible pixel, though its top byte is the key's (as
    Pillow holds a colour file). A key that names every pixel is no transparency (as an alpha of zero everywhere
    is not): the photo reads as its colours, not as a black square; nor does a key no pixel holds change one."""
    grey = np.full((16, 16), 0xFFFF, np.uint16)
    grey[:, 8:] = 0xFFFE
    got = load_image(_keyed_png(grey, (0xFFFF,)))
    assert got[:, :8].max() == 0 and (got[:, 8:] == 255).all()
    colour = np.repeat(grey[:, :, None], 3, axis=2)
    got = load_image(_keyed_png(colour, (0xFFFF,) * 3))
    assert got[:, :8].max() == 0 and (got[:, 8:] == 255).all()
    flat = np.full((12, 12, 3), (10, 120, 230), np.uint8)
    np.testing.assert_array_equal(load_image(_png(Image.fromarray(flat), transparency=(10, 120, 230))), flat)
    np.testing.assert_array_equal(load_image(_png(Image.fromarray(flat), transparency=(1, 2, 3))), flat)


def test_a_keyed_sixteen_bit_colour_photo_has_its_low_bytes_decoded_once(monkeypatch):
    """A model that keeps a colour depth reads a 16-bit colour photo's low bytes (a second decoding of the file);
    with a transparency key the key's comparison decoded them a second time, the same bytes, for the same answer.
    The key is compared with the reading the photo's values were made of; a mask (no model's depth) reads its own."""
    from anomaly_service import images

    colour = np.full((16, 24, 3), 0x1234, np.uint16)
    colour[:, :8] = 0xFFFF  # the key
    colour[:, 8:12] = 0xFFFE  # a step off it: visible, though its top bytes are the key's
    data = _keyed_png(colour, (0xFFFF,) * 3)
    decoded = []
    low_bytes = images._low_bytes
    monkeypatch.setattr(images, "_low_bytes", lambda *a: decoded.append(a[1:]) or low_bytes(*a))
    got = load_image(data, ImageLimits(colour_bit_depth=16))
    assert got[:, :8].max() == 0 and (got[:, 8:12] == 255).all() and (got[:, 12:] == 0x12).all()
    assert decoded == [(0,)]
    decoded.clear()
    assert (load_image(data)[:, :8] == 0).all() and decoded == [(0,)]  # no depth kept: the key's reading alone


def test_a_keyed_sixteen_bit_colour_photo_given_as_a_decoded_pil_image_reads_its_key_as_its_file_does():
    """A PIL image of a 16-bit colour PNG that was decoded before it was handed over (``load()``, a ``copy()``) has
    lost its file: Pillow holds each channel's top byte, and keeps the tRNS key at 16 bits. The key was compared
    with those top bytes, so a key above 255 named no pixel and the keyed band read as the key's colour (white)
    where the same photo as a file reads it black: one picture, two scores. A key above 255 can only be a 16-bit
    file's; it is compared with the top bytes it has. Only a pixel sharing the key's top bytes but not its low ones
    (a step off it) reads black too: the low byte that tells them apart is gone with the file."""
    colour = np.full((16, 24, 3), 0x0ABC, np.uint16)
    colour[:, :8] = 0xFFFF  # the key: a 12-bit camera's sentinel
    colour[:, 20:] = 0xFFFE  # a step off it
    data = _keyed_png(colour, (0xFFFF,) * 3)
    from_file = load_image(data)
    assert from_file[:, :8].max() == 0 and (from_file[:, 8:20] == 10).all() and (from_file[:, 20:] == 255).all()
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        for given in (opened, opened.copy()):
            got = load_image(given)
            np.testing.assert_array_equal(got[:, :20], from_file[:, :20])
            assert got[:, 20:].max() == 0  # the step off the key: its low byte is gone
    with Image.open(io.BytesIO(_png(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)), transparency=(200,) * 3))
                    ) as eight:
        eight.load()
        assert load_image(eight).max() == 200  # an 8-bit key naming every pixel: no transparency, as from its file


def test_a_pil_image_whose_shape_was_asked_first_reads_as_its_file():
    """A fit and an update given a PIL image opened from a PNG ask its shape before decoding it. Pillow
    decodes a PNG to look for an EXIF chunk after its pixels, so the image that was then decoded had lost its
    tiles: a 16-bit colour key was compared with the top bytes (the keyed white read white, not black). The shape
    is read from a copy of the file now; the image reads as its file does, and the turn is the file's."""
    from anomaly_service.images import declared_shape

    colour = np.full((16, 24, 3), 0x1234, np.uint16)
    colour[:, :8] = 0xFFFF  # the key
    colour[:, 8:12] = 0xFFFE  # a step off it: visible, though its top bytes are the key's
    data = _keyed_png(colour, (0xFFFF,) * 3)
    want = load_image(data)
    assert want[:, :8].max() == 0 and (want[:, 8:12] == 255).all()
    with Image.open(io.BytesIO(data)) as opened:
        assert declared_shape(opened) == (16, 24)
        np.testing.assert_array_equal(load_image(opened), want)
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: the shape swaps
    turned = _png(Image.fromarray(np.full((16, 24, 3), 90, np.uint8)), exif=exif.tobytes())
    with Image.open(io.BytesIO(turned)) as opened:
        assert declared_shape(opened) == (24, 16) == load_image(opened).shape[:2]


def test_a_model_records_how_it_reads_a_key_and_an_older_one_reads_the_keys_colour(model_dir, rng_images, tmp_path):
    """A fit records that it read transparency keys as transparent (preprocessing.transparency_key), and its saved
    model scores a keyed photo as the same picture with an alpha channel. A model saved before (no such field) was
    fitted on keyed photos read with the key's colour, and reads them so still: its threshold was set on them."""
    from anomaly_service import AnomalyModel
    from conftest import write_manifest

    photo = rng_images[0].copy()
    photo[photo.min(axis=2) == 255] = 254
    hidden = np.zeros(photo.shape[:2], bool)
    hidden[10:40, 20:90] = True
    photo[hidden] = 255
    keyed = _png(Image.fromarray(photo), transparency=(255, 255, 255))
    alpha = _png(Image.fromarray(np.concatenate([photo, np.where(hidden, 0, 255)[:, :, None].astype(np.uint8)], 2)))
    shutil.copytree(model_dir / "part", tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"]["transparency_key"] == "transparent"
    model = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert model.score(keyed).score == model.score(alpha).score != model.score(photo).score
    del manifest["preprocessing"]["transparency_key"]
    write_manifest(tmp_path / "m", manifest)
    older = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert older.score(keyed).score == older.score(photo).score


def test_exif_rotation_applied():
    """The photo is turned as a viewer shows it: the pixels, not only the shape (a wrong turn or a mirror has the
    same shape)."""
    yy, xx = np.mgrid[0:20, 0:40]
    arr = np.stack([xx * 6, yy * 12, np.full_like(xx, 90)], axis=-1).astype(np.uint8)  # no symmetry to hide behind
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer turns it 90 degrees clockwise
    out = load_image(_png(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=100))
    assert out.shape[:2] == (40, 20)
    np.testing.assert_allclose(out.astype(int), np.rot90(arr, -1).astype(int), atol=6)


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_a_photo_is_turned_as_pillows_exif_transpose_turns_it_and_kept_as_it_is_when_it_needs_no_turn(orientation):
    """images.upright is Pillow's exif_transpose without the copy it makes of a photo that needs no turn (most
    photos, and a line camera's are many megapixels): the same pixels and size for every orientation, and the
    decoded photo itself where there is nothing to turn (none, 1, or a value exif_transpose ignores)."""
    from PIL import ImageOps

    from anomaly_service.images import upright

    yy, xx = np.mgrid[0:6, 0:10]
    arr = np.stack([xx * 20, yy * 40, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    exif = {} if orientation is None else {"exif": _exif(orientation)}
    img = Image.open(io.BytesIO(_png(Image.fromarray(arr), "PNG", **exif)))
    img.load()
    want = ImageOps.exif_transpose(img.copy())
    got = upright(img)
    assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    assert (got is img) == (orientation in (None, 1, 9))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("block", ["doubled", "cut"])
def test_a_phones_malformed_exif_block_is_read_as_pillow_reads_it_not_refused(block):
    """Phones and upload tools write EXIF blocks that break readers: ``Exif\\0\\0`` twice before the TIFF header, or
    an entry cut short; ``exif_transpose`` raised on such photos in Pillow's earlier releases (Pillow#8348,
    Pillow#4215), and a loader that did not catch it would refuse a good part. Such a photo is read, turned as
    Pillow's own reading of its block turns it, with the same pixels as ``exif_transpose`` gives."""
    from PIL import ImageOps

    yy, xx = np.mgrid[0:12, 0:20]
    arr = np.stack([xx * 12, yy * 20, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    exif = _exif(6)
    exif = b"Exif\x00\x00" + exif if block == "doubled" else exif[:-6]
    data = _png(Image.fromarray(arr), "JPEG", exif=exif, quality=100)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = load_image(data)
    assert out.shape == want.shape and np.array_equal(out, want)
    if block == "doubled":  # Pillow finds the turn behind the repeated header: the part stands as shot
        assert out.shape[:2] == (20, 12)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _before_end(png: bytes, chunk: bytes) -> bytes:
    """``png`` with ``chunk`` after its pixel data, before IEND (the PNG extension allows eXIf there)."""
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_declared_shape_reads_a_pngs_exif_turn_without_decoding_its_pixels(monkeypatch):
    """A fit plans its batches from declared shapes: a PNG turned by its EXIF, wherever the chunk sits, swaps its
    sides as decoding will, and no pixel is decoded to learn it (Pillow's getexif would decode the whole image)."""
    from PIL import PngImagePlugin

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    after = lambda o: _before_end(_png(img), _chunk(b"eXIf", _exif(o)[6:]))  # noqa: E731 - no "Exif" prefix there
    cases = {"after": after(6), "before": _png(img, exif=_exif(6)), "upright": after(1), "none": _png(img)}
    expected = {"after": (40, 20), "before": (40, 20), "upright": (20, 40), "none": (20, 40)}
    for name, data in cases.items():
        assert load_image(data).shape[:2] == expected[name], name

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("declared_shape decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    for name, data in cases.items():
        assert declared_shape(data) == expected[name], name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_declared_shape_of_a_turned_tiff_is_the_shape_decoding_gives(tmp_path, orientation):
    """Pillow reports a TIFF's size already turned by its orientation tag, and the declared shape turned it again: a
    TIFF on its side declared the stored frame, so evaluate refused its turned ground-truth mask as 'not the same
    frame' as its image, and a fit planned such photos at the wrong shape."""
    from anomaly_service.evaluate import Sample, _load_mask, check_masks
    from anomaly_service.images import declared_shape

    truth = np.zeros((96, 128), np.uint8)
    truth[10:30, 90:120] = 255
    Image.fromarray(np.stack([truth] * 3, axis=-1)).save(tmp_path / "img.png")
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(truth)
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}.get(orientation)
    (stored if undo is None else stored.transpose(undo)).save(tmp_path / "mask.tif", exif=exif)
    decoded = load_image(tmp_path / "mask.tif")
    assert np.array_equal(decoded[..., 0], truth)  # shown upright
    assert declared_shape(tmp_path / "mask.tif") == decoded.shape[:2] == (96, 128)
    assert declared_shape(Image.open(tmp_path / "mask.tif")) == (96, 128)
    sample = Sample(tmp_path / "img.png", 1, "blob", tmp_path / "mask.tif")
    check_masks([sample])
    assert np.array_equal(_load_mask(sample, (96, 128)), truth > 0)


def test_declared_shape_of_a_png_turned_where_only_pillow_can_tell_matches_decoding():
    """Orientations Pillow reads from text chunks (XMP, a raw EXIF profile) or from the last of several eXIf chunks:
    declared_shape takes Pillow's own reading there, so it never disagrees with the decoded image."""
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    xmp, raw = PngInfo(), PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    hexed = _exif(6).hex()
    raw.add_text("Raw profile type exif", f"\nexif\n{len(hexed) // 2}\n{hexed}")
    tagged = PngInfo()
    tagged.add_text("Software", "a line camera")  # an ordinary text chunk keeps the fast path
    cases = {"xmp": _png(img, pnginfo=xmp), "raw profile": _png(img, pnginfo=raw),
             "two eXIf": _before_end(_png(img, exif=_exif(1)), _chunk(b"eXIf", _exif(6)[6:])),
             "software tag": _before_end(_png(img, pnginfo=tagged), _chunk(b"eXIf", _exif(8)[6:]))}
    for name, data in cases.items():
        assert declared_shape(data) == load_image(data).shape[:2] == (40, 20), name


def test_declared_shape_of_a_png_with_a_forged_chunk_length_reads_no_more_than_the_file(tmp_path):
    """A chunk that declares ~4 GB and holds 16 bytes: a file read allocates what it is asked for before reading."""
    import tracemalloc

    forged = tmp_path / "forged.png"
    forged.write_bytes(_before_end(_png(Image.new("RGB", (40, 20))), b"\xff\xff\xff\xf0eXIf" + b"\0" * 16))
    tracemalloc.start()
    try:
        assert declared_shape(forged) == (20, 40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "not a recognized")])
def test_garbage_rejected(data, reason):
    with pytest.raises(ImageLoadError, match=reason):
        load_image(data)


def test_truncated_rejected():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}), ("PNG", {}),
                                         ("TIFF", {}), ("BMP", {}), ("GIF", {}), ("PPM", {})])
def test_a_cut_photo_is_refused_whatever_pillows_load_truncated_images(monkeypatch, fmt, options):
    """Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is process-wide, and training scripts turn it on to read their own
    damaged files (Pillow#2717, StableTuner#68): a library caller's photo cut short on its way was then read with its
    missing rows grey or black, and scored or learnt as a part. A whole photo reads as it does with the switch off."""
    arr = np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert("P") if fmt == "GIF" else Image.fromarray(arr)
    data = _png(img, fmt, **options)
    expected = load_image(data)
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as exc:
        load_image(data[: len(data) * 2 // 3])
    assert exc.value.kind == "corrupt"
    np.testing.assert_array_equal(load_image(data), expected)



def _whole_but_unusual() -> dict[str, bytes]:
    """Whole photos whose pixels are all there, which Pillow reads with its switch off, but whose reading asks
    for a byte past their end: a plain PGM whose last value has no newline after it (netpbm asks for whitespace
    between values, not after the last), and a PNG without its closing IEND chunk (every IDAT there)."""
    arr = np.random.default_rng(1).integers(0, 255, (24, 20), dtype=np.uint8)
    plain = f"P2\n{arr.shape[1]} {arr.shape[0]}\n255\n{' '.join(str(v) for v in arr.reshape(-1))}".encode()
    return {"plain PGM": plain, "PNG without IEND": _png(Image.fromarray(arr))[:-12]}


@pytest.mark.parametrize("kind", ["plain PGM", "PNG without IEND"])
def test_a_whole_photo_that_reads_past_its_end_is_read_whatever_load_truncated_images(monkeypatch, kind):
    """The cut-photo check counted every read that found the file's end, and these readers look past a whole
    file's end once: refused only where another library had turned Pillow's LOAD_TRUNCATED_IMAGES on. Only a read
    that Pillow's own decoding loop would have called truncated counts."""
    data = _whole_but_unusual()[kind]
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", False)
    expected = load_image(data, ImageLimits(min_side=0))
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", True)
    np.testing.assert_array_equal(load_image(data, ImageLimits(min_side=0)), expected)
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):  # and cut short, still refused
        load_image(data[: len(data) * 2 // 3], ImageLimits(min_side=0))



@pytest.mark.parametrize("cut", ["inside the chunk head after an IDAT", "an IDAT short and IEND after it"])
def test_a_png_cut_between_or_inside_its_chunks_is_refused_whatever_load_truncated_images(monkeypatch, cut):
    """A PNG of several IDAT chunks cut a few bytes into the next chunk's head (Pillow's chunk reader fails on the
    short head, which its decoding loop takes for the end of the file when the switch is on), and one whose pixel
    data ends early with a whole IEND after it (the PNG reader answers the loop with nothing, the file itself never
    runs out): both are refused with the switch on, as they are with it off."""
    import struct
    import zlib

    arr = np.random.default_rng(2).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = _png(Image.fromarray(arr))
    start = 8 + 8 + 13 + 4  # the signature, then IHDR's head, body and CRC: the first IDAT's head
    length = struct.unpack(">I", data[start:start + 4])[0]
    assert data[start + 4:start + 8] == b"IDAT" and data[start + 12 + length + 4:start + 12 + length + 8] == b"IDAT"
    if cut.startswith("inside"):
        broken = data[:start + 12 + length + 3]
    else:
        half = data[start + 8:start + 8 + length // 2]
        broken = (data[:start] + struct.pack(">I", len(half)) + b"IDAT" + half
                  + struct.pack(">I", zlib.crc32(b"IDAT" + half)) + data[-12:])
    for on in (False, True):
        monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", on)
        with pytest.raises(ImageLoadError, match="corrupt or truncated"):
            load_image(broken)


def test_pixel_limit_checked_before_decoding():
    data = _png(Image.new("L", (2000, 2000)))
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(data, ImageLimits(max_pixels=1_000_000))


def test_byte_limit_and_min_side():
    with pytest.raises(ImageLoadError, match="larger than the limit"):
        load_image(_png(Image.new("L", (50, 50))), ImageLimits(max_bytes=10))
    with pytest.raises(ImageLoadError, match="smaller than"):
        load_image(_png(Image.new("L", (4, 50))))


@pytest.mark.parametrize("read", [load_image, declared_shape])
def test_a_file_deleted_between_the_look_and_the_read_is_missing_not_an_os_error(tmp_path, monkeypatch, read):
    """A recorded photo the records located can be deleted by a retention pass right after the reader looked for
    it: the open raised FileNotFoundError, which no caller takes for an image that does not load (a 500 from an
    update). It is the same missing file as one never there. The file is real and really deleted; the look only
    picks the moment."""
    from pathlib import Path

    path = tmp_path / "photo.png"
    path.write_bytes(_png(Image.new("L", (50, 50))))
    real_is_file = Path.is_file

    def deleted_once_looked_at(self: Path) -> bool:
        there = real_is_file(self)
        if there and self == path:
            path.unlink()
        return there

    monkeypatch.setattr(Path, "is_file", deleted_once_looked_at)
    with pytest.raises(ImageLoadError, match="photo: no such file") as caught:
        read(path, name="photo")
    assert caught.value.kind == "missing" and not path.exists()
    monkeypatch.undo()
    path.write_bytes(_png(Image.new("L", (50, 50))))
    with pytest.raises(ImageLoadError, match="larger than the limit"):  # still told from its size, opened once
        load_image(path, ImageLimits(max_bytes=10))


def test_arrays_accepted():
    assert load_image(np.zeros((20, 20), dtype=np.uint16)).shape == (20, 20, 3)
    assert load_image(np.ones((20, 20, 4), dtype=np.float32)).max() == 255


def test_list_images_skips_non_images(tmp_path):
    Image.new("L", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    images, skipped = list_images(tmp_path)
    assert [p.name for p in images] == ["a.png"] and [p.name for p in skipped] == ["notes.txt"]
    with pytest.raises(ImageLoadError, match="no such file"):
        list_images(tmp_path / "missing")


def test_a_recursive_listing_passes_over_hidden_folders_as_it_does_hidden_files(tmp_path):
    """An archive on a NAS or a desktop holds trash and thumbnail folders (copies and deleted photos): a recursive
    listing (score --shard, --output) took their images as parts while it passed over hidden files."""
    for folder in ["day1", "day1/.@__thumb", ".Trash-1000/files"]:
        (tmp_path / folder).mkdir(parents=True)
        Image.new("L", (10, 10)).save(tmp_path / folder / "part.png")
    images, skipped = list_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["day1/part.png"] and skipped == []
    hidden = tmp_path / "day1" / ".@__thumb"  # named, it is taken: whoever named it meant it
    assert list_images(hidden, recursive=True)[0] == [hidden / "part.png"]


def test_a_recursive_listing_follows_links_to_folders_once_each(tmp_path):
    """A day's photos linked into the archive (``ln -s /mnt/cam2/2024-05-01 day2``) were neither read nor
    reported: ``rglob`` follows no link. A link back up the tree is followed no further (no loop)."""
    root, elsewhere = tmp_path / "archive", tmp_path / "cam2"
    for folder in (root / "day1", elsewhere):
        folder.mkdir(parents=True)
        Image.new("L", (10, 10)).save(folder / "part.png")
    (root / "day2").symlink_to(elsewhere, target_is_directory=True)
    (root / "day1" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "again").symlink_to(root / "day1", target_is_directory=True)  # the same folder twice
    images, skipped = list_images(root, recursive=True)
    assert [p.relative_to(root).as_posix() for p in images] == ["day1/part.png", "day2/part.png"]
    assert skipped == []


def test_a_folder_lists_every_accepted_format(tmp_path):
    """docs/service.md: PNG, JPEG, BMP, TIFF, WebP, GIF and PPM are accepted; a folder of any of them is read."""
    formats = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif", "PPM": "ppm"}
    assert set(formats) <= ImageLimits().formats
    for fmt, ext in formats.items():
        Image.new("RGB", (40, 40), (20, 40, 60)).save(tmp_path / f"part.{ext}", format=fmt)
    Image.new("L", (40, 40), 50).save(tmp_path / "gray.pgm", format="PPM")
    images, skipped = list_images(tmp_path)
    assert len(images) == len(formats) + 1 and skipped == []
    assert all(load_image(p).shape == (40, 40, 3) for p in images)


def test_errors_carry_a_kind_and_unlisted_formats_are_refused():
    ico = _png(Image.new("RGB", (32, 32), (1, 2, 3)), "ICO")  # Pillow decodes ICO; uploads should not reach it
    with pytest.raises(ImageLoadError, match="format ICO is not accepted") as exc:
        load_image(ico)
    assert exc.value.kind == "unsupported_format"
    assert load_image(ico, ImageLimits(formats=None)).shape == (32, 32, 3)
    for data, kind in [(b"", "empty"), (b"plain text", "not_image")]:
        with pytest.raises(ImageLoadError) as exc:
            load_image(data)
        assert exc.value.kind == kind
    with pytest.raises(ImageLoadError) as exc:
        load_image(_png(Image.new("RGB", (100, 100))), ImageLimits(max_pixels=50))
    assert exc.value.kind == "too_large"


def _chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _declared_png(width: int, height: int) -> bytes:
    """A few dozen bytes whose header declares ``width x height`` pixels: a decompression bomb's shape."""
    import struct

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"x\x9c\x03\x00\x00\x00\x00\x01") + \
        _chunk(b"IEND", b"")


def _declared_gif(width: int, height: int) -> bytes:
    import struct

    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + \
        b"\x2c\x00\x00\x00\x00" + struct.pack("<HH", width, height) + b"\x00\x02\x02\x44\x01\x00\x3b"


def _declared_jpeg(width: int, height: int) -> bytes:
    """A whole one-pixel JPEG (tables, scan) whose frame header declares ``width`` x ``height``: Pillow before 13
    could not identify a JPEG that was its frame header alone."""
    import struct

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="JPEG", optimize=True)
    data = buf.getvalue()
    at = data.index(b"\xff\xc0") + 5  # past the marker, the length and the sample precision
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4:]


@pytest.mark.parametrize("data", [_declared_png(50000, 50000), _declared_gif(65000, 65000),
                                  _declared_jpeg(65000, 65000)], ids=["png", "gif", "jpeg"])
def test_decompression_bombs_are_too_large_not_errors(data):
    assert len(data) < 200
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.kind == "too_large"
    # said against the service's limit, with the declared size; never Pillow's own limit and its wording
    limit = ImageLimits().max_pixels
    assert f"exceeds the limit of {limit} pixels" in str(exc.value)
    assert "decompression bomb" not in str(exc.value) and str(Image.MAX_IMAGE_PIXELS) not in str(exc.value)


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("JPEG", {"quality": 95}), ("TIFF", {}),
                                     ("TIFF", {"tile": (16, 16), "compression": "tiff_deflate"})],
                         ids=["png", "jpeg", "tiff", "tiled-tiff"])
def test_a_photo_within_our_pixel_limit_is_read_whatever_pillows_own(monkeypatch, fmt, kw):
    """Pillow refuses a header past twice its process-wide MAX_IMAGE_PIXELS (about 179 MP) as a decompression bomb
    (Pillow#5218): a line camera's photo within a --max-pixels raised for it was refused and said to exceed a limit
    it was within, and a TIFF's page was refused again as it decoded. Pillow's limit is lowered here to reach it
    with a small photo; ours, checked from the header, is the one that counts, and Pillow's is left as it was."""
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    data = _png(photo, fmt, **kw)
    expected = load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    assert declared_shape(data) == (48, 64)
    assert np.array_equal(load_image(data), expected)
    with pytest.raises(ImageLoadError) as exc:  # ours still refuses past its own
        load_image(data, ImageLimits(max_pixels=48 * 64 - 1))
    assert exc.value.kind == "too_large"
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_photo_past_pillows_pixel_limit_keeps_its_turn_and_its_sixteen_bit_colours(monkeypatch):
    """The second opens of decoding (a photo's EXIF turn read from its header; a 16-bit colour photo's low bytes,
    decoded again) made Pillow's check too: past its limit and within ours, a turned photo was taken as upright
    and a 16-bit colour TIFF read against a model's 12-bit white was refused as corrupt."""
    import tifffile

    from anomaly_service.images import decode_image, declared_orientation

    exif = Image.Exif()
    exif[0x0112] = 6
    turned = _png(Image.fromarray(np.zeros((48, 64, 3), np.uint8)), "TIFF", exif=exif.tobytes())
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.random.default_rng(5).integers(0, 4095, (48, 64, 3), dtype=np.uint16))
    deep = buffer.getvalue()
    twelve = ImageLimits(colour_bit_depth=12)
    expected = decode_image(deep, twelve).array
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    assert declared_orientation(turned) == 6
    assert np.array_equal(decode_image(deep, twelve).array, expected)


def test_a_fit_and_an_evaluation_read_photos_and_masks_past_pillows_pixel_limit(monkeypatch, tmp_path):
    """A fit's look at its photos' JPEG quality and bit depth, and an evaluation's mask (the photo's size), opened
    them with Pillow's check: past its limit and within ours, the quality was unknown, the bit depth refused the fit
    ("cannot read image") and the mask stopped the evaluation with Pillow's error."""
    from anomaly_service.bit_depth import needed
    from anomaly_service.images import source_quality
    from anomaly_service.evaluate import Sample, _load_mask

    jpeg = tmp_path / "part.jpg"
    jpeg.write_bytes(_png(Image.fromarray(np.full((48, 64, 3), 90, np.uint8)), "JPEG", quality=80))
    deep = tmp_path / "part.tif"
    Image.fromarray(np.full((48, 64), 3000, np.uint16)).save(deep)
    mask = tmp_path / "part_mask.png"
    drawn = np.zeros((48, 64), np.uint8)
    drawn[10:20, 10:20] = 255
    Image.fromarray(drawn).save(mask)
    sample = Sample(jpeg, 1, "dent", mask)
    expected = (source_quality(jpeg), source_quality(jpeg.read_bytes()), needed(deep), needed(deep.read_bytes()),
                _load_mask(sample, (48, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    assert source_quality(jpeg) == source_quality(jpeg.read_bytes()) == expected[0] == 80
    assert needed(deep) == needed(deep.read_bytes()) == expected[2] == ("grey", 12)
    assert np.array_equal(_load_mask(sample, (48, 64)), expected[4]) and expected[4].sum() == 100


def test_a_tiff_mask_past_pillows_pixel_limit_is_read(monkeypatch, tmp_path):
    """A TIFF makes Pillow's check again as its page decodes: an evaluation's TIFF mask the photo's size, past
    Pillow's limit and within ours, stopped the evaluation with Pillow's DecompressionBombError, uncaught."""
    from anomaly_service.evaluate import Sample, _load_mask

    drawn = np.zeros((48, 64), np.uint8)
    drawn[10:20, 10:20] = 255
    Image.fromarray(drawn).save(tmp_path / "part_mask.tif")
    Image.fromarray(drawn).save(tmp_path / "part.png")
    sample = Sample(tmp_path / "part.png", 1, "dent", tmp_path / "part_mask.tif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    assert _load_mask(sample, (48, 64)).sum() == 100


def test_a_webp_past_pillows_pixel_limit_needs_pillows_own_raised(monkeypatch):
    """WebP's opener makes Pillow's check itself, before its decoder sets aside the canvas, so reading past Pillow's
    check at the header (images._pillow_open) does not reach it: a WebP within ours and past Pillow's was refused
    as exceeding our limit, which it was within. It now says whose limit refused it; the command line and the
    service, whose process is their own, raise Pillow's limit to theirs (shell.image_limits, serve), and it reads."""
    from anomaly_service.cli.shell import image_limits

    data = _png(Image.fromarray(np.random.default_rng(6).integers(0, 255, (48, 64, 3), dtype=np.uint8)), "WEBP",
                lossless=True)
    expected = load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert exc.value.kind == "too_large"
    assert "3072 pixels is within the limit of 40000000 pixels but past Pillow's own for a WEBP file" in str(exc.value)
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", str(48 * 64))
    limits = image_limits()
    assert Image.MAX_IMAGE_PIXELS == 48 * 64
    assert np.array_equal(load_image(data, limits), expected)
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", "500")  # never lowered: other code in the process may rely on it
    image_limits()
    assert Image.MAX_IMAGE_PIXELS == 48 * 64


def test_a_stored_photo_past_pillows_pixel_limit_keeps_its_extension_drawing_and_overlay(monkeypatch):
    """What the service does with a photo it admitted, past Pillow's pixel limit and within ours: its overlay
    opened the stored heatmap (the photo's size) with Pillow's check, a 500 `internal_error` from a real server,
    the file store named it `.bin`, and the page sent a 16-bit one to the browser as one it could not show instead
    of drawing it."""
    from anomaly_service.api.pictures import needs_drawing
    from anomaly_service.api.routes.inspections import overlay_from_files
    from anomaly_service.records.files import extension_of

    photo = _png(Image.fromarray(np.random.default_rng(4).integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    heatmap = _png(Image.new("P", (64, 48), 7))
    expected = overlay_from_files(photo, heatmap, ImageLimits())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 is past twice this
    assert overlay_from_files(photo, heatmap, ImageLimits()) == expected
    assert extension_of(photo) == "png"
    deep = _png(Image.fromarray(np.full((48, 64), 3000, np.uint16)))  # 16 bits: drawn, no browser shows it so
    assert needs_drawing(deep) is True


def test_decoding_leaves_no_warning_filter_behind_and_ignores_one_set_elsewhere():
    """The pixel limit needs no process-wide state: concurrent decodes leave the warning filters as they were,
    and a filter some other code turned into an error does not turn a too-large image into a crash."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    small = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: load_image(small), range(64)))
    assert warnings.filters == before
    big = _declared_png(10000, 10000)  # above Pillow's warning level, below its error level
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError) as exc:
            load_image(big)
    assert exc.value.kind == "too_large"


def _noise(seed: int, w: int = 60, h: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_a_tiff_with_a_reduced_resolution_page_is_read_at_its_full_page_and_says_so():
    """A line camera's TIFF with a preview page first was scored on the preview, silently. A page marked as a
    reduced-resolution copy makes the largest page the photo, wherever it sits; the answer says which was read."""
    from anomaly_service.images import declared_size, decode_image

    photo = _noise(1)
    data = pages_file(photo.resize((30, 20)), photo, reduced=(0,))
    got = decode_image(data)
    np.testing.assert_array_equal(got.array, np.asarray(photo))
    assert len(got.warnings) == 1
    assert "2 frames" in got.warnings[0] and "frame 2" in got.warnings[0] and "largest" in got.warnings[0]
    assert declared_size(data)[:2] == (60, 40)  # what admission counts is the page that is decoded
    assert declared_shape(data) == (40, 60)
    # the pixel limit applies to the page read, from its header, not to the small page first in the file
    for check in (lambda: decode_image(data, ImageLimits(max_pixels=60 * 40 - 1)),
                  lambda: declared_size(data, ImageLimits(max_pixels=60 * 40 - 1))):
        with pytest.raises(ImageLoadError) as exc:
            check()
        assert exc.value.kind == "too_large" and "60x40" in str(exc.value)


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_a_stack_of_frames_is_read_at_its_first_and_says_so(fmt):
    """A stack of exposures (no page marked as a copy) or an animation: the first frame is read, and the warning
    names how many frames there are and which one was read; a single-frame file carries no warning."""
    from anomaly_service.images import decode_image

    frames = [_noise(s).convert("P") if fmt == "GIF" else _noise(s) for s in (2, 3, 4)]
    got = decode_image(pages_file(*frames, fmt=fmt))
    np.testing.assert_array_equal(got.array, load_image(_png(frames[0], fmt)))
    assert len(got.warnings) == 1 and "3 frames" in got.warnings[0] and "frame 1 (the first" in got.warnings[0]
    assert decode_image(_png(frames[0], fmt)).warnings == ()


def test_decode_each_passes_over_what_does_not_decode_and_says_what_each_file_was_read_as():
    """The one walk over many files a fit's loading, an update and an evaluation share: each file that decodes
    with its place and what decoding said (which frame), each that does not handed to the caller's ``skip`` with
    its error, labelled with the caller's name for it; the walk goes on past it."""
    from anomaly_service.images import decode_each

    stack = pages_file(_noise(2), _noise(3))
    skipped: list[tuple[int, str]] = []
    got = list(decode_each([_png(_noise(1)), b"", stack], names=["a.png", "b.png", "c.tif"],
                           skip=lambda i, exc: skipped.append((i, str(exc)))))
    assert [i for i, _ in got] == [0, 2] and got[0][1].array.shape == (40, 60, 3)
    assert got[0][1].warnings == () and "2 frames" in got[1][1].warnings[0]
    assert [i for i, _ in skipped] == [1] and skipped[0][1].startswith("b.png: ")
    assert [i for i, _ in decode_each([b"", stack])] == [1]  # no skip given: passed over all the same


def test_a_tiff_of_very_many_pages_is_not_walked_to_its_end():
    from anomaly_service.images import FRAMES_SEARCHED, decode_image

    tiny = Image.new("L", (8, 8), 9)
    got = decode_image(pages_file(*[tiny] * (FRAMES_SEARCHED + 5)))
    assert f"more than {FRAMES_SEARCHED} frames" in got.warnings[0] and (got.array == 9).all()


def test_an_animated_photo_is_drawn_for_the_page_as_the_frame_the_model_read():
    """A browser plays an animated GIF; the model read its first frame: the page is sent that frame, drawn."""
    from anomaly_service.api.pictures import needs_drawing

    frames = [_noise(s).convert("P") for s in (5, 6)]
    assert needs_drawing(pages_file(*frames, fmt="GIF"))
    assert not needs_drawing(_png(frames[0], "GIF"))


def _stretched(values: np.ndarray) -> np.ndarray:
    """A float photo as images.py reads one: its own least and greatest values are black and white."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.clip((values.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _float_rgb_tiff(values: np.ndarray, compression: int = 1, predictor: int = 1, order: str = "<") -> bytes:
    """A one-strip float RGB TIFF as libtiff-based software writes it, with TIFF's floating-point predictor when
    ``predictor`` is 3 (tifffile writes that, and LZW, only with imagecodecs, not installed here): deflate (8) by
    zlib, LZW (5) by libtiff itself through Pillow, on the strip's bytes."""
    import struct
    import zlib

    h, w, c = values.shape
    nbytes = values.dtype.itemsize
    if predictor == 3:  # each row: its samples' bytes grouped most significant first, each minus the one c before
        groups = values.astype(f">f{nbytes}").view(np.uint8).reshape(h, w * c, nbytes).transpose(0, 2, 1)
        shuffled = groups.reshape(h, w * c * nbytes).astype(np.int16)
        shuffled[:, c:] -= shuffled[:, :-c].copy()
        rows = (shuffled % 256).astype(np.uint8).tobytes()
    else:
        rows = values.astype(f"{order}f{nbytes}").tobytes()
    if compression == 8:
        data = zlib.compress(rows)
    elif compression == 5:
        buf = io.BytesIO()
        Image.frombytes("L", (w * c * nbytes, h), rows).save(buf, "TIFF", compression="tiff_lzw")
        written = Image.open(io.BytesIO(buf.getvalue()))
        data = b"".join(buf.getvalue()[o:o + n] for o, n in zip(written.tag_v2[273], written.tag_v2[279]))
        assert written.tag_v2.get(278, h) >= h  # one strip, as the tags below say
    else:
        data = rows
    tags = [(256, 4, w), (257, 4, h), (258, 3, None), (259, 3, compression), (262, 3, 2), (273, 4, 8), (277, 3, c),
            (278, 4, h), (279, 4, len(data)), (284, 3, 1), (317, 3, predictor), (339, 3, None)]
    ifd_at = 8 + len(data) + (len(data) & 1)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    entries, extra = [struct.pack(order + "H", len(tags))], b""
    for tag, kind, value in tags:
        if value is None:  # bits and sample format, one a sample: past the directory
            entries.append(struct.pack(order + "HHLL", tag, kind, c, extra_at + len(extra)))
            extra += struct.pack(order + "H" * c, *([nbytes * 8] * c if tag == 258 else [3] * c))
        elif kind == 3:
            entries.append(struct.pack(order + "HHLHH", tag, kind, 1, value, 0))
        else:
            entries.append(struct.pack(order + "HHLL", tag, kind, 1, value))
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HL", 42, ifd_at)
    return head + data + b"\0" * (len(data) & 1) + b"".join(entries) + struct.pack(order + "L", 0) + extra


def _tiff(values: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    separate = kw.get("planarconfig") == "separate"
    tifffile.imwrite(buf, np.moveaxis(values, 2, 0) if separate else values, photometric="rgb", **kw)
    return buf.getvalue()


def test_a_float_colour_tiff_is_read_as_a_float_grey_one_is():
    """Pillow refuses a float RGB TIFF outright (415 not_image) while it reads a float grey one. It is read with the
    grey one's rule, the photo's own range stretched to 8 bits, the three channels alike (so a colour TIFF whose
    channels are one grey picture reads as that grey float TIFF): 16-, 32- and 64-bit floats, either byte order,
    strips or tiles, one plane or three, uncompressed, deflated, LZW (as libtiff writes it) and with the
    floating-point predictor."""
    from PIL import UnidentifiedImageError

    values = np.random.default_rng(3).random((37, 53, 3)) * 5 - 2
    data = _tiff(values.astype(np.float32))
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(data))
    assert Image.open(io.BytesIO(_png(Image.fromarray(values[:, :, 0].astype(np.float32), "F"), "TIFF"))).mode == "F"
    cases = {f"{dtype.__name__} {kw}": (dtype, _tiff(values.astype(dtype), **kw))
             for dtype in (np.float16, np.float32, np.float64)
             for kw in ({}, {"byteorder": ">"}, {"compression": "zlib", "rowsperstrip": 5}, {"tile": (16, 32)},
                        {"planarconfig": "separate"},
                        {"compression": "zlib", "tile": (16, 16), "planarconfig": "separate", "byteorder": ">"})}
    cases.update({f"{dtype.__name__} compression {c} predictor {p} {o}": (
        dtype, _float_rgb_tiff(values.astype(dtype), c, p, o))
        for dtype in (np.float16, np.float32, np.float64) for c in (1, 5, 8) for p in (1, 3) for o in "<>"})
    for name, (dtype, tiff) in cases.items():
        np.testing.assert_array_equal(load_image(tiff), _stretched(values.astype(dtype)), err_msg=name)
    grey = np.random.default_rng(4).random((30, 40)).astype(np.float32) * 9 - 4
    grey_tiff = _png(Image.fromarray(grey, "F"), "TIFF")
    np.testing.assert_array_equal(load_image(_tiff(np.repeat(grey[:, :, None], 3, axis=2))), load_image(grey_tiff))


def test_the_float_predictor_is_undone_as_libtiff_writes_it():
    """The predictor's byte order checked against libtiff's own encoder (a float grey TIFF Pillow writes through
    libtiff with it), not only against the test's writer above."""
    import zlib

    from anomaly_service.float_tiff import _undo_float_predictor

    values = (np.random.default_rng(5).random((9, 24)) * 7 - 3).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(values, "F").save(buf, "TIFF", compression="tiff_adobe_deflate", tiffinfo={317: 3})
    written = Image.open(io.BytesIO(buf.getvalue()))
    assert written.tag_v2[317] == 3 and np.array_equal(np.asarray(written), values)
    strips = b"".join(zlib.decompress(buf.getvalue()[o:o + n])
                      for o, n in zip(written.tag_v2[273], written.tag_v2[279]))
    rows = np.frombuffer(strips, np.uint8).reshape(9, 24 * 4)
    np.testing.assert_array_equal(_undo_float_predictor(rows, 1, 4, 1), values)


def test_a_float_colour_tiff_is_turned_framed_blended_and_declared_as_any_photo():
    """What every other photo gets: its orientation tag turns it, a page marked as a reduced-resolution copy
    leaves the largest page to be scored (and says so), an alpha channel blends on black, the header alone gives
    its size (admission, a fit's plan) and a large page (read in bands) reads whole; a broken one is a 400, not a
    crash, and a byte count forged to gigabytes is refused before it is read."""
    import tifffile

    from anomaly_service.images import decode_image, declared_size

    values = np.random.default_rng(6).random((40, 60, 3)).astype(np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    turned = buf.getvalue()
    np.testing.assert_array_equal(load_image(turned), np.rot90(_stretched(values), -1))
    assert declared_shape(turned) == (60, 40) and declared_size(turned) == (60, 40, "TIFF")
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(values[::2, ::2], photometric="rgb", subfiletype=1)
        tif.write(values, photometric="rgb")
    got = decode_image(buf.getvalue())
    np.testing.assert_array_equal(got.array, _stretched(values))
    assert len(got.warnings) == 1 and "frame 2 (the largest" in got.warnings[0]
    alpha = np.concatenate([values, np.ones((40, 60, 1), np.float32)], axis=2)
    alpha[:10, :, 3] = 0
    buf = io.BytesIO()
    tifffile.imwrite(buf, alpha, photometric="rgb", extrasamples=["unassalpha"])
    blended = load_image(buf.getvalue())
    np.testing.assert_array_equal(blended[10:], _stretched(values)[10:])
    assert blended[:10].max() == 0
    big = np.random.default_rng(7).random((1000, 1500, 3)).astype(np.float32)  # 18 MB: more than one band
    for kw in ({}, {"compression": "zlib", "rowsperstrip": 16}, {"compression": "zlib", "tile": (64, 64)}):
        np.testing.assert_array_equal(load_image(_tiff(big, **kw)), _stretched(big), err_msg=str(kw))
    data = _tiff(values)
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as exc:
        load_image(data[: len(data) // 2])
    assert exc.value.kind == "corrupt"
    forged = _float_rgb_tiff(values)
    at = forged.index((40 * 60 * 12).to_bytes(4, "little"), 8 + 40 * 60 * 12)  # the strip's byte count
    with pytest.raises(ImageLoadError, match="past the end of the file"):
        load_image(forged[:at] + (2**32 - 1).to_bytes(4, "little") + forged[at + 4:])
    import struct

    rows = struct.pack("<HHLL", 278, 4, 1, 40)  # rows per strip: forged to none
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(forged.replace(rows, struct.pack("<HHLL", 278, 4, 1, 0)))
    colour = struct.pack("<HHLHH", 262, 3, 1, 2, 0)  # its photometric tag, forged to two values
    try:  # Pillow 13 drops such a tag: no longer a colour page; earlier releases read its first value, RGB
        np.testing.assert_array_equal(load_image(forged.replace(colour, struct.pack("<HHLHH", 262, 3, 2, 2, 2))),
                                      _stretched(values))
    except ImageLoadError as exc:
        assert exc.kind == "not_image"


def test_an_infinity_in_a_float_photo_reads_white_not_every_other_pixel_black():
    """The float range rule, grey and colour: the photo's least and greatest finite values are black and white.
    One +inf pixel stretched every finite value of a float grey TIFF to black."""
    grey = np.random.default_rng(8).random((30, 40)).astype(np.float32)
    grey[0, 0] = np.inf
    got = load_image(_png(Image.fromarray(grey, "F"), "TIFF"))[:, :, 0]
    finite = np.delete(grey.ravel(), 0)
    lo, hi = float(finite.min()), float(finite.max())
    want = np.clip((grey.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert got[0, 0] == 255 and got.mean() > 60
    np.testing.assert_array_equal(got.ravel()[1:], want.ravel()[1:])
    colour = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(load_image(_tiff(colour))[:, :, 0], got)


def test_the_service_scores_a_float_colour_tiff_and_draws_it_for_the_page(model_dir):
    """Through admission (its size from the header), decoding and scoring: 200 where it was 415, with the photo
    drawn for the live view (no browser shows a TIFF) and stored under its format's extension."""
    from anomaly_service.api.pictures import needs_drawing
    from anomaly_service.records.files import extension_of
    from conftest import textured_part
    from test_api import client_for, post

    values = textured_part(np.random.default_rng(9)).astype(np.float32) / 255.0
    data = _tiff(values, compression="zlib")
    assert needs_drawing(data) and extension_of(data) == "tif"  # stored as the TIFF it is, not as .bin
    with client_for(model_dir) as client:
        r = post(client, data, "part.tif", "image/tiff", photo="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["image_width"], body["image_height"]) == (128, 128) and body["photo"] is not None


def test_a_photo_is_told_grey_or_colour_from_its_pixels_not_its_file():
    """A grey file, a grey picture saved as RGB (PNG or JPEG) and a mono camera's 16-bit photo are grey; a colour
    camera's photo of a grey part (its channels a few levels apart in every pixel) and a grey photo with a coloured
    label are colour."""
    from anomaly_service.images import is_grey
    from conftest import textured_part

    part = textured_part(np.random.default_rng(10))
    grey = np.asarray(Image.fromarray(part).convert("L"))
    assert is_grey(load_image(_png(Image.fromarray(grey))))
    assert is_grey(load_image(_png(Image.fromarray(grey).convert("RGB"))))
    assert is_grey(load_image(_png(Image.fromarray(grey).convert("RGB"), "JPEG", quality=90)))
    assert is_grey(load_image((grey.astype(np.uint16) * 16)))
    noise = np.random.default_rng(11).integers(-4, 5, (*grey.shape, 3))
    assert not is_grey(np.clip(grey[:, :, None] + noise, 0, 255).astype(np.uint8))
    label = np.repeat(grey[:, :, None], 3, axis=2)
    label[40:60, 40:60] = (200, 30, 30)
    assert not is_grey(label) and not is_grey(part)


def test_a_grey_photo_sent_to_a_colour_model_or_the_reverse_is_scored_with_a_warning(fitted_model, model_dir,
                                                                                        tmp_path):
    """The model records what its good photos were; a grey photo to a model of colour ones (a mono camera put on
    the line, a photo converted on the way) and a colour one to a model of grey ones are scored with a warning
    that says which, in the library, the service and the CLI; a model of both, and one saved before it was kept,
    say nothing; an update leaves a photo of the other kind out (learnt, it would be read as unlike every part), and
    says so."""
    from click.testing import CliRunner

    from anomaly_service import AnomalyModel
    from anomaly_service.cli import app
    from conftest import png_bytes, textured_part, write_manifest
    from test_api import client_for, post

    rng = np.random.default_rng(12)
    colour = textured_part(rng)
    grey = np.asarray(Image.fromarray(textured_part(rng)).convert("L"))
    assert fitted_model.manifest_.preprocessing.channels == "colour"
    assert not [w for w in fitted_model.score(colour).warnings if "grey" in w]
    said = [w for w in fitted_model.score(grey).warnings if "grey" in w]
    assert len(said) == 1 and said[0].startswith("this photo is grey") and "were in colour" in said[0]
    with client_for(model_dir) as client:
        assert any(w.startswith("this photo is grey") for w in post(client, png_bytes(grey)).json()["warnings"])
    photo = tmp_path / "grey.png"
    Image.fromarray(grey).save(photo)
    r = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(photo)])
    assert r.exit_code == 0 and f"warning: {photo}: this photo is grey" in r.output, r.output

    greys = [np.asarray(Image.fromarray(textured_part(rng)).convert("L")) for _ in range(6)]
    mono = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        calibration_fraction=0.25).fit(greys)
    assert mono.manifest_.preprocessing.channels == "grey"
    said = [w for w in mono.score(colour).warnings if "grey" in w]
    assert len(said) == 1 and said[0].startswith("this photo is in colour")
    assert not [w for w in mono.score(greys[0]).warnings if "grey" in w]
    grown = mono.update([colour, grey], names=["colour.png", "grey.png"])
    assert grown.manifest_.preprocessing.channels == "grey" and grown.manifest_.lineage.images_added == 1
    assert [name for name, _ in grown.unlike_] == ["colour.png"] and "colour.png" not in grown.catalog_.names
    assert grown.unlike_[0][1].startswith("this photo is in colour")
    with pytest.raises(ConfigError, match="no good image to add: 1 photo.*colour.png: this photo is in colour"):
        mono.update([colour], names=["colour.png"])
    mono.save(tmp_path / "mono")
    manifest = json.loads((tmp_path / "mono" / "manifest.json").read_text())
    assert manifest["preprocessing"]["channels"] == "grey"
    del manifest["preprocessing"]["channels"]
    write_manifest(tmp_path / "mono", manifest)
    older = AnomalyModel.load(tmp_path / "mono", device="cpu")
    assert not [w for w in older.score(colour).warnings if "grey" in w]



def test_a_frame_of_one_level_is_said_to_show_nothing_not_to_be_grey(fitted_model):
    """A black frame (a lamp off, a covered lens, a trigger before the part came) to a model of colour photos was
    told "this photo is grey", sending the line to the colour camera or to a re-fit on grey photos (session 64); a
    white or any flat frame likewise. It is now said to show no part, with its level, and an update leaves it out;
    a grey photo of a part is still told grey, and a good colour part gets neither."""
    from conftest import textured_part

    part = textured_part(np.random.default_rng(21))
    for level in (0, 128, 255):
        said = fitted_model.score(np.full_like(part, level)).warnings
        assert len(said) == 1 and said[0].startswith(f"this photo is one level throughout ({level} of 255)"), said
    grey = np.asarray(Image.fromarray(part).convert("L"))
    assert [w[:18] for w in fitted_model.score(grey).warnings] == ["this photo is grey"]
    assert not fitted_model.score(part).warnings
    with pytest.raises(ConfigError, match="no good image to add.*black.png: this photo is one level throughout"):
        fitted_model.update([np.zeros_like(part)], names=["black.png"])


def _dark_frame(rng: np.random.Generator, shape: tuple[int, int], level: float, sigma: int, kind: str,
                depth: int) -> bytes:
    """A frame that shows nothing, as a camera gives it: a dark level with its sensor's noise of ``sigma`` levels
    (Gaussian read noise or Poisson shot noise), saved at 8 or 16 bits."""
    noise = rng.normal(0, sigma, shape) if kind == "gauss" else rng.poisson(sigma ** 2, shape) - sigma ** 2
    frame = level + noise
    if depth == 8:
        return _png(Image.fromarray(np.clip(np.round(frame), 0, 255).astype(np.uint8)))
    return _png(Image.fromarray(np.clip(np.round(frame * 257), 0, 65535).astype(np.uint16)))


def test_a_dark_frame_with_its_sensors_noise_is_said_to_show_nothing(fitted_model, tmp_path):
    """The blank test was exact (one level): a dark frame with a sensor's noise of a few levels, the way a lamp off
    or a covered lens comes off a real camera, was flagged with no warning of its own, and an update learnt it. Its
    blocks' means lie within a few levels, where the good photos of the shared data spread about forty and more
    (decisions.md, session 65), so it is now said to show nothing, at 8 and 16 bits, by a model that keeps its
    flattest good photo (the fit's manifest) and where the frame is well flatter than that: a model fitted on dim
    photos keeps its parts, and a model saved before keeps the exact test."""
    from anomaly_service import AnomalyModel
    from anomaly_service.images import BLANK_SPREAD, blank_spread, is_blank
    from conftest import textured_part, write_manifest

    flattest = fitted_model.manifest_.preprocessing.flattest
    assert flattest is not None and flattest > BLANK_SPREAD
    rng = np.random.default_rng(8)
    for shape in ((320, 320), (96, 240)):
        for level in (0, 3, 12):
            for sigma in (1, 2, 4):
                for kind in ("gauss", "poisson"):
                    for depth in (8, 16):
                        frame = load_image(_dark_frame(rng, shape, level, sigma, kind, depth))
                        assert is_blank(frame, flattest), (shape, level, sigma, kind, depth)
                        assert not is_blank(frame, blank_spread(frame) * 2)  # a model of parts as flat as it
    dark = _dark_frame(rng, (128, 128), 4, 3, "gauss", 8)
    said = fitted_model.score(dark).warnings
    assert len(said) == 1 and said[0].startswith("this photo is one level throughout (4 of 255)"), said
    with pytest.raises(ConfigError, match="no good image to add.*dark.png: this photo is one level throughout"):
        fitted_model.update([dark], names=["dark.png"])
    part = textured_part(rng)
    assert not is_blank(part, flattest) and not fitted_model.score(part).warnings
    assert not is_blank(np.asarray(Image.fromarray(part).resize((12, 12))), flattest)  # too few blocks to tell
    fitted_model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["preprocessing"]["flattest"]  # as a model saved before it was kept
    write_manifest(tmp_path / "m", manifest)
    said = AnomalyModel.load(tmp_path / "m", device="cpu").score(dark).warnings
    assert not [w for w in said if "one level" in w], said  # told grey, as before


def test_a_dark_frame_among_the_good_photos_does_not_set_the_flattest(rng_images):
    """The fit kept its good photos' least blocks' spread: one dark frame among them (a trigger before the part
    came while the photos were taken, which the fit keeps and warns of as unlike the others) set it to a sensor's
    noise, and then no dark frame was ever said to show nothing (a real fit of 12 bottle photos and one such frame:
    a dark frame scored with no warning). A good photo as flat as a blank frame is against the typical one is now
    left out of the flattest; a model fitted on dim photos keeps its own least, as before."""
    from anomaly_service import AnomalyModel
    from anomaly_service.images import blank_spread
    from conftest import SMALL

    rng = np.random.default_rng(9)
    dark = [load_image(_dark_frame(rng, (128, 128), 5, 3, "gauss", 8)) for _ in range(2)]
    goods = rng_images[:5]
    model = AnomalyModel(**{**SMALL, "image_size": 64}, autoencoder="none").fit([*goods, dark[0]])
    assert model.manifest_.preprocessing.flattest == round(min(blank_spread(g) for g in goods), 2)
    said = model.score(dark[1]).warnings
    assert [w for w in said if w.startswith("this photo is one level throughout")], said
    from anomaly_service.images import flattest_part

    dim = [1.6, 1.7, 1.9, 2.4]  # every good photo as flat as noise (test_bit_depth's dim parts): the least is theirs
    assert flattest_part(dim) == 1.6 and flattest_part([float("inf")]) is None


@pytest.mark.slow
def test_no_good_photo_of_the_shared_data_is_near_blank():
    """Every good photo of the flattest shared categories, train and test (kos's and the magnetic tiles'; bottle's
    spread over two hundred levels, measured in session 65), spreads its blocks' means three times the blank
    limit and more: a part, not a blank frame, by a margin."""
    from anomaly_service.images import BLANK_SPREAD, blank_spread
    from conftest import shared_category

    for name in ("magnetic_tile/mt", "kolektorsdd/kos"):
        root = shared_category(name)
        photos = sorted([*(root / "train" / "good").glob("*.png"), *(root / "test" / "good").glob("*.png")])
        assert len(photos) > 200 and min(blank_spread(load_image(p)) for p in photos) > 3 * BLANK_SPREAD, name


def test_a_photo_with_red_and_blue_swapped_is_scored_with_a_warning(fitted_model):
    """An OpenCV frame is BGR: passed to the library as it comes, or saved by Pillow as RGB on its way to the
    service, a warm part reads as a cold one and every patch is unlike what the model learnt (a textured part so
    reversed scored 6.1 on the normalized scale, and nothing said why). The model keeps its good colour photos'
    red-minus-blue lean; a photo leaning the mirror way is scored with a warning, one leaning as they do, a grey
    one, and any photo to a model whose good photos lean too little or too variously to tell are not."""
    from anomaly_service.preprocessing import swap_warning
    from conftest import textured_part

    rng = np.random.default_rng(13)
    photo = textured_part(rng)
    lean, spread = fitted_model.manifest_.preprocessing.red_blue
    assert lean > 10 and spread < lean / 4  # the fixture's parts are warm: red well above blue
    assert not [w for w in fitted_model.score(photo).warnings if "swapped" in w]
    said = [w for w in fitted_model.score(np.ascontiguousarray(photo[..., ::-1])).warnings if "swapped" in w]
    assert len(said) == 1 and said[0].startswith("this photo's red and blue look swapped") and "BGR" in said[0]
    grey = np.repeat(photo.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert not [w for w in fitted_model.score(grey).warnings if "swapped" in w]
    reversed_photo = photo[..., ::-1]
    assert swap_warning(None, reversed_photo) is None  # a model saved before the lean was kept
    assert swap_warning((3.0, 0.5), reversed_photo) is None  # good photos near grey: a swap changes little
    assert swap_warning((25.0, 20.0), reversed_photo) is None  # red parts and blue ones both good


def test_a_photo_leaning_far_from_both_the_good_lean_and_its_mirror_is_not_called_swapped():
    """Swapped means nearer the mirror of the good photos' lean and near it: a part of another colour altogether
    (leaning three times as far the other way) is no BGR frame, and was called one by no test's miss."""
    from anomaly_service.preprocessing import SWAPPED_SAID, swap_warning

    def leaning(d: float) -> np.ndarray:
        photo = np.full((16, 16, 3), 128, np.uint8)
        photo[..., 0], photo[..., 2] = 128 + d / 2, 128 - d / 2
        return photo

    stats = (30.0, 2.0)
    assert swap_warning(stats, leaning(30)) is None
    assert swap_warning(stats, leaning(-30)).startswith(SWAPPED_SAID)
    assert swap_warning(stats, leaning(-90)) is None
    # near the mirror: within half the lean of it, or within four of the good photos' spreads where that is wider
    assert swap_warning(stats, leaning(-18)).startswith(SWAPPED_SAID)
    assert swap_warning((30.0, 5.0), leaning(-12)).startswith(SWAPPED_SAID)

def test_a_photo_compressed_harder_than_the_good_ones_is_scored_with_a_warning(tmp_path):
    """A model fitted on PNGs read every good bottle photo re-saved as a JPEG at quality 75 as a defect (all twenty
    flagged, six of twenty at 85), and nothing said why. The fit keeps its photos' lowest JPEG quality (100: none a
    JPEG), read from each file's own table; a flagged photo more than ten points below it is scored with a warning,
    by the library, the CLI and after a load (one that passes is not: kos's smooth photos pass as JPEGs, and a line
    sending them so would see it on every part). A model fitted on arrays (compression unknown), or saved before the
    quality was kept, warns of nothing; an update that learns such photos stops warning of them."""
    from click.testing import CliRunner

    from anomaly_service import AnomalyModel
    from anomaly_service.cli import app
    from anomaly_service.compression import compression_warning, fitted_quality, said_with
    from anomaly_service.images import source_quality
    from conftest import textured_part, write_manifest

    rng = np.random.default_rng(21)
    goods = []
    for i in range(6):
        goods.append(tmp_path / f"good{i}.png")
        Image.fromarray(textured_part(rng, 64, 64)).save(goods[-1])
    photo = Image.fromarray(textured_part(rng, 64, 64))
    jpeg = {q: _png(photo, "JPEG", quality=q) for q in (95, 70, 40)}
    assert [source_quality(jpeg[q]) for q in (95, 70, 40)] == [95, 70, 40] and source_quality(goods[0]) == 100
    assert fitted_quality([100, 80]) == 80 and fitted_quality([100, None]) is None and fitted_quality([]) is None
    assert source_quality(np.asarray(photo)) is None  # an array's compression is unknown: its fit warns of nothing
    note = compression_warning(100, 70)
    assert compression_warning(100, 95) is None and compression_warning(None, 40) is None
    assert said_with(("frame 1 of 2", note), flagged=True) == ["frame 1 of 2", note]
    assert said_with(("frame 1 of 2", note), flagged=False) == ["frame 1 of 2"]

    def said(model, data):
        return [w for w in model.score(data).warnings if "JPEG at quality" in w]

    model = AnomalyModel(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.25, progress=False,
                         calibration_fraction=0.25, autoencoder="none").fit([str(g) for g in goods])
    assert model.manifest_.preprocessing.jpeg_quality == 100
    assert said(model, jpeg[95]) == [] and said(model, _png(photo)) == []
    flagged = model.score(jpeg[70])
    assert flagged.is_anomaly and [w for w in flagged.warnings if "JPEG at quality" in w] == [note]
    model.save(tmp_path / "m")
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert len(said(loaded, jpeg[70])) == 1
    (tmp_path / "line.jpg").write_bytes(jpeg[70])
    r = CliRunner().invoke(app, ["score", "--model", str(tmp_path / "m"), str(tmp_path / "line.jpg")])
    assert r.exit_code == 0 and f"warning: {tmp_path / 'line.jpg'}: this photo is a JPEG at quality 70" in r.output

    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["preprocessing"]["jpeg_quality"]
    write_manifest(tmp_path / "m", manifest)
    assert said(AnomalyModel.load(tmp_path / "m", device="cpu"), jpeg[70]) == []  # saved before it was kept

    grown = loaded.update([jpeg[40]], names=["line.jpg"], force=True)
    assert grown.manifest_.preprocessing.jpeg_quality is None and said(grown, jpeg[40]) == []
    # photos within the warning's margin are learnt without a warning: the good photos' lowest quality comes down
    # to theirs (it stayed 100, and the drift window counted the line's photos saved so as compressed harder than
    # every good photo the model had learnt); the model and its manifest, saved and loaded, say so
    near = loaded.update([jpeg[95]], names=["near.jpg"], force=True)
    assert (near.manifest_.preprocessing.jpeg_quality, near.limits.jpeg_quality) == (95, 95)
    near.save(tmp_path / "near")
    assert AnomalyModel.load(tmp_path / "near", device="cpu").limits.jpeg_quality == 95
    assert loaded.update([_png(photo)], names=["png"], force=True).limits.jpeg_quality == 100  # none lower
    # a JPEG the update leaves out (grey, the good photos colour) is not learnt: its quality brings nothing down
    kept = loaded.update([_png(photo.convert("L"), "JPEG", quality=95), _png(photo)], names=["grey.jpg", "png"],
                         force=True)
    assert [name for name, _ in kept.unlike_] == ["grey.jpg"] and kept.limits.jpeg_quality == 100
    # the updated model itself, as the service swaps it in before any reload: a flagged part at that quality is
    # flagged for what it shows, not said to be compressed harder than what the model learnt
    from conftest import add_defect

    scratched = _png(Image.fromarray(add_defect(np.asarray(photo), 32, 32)[0]), "JPEG", quality=40)
    assert grown.score(scratched).is_anomaly and said(grown, scratched) == []


def test_every_jpeg_quality_reads_back_as_it_was_written():
    """The quality was read from the luminance table's sum by the IJG library's formula without its hold of each
    entry between 1 and 255: every quality under 20 read high (a photo at 10 as 15, so a line fitted at 25 was not
    warned of it) and 100 read 99. Each quality's table sum is its own, so every one reads back exactly; a photo
    whose compression is unknown reads None, and the warning starts strictly below the margin."""
    from anomaly_service.compression import MARGIN, compression_warning, jpeg_quality, learnt_harder
    from anomaly_service.images import source_quality

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert [source_quality(_png(photo, "JPEG", quality=q)) for q in range(1, 101)] == list(range(1, 101))
    made = Image.new("RGB", (8, 8))
    assert jpeg_quality(made) is None  # made in memory: its history is unknown
    made.format = "JPEG"
    assert jpeg_quality(made) is None  # a JPEG without its table
    assert source_quality(b"not a photo") is None and source_quality(Path("/nonexistent.jpg")) is None
    with Image.open(io.BytesIO(_png(photo, "JPEG", quality=30))) as opened:  # a photo given as an opened image
        assert source_quality(opened) == 30
    assert compression_warning(80, 80 - MARGIN) is None and compression_warning(80, 79 - MARGIN) is not None
    # an update whose photos said other things too (a file's first frame) still learnt a harder compression
    note = compression_warning(100, 40)
    assert learnt_harder([("frame 1 of 2",), (note,)]) and not learnt_harder([("frame 1 of 2",), ()])
    # a decoded photo keeps its file's quality (the drift window counts the parts compressed harder than the good
    # photos): a JPEG's, 100 for another format (a float TIFF's too), none for an array
    from anomaly_service.images import decode_image

    assert decode_image(_png(photo, "JPEG", quality=63)).jpeg_quality == 63
    assert decode_image(_png(photo, "PNG")).jpeg_quality == 100
    assert decode_image(_png(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF")).jpeg_quality == 100
    assert decode_image(np.asarray(photo)).jpeg_quality is None


def test_a_tiff_compressed_as_jpeg_reads_its_jpeg_quality():
    """A TIFF whose strips are JPEGs (an accepted format, TIFF's compression 7) read as uncompressed, 100: a line
    sending such photos at quality 40 to a model fitted on PNGs was neither counted by the drift window as
    compressed harder nor warned of with a flag. Its quality is read from the tables its strips share (the
    JPEGTables tag), as a JPEG's is; a TIFF of another compression is still uncompressed."""
    from anomaly_service.images import ImageLimits, decode_image, source_quality

    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for mode in ("RGB", "L"):
        for q in (40, 75, 100):
            tiff = _png(photo.convert(mode), "TIFF", compression="jpeg", quality=q)
            assert decode_image(tiff).jpeg_quality == q and source_quality(tiff) == q
    squeezed = decode_image(_png(photo, "TIFF", compression="jpeg", quality=40), ImageLimits(jpeg_quality=100))
    assert any(w.startswith("this photo is a JPEG at quality 40") for w in squeezed.warnings)
    for other in ("tiff_lzw", "tiff_deflate", "packbits", "raw"):
        assert decode_image(_png(photo, "TIFF", compression=other)).jpeg_quality == 100


# what the formula before the table sums read for each quality 1-100, measured on Pillow's JPEGs with that code
_UNHELD_READINGS = [11, 11, 12, 12, 13, 13, 14, 14, 14, 15, 15, 16, 16, 17, 17, 18, 18, 19, 20, 20,
                    *range(21, 100), 99]


def test_a_quality_an_earlier_release_misread_is_read_back_to_the_side_that_warns(model_dir, tmp_path):
    """A model fitted before the table sums recorded the old reading of its photos' lowest quality: 99 for photos at
    100, so a flagged photo at 89 went without the warning the true quality gives, and 15 for photos at 10, so one
    at 4 was warned of though within the margin. At load the reading goes back to the highest quality that reads so
    (it warns of all the true quality would), where the fit's release (library_versions) is older than the fix; a
    build that does not say its number keeps the higher of the two, and a later fit's quality is its own."""
    from click.testing import CliRunner

    from anomaly_service import AnomalyModel
    from anomaly_service.cli import app
    from anomaly_service.compression import fitted_as_read, unheld_reading
    from conftest import write_manifest

    assert [unheld_reading(q) for q in range(1, 101)] == _UNHELD_READINGS
    for q, read in enumerate(_UNHELD_READINGS, 1):  # never below the truth, and the truth where it is alone
        assert fitted_as_read(read, "0.1.1.dev1600+g0123abc") >= q
    assert [fitted_as_read(r, "0.1.1.dev1649+g03b3de1e7") for r in (11, 14, 15, 20, 21, 99, 100)] == [
        2, 9, 11, 20, 21, 100, 100]
    assert [fitted_as_read(r, "0.1.1.dev1650+g40390667c") for r in (3, 15, 99)] == [3, 15, 99]  # the fix on
    assert [fitted_as_read(r, v) for r, v in ((15, "0+unknown"), (99, None), (99, "0.2.0"))] == [15, 100, 99]
    # 0.1.0 is also what a tree without git builds as today (pyproject's fallback): a fit by it at quality 15 was
    # read back to 11 and `info` said an older release had misread it; it says nothing of the build either way
    fallback = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert fallback["tool"]["setuptools_scm"]["fallback_version"] == "0.1.0"
    assert [fitted_as_read(r, v) for r, v in ((15, "0.1.0"), (99, "0.1.0"), (15, "0.1.0+local"))] == [15, 100, 15]

    model = shutil.copytree(model_dir / "part", tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["library_versions"]["anomaly_service"] = "0.1.1.dev1600+g0123abc"  # as the older release wrote it
    manifest["preprocessing"]["jpeg_quality"] = 99  # its photos at 100
    write_manifest(model, manifest)
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    loaded = AnomalyModel.load(model, device="cpu")
    assert loaded.limits.jpeg_quality == 100 and loaded.manifest_.preprocessing.jpeg_quality == 99
    flagged = loaded.score(_png(noise, "JPEG", quality=89))
    assert flagged.is_anomaly and [w for w in flagged.warnings if "JPEG at quality 89" in w], flagged.warnings
    manifest["preprocessing"]["jpeg_quality"] = 15  # its photos at 10 or 11
    write_manifest(model, manifest)
    said = CliRunner().invoke(app, ["info", str(model)]).output
    assert "JPEG quality     11, the good photos were JPEG at quality 11 or better" in said, said
    assert "the manifest says 15, as the release that fitted it misread" in said
    manifest["library_versions"]["anomaly_service"] = "0+unknown"  # a build that does not say: 99 read as 100
    manifest["preprocessing"]["jpeg_quality"] = 99
    write_manifest(model, manifest)
    said = CliRunner().invoke(app, ["info", str(model)]).output
    assert "the manifest says 99, and the build that fitted it (0+unknown) does not say whether" in said, said
    # an update by this build of such a model learns a JPEG at 15 without a warning (within 10 of its 20): its
    # quality is not brought down to 15, which the older build's number in the manifest would read back as 11
    from conftest import textured_part

    manifest["library_versions"]["anomaly_service"] = "0.1.1.dev1600+g0123abc"
    manifest["preprocessing"]["jpeg_quality"] = 20
    write_manifest(model, manifest)
    older = AnomalyModel.load(model, device="cpu")
    part = Image.fromarray(textured_part(np.random.default_rng(6)))
    grown = older.update([_png(part, "JPEG", quality=15)], names=["q15.jpg"], force=True)
    assert (grown.limits.jpeg_quality, grown.manifest_.preprocessing.jpeg_quality) == (20, 20)


def test_an_unaccepted_format_is_refused_by_its_signature_without_parsing_its_header(monkeypatch):
    """Pillow ran every plugin's header parser on an upload until one took it, those of formats the service does
    not accept too: its EPS parser spent 27 s of a core on an 18.7 MB upload of comment lines (a real server, two
    such uploads in flight), and answered 'not a recognized image format' at the end. Only the accepted formats'
    openers run now; another format is named from its signature, its header never parsed."""
    from PIL import EpsImagePlugin, PsdImagePlugin

    parsed: list[str] = []
    for plugin in (EpsImagePlugin.EpsImageFile, PsdImagePlugin.PsdImageFile):
        monkeypatch.setattr(plugin, "_open", lambda self, real=plugin._open: (parsed.append(self.format),
                                                                              real(self))[1])
    comments = b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"%%Title: x\n" * 1000
    eps = _png(Image.new("RGB", (32, 32)), "EPS")
    for data, fmt in ((comments, "EPS"), (eps, "EPS"), (b"8BPS" + bytes(60), "PSD")):
        with pytest.raises(ImageLoadError, match=f"format {fmt} is not accepted") as exc:
            load_image(data)
        assert exc.value.kind == "unsupported_format"
    assert parsed == []
    assert load_image(_png(Image.new("RGB", (32, 32)))).shape == (32, 32, 3)  # an accepted format still opens
    from anomaly_service.images import declared_size

    assert declared_size(eps)[2] == "EPS"  # no formats given (the library's own calls): any format Pillow reads
    assert parsed == ["EPS"]


def test_a_tga_is_refused_as_a_tga_not_as_a_cursor_nor_as_no_image(tmp_path):
    """A TGA's header has no signature, and the service reads none: Pillow's cursor check took a true-colour one for
    a CUR ("image format CUR is not accepted"), and a grey, colour-mapped or run-length one was "not a recognized
    image format". Told by the footer a TGA 2.0 file ends with, or by a plain header whose pixels fill the file, it
    is refused naming TGA; a real cursor is still named CUR, bytes of no format still none, and a folder's .tga is
    named as such. The library (no formats given) reads it as Pillow does."""
    from anomaly_service.images import skip_reason

    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    for mode, rle, footer in (("RGB", False, True), ("RGB", True, True), ("L", False, True), ("L", True, True),
                              ("P", False, True), ("RGBA", False, True), ("RGB", False, False), ("L", False, False)):
        data = _png(photo.convert(mode), "TGA", rle=rle)
        data = data if footer else data[:-26]  # a TGA 1.0 file: no footer
        with pytest.raises(ImageLoadError, match="image format TGA is not accepted") as exc:
            load_image(data)
        assert exc.value.kind == "unsupported_format", (mode, rle, footer)
    assert load_image(_png(photo, "TGA"), ImageLimits(formats=None)).tolist() == np.asarray(photo).tolist()
    cursor = bytearray(_png(photo.resize((32, 32)), "ICO", sizes=[(32, 32)]))
    cursor[2] = 2  # an ICO whose type says cursor
    with pytest.raises(ImageLoadError, match="format CUR is not accepted"):
        load_image(bytes(cursor))
    for junk in (bytes(100), np.random.default_rng(5).integers(0, 255, 5000, dtype=np.uint8).tobytes()):
        with pytest.raises(ImageLoadError, match="not a recognized image format"):
            load_image(junk)
    (tmp_path / "part.tga").write_bytes(_png(photo, "TGA"))
    assert "its name says TGA" in skip_reason(tmp_path / "part.tga")
    (tmp_path / "notes.txt").write_text("x")
    assert skip_reason(tmp_path / "notes.txt") == "not an image file"


def test_a_float_colour_tiff_is_refused_as_a_tiff_where_tiffs_are_not_accepted():
    """Limits that leave TIFF out refuse it as they refuse any TIFF, naming the format, not as no image at all."""
    data = _tiff(np.random.default_rng(13).random((20, 30, 3)).astype(np.float32))
    with pytest.raises(ImageLoadError, match="format TIFF is not accepted") as exc:
        load_image(data, ImageLimits(formats=frozenset({"PNG"})))
    assert exc.value.kind == "unsupported_format"


def test_a_tiff_whose_tile_width_overflows_pillows_decoder_is_a_broken_file_not_a_crash():
    """A tile width forged past what Pillow's decoder holds raised OverflowError out of decoding: a 500 for an
    upload, where any other broken file is a 400. With its tile length it is a tile larger than the pixel limit,
    refused from the header (test_decode_fuzz.py); with a tile length of none it reaches the decoder."""
    import struct

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((24, 40, 3), np.uint8), photometric="rgb", tile=(16, 16))
    forged = buf.getvalue().replace(struct.pack("<HHLL", 322, 4, 1, 16), struct.pack("<HHLL", 322, 4, 1, 0xD8000010))
    with pytest.raises(ImageLoadError, match="tiles of 3623878672x16 pixels exceed the limit") as exc:
        load_image(forged)
    assert exc.value.kind == "too_large"
    flat = forged.replace(struct.pack("<HHLL", 323, 4, 1, 16), struct.pack("<HHLL", 323, 4, 1, 0))
    assert flat != forged
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as exc:
        load_image(flat)
    assert exc.value.kind == "corrupt"


def test_grey_or_colour_is_told_in_the_photos_own_scale():
    """A colour photo passed as floats in [0, 1] or as 16-bit values is colour, and a grey one grey: the tolerance
    is a few 8-bit steps in the photo's own scale (integer casts had read every float photo as grey)."""
    from anomaly_service.images import is_grey

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (120, 90, 1), dtype=np.uint8), 3, axis=2)
    colour = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    assert is_grey(grey) and not is_grey(colour)
    assert is_grey(grey.astype(np.float32) / 255) and not is_grey(colour.astype(np.float32) / 255)
    assert is_grey(grey.astype(np.uint16) * 257) and not is_grey(colour.astype(np.uint16) * 257)
    assert is_grey(grey[..., 0])


def test_a_png_or_jpeg_with_a_damaged_header_is_corrupt_not_an_unknown_format():
    """A photo damaged on its way from the camera (a bad IHDR checksum, a JPEG whose first segment is mangled) was
    answered 415 not_image, "not a recognized image format": the client and the rejected-inputs metric then blame
    whoever sends text files, not the link that damages photos. Its signature says what it was meant to be."""
    png = bytearray(_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))))
    png[29] ^= 0xFF  # the IHDR chunk's CRC
    jpeg = bytearray(_png(Image.new("RGB", (32, 32), (9, 9, 9)), "JPEG"))
    jpeg[3] = 0x01  # the first segment's marker: no marker at all
    for data, name in [(bytes(png), "PNG"), (bytes(jpeg), "JPEG")]:
        with pytest.raises(ImageLoadError, match=f"damaged {name}") as exc:
            load_image(data)
        assert exc.value.kind == "corrupt"


def test_a_phones_heif_photo_is_named_as_a_format_not_read(tmp_path):
    """An iPhone's photo is HEIF (``.HEIC``), often renamed ``.jpg`` on its way to a fit folder or a station: Pillow
    has no reader for it, and it was "not a recognized image format", or in a folder "not an image file", as if
    it were no picture. It is named, and refused as a format not read (``unsupported_format``), as an AVIF is."""
    from anomaly_service.images import list_images, skip_reason

    iphone = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x08free" + bytes(200)
    with pytest.raises(ImageLoadError, match="image format HEIF is not accepted") as exc:
        load_image(iphone, name="IMG_0001.jpg")
    assert exc.value.kind == "unsupported_format"
    avif_like = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(200)  # an AVIF's box: not HEIF
    with pytest.raises(ImageLoadError) as exc:
        load_image(avif_like)
    assert "HEIF" not in str(exc.value)
    (tmp_path / "IMG_0002.HEIC").write_bytes(iphone)
    _, skipped = list_images(tmp_path)
    assert "its name says HEIF" in skip_reason(skipped[0])
