"""The HTTP service: a thin FastAPI shell over :class:`AnomalyModel`, the registry and the micro-batcher.

``create_app(settings)`` builds the app; ``anomaly serve`` runs it with uvicorn. Decoding and rendering run in
the thread pool, inference on the batcher's worker threads, so the event loop only moves bytes.
"""

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any, AsyncIterator

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .batching import MicroBatcher, Overloaded
from .device import resolve_device
from .errors import AnomalyError, ConfigError, ImageLoadError
from .heatmap import DISPLAY_MAX, colorize, heatmap_png, overlay, resize_map, to_png
from .images import load_image
from .model import ScoreResult
from .parallelism import default_inference_workers, fit_threads_to_cpu_quota, intra_op_threads
from .regions import find_regions
from .registry import ModelEntry, ModelRegistry
from .schemas import (BatchItemOut, BatchOut, ErrorOut, HeatmapKind, HeatmapOut, ModelsOut, ModelSummary, RegionOut,
                      ReloadOut, ScoreOut)
from .settings import ServiceSettings
from .telemetry import Telemetry

log = logging.getLogger(__name__)

# Image-decoding failures -> HTTP status: the client sent something we cannot or will not score.
STATUS_FOR_KIND = {"empty": 400, "corrupt": 400, "bad_array": 400, "missing": 400, "too_small": 422,
                   "not_image": 415, "unsupported_format": 415, "too_large": 413}
DECISION_HEADERS = ["X-Anomaly-Score", "X-Anomaly-Normalized-Score", "X-Anomaly-Decision", "X-Anomaly-Threshold",
                    "X-Anomaly-Model", "X-Anomaly-Model-Version"]
MULTIPART_OVERHEAD = 64 * 1024
# (No ``from __future__ import annotations`` in this module: FastAPI reads these annotations at run time.)
ModelQuery = Annotated[str | None, Query(description="Model name under --model-dir; optional when one model is "
                                                     "loaded or a default is set", examples=["bottle"])]
HeatmapQuery = Annotated[HeatmapKind, Query(description="none | png (color map, input size) | overlay (on the "
                                                         "input) | array (base64 float16, longer side <= "
                                                         "array_max_side)")]


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self) -> ErrorOut:
        return ErrorOut(error=self.code, detail=self.detail)


class BodyLimit:
    """ASGI middleware: 413 for request bodies above the limit, whether Content-Length says so or not.

    The body is never buffered here: bytes are counted as they stream to the app, and once the limit is passed
    the app sees a disconnect and the client gets the 413.
    """

    def __init__(self, app: ASGIApp, limit_for: Any):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_413(send, limit)
        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive() -> Message:
            if state["exceeded"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"]:
                return  # the app's reaction to the fake disconnect is replaced by our 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            await _send_413(send, limit)


async def _send_413(send: Send, limit: int) -> None:
    body = ErrorOut(error="too_large", detail=f"request body exceeds the limit of {limit} bytes").model_dump_json()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body.encode()})


def _warm_codecs(limits: Any) -> None:
    import io

    from PIL import Image

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, fmt)
        load_image(buf.getvalue(), limits, "warm-up")
    heatmap_png(np.zeros((8, 8), np.float32))


def _default_workers(device: str) -> int:
    try:
        device_type = resolve_device(device).type
    except ConfigError:  # the registry reports a bad device when it loads the models
        device_type = "cpu"
    return default_inference_workers(device_type, torch.get_num_threads())


