"""JSON shapes of the HTTP API (pydantic models: they validate our own output and document it at /docs).

Two scales appear in a score. ``score`` and ``threshold`` are the kNN memory bank's opinion in kNN distance
units; ``normalized_score``, ``is_anomaly``, the regions and the heatmaps are the model's decision on its
calibrated scale, where 1.0 is the threshold (with an autoencoder, the fused decision; ``scorers`` then holds each
opinion).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from ... import ScoreResult
    from ...registry import ModelEntry
    from ...regions import Region
    from ...render import Heatmap, Verdict

HeatmapKind = Literal["none", "png", "overlay", "array"]
# Headers of the picture answers (``/score/image``, ``/score`` with ``Accept: image/png``); CORS exposes them.
DECISION_HEADERS = ["X-Anomaly-Score", "X-Anomaly-Normalized-Score", "X-Anomaly-Decision", "X-Anomaly-Threshold",
                    "X-Anomaly-Model", "X-Anomaly-Model-Version"]


class RegionOut(BaseModel):
    x: int = Field(description="Left edge, pixels of the uploaded image")
    y: int = Field(description="Top edge, pixels")
    width: int
    height: int
    area: int = Field(description="Pixels at or above the threshold inside the region")
    peak_score: float = Field(description="Highest normalized score in the region (1.0 = threshold)")
    peak_x: int
    peak_y: int

    @classmethod
    def from_region(cls, region: Region) -> RegionOut:
        return cls(**region.to_dict())


class HeatmapOut(BaseModel):
    kind: Literal["png", "overlay", "array"]
    media_type: str = Field(description="image/png for png/overlay; application/octet-stream for array")
    encoding: Literal["base64"] = "base64"
    width: int
    height: int
    dtype: str | None = Field(None, description="array only: element type of the decoded bytes (float16)")
    byte_order: Literal["little"] | None = Field(None, description="array only")
    shape: list[int] | None = Field(None, description="array only: [rows, columns], row-major")
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


class ScoreOut(BaseModel):
    model: str
    model_version: str = Field(description="Fingerprint of the model's manifest; changes with every re-fit")
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
    scorers: dict[str, ScorerOut] | None = Field(
        None, description="Models with an autoencoder: each scorer's own opinion (knn, autoencoder); "
                          "`normalized_score` and `is_anomaly` are then the fused decision, `score` and `threshold` "
                          "stay the kNN opinion")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "bottle", "model_version": "3f9a1c0e5b7d2a41", "score": 4.21, "normalized_score": 1.38,
        "is_anomaly": True, "threshold": 3.05, "image_width": 900, "image_height": 900,
        "regions": [{"x": 412, "y": 220, "width": 96, "height": 71, "area": 5120, "peak_score": 1.38,
                     "peak_x": 455, "peak_y": 251}],
        "timing_ms": {"decode": 6.1, "queue": 1.2, "preprocess": 2.0, "backbone": 21.5, "embed": 3.0, "select": 0.1,
                      "knn": 5.2, "map": 4.0, "render": 9.8, "total": 52.9},
        "heatmap": None}]}}

    @classmethod
    def from_verdict(cls, entry: ModelEntry, result: ScoreResult, verdict: Verdict,
                     heatmap: Heatmap | None = None) -> ScoreOut:
        return cls(model=entry.name, model_version=entry.version[:16], score=result.score,
                   normalized_score=result.normalized_score, is_anomaly=result.is_anomaly, threshold=result.threshold,
                   image_width=result.image_width, image_height=result.image_height,
                   regions=[RegionOut.from_region(r) for r in verdict.regions],
                   timing_ms={k: round(v, 3) for k, v in result.timing_ms.items()},
                   heatmap=HeatmapOut.from_heatmap(heatmap) if heatmap is not None else None,
                   scorers=result.scorers or None)


class ErrorOut(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. not_image, too_large, unknown_model")
    detail: str = Field(description="What went wrong and what to do, for a person")


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
    loaded_at: str
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


class ModelsOut(BaseModel):
    models: list[ModelSummary]
    default: str | None
    errors: dict[str, str] = Field(description="Models on disk that failed to load, with the reason")


class ReloadOut(BaseModel):
    changes: dict[str, str]
    models: list[str]
