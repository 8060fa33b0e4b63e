"""Std-based feature selection: keep the embedding dimensions that vary most over the normal bank.

Dimensions that barely vary across normal patches cannot separate normal from anomalous ones in an L2 kNN;
dropping them shrinks the bank and the search. ``random`` (same count, seeded) exists as the honest control
for the ablation: it shows whether *which* dimensions we keep matters, or only how many.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError

SELECTION_MODES = ("std", "random", "none")


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


def select_features(features: torch.Tensor, mode: str, keep: float | int, seed: int = 0) -> np.ndarray:
    """Indices (sorted, int64) of the embedding dimensions to keep, computed over the normal patch bank."""
    d = features.shape[1]
    if mode == "none":
        return np.arange(d, dtype=np.int64)
    k = n_keep(d, keep)
    if mode == "std":
        std = channel_std(features).cpu().numpy()
        # stable sort on -std: ties resolve to the lower index, so the choice is deterministic
        idx = np.argsort(-std, kind="stable")[:k]
    elif mode == "random":
        idx = np.random.default_rng(seed).choice(d, size=k, replace=False)
    else:
        raise ConfigError(f"unknown feature selection {mode!r}; choose one of {', '.join(SELECTION_MODES)}")
    return np.sort(idx).astype(np.int64)
