"""Per-stage wall-clock timing of a pass, in milliseconds per image: what ``timing_ms`` and the metrics report."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class StageTimer:
    """Accumulates named stages. ``per`` divides a batch's time among its images; ``sync`` (e.g. CUDA's
    synchronize) runs before the clock stops, so asynchronous GPU work is charged to the stage that queued it."""

    def __init__(self, sync: Callable[[], None] | None = None, ms: dict[str, float] | None = None):
        self.ms: dict[str, float] = dict(ms or {})
        self._sync = sync

    @contextmanager
    def stage(self, name: str, per: int = 1) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0 / per

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms
