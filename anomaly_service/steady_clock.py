"""The wall clock as far as the monotonic clock vouches for it: the present for what deletes by age.

Why: retention removes a picture whose file is older than ``--retention-days`` by the wall clock, and a wall clock
stepped forward while the service runs (a wrong time server, a typo in ``date -s``, a host a year out) made every
picture look that much older: the next pass deleted the photos of parts scored seconds before. The monotonic clock
never steps. This clock follows the wall clock back (a picture is then kept longer, never removed early) but forward
no faster than the monotonic clock counts; a forward step is not believed until the process starts again, and
:attr:`ahead_s` says by how much the wall clock is ahead of it, for a warning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class SteadyWallClock:
    """Unix time that never steps forward: the wall clock, or less where it jumped ahead since the first reading."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._wall, self._monotonic = wall, monotonic
        self._lock = threading.Lock()
        self._offset = wall() - monotonic()  # the wall clock less the monotonic one, at its smallest seen
        self.ahead_s = 0.0  # how far the wall clock was ahead at the last reading (a forward step not believed)

    def __call__(self) -> float:
        with self._lock:
            mono, wall = self._monotonic(), self._wall()
            self._offset = min(self._offset, wall - mono)
            self.ahead_s = wall - (mono + self._offset)
            return mono + self._offset


STAMP_STEP_NS = 1_000_000_000  # a whole second: a file system that keeps whole seconds still sees the step


def stamp_past(mark_ns: int) -> int:
    """A file time for now that orders after ``mark_ns``: the wall clock's, or a step past ``mark_ns`` where the
    clock is not that far past it (stepped back, or within the resolution of a file system that keeps whole
    seconds). For stamps that others order by: archived versions, pictures touched by a newer record."""
    return max(time.time_ns(), mark_ns + STAMP_STEP_NS)
