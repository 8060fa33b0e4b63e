"""Models: list them, show one with its manifest and its training images' evidence (thumbnails, the image map),
reload them from disk; update them with good images, list their versions and roll back."""

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ... import model_history
from ...artifact import DEFAULT_KEEP_VERSIONS
from ...decision import DECISIONS
from ...drift import compression_said
from ...errors import (AlreadyCurrentError, AnomalyError, ImageLoadError, ModelSaveError, UpdateRefusedError,
                       UpdateUnavailableError, VersionConflictError)
from ...evidence import map_parent
from ...images import load_image
from ...preprocessing import PIXELS_SAID
from ..cursors import HISTORY, decode_cursor, encode_cursor, invalid_cursor
from ..deps import (Author, NamedModelDep, ServiceDep, directory_stuck_since, records_of, require_api_key,
                    stuck_since, upload_name, who)
from ..errors import ApiError, error_doc, error_responses, image_error
from ..multipart import WholeMultipartRoute
from ..schemas import (DriftOut, EmbeddingOut, ExtendsOut, ModelOut, ModelsOut, ModelSummary, ReloadOut,
                       TrainingPointOut)

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)],
                   route_class=WholeMultipartRoute)  # a body cut off is 400, not a missing field


@router.get("/models", response_model=ModelsOut, responses=error_responses(401))
async def list_models(service: ServiceDep) -> ModelsOut:
    """Loaded models, the default, models on disk that failed to load (with why), and those whose files do not
    answer (stuck, since when), and since when the model directory itself does not (its models serve on)."""
    return ModelsOut(models=[ModelSummary(**e.summary()) for e in service.model_entries()],
                     default=service.settings.default_model, errors=service.registry.errors(),
                     stuck=stuck_since(service), directory_stuck=directory_stuck_since(service))


@router.get("/models/{name}", response_model=ModelOut,
            responses={**error_responses(401, 404), 422: error_doc("Invalid parameters")})
async def get_model(entry: NamedModelDep) -> ModelOut:
    """The model's summary and its full manifest (configuration, calibration, training provenance)."""
    return ModelOut(summary=ModelSummary(**entry.summary()), manifest=entry.manifest())


@router.get("/models/{name}/drift", response_model=DriftOut,
            responses={**error_responses(401, 404), 422: error_doc("Invalid parameters")})
async def get_drift(entry: NamedModelDep, service: ServiceDep) -> DriftOut:
    """Drift on the line: this model's recent parts (normalized scores and typical patch distances) tested against
    its calibration images. Also exported as ``anomaly_drift{model}`` and ``anomaly_drift_alarm{model}``."""
    status = await run_in_threadpool(service.drift_status, entry)
    if status is None:
        raise ApiError(404, "no_drift_reference", f"model {entry.name!r} has too few calibration images to compare "
                       "parts with; re-fit it with more normal images")
    body = status.to_dict()
    body["window_median"] = {k: (None if v != v else v) for k, v in body["window_median"].items()}  # NaN -> null
    return DriftOut(model=entry.name, **body, compression=compression_said(status))


# ------------------------------------------------------------------------------------------ training evidence
IMMUTABLE = "private, max-age=31536000, immutable"


@router.get("/models/{name}/training-images/{index}/thumbnail", response_class=Response,
            responses={**error_responses(401),
                       200: {"content": {"image/jpeg": {}}, "description": "The training image's thumbnail"},
                       404: error_doc("Unknown model (unknown_model); a model saved before training images were "
                                      "kept (no_evidence); no such training image, or no longer that image "
                                      "(unknown_training_image)"),
                       422: error_doc("Invalid parameters")})
