import warnings

import torch
import torch.nn.functional as F

from anomaly_service.features import embed_patches, layer_dims
from anomaly_service.preprocessing import Preprocessing


def test_layer_dims_equal_share_capped_by_channels():
    assert layer_dims((512, 1024), 1024) == [512, 512]
    assert layer_dims((40, 112), 1024) == [40, 112]
    # the narrowest width the option takes: one dimension a layer, never wider than asked (a share of at least 2
    # gave 4)
    assert layer_dims((512, 1024), 2) == layer_dims((512, 1024), 3) == [1, 1]


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
    assert p.cell == 8 and p.grid(320, 127) == (32, 12)  # the patch grid: the finer layer's cells over that
    assert p.working_size(100, 100) == (256, 256)
    # the smallest side the network is given is two strides, whatever the policy
    for policy in ({}, {"squash": True}, {"reference_side": 100.0}):
        assert Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 16, **policy).working_size(100, 10) == (32, 32), policy
    import numpy as np

    x = p.to_tensor(np.full((320, 127, 3), 255, np.uint8))
    assert x.shape == (3, 256, 96) and torch.allclose(x, torch.ones_like(x))


def test_layer_balance_gives_each_layer_equal_weight():
    """A 40- and a 112-channel layer are scaled so each counts as a 512-dim share in the squared distance."""
    import math

    maps = [torch.randn(1, 40, 4, 4), torch.randn(1, 112, 2, 2)]
    raw = embed_patches(maps, 1024, balance=False)
    bal = embed_patches(maps, 1024, balance=True)
    assert raw.shape[-1] == 152
    assert torch.allclose(bal[..., :40], raw[..., :40] * math.sqrt(512 / 40), atol=1e-5)
    assert torch.allclose(bal[..., 40:], raw[..., 40:] * math.sqrt(512 / 112), atol=1e-5)
    # ResNet widths already get equal shares by pooling: balancing must not change them
    big = [torch.randn(1, 512, 4, 4), torch.randn(1, 1024, 2, 2)]
    assert torch.allclose(embed_patches(big, 1024, balance=True), embed_patches(big, 1024, balance=False))


def test_fixed_scale_zooms_every_image_by_the_same_factor():
    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16, reference_side=320)
    assert p.working_size(320, 320) == (256, 256)
    assert p.working_size(160, 100) == (128, 80)  # a smaller crop stays smaller: same physical scale
    assert p.working_size(4000, 4000) == (512, 512)  # capped at 2 * image_size
    # the manifest names the policy (a manifest without config.resize is read by it)
    assert p.to_dict()["resize"] == "fixed-scale" and p.to_dict()["reference_side"] == 320
    assert Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16).to_dict()["resize"] == "longer-side"


