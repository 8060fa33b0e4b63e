"""Property-based tests (Hypothesis) of the pure numeric and geometric stages: regions, map samples, tiles, turns,
the grain's fill, the inspection mask, maps, the threshold, drift, packing, options, shards and instants. Each
property is one a caller relies on, over degenerate inputs first (constant maps, frames one pixel wide, extreme
aspect ratios, NaN, integers too long for a float). Four found faults, each pinned beside it by a fixed example:
a tall strip's pixel sample, and a polygon's point, an option's value and a completion index that raised instead
of being refused in a sentence. Derandomized and short, so CI runs the same examples every time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_service import map_sample
from anomaly_service.anomaly_map import anomaly_map
from anomaly_service.calibration import calibrate, threshold_problem, threshold_rule
from anomaly_service.drift import DriftMonitor
from anomaly_service.errors import ConfigError
from anomaly_service.grain import (GrainAlignment, _from_run, _touched, fill_sources, filled_from, inner_pixels,
                                   real_pixels)
from anomaly_service.inspection_mask import InspectionMask, fill_uninspected, rasterise_polygons, score_inside
from anomaly_service.instants import NotAnInstant, parse_instant
from anomaly_service.options import MODEL_OPTIONS, RUNTIME_OPTIONS, SERVICE_OPTIONS
from anomaly_service.orientation import Turn
from anomaly_service.packing import runs_within
from anomaly_service.regions import find_regions
from anomaly_service.sharding import INDEX_ENV, Shard
from anomaly_service.tiling import layout

quick = settings(max_examples=60, deadline=None, derandomize=True)

# any angle, and those a hair off a quarter or an eighth turn, where the turn's geometry changes branch
angles = st.one_of(st.floats(0.0, 360.0), st.builds(lambda q, e: q * 45.0 + e, st.integers(0, 8),
                                                   st.sampled_from([1e-12, -1e-9, 1e-7, -1e-4, 0.01])))


@st.composite
def maps(draw: st.DrawFn, max_side: int = 40, specials: bool = True) -> np.ndarray:
    """A float32 map: constant, sparse hot spots or noise, at any shape from one pixel up, NaN and inf possible."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["constant", "spots", "noise"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "constant":
        m = np.full((h, w), draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])), np.float32)
    elif kind == "spots":
        m = np.where(rng.random((h, w)) < draw(st.floats(0, 1)), 2.0, 0.0).astype(np.float32)
    else:
        m = (rng.random((h, w)) * 2).astype(np.float32)
    if specials and draw(st.booleans()):
        m[rng.random((h, w)) < 0.1] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return m


# ---------------------------------------------------------------------------------------------- regions
@quick
@given(maps(), st.integers(0, 20))
def test_regions_lie_in_the_frame_and_cover_every_pixel_at_the_level(m: np.ndarray, min_area: int) -> None:
    regions = find_regions(m, min_area=min_area, max_regions=10**6)
    h, w = m.shape
    covered = np.zeros(m.shape, bool)
    for r in regions:
        assert 0 <= r.x and 0 <= r.y and r.width >= 1 and r.height >= 1
        assert r.x + r.width <= w and r.y + r.height <= h
        assert r.x <= r.peak_x < r.x + r.width and r.y <= r.peak_y < r.y + r.height
        # smaller than min_area only the one holding the map's peak, the pixel that flags the part
        assert (r.area >= max(min_area, 1) or r.peak_score == m.max()) and r.area <= r.width * r.height
        assert r.peak_score >= 1.0 and r.peak_score == m[r.peak_y, r.peak_x]
        covered[r.y : r.y + r.height, r.x : r.x + r.width] = True
    if min_area <= 1:
        assert covered[m >= 1.0].all()
    if m.max() >= 1.0:
        assert regions[0].peak_score == m.max()
    assert [r.peak_score for r in regions] == sorted((r.peak_score for r in regions), reverse=True)


@quick
@given(maps(max_side=24), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30),
       st.integers(0, 6))
