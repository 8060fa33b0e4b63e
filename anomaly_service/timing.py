"""Per-stage wall-clock timing of a pass, in milliseconds per image: what ``timing_ms`` and the metrics report."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


def charge_decode(timing_ms: dict[str, float], ms: float) -> None:
    """Charge a decode done before scoring (``ms``) to a result's ``decode`` stage, in place of the model's re-read
    of the pixels it was handed, and keep ``total`` the sum of the stages."""
    timing_ms["total"] = timing_ms.get("total", 0.0) - timing_ms.get("decode", 0.0) + ms
    timing_ms["decode"] = ms


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
