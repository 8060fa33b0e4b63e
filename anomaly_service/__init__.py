"""anomaly: industrial visual anomaly detection (PatchCore memory bank + calibrated threshold + heatmaps)."""

from __future__ import annotations

import os
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:  # the number the build gave the installed package (setuptools-scm: the commit it was built from)
    __version__ = _metadata.version("anomaly-service")
except _metadata.PackageNotFoundError:  # a source tree imported without being installed
    __version__ = "0+unknown"

# ONNX Runtime (the CPU backbone) writes a device id and a telemetry database under ~/.cache when it is imported:
# a write outside the data volume, and on a read-only home a warning at every start. Set before anything imports
# it; an explicit value in the environment wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# torch's OpenMP threads (GNU libgomp) spin after every parallel region before they sleep, by default long enough to
# hold a core through the gap to the next region. On a machine of its own that saves a wake-up; on one that also runs
# other work (a camera's software, another replica) the spinning threads take the cores their own pass is waiting
# for, and a photo took several times as long. The spin libgomp itself falls back to once it sees more threads than
# cores keeps the first and spares the second (docs/decisions.md, "OpenMP threads spin briefly"). libgomp reads it
# when torch loads it, so it is set before anything here imports torch; a user's own OMP_WAIT_POLICY or
# GOMP_SPINCOUNT wins. An empty one is none given (compose passes an unset variable empty, as the ANOMALY_* settings
# read it): libgomp refused it on stderr at every start and spun its default. So is an empty OMP_NUM_THREADS, which
# libgomp refused alike, and which, blank but not empty, was taken for the user's thread count over the CPU quota.
OMP_SPIN_COUNT = "1000"
for _given in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
    if not os.environ.get(_given, "unset").strip():
        del os.environ[_given]
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)

from .errors import (  # noqa: E402
    AnomalyError,
    ConfigError,
    ImageLoadError,
    ModelFormatError,
    ModelSaveError,
    NotFittedError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:
    from .config import ModelConfig
    from .decision import ScoreResult
    from .model import AnomalyModel

__all__ = [
    "AnomalyModel", "ModelConfig", "ScoreResult", "AnomalyError", "ConfigError", "ImageLoadError",
    "ModelFormatError", "ModelSaveError", "NotFittedError", "WeightsUnavailableError", "__version__",
]

# Imported when first asked for (PEP 562), not with the package: they bring torch, whose import takes seconds and
# hundreds of MB, and a command that needs none of it (`anomaly healthcheck`, which a container runs every few
# seconds; `anomaly db upgrade`) paid that at every start. Each module that imports FAISS imports torch first
# (parallelism.load_faiss_after_torch says why; tests/test_parallelism.py imports each alone to hold it to that).
_LAZY = {"AnomalyModel": ".model", "ModelConfig": ".config", "ScoreResult": ".decision"}

if not TYPE_CHECKING:  # a type checker reads the imports above: a module __getattr__ would make every misspelt
    # name (`from anomaly_service import AnomalyModle`) pass its check as Any

    def __getattr__(name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'anomaly_service' has no attribute {name!r}")
        import importlib

        from .parallelism import load_faiss_after_torch

        load_faiss_after_torch()  # FAISS on torch's thread pool, and a warning where the caller loaded it first
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The public names too before they are first asked for (an interpreter's completion, ``dir()``)."""
    return sorted(set(globals()) | set(_LAZY))