async def training_thumbnail(entry: NamedModelDep, index: int, request: Request,
                             sha256: Annotated[str | None, Query(
                                 description="The image's digest, as in `nearest_normal.sha256`: the answer is "
                                             "then cacheable for good, and 404 if the model (re-fitted or rolled "
                                             "back) no longer holds that image at this index")] = None) -> Response:
    """A training image's thumbnail (JPEG, longer side at most 256 px): the picture behind a region's
    `nearest_normal`, the closest good region seen in training."""
    catalog = entry.model.catalog_
    if catalog is None:
        raise ApiError(404, "no_evidence", f"model {entry.name!r} was saved before training images were kept; "
                                           "re-fit it with this release to see evidence")
    # a URL with the digest is one the service gave out (a region's evidence, kept in the part's record): past
    # the catalog's end it names an image an update added that a rollback or a re-fit took away since
    gone = (f"model {entry.name!r} no longer holds the training image this URL names (the model was re-fitted or "
            "rolled back since the part was scored); score the part again for current evidence")
    if not 0 <= index < len(catalog):
        raise ApiError(404, "unknown_training_image", gone if sha256 is not None and index >= 0 else
                       f"model {entry.name!r} holds training images 0 to {len(catalog) - 1}; there is no {index}")
    digest = catalog.digests[index]
    if sha256 is not None and sha256.lower() != digest:
        raise ApiError(404, "unknown_training_image", gone)
    headers = {"ETag": f'"{digest[:32]}"', "Cache-Control": IMMUTABLE if sha256 is not None else "private, no-cache"}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(catalog.thumbnails[index], media_type="image/jpeg", headers=headers)


@router.get("/models/{name}/embedding", response_model=EmbeddingOut,
            responses={**error_responses(401),
                       404: error_doc("Unknown model (unknown_model), or a model saved before its image map was "
                                      "kept (no_embedding)"),
                       422: error_doc("Invalid parameters")})
async def get_embedding(entry: NamedModelDep) -> EmbeddingOut:
    """Where the training images sit among each other: each one's mean patch feature projected on their two main
    directions (PCA). A score's `embedding` is the scored part in the same coordinates. An update's map says which
    version it extends: that version's map is its first points, on which a part that version scored is drawn."""
    catalog = entry.model.catalog_
    image_map = catalog.image_map if catalog is not None else None
    if catalog is None or image_map is None:
        raise ApiError(404, "no_embedding", f"model {entry.name!r} was saved before its image map was kept; re-fit "
                                            "it with this release to see where parts sit among the training images")
    parent = map_parent(entry.model)
    return EmbeddingOut(model=entry.name, model_version=entry.version_id,
                        method="PCA of each image's mean patch feature (kept dimensions) to two dimensions",
                        explained_variance=[float(v) for v in image_map.explained],
                        points=[TrainingPointOut(image=i, name=n, sha256=d, x=float(x), y=float(y))
                                for i, (n, d, (x, y)) in enumerate(zip(catalog.names, catalog.digests,
                                                                       image_map.points))],
                        extends=ExtendsOut(model_version=parent.version, points=parent.points)
                        if parent is not None else None)


@router.post("/models/reload", response_model=ReloadOut, responses=error_responses(401))
async def reload_all(service: ServiceDep) -> ReloadOut:
    """Re-scan the model directory now: load new models, reload re-fitted ones, drop deleted ones.
    Requests in flight finish on the model they started with."""
    changes = await service.refresh()
    listing = service.registry.listing_stuck()
    if listing is not None:  # the re-scan did not wait for it: 503 model_stuck naming the directory, since when
        raise listing
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


# ------------------------------------------------------------------------------------------ versions and feedback
class VersionOut(BaseModel):
    id: str = Field(description="created_at (UTC, compact) + the first 12 hex digits of the manifest's SHA-256")
    created_at: str | None = None
    current: bool = Field(description="The version being served")
    made_by: str | None = Field(None, description="fit or update")
    parent: str | None = Field(None, description="For an update: the version it updated")
    images_added: int | None = Field(None, description="A fit's training images; an update's added good images")
    patches_added: int | None = Field(None, description="A fit's bank size; the patches an update added to it")
    threshold: float | None = None
    bank_size: int | None = None
    updatable: bool | None = Field(None, description="Holds the calibration data an update needs")
    error: str | None = Field(None, description="An archived version that no longer reads")


HISTORY_SHOWN = 50  # change-log entries a versions answer carries, and a history page by default
HISTORY_PAGE_MAX = 1000  # entries one history page may ask for: each is a line of the log, a few hundred bytes


class ChangeOut(BaseModel):
    """One entry of the model's change log (model_history.py): extra fields per action are kept as written."""

    model_config = {"extra": "allow"}
    at: str = Field(description="When (UTC)")
    action: str = Field(description="fit, update or rollback")
    version: str = Field(description="The version it made current")
    previous: str | None = Field(description="The version it replaced")
    by: str | None = Field(description="Who: --by (default: the system user) or the X-Reviewer header")
    note: str | None = Field(description="Why, as they said it")
    via: str = Field(description="cli or api")


