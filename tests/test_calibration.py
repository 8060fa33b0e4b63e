"""The threshold from good images' scores: what a good part's chance to exceed it is, and that it holds still."""

import numpy as np
import pytest

from anomaly_service.calibration import TAIL_MIN_IMAGES, TAIL_P, calibrate, tail_threshold, threshold_rule


def test_a_good_part_exceeds_the_tail_threshold_about_as_often_as_it_was_set_for():
    rng = np.random.default_rng(0)
    scores = 40.0 + rng.gamma(2.0, 1.5, size=500)  # a light, unbounded tail, as leave-one-out scores have
    t = tail_threshold(scores)
    fresh = 40.0 + rng.gamma(2.0, 1.5, size=400_000)
    rate = float(np.mean(fresh > t))
    assert t > scores.max() * 0.98 and TAIL_P / 3 < rate < TAIL_P * 3


@pytest.mark.parametrize("seed", range(5))
def test_a_few_top_scores_moving_barely_move_the_threshold(seed):
    # two fits of the same images differ by the coreset's sampling, which moves a few of the highest scores by a few
    # percent; the threshold must not follow them by more than they moved (a fitted tail shape moved it 7-11% here)
    rng = np.random.default_rng(seed)
    scores = 45.0 * np.exp(rng.normal(0.0, 0.04, size=230))
    moved = scores.copy()
    moved[np.argsort(scores)[-3:]] *= 1.08
    a, b = tail_threshold(scores), tail_threshold(moved)
    assert a is not None and b is not None and abs(b / a - 1.0) < 0.03


def test_too_few_or_identical_scores_fall_back_to_the_simple_rule():
    few = np.linspace(10.0, 11.0, TAIL_MIN_IMAGES - 1)
    assert tail_threshold(few) is None
    t, how = threshold_rule(few)
    assert t == pytest.approx(max(few.mean() + 3 * few.std(ddof=1), few.max())) and "mean" in how
    assert tail_threshold(np.full(200, 7.0)) is None
    cal = calibrate(np.full(200, 7.0), np.full(50, 7.0))
    assert cal.threshold > cal.floor  # a degenerate sample still gives a finite, positive scale
    _, how = threshold_rule(40.0 + np.random.default_rng(1).gamma(2.0, 1.5, size=300))
    assert "exponential tail" in how


def test_a_fit_on_a_handful_of_images_says_its_threshold_and_guard_rest_on_too_few(caplog):
    from anomaly_service import AnomalyModel
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(4)
    with caplog.at_level("WARNING", logger="anomaly_service"):
        AnomalyModel(**SMALL).fit([textured_part(rng) for _ in range(3)])
    few = [r.getMessage() for r in caplog.records if "rests on the scores of 3 good image(s)" in r.getMessage()]
    assert len(few) == 1 and "max(mean+3*std, max)" in few[0] and f"{TAIL_MIN_IMAGES} or more" in few[0]
    assert "contamination guard needs 5 images and did not run" in few[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="anomaly_service"):
        AnomalyModel(**SMALL).fit([textured_part(rng, 64, 64) for _ in range(TAIL_MIN_IMAGES)])
    assert not [r for r in caplog.records if "rests on the scores" in r.getMessage()]


@pytest.mark.parametrize("n,fraction", [(6, 0.9), (2, 0.1)])
def test_a_holdout_that_leaves_the_bank_too_few_images_says_so_not_that_images_are_unreadable(n, fraction):
    """Every image read; the error blamed readability ("need at least 2 readable normal images, got 1") when the
    held-out share left one image for the bank."""
    from anomaly_service import AnomalyModel, ConfigError
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(0)
    images = [textured_part(rng, 64, 64) for _ in range(n)]
    with pytest.raises(ConfigError, match="--calibration-fraction") as err:
        AnomalyModel(**SMALL, calibration="holdout", calibration_fraction=fraction, autoencoder="none").fit(images)
    assert "readable" not in str(err.value) and f"the {n} good images" in str(err.value)
