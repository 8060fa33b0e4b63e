"""How ``anomaly serve`` runs the app under uvicorn: connection limits and timeouts uvicorn lacks or answers badly.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but has no deadline for the request
head: a connection that sends nothing, or half a request line, is held forever (and a few hundred of them are a
denial of service). :class:`GuardedH11Protocol` is uvicorn's h11 protocol with

* a **head deadline**: from the moment a connection opens, and again from the first byte of each later request, a
  client has ``timeout_header`` seconds to send a complete request head, or the connection is closed (between an
  answer and that byte the connection is idle: the keep-alive timeout closes it, so that a balancer told to close
  idle connections before the service does is not beaten to it);
* a **concurrency limit** answered in the service's error shape: while ``limit_concurrency`` requests the gate let
  in still run (a client that hangs up leaves its request running, so they count until they end), the next gets
  503 ``overloaded`` with ``Retry-After`` (JSON, like every other error), where uvicorn's own limit answers plain
  text. Open connections are not counted: uvicorn's rule (refuse while more than the limit are open) refused a
  burst a little above it whole, and any client, with no API key, could hold the limit's worth of idle
  connections (reopened inside the head deadline) and keep every part from being scored (an adversarial pass).
  Idle connections cost a socket, and the head and keep-alive deadlines close them. The refused request's body is
  read and dropped first (bounded), so that the client sees the answer and not a reset connection; the probes and
  ``/metrics`` are never refused.

With an API key set, requests without it are counted in a pool of their own (as large), so a client without
the key never takes the line's places; and a **write deadline** (``timeout_body``) cuts off a client that leaves
its answer unread, which would otherwise hold its place while the socket's buffers stay full. A body that stalls
is the app's business: the BodyLimit middleware answers 408 after ``timeout_body``.

A **stop** (SIGTERM) lets the requests in progress run for :data:`STOP_GRACE_SECONDS`; uvicorn then cancels those
still running, and answered them with a plain-text 500 and a traceback in the log. :class:`_StopAnswer` answers
them 503 ``shutting_down`` in the error shape instead, with one line in the log. With ``stop_delay``,
:class:`DelayedStopServer` serves on for that long after the SIGTERM before it stops (readiness 503, each answer
closing its connection): a load balancer takes a replica out some time after its signal, and a connection it opened
before the signal, whose request came after it, was closed unanswered (a proxy answers that 502).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote_plus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..log_throttle import Throttle
from .logs import AccessRecord, JsonLines, NameTheRecord
from .request_id import EchoRequestId
from .schemas import ErrorOut

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..settings import ServiceSettings

log = logging.getLogger(__name__)


REFUSALS_LOG_EVERY_S = 60.0  # refusals by the concurrency limit are logged at most this often


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a JSON concurrency limit (see the module docstring).

    The settings are class attributes: uvicorn builds one protocol object per connection from the class it is
    given, so :func:`guarded_protocol` makes a subclass that carries them.
    """

    head_timeout: float = 0.0  # seconds; 0: no deadline
    write_timeout: float = 0.0  # seconds an answer may wait for a client that does not read it; 0: no deadline
    max_concurrency: int = 0  # requests in progress at once, per pool (with the key, without it); 0: no limit
    api_key: bytes | None = None  # the server's key: requests without it are counted in a pool of their own
    on_refused: Callable[[], None] | None = None  # counts a request refused by the concurrency limit

    running: list[int] = [0]  # requests the gate let in that have not finished, server-wide (guarded_protocol)
    refusals = Throttle(REFUSALS_LOG_EVERY_S)  # requests the concurrency limit refused, for its log line
    running_keyless: list[int] = [0]  # the same, of requests without the API key (when the server has one)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = False  # an answer was sent and the next request has sent no byte yet
        self._write_timer: asyncio.TimerHandle | None = None
        self.limit_concurrency = None  # uvicorn's own check answers plain text: ours replaces it
        if self.max_concurrency:
            self.app = _ConcurrencyGate(self.app, self)
        self.app = _StopAnswer(self.app)  # the gate's count is released before the stop's answer
        self.app = NameTheRecord(self.app)  # the access line names the record of whatever answer is sent
        self.app = EchoRequestId(self.app)  # outermost: every answer carries its X-Request-ID, the access line too
        self._tell_unreadable_requests()

    def _tell_unreadable_requests(self) -> None:
        """Say in the log why a request could not be read as HTTP. uvicorn logs "Invalid HTTP request received."
        and answers 400 whatever h11 refused: a request head past h11's limit (a proxy or a single sign-on that
        adds large cookies), a malformed line, a header no parser takes. The engineer saw nothing that told them
        apart, and the client, still sending when the connection closed, often saw only a reset."""
        conn, read = self.conn, self.conn.next_event

        def next_event() -> Any:
            try:
                return read()
            except h11.RemoteProtocolError as exc:
                client = ":".join(str(part) for part in self.client) if self.client else "a client"
                if exc.error_status_hint == 431:  # h11's own: more buffered than a head may be, and no end yet
                    most = getattr(conn, "_max_incomplete_event_size", None)  # h11's, not a documented attribute
                    log.warning("a request from %s was refused: its head (request line and headers) is longer than "
                                "this server reads%s (a proxy or a single sign-on adding large cookies or headers?); "
                                "answered 400 and closed", client, f", {most // 1024} KB" if most else "")
                else:
                    log.warning("a request from %s could not be read as HTTP (%s); answered 400 and closed", client,
                                exc)
                raise

        conn.next_event = next_event  # type: ignore[method-assign]

    # A head deadline starts when the connection opens, and after an answer with the next request's first byte; it
    # ends with a complete head. Between an answer and that byte the connection is idle, and uvicorn's keep-alive
    # timeout alone closes it: a deadline counted from the answer closed idle connections before a balancer that
    # was set to close them first did, as it sent a request on one.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._awaiting_head = False
            self._start_head_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.conn.our_state is h11.SEND_RESPONSE:
            self._stop_head_timer()  # a request head arrived and awaits its answer (its body has its own timeout)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            if self.conn.trailing_data[0]:
                self._start_head_timer()  # a pipelined request has begun: its head ends the deadline
            else:
                self._awaiting_head = True
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    # A write deadline: an answer that the client stops reading holds its request (and its place in the gate)
    # while the socket's buffers are full; a client that reads nothing for ``write_timeout`` seconds is cut off.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timeout > 0 and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.debug("closing a connection whose client read none of its answer in %g s", self.write_timeout)
        self.transport.abort()  # close() would wait to flush what the client does not read

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        if self.head_timeout > 0:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        log.debug("closing a connection that sent no complete request head in %g s", self.head_timeout)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


