"""A surface's grain (grain.py): the turn of a photo is read off its grain, the corners a turn uncovers are filled
along the grain, a model fitted with orientation="any" on a grained surface turns each photo back (its map, score and
regions on the photo's own pixels), and a surface with no grain to read, or a part, keeps the turned copies alone."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
from click.testing import CliRunner

from anomaly_service import AnomalyModel, ConfigError
from anomaly_service.cli import app
from anomaly_service.grain import EDGE, GrainAlignment, fill_along, grain_angle, one_channel, real_pixels
from anomaly_service.orientation import Turn
from conftest import add_defect, textured_part
from test_orientation import FAST, bracket, speckle


def stripes(side: int = 160, period: float = 9.0) -> np.ndarray:
    """Streaks running along y: intensity changes along x only."""
    xx = np.mgrid[0:side, 0:side][1].astype(np.float32)
    g = 128 + 80 * np.sin(2 * np.pi * xx / period)
    return np.repeat(g[..., None], 3, axis=2).astype(np.uint8)


def cut_turned(image: np.ndarray, turn: Turn) -> np.ndarray:
    """``image`` as a camera turned over the surface frames it: turned, cut to real pixels."""
    y, x, h, w = turn.inscribed_box(image.shape)
    return turn.image(image)[y : y + h, x : x + w]


def test_the_turn_of_a_photo_is_read_off_its_grain():
    rng = np.random.default_rng(0)
    upright = [textured_part(rng, 128, 128) for _ in range(8)]
    alignment, details = GrainAlignment.fit(upright, seed=0)
    assert alignment is not None and details["kept"] and details["read_error_p90"] < 2
    for angle in (10.0, 35.0, 70.0, 120.0):
        back = alignment.turn_for(cut_turned(textured_part(rng, 128, 128), Turn(angle)))
        assert back is not None
        assert abs((back.angle + angle + 90) % 180 - 90) < 2  # undoes the turn, modulo a half turn
    assert alignment.turn_for(upright[0]) is None  # an upright photo is scored as it is


def test_the_corners_a_turn_uncovers_are_filled_along_the_grain():
    """Streaks run on into the filled corners; the picture mirrored at its edges (a turn's canvas for parts on
    no background) would draw them at another angle there."""
    photo = cut_turned(stripes(), Turn(30.0))
    alignment = GrainAlignment(reference=grain_angle(stripes())[0], read_error_p90=0.0, resultant=1.0)
    back = alignment.turn_for(photo)
    assert back is not None
    real = back._turned(np.full(photo.shape[:2], 255, np.uint8), 0, 0, 0) > 127
    corners = ~real
    corners[:4], corners[-4:], corners[:, :4], corners[:, -4:] = False, False, False, False

    def across_the_streaks(img: np.ndarray) -> float:
        """How much the image changes along the streaks (y), against across them (x), in the corners."""
        g = img[..., 0].astype(np.float32)
        return float(np.abs(np.diff(g, axis=0))[corners[1:]].mean() / np.abs(np.diff(g, axis=1))[corners[:, 1:]].mean())

    assert across_the_streaks(alignment.canvas(photo, back)) < 0.25
    assert across_the_streaks(back.image(photo)) > 2 * across_the_streaks(alignment.canvas(photo, back))


def test_a_grain_along_rows_is_filled_along_rows_and_scored():
    """Streaks along x (a reference near 90 degrees) fill along rows; the canvas is C-ordered, as the network's
    input must be."""
    rows = np.ascontiguousarray(stripes().transpose(1, 0, 2))
    alignment = GrainAlignment(reference=grain_angle(rows)[0], read_error_p90=0.0, resultant=1.0)
    assert not alignment.along_columns
    photo = cut_turned(rows, Turn(25.0))
    back = alignment.turn_for(photo)
    assert back is not None
    canvas = alignment.canvas(photo, back)
    assert canvas.flags["C_CONTIGUOUS"]
    g = canvas[4:-4, 4:-4, 0].astype(np.float32)
    assert np.abs(np.diff(g, axis=1)).mean() < 0.25 * np.abs(np.diff(g, axis=0)).mean()  # streaks run along x


def test_fill_along_mirrors_each_line_at_the_ends_of_its_run():
    img = np.arange(6, dtype=np.uint8)[:, None, None].repeat(2, axis=1).repeat(3, axis=2)
    real = np.zeros((6, 2), bool)
    real[2:4] = True
    out = fill_along(img, real, along_columns=True)
    assert out[:, 0, 0].tolist() == [3, 2, 2, 3, 3, 2]


def test_a_grey_photo_is_turned_read_and_filled_as_one_channel_with_the_same_values():
    rng = np.random.default_rng(3)
    colour = stripes(120, 7.0).astype(np.int16) + rng.integers(-20, 20, (120, 120, 3))
    colour = np.clip(colour, 0, 255).astype(np.uint8)
    alignment = GrainAlignment(reference=grain_angle(stripes())[0], read_error_p90=0.0, resultant=1.0)
    back = Turn(31.0)
    canvas = alignment.canvas(colour, back)  # three channels of their own
    for c in range(3):
        grey = np.repeat(colour[..., c : c + 1], 3, axis=2)
        assert one_channel(grey).ndim == 2 and one_channel(colour) is colour
        for apart in (1, 2):  # two channels alike and the third apart: a colour photo still
            alike = grey.copy()
            alike[..., apart] //= 2
            assert one_channel(alike) is alike
        grey_canvas = alignment.canvas(grey, back)
        assert grey_canvas.shape == canvas.shape and grey_canvas.flags.c_contiguous
        np.testing.assert_array_equal(grey_canvas[..., 1], canvas[..., c])
        assert grain_angle(grey) == grain_angle(colour[..., c])


def test_the_real_pixel_masks_are_the_turned_footprint_and_its_eroded_part():
    from scipy import ndimage

    for turn, shape in [(Turn(23.0), (60, 90)), (Turn(-71.0, True), (41, 33)), (Turn(90.0), (20, 30)),
                        (Turn(45.0), (4, 60))]:
        real, inner = real_pixels(turn, shape)
        footprint = turn._turned(np.full(shape, 255, np.uint8), 0, 0, 0) > 127  # nearest
        np.testing.assert_array_equal(real, footprint)
        np.testing.assert_array_equal(inner, ndimage.binary_erosion(footprint, iterations=EDGE))


def test_no_grain_to_read_or_a_part_on_a_background_keeps_no_alignment():
    rng = np.random.default_rng(1)
    alignment, details = GrainAlignment.fit([speckle(rng) for _ in range(12)], seed=0)
    assert alignment is None and not details["kept"] and "degrees" in details["why"]
    alignment, details = GrainAlignment.fit([bracket(rng) for _ in range(6)], seed=0)
    assert alignment is None and details["why"] == "not a surface"


@pytest.fixture(scope="module")
def surface_model() -> AnomalyModel:
    rng = np.random.default_rng(5)
    return AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(
        [textured_part(rng, 96, 96) for _ in range(12)])


def test_a_turned_photo_of_a_grained_surface_is_scored_turned_back(surface_model, tmp_path):
    """A model fitted on a grained surface records its grain, passes a good photo turned under the camera, and
    flags a defect on one, with the map, its hottest place and the regions' evidence in the photo's frame."""
    turned = surface_model.manifest_.training.turned_copies
    assert turned["surface_copies"] == "aligned" and turned["alignment"]["kept"]
    assert surface_model.alignment_ is not None
    rng = np.random.default_rng(77)
    turn = Turn(40.0)
    good = cut_turned(textured_part(rng, 140, 140), turn)
    result = surface_model.score(good)
    assert not result.is_anomaly and "align" in result.timing_ms
    assert result.anomaly_map.shape == good.shape[:2]
    broken, mask = add_defect(good, good.shape[0] // 2, good.shape[1] // 3, radius=10)
    flagged = surface_model.score(broken)
    assert flagged.is_anomaly and flagged.anomaly_map.shape == broken.shape[:2]
    peak = np.unravel_index(np.nanargmax(flagged.anomaly_map), flagged.anomaly_map.shape)
    yy, xx = np.nonzero(mask)
    assert np.hypot(yy - peak[0], xx - peak[1]).min() < 10
    assert flagged.matches is not None and flagged.matches.distance.ndim == 2
    # the score is the map's hottest pixel on the photo: the fill never counts
    assert flagged.score == pytest.approx(float(np.nanmax(flagged.anomaly_map)), rel=1e-5)
    surface_model.save(tmp_path / "m")
    info = CliRunner().invoke(app, ["info", str(tmp_path / "m")]).output
    assert "each photo turned to the good images' grain" in info
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert loaded.alignment_ == surface_model.alignment_
    assert loaded.score(broken).score == pytest.approx(flagged.score, rel=1e-4)


def test_an_update_re_reads_the_turned_pose_as_the_fit_did_and_learns_a_turned_photo(surface_model):
    """The calibration set keeps which pixels of an aligned copy are its own, so an update re-scores each stored
    image as the fit scored it (the fill of a turned pose read again raised the threshold by itself); a turned good
    photo added is learnt as scoring sees it (turned back)."""
    from anomaly_service.calibration_set import CalibrationSet
    from anomaly_service.feedback import rescore_calibration_set

    stored = CalibrationSet.of(surface_model)
    assert stored.real_masks  # some stored pose is an aligned turned copy
    raws, _, _ = rescore_calibration_set(surface_model)
    ids, calibrated = stored.left_out_ids
    fitted = dict(zip(calibrated.tolist(), surface_model.manifest_.calibration.holdout_scores))
    assert [r["knn"][0] for r in raws] == pytest.approx([fitted[int(i)] for i in ids], rel=2e-3)  # float16 grids
    rng = np.random.default_rng(123)
    turned = cut_turned(textured_part(rng, 140, 140), Turn(35.0))
    before = surface_model.score(turned).score
    updated = surface_model.update([turned], force=True)
    assert updated.score(turned).score < 0.8 * before
    # judged as scoring sees it (the photo, turned by scoring itself), not as the canvas the bank learnt
    assert updated.still_flagged_ == [] and not updated.score(turned).is_anomaly


def test_an_update_names_a_turned_photo_and_its_places_as_it_came(surface_model):
    """A turned good photo is learnt from its canvas (turned back), but its catalog entry and the evidence of its
    bank rows are the photo's as it came: its size, its thumbnail and a box at its mark in its own pixels."""
    from PIL import Image

    from anomaly_service.evidence import TrainingEvidence
    from test_evidence import around, centre, ring

    photo = cut_turned(textured_part(np.random.default_rng(123), 140, 140), Turn(35.0))
    cy, cx = 30, 66
    photo = ring(photo, cy, cx, color=(230, 60, 160))
    assert surface_model.alignment_.turn_for(photo, surface_model.embedder.preprocessing.working_size) is not None
    updated = surface_model.update([photo], names=["added.png"], force=True)
    added = len(surface_model.catalog_)
    assert updated.catalog_.shapes[added] == photo.shape[:2]
    assert Image.open(io.BytesIO(updated.catalog_.thumbnails[added])).size == photo.shape[1::-1]
    rows = updated.knn.provenance_[updated.knn.provenance_[:, 0] == added]
    assert (rows[:, 1:] < updated.catalog_.grids[added]).all()
    nn = TrainingEvidence.of(updated).nearest_normal(updated.score(photo).matches, around(cy, cx), *photo.shape[:2])
    assert nn.image == added and (nn.image_height, nn.image_width) == photo.shape[:2]
    y, x = centre(nn.box)
    assert np.hypot(y - cy, x - cx) <= 12  # the mark, within about a cell: the photo's pixels, not the canvas's


