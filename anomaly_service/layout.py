"""Whether the part has a layout, measured on the good images alone: what decides if the whole-image branch is fused.

A second opinion that sees the whole part (autoencoder.py's global branch) is worth fusing only where the part has a
layout to learn: a bottle upright in the frame, a board with its components in place. On a surface (a tile, a
commutator strip) or a part that arrives in any orientation there is none, and the branch would only add its noise
to the kNN's opinion.

The measure is the share of the good images' pixel variance that the position in the frame explains (an analysis of
variance): each image shrunk to 8x8 cells of mean colour, each channel standardized over images and cells, and the
variance between the cells' means over the images taken against the total, corrected for the chance share a few
images give pure noise (omega squared). Near 1 every place of the part always looks the same way (the layout is
fixed); near 0 any place looks like any other (a surface, or parts that lie any way round). Pixels, not backbone
features: the features near an image's edges differ from inner ones on every image (the network's zero padding),
so on features even a plain surface shows a "layout", and how much depends on the working size. At
:data:`LAYOUT_STRENGTH` or above the fit trains and fuses the branch; below, the kNN decides alone and the fit says
why (docs/decisions.md has the measurements).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

# the share of the pixel variance that position must explain for the whole-image branch to be fused
LAYOUT_STRENGTH = 0.5
# cells per side (the whole-image branch's own grid: autoencoder.GLOBAL_GRID)
CELLS = 8
# images read at most (evenly spaced): the statistic settles long before, and each costs a decode
MAX_IMAGES = 64
# fewer images than this tell nothing about positions: no layout is claimed
MIN_IMAGES = 5


def sample_ids(n: int) -> list[int]:
    """Up to :data:`MAX_IMAGES` evenly spaced indices of ``n`` images."""
    return sorted(set(np.linspace(0, n - 1, min(n, MAX_IMAGES)).astype(int).tolist())) if n else []


def layout_strength(images: Sequence[np.ndarray]) -> float | None:
    """Omega squared of the cell position over ``images`` (``(H, W, 3)`` uint8, any sizes); None with too few."""
    if len(images) < MIN_IMAGES:
        return None
    x = np.stack([np.asarray(Image.fromarray(im).resize((CELLS, CELLS), Image.Resampling.BOX), np.float64)
                  .reshape(CELLS * CELLS, -1) for im in images])  # (N, cells, channels)
    n, c, k = x.shape
    x = (x - x.mean((0, 1))) / np.maximum(x.std((0, 1)), 1e-9)
    between = n * float((x.mean(0) ** 2).sum())
    total = float((x**2).sum())
    if total <= 0:  # every image one flat colour: nothing varies, so nothing is fixed by position either
        return 0.0
    within_mean_square = (total - between) / (k * c * (n - 1))
    return max(0.0, (between - k * (c - 1) * within_mean_square) / (total + within_mean_square))
