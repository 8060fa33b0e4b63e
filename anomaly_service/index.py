"""FAISS nearest-neighbor index over the memory bank.

``flat`` is exact L2: PatchCore banks of tens of thousands of patches search exactly in milliseconds. ``ivf`` and
``ivfpq`` are for banks too large for that; their ``nprobe`` trades recall for speed. ``auto`` (the default) picks
by the bank's size. ``ivf`` keeps its lists in fp16 (the scan of a large bank is bound by memory traffic, which
that halves), finds the lists to scan with a graph over their centroids, and re-ranks what they hold against the
exact fp32 rows, so the distance it returns to the neighbour it found is exact. Models saved with the earlier
structure (``IndexIVFFlat``: fp32 lists, centroids scanned) load and search as before.
When a GPU build of FAISS is installed and the model runs on CUDA, flat and older IVF indexes are mirrored to the
GPU for search; ivf, whose re-rank wrapper GPU FAISS cannot hold, and flat banks without GPU FAISS are searched
exactly on the GPU with torch. What is saved is always the CPU index, so a model fitted on a GPU loads on a CPU-only
machine.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch  # noqa: F401  (first: FAISS then shares its OpenMP pool, parallelism.load_faiss_after_torch)
import faiss
import numpy as np

from . import parallelism  # noqa: F401  (its import warns where this process loaded FAISS before torch)
from .errors import ConfigError, ModelFormatError
from .options import MODEL_OPTIONS, RUNTIME_OPTIONS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_KINDS = MODEL_OPTIONS["index"].choices or ()


def gpu_faiss_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def gpu_number(device: str) -> int:
    """The GPU a ``cuda[:N]`` device names, as FAISS numbers them (both count the GPUs this process sees): ``N``,
    or torch's current GPU for a bare ``cuda``."""
    import torch

    index = torch.device(device).index
    if index is not None:
        return index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


_GPU_RESOURCES: dict[int, tuple[object, threading.Lock]] = {}
_GPU_RESOURCES_LOCK = threading.Lock()


def gpu_resources(number: int) -> tuple[object, threading.Lock]:
    """One FAISS GPU resource object per GPU, shared by every index placed there, and the lock its searches take.
    Each resource object holds a scratch pool in the GPU's memory and pinned host memory of its own, so one per
    index (every model, and the searches over its own rows) took that again for each; and neither it nor a GPU
    index may be used by two threads at once, not even to search (FAISS's threading notes), while the service
    searches from its inference workers and an update's thread."""
    with _GPU_RESOURCES_LOCK:
        if number not in _GPU_RESOURCES:
            _GPU_RESOURCES[number] = (faiss.StandardGpuResources(), threading.Lock())
        return _GPU_RESOURCES[number]


class GpuFaissSearch:
    """A FAISS index copied to GPU ``number``, searched one call at a time under that GPU's lock (gpu_resources).
    ``index``: the CPU index it was copied from (what an exact fallback and the status page read)."""

    def __init__(self, index: faiss.Index, number: int):
        resources, self.lock = gpu_resources(number)
        self.gpu = faiss.index_cpu_to_gpu(resources, number, index)
        self.index, self.number = index, number
        self.d, self.ntotal = int(index.d), int(index.ntotal)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.gpu.search(queries, k)

    def __getstate__(self) -> tuple[faiss.Index, int]:  # a copy or a pickle carries the CPU index, placed again
        return self.index, self.number

    def __setstate__(self, state: tuple[faiss.Index, int]) -> None:
        self.__init__(*state)  # type: ignore[misc]


# "auto" keeps the exact search up to this many bank rows and builds ivf beyond. Below it the lists are so few that
# nprobe of them cover a large share of the bank, so ivf would be no faster, and the exact search is cheap; above it
# ivf is faster on every CPU and agrees with the exact neighbour on at least 99% of patches (benchmarks/scale.py)
AUTO_FLAT_MAX = 4096


# FAISS's SIMD kernels for fp16 codes need the width to be a multiple of 16; narrower rows fall back to a scalar
# loop several times slower than the fp32 lists, so the lists get zero columns, which change no distance.
FP16_LANES = 16
IVF_MAX_LISTS = 65_536
# Above this many lists, the lists nearest a query are found by an HNSW graph over the centroids (a flat scan of
# 8 sqrt(N) centroids would cost as much as the lists on a large bank); up to it, a flat scan of the centroids is
# cheaper than the graph and exact (benchmarks/scale.py). The graph looks at this many candidates, or 2 x nprobe if
# more, which keeps its misses rare.
QUANTIZER_GRAPH_LISTS = 3072
QUANTIZER_EF = 64
# fp16 rounding can order two near-equal rows wrongly: the lists hand this many times k candidates to the exact re-rank
REFINE_FACTOR = 4


def resolve_index_kind(kind: str, n_rows: int) -> str:
    """The index a fit builds: ``kind`` itself, or for ``auto`` exact (``flat``) on banks up to
    :data:`AUTO_FLAT_MAX` rows and ``ivf`` on larger ones, where the exact search costs more."""
    if kind != "auto":
        return kind
    return "flat" if n_rows <= AUTO_FLAT_MAX else "ivf"