class VersionsOut(BaseModel):
    model: str
    current: str
    versions: list[VersionOut] = Field(description="Newest first")
    history: list[ChangeOut] = Field(default_factory=list, description="The model's change log, newest first (the "
                                     f"last {HISTORY_SHOWN}; GET /models/{{name}}/history pages through all)")
    history_more: bool = Field(False, description="Older changes are logged than `history` holds")
    history_cursor: str | None = Field(None, description="Where GET /models/{name}/history goes on after `history` "
                                       "(its `cursor`); null when `history` holds every change")


class HistoryOut(BaseModel):
    model: str
    items: list[ChangeOut] = Field(description="Changes, newest first: after `cursor`'s page (the newest without "
                                   "it), past `offset` of them")
    more: bool = Field(description="Older changes follow")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next, older page (null at the "
                                    "oldest): unlike `offset`, it holds while changes are logged between pages")


class DuplicateOut(BaseModel):
    name: str
    of: str


class UpdateOut(BaseModel):
    model: str
    version: str = Field(description="The new version, now served")
    previous: str | None = Field(description="The version it replaced (archived; POST .../rollback restores it)")
    images_added: int
    patches_added: int = Field(description="Patches the bank did not already cover")
    bank_size: int
    previous_bank_size: int
    threshold: float
    previous_threshold: float
    forced: bool
    defects_passing: list[str] = Field(description="Known defects below the new threshold (only when forced)")
    defects_checked: int = Field(0, description="Known defects the guard scored: the uploaded `defects` and this "
                                 "model's recorded inspections reviewed as defects whose photo is stored")
    defects_without_photo: int = Field(0, description="This model's inspections reviewed as defects that guarded "
                                       "nothing: their photo was not kept (--keep-images), retention removed it (also "
                                       "while the update ran, another replica's pass), it no longer reads, or it is "
                                       "not on this replica's picture volume")
    still_flagged: list[str] = Field(
        default_factory=list, description="Added good images the new version still flags: the update is saved, "
        "but these parts will keep being flagged (e.g. by a second opinion an update cannot teach); review them")
    warnings: list[str] = Field(
        default_factory=list, description="What scoring warns of an added good image, as `name: warning` (e.g. "
        "which frame of a file of several was read)")
    not_added: list[str] = Field(
        default_factory=list, description="Good images left out because they are unlike the photos the model was "
        "fitted on (far from their size, grey where they were in colour or the reverse, or another shape than the "
        "inspection mask's frame), as `name: why`: "
        "learning them would not teach the model those parts; re-fit on photos from the new camera instead")
    duplicates: list[DuplicateOut] = Field(
        default_factory=list, description="Good images skipped because their pixels repeat an image the model "
        "already has (or one given before them): `name` and `of`, the image it repeats")


class RollbackIn(BaseModel):
    model_config = {"extra": "forbid"}  # an unknown field is a 422, as for every body
    version: str = Field(max_length=100,  # ids are about 30 characters; a 404 repeated any length back in full
                         description="An archived version id from GET /models/{name}/versions")
    note: str | None = Field(None, max_length=model_history.MAX_NOTE,
                             description="Why: kept in the model's change log")
    replaces: str | None = Field(None, max_length=100,
                                 description="The version the caller saw served, which this rollback replaces: "
                                 "where another serves by then (the model changed meanwhile), nothing changes and "
                                 "the answer is 409 `version_conflict`, so a rollback never takes back a change it "
                                 "did not see. Null: no check")


class RefusedOut(BaseModel):
    error: str = Field(description="update_refused")
    detail: str
    images: list[str] = Field(description="The images reviewed as defects that block the update")


