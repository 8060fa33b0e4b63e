"""Which good images show the same part: the groups the leave-one-out threshold leaves out whole.

A plant's ./good often holds burst shots of one part, or one part photographed on two passes. Under leave-one-out
each shot is scored against a bank that still holds its twin's patches, so twins score low and the threshold set
from those scores falls (docs/decisions.md, "Near-duplicate good images"). No cheap signal found the copies on every
category measured, but the plant knows which photos show one part: it names its files by part
(``P0123_shot1.png``) or saves one folder per part. ``part_id`` (a fit option) is a regular expression searched in
each training image's path relative to the folder it was given in; its first group (the whole match if it has none)
is the image's part id. Images with one part id are one group, and the leave-one-out scores (the threshold, the
drift reference, the contamination guard's support score) leave a whole group's rows out when one of its images is
scored (``KnnScorer.groups_``). An image the pattern does not match is a group of its own, as every image is
without ``part_id``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np
import regex

from .errors import ConfigError
from .spellings import composed


@dataclass(frozen=True)
class PartGroups:
    """The part id of each training image (None: unmatched) and the group numbers they give."""

    pattern: str
    parts: tuple[str | None, ...]

    @classmethod
    def of(cls, pattern: str, names: Sequence[str], root: str | Path | None = None) -> "PartGroups":
        """The part ids of the images ``names`` (their paths as the fit was given them), each searched in its path
        relative to ``root`` (None: the names' common folder), with ``/`` between folders, in its composed Unicode
        spelling (spellings.py), as the pattern is searched."""
        # both in their composed spelling: a file name written on a Mac spells 'ü' as 'u' and a combining mark,
        # which \w does not match, so its part went ungrouped, or apart from the same part's other spelling
        keys = [composed(key) for key in relative_names(names, root)]
        return cls(pattern, tuple(search_all(composed(pattern), keys)))

    def numbers(self) -> np.ndarray:
        """One group number per image, in order: images of one part id share one, every unmatched image has its
        own (numbered in order of first appearance)."""
        seen: dict[str, int] = {}
        out = np.empty(len(self.parts), dtype=np.int32)
        n = 0
        for j, part in enumerate(self.parts):
            if part is None:
                out[j], n = n, n + 1
            elif part in seen:
                out[j] = seen[part]
            else:
                seen[part] = out[j] = n
                n += 1
        return out

    def check(self) -> None:
        """Refuse a pattern that leaves too little to calibrate against: every image in one group (each would be
        scored against a bank without any image), or one group of more than half the images, whose images would be
        scored against a bank of fewer images than it holds (a pattern that captures one digit of a serial: the
        threshold rose far above the fit's without it, with nothing said but the group's size)."""
        numbers = self.numbers()
        if len(numbers) < 2:
            return
        sizes = np.bincount(numbers)
        largest = int(sizes.max())
        if 2 * largest <= len(numbers):
            return
        part = self.parts[int(np.argmax(numbers == int(np.argmax(sizes))))]
        fix = ("its first group must capture what tells the parts apart (e.g. 'P(\\d+)_', or '^([^/]+)/' with one "
               "folder per part under --normal-dir and --recursive)")
        if largest == len(numbers):
            raise ConfigError(f"--part-id '{self.pattern}' puts all {len(numbers)} good images into one part "
                              f"({part!r}), which leaves no other image to set the threshold against: {fix}")
        raise ConfigError(f"--part-id '{self.pattern}' puts {largest} of the {len(numbers)} good images into one "
                          f"part ({part!r}): each would be scored against the other {len(numbers) - largest} "
                          "image(s) only, and the threshold would be set far above what an unseen good part scores "
                          "against the whole bank. A part may hold at most half of the good images: where one part "
                          f"was photographed that often, keep fewer of its photos; otherwise {fix}")

    def summary(self) -> dict[str, Any]:
        """What the manifest records (training.part_groups): the pattern, how many groups, how many images share
        a group with another, the largest group, and how many images the pattern did not match."""
        numbers = self.numbers()
        sizes = np.bincount(numbers) if len(numbers) else np.zeros(0, int)
        return {"pattern": self.pattern, "n_groups": int(len(sizes)), "grouped_images": int(sizes[sizes > 1].sum()),
                "largest": int(sizes.max()) if len(sizes) else 0,
                "unmatched": sum(p is None for p in self.parts)}


# how long the part ids of a fit's names may take to find: a pattern that backtracks without end (nested repeats,
# '(\w+)+_' on a name it does not match) held the fit for ever, deaf to Ctrl-C, as Python's re never lets go
MATCH_TIMEOUT_S = 30.0


def search_all(pattern: str, keys: Sequence[str]) -> list[str | None]:
    """The part id ``pattern`` finds in each of ``keys``: its first group, or the whole match (None: no match).
    Searched with the ``regex`` package (re's syntax), whose matching gives up at a deadline: re cannot be
    interrupted, and a pattern that backtracks for ever would hold the fit with no word said."""
    rx = regex.compile(pattern)
    deadline = time.monotonic() + MATCH_TIMEOUT_S
    out: list[str | None] = []
    for key in keys:
        try:
            m = rx.search(key, timeout=max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            raise ConfigError(f"--part-id '{pattern}' did not finish searching the {len(keys)} good images' names "
                              f"in {MATCH_TIMEOUT_S:.0f} s: it backtracks without end (nested repeats such as "
                              "'(\\w+)+' or '(.*)*' do on a name they do not match). Write each repeat once, e.g. "
                              "'P(\\d+)_' or '^([^/]+)/'") from None
        out.append(None if m is None else m.group(1) if rx.groups and m.group(1) is not None else m.group(0))
    return out


def relative_names(names: Sequence[str], root: str | Path | None = None) -> list[str]:
    """Each name as a path relative to ``root`` (None: the names' common folder, when they have one), written with
    ``/``; a name not under ``root`` stays as given."""
    if root is None:
        root = common_folder(names)
    out = []
    for name in names:
        rel = _relative(name, root) if root is not None else None
        out.append(rel if rel is not None else PurePath(name).as_posix())
    return out


def common_folder(names: Sequence[str]) -> str | None:
    """The deepest folder that holds every one of ``names`` (as paths), or None (no names, or no common folder)."""
    try:
        parents = [os.path.dirname(os.path.abspath(n)) for n in names]
        return os.path.commonpath(parents) if parents else None
    except ValueError:  # paths on different drives
        return None


def _relative(name: str, root: str | Path) -> str | None:
    path, base = Path(name), Path(root)
    for a, b in ((path, base), (path.absolute(), base.absolute())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            continue
    return None


def group_of(groups: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    """The group of each bank image ``ids`` (``groups``: one number per image the fit grouped). An image past them
    (one an update added) is a group of its own, numbered beyond every fitted group; None: every image its own."""
    ids = np.asarray(ids)
    if groups is None:
        return ids
    n = len(groups)
    return np.where(ids < n, groups[np.minimum(ids, max(n - 1, 0))] if n else 0, ids + n).astype(np.int64)
