"""Content-addressed file store for inspection photos and heatmaps, and its retention by age, total size and the
free space left on its volume.

A file's key is its SHA-256 (``ab/abcdef....png``): the same photo uploaded twice is stored once, and a key never
names two different contents, so a record's key stays right for as long as the file exists. Writes go to a
temporary file in the same directory, synced, and renamed into place, so a reader (or a crash, or a power cut) never
sees half a file; a picture is on the disk before the record that names it is written.
Storing an existing key again touches its modification time: retention by age then counts from the newest record
that references the file.

A record is written in two steps, its pictures first and its row later (after its batch gathers, or after minutes
of a database outage). Between them its pictures are *held* (``put(..., hold=True)`` until :meth:`FileStore.release`):
retention neither deletes a held file nor marks records about it, and it decides, marks and deletes each file under
the lock that ``put`` takes, so a row never says "stored" about a file retention deleted, nor "expired" about one it
kept. Holds and that lock are one process's: across processes sharing the volume (replicas), the record store
takes a lock of its own around each chunk's mark-and-delete and around each insert, and the insert writes back a
picture another process's pass deleted since its ``put`` (:meth:`FileStore.restore`).

That lock can end before the chunk does: PostgreSQL releases a session's locks when it ends the session (a
failover, a network cut), and nothing tells the pass. So a chunk deletes nothing outright: it sets its files aside
(renamed to a temporary name beside them, which an insert does not see: it writes the picture back) and asks,
after the last one, whether its lock is still held. Only a lock held from before the marking to after the last
file was set aside shut every insert out meanwhile: then the files set aside are deleted; otherwise they are put
back (where an insert has not already written them back) and the pass stops. A record is never left saying
"stored" about a file a pass deleted without its lock held, and a pass stopped so leaves records marked about
files still there (served as gone), never the reverse.

A picture drawn from a stored file (a photo's thumbnail) is kept beside it, named after it (:func:`derived_key`):
it goes with its file. Retention counts its bytes with its file's, judges them by its file's age and removes them
with it, and none is written for a file that is gone. Two drawn as their file went are removed too. One drawn
after the pass listed its file is not among what the chunk removes with the file: the pass's last step removes it,
with any other left without its file (:meth:`FileStore.remove_orphans`). One another process drew while the pass
deleted its file is removed by that process: it looks for the file again after writing, and the pass deletes the
file before it looks for what was drawn from it, so one of the two sees the other's change. So after a pass no
thumbnail is left without its photo.

A chunk that dies between setting its files aside and deleting or putting them back (the process killed as its
session ended) leaves them aside, where an insert meanwhile may have recorded one as stored: the next pass puts
them back, and until then a file is read where it lies (:meth:`FileStore.locate`), so none is served as gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..whole_file import write_whole
from ..steady_clock import stamp_past

log = logging.getLogger(__name__)

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif",
               "PPM": "ppm"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff",
               "webp": "image/webp", "gif": "image/gif", "ppm": "image/x-portable-pixmap",
               "bin": "application/octet-stream"}
_KEY_DIR = re.compile(r"[0-9a-f]{2}")  # the directories put() makes: a key's first two hex digits
DERIVED_MARK = ".derived-"  # in a file name: a picture drawn from the file named before it
# files retention decides on per turn of the lock: marking their records is one database transaction, which put()
# (the recorder's writer) waits for, so a pass over thousands of pictures lets the writer in between turns
RETIRE_CHUNK = 500
ASIDE_PREFIX = ".tmp-retiring-"  # a file of a chunk being retired, until the chunk knows its lock held throughout


class RetentionInterrupted(RuntimeError):
    """A retention pass found its lock between processes gone midway (PostgreSQL ended the session holding it):
    an insert may have come in, so the chunk's files were put back and the pass stopped."""


def derived_key(key: str, variant: str) -> str:
    """The key of the picture ``variant`` (e.g. ``thumb256-12bit.jpg``) drawn from the stored file ``key``."""
    if "/" in variant or DERIVED_MARK in variant:
        raise ValueError(f"bad variant {variant!r}")
    return f"{key}{DERIVED_MARK}{variant}"


