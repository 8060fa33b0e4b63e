"""The backbone's ONNX graph kept between processes (graph_cache.py): a later load reads it back instead of building
the network and exporting it, scores the same, and never trusts a graph it cannot vouch for."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from anomaly_service import graph_cache
from conftest import textured_part

WARM = """
import sys
import numpy as np
from anomaly_service import AnomalyModel
model = AnomalyModel.load(sys.argv[1])
score = model.score(np.load(sys.argv[2])).score
print(model.runtime, score, *(name in sys.modules for name in ("timm", "torchvision", "onnx")))
"""


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, and no network or export left over from the tests before it."""
    import anomaly_service.backbones as backbones
    import anomaly_service.onnx_backbone as onnx_backbone

    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones, "_SHARED", weakref.WeakValueDictionary())
    monkeypatch.setattr(onnx_backbone, "_EXPORTS", weakref.WeakKeyDictionary())
    return tmp_path / "cache" / "onnx"


def _tensor_bytes() -> int:
    import torch

    gc.collect()
    # type(), not isinstance(): the objects include weak proxies, and isinstance() on one whose referent has gone
    # raises ReferenceError (it asks the proxy for its __class__)
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_a_later_process_scores_from_the_cached_graph_and_a_damaged_one_is_exported_again(model_dir, own_cache,
                                                                                          tmp_path, caplog):
    """The first load exports the graph and keeps it; a process after it builds no network (timm, torchvision and
    onnx are never imported) and gives the same score. A graph whose bytes changed on disk is said and exported
    again, never run. A load from the graph holds none of the weights."""
    import anomaly_service.backbones as backbones
    import anomaly_service.onnx_backbone as onnx_backbone
    from anomaly_service import AnomalyModel

    image = textured_part(np.random.default_rng(7))
    first = AnomalyModel.load(model_dir / "part")
    assert first.runtime == "onnx"
    expected = first.score(image).score
    assert sorted(p.suffix for p in own_cache.iterdir()) == [".json", ".onnx"]
    np.save(tmp_path / "image.npy", image)
    out = subprocess.run([sys.executable, "-c", WARM, str(model_dir / "part"), str(tmp_path / "image.npy")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "onnx" and out[2:] == ["False", "False", "False"], out
    assert float(out[1]) == pytest.approx(expected, rel=1e-6)

    graph = next(own_cache.glob("*.onnx"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: still a graph ONNX Runtime would run
    graph.write_bytes(bytes(data))
    backbones._SHARED.clear()
    onnx_backbone._EXPORTS.clear()
    with caplog.at_level(logging.WARNING):
        again = AnomalyModel.load(model_dir / "part")
    assert "not the one written" in caplog.text
    assert again.score(image).score == pytest.approx(expected, rel=1e-6)
    assert graph_cache.load(graph.stem) == graph.read_bytes() != bytes(data)  # written anew, whole

    # a load from the graph kept holds no state dict for a build that may never come (the whole of it, more than the
    # built network held before the cache); a build asked for later reads the weights again
    backbones._SHARED.clear()
    onnx_backbone._EXPORTS.clear()
    del first, again
    before = _tensor_bytes()
    warm = AnomalyModel.load(model_dir / "part")
    assert warm.score(image).score == pytest.approx(expected, rel=1e-6)
    backbone = warm.embedder.backbone
    assert not backbone.built
    assert _tensor_bytes() - before < 2**20  # Lite0's state dict is many MB (docs/decisions.md)
    extractor = backbone.extractor
    assert backbone.built and len(extractor(__import__("torch").zeros(1, 3, 64, 64))) == 2


def test_a_graph_others_could_have_written_is_not_read(own_cache, caplog):
    graph_cache.store("k", b"graph bytes", {})
    assert graph_cache.load("k") == b"graph bytes"
    own_cache.chmod(0o777)
    with caplog.at_level(logging.INFO, logger="anomaly_service.graph_cache"):
        assert graph_cache.load("k") is None
    # a WARNING: the commands (a re-scoring shard) show no INFO, and each run would export again without a word
    assert [r.levelno for r in caplog.records if "writable by other users" in r.message] == [logging.WARNING]
    own_cache.chmod(0o700)
    (own_cache / "k.onnx").chmod(0o666)
    assert graph_cache.load("k") is None
    (own_cache / "k.onnx").unlink()
    (own_cache / "k.onnx").symlink_to(own_cache / "k.json")  # a link is not followed to whatever it names
    assert graph_cache.load("k") is None


def test_a_cache_that_cannot_be_written_costs_nothing_but_the_export(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "file"))
    with caplog.at_level(logging.INFO, logger="anomaly_service.graph_cache"):
        graph_cache.store("k", b"graph", {})
        assert graph_cache.load("k") is None
    assert "could not be written" in caplog.text
    for off in ("none", "off", ""):
        monkeypatch.setenv("ANOMALY_CACHE_DIR", off)
        assert graph_cache.cache_dir() is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANOMALY_CACHE_DIR", "~/graphs")  # as a unit's Environment= passes it: no folder named ~
    assert graph_cache.cache_dir() == tmp_path / "home" / "graphs" / "onnx"


def test_the_key_changes_with_what_the_graph_is_made_from():
    base = graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 17)
    assert base == graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 17)
    others = {graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "b" * 64, 17),
              graph_cache.graph_key("efficientnet_lite1", ("blocks.2", "blocks.4"), "a" * 64, 17),
              graph_cache.graph_key("efficientnet_lite0", ("blocks.1", "blocks.4"), "a" * 64, 17),
              graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 18)}
    assert base not in others and len(others) == 4


