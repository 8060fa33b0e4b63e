"""Micro-batching and back-pressure, with concurrent requests against the app (httpx.AsyncClient, ASGI)."""

import asyncio

import httpx
import numpy as np
import pytest

from anomaly_service.api import create_app
from anomaly_service.settings import ServiceSettings
from conftest import add_defect, png_bytes, textured_part


async def _burst(model_dir, n: int, **settings):
    app = create_app(ServiceSettings(model_dir=model_dir, reload_interval=0, **settings))
    rng = np.random.default_rng(5)
    images = [png_bytes(add_defect(textured_part(rng), 40 + i, 60)[0] if i % 2 else textured_part(rng))
              for i in range(n)]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/score", files={"file": ("x.png", d, "image/png")})
                                        for d in images))
            singles = []
            if settings.get("batch_max_size", 8) > 1:
                for d in images:  # one at a time: each runs in a batch of one
                    singles.append(await c.post("/score", files={"file": ("x.png", d, "image/png")}))
            metrics = (await c.get("/metrics")).text
    return rs, singles, metrics


def _batch_count(metrics: str) -> tuple[float, float]:
    vals = {}
    for line in metrics.splitlines():
        if line.startswith("anomaly_batch_size_count") or line.startswith("anomaly_batch_size_sum"):
            name, v = line.split()
            vals[name] = float(v)
    return vals["anomaly_batch_size_count"], vals["anomaly_batch_size_sum"]


def test_concurrent_requests_share_backbone_passes_and_match_single_scores(model_dir):
    rs, singles, metrics = asyncio.run(_burst(model_dir, 8, batch_max_size=8, batch_wait_ms=50))
    assert all(r.status_code == 200 for r in rs)
    count, total = _batch_count(metrics)
    assert "anomaly_inference_batches_running 0.0" in metrics  # every batch finished
    first_burst_passes = count - len(singles)
    assert first_burst_passes < 8  # 8 concurrent images took fewer than 8 backbone passes
    for r, s in zip(rs, singles):  # batching does not change the answer, to the bit (tests/test_same_answer.py)
        assert (r.json()["score"], r.json()["normalized_score"], r.json()["is_anomaly"]) == \
            (s.json()["score"], s.json()["normalized_score"], s.json()["is_anomaly"])


def test_full_queue_answers_503_with_retry_after(model_dir):
    rs, _, metrics = asyncio.run(_burst(model_dir, 12, batch_max_size=1, queue_size=1, batch_wait_ms=0))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    refused = [r for r in rs if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "overloaded" for r in refused)
    assert f"anomaly_overloaded_total {float(len(refused))}" in metrics


def test_batching_disabled_runs_one_image_per_pass(model_dir):
    rs, _, metrics = asyncio.run(_burst(model_dir, 4, batch_max_size=1))
    assert all(r.status_code == 200 for r in rs)
    count, total = _batch_count(metrics)
    assert count == total == 4


class _RecordingModel:
    """Stands in for AnomalyModel in the scheduler test: records the thread budget each pass ran with."""

    def __init__(self):
        import threading

        self.budgets: list[int] = []
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def score_many(self, images):
        from anomaly_service.model import ScoreResult
        from anomaly_service.parallelism import thread_budget

        self.budgets.append(thread_budget())
        self.started.release()
        assert self.release.wait(10)
        return [ScoreResult(score=0.0, normalized_score=0.0, is_anomaly=False, threshold=1.0,
                            anomaly_map=np.zeros((2, 2), np.float32), image_width=2, image_height=2)
                for _ in images]


