"""``--runtime onnx``: the backbone exported to ONNX Runtime gives the same scores and maps as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import add_defect, textured_part

from anomaly_service import AnomalyModel, ConfigError


def test_onnx_runtime_matches_pytorch(model_dir, tmp_path):
    rng = np.random.default_rng(7)
    tall, _ = add_defect(textured_part(rng, 160, 96), 80, 48)  # another size than the fit: dynamic axes
    images = [tall, textured_part(rng)]
    torch_model = AnomalyModel.load(model_dir / "part", runtime="torch")
    onnx_model = AnomalyModel.load(model_dir / "part", runtime="onnx")
    assert (torch_model.runtime, onnx_model.runtime) == ("torch", "onnx")  # two runtimes compared, not one twice
    for im in images:
        a, b = torch_model.score(im), onnx_model.score(im)
        assert b.score == pytest.approx(a.score, rel=1e-4)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-4, atol=1e-4 * a.anomaly_map.max())
        assert a.is_anomaly == b.is_anomaly


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(ConfigError, match="runtime must be one of"):
        AnomalyModel(runtime="tensorrt")


def test_runtime_selection():
    """auto takes ONNX Runtime on the CPU when installed; GPUs always run PyTorch."""
    from anomaly_service.onnx_backbone import onnx_available, resolve_runtime

    assert onnx_available()
    assert resolve_runtime("auto", "cpu") == "onnx"
    assert resolve_runtime("torch", "cpu") == "torch"
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("onnx", "cuda") == "torch"
    assert AnomalyModel(backbone="efficientnet_lite0", device="cpu").runtime == "onnx"


def test_auto_runtime_falls_back_to_pytorch_when_export_fails(model_dir, monkeypatch, caplog):
    """An op ONNX cannot export must not take the service down under auto; an explicit onnx says why it failed."""
    import weakref

    import anomaly_service.backbones as backbones_module
    import anomaly_service.onnx_backbone as onnx_module

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_module, "OnnxExtractor", broken)
    # a backbone of its own, so that no export an earlier test made for the shared one is found
    monkeypatch.setattr(backbones_module, "_SHARED", weakref.WeakValueDictionary())
    im = textured_part(np.random.default_rng(3))
    reference = AnomalyModel.load(model_dir / "part", runtime="torch").score(im).score
    with caplog.at_level("WARNING"):
        auto = AnomalyModel.load(model_dir / "part", runtime="auto")
    assert auto.runtime == "torch" and "using PyTorch" in caplog.text
    assert auto.score(im).score == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ConfigError, match="could not run the backbone in ONNX Runtime"):
        AnomalyModel.load(model_dir / "part", runtime="onnx")


def test_models_of_one_backbone_share_one_onnx_export(model_dir, tmp_path):
    """A service of twenty models on one backbone held twenty exports and their sessions (a copy of the network
    each); models of the same weights now share one, and a model of another backbone gets its own."""
    import gc

    im = textured_part(np.random.default_rng(5))
    a = AnomalyModel.load(model_dir / "part", runtime="onnx")
    expected = a.score(im).score
    b = AnomalyModel.load(model_dir / "part", runtime="onnx")
    assert b.embedder._onnx is a.embedder._onnx
    del a
    gc.collect()  # the first model is gone (a reload swapped it): the second scores on as before
    assert b.score(im).score == pytest.approx(expected, rel=1e-6)
    other = AnomalyModel(backbone="efficientnet_lite1", device="cpu", runtime="onnx")
    other.embedder.prepare_runtime()
    assert other.runtime == "onnx" and other.embedder._onnx is not b.embedder._onnx


@pytest.mark.usefixtures("process_threads")
def test_onnx_sessions_follow_the_thread_budget(model_dir):
    """A pass under a 1-thread budget runs in a 1-thread session, with the same answer. The sessions are the
    export's, shared by every model of these weights: other models of the process may have made others."""
    import torch

    from anomaly_service.parallelism import intra_op_threads

    model = AnomalyModel.load(model_dir / "part", runtime="onnx")
    im = textured_part(np.random.default_rng(4))
    before = set(model.embedder.onnx_session_threads)
    full = model.score(im).score
    assert set(model.embedder.onnx_session_threads) == before | {torch.get_num_threads()}
    with intra_op_threads(1):
        one = model.score(im).score
    assert set(model.embedder.onnx_session_threads) == before | {1, torch.get_num_threads()}
    assert one == pytest.approx(full, rel=1e-5)