def _reference_embedding(maps: list[torch.Tensor], target_dim: int) -> torch.Tensor:
    """patchcore-inspection's order: aggregate and resize every channel, then pool channels per patch."""
    import torch.nn.functional as F

    ref, parts = maps[0].shape[-2:], []
    for m, d in zip(maps, layer_dims(tuple(m.shape[1] for m in maps), target_dim)):
        m = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True)
        m = F.interpolate(m, size=ref, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        b, h, w, c = m.shape
        parts.append(F.adaptive_avg_pool1d(m.reshape(-1, 1, c), d).reshape(b, h, w, d))
    return torch.cat(parts, -1)


def test_selecting_before_aggregation_equals_selecting_after():
    """Channel pooling/selection commute with the 3x3 average and the resize: the fast path gives the same."""
    g = torch.Generator().manual_seed(0)
    for shapes in ([(2, 512, 16, 12), (2, 1024, 8, 6)], [(1, 40, 9, 7), (1, 112, 5, 4)]):
        maps = [torch.randn(*s, generator=g) for s in shapes]
        assert torch.allclose(embed_patches(maps, 1024), _reference_embedding(maps, 1024), atol=1e-5)
        full = embed_patches(maps, 1024, balance=True)
        keep = torch.sort(torch.randperm(full.shape[-1], generator=g)[: full.shape[-1] // 2]).values
        fast = embed_patches(maps, 1024, balance=True, keep=keep)
        assert fast.shape == full.shape[:-1] + (len(keep),)
        assert torch.allclose(fast, full.index_select(-1, keep), atol=1e-5, rtol=1e-5)
    only_first = torch.arange(10)  # a selection that drops a whole layer
    assert embed_patches(maps, 1024, keep=only_first).shape[-1] == 10


def test_squash_gives_every_image_the_same_square():
    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16, squash=True)
    assert p.working_size(1000, 400) == p.working_size(300, 300) == (256, 256)
    assert p.to_dict()["resize"] == "squash" and "aspect not kept" in p.to_dict()["interpolation"]


def test_a_strip_is_resized_without_a_copy_larger_than_the_photo(monkeypatch):
    """A photo far taller than wide is shrunk along and widened across (to the stride's minimum). torch does the
    width first, at the full height: an adversarial 8 x 5,000,000 upload held 2.3 GB there. Shrinking first gives
    the same tensor with every step within the photo's size."""
    import numpy as np
    import torch.nn.functional as F

    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16)
    strip = np.random.default_rng(0).integers(0, 255, (6000, 8, 3), dtype=np.uint8)
    h, w = p.working_size(*strip.shape[:2])
    assert h < 6000 and w > 8
    sizes: list[tuple[int, int]] = []
    real = F.interpolate

    def interpolate(x, size, **kw):
        sizes.append(tuple(size))
        return real(x, size=size, **kw)

    monkeypatch.setattr(F, "interpolate", interpolate)  # the module preprocessing resizes with
    got = p.to_tensor(strip)
    monkeypatch.setattr(F, "interpolate", real)
    x = torch.from_numpy(strip).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    one_step = (real(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True) - 0.5) / 0.5
    assert torch.allclose(got, one_step.squeeze(0), atol=1e-5)
    assert sizes == [(h, 8), (h, w)]  # along first, then across: never 6000 rows widened


def test_a_turned_or_sliced_photo_is_made_a_tensor_as_its_copy_is():
    """Preprocessing.to_tensor of a view (a photo turned by a transpose, or every other column) raised numpy 2's
    "Unable to avoid copy": it asked for no copy of any writable array. Read-only and writable, viewed or not, the
    same tensor as of a contiguous copy."""
    import numpy as np

    from conftest import textured_part

    p = Preprocessing(128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 16)
    photo = textured_part(np.random.default_rng(1), 300, 400)
    for view in (photo.transpose(1, 0, 2), photo[:, ::2], photo[::-1]):
        fixed = np.ascontiguousarray(view)
        locked = view.copy()
        locked.flags.writeable = False
        assert torch.equal(p.to_tensor(view, (96, 128)), p.to_tensor(fixed, (96, 128)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns of a tensor over memory it may not write
            assert torch.equal(p.to_tensor(locked, (96, 128)), p.to_tensor(fixed, (96, 128)))


def test_a_photo_is_made_float_with_the_values_and_memory_order_torch_gives_it():
    """to_tensor makes the photo float in NumPy, a block of rows at a time (a read-only decoded photo needs no copy
    first): the tensor is torch's own uint8 -> float32 / 255 of the same photo, every value to the bit, at the
    working size and at odd sizes."""
    import numpy as np

    from conftest import textured_part

    p = Preprocessing(128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 16)
    photo = textured_part(np.random.default_rng(2), 210, 333)
    photo[:16, :16] = np.arange(256 * 3, dtype=np.uint16).reshape(16, 16, 3) % 256  # every value, every channel
    mean, std = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
    x = torch.from_numpy(photo.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    for size in ((96, 128), (210, 333), (64, 400)):
        first = (size[0], 333) if size[0] < 210 and size[1] > 333 else None
        ref = F.interpolate(x, size=first, mode="bilinear", align_corners=False, antialias=True) if first else x
        if tuple(ref.shape[-2:]) != size:
            ref = F.interpolate(ref, size=size, mode="bilinear", align_corners=False, antialias=True)
        assert torch.equal(p.to_tensor(photo, size), ((ref - mean) / std).squeeze(0))



def test_a_read_only_photo_reaches_torch_as_a_writable_copy(monkeypatch):
    """torch warns of a tensor over memory it may not write (a decoded upload held read-only, a memory-mapped
    frame); torch is given the photo made float, a writable array of its own, and the photo is left as it was. Seen
    at the call, not through torch's warning, which it gives once a process."""
    import numpy as np

    p = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, 16)
    photo = np.full((40, 30, 3), 200, np.uint8)
    photo.flags.writeable = False
    given = []
    real = torch.from_numpy

    def from_numpy(a):
        given.append(a.flags.writeable)
        return real(a)

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    p.to_tensor(photo)
    assert given == [True] and not photo.flags.writeable


def test_what_models_saved_before_a_preprocessing_field_was_kept_are_told():
    """Each helper's answer where the model has not the field it reads, or too little to go on: no scale warning
    for a tiled model saved with neither the training photos' sides nor a reference side (it raised a TypeError on
    every photo without its check), channels still unknown after an update, no red-blue statistics for grey good
    photos or fewer than five."""
    from anomaly_service.preprocessing import joined_channels, red_blue_of, scale_warning

    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16)
    assert scale_warning(p, 64, 4000, 3000) is None and scale_warning(p, None, 4000, 3000) is None
    assert joined_channels(None, "grey") is None and joined_channels("colour", None) == "colour"
    assert joined_channels("colour", "colour") == "colour" and joined_channels("colour", "grey") == "both"
    assert red_blue_of([20.0] * 4, "colour") is None and red_blue_of([20.0] * 5, "grey") is None
    assert red_blue_of([20.0] * 5, None) is None and red_blue_of([20.0] * 5, "colour") == (20.0, 0.0)


def test_the_scale_warning_names_a_way_out_the_fit_takes():
    """A model of turned parts (--orientation any) refuses --resize longer-side, so its photo at another resolution
    is told to re-fit on photos from it, not to fit with a policy it would refuse; another is told either."""
    from anomaly_service.preprocessing import scale_warning

    p = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 16, reference_side=320.0, sides=(300.0, 340.0))
    turned, plain = scale_warning(p, None, 1000, 900, turned=True), scale_warning(p, None, 1000, 900)
    assert "--orientation any keeps one zoom" in turned and "--resize longer-side" not in turned
    assert "--resize longer-side" in plain and "--orientation" not in plain
    assert "1000 px on its longer side and the model's training photos 300-340 px" in plain
    assert "looks 2.9x larger" in plain and "looks 3.0x smaller" in scale_warning(p, None, 100, 80)
    # a tiled model's tile, scaled as the photo is against the nearer end of the training photos' sides
    assert "--tile about 188" in scale_warning(p, 64, 1000, 900) and "--tile about 21" in scale_warning(p, 64, 100, 80)
    assert "--tile about 16" in scale_warning(p, 64, 40, 30)  # never below the smallest tile


def test_a_photo_is_shrunk_with_antialiasing():
    """A fitted model's bank holds features of antialiased photos: fine texture shrunk without it aliases into a
    pattern the bank never saw. The tensor is torch's antialiased bilinear resize, normalized."""
    import numpy as np
    import torch.nn.functional as F

    p = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, 16)
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: shrunk 4x, antialiased they average to grey
    x = torch.from_numpy(stripes).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    want = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True) - 0.5) / 0.5
    assert torch.allclose(p.to_tensor(stripes), want.squeeze(0), atol=1e-5)
    assert p.to_tensor(stripes).abs().max() < 0.1
