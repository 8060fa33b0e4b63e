"""Work on storage that may never answer: each model's file work on a thread of its own, waited for within a bound.

Why: a model directory on a network share that stops answering blocks ``open()`` and ``read()`` for as long as it
is gone, and a Python thread cannot be cut short. Whoever waited on such a read (the start-up loading, the
directory watcher, a reload asked for over HTTP, a shutdown) waited with it, for ever. Here the read runs on a
daemon thread of its own that holds no lock anyone else takes; the caller waits for it up to the bound, and past it
the work is *stuck*: the caller goes on without it (:class:`StorageStuck` says which and since when), and nobody
else waits on it again: work on the same key meanwhile is refused at once. If the storage answers again the work
ends as it would have, and its key is free. The model directory's own listing is such work too, under
:data:`LISTING`: on a share whose ``stat`` and listing hang as well, looking for the models held whoever looked.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


# the key of the model directory's own listing (and its look for what saves left): no model's name has a slash
LISTING = "/"


def wall_text(when: float) -> str:
    """A wall-clock time as the answers write it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class StorageStuck(Exception):
    """Work on ``key``'s files has not ended within its bound: its storage does not answer."""

    def __init__(self, key: str, what: str, since: float, waited: float):
        self.key, self.what, self.since, self.waited = key, what, since, waited
        self.first = False  # the first caller told of it (its log line is said then)
        subject = ("the model directory is stuck: it has" if key == LISTING
                   else f"model {key!r} is stuck: its files have")
        super().__init__(f"{subject} not answered since {wall_text(since)} ({waited:.0f} s, {what}); a network share "
                         "that hangs?")

    @property
    def outlook(self) -> str:
        """What happens next, for an answer that says it is stuck."""
        if self.key == LISTING:
            return "the loaded models keep serving, and it is read again once it answers"
        return "it is served once they answer"


@dataclass
class _Work:
    what: str
    started: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.time)  # the wall clock at its start, for people
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    said: bool = False  # its stuck line was logged


class StorageWork:
    """At most one piece of file work per key (a model's name) at a time, each on a daemon thread of its own."""

    def __init__(self, bound: float, late: Callable[[str, Any, BaseException | None], None] | None = None):
        self.bound = bound  # seconds a caller waits for work before it is stuck
        self._late = late  # told of stuck work that ended after all (key, result, error): nobody waited for it
        self._lock = threading.Lock()
        self._running: dict[str, _Work] = {}

    def run(self, key: str, what: str, fn: Callable[[], Any], then: Callable[[], None] | None = None) -> Any:
        """``fn()``'s result (or its exception), run on a thread of its own. StorageStuck when work on ``key``
        (this or earlier work still running) has run longer than the bound: nothing waits on it any longer. Work
        on ``key`` already under way and within its bound is waited for first (the model's files are read one way
        at a time, as one lock did before). ``then()`` is called once when ``fn`` ends, however late, or at once
        when it never starts: a lock the caller took for the work is held as long as the work runs, not only as
        long as the caller waits for it."""
        deadline = time.monotonic() + self.bound
        try:
            while True:
                with self._lock:
                    busy = self._running.get(key)
                    if busy is None:
                        work = _Work(what)
                        self._running[key] = work
                        break
                if not busy.done.wait(max(0.0, min(deadline, busy.started + self.bound) - time.monotonic())):
                    raise self._stuck(key, busy)
            thread = threading.Thread(target=self._do, args=(key, work, fn, then), name=f"files-{key}"[:60],
                                      daemon=True)
            try:
                thread.start()
            except BaseException:  # no thread to be had: the work never starts, and its key is free again
                with self._lock:
                    del self._running[key]
                work.done.set()
                raise
        except BaseException:
            if then is not None:
                then()
            raise
        if not work.done.wait(self.bound):
            raise self._stuck(key, work)
        if work.error is not None:
            raise work.error
        return work.result

    def _stuck(self, key: str, work: _Work) -> StorageStuck:
        exc = StorageStuck(key, work.what, work.since, time.monotonic() - work.started)
        with self._lock:
            first, work.said = not work.said, True
        exc.first = first
        if first:  # once per stuck piece of work: every re-scan meets it again
            log.error("%s: the service goes on without it", exc)
        return exc

    def _do(self, key: str, work: _Work, fn: Callable[[], Any], then: Callable[[], None] | None) -> None:
        try:
            work.result = fn()
        except BaseException as exc:  # handed to the caller, or said below when nobody waits any more
            work.error = exc
        finally:
            if then is not None:
                then()  # before ``done``: a caller that waited the work out finds its lock given back
            with self._lock:
                if self._running.get(key) is work:
                    del self._running[key]
                said = work.said
            work.done.set()
        if said:
            log.warning("%s answered again after %.0f s (%s)%s",
                        "the model directory" if key == LISTING else f"model {key!r}: its files",
                        time.monotonic() - work.started, work.what, f": {work.error}" if work.error is not None else "")
            if self._late is not None:
                self._late(key, work.result, work.error)

    def stuck(self) -> dict[str, StorageStuck]:
        """The keys whose work has run past the bound, with since when."""
        now = time.monotonic()
        with self._lock:
            return {key: StorageStuck(key, w.what, w.since, now - w.started) for key, w in self._running.items()
                    if now - w.started > self.bound}