def test_a_maps_regions_are_the_same_in_a_larger_frame_moved_by_its_place(
        m: np.ndarray, top: int, left: int, bottom: int, right: int, min_area: int) -> None:
    """find_regions labels only the box that holds every pixel at the level (a line camera's photo with a small
    defect costs its box): the same map set in a larger frame below the level gives the same regions, moved."""
    frame = np.zeros((top + m.shape[0] + bottom, left + m.shape[1] + right), np.float32)
    frame[top:top + m.shape[0], left:left + m.shape[1]] = m
    if np.isnan(frame.flat[int(np.argmax(frame))]) != np.isnan(m.flat[int(np.argmax(m))]):
        return  # a NaN is the frame's maximum only where it is the map's: argmax reads the first NaN
    alone = [(r.x + left, r.y + top, r.width, r.height, r.area, r.peak_score, r.peak_x + left, r.peak_y + top)
             for r in find_regions(m, min_area=min_area, max_regions=10**6)]
    framed = [(r.x, r.y, r.width, r.height, r.area, r.peak_score, r.peak_x, r.peak_y)
              for r in find_regions(frame, min_area=min_area, max_regions=10**6)]
    assert framed == alone


def test_a_nan_just_past_the_box_of_the_hot_pixels_is_read_as_no_region() -> None:
    """The map's argmax is its first NaN, here the pixel just past the box the hot pixels lie in: read as the
    hottest of no region, not looked up past the box's labels."""
    m = np.array([[2.0, 0.0], [np.nan, 0.0]], np.float32)
    assert [(r.x, r.y, r.area) for r in find_regions(m, min_area=1)] == [(0, 0, 1)]
    assert find_regions(m.T.copy(), min_area=1)[0].area == 1
    assert find_regions(m) == []  # smaller than min_area and not the hottest: the hottest is the NaN


# ---------------------------------------------------------------------------------------------- map samples
@quick
@given(st.integers(1, 300_000), st.integers(1, 3000), st.booleans())
def test_a_grid_sample_is_bounded_and_spans_the_frame(rows: int, cols: int, transpose: bool) -> None:
    if transpose:
        rows, cols = cols, rows
    if rows * cols > 3_000_000:
        cols = max(1, 3_000_000 // rows)
    a = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)
    s = map_sample.sample(a, "grid")
    assert 1 <= s.size < 2 * map_sample.SAMPLE_SIZE
    assert s[0] == 0  # the frame's first pixel
    picked_rows, picked_cols = np.unique(s // cols), np.unique(s % cols)
    assert rows - 1 - picked_rows.max() < max(1, rows / max(1, len(picked_rows))) * 2  # reaches the far end
    assert cols - 1 - picked_cols.max() < max(1, cols / max(1, len(picked_cols))) * 2
    np.testing.assert_array_equal(s, map_sample.sample(a, "grid"))
    for kind in map_sample.KINDS:  # a fit keeps the calibration maps' samples and reads them again: unchanged
        np.testing.assert_array_equal(map_sample.sample(s, kind), s)


def test_a_grid_sample_of_a_tall_strip_stays_bounded() -> None:
    """A map over four thousand times taller than wide: its rows were taken as if a row held under one column, so
    the sample grew with the strip's length (the shrunk example: 24,577 x 1 gave 8,193 values), and a fit's kept
    sample, read again as a sample, lost every other value."""
    sample = map_sample.sample(np.arange(24_577.0).reshape(-1, 1), "grid")
    assert sample.size <= 2 * map_sample.SAMPLE_SIZE
    np.testing.assert_array_equal(map_sample.sample(sample, "grid"), sample)  # the fit's sample, read again
    tall = map_sample.sample(np.arange(100_000.0).reshape(-1, 1), "grid")
    assert tall.size <= map_sample.SAMPLE_SIZE and tall[0] == 0 and tall[-1] >= 100_000 - 100


# ---------------------------------------------------------------------------------------------- tiles
@quick
@given(st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([100, 128, 256, 400, 1000]),
       st.sampled_from([128, 224, 256]), st.sampled_from([8, 16, 32]))
def test_tiles_cover_the_photo_and_stitch_without_seams(h: int, w: int, tile: int, image_size: int,
                                                        stride: int) -> None:
    """Every working pixel lies in a tile, and where every tile sees a cell alike the stitched grid is that value
    exactly: a seam is a cell whose tiles disagree, never the weighting."""
    lay = layout((h, w), tile, image_size, stride)
    wh, ww = lay.work_size
    seen = np.zeros((wh, ww), bool)
    for rows, cols in lay.crops():
        assert 0 <= rows.start and rows.stop <= wh and 0 <= cols.start and cols.stop <= ww
        seen[rows, cols] = True
    assert seen.all()
    cells = lay.cells()
    per_tile = cells[..., 0] * 1000.0 + cells[..., 1]  # a value of the image's cell, whichever tile holds it
    rr, cc = np.mgrid[0 : lay.grid[0], 0 : lay.grid[1]]
    np.testing.assert_allclose(lay.stitch(per_tile), rr * 1000.0 + cc, rtol=1e-12)
    np.testing.assert_array_equal(lay.pick(per_tile), rr * 1000.0 + cc)


# ---------------------------------------------------------------------------------------------- turns
@quick
@given(angles, st.booleans(), st.integers(1, 2000), st.integers(1, 2000))
def test_a_turn_maps_points_there_and_back(angle: float, flip: bool, h: int, w: int) -> None:
    turn = Turn(angle, flip)
    oh, ow = turn.out_shape((h, w))
    assert oh >= 1 and ow >= 1
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h], [w / 2, h / 2]], float)
    there = turn.from_source(corners, (h, w))
    assert (there >= -1e-6 * max(oh, ow) - 1e-6).all()
    assert (there[:, 0] <= ow + 1e-6 * ow + 1e-6).all() and (there[:, 1] <= oh + 1e-6 * oh + 1e-6).all()
    np.testing.assert_allclose(turn.to_source(there, (h, w)), corners, atol=1e-6 * max(h, w, 1))