def extension_of(data: bytes) -> str:
    """The file extension of an image by its bytes (the upload's name and content type are never trusted)."""
    from ..images import opened_admitted

    try:
        with opened_admitted(data) as img:  # a photo past Pillow's pixel limit, within the service's, is a .png too
            return _EXTENSIONS.get(img.format or "", "bin")
    except Exception:  # noqa: BLE001 - an unknown format is still stored, only its extension is generic
        # a float colour TIFF, which Pillow does not open and the service reads (float_tiff.py)
        return _EXTENSIONS["TIFF"] if data[:4] in (b"II*\0", b"MM\0*") else "bin"


@dataclass(frozen=True)
class StoredFile:
    path: Path
    bytes: int  # with the pictures drawn from it (``derived``): they go together
    mtime: float
    derived: tuple[Path, ...] = ()


def _oldest_giving(files: list[StoredFile], nbytes: int) -> list[StoredFile]:
    """The first of ``files`` (oldest first) whose sizes add up to at least ``nbytes``."""
    out: list[StoredFile] = []
    freed = 0
    for f in files:
        if freed >= nbytes:
            break
        out.append(f)
        freed += f.bytes
    return out


class FileStore:
    """Files under ``root/files``, addressed by content. Thread-safe within a process."""

    def __init__(self, root: Path):
        self.root = Path(root) / "files"
        # One lock between writers and retention: a file being re-referenced is never deleted under it.
        self.lock = threading.Lock()
        self._held: Counter[str] = Counter()  # keys stored for records not in the database yet: retention keeps them
        self._unreadable: set[str] = set()  # directories already logged as skipped, so each is logged once

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:  # keys come from our own database, but never trust a path
            raise ValueError(f"bad file key {key!r}")
        return p

    def put(self, data: bytes, ext: str, sha256: str | None = None, hold: bool = False) -> str:
        """Store ``data`` (if not there yet) and return its key. ``hold``: the record that references it is not in
        the database yet, so retention must not delete it until :meth:`release` (it could not mark that record)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        key = f"{digest[:2]}/{digest}.{ext}"
        target = self.root / key
        with self.lock:  # the touch or write and the hold together: retention sees both or neither
            _touch_or_write(target, data)
            if hold:
                self._held[key] += 1
        return key

    def restore(self, pictures: Mapping[str, bytes]) -> set[str]:
        """Make sure these files (key to bytes) are stored, touched as ``put`` touches them, writing back any that
        is gone: a retention pass of another process sharing the volume cannot see this one's holds, and may have
        deleted a file since its ``put``. The record store calls this in the transaction that inserts their records,
        under the lock such a pass takes, so none comes between. Returns the keys that could not be written back."""
        lost: set[str] = set()
        with self.lock:
            for key, data in pictures.items():
                try:
                    _touch_or_write(self.path(key), data)
                except OSError as exc:  # a full disk: the caller says so in the records
                    log.error("records: cannot keep %s for a record being written (deleted meanwhile by another "
                              "process's retention?): %s", key, exc.strerror or exc)
                    lost.add(key)
        return lost

    def release(self, keys: list[str]) -> None:
        """End the holds ``put(..., hold=True)`` took, once their records are in the database (or given up)."""
        with self.lock:
            for key in keys:
                self._held[key] -= 1
                if self._held[key] <= 0:
                    del self._held[key]

    def put_derived(self, key: str, variant: str, data: bytes) -> str | None:
        """Keep ``data``, a picture drawn from the stored file ``key``, beside it; returns its key, or None when
        ``key`` is no longer stored (retention removed it while the picture was drawn: it must not outlive it).
        The file's modification time is left alone: its age is its records' age."""
        dkey = derived_key(key, variant)
        target = self.path(dkey)
        with self.lock:  # retention removes a file and what was drawn from it under this lock
            if not self.path(key).is_file():
                return None
            if not target.exists():
                _write_private(target, data)
            # another process's pass (whose lock is not this one) may have deleted the file since the look above;
            # it deletes the file before it looks for pictures drawn from it, so this look or that one sees it
            if not self.path(key).is_file():
                with contextlib.suppress(OSError):
                    os.unlink(target)
                return None
        return dkey

    def read_derived(self, key: str, variant: str) -> bytes | None:
        """The picture ``variant`` drawn from ``key``, if it was kept and ``key`` is still stored."""
        data = self.read(derived_key(key, variant))
        return data if data is not None and self.locate(key) is not None else None

    def read(self, key: str) -> bytes | None:
        """The stored file's bytes, or None when it is gone (or ``key`` is no key of this store)."""
        for candidate in self._places(key):  # read where it lies, with no look first: the common case costs one open
            with contextlib.suppress(FileNotFoundError):
                return candidate.read_bytes()
        return None

    def locate(self, key: str) -> Path | None:
        """Where the file ``key`` is now: its own name, or the name a retention chunk set it aside under. A chunk
        that lost its lock puts its files back and one that died first leaves them aside until the next pass:
        meanwhile an insert may have recorded the file as stored, so it is served where it lies, never as gone. A
        path is no hold: a live pass may delete the file before the caller reads it, and reading it then says the
        file is missing, as for one never found (images.decode_image)."""
        return next((candidate for candidate in self._places(key) if candidate.is_file()), None)

    def _places(self, key: str) -> tuple[Path, ...]:
        """Where the file ``key`` may be, in the order to look: its own name, set aside, its own name again (put back
        between the two looks); none when ``key`` is no key of this store."""
        try:
            path = self.path(key)
        except ValueError:
            return ()
        return path, path.with_name(ASIDE_PREFIX + path.name), path

    def _key_dirs(self) -> Iterator[list[os.DirEntry[str]]]:
        """The entries of each directory put() makes (a volume mounted at ``files/`` brings ``lost+found``, whose
        files are not ours). One that cannot be listed (a broken link, no permission) is skipped and logged once."""
        if not self.root.is_dir():
            return
        for sub in os.scandir(self.root):
            if not _KEY_DIR.fullmatch(sub.name):
                continue
            try:
                if not sub.is_dir():
                    continue
                entries = list(os.scandir(sub.path))
            except OSError as exc:
                if sub.path not in self._unreadable:
                    self._unreadable.add(sub.path)
                    log.warning("retention: skipping %s, which cannot be listed (%s); its files are not cleaned up",
                                sub.path, exc.strerror or exc)
                continue
            if entries:
                yield entries

    def files(self) -> list[StoredFile]:
        """Every stored file, oldest first (by last reference), with the pictures drawn from it; one drawn from a
        file that is gone is not listed (:meth:`remove_orphans` removes it). Only the directories put() makes are
        listed: a volume mounted at ``files/`` brings ``lost+found``, whose files are not ours to delete. One that
        cannot be listed (a broken link, no permission) is skipped and logged once, so retention still cleans up
        the others instead of failing every pass."""
        out = []
        for entries in self._key_dirs():
            own: dict[str, StoredFile] = {}
            drawn: list[tuple[str, StoredFile]] = []
            for entry in entries:
                if entry.name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    f = StoredFile(Path(entry.path), st.st_size, st.st_mtime)
                    if DERIVED_MARK in entry.name:
                        drawn.append((entry.name.split(DERIVED_MARK, 1)[0], f))
                    else:
                        own[entry.name] = f
            for name, f in drawn:
                base = own.get(name)
                if base is not None:  # one without its file is no stored file: remove_orphans() removes it
                    own[name] = StoredFile(base.path, base.bytes + f.bytes, base.mtime, (*base.derived, f.path))
            out.extend(own.values())
        out.sort(key=lambda f: f.mtime)
        return out

    def key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def volume_now(self) -> float | None:
        """The time the volume gives a file made now (a file made and removed at the top of the store), or None
        where none can be made. Pictures are dated by it: on a shared volume, by the file server's clock or the
        writing host's, not the clock of a replica whose pass compares their ages. One a crash leaves between the
        two is swept as the store's other temporaries are (:meth:`clean_temporaries`)."""
        try:
            fd, name = tempfile.mkstemp(prefix=".tmp-clock-", dir=self.root)
        except OSError:
            return None
        try:
            return os.fstat(fd).st_mtime
        except OSError:
            return None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)

    def free_bytes(self) -> int | None:
        """Free bytes on the volume the files live on (None if it cannot be read)."""
        where = self.root
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            return shutil.disk_usage(where).free
        except OSError:
            return None

    def select_expired(self, max_age_s: float | None, max_bytes: int | None, now: float | None = None,
                       free_needed: int = 0) -> tuple[list[StoredFile], list[StoredFile], list[StoredFile]]:
        """Files retention would remove: (too old, over the size budget once the old ones are gone, the oldest of
        the rest whose bytes give back ``free_needed`` on the volume)."""
        now = time.time() if now is None else now
        files = self.files()
        old = [f for f in files if max_age_s is not None and now - f.mtime > max_age_s]
        rest = files[len(old):] if old else files
        over = _oldest_giving(rest, sum(f.bytes for f in rest) - max_bytes) if max_bytes is not None else []
        rest = rest[len(over):]
        short = _oldest_giving(rest, free_needed - sum(f.bytes for f in (*old, *over)))
        return old, over, short

    def remove(self, files: list[StoredFile], mark: Callable[[list[str]], object] | None = None,
               guard: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
               held: Callable[[], bool] = lambda: True) -> int:
        """Delete these files unless one was referenced again since it was selected, or is held for a record not
        yet written; returns bytes freed. ``mark`` is called with the keys that go, before they go and under the
        lock ``put`` takes: the records it marks are exactly those of the files deleted, so a record written
        meanwhile is neither marked about a file that stays nor left unmarked about one that goes. A ``mark``
        that raises deletes nothing more. ``guard`` is entered around each chunk's decision, marking and
        deletion: the record store's lock between processes, which their inserts take too. ``held`` says whether
        that lock was held without a break since ``guard`` took it: asked once a chunk's files are set aside, and
        if not, they are put back and :class:`RetentionInterrupted` is raised (the module's docstring says why)."""
        freed = 0
        for i in range(0, len(files), RETIRE_CHUNK):
            with guard(), self.lock:
                going = [f for f in files[i:i + RETIRE_CHUNK] if self._may_go(f)]
                if mark is not None and going:
                    mark([self.key_of(f.path) for f in going])
                # decided and marked, so deleted even if another process's put() touched a file meanwhile: that
                # record's insert waits for the guard, then writes the file back (restore)
                aside = [(f, _set_aside(f.path)) for f in going]
                if not held():
                    for f, moved in aside:
                        if moved is not None:  # one that cannot be put back now is put back by the next pass
                            with contextlib.suppress(OSError):
                                _put_back(moved, f.path)
                    raise RetentionInterrupted("retention's lock between processes was lost midway (the database "
                                               "ended its session); the chunk's files were put back")
                for f, moved in aside:
                    if moved is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(moved)
                        freed += f.bytes
                    for drawn in f.derived:  # what was drawn from it goes with it, after it
                        with contextlib.suppress(OSError):
                            os.unlink(drawn)
        return freed

    def remove_orphans(self) -> int:
        """Delete every picture drawn from a file that is gone (drawn after a pass listed its file, or left by a
        crash between the two deletes); returns bytes freed. No record names such a picture: it needs no mark."""
        freed = 0
        try:
            listed = list(self._key_dirs())
        except OSError:  # files() failed the pass already
            return freed
        for entries in listed:
            names = {e.name for e in entries}
            for entry in entries:
                name = entry.name
                if DERIVED_MARK not in name or name.startswith(".tmp-") \
                        or name.split(DERIVED_MARK, 1)[0] in names:
                    continue
                path = Path(entry.path)
                with self.lock, contextlib.suppress(OSError):
                    if not (path.parent / name.split(DERIVED_MARK, 1)[0]).exists():  # not written back since
                        size = path.stat().st_size
                        path.unlink()
                        freed += size
        return freed

    def _may_go(self, f: StoredFile) -> bool:
        """Whether retention may delete ``f`` now (the lock held): not held for a record on its way to the
        database, and not referenced again since it was listed (a file already gone is gone: its records are
        marked all the same)."""
        if self.key_of(f.path) in self._held:
            return False
        try:
            return os.stat(f.path).st_mtime == f.mtime
        except OSError:
            return True

    def clean_temporaries(self, older_than_s: float = 3600, now: float | None = None) -> None:
        """Temporary files a crash left behind (``now``: as :meth:`select_expired`'s). A file a chunk set aside is
        put back where none was written back since: whether its lock held is unknown, and a file kept is at worst
        served as gone."""
        if not self.root.is_dir():
            return
        now = time.time() if now is None else now
        # the store's own directories' temporaries, and at its top :meth:`volume_now`'s, made and removed at once
        for tmp in itertools.chain(self.root.glob("*/.tmp-*"), self.root.glob(".tmp-*")):
            with contextlib.suppress(OSError):
                if tmp.name.startswith(ASIDE_PREFIX):
                    with self.lock:
                        _put_back(tmp, tmp.parent / tmp.name[len(ASIDE_PREFIX):])
                elif now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()


