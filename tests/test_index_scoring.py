import faiss
import numpy as np
import pytest

from anomaly_service.calibration import calibrate
from anomaly_service.errors import ConfigError, ModelFormatError
from anomaly_service.index import (BlockedFlatSearch, CompleteSearch, ProbedIvf, SubsetSearch, build_index, complete,
                                   describe_index, describe_search, deserialize, search, serialize, set_nprobe,
                                   subset_index, to_search_device)
from anomaly_service.scoring import image_score, patch_scores


def _data(n=2000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(50, d)).astype(np.float32)


def test_flat_is_exact_and_roundtrips():
    bank, q = _data()
    index = build_index(bank)
    dist, ids = search(index, q, 3)
    brute = np.linalg.norm(q[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(ids[:, 0], brute.argmin(1))
    np.testing.assert_allclose(dist[:, 0], brute.min(1), rtol=1e-4)
    again = deserialize(serialize(index))
    np.testing.assert_array_equal(search(again, q, 3)[1], ids)
    with pytest.raises(ModelFormatError):
        deserialize(b"\x00" * 64)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_approximate_indexes_find_near_neighbours(kind):
    rng = np.random.default_rng(0)  # clustered like real patch features, not isotropic noise
    centres = rng.normal(0, 4, (40, 32))
    bank = (centres[rng.integers(0, 40, 8000)] + rng.normal(size=(8000, 32))).astype(np.float32)
    q = (centres[rng.integers(0, 40, 50)] + rng.normal(size=(50, 32))).astype(np.float32)
    index = build_index(bank, kind, nprobe=16)
    _, ids = search(index, q, 1)
    exact = np.linalg.norm(q[:, None] - bank[None], axis=2).argmin(1)
    recall = (ids[:, 0] == exact).mean()
    assert recall >= (0.8 if kind == "ivf" else 0.3)
    assert index.reconstruct(0).shape == (32,)  # a bank patch can be read back by its id


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_search_over_some_rows_answers_in_the_whole_banks_row_numbers(kind):
    """An aligned model searches a photo left as it came against its images' own rows (knn_scorer.py): the subset
    index is the whole one's kind refilled with those rows (an inverted file keeps its trained lists), and its ids
    name rows of the whole bank, never one outside the subset."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 4, (30, 32))
    bank = (centres[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 32))).astype(np.float32)
    q = (centres[rng.integers(0, 30, 80)] + rng.normal(size=(80, 32))).astype(np.float32)
    rows = np.flatnonzero(rng.random(len(bank)) < 0.5)
    index = build_index(bank, kind, nprobe=16)
    sub = subset_index(index, bank, rows)
    assert type(sub) is type(index) and sub.ntotal == len(rows)
    assert describe_index(sub) == describe_index(index)  # same lists, same nprobe
    found = SubsetSearch(to_search_device(sub, False, "fp32"), rows)
    dist, ids = search(found, q, 3)
    assert np.isin(ids, rows).all()
    np.testing.assert_allclose(dist, np.linalg.norm(q[:, None] - bank[ids], axis=2), rtol=1e-4)  # exact re-rank
    exact = rows[np.linalg.norm(q[:, None] - bank[rows][None], axis=2).argmin(1)]
    assert (ids[:, 0] == exact).mean() >= (1.0 if kind == "flat" else 0.9)
    assert describe_search(found) == describe_search(to_search_device(sub, False, "fp32"))


def _storages(search) -> dict[str, tuple[int, int]]:
    """Each tensor a search holds: where its storage starts and how many bytes it has."""
    import torch

    return {name: (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for name, t in vars(search).items()
            if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("layout", ["run", "spread"])
@pytest.mark.parametrize("n_bank", [3003, 300])  # folded into slabs (a view's width is no multiple of them); unfolded
def test_a_search_over_some_rows_reads_the_whole_searchs_bank_and_answers_as_a_copy_does(kind, layout, n_bank):
    """The exact torch search over an aligned model's own rows (a GPU without GPU FAISS runs it on the device) held
    a second copy of the bank beside the whole search's. It now reads the whole search's product matrix: a slice
    where the rows are one run (a fit's own rows come first), the slice from the first to the last with the rows
    between masked where they are spread (an update appends rows of both kinds; a GPU's choice, forced here on the
    CPU device). Its answers are those of a search built over the rows alone, many queries and few, and no tensor
    it holds has a row of the bank of its own."""
    rng = np.random.default_rng(n_bank)
    bank = (rng.standard_normal((n_bank, 40)) + 5.0).astype(np.float32)
    queries = (rng.standard_normal((700, 40)) + 5.0).astype(np.float32)  # several blocks, the last one partial
    rows = (np.arange(2 * n_bank // 3) if layout == "run"
            else np.flatnonzero(rng.random(n_bank) < 0.6))
    index = build_index(bank, kind, nlist=4 if kind == "ivf" else None)
    whole = BlockedFlatSearch(index, precision="fp32", device="cpu")
    shared = whole.over_rows(rows, plan="view" if layout == "run" else "masked")
    alone = BlockedFlatSearch(subset_index(index, bank, rows), precision="fp32", device="cpu")  # what a copy answers
    for q in (queries, queries[:5]):  # the few-query path searches a CPU index of the rows
        for k in (1, 3):
            d_ref, i_ref = alone.search(q, k)
            d, i = shared.search(q, k)
            np.testing.assert_array_equal(i, i_ref)
            np.testing.assert_array_equal(d, d_ref)
    found = SubsetSearch(shared, rows)  # as the scorer uses it: in the whole bank's row numbers
    np.testing.assert_array_equal(found.search(queries, 3)[1], rows[alone.search(queries, 3)[1]])
    mine, theirs = _storages(shared), _storages(whole)
    assert mine["bank_mm"][0] == theirs["bank_mm"][0]  # the same matrix, not a copy
    span = int(rows[-1] - rows[0]) + 1
    for name, (start, nbytes) in mine.items():  # the mask and the row numbers: one value per row, no feature
        assert (start, nbytes) in theirs.values() or nbytes <= 8 * span, name
    if layout == "run":
        assert shared.mask is None and shared.local is None
    if kind == "flat":  # the few-query path reads the whole index through a selector: no CPU copy of the rows
        assert shared.index.parent is index


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_blocked_search_keeps_the_rows_beside_its_product_only_for_the_bf16_re_rank(precision):
    """The fp32 search ranks on its product matrix's distances: the rows themselves, kept beside it, were a second
    copy of the bank in the device's memory that nothing read. bf16 re-ranks its shortlist on them."""
    bank = np.random.default_rng(0).standard_normal((1000, 40)).astype(np.float32)
    index = build_index(bank)
    fast = BlockedFlatSearch(index, precision=precision, device="cpu")
    held = set(_storages(fast).values())
    product = _storages(fast)["bank_mm"]
    assert (fast.bank is None) == (precision == "fp32")
    if precision == "fp32":
        assert held == {product}  # the bank once, in the product matrix
    queries = np.random.default_rng(1).standard_normal((300, 40)).astype(np.float32)
    np.testing.assert_array_equal(fast.search(queries, 2)[1], index.search(queries, 2)[1])


def test_which_searches_share_the_bank_of_the_whole_search():
    """A run of rows is always a slice of the bank's product; rows spread apart are a masked slice on a GPU (a copy
    costs device memory, a larger product little) and a copy on the CPU (the compacted product is cheaper); a bf16
    bank, centred on its own rows' mean, is always a copy (another mean moves the distances' last bits)."""
    from anomaly_service.index import own_rows_plan

    assert own_rows_plan("fp32", "cuda", contiguous=True) == "view"
    assert own_rows_plan("fp32", "cpu", contiguous=True) == "view"
    assert own_rows_plan("fp32", "cuda", contiguous=False) == "masked"
    assert own_rows_plan("fp32", "cpu", contiguous=False) == "copy"
    assert own_rows_plan("bf16", "cpu", contiguous=True) == "copy"
    bank = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    index = build_index(bank)
    whole = BlockedFlatSearch(index, precision="fp32", device="cpu")
    assert whole.over_rows(np.arange(0, 1000, 2)) is None  # spread, on the CPU
    assert whole.over_rows(np.arange(200, 700)).rows[0] == 200
    assert whole.over_rows(np.arange(200, 700)).over_rows(np.arange(10)) is None  # rows of rows: built anew
    assert BlockedFlatSearch(index, precision="bf16").over_rows(np.arange(500)) is None


@pytest.mark.parametrize("spread", [False, True])
def test_an_aligned_scorers_own_row_search_reads_the_scoring_searchs_bank(spread):
    """KnnScorer.own_search: where scoring runs the blocked exact search, the own rows are searched through its
    bank (a fit's own rows come first: one run); rows spread apart on the CPU get a search of their own, as before.
    Either way the answers are those of a search built over the own rows alone."""
    import torch

    from anomaly_service.coreset import GreedyCoresetSampler
    from anomaly_service.knn_scorer import KnnScorer

    rng = np.random.default_rng(7)
    bank = rng.standard_normal((2000, 48)).astype(np.float32)
    knn = KnnScorer(selector=None, sampler=GreedyCoresetSampler(0.1), k=3)
    knn.index_, knn.selected_ = build_index(bank), np.arange(48)
    knn.copies_ = rng.random(2000) < 0.5 if spread else np.arange(2000) >= 1200
    knn.place(torch.device("cpu"), "fp32")
    own = knn.own_search()
    ids = np.flatnonzero(~knn.copies_)
    alone = SubsetSearch(to_search_device(subset_index(knn.index_, bank, ids), False, "fp32"), ids)
    queries = rng.standard_normal((500, 48)).astype(np.float32)
    for q in (queries, queries[:7]):
        d_ref, i_ref = alone.search(q, 3)
        d, i = own.search(q, 3)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_array_equal(d, d_ref)
    same = _storages(own.inner)["bank_mm"][0] == _storages(knn._search)["bank_mm"][0]
    assert same is not spread


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_search_over_some_rows_finds_k_of_them_where_its_probed_lists_hold_none(kind):
    """The subset keeps the lists the whole bank trained: where the bank's other rows (an aligned model's turned
    copies) sit apart, some lists hold none of the subset's rows. A query whose few probed lists are all such
    still gets its ``k`` nearest subset rows, never a missing one (id -1 at the largest float: a patch scored
    ~1e19, its evidence the bank's last row)."""
    rng = np.random.default_rng(4)
    own = (rng.normal(0, 4, (15, 32))[rng.integers(0, 15, 3000)] + rng.normal(size=(3000, 32)))
    apart = (rng.normal(0, 4, (15, 32)) + 40)[rng.integers(0, 15, 3000)] + rng.normal(size=(3000, 32))
    bank = np.concatenate([own, apart]).astype(np.float32)
    rows = np.arange(3000)
    index = build_index(bank, kind, nprobe=1)
    found = SubsetSearch(subset_index(index, bank, rows), rows)
    q = np.ascontiguousarray(bank[3000:3200] + 0.1)  # nearest the lists only the other rows filled
    dist, ids = found.search(q, 3)
    assert (ids >= 0).all() and np.isin(ids, rows).all()
    exact = np.sort(((q[:, None] - bank[rows][None]) ** 2).sum(-1), axis=1)[:, :3]
    np.testing.assert_allclose(dist, exact, rtol=1e-3 if kind == "ivf" else 0.3)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_an_inverted_file_whose_probed_lists_hold_fewer_than_k_rows_answers_every_query_in_full(kind):
    """With a small ``--nprobe`` over small lists a query's probed lists can hold fewer rows than the ``k`` a patch
    averages: FAISS pads with id -1 at the largest float, which scored a good patch ~1e18. The scoring search
    answers such a query exactly; an exact search needs no such care and is left as it is."""
    rng = np.random.default_rng(5)
    bank = (rng.normal(0, 4, (40, 16))[rng.integers(0, 40, 1200)] + rng.normal(size=(1200, 16))).astype(np.float32)
    index = build_index(bank, kind, nprobe=1)
    q = np.ascontiguousarray(bank[:300] + 0.05)
    _, raw_ids = index.search(q, 40)
    assert (raw_ids < 0).any()  # the raw inverted file leaves some queries short
    dist, ids = search(complete(index), q, 40)
    assert (ids >= 0).all() and np.isfinite(dist).all() and dist.max() < 1e3
    short = (raw_ids < 0).any(axis=1)
    exact = np.sqrt(np.sort(((q[short][:, None] - bank[None]) ** 2).sum(-1), axis=1)[:, :40])
    np.testing.assert_allclose(dist[short], exact, rtol=1e-3 if kind == "ivf" else 0.3)
    assert isinstance(complete(index), CompleteSearch) and describe_search(complete(index)) == describe_search(index)
    flat = to_search_device(build_index(bank), False, "fp32")
    assert complete(flat) is flat


def _graph_ivf(bank):
    """An inverted file whose lists an HNSW graph finds and whose rows no re-rank keeps, one list probed."""
    index = faiss.IndexIVFFlat(faiss.IndexHNSWFlat(bank.shape[1], 8), bank.shape[1], 30)
    index.train(bank)
    index.add(bank)
    index.nprobe = 1
    return index


def _short_queries(kind):
    """An inverted file (nprobe 1) some of whose queries' probed lists hold fewer than 40 rows, and those queries."""
    rng = np.random.default_rng(5)
    bank = (rng.normal(0, 4, (40, 16))[rng.integers(0, 40, 1200)] + rng.normal(size=(1200, 16))).astype(np.float32)
    index = build_index(bank, kind, nprobe=1) if isinstance(kind, str) else kind(bank)
    q = np.ascontiguousarray(bank[:300] + 0.05)
    return index, q[(index.search(q, 40)[1] < 0).any(axis=1)]


def _count_flat_builds(monkeypatch):
    """Counts the flat indexes built from here on, each slowly, so threads that race to build one all do."""
    import time

    built, flat = [], faiss.IndexFlatL2

    def slow_flat(d):
        built.append(d)
        time.sleep(0.2)
        return flat(d)

    monkeypatch.setattr(faiss, "IndexFlatL2", slow_flat)
    return built


def _concurrently(found, q, n=4):
    """``n`` threads' first searches of ``found`` at once, as the service's scoring threads send them."""
    import threading

    start, out = threading.Barrier(n), [None] * n

    def run(i):
        start.wait()
        out[i] = found.search(q, 40)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_short_queries_are_answered_exactly_without_a_copy_of_the_bank(kind, monkeypatch):
    """The exact answer to a short query reads the rows the index already holds (ivf's re-rank keeps them in fp32;
    an inverted file probed in every list reads its own codes, so ivfpq's distances stay its own), never a flat
    copy: a copy, kept for good after the first short query, doubled ivf's memory and held ivfpq's bank decoded
    to fp32, and scoring threads meeting their first short query at once each built one."""
    index, q = _short_queries(kind)
    assert len(q)
    found = complete(index)
    built = _count_flat_builds(monkeypatch)
    answers = _concurrently(found, q)
    assert built == []
    rows = index.reconstruct_n(0, index.ntotal).astype(np.float64)
    exact = np.sort(((q[:, None] - rows[None]) ** 2).sum(-1), axis=1)[:, :40]
    for sq, ids in answers:
        assert (ids >= 0).all()
        if kind == "ivf":  # the fp32 rows' own distances, as the inverted file's re-rank takes them
            np.testing.assert_allclose(sq, exact, rtol=1e-5)
            np.testing.assert_allclose(sq, ((q[:, None] - rows[ids]) ** 2).sum(-1), rtol=1e-5)
        else:  # PQ's own answer over every list: its tables sum |q - c|^2 and products, rounded to float32 steps of
            # |q|^2 + |b|^2 however near the row (up to 1.6 of them under FAISS 1.8, 1.0 under 1.15)
            own = index.search(q, 40, params=faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(index).nlist))
            np.testing.assert_array_equal(sq, own[0])
            np.testing.assert_array_equal(ids, own[1])
            rounding = 4 * np.finfo(np.float32).eps * ((q ** 2).sum(-1)[:, None] + (rows[ids] ** 2).sum(-1))
            to_rows = ((q[:, None] - rows[ids]) ** 2).sum(-1)
            assert (np.abs(sq - to_rows) <= rounding).all()
            assert (np.abs(np.sort(to_rows, axis=1) - exact) <= 2 * rounding.max()).all()  # the nearest rows


def test_an_index_whose_rows_must_be_copied_copies_them_once_under_concurrent_searches(monkeypatch):
    """An inverted file whose lists a graph finds (no re-rank rows; probing every list would not reach them all)
    is answered from a flat copy of its rows: threads meeting their first short query at once build one, not
    one each."""
    index, q = _short_queries(_graph_ivf)
    assert len(q)
    found = complete(index)
    built = _count_flat_builds(monkeypatch)
    answers = _concurrently(found, q)
    assert len(built) == 1
    assert all((ids >= 0).all() for _, ids in answers)


def test_ivf_lists_are_fp16_but_its_distances_and_bank_are_exact():
    """``ivf`` scans fp16 lists (padded to the SIMD width: 38 dims here) and re-ranks in fp32: the distance it
    returns is the exact one to the row it found, the bank reads back exactly, and nprobe reaches the lists
    through the wrappers and survives a save."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 4, (30, 38))
    bank = (centres[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 38))).astype(np.float32)
    q = (centres[rng.integers(0, 30, 64)] + rng.normal(size=(64, 38))).astype(np.float32)
    index = build_index(bank, "ivf", nprobe=4)
    how = describe_index(index)
    assert faiss.extract_index_ivf(index).nprobe == 4 and "fp16 lists" in how and "exact re-rank" in how
    set_nprobe(index, 10_000)  # clamped to the lists there are
    assert faiss.extract_index_ivf(index).nprobe == faiss.extract_index_ivf(index).nlist
    d, ids = search(index, q, 3)
    np.testing.assert_allclose(d, np.linalg.norm(q[:, None] - bank[ids], axis=2), rtol=1e-5)
    np.testing.assert_array_equal(index.reconstruct_n(0, len(bank)), bank)
    exact = np.linalg.norm(q[:, None] - bank[None], axis=2).min(1)
    np.testing.assert_allclose(d[:, 0], exact, rtol=1e-5)  # every list probed: the exact nearest
    loaded = deserialize(serialize(index))
    assert faiss.extract_index_ivf(loaded).nprobe == faiss.extract_index_ivf(index).nprobe
    np.testing.assert_array_equal(search(loaded, q, 1)[1], ids[:, :1])


def test_ivf_finds_its_lists_by_a_flat_scan_when_few_and_by_a_graph_when_many():
    """A flat scan of a few hundred centroids is exact and cheaper than the graph; thousands need the graph."""
    from anomaly_service.index import QUANTIZER_GRAPH_LISTS, _ivf_fp16

    few, many = _ivf_fp16(38, 200), _ivf_fp16(38, QUANTIZER_GRAPH_LISTS + 1)  # kept: the IVFs live inside them
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(few).quantizer), faiss.IndexFlat)
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(many).quantizer), faiss.IndexHNSW)
    bank = np.random.default_rng(3).normal(size=(6000, 38)).astype(np.float32)
    assert "graph-found" not in describe_index(build_index(bank, "ivf"))


def test_models_saved_with_fp32_ivf_lists_still_search():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(4000, 24)).astype(np.float32)
    old = faiss.IndexIVFFlat(faiss.IndexFlatL2(24), 24, 40)
    old.train(bank)
    old.add(bank)
    loaded = deserialize(serialize(old))
    set_nprobe(loaded, 40)
    assert "fp32 lists" in describe_index(loaded)
    _, ids = search(loaded, bank[:20], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))


def test_patch_and_image_scores():
    bank, q = _data()
    index = build_index(bank)
    s1, nn = patch_scores(index, q, 1)
    s3, _ = patch_scores(index, q, 3)
    assert (s3 >= s1 - 1e-6).all()
    np.testing.assert_allclose(s1, np.linalg.norm(q - bank[nn], axis=1), rtol=1e-4)  # nn is the nearest patch
    amap = np.array([[0.5, 2.5], [1.0, 0.0]], np.float32)
    assert image_score(s1, amap, "max") == pytest.approx(s1.max())
    assert image_score(s1, amap, "map-max") == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="unknown image score"):
        image_score(s1, amap, "reweighted")


@pytest.mark.parametrize("k", [1, 3])
def test_many_queries_are_searched_in_blocks_with_the_answers_of_one_search(k, monkeypatch):
    """A large tiled photo's patches are searched a block at a time, so the search's working arrays stay the size of
    a block: each query keeps the score and nearest row one search of all gave, and no search sees more than a
    block (all at once, a ResNet-50 photo of 441 tiles took twice its features' memory again in the search)."""
    import anomaly_service.scoring as scoring

    rng = np.random.default_rng(5)
    bank = rng.normal(size=(300, 24)).astype(np.float32)
    q = rng.normal(size=(1000, 24)).astype(np.float32)
    index = build_index(bank)
    whole = patch_scores(index, q, k)
    seen: list[int] = []
    real = scoring.search
    monkeypatch.setattr(scoring, "search", lambda i, x, kk: (seen.append(len(x)), real(i, x, kk))[1])
    monkeypatch.setattr(scoring, "SEARCH_BLOCK", 384)
    blocked = patch_scores(index, q, k)
    assert seen == [384, 384, 232]
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(blocked[1], whole[1])
    assert blocked[0].dtype == whole[0].dtype and blocked[1].dtype == whole[1].dtype


def test_calibration_threshold_above_every_holdout_and_normalized_to_one():
    scores = np.array([1.0, 1.2, 1.1, 3.0])
    cal = calibrate(scores, np.array([0.2, 0.3, 0.4]), z=0.5)
    assert cal.threshold >= 3.0 and cal.normalize(cal.threshold) == pytest.approx(1.0)
    assert cal.normalize(cal.floor) == pytest.approx(0.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n_bank", [3003, 300])  # folded into 8 slabs with 5 padded columns; too small to fold
def test_blocked_flat_search_matches_faiss(k, precision, n_bank):
    from anomaly_service.index import BlockedFlatSearch, to_search_device

    rng = np.random.default_rng(k)
    # an offset far from the origin, as real features have: the bf16 path must centre the bank to stay exact
    bank = (rng.standard_normal((n_bank, 40)) + 5.0).astype(np.float32)
    queries = (rng.standard_normal((700, 40)) + 5.0).astype(np.float32)  # several blocks, the last one partial
    index = faiss.IndexFlatL2(40)
    index.add(bank)
    fast = to_search_device(index, use_gpu=False, precision=precision)
    assert isinstance(fast, BlockedFlatSearch) and fast.precision == precision
    assert fast.slabs == (8 if n_bank > 512 else 1)
    d_ref, i_ref = index.search(queries, k)
    d, i = fast.search(queries, k)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-3)
    d_few, i_few = fast.search(queries[:5], k)  # few queries take the product too
    np.testing.assert_array_equal(i_few, i_ref[:5])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_blocked_flat_search_with_more_neighbours_than_a_slab_holds(precision):
    """A large k (or leave-one-out's shortlist on top of it) asks for more candidates than one folded slab has:
    the search falls back to the whole row instead of failing inside topk."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((600, 16)).astype(np.float32)  # 8 slabs of 75 columns
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(bank)
    fast = BlockedFlatSearch(index, precision=precision)
    assert fast.slabs == 8
    d_ref, i_ref = index.search(queries, 90)
    d, i = fast.search(queries, 90)
    np.testing.assert_array_equal(i[:, :5], i_ref[:, :5])
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-3)


def test_knn_precision_selection():
    """auto picks bf16 only where the CPU multiplies bf16 natively; wide fp32 banks stay with FAISS's BLAS path."""
    from anomaly_service.errors import ConfigError
    from anomaly_service.index import (BlockedFlatSearch, RankedFlat, cpu_has_native_bf16, resolve_precision,
                                       to_search_device)

    sapphire = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16\n"
    skylake = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert cpu_has_native_bf16(sapphire) and cpu_has_native_bf16(graviton3)
    assert not cpu_has_native_bf16(skylake) and not cpu_has_native_bf16("")
    assert resolve_precision("auto", sapphire) == "bf16"
    assert resolve_precision("auto", skylake) == "fp32"
    assert resolve_precision("fp32", sapphire) == "fp32"
    with pytest.raises(ConfigError, match="knn precision"):
        resolve_precision("fp16")
    wide = faiss.IndexFlatL2(512)
    wide.add(np.random.default_rng(0).standard_normal((100, 512)).astype(np.float32))
    ranked = to_search_device(wide, use_gpu=False, precision="fp32")  # FAISS's search, ranked in fp32 by row
    assert isinstance(ranked, RankedFlat) and ranked.index is wide
    assert isinstance(to_search_device(wide, use_gpu=False, precision="bf16"), BlockedFlatSearch)
    ivf = build_index(np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32), "ivf", nlist=4)
    # an inverted file whose centroids are scanned finds its lists by a product, and scans them with FAISS
    probed = to_search_device(ivf, use_gpu=False, precision="bf16")
    assert isinstance(probed, ProbedIvf) and probed.index is ivf


def test_search_plan_on_gpu_machines():
    """With a GPU: GPU FAISS when installed, else exact torch search on the device for flat banks; ivf (whose
    re-rank wrapper GPU FAISS cannot hold, but which keeps the fp32 rows) searches exactly on the device, and the
    older fp32-list IVF falls back to FAISS on the CPU without GPU FAISS. Decided by a pure function, so it is
    tested here without a GPU."""
    from anomaly_service.index import BlockedFlatSearch, search_plan

    flat = faiss.IndexFlatL2(76)
    flat.add(np.random.default_rng(0).standard_normal((1000, 76)).astype(np.float32))
    ivf = build_index(np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32), "ivf", nlist=4)
    amd = "flags\t: avx2 avx512_bf16\n"
    assert search_plan(flat, use_gpu=True, gpu_faiss=True) == "faiss-gpu"
    assert search_plan(flat, use_gpu=True, gpu_faiss=False) == "torch-gpu"
    assert search_plan(ivf, use_gpu=True, gpu_faiss=True) == "torch-gpu"
    assert search_plan(ivf, use_gpu=True, gpu_faiss=False) == "torch-gpu"
    assert search_plan(ivf, use_gpu=False) == "faiss-cpu"
    old_ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 4)
    old_ivf.train(np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32))
    assert search_plan(old_ivf, use_gpu=True, gpu_faiss=True) == "faiss-gpu"
    assert search_plan(old_ivf, use_gpu=True, gpu_faiss=False) == "faiss-cpu"
    # what torch-gpu runs for ivf: the exact search over its fp32 rows
    rows = np.random.default_rng(2).standard_normal((400, 16)).astype(np.float32)
    q16 = np.random.default_rng(3).standard_normal((100, 16)).astype(np.float32)
    _, i = BlockedFlatSearch(build_index(rows, "ivf", nlist=4), precision="fp32", device="cpu").search(q16, 1)
    np.testing.assert_array_equal(i[:, 0], np.linalg.norm(q16[:, None] - rows[None], axis=2).argmin(1))
    assert search_plan(flat, use_gpu=False, precision="auto", cpuinfo=amd) == "blocked-bf16"
    assert search_plan(flat, use_gpu=False, precision="fp32") == "blocked-fp32"
    # the torch search is device-agnostic: on the CPU device it gives FAISS's neighbours
    queries = np.random.default_rng(1).standard_normal((300, 76)).astype(np.float32)
    d, i = BlockedFlatSearch(flat, precision="fp32", device="cpu").search(queries, 2)
    d_ref, i_ref = flat.search(queries, 2)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-3)


