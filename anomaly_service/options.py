"""The one table of allowed option values: the model config, the CLI and the service settings all read it.

As scikit-learn's ``_parameter_constraints``, the table holds constraints, not defaults: defaults live on
:class:`~anomaly_service.config.ModelConfig` (fit options) and on the service settings. Choices that older
models may still carry but the product no longer offers are listed as ``legacy``: accepted when a saved model
is loaded (they only mattered at fit time), never offered for a new fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import regex

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """Constraints and help for one option."""

    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None  # numeric bounds; None = unbounded on that side
    high: float | None = None
    low_open: bool = False  # True: the bound itself is excluded
    high_open: bool = False
    integer: bool = False
    boolean: bool = False
    optional: bool = False  # None is allowed (means "not set")
    legacy: tuple[str, ...] = ()  # loadable from older models, not offered for new fits
    pattern: str | None = None  # also allowed: strings matching this regular expression (e.g. cuda:N)
    pattern_hint: str = ""
    regex: bool = False  # a regular expression (Python's re), refused when it does not compile

    def describe(self) -> str:
        if self.boolean:
            return "true or false"
        if self.regex:
            return "a regular expression"
        if self.choices is not None:
            extra = f" (or {self.pattern_hint})" if self.pattern_hint else ""
            return "one of " + ", ".join(repr(c) for c in self.choices) + extra
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        kind = "an integer" if self.integer else "a finite number"
        if self.low is None and self.high is None:
            return kind
        return f"{kind} in {lo}{'-inf' if self.low is None else f'{self.low:g}'}, " \
               f"{'inf' if self.high is None else f'{self.high:g}'}{hi}"

    def check(self, name: str, value: Any, *, loading: bool = False) -> None:
        """Raise :class:`ConfigError` naming the option, the allowed values and the value given."""
        if value is None and self.optional:
            return
        if self.boolean:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false; got {value!r}")
            return
        if self.regex:
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be {self.describe()} (a string); got a {type(value).__name__}")
            try:
                regex.compile(value)  # the engine part_groups searches with (re's syntax, and a deadline)
            except regex.error as exc:
                raise ConfigError(f"{name} '{value}' is no regular expression: {exc}") from None
            return
        if self.choices is not None:
            allowed = self.choices + (self.legacy if loading else ())
            if not isinstance(value, (str, int, float)):  # an array's ``in`` raised numpy's "truth value" error
                raise ConfigError(f"{name} must be {self.describe()}; got a {type(value).__name__}")
            if value not in allowed and not (self.pattern and isinstance(value, str)
                                             and re.fullmatch(self.pattern, value)):
                raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past any float: JSON's and click's integers have any length
            raise ConfigError(f"{name} must be {self.describe()}; got an integer of more than "
                              f"{math.floor(math.log10(abs(value)))} digits") from None
        if self.integer and not number.is_integer():
            raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")
        if not math.isfinite(number):  # an infinite threshold would pass every broken part as normal
            raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")


def _backbones() -> tuple[str, ...]:
    from .backbone_specs import BACKBONES

    return tuple(BACKBONES)


# Options that define a fitted model (ModelConfig fields). Booleans need no constraint beyond their type.
MODEL_OPTIONS: dict[str, Option] = {
    "backbone": Option("Frozen ImageNet feature extractor. efficientnet_lite0 needs no download.",
                       choices=_backbones()),
    "image_size": Option("Longer side at the network input; aspect ratio is kept, nothing is cropped.",
                         low=32, integer=True),
    "resize": Option("fixed-scale: one zoom for all images (same physical scale); longer-side: every image's "
                     "longer side becomes --image-size; squash: every image becomes --image-size square, aspect "
                     "not kept (anomalib's input).", choices=("fixed-scale", "longer-side", "squash")),
    "target_dim": Option("Embedding width before selection (each layer gets an equal share).", low=2, integer=True),
    "layer_balance": Option("Weigh both feature layers equally in the distance, whatever their channel counts "
                            "(PatchCore's pooling; changes only narrow backbones such as efficientnet_lite0).",
                            boolean=True),
    "selection": Option("Feature selection over the normal bank: std keeps the dimensions that vary most.",
                        choices=("std", "none"), legacy=("random",)),
    "selection_keep": Option("Fraction (<=1) or count (>1) of embedding dimensions to keep.", low=0, low_open=True),
    "coreset_ratio": Option("Share of all normal patches kept in the memory bank (greedy coreset).",
                            low=0, high=1, low_open=True),
    "coreset_max": Option("Cap on the memory bank size (patches).", low=1, integer=True, optional=True),
    "projection_dim": Option("Random projection width used only for coreset distances.", low=1, integer=True),
    "k": Option("Nearest neighbors averaged into every patch score. Not anomalib's num_neighbors, which only "
                "re-weights its image score and has no counterpart here.", low=1, integer=True),
    "image_score": Option("map-max: the smoothed heatmap's hottest pixel (a flagged part always has a region to "
                          "show); max: the raw patch maximum (the paper's).", choices=("map-max", "max")),
    "index": Option("auto = exact (flat) search on small banks, ivf beyond (the choice is recorded in the model); "
                    "flat = always exact; ivf = inverted lists with an exact re-rank; ivfpq = compressed lists, "
                    "for banks too large for memory.",
                    choices=("auto", "flat", "ivf", "ivfpq")),
    "nprobe": Option("Inverted lists searched per query (ivf/ivfpq).", low=1, integer=True),
    "sigma": Option("Gaussian smoothing of the map, in working-resolution pixels.", low=0),
    "calibration": Option("How the threshold is set from the good images: leave-one-out scores each training "
                          "image against the bank without its own patches (every image in the bank and in the "
                          "threshold); holdout keeps --calibration-fraction of them out of the bank (always with "
                          "--autoencoder features).", choices=("leave-one-out", "holdout")),
    "calibration_fraction": Option("Share of normal images held out of the bank to set the threshold "
                                   "(calibration=holdout).", low=0, high=1, high_open=True),
    "contamination": Option("Training images that look unlike the other good ones (maybe defective): warn lists "
                            "them, drop re-fits without them, fail stops the fit (leave-one-out calibration).",
                            choices=("warn", "drop", "fail")),
    "threshold_sigma": Option("With fewer than 50 calibration images (too few for the tail fit): threshold = "
                              "max(mean + this many std, max) of their scores.", low=0),
    "batch_size": Option("Images (or tiles) per backbone pass at the default working size (256 px); fewer of "
                         "larger ones, one at least.", low=1, integer=True),
    "seed": Option("Seed of every random choice in a fit (coreset start, projection, hold-out split).",
                   low=0, integer=True),
    "autoencoder": Option("A second opinion on the same features (docs/how-it-works.md). auto (default): the "
                          "whole-image branch where the good images show a fixed layout (a part that lies one way) "
                          "and the fit has no --tile or --orientation any; global: that branch, which reconstructs "
                          "the part's whole layout through one vector, for missing, extra or misplaced components; "
                          "features: reconstructs each patch from its neighbourhood; none: the kNN alone.",
                          choices=("auto", "none", "features", "global")),
    "ae_epochs": Option("Autoencoder epochs at most (early stopping on a validation split).", low=1, integer=True),
    "fusion": Option("How the kNN and autoencoder opinions combine (with --autoencoder features): mean or max of "
                     "their calibrated scores. The whole-image branch (auto, global) always fuses by excess: the "
                     "kNN's opinion plus what the branch sees beyond its own threshold, on the kNN's scale.",
                     choices=("mean", "max")),
    "fusion_weight": Option("Weight of the kNN opinion in the mean fusion.", low=0, high=1),
    "ae_keep": Option("With --autoencoder global: auto trains and fuses it only where the part has a fixed layout "
                      "(position explains at least half of the good images' pixel variance; else the kNN decides "
                      "alone and the fit says why); always trains it regardless.", choices=("auto", "always")),
    "mask": Option("Inspection mask: a PNG the size of the training images (nonzero = inspect, zero = ignore) or a "
                   "JSON file of polygons (docs/how-it-works.md); auto = the foreground found in the good images. "
                   "Pixels outside never count: not in the score, the heatmap or the regions.",
                   choices=("auto",), pattern=r"(?is).+\.(png|json)", pattern_hint="a .png or .json file",
                   optional=True),
    "tile": Option("Score large photos in overlapping tiles of this many source pixels, each seen at "
                   "--image-size (one zoom for every tile): small defects on 5-20 megapixel photos stay visible. "
                   "Off: the whole photo is shrunk to --image-size (docs/how-it-works.md#large-photos-tiles).",
                   low=16, integer=True, optional=True),
    "bit_depth": Option("Bits a pixel (a channel of a colour pixel) of a 16-bit image carries: a camera's 10, 12 or "
                        "14 bits stored in a 16-bit file fill only part of its range. auto: the fewest of 8, 10, 12, "
                        "14, 16 that hold every good image's values, for grey and colour images each, recorded in "
                        "the model; every photo it scores is read with the same white (docs/how-it-works.md).",
                        choices=("auto",), pattern=r"8|10|12|14|16",
                        pattern_hint="8, 10, 12, 14 or 16"),
    "orientation": Option("fixed: parts always lie the same way; any: they arrive turned or mirrored, so the bank "
                          "also holds turned and mirrored copies of the good images (at most twice the bank). "
                          "For parts; on a surface check recall on known defects, or keep fixed (docs/decisions.md).",
                          choices=("fixed", "any")),
    "part_id": Option("Which good images show the same part (burst shots, a second pass): a regular expression "
                      "searched in each image's path relative to --normal-dir (with --recursive, '^([^/]+)/' groups "
                      "by subfolder; 'P(\\d+)_' by a file name's part number). Its first group (or the whole match) "
                      "is the part id; the leave-one-out threshold scores each image without its whole part's "
                      "images, so near-copies do not lower it. An image it does not match is a part of its own.",
                      regex=True, optional=True),
}

# Choices that older models may carry and that this release cannot reproduce: loading names the way out.
REMOVED_CHOICES: dict[str, dict[str, str]] = {
    "image_score": {"reweighted": "map-max"},
    "autoencoder": {"pixels": "features"},
    "fusion": {"knn": "mean", "autoencoder": "mean"},
}

# How a model runs on a machine (not part of the model): chosen per process by the CLI and the service.
RUNTIME_OPTIONS: dict[str, Option] = {
    "knn_precision": Option("CPU kNN search: fp32, or a bf16 shortlist re-ranked exactly in fp32 (auto: bf16 if "
                            "the CPU has it).", choices=("auto", "fp32", "bf16")),
    "runtime": Option("Backbone execution: PyTorch, or ONNX Runtime on the CPU; auto = ONNX Runtime on the CPU, "
                      "PyTorch on GPUs.", choices=("auto", "torch", "onnx")),
    "device": Option("Where the model runs: auto (a GPU when torch sees one), cpu, cuda or cuda:N.",
                     choices=("auto", "cpu", "cuda"), pattern=r"cuda:\d+", pattern_hint="cuda:N"),
}


# How the service runs and keeps its records (settings.py), and how the records leave it (anomaly records export).
SERVICE_OPTIONS: dict[str, Option] = {
    "keep_images": Option("Which inspections keep their photo and heatmap in the file store under --data-dir: "
                          "all, anomalies (the flagged parts operators review) or none (records only).",
                          choices=("all", "anomalies", "none")),
    "log_level": Option("Log level of the service and of uvicorn.",
                        choices=("critical", "error", "warning", "info", "debug")),
    "log_format": Option("text: lines for a person; json: one JSON object per line (time, level, logger, message; an "
                         "access line's client, method, path, status, inspection_id, error), for a log aggregator.",
                         choices=("text", "json")),
    "export_format": Option("csv (JSON columns as JSON text) or jsonl: one JSON object per inspection.",
                            choices=("csv", "jsonl")),
}


def validate(params: dict[str, Any], table: dict[str, Option] = MODEL_OPTIONS, *, loading: bool = False) -> None:
    """Check every value in ``params`` that the table constrains; unknown names are the caller's business."""
    for name, value in params.items():
        option = table.get(name)
        if option is not None:
            option.check(name, value, loading=loading)
