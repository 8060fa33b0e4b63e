"""The closest normal evidence for a flagged region, and the scored part's place among the training images.

"Why was this part flagged?" is answered best by what it was compared with: for each region, the training image
and the place in it whose patch was nearest to the region's hottest patch, the closest good region seen in
training. The kNN search already found that patch (the scorer keeps each patch's nearest bank row,
:class:`~.scorer.PatchMatches`); the bank's provenance names the training image and grid cell it came from, and
the catalog that image's name, digest, size and thumbnail (provenance.py). Nothing is searched again: a region's
evidence is a few array look-ups, and the part's place on the image map (image_map.py) one small product.

Models saved before the provenance was kept have no evidence: their regions carry none and their parts no place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .provenance import TrainingCatalog, cell_box
from .regions import Region
from .scorer import PatchMatches

if TYPE_CHECKING:
    from .decision import ScoreResult
    from .model import AnomalyModel

CAPTION = "closest good region seen in training"


@dataclass(frozen=True)
class Box:
    """A rectangle in an image's pixels."""

    x: int  # left
    y: int  # top
    width: int
    height: int

    @classmethod
    def of(cls, corners: tuple[int, int, int, int]) -> "Box":
        x0, y0, x1, y1 = corners
        return cls(x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class NearestNormal:
    """The closest good region seen in training, for one flagged region."""

    image: int  # the training image's index in the model's catalog (the thumbnail route's {index})
    name: str  # the training image as the fit was given it (its path, as the user named it)
    sha256: str  # digest of its decoded pixels, as in the manifest's training provenance
    image_width: int  # the training image's size: ``box`` is in its pixels (scale it to the thumbnail's)
    image_height: int
    box: Box  # the training patch nearest to the region's hottest patch, in the training image
    patch: Box  # the region's hottest patch, in the scored image
    distance: float  # the hottest patch's kNN distance, the units of ``score`` (k=1: its distance to ``box``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MapPoint:
    """A place on the model's image map (image_map.py), the coordinates of its training images' places."""

    x: float
    y: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class MapParent:
    """The version a model was updated from, and how many of its image map's points, from the first, are that
    version's map."""

    version: str
    points: int


def map_parent(model: AnomalyModel) -> MapParent | None:
    """The version this model's image map extends (None for a fit, or a model without a map). An update places its
    images on the map of the version it updates (ImageMap.extended: the same axes, earlier places unchanged) and
    appends them to the catalog, so that version's map is this one's first points: a part it scored is drawn on
    them truthfully, where a re-fit's map would have other axes and other images."""
    lineage = model.manifest_.lineage if model.manifest_ is not None else None
    catalog = model.catalog_
    if lineage is None or lineage.made_by != "update" or not lineage.parent or catalog is None \
            or catalog.image_map is None:
        return None
    points = len(catalog) - lineage.images_added
    return MapParent(lineage.parent, points) if 0 < points <= len(catalog) else None


def hottest_patch(distance: np.ndarray, region: Region, height: int, width: int) -> tuple[int, int]:
    """The grid cell ``(row, col)`` of the region's hottest patch in an image of ``height`` x ``width``.

    The cell under the region's peak pixel, or the hottest of its neighbours that overlap the region's box: the
    map is smoothed and upsampled, so its peak can sit a cell away from the patch that made it. The peak is a pixel
    of the frame inside the box, so its cell is in the grid and in the window."""
    gh, gw = distance.shape
    row, col = region.peak_y * gh // height, region.peak_x * gw // width
    top, bottom = region.y * gh // height, (region.y + region.height - 1) * gh // height
    left, right = region.x * gw // width, (region.x + region.width - 1) * gw // width
    r0, r1 = max(row - 1, top, 0), min(row + 1, bottom, gh - 1)
    c0, c1 = max(col - 1, left, 0), min(col + 1, right, gw - 1)
    window = distance[r0 : r1 + 1, c0 : c1 + 1]
    dr, dc = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(r0 + dr), int(c0 + dc)


class TrainingEvidence:
    """What a model keeps to show evidence: its training catalog and where each bank row came from."""

    def __init__(self, catalog: TrainingCatalog, sources: np.ndarray):
        self.catalog, self.sources = catalog, sources

    @classmethod
    def of(cls, model: AnomalyModel) -> "TrainingEvidence | None":
        """The model's evidence, or None for models saved before it was kept."""
        if model.catalog_ is None or model.knn.provenance_ is None:
            return None
        return cls(model.catalog_, model.knn.provenance_)

    def nearest_normal(self, matches: PatchMatches, region: Region, height: int, width: int) -> NearestNormal | None:
        """The closest good region seen in training for ``region`` of a scored image of ``height`` x ``width``."""
        row, col = hottest_patch(matches.distance, region, height, width)
        bank_row = int(matches.nearest[row, col])
        if not 0 <= bank_row < len(self.sources):  # FAISS answers -1 when it found nothing
            return None
        image, r, c = (int(v) for v in self.sources[bank_row])
        if not 0 <= image < len(self.catalog):
            return None
        h, w = self.catalog.shapes[image]
        return NearestNormal(image=image, name=self.catalog.names[image], sha256=self.catalog.digests[image],
                             image_width=w, image_height=h, box=Box.of(self.catalog.box(image, r, c)),
                             patch=Box.of(cell_box(row, col, (height, width), matches.distance.shape)),
                             distance=float(matches.distance[row, col]))

    def annotate(self, result: ScoreResult, regions: list[Region]) -> list[Region]:
        """``regions`` with their closest good region seen in training (unchanged when the result has no kNN
        matches)."""
        if result.matches is None:
            return regions
        return [dataclasses.replace(g, nearest_normal=self.nearest_normal(result.matches, g, result.image_height,
                                                                          result.image_width)) for g in regions]

    def position(self, result: ScoreResult) -> MapPoint | None:
        """Where the scored part sits on the image map, or None (no map in this model, or no kNN matches)."""
        image_map = self.catalog.image_map
        if image_map is None or result.matches is None or result.matches.pooled.shape != (image_map.dim,):
            return None
        x, y = image_map.project(result.matches.pooled)
        return MapPoint(float(x), float(y))
