import numpy as np
import pytest
import torch

from anomaly_service.coreset import coreset_size, greedy_coreset


def _reference_greedy(x: np.ndarray, n: int, start: int) -> list[int]:
    """Textbook k-center greedy with explicit distances, for comparison."""
    chosen = [start]
    d = np.linalg.norm(x - x[start], axis=1)
    for _ in range(n - 1):
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(x - x[i], axis=1))
    return chosen


def test_matches_textbook_greedy_without_projection():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)).double()
    ids = greedy_coreset(x, 40, proj_dim=0, seed=5, progress=False)
    assert ids.tolist() == _reference_greedy(x.numpy(), 40, int(ids[0]))


def _radius(x: np.ndarray, ids: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(x[:, None, :] - x[ids][None], axis=2), axis=1).max())


def test_projected_greedy_covers_better_than_random():
    rng = np.random.default_rng(0)
    # clustered data with a few outliers: greedy must pick the outliers, random rarely does
    outliers = rng.normal(0, 1, (5, 256)) + 60.0 * np.eye(256)[:5]  # each far from everything else
    x = np.concatenate([rng.normal(0, 1, (1500, 256)), outliers]).astype(np.float32)
    ids = greedy_coreset(torch.from_numpy(x), 50, proj_dim=64, seed=0, progress=False)
    assert len(set(ids.tolist())) == 50
    assert set(range(1500, 1505)) <= set(ids.tolist())
    assert _radius(x, ids) < _radius(x, rng.choice(len(x), 50, replace=False))


def test_sizes_and_determinism():
    assert coreset_size(1000, 0.1) == 100 and coreset_size(1000, 0.1, max_size=30) == 30 and coreset_size(5, 1.0) == 5
    x = torch.randn(300, 32)
    assert (greedy_coreset(x, 20, seed=1, progress=False) == greedy_coreset(x, 20, seed=1, progress=False)).all()
    assert greedy_coreset(x, 400, progress=False).tolist() == list(range(300))


def test_pruned_greedy_selects_exactly_what_dense_greedy_does():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (30, 24))
    x = torch.from_numpy((centres[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 24))).astype(np.float32))
    dense = greedy_coreset(x, 300, proj_dim=0, seed=2, progress=False, method="dense")
    pruned = greedy_coreset(x, 300, proj_dim=0, seed=2, progress=False, method="pruned")
    assert dense.tolist() == pruned.tolist()


def test_pruned_greedy_matches_dense_on_a_texture_like_bank():
    """Patches spread over many directions (a texture): the bound uses a few principal axes and must still never
    skip a patch whose distance would shrink. ``dense_fraction=1`` keeps every step on the bounded path,
    however many patches survive the bound."""
    from tqdm import tqdm

    from anomaly_service.coreset import _greedy_pruned

    rng = np.random.default_rng(3)
    scales = 1.0 / np.sqrt(np.arange(1, 65))
    x = (rng.normal(size=(5000, 64)) * scales).astype(np.float32)
    x -= x.mean(0)
    dense = greedy_coreset(torch.from_numpy(x), 400, proj_dim=0, seed=4, progress=False, method="dense")
    pruned = _greedy_pruned(x, 400, int(dense[0]), tqdm(disable=True))
    assert dense.tolist() == pruned.tolist()


