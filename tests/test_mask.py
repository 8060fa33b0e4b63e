"""Inspection masks: pixels outside never count (score, map, regions), the mask is checked, stored and reloaded."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service import AnomalyModel, ConfigError, ModelFormatError
from anomaly_service.cli import app
from anomaly_service.foreground import estimate_foreground
from anomaly_service.inspection_mask import InspectionMask, rasterise_polygons, read_mask
from anomaly_service.manifest import parse_manifest
from anomaly_service.render import render
from conftest import add_defect, part_on_belt, textured_part

FIT = dict(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
           calibration_fraction=0.25)  # as conftest's fitted_model, which has no mask
OUTSIDE, INSIDE = (64, 100), (64, 28)  # defect centres (y, x): right of the mask, in it


@pytest.fixture(scope="module")
def left_half(tmp_path_factory) -> Path:
    """Inspect the left half of the 128x128 training frame."""
    pixels = np.zeros((128, 128), np.uint8)
    pixels[:, :64] = 255
    path = tmp_path_factory.mktemp("mask") / "left.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def masked_model(rng_images, left_half):
    return AnomalyModel(mask=str(left_half), **FIT).fit(rng_images)


def _defect(where: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return add_defect(textured_part(np.random.default_rng(5)), *where)


def _assert_outside_ignored_inside_flagged(model: AnomalyModel) -> None:
    img, _ = _defect(OUTSIDE)
    res = model.score(img)
    assert not res.is_anomaly and res.normalized_score < 1.0
    assert render(res).regions == []
    assert res.normalized_map().max() < 1.0 and np.isfinite(res.anomaly_map).all()
    img, truth = _defect(INSIDE)
    res = model.score(img)
    assert res.is_anomaly
    regions = render(res).regions
    assert regions and all(r.x + r.width <= 64 + 8 for r in regions)  # inside the mask (and its edge cell)
    assert res.normalized_map()[truth].max() > 1.0
    assert res.normalized_map()[:, 72:].max() < 1.0  # nothing outside is ever hot


def test_defect_outside_the_mask_is_not_flagged_the_same_inside_is(masked_model, fitted_model):
    img, _ = _defect(OUTSIDE)
    assert fitted_model.score(img).is_anomaly  # without the mask the same model flags it: the test means something
    _assert_outside_ignored_inside_flagged(masked_model)


def test_patch_maximum_image_score_is_masked_on_the_feature_grid(rng_images, left_half):
    _assert_outside_ignored_inside_flagged(AnomalyModel(mask=str(left_half), image_score="max", **FIT)
                                           .fit(rng_images))


def test_polygons_rasterise_with_pillow(tmp_path):
    spec = {"width": 10, "height": 8, "inspect": [[[0, 0], [5, 0], [5, 7], [0, 7]]],
            "ignore": [[[1, 1], [2, 1], [2, 2], [1, 2]]]}
    expected = np.zeros((8, 10), bool)
    expected[:, :6] = True  # Pillow fills a polygon with its outline: x 0..5 inclusive
    expected[1:3, 1:3] = False
    np.testing.assert_array_equal(rasterise_polygons(spec), expected)
    only_ignore = rasterise_polygons({"width": 10, "height": 8, "ignore": spec["ignore"]})
    assert only_ignore.sum() == 80 - 4  # no inspect polygons: the whole frame, minus what is ignored
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    mask = read_mask(path)
    assert mask.source == "polygons" and mask.size == (10, 8)
    np.testing.assert_array_equal(mask.pixels, expected)


def test_polygons_draw_the_same_mask_as_the_png(masked_model, tmp_path):
    path = tmp_path / "left.json"
    path.write_text(json.dumps({"width": 128, "height": 128, "inspect": [[[0, 0], [63, 0], [63, 127], [0, 127]]]}))
    np.testing.assert_array_equal(read_mask(path).pixels, masked_model.mask_.pixels)


@pytest.mark.parametrize("spec,message", [
    ({"width": 10, "height": 8}, "no polygons"),
    ({"height": 8, "inspect": []}, "width and height"),
    ({"width": 10, "height": 8, "inspect": [[[0, 0], [1, 1]]]}, r"inspect\[0\] must be a list of at least 3"),
    ({"width": 10, "height": 8, "inspect": [[[0, 0], [1, "a"], [2, 2]]]}, "not \\[x, y\\]"),
    ({"width": 10, "height": 8, "ignore": [], "holes": []}, "unknown keys holes"),
    ([[0, 0], [1, 1], [2, 2]], "JSON object"),
    ({"width": 10, "height": 0, "inspect": []}, "width and height"),
    ({"width": 10, "height": 8, "inspect": 5}, "inspect must be a list of polygons"),
    ({"width": 10, "height": 8, "ignore": {"a": [[0, 0], [1, 1], [2, 2]]}}, "ignore must be a list of polygons"),
])
def test_bad_polygons_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        rasterise_polygons(spec)


def test_mask_size_must_match_the_training_images(rng_images, tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(path)
    with pytest.raises(ConfigError, match=r"64x48 pixels but the training images are 128x128"):
        AnomalyModel(mask=str(path), **FIT).fit(rng_images[:4])


def test_a_mask_smaller_than_one_feature_cell_is_refused_before_the_fit(rng_images, tmp_path):
    """One inspected pixel cannot be scored; such a fit used to run to the end and fail on its own manifest."""
    mask = np.zeros((128, 128), np.uint8)
    mask[60, 60] = 255
    Image.fromarray(mask).save(tmp_path / "dot.png")
    with pytest.raises(ConfigError, match=r"inspects 1 pixels, less than one feature cell"):
        AnomalyModel(mask=str(tmp_path / "dot.png"), **FIT).fit(rng_images[:4])
    mask[56:64, 56:64] = 255  # one cell of the grid: enough
    Image.fromarray(mask).save(tmp_path / "cell.png")
    model = AnomalyModel(mask=str(tmp_path / "cell.png"), **FIT).fit(rng_images[:4])
    assert model.manifest_.mask.inspected > 0


def test_mask_files_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        AnomalyModel(mask=str(tmp_path / "missing.png"), **FIT)
    with pytest.raises(ConfigError, match=r"mask must be one of 'auto' \(or a .png or .json file\)"):
        AnomalyModel(mask="mask.bmp", **FIT)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty)
    with pytest.raises(ConfigError, match="inspects no pixel"):
        read_mask(empty)
    erased = tmp_path / "erased.png"  # white throughout, every pixel transparent: not "all zero" to its author
    Image.fromarray(np.full((8, 8, 4), (255, 255, 255, 0), np.uint8), "RGBA").save(erased)
    with pytest.raises(ConfigError, match=r"inspects no pixel \(each is black or transparent"):
        read_mask(erased)
    with pytest.raises(ConfigError, match=r"missing.json: No such file or directory"):
        read_mask(tmp_path / "missing.json")
    (tmp_path / "cut.json").write_text('{"width": 8, "height": 8, "inspect": [')
    with pytest.raises(ConfigError, match=r"cut.json is not valid JSON \(Expecting value"):
        read_mask(tmp_path / "cut.json")
    not_png = tmp_path / "broken.png"
    not_png.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="not a readable image"):
        read_mask(not_png)


def test_a_mask_pixel_is_inspected_when_it_is_not_black_and_not_transparent(tmp_path):
    """Nonzero is inspected, down to a grey level of 1; a transparent pixel is not, whatever its colour (an editor's
    eraser leaves white under a transparent alpha), in an image with an alpha channel, a palette's transparent
    index or a grey or colour transparency key (those two were read as drawn: inspected); and a mask of more pixels
    than the training images is refused from its header."""
    grey = np.zeros((4, 6), np.uint8)
    grey[:, :3] = 1
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png").pixels, grey > 0)
    rgba = np.full((4, 6, 4), 255, np.uint8)
    rgba[:, 3:, 3] = 0  # erased: white, transparent
    rgba[:, 0, 3] = 1  # nearly transparent, still drawn
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "alpha.png").pixels, grey > 0)
    la = Image.fromarray(rgba[:, :, [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png").pixels, grey > 0)
    palette = Image.fromarray(np.where(grey > 0, 1, 2).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 255, 255])
    palette.save(tmp_path / "palette.png", transparency=2)  # index 2: white, transparent
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png").pixels, grey > 0)
    palette.save(tmp_path / "opaque.png")  # the same palette without a transparent index: all white, inspected
    assert read_mask(tmp_path / "opaque.png").pixels.all()
    keyed = np.where(grey > 0, 128, 255).astype(np.uint8)  # white named transparent by the file's key
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=255)
    np.testing.assert_array_equal(read_mask(tmp_path / "keyed.png").pixels, grey > 0)
    Image.fromarray(np.repeat(keyed[:, :, None], 3, axis=2)).save(tmp_path / "keyed_rgb.png",
                                                                   transparency=(255, 255, 255))
    np.testing.assert_array_equal(read_mask(tmp_path / "keyed_rgb.png").pixels, grey > 0)
    assert read_mask(tmp_path / "grey.png", max_pixels=24).size == (6, 4)
    with pytest.raises(ConfigError, match="is 6x4 pixels, more than the training images' 23 pixels"):
        read_mask(tmp_path / "grey.png", max_pixels=23)


def _grey_png(rows: np.ndarray, depth: int, key: int) -> bytes:
    """A grey PNG of ``depth`` bits per pixel (1, 2, 4, 8 or 16) whose transparency key is ``key``, written by hand:
    Pillow writes no 2- or 4-bit grey, which an optimiser makes of a mask of few greys."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = rows.shape
    if depth == 16:
        raw = b"".join(b"\0" + r.astype(">u2").tobytes() for r in rows)
    else:
        per = 8 // depth
        packed = np.zeros((h, -(-w // per)), np.uint8)
        for x in range(w):
            packed[:, x // per] |= (rows[:, x] << (8 - depth * (x % per + 1))).astype(np.uint8)
        raw = b"".join(b"\0" + r.tobytes() for r in packed)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_transparency_key_is_read_at_the_file_s_own_bit_depth(tmp_path):
    """A grey key is compared with the pixels in the file's own scale: Pillow's conversion cut a 16-bit grey to 8
    bits, so a key of white made every drawn grey transparent (the mask inspected nothing, and was refused as all
    zero), and left a 2- or 4-bit key unstretched, so it matched no pixel (the erased white was inspected)."""
    drawn = np.zeros((2, 8), bool)
    drawn[:, 4:] = True
    for depth, erased, grey in ((16, 65535, 30000), (4, 15, 1), (2, 3, 1), (8, 255, 128), (1, 0, 1)):
        (tmp_path / f"{depth}.png").write_bytes(_grey_png(np.where(drawn, grey, erased), depth, erased))
        np.testing.assert_array_equal(read_mask(tmp_path / f"{depth}.png").pixels, drawn, err_msg=f"{depth} bits")
    (tmp_path / "black.png").write_bytes(_grey_png(np.where(drawn, 65535, 0), 16, 0))  # black keyed, white drawn
    np.testing.assert_array_equal(read_mask(tmp_path / "black.png").pixels, drawn)


def test_a_polygon_wholly_outside_the_frame_is_drawn_and_warned_of(caplog):
    """A polygon in another frame's coordinates (drawn on a larger photo) inspects nothing of this one: the fit's
    log says which; one that reaches into the frame, or touches one of its edges from outside, says nothing."""
    edges = [[[0, 0], [0, 10], [-5, 5]], [[20, 0], [20, 10], [25, 5]], [[0, 0], [20, 0], [10, -5]],
             [[0, 10], [20, 10], [10, 15]]]
    with caplog.at_level("WARNING", logger="anomaly_service.inspection_mask"):
        pixels = rasterise_polygons({"width": 20, "height": 10, "inspect": [[[2, 2], [9, 2], [9, 8]],
                                                                              [[30, 0], [40, 0], [40, 9]], *edges]})
    assert pixels[5, 8] and not pixels[5, 12]
    assert rasterise_polygons({"width": 1, "height": 3, "inspect": [[[0, 0], [0, 2], [1, 1]]]}).shape == (3, 1)
    assert [r.getMessage() for r in caplog.records] == ["polygons: inspect[1] lies entirely outside the 20x10 frame"]


def test_a_mask_image_is_read_whole_however_large_its_file(tmp_path):
    """The cap on a polygons file's bytes is not a mask image's: a PNG of a noisy mask over a large frame, stored
    without compression, is more than that many bytes and is read whole, its last row too."""
    from anomaly_service.inspection_mask import MAX_POLYGON_BYTES

    pixels = np.random.default_rng(0).integers(0, 2, (4200, 4200), dtype=np.uint8) * 255
    pixels[-1] = 255
    Image.fromarray(pixels).save(tmp_path / "large.png", compress_level=0)
    assert (tmp_path / "large.png").stat().st_size > MAX_POLYGON_BYTES
    np.testing.assert_array_equal(read_mask(tmp_path / "large.png").pixels, pixels > 0)


def test_the_masks_frame_is_the_most_common_training_shape_read_from_headers_only(tmp_path):
    """The frame a mask must be drawn on: the most common ``(h, w)`` of the training images, from their headers when
    they are read lazily (a file whose pixels are cut short is not decoded for it)."""
    from anomaly_service.inspection_mask import frame_shape
    from anomaly_service.training_set import TrainingImages

    arrays = [np.zeros((30, 40, 3), np.uint8)] * 3 + [np.zeros((50, 20, 3), np.uint8)] * 2
    assert frame_shape(arrays) == (30, 40)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    paths[0].write_bytes(paths[0].read_bytes()[:60])  # its header whole, its pixels cut short
    assert frame_shape(TrainingImages([str(p) for p in paths])) == (30, 40)


def test_a_fits_mask_file_is_checked_against_the_training_frame_and_one_feature_cell_there(tmp_path, caplog):
    """The fit's reading of a mask file, without a fit: none, ``auto`` (the fit's own), a mask of the most common
    frame when the sizes differ (with a warning that it is stretched), one of another size, and the least it may
    inspect, one feature cell at the working size counted in the frame's pixels (here a 16 px cell)."""
    from anomaly_service.inspection_mask import mask_for_fit

    embedder = AnomalyModel(**FIT).embedder
    images = [np.zeros((256, 128, 3), np.uint8)] * 3 + [np.zeros((128, 128, 3), np.uint8)]
    embedder.fit_scale([a.shape for a in images], "fixed-scale")
    assert mask_for_fit(None, images, embedder) is None
    with pytest.raises(ValueError, match="the fit finds --mask auto's foreground itself"):
        mask_for_fit("auto", images, embedder)
    pixels = np.zeros((256, 128), np.uint8)
    pixels[100:116, 50:66] = 255  # one cell exactly
    Image.fromarray(pixels).save(tmp_path / "cell.png")
    with caplog.at_level("WARNING", logger="anomaly_service.inspection_mask"):
        mask = mask_for_fit(str(tmp_path / "cell.png"), images, embedder)
    assert mask is not None and mask.size == (128, 256) and int(mask.pixels.sum()) == 256
    assert [r.getMessage() for r in caplog.records] == [
        "training images differ in size: the mask is stretched over each image"]
    pixels[100, 50] = 0
    Image.fromarray(pixels).save(tmp_path / "under.png")
    with pytest.raises(ConfigError, match=r"inspects 255 pixels, less than one feature cell \(about 256 pixels"):
        mask_for_fit(str(tmp_path / "under.png"), images, embedder)
    Image.fromarray(np.full((128, 100), 255, np.uint8)).save(tmp_path / "other.png")
    with pytest.raises(ConfigError, match=r"is 100x128 pixels but the training images differ in size and the most "
                                          r"common is 128x256 \(width x height\)"):
        mask_for_fit(str(tmp_path / "other.png"), images, embedder)
    with pytest.raises(ConfigError, match=r"is 100x128 pixels but the training images are 128x256"):
        mask_for_fit(str(tmp_path / "other.png"), images[:3], embedder)
    caplog.clear()
    with caplog.at_level("WARNING", logger="anomaly_service.inspection_mask"):
        assert mask_for_fit(str(tmp_path / "cell.png"), images[:3], embedder) is not None
    assert not caplog.records


def test_a_mask_is_turned_by_its_exif_orientation_as_the_training_photos_are(tmp_path):
    """A mask drawn over a camera photo in an editor that keeps its orientation tag stores its pixels sideways; the
    training photos are read turned upright (images.py), and the mask read as stored lay turned on the part: on
    square photos its size matched, so the fit took it without a word."""
    from anomaly_service.images import load_image

    stored = np.zeros((64, 64), np.uint8)
    stored[:, :32] = 255  # as stored: the left half; shown (orientation 6, turned clockwise): the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    photo = load_image(path.read_bytes())[:, :, 0] > 0  # the same file read as a training photo
    np.testing.assert_array_equal(read_mask(path).pixels, photo)
    assert read_mask(path).pixels[:32].all() and not read_mask(path).pixels[32:].any()


def test_mask_stretches_over_other_image_sizes():
    pixels = np.zeros((8, 8), bool)
    pixels[:, :4] = True
    mask = InspectionMask(pixels, "png")
    np.testing.assert_array_equal(mask.at((16, 16)), np.repeat(np.repeat(pixels, 2, 0), 2, 1))
    assert mask.at((4, 4))[:, :2].all() and not mask.at((4, 4))[:, 2:].any()
    dot = np.zeros((64, 64), bool)
    dot[10, 10] = True
    assert InspectionMask(dot, "png").at((4, 4)).sum() == 1  # too small to cover half a cell: still inspected


def test_a_stretch_warns_past_one_cell_of_the_far_edges_shift_and_says_how_far_in_the_photos_pixels():
    """The warning's rule without a fit (the fit tests read one square frame, where the shift fitted by height and
    by width is the same): the far edge's shift against a feature cell, fitted to the photo's height for a standing
    frame and to its width for a lying one, the pixels it names, the training photos' shapes, a frame of the
    photo's shape at another size, and a mask of every pixel, which has no edge to move."""
    lying = np.zeros((120, 160), bool)  # a 160x120 frame
    lying[:, :80] = True
    mask = InspectionMask(lying, "png")
    # a 200x100 photo the network sees at 128x64: fitted by width the far edge moves 32 of its pixels, 50 of the photo's
    said = mask.stretch_warning(100, 200, (64, 128), 31.9)
    assert said is not None and "this photo is 200x100 px" in said and "the 160x120 frame" in said
    assert "up to 50 px" in said
    assert mask.stretch_warning(100, 200, (64, 128), 32) is None  # a shift of one cell moves no patch
    assert mask.stretch_warning(240, 320, (96, 128), 1) is None  # the frame's shape at another size
    assert mask.stretch_warning(100, 200, (64, 128), 8, learnt=[(120, 160), (100, 200)]) is None
    assert mask.stretch_warning(100, 200, (64, 128), 8, learnt=[(120, 160), (60, 200)]) is not None
    assert mask.stretch_warning(100, 200, (64, 128), 16, learnt=[(100, 160)]) is None  # its shift: one cell exactly
    assert "up to 125 px" in mask.stretch_warning(100, 300, (64, 192), 8)  # by width: 80 of the network's pixels
    # squashed to a square working size the network's pixels are not the photo's alike along both sides: fitted by
    # height, the edge moves 42.7 of them along the width, 67 of the photo's
    assert "up to 67 px" in mask.stretch_warning(100, 200, (128, 128), 8)
    standing = InspectionMask(np.ascontiguousarray(lying.T), "png")  # a 120x160 frame: fitted by the photo's height
    said = standing.stretch_warning(200, 100, (128, 64), 31.9)
    assert said is not None and "up to 50 px" in said and standing.stretch_warning(200, 100, (128, 64), 32) is None
    whole = InspectionMask(np.ones((120, 160), bool), "auto")
    assert whole.everything and not mask.everything and whole.stretch_warning(100, 200, (64, 128), 1) is None


def test_a_mask_is_two_dimensional_and_boolean_and_what_at_gives_cannot_be_written():
    """A mask of another type or shape is a programming error said at once, not a wrong stretch later; the stretched
    copy :meth:`at` keeps for every photo of a shape is read-only, so no caller can change the next photo's mask."""
    for bad in (np.ones((8, 8), np.uint8), np.ones((8, 8, 1), bool), np.ones(8, bool)):
        with pytest.raises(ValueError, match="2-D boolean"):
            InspectionMask(bad, "png")
    pixels = np.zeros((8, 8), bool)
    pixels[:, :4] = True
    mask = InspectionMask(pixels, "png")
    for shape in ((8, 8), (16, 16)):
        with pytest.raises(ValueError, match="read-only"):
            mask.at(shape)[0, 0] = False
        assert mask.at(shape)[0, 0]


def test_a_mask_written_into_a_model_reads_back_as_the_same_pixels_or_is_refused_in_a_sentence():
    """Without a fit: the PNG a model stores and its manifest section read back as the same pixels and details, and
    a missing file, one of another size than the manifest says, or one that is not an image are each refused."""
    from anomaly_service.manifest import MaskInfo

    pixels = np.zeros((30, 40), bool)
    pixels[5:15] = True  # a third of the frame
    mask = InspectionMask(pixels, "polygons", {"from": "part.json"})
    section = mask.describe()
    assert section == {"file": "mask.png", "width": 40, "height": 30, "source": "polygons", "inspected": 0.333333,
                       "from": "part.json"}
    png = mask.to_png()
    with Image.open(io.BytesIO(png)) as stored:
        assert stored.mode == "L" and set(np.unique(np.asarray(stored))) == {0, 255}
    info = MaskInfo(**section)
    back = InspectionMask.from_model(info, {"mask.png": png})
    np.testing.assert_array_equal(back.pixels, pixels)
    assert back.source == "polygons" and back.details == {"from": "part.json"}
    with pytest.raises(ModelFormatError, match="mask.png is missing"):
        InspectionMask.from_model(info, {})
    with pytest.raises(ModelFormatError, match=r"mask.png is 40x30, the manifest says 30x40"):
        InspectionMask.from_model(MaskInfo(**{**section, "width": 30, "height": 40}), {"mask.png": png})
    with pytest.raises(ModelFormatError, match=r"mask.png: mask is not a readable image \(cannot identify image"):
        InspectionMask.from_model(info, {"mask.png": b"not a png"})
    full = InspectionMask(np.ones((30, 40), bool), "png").to_png()
    blank = Image.new("L", (40, 30), 0)
    buf = io.BytesIO()
    blank.save(buf, format="PNG")
    with pytest.raises(ModelFormatError, match="mask.png: the inspection mask inspects no pixel"):
        InspectionMask.from_model(info, {"mask.png": buf.getvalue()})
    assert InspectionMask.from_model(MaskInfo(**{**section, "inspected": 1.0}), {"mask.png": full}).everything


def test_a_stretched_pixel_is_inspected_when_at_least_half_the_mask_it_covers_is():
    """The stretch's rule at its bound, on shares the fallback to every touched pixel would not hide: a quarter is
    not inspected, a half and a whole are."""
    pixels = np.array([[1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(InspectionMask(pixels, "png").at((1, 3)), [[False, True, True]])


def test_a_score_without_a_mask_is_the_scorers_own_and_a_read_only_map_is_masked_on_a_copy():
    from anomaly_service.inspection_mask import score_inside
    from anomaly_service.scoring import image_score

    rng = np.random.default_rng(3)
    grid, amap = rng.random((4, 4)).astype(np.float32), rng.random((8, 8)).astype(np.float32)
    for mode in ("max", "map-max"):
        score, out = score_inside(grid, amap, mode, None)
        assert score == image_score(grid.ravel(), amap, mode) and out is amap
    pixels = np.zeros((8, 8), bool)
    pixels[:, :4] = True
    frozen = amap.copy()
    frozen.flags.writeable = False  # a map a cache or another scorer shares
    score, out = score_inside(grid, frozen, "map-max", InspectionMask(pixels, "png"))
    assert score == pytest.approx(image_score(grid[:, :2].ravel(), amap[:, :4], "map-max"))
    assert np.isnan(out[:, 4:]).all() and not np.isnan(frozen).any()


def test_uninspected_pixels_take_the_median_of_the_sampled_inspected_ones_or_of_all_when_none_was_sampled():
    """The level given to uninspected pixels is read from the map's sample, as the calibration's floor is (not from
    every pixel), and from every inspected pixel when the sample holds none of them."""
    from anomaly_service.inspection_mask import fill_uninspected

    amap = np.zeros((128, 128), np.float32)
    amap[::2, ::2] = 1.0  # the pixels the grid sample reads
    amap[1::2, 1::2] = np.nan
    out = fill_uninspected(amap, 5.0, "grid")
    assert (out[1::2, 1::2] == 1.0).all() and (out[::2] == amap[::2]).all()
    assert (fill_uninspected(amap, 0.25, "grid")[1::2, 1::2] == 0.25).all()  # never above the ceiling
    unsampled = np.full((128, 128), 0.5, np.float32)
    unsampled[::2, ::2] = np.nan
    assert (fill_uninspected(unsampled, 5.0, "grid")[::2, ::2] == 0.5).all()


def test_masked_model_saves_loads_and_scores_the_same(masked_model, tmp_path):
    path = masked_model.save(tmp_path / "m")
    assert (path / "mask.png").is_file()
    loaded = AnomalyModel.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.mask_.pixels, masked_model.mask_.pixels)
    assert loaded.manifest_.mask.inspected == pytest.approx(0.5) and loaded.manifest_.mask.width == 128
    for where in (OUTSIDE, INSIDE):
        img, _ = _defect(where)
        a, b = masked_model.score(img), loaded.score(img)
        assert a.score == pytest.approx(b.score, rel=1e-6) and a.is_anomaly == b.is_anomaly
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5)
    info = CliRunner().invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and "mask             png left.png, inspects 50% of 128x128 px" in info.output


def test_a_damaged_or_missing_mask_file_fails_to_load(masked_model, tmp_path):
    path = masked_model.save(tmp_path / "m")
    (path / "mask.png").unlink()
    with pytest.raises(ModelFormatError, match="mask.png is missing"):
        AnomalyModel.load(path, device="cpu")


def test_manifest_without_a_mask_is_an_older_model(masked_model, fitted_model, tmp_path):
    raw = json.loads((masked_model.save(tmp_path / "m") / "manifest.json").read_text())
    assert raw["config"]["mask"].endswith("left.png") and raw["mask"]["file"] == "mask.png"
    old = json.loads((fitted_model.save(tmp_path / "old") / "manifest.json").read_text())
    old["config"].pop("mask")  # as written before masks existed
    assert parse_manifest(old).mask is None and parse_manifest(old).fit_config().mask is None
    raw.pop("mask")
    with pytest.raises(ModelFormatError, match="config.mask and the mask section must be given together"):
        parse_manifest(raw)


def test_update_keeps_the_mask(masked_model, rng_images):
    new = masked_model.update([textured_part(np.random.default_rng(11)) for _ in range(2)])
    assert new.mask_ is masked_model.mask_ and new.manifest_.mask == masked_model.manifest_.mask
    _assert_outside_ignored_inside_flagged(new)


def test_cli_fit_takes_a_mask(synthetic_category, left_half, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(out),
                                   "--backbone", "efficientnet_lite0", "--image-size", "64", "-q",
                                   "--mask", str(left_half)])
    assert res.exit_code == 0, res.output
    assert AnomalyModel.load(out, device="cpu").manifest_.mask.source == "png"
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(out),
                                   "--backbone", "efficientnet_lite0", "--mask", str(tmp_path / "nope.png")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_a_mask_the_size_of_a_photo_past_pillows_pixel_limit_is_read_as_the_photos_are(tmp_path, monkeypatch):
    """A line camera's photo past Pillow's own pixel limit and within ours is fitted and scored
    (images._pillow_open); a mask drawn on it, the same size, stopped `anomaly fit --mask` with Pillow's "could be
    decompression bomb" error (exit 2), and a model fitted with one elsewhere could not be loaded to score. The mask
    is held to the frame's size from its header, as before, and otherwise read as a photo of that size is; one past
    the frame is still refused before it is decoded."""
    rng = np.random.default_rng(3)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        Image.fromarray(textured_part(rng, 288, 320)).save(good / f"{i}.png")
    drawn = np.zeros((288, 320), np.uint8)
    drawn[:, :160] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(drawn).save(mask)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 288 x 320 is past twice this; a thumbnail is not
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(good), "--out", str(out), "--backbone",
                                   "efficientnet_lite0", "--image-size", "64", "-q", "--mask", str(mask)])
    assert res.exit_code == 0, res.output
    model = AnomalyModel.load(out, device="cpu")
    assert model.mask_ is not None and model.mask_.size == (320, 288)
    np.testing.assert_array_equal(model.mask_.pixels, drawn > 0)
    assert not model.score(good / "0.png").is_anomaly  # a photo it was fitted on, scored under its mask
    bigger = tmp_path / "bigger.png"
    Image.fromarray(np.full((289, 320), 255, np.uint8)).save(bigger)
    with pytest.raises(ConfigError, match="more than the training images'"):
        read_mask(bigger, max_pixels=288 * 320)


def test_auto_finds_the_part_and_ignores_the_belt_around_it():
    rng = np.random.default_rng(0)
    model = AnomalyModel(mask="auto", **FIT).fit([part_on_belt(rng) for _ in range(14)])
    m = model.manifest_.mask
    assert m.source == "auto" and m.model_extra["found"] and 0.3 < m.inspected < 0.7
    pixels = model.mask_.pixels
    assert pixels[64 - 40 : 64 + 40, 64 - 20 : 64 + 20].all()  # the part (radius 44, moves by 3) is inspected
    assert not pixels[:12, :12].any() and not pixels[-12:, -12:].any()  # the belt's corners are not
    rng = np.random.default_rng(3)
    on_belt, _ = add_defect(part_on_belt(rng), 12, 12)
    res = model.score(on_belt)
    assert not res.is_anomaly and render(res).regions == []
    on_part, _ = add_defect(part_on_belt(rng), 64, 40)
    assert model.score(on_part).is_anomaly


def test_auto_inspects_everything_when_a_texture_fills_the_frame(rng_images):
    model = AnomalyModel(**FIT)
    model.embedder.fit_scale([a.shape for a in rng_images], "fixed-scale")
    mask = estimate_foreground(model.embedder, rng_images)
    assert mask.pixels.all() and mask.details["found"] is False
    assert mask.details["depth"] < 3  # what the split found was the ring of border patches, not a background
    # stretched over a photo of another shape it is still every pixel: no edge moves, so no warning, and an update
    # takes the photo (it warned of every other shape and left a false alarm on a surface of many sizes unlearnt)
    assert mask.stretch_warning(96, 128, (96, 128), 8) is None and mask.stretch_warning(40, 128, (40, 128), 8) is None


def test_a_photo_of_another_shape_than_the_masks_frame_is_scored_with_a_warning(masked_model, rng_images, tmp_path):
    """The mask is stretched over a photo of another shape, so its edges leave the part where they were drawn, and
    the score said nothing of it. It now warns, naming both shapes, as soon as the stretch moves an edge by more
    than a feature cell; a photo of the frame's shape at another size, or a few pixels off it, does not; the CLI
    and the service show it as they show every warning; a model without a mask never says it."""
    from conftest import png_bytes
    from test_api import client_for, post

    wide = textured_part(np.random.default_rng(6), 96, 128)  # 128x96 against the 128x128 frame
    warned = [w for w in masked_model.score(wide).warnings if "inspection mask" in w]
    assert len(warned) == 1 and "128x96 px" in warned[0] and "128x128 frame" in warned[0], warned
    for same in (textured_part(np.random.default_rng(7), 160, 160), textured_part(np.random.default_rng(8), 128, 126)):
        assert not [w for w in masked_model.score(same).warnings if "inspection mask" in w]
    mask = masked_model.mask_
    assert mask.stretch_warning(96, 128, (96, 128), 8) is not None  # a quarter of the side: many cells
    assert mask.stretch_warning(126, 128, (126, 128), 8) is None  # two pixels: within a cell
    fitted = AnomalyModel(**FIT).fit(rng_images[:4])
    assert not [w for w in fitted.score(wide).warnings if "inspection mask" in w]
    masked_model.save(tmp_path / "models" / "masked")
    with client_for(tmp_path / "models") as client:
        answer = post(client, png_bytes(wide)).json()
    assert any("inspection mask" in w for w in answer["warnings"])
    photo = tmp_path / "wide.png"
    Image.fromarray(wide).save(photo)
    r = CliRunner().invoke(app, ["score", "--model", str(tmp_path / "models" / "masked"), str(photo)])
    assert r.exit_code == 0 and f"warning: {photo}: this photo is 128x96 px" in r.output, r.output


def test_a_photo_of_a_shape_the_fit_learnt_under_the_stretched_mask_is_scored_and_learnt_without_a_warning(
        masked_model, rng_images, left_half):
    """A fit on photos of two shapes stretches the mask over the rarer one (and warns once). Scoring then warned of
    every photo of that shape, telling to send the training photos' shape, which it was, and an update left such a
    photo out (not_added), so a false alarm on it could not be taught. The shapes the fit learnt now pass; another
    shape still warns, and a model fitted on one shape still warns of the rarer one."""
    wide = [textured_part(np.random.default_rng(20 + i), 96, 128) for i in range(3)]
    mixed = AnomalyModel(mask=str(left_half), **{**FIT, "image_size": 64}).fit(list(rng_images[:3]) + wide[:2])
    assert not [w for w in mixed.unlike_fit(wide[2]) if "inspection mask" in w]
    assert [w for w in mixed.unlike_fit(textured_part(np.random.default_rng(30), 64, 128)) if "inspection mask" in w]
    assert [w for w in masked_model.unlike_fit(wide[2]) if "inspection mask" in w]
    new = mixed.update([wide[2]], names=["wide.png"])
    assert new.unlike_ == [] and new.catalog_.names[-1] == "wide.png"


def test_a_mask_named_by_a_path_object_is_the_file_it_names(left_half, rng_images):
    """A notebook names files with pathlib: ``mask=Path(...)`` was refused as "got a PosixPath", while the same
    name as a str fitted. It is read as that file, and the model records its name as text."""
    model = AnomalyModel(mask=left_half, **FIT)
    assert model.config.mask == str(left_half)
    model.fit(rng_images[:6])
    assert model.mask_ is not None


def test_polygons_that_claim_a_frame_larger_than_the_images_are_refused_before_it_is_drawn(rng_images, tmp_path):
    """A few bytes of JSON saying a million pixels by a million had Pillow allocate a terabyte (the process was
    killed) before the size was compared with the training images'. Smaller here: the refusal comes first."""
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"width": 20_000, "height": 20_000, "inspect": [[[0, 0], [9, 0], [9, 9]]]}))
    with pytest.raises(ConfigError, match=r"20000x20000 pixels but the training images are 128x128 \(width x height\)"):
        AnomalyModel(mask=str(path), **FIT).fit(rng_images[:4])


