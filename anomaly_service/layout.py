"""Whether the part has a layout, measured on the good images alone: what decides if the whole-image branch is fused.

A second opinion that sees the whole part (autoencoder.py's global branch) is worth fusing only where the part has a
layout to learn: a bottle upright in the frame, a board with its components in place. On a surface (a tile, a
commutator strip) or a part that arrives in any orientation there is none, and the branch would only add its noise
to the kNN's opinion.

The measure is the share of the good images' feature variance that the position explains (an analysis of variance,
eta squared): each image's feature grid pooled to the branch's cells, each dimension standardized over images and
cells, and the variance of the per-cell means over the images taken against the total. Near 1 every place on the
part always looks the same way (the layout is fixed); near 0 any place looks like any other (a surface, or parts
that lie any way round). The ring of cells along the image's edges is left out: the backbone sees its zero padding
there, so edge cells differ from inner ones on every image, layout or not. At :data:`LAYOUT_STRENGTH` or above the
fit fuses the branch; below, the kNN decides alone and the fit says why (docs/decisions.md has the measurements).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# the share of the feature variance that position must explain for the whole-image branch to be fused
LAYOUT_STRENGTH = 0.5
# the cells the grid is pooled to (the whole-image branch's own; autoencoder.GLOBAL_GRID) and the ring left out
CELLS = 8
RING = 1
# images read at most (evenly spaced): the statistic settles long before, and every image costs a read of its grid
MAX_IMAGES = 64
# fewer images than this tell nothing about positions: no layout is claimed
MIN_IMAGES = 5


def layout_strength(grids: Sequence[torch.Tensor]) -> float | None:
    """Eta squared of position over the good images' ``(h, w, D)`` feature ``grids``; None with too few images."""
    if len(grids) < MIN_IMAGES:
        return None
    step = max(1, len(grids) // MAX_IMAGES)
    z = torch.stack([F.adaptive_avg_pool2d(g.permute(2, 0, 1)[None].float(), CELLS)[0]
                     for g in list(grids)[::step][:MAX_IMAGES]])  # (N, D, CELLS, CELLS)
    z = z[:, :, RING : CELLS - RING, RING : CELLS - RING]
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    total = float((z**2).sum())
    between = float((z.mean(0) ** 2).sum()) * len(z)
    return between / total if total > 0 else 0.0
