"""The manifest's one reader: schema validation, migrations of older releases, clear errors naming the field."""

from __future__ import annotations

import json

import pytest

from anomaly_service import AnomalyModel, ModelFormatError
from anomaly_service.artifact import read_manifest
from anomaly_service.manifest import parse_manifest
from conftest import write_manifest


@pytest.fixture(scope="module")
def raw(fitted_model, tmp_path_factory) -> dict:
    path = fitted_model.save(tmp_path_factory.mktemp("manifest") / "m")
    return json.loads((path / "manifest.json").read_text())


def _broken(raw: dict, edit) -> dict:
    m = json.loads(json.dumps(raw))
    edit(m)
    return m


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.pop("config"), "config"),
    (lambda m: m.__setitem__("files", []), "files"),
    (lambda m: m.__setitem__("backbone", "resnet"), "backbone"),
    (lambda m: m.__setitem__("calibration", {}), "calibration.threshold"),
    (lambda m: m["calibration"].__setitem__("threshold", float("nan")), "calibration.threshold"),
    (lambda m: m["calibration"].__setitem__("threshold", float("inf")), "calibration.threshold"),
    (lambda m: m["calibration"].__setitem__("threshold", m["calibration"]["floor"] - 1), "above the floor"),
    (lambda m: m["files"].__setitem__("../outside", {"bytes": 1, "sha256": "0" * 64}), "plain file name"),
    (lambda m: m["config"].__setitem__("image_size", "big"), "image_size"),
    (lambda m: m["config"].__setitem__("shiny_new_option", 1), "shiny_new_option"),
    (lambda m: m["index"].__setitem__("ntotal", 3), "ntotal"),
])
def test_malformed_manifests_fail_naming_the_field(raw, edit, field):
    with pytest.raises(ModelFormatError, match=field.replace(".", r"\.").replace("(", r"\(")) as refused:
        parse_manifest(_broken(raw, edit), "m")
    # the reason as GET /models, anomaly info and the log give it: the check's own sentence, not pydantic's tag
    assert "Value error" not in str(refused.value)


def test_valid_manifest_round_trips(raw):
    m = parse_manifest(raw)
    assert m.to_dict() == raw
    assert m.calibration.to_calibration().threshold == raw["calibration"]["threshold"]


def test_older_release_manifest_is_migrated(raw):
    old = _broken(raw, lambda m: (m["config"].pop("layer_balance"), m["config"].__setitem__("reweight_neighbours", 9),
                                  m["scoring"].__setitem__("reweight_neighbours", 9)))
    m = parse_manifest(old)
    assert m.fit_config().layer_balance is False  # fitted before the option existed: unbalanced
    assert "reweight_neighbours" not in m.config and "reweight_neighbours" not in m.to_dict()["scoring"]


# the first release wrote no config.resize; its preprocessing section described the policy in a sentence
FIRST_RELEASE_RESIZE = "longer-side, aspect kept, sides rounded to stride, bilinear antialiased"


def _without_resize(raw: dict, recorded: str) -> dict:
    def edit(m: dict) -> None:
        m["config"].pop("resize")
        m["preprocessing"]["resize"] = recorded
        if recorded != "fixed-scale":
            m["preprocessing"]["reference_side"] = None  # only a fixed-scale fit sets it
    return _broken(raw, edit)


@pytest.mark.parametrize("recorded,policy", [(FIRST_RELEASE_RESIZE, "longer-side"), ("squash", "squash"),
                                             ("fixed-scale", "fixed-scale"), ("longer-side", "longer-side")])
def test_a_manifest_without_resize_reads_as_it_was_fitted(raw, recorded, policy):
    assert parse_manifest(_without_resize(raw, recorded)).fit_config().resize == policy


def test_a_squashed_model_without_config_resize_loads_squashed(fitted_model, tmp_path):
    path = fitted_model.save(tmp_path / "m")
    write_manifest(path, _without_resize(json.loads((path / "manifest.json").read_text()), "squash"))
    model = AnomalyModel.load(path, device="cpu")
    assert model.config.resize == "squash" and model.embedder.preprocessing.squash
    h, w = model.embedder.preprocessing.working_size(60, 200)
    assert h == w  # every photo square, as it was fitted


@pytest.mark.parametrize("key,value", [("image_score", "reweighted"), ("autoencoder", "pixels"), ("fusion", "knn")])
def test_removed_choices_say_what_to_do(raw, key, value):
    with pytest.raises(ModelFormatError, match=f"{key}={value}.*re-fit it with `anomaly fit`"):
        parse_manifest(_broken(raw, lambda m: m["config"].__setitem__(key, value)))


def test_the_loader_and_info_read_through_it(fitted_model, tmp_path):
    path = fitted_model.save(tmp_path / "m")
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    write_manifest(path, m)
    for read in (read_manifest, AnomalyModel.load):
        with pytest.raises(ModelFormatError, match="plain file name"):
            read(path)