def test_describe_search_names_what_runs():
    from anomaly_service.index import describe_search

    bank = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    flat = build_index(bank)
    assert describe_search(None) is None
    assert describe_search(flat) == "faiss IndexFlatL2"
    assert describe_search(BlockedFlatSearch(flat, precision="fp32")) == "exact, fp32"
    assert describe_search(BlockedFlatSearch(flat, precision="bf16")).startswith("exact, bf16 shortlist")


def _old_ivf(bank: np.ndarray, nlist: int) -> faiss.Index:
    """The ivf structure models saved before fp16 lists carry: fp32 lists, centroids scanned, no re-rank."""
    old = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], nlist)
    old.train(bank)
    old.add(bank)
    return old


@pytest.mark.parametrize("structure", ["ivf", "ivf, lanes exact", "fp32 lists"])
@pytest.mark.parametrize("k", [1, 3])
def test_an_inverted_file_finds_its_lists_by_a_product_with_the_same_answers_as_faiss(structure, k):
    """ProbedIvf finds each query's lists with one product and a folded top-k instead of FAISS's per-query heap;
    the lists, their scan and the exact re-rank are FAISS's, so every distance and id is the index's own."""
    rng = np.random.default_rng(11)
    d = 32 if structure == "ivf, lanes exact" else 21  # 21: ivf pads its fp16 lists with zero columns
    centres = rng.normal(size=(40, d)).astype(np.float32) * 4
    bank = (centres[rng.integers(0, 40, 6000)] + rng.normal(size=(6000, d))).astype(np.float32)
    index = _old_ivf(bank, 60) if structure == "fp32 lists" else build_index(bank, "ivf", nprobe=8)
    set_nprobe(index, 8)
    probed = to_search_device(index, use_gpu=False, precision="fp32")
    assert isinstance(probed, ProbedIvf)
    queries = (centres[rng.integers(0, 40, 700)] + rng.normal(size=(700, d))).astype(np.float32)
    for q in (queries, queries[:20]):  # many queries and few: both take the product (tests/test_same_answer.py)
        sq, ids = probed.search(q, k)
        want_sq, want_ids = index.search(q, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(sq, want_sq)
    assert describe_search(complete(probed, index)).endswith("lists found by a product with the centroids")


def test_indexes_whose_lists_a_product_cannot_find_keep_faiss_s_search():
    """PQ codes (whose scan reads the coarse distances), centroids found by a graph, and exact banks keep the search
    they had."""
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    pq = build_index(bank, "ivfpq", nlist=20)
    assert to_search_device(pq, use_gpu=False, precision="fp32") is pq
    graph = faiss.IndexIVFFlat(faiss.IndexHNSWFlat(16, 8), 16, 20)
    graph.train(bank)
    graph.add(bank)
    assert ProbedIvf.of(graph) is None and ProbedIvf.of(build_index(bank)) is None


def test_an_aligned_models_own_rows_of_an_inverted_file_answer_as_faiss_does():
    """The own-row search an aligned model runs on photos left as they came is a clone of the bank's inverted file
    over those rows: its lists are found by a product too, with FAISS's answers in the whole bank's numbers."""
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(6000, 24)).astype(np.float32)
    index = build_index(bank, "ivf", nprobe=8)
    rows = np.flatnonzero(rng.random(6000) < 0.5)
    sub = subset_index(index, bank, rows)
    found = SubsetSearch(to_search_device(sub, False, "fp32"), rows)
    assert isinstance(found.inner, ProbedIvf)
    queries = rng.normal(size=(300, 24)).astype(np.float32)
    sq, ids = found.search(queries, 1)
    want_sq, want_ids = sub.search(queries, 1)
    np.testing.assert_array_equal(ids[:, 0], rows[want_ids[:, 0]])
    np.testing.assert_array_equal(sq, want_sq)


