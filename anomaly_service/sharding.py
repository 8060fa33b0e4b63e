"""An archive split into shards: which images are one shard's, and which of them an earlier run already finished.

An image belongs to shard ``hash(key) mod N``, where its key is its path relative to the listing root. Neither the
listing's order nor the machine it runs on enters: every process that lists the same archive, wherever it is
mounted, gets the same partition, and images added later never move the others to another shard. Shards are
numbered from 0, as a Kubernetes Indexed Job numbers its completions (``JOB_COMPLETION_INDEX``).

A shard's results are JSON lines, one per image, flushed as each is written: a killed process loses at most the
line it was writing, and a resumed one reads back what is there (cutting a partial last line) and skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .dir_lock import in_turns
from .errors import AnomalyError, ConfigError

log = logging.getLogger(__name__)

INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
# the most shards an archive is split into: runs of different counts take turns by their count, which PostgreSQL's
# advisory lock holds in a signed 32-bit key; two counts above it took one turn and ran at once on the same images
MAX_SHARDS = (1 << 31) - 1


def fixed_hash(text: str, *, signed: bool = False) -> int:
    """The first eight bytes of the SHA-256 of ``text`` (UTF-8), big-endian, as an integer: what picks an image's
    shard, a shard's claim and the lock bytes of a shard count's turn. Fixed, unlike Python's own ``hash`` of a
    string, so every release, process and machine picks the same: a process of an older release takes the same locks
    as a new one, and a changed value would let both score the same images at once."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big", signed=signed)


