import pytest
import torch

from anomaly_service.device import resolve_device
from anomaly_service.errors import ConfigError
from anomaly_service.index import gpu_faiss_available, to_search_device, build_index


def test_auto_prefers_gpu_when_present():
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda")
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("cuda:1", cuda_available=True, gpu_count=2) == torch.device("cuda:1")


def test_explicit_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")


def test_a_gpu_number_past_the_gpus_this_process_sees_is_a_clear_error(monkeypatch):
    """cuda:3 on a one-GPU machine (or past CUDA_VISIBLE_DEVICES) was accepted and failed later, at the first
    tensor moved there, as a model that "failed to load". Torch's view of the GPUs is patched: none here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")  # the current GPU, whichever number it has
    with pytest.raises(ConfigError, match=r"cuda:3 was requested but this process sees 1 CUDA GPU\(s\) \(cuda:0;"):
        resolve_device("cuda:3")
    with pytest.raises(ConfigError, match=r"sees 2 CUDA GPU\(s\) \(cuda:0 to cuda:1;"):
        resolve_device("cuda:2", gpu_count=2)


@pytest.mark.parametrize("device", ["cuda:x", "cudax", "cuda:-1", "CPU", " cpu"])
def test_device_outside_the_options_table_is_unknown_on_a_gpu_machine_too(device):
    # the table (options.py) is the rule the service settings apply; "cuda:x" reached torch.device on a GPU machine
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(device, cuda_available=True)


def test_gpu_faiss_falls_back_to_cpu_index():
    import numpy as np

    index = build_index(np.zeros((4, 8), dtype=np.float32))
    if not gpu_faiss_available():  # the CPU searcher over the same index: the blocked wrapper for narrow banks
        searcher = to_search_device(index, use_gpu=True)
        assert getattr(searcher, "index", searcher) is index
        assert type(searcher) is type(to_search_device(index, use_gpu=False))


class _FakeGpuFaiss:
    """GPU FAISS as far as placement goes (none is installed here): records which resource object and GPU number
    each copy was made with, and 'copies' the index by returning it (a GPU copy answers as the CPU index does).
    Its searches fail if two threads are in one at once, as GPU FAISS is not safe for."""

    def __init__(self):
        import threading

        self.made, self.placed, self.inside, self.overlapped = 0, [], 0, False
        self._count = threading.Lock()

    def resources(self):
        self.made += 1
        return object()

    def to_gpu(self, res, number, index):
        import time

        fake = self
        self.placed.append((res, number))

        class Copy:
            d, ntotal = index.d, index.ntotal

            def search(self, q, k):
                with fake._count:
                    fake.inside += 1
                    fake.overlapped |= fake.inside > 1
                time.sleep(0.02)
                with fake._count:
                    fake.inside -= 1
                return index.search(q, k)

        return Copy()


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    import faiss

    from anomaly_service import index as index_module

    fake = _FakeGpuFaiss()
    monkeypatch.setattr(faiss, "StandardGpuResources", fake.resources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake.to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(index_module, "_GPU_RESOURCES", {}, raising=False)
    return fake


def test_gpu_faiss_places_the_bank_on_the_models_gpu_with_one_resource_object_per_gpu(fake_gpu_faiss):
    """The GPU FAISS copy went to GPU 0 whatever --device said, and each placement (every model, and each search
    over a model's own rows) made resources of its own: a scratch pool in GPU memory each."""
    import numpy as np

    from anomaly_service.index import describe_search, search

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    index = build_index(bank)
    a = to_search_device(index, use_gpu=True, device="cuda:1")
    b = to_search_device(index, use_gpu=True, device="cuda:1")
    c = to_search_device(index, use_gpu=True, device="cuda")
    numbers = [n for _, n in fake_gpu_faiss.placed]
    assert numbers == [1, 1, 0]
    assert fake_gpu_faiss.placed[0][0] is fake_gpu_faiss.placed[1][0] and fake_gpu_faiss.made == 2
    assert describe_search(a).endswith("FAISS on cuda:1")
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    dist, ids = search(b, queries, 3)
    exact_dist, exact_ids = search(index, queries, 3)
    assert np.array_equal(ids, exact_ids) and np.allclose(dist, exact_dist)
    assert c.number == 0


def test_searches_of_gpu_faiss_indexes_on_one_gpu_take_turns(fake_gpu_faiss):
    """Neither GPU FAISS's resources nor its indexes may be used by two threads at once; the service searches from
    its inference workers and from an update's thread."""
    import copy
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    index = build_index(np.random.default_rng(1).normal(size=(100, 8)).astype(np.float32))
    searches = [to_search_device(index, use_gpu=True, device="cuda:0") for _ in range(2)]
    q = np.zeros((4, 8), np.float32)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: s.search(q, 2), searches * 4))
    assert not fake_gpu_faiss.overlapped
    again = pickle.loads(pickle.dumps(searches[0]))  # a pickled or copied model places its bank again
    assert again.number == 0 and again.lock is searches[0].lock and copy.deepcopy(searches[1]).index.ntotal == 100


def test_the_exact_search_of_a_wide_bank_bounds_its_distance_block(monkeypatch):
    """On a GPU an ivf bank (millions of rows) is searched exactly by the blocked search, whose distance block was
    256 queries x every row whatever the bank's width: gigabytes a block. It is bounded in bytes now, with the same
    answers (a smaller bound stands in for the real one, so the bank can stay small)."""
    import numpy as np

    from anomaly_service import index as index_module
    from anomaly_service.index import BlockedFlatSearch, search

    rng = np.random.default_rng(2)
    bank = rng.normal(size=(20_000, 8)).astype(np.float32)
    narrow = BlockedFlatSearch(build_index(bank[:4096]), precision="fp32", device="cpu")
    assert narrow.block == 256  # what the default exact bank has always used
    monkeypatch.setattr(index_module, "BLOCK_BYTES", 1 << 20, raising=False)
    index = build_index(bank)
    wide = BlockedFlatSearch(index, precision="fp32", device="cpu")
    assert wide.block * wide.width * 4 <= 1 << 20 and wide.block >= 1
    queries = rng.normal(size=(300, 8)).astype(np.float32)
    dist, ids = search(wide, queries, 3)
    exact_dist, exact_ids = search(index, queries, 3)
    assert np.array_equal(ids, exact_ids) and np.allclose(dist, exact_dist, atol=1e-4)


def test_a_bank_too_large_for_the_gpu_is_searched_on_the_cpu(monkeypatch, caplog):
    """Placing the torch search on a GPU whose memory cannot hold the bank raised CUDA's out-of-memory error and
    the model did not load; it is searched on the CPU instead, with a warning. No GPU here: the placement's
    out-of-memory error is raised by a stand-in for the GPU search."""
    import numpy as np

    from anomaly_service import index as index_module

    real = index_module.BlockedFlatSearch

    class FullGpu(real):
        def __init__(self, index, *args, device="cpu", **kwargs):
            if str(device) != "cpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.20 GiB")
            super().__init__(index, *args, device=device, **kwargs)

    monkeypatch.setattr(index_module, "BlockedFlatSearch", FullGpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(index_module, "gpu_faiss_available", lambda: False)
    index = build_index(np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32))
    with caplog.at_level("WARNING", logger="anomaly_service.index"):
        searcher = to_search_device(index, use_gpu=True, precision="fp32", device="cuda:0")
    assert type(searcher) is type(to_search_device(index, use_gpu=False, precision="fp32"))
    assert "does not fit in the memory of cuda:0" in caplog.text
