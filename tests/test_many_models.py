"""A plant's service over many models (one per part type and station): it answers its probes while the models
load, and what each further model costs the process (threads, files) does not grow with their number."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import flock_held_elsewhere, free_port, stop_server

MODELS = 4  # a handful shows what grows per model


@pytest.fixture(scope="module")
def many(model_dir: Path, tmp_path_factory) -> Path:
    """``MODELS`` copies of the session model under names of their own, as a plant's directory holds its variants."""
    root = tmp_path_factory.mktemp("many_models")
    for i in range(MODELS):
        shutil.copytree(model_dir / "part", root / f"station{i}")
    return root


def _serve(root: Path, tmp_path: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    """``anomaly serve`` over ``root`` (no records unless ``flags`` say otherwise: a later flag wins)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(root),
                             "--port", str(port), "--reload-interval", "0", "--record", "false", *flags],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return f"http://127.0.0.1:{port}", proc


def _first_answer(url: str, proc: subprocess.Popen, path: str, log: Path, patience: float = 90) -> httpx.Response:
    """The first answer ``path`` gets from the starting server; fails if none comes within ``patience`` seconds
    (what a container's start-up probe allows) or the server exits."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + path, timeout=5)
        except httpx.TransportError:
            time.sleep(0.3)
    pytest.fail(f"{path} got no answer while the models loaded:\n{log.read_text()}")


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, patience: float = 60) -> None:
    """Return once the server's log holds ``text``; fails if it does not within ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_health_answers_while_the_models_load_and_ready_waits_for_all(many, tmp_path):
    """Forty models took the better part of a minute to load, and the port stayed closed all that time: the
    start-up probe saw refused connections and, with more models or a slower machine, had the service killed
    before it ever served. Here the start-up load is held (a save of one model is between its renames, so the
    service waits for it, as it must): /healthz answers, /readyz says 503 and why, and a request for the models
    made meanwhile waits and gets all of them, not a list of the few loaded so far."""
    root = tmp_path / "models"
    shutil.copytree(many, root)
    (root / ".station0.tmp-held").mkdir()  # what a save under way has beside the model
    with flock_held_elsewhere(root / ".station0.swap-lock"):
        url, proc = _serve(root, tmp_path)
        try:
            health = _first_answer(url, proc, "/healthz", tmp_path / "server.log")
            assert health.status_code == 200
            ready = httpx.get(url + "/readyz", timeout=5)
            assert ready.status_code == 503 and httpx.head(url + "/readyz", timeout=5).status_code == 503
            assert ready.json()["reason"].startswith("loading the models at start-up")
            assert "anomaly_models_loaded" in httpx.get(url + "/metrics", timeout=5).text  # the scrape answers too
            # the log says what the loading waits for: a save that hangs there holds it (alive, never ready)
            _wait_for_line(proc, tmp_path / "server.log", "model station0: a save of it is between its renames")
            listed: dict = {}
            waiting = threading.Thread(target=lambda: listed.update(httpx.get(url + "/models", timeout=120).json()))
            waiting.start()
        except BaseException:
            stop_server(proc)
            raise
    try:  # the save is done: the load goes on
        waiting.join(timeout=120)
        assert sorted(m["name"] for m in listed["models"]) == [f"station{i}" for i in range(MODELS)]
        ready = httpx.get(url + "/readyz", timeout=5)
        assert ready.status_code == 200 and len(ready.json()["models"]) == MODELS
    finally:
        stop_server(proc)


def test_the_key_check_and_the_records_answer_while_the_models_load(many, tmp_path):
    """The API key check and the records need no model, yet both waited for the start-up loading: a client without
    the key got its 401 only once every model was loaded (with a save held, never), and an operator's history and
    review queue stood still as long. Here, with the loading held as above, both answer while /readyz still says
    it loads; a request for a model still waits (the previous test)."""
    root = tmp_path / "models"
    shutil.copytree(many, root)
    (root / ".station0.tmp-held").mkdir()
    key = {"X-API-Key": "line-2-key"}
    with flock_held_elsewhere(root / ".station0.swap-lock"):
        url, proc = _serve(root, tmp_path, "--api-key", key["X-API-Key"], "--record", "true",
                           "--data-dir", str(tmp_path / "data"))
        try:
            assert _first_answer(url, proc, "/healthz", tmp_path / "server.log").status_code == 200
            assert httpx.get(url + "/models", timeout=30).status_code == 401
            assert httpx.post(url + "/models/reload", timeout=30).status_code == 401
            page = httpx.get(url + "/inspections", headers=key, timeout=30)
            assert page.status_code == 200 and page.json()["items"] == []
            assert httpx.get(url + "/inspections/stats", headers=key, timeout=30).status_code == 200
            assert httpx.get(url + "/inspections/1", headers=key, timeout=30).status_code == 404
            # all of it while the models still load
            assert httpx.get(url + "/readyz", timeout=5).json()["reason"].startswith("loading the models at start-up")
        except BaseException:
            proc.kill()  # a stop waits for the load in hand, which waits for the held save
            proc.wait()
            raise
    stop_server(proc)


def test_a_client_that_gives_up_waiting_for_the_loading_gives_its_place_back(many, tmp_path):
    """A request for a model waits for the start-up loading; its client's timeout (and its retry) left it waiting
    all the same, holding one of --limit-concurrency's places until the loading ended (for ever, where a hung save
    holds it): a few clients that gave up filled the limit, and every request after them was refused 503
    overloaded. A client that leaves is now answered 499 at once and its place given back."""
    root = tmp_path / "models"
    shutil.copytree(many, root)
    (root / ".station0.tmp-held").mkdir()
    log = tmp_path / "server.log"
    with flock_held_elsewhere(root / ".station0.swap-lock"):
        url, proc = _serve(root, tmp_path, "--limit-concurrency", "2")
        try:
            assert _first_answer(url, proc, "/healthz", log).status_code == 200
            for _ in range(2):  # clients that give up on the wait
                with pytest.raises(httpx.ReadTimeout):
                    httpx.get(url + "/models", timeout=1)
            deadline = time.monotonic() + 30
            while True:  # the next waits for the loading too, once the server has seen them go: not refused
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    refused = httpx.get(url + "/models", timeout=2)
                except httpx.ReadTimeout:
                    break
                assert refused.status_code == 503 and refused.json()["error"] == "overloaded", refused.text
                time.sleep(0.5)
            assert httpx.get(url + "/readyz", timeout=5).json()["reason"].startswith("loading the models at start-up")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    stop_server(proc)


def _held(pid: int) -> tuple[int, int]:
    """(threads, open files) of process ``pid``."""
    return len(list(Path(f"/proc/{pid}/task").iterdir())), len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_threads_and_open_files_do_not_grow_with_the_models(many, model_dir, tmp_path, rng_images):
    """What each further model costs the process is its memory, not threads or files: the backbone's sessions (and
    their thread pools) are shared by every model of that backbone, and a model's files are closed once read. One
    model and ``MODELS`` copies of it, each scored once, hold the same threads and files; a pool or a file kept per
    model would show ``MODELS - 1`` more (a thread or two of slack for the servers' own worker pools)."""
    from conftest import png_bytes

    photo = png_bytes(rng_images[0])
    held = {}
    for root in (model_dir, many):
        (tmp_path / root.name).mkdir()
        url, proc = _serve(root, tmp_path / root.name)
        try:
            assert _first_answer(url, proc, "/healthz", tmp_path / root.name / "server.log").status_code == 200
            httpx.get(url + "/models", timeout=120)  # waits for the loading
            names = [m["name"] for m in httpx.get(url + "/models", timeout=5).json()["models"]]
            for name in names:
                r = httpx.post(f"{url}/score?model={name}", files={"file": ("p.png", photo, "image/png")}, timeout=60)
                assert r.status_code == 200, r.text
            held[len(names)] = _held(proc.pid)
        finally:
            stop_server(proc)
    (threads_one, files_one), (threads_many, files_many) = held[1], held[MODELS]
    assert threads_many <= threads_one + 1 and files_many <= files_one + 1, held
