"""Shared fixtures: synthetic inspection images (no licensed data in the repo) and one small fitted model."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The service keeps pictures only above a floor of free disk space; that floor is tested on its own, against the
# volume as it is (test_records, test_inspections_api). Elsewhere what a test stores must not depend on how full
# the CI machine's disk is. Servers the tests launch inherit this.
os.environ.setdefault("ANOMALY_RETENTION_MIN_FREE_BYTES", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _click_runner_as_in_8_2() -> None:
    """The tests read a command's stdout and stderr apart and its output as both, as click 8.2's CliRunner gives
    them. Before 8.2 (pyproject.toml's range starts at 8.1) the runner wrote stderr into stdout, strictly encoded,
    and kept no stderr of its own: a warning naming a file beyond UTF-8 raised inside the runner, and --json on
    stdout read with the warnings in it. The commands themselves write to a terminal alike under both."""
    import inspect

    from click.testing import CliRunner, Result

    if "mix_stderr" not in inspect.signature(CliRunner.__init__).parameters:
        return
    init = CliRunner.__init__

    def separate(self, *args, mix_stderr: bool = False, **kwargs) -> None:
        init(self, *args, mix_stderr=mix_stderr, **kwargs)

    CliRunner.__init__ = separate
    Result.output = property(lambda r: r.stdout + (r.stderr if r.stderr_bytes is not None else ""))


_click_runner_as_in_8_2()


def pytest_configure(config: pytest.Config) -> None:
    """README's test command splits the suite over two processes (pytest-xdist). Each computes in-process on one
    intra-op thread: torch's default (a thread per core) in both at once puts twice as many OpenMP threads as
    cores on the machine, where each parallel region spins for its slowest thread. Services and commands a test
    starts keep the product's own choice (parallelism.fit_threads_to_cpu_quota)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def process_threads(monkeypatch) -> Iterator[int]:
    """Two intra-op threads (or the process's own count, if more) for a test of how threads are split, budgeted or
    restored: under README's command each test process computes on one, where every such check sees 1 everywhere
    and passes whatever the code did. The package's record of the process's count follows, as
    parallelism.fit_threads_to_cpu_quota sets both in a service."""
    import torch

    from anomaly_service import parallelism

    before = torch.get_num_threads()
    n = max(2, before)
    torch.set_num_threads(n)
    monkeypatch.setattr(parallelism, "_PROCESS_THREADS", n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that take longest first (those marked slow as a whole, then by how many tests they hold), each
    file's own order kept: split over processes file by file, the last file to start sets when the suite ends, and
    one long file started last leaves the other process idle for its whole length (README's command passes
    --no-loadscope-reorder: pytest-xdist would otherwise put the files with most tests first, the real-data file
    of four long tests last)."""
    per_file: dict[str, int] = {}
    for item in items:
        per_file[item.nodeid.split("::")[0]] = per_file.get(item.nodeid.split("::")[0], 0) + 1

    def cost(pair: tuple[int, pytest.Item]) -> tuple[bool, int, int]:
        index, item = pair
        marks = getattr(getattr(item, "module", None), "pytestmark", [])
        module_slow = any(getattr(m, "name", None) == "slow" for m in (marks if isinstance(marks, list) else [marks]))
        return not module_slow, -per_file[item.nodeid.split("::")[0]], index

    items[:] = [item for _, item in sorted(enumerate(items), key=cost)]


# a small, fast model on the offline backbone: what most behaviour tests fit
SMALL = dict(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False)


def write_manifest(model: Path, manifest: dict, sign: bool = True) -> None:
    """Write an edited ``manifest.json`` into ``model``, with its own checksum recomputed (``sign``) as a release
    that wrote such a manifest would: the tests of what the loader validates behind that checksum need it."""
    import json

    from anomaly_service.manifest import DIGEST_KEY, manifest_digest

    manifest = dict(manifest)
    if sign:
        manifest[DIGEST_KEY] = manifest_digest(manifest)
    (Path(model) / "manifest.json").write_text(json.dumps(manifest))


def textured_part(rng: np.random.Generator, height: int = 128, width: int = 128) -> np.ndarray:
    """A 'good part': a periodic machined texture with random phase, lighting and sensor noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * xx / 12.0 + phase) * np.cos(2 * np.pi * yy / 16.0)
    light = rng.uniform(-0.05, 0.05) + 0.1 * (yy / height)
    base = np.clip(stripes + light + rng.normal(0, 0.03, (height, width)), 0, 1)
    rgb = np.stack([base * 0.9, base * 0.8, base * 0.7], axis=-1)
    return (rgb * 255).astype(np.uint8)


def part_on_belt(rng: np.random.Generator, size: int = 128, radius: int = 44) -> np.ndarray:
    """A round 'good part' (the textured surface) lying near the middle of a striped conveyor belt."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size // 2 + rng.integers(-3, 4), size // 2 + rng.integers(-3, 4)
    belt = np.clip(0.25 + 0.05 * np.sin(2 * np.pi * xx / 6.0) + rng.normal(0, 0.02, (size, size)), 0, 1)
    out = (np.stack([belt * 0.5, belt * 0.6, belt * 0.7], axis=-1) * 255).astype(np.uint8)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    out[disc] = textured_part(rng, size, size)[disc]
    return out


SIDE = 96  # the side of board() images


def board(rng: np.random.Generator, lug_at: str = "right") -> np.ndarray:
    """A part with a layout: a dark plate with a bright round lug at its right end (``lug_at="left"``: the same lug,
    moved to the left end; ``"none"``: the lug missing, leaving only plate, whose every patch a good board shows
    too), lit and textured a little differently each time."""
    img = np.full((SIDE, SIDE, 3), 40, np.uint8) + rng.integers(0, 6, (SIDE, SIDE, 3)).astype(np.uint8)
    img[28:68, 8:88] = textured_part(rng, 40, 80) // 2
    if lug_at != "none":
        yy, xx = np.mgrid[0:SIDE, 0:SIDE]
        cx = 74 if lug_at == "right" else 22
        img[(yy - 48) ** 2 + (xx - cx) ** 2 <= 11 ** 2] = (235, 225, 120)
    return img


def add_defect(image: np.ndarray, cy: int, cx: int, radius: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Paint a bright scratch-like blob; returns the image and its ground-truth mask."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius / 2.5)) ** 2 <= 1.0
    out = image.copy()
    out[mask] = (250, 240, 60)
    return out, mask


@pytest.fixture(scope="session")
def rng_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [textured_part(rng) for _ in range(14)]


@pytest.fixture(scope="session")
def fitted_model(rng_images):
    from anomaly_service import AnomalyModel

    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        calibration_fraction=0.25).fit(rng_images)


@pytest.fixture
def synthetic_category(tmp_path: Path) -> Path:
    """A tiny MVTec-layout category on disk: train/good, test/good, test/blob with masks."""
    rng = np.random.default_rng(1)
    root = tmp_path / "part"
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(textured_part(rng)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(4):
        Image.fromarray(textured_part(rng)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(4):
        img, mask = add_defect(textured_part(rng), int(rng.integers(20, 108)), int(rng.integers(20, 108)))
        Image.fromarray(img).save(root / "test/blob" / f"{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


def _session_folder(tmp_path_factory, name: str, variable: str):
    """A temporary folder named in the environment for the whole session (its subprocesses inherit it), the
    variable's earlier value put back after."""
    path = tmp_path_factory.mktemp(name)
    old = os.environ.get(variable)
    os.environ[variable] = str(path)
    yield path
    if old is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = old


@pytest.fixture(scope="session", autouse=True)
def records_data_dir(tmp_path_factory) -> Path:
    """Recording is on by default: every service a test starts (in-process or ``anomaly serve``) records under a
    temporary data directory, never under ./data of the checkout."""
    yield from _session_folder(tmp_path_factory, "records", "ANOMALY_DATA_DIR")


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory) -> Path:
    """The backbone graphs the suite's processes export are kept for the session's later ones (graph_cache.py),
    under a temporary folder, never in the home of whoever runs the tests."""
    yield from _session_folder(tmp_path_factory, "graph-cache", "ANOMALY_CACHE_DIR")


