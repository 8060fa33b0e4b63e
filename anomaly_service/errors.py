"""User-facing errors. Each carries a message a plant engineer can act on; the CLI prints it on one line."""

from collections.abc import Mapping
from typing import Any


class AnomalyError(Exception):
    """Base class for errors caused by input, configuration or environment rather than by a bug."""


class ConfigError(AnomalyError, ValueError):
    """An option or combination of options that cannot work."""


class WeightsUnavailableError(AnomalyError):
    """Backbone weights could neither be loaded from a file nor downloaded."""


class ImageLoadError(AnomalyError):
    """An input is not a readable image, is truncated, or exceeds the configured limits.

    ``kind`` says which, so the HTTP service can answer with the right status: ``empty``, ``not_image``,
    ``unsupported_format``, ``corrupt``, ``too_large``, ``too_small``, ``missing`` or ``bad_array``.
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


class ModelFormatError(AnomalyError):
    """A model artifact on disk is missing, corrupt, truncated or from an incompatible version."""


class ModelSaveError(AnomalyError, OSError):
    """A model could not be written (a full disk, a directory that takes no writes); any model there is kept."""


class NotFittedError(AnomalyError):
    """The model has not been fitted (or loaded) yet."""


class UpdateUnavailableError(AnomalyError):
    """The model cannot take an update (e.g. it was saved before updates existed and lacks calibration data)."""


class AlreadyCurrentError(AnomalyError):
    """A rollback to the version already served: nothing to roll back. Its own class, so callers can say so (a
    conflict with the model's state) instead of "no such version"."""


class VersionConflictError(AnomalyError):
    """A rollback that names the version it replaces (what its caller saw served) found another served: the model
    changed since, and a rollback then would take that change back too, unseen."""


class UpdateRefusedError(AnomalyError):
    """An update was refused to protect known defects; ``images`` names them.

    ``reason``: ``defect_would_pass`` (after the update these images reviewed as defects would score below the
    threshold; ``force`` overrides it) or ``defect_as_good`` (an image reviewed as a defect was offered as good;
    never overridable).
    """

    def __init__(self, message: str, images: list[str], reason: str = "defect_would_pass"):
        super().__init__(message)
        self.images = list(images)
        self.reason = reason


class ContaminationError(AnomalyError):
    """A fit with ``contamination=fail`` found training images that look unlike the other good ones, or an update
    with it added good images the updated model still flags; ``suspects`` lists them (contamination.Suspect, or an
    update's image names)."""

    def __init__(self, message: str, suspects: list):
        super().__init__(message)
        self.suspects = list(suspects)


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: numpy's MemoryError, or torch's RuntimeError (CPU) and OutOfMemoryError (GPU).
    Sizes an option asks for (a large --image-size) reach it; it is bad input, not a bug, and a traceback hid that.
    The service answers it as its memory running out (503), not as a fault of its own (500)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def validation_message(error: Mapping[str, Any]) -> str:
    """One pydantic error's message, a validator's own sentence without pydantic's ``Value error,`` tag: what the
    API, a refused setting and a refused manifest all say."""
    msg = str(error.get("msg", "invalid"))
    return msg.removeprefix("Value error, ") if error.get("type") == "value_error" else msg
