"""Drift on the line: a clean stream of good parts raises no alarm, a brightness ramp does, and the reference
comes from the model's own calibration images."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_service.drift import DriftMonitor, compression_said, feature_distance, psi, typical_distance
from anomaly_service.image_map import ImageMap
from conftest import textured_part, write_manifest


def _stream(model, images, monitor):
    image_map = model.catalog_.image_map
    for r in model.score_many(images):
        monitor.observe(r.normalized_score, typical_distance(r.anomaly_map, r.calibration.pixel_sample),
                        feature_distance(image_map, r.matches.pooled))


def _monitor(model, **kwargs) -> DriftMonitor:
    return DriftMonitor.for_model(model.calibration_, model.catalog_.image_map, **kwargs)


def test_clean_stream_stays_quiet_and_a_brightness_ramp_alarms(fitted_model):
    cal = fitted_model.calibration_
    assert len(cal.holdout_distances) == cal.n_images  # recorded at fit, for this reference
    monitor = _monitor(fitted_model, window=40, min_parts=20)
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


def test_a_contrast_loss_moves_the_feature_distance(fitted_model):
    """The third quantity: the pooled feature's whitened distance, against the training images' out-of-fold
    distances kept in the model (image_map.py)."""
    image_map = fitted_model.catalog_.image_map
    assert image_map.distances is not None and image_map.distances.shape == (len(fitted_model.catalog_),)
    rng = np.random.default_rng(123)
    monitor = _monitor(fitted_model, window=40, min_parts=20)
    _stream(fitted_model, [textured_part(rng) for _ in range(40)], monitor)
    clean = monitor.status()
    assert set(clean.statistics) == {"normalized_score", "typical_distance", "feature_distance"}
    assert not clean.alarm
    monitor.reset()

    def flat(a: np.ndarray) -> np.ndarray:
        f = a.astype(np.float32)
        return np.clip(f.mean() + 0.6 * (f - f.mean()), 0, 255).astype(np.uint8)

    _stream(fitted_model, [flat(textured_part(rng)) for _ in range(40)], monitor)
    flattened = monitor.status()
    assert flattened.alarm
    assert flattened.statistics["feature_distance"] >= monitor.min_effect > clean.statistics["feature_distance"]
    assert flattened.window_median["feature_distance"] > flattened.reference_median["feature_distance"]


def test_feature_distance_reference_reads_like_new_good_parts():
    """Out-of-fold distances are what unseen parts of the same kind read; in-sample ones are too small (the PCA
    fitted its own images), which would make a clean line look drifted."""
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    scale = np.exp(-np.arange(120) / 8)
    train = rng.normal(size=(200, 120)) * scale
    m = ImageMap.fit(train)
    assert m.basis.shape == (20, 120) and m.spread.shape == (20,) and m.distances.shape == (200,)
    fresh = m.feature_distance(rng.normal(size=(2000, 120)) * scale)
    out_of_fold = ks_2samp(m.distances, fresh).statistic
    assert out_of_fold < 0.12 and out_of_fold < ks_2samp(m.feature_distance(train), fresh).statistic
    # whitened: a step along a direction the images barely vary in reads far more than the same step along the
    # main one
    step = np.zeros(120)
    step[15] = 3 * scale[0]
    assert m.feature_distance(train.mean(0) + step @ m.basis.T @ m.basis) > 5 * m.feature_distance(
        train.mean(0) + 3 * scale[0] * m.basis[0])
    # an update's images join the reference, measured on the fitted directions
    grown = m.extended(train[:3])
    np.testing.assert_allclose(grown.distances[200:], m.feature_distance(train[:3]), rtol=1e-5)
    assert ImageMap.fit(train[:8]).distances is None  # too few images to estimate two directions' spread


def test_duplicate_training_images_give_a_finite_reference():
    """A folder where most images are the same photo: the images outside a fold may not vary at all, which must
    not turn the reference into infinities (the drift route would fail to answer)."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(1, 30)), 15, axis=0)
    x[0] += rng.normal(size=30)
    x[5] += rng.normal(size=30)
    m = ImageMap.fit(x)
    assert m.distances is not None and np.isfinite(m.distances).all()
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20),
                            "feature_distance": np.array([1.0, np.inf, np.nan, 2.0, 3.0])})
    assert np.isfinite(monitor.reference["feature_distance"]).all() and len(monitor.reference["feature_distance"]) == 3


def test_parts_without_a_feature_distance_leave_only_its_window_short():
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20), "feature_distance": np.linspace(1, 2, 20)},
                           window=50, min_parts=10)
    for _ in range(12):
        monitor.observe(0.25, 0.0, None)  # e.g. a scorer without patch matches
    status = monitor.status()
    assert status.parts == 12 and status.statistics["feature_distance"] == 0.0 and not status.alarm
    for _ in range(10):
        monitor.observe(0.25, 0.0, 9.0)
    assert monitor.status().alarm and monitor.status().statistics["feature_distance"] == 1.0


