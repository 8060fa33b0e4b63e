"""A small inspection PC: memory runs short, and the service refuses the photo that does not fit (503) instead of
being killed by the kernel or answering 500 from a failed allocation.

The real service runs in a process of its own, and its address-space limit (``ulimit -v``, set on the running
process with prlimit) stands in for the PC's memory: what the kernel refuses is real, not mocked.
"""

import os
import resource
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from anomaly_service.api.lifecycle import Service
from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL, free_bytes
from anomaly_service.settings import ServiceSettings
from conftest import launch_server, png_bytes, textured_part
from test_admission import SMALL, gif_screen

MIB = 1 << 20


def vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def limit_memory(pid: int, room: int | None) -> None:
    """Let process ``pid`` map ``room`` bytes more than it has now (None: no limit)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY if room is None else vm_size(pid) + room, hard))


@pytest.fixture
def served(model_dir, tmp_path):
    """A real service over the session model, recording every photo with its pictures."""
    url, proc = launch_server(model_dir, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"),
                              "--keep-images", "all")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=20)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_free_bytes_takes_the_tightest_cgroup_up_the_hierarchy(tmp_path):
    """The cgroup files as the kernel lays them out: v1 with a limit on the parent only, its file cache free."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"meminfo": "MemTotal: 4000000 kB\nMemAvailable: 3000000 kB\n",
                      "self/status": "VmSize: 100 kB\n", "self/cgroup": "4:memory:/plant/line3\n0::/\n"})
    write_tree(cgroups / "memory", {
        "plant/line3/memory.limit_in_bytes": str(9223372036854771712),  # no limit of its own
        "plant/line3/memory.usage_in_bytes": str(900 * MIB),
        "plant/memory.limit_in_bytes": str(2048 * MIB),
        "plant/memory.usage_in_bytes": str(1800 * MIB),
        "plant/memory.stat": f"total_cache {300 * MIB}\ntotal_shmem {100 * MIB}\n",
    })
    assert free_bytes(proc, cgroups) == (2048 - 1800 + 300 - 100) * MIB
    write_tree(cgroups, {"memory.max": "max\n", "memory.current": "0\n"})  # v2 at the root: no limit
    assert free_bytes(proc, cgroups) == (2048 - 1800 + 300 - 100) * MIB
    write_tree(proc, {"self/cgroup": "0::/\n"})
    write_tree(cgroups, {"memory.max": str(1024 * MIB), "memory.current": str(1000 * MIB),
                         "memory.stat": f"file {40 * MIB}\nshmem 0\n"})
    assert free_bytes(proc, cgroups) == 64 * MIB
    write_tree(proc, {"self/cgroup": ""})
    assert free_bytes(proc, cgroups) == 3000000 * 1024  # the machine's available memory


def test_the_default_pixel_budget_is_lowered_to_the_memory_left(model_dir, caplog):
    service = Service(ServiceSettings(model_dir=str(model_dir), record=False))
    default = service.admission.max_pixels
    free = 600 * MIB
    service._fit_pixels_to_memory(free)
    assert service.admission.max_pixels == (free - service.settings.max_bytes_in_flight) // PEAK_BYTES_PER_PIXEL
    assert service.admission.max_pixels < default and "lowered" in caplog.text
    chosen = Service(ServiceSettings(model_dir=str(model_dir), record=False, max_pixels_in_flight=30_000_000))
    chosen._fit_pixels_to_memory(free)
    assert chosen.admission.max_pixels == 30_000_000  # the operator's own budget stays, with a warning
    roomy = Service(ServiceSettings(model_dir=str(model_dir), record=False))
    roomy._fit_pixels_to_memory(64 << 30)
    assert roomy.admission.max_pixels == default


def test_a_photo_larger_than_the_memory_left_is_refused_and_the_service_goes_on(served):
    url, proc = served
    big = gif_screen(6000, 6000)  # 36 MP: within --max-pixels, about 1.2 GiB to decode and score
    limit_memory(proc.pid, 256 * MIB)
    try:
        r = httpx.post(f"{url}/score", files={"file": ("big.gif", big)}, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "overloaded" and "MiB" in r.json()["detail"] and "Retry-After" in r.headers
        assert 'reason="memory"' in httpx.get(f"{url}/metrics").text
    finally:
        limit_memory(proc.pid, None)
    assert httpx.post(f"{url}/score", files={"file": ("part.png", SMALL)}, timeout=60).status_code == 200


def inspection(url: str, answer: httpx.Response) -> dict:
    """The record of a scored part, once the recorder has written it."""
    deadline = time.time() + 30
    while time.time() < deadline:
        r = httpx.get(f"{url}/inspections/{answer.json()['inspection_id']}")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.2)
    raise AssertionError("the inspection was not recorded")


