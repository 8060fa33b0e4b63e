"""Choosing where tensors live. Kept apart so the GPU policy is one small, testable function."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .options import RUNTIME_OPTIONS

DEVICE_CHOICES = RUNTIME_OPTIONS["device"].choices or ()


def resolve_device(requested: str = "auto", cuda_available: bool | None = None,
                   gpu_count: int | None = None) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a concrete device.

    ``auto`` takes the GPU when torch sees one and the CPU otherwise. An explicit ``cuda`` on a machine without a
    usable GPU is a configuration mistake, so it fails loudly instead of silently running many times slower; so
    is ``cuda:N`` past the GPUs this process sees (``gpu_count``, default torch's count), which torch accepted here
    and then failed on at the first tensor moved there, deep in loading a model.
    """
    req = requested or "auto"
    try:  # the options table's rule, as the service settings apply it: "cuda:x" is unknown on every machine
        RUNTIME_OPTIONS["device"].check("device", req)
    except ConfigError:
        raise ConfigError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") \
            from None
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if req == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    if req == "cpu":
        return torch.device("cpu")
    if not cuda_available:  # cuda or cuda:N
        raise ConfigError(
            f"--device {requested} was requested but no CUDA GPU is usable here "
            "(torch.cuda.is_available() is False); use --device auto or --device cpu"
        )
    device = torch.device(req)
    if device.index is not None:
        if gpu_count is None:
            gpu_count = torch.cuda.device_count()
        if device.index >= gpu_count:
            seen = f"cuda:0 to cuda:{gpu_count - 1}" if gpu_count > 1 else "cuda:0" if gpu_count else "none"
            raise ConfigError(f"--device {requested} was requested but this process sees {gpu_count} CUDA GPU(s) "
                              f"({seen}; CUDA_VISIBLE_DEVICES numbers them from 0); use --device cuda or "
                              "--device auto")
    return device
