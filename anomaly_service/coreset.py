"""Greedy k-center coreset subsampling of the patch bank (PatchCore Sec. 3.2, Algorithm 1).

Each step adds the patch farthest from everything chosen so far, so the kept subset covers the normal feature
space with the smallest worst-case gap. Distances are computed after a random Gaussian projection to
``proj_dim`` dimensions (Johnson-Lindenstrauss), as in the paper. On CUDA one step is one torch
matrix-vector product over the bank plus an elementwise minimum; on CPU an exact pruned variant bounds every
distance from a few principal axes and computes only those that can change (see ``_greedy_pruned``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .progress import progress_bar


def coreset_size(n_total: int, ratio: float, max_size: int | None = None) -> int:
    n = max(1, int(math.ceil(n_total * ratio)))
    if max_size is not None:
        n = min(n, max_size)
    return min(n, n_total)


class GreedyCoresetSampler:
    """The memory bank's sampler: keep ``ratio`` of the patches (at most ``max_size``) by greedy k-center."""

    def __init__(self, ratio: float, max_size: int | None = None, proj_dim: int = 128, seed: int = 0,
                 progress: bool = True):
        self.ratio, self.max_size, self.proj_dim, self.seed, self.progress = ratio, max_size, proj_dim, seed, progress

    def sample(self, bank: torch.Tensor, size: int | None = None) -> np.ndarray:
        """Row indices of ``bank`` to keep, in selection order (``size`` of them when given, else the ratio's)."""
        n = coreset_size(bank.shape[0], self.ratio, self.max_size) if size is None else min(size, bank.shape[0])
        return greedy_coreset(bank, n, self.proj_dim, self.seed, progress=self.progress)

    def describe(self) -> dict:
        return {"ratio": self.ratio, "projection_dim": self.proj_dim}

    def coverage_radius(self, chosen: torch.Tensor) -> float:
        """See :func:`coverage_radius` (in this sampler's projected space)."""
        return coverage_radius(chosen, self.proj_dim, self.seed)

    def radius_from_bank(self, bank: torch.Tensor) -> float:
        """See :func:`radius_from_bank`."""
        return radius_from_bank(bank, self.proj_dim, self.seed)

    def extend(self, bank: torch.Tensor, candidates: torch.Tensor, radius: float) -> np.ndarray:
        """See :func:`extend_coreset`."""
        return extend_coreset(bank, candidates, radius, self.proj_dim, self.seed)


def random_projection(features: torch.Tensor, proj_dim: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """Project rows to ``proj_dim`` with a seeded Gaussian matrix; identity when already that small."""
    n, d = features.shape
    if proj_dim <= 0 or d <= proj_dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim)).to(features.device)
    out = torch.empty(n, proj_dim, device=features.device)
    for i in range(0, n, chunk):
        out[i : i + chunk] = features[i : i + chunk].float() @ proj
    return out


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    proj_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
    method: str = "auto",
) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by greedy k-center on the (projected) features, in selection order.

    ``method``: ``dense`` updates every patch at every step (best on a GPU); ``pruned`` gives the same selection
    (up to float ties) on a CPU many times faster by computing only the distances a cheap lower bound cannot rule out
    (see :func:`_greedy_pruned`); ``auto`` picks ``dense`` on CUDA and ``pruned`` otherwise.
    """
    n = features.shape[0]
    if n_select >= n:
        return np.arange(n, dtype=np.int64)
    x = random_projection(features, proj_dim, seed)
    x = x - x.mean(0, keepdim=True)  # centring keeps |x|^2 small, so the expanded distance stays accurate
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    if method == "auto":
        method = "dense" if x.is_cuda else "pruned"
    bar = progress_bar(progress, total=n_select, desc="coreset", unit="patch")
    try:
        if method == "dense":
            return _greedy_dense(x, n_select, start, bar)
        if method == "pruned":
            return _greedy_pruned(x.cpu().numpy().astype(np.float32), n_select, start, bar)
        raise ValueError(f"unknown coreset method {method!r}")
    finally:
        bar.close()


def _greedy_dense(x: torch.Tensor, n_select: int, start: int, bar: tqdm) -> np.ndarray:
    """One GEMV over the whole bank per step; all on ``x``'s device, no host sync inside the loop on CUDA."""
    sq = (x * x).sum(1)
    selected = torch.empty(n_select, dtype=torch.long, device=x.device)
    current = torch.tensor(start, device=x.device)
    selected[0] = current
    # squared distance to the nearest selected centre, for every patch
    min_dist = (sq - 2.0 * (x @ x[current]) + sq[current]).clamp_min_(0)
    bar.update(1)
    for step in range(1, n_select):
        current = torch.argmax(min_dist)
        selected[step] = current
        dist = (sq - 2.0 * (x @ x[current]) + sq[current]).clamp_min_(0)
        torch.minimum(min_dist, dist, out=min_dist)
        bar.update(1)
    return selected.cpu().numpy()


