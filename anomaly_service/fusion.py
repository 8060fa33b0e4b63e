"""How the kNN and autoencoder opinions combine into one decision.

Both scores are first put on their own calibrated scale (1.0 = that scorer's threshold on held-out normals), so
they are comparable whatever their units. Rules:

* ``mean``: ``w * knn + (1 - w) * autoencoder`` (``w`` = ``fusion_weight``, default 0.5), for images and maps;
* ``max``: the more alarmed of the two, per image and per pixel;
* ``knn`` / ``autoencoder``: one scorer alone decides (the other is still reported), for comparisons.

The fused score is then calibrated again on the same held-out normals, so 1.0 is the fused threshold.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

FUSION_RULES = ("mean", "max", "knn", "autoencoder")


def fuse(knn: float | np.ndarray, ae: float | np.ndarray, rule: str = "mean", weight: float = 0.5):
    """Combine two normalised scores (or maps of equal shape) by ``rule``."""
    if rule == "mean":
        return weight * knn + (1.0 - weight) * ae
    if rule == "max":
        return np.maximum(knn, ae)
    if rule == "knn":
        return knn
    if rule == "autoencoder":
        return ae
    raise ConfigError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")
