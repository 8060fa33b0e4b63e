"""Models written by the release before the stage redesign keep loading and scoring as they did, to
the float noise between CPUs.

tests/data/legacy_v1 holds tiny models fitted by that release on synthetic parts, with the scores and maps it gave
for three probe images (make_legacy.py there says how they were made). A refactor that changes any number fails
here; so does one that stops reading an older manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomaly_service import AnomalyModel, ModelFormatError

LEGACY = Path(__file__).parent / "data" / "legacy_v1"


@pytest.fixture(scope="module")
def probes() -> list[np.ndarray]:
    with np.load(LEGACY / "probes.npz") as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # the same float code gives different last digits on another CPU family (its BLAS and ONNX kernels take other
    # vector paths; docs/benchmarks.md has the sizes), so the tolerance sits above that and far below what any
    # change to the computation moves
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", ["default", "selection_random", "autoencoder"])
def test_legacy_model_scores_as_before(name, probes):
    model = AnomalyModel.load(LEGACY / name, device="cpu")
    expected = np.load(LEGACY / f"{name}_expected.npz")
    results = list(model.score_many(probes))
    # score and anomaly_map are the kNN opinion; normalized_score and normalized_map the decision (fused or not)
    _close(np.array([r.score for r in results]), expected["knn"])
    _close(np.array([r.normalized_score for r in results]), expected["normalized"])
    for i, r in enumerate(results):
        _close(r.normalized_map(), expected[f"nmap{i}"])
        if name != "autoencoder":  # the old release's anomaly_map was the fused one for fused models
            _close(r.anomaly_map, expected[f"map{i}"])


def test_legacy_selection_random_loads_but_cannot_be_refitted():
    model = AnomalyModel.load(LEGACY / "selection_random", device="cpu")
    assert model.config.selection == "random" and model.manifest_.selection.mode == "random"
    with pytest.raises(Exception, match="no longer offered"):
        model.fit([np.zeros((64, 64, 3), np.uint8)] * 3)


def test_removed_image_score_fails_with_the_way_out():
    with pytest.raises(ModelFormatError, match="image_score=reweighted.*re-fit it with `anomaly fit`"):
        AnomalyModel.load(LEGACY / "image_score_reweighted", device="cpu")


def test_resaved_legacy_model_is_identical_in_scores(probes, tmp_path):
    """Loading and saving again migrates the manifest (retired keys dropped) without changing a score."""
    model = AnomalyModel.load(LEGACY / "default", device="cpu")
    again = AnomalyModel.load(model.save(tmp_path / "m"), device="cpu")
    assert "reweight_neighbours" not in again.manifest_.config
    for p in probes:
        a, b = model.score(p), again.score(p)
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
