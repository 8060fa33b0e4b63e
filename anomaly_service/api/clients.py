"""Noticing that a request's client went away, so its queued work can be dropped and its budget freed.

Nothing cancels a route when its client disconnects: the work would run to the end and its answer be thrown
away, holding its place in the queues and its memory budget all along. :class:`ClientWatch` listens for the
ASGI ``http.disconnect`` message once the request body has been read, and lets the service race each wait
(a decode slot, a place in a backlog pass) against it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client of this request disconnected before its answer was ready."""


class ClientWatch:
    """One request's client: :meth:`race` awaits something unless the client goes away first.

    Use it only after the request body has been read (FastAPI has read it by the time a route runs): it consumes
    the request's ``receive`` channel, where only ``http.disconnect`` is left to come. ``ClientWatch(None)`` never
    reports a departure (for callers with no HTTP request behind them).
    """

    def __init__(self, request: Request | None):
        self._request = request
        self._gone = asyncio.Event()
        self._listener: asyncio.Task | None = None

    async def __aenter__(self) -> ClientWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    def _listen(self) -> None:
        if self._listener is None and self._request is not None:
            self._listener = asyncio.create_task(self._wait_for_disconnect(), name="client-watch")

    async def _wait_for_disconnect(self) -> None:
        assert self._request is not None
        while True:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                self._gone.set()
                return

    async def gone(self) -> bool:
        """Whether the client has gone away (a check that does not wait)."""
        if self._request is None:
            return False
        self._listen()
        return self._gone.is_set() or await self._request.is_disconnected()

    async def race(self, awaitable: Awaitable[T]) -> T:
        """The awaitable's result, or :class:`ClientGone` (after cancelling it) if the client leaves first."""
        work: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
        if self._request is None:
            return await work
        self._listen()
        departure = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({work, departure}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            departure.cancel()
        if work.done():
            return work.result()
        work.cancel()
        raise ClientGone("the client closed the connection before the answer was ready")
