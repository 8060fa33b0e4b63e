"""Optional ONNX Runtime execution of the backbone's feature extractor on the CPU.

Why: for efficientnet_lite0 ONNX Runtime's CPU kernels (depthwise convolutions above all) ran the extractor several
times faster than PyTorch eager on small CPUs (docs/decisions.md). The network is exported from the very module that
PyTorch runs, when the first model of those weights is loaded (later ones share it: shared_extractor), and kept on
disk under a key of what it was made from (graph_cache.py), so a later process reads it back instead of building and
exporting the network again; scores agree with the PyTorch path to 1e-4 relative (tested), and
unlike PyTorch's they do not change with the thread count (docs/decisions.md "Same photo, same answer").
onnxruntime and onnx are dependencies; when either is missing ``auto`` uses PyTorch.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import graph_cache
from .errors import ConfigError
from .options import RUNTIME_OPTIONS
from .parallelism import thread_budget

if TYPE_CHECKING:
    from .backbones import LoadedBackbone

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_OPTIONS["runtime"].choices or ()


def onnx_available() -> bool:
    """Both halves installed: onnx (the exporter writes through it) and onnxruntime (runs the graph). onnx is looked
    up, not imported: it is needed only for an export, which a cached graph spares, and its import is slow (a broken
    install still fails the export, and ``auto`` then falls back to PyTorch). onnxruntime is imported here, when a
    model is made or loaded, as both were before: a stop's SIGTERM met inside its import, later, once a fit was under
    way, came back as its ImportError "initialization failed" (embedder._interrupted)."""
    from importlib.util import find_spec

    if find_spec("onnx") is None:
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


OPSET = 17


def export_graph(extractor: nn.Module) -> bytes:
    """The ONNX graph of ``extractor`` (dynamic batch, height and width), serialized."""
    with torch.no_grad():
        n_out = len(extractor(torch.zeros(1, 3, 64, 64)))
    names = [f"map{i}" for i in range(n_out)]
    buf = io.BytesIO()
    axes = {"x": {0: "n", 2: "h", 3: "w"}} | {n: {0: "n", 2: "h", 3: "w"} for n in names}
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is deprecated; it is the
        warnings.simplefilter("ignore")  # one that needs no extra package (the dynamo one needs onnxscript)
        torch.onnx.export(extractor, (torch.zeros(1, 3, 64, 64),), buf, input_names=["x"], output_names=names,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


class OnnxExtractor:
    """Callable like the torch extractor: ``(N, 3, H, W)`` tensor -> list of the tapped feature maps.

    Made from the extractor (exported here) or from its graph already exported (read from the cache); sessions
    are made per intra-op thread count on first use (a session's pool is fixed), so a pass runs with the calling
    thread's budget (see parallelism.py).
    """

    def __init__(self, source: nn.Module | bytes, threads: int | None = None):
        if not onnx_available():
            raise ConfigError("runtime 'onnx' needs onnxruntime and onnx: pip install onnxruntime onnx "
                              "(or use --runtime torch)")
        self.graph = source if isinstance(source, bytes) else export_graph(source)
        self.threads = threads
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        _EXTRACTORS.add(self)
        self.session_for(threads or torch.get_num_threads())  # now, so session errors show at load

    def session_for(self, threads: int) -> Any:
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                # no spinning after a run: the kNN search that follows uses torch's threads on the same cores
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if _shared_arena():
                    opts.add_session_config_entry("session.use_env_allocators", "1")
                self._sessions[threads] = ort.InferenceSession(self.graph, opts, providers=["CPUExecutionProvider"])
            return self._sessions[threads]

    @property
    def session_threads(self) -> list[int]:
        """Thread counts that have a session built (one per budget the extractor has run under)."""
        with self._lock:
            return sorted(self._sessions)

    def __getstate__(self) -> dict[str, Any]:
        """What a pickled model carries: the exported graph, not its sessions, which are native objects of this
        process (pickle refused them, and with them every fitted model); they are made again on first use."""
        return {"graph": self.graph, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.graph, self.threads = state["graph"], state["threads"]
        self._sessions = {}
        self._lock = threading.Lock()
        _EXTRACTORS.add(self)

    def __deepcopy__(self, memo: dict) -> OnnxExtractor:
        return self  # the sessions are read-only and safe to share between threads, like the shared torch backbone

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        session = self.session_for(self.threads or thread_budget())
        outs = session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return [torch.from_numpy(o) for o in outs]


def _sessions_left_to_the_parent() -> None:
    """In a child that ``fork`` made: each extractor starts with no session, and the ones it inherited are never
    freed.

    Why: a session with more than one intra-op thread owns a pool whose threads stay in the parent, and freeing its
    copy in the child waits for ever on the pool's condition variable (onnxruntime#31961 reports the same free
    crashing in pthread_join). Every forked child that ended normally hung at its interpreter's exit, the model
    untouched or not (``gunicorn --preload``'s workers, a plain ``os.fork``), and so did one that dropped its model.
    The child makes sessions of its own on first use (at one thread: parallelism.py); the inherited ones are held
    by an extra reference the child never gives back, their memory the parent's pages shared until written."""
    import ctypes

    for extractor in list(_EXTRACTORS):
        for session in extractor._sessions.values():
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(session))
        extractor._sessions = {}
        extractor._lock = threading.Lock()  # held by another of the parent's threads at the fork, it never opens


