"""A model's change log: which version each fit, update or rollback made current, when, by whom and why.

The model decides which parts ship, so a plant's quality system asks who changed it and on what grounds (an
audit finds a version that passed a scratch: who taught it that scratch was good?). A manifest says what made its
own version, but a rollback makes an old version current again byte for byte, and no manifest names a person. So
every change made through the CLI or the service appends one JSON line to ``models/.versions/<name>/history.jsonl``,
beside the archived versions, under the model's write lock. Append-only: a line is never rewritten. The log is a
record, not the model: a log that cannot be written is warned about and never undoes a change already served.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from .artifact import model_version_id, versions_dir
from .errors import AnomalyError
from .images import as_text
from .whole_file import sync_dir, write_whole

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
ACTIONS = ("fit", "update", "rollback")
MAX_BY = 200
MAX_NOTE = 2000
MAX_LOGGED_IMAGES = 100  # an update's added images named in its entry (the count is always there)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]+")


def history_path(model_path: str | Path) -> Path:
    return versions_dir(Path(model_path).resolve()) / HISTORY_FILE


def default_author() -> str | None:
    """Who runs a CLI command when they do not say (``--by``): the operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container's arbitrary uid)
        return None


def _clean(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    text = _CONTROL.sub(" ", text).strip()[:limit]  # one line each, whatever a client sent
    return text or None


def record(model_path: str | Path, action: str, version: str, previous: str | None, *, by: str | None = None,
           note: str | None = None, via: str = "cli", **details: Any) -> dict[str, Any] | None:
    """Append one change; returns the entry, or None when the log could not be written (warned)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": action, "version": version,
             "previous": previous, "by": _clean(by, MAX_BY), "note": _clean(note, MAX_NOTE), "via": via, **details}
    # bytes that are no UTF-8 (a --by typed in a Latin-1 terminal, a photo named in another code page) as \xNN
    # text: Python's lone surrogates for them made every answer that lists the log a 500
    entry = as_text(entry)
    path = history_path(model_path)
    try:
        made = [d for d in (path.parent, *path.parent.parents[:1]) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_log(path, os.O_RDWR | os.O_APPEND | os.O_CREAT) as f:
            new = f.tell() == 0
            # a write cut off (disk full, crash) left half a line: end it, or this entry is glued to it and lost
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            # ASCII JSON: a U+2028 in a note is no line break to any reader
            f.write((("\n" if torn else "") + json.dumps(entry) + "\n").encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        if new:  # the log's name (and the folders made for it) on the disk too: a power cut kept bytes of no name
            for d in (path.parent, *(m.parent for m in made)):
                sync_dir(d)
    except OSError as exc:
        log.warning("model history: could not record the %s of %s (version %s) in %s: %s", action,
                    Path(model_path).name, version, path, exc)
        return None
    return entry


def _open_log(path: Path, flags: int) -> BinaryIO:
    """The log file at ``path``, opened with ``flags``, never through a symbolic link; for writing, a log with other
    hard links is first made a file of its own. Why: a model's archive copied in from elsewhere (a models backup
    unpacked with its links) may hold a ``history.jsonl`` that links to another file, and every update and rollback
    appended its entry to that file (a shell's start-up file, another program's configuration, the log in a backup
    made with hard links). OSError, saying so, for a symbolic link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, not a file of the model's archive: remove it") from None
        raise
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return os.fdopen(fd, "rb")
    if os.fstat(fd).st_nlink > 1:  # its entries copied to a new file under its name: the other names keep theirs
        with os.fdopen(fd, "rb") as shared:
            write_whole(path, shared.read())
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a+b")


def current_version(model_path: str | Path) -> str | None:
    """The version id of the model now at ``model_path`` (what a change replaces); None where there is none, or it
    does not read."""
    try:
        return model_version_id(model_path)
    except (AnomalyError, OSError, ValueError):
        return None


def record_update(model_path: str | Path, model: Any, previous: str | None, images: Sequence[str], *,
                  forced: bool, by: str | None, note: str | None, via: str = "cli") -> dict[str, Any] | None:
    """An update's entry, from the saved updated ``model``: what its lineage says it added, and the names of the
    first images it added."""
    lineage = model.manifest_.lineage
    added = list(images)
    left_out = [r.name for r in getattr(model, "duplicates_", None) or []]  # skipped as exact duplicates
    left_out += [name for name, _ in getattr(model, "unlike_", None) or []]  # unlike the photos the model was fitted on
    left_out += getattr(model, "left_out_", None) or []  # still flagged, left out by contamination="drop"
    for name in left_out:
        if name in added:
            added.remove(name)
    return record(model_path, "update", model.version_id_, previous, by=by, note=note, via=via,
                  images_added=lineage.images_added, patches_added=lineage.patches_added, forced=forced,
                  images=added[:MAX_LOGGED_IMAGES])