def _object_like_bank(n: int = 8000, d: int = 32, seed: int = 8) -> np.ndarray:
    """Patches of an object on a background: tight groups along a few directions, as the leaves' boxes like."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (40, 4)) @ rng.normal(size=(4, d))
    x = centres[rng.integers(0, 40, n)] + rng.normal(scale=0.3, size=(n, d))
    return (x - x.mean(0)).astype(np.float32)


def test_leaf_bound_skips_leaves_and_selects_what_dense_greedy_does():
    """On an object-like bank most leaves are ruled out by their boxes, and the selection is still the textbook
    greedy's (in float64: float32's expanded distances of the dense path already part from it at a near-tie
    here): a leaf skipped wrongly, or a farthest patch missed in a skipped leaf, would change it."""
    from tqdm import tqdm

    from anomaly_service import coreset

    x = _object_like_bank()
    dense = np.array(_reference_greedy(x.astype(np.float64), 600, 7845))
    coords, sq = coreset._bound_numbers(x, coreset._bound_basis(x))
    order, starts = coreset._leaves(coords, 16)
    assert len(starts) - 1 >= 8000 // 16 and (np.sort(order) == np.arange(8000)).all()
    from anomaly_service.coreset_kernel import greedy_steps

    ordered, sq = coords[order], sq[order]
    min_sq = np.full(8000, np.inf, dtype=np.float32)
    lo, hi = np.minimum.reduceat(ordered, starts[:-1]), np.maximum.reduceat(ordered, starts[:-1])
    max_sq, chosen = np.full(len(starts) - 1, np.inf, dtype=np.float32), np.empty(600, dtype=np.int64)
    cur = int(np.flatnonzero(order == dense[0])[0])
    took, cur, bounded = greedy_steps(x[order], order, starts, ordered, sq, min_sq, lo, hi, max_sq, chosen, 0, 600,
                                      cur, -np.inf, 1e-4 * float(sq.max()))
    assert took == 600 and chosen.tolist() == dense.tolist()
    assert bounded < 0.25 * 600 * 8000  # the boxes ruled out most leaves
    assert coreset._greedy_pruned(x, 600, int(dense[0]), tqdm(disable=True)).tolist() == dense.tolist()


def test_texture_hands_over_to_the_bank_wide_product_and_still_matches(monkeypatch):
    """Where the leaves' boxes rule out little (a texture), the greedy continues with one product a step over
    every patch from where the compiled loop stopped; the selection across that hand-over is the dense one's."""
    from anomaly_service import coreset

    rng = np.random.default_rng(9)
    x = (rng.normal(size=(4000, 48)) / np.sqrt(np.arange(1, 49))).astype(np.float32)
    x -= x.mean(0)
    dense = greedy_coreset(torch.from_numpy(x), 700, proj_dim=0, seed=3, progress=False, method="dense")
    handed = []
    original = coreset._greedy_products
    monkeypatch.setattr(coreset, "_greedy_products", lambda *a, **kw: handed.append(1) or original(*a, **kw))
    monkeypatch.setattr(coreset, "LEAF_SHARE", 0.0)  # hand over after the first two slices, whatever the bank
    assert coreset._greedy_pruned(x, 700, int(dense[0])).tolist() == dense.tolist()
    assert handed == [1]


def _reference_continuation(c: np.ndarray, min_sq: np.ndarray, limit: float) -> list[int]:
    """Textbook greedy continued from squared distances ``min_sq`` to a chosen set, until all lie within
    ``limit``, with explicit float64 distances, for comparison."""
    c64, d = c.astype(np.float64), min_sq.astype(np.float64)
    chosen = []
    while d.max() > limit:
        j = int(np.argmax(d))
        chosen.append(j)
        d = np.minimum(d, ((c64 - c64[j]) ** 2).sum(1))
    return chosen


def test_continued_greedy_matches_the_dense_continuation():
    """Updates and streamed chunks continue a greedy from given distances and stop at a radius; the bounded
    continuation picks what the plain one does."""
    from anomaly_service.coreset import _greedy_until

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(3000, 48)) / np.sqrt(np.arange(1, 49))).astype(np.float32)
    chosen, c = x[:200], np.ascontiguousarray(x[200:])
    min_sq = ((c[:, None, :] - chosen[None]) ** 2).sum(-1).min(1).astype(np.float32)
    limit = float(np.quantile(min_sq, 0.5)) / 2
    expected = _reference_continuation(c, min_sq, limit)
    got = _greedy_until(c, min_sq, limit)
    assert got.tolist() == expected and len(expected) > 50


