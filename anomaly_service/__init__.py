"""anomaly: industrial visual anomaly detection (PatchCore memory bank + calibrated threshold + heatmaps)."""

__version__ = "0.1.0"

import os  # noqa: E402

# ONNX Runtime (the CPU backbone) writes a device id and a telemetry database under ~/.cache when it is imported:
# a write outside the data volume, and on a read-only home a warning at every start. Set before anything imports
# it; an explicit value in the environment wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .parallelism import load_faiss_after_torch  # noqa: E402  (imports torch)

load_faiss_after_torch()  # before any module imports FAISS (parallelism.py says why)

from .errors import (  # noqa: E402
    AnomalyError,
    ConfigError,
    ImageLoadError,
    ModelFormatError,
    ModelSaveError,
    NotFittedError,
    WeightsUnavailableError,
)
from .config import ModelConfig  # noqa: E402
from .decision import ScoreResult  # noqa: E402
from .model import AnomalyModel  # noqa: E402

__all__ = [
    "AnomalyModel", "ModelConfig", "ScoreResult", "AnomalyError", "ConfigError", "ImageLoadError",
    "ModelFormatError", "ModelSaveError", "NotFittedError", "WeightsUnavailableError", "__version__",
]
