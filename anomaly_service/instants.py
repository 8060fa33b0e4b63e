"""A point in time as a person or a dashboard writes it (``since``, ``until``): one reading for the API and the CLI.

Why one: the HTTP API read its times through pydantic, which also takes a bare number as Unix seconds (or
milliseconds past a size), while ``anomaly records export`` read ISO 8601. So ``since=20261205``, ISO 8601's basic
form of 2026-12-05 that the export reads as that day, meant 1970-08-23 to the API and every record matched; and
``since=0`` or ``since=-1`` answered every record instead of saying the time was not one. Both read ISO 8601 as
Python does now (extended and basic forms, week dates, a comma before the fraction), without a zone in UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone, tzinfo

EXAMPLES = "2026-12-01, 2026-12-01T08:00:00Z, 2026-12-01T08:00:00+05:30"
# an offset whose "+" a URL's query string turned into a space: "...T08:00:00 05:30"
_PLUS_AS_SPACE = re.compile(r"\d \d{2}(:?\d{2})?$")


class NotAnInstant(ValueError):
    """The text is not an ISO 8601 date or time, or names one with no UTC equivalent; the message says which."""


def parse_instant(text: str, zone: tzinfo | None = timezone.utc) -> datetime:
    """``text`` as a timezone-aware UTC datetime: an ISO 8601 date or date and time, with an offset or ``Z``, or
    without one (then it is in ``zone``: UTC, as every stored time is). A date alone is its midnight. ``zone`` None:
    a time without an offset comes back naive, for a caller that reads it in a zone it learns later."""
    value = text.strip()
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        if _PLUS_AS_SPACE.search(value):
            raise NotAnInstant(f"{text!r} has a space where its offset's sign goes: a '+' in a URL's query reads as "
                               "a space, so send it as %2B (since=2026-12-01T08:00:00%2B05:30), or give the time in "
                               "UTC with Z") from None
        raise NotAnInstant(f"{text!r} is not an ISO 8601 date or time (e.g. {EXAMPLES})") from None
    if t.tzinfo is None and zone is None:
        return t
    try:
        return t.replace(tzinfo=zone).astimezone(timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first representable UTC time
        raise NotAnInstant(f"{text!r} is not a time in range in UTC (it falls before year 1 or after 9999 there)"
                           ) from None
