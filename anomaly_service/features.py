"""Backbone feature maps -> locally aware patch embeddings (PatchCore, Roth et al. 2022, Sec. 3.1).

Each tapped map is averaged over its 3x3 neighborhood (the paper's local aggregation, which widens the
receptive field without losing resolution; zero padding is counted in the average, as patchcore-inspection's
zero-padded unfold and anomalib's AvgPool2d do, which also makes border patches match border patches), the
deeper map is resized to the shallower grid, and a layer wider than its equal share of ``target_dim`` is pooled
down to it by adaptive average pooling over channels, as patchcore-inspection does (ResNet-50: 512 + 1024
channels -> 512 + 512). A narrower layer keeps its channels (EfficientNet-Lite0: 40 + 112) and, with ``balance``
(the default), is scaled to the weight it has in patchcore-inspection, whose pooling *up* to the share repeats
channels: every layer then counts the same in the distance, as the ResNets' layers already do (docs/decisions.md).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def layer_share(n_layers: int, target_dim: int) -> int:
    """Dimensions each layer is entitled to: an equal share of ``target_dim``."""
    return max(1, target_dim // n_layers)


def layer_dims(channels: tuple[int, ...], target_dim: int) -> list[int]:
    """Channels each layer contributes: its share of ``target_dim``, never more than the layer has."""
    share = layer_share(len(channels), target_dim)
    return [min(c, share) for c in channels]


@lru_cache(maxsize=16)
def _pooling_matrix(channels: int, dims: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(dims, channels)``: row j averages the channels adaptive average pooling puts in output j."""
    eye = torch.eye(channels, dtype=dtype, device=device)
    return F.adaptive_avg_pool1d(eye[None], dims)[0].T.contiguous()


def _project_channels(m: torch.Tensor, dims: int, keep: torch.Tensor | None) -> torch.Tensor:
    """A layer's ``(B, C, H, W)`` map -> its ``dims`` pooled channels, or only the ``keep`` ones of them."""
    channels = m.shape[1]
    if dims == channels:
        return m if keep is None else m.index_select(1, keep)
    weights = _pooling_matrix(channels, dims, m.dtype, m.device)
    if keep is not None:
        weights = weights.index_select(0, keep)
    return F.conv2d(m, weights[:, :, None, None])  # a 1x1 convolution: the channel map at every position


def embed_patches(maps: list[torch.Tensor], target_dim: int, balance: bool = False,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[(B, C_l, H_l, W_l)]`` -> ``(B, H_0, W_0, D)`` with ``D = sum(layer_dims)``, or ``len(keep)`` when
    ``keep`` (sorted indices into those ``D`` dimensions, e.g. the std selection) is given.

    The channel pooling and the selection are linear maps over channels, and the 3x3 average and the resize are
    linear maps over positions, so they commute: channels are pooled and selected first, on each layer's own grid,
    and only the kept ones are averaged and resized (ResNet-50's layer3 holds 1024 channels on a grid 4x smaller
    than the output, so most of the aggregation work is skipped; docs/benchmarks.md). The result equals pooling
    everything then selecting, up to float rounding (tested).

    With ``balance``, a layer with fewer channels than its share is scaled by ``sqrt(share / channels)``: the L2
    geometry patchcore-inspection gets by pooling every layer *up* to the same width (which repeats channels),
    without storing the repeats. Each layer then weighs the same in the distance, whatever its channel count.
    """
    ref = maps[0].shape[-2:]
    dims = layer_dims(tuple(m.shape[1] for m in maps), target_dim)
    share = layer_share(len(maps), target_dim)
    parts = []
    offset = 0
    for m, d in zip(maps, dims):
        mine = None
        if keep is not None:
            mine = keep[(keep >= offset) & (keep < offset + d)] - offset
        offset += d
        if mine is not None and mine.numel() == 0:
            continue
        m = _project_channels(m, d, mine)
        m = F.avg_pool2d(m, kernel_size=3, stride=1, padding=1, count_include_pad=True)
        if m.shape[-2:] != ref:
            m = F.interpolate(m, size=ref, mode="bilinear", align_corners=False)
        if balance and d < share:
            m = m * math.sqrt(share / d)
        parts.append(m)
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous()
