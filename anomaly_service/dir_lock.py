"""An ``flock`` on a directory that a live writer holds for as long as it writes there (and on the lock file that
backups into one folder take turns on).

Why: a process killed outright (the out-of-memory killer, SIGKILL, a power cut) runs no clean-up, and what it was
writing (a backup's partial copy, a fit's spill of patches) stays behind. Its lock dies with it, so the next run
tells a leftover (held by nobody) from a live writer's directory (held) without guessing from times. Where
directories cannot be locked (some network file systems) nothing is held, and leftovers are left for a person.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def hold(path: Path, wait: bool = True, waiting: Callable[[], None] | None = None) -> int | None:
    """The descriptor of ``path`` holding its exclusive ``flock`` (close it to let go), waiting for it unless
    ``wait`` is False; None where ``path`` cannot be opened or locked, or (not waiting) another holds it.
    ``waiting`` is called first when another holds it and this waits: the caller says why it stands still."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def in_turns(take: Callable[[], bool], waiting: Callable[[], None] | None = None, poll_s: float = 1.0) -> None:
    """Call ``take`` until it says it holds, ``poll_s`` apart, calling ``waiting`` once first when it must wait (the
    caller says why it stands still): a wait in turns, not a blocking lock call, so Ctrl-C and SIGTERM still stop
    it."""
    said = False
    while not take():
        if not said and waiting is not None:
            waiting()
        said = True
        time.sleep(poll_s)


def held_by_none(path: Path) -> bool:
    """Whether no live writer holds ``path`` (:func:`hold`); False where that cannot be told."""
    fd = hold(path, wait=False)
    if fd is None:
        return False
    os.close(fd)
    return True


@contextlib.contextmanager
def holding(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``path``'s ``flock`` (:func:`hold`, ``waiting`` as there) for the block; where it cannot be taken the
    block runs unheld."""
    fd = hold(path, waiting=waiting)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


BACKUP_LOCK = ".anomaly-backup.lock"  # the file in a folder that backups into it take turns on


@contextlib.contextmanager
def one_at_a_time(folder: Path, what: str) -> Iterator[None]:
    """Hold the ``flock`` of ``folder``'s backup lock file (made where missing) for the block, waiting, and logging
    that ``what`` (a backup) waits, while another writer into it holds it: two writers of one name there (a nightly
    backup and one by hand) each took the other's copy in progress for their own or for a killed one's. A file, not
    the folder: a cron line ``flock FOLDER anomaly ... backup`` holds the folder's own lock for the backup's life,
    and the backup waited for it for ever. Runs unheld where the file cannot be made or locked."""
    lock = folder / BACKUP_LOCK
    with contextlib.suppress(OSError):  # read-only is enough for flock: one made by root locks out no one
        os.close(os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666))
    with holding(lock, waiting=lambda: log.warning("%s: another backup into %s is under way; waiting for it to end",
                                                   what, folder)):
        yield


COUNT_SLOTS = 1 << 32  # the byte range a family of runs takes turns in: its gate, then one byte per count


def count_turn(f: IO[Any], region: int, count: int) -> Callable[[], bool]:
    """``take`` (for :func:`in_turns`) for runs that split one piece of work into ``count`` shards, each deciding
    alone what is still to do: shards of one count run at once (each has its own part), while a run of another count
    waits until none of the first is left (its parts overlap theirs, so both would do the same images). Process-wide
    POSIX locks on bytes of ``f`` (opened for reading and writing) from ``region``: ``take`` takes the gate byte,
    holds this count's byte shared, and keeps it only if every other count's byte is free; closing ``f`` lets it go.
    Dies with its process, as a killed run's must. Where ``f`` cannot be locked (some network shares) the run goes
    on untaken, as :func:`hold`'s do."""
    fd = f.fileno()
    slot = region + min(max(count, 1), COUNT_SLOTS - 1)
    end = region + COUNT_SLOTS

    def lock(kind: int, length: int, start: int) -> bool:
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB, length, start)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def free(start: int, stop: int) -> bool:
        """Whether no other process holds a byte in [start, stop); an empty range is free (length 0 is "to the
        end of the file" to lockf)."""
        if start >= stop:
            return True
        if not lock(fcntl.LOCK_EX, stop - start, start):
            return False
        fcntl.lockf(fd, fcntl.LOCK_UN, stop - start, start)
        return True

    def take() -> bool:
        try:
            if not lock(fcntl.LOCK_EX, 1, region):
                return False
        except OSError:
            return True  # a file system without locks: unguarded, as before
        try:
            if not lock(fcntl.LOCK_SH, 1, slot):
                return False
            if free(region + 1, slot) and free(slot + 1, end):
                return True
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)
            return False
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, region)

    return take
