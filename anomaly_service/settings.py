"""Service configuration: flags of ``anomaly serve`` and ``ANOMALY_*`` environment variables (pydantic-settings).

Every field can be set as ``ANOMALY_<FIELD>`` (e.g. ``ANOMALY_API_KEY``, ``ANOMALY_MODEL_DIR``); command-line
flags override the environment. ``cors_origins`` takes a comma-separated list or a JSON list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .artifact import DEFAULT_KEEP_VERSIONS
from .errors import ConfigError
from .images import ImageLimits
from .options import RUNTIME_OPTIONS, SERVICE_OPTIONS

# an API key as the X-API-Key header can carry it: printable ASCII, no space at either end
_HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

# how long a request waits for the records database or a stored picture (api/records_gate.py says why there is one)
RECORDS_TIMEOUT_S = 15.0


def _choices(name: str) -> tuple[str, ...]:
    choices = RUNTIME_OPTIONS[name].choices
    assert choices is not None
    return choices


def ascii_host(name: str, given: str) -> str:
    """A host name as browsers and clients send it in ``Host`` and ``Origin``: a name beyond ASCII
    (``prüfstand.werk.example``) as its IDNA form (``xn--prfstand-75a.werk.example``), as UTS 46 maps it. Given as
    typed, it was refused at start (a Host name) or matched no request at all (a CORS origin: no dashboard got in)."""
    if name.isascii():
        return name
    import idna

    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{given!r}: {name!r} is not a host name ({exc})") from None


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANOMALY_", extra="ignore")

    model_dir: Path = Field(Path("models"), description="Directory whose sub-directories are fitted models")
    default_model: str | None = Field(None, description="Model used when a request names none")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description=RUNTIME_OPTIONS["device"].help)
    knn_precision: Literal[_choices("knn_precision")] = Field(  # type: ignore[valid-type]
        "auto", description=RUNTIME_OPTIONS["knn_precision"].help)
    runtime: Literal[_choices("runtime")] = Field(  # type: ignore[valid-type]
        "auto", description=RUNTIME_OPTIONS["runtime"].help)
    weights: Path | None = Field(None, description="Local backbone weights file (air-gapped): used by the "
                                    "models fitted with these weights, passed over by the others")
    api_key: SecretStr | None = Field(None, description="When set, scoring and admin endpoints need X-API-Key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         description="Dashboard origins allowed by CORS")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Host names the service answers for (400 invalid_host for "
        "others; health probes exempt), comma-separated or a JSON list; *.plant.example for its subdomains; * any")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Per uploaded file (413 above)")
    max_pixels: int = Field(40_000_000, ge=64, description="Width x height, checked before decoding (413 above)")
    max_batch_files: int = Field(16, ge=1, description="Files per /score/batch request")
    batch_max_size: int = Field(8, ge=1, description="Images per backbone pass (1 disables micro-batching)")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a pass waits for more requests to join")
    queue_size: int = Field(64, ge=1, description="Images waiting for inference before 503 + Retry-After")
    max_pixels_in_flight: int = Field(
        40_000_000, ge=64, description="Pixels (width x height, read from the header) of the images admitted and "
        "not yet answered; an image that does not fit gets 503 overloaded before it is read or decoded. Every copy "
        "of an image (decoded pixels, anomaly map, heatmap) scales with its pixels, so this bounds their memory: "
        "the memory above the idle service stays under max(this, max_pixels) x the peak bytes per pixel "
        "(docs/service.md) + max_bytes_in_flight. The default is one image of the default max_pixels, or many "
        "smaller ones; an image above this but within max_pixels is admitted when no other pixels are in flight. "
        "Left at its default, it is lowered at start to what the memory free after loading the models holds")
    max_bytes_in_flight: int = Field(
        128 * 1024 * 1024, ge=1024, description="Upload bytes of the admitted images not yet decoded (503 "
        "overloaded above); a file above this but within max_upload_bytes is admitted when no other bytes are in "
        "flight")
    max_decode_backlog: int = Field(64, ge=1, description="Admitted images waiting for a decode thread or being "
                                    "decoded (503 overloaded above)")
    limit_concurrency: int = Field(
        64, ge=0, description="Requests in progress at once (a request whose client hung up counts until it "
        "ends); the next gets 503 overloaded. Idle connections do not count; with an API key, requests without it "
        "have as many places of their own (0: no limit; the probes and /metrics always pass)")
    timeout_keep_alive: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open")
    stop_delay: float = Field(
        0.0, ge=0, description="Seconds the service serves on after a SIGTERM before it stops: /readyz answers 503 "
        "and each answer closes its connection, so that a load balancer takes the replica out before its port "
        "closes (a few seconds under Kubernetes; 0: stop at once). A second SIGTERM, or Ctrl-C, stops at once")
    timeout_header: float = Field(
        10.0, ge=0, description="Seconds a connection may take to send a complete request head, counted from the "
        "connection or from the first byte of a later request; then it is closed (0: no limit). An idle connection "
        "after an answer is closed by --timeout-keep-alive")
    timeout_body: float = Field(
        30.0, ge=0, description="Seconds a request body may pause between bytes (then the answer is 408 "
        "request_timeout), and a client may leave its answer unread (then it is disconnected) (0: no limit)")
    inference_workers: int | None = Field(
        None, ge=1, description="Batches in inference at once, sharing the cores under load (default: 2 on the "
        "CPU, 1 on a GPU)")
    cpu_workers: int = Field(2, ge=1, description="Threads that decode uploads (and as many that render heatmaps)")
    reload_interval: float = Field(10.0, ge=0, description="Seconds between checks for re-fitted models (0: off)")
    load_timeout: float = Field(60.0, gt=0, description="Seconds the service waits for one model's files to load "
                                "(at start-up, a re-scan, a reload) before it goes on without it: a model on storage "
                                "that does not answer is listed as stuck, and served once its files answer")
    records_timeout: float = Field(RECORDS_TIMEOUT_S, gt=0, description="Seconds a request waits for the records "
                                   "database, or for a stored photo or heatmap, its wait for a free slot included, "
                                   "before it is answered 503 records_unavailable; scoring never waits on them")
    keep_versions: int = Field(DEFAULT_KEEP_VERSIONS, ge=0, description="Earlier versions kept per model when an "
                               "update, rollback or re-fit replaces it (under <model-dir>/.versions/)")
    require_author: bool = Field(False, description="Model updates and rollbacks over HTTP need an X-Reviewer "
                                 "header naming who makes them (422 author_required without it); false: taken "
                                 "without it and logged as made by nobody")
    array_max_side: int = Field(128, ge=8, description="Longer side of heatmap=array responses")
    drift_window: int = Field(200, ge=10, description="Parts per model in the drift window (GET /models/{name}/drift)")
    drift_min_parts: int = Field(30, ge=5, description="Parts the window needs before drift can alarm")
    drift_alpha: float = Field(1e-3, gt=0, lt=1, description="p-value under which the drift test alarms")
    drift_min_effect: float = Field(0.7, gt=0, le=1, description="KS statistic (0..1) the drift must also reach to "
                                    "alarm: significant is not enough, it must be large")
    log_level: Literal[SERVICE_OPTIONS["log_level"].choices] = Field(  # type: ignore[valid-type]
        "info", description=SERVICE_OPTIONS["log_level"].help.rstrip("."))
    log_format: Literal[SERVICE_OPTIONS["log_format"].choices] = Field(  # type: ignore[valid-type]
        "text", description=SERVICE_OPTIONS["log_format"].help.rstrip("."))
    # Inspection records (anomaly_service/records/, docs/service.md#records): on by default, because a plant's
    # quality system needs every decision traceable; recording never slows or fails scoring.
    record: bool = Field(True, description="Record every scored image (database + file store); false: forget it")
    data_dir: Path = Field(Path("data"), description="Records' home: the SQLite file (when no --database-url) "
                           "and the stored photos and heatmaps")
    database_url: SecretStr | None = Field(
        None, description="Records database, e.g. postgresql+psycopg://user:pass@host/anomaly (needed for more "
        "than one replica); default: SQLite under --data-dir")
    keep_images: Literal[SERVICE_OPTIONS["keep_images"].choices] = Field(  # type: ignore[valid-type]
        "anomalies", description=SERVICE_OPTIONS["keep_images"].help)
    retention_days: float = Field(90.0, ge=0, description="Stored photos and heatmaps older than this many days "
                                  "are removed (records stay, marked expired); 0: no age limit")
    retention_max_bytes: int = Field(10 * 1024**3, ge=0, description="Total size of stored photos and heatmaps; "
                                     "the oldest go first above it (records stay, marked removed); 0: no limit")
    retention_min_free_bytes: int = Field(
        1024**3, ge=0, description="Free space kept on the data volume: below it new photos and heatmaps are not "
        "stored (the records still are) and retention removes the oldest pictures, so that a full disk never costs "
        "the records themselves; 0: no floor")
    retention_interval: float = Field(3600.0, gt=0, description="Seconds between retention passes")
    record_buffer_size: int = Field(10_000, ge=1, description="Records waiting for the database before new ones "
                                    "are dropped (and counted in anomaly_records_dropped_total)")

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("is set but empty: unset ANOMALY_API_KEY to run without authentication (every route "
                             "open), or give it a value")
        if v is not None and not _HEADER_SAFE_KEY.fullmatch(v.get_secret_value()):
            # HTTP trims a header value's outer whitespace and carries no newline: such a key is never matched, and
            # a non-ASCII one is read one way by the body's check (bytes) and another by the routes' (Latin-1)
            raise ValueError("has characters the X-API-Key header cannot carry, so no request could ever send it "
                             "and every keyed route would answer 401: use printable ASCII with no space or newline "
                             "at either end (a key read from a file keeps the file's final newline: strip it)")
        return v

    @field_validator("drift_min_parts")
    @classmethod
    def _fits_the_window(cls, v: int, info: ValidationInfo) -> int:
        window = info.data.get("drift_window")
        if window is not None and v > window:  # the window never holds that many: the alarm would be off for good
            raise ValueError(f"must be at most the drift window (--drift-window, {window}): a window of {window} "
                             f"parts never holds {v}, so drift could never alarm")
        return v

    @field_validator("default_model", mode="before")
    @classmethod
    def _unset_when_empty(cls, v: object) -> object:
        # docker-compose passes ANOMALY_DEFAULT_MODEL=${ANOMALY_DEFAULT_MODEL:-}: empty means "not set", not a model
        # named "" (which made every request that names no model a 404)
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        try:
            RUNTIME_OPTIONS["device"].check("device", v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("[") and not re.match(r"\[[0-9a-fA-F.]*:[0-9a-fA-F:.]*\]", v):  # JSON, not "[::1]"
                import json

                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins_as_browsers_send_them(cls, v: list[str]) -> list[str]:
        """Each origin as a browser's Origin header spells it (scheme://host[:port]), or ``*``: CORS compares them
        as text, so a host without its scheme, or with a path, silently let no dashboard in. A trailing slash is
        dropped (it is no part of an origin, and would otherwise let the dashboard's writes in but not its reads)."""
        out = []
        for origin in v:
            o = origin.strip().rstrip("/")
            if o != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+", o):
                raise ValueError(f"{origin!r} is not an origin: give it as the browser sends it, scheme and host "
                                 "(and port, if not the scheme's own), with no path, e.g. https://dash.plant.example "
                                 "or http://10.0.0.5:3000; or * for any")
            if o != "*":
                scheme, _, rest = o.partition("://")
                name, colon, port = rest.rpartition(":") if re.search(r":[0-9]*$", rest) else (rest, "", "")
                o = f"{scheme}://{ascii_host(name, origin)}{colon}{port}"
            out.append(o)
        return out

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_as_names(cls, v: list[str]) -> list[str]:
        """Each a host name or address as a Host header carries it, without scheme, port or path: a URL here would
        match no request, and the service would refuse every one but its health probes."""
        out = []
        for host in v:
            h = host.strip().lower()
            if re.search(r"[:/]", h):  # a URL or a port, beyond ASCII or not: the message below says what to give
                pass
            elif h.startswith("*."):
                h = "*." + ascii_host(h[2:], host)
            elif h != "*":
                h = ascii_host(h, host)
            if h != "*" and not re.fullmatch(r"(\*\.)?[a-z0-9_.-]+|\[[0-9a-f:.]+\]", h):
                raise ValueError(f"{host!r} is not a host name: give it as clients call the service, without "
                                 "scheme, port or path, e.g. inspect.plant.example, 10.0.0.5, [::1], *.plant.example; "
                                 "or * for any")
            out.append(h[:-1] if h.endswith(".") and h != "." else h)  # as a Host's name is read (host_name)
        return out or ["*"]  # empty is not set (compose passes an unset variable empty), as for the other lists

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_pixels, max_bytes=self.max_upload_bytes)
