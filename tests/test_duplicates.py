"""Exact duplicate good images: a fit keeps the first of each and leaves the repeats out of the bank and the
threshold (a repeat's leave-one-out score is measured against nothing like it, which set a threshold every defect
passed); an update skips images the model already has."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service import AnomalyModel
from anomaly_service.cli import app
from anomaly_service.errors import ConfigError

from conftest import REPO, SMALL, textured_part

CLI_FIT = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--coreset-ratio", "0.25", "-q"]


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    rng = np.random.default_rng(21)
    return [textured_part(rng) for _ in range(6)]


def _names(n: int) -> list[str]:
    return [f"good_{i}.png" for i in range(n)]


def test_repeats_are_left_out_of_the_bank_and_the_threshold(goods):
    distinct = AnomalyModel(**SMALL).fit(goods, names=_names(len(goods)))
    # the first image three times over, its copies at the end of the folder
    model = AnomalyModel(**SMALL).fit(goods + [goods[0], goods[0].copy()],
                                      names=_names(len(goods)) + ["copy_a.png", "copy_b.png"])
    m = model.manifest_
    assert [(d.name, d.of) for d in m.training.duplicates] == [("copy_a.png", "good_0.png"),
                                                               ("copy_b.png", "good_0.png")]
    assert m.training.n_images == len(goods) and model.catalog_.names == _names(len(goods))
    # the model is the one the distinct images give: same bank, same threshold
    assert model.knn.bank_size == distinct.knn.bank_size
    assert m.calibration.threshold == pytest.approx(distinct.manifest_.calibration.threshold)
    assert m.calibration.n_images == distinct.manifest_.calibration.n_images


def test_fewer_than_two_distinct_images_fail_naming_the_repeats(goods):
    with pytest.raises(ConfigError, match=r"at least 2 distinct .* got 1: 2 exact duplicate\(s\) left out "
                                          r"\(b.png repeats a.png; c.png repeats a.png\)"):
        AnomalyModel(**SMALL).fit([goods[0]] * 3, names=["a.png", "b.png", "c.png"])


def test_a_folder_of_one_photo_copied_many_times_is_refused_in_a_short_line(goods, fitted_model, rng_images):
    """Three hundred copies of one photo (a camera script that saved one frame on every trigger) made the fit's
    error, and an update's refusal, one line naming every copy: sixteen kilobytes. They name the first few and count
    the rest."""
    names = [f"p{i:03d}.png" for i in range(300)]
    with pytest.raises(ConfigError, match=r"299 exact duplicate\(s\) left out \(p001.png repeats p000.png; .*"
                                          r"p005.png repeats p000.png; and 294 more\)$") as err:
        AnomalyModel(**SMALL).fit([goods[0]] * 300, names=names)
    assert len(str(err.value)) < 400
    with pytest.raises(ConfigError, match=r"300 exact duplicate\(s\) .*p004.png repeats image\[3\]; "
                                          r"and 295 more\)$") as err:
        fitted_model.update([rng_images[3]] * 300, names=names)
    assert len(str(err.value)) < 400


def test_a_held_out_repeat_of_a_training_image_does_not_calibrate():
    """With held-out calibration, a copy is neither learnt nor scored a second time, whichever side of the split it
    falls on: a held-out copy of an image the bank learnt would score as learnt."""
    rng = np.random.default_rng(21)
    goods = [textured_part(rng) for _ in range(8)]
    names = _names(8) + [f"copy_{i}.png" for i in range(4)]
    model = AnomalyModel(**SMALL, calibration="holdout", calibration_fraction=0.34).fit(goods + goods[:4],
                                                                                        names=names)
    t = model.manifest_.training
    repeats = {d.name: d.of for d in t.duplicates}
    assert len(repeats) == 4 and not set(repeats) & set(model.catalog_.names)
    assert "good_2.png" in repeats  # this seed holds good_2 out and learns its copy: the held-out one goes
    assert t.n_images + t.n_calibration_images == len(goods)
    assert model.manifest_.calibration.n_images == t.n_calibration_images == 2


def test_a_hold_out_of_repeats_only_falls_back_to_the_learnt_images(goods):
    """Whether a fit works must not depend on where the split puts a copy: held-out images that all repeat
    training images leave the threshold to the learnt ones (as calibration_fraction=0 does), with a warning."""
    names = _names(len(goods)) + ["copy_of_good_0.png"]
    for seed in range(8):  # a seed whose single held-out image is the copy (or its first)
        model = AnomalyModel(**{**SMALL, "seed": seed}, calibration="holdout", calibration_fraction=0.1).fit(
            goods + [goods[0]], names=names)
        if model.manifest_.training.n_calibration_images == 0:
            break
    else:
        pytest.fail("no seed held out the repeated image alone")
    assert len(model.manifest_.training.duplicates) == 1 and model.decision.calibration.threshold > 0
    assert model.manifest_.calibration.n_images > 0  # calibrated on the learnt images


def test_without_a_hold_out_the_learnt_copy_calibrates_even_when_names_collide(goods):
    """calibration_fraction=0 calibrates on the images the bank learnt, found by index: a repeat sharing its
    first copy's name must not take that first copy out with it."""
    names = ["x.png", *_names(3)[1:], "x.png"]
    model = AnomalyModel(**SMALL, calibration="holdout", calibration_fraction=0).fit(goods[:3] + [goods[0]],
                                                                                     names=names)
    assert [(d.name, d.of) for d in model.manifest_.training.duplicates] == [("x.png", "x.png")]
    assert model.manifest_.calibration.n_images == 3  # x.png (learnt), good_1, good_2