class Service:
    """What the app holds between requests: settings, models, batcher, metrics."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.limits = settings.image_limits()
        self.registry = ModelRegistry(settings.model_dir, device=settings.device, weights=settings.weights,
                                      limits=self.limits, default=settings.default_model,
                                      knn_precision=settings.knn_precision, runtime=settings.runtime)
        self.telemetry = Telemetry()
        self.batcher = MicroBatcher(settings.batch_max_size, settings.batch_wait_ms, settings.queue_size,
                                    on_batch=self.telemetry.batch_size.observe,
                                    on_depth=self.telemetry.queue_depth.set,
                                    on_running=self.telemetry.batches_running.set,
                                    workers=settings.inference_workers or _default_workers(settings.device))
        self._watch: asyncio.Task | None = None
        # Decoding and rendering get small pools of their own: with dozens of requests in flight, an unbounded
        # pool runs them all at once and starves the inference threads' cores; and with one shared pool, decodes
        # of the next batch queue behind renders of the last one while the backbone idles (both measured).
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="decode")
        self._render_pool = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="render")

    async def cpu(self, fn: Any, *args: Any, pool: str = "render") -> Any:
        executor = self._decode_pool if pool == "decode" else self._render_pool
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def start(self) -> None:
        await run_in_threadpool(self.registry.load_all)
        await run_in_threadpool(self._warm)
        await self.cpu(_warm_codecs, self.limits, pool="decode")  # PNG/JPEG plugins and color table load once
        self.telemetry.models_loaded.set(len(self.registry.names()))
        await self.batcher.start()
        if self.settings.reload_interval > 0:
            self._watch = asyncio.create_task(self._watch_models(), name="model-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.batcher.stop()
        for pool in (self._decode_pool, self._render_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def _warm(self, names: list[str] | None = None) -> None:
        """Run one blank image through each model at both thread budgets before it takes traffic, so the first
        part after a start or a re-fit is not the one that pays for session set-up, allocations and thread pools."""
        share = self.batcher.shared_threads
        for name in self.registry.names() if names is None else names:
            try:
                model = self.registry.get(name).model
            except LookupError:  # removed meanwhile
                continue
            try:  # scoring under each budget also builds the ONNX session of that size
                blank = np.full((model.config.image_size, model.config.image_size, 3), 128, np.uint8)
                for threads in sorted({share, self.batcher.threads}):
                    with intra_op_threads(threads, restore=self.batcher.threads):
                        model.score(blank)
            except Exception:  # a warm-up is an optimization: it must never keep a loaded model from serving
                log.warning("warm-up of model %s failed; it will warm on its first request", name, exc_info=True)

    async def refresh(self) -> dict[str, str]:
        changes = await run_in_threadpool(self.registry.refresh)
        if changes:
            await run_in_threadpool(self._warm, list(changes))
        for name, what in changes.items():
            self.telemetry.reloads.labels(name, what.split(":")[0]).inc()
        self.telemetry.models_loaded.set(len(self.registry.names()))
        return changes

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                changes = await self.refresh()
                if changes:
                    log.info("model directory changed: %s", changes)
            except Exception:  # the watcher must never die; the next round retries
                log.exception("model refresh failed")

    def entry(self, name: str | None) -> ModelEntry:
        try:
            return self.registry.get(name)
        except LookupError as exc:
            raise ApiError(404, "unknown_model", str(exc)) from None

    async def decode(self, data: bytes, filename: str | None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        try:
            image = await self.cpu(load_image, data, self.limits, filename or "upload", pool="decode")
        except ImageLoadError as exc:
            self.telemetry.bad_inputs.labels(exc.kind).inc()
            raise ApiError(STATUS_FOR_KIND.get(exc.kind, 400), exc.kind, str(exc)) from None
        return image, (time.perf_counter() - t0) * 1000.0

    async def score(self, entry: ModelEntry, image: np.ndarray) -> ScoreResult:
        try:
            return await self.batcher.submit(entry, image)
        except Overloaded as exc:
            self.telemetry.overloaded.inc()
            raise ApiError(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except AnomalyError as exc:
            raise ApiError(422, "unscorable", str(exc)) from None

    def render(self, entry: ModelEntry, image: np.ndarray, res: ScoreResult, heatmap: str) -> ScoreOut:
        t0 = time.perf_counter()
        norm = res.normalized_map()
        regions = [RegionOut(**r.to_dict()) for r in find_regions(norm)]
        out_map: HeatmapOut | None = None
        h, w = norm.shape
        if heatmap in ("png", "overlay"):
            png = heatmap_png(norm) if heatmap == "png" else to_png(overlay(image, colorize(norm)))
            out_map = HeatmapOut(kind=heatmap, media_type="image/png", width=w, height=h,
                                 scale=f"turbo color map, normalized score 0 to {DISPLAY_MAX} "
                                       "(1.0 = threshold, two thirds up the scale)",
                                 data=base64.b64encode(png).decode())
        elif heatmap == "array":
            side = self.settings.array_max_side
            f = min(1.0, side / max(h, w))
            small = resize_map(norm, (max(1, round(h * f)), max(1, round(w * f)))) if f < 1 else norm
            out_map = HeatmapOut(kind="array", media_type="application/octet-stream", width=w, height=h,
                                 dtype="float16", byte_order="little", shape=list(small.shape),
                                 scale="normalized score per cell (1.0 = threshold); cells cover the image evenly",
                                 data=base64.b64encode(small.astype("<f2").tobytes()).decode())
        res.timing_ms["render"] = (time.perf_counter() - t0) * 1000.0
        res.timing_ms["total"] = sum(v for k, v in res.timing_ms.items() if k != "total")
        self.telemetry.observe_result(entry.name, res.normalized_score, res.is_anomaly, res.timing_ms)
        return ScoreOut(model=entry.name, model_version=entry.version[:16], score=res.score,
                        normalized_score=res.normalized_score, is_anomaly=res.is_anomaly, threshold=res.threshold,
                        image_width=res.image_width, image_height=res.image_height, regions=regions,
                        timing_ms={k: round(v, 3) for k, v in res.timing_ms.items()}, heatmap=out_map,
                        scorers=res.scorers or None)

    async def score_upload(self, data: bytes, filename: str | None, model: str | None,
                           heatmap: str) -> tuple[ScoreOut, ModelEntry, np.ndarray, ScoreResult]:
        entry = self.entry(model)  # resolved before decoding: a wrong name costs nothing
        self.batcher.announce()
        try:
            image, decode_ms = await self.decode(data, filename)
        finally:
            self.batcher.withdraw()
        res = await self.score(entry, image)
        res.timing_ms["decode"] = decode_ms
        out = await self.cpu(self.render, entry, image, res, heatmap)
        return out, entry, image, res


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=exc.headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Empty, truncated or corrupt image"},
    401: {"model": ErrorOut, "description": "Missing or wrong X-API-Key"},
    404: {"model": ErrorOut, "description": "Unknown model"},
    413: {"model": ErrorOut, "description": "Upload or pixel count above the configured limit"},
    415: {"model": ErrorOut, "description": "Not an image, or a format that is not accepted"},
    422: {"model": ErrorOut, "description": "Image too small to score, or invalid parameters"},
    503: {"model": ErrorOut, "description": "Queue full: retry after the Retry-After header's seconds"},
}


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    fit_threads_to_cpu_quota()  # before the batcher reads the thread count
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        log.info("serving %d model(s) from %s: %s", len(service.registry.names()), settings.model_dir,
                 ", ".join(service.registry.names()) or "none")
        yield
        await service.stop()

    app = FastAPI(
        title="anomaly", version=__version__, lifespan=lifespan,
        description="Industrial visual anomaly detection: PatchCore scores, calibrated decisions and heatmaps. "
                    "Upload a photo to `/score`; `normalized_score` is 1.0 at the model's threshold.",
    )
    app.state.service = service

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed when the server has an API key")

    async def require_key(key: Annotated[str | None, Depends(api_key_header)]) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if expected and not (key and secrets.compare_digest(key.encode(), expected.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    secured = [Depends(require_key)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(ErrorOut(error=code, detail=str(exc.detail)).model_dump(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _metrics(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        service.telemetry.requests.labels(request.method, path, str(response.status_code)).inc()
        service.telemetry.request_seconds.labels(path).observe(time.perf_counter() - t0)
        return response

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Content-Type", "Accept"], expose_headers=DECISION_HEADERS)

    def body_limit(path: str) -> int:
        per_file = settings.max_upload_bytes + MULTIPART_OVERHEAD
        return per_file * settings.max_batch_files if path.rstrip("/").endswith("/batch") else per_file

    app.add_middleware(BodyLimit, limit_for=body_limit)

    def _png_response(out: ScoreOut, entry: ModelEntry, image: np.ndarray, res: ScoreResult) -> Response:
        png = to_png(overlay(image, colorize(res.normalized_map())))
        headers = {"X-Anomaly-Score": f"{out.score:.6g}", "X-Anomaly-Normalized-Score": f"{out.normalized_score:.6g}",
                   "X-Anomaly-Decision": "anomaly" if out.is_anomaly else "normal",
                   "X-Anomaly-Threshold": f"{out.threshold:.6g}", "X-Anomaly-Model": entry.name,
                   "X-Anomaly-Model-Version": out.model_version}
        return Response(png, media_type="image/png", headers=headers)

    @app.post("/score", response_model=ScoreOut, dependencies=secured, tags=["scoring"],
              responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}},
                                                  "description": "JSON result, or the overlay PNG when "
                                                                 "Accept: image/png"}})
    async def score(file: Annotated[UploadFile, File(description="One image: PNG, JPEG, BMP, TIFF, WebP, ...")],
                    request: Request, model: ModelQuery = None,
                    heatmap: HeatmapQuery = "none") -> Any:
        """Score one image. With `Accept: image/png` the answer is the overlay picture itself, with the score and
        decision in `X-Anomaly-*` headers."""
        data = await file.read()
        wants_png = "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", "")
        out, entry, image, res = await service.score_upload(data, file.filename, model,
                                                            "none" if wants_png else heatmap)
        if wants_png:
            return await service.cpu(_png_response, out, entry, image, res)
        return out

    @app.post("/score/image", dependencies=secured, tags=["scoring"], response_class=Response,
              responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}},
                                                  "description": "Overlay PNG; score and decision in headers"}})
    async def score_image(file: Annotated[UploadFile, File(description="One image")],
                          model: ModelQuery = None) -> Response:
        """Score one image and return the heatmap overlay as a PNG (for an `<img>` or an image panel)."""
        data = await file.read()
        out, entry, image, res = await service.score_upload(data, file.filename, model, "none")
        return await service.cpu(_png_response, out, entry, image, res)

    @app.post("/score/batch", response_model=BatchOut, dependencies=secured, tags=["scoring"],
              responses=ERROR_RESPONSES)
    async def score_batch(files: Annotated[list[UploadFile], File(description="Several images")],
                          model: ModelQuery = None,
                          heatmap: HeatmapQuery = "none") -> BatchOut:
        """Score several images; results come in upload order, and one bad file only fails its own entry."""
        if len(files) > settings.max_batch_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files; the limit is {settings.max_batch_files} "
                                                  "per request")
        service.entry(model)

        async def one(i: int, f: UploadFile) -> BatchItemOut:
            try:
                out, *_ = await service.score_upload(await f.read(), f.filename, model, heatmap)
                return BatchItemOut(index=i, filename=f.filename, ok=True, result=out, status=200)
            except ApiError as exc:
                return BatchItemOut(index=i, filename=f.filename, ok=False, error=exc.body(), status=exc.status)

        return BatchOut(results=list(await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))))

    @app.get("/models", response_model=ModelsOut, dependencies=secured, tags=["models"])
    async def list_models() -> ModelsOut:
        """Loaded models, the default, and models on disk that failed to load (with why)."""
        entries = [service.registry.get(n) for n in service.registry.names()]
        return ModelsOut(models=[ModelSummary(**e.summary()) for e in entries], default=settings.default_model,
                         errors=service.registry.errors())

    @app.get("/models/{name}", dependencies=secured, tags=["models"], responses={404: {"model": ErrorOut}})
    async def get_model(name: str) -> dict[str, Any]:
        """The model's summary and its full manifest (configuration, calibration, training provenance)."""
        entry = service.entry(name)
        return {"summary": entry.summary(), "manifest": entry.model.manifest_}

    @app.post("/models/reload", response_model=ReloadOut, dependencies=secured, tags=["models"])
    async def reload_all() -> ReloadOut:
        """Re-scan the model directory now: load new models, reload re-fitted ones, drop deleted ones.
        Requests in flight finish on the model they started with."""
        changes = await service.refresh()
        return ReloadOut(changes=changes, models=service.registry.names())

    @app.post("/models/{name}/reload", response_model=ReloadOut, dependencies=secured, tags=["models"],
              responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def reload_one(name: str) -> ReloadOut:
        """Reload one model from disk (e.g. after `anomaly fit --out` replaced it)."""
        if name not in service.registry.candidates():
            raise ApiError(404, "unknown_model", f"no model named {name!r} under the model directory")
        try:
            await run_in_threadpool(service.registry.load, name)
        except AnomalyError as exc:
            service.telemetry.reloads.labels(name, "failed").inc()
            raise ApiError(422, "model_invalid", f"{exc} (the previous version, if any, keeps serving)") from None
        service.telemetry.reloads.labels(name, "reloaded").inc()
        service.telemetry.models_loaded.set(len(service.registry.names()))
        return ReloadOut(changes={name: "reloaded"}, models=service.registry.names())

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "No model loaded yet"}})
    async def readyz() -> JSONResponse:
        """Readiness: at least one model is loaded and can score."""
        names = service.registry.names()
        body = {"ready": bool(names), "models": names, "errors": service.registry.errors(),
                "queue_depth": service.batcher.depth}
        return JSONResponse(body, status_code=200 if names else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency per stage, decisions and scores per model, queue, batches."""
        return Response(service.telemetry.render(), media_type=service.telemetry.content_type)

    page = resources.files("anomaly_service").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app

