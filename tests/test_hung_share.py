"""A model directory on a share that stops answering every call, ``stat`` and listing included (hung_share.py: a
FUSE share held by the test), not only ``open()`` and ``read()`` as a FIFO does (test_stuck_storage.py).

At the code before this file, such a share held the directory's listing: the start-up looked at the directory before
its port opened, a re-scan held the re-scan lock for ever (``POST /models/reload`` and a reload never answered), and
a stop was never done. Now the listing and each model's look run within ``--load-timeout`` as the models' reads do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import pytest

from anomaly_service.registry import ModelRegistry
from anomaly_service.stuck_io import StorageStuck
from conftest import PATIENCE, eventually, free_port, png_bytes, textured_part, within
from hung_share import HungShare, hung_share

BOUND = 1.0  # --load-timeout here: short, so that what does not answer is found quickly
HELD = 30  # seconds a call that must be bounded may take here (the bound is BOUND) before the test says it hangs


def _serve(root: Path, tmp_path: Path) -> tuple[str, subprocess.Popen]:
    """``anomaly serve`` over ``root``, re-scanning every second, within BOUND, recording nothing."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}
    env["ANOMALY_LOAD_TIMEOUT"] = str(BOUND)
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(root),
                                 "--port", str(port), "--reload-interval", "1", "--record", "false",
                                 "--data-dir", str(tmp_path / "data")],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture
def share(models: Path, tmp_path: Path) -> Iterator[HungShare]:
    """``models`` (``a`` and ``b``) served from a share the test can hold; answered and unmounted at the end."""
    with hung_share(models, tmp_path / "share") as mounted:
        yield mounted


def registry(share: HungShare) -> ModelRegistry:
    reg = ModelRegistry(share.mountpoint, device="cpu", runtime="torch", load_timeout=BOUND)
    assert within(reg.load_all) == {"a": "loaded", "b": "loaded"}
    return reg


