import numpy as np
import pytest
from scipy.integrate import trapezoid

from anomaly_service.metrics import image_auroc, numbered_regions, pixel_auroc, pro_curve, pro_score


def test_perfect_and_inverted_maps():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    good = mask.astype(float)
    assert pro_score([good], [mask]) == pytest.approx(1.0)
    assert pixel_auroc([good], [mask]) == pytest.approx(1.0)
    assert pro_score([1 - good], [mask]) < 0.01


def test_pro_averages_regions_not_pixels():
    """A large region fully found and a small one missed give PRO 0.5, whatever their sizes."""
    mask = np.zeros((40, 40), bool)
    mask[0:20, 0:20] = True  # 400 px, detected
    mask[30:32, 30:32] = True  # 4 px, missed
    amap = np.zeros((40, 40))
    amap[0:20, 0:20] = 1.0
    fpr, pro = pro_curve([amap], [mask])
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def _brute_pro(maps, masks, limit=0.3, steps=4000):
    from scipy import ndimage

    s_all = np.concatenate([m.ravel() for m in maps])
    ths = np.linspace(s_all.max(), s_all.min() - 1e-9, steps)
    normal = np.concatenate([~m.ravel() for m in masks])
    regions = []
    for a, m in zip(maps, masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == i] for i in range(1, n + 1)]
    fprs = [(s_all[normal] > t).mean() for t in ths]
    pros = [np.mean([(r > t).mean() for r in regions]) for t in ths]
    fprs, pros = np.array([0.0] + fprs), np.array([0.0] + pros)
    keep = fprs <= limit
    return trapezoid(pros[keep], fprs[keep]) / limit


