"""Inspection records: list and filter, one record with its review history, its pictures, stats, and reviews.

Same API-key rule as scoring. The database is reached on worker threads (its drivers block); a database that
cannot answer gives 503 ``records_unavailable``, never a hang of the event loop.
"""

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Annotated, Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator

from ... import __version__
from ...instants import parse_instant
from ...records import (FILES_EXPIRED, FILES_NOT_KEPT, FILES_REMOVED, FILES_STORED, Filters, ReviewConflict,
                        UndoRefused, UnknownReview, inspection_dict)
from ...records.models import utcnow
from ...records.files import MEDIA_TYPES
from ...records.stats import MAX_BUCKETS, STEP, UTC, Zone
from ..cursors import decode_cursor, encode_cursor
from ..deps import (REVIEWER_HEADER, ApiKeyDep, MaxSideQuery, ProbedServiceDep, ServiceDep, blank_is, key_allows,
                    records_of, require_api_key, who)
from ..errors import ApiError, error_doc, error_responses
from ..lifecycle import Service
from ..pictures import needs_drawing
from ..request_id import MAX_LENGTH as REQUEST_ID_LENGTH
from ..schemas import (Bucket, Decision, InspectionOut, InspectionPage, LatestVerdict, ReviewIn, StatsBucketOut,
                       StatsOut)

log = logging.getLogger(__name__)

# Every route needs the API key, except that a picture also opens with its inspection's view token: an <img> tag or
# a dashboard link cannot send the X-API-Key header.
router = APIRouter(prefix="/inspections", tags=["inspections"])
KEYED = [Depends(require_api_key)]
# The records need no model: their routes answer while ``anomaly serve`` still loads the models at start-up. The
# pictures drawn as the model reads the photo (display, thumbnail, overlay) wait for the loading, as scoring does.
RecordsServiceDep = ProbedServiceDep

ERRORS = {401: error_responses(401)[401], 422: error_doc("Invalid filters or body"),
          503: error_doc("Recording is off, or the records database cannot answer now")}
ONE = {**ERRORS, 404: error_doc("No inspection with this id")}
PICTURE = {**ONE, 200: {"content": {"image/png": {}}, "description": "The picture"},
           404: error_doc("No such inspection, or its pictures were not kept (--keep-images)"),
           410: error_doc("Retention removed this inspection's pictures (the record stays)")}
# content-addressed: never changes (every answer is also read as the type it is sent as, never sniffed: a stored
# upload is whatever bytes a client sent, which a browser could otherwise take for a page; middleware.NoSniff)
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}
# a picture drawn from the stored files as the served model reads them (/display, /thumbnail, /overlay.png): a re-fit
# to another bit depth draws another picture at the same URL, so a browser keeps it but asks again (ETag, 304)
DRAWN = {"Cache-Control": "private, no-cache"}

IdPath = Annotated[str, Path(description="Inspection id", max_length=64,
                             examples=["0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4"])]


def _instant(value: Any) -> Any:
    """A time parameter as ``anomaly records export`` reads it (instants.py): ISO 8601, never a bare number taken
    for Unix seconds; empty is not given (blank_is)."""
    if value == "":
        return None
    return parse_instant(value) if isinstance(value, str) else value


Instant = BeforeValidator(_instant)
Since = Annotated[datetime | None, Instant,
                  Query(description="From this time (ISO 8601; no zone = UTC), inclusive",
                        examples=["2025-01-14T00:00:00Z"])]
Until = Annotated[datetime | None, Instant,
                  Query(description="Before this time (ISO 8601; no zone = UTC)", examples=["2025-01-15T00:00:00Z"])]
Text200 = Annotated[str | None, Query(max_length=200)]


async def _db(service: Service, fn: Callable[..., Any], *args: Any) -> Any:
    """A records database call through the service's gate (records_gate.py): bounded, with a deadline, never on
    the threads that uploads and scoring use."""
    return await service.records_gate.call(fn, *args)


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    try:
        return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first representable UTC time
        raise ApiError(422, "invalid_request", f"time {t.isoformat()} is out of range in UTC") from None


