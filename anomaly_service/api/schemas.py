"""JSON shapes of the HTTP API (pydantic models: they validate our own output and document it at /docs).

Two scales appear in a score. ``score`` and ``threshold`` are the kNN memory bank's opinion in kNN distance
units; ``normalized_score``, ``is_anomaly``, the regions and the heatmaps are the model's decision on its
calibrated scale, where 1.0 is the threshold (with an autoencoder, the fused decision; ``scorers`` then holds each
opinion).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..decision import DECISIONS
from ..options import RUNTIME_OPTIONS
from ..records.models import UNREVIEWED, VERDICTS
from ..records.stats import BUCKETS
from ..render import HEATMAP_KINDS

if TYPE_CHECKING:
    from .. import ScoreResult
    from ..evidence import NearestNormal
    from ..registry import ModelEntry
    from ..regions import Region
    from ..render import Heatmap
    from ..render import Verdict as Rendered

HeatmapKind = Literal[("none", *HEATMAP_KINDS)]  # type: ignore[valid-type]
# A time the service writes (ISO 8601 with its offset), typed so that a generated client parses it as a datetime
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
# /readyz and GET /models both say it, in the same words
DirectoryStuck = Annotated[Timestamp | None, Field(
    description="Since when (UTC) the model directory itself (its listing) has not answered within --load-timeout "
                "(a network share that hangs?); null while it answers. The loaded models keep serving from memory (the "
                "replica stays ready with them), but no model is added, re-read or removed until it answers",
    examples=[None])]
# Headers of the picture answers (``/score/image``, ``/score`` with ``Accept: image/png``); CORS exposes them.
DECISION_HEADERS = ["X-Anomaly-Score", "X-Anomaly-Normalized-Score", "X-Anomaly-Decision", "X-Anomaly-Threshold",
                    "X-Anomaly-Model", "X-Anomaly-Model-Version"]
# On every answer of a single-image score, JSON or picture: the record it made, which a picture has no field for
# (CORS exposes it)
INSPECTION_HEADER = "X-Inspection-Id"
# The config of an answer with a ``model_version`` field: pydantic before 2.10 reserved every ``model_`` name and
# warned at each import (a service's start, every CLI command) that the field collides with that namespace
MODEL_FIELDS = ConfigDict(protected_namespaces=())


class BoxOut(BaseModel):
    x: int = Field(description="Left edge, pixels")
    y: int = Field(description="Top edge, pixels")
    width: int
    height: int


def thumbnail_url(model: str, image: int, sha256: str) -> str:
    """Where a training image's thumbnail is served. The digest makes the URL name the picture itself, so it can
    be cached for good; a re-fitted model that no longer holds that image there answers 404."""
    return f"/models/{model}/training-images/{image}/thumbnail?sha256={sha256}"


class NearestNormalOut(BaseModel):
    """The closest good region seen in training: the training image, and the place in it, whose patch was
    nearest to this region's hottest patch in the memory bank. It shows what the part was compared with."""

    image: int = Field(description="The training image's index in the model (GET /models/{name}/training-images/"
                                   "{image}/thumbnail)")
    name: str = Field(description="The training image as the fit was given it (its path or file name)")
    sha256: str = Field(description="SHA-256 of the training image's decoded pixels (the manifest's training "
                                    "provenance)")
    image_width: int = Field(description="The training image's width in pixels: `box` is in its pixels; scale "
                                         "by thumbnail width / image_width to draw it on the thumbnail")
    image_height: int
    box: BoxOut = Field(description="The nearest training patch, in the training image's pixels")
    patch: BoxOut = Field(description="This region's hottest patch, in the uploaded image's pixels")
    distance: float = Field(description="The hottest patch's kNN distance, the units of `score` (with k=1, the "
                                        "default, its distance to the training patch)")
    thumbnail_url: str | None = Field(None, description="The training image's thumbnail (JPEG, longer side at "
                                                        "most 256 px)")

    @classmethod
    def from_evidence(cls, nearest: NearestNormal | dict[str, Any], model: str) -> NearestNormalOut:
        data = nearest if isinstance(nearest, dict) else nearest.to_dict()
        return cls(**{**data, "thumbnail_url": thumbnail_url(model, data["image"], data["sha256"])})