def test_an_update_does_not_teach_the_bank_a_held_out_image(goods):
    """With holdout calibration the threshold is read from images the bank never learnt; an update that adds one
    of them would re-score it as learnt and move the threshold. The fit records them by pixels, and the update
    skips them as it skips images the bank has."""
    model = AnomalyModel(**SMALL, calibration="holdout", calibration_fraction=0.34).fit(goods, names=_names(6))
    held = model.manifest_.training.held_out
    assert len(held) == model.manifest_.training.n_calibration_images == 2
    assert not {h.name for h in held} & set(model.catalog_.names)
    i = int(held[0].name.split("_")[1].split(".")[0])
    new = textured_part(np.random.default_rng(97))
    updated = model.update([goods[i], new], names=["again.png", "new.png"])
    assert [(r.name, r.of) for r in updated.duplicates_] == [("again.png", f"{held[0].name} (held out for the "
                                                                          "threshold)")]
    assert updated.manifest_.lineage.images_added == 1
    assert [h.name for h in updated.manifest_.training.held_out] == [h.name for h in held]  # kept by the update


def test_cli_fit_and_info_name_the_repeats(tmp_path, goods):
    good = tmp_path / "good"
    good.mkdir()
    for i, g in enumerate(goods[:4]):
        Image.fromarray(g).save(good / f"{i}.png")
    Image.fromarray(goods[1]).save(good / "9_again.png")
    out = CliRunner().invoke(app, ["fit", "--normal-dir", str(good), "--out", str(tmp_path / "m"), *CLI_FIT])
    assert out.exit_code == 0, out.output
    assert "1 exact duplicate image(s) left out" in out.output
    assert f"{good / '9_again.png'}  repeats {good / '1.png'}" in out.output
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["training"]["duplicates"] == [{"name": str(good / "9_again.png"), "of": str(good / "1.png")}]
    assert manifest["training"]["n_images"] == 4
    info = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    assert info.exit_code == 0, info.output
    assert info.output.split("\ntraining ")[1].splitlines()[1].startswith("duplicates ")

    only = tmp_path / "only"
    only.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(goods[0]).save(only / name)
    failed = CliRunner().invoke(app, ["fit", "--normal-dir", str(only), "--out", str(tmp_path / "m2"), *CLI_FIT])
    assert failed.exit_code != 0 and "need at least 2 distinct" in failed.output
    assert f"{only / 'b.png'} repeats {only / 'a.png'}" in failed.output
    assert not (tmp_path / "m2").exists()


def test_the_images_digest_names_the_set_whatever_its_order():
    """The manifest's ``images_sha256`` tells two fits on other images apart (and an update from its fit): a digest
    of nothing would be one for every set. Order, as a folder lists it, does not count."""
    from anomaly_service.training_set import hash_inputs, pixel_digest

    a, b = pixel_digest(np.zeros((4, 4, 3), np.uint8)), pixel_digest(np.ones((4, 4, 3), np.uint8))
    assert hash_inputs([a, b]) == hash_inputs([b, a]) != hash_inputs([a]) != hash_inputs([b])
    assert pixel_digest(np.zeros((4, 4, 3), np.uint8)) != pixel_digest(np.zeros((2, 8, 3), np.uint8))  # the shape


def test_models_from_before_duplicates_were_recorded_load_with_none():
    legacy = REPO / "tests" / "data" / "legacy_v1" / "default"
    assert "duplicates" not in json.loads((legacy / "manifest.json").read_text())["training"]
    assert AnomalyModel.load(legacy).manifest_.training.duplicates == []