def test_the_alarm_is_said_to_be_driven_by_a_quantity_with_enough_parts():
    """The page named the quantity of the largest statistic, which could be one of three parts (a statistic of 1.0
    on a short window is chance as often as drift). The status now says which quantity sounds the alarm, among
    those with enough parts, and how many parts each quantity's window holds."""
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20), "feature_distance": np.linspace(1, 2, 20)},
                           window=50, min_parts=10, alpha=0.01)
    for _ in range(3):
        monitor.observe(0.0, 0.0, 9.0)  # far above the feature reference, but only three parts with one
    for _ in range(9):
        monitor.observe(0.9, 0.0, None)
    status = monitor.status()
    assert status.quantity_parts == {"normalized_score": 12, "feature_distance": 3}
    assert status.statistics["feature_distance"] == 1.0 > status.statistics["normalized_score"] >= 0.7
    assert status.alarm and status.driven_by == "normalized_score"
    assert status.drift == status.statistics["normalized_score"]
    monitor.reset()
    monitor.observe(0.9, 0.0, 9.0)
    quiet = monitor.status()
    assert not quiet.alarm and quiet.driven_by is None and quiet.quantity_parts["feature_distance"] == 1


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
    # by hand, over the reference's two halves: 3/8 and 5/8 of the window against 1/2 and 1/2
    expected = (3 / 8 - 1 / 2) * np.log(3 / 4) + (5 / 8 - 1 / 2) * np.log(5 / 4)
    assert psi(np.arange(10.0), np.array([1, 2, 3, 7, 8, 9, 9, 9.0]), bins=2) == pytest.approx(expected)
    assert psi(np.full(50, 3.0), rng.normal(size=50)) == 0.0  # a reference without spread has no bins to compare


def _drift_settings(model_dir):
    """Service settings where twelve parts decide: the session model holds out only four calibration images, so
    a looser alpha."""
    from anomaly_service.settings import ServiceSettings

    return ServiceSettings(model_dir=model_dir, reload_interval=0, record=False, drift_window=20,
                           drift_min_parts=10, drift_alpha=0.01)


def _score_brightened(client, url: str = "/score", n: int = 12) -> None:
    """``n`` parts as a line whose lighting brightened would send them (a seeded stream)."""
    from conftest import png_bytes

    rng = np.random.default_rng(5)
    for _ in range(n):
        bright = np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)
        assert client.post(url, files={"file": ("x.png", png_bytes(bright))}).status_code == 200


def test_service_reports_drift_per_model_in_its_route_and_metrics(model_dir):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app

    with TestClient(create_app(_drift_settings(model_dir))) as c:
        before = c.get("/models/part/drift").json()
        assert before["parts"] == 0 and not before["alarm"]
        _score_brightened(c)
        after = c.get("/models/part/drift").json()
        assert after["parts"] == 12 and after["alarm"] and after["drift"] > 0.5
        # a photo sent again (a client's retry, its X-Request-ID the same or not) is no second part: each counted
        # again before, and one photo resent in a loop filled the window
        from conftest import png_bytes

        again = png_bytes(np.clip(textured_part(np.random.default_rng(5)).astype(np.int16) + 45, 0, 255).astype(
            np.uint8))  # the stream's first part
        for headers in ({"X-Request-ID": "part-7"}, {"X-Request-ID": "part-7"}, {}):
            assert c.post("/score", files={"file": ("x.png", again)}, headers=headers).status_code == 200
        assert c.get("/models/part/drift").json()["parts"] == 12
        # the route says which quantity sounds the alarm, one with enough parts: what the page's banner names
        assert after["quantity_parts"][after["driven_by"]] >= after["min_parts"]
        assert after["statistics"][after["driven_by"]] >= after["min_effect"]
        metrics = c.get("/metrics").text
        assert 'anomaly_drift_alarm{model="part"} 1.0' in metrics
        assert c.get("/models/nope/drift").status_code == 404
        # fitted on arrays: how hard its good photos were compressed is unknown, and no part is counted against it
        assert (after["compressed_harder"], after["fitted_quality"], after["compression"]) == (0, None, None)