def refused(fn: Callable[[], object]) -> BaseException | None:
    """What ``fn()`` raised, or None."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None


def test_a_rescan_of_a_directory_that_does_not_answer_is_bounded_and_the_models_serve(share):
    """The whole share stopped answering: the re-scan waited on the directory's stat for ever, holding the re-scan
    lock. Now it gives up on the listing after the bound, says so once, and the loaded models serve from memory; the
    next re-scan does not wait on it again, and once the share answers the directory is read as before."""
    reg = registry(share)
    share.hang()
    assert within(reg.refresh, HELD) == {}
    listing = reg.listing_stuck()
    assert listing is not None and "the model directory is stuck" in str(listing)
    assert reg.names() == ["a", "b"] and reg.get("a").name == "a" and reg.stuck() == {}  # no model is stuck
    assert within(reg.refresh, HELD) == {}  # met again without a wait
    assert isinstance(within(lambda: refused(lambda: reg.model_path("b")), HELD), StorageStuck)  # a reload's look
    shutil.copytree(share.source / "a", share.source / "c")
    share.answer()
    eventually(lambda: reg.listing_stuck() is None and reg.stuck() == {})
    assert within(reg.refresh) == {"c": "loaded"} and reg.names() == ["a", "b", "c"]


def test_one_models_directory_that_does_not_answer_holds_no_other_model(share):
    """Model b's directory stopped answering (every look inside it): the re-scan's look at b hung, and no model was
    looked at after it. Now b is stuck, keeps serving from memory, and a model added beside it is loaded."""
    reg = registry(share)
    share.hang("/b/")
    shutil.copytree(share.source / "a", share.source / "c")
    assert within(reg.refresh, HELD) == {"b": "stuck", "c": "loaded"}
    assert reg.names() == ["a", "b", "c"] and reg.get("b").name == "b" and set(reg.stuck()) == {"b"}
    assert within(reg.refresh, HELD) == {}  # said once
    share.answer()
    eventually(lambda: reg.stuck() == {})
    within(reg.refresh)
    assert reg.names() == ["a", "b", "c"] and reg.errors() == {}



@pytest.mark.parametrize("held", ["/{}/", "/{}/index.faiss"], ids=["directory", "data-file"])
def test_models_whose_storage_hangs_hold_the_start_up_one_bound_not_one_each(share, held):
    """Three models of four on storage that hangs (each one's directory, or only its largest file): the start-up
    looked at them, or loaded them, one after another, each waited for a whole bound before the next began, so the
    healthy model behind them waited three. Now their work runs at once and is given up together, after one bound;
    the healthy one loads, and the changes are those of a start-up as before."""
    slow = 2 * BOUND  # a load over FUSE beside the others must end within it
    for name in ("c", "d"):
        shutil.copytree(share.source / "a", share.source / name)
    share.hang(*(held.format(name) for name in "abc"))
    reg = ModelRegistry(share.mountpoint, device="cpu", runtime="torch", load_timeout=slow)
    assert within(reg.load_all, HELD) == {"a": "stuck", "b": "stuck", "c": "stuck", "d": "loaded"}
    since = sorted(exc.since for exc in reg.stuck().values())
    assert len(since) == 3 and since[-1] - since[0] < slow  # each began before the first was given up
    assert reg.names() == ["d"]
    share.answer()
    eventually(lambda: reg.stuck() == {})
    within(reg.refresh)
    assert reg.names() == ["a", "b", "c", "d"]


def _finished(proc: subprocess.Popen, log: Path) -> float:
    """SIGTERM, and the seconds until the server says its stop is done. The process itself ends only once the share
    answers: a thread waiting on FUSE for a call the file system holds cannot be ended, not even by SIGKILL."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    eventually(lambda: "Finished server process" in log.read_text(), HELD)
    return time.monotonic() - started


def _ends(proc: subprocess.Popen, share: HungShare) -> None:
    """The share answers, then the server is waited for (killed after PATIENCE)."""
    share.answer()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(PATIENCE)


def test_serve_opens_its_port_over_a_directory_that_does_not_answer_and_stops(share, tmp_path):
    """The share hung before the start: ``anomaly serve`` looked at the model directory before its port opened and
    waited there for ever (no /healthz; SIGTERM did not stop it). Now the port opens, /readyz says why it is not
    ready (the directory, since when), ``POST /models/reload`` says the same at once, and SIGTERM stops it."""
    share.hang()
    log = tmp_path / "server.log"
    url, proc = _serve(share.mountpoint, tmp_path)
    try:
        eventually(lambda: _status(url + "/healthz") == 200, 2 * HELD)
        # the start-up loading ends after the bound, and readiness says why it has no model
        eventually(lambda: "the model directory is stuck" in (_ready(url) or ""), HELD)
        assert httpx.get(url + "/readyz", timeout=HELD).status_code == 503
        rescan = httpx.post(url + "/models/reload", timeout=HELD)
        assert rescan.status_code == 503 and rescan.json()["error"] == "model_stuck"
        assert "the model directory is stuck" in rescan.json()["detail"]
        assert _finished(proc, log) < HELD
    finally:
        _ends(proc, share)


def test_serve_keeps_scoring_while_its_directory_does_not_answer(share, tmp_path):
    """The share stopped answering under a running service: a part for a loaded model was scored (it is in memory)
    and the probes answered, but the re-scan held its lock on the directory's stat for ever, so ``POST
    /models/reload`` and a model's reload got no answer. Now each is answered within the bound, the log says it once,
    and the re-scan reads the directory again once it answers. The replica stays ready, and said so and nothing
    else: ``stuck`` lists models, and none was stuck, so on-call saw a healthy replica unless they read its log. Now
    /readyz and GET /models say since when the directory is stuck, /metrics has it, and its alert fires."""
    log = tmp_path / "server.log"
    url, proc = _serve(share.mountpoint, tmp_path)
    try:
        eventually(lambda: _status(url + "/readyz") == 200)
        assert httpx.get(url + "/readyz", timeout=HELD).json()["directory_stuck"] is None
        assert "anomaly_model_directory_stuck 0.0" in httpx.get(url + "/metrics", timeout=HELD).text
        share.hang()
        photo = png_bytes(textured_part(np.random.default_rng(3)))
        assert httpx.post(url + "/score?model=a", files={"file": ("p.png", photo)}, timeout=HELD).status_code == 200
        # the watcher's re-scan finds the directory stuck: the replica stays ready, and says why it reads no change
        eventually(lambda: httpx.get(url + "/readyz", timeout=HELD).json()["directory_stuck"] is not None, HELD)
        ready = httpx.get(url + "/readyz", timeout=HELD)
        assert ready.status_code == 200 and ready.json()["models"] == ["a", "b"] and ready.json()["stuck"] == {}
        listed = httpx.get(url + "/models", timeout=HELD).json()
        assert [m["name"] for m in listed["models"]] == ["a", "b"]
        assert listed["directory_stuck"] == ready.json()["directory_stuck"] and listed["errors"] == {}
        metrics = httpx.get(url + "/metrics", timeout=HELD).text
        assert "anomaly_model_directory_stuck 1.0" in metrics
        rescan = httpx.post(url + "/models/reload", timeout=HELD)
        assert rescan.status_code == 503 and "the model directory is stuck" in rescan.json()["detail"]
        assert ready.json()["directory_stuck"] in rescan.json()["detail"]
        assert httpx.post(url + "/models/b/reload", timeout=HELD).status_code == 503
        assert httpx.post(url + "/score?model=b", files={"file": ("p.png", photo)}, timeout=HELD).status_code == 200
        time.sleep(2 * BOUND)  # the watcher meets it again
        assert log.read_text().count("the model directory is stuck") == 1
        share.answer()
        eventually(lambda: httpx.post(url + "/models/reload", timeout=HELD).status_code == 200)
        assert httpx.get(url + "/readyz", timeout=HELD).json()["directory_stuck"] is None
        assert "anomaly_model_directory_stuck 0.0" in httpx.get(url + "/metrics", timeout=HELD).text
        share.hang()
        assert _finished(proc, log) < HELD
    finally:
        _ends(proc, share)
    if shutil.which("promtool"):  # the provisioned rules on that exposition: the directory's alert, and no other
        from test_alerts import fires_on_scraped, prometheus_rule_file

        fires_on_scraped(shutil.which("promtool"), prometheus_rule_file(tmp_path), metrics,
                         "anomaly-model-directory-stuck", [{"instance": "api:8000"}])


def _status(url: str) -> int | None:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url, timeout=5).status_code
    return None


