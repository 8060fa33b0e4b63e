"""Models: list them, show one with its manifest, and reload them from disk."""

from typing import Any

from fastapi import APIRouter, Depends

from ...errors import AnomalyError
from ..deps import NamedModelDep, ServiceDep, require_api_key
from ..errors import ApiError, error_doc, error_responses
from ..schemas import ModelsOut, ModelSummary, ReloadOut

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelsOut, responses=error_responses(401))
async def list_models(service: ServiceDep) -> ModelsOut:
    """Loaded models, the default, and models on disk that failed to load (with why)."""
    return ModelsOut(models=[ModelSummary(**e.summary()) for e in service.model_entries()],
                     default=service.settings.default_model, errors=service.registry.errors())


@router.get("/models/{name}", responses={**error_responses(401, 404), 422: error_doc("Invalid parameters")})
async def get_model(entry: NamedModelDep) -> dict[str, Any]:
    """The model's summary and its full manifest (configuration, calibration, training provenance)."""
    return {"summary": entry.summary(), "manifest": entry.manifest()}


@router.post("/models/reload", response_model=ReloadOut, responses=error_responses(401))
async def reload_all(service: ServiceDep) -> ReloadOut:
    """Re-scan the model directory now: load new models, reload re-fitted ones, drop deleted ones.
    Requests in flight finish on the model they started with."""
    changes = await service.refresh()
    return ReloadOut(changes=changes, models=service.registry.names())


@router.post("/models/{name}/reload", response_model=ReloadOut,
             responses={**error_responses(401, 404),
                        422: error_doc("The model on disk does not load; the previous version keeps serving")})
async def reload_one(name: str, service: ServiceDep) -> ReloadOut:
    """Reload one model from disk (e.g. after `anomaly fit --out` replaced it)."""
    try:
        await service.reload(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except AnomalyError as exc:
        raise ApiError(422, "model_invalid", f"{exc} (the previous version, if any, keeps serving)") from None
    return ReloadOut(changes={name: "reloaded"}, models=service.registry.names())