def test_a_deleted_models_drift_alarm_leaves_the_metrics_and_the_log_says_it_ended(model_dir, tmp_path, caplog):
    """A model deleted from the model directory: its drift gauges go with it, or the Grafana alert on its last alarm
    fires for a model that no longer exists (a plant trial); its decision and score series go too. The log said
    when the alarm rose and never that it ended, so a log-based alert, or an engineer reading the log, saw an alarm
    on for good: the re-scan that drops the model says so once, and nothing of the removed load says more."""
    import logging
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    shutil.copytree(model_dir / "part", models / "gone")
    with TestClient(create_app(_drift_settings(models))) as c:
        _score_brightened(c, "/score?model=gone")
        assert 'anomaly_drift_alarm{model="gone"} 1.0' in c.get("/metrics").text
        service = c.app.state.service
        held = service.model_entry("gone")  # a drift read under way when the model goes: tested before, logged after
        tested = service.drift_status(held)
        version = held.version_id
        shutil.rmtree(models / "gone")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="anomaly_service"):
            assert c.post("/models/reload").json()["changes"] == {"gone": "removed"}
            ended = [r.getMessage() for r in caplog.records if "drift alarm" in r.getMessage()]
            assert ended == [f"drift alarm on model gone (version {version}) ended: the model was removed (a re-scan "
                             "no longer finds it in the model directory), so no part is judged against it any more"]
            metrics = c.get("/metrics").text
            service._log_drift(held, tested)  # the read that began before the removal: no alarm rises again
            c.get("/metrics")
        assert [r.getMessage() for r in caplog.records if "drift alarm" in r.getMessage()] == ended
        assert 'anomaly_drift_alarm{model="gone"}' not in metrics and 'anomaly_drift{model="gone"}' not in metrics
        assert 'anomaly_drift_alarm{model="part"}' in metrics  # the other model's gauges stay
        # nor do its decision and score series (a service that sees variants come and go would list them all)
        left = [line for line in metrics.splitlines() if 'model="gone"' in line]
        assert left and all(line.startswith("anomaly_model_reloads_") for line in left), left
        assert 'anomaly_model_reloads_total{model="gone",outcome="removed"} 1.0' in metrics
        # put back, it starts an empty window as a new serving: no alarm, and nothing said to be reset
        shutil.copytree(model_dir / "part", models / "gone")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="anomaly_service"):
            assert c.post("/models/reload").json()["changes"] == {"gone": "loaded"}
            back = c.get("/models/gone/drift").json()
            assert back["parts"] == 0 and not back["alarm"]
            assert 'anomaly_drift_alarm{model="gone"} 0.0' in c.get("/metrics").text
        assert not [r for r in caplog.records if "drift alarm" in r.getMessage()]


def _frames_waiting_in(code, deadline_s: float = 30.0) -> list:
    """The stack (innermost first) of the thread that is running ``code`` now, waiting until one is."""
    import sys
    import time

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for frame in sys._current_frames().values():
            stack = []
            while frame is not None:
                stack.append(frame)
                frame = frame.f_back
            if any(f.f_code is code for f in stack):
                return stack
        time.sleep(0.01)
    raise AssertionError(f"no thread reached {code.co_name}")


def test_a_scrape_runs_the_drift_tests_off_the_event_loop(model_dir):
    """On the event loop, every model's KS tests held up every request in flight on each scrape: they run on a
    worker thread, the loop answers meanwhile, and the gauges read what the drift route says."""
    import threading

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.api.lifecycle import Service

    with TestClient(create_app(_drift_settings(model_dir))) as c:
        _score_brightened(c)
        drift = c.get("/models/part/drift").json()
        service = c.app.state.service
        answers = []
        scrape = threading.Thread(target=lambda: answers.append(c.get("/metrics")))
        with service.drift._lock:  # the scrape's drift tests wait here, where they run
            scrape.start()
            stack = _frames_waiting_in(Service.export_drift.__code__)
            assert not [f for f in stack if f.f_code.co_name == "_run_once"], "drift tests run on the event loop"
            assert c.get("/healthz").status_code == 200
        scrape.join(30)
        metrics = answers[0].text
        assert f'anomaly_drift{{model="part"}} {drift["drift"]!r}' in metrics
        assert 'anomaly_drift_alarm{model="part"} 1.0' in metrics and drift["alarm"]


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


