import numpy as np
import pytest

from anomaly_service import AnomalyModel, ConfigError, NotFittedError
from conftest import add_defect, textured_part


def test_defect_scores_above_threshold_and_map_peaks_on_it(fitted_model):
    rng = np.random.default_rng(42)
    normals = [fitted_model.score(textured_part(rng)) for _ in range(4)]
    img, mask = add_defect(textured_part(rng), 40, 90)
    res = fitted_model.score(img)
    assert res.is_anomaly and res.normalized_score > 1.0
    assert res.score > max(r.score for r in normals)
    assert sum(r.is_anomaly for r in normals) <= 1
    assert res.anomaly_map.shape == (128, 128)
    peak = np.unravel_index(np.argmax(res.anomaly_map), res.anomaly_map.shape)
    assert mask[max(peak[0] - 8, 0) : peak[0] + 8, max(peak[1] - 8, 0) : peak[1] + 8].any()
    # one global scale: a normal image stays below 1 nearly everywhere, the defect exceeds it
    assert np.quantile(normals[0].normalized_map(), 0.99) < 1.0
    assert res.normalized_map()[mask].max() > 1.0


def test_defect_at_the_border_is_seen(fitted_model):
    """No centre crop: a defect touching the image edge must still be in the map."""
    img, mask = add_defect(textured_part(np.random.default_rng(7)), 64, 3, radius=12)
    res = fitted_model.score(img)
    assert res.is_anomaly
    assert res.anomaly_map[:, :12].max() > res.threshold * 0.8


def test_non_square_and_grayscale_inputs(fitted_model):
    rng = np.random.default_rng(3)
    tall = textured_part(rng, 200, 80)
    res = fitted_model.score(tall[:, :, 0])  # grayscale 2-D array
    assert res.anomaly_map.shape == (200, 80) and (res.image_width, res.image_height) == (80, 200)


def test_score_many_keeps_input_order_across_size_groups(fitted_model):
    rng = np.random.default_rng(5)
    imgs = [textured_part(rng, 128, 128), textured_part(rng, 96, 160), textured_part(rng, 128, 128)]
    batched = [r.score for r in fitted_model.score_many(imgs)]
    single = [fitted_model.score(im).score for im in imgs]
    np.testing.assert_allclose(batched, single, rtol=1e-4)



def test_a_batch_of_large_working_sizes_holds_fewer_images():
    """Eight photos of a camera's 4 MP at --image-size 2048 went through the backbone at once and ran the fit out of
    memory (ONNX Runtime's arena refused under a 10 GB cap; without one the kernel's OOM killer ends it): a batch
    holds eight photos of the default working size's pixels, fewer of larger ones, one at least."""
    def batches(image_size: int, n: int) -> list[list[int]]:
        model = AnomalyModel(backbone="efficientnet_lite0", image_size=image_size, progress=False)
        return list(model.embedder.groups_by_shape([(300, 300, 3)] * n))  # worked at image_size square

    assert batches(256, 10) == [list(range(8)), [8, 9]]
    assert batches(512, 5) == [[0, 1], [2, 3], [4]]
    assert batches(2048, 3) == [[0], [1], [2]]


def test_tiles_of_a_large_working_size_go_fewer_to_a_backbone_pass():
    """A tile is --image-size pixels square, and tiles went through the backbone --batch-size at a time whatever
    that size (docs/decisions.md, "Adversarial review of session 58's features"). Tiles count as photos do: two
    512 px tiles a pass, and a group of images holds four passes' tiles (one image at least)."""
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=512, tile=512, progress=False)
    embedder = model.embedder
    assert embedder.layout((1024, 1024, 3)).n_tiles == 9
    assert list(embedder.groups_by_shape([(1024, 1024, 3)] * 3)) == [[0], [1], [2]]
    passes: list[int] = []
    extract = embedder._extract
    embedder._extract = lambda x: (passes.append(int(x.shape[0])), extract(x))[1]  # the real backbone, counted
    assert embedder.embed([textured_part(np.random.default_rng(0), 1024, 1024)]).features.shape[0] == 9
    assert passes == [2, 2, 2, 2, 1] and embedder.per_pass((512, 512)) == 2


