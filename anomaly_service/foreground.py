"""``--mask auto``: the part's foreground found from the good images' patch features, as an inspection mask.

On a fixed camera the part and what surrounds it (conveyor, fixture, table) are the two largest kinds of patches,
so the first principal component of the training patches separates them (as AnomalyDINO masks with DINOv2
features). Every patch is projected on it and split in two by Otsu's threshold; each training image votes per
pixel and the majority is kept. The class that holds the frame's centre more than its border is the part. Holes
are filled (a dark label or a bore inside the part is still the part), specks are dropped and the result is
dilated by one patch so the part's edge stays inspected. When the split is not clear, the images disagree, or
the "background" is only the frame's border patches (a texture that fills the frame: nothing to ignore), every
pixel is inspected. The manifest records the three measures (separation, agreement, depth) and the outcome.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from scipy import ndimage

from .inspection_mask import InspectionMask, frame_shape

if TYPE_CHECKING:
    from .embedder import Embedder

log = logging.getLogger(__name__)

IMAGES = 32  # good images the foreground is found from (evenly spaced over the training set)
PCA_SAMPLE = 8192  # patches the component is estimated from
MIN_SEPARATION = 0.75  # Otsu's between-class share of the variance: a normal distribution gives 2/pi
MIN_AGREEMENT = 0.9  # mean |2 * vote - 1| over the frame: 1 = every image agrees on every pixel
MIN_DEPTH = 3.0  # patches the background must reach into the frame somewhere (not a ring of border patches)
MIN_COMPONENT = 0.01  # foreground specks smaller than this share of the frame are dropped


def first_component(bank: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and first principal direction of the ``(N, D)`` patches (from a sample of them)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(bank.shape[0], generator=gen)[:PCA_SAMPLE].to(bank.device)
    x = bank.index_select(0, idx).float()
    mean = x.mean(0)
    xc = x - mean
    _, vecs = torch.linalg.eigh((xc.T @ xc).double())
    return mean, vecs[:, -1].float()


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of ``values`` and its separation (between-class variance / total variance, 0..1)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centers)
    total_mean, total_var = m0[-1], float(np.sum(p * (centers - m0[-1]) ** 2))
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * w0 - m0) ** 2 / (w0 * w1)
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    k = int(np.argmax(between))
    return float(edges[k + 1]), float(between[k] / total_var) if total_var > 0 else 0.0


def _centre_minus_border(fg: np.ndarray) -> float:
    """How much more of the frame's central half than of its outer ring a class holds."""
    h, w = fg.shape
    ring = np.ones_like(fg)
    ring[h // 8 : h - h // 8, w // 8 : w - w // 8] = False
    centre = np.zeros_like(fg)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    return float(fg[centre].mean() - fg[ring].mean())


def patch_features(embedder: Embedder, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Every patch embedding of up to :data:`IMAGES` of ``images`` (evenly spaced), image after image, and each
    image's ``(h, w)`` grid."""
    step = max(1, -(-len(images) // IMAGES))
    chosen = list(images[::step])
    feats, grids = [], []
    for batch in embedder.groups(chosen, whole=True):  # the whole frame, tiled or not: the part is found in it
        for e in embedder.embed([chosen[i] for i in batch], whole=True).features:
            feats.append(e.reshape(-1, e.shape[-1]))
            grids.append((int(e.shape[0]), int(e.shape[1])))
    return torch.cat(feats), grids


def estimate_foreground(embedder: Embedder, images: Sequence[np.ndarray], seed: int = 0) -> InspectionMask:
    """The inspection mask of ``--mask auto``: the foreground of the good ``images`` (frame: their size)."""
    frame = frame_shape(images)
    bank, grids = patch_features(embedder, images)
    mean, direction = first_component(bank, seed)
    direction = direction.to(bank.device)
    proj = (bank.float() @ direction - mean.to(bank.device) @ direction).cpu().numpy()  # no centred copy of the bank
    level, separation = otsu(proj)
    votes = np.zeros(frame, dtype=np.float64)
    start = 0
    for h, w in grids:
        cells = proj[start : start + h * w].reshape(h, w) > level
        start += h * w
        votes += _stretch_share(cells, frame)
    votes /= max(len(grids), 1)
    agreement = float(np.abs(2 * votes - 1).mean())
    fg = votes >= 0.5
    if _centre_minus_border(fg) < 0:  # the part holds the centre more than the border
        fg = ~fg
    cell = max(frame[0] / grids[0][0], frame[1] / grids[0][1])  # one patch, in frame pixels
    # how far the background reaches from the part: zero padding makes a CNN's border patches differ from the
    # rest, so on a texture filling the frame the split finds a ring about one patch wide, not a background
    depth = float(ndimage.distance_transform_edt(~fg).max()) / cell if fg.any() else 0.0
    details = {"separation": round(separation, 3), "agreement": round(agreement, 3), "depth": round(depth, 2)}
    found = separation >= MIN_SEPARATION and agreement >= MIN_AGREEMENT and depth >= MIN_DEPTH
    if found:
        fg = _cleanup(fg, cell)
        found = bool(fg.any()) and fg.mean() < 0.98
    if not found:
        log.info("mask auto: no clear background in the good images (separation %.2f, agreement %.2f): every "
                 "pixel is inspected", separation, agreement)
        fg = np.ones(frame, dtype=bool)
    details["found"] = bool(found)
    return InspectionMask(fg, "auto", details)


def _stretch_share(cells: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """A patch grid's classes stretched over the frame, as 0/1 (nearest cell)."""
    h, w = cells.shape
    rows = np.minimum((np.arange(frame[0]) * h) // frame[0], h - 1)
    cols = np.minimum((np.arange(frame[1]) * w) // frame[1], w - 1)
    return cells[np.ix_(rows, cols)].astype(np.float64)


def _cleanup(fg: np.ndarray, cell: float) -> np.ndarray:
    """Fill holes, drop specks, dilate by one patch cell (so the part's edge is inspected)."""
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    if n:
        sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= MIN_COMPONENT * fg.size) + 1
        fg = np.isin(labels, keep)
    radius = max(1, int(round(cell)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(fg, structure=xx ** 2 + yy ** 2 <= radius ** 2)