def test_a_refined_inverted_file_keeps_faiss_s_order_of_equally_far_rows_and_its_missing_results():
    """IndexRefineFlat keeps the k nearest candidates in FAISS's heap: rows exactly as far apart come out by id, and
    a result the lists do not hold is -1 at FLT_MAX. A stable sort of the candidates kept their list order instead,
    and the infinity the re-rank writes for a missing one."""
    rng = np.random.default_rng(5)
    d = 16
    tied = np.zeros((40, d), np.float32)  # each 25 from the origin, exactly
    for row in tied:
        i, j = rng.choice(d, 2, replace=False)
        row[i], row[j] = 3 * rng.choice([-1, 1]), 4 * rng.choice([-1, 1])
    bank = np.concatenate([rng.normal(size=(2000, d)).astype(np.float32) * 3 + 0.37, tied])
    index = build_index(bank, "ivf", nlist=8, nprobe=8)
    probed = to_search_device(index, use_gpu=False, precision="fp32")
    origin = np.zeros((64, d), np.float32)
    for k in (2, 3):
        sq, ids = probed.search(origin, k)
        want_sq, want_ids = index.search(origin, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(sq, want_sq)
    set_nprobe(index, 1)  # one list holds fewer rows than asked
    queries = rng.normal(size=(100, d)).astype(np.float32) * 3
    sq, ids = probed.search(queries, 400)
    want_sq, want_ids = index.search(queries, 400)
    assert (want_ids < 0).any()
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(sq, want_sq)


def test_an_inverted_file_probed_past_its_lists_answers_as_faiss_does():
    """FAISS probes at most every list when nprobe is set past them; the lists found by a product were handed to
    FAISS's wrapper, which asserts an array as wide as nprobe (an AssertionError, not an answer)."""
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    for index in (build_index(bank, "ivf", nlist=12), _old_ivf(bank, 12)):
        ivf = faiss.extract_index_ivf(index)
        probed = to_search_device(index, use_gpu=False, precision="fp32")
        ivf.nprobe = ivf.nlist + 5  # set past the lists by hand (set_nprobe keeps it within them)
        queries = rng.normal(size=(100, 16)).astype(np.float32)
        sq, ids = probed.search(queries, 2)
        want_sq, want_ids = index.search(queries, 2)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(sq, want_sq)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_empty_bank_is_searched_as_faiss_answers_it(precision):
    """The distance block is sized by the bank's width: a bank with no rows divided by zero there."""
    empty = faiss.IndexFlatL2(8)
    queries = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    d, i = BlockedFlatSearch(empty, precision=precision).search(queries, 1)
    d_ref, i_ref = empty.search(queries, 1)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_banks_an_update_apart_share_the_product_shape_and_search_as_exactly(precision):
    """Every update makes the bank a few rows larger, and the CPU's GEMM library keeps what it builds for each shape of
    the product for the life of the process: a service that loaded version after version of an updated model grew by
    that with each (bf16 most). Banks a few rows apart now share one width, a bounded number per doubling of the
    bank, and the padding never ranks: the search answers as over the bank alone."""
    from anomaly_service.index import WIDTH_STEPS

    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(4100, 32)).astype(np.float32), rng.normal(size=(300, 32)).astype(np.float32)
    widths = set()
    for n in range(1000, 4100, 7):  # one update after another, each adding a few rows
        index = faiss.IndexFlatL2(32)
        index.add(bank[:n])
        fast = BlockedFlatSearch(index, precision=precision, device="cpu")
        widths.add(fast.bank_mm.shape[0])
        if n in (1001, 1029, 2050, 4098):  # just past a doubling or a width: the most padding
            assert fast.bank_mm.shape[0] > n
            sq, ids = fast.search(queries, 2)
            exact_sq, exact_ids = index.search(queries, 2)
            np.testing.assert_array_equal(ids, exact_ids)
            np.testing.assert_allclose(sq, exact_sq, rtol=1e-3, atol=1e-3)
    assert len(widths) <= 2 * WIDTH_STEPS + 2  # from 1000 to 4100 rows: two doublings and a bit


