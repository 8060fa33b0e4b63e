"""A network share that stops answering, for the tests: a FUSE file system over a real directory whose every call,
``stat`` included, can be held until it is told to answer again.

Why: a FIFO imitates a file whose ``open()`` hangs, but not a share on which looking at a file (``stat``, a
directory's listing) hangs as well, which is what an SMB or NFS mount that lost its server does. This is a
passthrough (mfusepy over libfuse 3, both maintained; no FUSE protocol of our own) that runs in a process of its
own, so that a test can hold it, release it and unmount it whatever the code under test is waiting on.

Run as ``python hung_share.py SOURCE MOUNTPOINT``: it serves SOURCE at MOUNTPOINT, and reads commands on its
standard input, each answered ``ok`` on its standard output: ``hang`` (every path), ``hang /b /c`` (those paths
and everything under them) and ``answer``. At the end of its input it answers everything and unmounts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

# how long the helper may take to mount, or to go once unmounted, before the test gives up on it
MOUNT_PATIENCE = 30.0


class Gate:
    """Which paths do not answer now; a call on one of them waits here until they answer again."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._hung: tuple[str, ...] | None = None  # None: every path answers; (): none does

    def hang(self, paths: tuple[str, ...]) -> None:
        with self._changed:
            self._hung = paths

    def answer(self) -> None:
        with self._changed:
            self._hung = None
            self._changed.notify_all()

    def _holds(self, path: str) -> bool:
        if self._hung is None:
            return False
        return not self._hung or any(path == p or path.startswith(p if p.endswith("/") else p + "/")
                                     for p in self._hung)

    def wait(self, *paths: str) -> None:
        with self._changed:
            while any(self._holds(p) for p in paths):
                self._changed.wait()


def _share(source: str, gate: Gate) -> Any:
    """The passthrough's operations: each waits at the gate, then does the call on the real directory."""
    import mfusepy

    def real(path: str) -> str:
        return os.path.join(source, path.lstrip("/"))

    def passed(fn: Any) -> Any:
        def call(self: Any, path: str, *args: Any) -> Any:
            gate.wait(path, *(a for a in args[:1] if isinstance(a, str)))  # a rename's or link's other path too
            try:
                return fn(self, path, *args)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None
        return call

    class Share(mfusepy.Operations):
        use_ns = True

        @passed
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(real(path))
            return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_uid": st.st_uid, "st_gid": st.st_gid,
                    "st_size": st.st_size, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                    "st_ctime": st.st_ctime_ns}

        @passed
        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(real(path))]

        @passed
        def readlink(self, path: str) -> str:
            return os.readlink(real(path))

        @passed
        def access(self, path: str, amode: int) -> int:
            if not os.access(real(path), amode):
                raise OSError(errno.EACCES, path)
            return 0

        @passed
        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(real(path))
            return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                                "f_ffree", "f_favail", "f_flag", "f_namemax")}

        @passed
        def open(self, path: str, flags: int) -> int:
            return os.open(real(path), flags)

        @passed
        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        @passed
        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        @passed
        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        @passed
        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            os.truncate(real(path), length)
            return 0

        @passed
        def flush(self, path: str, fh: int) -> int:
            return 0

        @passed
        def fsync(self, path: str, datasync: int, fh: int) -> int:
            os.fsync(fh)
            return 0

        def release(self, path: str, fh: int) -> int:  # never held: a closed file's descriptor is always given back
            os.close(fh)
            return 0

        @passed
        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(real(path), mode)
            return 0

        @passed
        def rmdir(self, path: str) -> int:
            os.rmdir(real(path))
            return 0

        @passed
        def unlink(self, path: str) -> int:
            os.unlink(real(path))
            return 0

        @passed
        def rename(self, old: str, new: str) -> int:
            os.rename(real(old), real(new))
            return 0

        @passed
        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, real(target))
            return 0

        @passed
        def chmod(self, path: str, mode: int) -> int:
            os.chmod(real(path), mode)
            return 0

        @passed
        def chown(self, path: str, uid: int, gid: int) -> int:
            os.lchown(real(path), uid, gid)
            return 0

        @passed
        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(real(path), ns=times, follow_symlinks=False)
            return 0

    return Share()


