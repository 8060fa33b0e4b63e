import torch

from anomaly_service.features import embed_patches, layer_dims
from anomaly_service.preprocessing import Preprocessing


def test_layer_dims_equal_share_capped_by_channels():
    assert layer_dims((512, 1024), 1024) == [512, 512]
    assert layer_dims((40, 112), 1024) == [40, 112]


def test_embedding_shape_and_layer_alignment():
    maps = [torch.randn(2, 512, 16, 12), torch.randn(2, 1024, 8, 6)]
    emb = embed_patches(maps, 1024)
    assert emb.shape == (2, 16, 12, 1024)


def test_local_aggregation_spreads_over_3x3():
    m = torch.zeros(1, 4, 9, 9)
    m[0, :, 4, 4] = 9.0
    emb = embed_patches([m, torch.zeros(1, 4, 5, 5)], 8)
    nonzero = emb[0, :, :, 0] != 0
    assert nonzero.sum() == 9 and nonzero[3:6, 3:6].all()


def test_preprocessing_keeps_aspect_and_whole_frame():
    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16)
    assert p.working_size(320, 127) == (256, 96)  # tall image stays tall
    assert p.working_size(100, 100) == (256, 256)
    import numpy as np

    x = p.to_tensor(np.full((320, 127, 3), 255, np.uint8))
    assert x.shape == (3, 256, 96) and torch.allclose(x, torch.ones_like(x))


def test_layer_balance_gives_each_layer_equal_weight():
    """A 40-channel and a 112-channel layer with unit activations contribute equally to the squared norm."""
    maps = [torch.ones(1, 40, 4, 4), torch.ones(1, 112, 2, 2)]
    emb = embed_patches(maps, 1024, balance=True)[0, 1, 1]
    assert torch.isclose((emb[:40] ** 2).sum(), (emb[40:] ** 2).sum())
    raw = embed_patches(maps, 1024, balance=False)[0, 1, 1]
    assert torch.allclose(raw, torch.ones(152))
    # ResNet widths already get equal shares by pooling: balancing must not change them
    big = [torch.randn(1, 512, 4, 4), torch.randn(1, 1024, 2, 2)]
    assert torch.allclose(embed_patches(big, 1024, balance=True), embed_patches(big, 1024, balance=False))


def test_fixed_scale_zooms_every_image_by_the_same_factor():
    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16, reference_side=320)
    assert p.working_size(320, 320) == (256, 256)
    assert p.working_size(160, 100) == (128, 80)  # a smaller crop stays smaller: same physical scale
    assert p.working_size(4000, 4000) == (512, 512)  # capped at 2 * image_size