@quick
@given(angles, st.booleans(), st.integers(1, 400), st.integers(1, 400))
def test_an_inscribed_box_holds_only_the_turned_photo(angle: float, flip: bool, h: int, w: int) -> None:
    turn = Turn(angle, flip)
    top, left, bh, bw = turn.inscribed_box((h, w))
    if bh <= 0 or bw <= 0:
        return  # too small to hold a box: every caller skips it by its side
    oh, ow = turn.out_shape((h, w))
    assert 0 <= top and 0 <= left and top + bh <= oh and left + bw <= ow
    real, _ = real_pixels(turn, (h, w))
    assert real[top : top + bh, left : left + bw].all()


@quick
@given(angles, st.booleans(), st.integers(1, 200), st.integers(1, 200))
def test_a_turned_footprint_keeps_the_photos_area_and_a_constant_map_turns_back_to_itself(
        angle: float, flip: bool, h: int, w: int) -> None:
    turn = Turn(angle, flip)
    real, _ = real_pixels(turn, (h, w))
    assert real.shape == turn.out_shape((h, w))
    assert abs(int(real.sum()) - h * w) <= 2 * (h + w) + 4  # a turn moves pixels, it neither adds nor drops many
    back = turn.map_back(np.full(real.shape, 0.7, np.float32), (h, w))
    assert back.shape == (h, w)
    np.testing.assert_allclose(back, 0.7, rtol=1e-5)  # no photo pixel reads past the canvas's edge


@quick
@given(angles, st.booleans(), st.integers(1, 40), st.integers(1, 400), st.booleans(), st.integers(0, 2**32 - 1))
def test_a_thin_photo_turns_into_a_canvas_of_its_shape(angle: float, flip: bool, thin: int, long: int,
                                                       transpose: bool, seed: int) -> None:
    h, w = (long, thin) if transpose else (thin, long)
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    turn = Turn(angle, flip)
    out = turn.image(image)
    assert out.shape == (*turn.out_shape(image.shape), 3)
    assert turn.mask(np.ones((h, w), bool), image).shape == out.shape[:2]
    copy, box = turn.copy_of(image)
    if box is not None:
        y, x, bh, bw = box
        assert copy.shape[:2] == (bh, bw) and y >= 0 and x >= 0 and y + bh <= out.shape[0] and x + bw <= out.shape[1]


