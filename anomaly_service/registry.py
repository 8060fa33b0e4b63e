"""The models a service holds: every valid artifact under one directory, reloadable with no downtime.

A re-fitted model is written atomically by ``AnomalyModel.save`` (a new directory renamed into place), so the
registry notices it by its files' state, loads the new model in the background and swaps one reference. Requests
that already hold the old entry finish on it; new requests get the new one. A model that stops loading (a bad
manifest, a truncated file) keeps serving its last good version and is listed with its error, and one broken
model never keeps the others from loading. Each model's files are read on a thread of their own, waited for within
``load_timeout`` (stuck_io.py): a model whose storage hangs is listed as stuck, and the others load and serve. So is
the directory's listing: a share whose ``stat`` hangs as well holds no re-scan, no request and no stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from . import model_history
from .artifact import (DEFAULT_KEEP_VERSIONS, MANIFEST_MAX_BYTES, fingerprint, leftover_names, leftovers, list_versions,
                       model_lock, model_version_id, recover_model, swap_lock, version_id, wait_for_save)
from .artifact import rollback as rollback_artifact
from .errors import AnomalyError, ConfigError, ModelFormatError, UpdateUnavailableError, VersionConflictError
from .manifest import MANIFEST, PLAIN_NAME_RULE, plain_name
from .images import DEFAULT_LIMITS, ImageLimits, path_text
from .model import AnomalyModel
from .stuck_io import LISTING, StorageStuck, StorageWork

log = logging.getLogger(__name__)


def valid_name(name: str) -> bool:
    """Model names are single path components (:func:`~anomaly_service.manifest.plain_name`)."""
    return plain_name(name)


def _fingerprint(path: Path) -> str | None:
    """The model's version (artifact.fingerprint), or None when there is no manifest to read."""
    try:
        return fingerprint(path)
    except OSError:
        return None