class RegionOut(BaseModel):
    x: int = Field(description="Left edge, pixels of the uploaded image")
    y: int = Field(description="Top edge, pixels")
    width: int
    height: int
    area: int = Field(description="Pixels at or above the threshold inside the region")
    peak_score: float = Field(description="Highest normalized score in the region (1.0 = threshold)")
    peak_x: int
    peak_y: int
    nearest_normal: NearestNormalOut | None = Field(
        None, description="The closest good region seen in training: the training image and the place in it "
                          "nearest to this region's hottest patch. Null for models saved before training "
                          "provenance was kept (re-fit to get it)")

    @classmethod
    def from_region(cls, region: Region | dict[str, Any], model: str) -> RegionOut:
        """A region of an answer (or of a record) of ``model``, with its evidence's thumbnail URL."""
        data = dict(region if isinstance(region, dict) else region.to_dict())
        nearest = data.pop("nearest_normal", None)
        return cls(**data, nearest_normal=NearestNormalOut.from_evidence(nearest, model) if nearest else None)


class PhotoOut(BaseModel):
    media_type: Literal["image/png"] = "image/png"
    encoding: Literal["base64"] = "base64"
    width: int
    height: int
    data: str = Field(description="base64 of the PNG file")


class PointOut(BaseModel):
    x: float
    y: float


class TrainingPointOut(BaseModel):
    image: int = Field(description="The training image's index (as in `nearest_normal.image`)")
    name: str = Field(description="The training image as the fit was given it")
    sha256: str | None = Field(None, description="Its pixel digest (as in `nearest_normal.sha256`): its thumbnail "
                               "asked with it is this very image, or 404 where the model no longer holds it there")
    x: float
    y: float


class ExtendsOut(BaseModel):
    model_config = ConfigDict(**MODEL_FIELDS)

    model_version: str = Field(description="The version this one updated, as in a score answer")
    points: int = Field(description="How many of this map's points, from the first, are that version's map")


class EmbeddingOut(BaseModel):
    """Where the training images sit among each other; a score's `embedding` is in the same coordinates."""

    model_config = ConfigDict(**MODEL_FIELDS)

    model: str
    model_version: str = Field(description="The model's version id, as in a score answer")
    method: str = Field(description="How the points were made")
    explained_variance: list[float] = Field(description="Share of the training images' variance along x and y")
    points: list[TrainingPointOut] = Field(description="One per training image, in index order")
    extends: ExtendsOut | None = Field(
        None, description="This version is an update of `extends.model_version`, whose map is this one's first "
                          "`extends.points` points on the same axes (an update places its images on the map it "
                          "updates): a score answered by that version is drawn among them. Null for a fit")


class HeatmapOut(BaseModel):
    kind: Literal[HEATMAP_KINDS]  # type: ignore[valid-type]
    media_type: str = Field(description="image/png for png/overlay; application/octet-stream for array")
    encoding: Literal["base64"] = "base64"
    width: int = Field(description="Of the photo the heatmap covers, whatever size it is drawn at")
    height: int
    dtype: str | None = Field(None, description="array only: element type of the decoded bytes (float16)")
    byte_order: Literal["little"] | None = Field(None, description="array only")
    shape: list[int] | None = Field(None, description="array: [rows, columns] of the cells, row-major; png and "
                                                      "overlay: the picture's own [rows, columns] where max_side "
                                                      "drew it smaller than the photo (null: width x height)")
    scale: str = Field(description="What the values or colors mean")
    data: str = Field(description="base64 of the PNG file, or of the raw array bytes")

    @classmethod
    def from_heatmap(cls, heatmap: Heatmap) -> HeatmapOut:
        return cls(kind=heatmap.kind, media_type=heatmap.media_type, width=heatmap.width, height=heatmap.height,
                   dtype=heatmap.dtype, byte_order=heatmap.byte_order,
                   shape=list(heatmap.shape) if heatmap.shape is not None else None, scale=heatmap.scale,
                   data=base64.b64encode(heatmap.data).decode())


class ScorerOut(BaseModel):
    score: float
    normalized_score: float = Field(description="On this scorer's own calibrated scale (1.0 = its threshold)")
    threshold: float
    is_anomaly: bool
    reads: Literal["patches", "layout"] | None = Field(
        None, description="What this opinion looks at: `layout` for the whole-image branch (the part as a whole), "
                          "`patches` for the kNN and the feature autoencoder")


# the runtimes an answer or a record can name: the options table's, less `auto`, which resolves to one of them before
# a pass runs. Said in the field's description, not enforced as an enum: in a rolling update a later release may
# record a runtime this one does not know, and one such row must not turn a whole list into a 500
RECORDED_RUNTIMES = tuple(c for c in RUNTIME_OPTIONS["runtime"].choices or () if c != "auto")