def _set_aside(path: Path) -> Path | None:
    """Rename a file retention retires to its temporary name beside it (None if it is gone, or cannot be moved)."""
    aside = path.with_name(ASIDE_PREFIX + path.name)
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside


def _put_back(aside: Path, target: Path) -> None:
    """Put a file set aside back at ``target``, unless an insert wrote it back there meanwhile: that copy is the
    same bytes (a key names its content) and is as old as its newest record, which this one is not."""
    try:
        os.link(aside, target)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not target.exists():
            os.replace(aside, target)
            return
    os.unlink(aside)


def _touch_or_write(target: Path, data: bytes) -> None:
    """Touch ``target`` (a newer record references it: retention by age counts from now), or write it if it is not
    there: also when another process's retention deletes it between a look and the touch.

    Never to a time before the file's own: a process whose clock is behind (a host that booted before its time
    synced) touched a picture to its time, months before the record written today, and the next pass removed it.
    Then it moves just past its own time, so a pass still sees it was referenced again since its listing.

    A file that is not ``data`` is written again: its key names these bytes, so it is one a power cut broke (written
    by a release that did not sync a picture before its name, or torn by the disk): cut short, or of the right size
    and zeros, as XFS leaves a file whose size was logged before its data was written. Touched, it was kept as it
    was for as long as the photo kept coming back, and every record of that photo served it broken. Its size and its
    first and last block are compared (:func:`_ends_match`), not all of it: every record's pictures pass here again
    as the record is written (:meth:`FileStore.restore`)."""
    try:
        st = os.stat(target)
        whole = st.st_size == len(data) and _ends_match(target, data)
    except FileNotFoundError:
        _write_private(target, data)
        return
    if not whole:
        log.warning("records: %s held %d bytes, not the %d its key names (broken by a power cut?): written again",
                    target.name, st.st_size, len(data))
        _write_private(target, data)
        return
    stamp = stamp_past(st.st_mtime_ns)
    try:
        os.utime(target, ns=(stamp, stamp))
    except FileNotFoundError:  # another process's retention deleted it since the look above
        _write_private(target, data)


END_BLOCK = 4096  # bytes read at each end of a stored picture to tell it whole (_ends_match)


def _ends_match(target: Path, data: bytes) -> bool:
    """Whether ``target``, of ``data``'s size, begins and ends with its bytes: a file whose data a power cut left
    unwritten reads as zeros in its first or last block (a picture's header, its end marker)."""
    n = min(END_BLOCK, len(data))
    with open(target, "rb") as fh:
        head = fh.read(n)
        fh.seek(len(data) - n)
        return head == data[:n] and fh.read(n) == data[len(data) - n:]


PRIVATE = 0o600  # a stored part's photo and heatmap: the service serves them, behind its key; nobody reads the files


def _write_private(target: Path, data: bytes) -> None:
    """A stored picture, written whole (:func:`~anomaly_service.whole_file.write_whole`) and private, in its key's
    directory (made here); a temporary file a crash leaves is swept by name (``.tmp-``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_whole(target, data, PRIVATE, prefix=".tmp-")
