import numpy as np
import pytest
import torch

from anomaly_service.errors import ConfigError
from anomaly_service.selection import KeepAll, StdSelector, channel_std, make_selector, n_keep


def test_n_keep_fraction_and_count():
    assert n_keep(100, 0.5) == 50 and n_keep(100, 1.0) == 100 and n_keep(100, 30) == 30 and n_keep(10, 64) == 10
    with pytest.raises(ConfigError):
        n_keep(10, 0)


def test_std_keeps_the_most_varying_dimensions():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.01, 4.0])
    x = torch.randn(5000, 6, generator=g) * scales + 100.0  # large offset: std must be shift-invariant
    assert StdSelector(3).select(x).tolist() == [1, 3, 5]
    assert StdSelector(0.5).select(x).tolist() == [1, 3, 5]
    np.testing.assert_allclose(channel_std(x, chunk=777).numpy(), x.std(0).numpy(), rtol=1e-3)


def test_none_keeps_everything_and_unknown_modes_fail():
    x = torch.randn(100, 20)
    assert KeepAll().select(x).tolist() == list(range(20))
    assert isinstance(make_selector("none", 0.5), KeepAll) and isinstance(make_selector("std", 0.5), StdSelector)
    with pytest.raises(ConfigError):
        make_selector("random", 0.5)  # an ablation control, not a product option (benchmarks/quality.py has it)


def test_n_keep_reads_a_fraction_up_to_one_and_a_count_above_it():
    """A tiny fraction still keeps one dimension; 2 is a count of two, not twice every dimension."""
    assert n_keep(100, 0.001) == 1 and n_keep(100, 0.004) == 1 and n_keep(100, 0.006) == 1
    assert n_keep(10, 2) == 2 and n_keep(10, 1.5) == 1 and n_keep(10, 0.25) == 2  # 2.5 rounds to even


def test_channel_std_is_the_sample_standard_deviation_exactly():
    """Each dimension's standard deviation (n - 1 in the denominator) to float rounding, against numpy's in float64:
    on two and three rows, where the denominator alone moves it by half; on a bank whose rows after the first
    thousand (later photos) sit at another level, which the shift taken from the first rows must not bias; and far
    from zero, where a sum of squares without the shift loses every digit."""
    rng = np.random.default_rng(0)
    level = rng.normal(size=(5000, 4)).astype(np.float32)
    level[1024:] += np.float32(3.0)
    far = (rng.normal(size=(3000, 4)) * 0.01 + 1e4).astype(np.float32)
    for rows, chunk in ((rng.normal(size=(2, 4)), 65536), (rng.normal(size=(3, 4)), 2), (level, 777), (far, 1000)):
        x = torch.from_numpy(np.asarray(rows, np.float32))
        want = np.asarray(rows, np.float32).astype(np.float64).std(axis=0, ddof=1)
        np.testing.assert_allclose(channel_std(x, chunk=chunk).numpy(), want, rtol=1e-5)


def test_each_selector_describes_itself_for_the_manifest():
    assert StdSelector(0.5).describe() == {"mode": "std", "keep": 0.5}
    assert StdSelector(64).describe() == {"mode": "std", "keep": 64}
    assert KeepAll().describe() == {"mode": "none", "keep": 1.0}