def test_save_load_roundtrip_identical_scores(fitted_model, tmp_path):
    img, _ = add_defect(textured_part(np.random.default_rng(9)), 60, 60)
    path = fitted_model.save(tmp_path / "m")
    loaded = AnomalyModel.load(path, device="cpu")
    a, b = fitted_model.score(img), loaded.score(img)
    assert a.score == pytest.approx(b.score, rel=1e-6)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5)
    assert loaded.calibration_.threshold == fitted_model.calibration_.threshold
    assert loaded.manifest_.training == fitted_model.manifest_.training


def test_manifest_is_self_describing(fitted_model):
    m = fitted_model.manifest_
    assert m.backbone.name == "efficientnet_lite0" and len(m.backbone.weights_sha256) == 64
    assert m.selection.n_selected == len(fitted_model.selected_indices_) == 76
    assert m.coreset.size == fitted_model.index_.ntotal
    assert m.training.n_images + m.training.n_calibration_images == 14
    assert len(m.training.images_sha256) == 64 and "torch" in m.library_versions
    assert m.fit_config() == fitted_model.config


def test_unfitted_and_bad_config():
    with pytest.raises(NotFittedError):
        AnomalyModel(backbone="efficientnet_lite0").score(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ConfigError):
        AnomalyModel(coreset_ratio=0)
    with pytest.raises(ConfigError, match="backbone must be one of"):
        AnomalyModel(backbone="vgg")


def test_fit_skips_unreadable_and_needs_two_images(rng_images):
    m = AnomalyModel(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    m.fit(list(rng_images[:4]) + [b"not an image"])
    assert m.manifest_.training.n_skipped == 1
    with pytest.raises(ConfigError, match="at least 2"):
        AnomalyModel(backbone="efficientnet_lite0", progress=False).fit([rng_images[0], b"junk"])


def test_the_image_count_of_a_fit_is_of_images_that_decode(rng_images, caplog):
    """A truncated JPEG's header reads but its pixels do not: it is skipped and not counted."""
    from conftest import png_bytes

    jpeg = png_bytes(rng_images[0], format="JPEG", quality=90)
    truncated = jpeg[: len(jpeg) // 2]
    params = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match=r"at least 2 readable .* got 0 \(2 unreadable image\(s\) skipped\)"):
        AnomalyModel(**params).fit([truncated, b"not an image"], names=["cut.jpg", "junk.png"])
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped:")]
    assert any("cut.jpg" in m and "truncated" in m for m in skipped) and any("junk.png" in m for m in skipped)
    with pytest.raises(ConfigError, match=r"got 1 \(1 unreadable image\(s\) skipped\)"):
        AnomalyModel(**params).fit([truncated, rng_images[1]], names=["cut.jpg", "a"])


def test_same_seed_same_bank_and_k_averages_neighbours(rng_images):
    """A fit is reproducible: the same images and seed give the same memory bank and the same threshold."""
    params = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    a = AnomalyModel(**params).fit(rng_images[:6])
    b = AnomalyModel(**params).fit(rng_images[:6])
    bank = lambda m: m.index_.reconstruct_n(0, m.index_.ntotal)  # noqa: E731
    np.testing.assert_array_equal(bank(a), bank(b))
    assert a.calibration_ == b.calibration_
    # k=3 averages the three nearest distances, so a patch scores at least its nearest distance
    k3 = AnomalyModel(k=3, image_score="max", **params).fit(rng_images[:6])
    k1 = AnomalyModel(image_score="max", **params).fit(rng_images[:6])
    probe = add_defect(textured_part(np.random.default_rng(2)), 60, 60)[0]
    assert k3.score(probe).score > k1.score(probe).score


def test_k_above_the_bank_size_is_a_clear_error(rng_images):
    """More neighbours than the bank holds would average FAISS's padding: the fit says so instead of a traceback."""
    params = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match=r"--k 100000 is more than the \d+ patches of the memory bank"):
        AnomalyModel(k=100000, **params).fit(rng_images[:4])