@pytest.mark.usefixtures("process_threads")
def test_service_warms_the_concurrent_session(model_dir):
    """The app builds each model's ONNX session for the concurrent share at start-up, not in the first busy pass."""
    import torch
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    app = create_app(ServiceSettings(model_dir=model_dir, reload_interval=0, runtime="onnx", inference_workers=2))
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        model = app.state.service.model_entry("part").model
        assert max(1, torch.get_num_threads() // 2) in model.embedder.onnx_session_threads


@pytest.mark.usefixtures("process_threads")
def test_a_model_loaded_by_its_reload_route_is_warmed(model_dir, rng_images, tmp_path):
    """A variant added to a running service with POST /models/{name}/reload took traffic unwarmed (the re-scan,
    an update and a rollback warm theirs): on a backbone no other model uses, its first busy pass built a session."""
    import shutil

    import torch
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    root = tmp_path / "models"
    shutil.copytree(model_dir / "part", root / "part")
    app = create_app(ServiceSettings(model_dir=root, reload_interval=0, runtime="onnx", inference_workers=2,
                                     record=False))
    with TestClient(app) as c:
        AnomalyModel(backbone="efficientnet_lite1", image_size=96, coreset_ratio=0.25, progress=False,
                     calibration_fraction=0.25).fit(rng_images[:8]).save(root / "lite1")
        assert c.post("/models/lite1/reload").status_code == 200
        model = app.state.service.model_entry("lite1").model
        assert max(1, torch.get_num_threads() // 2) in model.embedder.onnx_session_threads


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_onnx_export_of_the_larger_lites_matches_pytorch(name):
    """Every offline backbone runs in ONNX Runtime with PyTorch's feature maps (dynamic height and width)."""
    import torch

    from anomaly_service.backbones import load_backbone
    from anomaly_service.onnx_backbone import OnnxExtractor

    extractor = load_backbone(name, progress=False).extractor
    x = torch.randn(2, 3, 160, 96, generator=torch.Generator().manual_seed(0))
    for a, b in zip(extractor(x), OnnxExtractor(extractor, threads=1)(x)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * float(a.abs().max()))


ARENA_PROBE = """
import re, sys
import numpy as np
import torch
from anomaly_service.backbones import load_backbone
from anomaly_service.onnx_backbone import OnnxExtractor

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

onnx = OnnxExtractor(load_backbone("efficientnet_lite0", progress=False).extractor, threads=1)
onnx.session_for(2)
x = {"x": np.zeros((4, 3, 384, 384), np.float32)}
before = rss()
onnx.session_for(1).run(None, x)
first = rss()
onnx.session_for(2).run(None, x)
print(first - before, rss() - first)
"""


def test_sessions_of_every_thread_budget_share_one_arena():
    """Each thread budget's session kept an arena the size of its largest pass, so a tiled model's batch of tiles
    was held twice (and again per backbone). The second budget's pass now reuses the memory of the first."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ARENA_PROBE], capture_output=True, text=True, check=True).stdout
    first, second = (int(v) for v in out.split())
    assert first > 32 * 2**20  # the pass needed memory (else the comparison says nothing)
    assert second < first / 4, (first, second)


NO_ARENA_PROBE = """
import logging, sys
import numpy as np
import onnxruntime as ort
import torch
from anomaly_service import onnx_backbone
from anomaly_service.backbones import load_backbone

def refused(*args, **kwargs):  # as an onnxruntime without the call, or one that refuses a second arena, answers
    raise RuntimeError("allocator already registered")

ort.create_and_register_allocator = refused
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
extractor = load_backbone("efficientnet_lite0", progress=False).extractor
x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
onnx = onnx_backbone.OnnxExtractor(extractor, threads=1)
for a, b in zip(extractor(x), onnx(x)):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * float(a.abs().max()))
print("shared arena:", onnx_backbone._ARENA)
"""


def test_sessions_run_on_arenas_of_their_own_where_onnxruntime_registers_no_shared_one():
    """Where this onnxruntime cannot register the process's shared arena, each session keeps its own and the
    backbone runs as before (said once in the log), not a model that fails to load."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NO_ARENA_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ONNX Runtime sessions keep arenas of their own (allocator already registered)" in out.stdout
    assert "shared arena: False" in out.stdout


def test_a_stop_met_inside_onnxruntime_stops_the_load_rather_than_falling_back(model_dir, monkeypatch):
    """A SIGTERM (a container's stop, raised as KeyboardInterrupt) that lands while onnxruntime's C extension runs
    comes back as that extension's own error, the interrupt its cause (pybind11's ImportError "initialization
    failed"). Under auto that was taken for an export that failed: the fit went on in PyTorch and the stop was lost
    (seen in CI: a re-fit stopped by SIGTERM exited 0)."""
    import weakref

    import anomaly_service.backbones as backbones_module
    import anomaly_service.onnx_backbone as onnx_module

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(onnx_module, "OnnxExtractor", interrupted)
    monkeypatch.setattr(backbones_module, "_SHARED", weakref.WeakValueDictionary())
    monkeypatch.setattr(onnx_module, "_EXPORTS", weakref.WeakKeyDictionary())
    with pytest.raises(KeyboardInterrupt):
        AnomalyModel.load(model_dir / "part", runtime="auto")