def _noisy_maps(seed: int, n: int, shape: tuple[int, int], box: tuple[int, int], lift: float,
                decimals: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` noise maps, each with one ``box``-sized defect at a random place, lifted by ``lift``; rounded to
    ``decimals`` (many ties) if given."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n):
        m = np.zeros(shape, bool)
        y, x = rng.integers(0, min(shape) - max(box), 2)
        m[y : y + box[0], x : x + box[1]] = True
        a = rng.normal(size=shape) + lift * m
        maps.append(a if decimals is None else np.round(a, decimals).astype(np.float32))
        masks.append(m)
    return maps, masks


def test_pro_matches_brute_force_threshold_sweep():
    maps, masks = _noisy_maps(0, 3, (30, 30), (6, 4), 1.5)
    assert pro_score(maps, masks) == pytest.approx(_brute_pro(maps, masks), abs=0.01)


def test_image_auroc():
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert np.isnan(image_auroc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_recall_at_fpr_reads_the_threshold_from_the_good_scores():
    import numpy as np

    from anomaly_service.evaluate import recall_at_fpr

    labels = np.array([0] * 100 + [1] * 10)
    good = np.arange(100, dtype=float)  # 0..99
    bad = np.array([98.5, 99.5, 120, 130, 140, 150, 160, 170, 180, 190.0])
    scores = np.r_[good, bad]
    assert recall_at_fpr(labels, scores, 0.0) == 0.9  # above every good: 99.5 and up
    assert recall_at_fpr(labels, scores, 0.02) == 1.0  # two goods may pass it: threshold 97
    assert recall_at_fpr(np.zeros(3), np.arange(3.0), 0.01) is None


def test_pixel_auroc_and_pro_curve_match_the_reference_computations_with_ties():
    """The sort-based pixel AUROC equals scikit-learn's ROC area, ties included; the PRO curve cut at the FPR limit
    is the full curve's beginning."""
    from sklearn.metrics import roc_auc_score

    maps, masks = _noisy_maps(3, 4, (40, 50), (7, 5), 1.0, decimals=1)  # rounded: many ties
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, pro = pro_curve(maps, masks)
    cut_fpr, cut_pro = pro_curve(maps, masks, fpr_limit=0.3)
    assert cut_fpr[-2] <= 0.3 < cut_fpr[-1] and cut_fpr.size < fpr.size
    np.testing.assert_array_equal(cut_fpr, fpr[: cut_fpr.size])
    np.testing.assert_array_equal(cut_pro, pro[: cut_pro.size])


def test_pixel_auroc_refuses_nan_maps():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 2:4] = True
    amap = np.arange(36, dtype=np.float32).reshape(6, 6)
    amap[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([amap], [mask])
    with pytest.raises(ValueError, match="NaN"):  # sorted above every score, a NaN read as found and as a false alarm
        pro_score([amap], [mask])


def test_regions_carried_through_a_resampling_stay_one_region_each():
    """A thin crack broken into pieces by a turn's nearest-neighbour resampling is still one region of the part:
    found on one piece only, it counts as half found, not as one of two regions wholly found."""
    crack = np.zeros((12, 12), bool)
    crack[5, 1:11] = True  # one crack on the upright part
    big = np.zeros((12, 12), bool)
    big[8:11, 1:4] = True
    regions = numbered_regions(crack | big)
    assert regions.dtype == np.int32 and regions.max() == 2
    broken = regions.copy()
    broken[5, 6] = 0  # the resampling drops a pixel: two pieces of one crack
    amap = np.zeros((12, 12), np.float32)
    amap[5, 1:6] = 1.0  # the left piece found, with the large region
    amap[8:11, 1:4] = 1.0
    # on its own pixels' connectivity the broken crack is two regions, one wholly found: (1 + 1 + 0) / 3
    assert pro_curve([amap], [broken > 0])[1][1] == pytest.approx(2 / 3)
    # carried as numbered: the crack is one region, five of its nine pixels found: (1 + 5/9) / 2
    assert pro_curve([amap], [broken > 0], regions=[broken])[1][1] == pytest.approx((1 + 5 / 9) / 2)
    assert pro_score([amap], [broken > 0], regions=[regions]) == pytest.approx(
        pro_score([amap], [crack | big]))  # unbroken, the same as the mask's own regions


def test_a_turn_keeps_each_region_number_where_it_moves_it():
    from anomaly_service.orientation import Turn

    rng = np.random.default_rng(0)
    image = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    mask = np.zeros((30, 40), bool)
    mask[3, 2:38] = True
    mask[20:25, 10:15] = True
    regions = numbered_regions(mask)
    for turn in (Turn(27.0), Turn(-63.0, True), Turn(90.0)):
        turned = turn.regions(regions, image)
        np.testing.assert_array_equal(turned > 0, turn.mask(mask, image))
        assert set(np.unique(turned)) <= {0, 1, 2}


def test_a_mask_stored_as_zero_and_one_is_read_as_its_defect(tmp_path):
    from PIL import Image

    from anomaly_service.evaluate import Sample, _load_mask

    values = np.zeros((10, 12), np.uint8)
    values[2:5, 3:7] = 1
    for scale, name in ((1, "ones.png"), (255, "full.png")):
        Image.fromarray(values * scale).save(tmp_path / name)
        sample = Sample(path=tmp_path / "image.png", label=1, defect_type="crack", mask_path=tmp_path / name)
        np.testing.assert_array_equal(_load_mask(sample, (10, 12)), values > 0)


def test_a_ground_truth_mask_s_erased_pixels_are_no_defect(tmp_path):
    """A defect drawn on a layer whose rest was erased leaves white under a transparent alpha (or under a palette's
    transparent index): that white read as defect over the whole photo, and pixel AUROC and PRO fell from the
    model's own to a coin's, silently. Only what an editor shows is the defect, as an inspection mask reads it."""
    from PIL import Image

    from anomaly_service.evaluate import Sample, _load_mask

    drawn = np.zeros((10, 12), bool)
    drawn[2:5, 3:7] = True
    rgba = np.full((10, 12, 4), 255, np.uint8)
    rgba[..., 3] = np.where(drawn, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "layer.png")
    palette = Image.fromarray(np.where(drawn, 1, 0).astype(np.uint8), "P")
    palette.putpalette([255, 255, 255, 255, 255, 255])
    palette.save(tmp_path / "palette.png", transparency=0)
    for name in ("layer.png", "palette.png"):
        sample = Sample(path=tmp_path / "image.png", label=1, defect_type="crack", mask_path=tmp_path / name)
        np.testing.assert_array_equal(_load_mask(sample, (10, 12)), drawn, err_msg=name)


def test_a_larger_mask_s_thin_defect_is_kept_at_the_photo_s_size(tmp_path):
    """A mask drawn at three times its photo's size (the photos shrunk, the masks not): a crack one pixel wide
    between the nearest samples vanished, and the mask was named as having nothing drawn on it. Each of the photo's
    pixels is defect where any mask pixel it covers is; a smaller mask is stretched as before."""
    from PIL import Image

    from anomaly_service.evaluate import Sample, _load_mask

    big = np.zeros((30, 36), np.uint8)
    big[6:18, 5] = 255  # the column nearest sampling by three skips
    Image.fromarray(big).save(tmp_path / "big.png")
    expected = np.zeros((10, 12), bool)
    expected[2:6, 1] = True
    sample = Sample(path=tmp_path / "image.png", label=1, defect_type="crack", mask_path=tmp_path / "big.png")
    np.testing.assert_array_equal(_load_mask(sample, (10, 12)), expected)
    Image.fromarray(expected.astype(np.uint8) * 255).save(tmp_path / "small.png")
    sample = Sample(path=tmp_path / "image.png", label=1, defect_type="crack", mask_path=tmp_path / "small.png")
    np.testing.assert_array_equal(_load_mask(sample, (30, 36)), np.kron(expected, np.ones((3, 3), bool)))


def test_a_split_with_one_kind_of_image_or_pixel_has_no_auroc_or_pro():
    """A test split of good parts only (or defects only) has no ranking to measure: NaN, which evaluate reports as
    such, not an error from scikit-learn."""
    clean = [np.zeros((8, 8), bool)] * 2
    maps = [np.random.default_rng(0).random((8, 8)) for _ in range(2)]
    assert np.isnan(image_auroc([0, 0, 0], [0.1, 0.5, 0.2])) and np.isnan(image_auroc([1, 1], [0.1, 0.5]))
    assert np.isnan(pixel_auroc(maps, clean)) and np.isnan(pixel_auroc(maps, [np.ones((8, 8), bool)] * 2))
    assert np.isnan(pro_score(maps, clean))
    assert [list(c) for c in pro_curve(maps, clean)] == [[0.0, 1.0], [0.0, 0.0]]


def test_the_full_pro_curve_runs_from_nothing_to_everything_above_the_threshold():
    maps, masks = _noisy_maps(3, 2, (20, 20), (5, 5), 1.0)
    fpr, pro = pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == pytest.approx((1.0, 1.0))
    assert (np.diff(fpr) >= 0).all() and (np.diff(pro) >= 0).all()


def test_the_image_roc_runs_from_no_false_alarm_to_every_defect_found():
    from anomaly_service.metrics import image_roc

    fpr, tpr = image_roc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and 1.0 in tpr[fpr == 0.0]  # separated: every defect at no false alarm


def test_pro_up_to_the_limit_interpolates_the_curve_where_it_crosses_it():
    """Worked by hand: four normal pixels (1, 2, 3, 4) and one region of two (3.5, 3.0). The curve goes (0, 0),
    (0.25, 0), (0.25, 0.5), (0.5, 1.0); at FPR 0.3 it reads 0.6, so the area up to 0.3 is (0.5 + 0.6) / 2 * 0.05,
    0.0275, and PRO is that over 0.3. The brute-force sweep's tolerance could not tell this last piece."""
    amap = np.array([[1.0, 2.0, 3.0, 4.0, 3.5, 3.0]], np.float32)
    mask = np.array([[0, 0, 0, 0, 1, 1]], bool)
    fpr, pro = pro_curve([amap], [mask], fpr_limit=0.3)
    np.testing.assert_allclose(fpr, [0.0, 0.25, 0.25, 0.5])
    np.testing.assert_allclose(pro, [0.0, 0.0, 0.5, 1.0])
    assert pro_score([amap], [mask]) == pytest.approx(0.0275 / 0.3)
    # an image without a defect among them adds its normal pixels, not a region
    clean = np.zeros((20, 20), bool)
    block = clean.copy()
    block[5:10, 5:10] = True
    assert pro_score([block.astype(float), np.zeros((20, 20))], [block, clean]) == pytest.approx(1.0)



def _peak_bytes(fn, *args):
    """The peak of what numpy allocates while ``fn(*args)`` runs (tracemalloc traces numpy's buffers)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return fn(*args), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_pixel_metrics_copy_a_validation_sets_pixels_once():
    """A validation set of megapixel photos holds gigabytes of maps. pixel AUROC concatenated every map, cast the
    copy, split it and sorted copies of each side, about 13 bytes a pixel beside the maps: each side is now filled
    into one array and sorted in place. PRO copied each map's normal pixels before concatenating and sorting them,
    and built its curve (a threshold for each of up to 30% of them) through whole-curve temporaries and copies,
    about 19: now 12. The values are as before (scikit-learn's AUROC here; PRO's brute-force tests above)."""
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for i in range(8):
        m = rng.random((256, 512), dtype=np.float32)
        mask = np.zeros(m.shape, bool)
        if i % 2:
            mask[100:140, 200:260] = True
            m[mask] += 0.3
        maps.append(m)
        masks.append(mask)
    pixels = sum(m.size for m in maps)
    auroc, peak = _peak_bytes(pixel_auroc, maps, masks)
    assert peak < 6 * pixels, f"{peak / pixels:.1f} bytes a pixel"
    from sklearn.metrics import roc_auc_score

    flat_y = np.concatenate([k.ravel() for k in masks])
    assert auroc == pytest.approx(roc_auc_score(flat_y, np.concatenate([m.ravel() for m in maps])), abs=1e-12)
    (fpr, pro), peak = _peak_bytes(pro_curve, maps, masks, 0.3)
    assert fpr[-1] > 0.3 and 0.5 < pro[-1] < 0.7  # a lift of 0.3 over uniform noise: 0.6 at 30% false positives
    assert peak < 14 * pixels, f"PRO: {peak / pixels:.1f} bytes a pixel"


def _exact_pro_curve(maps, masks, fpr_limit=None):
    """PRO's curve by its definition, one threshold at a time: at every distinct score from high to low, the share
    of all normal pixels at or above it and the mean over 8-connected regions of each one's share at or above it;
    cut after the first point past ``fpr_limit``."""
    from scipy import ndimage

    normal = np.concatenate([np.asarray(a, np.float32)[~m].ravel() for a, m in zip(maps, masks)])
    regions = []
    for a, m in zip(maps, masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [np.asarray(a, np.float32)[labelled == i] for i in range(1, n + 1)]
    every = np.concatenate([np.asarray(a, np.float32).ravel() for a in maps])
    fpr, pro = [0.0], [0.0]
    for t in sorted(set(every.tolist()), reverse=True):
        fpr.append(float((normal >= t).mean()))
        pro.append(float(np.mean([(r >= t).mean() for r in regions])))
        if fpr_limit is not None and fpr[-1] > fpr_limit:
            break
    return np.array(fpr), np.array(pro)


def _area_up_to(fpr, pro, limit):
    """The area under a piecewise-linear curve from 0 to ``limit``, segment by segment, the segment that crosses
    the limit cut where it crosses it."""
    area = 0.0
    for x1, x2, y1, y2 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:]):
        if x1 >= limit:
            break
        if x2 <= limit:
            area += (x2 - x1) * (y1 + y2) / 2
        else:
            y = y1 + (y2 - y1) * (limit - x1) / (x2 - x1)
            area += (limit - x1) * (y1 + y) / 2
    return area / limit


def _tie_cases():
    """Maps rounded to one decimal (many ties, at the limit too), and a hand case whose lowest score is a defect
    pixel's, below every normal one."""
    yield _noisy_maps(5, 3, (12, 14), (4, 3), 0.8, decimals=1)
    yield _noisy_maps(6, 2, (9, 9), (3, 5), 2.0, decimals=0)
    low = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 2.5, 4.5]], np.float32)  # the defect's 0.0 lowest of all
    yield [low], [np.array([[0, 0, 0, 0, 0, 1, 1, 1]], bool)]


@pytest.mark.parametrize("case", range(3))
def test_the_pro_curve_equals_its_definition_at_every_threshold_ties_included(case):
    """Every point of the curve, whole and cut at a limit, against the definition computed threshold by threshold:
    no threshold missing (the lowest defect pixel's included, so the whole curve ends with every region found) and
    none twice (ties)."""
    maps, masks = list(_tie_cases())[case]
    fpr, pro = pro_curve(maps, masks)
    want_fpr, want_pro = _exact_pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, want_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, want_pro, atol=1e-12)
    assert (fpr[-1], pro[-1]) == pytest.approx((1.0, 1.0))
    for limit in (0.05, 0.3):  # at 1.0 no point lies past it: the cut curve may end at FPR 1 sooner (same area)
        cut = pro_curve(maps, masks, fpr_limit=limit)
        want = _exact_pro_curve(maps, masks, fpr_limit=limit)
        np.testing.assert_allclose(cut[0], want[0], atol=1e-12)
        np.testing.assert_allclose(cut[1], want[1], atol=1e-12)


@pytest.mark.parametrize("case", range(3))
def test_pro_is_the_curves_area_up_to_its_limit_over_the_limit(case):
    """PRO at the MVTec AD limit of 0.3, at a tight one and over the whole curve, against the area of the defined
    curve cut at the limit segment by segment."""
    maps, masks = list(_tie_cases())[case]
    for limit in (0.05, 0.3, 1.0):
        want = _area_up_to(*_exact_pro_curve(maps, masks), limit)
        assert pro_score(maps, masks, fpr_limit=limit) == pytest.approx(want, abs=1e-12), limit


def test_a_single_defect_or_normal_pixel_is_measured():
    """A defect of one pixel (or a split with one normal pixel) has a ranking like any other: pixel AUROC against
    scikit-learn's, PRO's curve against its definition."""
    from sklearn.metrics import roc_auc_score

    amap = np.array([[0.1, 0.4, 0.3, 0.9, 0.2]], np.float32)
    for mask in (np.array([[0, 0, 1, 0, 0]], bool), np.array([[1, 1, 0, 1, 1]], bool)):
        assert pixel_auroc([amap], [mask]) == pytest.approx(roc_auc_score(mask.ravel(), amap.ravel()), abs=1e-12)
        fpr, pro = pro_curve([amap], [mask])
        want_fpr, want_pro = _exact_pro_curve([amap], [mask])
        np.testing.assert_allclose(fpr, want_fpr, atol=1e-12)
        np.testing.assert_allclose(pro, want_pro, atol=1e-12)


def test_a_split_without_a_ranking_says_nan_without_a_warning():
    """NaN is the answer evaluate reports for a split of one kind; it comes from the checks, not from scikit-learn's
    warning or numpy's 0/0 printed into a user's evaluate run."""
    import warnings

    maps = [np.random.default_rng(1).random((6, 6))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(image_auroc(np.array([0, 0, 0]), np.array([0.1, 0.5, 0.2])))
        assert np.isnan(pixel_auroc(maps, [np.zeros((6, 6), bool)]))
        assert np.isnan(pixel_auroc(maps, [np.ones((6, 6), bool)]))


def test_a_region_on_the_border_and_one_joined_only_at_a_corner_are_one_region_each():
    """8-connectivity as MVTec AD counts regions: pixels that touch at a corner are one region, and a region on the
    frame's edge is not cut by it."""
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal from the corner
    mask[3:6, 5] = True  # along the right edge
    regions = numbered_regions(mask)
    assert regions.max() == 2 and len(set(regions[mask].tolist())) == 2
    assert regions[0, 0] == regions[2, 2] != regions[5, 5]


def test_recall_at_fpr_at_a_rate_between_counts_with_one_good_and_a_defect_at_the_threshold():
    """The rate allows a whole number of good images above the threshold, rounded down (5% of 30 goods is one, not
    two, which would be 6.7%); one good image is a measurement; a defect scoring exactly the threshold passes, as
    the good image there does."""
    from anomaly_service.evaluate import recall_at_fpr

    goods = np.arange(30, dtype=float)  # 0..29
    bad = np.array([27.5, 28.5, 40.0])
    labels, scores = np.r_[np.zeros(30), np.ones(3)], np.r_[goods, bad]
    assert recall_at_fpr(labels, scores, 0.05) == pytest.approx(2 / 3)  # threshold 28: one good above it
    assert recall_at_fpr(np.array([0, 1, 1]), np.array([1.0, 0.5, 2.0]), 0.0) == 0.5
    assert recall_at_fpr(np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 2.0, 3.0]), 0.0) == 0.5  # 2.0 passes


def _mask_sample(tmp_path, values: np.ndarray | None, label: int = 1, name: str = "m.png"):
    from PIL import Image

    from anomaly_service.evaluate import Sample

    path = None
    if values is not None:
        path = tmp_path / name
        Image.fromarray(values).save(path)
    return Sample(path=tmp_path / "image.png", label=label, defect_type="good" if label == 0 else "crack",
                  mask_path=path)


def test_a_good_images_truth_is_all_normal_pixels_of_its_frame(tmp_path):
    """A good image has no mask file: its pixels are normal ones, counted in pixel AUROC's and PRO's false-positive
    rate (as in MVTec AD), not left out."""
    from anomaly_service.evaluate import _load_mask

    truth = _load_mask(_mask_sample(tmp_path, None, label=0), (7, 9))
    assert truth is not None and truth.shape == (7, 9) and not truth.any()
    assert _load_mask(_mask_sample(tmp_path, None), (7, 9)) is None  # a defect without a mask: not known


def test_a_masks_soft_edge_is_defect_above_half_its_maximum(tmp_path):
    """A mask drawn with smoothed edges: a pixel above half the mask's brightest is defect, one below is not (not
    every pixel above zero, nor above a third)."""
    from anomaly_service.evaluate import _load_mask

    values = np.array([[0, 60, 100, 130, 200, 255]], np.uint8)
    np.testing.assert_array_equal(_load_mask(_mask_sample(tmp_path, values), (1, 6)), values > 127.5)
    even = np.array([[0, 127, 254]], np.uint8)  # exactly half of the brightest: not over it
    np.testing.assert_array_equal(_load_mask(_mask_sample(tmp_path, even, name="even.png"), (1, 3)), [[0, 0, 1]])
    np.testing.assert_array_equal(_load_mask(_mask_sample(tmp_path, np.zeros((2, 3), np.uint8)), (2, 3)),
                                  np.zeros((2, 3), bool))


def test_a_mask_saved_at_half_the_size_is_read_on_its_images_frame(tmp_path):
    """A scaled copy of the frame (width and height both halved, a frame that is not square) is read at the image's
    size, its defect where it lies on the image; a mask that does not decode is refused by name."""
    from anomaly_service.errors import ConfigError
    from anomaly_service.evaluate import _load_mask

    half = np.zeros((5, 8), np.uint8)  # 8 wide, 5 high
    half[1:3, 5:7] = 255
    truth = _load_mask(_mask_sample(tmp_path, half), (10, 16))
    want = np.zeros((10, 16), bool)
    want[2:6, 10:14] = True
    np.testing.assert_array_equal(truth, want)
    square = _mask_sample(tmp_path, np.zeros((16, 16), np.uint8), name="square.png")  # as wide, but square
    with pytest.raises(ConfigError, match="square.png is 16x16 but its image image.png is 16x10: not the same frame"):
        _load_mask(square, (10, 16))
    broken = _mask_sample(tmp_path, None)
    broken.mask_path = tmp_path / "broken.png"
    broken.mask_path.write_bytes(b"not a picture")
    with pytest.raises(ConfigError, match="broken.png cannot be read"):
        _load_mask(broken, (10, 16))


def test_a_defect_type_without_a_ground_truth_folder_has_no_masks(tmp_path):
    """Masks are optional: a defect folder with no ground_truth/<type> beside it lists its images without masks
    (their pixel metrics left out), where another type's masks are found."""
    from PIL import Image

    from anomaly_service.evaluate import list_category

    pixel = Image.fromarray(np.zeros((4, 4), np.uint8))
    for sub in ("test/good", "test/crack", "test/dent", "ground_truth/crack"):
        (tmp_path / sub).mkdir(parents=True)
    for sub in ("test/good/0.png", "test/crack/0.png", "test/dent/0.png", "ground_truth/crack/0_mask.png"):
        pixel.save(tmp_path / sub)
    masks = {s.defect_type: s.mask_path for s in list_category(tmp_path).samples}
    assert masks == {"good": None, "crack": tmp_path / "ground_truth/crack/0_mask.png", "dent": None}
