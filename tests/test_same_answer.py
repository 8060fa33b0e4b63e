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
                        calibration_fraction=0.25, autoencoder=request.param, ae_keep="always",
                        ae_epochs=10).fit(rng_images)


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
