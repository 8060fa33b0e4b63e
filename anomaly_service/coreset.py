"""Greedy k-center coreset subsampling of the patch bank (PatchCore Sec. 3.2, Algorithm 1).

Each step adds the patch farthest from everything chosen so far, so the kept subset covers the normal feature
space with the smallest worst-case gap. Distances are computed after a random Gaussian projection to
``proj_dim`` dimensions (Johnson-Lindenstrauss), as in the paper. One step is one matrix-vector product over
the bank plus an elementwise minimum, vectorised in torch, on the GPU when the bank lives there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm


def coreset_size(n_total: int, ratio: float, max_size: int | None = None) -> int:
    n = max(1, int(math.ceil(n_total * ratio)))
    if max_size is not None:
        n = min(n, max_size)
    return min(n, n_total)


def random_projection(features: torch.Tensor, proj_dim: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """Project rows to ``proj_dim`` with a seeded Gaussian matrix; identity when already that small."""
    n, d = features.shape
    if proj_dim <= 0 or d <= proj_dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim)).to(features.device)
    out = torch.empty(n, proj_dim, device=features.device)
    for i in range(0, n, chunk):
        out[i : i + chunk] = features[i : i + chunk].float() @ proj
    return out


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    proj_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by greedy k-center on the (projected) features, in selection order."""
    n = features.shape[0]
    if n_select >= n:
        return np.arange(n, dtype=np.int64)
    x = random_projection(features, proj_dim, seed)
    x = x - x.mean(0, keepdim=True)  # centring keeps |x|^2 small, so the expanded distance stays accurate
    sq = (x * x).sum(1)
    g = torch.Generator().manual_seed(seed)
    current = torch.randint(n, (1,), generator=g).to(x.device)[0]
    selected = torch.empty(n_select, dtype=torch.long, device=x.device)
    selected[0] = current
    # squared distance to the nearest selected centre, for every patch
    min_dist = (sq - 2.0 * (x @ x[current]) + sq[current]).clamp_min_(0)
    bar = tqdm(total=n_select, desc="coreset", unit="patch", disable=not progress, mininterval=0.5, leave=False)
    bar.update(1)
    for step in range(1, n_select):
        current = torch.argmax(min_dist)
        selected[step] = current
        dist = (sq - 2.0 * (x @ x[current]) + sq[current]).clamp_min_(0)
        torch.minimum(min_dist, dist, out=min_dist)
        bar.update(1)
    bar.close()
    return selected.cpu().numpy()