@pytest.mark.usefixtures("process_threads")
def test_concurrent_batches_split_the_cores_and_a_lone_batch_gets_them_all():
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    import torch

    total = torch.get_num_threads()

    async def run():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, workers=2, threads=total)
        await batcher.start()
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8)).future
        await asyncio.to_thread(model.started.acquire)  # the first pass is running, alone
        second = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8)).future
        await asyncio.to_thread(model.started.acquire)  # the second runs beside it
        assert batcher.running == 2
        model.release.set()
        await asyncio.gather(first, second)
        await batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8)).future  # alone again
        await batcher.stop()
        return model.budgets

    assert asyncio.run(run()) == [total, max(1, total // 2), total]
    assert torch.get_num_threads() == total


def test_abandoned_jobs_are_dropped_before_their_pass_and_awaited_during_it():
    """A client that went away withdraws its image: dropped at once if no pass has it (and never scored), else
    ``abandon`` returns only when the pass that holds it ends (its memory is in use until then)."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, workers=1)  # every thread: the process count stays
        await batcher.start()
        image = np.zeros((2, 2, 3), np.uint8)
        running = batcher.enqueue(entry, image)
        await asyncio.to_thread(model.started.acquire)  # its pass is running, and holds the only worker
        queued, kept = batcher.enqueue(entry, image), batcher.enqueue(entry, image)
        await asyncio.wait_for(batcher.abandon(queued), 1)  # not in a pass: dropped at once
        assert queued.image is None and queued.finished.is_set()
        leaving = asyncio.create_task(batcher.abandon(running))
        await asyncio.sleep(0.1)
        assert not leaving.done()  # its pass still holds the image
        model.release.set()
        await asyncio.wait_for(leaving, 10)
        assert running.future.cancelled() and running.finished.is_set()
        assert (await kept.future).score == 0.0
        await batcher.stop()
        return len(model.budgets)

    assert asyncio.run(run()) == 2  # the dropped job never reached the model


def test_a_big_image_shares_no_pass_with_small_ones_and_they_do_not_wait_for_it():
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    class BigIsSlow:
        """Records the image sides of each pass; a pass with a big image holds until released."""

        def __init__(self):
            import threading

            self.passes: list[list[int]] = []
            self.release = threading.Event()

        def score_many(self, images):
            from anomaly_service.model import ScoreResult

            self.passes.append(sorted(im.shape[0] for im in images))
            if max(im.shape[0] for im in images) > 100:
                assert self.release.wait(10)
            return [ScoreResult(score=0.0, normalized_score=0.0, is_anomaly=False, threshold=1.0,
                                anomaly_map=np.zeros((2, 2), np.float32), image_width=2, image_height=2)
                    for _ in images]

    async def run():
        model = BigIsSlow()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50, workers=1)
        await batcher.start()
        jobs = [batcher.enqueue(entry, np.zeros((side, side, 3), np.uint8)) for side in (400, 20, 30, 40)]
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs[1:])), 10)  # while the big one still runs
        assert not jobs[0].future.done()
        model.release.set()
        await asyncio.wait_for(jobs[0].future, 10)
        await batcher.stop()
        return model.passes

    assert asyncio.run(run()) == [[20, 30, 40], [400]]  # one batch, two passes: similar sizes together, small first


@pytest.mark.usefixtures("process_threads")
def test_thread_budget_is_per_thread_and_restored():
    import threading

    import torch

    from anomaly_service.parallelism import default_inference_workers, intra_op_threads, thread_budget

    seen = {}

    def worker():
        seen["before"] = torch.get_num_threads()  # a fresh thread starts from the process-wide count
        with intra_op_threads(1):
            seen["inside"] = (thread_budget(), torch.get_num_threads())
        seen["after"] = (thread_budget(), torch.get_num_threads())

    for _ in range(2):  # the second thread starts from what the first left behind
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["inside"] == (1, 1)
        assert seen["after"] == (seen["before"], seen["before"])
    assert default_inference_workers("cpu", 2) == 2 and default_inference_workers("cpu", 1) == 1
    assert default_inference_workers("cpu", 32) == 2 and default_inference_workers("cuda", 32) == 1


@pytest.mark.usefixtures("process_threads")
def test_threads_follow_the_cpu_quota(monkeypatch):
    """A container's CPU quota caps torch's threads (joblib reads affinity and cgroups); OMP_NUM_THREADS wins."""
    import torch

    from anomaly_service import parallelism

    before = torch.get_num_threads()
    monkeypatch.setattr(parallelism, "_PROCESS_THREADS", parallelism._PROCESS_THREADS)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert parallelism.fit_threads_to_cpu_quota(cpu_count=1) == 1 and torch.get_num_threads() == 1
        assert parallelism.fit_threads_to_cpu_quota(cpu_count=64) == 1  # never raised above what torch had
        torch.set_num_threads(before)
        assert parallelism.fit_threads_to_cpu_quota() == min(before, __import__("joblib").cpu_count())
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(before)
        assert parallelism.fit_threads_to_cpu_quota(cpu_count=1) == before  # the operator's explicit choice
    finally:
        torch.set_num_threads(before)


def test_the_batcher_lets_go_of_a_scored_model_while_it_waits_for_the_next_part():
    """A soak found the batcher's loop holding the jobs of the batch it ran last until the next one came, and each
    job names its model's entry: after an update, a rollback or a removal, the replaced model (its bank, its
    network) stayed in memory until the next part was scored. Now a scored job is let go once its pass ends."""
    import gc
    import weakref

    from anomaly_service.batching import MicroBatcher

    class Entry:
        def __init__(self):
            self.model = _RecordingModel()
            self.model.release.set()

    async def run():
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, workers=1)
        await batcher.start()
        entry = Entry()
        gone = weakref.ref(entry)
        await batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8)).future
        del entry
        for _ in range(3):  # the pass's task ends and is let go on the loop's next turns
            await asyncio.sleep(0)
        gc.collect()
        alive = gone() is not None
        await batcher.stop()
        return alive

    assert not asyncio.run(run())


def test_a_stop_answers_a_request_the_gatherer_holds():
    """The batcher stops (the service shuts down): a request whose image the gatherer had taken while it waited for
    another one still decoding was answered by no one, and waited for ever with its image held. It gets the answer
    of a request still in the queue, that of a full queue."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher, Overloaded

    async def gathered():
        model = _RecordingModel()
        batcher = MicroBatcher(max_batch=8, max_wait_ms=60_000, workers=1)
        await batcher.start()
        batcher.announce()  # another request is decoding: the gatherer waits for it
        job = batcher.enqueue(SimpleNamespace(model=model), np.zeros((2, 2, 3), np.uint8))
        for _ in range(5):
            await asyncio.sleep(0)
        assert batcher.depth == 0  # the gatherer holds it
        await asyncio.wait_for(batcher.stop(), 10)
        with pytest.raises(Overloaded) as refused:
            await asyncio.wait_for(job.future, 1)
        assert refused.value.retry_after == 1 and job.image is None and job.finished.is_set()
        return model.budgets

    assert asyncio.run(gathered()) == []  # never scored


def test_a_stop_as_a_request_joins_the_gatherers_wait_still_ends_and_answers_it():
    """The gatherer waits for an announced request with asyncio.wait_for, which on Python 3.11 swallows a
    cancellation that comes as the queue hands it the request: a stop at that moment went unheard, the gatherer
    went on to wait for the next request, and the stop (the service's shutdown) waited for it for ever, the
    requests it had taken unanswered. Both requests are answered and the stop ends."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher, Overloaded

    async def joined():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=8, max_wait_ms=60_000, workers=1)
        await batcher.start()
        batcher.announce()  # another request is decoding: the gatherer waits for it
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        for _ in range(5):
            await asyncio.sleep(0)
        assert batcher.depth == 0  # the gatherer holds it and waits
        second = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))  # the queue hands it to the wait ...
        stopping = asyncio.ensure_future(batcher.stop())  # ... as the stop begins, before either has run
        stopped = await asyncio.wait({stopping}, timeout=10)
        assert stopped[0], "the stop never ended"
        model.release.set()
        for job in (first, second):
            with pytest.raises(Overloaded):
                await asyncio.wait_for(job.future, 10)
            assert job.image is None and job.finished.is_set()

    asyncio.run(joined())


def test_a_request_queued_once_the_stop_began_is_refused_not_left_waiting():
    """A request that finishes decoding once the batcher's stop has begun (an app whose server stops it with
    requests still running) was queued where no gatherer would ever take it, and waited for ever. It is refused as
    at a full queue."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher, Overloaded

    async def late():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=5, workers=1)
        await batcher.start()
        await batcher.stop()
        with pytest.raises(Overloaded) as refused:
            batcher.enqueue(SimpleNamespace(model=_RecordingModel()), np.zeros((2, 2, 3), np.uint8))
        assert refused.value.retry_after == 1 and batcher.depth == 0

    asyncio.run(late())


