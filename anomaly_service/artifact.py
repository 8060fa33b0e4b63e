"""The model on disk: a directory with ``manifest.json``, ``index.faiss`` and ``arrays.npz``.

The manifest (manifest.py) is self-describing (what was fitted, how, from what) and records each file's size and
SHA-256, and its own SHA-256 over the rest of it, so loading detects truncation and corruption (of the manifest too)
instead of scoring with half a model. Writes go to a temporary sibling directory that is swapped in with renames, so
a crash mid-save never leaves a broken model where a good one was.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import logging
import lzma
import math
import os
import shutil
import threading
import time
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import AlreadyCurrentError, ModelFormatError, ModelSaveError, UpdateUnavailableError
from .interrupts import stops_held
from .manifest import (DIGEST_KEY, FORMAT_REVISION, MANIFEST, REVISION_KEY, Manifest, check_digest, manifest_digest,
                       parse_manifest, plain_name)
from .dir_lock import holding
from .whole_file import sync_dir, write_whole
from .steady_clock import stamp_past

log = logging.getLogger(__name__)

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a volume, or a quota, with no room left


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_artifact(path: str | Path, manifest: dict[str, Any], files: dict[str, bytes],
                   keep_versions: int = 0) -> Path:
    """Atomically write ``files`` plus a manifest (with their checksums added) as directory ``path``.

    With ``keep_versions`` > 0 the model it replaces is archived under ``.versions/`` (at most that many kept)."""
    path = Path(path).resolve()
    manifest = dict(manifest)
    manifest["files"] = {name: {"bytes": len(data), "sha256": sha256(data)} for name, data in files.items()}
    # every manifest written here carries its checksum, so it says the revision that promises one (an update of a
    # model from before the checksum too): without it, deleting the checksum would pass for an older model
    manifest[REVISION_KEY] = FORMAT_REVISION
    manifest[DIGEST_KEY] = manifest_digest(manifest)  # the manifest's own checksum, over everything above
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _swap_in(path, {**files, MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode()},
                        keep_versions)
    except OSError as exc:  # a full disk, a directory that takes no writes: one clear line, the old model kept
        raise _save_error(path, exc) from None


def _save_error(path: Path, exc: OSError, spare: str | None = None) -> ModelSaveError:
    """The one clear line of a save the file system refused (a save of a fit, an update or a rollback); on a full
    volume, what its archive holds and the way out. ``spare``: the version a rollback restores, which no
    ``--keep-versions`` deletes for it (:func:`_make_room`), so not counted: counted, the advice freed nothing."""
    room, size = "", 0
    if exc.errno in NO_ROOM:
        archived = [d for d in _archived_dirs(path) if d.name != spare]
        with contextlib.suppress(OSError):
            size = sum(f.stat().st_size for d in archived for f in d.iterdir() if f.is_file())
        if archived:
            besides = f" besides {spare}, the one restored," if spare else ""
            room = (f". Its archive holds {len(archived)} earlier version(s){besides} {size / 1e6:.1f} MB: with "
                    f"--keep-versions {len(archived)} or lower (ANOMALY_KEEP_VERSIONS) a save deletes the oldest of "
                    "them first; or free space on the volume")
    return ModelSaveError(f"cannot write the model to {path}: {exc.strerror or exc}; any model that was there is "
                          f"unchanged{room}")


def _unwritable(path: Path, why: str) -> UpdateUnavailableError:
    """Why an update or rollback of the model at ``path`` cannot be saved, said before any of its work."""
    return UpdateUnavailableError(
        f"cannot write in the model directory {path.parent} ({why}): updates and rollbacks save new versions there; "
        "mount it writable for this service (deploy/README.md)")


def _read_only_mount(directory: Path) -> bool:
    """Whether ``directory`` is on a read-only mount, to name it so (access() only says no)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# the models whose write lock (model_lock) threads of this process hold, by resolved path and thread
_HELD: Counter[tuple[Path, int]] = Counter()
_HELD_GUARD = threading.Lock()


def flock_saying(fd: int, mode: int, waiting: Callable[[], None] | None) -> None:
    """``flock`` ``fd`` in ``mode`` (shared or exclusive), first calling ``waiting`` if another holder makes it
    wait: a person at a terminal is told why nothing moves."""
    import fcntl

    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if waiting is not None:
            waiting()
        fcntl.flock(fd, mode)


