"""What an anomalib user types, answered with this product's word for it.

A data scientist coming from anomalib's PatchCore types its argument names (``coreset_sampling_ratio``,
``num_neighbors``, ``layers``, ``pre_trained``) and its timm backbone names (``tf_efficientnet_lite0``), on the
command line and in Python. The nearest-name guess sent them the wrong way (``--pre-trained``: "did you mean
--projection-dim?", ``num_neighbors``: no guess at all), and ``k`` looks like ``num_neighbors`` but is another
thing. Each known spelling gets one sentence saying what stands for it here, or why nothing does.
"""

from __future__ import annotations

from typing import Callable

GUIDE = "docs/coming-from-anomalib.md"

# anomalib's argument -> what this product has instead; {name} is one of ours, spelt as the caller's surface spells it
_SAID: dict[str, str] = {
    "coreset_sampling_ratio": "anomalib's coreset_sampling_ratio is {coreset_ratio} here (the same share of "
                              "patches kept in the memory bank, default 0.1)",
    "num_neighbors": "anomalib's num_neighbors only re-weights its image score, which has no counterpart here "
                     "(measured: it changed nothing); {k} is not it: it averages the k nearest distances into every "
                     "patch score, so leave it at 1",
    "layers": "the layers are fixed per backbone: layer2 + layer3 for resnet50 and wide_resnet50_2 (anomalib's "
              "default), blocks.2 + blocks.4 for the efficientnet_lite ones; choose them with {backbone}",
    "pre_trained": "the backbone is always ImageNet-pretrained and frozen, as anomalib's pre_trained=True; "
                   "{weights} names a file of those weights, for a machine without internet",
    "threshold": "the threshold is set at fit time from the good images alone (no manual or F1-adaptive "
                 "threshold); normalized_score 1.0 is that threshold, not 0.5",
    # root and normal_dir too: evaluate has neither (fit's --normal-dir is ours and never reaches this table), and
    # click's guess for --root was --report
    **dict.fromkeys(("root", "normal_dir", "normal_split_ratio", "abnormal_dir", "mask_dir", "normal_test_dir",
                     "extensions"),
                    "anomaly evaluate reads one folder in the MVTec layout instead of anomalib's Folder arguments; "
                    "links lay a Folder dataset out so without copying it"),
}
_OURS = ("coreset_ratio", "k", "backbone", "weights")

# timm's names of the backbones anomalib loads -> this product's names for the same networks and weights
BACKBONES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0",
    "tf_efficientnet_lite1": "efficientnet_lite1",
    "tf_efficientnet_lite2": "efficientnet_lite2",
    "wide_resnet50": "wide_resnet50_2",
}


def said_of(name: str, spell: Callable[[str], str]) -> str | None:
    """The sentence for anomalib's argument ``name`` (any of ``--num-neighbors``, ``num_neighbors``), naming our
    parameters as ``spell`` writes them (``--coreset-ratio`` on the command line, ``coreset_ratio`` in Python), with
    the guide; None when ``name`` is not one of anomalib's."""
    said = _SAID.get(name.lstrip("-").lower().replace("-", "_"))
    return f"{said.format(**{ours: spell(ours) for ours in _OURS})} ({GUIDE})" if said else None


def said_of_backbone(value: object) -> str | None:
    """The sentence for a backbone spelt as timm (and so anomalib) spells it, or None."""
    ours = BACKBONES.get(value) if isinstance(value, str) else None
    return f"anomalib's (timm's) {value} is {ours} here ({GUIDE})" if ours else None


def flag(name: str) -> str:
    """A parameter as the command line spells it (Python spells it as it is)."""
    return "--" + name.replace("_", "-")
