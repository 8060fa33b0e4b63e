"""Parts in any orientation: orientation="any" passes a good part turned or mirrored and still flags a defect on
it; fixed flags the turned part. Turns keep the whole image and move masks and maps with it; copies in the bank
count as their source image; the option is validated, recorded, and models saved before it load as fixed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from anomaly_service import AnomalyModel, ConfigError
from anomaly_service.manifest import migrate
from anomaly_service.orientation import Turn, source_cells
from conftest import add_defect, textured_part

LEGACY = Path(__file__).parent / "data" / "legacy_v1"
# small, quick fits: every model of this file but the surface ones (96 px) is built with these
FAST = dict(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False, device="cpu")


def bracket(rng: np.random.Generator, side: int = 128) -> np.ndarray:
    """An asymmetric part: an L-shaped machined bracket with a bore, on a plain background."""
    img = np.full((side, side, 3), 200, np.uint8)
    tex = textured_part(rng, side, side)
    part = np.zeros((side, side), bool)
    part[20:108, 24:52] = True  # the long arm
    part[80:108, 24:100] = True  # the foot
    yy, xx = np.mgrid[0:side, 0:side]
    part &= (yy - 94) ** 2 + (xx - 84) ** 2 > 36  # a bore in the foot
    img[part] = tex[part]
    return img


@pytest.fixture(scope="module")
def parts() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [bracket(rng) for _ in range(12)]


@pytest.fixture(scope="module")
def models(parts) -> dict[str, AnomalyModel]:
    return {o: AnomalyModel(orientation=o, **FAST).fit(parts) for o in ("fixed", "any")}


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    return bracket(np.random.default_rng(99))


TURNS = [Turn(90.0), Turn(200.0, flip=True), Turn(33.0)]


def test_fixed_flags_a_turned_part_that_any_passes(models, probe):
    assert not models["fixed"].score(probe).is_anomaly
    assert all(models["fixed"].score(t.image(probe)).is_anomaly for t in TURNS)
    assert not models["any"].score(probe).is_anomaly
    assert not any(models["any"].score(t.image(probe)).is_anomaly for t in TURNS)


def test_any_still_flags_a_defect_on_a_turned_part(models, probe):
    broken, mask = add_defect(probe, 50, 38, radius=12)
    for t in TURNS:
        result = models["any"].score(t.image(broken))
        assert result.is_anomaly
        turned_mask = t.mask(mask, broken)
        # the hottest place of the map lies on the turned defect
        peak = np.unravel_index(np.argmax(result.anomaly_map), result.anomaly_map.shape)
        yy, xx = np.nonzero(turned_mask)
        assert np.hypot(yy - peak[0], xx - peak[1]).min() < 12


def test_copies_in_the_bank_name_their_source_image(models, parts):
    knn = models["any"].knn
    assert knn.provenance_ is not None and int(knn.provenance_[:, 0].max()) == len(parts) - 1
    assert len(models["any"].catalog_) == len(parts)  # copies are no training images of their own
    fixed = models["fixed"].knn.bank_size
    assert fixed < knn.bank_size <= 2 * fixed


def test_the_copies_only_add_to_the_bank_the_fixed_fit_keeps(models, probe):
    """The copies join after the images' own bank, which they leave as the fixed fit keeps it: an upright part is
    judged against everything the fixed model holds (and more), never against a thinned bank."""
    fixed, turned = models["fixed"].knn, models["any"].knn
    np.testing.assert_array_equal(turned.bank()[: fixed.bank_size], fixed.bank())
    np.testing.assert_array_equal(turned.provenance_[: fixed.bank_size], fixed.provenance_)
    upright = [models[o].score(probe) for o in ("fixed", "any")]
    assert upright[1].score <= upright[0].score + 1e-4


def test_copies_do_not_push_the_originals_into_a_streamed_fit(monkeypatch, models, parts):
    """Whether the bank streams is the originals' count alone: with the copies past the streaming size (bottle),
    the originals' bank is still the fixed fit's one greedy."""
    from anomaly_service import knn_scorer

    n_rows = models["fixed"].knn.stats_["from_patches"]
    monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", n_rows)
    model = AnomalyModel(orientation="any", **FAST).fit(parts)
    fixed = models["fixed"].knn
    assert model.knn.stats_["from_patches"] > n_rows
    np.testing.assert_array_equal(model.knn.bank()[: fixed.bank_size], fixed.bank())


def test_an_update_of_an_any_model_adds_turned_copies_of_the_new_images(models, probe):
    model = models["any"]
    n_before = len(model.catalog_)
    new = model.update([Turn(180.0, flip=True).image(probe)])  # the camera's frame: an update leaves out others
    added = new.knn.provenance_[model.knn.bank_size :, 0]
    assert len(added) and set(added.tolist()) == {n_before}  # upright rows and copies: all the one new image
    assert not new.score(Turn(60.0).image(probe)).is_anomaly
    assert new.manifest_.training.turned_copies["surface_images"] == 0  # a part on its background, as the fit's


def test_an_update_keeps_the_bank_within_the_fits_cap_on_its_copies(models):
    """The fit caps the bank at twice its rows without copies; an update's copies stay within it, so that months of
    updates do not grow the search past what the fit allowed. The new photos' own rows are all offered."""
    model = models["any"]
    factor = model.manifest_.training.turned_copies["bank_factor"]
    own = int((~model.knn.copies_).sum())
    assert model.knn.bank_size == factor * own  # this fit reached its cap: any copy an update adds must make room
    rng = np.random.default_rng(7)
    new_parts = [bracket(rng) for _ in range(6)]
    new = model.update(new_parts)
    copies = new.knn.copies_
    assert int((~copies).sum()) > own  # the new photos' uncovered patches joined
    assert copies[model.knn.bank_size :].any()  # and as many of their copies as the cap leaves room for
    assert new.knn.bank_size <= factor * int((~copies).sum())
    assert not any(new.score(p).is_anomaly for p in new_parts)


