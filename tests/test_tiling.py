"""Tiled scoring (--tile): small defects on large photos, on synthetic parts generated here (no real data)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_service import AnomalyModel
from anomaly_service.config import ModelConfig
from anomaly_service.errors import ConfigError
from anomaly_service.evidence import TrainingEvidence
from anomaly_service.index import search
from anomaly_service.regions import find_regions
from anomaly_service.tiling import OVERLAP, layout

from conftest import add_defect, textured_part

SIDE = 320  # the "large photo": 2.5 tiles of 128 px a side
TILED = dict(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.05, progress=False)
DEFECT = (150, 170, 4)  # a 8x3 px scratch: 3x1 px when the whole frame is shrunk to 128 px


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [textured_part(rng, SIDE, SIDE) for _ in range(6)]


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return textured_part(np.random.default_rng(99), SIDE, SIDE)


@pytest.fixture(scope="module")
def scratched(clean) -> np.ndarray:
    return add_defect(clean, *DEFECT[:2], radius=DEFECT[2])[0]


@pytest.fixture(scope="module")
def tiled(goods) -> AnomalyModel:
    return AnomalyModel(tile=128, **TILED).fit(goods)


@pytest.fixture(scope="module")
def whole(goods) -> AnomalyModel:
    return AnomalyModel(**TILED).fit(goods)


# ---------------------------------------------------------------------------------------------- the layout
def test_tiles_cover_the_image_at_one_zoom_with_overlap_on_the_stride():
    lay = layout((2048, 2448), tile=512, image_size=256, stride=16)
    assert lay.work_size == (1024, 1216)  # the whole photo at zoom 256/512, sides on the stride
    assert lay.tile_size == (256, 256)  # every tile as the network sees it: the working size
    covered = np.zeros(lay.work_size, bool)
    for rows, cols in lay.crops():
        assert rows.stop <= lay.work_size[0] and cols.stop <= lay.work_size[1]
        covered[rows, cols] = True
    assert covered.all()
    assert (lay.origins % 16 == 0).all()
    for axis in (0, 1):
        starts = np.unique(lay.origins[:, axis])
        assert (np.diff(starts) <= 256 * (1 - OVERLAP)).all()  # neighbours overlap by at least OVERLAP
    # a side shorter than a tile is one tile of that side, at the same zoom
    small = layout((300, 2000), tile=512, image_size=256, stride=16)
    assert small.tile_size == (144, 256) and small.work_size[0] == 144
    # each tile is a network pass: the fewest a side that overlap by OVERLAP (768 and 960 px beyond the first tile,
    # in steps of at most 192), not one more
    assert [len(np.unique(lay.origins[:, axis])) for axis in (0, 1)] == [5, 6] and lay.n_tiles == 30
    # a side thinner than two strides at the tile zoom is kept at two, the least the network reads
    thin = layout((10, 2000), tile=512, image_size=256, stride=16)
    assert thin.work_size[0] == thin.tile_size[0] == 32


def test_stitching_a_constant_gives_the_constant_and_pick_takes_the_most_central_tile():
    lay = layout((640, 640), tile=256, image_size=128, stride=16)
    t, (h, w) = lay.n_tiles, lay.tile_grid
    assert np.allclose(lay.stitch(np.full((t, h, w), 3.0, np.float32)), 3.0)
    owner = lay.pick(np.broadcast_to(np.arange(t, dtype=np.int64)[:, None, None], (t, h, w)).copy())
    cells = lay.cells()
    for k in range(t):  # each cell belongs to the tile whose centre is nearest (ties aside)
        centre = cells[k, h // 2, w // 2]
        assert owner[centre[0], centre[1]] == k
    # a tile's border cells (the ones zero padding disturbs) barely move a cell another tile sees centrally
    values = np.ones((t, h, w), np.float32)
    values[:, 0, :] = values[:, -1, :] = values[:, :, 0] = values[:, :, -1] = 5.0
    stitched = lay.stitch(values)
    inner = stitched[1:-1, 1:-1]  # the image's own border has no other tile
    assert inner.max() < 1.5
    # every cell, in the overlaps too, takes its value from a tile that sees it most centrally (the evidence's bank
    # row of a cell two tiles see comes from the one whose padding disturbs it least), not the last tile over it
    weights, best, owned = lay.weights(), np.zeros(lay.grid), np.zeros(lay.grid)
    for k in range(t):
        rows, cols = cells[k, ..., 0], cells[k, ..., 1]
        best[rows, cols] = np.maximum(best[rows, cols], weights[k])
        mine = owner[rows, cols] == k
        owned[rows[mine], cols[mine]] = weights[k][mine]
    np.testing.assert_array_equal(owned, best)


# ---------------------------------------------------------------------------------------------- behaviour
def test_a_small_defect_on_a_large_image_is_found_with_tiles_and_missed_without(tiled, whole, clean, scratched):
    with_tiles, without = tiled.score(scratched), whole.score(scratched)
    assert with_tiles.is_anomaly and with_tiles.normalized_score > 2.0
    assert without.normalized_score < with_tiles.normalized_score / 3
    assert not tiled.score(clean).is_anomaly
    # and it is found where it is: the hottest pixel of the stitched map is on the scratch
    y, x = np.unravel_index(np.argmax(with_tiles.anomaly_map), with_tiles.anomaly_map.shape)
    assert abs(y - DEFECT[0]) <= 12 and abs(x - DEFECT[1]) <= 12
    assert with_tiles.anomaly_map.shape == scratched.shape[:2]


def test_stitching_leaves_no_seam_on_a_clean_image(tiled, clean):
    result = tiled.score(clean)
    grid = result.matches.distance  # the stitched patch scores, one cell per 8 working px
    lay = tiled.embedder.layout(clean.shape)
    assert grid.shape == lay.grid
    borders = set()
    for k in np.unique(lay.origins[:, 1]) // lay.cell:
        borders |= {int(k), int(k) + lay.tile_grid[1] - 1}
    seams = sorted(c for c in borders if 0 < c < grid.shape[1] - 1)  # tile borders inside the image
    assert seams
    rest = [c for c in range(1, grid.shape[1] - 1) if c not in seams]
    assert grid[:, seams].mean() <= grid[:, rest].mean() * 1.05
    # the smoothed map, too: columns over tile borders are not hotter than the others
    cols = result.anomaly_map.mean(axis=0)
    px = [int((c + 0.5) * SIDE / grid.shape[1]) for c in seams]
    assert cols[px].max() <= np.percentile(cols, 95)


def test_every_tile_of_every_image_is_in_the_bank_sources_and_the_catalog_keeps_the_stitched_grid(tiled, goods):
    lay = tiled.embedder.layout(goods[0].shape)
    assert tiled.knn.stats_["from_patches"] == len(goods) * lay.n_tiles * lay.tile_grid[0] * lay.tile_grid[1]
    sources = tiled.knn.provenance_
    assert set(np.unique(sources[:, 0])) <= set(range(len(goods)))
    assert (sources[:, 1] < lay.grid[0]).all() and (sources[:, 2] < lay.grid[1]).all()
    assert tiled.catalog_.grids == [lay.grid] * len(goods)


def test_leave_one_out_leaves_all_of_an_images_tiles_out(tiled, goods):
    """Image 0's tiles scored against the bank without any row from image 0 give what an exact search over the
    other images' rows gives, stitched the same way; and more than its score with its own tiles in the bank."""
    import faiss

    from anomaly_service.timing import StageTimer

    knn = tiled.knn
    emb = tiled.embedder.embed([goods[0]], keep=knn.keep)
    n_tiles, h, w, d = emb.features.shape
    assert n_tiles > 1 and emb.rows() == [n_tiles * h * w]
    left_out = knn.score_left_out(emb, [0])[0]
    others = knn.bank()[knn.provenance_[:, 0] != 0]
    sub = faiss.IndexFlatL2(d)
    sub.add(np.ascontiguousarray(others))
    dist, _ = search(sub, emb.features.reshape(-1, d).float().numpy(), knn.k)
    expected_score, expected_map = knn._image_result(emb.image_grids(dist.mean(1))[0], emb, 0)
    assert left_out[0] == pytest.approx(expected_score, rel=1e-4)
    assert np.allclose(left_out[1], expected_map, rtol=1e-4, atol=1e-4)
    assert left_out[0] > knn.score(emb, StageTimer())[0][0]
    # with folds, every image of image 0's fold leaves with it
    by_fold = knn.score_left_out(emb, [0], folds=np.array([0, 0, 1, 1, 2, 2]))[0]
    assert by_fold[0] >= left_out[0] - 1e-5