def build_index(bank: np.ndarray, kind: str = "flat", nlist: int | None = None, pq_m: int | None = None,
                nprobe: int = 8, seed: int = 0) -> faiss.Index:
    """Build a CPU index of ``bank`` (``(N, D)`` float32)."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n, d = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind in ("ivf", "ivfpq"):
        # ivf: finer lists found by a graph, so a query scans fewer rows for the same agreement (benchmarks/scale.py)
        nlist = nlist or (max(1, min(IVF_MAX_LISTS, int(8 * np.sqrt(n)))) if kind == "ivf"
                          else max(1, min(4096, int(4 * np.sqrt(n)))))
        if n < nlist * 39:  # FAISS wants ~39 training points per centroid; fewer gives poor lists
            nlist = max(1, n // 39)
        if kind == "ivf":
            index = _ivf_fp16(d, nlist)
        else:
            m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d)
            if d % m:
                raise ConfigError(f"ivfpq needs the feature dimension ({d}) divisible by pq_m ({m})")
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        # k-means on a sample: a million-row bank trains in a minute, not ten
        ivf.cp.max_points_per_centroid = 64 if kind == "ivf" else 128
        index.train(bank)
        set_nprobe(index, nprobe)
    else:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    index.add(bank)
    return _with_direct_map(index)


def _ivf_fp16(d: int, nlist: int) -> faiss.Index:
    """IVF over fp16 lists (zero-padded to :data:`FP16_LANES`) whose centroids an HNSW graph searches (beyond
    :data:`QUANTIZER_GRAPH_LISTS` lists; a flat scan up to it), wrapped in an exact fp32 re-rank of what it finds."""
    width = -(-d // FP16_LANES) * FP16_LANES
    quantizer = faiss.IndexHNSWFlat(width, 32) if nlist > QUANTIZER_GRAPH_LISTS else faiss.IndexFlatL2(width)
    lists = faiss.IndexIVFScalarQuantizer(quantizer, width, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    padded = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, width, False), lists) if width != d else lists
    index = faiss.IndexRefineFlat(padded)
    index.k_factor = REFINE_FACTOR
    return index


def _inverted_file(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted file inside ``index`` (through re-rank and padding wrappers), or None for exact indexes."""
    return None if isinstance(index, faiss.IndexFlat) else faiss.try_extract_index_ivf(index)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Lists probed per query, wherever the inverted file sits in ``index`` (no-op for exact indexes)."""
    ivf = _inverted_file(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(int(nprobe), ivf.nlist))
        graph = faiss.downcast_index(ivf.quantizer)
        if isinstance(graph, faiss.IndexHNSW):
            graph.hnsw.efSearch = max(QUANTIZER_EF, 2 * ivf.nprobe)


def describe_index(index: faiss.Index) -> str:
    """The index's structure in words, for status pages and logs."""
    ivf = _inverted_file(index)
    if ivf is None:
        return f"faiss {type(index).__name__}"
    codes = {"IndexIVFFlat": "fp32 lists", "IndexIVFPQ": "PQ codes", "IndexIVFScalarQuantizer": "fp16 lists"}
    how = codes.get(type(faiss.downcast_index(ivf)).__name__, type(faiss.downcast_index(ivf)).__name__)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        how += ", graph-found lists"
    refined = ", exact re-rank" if isinstance(index, faiss.IndexRefine) else ""
    return f"approximate: IVF {ivf.nlist} lists, nprobe {ivf.nprobe}, {how}{refined}"


def _with_direct_map(index: faiss.Index) -> faiss.Index:
    """IVF indexes read their rows back (``KnnScorer.bank``: updates, leave-one-out) through a direct map; ivf's
    re-rank wrapper reads them from its own fp32 copy and needs none."""
    ivf = _inverted_file(index)
    if ivf is not None and not isinstance(index, faiss.IndexRefine):
        ivf.make_direct_map()
    return index


# the blocked search's distance block at most (fewer queries to a block on a wider bank): the exact search of a
# small bank never reaches it
BLOCK_BYTES = 256 << 20
WIDTH_STEPS = 16  # product widths per doubling of the bank (bank_width)


