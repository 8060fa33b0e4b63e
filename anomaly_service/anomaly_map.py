"""Patch-score grid -> anomaly map at the photo's own size: the map every score is read from.

The map is bilinearly upsampled to the working resolution, smoothed with a Gaussian (sigma=4 px there, as in
the paper) and resized to the original width and height, so it covers the whole frame. It is a scoring stage:
the scorers build it and the image score is read from it; heatmap.py only colours it for a person.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from .config import ModelConfig

# elements of one axis's matrix in anomaly_map: a photo side times the grid's; a 6000-pixel side of a 256-pixel
# working size is well under it, a strip millions of pixels long (a legal upload) is not
OPERATOR_MAX = 1 << 22
CACHED_MAX = 1 << 18  # elements of a matrix kept for the next photo of its size (32 sizes are kept)


def resize_map(arr: np.ndarray, size: tuple[int, int], dtype: type = np.float32,
               antialias: bool = False) -> np.ndarray:
    """Bilinear resize of a map, as the map's own steps resize it (a renderer or an aligned photo reuses it).
    ``antialias``: shrinking, each output pixel averages those it covers (a picture drawn smaller)."""
    if arr.shape == tuple(size):
        return arr
    # writable too: a map read back from a PIL image (grain.grid_back) is read-only, which torch warns about
    t = torch.from_numpy(np.require(arr, dtype, ("C", "W")))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=antialias)[0, 0].numpy()


def anomaly_map(grid: np.ndarray, work_size: tuple[int, int], out_size: tuple[int, int],
                sigma: float = ModelConfig.sigma) -> np.ndarray:
    """``(h, w)`` patch scores -> ``out_size`` (H, W) float32 map in the same units (L2 distance).

    The three steps (bilinear upsampling to ``work_size``, the Gaussian with replicated edges, the bilinear resize
    to ``out_size``) are each linear and act on rows and columns separately, so together they are one matrix per
    axis: ``map = A_rows @ grid @ A_cols.T``. Two small products cost a fraction of filtering the full-size map
    (which was most of a map's cost, and a map is built for every photo scored and every image a fit leaves out);
    the matrices come from running the steps themselves on unit grids (:func:`_axis_operator`), so the map is
    the steps' own up to float rounding (tested)."""
    h, w = grid.shape
    g = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    if int(out_size[0]) * h > OPERATOR_MAX or int(out_size[1]) * w > OPERATOR_MAX:
        # a side of millions of pixels: its matrix would be hundreds of MB (and cached). Smooth at the working size
        # with the small matrices, then one bilinear resize, whose memory is the map's own.
        rows = _axis_operator(h, int(work_size[0]), int(work_size[0]), float(sigma))
        cols = _axis_operator(w, int(work_size[1]), int(work_size[1]), float(sigma))
        return resize_map(((rows @ g) @ cols.T).numpy(), (int(out_size[0]), int(out_size[1])))
    rows = _axis_operator(h, int(work_size[0]), int(out_size[0]), float(sigma))
    cols = _axis_operator(w, int(work_size[1]), int(out_size[1]), float(sigma))
    # torch's products, on the thread pool the backbone uses: NumPy's BLAS pool spinning beside it slowed the
    # backbone and the search down (as index.BlockedFlatSearch found). The cheaper order first.
    if rows.shape[0] * w * (h + cols.shape[0]) <= cols.shape[0] * h * (w + rows.shape[0]):
        return ((rows @ g) @ cols.T).numpy()
    return (rows @ (g @ cols.T)).numpy()


def _axis_operator(n_grid: int, n_work: int, n_out: int, sigma: float) -> torch.Tensor:
    """The ``(n_out, n_grid)`` float32 matrix of one axis of :func:`anomaly_map`'s steps. A line sees a handful of
    photo sizes, whose matrices are a few kB to a few MB and kept; larger ones (a tiled 20-megapixel photo) are
    built each time, so that photos of many odd sizes cannot fill the memory with them."""
    if n_grid * n_out > CACHED_MAX:
        return _build_axis_operator.__wrapped__(n_grid, n_work, n_out, sigma)
    return _build_axis_operator(n_grid, n_work, n_out, sigma)


@lru_cache(maxsize=32)
def _build_axis_operator(n_grid: int, n_work: int, n_out: int, sigma: float) -> torch.Tensor:
    """Built by applying the steps (in float64) to the ``n_grid`` unit vectors: column ``k`` is the map of a grid
    that is 1 at ``k``."""
    m = resize_map(np.eye(n_grid), (n_work, n_grid), np.float64)  # columns untouched: resized along axis 0 only
    if sigma > 0:
        m = gaussian_filter1d(m, sigma=sigma, axis=0, mode="nearest", truncate=4.0)
    m = resize_map(m, (n_out, n_grid), np.float64)
    return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