# ---------------------------------------------------------------------------------------------- the grain's fill
@st.composite
def footprints(draw: st.DrawFn) -> np.ndarray:
    """Which canvas pixels show the photo: a turned photo's footprint, or scattered pixels."""
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 60)), draw(st.integers(1, 60))
        return real_pixels(Turn(draw(angles)), (h, w))[0]
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random((h, w)) < draw(st.floats(0, 1))


@quick
@given(footprints(), st.booleans(), st.integers(1, 12), st.integers(1, 12))
def test_fill_sources_name_searched_cells(real: np.ndarray, along_columns: bool, gh: int, gw: int) -> None:
    src = fill_sources(real, along_columns, (gh, gw))
    searched = _touched(_touched(real, gh), gw, axis=1)
    if src is None:
        assert searched.all() or not searched.any()
        return
    assert src.shape == (gh * gw,) and src.min() >= 0 and src.max() < gh * gw
    flat = searched.ravel()
    assert flat[src].all()  # every cell takes a searched cell's score
    assert (src[flat] == np.flatnonzero(flat)).all()  # and a searched cell its own


@quick
@given(angles, st.integers(1, 60), st.integers(1, 60), st.booleans())
def test_a_filled_pixel_comes_from_a_pixel_of_the_photo(angle: float, h: int, w: int, along_columns: bool) -> None:
    """On a turned photo's footprint (convex, no gaps along a line) the fill copies only the photo's own pixels."""
    real = inner_pixels(real_pixels(Turn(angle), (h, w))[0])
    ch, cw = real.shape
    yy, xx = np.mgrid[0:ch, 0:cw]
    xy = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    src = filled_from(xy, real, along_columns)
    if not (real.sum(axis=0 if along_columns else 1) >= 2).any():
        np.testing.assert_array_equal(src, xy)  # no line with a run to fill from: every point as it is
        return
    sx, sy = np.floor(src[:, 0]).astype(int), np.floor(src[:, 1]).astype(int)
    assert ((0 <= sx) & (sx < cw) & (0 <= sy) & (sy < ch)).all()
    assert real[sy, sx].all()


@quick
@given(st.integers(0, 30), st.integers(1, 12), st.lists(st.integers(-60, 60), min_size=1, max_size=30))
def test_a_run_mirrored_at_its_ends_stays_in_the_run(top: int, length: int, rows: list[int]) -> None:
    bottom = top + length - 1
    got = _from_run(np.asarray(rows, np.int32), np.int32(top), np.int32(bottom))
    assert ((top <= got) & (got <= bottom)).all()
    inside = (np.asarray(rows) >= top) & (np.asarray(rows) <= bottom)
    np.testing.assert_array_equal(got[inside], np.asarray(rows)[inside])  # a row of the run is its own


@quick
@given(st.integers(1, 40), st.integers(1, 60), st.integers(0, 2**32 - 1))
def test_a_span_touches_every_pixel_it_overlaps(size: int, n: int, seed: int) -> None:
    """_touched against its definition: span i covers [i size/n, (i+1) size/n), and touches each pixel it overlaps."""
    line = np.random.default_rng(seed).random(size) < 0.3
    edges = np.arange(n + 1) * size / n
    want = [line[int(math.floor(edges[i])) : max(int(math.ceil(edges[i + 1])), int(math.floor(edges[i])) + 1)].any()
            for i in range(n)]
    np.testing.assert_array_equal(_touched(line, n), want)


@quick
@given(angles, st.integers(8, 60), st.integers(8, 300), st.booleans(), st.sampled_from([0.0, 30.0, 90.0, 150.0]))
def test_a_plain_photo_turned_and_filled_along_the_grain_stays_plain(angle: float, h: int, w: int,
                                                                     transpose: bool, reference: float) -> None:
    """The fill repeats the photo's own pixels, so a photo of one grey fills its canvas with that grey: no black
    corner, whatever the aspect ratio (photos have at least eight pixels a side: images.ImageLimits)."""
    if transpose:
        h, w = w, h
    turn = Turn(angle)
    canvas = GrainAlignment(reference, 0.0, 1.0).canvas(np.full((h, w), 77, np.uint8), turn)
    assert canvas.shape == turn.out_shape((h, w))
    assert (canvas == 77).all()


