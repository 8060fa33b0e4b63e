"""What one large photo takes of a tiled model's service, against what admission counts it at, per backbone.

Admission (anomaly_service/api/admission.py) refuses a photo whose count does not fit the memory left: its own
pixels at ``PEAK_BYTES_PER_PIXEL``, plus, for a tiled model, ``Embedder.tile_bytes`` (every tile's pixels, and one
backbone pass of them), plus its upload. Those rates were measured on Lite0 and Lite1 (docs/decisions.md "Tiled
photos in the memory admission"); a backbone with wider or more layers takes more per pixel of a pass, and a count
that falls short lets in a photo that does not fit. This script measures the peak each backbone really takes.

For each backbone, a model is fitted on four synthetic 256 px parts (``--tile`` at ``--image-size``). Then, for each
photo side, a fresh process (the peak, VmHWM, is per process) runs the service in-process (recording off), warms it
with two 256 px parts, resets its peak (``/proc/self/clear_refs``), scores one large synthetic photo, and reads the
peak's rise over the resident memory before it; the same photo is then sent again. Printed: the larger rise, the
count, and their ratio (below 1: the count falls short).

Backbones without offline weights (``resnet50``) are run with randomly initialised weights passed as ``--weights``:
the memory a network takes depends on its shapes, never on its weights' values. Nothing here is a quality number.

    python benchmarks/tile_memory.py                                             # Lite0, Lite2, ResNet-50
    python benchmarks/tile_memory.py --backbones efficientnet_lite1 --sides 1024 2048 --tile 128
    python benchmarks/tile_memory.py --model-dir DIR --sides 1024 2048   # DIR/tiled: a model fitted on real photos

``--model-dir`` measures a saved tiled model (named ``tiled`` in DIR) instead of fitting one: a real category's
bank is an inverted file of tens of thousands of patches, which the synthetic fits' small exact banks are not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import rss_mb  # noqa: E402

TRAIN_SIDE = 256


def part(rng: np.random.Generator, side: int) -> np.ndarray:
    """A textured disc on a plain background: enough structure for a bank, cheap to make at any size."""
    from PIL import Image, ImageFilter

    noise = Image.fromarray(rng.integers(0, 256, (side // 4, side // 4), dtype=np.uint8)).resize((side, side))
    texture = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.4 * side) ** 2
    grey = np.where(disc, 90 + 0.5 * texture, 200.0)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def child(model_dir: str, weights: str | None, side: int) -> None:
    """In this fresh process: the service warmed, then one ``side`` px photo twice; print the larger peak rise."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.api.lifecycle import kept_dims
    from anomaly_service.memory_room import PEAK_BYTES_PER_PIXEL
    from anomaly_service.settings import ServiceSettings

    rng = np.random.default_rng(1)
    big = png(np.tile(part(rng, TRAIN_SIDE), (-(-side // TRAIN_SIDE), -(-side // TRAIN_SIDE), 1))[:side, :side])
    small = png(part(rng, TRAIN_SIDE))
    settings = ServiceSettings(model_dir=model_dir, weights=weights, reload_interval=0, record=False,
                               max_pixels_in_flight=10**9)
    rises = []
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert client.post("/score", files={"file": ("s.png", small)}).status_code == 200
        model = client.app.state.service.registry.get("tiled").model
        count = side * side * PEAK_BYTES_PER_PIXEL + model.embedder.tile_bytes(side, side, kept_dims(model)) + len(big)
        lay = model.embedder.layout((side, side))
        for _ in range(2):
            idle = rss_mb(os.getpid())
            Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from what is resident now
            t0 = time.perf_counter()
            r = client.post("/score", files={"file": ("big.png", big)})
            seconds = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            rises.append(int((rss_mb(os.getpid(), "VmHWM") - idle) * 1024 * 1024))
    print(json.dumps({"side": side, "tiles": lay.n_tiles if lay else 0, "rises": rises, "count": count,
                      "seconds": seconds}))


def fit(backbone: str, weights: str | None, image_size: int, tile: int, out: Path) -> None:
    from anomaly_service import AnomalyModel

    rng = np.random.default_rng(0)
    images = [part(rng, TRAIN_SIDE) for _ in range(4)]
    AnomalyModel(backbone=backbone, image_size=image_size, tile=tile, weights=weights,
                 progress=False).fit(images).save(out / "tiled")


def random_weights(backbone: str, out: Path) -> str:
    """A state dict of the backbone's own shapes, randomly initialised (for memory only)."""
    import torch
    import torchvision

    path = out / f"{backbone}-random.pth"
    torch.manual_seed(0)
    torch.save(getattr(torchvision.models, backbone)(weights=None).state_dict(), path)
    return str(path)


def _refused(args: argparse.Namespace) -> str | None:
    """Why the arguments measure nothing (None: they do), said before any fit: a wrong one ended in a traceback after
    the imports, or, a model that tiles nothing, in a table of untiled photos counted as tiled ones."""
    from anomaly_service.backbone_specs import get_spec
    from anomaly_service.config import ModelConfig
    from anomaly_service.errors import ConfigError
    from anomaly_service.manifest import MANIFEST

    if min(args.sides) < 1:
        return f"--sides are photo sides in px, at least 1 (given {min(args.sides)})"
    if args.model_dir is not None:
        manifest = args.model_dir / "tiled" / MANIFEST
        try:
            config = json.loads(manifest.read_text()).get("config", {})
        except (OSError, ValueError, AttributeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a manifest"
            return f"--model-dir {args.model_dir}: no saved model named tiled in it ({manifest}: {why})"
        if not config.get("tile"):
            return f"--model-dir {args.model_dir}: its model tiled was fitted without --tile: nothing to measure"
        return None
    try:
        for backbone in args.backbones:
            get_spec(backbone)
        ModelConfig(backbone=args.backbones[0], image_size=args.image_size, tile=args.tile).validate()
    except ConfigError as exc:
        return str(exc)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2", "resnet50"])
    ap.add_argument("--sides", nargs="+", type=int, default=[1024, 1536], help="photo sides in px")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--model-dir", type=Path, help="measure DIR/tiled (a saved tiled model) instead of fitting")
    ap.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "WEIGHTS", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model_dir, weights, side = args.child
        child(model_dir, None if weights == "-" else weights, int(side))
        return
    refused = _refused(args)
    if refused:
        ap.error(refused)
    from anomaly_service.backbone_specs import LITE_VARIANTS

    rows = []
    with tempfile.TemporaryDirectory(prefix="tile-memory-") as tmp:
        for backbone in [None] if args.model_dir else args.backbones:
            if backbone is None:  # a saved model: its backbone and tiles as fitted, its weights the default
                from anomaly_service.manifest import MANIFEST

                work, weights = args.model_dir, None
                manifest = json.loads((work / "tiled" / MANIFEST).read_text())
                backbone = f"{manifest['config']['backbone']} (saved)"
            else:
                work = Path(tmp) / backbone
                work.mkdir()
                weights = None if backbone in LITE_VARIANTS else random_weights(backbone, work)
                fit(backbone, weights, args.image_size, args.tile, work)
            for side in args.sides:
                out = subprocess.run([sys.executable, __file__, "--child", str(work), weights or "-", str(side)],
                                     capture_output=True, text=True, env={**os.environ, "ANOMALY_LOG_LEVEL": "warning"})
                if out.returncode:
                    sys.exit(f"{backbone} at {side} px failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["backbone"] = backbone
                rows.append(row)
                print(f"{backbone} {side} px: rises {[r >> 20 for r in row['rises']]} MiB, count "
                      f"{row['count'] >> 20} MiB", file=sys.stderr)
    setting = (f"model {args.model_dir}/tiled" if args.model_dir
               else f"--image-size {args.image_size} --tile {args.tile}")
    print(f"\n{setting}; fresh process per photo; {os.cpu_count()} CPUs\n")
    print("| backbone | photo | tiles | peak rise MiB (1st / 2nd) | count MiB | count / peak | s a photo |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        peak = max(r["rises"])
        print(f"| {r['backbone']} | {r['side']} px | {r['tiles']} | {r['rises'][0] >> 20} / {r['rises'][1] >> 20} | "
              f"{r['count'] >> 20} | {r['count'] / max(peak, 1):.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
