"""Drift on the line: a clean stream of good parts raises no alarm, a brightness ramp does, and the reference
comes from the model's own calibration images."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_service.drift import DriftMonitor, psi, typical_distance
from conftest import textured_part


def _stream(model, images, monitor):
    for r in model.score_many(images):
        monitor.observe(r.normalized_score, typical_distance(r.anomaly_map))


def test_clean_stream_stays_quiet_and_a_brightness_ramp_alarms(fitted_model):
    cal = fitted_model.calibration_
    assert len(cal.holdout_distances) == cal.n_images  # recorded at fit, for this reference
    monitor = DriftMonitor.for_calibration(cal, window=40, min_parts=20)
    rng = np.random.default_rng(123)
    _stream(fitted_model, [textured_part(rng) for _ in range(40)], monitor)
    clean = monitor.status()
    assert clean.parts == 40 and not clean.alarm
    monitor.reset()
    brighter = [np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8) for _ in range(40)]
    _stream(fitted_model, brighter, monitor)
    drifted = monitor.status()
    assert drifted.alarm and drifted.drift > clean.drift
    assert drifted.window_median["typical_distance"] > drifted.reference_median["typical_distance"]


def test_no_alarm_before_enough_parts():
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20)}, window=50, min_parts=30)
    for _ in range(29):
        monitor.observe(5.0, 0.0)  # wildly off, but too few parts to say
    assert not monitor.status().alarm
    monitor.observe(5.0, 0.0)
    assert monitor.status().alarm


def test_models_without_distances_track_the_score_alone():
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20), "typical_distance": np.array([])})
    assert set(monitor.status().p_values) == {"normalized_score"}
    with pytest.raises(ValueError):
        DriftMonitor({"typical_distance": np.array([1.0])})


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=2000)
    assert psi(ref, rng.normal(size=2000)) < 0.05 < psi(ref, rng.normal(1.0, size=2000))


def test_service_reports_drift_per_model_in_its_route_and_metrics(model_dir):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings
    from conftest import png_bytes

    # the session model holds out only four calibration images: a looser alpha lets twelve parts decide
    settings = ServiceSettings(model_dir=model_dir, reload_interval=0, record=False, drift_window=20,
                               drift_min_parts=10, drift_alpha=0.01)
    rng = np.random.default_rng(5)
    with TestClient(create_app(settings)) as c:
        before = c.get("/models/part/drift").json()
        assert before["parts"] == 0 and not before["alarm"]
        for _ in range(12):
            bright = np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)
            assert c.post("/score", files={"file": ("x.png", png_bytes(bright))}).status_code == 200
        after = c.get("/models/part/drift").json()
        assert after["parts"] == 12 and after["alarm"] and after["drift"] > 0.5
        metrics = c.get("/metrics").text
        assert 'anomaly_drift_alarm{model="part"} 1.0' in metrics
        assert c.get("/models/nope/drift").status_code == 404


def test_a_significant_but_small_difference_does_not_alarm():
    """With a full window a harmless offset between calibration images and the line's good parts is significant;
    the alarm also needs the distributions to separate (min_effect)."""
    rng = np.random.default_rng(1)
    monitor = DriftMonitor({"normalized_score": rng.normal(0.5, 0.1, 400)}, window=2000, min_parts=30)
    for v in rng.normal(0.53, 0.1, 2000):
        monitor.observe(v, 0.0)
    small = monitor.status()
    assert small.p_values["normalized_score"] < 1e-3 and not small.alarm
    for v in rng.normal(1.0, 0.1, 2000):
        monitor.observe(v, 0.0)
    assert monitor.status().alarm
