"""How the package shares the CPU's threads between torch and FAISS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _imports(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))


def test_the_package_loads_faiss_after_torch_and_warns_when_it_cannot():
    """FAISS loaded after torch shares torch's OpenMP threads (parallelism.py); loaded first it keeps a second
    pool, which the package cannot undo, so it says how to avoid it."""
    order = _imports("import sys, anomaly_service; mods = list(sys.modules); "
                     "print(mods.index('torch') < mods.index('faiss'))")
    assert order.returncode == 0 and order.stdout.strip() == "True" and "faiss was imported" not in order.stderr
    late = _imports("import faiss, anomaly_service")
    assert late.returncode == 0 and "faiss was imported before torch" in late.stderr
    late_both = _imports("import faiss, torch, anomaly_service")  # torch there too, but after FAISS
    assert late_both.returncode == 0 and "faiss was imported before torch" in late_both.stderr
    torch_first = _imports("import torch, faiss, anomaly_service")
    assert torch_first.returncode == 0 and "faiss was imported" not in torch_first.stderr
