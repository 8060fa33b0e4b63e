"""The threshold from good images' scores: what a good part's chance to exceed it is, and that it holds still."""

import numpy as np
import pytest

from anomaly_service.calibration import (TAIL_MIN_IMAGES, TAIL_P, Calibration, calibrate, pareto_tail_threshold,
                                         tail_threshold, threshold_rule)


def test_a_good_part_exceeds_the_tail_threshold_about_as_often_as_it_was_set_for():
    rng = np.random.default_rng(0)
    scores = 40.0 + rng.gamma(2.0, 1.5, size=500)  # a light, unbounded tail, as leave-one-out scores have
    t = tail_threshold(scores)
    fresh = 40.0 + rng.gamma(2.0, 1.5, size=400_000)
    rate = float(np.mean(fresh > t))
    assert t > scores.max() * 0.98 and TAIL_P / 3 < rate < TAIL_P * 3


def test_the_guards_generalized_pareto_threshold_is_exceeded_about_as_often_as_it_was_set_for():
    """The contamination guard's tail (contamination.GUARD_TAIL): on the same scores, the same chance to exceed."""
    rng = np.random.default_rng(0)
    scores = 40.0 + rng.gamma(2.0, 1.5, size=500)
    t = pareto_tail_threshold(scores)
    assert t is not None
    rate = float(np.mean(40.0 + rng.gamma(2.0, 1.5, size=400_000) > t))
    assert TAIL_P / 3 < rate < TAIL_P * 3


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


def test_a_drop_that_leaves_fewer_than_five_images_does_not_say_the_guard_did_not_run(caplog):
    """Five images, one unlike the rest, --contamination drop: the guard ran and dropped it, and the warning about
    the four left said "the contamination guard needs 5 images and did not run" (it counted what the drop left)."""
    from anomaly_service import AnomalyModel
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(4)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::8], stripes[:, ::8] = 255, (0, 255, 0)
    images = [textured_part(rng, 64, 64) for _ in range(4)] + [stripes]
    with caplog.at_level("WARNING", logger="anomaly_service"):
        model = AnomalyModel(**SMALL, contamination="drop", autoencoder="none").fit(images)
    assert [s.name for s in model.suspects_] == ["image[4]"] and model.manifest_.training.n_images == 4
    few = [r.getMessage() for r in caplog.records if "rests on the scores of 4 good image(s)" in r.getMessage()]
    assert len(few) == 1 and "contamination guard" not in few[0]


def test_a_fit_that_rests_on_fewer_images_than_it_learnt_names_those_it_set_aside(caplog):
    """Nine images, one unlike the rest: the threshold is set without it, and the warning said "rests on the scores
    of 8 good image(s)" under "fitted 9 images" without saying which one was left out of it or why."""
    from anomaly_service import AnomalyModel
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(4)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::8], stripes[:, ::8] = 255, (0, 255, 0)
    with caplog.at_level("WARNING", logger="anomaly_service"):
        model = AnomalyModel(**SMALL, autoencoder="none").fit([textured_part(rng, 64, 64) for _ in range(8)]
                                                              + [stripes])
    assert model.manifest_.training.left_out_of_threshold == ["image[8]"]
    [few] = [r.getMessage() for r in caplog.records if "rests on the scores of 8 good image(s)" in r.getMessage()]
    assert "1 set aside as outliers among the good images' scores (image[8])" in few, few


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


def test_a_feature_autoencoder_fit_of_two_images_is_not_told_to_use_the_leave_one_out_threshold():
    """The feature autoencoder calibrates on held-out images whatever --calibration says: on two good images the
    error told a user who had the leave-one-out threshold to use it; the way out is a fit without that branch."""
    from anomaly_service import AnomalyModel, ConfigError
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="--calibration-fraction") as err:
        AnomalyModel(**SMALL, autoencoder="features").fit([textured_part(rng, 64, 64) for _ in range(2)])
    assert "use the leave-one-out threshold" not in str(err.value)
    assert "feature autoencoder's held-out threshold" in str(err.value)
    assert "without --autoencoder features" in str(err.value)


