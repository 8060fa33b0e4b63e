"""The library as a notebook user drives it: Python conventions a fitted model keeps (pickling, copies)."""

import copy
import pickle

import joblib
import numpy as np
import pytest

from conftest import add_defect, textured_part


def test_a_fitted_model_pickles_and_scores_as_before(fitted_model, tmp_path):
    """joblib.dump and multiprocessing pickle models; the ONNX Runtime sessions are this process's alone."""
    img, _ = add_defect(textured_part(np.random.default_rng(9)), 60, 60)
    before = fitted_model.score(img)
    joblib.dump(fitted_model, tmp_path / "model.joblib")
    for copied in (pickle.loads(pickle.dumps(fitted_model)), joblib.load(tmp_path / "model.joblib"),
                   copy.deepcopy(fitted_model)):
        after = copied.score(img)
        assert after.score == before.score and after.is_anomaly == before.is_anomaly
        np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)
    assert fitted_model.score(img).score == before.score  # the original still scores


def test_fit_and_score_many_take_a_folder_as_its_image_files(synthetic_category, caplog):
    """A folder named by a str was iterated a character at a time (every one a missing file), a Path not at all."""
    from anomaly_service import AnomalyModel

    good = synthetic_category / "train" / "good"
    (good / "notes.txt").write_text("not an image")
    params = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    listed = AnomalyModel(**params).fit(sorted(good.glob("*.png")))
    for folder in (str(good), good):
        model = AnomalyModel(**params).fit(folder)
        assert model.manifest_.training.images_sha256 == listed.manifest_.training.images_sha256
        assert model.calibration_.threshold == listed.calibration_.threshold
    assert any("notes.txt" in r.getMessage() for r in caplog.records)
    tests = synthetic_category / "test" / "blob"
    by_folder = [r.score for r in listed.score_many(tests)]
    assert by_folder == [r.score for r in listed.score_many(sorted(tests.glob("*.png")))]


@pytest.mark.parametrize("given, says", [
    (None, "NoneType is neither a list of images nor a folder"),
    (5, "int is neither a list of images nor a folder"),
    ("no/such/folder", "is not a folder"),
])
def test_what_is_no_set_of_images_is_refused_in_one_sentence(given, says):
    from anomaly_service import AnomalyModel, ImageLoadError

    with pytest.raises(ImageLoadError, match=says):
        AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(given)


def test_one_image_given_as_a_set_is_told_to_be_wrapped(fitted_model, rng_images):
    """One H x W x 3 array iterates as its rows, each 'too small': the fit said 128 images were unreadable."""
    from anomaly_service import AnomalyModel, ImageLoadError

    with pytest.raises(ImageLoadError, match="one image was given where a list of images is expected"):
        AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(rng_images[0])
    with pytest.raises(ImageLoadError, match="one image was given"):
        list(fitted_model.score_many(rng_images[0]))
    stacked = list(fitted_model.score_many(np.stack(rng_images[:2])))  # a stack of images is a set of them
    assert [r.score for r in stacked] == [fitted_model.score(im).score for im in rng_images[:2]]


def test_names_that_do_not_pair_with_the_images_are_refused(rng_images):
    from anomaly_service import AnomalyModel, ConfigError

    model = AnomalyModel(backbone="efficientnet_lite0", progress=False)
    with pytest.raises(ConfigError, match=r"1 name\(s\) for 3 image\(s\)"):
        model.fit(rng_images[:3], names=["a.png"])
    with pytest.raises(ConfigError, match="names is one string"):
        model.fit(rng_images[:3], names="abc")


@pytest.mark.parametrize("given, says", [
    (None, "NoneType is not an image"),
    ([[0, 1], [2, 3]], "list is not an image"),
    (10**12, "int is not an image"),  # bytes(int) made that many zero bytes
])
def test_what_is_no_image_is_refused_as_such(fitted_model, given, says):
    from anomaly_service import ImageLoadError

    with pytest.raises(ImageLoadError, match=says):
        fitted_model.score(given)


def test_an_open_file_and_a_folder_are_named_for_what_they_are(fitted_model, tmp_path):
    from anomaly_service import ImageLoadError
    from conftest import png_bytes

    (tmp_path / "a.png").write_bytes(png_bytes(textured_part(np.random.default_rng(1))))
    with open(tmp_path / "a.png", "rb") as fh, pytest.raises(ImageLoadError, match="BufferedReader is not an image"):
        fitted_model.score(fh)
    with pytest.raises(ImageLoadError, match="a folder, not an image file"):
        fitted_model.score(tmp_path)


