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

from anomaly_service.api.lifecycle import Service, kept_dims
from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL, free_bytes, resident_bytes
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



def test_a_cgroups_reclaimable_part_is_never_more_than_it_tells_nor_more_than_its_use(tmp_path):
    """What the kernel would take back counts as free only where the cgroup says so: no ``memory.stat`` (or one
    without the lines) counts nothing, a tmpfs larger than the cache it is part of counts nothing, and a cache told
    as larger than the cgroup's use (the counters are read one after another) adds no more than that use: counted
    past it, a photo was let in that the limit did not have room for."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"meminfo": "MemAvailable: 30000000 kB\n", "self/status": "VmSize: 100 kB\n",
                      "self/cgroup": "0::/line3\n"})
    write_tree(cgroups, {"line3/memory.max": str(1024 * MIB), "line3/memory.current": str(1000 * MIB)})
    assert free_bytes(proc, cgroups) == 24 * MIB  # no memory.stat
    write_tree(cgroups, {"line3/memory.stat": "anon 0\n"})
    assert free_bytes(proc, cgroups) == 24 * MIB
    write_tree(cgroups, {"line3/memory.stat": f"file {10 * MIB}\nshmem {30 * MIB}\n"})
    assert free_bytes(proc, cgroups) == 24 * MIB  # more tmpfs than cache: nothing to take back
    write_tree(cgroups, {"line3/memory.stat": f"file {10 * MIB}\n"})
    assert free_bytes(proc, cgroups) == 34 * MIB  # no tmpfs told: all the cache
    write_tree(cgroups, {"line3/memory.current": str(100 * MIB),
                         "line3/memory.stat": f"file {150 * MIB}\nslab_reclaimable {50 * MIB}\n"})
    assert free_bytes(proc, cgroups) == 1024 * MIB  # the limit, not past it
    write_tree(proc, {"self/cgroup": "4:memory:/line3\n"})  # v1
    write_tree(cgroups / "memory", {"line3/memory.limit_in_bytes": str(1024 * MIB),
                                    "line3/memory.usage_in_bytes": str(1000 * MIB)})
    assert free_bytes(proc, cgroups) == 24 * MIB  # neither memory.stat nor the kernel's part
    write_tree(cgroups / "memory", {"line3/memory.stat": f"total_cache {10 * MIB}\n"})
    assert free_bytes(proc, cgroups) == 34 * MIB
    write_tree(cgroups / "memory", {"line3/memory.stat": f"total_cache {10 * MIB}\ntotal_shmem {30 * MIB}\n"})
    assert free_bytes(proc, cgroups) == 24 * MIB


def test_an_address_space_limit_leaves_the_limit_less_the_process_size(tmp_path):
    """``ulimit -v`` set on this process: the room is the limit less the size the process maps (VmSize, in kB),
    the tightest of the rooms; no limit, or no size to read, is no room of its own."""
    proc = tmp_path / "proc"
    write_tree(proc, {"meminfo": "MemAvailable: 40000000000 kB\n", "self/status": "Name: x\nVmSize:  204800 kB\n",
                      "self/cgroup": ""})
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 1 << 44  # far above what this process maps: nothing of it is refused
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the hard address-space limit is below the one this test sets")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        assert free_bytes(proc, tmp_path / "none") == limit - 204800 * 1024
        write_tree(proc, {"self/status": "VmSize:  20000000000 kB\n"})  # mapped past the limit already
        assert free_bytes(proc, tmp_path / "none") == 0
        write_tree(proc, {"self/status": "Name: x\n"})
        assert free_bytes(proc, tmp_path / "none") == 40000000000 * 1024
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    write_tree(proc, {"self/status": "VmSize:  204800 kB\n"})
    if soft == resource.RLIM_INFINITY:
        assert free_bytes(proc, tmp_path / "none") == 40000000000 * 1024


def test_resident_bytes_reads_the_resident_pages_of_statm(tmp_path):
    """``/proc/self/statm``'s second field, in pages; None where it is missing or is no number (the admission then
    counts the photos in flight whole), never an error."""
    proc = tmp_path / "proc"
    write_tree(proc, {"self/statm": "52000 1300 400 20 0 9000 0\n"})
    assert resident_bytes(proc) == 1300 * resource.getpagesize()
    write_tree(proc, {"self/statm": "52000 1300\n"})  # the two fields read are all there need be
    assert resident_bytes(proc) == 1300 * resource.getpagesize()
    for text in ("", "52000\n", "52000 many 400\n", "52000 -3 400\n"):
        write_tree(proc, {"self/statm": text})
        assert resident_bytes(proc) is None, text
    assert resident_bytes(tmp_path / "none") is None
    assert 0 < resident_bytes() < vm_size(os.getpid())  # this process's own, real


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


def embedder(tile: int | None, batch_size: int = 8, image_size: int = 128, backbone: str = "efficientnet_lite0",
             target_dim: int = 64):
    """An embedder that tiles with ``tile`` (only its layout is read: no weights load)."""
    from anomaly_service.embedder import Embedder

    return Embedder(backbone, image_size=image_size, target_dim=target_dim, layer_balance=True,
                    batch_size=batch_size, weights=None, device=torch.device("cpu"), tile=tile)


# (backbone, --image-size, --tile, photo side, peak MiB over the idle service) of one photo on a service warmed by two
# small parts, the larger of two sends (benchmarks/tile_memory.py; docs/decisions.md "A tiled photo's features")
MEASURED = [("efficientnet_lite0", 128, 64, 1024, 174), ("efficientnet_lite0", 128, 64, 1536, 367),
            ("efficientnet_lite2", 128, 64, 1536, 364), ("resnet50", 128, 64, 1024, 319),
            ("resnet50", 128, 64, 1536, 680), ("wide_resnet50_2", 128, 64, 1024, 315),
            ("efficientnet_lite0", 256, 128, 1536, 364), ("resnet50", 256, 128, 1024, 363),
            ("resnet50", 256, 128, 1536, 680), ("efficientnet_lite0", 128, 128, 2048, 226),
            ("resnet50", 128, 128, 2048, 377),
            # tiles of the working size, the first photo after the warm-up (session 68, after its pass-filling blank)
            ("resnet50", 256, 256, 520, 197), ("resnet50", 256, 256, 768, 283), ("resnet50", 256, 256, 1024, 299),
            ("resnet50", 256, 256, 1536, 413), ("wide_resnet50_2", 256, 256, 768, 276),
            ("wide_resnet50_2", 256, 256, 1536, 413)]


def test_a_tiled_photo_is_counted_at_no_less_than_it_was_measured_to_take():
    """The count, from the layout and the kept dimensions alone, covers what each photo took on a real service, and
    by no more than two and a half times. Counted at a Lite's width, a ResNet-50 photo took four times its count."""
    for backbone, image_size, tile, side, mib in MEASURED:
        e = embedder(tile, image_size=image_size, backbone=backbone, target_dim=1024)
        need = side * side * PEAK_BYTES_PER_PIXEL + e.tile_bytes(side, side, e.dims // 2)  # the default keeps half
        assert mib * MIB <= need <= 2.5 * mib * MIB, (backbone, image_size, tile, side, need / MIB)
    assert embedder(None).tile_bytes(2048, 2048) == 0  # untiled: the photo's own pixels, as before
    wide, narrow = (embedder(64, backbone=b, target_dim=1024) for b in ("resnet50", "efficientnet_lite0"))
    assert wide.tile_bytes(1536, 1536, 512) > 1.5 * narrow.tile_bytes(1536, 1536, 76)
    assert narrow.tile_bytes(1536, 1536) > narrow.tile_bytes(1536, 1536, 76)  # no selection: every dimension


def test_the_count_follows_the_tiles_overlap_and_the_backbone_passes(monkeypatch):
    """What the network is given, not the photo at the tile zoom: the same photo at the same zoom cut with more
    overlap counts its extra tiles, and a larger backbone batch counts its larger pass."""
    from anomaly_service import tiling

    side = 1536
    base, lay = embedder(64).tile_bytes(side, side), embedder(64).layout((side, side))
    assert embedder(64, batch_size=32).tile_bytes(side, side) > base
    monkeypatch.setattr(tiling, "OVERLAP", 0.5)
    more = embedder(64).layout((side, side))
    assert more.work_size == lay.work_size and more.n_tiles > 2 * lay.n_tiles
    assert embedder(64).tile_bytes(side, side) > 1.9 * base


def test_a_tiled_photo_past_the_memory_left_is_refused_with_its_tiles_named():
    from anomaly_service.api.admission import Admission, Refused

    side = 1536
    tiles = embedder(64).tile_bytes(side, side)
    room = side * side * PEAK_BYTES_PER_PIXEL + tiles // 2
    admission = Admission(10**9, 10**9, 10, free_memory=lambda: room, resident=lambda: None)
    admission.admit(side * side, 1000, embedder(256).tile_bytes(side, side)).release()
    with pytest.raises(Refused, match="tiles") as refused:
        admission.admit(side * side, 1000, tiles)
    assert refused.value.reason == "memory"


TILED_SIDE = 160  # the tiled model's training photos: tiles of 64 px at --image-size 128 see them at twice the size


@pytest.fixture(scope="module")
def tiled_dir(tmp_path_factory) -> Path:
    """A model directory holding ``tiled``: --tile 64 at --image-size 128, fitted on a few small synthetic parts."""
    from anomaly_service import AnomalyModel
    from conftest import SMALL as FIT

    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("tiled_models")
    AnomalyModel(**FIT, tile=64).fit([textured_part(rng, TILED_SIDE, TILED_SIDE) for _ in range(4)]).save(
        root / "tiled")
    return root


def test_the_default_pixel_budget_counts_a_loaded_models_tiles(tiled_dir, caplog):
    """The start-up budget fitted to the memory left counts a pixel at what the loaded tiled model takes of it:
    counted at the untiled rate, the budget let in four times the memory left of photos this model enlarges."""
    service = Service(ServiceSettings(model_dir=str(tiled_dir), record=False))
    service.registry.load("tiled")
    free = 600 * MIB
    service._fit_pixels_to_memory(free)
    room = free - service.settings.max_bytes_in_flight
    assert service.admission.max_pixels * 4 * PEAK_BYTES_PER_PIXEL <= room  # at least the zoom's own pixels
    model = service.registry.get("tiled").model
    rate = model.embedder.bytes_per_pixel(service.settings.max_pixels, kept_dims(model))
    assert service.admission.max_pixels == int(room // rate)
    assert "lowered" in caplog.text and "model tiled's tiles" in caplog.text


def test_a_real_service_refuses_a_tiled_photo_whose_tiles_do_not_fit(tiled_dir, tmp_path):
    """A real service, its address space limited to more than the photo's pixels at the tile zoom take at the
    untiled rate and less than its tiles take: the old count admitted it, and the photo took what was not there."""
    from anomaly_service.tiling import layout

    url, proc = launch_server(tiled_dir, tmp_path / "server.log", "--max-pixels-in-flight", str(10**9))
    side = 1024
    work = layout((side, side), 64, 128, 16).work_size
    at_zoom = work[0] * work[1] * PEAK_BYTES_PER_PIXEL  # the old count
    try:
        limit_memory(proc.pid, at_zoom + 32 * MIB)
        r = httpx.post(f"{url}/score?model=tiled", files={"file": ("big.gif", gif_screen(side, side))}, timeout=120)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "overloaded" and "tiles" in r.json()["detail"], r.text
        assert 'reason="memory"' in httpx.get(f"{url}/metrics").text
        limit_memory(proc.pid, None)
        small = png_bytes(textured_part(np.random.default_rng(4), TILED_SIDE, TILED_SIDE))
        r = httpx.post(f"{url}/score?model=tiled", files={"file": ("part.png", small)}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_tiled_model_added_after_start_up_lowers_the_pixel_budget_and_its_removal_restores_it(tiled_dir, tmp_path,
                                                                                                 caplog):
    """The budget fitted at start-up counted only the models loaded then: a tiled model copied in later (picked up
    by the re-scan) was admitted photos at the untiled rate, several times the memory left for them."""
    import asyncio
    import shutil

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    service = Service(ServiceSettings(model_dir=str(model_dir), record=False))
    free = 600 * MIB
    service._fit_pixels_to_memory(free)
    room = free - service.settings.max_bytes_in_flight
    untiled = room // PEAK_BYTES_PER_PIXEL
    assert service.admission.max_pixels == untiled
    shutil.copytree(tiled_dir / "tiled", model_dir / "tiled")
    caplog.clear()
    assert asyncio.run(service.refresh()) == {"tiled": "loaded"}
    model = service.registry.get("tiled").model
    rate = model.embedder.bytes_per_pixel(service.settings.max_pixels, kept_dims(model))
    assert service.admission.max_pixels == int(room // rate) < untiled
    assert "model tiled's tiles" in caplog.text
    caplog.clear()
    asyncio.run(service.refresh())  # nothing changed: no second warning
    assert "lowered" not in caplog.text
    shutil.rmtree(model_dir / "tiled")
    assert asyncio.run(service.refresh()) == {"tiled": "removed"}
    assert service.admission.max_pixels == untiled


def test_the_pixel_budget_in_force_is_in_the_metrics_as_models_come_and_go(tiled_dir, tmp_path):
    """The budget the service lowered at start-up, and fits again whenever a model is added, re-fitted or removed,
    was said once in the log and shown nowhere: months on, parts refused for `pixels` with far fewer in flight than
    --max-pixels-in-flight said nothing of why. /metrics carries the budget in force."""
    import asyncio
    import shutil

    from test_admission import metric

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    service = Service(ServiceSettings(model_dir=str(model_dir), record=False))

    def shown() -> float:
        return metric(service.telemetry.render().decode(), "anomaly_pixels_in_flight_limit")

    assert shown() == service.settings.max_pixels_in_flight
    service._fit_pixels_to_memory(600 * MIB)
    untiled = service.admission.max_pixels
    assert shown() == untiled < service.settings.max_pixels_in_flight
    shutil.copytree(tiled_dir / "tiled", model_dir / "tiled")
    asyncio.run(service.refresh())
    assert shown() == service.admission.max_pixels < untiled
    shutil.rmtree(model_dir / "tiled")
    asyncio.run(service.refresh())
    assert shown() == untiled
