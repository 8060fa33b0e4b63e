"""What a fitted model keeps so that an update can re-calibrate without the original images: the held-out
calibration images' patch-embedding grids (kept dimensions, float16) and their shapes, as ``calibration.npz``."""

from __future__ import annotations

import numpy as np

from .artifact import arrays_to_bytes, bytes_to_arrays
from .errors import ModelFormatError

CALIBRATION_FILE = "calibration.npz"


def calibration_set_bytes(grids: list[np.ndarray], shapes: list[tuple[int, ...]]) -> bytes:
    """calibration.npz: ``grid_<i>`` (h, w, d) float16 patch embeddings of held-out image i, ``shapes`` (n, 3)."""
    arrays = {f"grid_{i:04d}": g.astype(np.float16) for i, g in enumerate(grids)}
    arrays["shapes"] = np.array([tuple(sh[:2]) + (sh[2] if len(sh) > 2 else 1,) for sh in shapes], dtype=np.int64)
    return arrays_to_bytes(arrays)


def read_calibration_set(data: bytes, dim: int) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    arrays = bytes_to_arrays(data)
    shapes = arrays.get("shapes")
    n = 0 if shapes is None else len(shapes)
    grids = [arrays.get(f"grid_{i:04d}") for i in range(n)]
    if shapes is None or shapes.ndim != 2 or not n or any(g is None or g.ndim != 3 or g.shape[-1] != dim
                                                          for g in grids):
        raise ModelFormatError(f"{CALIBRATION_FILE} does not hold the calibration grids the manifest describes")
    return [(g, tuple(int(v) for v in sh)) for g, sh in zip(grids, shapes)]  # type: ignore[misc]