STOP_GRACE_SECONDS = 10  # a stop waits this long for the requests in progress (deploy/kubernetes budgets it)


class _StopAnswer:
    """ASGI app in front of the real one, per connection: a request that a stop cut off (uvicorn cancels the
    requests still running when :data:`STOP_GRACE_SECONDS` have passed) gets 503 ``shutting_down`` with
    ``Retry-After``, so that the client (a line PLC's script, another replica behind a load balancer) sees a stop
    to retry, not uvicorn's plain-text 500 of a fault, and the log says it in one line, not a traceback."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def watched_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if scope.get("type") != "http":
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the cancel is handled here: the answer below must still be sent
            log.warning("the stop cut off %s %s after %d s, %s", scope.get("method"), scope.get("path"),
                        STOP_GRACE_SECONDS, "answered 503 shutting_down" if not started else "its answer unfinished")
            if started:
                return  # half an answer is sent: uvicorn closes the connection
            body = ErrorOut(error="shutting_down", detail=(
                f"the service stopped before this request finished (a stop waits {STOP_GRACE_SECONDS} s for the "
                "requests in progress): a photo was not scored or recorded; send it again, to another replica or "
                "once the service is back. A model update or rollback may have been saved all the same: "
                "GET /models/{name}/versions says")).model_dump_json().encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


# Probes and the scraper pass the gate: a pod that is busy is alive, and its metrics matter most when it is
# overloaded. Killing it on a failed liveness probe would drop its buffered records and push its load on the others.
UNGATED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DRAIN_BYTES = 64 * 2**20  # a refused request's body read (and dropped) before the answer, at most ...
DRAIN_SECONDS = 5.0  # ... and for at most this long


def carries_key(scope: Any, expected: bytes) -> bool:
    """Whether an ASGI request's ``X-API-Key`` header is ``expected`` (compared in constant time): the routes' rule
    (deps.require_api_key), for the layers below them."""
    given = next((v for k, v in scope.get("headers", ()) if k == b"x-api-key"), b"")
    return bool(given) and secrets.compare_digest(given, expected)


class _ConcurrencyGate:
    """ASGI app in front of the real one, per connection: 503 while ``max_concurrency`` requests it let in still
    run. :data:`UNGATED_PATHS` always pass. When the server has an API key, requests without it (the docs, the
    page, picture links, and requests about to get their 401) are counted in a pool of their own: whatever a
    client without the key does, the line's requests keep theirs (an adversarial pass filled a single pool with
    keyless requests whose answers it never read)."""

    def __init__(self, app: Any, protocol: GuardedH11Protocol):
        self.app, self.protocol = app, protocol

    def _pool(self, scope: Any) -> list[int]:
        p = self.protocol
        if p.api_key is None:
            return p.running
        return p.running if carries_key(scope, p.api_key) else p.running_keyless

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        p = self.protocol
        gated = scope["type"] == "http" and scope.get("path") not in UNGATED_PATHS
        pool = self._pool(scope) if gated else p.running
        if gated and pool[0] >= p.max_concurrency:
            _log_refusal(p)
            if p.on_refused is not None:
                p.on_refused()
            await drain(receive)
            body = ErrorOut(error="overloaded", detail=f"the service has {p.max_concurrency} requests in "
                            "progress; retry in 1 s").model_dump_json().encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        if gated:
            pool[0] += 1  # the event loop's thread only: no lock
        try:
            await self.app(scope, receive, send)
        finally:
            if gated:
                pool[0] -= 1


def _log_refusal(p: GuardedH11Protocol) -> None:
    """One line a minute for the requests the concurrency limit refused: under overload a line per refusal (each
    also has its access line) flooded the log when it mattered most."""
    said = p.refusals.event()
    if said is None:
        return
    more = said - 1
    log.warning("refused a request with 503 overloaded: %d requests are in progress (--limit-concurrency)%s",
                p.max_concurrency, f"; {more} more refused since the last such line" if more else
                "; the next refusals are logged once a minute (anomaly_overloaded_by_reason_total counts each)")
    _say_held_refusals_later(p)


def _say_held_refusals_later(p: GuardedH11Protocol) -> None:
    """The refusals held back after a line are said once its minute is over, though no refusal follows to say
    them: without it, the refusals of an overload's last minute were never said (the line before it promised
    them), and a burst in the log looked like one refusal."""
    asyncio.get_running_loop().call_later(p.refusals.every_s, _log_refusals_since, p)


def _log_refusals_since(p: GuardedH11Protocol) -> None:
    held = p.refusals.release(wait=False)
    if held:
        log.warning("refused %d more request(s) with 503 overloaded in the last minute (--limit-concurrency %d)",
                    held, p.max_concurrency)
        _say_held_refusals_later(p)


async def drain(receive: Any, max_bytes: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS) -> None:
    """Read and drop a refused request's body (bounded) before answering it. Closing a connection whose upload is
    still arriving makes the kernel reset it, and the client then sees a broken connection instead of the 503 and
    its ``Retry-After``.

    The deadline is checked between reads, not only enforced by cancelling them: Python 3.11's ``wait_for`` drops
    a cancellation that meets a read completing at that moment, and a body trickled a byte a millisecond then kept
    the drain (and the request's place) for as long as the client went on."""
    deadline = asyncio.get_running_loop().time() + seconds
    seen = 0
    while seen <= max_bytes:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return  # the client went away
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def guarded_protocol(settings: ServiceSettings, on_refused: Callable[[], None] | None = None) -> type:
    """The protocol class for ``uvicorn.run(http=...)``, carrying the settings' head timeout and concurrency limit."""
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "head_timeout": settings.timeout_header, "max_concurrency": settings.limit_concurrency,
        "write_timeout": settings.timeout_body, "api_key": key,
        "running": [0], "running_keyless": [0],  # this server's own counts
        "refusals": Throttle(REFUSALS_LOG_EVERY_S),
        "on_refused": staticmethod(on_refused) if on_refused is not None else None})