def test_an_update_keeps_the_cap_of_a_fit_whose_bank_took_no_copies(parts):
    """A fit whose --coreset-max the images' own rows reached keeps no copy in its bank. Its update added every
    uncovered patch of its new photos' copies (a bank of 3.1x its rows without copies after 6 parts): the cap held
    only for a bank that already held a copy."""
    model = AnomalyModel(orientation="any", coreset_max=300, **FAST).fit(parts)
    assert model.knn.bank_size == 300 and not model.knn.copies_.any()  # the cap left the copies no room
    factor = model.manifest_.training.turned_copies["bank_factor"]
    rng = np.random.default_rng(7)
    new_parts = [bracket(rng) for _ in range(6)]
    new = model.update(new_parts)
    own = int((~new.knn.copies_).sum())
    assert own > 300  # the new photos' own rows all joined
    assert new.knn.bank_size <= max(own, min(factor * own, 300))  # their copies only where the fit's cap had room
    assert not any(new.score(p).is_anomaly for p in new_parts)


def test_turns_keep_the_whole_image_and_move_masks_and_maps_with_it():
    rng = np.random.default_rng(0)
    img = textured_part(rng, 40, 70)
    img, mask = add_defect(img, 10, 60, radius=6)
    for t in [Turn(90.0), Turn(270.0, True), Turn(37.0), Turn(123.0, True)]:
        out, m = t.image(img), t.mask(mask, img)
        assert out.shape[:2] == m.shape and m.sum() >= 0.8 * mask.sum()  # nothing cut
        # the defect's pixels land where the mask went
        assert out[m].mean(axis=0)[2] < 120 < out[m].mean(axis=0)[0]
        back = t.map_back(m.astype(np.float32), img.shape)
        assert back.shape == mask.shape and (back[mask] > 0.5).mean() > 0.8
    # each source pixel reads the canvas map at its centre's place there (bilinear): a linear ramp comes back exact
    for t, shape in [(Turn(37.0), (40, 70)), (Turn(-123.0, True), (33, 51))]:
        oh, ow = t.out_shape(shape)
        ramp = np.add.outer(0.25 * np.arange(oh), 0.5 * np.arange(ow)).astype(np.float32)
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        at = t.from_source(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1), shape) - 0.5
        inside = ((at >= 0) & (at <= [ow - 1, oh - 1])).all(axis=1)
        expect = (0.25 * at[:, 1] + 0.5 * at[:, 0]).reshape(shape)
        np.testing.assert_allclose(t.map_back(ramp, shape)[inside.reshape(shape)], expect[inside.reshape(shape)],
                                   atol=1e-3)
    assert (Turn(45.0).image(bracket(rng))[0, 0] == 200).all()  # a part on a plain background: corners show it
    exact = Turn(90.0, True)
    np.testing.assert_array_equal(exact.image(img), np.rot90(img[:, ::-1]))
    # a copy's feature cell maps back to the source cell it came from (a quarter turn swaps rows and columns)
    cells = source_cells(Turn(90.0), (7, 4), (40, 70), (4, 7))
    assert tuple(cells[0]) == (0, 6)  # the turned copy's top-left cell is the source's top-right one
    # the corners a turn uncovers take the nearest source cell, on every side, never one past the grid
    cells = source_cells(Turn(37.0), (9, 11), (40, 70), (4, 7))
    assert tuple(cells.min(axis=0)) == (0, 0) and tuple(cells.max(axis=0)) == (3, 6)


