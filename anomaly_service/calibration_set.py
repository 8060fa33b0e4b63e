"""What a fitted model keeps so that an update can re-calibrate without the original images: the held-out
calibration images' patch-embedding grids (kept dimensions, float16) and their shapes, as ``calibration.npz``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .artifact import arrays_to_bytes, bytes_to_arrays
from .errors import ModelFormatError

if TYPE_CHECKING:
    from .model import AnomalyModel

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


@dataclass(frozen=True)
class CalibrationSet:
    """calibration.npz read and checked once: what an update reads of it (the grids, the ids, which grids are turned
    copies and their own pixels). Every reader of an update takes this one parse, not the file again."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def read(cls, data: bytes, *, n_images: int, dim: int, n_scores: int, n_training: int | None) -> "CalibrationSet":
        """The set in ``data``, refused, naming the file, when it does not hold what the manifest describes, before
        an update does any work.

        Its checksum, verified at load, only says it is the file the model was saved with: a set written wrong,
        read as it is, made an update fail with a traceback, or worse re-calibrate on the wrong images without a
        word (the ids are zipped with the scores). Load does not read it (scoring never does). ``n_images``: the
        manifest's count of grids; ``dim``: the bank's width; ``n_scores``: the kNN calibration's scores, one per
        ``calibrated_ids`` entry; ``n_training``: the images the ids may name (the catalog's length; None: not
        checked)."""
        arrays = bytes_to_arrays(data, CALIBRATION_FILE)
        problem = _problem(arrays, n_images, dim, n_scores, n_training)
        if problem:
            raise ModelFormatError(f"{CALIBRATION_FILE} does not hold the calibration set the manifest describes "
                                   f"({problem}), so this model cannot be updated; it scores as before. Re-fit it "
                                   "to enable updates")
        return cls(arrays)

    @classmethod
    def of(cls, model: AnomalyModel) -> "CalibrationSet":
        """:meth:`read` of an updatable ``model``'s set, against what its manifest, bank and catalog describe."""
        manifest = model.manifest_
        assert model.calibration_set_ is not None and manifest is not None  # model.updatable
        assert manifest.calibration_set is not None
        fusion = manifest.fusion  # calibrated_ids name the kNN's scores, which a fused model keeps apart
        knn_scores = (fusion.knn_calibration if fusion is not None else manifest.calibration).holdout_scores
        return cls.read(model.calibration_set_, n_images=manifest.calibration_set.n_images,
                        dim=int(model.knn.index_.d), n_scores=len(knn_scores),  # type: ignore[union-attr]
                        n_training=len(model.catalog_) if model.catalog_ is not None else None)

    @property
    def grids(self) -> list[tuple[np.ndarray, tuple[int, ...]]]:
        """Each stored image's grid (float16) and its image's shape ``(h, w, channels)``."""
        shapes = self.arrays["shapes"]
        return [(self.arrays[f"grid_{i:04d}"], tuple(int(v) for v in sh)) for i, sh in enumerate(shapes)]

    @property
    def left_out_ids(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(image_ids, calibrated_ids)`` of a leave-one-out fit's set; None for held-out grids (not in the bank)."""
        if "image_ids" not in self.arrays:  # read() vouches that both are there or neither
            return None
        return self.arrays["image_ids"].astype(np.int64), self.arrays["calibrated_ids"].astype(np.int64)

    @property
    def turned(self) -> set[int] | None:
        """Which grids are turned copies, or None for a set written before it said."""
        flags = self.arrays.get("turned")
        return None if flags is None else set(np.flatnonzero(flags).tolist())

    @property
    def real_masks(self) -> dict[int, np.ndarray]:
        """Grid index -> which pixels of its image are its own, for the aligned turned copies the set holds."""
        out = {}
        for i in range(len(self.arrays["shapes"])):
            packed = self.arrays.get(f"real_{i:04d}")
            if packed is not None:
                shape = tuple(int(v) for v in self.arrays[f"real_shape_{i:04d}"])
                out[i] = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
        return out

    def with_calibrated_ids(self, calibrated_ids: list[int]) -> bytes:
        """The same set with the calibration's score order replaced (an update re-orders the scores it
        re-computes), as calibration.npz."""
        return arrays_to_bytes({**self.arrays, "calibrated_ids": np.asarray(calibrated_ids, dtype=np.int64)})


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
        if grid.size and not np.isfinite([grid.min(), grid.max()]).all():  # an update's threshold would be NaN
            return f"grid_{i:04d} holds NaN or infinity, where a fit stores finite features"
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
