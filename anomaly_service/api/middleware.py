"""ASGI middleware of the service: request-body limits and request metrics."""

import time
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import ServiceSettings
from ..telemetry import Telemetry
from .schemas import ErrorOut

MULTIPART_OVERHEAD = 64 * 1024  # multipart headers and boundaries around an upload of the maximum size


def body_limit(settings: ServiceSettings, path: str) -> int:
    """Largest request body accepted on ``path``: one file's worth, or ``max_batch_files`` of them for a batch."""
    per_file = settings.max_upload_bytes + MULTIPART_OVERHEAD
    # several files: a batch of scores, or the good images and known defects of a model update
    return per_file * settings.max_batch_files if path.rstrip("/").endswith(("/batch", "/update")) else per_file


class BodyLimit:
    """ASGI middleware: 413 for request bodies above the limit, whether Content-Length says so or not.

    The body is never buffered here: bytes are counted as they stream to the app, and once the limit is passed
    the app sees a disconnect and the client gets the 413.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
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


class RequestMetrics:
    """ASGI middleware: count every HTTP request by method, route template and status, and time it.

    The route is the matched template (``/models/{name}``), never the raw path, so label values stay few;
    requests that match no route count as ``unmatched``. A request that fails with an exception counts as 500.
    """

    def __init__(self, app: ASGIApp, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

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
            path = getattr(scope.get("route"), "path", "unmatched")  # the router sets it on this same scope
            self.telemetry.requests.labels(scope["method"], path, str(status)).inc()
            self.telemetry.request_seconds.labels(path).observe(time.perf_counter() - t0)
