"""``--runtime onnx``: the backbone exported to ONNX Runtime gives the same scores and maps as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import add_defect, textured_part

from anomaly_service import AnomalyModel, ConfigError

pytest.importorskip("onnxruntime")


def test_onnx_runtime_matches_pytorch(model_dir, tmp_path):
    rng = np.random.default_rng(7)
    tall, _ = add_defect(textured_part(rng, 160, 96), 80, 48)  # another size than the fit: dynamic axes
    images = [tall, textured_part(rng)]
    torch_model = AnomalyModel.load(model_dir / "part", runtime="torch")
    onnx_model = AnomalyModel.load(model_dir / "part", runtime="onnx")
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