def test_continued_greedy_from_an_offset_with_unreached_rows():
    """A streamed chunk's candidates come offset by the first chunk's centre, and rows with no neighbour in the
    probed lists carry FLT_MAX: the continuation still picks what the plain one does."""
    from anomaly_service.coreset import _greedy_until

    rng = np.random.default_rng(6)
    c = (rng.normal(size=(2000, 32)) / np.sqrt(np.arange(1, 33)) + 30.0).astype(np.float32)
    chosen = c[:100] + rng.normal(scale=0.1, size=(100, 32)).astype(np.float32)
    min_sq = ((c[:, None, :] - chosen[None]) ** 2).sum(-1).min(1).astype(np.float32)
    min_sq[[7, 500, 1500]] = np.finfo(np.float32).max
    limit = float(np.quantile(min_sq, 0.3))
    expected = _reference_continuation(c, min_sq, limit)
    got = _greedy_until(c, min_sq, limit).tolist()
    assert got[0] in (7, 500, 1500)  # an unreached row is the farthest of all
    assert got == expected and len(expected) > 100


def test_continued_greedy_stops_at_the_radius_inclusive():
    """A candidate exactly at the radius counts as covered (as every update relies on): nothing is added."""
    from anomaly_service.coreset import _greedy_until

    c = np.random.default_rng(7).normal(size=(300, 16)).astype(np.float32)
    min_sq = np.linspace(0.5, 4.0, 300).astype(np.float32)
    assert _greedy_until(c, min_sq, float(min_sq.max())).tolist() == []
    assert _greedy_until(c, min_sq, float(min_sq.max()) * 0.999).tolist()[:1] == [299]



def test_coreset_size_rounds_a_ratio_up_and_keeps_one_at_least():
    assert coreset_size(1001, 0.1) == 101 and coreset_size(1000, 0.0105) == 11  # never fewer than the ratio asks
    assert coreset_size(10, 0.01) == 1 and coreset_size(10, 0.01, max_size=5) == 1


