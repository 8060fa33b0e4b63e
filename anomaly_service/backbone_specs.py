"""The backbones' table: each one's tapped stages, their widths, its input normalisation and stride.

Apart from the networks (backbones.py) so that what reads only the table (the options' allowed values, a manifest's
check, the command line's start) does not import torch: `anomaly healthcheck`, which a container runs every few
seconds, and `anomaly db upgrade` started in torch's import time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    layers: tuple[str, str]  # the stride-8 and stride-16 stages ("layer2", "layer3" on ResNets)
    channels: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int  # of the deepest used stage; input sides are rounded to a multiple of it
    needs_download: bool
    # peak bytes one backbone pass takes a pixel of its input (the activations up to the deepest tapped stage), as
    # a tiled photo's memory is counted (Embedder.tile_bytes): measured per backbone, benchmarks/tile_memory.py
    pass_bytes: int = 256


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The ResNets' passes take more a pixel than the Lites': at tiles of the working size, the first photo after the
# warm-up grew their runtime's buffers past a Lite's rate (benchmarks/tile_memory.py, decisions.md)
RESNET_PASS_BYTES = 448

BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", ("layer2", "layer3"), (512, 1024), IMAGENET_MEAN, IMAGENET_STD, 16, True,
                             RESNET_PASS_BYTES),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", ("layer2", "layer3"), (512, 1024), IMAGENET_MEAN, IMAGENET_STD, 16, True, RESNET_PASS_BYTES
    ),
    # TF-Lite EfficientNet was trained on inputs scaled to [-1, 1]. The stride-8 and the last stride-16 stage, as
    # PatchCore taps a ResNet's layer2 and layer3 (the choice is measured in docs/decisions.md).
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", ("blocks.2", "blocks.4"), (40, 112), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 16, False
    ),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1", ("blocks.2", "blocks.4"), (40, 112), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 16, False
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2", ("blocks.2", "blocks.4"), (48, 120), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 16, False
    ),
}
LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None
