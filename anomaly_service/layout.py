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
why (docs/decisions.md has the measurements). With an inspection mask only the inspected pixels count: the branch
never sees the others (the network's input is blanked there), so a fixture fixed in the frame but masked out is no
layout, and a label that changes from part to part but is masked out takes none away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .inspection_mask import InspectionMask

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


def _cells(image: np.ndarray, inspect: InspectionMask | None) -> np.ndarray:
    """``image``'s mean colour in each of the ``CELLS x CELLS`` cells, ``(cells, channels)``; with ``inspect``, the
    mean of the inspected pixels alone (NaN in a cell none of whose pixels is inspected)."""
    if inspect is None:
        cells = Image.fromarray(image).resize((CELLS, CELLS), Image.Resampling.BOX)
        return np.asarray(cells, np.float64).reshape(CELLS * CELLS, -1)
    seen = inspect.at(image.shape).astype(np.float32)

    def box(plane: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(plane).resize((CELLS, CELLS), Image.Resampling.BOX), np.float64).ravel()

    share = box(seen)
    sums = np.stack([box(image[..., c].astype(np.float32) * seen) for c in range(image.shape[-1])], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(share[:, None] > 0, sums / share[:, None], np.nan)


def layout_strength(images: Sequence[np.ndarray], inspect: InspectionMask | None = None) -> float | None:
    """Omega squared of the cell position over ``images`` (``(H, W, 3)`` uint8, any sizes); None with too few.
    ``inspect``: the fit's inspection mask; the cells it inspects (:meth:`InspectionMask.at` on the cell grid), each
    read on its inspected pixels, are the only ones measured."""
    if len(images) < MIN_IMAGES:
        return None
    x = np.stack([_cells(im, inspect) for im in images])  # (N, cells, channels)
    if inspect is not None:
        x = x[:, inspect.at((CELLS, CELLS)).ravel() & ~np.isnan(x).any(axis=(0, 2))]
    n, c, k = x.shape
    if c < 2:  # one inspected cell: no position to tell apart
        return 0.0
    x = (x - x.mean((0, 1))) / np.maximum(x.std((0, 1)), 1e-9)
    between = n * float((x.mean(0) ** 2).sum())
    total = float((x**2).sum())
    if total <= 0:  # every image one flat colour: nothing varies, so nothing is fixed by position either
        return 0.0
    within_mean_square = (total - between) / (k * c * (n - 1))
    return max(0.0, (between - k * (c - 1) * within_mean_square) / (total + within_mean_square))
