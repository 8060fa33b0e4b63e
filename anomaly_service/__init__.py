"""anomaly: industrial visual anomaly detection (PatchCore memory bank + calibrated threshold + heatmaps)."""

__version__ = "0.1.0"

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
