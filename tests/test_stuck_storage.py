"""Storage that hangs: a model directory on a network share that stops answering, a read that never returns.

A FIFO with no writer blocks ``open()`` and ``read()`` exactly as such a share does. Put where the service opens a
model's file, it held the start-up loading for ever (never ready, every request for a model waiting, a stop that
never ended), or a re-scan (no new model loaded, ``POST /models/reload`` with no answer). Now each model's files are
read within ``--load-timeout``: past it the model is *stuck*, said with since when, and the others serve.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import pytest

from anomaly_service.registry import ModelRegistry
from anomaly_service.stuck_io import StorageStuck
from conftest import PATIENCE, eventually, free_port, png_bytes, textured_part, within

BOUND = 1.0  # --load-timeout in these tests: short, so that a stuck model is found quickly


def release(fifo: Path, data: bytes = b"") -> bool:
    """Give the reader blocked on ``fifo`` a writer (and ``data``), as a share that answers again; False when nobody
    was blocked on it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader, or the FIFO is gone
            return False
        raise
    try:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(fd)
    return True


def answer_again(fifo: Path, data: bytes) -> None:
    """The share answers again: the file is there with ``data`` for every later open, and the reader blocked on the
    FIFO gets ``data`` too."""
    aside = fifo.with_name(fifo.name + ".hung")
    os.link(fifo, aside)
    whole = fifo.with_name(fifo.name + ".whole")
    whole.write_bytes(data)
    os.replace(whole, fifo)
    assert release(aside, data)
    aside.unlink()


