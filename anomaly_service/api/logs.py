"""What the service's log lines carry beyond uvicorn's: the record an access line's answer made, and JSON lines.

An access line said ``"POST /score HTTP/1.1" 200`` and nothing tied it to the inspection the answer recorded, so
the line a client complains about could not be followed to its record. :class:`NameTheRecord` keeps the answer's
``X-Inspection-Id`` for the access line, which uvicorn writes as the answer starts, in the same task, and an
error answer's code (``error=not_image``), which the status alone did not say.

``--log-format json`` writes every line (uvicorn's and the service's) as one JSON object, a traceback inside it:
a plant's log aggregator parses them without a pattern per line shape, and a traceback's lines stay one event.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone
from typing import Any

from . import request_id
from .schemas import INSPECTION_HEADER

_INSPECTION = INSPECTION_HEADER.lower().encode()
# the record named by the answer being sent in this request's task (None: the answer names none)
answer_record: contextvars.ContextVar[str | None] = contextvars.ContextVar("answer_record", default=None)
# the error code of that answer, when it is one in the service's error shape (``{"error": ..., "detail": ...}``)
answer_error: contextvars.ContextVar[str | None] = contextvars.ContextVar("answer_error", default=None)
ERROR_BODY_MAX = 64 * 1024  # an error answer's body read for its code; a larger one is not the error shape


class NameTheRecord:
    """ASGI app in front of the real one, per connection: notes the answer's ``X-Inspection-Id``, and an error
    answer's code, before uvicorn writes the access line (which it does when the answer starts, in this task).

    An error answer's start is held until its body (one message, as every error answer is sent) so that the line
    says why: ``400`` alone did not tell a corrupt photo from a bad parameter."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        answer_record.set(None)
        answer_error.set(None)
        held: list[Any] = []

        async def noting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                record = next((v for k, v in headers if k.lower() == _INSPECTION), None)
                answer_record.set(record.decode("latin-1") if record else None)
                if message["status"] >= 400 and any(k.lower() == b"content-type" and v.startswith(b"application/json")
                                                    for k, v in headers):
                    held.append(message)  # sent with its body, once the code is known
                    return
            elif held and message["type"] == "http.response.body":
                answer_error.set(_error_code(message.get("body", b"")))
                await send(held.pop())
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            if held:  # an error answer whose body never came: its start is still owed
                await send(held.pop())


def _error_code(body: bytes) -> str | None:
    """The ``error`` of an answer in the service's error shape; None for any other body."""
    if len(body) > ERROR_BODY_MAX:
        return None
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) and code.isidentifier() else None


class AccessRecord(logging.Filter):
    """Adds to uvicorn's access lines the request's ``X-Request-ID``, the record the answer made and an error
    answer's code: ``inspection`` (`` request_id=<id> inspection=<id> error=<code>``) for the text format's line,
    ``request_id``, ``inspection_id`` and ``error_code`` for the JSON line's fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid, found, code = request_id.current.get(), answer_record.get(), answer_error.get()
        record.inspection = ((f" request_id={rid}" if rid else "") + (f" inspection={found}" if found else "") +
                             (f" error={code}" if code else ""))
        record.request_id, record.inspection_id, record.error_code = rid, found, code
        return True


ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")  # uvicorn's access line's arguments


class JsonLines(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``; an access line's
    ``client``, ``method``, ``path``, ``status``, ``inspection_id`` and ``error``; ``request_id`` on a line written
    while a request is handled (the access line among them); ``exception``: the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name}
        try:
            line["message"] = record.getMessage()
        except Exception as exc:  # noqa: BLE001 - any error of the call's own arguments
            line.update(_unformattable(record, exc))
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            line.update(zip(ACCESS_FIELDS, record.args))
            line["inspection_id"] = getattr(record, "inspection_id", None)
            line["error"] = getattr(record, "error_code", None)
        rid = getattr(record, "request_id", None) or request_id.current.get()
        if rid:
            line["request_id"] = rid
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps({k: _unicode(v) if isinstance(v, str) else v for k, v in line.items()}, default=str)


ARGUMENTS_SHOWN = 500  # characters of an unformattable call's arguments kept in its line


def _unformattable(record: logging.LogRecord, exc: Exception) -> dict[str, Any]:
    """The fields of a line whose message cannot be made from its arguments (``%d`` given a text, one argument too
    few): logging's ``handleError`` wrote a traceback over many lines to stderr instead, which broke the one JSON
    object per line an aggregator parses. An error, as the call is one, naming what it was logged as and where."""
    return {"level": "error", "message": _text(record.msg), "arguments": _text(record.args)[:ARGUMENTS_SHOWN],
            "logging_error": f"{type(exc).__name__}: {_text(exc)}", "logged_level": record.levelname.lower(),
            "source": f"{record.pathname}:{record.lineno}"}


def _text(value: Any) -> str:
    """``str`` (a template) or ``repr`` (arguments) of a value whose own conversion may fail as well."""
    try:
        return value if isinstance(value, str) else str(value) if isinstance(value, BaseException) else repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ of an argument
        return f"<{type(value).__name__} that cannot be shown>"


def _unicode(text: str) -> str:
    """``text`` as valid Unicode. A file name in another code page reaches Python with each byte it cannot decode
    as a lone surrogate (``\\udce9``), which JSON can only write as such an escape: strict parsers (serde's, a Rust
    aggregator's) refuse the line, lenient ones make it U+FFFD. The byte is written as ``\\xe9`` instead."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is no undecoded byte
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def use_json_lines() -> None:
    """Write the lines of the loggers that reach the root's handlers (the service's own) as JSON lines, Python's
    warnings among them: a library's warning went to stderr as two lines of its own, which an aggregator reading
    JSON lines could not parse."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLines())
    logging.captureWarnings(True)
