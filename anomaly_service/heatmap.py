"""Color renderings of an anomaly map (anomaly_map.py builds it): one global scale from the model's calibration,
so a normal part looks cool and no map is stretched per image.
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib import resources

import numpy as np
from PIL import Image

DISPLAY_MAX = 1.5  # normalized score shown as the hottest color; 1.0 (the threshold) sits at two thirds


@lru_cache(maxsize=4)
def color_table(name: str = "turbo") -> np.ndarray:
    """256x3 uint8 lookup table of a color map, read once per process from the package (``colormaps/NAME.hex``:
    matplotlib's map sampled at 256 points, one ``rrggbb`` a line).

    Why not matplotlib at run time: importing it needs a writable config directory (the home's, else a temporary
    one), and on a read-only root file system whose working directory and ``/tmp`` take no writes the service did
    not start at all; with a read-only home it warned at every start and left a temporary directory behind."""
    try:
        text = resources.files(__package__).joinpath("colormaps", f"{name}.hex").read_text()
    except FileNotFoundError:
        raise ValueError(f"unknown color map {name!r}") from None
    return np.frombuffer(bytes.fromhex("".join(text.split())), np.uint8).reshape(-1, 3)


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
