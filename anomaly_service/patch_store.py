"""Every patch embedding of a fit, image by image: in memory for the usual few hundred images, on disk beyond.

A fit of ten thousand photos has ten million patches: held as one float32 tensor they alone would take more memory
than a small inspection PC has, and the bank keeps only a tenth of them or less. So the fit streams: each image's
patches are appended here as they come out of the backbone; once they pass ``memory_budget`` bytes they spill to
a temporary file (under ``$TMPDIR``) and are read back one image or one chunk of images at a time. The statistics
the feature selection needs (per-dimension sums) and each image's pooled feature (the image map) are kept as they
arrive, so nothing has to hold every patch at once. Below the budget the store is the list of tensors the fit
always had, and :meth:`all` gives the same concatenated bank as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import AnomalyError
from .dir_lock import hold
from .memory_room import free_bytes
from .packing import runs_within

# in memory up to this many bytes of patch embeddings: room for today's categories many times over, small beside
# what a line PC has
DEFAULT_MEMORY_BUDGET = 1 << 30
# where the process may allocate less than this many budgets, the budget is this share of what it may allocate
FREE_MEMORY_SHARE = 4


def default_memory_budget() -> int:
    """Bytes of patches a fit keeps in memory before it spills: :data:`DEFAULT_MEMORY_BUDGET`, or less on a machine
    (or under a memory limit) with little room.

    Why: the budget was 1 GiB whatever the machine, with no way to lower it: on a PC of 2 GB, whose libraries and
    network already take about 1 GB, a fit of a few thousand photos would hold 1 GiB of patches beside them and the
    coreset (docs/benchmarks.md: peaks of 2.4-2.6 GB from 1,000 photos on). Spilling earlier costs some disk and
    time, not the fit."""
    free = free_bytes()
    return DEFAULT_MEMORY_BUDGET if free is None else min(DEFAULT_MEMORY_BUDGET, free // FREE_MEMORY_SHARE)


SPILL_PREFIX = "anomaly-patches-"
ABANDONED_AFTER_S = 3600  # a spill no fit has written to for this long, and none holds, is a killed fit's


def remove_abandoned(where: Path, now: float | None = None) -> list[Path]:
    """Remove the spill directories under ``where`` that killed fits left; returns them.

    Why: a fit killed outright (the out-of-memory killer, which a fit of thousands of photos is the likeliest to
    meet, or SIGKILL) ran no clean-up, and its spill, gigabytes of patches, stayed in the temporary directory for
    good, one more per killed fit. One is removed when no fit holds it (dir_lock.py), none has written to it for
    an hour, and no process has a file of it open (:func:`_open_by_any`: an earlier release's fit holds no lock, and
    one of thousands of photos reads its spill for hours after its last write, in its coreset)."""
    now = time.time() if now is None else now
    removed = []
    for spill in where.glob(f"{SPILL_PREFIX}*"):
        try:
            newest = max([spill.stat().st_mtime, *(f.stat().st_mtime for f in spill.iterdir())])
        except OSError:
            continue
        if now - newest <= ABANDONED_AFTER_S:
            continue
        fd = hold(spill, wait=False)
        if fd is None:
            continue
        if _open_by_any(spill):
            os.close(fd)
            continue
        try:
            shutil.rmtree(spill, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(spill)
    return removed


def _open_by_any(spill: Path) -> bool:
    """Whether a process has a file under ``spill`` open (a live fit keeps its spill open to write, whichever
    release it runs). Read from ``/proc``: False where there is none to read, and the lock and age alone decide;
    another user's processes cannot be read there, whose spills are not ours to remove either."""
    inside = os.path.join(os.path.realpath(spill), "")
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:  # gone since the listing, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path).startswith(inside):
                    return True
            except OSError:
                continue
    return False