def test_an_update_rolled_back_to_the_same_version_starts_a_new_window(fitted_model, tmp_path):
    """docs/service.md: every model swap starts a new window. Keyed by version, an update and a rollback back to
    the version before, with nothing scored or scraped between them, left the old window (and its alarm) in place."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from conftest import png_bytes

    fitted_model.save(tmp_path / "part")
    with TestClient(create_app(_drift_settings(tmp_path))) as c:
        _score_brightened(c)
        drifted = c.get("/models/part/drift").json()
        assert drifted["parts"] == 12 and drifted["alarm"]
        before = c.get("/models/part/versions").json()["current"]
        rng = np.random.default_rng(6)
        r = c.post("/models/part/update", files=[("files", ("g.png", png_bytes(textured_part(rng))))])
        assert r.status_code == 200, r.text
        r = c.post("/models/part/rollback", json={"version": before})
        assert r.status_code == 200 and r.json()["current"] == before
        after = c.get("/models/part/drift").json()
        assert after["parts"] == 0 and not after["alarm"]
        assert 'anomaly_drift_alarm{model="part"} 0.0' in c.get("/metrics").text


def test_a_reload_of_the_same_version_keeps_the_window_and_its_alarm(fitted_model, tmp_path, caplog):
    """A file of the served version touched or copied again (a restore, a deploy that rewrites the same files) or
    a reload asked for loads the very model again: its reference is the same, so the line still drifted must stay
    in alarm. Every load started a new window: the alarm and the Grafana alert went quiet, the log said "reset"."""
    import logging
    import os

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app

    fitted_model.save(tmp_path / "part")
    with TestClient(create_app(_drift_settings(tmp_path))) as c:
        _score_brightened(c)
        assert c.get("/models/part/drift").json()["alarm"]
        assert 'anomaly_drift_alarm{model="part"} 1.0' in c.get("/metrics").text
        manifest = tmp_path / "part" / "manifest.json"
        os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="anomaly_service"):
            assert c.post("/models/reload").json()["changes"] == {"part": "reloaded"}
            assert c.post("/models/part/reload").status_code == 200
            after = c.get("/models/part/drift").json()
            assert after["parts"] == 12 and after["alarm"]
            assert 'anomaly_drift_alarm{model="part"} 1.0' in c.get("/metrics").text
        assert not [r for r in caplog.records if "drift alarm" in r.getMessage()]


def test_a_part_of_a_replaced_load_does_not_enter_the_new_window(fitted_model):
    """A request that started on the previous load and finishes after the swap neither restarts the new load's
    window nor counts in it."""
    from anomaly_service.drift import DriftBook

    book = DriftBook(window=20, min_parts=10)
    cal, result = fitted_model.calibration_, fitted_model.score(textured_part(np.random.default_rng(3)))
    part = (result.normalized_score, result.anomaly_map, None)
    book.observe("part", 1, cal, None, *part)
    book.observe("part", 2, cal, None, *part)  # the swap
    book.observe("part", 1, cal, None, *part)  # late, from the old load
    assert book.status("part", 2, cal, None).parts == 1


def test_a_photo_counts_again_once_it_has_left_the_window():
    """A window counts each photo once while it holds it; one that has left it (the window moved on by that many
    parts) is a part of a later stretch of the line and counts again. A monitor not asked for distinct photos
    (the benchmarks' streams) counts every one."""
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 1, 30), "typical_distance": np.linspace(0, 1, 30)},
                           window=3, min_parts=2, distinct=True)
    seen = [monitor.observe(score, 0.5) for score in (0.1, 0.2, 0.1, 0.3, 0.4, 0.1)]
    assert seen == [True, True, False, True, True, True] and monitor.status().parts == 3
    monitor.reset()
    assert monitor.observe(0.4, 0.5) and monitor.status().parts == 1
    plain = DriftMonitor({"normalized_score": np.linspace(0, 1, 30)}, window=3, min_parts=2)
    assert all(plain.observe(0.1, 0.5) for _ in range(2)) and plain.status().parts == 2


def test_a_drift_window_smaller_than_the_parts_it_needs_is_refused_at_start():
    """With --drift-min-parts above --drift-window the window never holds enough parts: the drift alarm (and the
    Grafana rule on it) was silently off for good. The service refuses the settings, naming both."""
    from click.testing import CliRunner
    from pydantic import ValidationError

    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    with pytest.raises(ValidationError, match="drift_min_parts"):
        ServiceSettings(drift_window=100, drift_min_parts=300)
    assert ServiceSettings(drift_window=100, drift_min_parts=100).drift_min_parts == 100
    r = CliRunner().invoke(app, ["serve", "--drift-min-parts", "500"])
    assert r.exit_code == 2 and "--drift-window" in r.output, r.output


def test_a_small_fit_on_a_clean_line_does_not_alarm():
    """A fit of a few images at the default coreset: each leave-one-out score is taken against a bank that lost the
    rows chosen to cover that image, so the reference runs above what a new good part scores. A clean line then
    sits below its reference, far enough to pass the effect floor; only a move away from the training images
    (above them) is drift, and a brightness change still is."""
    from anomaly_service import AnomalyModel

    rng = np.random.default_rng(7)
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, progress=False).fit(
        [textured_part(rng, 200, 260) for _ in range(20)])
    monitor = _monitor(model, window=40, min_parts=20)
    _stream(model, [textured_part(rng, 200, 260) for _ in range(40)], monitor)
    clean = monitor.status()
    assert clean.window_median["typical_distance"] < clean.reference_median["typical_distance"]  # the bias
    assert not clean.alarm, clean
    monitor.reset()
    _stream(model, [np.clip(textured_part(rng, 200, 260).astype(np.int16) + 45, 0, 255).astype(np.uint8)
                    for _ in range(40)], monitor)
    assert monitor.status().alarm


