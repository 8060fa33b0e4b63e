"""Scoring: ``/score`` (JSON, or the overlay PNG by Accept header), ``/score/image`` (the PNG) and ``/score/batch``.
A single image's answer names its record in ``X-Inspection-Id`` whatever its format; a batch's names each in its
items."""

import asyncio
import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response

from ..clients import ClientWatch
from ..deps import MaxSideQuery, ModelEntryDep, PartContextDep, ServiceDep, blank_is, require_api_key
from ..errors import ApiError, error_responses
from ..lifecycle import Scored
from ..multipart import WholeMultipartRoute
from ..pictures import needs_drawing
from ..schemas import DECISION_HEADERS, INSPECTION_HEADER, BatchItemOut, BatchOut, HeatmapKind, PhotoOut, ScoreOut

router = APIRouter(tags=["scoring"], dependencies=[Depends(require_api_key)],
                   route_class=WholeMultipartRoute)  # a body cut off is 400, not a missing field

HeatmapQuery = Annotated[HeatmapKind, blank_is("none"),
                         Query(description="none | png (color map, input size) | overlay (on the input) | array "
                                           "(base64 float16, longer side <= array_max_side)")]
PhotoQuery = Annotated[bool, blank_is(False),
                       Query(description="Also answer `photo`: the photo as the model read it, where a browser would "
                                         "show the upload otherwise (16-bit grey, TIFF, PPM)")]
SCORE_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 503, 507)


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


# the OpenAPI description of the answers' headers
INSPECTION_HEADER_DOC = {INSPECTION_HEADER: _header(
    "The id this part is recorded under (GET /inspections/{id}; written a moment after the answer), as "
    "`inspection_id` in a JSON answer. Absent when nothing is recorded: --record false, recording unavailable, or "
    "its record dropped (a full buffer)")}
DECISION_HEADER_DOCS = dict(zip(DECISION_HEADERS, map(_header, [
    "`score`, in kNN distance units", "`normalized_score`: 1.0 is the threshold", "`anomaly` or `normal`",
    "`threshold`, in the units of `score`", "The model's name", "The model's version (`model_version`)"])))


def picture_response(scored: Scored) -> Response:
    """The overlay PNG with the score and decision in ``X-Anomaly-*`` headers (schemas.DECISION_HEADERS), and its
    record's id in ``X-Inspection-Id``: a picture has no field to carry them."""
    out = scored.out
    headers = {"X-Anomaly-Score": f"{out.score:.6g}", "X-Anomaly-Normalized-Score": f"{out.normalized_score:.6g}",
               "X-Anomaly-Decision": scored.verdict.decision, "X-Anomaly-Threshold": f"{out.threshold:.6g}",
               "X-Anomaly-Model": out.model, "X-Anomaly-Model-Version": out.model_version, **record_header(scored)}
    return Response(scored.verdict.heatmaps["overlay"].data, media_type="image/png", headers=headers)


def record_header(scored: Scored) -> dict[str, str]:
    """``X-Inspection-Id`` when the answer's part is recorded: on every format of a single image's answer, so a
    client that reads the picture, or only headers, finds the record an operator reviews."""
    rid = scored.out.inspection_id
    return {INSPECTION_HEADER: rid} if rid else {}


async def remember(service: ServiceDep, scored: Scored, upload: UploadFile, context: PartContextDep) -> None:
    """Hand the answered image to the recorder. Scoring let go of the bytes after decoding; the upload is still
    open until the answer, so they are read back from it (in memory, or its spool file for large ones). The answer
    names the record's id: a client (the page's live view among them) knows its own part among the recorded ones."""
    if service.recorder is not None:
        await upload.seek(0)
        scored.out.inspection_id = service.record(scored, await upload.read(), context)
    else:
        service.record_lost()


async def one_file(request: Request) -> None:
    """422 for a form with several files in ``file``: the route scores one, so the last one was answered and
    recorded and the others dropped without a word, each an unjudged part. (FastAPI has parsed the form already:
    ``form()`` returns it.)"""
    sent = len((await request.form()).getlist("file"))
    if sent > 1:
        raise ApiError(422, "invalid_request", f"{sent} files in the form field file: this route scores one; send "
                       "several to /score/batch, in the form field files")


