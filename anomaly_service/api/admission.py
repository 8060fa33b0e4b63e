"""Admission control: budgets on the work in flight, checked before an upload is read into memory or decoded.

An image's memory grows with its pixels (the decoded copies, the anomaly map, the heatmap are all at its size)
and its upload with its bytes, so counting images is not enough: one 6000x6000 photo costs as much as hundreds of
camera frames. :class:`Admission` keeps three counts of the images admitted and not yet answered:

* **pixels** (width x height, from the header) until the image is answered, failed or abandoned;
* **upload bytes** until the image is decoded (then only the pixels remain);
* **decode backlog**: images waiting for a decode thread or being decoded.

An image that does not fit is refused at once (:class:`Refused` -> 503 ``overloaded`` with ``Retry-After``)
instead of waiting behind the others, so refusals are cheap and early and the memory in flight stays bounded by
the budgets. An image larger than a whole budget (but within the per-image limits) is admitted when nothing else
holds that budget; otherwise it could never be scored.

Beside the budgets, an image is refused (reason ``memory``) when what it would take, at the measured peak bytes
per pixel and, for a tiled model, per pixel of the tiles the network is given (Embedder.tile_bytes), is more than
the process may still allocate now (memory_room.py: the machine's available memory, a cgroup's limit,
``ulimit -v``): a photo too large for a small PC, or one that arrives while the camera software
holds more, is refused rather than the kernel killing the service or an allocation failing inside a decode. What the
images already in flight will still take counts against that room: their peak less what the process has taken
since it was last idle (its resident memory then and now). Read alone, the room let a burst of large photos in at
once, each of which fitted before any had allocated, and the kernel killed the service. What the process takes
meanwhile for something else (a model loaded, re-fitted or warmed: :meth:`Admission.elsewhere`) is not theirs: taken
for theirs, a model loaded beside a photo in flight let a burst in past the memory left by the model's size. Then,
until nothing is in flight, the photos in flight count with all of their peaks.

Used from the event loop only: no locks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Callable

from ..memory_room import PEAK_BYTES_PER_PIXEL, resident_bytes

REASONS = ("pixels", "bytes", "decode_backlog", "memory")


class Refused(Exception):
    """The image does not fit the budget named by ``reason``; the client should retry after ``retry_after`` s."""

    def __init__(self, reason: str, retry_after: int, detail: str):
        super().__init__(detail)
        self.reason, self.retry_after = reason, retry_after


class Ticket:
    """One admitted image's share of the budgets. :meth:`decoded` returns its bytes and its backlog place,
    :meth:`release` everything; both are idempotent, so ``finally: ticket.release()`` is always safe."""

    def __init__(self, admission: Admission, pixels: int, nbytes: int, need: int):
        self._admission = admission
        self.pixels, self.nbytes = pixels, nbytes
        self.need = need  # its peak memory, as admitted
        self.admitted_at = admission.clock()
        self._decoding = True
        self._released = False

    def decoded(self) -> None:
        """The upload is decoded (or will never be): its bytes and its place in the decode backlog are free."""
        if self._decoding:
            self._decoding = False
            self._admission._return(0, self.nbytes, 1)

    def release(self) -> None:
        """The image is answered, failed or abandoned: everything it held is free."""
        self.decoded()
        if not self._released:
            self._released = True
            self._admission._return(self.pixels, 0, 0, held=self._admission.clock() - self.admitted_at,
                                    weight=self.pixels, need=self.need)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Budgets on pixels and upload bytes in flight and on the decode backlog (see the module docstring).

    ``on_change(pixels, bytes, backlog)`` is called with the new totals after every change (for gauges).
    """

    def __init__(self, max_pixels: int, max_bytes: int, max_backlog: int,
                 on_change: Callable[[int, int, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 free_memory: Callable[[], int | None] | None = None,
                 resident: Callable[[], int | None] = resident_bytes):
        self.max_pixels, self.max_bytes, self.max_backlog = max_pixels, max_bytes, max_backlog
        self._free_memory = free_memory  # bytes the process may still allocate (None: unknown), or no such check
        self._resident = resident  # the process's resident bytes (None: unknown)
        self.needs = 0  # the peak memory of the images in flight
        self._idle_resident: int | None = None  # the process's resident bytes when the last idle spell ended
        self._elsewhere = 0  # blocks under way that take memory for something other than photos
        self.pixels = self.nbytes = self.backlog = 0
        self.clock = clock
        self._on_change = on_change
        # Pixel-weighted moving average of how long an image stays in flight: the big images, which are what a
        # refused image waits for, weigh the most; older ones fade.
        self._held_sum = 0.0
        self._held_weight = 0.0

    def admit(self, pixels: int, nbytes: int, tile_bytes: int = 0) -> Ticket:
        """Reserve ``pixels`` and ``nbytes`` and a decode-backlog place, or raise :class:`Refused`. ``tile_bytes``:
        what its model's tiles take beyond its own pixels at the peak (Embedder.tile_bytes; 0 untiled)."""
        if self.backlog >= self.max_backlog:
            self._refuse("decode_backlog", f"{self.backlog} images are waiting to be decoded (limit "
                                           f"{self.max_backlog})")
        if not _fits(self.pixels, pixels, self.max_pixels):
            self._refuse("pixels", f"{self.pixels} pixels are in flight and this image has {pixels} (limit "
                                   f"{self.max_pixels})")
        if not _fits(self.nbytes, nbytes, self.max_bytes):
            self._refuse("bytes", f"{self.nbytes} upload bytes are in flight and this image has {nbytes} (limit "
                                  f"{self.max_bytes})")
        free = self._free_memory() if self._free_memory is not None else None
        need = pixels * PEAK_BYTES_PER_PIXEL + tile_bytes + nbytes
        if free is not None:
            pending = self._pending()
            if need > free - pending:
                others = (f", {pending >> 20} MiB of which the images in flight will still take" if pending >> 20
                          else "")
                tiles = f" (its tiles, as the model cuts them, {tile_bytes >> 20} MiB of it)" if tile_bytes >> 20 \
                    else ""
                self._refuse("memory", f"this image has {pixels} pixels, which take about {need >> 20} MiB to "
                                       f"decode and score{tiles}, "
                                       f"and the service may allocate {free >> 20} MiB more now (the "
                                       f"machine's free memory or the service's memory limit){others}; send smaller "
                                       "photos, or give the service more memory")
        if not self.needs and self._free_memory is not None:
            self._idle_resident = self._resident()  # nothing in flight: what the process holds without photos
        self.needs += need
        self.pixels += pixels
        self.nbytes += nbytes
        self.backlog += 1
        self._changed()
        return Ticket(self, pixels, nbytes, need)

    def retry_after(self) -> int:
        """Whole seconds a refused client should wait: about how long an image stays in flight, at least 1."""
        if self._held_weight <= 0:
            return 1
        return max(1, math.ceil(self._held_sum / self._held_weight))

    def _refuse(self, reason: str, why: str) -> None:
        retry = self.retry_after()
        raise Refused(reason, retry, f"the service is at capacity: {why}; retry in {retry} s")

    @contextlib.contextmanager
    def elsewhere(self) -> Iterator[None]:
        """For the block (on the event loop, around work on a worker thread) the process takes or gives back memory
        for something other than photos: a model loaded, re-fitted or warmed, the one it replaces let go. Which of
        what it grows by meanwhile is the photos' cannot be told: until nothing is in flight again (and what the
        process holds idle is read anew) the photos in flight count whole, never less than they will take."""
        self._elsewhere += 1
        try:
            yield
        finally:
            self._elsewhere -= 1
            if self.needs:
                self._idle_resident = None  # read again when the photos in flight are done

    def _pending(self) -> int:
        """Bytes the images in flight will still take: their peaks less what the process has taken since it was
        idle (all of their peaks where that is unknown, or while it takes memory for something else)."""
        if not self.needs:
            return 0
        if self._elsewhere or self._idle_resident is None:
            return self.needs
        now = self._resident()
        if now is None:
            return self.needs
        if now < self._idle_resident:
            self._idle_resident = now  # what the last photos left (an answer, a picture to record) is given back
        return max(0, self.needs - (now - self._idle_resident))

    def _return(self, pixels: int, nbytes: int, backlog: int, held: float | None = None, weight: int = 0,
                need: int = 0) -> None:
        self.pixels -= pixels
        self.nbytes -= nbytes
        self.backlog -= backlog
        self.needs -= need
        if held is not None:
            w = max(1, weight)
            self._held_sum = 0.9 * self._held_sum + w * held
            self._held_weight = 0.9 * self._held_weight + w
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.pixels, self.nbytes, self.backlog)


def _fits(used: int, need: int, budget: int) -> bool:
    # alone, anything within the per-image limits fits: a budget smaller than one image must not lock it out
    return used == 0 or used + need <= budget