def _commands(gate: Gate) -> None:
    """The test's commands, one a line; at the end of them (the test or its process is gone) answer and unmount."""
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["hang"]:
            gate.hang(tuple(words[1:]))
        elif words[:1] == ["answer"]:
            gate.answer()
        print("ok", flush=True)
    gate.answer()
    os.kill(os.getpid(), signal.SIGTERM)  # libfuse's own handler: the loop ends and fuse_main unmounts


def main(source: str, mountpoint: str) -> None:
    import mfusepy

    gate = Gate()
    threading.Thread(target=_commands, args=(gate,), daemon=True).start()
    # attributes and names never cached: every look reaches the gate, as every look reaches a share's server;
    # libfuse's status after a stop by a signal (its own end, above) is no failure. Each held call holds one of
    # libfuse's threads: with its default number, calls held beyond it held every other path's calls too
    with contextlib.suppress(RuntimeError):
        mfusepy.FUSE(_share(source, gate), mountpoint, foreground=True, attr_timeout=0, entry_timeout=0,
                     negative_timeout=0, max_threads=1000, fsname="hung_share")


def unmount(mountpoint: Path) -> None:
    """Detach the mount at once, whatever still waits on it (a lazy unmount: those calls fail, none hangs)."""
    if os.geteuid() == 0 and shutil.which("umount"):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=MOUNT_PATIENCE)
    else:
        for tool in ("fusermount3", "fusermount"):
            if shutil.which(tool):
                subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, timeout=MOUNT_PATIENCE)
                break


class HungShare:
    """A running share: ``source`` served at ``mountpoint``, held and released by the test."""

    def __init__(self, source: Path, mountpoint: Path, proc: subprocess.Popen) -> None:
        self.source, self.mountpoint, self._proc = source, mountpoint, proc

    def _say(self, command: str) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        assert self._proc.stdout.readline().strip() == "ok", f"the share did not take {command!r}"

    def hang(self, *paths: str) -> None:
        """Stop answering: every call (``stat``, listing, ``open``, ``read``) on ``paths`` (paths in the share,
        ``/b``) and under them, or on everything without ``paths``, waits until :meth:`answer`. ``/b/`` holds what
        is in ``b`` but answers for ``b`` itself: the kernel looks names up in one directory of a FUSE file system
        one at a time here (seen on 6.18), so a held ``b`` would hold every name beside it as well."""
        self._say(" ".join(("hang", *paths)))

    def answer(self) -> None:
        """Answer again: every held call goes on."""
        self._say("answer")


def _unavailable() -> str | None:
    """Why no FUSE file system can be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (a container without the FUSE device)"
    try:
        import mfusepy  # noqa: F401 - loads libfuse
    except (ImportError, OSError) as exc:  # mfusepy not installed, or no libfuse (Debian's fuse3) to load
        return f"mfusepy cannot load libfuse ({exc}): install Debian's fuse3 (README's test command does)"
    return None


@contextlib.contextmanager
def hung_share(source: Path, mountpoint: Path) -> Iterator[HungShare]:
    """``source`` served at ``mountpoint`` by a share that can be told to hang; answered and unmounted at the end,
    however the block ends. Skips the test where FUSE cannot be mounted here (no device, no libfuse, no right)."""
    import pytest

    why = _unavailable()
    if why is not None:
        pytest.skip(f"FUSE unavailable: {why}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    err = mountpoint.parent / f"{mountpoint.name}.share.log"
    with open(err, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(source), str(mountpoint)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + MOUNT_PATIENCE
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"FUSE unavailable: the share did not mount ({err.read_text().strip()[-300:]})")
            time.sleep(0.05)
        share = HungShare(source, mountpoint, proc)
        try:
            yield share
        finally:
            with contextlib.suppress(OSError, AssertionError):
                share.answer()
    finally:
        unmount(mountpoint)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(MOUNT_PATIENCE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
