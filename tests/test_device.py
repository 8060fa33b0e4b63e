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
