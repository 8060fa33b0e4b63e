"""A consistent copy of a model directory while the service serves, updates and rolls back its models.

Each model is written atomically, so a reader that opens it sees one version; but a file tool copies a model file
by file, and an update or rollback that lands between two files (an operator's click on the page, any time) left a
copy whose manifest belonged to one version and its index or arrays to the other: on the new host that model did
not load. Every save (``fit``, ``update``, ``rollback``, the service's own) holds the model's write lock
(artifact.model_lock) from its first write to the end of its prune, so a copy made under the same lock is one
version with its whole archive. Each copy is verified before the backup is put in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import VERSIONS_DIR, flock_saying, leftovers, model_lock, model_version_id, read_artifact
from .errors import ModelFormatError, UpdateUnavailableError
from .manifest import MANIFEST
from .dir_lock import held_by_none, holding, one_at_a_time
from .whole_file import sync_dir, sync_tree

log = logging.getLogger(__name__)


SET_ASIDE = ".old-"  # a save that died between its renames left the model here (artifact._swap_in)
# in every backup: an existing ``--out`` is replaced only when it holds this (an earlier backup) or nothing
MARK = ".anomaly-models-backup"
# beside ``--out``: a backup in which a copy did not verify that the earlier one at ``--out`` holds verified, which
# is kept (backup_models); the next such backup replaces it, and one that replaces ``--out`` removes it
UNVERIFIED = ".unverified"


class ModelBackupError(RuntimeError):
    """A backup of the model directory that cannot be made as asked: the message says why."""


@dataclass
class ModelCopy:
    name: str
    version: str | None  # the current version copied; None: only archived versions (the model was deleted)
    archived: int
    set_aside: int  # copies a save that died left aside, which loading the restored store puts back
    problems: list[str] = field(default_factory=list)  # versions that did not verify in the source either
    failing: list[str] = field(default_factory=list)  # those copies, by their path in the backup
    has_current: bool = True  # a current version was copied (``version`` None with it: its manifest does not read)


@dataclass
class ModelBackup:
    path: Path
    models: list[ModelCopy]
    seconds: float
    # the earlier backup at ``--out``, kept as it was: it holds a copy that verifies of what does not now, and this
    # backup (``path``) went beside it (None: this one replaced it, or there was none)
    kept: Path | None = None


def _names(model_dir: Path) -> list[str]:
    """Models (a directory with a manifest) and archives (``.versions/NAME``), by name."""
    names = {p.name for p in model_dir.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()}
    names |= {p.name[1:].rsplit(SET_ASIDE, 1)[0] for p in model_dir.glob(f".*{SET_ASIDE}*") if p.is_dir()}
    archive = model_dir / VERSIONS_DIR
    if archive.is_dir():
        names |= {p.name for p in archive.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(names)


def _locked(path: Path, waiting: Callable[[], None] | None = None) -> contextlib.ExitStack:
    """The model's write lock, ``waiting`` called first when a save holds it. Where this process may not write the
    model directory (a backup account that only reads the service's models, a read-only mount of them) the lock
    file the saves take is held shared, read-only (:func:`_read_locked`): that this process cannot write there says
    nothing of the service's user, whose update a backup copied without the lock, across its two versions."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(model_lock(path, waiting))
    except UpdateUnavailableError:
        stack.enter_context(_read_locked(path, waiting))
    return stack


@contextlib.contextmanager
def _read_locked(path: Path, waiting: Callable[[], None] | None) -> Iterator[None]:
    """The lock file of the model at ``path`` (artifact.model_lock's) held shared for the block, through a
    descriptor opened read-only, which ``flock`` takes: saves wait for the block, and it for a save. No lock file:
    no save has taken one there (nothing of the first save to wait for), or it cannot be read; the copy goes on."""
    import fcntl

    path = Path(path).resolve()
    try:
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            flock_saying(fd, fcntl.LOCK_SH, waiting)
        except OSError:  # a file system without locks: as model_lock, which cannot lock there either
            pass
        yield
    finally:
        os.close(fd)


def _unverified(copy: Path) -> Exception | None:
    """Why ``copy``, read whole, does not verify; None where it does. Settles nothing: the copy stays as made, a
    set-aside copy beside the model included (its restored store settles it, as the old host would have)."""
    try:
        read_artifact(copy, settle=False)
    except (ModelFormatError, OSError, ValueError) as exc:
        return exc
    return None


def _verify(copy: Path, label: str, into: ModelCopy, backup: Path) -> None:
    """Read ``copy`` whole; where it does not verify, say why in ``into.problems`` and note its path in the backup."""
    exc = _unverified(copy)
    if exc is not None:
        into.problems.append(f"{label}: {str(exc).replace(str(copy), label)}")
        into.failing.append(copy.relative_to(backup).as_posix())


def _no_links(directory: str, entries: list[str]) -> list[str]:
    """What a copy of a model leaves out: symbolic links. No save writes one, and followed, a link put in a model
    directory copied in from elsewhere (to ``/``, to a share) copied all it names into the backup."""
    left = [e for e in entries if os.path.islink(os.path.join(directory, e))]
    for e in left:
        log.warning("models backup: left out %s, a symbolic link (no model file is one)", os.path.join(directory, e))
    return left


def _copy_model(model_dir: Path, name: str, dest: Path, waiting: Callable[[str], None] | None = None) -> ModelCopy:
    """``name`` and its archive into ``dest``, under the model's write lock: one version, every archived one.
    ``waiting(name)`` is called when a save holds the lock, before the copy waits for it."""
    src, archive = model_dir / name, model_dir / VERSIONS_DIR / name
    with _locked(src, (lambda: waiting(name)) if waiting is not None else None):
        current = (src / MANIFEST).is_file() and not src.is_symlink()  # the service serves no linked model
        if current:
            shutil.copytree(src, dest / name, ignore=_no_links)
        # a host that died between a save's two renames: the service puts the model set aside back when it loads
        # the restored store, as it would have on the old host
        asides = [shutil.copytree(aside, dest / aside.name, ignore=_no_links)  # found by name: see there
                  for aside in leftovers(src, "old") if (aside / MANIFEST).is_file() and not aside.is_symlink()]
        kept = 0
        if archive.is_dir():  # a link here is the plant's own (the archive on a larger disk): followed
            # hidden entries are a prune's or a killed save's leftovers, never a listed version
            shutil.copytree(archive, dest / VERSIONS_DIR / name,
                            ignore=lambda d, entries: sorted({e for e in entries if e.startswith(".")}
                                                             | set(_no_links(d, entries))))
            kept = sum(1 for p in (dest / VERSIONS_DIR / name).iterdir() if (p / MANIFEST).is_file())
    version = None
    if current:  # a manifest gone bad: its copy is made all the same and said not to verify (below), and the other
        # models are backed up; its error ended the whole backup, naming the copy's temporary path
        with contextlib.suppress(ModelFormatError, OSError, ValueError):
            version = model_version_id(dest / name, settle=False)
    out = ModelCopy(name, version, kept, len(asides), has_current=current)
    if current:
        _verify(dest / name, name, out, dest)
    for aside in asides:
        _verify(aside, f"{name} copy {aside.name} set aside by a save that died", out, dest)
    if kept:
        for version in sorted((dest / VERSIONS_DIR / name).iterdir()):
            if (version / MANIFEST).is_file():
                _verify(version, f"{name} version {version.name}", out, dest)
    return out


def _replaceable(out: Path) -> None:
    """Refuse an ``out`` that is neither absent, empty nor an earlier backup: the backup replaces what is there
    whole, and ``--out /mnt/usb`` or ``--out /srv`` (the model directory's parent) deleted all it held."""
    if not out.is_dir() or (out / MARK).is_file():
        return
    held = sorted(p.name for p in out.iterdir())
    if held:
        raise ModelBackupError(f"{out} holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''} and is no "
                               f"earlier models backup, which it would replace whole: name a new directory, such as "
                               f"{out / 'models'}")


def _why(exc: OSError) -> str:
    """What went wrong, once: a copy of a whole model fails file by file, and its error listed every file with
    the same reason twice (a full disk's message ran to a line per file of every model and version)."""
    failures = exc.args[0] if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) else []
    if not failures:
        return exc.strerror or str(exc)
    src, _dest, reason = failures[0]
    more = f" (and {len(failures) - 1} more file(s))" if len(failures) > 1 else ""
    reason = str(reason).split(": '")[0]  # shutil says "[Errno 28] No space left on device: 'src' -> 'dest'"
    return f"cannot copy {src}: {reason.partition('] ')[2] if reason.startswith('[Errno') else reason}{more}"


