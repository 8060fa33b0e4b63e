"""Leave-one-out calibration and the contamination guard, on synthetic parts."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from anomaly_service import AnomalyModel
from anomaly_service.errors import ContaminationError
from anomaly_service.index import search

from conftest import SMALL, add_defect, textured_part


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [textured_part(rng) for _ in range(16)]


@pytest.fixture(scope="module")
def defect() -> np.ndarray:
    return add_defect(textured_part(np.random.default_rng(8)), 64, 64, radius=14)[0]


def _names(n: int) -> list[str]:
    return [f"good_{i:02d}.png" for i in range(n)]


def test_every_image_goes_into_the_bank_and_the_threshold(fitted_model, rng_images):
    m = fitted_model.manifest_
    assert m.training.calibration == "leave-one-out"
    assert m.training.n_images == len(rng_images) and m.training.n_calibration_images == 0
    assert m.calibration.n_images == len(rng_images) - len(m.training.left_out_of_threshold)
    sources = fitted_model.knn.provenance_
    assert sources is not None and len(sources) == fitted_model.knn.bank_size
    assert set(sources[:, 0]) <= set(range(len(rng_images)))  # every bank row names a training image
    assert len(fitted_model.catalog_) == len(rng_images)


def test_left_out_scores_equal_a_bank_built_without_the_image(fitted_model, rng_images):
    """The shortlist search with the image's own rows skipped gives the exact answer of a bank without them."""
    from anomaly_service.embedder import Embedded

    model, knn = fitted_model, fitted_model.knn
    bank, source = knn.bank(), knn.provenance_[:, 0]
    for image_id in (0, 5):
        name = model.catalog_.names[image_id]  # arrays are named image[i] in input order
        emb = model.embedder.embed([rng_images[int(name.split("[")[1].rstrip("]"))]], keep=knn.keep)
        others = faiss.IndexFlatL2(bank.shape[1])
        others.add(np.ascontiguousarray(bank[source != image_id]))
        want, _ = search(others, emb.features.reshape(-1, bank.shape[1]).float().numpy(), model.config.k)
        old = knn.sigma, knn.image_score
        knn.sigma, knn.image_score = 0.0, "max"  # the image score is then the raw patch maximum
        try:
            got = knn.score_left_out(Embedded(emb.features, emb.work_size, emb.shapes), [image_id])[0][0]
        finally:
            knn.sigma, knn.image_score = old
        assert got == pytest.approx(float(want.mean(1).max()), rel=1e-4)


def test_a_defect_hidden_among_the_good_images_is_caught(goods, defect):
    model = AnomalyModel(**SMALL).fit(goods + [defect], names=_names(len(goods)) + ["hidden_defect.png"])
    suspects = [s.name for s in model.suspects_]
    assert "hidden_defect.png" in suspects
    assert len(suspects) <= 2  # the good ones mostly pass
    m = model.manifest_
    assert m.training.suspects_action == "warn"
    assert "hidden_defect.png" in [s.name for s in m.training.suspects]
    assert "hidden_defect.png" in model.catalog_.names  # warn keeps it in the bank
    # it does not widen the threshold: plain leave-one-out marks it too, and the threshold is set without it
    assert "hidden_defect.png" in m.training.left_out_of_threshold
    assert m.calibration.n_images == len(goods) + 1 - len(m.training.left_out_of_threshold)


def test_drop_refits_without_the_suspects_and_the_defect_is_flagged_again(goods, defect):
    other = add_defect(textured_part(np.random.default_rng(9)), 50, 70, radius=14)[0]
    warn = AnomalyModel(**SMALL).fit(goods + [defect], names=_names(len(goods)) + ["hidden_defect.png"])
    drop = AnomalyModel(**SMALL, contamination="drop").fit(goods + [defect],
                                                          names=_names(len(goods)) + ["hidden_defect.png"])
    assert "hidden_defect.png" not in drop.catalog_.names
    assert drop.manifest_.training.n_images == len(goods) + 1 - len(drop.suspects_)
    assert drop.score(other).is_anomaly
    # the defect learned by the contaminated bank scores lower there than in the cleaned one
    assert drop.score(other).normalized_score > warn.score(other).normalized_score