def test_parameters_follow_scikit_learn(fitted_model, rng_images):
    """get_params, set_params and clone, as model selection uses them (none existed: clone refused the model)."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError as SklearnNotFitted
    from sklearn.utils.validation import check_is_fitted

    from anomaly_service import AnomalyModel, ConfigError

    params = fitted_model.get_params()
    assert params["backbone"] == "efficientnet_lite0" and params["image_size"] == 128
    assert params["calibration_fraction"] == 0.25 and params["device"] == "auto" and "config" not in params
    copy_ = clone(fitted_model)
    assert copy_.get_params() == params and copy_.manifest_ is None
    with pytest.raises(SklearnNotFitted):
        check_is_fitted(copy_)
    check_is_fitted(fitted_model)
    assert copy_.set_params(k=3, progress=False) is copy_ and copy_.get_params()["k"] == 3 and copy_.knn.k == 3
    with pytest.raises(ConfigError, match="k must be"):
        copy_.set_params(k=0)
    assert copy_.get_params()["k"] == 3  # a refused value changes nothing
    with pytest.raises(ConfigError, match="did you mean coreset_ratio"):
        copy_.set_params(corset_ratio=0.5)
    with pytest.raises(ConfigError, match="did you mean coreset_ratio"):
        AnomalyModel(corset_ratio=0.5)
    with pytest.raises(ConfigError, match="on a fitted model"):
        fitted_model.set_params(k=3)
    refit = clone(fitted_model).fit(rng_images)
    assert refit.calibration_.threshold == fitted_model.calibration_.threshold


@pytest.mark.parametrize("pixels, says", [
    (np.full((32, 32), 40000, np.int32), "int32 with values from 40000 to 40000 is not on a pixel scale"),
    (np.full((32, 32, 3), 4095.0, np.float32), "float32 with values from 4095 to 4095"),
    (np.linspace(-1, 1, 32 * 32).reshape(32, 32), "float64 with values from -1 to 1"),
    (np.full((32, 32), "a"), "holds no pixels"),
    (np.ones((32, 32), np.complex64), "holds no pixels"),
])
def test_an_array_off_the_pixel_scale_is_refused_not_clipped(fitted_model, pixels, says):
    """Clipped, a 16-bit photo held as int32 or float32 scored as a white picture and a normalized one as half
    black, with no word of it."""
    from anomaly_service import ImageLoadError

    with pytest.raises(ImageLoadError, match=says):
        fitted_model.score(pixels)


def test_a_unit_float_photo_that_a_resize_rang_past_its_range_is_read_on_it(fitted_model):
    """A 0-1 float photo resized with a bicubic kernel rings a little past 0 and 1 at sharp edges: one ending at
    1.02 was read on the 0-255 scale, a black picture, and scored so with no word of it."""
    img = textured_part(np.random.default_rng(4)) / 255.0
    rang = img.copy()
    rang[10:20, 10:20] = 1.02
    rang[30:40, 30:40] = -0.03
    clipped = np.clip(rang, 0.0, 1.0)
    assert fitted_model.score(rang).score == fitted_model.score(clipped).score


@pytest.mark.parametrize("band", [0.3, 0.0])
def test_a_unit_float_photo_a_bicubic_resize_rang_well_past_one_is_read_on_its_range(fitted_model, band):
    """PyTorch's and OpenCV's bicubic kernel rings further than the slack first allowed: a 0-1 photo with a bright
    wire across a grey band, so resized, ends well past 1 with nothing below 0, and was read on the 0-255 scale, a
    black picture scored with no word; across a black band it also dips below 0, and was refused.
    Resized here as such a pipeline does."""
    import torch
    import torch.nn.functional as F

    img = 0.3 + 0.4 * textured_part(np.random.default_rng(4)) / 255.0
    img[14:40], img[20:22] = band, 1.0
    rang = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(64, 64), mode="bicubic",
                         align_corners=False)[0].permute(1, 2, 0).numpy()
    assert rang.max() > 1.1 and (rang.min() >= 0.0 if band else rang.min() < 0.0)  # past the first slack
    assert fitted_model.score(rang).score == fitted_model.score(np.clip(rang, 0.0, 1.0)).score


def test_arrays_on_each_pixel_scale_score_as_the_same_photo(fitted_model):
    img = textured_part(np.random.default_rng(4))
    grey = img[:, :, 0]
    same = [grey, grey.astype(np.int64), grey.astype(np.float32), grey / 255.0, grey.astype(np.uint16) * 257,
            grey.astype(object)]
    scores = {fitted_model.score(a).score for a in same}
    assert len(scores) == 1
    mask = grey > 128
    assert fitted_model.score(mask).score == fitted_model.score(mask.astype(np.uint8) * 255).score


def test_score_many_reads_a_chunk_ahead_not_every_image(fitted_model):
    """Every image was decoded before the first result: a shift's photos did not fit in memory."""
    from anomaly_service.model import SCORE_CHUNK

    rng = np.random.default_rng(6)
    photos = [textured_part(rng, 64, 64) for _ in range(4)]
    pulled = []

    def shift():
        for i in range(3 * SCORE_CHUNK):
            pulled.append(i)
            yield photos[i % len(photos)]

    results = fitted_model.score_many(shift())
    first = next(results)
    assert len(pulled) == SCORE_CHUNK
    assert first.score == fitted_model.score(photos[0]).score
    rest = list(results)
    assert len(rest) == 3 * SCORE_CHUNK - 1 and len(pulled) == 3 * SCORE_CHUNK
    assert [r.score for r in rest[SCORE_CHUNK - 1:SCORE_CHUNK + 3]] == [r.score for r in (first, *rest[:3])]