def test_the_docs_polygons_example_on_smaller_photos_names_both_sizes(tmp_path):
    """how-it-works.md's polygons example, copied as it stands, on a user's photos of another size: the fit named a
    pixel count ("more than the training images' 102400 pixels") where a mask smaller than the photos names their
    width and height, the size to draw the polygons at. Read from the docs, so the example and the check agree."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "how-it-works.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", doc, re.S).group(1))
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(example))
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(good / f"{i}.png")
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(good), "--out", str(tmp_path / "m"), "--backbone",
                                   "efficientnet_lite0", "--image-size", "64", "-q", "--mask", str(path)])
    assert res.exit_code == 2, res.output
    size = f"{example['width']}x{example['height']}"
    assert f"is {size} pixels but the training images are 320x240 (width x height)" in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_polygons_nested_beyond_the_parser_or_of_many_megabytes_are_one_clear_error(rng_images, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"width": 128, "height": 128, "inspect": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        AnomalyModel(mask=str(deep), **FIT).fit(rng_images[:4])
    big = tmp_path / "big.json"
    big.write_text(" " * (17 << 20) + "{}")
    with pytest.raises(ConfigError, match="larger than 16 MB"):
        AnomalyModel(mask=str(big), **FIT).fit(rng_images[:4])


def test_a_memory_error_that_says_nothing_is_still_one_line():
    """Python's own allocation failures carry no message: the CLI's handler took its first line and failed."""
    from anomaly_service.cli.shell import friendly

    @friendly
    def allocate() -> None:
        bytearray(1 << 62)

    with pytest.raises(SystemExit) as stopped:
        allocate()
    assert stopped.value.code == 2


def test_uninspected_pixels_show_just_under_the_threshold_however_hot_the_part_is():
    """Pixels outside the mask show the part's typical inspected level, but never a region: on a part hot all over,
    they stay just under 1.0 on the decision's scale (the kNN's and a fused map's alike), at any floor."""
    from anomaly_service.calibration import Calibration
    from anomaly_service.decision import KNN, Decision
    from anomaly_service.regions import find_regions
    from anomaly_service.timing import StageTimer

    hot = np.full((32, 32), 9.0, np.float32)
    hot[:, :12] = np.nan  # outside the mask
    decision = Decision()
    decision.calibration = Calibration(threshold=3.0, floor=1.0, method="test", n_images=10)
    result = decision.result({KNN: (9.0, hot)}, StageTimer(), hot.shape)
    outside = result.normalized_map()[:, :12]
    assert (outside >= 0.98).all() and (outside < 1.0).all()
    assert [(r.x, r.width) for r in find_regions(result.normalized_map())] == [(12, 20)]
    fused = Decision(fusion="mean")
    fused.scorer_calibrations = {KNN: decision.calibration,
                                 "autoencoder": Calibration(threshold=0.5, floor=0.1, method="test", n_images=10)}
    fused.calibration = Calibration(threshold=1.2, floor=0.4, method="test", n_images=10)
    result = fused.result({KNN: (9.0, hot), "autoencoder": (2.0, np.full((32, 32), 2.0, np.float32))}, StageTimer(),
                          hot.shape)
    outside = result.normalized_map()[:, :12]
    assert (outside >= 0.98).all() and (outside < 1.0).all()