def _disk_state(path: Path) -> str | None:
    """What the watcher compares: the manifest's bytes and every file's size and modification time, so a
    truncated or replaced data file is noticed as well as a new manifest. Of a manifest larger than any model's
    (which the load refuses) no more is read than the load reads, with its size: every re-scan read all of it. It
    is read a piece at a time: the start-up looks at many models at once, and a huge one would be held whole."""
    h = hashlib.sha256()
    try:
        with open(path / MANIFEST, "rb") as fh:
            left = MANIFEST_MAX_BYTES + 1
            while left > 0 and (piece := fh.read(min(left, 1 << 20))):
                h.update(piece)
                left -= len(piece)
        for f in sorted(path.iterdir()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    except OSError:
        return None
    return h.hexdigest()


def _serving(current: ModelEntry | None) -> str:
    """What keeps serving when a model's new files do not load, for the log line that says so."""
    return f"version {current.version_id} keeps serving" if current is not None else "no version of it is served"


def _settled(path: Path) -> tuple[str | None, str | None]:
    """(fingerprint, disk state) of the model at ``path``. Where there is none to read, a save may stand between
    its two renames (the model set aside, the new one not yet in place): that save is waited for
    (artifact.swap_lock) and the model read again, so a re-fit is not taken for a missing model."""
    version, state = _fingerprint(path), _disk_state(path)
    if version is None or state is None:
        with swap_lock(path):
            version, state = _fingerprint(path), _disk_state(path)
    return version, state


# start-up loads under way at once. Each holds a model's arrays while it reads them, and the first of a backbone
# builds it; on a small edge box (two cores, little memory) every model of a large plant loading at once would take
# the memory and the cores the first parts need. A load that has not ended within the bound gives its place to the
# next one (it goes on, on its own thread): hung storage holds the loads behind it back one bound, not one each.
LOAD_SLOTS = 2
# looks at the directory's entries and settlings of what saves left under way at once: each a few stat and rename
# calls, no memory to speak of, so many at once; enough that a share with several models that hang holds the start
# and each re-scan one bound, not one per model
LOOK_SLOTS = 16


@dataclass
class _Done:
    """What one piece of a model's file work gave (:meth:`ModelRegistry._each`): its result, or what it raised."""

    result: Any = None
    error: Exception | None = None


# reads one load makes of a model whose files saves keep swapping while they are read; past them the last read
# stands (saves back to back are no steady state, but a rescan must end all the same)
LOAD_TRIES = 3


@dataclass
class ModelEntry:
    name: str
    path: Path
    model: AnomalyModel
    version: str  # manifest fingerprint: changes with every re-fit
    state: str = ""  # files on disk when it was loaded (see _disk_state)
    loaded_at: float = field(default_factory=time.time)
    # which load this is: every (re)load gets a larger one, so an update rolled back to the same version is still
    # a new serving (the drift window keys on it, not on the version)
    serial: int = 0
    # the load whose drift window this one goes on with: its own serial, or, when it reads the very version the
    # load it replaced served (a file touched or copied again, a reload asked for), that load's: the same model
    # judged by the same reference, so an alarm on a line still drifted must not go quiet
    drift_window: int = 0
    replaced: bool = False  # it took a loaded version's place: a load that ends late is counted as a reload

    @cached_property
    def version_id(self) -> str:
        """The version's id, ``<created at>-<first 12 of the digest>``: what `anomaly versions`, the versions route
        and the change log name it, and so what answers, records and log lines say (one name a person can match)."""
        m = self.model.manifest_
        assert m is not None  # a registry holds loaded models only
        return version_id(m.created_at, self.version)

    def summary(self) -> dict[str, Any]:
        m = self.model.manifest_
        assert m is not None  # a registry holds loaded models only
        return {
            "name": self.name,
            "version": self.version_id,
            "created_at": m.created_at,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "backbone": m.backbone.name,
            "image_size": self.model.config.image_size,
            "bank_size": m.coreset.size,
            "feature_dim": m.index.dim,
            "index": m.index.kind,
            "threshold": m.calibration.threshold,
            "training_images": m.training.n_images,
            "calibration_images": m.training.n_calibration_images,
            "device": str(self.model.device),
            # what actually runs: auto settings resolve per machine, and a failed ONNX export falls back to torch
            "runtime": self.model.runtime,
            "knn_search": self.model.knn_search,
        }

    def manifest(self) -> dict[str, Any]:
        """The model's full manifest as JSON (configuration, calibration, training provenance)."""
        assert self.model.manifest_ is not None
        return self.model.manifest_.to_dict()


def _some(names: list[str], shown: int = 20) -> str:
    """The loaded models for an error's text: a plant serving hundreds of variants got every name in each 404."""
    if not names:
        return "none"
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more: GET /models lists them" if more > 0 else "")


class ModelRegistry:
    """Thread-safe map of model name -> loaded model, fed from ``model_dir``."""

    def __init__(self, model_dir: Path, *, device: str = "auto", weights: Path | None = None,
                 limits: ImageLimits = DEFAULT_LIMITS, default: str | None = None, knn_precision: str = "auto",
                 runtime: str = "auto", load_timeout: float = 60.0):
        self.model_dir = Path(model_dir)
        self.knn_precision = knn_precision
        self.runtime = runtime
        self.device = device
        self.weights = weights
        self.limits = limits
        self.default = default
        self._entries: dict[str, ModelEntry] = {}
        self._errors: dict[str, str] = {}
        # directories that cannot be models (names, links): found by the first loading, not here, where a model
        # directory that does not answer would hold the service's start before its port opens
        self._problems: dict[str, str] = {}
        self._failed_state: dict[str, str] = {}  # a broken artifact is not retried until it changes on disk
        self._missing: set[str] = set()
        self._dir_gone = False  # the model directory was not there at the last re-scan (logged once)
        self._lock = threading.Lock()  # the maps above
        # each model's file work (recovery, reads, loads) on a thread of its own, one at a time per model, waited for
        # within the bound: a model on storage that hangs holds no lock another model or a request needs
        self._files = StorageWork(load_timeout, late=self._ended_late)
        self._late: dict[str, str] = {}  # loads that ended after they were found stuck, for the next re-scan to report
        self._refresh_lock = threading.Lock()  # one scan-and-reload at a time
        self._write_locks: dict[str, threading.Lock] = {}  # one update or rollback per model at a time
        self._serials = itertools.count(1)  # ModelEntry.serial, drawn under _lock

    # ---------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def errors(self) -> dict[str, str]:
        """Models on disk that are not served (or not at their newest version), with the reason, no paths; stuck
        ones (their files do not answer) too."""
        stuck = {name: str(exc) for name, exc in self.stuck().items()}
        with self._lock:
            return {**self._problems, **self._errors, **stuck}

    def stuck(self) -> dict[str, StorageStuck]:
        """Models whose files have not answered within the bound, with since when (StorageStuck)."""
        return {key: exc for key, exc in self._files.stuck().items() if key != LISTING}

    def listing_stuck(self) -> StorageStuck | None:
        """The model directory's listing, when it has not answered within the bound (its models are not looked
        for, and the loaded ones keep serving); None when it answers."""
        return self._files.stuck().get(LISTING)

    def get(self, name: str | None) -> ModelEntry:
        """The entry for ``name``; with no name (None, or empty as a bare ``?model=`` sends it), the default model
        or the only one loaded. StorageStuck for a model not served whose files do not answer (stuck_io.py)."""
        with self._lock:
            if not name:
                name = self.default
                if name is None:
                    if len(self._entries) == 1:
                        return next(iter(self._entries.values()))
                    raise LookupError("several models are loaded; name one with ?model=" if self._entries
                                      else "no model is loaded")
            if not valid_name(name):
                raise LookupError(f"invalid model name {name!r}")
            entry = self._entries.get(name)
            if entry is not None:
                return entry
        stuck = self.stuck().get(name)
        if stuck is not None:  # it is there, and is served once its files answer: not an unknown model
            raise stuck
        with self._lock:
            why = self._problems.get(name) or self._errors.get(name)  # on disk, but it did not load: say why
            raise LookupError(f"model {name!r} is not loaded" + (f": {why}" if why else "")
                              + f" (loaded: {_some(sorted(self._entries))})") from None

    # ---------------------------------------------------------------- loading
    def _each(self, keys: list[str], what: str, fn: Callable[[str], Any], slots: int,
              stop: threading.Event | None = None) -> dict[str, _Done]:
        """``fn(key)`` as each key's file work (within the bound, stuck_io.StorageWork), up to ``slots`` keys at once:
        work that hangs gives its place up once it is past the bound, so hung storage holds the keys behind it back
        one bound, not one each, as waiting on them one after another did. By key, in ``keys``' order; a key not
        started because ``stop`` was set is left out."""
        done: dict[str, _Done] = {}

        def one(key: str) -> None:
            if stop is not None and stop.is_set():
                return
            try:
                done[key] = _Done(result=self._files.run(key, what, lambda: fn(key)))
            except Exception as exc:  # StorageStuck, a model that does not load: the caller's to say
                done[key] = _Done(error=exc)

        todo, taking = iter(keys), threading.Lock()

        def worker() -> None:
            while True:
                with taking:
                    key = next(todo, None)
                if key is None:
                    return
                one(key)

        # daemon threads, not a pool's: a stop leaves them waiting out the bound of the work in hand, and a pool's
        # threads are joined at the interpreter's exit, which would wait for that too
        waiters = [threading.Thread(target=worker, name="files-wait", daemon=True)
                   for _ in range(min(slots, len(keys)) - 1)]
        for waiter in waiters:
            waiter.start()
        worker()  # the caller waits on one place itself
        for waiter in waiters:
            waiter.join()
        return {key: done[key] for key in keys if key in done}

    def _listed(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, a look at the model directory itself, within the bound (StorageStuck past it, said once)."""
        return self._files.run(LISTING, what, fn)

    def _listing(self) -> list[str] | None:
        """The model directory's entries (no look at any of them), or None when it is not there."""
        return sorted(os.listdir(self.model_dir)) if self.model_dir.is_dir() else None

    def _look(self, entry: str) -> str | None:
        """Whether the directory entry ``entry`` is a model (on its own thread): None when it is not, "" when it
        is, else why it cannot be served."""
        p = self.model_dir / entry
        if not (p / MANIFEST).is_file():
            return None  # not a model at all
        if not valid_name(entry):  # listed as text JSON can carry: a name in another code page broke /readyz
            return f"not a valid model name: use {PLAIN_NAME_RULE}"
        if p.resolve().parent != self.model_dir.resolve():
            return "links outside the model directory; copy the model in instead"
        return ""

    def _scan(self) -> tuple[list[str], dict[str, str], set[str]] | None:
        """Model directories to load, the ones that cannot be, with why (shown in /models and /readyz), and the ones
        found stuck now; None when the model directory is not there. The listing and each entry's look run within
        the bound, on threads of their own: StorageStuck when the listing does not answer. An entry whose look does
        not answer counts as a model (it is listed, its files hang): a loaded one keeps serving."""
        entries = self._listed("listing it", self._listing)
        if entries is None:
            return None
        names, problems, stuck = [], {}, set()
        looked = self._each([e for e in entries if not e.startswith(".")],  # hidden: our own temporary copies
                            "looking at it", self._look, LOOK_SLOTS)
        for entry, done in looked.items():
            if isinstance(done.error, StorageStuck):
                if valid_name(entry):
                    names.append(entry)
                    if done.error.first:
                        stuck.add(entry)
                continue
            if done.error is not None:
                raise done.error
            why = done.result
            if why == "":
                names.append(entry)
            elif why is not None:
                problems[path_text(entry) if not valid_name(entry) else entry] = why
        return names, problems, stuck

    def candidates(self) -> list[str]:
        """The models under the directory now; none when it does not answer within the bound."""
        try:
            found = self._scan()
        except StorageStuck:
            return []
        return [] if found is None else found[0]

    def _reason(self, exc: BaseException) -> str:
        """An error for /models and /readyz: the reason, with no server paths in it."""
        text = str(exc)
        # the longer first: a relative model dir is also the tail of its resolved path
        for root in sorted({str(self.model_dir.resolve()), str(self.model_dir)}, key=len, reverse=True):
            text = text.replace(root + "/", "")
        return text

    def _record(self, name: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[name] = self._reason(exc)

    def load(self, name: str) -> ModelEntry:
        """(Re)load one model from disk; the previous entry keeps serving until the new one is ready. Its files are
        read on a thread of their own: StorageStuck when they do not answer within the bound (the load goes on, and
        the model is served if they ever do)."""
        if not valid_name(name):
            raise ConfigError(f"invalid model name {name!r}")
        return self._files.run(name, "loading it", lambda: self._load(name))

    def _load(self, name: str) -> ModelEntry:
        """:meth:`load` on the model's own thread (one at a time per model: stuck_io.StorageWork)."""
        path = self.model_dir / name
        if path.resolve().parent != self.model_dir.resolve():
            exc = ConfigError(f"model {name!r} links outside the model directory")
            self._record(name, exc)
            raise exc
        for attempt in range(1, LOAD_TRIES + 1):
            version, state = _settled(path)
            if version is None or state is None:
                raise ConfigError(f"no model named {name!r} under the model directory")
            try:
                model = AnomalyModel.load(path.resolve(), weights=self.weights, device=self.device,
                                          limits=self.limits, knn_precision=self.knn_precision,
                                          runtime=self.runtime)
            except AnomalyError as exc:
                if attempt < LOAD_TRIES and _disk_state(path) != state:
                    continue  # a save swapped the files while they were read (half of each): read the new one
                self._record(name, exc)
                raise
            except Exception as exc:  # a bug or an environment failure: that model only, never the service
                log.exception("model %s failed to load", name)
                self._record(name, exc)
                raise ModelFormatError(f"model {name!r} failed to load: {self._reason(exc)}") from exc
            if attempt == LOAD_TRIES or _disk_state(path) == state:
                break  # else swapped while it was read: which version it holds is not known, so load again
        with self._lock:
            # the version is the one the load read: the fingerprint read before it may be of a version a save
            # replaced before the load began (every answer and record named that one, with this one's threshold)
            previous = self._entries.get(name)
            serial = next(self._serials)
            read = model.manifest_sha256_ or version
            window = previous.drift_window if previous is not None and previous.version == read else serial
            entry = ModelEntry(name=name, path=path.resolve(), model=model, version=read, state=state,
                               serial=serial, drift_window=window, replaced=previous is not None)
            self._entries[name] = entry
            self._errors.pop(name, None)
        log.info("model %s loaded (version %s)", name, entry.version_id)
        return entry

    def _ended_late(self, name: str, result: Any, error: BaseException | None) -> None:
        """A model's stuck work ended after all (its files answered): a load that ended in a served model is told
        to the next re-scan as ``loaded`` or ``reloaded`` (which warms and counts it, as one it made)."""
        if isinstance(result, ModelEntry):
            what: str | None = "reloaded" if result.replaced else "loaded"
        else:
            what = result if result in ("loaded", "reloaded") else None
        if what is not None:
            with self._lock:
                self._late[name] = what

    def reload(self, name: str) -> ModelEntry:
        """:meth:`load` asked for (``POST /models/{name}/reload``): a failure is logged as a re-scan's is, naming
        the version that keeps serving, since the model's files on disk are at fault, not the client."""
        with self._lock:
            current = self._entries.get(name)
        try:
            return self.load(name)
        except AnomalyError as exc:
            log.error("model %s not reloaded on request, %s: %s", name, _serving(current), self._reason(exc))
            raise

    def _recover_leftovers(self, changes: dict[str, str]) -> bool:
        """Settle what saves that died left beside each model (artifact.recover_model), each model on its own
        thread within the bound: a model whose lock or copies do not answer is stuck, the others go on. False when
        the model directory is not there; StorageStuck when its listing does not answer."""
        names = self._listed("looking for what saves left", lambda: leftover_names(self.model_dir)
                             if self.model_dir.is_dir() else None)
        if names is None:
            return False
        settled = self._each(list(names), "settling what a save left", lambda n: recover_model(self.model_dir, n),
                             LOOK_SLOTS)
        for name, done in settled.items():
            if isinstance(done.error, StorageStuck):
                if done.error.first:
                    changes[name] = "stuck"
            elif done.error is not None:
                raise done.error
            elif done.result:
                log.warning("model %s: a save had died mid-swap; its previous version was put back", name)
                changes[name] = "recovered"
        return True

    def _survey(self, changes: dict[str, str]) -> tuple[list[str], dict[str, str]] | None:
        """What a start-up and a re-scan both look at first: what saves left settled, then the directory scanned.
        The models and the entries that cannot be (with why), the models found stuck said in ``changes``; None when
        the directory is not there; StorageStuck when its listing does not answer."""
        found = self._scan() if self._recover_leftovers(changes) else None
        if found is None:
            return None
        names, problems, stuck = found
        changes.update(dict.fromkeys(stuck, "stuck"))
        return names, problems

    def load_all(self, stop: threading.Event | None = None) -> dict[str, str]:
        """Load every model under the directory (at start-up). Returns ``{name: what happened}`` as
        :meth:`refresh` does (``loaded``, ``stuck`` or ``failed: why``), so start-up loads are counted like
        reloads. Once ``stop`` is set (the service stops while it loads), no further model is loaded. A model whose
        files do not answer within the bound is left loading on its own thread (served if they ever answer), and the
        next one takes its place: loads run :data:`LOAD_SLOTS` at a time, so models whose storage hangs hold the
        others back one bound, not one each."""
        changes: dict[str, str] = {}
        with self._refresh_lock:
            try:
                found = self._survey(changes)
            except StorageStuck:  # said once (stuck_io); the watcher loads the models once the directory answers
                return changes
            if found is None:
                return changes
            names, problems = found
            with self._lock:
                self._problems = problems
            # each model's files looked at first, many at once: storage that hangs does so at the first look (a
            # share's stat hangs as its reads do), so the loads' few places go to models that answer
            states = self._each(names, "looking at its files", lambda n: _disk_state(self.model_dir / n), LOOK_SLOTS,
                                stop)
            loaded = self._each(names, "loading it at start-up",
                                lambda n: self._first_load(n, states[n].result if n in states else None),
                                LOAD_SLOTS, stop)
            for name, done in loaded.items():
                if done.error is None:
                    changes[name] = "loaded"
                elif isinstance(done.error, StorageStuck):
                    changes[name] = "stuck"
                elif isinstance(done.error, AnomalyError):
                    changes[name] = f"failed: {self._reason(done.error)}"
                    log.error("model %s not loaded: %s", name, self._reason(done.error))
                else:
                    raise done.error
        return changes

    def _first_load(self, name: str, state: str | None) -> ModelEntry:
        """The start-up load of one model (on its own thread); ``state``: its files' before the load."""
        # the state before the load, as refresh takes it: a save that swaps a good version in during a failed load
        # must not be recorded as that failure, or it is never retried
        try:
            return self._load(name)
        except AnomalyError:
            self._failed_state[name] = state or ""
            raise

    def refresh(self) -> dict[str, str]:
        """Load new models, reload changed ones, drop deleted ones. Returns ``{name: what happened}``.

        One refresh at a time (the watcher and ``POST /models/reload`` may ask at once). A model whose files
        changed into something that does not load keeps serving its previous version, with the error listed; one
        whose files do not answer within the bound (``stuck``, said once) keeps serving it too.
        """
        with self._refresh_lock:
            changes: dict[str, str] = {}
            with self._lock:
                changes.update(self._late)
                self._late.clear()
            try:
                found = self._survey(changes)
            except StorageStuck:
                # a listing that does not answer (a share whose stat hangs) says nothing about the models either:
                # the loaded ones keep serving, and the next re-scans meet it without waiting (said once, stuck_io)
                return changes
            if found is None:
                # an unmounted or unreachable volume says nothing about the models, which are whole in memory:
                # unloading them stopped the line until it was back. A model deleted from a listed directory goes.
                if not self._dir_gone:
                    log.warning("model directory %s is not there (an unmounted volume?): the %d loaded model(s) keep "
                                "serving until it is back", self.model_dir, len(self.names()))
                self._dir_gone = True
                return changes
            self._dir_gone = False
            names, problems = found
            for name in names:
                # An update or rollback of this model here loads the version it writes: a re-scan between its save
                # and that load loaded the version again and counted the change twice. It is left to the change
                # (the next re-scan finds it loaded); held here, no change can save during the check and load.
                # The turn is given back when the work ends, not when this re-scan stops waiting for it: a stuck
                # load that goes on could otherwise finish under an update that saved meanwhile.
                writing = self._write_lock(name)
                if not writing.acquire(blocking=False):
                    continue
                try:
                    what = self._files.run(name, "reading it again", lambda n=name: self._refresh_one(n),
                                           then=writing.release)
                except StorageStuck as exc:
                    what = "stuck" if exc.first else None
                if what is not None:
                    changes[name] = what
            with self._lock:
                absent = set(self._entries) - set(names)
            # a model the listing missed may be between a save's renames: that save is waited for (outside the
            # registry's lock, which every request takes) and the model looked for again; one whose files do not
            # answer says nothing of whether it is there, and keeps serving
            back = {name for name in absent if self._still_there(name, changes)}
            # whether a save may be under way, looked at here (within the bound, outside the registry's lock that
            # every request takes): on a share whose stat hangs, that look held every request for ever
            saving = {name: self._saving(name) for name in absent - back}
            with self._lock:
                # A re-save by a writer that takes no swap lock (an older release, a copy by hand) can leave a model
                # absent for an instant: where a save may be under way, drop it only when it is missing on two
                # consecutive checks; a model deleted outright goes at once (POST /models/reload says it did).
                on_disk = set(names) | back
                for name in set(self._entries) - on_disk:
                    if name in self._missing or not saving.get(name, True):
                        del self._entries[name]
                        self._missing.discard(name)
                        changes[name] = "removed"
                    else:
                        self._missing.add(name)
                self._missing &= set(self._entries)
                self._missing -= on_disk
                self._problems = problems
                for name in set(self._errors) - on_disk - set(self._entries):
                    del self._errors[name]  # gone from disk: its old error no longer applies
            return changes

    def _still_there(self, name: str, changes: dict[str, str]) -> bool:
        """Whether a loaded model the listing missed is on disk after all (a save between its renames, waited for);
        True where its files do not answer (stuck: said in ``changes`` the first time)."""
        try:
            return self._files.run(name, "looking for it", lambda: _settled(self.model_dir / name)[0]) is not None
        except StorageStuck as exc:
            if exc.first:
                changes[name] = "stuck"
            return True

    def _refresh_one(self, name: str) -> str | None:
        """One model's part of a re-scan (on its own thread): ``loaded``, ``reloaded``, ``failed: why``, or None when
        there is nothing to do."""
        with self._lock:
            current = self._entries.get(name)
        state = _disk_state(self.model_dir / name)
        if current is not None and current.state == state:
            with self._lock:  # back to what is loaded (e.g. a bad manifest was restored)
                self._errors.pop(name, None)
            self._failed_state.pop(name, None)
            return None
        if state is not None and state == self._failed_state.get(name):
            return None  # a broken artifact is not retried until it changes on disk
        try:
            self._load(name)
        except AnomalyError as exc:
            self._failed_state[name] = state or ""
            log.error("model %s not reloaded, %s: %s", name, _serving(current), self._reason(exc))
            return f"failed: {self._reason(exc)}"
        self._failed_state.pop(name, None)
        return "reloaded" if current is not None else "loaded"

    def _saving(self, name: str) -> bool:
        """:meth:`_may_be_saving` on the model's thread, within the bound: True when it does not answer (a model
        whose files hang says nothing of whether it is there, and keeps serving)."""
        try:
            return bool(self._files.run(name, "looking for a save", lambda: self._may_be_saving(name)))
        except StorageStuck:
            return True

    def _may_be_saving(self, name: str) -> bool:
        """Whether model ``name``, absent from the last scan, may be between the two renames of a save
        (artifact._swap_in keeps its temporary copy and the previous model beside it until the new one is in
        place), or is back already; or the model directory itself is not there to tell (an unmounted volume)."""
        if not self.model_dir.is_dir() or (self.model_dir / name / MANIFEST).is_file():
            return True
        return any(leftovers(self.model_dir / name, kind) for kind in ("tmp", "old"))

    # ---------------------------------------------------------------- versions: update and rollback
    def _write_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._write_locks.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Model ``name``'s update-or-rollback turn in this process, waited for within the load bound: one whose lock
        file or files hang (a network share) held it for ever, and each request after it waited on it, its thread
        taken from the pool that also reads uploads for scoring. UpdateUnavailableError past the bound."""
        lock = self._write_lock(name)
        if not lock.acquire(timeout=self._files.bound):
            raise UpdateUnavailableError(f"another update or rollback of model {name!r} has not ended within "
                                         f"{self._files.bound:g} s (--load-timeout): it may still be working, or its "
                                         "files do not answer (a network share that hangs?); try again later")
        try:
            yield
        finally:
            lock.release()

    def model_path(self, name: str) -> Path:
        """The directory of model ``name`` on disk (loaded or not). LookupError when there is none."""
        if not valid_name(name):
            raise LookupError(f"invalid model name {name!r}")
        path = self.model_dir / name
        # within the load bound, as every look at a model's files: on a share whose stat hangs the look itself held
        # the request's thread for ever (StorageStuck, 503 model_stuck)
        if not self._files.run(name, "looking for it", lambda: self._on_disk(path)):
            raise LookupError(f"no model named {name!r} under the model directory")
        return path

    def _on_disk(self, path: Path) -> bool:
        """Whether the model at ``path`` is on disk (on its own thread). Between a save's two renames (an update or
        rollback here, by the CLI or by another replica) the model is set aside for an instant: that save is waited
        for, not answered 404 unknown_model."""
        if not (path / MANIFEST).is_file():
            wait_for_save(path)
        return (path / MANIFEST).is_file() and path.resolve().parent == self.model_dir.resolve()

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The model's current and archived versions, newest first (see artifact.list_versions). StorageStuck when
        its files do not answer within the bound."""
        path = self.model_path(name)
        try:  # read within the bound, as a load is: on a share that hangs it held a thread of the shared pool
            return self._files.run(name, "listing its versions", lambda: list_versions(path))
        except ModelFormatError as exc:
            raise ModelFormatError(self._reason(exc)) from None

    def rollback(self, name: str, version: str, keep_versions: int = DEFAULT_KEEP_VERSIONS, *,
                 by: str | None = None, note: str | None = None, replaces: str | None = None) -> ModelEntry:
        """Make an archived version current again and serve it (the replaced one is archived). LookupError: no
        such model or version; AlreadyCurrentError: that version is the one served; ModelFormatError: that version
        does not verify or load; VersionConflictError: ``replaces`` given, and another version is current (checked
        under the write lock). ``by`` and ``note`` go to the model's change log (model_history.py)."""
        path = self.model_path(name)
        # one at a time: in this process, and across every process that shares the model directory
        with self._writing(name), model_lock(path):
            previous = model_history.current_version(path)
            if replaces is not None and previous != replaces:
                raise VersionConflictError(f"model {name!r} changed since: version {previous} serves now, not "
                                           f"{replaces}; nothing was rolled back (GET /models/{name}/versions lists "
                                           "every version)")
            try:
                rollback_artifact(path, version, keep_versions)
            except ModelFormatError as exc:
                raise ModelFormatError(self._reason(exc)) from None
            model_history.record(path, "rollback", model_version_id(path), previous, by=by, note=note, via="api")
            return self.load(name)

    def update(self, name: str, good: list[Any], known_defects: list[Any] = (),  # type: ignore[assignment]
               *, names: list[str] | None = None, defect_names: list[str] | None = None, force: bool = False,
               keep_versions: int = DEFAULT_KEEP_VERSIONS, by: str | None = None,
               note: str | None = None) -> tuple[ModelEntry, dict[str, Any]]:
        """Update the served model with good images (AnomalyModel.update), save it as a new version atomically
        (the previous one archived) and serve it. Requests in flight finish on the previous version. ``by`` and
        ``note`` go to the model's change log."""
        path = self.model_path(name)
        with self._writing(name), model_lock(path):  # as in rollback
            entry = self.get(name)
            if entry.version != _fingerprint(path):  # changed on disk since it was loaded: update what is there
                entry = self.load(name)
            old = entry.model
            new = old.update(good, known_defects, force, names=names, defect_names=defect_names)
            new.save(path, keep_versions=keep_versions)
            assert new.manifest_ is not None and new.manifest_.lineage is not None and old.manifest_ is not None
            assert new.version_id_ is not None
            model_history.record_update(path, new, old.version_id_, names or [], forced=force, by=by, note=note,
                                        via="api")
            fresh = self.load(name)
        return fresh, {
            "model": name,
            "version": new.version_id_,  # set by save
            "previous": old.version_id_,
            "images_added": new.manifest_.lineage.images_added,
            "patches_added": new.manifest_.lineage.patches_added,
            "bank_size": new.manifest_.coreset.size,
            "previous_bank_size": old.manifest_.coreset.size,
            "threshold": new.manifest_.calibration.threshold,
            "previous_threshold": old.manifest_.calibration.threshold,
            "forced": new.manifest_.lineage.forced,
            "defects_passing": list(new.defects_passing_),
            "defects_checked": new.defects_checked_,
            "still_flagged": list(new.still_flagged_),
            "warnings": list(new.update_warnings_),
            "not_added": [f"{n}: {why}" for n, why in new.unlike_],
            "duplicates": [r.to_dict() for r in new.duplicates_],
        }