@pytest.fixture
def hung() -> Iterator[Callable[[Path], Path]]:
    """Makes a FIFO at a path (where a model's file was), and at the test's end releases whatever still blocks on
    it, so that no thread of the test session waits on it for ever."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for fifo in made:
        for _ in range(50):  # every reader blocked on it, one writer each
            if not release(fifo):
                break


def hang_at_start_up(root: Path, name: str, hung: Callable[[Path], Path]) -> Path:
    """Make model ``name``'s start-up hang on its files: a copy a save set aside beside it (which the start-up
    settles) and its swap lock a FIFO, which the settling opens. Returns the FIFO."""
    shutil.copytree(root / name, root / f".{name}.old-1")
    return hung(root / f".{name}.swap-lock")


def test_a_model_whose_files_hang_at_start_up_is_stuck_and_the_others_serve(models, hung):
    """The start-up loading waited on model b's files for ever: model a, whole, was never served. Now b is stuck
    after the bound, with since when, a request for it is told so (not 'unknown model'), and a is served."""
    fifo = hang_at_start_up(models, "b", hung)
    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    before = time.time()
    changes = within(reg.load_all)
    assert changes["a"] == "loaded" and changes["b"] == "stuck"
    assert reg.names() == ["a"] and reg.get("a").name == "a"
    stuck = reg.stuck()
    assert set(stuck) == {"b"} and before - 1 <= stuck["b"].since <= time.time()
    assert "stuck" in reg.errors()["b"] and "have not answered since" in reg.errors()["b"]
    with pytest.raises(StorageStuck, match="model 'b' is stuck"):
        reg.get("b")
    # a re-scan meets it again and goes on without waiting for it, and says it once
    assert "b" not in within(reg.refresh)
    with pytest.raises(StorageStuck):
        reg.load("b")  # a reload asked for: refused, no second thread waiting on the same files
    # the share answers again: the model is served at the next re-scan
    assert release(fifo)
    eventually(lambda: reg.stuck() == {})
    eventually(lambda: "b" in (within(reg.refresh) or {}) or "b" in reg.names())
    assert reg.names() == ["a", "b"] and reg.errors() == {}



def test_models_that_hang_at_start_up_are_waited_for_together(models, hung):
    """Two models of three hang on their swap locks: the start-up settled what their saves left one model after
    another, waiting a whole bound on each, so the model behind them waited two. Now the settlings run at once,
    both are given up after one bound, and the third loads."""
    shutil.copytree(models / "a", models / "c")
    for name in ("a", "b"):
        hang_at_start_up(models, name, hung)
    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    assert within(reg.load_all) == {"a": "stuck", "b": "stuck", "c": "loaded"}
    since = sorted(exc.since for exc in reg.stuck().values())
    assert len(since) == 2 and since[1] - since[0] < BOUND  # the second began before the first was given up
    assert reg.names() == ["c"]


def test_loads_at_start_up_run_a_few_at_a_time_and_stop_when_told(models, monkeypatch):
    """The start-up loads run at once, but no more than LOAD_SLOTS of them (each holds a model's arrays while it
    reads them), and none starts once the service stops."""
    import anomaly_service.registry as registry_module

    for name in ("c", "d", "e"):
        shutil.copytree(models / "a", models / name)
    running, most, lock = [0], [0], threading.Lock()
    together = threading.Barrier(2, timeout=10)  # the first two meet: they run at once
    loads = registry_module.ModelRegistry._load
    stop = threading.Event()

    def counted(self: ModelRegistry, name: str) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if name in ("a", "b"):
                together.wait()
            if name == "c":
                stop.set()  # the service stops while c loads: c ends, and no later model starts
            return loads(self, name)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(registry_module.ModelRegistry, "_load", counted)
    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=PATIENCE)
    changes = within(lambda: reg.load_all(stop))
    assert most[0] == 2 == registry_module.LOAD_SLOTS
    assert {"a", "b", "c"} <= set(changes) <= {"a", "b", "c", "d"} and set(changes.values()) == {"loaded"}


def test_a_served_model_whose_manifest_hangs_later_keeps_serving_and_blocks_no_rescan(models, hung):
    """A served model's manifest stopped answering (a FIFO in its place): the re-scan read it for ever, holding the
    re-scan lock, so no model added or re-fitted after was ever loaded and POST /models/reload never answered.
    Now the re-scan goes on: the model keeps serving the version in memory, listed as stuck, and a new one loads."""
    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    assert within(reg.load_all) == {"a": "loaded", "b": "loaded"}
    manifest = (models / "b" / "manifest.json").read_bytes()
    fifo = hung(models / "b" / "manifest.json")
    shutil.copytree(models / "a", models / "c")
    changes = within(reg.refresh)
    assert changes == {"b": "stuck", "c": "loaded"}
    assert reg.names() == ["a", "b", "c"] and reg.get("b").name == "b"  # in memory, whole: it serves
    assert set(reg.stuck()) == {"b"} and "stuck" in reg.errors()["b"]
    assert within(reg.refresh) == {}  # said once; the next re-scans do not wait for it either
    answer_again(fifo, manifest)  # the share is back
    eventually(lambda: reg.stuck() == {})
    within(reg.refresh)
    assert reg.names() == ["a", "b", "c"] and reg.errors() == {}


@contextlib.contextmanager
def a_save_that_hangs(model: Path) -> Iterator[None]:
    """Another process's save of ``model`` hangs between its renames, on a share that stopped answering: it holds
    the model's swap lock (a real ``flock``) and the model's files read as half there (a file gone under its
    listing), so whoever reads the model waits for that save. Leaving the block, the save ends and the files are
    whole."""
    import fcntl

    gone = model / "zz-renamed-away"
    gone.symlink_to(model / "no-longer-there")  # its stat fails: the disk state cannot be read
    fd = os.open(model.parent / f".{model.name}.swap-lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        gone.unlink()
        os.close(fd)


def update_turn(reg: ModelRegistry, name: str) -> BaseException | None:
    """Take and give back model ``name``'s update-or-rollback turn, as an update does; the error when refused."""
    try:
        with reg._writing(name):
            return None
    except BaseException as exc:  # noqa: BLE001 - returned for the assertion
        return exc


def test_a_rescans_stuck_reading_keeps_the_models_update_turn_until_it_ends(models):
    """A re-scan takes a model's update turn while it reads the model again. It gave the turn back when it stopped
    waiting for a stuck reading, not when the reading ended: an update could then save, and the reading, ending
    late, load under it. Now the turn is held until the reading ends, and an update meanwhile is refused."""
    from anomaly_service.errors import UpdateUnavailableError

    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    within(reg.load_all)

    with a_save_that_hangs(models / "b"):
        assert within(reg.refresh) == {"b": "stuck"}
        refused = within(lambda: update_turn(reg, "b"))
        assert isinstance(refused, UpdateUnavailableError) and "has not ended within" in str(refused)
        assert isinstance(within(lambda: update_turn(reg, "b")), UpdateUnavailableError)  # it has not ended yet
    eventually(lambda: reg.stuck() == {})
    assert within(lambda: update_turn(reg, "b")) is None  # the reading ended: the turn is free again