def test_an_install_whose_source_cannot_be_read_keeps_no_graph(own_cache, monkeypatch):
    """A frozen or zipped install has no module files to key a graph by: nothing is kept or read, and a load goes
    on (it exports, as before the cache)."""
    monkeypatch.setattr(graph_cache, "_SOURCES", ("no_such_module.py",))
    key = graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 17)
    assert key is None
    graph_cache.store(key, b"graph", {})
    assert graph_cache.load(key) is None and not own_cache.exists()


def test_the_key_follows_the_installed_network_code(tmp_path, monkeypatch):
    """timm builds the Lite networks and torchvision the ResNets: another release of either may trace to another
    graph, so it is another key (a distribution found first on the path stands for an upgrade)."""
    base = graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 17)
    for dist in ("timm", "torchvision"):
        info = tmp_path / dist / f"{dist}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        with monkeypatch.context() as m:
            m.syspath_prepend(str(tmp_path / dist))
            assert graph_cache.graph_key("efficientnet_lite0", ("blocks.2", "blocks.4"), "a" * 64, 17) != base


BROKEN_RUNTIME = """
import sys
from anomaly_service.backbones import load_backbone
from anomaly_service.errors import ConfigError
from anomaly_service.onnx_backbone import resolve_runtime, shared_extractor
backbone = load_backbone("efficientnet_lite0", progress=False, defer_build=True)
try:
    shared_extractor(backbone)
except (ImportError, ConfigError):
    print(backbone.built, "timm" in sys.modules, "onnx" in sys.modules, resolve_runtime("auto", "cpu"))
"""


def test_a_broken_onnxruntime_is_not_blamed_on_the_cached_graph(own_cache, tmp_path):
    """onnxruntime installed but failing to import (a missing shared library): the cached graph is not "refused"
    and the network not built and exported only to fail the same way; the embedder falls back to PyTorch at once."""
    from anomaly_service.backbones import load_backbone
    from anomaly_service.onnx_backbone import OPSET

    backbone = load_backbone("efficientnet_lite0", progress=False, defer_build=True)
    key = graph_cache.graph_key(backbone.spec.name, backbone.spec.layers, backbone.checksum, OPSET)
    graph_cache.store(key, b"a graph kept", {})  # never run: the session cannot be made without onnxruntime
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open shared object file')\n")
    out = subprocess.run([sys.executable, "-c", BROKEN_RUNTIME], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}).stdout.split()
    assert out == ["False", "False", "False", "torch"], out  # auto resolves to PyTorch, as with none installed