def test_a_bank_capped_below_two_images_patches_names_the_flags_that_fill_it():
    """--coreset-max 1 keeps one image's patch: the refusal said leave-one-out "needs patches from at least two
    images", naming no flag the user had set."""
    from anomaly_service import AnomalyModel, ConfigError
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"memory bank's 1 patch\(es\) hold 0 from images other than one of them, "
                                          r"fewer than --k 1: keep more patches \(--coreset-ratio, --coreset-max\)"):
        AnomalyModel(**SMALL, coreset_max=1, autoencoder="none").fit([textured_part(rng, 64, 64) for _ in range(2)])


def test_a_bank_of_every_patch_too_small_for_k_asks_for_images_not_patches():
    """--coreset-ratio 1 keeps every patch of the fit: the refusals of a --k above the bank, or above the other
    images' patches, told the user to keep more patches with the coreset flags, which could add none."""
    from anomaly_service import AnomalyModel, ConfigError
    from conftest import SMALL, textured_part

    rng = np.random.default_rng(0)
    images = [textured_part(rng, 64, 64) for _ in range(2)]  # two images of 256 patches each, all kept
    for k, said in ((300, r"hold 256 from images other than one of them, fewer than --k 300"),
                    (600, r"--k 600 is more than the 512 patches of the memory bank")):
        with pytest.raises(ConfigError, match=said) as err:
            AnomalyModel(**{**SMALL, "coreset_ratio": 1.0}, k=k, autoencoder="none").fit(images)
        assert "add good images (the bank holds every patch of the fit already)" in str(err.value)
        assert "--coreset-ratio" not in str(err.value)


def test_the_tail_fit_starts_at_fifty_scores_as_documented():
    """how-it-works.md: "With 50 or more such scores" the tail fit sets the threshold; fewer, the sigma rule."""
    rng = np.random.default_rng(2)
    scores = 40.0 + rng.gamma(2.0, 1.5, size=50)
    assert "exponential tail" in threshold_rule(scores)[1]
    assert "mean" in threshold_rule(scores[:49])[1]


@pytest.mark.parametrize("unit", [1e-3, 1.0, 1e3])
def test_the_threshold_rule_does_not_depend_on_the_scores_units(unit):
    """Distances are in each backbone's own units (a bank's can sit near 0.1 or near 100): the same scores in
    other units give the same rule and the same threshold in those units."""
    scores = 40.0 + np.random.default_rng(5).gamma(2.0, 1.5, size=300)
    t, how = threshold_rule(scores)
    t_unit, how_unit = threshold_rule(scores * unit / 40.0)
    assert how_unit == how and t_unit == pytest.approx(t * unit / 40.0)


def test_peaks_without_spread_fall_back_to_the_simple_rule():
    # the top fifth all alike: no tail shape to fit, so the sigma rule (a degenerate fit) sets the threshold
    scores = np.r_[np.full(160, 7.0), np.full(40, 9.0)]
    assert tail_threshold(scores) is None
    t, how = threshold_rule(scores)
    assert "mean" in how and t == pytest.approx(max(scores.mean() + 3 * scores.std(ddof=1), 9.0))


@pytest.mark.parametrize("scores,expected", [([5.0], 5.0), ([4.0, 6.0], 5.0 + 3 * np.std([4.0, 6.0], ddof=1))])
def test_one_or_two_unseen_normals_set_the_threshold_at_their_score_or_their_spread(scores, expected):
    """A branch calibrated on one image it did not learn, or two: one score has no spread, and the threshold is
    that score (not NaN, which fell to the floor and flagged every part)."""
    t, _ = threshold_rule(np.array(scores))
    assert t == pytest.approx(expected)
    assert calibrate(np.array(scores), np.array([1.0, 2.0])).threshold == pytest.approx(expected)


