"""Std-based feature selection: keep the embedding dimensions that vary most over the normal bank.

Dimensions that barely vary across normal patches cannot separate normal from anomalous ones in an L2 kNN;
dropping them shrinks the bank and the search. Selectors share a one-method protocol, so a benchmark can inject
its own (a seeded random choice of the same count is the control in ``benchmarks/quality.py --ablation``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from .errors import ConfigError
from .patch_store import PatchStore


class FeatureSelector(Protocol):
    """Chooses which embedding dimensions the memory bank keeps, from the normal bank alone."""

    def select(self, bank: torch.Tensor | PatchStore) -> np.ndarray:
        """``(N, D)`` normal patch features (a tensor, or the :class:`~.patch_store.PatchStore` of a streamed
        fit) -> sorted int64 indices of the dimensions to keep."""
        ...

    def describe(self) -> dict[str, Any]:
        ...


def n_keep(total: int, keep: float | int) -> int:
    """Resolve ``keep`` against ``total`` dimensions: a value <= 1 is a fraction, a larger one a count."""
    keep = float(keep)
    if keep <= 0:
        raise ConfigError(f"feature keep must be a fraction in (0, 1] or a count >= 1, got {keep}")
    if keep <= 1.0:
        return max(1, int(round(total * keep)))
    return min(int(keep), total)


def channel_std(features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Per-dimension standard deviation over rows, streamed in chunks (float64 sums) to bound memory."""
    n, d = features.shape
    s = torch.zeros(d, dtype=torch.float64, device=features.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=features.device)
    shift = features[: min(n, 1024)].double().mean(0)  # shifted sums avoid catastrophic cancellation
    for i in range(0, n, chunk):
        block = features[i : i + chunk].double() - shift
        s += block.sum(0)
        s2 += (block * block).sum(0)
    var = (s2 - s * s / n) / max(n - 1, 1)
    return var.clamp_min(0).sqrt().float()


class StdSelector:
    """Keep the ``keep`` (fraction or count) dimensions with the largest standard deviation over the bank."""

    mode = "std"

    def __init__(self, keep: float | int):
        self.keep = keep

    def select(self, bank: torch.Tensor | PatchStore) -> np.ndarray:
        k = n_keep(bank.shape[1], self.keep)
        # a streamed fit's store kept the sums as the patches went by (patch_store.py)
        std = (bank.channel_std() if isinstance(bank, PatchStore) else channel_std(bank)).cpu().numpy()
        # stable sort on -std: ties resolve to the lower index, so the choice is deterministic
        return np.sort(np.argsort(-std, kind="stable")[:k]).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "keep": self.keep}


class KeepAll:
    """No selection: every embedding dimension stays."""

    mode = "none"

    def select(self, bank: torch.Tensor | PatchStore) -> np.ndarray:
        return np.arange(bank.shape[1], dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "keep": 1.0}


def make_selector(mode: str, keep: float | int) -> FeatureSelector:
    """The product's selectors by their option value (see options.py)."""
    if mode == "std":
        return StdSelector(keep)
    if mode == "none":
        return KeepAll()
    raise ConfigError(f"unknown feature selection {mode!r}; choose std or none")
