"""Admission control: budgets on pixels, upload bytes and decode backlog in flight, refused early with 503.

The service is exercised in-process (httpx over ASGI) with small budgets, so small images stand in for big ones:
what matters is the ratio of an image's pixels to the budget, not the size itself.
"""

import asyncio
import io
import struct
import threading
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from anomaly_service.api import create_app
from anomaly_service.api import lifecycle
from anomaly_service.api.admission import Admission, Refused
from anomaly_service.errors import ImageLoadError
from anomaly_service.images import ImageLimits, declared_size, decode_image, load_image
from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL
from anomaly_service.settings import ServiceSettings
from conftest import png_bytes, textured_part


def gif_screen(width: int, height: int) -> bytes:
    """A 35-byte GIF: one 1x1 frame on a ``width`` x ``height`` logical screen, which decodes to the whole screen."""
    return (b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00" + b";")


SMALL = png_bytes(textured_part(np.random.default_rng(7)))  # 128 x 128 = 16,384 pixels


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# ------------------------------------------------------------------------------------------------ declared_size
def test_declared_size_reads_the_header_only():
    bomb = gif_screen(6000, 6000)
    assert len(bomb) == 35
    assert declared_size(bomb) == (6000, 6000, "GIF")  # instant: nothing is decoded
    assert load_image(bomb, ImageLimits(max_pixels=36_000_000)).shape == (6000, 6000, 3)  # what decoding costs
    jpeg = png_bytes(textured_part(np.random.default_rng(1), 40, 60), format="JPEG")
    f = io.BytesIO(jpeg)
    f.seek(5)
    assert declared_size(f) == (60, 40, "JPEG") and f.tell() == 5  # a file object is left where it was


@pytest.mark.parametrize("data, limits, kind", [
    (b"", None, "empty"),
    (b"not an image at all", None, "not_image"),
    (gif_screen(6000, 6000), ImageLimits(max_pixels=1_000_000), "too_large"),
    (gif_screen(4, 4), ImageLimits(), "too_small"),
    (gif_screen(64, 64), ImageLimits(formats=frozenset({"PNG"})), "unsupported_format"),
])
def test_declared_size_refuses_what_decoding_would_with_the_same_error(data, limits, kind):
    with pytest.raises(ImageLoadError) as header:
        declared_size(data, limits, "x")
    with pytest.raises(ImageLoadError) as decoding:
        load_image(data, limits or ImageLimits(), "x")
    assert header.value.kind == decoding.value.kind == kind
    assert str(header.value) == str(decoding.value)


# ---------------------------------------------------------------------------------------------- Admission unit
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_budgets_refuse_by_reason_and_release():
    changes = []
    a = Admission(max_pixels=100, max_bytes=1000, max_backlog=3, on_change=lambda *t: changes.append(t))
    t1 = a.admit(60, 400)
    assert (a.pixels, a.nbytes, a.backlog) == (60, 400, 1) and changes[-1] == (60, 400, 1)
    with pytest.raises(Refused) as exc:
        a.admit(50, 10)  # 110 pixels > 100
    assert exc.value.reason == "pixels" and exc.value.retry_after >= 1 and "retry in" in str(exc.value)
    with pytest.raises(Refused) as exc:
        a.admit(10, 700)  # 1100 bytes > 1000
    assert exc.value.reason == "bytes"
    assert (a.pixels, a.nbytes, a.backlog) == (60, 400, 1)  # a refusal reserves nothing
    t2, t3 = a.admit(20, 100), a.admit(20, 100)
    with pytest.raises(Refused) as exc:
        a.admit(0, 0)  # three images not yet decoded
    assert exc.value.reason == "decode_backlog"
    t1.decoded()  # bytes and the backlog place come back at decoding, the pixels only at the end
    assert (a.pixels, a.nbytes, a.backlog) == (100, 200, 2)
    t1.release()
    t1.release()  # idempotent
    assert (a.pixels, a.nbytes, a.backlog) == (40, 200, 2)
    with t2, t3:
        pass
    assert (a.pixels, a.nbytes, a.backlog) == (0, 0, 0) and changes[-1] == (0, 0, 0)


def test_an_image_larger_than_the_budget_is_admitted_alone():
    a = Admission(max_pixels=100, max_bytes=1000, max_backlog=8)
    big = a.admit(500, 5000)  # nothing else in flight: admitted (it could never be scored otherwise)
    with pytest.raises(Refused):
        a.admit(1, 1)  # but nothing fits beside it
    big.release()
    small = a.admit(1, 1)
    with pytest.raises(Refused):
        a.admit(500, 1)  # and it waits for the others to finish
    small.release()


def test_retry_after_follows_how_long_images_stay_in_flight():
    clock = Clock()
    a = Admission(max_pixels=100, max_bytes=10**6, max_backlog=8, clock=clock)
    assert a.retry_after() == 1  # nothing measured yet
    big = a.admit(90, 1)
    clock.now += 7.2
    big.release()
    for _ in range(3):  # small quick ones weigh little against a big slow one
        t = a.admit(1, 1)
        clock.now += 0.01
        t.release()
    assert a.retry_after() == 7  # about the big one's 7.2 s, rounded up: the quick ones hardly move it
    a.admit(90, 1)
    with pytest.raises(Refused) as exc:
        a.admit(90, 1)
    assert exc.value.retry_after == 7


def test_the_memory_the_images_in_flight_will_take_counts_against_the_room():
    """The room read alone let a burst of photos in that each fitted before any had allocated. What the images in
    flight will still take counts against it: their peaks, less what the process has grown by since it was idle."""
    from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL

    mp = 10**6  # a megapixel
    machine = {"free": 1000 * mp * PEAK_BYTES_PER_PIXEL, "resident": 5 << 30}  # what the kernel would say
    a = Admission(max_pixels=10**12, max_bytes=10**6, max_backlog=8, free_memory=lambda: machine["free"],
                  resident=lambda: machine["resident"])
    first = a.admit(600 * mp, 0)  # fits the room alone
    with pytest.raises(Refused) as exc:
        a.admit(600 * mp, 0)  # it too fits what is free now, but not beside the first, which has not allocated yet
    assert exc.value.reason == "memory" and "the images in flight will still take" in str(exc.value)
    grown = 500 * mp * PEAK_BYTES_PER_PIXEL  # the first decodes: the process grows, and the machine has that less
    machine["free"] -= grown
    machine["resident"] += grown
    with pytest.raises(Refused):
        a.admit(600 * mp, 0)  # no more room than before: the first still takes the rest of its peak
    a.admit(300 * mp, 0).release()  # what is left beside the first's peak
    first.release()  # the first is answered: its memory is back
    machine["free"] += grown
    machine["resident"] -= grown
    a.admit(600 * mp, 0).release()



def _limited(room: int) -> Callable[[], int]:
    """What a memory limit of ``room`` bytes above what this process holds now leaves it, as its cgroup would
    say: the limit less the process's own resident memory, read again at each call (real pages, real reads)."""
    from anomaly_service.memory_room import resident_bytes

    limit = resident_bytes() + room
    return lambda: limit - resident_bytes()


def test_memory_a_model_takes_beside_a_photo_in_flight_is_not_the_photos():
    """A model loaded (a re-fit picked up, a reload) while a photo is in flight: what the process grew by was all
    taken for the photo's, which then counted as taking nothing more, and a second photo was let in past the memory
    left by the model's size. Until nothing is in flight again, the photos in flight count whole."""
    mib, px = 1 << 20, 2_000_000  # a photo's peak: 37 bytes a pixel, about 70 MiB
    need = px * PEAK_BYTES_PER_PIXEL
    model = 150 * mib
    a = Admission(max_pixels=10**12, max_bytes=10**6, max_backlog=8, free_memory=_limited(model + need * 3 // 2))
    first = a.admit(px, 0)
    with a.elsewhere():  # as Service.elsewhere runs a load on a worker thread
        bank = np.ones(model // 8)  # the model's memory bank, its pages written
    with pytest.raises(Refused) as exc:
        a.admit(px, 0)  # free beside the model, not beside the first photo's peak as well
    assert exc.value.reason == "memory"
    a.admit(px // 4, 0).release()  # what is left beside them both
    first.release()
    a.admit(px, 0).release()  # idle again: read anew, the model is the process's own
    del bank


def test_what_the_last_photos_left_given_back_is_not_taken_from_the_next():
    """The process was read while the last photo's answer and picture were still held (its ticket is released
    before the answer is sent and recorded); given back, the next photo's own memory was not seen as taken, its
    peak counted again beside it, and a photo that fitted was refused."""
    mib, px = 1 << 20, 4_000_000  # the second photo's peak: 37 bytes a pixel, about 140 MiB
    answer = np.ones(80 * mib // 8)  # the last photo's answer and picture, about to be let go
    a = Admission(max_pixels=10**12, max_bytes=10**6, max_backlog=8, free_memory=_limited(160 * mib))
    second = a.admit(px, 0)  # read with the answer still held
    del answer
    a.admit(1000, 0).release()  # another part, a small one: the process read again
    taken = np.ones(px * PEAK_BYTES_PER_PIXEL // 8)  # the second photo decodes and scores: its peak, pages written
    a.admit(50 * mib // PEAK_BYTES_PER_PIXEL, 0).release()  # about 90 MiB are left and it takes 50: taken once
    second.release()
    del taken


# ---------------------------------------------------------------------------------------------- the service
def app_for(model_dir, **settings):
    return create_app(ServiceSettings(model_dir=model_dir, reload_interval=0, **settings))


async def _post(c: httpx.AsyncClient, data: bytes, name: str = "x.gif") -> httpx.Response:
    return await c.post("/score", files={"file": (name, data, "application/octet-stream")})


class DecodeGate:
    """Stands in for the service's decoder: records every decode it starts (by declared width) and holds those of
    the widths in ``hold`` until :meth:`open` (refusals must come before decoding; held decodes keep work in
    flight for as long as a test needs)."""

    def __init__(self, hold: tuple[int, ...] = ()):
        self.started: list[int] = []
        self.hold = set(hold)
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def __call__(self, data, *args, **kwargs):
        width = declared_size(data)[0]
        if width == 8:  # the codec warm-up at start-up, not a request
            return load_image(data, *args, **kwargs)
        self.started.append(width)
        if width in self.hold:
            assert self._open.wait(30)
        return decode_image(data, *args, **kwargs)


@pytest.fixture
def gate(monkeypatch):
    def install(*hold: int) -> DecodeGate:
        g = DecodeGate(hold)
        monkeypatch.setattr(lifecycle, "load_image", g)  # the warm-up
        monkeypatch.setattr(lifecycle, "decode_image", g)  # each upload: the decode and what it says
        return g

    return install


async def until(condition, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_a_burst_of_big_images_gets_early_503s_and_a_small_one_is_served(model_dir, gate):
    big = gif_screen(1000, 1000)  # 35 bytes that decode to a million pixels
    g = gate(1000)  # the admitted big image stays in decoding until the burst is over

    async def run():
        app = app_for(model_dir, max_pixels_in_flight=1_200_000)  # one big image and a few small ones
        service = app.state.service
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                burst = [asyncio.create_task(_post(c, big)) for _ in range(8)]
                await until(lambda: sum(t.done() for t in burst) == 7)  # refused at once, while one decodes
                small = await _post(c, SMALL, "small.png")  # served beside it
                during = service.admission.pixels
                g.open()
                rs = await asyncio.gather(*burst)
                totals = (service.admission.pixels, service.admission.nbytes, service.admission.backlog)
                after = [await _post(c, big) for _ in range(3)]  # one at a time: everything is admitted again
                metrics = (await c.get("/metrics")).text
        return rs, small, during, totals, after, metrics

    rs, small, during, totals, after, metrics = asyncio.run(run())
    assert small.status_code == 200, small.text
    assert during == 1_000_000 and totals == (0, 0, 0)  # budgets released once answered
    assert sorted(r.status_code for r in rs) == [200] + [503] * 7
    for r in (r for r in rs if r.status_code != 200):  # the first header read to finish was admitted, any task's
        assert r.json()["error"] == "overloaded" and "pixels" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
    assert sorted(g.started) == [128] + [1000] * 4  # refused before decoding: only admitted images were decoded
    assert all(r.status_code == 200 for r in after)
    assert metric(metrics, 'anomaly_overloaded_by_reason_total{reason="pixels"}') == 7
    assert metric(metrics, "anomaly_overloaded_total") == 7
    assert metric(metrics, "anomaly_pixels_in_flight") == 0 and metric(metrics, "anomaly_decode_backlog") == 0
    assert metric(metrics, "anomaly_upload_bytes_in_flight") == 0


def test_batch_items_are_admitted_one_by_one(model_dir, gate):
    """Sixteen 35-byte GIFs declaring a big screen in one batch: one is scored, the others get their own
    503 entry at once, and the answer says when to retry; a small file beside them is scored."""
    g = gate()
    files = [("files", (f"{i}.gif", gif_screen(1000, 1000), "image/gif")) for i in range(16)]
    files.append(("files", ("small.png", SMALL, "image/png")))

    async def run():
        app = app_for(model_dir, max_pixels_in_flight=1_200_000, max_batch_files=17)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/score/batch", files=files)

    r = asyncio.run(run())
    assert r.status_code == 200
    items = r.json()["results"]
    # the items read their uploads concurrently, so whichever GIF reaches admission first is the one scored
    gifs = [item["status"] for item in items[:-1]]
    assert sorted(gifs) == [200] + [503] * 15 and items[-1]["status"] == 200
    assert all(item["error"]["error"] == "overloaded" for item in items[:-1] if item["status"] == 503)
    assert int(r.headers["retry-after"]) >= 1
    assert sorted(g.started) == [128, 1000]


def test_bytes_budget_refuses_before_reading_or_decoding(model_dir, gate):
    g = gate(128)

    async def run():
        app = app_for(model_dir, max_bytes_in_flight=len(SMALL) + 10)
        service = app.state.service
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                first = asyncio.create_task(_post(c, SMALL, "s.png"))
                await until(lambda: g.started)
                refused = await _post(c, SMALL, "s.png")
                in_flight = service.admission.nbytes
                g.open()
                return await first, refused, in_flight, (await c.get("/metrics")).text

    first, refused, in_flight, metrics = asyncio.run(run())
    assert first.status_code == 200 and in_flight == len(SMALL)
    assert refused.status_code == 503 and "upload bytes" in refused.json()["detail"]
    assert metric(metrics, 'anomaly_overloaded_by_reason_total{reason="bytes"}') == 1
    assert g.started == [128]


def test_a_full_queue_refuses_before_decoding(model_dir, gate, monkeypatch):
    from anomaly_service.batching import MicroBatcher

    g = gate()
    monkeypatch.setattr(MicroBatcher, "full", property(lambda self: True))

    async def run():
        app = app_for(model_dir)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await _post(c, SMALL, "s.png"), (await c.get("/metrics")).text

    r, metrics = asyncio.run(run())
    assert r.status_code == 503 and "queue is full" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
    assert metric(metrics, 'anomaly_overloaded_by_reason_total{reason="queue"}') == 1
    assert g.started == []


def test_decode_backlog_is_capped(model_dir, gate):
    g = gate(128)  # the first decodes hold: the backlog fills up

    async def run():
        app = app_for(model_dir, max_decode_backlog=2, cpu_workers=1)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                tasks = [asyncio.create_task(_post(c, SMALL, "s.png")) for _ in range(6)]
                await until(lambda: sum(t.done() for t in tasks) == 4)
                g.open()
                return await asyncio.gather(*tasks), (await c.get("/metrics")).text

    rs, metrics = asyncio.run(run())
    assert sorted(r.status_code for r in rs) == [200, 200, 503, 503, 503, 503]
    assert all("waiting to be decoded" in r.json()["detail"] for r in rs if r.status_code == 503)
    assert metric(metrics, 'anomaly_overloaded_by_reason_total{reason="decode_backlog"}') == 4
    assert len(g.started) == 2


# ------------------------------------------------------------------------------------------ client disconnects
def multipart(data: bytes, name: str = "x.png") -> tuple[bytes, bytes]:
    req = httpx.Request("POST", "http://t/score", files={"file": (name, data, "image/png")})
    return req.read(), req.headers["content-type"].encode()


async def asgi_post(app, body: bytes, content_type: bytes, gone: asyncio.Event) -> list[dict]:
    """POST through the app's ASGI interface with a client that disconnects when ``gone`` is set."""
    sent = False
    messages: list[dict] = []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/score", "raw_path": b"/score", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("t", 80)}
    await app(scope, receive, send)
    return messages


def test_a_client_that_disconnects_releases_its_budget_and_its_work_is_dropped(model_dir, gate):
    """One decode thread, held busy by a first request; a second one waits for it and its client leaves: its
    budget is free at once, it is never decoded, and the first request is still answered."""
    g = gate(200)
    first = png_bytes(textured_part(np.random.default_rng(2), 200, 200))

    async def run():
        app = app_for(model_dir, cpu_workers=1)
        service = app.state.service
        async with app.router.lifespan_context(app):
            stay, leave = asyncio.Event(), asyncio.Event()
            a = asyncio.create_task(asgi_post(app, *multipart(first), stay))
            await until(lambda: g.started)
            b = asyncio.create_task(asgi_post(app, *multipart(SMALL), leave))
            await until(lambda: service.admission.pixels == 200 * 200 + 128 * 128)
            leave.set()  # the second client goes away while waiting for the decode thread
            b_messages = await asyncio.wait_for(b, 10)
            in_flight_after_leaving = service.admission.pixels
            g.open()
            a_messages = await asyncio.wait_for(a, 30)
            metrics = service.telemetry.render().decode()
            totals = (service.admission.pixels, service.admission.nbytes, service.admission.backlog)
        return a_messages, b_messages, in_flight_after_leaving, metrics, totals

    a_messages, b_messages, in_flight_after_leaving, metrics, totals = asyncio.run(run())
    assert in_flight_after_leaving == 200 * 200  # the leaver's pixels came back while the first still decoded
    assert a_messages[0]["status"] == 200
    assert b_messages[0]["status"] == 499  # nobody reads it; the metrics and the access log do
    assert g.started == [200]  # the leaver was never decoded
    assert metric(metrics, 'anomaly_abandoned_total{stage="decode"}') == 1
    assert totals == (0, 0, 0)


def test_a_slow_header_read_never_holds_up_the_other_requests(model_dir, monkeypatch):
    """A forged file with a million chunks before its pixels takes Pillow seconds just to find its size. That read
    ran on the event loop and froze every request, probes included (an adversarial pass: /healthz waited 9 s)."""
    import time

    from fastapi.testclient import TestClient

    started, release = threading.Event(), threading.Event()

    def slow_header(*args, **kwargs):
        started.set()
        release.wait(10)
        return declared_size(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "declared_size", slow_header)
    with TestClient(create_app(ServiceSettings(model_dir=model_dir, reload_interval=0, record=False))) as c:
        answer: dict = {}
        upload = threading.Thread(target=lambda: answer.update(r=c.post(
            "/score", files={"file": ("x.png", png_bytes(textured_part(np.random.default_rng(2))))})))
        upload.start()
        try:
            assert started.wait(10)
            t0 = time.monotonic()
            probe = c.get("/healthz")
            waited = time.monotonic() - t0
        finally:
            release.set()
            upload.join(30)
    assert probe.status_code == 200 and waited < 5  # on the loop, it waited the whole 10 s read
    assert answer["r"].status_code == 200
