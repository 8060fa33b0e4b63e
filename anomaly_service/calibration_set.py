"""What a fitted model keeps so that an update can re-calibrate without the original images: the held-out
calibration images' patch-embedding grids (kept dimensions, float16) and their shapes, as ``calibration.npz``."""

from __future__ import annotations

import numpy as np

from .artifact import arrays_to_bytes, bytes_to_arrays
from .errors import ModelFormatError

CALIBRATION_FILE = "calibration.npz"
# training images whose grids a leave-one-out fit keeps for updates: enough for the pixel floor, small on disk
CALIBRATION_SET_SIZE = 20


def calibration_set_bytes(grids: list[np.ndarray], shapes: list[tuple[int, ...]],
                          image_ids: np.ndarray | None = None, calibrated_ids: np.ndarray | None = None,
                          reals: list[np.ndarray | None] | None = None) -> bytes:
    """calibration.npz: ``grid_<i>`` (h, w, d) float16 patch embeddings of image i (tiled: (tiles, h, w, d)),
    ``shapes`` (n, 3). A
    leave-one-out fit adds ``image_ids`` (each grid's training image: its index in the catalog and the bank
    sources) and ``calibrated_ids`` (the training image of each of the calibration's scores, in order).
    ``real_<i>``: which pixels of grid i's image are its own, for an aligned turned copy (grain.py), read as the
    fit read it."""
    arrays = {f"grid_{i:04d}": g.astype(np.float16) for i, g in enumerate(grids)}
    arrays["shapes"] = np.array([tuple(sh[:2]) + (sh[2] if len(sh) > 2 else 1,) for sh in shapes], dtype=np.int64)
    for i, real in enumerate(reals or []):
        if real is not None:
            arrays[f"real_{i:04d}"] = np.packbits(real, axis=None)
            arrays[f"real_shape_{i:04d}"] = np.array(real.shape, dtype=np.int64)
    if image_ids is not None and calibrated_ids is not None:
        arrays["image_ids"] = np.asarray(image_ids, dtype=np.int64)
        arrays["calibrated_ids"] = np.asarray(calibrated_ids, dtype=np.int64)
    return arrays_to_bytes(arrays)


def read_left_out_ids(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """``(image_ids, calibrated_ids)`` of a leave-one-out fit's set; None for held-out grids (not in the bank)."""
    arrays = bytes_to_arrays(data, CALIBRATION_FILE)
    if "image_ids" not in arrays or "calibrated_ids" not in arrays:
        return None
    return arrays["image_ids"].astype(np.int64), arrays["calibrated_ids"].astype(np.int64)


def read_calibration_set(data: bytes, dim: int) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    arrays = bytes_to_arrays(data, CALIBRATION_FILE)
    shapes = arrays.get("shapes")
    n = 0 if shapes is None else len(shapes)
    grids = [arrays.get(f"grid_{i:04d}") for i in range(n)]
    if shapes is None or shapes.ndim != 2 or not n or any(g is None or g.ndim not in (3, 4) or g.shape[-1] != dim
                                                          for g in grids):
        raise ModelFormatError(f"{CALIBRATION_FILE} does not hold the calibration grids the manifest describes")
    return [(g, tuple(int(v) for v in sh)) for g, sh in zip(grids, shapes)]  # type: ignore[misc]


def read_real_masks(data: bytes) -> dict[int, np.ndarray]:
    """Grid index -> which pixels of its image are its own, for the aligned turned copies the set holds."""
    arrays = bytes_to_arrays(data, CALIBRATION_FILE)
    out = {}
    for key, packed in arrays.items():
        if key.startswith("real_") and not key.startswith("real_shape_"):
            i = int(key[5:])
            shape = tuple(int(v) for v in arrays[f"real_shape_{i:04d}"])
            out[i] = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
    return out


def with_calibrated_ids(data: bytes, calibrated_ids: list[int]) -> bytes:
    """The same set with the calibration's score order replaced (an update re-orders the scores it re-computes)."""
    arrays = bytes_to_arrays(data, CALIBRATION_FILE)
    arrays["calibrated_ids"] = np.asarray(calibrated_ids, dtype=np.int64)
    return arrays_to_bytes(arrays)
