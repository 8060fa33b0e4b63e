import urllib.error

import numpy as np
import pytest
import torch

from anomaly_service.backbones import BACKBONES, load_backbone, state_dict_checksum
from anomaly_service.errors import WeightsUnavailableError
from anomaly_service.preprocessing import Preprocessing


def _classify(extractor_name: str, image: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes from the packaged EfficientNet-Lite0 weights, through our key renaming."""
    import timm

    from anomaly_service.backbones import _packaged_lite0_path, _read_state_dict, _rename_lite0_keys

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(_rename_lite0_keys(_read_state_dict(_packaged_lite0_path()), net))
    net.eval()
    spec = BACKBONES[extractor_name]
    x = Preprocessing(224, spec.mean, spec.std, 1).to_tensor(image, (224, 224))
    with torch.inference_mode():
        return net(x[None]).topk(5).indices[0].tolist()


def test_efficientnet_lite0_weights_classify_real_photos():
    skimage_data = pytest.importorskip("skimage.data")
    cat = _classify("efficientnet_lite0", skimage_data.chelsea())
    assert cat[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = _classify("efficientnet_lite0", skimage_data.coffee())
    assert coffee[0] in (967, 968)  # espresso, cup


def test_lite0_extractor_shapes():
    bb = load_backbone("efficientnet_lite0", progress=False)
    maps = bb.extractor(torch.zeros(2, 3, 128, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 16, 12), (2, 112, 8, 6)]
    assert bb.source.startswith("package:") and len(bb.checksum) == 64


def test_offline_download_fails_with_actionable_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone("resnet50", progress=False)
    msg = str(err.value)
    assert "--weights FILE" in msg and "--backbone efficientnet_lite0" in msg


def test_local_weights_file_for_resnet50(tmp_path):
    """The air-gapped path: a state dict on disk (random here; the real file in a plant) is used as is."""
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": sd}, path)
    bb = load_backbone("resnet50", weights=path, progress=False)
    maps = bb.extractor(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [512, 1024]
    assert bb.checksum == state_dict_checksum(sd)
    with pytest.raises(WeightsUnavailableError, match="differ from those the model was fitted"):
        load_backbone("resnet50", weights=path, progress=False, expected_checksum="0" * 64)


def test_bad_weights_files(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("resnet50", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailableError, match="could not be read"):
        load_backbone("resnet50", weights=junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="do not fit resnet50"):
        load_backbone("resnet50", weights=wrong)


def test_models_with_the_same_weights_share_one_backbone(fitted_model, tmp_path):
    from anomaly_service import AnomalyModel

    fitted_model.save(tmp_path / "a")
    fitted_model.save(tmp_path / "b")
    a, b = AnomalyModel.load(tmp_path / "a"), AnomalyModel.load(tmp_path / "b")
    assert a.backbone is b.backbone  # one copy in memory for a service with many product-line models
    assert a.score(np.zeros((64, 64, 3), np.uint8)).score == b.score(np.zeros((64, 64, 3), np.uint8)).score