@quick
@given(footprints())
def test_inner_pixels_are_real(real: np.ndarray) -> None:
    inner = inner_pixels(real)
    assert not (inner & ~real).any()


# ---------------------------------------------------------------------------------------------- the inspection mask
@quick
@given(footprints(), st.integers(1, 80), st.integers(1, 80))
def test_a_stretched_mask_always_inspects_something(pixels: np.ndarray, h: int, w: int) -> None:
    if not pixels.any():
        with pytest.raises(ConfigError):
            InspectionMask(pixels, "png")
        return
    mask = InspectionMask(pixels, "png")
    out = mask.at((h, w))
    assert out.shape == (h, w) and out.dtype == bool and out.any()


@quick
@given(footprints(), st.integers(1, 60), st.integers(1, 60), st.integers(1, 12), st.integers(1, 12),
       st.sampled_from(["map-max", "max"]), st.integers(0, 2**32 - 1))
def test_pixels_outside_the_mask_never_count(pixels: np.ndarray, h: int, w: int, gh: int, gw: int, mode: str,
                                             seed: int) -> None:
    """Whatever lies outside the inspected area, however hot, moves no image score, and reads NaN in the map."""
    if not pixels.any():
        return
    mask = InspectionMask(pixels, "png")
    rng = np.random.default_rng(seed)
    grid, amap = rng.random((gh, gw)).astype(np.float32), rng.random((h, w)).astype(np.float32)
    score, out = score_inside(grid, amap.copy(), mode, mask)
    hot_grid, hot_map = grid.copy(), amap.copy()
    hot_grid[~mask.at(grid.shape)], hot_map[~mask.at(amap.shape)] = 1e9, 1e9
    assert score_inside(hot_grid, hot_map, mode, mask)[0] == score
    assert np.isnan(out[~mask.at(amap.shape)]).all() and not np.isnan(out[mask.at(amap.shape)]).any()


in_frame = st.one_of(st.floats(-20, 70), st.integers(-20, 70))
odd = st.one_of(st.integers(-(10**400), 10**400), st.floats(), st.booleans(), st.text(max_size=2), st.none(),
                st.lists(in_frame, max_size=3))


@st.composite
def polygons(draw: st.DrawFn) -> list:
    """A polygon as a JSON file may hold it: pixel points, now and then one coordinate or point that is none."""
    poly = draw(st.lists(st.lists(in_frame, min_size=2, max_size=2), min_size=3, max_size=6))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(poly) - 1))
        if draw(st.booleans()):
            poly[i][draw(st.integers(0, 1))] = draw(odd)
        else:
            poly[i] = draw(odd)
    return poly


@quick
@given(st.lists(polygons(), min_size=1, max_size=3), st.integers(1, 50), st.integers(1, 50))
def test_any_polygons_rasterise_or_are_refused_in_a_sentence(polys: list, w: int, h: int) -> None:
    try:
        out = rasterise_polygons({"width": w, "height": h, "inspect": polys})
    except ConfigError:
        return
    assert out.shape == (h, w) and out.dtype == bool


def test_a_polygon_point_beyond_any_float_is_refused_in_a_sentence() -> None:
    """JSON holds integers of any length; one past a float's range raised OverflowError, a traceback at fit."""
    with pytest.raises(ConfigError, match=r"inspect\[0\] has a point that is not \[x, y\]"):
        rasterise_polygons({"width": 8, "height": 8, "inspect": [[[0, 0], [10**400, 0], [4, 4]]]})


# ------------------------------------------------------------------------------------- maps and the mask's fill
@quick
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 300), st.integers(1, 300), st.integers(1, 300),
       st.integers(1, 300), st.sampled_from([0.0, 1.0, 4.0]), st.integers(0, 2**32 - 1))
