"""Route dependencies as typed ``Annotated`` aliases: the service, the API key check, the model a request names.

Everything is read from the app the request arrived at (``request.app.state.service``), so routes hold no state
of their own and several apps can live in one process.
"""

import re
import secrets
import unicodedata
from typing import Annotated, Any

from fastapi import Depends, Form, Header, Query, Request
from fastapi.security import APIKeyHeader
from pydantic import BeforeValidator, Field

from ..records.recorder import PartContext
from ..render import MAX_PICTURE_SIDE, MIN_PICTURE_SIDE
from ..registry import ModelEntry
from ..stuck_io import wall_text
from .clients import ClientGone, ClientWatch
from .errors import ApiError
from .lifecycle import Service

# (No ``from __future__ import annotations`` here or in the routes: FastAPI reads these annotations at run time.)


async def get_service(request: Request) -> Service:
    """The service, once its start-up loading has ended: a request for a model arriving while ``anomaly serve``
    still loads them waits for it instead of hearing that the model is unknown."""
    service: Service = request.app.state.service
    if service.load_in_background and service.loading is not None:  # an app driven in-process has loaded
        # a client that gives up on the wait (its timeout, a retry) must not hold its place in the concurrency
        # limit until the loading ends, or for ever where a hung save holds the loading: its place is given back
        async with ClientWatch(request) as client:
            try:
                await client.race(service.until_loaded())
            except ClientGone:
                raise ApiError(499, "client_closed_request", "the client closed the connection while the models "
                               "loaded at start-up") from None
    return service


async def get_service_now(request: Request) -> Service:
    """The service as it is, loading or not: for what needs no model and must not wait for them (the probes, the
    metrics, the API key check, the records)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
ProbedServiceDep = Annotated[Service, Depends(get_service_now)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed when the server has an API key")


ApiKeyDep = Annotated[str | None, Depends(api_key_header)]


def key_allows(service: Service, key: str | None) -> bool:
    """Whether a request with X-API-Key ``key`` may see what the key guards: the server has no API key, or ``key``
    matches it (compared in constant time). The one rule of the routes that must answer without the key too."""
    configured = service.settings.api_key
    expected = configured.get_secret_value() if configured else None
    return not expected or bool(key and secrets.compare_digest(key.encode(), expected.encode()))


async def require_api_key(service: ProbedServiceDep, key: ApiKeyDep) -> None:
    """401 unless the server has no API key or the request's X-API-Key matches it (compared in constant time).

    Routers that need it say ``dependencies=[Depends(require_api_key)]``."""
    if not key_allows(service, key):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


def stuck_since(service: Service) -> dict[str, str]:
    """The models whose files have not answered within --load-timeout, with since when (UTC), for /readyz and
    /models: said apart from ``errors`` so that a controller need not parse the reason."""
    return {name: wall_text(exc.since) for name, exc in sorted(service.registry.stuck().items())}


def directory_stuck_since(service: Service) -> str | None:
    """Since when (UTC) the model directory's own listing has not answered within --load-timeout, or None: a replica
    serving its loaded models from memory over a hung directory is ready, and said this way, not only in its log."""
    listing = service.registry.listing_stuck()
    return None if listing is None else wall_text(listing.since)


def lookup_model(service: Service, name: str | None) -> ModelEntry:
    try:
        return service.model_entry(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None


def records_of(service: Service) -> Any:
    """The service's records store, or the 503 that says why there is none (off, or it could not start)."""
    if service.records is None:
        if service.recording_problem is not None:
            raise ApiError(503, "records_unavailable", f"recording could not start ({service.recording_problem}); "
                           "scoring goes on without records: fix --data-dir or --database-url and restart")
        raise ApiError(503, "recording_off", "this service does not record inspections (--record false)")
    return service.records


def blank_is(default: Any) -> BeforeValidator:
    """A query parameter's empty value (``heatmap=``, ``decision=``) read as not given, as an empty ``model=`` is:
    dashboards and scripts send a variable left empty ("All") so, and got 422 for an option they did not set."""
    return BeforeValidator(lambda value: default if value == "" else value)


