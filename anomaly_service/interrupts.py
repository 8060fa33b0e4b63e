"""Ctrl-C and SIGTERM around the steps that must not be cut in two.

A model save's renames and archive, and the change-log line after a new model is in place, hold both signals and
record them; once the block ends they are delivered (the save: the command stops as it would have) or handed to
the caller (the log: the command says which version is in place). Only the main thread receives signals, so
elsewhere (the service's update threads) nothing is held.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stops_held(deliver: bool = False) -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM instead of acting on them until the block ends (the list yielded); then restore
    their handlers and, with ``deliver``, raise each one received so the handler it would have met runs (Ctrl-C's
    KeyboardInterrupt, the CLI's SIGTERM-as-Ctrl-C, the default SIGTERM that ends the process, or an ignored one's
    nothing). A handler set outside Python cannot be put back, so that signal is left alone."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:
                previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if deliver:
            for sig in dict.fromkeys(received):
                signal.raise_signal(sig)
