"""numba kernels where no disk cache can be written (jit.py)."""

import numpy as np
import pytest
from numba import njit
from numba.core import caching

from anomaly_service.jit import compiled


def _fill(a):
    out = np.empty_like(a)
    for i in range(len(a)):
        out[i] = a[len(a) - 1 - i]
    return out


def test_a_kernel_compiles_in_memory_where_numba_finds_no_cache_directory(monkeypatch):
    """A read-only root filesystem (a hardened pod without NUMBA_CACHE_DIR) leaves numba no cache directory:
    ``njit(cache=True)`` raises when it decorates there, and a kernel must still load and answer, compiled in
    memory."""
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # no directory can be written
    with pytest.raises(RuntimeError, match="no locator"):
        njit(cache=True)(_fill)
    kernel = compiled(nogil=True)(_fill)
    assert np.array_equal(kernel(np.arange(4)), [3, 2, 1, 0])


def test_the_fill_kernel_and_the_greedy_kernels_import_where_no_cache_can_be_written(monkeypatch):
    """The modules that hold compiled loops import (and so the fit and an aligned model's scoring run) with no
    cache directory."""
    import importlib
    import sys

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    for name in ("anomaly_service.grain_kernel", "anomaly_service.coreset_kernel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        module = importlib.import_module(name)
        assert module.__name__ == name
    a = np.arange(6, dtype=np.uint8).reshape(3, 2)
    out = np.empty_like(a)
    lines = np.zeros(2, np.int32)
    sys.modules["anomaly_service.grain_kernel"].fill_columns(a, out, np.arange(2, dtype=np.int32), lines, lines + 1)
    assert np.array_equal(out, [[0, 1], [2, 3], [2, 3]])  # rows 0-1 kept, row 2 mirrored from row 1


def test_a_kernel_still_answers_where_its_cache_cannot_be_written_when_it_compiles(monkeypatch):
    """numba checks its cache directory when a function is decorated, and writes it when the function first
    compiles: a directory full or made read-only in between raised from that first call (a turned photo's error).
    The kernel must answer, compiled in memory."""
    import errno

    def unwritable(self, key, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(caching.IndexDataCacheFile, "load", lambda self, key: None)  # nothing cached yet
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", unwritable)
    kernel = compiled(nogil=True)(_fill)
    assert np.array_equal(kernel(np.arange(4)), [3, 2, 1, 0])
    assert np.array_equal(kernel(np.arange(3.0)), [2.0, 1.0, 0.0])  # and another kind of array after it


def test_a_kernel_runs_as_python_where_numba_s_compiler_is_turned_off(monkeypatch):
    """NUMBA_DISABLE_JIT (a debugging run) makes njit hand back the Python function itself, which has no cache."""
    import numba

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    kernel = compiled(nogil=True)(_fill)
    assert np.array_equal(kernel(np.arange(4)), [3, 2, 1, 0])