class ScoredWithOut(BaseModel):
    """How this replica computed the answer, where the model does not fix it (the record keeps the same four)."""

    runtime: str = Field(description=f"The backbone runtime: {' or '.join(RECORDED_RUNTIMES)}", examples=["onnx"])
    knn_search: str | None = Field(description="The nearest-neighbour search, as `GET /models` words it",
                                   examples=["exact, bf16 shortlist + fp32 re-rank"])
    device: str = Field(description="cpu or cuda:N", examples=["cpu"])
    threads: int = Field(description="The intra-op threads of the pass (a share when two passes run at once): under "
                                     "the torch runtime a score moves with them in its last digits", examples=[2])


class ScoreOut(BaseModel):
    model: str
    model_version: str = Field(description="The version id of the model that scored, `<created at>-<first 12 hex "
                                           "digits of its manifest's SHA-256>`, as `GET /models/{name}/versions` "
                                           "and `anomaly versions` name it; changes with every re-fit, update and "
                                           "rollback")
    score: float = Field(description="The kNN memory bank's opinion in kNN distance units: by default the hottest "
                                     "pixel of the smoothed anomaly map. Compare it with `threshold`; the decision "
                                     "is `normalized_score` and `is_anomaly`")
    normalized_score: float = Field(description="The model's decision on its calibrated scale: 1.0 = threshold. "
                                                "With an autoencoder this is the fused decision and `scorers` holds "
                                                "each opinion")
    is_anomaly: bool = Field(description="The model's decision: `normalized_score` above 1.0 (with an autoencoder, "
                                         "the fused decision)")
    threshold: float = Field(description="The kNN memory bank's threshold in kNN distance units, the same units as "
                                         "`score`; set from held-out normal images at fit time")
    image_width: int
    image_height: int
    regions: list[RegionOut] = Field(description="Connected regions of the decision's normalized map at or above "
                                                 "1.0 (the threshold), highest peak first")
    timing_ms: dict[str, float] = Field(description="Per-stage milliseconds for this image")
    heatmap: HeatmapOut | None = None
    photo: PhotoOut | None = Field(
        None, description="With `photo=true`: the photo as the model read it, as a PNG, where a browser would show "
                          "the upload otherwise (a 16-bit grey or colour photo against its model's white, a TIFF or "
                          "PPM); null where the upload itself shows as the model read it")
    scorers: dict[str, ScorerOut] | None = Field(
        None, description="Models with an autoencoder: each scorer's own opinion (knn, autoencoder); "
                          "`normalized_score` and `is_anomaly` are then the fused decision, `score` and `threshold` "
                          "stay the kNN opinion")
    warnings: list[str] = Field(
        default_factory=list, description="Why this score may not mean what the threshold says, e.g. a photo far "
        "from the size of the training photos (a camera or resolution change), a grey photo to a model of colour "
        "ones (or the reverse), a photo of another shape than its inspection mask's frame: the decision is made "
        "all the same")
    embedding: PointOut | None = Field(
        None, description="Where this part sits among the training images: its mean patch feature projected on "
                          "the training images' two main directions (PCA), in the coordinates of GET "
                          "/models/{name}/embedding when that map's `model_version` is this answer's, or its "
                          "`extends` names this answer's version (an update loaded since: its first points are this "
                          "version's map); a re-fit or rollback loaded since answers another fit's map. Null for "
                          "models saved before the map was kept")
    inspection_id: str | None = Field(
        None, description="The id this part is recorded under (GET /inspections/{id}; written a moment after the "
                          "answer), also in the answer's X-Inspection-Id header (not in a batch's). Null when nothing "
                          "is recorded: --record false, recording unavailable, or its record dropped (a full "
                          "buffer)", examples=["0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4"])
    scored_with: ScoredWithOut | None = Field(
        None, description="How this replica computed the answer (the backbone runtime, the kNN search, the device "
                          "and the pass's threads): two replicas or runtimes may differ in a score's last digits, and "
                          "this says which gave it. The record of the part keeps the same four")

    model_config = {**MODEL_FIELDS, "json_schema_extra": {"examples": [{
        "model": "bottle", "model_version": "20250110T142233Z-3f9a1c0e5b7d", "score": 4.21, "normalized_score": 1.38,
        "is_anomaly": True, "threshold": 3.05, "image_width": 900, "image_height": 900,
        "regions": [{"x": 412, "y": 220, "width": 96, "height": 71, "area": 5120, "peak_score": 1.38,
                     "peak_x": 455, "peak_y": 251,
                     "nearest_normal": {"image": 37, "name": "train/good/037.png", "sha256": "5ddb541d" * 8,
                                        "image_width": 900, "image_height": 900,
                                        "box": {"x": 422, "y": 225, "width": 29, "height": 29},
                                        "patch": {"x": 450, "y": 246, "width": 29, "height": 29},
                                        "distance": 4.02,
                                        "thumbnail_url": "/models/bottle/training-images/37/thumbnail?sha256="
                                                         + "5ddb541d" * 8}}],
        "timing_ms": {"decode": 6.1, "queue": 1.2, "preprocess": 2.0, "backbone": 21.5, "embed": 3.0, "select": 0.1,
                      "knn": 5.2, "map": 4.0, "render": 9.8, "total": 52.9},
        "heatmap": None, "embedding": {"x": 3.4, "y": -1.2},
        "scored_with": {"runtime": "onnx", "knn_search": "exact, bf16 shortlist + fp32 re-rank", "device": "cpu",
                        "threads": 2}}]}}

    @classmethod
    def from_verdict(cls, entry: ModelEntry, result: ScoreResult, verdict: Rendered,
                     heatmap: Heatmap | None = None) -> ScoreOut:
        return cls(model=entry.name, model_version=entry.version_id, score=result.score,
                   normalized_score=result.normalized_score, is_anomaly=result.is_anomaly, threshold=result.threshold,
                   image_width=result.image_width, image_height=result.image_height,
                   regions=[RegionOut.from_region(r, entry.name) for r in verdict.regions],
                   timing_ms={k: round(v, 3) for k, v in result.timing_ms.items()},
                   heatmap=HeatmapOut.from_heatmap(heatmap) if heatmap is not None else None,
                   scorers=result.scorers or None,
                   embedding=PointOut(**verdict.embedding.to_dict()) if verdict.embedding is not None else None,
                   warnings=list(result.warnings),
                   scored_with=ScoredWithOut(**result.scored_with.to_dict()) if result.scored_with else None)