def test_an_inscribed_box_is_the_largest_upright_rectangle_a_pixel_clear_each_side():
    """The surface kept of each turned copy: the largest upright rectangle inside the turned photo, in closed form,
    less a pixel of resampled border each side. The property test holds it inside; these hold it as large: a
    landscape and the same photo standing (its box standing too), a small turn that touches all four sides, and a
    quarter turn, whose canvas is all photo (the grain's turns read it)."""
    import math

    def largest(angle: float, h: int, w: int) -> tuple[int, int]:
        s, c = abs(math.sin(math.radians(angle))), abs(math.cos(math.radians(angle)))
        if min(h, w) <= 2 * s * c * max(h, w):  # two corners on the longer sides
            x = min(h, w) / 2
            bw, bh = (x / s, x / c) if w >= h else (x / c, x / s)
        else:
            bw, bh = (w * c - h * s) / (c * c - s * s), (h * c - w * s) / (c * c - s * s)
        return math.floor(bh) - 2, math.floor(bw) - 2

    for angle, shape in ((30.0, (50, 200)), (30.0, (200, 50)), (5.0, (100, 300)), (5.0, (300, 100))):
        turn = Turn(angle)
        top, left, bh, bw = turn.inscribed_box(shape)
        oh, ow = turn.out_shape(shape)
        assert (bh, bw) == largest(angle, *shape) and (top, left) == ((oh - bh) // 2, (ow - bw) // 2)
    assert Turn(30.0).inscribed_box((50, 200))[2:] == Turn(30.0).inscribed_box((200, 50))[:1:-1]
    assert Turn(90.0).inscribed_box((40, 60)) == (0, 0, 60, 40) and Turn(180.0, True).inscribed_box((40, 60)) == (
        0, 0, 40, 60)


def test_option_is_validated_and_recorded(models, tmp_path):
    with pytest.raises(ConfigError, match="orientation"):
        AnomalyModel(orientation="sideways")
    for clash in ({"resize": "squash"}, {"tile": 256}, {"mask": "auto"}):  # each says why it does not combine
        with pytest.raises(ConfigError, match="orientation any"):
            AnomalyModel(orientation="any", **clash)
    assert AnomalyModel().config.orientation == "fixed"
    assert "orientation" not in AnomalyModel().config.to_dict()  # fixed models stay loadable by older releases
    turned = models["any"].manifest_.training.turned_copies
    assert turned["per_image"] == 4 and turned["patches"] > 0
    loaded = AnomalyModel.load(models["any"].save(tmp_path / "m"), device="cpu")
    assert loaded.config.orientation == "any" and loaded.manifest_.config["orientation"] == "any"


def test_a_photo_at_another_resolution_is_told_a_re_fit_the_fit_accepts(models, parts):
    """The scale warning named --resize longer-side as a way out, which an any fit refuses; a fixed model's still
    names it."""
    big = np.zeros((4 * parts[0].shape[0], 4 * parts[0].shape[1], 3), np.uint8)
    said = {o: next(w for w in models[o].unlike_fit(big) if "longer side" in w) for o in models}
    assert "--resize longer-side" in said["fixed"] and "--resize longer-side" not in said["any"]
    with pytest.raises(ConfigError, match="needs --resize fixed-scale"):
        AnomalyModel(orientation="any", resize="longer-side", **FAST).fit(parts)


def test_models_saved_before_the_option_load_as_fixed():
    assert "orientation" not in migrate({"config": {}}, "m")["config"]  # absent means fixed: the config's default
    assert AnomalyModel.load(LEGACY / "default", device="cpu").config.orientation == "fixed"


def test_a_streamed_fit_adds_only_uncovered_copies_within_the_factor(monkeypatch, parts, probe):
    """Above the streaming size the copies come after the originals' chunks and add what they leave uncovered."""
    from anomaly_service import knn_scorer

    monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 1024)
    monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 1024)
    fixed = AnomalyModel(orientation="fixed", **FAST).fit(parts)
    model = AnomalyModel(orientation="any", **FAST).fit(parts)
    assert model.knn.stats_["chunks"] > fixed.knn.stats_["chunks"] > 1
    assert fixed.knn.bank_size < model.knn.bank_size <= 2 * fixed.knn.bank_size
    assert set(model.knn.provenance_[:, 0].tolist()) <= set(range(len(parts)))
    assert not model.score(Turn(140.0, flip=True).image(probe)).is_anomaly


def test_a_cap_reached_part_way_spreads_the_copies_over_every_image(monkeypatch, parts, caplog):
    """First come, the copies of the images early in the seeded order took all the room a capped bank has, and the
    copies of the rest were never looked at; the room is now spread over every chunk of images' copies."""
    from anomaly_service import knn_scorer, orientation

    monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 512)
    monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 512)
    monkeypatch.setattr(orientation, "BANK_FACTOR", 1.1)
    with caplog.at_level("WARNING", logger="anomaly_service"):
        caplog.clear()
        model = AnomalyModel(orientation="any", **FAST).fit(parts)
    knn = model.knn
    own = int((~knn.copies_).sum())
    assert knn.bank_size == round(own * 1.1)  # the cap was reached
    order = np.random.default_rng(knn.seed).permutation(len(parts))
    from_copies = set(knn.provenance_[knn.copies_][:, 0].tolist())
    assert set(order[-3:].tolist()) & from_copies  # the last images' copies are in too
    assert len(from_copies) >= len(parts) - 2
    messages = [r.getMessage() for r in caplog.records]
    said = [m for m in messages if "each chunk of images kept its copies' farthest" in m]
    assert said and "a larger --coreset-ratio gives the copies more room" in said[0]  # what to do, if anything


def test_any_on_a_surface_warns_and_on_a_part_does_not(models, parts, caplog):
    """Copies of a surface are mirror-filled and their seams set the threshold above most defects: the fit says
    so (log, manifest, CLI) where most good images run out of the frame, and stays quiet on parts."""
    from anomaly_service.orientation import surface_warning

    assert models["any"].manifest_.training.turned_copies["surface_images"] == 0
    assert surface_warning(0, len(parts)) is None
    rng = np.random.default_rng(5)
    surfaces = [textured_part(rng, 96, 96) for _ in range(8)]
    with caplog.at_level("WARNING", logger="anomaly_service"):
        model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(surfaces)
    assert model.manifest_.training.turned_copies["surface_images"] == len(surfaces)
    assert any("orientation any on a surface (8 of 8 good images" in r.getMessage()
               and "--orientation fixed" in r.getMessage() for r in caplog.records)
    assert surface_warning(6, 12) is None and surface_warning(7, 12) is not None  # past half
    # the warning says how far the turned pose moved the threshold from the one the upright photos alone set
    turned, threshold = model.manifest_.training.turned_copies, model.decision.calibration.threshold
    assert turned["upright_threshold"] > 0
    rise = f"{threshold / turned['upright_threshold'] - 1:+.0%} on the {turned['upright_threshold']:.4g}"
    assert any(rise in r.getMessage() for r in caplog.records)
    assert "+20% on the 50 the upright photos alone set" in surface_warning(7, 12, 60.0, 50.0)


