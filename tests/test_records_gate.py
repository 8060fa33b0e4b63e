"""Requests reach the records database through a gate: a few calls at once, each with a deadline, on threads of
their own, so a hung database costs the records routes and never the threads that uploads and scoring use."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout

from anomaly_service.api.errors import ApiError
from anomaly_service.api.records_gate import RecordsGate


def test_a_hung_database_gets_503s_in_bounded_time_and_never_the_shared_threads():
    gate = RecordsGate(calls=2, deadline_s=0.3)
    release = threading.Event()

    def hung() -> str:  # a query on a database that does not answer until released
        release.wait(10)
        return "late"

    async def main() -> None:
        shared = anyio.to_thread.current_default_thread_limiter()
        for _ in range(2):  # each request stops waiting at the deadline; its call stays stuck
            with pytest.raises(ApiError, match="did not answer within 0.3 s") as err:
                await gate.call(hung)
            assert err.value.status == 503 and err.value.code == "records_unavailable"
            assert err.value.headers["Retry-After"] == "5"
        assert shared.borrowed_tokens == 0  # the stuck calls hold none of the shared pool's threads
        with anyio.fail_after(0.1):  # two calls stuck: the next is refused at once, not queued behind them
            with pytest.raises(ApiError, match="2 requests already wait"):
                await gate.call(lambda: "never run")
        release.set()
        with anyio.fail_after(5):
            while gate._running:
                await anyio.sleep(0.01)
        assert await gate.call(lambda a, b: a + b, 2, 3) == 5  # the database answers again: so does the gate

        def full_pool() -> None:
            raise PoolTimeout("QueuePool limit of size 5 overflow 5 reached")

        with pytest.raises(ApiError, match="does not answer now"):
            await gate.call(full_pool)
        with pytest.raises(KeyError):  # not a database failure: the route answers it (404)
            await gate.call(lambda: {}["nope"])
        assert gate._running == 0

    anyio.run(main)
