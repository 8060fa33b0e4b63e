"""``create_app(settings)``: the FastAPI app over one :class:`Service`; ``anomaly serve`` runs it with uvicorn."""

from functools import partial

from fastapi import FastAPI

from .. import __version__
from ..parallelism import fit_threads_to_cpu_quota
from ..settings import ServiceSettings
from ..telemetry import Telemetry
from .errors import install_error_handlers
from .lifecycle import Service, lifespan
from .middleware import (AllowedHosts, BodyLimit, CloseWhileStopping, CrossSiteWrites, JsonCORSMiddleware,
                         KeyBeforeBody, NoCORS, NoSniff, RefuseBadRequestId, RequestMetrics, body_limit)
from .openapi import describe
from .request_id import HEADER as REQUEST_ID
from .routes import inspections, models, operations, scoring
from .schemas import DECISION_HEADERS, INSPECTION_HEADER


def create_app(settings: ServiceSettings | None = None, *, load_in_background: bool = False) -> FastAPI:
    """``load_in_background``: open the port first and load the models after (``anomaly serve``); otherwise the
    models are loaded before the app takes its first request (an app driven in-process)."""
    settings = settings or ServiceSettings()
    fit_threads_to_cpu_quota()  # before the service's batcher reads the thread count
    app = FastAPI(
        title="anomaly", version=__version__, lifespan=lifespan,
        # no Swagger UI or ReDoc: FastAPI's pages load their scripts from a public CDN (unpinned, no integrity
        # check) into this origin, where the page at / keeps the API key in localStorage; /openapi.json stays
        docs_url=None, redoc_url=None,
        description="Industrial visual anomaly detection: PatchCore scores, calibrated decisions and heatmaps. "
                    "Upload a photo to `/score`; `normalized_score` is 1.0 at the model's threshold.",
    )
    app.state.service = service = Service(settings, load_in_background=load_in_background)
    for area in (scoring, inspections, models, operations):
        app.include_router(area.router)
    install_error_handlers(app)
    describe(app)  # the uploads and pictures typed for client generators
    # Added innermost first: the metrics see a request first, then the refusal of hosts not served (DNS
    # rebinding), CORS, the body limit, the refusal of a malformed X-Request-ID and of other sites' writes
    # (neither needs a key), and the key check that refuses a keyless upload before its body is read.
    # CORS wraps every other layer that answers on its own, the body limit's 413 and 408 too: without its headers
    # a browser hides that answer from the dashboard behind an opaque network error. The host check stands outside
    # it: a host this service does not answer for gets no answer from any layer, a CORS preflight's neither.
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(KeyBeforeBody, api_key=key)
    app.add_middleware(CrossSiteWrites, allowed_origins=settings.cors_origins)
    app.add_middleware(RefuseBadRequestId)
    app.add_middleware(BodyLimit, limit_for=partial(body_limit, settings), idle_timeout=settings.timeout_body,
                       refused=partial(_refused_upload, service.telemetry))
    if settings.cors_origins:
        app.add_middleware(JsonCORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           # a dashboard reviews parts too (X-Reviewer), and reads the record a score made and
                           # when to retry an overload
                           allow_headers=["X-API-Key", "Content-Type", "Accept", "X-Reviewer", REQUEST_ID],
                           expose_headers=[*DECISION_HEADERS, INSPECTION_HEADER, "Retry-After", REQUEST_ID])
    else:
        app.add_middleware(NoCORS)
    app.add_middleware(AllowedHosts, allowed_hosts=settings.allowed_hosts)
    # outermost: what every layer inside answered (a body limit's 413 too) is counted, with its route
    app.add_middleware(RequestMetrics, telemetry=service.telemetry, routes=app.routes)
    app.add_middleware(NoSniff)  # around everything that answers: no answer is read as other than it says
    app.add_middleware(CloseWhileStopping, stopping=lambda: service.stop_announced)  # --stop-delay: api/server.py
    return app


def _refused_upload(telemetry: Telemetry, path: str, code: str) -> None:
    """A photo the body limit refused is an input rejected before scoring, as one decoding refuses."""
    if path.startswith("/score"):
        telemetry.bad_inputs.labels(code).inc()