def test_the_projection_is_the_seeded_gaussian_one_that_keeps_distances_on_average():
    """Johnson-Lindenstrauss as the paper uses it: a seeded Gaussian matrix scaled by one over the root of its width,
    so squared norms keep their size on average (the coverage radius, recorded and read by updates, is in these
    units); every row projected; a bank no wider than the projection is left as it is."""
    from anomaly_service.coreset import random_projection

    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    want = x @ (torch.randn(256, 64, generator=g) / 8.0)
    got = random_projection(x, 64, 7, chunk=100)
    assert got.shape == (300, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ratio = float((got**2).sum() / (x**2).sum())
    assert 0.8 < ratio < 1.2
    square = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(random_projection(square, 64, 7), square)


def test_the_sampler_keeps_the_greedy_k_center_of_its_ratio_in_the_projected_space():
    """The bank's sampler against the textbook greedy run on the same projection: the ratio's count (or the size
    asked), the same rows in the same order; the radius it records is the last row's distance to the rows before
    it, every patch lies within it, and a bank alone gives it back; what it writes in the manifest."""
    from anomaly_service.coreset import GreedyCoresetSampler, random_projection

    rng = np.random.default_rng(3)
    bank = torch.from_numpy(rng.normal(size=(400, 160)).astype(np.float32))
    sampler = GreedyCoresetSampler(0.05, proj_dim=32, seed=4, progress=False)
    ids = sampler.sample(bank)
    projected = random_projection(bank, 32, 4).double().numpy()
    assert len(ids) == 20 and ids.tolist() == _reference_greedy(projected, 20, int(ids[0]))
    assert sampler.sample(bank, size=7).tolist() == ids[:7].tolist() and len(sampler.sample(bank, size=900)) == 400
    radius = sampler.coverage_radius(bank[ids])
    chosen = projected[ids]
    assert radius == pytest.approx(np.linalg.norm(chosen[:-1] - chosen[-1], axis=1).min(), rel=1e-5)
    nearest = np.linalg.norm(projected[:, None] - chosen[None], axis=2).min(axis=1)
    assert nearest.max() <= radius * (1 + 1e-5)
    assert sampler.radius_from_bank(bank[ids]) == pytest.approx(radius, rel=1e-4)
    assert sampler.describe() == {"ratio": 0.05, "projection_dim": 32}


def test_the_sampler_extends_a_bank_until_every_new_patch_is_within_its_radius():
    """An update's candidates: those within the radius of the bank add nothing; the rest are added, farthest first,
    until every candidate lies within the radius of the grown bank (in the projected, centred space)."""
    from anomaly_service.coreset import GreedyCoresetSampler, random_projection

    rng = np.random.default_rng(5)
    bank = torch.from_numpy(rng.normal(size=(200, 48)).astype(np.float32))
    sampler = GreedyCoresetSampler(0.25, proj_dim=16, seed=0, progress=False)
    kept = bank[sampler.sample(bank)]
    radius = sampler.coverage_radius(kept)
    assert len(sampler.extend(kept, bank[:50], radius)) == 0  # the fit's own patches are covered
    near = bank[50:65] + 1e-3
    far = torch.cat([near, torch.from_numpy(rng.normal(size=(15, 48)).astype(np.float32) * 3.0)])
    added = sampler.extend(kept, far, radius)
    assert len(added) and set(added.tolist()) <= set(range(15, 30))  # the fit's patches, nudged, stay out
    both = random_projection(torch.cat([kept, far]), 16, 0).double().numpy()
    grown = np.concatenate([both[: len(kept)], both[len(kept):][added]])
    nearest = np.linalg.norm(both[len(kept):, None] - grown[None], axis=2).min(axis=1)
    assert nearest.max() <= radius * (1 + 2e-3)
    first = np.linalg.norm(both[len(kept):, None] - both[None, : len(kept)], axis=2).min(axis=1)
    assert added[0] == int(np.argmax(first))  # the farthest candidate first


def test_a_bank_far_from_the_origin_selects_what_the_textbook_greedy_does():
    """Distances do not move under a common offset; the greedy centres the rows so that float32's expanded distances
    keep their digits on a bank far from zero (features after a ReLU all sit on one side)."""
    base = torch.randn(800, 16, generator=torch.Generator().manual_seed(6)).double()
    for method in ("pruned", "dense"):  # the CPU's greedy and the GPU's
        ids = greedy_coreset((base + 3000.0).float(), 40, proj_dim=0, seed=5, progress=False, method=method)
        assert ids.tolist() == _reference_greedy(base.numpy(), 40, int(ids[0])), method
    with pytest.raises(ValueError, match="unknown coreset method"):
        greedy_coreset(base.float(), 4, proj_dim=0, progress=False, method="random")


def test_the_dense_greedy_on_a_bank_of_small_distances_selects_what_the_textbook_greedy_does():
    """The GPU's dense greedy clamps rounding below zero only: on features whose distances are all well under one it
    still picks the farthest patch."""
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(8)).double() * 0.01
    ids = greedy_coreset(x.float(), 25, proj_dim=0, seed=3, progress=False, method="dense")
    assert ids.tolist() == _reference_greedy(x.numpy(), 25, int(ids[0]))