def _ordered(since: datetime | None, until: datetime | None) -> None:
    """Refuse a range that ends before it starts: an empty answer would read as "no parts in that time"."""
    if since is not None and until is not None and since > until:
        raise ApiError(422, "invalid_request", f"since {since.isoformat()} is after until {until.isoformat()}")


# ------------------------------------------------------------------------------------------------- routes
@router.get("", response_model=InspectionPage, dependencies=KEYED,
            responses={**ERRORS, 400: error_doc("Tampered or foreign cursor")})
async def list_inspections(
        service: RecordsServiceDep,
        model: Annotated[str | None, Query(max_length=200, description="Model name", examples=["bottle"])] = None,
        decision: Annotated[Decision | None, blank_is(None),
                            Query(description="The model's decision")] = None,
        verdict: Annotated[LatestVerdict | None, blank_is(None),
                           Query(description="The latest review's verdict, or unreviewed")] = None,
        since: Since = None, until: Until = None,
        part_id: Annotated[str | None, Query(max_length=200, examples=["SN-20931-A"])] = None,
        request_id: Annotated[str | None, Query(max_length=REQUEST_ID_LENGTH, description="The X-Request-ID "
                                                "of the call that scored it", examples=["MES-4711"])] = None,
        line: Annotated[str | None, Query(max_length=100, examples=["line-2"])] = None,
        station: Annotated[str | None, Query(max_length=100, examples=["cam-top"])] = None,
        limit: Annotated[int, blank_is(50), Query(ge=1, le=500, description="Items per page")] = 50,
        cursor: Annotated[str | None, Query(max_length=400, description="next_cursor of the previous page")] = None,
) -> InspectionPage:
    """Recorded inspections, newest first, filtered; page with `cursor` (keyset pagination: no record twice). A
    record is written a little after its id's time (minutes during a database outage), so it can land behind a page
    already read: to miss none, re-read the last minutes (docs/service.md)."""
    store = records_of(service)
    _ordered(_utc(since), _utc(until))
    filters = Filters(model=model, decision=decision, verdict=verdict, since=_utc(since), until=_utc(until),
                      part_id=part_id, request_id=request_id, line=line, station=station)
    before = decode_cursor(service, cursor) if cursor else None
    rows = await _db(service, store.query, filters, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    return InspectionPage(items=[InspectionOut.from_record(inspection_dict(r)) for r in rows],
                          next_cursor=encode_cursor(service, rows[-1].id) if more else None)


def _local_instant(value: Any) -> Any:
    """As :func:`_instant`, but a time without a zone stays without one: the stats read it in their ``tz``."""
    if value == "":
        return None
    return parse_instant(value, zone=None) if isinstance(value, str) else value


LocalInstant = BeforeValidator(_local_instant)


@functools.cache
def _zone_names() -> frozenset[str]:
    """The IANA zones a ``tz`` may name. ZoneInfo opens any file under the system's zone folders, and two kinds
    there are no plant's clock: ``localtime`` (the server's own zone, which differs from host to host) and the
    ``right/`` zones (clocks that count leap seconds, whose transitions Python reads so that Berlin never left summer
    time: its fall-back night was cut in summer time throughout)."""
    return frozenset(available_timezones()) - {"localtime"}


def _zone(name: str) -> tzinfo:
    """``tz`` as an IANA time zone (Python's tz database, shipped with the tzdata package where the system has none)."""
    if name.upper() == "UTC":
        return timezone.utc
    try:
        if name not in _zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    # ValueError: not a key ('../x', an absolute path) or not a zone file; OSError: a folder of zones ('Europe')
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ApiError(422, "invalid_request", f"tz {name[:64]!r} is not an IANA time zone (e.g. Europe/Berlin, "
                       "America/New_York, Asia/Kolkata, UTC)") from None


def _in_zone(t: datetime | None, tz: tzinfo) -> datetime | None:
    """A stats time read in ``tz`` when it names no zone of its own, as UTC."""
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=tz)
    return _utc(t)


