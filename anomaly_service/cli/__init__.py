"""``anomaly`` command line: a thin shell over :class:`AnomalyModel`, one module per group of commands. Importing
the package registers every command on :data:`app`."""

from . import fit, info, records, scoring, service, versions  # noqa: F401 - each registers its commands
from .group import app, main
from .scoring import score

__all__ = ["app", "main", "score"]