class ErrorOut(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. not_image, too_large, unknown_model")
    detail: str = Field(description="What went wrong and what to do, for a person")


class HealthOut(BaseModel):
    status: Literal["ok"] = Field(description="The process answers", examples=["ok"])


class ReadyOut(BaseModel):
    """``GET /readyz``, ready (200) or not (503): a line's controller reads why, not only the status."""

    ready: bool = Field(description="At least one model is loaded and warmed, and so is the --default-model")
    reason: str | None = Field(description="Why not ready (null when ready)", examples=[None])
    models: list[str] = Field(description="The loaded models", examples=[["bottle"]])
    errors: dict[str, str] = Field(description="Models that failed to load, with why (why only with the API key "
                                               "when the server has one)", examples=[{}])
    stuck: dict[str, str] = Field(default_factory=dict, description="Models whose files have not answered within "
                                  "--load-timeout (a network share that hangs?), with since when (UTC): not waited "
                                  "for, served once their files answer; they are in errors too",
                                  examples=[{}])
    directory_stuck: DirectoryStuck = None
    queue_depth: int = Field(description="Images waiting for inference", examples=[0])
    recording: Literal["on", "off", "unavailable", "retrying"] = Field(
        description="on; off (--record false); unavailable: asked for, but it could not start; retrying: the "
                    "records database refused the latest write, records wait in the buffer", examples=["on"])


class BatchItemOut(BaseModel):
    index: int
    filename: str | None
    ok: bool
    result: ScoreOut | None = None
    error: ErrorOut | None = None
    status: int = Field(description="HTTP status this file alone would have received")


class BatchOut(BaseModel):
    results: list[BatchItemOut]


class ModelSummary(BaseModel):
    name: str
    version: str
    created_at: str | None
    loaded_at: Timestamp
    backbone: str | None
    image_size: int | None
    bank_size: int | None
    feature_dim: int | None
    index: str | None
    threshold: float | None
    training_images: int | None
    calibration_images: int | None
    device: str
    runtime: str | None = Field(None, description="Backbone execution in use: onnx (ONNX Runtime) or torch")
    knn_search: str | None = Field(None, description="Nearest-neighbour search in use, e.g. exact bf16 shortlist")


class ModelOut(BaseModel):
    """``GET /models/{name}``: a client reads the summary's fields by name, as in ``GET /models``."""

    summary: ModelSummary
    manifest: dict[str, Any] = Field(description="The model's full manifest (docs/model-format.md): configuration, "
                                                "calibration, training provenance")


class ModelsOut(BaseModel):
    models: list[ModelSummary]
    default: str | None
    errors: dict[str, str] = Field(description="Models on disk that failed to load, with the reason")
    stuck: dict[str, str] = Field(default_factory=dict, description="Models whose files have not answered within "
                                  "--load-timeout, with since when (UTC); in errors too")
    directory_stuck: DirectoryStuck = None


class ReloadOut(BaseModel):
    changes: dict[str, str]
    models: list[str]


class DriftOut(BaseModel):
    """Whether the parts seen lately still look like the normal images the threshold was set on."""

    model: str
    drift: float = Field(description="The largest one-sided two-sample KS statistic of the window above the "
                                     "calibration images over the quantities tracked (0 = not above them, 1 = "
                                     "wholly above); 0 until min_parts parts")
    alarm: bool = Field(description="True when the test rejects 'not above calibration' (p < alpha, statistic at "
                                    "least min_effect) with at least min_parts parts in the window")
    parts: int = Field(description="Parts in the window")
    window: int
    min_parts: int
    min_effect: float = Field(description="The KS statistic the drift must also reach to alarm")
    p_values: dict[str, float] = Field(description="Per quantity: normalized_score, typical_distance (the median "
                                                   "patch distance to the bank) and feature_distance (the image's "
                                                   "pooled feature, whitened, to the training mean); a distance is "
                                                   "absent for models fitted before it was recorded")
    statistics: dict[str, float]
    window_median: dict[str, float | None]
    reference_median: dict[str, float]
    quantity_parts: dict[str, int] = Field(description="Per quantity: parts its window holds (a part with no "
                                                       "feature distance is left out of that one only); a quantity "
                                                       "with fewer than min_parts has no say in drift or alarm")
    driven_by: str | None = Field(description="The quantity that sounds the alarm: of those with at least min_parts "
                                              "parts whose test alarms, the one of the largest statistic; null "
                                              "without an alarm")
    compressed_harder: int = Field(0, description="Parts in the window that were JPEGs compressed harder than every "
                                                  "good photo the model learnt: compression alone moves the "
                                                  "quantities, so an alarm over such parts may be the line's "
                                                  "encoding, not its camera, light or parts")
    lowest_quality: int | None = Field(None, description="The lowest JPEG quality among those parts; null: none")
    fitted_quality: int | None = Field(None, description="The good photos' lowest JPEG quality (100: none was a "
                                                         "JPEG); null: unknown (fitted on arrays, or an older model)")
    compression: str | None = Field(None, description="What the compressed parts mean for the drift, in words; null "
                                                      "when there were none")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "bottle", "drift": 0.93, "alarm": True, "parts": 200, "window": 200, "min_parts": 30,
        "min_effect": 0.7,
        "p_values": {"normalized_score": 2e-6, "typical_distance": 1e-9, "feature_distance": 1e-12},
        "statistics": {"normalized_score": 0.38, "typical_distance": 0.93, "feature_distance": 0.97},
        "window_median": {"normalized_score": 0.71, "typical_distance": 3.9, "feature_distance": 9.8},
        "reference_median": {"normalized_score": 0.52, "typical_distance": 3.1, "feature_distance": 4.4},
        "quantity_parts": {"normalized_score": 200, "typical_distance": 200, "feature_distance": 200},
        "driven_by": "feature_distance", "compressed_harder": 0, "lowest_quality": None, "fitted_quality": 100,
        "compression": None}]}}