def test_the_surface_count_leaves_out_what_the_guard_drops():
    """With --contamination drop the model keeps fewer images than it made copies of: the manifest's surface count
    is over the images it keeps, as its n_images is."""
    rng = np.random.default_rng(6)
    surfaces = [textured_part(rng, 96, 96) for _ in range(12)]
    surfaces[3] = add_defect(surfaces[3], 48, 48, radius=14)[0]
    model = AnomalyModel(orientation="any", contamination="drop", **{**FAST, "image_size": 96}).fit(surfaces)
    training = model.manifest_.training
    assert training.suspects and training.n_images == len(surfaces) - len(training.suspects)
    assert training.turned_copies["surface_images"] == training.n_images
    # the copies the bank was offered, also over the kept images: each 96 px image's grid has 12x12 patches
    assert training.turned_copies["patches"] == training.n_images * 144


def test_a_surface_copy_is_cut_to_its_own_pixels_and_a_part_keeps_its_background():
    """A camera turned over a surface sees more surface, framed upright, never a fill: a surface's copy holds only
    its own pixels, as large a rectangle as fits. A part on a plain background keeps the whole turned picture."""
    rng = np.random.default_rng(5)
    surface = textured_part(rng, 80, 200)
    plain = np.zeros_like(surface)  # one colour: turns fill with it, so a turned mask of ones marks real pixels
    for t in (Turn(33.0), Turn(118.0, flip=True), Turn(251.0), Turn(10.0)):
        copy, box = t.copy_of(surface)
        assert box is not None and copy.shape[:2] == box[2:]
        y, x, h, w = box
        real = t.mask(np.ones(surface.shape[:2], bool), plain)
        assert real[y : y + h, x : x + w].all()  # nothing but the surface's own pixels
        np.testing.assert_array_equal(copy, t.image(surface)[y : y + h, x : x + w])
        assert not real[y - 3 : y + h + 3, x - 3 : x + w + 3].all()  # and no larger rectangle would do
        # the cut copy's cells name the source cells they came from, its corner cell too (inside the surface)
        grid = (h // 8, w // 8)
        corner = t.to_source(np.array([[x + 0.5 * w / grid[1], y + 0.5 * h / grid[0]]]), surface.shape)[0]
        assert 0 < corner[0] < 200 and 0 < corner[1] < 80
        cell = source_cells(t, grid, surface.shape, (10, 25), box)[0]
        assert tuple(cell) == (int(corner[1] * 10 / 80), int(corner[0] * 25 / 200))
    quarter, box = Turn(90.0, flip=True).copy_of(surface)  # quarter turns lose nothing
    assert box is None and (quarter == np.rot90(surface[:, ::-1])).all()
    part = bracket(rng)
    copy, box = Turn(33.0).copy_of(part)
    assert box is None and (copy == Turn(33.0).image(part)).all()
    small = textured_part(rng, 40, 40)  # too little left after the cut: the mirrored canvas stays
    assert Turn(45.0).copy_of(small)[1] is None
    assert Turn(33.0).copy_of(surface, "fill")[1] is None  # models fitted before the cut


def test_a_mirrored_canvas_names_the_places_its_mirror_images_show():
    """A copy too thin to cut keeps the surface mirrored round it: its rows there show the surface's own places
    mirrored, and their evidence names those places, not the surface's edge beyond which they lie."""
    from types import SimpleNamespace

    from anomaly_service.grain import GrainAlignment
    from anomaly_service.orientation import TurnedCopies
    from anomaly_service.preprocessing import Preprocessing

    strip = textured_part(np.random.default_rng(2), 24, 160)
    mark = np.zeros(strip.shape[:2], bool)
    mark[4:12, 26:34] = True
    strip[mark] = (40, 90, 220)
    turn = Turn(45.0)
    embedder = SimpleNamespace(preprocessing=Preprocessing(96, (0.5,) * 3, (0.5,) * 3, 16, reference_side=160.0))
    cut = TurnedCopies(embedder, seed=0)._copy(strip, turn)
    aligned = GrainAlignment(0.0, 0.0, 1.0).copy_of(strip, turn, 32)
    for copy, to_source, _ in (cut, aligned):
        assert copy.shape[:2] == turn.out_shape(strip.shape)  # the whole canvas, mirrored round the strip
        blue = (copy[..., 2] > 200) & (copy[..., 0] < 60)
        yy, xx = np.nonzero(blue)
        assert len(yy) > 2 * 64  # the mark and its mirror images
        src = to_source(np.stack([xx + 0.5, yy + 0.5], axis=1))
        assert ((src >= 0) & (src <= [160, 24])).all()  # every point shows a place of the strip
        near = np.hypot(src[:, 0] - 30, src[:, 1] - 8)
        assert (near <= 6.5).mean() > 0.98  # and that place is the mark


def speckle(rng: np.random.Generator, height: int = 96, width: int = 96) -> np.ndarray:
    """A surface with no grain: smoothed noise, alike in every direction (grain.py reads no turn off it)."""
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 2.0)
    base = np.clip(0.5 + 0.125 * base / base.std() + rng.normal(0, 0.02, (height, width)), 0, 1)
    return (np.stack([base * 0.9, base * 0.8, base * 0.7], axis=-1) * 255).astype(np.uint8)


