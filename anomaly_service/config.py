"""``ModelConfig``: everything that defines a fitted model. Defaults are the measured best (docs/decisions.md)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .anomalib_names import said_of_backbone
from .errors import ConfigError
from .options import MODEL_OPTIONS, validate

# second opinions asked for by name; "auto" gives way to the options it does not combine with (fitting.py says so)
AE_ASKED = ("features", "global")


@dataclass
class ModelConfig:
    """Fit options; their allowed values live in :data:`~anomaly_service.options.MODEL_OPTIONS`."""

    backbone: str = "resnet50"
    image_size: int = 256  # longer side at the network's input (of the median training image), aspect kept
    resize: str = "fixed-scale"
    target_dim: int = 1024  # embedding dimension before selection (PatchCore's projection)
    layer_balance: bool = True  # equal weight per layer in the distance, as PatchCore pools them (features.py)
    selection: str = "std"
    selection_keep: float = 0.5
    coreset_ratio: float = 0.1
    coreset_max: int | None = None
    projection_dim: int = 128
    k: int = 1
    image_score: str = "map-max"
    index: str = "auto"  # exact on small banks (index.AUTO_FLAT_MAX rows), ivf beyond
    # the fewest lists that agree with the exact neighbour on 99% of patches at every bank size measured
    nprobe: int = 32
    sigma: float = 4.0
    calibration: str = "leave-one-out"
    calibration_fraction: float = 0.1  # with calibration="holdout"
    contamination: str = "warn"
    threshold_sigma: float = 3.0
    batch_size: int = 8
    seed: int = 0
    # the second opinion: auto = the whole-image branch where the good images show a layout (layout.py), which is
    # where it can pay; elsewhere the kNN decides alone
    autoencoder: str = "auto"
    ae_epochs: int = 60
    fusion: str = "mean"
    fusion_weight: float = 0.5
    ae_keep: str = "auto"  # the whole-image branch: fused only where the layout test says it pays (layout.py)
    # pixels to inspect: a mask file or "auto" (inspection_mask.py); the model stores the mask itself
    mask: str | None = None
    # score large photos in overlapping tiles of this many source pixels, all at one zoom (tiling.py); None: off
    tile: int | None = None
    # the bits of a 16-bit grey image that carry the picture: "auto" (the good images' own) or "8" ... "16"
    # (bit_depth.py); the fit records the depth it read them with
    bit_depth: str = "auto"
    # "any": parts arrive turned or mirrored, so the bank also holds turned copies of the good images (orientation.py)
    orientation: str = "fixed"
    # which good images show one part (a regular expression over their paths, part_groups.py): the leave-one-out
    # threshold leaves a whole part's images out when it scores one; None: every image is a part of its own
    part_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mask, os.PathLike):  # a pathlib.Path, as a notebook names a file: the file it names
            object.__setattr__(self, "mask", os.fspath(self.mask))
        object.__setattr__(self, "_made", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """A config is read-only once made: a model builds its stages from it when it is made, so a field changed
        afterwards (``model.config.k = 3``) was ignored by the fit while the manifest recorded it, and the saved
        model scored otherwise once loaded."""
        if getattr(self, "_made", False):
            raise ConfigError(f"ModelConfig.{name} cannot be changed once made: the model's stages are built from "
                              f"it. Use model.set_params({name}=...) on an unfitted model, or "
                              f"dataclasses.replace(config, {name}=...)")
        object.__setattr__(self, name, value)

    def validate(self, *, loading: bool = False) -> None:
        """Raise :class:`~anomaly_service.errors.ConfigError` for any value outside the options table."""
        said = said_of_backbone(self.backbone)  # timm's name, as anomalib's configs give it
        if said:
            raise ConfigError(f"backbone {self.backbone!r}: {said}")
        validate(asdict(self), MODEL_OPTIONS, loading=loading)
        if not loading and self.mask not in (None, "auto") and not Path(self.mask).is_file():
            raise ConfigError(f"mask file {self.mask} does not exist")  # before any image is read
        if self.tile is not None and self.resize == "squash":
            raise ConfigError("--tile keeps every photo at one zoom and aspect; it does not combine with "
                              "--resize squash")
        if self.tile is not None and self.resize == "longer-side" and not loading:  # models fitted so keep loading
            raise ConfigError("--tile sees every photo at one zoom (--image-size / --tile), whatever its size; "
                              "--resize longer-side would have no effect: leave --resize at fixed-scale")
        if self.tile is not None and self.autoencoder in AE_ASKED:
            raise ConfigError("--tile does not combine with --autoencoder yet: the autoencoder reads one grid per "
                              "image")
        if not loading and self.contamination != "warn" and (self.calibration == "holdout"
                                                              or self.autoencoder == "features"):
            # the guard reads the leave-one-out scores; without them it never ran and a defective part in ./good
            # went into the bank while the fit looked as clean as one that checked
            why = "--calibration holdout" if self.calibration == "holdout" else \
                "--autoencoder features (which sets the threshold on held-out images)"
            raise ConfigError(f"--contamination {self.contamination} needs the leave-one-out threshold: the guard "
                              f"that finds defective parts among the good images reads its scores, and with {why} "
                              "it does not run. Drop that option, or leave --contamination at warn")
        if not loading and self.part_id is not None and (self.calibration == "holdout"
                                                          or self.autoencoder == "features"):
            why = "--calibration holdout" if self.calibration == "holdout" else \
                "--autoencoder features (which sets the threshold on held-out images)"
            raise ConfigError(f"--part-id groups the images the leave-one-out threshold leaves out together; with "
                              f"{why} there is no leave-one-out threshold. Drop one of them")
        if self.orientation == "any":
            if self.resize != "fixed-scale":
                raise ConfigError("--orientation any needs --resize fixed-scale: a turned copy's canvas grows to "
                                  "hold the whole part, and only one zoom for every image keeps the part's size")
            if self.tile is not None:
                raise ConfigError("--orientation any does not combine with --tile yet: turned copies are embedded "
                                  "whole, not in tiles")
            if self.mask is not None:
                raise ConfigError("--orientation any does not combine with --mask: the mask is fixed to the frame "
                                  "and would not follow a turned part")
            if self.calibration != "leave-one-out" or self.autoencoder in AE_ASKED:
                raise ConfigError("--orientation any needs the leave-one-out threshold and no --autoencoder: turned "
                                  "good parts pass because the threshold is set from turned copies of the training "
                                  "images, scored leave-one-out")

    def unread_second_opinion_option(self) -> str | None:
        """Why a second opinion's option given here would never be read by the fit, or None. ``--ae-keep always``
        with the default ``--autoencoder auto`` fitted a plain kNN model on a part without a layout, and ``--fusion
        max`` beside the whole-image branch (which always fuses by excess) was dropped, each while the fit looked as
        asked: the command line refuses such a fit (cli/fit.py), the library says it at the fit (model.py). Not a
        check of :meth:`validate`: a library caller's parameters must keep round-tripping as they did
        (``sklearn.base.clone`` of a model saved with such an option, ``set_params`` of one option at a time, a
        grid search over ``autoencoder`` and ``fusion`` together), and a refusal there raised where they served."""
        if self.ae_keep != ModelConfig.ae_keep and self.autoencoder != "global":
            return (f"--ae-keep {self.ae_keep} applies only to --autoencoder global (the whole-image branch "
                    f"asked for by name); with --autoencoder {self.autoencoder} it would have no effect"
                    + (": use --autoencoder global --ae-keep always to train the branch whatever the layout"
                       if self.autoencoder == "auto" else ""))
        if self.autoencoder != "features":
            given = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name in ("fusion", "fusion_weight")
                     if getattr(self, name) != getattr(ModelConfig, name)]
            if given:
                why = ("the kNN decides alone" if self.autoencoder == "none" else
                       "the whole-image branch always fuses by excess (the kNN's opinion plus what the branch sees "
                       "beyond its own threshold)")
                return (f"{' and '.join(given)} only set how --autoencoder features is fused; with --autoencoder "
                        f"{self.autoencoder} {why}, so it would have no effect")
        elif self.fusion == "max" and self.fusion_weight != ModelConfig.fusion_weight:
            return f"--fusion-weight {self.fusion_weight:g} weighs the mean fusion; with --fusion max it would have " \
                   "no effect"
        return None

    @property
    def ae_kind(self) -> str | None:
        """The second opinion's network (autoencoder.AE_KINDS), or None for the kNN alone: ``auto`` is the
        whole-image branch, where the fit allows it (fitting.py decides)."""
        return {"auto": "global", "none": None}.get(self.autoencoder, self.autoencoder)

    def to_dict(self) -> dict[str, Any]:
        """The config as the manifest stores it. ``tile``, ``orientation``, ``ae_keep`` and ``part_id`` only when not
        their defaults: a model without them stays loadable by releases that predate them (one with them is refused
        there, never scored without)."""
        out = asdict(self)
        if out["ae_keep"] == "auto" or out["autoencoder"] != "global":  # read only by the whole-image branch
            del out["ae_keep"]
        if out["tile"] is None:
            del out["tile"]
        if out["orientation"] == "fixed":
            del out["orientation"]
        if out["part_id"] is None:
            del out["part_id"]
        return out