# ------------------------------------------------------------------------------------------------ inspections
Verdict = Literal[VERDICTS]  # type: ignore[valid-type]
LatestVerdict = Literal[(UNREVIEWED, *VERDICTS)]  # type: ignore[valid-type]
Decision = Literal[DECISIONS]  # type: ignore[valid-type]
Bucket = Literal[BUCKETS]  # type: ignore[valid-type]

_INSPECTION_EXAMPLE = {
    "id": "0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4", "created_at": "2025-01-14T08:31:07.412000+00:00",
    "model": "bottle", "model_version": "20250110T142233Z-3f9a1c0e5b7d", "decision": "anomaly", "score": 4.21,
    "normalized_score": 1.38, "threshold": 3.05,
    "scorers": {"knn": {"score": 4.21, "normalized_score": 1.38, "threshold": 3.05, "is_anomaly": True,
                        "reads": "patches"},
                "autoencoder": {"score": 0.09, "normalized_score": 0.71, "threshold": 0.12, "is_anomaly": False,
                                "reads": "layout"}},
    "image_width": 900, "image_height": 900, "image_bytes": 412733,
    "image_sha256": "9f2c5e0a" * 8, "pixels_sha256": "c41e07b2" * 8, "part_id": "SN-20931-A", "line": "line-2",
    "station": "cam-top",
    "meta": {"shift": "B", "lot": 1182},
    "regions": [{"x": 412, "y": 220, "width": 96, "height": 71, "area": 5120, "peak_score": 1.38, "peak_x": 455,
                 "peak_y": 251}],
    "timing_ms": {"decode": 6.1, "backbone": 21.5, "knn": 5.2, "render": 9.8, "total": 52.9}, "source": "api",
    "request_id": "MES-4711", "runtime": "onnx", "knn_search": "exact, bf16 shortlist + fp32 re-rank",
    "device": "cpu", "threads": 2, "embedding": {"x": 3.4, "y": -1.2}, "files_state": "stored",
    "files_changed_at": None, "verdict": "defect",
    "reviewed_at": "2025-01-14T09:02:55.100000+00:00",
    "image_url": "/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/image",
    "heatmap_url": "/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/heatmap.png",
    "overlay_url": "/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/overlay.png",
    "reviews": [{"id": 4182, "verdict": "defect", "undoes": None, "note": "scratch near the neck",
                 "reviewer": "m.keller", "created_at": "2025-01-14T09:02:55.100000+00:00"}]}


