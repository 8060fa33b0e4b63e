"""Exact duplicate good images: a fit keeps the first of each and leaves the repeats out of the bank and the
threshold (a repeat's leave-one-out score is measured against nothing like it, which set a threshold every defect
passed); an update skips images the model already has."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_models_from_before_duplicates_were_recorded_load_with_none():
    legacy = REPO / "tests" / "data" / "legacy_v1" / "default"
    assert "duplicates" not in json.loads((legacy / "manifest.json").read_text())["training"]
    assert AnomalyModel.load(legacy).manifest_.training.duplicates == []
