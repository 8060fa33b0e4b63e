import io

import numpy as np
from PIL import Image

import pytest
from scipy.ndimage import gaussian_filter

from anomaly_service.anomaly_map import anomaly_map, resize_map
from anomaly_service.heatmap import DISPLAY_MAX, color_index, color_table, colorize, heatmap_png, overlay
from anomaly_service.regions import find_regions


def test_regions_are_components_above_threshold_with_their_peaks():
    m = np.zeros((100, 200), np.float32)
    m[10:20, 30:50] = 1.2
    m[15, 40] = 2.0
    m[60:90, 150:160] = 1.5
    m[95:97, 5:7] = 1.9  # 4 pixels: below min_area, dropped however hot (short of the map's peak)
    m[40:45, 100:105] = 0.99  # below the threshold
    regions = find_regions(m, min_area=16)
    assert [(r.x, r.y, r.width, r.height) for r in regions] == [(30, 10, 20, 10), (150, 60, 10, 30)]
    assert regions[0].peak_score == 2.0 and (regions[0].peak_x, regions[0].peak_y) == (40, 15)
    assert regions[0].area == 200 and regions[1].area == 300
    assert find_regions(np.zeros((10, 10), np.float32)) == []
    assert len(find_regions(m, min_area=1)) == 3


def test_regions_are_listed_hottest_first_and_capped_at_the_twenty_hottest():
    """service.md: regions come highest peak first; a part covered in small hot spots lists its twenty hottest."""
    m = np.zeros((60, 300), np.float32)
    m[5:10, 5:10] = 1.1  # the first in scan order, the coolest
    m[40:50, 200:210] = 3.0
    assert [r.peak_score for r in find_regions(m)] == pytest.approx([3.0, 1.1])
    many = np.zeros((60, 300), np.float32)
    for i in range(25):  # 25 separate 5x5 spots, each hotter than the one before
        many[5 + 30 * (i % 2):10 + 30 * (i % 2), 10 * i + 5:10 * i + 10] = 1.0 + 0.1 * i
    regions = find_regions(many)
    assert len(regions) == 20
    assert [r.peak_score for r in regions] == pytest.approx([1.0 + 0.1 * i for i in range(24, 4, -1)])


def test_a_region_is_at_least_16_pixels_at_or_above_the_threshold():
    """how-it-works.md: connected areas at or above 1.0, at least 16 px."""
    m = np.zeros((40, 40), np.float32)
    m[2:6, 2:6] = 1.0  # 16 pixels exactly at the threshold: a region
    m[20:23, 20:25] = 5.0  # 15 pixels, however hot: not one
    m[30:36, 30:36] = 6.0  # the map's peak
    assert [(r.x, r.y, r.area) for r in find_regions(m)] == [(30, 30, 36), (2, 2, 16)]


def test_the_peak_that_flags_a_part_is_a_region_however_small():
    """A part whose hottest pixel is just over the threshold is flagged (map-max); the few pixels above it are its
    region, or the answer said anomaly with nothing to show where. Smaller spots elsewhere are still dropped."""
    yy, xx = np.mgrid[0:128, 0:128]
    m = (0.5 + 0.51 * np.exp(-((yy - 64.0) ** 2 + (xx - 40.0) ** 2) / (2 * 8.0 ** 2))).astype(np.float32)
    m[100:102, 100:102] = 1.005  # a speckle above the threshold, not the peak: dropped as before
    assert float(m.max()) > 1.0 and int((m >= 1.0).sum()) < 16
    regions = find_regions(m)
    assert len(regions) == 1
    assert (regions[0].peak_x, regions[0].peak_y) == (40, 64) and regions[0].peak_score == pytest.approx(m.max())
    assert regions[0].area == int((m[56:73, 32:49] >= 1.0).sum())
    assert find_regions(np.full((20, 20), 0.99, np.float32)) == []  # a map below the threshold has none


def test_a_regions_peak_is_its_own_even_where_a_hotter_one_lies_inside_its_box():
    m = np.zeros((40, 40), np.float32)
    m[5, 5:30] = 1.2  # an L: along the top and down the right side
    m[5:30, 29] = 1.3
    m[20:25, 10:15] = 4.0  # another region, inside the L's box, not touching it
    regions = find_regions(m)
    assert [r.peak_score for r in regions] == pytest.approx([4.0, 1.3])
    ell = regions[1]
    assert (ell.x, ell.y, ell.width, ell.height, ell.area) == (5, 5, 25, 25, 49)
    assert ell.peak_x == 29 and 5 <= ell.peak_y < 30
    assert ell.to_dict() == {"x": 5, "y": 5, "width": 25, "height": 25, "area": 49, "peak_score": ell.peak_score,
                             "peak_x": 29, "peak_y": ell.peak_y, "nearest_normal": None}  # the answer's fields


