"""numba's compiler, with its disk cache where one can be written and without it where none can.

Why: ``njit(cache=True)`` looks for a writable cache directory when a function is decorated (beside the module, then
the user's cache directory) and raises when it finds none. A container with a read-only root filesystem and no
``NUMBA_CACHE_DIR`` has none, and importing a compiled kernel there would fail the fit or the scoring that needs it.
Without the cache each process compiles its kernels once, on first use.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

from numba import njit

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def compiled(**options: Any) -> Callable[[F], F]:
    """``njit(cache=True, **options)``, or ``njit(**options)`` where no cache directory can be written."""

    def wrap(func: F) -> F:
        try:
            return njit(cache=True, **options)(func)
        except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
            log.info("compiling %s without numba's disk cache (%s); set NUMBA_CACHE_DIR to a writable directory "
                     "to keep it between runs", func.__qualname__, exc)
            return njit(**options)(func)

    return wrap