def test_a_stop_lets_the_running_pass_answer_and_turns_the_queue_away():
    """A pass already running when the batcher stops finishes and answers; a request still in the queue is answered
    as at a full queue, and its image let go."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher, Overloaded

    async def queued():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, queue_size=1, workers=1)
        await batcher.start()
        running = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        assert await asyncio.to_thread(model.started.acquire, timeout=10)  # its pass holds the only worker
        waiting = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        assert batcher.full  # the queue holds one: the next is refused before it is decoded
        with pytest.raises(Overloaded):
            batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the running pass is waited for
        model.release.set()
        await asyncio.wait_for(stopping, 10)
        assert (await running.future).score == 0.0
        with pytest.raises(Overloaded) as refused:
            await waiting.future
        assert refused.value.retry_after == 1
        assert waiting.image is None and waiting.finished.is_set() and batcher.depth == 0
        return len(model.budgets)

    assert asyncio.run(queued()) == 1


class _Passes:
    """Stands in for AnomalyModel: records the image sides of each pass; a pass with an image of side ``fail`` or
    less raises MemoryError (the allocation a pass can fail on), one with an image of side ``hold`` or more waits."""

    def __init__(self, fail: int = 0, hold: int = 10**9, pause: float = 0.0):
        import threading

        self.passes: list[list[int]] = []
        self.fail, self.hold, self.pause = fail, hold, pause
        self.release = threading.Event()

    def score_many(self, images):
        import time

        from anomaly_service.model import ScoreResult

        sides = sorted(im.shape[0] for im in images)
        self.passes.append(sides)
        time.sleep(self.pause)
        if sides[0] <= self.fail:
            raise MemoryError("cannot allocate")
        if sides[-1] >= self.hold:
            assert self.release.wait(10)
        return [ScoreResult(score=float(im.shape[0]), normalized_score=0.0, is_anomaly=False, threshold=1.0,
                            anomaly_map=np.zeros((2, 2), np.float32), image_width=2, image_height=2)
                for im in images]


def test_a_failed_pass_answers_its_requests_and_the_batchs_other_passes_still_run():
    """A pass that raises (memory ran out) gives its error to each of its requests, which turn it into a 503, and
    the batch goes on to its next pass: a request of another size is answered with its own score, not lost."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _Passes(fail=30)
        entry = SimpleNamespace(model=model)
        running: list[int] = []
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50, workers=1, on_running=running.append)
        await batcher.start()
        jobs = [batcher.enqueue(entry, np.zeros((side, side, 3), np.uint8)) for side in (400, 20, 30)]
        answers = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 10)
        await batcher.stop()
        return model.passes, answers, running

    passes, answers, running = asyncio.run(run())
    assert passes == [[20, 30], [400]]
    assert answers[0].score == 400.0 and all(isinstance(a, MemoryError) for a in answers[1:])
    assert running == [1, 0, 1, 0]  # each pass told as it starts and ends, the failed one too


