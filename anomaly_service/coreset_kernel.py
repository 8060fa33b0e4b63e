"""The pruned greedy's inner loop, compiled with numba (see :func:`~.coreset._greedy_pruned` for the method).

Why compiled: a step of the pruned greedy is a few thousand small decisions (is this leaf's box farther than its
farthest patch? is this patch's bound below its distance?), each over a handful of numbers. As numpy array
operations each decision pays a call and a temporary array, which cost more than the distances they save; a
compiled loop reads each number once. ``nogil`` lets another thread of the fit run beside it.

Every per-patch array here, the rows themselves included (so a leaf's rows are read in one run), is in leaf
order (position ``i`` is the bank's row ``order[i]``), and leaf ``b`` holds
positions ``starts[b]:starts[b + 1]``.
"""

from __future__ import annotations

import numpy as np
from .jit import compiled


@compiled(nogil=True)
def farthest(order: np.ndarray, starts: np.ndarray, min_sq: np.ndarray, max_sq: np.ndarray) -> int:
    """The position of the largest distance; on a tie the one first in the bank's own order (as ``np.argmax``
    over the bank picks)."""
    top = max_sq.max()
    best = -1
    for b in range(len(max_sq)):
        if max_sq[b] == top:
            for i in range(starts[b], starts[b + 1]):
                if min_sq[i] == top and (best < 0 or order[i] < order[best]):
                    best = i
    return best


# reassociation lets the dot products and distances use vector lanes; every bound keeps a margin far above the
# rounding that reordering a sum of a few hundred terms can change
@compiled(nogil=True, fastmath={"reassoc", "contract"})
def greedy_steps(x: np.ndarray, order: np.ndarray, starts: np.ndarray, coords: np.ndarray, sq: np.ndarray,
                 min_sq: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_sq: np.ndarray, selected: np.ndarray,
                 begin: int, count: int, cur: int, limit: float, margin: float) -> tuple[int, int, int]:
    """Up to ``count`` greedy steps from position ``cur``, written to ``selected[begin:]`` as bank rows; stops
    before a centre whose distance is within ``limit``. Updates ``min_sq`` and each leaf's farthest distance
    ``max_sq`` in place; returns the steps taken, the next centre's position and how many patches the steps
    bounded one by one (those of leaves their boxes did not rule out).

    ``x``: the bank's rows; ``coords``: each patch's ``(p, r)``; ``sq``: ``|x|^2``; ``lo``,
    ``hi``: each leaf's box in ``(p, r)``; ``margin``: the float-rounding allowance every bound is held to."""
    n_leaves, kk, d = len(max_sq), coords.shape[1], x.shape[1]
    c = np.empty(d, dtype=np.float64)
    pc = np.empty(kk, dtype=np.float64)
    pc32 = np.empty(kk, dtype=np.float32)  # the per-patch bound's product in float32: twice the vector lanes
    bounded = 0
    for s in range(count):
        if min_sq[cur] <= limit:
            return s, cur, bounded
        selected[begin + s] = order[cur]
        for j in range(d):
            c[j] = x[cur, j]
        for j in range(kk):
            pc[j] = coords[cur, j]
            pc32[j] = coords[cur, j]
        c_sq = np.float64(sq[cur])
        for b in range(n_leaves):
            # the leaf's box: no patch in it lies closer to the centre's (p, r) than the box does
            reach = max_sq[b] + margin
            gap = 0.0
            for j in range(kk):  # the leading axes first: most leaves are ruled out after a few
                v = max(lo[b, j] - pc[j], pc[j] - hi[b, j])
                if v > 0.0:
                    gap += v * v
                    if gap >= reach:
                        break
            if gap >= reach:
                continue
            top = 0.0
            bounded += starts[b + 1] - starts[b]
            for i in range(starts[b], starts[b + 1]):
                m = np.float64(min_sq[i])
                dot = np.float32(0.0)
                for j in range(kk):
                    dot += coords[i, j] * pc32[j]
                if sq[i] + c_sq - 2.0 * dot < m + margin:  # the per-patch bound cannot rule it out: exact
                    e = 0.0
                    for j in range(d):
                        t = x[i, j] - c[j]
                        e += t * t
                    if e < m:
                        min_sq[i] = e
                        m = np.float64(min_sq[i])
                if m > top:
                    top = m
            max_sq[b] = top
        min_sq[cur] = 0.0  # chosen: its own distance, whatever the rounding says
        b = np.searchsorted(starts, cur, side="right") - 1
        top = 0.0
        for i in range(starts[b], starts[b + 1]):
            top = max(top, np.float64(min_sq[i]))
        max_sq[b] = top
        cur = farthest(order, starts, min_sq, max_sq)
    return count, cur, bounded