def _on_clock(t: datetime, tz: tzinfo) -> str:
    """``t`` as the plant's clock shows it, with the offset: says which of a repeated hour's two times was meant."""
    try:
        return t.astimezone(tz).isoformat()
    except OverflowError:  # within a day of year 1 or 9999 the clock's time is not representable: UTC says it
        return t.isoformat()


@router.get("/stats", response_model=StatsOut, dependencies=KEYED, responses=ERRORS)
async def inspection_stats(
        service: RecordsServiceDep,
        bucket: Annotated[Bucket, blank_is("hour"),
                          Query(description="Time bucket")] = "hour",
        since: Annotated[datetime | None, LocalInstant,
                         Query(description="From (ISO 8601; no zone = tz's; default: 24 hours ago), inclusive",
                               examples=["2025-01-14T00:00:00Z"])] = None,
        until: Annotated[datetime | None, LocalInstant,
                         Query(description="Before this time (ISO 8601; no zone = tz's)",
                               examples=["2025-01-15T00:00:00Z"])] = None,
        model: Annotated[str | None, Query(max_length=200, examples=["bottle"])] = None,
        line: Annotated[str | None, Query(max_length=100, examples=["line-2"])] = None,
        tz: Annotated[str, blank_is("UTC"),
                      Query(max_length=64, description="IANA time zone the buckets are cut in (a day from the "
                            "plant's midnight) and a since or until without a zone is read in",
                            examples=["Europe/Berlin"])] = "UTC",
) -> StatsOut:
    """Per time bucket (cut in ``tz``, default UTC), model and line: counts by decision, anomaly rate,
    normalized-score quantiles and the review backlog (for dashboards)."""
    store = records_of(service)
    zone = _zone(tz)
    since, until = _in_zone(since, zone), _in_zone(until, zone)
    end = _utc(until) or utcnow()  # the records' clock (the database's), as the records are dated
    try:
        start = _utc(since) or end - timedelta(hours=24)  # the 24 hours up to until, as the docs' default
    except OverflowError:  # until within a day of the first representable time: no 24 hours before it
        raise ApiError(422, "invalid_request", f"until {end.isoformat()} leaves no 24 hours before it: give "
                       "since as well") from None
    _ordered(_utc(since), _utc(until))
    if (end - start) / STEP[bucket] > MAX_BUCKETS:
        raise ApiError(422, "invalid_request", f"{start.isoformat()} to {end.isoformat()} is more than "
                       f"{MAX_BUCKETS} {bucket} buckets: ask for a larger bucket or a shorter range")
    filters = Filters(model=model, line=line, since=start, until=_utc(until))
    cut = UTC if zone is timezone.utc else Zone.over(zone, start, end)
    stats = await _db(service, store.stats, filters, bucket, cut)
    return StatsOut(bucket=bucket, tz="UTC" if zone is timezone.utc else tz, since=start.isoformat(),
                    until=_utc(until).isoformat() if until else None, since_local=_on_clock(start, zone),
                    until_local=_on_clock(until, zone) if until else None, truncated=stats["truncated"],
                    buckets=[StatsBucketOut(**{**b, "start": b["start"].isoformat()}) for b in stats["buckets"]])


async def _get(service: Service, inspection_id: str) -> Any:
    store = records_of(service)
    held = _held(service, inspection_id)  # before the lookup: see _on_its_way
    row = await _db(service, store.get, inspection_id)
    if row is None and await _on_its_way(service, inspection_id, held):
        row = await _db(service, store.get, inspection_id)
    if row is None:
        raise ApiError(404, "unknown_inspection", f"no inspection with id {inspection_id[:64]!r}")
    return row


ON_ITS_WAY_POLL_S = 0.02  # how often a request for a record still being written looks again