def test_one_worker_runs_one_pass_at_a_time_and_a_lone_request_does_not_wait():
    """``workers=1``: a second request waits for the pass in hand (never beside it), and the count of passes
    running says so; a request with no other one decoding is scored at once, not after the longest wait."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        running: list[int] = []
        batcher = MicroBatcher(max_batch=8, max_wait_ms=60_000, workers=1, on_running=running.append)
        await batcher.start()
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        assert await asyncio.to_thread(model.started.acquire, timeout=10)  # not held back for the longest wait
        second = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        await asyncio.sleep(0.2)
        assert running == [1] and batcher.running == 1 and len(model.budgets) == 1  # the second has not started
        model.release.set()
        await asyncio.wait_for(asyncio.gather(first.future, second.future), 10)
        waited = second.future.result().timing_ms["queue"]
        assert 200 <= waited < 60_000  # its answer says how long it queued behind the first
        for _ in range(3):
            await asyncio.sleep(0)
        assert not batcher._batches  # a batch ended is not kept (a service runs millions)
        await batcher.stop()
        return running

    assert asyncio.run(run()) == [1, 0, 1, 0]


def test_images_share_a_pass_up_to_four_times_the_pixels_of_the_smallest():
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run(sides):
        model = _Passes()
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50, workers=1)
        await batcher.start()
        entry = SimpleNamespace(model=model)
        jobs = [batcher.enqueue(entry, np.zeros((s, s, 3), np.uint8)) for s in sides]
        scores = [r.score for r in await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 10)]
        await batcher.stop()
        assert scores == [float(s) for s in sides]  # each request its own answer
        return model.passes

    assert asyncio.run(run((20, 10))) == [[10, 20]]  # four times the pixels: one pass
    assert asyncio.run(run((21, 10))) == [[10], [21]]  # more: a pass of its own, after

    async def oblong():  # pixels are height times width: a wide image of four times the pixels shares the pass
        model = _Passes()
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50, workers=1)
        await batcher.start()
        entry = SimpleNamespace(model=model)
        jobs = [batcher.enqueue(entry, np.zeros(shape, np.uint8)) for shape in ((10, 10, 3), (10, 40, 3))]
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 10)
        await batcher.stop()
        return model.passes

    assert asyncio.run(oblong()) == [[10, 10]]


def test_retry_after_is_about_the_time_a_full_queue_takes_to_drain():
    """Before any pass a refused client is told a tenth of a second a batch (at least 1 s); after passes, what they
    took: the queue's batches at the time each took, whole seconds."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    assert MicroBatcher(max_batch=1, queue_size=64).retry_after() == 6
    assert MicroBatcher(max_batch=8, queue_size=64).retry_after() == 1

    async def run():
        model = _Passes(pause=0.5)
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, queue_size=64, workers=1)
        await batcher.start()
        job = batcher.enqueue(SimpleNamespace(model=model), np.zeros((2, 2, 3), np.uint8))
        await asyncio.wait_for(job.future, 20)
        await batcher.stop()
        return batcher.retry_after()

    # a pass of at least half a second: 64 * (0.8 * 0.1 + 0.2 * 0.5) = 11.5 at the least; far below a minute a pass
    assert 11 <= asyncio.run(run()) <= 64 * 12


