"""Where a part sits among the training images: a two-dimensional map of image features, cheap enough to place
every scored part on it.

The product grew from looking at parts among the good ones on an embedding map. ``anomaly evaluate --report``
draws one with t-SNE (evaluate.py), which shows clusters well but cannot place a new point without re-running.
The station page needs the scored part on the map at scoring time, so this map is linear: each image's pooled
feature (the mean of its patch features in the kept dimensions, what the bank holds) projected on the training
set's two main directions (PCA). Placing a part is a mean over its patches and a ``(d, 2)`` product.

The same PCA, kept to ``SPREAD_DIRECTIONS`` directions and whitened, gives the part's *feature distance*: how far
its pooled feature lies from the training images' mean, each direction in units of the training images' spread
along it. The drift monitor tracks it (drift.py): a dimmer lamp or a lost contrast moves every part's feature along
directions the training images barely vary in, which the raw kNN distance can miss. Its reference is each training
image's distance on a PCA fitted without it (``SPREAD_FOLDS``-fold), so it is what a new good part would read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import ModelFormatError

PREFIX = "map_"  # the map's arrays inside training_images.npz (provenance.py)
SPREAD_DIRECTIONS = 20  # the feature distance's whitened directions (docs/decisions.md, drift)
SPREAD_FOLDS = 5  # its reference: each image's distance on a PCA fitted without its fold
SPREAD_IMAGES_PER_DIRECTION = 4  # a direction's spread needs several images to be estimated at all


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
    # the feature distance (None in catalogs saved before it, or with too few images to estimate a spread):
    basis: np.ndarray | None = None  # (k, d) float32: the main directions it is measured along
    spread: np.ndarray | None = None  # (k,) float32: the training images' standard deviation along each
    distances: np.ndarray | None = None  # (n,) float32: each training image's out-of-fold feature distance

    @classmethod
    def fit(cls, pooled: np.ndarray, directions: int = SPREAD_DIRECTIONS) -> "ImageMap":
        """The map of these ``(n, d)`` pooled features (one row per training image)."""
        x = np.asarray(pooled, dtype=np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        basis = spread = distances = None
        k = _spread_directions(len(x), s, directions)
        if k:
            basis, spread = vt[:k], _spread(s, len(x), k)
            distances = _out_of_fold_distances(x, k, floor=1e-3 * float(spread[0]))
            if not np.isfinite(distances).all():  # cannot happen with the floor; never keep a reference that lies
                basis = spread = distances = None
        components = np.zeros((2, x.shape[1]))
        explained = np.zeros(2)
        total = float((s ** 2).sum())
        for i in range(min(2, len(s))):
            if s[i] > 1e-9 * max(s[0], 1e-30):
                # sign fixed by the largest loading, so the same images give the same picture on every machine
                v = vt[i] if vt[i][np.argmax(np.abs(vt[i]))] >= 0 else -vt[i]
                components[i], explained[i] = v, s[i] ** 2 / total
        out = cls(mean=mean.astype(np.float32), components=components.astype(np.float32),
                  explained=explained.astype(np.float32), points=cls.project_on(mean, components, x),
                  basis=None if basis is None else basis.astype(np.float32),
                  spread=None if spread is None else spread.astype(np.float32),
                  distances=None if distances is None else distances.astype(np.float32))
        return out

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @staticmethod
    def project_on(mean: np.ndarray, components: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        return ((np.asarray(pooled, dtype=np.float32) - mean.astype(np.float32))
                @ components.astype(np.float32).T).astype(np.float32)

    def project(self, pooled: np.ndarray) -> np.ndarray:
        """``(..., d)`` pooled features -> ``(..., 2)`` places on the map."""
        return self.project_on(self.mean, self.components, pooled)

    def feature_distance(self, pooled: np.ndarray) -> np.ndarray | None:
        """``(..., d)`` pooled features -> ``(...)`` whitened distances to the training mean (None: not kept)."""
        if self.basis is None or self.spread is None:
            return None
        return np.linalg.norm(self.project_on(self.mean, self.basis, pooled) / self.spread, axis=-1)

    def extended(self, pooled: np.ndarray) -> "ImageMap":
        """The same map with these images' places appended (an update adds its good images; the directions
        stay, so earlier places do not move). Their feature distances join the reference: measured on
        directions fitted without them, they are out-of-sample like the fit's own."""
        x = np.asarray(pooled).reshape(-1, self.dim)
        distances = self.feature_distance(x)
        return replace(self, points=np.concatenate([self.points, self.project(x)]),
                       distances=None if distances is None or self.distances is None
                       else np.concatenate([self.distances, distances.astype(np.float32)]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"{PREFIX}mean": self.mean, f"{PREFIX}components": self.components,
               f"{PREFIX}explained": self.explained, f"{PREFIX}points": self.points}
        if self.basis is not None and self.spread is not None and self.distances is not None:
            out.update({f"{PREFIX}basis": self.basis, f"{PREFIX}spread": self.spread,
                        f"{PREFIX}distances": self.distances})
        return out

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
        if f"{PREFIX}basis" in arrays:  # catalogs saved before the feature distance have none
            try:
                basis, spread, distances = (arrays[f"{PREFIX}{k}"].astype(np.float32)
                                            for k in ("basis", "spread", "distances"))
            except KeyError as exc:
                raise ModelFormatError(f"the image map lacks {exc}") from None
            k = basis.shape[0] if basis.ndim == 2 else -1
            if basis.shape != (k, d) or spread.shape != (k,) or distances.shape != (n_images,):
                raise ModelFormatError(f"the image map's feature distance does not fit its map ({basis.shape}, "
                                       f"{spread.shape}, {distances.shape} for {n_images} images of dimension {d})")
            if (spread > 0).all() and np.isfinite(basis).all() and np.isfinite(distances).all():
                out = replace(out, basis=basis, spread=spread, distances=distances)
            # else: a reference that cannot be trusted; the model scores as ever and drift tracks the rest
        return out


def _spread_directions(n: int, singular: np.ndarray, directions: int) -> int:
    """How many directions the feature distance uses: as many as the smaller fold sample can estimate (so the
    fit's and the reference's distances have the same number of terms), 0 when that is fewer than two."""
    n_fold = n - math.ceil(n / SPREAD_FOLDS)
    carried = int(np.sum(singular > 1e-6 * max(float(singular[0]) if singular.size else 0.0, 1e-30)))
    k = min(directions, n_fold // SPREAD_IMAGES_PER_DIRECTION, carried)
    return k if k >= 2 else 0


def _spread(singular: np.ndarray, n: int, k: int) -> np.ndarray:
    """The standard deviation along the first ``k`` directions, floored so a direction no image varies in cannot
    turn a rounding error into a distance."""
    sd = singular[:k] / math.sqrt(max(n - 1, 1))
    return np.maximum(sd, 1e-3 * sd[0])


def _out_of_fold_distances(x: np.ndarray, k: int, floor: float) -> np.ndarray:
    """Each row's feature distance on the mean, directions and spread of the rows outside its fold. A fold's spread
    is floored at ``floor`` (the whole fit's relative floor, see :func:`_spread`): the rows outside a fold may all
    be alike (a training folder with duplicates), and a zero spread would turn the fold's distances into
    infinities. ``k`` is at most a quarter of the rows outside a fold (:func:`_spread_directions`), so there are
    rows enough that no fold is empty."""
    out = np.empty(len(x))
    fold = np.arange(len(x)) % SPREAD_FOLDS
    for f in range(SPREAD_FOLDS):
        inside, rest = x[fold == f], x[fold != f]
        mean = rest.mean(axis=0)
        _, s, vt = np.linalg.svd(rest - mean, full_matrices=False)
        sd = np.maximum(_spread(s, len(rest), k), floor)
        out[fold == f] = np.linalg.norm(((inside - mean) @ vt[:k].T) / sd, axis=1)
    return out