def test_an_updates_turned_copies_of_a_turned_photo_are_of_the_photo_as_it_came(surface_model, monkeypatch):
    """The fit turns copies of its good photos as the camera took them; an update's copies of a turned good photo
    are of that photo too, on its own grid, not of the canvas the photo is learnt from, whose filled corners a copy
    would frame as surface (and whose shrunk copy a large photo's canvas is turned from)."""
    from anomaly_service.orientation import TurnedCopies

    copied = []
    add = TurnedCopies.add

    def spied(self, images, grids):
        copied.extend((im.shape, tuple(g)) for im, g in zip(images, grids))
        return add(self, images, grids)

    monkeypatch.setattr(TurnedCopies, "add", spied)
    photo = cut_turned(textured_part(np.random.default_rng(123), 140, 140), Turn(35.0))
    assert surface_model.alignment_.turn_for(photo, surface_model.embedder.preprocessing.working_size) is not None
    updated = surface_model.update([photo], force=True)
    assert copied == [(photo.shape, updated.catalog_.grids[len(surface_model.catalog_)])]


def test_a_photo_left_as_it_came_is_searched_against_the_images_own_rows(surface_model, tmp_path):
    """The turned copies stand for turned views: a photo the alignment leaves as it came is judged by the bank a
    ``fixed`` model keeps (no copy's row is its neighbour), a turned one by the whole bank. The bank says which rows
    are copies through a save, and an update marks the rows it adds (a turned photo learnt turned back is one)."""
    from anomaly_service.feedback import rescore_calibration_set

    copies = surface_model.knn.copies_
    assert copies is not None and copies.any() and not copies.all()
    assert not copies[: int((~copies).sum())].any()  # the images' own bank first, as fixed keeps it
    work = surface_model.embedder.preprocessing.working_size
    rng = np.random.default_rng(8)
    upright = next(img for img in (textured_part(rng, 96, 96) for _ in range(20))
                   if surface_model.alignment_.turn_for(img, work) is None)
    turned = cut_turned(textured_part(rng, 140, 140), Turn(40.0))
    assert surface_model.alignment_.turn_for(turned, work) is not None
    as_came, turned_back = surface_model.score_many([upright, turned])  # one batch holding both poses
    assert not copies[as_came.matches.nearest].any()
    assert copies[turned_back.matches.nearest].any()
    # the same photo against the whole bank (what the model did before it told the rows apart) scores no higher
    whole = copy.copy(surface_model.knn)
    whole.copies_, whole._own = None, None
    everything = copy.copy(surface_model)
    everything.knn = whole
    assert everything.score(upright).score <= as_came.score + 1e-6
    assert everything.score(turned).score == pytest.approx(turned_back.score, rel=1e-5)
    surface_model.save(tmp_path / "m")
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(loaded.knn.copies_, copies)
    assert loaded.score(upright).score == pytest.approx(as_came.score, rel=1e-4)
    updated = surface_model.update([turned, textured_part(rng, 96, 96)], force=True)
    grown = updated.knn.copies_
    assert len(grown) == updated.knn.bank_size and (grown[: len(copies)] == copies).all()
    assert grown[len(copies):].any()  # the turned photo's canvas and the new turned copies
    raws, _, _ = rescore_calibration_set(updated)
    assert all(np.isfinite(r["knn"][0]) for r in raws)


