"""What an anomalib user types, answered with this product's word for it.

A data scientist coming from anomalib's PatchCore types its argument names (``--coreset_sampling_ratio``,
``--num_neighbors``, ``--layers``, ``--pre_trained``) and its timm backbone names (``tf_efficientnet_lite0``).
Click's guess for the nearest flag sent them the wrong way (``--pre-trained``: "did you mean --projection-dim?",
``--num-neighbors``: no guess at all), and ``--k`` looks like ``num_neighbors`` but is another thing. Each known
spelling gets one sentence saying what stands for it here, or why nothing does.
"""

from __future__ import annotations

from typing import Any

import click

_GUIDE = "docs/coming-from-anomalib.md"

# anomalib's argument (without dashes, underscores as hyphens) -> what this product has instead
_FLAGS: dict[str, str] = {
    "coreset-sampling-ratio": "anomalib's coreset_sampling_ratio is --coreset-ratio here (the same share of patches "
                              "kept in the memory bank, default 0.1)",
    "num-neighbors": "anomalib's num_neighbors only re-weights its image score; there is no such re-weighting here "
                     "(measured: it changed nothing). --k is not its equivalent: it averages the k nearest distances "
                     "into every patch score, so leave it at 1",
    "layers": "the layers are fixed per backbone: layer2 + layer3 for resnet50 and wide_resnet50_2 (anomalib's "
              "default), blocks.2 + blocks.4 for the efficientnet_lite ones; choose them with --backbone",
    "pre-trained": "the backbone is always ImageNet-pretrained and frozen, as anomalib's pre_trained=True; "
                   "--weights FILE reads those weights from a file on a machine without internet",
    "threshold": "the threshold is set at fit time from the good images alone (no manual or F1-adaptive threshold); "
                 "normalized_score 1.0 is that threshold, not 0.5",
    **dict.fromkeys(("normal-split-ratio", "abnormal-dir", "mask-dir", "normal-test-dir", "extensions"),
                    "anomaly evaluate reads one folder in the MVTec layout instead of anomalib's Folder arguments; "
                    "links lay a Folder dataset out so without copying it"),
}

# timm's names of the backbones anomalib loads -> this product's names for the same networks and weights
_BACKBONES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0",
    "tf_efficientnet_lite1": "efficientnet_lite1",
    "tf_efficientnet_lite2": "efficientnet_lite2",
    "wide_resnet50": "wide_resnet50_2",
    "wide-resnet50-2": "wide_resnet50_2",
}


def message(exc: click.ClickException) -> str | None:
    """The error for a flag or backbone spelt as anomalib spells it, or None when it is not one of those. Click's
    guess of a near flag is left out: for these it pointed elsewhere."""
    if isinstance(exc, click.NoSuchOption):
        said = _FLAGS.get(exc.option_name.lstrip("-").lower().replace("_", "-"))
        return f"No such option '{exc.option_name}': {said} ({_GUIDE})" if said else None
    if isinstance(exc, click.BadParameter) and _param_name(exc) == "backbone":
        value = _bad_value(exc)
        if value in _BACKBONES:
            return (f"Invalid value for '--backbone': anomalib's (timm's) {value} is --backbone "
                    f"{_BACKBONES[value]} here ({_GUIDE})")
    return None


def _param_name(exc: click.BadParameter) -> str | None:
    return getattr(exc.param, "name", None)


def _bad_value(exc: click.BadParameter) -> Any:
    """The value a choice refused: click keeps it only in the message, ``'VALUE' is not one of ...``."""
    message = exc.message
    return message.split("'")[1] if message.count("'") >= 2 else None
