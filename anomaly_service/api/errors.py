"""Every error answer of the API has one shape, ``{"error": code, "detail": text}`` (:class:`ErrorOut`).

:func:`install_error_handlers` is the one place that makes it so: our own :class:`ApiError`, the HTTP errors that
routing and body parsing raise (unknown path 404, wrong method 405, malformed multipart body 400), invalid
parameters (422), memory that ran out (503), a model whose files do not answer (503) and anything unexpected (500).
"""

import logging
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImageLoadError, out_of_memory, validation_message
from ..stuck_io import StorageStuck
from .schemas import ErrorOut

log = logging.getLogger(__name__)

# Image-decoding failures (ImageLoadError.kind) -> HTTP status: the client sent something we cannot or will not score.
STATUS_FOR_KIND = {"empty": 400, "corrupt": 400, "bad_array": 400, "missing": 400, "too_small": 422,
                   "not_image": 415, "unsupported_format": 415, "too_large": 413}

# Error codes of the HTTP errors that FastAPI and Starlette raise themselves (routing, body parsing).
CODE_FOR_STATUS = {400: "malformed_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}

# The documented error answers, for the routes' OpenAPI ``responses=``.
ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Empty, truncated or corrupt image, or a malformed multipart body"},
    401: {"model": ErrorOut, "description": "Missing or wrong X-API-Key"},
    404: {"model": ErrorOut, "description": "Unknown model"},
    413: {"model": ErrorOut, "description": "Upload or pixel count above the configured limit"},
    415: {"model": ErrorOut, "description": "Not an image, or a format that is not accepted"},
    422: {"model": ErrorOut, "description": "Image too small to score, or invalid parameters"},
    503: {"model": ErrorOut, "description": "Overloaded (pixels, upload bytes or decode backlog in flight, or the "
                                             "inference queue, are full, or the photo does not fit the memory "
                                             "free now), shutting_down (the service was stopped while this "
                                             "request ran), insufficient_memory (an allocation failed) or "
                                             "model_stuck (the model's files do not answer: a network share that "
                                             "hangs?): retry after the Retry-After header's seconds"},
    507: {"model": ErrorOut, "description": "insufficient_storage: the service's temporary directory, where uploads "
                                             "over 1 MiB are held while they arrive, is full (503 "
                                             "spool_unavailable: it failed otherwise); send it again later"},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The table's entries for ``statuses``, for a route's ``responses=``."""
    return {s: ERROR_RESPONSES[s] for s in statuses}


def error_doc(description: str) -> dict[str, Any]:
    """An error answer documented with a route's own description."""
    return {"model": ErrorOut, "description": description}


class ApiError(Exception):
    """An error answer: status, machine-readable code, a sentence for a person, and optional headers."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self) -> ErrorOut:
        return ErrorOut(error=self.code, detail=self.detail)


class CodedHTTPException(StarletteHTTPException):
    """An HTTP error with the service's own code, for the places where only an ``HTTPException`` gets through to
    the handlers (FastAPI turns anything else raised while it parses a body into a 400)."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(status, detail)
        self.code = code


def image_error(exc: ImageLoadError) -> ApiError:
    """The answer to an upload decoding refused: its status by kind, and for a file above the service's limits the
    settings that raise them (line cameras' photos meet them first; the CLI has no such settings)."""
    detail = str(exc)
    if exc.kind == "too_large":
        detail += " (the service's --max-upload-bytes and --max-pixels set its limits)"
    return ApiError(STATUS_FOR_KIND.get(exc.kind, 400), exc.kind, detail)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorOut(error=code, detail=detail).model_dump(), status_code=status, headers=headers)


# A multipart part with no file name is a text field, not a file: what curl -F 'file=<photo.png' (for @) and .NET's
# MultipartFormDataContent.Add(content, "file") without a file name send. Said for a photo, in the client's terms.
FILE_PART = ("its multipart part needs a file name (Content-Disposition: form-data; name=\"file\"; "
             "filename=\"photo.png\"), as curl -F file=@photo.png sends it")
NOT_A_FILE = "sent as a text field, not a file: " + FILE_PART


def describe_validation_errors(errors: Any, body: str = "form field") -> str:
    """Pydantic's error list as one readable line, e.g. ``query parameter heatmap: Input should be ...``.

    ``body`` names the fields of the route's body: ``form field`` for a multipart or urlencoded form, ``body field``
    for a JSON body (a rollback missing its version was told about a form field it has none of)."""
    where = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie",
             "body": body}
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())] or ["request"]
        msg = validation_message(err)
        if loc[0] == "body" and err.get("type") == "json_invalid":  # its loc's second part is a character offset
            reason = (err.get("ctx") or {}).get("error")
            parts.append(f"request body: {msg} at character {loc[1] if loc[1:] else 0}" +
                         (f" ({reason})" if reason else ""))
            continue
        if "Expected UploadFile" in msg:  # FastAPI's words for a file field that came as text
            msg = NOT_A_FILE
        if loc == ["body"]:
            place = "request body"
        else:
            place = where.get(loc[0], loc[0]) + (" " + ".".join(loc[1:]) if loc[1:] else "")
        parts.append(f"{place}: {msg}")
    return "; ".join(parts) or "invalid request"