PG_USER = "anomaly-pg"  # PostgreSQL refuses to run as root (CI runs as root): the test cluster runs as this user


def _postgres_bindir() -> Path | None:
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster on a free loopback port for this test session; yields its base URL
    (``postgresql+psycopg://postgres@127.0.0.1:PORT``). Skipped only where PostgreSQL is not installed, and
    never under CI=true (README's test command installs it)."""
    import shutil
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (README's test command installs it with apt-get)")
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="anomaly-pg-"))
    run_as: dict = {}
    if os.geteuid() == 0:
        import pwd

        said = ""
        for _ in range(100):  # another test process may be adding it at once (useradd: exit 9, or its lock held)
            try:
                pwd.getpwnam(PG_USER)
                break
            except KeyError:
                added = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                        PG_USER], capture_output=True, text=True)
                said = added.stderr
                if added.returncode not in (0, 9):
                    time.sleep(0.1)
        else:
            pytest.fail(f"cannot add the PostgreSQL user {PG_USER}: {said}")
        shutil.chown(root, PG_USER, PG_USER)
        run_as = {"user": PG_USER, "group": PG_USER}
    data, port = root / "data", free_port()
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--locale=C", "--no-sync"], check=True, capture_output=True, **run_as)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off " \
              "-c full_page_writes=off -c max_connections=200"
    started = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                              "-w", "-t", "60", "start"], capture_output=True, text=True, **run_as)
    if started.returncode != 0:
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{(root / 'log').read_text()}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, **run_as)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A new, empty database on the session's PostgreSQL server, for one test."""
    import re

    import psycopg

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:40] + f"_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with psycopg.connect(postgres_server.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"