def test_memory_that_runs_out_in_a_request_is_a_503_not_a_500(served):
    """Drawing a stored photo's overlay is outside the pixel budget (one picture thread): when its memory runs
    out, that request fails with a 503 that says so, and the service goes on."""
    url, proc = served
    small = inspection(url, httpx.post(f"{url}/score", files={"file": ("part.png", SMALL)}, timeout=60))
    assert httpx.get(url + small["overlay_url"], timeout=60).status_code == 200  # the picture thread is up
    wide = png_bytes(np.tile(textured_part(np.random.default_rng(3)), (24, 24, 1)))  # 3072 x 3072
    stored = inspection(url, httpx.post(f"{url}/score", files={"file": ("wide.png", wide)}, timeout=120))
    limit_memory(proc.pid, 48 * MIB)
    try:
        r = httpx.get(url + stored["overlay_url"], timeout=60)
    finally:
        limit_memory(proc.pid, None)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "insufficient_memory" and r.headers["Retry-After"] == "1"
    assert "out of memory" in Path(proc.log_path).read_text()
    assert httpx.get(url + stored["overlay_url"], timeout=60).status_code == 200


def test_torchs_allocation_that_fails_in_a_request_is_a_503_not_a_500():
    """torch's CPU allocator refuses with a RuntimeError, not a MemoryError: a tiled photo's tiles that found no
    memory under ``ulimit -v`` answered 500 internal_error, where numpy's refusal answers 503. A real refusal of
    torch's, in the service's own error handlers."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from anomaly_service.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/tiles")
    def tiles() -> dict:
        torch.empty(1 << 52, dtype=torch.uint8)  # more than any machine has: the allocator refuses it
        return {}

    @app.get("/bug")
    def bug() -> dict:
        raise RuntimeError("a fault of the service's own")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/tiles")
    assert r.status_code == 503 and r.json()["error"] == "insufficient_memory" and r.headers["Retry-After"] == "1"
    assert client.get("/bug").status_code == 500


def test_a_fit_keeps_fewer_patches_in_memory_where_there_is_little(tmp_path):
    """Under a real address-space limit a fit's patch store spills past a quarter of the room, not past 1 GiB:
    on a small PC the full budget beside the network, the coreset and the leave-one-out maps took more than the
    machine had."""
    import subprocess
    import sys

    probe = ("import resource, sys\n"
             "from anomaly_service.patch_store import PatchStore\n"
             "size = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
             "resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))\n"
             "print(PatchStore().memory_budget)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(1 << 30)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 200 * MIB < int(done.stdout) <= 256 * MIB, done.stdout


def test_the_kernels_reclaimable_caches_count_as_free(tmp_path):
    """A cgroup's use grows to its limit with the names and inodes of the files the service looks up, which the
    kernel frees before it kills: counted as used, every large photo was refused on a machine with the room."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"meminfo": "MemAvailable: 30000000 kB\n", "self/status": "VmSize: 100 kB\n",
                      "self/cgroup": "0::/line3\n"})
    write_tree(cgroups, {"line3/memory.max": str(1024 * MIB), "line3/memory.current": str(1020 * MIB),
                         "line3/memory.stat": f"anon {300 * MIB}\nfile {120 * MIB}\nshmem {20 * MIB}\n"
                                              f"slab_reclaimable {560 * MIB}\nslab_unreclaimable {40 * MIB}\n"})
    assert free_bytes(proc, cgroups) == (1024 - 1020 + 100 + 560) * MIB
    write_tree(proc, {"self/cgroup": "4:memory:/line3\n"})  # v1: its kernel memory is told as one sum
    write_tree(cgroups / "memory", {"line3/memory.limit_in_bytes": str(1024 * MIB),
                                    "line3/memory.usage_in_bytes": str(1020 * MIB),
                                    "line3/memory.kmem.usage_in_bytes": str(600 * MIB),
                                    "line3/memory.stat": f"total_cache {120 * MIB}\ntotal_shmem {20 * MIB}\n"})
    assert free_bytes(proc, cgroups) == (1024 - 1020 + 100 + 600) * MIB


MEMORY_V1 = Path("/sys/fs/cgroup/memory")

FILL_AND_ALLOCATE = """
import os, sys
from pathlib import Path
import numpy as np
from anomaly_service.memory_room import free_bytes
cgroup, names, room = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(cgroup / "cgroup.procs").write_text(str(os.getpid()))
limit = int((cgroup / "memory.limit_in_bytes").read_text())
for i in range(8_000_000):  # names looked up and not found: the kernel keeps each in its cache, charged here
    try:
        os.stat(names / f"part-{i:09d}-of-a-long-line-of-photos.png")
    except FileNotFoundError:
        pass
    if i % 50_000 == 0 and int((cgroup / "memory.usage_in_bytes").read_text()) > limit - (64 << 20):
        break
print(free_bytes(), flush=True)
np.ones(room, dtype=np.uint8)  # every page touched: the kernel has to find it
print("allocated", flush=True)
"""


