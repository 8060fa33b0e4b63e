"""Backbone feature maps -> locally aware patch embeddings (PatchCore, Roth et al. 2022, Sec. 3.1).

Each tapped map is averaged over its 3x3 neighbourhood (the paper's local aggregation, which widens the
receptive field without losing resolution; zero padding is counted in the average, as patchcore-inspection's
zero-padded unfold and anomalib's AvgPool2d do, which also makes border patches match border patches), the
deeper map is resized to the shallower grid, and each layer is projected to an equal share of ``target_dim``
by adaptive average pooling over channels, as patchcore-inspection does, so that neither layer dominates the L2
distance by sheer channel count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_share(n_layers: int, target_dim: int) -> int:
    """Dimensions each layer is entitled to: an equal share of ``target_dim``."""
    return max(1, target_dim // n_layers)


def layer_dims(channels: tuple[int, ...], target_dim: int) -> list[int]:
    """Channels each layer contributes: its share of ``target_dim``, never more than the layer has."""
    share = layer_share(len(channels), target_dim)
    return [min(c, share) for c in channels]


def embed_patches(maps: list[torch.Tensor], target_dim: int, balance: bool = False) -> torch.Tensor:
    """``[(B, C_l, H_l, W_l)]`` -> ``(B, H_0, W_0, D)`` with ``D = sum(layer_dims)``.

    With ``balance``, a layer with fewer channels than its share is scaled by ``sqrt(share / channels)``: the L2
    geometry patchcore-inspection gets by pooling every layer *up* to the same width (which repeats channels),
    without storing the repeats. Each layer then weighs the same in the distance, whatever its channel count.
    """
    ref = maps[0].shape[-2:]
    dims = layer_dims(tuple(m.shape[1] for m in maps), target_dim)
    share = layer_share(len(maps), target_dim)
    parts = []
    for m, d in zip(maps, dims):
        m = F.avg_pool2d(m, kernel_size=3, stride=1, padding=1, count_include_pad=True)
        if m.shape[-2:] != ref:
            m = F.interpolate(m, size=ref, mode="bilinear", align_corners=False)
        m = m.permute(0, 2, 3, 1)  # channels last so pooling over channels is a 1-D pool
        if d < m.shape[-1]:
            b, h, w, c = m.shape
            m = F.adaptive_avg_pool1d(m.reshape(-1, 1, c), d).reshape(b, h, w, d)
        if balance and d < share:
            m = m * math.sqrt(share / d)
        parts.append(m)
    return torch.cat(parts, dim=-1).contiguous()