def test_score_many_gives_the_results_before_an_undecodable_input_then_its_error(fitted_model, tmp_path):
    """The chunk was decoded whole before any was scored: a bad file in it lost the results of the photos before
    it, and a caller could not tell where to go on from."""
    from conftest import png_bytes

    from anomaly_service import AnomalyError

    rng = np.random.default_rng(8)
    photos = [textured_part(rng, 64, 64) for _ in range(4)]
    bad = tmp_path / "b.png"
    bad.write_bytes(png_bytes(photos[0])[:40])  # a truncated file
    got = []
    with pytest.raises(AnomalyError, match="b.png"):
        for result in fitted_model.score_many([photos[0], photos[1], bad, photos[2]]):
            got.append(result.score)
    assert got == [fitted_model.score(photos[0]).score, fitted_model.score(photos[1]).score]
    assert [r.score for r in fitted_model.score_many([photos[2]])] == [fitted_model.score(photos[2]).score]


def test_a_result_shows_its_verdict_not_every_number_behind_it(fitted_model, rng_images):
    """A notebook cell showing a result printed the whole map and every calibration image's score."""
    result = fitted_model.score(rng_images[0])
    shown = repr(result)
    assert "is_anomaly=" in shown and "threshold=" in shown and "image_width=128" in shown
    assert "array(" not in shown and "holdout_scores" not in shown and "holdout_distances" not in shown
    assert len(fitted_model.calibration_.holdout_scores) > 0 and "holdout" not in repr(fitted_model.calibration_)


def test_a_refit_that_fails_leaves_the_model_as_it_was(tmp_path):
    """The fit reset the model's bit depth (and second opinion, alignment) before it found too few images: the
    model still scored, a 12-bit photo now read against 16 bits, and a good part was flagged."""
    from anomaly_service import AnomalyModel, ConfigError

    rng = np.random.default_rng(11)
    twelve_bit = [textured_part(rng)[:, :, 0].astype(np.uint16) * 16 for _ in range(6)]
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    model.fit(twelve_bit[:5])
    before = model.score(twelve_bit[5])
    with pytest.raises(ConfigError, match="at least 2"):
        model.fit([textured_part(rng)])
    after = model.score(twelve_bit[5])
    assert model.limits.bit_depth == 12 and after.normalized_score == before.normalized_score
    model.save(tmp_path / "m")
    loaded = AnomalyModel.load(tmp_path / "m")
    assert loaded.version_id_ is not None
    loaded.fit(twelve_bit[1:])
    assert loaded.version_id_ is None  # a refit is no longer the saved version it was loaded from


