"""Prometheus metrics of the service (prometheus-client: the reference exposition format, no reason to write our own).

Each app gets its own registry, so several apps (tests, multiple workers) never collide on metric names. The
library's process, platform and garbage-collector collectors sit only on its default registry, so each registry
gets its own: memory, open files, CPU time and threads are what a run of months shows going wrong first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .decision import DECISIONS, decision_word

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
OVERLOAD_REASONS = ("pixels", "bytes", "decode_backlog", "memory", "queue", "connections", "pictures")
SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5)
# every reason the recorder and the service count a lost record under (records/recorder.py, api/lifecycle.py)
DROP_REASONS = ("buffer_full", "database", "unavailable", "invalid", "shutdown", "stopped", "error")


class ThreadCollector(Collector):
    """``process_threads``, the OS threads of the process: the name Prometheus's client library guidelines give it,
    which prometheus-client's process collector does not export. Read at each scrape from ``/proc/self/stat``, one
    short line (the file the process collector reads too); absent, not 0, where there is no /proc, as the guidelines
    ask of a process metric that cannot be read."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self._stat = Path(proc) / "self" / "stat"

    def collect(self) -> Iterable[Metric]:
        try:  # the fields after the command's closing parenthesis (a command may hold one), from the state on
            threads = float(self._stat.read_bytes().rsplit(b")", 1)[1].split()[17])
        except (OSError, IndexError, ValueError):
            return []
        return [GaugeMetricFamily("process_threads", "Number of OS threads in the process.", value=threads)]


def process_collectors(registry: CollectorRegistry) -> None:
    """The library's own process, platform and GC collectors on ``registry``, under their standard names (every
    dashboard and alert written for Prometheus reads them so), and the thread count beside them unless the installed
    library has come to export it itself (a registry does not check a collector's names: two would show)."""
    process = ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    if not any(family.name == "process_threads" for family in process.collect()):
        registry.register(ThreadCollector())