def shared_category(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def model_dir(fitted_model, tmp_path_factory) -> Path:
    """A model directory as the service sees it, holding the session model as ``part``."""
    root = tmp_path_factory.mktemp("served_models")
    fitted_model.save(root / "part")
    return root


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> Path:
    """A model directory of the test's own holding the session model twice, as ``a`` and ``b`` (a module may
    define its own ``models``)."""
    root = tmp_path / "models"
    for name in ("a", "b"):
        shutil.copytree(model_dir / "part", root / name)
    return root


@contextlib.contextmanager
def mounted(where: Path, tmpfs_size: str | None = None) -> Iterator[Path]:
    """Mount at ``where`` for the block: a tmpfs of ``tmpfs_size`` (``"16m"``) to fill, or without it a read-only
    bind of the directory onto itself. Real mounts, not mocks: a full disk and a read-only file system are what
    the file system says. ``where`` may be a file (a read-only bind of it). Skipped where this run may not mount
    (not root, or a container without the privilege)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    if not where.exists():
        where.mkdir(parents=True)
    steps = ([["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size}", "tmpfs", str(where)]] if tmpfs_size else
             [["mount", "--bind", str(where), str(where)], ["mount", "-o", "remount,ro,bind", str(where)]])
    done = 0
    try:
        for step in steps:
            if subprocess.run(step, capture_output=True).returncode != 0:
                pytest.skip(f"cannot mount here: {' '.join(step)}")
            done += 1
        yield where
    finally:
        if done:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


_HOLD_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | (0 if os.path.isdir(sys.argv[1]) else os.O_CREAT), 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # until the block ends
"""


@contextlib.contextmanager
def flock_held_elsewhere(path: Path) -> Iterator[None]:
    """``path``'s ``flock`` (a lock file, made where missing, or a directory) held by another process for the block,
    as a live writer of another run holds it; at the block's end that process exits, as one that dies."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_FLOCK, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)


def as_other_user(tmp_path: Path) -> list[str]:
    """The command prefix that runs a process as root without its right to read and write what is not its own
    (``setpriv`` dropping ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``): another user's folder of mode 700 is
    then as unreadable to it as to any other account, while the venv under root's home still runs. Skipped where
    this run is not root or may not drop them (no ``setpriv``, a container without ``CAP_SETPCAP``)."""
    import shutil

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run a process without root's file access")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = tmp_path / "not-mine"
    probe.mkdir(mode=0o700)
    os.chown(probe, 65534, 65534)
    if subprocess.run([*prefix, "ls", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("cannot drop root's file access here")
    return prefix


def cli_under_flock(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``anomaly ARGS`` run as a cron line that keeps its jobs apart runs it: ``flock FOLDER anomaly ...``, which
    holds ``folder``'s own flock until the command exits."""
    import shutil

    return subprocess.run([shutil.which("flock") or "flock", str(folder), sys.executable, "-m", "anomaly_service.cli",
                           *args], capture_output=True, text=True, timeout=120)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to its last byte with one file; returns it (delete it to free)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1):  # big writes, then what is left of the last block
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)
    return filler