def test_a_surface_model_records_cut_copies_and_an_older_model_updates_as_it_was_fitted(monkeypatch):
    rng = np.random.default_rng(8)
    surfaces = [speckle(rng) for _ in range(8)]  # no grain to read: cut copies
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(surfaces)
    turned = model.manifest_.training.turned_copies
    assert turned["surface_copies"] == "cut" and not turned["alignment"]["kept"]
    cells = model.knn.provenance_[:, 1:]
    assert cells.min() >= 0 and (cells.max(axis=0) < 12).all()  # every copy's evidence cell is in its source grid
    seen: list[str | None] = []
    real_copy_of = Turn.copy_of

    def spy(self, image, surface_copies=None, min_side=0):
        seen.append(surface_copies)
        return real_copy_of(self, image, surface_copies, min_side)

    monkeypatch.setattr(Turn, "copy_of", spy)
    new = [speckle(rng) for _ in range(2)]  # surfaces the model has not seen: an update skips those it has
    updated = model.update([new[0]])
    assert seen and set(seen) == {"cut"}
    # the surface count grows with the images, so `anomaly info` and the warning read the updated model right
    assert updated.manifest_.training.turned_copies["surface_images"] == updated.manifest_.training.n_images == 9
    assert updated.manifest_.training.turned_copies["patches"] == turned["patches"] * 9 // 8
    assert turned["surface_images"] == 8  # the model updated from is left as it was
    del turned["surface_copies"]  # as a model fitted before surfaces were cut says it
    seen.clear()
    model.update([new[1]])
    assert seen and set(seen) == {"fill"}


def test_a_cut_the_working_size_would_zoom_keeps_the_mirrored_canvas(monkeypatch):
    """At a small working size a thin cut would fall under the network's smallest input and be zoomed past the
    fit's scale: such a turn keeps the mirrored canvas, and every cut that is made keeps the fit's scale."""
    from anomaly_service.orientation import MIN_CUT_SIDE

    rng = np.random.default_rng(11)
    strips = [speckle(rng, 320, 127) for _ in range(6)]  # no grain to read: the cut path
    made: list[tuple[Turn, np.ndarray, tuple | None]] = []
    real_copy_of = Turn.copy_of

    def spy(self, image, surface_copies=None, min_side=MIN_CUT_SIDE):
        out = real_copy_of(self, image, surface_copies, min_side)
        made.append((self, *out))
        return out

    monkeypatch.setattr(Turn, "copy_of", spy)
    model = AnomalyModel(orientation="any", **{**FAST, "image_size": 96}).fit(strips)
    pp = model.embedder.preprocessing
    scale = pp.image_size / pp.reference_side
    cut = [c for _, c, box in made if box is not None]
    kept = [t for t, _, box in made if box is None and not t.is_quarter]
    assert cut and kept  # thin turns kept their canvas, the others were cut
    assert all(min(c.shape[:2]) * scale >= 2 * pp.stride for c in cut)
    assert all(min(t.inscribed_box((320, 127))[2:]) * scale < 2 * pp.stride for t in kept)


def test_an_update_that_makes_the_model_a_surface_warns(tmp_path):
    """The fit of parts did not warn; an update whose images tip the model past half surfaces says what the fit
    would have said (and an update that does not tip it says nothing)."""
    from click.testing import CliRunner
    from PIL import Image

    from anomaly_service.cli import app

    rng = np.random.default_rng(11)
    dirs = {name: tmp_path / name for name in ("parts", "one", "surfaces")}
    for d in dirs.values():
        d.mkdir()
    for i in range(5):
        Image.fromarray(bracket(rng)).save(dirs["parts"] / f"p{i}.png")
    Image.fromarray(textured_part(rng)).save(dirs["one"] / "s.png")  # the parts' frame: an update leaves out others
    for i in range(6):
        Image.fromarray(textured_part(rng)).save(dirs["surfaces"] / f"s{i}.png")
    fast = ["--backbone", "efficientnet_lite0", "--image-size", "96", "--coreset-ratio", "0.25", "--device", "cpu"]
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(dirs["parts"]), "--out", str(tmp_path / "m"), "-q",
                                   "--orientation", "any", *fast])
    assert res.exit_code == 0 and "on a surface" not in res.output, res.output
    res = CliRunner().invoke(app, ["update", str(tmp_path / "m"), "--add-good", str(dirs["one"]), "-q"])
    assert res.exit_code == 0 and "on a surface" not in res.output, res.output  # 1 of 6
    res = CliRunner().invoke(app, ["update", str(tmp_path / "m"), "--add-good", str(dirs["surfaces"]), "-q"])
    assert res.exit_code == 0, res.output
    assert "warning: orientation any on a surface (7 of 12 good images run out of the frame)" in res.output


