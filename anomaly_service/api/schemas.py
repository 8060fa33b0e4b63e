"""JSON shapes of the HTTP API (pydantic models: they validate our own output and document it at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

HeatmapKind = Literal["none", "png", "overlay", "array"]


class RegionOut(BaseModel):
    x: int = Field(description="Left edge, pixels of the uploaded image")
    y: int = Field(description="Top edge, pixels")
    width: int
    height: int
    area: int = Field(description="Pixels at or above the threshold inside the region")
    peak_score: float = Field(description="Highest normalised score in the region (1.0 = threshold)")
    peak_x: int
    peak_y: int


class HeatmapOut(BaseModel):
    kind: Literal["png", "overlay", "array"]
    media_type: str = Field(description="image/png for png/overlay; application/octet-stream for array")
    encoding: Literal["base64"] = "base64"
    width: int
    height: int
    dtype: str | None = Field(None, description="array only: element type of the decoded bytes (float16)")
    byte_order: Literal["little"] | None = Field(None, description="array only")
    shape: list[int] | None = Field(None, description="array only: [rows, columns], row-major")
    scale: str = Field(description="What the values or colours mean")
    data: str = Field(description="base64 of the PNG file, or of the raw array bytes")


class ScorerOut(BaseModel):
    score: float
    normalized_score: float = Field(description="On this scorer's own calibrated scale (1.0 = its threshold)")
    threshold: float
    is_anomaly: bool


class ScoreOut(BaseModel):
    model: str
    model_version: str = Field(description="Fingerprint of the model's manifest; changes with every re-fit")
    score: float = Field(description="Raw image score in kNN distance units: by default the anomaly map's "
                                     "hottest pixel")
    normalized_score: float = Field(description="Score on the model's calibrated scale: 1.0 = threshold")
    is_anomaly: bool
    threshold: float = Field(description="Raw-score threshold, set from held-out normal images at fit time")
    image_width: int
    image_height: int
    regions: list[RegionOut] = Field(description="Connected regions above threshold, highest peak first")
    timing_ms: dict[str, float] = Field(description="Per-stage milliseconds for this image")
    heatmap: HeatmapOut | None = None
    scorers: dict[str, ScorerOut] | None = Field(
        None, description="Models with an autoencoder: each scorer's own opinion (knn, autoencoder); the fields "
                          "above are then the fused decision")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "bottle", "model_version": "3f9a1c0e5b7d2a41", "score": 4.21, "normalized_score": 1.38,
        "is_anomaly": True, "threshold": 3.05, "image_width": 900, "image_height": 900,
        "regions": [{"x": 412, "y": 220, "width": 96, "height": 71, "area": 5120, "peak_score": 1.38,
                     "peak_x": 455, "peak_y": 251}],
        "timing_ms": {"decode": 6.1, "queue": 1.2, "preprocess": 2.0, "backbone": 21.5, "embed": 3.0, "select": 0.1,
                      "knn": 5.2, "map": 4.0, "render": 9.8, "total": 52.9},
        "heatmap": None}]}}


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