def test_the_fit_calibrates_on_left_out_scores_and_keeps_tiled_grids_for_updates(tiled, goods):
    from anomaly_service.calibration_set import CalibrationSet

    m = tiled.manifest_
    assert m.training.calibration == "leave-one-out" and m.calibration.n_images >= len(goods) - 1
    lay = tiled.embedder.layout(goods[0].shape)
    grid, shape = CalibrationSet.of(tiled).grids[0]
    assert grid.shape[:3] == (lay.n_tiles, *lay.tile_grid) and shape[:2] == (SIDE, SIDE)


def test_save_and_load_keep_the_tile_setting(tiled, scratched, tmp_path):
    before = tiled.score(scratched)
    tiled.save(tmp_path / "m")
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert loaded.config.tile == 128 and loaded.embedder.tile == 128
    assert loaded.manifest_.config["tile"] == 128
    recorded = loaded.manifest_.preprocessing.model_dump()["tile"]
    assert recorded["size"] == 128 and recorded["zoom"] == 1.0 and recorded["overlap"] == OVERLAP
    after = loaded.score(scratched)
    assert after.is_anomaly and after.normalized_score == pytest.approx(before.normalized_score, rel=1e-3)
    assert np.allclose(after.anomaly_map, before.anomaly_map, rtol=1e-3, atol=1e-3)


