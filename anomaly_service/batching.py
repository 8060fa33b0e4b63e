"""Micro-batching: concurrent requests share one backbone pass, behind a bounded queue.

Requests put decoded images on a bounded asyncio queue and await a future. The gatherer takes the first waiting
image, gathers more for at most ``max_wait_ms`` (or until ``max_batch``; it waits only while other requests are
still decoding, so a lone request never waits), and runs the batch on an inference thread, off the event loop.
While a batch runs, new requests queue up and form the next batch, so under load the batch size grows by itself;
with one client the only cost is the short wait. When the queue is full the request is refused at once (HTTP 503
with Retry-After) instead of letting memory grow without bound. A request whose client went away withdraws its
image (:meth:`MicroBatcher.abandon`): it is dropped if no pass has taken it yet.

A batch's images run in passes of similar size, smallest first: a huge photo shares no pass with small ones
(they would not share a backbone tensor anyway), so their answers do not wait for it.

Up to ``workers`` batches run at once. A batch that starts alone gets every intra-op thread (lowest latency for
one client); one that starts beside another gets ``threads // workers``, because on a small CPU two half-width
passes score more images per second than one full-width pass (see parallelism.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .parallelism import intra_op_threads

if TYPE_CHECKING:
    from .model import ScoreResult
    from .registry import ModelEntry

log = logging.getLogger(__name__)

SIZE_RATIO = 4  # images within this factor of each other's pixel count may share a pass (a camera and its crops)


class Overloaded(Exception):
    """The inference queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the service is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One image waiting for (or in) a backbone pass. ``future`` gets the result; ``finished`` is set once the
    batcher holds the image no more (its pass ended, or it was dropped before one)."""

    entry: "ModelEntry"
    image: np.ndarray | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    pixels: int = 0  # of the image (kept when the image is released)
    taken: bool = False  # a pass has taken the image: it is in use until that pass ends
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        self.image = None
        self.finished.set()


class MicroBatcher:
    def __init__(self, max_batch: int = 8, max_wait_ms: float = 5.0, queue_size: int = 64,
                 on_batch: Callable[[int], None] | None = None, on_depth: Callable[[int], None] | None = None,
                 workers: int = 1, threads: int | None = None, on_running: Callable[[int], None] | None = None):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._on_running = on_running
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self.workers = max(1, workers)
        self.threads = threads or torch.get_num_threads()
        self.running = 0  # batches in inference right now
        self._batches: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._ema_batch_seconds = 0.1
        self.incoming = 0  # requests decoding right now: they will join soon, so a pass may wait for them
        self._stopped = False  # a stop began: no gatherer takes what is queued from then on

    @property
    def shared_threads(self) -> int:
        """Intra-op threads of a batch that runs beside another one."""
        return max(1, self.threads // self.workers)

    def announce(self) -> None:
        """A request started decoding an image it will submit."""
        self.incoming += 1

    def withdraw(self) -> None:
        """That request submitted its image, or failed before it could."""
        self.incoming -= 1

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._batches:  # batches already running finish and answer their requests
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                _turn_away(self._queue.get_nowait())
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def full(self) -> bool:
        """The queue is full: an image submitted now would be refused."""
        return self._queue is not None and self._queue.full()

    def enqueue(self, entry: "ModelEntry", image: np.ndarray) -> Job:
        """Queue one decoded image; its result arrives in ``job.future``. Overloaded if the queue is full."""
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        if self._stopped:  # a request that finished decoding as the service stops: nobody would answer it
            raise Overloaded(1)
        job = Job(entry, image, asyncio.get_running_loop().create_future(), pixels=image.shape[0] * image.shape[1])
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(self.retry_after()) from None
        if self._on_depth:
            self._on_depth(self._queue.qsize())
        return job

    async def abandon(self, job: Job) -> None:
        """Its client went away: drop the job if no pass has taken it (its image is released at once), else wait
        for that pass to end (the image is in use until then)."""
        job.future.cancel()
        if not job.taken:
            job.settle()  # the queue keeps only the empty job until the gatherer discards it
        await job.finished.wait()

    def retry_after(self) -> int:
        """Whole seconds a refused client should wait: about the time to drain a full queue, at least 1."""
        batches_waiting = self.queue_size / max(1, self.max_batch)
        return max(1, int(round(batches_waiting * self._ema_batch_seconds)))

    async def _gather(self) -> list[Job]:
        assert self._queue is not None
        jobs = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        try:
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0 or self.incoming <= 0:  # nobody is about to join: do not make a lone request wait
                    break
                # not asyncio.wait_for: on Python 3.11 it swallows a cancellation that comes as the queue hands it
                # a request, and a stop then waited for ever for a gatherer that went on waiting
                getter = asyncio.ensure_future(self._queue.get())
                try:
                    await asyncio.wait({getter}, timeout=remaining)
                finally:  # a stop included: a request the queue handed over is the gatherer's to answer
                    taken = getter.done() and not getter.cancelled()
                    if taken:
                        jobs.append(getter.result())
                    else:
                        getter.cancel()  # a request it was about to take stays in the queue
                if not taken:
                    break
        except BaseException:  # stopped while it waited for more: the images taken are out of the queue that
            for job in jobs:  # stop() answers, and their requests would wait for ever
                _turn_away(job)
            raise
        if self._on_depth:
            self._on_depth(self._queue.qsize())
        return self._take(jobs)

    @staticmethod
    def _take(jobs: list[Job]) -> list[Job]:
        """The jobs still wanted, marked as taken; the others are settled (a client that went away needs no work)."""
        kept = []
        for job in jobs:
            if job.future.done():
                job.settle()
            else:
                job.taken = True
                kept.append(job)
        return kept

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.workers)
        while True:
            await slots.acquire()  # with every worker busy, requests keep queueing and form a bigger next batch
            try:
                jobs = await self._gather()
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._run_batch(jobs), name="inference-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            task.add_done_callback(lambda _: slots.release())
            # the loop waits here for the next batch, perhaps for hours: holding this one's jobs would keep the
            # model they name (replaced by an update, or removed) in memory until then
            del jobs, task

    async def _run_batch(self, jobs: list[Job]) -> None:
        groups: dict[int, list[Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.entry), []).append(job)
        passes = sorted((sized for same_model in groups.values() for sized in _by_size(same_model)),
                        key=lambda group: group[0].pixels)  # the smallest images first, whatever their model
        for group in passes:
            try:
                wanted = [j for j in group if not j.future.done()]  # a client may leave while an earlier group runs
                if wanted:
                    await self._run_group(wanted)
            finally:
                for job in group:
                    job.settle()

    async def _run_group(self, group: list[Job]) -> None:
        # alone: all threads, for latency; beside another batch: a share, for throughput
        threads = self.threads if self.running == 0 else self.shared_threads
        self.running += 1
        if self._on_running:
            self._on_running(self.running)
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, _infer, group, threads,
                                                                       self.threads)
        except Exception as exc:  # delivered to each waiting request, which turns it into a response
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.running -= 1
            if self._on_running:
                self._on_running(self.running)
        elapsed = time.perf_counter() - t0
        self._ema_batch_seconds = 0.8 * self._ema_batch_seconds + 0.2 * elapsed / self.workers
        if self._on_batch:
            self._on_batch(len(group))
        for job, res in zip(group, results):
            res.timing_ms["queue"] = (t0 - job.enqueued) * 1000.0
            if not job.future.done():
                job.future.set_result(res)


def _turn_away(job: Job) -> None:
    """Answer a job no pass will take (the batcher stops) as a full queue is answered, and let its image go."""
    if not job.future.done():
        job.future.set_exception(Overloaded(1))
    job.settle()


def _by_size(jobs: list[Job]) -> list[list[Job]]:
    """``jobs`` in passes of similar image size (within SIZE_RATIO in pixels), smallest first."""
    passes: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: j.pixels):
        if passes and job.pixels <= SIZE_RATIO * passes[-1][0].pixels:
            passes[-1].append(job)
        else:
            passes.append([job])
    return passes


def _infer(group: list[Job], threads: int, restore: int) -> list["ScoreResult"]:
    model = group[0].entry.model
    with intra_op_threads(threads, restore=restore):
        return list(model.score_many([j.image for j in group]))