def test_an_update_skips_images_the_model_already_has(fitted_model, rng_images):
    """The session model learnt every rng_image (leave-one-out): adding one again, or a new one twice, teaches
    nothing and would count twice."""
    new = textured_part(np.random.default_rng(99))
    updated = fitted_model.update([rng_images[2], new, new.copy()], names=["again.png", "new.png", "new_twice.png"])
    assert [(r.name, r.of) for r in updated.duplicates_] == [("again.png", "image[2]"), ("new_twice.png", "new.png")]
    assert updated.manifest_.lineage.images_added == 1
    assert updated.manifest_.training.n_images == fitted_model.manifest_.training.n_images + 1
    assert updated.catalog_.names[len(fitted_model.catalog_):] == ["new.png"]
    assert [(d.name, d.of) for d in updated.manifest_.training.duplicates] == \
        [("again.png", "image[2]"), ("new_twice.png", "new.png")]
    with pytest.raises(ConfigError, match=r"no new good image to add: 1 exact duplicate\(s\) .*again.png repeats"):
        fitted_model.update([rng_images[2]], names=["again.png"])


def test_an_image_offered_again_under_its_own_name_is_said_to_be_in_the_model(fitted_model, tmp_path):
    """A folder given to a second update, or an inspection an earlier update added (named ``inspection <id>`` both
    times): the refusal read "a.png repeats a.png", as if the image were its own duplicate."""
    new = textured_part(np.random.default_rng(96))
    once = fitted_model.update([new], names=["inspection 01a2"])
    with pytest.raises(ConfigError, match=r"\(inspection 01a2 is in the model already\)$"):
        once.update([new], names=["inspection 01a2"])
    twice = fitted_model.update([new, new.copy()], names=["x.png", "x.png"])
    assert [str(r) for r in twice.duplicates_] == ["x.png is given twice"]
    path = once.save(tmp_path / "part")
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(textured_part(np.random.default_rng(95))).save(good / "a.png")
    first = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--runtime", "torch"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--runtime", "torch"])
    assert again.exit_code == 2 and f"({good / 'a.png'} is in the model already)" in again.output


def test_cli_update_names_the_skipped_duplicates(fitted_model, rng_images, tmp_path):
    path = fitted_model.save(tmp_path / "part")
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(rng_images[3]).save(good / "a_again.png")
    Image.fromarray(textured_part(np.random.default_rng(98))).save(good / "b_new.png")
    out = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--runtime", "torch"])
    assert out.exit_code == 0, out.output
    assert "updated with 1 images" in out.output
    assert f"1 exact duplicate image(s) skipped, the model already has them:\n  {good / 'a_again.png'} repeats " \
           "image[3]" in out.output
    from anomaly_service import model_history

    update = next(e for e in model_history.read(path) if e["action"] == "update")
    assert update["images"] == [str(good / "b_new.png")]  # the change log names only what was added


def test_cli_update_does_not_say_the_model_has_a_repeat_of_another_added_image(fitted_model, tmp_path):
    """Two copies of one new photo in --add-good: the warning said "the model already has them", which sent the user
    looking for a photo the model had never learnt."""
    path = fitted_model.save(tmp_path / "part")
    good = tmp_path / "good"
    good.mkdir()
    for name in ("b.png", "b_again.png"):
        Image.fromarray(textured_part(np.random.default_rng(97))).save(good / name)
    out = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--runtime", "torch"])
    assert out.exit_code == 0, out.output
    assert "already has" not in out.output
    assert (f"1 exact duplicate image(s) skipped, each repeats another image of this update:\n  "
            f"{good / 'b_again.png'} repeats {good / 'b.png'}") in out.output


def test_cli_update_names_each_skipped_copy_on_a_line_of_its_own(fitted_model, tmp_path):
    """A folder of one new photo copied many times: the update added one and named every other copy in one warning
    line (kilobytes for a few hundred), where the fit's warning for the same folder gives each its own line."""
    path = fitted_model.save(tmp_path / "part")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        Image.fromarray(textured_part(np.random.default_rng(96))).save(good / f"copy_{i}.png")
    out = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--runtime", "torch"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    at = lines.index("warning: 3 exact duplicate image(s) skipped, each repeats another image of this update:")
    assert lines[at + 1:at + 4] == [f"  {good / f'copy_{i}.png'} repeats {good / 'copy_0.png'}" for i in (1, 2, 3)]


def test_api_update_lists_the_skipped_duplicates(fitted_model, rng_images, tmp_path):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    from conftest import png_bytes

    fitted_model.save(tmp_path / "models" / "part")
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    new = png_bytes(textured_part(np.random.default_rng(97)))
    with TestClient(create_app(settings)) as client:
        r = client.post("/models/part/update", files=[("files", ("new.png", new)), ("files", ("twice.png", new)),
                                                      ("files", ("again.png", png_bytes(rng_images[0])))])
        assert r.status_code == 200, r.text
        assert r.json()["images_added"] == 1
        assert r.json()["duplicates"] == [{"name": "twice.png", "of": "new.png"},
                                          {"name": "again.png", "of": "image[0]"}]
        r = client.post("/models/part/update", files=[("files", ("again.png", png_bytes(rng_images[0])))])
        assert r.status_code == 422 and r.json()["error"] == "update_failed"
        assert "again.png repeats image[0]" in r.json()["detail"]
