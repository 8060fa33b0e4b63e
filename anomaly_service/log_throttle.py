"""A fault that repeats at every part, said at most once per interval, with a count of the ones held back.

Why: a full picture volume or an overload fails every part, many a second, and a line each buried the log when an
engineer reads it for them (the metrics count each one). What is held back is said once the interval is over, not
only by the next failure after it: otherwise a burst's last minute was never said and read as one failure.
"""

from __future__ import annotations

import math
import time


class Throttle:
    """Counts a repeated fault and says when its line is due: at once for the first, then at most once per
    ``every_s`` seconds, for every one counted since."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = -math.inf  # when a line was last said
        self._held = 0  # faults counted since

    def event(self) -> int | None:
        """Count one fault: how many to say now (it and those held back), or None while the interval runs."""
        self._held += 1
        return self.release(wait=True) or None

    def release(self, wait: bool = True) -> int:
        """The faults held back, to say now, counted as said (0: none, or ``wait`` and the interval not over)."""
        now = time.monotonic()
        if not self._held or (wait and now - self._last < self.every_s):
            return 0
        held, self._held, self._last = self._held, 0, now
        return held