def test_a_bank_filled_exactly_by_its_copies_is_kept_when_the_rest_are_covered(monkeypatch):
    """A chunk of copies uncovering exactly the room left fills the bank; when the later chunks' copies are all
    covered nothing was left out, so the pass is kept as it is, not made again with the room spread (which would
    leave most of those uncovered patches out and the room unused)."""
    import torch

    from anomaly_service import knn_scorer
    from anomaly_service.coreset import GreedyCoresetSampler, StreamingCover
    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.patch_store import PatchStore

    rng = np.random.default_rng(0)
    d, per_image, far = 8, 40, 10
    own = torch.from_numpy(rng.normal(size=(200, d)).astype(np.float32))
    knn = KnnScorer(selector=None, sampler=GreedyCoresetSampler(0.25, progress=False), seed=0)
    knn.selected_ = np.arange(d)
    order = np.random.default_rng(knn.seed).permutation(6)

    class Extra:
        rows, factor = PatchStore(), (len(own) + far) / len(own)

        def sources(self, images, place):
            return np.concatenate([np.column_stack([np.full(per_image, p), np.zeros((per_image, 2), int)])
                                   for p in place]).astype(np.int32)

    extra = Extra()
    for i in range(6):  # the first image in the order: far-apart patches the bank leaves uncovered; the rest: its own
        grid = own[:per_image].clone()
        if i == order[0]:
            apart = 100.0 * np.eye(d, dtype=np.float32).repeat(2, 0)[:far] * (1 + np.arange(far))[:, None]
            grid[:far] = torch.from_numpy(apart.astype(np.float32))
        extra.rows.add(grid.reshape(1, per_image, d))
    monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", per_image)
    rows, _, _ = knn._with_copies(StreamingCover(own, 0.5, proj_dim=128, seed=0), extra, list(range(6)), len(own))
    assert sum(map(len, rows)) == far  # every uncovered patch of the copies is in


def test_a_turns_uncovered_corners_show_the_plain_background_or_the_surfaces_mirror_image_never_black():
    """What fills the corners a turn uncovers: a part on a plain background takes its colour there, not a mirror of
    the part (which reaches close to the edge here); a surface, which runs out of the frame, takes its own mirror
    image at any angle and shape, padded wide enough that no corner reads past it (black)."""
    part = np.full((60, 60, 3), 200, np.uint8)
    part[2:58, 2:58] = 40  # the part, a ring of two background pixels round it
    out = Turn(45.0).image(part)
    assert (out[0, 0] == 200).all() and (out[-1, -1] == 200).all() and (out[0, -1] == 200).all()
    rng = np.random.default_rng(1)
    for shape, angle in (((20, 200), 30.0), ((200, 20), 60.0), ((31, 97), 45.0), ((90, 90), 10.0)):
        surface = rng.integers(60, 200, (*shape, 3), dtype=np.uint8)
        out = Turn(angle, True).image(surface)
        assert (out.max(axis=-1) > 20).all(), (shape, angle)
        assert (Turn(angle, True).regions(np.ones(shape, np.int32), surface) == 1).all()  # a defect's mirror too


def test_each_image_calibrates_on_its_worse_pose_and_keeps_its_upright_one_otherwise():
    """The opinion each training image gives the threshold under ``orientation="any"``, without a fit: its turned
    copy's where that scored higher, its upright one where not (a tie keeps the upright)."""
    from anomaly_service.decision import KNN
    from anomaly_service.orientation import TurnedOpinion, worst_pose

    maps = [np.full((2, 2), float(i), np.float32) for i in range(6)]
    raws = [{KNN: (1.0, maps[0])}, {KNN: (2.0, maps[1])}, {KNN: (3.0, maps[2])}]
    turned = [TurnedOpinion(0, (1.5, maps[3]), (8, 8)), TurnedOpinion(1, (2.0, maps[4]), (8, 8)),
              TurnedOpinion(2, (2.5, maps[5]), (8, 8))]
    posed = worst_pose(raws, turned)
    assert [p[KNN] for p in posed] == [turned[0].raw, raws[1][KNN], raws[2][KNN]]
    assert [r[KNN][0] for r in raws] == [1.0, 2.0, 3.0]  # the upright opinions themselves are left alone


def test_an_aligned_copys_opinion_reads_its_own_pixels_only():
    """A copy turned to the grain is scored as a photo is: its fill is not inspected (NaN) and its score is the
    hottest of its own pixels, however hot the fill; without a record of its pixels, the opinion as it is."""
    from anomaly_service.orientation import own_pixels

    amap = np.array([[1.0, 9.0], [2.0, 3.0]], np.float32)
    raw = (9.0, amap)
    assert own_pixels(raw, None) is raw
    score, out = own_pixels(raw, np.array([[True, False], [True, True]]))
    assert score == 3.0 and np.isnan(out[0, 1]) and out[1, 1] == 3.0 and out[0, 0] == 1.0


def test_the_surface_warning_is_for_more_than_half_the_images_and_names_what_the_turn_cost():
    from anomaly_service.orientation import surface_warning

    assert surface_warning(0, 0) is None and surface_warning(2, 4) is None  # half: not most
    said = surface_warning(3, 4)
    assert said is not None and "(3 of 4 good images run out of the frame)" in said and "(here" not in said
    assert "grain" not in said
    said = surface_warning(3, 4, threshold=2.4, upright_threshold=2.0, aligned=True)
    assert "each photo turned to the good images' grain first" in said
    assert "(here 2.4, +20% on the 2 the upright photos alone set)" in said


