"""The manifest's one reader: schema validation, migrations of older releases, clear errors naming the field."""

from __future__ import annotations

import json
import re

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
    (lambda m: m["calibration"].__setitem__("threshold", m["calibration"]["floor"]), "above the floor"),
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


def _at(m: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        m = m[key]
    m[leaf] = value


_MASK = {"file": "mask.png", "width": 8, "height": 8, "source": "png", "inspected": 0.5}


def _with_mask(m: dict) -> None:
    m["config"]["mask"] = "mask.png"
    m["mask"] = dict(_MASK)


# each bound a field holds: the value at it loads, the one past it is refused naming the field (a bound moved by one
# passed every test that used the fitted model's values, far inside them)
@pytest.mark.parametrize("path,ok,bad", [
    ("preprocessing.image_size", 1, 0), ("preprocessing.stride", 1, 0), ("preprocessing.reference_side", 1e-3, 0),
    ("preprocessing.jpeg_quality", 1, 0), ("preprocessing.jpeg_quality", 100, 101), ("preprocessing.flattest", 0, -0.1),
    ("preprocessing.std", [1e-6, 1, 1], [0, 1, 1]), ("features.dim", 1, 0), ("selection.n_selected", 1, 0),
    ("selection.of", 1, 0), ("coreset.from_patches", 1, 0), ("coreset.coverage_radius", 0, -0.1),
    ("index.dim", 1, 0), ("scoring.k", 1, 0), ("scoring.sigma", 0, -0.1), ("calibration.n_images", 0, -1),
    ("training.n_images", 0, -1), ("training.n_calibration_images", 0, -1), ("training.n_skipped", 0, -1),
    ("lineage.images_added", 0, -1), ("lineage.patches_added", 0, -1), ("lineage.updates", 0, -1),
    ("format_revision", 1, 0), ("calibration_set.n_images", 1, 0), ("calibration_set.dim", 1, 0),
    ("evidence.n_images", 1, 0), ("evidence.thumbnail_side", 1, 0), ("mask.width", 1, 0), ("mask.height", 1, 0),
    ("mask.inspected", 1, 0), ("mask.inspected", 1, 1.01), ("files.arrays.npz.bytes", 0, -1),
])
def test_each_bound_of_a_field_admits_its_own_value_and_refuses_the_next_naming_the_field(raw, path, ok, bad):
    def edit(value):
        def apply(m: dict) -> None:
            if path.startswith("mask."):
                _with_mask(m)
            if path.startswith("files."):
                m["files"]["arrays.npz"]["bytes"] = value
            else:
                _at(m, path, value)
        return apply

    parse_manifest(_broken(raw, edit(ok)), "m")
    with pytest.raises(ModelFormatError, match=re.escape(path)):
        parse_manifest(_broken(raw, edit(bad)), "m")


def test_a_bank_of_one_patch_loads_and_one_of_none_is_refused(raw):
    def bank(n):
        return lambda m: (_at(m, "coreset.size", n), _at(m, "index.ntotal", n))
    parse_manifest(_broken(raw, bank(1)), "m")
    with pytest.raises(ModelFormatError, match=r"coreset\.size.*index\.ntotal|index\.ntotal.*coreset\.size"):
        parse_manifest(_broken(raw, bank(0)), "m")


def test_fields_an_older_manifest_lacks_read_as_that_release_wrote_them(raw):
    def older(m: dict) -> None:
        for key in ("n_skipped", "left_out_seconds"):
            m["training"].pop(key)
        for key in ("images_added", "patches_added", "updates", "forced", "seconds"):
            m["lineage"].pop(key)
        for key in ("format_revision", "manifest_sha256"):
            m.pop(key)
        for key in ("std", "mean", "jpeg_quality"):
            m["preprocessing"].pop(key)
        m["config"].pop("calibration")  # before leave-one-out: every fit held images out
        m["config"].pop("mask")
    given = _broken(raw, older)
    kept = json.loads(json.dumps(given))
    m = parse_manifest(given, "m")
    assert given == kept  # the caller's manifest is not migrated in place
    assert (m.training.n_skipped, m.training.left_out_seconds) == (0, 0.0)
    assert (m.lineage.images_added, m.lineage.patches_added, m.lineage.updates, m.lineage.forced) == (0, 0, 0, False)
    assert m.format_revision == 1
    assert m.preprocessing.std is None and m.preprocessing.mean is None
    assert m.fit_config().calibration == "holdout" and m.fit_config().mask is None


@pytest.mark.parametrize("edit,refusal", [
    (lambda m: m.__setitem__("fusion", {"rule": "mean", "weight": 0.5, "knn_calibration": m["calibration"]}),
     "autoencoder and fusion must be given together"),
    (lambda m: m.__setitem__("autoencoder", {"version": 1, "config": {}, "channels": 1,
                                             "calibration": m["calibration"]}),
     "autoencoder and fusion must be given together"),
    (lambda m: m["config"].__setitem__("mask", "mask.png"), "config.mask and the mask section"),
    (lambda m: m.__setitem__("mask", dict(_MASK)), "config.mask and the mask section"),
    (lambda m: m.__setitem__("format", "another/model"), "is not an anomaly-service model"),
])
def test_sections_that_belong_together_or_another_format_are_refused_naming_why(raw, edit, refusal):
    with pytest.raises(ModelFormatError, match=refusal):
        parse_manifest(_broken(raw, edit), "m")


@pytest.mark.parametrize("value", [[], "manifest", None, 1])
def test_a_manifest_that_is_no_json_object_is_refused_so(value):
    with pytest.raises(ModelFormatError, match="is not a JSON object"):
        parse_manifest(value, "m")


def test_a_saved_manifest_leaves_out_the_sections_its_model_has_none_of(raw):
    # releases before a section existed read a model without it; none of them writes one as null
    assert not [key for key, value in raw.items() if value is None]
    assert "coverage_radius" not in raw["coreset"] or raw["coreset"]["coverage_radius"] is not None
    m = parse_manifest(_broken(raw, lambda m: m["coreset"].pop("coverage_radius", None)))
    assert "coverage_radius" not in m.to_dict()["coreset"]
    assert not [key for key in ("autoencoder", "fusion", "mask") if key in m.to_dict()]


def test_an_option_this_release_does_not_know_says_to_use_the_release_that_wrote_it(raw):
    # without the check the config's own constructor refused it, naming a keyword argument and no way out
    with pytest.raises(ModelFormatError, match=r"options this release does not know \(shiny_new_option\); load it "
                                               "with the release that wrote it, or re-fit"):
        parse_manifest(_broken(raw, lambda m: m["config"].__setitem__("shiny_new_option", 1)), "m")


@pytest.mark.parametrize("n,more", [(4, ""), (5, " (and 1 more)"), (7, " (and 3 more)")])
def test_a_manifest_wrong_in_many_fields_names_four_and_counts_the_rest(raw, n, more):
    fields = ["image_size", "stride", "reference_side", "jpeg_quality", "flattest", "bit_depth", "channels"][:n]
    broken = _broken(raw, lambda m: [m["preprocessing"].__setitem__(f, -5) for f in fields])
    with pytest.raises(ModelFormatError) as refused:
        parse_manifest(broken, "m")
    message = str(refused.value)
    assert message.count("preprocessing.") == 4 and message.endswith(more or message[-1:])
    assert ("more)" in message) == bool(more)