def test_a_drop_refit_keeps_its_calibration_set_in_the_refit_banks_dimensions(goods):
    """The re-fit without the suspects chooses its kept dimensions again (the std selection over fewer images moves
    a few). The grids an update re-scores must be in those, not in the first fit's."""
    from anomaly_service.calibration_set import CalibrationSet

    defects = [add_defect(textured_part(np.random.default_rng(8 + i)), 64, 64, radius=14)[0] for i in range(3)]
    names = _names(len(goods)) + [f"defect_{i}.png" for i in range(3)]
    model = AnomalyModel(**SMALL, contamination="drop").fit(goods + defects, names=names)
    assert len(model.suspects_) == 3
    stored = CalibrationSet.of(model)
    items, (ids, _) = stored.grids, stored.left_out_ids
    for (grid, _shape), place in zip(items, ids):
        image = (goods + defects)[names.index(model.catalog_.names[place])]
        fresh = model.embedder.embed([image], keep=model.knn.keep).features.float().numpy()
        np.testing.assert_allclose(grid.astype(np.float32).reshape(-1), fresh.reshape(-1), rtol=1e-2, atol=1e-2)


def test_fail_stops_the_fit_and_names_the_images(goods, defect):
    with pytest.raises(ContaminationError, match="hidden_defect.png") as info:
        AnomalyModel(**SMALL, contamination="fail").fit(goods + [defect],
                                                        names=_names(len(goods)) + ["hidden_defect.png"])
    assert "hidden_defect.png" in [s.name for s in info.value.suspects]


