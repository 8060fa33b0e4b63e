"""The same photo gets the same answer: alone or in a batch of any size and position, at any thread budget of the
default runtime, and after a save and load. A quality engineer re-scoring a disputed part weeks later compares to the
digit (docs/decisions.md "Same photo, same answer")."""

import numpy as np
import pytest

from anomaly_service import AnomalyModel
from anomaly_service.parallelism import intra_op_threads
from conftest import add_defect, textured_part


def _photos(n: int = 6, seed: int = 21) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [add_defect(textured_part(rng), 30 + 10 * i, 40 + 8 * i, radius=4 + i)[0] if i % 2 else textured_part(rng)
            for i in range(n)]


def _answer(r) -> tuple:
    """Everything a record or an answer reads off a result, bit for bit."""
    return (r.score, r.normalized_score, r.is_anomaly, r.scorers, r.anomaly_map.tobytes(), r.normalized_map().tobytes())


def _assert_same(a, b) -> None:
    assert a.is_anomaly == b.is_anomaly
    assert a.score == b.score and a.normalized_score == b.normalized_score
    assert a.scorers == b.scorers  # each opinion's score and normalized score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    np.testing.assert_array_equal(a.normalized_map(), b.normalized_map())


@pytest.fixture(scope="module", params=["global", "features"])
def branch_model(request, rng_images):
    """A model with a second opinion: its network ran on the whole batch at once, and an image's error depended on
    which other images shared the pass."""
    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        calibration_fraction=0.25, autoencoder=request.param,
                        ae_epochs=10, **({"ae_keep": "always"} if request.param == "global" else {})).fit(rng_images)


@pytest.mark.parametrize("which", ["knn", "branch"])
def test_a_photo_scores_the_same_alone_and_in_batches_of_any_size_and_position(which, fitted_model, branch_model):
    model = fitted_model if which == "knn" else branch_model
    photos = _photos()
    alone = [model.score(p) for p in photos]
    batched = list(model.score_many(photos))  # one pass of six
    backwards = list(model.score_many(photos[::-1]))[::-1]  # each photo elsewhere in the pass
    pairs = [r for s in range(0, len(photos), 4) for r in model.score_many(photos[s : s + 4])]  # passes of 4 and 2
    for a, b, c, d in zip(alone, batched, backwards, pairs):
        _assert_same(a, b)
        _assert_same(a, c)
        _assert_same(a, d)
    assert {r.is_anomaly for r in alone} == {True, False}  # both decisions are among them


def test_in_a_batch_a_part_keeps_its_alone_answer_so_no_threshold_falls_between_them(branch_model):
    """Bit-identical is what makes a decision safe at every threshold, including one set right at the part's score:
    before, a batch moved a fused score by float32 steps, and a threshold between the two answers would flip it."""
    photo = _photos()[1]
    alone = branch_model.score(photo)
    in_batch = next(iter(branch_model.score_many([photo, *_photos(4, seed=3)])))
    assert (in_batch.normalized_score, in_batch.scorers) == (alone.normalized_score, alone.scorers)


def test_the_service_answers_a_part_in_a_burst_as_it_answers_it_alone(branch_model, tmp_path):
    """Concurrent requests share backbone passes (batching.py); each answer equals that photo's answer alone."""
    import asyncio

    import httpx

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings
    from conftest import png_bytes

    branch_model.save(tmp_path / "models" / "part")
    files = [png_bytes(p) for p in _photos(8)]

    async def run() -> tuple[list[dict], list[dict], str]:
        app = create_app(ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, batch_max_size=8,
                                         batch_wait_ms=50))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                def post(data: bytes):
                    return c.post("/score", files={"file": ("x.png", data, "image/png")})

                burst = await asyncio.gather(*(post(d) for d in files))
                alone = [await post(d) for d in files]
                metrics = (await c.get("/metrics")).text
        return [r.json() for r in burst], [r.json() for r in alone], metrics

    burst, alone, metrics = asyncio.run(run())
    passes = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("anomaly_batch_size_count"))
    assert passes < 2 * len(files)  # some of the burst shared a pass
    for b, a in zip(burst, alone):
        assert (b["score"], b["normalized_score"], b["is_anomaly"], b["scorers"]) == \
            (a["score"], a["normalized_score"], a["is_anomaly"], a["scorers"])


def test_the_default_runtime_answers_the_same_at_every_thread_budget(fitted_model, branch_model, tmp_path):
    """The service gives a pass every intra-op thread alone and a share beside another (batching.py); under ONNX
    Runtime (the CPU default) that does not change the answer. A saved and loaded model answers the same too."""
    for model in (fitted_model, branch_model):
        loaded = AnomalyModel.load(model.save(tmp_path / f"m{id(model)}"), runtime="onnx")
        assert loaded.runtime == "onnx"
        photos = _photos(3)
        with intra_op_threads(1, restore=2):
            one = list(loaded.score_many(photos))
        with intra_op_threads(2, restore=2):
            two = [loaded.score(p) for p in photos]
        for a, b, before in zip(one, two, (model.score(p) for p in photos)):
            _assert_same(a, b)
            _assert_same(a, before)