# The pruned greedy's bound: principal axes holding this share of the bank's energy, within these counts (the
# bound's dimension trades a tighter bound against the bytes every step reads; benchmarks/greedy.py).
BOUND_VARIANCE, BOUND_MIN_DIMS, BOUND_MAX_DIMS = 0.85, 8, 32


def _bound_basis(x: np.ndarray, variance: float = BOUND_VARIANCE, min_dims: int = BOUND_MIN_DIMS,
                 max_dims: int = BOUND_MAX_DIMS, chunk: int = 65536) -> np.ndarray:
    """The leading principal axes of the rows of ``x`` (``d x k``, orthonormal): the fewest that hold ``variance``
    of the energy, within ``[min_dims, max_dims]``. More axes make the bound tighter and every step's bound dearer;
    a bank whose patches vary along few directions (an object on a background) needs few, a texture needs more."""
    d = x.shape[1]
    gram = np.zeros((d, d))
    for i in range(0, len(x), chunk):
        xc = x[i : i + chunk].astype(np.float64)
        gram += xc.T @ xc
    eig, vec = np.linalg.eigh(gram)
    eig, vec = eig[::-1], vec[:, ::-1]
    share = np.cumsum(eig) / max(float(eig.sum()), 1e-300)
    k = int(np.searchsorted(share, variance)) + 1
    return vec[:, : min(max(k, min_dims), max_dims, d)]


# The leaf bound: patches grouped into the leaves of a kd-tree over their bound coordinates, so that a step first
# rules out whole leaves by the box that holds each; at most this many patches a leaf (a smaller leaf fits a tighter
# box and costs more boxes per step; benchmarks/greedy.py)
LEAF_ROWS = 32
PROGRESS_STEPS = 256  # greedy steps between progress-bar updates
# past the first slice of steps (where every patch can still move), a slice that bounds more than this share of the
# bank one patch at a time a step (a texture's leaves are wide) hands over to one BLAS product a step, which bounds
# every patch faster. The first two slices are short, so a texture hands over early: after a few dozen steps an
# object's share has fallen well below it and a texture's stays far above (benchmarks.md "Leaves of a kd-tree")
LEAF_SHARE, PROBE_STEPS = 0.25, 32