def test_a_pass_waits_for_a_request_still_decoding_and_no_longer():
    """``announce`` / ``withdraw``: while another request decodes, the gatherer waits for it (up to ``max_wait``) so
    both share one pass; once it has submitted, the pass goes without waiting for the rest of the wait."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _Passes()
        entry = SimpleNamespace(model=model)
        depths: list[int] = []
        batcher = MicroBatcher(max_batch=8, max_wait_ms=60_000, workers=1, on_depth=depths.append)
        await batcher.start()
        batcher.announce()
        batcher.announce()
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        batcher.withdraw()  # the first submitted; another still decodes
        await asyncio.sleep(0.2)
        assert not first.future.done()  # waited for
        second = batcher.enqueue(entry, np.zeros((3, 3, 3), np.uint8))
        batcher.withdraw()
        await asyncio.wait_for(asyncio.gather(first.future, second.future), 10)
        await batcher.stop()
        return model.passes, depths

    assert asyncio.run(run()) == ([[2, 3]], [1, 1, 0])  # the queue's depth told as it grows and once gathered


def test_a_request_cancelled_before_its_pass_is_dropped_and_lets_its_image_go():
    """A request's task cancelled (the client watch cancels the future it awaits) without ``abandon``: the gatherer
    drops its job when it comes to it, no pass scores it, and the image is let go."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _RecordingModel()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=1, max_wait_ms=0, workers=1)
        await batcher.start()
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        assert await asyncio.to_thread(model.started.acquire, timeout=10)
        second = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        second.future.cancel()
        model.release.set()
        await asyncio.wait_for(first.future, 10)
        await asyncio.wait_for(second.finished.wait(), 10)
        assert second.image is None and batcher.depth == 0
        await batcher.stop()
        return len(model.budgets)

    assert asyncio.run(run()) == 1


def test_a_batcher_never_started_is_empty_and_stops():
    """The service makes its batcher before its start-up starts it: until then its depth (in the status answer) is
    0, it is not full (the admission's question), and a stop has nothing to wait for."""
    from anomaly_service.batching import MicroBatcher

    batcher = MicroBatcher(max_batch=8, max_wait_ms=5, queue_size=4, workers=1)
    assert batcher.depth == 0 and not batcher.full
    asyncio.run(batcher.stop())


def test_a_batch_beside_others_gets_its_share_of_the_threads_and_at_least_one():
    """Whatever cores this machine has: 8 threads over 2 workers is 4 a batch beside another, over 16 workers 1."""
    from anomaly_service.batching import MicroBatcher

    assert MicroBatcher(workers=2, threads=8).shared_threads == 4
    assert MicroBatcher(workers=16, threads=8).shared_threads == 1
    assert MicroBatcher(workers=0, threads=8).shared_threads == 8  # no workers asked for is one


def test_a_request_waits_no_longer_than_max_wait_for_one_that_never_comes():
    """Another request announced itself and then failed its decoding (its withdrawal wakes no one): the gatherer
    waits out ``max_wait`` for it and no more, then scores what it has."""
    from types import SimpleNamespace

    from anomaly_service.batching import MicroBatcher

    async def run():
        model = _Passes()
        batcher = MicroBatcher(max_batch=8, max_wait_ms=300, workers=1)
        await batcher.start()
        batcher.announce()
        job = batcher.enqueue(SimpleNamespace(model=model), np.zeros((2, 2, 3), np.uint8))
        await asyncio.sleep(0.05)
        batcher.withdraw()
        await asyncio.wait_for(job.future, 10)
        await batcher.stop()
        return model.passes

    assert asyncio.run(run()) == [[2]]

    async def joined():  # within a wait under a second, one that comes is waited for
        model = _Passes()
        entry = SimpleNamespace(model=model)
        batcher = MicroBatcher(max_batch=8, max_wait_ms=900, workers=1)
        await batcher.start()
        batcher.announce()
        batcher.announce()
        first = batcher.enqueue(entry, np.zeros((2, 2, 3), np.uint8))
        batcher.withdraw()
        await asyncio.sleep(0.05)
        second = batcher.enqueue(entry, np.zeros((3, 3, 3), np.uint8))
        batcher.withdraw()
        await asyncio.wait_for(asyncio.gather(first.future, second.future), 10)
        await batcher.stop()
        return model.passes

    assert asyncio.run(joined()) == [[2, 3]]
