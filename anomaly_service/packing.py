"""Consecutive runs of weighted items under a budget: how batches of tiles and chunks of patches are cut.

Both the backbone's tile batches (embedder.py) and the streamed coreset's chunks (patch_store.py) hold whole
images at once, so an image is never split: a run closes before the item that would pass the budget, and an item
heavier than the budget still gets a run of its own.
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def runs_within(items: Iterable[tuple[T, int]], budget: int) -> Iterator[list[T]]:
    """``(item, weight)`` pairs -> lists of consecutive items whose weights add up to at most ``budget`` (at least
    one item per list), in order."""
    run: list[T] = []
    total = 0
    for item, weight in items:
        if run and total + weight > budget:
            yield run
            run, total = [], 0
        run.append(item)
        total += weight
    if run:
        yield run