def test_a_model_without_tiles_writes_no_tile_and_loads_untiled(whole, tmp_path):
    assert "tile" not in whole.manifest_.config and "tile" not in whole.manifest_.preprocessing.model_dump()
    whole.save(tmp_path / "m")
    assert AnomalyModel.load(tmp_path / "m", device="cpu").config.tile is None


def test_the_evidence_box_is_in_the_training_images_pixels(tiled, scratched):
    result = tiled.score(scratched)
    regions = find_regions(result.normalized_map())
    assert regions
    evidence = TrainingEvidence.of(tiled)
    near = evidence.nearest_normal(result.matches, regions[0], *scratched.shape[:2])
    assert near is not None
    assert (near.image_width, near.image_height) == (SIDE, SIDE)
    b = near.box
    assert 0 <= b.x < b.x + b.width <= SIDE and 0 <= b.y < b.y + b.height <= SIDE
    assert b.width == b.height == SIDE // tiled.embedder.layout(scratched.shape).grid[0]  # one cell at zoom 1
    p = near.patch
    assert abs(p.y - DEFECT[0]) <= 16 and abs(p.x - DEFECT[1]) <= 16


def test_the_inspection_mask_follows_the_tiles(goods, clean, tmp_path):
    from PIL import Image

    pixels = np.zeros((SIDE, SIDE), np.uint8)
    pixels[:, : SIDE // 2] = 255  # the left half inspected
    Image.fromarray(pixels).save(tmp_path / "left.png")
    model = AnomalyModel(tile=128, mask=str(tmp_path / "left.png"), **TILED).fit(goods)
    outside = model.score(add_defect(clean, 150, 250, radius=6)[0])
    inside = model.score(add_defect(clean, 150, 70, radius=6)[0])
    assert inside.is_anomaly and not outside.is_anomaly
    right = outside.normalized_map()[:, SIDE // 2 + 8 :]  # not inspected: one typical level, below the threshold
    assert right.max() < 1.0 and np.ptp(right) == 0


def test_a_small_mask_is_measured_against_the_cell_tiles_see(goods, clean, tmp_path):
    """Tiles see a photo at their own zoom, where a feature cell covers fewer source pixels than in the whole frame
    shrunk to the working size: a small inspected area that holds cells of the tiles' grid is scored there, and was
    refused as 'less than one feature cell' measured at the untiled zoom (20x20 px here, the tiles' 8x8)."""
    from PIL import Image

    pixels = np.zeros((SIDE, SIDE), np.uint8)
    pixels[144:160, 144:160] = 255  # 16x16 px: four cells of the tiles' grid, under one of the whole frame's
    Image.fromarray(pixels).save(tmp_path / "spot.png")
    with pytest.raises(ConfigError, match="less than one feature cell"):
        AnomalyModel(mask=str(tmp_path / "spot.png"), **TILED).fit(goods[:2])
    model = AnomalyModel(tile=128, mask=str(tmp_path / "spot.png"), **TILED).fit(goods)
    assert model.score(add_defect(clean, 152, 152, radius=4)[0]).is_anomaly
    assert not model.score(add_defect(clean, 150, 250, radius=6)[0]).is_anomaly


def test_tile_is_one_option_of_the_table_and_refuses_the_autoencoder():
    from anomaly_service.options import MODEL_OPTIONS

    assert "tile" in MODEL_OPTIONS and ModelConfig().tile is None
    with pytest.raises(ConfigError, match="tile"):
        ModelConfig(tile=8).validate()
    with pytest.raises(ConfigError, match="autoencoder"):
        ModelConfig(tile=256, autoencoder="features").validate()
    # a plant trial: --resize longer-side was accepted with --tile and had no effect; a model saved so still loads
    with pytest.raises(ConfigError, match="longer-side would have no effect"):
        ModelConfig(tile=256, resize="longer-side").validate()
    ModelConfig(tile=256, resize="longer-side").validate(loading=True)


def test_a_tile_larger_than_every_training_photo_is_refused_before_any_work(goods, caplog):
    """Each photo would be one tile, shrunk more than without tiling, and small defects vanish: refused with the
    fix, before the backbone sees an image. A tile under the working size is allowed, with a warning of its cost."""
    with pytest.raises(ConfigError, match=f"larger than every training photo .*longest side is {SIDE} px"):
        AnomalyModel(tile=SIDE + 1, **TILED).fit(goods)
    from anomaly_service.tiling import check_tile

    with caplog.at_level("WARNING"):
        check_tile(64, 128, 16, [(100, 100), (SIDE, SIDE)])
        assert "enlarged 2.0x and cut into up to 49 tiles each" in caplog.text  # the larger photo's count
        caplog.clear()
        check_tile(128, 128, 16, [(SIDE, SIDE)])  # a tile of the working size enlarges nothing
    assert caplog.text == ""
    # the longest side of any photo, portrait or landscape, of a line with several sizes; a tile of exactly it is one
    # tile shrunk as the untiled path shrinks it: allowed
    shapes = [(300, 100), (120, 250)]
    check_tile(300, 128, 16, shapes)
    with pytest.raises(ConfigError, match=r"longest side is 300 px\): each photo would be one tile seen at 0\.43x.*"
                                          r"set it between 128 and 300"):
        check_tile(301, 128, 16, shapes)
    for image_size in (512, 300):  # a longest side of the working size is no larger than it
        with pytest.raises(ConfigError, match=rf"no larger than the working size \(--image-size {image_size}\)"):
            check_tile(400, image_size, 16, shapes)


def test_a_photo_at_another_resolution_is_told_a_re_fit_the_fit_accepts(tiled):
    """The scale warning named --resize longer-side as a way out, which a tiled fit refuses: it now names the tile
    that covers as much of the part at the photo's resolution (twice the sides, twice the tile)."""
    warning = next(w for w in tiled.unlike_fit(np.zeros((2 * SIDE, 2 * SIDE, 3), np.uint8)) if "longer side" in w)
    assert "--resize longer-side" not in warning and "--tile about 256" in warning
    with pytest.raises(ConfigError, match="longer-side would have no effect"):
        ModelConfig(tile=128, resize="longer-side").validate()


def test_an_update_adds_a_tiled_image(tiled, clean):
    new = tiled.update([clean], names=["extra.png"])
    lay = tiled.embedder.layout(clean.shape)
    assert len(new.catalog_) == len(tiled.catalog_) + 1 and new.catalog_.grids[-1] == lay.grid
    added = new.knn.provenance_[tiled.knn.bank_size :]
    assert (added[:, 0] == len(tiled.catalog_)).all()
    assert not new.score(clean).is_anomaly


def _served_and_watched(model: AnomalyModel, tmp_path, monkeypatch) -> tuple:
    """``model`` loaded by a service (recording off), with what its warm-up scores and what its backbone is given
    noted: ``(service, loaded, scored shapes, backbone input shapes)``."""
    from anomaly_service.api.lifecycle import Service
    from anomaly_service.settings import ServiceSettings

    model.save(tmp_path / "models" / "tiled")
    service = Service(ServiceSettings(model_dir=str(tmp_path / "models"), record=False))
    loaded = service.registry.load("tiled").model
    scored, passes = [], []
    score, extract = loaded.score, loaded.embedder._extract

    def noted_score(image):
        scored.append(image.shape[:2])
        return score(image)

    def noted_extract(x):
        passes.append(tuple(x.shape))
        return extract(x)

    monkeypatch.setattr(loaded, "score", noted_score)
    monkeypatch.setattr(loaded.embedder, "_extract", noted_extract)
    return service, loaded, scored, passes


def test_a_tiled_model_is_warmed_with_a_whole_backbone_pass_of_tiles(tiled, tmp_path, monkeypatch):
    """Warmed with one tile (a blank of the working size, at a tile of that size), a tiled model's first photo of a
    full pass grew the runtime's buffers to that pass after the pixel budget had read the memory left, and beyond
    the photo's count: at --image-size 256 --tile 256 a 768 px photo's first send rose 225 MiB against a count of
    169 on Lite0 (13 MiB the second time). The warm-up now gives the backbone a whole pass of tiles."""
    service, model, _, passes = _served_and_watched(tiled, tmp_path, monkeypatch)
    service._warm(["tiled"])
    size = model.embedder.layout((SIDE, SIDE)).tile_size
    assert (model.embedder.per_pass(size), 3, *size) in passes and model.embedder.per_pass(size) > 1


def test_a_large_tile_is_warmed_at_the_working_scale_not_with_a_photo_of_the_sources(tmp_path, monkeypatch):
    """The pass of tiles was a blank photo a tile tall and a pass of tiles wide in the source's scale: at --tile 2048
    --image-size 256, 2048 x 16384 pixels made, resized and mapped at every load (a peak of 537 MiB and a second on
    Lite0) to grow buffers that depend only on the tiles as the network is given them. The tiles are now made at
    the working scale: the backbone still gets a whole pass of them, and nothing larger than the working size is
    scored."""
    photos = [textured_part(np.random.default_rng(i), 640, 640) for i in range(4)]
    large = AnomalyModel(tile=512, **TILED).fit(photos)  # each tile shrunk fourfold, as 1024 px at 256
    service, model, scored, passes = _served_and_watched(large, tmp_path, monkeypatch)
    service._warm(["tiled"])
    size = model.embedder.layout((512, 512)).tile_size
    assert size == (128, 128) and (model.embedder.per_pass(size), 3, *size) in passes
    assert scored and max(h * w for h, w in scored) <= 128 * 128