"""Patch-score grid -> anomaly map at the uploaded image's own size, and color renderings of it.

The map is bilinearly upsampled to the working resolution, smoothed with a Gaussian (sigma=4 px there, as in
the paper) and resized to the original width and height, so it covers the whole frame. Color renderings use
one global scale from the model's calibration: a normal part looks cool, and no map is stretched per image.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

DISPLAY_MAX = 1.5  # normalized score shown as the hottest color; 1.0 (the threshold) sits at two thirds


def resize_map(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if arr.shape == tuple(size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def anomaly_map(grid: np.ndarray, work_size: tuple[int, int], out_size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """``(h, w)`` patch scores -> ``out_size`` (H, W) float32 map in the same units (L2 distance)."""
    m = resize_map(grid.astype(np.float32), work_size)
    if sigma > 0:
        m = gaussian_filter(m, sigma=sigma, mode="nearest", truncate=4.0)
    return resize_map(m, out_size).astype(np.float32, copy=False)


@lru_cache(maxsize=4)
def color_table(name: str = "turbo") -> np.ndarray:
    """256x3 uint8 lookup table from a matplotlib color map, computed once per process."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def color_index(normalized: np.ndarray, vmax: float = DISPLAY_MAX) -> np.ndarray:
    """Normalized map (1.0 = threshold) -> uint8 color-table indices on the fixed global scale ``[0, vmax]``."""
    scaled = np.multiply(normalized, 255.0 / vmax, dtype=np.float32)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def _paletted(normalized: np.ndarray, vmax: float, cmap: str) -> Image.Image:
    idx = np.ascontiguousarray(color_index(normalized, vmax))
    img = Image.frombuffer("P", (idx.shape[1], idx.shape[0]), idx.tobytes(), "raw", "P", 0, 1)
    img.putpalette(color_table(cmap).tobytes())
    return img


def colorize(normalized: np.ndarray, vmax: float = DISPLAY_MAX, cmap: str = "turbo") -> np.ndarray:
    """Normalized map -> ``(H, W, 3)`` uint8 colors (the table lookup runs in Pillow's C code)."""
    return np.asarray(_paletted(normalized, vmax, cmap).convert("RGB"))


def overlay(image: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a color heatmap over the RGB image (same size)."""
    return np.asarray(Image.blend(Image.fromarray(image), Image.fromarray(heat_rgb), alpha))


def heatmap_png(normalized: np.ndarray, vmax: float = DISPLAY_MAX, cmap: str = "turbo") -> bytes:
    """The color heatmap as a palette PNG: a third of the bytes to compress, same picture once decoded."""
    buf = io.BytesIO()
    _paletted(normalized, vmax, cmap).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
