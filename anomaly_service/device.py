"""Choosing where tensors live. Kept apart so the GPU policy is one small, testable function."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .options import RUNTIME_OPTIONS

DEVICE_CHOICES = RUNTIME_OPTIONS["device"].choices or ()


def resolve_device(requested: str = "auto", cuda_available: bool | None = None) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a concrete device.

    ``auto`` takes the GPU when torch sees one and the CPU otherwise. An explicit ``cuda`` on a machine without a
    usable GPU is a configuration mistake, so it fails loudly instead of silently running many times slower.
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
    return torch.device(req)
