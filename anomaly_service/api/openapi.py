"""The OpenAPI document as client generators read it: what FastAPI writes, with the uploads and pictures typed.

FastAPI describes an upload as ``{"type": "string", "contentMediaType": "application/octet-stream"}``, the
OpenAPI 3.1 spelling, which generators that key on ``format: binary`` (openapi-python-client, openapi-generator)
read as a plain text field: their client sent the photo as a text part without a file name, and every score was
a 400. A picture answer was ``image/png: {}``, with no schema at all. Both now also carry ``format: binary``.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

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


def describe(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI document with :func:`typed_uploads` applied (FastAPI keeps the document it built, and
    builds it again when routes change; the additions are idempotent)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        return typed_uploads(build())

    app.openapi = openapi  # type: ignore[method-assign]