def test_cli_fit_lists_the_suspects(tmp_path, goods, defect):
    from click.testing import CliRunner
    from PIL import Image

    from anomaly_service.cli import app

    d = tmp_path / "good"
    d.mkdir()
    for i, g in enumerate(goods):
        Image.fromarray(g).save(d / f"{i:02d}.png")
    Image.fromarray(defect).save(d / "zz_hidden.png")
    args = ["fit", "--normal-dir", str(d), "--out", str(tmp_path / "m"), "--backbone", "efficientnet_lite0",
            "--image-size", "128", "--coreset-ratio", "0.25", "-q"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "zz_hidden.png" in out.output and "may be defective" in out.output
    failed = CliRunner().invoke(app, args + ["--contamination", "fail", "--out", str(tmp_path / "m2")])
    assert failed.exit_code != 0 and "zz_hidden.png" in failed.output
    assert not (tmp_path / "m2").exists()
    # the model keeps saying so: anomaly info lists the suspect after the training line
    info = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    assert info.exit_code == 0, info.output
    listed = info.output.split("\ntraining ")[1]
    assert listed.splitlines()[1].startswith("suspects ") and "kept in the model" in listed
    assert "zz_hidden.png" in listed


def test_evaluate_reports_the_suspects_in_its_json_and_report(tmp_path, goods, defect):
    """A fit that evaluate makes lists its suspects on stderr, in --json and as training_suspects.csv in --report."""
    import csv
    import json

    from click.testing import CliRunner
    from PIL import Image

    from anomaly_service.cli import app

    root = tmp_path / "part"
    for sub in ("train/good", "test/good", "test/blob"):
        (root / sub).mkdir(parents=True)
    for i, g in enumerate(goods):
        Image.fromarray(g).save(root / "train/good" / f"{i:02d}.png")
    Image.fromarray(defect).save(root / "train/good" / "zz_hidden.png")
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(textured_part(rng)).save(root / "test/good" / f"{i}.png")
        Image.fromarray(add_defect(textured_part(rng), 40 + 10 * i, 60, radius=12)[0]).save(
            root / "test/blob" / f"{i}.png")
    out = CliRunner().invoke(app, ["evaluate", str(root), "--json", str(tmp_path / "m.json"), "--report",
                                   str(tmp_path / "report"), "--backbone", "efficientnet_lite0", "--image-size", "128",
                                   "--coreset-ratio", "0.25", "-q"])
    assert out.exit_code == 0, out.output
    assert "zz_hidden.png" in out.output and "may be defective" in out.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert [s["name"] for s in metrics["suspects"] if s["name"].endswith("zz_hidden.png")]
    assert metrics["suspects_action"] == "warn"
    with open(tmp_path / "report" / "training_suspects.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics["suspects"]) and any(r["image"].endswith("zz_hidden.png") for r in rows)
    assert all(float(r["times_the_median"]) >= 1.0 and r["action"] == "warn" for r in rows)


def test_holdout_calibration_is_still_offered(goods):
    model = AnomalyModel(**SMALL, calibration="holdout", calibration_fraction=0.25).fit(goods)
    t = model.manifest_.training
    assert t.calibration == "holdout" and t.n_calibration_images == 4 and t.n_images == len(goods) - 4
    assert model.suspects_ == []


def test_updates_after_a_left_out_fit_recalibrate_and_chain(goods, tmp_path):
    model = AnomalyModel(**SMALL).fit(goods[:12])
    n_cal = model.calibration_.n_images
    once = model.update(goods[12:14])
    twice = once.update(goods[14:])
    for m in (once, twice):
        assert m.calibration_.n_images == n_cal  # the fit's images, some re-scored, the rest kept
        assert len(m.knn.provenance_) == m.knn.bank_size
        assert len(m.catalog_) == len(model.catalog_) + (2 if m is once else 4)
    # the bank only grew: thresholds can only come down or stay
    assert twice.calibration_.threshold <= model.calibration_.threshold * 1.0001
    twice.save(tmp_path / "m")
    loaded = AnomalyModel.load(tmp_path / "m")
    assert len(loaded.catalog_) == len(twice.catalog_)
    assert loaded.score(goods[0]).score == pytest.approx(twice.score(goods[0]).score, rel=1e-5)


def _same_kind(n: int) -> list[np.ndarray]:
    """``n`` defects of one kind: the same bright blob near the same place on different parts."""
    return [add_defect(textured_part(np.random.default_rng(20 + j)), 60 + 3 * j, 62 - 2 * j, radius=14)[0]
            for j in range(n)]


@pytest.mark.parametrize("n_bad", [2, 3])
def test_defects_of_one_kind_hidden_together_are_all_caught(goods, n_bad):
    """Under leave-one-out they cover each other; the support score leaves their look-alikes out too."""
    bad_names = [f"hidden_{j}.png" for j in range(n_bad)]
    model = AnomalyModel(**SMALL).fit(goods + _same_kind(n_bad), names=_names(len(goods)) + bad_names)
    suspects = [s.name for s in model.suspects_]
    assert set(bad_names) <= set(suspects)
    assert len(suspects) == n_bad  # and no good one


def test_a_clean_set_flags_nothing(goods):
    other = [textured_part(np.random.default_rng(100 + i)) for i in range(20)]
    for images in (goods, other):
        assert AnomalyModel(**SMALL).fit(images).suspects_ == []


def test_support_scores_equal_the_distance_to_the_next_images_and_cover_what_leave_one_out_misses(goods):
    """The shortlist reading is exact (against a brute-force per-image nearest distance), and for same-kind
    defects the support score is far above the leave-one-out one while a good image's barely moves."""
    from anomaly_service.contamination import SUPPORT
    from anomaly_service.embedder import Embedded

    images = goods + _same_kind(3)
    model = AnomalyModel(**SMALL).fit(images, names=_names(len(goods)) + ["a.png", "b.png", "c.png"])
    knn = model.knn
    bank, source = knn.bank(), knn.provenance_[:, 0]
    knn.sigma, knn.image_score = 0.0, "max"  # image scores are then raw patch maxima
    ratio = {}
    for name in ("good_03.png", "a.png", "c.png"):
        image_id = model.catalog_.names.index(name)
        img = images[(_names(len(goods)) + ["a.png", "b.png", "c.png"]).index(name)]
        emb = model.embedder.embed([img], keep=knn.keep)
        raws, support = knn.score_left_out_supported(Embedded(emb.features, emb.work_size, emb.shapes), [image_id],
                                                     SUPPORT)
        q = emb.features.reshape(-1, bank.shape[1]).float().numpy()
        d = np.sqrt(np.maximum((q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T, 0))
        per_image = np.full((len(q), len(model.catalog_)), np.inf)
        for i in range(len(model.catalog_)):
            if (source == i).any():
                per_image[:, i] = d[:, source == i].min(1)
        per_image[:, image_id] = np.inf
        want = np.sort(per_image, axis=1)[:, SUPPORT].max()
        assert support[0] == pytest.approx(float(want), rel=1e-3)
        ratio[name] = support[0] / raws[0][0]
    assert ratio["a.png"] > 1.5 and ratio["c.png"] > 1.5
    assert ratio["good_03.png"] < 1.3


def test_an_approximate_index_leaves_the_threshold_where_the_exact_search_puts_it(goods):
    """Leave-one-out searches exactly while that is cheap, whatever index scores: the same bank, the same
    threshold and the same suspects with ivf as with the exact index."""
    exact = AnomalyModel(**SMALL, index="flat").fit(goods)
    approx = AnomalyModel(**SMALL, index="ivf", nprobe=1).fit(goods)  # one list: the scoring search misses often
    assert approx.manifest_.index.kind == "ivf" and exact.manifest_.index.kind == "flat"
    np.testing.assert_array_equal(approx.knn.bank(), exact.knn.bank())
    assert approx.manifest_.calibration.threshold == pytest.approx(exact.manifest_.calibration.threshold, rel=1e-5)
    assert [s.name for s in approx.suspects_] == [s.name for s in exact.suspects_]


def test_a_small_nprobe_never_scores_a_patch_by_a_neighbour_it_did_not_find():
    """``--nprobe 1`` with a ``--k`` larger than some lists: a patch whose probed list held fewer than ``k`` rows of
    other images averaged FAISS's missing results (id -1 at the largest float) into its score, so good training
    images scored ~1e18, in scoring and leave-one-out alike, and the threshold with them. Such a patch is now
    searched exactly: the scores stay within the spread of an exact search's."""
    from anomaly_service.index import build_index

    rng = np.random.default_rng(0)
    goods = [textured_part(rng) for _ in range(20)]  # a bank whose ivf has lists shorter than k + the shortlist
    model = AnomalyModel(**{**SMALL, "k": 9}, index="ivf", nprobe=1).fit(goods)
    exact = AnomalyModel(**{**SMALL, "k": 9}, index="flat").fit(goods)
    scored = [r.score for r in model.score_many(goods)]
    assert max(scored) < 2 * exact.manifest_.calibration.threshold
    assert model.manifest_.calibration.threshold == pytest.approx(exact.manifest_.calibration.threshold, rel=0.1)
    knn = model.knn
    emb = model.embedder.embed(goods[:6], keep=knn.keep)
    shortlist = build_index(knn.bank(), "ivf", nprobe=1, seed=0)  # a raw inverted file: short lists stay short
    left_out = [r[0] for r in knn.score_left_out(emb, list(range(6)), shortlist=shortlist)]
    exact_left_out = [r[0] for r in knn.score_left_out(emb, list(range(6)), shortlist=knn.left_out_search(6))]
    assert left_out == pytest.approx(exact_left_out, rel=0.1)


def test_a_tight_cluster_of_scores_does_not_make_its_own_shoulder_suspect():
    """Most images at one score (within a fraction of a percent, as real bottles' support scores are), the rest
    spread a few percent above: the guard lists the three clear outliers, not the shoulder. Dividing by the
    cluster's own spread put most of the shoulder at robust z > 3, out of the threshold that judged it."""
    from anomaly_service.contamination import GUARD_TAIL, find_suspects

    rng = np.random.default_rng(0)
    scores = np.concatenate([54.9 + rng.normal(0, 0.05, 150), 55.0 + rng.exponential(0.6, 60), [99.0, 100.0, 129.0]])
    names = [f"img_{i:03d}" for i in range(len(scores))]
    suspects = find_suspects(scores, names, tail=GUARD_TAIL)
    assert {"img_210", "img_211", "img_212"} <= {s.name for s in suspects}
    assert len(suspects) <= 3 + 2  # at most 1% of the 210 good ones besides them


def test_a_small_tight_set_lists_only_images_well_above_its_median():
    """Thirty images within a percent of each other and four clean ones a few percent above (as 30 bottles gave):
    the spread floor alone puts those four past the threshold the others set; the guard's ratio floor keeps them
    off the list, while a defect scoring far above the median is still listed."""
    from anomaly_service.contamination import GUARD_TAIL, MIN_RATIO, find_suspects

    rng = np.random.default_rng(1)
    scores = np.concatenate([60.0 + rng.normal(0, 0.4, 26), [64.8, 65.1, 65.4, 65.9], [96.0]])
    names = [f"img_{i:02d}" for i in range(len(scores))]
    plain = {s.name for s in find_suspects(scores, names, tail=GUARD_TAIL)}
    assert {"img_26", "img_27", "img_28", "img_29", "img_30"} <= plain  # without the floor: the four and the defect
    guarded = find_suspects(scores, names, min_ratio=MIN_RATIO, tail=GUARD_TAIL)
    assert [s.name for s in guarded] == ["img_30"] and guarded[0].ratio >= MIN_RATIO


def _spread_scores(n: int, seed: int = 2) -> np.ndarray:
    return 50.0 * np.exp(np.random.default_rng(seed).normal(0.0, 0.05, n))


def test_the_guard_judges_five_images_or_more_and_lists_the_worst_first():
    """cli.md and the fit's warning: the guard needs 5 images; what it lists, worst first, with how many times the
    median each score is (the fit prints it) and how far out it sits."""
    from anomaly_service.contamination import GUARD_TAIL, MIN_RATIO, find_suspects, robust_z

    def guard(scores):
        return find_suspects(scores, [f"img_{i}" for i in range(len(scores))], min_ratio=MIN_RATIO, tail=GUARD_TAIL)

    assert guard(np.r_[_spread_scores(3), 400.0]) == []  # four images: too few to tell an outlier from the spread
    listed = guard(np.r_[_spread_scores(3), 400.0, 50.0])
    assert [s.name for s in listed] == ["img_3"]
    scores = np.r_[_spread_scores(40), 300.0, 500.0, 400.0]
    listed = guard(scores)
    assert [s.name for s in listed] == ["img_41", "img_42", "img_40"]
    med = float(np.median(scores))
    assert [s.ratio for s in listed] == pytest.approx([500.0 / med, 400.0 / med, 300.0 / med], abs=1e-3)
    assert [s.z for s in listed] == pytest.approx(list(robust_z(scores)[[41, 42, 40]]), abs=0.01)
    assert listed[0].to_dict() == {"name": "img_41", "score": 500.0, "z": listed[0].z, "ratio": listed[0].ratio,
                                   "threshold": listed[0].threshold}  # as the manifest keeps it


def test_robust_z_is_in_mad_sigmas_of_the_log_score_with_a_floor_for_a_tight_set():
    from anomaly_service.contamination import MIN_SPREAD, robust_z

    scores = _spread_scores(101)
    logs = np.log(scores)
    mad = np.median(np.abs(logs - np.median(logs)))
    assert mad * 1.4826 > MIN_SPREAD  # a spread above the floor: divided by its own
    np.testing.assert_allclose(robust_z(scores / 1000.0), robust_z(scores))  # any units: distances below 1 too
    np.testing.assert_allclose(robust_z(scores), (logs - np.median(logs)) / (1.4826 * mad))
    # a set tighter than two fits of it differ: one image 1% above the rest is no outlier
    tight = np.r_[np.full(30, 50.0) * (1 + np.linspace(0, 1e-4, 30)), 50.5]
    z = robust_z(tight)[-1]
    assert z == pytest.approx(np.log(50.5 / np.median(tight)) / MIN_SPREAD) and z < 1


def test_the_threshold_is_set_without_the_plain_outliers_and_never_from_nothing():
    """contamination.py: the line's threshold is fitted on the leave-one-out scores without the images they alone
    mark as outliers; were every image one, on all of them."""
    from anomaly_service.contamination import threshold_sample

    scores = np.r_[_spread_scores(40), 5000.0, 60.0]
    names = [f"img_{i}" for i in range(len(scores))]
    left_out, kept = threshold_sample(scores, names, z=3.0)
    assert left_out == ["img_40"] and kept == [i for i in range(42) if i != 40]
    assert threshold_sample(scores[:40], names[:40], z=3.0) == ([], list(range(40)))