def test_the_bank_wide_products_bounded_path_selects_what_the_textbook_greedy_does():
    """After the hand-over, a step that bounds few patches computes only their distances (``dense_fraction=1``
    keeps every step on that path): the textbook greedy's picks, in order; the continuation stops at a centre
    exactly at its limit (inclusive), and its two-row radius is the rows' distance."""
    from anomaly_service import coreset

    rng = np.random.default_rng(13)
    x = (rng.normal(size=(1500, 40)) / np.sqrt(np.arange(1, 41))).astype(np.float32)
    x -= x.mean(0)
    x64 = x.astype(np.float64)
    picks, reach = [11], []
    d = ((x64 - x64[11]) ** 2).sum(1)
    for _ in range(119):
        picks.append(int(np.argmax(d)))
        reach.append(float(d.max()))
        d = np.minimum(d, ((x64 - x64[picks[-1]]) ** 2).sum(1))

    def run(limit: float) -> tuple[int, list[int]]:
        coords, sq = coreset._bound_numbers(x, coreset._bound_basis(x))
        k = coords.shape[1] - 1
        rows = np.empty((k + 2, len(x)), dtype=np.float32)
        rows[: k + 1] = coords.T
        selected = np.empty(120, dtype=np.int64)
        took = coreset._greedy_products(x, rows, sq, np.full(len(x), np.inf, np.float32), selected, 11, limit,
                                        1e-4 * float(sq.max()), None, dense_fraction=1.0)
        return took, selected[:took].tolist()

    assert run(-np.inf) == (120, picks)
    limit = float(np.float32(reach[79]))  # the 81st pick's squared distance, as the loop holds it
    took, got = run(limit)
    assert took == 80 and got == picks[:80]
    assert coreset.coverage_radius(torch.from_numpy(x[[3, 9]]), proj_dim=0) == pytest.approx(
        float(np.linalg.norm(x64[3] - x64[9])), rel=1e-6)


def test_a_bank_that_keeps_every_patch_adds_exactly_the_new_ones():
    """Radius 0 (coreset ratio 1): an update adds every candidate not already a bank row, in order, and none that
    is; no candidates, nothing; at most ``most`` rows when a cap is given."""
    from anomaly_service.coreset import _greedy_until, extend_coreset

    rng = np.random.default_rng(15)
    bank = torch.from_numpy(rng.normal(size=(60, 24)).astype(np.float32))
    new = torch.from_numpy(rng.normal(size=(5, 24)).astype(np.float32) * 0.01)  # rows the bank does not hold
    candidates = torch.cat([bank[[3, 7]], new[:2], bank[[20]], new[2:]])
    assert extend_coreset(bank, candidates, 0.0, proj_dim=16).tolist() == [2, 3, 5, 6, 7]
    assert extend_coreset(bank, candidates[:0], 0.0).tolist() == []
    min_sq = np.array([0.0, 2.0, 0.0, 5.0, 1.0], np.float32)
    c = rng.normal(size=(5, 4)).astype(np.float32)
    assert _greedy_until(c, min_sq, 0.0).tolist() == [1, 3, 4]
    assert _greedy_until(c, min_sq, 0.0, most=2).tolist() == [1, 3]
    assert _greedy_until(c, min_sq, 0.5, most=0).tolist() == []
    assert _greedy_until(c, min_sq, 0.5, most=1).tolist() == [3]  # the farthest


def test_a_streamed_cover_adds_only_what_lies_beyond_its_radius_and_then_holds_it():
    """A streamed fit's later chunk: patches within the radius of the cover add nothing; the others are added until
    every patch of the chunk is within it (checked by brute force in the projected space), at most ``most`` of them;
    added, they cover themselves the next time."""
    from anomaly_service.coreset import StreamingCover, random_projection

    rng = np.random.default_rng(16)
    first = torch.from_numpy(rng.normal(size=(400, 24)).astype(np.float32) + 4.0)  # features sit off the origin
    cover = StreamingCover(first, radius=1.5, proj_dim=16, seed=0)
    assert len(cover.extend(first[:100] + 0.001)) == 0
    chunk = torch.from_numpy(rng.normal(size=(80, 24)).astype(np.float32) * 2.0 + 7.0)
    capped = cover.copy().extend(chunk, most=3)
    assert len(capped) == 3
    added = cover.extend(chunk)
    assert len(added) > 3 and capped.tolist() == added[:3].tolist()
    both = random_projection(torch.cat([first, chunk]), 16, 0).double().numpy()
    held = np.concatenate([both[:400], both[400:][added]])
    nearest = np.sqrt(((both[400:, None] - held[None]) ** 2).sum(-1).min(axis=1))
    assert nearest.max() <= 1.5 * (1 + 2e-3)
    assert len(cover.extend(chunk)) == 0
