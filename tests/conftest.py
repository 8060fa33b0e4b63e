"""Shared fixtures: synthetic inspection images (no licensed data in the repo) and one small fitted model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def textured_part(rng: np.random.Generator, height: int = 128, width: int = 128) -> np.ndarray:
    """A 'good part': a periodic machined texture with random phase, lighting and sensor noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * xx / 12.0 + phase) * np.cos(2 * np.pi * yy / 16.0)
    light = rng.uniform(-0.05, 0.05) + 0.1 * (yy / height)
    base = np.clip(stripes + light + rng.normal(0, 0.03, (height, width)), 0, 1)
    rgb = np.stack([base * 0.9, base * 0.8, base * 0.7], axis=-1)
    return (rgb * 255).astype(np.uint8)


def add_defect(image: np.ndarray, cy: int, cx: int, radius: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Paint a bright scratch-like blob; returns the image and its ground-truth mask."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius / 2.5)) ** 2 <= 1.0
    out = image.copy()
    out[mask] = (250, 240, 60)
    return out, mask


@pytest.fixture(scope="session")
def rng_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [textured_part(rng) for _ in range(14)]


@pytest.fixture(scope="session")
def fitted_model(rng_images):
    from anomaly_service import AnomalyModel

    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        calibration_fraction=0.25).fit(rng_images)


@pytest.fixture
def synthetic_category(tmp_path: Path) -> Path:
    """A tiny MVTec-layout category on disk: train/good, test/good, test/blob with masks."""
    rng = np.random.default_rng(1)
    root = tmp_path / "part"
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(textured_part(rng)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(4):
        Image.fromarray(textured_part(rng)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(4):
        img, mask = add_defect(textured_part(rng), int(rng.integers(20, 108)), int(rng.integers(20, 108)))
        Image.fromarray(img).save(root / "test/blob" / f"{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


def shared_category(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def model_dir(fitted_model, tmp_path_factory) -> Path:
    """A model directory as the service sees it, holding the session model as ``part``."""
    root = tmp_path_factory.mktemp("served_models")
    fitted_model.save(root / "part")
    return root


def png_bytes(image: np.ndarray, **save_args) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=save_args.pop("format", "PNG"), **save_args)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A real ``anomaly serve`` process on a free loopback port, serving ``model_dir``; yields (url, process)."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_API_KEY"}  # open: no key, default log level
    log_path = tmp_path_factory.mktemp("server") / "server.log"  # a file, not a pipe: a full pipe would block it
    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(model_dir),
                             "--port", str(port), "--reload-interval", "0"], env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not become ready in 120 s")
    proc.log_path = log_path  # type: ignore[attr-defined] - tests read what the server logged
    yield url, proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        log_file.close()


