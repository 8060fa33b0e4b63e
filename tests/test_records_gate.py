"""Requests reach the records database through a gate: a few calls at once, each with a deadline, on threads of
their own, so a hung database costs the records routes and never the threads that uploads and scoring use."""

from __future__ import annotations

import threading
import time

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
        ran = []
        with anyio.fail_after(1):  # two calls stuck hold both slots: the next waits its deadline, never runs
            with pytest.raises(ApiError, match="did not answer within 0.3 s"):
                await gate.call(lambda: ran.append(1))
        assert ran == [] and gate._running == 2
        release.set()
        with anyio.fail_after(5):
            while gate._running:
                await anyio.sleep(0.01)
        assert await gate.call(lambda a, b: a + b, 2, 3) == 5  # the database answers again: so does the gate

        # a healthy database and a burst larger than the slots (a dashboard opening): they queue, none is refused
        def query(i: int) -> int:
            time.sleep(0.05)
            return i

        results: list[int] = []
        burst = RecordsGate(calls=2, deadline_s=5.0)

        async def one(i: int) -> None:
            results.append(await burst.call(query, i))

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
        assert sorted(results) == list(range(12))

        def full_pool() -> None:
            raise PoolTimeout("QueuePool limit of size 5 overflow 5 reached")

        with pytest.raises(ApiError, match="does not answer now"):
            await gate.call(full_pool)
        with pytest.raises(KeyError):  # not a database failure: the route answers it (404)
            await gate.call(lambda: {}["nope"])
        assert gate._running == 0

    anyio.run(main)


def test_a_deadline_met_as_a_slot_is_taken_gives_the_slot_back():
    """A request whose deadline came after it took a slot but before a thread began its call never ran it, and
    kept the slot for good: after CALLS (6) such requests every records route answered 503 until a
    restart. The slot is given back by whoever ends the call, the thread or the request that stopped waiting."""
    gate = RecordsGate(calls=1, deadline_s=0.0)  # the deadline is over as the slot is taken
    ran = []

    async def main() -> None:
        with pytest.raises(ApiError, match="did not answer"):
            await gate.call(lambda: ran.append("late"))
        await anyio.sleep(0.1)
        assert ran == [] and gate._running == 0
        gate.deadline_s = 5.0
        with anyio.fail_after(1):  # the slot is free: the next call runs at once
            assert await gate.call(lambda: 42) == 42
        assert gate._running == 0

    anyio.run(main)
