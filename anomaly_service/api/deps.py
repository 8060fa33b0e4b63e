"""Route dependencies as typed ``Annotated`` aliases: the service, the API key check, the model a request names.

Everything is read from the app the request arrived at (``request.app.state.service``), so routes hold no state
of their own and several apps can live in one process.
"""

import secrets
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader

from ..registry import ModelEntry
from .errors import ApiError
from .lifecycle import Service

# (No ``from __future__ import annotations`` here or in the routes: FastAPI reads these annotations at run time.)


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed when the server has an API key")


async def require_api_key(service: ServiceDep, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """401 unless the server has no API key or the request's X-API-Key matches it (compared in constant time).

    Routers that need it say ``dependencies=[Depends(require_api_key)]``."""
    configured = service.settings.api_key
    expected = configured.get_secret_value() if configured else None
    if expected and not (key and secrets.compare_digest(key.encode(), expected.encode())):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


def lookup_model(service: Service, name: str | None) -> ModelEntry:
    try:
        return service.model_entry(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None


ModelQuery = Annotated[str | None, Query(description="Model name under --model-dir; optional when one model is "
                                                     "loaded or a default is set", examples=["bottle"])]


async def model_from_query(service: ServiceDep, model: ModelQuery = None) -> ModelEntry:
    return lookup_model(service, model)


async def model_from_path(service: ServiceDep, name: str) -> ModelEntry:
    return lookup_model(service, name)


ModelEntryDep = Annotated[ModelEntry, Depends(model_from_query)]  # the ``model`` query parameter; 404 unknown_model
NamedModelDep = Annotated[ModelEntry, Depends(model_from_path)]  # the ``{name}`` path parameter; 404 unknown_model