class ReviewIn(BaseModel):
    verdict: Verdict = Field(description="The operator's verdict on the part: defect (a real defect) or good "
                                         "(the model was wrong to flag it, or right to pass it)",
                             examples=["defect"])
    note: str | None = Field(None, max_length=2000, description="Free text for the audit trail",
                             examples=["scratch near the neck"])
    replaces: LatestVerdict | None = Field(
        None, description="The latest verdict the reviewer saw: `unreviewed` (the record's `verdict` null), `defect` "
                          "or `good`. When another review has come in since, nothing is recorded and the answer is "
                          "409 `review_conflict`: two operators on one queue never overwrite each other unseen. "
                          "Without it (or null) nothing is checked: a review is recorded as it comes",
        examples=["unreviewed"])

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"verdict": "good",
                                                                            "note": "dust on the lens",
                                                                            "replaces": "unreviewed"}]}}


class ReviewOut(BaseModel):
    id: int = Field(description="The entry's id: what an undo names", examples=[4182])
    verdict: Verdict | None = Field(description="defect or good: the verdict on record after this entry. For an "
                                                "undo, the verdict it brought back; null when the part is "
                                                "unreviewed again", examples=["defect"])
    undoes: int | None = Field(None, description="Set on an undo: the id of the review it withdrew (null for a "
                                                 "verdict)", examples=[None])
    note: str | None = Field(description="The reviewer's note", examples=["scratch near the neck"])
    reviewer: str = Field(description="Who reviewed (the X-Reviewer header)", examples=["m.keller"])
    created_at: Timestamp = Field(description="When (UTC, ISO 8601)", examples=["2025-01-14T09:02:55.100000+00:00"])