def test_a_reload_that_ends_late_is_counted_as_a_reload(models):
    """A reload asked for (POST /models/{name}/reload) that outlived the bound and then ended was told to the next
    re-scan as ``loaded``: a served model's new version counted as a first load. It is ``reloaded``. A re-scan
    while it hangs gives the model's update turn back at once: it started no work that could hold it."""
    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    within(reg.load_all)

    def reload() -> BaseException | None:
        try:
            reg.reload("b")
        except BaseException as exc:  # noqa: BLE001 - returned for the assertion
            return exc
        return None

    with a_save_that_hangs(models / "b"):
        assert isinstance(within(reload), StorageStuck)
        # a re-scan meanwhile starts no reading of its own (the reload's goes on) and gives the turn back at once
        assert within(reg.refresh) == {}
        assert within(lambda: update_turn(reg, "b")) is None
    eventually(lambda: reg.stuck() == {})
    assert within(reg.refresh) == {"b": "reloaded"}


def test_an_update_whose_lock_file_hangs_holds_no_other_update_for_ever(models, hung):
    """A rollback whose model lock file does not answer (a FIFO in its place) waits on it, and every later update or
    rollback of that model waited behind it for ever, each on a thread of the pool that also reads uploads for
    scoring. Now the later ones are refused (update_unavailable, 409 over HTTP) once the bound has passed."""
    from anomaly_service.errors import UpdateUnavailableError

    reg = ModelRegistry(models, device="cpu", runtime="torch", load_timeout=BOUND)
    within(reg.load_all)
    hung(models / ".a.lock")
    def rollback() -> None:
        with contextlib.suppress(LookupError):  # no such version: said once its lock file answers, at the end
            reg.rollback("a", "anything")

    first = threading.Thread(target=rollback, daemon=True)
    first.start()  # waits on the lock file; released by the fixture at the end
    eventually(lambda: (models / ".a.lock").exists())
    time.sleep(0.2)  # let it reach the lock file

    def second() -> BaseException | None:
        try:
            reg.rollback("a", "anything")
        except BaseException as exc:  # noqa: BLE001 - returned for the assertion
            return exc
        return None

    refused = within(second)
    assert isinstance(refused, UpdateUnavailableError) and "has not ended within" in str(refused)
    assert first.is_alive() and reg.get("a").name == "a" and reg.get("b").name == "b"  # the others go on


def _serve(root: Path, tmp_path: Path, load_timeout: float, *flags: str) -> tuple[str, subprocess.Popen]:
    """``anomaly serve`` over ``root``, its bound set by the environment as a unit file or a ConfigMap sets it."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}
    env["ANOMALY_LOAD_TIMEOUT"] = str(load_timeout)
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(root),
                             "--port", str(port), "--reload-interval", "1", "--data-dir", str(tmp_path / "data"),
                             *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return f"http://127.0.0.1:{port}", proc


def _ready(url: str, proc: subprocess.Popen, log: Path) -> httpx.Response:
    """The first 200 of /readyz; fails when none comes within PATIENCE (the server is never ready)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            answer = httpx.get(url + "/readyz", timeout=5)
            if answer.status_code == 200:
                return answer
        time.sleep(0.3)
    pytest.fail(f"/readyz never said ready:\n{log.read_text()}")


def _stops(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"SIGTERM did not stop the server:\n{log.read_text()}")


