"""The autoencoder second opinion: it learns normals, flags a defect, fuses by a documented rule, round-trips."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anomaly_service import AnomalyModel
from anomaly_service.autoencoder import AEConfig, ReconstructionScorer
from anomaly_service.errors import ConfigError, ModelFormatError
from anomaly_service.decision import fuse
from conftest import add_defect, textured_part


@pytest.fixture(scope="module")
def ae_model(rng_images):
    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        calibration_fraction=0.25, autoencoder="features", ae_epochs=40).fit(rng_images)


def test_training_reduces_reconstruction_error_on_normals():
    rng = np.random.default_rng(0)
    # 'normal' feature grids with the structure backbone features have: 24 correlated dimensions driven by a few
    # smooth latent fields (the same mixing for every image), plus a little noise
    latent = torch.from_numpy(rng.standard_normal((48, 4, 6, 6)).astype(np.float32))
    latent = torch.nn.functional.interpolate(latent, size=(16, 16), mode="bilinear")
    mixing = torch.from_numpy(rng.standard_normal((4, 24)).astype(np.float32))
    feats = torch.einsum("bchw,cd->bhwd", latent, mixing) + 0.05 * torch.randn(48, 16, 16, 24)
    samples = list(feats)
    held_out = samples[-3:]
    scorer = ReconstructionScorer(AEConfig(epochs=60, batch_size=8, seed=1), channels=24)
    stats = scorer.fit(samples[:-3], progress=False)
    assert stats["best_val_loss"] < 0.5 * stats["initial_val_loss"]
    untrained = ReconstructionScorer(AEConfig(seed=1), channels=24)
    untrained.mean.copy_(scorer.mean)
    untrained.std.copy_(scorer.std)
    x = torch.stack(held_out)
    assert scorer.error_grid(x).mean() < 0.5 * untrained.error_grid(x).mean()  # generalises to unseen normals


def test_defect_scores_above_normals_for_the_autoencoder_and_fused(ae_model):
    rng = np.random.default_rng(21)
    goods = [ae_model.score(textured_part(rng)) for _ in range(4)]
    bad = ae_model.score(add_defect(textured_part(rng), 64, 64, radius=12)[0])
    for name in ("knn", "autoencoder"):
        assert bad.scorers[name]["score"] > max(g.scorers[name]["score"] for g in goods)
        assert bad.scorers[name]["is_anomaly"]
    assert bad.is_anomaly and bad.normalized_score > max(g.normalized_score for g in goods)
    # the fused map is on the fused calibration: the defect is hot, a good part mostly cool
    assert bad.normalized_map()[54:74, 54:74].max() > 1.0
    assert np.median(goods[0].normalized_map()) < 1.0
    assert {"autoencoder", "knn", "backbone", "total"} <= set(bad.timing_ms)


def test_fusion_rules():
    assert fuse(2.0, 0.0, "mean", 0.5) == 1.0 and fuse(2.0, 0.0, "mean", 0.75) == 1.5
    assert fuse(0.0, 2.0, "mean", 0.75) == 0.5 and fuse(1.0, 3.0, "mean", 0.25) == 2.5  # the other opinion's share
    assert fuse(2.0, 3.0, "max") == 3.0
    np.testing.assert_array_equal(fuse(np.array([1.0, 4.0]), np.array([2.0, 3.0]), "max"), [2.0, 4.0])
    with pytest.raises(ConfigError):
        fuse(1.0, 1.0, "knn")  # one scorer alone is a benchmark comparison, not a product rule


def test_score_is_the_knn_opinion_and_the_decision_is_fused(ae_model):
    """``score``/``threshold`` stay in kNN distance units; ``normalized_score``/``is_anomaly`` are the fused
    decision."""
    bad = ae_model.score(add_defect(textured_part(np.random.default_rng(4)), 40, 40)[0])
    knn, ae = bad.scorers["knn"], bad.scorers["autoencoder"]
    assert bad.score == knn["score"] and bad.threshold == knn["threshold"]
    assert float(bad.anomaly_map.max()) == pytest.approx(bad.score)  # map-max: the kNN map's hottest pixel
    fused = 0.5 * knn["normalized_score"] + 0.5 * ae["normalized_score"]
    cal = ae_model.calibration_
    assert bad.normalized_score == pytest.approx(float(cal.normalize(fused)), rel=1e-5)
    assert bad.is_anomaly == (bad.normalized_score > 1.0)


def test_save_load_round_trip_is_identical(ae_model, tmp_path):
    path = ae_model.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["autoencoder"]["version"] == 1 and manifest["autoencoder"]["config"]["kind"] == "features"
    assert manifest["fusion"]["rule"] == "mean" and "autoencoder.pt" in manifest["files"]
    loaded = AnomalyModel.load(path)
    img = add_defect(textured_part(np.random.default_rng(5)), 30, 90)[0]
    a, b = ae_model.score(img), loaded.score(img)
    assert a.score == b.score and a.scorers == b.scorers and a.is_anomaly == b.is_anomaly
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    np.testing.assert_array_equal(a.normalized_map(), b.normalized_map())
    (path / "autoencoder.pt").write_bytes(b"x" * 10)
    with pytest.raises(ModelFormatError):
        AnomalyModel.load(path)


def test_cli_flag_and_api_report_both_scorers(synthetic_category, tmp_path):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    out = tmp_path / "models" / "part"
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(out),
                                   "-q", "--backbone", "efficientnet_lite0", "--image-size", "128",
                                   "--calibration-fraction", "0.25", "--autoencoder", "--ae-epochs", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["autoencoder"]["config"]["kind"] == "features"
    rows = CliRunner().invoke(app, ["score", "--model", str(out), str(synthetic_category / "test/blob/000.png"),
                                    "--json"])
    row = json.loads(rows.stdout.splitlines()[0])
    assert set(row["scorers"]) == {"knn", "autoencoder"}
    with TestClient(create_app(ServiceSettings(model_dir=tmp_path / "models", reload_interval=0))) as c:
        photo = (synthetic_category / "test/blob/000.png").read_bytes()
        body = c.post("/score", files={"file": ("x.png", photo)}).json()
        assert body["scorers"].keys() == row["scorers"].keys()
        for name, opinion in body["scorers"].items():  # the service and the CLI give one answer
            assert opinion["threshold"] == row["scorers"][name]["threshold"]
            assert opinion["normalized_score"] == pytest.approx(row["scorers"][name]["normalized_score"], rel=1e-5)
            assert opinion["reads"] == "patches"  # the feature autoencoder judges patches, not the layout


def _grid_store(n: int = 12, seed: int = 4):
    from anomaly_service.patch_store import PatchStore

    rng = np.random.default_rng(seed)
    store = PatchStore()
    for _ in range(n):
        store.add(torch.from_numpy(rng.normal(size=(16, 16, 20)).astype(np.float32)))
    return store


def test_branch_trained_beside_the_greedy_is_the_one_trained_after_it():
    """The fit trains the whole-image branch on a thread of its own while the coreset greedy runs (model.py,
    BranchBeside): its weights are exactly those of the same branch trained alone, and its initial weights come
    from the config's seed, not from what drew on torch's global generator before."""
    from anomaly_service.coreset import greedy_coreset
    from anomaly_service.branch_beside import BranchBeside, StoredGrids

    config = AEConfig.for_kind("global", 8, seed=3)
    selected = np.arange(0, 20, 2)
    with _grid_store() as store:
        beside = BranchBeside(store, list(range(12)), config, sigma=4.0, progress=False)
        beside.start(selected)
        greedy_coreset(torch.randn(20000, 32, generator=torch.Generator().manual_seed(0)), 2000, progress=False)
        torch.randn(100)  # a draw on the global generator while the branch trains must not matter
        scorer, stats = beside.result()
        torch.manual_seed(12345)  # nor the global state the branch trained alone starts from
        alone = ReconstructionScorer(config, len(selected))
        alone.fit(StoredGrids(store, list(range(12)), torch.from_numpy(selected)), progress=False)
    assert stats["epochs"] >= 1 and stats["seconds"] >= 0
    for (name, a), b in zip(scorer.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_error_in_the_branch_beside_the_greedy_reaches_the_fit():
    from anomaly_service.branch_beside import BranchBeside

    with _grid_store(n=1) as store:  # one image: the branch refuses to train
        beside = BranchBeside(store, [0], AEConfig.for_kind("global", 2, seed=0), sigma=4.0, progress=False)
        beside.start(np.arange(5))
        with pytest.raises(ConfigError, match="at least 2"):
            beside.result()


def test_ctrl_c_while_waiting_for_the_branch_still_stops_it(monkeypatch):
    """Ctrl-C while the fit waits for the branch, then the fit's clean-up cancels it: the cancel waits until the
    training has really stopped. (On Python 3.11 an interrupted Thread.join marked the thread stopped while it
    still trained, the cancel returned at once, and the interpreter aborted on the thread at exit.)"""
    import os
    import signal
    import threading
    import time

    from anomaly_service import branch_beside
    from anomaly_service.branch_beside import BranchBeside

    finished = threading.Event()

    def training(scorer, samples, progress, stop=None):  # trains until told to stop, an epoch at a time
        try:
            while not stop.is_set():
                time.sleep(0.05)
            time.sleep(0.3)  # the epoch it was in
            return {"epochs": 1, "seconds": 0.0}
        finally:
            finished.set()

    monkeypatch.setattr(branch_beside, "train_timed", training)
    # Python's own Ctrl-C handler, whatever pytest was started under: one started in the background by a script
    # inherits SIGINT ignored, and the wait below never ended
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _grid_store(n=2) as store:
            beside = BranchBeside(store, [0, 1], AEConfig.for_kind("global", 2, seed=0), sigma=4.0, progress=False)
            beside.start(np.arange(5))
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # a real Ctrl-C, as a user sends
            with pytest.raises(KeyboardInterrupt):
                beside.result()
            beside.cancel()
            assert finished.is_set() and not beside.running()
    finally:
        signal.signal(signal.SIGINT, handler)


# No GPU here: the two tests below stand in for it with torch's "meta" device, on which tensors have shapes but no
# storage. On a GPU a fit's branch trained on its patch store's host grids stayed there and failed the first batch
# of GPU features it scored; and its training's mask was drawn by the CPU generator on the GPU, which torch refuses.

def test_branch_trained_on_host_grids_is_left_on_the_scoring_device():
    rng = np.random.default_rng(4)
    samples = [torch.from_numpy(rng.normal(size=(8, 8, 6)).astype(np.float32)) for _ in range(6)]
    scorer = ReconstructionScorer(AEConfig(epochs=2, batch_size=4, seed=0), channels=6)
    scorer.fit(samples, progress=False, device=torch.device("meta"))
    placed = {t.device.type for t in [*scorer.parameters(), *scorer.buffers()]}
    assert placed == {"meta"}
    alone = ReconstructionScorer(AEConfig(epochs=2, batch_size=4, seed=0), channels=6)
    alone.fit(samples, progress=False)  # no device: it stays where it trained
    assert {t.device.type for t in alone.parameters()} == {"cpu"}


def test_masked_inputs_are_drawn_on_the_cpu_whatever_device_the_batch_is_on():
    scorer = ReconstructionScorer(AEConfig(seed=0), channels=4)
    on_cpu, elsewhere = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    scorer._corrupt(torch.ones(3, 4, 8, 8), on_cpu)
    masked = scorer._corrupt(torch.ones(3, 4, 8, 8, device="meta"), elsewhere)
    assert masked.device.type == "meta"
    # the same draw from the same generator: the mask came from it, on the CPU, and was moved to the batch
    assert torch.equal(on_cpu.get_state(), elsewhere.get_state())