class InspectionOut(BaseModel):
    """One recorded inspection: the model's answer, the part, its stored pictures and the operators' reviews."""

    id: str = Field(description="Time-ordered id (UUIDv7)", examples=["0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4"])
    created_at: Timestamp = Field(description="When the image was scored (UTC, ISO 8601)",
                            examples=["2025-01-14T08:31:07.412000+00:00"])
    model: str = Field(description="Model name", examples=["bottle"])
    model_version: str = Field(description="The version id of the model that scored it, as `GET /models/{name}/"
                                           "versions` and `anomaly versions` name it. Records made by earlier "
                                           "releases keep what those said: the first 16 hex digits of the "
                                           "manifest's SHA-256, whose first 12 end that version's id",
                               examples=["20250110T142233Z-3f9a1c0e5b7d"])
    decision: Decision = Field(description="The model's decision", examples=["anomaly"])
    score: float = Field(description="Raw kNN score (kNN distance units)", examples=[4.21])
    normalized_score: float = Field(description="Calibrated score, 1.0 = threshold", examples=[1.38])
    threshold: float = Field(description="The kNN threshold, in the units of score", examples=[3.05])
    scorers: dict[str, ScorerOut] | None = Field(
        description="As in the score answer: each opinion of a model with a second opinion (knn, and "
                          "autoencoder: the whole-image branch or the feature autoencoder) with its own score, "
                          "normalized score, threshold, is_anomaly and what it reads, so a fused decision that "
                          "score and threshold do not explain (a part flagged for its layout) says why. Null for a "
                          "model with one opinion (score and threshold are then the decision) and for records made "
                          "before they were kept")
    image_width: int = Field(description="Pixels, as a person sees the photo", examples=[900])
    image_height: int = Field(description="Pixels", examples=[900])
    image_bytes: int = Field(description="Size of the uploaded file", examples=[412733])
    image_sha256: str = Field(description="SHA-256 of the uploaded file", examples=["9f2c5e0a" * 8])
    pixels_sha256: str | None = Field(
        None, description="SHA-256 of the photo's decoded pixels as its model read them: the digest by which a model "
                          "names its training images (`nearest_normal.sha256`, the embedding's points), so a part "
                          "whose photo a model was fitted or updated on, in any lossless encoding, is found by it. "
                          "Null where the photo was not kept and for records made before revision 0011",
        examples=["c41e07b2" * 8])
    part_id: str | None = Field(description="The client's part id", examples=["SN-20931-A"])
    line: str | None = Field(description="Production line", examples=["line-2"])
    station: str | None = Field(description="Inspection station", examples=["cam-top"])
    meta: dict[str, Any] | None = Field(description="The client's meta object", examples=[{"shift": "B"}])
    regions: list[RegionOut] = Field(description="Regions above the threshold, as in the score answer")
    timing_ms: dict[str, float] = Field(description="Per-stage milliseconds", examples=[{"total": 52.9}])
    warnings: list[str] = Field(description="The score answer's warnings, as scored: why the score may not mean "
                                            "what the threshold says (which frame of a multi-frame file was scored, "
                                            "a photo far from the training photos' size); empty for records made "
                                            "before they were kept", examples=[[]])
    source: str = Field(description="Who recorded it: api, cli (anomaly score) or rescore (anomaly score --shard, "
                        "re-scoring an archive: part_id is then the image's path in the archive)", examples=["api"])
    request_id: str | None = Field(description="The X-Request-ID of the call that scored it (the client's, or the "
                                               "one the service made and answered); null for the CLI's records and "
                                               "those made before it was kept", examples=["MES-4711"])
    runtime: str | None = Field(
        None, description="The backbone runtime that scored it, as `GET /models` says it: "
                          f"{' or '.join(RECORDED_RUNTIMES)} (onnx: ONNX Runtime, the CPU's default; torch: `--runtime "
                          "torch`, and on a GPU); null for records made before it was kept", examples=["onnx"])
    knn_search: str | None = Field(
        None, description="The nearest-neighbour search that scored it, worded as `GET /models` words it (exact with "
                          "a bf16 shortlist or in fp32, an inverted file with its lists and nprobe, on the CPU or a "
                          "GPU); null for records made before it was kept",
        examples=["exact, bf16 shortlist + fp32 re-rank"])
    device: str | None = Field(None, description="Where it was scored: cpu or cuda:N; null for records made before "
                                                 "it was kept", examples=["cpu"])
    threads: int | None = Field(
        None, description="The intra-op threads of the pass that scored it (the service gives a pass every thread "
                          "alone, a share beside another): under the torch runtime a score moves with them in its "
                          "last digits; null for records made before it was kept", examples=[2])
    embedding: PointOut | None = Field(
        None, description="Where the part sits among the training images, as the score answer's `embedding` said it: "
                          "in the coordinates of the image map of this record's `model_version`. Draw it on GET "
                          "/models/{name}/embedding only when that map's `model_version` is this record's, or its "
                          "`extends` names this record's version (an update since: its first points are this "
                          "version's map); after a re-fit or a rollback the served map is another fit's. Null for "
                          "records made before it was kept and for models saved before the map was kept",
        examples=[{"x": 3.4, "y": -1.2}])
    files_state: Literal["stored", "not_kept", "expired", "removed", "failed"] = Field(
        description="stored: photo and heatmap are kept; not_kept: --keep-images did not keep them; expired / "
                    "removed: retention removed them (by age / by total size); failed: writing them failed",
        examples=["stored"])
    files_changed_at: Timestamp | None = Field(description="When retention removed the pictures (files_state "
                                                           "expired or removed); null while they are kept",
                                               examples=[None])
    verdict: Verdict | None = Field(description="The latest review's verdict; null while unreviewed",
                                    examples=["defect"])
    reviewed_at: Timestamp | None = Field(description="When the latest review was made",
                                    examples=["2025-01-14T09:02:55.100000+00:00"])
    image_url: str | None = Field(description="The stored photo (null when it is not stored). The URLs carry the "
                                              "inspection's view token, so an <img> or a dashboard link works "
                                              "without the X-API-Key header; it opens this inspection's pictures "
                                              "only",
                                  examples=["/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/image?token=q3J0xv8lS0a1"])
    heatmap_url: str | None = Field(description="The stored heatmap PNG",
                                    examples=["/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/heatmap.png?token=q3J0"])
    overlay_url: str | None = Field(description="The heatmap over the photo, as a PNG",
                                    examples=["/inspections/0193a5f2-7c41-7a3e-9b0d-51f0c2a8e6d4/overlay.png?token=q3J0"])
    reviews: list[ReviewOut] | None = Field(None, description="Every review, oldest first (GET /inspections/{id} "
                                                              "only)")

    model_config = {**MODEL_FIELDS, "json_schema_extra": {"examples": [_INSPECTION_EXAMPLE]}}

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> InspectionOut:
        stored = row["files_state"] == "stored"
        base = f"/inspections/{row['id']}"
        token = f"?token={row['view_token']}" if row.get("view_token") else ""
        fields = {k: v for k, v in row.items() if k in cls.model_fields}
        if "regions" in fields:  # the record keeps each region's evidence; its thumbnail is the model's
            fields["regions"] = [RegionOut.from_region(r, row["model"]) for r in fields["regions"]]
        x, y = row.get("embedding_x"), row.get("embedding_y")  # kept as two columns, said as the score answer says it
        fields["embedding"] = PointOut(x=x, y=y) if x is not None and y is not None else None
        return cls(**fields,
                   image_url=f"{base}/image{token}" if stored else None,
                   heatmap_url=f"{base}/heatmap.png{token}" if stored and row.get("has_heatmap") else None,
                   overlay_url=f"{base}/overlay.png{token}" if stored and row.get("has_heatmap") else None)


