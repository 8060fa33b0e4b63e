"""Against a real ``anomaly serve`` process on a free loopback port: end to end, and fuzzed from its OpenAPI schema."""

import glob
import os
import platform
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from conftest import add_defect, eventually, launch_server, png_bytes, stop_server, textured_part


def test_real_server_scores_like_the_library(server, fitted_model):
    url, proc = server
    bad, _ = add_defect(textured_part(np.random.default_rng(3)), 50, 70)
    r = httpx.post(f"{url}/score", params={"heatmap": "overlay"}, files={"file": ("bad.png", png_bytes(bad))},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score"] == pytest.approx(fitted_model.score(bad).score, rel=1e-5)
    assert body["is_anomaly"] and body["heatmap"]["kind"] == "overlay"
    assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "anomaly"
    assert "anomaly_decisions_total" in httpx.get(f"{url}/metrics").text
    assert proc.poll() is None


def test_the_metrics_show_the_servers_own_memory_files_threads_and_python(server):
    """A plant that watches a line for months wants the service's memory, open files, CPU time and threads on its
    Prometheus without a node exporter: the scrape carries them under their standard names, read from the server's
    own process (its start time is the one /proc gives from outside), once each, and the Python it runs."""
    url, proc = server
    text = httpx.get(f"{url}/metrics", timeout=60).text
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    values = dict(samples)
    assert len(values) == len(samples)  # no series twice
    assert float(values["process_resident_memory_bytes"]) > 0 and float(values["process_open_fds"]) > 0
    assert float(values["process_threads"]) >= 2  # the event loop's and the inference workers' at least
    assert float(values["process_cpu_seconds_total"]) > 0 and float(values["process_max_fds"]) > 0
    stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    started = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    assert float(values["process_start_time_seconds"]) == pytest.approx(started, abs=0.01)
    [python] = [name for name in values if name.startswith("python_info{")]
    assert f'version="{platform.python_version()}"' in python  # the server runs this interpreter
    assert 'python_gc_collections_total{generation="0"}' in values


def test_service_logs_at_its_default_level(server):
    """The service's own lines show at the default --log-level info, with the auth warning when no key is set."""
    _, proc = server
    log = proc.log_path.read_text()
    assert "serving 1 model(s)" in log and "model part loaded" in log
    assert "no API key set" in log and "DNS rebinding" in log  # the default answers any host


def test_openapi_fuzz_never_5xx(server):
    """Schema-driven fuzzing of every operation (random files, names, parameters): refuse, never fail.

    Driven with hypothesis directly (schemathesis' pytest plugin does not support this pytest yet)."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(f"{server[0]}/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /score", "POST /score/image", "POST /score/batch", "GET /models", "GET /models/{name}",
        "POST /models/reload", "POST /models/{name}/reload", "GET /healthz", "GET /readyz", "GET /metrics",
        "GET /inspections", "GET /inspections/stats", "GET /inspections/{inspection_id}",
        "POST /inspections/{inspection_id}/review", "GET /inspections/{inspection_id}/image",
        "GET /inspections/{inspection_id}/heatmap.png", "GET /inspections/{inspection_id}/overlay.png"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        fuzz()
    assert httpx.get(f"{server[0]}/readyz").status_code == 200  # and it still serves
    seen: dict[str, float] = {}
    for line in httpx.get(f"{server[0]}/metrics").text.splitlines():
        if line.startswith("anomaly_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            route = labels.split('route="')[1].split('"')[0]
            seen[route] = seen.get(route, 0) + float(value)
    assert seen.get("/score", 0) >= 10 and seen.get("/score/batch", 0) >= 10, seen  # the fuzzer really ran


def test_the_access_log_never_shows_a_picture_links_token():
    """A view token opens an inspection's pictures with no API key; access logs are shipped and read widely."""
    import logging

    from anomaly_service.api.server import RedactTokens, log_config, uvicorn_options
    from anomaly_service.settings import ServiceSettings

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("10.0.0.7:5050", "GET", "/inspections/abc/overlay.png?token=s3cr3t&x=1", "1.1", 200),
                               None)
    assert RedactTokens().filter(record)
    line = record.getMessage()
    assert "s3cr3t" not in line and "token=REDACTED&x=1" in line and "/inspections/abc/overlay.png" in line
    for spelled in ("%74oken", "t%6Fken", "token"):  # the server decodes the name: so does the log's filter
        assert RedactTokens.redact(f"/i/x/image?a=1&{spelled}=s3cr3t") == f"/i/x/image?a=1&{spelled}=REDACTED"
    assert RedactTokens.redact("/inspections?tokens=3") == "/inspections?tokens=3"
    config = uvicorn_options(ServiceSettings())["log_config"]
    assert config == log_config() and config["handlers"]["access"]["filters"] == ["tokens", "record"]
    assert config["filters"]["tokens"]["()"] is RedactTokens


