"""Output files written whole or not at all.

A file written in place on a volume that fills up midway is left short under its final name, where a script reads
it as written whole (a metrics.json cut off, a PNG that is half a picture), and an earlier good file at that path is
lost. :func:`write_whole` writes beside the target and renames over it once every byte is down.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_whole(target: Path, data: bytes) -> None:
    """Write ``data`` as ``target`` through a temporary file in its directory, renamed over it once written; on
    any failure the temporary file is removed and ``target`` is as it was (absent, or the earlier file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
