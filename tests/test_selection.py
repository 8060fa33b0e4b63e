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
