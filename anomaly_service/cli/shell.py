"""What every command shares as a shell: one error line and an exit code instead of a traceback, SIGTERM as
Ctrl-C for commands that write a model, output directories checked before the work, a model's write lock."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from ..errors import AnomalyError, ConfigError, out_of_memory
from ..interrupts import stops_held

if TYPE_CHECKING:
    from ..images import ImageLimits


# the service's settings of the same names (ANOMALY_<FIELD>), read by every command that reads photos
LIMIT_VARIABLES = {"max_pixels": "ANOMALY_MAX_PIXELS", "max_bytes": "ANOMALY_MAX_UPLOAD_BYTES"}


def image_limits() -> "ImageLimits":
    """The pixel and byte limits of the photos a command reads: the library's, or the service's settings where they
    are set in the environment, so that a plant whose line camera takes photos past the defaults raises them once,
    for the service and the command line alike."""
    import dataclasses
    import os

    from ..images import DEFAULT_LIMITS, admit_in_pillow

    given = {}
    for field, variable in LIMIT_VARIABLES.items():
        text = os.environ.get(variable, "").strip()
        if not text:
            continue
        try:
            given[field] = int(text)
            if given[field] < 1:
                raise ValueError(text)
        except ValueError:
            raise ConfigError(f"{variable}={text!r}: give a whole number above 0 (the limit of a photo's "
                              f"{'pixels, width x height' if field == 'max_pixels' else 'file size in bytes'})"
                              ) from None
    limits = dataclasses.replace(DEFAULT_LIMITS, **given)
    admit_in_pillow(limits.max_pixels)  # the command's process is ours: Pillow's checks agree with ours
    return limits


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly(fn: Callable) -> Callable:
    """Turn expected failures into one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AnomalyError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            # Python's own MemoryError says nothing: taking its first line was an IndexError's traceback
            said = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
            fail(f"out of memory ({said}): lower --image-size or --batch-size, or --tile large photos")

    return wrapper


