"""The whole-image branch trained on a thread of its own while the coreset is chosen (decisions.md, "The
whole-image branch trains beside the greedy")."""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from .autoencoder import AEConfig, ReconstructionScorer
from .patch_store import PatchStore


class StoredGrids(Sequence):
    """The kept images' grids in the kept dimensions, each read from the store when asked for: the branch's training
    reads them one at a time, so a streamed fit (patch_store.py) never holds them all."""

    def __init__(self, store: PatchStore, ids: list[int], keep: torch.Tensor):
        self.store, self.ids, self.keep = store, ids, keep

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, p):  # type: ignore[override]
        return self.store.grid(self.ids[p], self.keep)


def train_timed(scorer: ReconstructionScorer, samples: Sequence[torch.Tensor], progress: bool,
                stop: threading.Event | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Train ``scorer`` on ``samples`` and leave it on ``device`` (ReconstructionScorer.fit); its training
    statistics with the seconds it took."""
    t0 = time.perf_counter()
    stats = scorer.fit(samples, progress=progress, stop=stop, device=device)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats


class BranchBeside:
    """The whole-image branch trained on a thread of its own while the coreset is chosen.

    Why: on a CPU the greedy's compiled loop (coreset_kernel.py) holds one core and releases the GIL, and the
    branch's small convolutions run on one intra-op thread (autoencoder.py), so side by side the fit pays for
    the longer of the two instead of both. Where it outlasts the greedy, the leave-one-out pass starts beside it
    on one thread and takes every core once it is done (:meth:`running`): a third thread on two cores stalls the
    pass's products. The network and its initial weights are made on the calling thread, from the config's seed:
    the branch trained beside the greedy is the one trained after it."""

    def __init__(self, store: PatchStore, images: list[int], config: AEConfig, sigma: float, progress: bool):
        self.store, self.images, self.config, self.sigma, self.progress = store, list(images), config, sigma, progress
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Set by the thread when it ends. Waits go on it, not on Thread.join: on Python 3.11 a join that Ctrl-C
        # interrupts marks the still-training thread as stopped, so a later join returned at once and the
        # interpreter aborted on the thread at exit.
        self._done = threading.Event()
        self.scorer: ReconstructionScorer | None = None
        self.stats: dict[str, Any] = {}
        self.error: BaseException | None = None

    def start(self, selected: np.ndarray) -> None:
        """Begin training on the ``selected`` dimensions (KnnScorer.fit calls this once they are chosen)."""
        samples = StoredGrids(self.store, self.images, torch.from_numpy(selected))
        self.scorer = ReconstructionScorer(self.config, samples[0].shape[-1], sigma=self.sigma)
        self._thread = threading.Thread(target=self._train, args=(samples,), name="whole-image-branch", daemon=True)
        self._thread.start()

    def _train(self, samples: StoredGrids) -> None:
        try:
            assert self.scorer is not None
            self.stats = train_timed(self.scorer, samples, self.progress, self._stop)
        except BaseException as e:  # noqa: BLE001 - raised on the fit's thread by result()
            self.error = e
        finally:
            self._done.set()

    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def cancel(self) -> None:
        """Stop the training after its current epoch and wait for the thread: a fit that fails (or is interrupted)
        beside the branch leaves no thread training on a closed patch store."""
        self._stop.set()
        if self._thread is not None:
            self._done.wait()
            # then the thread has only its return left: a short join (no long wait a Ctrl-C could interrupt) so
            # that it is gone, not just done, when the fit raises (a CI run saw it still listed for an instant)
            self._thread.join(timeout=5)

    def result(self) -> tuple[ReconstructionScorer, dict[str, Any]]:
        """Wait for the training; the trained branch and its statistics (its error, raised here)."""
        if self._thread is None or self.scorer is None:
            raise RuntimeError("the whole-image branch was never started")
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.scorer, self.stats

