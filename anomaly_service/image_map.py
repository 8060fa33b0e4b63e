"""Where a part sits among the training images: a two-dimensional map of image features, cheap enough to place
every scored part on it.

The product grew from looking at parts among the good ones on an embedding map. ``anomaly evaluate --report``
draws one with t-SNE (evaluate.py), which shows clusters well but cannot place a new point without re-running.
The station page needs the scored part on the map at scoring time, so this map is linear: each image's pooled
feature (the mean of its patch features in the kept dimensions, what the bank holds) projected on the training
set's two main directions (PCA). Placing a part is a mean over its patches and a ``(d, 2)`` product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ModelFormatError

PREFIX = "map_"  # the map's arrays inside training_images.npz (provenance.py)


def pooled_features(selected: torch.Tensor, grids: list[tuple[int, ...]]) -> np.ndarray:
    """``(n, d)`` float32: per image, the mean of its rows of ``selected`` (every patch of every image, image by
    image, in the kept dimensions, as the fit concatenates them), split by the images' feature ``grids``
    (``(h, w)``, or ``(tiles, h, w)`` for a tiled image)."""
    # one scatter-add over all rows, not a mean per image: hundreds of tiny parallel ops stall on a busy CPU
    sizes = torch.tensor([math.prod(g) for g in grids], device=selected.device)
    owner = torch.repeat_interleave(torch.arange(len(grids), device=selected.device), sizes)
    sums = torch.zeros((len(grids), selected.shape[1]), device=selected.device).index_add_(0, owner, selected.float())
    return (sums / sizes[:, None]).cpu().numpy().astype(np.float32)


@dataclass(frozen=True, eq=False)
class ImageMap:
    """A PCA of the training images' pooled features and each training image's place on it (catalog order)."""

    mean: np.ndarray  # (d,) float32: the training images' mean pooled feature
    components: np.ndarray  # (2, d) float32: the two main directions, unit length (zero when there is none)
    explained: np.ndarray  # (2,) float32: the share of the training images' variance along each
    points: np.ndarray  # (n, 2) float32: each training image's place

    @classmethod
    def fit(cls, pooled: np.ndarray) -> "ImageMap":
        """The map of these ``(n, d)`` pooled features (one row per training image)."""
        x = np.asarray(pooled, dtype=np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        components = np.zeros((2, x.shape[1]))
        explained = np.zeros(2)
        total = float((s ** 2).sum())
        for i in range(min(2, len(s))):
            if s[i] > 1e-9 * max(s[0], 1e-30):
                # sign fixed by the largest loading, so the same images give the same picture on every machine
                v = vt[i] if vt[i][np.argmax(np.abs(vt[i]))] >= 0 else -vt[i]
                components[i], explained[i] = v, s[i] ** 2 / total
        out = cls(mean=mean.astype(np.float32), components=components.astype(np.float32),
                  explained=explained.astype(np.float32), points=np.zeros((0, 2), np.float32))
        return out.extended(pooled)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def project(self, pooled: np.ndarray) -> np.ndarray:
        """``(..., d)`` pooled features -> ``(..., 2)`` places on the map."""
        return ((np.asarray(pooled, dtype=np.float32) - self.mean) @ self.components.T).astype(np.float32)

    def extended(self, pooled: np.ndarray) -> "ImageMap":
        """The same map with these images' places appended (an update adds its good images; the directions
        stay, so earlier places do not move)."""
        return ImageMap(self.mean, self.components, self.explained,
                        np.concatenate([self.points, self.project(np.asarray(pooled).reshape(-1, self.dim))]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f"{PREFIX}mean": self.mean, f"{PREFIX}components": self.components,
                f"{PREFIX}explained": self.explained, f"{PREFIX}points": self.points}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_images: int) -> "ImageMap | None":
        """The map stored among ``arrays`` (None when there is none: catalogs saved before it was kept)."""
        if f"{PREFIX}points" not in arrays:
            return None
        try:
            out = cls(*(arrays[f"{PREFIX}{k}"].astype(np.float32) for k in ("mean", "components", "explained",
                                                                              "points")))
        except KeyError as exc:
            raise ModelFormatError(f"the image map lacks {exc}") from None
        d = out.mean.shape[0] if out.mean.ndim == 1 else -1
        if out.components.shape != (2, d) or out.explained.shape != (2,) or out.points.shape != (n_images, 2):
            raise ModelFormatError(f"the image map's arrays do not fit together ({out.mean.shape}, "
                                   f"{out.components.shape}, {out.points.shape} for {n_images} images)")
        return out
