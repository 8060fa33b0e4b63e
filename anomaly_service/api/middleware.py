"""ASGI middleware of the service: request-body limits (size, and pauses) and request metrics."""

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import ServiceSettings
from ..telemetry import Telemetry
from .schemas import ErrorOut
from .server import carries_key, drain

MULTIPART_OVERHEAD = 64 * 1024  # multipart headers and boundaries around an upload of the maximum size
# the routes that take no file (a review, an undo, a rollback, a reload) read a JSON body of a few kilobytes at most
# (a note of 2,000 characters, each up to 12 bytes escaped): the upload limit there let one request parse 20 MB
JSON_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limit:
    """The largest request body a path takes, and the 413's detail: the settings a client can act on."""

    bytes: int
    detail: str


def body_limit(settings: ServiceSettings, path: str) -> Limit:
    """Largest request body accepted on ``path``: one file's worth, or ``max_batch_files`` of them for a batch;
    :data:`JSON_BODY_BYTES` on the routes that take no file.

    The bytes allow room for the multipart framing; the detail names the per-file setting as configured, since that
    is the limit a client can meet and an operator can raise (the framing is the service's own allowance)."""
    route = path.rstrip("/")
    if not (route == "/score" or route.startswith("/score/")
            or (route.startswith("/models/") and route.endswith("/update"))):
        return Limit(JSON_BODY_BYTES, f"request body exceeds the {JSON_BODY_BYTES} bytes this route takes: it reads "
                                      "a short JSON body (a verdict, a version, a note), not a photo")
    per_file = settings.max_upload_bytes
    hint = ("the service's --max-upload-bytes, ANOMALY_MAX_UPLOAD_BYTES, raises it; a large 8-bit photo also fits "
            "as a JPEG, but a 16-bit one would lose the bits its camera gives: raise the limit for it")
    # several files: a batch of scores, or the good images and known defects of a model update
    if path.rstrip("/").endswith(("/batch", "/update")):
        files = settings.max_batch_files
        return Limit((per_file + MULTIPART_OVERHEAD) * files,
                     f"request body exceeds what this route takes: at most {files} files (--max-batch-files) of "
                     f"at most {per_file} bytes each ({hint})")
    return Limit(per_file + MULTIPART_OVERHEAD,
                 f"request body exceeds the limit of {per_file} bytes per file ({hint})")


class BodyLimit:
    """ASGI middleware: 413 for request bodies above the limit, whether Content-Length says so or not; 408 for a
    body that pauses longer than ``idle_timeout`` seconds (0: no limit) between bytes.

    The body is never buffered here: bytes are counted as they stream to the app, and once the limit is passed
    (or the pause is too long) the app sees a disconnect and the client gets the 413 (or the 408). Without the
    timeout, a client that stops sending halfway would hold its connection and its request forever.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], Limit], idle_timeout: float = 0.0,
                 refused: Callable[[str, str], None] | None = None):
        self.app = app
        self.limit_for = limit_for
        self.idle_timeout = idle_timeout
        self.refused = refused  # (path, error code) of each refusal: the metrics, which run inside it, never see it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.bytes:
            self._note(scope, "too_large")
            return await _send_error(send, 413, "too_large", limit.detail)
        state = {"received": 0, "refused": None, "started": False, "complete": False}

        async def limited_receive() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["complete"] or not self.idle_timeout:
                message = await receive()  # after the body only the disconnect is left to come: no deadline
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.idle_timeout)
                except asyncio.TimeoutError:
                    state["refused"] = "timeout"
                    return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["complete"] = not message.get("more_body", False)
                if state["received"] > limit.bytes:
                    state["refused"] = "too_large"
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the app's reaction to the fake disconnect is replaced by our 413 or 408
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
        if state["refused"] and not state["started"]:
            self._note(scope, "too_large" if state["refused"] == "too_large" else "request_timeout")
            if state["refused"] == "too_large":
                await _send_error(send, 413, "too_large", limit.detail)
            else:
                await _send_error(send, 408, "request_timeout", f"the request body paused for more than "
                                  f"{self.idle_timeout:g} s; send it without stalling")


    def _note(self, scope: Scope, code: str) -> None:
        if self.refused is not None:
            self.refused(scope["path"], code)


async def _send_error(send: Send, status: int, code: str, detail: str) -> None:
    """An error answer in the one error shape, from below the app; the connection closes after it (the rest of
    the request body is never read)."""
    body = ErrorOut(error=code, detail=detail).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


KEYLESS_DRAIN_BYTES = 8 * 2**20  # a keyless request's body read before its 401: a photo's worth ...
KEYLESS_DRAIN_SECONDS = 2.0  # ... for at most this long


class KeyBeforeBody:
    """ASGI middleware: a request that sends a body (POST, PUT, PATCH, DELETE) without the right ``X-API-Key`` gets
    its 401 before the body is read. FastAPI parses a multipart body before any dependency runs, so the routes' own
    check answered a large upload from a client with no key only after receiving and spooling all of it, and a
    keyless client could hold a request slot by trickling a body (docs/decisions.md). The routes keep their
    check (for GET); the same rule, compared in constant time."""

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.expected = app, api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["method"] in self.BODY_METHODS:
            if not carries_key(scope, self.expected):
                # a little of the body is read first, so that a client with a wrong key and a photo sees the 401,
                # not a connection reset; a big or trickled upload is cut off
                await drain(receive, KEYLESS_DRAIN_BYTES, KEYLESS_DRAIN_SECONDS)
                await _send_error(send, 401, "unauthorized", "missing or wrong X-API-Key header")
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str) -> None:
    """Refuse a request before its route: what a body method is sending is read and dropped first (bounded, as
    for a keyless upload), since closing on an upload still arriving resets the connection and the client sees
    no answer."""
    if scope["method"] in KeyBeforeBody.BODY_METHODS:
        await drain(receive, KEYLESS_DRAIN_BYTES, KEYLESS_DRAIN_SECONDS)
    await _send_error(send, status, code, detail)


class RefuseBadRequestId:
    """ASGI middleware: 400 ``invalid_request_id`` for a request whose ``X-Request-ID`` :class:`EchoRequestId`
    found malformed (request_id.py), before its body is used: the client learns on its first call that its logs
    and ours would not match, instead of a silently replaced id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = scope.get("malformed_request_id") if scope["type"] == "http" else None
        if why:
            await _refuse(scope, receive, send, 400, "invalid_request_id", f"{why}; send one such id per request, "
                          "or none and the service makes one (the answer's X-Request-ID)")
            return
        await self.app(scope, receive, send)


