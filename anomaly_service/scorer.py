"""The small protocol every scorer implements, so the model can hold one or several opinions the same way.

A scorer turns a batch of patch embeddings into, per image, a raw image score and an anomaly map at the image's
own size (in the scorer's own units); the decision (decision.py) calibrates and combines them. Each scorer saves
and loads its own files inside the model artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .embedder import Embedded
from .anomaly_map import anomaly_map
from .timing import StageTimer

RawScore = tuple[float, np.ndarray]  # (image score, map at the input's size), in the scorer's units


@dataclass(frozen=True, eq=False)
class PatchMatches:
    """What the kNN search found for one image, kept so a flagged region can show its closest normal evidence
    (evidence.py) and the part its place among the training images, at no second search."""

    nearest: np.ndarray  # (h, w) int64: the bank row nearest each patch of the feature grid
    distance: np.ndarray  # (h, w) float32: each patch's kNN score (with k=1, its distance to that row)
    pooled: np.ndarray  # (d,) float32: the mean of the image's patch features (kept dimensions)


class MatchedScore(tuple[float, np.ndarray]):
    """The kNN scorer's :data:`RawScore`: it unpacks as ``(score, map)`` wherever a RawScore does (calibration,
    fusion, updates), and also carries its :class:`PatchMatches` for the decision to hand on."""

    matches: PatchMatches

    def __new__(cls, score: float, amap: np.ndarray, matches: PatchMatches) -> "MatchedScore":
        self = super().__new__(cls, (score, amap))
        self.matches = matches
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # copies and pickles keep the matches
        return (MatchedScore, (self[0], self[1], self.matches))


class Scorer(Protocol):
    name: str

    def score(self, batch: Embedded, timer: StageTimer) -> list[RawScore]:
        """Per image of ``batch``, in order: its raw image score and anomaly map."""
        ...

    def files(self) -> dict[str, bytes]:
        """The files this scorer adds to the model artifact."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this scorer."""
        ...


def grid_maps(grids: np.ndarray, batch: Embedded, sigma: float) -> list[np.ndarray]:
    """``(B, h, w)`` patch grids -> one smoothed map per image, at that image's height and width."""
    return [anomaly_map(g, batch.work_size, shape[:2], sigma) for g, shape in zip(grids, batch.shapes)]