def _held(service: Service, inspection_id: str) -> bool:
    """Whether this service's recorder holds the record of ``inspection_id`` (buffered or being written)."""
    return service.recorder is not None and service.recorder.holds(inspection_id)


async def _on_its_way(service: Service, inspection_id: str, held: bool) -> bool:
    """Whether the record of an inspection this service answered a moment ago, not found, has been written since.

    The record is written after the answer (its batch lingers to gather others), so a client that asked for it, or
    reviewed the part, as soon as it had the answer was told there was no inspection with the id it had just been
    given. Such a request waits for its record (the writer is hurried), up to the records' timeout; a record still
    not written by then (a database that is down) is 503 ``records_unavailable``, not 404. False for an id this
    service holds no record of: it waits for nothing. ``held``: whether it held the record before the lookup that
    found none; a batch committed between that lookup and this look is no longer held, and is found by a second
    lookup (True)."""
    recorder = service.recorder
    if recorder is None or not (held or recorder.holds(inspection_id)):
        return False
    deadline = time.monotonic() + service.records_gate.deadline_s
    while recorder.holds(inspection_id):
        if time.monotonic() > deadline:
            raise ApiError(503, "records_unavailable", f"inspection {inspection_id[:64]!r} was scored and its record "
                           "is not written yet; scoring goes on, try again shortly", {"Retry-After": "5"})
        recorder.hurry()
        await asyncio.sleep(ON_ITS_WAY_POLL_S)
    return True


@router.get("/{inspection_id}", response_model=InspectionOut, dependencies=KEYED, responses=ONE)
async def get_inspection(inspection_id: IdPath, service: RecordsServiceDep) -> InspectionOut:
    """One inspection, with its latest verdict and every review (oldest first)."""
    return InspectionOut.from_record(inspection_dict(await _get(service, inspection_id), reviews=True))


@router.post("/{inspection_id}/review", response_model=InspectionOut, dependencies=KEYED,
             responses={**ONE, 422: error_doc("Invalid verdict or note, or no X-Reviewer header"),
                        409: error_doc("review_conflict: `replaces` is no longer the latest verdict (another "
                                       "review came in since); nothing was recorded")})
async def review_inspection(
        inspection_id: IdPath, body: ReviewIn, service: RecordsServiceDep,
        x_reviewer: Annotated[str, Header(description="Who reviews: recorded in the audit trail",
                                          **REVIEWER_HEADER)],
) -> InspectionOut:
    """Record an operator's verdict (`defect` or `good`). Reviews are never overwritten: a later one becomes the
    inspection's verdict and the earlier ones stay in its history. With `replaces`, a review that another one
    overtook is refused (409 `review_conflict`) instead of silently becoming the verdict. The same review sent again
    (the same verdict, reviewer and note as the latest entry: its first answer was lost) is answered as the first
    was, and nothing is written."""
    store = records_of(service)
    if body.note is not None and "\x00" in body.note:
        raise ApiError(422, "invalid_request", "note must not contain NUL characters")
    review = functools.partial(_db, service, store.review, inspection_id, body.verdict, who(x_reviewer), body.note,
                               body.replaces)
    held = _held(service, inspection_id)  # before the lookup: see _on_its_way
    try:
        try:
            row = await review()
        except KeyError:
            if not await _on_its_way(service, inspection_id, held):
                raise
            row = await review()
    except KeyError:
        raise ApiError(404, "unknown_inspection", f"no inspection with id {inspection_id[:64]!r}") from None
    except ReviewConflict as exc:
        raise ApiError(409, "review_conflict", f"another review came in since you looked: the verdict is now "
                       f"{exc.current}, not {body.replaces}; nothing was recorded") from None
    return InspectionOut.from_record(inspection_dict(row, reviews=True))


@router.post("/{inspection_id}/reviews/{review_id}/undo", response_model=InspectionOut, dependencies=KEYED,
             responses={**ONE, 404: error_doc("No inspection with this id (unknown_inspection), or no review with this "
                                              "id on it (unknown_review)"),
                        422: error_doc("The review named is itself an undo, or no X-Reviewer header"),
                        409: error_doc("review_conflict: the review is no longer the inspection's latest entry "
                                       "(another review or undo came in since); nothing was recorded")})