def test_colors_share_one_global_scale():
    m = np.array([[0.0, 1.0, DISPLAY_MAX, 10.0, -3.0]], np.float32)
    idx = color_index(m)
    assert list(idx[0]) == [0, 170, 255, 255, 0]  # threshold two thirds up; clipped, never stretched
    rgb = colorize(m)
    np.testing.assert_array_equal(rgb, color_table()[idx])
    decoded = np.asarray(Image.open(io.BytesIO(heatmap_png(m))).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)  # the palette PNG shows exactly the same colors
    img = np.full((1, 5, 3), 200, np.uint8)
    blend = overlay(img, rgb)
    expected = img * 0.55 + rgb * 0.45
    assert np.abs(blend.astype(float) - expected).max() <= 1.0


def test_a_heatmap_keeps_every_pixel_in_its_place():
    """Rows and columns as in the map (a 1-row map cannot tell), in the colors and in both PNGs."""
    from anomaly_service.heatmap import to_png

    m = np.linspace(0.0, DISPLAY_MAX, 35, dtype=np.float32).reshape(5, 7)
    rgb = colorize(m)
    np.testing.assert_array_equal(rgb, color_table()[color_index(m)])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(heatmap_png(m))).convert("RGB")), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(to_png(rgb)))), rgb)


@pytest.mark.parametrize("grid_shape, work, out, sigma", [
    ((32, 32), (256, 256), (900, 900), 4.0),  # upsample, smooth, then grow to a large photo
    ((20, 30), (160, 240), (160, 240), 4.0),  # the photo at the working size: no last resize
    ((32, 64), (256, 512), (300, 400), 4.0),  # each axis its own scale, shrinking one and growing the other
    ((7, 9), (56, 72), (61, 80), 2.0),
    ((16, 16), (128, 128), (100, 100), 0.0),  # no smoothing
    ((1, 1), (8, 8), (8, 8), 4.0),
    ((16, 16), (128, 128), (100, 100), 1.0),  # a narrow Gaussian is still one
    ((64, 4), (512, 32), (5000, 8), 4.0),  # a tall photo: one axis's matrix too large to keep, built each time
])
def test_anomaly_map_is_upsample_then_gaussian_then_resize(grid_shape, work, out, sigma):
    """The map is computed as one matrix per axis; it must equal the three steps it stands for (bilinear
    upsampling, the Gaussian with replicated edges, the bilinear resize) up to float rounding, on every shape:
    a wrong edge mode, a transposed axis or a stale cached operator would move it far more."""
    grid = (np.random.default_rng(sum(grid_shape)).random(grid_shape) * 50).astype(np.float32)
    steps = resize_map(grid, work)
    if sigma > 0:
        steps = gaussian_filter(steps, sigma=sigma, mode="nearest", truncate=4.0)
    steps = resize_map(steps, out)
    got = anomaly_map(grid, work, out, sigma)
    assert got.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, steps, rtol=0, atol=1e-5 * float(np.abs(steps).max()))


def test_a_map_is_resized_on_pixel_centres_and_large_operators_are_not_kept():
    """Bilinear on pixel centres (align_corners off, as Pillow and OpenCV resize): a map grown 2x puts each grid
    cell's value at the centre of the pixels it covers, so a defect lies where it is on the photo. The matrix of a
    tall photo's axis is built for it and not kept (photos of many odd sizes would fill the memory)."""
    from anomaly_service.anomaly_map import _build_axis_operator

    np.testing.assert_allclose(resize_map(np.array([[0.0, 1.0]], np.float32), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])
    _build_axis_operator.cache_clear()
    anomaly_map(np.ones((64, 4), np.float32), (512, 32), (5000, 8))
    assert _build_axis_operator.cache_info().currsize == 1  # the columns' small matrix only
    from anomaly_service.anomaly_map import _axis_operator

    assert _axis_operator(4, 32, 8, 4.0) is _axis_operator(4, 32, 8, 4.0)  # the small one kept for the next photo
    assert _axis_operator(64, 512, 5000, 4.0) is not _axis_operator(64, 512, 5000, 4.0)  # the large one built again