def shard_of(key: str, count: int) -> int:
    """The shard (0-based) of an image key among ``count``: a fixed hash, so it never changes between releases,
    processes or machines."""
    return fixed_hash(key) % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] = os.environ) -> Shard:
        """``K/N``, or ``auto/N`` for K from ``$JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job's pod)."""
        m = re.fullmatch(r"\s*(\d+|auto)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise ConfigError(f"--shard must be K/N (K from 0 to N-1) or auto/N; got {text!r}")
        raw, count = m.group(1), int(m.group(2))
        if raw == "auto":
            raw = environ.get(INDEX_ENV, "")
            # the digits alone, as the text's own K: str.isdigit took a superscript two and str.strip a unit
            # separator, neither of which int() reads
            whole = re.fullmatch(r"\s*(\d+)\s*", raw)
            if whole is None:
                raise ConfigError(f"--shard auto/{count} takes K from ${INDEX_ENV} (set in the pods of a Kubernetes "
                                  f"Indexed Job), which is {'not set' if not raw else repr(raw)}: give K/{count}")
            raw = whole.group(1)
        index = int(raw)
        if count > MAX_SHARDS:
            raise ConfigError(f"--shard {raw}/{count}: N is at most {MAX_SHARDS}")
        if count < 1 or index >= count:
            raise ConfigError(f"--shard {index}/{count}: K counts from 0 and must be below N")
        return cls(index, count)

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    @property
    def file_name(self) -> str:
        """This shard's results file in an output directory."""
        return f"shard-{self.index}-of-{self.count}.jsonl"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ArchiveImage:
    """One listed image: its key (POSIX path relative to the listing root) and where it is read from."""

    key: str
    path: Path


def listing_root(inputs: Sequence[Path]) -> Path:
    """The deepest directory holding every input: keys are relative to it, so they do not depend on where the
    archive is mounted."""
    root = Path(os.path.commonpath([os.path.abspath(p) for p in inputs]))
    return root.parent if root.is_file() else root


def list_archive(inputs: Sequence[Path]) -> tuple[list[ArchiveImage], list[Path]]:
    """Every image under ``inputs`` (directories recursively, each in sorted order) with its key, once even if
    inputs overlap; returns ``(images, skipped non-image files)``."""
    from .images import list_images, path_text

    found, skipped = list_images(list(inputs), recursive=True)
    root = listing_root(inputs)
    images: list[ArchiveImage] = []
    seen: set[str] = set()
    for path in found:
        key = path_text(Path(os.path.relpath(os.path.abspath(path), root)).as_posix())
        if key not in seen:
            seen.add(key)
            images.append(ArchiveImage(key, path))
    return images, skipped


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def begun_roots(files: Sequence[Path]) -> set[str]:
    """The folders the keys of ``files`` (results files) are relative to, as their runs were given them: read off
    each file's first whole line (its ``path`` ends in its ``key``). Every shard file of an output directory is
    read, not only this shard's: shards that keyed one image differently split it to two shards, or to none."""
    roots: set[str] = set()
    for row in filter(None, map(_first_row, files)):
        given, key = row.get("path"), row.get("key")
        if isinstance(given, str) and isinstance(key, str) and given.replace(os.sep, "/").endswith("/" + key):
            roots.add(given[:len(given) - len(key) - 1] or os.sep)
    return roots


def _first_row(path: Path) -> dict[str, Any] | None:
    """A results file's first whole line, read; None where there is none or it is no JSON object."""
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        line = f.readline()
        row = json.loads(line) if line.endswith(b"\n") else None
        return row if isinstance(row, dict) else None
    return None


def other_versions(files: Sequence[Path], model: str, names: Sequence[str]) -> list[tuple[Path, str]]:
    """The results files among ``files`` begun with another version of ``model`` than ``names`` name, each with
    that version: the model updated (an operator's teaching, a rollback) while the shards of one directory ran, one
    pod after another, and the directory's results mixed two models' scores unsaid."""
    found = []
    for path in files:
        row = _first_row(path)
        if row is not None and row.get("model") == model and row.get("model_version") not in names:
            found.append((path, str(row.get("model_version"))))
    return found


def keyed_as_begun(images: list[ArchiveImage], inputs: Sequence[Path], roots: set[str],
                   results: Path) -> list[ArchiveImage]:
    """This run's images keyed as the results at ``results`` were begun: ``roots``, the folders their lines' keys
    are relative to (:func:`begun_roots`). A run resumed with part of its inputs (``archive/a`` where the cron
    line gave ``archive/a archive/b``) has another common folder, so other keys: every image was scored again and
    written a second time under its new key. Where this run's images all lie under the file's folder they take
    their keys from it; where that folder lies inside this run's (the earlier run was given less) the run is
    refused, since its lines could not be told from this run's images. A file begun elsewhere (another mount, another
    working directory: no folder of its lines is there) keeps this run's keys, which do not depend on the mount."""
    from .images import path_text

    begun = {os.path.abspath(r) for r in roots if os.path.isdir(r)}
    here = os.path.abspath(listing_root(inputs))
    if len(begun) != 1 or here in begun:
        return images
    root = begun.pop()
    if all(_under(os.path.abspath(im.path), root) for im in images):
        return [ArchiveImage(path_text(Path(os.path.relpath(os.path.abspath(im.path), root)).as_posix()), im.path)
                for im in images]
    if _under(root, here):
        raise ConfigError(f"{results} was begun on {root}, inside this run's {here}: its images would be scored again "
                          f"under other keys (a key is a path relative to the inputs' common folder); give the inputs "
                          f"that run was given, or another --output")
    return images


def results_path(output: Path, shard: Shard) -> Path:
    """``--output``: a ``.jsonl`` file as given, otherwise a directory holding one file per shard."""
    return output if output.suffix == ".jsonl" else output / shard.file_name


SHARDS_LOCK = ".anomaly-shards.lock"  # in an --output directory: runs of different shard counts take turns on it
_FILE_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.jsonl")


@contextlib.contextmanager
def counts_in_turn(output_dir: Path, family: str, count: int, waiting: Callable[[], None] | None = None,
                   poll_s: float = 1.0) -> Iterator[None]:
    """Hold ``output_dir`` for shards of ``count`` of ``family`` (a model version's re-scoring) for the block:
    shards of that count write there at once, each its own file, while a run of another count waits until they
    have ended (``waiting`` says so once). Their files are apart (``shard-1-of-2.jsonl``, ``shard-1-of-3.jsonl``)
    and their images overlap: both wrote the shared ones. Unguarded where the lock file cannot be made or locked."""
    from .dir_lock import count_turn

    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        f = open(output_dir / SHARDS_LOCK, "a+")  # noqa: SIM115 - the lock is the open file
    except OSError as exc:  # another user's (a run under sudo made it): as where locks fail, but said
        log.warning("%s: cannot open %s (%s): runs of another shard count into it are not kept apart and may score "
                    "the same images at once; let every user that runs shards write it (or delete it while none runs)",
                    output_dir, SHARDS_LOCK, exc.strerror or exc)
        yield
        return
    region = fixed_hash(family) >> 8  # the hash's first seven bytes, as the releases before took them
    with f:
        in_turns(count_turn(f, region, count), waiting, poll_s)
        yield


def shard_files(output_dir: Path) -> list[Path]:
    """The results files of every shard in ``output_dir`` (:attr:`Shard.file_name`'s), in order."""
    return sorted(output_dir.glob("shard-*-of-*.jsonl"))


def done_by_other_counts(output_dir: Path, shard: Shard, model: str, names: Sequence[str]) -> dict[str, str | None]:
    """The keys of ``shard`` that results files of another shard count in ``output_dir`` hold for this model
    version (``names``: its names), each with the record id its line names: a run resumed with another N than
    the directory's files were begun with skips them, so the directory holds each image once. Read while no run
    of that count writes (:func:`counts_in_turn`); lines of other versions and a last line cut short are not
    results of this run's."""
    done: dict[str, str | None] = {}
    for path in shard_files(output_dir):
        m = _FILE_NAME.fullmatch(path.name)
        if m is None or int(m.group(2)) == shard.count:
            continue
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    continue
                if (isinstance(row, dict) and _readable_key(row.get("key")) and row.get("model") == model
                        and row.get("model_version") in names and shard.owns(row["key"])):
                    record = row.get("inspection_id")
                    done[row["key"]] = record if isinstance(record, str) else None
    return done


def _readable_key(key: Any) -> bool:
    """Whether a line's ``key`` is one an archive's listing can have made: text that UTF-8 holds. A lone surrogate
    (``"\\ud800"``, valid JSON) cannot be hashed into a shard, and another count's file holding one stopped the run
    with a traceback."""
    if not isinstance(key, str):
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# how every results line begins (result_row's first key, as json.dumps writes it): a last line cut short by a kill is
# a start of it, or begins with it
LINE_START = b'{"key": '


class ResultsWriteError(AnomalyError, OSError):
    """The results file took no more lines (a full disk, a volume gone): the run stops, the file kept whole."""


class ResultsFile:
    """One shard's results, one JSON object per line, each flushed as it is written.

    :meth:`open` reads back what an earlier run of the shard wrote: a last line without its newline is a write the
    kill interrupted and is cut off; every complete line must be a result of the same model version (results of
    two models in one file would read as one run). ``earlier``: other names of that version, which lines an earlier
    release wrote may carry (artifact.recorded_names)."""

    def __init__(self, path: Path, model: str, model_version: str, earlier: Sequence[str] = ()):
        self.path = Path(path)
        self.model, self.model_version = model, model_version
        self.names = {model_version, *earlier}
        self.dropped_partial = 0  # bytes of a partial last line cut off by open()
        self._file: IO[bytes] | None = None
        self._end = 0  # where the last whole line ends

    def open(self, waiting: Callable[[], None] | None = None, poll_s: float = 1.0) -> dict[str, str | None]:
        """Prepare to append; returns the keys already in the file, each with the record id its line names. The file
        is held (``flock``) until :meth:`close`: a second run of the shard at once (an overlapping cron line) waits
        for the first and then finds its lines, where it appended every image a second time. ``waiting`` is called
        once when it waits."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # unbuffered: a write the disk refuses is cut back at once, not left in a buffer that close() writes
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:  # a directory named x.jsonl, another user's file: a traceback said it
            raise ConfigError(f"{self.path}: cannot open it to write results ({exc.strerror or exc}): give another "
                              "--output") from None

        def take() -> bool:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                pass  # a file system without locks (some network shares): written as before, unguarded
            return True

        in_turns(take, waiting, poll_s)
        done: dict[str, str | None] = {}
        if self.path.stat().st_size:
            good_end = 0
            with open(self.path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        if not (line.startswith(LINE_START) or LINE_START.startswith(line)):
                            # another tool's file given as --output (a JSON written without its last newline): its
                            # last line, or all of it, was cut off as a killed run's
                            raise ConfigError(f"{self.path}:{number} is not a result line, nor the start of one a "
                                              f"stopped run cut short; was this file written by `anomaly score "
                                              f"--output`? It is left as it is: give another --output")
                        self.dropped_partial = len(line)
                        break
                    key, record = self._key_of(line, number)
                    done[key] = record
                    good_end += len(line)
            if self.dropped_partial:
                os.truncate(self.path, good_end)
            self._end = good_end
        return done

    def _key_of(self, line: bytes, number: int) -> tuple[str, str | None]:
        try:
            row = json.loads(line)
            key = row["key"]
            if isinstance(row.get("model_version"), (list, dict)):  # unhashable: it stopped the run with a TypeError
                raise TypeError("a model version that is no name")
        except (ValueError, TypeError, KeyError):
            raise ConfigError(f"{self.path}:{number} is not a result line; was this file written by "
                              f"`anomaly score --output`?") from None
        if row.get("model") != self.model or row.get("model_version") not in self.names:
            raise ConfigError(f"{self.path} holds results of model {row.get('model')} version "
                              f"{row.get('model_version')}, not of {self.model} version {self.model_version}: "
                              f"give another --output to keep both")
        record = row.get("inspection_id")
        return str(key), record if isinstance(record, str) else None

    def write(self, row: dict[str, Any]) -> None:
        """Append one line, written through at once: a kill loses at most this line, which the next open() cuts
        off. A line the file system refuses part way (a full disk) is cut off here, so the file stays whole lines
        and a resume after room is made needs no repair."""
        assert self._file is not None, "open() first"
        line = (json.dumps(row) + "\n").encode("utf-8")
        left = memoryview(line)
        try:
            while left:
                left = left[self._file.write(left) or 0:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._end)
            raise ResultsWriteError(f"{self.path}: cannot write results ({exc.strerror or exc}); the lines "
                                    f"before stand: make room and run the shard again, it resumes") from None
        self._end += len(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