def _bound_numbers(x: np.ndarray, basis: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each row's bound numbers: ``coords`` ``(n, k + 1)``, its coordinates ``p`` on the ``k`` axes of ``basis``
    then the norm ``r`` of the rest; and ``|x|^2``. Computed in float64, stored in float32."""
    n, k = len(x), basis.shape[1]
    coords = np.empty((n, k + 1), dtype=np.float32)
    sq = np.empty(n, dtype=np.float32)
    for i in range(0, n, chunk):
        xc = x[i : i + chunk].astype(np.float64)
        p = xc @ basis
        coords[i : i + chunk, :k] = p
        coords[i : i + chunk, k] = np.sqrt(((xc - p @ basis.T) ** 2).sum(1))
        sq[i : i + chunk] = (xc**2).sum(1)
    return coords, sq


def _leaves(coords: np.ndarray, leaf_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``coords`` as the leaves of a balanced kd-tree (scipy's): ``order`` lists the rows leaf by leaf,
    leaf ``i`` holding ``order[starts[i]:starts[i + 1]]``. Splitting at the median of the widest coordinate keeps
    each leaf's box small in every coordinate, which is what the bound needs."""
    from scipy.spatial import cKDTree

    tree = cKDTree(coords, leafsize=leaf_rows, balanced_tree=True, compact_nodes=False)
    starts, stack = [], [tree.tree]
    while stack:
        node = stack.pop()
        if node.split_dim == -1:
            starts.append(node.start_idx)
        else:
            stack += [node.greater, node.lesser]
    return tree.indices.astype(np.int64), np.array(sorted(starts) + [len(coords)], dtype=np.int64)


def _greedy_pruned(x: np.ndarray, n_select: int, start: int | None, bar: tqdm | None = None,
                   min_sq: np.ndarray | None = None, limit: float = -np.inf, variance: float = BOUND_VARIANCE,
                   min_dims: int = BOUND_MIN_DIMS, max_dims: int = BOUND_MAX_DIMS, leaf_rows: int = LEAF_ROWS,
                   chunk: int = 65536) -> np.ndarray:
    """Greedy k-center that computes a patch's distance to the new centre only where it can shrink.

    A step only lowers the distances of patches closer to the new centre ``c`` than to every earlier one: on real
    banks a few hundred of hundreds of thousands. Each patch ``x`` is split into its part ``p`` in the bank's
    leading principal axes and the norm ``r`` of the rest, so by Cauchy-Schwarz ``x.c <= p.p_c + r r_c`` and
    ``|x - c|^2 >= |x|^2 + |c|^2 - 2 (p.p_c + r r_c)``: ``k + 1`` numbers a patch instead of ``d`` bound its
    distance from below, and only the patches that bound cannot rule out get their exact distance. Above that,
    the patches are the leaves of a kd-tree over ``(p, r)`` (:func:`_leaves`): the distance from ``c``'s
    ``(p, r)`` to a leaf's box bounds every patch in the leaf, so a leaf lying farther than its farthest patch's
    distance is skipped whole. On an object most leaves lie far from each new centre; on a texture most do not,
    and the per-patch bound does the work. Every bound is strict (a margin covers float rounding), so the
    selection is the dense greedy's. The loop is compiled (:mod:`numba`): a step is a few thousand small
    decisions, which as array operations would each pay a call and a temporary.

    It also continues a greedy (updates, streamed chunks): ``min_sq`` gives each row's squared distance to what
    is already chosen, ``start=None`` begins at the farthest row, and the greedy stops early once the farthest
    row lies within ``limit`` (squared). Returns the chosen rows in selection order.
    """
    n = len(x)
    coords, sq = _bound_numbers(x, _bound_basis(x, variance, min_dims, max_dims, chunk), chunk)
    k = coords.shape[1] - 1
    # float32 rounding of the stored bound numbers is far below this on centred rows; a common offset inflates
    # max |x|^2 and so the margin, which costs pruning, never correctness
    margin = 1e-4 * float(sq.max())
    min_sq = np.full(n, np.inf, dtype=np.float32) if min_sq is None else min_sq.astype(np.float32, copy=True)
    order, starts = _leaves(coords, leaf_rows)
    coords, sq, min_sq = coords[order], sq[order], min_sq[order]  # leaf order from here on
    lo = np.minimum.reduceat(coords, starts[:-1], axis=0)
    hi = np.maximum.reduceat(coords, starts[:-1], axis=0)
    max_sq = np.maximum.reduceat(min_sq, starts[:-1])
    from .coreset_kernel import farthest, greedy_steps  # compiled on first use, then cached on disk

    x_bank, x = x, np.ascontiguousarray(x[order], dtype=np.float32)
    cur = farthest(order, starts, min_sq, max_sq) if start is None else int(np.flatnonzero(order == start)[0])
    selected = np.empty(n_select, dtype=np.int64)
    done = 0
    while done < n_select:  # in slices, so that the progress bar moves
        count = min(PROGRESS_STEPS if done >= 2 * PROBE_STEPS else PROBE_STEPS, n_select - done)
        took, cur, bounded = greedy_steps(x, order, starts, coords, sq, min_sq, lo, hi, max_sq, selected, done,
                                          count, cur, float(limit), margin)
        done += took
        if bar is not None:
            bar.update(took)
        if took < count:
            return selected[:done]
        if done > PROBE_STEPS and bounded > LEAF_SHARE * took * n:
            break  # a texture: past the first steps, the leaves' boxes still leave most patches to bound
    else:
        return selected
    # hand over to one matrix-vector product a step over every patch's bound numbers, in the bank's own order
    rows = np.empty((k + 2, n), dtype=np.float32)
    rows[: k + 1, order] = coords.T
    bank_sq, bank_min = np.empty_like(sq), np.empty_like(min_sq)
    bank_sq[order], bank_min[order] = sq, min_sq
    del coords, sq, min_sq, x
    done += _greedy_products(x_bank, rows, bank_sq, bank_min, selected[done:], int(order[cur]), limit, margin, bar)
    return selected[:done]


def _greedy_products(x: np.ndarray, rows: np.ndarray, sq: np.ndarray, min_sq: np.ndarray, selected: np.ndarray,
                     cur: int, limit: float, margin: float, bar: tqdm | None, dense_fraction: float = 0.3) -> int:
    """The pruned greedy's steps where most leaves stay live (a texture): each step bounds every patch with one
    BLAS matrix-vector product over ``rows`` (each patch's ``(p, r)``, the last row is filled here) and computes
    the exact distance of those the bound cannot rule out; all in the bank's order. Writes the centres chosen
    from ``cur`` on into ``selected`` (in place); returns how many."""
    n, k = len(sq), rows.shape[0] - 2
    np.subtract(min_sq, sq, out=rows[k + 1])  # column j: p_j.p_c + r_j r_c - (|x_j|^2 - min_j) / 2
    rows[k + 1] *= 0.5
    probe = np.ones(k + 2, dtype=np.float32)
    for step in range(len(selected)):
        if min_sq[cur] <= limit:
            return step
        selected[step] = cur
        c = x[cur]
        c_sq = float(sq[cur])
        probe[: k + 1] = rows[: k + 1, cur]
        # above (|c|^2 - margin) / 2 the bound cannot rule out that |x_j - c|^2 < min_j
        idx = np.flatnonzero(probe @ rows > 0.5 * (c_sq - margin))
        if len(idx) > dense_fraction * n:
            dist = x @ c  # one BLAS GEMV over the bank; then in-place so no other full-size temporaries
            dist *= -2.0
            dist += sq
            dist += c_sq
            np.maximum(dist, 0, out=dist)
            np.minimum(min_sq, dist, out=min_sq)
            np.subtract(min_sq, sq, out=rows[k + 1])
            rows[k + 1] *= 0.5
        elif len(idx):
            near = np.minimum(min_sq[idx], np.maximum(sq[idx] - 2.0 * (x[idx] @ c) + c_sq, 0))
            min_sq[idx] = near
            rows[k + 1, idx] = 0.5 * (near - sq[idx])
        min_sq[cur] = 0.0  # chosen: its own distance, whatever the rounding says
        rows[k + 1, cur] = -0.5 * c_sq
        cur = int(np.argmax(min_sq))
        if bar is not None:
            bar.update(1)
    return len(selected)


# ---------------------------------------------------------------------------------------------------- updates
# A fitted bank grows by continuing the greedy from where the fit stopped: the bank is the chosen set, new
# patches are candidates, and the greedy stops at the radius the fit reached (see docs/how-it-works.md).

RADIUS_RTOL = 1e-3  # a candidate this close to the radius counts as covered (the embedding is recomputed in float)


def coverage_radius(chosen: torch.Tensor, proj_dim: int = 128, seed: int = 0) -> float:
    """The radius a greedy coreset reached: the distance (in the greedy's projected space) of the last chosen
    row to the rows chosen before it. ``chosen``: the coreset's rows in selection order. Every patch of the fit
    lies within this distance of the coreset."""
    if chosen.shape[0] < 2:
        return 0.0
    x = random_projection(chosen, proj_dim, seed).double()
    return float(torch.sqrt(((x[:-1] - x[-1]) ** 2).sum(1).min()))


def radius_from_bank(bank: torch.Tensor, proj_dim: int = 128, seed: int = 0) -> float:
    """The fit's radius recovered from the bank alone, for models that did not record it.

    In greedy k-center the distance of each newly chosen row to the chosen set never increases, so every pair of
    bank rows is at least the final radius apart and the last row chosen is exactly that far from its nearest:
    the smallest nearest-neighbor distance inside the bank is the radius the fit stopped at."""
    import faiss

    if bank.shape[0] < 2:
        return 0.0
    x = random_projection(bank, proj_dim, seed)
    x = (x - x.mean(0, keepdim=True)).cpu().numpy().astype(np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    sq, _ = index.search(x, 2)
    return float(np.sqrt(max(float(sq[:, 1].min()), 0.0)))


def extend_coreset(bank: torch.Tensor, candidates: torch.Tensor, radius: float, proj_dim: int = 128,
                   seed: int = 0, rtol: float = RADIUS_RTOL) -> np.ndarray:
    """Indices of ``candidates`` to add to ``bank``, in selection order: greedy k-center continued with the bank
    as the chosen set, stopping once every candidate lies within ``radius`` of the grown bank."""
    import faiss

    if candidates.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    both = random_projection(torch.cat([bank.float(), candidates.float()]), proj_dim, seed)
    both = (both - both.mean(0, keepdim=True)).cpu().numpy().astype(np.float32)
    b, c = both[: bank.shape[0]], np.ascontiguousarray(both[bank.shape[0] :])
    index = faiss.IndexFlatL2(b.shape[1])
    index.add(b)
    found, nearest = index.search(c, 1)
    min_sq = found[:, 0].astype(np.float32)
    if radius <= 0:  # only rows already in the bank stay out: FAISS 1.8 to 1.11 gave them a rounding error, not 0
        far = np.flatnonzero(min_sq > 0)
        min_sq[far] = ((c[far] - b[nearest[far, 0]]) ** 2).sum(1)
    return _greedy_until(c, min_sq, (radius * (1.0 + rtol)) ** 2)


def _greedy_until(c: np.ndarray, min_sq: np.ndarray, limit: float, most: int | None = None) -> np.ndarray:
    """Greedy k-center over the rows of ``c`` given each row's squared distance ``min_sq`` to what is already
    chosen: add the farthest row until every row lies within ``limit`` (squared), or ``most`` rows are added.
    Indices in selection order."""
    n = len(c) if most is None else max(0, min(most, len(c)))
    if limit <= 0:  # a bank that keeps every patch (coreset_ratio 1): all that is not already in it, no greedy
        return np.flatnonzero(min_sq > 0)[:n].astype(np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # distances do not change under a shift, and the bound's rounding margin grows with the rows' norms: centred,
    # a streamed chunk's candidates (offset by the first chunk's centre) keep their pruning
    return _greedy_pruned(c - c.mean(0, keepdims=True), n, None, min_sq=min_sq, limit=limit)


# ---------------------------------------------------------------------------------------------- streamed fits
# A fit too large to hold (thousands of images) keeps PatchCore's guarantee without running one greedy over all
# of its patches, which costs (patches x bank) distance evaluations: the greedy runs on a first chunk of images
# and stops at its ratio, which fixes the coverage radius; every later chunk adds only its patches farther than
# that radius from the bank, by the same greedy continued (as updates do). The search for each candidate's
# nearest bank row is approximate (an inverted-file index over the growing bank), and it can only over-estimate a
# distance: a missed neighbour adds a row that was not strictly needed, never leaves a patch uncovered.


class StreamingCover:
    """The bank of a streamed coreset in the greedy's projected space, grown chunk by chunk at a fixed radius."""

    def __init__(self, first: torch.Tensor, radius: float, proj_dim: int = 128, seed: int = 0, nprobe: int = 8,
                 rtol: float = RADIUS_RTOL):
        import faiss

        self.proj_dim, self.seed, self.limit = proj_dim, seed, (radius * (1.0 + rtol)) ** 2
        x = random_projection(first, proj_dim, seed).cpu().numpy().astype(np.float32)
        self.centre = x.mean(0, keepdims=True)
        x = np.ascontiguousarray(x - self.centre)
        nlist = max(1, min(int(4 * np.sqrt(len(x))), len(x) // 39))
        quantizer = faiss.IndexFlatL2(x.shape[1])
        self.index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_L2)
        self.index.cp.seed = seed
        self.index.cp.max_points_per_centroid = 64  # the lists only route searches; a sample trains them well
        self.index.train(x)
        self.index.nprobe = min(nprobe, nlist)
        self.index.add(x)
        self._quantizer = quantizer  # the IVF index does not own it

    def copy(self) -> "StreamingCover":
        """An independent cover holding the same rows: a pass that may be undone extends the copy."""
        import faiss

        out = copy.copy(self)
        out.index = faiss.clone_index(self.index)  # the clone owns a clone of the quantizer
        out._quantizer = None
        return out

    def extend(self, candidates: torch.Tensor, most: int | None = None) -> np.ndarray:
        """Indices of ``candidates`` (kept dimensions) the bank must add to cover them all, in selection order
        (farthest first), or the first ``most`` of them; those are added to the cover."""
        c = random_projection(candidates, self.proj_dim, self.seed).cpu().numpy().astype(np.float32)
        c = np.ascontiguousarray(c - self.centre)
        min_sq = self.index.search(c, 1)[0][:, 0]  # no neighbour in the probed lists: FLT_MAX, uncovered
        uncovered = np.flatnonzero(min_sq > self.limit)
        if not len(uncovered):
            return uncovered.astype(np.int64)
        picked = uncovered[_greedy_until(np.ascontiguousarray(c[uncovered]), min_sq[uncovered], self.limit, most)]
        if len(picked):
            self.index.add(np.ascontiguousarray(c[picked]))
        return picked
