"""One name, two spellings: Unicode writes 'ü' as one character (NFC, what Linux and Windows keyboards type) or as
'u' and a combining mark (NFD, what macOS wrote into file names). A folder made on a Mac and copied to Linux keeps
its spelling, and every listing shows both alike, so a name typed on the line's PC does not find it."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path


def unicode_forms(value: str) -> set[str]:
    """``value`` as it came, composed (NFC) and decomposed (NFD): the spellings of one text a filter matches."""
    return {value, unicodedata.normalize("NFC", value), unicodedata.normalize("NFD", value)}


def composed(text: str) -> str:
    """``text`` in its composed spelling (NFC): two spellings of one name compare equal so."""
    return unicodedata.normalize("NFC", text)


def composed_if_other(text: str | None) -> str | None:
    """``text``'s composed spelling where it is spelt otherwise, else None. Besides the decomposed spelling, a name
    can be mixed (a decomposed folder name with a composed suffix typed after it) or hold a character that NFC
    replaces (U+212B ANGSTROM SIGN by U+00C5): neither is one of :func:`unicode_forms` of what an operator types, so
    a record keeps this (None for nearly every name) to be found by it."""
    if text is None:
        return None
    key = composed(text)
    return None if key == text else key


def entry_spelt(parent: Path, name: str) -> Path | None:
    """The one entry of the directory ``parent`` that spells ``name`` (which it does not hold as spelt) the other
    Unicode way; None when there is none, or more than one (which of them was meant cannot be told), or ``parent``
    is no directory we may list."""
    key = composed(name)
    try:
        matches = [e for e in os.listdir(parent) if composed(e) == key]
    except OSError:  # not a directory, or not ours to list
        return None
    return parent / matches[0] if len(matches) == 1 else None


def other_spelling(path: Path) -> Path | None:
    """The existing path that ``path`` (which does not exist) names in another spelling, part by part; None when
    there is none, or more than one."""
    parts = path.parts
    found = Path(parts[0]) if path.is_absolute() else Path(".")
    for part in parts[1:] if path.is_absolute() else parts:
        if (found / part).exists() or part in ("", ".", ".."):
            found = found / part
            continue
        entry = entry_spelt(found, part)
        if entry is None:
            return None
        found = entry
    return found if found.exists() and found != path else None


def spelling_hint(path: Path) -> str:
    """What to add to an error about a ``path`` that does not exist, where it exists in another spelling: empty
    otherwise."""
    other = other_spelling(path)
    if other is None:
        return ""
    return (f" (but {other} is: the same name in another Unicode spelling, as macOS writes names; copy it from this "
            "line or a listing, or rename the folder)")
