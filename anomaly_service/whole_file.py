"""Output files written whole or not at all.

A file written in place on a volume that fills up midway is left short under its final name, where a script reads
it as written whole (a metrics.json cut off, a PNG that is half a picture), and an earlier good file at that path is
lost. :func:`write_whole` writes beside the target and renames over it once every byte is down; a writer that streams
(``records export``) takes its file from :func:`open_beside` and renames it itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def open_beside(target: Path, mode: int = 0o666, prefix: str | None = None, suffix: str = ".tmp") -> tuple[Path, int]:
    """A new file of its own beside ``target`` (its path, and a descriptor open for writing), to be renamed over it
    once written whole: a random name per call, created exclusively, so two writers of one target never share one.

    The file gets ``mode`` less the umask, as a plain write would (mkstemp's is always 0600: evaluate's report and
    score's heatmaps are for others to look at too). ``prefix`` names the temporary file (default: ``.NAME.``), for a
    store that sweeps its own leftovers by name. The default names only the start of a long name: a target's name
    may take the file system's whole limit, with no room left for a prefix and suffix around it."""
    tmp = target.with_name(f"{f'.{target.name[:32]}.' if prefix is None else prefix}{secrets.token_hex(6)}{suffix}")
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)


def write_whole(target: Path, data: bytes, mode: int = 0o666, prefix: str | None = None) -> None:
    """Write ``data`` as ``target`` through a temporary file in its directory (:func:`open_beside`), renamed over it
    once written; on any failure the temporary file is removed and ``target`` is as it was (absent, or the earlier
    file)."""
    tmp, fd = open_beside(target, mode, prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
