"""Arithmetic over a whole photo or map a block of rows at a time.

A line camera's photo is 5-20 megapixels, and each whole-array NumPy temporary of it is tens of megabytes on fresh
pages: an expression of a few steps is as many passes through memory. Over blocks of rows the temporaries stay in a
core's cache. Elementwise steps give each pixel exactly what the whole-array expression gives, so callers keep their
results to the bit (their tests check it).
"""

from __future__ import annotations

import numpy as np

# pixels a block: its few temporaries fit a core's cache with room to spare
BLOCK_PIXELS = 1 << 16


def row_blocks(shape: tuple[int, ...], pixels: int = BLOCK_PIXELS) -> list[slice]:
    """Slices of an array's first axis of about ``pixels`` elements each, counting the other axes' elements as one
    row's (a 1-D array: ``pixels`` elements a block); one empty slice for an array of no rows, so a caller's loop
    still runs once and its result keeps the dtype its expression gives."""
    width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, pixels // max(1, width))
    return [slice(top, top + step) for top in range(0, shape[0], step)] or [slice(0, 0)]