def sigterm_stops(fn: Callable) -> Callable:
    """For commands that write a model: SIGTERM (a container stop, ``kill``) stops them as Ctrl-C does, so a save
    under way removes its half-written copy instead of leaving it beside the model (rescore.sigterm_as_interrupt).
    Inside :func:`friendly`, which says "interrupted"."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..rescore import sigterm_as_interrupt

        with sigterm_as_interrupt():
            return fn(*args, **kwargs)

    return wrapper


def save_and_log(out: Path, previous: str | None, save: Callable[[], str], log_change: Callable[[str], Any]) -> None:
    """Save a model (``save`` returns its version id), then ``log_change(version)`` in its change log. An interrupt
    before the new model is in place stops the save and leaves the ``previous`` one standing (KeyboardInterrupt); one
    after it cannot undo it, so the change is still logged and the command ends saying which version is in place
    (:func:`interrupted_after_save`). Saying "interrupted" there left an operator believing the old model stood."""
    from .. import model_history

    logged = False
    try:
        version = save()
        with stops_held() as held:
            log_change(version)
            logged = True
    except KeyboardInterrupt:
        current = model_history.current_version(out)
        if current is None or current == previous:
            raise  # stopped before the swap: the previous model stands, and there is no change to log
        if not logged:
            with stops_held():
                log_change(current)
        interrupted_after_save(out, current)
    if held:
        interrupted_after_save(out, version)


def interrupted_after_save(out: Path, version: str) -> None:
    """The one error line of a command stopped once its new model was in place."""
    fail(f"interrupted after the save: {Path(out).resolve()} is the new version {version} (the change is in its "
         "log, anomaly versions --history)", 130)


def temporary_directory_usable() -> None:
    """Fail at once, naming the fix, where no temporary directory takes writes (a read-only root file system with
    neither TMPDIR nor a writable /tmp or working directory), or where TMPDIR names one that does not.

    Why: the service started all the same and refused every upload over 1 MiB (held there while it arrives), and
    torch's compiler package makes its cache directory there when a backbone imports it: such a model failed to
    load, and every later one with an unrelated error about torch's cache registry. A large fit's patches are held
    there too. A TMPDIR that did not exist yet (the edge set-up's ``/data/tmp``, never made) was passed over
    without a word: the command stopped saying to set the TMPDIR it had set, or on a writable root wrote to
    ``/tmp`` on the root's card instead of the data volume. So it is made when missing, and one that takes no
    writes is named with its reason. Only its last folder is made, and only where the path is absolute: a parent
    that is missing (a misspelt path, a volume not mounted) or a relative path had folders made beside the
    working directory or on the root's card."""
    import os
    import tempfile

    named = os.environ.get("TMPDIR")
    if named and not os.path.isdir(named):
        try:
            if not os.path.isabs(named):
                raise OSError(f"a relative path, made under {os.getcwd()} it would move with the working directory")
            if os.path.islink(named):
                raise OSError(f"a link to {os.readlink(named)}, which is missing")
            os.mkdir(named)  # its last folder only: a missing parent is a misspelt path or a volume not mounted
        except OSError as exc:
            raise ConfigError(f"TMPDIR {named} is no directory and could not be made ({exc.strerror or exc}): "
                              "make it, or set TMPDIR to a writable directory, such as one on the data volume; "
                              "the backbone's libraries, uploads over 1 MiB and a large fit's patches need one"
                              ) from None
        tempfile.tempdir = None  # a directory chosen before this one existed is not the one TMPDIR names
    try:
        chosen = tempfile.gettempdir()
    except OSError as exc:
        raise ConfigError(f"no usable temporary directory ({exc.strerror or exc}: TMPDIR, /tmp, /var/tmp and the "
                          "working directory take no writes): set TMPDIR to a writable directory, such as one on "
                          "the data volume; the backbone's libraries, uploads over 1 MiB and a large fit's patches "
                          "need one") from None
    if named and os.path.abspath(chosen) != os.path.abspath(named):
        try:  # tempfile passed it over in silence: its own attempt says why
            tempfile.TemporaryFile(dir=named).close()
            why = "tempfile passed it over"
        except OSError as exc:
            why = str(exc.strerror or exc)
        raise ConfigError(f"TMPDIR {named} takes no writes ({why}): give the service's user a writable directory "
                          f"there, or unset TMPDIR to use {chosen}; the backbone's libraries, uploads over 1 MiB "
                          "and a large fit's patches need one")


def writable_dir(path: Path, what: str) -> None:
    """Fail before any work when an output directory cannot be one: a file is in the way, or the nearest existing
    directory takes no new entry (permissions, a read-only or special file system). Probed by making one, since
    permission bits say nothing to root; a fit must not run for minutes and then fail to save."""
    import tempfile

    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what} {path}: {p} is a file, not a directory")
            try:
                tempfile.TemporaryDirectory(dir=p, prefix=".anomaly-probe-").cleanup()
            except OSError as exc:
                raise ConfigError(f"{what} {path}: cannot write in {p} ({exc.strerror or exc})") from None
            break


def warn_unservable_name(path: Path, what: str) -> None:
    """Say before a fit that ``anomaly serve`` will not serve a model saved under this directory name: the service
    names models by their directory and takes only plain names, so the model would show up in its errors alone."""
    from ..manifest import PLAIN_NAME_RULE
    from ..registry import valid_name

    name = path.resolve().name
    if not valid_name(name):
        click.echo(f"warning: {what} {path}: the service will not serve a model named {name!r} (a model's directory "
                   f"name must be {PLAIN_NAME_RULE}); anomaly score and the Python API read it all the same", err=True)


def model_write_lock(model_path: Path) -> contextlib.AbstractContextManager:
    """The write lock of a model directory that a serving replica's update or rollback takes too
    (artifact.model_lock); none for a path that is not a directory (loading it says what is wrong). Where another
    holds it, says so before waiting: an update over HTTP can hold it for minutes, and a silent command looks hung."""
    from ..artifact import model_lock

    def waiting() -> None:
        click.echo(f"waiting: another update or rollback of {Path(model_path).resolve().name} is under way (a "
                   "serving replica or another command holds its lock); this goes on once it ends", err=True)

    return model_lock(model_path, waiting) if Path(model_path).is_dir() else contextlib.nullcontext()
