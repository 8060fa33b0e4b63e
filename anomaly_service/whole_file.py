"""Output files written whole or not at all.

A file written in place on a volume that fills up midway is left short under its final name, where a script reads
it as written whole (a metrics.json cut off, a PNG that is half a picture), and an earlier good file at that path is
lost. :func:`write_whole` writes beside the target and renames over it once every byte is down; a writer that streams
(``records export``) takes its file from :func:`open_beside` and renames it itself.

"Down" means on the disk, not in the page cache: a power cut (or a host reset) after a rename whose file's data was
still cached left the new name on a file of zeros or of no bytes at all (the file system commits names and sizes
before it writes delayed data), and the stored pictures are written before the record that names them. So the data
is synced before the rename and the directory after it (:func:`sync_and_rename`): once the call returns, the file
is whole under its name through any power cut, and before that its name is the earlier file or none.
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


def sync_dir(path: Path) -> None:
    """Sync the directory ``path`` (its names: a rename or a new file in it). A file system that cannot sync a
    directory (some network ones refuse) is left as it is: its names are as durable as it makes them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_and_rename(tmp: Path, fd: int, target: Path) -> None:
    """Sync the file written through ``fd`` (left open), rename ``tmp`` over ``target``, then sync their directory:
    a power cut leaves ``target`` the earlier file or the new one, whole, never a new name on bytes not yet down."""
    os.fsync(fd)
    os.replace(tmp, target)
    sync_dir(target.parent)


def sync_tree(root: Path) -> None:
    """Sync every file and directory under ``root`` (its own name is the caller's, once renamed into place): a
    copy made whole in the page cache (a backup) is whole on the disk before it takes the place of an earlier one."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(here))


def write_whole(target: Path, data: bytes, mode: int = 0o666, prefix: str | None = None) -> None:
    """Write ``data`` as ``target`` through a temporary file in its directory (:func:`open_beside`), renamed over it
    once written and synced (:func:`sync_and_rename`); on any failure the temporary file is removed and ``target``
    is as it was (absent, or the earlier file)."""
    tmp, fd = open_beside(target, mode, prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            sync_and_rename(tmp, fh.fileno(), target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
