"""The OpenAPI document as client generators read it: what FastAPI writes, with the uploads and pictures typed.

FastAPI describes an upload as ``{"type": "string", "contentMediaType": "application/octet-stream"}``, the
OpenAPI 3.1 spelling, which generators that key on ``format: binary`` (openapi-python-client, openapi-generator)
read as a plain text field: their client sent the photo as a text part without a file name, and every score was
a 400. A picture answer was ``image/png: {}``, with no schema at all. Both now also carry ``format: binary``.

Every operation also names the ``X-Request-ID`` header it takes and every answer carries (request_id.py), so that
a generated client has it as an argument, and the error answers any request can get whatever its route
(:data:`ANY_ROUTE`): a generated client raised ``UnexpectedStatus`` on, or could not parse, a ``503 overloaded``
from the connection gate on ``GET /models`` or a ``408`` on a review, which the operation did not list.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

from .request_id import HEADER, MAX_LENGTH
from .server import UNGATED_PATHS

BINARY = {"type": "string", "format": "binary"}


def typed_uploads(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``format: binary`` on every upload field and a binary schema on every picture answer."""
    for schema in spec.get("components", {}).get("schemas", {}).values():
        for prop in schema.get("properties", {}).values():
            for node in (prop, prop.get("items", {})):
                if node.get("contentMediaType") == "application/octet-stream":
                    node["format"] = "binary"
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            for answer in operation.get("responses", {}).values():
                for media_type, content in answer.get("content", {}).items():
                    if media_type.startswith("image/") and not content.get("schema"):
                        content["schema"] = dict(BINARY)
    return spec


REQUEST_ID_SCHEMA = {"type": "string", "pattern": f"^[!-~]{{1,{MAX_LENGTH}}}$"}
REQUEST_ID_DOC = ("The client's id of this request, for its logs and the service's to share: printable ASCII without "
                  f"spaces, at most {MAX_LENGTH} characters (400 invalid_request_id otherwise). Without it the "
                  "service makes one")


def request_ids(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the ``X-Request-ID`` header on every operation and every answer."""
    components = spec.setdefault("components", {})
    components.setdefault("headers", {})["RequestId"] = {
        "description": "The request's X-Request-ID: the client's own, or the one the service made",
        "schema": REQUEST_ID_SCHEMA}
    parameter = {"name": HEADER, "in": "header", "required": False, "description": REQUEST_ID_DOC,
                 "schema": REQUEST_ID_SCHEMA}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            parameters = operation.setdefault("parameters", [])
            if not any(p.get("name") == HEADER for p in parameters):
                parameters.append(parameter)
            for answer in operation.get("responses", {}).values():
                answer.setdefault("headers", {})[HEADER] = {"$ref": "#/components/headers/RequestId"}
    return spec


ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
# answers a request can get before or beside its route: (status, description, which operations)
ANY_ROUTE = [
    ("400", "invalid_request_id (a malformed X-Request-ID), invalid_host (a Host --allowed-hosts does not list)",
     "all"),
    ("408", "request_timeout: the request body paused for more than --timeout-body seconds", "body"),
    ("500", "internal_error: a fault of the service; the server log has the details", "all"),
    ("503", "overloaded: --limit-concurrency requests are in progress (Retry-After), or shutting_down: the "
            "service was stopped while this request ran; send it again", "gated"),
]
RETRY_AFTER = {"description": "Seconds to wait before sending it again (overloaded, shutting_down, "
                              "records_unavailable)", "schema": {"type": "integer"}}


def any_route_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with :data:`ANY_ROUTE`'s answers on every operation that can get them and does not list them yet
    (a route's own description of a status stays)."""
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            if method == "head":
                continue
            answers = operation.setdefault("responses", {})
            for status, description, which in ANY_ROUTE:
                if (which == "body" and "requestBody" not in operation) or (which == "gated" and path in UNGATED_PATHS):
                    continue
                answers.setdefault(status, {"description": description, "content": ERROR_BODY})
            if "503" in answers and path != "/readyz":  # readiness's 503 is a state to poll, not a refusal
                answers["503"].setdefault("headers", {})["Retry-After"] = RETRY_AFTER
    return spec


def describe(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI document with :func:`typed_uploads`, :func:`any_route_errors` and
    :func:`request_ids` applied (FastAPI keeps the document it built, and builds it again when routes change; the
    additions are idempotent)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        return request_ids(any_route_errors(typed_uploads(build())))

    app.openapi = openapi  # type: ignore[method-assign]