@pytest.mark.parametrize("kind", ["ivf", "graph"])
def test_a_short_querys_exact_answer_does_not_depend_on_the_queries_searched_with_it(kind):
    """A short query's exact answer (ivf's fp32 rows, or the flat copy of an index whose lists a graph finds) is each
    pair's own sum, the same alone as among others, and a row equal to the query is at 0: FAISS's flat search took
    twenty queries or more from a product, which up to FAISS 1.13 put such a row at a rounding error and moved the
    smallest distances by up to 0.4% with the company a query came in."""
    index, q = _short_queries("ivf" if kind == "ivf" else _graph_ivf)
    rows = index.reconstruct_n(0, index.ntotal)
    q[0] = rows[7]  # a query equal to a bank row (short too: its probed list holds that row's list only)
    found = complete(index)
    sq, ids = found.search(q, 40)
    assert (ids >= 0).all()
    alone = [found.search(q[i : i + 1], 40) for i in range(len(q))]
    np.testing.assert_array_equal(sq, np.concatenate([a[0] for a in alone]))
    np.testing.assert_array_equal(ids, np.concatenate([a[1] for a in alone]))
    assert sq[0, 0] == 0 and ids[0, 0] == 7
    np.testing.assert_allclose(sq, ((q[:, None].astype(np.float64) - rows[ids]) ** 2).sum(-1), rtol=1e-5)