@contextlib.contextmanager
def model_lock(path: str | Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the write lock of the model at ``path`` across processes: every replica that shares the model directory,
    and the CLI. An update reads the current version and writes the next; two at once, on two replicas, each wrote
    its own next version of the same current one and the first was lost. An advisory lock (flock) on a file beside
    the model; UpdateUnavailableError when it cannot be made there (a read-only model directory). ``waiting`` is
    called when another holds it, before this waits: a command says why it stands still."""
    import fcntl

    path = Path(path).resolve()  # one lock file however the path is spelled (relative, ".", a symlink)
    try:  # read-only is enough for flock: a lock file another user left (a root CLI run) does not lock anyone out
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _unwritable(path, exc.strerror or str(exc)) from None
    # a lock file made before the directory went read-only (a remount, a read-only volume) still opens for reading:
    # asked here, or the update did all its work and then failed at the save (access() says EROFS even to root)
    if not os.access(path.parent, os.W_OK):
        os.close(fd)
        raise _unwritable(path, os.strerror(errno.EROFS) if _read_only_mount(path.parent) else "no write permission")
    try:
        flock_saying(fd, fcntl.LOCK_EX, waiting)
        held = (path, threading.get_ident())  # released by the thread that took it, however it exits
        with _HELD_GUARD:
            _HELD[held] += 1
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[held] -= 1
                if _HELD[held] <= 0:
                    del _HELD[held]
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _rollbacks_shut_out(path: Path) -> Iterator[bool]:
    """Whether, for the block, no other process can be in a rollback of the model at ``path``: True where this
    thread holds its write lock (:func:`model_lock`, which every release's product rollback held throughout), or
    takes it now without waiting (held to the block's end); False where another process or another thread of this
    one holds it, or where it cannot be opened. Another thread's hold is no shelter: it may end during the block,
    and a rollback of another process begin. Not waited for: a prune must not wait for an update or rollback."""
    import fcntl

    path = path.resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        holders = {thread for (held, thread), n in _HELD.items() if held == path and n > 0}
    if me in holders:
        yield True
        return
    if holders:  # not flocked again here: where flock is emulated by POSIX locks (NFS), closing it drops theirs
        yield False
        return
    try:  # created where missing, as model_lock does: a rollback that starts meanwhile waits for this block
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except OSError:  # held by another process
            free = False
        yield free
    finally:
        os.close(fd)  # releases the lock, if taken


@contextlib.contextmanager
def swap_lock(path: str | Path, create: bool = False) -> Iterator[None]:
    """Held by a save of the model at ``path`` from its first rename to the end of its clean-up, and by a
    recovery: a rescan that finds the model missing, or is about to take a save's leftovers for those of one that
    died, waits on it for a save under way instead (an ``flock``, so a save that died holds nothing). Short, unlike
    :func:`model_lock`, which an update holds for all its work, and a separate file, so a save under that lock takes
    this one too. ``create``: make the lock file (a save); without it, where there is none, no save of this release
    ran here and there is nothing to wait for. Where it cannot be opened (a read-only model directory, where
    nothing is saved or recovered) nothing is held. Named ``.NAME.swap-lock``: as ``.NAME.swap.lock`` it was the
    write lock of a model named ``NAME.swap``, whose update held this model's saves and rescans for all its work."""
    import fcntl

    path = Path(path).resolve()
    try:
        fd: int | None = os.open(path.parent / f".{path.name}.swap-lock",
                                 os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
    except OSError:
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # said, since the wait has no end of its own: a save that hangs between its renames holds a service's
            # start-up loading (alive, never ready) and its stop, and nothing else would say why
            log.info("model %s: a save of it is between its renames; waiting for it to end", path.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def wait_for_save(path: str | Path) -> None:
    """Return once no save holds the model's :func:`swap_lock`: one between its two renames has ended. For a read
    that found the model set aside and reads it again."""
    with swap_lock(path):
        pass


def check_replaceable(path: str | Path) -> None:
    """ModelFormatError unless a model may be saved at ``path``: nothing there, an empty directory, or a model.
    Callers about to fit for minutes ask first (the save asks again)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (not (path / MANIFEST).is_file() and any(path.iterdir()))):
        raise ModelFormatError(f"{path} exists and is not a model directory; refusing to replace it")


def _swap_in(path: Path, contents: dict[str, bytes], keep_versions: int, spare: str | None = None) -> Path:
    """Write ``contents`` into a temporary sibling and swap it in as ``path`` with two renames. The renames and the
    clean-up after them hold :func:`swap_lock`: a rescan between the renames saw the model set aside with no model
    in its place, took it for the leftover of a save that died and put it back, and the second rename failed. A stop
    (Ctrl-C, SIGTERM) waits for them (``interrupts.stops_held``): one between the swap and the archive left the
    previous version in ``.NAME.old-*``, out of the archive. Not for what may take long and is safe to stop (settling
    an earlier save's leftovers, which verifies a whole model, and the prune): held through those, a Ctrl-C or a
    second one did nothing for as long as deleting old versions took.

    A volume too full for the copy first loses the archived versions this save's prune would delete anyway
    (:func:`_make_room`; ``spare``: an archived version never deleted for it, the one a rollback restores)."""
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    # named for what becomes of it: a save killed before it deleted the version it keeps no copy of leaves a name
    # that tells whoever settles it to delete it too, not to archive a version nothing would ever prune
    old = path.parent / f".{path.name}.old-{'' if keep_versions > 0 else UNKEPT}{tag}"
    try:
        tmp.mkdir()
    except OSError as exc:  # a volume so full that not even the directory fits
        if exc.errno not in NO_ROOM or not _make_room(path, keep_versions, spare):
            raise
        tmp.mkdir()
    with _writing(tmp):
        _write_and_swap(path, tmp, old, contents, keep_versions, spare)
    return path


def _write_and_swap(path: Path, tmp: Path, old: Path, contents: dict[str, bytes], keep_versions: int,
                    spare: str | None) -> None:
    """:func:`_swap_in`'s work, ``tmp`` made and held (:func:`_writing`)."""
    try:
        try:
            _write_copy(tmp, contents)
        except OSError as exc:
            if exc.errno not in NO_ROOM or not _make_room(path, keep_versions, spare):
                raise
            _write_copy(tmp, contents)  # in the room the archive's oldest versions left
        with swap_lock(path, create=True):
            _recover(path)  # a save that died left the previous model aside: put back, or archived (pruned below)
            with stops_held(deliver=True):
                _swap_locked(path, tmp, old, keep_versions)
        if keep_versions > 0:
            try:
                prune_versions(path, keep_versions)  # each version moved out of sight before it is deleted
            except OSError as exc:  # the new model is in place: a prune that fails must not report the save failed
                log.warning("could not prune the old versions of %s: %s", path.name, exc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once swapped in: it is the model now
        raise


def _write_copy(tmp: Path, contents: dict[str, bytes]) -> None:
    """Write ``contents`` into the empty directory ``tmp``, synced. When a write fails, what it wrote is removed
    again (room for a second try) and ``tmp`` stays: the save's lock on it (:func:`_writing`) holds on."""
    try:
        for name, data in contents.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        sync_dir(tmp)
    except BaseException:
        for written in tmp.iterdir():
            with contextlib.suppress(OSError):
                written.unlink()
        raise


def _make_room(path: Path, keep_versions: int, spare: str | None) -> bool:
    """Delete, before a save that found no room, the archived versions its prune would delete once it is in place:
    the archive then holds ``keep_versions`` with the version it replaces. Otherwise the prune, which runs only after
    a save that succeeded, never ran on a full volume, and no update, rollback or lower ``--keep-versions`` got out
    of it. ``spare`` is never deleted and counts as one kept. Returns whether any version was deleted."""
    if keep_versions <= 0:  # an archive that is left as it is (keep_versions 0) frees nothing
        return False
    removed = prune_versions(path, keep_versions - 1 - (spare is not None), spare=spare)
    if removed:
        log.warning("the model volume of %s is full: deleted %d archived version(s) before the save rather than "
                    "after it, keeping %d: %s", path.name, len(removed), keep_versions, ", ".join(removed))
    return bool(removed)


def _swap_locked(path: Path, tmp: Path, old: Path, keep_versions: int) -> None:
    """:func:`_swap_in`'s renames and clean-up, under the model's :func:`swap_lock`. Every state between two steps
    is one that :func:`_recover` settles: the previous model alone at ``old`` is put back, and a copy at ``old``
    beside a model is archived. The archive is pruned by the caller, once signals are no longer held."""
    try:
        if path.exists():
            check_replaceable(path)
            os.replace(path, old)  # from here until the next line, the previous model is at `old`
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    try:
        sync_dir(path.parent)
    finally:  # the new model is in place: whatever stops this, the previous one is archived or removed
        kept_aside = False
        if keep_versions > 0 and old.exists():
            try:
                archive_version(old, path)
            except OSError as exc:  # the new model is in place; an archive failure must not undo the save
                # nor delete the version the user asked to keep: left aside, it is archived by the next reader or
                # save that can (_recover), as a copy a killed save left
                kept_aside = True
                log.warning("could not archive the previous version of %s (%s): left at %s, where the next load, "
                            "save or re-scan that can archives it", path.name, exc, old.name)
        if not kept_aside:
            shutil.rmtree(old, ignore_errors=True)
    now = time.time()
    for stale in leftovers(path, "tmp"):  # half-written copies of saves that were killed
        with contextlib.suppress(OSError):
            if _abandoned(stale, now):
                shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- versions
# Earlier versions of a model live in <model_dir>/.versions/<name>/<version id>/: hidden, so a registry never
# serves them, and on the same file system, so archiving one is a rename.
VERSIONS_DIR = ".versions"
DEFAULT_KEEP_VERSIONS = 5


def versions_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / VERSIONS_DIR / path.name


def fingerprint(path: str | Path) -> str:
    """A model version's fingerprint: the SHA-256 of its manifest (which records every file's checksum). Read in
    blocks: a manifest of gigabytes dropped into the model directory was read whole by every re-scan."""
    h = hashlib.sha256()
    with open(Path(path) / MANIFEST, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# far above any release's manifest (it lists names and numbers per training image, never arrays): a larger one is
# no model's, and its JSON would take many times its size in memory
MANIFEST_MAX_BYTES = 64 << 20


def manifest_json(path: Path, digest: list[str] | None = None) -> Any:
    """The JSON value of the manifest file ``path``: OSError when it cannot be read, ValueError (JSONDecodeError,
    UnicodeDecodeError among them) when it is no manifest's JSON: larger than :data:`MANIFEST_MAX_BYTES` (refused
    before it is read), or nested too deeply for the parser (its RecursionError was a traceback). ``digest``: the
    bytes' SHA-256 (the version's :func:`fingerprint`) is appended to it, of the very bytes parsed."""
    with open(path, "rb") as fh:
        data = fh.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"larger than {MANIFEST_MAX_BYTES >> 20} MB, far beyond any model's manifest")
    if digest is not None:
        digest.append(hashlib.sha256(data).hexdigest())
    if data.startswith(LFS_POINTER):
        raise ValueError(LFS_MESSAGE)
    try:
        return json.loads(data.decode())
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to be a manifest") from None


# A model kept in a Git repository with Git LFS and cloned or downloaded without its LFS files holds, in each file's
# place, a small text pointer beginning so: named for what it is, not only as a file of the wrong size or JSON
LFS_POINTER = b"version https://git-lfs."
LFS_MESSAGE = ("it is a Git LFS pointer, not the file it stands for: the model came from a Git repository without "
               "its LFS files; fetch them there (git lfs pull) or copy the model again")


def version_id(created_at: str, manifest_sha256: str) -> str:
    """``<created_at as YYYYmmddTHHMMSSZ>-<first 12 of the manifest's SHA-256>``: sorts by time, names content."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(created_at).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    except (ValueError, TypeError):
        when = "".join(ch for ch in str(created_at) if ch.isalnum())[:20] or "unknown"
    return f"{when}-{manifest_sha256[:12]}"


# Releases before version ids reached the answers named a version in them, and in the records they made, by the first
# 16 hex digits of its manifest's SHA-256; those records keep it (docs/service.md, "Records")
EARLIER_DIGITS = 16


def recorded_names(vid: str, manifest_sha256: str) -> tuple[str, str]:
    """The names records give one version: its id (what answers and records say now), then the digest's first
    :data:`EARLIER_DIGITS` hex digits (what records made by earlier releases say). What looks a version up in the
    records (a re-scoring run that resumes) takes both."""
    return vid, manifest_sha256[:EARLIER_DIGITS]


def model_version_id(path: str | Path, settle: bool = True) -> str:
    """The version id of the model directory at ``path`` (reads its manifest only; ``settle``: as
    :func:`read_manifest`). Its time and its digest are of one read: a save between two reads named another version."""
    digest: list[str] = []
    return version_id(read_manifest(path, settle, digest).created_at, digest[0])


def archive_version(src: Path, path: Path) -> str | None:
    """Move the model directory ``src`` (a replaced version of ``path``) into the archive (pruned by the caller's
    save, never here). Returns its version id; None, with ``src`` left, when it is no readable model. A version
    archived already is not archived twice: ``src`` is left for the caller."""
    vid = _dir_version(src)
    if vid is None:
        return None  # not a readable model: nothing worth keeping
    dest_root = versions_dir(path)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / vid
    if not dest.exists():
        os.replace(src, dest)
        sync_dir(dest_root)
    _stamp_archived(dest_root, dest)  # archived now: the version a rollback just replaced is the last to be pruned
    return vid


PRUNED = ".pruned-"  # an archived version being deleted (hidden: never listed)


def _stamp_archived(root: Path, dest: Path) -> None:
    """Stamp ``dest`` as the archive's newest version: the clock's time, or just past the newest stamp there.

    Why: the prune orders versions by these stamps. After the clock stepped back (NTP correcting one that ran
    ahead, a host that booted a year out), versions archived before the step were stamped ahead of the clock, so
    every version archived after it looked the oldest and the save's own prune deleted the one it had just
    replaced: the version a rollback of that save needs. Stamps only grow, as record ids do.

    The stamp is written in the version itself (:data:`ARCHIVED`) and as its directory's time, which earlier
    releases read: a folder copied without its file times (``cp -r``, ``scp -r``, an unzip) gave every version the
    time of its copy, and the prune deleted the newest versions and kept the oldest. Versions an earlier release
    archived get their directory's time written too, while it is still theirs."""
    newest = 0
    for other in root.iterdir():
        if other != dest and not other.name.startswith(".") and other.is_dir():
            with contextlib.suppress(OSError):  # a link is read, never written through
                newest = max(newest, _archive_stamp(other, keep=_prunable(other)))
    stamp = stamp_past(newest) if newest else time.time_ns()
    _write_stamp(dest, stamp)


ARCHIVED = "archived.json"  # in an archived version: its archive stamp, which a copy that drops file times keeps


def _write_stamp(version: Path, stamp: int) -> None:
    """Record ``stamp`` as when ``version`` was archived: in its :data:`ARCHIVED` file (written whole, or not at
    all) and as its directory's time (set last: writing the file moves it)."""
    write_whole(version / ARCHIVED, json.dumps({"archived_ns": stamp}).encode())
    os.utime(version, ns=(stamp, stamp))


def _recorded_stamp(version: Path) -> int | None:
    """The archive stamp ``version``'s :data:`ARCHIVED` file records; None where it has none (archived by an
    earlier release) or it does not read as one."""
    try:
        with open(version / ARCHIVED, "rb") as fh:
            stamp = json.loads(fh.read(4096)).get("archived_ns")
    except (OSError, ValueError, AttributeError):
        return None
    # no file time holds a stamp past LAST_STAMP_NS: a file corrupted to one made every later save of the model fail
    # when the next stamp, just past it, was set as a directory's time (OverflowError)
    return stamp if type(stamp) is int and 0 < stamp < LAST_STAMP_NS else None


LAST_STAMP_NS = 2**63  # past a file time's signed count of nanoseconds: a stamp beyond it is none


def _archive_stamp(version: Path, keep: bool = False) -> int:
    """When ``version`` was archived: the stamp recorded in it, else (archived by an earlier release) its
    directory's time, as every release before read it. ``keep``: write that time into the version, so that a later
    copy of the folder without its times keeps its place (best effort: a version that cannot be written keeps
    its directory's time alone). OSError when the version is gone."""
    stamp = _recorded_stamp(version)
    if stamp is not None:
        return stamp
    stamp = version.stat().st_mtime_ns
    if keep:
        with contextlib.suppress(OSError):
            _write_stamp(version, stamp)
    return stamp


def prune_versions(path: str | Path, keep: int, spare: str | None = None) -> list[str]:
    """Remove all but the ``keep`` most recently archived versions of ``path`` (and ``spare``, whatever its age);
    returns the removed ids.

    By when they were archived, not when they were made: after a rollback to an old version, the version it
    replaced is the newest in the archive (so the rollback can be undone), whatever its creation time. Each is
    renamed out of sight before it is deleted: a prune killed midway left half a version that was listed."""
    root = versions_dir(path)
    if not root.is_dir():
        return []
    for doomed in root.glob(f"{PRUNED}*"):  # what a prune that was killed had not yet deleted
        shutil.rmtree(doomed, ignore_errors=True)
    if any(root.glob(f"{RESTORING}*")):  # a version an earlier release's rollback hid: put back if that one died
        _settle_restorings(Path(path), root)
    dirs = [p for p in root.iterdir() if _prunable(p) and p.name != spare]
    ids = [p.name for p in sorted(dirs, key=_archived_when, reverse=True)]
    removed = ids[max(keep, 0):]
    for vid in removed:
        _drop_version(root, vid)
    return removed


def _prunable(entry: Path) -> bool:
    """Whether the prune may delete ``entry`` of an archive: a version, i.e. a directory of its own (no link) with a
    manifest. Why: an archive copied in from elsewhere (a models backup unpacked with its links, ``cp -a``) may
    name another place: with ``.versions/NAME`` a link to a folder of projects, the next update deleted all of them
    but the newest five, and a link inside it had a version's place. What is no version is left as it is."""
    return (not entry.name.startswith(".") and not entry.is_symlink() and entry.is_dir()
            and (entry / MANIFEST).is_file())


RESTORING = ".restoring-"  # where rollbacks of earlier releases hid the version they restored while swapping it in


def _dir_version(model: Path) -> str | None:
    """The version id of the model directory ``model`` from its files alone (no recovery, no lock); None when it
    does not read."""
    try:
        return version_id(manifest_json(model / MANIFEST).get("created_at", ""), fingerprint(model))
    except (OSError, ValueError, AttributeError):
        return None


def _settle_restorings(path: Path, root: Path) -> None:
    """Put back every ``.restoring-*`` under ``root`` that a rollback of an earlier release left when it died. One
    that is alive holds the model's write lock (every release whose rollback hid versions held it for the whole
    rollback) and settles its copy itself: a ``.restoring-*`` found while another process or thread holds that lock
    is left for a later prune. Taken from a live rollback, it went back into the archive with its old archive time,
    where the same prune could delete it as past ``keep``, and a swap of that rollback that failed then found nothing
    to put back: the version was lost, and the rollback's own error hidden."""
    with _rollbacks_shut_out(path) as shut_out:
        if not shut_out:
            log.info("%s: a version a rollback hid in the archive is left until a later prune: another process or "
                     "thread holds the model's write lock, and a rollback may hold it next", path.name)
            return
        for aside in root.glob(f"{RESTORING}*"):  # listed again under the lock: no rollback hides one meanwhile
            _settle_restoring(path, root, aside)


def _settle_restoring(path: Path, root: Path, aside: Path) -> None:
    """Put ``aside``, an archived version a rollback of an earlier release moved to a hidden directory and was
    killed before it put back, into the archive again: it was in no list and no rollback could reach it. Removed
    when that version is the model now or archived already; left when it does not read whole."""
    vid = _dir_version(aside)
    if vid is None or _not_whole(aside) is not None:
        return
    if vid == _dir_version(Path(path)) or (root / vid).exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.replace(aside, root / vid)
    except OSError as exc:
        log.warning("%s: could not put %s back into the archive as %s: %s", Path(path).name, aside.name, vid, exc)
        return
    log.warning("%s: put %s, a version a rollback that was stopped had hidden, back into the archive as %s",
                Path(path).name, aside.name, vid)


def _describe_version(path: Path, current: bool) -> dict[str, Any]:
    """One version's listing, its id and its numbers from one read of its manifest: read apart, a save between
    them gave one version's id with another's threshold, or a 500 when it came between its renames."""
    digest: list[str] = []
    m = read_manifest(path, digest=digest)
    lineage = m.lineage
    made_by = lineage.made_by if lineage is not None else "fit"
    return {
        "id": version_id(m.created_at, digest[0]),
        "created_at": m.created_at,
        "current": current,
        "made_by": made_by,
        "parent": lineage.parent if lineage is not None else None,
        # a fit's images and patches are its training set and bank; an update's are what it added
        "images_added": lineage.images_added if made_by == "update" and lineage else m.training.n_images,
        "patches_added": lineage.patches_added if made_by == "update" and lineage else m.coreset.size,
        "threshold": m.calibration.threshold,
        "bank_size": m.coreset.size,
        "updatable": m.calibration_set is not None,
    }


def list_versions(path: str | Path) -> list[dict[str, Any]]:
    """The current version of the model at ``path`` and its archived ones, the most recently archived first (the
    one served before the current leads them). An archived version that no longer reads is listed with its
    ``error``."""
    path = Path(path)
    try:
        current = _describe_version(path, True)
    except ModelFormatError:
        # a save (an update, a rollback: here, by the CLI or by another replica) set the model aside after the read
        # checked for it: that save is waited for and the model read again
        wait_for_save(path)
        current = _describe_version(path, True)
    out = [current]
    root = versions_dir(path)
    if root.is_dir():
        for d in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=_archived_when, reverse=True):
            try:
                info = _describe_version(d, False)
            except (ModelFormatError, OSError) as exc:
                info = {"id": d.name, "current": False, "error": str(exc).replace(str(d), d.name)}
            if info["id"] != out[0]["id"]:
                out.append(info)
    return out


def _archived_when(version: Path) -> tuple[int, str]:
    """Where an archived version sorts among the others: by when it was archived (:func:`_stamp_archived`), as the
    prune orders them, not by its id's time. Why: the id's time is the clock of the host that made it, and a version
    made by an update on a replica whose clock was two hours behind was listed under versions made before it, not
    as the one served before the current: the version a rollback wants."""
    try:
        return _archive_stamp(version), version.name
    except OSError:  # pruned meanwhile: listed last, with its error
        return 0, version.name


def _archived_dirs(path: Path) -> list[Path]:
    """The archived versions' directories of the model at ``path`` (none when it has no archive, or it does not
    read)."""
    root = versions_dir(path)
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def _archived_ids(path: Path) -> str:
    """The archived version ids of the model at ``path``, newest first, for a message."""
    return ", ".join(v["id"] for v in list_versions(path)[1:]) or "none"


def _current_id(path: Path) -> str | None:
    """The version id of the model at ``path``; None when its manifest does not read."""
    try:
        return model_version_id(path)
    except (ModelFormatError, OSError, ValueError):
        return None


def rollback(path: str | Path, version: str, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> Path:
    """Make archived ``version`` the current model at ``path`` again (atomically, byte for byte); the version it
    replaces is archived. Raises AlreadyCurrentError for the version already current, LookupError for an unknown
    one, ModelFormatError if it does not verify."""
    path = Path(path).resolve()
    root = versions_dir(path)
    src = root / version
    if version and path.exists() and version == _current_id(path):
        raise AlreadyCurrentError(f"{version!r} is already the current version of {path.name}: nothing to roll "
                                  f"back (archived: {_archived_ids(path)})")
    # a name no archive can hold is unknown before the file system is asked (a 5000-character id raised OSError)
    if not plain_name(version) or not (src / MANIFEST).is_file():
        known = _archived_ids(path) if path.exists() else "none"
        raise LookupError(f"no archived version {version!r} of {path.name} (archived: {known})")
    manifest, files = read_artifact(src)  # every file verified before it becomes the served model
    contents = {**files, MANIFEST: (src / MANIFEST).read_bytes()}
    # it stays in the archive until it is the model, so a rollback killed at any step loses no version (it was moved
    # to a hidden directory first, gone from every list when the rollback died); the prune that archiving the
    # replaced version runs counts it, so that prune keeps one more, and never the version just replaced
    keep = max(keep_versions, 1)
    try:
        _swap_in(path, contents, keep + 1, spare=version)
    except OSError as exc:  # a full model volume: said as a fit's or an update's save says it, not a traceback
        raise _save_error(path, exc, spare=version) from None
    _drop_version(root, version)  # it is the current version now (archived again when replaced)
    prune_versions(path, keep)
    return path


def _drop_version(root: Path, version: str) -> None:
    """Delete archived ``version`` under ``root`` as a prune does: out of sight first, so a delete cut short leaves
    no half of it listed."""
    doomed = root / f"{PRUNED}{version}"
    try:
        os.replace(root / version, doomed)
    except FileNotFoundError:
        return  # pruned already
    except OSError:
        doomed = root / version
    shutil.rmtree(doomed, ignore_errors=True)


ABANDONED_AFTER_S = 600.0  # a temporary directory this old belongs to a save that died, not to one running now


def _writing(tmp: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an ``flock`` on ``tmp``, the directory a save writes its new version into, until it is swapped in.

    Why: a rescan deletes a save's temporary directory once it looks abandoned by its age, and a clock stepped
    forward while a save wrote (a host that booted in 1970 syncing its time) made a live one look decades old: the
    version being written was deleted under the save. A save that dies holds nothing. Where directories cannot be
    locked (``flock`` emulated by POSIX locks on NFS) the age alone decides, as before."""
    return holding(tmp)


def _abandoned(tmp: Path, now: float) -> bool:
    """Whether ``tmp``, a save's temporary directory, belongs to a save that died: old by the clock, and locked by
    no save (:func:`_writing`; an earlier release's save locks nothing, and its age alone decides)."""
    import fcntl

    try:
        if now - tmp.stat().st_mtime <= ABANDONED_AFTER_S:
            return False
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False  # gone meanwhile: its save is done with it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a save is writing it
    except OSError:
        return True  # no lock to ask here (NFS): the age decides
    finally:
        os.close(fd)
    return True


def recover(path: str | Path) -> bool:
    """Settle what saves of the model at ``path`` left aside in ``.old-`` copies: the previous model is put back when
    a save died between its two renames (verified first), and a version a save stopped or killed before its archive
    left beside the new model is archived (removed, when that save kept no versions). A save of this model under
    way is waited for (:func:`swap_lock`): the model it has set aside is no leftover. Returns True when a model was
    put back.
    """
    with swap_lock(path):
        return _recover(Path(path))


def _recover(path: Path) -> bool:
    """:func:`recover` under the model's :func:`swap_lock`. With no model at ``path``, the newest ``.old-`` copy
    that verifies is put back. Every other ``.old-`` copy beside a model is a version replaced by a save stopped or
    killed before its archive: it is archived (pruned by the next save that keeps versions), or removed when it is
    not whole (a delete that was cut short) or was set aside by a save that keeps no versions. Each is said in the
    log. Returns True when a model was put back."""
    backups = sorted(_set_aside(path), key=_mtime, reverse=True)
    put_back = False
    if not path.exists():
        for backup in backups:
            try:
                read_artifact(backup)
                os.replace(backup, path)
            except (ModelFormatError, OSError):
                continue
            sync_dir(path.parent)
            log.warning("%s: put back the model a save that died between its renames had set aside (%s)",
                        path.name, backup.name)
            put_back = True
            break
    if path.exists():
        for stale in _set_aside(path):
            _archive_set_aside(path, stale)
    return put_back


UNKEPT = "unkept-"  # after ``.old-``: set aside by a save that keeps no versions (--keep-versions 0)


def leftovers(path: Path, kind: str) -> list[Path]:
    """What was left beside ``path`` as ``.NAME.<kind>-TAG`` (a save's ``old`` and ``tmp`` copies, a models
    backup's), found by its name, as :func:`leftover_names` reads it, not by a pattern made of it: the name ``a[bc]``
    matched ``ab``'s copies and never its own, so a save or read of it put back or archived another model's version
    as its own, and ``m``'s pattern took the copies of a model named ``m.old-1`` (a tag holds no dot)."""
    prefix = f".{path.name}.{kind}-"
    return [p for p in path.parent.glob(glob.escape(prefix) + "*") if "." not in p.name[len(prefix):]]


def _set_aside(path: Path) -> list[Path]:
    """The ``.old-`` copies saves of the model at ``path`` set aside and did not archive or delete."""
    return leftovers(path, "old")


def _unkept(stale: Path) -> bool:
    """Whether ``stale``, a set-aside copy, was set aside by a save that keeps no versions: that save deleted it,
    so whoever settles it deletes it, where the archive of a model always saved so would keep it for good."""
    return stale.name.rpartition(".old-")[2].startswith(UNKEPT)


def _mtime(path: Path) -> float:
    """``path``'s modification time; 0 when it is gone (settled by another process meanwhile)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


_UNSETTLED: set[Path] = set()  # set-aside copies this process could not archive or remove: said once each


def _unsettled(stale: Path, message: str, *args: Any) -> None:
    """Log ``message`` once per process for ``stale``: on a read-only model store every read and every re-scan
    tried again and logged the same warning."""
    if stale not in _UNSETTLED:
        _UNSETTLED.add(stale)
        log.warning(message, *args)


def _archive_set_aside(path: Path, stale: Path) -> None:
    """Archive ``stale``, a version of ``path`` a stopped save left aside; remove it when it is not whole, or when
    that save kept no versions (as it would have). Where the model directory cannot be written (a read-only mount)
    it is left, and said once: the first reader or save where it is writable settles it."""
    stale = stale.resolve()
    if not os.access(stale.parent, os.W_OK):
        _unsettled(stale, "%s: %s, a version a stopped save left aside, stays there: the model directory is "
                   "read-only here (a reader or save where it is writable settles it)", path.name, stale.name)
        return
    problem = "its save kept no versions" if _unkept(stale) else _not_whole(stale)
    try:
        vid = archive_version(stale, path) if problem is None else None
    except OSError as exc:
        _unsettled(stale, "%s: could not move %s, a version a stopped save left aside, into the archive: %s",
                   path.name, stale.name, exc)
        return
    shutil.rmtree(stale, ignore_errors=True)  # left when it is no version, or that version was archived already
    if stale.exists():
        _unsettled(stale, "%s: could not remove %s, what a stopped save left of a replaced version", path.name,
                   stale.name)
        return
    if vid is None:
        log.warning("%s: removed %s, what a stopped save left of a replaced version (%s)", path.name, stale.name,
                    problem or "no readable manifest")
        return
    log.warning("%s: moved %s, the version a save that was stopped had replaced, into the archive as %s",
                path.name, stale.name, vid)


def _not_whole(model: Path) -> str | None:
    """Why the model directory ``model`` is not whole (its manifest unreadable or altered, a listed file missing or
    of another size); None when it is. Sizes only: a copy cut short by a delete, not a bit flip, is what it finds,
    and the files of a large model are not read. Any release's model passes, whatever this one makes of it."""
    try:
        raw = manifest_json(model / MANIFEST)
        check_digest(raw, model.name)
        files = raw["files"]
        for name, meta in files.items():
            if not plain_name(name) or (model / name).stat().st_size != meta["bytes"]:
                return f"{name} differs from its manifest"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or MANIFEST).name} is missing"
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ModelFormatError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _leftovers_by_model(directory: Path) -> dict[str, list[tuple[Path, str]]]:
    """Every save's leftover under ``directory`` (``.NAME.old-TAG``, ``.NAME.tmp-TAG``) by model name, with its kind."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for leftover in directory.glob(".*.*-*"):
        name, _, kind = leftover.name[1:].rpartition(".")
        if kind.startswith(("old-", "tmp-")):
            found.setdefault(name, []).append((leftover, kind))
    return found


def leftover_names(directory: str | Path) -> list[str]:
    """The models under ``directory`` that a save left copies of (:func:`recover_model` settles each): a listing of
    the directory only, so that a service can settle each model apart, within its own bound (stuck_io.py)."""
    directory = Path(directory)
    return sorted(_leftovers_by_model(directory)) if directory.is_dir() else []


def recover_model(directory: str | Path, name: str) -> bool:
    """Settle what saves of model ``name`` under ``directory`` left (:func:`_recover`: put back or archived); remove
    its abandoned temporary copies. True when the model was put back."""
    directory = Path(directory)
    now = time.time()
    recovered = False
    for leftover, kind in _leftovers_by_model(directory).get(name, []):
        # a save of that model between its renames is waited for: the model it set aside is no leftover, and the
        # one it archives (an ``.old-`` whose mtime is the model's own, as old as the model) is not deleted under it
        with swap_lock(directory / name):
            if not leftover.exists():
                continue  # that save is done with it
            if kind.startswith("old-"):
                recovered = _recover(directory / name) or recovered  # put back, or archived beside the model
            elif leftover.is_dir() and _abandoned(leftover, now):
                shutil.rmtree(leftover, ignore_errors=True)
    return recovered


def read_manifest(path: str | Path, settle: bool = True, digest: list[str] | None = None) -> Manifest:
    """Read and validate only the manifest of a model directory (no other file is read or verified). ``settle``:
    first put back or archive what a save that died left beside it; off for a copy that must stay as it was made
    (a backup's verification archived the set-aside copy it had just copied, and logged a move of the source's).
    ``digest``: as :func:`manifest_json`'s, the version's fingerprint read with it."""
    path = Path(path)
    if settle and (not path.exists() or _set_aside(path)):
        recover(path)  # a save that died or was stopped midway; one under way is waited for
    if not path.exists():
        from .spellings import spelling_hint

        raise ModelFormatError(f"no model at {path}{spelling_hint(path)}")
    if not path.is_dir():
        raise ModelFormatError(f"{path} is not a model directory")
    try:
        raw = manifest_json(path / MANIFEST, digest)
    except FileNotFoundError:
        try:
            inside = sorted(d.name for d in path.iterdir() if not d.name.startswith(".") and (d / MANIFEST).is_file())
        except OSError:
            inside = []
        if inside:  # `serve --model-dir models` takes the folder of models; the other commands take one of them
            raise ModelFormatError(f"{path} is a folder of models ({', '.join(inside[:5])}"
                                   f"{', ...' if len(inside) > 5 else ''}), not a model: name one, e.g. "
                                   f"{path / inside[0]}") from None
        raise ModelFormatError(f"{path} has no {MANIFEST}: not a model directory, or an incomplete copy") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise ModelFormatError(f"{path / MANIFEST} is corrupt ({exc})") from None
    except OSError as exc:
        raise ModelFormatError(f"{path / MANIFEST} cannot be read ({exc.strerror})") from None
    check_digest(raw, str(path))
    from .images import as_text

    # models fitted before training names were made text kept a file name in another code page as lone
    # surrogates, which /models/{name} failed to encode
    return parse_manifest(as_text(raw), str(path))


def read_artifact(path: str | Path, settle: bool = True,
                  digest: list[str] | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """Read and verify a model directory; returns ``(manifest, files)`` or raises :class:`ModelFormatError`.
    ``settle`` and ``digest``: as :func:`read_manifest`'s."""
    path = Path(path)
    manifest = read_manifest(path, settle, digest)
    files: dict[str, bytes] = {}
    for name, meta in manifest.files.items():
        f = path / name
        if not f.is_file():
            if not f.exists():
                raise ModelFormatError(f"{path} is incomplete: {name} is missing")
            kind = "a directory" if f.is_dir() else "a device, pipe or socket"
            raise ModelFormatError(f"{f} is not a file ({kind}), which the manifest lists")
        data = _listed_bytes(f, meta.bytes)
        if len(data) != meta.bytes and data.startswith(LFS_POINTER):
            raise ModelFormatError(f"{f}: {LFS_MESSAGE}")
        if len(data) != meta.bytes:
            size = len(data) if len(data) < meta.bytes else _disk_size(f)
            raise ModelFormatError(f"{f} is truncated or altered: {size} bytes, manifest says {meta.bytes}")
        if sha256(data) != meta.sha256:
            raise ModelFormatError(f"{f} is corrupt: its SHA-256 does not match the manifest")
        files[name] = data
    return manifest, files


def _listed_bytes(f: Path, size: int) -> bytes:
    """The bytes of the model file ``f``, which its manifest says holds ``size``: at most one more is read, so a file
    that grew past its manifest (a sparse file of gigabytes in a copied model) is found different by its length, not
    read whole into memory first."""
    try:
        with open(f, "rb") as fh:
            return fh.read(size + 1)
    except OSError as exc:
        raise ModelFormatError(f"{f} cannot be read ({exc.strerror or exc})") from None


def _disk_size(f: Path) -> int | str:
    """The size of ``f`` on disk, for a message (read only up to what its manifest lists)."""
    try:
        return f.stat().st_size
    except OSError:
        return "more"


# what the arrays of an ``.npz`` whose members are compressed may unpack to: this many times the file's bytes, or
# UNPACK_FLOOR_BYTES. Every release writes them stored (np.savez), where an array is never larger than the file; a
# compressed member of zeros unpacks to a thousand times its size
UNPACK_RATIO = 8
UNPACK_FLOOR_BYTES = 64 << 20
# the compression methods zipfile reads: numpy writes members stored (savez) or deflated (savez_compressed); any other
# method, or an encrypted member, zipfile refuses with an error that named no file of the model
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


# numpy reads each array's header with ast.literal_eval, and CPython 3.11 keeps the depth count of the AST it builds
# for the whole interpreter, not per thread: two models loading at once (the registry loads them on threads) once
# failed one with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905's family), and that model
# was not served. The headers of the model files are read one file at a time.
_HEADERS = threading.Lock()


def bytes_to_arrays(data: bytes, name: str = "model arrays") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file of the model called ``name``; ModelFormatError when they do not read (a cut
    archive raises BadZipFile or EOFError, not OSError), or would take more memory than the file can hold
    (:func:`_check_npz`), said before any of it is allocated."""
    try:
        with _HEADERS, zipfile.ZipFile(io.BytesIO(data)) as archive:
            _check_npz(archive, len(data), name)
        with _HEADERS, np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    # a member's cut compressed stream raises its decompressor's own error
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError) as exc:
        raise ModelFormatError(f"{name} is unreadable ({exc or type(exc).__name__})") from None


def _check_npz(archive: zipfile.ZipFile, size: int, name: str) -> None:
    """Refuse an ``.npz`` whose arrays would not fit in what its file holds: members that unpack far beyond the
    file (a zip bomb: :data:`UNPACK_RATIO`), or an array whose header declares a shape its member's bytes do not
    hold. numpy allocates the declared shape before it reads a byte: a header of a few bytes that claimed a
    trillion rows raised MemoryError (said as "lower --image-size"), and one that claimed gigabytes took them."""
    members = archive.infolist()
    unpacked = sum(m.file_size for m in members)
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) and \
            unpacked > max(UNPACK_FLOOR_BYTES, UNPACK_RATIO * size):
        raise ModelFormatError(f"{name} unpacks to {unpacked} bytes from {size}, far more than any model's arrays: "
                               "refused (a compressed archive built to fill the memory)")
    for member in members:
        if member.flag_bits & 0x1:
            raise ModelFormatError(f"{name}: {member.filename} is encrypted, which no model's arrays are: altered "
                                   "or corrupt")
        if member.compress_type not in READABLE_METHODS:
            raise ModelFormatError(f"{name}: {member.filename} is compressed by method {member.compress_type}, "
                                   "which no model's arrays are written in: altered or corrupt")
    for member in members:  # each, whatever its name: numpy reads a member without ".npy" as an array too
        with archive.open(member) as fh:
            try:
                version = np.lib.format.read_magic(fh)
            except ValueError:  # numpy would hand its bytes back where an array is read
                raise ModelFormatError(f"{name}: {member.filename} is no numpy array: altered or corrupt") from None
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ModelFormatError(f"{name}: {member.filename} is of .npy format {version}, which no model's "
                                       "arrays are written in")
            declared = math.prod(shape) * dtype.itemsize  # Python's integers: a huge shape does not wrap around
            held = member.file_size - fh.tell()
        if dtype.hasobject or not dtype.itemsize or declared != held:  # an empty dtype holds any shape in no bytes
            raise ModelFormatError(f"{name}: {member.filename} declares {shape} of {dtype} ({declared} bytes) but "
                                   f"holds {held} bytes: altered or corrupt")