def test_an_update_rescores_each_calibration_image_in_the_pose_its_score_was_taken_from():
    """The calibration set's grids after a fit under ``orientation="any"``, without a fit: an image whose turned copy
    set its score is re-scored as that copy (its grid, shape and own pixels), one whose upright pose did keeps its
    own."""
    from anomaly_service.decision import KNN
    from anomaly_service.orientation import TurnedOpinion, posed_grids

    maps = [np.zeros((2, 2), np.float32) for _ in range(4)]
    turned = [TurnedOpinion(0, (5.0, maps[0]), (9, 9)), TurnedOpinion(2, (1.0, maps[1]), (10, 10))]
    posed = [{KNN: turned[0].raw}, {KNN: (2.0, maps[2])}, {KNN: (3.0, maps[3])}]  # image 2 kept its upright pose
    grids = [np.zeros((4, 4, 3)), np.ones((4, 4, 3))]
    turned_grid = {0: np.full((5, 5, 3), 7.0), 2: np.full((5, 5, 3), 9.0)}.__getitem__
    real = np.ones((9, 9), bool)
    out, shapes, reals = posed_grids([0, 2], grids, [(8, 8), (8, 8)], turned, posed, turned_grid, lambda i: real)
    assert out[0] is turned_grid(0) and out[1] is grids[1] and shapes == [(9, 9), (8, 8)]
    assert reals[0] is real and reals[1] is None
    assert posed_grids([0, 2], grids, [(8, 8), (8, 8)], turned, posed, turned_grid)[2] == [None, None]


# ------------------------------------------------------------------ independent references (mutation pass, session 68)
def _box_inside(angle: float, shape: tuple[int, int], box: tuple[int, int, int, int], margin: float) -> bool:
    """Whether the upright ``box`` (top, left, height, width) of the canvas, grown by ``margin`` pixels each side,
    lies inside the photo of ``shape`` turned by ``angle`` degrees counter-clockwise on screen about the canvas's
    centre: its corners turned back land inside the photo (the turned photo is convex)."""
    import itertools
    import math

    h, w = shape
    oh, ow = Turn(angle).out_shape(shape)
    top, left, bh, bw = box
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for y, x in itertools.product((top - margin, top + bh + margin), (left - margin, left + bw + margin)):
        dx, dy = x - ow / 2, y - oh / 2
        sx, sy = dx * c - dy * s, dx * s + dy * c  # the screen turn undone (y down)
        if abs(sx) > w / 2 + 1e-9 or abs(sy) > h / 2 + 1e-9:
            return False
    return True


