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
            kernel = njit(cache=True, **options)(func)
        except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
            log.info("compiling %s without numba's disk cache (%s); set NUMBA_CACHE_DIR to a writable directory "
                     "to keep it between runs", func.__qualname__, exc)
            return njit(**options)(func)
        if hasattr(kernel, "_cache"):  # not the Python function NUMBA_DISABLE_JIT hands back
            kernel._cache = _CacheOrNot(kernel._cache, func.__qualname__)
        return kernel

    return wrap


class _CacheOrNot:
    """numba's disk cache of one kernel, whose failure to be read or written costs the cache, never the call.

    Why: numba checks the directory when a function is decorated but reads and writes it when a kind of array is
    first compiled, and raises from that call where the directory has since filled up or turned read-only."""

    def __init__(self, cache: Any, name: str):
        self._cache, self._name = cache, name

    # numba's own arguments passed on as they come: the wrapper outlives a change of its internal signatures
    def load_overload(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._cache.load_overload(*args, **kwargs)
        except OSError as exc:
            log.warning("numba's disk cache of %s cannot be read (%s); compiling it", self._name, exc)
            return None

    def save_overload(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._cache.save_overload(*args, **kwargs)
        except OSError as exc:
            log.warning("numba's disk cache of %s cannot be written (%s); compiled in memory", self._name, exc)

    def __getattr__(self, name: str) -> Any:  # flush, cache_path, ...
        return getattr(self._cache, name)