def _ready(url: str) -> str | None:
    """/readyz's reason (None when ready), within HELD."""
    return httpx.get(url + "/readyz", timeout=HELD).json()["reason"]


def test_an_upload_spooled_where_the_temporary_directory_hangs_holds_that_upload_only(model_dir, tmp_path):
    """The service's temporary directory (TMPDIR) stopped answering: a file part over 1 MiB goes there while it
    arrives. Starlette before 0.47.2 moved it from memory to that file on the event loop (CVE-2025-54121), so the
    one upload froze the whole service: /healthz and every other score timed out. Now that upload waits alone."""
    (tmp_path / "tmp").mkdir()
    with hung_share(tmp_path / "tmp", tmp_path / "share") as share:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}
        env["TMPDIR"] = str(share.mountpoint)
        url = f"http://127.0.0.1:{port}"
        with open(tmp_path / "server.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir",
                                     str(model_dir), "--port", str(port), "--reload-interval", "0", "--record",
                                     "false"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
                return False

            eventually(ready)
            share.hang()
            noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
            large, small = png_bytes(noise), png_bytes(textured_part(np.random.default_rng(1)))
            assert len(large) > 2**20
            with httpx.Client(timeout=2) as stuck:
                with contextlib.suppress(httpx.TimeoutException):  # it waits on the share, as it must
                    stuck.post(f"{url}/score", files={"file": ("large.png", large)})
            with httpx.Client(timeout=HELD / 3) as client:
                assert client.get(f"{url}/healthz").status_code == 200
                assert client.post(f"{url}/score", files={"file": ("small.png", small)}).status_code == 200
        finally:
            _ends(proc, share)
