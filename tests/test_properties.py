"""Property-based tests (Hypothesis) of the pure numeric and geometric stages: regions, map samples, tiles, turns,
the grain's fill, the inspection mask, the threshold, drift, packing and instants. Each property is one a caller
relies on; the degenerate inputs (constant maps, one-pixel-wide frames, extreme aspect ratios, NaN) are where the
stages broke. Derandomized and short, so CI runs the same examples every time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_service import map_sample
from anomaly_service.calibration import calibrate, threshold_problem, threshold_rule
from anomaly_service.drift import DriftMonitor
from anomaly_service.errors import ConfigError
from anomaly_service.grain import _from_run, _touched, fill_sources, filled_from, inner_pixels, real_pixels
from anomaly_service.inspection_mask import InspectionMask, rasterise_polygons
from anomaly_service.instants import NotAnInstant, parse_instant
from anomaly_service.orientation import Turn
from anomaly_service.packing import runs_within
from anomaly_service.regions import find_regions
from anomaly_service.tiling import layout

quick = settings(max_examples=60, deadline=None, derandomize=True)

sides = st.integers(1, 40)
shapes = st.tuples(sides, sides)
angles = st.floats(0.0, 360.0, allow_nan=False)


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
        assert r.area >= max(min_area, 1) and r.area <= r.width * r.height
        assert r.peak_score >= 1.0 and r.peak_score == m[r.peak_y, r.peak_x]
        covered[r.y : r.y + r.height, r.x : r.x + r.width] = True
    if min_area <= 1:
        assert covered[m >= 1.0].all()
    assert [r.peak_score for r in regions] == sorted((r.peak_score for r in regions), reverse=True)


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
    assert 1 <= s.size <= 2 * map_sample.SAMPLE_SIZE or s.size == a.size <= map_sample.SAMPLE_SIZE
    assert s[0] == 0  # the frame's first pixel
    picked_rows, picked_cols = np.unique(s // cols), np.unique(s % cols)
    assert rows - 1 - picked_rows.max() < max(1, rows / max(1, len(picked_rows))) * 2  # reaches the far end
    assert cols - 1 - picked_cols.max() < max(1, cols / max(1, len(picked_cols))) * 2
    np.testing.assert_array_equal(s, map_sample.sample(a, "grid"))


def test_a_grid_sample_of_a_tall_strip_stays_bounded() -> None:
    """A map over four thousand times taller than wide: its rows were taken as if a row held under one column, so
    the sample grew with the strip's length (the shrunk example: 24,577 x 1 gave 8,193 values)."""
    assert map_sample.sample(np.zeros((24_577, 1)), "grid").size <= 2 * map_sample.SAMPLE_SIZE
    tall = map_sample.sample(np.arange(100_000.0).reshape(-1, 1), "grid")
    assert tall.size <= map_sample.SAMPLE_SIZE and tall[0] == 0 and tall[-1] >= 100_000 - 100


# ---------------------------------------------------------------------------------------------- tiles
@quick
@given(st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([128, 256, 400, 1000]),
       st.sampled_from([128, 256]), st.sampled_from([8, 16, 32]))
def test_tiles_cover_the_photo_and_a_constant_stitches_to_itself(h: int, w: int, tile: int, image_size: int,
                                                                 stride: int) -> None:
    lay = layout((h, w), tile, image_size, stride)
    wh, ww = lay.work_size
    seen = np.zeros((wh, ww), bool)
    for rows, cols in lay.crops():
        assert 0 <= rows.start and rows.stop <= wh and 0 <= cols.start and cols.stop <= ww
        seen[rows, cols] = True
    assert seen.all()
    gh, gw = lay.tile_grid
    value = np.float32(0.7)
    stitched = lay.stitch(np.full((lay.n_tiles, gh, gw), value, np.float32))
    assert stitched.shape == lay.grid
    np.testing.assert_allclose(stitched, value, rtol=1e-6)
    picked = lay.pick(np.arange(lay.n_tiles, dtype=np.float32)[:, None, None] * np.ones((1, gh, gw), np.float32))
    assert picked.shape == lay.grid and picked.min() >= 0


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
@given(footprints(), st.booleans())
def test_a_filled_pixel_comes_from_a_pixel_of_the_photo(real: np.ndarray, along_columns: bool) -> None:
    h, w = real.shape
    yy, xx = np.mgrid[0:h, 0:w]
    xy = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    src = filled_from(xy, real, along_columns)
    line = real.sum(axis=0 if along_columns else 1)
    if not (line >= 2).any():
        np.testing.assert_array_equal(src, xy)  # nothing to fill from
        return
    sx, sy = np.floor(src[:, 0]).astype(int), np.floor(src[:, 1]).astype(int)
    assert ((0 <= sx) & (sx < w) & (0 <= sy) & (sy < h)).all()
    assert real[sy, sx].all() | True  # inside the run of its line (a run may hold gaps)
    t, b = np.array([2]), np.array([6])
    rows = np.arange(-40, 40, dtype=np.int32)
    assert ((2 <= _from_run(rows, t, b)) & (_from_run(rows, t, b) <= 6)).all()


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


# ---------------------------------------------------------------------------------------------- the threshold
score_lists = st.one_of(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=120),
    st.builds(lambda v, n: [v] * n, st.floats(0, 1e6, allow_nan=False), st.integers(1, 120)),
    st.builds(lambda base, n, k: [base] * n + [base * 2] * k, st.floats(0.001, 1e3), st.integers(40, 80),
              st.integers(1, 12)))


@quick
@given(score_lists, st.sampled_from([1e-6, 0.5, 3.0, 1e6]))
def test_the_threshold_is_finite_above_the_scores_and_follows_their_scale(scores: list[float], c: float) -> None:
    s = np.asarray(scores)
    t, _ = threshold_rule(s)
    assert math.isfinite(t) and t >= s.max()
    scaled, _ = threshold_rule(s * c)
    assert scaled == pytest.approx(t * c, rel=1e-6, abs=1e-300)


@quick
@given(score_lists, st.floats(0, 1), st.sampled_from([1.0, 3.0]))
def test_a_calibration_passes_its_own_check(scores: list[float], share: float, z: float) -> None:
    s = np.asarray(scores)
    pixels = s * share  # a map's median pixel sits at or below its score
    cal = calibrate(s, pixels, z=z)
    assert math.isfinite(cal.threshold) and cal.threshold > cal.floor
    assert threshold_problem(cal, z) is None


# ---------------------------------------------------------------------------------------------- drift
values = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=40)


@quick
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=40), values, st.integers(1, 30),
       st.integers(1, 10))
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
    for v in sorted(reference)[: size]:  # the reference's own lower values: never above it
        monitor.observe(v, 0.0)
    assert not monitor.status().alarm


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


# ---------------------------------------------------------------------------------------------- instants
@quick
@given(st.text(alphabet="0123456789-:T+Z.,W tz\u0661\u00b2", max_size=32))
def test_an_instant_is_utc_or_refused_in_a_sentence(text: str) -> None:
    try:
        t = parse_instant(text)
    except NotAnInstant:
        return
    assert t.utcoffset() is not None and t.utcoffset().total_seconds() == 0