class FalseAlarmsOut(BaseModel):
    model: str
    version: str = Field(description="The version served: its training images say which parts it has learnt")
    to_learn: list[str] = Field(description="Inspections this model flagged that operators reviewed as actually "
                                "good, whose photo is stored and which the served version has not learnt, oldest "
                                "first: what an update with them as `inspection_ids` would teach it")
    to_learn_total: int = Field(description="How many there are to learn: `to_learn` lists them all, or the first "
                                "`limit` (past those, a photo is counted as the records say it is stored)")
    learnt: int = Field(description="Such inspections the served version has learnt (an update added them, or "
                        "skipped them as exact duplicates of photos it has, or their photo has the very bytes "
                        "of one it learnt, or the very pixels of one of its training or held-out images in any "
                        "encoding)")
    without_photo: int = Field(description="Such inspections whose photo is not here (not kept, removed by "
                               "retention, or on another replica's picture volume): no update can learn them")
    unlike: int = Field(description="Such inspections whose photo is unlike those the model was fitted on (far "
                        "from their size or the mask's shape, grey where they were colour or the reverse, red and "
                        "blue swapped, one level throughout): an update leaves them out, so none can teach it; fix "
                        "the camera, or re-fit on such photos")
    learnt_defects: list[str] = Field(description="Inspections the served version learnt as good that are "
                                      "reviewed as real defects now (reviewed again after it was taught them): it "
                                      "passes them and parts like them, and the defect guard refuses every later "
                                      "update until a rollback past the update that added them")
    names_kept: bool = Field(description="False: the served version was saved before models kept their training "
                             "images (no evidence), so which parts it learnt is unknown, and an update of it cannot "
                             "tell a part it has from a new one: none is listed in `to_learn` (every teaching "
                             "added the same parts again), `to_learn_total` counts them; re-fit it once")
    per_update: int = Field(description="The most inspection ids one update takes (--max-batch-files)")


def _keep_versions(service: Any) -> int:
    return int(getattr(service.settings, "keep_versions", DEFAULT_KEEP_VERSIONS))


def _author(service: Any, x_reviewer: str | None) -> str | None:
    """Who makes a model change: the header's name, or 422 before any work when the plant requires one
    (``--require-author``: a change log line naming nobody is a gap in its audit trail)."""
    author = who(x_reviewer)
    if author is None and getattr(service.settings, "require_author", False):
        raise ApiError(422, "author_required", "this service requires the X-Reviewer header naming who changes a "
                       "model (--require-author true); nothing was changed")
    return author


def _versions(service: Any, name: str) -> VersionsOut:
    try:
        versions = service.registry.versions(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except AnomalyError as exc:
        raise ApiError(422, "model_invalid", str(exc)) from None
    history, older = model_history.page(service.registry.model_path(name), HISTORY_SHOWN)
    return VersionsOut(model=name, current=versions[0]["id"], versions=[VersionOut(**v) for v in versions],
                       history=[ChangeOut(**c) for c in history], history_more=older is not None,
                       history_cursor=_history_cursor(service, name, older, history))


def _history_cursor(service: Any, name: str, older: int | None, changes: list[dict[str, Any]]) -> str | None:
    """A cursor for the change log's page after ``changes``, whose oldest is logged on the line at byte ``older`` of
    ``name``'s log; the model is in it, so that one model's cursor never pages through another's log, and that
    change's time and version, so that a log replaced since (the byte then in another change) is told apart."""
    if older is None:
        return None
    return encode_cursor(service, json.dumps([name, older, changes[-1]["at"], changes[-1]["version"]]), HISTORY)


def _history_from(service: Any, name: str, path: Path, cursor: str) -> int:
    """The byte of ``name``'s log (at ``path``) that ``cursor`` goes on before; 400 for a cursor not made for this
    model's log by this service, or made for a log replaced since."""
    try:
        named, older, at, version = json.loads(decode_cursor(service, cursor, HISTORY))
    except (ValueError, TypeError):  # signed, but not as this release writes them
        raise invalid_cursor() from None
    if named != name or not isinstance(older, int) or isinstance(older, bool) or older < 0:
        raise invalid_cursor()
    there = model_history.entry_at(path, older)
    if there is None or (there["at"], there["version"]) != (at, version):
        raise ApiError(400, "invalid_cursor", f"model {name}'s change log was replaced since this cursor was made (a "
                       "models backup restored, or the model fitted anew): start again without it")
    return older


@router.get("/models/{name}/versions", response_model=VersionsOut,
            responses={**error_responses(401, 404), 422: error_doc("Invalid parameters")})
async def list_versions(name: str, service: ServiceDep) -> VersionsOut:
    """The model's current version and its archived ones (the most recently archived first): what made each (a
    fit, or an update with how many images and patches it added), its threshold and bank size."""
    return await run_in_threadpool(_versions, service, name)


@router.get("/models/{name}/history", response_model=HistoryOut,
            responses={**error_responses(401, 404), 400: error_doc("invalid_cursor: a cursor changed, made by "
                                                                   "another service or for another model"),
                       422: error_doc("Invalid parameters")})
async def list_history(name: str, service: ServiceDep,
                       cursor: Annotated[str | None, Query(max_length=400, description="next_cursor of the previous "
                                                           "page (or history_cursor of the versions answer)")] = None,
                       offset: Annotated[int, Query(ge=0, description="Changes to pass over first (counted from "
                                                    "the newest, or from the cursor)")] = 0,
                       limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX)] = HISTORY_SHOWN) -> HistoryOut:
    """The model's change log (every fit, update and rollback: who, when, why), newest first, a page at a time:
    the versions answer carries only the newest, and a model a line has taught for months has many more. Page with
    `cursor`: an `offset` counts from the newest, so a change logged between two pages shows an entry twice."""
    return await run_in_threadpool(_history, service, name, cursor, offset, limit)