class Telemetry:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        process_collectors(r)
        self.requests = Counter("anomaly_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("anomaly_http_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("anomaly_stage_duration_seconds",
                                       "Per-image time in each pipeline stage (queue = waiting for a batch)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("anomaly_decisions", "Scored images by decision", ["model", "decision"], registry=r)
        self.scores = Histogram("anomaly_normalized_score", "Normalized image scores (1.0 = threshold)", ["model"],
                                buckets=SCORE_BUCKETS, registry=r)
        self.bad_inputs = Counter("anomaly_rejected_inputs", "Uploads rejected before scoring", ["reason"], registry=r)
        self.batch_size = Histogram("anomaly_batch_size", "Images per backbone pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.queue_depth = Gauge("anomaly_queue_depth", "Images waiting for inference", registry=r)
        self.batches_running = Gauge("anomaly_inference_batches_running",
                                     "Batches in inference now (up to --inference-workers; they share the cores)",
                                     registry=r)
        self.overloaded = Counter("anomaly_overloaded", "Images refused with 503 overloaded, whatever the reason",
                                  registry=r)
        self.overloaded_by_reason = Counter(
            "anomaly_overloaded_by_reason", "Images (or, for connections, requests) refused with 503 overloaded, by "
            "what was full: pixels, bytes, decode_backlog, memory, queue, connections, pictures (stored overlays "
            "being drawn again)", ["reason"], registry=r)
        for reason in OVERLOAD_REASONS:
            self.overloaded_by_reason.labels(reason)  # every reason shows, at 0 until it happens
        self.pixels_in_flight = Gauge("anomaly_pixels_in_flight",
                                      "Pixels of the images admitted and not yet answered", registry=r)
        # the budget in force, which the service lowers to the memory there is and fits again as models come and go
        # (api/lifecycle.py): the log said it once, and months on nothing showed why parts were refused
        self.pixels_in_flight_limit = Gauge("anomaly_pixels_in_flight_limit", "The pixel budget in force: "
                                            "--max-pixels-in-flight, or what the service lowered it to so that "
                                            "the photos in flight fit the memory there is", registry=r)
        self.bytes_in_flight = Gauge("anomaly_upload_bytes_in_flight",
                                     "Upload bytes of the admitted images not yet decoded", registry=r)
        self.decode_backlog = Gauge("anomaly_decode_backlog",
                                    "Admitted images waiting for a decode thread or being decoded", registry=r)
        self.abandoned = Counter("anomaly_abandoned", "Images dropped because their client went away, by the stage "
                                 "it left in (decode, score, render)", ["stage"], registry=r)
        for stage in ("decode", "score", "render"):
            self.abandoned.labels(stage)
        self.models_loaded = Gauge("anomaly_models_loaded", "Models currently loaded", registry=r)
        self.reloads = Counter("anomaly_model_reloads", "Model (re)loads", ["model", "outcome"], registry=r)
        self.load_failed = Gauge("anomaly_model_load_failed", "1 for each model under the model directory that does "
                                 "not load: at start-up, or its newest files after a re-fit (the previous version "
                                 "keeps serving)", ["model"], registry=r)
        self._load_failed: set[str] = set()
        self.directory_stuck = Gauge("anomaly_model_directory_stuck", "1 while the model directory itself (its "
                                     "listing) has not answered within --load-timeout: the loaded models serve from "
                                     "memory, no model is added, re-read or removed", registry=r)
        self.records_written = Counter("anomaly_records_written", "Inspection records written to the database",
                                       registry=r)
        self.records_dropped = Counter("anomaly_records_dropped", "Inspection records lost, by reason: buffer_full "
                                       "(the database is slower than scoring), database (unavailable after retries), "
                                       "unavailable (recording could not start: --data-dir or --database-url), "
                                       "invalid, shutdown, stopped, error", ["reason"], registry=r)
        for reason in DROP_REASONS:
            self.records_dropped.labels(reason)  # the alert's series exist at 0 before the first loss
        self.record_buffer_depth = Gauge("anomaly_record_buffer_depth", "Inspection records waiting to be written",
                                         registry=r)
        self.record_files_retired = Counter("anomaly_record_files_retired", "Stored photos and heatmaps removed by "
                                            "retention, by rule (age, size, free_space)", ["rule"], registry=r)
        self.record_files_not_stored = Counter(
            "anomaly_record_files_not_stored", "Inspection records written without the photo they should keep, by "
            "reason: low_disk (under --retention-min-free-bytes free), error (the write failed)", ["reason"],
            registry=r)
        for reason in ("low_disk", "error"):
            self.record_files_not_stored.labels(reason)
        self.drift = Gauge("anomaly_drift", "How far the recent parts' scores, patch distances and image features "
                           "have moved above the training images' (largest one-sided KS statistic, 0 = not above, "
                           "1 = wholly above)",
                           ["model"], registry=r)
        self.drift_alarm = Gauge("anomaly_drift_alarm", "1 when the drift test finds the recent parts above the "
                                 "calibration images, by a margin (min_effect)", ["model"], registry=r)

    def in_flight(self, pixels: int, nbytes: int, backlog: int) -> None:
        """Admission's totals changed (api/admission.py)."""
        self.pixels_in_flight.set(pixels)
        self.bytes_in_flight.set(nbytes)
        self.decode_backlog.set(backlog)

    def observe_result(self, model: str, normalized_score: float, is_anomaly: bool,
                       timing_ms: dict[str, float]) -> None:
        for decision in DECISIONS:  # both series from a model's first part: its first flag is an increase from 0
            self.decisions.labels(model, decision)
        self.decisions.labels(model, decision_word(is_anomaly)).inc()
        self.scores.labels(model).observe(normalized_score)
        for stage, ms in timing_ms.items():
            if stage != "total":
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def forget_model(self, model: str) -> None:
        """Drop a removed model's decision and score series: a service that sees variants come and go would
        otherwise export every model it ever served, and a dashboard's per-model panels would list them all. Its
        reload counter stays, as the record of the removal."""
        for decision in DECISIONS:
            with contextlib.suppress(KeyError):
                self.decisions.remove(model, decision)
        with contextlib.suppress(KeyError):
            self.scores.remove(model)

    def models_not_loading(self, names: set[str]) -> None:
        """Set the load-failure gauges to the models that do not load now (registry.errors()): a state, not a
        count, so the alert lasts as long as the fault. The counter's first sample after a failed start-up already
        reads 1, and a broken model is not retried until its files change, so an alert on its increase never
        fired for a model broken at start-up and ended on its own for one broken by a re-fit."""
        for name in names:
            self.load_failed.labels(name).set(1)
        for name in self._load_failed - names:
            with contextlib.suppress(KeyError):
                self.load_failed.remove(name)
        self._load_failed = set(names)

    def render(self) -> bytes:
        return generate_latest(self.registry)
