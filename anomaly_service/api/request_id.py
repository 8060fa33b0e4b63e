"""``X-Request-ID``: one id per request that the client's logs and the service's share.

A plant's MES logs its calls under its own ids; the service's access lines named none, so a complaint about one
call (a timeout, a 503) could only be matched by time. A client's ``X-Request-ID`` (printable ASCII, no space, at
most :data:`MAX_LENGTH` characters) is kept; without one the service makes one. Either way it is echoed in the
answer, every answer, the ones the connection gate and the stop give too, and written in the access line and, with
``--log-format json``, in every line logged for that request. A malformed one is refused (400
``invalid_request_id``) rather than replaced: a replaced id would break the correlation without a word.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from typing import Any

HEADER = "X-Request-ID"
MAX_LENGTH = 128
VALID = re.compile(rb"[!-~]{1,%d}" % MAX_LENGTH)  # printable ASCII without space: one token in a text log line
_NAME = HEADER.lower().encode()

# this request's id, for the log lines written in its task (the access line among them)
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class EchoRequestId:
    """ASGI app in front of the real one, per connection and outside every layer that answers on its own: takes
    the client's id or makes one, sets :data:`current`, and adds the header to the answer. A malformed id is
    replaced here (the answer must carry one) and marked in the scope for :class:`RefuseBadRequestId` to refuse,
    inside the connection gate like the service's other refusals."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        given = [v for k, v in scope.get("headers", ()) if k.lower() == _NAME]
        if len(given) == 1 and VALID.fullmatch(given[0]):
            rid = given[0].decode("ascii")
        else:
            rid = str(uuid.uuid4())
            if given:
                scope["malformed_request_id"] = f"{len(given)} {HEADER} headers" if len(given) > 1 else \
                    f"{HEADER} must be 1 to {MAX_LENGTH} printable ASCII characters without spaces"
        current.set(rid)
        header = (HEADER.encode(), rid.encode("ascii"))

        async def echoing_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*(h for h in message.get("headers", ()) if h[0].lower() != _NAME),
                                                  header]}
            await send(message)

        await self.app(scope, receive, echoing_send)