class CrossSiteWrites:
    """ASGI middleware: 403 for a request with a body (POST, PUT, PATCH, DELETE) that a browser says comes from
    another site (``Sec-Fetch-Site: cross-site`` or ``same-site``) and whose ``Origin`` is not one ``--cors-origins``
    allows. A multipart POST needs no CORS preflight, so without it any page an operator opened could score, reload
    or update (teach defects as good) a model through their browser when the service has no API key. A browser
    that sends no ``Sec-Fetch-Site`` is judged by its ``Origin``: refused when it names another host than the
    request's. The page at ``/`` is same-origin, and clients that are no browser send neither header: neither is
    affected."""

    BODY_METHODS = KeyBeforeBody.BODY_METHODS

    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app = app
        self.any_origin = "*" in allowed_origins
        self.allowed = frozenset(o.rstrip("/").encode("latin-1") for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.BODY_METHODS and not self.any_origin:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").rstrip(b"/")
            site = headers.get(b"sec-fetch-site")
            if origin not in self.allowed and (site in (b"cross-site", b"same-site")
                                               or (site is None and origin and not _same_host(origin, headers))):
                await _refuse(scope, receive, send, 403, "cross_site_request", "a browser sent this request for a "
                              "page of another site; list that page's origin in --cors-origins to let it in")
                return
        await self.app(scope, receive, send)


def _same_host(origin: bytes, headers: dict[bytes, bytes]) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``, or ``null``) names the host and port the request was sent to.
    A browser without Fetch Metadata (Safari before 16.4, Firefox before 90, a panel PC's old WebView) still sends
    Origin with every cross-origin POST; only another site's page sends one naming another host."""
    name = origin.split(b"://", 1)[1] if b"://" in origin else b""
    return bool(name) and name.lower() == headers.get(b"host", b"").strip().lower()


class AllowedHosts:
    """ASGI middleware: 400 ``invalid_host`` for a request whose ``Host`` is not one ``--allowed-hosts`` lists
    (``*.plant.example`` matches its subdomains; ``*``, the default, any). A keyless service is otherwise open to
    DNS rebinding: a web page an operator opens has its own name resolve to the service's address, and the browser,
    taking the service for that page's own site, lets the page read the records and write to the models. The host
    is the one thing such a request cannot fake. Health probes are exempt: a Kubernetes probe names the pod's
    address, and they tell nothing."""

    EXEMPT = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.exact = frozenset(h.lower() for h in allowed_hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))  # ".plant.example"

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any_host and scope["path"] not in self.EXEMPT:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allows(host):
                await _refuse(scope, receive, send, 400, "invalid_host", f"this service does not answer for host "
                              f"{host[:100]!r}: call it by a name --allowed-hosts lists")
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """A Host header's name, lower case, without its port and without the final dot of a fully qualified name
    (``Inspect.Plant.Example.:8000`` -> ``inspect.plant.example``, ``[::1]:8000`` -> ``[::1]``): a browser sends
    the name as its address bar has it, and the trailing dot names the same host."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal keeps its brackets, as --allowed-hosts lists it; after it, a port only
        name, _, rest = host.partition("]")
        return name + "]" if rest == "" or re.fullmatch(r":[0-9]*", rest) else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name[:-1] if name.endswith(".") and name != "." else name


CORS_SETTING = ("--cors-origins lists the dashboards' origins, and the methods (GET, POST) and headers a dashboard "
                "may send")


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the service's one error shape (400
    ``cors_refused``): it answered it in plain text, the only error of the service a client could not parse."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        detail = f"{bytes(response.body).decode()}: {CORS_SETTING}"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(ErrorOut(error="cors_refused", detail=detail).model_dump(), status_code=400,
                            headers=headers)


class NoCORS:
    """Without ``--cors-origins`` no origin is allowed: a preflight is refused as a listed service refuses an origin
    it does not list (400 ``cors_refused``, naming the setting), not with the 405 of a method the route lacks, which
    sent a dashboard's developer looking for a route instead of the setting. Other requests pass untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                detail = f"Disallowed CORS origin: {CORS_SETTING}, and none is set here"
                response = JSONResponse(ErrorOut(error="cors_refused", detail=detail).model_dump(), status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class NoSniff:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every answer, refusals too. Error bodies repeat what
    a client sent (a model name, a file name) on the origin where the page keeps the API key: a browser must read
    them as the JSON they are declared, never guess HTML from their bytes."""

    HEADER = (b"x-content-type-options", b"nosniff")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != self.HEADER[0]]
                message = {**message, "headers": [*headers, self.HEADER]}
            await send(message)

        await self.app(scope, receive, sending)


class CloseWhileStopping:
    """ASGI middleware: once a stop is announced (a SIGTERM under ``--stop-delay``, api/server.py), every answer
    says ``Connection: close`` and its connection closes after it. A proxy that keeps connections to the replica
    open between requests then opens its next one elsewhere, instead of sending a part on a connection the stop
    is about to close."""

    def __init__(self, app: ASGIApp, stopping: Callable[[], bool]):
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and self.stopping():  # a request begun before the signal too
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, sending)


# the methods counted by name; any other token a client sends as its method counts as ``other``
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: count every HTTP request by method, route template and status, and time it.

    The route is the matched template (``/models/{name}``), never the raw path, and a method outside
    :data:`METRIC_METHODS` is ``other`` (HTTP allows any token there), so label values stay few whatever clients
    send; requests that match no route count as ``unmatched``. A request that fails with an exception counts as 500.
    """

    def __init__(self, app: ASGIApp, telemetry: Telemetry, routes: Sequence[BaseRoute] = ()):
        self.app = app
        self.telemetry = telemetry
        self.routes = routes  # to name the route of a request refused before the router saw it (the body limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            path = getattr(scope.get("route"), "path", None) or self._route_of(scope)  # the router sets it on
            # this same scope; a request the body limit refused never reached it
            method = scope["method"] if scope["method"] in METRIC_METHODS else "other"
            self.telemetry.requests.labels(method, path, str(status)).inc()
            self.telemetry.request_seconds.labels(path).observe(time.perf_counter() - t0)

    def _route_of(self, scope: Scope, routes: Sequence[BaseRoute] | None = None) -> str:
        """The template of the first route ``scope`` matches, looked for inside included routers too: FastAPI
        releases that list an included router as one entry of ``app.routes`` (with no ``path`` of its own) had every
        request refused before the router counted as ``unmatched``."""
        partial = None  # a route of the path for another method: the router answers 405 from it, unless one fits
        for route in self.routes if routes is None else routes:
            match = route.matches(scope)[0]
            if match == Match.NONE:
                continue
            path = getattr(route, "path", None)
            if not (isinstance(path, str) and path):
                inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes",
                                                                  None)
                path = self._route_of(scope, inner) if inner else "unmatched"
                if path == "unmatched":
                    continue
            if match == Match.FULL:
                return path
            partial = partial or path
        return partial or "unmatched"
