"""Per-thread intra-op thread budgets, so concurrent inference passes share the cores instead of fighting.

Why: on a small CPU one pass with every core is the fastest way to score one image, but two passes with half the
cores each score more images per second (small ops and reductions do not scale across threads, whole passes do;
docs/benchmarks.md). The service therefore gives a pass all cores when it runs alone and a
share when another is running. torch's OpenMP thread count is per calling thread once set there, and ONNX Runtime
sessions have fixed pools, so the budget is kept per thread and the ONNX backbone keeps one session per size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
_local = threading.local()
_PROCESS_THREADS = torch.get_num_threads()  # torch's own default (cores, or OMP_NUM_THREADS), read at import


def load_faiss_after_torch() -> None:
    """Import FAISS after torch, so that both run on torch's OpenMP thread pool.

    Why: the FAISS wheel brings its own copy of the OpenMP runtime. Loaded after torch, FAISS's OpenMP calls bind
    to torch's runtime (torch loads it into the global symbol scope) and one pool of threads serves both. Loaded
    first, FAISS keeps its own pool: after every search its idle threads spin on the cores that torch's backbone
    and map need next, and a photo's other stages slowed by about as much as the approximate search saved
    (docs/benchmarks.md). A process that imported FAISS before torch cannot be mended here; the log says so."""
    import faiss  # noqa: F401  (torch is imported above)

    warn_if_faiss_came_first()


_warned = False


def warn_if_faiss_came_first() -> None:
    """Say once that this process imported FAISS before torch, which the package cannot undo. The package no
    longer imports torch with itself, so `import anomaly_service` before FAISS does not help: torch must come first.
    Called at this module's import too, which every module that imports FAISS brings in: a process that imported
    FAISS and then one of those directly (``from anomaly_service.model import AnomalyModel``) is told as well."""
    global _warned
    loaded = list(sys.modules)  # in the order their imports began
    if not _warned and "faiss" in sys.modules and loaded.index("faiss") < loaded.index("torch"):
        _warned = True
        log.warning("faiss was imported before torch: the two keep separate OpenMP thread pools, which slows "
                    "scoring on a CPU; import torch before faiss")


def thread_budget() -> int:
    """Intra-op threads the calling thread may use: its budget if one was set, else torch's setting."""
    return getattr(_local, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(n: int, restore: int | None = None) -> Iterator[None]:
    """Run the body with ``n`` intra-op threads in the calling thread (torch and the ONNX backbone).

    ``torch.set_num_threads`` also sets the process-wide value that new threads start from, and concurrent passes
    would leave it at whatever ran last; so afterwards it is set to ``restore`` (the process's configured count,
    e.g. the service's) rather than to a value read back at entry, which another pass may have changed.
    """
    n = max(1, int(n))
    before = getattr(_local, "threads", None)
    _local.threads = n
    torch.set_num_threads(n)
    try:
        yield
    finally:
        _local.threads = before
        torch.set_num_threads(before or restore or _PROCESS_THREADS)


def default_inference_workers(device_type: str, cores: int) -> int:
    """Two concurrent passes on a CPU with at least two cores; one on a GPU, which batches within a pass."""
    return 1 if device_type != "cpu" else max(1, min(2, cores))


def fit_threads_to_cpu_quota(cpu_count: int | None = None) -> int:
    """Cap torch's intra-op threads at the CPUs this process may really use; returns the thread count.

    torch starts one thread per host core, but a container limited to 2 CPUs on a 64-core node would then run 64
    threads on 2 CPUs' worth of quota and be throttled into long stalls. joblib's ``cpu_count`` reads the CPU
    affinity and the quota at the cgroup mount's root, which is where a container sees its own; a quota on the
    process's own group below that root (a systemd unit's ``CPUQuota=``, a group a process manager made) is read
    up the hierarchy (cgroups.py). An explicit OMP_NUM_THREADS wins.
    """
    global _PROCESS_THREADS
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if cpu_count is None:
        import joblib

        from .cgroups import cpu_limit

        cpu_count = joblib.cpu_count()
        quota = cpu_limit()
        if quota is not None:  # a part of a CPU still runs one thread, as joblib rounds its own reading up
            cpu_count = min(cpu_count, max(1, math.ceil(quota)))
    n = max(1, min(torch.get_num_threads(), int(cpu_count)))
    if n != torch.get_num_threads():
        log.info("using %d intra-op threads (CPU quota/affinity allows %d)", n, cpu_count)
        torch.set_num_threads(n)
    _PROCESS_THREADS = n
    return n


def _one_thread_after_fork() -> None:
    """In a child that ``fork`` made: one intra-op thread, for torch and FAISS alike.

    Why: a forked child inherits the parent's OpenMP state but not its pool's threads, so once the parent had run
    any tensor or FAISS work (a model that scored), the child's first parallel region waited for threads that are
    not there and the worker hung without a word (a ``multiprocessing`` pool on Linux's default start method,
    ``gunicorn --preload``). On one thread OpenMP starts no team and the child scores; a pool of such children
    shares the cores by process. ``spawn`` and ``forkserver`` start fresh and keep every thread."""
    global _PROCESS_THREADS
    _PROCESS_THREADS = 1
    torch.set_num_threads(1)
    faiss = sys.modules.get("faiss")
    if faiss is not None:  # its own OpenMP runtime, where it was imported before torch
        faiss.omp_set_num_threads(1)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_one_thread_after_fork)

warn_if_faiss_came_first()