async def add_photo(service: ServiceDep, scored: Scored, upload: UploadFile) -> None:
    """The photo as the model read it, for a page to show where the browser would draw the upload otherwise: a
    12-bit camera's photo in a 16-bit file shows near black as uploaded, a TIFF not at all."""
    from ...heatmap import to_png

    await upload.seek(0)
    if needs_drawing(await upload.read()):
        png = await service.cpu(to_png, scored.image)
        h, w = scored.image.shape[:2]
        scored.out.photo = PhotoOut(width=w, height=h, data=base64.b64encode(png).decode("ascii"))


def wants_picture(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


@router.post("/score", response_model=ScoreOut, dependencies=[Depends(one_file)],
             responses={**SCORE_ERRORS, 200: {"content": {"image/png": {}},
                                               "description": "JSON result, or the overlay PNG when "
                                                              "Accept: image/png (then `X-Anomaly-*` headers)",
                                               "headers": {**INSPECTION_HEADER_DOC, **DECISION_HEADER_DOCS}}})
async def score(file: Annotated[UploadFile, File(description="One image: PNG, JPEG, BMP, TIFF, WebP, ...")],
                request: Request, response: Response, service: ServiceDep, entry: ModelEntryDep,
                context: PartContextDep, heatmap: HeatmapQuery = "none", photo: PhotoQuery = False,
                max_side: MaxSideQuery = None) -> Any:
    """Score one image. With `Accept: image/png` the answer is the overlay picture itself, with the score and
    decision in `X-Anomaly-*` headers. Either answer names its record in `X-Inspection-Id`."""
    picture = wants_picture(request)
    async with ClientWatch(request) as client:
        scored = await service.score_upload(file, entry, heatmap, picture=picture, client=client, max_side=max_side)
    if photo and not picture:
        await add_photo(service, scored, file)
    await remember(service, scored, file, context)
    if picture:
        return picture_response(scored)
    response.headers.update(record_header(scored))
    return scored.out


@router.post("/score/image", response_class=Response, dependencies=[Depends(one_file)],
             responses={**SCORE_ERRORS, 200: {"content": {"image/png": {}},
                                               "description": "Overlay PNG; score and decision in headers",
                                               "headers": {**INSPECTION_HEADER_DOC, **DECISION_HEADER_DOCS}}})
async def score_image(file: Annotated[UploadFile, File(description="One image")], request: Request,
                      service: ServiceDep, entry: ModelEntryDep, context: PartContextDep,
                      max_side: MaxSideQuery = None) -> Response:
    """Score one image and return the heatmap overlay as a PNG (for an `<img>` or an image panel), with the score
    and decision in `X-Anomaly-*` headers and its record in `X-Inspection-Id`."""
    async with ClientWatch(request) as client:
        scored = await service.score_upload(file, entry, picture=True, client=client, max_side=max_side)
    await remember(service, scored, file, context)
    return picture_response(scored)


@router.post("/score/batch", response_model=BatchOut, responses=SCORE_ERRORS)
async def score_batch(files: Annotated[list[UploadFile], File(description="Several images")], request: Request,
                      response: Response, service: ServiceDep, entry: ModelEntryDep, context: PartContextDep,
                      heatmap: HeatmapQuery = "none", max_side: MaxSideQuery = None) -> BatchOut:
    """Score several images; results come in upload order, and one bad file only fails its own entry. Each file
    is admitted on its own: one that does not fit the service's capacity now gets its own 503 entry, and the
    answer then carries `Retry-After`."""
    limit = service.settings.max_batch_files
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files; the limit is {limit} per request")
    retry_after: list[int] = []

    async def one(i: int, f: UploadFile, client: ClientWatch) -> BatchItemOut:
        try:
            scored = await service.score_upload(f, entry, heatmap, client=client, max_side=max_side)
            await remember(service, scored, f, context)
            return BatchItemOut(index=i, filename=f.filename, ok=True, result=scored.out, status=200)
        except ApiError as exc:
            if "Retry-After" in exc.headers:
                retry_after.append(int(exc.headers["Retry-After"]))
            return BatchItemOut(index=i, filename=f.filename, ok=False, error=exc.body(), status=exc.status)

    async with ClientWatch(request) as client:
        results = list(await asyncio.gather(*(one(i, f, client) for i, f in enumerate(files))))
    if retry_after:
        response.headers["Retry-After"] = str(max(retry_after))
    return BatchOut(results=results)