def test_big_line_path_caps_the_bank_and_compresses_the_index(fitted_model, rng_images, tmp_path):
    """The documented path for normal sets too large for an exact bank: --coreset-max + --index ivfpq."""
    exact = fitted_model
    big = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.5, coreset_max=600,
                       index="ivfpq", nprobe=16, progress=False, calibration_fraction=0.25).fit(rng_images)
    assert big.index_.ntotal == 600 < exact.index_.ntotal
    assert big.manifest_.index.kind == "ivfpq"
    big.save(tmp_path / "big")
    exact.save(tmp_path / "exact")
    size = lambda p: (p / "index.faiss").stat().st_size  # noqa: E731
    assert size(tmp_path / "big") < size(tmp_path / "exact")
    import faiss

    code_bytes = faiss.extract_index_ivf(big.index_).code_size
    assert code_bytes * 16 <= big.index_.d * 4  # compressed codes, not float vectors
    loaded = AnomalyModel.load(tmp_path / "big")
    rng = np.random.default_rng(11)
    bad = add_defect(textured_part(rng), 60, 60)[0]
    good = textured_part(rng)
    b, g = loaded.score(bad), loaded.score(good)
    assert b.is_anomaly and b.normalized_score > 5 * g.normalized_score  # approximate search still separates
    assert b.score == pytest.approx(big.score(bad).score, rel=1e-5)


def test_map_max_image_score_agrees_with_the_heatmap(fitted_model):
    """With the map-max image score a part is flagged exactly when its heatmap crosses the threshold somewhere."""
    m = fitted_model
    assert m.config.image_score == "map-max"
    rng = np.random.default_rng(7)
    parts = [textured_part(rng) for _ in range(3)] + [add_defect(textured_part(rng), 60, 60, r)[0] for r in (4, 8, 14)]
    results = [m.score(p) for p in parts]
    assert any(r.is_anomaly for r in results) and not all(r.is_anomaly for r in results)
    for r in results:
        assert r.score == pytest.approx(float(r.anomaly_map.max()))
        assert r.is_anomaly == bool(r.normalized_map().max() > 1.0)
        assert r.normalized_score == pytest.approx(float(r.normalized_map().max()), rel=1e-5)


def test_squash_fits_tall_parts_on_a_square_and_survives_save_load(tmp_path):
    """resize=squash (anomalib's input): a tall part is seen square, its map comes back at the photo's size, and
    the loaded model squashes as the fitted one did."""
    rng = np.random.default_rng(4)
    tall = [textured_part(rng, 160, 64) for _ in range(6)]
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=64, resize="squash", coreset_ratio=0.5,
                         progress=False).fit(tall)
    assert model.embedder.preprocessing.working_size(160, 64) == (64, 64)
    defect, mask = add_defect(textured_part(rng, 160, 64), 120, 32)
    res = model.score(defect)
    assert res.anomaly_map.shape == (160, 64)
    assert res.score > model.score(textured_part(rng, 160, 64)).score
    assert res.anomaly_map[mask].mean() > res.anomaly_map[~mask].mean()
    loaded = AnomalyModel.load(model.save(tmp_path / "m"), device="cpu")
    assert loaded.embedder.preprocessing.squash and loaded.config.resize == "squash"
    assert loaded.score(defect).score == pytest.approx(res.score, rel=1e-5)
    with pytest.raises(ConfigError, match="squash"):
        AnomalyModel(resize="squash", tile=512)


def test_a_model_under_a_folder_named_beyond_ascii_saves_and_loads_its_index(fitted_model, tmp_path):
    """FAISS's own read_index and write_index open a path with the C library, which on Windows reads it in the
    ANSI code page: an index under a folder named in Chinese or with an umlaut could not be written or read
    (faiss#3073). The model hands FAISS bytes, never a path: a model under such a folder saves, loads and scores
    as the one in memory."""
    img, _ = add_defect(textured_part(np.random.default_rng(11)), 40, 70)
    path = fitted_model.save(tmp_path / "Prüfteil 部品" / "Gehäuse")
    loaded = AnomalyModel.load(path, device="cpu")
    assert loaded.score(img).score == pytest.approx(fitted_model.score(img).score, rel=1e-6)
    assert loaded.index_.ntotal == fitted_model.index_.ntotal