def png_bytes(image: np.ndarray, **save_args) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=save_args.pop("format", "PNG"), **save_args)
    return buf.getvalue()


def pages_file(*pages: Image.Image, fmt: str = "TIFF", reduced: tuple[int, ...] = ()) -> bytes:
    """A multi-frame file as Pillow writes it; ``reduced``: the TIFF pages whose NewSubfileType marks them as a
    reduced-resolution copy (a preview or pyramid level, as line-camera software writes beside the photo). A TIFF
    is written a page at a time, each with its own tags, as every Pillow does: Pillow 10's ``save_all`` gave every
    page the first page's tags."""
    import io

    from PIL import TiffImagePlugin

    buf = io.BytesIO()
    if fmt != "TIFF":
        assert not reduced
        pages[0].save(buf, format=fmt, save_all=True, append_images=list(pages[1:]))
        return buf.getvalue()
    with TiffImagePlugin.AppendingTiffWriter(buf, new=True) as tiff:
        for i, page in enumerate(pages):
            page.save(tiff, format="TIFF", tiffinfo={254: 1} if i in reduced else {})
            tiff.newFrame()
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model_dir: Path, log_path: Path, *flags: str, port: int | None = None,
                  ready: str = "/readyz") -> tuple[str, subprocess.Popen]:
    """Start ``anomaly serve`` over ``model_dir`` on a free loopback port (or ``port``: a restart) with extra
    ``flags``; wait until ``ready`` answers 200 (``/healthz`` for a service with no model yet). A port found free
    can be taken before the server binds it (another test run on the machine): then another is tried, and the
    server is taken as ready only once its own log says it listens there, not when whoever took the port answers."""
    for _ in range(3):
        started = _start_server(model_dir, log_path, flags, port or free_port(), ready)
        if started is not None:
            return started
        if port is not None:
            break
    pytest.fail(f"server exited early:\n{log_path.read_text()}")


