"""What the app holds between requests (:class:`Service`) and its lifespan: start, warm-up, model watch, stop.

Decoding and rendering run in small thread pools of their own, inference on the batcher's worker threads, so the
event loop only moves bytes. Before any of that, an upload is admitted (admission.py): its header says what it
will cost, and an image that does not fit the budgets in flight is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from ..batching import MicroBatcher, Overloaded
from ..compression import said_with
from ..device import resolve_device
from ..drift import DriftBook, DriftStatus, compression_said
from ..errors import AnomalyError, ConfigError, ImageLoadError
from ..evidence import TrainingEvidence
from ..heatmap import heatmap_png
from ..images import DecodedImage, ImageLimits, declared_size, decode_image, load_image
from ..memory_room import PEAK_BYTES_PER_PIXEL, free_bytes
from ..parallelism import default_inference_workers, intra_op_threads
from ..records.recorder import PartContext, Recorder, RecordingUnavailable, open_recording, pending_from
from ..registry import ModelEntry, ModelRegistry
from ..render import Verdict
from ..render import render as render_result
from ..settings import ServiceSettings
from ..stuck_io import StorageStuck
from ..telemetry import Telemetry
from .admission import Admission, Refused, Ticket
from .clients import ClientGone, ClientWatch
from .errors import ApiError, image_error
from . import request_id
from .records_gate import PICTURE_CALLS, RecordsGate
from .schemas import HeatmapKind, ScoreOut

if TYPE_CHECKING:
    from fastapi import FastAPI, UploadFile

    from .. import AnomalyModel, ScoreResult
    from ..records.store import RecordStore

log = logging.getLogger(__name__)


PICTURE_SLOTS = 4  # stored overlays drawn (one at a time) or waiting for it; more get 503 at once
# seconds a stop waits for the start-up loading or a re-scan to finish the model in hand: a healthy load ends well
# inside it, and one whose files hang would hold the stop for as long as they do
STOP_GRACE = 5.0


@dataclass(frozen=True)
class Scored:
    """One scored upload: the JSON answer and what it was made from."""

    out: ScoreOut
    entry: ModelEntry  # the model that scored it (pinned: a reload meanwhile does not change it)
    image: np.ndarray  # the decoded upload, (H, W, 3) uint8
    result: ScoreResult
    verdict: Verdict  # decision, regions and the heatmap renderings asked for


def _warm_codecs(limits: ImageLimits) -> None:
    from PIL import Image

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, fmt)
        load_image(buf.getvalue(), limits, "warm-up")
    heatmap_png(np.zeros((8, 8), np.float32))


def _image_map(model: Any) -> Any:
    """The model's image map (the drift monitor's feature-distance reference); None for models without one."""
    catalog = getattr(model, "catalog_", None)
    return None if catalog is None else catalog.image_map


def _default_workers(device: str) -> int:
    try:
        device_type = resolve_device(device).type
    except ConfigError:  # the registry reports a bad device when it loads the models
        device_type = "cpu"
    return default_inference_workers(device_type, torch.get_num_threads())


class Service:
    """What the app holds between requests: settings, models, batcher, metrics."""

    def __init__(self, settings: ServiceSettings, *, load_in_background: bool = False):
        self.settings = settings
        # ``anomaly serve`` loads the models after the port opens (the start-up probe and /healthz answer at once,
        # /readyz says how far the loading is); an app driven in-process loads them before it takes its first call
        self.load_in_background = load_in_background
        self._loaded: asyncio.Event | None = None  # set once the start-up loading has ended (made in start)
        self._loader: asyncio.Task | None = None
        self._stopping = threading.Event()  # a stop during the start-up loading: no further model is loaded
        self.stop_announced = False  # a SIGTERM came and --stop-delay serves on until the stop: /readyz says so
        self._to_load = 0  # models the start-up loading found under the model directory
        self.limits = settings.image_limits()
        self.registry = ModelRegistry(settings.model_dir, device=settings.device, weights=settings.weights,
                                      limits=self.limits, default=settings.default_model,
                                      knn_precision=settings.knn_precision, runtime=settings.runtime,
                                      load_timeout=settings.load_timeout)
        self.telemetry = Telemetry()
        self.records: RecordStore | None = None  # the inspection records; None while recording is off
        self.recorder: Recorder | None = None
        self.recording_problem: str | None = None  # why recording could not start, when it was asked for
        # how requests reach the records database (records_gate.py), each waiting at most --records-timeout
        self.records_gate = RecordsGate(deadline_s=settings.records_timeout)
        # and the stored pictures: their own threads and slots, so a picture that does not answer holds no thread
        # of the pool that reads uploads for scoring
        self.pictures_gate = RecordsGate(PICTURE_CALLS, settings.records_timeout,
                                         what="the stored pictures (--data-dir)")
        self.batcher = MicroBatcher(settings.batch_max_size, settings.batch_wait_ms, settings.queue_size,
                                    on_batch=self.telemetry.batch_size.observe,
                                    on_depth=self.telemetry.queue_depth.set,
                                    on_running=self.telemetry.batches_running.set,
                                    workers=settings.inference_workers or _default_workers(settings.device))
        self.drift = DriftBook(settings.drift_window, settings.drift_min_parts, settings.drift_alpha,
                               settings.drift_min_effect)
        self._drift_exported: set[str] = set()  # the models with drift gauges in /metrics
        self._drift_export_lock = threading.Lock()  # scrapes export on worker threads: one at a time
        # each model's window (ModelEntry.drift_window), alarm when last tested (None: the model was removed) and
        # version, for the log's transitions
        self._drift_alarms: dict[str, tuple[int, bool | None, str]] = {}
        self._drift_alarms_lock = threading.Lock()
        self.admission = Admission(settings.max_pixels_in_flight, settings.max_bytes_in_flight,
                                   settings.max_decode_backlog, on_change=self.telemetry.in_flight,
                                   free_memory=free_bytes)
        self.telemetry.pixels_in_flight_limit.set(self.admission.max_pixels)
        self._watch: asyncio.Task | None = None
        # the memory free once the start-up models were loaded (None: unknown, the budget left as set) and the
        # bytes a pixel the budget was last fitted at
        self._free_at_start: int | None = None
        self._fitted_rate: float | None = None
        # Decoding and rendering get small pools of their own: with dozens of requests in flight, an unbounded
        # pool runs them all at once and starves the inference threads' cores; and with one shared pool, decodes
        # of the next batch queue behind renders of the last one while the backbone idles (both measured).
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="decode")
        self._render_pool = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="render")
        # Decodes wait for a thread here, not in the pool's own queue: this wait can be abandoned when the client
        # leaves, and its length is the decode backlog that admission bounds. (Made on the serving loop, in start.)
        self._decode_slots: asyncio.Semaphore | None = None
        # A stored inspection's overlay is drawn again on each request, from its full-size photo. Those requests
        # need only a picture link (no API key), so they get one thread of their own and a few places: a handful at
        # once took scoring's render threads and memory outside the pixel budget (docs/decisions.md).
        self._picture_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="picture")
        self._picture_slots: asyncio.Semaphore | None = None

    async def cpu(self, fn: Any, *args: Any, pool: str = "render") -> Any:
        executor = {"decode": self._decode_pool, "picture": self._picture_pool}.get(pool, self._render_pool)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    @contextlib.asynccontextmanager
    async def picture_slot(self) -> AsyncIterator[None]:
        """A place to draw a stored picture again (one drawing, a few waiting); 503 ``overloaded`` at once when
        they are all taken, before the stored files are read."""
        assert self._picture_slots is not None, "the service has not started"
        if self._picture_slots.locked():
            raise self._overloaded("pictures", 1, f"{PICTURE_SLOTS} stored pictures are being drawn or wait for it; "
                                   "retry in 1 s")
        async with self._picture_slots:
            yield

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._decode_slots = asyncio.Semaphore(self.settings.cpu_workers)
        self._picture_slots = asyncio.Semaphore(PICTURE_SLOTS)
        self._loaded = asyncio.Event()
        await self.cpu(_warm_codecs, self.limits, pool="decode")  # PNG/JPEG plugins and color table load once
        if self.settings.record:
            try:
                self.records, self.recorder = await run_in_threadpool(open_recording, self.settings, self.telemetry)
            except RecordingUnavailable as exc:
                self.recording_problem = str(exc)
        await self.batcher.start()
        if self.load_in_background:
            self._loader = asyncio.create_task(self._load_models(), name="model-load")
        else:
            await self._load_models()

    async def _load_models(self) -> None:
        """Load and warm every model under the model directory, then watch it. Run after the port opens by
        ``anomaly serve``: loading takes time for every model, and a plant's tens of them kept the port closed so
        long that the start-up probe and every client saw refused connections, and more or larger models on a
        slower machine outlast the probe's patience and have the service killed before it ever serves
        (docs/decisions.md "Many models")."""
        assert self._loaded is not None
        try:
            # off the event loop and within the bound: a listing that does not answer held the probes for ever
            self._to_load = len(await run_in_threadpool(self.registry.candidates))
            self._count_loads(await run_in_threadpool(self.registry.load_all, self._stopping))
            default = self.settings.default_model
            if default and default not in self.registry.names():  # every request naming no model would be a 404
                log.warning("default model %r is not loaded (loaded: %s): requests without ?model= get 404 until it "
                            "is", default, ", ".join(self.registry.names()) or "none")
            await run_in_threadpool(self._warm)
            self._fit_pixels_to_memory(free_bytes())
        except Exception:
            if not self.load_in_background:
                raise
            # the watcher and POST /models/reload load what this left: the process stays up and says so
            log.exception("loading the models at start-up failed")
        finally:
            self._loaded.set()
        names = self.registry.names()
        if self._stopping.is_set():
            log.info("stopped while loading the models: %d of %d loaded", len(names), self._to_load)
            return
        log.info("serving %d model(s) from %s: %s", len(names), self.settings.model_dir, ", ".join(names) or "none")
        stuck = self.registry.stuck()
        if stuck:  # each has its own error line; this one says the start-up did not wait for them
            log.warning("not waited for at start-up, their files not answering within --load-timeout %g s: %s; each "
                        "is served once its files answer", self.settings.load_timeout, ", ".join(sorted(stuck)))
        if self.settings.reload_interval > 0:
            self._watch = asyncio.create_task(self._watch_models(), name="model-watch")

    @property
    def loading(self) -> str | None:
        """What /readyz says while the start-up loading runs (None once it has ended)."""
        if self._loaded is not None and self._loaded.is_set():
            return None
        return (f"loading the models at start-up: {len(self.registry.names())} of {self._to_load} loaded, then "
                "warmed" if self._to_load else "loading the models at start-up")

    async def until_loaded(self) -> None:
        """Return once the start-up loading has ended: a request for a model waits for it (as it waited for the
        port to open before), rather than be told that a model about to load is unknown."""
        if self._loaded is not None and not self._loaded.is_set():
            await self._loaded.wait()

    async def stop(self) -> None:
        self._stopping.set()
        # The start-up loading ends after the model it is loading, and a re-scan after the model in hand (a load
        # cannot be cut short): each is given STOP_GRACE, not more. A load whose files hang runs on a daemon thread
        # that holds nothing the stop needs (stuck_io.py), and a stop that waited for it never ended.
        if self._loader is not None:
            await asyncio.wait({self._loader}, timeout=STOP_GRACE)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait({self._watch}, timeout=STOP_GRACE)
        for task in (self._loader, self._watch):
            if task is not None and not task.done():
                log.warning("stopping without waiting any longer for the %s: a model's files are slow or do not "
                            "answer (its load is left on its own thread)",
                            "start-up loading" if task is self._loader else "re-scan")
        await self.batcher.stop()
        if self.recorder is not None:  # after the batcher: the last answers are recorded, then flushed
            await run_in_threadpool(self.recorder.stop)
            self.records.close()  # type: ignore[union-attr]
        for pool in (self._decode_pool, self._render_pool, self._picture_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def _fit_pixels_to_memory(self, free: int | None) -> None:
        """Lower the default pixel budget to what the memory left after loading the models holds, each pixel at the
        most a loaded model takes one (:meth:`_bytes_per_pixel`).

        Why: the default admits 40 MP in flight, about 1.4 GiB above the idle service; a small inspection PC or a
        tight container limit has less, and the kernel would kill the service during a burst of large photos. A
        tiled model takes several times that per pixel: counted at the untiled rate, the budget let in a burst
        several times the memory left. The room is read once, here; :meth:`_refit_pixels` fits the budget to it
        again whenever the models change."""
        if free is not None:
            self._free_at_start = free
            self._refit_pixels()

    def _refit_pixels(self) -> None:
        """Fit the pixel budget to the room read at start-up at the rate of the models loaded now: a tiled model
        added or re-fitted after start-up lowers it, and its removal gives the default back. Said in the log only
        when the rate changes."""
        free = self._free_at_start
        if free is None:
            return
        rate, why = self._bytes_per_pixel()
        if rate == self._fitted_rate:
            return
        self._fitted_rate = rate
        fits = int(max(0, free - self.settings.max_bytes_in_flight) // rate)
        wanted = self.settings.max_pixels_in_flight
        if fits >= wanted:
            if self.admission.max_pixels != wanted:
                log.info("--max-pixels-in-flight back to %d: the photos in flight fit at %.0f bytes a pixel", wanted,
                         rate)
                self._pixel_budget(wanted)
            return
        mib = free >> 20
        if "max_pixels_in_flight" in self.settings.model_fields_set:
            log.warning("--max-pixels-in-flight %d takes up to about %d MiB at %.0f bytes a pixel%s and the service "
                        "may allocate %d MiB more (the machine's free memory or its memory limit): photos that do not "
                        "fit when they arrive are refused (503 overloaded)", wanted, int(wanted * rate) >> 20, rate,
                        why, mib)
            return
        log.warning("%d MiB of memory free after loading the models (the machine's free memory or the service's "
                    "memory limit): --max-pixels-in-flight lowered from %d to %d so that the photos in flight fit "
                    "at %.0f bytes a pixel%s; larger photos are scored one at a time when they fit, and refused (503 "
                    "overloaded) when they do not", mib, wanted, max(fits, 1), rate, why)
        self._pixel_budget(max(fits, 1))

    def _pixel_budget(self, pixels: int) -> None:
        """Put ``pixels`` in force as the pixel budget, and show it in the metrics."""
        self.admission.max_pixels = pixels
        self.telemetry.pixels_in_flight_limit.set(pixels)

    def _bytes_per_pixel(self) -> tuple[float, str]:
        """The most peak bytes a pixel of a photo of ``--max-pixels`` takes in a loaded model (its tiles counted:
        Embedder.bytes_per_pixel), and which model that is (empty where no tiled model takes more than an untiled
        one)."""
        rate, why = float(PEAK_BYTES_PER_PIXEL), ""
        for name in self.registry.names():
            try:
                model = self.registry.get(name).model
            except (LookupError, StorageStuck):  # removed meanwhile, failed, or its files do not answer
                continue
            own = model.embedder.bytes_per_pixel(self.settings.max_pixels, kept_dims(model))
            if own > rate:
                rate, why = own, f" (model {name}'s tiles)"
        return rate, why

    def _warm(self, names: list[str] | None = None) -> None:
        """Run one blank image through each model at both thread budgets before it takes traffic, so the first
        part after a start or a re-fit is not the one that pays for session set-up, allocations and thread pools."""
        share = self.batcher.shared_threads
        for name in self.registry.names() if names is None else names:
            if self._stopping.is_set():
                break
            try:
                model = self.registry.get(name).model
            except (LookupError, StorageStuck):  # removed meanwhile, failed, or its files do not answer
                continue
            try:  # scoring under each budget also builds the ONNX session of that size
                side = model.config.image_size
                blank = np.full((side, side, 3), 128, np.uint8)
                for n, threads in enumerate(sorted({share, self.batcher.threads}, reverse=True)):
                    with intra_op_threads(threads, restore=self.batcher.threads):
                        if n == 0:  # a tiled model's whole backbone pass: the buffers it grows serve every budget
                            model.embedder.warm_pass(model.knn.keep)
                        model.score(blank)
            except Exception:  # a warm-up is an optimization: it must never keep a loaded model from serving
                log.warning("warm-up of model %s failed; it will warm on its first request", name, exc_info=True)

    # --------------------------------------------------------------------------------------------------- models
    def model_entry(self, name: str | None) -> ModelEntry:
        """The loaded model of that name (``None``: the default, or the only one); LookupError says why not."""
        return self.registry.get(name)

    def drift_status(self, entry: ModelEntry) -> DriftStatus | None:
        """Where this model's recent parts stand against its calibration images (None: too few of those)."""
        status = self.drift.status(entry.name, entry.drift_window, entry.model.calibration_, _image_map(entry.model),
                                   entry.model.limits.jpeg_quality)
        self._log_drift(entry, status)
        return status

    def _log_drift(self, entry: ModelEntry, status: DriftStatus | None) -> None:
        """One line when a model's drift alarm rises or clears (tested at each scrape, or when asked for): the
        alarm was only a gauge, and the log, all the on-call engineer may have, never said the line had moved. A
        load anew restarts the window: its alarm is reset, not cleared (no part has come back yet)."""
        alarm = status is not None and status.alarm
        with self._drift_alarms_lock:
            serial, before, _ = self._drift_alarms.get(entry.name, (entry.drift_window, False, entry.version_id))
            if entry.drift_window < serial:  # a request's entry of a load since replaced: the newer one's window counts
                return
            if before is None:  # removed since: a read of the removed load says nothing; one put back starts anew
                if entry.drift_window == serial:
                    return
                before = False
            self._drift_alarms[entry.name] = (entry.drift_window, alarm, entry.version_id)
        if before and entry.drift_window != serial:  # loaded anew: no part of this load is judged yet, none came back
            log.info("drift alarm on model %s reset: version %s was loaded anew and its drift window starts empty; "
                     "it rises again once enough of the parts it scores still differ", entry.name, entry.version_id)
            before = False
        if alarm and not before:
            assert status is not None and status.driven_by is not None
            q = status.driven_by
            log.warning("drift alarm on model %s (version %s): the %s of its last %d parts is not the training "
                        "images' (KS %.2f, p %.1e; median %.4g against %.4g): %s GET /models/%s/drift",
                        entry.name, entry.version_id, q, status.quantity_parts[q], status.statistics[q],
                        status.p_values[q], status.window_median[q], status.reference_median[q],
                        compression_said(status) or "a changed part, camera or light?", entry.name)
        elif before and not alarm:
            log.info("drift alarm on model %s (version %s) cleared", entry.name, entry.version_id)

    def _drift_gone(self, names: set[str]) -> None:
        """The drift of models no longer served: their windows go, and an alarm that was on is said to have ended.
        The log said when it rose and nothing when the model went, so a log-based alert, or the engineer reading
        the log, saw it on for good. The model is marked removed, not forgotten: a drift read of the removed load
        still under way would otherwise find no alarm known and say it rose again."""
        self.drift.forget(set(self.registry.names()))
        ended = []
        with self._drift_alarms_lock:
            for name in names:
                known = self._drift_alarms.get(name)
                if known is None or known[1] is None:
                    continue
                self._drift_alarms[name] = (known[0], None, known[2])
                if known[1]:
                    ended.append((name, known[2]))
        for name, version in ended:
            log.info("drift alarm on model %s (version %s) ended: the model was removed (a re-scan no longer finds "
                     "it in the model directory), so no part is judged against it any more", name, version)

    def export_drift(self) -> None:
        """Refresh the drift gauges (run when metrics are scraped, so scoring never pays for the test). Blocking:
        it runs every model's KS tests, so call it off the event loop."""
        with self._drift_export_lock:  # two scrapes at once would each drop the gauges the other just set
            entries = self.model_entries()
            # the re-scan that drops a model says so (_count_loads); a model served again later starts with no alarm
            with self._drift_alarms_lock:
                gone = set(self._drift_alarms) - {e.name for e in entries}
            self._drift_gone(gone)
            exported = set()
            for entry in entries:
                status = self.drift_status(entry)
                if status is not None:
                    self.telemetry.drift.labels(entry.name).set(status.drift)
                    self.telemetry.drift_alarm.labels(entry.name).set(int(status.alarm))
                    exported.add(entry.name)
            # a model deleted from the model directory leaves no gauge behind: its last alarm would fire on forever
            for name in self._drift_exported - exported:
                for gauge in (self.telemetry.drift, self.telemetry.drift_alarm):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
            self._drift_exported = exported

    def model_entries(self) -> list[ModelEntry]:
        """Every loaded model, by name."""
        entries = []
        for name in self.registry.names():
            with contextlib.suppress(LookupError):  # removed meanwhile
                entries.append(self.registry.get(name))
        return entries

    async def refresh(self) -> dict[str, str]:
        """Re-scan the model directory: load new models, reload re-fitted ones, drop deleted ones."""
        changes = await self.elsewhere(self.registry.refresh)
        if changes:
            await self.elsewhere(self._warm, list(changes))
            self._refit_pixels()
        self._count_loads(changes)
        return changes

    async def elsewhere(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, its memory not taken for the photos in flight (Admission.elsewhere):
        a model loaded, re-fitted or warmed."""
        with self.admission.elsewhere():
            return await run_in_threadpool(fn, *args)

    def _count_loads(self, changes: dict[str, str]) -> None:
        """Count what a start-up or a re-scan did per model (``loaded``, ``reloaded``, ``failed: why``, ...) by
        outcome, so a model that is broken at start-up shows in the metrics as it would after a re-fit."""
        for name, what in changes.items():
            self.telemetry.reloads.labels(name, what.split(":")[0]).inc()
            if what == "removed":
                self.telemetry.forget_model(name)
                self._drift_gone({name})
        self.telemetry.models_loaded.set(len(self.registry.names()))

    async def warm(self, names: list[str]) -> None:
        """Warm new versions (after an update, a rollback or a reload) so their first part does not pay for session
        set-up, and fit the pixel budget to them (a version may tile where the one before did not)."""
        await self.elsewhere(self._warm, names)
        self._refit_pixels()

    async def reload(self, name: str) -> None:
        """Reload one model from disk. LookupError: no such model directory; AnomalyError: it does not load (the
        previous version, if any, keeps serving)."""
        await run_in_threadpool(self.registry.model_path, name)  # waits out a save between its renames
        try:
            await self.elsewhere(self.registry.reload, name)
        except AnomalyError:
            self.telemetry.reloads.labels(name, "failed").inc()
            raise
        await self.warm([name])  # as a re-scan warms what it loads: the first part is not the slow one
        self.telemetry.reloads.labels(name, "reloaded").inc()
        self.telemetry.models_loaded.set(len(self.registry.names()))

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                changes = await self.refresh()
                done = {name: what for name, what in changes.items() if not what.startswith("failed")}
                if done:  # a failure has its own error line (registry.refresh): said once, not twice
                    log.info("model directory changed: %s", done)
            except Exception:  # the watcher must never die; the next round retries
                log.exception("model refresh failed")

    # -------------------------------------------------------------------------------------------------- records
    def record(self, scored: Scored, data: bytes, context: PartContext) -> str | None:
        """Hand one answered image to the recorder (never blocks, never raises: recording is off the request path).
        The id its record will have, so a client can find it; None when it will have none."""
        if self.recorder is None:
            return None
        try:
            keep = self.recorder.keeps(scored.result.is_anomaly)
            pending = pending_from(scored, data, context, keep, request_id=request_id.current.get())
            return pending.id if self.recorder.submit(pending) else None
        except Exception:  # a record must never cost the answer
            log.exception("records: could not buffer the record of one image")
            self.telemetry.records_dropped.labels("error").inc()
            return None

    def record_lost(self) -> None:
        """Count one answered image whose record is lost because recording, asked for, could not start: the
        drop alert then fires (recording switched off with ``--record false`` loses nothing)."""
        if self.recording_problem is not None:
            self.telemetry.records_dropped.labels("unavailable").inc()

    # -------------------------------------------------------------------------------------------------- scoring
    async def admit(self, upload: UploadFile, entry: ModelEntry | None = None) -> Ticket:
        """Read the upload's header (no pixel is decoded) and reserve what decoding and scoring it will hold.

        A file that decoding would refuse gets its 4xx here; one that does not fit the budgets in flight, or that
        would find the inference queue full, gets 503 ``overloaded`` with ``Retry-After``: before its bytes are read
        into memory, and without waiting behind anything. The header is read on a worker thread: it is cheap for a
        photo, but a forged file with a million chunks before its pixels took Pillow seconds, and on the event loop
        that froze every request, the probes included (docs/decisions.md)."""
        name = upload.filename or "upload"
        try:
            width, height, _ = await run_in_threadpool(declared_size, upload.file, self.limits, name)
        except ImageLoadError as exc:
            self.telemetry.bad_inputs.labels(exc.kind).inc()
            raise image_error(exc) from None
        if self.batcher.full:
            raise self._overloaded("queue", self.batcher.retry_after(),
                                   f"the inference queue is full ({self.batcher.queue_size} images); retry in "
                                   f"{self.batcher.retry_after()} s")
        try:
            tiles = entry.model.embedder.tile_bytes(height, width, kept_dims(entry.model)) if entry is not None else 0
            return self.admission.admit(width * height, _size(upload), tiles)
        except Refused as exc:
            raise self._overloaded(exc.reason, exc.retry_after, str(exc)) from None

    def _overloaded(self, reason: str, retry_after: int, detail: str) -> ApiError:
        self.telemetry.overloaded.inc()
        self.telemetry.overloaded_by_reason.labels(reason).inc()
        return ApiError(503, "overloaded", detail, {"Retry-After": str(retry_after)})

    def limits_for(self, name: str | None) -> ImageLimits:
        """How photos for model ``name`` decode: the service's limits, with the bit depth the model's good images
        were read with (bit_depth.py); the service's alone when it is not loaded."""
        try:
            return self.registry.get(name).model.limits
        except (LookupError, StorageStuck):
            return self.limits

    async def decode(self, data: bytes, name: str, client: ClientWatch, limits: ImageLimits
                     ) -> tuple[DecodedImage, float]:
        """Decode on a free decode thread, with ``limits`` (the model's, which carry its bit depth).
        Waiting for a thread ends early if the client leaves (ClientGone), and so does a client that left before its
        turn came; a decode that has started runs to its end."""
        assert self._decode_slots is not None, "Service.start() was not awaited"
        slot = asyncio.ensure_future(self._decode_slots.acquire())
        try:
            await client.race(slot)
        except ClientGone:
            if slot.done() and not slot.cancelled():  # acquired just as the client left
                self._decode_slots.release()
            raise
        try:
            if await client.gone():
                raise ClientGone()
            t0 = time.perf_counter()
            try:
                image = await self.cpu(decode_image, data, limits, name, pool="decode")
            except ImageLoadError as exc:
                self.telemetry.bad_inputs.labels(exc.kind).inc()
                raise image_error(exc) from None
            return image, (time.perf_counter() - t0) * 1000.0
        finally:
            self._decode_slots.release()

    async def score(self, entry: ModelEntry, image: np.ndarray, client: ClientWatch | None = None) -> ScoreResult:
        """Score on the batcher; if the client leaves meanwhile, its image is withdrawn (ClientGone)."""
        try:
            job = self.batcher.enqueue(entry, image)
        except Overloaded as exc:
            raise self._overloaded("queue", exc.retry_after, str(exc)) from None
        try:
            return await (client or ClientWatch(None)).race(job.future)
        except ClientGone:
            await self.batcher.abandon(job)  # returns once no pass holds the image any more
            raise
        except AnomalyError as exc:
            raise ApiError(422, "unscorable", str(exc)) from None

    def render(self, entry: ModelEntry, image: np.ndarray, res: ScoreResult, heatmap: HeatmapKind,
               picture: bool = False, jpeg_quality: int | None = None, max_side: int | None = None) -> Scored:
        """Turn a result into the answer; ``picture``: the overlay PNG is the answer, so the JSON carries no heatmap.
        ``jpeg_quality``: the uploaded file's, for the drift window; ``max_side``: the pictures' longest side."""
        t0 = time.perf_counter()
        if picture:
            kinds = ["overlay"]
        else:
            kinds = [] if heatmap == "none" else [heatmap]
        verdict = render_result(res, image, kinds, self.settings.array_max_side, TrainingEvidence.of(entry.model),
                                max_side)
        res.timing_ms["render"] = (time.perf_counter() - t0) * 1000.0
        res.timing_ms["total"] = sum(v for k, v in res.timing_ms.items() if k != "total")
        self.telemetry.observe_result(entry.name, res.normalized_score, res.is_anomaly, res.timing_ms)
        self.drift.observe(entry.name, entry.drift_window, entry.model.calibration_, _image_map(entry.model),
                           res.normalized_score, res.anomaly_map, None if res.matches is None else res.matches.pooled,
                           jpeg_quality, entry.model.limits.jpeg_quality)
        shown = None if picture else verdict.heatmaps.get(heatmap)
        return Scored(ScoreOut.from_verdict(entry, res, verdict, shown), entry, image, res, verdict)

    async def score_upload(self, upload: UploadFile, entry: ModelEntry, heatmap: HeatmapKind = "none",
                           picture: bool = False, client: ClientWatch | None = None,
                           max_side: int | None = None) -> Scored:
        """Admit, decode, score on ``entry``'s model and render one uploaded file.

        Its budget (admission.py) is held until the answer is ready, the work fails, or ``client`` goes away: then
        the work is dropped at the next step (499 ``client_closed_request``, which nobody receives)."""
        client = client or ClientWatch(None)
        ticket = await self.admit(upload, entry)
        stage = "decode"
        try:
            if await client.gone():
                raise ClientGone()
            self.batcher.announce()
            try:
                data = await upload.read()
                decoded, decode_ms = await self.decode(data, upload.filename or "upload", client,
                                                       entry.model.limits)
            finally:
                self.batcher.withdraw()
            del data
            image = decoded.array
            ticket.decoded()
            stage = "score"
            if await client.gone():
                raise ClientGone()
            res = await self.score(entry, image, client)
            # how the file was read (which frame) comes before the rest; a harder JPEG only with a flag
            res.warnings[:0] = said_with(decoded.warnings, res.is_anomaly)
            res.timing_ms["decode"] = decode_ms
            stage = "render"
            if await client.gone():
                raise ClientGone()
            return await self.cpu(self.render, entry, image, res, heatmap, picture, decoded.jpeg_quality, max_side)
        except ClientGone:
            self.telemetry.abandoned.labels(stage).inc()
            raise ApiError(499, "client_closed_request", "the client closed the connection before the answer was "
                           "ready") from None
        finally:
            ticket.release()


def kept_dims(model: AnomalyModel) -> int | None:
    """How many dimensions of each patch's embedding the model keeps (None: all): a tiled photo's features take
    that many floats a patch."""
    keep = model.knn.keep
    return None if keep is None else len(keep)


def _size(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    here = upload.file.tell()
    size = upload.file.seek(0, io.SEEK_END)
    upload.file.seek(here)
    return size


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    await service.start()
    if service.settings.api_key is None:
        rebinding = (", and to web pages its users' browsers open (DNS rebinding) unless --allowed-hosts lists the "
                     "names it is called by") if "*" in service.settings.allowed_hosts else ""
        log.warning("no API key set (ANOMALY_API_KEY): every route, the admin ones included, is open to anyone who "
                    "can reach this port%s", rebinding)
    yield
    await service.stop()