def test_a_map_never_reads_above_its_hottest_patch(h: int, w: int, wh: int, ww: int, oh: int, ow: int,
                                                   sigma: float, seed: int) -> None:
    """Upsampling, smoothing and resizing only average patch scores: map-max sits at or below the patch maximum
    (scoring.image_score), and a constant grid gives that constant."""
    grid = np.random.default_rng(seed).random((h, w)).astype(np.float32) * 10
    amap = anomaly_map(grid, (wh, ww), (oh, ow), sigma)
    assert amap.shape == (oh, ow)
    assert grid.min() - 1e-4 <= amap.min() and amap.max() <= grid.max() + 1e-4
    np.testing.assert_allclose(anomaly_map(np.full((h, w), 3.25, np.float32), (wh, ww), (oh, ow), sigma), 3.25,
                               rtol=1e-5)


@quick
@given(maps(specials=False), st.floats(0, 1), st.floats(-5, 5), st.sampled_from(map_sample.KINDS),
       st.integers(0, 2**32 - 1))
def test_uninspected_pixels_are_filled_below_the_ceiling_and_the_rest_kept(m: np.ndarray, share: float,
                                                                           ceiling: float, kind: str,
                                                                           seed: int) -> None:
    m = m.copy()
    m[np.random.default_rng(seed).random(m.shape) < share] = np.nan
    m.flat[0] = 0.25 if np.isnan(m).all() else m.flat[0]  # the mask leaves every image a pixel inspected
    out = fill_uninspected(m, ceiling, kind)
    inspected = ~np.isnan(m)
    assert not np.isnan(out).any()
    assert (out[inspected] == m[inspected]).all() and (out[~inspected] <= np.float32(ceiling)).all()


# ---------------------------------------------------------------------------------------------- the threshold
score_lists = st.one_of(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=120),
    st.lists(st.floats(0, 1e38), min_size=1, max_size=120),  # float32 distances reach no further
    st.builds(lambda v, n: [v] * n, st.floats(-1e6, 1e6), st.integers(1, 120)),
    st.builds(lambda base, n, k: [base] * n + [base * 2] * k, st.floats(0.001, 1e3), st.integers(40, 80),
              st.integers(1, 12)))


@quick
@given(score_lists, st.sampled_from([1e-6, 0.5, 3.0, 1e6]))
def test_the_threshold_is_finite_above_the_scores_and_follows_their_scale(scores: list[float], c: float) -> None:
    s = np.asarray(scores)
    t, _ = threshold_rule(s)
    assert math.isfinite(t) and t >= s.max()
    if np.abs(s).max() * c < 1e300:
        assert threshold_rule(s * c)[0] == pytest.approx(t * c, rel=1e-6, abs=1e-300)


@quick
@given(score_lists, st.floats(-1e6, 1e6), st.sampled_from([1.0, 3.0]))
def test_a_calibration_passes_its_own_check(scores: list[float], floor: float, z: float) -> None:
    """Whatever the scores (all equal, few, a threshold that fell to the floor), what a fit calibrates is what
    threshold_problem recomputes: a load never refuses an honest model."""
    s = np.asarray(scores)
    cal = calibrate(s, np.array([min(floor, s.max())]), z=z)  # a map's median pixel sits at or below its score
    assert math.isfinite(cal.threshold) and cal.threshold > cal.floor
    assert threshold_problem(cal, z) is None


# ---------------------------------------------------------------------------------------------- drift
@quick
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40), st.lists(st.floats(-1e3, 1e3), max_size=40),
       st.integers(1, 30), st.integers(1, 10))
def test_drift_is_a_share_and_a_window_of_the_reference_does_not_alarm(reference: list[float], window: list[float],
                                                                        size: int, min_parts: int) -> None:
    monitor = DriftMonitor({"normalized_score": np.asarray(reference)}, window=size, min_parts=min_parts)
    for v in window:
        monitor.observe(v, float("nan"))
    status = monitor.status()
    assert 0.0 <= status.drift <= 1.0
    assert all(0.0 <= p <= 1.0 for p in status.p_values.values())
    assert status.parts == min(len(window), size)
    monitor.reset()
    for v in sorted(reference)[:size]:  # the reference's own lower values: never above it
        monitor.observe(v, 0.0)
    assert not monitor.status().alarm


@quick
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=200), st.integers(2, 200), st.floats(0.001, 100),
       st.booleans())