def _settle_killed(out: Path) -> None:
    """Settle what backups to ``out`` that were killed left beside it.

    Why: a backup killed while it copied (an orchestrator's kill, a power cut) left its ``.partial-`` copy of every
    model and version, and each backup run again after such a kill added another: nothing removed them, and the
    volume the backups go to filled up. One killed between its two renames left no ``out`` at all, the earlier backup
    under ``.replaced-``: that is put back first, a whole backup where the next one might fail."""
    # by --out's name (artifact.leftovers): as a pattern, 'models[A]' matched '.modelsA...' and never its own, and
    # 'nightly' put back, then replaced, the earlier backup of an --out named 'nightly.replaced-2'
    if not out.exists():
        earlier = [p for p in leftovers(out, "replaced") if (p / MARK).is_file() and not p.is_symlink()]
        if earlier:
            latest = max(earlier, key=lambda p: p.stat().st_mtime_ns)
            latest.rename(out)
            sync_dir(out.parent)
            log.warning("models backup: put back %s, the earlier backup a killed one had set aside", out)
    for left in [*leftovers(out, "partial"), *leftovers(out, "replaced")]:
        if left.is_dir() and not left.is_symlink() and held_by_none(left):  # a link is no backup's (rmtree refuses it)
            shutil.rmtree(left, ignore_errors=True)
            log.warning("models backup: removed %s, left by a backup that was killed", left)


