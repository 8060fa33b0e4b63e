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
