"""The whole-image branch and the layout strength: the branch is fused where the part has a layout (a part that lies
the same way every time) and left out on a surface or a part that lies any way round, decided from good images
alone; a fused branch flags a component that moved."""

from __future__ import annotations

import re

import numpy as np
import pytest

from anomaly_service import AnomalyModel
from anomaly_service.calibration import Calibration
from anomaly_service.decision import KNN, Decision, ScoreResult, decision_word
from anomaly_service.feedback import rescore_calibration_set
from anomaly_service.layout import CELLS, MAX_IMAGES, layout_strength, sample_ids
from anomaly_service.timing import StageTimer
from anomaly_service.orientation import Turn
from conftest import SIDE, add_defect, board



COMMON = dict(backbone="efficientnet_lite0", image_size=SIDE, coreset_ratio=0.25, progress=False, device="cpu",
              autoencoder="global", ae_epochs=40, calibration_fraction=0.25)


@pytest.fixture(scope="module")
def boards() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [board(rng) for _ in range(40)]


@pytest.fixture(scope="module")
def fused(boards) -> AnomalyModel:
    return AnomalyModel(**COMMON).fit(boards)


def test_layout_strength_is_the_share_of_variance_position_explains():
    rng = np.random.default_rng(0)
    place = rng.integers(0, 256, (64, 64, 3))  # what each place looks like, the same on every image
    fixed = [np.clip(place + rng.normal(0, 8, place.shape), 0, 255).astype(np.uint8) for _ in range(20)]
    anywhere = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8) for _ in range(20)]
    assert layout_strength(fixed) > 0.9 and layout_strength(anywhere) < 0.1
    assert layout_strength(anywhere[:5]) < 0.1  # corrected for the chance share a few images give noise
    assert layout_strength(fixed[:3]) is None  # too few images to tell
    assert layout_strength([np.full((32, 32, 3), 90, np.uint8)] * 6) == 0.0  # flat frames: nothing varies
    # the same part photographed turned any way has a weak layout; a surface has none, at any size
    assert layout_strength([board(rng) for _ in range(12)]) > 0.9
    assert layout_strength([Turn(float(rng.uniform(0, 360))).image(board(rng)) for _ in range(12)]) < 0.5
    for side in (96, 288):
        assert layout_strength([surface(rng, side) for _ in range(12)]) < 0.1


def _omega_squared(cells: np.ndarray) -> float:
    """Omega squared of the cell position, written out from the analysis of variance: ``cells`` ``(images, cells,
    channels)``, each channel standardized over images and cells, the position's sum of squares against the
    images' within each cell, pooled over the channels."""
    n, c, k = cells.shape
    z = (cells - cells.mean((0, 1))) / cells.std((0, 1))
    ss_between = sum(n * ((z[:, j, ch].mean() - z[:, :, ch].mean()) ** 2) for j in range(c) for ch in range(k))
    ss_total = float(((z - z.mean((0, 1))) ** 2).sum())
    ms_within = (ss_total - ss_between) / (k * c * (n - 1))
    return max(0.0, (ss_between - k * (c - 1) * ms_within) / (ss_total + ms_within))


