"""Speed benchmark: per-stage latency at batch 1, throughput at batch 8, fit cost, model size.

For each backbone (resnet50 with random weights: timing does not depend on the values; efficientnet_lite0 with its
real weights) and input size (the default 256 and a larger one), in a fresh process each:
  * fit on a 200-image normal set (shared mvtec_ad/bottle train, or synthetic when absent): seconds, peak RSS;
  * score test photos one at a time: median and p95 ms per stage (decode, preprocess, backbone, embed = 3x3
    aggregation + layer projection + std feature selection (fused: only kept dimensions are computed), knn =
    handing the queries to the search + the search, map = upsampling + smoothing, encode =
    color map PNG + base64 as the API sends it) and end to end;
  * score 64 images with batch 8: images/s;
  * the saved model's size on disk;
  * the floor of exact kNN on this CPU: the query x bank distance product alone at the search's precision, and the
    after-backbone share it implies even if the shortlist, map and encoding cost nothing.

    python benchmarks/speed.py                       # the full grid (about 10 minutes on 2 cores)
    python benchmarks/speed.py --backbones efficientnet_lite0 --sizes 256 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
STAGES = ["decode", "preprocess", "backbone", "embed", "knn", "map", "encode"]


def _images(n_train: int, n_test: int) -> tuple[list[Any], list[bytes], str]:
    if (BOTTLE / "train" / "good").is_dir():
        train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:n_train]
        test = sorted((BOTTLE / "test").rglob("*.png"))
        test = [p.read_bytes() for p in test[:: max(1, len(test) // n_test)][:n_test]]
        return list(train), test, f"mvtec_ad/bottle ({len(train)} train, {len(test)} test photos, 320x320)"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import png_bytes, textured_part

    rng = np.random.default_rng(0)
    train = [textured_part(rng, 512, 512) for _ in range(n_train)]
    test = [png_bytes(textured_part(rng, 512, 512)) for _ in range(n_test)]
    return train, test, f"synthetic 512x512 ({n_train} train, {n_test} test)"


def _product_floor_ms(n_queries: int, n_bank: int, dim: int, bf16: bool, repeats: int = 20) -> float:
    """Median ms of the query x bank distance product alone, at the search's precision: no exact search can be
    faster than this one matrix product (the shortlist, fold and re-rank come on top)."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    q, b = torch.randn(n_queries, dim).to(dtype), torch.randn(n_bank, dim).to(dtype)
    out = torch.empty(n_queries, n_bank, dtype=dtype)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        torch.mm(q, b.T, out=out)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _run(backbone: str, size: int, n_train: int, n_test: int, runtime: str, index: str,
         knn_precision: str = "auto") -> dict[str, Any]:
    import logging
    import resource

    import torch
    import torchvision

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel
    from anomaly_service.heatmap import heatmap_png
    from anomaly_service.images import load_image
    from anomaly_service.index import resolve_precision

    train, test, source = _images(n_train, n_test)
    weights = None
    tmp = Path(tempfile.mkdtemp(prefix="anomaly-speed-"))
    if backbone != "efficientnet_lite0":  # random weights: same arithmetic, no download
        net = getattr(torchvision.models, backbone)(weights=None)
        weights = tmp / f"{backbone}-random.pth"
        torch.save(net.state_dict(), weights)
    model = AnomalyModel(backbone=backbone, image_size=size, weights=weights, progress=False, runtime=runtime,
                         index=index, knn_precision=knn_precision)
    model.backbone  # noqa: B018 - loading weights is not fitting
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    path = model.save(tmp / "model")
    disk_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6

    for data in test[:3]:  # warm-up
        model.score(data)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES + ["total"]}
    for data in test:
        t_start = time.perf_counter()
        res = model.score(data)
        t_enc = time.perf_counter()
        base64.b64encode(heatmap_png(res.normalized_map()))
        encode_ms = (time.perf_counter() - t_enc) * 1000
        total = (time.perf_counter() - t_start) * 1000
        for s in STAGES:
            per_stage[s].append(encode_ms if s == "encode" else res.timing_ms.get(s, 0.0))
        per_stage["total"].append(total)
    batch = (test * (64 // len(test) + 1))[:64]
    t0 = time.perf_counter()
    for _ in model.score_many(batch):
        pass
    ips = len(batch) / (time.perf_counter() - t0)
    med = {s: float(np.median(v)) for s, v in per_stage.items()}
    p95 = {s: float(np.percentile(v, 95)) for s, v in per_stage.items()}
    after = sum(med[s] for s in ("knn", "map", "encode"))
    # The floor of exact search: the distance product alone, for one photo's patches against the whole bank.
    h, w = model.preprocessing.working_size(*load_image(test[0]).shape[:2])
    n_patches = (h // 8) * (w // 8)  # the stride-8 grid every patch score lives on
    bf16 = resolve_precision(model.knn_precision) == "bf16"
    floor = _product_floor_ms(n_patches, int(model.index_.ntotal), int(model.index_.d), bf16)

    return {"backbone": backbone, "image_size": size, "source": source, "fit_seconds": fit_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "model_mb": disk_mb,
            "bank_size": int(model.index_.ntotal), "median_ms": med, "p95_ms": p95, "images_per_s_batch8": ips,
            "after_backbone_share": after / med["total"], "knn_product_floor_ms": floor,
            "knn_search": model.knn_search,
            # the smallest after-backbone share exact search could reach if kNN cost only its product and the
            # map and encoding were free
            "exact_floor_share": floor / (med["total"] - after + floor), "threads": torch.get_num_threads(),
            "runtime": model.runtime, "index": index}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 384])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--index", default="flat", choices=["auto", "flat", "ivf", "ivfpq"], help="Memory bank index")
    ap.add_argument("--knn-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="CPU kNN search precision (fp32: as on CPUs without native bf16)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"], help="Backbone execution")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    ctx = mp.get_context("spawn")
    for backbone in args.backbones:
        for size in args.sizes:
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_run, backbone, size, args.train, args.test, args.runtime,
                                     args.index, args.knn_precision).result()
            rows.append(r)
            print(f"{backbone} {size}: {r['median_ms']['total']:.1f} ms/img, {r['images_per_s_batch8']:.1f} img/s "
                  f"at batch 8, fit {r['fit_seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"\nimages: {rows[0]['source']}; torch threads {rows[0]['threads']}; backbone runtime {rows[0]['runtime']}; "
          f"index {rows[0]['index']} ({rows[0]['knn_search']}); "
          "ms per image, median (p95), batch 1\n")
    cols = STAGES + ["total"]
    print("| backbone | size | " + " | ".join(cols) + " | after backbone | kNN product floor ms (share) "
          f"| img/s batch 8 | fit s ({args.train} img) | peak MB | model MB | bank |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = " | ".join(f"{r['median_ms'][c]:.1f} ({r['p95_ms'][c]:.1f})" for c in cols)
        print(f"| {r['backbone']} | {r['image_size']} | {cells} | {r['after_backbone_share'] * 100:.0f}% | "
              f"{r['knn_product_floor_ms']:.1f} ({r['exact_floor_share'] * 100:.0f}%) | "
              f"{r['images_per_s_batch8']:.1f} | {r['fit_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['model_mb']:.1f} | {r['bank_size']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
