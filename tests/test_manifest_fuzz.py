"""Malformed manifests, generated: whatever a manifest holds, the service lists that one model with its error,
keeps serving the others, and never answers 5xx (a property-based test with hypothesis)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_service.api import create_app
from anomaly_service.settings import ServiceSettings
from conftest import write_manifest

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(manifest: dict, data: st.DataObject) -> dict:
    m = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(m)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
    return m


@pytest.fixture(scope="module")
def service_dir(model_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_models")
    shutil.copytree(model_dir / "part", root / "good")
    shutil.copytree(model_dir / "part", root / "fuzz")
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_any_manifest_gives_a_per_model_error_and_no_5xx(service_dir, data):
    original = json.loads((service_dir / "good" / "manifest.json").read_text())
    broken = _mutate(original, data)
    # signed: what the loader validates behind the manifest's checksum; unsigned: the checksum refuses it
    write_manifest(service_dir / "fuzz", broken, sign=data.draw(st.booleans()))
    app = create_app(ServiceSettings(model_dir=service_dir, reload_interval=0, runtime="torch", device="cpu"))
    with TestClient(app) as c:
        responses = [c.post("/models/reload"), c.post("/models/fuzz/reload"), c.get("/models"), c.get("/readyz")]
        assert all(r.status_code < 500 for r in responses), [(r.status_code, r.text[:200]) for r in responses]
        listing = responses[2].json()
        loaded = {m["name"] for m in listing["models"]}
        assert "good" in loaded  # one broken model never blocks another
        if "fuzz" not in loaded:  # served, or listed with why (and no server path)
            assert listing["errors"]["fuzz"] and str(service_dir) not in listing["errors"]["fuzz"]
        assert c.post("/score", params={"model": "good"}, files={"file": ("x.png", _png())}).status_code == 200


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    from conftest import textured_part

    buf = io.BytesIO()
    Image.fromarray(textured_part(np.random.default_rng(0))).save(buf, format="PNG")
    return buf.getvalue()


def test_nan_threshold_is_refused_at_load(service_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(service_dir / "good", path)
    m = json.loads((path / "manifest.json").read_text())
    m["calibration"]["threshold"] = math.nan
    write_manifest(path, m)
    from anomaly_service import AnomalyModel, ModelFormatError

    with pytest.raises(ModelFormatError, match="calibration.threshold"):
        AnomalyModel.load(path)
