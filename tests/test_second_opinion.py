"""The second opinion (the whole-image branch and its fusion) as a plant uses it: what an adversarial review found
(docs/decisions.md, "Adversarial review of the second opinion (session 63)"), each case failing before its fix."""

from __future__ import annotations

import pytest

from anomaly_service import AnomalyModel
from anomaly_service.config import ModelConfig
from anomaly_service.errors import ConfigError


@pytest.mark.parametrize("options, named", [
    ({"ae_keep": "always"}, "--autoencoder global --ae-keep always"),  # auto: a plain kNN fit on a surface
    ({"autoencoder": "features", "ae_keep": "always"}, "--ae-keep always"),
    ({"autoencoder": "none", "ae_keep": "always"}, "--ae-keep always"),
    ({"fusion": "max"}, "--fusion max"),  # the branch fuses by excess whatever it says
    ({"autoencoder": "global", "fusion_weight": 0.8}, "--fusion-weight 0.8"),
    ({"autoencoder": "none", "fusion": "max"}, "--fusion max"),
    ({"autoencoder": "features", "fusion": "max", "fusion_weight": 0.8}, "--fusion-weight 0.8"),
])
def test_a_second_opinion_option_the_fit_would_not_read_is_refused(options, named, tmp_path, caplog):
    """Each of these fitted without a word, as if it had been read: a plant that asked for the branch whatever the
    layout got a plain kNN model, one that asked for max fusion got the excess rule. The command line refuses the
    fit before any work; the library says it when it fits (below: why it does not refuse)."""
    import logging

    from click.testing import CliRunner

    from anomaly_service.cli import app

    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    out = CliRunner().invoke(app, ["fit", "--normal-dir", str(tmp_path), "--out", str(tmp_path / "m"),
                                   "--backbone", "efficientnet_lite0", *flags])
    assert out.exit_code == 2 and named in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "m").exists()
    with caplog.at_level(logging.WARNING, logger="anomaly_service.model"), pytest.raises(Exception):
        AnomalyModel(backbone="efficientnet_lite0", **options).fit([])  # said before the images are read
    assert any(named in r.getMessage() for r in caplog.records), caplog.text


def test_the_second_opinion_options_that_are_read_still_pass_and_stored_models_still_load():
    for options in ({"autoencoder": "global", "ae_keep": "always"}, {"autoencoder": "features", "fusion": "max"},
                    {"autoencoder": "features", "fusion_weight": 0.7}, {"autoencoder": "auto"},
                    {"autoencoder": "none"}):
        assert ModelConfig(backbone="efficientnet_lite0", **options).unread_second_opinion_option() is None
    # a manifest written before the check keeps loading as it was fitted
    ModelConfig(backbone="efficientnet_lite0", autoencoder="none", fusion="max").validate(loading=True)


def test_a_library_caller_s_parameters_round_trip_whatever_the_fit_would_read(fitted_model, tmp_path):
    """The refusal, made a check of every ModelConfig, raised where a library caller was served (review of session
    63, docs/decisions.md): ``sklearn.base.clone`` of a model saved with ``--fusion max`` (as the command line fitted
    it until then), ``set_params`` changing the second opinion of a model built with ``fusion="max"``, and so a
    grid search over ``autoencoder`` and ``fusion`` together, which sets each candidate's parameters outside the
    part of a search that scores a failed fit as such: the whole search raised."""
    import json

    from sklearn.base import clone

    from conftest import write_manifest

    where = fitted_model.save(tmp_path / "m")
    manifest = json.loads((where / "manifest.json").read_text())
    write_manifest(where, {**manifest, "config": {**manifest["config"], "fusion": "max"}})
    loaded = AnomalyModel.load(where, device="cpu")
    assert clone(loaded).get_params()["fusion"] == "max"
    model = AnomalyModel(backbone="efficientnet_lite0", autoencoder="features", fusion="max")
    assert model.set_params(autoencoder="global").get_params()["autoencoder"] == "global"
    with pytest.raises(ConfigError, match="fusion"):  # what no fit can read is still refused as before
        model.set_params(fusion="mode")


@pytest.mark.parametrize("strength", [0.2, 0.9])
def test_a_feature_autoencoder_model_is_not_described_as_the_knn_alone(strength):
    """A fit with --autoencoder features printed (and `anomaly info` repeated) "the kNN alone fits" on a surface, or
    suggested the branch as if the model had no second opinion, beside its own line naming the feature
    autoencoder."""
    from types import SimpleNamespace

    from anomaly_service.cli.describe import describe_layout

    manifest = SimpleNamespace(training=SimpleNamespace(layout_strength=strength, second_opinion=None),
                               autoencoder=SimpleNamespace(config={"kind": "features"}), config={})
    line = describe_layout(manifest)
    assert "kNN alone" not in line and "--autoencoder global can" not in line and "features" in line



def test_an_update_replays_the_branch_layout_as_often_as_it_teaches_the_added_one(monkeypatch):
    """A held-out fit keeps only its few held-out grids to replay: an update of many added photos trained the
    branch on them nearly alone, and it forgot the layout the fit had learnt (40 boards held out 4, 20 boards with
    their lug moved added: 5 of 30 good boards then over the branch's threshold, against none before). And with few
    of both, an epoch was a handful of steps: 4 moved boards added to a held-out fit of 30 left the branch's other
    moved boards at 1.3-1.9 of its threshold, where a leave-one-out fit's update (20 grids replayed) brought them
    under it. Each group now comes back as often as the larger, and at least FINE_TUNE_SHARE times an epoch."""
    import torch

    from anomaly_service.autoencoder import FINE_TUNE_SHARE, AEConfig, ReconstructionScorer

    branch = ReconstructionScorer(AEConfig.for_kind("global", 1, seed=0), 6)
    drawn: list[int] = []
    batches = ReconstructionScorer._batches

    def counted(self, samples, ids, gen):
        drawn.extend(ids)
        return batches(self, samples, ids, gen)

    monkeypatch.setattr(ReconstructionScorer, "_batches", counted)
    grids = [torch.randn(8, 8, 6, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    for added, replay in ((grids[:20], grids[20:]), (grids[:2], grids[2:22]), (grids[:4], grids[4:7])):
        drawn.clear()
        branch.fine_tuned(added, replay, epochs=1)
        taught = sum(i < len(added) for i in drawn)
        assert abs(taught - (len(drawn) - taught)) <= max(len(added), len(replay)) // 2, (len(added), taught)
        assert min(taught, len(drawn) - taught) >= FINE_TUNE_SHARE * 0.8, (len(added), len(replay), taught)