def test_a_models_config_is_read_only(rng_images):
    """model.config.k = 3 was ignored by the fit (its stages were built at construction) while the manifest
    recorded k=3: the saved model then scored otherwise once loaded."""
    import dataclasses

    from anomaly_service import AnomalyModel, ConfigError, ModelConfig

    model = AnomalyModel(backbone="efficientnet_lite0", progress=False)
    with pytest.raises(ConfigError, match=r"set_params\(k=...\)"):
        model.config.k = 3
    with pytest.raises(ConfigError, match="cannot be replaced"):
        model.config = ModelConfig(k=3)
    assert model.config.k == 1 and model.set_params(k=3).config.k == 3 and model.knn.k == 3
    assert dataclasses.replace(model.config, k=2).k == 2 and ModelConfig(k=2).k == 2


def test_an_image_of_many_that_does_not_decode_is_named_by_its_place(fitted_model, rng_images):
    from anomaly_service import ImageLoadError

    with pytest.raises(ImageLoadError, match=r"^image\[2\]: not a recognized image format"):
        list(fitted_model.score_many([rng_images[0], rng_images[1], b"junk"]))
    with pytest.raises(ImageLoadError, match=r"^image: not a recognized image format"):
        fitted_model.score(b"junk")


@pytest.mark.parametrize("given, says", [
    (dict(mask=np.ones((8, 8), bool)), "mask must be one of 'auto' .*; got a ndarray"),
    (dict(config={"k": 3}), "config must be a ModelConfig, not a dict"),
    (dict(limits={"max_pixels": 5}), "limits must be an ImageLimits, not a dict"),
])
def test_constructor_arguments_of_the_wrong_kind_are_refused_in_its_words(given, says):
    """A mask given as an array raised numpy's 'truth value is ambiguous', a config dict dataclasses' TypeError,
    and limits given as a dict an AttributeError deep in the fit."""
    from anomaly_service import AnomalyModel, ConfigError

    with pytest.raises(ConfigError, match=says):
        AnomalyModel(backbone="efficientnet_lite0", **given)


def test_a_fit_on_pil_images_made_in_memory(rng_images):
    """Image.fromarray and convert() give images without tiles, and the bit-depth check's read of them raised
    AttributeError: no fit on PIL images made in a notebook could run."""
    from PIL import Image

    from anomaly_service import AnomalyModel

    params = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, progress=False)
    arrays = rng_images[:4]
    pil = [Image.fromarray(a) for a in arrays[:2]] + [Image.fromarray(a).convert("RGBA") for a in arrays[2:]]
    by_pil, by_array = AnomalyModel(**params).fit(pil), AnomalyModel(**params).fit(arrays)
    assert by_pil.calibration_.threshold == by_array.calibration_.threshold
    assert by_pil.manifest_.training.images_sha256 == by_array.manifest_.training.images_sha256
    updated = by_pil.update([Image.fromarray(rng_images[5])])
    assert updated.manifest_.training.n_images == 5


def test_a_results_numbers_are_pythons_own_so_numpy_2_neither_prints_nor_serializes_them_otherwise(fitted_model):
    """NumPy 2 prints its scalars as ``np.float64(95.5)`` (NEP 51): a caller who printed or logged a list of scores
    read ``[np.float64(95.5)]`` where NumPy 1 gave ``[95.5]``, and a float32 stops ``json.dumps`` (numpy#26907,
    python-psignifit#212). Every number a result hands a caller, its dict and the model's calibration included, is
    Python's own float, int or bool."""
    import json

    rng = np.random.default_rng(3)
    bad, _ = add_defect(textured_part(rng), 60, 60)
    results = list(fitted_model.score_many([bad, textured_part(rng)]))

    def leaves(v):
        if isinstance(v, dict):
            return [x for item in v.values() for x in leaves(item)]
        return [x for item in v for x in leaves(item)] if isinstance(v, (list, tuple)) else [v]

    for r in results:
        plain = r.to_dict()
        assert all(type(x) in (float, int, bool, str) or x is None for x in leaves(plain)), plain
        assert all(type(getattr(r, f)) in (float, int, bool) for f in ("score", "normalized_score", "threshold",
                                                                       "is_anomaly", "image_width", "image_height"))
        assert "np." not in repr(r) and "np." not in str([r.score, r.normalized_score])
        json.loads(json.dumps(plain))
    assert "np." not in repr(fitted_model.calibration_)
    assert type(fitted_model.calibration_.threshold) is float
