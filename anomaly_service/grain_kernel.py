"""The grain fill's inner loop, compiled with numba (see :func:`~.grain.fill_along` for the fill itself).

Why compiled: every filled pixel takes one value from its own line, at a row that a few integer comparisons and a
modulo give. As numpy array operations each of those is a pass over the whole canvas and a temporary array the size
of it; on a turned photo that cost more than turning the photo. A compiled loop computes each row once and reads
one value. ``nogil`` lets another scoring thread run beside it.
"""

from __future__ import annotations

import numpy as np
from .jit import compiled


@compiled(nogil=True)
def fill_columns(a: np.ndarray, out: np.ndarray, cols: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> None:
    """``out[:, c]`` = column ``cols[c]`` of ``a`` with its run ``top[c]``..``bottom[c]`` (first to last real row)
    kept and mirrored at both ends, repeating every ``2 n`` rows (:func:`~.grain._from_run`'s rows)."""
    height = a.shape[0]
    for c in range(a.shape[1]):
        src, t, b = cols[c], top[c], bottom[c]
        n = b - t + 1
        for r in range(height):
            if r < t:
                j = (2 * n - (t - r)) % (2 * n)
            elif r > b:
                j = (n - 1 + r - b) % (2 * n)
            else:
                j = r - t
            out[r, c] = a[t + j if j < n else t + 2 * n - 1 - j, src]