async def undo_review(
        inspection_id: IdPath, service: RecordsServiceDep,
        review_id: Annotated[int, Path(description="The review to withdraw: its `id` in the inspection's reviews",
                                       ge=1, le=2**31 - 1, examples=[4182])],
        x_reviewer: Annotated[str, Header(description="Who undoes: recorded in the audit trail",
                                          **REVIEWER_HEADER)],
) -> InspectionOut:
    """Undo a review (an operator's slip of the key): the verdict on record before it comes back, unreviewed when it
    was the first. The review stays in the history and the undo is added after it, naming it in `undoes`. Only
    the latest entry can be undone: once another review or undo has come in, the answer is 409 `review_conflict`
    and nothing is recorded, so an undo never takes back what another operator decided since. The same undo sent
    again (this reviewer's undo of it is the latest entry: its first answer was lost) is answered with the
    inspection as it stands."""
    store = records_of(service)
    try:
        row = await _db(service, store.undo_review, inspection_id, review_id, who(x_reviewer))
    except KeyError:
        raise ApiError(404, "unknown_inspection", f"no inspection with id {inspection_id[:64]!r}") from None
    except UnknownReview:
        raise ApiError(404, "unknown_review", f"inspection {inspection_id[:64]!r} has no review {review_id}") from None
    except UndoRefused:
        raise ApiError(422, "invalid_request", f"review {review_id} is an undo itself; to bring its verdict back, "
                       "review the part again") from None
    except ReviewConflict as exc:
        raise ApiError(409, "review_conflict", f"review {review_id} is no longer the latest on this part (another "
                       f"review or undo came in since; the verdict is now {exc.current}); nothing was undone") from None
    return InspectionOut.from_record(inspection_dict(row, reviews=True))


def _check_stored(row: Any, key: str | None, what: str) -> None:
    """The error that says why an inspection has no such file, if it has none."""
    state = row.files_state
    if state in (FILES_EXPIRED, FILES_REMOVED):
        why = "by age" if state == FILES_EXPIRED else "to keep the store under its size limit"
        raise ApiError(410, "image_expired", f"the {what} of inspection {row.id} was removed by retention ({why}); "
                       "the record stays")
    if state not in (FILES_STORED, FILES_NOT_KEPT):
        raise ApiError(404, "image_not_stored", f"the {what} of inspection {row.id} could not be stored (the data "
                       "volume was under its free-space floor, or the write failed); the record stays")
    if state == FILES_NOT_KEPT or key is None:
        raise ApiError(404, "image_not_kept", f"inspection {row.id} kept no {what} (--keep-images)")


TokenQuery = Annotated[str | None, Query(max_length=64, description="The inspection's view token (in its picture "
                                                                   "URLs): opens its pictures without X-API-Key")]