def test_layout_strength_is_omega_squared_over_the_cells_written_out():
    """The measure against the analysis of variance done by hand, on frames of several sizes whose cells are block
    means (an exact BOX shrink), at a strength between the ends: the ends alone (above 0.9, below 0.1) left the
    correction's degrees of freedom free."""
    rng = np.random.default_rng(11)
    for n, side in ((5, 8), (9, 16), (14, 24)):
        place = rng.normal(0, 1, (CELLS, CELLS, 3))
        cells = np.clip(128 + 30 * place + rng.normal(0, 40, (n, CELLS, CELLS, 3)), 0, 255).round()
        frames = [np.kron(c, np.ones((side // CELLS, side // CELLS, 1))).astype(np.uint8) for c in cells]
        expected = _omega_squared(cells.reshape(n, CELLS * CELLS, 3))
        assert 0.05 < expected < 0.95
        assert layout_strength(frames) == pytest.approx(expected, abs=1e-6)
    # under a mask, the inspected cells alone: two of them are still a layout to measure, one is none
    from anomaly_service.inspection_mask import InspectionMask

    two = np.zeros((side, side), bool)
    two[:side // CELLS, :2 * side // CELLS] = True  # the first two cells of the top row
    flat = cells.reshape(n, CELLS * CELLS, 3)
    assert layout_strength(frames, InspectionMask(two, "png")) == pytest.approx(_omega_squared(flat[:, :2]), abs=1e-6)
    two[:, side // CELLS:] = False
    assert layout_strength(frames, InspectionMask(two, "png")) == 0.0


def test_the_layout_is_read_on_evenly_spaced_images_first_and_last_included():
    assert sample_ids(0) == [] and sample_ids(1) == [0] and sample_ids(7) == list(range(7))
    ids = sample_ids(1000)
    assert len(ids) == MAX_IMAGES and ids[0] == 0 and ids[-1] == 999
    assert max(np.diff(ids)) - min(np.diff(ids)) <= 1  # evenly spaced


def test_a_cell_is_read_on_the_pixels_the_mask_inspects():
    """A cell the mask's edge crosses is the mean of its inspected pixels; the mask test's edges lay on cell
    borders, where a sum weighted by the share read the same."""
    from anomaly_service.inspection_mask import InspectionMask
    from anomaly_service.layout import _cells

    image = np.full((40, 40, 3), 200, np.uint8)  # cells of 5x5 pixels
    seen = np.zeros((40, 40), bool)
    seen[:, :7] = True  # the first column of cells, and two of the second's five pixel columns
    image[:, :7] = 50
    cells = _cells(image, InspectionMask(seen, "png")).reshape(CELLS, CELLS, 3)
    assert np.allclose(cells[:, :2], 50) and np.isnan(cells[:, 2:]).all()


def test_a_part_with_a_layout_gets_the_branch_fused(fused):
    verdict = fused.manifest_.training.second_opinion
    assert verdict["fused"] and verdict["layout_strength"] >= verdict["needs"]
    assert fused.autoencoder_ is not None and fused.manifest_.autoencoder is not None


def test_a_fused_fit_keeps_every_image_in_the_bank_and_calibrates_the_branch_on_what_it_did_not_learn(fused):
    training = fused.manifest_.training
    # the kNN's threshold is leave-one-out over all 40 images; the branch's from the images it kept out of training
    assert training.calibration == "leave-one-out" and training.n_images == 40 and training.n_calibration_images == 0
    ae_cal = fused.decision.scorer_calibrations["autoencoder"]
    assert ae_cal.n_images == len(fused.autoencoder_.val_ids_) == fused.manifest_.autoencoder.model_extra[
        "training"]["n_val"] > 0
    # on a good part the branch adds nothing, so the decision's threshold is the kNN's own
    assert fused.decision.fusion == "excess" and fused.decision.calibration is fused.decision.scorer_calibrations[KNN]
    assert fused.manifest_.fusion.rule == "excess"


def test_the_left_out_pass_runs_on_one_thread_while_the_branch_trains(boards, fused, monkeypatch):
    """Where the branch outlasts the greedy, the leave-one-out pass starts beside it on one thread (a third thread on
    two cores stalls the pass's products), takes the fit's threads back after, and scores what the full pass does."""
    import torch

    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.branch_beside import BranchBeside
    from anomaly_service.parallelism import intra_op_threads

    seen: list[tuple[bool, int]] = []
    grids = KnnScorer._left_out_grids

    def spy(self, *args, **kwargs):
        seen.append((state["running"], torch.get_num_threads()))
        return grids(self, *args, **kwargs)

    state = {"running": True}

    def running(self) -> bool:  # the branch "trains" through the pass's first two searches
        state["running"] = len(seen) < 2
        return state["running"]

    monkeypatch.setattr(KnnScorer, "_left_out_grids", spy)
    monkeypatch.setattr(BranchBeside, "running", running)
    with intra_op_threads(3):  # not the process's own count: the pass must give back the caller's
        model = AnomalyModel(**COMMON).fit(boards)
        assert torch.get_num_threads() == 3
    assert len(seen) > 2 and seen[:2] == [(True, 1), (True, 1)] and set(seen[2:]) == {(False, 3)}
    assert model.decision.calibration.threshold == pytest.approx(fused.decision.calibration.threshold, rel=1e-5)
    for name, cal in fused.decision.scorer_calibrations.items():
        assert model.decision.scorer_calibrations[name].threshold == pytest.approx(cal.threshold, rel=1e-5)


def test_a_fit_that_fails_beside_the_branch_stops_it(boards, monkeypatch):
    """contamination=fail (or any error) after the branch started: the fit stops the branch's training and waits
    for its thread, so no thread keeps training on the fit's closed patch store (the interpreter would abort)."""
    import threading
    import time

    from anomaly_service import branch_beside
    from anomaly_service.errors import ContaminationError
    from anomaly_service.fitting import Fit

    failed = threading.Event()
    epochs: list[int] = []
    train = branch_beside.train_timed

    def slow_train(scorer, samples, progress, stop=None):  # the branch still trains when the guard fails
        failed.wait(30)
        time.sleep(0.2)
        stats = train(scorer, samples, progress, stop)
        epochs.append(stats["epochs"])
        return stats

    def guard(self, suspects):
        failed.set()
        raise ContaminationError("a planted defect", suspects)

    monkeypatch.setattr(branch_beside, "train_timed", slow_train)
    monkeypatch.setattr(Fit, "_guard", guard)
    with pytest.raises(ContaminationError):
        AnomalyModel(**COMMON).fit(boards)
    assert not [t for t in threading.enumerate() if t.name == "whole-image-branch"]
    assert epochs == [1]  # stopped after the epoch it was in, not trained to the end


def test_info_says_how_the_branch_is_fused_and_by_which_threshold(fused, tmp_path):
    from click.testing import CliRunner

    from anomaly_service.cli import app

    out = CliRunner().invoke(app, ["info", str(fused.save(tmp_path / "m"))]).output
    own = fused.decision.scorer_calibrations["autoencoder"]
    assert "whole-image branch fused" in out and "fused by excess" in out and "kNN weight" not in out
    assert f"beyond its own threshold {own.threshold:.4g}, set by {own.n_images} images it did not learn" in out


def test_info_of_an_updated_model_says_its_branch_threshold_is_the_fits(fused, tmp_path):
    """An update trains the branch further on grids it replays, some of them the images whose scores set its
    threshold, and keeps that threshold: `anomaly info` still said it was set by images the branch did not learn,
    as it did of a held-out fit that held none out (review finding, docs/decisions.md "Adversarial review of the
    second opinion (session 63)")."""
    import json

    from click.testing import CliRunner

    from anomaly_service.cli import app
    from conftest import write_manifest

    where = fused.save(tmp_path / "m")
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["lineage"] = {"made_by": "update", "parent": None, "images_added": 2, "patches_added": 0,
                           "updates": 1, "forced": False, "seconds": 0.1}
    write_manifest(where, manifest)
    out = CliRunner().invoke(app, ["info", str(where)]).output
    own = fused.decision.scorer_calibrations["autoencoder"]
    assert f"set at the fit by {own.n_images} images it had not learnt then" in out, out
    assert "images it did not learn" not in out
    # a held-out fit's: an update by an earlier release set it again from the held-out grids, and the manifest
    # does not say which release updated it, so "at the fit" alone would claim what is not known
    manifest["training"].update(calibration="holdout", n_calibration_images=own.n_images)
    write_manifest(where, manifest)
    out = CliRunner().invoke(app, ["info", str(where)]).output
    assert (f"set by {own.n_images} images it had not learnt then, at the fit or by an earlier release's update"
            in out), out
    # a held-out fit that held none out (--calibration-fraction 0) read it from images the branch learnt
    manifest["training"].update(calibration="holdout", n_calibration_images=0)
    write_manifest(where, manifest)
    out = CliRunner().invoke(app, ["info", str(where)]).output
    assert f"set by {own.n_images} of its training images" in out and "not learn" not in out, out


def test_the_fused_branch_flags_a_component_that_moved(fused):
    rng = np.random.default_rng(77)
    goods = [fused.score(board(rng)) for _ in range(5)]
    result = fused.score(board(rng, lug_at="left"))
    assert np.median([g.normalized_score for g in goods]) < 1.0
    assert result.is_anomaly and result.scorers["autoencoder"]["is_anomaly"]  # the branch's own opinion flags it
    assert result.scorers["autoencoder"]["reads"] == "layout" and result.scorers["knn"]["reads"] == "patches"
    assert result.normalized_score > max(g.normalized_score for g in goods)
    # the fused map is hottest on the plate, where the layout differs (the lug's old or new end)
    peak = np.unravel_index(np.argmax(result.decision_map), result.decision_map.shape)
    assert 20 <= peak[0] < 76 and (peak[1] < 40 or peak[1] >= 56)


def surface(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """A surface without a layout: a machined grain of random phase, evenly lit, running out of the frame."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    grain = 0.5 + 0.2 * np.sin(2 * np.pi * (xx + rng.uniform(0, 12)) / 12.0) * \
        np.cos(2 * np.pi * (yy + rng.uniform(0, 16)) / 16.0)
    base = np.clip(grain + rng.uniform(-0.05, 0.05) + rng.normal(0, 0.03, (side, side)), 0, 1)
    return (np.stack([base * 0.9, base * 0.8, base * 0.7], axis=-1) * 255).astype(np.uint8)


def test_a_surface_keeps_the_knn_alone_and_says_why(tmp_path):
    rng = np.random.default_rng(9)
    tiles = [surface(rng) for _ in range(32)]
    model = AnomalyModel(**COMMON).fit(tiles)
    verdict = model.manifest_.training.second_opinion
    assert not verdict["fused"] and verdict["layout_strength"] < verdict["needs"]
    assert model.autoencoder_ is None and model.manifest_.autoencoder is None
    # a plain kNN fit: every image in the bank, the leave-one-out threshold and the contamination guard
    assert model.manifest_.training.calibration == "leave-one-out" and model.manifest_.training.n_images == 32
    loaded = AnomalyModel.load(model.save(tmp_path / "m"), device="cpu")
    assert loaded.autoencoder_ is None and loaded.manifest_.training.second_opinion == verdict
    forced = AnomalyModel(**{**COMMON, "ae_keep": "always"}).fit(tiles)
    assert forced.autoencoder_ is not None and forced.manifest_.training.second_opinion["rule"] == "always"
    # the same model object re-fitted on a surface drops the branch it had
    refit = AnomalyModel(**COMMON).fit([board(rng) for _ in range(12)])
    assert refit.autoencoder_ is not None
    refit.fit(tiles)
    assert refit.autoencoder_ is None and refit.manifest_.autoencoder is None


def test_gated_fusion_keeps_the_knn_decision_on_parts_it_flags_and_always_shows_a_region():
    decision = Decision(fusion="gated")
    unit = Calibration(threshold=1.0, floor=0.0, method="test", n_images=10)
    decision.scorer_calibrations = {KNN: unit, "autoencoder": unit}
    decision.calibration = unit
    calm, hot_cells = np.full((32, 32), 0.6, np.float32), np.zeros((32, 32), np.float32)
    hot_cells[8:16, 20:28] = 1.5  # the branch alone sees a moved component there
    # the kNN calm: flagged for the layout, and the region is where the branch saw it
    result = decision.result({KNN: (0.6, calm), "autoencoder": (1.5, hot_cells)}, StageTimer(), (32, 32))
    assert result.is_anomaly and (result.normalized_map() > 1.0).any()
    assert (result.normalized_map()[8:16, 20:28] > 1.0).all() and (result.normalized_map()[:8] <= 1.0).all()
    # the kNN flags a part itself: its score and its map, untouched by the branch's coarse cells
    local = calm.copy()
    local[2, 2] = 1.8
    result = decision.result({KNN: (1.8, local), "autoencoder": (1.5, hot_cells)}, StageTimer(), (32, 32))
    assert result.is_anomaly and result.normalized_score == pytest.approx(1.8)
    np.testing.assert_allclose(result.normalized_map(), local)
    # the score never falls below the kNN's own, whatever the branch says
    result = decision.result({KNN: (0.9, local), "autoencoder": (0.2, hot_cells * 0.1)}, StageTimer(), (32, 32))
    assert result.normalized_score >= 0.9
    # a good part: below both thresholds, the kNN's opinion alone
    result = decision.result({KNN: (0.6, calm), "autoencoder": (0.4, hot_cells * 0.2)}, StageTimer(), (32, 32))
    assert not result.is_anomaly and result.normalized_score == pytest.approx(0.6)


def test_excess_fusion_adds_the_branch_beyond_its_threshold_on_the_knn_scale():
    decision = Decision(fusion="excess")
    knn = Calibration(threshold=3.0, floor=1.0, method="test", n_images=10)  # kNN units: 2.0 from floor to threshold
    branch = Calibration(threshold=0.5, floor=0.1, method="test", n_images=10)
    decision.scorer_calibrations, decision.calibration = {KNN: knn, "autoencoder": branch}, knn
    calm, cells = np.full((32, 32), 2.0, np.float32), np.full((32, 32), 0.3, np.float32)  # both under threshold
    good = decision.result({KNN: (2.0, calm), "autoencoder": (0.3, cells)}, StageTimer(), (32, 32))
    assert not good.is_anomaly and good.normalized_score == pytest.approx(0.5) and good.decision_map is not None
    np.testing.assert_allclose(good.decision_map, calm)  # nothing beyond the branch's threshold: the kNN's map
    moved = cells.copy()
    moved[8:16, 20:28] = 0.9  # the branch alone: one threshold-span beyond its own threshold there
    result = decision.result({KNN: (2.0, calm), "autoencoder": (0.9, moved)}, StageTimer(), (32, 32))
    # the excess, in kNN units (one span = 2.0), lifts the kNN's map where it lies: 2.0 + 2.0 = 4.0
    assert result.is_anomaly and result.normalized_score == pytest.approx(1.5)
    assert result.decision_map[10, 22] == pytest.approx(4.0) and result.decision_map[0, 0] == pytest.approx(2.0)
    # a part the kNN flags itself keeps the kNN's score and map; the reported kNN opinion is never changed
    local = calm.copy()
    local[2, 2] = 5.0
    result = decision.result({KNN: (5.0, local), "autoencoder": (0.9, moved)}, StageTimer(), (32, 32))
    assert result.normalized_score == pytest.approx(2.0) and result.score == 5.0
    np.testing.assert_allclose(result.decision_map, local)


def _fused_whole(decision: Decision, raw: dict) -> tuple[float, np.ndarray]:
    """The fusion written over whole maps, as the rules say it: what the blocked fusion must give to the bit."""
    k, a = decision.scorer_calibrations[KNN], decision.scorer_calibrations["autoencoder"]
    (ks, km), (as_, am) = raw[KNN], raw["autoencoder"]
    if decision.fusion == "mean":
        w = decision.fusion_weight
        return (float(w * k.normalize(ks) + (1.0 - w) * a.normalize(as_)),
                np.asarray(w * k.normalize(km) + (1.0 - w) * a.normalize(am), dtype=np.float32))
    excess = np.maximum(np.asarray(a.normalize(am), dtype=np.float32) - 1.0, 0.0)
    if decision.fusion == "excess":
        own, score, flagged = np.asarray(km, dtype=np.float32), float(ks), ks > k.threshold
        lifted, read = own + excess * (k.threshold - k.floor), np.isfinite(own) & (excess > 0)
    else:
        own = np.asarray(k.normalize(km), dtype=np.float32)
        score = float(k.normalize(ks))
        flagged = score >= 1.0
        lifted, read = own + excess, np.isfinite(own) & np.isfinite(excess)
    hot = lifted[read]
    return (max(score, float(hot.max())) if hot.size else score), (own if flagged else lifted)


@pytest.mark.parametrize("fusion", ["excess", "gated", "mean"])
@pytest.mark.parametrize("shape", [(600, 700), (3, 50_000), (50_000, 3), (70_001,), (0, 5)])
def test_maps_fused_a_block_of_rows_at_a_time_are_the_whole_maps_fusion_to_the_bit(fusion, shape):
    """A line camera's photo is fused, and its fused map normalized, a block of rows at a time (the temporaries
    stay in the cache): the same score, map and dtype as the rule over whole maps, with NaN (outside an
    inspection mask) and infinities, a flagged part and a good one, calibrations in Python floats or NumPy's
    (which widen the map to float64), and a 1-D calibration sample's maps."""
    rng = np.random.default_rng(len(shape) * 7 + shape[0])
    for flagged in (False, True):
        for wide in (float, np.float64):
            decision = Decision(fusion=fusion)
            knn_cal = Calibration(threshold=wide(3.0), floor=wide(1.0), method="test", n_images=10)
            branch = Calibration(threshold=wide(0.5), floor=wide(0.1), method="test", n_images=10)
            decision.scorer_calibrations, decision.calibration = {KNN: knn_cal, "autoencoder": branch}, knn_cal
            km = (rng.random(shape) * 4).astype(np.float32)
            am = (rng.random(shape) * 0.8).astype(np.float32)
            if km.size:
                km.flat[rng.integers(0, km.size, 40)] = np.nan
                am.flat[rng.integers(0, am.size, 40)] = np.nan
                am.flat[rng.integers(0, am.size, 3)] = np.inf
            raw = {KNN: (5.0 if flagged else 2.0, km), "autoencoder": (0.9, am)}
            got, want = decision._fuse(raw), _fused_whole(decision, raw)
            assert got[0] == want[0]
            assert got[1].dtype == want[1].dtype and got[1].shape == want[1].shape
            assert np.array_equal(got[1], want[1], equal_nan=True)
            shown = ScoreResult(score=0.0, normalized_score=0.0, is_anomaly=False, threshold=3.0, anomaly_map=km,
                                image_width=1, image_height=1, calibration=knn_cal, decision_map=got[1])
            normalized = np.asarray(knn_cal.normalize(want[1]), dtype=np.float32)
            assert np.array_equal(shown.normalized_map(), normalized, equal_nan=True)



@pytest.mark.parametrize("shape", [(4000, 5000, 3), (3, 70_000), (70_001,), (1000, 7), (1, 1), (0, 5)])
def test_row_blocks_cover_the_rows_in_order_each_as_large_as_the_cache_block_allows(shape):
    """The blocks' results are the same at any size (the tests above), so only this says they stay small enough to
    stay in a core's cache and large enough not to cost a Python loop per row: every row once, in order, each block
    holding at most BLOCK_PIXELS elements (one row where a row alone is larger) and as many rows as fit; an array of
    no rows one empty block."""
    from anomaly_service.row_blocks import BLOCK_PIXELS, row_blocks

    blocks = row_blocks(shape)
    if shape[0] == 0:
        assert blocks == [slice(0, 0)]
        return
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, BLOCK_PIXELS // row)
    assert [b.start for b in blocks] == list(range(0, shape[0], rows))
    assert all(b.stop - b.start == rows and b.step is None for b in blocks)
    assert blocks[-1].stop >= shape[0] > blocks[-1].start
    assert rows * row <= max(BLOCK_PIXELS, row) and (rows + 1) * row > BLOCK_PIXELS



@pytest.mark.parametrize("fusion", ["excess", "gated", "mean"])
def test_opinions_whose_maps_differ_in_shape_are_refused_not_broadcast(fusion):
    """The blocks of rows are cut from the kNN's map and applied to the branch's: a branch map of one row (or of
    another size) was broadcast over the whole map by the whole-map expression, and would be read a block at a
    time past its end. Two opinions' maps of different shapes are a fault of the caller, said with both shapes."""
    decision = _two_opinions(fusion)
    for other in [(1, 40), (30, 1), (31, 40)]:
        raw = {KNN: (2.0, np.ones((30, 40), np.float32)), "autoencoder": (0.2, np.zeros(other, np.float32))}
        with pytest.raises(ValueError, match=r"differ in shape: \(30, 40\) and " + re.escape(str(other))):
            decision._fuse(raw)



@pytest.mark.parametrize("fusion", ["excess", "gated"])
def test_a_fused_score_is_the_whole_maps_rule_where_the_branch_map_is_finite(fusion):
    """The test above puts infinities in the branch's map (as a mask's edge can), which make every fused score
    infinite: the score it compares is then the same whatever pixels are read. Here the maps are finite (NaN
    outside a mask only): the score is the rule's over whole maps for a kNN score under its threshold, between one
    and two thresholds (gated reads its own map from there) and well over it; and a part the kNN flags under the
    excess rule shows the kNN's own map as it came, not a copy of a line camera's map."""
    rng = np.random.default_rng(3)
    decision = _two_opinions(fusion)
    km = (rng.random((300, 257)) * 4).astype(np.float32)
    am = (rng.random((300, 257)) * 0.8).astype(np.float32)
    km[:, :9] = am[:, :9] = np.nan
    for knn_score in (2.0, 4.0, 5.5):  # on the kNN's scale (threshold 3, floor 1): 0.5, 1.5 and 2.25 thresholds
        raw = {KNN: (knn_score, km), "autoencoder": (0.9, am)}
        got, want = decision._fuse(raw), _fused_whole(decision, raw)
        assert np.isfinite(got[0]) and got[0] == want[0]
        assert got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1], equal_nan=True)
        if fusion == "excess" and knn_score > 3.0:
            assert got[1] is km


def _two_opinions(fusion: str) -> Decision:
    decision = Decision(fusion=fusion)
    knn = Calibration(threshold=3.0, floor=1.0, method="test", n_images=10)
    branch = Calibration(threshold=0.5, floor=0.1, method="test", n_images=10)
    decision.scorer_calibrations, decision.calibration = {KNN: knn, "autoencoder": branch}, knn
    return decision


@pytest.mark.parametrize("fusion, reads", [("excess", "layout"), ("gated", "layout"), ("mean", "patches")])
def test_a_fused_result_and_its_manifest_keep_each_opinion_against_its_own_threshold(fusion, reads):
    """A record and ``score --json`` keep each opinion (service.md, Records): its score, its own threshold and
    verdict, and what it reads; the manifest keeps the rule and the kNN's own calibration beside the decision's."""
    decision = _two_opinions(fusion)
    calm, cells = np.full((16, 16), 2.0, np.float32), np.full((16, 16), 0.9, np.float32)
    result = decision.result({KNN: (2.0, calm), "autoencoder": (0.9, cells)}, StageTimer(), (16, 16))
    assert result.scorers[KNN] == {"score": 2.0, "normalized_score": 0.5, "threshold": 3.0, "is_anomaly": False,
                                   "reads": "patches"}
    branch = result.scorers["autoencoder"]
    assert branch["is_anomaly"] and branch["threshold"] == 0.5 and branch["reads"] == reads
    assert branch["normalized_score"] == pytest.approx(2.0)
    assert result.to_dict()["scorers"] == result.scorers
    assert decision.sections()["fusion"] == {"rule": fusion, "weight": decision.fusion_weight,
                                             "knn_calibration": decision.scorer_calibrations[KNN].to_dict()}


def test_a_result_of_the_knn_alone_names_no_opinions():
    alone = Decision()
    alone.calibration = Calibration(threshold=3.0, floor=1.0, method="test", n_images=10)
    result = alone.result({KNN: (2.0, np.full((16, 16), 2.0, np.float32))}, StageTimer(), (16, 16))
    assert result.scorers == {} and "scorers" not in result.to_dict() and result.decision_map is None
    assert set(alone.sections()) == {"calibration"}
    assert "total" in result.timing_ms and decision_word(result.is_anomaly) == "normal"
    # flagged above the threshold (normalized_score > 1.0), not at it
    at = alone.result({KNN: (3.0, np.full((16, 16), 3.0, np.float32))}, StageTimer(), (16, 16))
    assert at.normalized_score == 1.0 and not at.is_anomaly
    above = alone.result({KNN: (3.01, np.full((16, 16), 3.01, np.float32))}, StageTimer(), (16, 16))
    assert above.is_anomaly and decision_word(above.is_anomaly) == "anomaly"
    wide = alone.result({KNN: (2.0, np.full((16, 24), 2.0, np.float32))}, StageTimer(), (16, 24))
    assert (wide.image_width, wide.image_height) == (24, 16)


def test_the_whole_image_branch_always_fuses_by_its_excess():
    from anomaly_service.decision import fusion_rule

    assert fusion_rule("global", "mean") == "excess" and fusion_rule("global", "max") == "excess"
    assert fusion_rule("features", "max") == "max" and fusion_rule(None, "mean") == "mean"


def test_the_branch_threshold_is_raised_to_its_learnt_bound_never_lowered():
    """fitting.bound_branch: the images the branch learnt score no higher than unseen ones, so their threshold is a
    floor for its own; a lower or equal bound leaves it, and its method, as it was."""
    from anomaly_service.decision import raise_to_learnt

    own = Calibration(threshold=2.0, floor=0.5, method="max(mean+3*std, max) of 6 unseen normals", n_images=6)
    for bound in (None, {"threshold": 1.5, "method": "m", "n_images": 40}, {"threshold": 2.0, "method": "m",
                                                                             "n_images": 40}):
        raise_to_learnt(own, bound)
        assert own.threshold == 2.0 and own.method == "max(mean+3*std, max) of 6 unseen normals"
    raise_to_learnt(own, {"threshold": 2.5, "method": "exponential tail fit", "n_images": 40})
    assert own.threshold == 2.5
    assert own.method == ("max(mean+3*std, max) of 6 unseen normals, raised to the exponential tail fit of 40 images"
                          " it learnt")


def _raws(n: int, seed: int, branch: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = rng.gamma(4.0, 0.5, (32, 32)).astype(np.float32)
        raw = {KNN: (float(m.max()), m)}
        if branch:
            cells = rng.gamma(4.0, 0.05, (32, 32)).astype(np.float32)
            raw["autoencoder"] = (float(cells.max()), cells)
        out.append(raw)
    return out


def test_an_updates_kept_scores_join_the_knn_calibration_and_the_drift_reference():
    """An update re-scores what maps it has and keeps the fit's other scores (``known``): the threshold is set over
    all of them, and the drift monitor's reference holds every image's distance."""
    raws, known = _raws(8, 0), [(30.0, 2.5), (31.0, 2.6)]
    decision = Decision()
    decision.calibrate(raws, known)
    cal = decision.calibration
    assert cal.n_images == 10 and cal.holdout_scores[-2:] == [30.0, 31.0] and cal.threshold >= 31.0
    assert len(cal.holdout_distances) == 10 and cal.holdout_distances[-2:] == [2.5, 2.6]
    # the branch's threshold, kept as it stands, and the decision on the kNN's scale (excess): the kNN's own
    kept = Calibration(threshold=0.7, floor=0.2, method="kept", n_images=5)
    fused = Decision(fusion="excess")
    fused.calibrate(_raws(8, 1, branch=True), known, kept={"autoencoder": kept})
    assert fused.scorer_calibrations["autoencoder"] is kept and fused.calibration is fused.scorer_calibrations[KNN]
    assert fused.calibration.n_images == 10
    with pytest.raises(Exception, match="scores without maps"):
        Decision(fusion="mean").calibrate(_raws(8, 1, branch=True), known)


def test_a_decision_fused_by_mean_is_calibrated_again_on_the_fused_scores():
    decision = Decision(fusion="mean")
    decision.calibrate(_raws(12, 2, branch=True))
    knn, branch = decision.scorer_calibrations[KNN], decision.scorer_calibrations["autoencoder"]
    assert decision.calibration is not knn and decision.calibration is not branch
    assert knn.threshold > 1.0 > branch.threshold  # each opinion on its own units
    assert decision.calibration.threshold == pytest.approx(1.0, abs=0.5)  # the fused one on the normalized scale


def test_an_update_keeps_the_branch_and_its_threshold_and_still_flags_a_moved_component(fused):
    rng = np.random.default_rng(31)
    updated = fused.update([board(rng) for _ in range(3)])
    # the branch is trained further on the added boards (a copy: the fitted model keeps its own)
    assert updated.decision.fusion == "excess" and updated.autoencoder_ is not fused.autoencoder_
    assert updated.still_flagged_ == []
    # the stored grids are images the branch learnt: its threshold is the one its unseen images gave
    assert updated.decision.scorer_calibrations["autoencoder"] is fused.decision.scorer_calibrations["autoencoder"]
    assert updated.decision.calibration is updated.decision.scorer_calibrations[KNN]
    assert updated.score(board(rng, lug_at="left")).is_anomaly
    assert not updated.score(board(rng)).scorers["autoencoder"]["is_anomaly"]


def test_an_update_teaches_the_branch_a_layout_operators_called_good(fused, monkeypatch, tmp_path):
    """Boards without their lug: the whole-image branch flags them. Reviewed as good and added, they pass; before the
    branch learnt from updates they stayed flagged (a plant trial: 4 of 4 moved bottles still flagged after the update
    that added them), and the update says so when it cannot teach the model."""
    import anomaly_service.feedback as feedback

    rng = np.random.default_rng(41)
    bare = [board(rng, lug_at="none") for _ in range(3)]
    assert all(r.is_anomaly and r.scorers["autoencoder"]["is_anomaly"] for r in fused.score_many(bare))
    updated = fused.update(bare)
    assert updated.still_flagged_ == [] and not any(r.is_anomaly for r in updated.score_many(bare))
    # the branch learnt the layout, not the three photos: another bare board is no longer a fault of the whole part
    assert not updated.score(board(rng, lug_at="none")).scorers["autoencoder"]["is_anomaly"]
    assert fused.score(bare[0]).is_anomaly  # the model it was made from is left as it was
    # the branch's threshold stays the one its unseen images set; what it was not taught it still flags
    assert updated.decision.scorer_calibrations["autoencoder"] is fused.decision.scorer_calibrations["autoencoder"]
    assert updated.score(board(rng, lug_at="left")).is_anomaly
    assert updated.score(add_defect(board(rng), 45, 40)[0]).is_anomaly
    assert np.median([r.normalized_score for r in updated.score_many([board(rng) for _ in range(5)])]) < 1.0
    # the trained branch is what the saved version serves, and a loaded version updates again
    updated.save(tmp_path / "updated")
    loaded = AnomalyModel.load(tmp_path / "updated")
    assert [r.normalized_score for r in loaded.score_many(bare)] == [r.normalized_score
                                                                     for r in updated.score_many(bare)]
    assert loaded.update([board(rng, lug_at="none")]).still_flagged_ == []

    # an update that leaves the branch as it was (as before) lists the images it did not teach the model
    monkeypatch.setattr(feedback, "fine_tuned_branch", lambda model, added, calibration_set: None)
    untaught = fused.update(bare)
    assert untaught.still_flagged_ == ["image[0]", "image[1]", "image[2]"]


def fused_as_gated(model: AnomalyModel) -> AnomalyModel:
    """``model`` (fitted with the branch and a held-out threshold) turned into what the release that introduced the
    branch wrote: the sum on normalized scales, calibrated again on the held-out images, rule "gated"."""
    model.decision.fusion = "gated"
    raws, _, _ = rescore_calibration_set(model)
    model.decision.calibrate(raws)
    manifest = model.manifest_.to_dict()
    manifest.update(model.decision.sections())
    manifest["autoencoder"]["calibration"] = model.decision.scorer_calibrations["autoencoder"].to_dict()
    model.manifest_ = type(model.manifest_).model_validate({k: v for k, v in manifest.items() if k != "files"})
    return model


def test_models_fused_by_the_earlier_gated_rule_load_and_score_as_fitted(boards, tmp_path):
    model = fused_as_gated(AnomalyModel(**{**COMMON, "calibration": "holdout", "ae_epochs": 10}).fit(boards[:24]))
    loaded = AnomalyModel.load(model.save(tmp_path / "gated"), device="cpu")
    assert loaded.decision.fusion == "gated" and loaded.manifest_.fusion.rule == "gated"
    moved = board(np.random.default_rng(3), lug_at="left")
    assert loaded.score(moved).normalized_score == pytest.approx(model.score(moved).normalized_score, rel=1e-3)


def test_by_default_the_branch_is_fused_where_the_part_has_a_layout_and_gives_way_where_it_cannot_combine(boards):
    light = dict(backbone="efficientnet_lite0", image_size=SIDE, coreset_ratio=0.25, progress=False, device="cpu",
                 ae_epochs=5)
    default = AnomalyModel(**light).fit(boards[:16])
    assert default.config.autoencoder == "auto" and default.autoencoder_ is not None
    assert default.manifest_.training.second_opinion["fused"] and default.decision.fusion == "excess"
    assert default.manifest_.training.calibration == "leave-one-out"
    # turned copies and tiles have no one layout: auto trains nothing there (asked for by name, both are refused)
    turned = AnomalyModel(**light, orientation="any").fit(boards[:8])
    assert turned.autoencoder_ is None and turned.manifest_.training.second_opinion["why_not"] == "orientation any"
    assert AnomalyModel(**light, autoencoder="none").fit(boards[:8]).autoencoder_ is None


def test_orientation_any_refuses_a_threshold_without_turned_copies():
    from anomaly_service import ConfigError

    for clash in ({"autoencoder": "global"}, {"calibration": "holdout"}):
        with pytest.raises(ConfigError, match="leave-one-out"):
            AnomalyModel(orientation="any", **clash)


def test_a_record_waiting_for_the_database_counts_both_maps_a_fused_part_holds(fused, tmp_path):
    """A record that keeps its pictures holds the scored result until the writer draws its heatmap; a fused part's
    result holds the fused map beside the kNN's, each the photo's size. Only the kNN's was counted, so the record
    buffer's byte bound (docs/service.md) held twice its bytes of maps while the database was down."""
    from anomaly_service.api.lifecycle import Service
    from anomaly_service.records.recorder import PartContext, pending_from
    from anomaly_service.settings import ServiceSettings
    from conftest import png_bytes

    fused.save(tmp_path / "models" / "board")
    service = Service(ServiceSettings(model_dir=tmp_path / "models", record=False, reload_interval=0))
    entry = service.registry.load("board")
    image = add_defect(board(np.random.default_rng(9)), 40, 40)[0]
    data = png_bytes(image)
    result = entry.model.score(image)
    assert result.decision_map is not None
    held = len(data) + result.anomaly_map.nbytes + result.decision_map.nbytes
    counted = pending_from(service.render(entry, image, result, "none"), data, PartContext(), keep=True).nbytes
    assert counted >= held, (counted, held)


def test_a_tiled_fit_without_the_branch_does_not_call_a_part_with_a_layout_a_surface(boards, tmp_path):
    """`--tile` with `--autoencoder none` printed "layout 1.00: no fixed layout (a surface...)": the measure and
    its reading contradicted each other. The part has a layout; tiles are why the kNN decides alone."""
    from click.testing import CliRunner

    from anomaly_service.cli import app

    light = dict(backbone="efficientnet_lite0", image_size=SIDE, coreset_ratio=0.25, progress=False, device="cpu")
    tiled = AnomalyModel(**light, autoencoder="none", tile=64).fit(boards[:8])
    out = CliRunner().invoke(app, ["info", str(tiled.save(tmp_path / "m"))]).output
    line = next(x for x in out.splitlines() if x.startswith("layout"))
    assert "no fixed layout" not in line and "--tile" in line, line


def clamped(rng: np.random.Generator) -> np.ndarray:
    """A surface held between two clamps that never move: fixed in the frame, and masked out of the inspection."""
    image = surface(rng)
    image[:, :20], image[:, 76:] = (230, 200, 60), 20
    return image


def test_the_layout_is_measured_on_the_inspected_pixels_alone(tmp_path):
    """With --mask the branch never sees the uninspected pixels (the network's input is blanked there), yet the
    layout strength read the whole frame: a surface between clamps it does not inspect measured 0.99 and the branch
    was fused on a surface; a board whose label changes outside the mask lost strength to the label."""
    from PIL import Image

    from anomaly_service.inspection_mask import InspectionMask

    rng = np.random.default_rng(3)
    between = np.zeros((SIDE, SIDE), bool)
    between[:, 24:72] = True
    clamps = [clamped(rng) for _ in range(12)]
    assert layout_strength(clamps) > 0.9 and layout_strength(clamps, InspectionMask(between, "png")) < 0.1
    labelled = [board(rng) for _ in range(12)]
    for image in labelled:  # a label of its own on each board, below the plate
        image[70:92, 4:92] = rng.integers(0, 256, (22, 88, 3))
    above = np.zeros((SIDE, SIDE), bool)
    above[:68] = True
    assert layout_strength(labelled, InspectionMask(above, "png")) > layout_strength(labelled)
    everywhere = InspectionMask(np.ones((SIDE, SIDE), bool), "png")  # inspecting every pixel: the plain measure
    assert layout_strength(labelled, everywhere) == pytest.approx(layout_strength(labelled), abs=0.01)
    # the fit: the surface between the clamps is a plain kNN fit, as a surface is
    Image.fromarray(between.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    light = dict(backbone="efficientnet_lite0", image_size=SIDE, coreset_ratio=0.25, progress=False, device="cpu",
                 ae_epochs=5)
    model = AnomalyModel(**light, mask=str(tmp_path / "mask.png")).fit(clamps)
    verdict = model.manifest_.training.second_opinion
    assert model.autoencoder_ is None and not verdict["fused"] and verdict["layout_strength"] < 0.1
    assert AnomalyModel(**light).fit(clamps).autoencoder_ is not None  # the same photos without the mask: fused


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_record_keeps_each_opinion_of_a_fused_decision(fused, db, request, tmp_path):
    """A fused decision is the kNN's opinion plus the whole-image branch's: the record kept the kNN's score and
    threshold beside the fused decision, so a part flagged for its layout read "score below threshold, decision
    anomaly" with nothing in it that said why. The record keeps each opinion as the answer gives it (the served
    API's, the CLI's and an archive re-score's), the API returns it, and the export carries it (CSV: JSON text)."""
    import csv
    import io
    import json
    import signal
    import time

    import httpx
    from click.testing import CliRunner

    from anomaly_service.cli import app as cli
    from conftest import launch_server, png_bytes

    fused.save(tmp_path / "models" / "board")
    data = tmp_path / "data"
    where = ["--data-dir", str(data)] + (["--database-url", request.getfixturevalue("postgres_url")]
                                         if db == "postgresql" else [])
    (tmp_path / "archive").mkdir()
    moved = tmp_path / "archive" / "moved.png"
    moved.write_bytes(png_bytes(board(np.random.default_rng(3), lug_at="left")))
    url, proc = launch_server(tmp_path / "models", tmp_path / "server.log", *where)
    try:
        answer = httpx.post(f"{url}/score", files={"file": ("moved.png", moved.read_bytes())},
                            params={"part_id": "MOVED-1"}, timeout=60).json()
        assert answer["is_anomaly"] and answer["scorers"]["autoencoder"]["is_anomaly"]
        assert answer["scorers"]["autoencoder"]["reads"] == "layout"
        deadline, one = time.time() + 20, None
        while time.time() < deadline:  # written a moment after the answer
            got = httpx.get(f"{url}/inspections/{answer['inspection_id']}", timeout=30)
            if got.status_code == 200:
                one = got.json()
                break
            time.sleep(0.2)
        assert one is not None and one["scorers"] == answer["scorers"]
        listed = httpx.get(f"{url}/inspections", params={"part_id": "MOVED-1"}, timeout=30).json()["items"]
        assert [i["scorers"] for i in listed] == [answer["scorers"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    r = CliRunner().invoke(cli, ["score", "--model", str(tmp_path / "models" / "board"), *where, "--json",
                                 str(moved)])
    assert r.exit_code == 0, r.output
    by_cli = json.loads(r.stdout.splitlines()[0])
    assert by_cli["scorers"]["autoencoder"]["is_anomaly"]
    r = CliRunner().invoke(cli, ["score", "--model", str(tmp_path / "models" / "board"), "--shard", "0/1",
                                 "--output", str(tmp_path / "out"), *where, str(tmp_path / "archive")])
    assert r.exit_code == 0, r.output
    rescored = [json.loads(x) for x in (tmp_path / "out" / "shard-0-of-1.jsonl").read_text().splitlines()]
    r = CliRunner().invoke(cli, ["records", "export", *where, "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = {x["source"]: x for x in csv.DictReader(io.StringIO(r.stdout))}
    assert json.loads(rows["api"]["scorers"]) == answer["scorers"]
    assert json.loads(rows["cli"]["scorers"]) == by_cli["scorers"] and rows["cli"]["id"] == by_cli["inspection_id"]
    assert json.loads(rows["rescore"]["scorers"]) == rescored[0]["scorers"]
    assert rows["rescore"]["id"] == rescored[0]["inspection_id"]
