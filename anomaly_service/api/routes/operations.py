"""Operations: liveness, readiness, Prometheus metrics, and the browser page at ``/``. No API key: probes and
scrapers carry none, and the page sends the key its user types. Readiness keeps why a model failed to load (file
names, the loader's own words) for requests with the key, as ``GET /models`` does."""

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..deps import ApiKeyDep, ProbedServiceDep, directory_stuck_since, key_allows, stuck_since
from ..lifecycle import Service
from ..schemas import HealthOut, ReadyOut

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """Liveness: the process answers."""
    return HealthOut(status="ok")


@router.head("/healthz")
async def healthz_head() -> Response:
    """Liveness for monitors that probe with HEAD: the same status, no body."""
    return Response(status_code=200)


# what /readyz says of a model that failed to load, to a request without the server's API key
REASON_WITHHELD = "failed to load; send X-API-Key to see why"


READYZ_RESPONSES: dict[int | str, dict] = {
    503: {"model": ReadyOut, "description": "The models are still loading at start-up, no model is loaded, the "
                                            "default model (--default-model) is not loaded, or the service is "
                                            "stopping (--stop-delay): `reason` says which"}}
# Prometheus' text format, declared so that a generated client reads the answer as text
METRICS_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}}


def not_ready_because(service: Service, names: list[str]) -> str | None:
    """Why the service should take no traffic yet (None: ready), given the loaded models' ``names``. A configured
    default model that is not loaded counts, not only an empty registry: every request naming no model would be a
    404, so a load balancer must not route here until a re-scan loads it."""
    if service.stop_announced:
        return ("stopping: a SIGTERM came; the service serves on for --stop-delay seconds so that load balancers "
                "take it out of rotation first")
    if service.loading is not None:  # a load balancer waits for all of them, not for the first few
        return service.loading
    if not names:
        listing = service.registry.listing_stuck()
        return "no model is loaded" + (f": {listing}" if listing is not None else "")
    default = service.registry.default
    if default and default not in names:
        return (f"the default model {default!r} (--default-model) is not loaded; requests that name no model "
                "would fail until it is" + (" (errors says why)" if default in service.registry.errors() else ""))
    return None


@router.get("/readyz", response_model=ReadyOut, responses=READYZ_RESPONSES)
async def readyz(service: ProbedServiceDep, key: ApiKeyDep) -> JSONResponse:
    """Readiness: the start-up loading has ended, at least one model is loaded and can score, and so is the
    default model when one is configured; ``reason`` says why not. ``recording`` says whether parts are recorded
    (``unavailable``: asked for, but it could not start; ``retrying``: the database refused the latest write, or the
    start-up's schema check, and records wait in the buffer until one goes through); it does not decide readiness,
    because scoring goes on. ``errors`` names the models that failed to load; why, only with the API key when the
    server has one; ``stuck`` the models whose files have not answered within --load-timeout, and since when;
    ``directory_stuck`` since when the model directory itself has not (the loaded models serve on from memory, so it
    does not decide readiness either, unless no model is loaded)."""
    names = service.registry.names()
    reason = not_ready_because(service, names)
    recording = ("unavailable" if service.recording_problem is not None
                 else "off" if service.recorder is None
                 else "retrying" if service.recorder.retrying else "on")
    errors = service.registry.errors()
    if not key_allows(service, key):
        errors = dict.fromkeys(errors, REASON_WITHHELD)
    body = {"ready": reason is None, "reason": reason, "models": names, "errors": errors,
            "stuck": stuck_since(service), "directory_stuck": directory_stuck_since(service),
            "queue_depth": service.batcher.depth, "recording": recording}
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.head("/readyz", responses={503: {"description": READYZ_RESPONSES[503]["description"]}})
async def readyz_head(service: ProbedServiceDep) -> Response:
    """Readiness's status for monitors that probe with HEAD (200 or 503, by the same rule as GET), no body."""
    return Response(status_code=200 if not_ready_because(service, service.registry.names()) is None else 503)


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
async def metrics(service: ProbedServiceDep) -> Response:
    """Prometheus metrics: requests, latency per stage, decisions and scores per model, queue, batches, drift,
    models that do not load, and the process's memory, open files, CPU time and threads.
    The drift gauges' KS tests run on a worker thread: on the event loop, every model's tests would hold up every
    request in flight on each scrape."""
    await run_in_threadpool(service.export_drift)
    service.telemetry.models_not_loading(set(service.registry.errors()))  # on the loop: two scrapes never interleave
    service.telemetry.directory_stuck.set(int(service.registry.listing_stuck() is not None))
    return Response(service.telemetry.render(), media_type=service.telemetry.content_type)


@cache
def page() -> str:
    """The single-file web page, read on its first request and kept."""
    return resources.files("anomaly_service").joinpath("web/index.html").read_text(encoding="utf-8")


def _hashes(tag: str, html: str) -> str:
    """CSP sources for the page's own inline ``<tag>`` elements: their SHA-256, as browsers hash them."""
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL))


@cache
def page_headers() -> dict[str, str]:
    """The page acts with the API key its browser keeps (localStorage): never inside another site's frame
    (clickjacking), and no script or style runs but its own, so markup that slipped into it runs nothing. It talks
    to its own origin only, and shows pictures from there, a data: URL or a blob: of a dropped photo."""
    html = page()
    policy = (f"default-src 'none'; script-src {_hashes('script', html)}; style-src {_hashes('style', html)}; "
              "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return {"X-Frame-Options": "DENY", "Content-Security-Policy": policy, "Referrer-Policy": "no-referrer"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(page(), headers=page_headers())