def _history(service: Any, name: str, cursor: str | None, offset: int, limit: int) -> HistoryOut:
    try:
        path = service.registry.model_path(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    before = _history_from(service, name, path, cursor) if cursor else None
    changes, older = model_history.page(path, limit, before=before, skip=offset)
    return HistoryOut(model=name, items=[ChangeOut(**c) for c in changes], more=older is not None,
                      next_cursor=_history_cursor(service, name, older, changes))


@router.post("/models/{name}/rollback", response_model=VersionsOut,
             responses={**error_responses(401, 404),
                        422: error_doc("model_invalid: that version does not verify or load; update_failed: it could "
                                       "not be saved (a full model volume); author_required: no X-Reviewer where "
                                       "the service requires one"),
                        409: error_doc("already_current: that version is the one served; update_unavailable: the "
                                       "model directory cannot be written here; version_conflict: `replaces` is not "
                                       "the version served")})
async def rollback(name: str, body: RollbackIn, service: ServiceDep, x_reviewer: Author = None) -> VersionsOut:
    """Serve an archived version again (atomically; the version it replaces is archived, so this can be undone).
    Requests in flight finish on the version they started with. Who (`X-Reviewer`) and why (`note`) go to the
    model's change log."""
    author = _author(service, x_reviewer)
    try:
        await service.elsewhere(lambda: service.registry.rollback(
            name, body.version, _keep_versions(service), by=author, note=body.note, replaces=body.replaces))
    except VersionConflictError as exc:
        raise ApiError(409, "version_conflict", str(exc)) from None
    except LookupError as exc:
        raise ApiError(404, "unknown_version" if "version" in str(exc) else "unknown_model", str(exc)) from None
    except AlreadyCurrentError as exc:  # the version exists: it is the model's state that conflicts
        raise ApiError(409, "already_current", str(exc)) from None
    except UpdateUnavailableError as exc:  # e.g. a read-only model directory
        raise ApiError(409, "update_unavailable", str(exc)) from None
    except ModelSaveError as exc:  # a full model volume: the version is fine, its save is what failed, as an update's
        raise ApiError(422, "update_failed", f"{exc} (the current version keeps serving)") from None
    except AnomalyError as exc:
        raise ApiError(422, "model_invalid", f"{exc} (the current version keeps serving)") from None
    # as an update is: this replica loads the version itself, so no later re-scan here counts it as reloaded
    service.telemetry.reloads.labels(name, "rolled_back").inc()
    await service.warm([name])
    return await run_in_threadpool(_versions, service, name)


@router.get("/models/{name}/false-alarms", response_model=FalseAlarmsOut,
            responses={**error_responses(401, 404, 503), 422: error_doc("Invalid parameters")})
async def false_alarms(entry: NamedModelDep, service: ServiceDep,
                       limit: Annotated[int | None, Query(ge=1, description="List at most this many in `to_learn` "
                                                          "(the oldest; `to_learn_total` counts them all): the "
                                                          "review queue asks after every review")] = None,
                       ) -> FalseAlarmsOut:
    """The parts this model flagged that operators reviewed as actually good, and which of them its served version
    has not learnt: what the review queue offers to teach it (POST .../update with their `inspection_ids`). Learnt
    is read off the served version's training images (an update names each inspection it added), so after a
    rollback past that update the part is to learn again."""
    records, model = records_of(service), entry.model
    flagged = DECISIONS[0]
    prefix = _inspection_name("")
    learnt = {n[len(prefix):] for n in _learnt_names(model) if n.startswith(prefix)}
    names_kept = model.catalog_ is not None
    to_learn, total, n_learnt, gone, unlike = await service.records_gate.call(
        records.reviewed_unlearnt, entry.name, "good", flagged, learnt, limit if names_kept else 0,
        model.recorded_unlike, PIXELS_SAID, _learnt_pixels(model))
    learnt_defects = await service.records_gate.call(records.reviewed_among, entry.name, "defect", learnt)
    return FalseAlarmsOut(model=entry.name, version=entry.version_id, to_learn=to_learn, to_learn_total=total,
                          learnt=n_learnt, without_photo=gone, unlike=unlike, learnt_defects=learnt_defects,
                          names_kept=names_kept,
                          per_update=service.settings.max_batch_files)


def _learnt_names(model: Any) -> set[str]:
    """The names of the good photos ``model`` has learnt: its training images', and those an update skipped as exact
    duplicates of one of them (the same photo sent twice, recorded as two inspections). A skipped one, offered
    again, taught nothing: the update refused it as a duplicate at every click, and the queue offered it forever."""
    catalog = model.catalog_
    learnt = set(catalog.names) if catalog is not None else set()
    if model.manifest_ is not None:
        learnt.update(d.name for d in model.manifest_.training.duplicates)
    return learnt


def _learnt_pixels(model: Any) -> set[str]:
    """The pixel digests of the images ``model`` has (its training images', an update's added ones among them, and
    those its threshold was read from under holdout calibration): the ones an update skips as images it has. A part
    whose photo repeats one of them (the very file of the fit, or another encoding of its pixels) was offered after
    every teaching, as the names and the file digests cannot tell it."""
    held = set(model.catalog_.digests) if model.catalog_ is not None else set()
    if model.manifest_ is not None:
        held.update(h.sha256 for h in model.manifest_.training.held_out)
    return held


def _inspection_name(inspection_id: Any) -> str:
    """How an update names a recorded inspection it learns, in the model's training images and change log."""
    return f"inspection {inspection_id}"


async def _decode(service: Any, upload: UploadFile, model: str) -> bytes:
    """One uploaded image's bytes, once they decode as photos for ``model`` do; a bad one answers as scoring would.
    The update decodes them again under the model's write lock, with the depth of the version it updates (the one
    on disk may have replaced the one loaded here) and checks them against its white (bit_depth.py)."""
    data = await upload.read()
    try:
        await run_in_threadpool(load_image, data, service.limits_for(model), upload.filename or "upload")
    except ImageLoadError as exc:
        raise image_error(exc) from None
    return data


async def _records_images(service: Any, name: str, verdict: str) -> dict[str, Path]:
    records = getattr(service, "records", None)
    if records is None:
        return {}
    pairs = await service.records_gate.call(records.reviewed_images, name, verdict)
    return {str(i): Path(p) for i, p in pairs}


def _why_not_good(records: Any, name: str, ids: list[str]) -> dict[str, str]:
    """Why each of ``ids`` gives an update no good photo, in words an operator can act on: one reviewed good whose
    photo retention removed was said to be "not reviewed as good", and the operator went looking for a review."""
    from ...records.models import FILES_EXPIRED, FILES_NOT_KEPT, FILES_REMOVED, FILES_STORED

    gone = {FILES_NOT_KEPT: "its photo was not kept (--keep-images)",
            FILES_EXPIRED: "retention removed its photo", FILES_REMOVED: "retention removed its photo"}
    out = {}
    for i in ids:
        rec = records.get(i)
        if rec is None or rec.model != name:
            out[i] = f"no inspection of model {name}"
        elif rec.verdict != "good":
            out[i] = "not reviewed" if rec.verdict is None else f"reviewed as {rec.verdict}, not good"
        elif rec.files_state != FILES_STORED:
            out[i] = gone.get(rec.files_state, "its photo could not be stored")
        else:
            out[i] = "its photo is no longer on disk"
    return out


@router.post("/models/{name}/update", response_model=UpdateOut,
             responses={**error_responses(400, 401, 404, 413, 415, 507),
                        409: {"model": RefusedOut, "description": "update_refused: images reviewed as defects would "
                              "pass (listed; force overrides) or were offered as good; update_unavailable: the "
                              "model was saved before updates existed (re-fit it once)"},
                        422: error_doc("No good image given, inspection ids not reviewed as good, or no "
                                       "X-Reviewer where the service requires one")})
async def update(name: str, service: ServiceDep,
                 files: Annotated[list[UploadFile], File(description="Good images to add")] = [],  # noqa: B006
                 defects: Annotated[list[UploadFile], File(description="Images reviewed as defects: the "
                                                                       "update must keep flagging them")] = [],  # noqa: B006
                 inspection_ids: Annotated[list[str], Form(description="Recorded inspections reviewed as good "
                                                                       "(needs recording on)")] = [],  # noqa: B006
                 force: Annotated[bool, Form(description="Update even if known defects would pass")] = False,
                 note: Annotated[str | None, Form(max_length=model_history.MAX_NOTE,
                                                  description="Why: kept in the model's change log")] = None,
                 x_reviewer: Author = None,
                 ) -> UpdateOut | JSONResponse:
    """Add good images to the model's memory bank (only the patches it does not already cover), re-calibrate the
    threshold, and serve the result as a new version (the previous one is archived: POST .../rollback restores
    it). Known defects (uploaded as ``defects`` and, with recording on, every inspection reviewed as a defect)
    must still be flagged, or the update is refused with their list unless ``force``."""
    author = _author(service, x_reviewer)
    # each image is held for the whole update: a bounded number, the recorded photos that inspection_ids name too
    limit = service.settings.max_batch_files
    ids = [i.strip() for raw in inspection_ids for i in raw.split(",") if i.strip()]
    if len(files) + len(defects) + len(ids) > limit:
        raise ApiError(413, "too_many_files", f"{len(files) + len(defects)} files and {len(ids)} inspection ids; "
                       f"the limit is {limit} per request (--max-batch-files): update in several requests")
    try:
        service.registry.model_path(name)
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    names = [upload_name(f.filename, f"upload[{i}]") for i, f in enumerate(files)]  # refused before any decode
    known_names = [upload_name(f.filename, f"defect[{i}]") for i, f in enumerate(defects)]
    good: list[Any] = [await _decode(service, f, name) for f in files]
    known: list[Any] = [await _decode(service, f, name) for f in defects]
    records = getattr(service, "records", None)
    pairs, unguarded = (([], 0) if records is None else
                        await service.records_gate.call(records.reviewed_photos, name, "defect"))
    recorded_defects = {str(i): Path(p) for i, p in pairs}
    for iid, path in recorded_defects.items():
        known.append(path)
        known_names.append(_inspection_name(iid))
    if ids:
        if getattr(service, "records", None) is None:
            raise ApiError(422, "invalid_request", "inspection_ids need recording on (the service records no "
                                                   "inspections); upload the images as files instead")
        as_defect = [i for i in ids if i in recorded_defects]
        if as_defect:
            return JSONResponse(RefusedOut(error="update_refused", detail="inspections reviewed as defects are never "
                                           "added as good: " + ", ".join(as_defect),
                                           images=[_inspection_name(i) for i in as_defect]).model_dump(), 409)
        reviewed_good = await _records_images(service, name, "good")
        missing = [i for i in ids if i not in reviewed_good]
        if missing:
            why = await service.records_gate.call(_why_not_good, service.records, name, missing)
            raise ApiError(422, "not_reviewed_good", "these inspections cannot be added as good: "
                                                     + "; ".join(f"{i} ({why[i]})" for i in missing))
        for i in ids:
            good.append(reviewed_good[i])
            names.append(_inspection_name(i))
    if not good:
        raise ApiError(422, "invalid_request", "no good image given: upload files or name inspection_ids")
    try:
        entry, report = await service.elsewhere(
            lambda: service.registry.update(name, good, known, names=names, defect_names=known_names, force=force,
                                            keep_versions=_keep_versions(service), note=note,
                                            by=author))
    except LookupError as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except UpdateRefusedError as exc:
        return JSONResponse(RefusedOut(error="update_refused", detail=str(exc), images=exc.images).model_dump(), 409)
    except UpdateUnavailableError as exc:
        raise ApiError(409, "update_unavailable", str(exc)) from None
    except AnomalyError as exc:
        raise ApiError(422, "update_failed", str(exc)) from None
    service.telemetry.reloads.labels(name, "updated").inc()
    await service.warm([name])
    # the uploads were decoded above: a known defect the guard could not read is a recorded photo gone since it was
    # listed (another replica's retention pass), and it guarded nothing
    return UpdateOut(**report, defects_without_photo=unguarded + len(known) - report["defects_checked"])