# a screen shows a line camera's photo a few hundred pixels wide: its overlay drawn at full size took seconds
# the range on the number alone: on the whole, a blank value (None by then) was compared with it, a 500
MaxSideQuery = Annotated[Annotated[int, Field(ge=MIN_PICTURE_SIDE, le=MAX_PICTURE_SIDE)] | None, blank_is(None),
                         Query(description="Draw the png and overlay heatmaps (and the overlay picture) at most this "
                                           "many pixels a side, scaled down with the photo's aspect, never up; their "
                                           "`shape` then says [rows, columns]. Regions stay in the photo's pixels. "
                                           "Default: the photo's own size")]
ModelQuery = Annotated[str | None, Query(description="Model name under --model-dir; optional when one model is "
                                                     "loaded or a default is set", examples=["bottle"])]


async def model_from_query(service: ServiceDep, model: ModelQuery = None) -> ModelEntry:
    return lookup_model(service, model)


async def model_from_path(service: ServiceDep, name: str) -> ModelEntry:
    return lookup_model(service, name)


ModelEntryDep = Annotated[ModelEntry, Depends(model_from_query)]  # the ``model`` query parameter; 404 unknown_model
NamedModelDep = Annotated[ModelEntry, Depends(model_from_path)]  # the ``{name}`` path parameter; 404 unknown_model


# ---------------------------------------------------------------------------------------- the part being scored
# who acts, in the X-Reviewer header: a review's reviewer, the author of a model change (one line, no controls).
# The header arrives as Latin-1, a character per byte: its length is checked in characters once decoded (who), the
# raw one only against what that many characters can take in UTF-8
REVIEWER_MAX = 200
REVIEWER_HEADER = dict(min_length=1, max_length=4 * REVIEWER_MAX, pattern=r"^[^\x00-\x1f\x7f]+$",
                       examples=["m.keller"])
Author = Annotated[str | None, Header(description="Who makes this change: recorded in the model's change log "
                                                  "(GET /models/{name}/versions, history)", **REVIEWER_HEADER)]


def header_text(value: str) -> str:
    """A header's text: HTTP hands headers over as Latin-1, but scripts, curl and MES clients send UTF-8, which
    would be stored garbled ('JÃ¼rgen') in the audit trail."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value  # genuinely Latin-1 text


# characters a font draws as blank though Unicode files them as letters or symbols
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_GLYPHS


def who(x_reviewer: str | None) -> str | None:
    """The person an ``X-Reviewer`` header names, for an audit trail: None when it is absent, 422 when it names
    nobody (spaces, zero-width or blank characters, a lone combining mark) or hides characters that print as
    something else."""
    if x_reviewer is None:
        return None
    name = header_text(x_reviewer).strip()
    if not printable(name) or any(unicodedata.category(ch) == "Cf" for ch in name) or \
            not any(_visible(ch) for ch in name):
        raise ApiError(422, "invalid_request", "X-Reviewer must name the person, in printable characters")
    if len(name) > REVIEWER_MAX:  # counted in characters: a Chinese name was refused at a third of the limit
        raise ApiError(422, "invalid_request", f"X-Reviewer must be at most {REVIEWER_MAX} characters")
    return name


META_MAX_BYTES = 4096  # serialized: a record's meta is a label, not a payload
META_MAX_KEYS = 32
META_MAX_STRING = 256
PART_FIELD_MAX = {"part_id": 200, "line": 100, "station": 100}


# control characters (C0, DEL, C1), the bidirectional overrides and isolates that make a label read as another on
# an operator's screen, the line and paragraph separators, and lone surrogates (no UTF-8 form: a 500 when stored)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")


def printable(value: str) -> bool:
    return _UNPRINTABLE.search(value) is None


# an uploaded image's file name, as an update keeps it (catalog, manifest, change log): a file system's longest name
# (NAME_MAX), so that no file a client uploads from disk is refused
FILENAME_MAX = 255


def upload_name(filename: str | None, fallback: str) -> str:
    """The name an update stores for an uploaded image: its file name, or ``fallback`` without one. 422 for one no
    file system gives a file (too long, unprintable): it would be stored as sent, in every later version."""
    if not filename:
        return fallback
    if len(filename) > FILENAME_MAX or not printable(filename):
        shown = repr(filename[:40]) + ("..." if len(filename) > 40 else "")
        raise ApiError(422, "invalid_request", f"file name {shown} must be at most {FILENAME_MAX} printable "
                       "characters: rename the file")
    return filename


def _clean_text(name: str, value: str | None, limit: int) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > limit or not printable(value):
        raise ApiError(422, "invalid_part_context", f"{name} must be at most {limit} printable characters")
    return value


def parse_meta(text: str | None) -> dict[str, object] | None:
    """The client's ``meta`` JSON: an object of at most 32 scalars or short strings, 4 KB serialized."""
    import json
    import math

    if text is None or text == "":
        return None
    if len(text.encode()) > META_MAX_BYTES * 4:
        raise ApiError(422, "invalid_meta", f"meta is larger than {META_MAX_BYTES} bytes")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(422, "invalid_meta", "meta must be a JSON object, e.g. {\"shift\": \"B\"}") from None
    if not isinstance(meta, dict):
        raise ApiError(422, "invalid_meta", "meta must be a JSON object, e.g. {\"shift\": \"B\"}")
    if len(meta) > META_MAX_KEYS:
        raise ApiError(422, "invalid_meta", f"meta has more than {META_MAX_KEYS} keys")
    for key, value in meta.items():
        _clean_meta_string(f"meta key {key[:40]!r}", key, 64)
        if isinstance(value, str):
            _clean_meta_string(f"meta[{key[:40]!r}]", value, META_MAX_STRING)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ApiError(422, "invalid_meta", f"meta[{key[:40]!r}] is not a finite number")
        elif not (value is None or isinstance(value, (bool, int, float))):
            raise ApiError(422, "invalid_meta", f"meta[{key[:40]!r}] must be a string, number, boolean or null")
    if len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()) > META_MAX_BYTES:
        raise ApiError(422, "invalid_meta", f"meta is larger than {META_MAX_BYTES} bytes serialized")
    return meta