# every extractor of the process, for the fork hook above
_EXTRACTORS: "weakref.WeakSet[OnnxExtractor]" = weakref.WeakSet()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_sessions_left_to_the_parent)


def _shared_arena() -> bool:
    """One CPU memory arena for every session of the process, registered on first use. A session's own arena grows
    to the largest pass it ran and keeps it: each thread budget has a session, so a model's largest pass (a tiled
    one: a batch of tiles) was held once per budget, and once more per backbone. False where this onnxruntime
    cannot register one: each session keeps its own, as before."""
    global _ARENA
    with _ARENA_LOCK:
        if _ARENA is None:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, None)
                _ARENA = True
            except Exception as exc:  # an older onnxruntime, or one already registered by the embedding process
                log.info("ONNX Runtime sessions keep arenas of their own (%s)", exc)
                _ARENA = False
        return _ARENA


_ARENA: bool | None = None
_ARENA_LOCK = threading.Lock()


def shared_extractor(backbone: LoadedBackbone) -> OnnxExtractor:
    """The ONNX export of ``backbone`` and its sessions, made once for every model that loaded these weights
    (backbones.load_backbone shares the torch network the same way). A session holds its own copy of the weights
    and its own memory arena, so one export per model made a service of twenty models hold twenty copies. Sharing
    is safe: a session runs concurrent calls, and a model swapped by a reload keeps the same network."""
    with _EXPORT_LOCK:
        found = _EXPORTS.get(backbone)
        if found is None:  # the export runs under the lock: two models loading at once must not export twice
            found = _EXPORTS[backbone] = _cached_or_exported(backbone)
        return found


def _cached_or_exported(backbone: LoadedBackbone) -> OnnxExtractor:
    """The extractor from the graph a process before this one exported (graph_cache.py); else exported now, from
    the PyTorch network (built here if it was not yet), and kept for the next process."""
    key = graph_cache.graph_key(backbone.spec.name, backbone.spec.layers, backbone.checksum, OPSET)
    graph = graph_cache.load(key)
    if graph is not None:
        try:
            extractor = OnnxExtractor(graph)
            backbone.drop_weights()  # the network may never be built now: its weights are not held for it
            return extractor
        except (ConfigError, ImportError):  # onnxruntime itself is missing or broken: no export would run either
            raise
        except Exception as exc:  # a graph this onnxruntime refuses (written by a newer exporter): export anew
            log.info("the cached backbone graph was refused (%s); exporting it again", exc)
    extractor = OnnxExtractor(backbone.extractor)
    graph_cache.store(key, extractor.graph, {"backbone": backbone.spec.name, "weights_sha256": backbone.checksum,
                                             "weights_source": backbone.source, "opset": str(OPSET)})
    return extractor


# ONNX exports by the loaded backbone they were made from, kept while it is (its models hold it)
_EXPORTS: "weakref.WeakKeyDictionary[LoadedBackbone, OnnxExtractor]" = weakref.WeakKeyDictionary()
_EXPORT_LOCK = threading.Lock()


def resolve_runtime(runtime: str, device_type: str) -> str:
    """``auto`` -> ``onnx`` on the CPU when onnxruntime is installed, else ``torch``; ``onnx`` is CPU only."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if device_type != "cpu":
        if runtime == "onnx":
            log.warning("runtime onnx runs on the CPU only; using PyTorch on %s", device_type)
        return "torch"
    if runtime == "auto":
        return "onnx" if onnx_available() else "torch"
    return runtime