def test_an_upload_the_full_temporary_directory_does_not_take_is_507_and_small_ones_still_score(
        model_dir, tmp_path, monkeypatch):
    """Uploads over 1 MiB are spooled to $TMPDIR (a tmpfs in docker-compose.yml). With it full, every large upload
    was 400 "There was an error parsing the body", as if the client's body were malformed: it is 507 in the error
    shape, a photo small enough for memory still scores, and large ones score again once there is room."""
    import os

    from conftest import fill, launch_server, mounted

    rng = np.random.default_rng(7)
    big = png_bytes(textured_part(rng, 720, 720), format="BMP")  # 1.5 MB: over the 1 MiB held in memory
    small = png_bytes(textured_part(rng))
    with mounted(tmp_path / "tmp", "4m") as tmp:
        monkeypatch.setenv("TMPDIR", str(tmp))
        url, proc = launch_server(model_dir, tmp_path / "server.log")
        try:
            filler = fill(tmp)
            os.truncate(filler, filler.stat().st_size - 64 * 1024)  # room for a probe, not for a photo
            for path, files in (("/score", {"file": ("big.bmp", big)}),
                                ("/score/batch", [("files", ("big.bmp", big)), ("files", ("s.png", small))]),
                                ("/models/part/update", {"files": ("big.bmp", big)})):
                r = httpx.post(url + path, files=files, timeout=60)
                assert r.status_code == 507, (path, r.text)
                assert r.json()["error"] == "insufficient_storage" and str(tmp) in r.json()["detail"]
            assert httpx.post(url + "/score", files={"file": ("s.png", small)}, timeout=60).status_code == 200
            filler.unlink()
            assert httpx.post(url + "/score", files={"file": ("big.bmp", big)}, timeout=60).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_an_upload_with_no_usable_temporary_directory_at_all_is_503_not_500(tmp_path):
    """With every directory ``tempfile`` tries read-only (TMPDIR, /tmp, /var/tmp, the working directory), the
    spool's error was answered by :func:`spool_failed`, which called ``gettempdir`` to name the directory and
    raised the same error again: a 500. Run in a private mount namespace, so the machine's own /tmp is untouched."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    probe = ("import tempfile\n"
             "from anomaly_service.api.multipart import spool_failed\n"
             "try:\n"
             "    tempfile.SpooledTemporaryFile(max_size=1).write(b'xx')\n"
             "except OSError as exc:\n"
             "    answer = spool_failed(exc)\n"
             "    print(answer.status_code, answer.detail)\n")
    # read-only binds of the directories onto themselves, not empty file systems over them: a checkout (its venv's
    # interpreter, the package) under /tmp stays readable, where a tmpfs hid it and the probe could not start
    mounts = " && ".join(f"mount --bind {d} {d} && mount -o remount,ro,bind {d}" for d in ("/tmp", "/var/tmp")
                         if Path(d).is_dir())
    script = f"{mounts} && cd /tmp && env -u TMPDIR -u TEMP -u TMP {sys.executable} -c \"$PROBE\""
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env={**os.environ, "PROBE": probe}, timeout=120)
    if done.returncode != 0 and "mount" in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    status, detail = done.stdout.strip().split(" ", 1)
    assert status == "503" and "none usable" in detail, done.stdout


@pytest.fixture(scope="module")
def text_served(server_with, tmp_path_factory):
    """One recording service with text log lines for the access line tests below, each of which looks only at the
    lines and records of its own calls: a server start is seconds of a suite that has fifteen minutes."""
    data = tmp_path_factory.mktemp("text-served") / "data"
    url, proc = server_with("--data-dir", str(data))
    return url, proc, data


@pytest.fixture(scope="module")
def json_served(server_with, tmp_path_factory):
    """The same with --log-format json."""
    url, proc = server_with("--log-format", "json", "--data-dir", str(tmp_path_factory.mktemp("json-served") / "data"))
    return url, proc


def test_the_access_line_names_the_record_its_answer_made(text_served):
    """The on-call engineer has the access line of the part a client complains about: it names the inspection its
    answer recorded (the answer's X-Inspection-Id), so the line leads to the record, and a refusal's error code.
    Before, nothing tied the line to its record, and a 400 did not say why."""
    url, proc, _ = text_served
    part = png_bytes(textured_part(np.random.default_rng(5)))
    scored = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, timeout=30)
    refused = httpx.post(f"{url}/score", files={"file": ("p.png", b"not an image")}, timeout=30)
    assert scored.status_code == 200 and refused.status_code == 415
    record = scored.headers["x-inspection-id"]
    lines = proc.log_path.read_text().splitlines()
    assert [line for line in lines if '"POST /score HTTP/1.1" 200 OK request_id=' in line
            and line.endswith(f" inspection={record}")], lines
    # a refused answer names its error code: the status alone did not tell a photo that is no image from a bad field
    assert [line for line in lines if '"POST /score HTTP/1.1" 415 Unsupported Media Type request_id=' in line
            and line.endswith(" error=not_image")], lines
    assert refused.json()["error"] == "not_image"  # the answer itself is unchanged by the held start


def test_json_log_lines_for_a_log_aggregator(json_served):
    """--log-format json: every line of the log, uvicorn's and the service's, is one JSON object; an access line
    has its fields and the record its answer made, and the view token stays redacted."""
    import json

    url, proc = json_served
    part = png_bytes(textured_part(np.random.default_rng(6)))
    scored = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, headers={"X-Request-ID": "json-1"},
                        timeout=30)
    assert scored.status_code == 200
    record = scored.headers["x-inspection-id"]
    bad_meta = httpx.post(f"{url}/score", params={"meta": "[1"}, files={"file": ("p.png", part)},
                          headers={"X-Request-ID": "json-2"}, timeout=30)
    assert bad_meta.status_code == 422 and bad_meta.json()["error"] == "invalid_meta"
    httpx.get(f"{url}/inspections/{record}/image", params={"token": "s3cr3t-view-token"}, timeout=30)
    text = proc.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # fails on any line that is not JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "anomaly_service.api.lifecycle" and "serving 1 model(s)" in line["message"]
               and line["level"] == "info" for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line["method"] == "POST"
              and line["request_id"] in ("json-1", "json-2")]  # this test's calls
    assert access[0] == {**access[0], "path": "/score", "status": 200, "inspection_id": record, "error": None}
    assert access[1] == {**access[1], "path": "/score?meta=%5B1", "status": 422, "inspection_id": None,
                         "error": "invalid_meta"}, access
    assert "s3cr3t-view-token" not in text
    assert any(line.get("path", "").endswith("/image?token=REDACTED") for line in lines)


def test_a_request_id_is_shared_by_the_clients_logs_and_the_access_line(json_served):
    """An MES logs its calls under its own ids, and the access line named none: a complaint about one call could
    only be matched by time. A client's X-Request-ID is echoed in the answer and written in its access line; without
    one the service makes one; a malformed one is refused before anything is scored."""
    import json
    import time
    import uuid

    url, proc = json_served
    logged = len(proc.log_path.read_text().splitlines())  # the lines before this test's calls
    part = png_bytes(textured_part(np.random.default_rng(8)))
    scored = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, headers={"X-Request-ID": "MES-4711/a:b"},
                        timeout=30)
    assert scored.status_code == 200 and scored.headers["x-request-id"] == "MES-4711/a:b"
    made = httpx.get(f"{url}/models", timeout=30).headers["x-request-id"]
    assert str(uuid.UUID(made)) == made  # none given: the service's own, a UUID
    longest = "~!" * 64  # the longest id taken
    assert httpx.get(f"{url}/healthz", headers={"X-Request-ID": longest}, timeout=30).headers["x-request-id"] == longest
    limit = httpx.post(f"{url}/score", content=b"x" * (25 * 2**20), headers={"X-Request-ID": "MES-4712",
                       "Content-Type": "multipart/form-data; boundary=b"}, timeout=30)
    assert limit.status_code == 413 and limit.headers["x-request-id"] == "MES-4712"  # a layer below the routes
    for bad in ("two words", "x" * 129, "caf\u00e9"):
        refused = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, timeout=30,
                             headers=[("X-Request-ID", bad.encode("utf-8"))])
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_request_id", refused.text
        assert uuid.UUID(refused.headers["x-request-id"])  # the answer still carries an id, the service's
        assert "X-Request-ID must be" in refused.json()["detail"]
    twice = httpx.get(f"{url}/models", headers=[("X-Request-ID", "a"), ("X-Request-ID", "b")], timeout=30)
    assert twice.status_code == 400 and "2 X-Request-ID headers" in twice.json()["detail"]
    lines = [json.loads(line) for line in proc.log_path.read_text().splitlines()[logged:]]
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line["path"] != "/readyz"]
    assert access[0] == {**access[0], "method": "POST", "status": 200, "request_id": "MES-4711/a:b",
                         "inspection_id": scored.headers["x-inspection-id"]}, access[0]
    assert {"path": "/models", "request_id": made}.items() <= access[1].items()
    assert {"path": "/healthz", "request_id": longest}.items() <= access[2].items()
    assert {"status": 413, "request_id": "MES-4712", "error": "too_large"}.items() <= access[3].items()
    assert [line["error"] for line in access[4:]] == ["invalid_request_id"] * 4
    deadline, recorded = time.time() + 20, []
    while scored.headers["x-inspection-id"] not in recorded and time.time() < deadline:  # written after the answer
        recorded = [i["id"] for i in httpx.get(f"{url}/inspections", timeout=30).json()["items"]
                    if not i["request_id"].startswith("json-")]  # the other test's calls on this service
        time.sleep(0.2)
    assert recorded == [scored.headers["x-inspection-id"]]  # the refused requests scored nothing


def test_a_record_keeps_the_x_request_id_of_the_call_that_scored_it(text_served):
    """Months after a part, an integrator's log names the call (its X-Request-ID) and the answer it got; the
    service's access lines that tied the id to the record are rotated away long before. The record keeps the id,
    it is a filter of the list, and the export carries it; a call without one records the id the service made."""
    import json
    import time

    from click.testing import CliRunner

    from anomaly_service.cli import app as cli

    url, _, data = text_served
    part = png_bytes(textured_part(np.random.default_rng(9)))
    given = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, params={"part_id": "SN-77"},
                       headers={"X-Request-ID": "MES-4711/a:b"}, timeout=30)
    made = httpx.post(f"{url}/score", files={"file": ("p.png", part)}, timeout=30)
    batch = httpx.post(f"{url}/score/batch", files=[("files", ("a.png", part)), ("files", ("b.png", part))],
                       headers={"X-Request-ID": "MES-4712"}, timeout=30)
    assert given.status_code == made.status_code == batch.status_code == 200
    ids = [given.headers["x-inspection-id"], made.headers["x-inspection-id"],
           *(r["result"]["inspection_id"] for r in batch.json()["results"])]
    deadline, items = time.time() + 20, []
    while len(items) < 4 and time.time() < deadline:  # the records are written a moment after the answers
        items = [i for i in httpx.get(f"{url}/inspections", timeout=30).json()["items"] if i["id"] in ids]
        time.sleep(0.2)
    by_id = {i["id"]: i["request_id"] for i in items}
    assert by_id == {ids[0]: "MES-4711/a:b", ids[1]: made.headers["x-request-id"], ids[2]: "MES-4712",
                     ids[3]: "MES-4712"}
    one = httpx.get(f"{url}/inspections/{ids[0]}", timeout=30).json()
    assert (one["request_id"], one["part_id"]) == ("MES-4711/a:b", "SN-77")
    found = httpx.get(f"{url}/inspections", params={"request_id": "MES-4712"}, timeout=30).json()["items"]
    assert sorted(i["id"] for i in found) == sorted(ids[2:])
    assert httpx.get(f"{url}/inspections", params={"request_id": "nope"}, timeout=30).json()["items"] == []
    r = CliRunner().invoke(cli, ["records", "export", "--data-dir", str(data), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    assert {x["id"]: x["request_id"] for x in map(json.loads, r.stdout.splitlines()) if x["id"] in ids} == by_id


def test_the_text_access_line_names_the_request_id(text_served):
    url, proc, _ = text_served
    assert httpx.get(f"{url}/models/nope", headers={"X-Request-ID": "PLC-7"}, timeout=30).status_code == 404
    lines = proc.log_path.read_text().splitlines()
    assert [line for line in lines if line.endswith('"GET /models/nope HTTP/1.1" 404 Not Found request_id=PLC-7 '
                                                   'error=unknown_model')], lines


def test_a_model_corrupted_on_disk_is_one_error_line_naming_the_version_that_keeps_serving(model_dir, tmp_path):
    """A model file damaged on disk and then re-scanned (the watcher) or reloaded on request: one error line per
    attempt, naming the model, the file and the version still served. The watcher said it twice (an error and an
    info line of the same failure), and a reload on request logged nothing but its access line."""
    import shutil
    import signal
    import time

    from conftest import launch_server

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    url, proc = launch_server(models, tmp_path / "server.log", "--reload-interval", "0.5")
    try:
        version = httpx.get(f"{url}/models/part", timeout=30).json()["summary"]["version"]
        index = next((models / "part").glob("index.*"))
        index.write_bytes(index.read_bytes()[:100])  # truncated in place
        def logged(text: str) -> None:
            deadline = time.monotonic() + 30
            while text not in proc.log_path.read_text():
                assert time.monotonic() < deadline, f"no {text!r} in the log"
                time.sleep(0.1)

        logged("not reloaded")
        # more re-scans, each seen to have run: a broken model added after the last line is one a later re-scan
        # listed, and it looked at the damaged model's unchanged files too (a failure is not retried until the files
        # change again, so no second line of it may come)
        for other in ("zy", "zz"):
            (models / other).mkdir()
            (models / other / "manifest.json").write_text("{")
            logged(f"model {other} not reloaded")
        asked = httpx.post(f"{url}/models/part/reload", timeout=30)
        assert asked.status_code == 422
        assert httpx.get(f"{url}/readyz", timeout=30).json()["models"] == ["part"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lines = [line for line in proc.log_path.read_text().splitlines() if "part" in line and index.name in line]
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: model part not reloaded, ") and lines[1].startswith(
        "error: model part not reloaded on request, ")
    assert all(f"version {version} keeps serving" in line and "truncated" in line for line in lines), lines


def test_a_drift_alarm_is_one_log_line_and_not_said_cleared_when_the_model_is_loaded_anew(fitted_model, tmp_path):
    """The drift alarm was a gauge and a banner only: the log, all the on-call engineer may have, never said it.
    Rising, it is one warning (however many scrapes see it), naming the model, its version and what moved.

    A model loaded anew as another version (an update, a rollback, a re-fit) starts its drift window empty, so its
    alarm drops: the log said 'drift alarm ... cleared', as if the parts had come back, before any part of the new
    load was seen. It says the window restarted; the alarm rises again if the parts still differ.

    The update (sharing this server) also sends copies of its photo: the service's log said nothing of the images an
    HTTP update skipped as exact duplicates (the command line's filter of what it restates applied to `serve`,
    which restates nothing), and the line, once said, named every one: it names the first few and how many more,
    as the fit's and the update's other messages do (training_set.listing). So does the line of the photos left
    out as unlike the fit's (here far smaller): it named every one with its reason, a line of kilobytes in the
    service's log for an update of a new camera's photos (review of session 63, docs/decisions.md)."""
    import signal

    from conftest import launch_server

    fitted_model.save(tmp_path / "models" / "part")
    url, proc = launch_server(tmp_path / "models", tmp_path / "server.log", "--drift-window", "10",
                              "--drift-min-parts", "8", "--record", "false")
    try:
        rng = np.random.default_rng(11)
        for _ in range(10):  # another part entirely: noise, not the textured parts the model learnt
            noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            assert httpx.post(f"{url}/score", files={"file": ("n.png", png_bytes(noise))}, timeout=30).is_success
        for _ in range(3):
            assert 'anomaly_drift_alarm{model="part"} 1.0' in httpx.get(f"{url}/metrics", timeout=30).text
        assert httpx.get(f"{url}/models/part/drift", timeout=30).json()["alarm"]
        lines = [line for line in proc.log_path.read_text().splitlines() if "drift alarm" in line]
        assert len(lines) == 1, lines
        version = httpx.get(f"{url}/models/part", timeout=30).json()["summary"]["version"]
        assert lines[0].startswith(f"warning: drift alarm on model part (version {version}): the "), lines
        assert "last 10 parts" in lines[0] and "/models/part/drift" in lines[0]
        good = png_bytes(textured_part(rng))
        copies = [("files", (f"copy{i}.png", good)) for i in range(7)]
        small = [("files", (f"small{i}.png", png_bytes(textured_part(rng, 40, 40)))) for i in range(7)]
        updated = httpx.post(f"{url}/models/part/update", files=[("files", ("g.png", good)), *copies, *small],
                             timeout=120)
        assert updated.is_success and len(updated.json()["duplicates"]) == 7, updated.text
        assert len(updated.json()["not_added"]) == 7, updated.text  # the answer lists them all
        assert 'anomaly_drift_alarm{model="part"} 0.0' in httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    (skipped,) = [line for line in proc.log_path.read_text().splitlines() if "duplicate" in line]
    assert skipped == ("warning: update: 7 exact duplicate image(s) skipped: copy0.png repeats g.png; copy1.png "
                       "repeats g.png; copy2.png repeats g.png; copy3.png repeats g.png; copy4.png repeats g.png; "
                       "and 2 more"), skipped
    (unlike,) = [line for line in proc.log_path.read_text().splitlines() if "not added, unlike" in line]
    assert unlike.startswith("warning: update: 7 good image(s) not added, unlike the photos the model was fitted "
                             "on: small0.png: "), unlike
    assert unlike.endswith("; and 2 more") and "small4.png: " in unlike and "small5.png" not in unlike, unlike
    lines = [line for line in proc.log_path.read_text().splitlines() if "drift alarm" in line]
    assert len(lines) == 2 and lines[0].startswith("warning: drift alarm on model part"), lines
    assert "cleared" not in lines[1] and "window starts empty" in lines[1], lines


def test_a_json_lines_traceback_stays_in_its_line():
    """A fault of the service logs its traceback: in JSON lines it is the line's ``exception``, one event for
    the aggregator, not a line per frame."""
    import io
    import json
    import logging

    from anomaly_service.api.logs import JsonLines

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("anomaly_service.test_json_lines")
    logger.addHandler(handler)
    try:
        try:
            {}["missing"]
        except KeyError:
            logger.exception("model %s failed to load", "part")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["level"] == "error" and line["message"] == "model part failed to load"
    assert line["exception"].startswith("Traceback") and "KeyError: 'missing'" in line["exception"]


def test_a_python_warning_is_a_json_line_too():
    """A library's ``warnings.warn`` under ``--log-format json`` went to stderr as Python's two plain lines, which
    an aggregator reading JSON lines could not parse. Run as ``anomaly serve`` sets the logs up: the CLI group's
    handler, then JSON lines."""
    import json
    import subprocess
    import sys

    code = ("import logging, warnings\n"
            "from anomaly_service.cli.group import app\n"
            "from anomaly_service.api.logs import use_json_lines\n"
            "app.callback(verbose=False)\n"
            "use_json_lines()\n"
            "warnings.warn('a library is unhappy', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    assert [line["level"] for line in lines] == ["warning"] and "a library is unhappy" in lines[0]["message"]
    assert lines[0]["logger"] == "py.warnings"


def test_a_log_call_whose_arguments_do_not_fit_its_message_is_one_json_line(model_dir, tmp_path):
    """A log call with the wrong %-arguments (``%d`` given a text, one argument too few): logging's handleError
    wrote "--- Logging error ---" and a traceback over many plain lines to stderr, in the middle of the JSON lines
    an aggregator parses. Run by the real ``anomaly serve --log-format json``, both for the service's handler and
    for uvicorn's, each is one line: an error naming the template, its arguments and what went wrong.

    Its model directory is named in another code page (a byte UTF-8 cannot decode): the start-up line names it, and
    JSON lines wrote the byte as a lone surrogate escape, which a strict parser (serde's, a Rust aggregator's)
    refuses and a lenient one makes U+FFFD. The byte is written as \\xe8."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    models = Path(os.fsdecode(bytes(tmp_path) + b"/mod\xe8les"))
    shutil.copytree(model_dir, models)
    code = ("import logging, os, signal, sys, threading, time, urllib.request\n"
            "from anomaly_service.cli.group import main\n"
            "def later():\n"
            "    for _ in range(600):\n"
            "        try:\n"
            f"            urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=1)\n"  # 503 raises: loaded
            "            break\n"
            "        except OSError:\n"
            "            time.sleep(0.1)\n"
            "    logging.getLogger('anomaly_service.somewhere').warning('%d parts on line %s', 'seven')\n"
            "    logging.getLogger('uvicorn.error').info('%s and %s', 1)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "threading.Thread(target=later, daemon=True).start()\n"
            f"sys.argv = ['anomaly', 'serve', '--model-dir', os.fsdecode({bytes(models)!r}), '--port', '{port}',\n"
            "            '--log-format', 'json', '--record', 'false']\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # fails on any line that is not JSON
    assert any(line["message"].startswith("Uvicorn running") for line in lines), proc.stderr
    errors = [line for line in lines if "logging_error" in line]
    assert [(e["logger"], e["level"], e["logged_level"], e["message"], e["arguments"]) for e in errors] == [
        ("anomaly_service.somewhere", "error", "warning", "%d parts on line %s", "('seven',)"),
        ("uvicorn.error", "error", "info", "%s and %s", "(1,)")], errors
    assert "a real number is required" in errors[0]["logging_error"]
    assert "not enough arguments" in errors[1]["logging_error"]
    assert all(e["source"].endswith(f"<string>:{n}") for e, n in zip(errors, (10, 11))), errors
    [serving] = [line["message"] for line in lines if line["message"].startswith("serving 1 model(s)")]
    serving.encode("utf-8")  # raised on the lone surrogate
    assert "mod\\xe8les" in serving, serving


def test_a_service_whose_clock_steps_a_year_forward_keeps_its_pictures(model_dir, tmp_path, monkeypatch):
    """A real clock step under a running service (libfaketime: the wall clock the service reads moves a year
    ahead, its monotonic clock does not, as when a wrong time server steps the host's clock). The next retention
    pass removed every picture, of parts scored a second before; they are kept, and the log says why."""
    lib = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), None)
    if lib is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    for name, value in (("LD_PRELOAD", lib), ("FAKETIME_TIMESTAMP_FILE", str(offset)), ("FAKETIME_NO_CACHE", "1"),
                        ("FAKETIME_DONT_FAKE_MONOTONIC", "1")):
        monkeypatch.setenv(name, value)
    url, proc = launch_server(model_dir, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"),
                              "--keep-images", "all", "--retention-days", "30", "--retention-interval", "0.5")
    try:
        ids = []
        for seed in (0, 1):
            photo = png_bytes(textured_part(np.random.default_rng(seed)))
            r = httpx.post(f"{url}/score", files={"file": ("p.png", photo)}, timeout=60)
            assert r.status_code == 200, r.text
            ids.append(r.json()["inspection_id"])
        deadline = time.monotonic() + 30
        while any(httpx.get(f"{url}/inspections/{i}").status_code != 200 for i in ids):  # written, pictures kept
            assert time.monotonic() < deadline, "the records were not written"
            time.sleep(0.2)
        # a pass says the step before it counts ages: a second step, said by a later pass, shows that the pass
        # after the first has run whole, with the clock a year ahead
        for said, step in enumerate(("+365d", "+730d"), 1):
            offset.write_text(f"{step}\n")
            deadline = time.monotonic() + 30
            while proc.log_path.read_text().count("clock stepped forward") < said:
                assert time.monotonic() < deadline, f"the step to {step} was not said"
                time.sleep(0.1)
        for inspection_id in ids:
            assert httpx.get(f"{url}/inspections/{inspection_id}").json()["files_state"] == "stored"
            assert httpx.get(f"{url}/inspections/{inspection_id}/image").status_code == 200
        assert "clock stepped forward" in proc.log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_webp_past_pillows_pixel_limit_within_ours_is_scored(model_dir, tmp_path, monkeypatch):
    """WebP's opener makes Pillow's pixel check itself, which reading past Pillow's check at the header does not
    reach: a WebP within --max-pixels and past Pillow's limit was answered 413 `too_large`, "exceeds the limit of
    40000000 pixels", a limit it was within. The service's process is its own: it raises Pillow's limit to its
    --max-pixels at start. Pillow's limit is lowered here (a sitecustomize of the server's process) to reach it with
    a 128 px photo."""
    import io

    from PIL import Image

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import PIL.Image\nPIL.Image.MAX_IMAGE_PIXELS = 1000\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    url, proc = launch_server(model_dir, tmp_path / "server.log", "--record", "false")
    try:
        buf = io.BytesIO()
        Image.fromarray(textured_part(np.random.default_rng(2))).save(buf, "WEBP", lossless=True)
        r = httpx.post(f"{url}/score", files={"file": ("part.webp", buf.getvalue(), "image/webp")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["image_width"] == 128
    finally:
        stop_server(proc, 20)


def test_access_lines_reach_the_log_file_as_requests_come_without_pythonunbuffered(tmp_path, monkeypatch):
    """Python writes stdout to a pipe or file a block at a time: a service whose lines went there by print() showed
    them in ``docker logs`` or the journal only when 8 KB had gathered or it stopped, unless ``PYTHONUNBUFFERED`` was
    set (docker-library/python#604, pypiserver#358). The image sets it; a systemd unit, a supervisor or a shell
    redirect need not. uvicorn's access lines go to stdout through logging, which flushes each line: a request's
    line is in the file while the service still runs, without the variable."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    (tmp_path / "models").mkdir()
    log = tmp_path / "server.log"
    url, proc = launch_server(tmp_path / "models", log, ready="/healthz")
    try:
        assert httpx.get(f"{url}/no-such-route", headers={"X-Request-ID": "line-as-it-came"}).status_code == 404
        eventually(lambda: "line-as-it-came" in log.read_text(), patience=30)
        assert proc.poll() is None
    finally:
        stop_server(proc)
