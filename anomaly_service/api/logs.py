"""What the service's log lines carry beyond uvicorn's: the record an access line's answer made, and JSON lines.

An access line said ``"POST /score HTTP/1.1" 200`` and nothing tied it to the inspection the answer recorded, so
the line a client complains about could not be followed to its record. :class:`NameTheRecord` keeps the answer's
``X-Inspection-Id`` for the access line, which uvicorn writes as the answer starts, in the same task.

``--log-format json`` writes every line (uvicorn's and the service's) as one JSON object, a traceback inside it:
a plant's log aggregator parses them without a pattern per line shape, and a traceback's lines stay one event.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone
from typing import Any

from .schemas import INSPECTION_HEADER

_INSPECTION = INSPECTION_HEADER.lower().encode()
# the record named by the answer being sent in this request's task (None: the answer names none)
answer_record: contextvars.ContextVar[str | None] = contextvars.ContextVar("answer_record", default=None)


class NameTheRecord:
    """ASGI app in front of the real one, per connection: notes the answer's ``X-Inspection-Id`` before uvicorn
    writes the access line (which it does when the answer starts, in this task)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        answer_record.set(None)

        async def noting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                record = next((v for k, v in message.get("headers", ()) if k.lower() == _INSPECTION), None)
                answer_record.set(record.decode("latin-1") if record else None)
            await send(message)

        await self.app(scope, receive, noting_send)


class AccessRecord(logging.Filter):
    """Adds ``inspection`` to uvicorn's access lines: `` inspection=<id>`` for the text format's line, the id
    alone as the JSON line's ``inspection_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = answer_record.get()
        record.inspection = f" inspection={found}" if found else ""
        record.inspection_id = found
        return True


ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")  # uvicorn's access line's arguments


class JsonLines(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``; an access line's
    ``client``, ``method``, ``path``, ``status`` and ``inspection_id``; ``exception``: the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            line.update(zip(ACCESS_FIELDS, record.args))
            line["inspection_id"] = getattr(record, "inspection_id", None)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)  # ASCII: a file name in another code page cannot break the line


def use_json_lines() -> None:
    """Write the lines of the loggers that reach the root's handlers (the service's own) as JSON lines."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLines())