async def _picture_row(service: Service, inspection_id: str, token: str | None, key: str | None) -> Any:
    """The inspection, if the request may see its pictures: the API key, or this inspection's view token.

    A wrong token and an unknown id answer alike (401), so tokens cannot be used to probe which ids exist."""
    if key_allows(service, key):
        return await _get(service, inspection_id)
    if token:
        try:
            row = await _get(service, inspection_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            row = None
        if row is not None and row.view_token and secrets.compare_digest(row.view_token.encode(), token.encode()):
            return row
    raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header (or view token)")


async def _read(service: Service, row: Any, key: str | None, what: str) -> bytes:
    _check_stored(row, key, what)
    data = await service.pictures_gate.call(service.records.files.read, key)  # type: ignore[union-attr]
    if data is None:
        raise ApiError(410, "image_missing", f"the {what} of inspection {row.id} is no longer in the file store "
                       "(removed outside this service)")
    return data


def drawn_etag(kind: str, limits: Any, *keys: str | None) -> str:
    """The validator of a picture drawn from stored files: what the bytes are made of. The files are
    content-addressed; the limits are how the served model reads them (its bit depths set the white of a 16-bit
    grey or colour photo, its reading of a transparency key whether the keyed pixels are black, of a colour profile
    whether the colours are converted, max_pixels whether
    it decodes at all); the release is the drawing code. A re-fit that reads photos as before keeps every browser's
    copy; one that reads them otherwise changes the tag, and the next request draws anew (a re-fit to another
    colour depth kept the tag, and a browser its copy drawn with the old white)."""
    how = (f"{kind}|{__version__}|{THUMBNAIL_SIDE}|{limits.bit_depth}|{limits.colour_bit_depth}|"
           f"{limits.transparency_keys}|{limits.colour_profiles}|{limits.max_pixels}|{limits.max_bytes}|"
           f"{limits.min_side}|{','.join(sorted(limits.formats or ()))}|{'|'.join(k or '' for k in keys)}")
    return f'"{hashlib.sha256(how.encode()).hexdigest()[:32]}"'


def not_modified(request: Request, etag: str) -> Response | None:
    """304 when the client's copy is the picture this request would draw (If-None-Match names its tag)."""
    asked = request.headers.get("if-none-match")
    if asked is None:
        return None
    tags = {t.strip().removeprefix("W/") for t in asked.split(",")}
    return Response(status_code=304, headers={**DRAWN, "ETag": etag}) if etag in tags or "*" in tags else None


@router.get("/{inspection_id}/image", response_class=Response, responses={
    **PICTURE, 200: {"content": {"image/*": {}}, "description": "The photo as uploaded"}})
async def inspection_image(inspection_id: IdPath, service: RecordsServiceDep, key: ApiKeyDep,
                           token: TokenQuery = None) -> Response:
    """The photo exactly as it was uploaded (its SHA-256 is the record's `image_sha256`)."""
    row = await _picture_row(service, inspection_id, token, key)
    data = await _read(service, row, row.image_file, "photo")
    ext = row.image_file.rsplit(".", 1)[-1]
    return Response(data, media_type=MEDIA_TYPES.get(ext, "application/octet-stream"), headers=IMMUTABLE)


@router.get("/{inspection_id}/display", response_class=Response, responses={
    **PICTURE, 200: {"content": {"image/*": {}}, "description": "The photo as the model reads it, for a browser"}})
async def inspection_display(inspection_id: IdPath, request: Request, service: ServiceDep, key: ApiKeyDep,
                             token: TokenQuery = None) -> Response:
    """The photo for a page to show: the uploaded bytes where a browser shows them as the model reads them, else a
    PNG drawn as the model reads the photo (a 16-bit grey photo against its model's white, a TIFF or PPM). `/image`
    keeps the upload's own bytes. Its ETag changes when the served model reads photos otherwise (a re-fit to
    another bit depth): a browser revalidates it (304) rather than keep the old drawing for good."""
    row = await _picture_row(service, inspection_id, token, key)
    _check_stored(row, row.image_file, "photo")
    limits = service.limits_for(row.model)
    headers = {**DRAWN, "ETag": drawn_etag("display", limits, row.image_file)}
    if (same := not_modified(request, headers["ETag"])) is not None:
        return same
    photo = await _read(service, row, row.image_file, "photo")
    png = None
    if needs_drawing(photo):
        async with service.picture_slot():  # decoded at full size, as an overlay is: one at a time, beside scoring
            png = await service.cpu(display_png, photo, limits, pool="picture")
    if png is None:
        ext = row.image_file.rsplit(".", 1)[-1]
        return Response(photo, media_type=MEDIA_TYPES.get(ext, "application/octet-stream"), headers=headers)
    return Response(png, media_type="image/png", headers=headers)


# A list's thumbnail: the page shows it at 56 px (112 on a dense screen); a dashboard a little larger
THUMBNAIL_SIDE = 256


@router.get("/{inspection_id}/thumbnail", response_class=Response, responses={
    **PICTURE, 200: {"content": {"image/jpeg": {}}, "description": "A small JPEG of the photo as the model reads it"},
    404: error_doc("No such inspection, its pictures were not kept (--keep-images), or the stored photo no longer "
                   "decodes under the service's limits (image_unreadable)"),
    503: error_doc("Recording is off or the database cannot answer; or stored pictures are being drawn and a few "
                   "wait already (overloaded, with Retry-After)")})
async def inspection_thumbnail(inspection_id: IdPath, request: Request, service: ServiceDep, key: ApiKeyDep,
                               token: TokenQuery = None) -> Response:
    """A JPEG of the photo as the model reads it (its bit depth, EXIF rotation, the frame it scored), its longer
    side at most 256 px: for lists of parts, where the full-size photo (5-20 MP from a line camera) would be
    downloaded and held by the browser for a 56 px picture. Drawn once, on the picture thread, and kept beside the
    photo; retention removes it with the photo. Revalidated by ETag, as `/display` is."""
    row = await _picture_row(service, inspection_id, token, key)
    _check_stored(row, row.image_file, "photo")
    files = service.records.files  # type: ignore[union-attr]
    limits = service.limits_for(row.model)
    headers = {**DRAWN, "ETag": drawn_etag("thumbnail", limits, row.image_file)}
    if (same := not_modified(request, headers["ETag"])) is not None:
        return same
    variant = thumbnail_variant(limits)
    jpeg = await service.pictures_gate.call(files.read_derived, row.image_file, variant)
    if jpeg is None:
        async with service.picture_slot():  # decoded from the full-size photo, as an overlay is
            photo = await _read(service, row, row.image_file, "photo")
            jpeg = await service.cpu(thumbnail_jpeg, photo, limits, pool="picture")
        if jpeg is None:
            raise ApiError(404, "image_unreadable", f"the photo of inspection {row.id} no longer decodes under this "
                           "service's limits (--max-pixels, --max-upload-bytes); /image has it as uploaded")
        await service.pictures_gate.call(_keep_thumbnail, service, row.image_file, variant, jpeg)
    return Response(jpeg, media_type="image/jpeg", headers=headers)


def thumbnail_variant(limits: Any) -> str:
    """The kept thumbnail's name beside its photo: a model re-fitted to another bit depth reads the photo with
    another white, so its thumbnail is another picture (a colour depth is named only where a model keeps one, so
    the thumbnails kept before it keep their names). Likewise a model that reads a transparency key's pixels as
    transparent (images.keyed; ``-trns``, after the PNG chunk): the thumbnails kept before were drawn with the
    key's colour, as the models that keep reading it so still draw them; and one that reads a colour profile's
    colours as sRGB (``-srgb``, colour_profile.py)."""
    colour = f"-colour{limits.colour_bit_depth}bit" if limits.colour_bit_depth is not None else ""
    keys = "-trns" if limits.transparency_keys else ""
    srgb = "-srgb" if limits.colour_profiles else ""
    return f"thumb{THUMBNAIL_SIDE}-{limits.bit_depth or 16}bit{colour}{keys}{srgb}.jpg"


def thumbnail_jpeg(photo: bytes, limits: Any) -> bytes | None:
    """A stored photo drawn as its model reads it, its longer side at most :data:`THUMBNAIL_SIDE`, as a JPEG; None
    when it no longer decodes under the service's limits. A JPEG is decoded at a fraction of its size."""
    from ...errors import ImageLoadError
    from ...images import decode_image
    from ...provenance import thumbnail

    try:
        image = decode_image(photo, limits, "stored photo", reduce_to=THUMBNAIL_SIDE).array
    except ImageLoadError:
        return None
    return thumbnail(image, THUMBNAIL_SIDE)


def _keep_thumbnail(service: Service, photo_key: str, variant: str, jpeg: bytes) -> None:
    """Keep a drawn thumbnail beside its photo, so the next list (another operator's, another replica's on the same
    volume) reads it instead of decoding the photo again. Not under the volume's free-space floor (the records
    need that room), and a write that fails only costs the next request a drawing."""
    files = service.records.files  # type: ignore[union-attr]
    try:
        free = files.free_bytes()
        if free is not None and free - len(jpeg) < service.settings.retention_min_free_bytes:
            return
        files.put_derived(photo_key, variant, jpeg)
    except OSError as exc:
        log.warning("records: could not keep a thumbnail beside %s (%s); it is drawn again when asked for",
                    photo_key, exc.strerror or exc)


@router.get("/{inspection_id}/heatmap.png", response_class=Response, responses=PICTURE)
async def inspection_heatmap(inspection_id: IdPath, service: RecordsServiceDep, key: ApiKeyDep,
                             token: TokenQuery = None) -> Response:
    """The heatmap as the score answer's `png` kind: turbo colors, normalized 0 to 1.5, the photo's size."""
    row = await _picture_row(service, inspection_id, token, key)
    return Response(await _read(service, row, row.heatmap_file, "heatmap"), media_type="image/png",
                    headers=IMMUTABLE)


@router.get("/{inspection_id}/overlay.png", response_class=Response, responses=PICTURE)
async def inspection_overlay(inspection_id: IdPath, request: Request, service: ServiceDep, key: ApiKeyDep,
                             token: TokenQuery = None, max_side: MaxSideQuery = None) -> Response:
    """The heatmap over the photo, drawn from the two stored files as `/score/image` draws it (the photo as the
    served model reads it: revalidated by ETag, as `/display` is); `max_side` as `/score`'s."""
    row = await _picture_row(service, inspection_id, token, key)
    _check_stored(row, row.image_file, "photo")
    _check_stored(row, row.heatmap_file, "heatmap")
    limits = service.limits_for(row.model)
    kind = "overlay" if max_side is None else f"overlay/{max_side}"
    headers = {**DRAWN, "ETag": drawn_etag(kind, limits, row.image_file, row.heatmap_file)}
    if (same := not_modified(request, headers["ETag"])) is not None:
        return same
    async with service.picture_slot():  # drawn from the full-size photo: one at a time, beside scoring
        photo = await _read(service, row, row.image_file, "photo")
        heat = await _read(service, row, row.heatmap_file, "heatmap")
        png = await service.cpu(overlay_from_files, photo, heat, limits, max_side, pool="picture")
    return Response(png, media_type="image/png", headers=headers)


def display_png(photo: bytes, limits: Any) -> bytes | None:
    """A stored photo drawn as its model reads it (its bit depth, EXIF rotation: the regions' frame), as a PNG;
    None when it no longer decodes under the service's limits (it is then sent as it is)."""
    from ...errors import ImageLoadError
    from ...heatmap import to_png
    from ...images import load_image

    try:
        return to_png(load_image(photo, limits, "stored photo"))
    except ImageLoadError:
        return None


def overlay_from_files(photo: bytes, heatmap_png: bytes, limits: Any, max_side: int | None = None) -> bytes:
    """Overlay PNG from a stored photo and its palette heatmap: the palette index is the normalized score's place
    on the fixed color scale, so the map is recovered to within one color step and drawn exactly as before
    (``max_side``: at most that many pixels a side, as the answer's)."""
    import numpy as np

    from ...heatmap import DISPLAY_MAX
    from ...images import load_image, opened_admitted
    from ...render import overlay_png

    image = load_image(photo, limits, "stored photo")
    with opened_admitted(heatmap_png) as hm:  # a map the size of a photo past Pillow's pixel limit, within ours
        index = np.asarray(hm if hm.mode == "P" else hm.convert("L"), dtype=np.float32)
    if index.shape != image.shape[:2]:
        raise ApiError(404, "image_not_stored", "the stored heatmap does not match the stored photo")
    return overlay_png(image, (index + 0.5) * (DISPLAY_MAX / 255.0), max_side)