def _drop_earlier(path: Path) -> None:
    """Remove ``path`` where it is a backup (its mark), never anything else that has its name."""
    if path.is_dir() and not path.is_symlink() and (path / MARK).is_file():
        shutil.rmtree(path)


def backup_models(model_dir: str | Path, out: str | Path,
                  waiting: Callable[[str], None] | None = None) -> ModelBackup:
    """Copy every model under ``model_dir`` with its archived versions and change log to ``out``; each model is
    copied under its write lock and verified. Written beside ``out`` and renamed into place once whole: a backup
    that fails never replaces an earlier one there. ``out`` is new, empty or an earlier backup (_replaceable).
    ``waiting(name)``: called when a save of model ``name`` holds its lock and the copy waits for it (a backup
    that stood still unsaid behind a long update looked hung); logged when not given."""
    if waiting is None:
        def waiting(name: str) -> None:
            log.warning("models backup: %s is being changed (an update, rollback or fit holds its write lock); its "
                        "copy waits for that to end", name)
    model_dir, out = Path(model_dir), Path(out)
    if out.is_symlink():  # the place it names: renamed over, the link was set aside and the backup left beside it
        out = out.resolve()
    if not model_dir.is_dir():
        raise ModelBackupError(f"no model directory {model_dir}")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise ModelBackupError(f"{out} is inside the model directory {model_dir}: the service would serve it")
    if out.exists() and not out.is_dir():
        raise ModelBackupError(f"{out} exists and is not a directory")
    if out.resolve() in model_dir.resolve().parents:
        raise ModelBackupError(f"{out} holds the model directory {model_dir}: replacing it would delete the models")
    held = contextlib.ExitStack()
    t0 = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    partial = out.parent / f".{out.name}.partial-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # one backup into the folder at a time (a nightly one and one by hand): another's settle took this one's
        # partial copy for a killed backup's between its mkdir and its flock, and put an earlier backup it had just
        # set aside back in its place between its two renames; either failed it
        held.enter_context(one_at_a_time(out.parent, "models backup"))
        _settle_killed(out)
        _replaceable(out)
        partial.mkdir()
        held.enter_context(holding(partial))  # a killed backup's copy is held by nobody (_settle_killed)
        (partial / MARK).write_text("made by anomaly models backup: the next backup to this path replaces it\n")
        copies = [_copy_model(model_dir, name, partial, waiting) for name in _names(model_dir)]
        for extra in model_dir.iterdir():  # a weights file or notes kept beside the models
            if extra.is_file() and not extra.name.startswith("."):
                shutil.copy2(extra, partial / extra.name)
        # on the disk before it replaces the earlier backup: a power cut after the rename (the command said done)
        # left the backup's names on files whose bytes were still in the page cache
        sync_tree(partial)
        unverified, kept = out.parent / f"{out.name}{UNVERIFIED}", None
        failing = [rel for c in copies for rel in c.failing]
        if out.is_dir() and any(_unverified(out / rel) is None for rel in failing):
            # a model gone bad in the store (a truncated file, a disk's error, an edit): the night's backup replaced
            # the last one whose copy of it was good, and the plant lost that model. Kept; this one goes beside it
            _drop_earlier(unverified)
            partial.rename(unverified)
            sync_dir(out.parent)
            kept, out = out, unverified
        else:
            if out.exists():
                aside = out.parent / f".{out.name}.replaced-{tag}"
                out.rename(aside)
                partial.rename(out)
                sync_dir(out.parent)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                partial.rename(out)
                sync_dir(out.parent)
            _drop_earlier(unverified)  # one set aside beside it by an earlier run is older than this
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelBackupError(f"backup of {model_dir} to {out} failed: {_why(exc)}; nothing was replaced") from None
    finally:
        held.close()
    return ModelBackup(out, copies, time.perf_counter() - t0, kept)