class InspectionPage(BaseModel):
    items: list[InspectionOut] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last page",
                                    examples=["MDE5M2E1ZjItN2M0MS03YTNlLTliMGQtNTFmMGMyYThlNmQ0.q3J0xv8lS0a1cZf2"])


class StatsBucketOut(BaseModel):
    start: Timestamp = Field(description="Start of the time bucket, with the offset of tz at that time",
                       examples=["2025-01-14T08:00:00+00:00"])
    model: str = Field(examples=["bottle"])
    line: str | None = Field(examples=["line-2"])
    count: int = Field(description="Inspections (a part sent twice, e.g. a retry, is two)", examples=[412])
    anomaly: int = Field(description="Flagged by the model", examples=[9])
    normal: int = Field(examples=[403])
    anomaly_rate: float = Field(description="anomaly / count", examples=[0.0218])
    unreviewed_anomalies: int = Field(description="Flagged and not yet reviewed: the review backlog",
                                      examples=[3])
    score_p50: float | None = Field(description="Median normalized score", examples=[0.41])
    score_p90: float | None = Field(examples=[0.74])
    score_p99: float | None = Field(examples=[1.21])


class StatsOut(BaseModel):
    bucket: Bucket = Field(examples=["hour"])
    tz: str = Field(description="The time zone the buckets are cut in", examples=["UTC"])
    since: Timestamp = Field(description="Start of the range (UTC)", examples=["2025-01-13T08:00:00+00:00"])
    until: Timestamp | None = Field(description="End of the range (UTC); null: now", examples=[None])
    since_local: Timestamp = Field(description="since on the clock of tz, with its offset: which time a since "
                                   "without a zone was read as where the clocks repeat or skip an hour",
                                   examples=["2025-01-13T09:00:00+01:00"])
    until_local: Timestamp | None = Field(description="until on the clock of tz, with its offset; null: now",
                                          examples=[None])
    buckets: list[StatsBucketOut]
    truncated: bool = Field(description="True when the range held more inspections than one answer aggregates "
                                        "(a million): the newest are counted; narrow it", examples=[False])