def test_a_result_says_how_it_was_computed_where_that_can_move_its_answer(fitted_model, tmp_path):
    """Where the answer can still differ (torch's runtime against ONNX Runtime's, torch at another thread count),
    each result says what computed it: the runtime that ran, the kNN search as GET /models words it, the device and
    the intra-op threads of its pass, alone or in a batch. A record keeps it (revision 0008): a re-score that
    decides otherwise can then be told from a model that changed."""
    from anomaly_service.decision import ScoredWith

    path = fitted_model.save(tmp_path / "m")
    photo = _photos(1)[0]
    for runtime in ("onnx", "torch"):
        model = AnomalyModel.load(path, runtime=runtime, knn_precision="fp32")
        assert model.knn_search == "exact, fp32"
        for threads in (1, 2):
            with intra_op_threads(threads, restore=2):
                got = [model.score(photo), *model.score_many([photo, photo])]
            assert {r.scored_with for r in got} == {ScoredWith(runtime, "exact, fp32", "cpu", threads)}


def _bank_and_queries(d: int = 40, n_bank: int = 3003, n_queries: int = 700) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(40, d)).astype(np.float32) * 4 + 5.0  # far from the origin, as real features are
    bank = (centres[rng.integers(0, 40, n_bank)] + rng.normal(size=(n_bank, d))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, n_queries)] + rng.normal(size=(n_queries, d))).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("kind", ["flat fp32", "flat bf16", "ivf", "wide flat fp32"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_querys_answer_does_not_depend_on_the_queries_searched_with_it(kind, k):
    """The kNN search answers each patch as if it were searched alone: before, a block of a few queries took
    another GEMM kernel (fp32 distances a few float32 steps apart) and fewer than 64 queries went to FAISS, so a
    small photo, or the last rows of a pass, scored otherwise in a batch than alone."""
    import faiss

    from anomaly_service.index import build_index, set_nprobe, to_search_device

    wide = kind.startswith("wide")  # FAISS's own BLAS path, whose kernel changes past a thousand queries or so
    bank, queries = _bank_and_queries(d=152 if wide else 40, n_queries=2000 if wide else 700)
    if kind == "ivf":
        index = build_index(bank, "ivf", nprobe=8)
        set_nprobe(index, 8)
    else:
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
    search = to_search_device(index, use_gpu=False, precision="bf16" if "bf16" in kind else "fp32")
    whole = search.search(queries, k)
    if wide:  # exact: the nearest rows and their distances from the rows themselves
        want = np.sort(((queries[:, None, :] - bank[None]) ** 2).sum(-1), axis=1)[:, :k]
        np.testing.assert_allclose(whole[0], want, rtol=1e-5)
    at = 0
    for size in (1, 3, 5, 20, 63, 64, 257, len(queries) - 413):  # blocks of every kind of size, to the last query
        part = search.search(queries[at : at + size], k)
        np.testing.assert_array_equal(part[0], whole[0][at : at + size])
        np.testing.assert_array_equal(part[1], whole[1][at : at + size])
        at += size
    assert at == len(queries)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_equally_far_bank_rows_resolve_to_the_lowest_id(precision):
    """Ties go to the lowest row id, whatever the product's rounding or the shortlist's order: the heatmap's
    evidence (which training image a patch matched) is the same on every re-score."""
    import faiss

    from anomaly_service.index import BlockedFlatSearch

    bank, queries = _bank_and_queries(n_bank=800, n_queries=100)
    bank = np.concatenate([bank, bank[::-1]])  # every row twice: row i and row 1599 - i are equally far
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    sq, ids = BlockedFlatSearch(index, precision=precision).search(queries, 2)
    assert (ids[:, 0] < 800).all() and (ids[:, 1] == len(bank) - 1 - ids[:, 0]).all()
    np.testing.assert_array_equal(sq[:, 0], sq[:, 1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_small_photo_scores_the_same_alone_and_in_a_batch(precision, rng_images):
    """A photo of fewer patches than a search block is the case that showed it: alone its few patches went to FAISS,
    in a batch to the product, and its score moved by float32 steps with its company."""
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                         calibration_fraction=0.25, autoencoder="none").fit(rng_images[:8])
    model.use_knn_precision(precision)
    rng = np.random.default_rng(2)
    photos = [textured_part(rng, 40, 40) for _ in range(5)]
    assert model.embedder.preprocessing.working_size(40, 40)[0] <= 56  # under 64 patches each
    alone = [model.score(p) for p in photos]
    for a, b in zip(alone, model.score_many(photos)):
        _assert_same(a, b)


def test_the_bf16_shortlist_answers_as_the_fp32_search_does():
    """A re-score on a CPU without native bf16 (``auto`` picks fp32 there) gives the line's numbers: both rank their
    shortlist by fp32 ``(q - b)^2`` of the rows as fitted (bf16 ranked centred rows, a float32 step or so apart).
    The nearest row (k=1, the default) is in both shortlists here; a farther one (k=3) can fall out of bf16's."""
    k = 1
    import faiss

    from anomaly_service.index import BlockedFlatSearch

    bank, queries = _bank_and_queries()
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    fp32 = BlockedFlatSearch(index, precision="fp32").search(queries, k)
    bf16 = BlockedFlatSearch(index, precision="bf16").search(queries, k)
    np.testing.assert_array_equal(bf16[1], fp32[1])
    np.testing.assert_array_equal(bf16[0], fp32[0])