class RedactTokens(logging.Filter):
    """Hides the view token in the access log's request lines: a picture URL's token opens that inspection's
    pictures with no API key, and logs are read and shipped more widely than the records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            args = list(record.args)
            args[2] = self.redact(args[2])  # uvicorn's access line: (client, method, path, ...)
            record.args = tuple(args)
        return True

    @staticmethod
    def redact(path: str) -> str:
        """Every query parameter whose decoded name is ``token`` (``%74oken`` is one too), its value hidden."""
        head, sep, query = path.partition("?")
        if not sep:
            return path
        parts = [f"{p.partition('=')[0]}=REDACTED" if unquote_plus(p.partition("=")[0]).strip() == "token" else p
                 for p in query.split("&")]
        return head + sep + "&".join(parts)


def log_config(log_format: str = "text") -> dict[str, Any]:
    """uvicorn's logging set-up, with the view tokens redacted from the access log and the answer's record named
    in it; ``json``: every line a JSON object (logs.JsonLines)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {}).update({"tokens": {"()": RedactTokens}, "record": {"()": AccessRecord}})
    config["handlers"]["access"]["filters"] = ["tokens", "record"]
    config["formatters"]["access"]["fmt"] += "%(inspection)s"
    if log_format == "json":
        config["formatters"] = {name: {"()": JsonLines} for name in config["formatters"]}
    return config


