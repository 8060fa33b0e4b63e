"""How requests reach the records database: on threads of their own, a few at a time, each with a deadline.

A hung or slow database (a stopped server, a lock another session holds, a network that stalls) must cost the
records routes, never scoring. Run on the server's shared thread pool, every records call that waited on the
database held one of its threads, and that pool also spools large uploads: with the database hung, the records
pages of a few dashboards slowed the scoring of large photos (docs/decisions.md has the measurement). So a records
call runs on a thread outside that pool, at most :data:`CALLS` at once (fewer than the database pool's
connections, so the record writer always finds one; more wait for a slot), and a request stops waiting after
:data:`DEADLINE_S`, its wait for a slot included; a call still stuck on the database keeps its slot until it
returns, so stuck calls never pile up. Past the deadline, or on any database error, the answer is 503
``records_unavailable`` with ``Retry-After``.

The stored pictures (the file store under ``--data-dir``) get a gate of their own, the same way: a picture on a
share that stops answering held a thread of the shared pool for ever, and once a page's requests for it had taken
them all, scoring waited for a thread to read its upload's header (docs/decisions.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ..settings import RECORDS_TIMEOUT_S
from .errors import ApiError

CALLS = 6  # records calls from requests at once (the database pool has 10 connections)
DEADLINE_S = RECORDS_TIMEOUT_S  # how long a request waits for the records database, its wait for a slot included
# (--records-timeout)
POLL_S = 0.02  # how often a request waiting for a slot looks again


PICTURE_CALLS = 4  # reads and writes of stored pictures from requests at once


def _unavailable(what: str, why: str) -> ApiError:
    return ApiError(503, "records_unavailable", f"{what} {why}; scoring goes on, try again shortly",
                    {"Retry-After": "5"})


class RecordsGate:
    """Records calls from requests: bounded, each on its own thread, each with a deadline (module docstring)."""

    def __init__(self, calls: int = CALLS, deadline_s: float = DEADLINE_S, what: str = "the records database"):
        self.calls, self.deadline_s, self.what = calls, deadline_s, what
        self._lock = threading.Lock()
        self._running = 0  # calls on a thread now, abandoned ones included until they return

    def _enter(self) -> bool:
        with self._lock:
            if self._running >= self.calls:
                return False
            self._running += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        # Who gives the slot back: the thread once its call returns, or the request if it stopped waiting before
        # the thread began the call (a deadline met just then never runs it, and its slot was lost for good).
        handover = threading.Lock()
        state = {"slot": False, "call": "waiting"}  # call: waiting -> running (the thread's) or dropped

        def run() -> Any:
            with handover:
                if state["call"] == "dropped":
                    return None  # nobody waits for it, and its slot is back already
                state["call"] = "running"
            try:
                return fn(*args)
            finally:
                self._leave()

        try:
            with anyio.fail_after(self.deadline_s):  # waiting for a slot counts: a dashboard's burst queues
                while not self._enter():
                    await anyio.sleep(POLL_S)
                state["slot"] = True
                # a limiter of its own: never a thread of the pool that uploads and scoring use
                return await anyio.to_thread.run_sync(run, abandon_on_cancel=True,
                                                      limiter=anyio.CapacityLimiter(1))
        except TimeoutError:
            raise _unavailable(self.what, f"did not answer within {self.deadline_s:g} s") from None
        except SQLAlchemyError:  # unreachable, a full pool, a schema not made yet: the records feature waits
            raise _unavailable(self.what, "does not answer now") from None
        finally:
            with handover:
                if state["slot"] and state["call"] == "waiting":
                    state["call"] = "dropped"
                    self._leave()