def test_a_maps_pixel_sample_spreads_over_the_frame_at_a_line_cameras_size():
    """The typical distance, the calibration floor and the uninspected pixels' level read every k-th pixel in
    reading order: on a 2448x2048 photo's map that was two whole columns, one the frame's left edge. The grid a
    fit now uses spreads over every row band and column band, about as many pixels; sampling its sample changes
    nothing (a fit keeps only the samples)."""
    from anomaly_service import map_sample

    for shape in ((2048, 2448), (1024, 1280), (1024, 1024), (256, 256), (200, 300), (8, 600_000), (40, 50)):
        amap = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        rows, cols = np.divmod(map_sample.sample(amap, "grid").astype(np.int64), shape[1])
        assert rows.size <= 2 * map_sample.SAMPLE_SIZE, shape
        # each tenth of the frame is read, both ways (a strip a few rows high: along it)
        for seen, side in ((rows, shape[0]), (cols, shape[1])) if shape[0] >= 40 else ((cols, shape[1]),):
            assert len(set(seen * 10 // side)) == 10, (shape, sorted(set(seen * 10 // side)))
        once = map_sample.sample(amap, "grid")
        assert np.array_equal(map_sample.sample(once, "grid"), once)
    flat_cols = np.unique(map_sample.sample(np.arange(2048 * 2448).reshape(2048, 2448), "flat") % 2448)
    assert flat_cols.tolist() == [0, 1224]  # what models fitted before read, and still read (their reference)
    strip = map_sample.sample(np.arange(8 * 600_000).reshape(8, 600_000), "grid")
    assert (strip // 600_000 == 0).all()  # thinner than a column's worth of rows: one row, along it
    with pytest.raises(ValueError, match="unknown pixel sample 'rows'"):  # never read as flat
        map_sample.sample(np.zeros((64, 64)), "rows")


def test_a_model_keeps_the_pixel_sample_it_was_fitted_with(fitted_model, tmp_path):
    """An older model's drift reference and floor were read from flat samples: it goes on reading its parts so,
    through a save, a load and an update; a new fit reads the grid."""
    import json

    from anomaly_service import AnomalyModel

    assert fitted_model.calibration_.pixel_sample == "grid"
    path = fitted_model.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["calibration"]["pixel_sample"] == "grid"
    del manifest["calibration"]["pixel_sample"]  # as a model fitted before it was kept
    write_manifest(path, manifest)
    old = AnomalyModel.load(path)
    rng = np.random.default_rng(5)
    assert old.decision.pixel_sample == "flat" and old.score(textured_part(rng)).calibration.pixel_sample == "flat"
    updated = old.update([textured_part(rng)], force=True)
    assert updated.decision.pixel_sample == "flat" and updated.calibration_.pixel_sample == "flat"
    refit = AnomalyModel.load(path).fit([textured_part(rng) for _ in range(8)])  # a new reference: the grid
    assert refit.decision.pixel_sample == "grid" and refit.calibration_.pixel_sample == "grid"


def _calibration(n: int, seed: int = 0):
    from anomaly_service.calibration import Calibration

    rng = np.random.default_rng(seed)
    return Calibration(threshold=3.0, floor=1.0, method="test", n_images=n,
                       holdout_scores=list(2.0 + rng.normal(0, 0.2, n)),
                       holdout_distances=list(1.0 + rng.normal(0, 0.1, n)))


def test_a_monitors_reference_is_the_models_calibration_images_and_training_images():
    """The three references: the calibration images' normalized scores and typical distances, and the training
    images' out-of-fold feature distances where the model keeps an image map with them."""
    rng = np.random.default_rng(0)
    cal = _calibration(40)
    image_map = ImageMap.fit(rng.normal(size=(60, 24)) * np.exp(-np.arange(24) / 6))
    monitor = DriftMonitor.for_model(cal, image_map)
    np.testing.assert_allclose(monitor.reference["normalized_score"], np.sort((np.array(cal.holdout_scores) - 1.0) / 2))
    np.testing.assert_allclose(monitor.reference["typical_distance"], np.sort(cal.holdout_distances))
    np.testing.assert_allclose(monitor.reference["feature_distance"], np.sort(image_map.distances))
    assert set(DriftMonitor.for_model(cal).reference) == {"normalized_score", "typical_distance"}
    # a part's feature distance is read on that map, and only from a pooled feature of its size
    pooled = image_map.mean + 0.1
    assert feature_distance(image_map, pooled) == pytest.approx(float(image_map.feature_distance(pooled)))
    assert feature_distance(None, pooled) is None and feature_distance(image_map, None) is None
    assert feature_distance(image_map, pooled[:-1]) is None


def test_the_book_keeps_one_window_per_served_load_and_forgets_models_no_longer_served():
    """What the service's drift route reads (lifecycle.py): parts of the newest load fill its window; a model too
    small to compare with has none; a model no longer served leaves the book, and its window with it."""
    from anomaly_service.drift import DriftBook

    book = DriftBook(window=20, min_parts=5)
    cal = _calibration(30)
    part = np.full((32, 32), 1.0, np.float32)
    for i in range(6):
        book.observe("part", 1, cal, None, 0.5 + i / 100, part, None)  # six parts, each its own photo
    status = book.status("part", 1, cal, None)
    assert status.parts == 6 and status.window == 20 and status.min_parts == 5
    assert status.window_median["typical_distance"] == pytest.approx(1.0)
    assert status.to_dict()["parts"] == 6 and status.to_dict()["quantity_parts"] == status.quantity_parts
    book.observe("part", 2, cal, None, 0.5, part, None)  # the model swapped: a new window
    book.observe("part", 1, cal, None, 0.5, part, None)  # a part of the replaced load, finishing late
    assert book.status("part", 2, cal, None).parts == 1 and book.status("part", 1, cal, None).parts == 1
    tiny = _calibration(1)  # one calibration image: nothing to compare a window with
    book.observe("small", 1, tiny, None, 0.5, part, None)
    assert book.status("small", 1, tiny, None) is None
    book.forget({"small"})
    assert book.status("part", 2, cal, None).parts == 0  # served again: a new window


def test_the_drift_and_its_driver_are_the_quantity_that_moved_most():
    """Two quantities both alarm: the drift value and the quantity named are the larger statistic's."""
    monitor = DriftMonitor({"normalized_score": np.linspace(0, 0.5, 20), "typical_distance": np.linspace(1, 2, 20)},
                           window=50, min_parts=10, alpha=0.01)
    for i in range(12):
        monitor.observe(0.9, 1.0 if i < 2 else 3.0)  # the score wholly above its reference, the distance mostly
    status = monitor.status()
    assert status.statistics["normalized_score"] == 1.0 > status.statistics["typical_distance"] >= 0.7
    assert status.p_values["typical_distance"] < 0.01 and status.alarm
    assert status.drift == 1.0 and status.driven_by == "normalized_score"


def test_a_short_window_reads_as_no_drift_and_two_values_are_enough_to_compare():
    monitor = DriftMonitor({"normalized_score": [0.1, 0.2]}, window=50, min_parts=1)  # two reference values do
    empty = monitor.status()
    assert empty.drift == 0.0 and empty.p_values == {"normalized_score": 1.0} and not empty.alarm
    monitor.observe(0.9, 0.0)
    assert monitor.status().statistics["normalized_score"] == 0.0  # one part: no distribution to compare
    monitor.observe(0.95, 0.0)
    assert monitor.status().statistics["normalized_score"] == 1.0  # two: wholly above the reference
    with pytest.raises(ValueError, match="at least two reference values"):
        DriftMonitor({"normalized_score": [0.1]})


def test_an_images_pooled_feature_is_the_mean_of_its_own_patches():
    """The image map and the feature distance read each image's pooled feature: the mean of its rows among every
    image's patches, split by the images' grids (a tiled image's tiles count together). Every fit computes it, under
    a session fixture no test's own calls are recorded for."""
    import torch

    from anomaly_service.image_map import pooled_features

    rows = torch.arange(26, dtype=torch.float16).reshape(13, 2)
    got = pooled_features(rows, [(2, 2), (1, 3), (2, 1, 3)])
    want = np.stack([rows[a:b].float().mean(0).numpy() for a, b in ((0, 4), (4, 7), (7, 13))])
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_an_image_map_missing_one_of_its_arrays_is_a_format_error():
    """A catalog holding the map's points without the rest of it, or with places for another number of images (a
    damaged or hand-edited model), is refused as a model format error saying so, not a KeyError."""
    from anomaly_service.errors import ModelFormatError
    from anomaly_service.image_map import ImageMap

    arrays = ImageMap.fit(np.random.default_rng(0).random((12, 6))).to_arrays()
    assert ImageMap.from_arrays(arrays, 12) is not None
    for lost in ("map_mean", "map_spread"):
        with pytest.raises(ModelFormatError, match=f"the image map lacks '{lost}'"):
            ImageMap.from_arrays({k: v for k, v in arrays.items() if k != lost}, 12)
    with pytest.raises(ModelFormatError, match="the image map's arrays do not fit together"):
        ImageMap.from_arrays(arrays, 11)  # one place fewer than the catalog's images, the rest as they were


def test_the_image_maps_directions_spread_and_reference_distances_are_the_training_images():
    """The map and the feature distance, computed another way: the main directions and their spread from the
    covariance's eigenvectors (signed by their largest loading), each direction's share of the variance, and each
    training image's reference distance on the mean, directions and spread of the images outside its fold. Only
    their use was tested (a drifted part reads farther than a good one): their arithmetic was free."""
    from anomaly_service.image_map import SPREAD_FOLDS, ImageMap

    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25]) + 7.0
    m = ImageMap.fit(x)

    def directions(rows):
        values, vectors = np.linalg.eigh(np.cov(rows.T))
        order = np.argsort(values)[::-1]
        return values[order], vectors[:, order].T

    values, vectors = directions(x)
    k = 6  # min(directions asked, a quarter of a fold's rest: 8, the directions the images vary in: 6)
    assert m.basis.shape == (k, 6) and np.allclose(m.mean, x.mean(0), atol=1e-5)
    assert np.allclose(m.spread, np.sqrt(values[:k]), rtol=1e-4)
    for i in range(2):
        v = vectors[i] if vectors[i][np.argmax(np.abs(vectors[i]))] >= 0 else -vectors[i]
        assert np.allclose(m.components[i], v, atol=1e-4)
    assert np.allclose(m.explained, values[:2] / values.sum(), rtol=1e-4)
    assert np.allclose(m.points, (x - x.mean(0)) @ m.components.T, atol=1e-3)
    fold = np.arange(len(x)) % SPREAD_FOLDS
    want = np.empty(len(x))
    for f in range(SPREAD_FOLDS):
        rest = x[fold != f]
        vals, vecs = directions(rest)
        sd = np.maximum(np.sqrt(vals[:k]), 1e-3 * float(m.spread[0]))
        want[fold == f] = np.linalg.norm(((x[fold == f] - rest.mean(0)) @ vecs[:k].T) / sd, axis=1)
    assert np.allclose(m.distances, want, rtol=1e-4)
    new = x[:3] + 1.0
    grown = m.extended(new)
    assert np.allclose(grown.points[-3:], m.project(new)) and np.allclose(grown.distances[-3:],
                                                                           m.feature_distance(new))
    few = ImageMap.fit(x[:9])  # a fold's rest of 7 images cannot estimate two directions: no feature distance
    assert few.basis is None and few.distances is None and few.feature_distance(x[:1]) is None
    assert ImageMap.fit(x[:10]).basis.shape == (2, 6)  # one image more: two directions, a quarter of 8


def test_the_window_counts_its_parts_compressed_harder_than_the_good_photos():
    """A client that saves the line's photos as JPEGs moves every quantity the monitor tracks against a model fitted
    on PNGs (bottle's good test photos as JPEGs at quality 92: none flagged, the typical distance's KS statistic
    near 1, docs/decisions.md): the alarm said to check the camera and the light, which were as they were. The
    window counts its parts compressed harder than every good photo, as they come and go."""
    ref = {"normalized_score": np.linspace(0, 0.5, 20)}
    monitor = DriftMonitor(ref, window=4, min_parts=2, fitted_quality=90, distinct=True)
    for score, quality in ((0.1, 100), (0.2, 92), (0.3, 85), (0.4, None)):  # None: an array, compression unknown
        monitor.observe(score, 0.0, None, quality)
    status = monitor.status()
    assert (status.compressed_harder, status.lowest_quality, status.fitted_quality) == (1, 85, 90)
    monitor.observe(0.3, 0.0, None, 85)  # the same photo sent again is not a second part, nor a second JPEG
    monitor.observe(0.5, 0.0, None, 60)
    monitor.observe(0.6, 0.0, None, 89)
    status = monitor.status()  # the window is (0.3, 85), (0.4, None), (0.5, 60), (0.6, 89)
    assert (status.compressed_harder, status.lowest_quality) == (3, 60)
    assert compression_said(status) == (
        "3 of the window's 4 parts were JPEGs down to quality 60, and the model's good photos were JPEG at quality "
        "90 or better: compression alone moves these quantities. Send the photos as the good ones were saved, or "
        "re-fit on photos saved as these are.")
    monitor.reset()
    assert (monitor.status().compressed_harder, monitor.status().lowest_quality) == (0, None)
    assert compression_said(monitor.status()) is None
    # one JPEG resent in a loop is one part compressed harder, and it leaves the count as it leaves the window
    for _ in range(3):
        monitor.observe(0.7, 0.0, None, 50)
    assert (monitor.status().compressed_harder, monitor.status().lowest_quality) == (1, 50)
    for score in (0.1, 0.2, 0.3, 0.4):
        monitor.observe(score, 0.0, None, 100)
    assert (monitor.status().compressed_harder, monitor.status().lowest_quality) == (0, None)
    # good photos whose compression is unknown (a fit on arrays, an older model): nothing is counted against them
    unknown = DriftMonitor(ref, window=4, min_parts=2)
    unknown.observe(0.1, 0.0, None, 20)
    assert (unknown.status().compressed_harder, unknown.status().fitted_quality) == (0, None)
    assert compression_said(unknown.status()) is None


def test_a_few_compressed_parts_do_not_take_the_blame_for_an_alarm_they_cannot_explain():
    """The words for the compressed parts replaced the camera advice in the alarm's log line and the page's banner
    whenever one part of the window was compressed harder: a light that brightened every part, with two of a hundred
    sent as JPEGs, was put down to compression alone. The KS statistic is at most the share of the window that moved,
    so where the compressed parts are a smaller share than it, the camera, the light and the parts are still named;
    where they are the most of the window, compression is said alone."""
    ref = {"normalized_score": np.linspace(0, 0.5, 100)}
    light = DriftMonitor(ref, window=100, min_parts=30, fitted_quality=100)
    for i in range(100):  # every part brighter than any calibration image; two of them JPEGs
        light.observe(1.0 + i / 1000, 0.0, None, 60 if i < 2 else 100)
    status = light.status()
    assert status.alarm and status.driven_by == "normalized_score" and status.compressed_harder == 2
    said = compression_said(status)
    assert said.startswith("2 of the window's 100 parts were JPEGs down to quality 60")
    assert "compression alone" not in said and "check the camera, lighting and the parts too" in said
    jpegs = DriftMonitor(ref, window=100, min_parts=30, fitted_quality=100)
    for i in range(100):  # ninety of a hundred compressed, and only they moved: the statistic is their share
        jpegs.observe(1.0 + i / 1000 if i < 90 else i / 1000, 0.0, None, 60 if i < 90 else 100)
    status = jpegs.status()
    assert status.alarm and status.compressed_harder == 90 and status.statistics["normalized_score"] >= 0.9
    assert "compression alone moves these quantities" in compression_said(status)
    assert "camera" not in compression_said(status)


def test_the_drift_route_and_log_say_when_the_parts_were_compressed_harder(model_dir, tmp_path, caplog):
    """Over HTTP: a model fitted on PNGs (its manifest's ``jpeg_quality`` 100) scores a line's parts, JPEGs at
    quality 75; the route counts them and says in words what that means for the alarm, and so does the log line
    that reports the alarm, where it named a camera or a light. (Every part is a JPEG: with a quarter of them PNGs
    brightened as much, the light moved the rest too, and the words say so, as
    ``test_a_few_compressed_parts_do_not_take_the_blame_for_an_alarm_they_cannot_explain`` pins.)"""
    import json
    import logging
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from conftest import png_bytes

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    write_manifest(models / "part", {**manifest, "preprocessing": {**manifest["preprocessing"], "jpeg_quality": 100}})
    rng = np.random.default_rng(5)
    with TestClient(create_app(_drift_settings(models))) as c:
        c.get("/models/part/drift")  # the page asks before the line's first part: its window counts against 100 too
        for i in range(12):  # brightened, as in the tests above, so the window alarms
            bright = np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)
            photo = png_bytes(bright, format="JPEG", quality=75)
            assert c.post("/score", files={"file": ("x", photo)}).status_code == 200
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="anomaly_service"):
            drift = c.get("/models/part/drift").json()
        assert drift["alarm"]
        assert (drift["compressed_harder"], drift["lowest_quality"], drift["fitted_quality"]) == (12, 75, 100)
        words = ("12 of the window's 12 parts were JPEGs down to quality 75, and the model's good photos were "
                 "uncompressed (PNG, TIFF or BMP): compression alone moves these quantities.")
        assert drift["compression"].startswith(words)
        said = [r.getMessage() for r in caplog.records if "drift alarm on model part" in r.getMessage()]
        assert len(said) == 1 and words in said[0] and "camera or light" not in said[0]


@pytest.mark.parametrize("window,reference", [(881, 369), (200, 50), (50, 200), (199, 50)])
def test_a_window_and_reference_of_any_sizes_give_a_p_value_without_a_warning(window, reference):
    """scipy's exact one-sided KS overflowed and fell back with a warning on a few hundred values a side
    (scipy#14019, scipy#16525; 881 against 369 there): a warning a plant's log would carry at each status, or an
    error where warnings are errors. The exact value is taken only up to EXACT_PAIRS pairs, the asymptotic one past
    it; on each side of that bound, drifted or not, each quantity has a p-value in [0, 1] and nothing is warned."""
    import warnings

    rng = np.random.default_rng(window)
    for shift in (0.0, 3.0):
        monitor = DriftMonitor({"normalized_score": rng.normal(0.4, 0.1, reference)}, window=window, min_parts=10)
        for value in rng.normal(0.4 + shift * 0.1, 0.1, window):
            monitor.observe(float(value), 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            status = monitor.status()
        p = status.p_values["normalized_score"]
        assert 0.0 <= p <= 1.0 and status.alarm == (shift > 0), (shift, p, status.drift)