@pytest.mark.skipif(not os.access(MEMORY_V1 / "cgroup.procs", os.W_OK), reason="needs a writable cgroup v1 memory "
                    "hierarchy (root)")
def test_a_cgroup_full_of_the_kernels_caches_admits_what_it_can_allocate(tmp_path):
    """A real memory cgroup, filled to its limit by the kernel's cache of file names looked up: what free_bytes
    says there is, the process then allocates and touches, and the kernel does not kill it."""
    import subprocess
    import sys

    cgroup = MEMORY_V1 / f"anomaly-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        # small enough that the cache fills it in a few seconds, large enough that the cache is most of it
        (cgroup / "memory.limit_in_bytes").write_text(str(320 * MIB))
        (tmp_path / "names").mkdir()
        room = 128 * MIB
        done = subprocess.run([sys.executable, "-c", FILL_AND_ALLOCATE, str(cgroup), str(tmp_path / "names"),
                               str(room)], capture_output=True, text=True, timeout=300)
    finally:
        cgroup.rmdir()
    assert done.returncode == 0, done.stderr
    free, allocated = done.stdout.split()
    assert allocated == "allocated" and int(free) >= room, done.stdout


@pytest.mark.skipif(not os.access(MEMORY_V1 / "cgroup.procs", os.W_OK), reason="needs a writable cgroup v1 memory "
                    "hierarchy (root)")
def test_a_burst_of_large_photos_that_fit_one_by_one_is_refused_past_the_memory_left(model_dir, tmp_path):
    """A real memory cgroup around a real service whose pixel budget the plant set high: photos that each fit the
    memory left, sent at once. Each was checked against the room before any had allocated, all were let in, and the
    kernel killed the service. The photos in flight now count against the room: the ones past it get 503."""
    import threading

    url, proc = launch_server(model_dir, tmp_path / "server.log", "--max-pixels-in-flight", str(10**9))
    cgroup = MEMORY_V1 / f"anomaly-test-{os.getpid()}-burst"
    cgroup.mkdir()
    side = 3000  # 9 MP: each photo's peak is about a third of a GiB
    need = side * side * PEAK_BYTES_PER_PIXEL
    answers: list = []
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(need * 3 // 2))  # room for one photo, not two
        (cgroup / "cgroup.procs").write_text(str(proc.pid))  # its memory from now on is charged here

        def post() -> None:
            try:
                answers.append(httpx.post(f"{url}/score", files={"file": ("big.gif", gif_screen(side, side))},
                                          timeout=300).status_code)
            except httpx.HTTPError as exc:  # the service killed under it
                answers.append(type(exc).__name__)

        burst = [threading.Thread(target=post) for _ in range(4)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        assert proc.poll() is None, Path(proc.log_path).read_text()[-2000:]
        assert set(answers) <= {200, 503} and 200 in answers and 503 in answers, answers
        assert httpx.post(f"{url}/score", files={"file": ("part.png", SMALL)}, timeout=60).status_code == 200
    finally:
        proc.kill()
        proc.wait(timeout=20)
        cgroup.rmdir()


def test_a_tiled_model_that_enlarges_photos_is_admitted_by_its_enlarged_size():
    """A tile half the working size zooms every photo twice: the memory check counts the pixels the model scores
    (four times the photo's), so a photo whose own pixels fit the memory left but whose enlarged ones do not is
    refused; a tile of the working size is counted as before."""
    from anomaly_service.api.admission import Admission, Refused
    from anomaly_service.embedder import Embedder

    def embedder(tile: int) -> Embedder:
        return Embedder("efficientnet_lite0", image_size=128, target_dim=64, layer_balance=True, batch_size=8,
                        weights=None, device=torch.device("cpu"), tile=tile)

    side = 1536
    enlarged = embedder(64).peak_pixels(side, side)
    assert enlarged >= 4 * side * side * 0.99
    assert embedder(128).peak_pixels(side, side) == side * side
    assert embedder(256).peak_pixels(side, side) == side * side
    room = 2 * side * side * PEAK_BYTES_PER_PIXEL  # twice what the photo's own pixels take
    admission = Admission(10**9, 10**9, 10, free_memory=lambda: room, resident=lambda: None)
    admission.admit(side * side, 1000, embedder(128).peak_pixels(side, side)).release()
    with pytest.raises(Refused, match="enlarge") as refused:
        admission.admit(side * side, 1000, enlarged)
    assert refused.value.reason == "memory"