def _clean_meta_string(name: str, value: str, limit: int) -> None:
    if len(value) > limit or not printable(value):
        raise ApiError(422, "invalid_meta", f"{name} must be at most {limit} printable characters")


_PART_DOC = "What the client says about the part, recorded with the inspection; as a query parameter or a " \
            "multipart form field"


async def part_context(
        part_id_q: Annotated[str | None, Query(alias="part_id", description="Part serial or id (up to 200 "
                                               "characters). " + _PART_DOC, examples=["SN-20931-A"])] = None,
        line_q: Annotated[str | None, Query(alias="line", description="Production line. " + _PART_DOC,
                                            examples=["line-2"])] = None,
        station_q: Annotated[str | None, Query(alias="station", description="Inspection station. " + _PART_DOC,
                                               examples=["cam-top"])] = None,
        meta_q: Annotated[str | None, Query(alias="meta", description="JSON object of scalars or short strings, "
                                            "at most 4 KB serialized. " + _PART_DOC,
                                            examples=['{"shift": "B", "lot": 1182}'])] = None,
        part_id: Annotated[str | None, Form(description="Part serial or id (form field)",
                                            examples=["SN-20931-A"])] = None,
        line: Annotated[str | None, Form(description="Production line (form field)", examples=["line-2"])] = None,
        station: Annotated[str | None, Form(description="Inspection station (form field)",
                                            examples=["cam-top"])] = None,
        meta: Annotated[str | None, Form(description="JSON object (form field), at most 4 KB",
                                         examples=['{"shift": "B"}'])] = None) -> PartContext:
    """The part context of a scoring request: form fields win over query parameters of the same name."""
    given = {"part_id": part_id or part_id_q, "line": line or line_q, "station": station or station_q}
    return PartContext(**{k: _clean_text(k, v, PART_FIELD_MAX[k]) for k, v in given.items()},
                       meta=parse_meta(meta if meta not in (None, "") else meta_q))


PartContextDep = Annotated[PartContext, Depends(part_context)]  # 422 invalid_meta / invalid_part_context
