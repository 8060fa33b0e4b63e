"""Progress bars for long steps: shown on a terminal, silent in logs and CI (tqdm's ``disable=None``)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(enabled: bool, iterable: Any = None, **kwargs: Any) -> tqdm:
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