def test_a_short_querys_nearest_rows_are_found_among_rows_nearly_as_far():
    """exact_nearest re-ranks a shortlist of 2k rows by each pair's own sum, but took the shortlist from FAISS's
    search of all its queries at once: from twenty queries up to FAISS 1.13 that is a product, whose rounding at
    these norms is larger than the gaps between a shell of rows nearly as far as the nearest, and the nearest fell
    off the shortlist (8.99968 returned where 8.99941 was nearest, alone 8.99941). In company or alone, the answer is
    the nearest rows."""
    from anomaly_service.index import exact_nearest

    rng = np.random.default_rng(1)
    d = 64
    center = (rng.standard_normal(d) * 30).astype(np.float32)
    q = center + rng.standard_normal(d).astype(np.float32)
    directions = rng.standard_normal((400, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    shell = (q + directions * (3.0 * (1 + rng.standard_normal(400) * 1e-5))[:, None]).astype(np.float32)
    rows = faiss.IndexFlatL2(d)
    rows.add(shell)
    company = np.concatenate([q[None], center + rng.standard_normal((40, d)) * 30]).astype(np.float32)
    nearest = np.sort(((shell.astype(np.float64) - q) ** 2).sum(-1))
    for k in (1, 3):
        alone, among = exact_nearest(rows, q[None], k), exact_nearest(rows, company, k)
        np.testing.assert_array_equal(alone[1][0], among[1][0])
        np.testing.assert_array_equal(alone[0][0], among[0][0])
        np.testing.assert_allclose(among[0][0], nearest[:k], rtol=1e-6)


def test_an_ivfpq_bank_reads_back_with_the_distance_table_faiss_makes_of_it(monkeypatch):
    """An ivfpq file holds no precomputed table; FAISS 1.15 made it on reading under the vector limit set to the
    file's size, and refused every honest ivfpq model whose table outgrew its file (a 60-image fit's). It is made
    after the checks, as FAISS makes it, so the read index searches as the built one; beyond its bound on the file
    it is not made, and the search stays FAISS's without it."""
    from anomaly_service import index as index_module

    rng = np.random.default_rng(4)
    bank = rng.normal(size=(3840, 64)).astype(np.float32)
    built = build_index(bank, "ivfpq", nprobe=4)
    data = serialize(built)
    kept = deserialize(data)
    read = faiss.downcast_index(kept)
    table = faiss.downcast_index(built).precomputed_table.size()
    assert table * 4 > len(data)  # the case refused before
    assert read.use_precomputed_table == 1 and read.precomputed_table.size() == table
    queries = bank[:64] + rng.normal(scale=0.1, size=(64, 64)).astype(np.float32)
    for got, want in zip(read.search(queries, 3), built.search(queries, 3)):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(index_module, "PQ_TABLE_PER_FILE_BYTE", 1)
    kept_bare = deserialize(data)
    bare = faiss.downcast_index(kept_bare)
    assert bare.precomputed_table.size() == 0
    np.testing.assert_array_equal(bare.search(queries, 3)[1][:, 0], built.search(queries, 3)[1][:, 0])


def _brute_knn(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's mean L2 distance to its ``k`` nearest bank rows and its nearest row, in float64 numpy."""
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order[:, :k], axis=1).mean(axis=1), order[:, 0]


@pytest.mark.parametrize("k, mode", [(1, "map-max"), (3, "max"), (2, "map-max")])
def test_the_knn_scorer_is_patchcores_nearest_neighbour_distance_and_maximum(k, mode):
    """The kNN scorer of a small bank against brute force: each patch's score is its mean L2 distance (not squared)
    to its k nearest bank rows (k=1: PatchCore's), its match the nearest row; the image score is the raw patch
    maximum (``max``, the paper's) or the smoothed map's (``map-max``); the map is the grid's at the photo's size;
    the pooled feature is the mean of the image's patches. Two photos of other sizes in one batch, each its own."""
    import torch

    from anomaly_service.anomaly_map import anomaly_map
    from anomaly_service.coreset import GreedyCoresetSampler
    from anomaly_service.embedder import Embedded
    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.timing import StageTimer

    rng = np.random.default_rng(11)
    bank = rng.standard_normal((300, 24)).astype(np.float32)
    knn = KnnScorer(selector=None, sampler=GreedyCoresetSampler(0.1), k=k, image_score=mode, sigma=4.0)
    knn.index_, knn.selected_ = build_index(bank), np.arange(24)
    knn.place(torch.device("cpu"), "fp32")
    features = rng.standard_normal((2, 6, 5, 24)).astype(np.float32)
    features[1, 2, 3] += 6.0  # one patch far from the bank
    shapes = [(50, 41, 3), (37, 64, 3)]
    results = knn.score(Embedded(torch.from_numpy(features), (48, 40), shapes), StageTimer())
    assert len(results) == 2
    for j, (score, amap) in enumerate(results):
        want, nearest = _brute_knn(bank, features[j].reshape(-1, 24), k)
        grid = want.reshape(6, 5)
        matches = results[j].matches
        np.testing.assert_allclose(matches.distance, grid, rtol=1e-5)
        np.testing.assert_array_equal(matches.nearest, nearest.reshape(6, 5))
        np.testing.assert_allclose(matches.pooled, features[j].reshape(-1, 24).mean(axis=0), rtol=1e-5, atol=1e-6)
        want_map = anomaly_map(grid.astype(np.float32), (48, 40), shapes[j][:2], 4.0)
        assert amap.shape == shapes[j][:2]
        np.testing.assert_allclose(amap, want_map, rtol=1e-4)
        assert score == pytest.approx(grid.max() if mode == "max" else want_map.max(), rel=1e-5)


@pytest.mark.parametrize("d", [24, 160])  # a narrow bank's blocked search, a wide one's FAISS shortlist re-ranked
def test_an_exact_search_ranks_every_query_by_its_fp32_distance_and_equally_far_rows_by_id(d):
    """Against brute force: squared fp32 distances summed as ``(q - b)^2`` and the nearest ids; rows that are copies
    of one another come back in row order, whatever the search's shortlist found first; more neighbours than rows,
    and no query at all, answer as FAISS does."""
    import torch

    from anomaly_service.index import RankedFlat, to_search_device

    rng = np.random.default_rng(12)
    bank = rng.standard_normal((400, d)).astype(np.float32)
    bank[[17, 40, 333]] = bank[5]  # four copies of one row
    queries = np.concatenate([rng.standard_normal((30, d)), bank[5:6] + 0.01]).astype(np.float32)
    search = to_search_device(build_index(bank), False, "fp32")
    assert isinstance(search, RankedFlat if d > 128 else BlockedFlatSearch)
    dist, ids = search.search(queries, 4)
    exact = ((torch.from_numpy(queries)[:, None] - torch.from_numpy(bank)[None]) ** 2).sum(-1)
    want = np.argsort(exact.numpy(), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(dist, np.take_along_axis(exact.numpy(), want, axis=1))
    assert ids[-1].tolist() == [5, 17, 40, 333]
    small = to_search_device(build_index(bank[:6]), False, "fp32")
    dist, ids = small.search(queries, 6)  # as many neighbours as rows: still ranked exactly
    np.testing.assert_array_equal(dist, np.take_along_axis(exact.numpy()[:, :6], ids, axis=1))
    past = small.search(queries[:2], 8)[1]
    assert past.shape == (2, 8) and (past[:, 6:] == -1).all()  # FAISS's answer past the rows
    assert small.search(queries[:0], 2)[0].shape == (0, 2)


def test_an_aligned_scorer_judges_a_photo_as_it_came_by_the_images_own_rows_and_a_turned_view_by_all():
    """An aligned model's batch: the photo left as it came is searched against the images' own rows only (not the
    turned copies'), a turned view against the whole bank; distances and matches against brute force on each, the
    matches in the whole bank's row numbers. A batch of one kind takes one search."""
    import torch

    from anomaly_service.coreset import GreedyCoresetSampler
    from anomaly_service.embedder import Embedded
    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.timing import StageTimer

    rng = np.random.default_rng(14)
    bank = rng.standard_normal((240, 16)).astype(np.float32)
    copies = rng.random(240) < 0.5
    knn = KnnScorer(selector=None, sampler=GreedyCoresetSampler(0.1), k=2, image_score="max")
    knn.index_, knn.selected_, knn.copies_ = build_index(bank), np.arange(16), copies
    knn.place(torch.device("cpu"), "fp32")
    features = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    own = np.flatnonzero(~copies)
    for turned in ([False, True], [True, False], [False, False], [True, True]):
        results = knn.score(Embedded(torch.from_numpy(features), (32, 24), [(32, 24, 3)] * 2, turned=turned),
                            StageTimer())
        assert len(results) == 2
        for j, is_turned in enumerate(turned):
            rows = np.arange(240) if is_turned else own
            want, nearest = _brute_knn(bank[rows], features[j].reshape(-1, 16), 2)
            np.testing.assert_allclose(results[j].matches.distance.ravel(), want, rtol=1e-5)
            np.testing.assert_array_equal(results[j].matches.nearest.ravel(), rows[nearest])


def test_a_matched_score_copied_or_pickled_keeps_its_matches():
    """A kNN score carries what its search found (the regions' closest good evidence, the part's map place): a
    copy or a pickle of it (a result sent to a worker process, a deep-copied result) keeps them, as a plain tuple
    would not."""
    import copy
    import pickle

    from anomaly_service.scorer import MatchedScore, PatchMatches

    matches = PatchMatches(nearest=np.arange(6).reshape(2, 3), distance=np.ones((2, 3), np.float32),
                           pooled=np.zeros(4, np.float32))
    raw = MatchedScore(1.5, np.full((4, 6), 0.5, np.float32), matches)
    for back in (pickle.loads(pickle.dumps(raw)), copy.deepcopy(raw), copy.copy(raw)):
        assert isinstance(back, MatchedScore) and back[0] == 1.5 and back[1].shape == (4, 6)
        assert np.array_equal(back.matches.nearest, matches.nearest)


@pytest.mark.parametrize("precision,decades", [("fp32", 4.0), ("bf16", 1.0)])
def test_bank_patches_of_very_different_magnitude_are_found_exactly_at_no_negative_distance(precision, decades):
    """FAISS computes a batch's L2 distances as |x|^2 + |y|^2 - 2<x, y>, which rounds below zero (a NaN through the
    square root) and can rank the wrong row first where rows differ much in magnitude (faiss#297). The exact search
    only shortlists by that product: each distance it returns is the query's own (q - b)^2. fp32 finds every query's
    nearest row with the bank's norms spread over four decades; the bf16 shortlist, whose product is coarser, over
    one (the shared categories' banks span about two to three times)."""
    rng = np.random.default_rng(0)
    bank = np.abs(rng.normal(size=(6000, 96))) * 10.0 ** rng.uniform(0, decades, 6000)[:, None]
    bank = bank.astype(np.float32)
    q = (bank[:600] * (1 + rng.normal(scale=0.05, size=(600, 96)))).astype(np.float32)
    sq, ids = to_search_device(build_index(bank), use_gpu=False, precision=precision).search(q, 1)
    q64, b64 = q.astype(np.float64), bank.astype(np.float64)
    exact = (q64 ** 2).sum(1)[:, None] + (b64 ** 2).sum(1)[None] - 2 * q64 @ b64.T  # float64: no cancellation here
    assert (sq >= 0).all() and np.isfinite(sq).all()
    np.testing.assert_array_equal(ids[:, 0], exact.argmin(1))
    np.testing.assert_allclose(np.sqrt(sq[:, 0]), np.sqrt(exact.min(1)), rtol=1e-4)