def test_evaluate_leaves_out_a_defect_the_mask_rules_out_and_says_so(masked_model, tmp_path):
    """A defect wholly outside the inspection mask cannot be found by design, yet evaluate counted its image as
    missed (recall 3 of 5 here, every miss outside) and its pixels, scored as typical, in pixel AUROC and PRO. Its
    image is now left out of the image metrics and the recall, every ground-truth pixel outside the mask out of the
    pixel metrics, and the output names the images and counts the pixels; a defect the mask cuts stays, judged on
    its inspected part."""
    from anomaly_service.evaluate import evaluate_model, read_category

    rng = np.random.default_rng(11)
    root = tmp_path / "part"
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(textured_part(rng)).save(root / "train/good/000.png")
    for i in range(3):
        Image.fromarray(textured_part(rng)).save(root / "test/good" / f"{i}.png")
    outside_pixels = 0
    for i, centre in enumerate([INSIDE, (40, 30), (64, 64), OUTSIDE, (30, 110)]):  # the middle one on the edge
        img, truth = add_defect(textured_part(rng), *centre)
        Image.fromarray(img).save(root / "test/blob" / f"{i}.png")
        Image.fromarray((truth * 255).astype(np.uint8)).save(root / "ground_truth/blob" / f"{i}_mask.png")
        outside_pixels += int((truth & ~masked_model.mask_.at(truth.shape)).sum())
    said: list[str] = []
    metrics = evaluate_model(masked_model, read_category(root)[1], None, warn=said.append)
    assert metrics["n_defect"] == 3 and metrics["defect_recall"] == 1.0 and metrics["image_auroc"] == 1.0
    assert metrics["defects_outside_mask"] == [str(root / "test/blob/3.png"), str(root / "test/blob/4.png")]
    assert metrics["defect_pixels_outside_mask"] == outside_pixels > 0
    assert metrics["by_type"]["blob"]["n"] == 3
    assert metrics["pixel_auroc"] > 0.95 and metrics["pro"] > 0.8, metrics
    assert any("2 defect image(s) have every ground-truth pixel outside" in line for line in said), said