@pytest.mark.parametrize("out", [(20000, 9), (7, 30000)])
def test_a_map_for_a_strip_of_a_photo_is_the_same_without_a_huge_matrix(out, monkeypatch):
    """A side of millions of pixels made one axis's matrix hundreds of MB, kept in a cache (an adversarial strip
    of 8 x 5,000,000 pixels: 3.6 GB). Past OPERATOR_MAX elements the map is smoothed at the working size and resized
    once: the same three steps, and no matrix as long as the photo is built."""
    from anomaly_service import anomaly_map as maps

    grid = (np.random.default_rng(3).random((32, 2) if out[0] > out[1] else (2, 32)) * 50).astype(np.float32)
    work = (256, 16) if out[0] > out[1] else (16, 256)
    steps = resize_map(gaussian_filter(resize_map(grid, work), sigma=4.0, mode="nearest", truncate=4.0), out)
    built: list[tuple] = []
    real = maps._build_axis_operator.__wrapped__

    def operator(*args):
        built.append(args)
        return real(*args)

    monkeypatch.setattr(maps, "_axis_operator", operator)
    monkeypatch.setattr(maps, "OPERATOR_MAX", 100_000)
    got = anomaly_map(grid, work, out, 4.0)
    assert got.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, steps, rtol=0, atol=1e-5 * float(np.abs(steps).max()))
    assert all(n_grid * n_out <= 100_000 for n_grid, _, n_out, _ in built)


def _fused_result(rule: str, knn_peak: float, ae_peak: float, apart: bool = True):
    """One part scored by a decision with a second opinion fused by ``rule``: the kNN's raw map peaks at
    ``knn_peak`` on the left, the second opinion's at ``ae_peak`` on the right (or at the same place)."""
    from anomaly_service.calibration import Calibration
    from anomaly_service.decision import Decision
    from anomaly_service.timing import StageTimer

    knn_map, ae_map = np.full((40, 40), 1.0, np.float32), np.full((40, 40), 1.0, np.float32)
    knn_map[10:20, 5:15] = knn_peak
    if apart:
        ae_map[10:20, 25:35] = ae_peak
    else:
        ae_map[10:20, 5:15] = ae_peak
    decision = Decision(fusion=rule)
    decision.scorer_calibrations = {"knn": Calibration(3.0, 1.0, "test", 10),
                                    "autoencoder": Calibration(5.0, 1.0, "test", 10)}
    # excess: a good part's decision is the kNN's own, so is its calibration; mean and max calibrate again
    fused = Calibration(1.0, 0.0, "test", 10)
    decision.calibration = decision.scorer_calibrations["knn"] if rule == "excess" else fused
    raw = {"knn": (float(knn_map.max()), knn_map), "autoencoder": (float(ae_map.max()), ae_map)}
    return decision.result(raw, StageTimer(), (40, 40, 3))


def test_what_the_heatmap_shows_when_a_second_opinion_is_fused():
    """docs/service.md#heatmaps, case by case: the map's hottest pixel is never above normalized_score; with the
    whole-image branch a part the kNN flags shows the kNN's map (the branch's excess is in the score only), a part
    only the branch flags shows the excess where it lies; with the feature autoencoder, max keeps the peak and mean
    can only lower it."""
    both = _fused_result("excess", knn_peak=5.0, ae_peak=9.0, apart=False)  # the kNN flags it, the branch too
    peak = float(both.normalized_map().max())
    assert peak == pytest.approx(both.scorers["knn"]["normalized_score"]) == pytest.approx(2.0)
    assert both.normalized_score > peak + 0.5 and both.is_anomaly
    assert find_regions(both.normalized_map())[0].peak_score == pytest.approx(peak)
    layout = _fused_result("excess", knn_peak=2.0, ae_peak=13.0)  # only the branch flags it
    assert not layout.scorers["knn"]["is_anomaly"] and layout.is_anomaly
    assert float(layout.normalized_map().max()) == pytest.approx(layout.normalized_score)
    for apart in (True, False):
        mx = _fused_result("max", knn_peak=5.0, ae_peak=9.0, apart=apart)
        assert float(mx.normalized_map().max()) == pytest.approx(mx.normalized_score)
    mean_apart = _fused_result("mean", knn_peak=5.0, ae_peak=9.0)
    assert float(mean_apart.normalized_map().max()) < mean_apart.normalized_score - 0.1
    mean_together = _fused_result("mean", knn_peak=5.0, ae_peak=9.0, apart=False)
    assert float(mean_together.normalized_map().max()) == pytest.approx(mean_together.normalized_score)