def test_an_update_covers_a_photo_left_as_it_came_with_the_rows_it_is_judged_by(surface_model):
    """An aligned model judges a photo it leaves as it came by the images' own rows, and the fit keeps every good
    patch within the coverage radius of them. An update must keep that for the upright photos it learns: checked
    against every row, a patch near a turned copy's row added nothing, and the photo stayed as far from the rows
    its score reads as before the update (on mt an added good strip still scored 57 against the fit's radius of
    42). The rows of turned views are still checked against the whole bank, as the fit adds its copies."""
    import torch

    from anomaly_service.coreset import random_projection

    knn = surface_model.knn
    radius = surface_model.manifest_.coreset.coverage_radius
    proj = knn.sampler.proj_dim

    def nearest(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each row of ``x``'s distance to ``rows`` in the greedy's projected space, where the radius is."""
        both = random_projection(torch.from_numpy(np.concatenate([x, rows])), proj, knn.seed).numpy()
        a, b = both[: len(x)], both[len(x):]
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)

    bank, copies = knn.bank(), knn.copies_
    # copy rows the images' own rows leave uncovered: what an upright photo of such a look is judged against
    far = bank[copies][nearest(bank[copies], bank[~copies]) > radius * 1.01][:24]
    assert len(far) > 0
    offered = torch.from_numpy(far)
    upright, added, _ = knn.extended(offered, radius, copies=np.zeros(len(far), bool))
    assert added > 0 and not upright.copies_[knn.bank_size:].any()
    assert nearest(far, upright.bank()[~upright.copies_]).max() <= radius * (1 + 1e-3)
    turned, added, _ = knn.extended(offered, radius, copies=np.ones(len(far), bool))
    assert added == 0  # a turned view's patch is judged by every row: the copies already cover it


def test_the_manifest_and_info_say_how_many_bank_rows_a_photo_left_as_it_came_is_judged_by(surface_model, tmp_path):
    """Which rows an aligned model searches for a photo left as it came is part of what it does: the manifest counts
    the copies' rows (an update too) and ``anomaly info`` says what the others are, so a model saved before the rows
    were told apart (every photo, every row) can be told from one saved since."""
    copies = surface_model.knn.copies_
    assert surface_model.manifest_.training.turned_copies["bank_patches"] == int(copies.sum())
    rng = np.random.default_rng(12)
    updated = surface_model.update([cut_turned(textured_part(rng, 140, 140), Turn(40.0)),
                                    textured_part(rng, 96, 96)], force=True)
    assert updated.knn.bank_size > surface_model.knn.bank_size
    assert updated.manifest_.training.turned_copies["bank_patches"] == int(updated.knn.copies_.sum())
    updated.save(tmp_path / "m")
    line = next(x for x in CliRunner().invoke(app, ["info", str(tmp_path / "m")]).output.splitlines()
                if x.startswith("orientation "))
    own = int((~updated.knn.copies_).sum())
    assert f"one left as it came judged by the {own} of the bank's {updated.knn.bank_size} patches" in line


def test_an_aligned_model_with_some_parts_on_a_plain_background_updates_as_it_was_fitted():
    """Most good images a surface, a few a part on a plain background: the alignment is kept, and the turned copy
    of a framed part has no own-pixel mask (its fill counts). Where such a copy set an image's score, the update
    must re-score it against every row, as the fit did, not against the images' own rows as an upright photo: the
    calibration set says which grids are turned copies."""
    from anomaly_service.calibration_set import CalibrationSet
    from anomaly_service.feedback import rescore_calibration_set

    rng = np.random.default_rng(5)

    def framed() -> np.ndarray:
        img = np.full((96, 96, 3), 200, np.uint8)
        img[16:80, 16:80] = textured_part(rng, 64, 64)
        return img

    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(
        [textured_part(rng, 96, 96) for _ in range(8)] + [framed() for _ in range(5)])
    assert model.alignment_ is not None
    stored = CalibrationSet.of(model)
    assert stored.turned - set(stored.real_masks)  # turned copies without a mask
    raws, _, order = rescore_calibration_set(model)  # on the fit's own bank: the fit's scores back
    fitted = dict(zip(stored.left_out_ids[1].tolist(),
                      model.decision.calibration.holdout_scores))
    assert [r["knn"][0] for r in raws] == pytest.approx([fitted[i] for i in order[:len(raws)]], rel=2e-3)
    updated = model.update([textured_part(rng, 96, 96)], force=True)
    assert np.isfinite(updated.decision.calibration.threshold)


def test_leave_one_out_of_fewer_own_rows_than_k_searches_the_whole_bank_as_scoring_does(surface_model):
    """Scoring searches every row when the own rows are fewer than the ``k`` a patch averages; the leave-one-out
    of the upright pose (fit, guard, an update's re-calibration) does the same, rather than refusing the fit."""
    knn = copy.copy(surface_model.knn)
    knn.k, knn._own = 3, None
    knn.copies_ = np.arange(knn.bank_size) >= 2  # two own rows
    assert knn.own_search() is knn._search
    emb = surface_model.embedder.embed([textured_part(np.random.default_rng(9), 96, 96)], keep=knn.keep)
    whole = knn.score_left_out(emb, [0], shortlist=knn.left_out_search(1))[0][0]
    assert knn.score_left_out(emb, [0], shortlist=knn.left_out_search(1, own=True), own=True)[0][0] == whole
    (raw,), (support,) = knn.score_left_out_supported(emb, [0], 1, own=True)
    assert raw[0] == whole and np.isfinite(support)


def test_a_bank_whose_copy_marks_do_not_fit_it_is_refused(surface_model):
    from anomaly_service.artifact import arrays_to_bytes, bytes_to_arrays
    from anomaly_service.errors import ModelFormatError
    from anomaly_service.knn_scorer import ARRAYS_FILE

    knn = surface_model.knn
    files = knn.files()
    arrays = bytes_to_arrays(files[ARRAYS_FILE], ARRAYS_FILE)
    for bad in (arrays["bank_copies"][:-1], arrays["bank_copies"].astype(np.uint8)):
        broken = {**files, ARRAYS_FILE: arrays_to_bytes({**arrays, "bank_copies": bad})}
        with pytest.raises(ModelFormatError, match="bank_copies"):
            copy.copy(knn).load_files(broken, int(knn.stats_["full_dim"]), knn.bank_size)
    older = {**files, ARRAYS_FILE: arrays_to_bytes({k: v for k, v in arrays.items() if k != "bank_copies"})}
    loaded = copy.copy(knn)
    loaded.load_files(older, int(knn.stats_["full_dim"]), knn.bank_size)  # saved before: every row for every photo
    assert loaded.copies_ is None


def test_only_the_map_max_image_score_is_aligned():
    rng = np.random.default_rng(5)
    model = AnomalyModel(orientation="any", image_score="max", **{**FAST, "image_size": 96}).fit(
        [textured_part(rng, 96, 96) for _ in range(8)])
    assert model.alignment_ is None
    assert "image_score max" in model.manifest_.training.turned_copies["alignment"]["why"]


def test_a_thin_strip_reads_its_turn_without_the_edge_bias():
    surface = textured_part(np.random.default_rng(2), 300, 300)
    reference = grain_angle(surface)[0]
    for angle in (30.0, 45.0):
        strip = cut_turned(surface, Turn(angle))[:8, :128]
        read = grain_angle(strip)[0]
        assert abs((reference - read - angle + 90) % 180 - 90) < 3


def larger(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` as a camera with ``factor`` times the pixels over the same field of view takes it."""
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.Resampling.BICUBIC))


def test_a_large_photo_is_turned_at_the_size_the_network_sees_it(monkeypatch):
    """A photo much larger than the network's working size is read and turned from a shrunk copy (its cost does
    not grow with the camera's resolution); the network still sees the canvas at the full-size canvas's working
    size, and the score, the map and the flagged place match turning the photo at its full size."""
    import anomaly_service.grain as grain

    rng = np.random.default_rng(9)
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(
        [larger(textured_part(rng, 96, 96), 4) for _ in range(10)])
    assert model.alignment_ is not None and model.alignment_.read_scale == grain.OVERSAMPLE
    assert model.alignment_.read_rounds == grain.READ_ROUNDS
    working_size = model.embedder.preprocessing.working_size
    good = larger(cut_turned(textured_part(rng, 150, 150), Turn(35.0)), 4)
    bad, mask = add_defect(good, good.shape[0] // 2, good.shape[1] // 3, radius=40)
    view = model.alignment_.view(good, working_size)
    assert view is not None and max(view.shape[:2]) < max(good.shape[:2]) / 2
    assert view.work == working_size(*view.turn.out_shape(good.shape))
    shrunk_path = [model.score(im) for im in (good, bad)]
    monkeypatch.setattr(grain, "OVERSAMPLE", 10**6)  # the canvas turned at the photo's full size
    full_path = [model.score(im) for im in (good, bad)]
    for ours, full in zip(shrunk_path, full_path):
        assert ours.anomaly_map.shape == good.shape[:2]
        assert ours.score == pytest.approx(full.score, rel=0.15)
    assert not shrunk_path[0].is_anomaly and shrunk_path[1].is_anomaly
    peak = np.unravel_index(np.nanargmax(shrunk_path[1].anomaly_map), good.shape[:2])
    yy, xx = np.nonzero(mask)
    assert np.hypot(yy - peak[0], xx - peak[1]).min() < 40


def test_the_grain_is_read_at_a_multiple_of_the_working_size_and_recorded():
    """A large photo's grain read off its shrunk copy is the one read at full size; the scale it is read at is
    recorded, and an alignment recorded before it (no read_scale) reads photos at their own size."""
    surface = larger(textured_part(np.random.default_rng(3), 200, 200), 4)
    assert abs(_wrap(grain_angle(surface, 0.25)[0] - grain_angle(surface)[0])) < 1.0
    recorded = {"reference": 0.0, "read_error_p90": 1.0, "resultant": 1.0, "min_coherence": 0.1}
    assert GrainAlignment.from_dict(recorded).read_scale is None
    assert GrainAlignment.from_dict({**recorded, "read_scale": 2.0}).read_scale == 2.0


def _wrap(angle: float) -> float:
    return (angle + 90.0) % 180.0 - 90.0


def test_a_reading_is_refined_where_the_grain_lies_as_the_references_does():
    """Sobel's derivative reads a fine grain's direction with a bias that depends on its angle to the pixel grid.
    Read again on the photo turned back by the first reading, the grain lies at the reference's angle and the bias
    cancels: the turn is undone within a fraction of the first reading's error. A photo read as upright is not read
    again, and an alignment recorded before the refinement (no read_rounds) reads once."""
    fine = stripes(200, period=5.0)
    once = GrainAlignment(reference=grain_angle(fine)[0], read_error_p90=0.0, resultant=1.0)
    refined = dataclasses.replace(once, read_rounds=1)
    errors = {}
    for name, alignment in (("once", once), ("refined", refined)):
        turns = [alignment.turn_for(cut_turned(fine, Turn(angle))) for angle in (10.0, 20.0, 35.0, 50.0, 70.0, 120.0)]
        errors[name] = [abs(_wrap(t.angle + a)) for t, a in zip(turns, (10.0, 20.0, 35.0, 50.0, 70.0, 120.0))]
    assert max(errors["once"]) > 1.0  # the bias is there to remove
    assert max(errors["refined"]) < 0.4 and np.mean(errors["refined"]) < np.mean(errors["once"]) / 4
    assert refined.turn_for(fine) is None
    recorded = {"reference": 0.0, "read_error_p90": 1.0, "resultant": 1.0, "min_coherence": 0.1}
    assert GrainAlignment.from_dict(recorded).read_rounds == 0
    assert GrainAlignment.from_dict({**recorded, "read_rounds": 1}).read_rounds == 1


def test_a_thin_strip_keeps_its_short_side_when_read_and_turned(surface_model):
    """The shrink keeps each side at least twice what the network sees: a strip long enough to be shrunk along its
    length is read as at full size, and its canvas keeps each side twice its working size."""
    strip = np.ascontiguousarray(cut_turned(textured_part(np.random.default_rng(4), 700, 700), Turn(30.0))[:12, :600])
    working_size = surface_model.embedder.preprocessing.working_size
    alignment = surface_model.alignment_
    assert alignment.turn_for(strip, working_size) == alignment.turn_for(strip)  # the strip read at its own size
    view = alignment.view(strip, working_size)
    assert view is not None and abs(_wrap(view.turn.angle + 30.0)) < 3
    full = view.turn.out_shape(strip.shape)
    assert all(side >= min(f, 2 * w) - 2 for side, f, w in zip(view.canvas.shape[:2], full, view.work))
    assert surface_model.score(strip).anomaly_map.shape == strip.shape[:2]


def placed(height: int, width: int, period: float = 6.0) -> np.ndarray:
    """Streaks along y in the first channel, and each pixel's own x and y (its centre, in pixels) in the other two:
    wherever a turn, a cut or a fill moves a pixel, its value still says where in the image it came from."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([128 + 80 * np.sin(2 * np.pi * xx / period), xx + 0.5, yy + 0.5], axis=2)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def test_an_aligned_copys_fill_names_the_places_whose_pixels_it_repeats():
    """A turned copy turned back to the grain fills its corners from the copy's own lines along the grain; a bank
    row from there shows those places of the training image, and its evidence names them, not the places past the
    cut's edge over which the fill lies."""
    image = placed(120, 240)
    alignment = GrainAlignment(reference=grain_angle(image)[0], read_error_p90=0.0, resultant=1.0)
    for turn in (Turn(25.0), Turn(-40.0, flip=True)):
        copy, to_source, real = alignment.copy_of(image, turn, 32)
        assert real is not None and (~real).mean() > 0.2  # turned back on a canvas, a fifth of it fill or more
        yy, xx = np.mgrid[0 : copy.shape[0], 0 : copy.shape[1]]
        named = to_source(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1))
        shown = copy[..., 1:].reshape(-1, 2).astype(float)
        off = np.hypot(*(named - shown).T)
        assert np.percentile(off[~real.ravel()], 99) < 4  # the fill: the place its value came from
        assert np.percentile(off[real.ravel()], 99) < 4  # and the photo's own pixels, as before


def test_an_added_turned_photos_fill_cells_name_the_photo_cells_they_repeat():
    """An update learns a turned photo from its canvas: a cell of the fill names the cell of the photo whose pixels
    the fill copied, as the photo came."""
    from anomaly_service.grain import photo_cells

    photo = placed(150, 200)
    alignment = GrainAlignment(reference=grain_angle(photo)[0], read_error_p90=0.0, resultant=1.0)
    turn = Turn(32.0)
    canvas = alignment.canvas(photo, turn)
    real = real_pixels(turn, photo.shape)[0]
    grid, photo_grid = (canvas.shape[0] // 8, canvas.shape[1] // 8), (150 // 8, 200 // 8)
    cells = photo_cells(alignment, turn, grid, canvas.shape, photo.shape, photo_grid)
    centres = (np.arange(grid[0]) * 8 + 4)[:, None], (np.arange(grid[1]) * 8 + 4)[None, :]
    x, y = canvas[centres][..., 1].astype(float), canvas[centres][..., 2].astype(float)
    shown = np.stack([np.floor(y * photo_grid[0] / 150), np.floor(x * photo_grid[1] / 200)], axis=-1)
    fill = ~real[centres]
    assert fill.mean() > 0.2
    assert (np.abs(cells - shown).max(axis=-1)[fill] <= 1).mean() > 0.95  # within a cell: a value on a cell's edge
    assert (np.abs(cells - shown).max(axis=-1)[~fill] <= 1).all()


class CountedSearch:
    """A model's own search, counting the rows each call asks it to search."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, k=1):
        self.calls.append(len(queries))
        return self.inner.search(queries, k)


def test_a_pure_fill_cell_takes_the_score_of_the_cell_whose_pixels_its_fill_repeats():
    """A turned canvas's cells with none of the photo's pixels copy a cell that has some: the one holding the pixel
    the fill at their centre repeats. Cells with a photo pixel keep their own; an unturned canvas copies nothing."""
    from anomaly_service.grain import fill_sources, filled_from

    shape, grid = (120, 90), (20, 17)
    real, inner = real_pixels(Turn(33.0), shape)
    src = fill_sources(real, True, grid, inner)
    assert src is not None and src.shape == (grid[0] * grid[1],)
    height, width = real.shape
    own = src == np.arange(len(src))
    assert 0 < (~own).sum() < len(src)
    assert (src[src] == src).all()  # every source is searched itself
    for cell in np.flatnonzero(own):
        r, c = divmod(int(cell), grid[1])
        ys = slice(int(r * height / grid[0]), int(np.ceil((r + 1) * height / grid[0])))
        xs = slice(int(c * width / grid[1]), int(np.ceil((c + 1) * width / grid[1])))
        assert real[ys, xs].any()
    for cell in np.flatnonzero(~own):
        r, c = divmod(int(cell), grid[1])
        centre = np.array([[(c + 0.5) * width / grid[1], (r + 0.5) * height / grid[0]]])
        sx, sy = filled_from(centre, inner, True)[0]
        assert divmod(int(src[cell]), grid[1]) == (int(sy * grid[0] / height), int(sx * grid[1] / width))
    assert fill_sources(np.ones(shape, bool), True, grid) is None


def test_a_turned_canvas_searches_only_the_cells_that_hold_the_photo(surface_model):
    """The kNN searches a turned photo's canvas only where it shows the photo; each pure-fill cell's score and
    nearest row are those of the cell its fill repeats, which the whole canvas searched gives too."""
    from anomaly_service.timing import StageTimer

    knn = surface_model.knn
    work = surface_model.embedder.preprocessing.working_size
    photo = cut_turned(textured_part(np.random.default_rng(31), 140, 140), Turn(40.0))
    view = surface_model.alignment_.view(photo, work)
    assert view is not None
    embedded = surface_model.embedder.embed([view.canvas], keep=knn.keep, size=view.work)
    grid = tuple(int(v) for v in embedded.features.shape[1:3])
    src = view.cell_sources(grid)
    assert src is not None
    full = knn.score(dataclasses.replace(embedded, turned=[True]), StageTimer())[0].matches
    spied = copy.copy(knn)
    spied._search = CountedSearch(knn._search)
    part = spied.score(dataclasses.replace(embedded, turned=[True], copied=[src]), StageTimer())[0].matches
    assert sum(spied._search.calls) == int((src == np.arange(len(src))).sum()) < grid[0] * grid[1]
    np.testing.assert_allclose(part.distance.ravel(), full.distance.ravel()[src], rtol=1e-6)
    np.testing.assert_array_equal(part.nearest.ravel(), full.nearest.ravel()[src])


def test_an_aligned_copy_of_a_large_photo_shows_what_scoring_sees_of_it():
    """A large photo is turned back from a shrunk copy when scored (:meth:`GrainAlignment.view`); its turned copies
    in the bank are made the same way, so the network sees the same edges and fill in both (the canvas keeps its
    full-size geometry). The bank's copies' rows come only from cells that scoring searches."""
    from PIL import Image

    from anomaly_service import orientation
    from anomaly_service.grain import fill_sources

    rng = np.random.default_rng(9)
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(
        [larger(textured_part(rng, 96, 96), 4) for _ in range(10)])
    alignment, work = model.alignment_, model.embedder.preprocessing.working_size
    image, turn = larger(textured_part(rng, 150, 150), 4), Turn(35.0)
    copy_, _, real = alignment.copy_of(image, turn, 32, work)
    cut = np.ascontiguousarray(cut_turned(image, turn))
    view = alignment.view(cut, work)
    assert view is not None and copy_.shape[:2] == real.shape == view.turn.out_shape(cut.shape)

    def seen(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize(view.work[::-1], Image.Resampling.BILINEAR)).astype(float)

    full_size = alignment._canvas(cut, view.turn)[0]  # the canvas turned at the photo's own size
    assert np.abs(seen(copy_) - seen(view.canvas)).mean() < 0.2 * np.abs(seen(full_size) - seen(view.canvas)).mean()
    copies = orientation.TurnedCopies(model.embedder, 0, alignment=alignment)
    grid = (18, 18)
    src = fill_sources(real, alignment.along_columns, grid)
    assert src is not None
    np.testing.assert_array_equal(copies._row_cells(real, grid), np.flatnonzero(src == np.arange(len(src))))
    np.testing.assert_array_equal(copies._row_cells(None, grid), np.arange(grid[0] * grid[1]))
    copies.close()


def test_an_update_learns_a_turned_photo_from_what_scoring_embeds_of_it_and_not_from_its_fill(monkeypatch):
    """An update learns a turned good photo from the canvas scoring embeds of it: a large photo's turned back from a
    shrunk copy (:meth:`GrainAlignment.view`), seen at the full-size canvas's working size, so the bank holds what
    scoring sees. Its rows come only from the cells scoring searches, as the fit's copies' do (a row of pure fill
    spends the bank's room on a patch no photo is judged by); a model fitted before the fill's cells were copied
    searches them all, and offers them all, as before."""
    from anomaly_service.knn_scorer import KnnScorer

    rng = np.random.default_rng(9)
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(
        [larger(textured_part(rng, 96, 96), 4) for _ in range(10)])
    photo = larger(cut_turned(textured_part(rng, 150, 150), Turn(35.0)), 4)
    view = model.alignment_.view(photo, model.embedder.preprocessing.working_size)
    assert view is not None and max(view.shape[:2]) < max(photo.shape[:2]) / 2  # turned from a shrunk copy
    seen = model.embedder.embed([view.canvas], keep=model.knn.keep, size=view.work).features[0]
    rows = seen.reshape(-1, seen.shape[-1]).float().cpu().numpy()
    src = view.cell_sources(tuple(seen.shape[:2]))
    searched = src == np.arange(len(src))
    assert 0 < searched.sum() < len(src)
    offered = []
    extended = KnnScorer.extended

    def spied(self, patches, *args, **kwargs):
        offered.append(patches.float().cpu().numpy())
        return extended(self, patches, *args, **kwargs)

    monkeypatch.setattr(KnnScorer, "extended", spied)
    older = copy.copy(model)
    older.alignment_ = dataclasses.replace(model.alignment_, fill_copied=False)
    for fitted, expected in ((model, rows[searched]), (older, rows)):
        updated = fitted.update([photo], force=True)
        counts = (m.manifest_.training.turned_copies["patches"] for m in (updated, fitted))
        got = offered.pop()
        got = got[: len(got) - (next(counts) - next(counts))]  # the canvas's rows, before its turned copies'
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_an_aligned_model_is_never_calibrated_on_held_out_photos():
    """Held-out calibration scores its photos as they came (its calibration set keeps their upright grids, which an
    update re-scores), so an aligned model must never reach it: orientation any is refused with it (only the
    leave-one-out threshold sees turned copies), and a re-fit of a model whose config no longer asks for any drops
    the alignment it had, so its threshold is read from the scores scoring gives its held-out photos."""
    with pytest.raises(ConfigError, match="leave-one-out"):
        AnomalyModel(orientation="any", calibration="holdout")
    rng = np.random.default_rng(5)
    upright = [textured_part(rng, 96, 96) for _ in range(12)]
    turned = [cut_turned(textured_part(rng, 140, 140), Turn(angle)) for angle in (25.0, 40.0, 60.0)]
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(upright)
    assert model.alignment_ is not None
    # the fit holds out the images its seeded permutation puts first: the turned photos go there
    order = np.random.default_rng(0).permutation(len(upright) + len(turned))
    images: list[np.ndarray] = [np.empty(0)] * len(order)
    for k, i in enumerate(order):
        images[i] = turned[k] if k < len(turned) else upright[k - len(turned)]
    names = [f"{i:02d}.png" for i in range(len(images))]
    held = sorted(order[: len(turned)])
    work = model.embedder.preprocessing.working_size
    assert all(model.alignment_.turn_for(images[i], work) is not None for i in held)  # photos it would turn
    # model.config is read-only to users (set_params refuses a fitted model); the fit's own reset is what is checked
    model._config = dataclasses.replace(model.config, orientation="fixed", calibration="holdout",
                                        calibration_fraction=0.2)
    model.fit(images, names=names)
    assert [h.name for h in model.manifest_.training.held_out] == [names[i] for i in held]
    assert model.alignment_ is None and model.manifest_.training.turned_copies is None
    scored = [model.score(images[i]).score for i in held]
    assert model.calibration_.holdout_scores == pytest.approx(scored, rel=1e-4)


def test_a_model_fitted_before_the_fills_cells_were_copied_searches_them_as_it_was_calibrated(surface_model):
    """The manifest records that scoring copies a turned canvas's fill cells; an alignment recorded without it
    (an older model) reads as searching every cell, and so does its scoring, so its threshold still fits."""
    from anomaly_service.grain import GrainAlignment

    recorded = surface_model.manifest_.training.turned_copies["alignment"]
    assert recorded["fill_copied"] is True and surface_model.alignment_.fill_copied
    older = GrainAlignment.from_dict({k: v for k, v in recorded.items() if k != "fill_copied"})
    assert not older.fill_copied
    work = surface_model.embedder.preprocessing.working_size
    photo = cut_turned(textured_part(np.random.default_rng(31), 140, 140), Turn(40.0))
    assert surface_model.alignment_.view(photo, work).cell_sources((12, 12)) is not None
    assert older.view(photo, work).cell_sources((12, 12)) is None
    assert older.fill_cells(np.ones((20, 20), bool) & (np.arange(20) < 10)[None, :], (5, 5)) is None
    before = copy.copy(surface_model)
    before.alignment_ = older
    before.knn = copy.copy(surface_model.knn)
    before.knn._search = CountedSearch(surface_model.knn._search)
    result = before.score(photo)
    embedded = surface_model.embedder.embed([older.view(photo, work).canvas], keep=surface_model.knn.keep,
                                            size=older.view(photo, work).work)
    assert before.knn._search.calls == [int(np.prod(embedded.features.shape[1:3]))] and np.isfinite(result.score)


def test_a_colour_photo_s_grain_reads_as_ndimage_sobel_reads_it():
    """The channels' mean of a colour photo is no whole number: its derivatives summed in float32 round twice where
    ``ndimage.sobel`` rounds once, and a reading (so the turn, the canvas and the score) moved by it."""
    import math

    from scipy import ndimage

    def read_before(image: np.ndarray) -> tuple[float, float]:
        g = image.astype(np.float32).mean(axis=2)
        gx, gy = ndimage.sobel(g, axis=1)[1:-1, 1:-1], ndimage.sobel(g, axis=0)[1:-1, 1:-1]
        jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
        angle = 0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy)) % 180.0
        return angle, math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy + 1e-12)

    rng = np.random.default_rng(0)
    for _ in range(20):
        colour = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
        assert grain_angle(colour) == read_before(colour)


def test_the_fill_kernel_warmed_at_load_is_the_one_a_turned_photo_runs(monkeypatch):
    """A turn hands the fill a read-only array (Pillow's), a kernel numba compiles apart from a writable one's: the
    warm-up must compile that one, or the first turned photo compiles it (a fraction of a second, per kind). On a
    kernel of its own, as a new process has it: the suite's earlier canvases compiled every kind already."""
    from anomaly_service import grain_kernel
    from anomaly_service.grain import warm_fill
    from anomaly_service.jit import compiled

    monkeypatch.setattr(grain_kernel, "fill_columns", compiled(nogil=True)(grain_kernel.fill_columns.py_func))
    assert not grain_kernel.fill_columns.signatures  # loaded from numba's disk cache as each kind is asked for
    warm_fill()
    warmed = set(grain_kernel.fill_columns.signatures)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(40, 56), dtype=np.uint8)
    for image in (np.repeat(grey[..., None], 3, axis=2), rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)):
        for reference in (0.0, 90.0):  # the fill along columns, and along rows
            GrainAlignment(reference, 0.0, 1.0).canvas(image, Turn(30.0))
    assert set(grain_kernel.fill_columns.signatures) == warmed


def camera_turned(rng: np.random.Generator, turn: Turn, side: int = 96) -> np.ndarray:
    """A good photo of the surface with the camera turned over it: the frame's size, the surface at ``turn``."""
    big = turn.image(textured_part(rng, 2 * side, 2 * side))
    y, x = (big.shape[0] - side) // 2, (big.shape[1] - side) // 2
    return np.ascontiguousarray(big[y : y + side, x : x + side])


def test_updates_of_a_surface_calibrate_on_the_added_images_as_a_fit_of_them_all_would():
    """An update re-calibrated on the fit's images alone: their turned copies' scores fell as the added images'
    copies filled in the turns around them, and took the threshold with them, while unseen turned photos, judged
    by a bank grown no denser than the fit's radius, kept theirs (this fit: 59.6 to 48.5 over these updates, false
    alarms on the unseen turned photos 3 to 21 of 30). The added images' leave-one-out worse poses join the
    calibration, as a fit of all of them would read them."""
    from anomaly_service.orientation import random_turns

    rng = np.random.default_rng(11)
    first = [textured_part(rng, 96, 96) for _ in range(12)]
    added = [[textured_part(rng, 96, 96) for _ in range(3)] for _ in range(20)]
    turned_rng = np.random.default_rng(12)
    unseen = [camera_turned(turned_rng, t) for t in random_turns(30, turned_rng)]
    fitted = model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(first)
    for images in added:
        model = model.update(images)
    alarms = [sum(r.is_anomaly for r in m.score_many(unseen)) for m in (fitted, model)]
    assert alarms[1] <= alarms[0], alarms
    assert model.calibration_.n_images == len(first) + sum(map(len, added))  # none an outlier or a near-twin here


# ------------------------------------------------------------------ independent references (mutation pass, session 68)
def grating(theta: float, height: int = 96, width: int = 128, period: float = 16.0,
            amplitude: float = 90.0) -> np.ndarray:
    """A sinusoidal grain whose intensity changes along the direction ``theta`` degrees from the x axis (y down):
    :func:`grain_angle` must read ``theta``."""
    import math

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = math.radians(theta)
    return amplitude * np.sin(2 * np.pi * (xx * math.cos(t) + yy * math.sin(t)) / period)


def test_a_synthetic_grain_of_known_angle_is_read_back_whatever_the_photos_kind():
    """The structure tensor's direction of a straight grain is its angle (modulo a half turn), read the same off a
    grey photo (the slices' whole-level path), its three equal channels, three unequal channels (ndimage's path), a
    float picture and a photo too thin to drop its edge pixels; a pure grain is wholly coherent."""
    for theta in (0.0, 17.0, 45.0, 63.0, 90.0, 120.0, 151.0, 179.0):
        g = 128 + grating(theta)
        grey = np.round(g).astype(np.uint8)
        for image in (grey, np.repeat(grey[..., None], 3, axis=2), np.clip(np.stack([g, g + 9, g - 9], 2), 0, 255)
                      .astype(np.uint8), g.astype(np.float32), grey.astype(np.uint16) * 200):
            angle, coherence = grain_angle(image)
            assert 0.0 <= angle < 180.0
            assert abs(_wrap(angle - theta)) < 0.5, (theta, image.shape, image.dtype, angle)
            assert coherence > 0.99
        thin_angle, thin_coherence = grain_angle(grey[:4, :64])
        assert abs(_wrap(thin_angle - theta)) < 8 and thin_coherence > 0.9


def test_the_coherence_of_two_crossed_grains_is_their_energy_difference_over_their_sum():
    """Two grains at right angles, of amplitudes a and b and one period, give the structure tensor eigenvalues in
    the ratio a^2 : b^2: the coherence is (a^2 - b^2) / (a^2 + b^2), and the direction the stronger one's."""
    for a, b in ((40.0, 40.0), (60.0, 30.0), (60.0, 20.0)):
        image = 128 + grating(30.0, 128, 128, 16.0, a) + grating(120.0, 128, 128, 16.0, b)
        angle, coherence = grain_angle(image.astype(np.float32))
        assert coherence == pytest.approx((a * a - b * b) / (a * a + b * b), abs=0.02)
        if a > b:
            assert abs(_wrap(angle - 30.0)) < 0.5


def test_a_turn_read_off_a_grain_is_the_turn_that_undoes_it():
    """A camera turned over a grain by a known angle is read back within half a degree (refined, as fits record)
    and the turn returned undoes it; a grain within MIN_TURN of the reference, or too unclear, is left as it came."""
    from anomaly_service.grain import MIN_TURN

    reference = 20.0
    alignment = GrainAlignment(reference, 0.0, 1.0, read_rounds=1)
    for drawn in (-70.0, -30.0, 8.0, 33.0, 75.0):
        # a turn counter-clockwise on screen lowers the grain's angle (y down): the photo turned by ``drawn``
        photo = np.round(128 + grating(reference - drawn, 120, 150)).astype(np.uint8)
        turn = alignment.turn_for(photo)
        assert turn is not None and not turn.flip
        assert abs(_wrap(turn.angle + drawn)) < 0.5, (drawn, turn)
    for near in (0.0, MIN_TURN * 0.9, -MIN_TURN * 0.9, 180.0 + MIN_TURN * 0.5):
        assert alignment.turn_for(np.round(128 + grating(reference + near, 120, 150)).astype(np.uint8)) is None
    beyond = np.round(128 + grating(reference + 1.5 * MIN_TURN, 120, 150)).astype(np.uint8)
    assert alignment.turn_for(beyond) is not None
    unclear = dataclasses.replace(alignment, min_coherence=0.99)
    crossed = np.clip(128 + grating(reference + 40, 120, 150, 16.0, 50) + grating(reference + 130, 120, 150, 16.0, 40),
                      0, 255).astype(np.uint8)
    assert alignment.turn_for(crossed) is not None and unclear.turn_for(crossed) is None


def test_a_canvas_turned_back_restores_the_photos_own_pixels():
    """The canvas of a photo turned (its fill beside it), turned back the way a map is (turned_back), gives the
    photo's own pixels again within the two resamplings' error, and its hottest pixel as the image score."""
    from anomaly_service.grain import TurnedView, turned_back

    yy, xx = np.mgrid[0:70, 0:90].astype(np.float64)
    photo = np.round(100 + 60 * np.sin(2 * np.pi * xx / 40) + 0.5 * yy).astype(np.uint8)
    for turn, reference in ((Turn(23.0), 0.0), (Turn(-71.0), 90.0), (Turn(140.0), 0.0)):
        alignment = GrainAlignment(reference, 0.0, 1.0)
        canvas = alignment.canvas(photo, turn)
        assert canvas.shape == turn.out_shape(photo.shape)
        view = TurnedView(turn, canvas, photo.shape, (64, 64))
        score, amap = turned_back(view, (-1.0, canvas.astype(np.float32)), photo.shape)
        assert amap.shape == photo.shape
        err = np.abs(amap - photo)
        assert err[3:-3, 3:-3].max() < 2.5
        assert score == pytest.approx(float(np.nanmax(amap))) and abs(score - photo.max()) < 2.5
        # at twice the size: the map turned back at the copy's size and resized to the photo's
        _, big = turned_back(view, (-1.0, canvas.astype(np.float32)), (140, 180))
        assert big.shape == (140, 180) and np.abs(big[::2, ::2] - amap).mean() < 4


def test_every_filled_pixel_equals_the_photo_pixel_it_mirrors():
    """On a turned canvas every pixel holds exactly the value of the turned photo's pixel filled_from names, which
    lies in the part the fill leaves as it is, and that part shows the turned photo (grey and colour, along columns
    and along rows; a line with fewer than two such pixels, at the footprint's tips, takes its neighbour's fill)."""
    from PIL import Image

    from anomaly_service.grain import filled_from

    rng = np.random.default_rng(7)
    colour = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    for image in (colour[..., 0], colour):
        for turn, reference in ((Turn(28.0), 0.0), (Turn(-52.0, flip=True), 90.0), (Turn(100.0), 0.0)):
            alignment = GrainAlignment(reference, 0.0, 1.0)
            canvas = alignment.canvas(image, turn)
            fill = 0 if image.ndim == 2 else (0, 0, 0)
            turned = turn._turned(image, Image.Resampling.BICUBIC, 0, fill)
            _, inner = real_pixels(turn, image.shape)
            h, w = canvas.shape[:2]
            yy, xx = np.mgrid[0:h, 0:w]
            src = filled_from(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1), inner,
                              alignment.along_columns)
            sx, sy = np.floor(src[:, 0]).astype(int), np.floor(src[:, 1]).astype(int)
            assert inner[sy, sx].all()
            np.testing.assert_array_equal(canvas.reshape(h * w, -1), turned[sy, sx].reshape(h * w, -1))
            lines = inner.sum(axis=0 if alignment.along_columns else 1) >= 2
            kept = inner & (lines[None, :] if alignment.along_columns else lines[:, None])
            assert kept.sum() > 0.5 * inner.sum()
            np.testing.assert_array_equal(canvas[kept], turned[kept])


def reference_fill(a: np.ndarray, cols: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """fill_columns written another way: each output column is its source column's run padded out to the
    column's height with numpy's ``symmetric`` padding (the run mirrored at each end, its end pixel repeated)."""
    out = np.empty_like(a)
    height = a.shape[0]
    for c in range(a.shape[1]):
        run = a[top[c] : bottom[c] + 1, cols[c]]
        pad = ((int(top[c]), int(height - 1 - bottom[c])),) + ((0, 0),) * (a.ndim - 2)
        out[:, c] = np.pad(run, pad, mode="symmetric")
    return out


def test_the_compiled_fill_kernel_matches_a_plain_numpy_fill():
    """The numba kernel against a plain numpy one on small arrays: runs of one pixel and of the whole column, runs
    at either end, a column read from another, grey and colour, and runs far shorter than the pads (mirrored
    again and again)."""
    from anomaly_service.grain_kernel import fill_columns

    rng = np.random.default_rng(5)
    for shape in ((9, 6), (13, 5, 3), (1, 4), (30, 7)):
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        h, w = shape[:2]
        for _ in range(20):
            top = rng.integers(0, h, size=w).astype(np.int32)
            bottom = np.minimum(h - 1, top + rng.integers(0, h, size=w)).astype(np.int32)
            top[0], bottom[0] = 0, h - 1
            bottom[-1] = top[-1]
            cols = rng.integers(0, w, size=w).astype(np.int32)
            out = np.empty_like(a)
            fill_columns(a, out, cols, top, bottom)
            np.testing.assert_array_equal(out, reference_fill(a, cols, top, bottom))


def test_a_canvas_with_no_line_to_fill_from_is_left_as_it_came():
    """A footprint with no line of two real pixels along the grain (a sliver) has nothing to mirror: the picture
    comes back as it was (a copy), and every point names itself."""
    from anomaly_service.grain import filled_from

    image = np.arange(30, dtype=np.uint8).reshape(5, 6)
    for real in (np.zeros((5, 6), bool), np.eye(5, 6, dtype=bool)):
        for along_columns in (True, False):
            out = fill_along(image, real, along_columns)
            assert out is not image
            np.testing.assert_array_equal(out, image)
            xy = np.array([[0.5, 0.5], [5.5, 4.5], [2.25, 3.75]])
            np.testing.assert_array_equal(filled_from(xy, real, along_columns), xy)


def test_a_photo_is_shrunk_only_below_a_factor_of_one_and_read_at_that_size():
    """shrunk and keep_factor, which bound a large photo's cost: a factor of one or more leaves the photo as it is
    (the same array), under one it is resized to that share of each side; the factor keeps each side ``times`` its
    working size, never above one. The grain read at a factor is the grain of the photo shrunk by it."""
    from anomaly_service.grain import keep_factor, resize_picture, shrunk

    photo = np.round(128 + grating(30.0, 96, 160)).astype(np.uint8)
    for factor in (1.0, 1.5):
        assert shrunk(photo, factor) is photo
    assert shrunk(photo, 0.5).shape == (48, 80) and shrunk(photo, 0.25).shape == (24, 40)
    assert resize_picture(photo, (96, 160)) is photo and resize_picture(photo, (50, 70)).shape == (50, 70)
    assert keep_factor((800, 800), (50, 50), 2.0) == 0.125
    assert keep_factor((800, 100), (50, 50), 2.0) == 1.0  # a strip keeps its short side at twice its working size
    assert keep_factor((100, 100), (64, 64), 2.0) == 1.0
    assert grain_angle(photo, 0.5) == grain_angle(shrunk(photo, 0.5))
    assert grain_angle(photo, 1.0) == grain_angle(photo) != grain_angle(photo, 0.5)


def test_a_photo_four_pixels_thin_keeps_its_edge_pixels_and_a_thicker_one_drops_them():
    """The edge pixels' gradient across the edge reads as none (reflected), so they are dropped, except on a photo
    of four pixels or fewer a side, which would keep too little: read against the structure tensor written here."""
    import math

    from scipy import ndimage

    def tensor(g: np.ndarray, crop: bool) -> tuple[float, float]:
        gx, gy = ndimage.sobel(g, axis=1), ndimage.sobel(g, axis=0)
        if crop:
            gx, gy = gx[1:-1, 1:-1], gy[1:-1, 1:-1]
        jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
        return (0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy)) % 180.0,
                math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy + 1e-12))

    g = (128 + grating(35.0, 12, 64)).astype(np.float32)
    for rows, crop in ((4, False), (5, True), (12, True)):
        np.testing.assert_allclose(grain_angle(g[:rows]), tensor(g[:rows].astype(np.float64), crop), rtol=1e-4)


def test_the_fill_runs_along_columns_for_a_grain_nearer_the_y_axis():
    """The reference is the direction intensity changes in, so streaks run across it: within 45 degrees of the x
    axis (either way, modulo a half turn) the streaks run nearer y, and the fill runs along columns."""
    for reference, along_columns in ((0.0, True), (44.9, True), (135.1, True), (179.0, True), (45.0, False),
                                     (90.0, False), (134.9, False)):
        assert GrainAlignment(reference, 0.0, 1.0).along_columns is along_columns


def test_a_quarter_turned_canvas_grid_comes_back_as_np_rot90_moved_it_with_the_matches():
    """grid_back against np.rot90: the photo's feature grid turned a quarter is the canvas's, and brought back it
    is the photo's again; turned_back hands a kNN opinion's matches back on that grid, not dropped."""
    from anomaly_service.grain import TurnedView, grid_back, turned_back
    from anomaly_service.scorer import MatchedScore, PatchMatches

    shape, grid = (40, 60), np.arange(24).reshape(4, 6)
    for turn in (Turn(90.0), Turn(270.0), Turn(180.0)):
        canvas_shape = turn.out_shape(shape)
        np.testing.assert_array_equal(grid_back(turn, turn._quarter(grid), canvas_shape, shape), grid)
        matches = PatchMatches(nearest=turn._quarter(grid).astype(np.int64),
                               distance=turn._quarter(grid).astype(np.float32), pooled=np.zeros(3, np.float32))
        view = TurnedView(turn, np.zeros((*canvas_shape, 3), np.uint8), shape, (64, 64))
        raw = MatchedScore(1.0, np.full(canvas_shape, 0.5, np.float32), matches)
        back = turned_back(view, raw, shape)
        assert isinstance(back, MatchedScore) and back[1].shape == shape
        np.testing.assert_array_equal(back.matches.nearest, grid)
        np.testing.assert_array_equal(back.matches.distance, grid.astype(np.float32))


def test_the_good_images_mean_grain_is_the_circular_mean_of_directions_modulo_a_half_turn():
    """_mean_direction against the mean of unit vectors at twice each angle, written here: directions either side
    of 0 average to 0 (not 90), and the resultant is that mean vector's length."""
    import cmath
    import math

    from anomaly_service.grain import _mean_direction

    for angles in ([175.0, 5.0], [30.0, 60.0], [100.0, 120.0, 170.0], [89.0, 91.0, 95.0], [10.0, 100.0, 20.0]):
        z = sum(cmath.exp(2j * math.radians(a)) for a in angles) / len(angles)
        angle, resultant = _mean_direction(angles)
        assert 0.0 <= angle <= 180.0
        assert abs(_wrap(angle - math.degrees(cmath.phase(z)) / 2)) < 1e-9
        assert resultant == pytest.approx(abs(z))
    assert abs(_wrap(_mean_direction([175.0, 5.0])[0])) < 1e-9


def test_a_line_without_a_run_takes_the_fill_of_its_nearest_line_the_left_on_a_tie():
    """fill_along against numpy's symmetric padding of the line it names: a line with one photo pixel or none is
    filled from the nearest line with a run of two or more (the left one on a tie), whichever side it lies on."""
    image = np.arange(66, dtype=np.uint8).reshape(6, 11)
    image.setflags(write=False)  # read-only, as a turn hands it over (Pillow's): the kernel warm_fill compiles
    real = np.zeros((6, 11), bool)
    real[1:4, 1] = True  # a run in column 1
    real[2:5, 5] = True  # in column 5
    real[0:6, 9] = True  # and in column 9
    real[3, 3] = True  # one pixel: no run
    source = [1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9]  # columns 3 and 7 lie halfway: the left
    runs = {1: (1, 3), 5: (2, 4), 9: (0, 5)}
    top = np.array([runs[s][0] for s in source], np.int32)
    bottom = np.array([runs[s][1] for s in source], np.int32)
    want = reference_fill(image, np.array(source, np.int32), top, bottom)
    np.testing.assert_array_equal(fill_along(image, real, along_columns=True), want)
    across = np.ascontiguousarray(image.T)
    across.setflags(write=False)
    np.testing.assert_array_equal(fill_along(across, real.T, along_columns=False), want.T)


def test_a_fit_reads_no_alignment_off_too_few_surfaces_or_cuts_too_small_and_records_what_it_kept():
    """GrainAlignment.fit's early answers: no images, half the images or fewer running out of the frame, every cut
    too small to read; a kept alignment copies its fill's cells and records the scale it reads at."""
    from anomaly_service.grain import OVERSAMPLE

    rng = np.random.default_rng(2)
    assert GrainAlignment.fit([], seed=0) == (None, {"kept": False, "why": "no images"})
    grains = [np.round(128 + grating(10.0, 96, 96)).astype(np.uint8)[..., None].repeat(3, axis=2) for _ in range(4)]
    parts = [bracket(rng) for _ in range(4)]
    assert GrainAlignment.fit(grains + parts, seed=0)[1] == {"kept": False, "why": "not a surface"}  # four of 8
    tiny = [np.round(128 + grating(10.0, 9, 9, 4.0)).astype(np.uint8) for _ in range(4)]
    assert GrainAlignment.fit(tiny, seed=0) == (None, {"kept": False,
                                                     "why": "no image large enough to read a turn off"})
    assert GrainAlignment.fit(grains + parts[:3], seed=0)[1]["why"] != "not a surface"  # four of seven
    alignment, details = GrainAlignment.fit(grains, seed=0, working_size=lambda h, w: (h // 4, w // 4))
    assert alignment is not None and details["kept"] and details["checked"] == 4
    assert alignment.fill_copied and details["fill_copied"]
    assert alignment.read_scale == details["read_scale"] == OVERSAMPLE
    assert abs(_wrap(alignment.reference - 10.0)) < 0.5
    assert GrainAlignment.fit(grains, seed=0)[0].read_scale is None  # no working size: read at the photo's own


def test_an_upright_photo_has_no_view_and_a_large_one_is_read_at_a_multiple_of_its_working_size():
    from anomaly_service.grain import _read_factor

    alignment = GrainAlignment(10.0, 0.0, 1.0, read_scale=2.0)
    upright = np.round(128 + grating(10.0, 96, 128)).astype(np.uint8)
    assert alignment.view(upright, lambda h, w: (h, w)) is None
    turned = np.round(128 + grating(40.0, 96, 128)).astype(np.uint8)
    view = alignment.view(turned, lambda h, w: (h, w))
    assert view is not None and abs(_wrap(view.turn.angle - 30.0)) < 1
    quarter = lambda h, w: (h // 4, w // 4)  # noqa: E731
    assert _read_factor(upright, 2.0, quarter) == 0.5
    assert _read_factor(upright, None, quarter) == 1.0 and _read_factor(upright, 2.0, None) == 1.0


def test_an_aligned_copy_too_small_to_cut_or_already_at_the_grain_is_not_turned_back():
    """GrainAlignment.copy_of: a cut shorter than the least side keeps the whole turned canvas (all of it the copy's
    own pixels), and a cut whose grain already runs at the reference is the copy as it is."""
    image = np.round(128 + grating(0.0, 64, 64, 8.0)).astype(np.uint8)[..., None].repeat(3, axis=2)
    turn = Turn(30.0)
    short = min(turn.inscribed_box(image.shape)[2:])
    alignment = GrainAlignment(0.0, 0.0, 1.0)
    copy, _, real = alignment.copy_of(image, turn, short + 1)
    assert real is None and copy.shape[:2] == turn.out_shape(image.shape)
    copy, _, real = alignment.copy_of(image, turn, short)
    assert copy.shape[:2] != turn.out_shape(image.shape)
    at_grain = GrainAlignment(grain_angle(cut_turned(image, turn))[0], 0.0, 1.0)
    copy, to_source, real = at_grain.copy_of(image, turn, 8)
    assert real is None and copy.shape[:2] == turn.inscribed_box(image.shape)[2:]
