"""The model on disk: a directory with ``manifest.json``, ``index.faiss`` and ``arrays.npz``.

The manifest (manifest.py) is self-describing (what was fitted, how, from what) and records each file's size and SHA-256, so
loading detects truncation and corruption instead of scoring with half a model. Writes go to a temporary sibling
directory that is swapped in with renames, so a crash mid-save never leaves a broken model where a good one was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError
from .manifest import MANIFEST, Manifest, parse_manifest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_artifact(path: str | Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Atomically write ``files`` plus a manifest (with their checksums added) as directory ``path``."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    manifest = dict(manifest)
    manifest["files"] = {name: {"bytes": len(data), "sha256": sha256(data)} for name, data in files.items()}
    tmp.mkdir()
    try:
        for name, data in {**files, MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode()}.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            if not (path / MANIFEST).is_file() and any(path.iterdir()):
                raise ModelFormatError(f"{path} exists and is not a model directory; refusing to replace it")
            os.replace(path, old)  # from here until the next line, the previous model is at `old`
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.old-*"):  # copies a crashed save left: superseded now
        shutil.rmtree(stale, ignore_errors=True)
    return path


ABANDONED_AFTER_S = 600.0  # a temporary directory this old belongs to a save that died, not to one running now


def recover(path: str | Path) -> bool:
    """Put back the previous model when a save died between its two renames (only ``.old-`` copies are left).

    The ``.old-`` directory is the complete previous model; it is verified before it is renamed into place.
    Returns True when a model was recovered.
    """
    path = Path(path)
    if path.exists():
        return False
    backups = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for backup in backups:
        try:
            read_artifact(backup)
            os.replace(backup, path)
        except (ModelFormatError, OSError):
            continue
        _fsync_dir(path.parent)
        return True
    return False


def recover_all(directory: str | Path) -> list[str]:
    """Recover every model under ``directory`` whose save died mid-swap; remove abandoned temporary copies."""
    directory = Path(directory)
    recovered = []
    if not directory.is_dir():
        return recovered
    now = time.time()
    for leftover in directory.glob(".*.*-*"):
        name, _, kind = leftover.name[1:].rpartition(".")
        if kind.startswith("old-") and recover(directory / name):
            recovered.append(name)
        elif leftover.is_dir() and now - leftover.stat().st_mtime > ABANDONED_AFTER_S and (
                kind.startswith("tmp-") or (kind.startswith("old-") and (directory / name / MANIFEST).is_file())):
            shutil.rmtree(leftover, ignore_errors=True)
    return recovered


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate only the manifest of a model directory (no other file is read or verified)."""
    path = Path(path)
    if not path.exists() and not recover(path):
        raise ModelFormatError(f"no model at {path}")
    if not path.is_dir():
        raise ModelFormatError(f"{path} is not a model directory")
    try:
        raw = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path} has no {MANIFEST}: not a model directory, or an incomplete copy") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path / MANIFEST} is corrupt ({exc})") from None
    except OSError as exc:
        raise ModelFormatError(f"{path / MANIFEST} cannot be read ({exc.strerror})") from None
    return parse_manifest(raw, str(path))


def read_artifact(path: str | Path) -> tuple[Manifest, dict[str, bytes]]:
    """Read and verify a model directory; returns ``(manifest, files)`` or raises :class:`ModelFormatError`."""
    path = Path(path)
    manifest = read_manifest(path)
    files: dict[str, bytes] = {}
    for name, meta in manifest.files.items():
        f = path / name
        if not f.is_file():
            raise ModelFormatError(f"{path} is incomplete: {name} is missing")
        data = f.read_bytes()
        if len(data) != meta.bytes:
            raise ModelFormatError(f"{f} is truncated or altered: {len(data)} bytes, manifest says {meta.bytes}")
        if sha256(data) != meta.sha256:
            raise ModelFormatError(f"{f} is corrupt: its SHA-256 does not match the manifest")
        files[name] = data
    return manifest, files


def bytes_to_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ModelFormatError(f"model arrays are unreadable ({exc})") from None
