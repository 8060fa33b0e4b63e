"""The models a service holds: every valid artifact under one directory, reloadable with no downtime.

A re-fitted model is written atomically by ``AnomalyModel.save`` (a new directory renamed into place), so the
registry notices it by the manifest's fingerprint, loads the new model in the background and swaps one
reference. Requests that already hold the old entry finish on it; new requests get the new one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import MANIFEST
from .errors import AnomalyError, ConfigError
from .images import DEFAULT_LIMITS, ImageLimits
from .model import AnomalyModel

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def valid_name(name: str) -> bool:
    """Model names are single path components: no separators, no ``..``, nothing hidden."""
    return bool(_NAME.match(name)) and ".." not in name


def _fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class ModelEntry:
    name: str
    path: Path
    model: AnomalyModel
    version: str  # manifest fingerprint: changes with every re-fit
    loaded_at: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        m = self.model.manifest_
        assert m is not None  # a registry holds loaded models only
        return {
            "name": self.name,
            "version": self.version[:16],
            "created_at": m.created_at,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "backbone": m.backbone.name,
            "image_size": self.model.config.image_size,
            "bank_size": m.coreset.size,
            "feature_dim": m.index.dim,
            "index": m.index.kind,
            "threshold": m.calibration.threshold,
            "training_images": m.training.n_images,
            "calibration_images": m.training.n_calibration_images,
            "device": str(self.model.device),
            # what actually runs: auto settings resolve per machine, and a failed ONNX export falls back to torch
            "runtime": self.model.runtime,
            "knn_search": self.model.knn_search,
        }

    def manifest(self) -> dict[str, Any]:
        """The model's full manifest as JSON (configuration, calibration, training provenance)."""
        assert self.model.manifest_ is not None
        return self.model.manifest_.to_dict()


class ModelRegistry:
    """Thread-safe map of model name -> loaded model, fed from ``model_dir``."""

    def __init__(self, model_dir: Path, *, device: str = "auto", weights: Path | None = None,
                 limits: ImageLimits = DEFAULT_LIMITS, default: str | None = None, knn_precision: str = "auto",
                 runtime: str = "auto"):
        self.model_dir = Path(model_dir)
        self.knn_precision = knn_precision
        self.runtime = runtime
        self.device = device
        self.weights = weights
        self.limits = limits
        self.default = default
        self._entries: dict[str, ModelEntry] = {}
        self._errors: dict[str, str] = {}
        self._failed_fp: dict[str, str] = {}
        self._missing: set[str] = set()  # a broken artifact is not retried until it changes on disk
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one (slow) load at a time

    # ---------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def get(self, name: str | None) -> ModelEntry:
        """The entry for ``name``; with no name, the default model or the only one loaded."""
        with self._lock:
            if name is None:
                name = self.default
                if name is None:
                    if len(self._entries) == 1:
                        return next(iter(self._entries.values()))
                    raise LookupError("several models are loaded; name one with ?model=" if self._entries
                                      else "no model is loaded")
            if not valid_name(name):
                raise LookupError(f"invalid model name {name!r}")
            try:
                return self._entries[name]
            except KeyError:
                raise LookupError(f"model {name!r} is not loaded (loaded: {', '.join(sorted(self._entries)) or 'none'})") from None

    # ---------------------------------------------------------------- loading
    def candidates(self) -> list[str]:
        if not self.model_dir.is_dir():
            return []
        return sorted(p.name for p in self.model_dir.iterdir()
                      if p.is_dir() and valid_name(p.name) and (p / MANIFEST).is_file())

    def load(self, name: str) -> ModelEntry:
        """(Re)load one model from disk; the previous entry keeps serving until the new one is ready."""
        if not valid_name(name):
            raise ConfigError(f"invalid model name {name!r}")
        path = (self.model_dir / name).resolve()
        if path.parent != self.model_dir.resolve():
            raise ConfigError(f"model {name!r} is outside the model directory")
        with self._load_lock:
            version = _fingerprint(path)
            if version is None:
                raise ConfigError(f"no model named {name!r} under {self.model_dir}")
            try:
                model = AnomalyModel.load(path, weights=self.weights, device=self.device, limits=self.limits,
                                          knn_precision=self.knn_precision, runtime=self.runtime)
            except AnomalyError as exc:
                with self._lock:
                    self._errors[name] = str(exc)
                raise
            entry = ModelEntry(name=name, path=path, model=model, version=version)
            with self._lock:
                self._entries[name] = entry
                self._errors.pop(name, None)
            log.info("model %s loaded (version %s)", name, version[:12])
            return entry

    def load_all(self) -> None:
        for name in self.candidates():
            try:
                self.load(name)
            except AnomalyError as exc:
                log.error("model %s not loaded: %s", name, exc)

    def refresh(self) -> dict[str, str]:
        """Load new models, reload changed ones, drop deleted ones. Returns ``{name: what happened}``."""
        changes: dict[str, str] = {}
        on_disk = set(self.candidates())
        for name in sorted(on_disk):
            with self._lock:
                current = self._entries.get(name)
            fp = _fingerprint(self.model_dir / name)
            if current is not None and current.version == fp:
                continue
            if fp is not None and fp == self._failed_fp.get(name):
                continue
            try:
                self.load(name)
                changes[name] = "reloaded" if current is not None else "loaded"
            except AnomalyError as exc:
                self._failed_fp[name] = fp or ""
                changes[name] = f"failed: {exc}"
                log.error("model %s not reloaded (still serving the previous version if any): %s", name, exc)
        with self._lock:
            # An atomic re-save renames directories, so a model can be absent for an instant: drop it only
            # when it is missing on two consecutive checks.
            for name in set(self._entries) - on_disk:
                if name in self._missing:
                    del self._entries[name]
                    self._missing.discard(name)
                    changes[name] = "removed"
                else:
                    self._missing.add(name)
            self._missing &= set(self._entries)
            self._missing -= on_disk
        return changes