def _start_server(model_dir: Path, log_path: Path, flags: tuple[str, ...], port: int,
                  ready: str) -> tuple[str, subprocess.Popen] | None:
    """:func:`launch_server` on ``port``; None where the port was taken before the server could bind it."""
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}
    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(model_dir),
                             "--port", str(port), "--reload-interval", "0", *flags], env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, text=True)
    log_file.close()  # the child has its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    # one client for every probe, and a short pause between them: a launch is ready within a pause of it, where a
    # client made anew per probe cost the loading server's CPU, and a long pause cost each of the suite's launches
    with httpx.Client(timeout=1) as client:
        while time.time() < deadline:
            if proc.poll() is not None:
                if "address already in use" in log_path.read_text():
                    return None
                pytest.fail(f"server exited early:\n{log_path.read_text()}")
            try:
                if (f"running on {url}" in log_path.read_text()
                        and client.get(f"{url}{ready}").status_code == 200):
                    proc.log_path = log_path  # type: ignore[attr-defined]
                    return url, proc
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    proc.kill()
    pytest.fail("server did not become ready in 120 s")


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A real ``anomaly serve`` process on a free loopback port, serving ``model_dir``, with no API key and the
    default log level; yields (url, process)."""
    url, proc = launch_server(model_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield url, proc
    stop_server(proc, 20)


def stop_server(proc: subprocess.Popen, patience: float = 30) -> None:
    """SIGTERM, as a service manager stops it; killed (and the test failed) if it does not stop within ``patience``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed machine with no network: no background connections, no GPU, no first-run UI.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright (no browser download), one per test module."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium) - browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(autouse=True)
def logging_restored():
    """Every logger's level and the root's handlers are put back when a test ends. ``anomaly serve`` run in-process
    sets the package's logger to the service's log level (INFO by default), and the test after it in the same worker
    then caught INFO lines its ``caplog`` checks did not expect (docs/decisions.md, "Tests that passed alone")."""
    manager = logging.Logger.manager
    levels = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level, disabled = logging.root.level, manager.disable
    yield
    for name, lg in list(manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and lg.level != levels.get(name, logging.NOTSET):
            lg.setLevel(levels.get(name, logging.NOTSET))
    logging.root.setLevel(root_level)
    logging.disable(disabled)


@pytest.fixture(autouse=True)
def pillow_limit_restored():
    """Pillow's process-wide pixel limit is put back when a test ends: a command run in-process raises it to its
    --max-pixels (images.admit_in_pillow), and a test after it in the same worker would read photos past Pillow's
    own limit that it expects refused, or the other way round."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture(autouse=True)
def pages_closed(request):
    """Every page a test opened is closed when it ends. The browser is one per module, and a page left open kept
    working on the session's servers: on Live it shows each part the line records, drawing its photo and overlay on
    the service's picture thread (a few places, then 503 `overloaded`), so a later test's scores had every earlier
    page drawing beside its own, and on a loaded machine its pictures were refused (docs/decisions.md, "Tests on a
    loaded machine")."""
    browser = request.getfixturevalue("browser") if "browser" in request.fixturenames else None
    yield
    for context in browser.contexts if browser is not None else ():
        context.close()


def allow_connections(postgres_url: str, on: bool) -> None:
    """Let a test database accept connections again, or refuse them and drop the open ones (a database outage)."""
    import psycopg

    name = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}')
        if not on:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.fixture(scope="module")
def server_with(model_dir, tmp_path_factory):
    """A factory of real ``anomaly serve`` processes with extra flags, stopped at the end of the module:
    ``url, proc = server_with("--timeout-header", "1")``."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> tuple[str, subprocess.Popen]:
        url, proc = launch_server(model_dir, tmp_path_factory.mktemp("server") / "server.log", *flags)
        procs.append(proc)
        return url, proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# how long a test of storage that hangs waits for what must happen (a server's start on a busy machine)
PATIENCE = 120


def within(fn: Callable[[], object], patience: float = PATIENCE) -> object:
    """``fn()`` on a thread; fails the test when it has not returned within ``patience``: it hangs, on storage that
    does not answer (the thread is left waiting on it; the test's fixtures make it answer at the end)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(patience)
    assert not thread.is_alive(), f"{fn} did not return: it waits on storage that never answers"
    return out[0] if out else None


def eventually(check: Callable[[], bool], patience: float = PATIENCE) -> None:
    """Wait until ``check()`` holds; fail the test when it has not within ``patience``."""
    deadline = time.monotonic() + patience
    while not check():
        assert time.monotonic() < deadline, "did not happen"
        time.sleep(0.1)
