"""Progress bars for long steps: a live bar on a terminal; where stderr is not one (cron, systemd, CI, a pipe) a
plain line when a step starts, every half minute while it runs and when it ends, so that a fit of many minutes is
never silent in a log."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from tqdm.auto import tqdm

# A log record's attribute (``log.warning(..., extra={RESTATED_BY_CLI: True})``): the command line says this in its
# own words after the step (the suspects of a fit, the surface warning), so its log handler leaves the record out.
# Library users, who see no such restatement, still get the record.
RESTATED_BY_CLI = "restated_by_cli"

LOG_EVERY_S = 30.0  # where stderr is not a terminal: one progress line at most this often
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream for one tqdm bar that turns its in-place refreshes into lines of stderr: the first, the last (at
    100%) and one at most every :data:`LOG_EVERY_S` between (a bar refreshed by ``set_postfix`` refreshes at every
    step); the cursor moves of bars that run side by side are dropped. The end is written once: a bar refreshed at
    100% (``set_postfix`` after the last step) and again at its close differs only in its rate, and a log that said
    "100%" twice read as a step run twice."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._line = ""  # the last line written
        self._latest = ""  # the last line the bar drew, written or not
        self._done = False  # its 100% line is written: nothing more to say

    def write(self, text: str) -> None:
        line = _CURSOR.sub("", text).replace("\r", "").strip()
        if not line or self._done:
            return
        self._latest = line
        now = time.monotonic()
        if line != self._line and (self._last is None or "100%" in line or now - self._last >= LOG_EVERY_S):
            self._last, self._line, self._done = now, line, "100%" in line
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()

    def end(self) -> None:
        """Write the bar's last state if it was not: a step without a total (``evaluate``'s stream of photos) or one
        that ended short of it (photos skipped, a stop) never reaches 100%, and its log had no end."""
        if self._latest and self._latest != self._line:
            self._line = self._latest
            sys.stderr.write(self._latest + "\n")


class _LoggedBar(tqdm):
    """A bar drawn as lines (:class:`_Lines`) whose closing writes its last state."""

    def __init__(self, *args: Any, lines: _Lines, **kwargs: Any) -> None:
        self._lines = lines
        super().__init__(*args, file=lines, **kwargs)

    def close(self) -> None:
        super().close()
        self._lines.end()


def progress_bar(enabled: bool, iterable: Any = None, **kwargs: Any) -> tqdm:
    if enabled and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        kwargs.update(mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S, leave=True, ascii=True,
                      ncols=100)
        return _LoggedBar(iterable, disable=False, lines=_Lines(), **kwargs)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=not enabled, **kwargs)