@pytest.mark.parametrize("level", [7.0, 0.0, -2.0, 3000.0])
def test_identical_good_images_put_the_threshold_just_above_them(level):
    """Identical good images (no spread): a part that scores like them passes, one a percent of the scale above
    them is flagged, and the scale stays finite and positive at a floor of zero too."""
    cal = calibrate(np.full(200, level), np.full(50, level))
    span = max(abs(level), 1.0)
    assert level < cal.threshold < level + 0.01 * span
    assert cal.normalize(level) == 0.0 and np.isfinite(cal.normalize(level + 0.01 * span))
    assert cal.normalize(level + 0.01 * span) > 1.0


def test_no_unseen_normal_image_is_a_clear_error():
    from anomaly_service import ConfigError

    with pytest.raises(ConfigError, match="at least one held-out normal image"):
        calibrate(np.array([]), np.array([1.0]))


def test_a_calibrations_repr_leaves_out_its_per_image_scores():
    """A notebook cell showing a result printed every calibration image's score and distance."""
    cal = calibrate(np.linspace(10.0, 11.0, 300), np.full(50, 9.0))
    cal.holdout_distances = [123.456] * 300
    text = repr(cal)
    assert "threshold=" in text and "holdout_scores" not in text and "123.456" not in text


def _honest(scores: np.ndarray, **edits) -> Calibration:
    from dataclasses import replace

    cal = calibrate(scores, np.full(50, float(np.median(scores)) * 0.5))
    return replace(cal, **edits)


def test_a_threshold_some_rule_sets_from_its_scores_passes_the_load_check_and_an_edited_one_does_not():
    """threshold_problem, the load's check on an edited threshold, unit by unit: each rule a release used passes,
    a threshold nudged off it does not (1% is well past rounding, far inside what the +20% edit tests)."""
    from anomaly_service.calibration import sigma_threshold, threshold_problem

    scores = 40.0 + np.random.default_rng(3).gamma(2.0, 1.5, size=300)
    cal = _honest(scores)
    assert threshold_problem(cal, 3.0) is None
    assert threshold_problem(_honest(scores, threshold=sigma_threshold(scores, 3.0)), 3.0) is None
    assert threshold_problem(_honest(scores, threshold=cal.threshold * 1.01), 3.0) is not None
    assert threshold_problem(_honest(scores, threshold=cal.threshold * 0.99), 3.0) is not None
    # a release before kept no scores: nothing to check against
    assert threshold_problem(_honest(scores, threshold=1e5, holdout_scores=[]), 3.0) is None


def test_identical_good_images_threshold_just_above_their_floor_loads_and_one_edited_to_it_does_not():
    from anomaly_service.calibration import just_above, threshold_problem

    flat = calibrate(np.full(60, 7.0), np.full(50, 7.0))
    assert flat.threshold == just_above(7.0) and threshold_problem(flat, 3.0) is None
    scores = 40.0 + np.random.default_rng(3).gamma(2.0, 1.5, size=300)
    top = float(scores.max())
    # the floor edited down under every score (every part flagged), or up past the top score (every part passed),
    # each with the threshold just above it, is no rule's
    for floor in (1.0, 1.5 * top):
        assert threshold_problem(_honest(scores, floor=floor, threshold=just_above(floor)), 3.0) is not None


def test_an_older_models_generalized_pareto_threshold_loads_within_its_optimizers_rounding():
    """Models of the release that fitted the line's tail with a generalized Pareto shape keep loading: scipy's
    versions move the fit's last digits, so within 1%; the same threshold under another method's name, or further
    off, is an edit."""
    from anomaly_service.calibration import threshold_problem

    scores = 40.0 + np.random.default_rng(3).gamma(2.0, 1.5, size=300)
    pareto = pareto_tail_threshold(scores)
    older = "generalized Pareto tail fit, P(exceed)=0.002 of 300 unseen normals"
    assert threshold_problem(_honest(scores, threshold=pareto * 1.005, method=older), 3.0) is None
    assert threshold_problem(_honest(scores, threshold=pareto * 1.05, method=older), 3.0) is not None
    assert threshold_problem(_honest(scores, threshold=pareto * 1.005), 3.0) is not None