def _largest_centred_box(angle: float, shape: tuple[int, int], margin: float) -> int:
    """Brute force: the largest area of an upright box centred as inscribed_box centres it, clear of the turned
    photo's edge by ``margin`` pixels each side, over every height and width."""
    oh, ow = Turn(angle).out_shape(shape)
    best = 0
    for bh in range(1, oh + 1):
        for bw in range(ow, 0, -1):
            if _box_inside(angle, shape, ((oh - bh) // 2, (ow - bw) // 2, bh, bw), margin):
                best = max(best, bh * bw)
                break
    return best


def test_the_cut_is_the_largest_upright_rectangle_of_real_pixels_by_brute_force():
    """inscribed_box against a search over every centred rectangle of small turned photos: it lies inside the
    turned photo (at least half a pixel clear of its edge: the bicubic turn blurs the edge pixels) and holds at
    least as much as the best rectangle two pixels clear each side, so it gives up no more than its border."""
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 20:
        angle = float(rng.uniform(-360, 360))
        shape = (int(rng.integers(16, 48)), int(rng.integers(16, 48)))
        if Turn(angle).is_quarter:
            continue
        box = Turn(angle).inscribed_box(shape)
        assert min(box[2:]) > 0, (angle, shape, box)
        oh, ow = Turn(angle).out_shape(shape)
        assert box[:2] == ((oh - box[2]) // 2, (ow - box[3]) // 2)
        assert _box_inside(angle, shape, box, 0.5), (angle, shape, box)
        assert box[2] * box[3] >= _largest_centred_box(angle, shape, 2.0), (angle, shape, box)
        checked += 1


def test_a_quarter_turns_copy_cells_are_the_source_pixels_np_rot90_moves_there():
    """With one cell a pixel, a quarter turn's copy cells against np.rot90's own index map: the whole canvas by
    default, and a cut read from its corner."""
    from anomaly_service.orientation import source_cells

    h, w = 6, 9
    index = np.arange(h * w).reshape(h, w)
    for turn in (Turn(90.0), Turn(270.0, True), Turn(180.0)):
        moved = turn._quarter(index)
        cells = source_cells(turn, moved.shape, (h, w), (h, w))
        np.testing.assert_array_equal(cells[:, 0] * w + cells[:, 1], moved.ravel())
        cut = source_cells(turn, (2, 3), (h, w), (h, w), box=(1, 2, 2, 3))
        np.testing.assert_array_equal(cut[:, 0] * w + cut[:, 1], moved[1:3, 2:5].ravel())


def test_a_whole_canvas_names_points_by_the_turn_alone_unless_mirrored():
    """cut_to_source's defaults: the whole canvas (no offset) and no mirror, so a corner the turn uncovered names a
    place past the photo's edge; mirrored, the photo pixel its mirror image shows."""
    turn, shape = Turn(30.0), (40, 60)
    oh, ow = turn.out_shape(shape)
    xy = np.array([[0.5, 0.5], [ow / 2, oh / 2], [ow - 0.5, oh - 0.5]])
    np.testing.assert_allclose(turn.cut_to_source(shape)(xy), turn.to_source(xy, shape))
    np.testing.assert_allclose(turn.from_source(np.array([[30.0, 20.0]]), shape), [[ow / 2, oh / 2]])
    outside = turn.cut_to_source(shape)(xy[:1])[0]
    assert not (0 <= outside[0] <= 60 and 0 <= outside[1] <= 40)
    folded = turn.cut_to_source(shape, mirrored=True)(xy[:1])[0]
    assert 0 <= folded[0] <= 60 and 0 <= folded[1] <= 40


def test_a_cut_is_kept_down_to_the_larger_of_the_two_least_sides():
    """Turn.copy_of cuts a surface when its box's shorter side reaches both MIN_CUT_SIDE and the caller's least
    side, and keeps the whole canvas one pixel under either."""
    from anomaly_service.orientation import MIN_CUT_SIDE

    rng = np.random.default_rng(0)
    for side in (64, 160):
        surface = textured_part(rng, side, side)
        turn = Turn(20.0)
        short = min(turn.inscribed_box(surface.shape)[2:])
        for least, cut in ((short, short >= MIN_CUT_SIDE), (short + 1, False), (1, short >= MIN_CUT_SIDE)):
            _, box = turn.copy_of(surface, "cut", least)
            assert (box is not None) == cut, (side, short, least)
    small = textured_part(rng, 40, 40)
    assert min(Turn(20.0).inscribed_box(small.shape)[2:]) < MIN_CUT_SIDE
    assert Turn(20.0).copy_of(small, "cut", 1)[1] is None


def test_a_plain_background_is_told_by_the_outermost_ring_at_its_share_and_tolerance():
    """plain_background reads the four outermost lines (the last row and column too, not the ones inside them): a
    ring 90% within 12 grey levels of its median is plain, 87.5% or 13 levels off is not."""
    from anomaly_service.orientation import PLAIN_TOLERANCE, plain_background

    def framed(off: int, level: int = 40) -> np.ndarray:
        image = np.full((10, 10, 3), 100, np.uint8)
        image[0, 1 : 1 + off] = 100 + level  # ``off`` of the ring's 40 pixels (no corner, counted twice) apart
        return image

    np.testing.assert_array_equal(plain_background(framed(4)), [100, 100, 100])
    assert plain_background(framed(5)) is None
    assert plain_background(framed(8, PLAIN_TOLERANCE)) is not None
    assert plain_background(framed(8, PLAIN_TOLERANCE + 1)) is None
    for line in (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1]):  # each outermost line alone: 12 of 40 apart
        image = np.full((10, 10, 3), 100, np.uint8)
        image[line] = 0
        assert plain_background(image) is None, line


def test_a_plain_backgrounds_turned_regions_stay_on_the_photo():
    """A defect touching the frame of a part on a plain background turns with the photo: no labelled canvas pixel
    lies past the photo's edge (the uncovered corners show the background, no defect)."""
    rng = np.random.default_rng(1)
    image = bracket(rng)
    labels = np.ones(image.shape[:2], np.int32)
    for turn in (Turn(30.0), Turn(-65.0, True)):
        turned = turn.regions(labels, image)
        yy, xx = np.nonzero(turned)
        at = turn.to_source(np.stack([xx + 0.5, yy + 0.5], axis=1), image.shape)
        assert (at >= -1e-6).all() and (at[:, 0] <= image.shape[1] + 1e-6).all() and (
            at[:, 1] <= image.shape[0] + 1e-6).all()


def test_the_cells_a_canvas_gives_rows_from_are_those_touching_the_photo():
    """row_cells against a count written here: with no alignment every cell; with an aligned canvas, the cells
    whose pixel span holds a pixel of the photo (those scoring searches), and every such cell."""
    import math

    from anomaly_service.grain import GrainAlignment, real_pixels
    from anomaly_service.orientation import row_cells

    np.testing.assert_array_equal(row_cells(None, None, (3, 4)), np.arange(12))
    real = real_pixels(Turn(35.0), (30, 50))[0]
    alignment = GrainAlignment(0.0, 0.0, 1.0, fill_copied=True)
    for grid in ((6, 8), (5, 7)):
        h, w = real.shape
        want = [r * grid[1] + c for r in range(grid[0]) for c in range(grid[1])
                if real[int(math.floor(r * h / grid[0])) : int(math.ceil((r + 1) * h / grid[0])),
                        int(math.floor(c * w / grid[1])) : int(math.ceil((c + 1) * w / grid[1]))].any()]
        assert 0 < len(want) < grid[0] * grid[1]
        np.testing.assert_array_equal(row_cells(alignment, real, grid), want)
        assert len(row_cells(dataclasses.replace(alignment, fill_copied=False), real, grid)) == grid[0] * grid[1]


def test_the_surface_warning_names_the_turns_cost_only_when_both_thresholds_are_known():
    from anomaly_service.orientation import surface_warning

    assert "(here" not in surface_warning(8, 10, threshold=None, upright_threshold=2.0)
    assert "(here" not in surface_warning(8, 10, threshold=3.0, upright_threshold=None)
    assert "(here" not in surface_warning(8, 10, threshold=3.0, upright_threshold=0.0)
    assert "(here 3, +50% on the 2 the upright" in surface_warning(8, 10, threshold=3.0, upright_threshold=2.0)


def test_copies_are_turned_by_any_angle_and_mirrored_half_of_the_time():
    from anomaly_service.orientation import random_turns

    turns = random_turns(400, np.random.default_rng(0))
    flipped = sum(t.flip for t in turns)
    assert 160 < flipped < 240
    angles = np.array([t.angle for t in turns])
    assert angles.min() >= 0 and angles.max() < 360
    assert np.histogram(angles, bins=4, range=(0, 360))[0].min() > 70  # every quarter of the circle