def body_place(request: Request) -> str:
    """What the matched route's body fields are: ``form field`` (declared with Form or File) or ``body field``
    (a JSON body)."""
    field = getattr(request.scope.get("route"), "body_field", None)
    return "form field" if field is None or isinstance(field.field_info, params.Form) else "body field"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


AS_A_FORM = "the form, the photo with it, comes as multipart/form-data, as curl -F file=@photo.png sends it"


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = exc.code if isinstance(exc, CodedHTTPException) else CODE_FOR_STATUS.get(exc.status_code, "http_error")
    detail = str(exc.detail)
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if exc.status_code == 400 and code == "malformed_request" and kind == "application/x-www-form-urlencoded" \
            and request.scope.get("route") is not None and body_place(request) == "form field":
        # curl --data-binary @photo.png declares the photo a url-encoded form: its '&' are "too many fields"
        detail += f" (this request's body is {kind}, as curl --data-binary sends a file: {AS_A_FORM})"
    return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    place = body_place(request)
    detail = describe_validation_errors(exc.errors(), place)
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    missing = any(e.get("type") == "missing" and tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())
    if place == "form field" and missing and kind != "multipart/form-data":
        # a photo posted as the raw body (curl --data-binary, a camera's HTTP push) reads as a form without its file
        empty = not kind and request.headers.get("content-length", "0") == "0"
        got = "this request has no body" if empty else f"this request's body is {kind or 'of no declared type'}"
        detail += f" ({got}: {AS_A_FORM})"
    elif place == "body field" and kind not in ("application/json", "") and not kind.endswith("+json") and any(
            tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors()):
        # JSON sent as text (.NET's StringContent, curl --data without -H): it is read as no object at all
        detail += f" (this request's body is {kind}: send the JSON object with Content-Type: application/json)"
    elif place == "form field" and missing and hasattr(exc.body, "multi_items"):
        # a photo in a field of another name (file on /score/batch, photo, image): say where it went
        sent = sorted({k for k, v in exc.body.multi_items() if not isinstance(v, str)})
        wanted = sorted({str(e["loc"][1]) for e in exc.errors() if e.get("type") == "missing" and len(e["loc"]) > 1})
        if sent and wanted:
            detail += (f" (this form sends its file(s) in {', '.join(sent)}, not {', '.join(wanted)}: /score takes "
                       "one photo in the field file, /score/batch several in files)")
    return error_response(422, "invalid_request", detail)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises the exception after this answer, so the server log keeps the traceback.
    if isinstance(exc, RuntimeError) and out_of_memory(exc):
        # torch's CPU allocator says its refusal as a RuntimeError: a tiled photo's tiles that found no memory
        # answered 500, where numpy's refusal is a 503 the client retries
        return await _out_of_memory(request, exc)
    return error_response(500, "internal_error", "the service failed unexpectedly; the server log has the details")


async def _out_of_memory(request: Request, exc: Exception) -> JSONResponse:
    """A request whose memory ran out (``ulimit -v``, an allocator's refusal) failed, not the service: the next one
    may fit, so it is a 503 that says why, not a 500."""
    log.error("out of memory in %s %s: the request failed and the service goes on; lower --max-pixels-in-flight "
              "or give the service more memory (docs/service.md, The memory bound)", request.method,
              request.url.path, exc_info=exc)
    return error_response(503, "insufficient_memory", "the service ran out of memory for this request (the "
                          "machine's or its memory limit); send it again later, or a smaller photo",
                          {"Retry-After": "1"})


# seconds a client of a stuck model is asked to wait: about a re-scan's interval, by when its files may answer
STUCK_RETRY_AFTER = 10


async def _stuck(request: Request, exc: StorageStuck) -> JSONResponse:
    """A request for a model whose files have not answered within --load-timeout: the model is there and is served
    once they answer, so 503 with the model and since when, not 404 and not a wait with no end."""
    return error_response(503, "model_stuck", f"{exc}; {exc.outlook}",
                          {"Retry-After": str(STUCK_RETRY_AFTER)})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]  (Starlette types the base class)
    # Starlette's HTTPException is the base of FastAPI's: routing (404, 405) and multipart parsing (400) raise
    # Starlette's own, FastAPI's code raises the subclass; one handler answers both.
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(MemoryError, _out_of_memory)  # type: ignore[arg-type]
    app.add_exception_handler(StorageStuck, _stuck)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