def bank_width(ntotal: int, slabs: int) -> int:
    """The columns of :class:`BlockedFlatSearch`'s product for a bank of ``ntotal`` rows: a multiple of ``slabs``,
    rounded up to one of :data:`WIDTH_STEPS` widths per doubling of the bank. The CPU's GEMM library keeps what it
    builds for each shape of a product (bf16 most) for the life of the process, and every update makes the bank a
    few rows larger: a service that loaded months of updated versions held a set for each, and its memory grew
    with every update. Rounded, consecutive versions share a width, for at most one column in ``WIDTH_STEPS`` more
    to multiply; the padding columns never rank."""
    step = 1 << max(0, ntotal.bit_length() - 1 - WIDTH_STEPS.bit_length() + 1)
    width = -(-ntotal // step) * step
    return -(-width // slabs) * slabs


class BlockedFlatSearch:
    """Exact L2 search over a flat bank on the CPU, one matrix product per block of queries (torch).

    Same answers as ``IndexFlatL2`` (tested), much faster for PatchCore's shape (a thousand queries of ~100 dims
    against tens of thousands of bank patches). It runs on torch's thread pool, the one the backbone uses: a
    second BLAS pool (NumPy's) spinning beside it slowed the backbone down. Every query takes the same path,
    however few are searched with it (see :meth:`search`). fp32 only for narrow banks (see ``to_search_device``):
    at 512 dims FAISS's BLAS path won.

    After the product, picking each row's few smallest of ~20k distances was the larger cost: ``topk`` and
    ``min`` with indices ran at a fraction of memory speed, while an elementwise ``minimum`` streams. So the row
    is folded into ``slabs`` contiguous slabs, their elementwise minimum gives one value per position, and only
    the ``c`` best positions' ``slabs x c`` entries are ranked. The ``c`` smallest entries always sit at the ``c``
    best positions (fewer than ``i`` positions can beat the ``i``-th smallest entry), so the result is the same as
    a ``topk`` over the whole row, at a fraction of its cost (docs/benchmarks.md).

    ``precision="bf16"`` (CPUs with native bf16): the product runs in bf16 (several times faster than fp32 there) on a
    centred bank, but its distances carry ~0.4% relative error, so they only shortlist ``max(candidates, 2k)``
    entries, which are re-ranked with exact fp32 ``(q - b)^2``; returned distances come from that. The one way to
    differ from exact search is a true neighbor ranked below the shortlist by bf16 rounding (never seen on the
    shared categories' real queries; tests/test_realdata.py checks it).
    """

    def __init__(self, index: faiss.Index, block: int = 256, precision: str = "fp32", candidates: int = 8,
                 slabs: int = 8, device: str = "cpu"):
        import torch

        self.index: faiss.Index | RowsOf = index
        self.device = torch.device(device)  # cuda: exact search on the GPU when GPU FAISS is not installed
        bank = torch.from_numpy(np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32))
        self.ntotal, self.d = index.ntotal, index.d
        self.precision = precision
        self.candidates = candidates
        # Fold only when every slab is much longer than a shortlist; pad columns carry +inf and never rank.
        self.slabs_asked = slabs
        self.slabs = slabs if self.ntotal >= 64 * slabs else 1
        # a search over some rows of another's bank (over_rows): those rows, the +inf its product's columns between
        # them carry (mask), and the searched rows' numbers of its columns (local)
        self.rows: np.ndarray | None = None
        self.mask: torch.Tensor | None = None
        self.local: torch.Tensor | None = None
        self.width = bank_width(self.ntotal, self.slabs)
        # a block's distances are its queries x the bank's columns: bounded in bytes, so that a bank of millions of
        # rows (an ivf bank searched exactly on a GPU) takes a bounded block, not gigabytes per block
        self.block = max(1, min(block, BLOCK_BYTES // (max(1, self.width) * (2 if precision == "bf16" else 4))))
        rows = bank
        if precision == "bf16":
            # Centred, so the bf16 products do not lose their few bits to a large common offset.
            self.mean = bank.mean(0)
            bank = bank - self.mean
        elif precision != "fp32":
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        # One product gives ||b||^2 - 2 q.b directly: the bank carries [-2b, ||b||^2] and each query [q, 1]
        # (padded to a multiple of 16 dims for the GEMM kernels), which saves addmm's separate pass adding the
        # norms over the whole distance block. Padding rows
        # carry +inf as their norm.
        self.d_mm = -(-(self.d + 1) // 16) * 16
        aug = torch.zeros(self.width, self.d_mm)
        aug[: self.ntotal, : self.d] = -2.0 * bank
        aug[: self.ntotal, self.d] = (bank * bank).sum(1)
        aug[self.ntotal :, self.d] = float("inf")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.bank_mm = aug.to(self.device, dtype).contiguous()
        # the rows as fitted, not centred: bf16's exact re-rank reads them (fp32 reads its product's ``-2 b``), and
        # ranks as fp32 does, so the two agree wherever their shortlists hold the same nearest row. Only bf16 keeps
        # them: kept beside an fp32 product they would put the bank twice in a GPU's memory
        self.bank = rows.to(self.device) if precision == "bf16" else None
        if precision == "bf16":
            self.mean = self.mean.to(self.device)

    def over_rows(self, rows: np.ndarray, plan: str | None = None) -> BlockedFlatSearch | None:
        """A search over ``rows`` (row ids of this bank, ascending, each once) that reads this search's product
        matrix instead of a copy of it, answering in the rows' own numbering (0 for ``rows[0]``) with the results a
        search built over those rows alone gives (tested); None where ``plan`` (default :func:`own_rows_plan`'s) is
        ``copy``.
        Its path for more neighbours than the rows hold searches this one's flat index through an ID selector, which
        copies no row either; an ivf's rows are reached only through its lists, so there the rows get an index of
        their own on the CPU (:func:`subset_index`, as a search built over them has), and the device holds the bank
        once all the same."""
        import torch

        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not len(rows) or self.rows is not None:
            return None  # nothing to search, or a search over rows already
        contiguous = int(rows[-1] - rows[0]) + 1 == len(rows)
        plan = plan or own_rows_plan(self.precision, self.device.type, contiguous)
        if plan == "copy" or self.precision != "fp32":  # a bf16 bank is centred on its own rows' mean
            return None
        first, end = int(rows[0]), int(rows[-1]) + 1
        view = copy.copy(self)  # block, precision, device, dims; the product matrix below is a slice of this one's
        view.bank_mm = self.bank_mm[first:end]
        view.rows = rows
        view.ntotal, view.width = len(rows), end - first
        view.slabs = self.slabs_asked if view.width >= 64 * self.slabs_asked else 1
        if isinstance(self.index, faiss.IndexFlat) and self.index.metric_type == faiss.METRIC_L2:
            view.index = RowsOf(self.index, rows)
        else:
            view.index = subset_index(self.index, self.index.reconstruct_n(0, self.index.ntotal), rows)
        if not contiguous:
            inside = np.zeros(view.width, bool)
            inside[rows - first] = True
            view.mask = torch.from_numpy(np.where(inside, 0.0, np.inf).astype(np.float32)).to(self.device)
            view.local = torch.from_numpy(np.cumsum(inside) - 1).to(self.device)
        return view

    def _smallest(self, d: torch.Tensor, c: int) -> torch.Tensor:
        """Column ids of the ``c`` smallest entries of each row of ``d`` (unordered), via the slab fold. A search
        over rows of another's bank has no padding: the few columns past its last whole slab are candidates as they
        are (the ``c`` smallest are among the folded part's ``c`` smallest and those)."""
        import torch

        width = d.shape[1]
        s = width // self.slabs
        if self.slabs == 1 or c > s:  # a shortlist longer than a slab (a large k): the fold cannot hold it
            return d.topk(c, dim=1, largest=False, sorted=False).indices
        folded = torch.minimum(d[:, :s], d[:, s : 2 * s])
        for t in range(2, self.slabs):
            torch.minimum(folded, d[:, t * s : (t + 1) * s], out=folded)
        pos = folded.topk(c, dim=1, largest=False, sorted=False).indices
        wide = (pos[:, :, None] + torch.arange(0, s * self.slabs, s, device=d.device)).reshape(len(d), -1)
        if width > s * self.slabs:
            tail = torch.arange(s * self.slabs, width, device=d.device).expand(len(d), -1)
            wide = torch.cat([wide, tail], dim=1)
        return wide.gather(1, d.gather(1, wide).topk(c, dim=1, largest=False, sorted=False).indices)

    def _rows(self, cand: torch.Tensor) -> torch.Tensor:
        """The bank rows ``cand`` names, exactly as fitted: bf16 keeps them beside its product; fp32 reads them off
        its product matrix, whose ``-2 b`` halves back to ``b`` without rounding."""
        if self.bank is not None:
            return self.bank[cand]
        return self.bank_mm[cand, : self.d] * -0.5

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids of the ``k`` nearest, like ``faiss.Index.search``.

        A query's answer depends on that query alone, not on the others searched with it: the GEMM library picks its
        kernel by the block's shape (a block of a few queries summed a distance otherwise than a full one), and a few
        queries went to FAISS, which sums otherwise again; so a photo's score moved with the photos batched beside
        it. Every query is now shortlisted by the product and ranked by its own fp32 ``(q - b)^2``, ties by row id
        (docs/decisions.md "Same photo, same answer")."""
        import torch

        n = len(queries)
        if k > self.ntotal:
            return self.index.search(queries, k)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        q_prod = q_all - self.mean if self.precision == "bf16" else q_all
        # bf16's distances carry ~0.4% error and shortlist widely; fp32's are off by float32 steps only, so twice k
        # holds the nearest (a wider fp32 shortlist cost its gather and sort on every patch, for nothing)
        c = min(self.ntotal, max(self.candidates, 2 * k) if self.precision == "bf16" else 2 * k)
        dist_out = torch.empty((n, k), device=self.device)
        ids_out = torch.empty((n, k), dtype=torch.int64, device=self.device)
        buf = torch.empty((min(self.block, n), self.width), dtype=self.bank_mm.dtype, device=self.device)
        q_mm = torch.zeros((n, self.d_mm), device=self.device)
        q_mm[:, : self.d] = q_prod
        q_mm[:, self.d] = 1.0
        q_mm = q_mm.to(self.bank_mm.dtype)
        with torch.inference_mode():
            for s in range(0, n, self.block):
                q = q_all[s : s + self.block]
                d = buf[: len(q)]
                torch.mm(q_mm[s : s + self.block], self.bank_mm.T, out=d)
                if self.mask is not None:  # rows between the searched ones never rank (+0 leaves the others exact)
                    d += self.mask
                cand = self._smallest(d, c).sort(dim=1).values  # the product only shortlists
                dist_out[s : s + len(q)], ids_out[s : s + len(q)] = rank_exactly(q, self._rows(cand), cand, k)
            if self.local is not None:
                ids_out = self.local[ids_out]
        return dist_out.cpu().numpy(), ids_out.cpu().numpy()


def rank_exactly(q: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest of each query's shortlist ``cand`` (``(n, c)`` row ids, ascending) by fp32 ``(q - b)^2`` of
    its ``rows`` (``(n, c, d)``), equally far rows by id: a function of the query and its shortlist alone, the same
    in every exact CPU search (docs/decisions.md "Same photo, same answer")."""
    dist, j = ((rows - q[:, None, :]) ** 2).sum(-1).sort(dim=1, stable=True)
    return dist[:, :k], cand.gather(1, j[:, :k])


class RankedFlat:
    """FAISS's exact search of a wide fp32 bank (its BLAS path wins there: ``BLOCKED_MAX_DIM``), re-ranked as the
    blocked search ranks: FAISS's distances come from a matrix product whose kernel changes with the number of
    queries (and from another sum below twenty), and 465 of 2000 queries of a 152-dim bank got other distances when
    searched in other company. FAISS shortlists (2k: its distances are off by float32 steps only); :func:`rank_exactly`
    ranks the rows, read back by id (no copy of the bank)."""

    def __init__(self, index: faiss.Index, candidates: int = 2):  # fp32: a shortlist of 2k holds the nearest
        self.index, self.candidates = index, candidates
        self.ntotal, self.d = int(index.ntotal), int(index.d)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids of the ``k`` nearest, like ``faiss.Index.search``."""
        import torch

        if k > self.ntotal or not len(queries):
            return self.index.search(queries, k)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        c = min(self.ntotal, max(self.candidates, 2 * k))
        cand = np.sort(self.index.search(x, c)[1], axis=1)
        rows = self.index.reconstruct_batch(cand.reshape(-1)).reshape(len(x), c, self.d)
        with torch.inference_mode():
            dist, ids = rank_exactly(torch.from_numpy(x), torch.from_numpy(rows), torch.from_numpy(cand), k)
        return dist.numpy(), ids.numpy()


class ProbedIvf:
    """An inverted file's search on the CPU whose lists are found by one matrix product with the centroids
    (:class:`BlockedFlatSearch`), then scanned by FAISS (``search_preassigned``) and re-ranked against the index's
    own fp32 rows and kept as its ``search`` keeps them (tested).

    Why: FAISS finds each query's ``nprobe`` nearest lists with a heap per query over every centroid. Banks of up to a
    few thousand lists scan the centroids (:data:`QUANTIZER_GRAPH_LISTS`), and there that heap cost more than the
    lists' scan itself, most where an aligned model's bank of turned copies doubles the lists (benchmarks.md "A
    turned photo's align stage made cheaper"). A graph over the centroids (more lists) is left to FAISS.

    The lists are ranked by ``(q - c)^2`` summed in torch's order, and FAISS sums in its own: where a query's last list
    probed and the next are as far from it within that rounding, either may be probed. That is a choice between two
    equally near lists of an approximate search, not an error of either; on mt's real queries (then ranked by the
    product's ``|q|^2 - 2 q.c + |c|^2``) it picked another list for about one query in ten thousand and changed no
    result (decisions.md). However few queries are searched, they take this path: a query's lists and answer do not
    depend on the queries searched with it."""

    def __init__(self, index: faiss.Index, ivf: faiss.IndexIVF, chain: list[faiss.VectorTransform],
                 rows: faiss.IndexFlat | None, k_factor: int):
        self.index = index  # the saved structure, for CompleteSearch's exact fallback
        self.ivf, self.chain, self.rows, self.k_factor = ivf, chain, rows, k_factor
        self.ntotal, self.d = int(index.ntotal), int(index.d)
        # the scan of the probed lists split over the queries (FAISS's own search splits them so around its
        # quantizer; search_preassigned alone would run on one thread); results do not depend on it
        ivf.parallel_mode = 3
        self.lists = BlockedFlatSearch(faiss.downcast_index(ivf.quantizer), precision="fp32", block=512)

    @classmethod
    def of(cls, index: faiss.Index) -> "ProbedIvf | None":
        """The search for ``index`` when it is an L2 inverted file whose centroids are scanned flat, with fp32 or
        fp16 lists (optionally behind dimension transforms and an exact fp32 re-rank, as ``ivf`` builds it); None
        for any other index (exact, PQ codes, centroids found by a graph)."""
        top = faiss.downcast_index(index)
        rows, k_factor, base = None, 1, top
        if isinstance(top, faiss.IndexRefine):
            rows = faiss.downcast_index(top.refine_index)
            if type(rows) not in (faiss.IndexFlat, faiss.IndexFlatL2) or rows.metric_type != faiss.METRIC_L2:
                return None
            k_factor, base = int(top.k_factor), faiss.downcast_index(top.base_index)
        chain: list[faiss.VectorTransform] = []
        if isinstance(base, faiss.IndexPreTransform):
            chain = [faiss.downcast_VectorTransform(base.chain.at(i)) for i in range(base.chain.size())]
            base = faiss.downcast_index(base.index)
        if not isinstance(base, (faiss.IndexIVFScalarQuantizer, faiss.IndexIVFFlat)) \
                or base.metric_type != faiss.METRIC_L2:
            return None
        quantizer = faiss.downcast_index(base.quantizer)
        if type(quantizer) not in (faiss.IndexFlat, faiss.IndexFlatL2) or quantizer.metric_type != faiss.METRIC_L2:
            return None
        return cls(index, base, chain, rows, k_factor)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids of the ``k`` nearest, like ``faiss.Index.search``."""
        n = len(queries)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        xt = x
        for t in self.chain:  # into the lists' space (ivf: zero columns up to a multiple of FP16_LANES)
            xt = t.apply(xt)
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        centroid_sq, lists = self.lists.search(xt, min(int(self.ivf.nprobe), int(self.ivf.nlist)))
        if self.rows is None:
            return self._scan(xt, k, lists, centroid_sq)
        wide = k * self.k_factor
        sq, ids = self._scan(xt, wide, lists, centroid_sq)
        # the candidates' exact distances from the fp32 rows, as IndexRefineFlat.search computes them
        self.rows.compute_distance_subset(n, faiss.swig_ptr(x), wide, faiss.swig_ptr(sq), faiss.swig_ptr(ids))
        # the k nearest kept in FAISS's heap, as it keeps them: equally far rows by id, a missing one at FLT_MAX
        best = faiss.ResultHeap(n, k)
        best.add_result(sq, ids)
        best.finalize()
        return best.D, best.I

    def _scan(self, xt: np.ndarray, k: int, lists: np.ndarray, centroid_sq: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's scan of each query's ``lists`` (``search_preassigned``), told how many they are: its wrapper
        asserts as many as the index's nprobe, which may exceed its lists or change between reading and scanning."""
        n = len(xt)
        sq, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        params = faiss.SearchParametersIVF(nprobe=lists.shape[1], max_codes=int(self.ivf.max_codes))
        self.ivf.search_preassigned_c(n, faiss.swig_ptr(xt), k, faiss.swig_ptr(lists), faiss.swig_ptr(centroid_sq),
                                      faiss.swig_ptr(sq), faiss.swig_ptr(ids), False, params)
        return sq, ids


class RowsOf:
    """Some rows of a flat CPU index, searched in place through a FAISS ID selector (no copy of them), answering in
    their own numbering with the results an index of those rows alone gives (tested): what a search over some rows
    asked for more neighbours than they hold answers (:meth:`BlockedFlatSearch.over_rows`)."""

    def __init__(self, index: faiss.Index, rows: np.ndarray):
        self.parent, self.rows = index, np.ascontiguousarray(rows, dtype=np.int64)
        self.ntotal, self.d = len(self.rows), int(index.d)
        inside = np.zeros(index.ntotal, bool)
        inside[self.rows] = True
        self.bits = np.packbits(inside, bitorder="little")  # what the selector reads, in place

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids among the rows, like ``faiss.Index.search``."""
        # made per call: the selector points into ``bits``, and SWIG objects would keep this from being copied
        chosen = faiss.IDSelectorBitmap(self.parent.ntotal, faiss.swig_ptr(self.bits))
        sq, ids = self.parent.search(np.ascontiguousarray(queries, dtype=np.float32), k,
                                     params=faiss.SearchParameters(sel=chosen))
        return sq, np.where(ids >= 0, np.searchsorted(self.rows, np.maximum(ids, 0)), -1)

    def reconstruct_n(self, first: int, n: int) -> np.ndarray:
        return self.parent.reconstruct_batch(self.rows[first : first + n])


def own_rows_plan(precision: str, device_type: str, contiguous: bool) -> str:
    """How a search over some rows of a blocked search's bank (an aligned model's own rows, knn_scorer.py) is made:
    ``view``, a slice of the bank's product matrix, where the rows are one run (nothing more is computed);
    ``masked``, the slice from the first row to the last with the others' distances set to +inf, on a GPU, where a
    second copy of the bank costs device memory and the larger product little; ``copy``, a search built over the
    rows alone, for bf16 (its product is centred on its own rows' mean: another centring could change which
    rows it shortlists) and for rows spread apart on the CPU, where the compacted product is the cheaper one and
    memory is not short. A pure function, so the GPU's choice is tested on a CPU."""
    if precision != "fp32":
        return "copy"
    if contiguous:
        return "view"
    return "copy" if device_type == "cpu" else "masked"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX; Arm's BF16 extension).

    Elsewhere torch emulates bf16 and the shortlist search would be slower than fp32, so ``auto`` keeps fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


KNN_PRECISIONS = RUNTIME_OPTIONS["knn_precision"].choices or ()


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    """``auto`` -> ``bf16`` where the CPU has native bf16, else ``fp32``."""
    if precision not in KNN_PRECISIONS:
        raise ConfigError(f"knn precision must be one of {', '.join(KNN_PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"
    return precision


BLOCKED_MAX_DIM = 128  # the blocked fp32 search wins on narrow banks, FAISS's BLAS path on wide ones (benchmarks)


def search_plan(index: faiss.Index, use_gpu: bool, precision: str = "auto", gpu_faiss: bool | None = None,
                cpuinfo: str | None = None) -> str:
    """Which search runs: ``faiss-gpu``, ``torch-gpu`` (exact, for flat banks without GPU FAISS),
    ``blocked-bf16``, ``blocked-fp32`` or ``faiss-cpu``. A pure function, so the GPU choices are tested on CPU."""
    flat = type(index) is faiss.IndexFlatL2
    if use_gpu:
        # ivf's re-rank wrapper has no GPU FAISS counterpart, but it keeps the fp32 rows: exact search on the GPU
        refined = isinstance(index, faiss.IndexRefine)
        if (gpu_faiss_available() if gpu_faiss is None else gpu_faiss) and not refined:
            return "faiss-gpu"
        if flat or refined:
            return "torch-gpu"
    if not flat:
        return "faiss-cpu"
    if resolve_precision(precision, cpuinfo) == "bf16":  # the shortlist product is cheap at any width
        return "blocked-bf16"
    return "blocked-fp32" if index.d <= BLOCKED_MAX_DIM else "faiss-cpu"


def to_search_device(index: faiss.Index, use_gpu: bool, precision: str = "auto",
                     device: str = "cuda") -> faiss.Index | BlockedFlatSearch | RankedFlat | ProbedIvf | GpuFaissSearch:
    """The search object for ``search_plan``'s choice: on the GPU, GPU FAISS when installed, else an exact torch
    search on ``device`` (flat banks and ivf, which keeps the fp32 rows; older approximate indexes fall back to the
    CPU); on the CPU, exact flat banks get the blocked search (``precision``: ``fp32``, ``bf16`` shortlist + exact
    re-rank, or ``auto``: bf16 where the CPU has it), and an inverted file whose centroids are scanned finds its
    lists by a product (:class:`ProbedIvf`)."""
    import torch

    plan = search_plan(index, use_gpu, precision)
    if plan == "torch-gpu" and not torch.cuda.is_available():  # asked for a GPU that is not there: stay on CPU
        plan = search_plan(index, False, precision)
    if plan == "faiss-gpu":  # on the GPU the model runs on (cuda:1: the second), not always the first
        return GpuFaissSearch(index, gpu_number(device))
    if use_gpu and plan != "torch-gpu":
        log.info("no GPU search for this %s index (GPU FAISS not installed, or CUDA not usable); searching on CPU",
                 type(index).__name__)
    if plan == "torch-gpu":
        try:
            return BlockedFlatSearch(index, precision="fp32", device=device)
        except torch.OutOfMemoryError:  # the bank and its norms do not fit beside what the GPU holds already
            torch.cuda.empty_cache()
            plan = search_plan(index, False, precision)
            log.warning("the %d-row bank does not fit in the memory of %s: searching it on the CPU (%s)",
                        index.ntotal, device, plan)
    if plan.startswith("blocked"):
        return BlockedFlatSearch(index, precision=plan.removeprefix("blocked-"))
    if type(index) is faiss.IndexFlatL2:
        return RankedFlat(index)
    return ProbedIvf.of(index) or index


class CompleteSearch:
    """An inverted-file search that always answers ``k`` rows where the bank has them: a query whose probed lists
    hold fewer (a small ``--nprobe`` over small lists, a subset's empty lists) is searched exactly over the rows
    instead, so its score is a distance and not the missing result's FLT_MAX. ``index``: the CPU index ``inner``
    searches (default ``inner`` itself, or a blocked search's)."""

    def __init__(self, inner: "faiss.Index | BlockedFlatSearch", index: faiss.Index | None = None):
        self.inner = inner
        self.index = index if index is not None else getattr(inner, "index", inner)
        self.ntotal, self.d = int(self.index.ntotal), int(inner.d)
        self._exact: faiss.IndexFlatL2 | None = None  # a copy of the rows, only where _every_row finds no search

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids, like ``faiss.Index.search`` (-1 only where the index holds fewer than ``k``)."""
        sq, ids = self.inner.search(queries, k)
        missing = np.flatnonzero((ids < 0).any(axis=1)) if k <= self.ntotal else np.zeros(0, np.int64)
        if len(missing):
            rest = np.ascontiguousarray(queries[missing], np.float32)
            every = _every_row(self.index)
            if every is None:
                sq[missing], ids[missing] = exact_nearest(self._copy(), rest, k)
            elif every[1] is None:
                sq[missing], ids[missing] = exact_nearest(every[0], rest, k)
            else:
                sq[missing], ids[missing] = every[0].search(rest, k, params=every[1])
        return sq, ids

    def _copy(self) -> faiss.IndexFlatL2:
        """A flat copy of the rows, built once: scoring threads meeting their first short query at once would
        each build one."""
        with _COPY_LOCK:
            if self._exact is None:
                exact = faiss.IndexFlatL2(self.d)
                exact.add(np.ascontiguousarray(self.index.reconstruct_n(0, self.ntotal), dtype=np.float32))
                self._exact = exact
        return self._exact


def exact_nearest(rows: faiss.IndexFlat, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of the flat index ``rows`` by each pair's own fp32 sum, as ivf's re-rank takes them
    (``compute_distance_subset``), kept as FAISS's heap keeps them (equally far rows by id). FAISS's flat search only
    shortlists ``2k``: for twenty queries or more it takes ``|q|^2 + |b|^2 - 2 q.b`` from a product, which up to
    FAISS 1.13 was off by up to 0.8% at the smallest distances (a row equal to a query at 6e-5, not 0) and differed
    from a query searched alone, so a short query's score depended on the short queries searched with it. The
    shortlist itself is searched in groups below FAISS's product threshold, each pair summed on its own: from a
    product, rows nearly as far as the nearest (more than ``2k`` within its rounding) pushed the nearest off it."""
    x = np.ascontiguousarray(queries, dtype=np.float32)
    n, c = len(x), min(int(rows.ntotal), 2 * k)
    if not n or c < k:
        return rows.search(x, k)
    step = max(1, int(faiss.cvar.distance_compute_blas_threshold) - 1)
    cand = np.ascontiguousarray(np.concatenate([rows.search(x[s : s + step], c)[1] for s in range(0, n, step)]))
    sq = np.empty((n, c), np.float32)
    rows.compute_distance_subset(n, faiss.swig_ptr(x), c, faiss.swig_ptr(sq), faiss.swig_ptr(cand))
    best = faiss.ResultHeap(n, k)
    best.add_result(sq, cand)
    best.finalize()
    return best.D, best.I


_COPY_LOCK = threading.Lock()  # module-wide: a lock attribute would keep searches from being pickled or deep-copied


def _every_row(index: faiss.Index) -> tuple[faiss.Index, faiss.SearchParameters | None] | None:
    """A search of every row ``index`` holds that copies none: ivf's re-rank keeps the fp32 rows in a flat index; an
    inverted file whose lists a flat quantizer finds, probed in all of them, reads its own codes (so ivfpq's
    distances stay its own). None otherwise (a graph over the lists need not return them all)."""
    if isinstance(index, faiss.IndexRefine):
        rows = faiss.downcast_index(index.refine_index)
        if isinstance(rows, faiss.IndexFlat) and rows.metric_type == faiss.METRIC_L2:
            return rows, None
    if isinstance(index, faiss.IndexIVF) and isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlat):
        return index, faiss.SearchParametersIVF(nprobe=index.nlist)
    return None


class SubsetSearch(CompleteSearch):
    """A search over some rows of a bank that answers in the whole bank's row numbers (an aligned model searches the
    photos it leaves as they came against its images' own rows only: knn_scorer.py). ``index``: the CPU index of
    those rows that ``inner`` searches. An inverted file cloned from the whole bank keeps lists that hold none of
    these rows; a query whose probed lists are all such is searched exactly (:class:`CompleteSearch`)."""

    def __init__(self, inner: "faiss.Index | BlockedFlatSearch", rows: np.ndarray, index: faiss.Index | None = None):
        super().__init__(inner, index)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and whole-bank ids, like ``faiss.Index.search`` (-1 only where fewer than ``k`` rows)."""
        sq, ids = super().search(queries, k)
        return sq, np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)


def complete(search: "faiss.Index | BlockedFlatSearch", index: faiss.Index | None = None
             ) -> "faiss.Index | BlockedFlatSearch | CompleteSearch":
    """``search`` (to_search_device's) made to answer every query in full: exact searches already do. ``index``: the
    CPU index it was placed from (a GPU index cannot hand its rows to the exact fallback)."""
    exact = isinstance(search, (BlockedFlatSearch, RankedFlat)) or type(search) is faiss.IndexFlatL2
    return search if exact else CompleteSearch(search, index)


def subset_index(index: faiss.Index, bank: np.ndarray, rows: np.ndarray) -> faiss.Index:
    """An index of ``index``'s kind over ``bank[rows]``: a clone emptied and refilled, so an inverted file keeps
    its trained lists (no k-means at load) and probes them as the whole bank's does."""
    sub = faiss.clone_index(index)
    sub.reset()
    sub.add(np.ascontiguousarray(bank[rows], dtype=np.float32))
    return _with_direct_map(sub)


def describe_search(search: faiss.Index | BlockedFlatSearch | CompleteSearch | None) -> str | None:
    """One line for status pages: which search actually runs (``auto`` choices resolve per machine)."""
    if search is None:
        return None
    if isinstance(search, CompleteSearch):
        return describe_search(search.inner)
    if isinstance(search, ProbedIvf):
        return describe_index(search.index) + ", lists found by a product with the centroids"
    if isinstance(search, BlockedFlatSearch):
        how = "exact, bf16 shortlist + fp32 re-rank" if search.precision == "bf16" else "exact, fp32"
        return how if search.device.type == "cpu" else f"{how}, torch on {search.device}"
    if isinstance(search, GpuFaissSearch):
        return f"{describe_index(search.index)}, FAISS on cuda:{search.number}"
    if isinstance(search, RankedFlat):
        return describe_index(search.index)
    return describe_index(search)


def search(index: faiss.Index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """L2 distances (not squared) and ids of the ``k`` nearest bank entries for each query row."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    sq, ids = index.search(q, k)
    return np.sqrt(np.maximum(sq, 0.0)), ids


def serialize(index: faiss.Index) -> bytes:
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


_READ_LIMIT_LOCK = threading.Lock()  # FAISS's limit is one setting of the process: one read sets it at a time


def deserialize(data: bytes) -> faiss.Index:
    """The index ``data`` holds. No array it declares may be larger than ``data`` itself: FAISS allocates (and
    zeroes) what a vector's length field says before it reads it, up to its own limit of a terabyte, so an index
    file of a few kilobytes that declared gigabytes took them (a model copied in from elsewhere, or crafted), and
    with them the service, before the read failed."""
    limit = (getattr(faiss, "get_deserialization_vector_byte_limit", None),
             getattr(faiss, "set_deserialization_vector_byte_limit", None))
    try:
        with _READ_LIMIT_LOCK:
            before = limit[0]() if limit[0] is not None and limit[1] is not None else None
            if before is not None:
                limit[1](min(before, len(data) + 1))
            try:  # an IVFPQ's table of distances is not in the file: made below, once the index is checked
                index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8),
                                                getattr(faiss, "IO_FLAG_SKIP_PRECOMPUTE_TABLE", 0))
            finally:
                if before is not None:
                    limit[1](before)
        check_index(index)
        _precompute_table(index, len(data))
        return _with_direct_map(index)
    except RuntimeError as exc:
        why = str(exc).splitlines()[0]
        if "deserialization_vector_byte_limit" in why:  # FAISS's words are its source code's
            why = f"it declares an array larger than its own {len(data)} bytes"
        raise ModelFormatError(f"FAISS index is corrupt: {why}") from None


# An ivfpq's precomputed table (nlist x M x 256 floats), which FAISS computes on reading rather than storing, against
# the file: nlist is at most a 39th of the rows (build_index) and each row keeps M bytes of codes, so a product's
# table is at most 1024 / 39 (26) times its file. FAISS 1.15 read it under the vector limit deserialize sets to the
# file's size, which refused every honest ivfpq model whose table outgrew its file (a 60-image fit: 401 kB of table,
# a 185 kB file)
PQ_TABLE_PER_FILE_BYTE = 32


def _precompute_table(index: faiss.Index, size: int) -> None:
    """The precomputed table of the IVFPQ in ``index`` (checked), as FAISS's read makes it, at most
    :data:`PQ_TABLE_PER_FILE_BYTE` times the file's ``size``: beyond (no model of this product's), FAISS searches
    without one, the same distances but for rounding, rather than take memory a file of kilobytes declares."""
    ivf = _inverted_file(index)
    pq = faiss.downcast_index(ivf) if ivf is not None else None
    if not isinstance(pq, faiss.IndexIVFPQ) or not pq.by_residual or pq.precomputed_table.size():
        return
    with _READ_LIMIT_LOCK:  # one setting of the process, as the read limit
        before = faiss.cvar.precomputed_table_max_bytes
        faiss.cvar.precomputed_table_max_bytes = min(before, PQ_TABLE_PER_FILE_BYTE * size)
        try:
            pq.use_precomputed_table = 0  # FAISS's choice: a table where it fits under the bound
            pq.precompute_table()
        finally:
            faiss.cvar.precomputed_table_max_bytes = before


# No feature a CNN gives of a normalized photo comes near this (the models here hold at most 83); squared distances of
# rows within it stay far inside float32 at any width, where a crafted 1e30 made every distance infinite
ROW_MAX_ABS = 1e6
GRAPH_SAMPLE = 256  # centroids a graph over the lists must find again at load (each finds itself, distance 0)
ROW_CHUNK = 1 << 22  # values checked at a time: no temporary the size of the bank


def check_index(index: faiss.Index) -> None:
    """ModelFormatError unless ``index`` is one of the structures this product writes (flat; ivf's re-rank over
    padded fp16 lists; the older IVFFlat and IVFPQ; lists found by a flat scan or an HNSW graph) and agrees with
    itself: every row id once in the lists and inside the bank, the quantizer holding ``nlist`` centroids of the
    lists' width, the re-rank holding every row, and finite values of a sane size. FAISS reads such fields as they
    stand: a list id past the bank read memory outside it (a segfault), a duplicated id or a missing centroid hid
    rows from every search (good parts flagged), a NaN in one row spread to every distance. One pass over the rows
    and ids (the cost of the checksum's own pass at most) and a few hundred searches of a graph."""
    top = faiss.downcast_index(index)
    ntotal, d = int(top.ntotal), int(top.d)
    if top.metric_type != faiss.METRIC_L2 or not top.is_trained:
        raise ModelFormatError(f"index.faiss is a {type(top).__name__} that is untrained or not L2: no model's")
    if type(top) in (faiss.IndexFlat, faiss.IndexFlatL2):
        _check_rows(top, "bank rows")
        return
    base = top
    if isinstance(top, faiss.IndexRefine):
        rows = faiss.downcast_index(top.refine_index)
        if type(rows) not in (faiss.IndexFlat, faiss.IndexFlatL2) or rows.metric_type != faiss.METRIC_L2 \
                or (int(rows.d), int(rows.ntotal)) != (d, ntotal):
            raise ModelFormatError(f"index.faiss: its exact rows ({type(rows).__name__}, {rows.ntotal} of "
                                   f"{rows.d} dims) are not the {ntotal} rows of {d} dims it re-ranks")
        if not 1 <= float(top.k_factor) <= 64:
            raise ModelFormatError(f"index.faiss: its re-rank factor {top.k_factor} is outside 1 to 64")
        _check_rows(rows, "bank rows")
        base = faiss.downcast_index(top.base_index)
    width = d
    if isinstance(base, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(base.chain.at(i)) for i in range(base.chain.size())]
        remap = chain[0] if len(chain) == 1 else None
        if not isinstance(remap, faiss.RemapDimensionsTransform) or int(remap.d_in) != d \
                or int(remap.d_out) < d or not np.array_equal(
                    faiss.vector_to_array(remap.map), np.r_[np.arange(d), np.full(int(remap.d_out) - d, -1)]):
            raise ModelFormatError("index.faiss: its transform is not the zero padding of the rows ivf writes")
        width = int(remap.d_out)
        base = faiss.downcast_index(base.index)
    if type(base) not in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ) \
            or base.metric_type != faiss.METRIC_L2:
        raise ModelFormatError(f"index.faiss holds a {type(base).__name__}, not an index this product writes")
    if (int(base.d), int(base.ntotal)) != (width, ntotal):
        raise ModelFormatError(f"index.faiss: its lists hold {base.ntotal} rows of {base.d} dims, not {ntotal} of "
                               f"{width}")
    if isinstance(base, faiss.IndexIVFScalarQuantizer) and base.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
        raise ModelFormatError("index.faiss: its lists are not fp16, as every ivf this product writes")
    if isinstance(base, faiss.IndexIVFPQ):
        _check_rows(faiss.vector_to_array(base.pq.centroids), "PQ centroids")
    _check_lists(base, ntotal, width)


def _check_lists(ivf: faiss.IndexIVF, ntotal: int, width: int) -> None:
    """The quantizer and the inverted lists of ``ivf`` (check_index)."""
    nlist = int(ivf.nlist)
    quantizer = faiss.downcast_index(ivf.quantizer)
    graph = type(quantizer) is faiss.IndexHNSWFlat
    centroids = faiss.downcast_index(quantizer.storage) if graph else quantizer
    if type(centroids) not in (faiss.IndexFlat, faiss.IndexFlatL2) or centroids.metric_type != faiss.METRIC_L2 \
            or quantizer.metric_type != faiss.METRIC_L2 \
            or (int(quantizer.d), int(quantizer.ntotal), int(centroids.ntotal)) != (width, nlist, nlist):
        raise ModelFormatError(f"index.faiss: its quantizer ({type(quantizer).__name__}, {quantizer.ntotal} "
                               f"centroids of {quantizer.d} dims) does not find its {nlist} lists of {width} dims")
    _check_rows(centroids, "list centroids")
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if type(lists) is not faiss.ArrayInvertedLists or int(lists.nlist) != nlist \
            or int(lists.code_size) != int(ivf.code_size):
        raise ModelFormatError("index.faiss: its inverted lists are not those of its index")
    named = []
    fp = {faiss.IndexIVFFlat: np.float32, faiss.IndexIVFScalarQuantizer: np.float16}.get(type(ivf))
    for i in range(nlist):
        n = int(lists.list_size(i))
        if not n:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(i), n)
        if int(ids.min()) < 0 or int(ids.max()) >= ntotal:
            row = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ModelFormatError(f"index.faiss: list {i} names row {row}, outside the bank's {ntotal} rows")
        named.append(np.array(ids))
        if fp is not None:
            _check_rows(faiss.rev_swig_ptr(lists.get_codes(i), n * int(ivf.code_size)).view(fp), "list codes")
    count = np.bincount(np.concatenate(named), minlength=ntotal) if named else np.zeros(ntotal, np.int64)
    if (count != 1).any():
        row = int(np.flatnonzero(count != 1)[0])
        raise ModelFormatError(f"index.faiss: row {row} is in {int(count[row])} lists, where every row is in one")
    if graph and nlist:
        _check_graph(quantizer, centroids)


def _check_rows(rows: "faiss.Index | np.ndarray", what: str) -> None:
    """Every value finite and within :data:`ROW_MAX_ABS` (a flat index's rows, or an array)."""
    x = rows if isinstance(rows, np.ndarray) else faiss.rev_swig_ptr(rows.get_xb(), int(rows.ntotal) * int(rows.d))
    for s in range(0, len(x), ROW_CHUNK):
        part = x[s : s + ROW_CHUNK]
        low, high = float(part.min()), float(part.max())  # NaN propagates through both
        if not -ROW_MAX_ABS <= low <= high <= ROW_MAX_ABS:
            held = "NaN" if np.isnan(low) or np.isnan(high) else f"{max(abs(low), abs(high)):g}"
            raise ModelFormatError(f"index.faiss: its {what} hold {held}, where a model's features are finite "
                                   f"numbers below {ROW_MAX_ABS:g}")


def _check_graph(graph: faiss.Index, centroids: faiss.Index) -> None:
    """A sample of the centroids, searched through the graph, must find themselves: FAISS checks a graph's ids and
    levels on reading, not where its links lead, and a graph whose every node linked to itself found one list for
    every query (every part flagged)."""
    nlist = int(centroids.ntotal)
    sample = np.unique(np.linspace(0, nlist - 1, min(nlist, GRAPH_SAMPLE)).astype(np.int64))
    hnsw = graph.hnsw
    ef = hnsw.efSearch
    hnsw.efSearch = max(QUANTIZER_EF, ef)
    try:
        sq, found = graph.search(np.ascontiguousarray(centroids.reconstruct_batch(sample)), 1)
    finally:
        hnsw.efSearch = ef
    missed = int(((found[:, 0] != sample) & (sq[:, 0] > 0)).sum())  # a twin centroid found instead is as near
    if missed > len(sample) // 20:
        raise ModelFormatError(f"index.faiss: the graph over its lists leads {missed} of {len(sample)} centroids "
                               "searched for away from themselves")
