"""The backbone's ONNX graph kept on disk between processes, so a start-up need not build and export it again.

Why: under ONNX Runtime (the CPU default) a process that loads a model built the PyTorch network from timm (whose
import brings torchvision and torch's compiler package) and traced it to ONNX, every time: most of what `anomaly
serve` spends before its first model is ready, and of what a one-photo `anomaly score` costs. The graph depends
only on the weights, the extractor's code and the exporter, so it is stored under a key made of those: the weights'
SHA-256 (which every load verifies anyway), the backbone and its taps, the versions of torch and onnx (the
exporter) and of timm and torchvision (the networks' code), and the bytes of the modules that build and export the
extractor. Any change to one of them is another key, never a stale graph.

Where: ``ANOMALY_CACHE_DIR`` (``none`` turns the cache off), else ``$XDG_CACHE_HOME/anomaly``, else
``~/.cache/anomaly``; the graphs go in its ``onnx`` folder. A graph is read only from a folder and file this user
owns that no one else can write (a graph decides the scores), and only if its bytes have the SHA-256 written beside
it; anything else is a miss, and the graph is exported as before. A cache that cannot be read or written (a
read-only home, a full disk) costs the export, never the load: it is said once, at INFO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from importlib import metadata
from pathlib import Path

from .whole_file import write_whole

log = logging.getLogger(__name__)

ENV = "ANOMALY_CACHE_DIR"
OFF = ("", "none", "off")
_SOURCES = ("backbones.py", "onnx_backbone.py", "graph_cache.py")  # the code a graph is built and exported by
_said: set[str] = set()
_said_lock = threading.Lock()


def _say_once(what: str, level: int = logging.INFO) -> None:
    with _said_lock:
        if what in _said:
            return
        _said.add(what)
    log.log(level, "backbone graph cache not used: %s; the graph is exported in this process", what)


def _say_untrusted(why: str) -> None:
    """A cache folder or file the process may not trust is someone's to fix (another user's folder, one a volume's
    group made writable): a WARNING, which the commands show, where INFO was seen only in the service's log and a
    re-scoring shard paid the export at every run without a word."""
    _say_once(f"{why} (give this user a folder of its own with {ENV}, or make this one its alone)", logging.WARNING)


def cache_dir() -> Path | None:
    """The folder the graphs go in, or None where the cache is off (or no home can be named)."""
    env = os.environ.get(ENV)
    if env is not None:
        # ~ expanded as TORCH_HOME's is: a unit's Environment= passes it through, and a folder named ~ in the
        # working directory is one an `rm -rf ~` meant for it would not stop at
        return None if env.strip().lower() in OFF else Path(env).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            return None
    return Path(base) / "anomaly" / "onnx"


def graph_key(backbone: str, layers: tuple[str, ...], weights_sha256: str, opset: int) -> str | None:
    """What a graph depends on, hashed: the weights, the backbone and its taps, the exporter, our export code. None
    where that code cannot be read as files (a frozen or zipped install): no key can vouch for a graph there."""
    here = Path(__file__).parent
    try:
        code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()
    except OSError as exc:
        _say_once(f"the package's source cannot be read ({exc})")
        return None

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    # timm and torchvision hold the code of the networks themselves (Lite, ResNet): theirs is the graph's code too
    parts = {"backbone": backbone, "layers": list(layers), "weights": weights_sha256, "opset": opset,
             "torch": version("torch"), "onnx": version("onnx"), "timm": version("timm"),
             "torchvision": version("torchvision"), "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _trusted(path: Path, folder: bool) -> str | None:
    """Why ``path`` is not to be trusted with a graph (None: it is): owned by another user, writable by others,
    or not the kind of file expected (a link is not followed)."""
    st = path.lstat()
    if folder and not stat.S_ISDIR(st.st_mode) or not folder and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a {'folder' if folder else 'file'}"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users"
    return None


def load(key: str | None) -> bytes | None:
    """The cached graph for ``key``, or None (absent, untrusted, or not the bytes written)."""
    folder = cache_dir()
    if folder is None or key is None:
        return None
    graph, meta = folder / f"{key}.onnx", folder / f"{key}.json"
    try:
        if not meta.exists():
            return None
        for path, is_folder in ((folder, True), (meta, False), (graph, False)):
            why = _trusted(path, is_folder)
            if why is not None:
                _say_untrusted(why)
                return None
        expected = json.loads(meta.read_text())["sha256"]
        data = graph.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say_once(f"{folder} could not be read ({exc})")
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        log.warning("the cached backbone graph %s is not the one written (damaged on disk); exporting it again",
                    graph)
        return None
    return data


def store(key: str | None, data: bytes, about: dict[str, str]) -> None:
    """Keep ``data`` as the graph for ``key`` (written whole, then its digest beside it); ``about`` names it for a
    person reading the folder. Failing to keep it is said once and otherwise ignored."""
    folder = cache_dir()
    if folder is None or key is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        why = _trusted(folder, True)
        if why is not None:
            _say_untrusted(why)
            return
        write_whole(folder / f"{key}.onnx", data, mode=0o600)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), **about}
        write_whole(folder / f"{key}.json", (json.dumps(meta, indent=1) + "\n").encode(), mode=0o600)
    except OSError as exc:
        _say_once(f"{folder} could not be written ({exc})")
