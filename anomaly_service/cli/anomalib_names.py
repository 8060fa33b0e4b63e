"""Usage errors made with anomalib's spelling of a flag or a backbone, said with this product's (the table:
anomaly_service/anomalib_names.py). Click's guess of a near flag is left out of those: for them it pointed
elsewhere."""

from __future__ import annotations

from typing import Any

import click

from ..anomalib_names import flag, said_of, said_of_backbone


def message(exc: click.ClickException) -> str | None:
    """The error for a flag or backbone spelt as anomalib spells it, or None when it is not one of those."""
    if isinstance(exc, click.NoSuchOption):
        said = said_of(exc.option_name, flag)
        return f"No such option '{exc.option_name}': {said}" if said else None
    if isinstance(exc, click.BadParameter) and getattr(exc.param, "name", None) == "backbone":
        said = said_of_backbone(_refused_value(exc))
        return f"Invalid value for '--backbone': {said}" if said else None
    return None


def _refused_value(exc: click.BadParameter) -> Any:
    """The value a choice refused: click keeps it only in the message, ``'VALUE' is not one of ...``."""
    message = exc.message
    return message.split("'")[1] if message.count("'") >= 2 else None