# Machado, Oliveira and Fernandes (2009), full severity, on linear RGB: how a protanope, deuteranope and
# tritanope see a colour (Chromium's DevTools vision-deficiency emulation is a matrix of this kind).
CVD = {"protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                      [-0.003882, -0.048116, 1.051998]],
       "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                        [-0.011820, 0.042940, 0.968881]],
       "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                      [0.004733, 0.691367, 0.303900]]}


@pytest.mark.parametrize("vision", ["normal", *CVD])
def test_hot_and_cold_stay_apart_on_the_heatmap_for_colour_blind_eyes(vision):
    """docs/decisions.md, "The heatmap for colour-blind operators": every colour of the table at 1.2 or more (well
    above the threshold) stays far from every colour at 0.8 or less, as a person with each colour-vision deficiency
    sees them (CIEDE2000 at least 15, a clear difference). What does not hold for them, the threshold's orange
    against a normal part's yellow-green, is carried by the page's region boxes and text, not by this table."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    srgb = color_table().astype(float) / 255
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    seen = np.clip(linear @ np.array(CVD[vision]).T if vision in CVD else linear, 0, 1)
    shown = np.where(seen <= 0.0031308, 12.92 * seen, 1.055 * seen ** (1 / 2.4) - 0.055)
    lab = rgb2lab(shown[None])[0]
    value = np.arange(256) * DISPLAY_MAX / 255
    hot, cold = lab[value >= 1.2], lab[value <= 0.8]
    closest = deltaE_ciede2000(hot[:, None], cold[None]).min()
    assert closest >= 15, closest


def test_an_array_heatmap_is_the_map_shrunk_to_its_longer_side_never_grown():
    """The ``array`` rendering: the normalized map resized so its longer side is at most 128 cells (or the side
    asked), each side in proportion and at least one cell; a map already within it is sent as it is. Only a
    test that runs a service read it, and none of those shrinks a map by another factor on each side."""
    from anomaly_service.render import ARRAY_MAX_SIDE, Verdict, heatmap_cells, render_heatmap

    rng = np.random.default_rng(3)
    tall, small, strip = rng.random((256, 100), np.float32), rng.random((100, 60), np.float32), rng.random((300, 2))
    assert ARRAY_MAX_SIDE == 128
    assert np.array_equal(heatmap_cells(tall), resize_map(tall, (128, 50)))
    assert heatmap_cells(small) is small and heatmap_cells(tall, 32).shape == (32, 12)
    assert heatmap_cells(strip.astype(np.float32)).shape == (128, 1)
    assert heatmap_cells(strip.T.astype(np.float32)).shape == (1, 128)
    got = render_heatmap("array", tall)
    assert got.shape == (128, 50) and (got.width, got.height) == (100, 256)
    assert np.array_equal(np.frombuffer(got.data, "<f2").reshape(128, 50), resize_map(tall, (128, 50)).astype("<f2"))
    with pytest.raises(ValueError, match="an overlay heatmap needs the image"):
        render_heatmap("overlay", tall)
    with pytest.raises(ValueError, match="unknown heatmap kind 'jpeg'"):
        render_heatmap("jpeg", tall)
    assert Verdict("anomaly", []).label == "ANOMALY" and Verdict("normal", []).label == "normal"


def test_a_picture_is_drawn_at_most_max_side_a_side_with_the_maps_heat_averaged_not_sampled():
    """A line camera's photo is shown a few hundred pixels wide; its overlay drawn at full size took seconds. With
    ``max_side`` a picture keeps the photo's aspect, is never drawn larger than the photo, and its map is each
    covered pixel's average: a hot spot narrower than the step a plain resize samples at keeps its heat."""
    import io

    from PIL import Image

    from anomaly_service.render import overlay_png, overlay_pixels, picture_size, render_heatmap, shrink_map, \
        shrink_photo

    assert picture_size((3000, 4000), 1000) == (750, 1000) and picture_size((4000, 30), 100) == (100, 1)
    assert picture_size((300, 400), 1000) == (300, 400) and picture_size((300, 400), None) == (300, 400)
    norm = np.zeros((400, 600), np.float32)
    norm[200:202, 300:302] = 9.0  # a spot two pixels wide, a sixth of the picture's step
    small = shrink_map(norm, (40, 60))
    assert small.max() > 0.0 and small.sum() == pytest.approx(norm.sum() / 100, rel=0.05)
    image = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    png = overlay_png(image, norm, 60)
    drawn = np.asarray(Image.open(io.BytesIO(png)))
    assert drawn.shape == (40, 60, 3)
    assert np.array_equal(drawn, overlay_pixels(shrink_photo(image, (40, 60)), small))
    assert overlay_png(image, norm) == overlay_png(image, norm, 600)  # at its size or larger: the photo's own
    # a masked model's map is NaN (not inspected) outside its mask: left out of each average, never spread inside
    masked = np.full((400, 600), 0.5, np.float32)
    masked[:, :300] = np.nan
    shrunk = shrink_map(masked, (40, 60))
    assert np.isnan(shrunk[:, :29]).all() and np.allclose(shrunk[:, 30:], 0.5)  # 30 on: inspected pixels only
    assert np.allclose(shrunk[:, 29][~np.isnan(shrunk[:, 29])], 0.5)  # the border: either
    for kind in ("png", "overlay"):
        full, scaled = render_heatmap(kind, norm, image), render_heatmap(kind, norm, image, max_side=60)
        assert (full.width, full.height, full.shape) == (600, 400, None)
        assert (scaled.width, scaled.height, scaled.shape) == (600, 400, (40, 60))
        assert Image.open(io.BytesIO(scaled.data)).size == (60, 40)
