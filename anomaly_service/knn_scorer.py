"""The memory bank: feature selection, greedy coreset, the FAISS index, and kNN scoring against it.

The selector and the sampler are injected (as patchcore-inspection injects its sampler and scorer), so a
benchmark can compare other choices without the product offering them. The search runs where the model runs:
on the GPU when there is one, else a blocked exact search on the CPU (see index.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Protocol, Sequence

import torch  # first: FAISS then shares its OpenMP pool (parallelism.load_faiss_after_torch)
import faiss
import numpy as np

from .artifact import arrays_to_bytes, bytes_to_arrays
from .coreset import GreedyCoresetSampler, StreamingCover
from .embedder import Embedded
from .config import ModelConfig
from .errors import ConfigError, ModelFormatError
from .anomaly_map import anomaly_map
from .index import (SubsetSearch, _with_direct_map, build_index, complete, describe_search, deserialize,
                    resolve_index_kind, search, serialize, set_nprobe, subset_index, to_search_device)
from .inspection_mask import score_inside
from .part_groups import group_of
from .patch_store import PatchStore
from .progress import progress_bar
from .provenance import patch_sources
from .scorer import MatchedScore, PatchMatches, RawScore
from .scoring import patch_scores
from .selection import FeatureSelector
from .timing import StageTimer

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ARRAYS_FILE = "arrays.npz"
# extra neighbours searched per patch in leave-one-out scoring, so that some come from other images
LEFT_OUT_SHORTLIST = 16
# leave-one-out searches every training patch: beyond this many (images x bank rows) the shortlist comes from an
# inverted-file index (the largest fits would otherwise spend most of their time here), probing as many lists as
# the scoring default
LEFT_OUT_EXACT_WORK = 50_000_000
LEFT_OUT_NPROBE = ModelConfig.nprobe
# patches per chunk: the first chunk's greedy costs chunk x its bank (quadratic in the chunk), the later ones only a
# covering search and a greedy over what they leave uncovered; a smaller chunk is cheaper, but sets the radius
# from fewer images (docs/decisions.md, "Large fits", has the measured trade)
STREAM_CHUNK_ROWS = 131_072
# above this many patches the coreset is built chunk by chunk. Below two chunks one greedy costs at most about four
# times a chunk's and keeps the exact k-center bank, which the contamination guard's support score reads: on
# bottle (214k patches) the streamed bank listed 5 clean training images as suspects against 2 (docs/decisions.md)
STREAM_ABOVE_ROWS = 2 * STREAM_CHUNK_ROWS


def fill_bank(whole: bool) -> str:
    """What gives the bank more patches to search: where it holds every patch of the fit already (``whole``:
    --coreset-ratio 1, or a cap above them all) neither coreset flag adds one, and only more good images do."""
    return ("add good images (the bank holds every patch of the fit already)" if whole
            else "keep more patches (--coreset-ratio, --coreset-max)")


class ExtraPatches(Protocol):
    """Patches that join the bank as their image's own (turned copies, orientation.py): entry ``i`` of ``rows``
    (``(1, n, D)``) belongs to image ``i`` of the fit's store; the bank with them holds at most ``factor`` times
    the patches it would keep without them."""

    rows: PatchStore
    factor: float

    def sources(self, images: Sequence[int], place: Sequence[int]) -> np.ndarray:
        """``(N, 3)`` provenance of the rows of ``images``, their image numbered ``place[k]``."""
        ...


class KnnScorer:
    """PatchCore's scorer: distance of each patch to its nearest normal patches in the bank."""

    name = "knn"

    # defaults: the config's (a scorer built directly, as the benchmarks build one, searches as a fitted model does)
    def __init__(self, *, selector: FeatureSelector | None, sampler: GreedyCoresetSampler,
                 index_kind: str = ModelConfig.index, nprobe: int = ModelConfig.nprobe, k: int = ModelConfig.k,
                 image_score: str = ModelConfig.image_score, sigma: float = ModelConfig.sigma,
                 seed: int = ModelConfig.seed):
        self.selector, self.sampler = selector, sampler
        self.index_kind, self.nprobe, self.k, self.image_score, self.sigma, self.seed = (
            index_kind, nprobe, k, image_score, sigma, seed)
        self.index_: faiss.Index | None = None
        self.index_used_: str | None = None  # the kind built (index_kind "auto" resolves by the bank's size)
        self.selected_: np.ndarray | None = None
        # (image, row, col) each bank row came from (provenance.py); None for models saved before it was kept
        self.provenance_: np.ndarray | None = None
        # True for the rows of turned copies (orientation.py), False for the images' own; None: no copies, or a
        # model saved before they were told apart. An aligned model searches the photos it leaves as they came
        # against its own rows only (:meth:`score`)
        self.copies_: np.ndarray | None = None
        # the part group of each training image (part_groups.py: images of one part are left out together when
        # one is scored leave-one-out); None: every image is its own, as in models fitted without part_id
        self.groups_: np.ndarray | None = None
        self.stats_: dict[str, Any] = {}
        self._search: Any = None
        self._described: str | None = None  # describe_search of _search, worded once where it is placed
        self._own: SubsetSearch | None = None  # the search over the own rows, built at first use
        self._placement: tuple[bool, str, str] = (False, "auto", "cpu")  # (GPU?, kNN precision, device) of place()
        self._keep: torch.Tensor | None = None

    # ------------------------------------------------------------------ fit
    def fit(self, bank: torch.Tensor | PatchStore, sources: np.ndarray | None = None,
            images: Sequence[int] | None = None, extra: ExtraPatches | None = None,
            on_selected: Callable[[np.ndarray], None] | None = None) -> None:
        """Select dimensions, subsample the bank and index it. ``bank``: ``(N, D)`` features of every normal patch
        with their ``(N, 3)`` provenance ``sources`` (provenance.patch_sources), or the fit's
        :class:`~.patch_store.PatchStore` (``images``: the ones to use, default all; provenance follows from it;
        ``extra``: more patches of those images, which the selection does not read and which only add, after the
        coreset of the images' own, what it leaves uncovered at its radius). More than
        :data:`STREAM_ABOVE_ROWS` patches are subsampled chunk by chunk (:class:`~.coreset.StreamingCover`): one
        greedy over all of them costs patches x bank, which grows with the square of the images. ``on_selected`` is
        called with the kept dimensions as soon as they are chosen, before the coreset (the fit starts the
        whole-image branch's training there, beside the greedy)."""
        # a scorer loaded with a selection no longer offered has no selector: the fit refuses it before (fitting.py)
        assert self.selector is not None
        if extra is not None and not isinstance(bank, PatchStore):
            raise TypeError("extra patches (turned copies) join a fit from its PatchStore, not from a tensor bank")
        if isinstance(bank, PatchStore):
            store = bank
            ids = list(range(len(store))) if images is None else list(images)
            n_rows = sum(store.size(i) for i in ids)
            n_extra = sum(extra.rows.size(i) for i in ids) if extra is not None else 0
            if n_rows <= STREAM_ABOVE_ROWS:  # one greedy over the images' own patches, as always
                # numbered by place in ``images``; a tiled image's patches name its stitched grid's cells
                sources = patch_sources([store.grids[i] for i in ids], layouts=[store.layouts[i] for i in ids])
                bank = store.all(None if images is None else ids)
        t0 = time.perf_counter()
        self.selected_ = self.selector.select(bank)  # a store answers from the sums it kept of every patch
        if on_selected is not None:
            on_selected(self.selected_)
        if isinstance(bank, PatchStore):
            n_patches, full_dim = n_rows + n_extra, bank.dim
            memory, core_sources, radius, chunks, own = self._streamed_coreset(bank, ids, extra)
            copies = None if extra is None else np.arange(len(memory)) >= own
        else:
            keep = torch.from_numpy(self.selected_).to(bank.device)
            selected = bank.index_select(1, keep)
            n_patches, full_dim = len(selected), bank.shape[1]
            del bank
            core_ids = self.sampler.sample(selected)
            chosen = selected[torch.from_numpy(core_ids).to(selected.device)]
            # every patch kept (coreset_ratio 1): each is its own nearest, the radius is 0
            radius = 0.0 if len(core_ids) == n_patches else self.sampler.coverage_radius(chosen)
            memory = chosen.cpu().numpy().astype(np.float32)
            core_sources = None if sources is None else sources[core_ids]
            chunks = 1
            copies = None
            if extra is not None:  # the turned copies add what the images' own bank leaves uncovered
                cover = None if radius == 0.0 else StreamingCover(chosen, radius, self.sampler.proj_dim, self.seed)
                rows, srcs, _ = self._with_copies(cover, extra, ids, len(memory))
                copies = np.concatenate([np.zeros(len(memory), bool), np.ones(sum(map(len, rows)), bool)])
                memory = np.concatenate([memory, *rows])
                core_sources = np.concatenate([core_sources, *srcs])
                n_patches += n_extra  # chunks stays 1: the images' own bank is one greedy
            del selected, chosen
        coreset_seconds = time.perf_counter() - t0
        if self.k > len(memory):  # searching for more neighbours than the bank has answers padding, not distances
            raise ConfigError(f"--k {self.k} is more than the {len(memory)} patches of the memory bank: lower --k, "
                              f"or {fill_bank(len(memory) >= n_patches)}")
        self.index_used_ = resolve_index_kind(self.index_kind, len(memory))
        self.index_ = build_index(memory, self.index_used_, nprobe=self.nprobe, seed=self.seed)
        self.provenance_ = None if core_sources is None else np.ascontiguousarray(core_sources, dtype=np.int32)
        self.copies_, self._own = copies, None
        self.stats_ = {"from_patches": n_patches, "full_dim": full_dim, "coreset_seconds": coreset_seconds,
                       "coverage_radius": radius, "chunks": chunks}

    def _streamed_coreset(self, store: PatchStore, images: Sequence[int], extra: ExtraPatches | None = None
                          ) -> tuple[np.ndarray, np.ndarray, float, int, int]:
        """The bank of a fit too large to subsample at once: the greedy on a first chunk of images (in a seeded
        order, so no camera or day dominates it) sets the radius; each further chunk adds what it leaves
        uncovered, and then each chunk of the ``extra`` patches, up to ``extra.factor`` times the bank of the
        images' own. Returns the bank rows (kept dimensions), their sources, the radius, the chunk count and how
        many of the rows, first, are the images' own."""
        keep = torch.from_numpy(self.selected_)
        ids = np.asarray(images)
        order = ids[np.random.default_rng(self.seed).permutation(len(ids))]
        place = np.zeros(len(store), dtype=np.int64)
        place[ids] = np.arange(len(ids))  # bank sources number images by their place in ``images``
        chunks = list(store.chunks(order.tolist(), STREAM_CHUNK_ROWS))
        rows: list[np.ndarray] = []
        srcs: list[np.ndarray] = []
        cover: StreamingCover | None = None
        radius = 0.0
        bar = progress_bar(self.sampler.progress, total=len(order), desc="coreset (streamed)", unit="img")
        keep_all = self.sampler.ratio >= 1 and self.sampler.max_size is None  # no subsampling: nothing to cover
        cap = self.sampler.max_size  # --coreset-max: a hard cap, the radius guarantee gives way to it
        total = capped = skipped = 0
        for chunk in chunks:
            x = store.gather(chunk, keep)
            src = patch_sources([store.grids[i] for i in chunk], layouts=[store.layouts[i] for i in chunk],
                                image_ids=place[chunk].tolist())
            if keep_all:
                pick = np.arange(len(x))
            elif cover is None:
                pick = self.sampler.sample(x)
                first = x[torch.from_numpy(pick)]
                radius = self.sampler.coverage_radius(first)
                cover = StreamingCover(first, radius, self.sampler.proj_dim, self.seed)
            elif cap is None or total < cap:
                pick = cover.extend(x)
            else:
                pick, skipped = np.zeros(0, dtype=np.int64), skipped + len(chunk)
            if cap is not None and total + len(pick) > cap:
                # the cover adds the farthest patches first: keep those, leave the nearest uncovered
                capped += total + len(pick) - cap
                pick = pick[: cap - total]
            total += len(pick)
            rows.append(x[torch.from_numpy(pick)].numpy().astype(np.float32))
            srcs.append(src[pick])
            bar.update(len(chunk))
            bar.set_postfix(bank=total)
        bar.close()
        n_chunks = len(chunks)
        if extra is not None:  # the turned copies add what the images' own bank leaves uncovered
            more_rows, more_srcs, more = self._with_copies(cover, extra, images, total)
            rows, srcs, n_chunks = rows + more_rows, srcs + more_srcs, n_chunks + more
        if capped or skipped:
            log.warning("coreset_max=%d reached while streaming: %d patches farther than the fit's radius were "
                        "left out, and %d later images were not looked at for more; raise --coreset-max to cover "
                        "them", cap, capped, skipped)
        return np.concatenate(rows), np.concatenate(srcs), radius, n_chunks, total

    def _with_copies(self, cover: StreamingCover | None, extra: ExtraPatches, images: Sequence[int], own: int
                     ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """The ``extra`` patches (turned copies) that join a bank of ``own`` rows of the images' own (``cover``,
        None when the bank keeps every patch): chunk by chunk in the seeded image order, what the bank leaves
        uncovered at its radius, farthest first, up to ``extra.factor`` times ``own`` rows (and ``--coreset-max``).
        So the images' own bank stays as a fit without copies keeps it. Where that cap is reached before every
        image's copies were looked at, the pass is made again with the room spread over every image's copies
        (:meth:`_copies_pass`): first come, the copies of the images early in the order took it all. Returns the
        rows (kept dimensions), their sources and the chunk count."""
        ids = np.asarray(images)
        order = ids[np.random.default_rng(self.seed).permutation(len(ids))]
        place = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
        place[ids] = np.arange(len(ids))  # bank sources number images by their place in ``images``
        cap = self.sampler.max_size
        limit = int(round(own * extra.factor)) if cap is None else min(cap, int(round(own * extra.factor)))
        spare = None if cover is None else cover.copy()  # the cover as the images' own bank left it
        rows, srcs, n_chunks, cut = self._copies_pass(cover, extra, order, place, own, limit, spread=False)
        if cut:
            rows, srcs, n_chunks, _ = self._copies_pass(spare, extra, order, place, own, limit, spread=True)
            capped = cap is not None and cap <= own * extra.factor
            log.warning("the bank reached its %d patches (%s) before every turned copy's uncovered patch was in it: "
                        "each chunk of images kept its copies' farthest ones, in proportion to its patches. If "
                        "`anomaly evaluate` flags good parts photographed turned, a larger %s gives the copies more "
                        "room", limit, "--coreset-max" if capped else f"{extra.factor:g}x the bank without copies",
                        "--coreset-max" if capped else "--coreset-ratio")
        return rows, srcs, n_chunks

    def _copies_pass(self, cover: StreamingCover | None, extra: ExtraPatches, order: np.ndarray, place: np.ndarray,
                     own: int, limit: int, spread: bool) -> tuple[list[np.ndarray], list[np.ndarray], int, bool]:
        """One pass of :meth:`_with_copies` over the chunks of ``order``; ``spread``: each chunk may add at most its
        share of the room left (by its share of the patches left), so the copies of every image get their
        farthest patches in. Returns the rows, sources, chunk count and whether some uncovered patch was left
        out for want of room (a pass without ``spread`` stops there: its rows are not kept). A bank filled
        exactly is not yet cut: the later chunks' copies may all be covered."""
        keep = torch.from_numpy(self.selected_)
        sizes = {int(i): extra.rows.size(int(i)) for i in order}
        left = sum(sizes.values())
        rows: list[np.ndarray] = []
        srcs: list[np.ndarray] = []
        total, n_chunks, cut = own, 0, False
        for chunk in extra.rows.chunks(order.tolist(), STREAM_CHUNK_ROWS):
            room = limit - total
            if room <= 0 and spread:
                break
            n = sum(sizes[i] for i in chunk)
            # what this chunk may add: its share of the room when spread; else one more than fits, which tells
            # that the room ran out
            most = (int(math.ceil(room * n / left)) if n < left else room) if spread else max(room, 0) + 1
            left -= n
            x = extra.rows.gather(chunk, keep)
            src = extra.sources(chunk, place[chunk].tolist())
            if cover is None:  # every patch kept: as many as may be added, evenly over the chunk
                pick = np.arange(len(x)) if most >= len(x) else np.unique(
                    np.linspace(0, len(x) - 1, most).astype(np.int64))
            else:
                pick = cover.extend(x, most=most)
            cut |= len(pick) > room
            if cut and not spread:
                break
            pick = pick[:room]
            total += len(pick)
            rows.append(x[torch.from_numpy(pick)].numpy().astype(np.float32))
            srcs.append(src[pick])
            n_chunks += 1
        return rows, srcs, n_chunks, cut

    def place(self, device: torch.device, knn_precision: str) -> None:
        """Put the search where scoring runs: exact flat banks get the blocked search (bf16 or fp32) on the CPU,
        or a device search on a GPU; approximate indexes stay FAISS."""
        assert self.index_ is not None and self.selected_ is not None
        self._keep = torch.from_numpy(self.selected_).to(device)
        self._placement = (device.type == "cuda", knn_precision, str(device))
        self._search = complete(to_search_device(self.index_, *self._placement), self.index_)
        self._described = describe_search(self._search)
        self._own = None

    def own_search(self) -> Any:
        """The search over the images' own rows (no turned copy's), in the bank's row numbers; the whole search
        when the bank holds no copies it can tell apart, or fewer own rows than the neighbours a patch averages."""
        if self.copies_ is None or not self.copies_.any() or int((~self.copies_).sum()) < self.k:
            return self._search
        if self._own is None:
            self._own = self._subset(self.index_, ~self.copies_)
        return self._own

    def _subset(self, index: faiss.Index, rows: np.ndarray) -> SubsetSearch:
        """A search over ``rows`` (a mask of the bank) of ``index``'s kind, placed as scoring is. Where scoring runs
        the blocked search over ``index``, this one reads that search's bank where it can instead of holding a
        second copy (on a GPU, device memory: :meth:`~.index.BlockedFlatSearch.over_rows`), with the same results."""
        from .index import BlockedFlatSearch

        ids = np.flatnonzero(rows)
        whole = self._search
        shared = whole.over_rows(ids) if isinstance(whole, BlockedFlatSearch) and whole.index is index else None
        if shared is not None:
            return SubsetSearch(shared, ids)
        sub = subset_index(index, self.bank(), ids)
        return SubsetSearch(to_search_device(sub, *self._placement), ids, index=sub)

    @property
    def keep(self) -> torch.Tensor | None:
        """Indices of the kept embedding dimensions on the scoring device (the embedder computes only these)."""
        return self._keep

    @property
    def search_description(self) -> str | None:
        """Which search runs, as worded when it was placed: every result's record carries it, so it is not worded
        again per photo."""
        return self._described

    @property
    def bank_size(self) -> int:
        return int(self.index_.ntotal) if self.index_ is not None else 0

    def bank(self) -> np.ndarray:
        """The memory bank's rows ``(N, d)``: exact for flat and ivf indexes (ivf's re-rank keeps the fp32 rows),
        decoded from PQ codes for ivfpq."""
        assert self.index_ is not None
        return self.index_.reconstruct_n(0, self.index_.ntotal)

    def extended(self, patches: torch.Tensor, radius: float | None, sources: np.ndarray | None = None,
                 copies: np.ndarray | None = None, made: np.ndarray | None = None, factor: float | None = None
                 ) -> tuple["KnnScorer", int, float]:
        """A new scorer whose bank adds the ``patches`` (kept dimensions, ``(N, d)``, from ``sources``; ``copies``
        marks those of turned views, ``made`` those of turned copies made from the photos) it does not already
        cover: the fit's greedy continued from the bank, stopping at ``radius`` (recovered from the bank when None).
        ``factor``: the bank's cap against its rows without copies, which the made copies' rows stay within.
        Returns ``(scorer, patches added, radius used)``; this scorer is left untouched (it may be serving)."""
        assert self.index_ is not None and self.selected_ is not None
        bank = torch.from_numpy(self.bank())
        if radius is None:
            radius = self.sampler.radius_from_bank(bank)
        add = self._uncovered(bank, patches, radius, copies, made, factor)
        out = KnnScorer(selector=self.selector, sampler=self.sampler, index_kind=self.index_kind, nprobe=self.nprobe,
                        k=self.k, image_score=self.image_score, sigma=self.sigma, seed=self.seed)
        out.index_ = _with_direct_map(faiss.clone_index(self.index_))
        if len(add):
            out.index_.add(np.ascontiguousarray(patches[torch.from_numpy(add)].float().cpu().numpy()))
        set_nprobe(out.index_, self.nprobe)
        out.selected_ = self.selected_.copy()
        out.index_used_ = self.index_used_
        if self.provenance_ is not None and sources is not None:
            out.provenance_ = np.concatenate([self.provenance_, sources[add].astype(np.int32)]) if len(add) \
                else self.provenance_.copy()
        if self.copies_ is not None:  # a bank that tells its copies apart keeps doing so
            new = np.zeros(len(add), bool) if copies is None else np.asarray(copies, bool)[add]
            out.copies_ = np.concatenate([self.copies_, new])
        # the fitted images keep their part groups; the added ones are each a group of their own (group_of)
        out.groups_ = None if self.groups_ is None else self.groups_.copy()
        out.stats_ = dict(self.stats_)
        return out, int(len(add)), float(radius)

    def _uncovered(self, bank: torch.Tensor, patches: torch.Tensor, radius: float, copies: np.ndarray | None,
                   made: np.ndarray | None = None, factor: float | None = None) -> np.ndarray:
        """Which ``patches`` an update adds to ``bank``, in the order they join it. In a bank that tells its turned
        copies apart, the images' own patches are covered by the own rows first and the copies' by every row, as
        the fit builds it: an aligned model judges a photo left as it came by its own rows alone (:meth:`score`),
        so an own patch near a copy's row alone would be left out of the rows that judge it.

        The copies ``made`` from the new photos come last, farthest first, and only as many as keep the bank
        within ``factor`` times its rows without copies and ``--coreset-max``, the fit's caps: months of updates
        would otherwise grow the bank, and the search with it, past what the fit allowed. The photos' own rows, a
        turned photo's view included, are never cut: an update must learn the parts it was given."""
        marks = None if copies is None else np.asarray(copies, bool)
        # a bank that tells its copies apart holds none where the fit's cap left them no room (--coreset-max)
        if self.copies_ is None or marks is None:
            return self.sampler.extend(bank, patches, radius)
        extra = np.zeros(len(marks), bool) if made is None else np.asarray(made, bool)
        mine = np.flatnonzero(~marks)
        own = mine[self.sampler.extend(bank[torch.from_numpy(~self.copies_)], patches[torch.from_numpy(mine)],
                                       radius)] if len(mine) else mine
        out = [own]
        grown = torch.cat([bank, patches[torch.from_numpy(own)].to(bank.dtype)])
        n_own = int((~self.copies_).sum()) + len(own)  # the bank's rows without copies, once the update is in
        for rows, cap in ((np.flatnonzero(marks & ~extra), None), (np.flatnonzero(extra), factor)):
            if not len(rows):
                continue
            picked = rows[self.sampler.extend(grown, patches[torch.from_numpy(rows)], radius)]
            if cap is not None:  # and --coreset-max, which the fit's copies stayed within too
                limit, most = int(cap * n_own), self.sampler.max_size
                why = f"{cap:g}x its rows without copies"
                if most is not None and most < limit:
                    limit, why = most, f"--coreset-max {most}"
                room = max(0, limit - len(grown))
                if len(picked) > room:
                    log.info("the update keeps %d of its turned copies' %d uncovered patches: the bank stays within "
                             "%s", room, len(picked), why)
                    picked = picked[:room]
            out.append(picked)
            grown = torch.cat([grown, patches[torch.from_numpy(picked)].to(bank.dtype)])
        return np.concatenate(out)

    # ------------------------------------------------------------------ score
    def score(self, batch: Embedded, timer: StageTimer) -> list[RawScore]:
        """Per image: its score and map, with the bank row each patch matched and its pooled feature
        (:class:`~.scorer.MatchedScore`; the evidence for flagged regions reads them). Tiled, every tile's patches
        are searched and each image's grids stitched into one (tiling.py) before the map. In a batch that says
        which images are turned views (an aligned model's, grain.py), the others are searched against the images'
        own rows: what the model sees of a photo left as it came is what a ``fixed`` model sees, and the copies
        only stand for turned views."""
        emb = batch.features
        n, h, w, d = emb.shape
        with timer.stage("knn", per=len(batch.shapes)):
            queries = emb.reshape(-1, d).float().cpu().numpy()
            searched = batch.searched()  # a turned canvas's pure fill takes the scores of what it repeats
            found = self._patch_scores(queries if searched is None else queries[searched], batch, searched)
            scores, nearest = (batch.spread(v, searched) for v in found)
            # from the queries already on the CPU: one more small parallel torch op can stall on a busy machine
            if batch.tiles is None:
                pooled = queries.reshape(n, h * w, d).mean(axis=1)
            else:
                bounds = np.cumsum([0] + batch.rows())
                pooled = np.stack([queries[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
        out: list[RawScore] = []
        with timer.stage("map", per=len(batch.shapes)):
            grids = batch.image_grids(scores)
            nearest_grids = batch.image_grids(nearest, pick=True)
            for j, shape in enumerate(batch.shapes):
                s = grids[j]
                matches = PatchMatches(nearest=nearest_grids[j], distance=s.astype(np.float32, copy=False),
                                       pooled=pooled[j])
                out.append(MatchedScore(*self._image_result(s, batch, j), matches))
        return out

    def _patch_scores(self, queries: np.ndarray, batch: Embedded, searched: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~.scoring.patch_scores` of the batch's rows (those ``searched``, None: all), each image's
        against the rows its pose is judged by."""
        own = self.own_search() if batch.turned is not None else self._search
        if own is self._search:
            return patch_scores(self._search, queries, self.k)
        as_came = np.repeat(~np.asarray(batch.turned, bool), batch.rows())
        if searched is not None:
            as_came = as_came[searched]
        if as_came.all() or not as_came.any():
            return patch_scores(own if as_came.all() else self._search, queries, self.k)
        scores, nearest = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
        for rows, where in ((as_came, own), (~as_came, self._search)):
            scores[rows], nearest[rows] = patch_scores(where, queries[rows], self.k)
        return scores, nearest

    def _image_result(self, grid: np.ndarray, batch: Embedded, j: int) -> RawScore:
        """Image ``j``'s ``(h, w)`` patch scores -> its (image score, map at its own size), inside the mask."""
        amap = anomaly_map(grid, batch.image_work_size(j), batch.shapes[j][:2], self.sigma)
        return score_inside(grid, amap, self.image_score, batch.inspect)

    def score_left_out(self, batch: Embedded, image_ids: Sequence[int], folds: np.ndarray | None = None,
                       shortlist: Any = None, own: bool = False) -> list[RawScore]:
        """Like :meth:`score`, but each image of ``batch`` (training image ``image_ids[j]``) is scored against the
        bank without the patches it contributed: leave-one-out by image, from one fitted bank. Where the fit grouped
        its images by part (``groups_``), the patches of the image's whole group are left out, and ``folds`` (training
        image -> fold) leaves out the image's whole fold instead.

        Each patch's few nearest rows are searched as in scoring; those from the image itself are skipped. Rows
        whose whole shortlist came from the image itself (rare: its own near-duplicate patches) are searched
        exactly against the bank without that image's rows. ``shortlist``: the search that finds the few nearest
        rows (default: the scoring search; a large fit passes :meth:`left_out_search`). ``own``: against the
        images' own rows only, as an aligned model scores a photo it leaves as it came (``shortlist`` then from
        ``left_out_search(n, own=True)``)."""
        grids, _ = self._left_out_grids(batch, image_ids, folds, 0, shortlist, own)
        return [self._image_result(g, batch, j) for j, g in enumerate(grids)]

    def score_left_out_supported(self, batch: Embedded, image_ids: Sequence[int], support: int,
                                 shortlist: Any = None, own: bool = False) -> tuple[list[RawScore], list[float]]:
        """:meth:`score_left_out`'s results and, from the same search, each image's support score: its patches
        scored against the bank without their own image and without the ``support`` other images nearest to
        each patch (the distance to its ``support + 1``-th nearest other image); with ``groups_``, its own part's
        images and the ``support`` other parts nearest. The contamination guard reads it (contamination.py says
        why)."""
        grids, supported = self._left_out_grids(batch, image_ids, None, support, shortlist, own)
        return ([self._image_result(g, batch, j) for j, g in enumerate(grids)],
                [self._image_result(g, batch, j)[0] for j, g in enumerate(supported)])

    def _left_out_grids(self, batch: Embedded, image_ids: Sequence[int], folds: np.ndarray | None, support: int,
                        shortlist: Any = None, own: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per image of ``batch``: its ``(h, w)`` leave-one-out patch scores (its fold left out, with ``folds``)
        and, with ``support`` > 0, its support patch scores; one shortlist search serves both (``own``: over the
        images' own rows)."""
        assert self.provenance_ is not None and self.index_ is not None
        # the rows searched: every row where scoring searches them all (no marks, or fewer own rows than k)
        allowed = ~self.copies_ if own and self.own_search() is not self._search else None
        emb = batch.features
        d = emb.shape[-1]
        queries = emb.reshape(-1, d).float().cpu().numpy()
        # with folds (an array: training image -> fold), every image of the query's fold is left out; without, every
        # image of its part group (groups_, part_groups.py; none: the image alone); tiled, an image's rows are all
        # its tiles' patches and the bank's sources name the image, so they leave together
        group = ((lambda ids: folds[ids]) if folds is not None else
                 (lambda ids: group_of(self.groups_, ids)) if self.groups_ is not None else (lambda ids: ids))
        owner = group(np.repeat(np.asarray(image_ids, dtype=np.int32), batch.rows()))
        source = group(self.provenance_[:, 0])
        kk = min(self.bank_size if allowed is None else int(allowed.sum()), self.k + LEFT_OUT_SHORTLIST)
        default = self._search if allowed is None else self.own_search()
        dist, ids = search(default if shortlist is None else shortlist, queries, kk)
        # a shortlist that found fewer rows than asked (-1, at FLT_MAX) names no image: it counts as the query's
        # own, so a row left short is searched exactly below and its score never averages the missing result in
        near = np.where(ids >= 0, source[ids], owner[:, None])
        foreign = near != owner[:, None]
        take = foreign & (np.cumsum(foreign, axis=1) <= self.k)
        scores = np.where(take, dist, 0.0).sum(1) / self.k
        short = np.flatnonzero(take.sum(1) < self.k)
        if len(short):
            bank = self.bank()
            for img in np.unique(owner[short]):
                rows = short[owner[short] == img]
                others = bank[(source != img) if allowed is None else (source != img) & allowed]
                if len(others) < self.k:  # the coreset kept (nearly) every row from this image: say which flags
                    whole = self.bank_size >= self.stats_.get("from_patches", self.bank_size + 1)
                    raise ConfigError(
                        f"leave-one-out calibration scores each good image against the other images' patches, and the "
                        f"memory bank's {self.bank_size} patch(es) hold {len(others)} from images other than one of "
                        f"them, fewer than --k {self.k}: {fill_bank(whole)}" + (" or lower --k" if self.k > 1 else ""))
                sub = faiss.IndexFlatL2(others.shape[1])
                sub.add(np.ascontiguousarray(others))
                d_rows, _ = search(sub, queries[rows], self.k)
                scores[rows] = d_rows.mean(1)
        # a turned copy's pure fill takes the scores of what it repeats, as in scoring
        grids = batch.image_grids(batch.spread(scores, None))
        if support <= 0:
            return grids, []
        supported = self._supported(queries, dist, near, owner, source, support, allowed)
        return grids, batch.image_grids(batch.spread(supported, None))

    def left_out_search(self, n_images: int, own: bool = False) -> Any:
        """The search for the leave-one-out shortlists of ``n_images`` training images: exact while that costs
        little (images x bank rows up to :data:`LEFT_OUT_EXACT_WORK`), so an approximate scoring index leaves the
        threshold where the exact search puts it; on a large fit, where the exact search of every training patch
        would cost more than the rest of the fit, an inverted-file index over the bank (the scoring one, if it is
        one). Its distances can only over-estimate, so the threshold it sets errs towards fewer false alarms.
        ``own``: over the images' own rows only (:meth:`own_search`)."""
        exact = isinstance(self.index_, faiss.IndexFlat)
        scoring = self.own_search() if own else self._search  # the search scoring runs for these images
        ids = np.flatnonzero(~self.copies_) if scoring is not self._search else None  # type: ignore[operator]

        def built(kind: str) -> Any:
            """An index of ``kind`` over the rows searched, answering in the bank's row numbers."""
            index = build_index(self.bank() if ids is None else self.bank()[ids], kind, nprobe=LEFT_OUT_NPROBE,
                                seed=self.seed)
            placed = to_search_device(index, *self._placement) if kind == "flat" else index
            return complete(placed) if ids is None else SubsetSearch(placed, ids)

        if n_images * (self.bank_size if ids is None else len(ids)) <= LEFT_OUT_EXACT_WORK:
            return scoring if exact else built("flat")  # the exact search scoring would use, where it runs
        return built("ivf") if exact else scoring

    def _supported(self, queries: np.ndarray, dist: np.ndarray, near: np.ndarray, owner: np.ndarray,
                   source: np.ndarray, support: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Each query's distance to the nearest row of its ``support + 1``-th nearest training image other than
        its ``owner``, read off its shortlist (``dist`` and the ``near`` images of its rows, nearest first); the
        rare query whose shortlist holds too few other images is measured exactly against the whole bank (its
        ``allowed`` rows)."""
        n, kk = dist.shape
        seen = np.full((n, support), -1, dtype=np.int64)  # the other images met so far along each shortlist
        count = np.zeros(n, dtype=np.int64)
        out = np.full(n, np.nan, dtype=np.float32)
        for c in range(kk):
            img = near[:, c]
            new = np.isnan(out) & (img != owner) & ~(seen == img[:, None]).any(1)
            last = new & (count == support)
            out[last] = dist[last, c]
            rows = np.flatnonzero(new & (count < support))
            seen[rows, count[rows]] = img[rows]
            count[rows] += 1
        short = np.flatnonzero(np.isnan(out))
        if len(short):
            bank = self.bank()
            if allowed is not None:
                bank, source = bank[allowed], source[allowed]
            # an image may have no row in the bank (a --coreset-max cap reached before it): count it all the same
            n_images = int(max(source.max(), owner.max())) + 1
            for r in short:
                nearest = np.full(n_images, np.inf)
                np.minimum.at(nearest, source, np.sqrt(((bank - queries[r]) ** 2).sum(1)))
                nearest[owner[r]] = np.inf
                ranked = np.sort(nearest[np.isfinite(nearest)])  # images with rows in the bank, its own aside
                out[r] = ranked[min(support, len(ranked) - 1)]
        return out

    # ------------------------------------------------------------------ persistence
    def files(self) -> dict[str, bytes]:
        assert self.index_ is not None and self.selected_ is not None
        arrays = {"selected_indices": self.selected_}
        if self.provenance_ is not None:
            arrays["bank_sources"] = self.provenance_
        if self.copies_ is not None:
            arrays["bank_copies"] = self.copies_
        if self.groups_ is not None:
            arrays["image_groups"] = self.groups_
        return {INDEX_FILE: serialize(self.index_), ARRAYS_FILE: arrays_to_bytes(arrays)}

    def load_files(self, files: dict[str, bytes], full_dim: int, bank_size: int) -> None:
        """Restore the bank from its files, checking them against what the manifest says."""
        for name in (INDEX_FILE, ARRAYS_FILE):
            if name not in files:
                raise ModelFormatError(f"the model lists no {name}")
        arrays = bytes_to_arrays(files[ARRAYS_FILE], ARRAYS_FILE)
        if "selected_indices" not in arrays:
            raise ModelFormatError("arrays.npz lacks selected_indices")
        index = deserialize(files[INDEX_FILE])
        raw = arrays["selected_indices"]
        # a float index was truncated and a repeated one read one feature twice, against a bank fitted on distinct
        # ones: every part flagged (a good part at 80 normalized)
        if raw.dtype.kind not in "iu" or len(np.unique(raw)) != raw.size:
            raise ModelFormatError(f"arrays.npz: selected_indices are {raw.dtype} and {raw.size - len(np.unique(raw))} "
                                   "repeated, where a fit stores distinct integers")
        sel = raw.astype(np.int64)
        if sel.ndim != 1 or index.d != len(sel) or (len(sel) and (sel.min() < 0 or sel.max() >= full_dim)):
            raise ModelFormatError(f"index dimension {index.d} does not match {len(sel)} selected features of "
                                   f"{full_dim}")
        if index.ntotal != bank_size:
            raise ModelFormatError(f"index holds {index.ntotal} patches, manifest says {bank_size}")
        sources = arrays.get("bank_sources")
        if sources is not None and (sources.ndim != 2 or sources.shape != (index.ntotal, 3)):
            raise ModelFormatError(f"bank_sources has shape {sources.shape}, expected ({index.ntotal}, 3)")
        copies = arrays.get("bank_copies")  # models saved before copies were told apart search every row
        if copies is not None and (copies.dtype != np.bool_ or copies.shape != (index.ntotal,)):
            raise ModelFormatError(f"bank_copies has shape {copies.shape} of {copies.dtype}, expected "
                                   f"({index.ntotal},) of bool")
        groups = arrays.get("image_groups")  # models fitted without part_id leave each image out alone
        if groups is not None and (groups.ndim != 1 or groups.dtype.kind not in "iu" or
                                   (len(groups) and (groups.min() < 0 or groups.max() >= len(groups)))):
            raise ModelFormatError(f"image_groups has shape {groups.shape} of {groups.dtype}, expected one group "
                                   "number (from 0, below the images' count) per training image")
        set_nprobe(index, self.nprobe)
        self.index_, self.selected_ = index, sel
        self.groups_ = None if groups is None else groups.astype(np.int32)
        self.provenance_ = None if sources is None else sources.astype(np.int32)
        self.copies_, self._own = copies, None

    def describe(self) -> dict[str, Any]:
        """The manifest's selection, coreset, index and scoring sections."""
        assert self.index_ is not None and self.selected_ is not None
        st = self.stats_
        return {
            "selection": {**(self.selector.describe() if self.selector else {}), "n_selected": int(len(self.selected_)),
                          "of": st["full_dim"]},
            "coreset": {**self.sampler.describe(), "size": int(self.index_.ntotal), "from_patches": st["from_patches"],
                        "seconds": round(st["coreset_seconds"], 2), "coverage_radius": st["coverage_radius"],
                        "chunks": st.get("chunks", 1)},
            "index": {"kind": self.index_used_ or self.index_kind, "requested": self.index_kind,
                      "dim": int(self.index_.d), "ntotal": int(self.index_.ntotal)},
            "scoring": {"k": self.k, "image_score": self.image_score, "sigma": self.sigma},
        }
