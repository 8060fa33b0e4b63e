import numpy as np
import pytest
import torch

from anomaly_service.errors import ConfigError
from anomaly_service.selection import channel_std, n_keep, select_features


def test_n_keep_fraction_and_count():
    assert n_keep(100, 0.5) == 50 and n_keep(100, 1.0) == 100 and n_keep(100, 30) == 30 and n_keep(10, 64) == 10
    with pytest.raises(ConfigError):
        n_keep(10, 0)


def test_std_keeps_the_most_varying_dimensions():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.01, 4.0])
    x = torch.randn(5000, 6, generator=g) * scales + 100.0  # large offset: std must be shift-invariant
    assert select_features(x, "std", 3).tolist() == [1, 3, 5]
    np.testing.assert_allclose(channel_std(x, chunk=777).numpy(), x.std(0).numpy(), rtol=1e-3)


def test_random_and_none():
    x = torch.randn(100, 20)
    r = select_features(x, "random", 0.5, seed=3)
    assert len(r) == 10 and len(set(r.tolist())) == 10 and (np.diff(r) > 0).all()
    assert select_features(x, "random", 0.5, seed=3).tolist() == r.tolist()
    assert select_features(x, "none", 0.5).tolist() == list(range(20))
    with pytest.raises(ConfigError):
        select_features(x, "pca", 0.5)