def uvicorn_options(settings: ServiceSettings, app: FastAPI | None = None) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for ``settings`` (what ``anomaly serve`` passes)."""
    on_refused = None
    if app is not None:
        telemetry = app.state.service.telemetry

        def on_refused() -> None:
            telemetry.overloaded.inc()
            telemetry.overloaded_by_reason.labels("connections").inc()

    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "timeout_graceful_shutdown": STOP_GRACE_SECONDS, "timeout_keep_alive": settings.timeout_keep_alive,
            "log_config": log_config(settings.log_format),
            "http": guarded_protocol(settings, on_refused)}


class DelayedStopServer(uvicorn.Server):
    """uvicorn's server with a pause between a SIGTERM and the stop (``--stop-delay``). Under Kubernetes the pod
    gets its SIGTERM while the endpoints, the ingress and the cloud load balancer still send it work, for a few
    seconds; uvicorn stops accepting at once and closes a connection that was opened before the signal and sent
    its request after it without an answer (uvicorn#2757), which the proxy answers 502 and does not retry for a
    POST. Through the pause it serves as before, but ``announce()`` has made /readyz answer 503 and every answer
    close its connection, so the proxies' pooled connections end with an answer, not mid-request. A second SIGTERM,
    or SIGINT, stops at once."""

    def __init__(self, config: uvicorn.Config, delay: float, announce: Callable[[], None]):
        super().__init__(config)
        self.delay = delay
        self.announce = announce
        self._stop_at: float | None = None  # monotonic time of the delayed stop, once a SIGTERM came
        self._told = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.delay > 0 and self._stop_at is None and not self.should_exit:
            self._stop_at = time.monotonic() + self.delay
            self.announce()  # a flag set in the signal handler; the log line waits for the loop (on_tick)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and not self.should_exit:
            if not self._told:
                self._told = True
                log.info("SIGTERM: serving on for %g s (--stop-delay) while the load balancers take this replica "
                         "out; /readyz answers 503 and each answer closes its connection", self.delay)
            if time.monotonic() >= self._stop_at:
                super().handle_exit(signal.SIGTERM, None)  # uvicorn's own stop, as if the signal came now
        return await super().on_tick(counter)


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run ``app`` until it is stopped, as ``uvicorn.run`` does for one process (its start-up failure exits 3, a
    Ctrl-C after its graceful stop exits 0), with the stop delayed by ``settings.stop_delay``."""
    service = app.state.service

    def announce() -> None:
        service.stop_announced = True

    server = DelayedStopServer(uvicorn.Config(app, **uvicorn_options(settings, app)), settings.stop_delay, announce)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises a Ctrl-C after its graceful stop: the stop is done, as uvicorn.run
        pass
    if not server.started:
        sys.exit(3)  # uvicorn.run's STARTUP_FAILURE: the port was taken, or the app's start-up failed
