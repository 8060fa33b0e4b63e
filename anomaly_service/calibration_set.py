"""What a fitted model keeps so that an update can re-calibrate without the original images: the held-out
calibration images' patch-embedding grids (kept dimensions, float16) and their shapes, as ``calibration.npz``."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .artifact import arrays_to_bytes, bytes_to_arrays
from .errors import ModelFormatError

CALIBRATION_FILE = "calibration.npz"
# training images whose grids a leave-one-out fit keeps for updates: enough for the pixel floor, small on disk
CALIBRATION_SET_SIZE = 20


def calibration_set_bytes(grids: list[np.ndarray], shapes: list[tuple[int, ...]],
                          image_ids: np.ndarray | None = None, calibrated_ids: np.ndarray | None = None,
                          reals: list[np.ndarray | None] | None = None, turned: Sequence[bool] | None = None
                          ) -> bytes:
    """calibration.npz: ``grid_<i>`` (h, w, d) float16 patch embeddings of image i (tiled: (tiles, h, w, d)),
    ``shapes`` (n, 3). A
    leave-one-out fit adds ``image_ids`` (each grid's training image: its index in the catalog and the bank
    sources) and ``calibrated_ids`` (the training image of each of the calibration's scores, in order).
    ``real_<i>``: which pixels of grid i's image are its own, for an aligned turned copy (grain.py), read as the
    fit read it. ``turned``: which grids are turned copies (``orientation=any``), which an update searches against
    every row as the fit did, the others as upright photos."""
    arrays = {f"grid_{i:04d}": g.astype(np.float16) for i, g in enumerate(grids)}
    if turned is not None:
        arrays["turned"] = np.asarray(turned, dtype=bool)
    arrays["shapes"] = np.array([tuple(sh[:2]) + (sh[2] if len(sh) > 2 else 1,) for sh in shapes], dtype=np.int64)
    for i, real in enumerate(reals or []):
        if real is not None:
            arrays[f"real_{i:04d}"] = np.packbits(real, axis=None)
            arrays[f"real_shape_{i:04d}"] = np.array(real.shape, dtype=np.int64)
    if image_ids is not None and calibrated_ids is not None:
        arrays["image_ids"] = np.asarray(image_ids, dtype=np.int64)
        arrays["calibrated_ids"] = np.asarray(calibrated_ids, dtype=np.int64)
    return arrays_to_bytes(arrays)


def check_calibration_set(data: bytes, *, n_images: int, dim: int, n_scores: int, n_training: int | None) -> None:
    """Refuse a set that does not hold what the manifest describes, naming the file, before an update does any work.

    Its checksum, verified at load, only says it is the file the model was saved with: a set written wrong, read
    as it is, made an update fail with a traceback, or worse re-calibrate on the wrong images without a word (the
    ids are zipped with the scores). Load does not read it (scoring never does). ``n_images``: the manifest's
    count of grids; ``dim``: the bank's width; ``n_scores``: the kNN calibration's scores, one per ``calibrated_ids``
    entry; ``n_training``: the images the ids may name (the catalog's length; None: not checked)."""
    problem = _problem(bytes_to_arrays(data, CALIBRATION_FILE), n_images, dim, n_scores, n_training)
    if problem:
        raise ModelFormatError(f"{CALIBRATION_FILE} does not hold the calibration set the manifest describes "
                               f"({problem}), so this model cannot be updated; it scores as before. Re-fit it "
                               "to enable updates")


def _problem(arrays: dict[str, np.ndarray], n_images: int, dim: int, n_scores: int,
             n_training: int | None) -> str | None:
    """What is wrong with a calibration set's arrays (calibration_set_bytes' layout), or None."""
    shapes = arrays.get("shapes")
    if shapes is None or shapes.ndim != 2 or shapes.shape[1] != 3 or shapes.dtype.kind not in "iu":
        return "no (n, 3) integer array 'shapes'"
    if len(shapes) != n_images or not len(shapes) or (shapes <= 0).any():
        return f"'shapes' holds {len(shapes)} image sizes, not the manifest's {n_images}, or a size that is not > 0"
    turned = arrays.get("turned")
    if turned is not None and (turned.dtype != bool or turned.shape != (n_images,)):
        return "'turned' is not one flag a grid"
    for i in range(n_images):
        grid = arrays.get(f"grid_{i:04d}")
        if grid is None or grid.ndim not in (3, 4) or grid.shape[-1] != dim or grid.dtype.kind != "f":
            return f"grid_{i:04d} is missing or not a float grid of width {dim}"
        real = arrays.get(f"real_{i:04d}")
        if real is not None:
            shape = arrays.get(f"real_shape_{i:04d}")
            if shape is None or shape.shape != (2,) or tuple(shape) != tuple(shapes[i, :2]):
                return f"real_{i:04d} has no real_shape_{i:04d} matching its image's size"
            if real.dtype != np.uint8 or real.shape != (-(-int(np.prod(shape)) // 8),):
                return f"real_{i:04d} does not hold one bit a pixel of its image"
    ids = [arrays.get(k) for k in ("image_ids", "calibrated_ids")]
    if ids[0] is None and ids[1] is None:
        return None  # held-out grids
    if any(a is None or a.ndim != 1 or a.dtype.kind not in "iu" for a in ids):
        return "'image_ids' and 'calibrated_ids' must be given together, as integer lists"
    image_ids, calibrated_ids = ids
    if len(image_ids) != n_images or len(calibrated_ids) != n_scores:
        return (f"{len(image_ids)} image ids for {n_images} grids, {len(calibrated_ids)} calibrated ids for "
                f"{n_scores} calibration scores")
    if not set(image_ids.tolist()) <= set(calibrated_ids.tolist()):
        return "an image id is not among the calibrated ids"
    if n_training is not None and len(calibrated_ids) and \
            not 0 <= calibrated_ids.min() <= calibrated_ids.max() < n_training:
        return f"a calibrated id names no training image (the model has {n_training})"
    return None


def read_turned(data: bytes) -> set[int] | None:
    """Which grids of the set are turned copies, or None for a set written before it said (check_calibration_set
    vouches for the array)."""
    flags = bytes_to_arrays(data, CALIBRATION_FILE).get("turned")
    return None if flags is None else set(np.flatnonzero(flags).tolist())


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
    for i in range(len(arrays.get("shapes", ()))):  # the grids' own masks (check_calibration_set vouches for them)
        packed = arrays.get(f"real_{i:04d}")
        if packed is not None:
            shape = tuple(int(v) for v in arrays[f"real_shape_{i:04d}"])
            out[i] = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
    return out


def with_calibrated_ids(data: bytes, calibrated_ids: list[int]) -> bytes:
    """The same set with the calibration's score order replaced (an update re-orders the scores it re-computes)."""
    arrays = bytes_to_arrays(data, CALIBRATION_FILE)
    arrays["calibrated_ids"] = np.asarray(calibrated_ids, dtype=np.int64)
    return arrays_to_bytes(arrays)