def test_drift_is_one_sided(reference: list[float], n: int, gap: float, above: bool) -> None:
    """A window wholly above the reference is drift 1 (an alarm once the window and the reference are large enough
    to be significant whatever their values); one wholly below is none, however far."""
    ref = np.asarray(reference)
    monitor = DriftMonitor({"typical_distance": ref}, window=400, min_parts=30)
    start, sign = (ref.max() + gap, 1) if above else (ref.min() - gap, -1)
    for k in range(n):
        monitor.observe(0.0, start + sign * (k % 7) * gap)
    status = monitor.status()
    assert status.statistics["typical_distance"] == (1.0 if above else 0.0)
    if not above:
        assert not status.alarm
    elif n >= 30 and len(ref) >= 30:
        assert status.alarm and status.driven_by == "typical_distance"


# ---------------------------------------------------------------------------------------------- packing
@quick
@given(st.lists(st.integers(0, 50), max_size=30), st.integers(0, 100))
def test_runs_keep_the_order_stay_within_the_budget_and_close_only_when_full(weights: list[int], budget: int) -> None:
    runs = list(runs_within(enumerate(weights), budget))
    assert [i for run in runs for i in run] == list(range(len(weights)))
    assert all(run for run in runs)
    for k, run in enumerate(runs):
        total = sum(weights[i] for i in run)
        assert total <= budget or len(run) == 1
        if k + 1 < len(runs):
            assert total + weights[runs[k + 1][0]] > budget


# ---------------------------------------------------------------------------------------------- options
every_option = sorted({**MODEL_OPTIONS, **RUNTIME_OPTIONS, **SERVICE_OPTIONS}.items())


@quick
@given(st.sampled_from(every_option),
       st.one_of(st.integers(-(10**400), 10**400), st.floats(), st.booleans(), st.text(max_size=8), st.none()),
       st.booleans())
def test_an_option_value_is_accepted_or_refused_in_a_sentence(option: tuple, value: object, loading: bool) -> None:
    """The options table checks what the CLI, a manifest's JSON and the service settings hand it: integers of any
    length among them."""
    name, constraint = option
    try:
        constraint.check(name, value, loading=loading)
    except ConfigError as exc:
        assert name in str(exc)


def test_an_integer_past_a_floats_range_is_refused_in_a_sentence() -> None:
    """float() of such an integer raised OverflowError: `anomaly fit --k 1000...0` (four hundred zeros) was a
    traceback, and so was a manifest's config holding one."""
    for name in ("k", "image_size", "threshold_sigma", "coreset_ratio"):
        with pytest.raises(ConfigError, match=name):
            MODEL_OPTIONS[name].check(name, 10**400)


# ---------------------------------------------------------------------------------------------- shards
@quick
@given(st.one_of(st.text(max_size=12), st.from_regex(r"\A\s*(\d+|auto)\s*/\s*(\d+)\s*\Z")),
       st.one_of(st.none(), st.text(max_size=4), st.from_regex(r"\A\s*\d+\s*\Z")))
def test_a_shard_is_one_of_its_count_or_refused_in_a_sentence(text: str, index: str | None) -> None:
    try:
        shard = Shard.parse(text, {} if index is None else {INDEX_ENV: index})
    except ConfigError:
        return
    assert 0 <= shard.index < shard.count


def test_a_completion_index_is_read_as_its_digits() -> None:
    """str.isdigit took a superscript two and str.strip a unit separator around the digits, where int() takes
    neither: a Kubernetes index so spelt was a ValueError's traceback. The digits are read, as the text's K is."""
    with pytest.raises(ConfigError, match=INDEX_ENV):
        Shard.parse("auto/4", {INDEX_ENV: "\u00b2"})
    assert Shard.parse("auto/4", {INDEX_ENV: "3\x1f"}) == Shard(3, 4)


# ---------------------------------------------------------------------------------------------- instants
@quick
@given(st.text(alphabet="0123456789-:T+Z.,W tz\u0661\u00b2", max_size=32))
def test_an_instant_is_utc_or_refused_in_a_sentence(text: str) -> None:
    try:
        t = parse_instant(text)
    except NotAnInstant:
        return
    assert t.utcoffset() is not None and t.utcoffset().total_seconds() == 0
