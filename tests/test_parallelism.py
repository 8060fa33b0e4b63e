"""How the package shares the CPU's threads between torch and FAISS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _imports(*programs: str) -> list[subprocess.CompletedProcess]:
    """Run each program in a fresh interpreter, all at once (each spends its time importing torch)."""
    cwd = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=cwd) for code in programs]
    out = []
    for proc, code in zip(procs, programs):
        stdout, stderr = proc.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(code, proc.returncode, stdout, stderr))
    return out


def test_the_package_loads_faiss_after_torch_and_warns_when_it_cannot():
    """FAISS loaded after torch shares torch's OpenMP threads (parallelism.py); loaded first it keeps a second
    pool, which the package cannot undo, so it says how to avoid it."""
    order, late, late_both, torch_first = _imports(
        "import sys, anomaly_service; mods = list(sys.modules); print(mods.index('torch') < mods.index('faiss'))",
        "import faiss, anomaly_service",
        "import faiss, torch, anomaly_service",  # torch there too, but after FAISS
        "import torch, faiss, anomaly_service")
    assert order.returncode == 0 and order.stdout.strip() == "True" and "faiss was imported" not in order.stderr
    assert late.returncode == 0 and "faiss was imported before torch" in late.stderr
    assert late_both.returncode == 0 and "faiss was imported before torch" in late_both.stderr
    assert torch_first.returncode == 0 and "faiss was imported" not in torch_first.stderr