def read(model_path: str | Path, limit: int | None = None, skip: int = 0) -> list[dict[str, Any]]:
    """The changes, newest first, past the newest ``skip`` (a page of a long log). A line that does not parse (a
    write cut off by a crash) is skipped, and not counted."""
    return page(model_path, limit, skip=skip)[0]


def page(model_path: str | Path, limit: int | None = None, *, before: int | None = None,
         skip: int = 0) -> tuple[list[dict[str, Any]], int | None]:
    """Up to ``limit`` changes, newest first, of those logged on lines that start before byte ``before`` of the log
    (all, without it), past the newest ``skip`` of them; and where the next, older page starts (the byte its oldest
    change's line starts at), or None when no older change is logged.

    A byte of the log is a cursor that holds: the log is only ever appended to, so a change logged between two pages
    neither repeats an entry on the next page nor hides one, as a count from the newest does. A ``before`` that is
    no line's start (a cursor from another log) reads the line it falls in as torn: skipped. The log is read from
    its end a block at a time, as far as the page goes: a model taught for years has a log of many megabytes, and
    every versions answer (the page polls it) and every history page read and decoded all of it."""
    if limit is not None and limit < 1:
        raise ValueError("a page holds at least one change")
    path = history_path(model_path)
    out: list[dict[str, Any]] = []
    oldest = 0  # the byte the line of the page's oldest change starts at
    try:
        with _open_log(path, os.O_RDONLY) as f:
            for start, line in _newest_first(f, before):
                entry = _entry(line)
                if entry is None:
                    continue
                if skip > 0:  # counted, not converted: a deep page passes over most of the log
                    skip -= 1
                    continue
                if limit is not None and len(out) >= limit:  # one more change is logged: the page's end is a cursor
                    return out, oldest
                # as_text: an earlier release wrote such bytes as lone surrogates
                out.append({"previous": None, "by": None, "note": None, "via": "?", **as_text(entry)})
                oldest = start
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        log.warning("model history: %s is not read: %s", path, exc.strerror or exc)
        return [], None
    return out, None


def entry_at(model_path: str | Path, start: int) -> dict[str, Any] | None:
    """The change logged on the line that starts at byte ``start`` of the log, as written; None where no line starts
    there (past the log's end, inside a line) or the line holds no change (a torn one among them). What a page's
    cursor checks: a log replaced since (a models backup restored over the model, the model fitted anew under its
    name) has another line there, or none."""
    try:
        with _open_log(history_path(model_path), os.O_RDONLY) as f:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    return None
            f.seek(start)
            line = b""
            while b"\n" not in line:
                block = f.read(READ_BLOCK)
                if not block:  # the log's last line, whose line break a write cut off: a page reads it too
                    break
                line += block
    except OSError:
        return None
    entry = _entry(line.split(b"\n", 1)[0])
    return None if entry is None else as_text(entry)  # as a page gives it


READ_BLOCK = 1 << 20  # bytes of the log read at a time, from its end


def _newest_first(f: BinaryIO, before: int | None = None) -> Iterator[tuple[int, bytes]]:
    """The lines of the log in ``f`` that start before byte ``before`` (all, without it), last first, each with the
    byte it starts at. Only "\n" ends an entry; a line longer than a block is joined across blocks."""
    end = f.seek(0, os.SEEK_END)
    if before is not None:
        end = max(0, min(end, before))
    rest = b""  # the start of the last line seen, whose beginning is in an earlier block
    while end > 0:
        start = max(0, end - READ_BLOCK)
        f.seek(start)
        data = f.read(end - start) + rest
        lines = data.split(b"\n")
        stop = start + len(data)  # the byte after the last line
        for line in reversed(lines[1:]):
            stop -= len(line)
            yield stop, line
            stop -= 1  # its line break
        end, rest = start, lines[0]
    yield 0, rest


def _entry(line: bytes) -> dict[str, Any] | None:
    """The change a line of the log holds (its text as written); None for a line that is none."""
    try:
        entry = json.loads(line.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # not JSON, or JSON no reader should take (a huge number, deep nesting)
        return None
    if isinstance(entry, dict) and entry.get("action") in ACTIONS and all(
            isinstance(entry.get(k), str) for k in ("at", "version")) and all(
            entry.get(k) is None or isinstance(entry.get(k), str) for k in ("previous", "by", "note", "via")):
        return entry
    return None