def test_evaluate_with_every_defect_outside_the_mask_says_so_not_that_masks_are_missing(masked_model, tmp_path):
    """A test set whose every defect lies outside the inspection mask leaves no defect to measure: the command
    line said the pixel metrics were skipped for "no ground-truth masks under .../ground_truth", which were there,
    and sent the reader looking for files. It says why now; the image metrics are null, not a division by nothing."""
    from click.testing import CliRunner

    from anomaly_service.cli import app

    rng = np.random.default_rng(12)
    root = tmp_path / "part"
    for sub in ("test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(textured_part(rng)).save(root / "test/good" / f"{i}.png")
        img, truth = add_defect(textured_part(rng), *OUTSIDE)
        Image.fromarray(img).save(root / "test/blob" / f"{i}.png")
        Image.fromarray((truth * 255).astype(np.uint8)).save(root / "ground_truth/blob" / f"{i}_mask.png")
    masked_model.save(tmp_path / "m")
    out = CliRunner().invoke(app, ["evaluate", str(root), "--model", str(tmp_path / "m"), "--json",
                                   str(tmp_path / "m.json"), "-q"])
    assert out.exit_code == 0, out.output
    assert "no ground-truth masks" not in out.output
    assert "pixel_auroc          skipped: every ground-truth defect pixel lies outside" in out.output, out.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_defect"] == 0 and metrics["image_auroc"] is None and metrics["defect_recall"] is None
    assert len(metrics["defects_outside_mask"]) == 2 and metrics["pixel_auroc"] is None


def test_otsu_is_the_threshold_of_the_largest_between_class_variance():
    """Otsu's threshold and separation against the between-class variance computed at every cut of the histogram:
    the one test of ``--mask auto`` on a real fit passes at a threshold a bin off, or a separation on another scale,
    whenever the part and the belt are far apart."""
    from anomaly_service.foreground import otsu

    rng = np.random.default_rng(4)
    for values in (np.concatenate([rng.normal(0, 1, 3000), rng.normal(5, 2, 1000)]), rng.normal(0, 1, 500),
                   rng.integers(0, 3, 500) * 7.0, np.append(np.zeros(300), 1e-9)):  # and where the last cut is 0/0
        hist, edges = np.histogram(values, bins=64)
        p, centers = hist / hist.sum(), (edges[:-1] + edges[1:]) / 2
        total = float((p * (centers - (p * centers).sum()) ** 2).sum())
        best = max(range(63), key=lambda k: (p[:k + 1].sum() * p[k + 1:].sum() * (
            (p[:k + 1] * centers[:k + 1]).sum() / p[:k + 1].sum()
            - (p[k + 1:] * centers[k + 1:]).sum() / p[k + 1:].sum()) ** 2) if p[:k + 1].sum() and p[k + 1:].sum()
            else 0.0)
        w0, w1 = p[:best + 1].sum(), p[best + 1:].sum()
        between = w0 * w1 * ((p[:best + 1] * centers[:best + 1]).sum() / w0
                             - (p[best + 1:] * centers[best + 1:]).sum() / w1) ** 2
        level, separation = otsu(values, bins=64)
        assert level == pytest.approx(edges[best + 1]) and separation == pytest.approx(between / total)
    assert otsu(np.full(10, 3.0))[1] == 0.0  # one value: no split


def test_the_part_is_the_class_that_holds_the_centre_more_than_the_border():
    """The frame's central half against its outer eighth, on a frame whose sides are no multiple of 8."""
    from anomaly_service.foreground import _centre_minus_border

    rng = np.random.default_rng(5)
    for h, w in ((37, 53), (80, 45)):  # the second: a ring an eighth deep is two rows deeper than a ninth
        centre = np.zeros((h, w), bool)
        centre[h // 4:h - h // 4, w // 4:w - w // 4] = True
        ring = np.ones((h, w), bool)
        ring[h // 8:h - h // 8, w // 8:w - w // 8] = False
        for _ in range(5):
            fg = rng.random((h, w)) < rng.uniform(0.2, 0.8)
            assert _centre_minus_border(fg) == pytest.approx(fg[centre].mean() - fg[ring].mean())
        assert _centre_minus_border(centre) == 1.0 and _centre_minus_border(ring) == -1.0


def test_each_pixel_takes_the_class_of_its_nearest_feature_cell():
    from anomaly_service.foreground import _stretch_share

    cells = np.random.default_rng(6).random((5, 7)) < 0.5
    out = _stretch_share(cells, (23, 31))
    assert out.shape == (23, 31) and out.dtype == np.float64
    assert all(out[y, x] == cells[y * 5 // 23, x * 7 // 31] for y in range(23) for x in range(31))


def test_the_foreground_is_cleaned_filled_without_specks_and_grown_by_a_patch():
    """Holes filled, components under a hundredth of the frame dropped (one of exactly that share kept), the rest
    grown by a disc of one patch cell's radius."""
    from anomaly_service.foreground import _cleanup

    fg = np.zeros((100, 100), bool)
    fg[30:60, 30:60] = True
    fg[40:50, 40:50] = False  # a bore in the part
    fg[5:14, 80:91] = True  # 99 pixels: a speck
    fg[80:90, 5:15] = True  # 100 pixels: a piece of the part
    out = _cleanup(fg, 2.4)  # a radius of two pixels
    assert out[45, 45] and not out[9, 85] and out[85, 10]
    assert out[28, 45] and not out[27, 45]  # two pixels out from the edge, not three
    assert out[28, 30] and not out[28, 28]  # a disc, not a square: the corner's diagonal neighbour stays out
    assert _cleanup(fg, 0.2)[29, 45] and not _cleanup(fg, 0.2)[28, 45]  # at least one pixel


def test_the_first_component_is_the_direction_the_patches_vary_most_along():
    import torch

    from anomaly_service.foreground import PCA_SAMPLE, first_component

    gen = torch.Generator().manual_seed(0)
    along = torch.tensor([3.0, -1.0, 2.0, 0.5]) / torch.tensor([3.0, -1.0, 2.0, 0.5]).norm()
    bank = 5 + torch.randn(PCA_SAMPLE + 500, 1, generator=gen) * 4 * along + \
        torch.randn(PCA_SAMPLE + 500, 4, generator=gen) * 0.1
    mean, direction = first_component(bank)
    assert torch.allclose(mean, bank.mean(0), atol=0.15) and abs(float(direction @ along)) > 0.999


def test_evaluate_keeps_a_defect_image_whose_mask_is_empty_or_missing(left_half, tmp_path):
    """Under an inspection mask, a defect image whose ground truth is an empty mask (nothing drawn) or no file at
    all is kept: where its defect lies is not known, so it is not one the mask rules out. Only a drawn defect wholly
    outside goes; a good image stays."""
    from anomaly_service.evaluate import Sample, inspected_truth
    from anomaly_service.inspection_mask import read_mask

    model = AnomalyModel()
    model.mask_ = read_mask(left_half)
    outside = np.zeros((128, 128), bool)
    outside[10:20, 100:110] = True
    truths = [np.zeros((128, 128), bool), None, outside, np.zeros((128, 128), bool)]
    samples = [Sample(tmp_path / f"{i}.png", label, "good" if label == 0 else "blob", None)
               for i, label in enumerate([1, 1, 1, 0])]
    kept, left = inspected_truth(model, samples, [np.zeros((128, 128), np.float32)] * 4, truths)
    assert kept == [0, 1, 3] and left.images == [str(tmp_path / "2.png")] and left.pixels == 100


def _colour16_png(pixels: np.ndarray, key: tuple[int, int, int], orientation: int | None = None) -> bytes:
    """A 16-bit colour PNG whose transparency key is ``key`` (and an EXIF turn), written by hand: Pillow writes
    none."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + r.astype(">u2").tobytes() for r in pixels)
    exif = b"" if orientation is None else chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\x01" + struct.pack(
        ">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0\0\0\0")
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + exif
            + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_colour_key_matches_its_own_colour_only(tmp_path):
    """Pillow reads a 16-bit colour PNG's samples by their high bytes, and its key was compared with those: every
    colour sharing the keyed white's high bytes was transparent too, so a mask drawn a step off that white
    inspected nothing and was refused. The key is compared with the whole samples, as the file turns."""
    drawn = np.zeros((3, 8), bool)
    drawn[:, 5:] = True
    for grey in (0xFFFE, 0xFF00, 0x8000):
        pixels = np.repeat(np.where(drawn, grey, 0xFFFF)[..., None], 3, axis=2)
        (tmp_path / "c.png").write_bytes(_colour16_png(pixels, (0xFFFF,) * 3))
        np.testing.assert_array_equal(read_mask(tmp_path / "c.png").pixels, drawn, err_msg=hex(grey))
        (tmp_path / "turned.png").write_bytes(_colour16_png(pixels, (0xFFFF,) * 3, orientation=3))
        np.testing.assert_array_equal(read_mask(tmp_path / "turned.png").pixels, drawn[::-1, ::-1])