class PatchStore:
    """Append-only ``(rows, cols, d)`` float32 grids (``(tiles, rows, cols, d)`` for a tiled image), one per image,
    numbered in the order they were added."""

    def __init__(self, memory_budget: int | None = None, spill_dir: str | os.PathLike | None = None):
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.spill_dir = spill_dir
        self.grids: list[tuple[int, ...]] = []  # each image's grid: (rows, cols), or (tiles, rows, cols)
        self.layouts: list[Any] = []  # each image's tiling.TileLayout, None untiled (provenance reads it)
        self.offsets: list[int] = [0]  # first row of each image
        self.dim: int | None = None
        self._memory: list[torch.Tensor] = []  # per image, (rows * cols, d), while not spilled
        self._file: Path | None = None
        self._fh = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._lock: int | None = None  # a descriptor holding the flock on the spill directory (dir_lock.py)
        self._sum: np.ndarray | None = None  # float64 per-dimension sums, shifted (see channel_std)
        self._sum2: np.ndarray | None = None
        self._shift: np.ndarray | None = None
        self.pooled: list[np.ndarray] = []  # per image, the mean of its patches (float32, every dimension)

    # ------------------------------------------------------------------ writing
    def add(self, grid: torch.Tensor, layout: Any = None) -> int:
        """Append one image's ``(rows, cols, d)`` grid (``(tiles, rows, cols, d)`` with its tile ``layout``);
        returns its index."""
        d = grid.shape[-1]
        rows = grid.reshape(-1, d).float().cpu().contiguous()
        if self.dim is None:
            self.dim = d
            self._shift = rows[: min(len(rows), 1024)].double().mean(0).numpy()
            self._sum, self._sum2 = np.zeros(d), np.zeros(d)
        elif d != self.dim:
            raise ValueError(f"patch width {d} differs from the store's {self.dim}")
        block = rows.double().numpy() - self._shift
        self._sum += block.sum(0)
        self._sum2 += (block * block).sum(0)
        self.pooled.append(rows.mean(0).numpy().astype(np.float32))
        if self._fh is None and (self.offsets[-1] + len(rows)) * d * 4 > self.memory_budget:
            self._spill()
        if self._fh is not None:
            self._write(rows)
        else:
            self._memory.append(rows)
        self.grids.append(tuple(grid.shape[:-1]))
        self.layouts.append(layout)
        self.offsets.append(self.offsets[-1] + len(rows))
        return len(self.grids) - 1

    def _spill(self) -> None:
        """Move what is in memory to a temporary file and keep appending there."""
        try:  # gettempdir's own failure (no usable directory at all) is an OSError too
            self._tmpdir = tempfile.TemporaryDirectory(prefix=SPILL_PREFIX, dir=self.spill_dir)
            self._lock = hold(Path(self._tmpdir.name))
            self._file = Path(self._tmpdir.name) / "patches.f32"
            self._fh = open(self._file, "wb")
        except OSError as exc:
            raise self._no_room(exc) from exc
        with contextlib.suppress(OSError):  # a temporary directory that cannot be listed: its own fit goes on
            remove_abandoned(Path(self._tmpdir.name).parent)
        for rows in self._memory:
            self._write(rows)
        self._memory = []

    def _write(self, rows: torch.Tensor) -> None:
        try:
            self._fh.write(rows.numpy().tobytes())
        except OSError as exc:
            raise self._no_room(exc) from exc

    def _flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            raise self._no_room(exc) from exc

    def _no_room(self, exc: OSError) -> AnomalyError:
        """A spill the temporary directory does not take (a full volume, or one remounted read-only): one clear
        error naming where and what moves it, instead of a traceback from deep in the fit. Only a full volume is
        told to find room: a read-only one has room."""
        where = self.spill_dir or tempfile.tempdir or "the temporary directory"
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return AnomalyError(f"the fit's patch embeddings spill to a temporary file under {where} beyond "
                            f"{self.memory_budget / 2**20:.0f} MiB in memory, and it could not be written "
                            f"({exc.strerror or exc}, {self.n_rows * (self.dim or 0) * 4 / 2**20:.0f} MiB so far): "
                            f"set TMPDIR to {'a volume with room' if full else 'a directory it can write'}, "
                            "or fit on fewer images")

    def close(self) -> None:
        """Delete the spill file, if any (the store is unusable afterwards). A close that cannot flush what is
        left (the volume filled up) is no reason to keep the file: it is removed all the same."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass  # the write that failed first has raised already
            self._fh = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self._memory = []

    def __enter__(self) -> "PatchStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.grids)

    @property
    def n_rows(self) -> int:
        return self.offsets[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(patches, dimensions)``, as the bank tensor's shape."""
        return self.n_rows, self.dim or 0

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def size(self, image: int) -> int:
        """How many patches image ``image`` has (every tile's, tiled)."""
        return self.offsets[image + 1] - self.offsets[image]

    def rows(self, image: int) -> torch.Tensor:
        """Image ``image``'s patches, ``(rows * cols, d)`` (``(tiles * rows * cols, d)``) float32."""
        if not self.spilled:
            return self._memory[image]
        self._flush()
        start, stop = self.offsets[image], self.offsets[image + 1]
        with open(self._file, "rb") as fh:
            fh.seek(start * self.dim * 4)
            data = np.fromfile(fh, dtype=np.float32, count=(stop - start) * self.dim)
        return torch.from_numpy(data.reshape(stop - start, self.dim))

    def grid(self, image: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``image``'s ``(rows, cols, d)`` (``(tiles, rows, cols, d)``) grid, only the ``keep`` dimensions
        when given."""
        rows = self.rows(image)
        if keep is not None:
            rows = rows.index_select(1, keep)
        return rows.reshape(*self.grids[image], -1)

    def gather(self, images: Sequence[int], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The patches of ``images`` (in that order) concatenated: ``(rows, d or len(keep))``."""
        width = self.dim if keep is None else len(keep)
        out = torch.empty((sum(self.size(i) for i in images), width))
        at = 0
        for i in images:
            rows = self.rows(i)
            n = len(rows)
            out[at : at + n] = rows if keep is None else rows.index_select(1, keep)
            at += n
        return out

    def all(self, images: Sequence[int] | None = None) -> torch.Tensor:
        """Every patch (of ``images``, default all) as one tensor; in memory this is the fit's old bank exactly."""
        if images is None and not self.spilled:
            return torch.cat(self._memory) if self._memory else torch.zeros((0, self.dim or 0))
        return self.gather(range(len(self)) if images is None else images)

    def chunks(self, images: Sequence[int], max_rows: int) -> Iterator[list[int]]:
        """``images`` in runs whose patches add up to at most ``max_rows`` (at least one image per run)."""
        return runs_within(((i, self.size(i)) for i in images), max_rows)

    def channel_std(self) -> torch.Tensor:
        """Per-dimension standard deviation over every patch added (as :func:`selection.channel_std`)."""
        n = self.n_rows
        var = (self._sum2 - self._sum * self._sum / n) / max(n - 1, 1)
        return torch.from_numpy(np.sqrt(np.maximum(var, 0))).float()
