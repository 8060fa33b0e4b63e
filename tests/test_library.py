"""The library as a notebook user drives it: Python conventions a fitted model keeps (pickling, copies)."""

import copy
import pickle

import joblib
import numpy as np

from conftest import add_defect, textured_part


def test_a_fitted_model_pickles_and_scores_as_before(fitted_model, tmp_path):
    """joblib.dump and multiprocessing pickle models; the ONNX Runtime sessions are this process's alone."""
    img, _ = add_defect(textured_part(np.random.default_rng(9)), 60, 60)
    before = fitted_model.score(img)
    joblib.dump(fitted_model, tmp_path / "model.joblib")
    for copied in (pickle.loads(pickle.dumps(fitted_model)), joblib.load(tmp_path / "model.joblib"),
                   copy.deepcopy(fitted_model)):
        after = copied.score(img)
        assert after.score == before.score and after.is_anomaly == before.is_anomaly
        np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)
    assert fitted_model.score(img).score == before.score  # the original still scores