def test_serve_becomes_ready_without_the_stuck_model_and_answers_it_503(models, hung, tmp_path):
    """A real service over a model whose files hang: /readyz stayed 503 ('0 of 2 loaded') for ever, a part for the
    other model waited with it, the log said nothing, and SIGTERM never stopped it. Now it is ready with the model
    that loads, says which is stuck and since when (/readyz, /models, the log), answers a part for the stuck one
    503 model_stuck at once, and stops when told."""
    hang_at_start_up(models, "b", hung)
    log = tmp_path / "server.log"
    url, proc = _serve(models, tmp_path, 2)
    try:
        ready = _ready(url, proc, log).json()
        assert ready["models"] == ["a"] and set(ready["stuck"]) == {"b"} and "b" in ready["errors"]
        listed = httpx.get(url + "/models", timeout=30).json()
        assert [m["name"] for m in listed["models"]] == ["a"] and listed["stuck"] == ready["stuck"]
        photo = png_bytes(textured_part(np.random.default_rng(3)))
        good = httpx.post(url + "/score?model=a", files={"file": ("p.png", photo)}, timeout=60)
        assert good.status_code == 200
        stuck = httpx.post(url + "/score?model=b", files={"file": ("p.png", photo)}, timeout=60)
        assert stuck.status_code == 503 and stuck.json()["error"] == "model_stuck"
        assert ready["stuck"]["b"] in stuck.json()["detail"] and "Retry-After" in stuck.headers
        again = httpx.post(url + "/models/b/reload", timeout=60)
        assert again.status_code == 503 and again.json()["error"] == "model_stuck"
        assert httpx.post(url + "/models/reload", timeout=60).status_code == 200  # the re-scan does not wait on it
        assert 'anomaly_model_load_failed{model="b"} 1.0' in httpx.get(url + "/metrics", timeout=30).text
        text = log.read_text()
        assert "model 'b' is stuck: its files have not answered since" in text
    finally:
        _stops(proc, log)


def test_serve_stops_while_a_model_hangs_its_start_up_load(models, hung, tmp_path):
    """SIGTERM while the start-up loading waited on a file that never answers: the stop waited on the loading, for
    ever. Now it stops, the load left on its own thread, even with a bound far longer than the stop may take."""
    hang_at_start_up(models, "a", hung)
    log = tmp_path / "server.log"
    url, proc = _serve(models, tmp_path, 3600)
    try:
        deadline = time.monotonic() + PATIENCE
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        answer = httpx.get(url + "/readyz", timeout=30)
        assert answer.status_code == 503 and answer.json()["reason"].startswith("loading the models at start-up")
    finally:
        _stops(proc, log)
    assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_scoring_does_not_wait_on_a_stored_picture_that_hangs(model_dir, hung, tmp_path):
    """A stored photo on a share that stops answering (a FIFO in its place): each request for it held a thread of the
    server's shared pool for ever, its client long gone, and once a page's requests had taken them all, a part sent
    for scoring got no answer (its upload's header is read on that pool). Now the pictures are read on threads of
    their own, a few at a time, each request answered 503 records_unavailable at its deadline, and scoring goes on."""
    root = tmp_path / "models"
    shutil.copytree(model_dir / "part", root / "a")
    log = tmp_path / "server.log"
    # a picture request waits --records-timeout: short here, as the loads wait BOUND (the default is not at issue)
    url, proc = _serve(root, tmp_path, BOUND, "--keep-images", "all", "--records-timeout", "2")
    try:
        _ready(url, proc, log)
        photo = png_bytes(textured_part(np.random.default_rng(5)))
        first = httpx.post(url + "/score?model=a", files={"file": ("p.png", photo)}, timeout=60)
        assert first.status_code == 200
        inspection = first.json()["inspection_id"]
        # its record written (the writer looks at its pictures once more then: a FIFO there before is written anew)
        eventually(lambda: httpx.get(f"{url}/inspections/{inspection}", timeout=30).status_code == 200)
        for picture in (tmp_path / "data" / "files").rglob("*.png"):
            hung(picture)

        def ask() -> None:  # a page's request for the picture, whose client gives up
            with contextlib.suppress(httpx.TimeoutException):
                httpx.get(f"{url}/inspections/{inspection}/image", timeout=1)

        askers = [threading.Thread(target=ask) for _ in range(48)]  # more than the shared pool has threads
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        other = png_bytes(textured_part(np.random.default_rng(6)))
        scored = httpx.post(url + "/score?model=a", files={"file": ("q.png", other)}, timeout=PATIENCE)
        assert scored.status_code == 200
        answer = httpx.get(f"{url}/inspections/{inspection}/image", timeout=PATIENCE)
        assert answer.status_code == 503 and answer.json()["error"] == "records_unavailable"
        assert "stored pictures" in answer.json()["detail"]
    finally:
        _stops(proc, log)
