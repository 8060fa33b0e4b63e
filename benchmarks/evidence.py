"""What the evidence costs: the closest good region of each flagged region, and the part's place on the image map.

Fits on a real category (default: the shared mvtec_ad/bottle, train/good), scores every test photo once, and
for each one times, many times over, what this feature adds after the search:

  * ``per region``: finding each region's closest good region (hottest patch, bank row, provenance, catalog box);
  * ``position``: the part's place on the image map (a mean feature projected by a (d, 2) product);
  * ``render delta``: render() with the evidence minus without it, per photo (regions included);
  * ``pooled``: the one addition inside the scorer: the mean of the photo's patch features (timed on its grid,
    from the search's queries as the scorer takes it).

Also the catalog's size on disk, the image map's fit time, and, as a sanity check of the evidence itself, how far
(in grid cells) the matched training patch sits from the region's hottest patch: the bottle photos are aligned,
so a rim defect should match rim patches of other bottles.

    python benchmarks/evidence.py                          # bottle, efficientnet_lite0
    python benchmarks/evidence.py --category /path/to/mvtec/category --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def _median_us(fn: Callable[[], Any], repeats: int) -> float:
    """Median microseconds of one call of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _at_least_one(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least one timed call")
    return int(text)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", type=Path, default=BOTTLE)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=_at_least_one, default=200,
                    help="timed calls per photo and measurement (a render: a quarter of them, at least one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.evidence import TrainingEvidence
    from anomaly_service.image_map import ImageMap, pooled_features
    from anomaly_service.images import load_image
    from anomaly_service.render import render

    load_before = os.getloadavg()[0]
    train, samples = read_category(args.category)
    model = AnomalyModel(backbone=args.backbone, progress=False)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    evidence = TrainingEvidence.of(model)
    assert evidence is not None and model.catalog_ is not None and model.catalog_.image_map is not None
    with torch.no_grad():  # the map's own fit, on as many patch features as the fit's (best of 5: one-off cost)
        d = model.catalog_.image_map.dim
        fake = torch.randn(sum(h * w for h, w in model.catalog_.grids), d)
        map_fit_ms = min(_median_us(lambda: ImageMap.fit(pooled_features(fake, model.catalog_.grids)), 1)
                         for _ in range(5)) / 1000

    per_region, position, delta, pooled_us, cells = [], [], [], [], []
    n_regions = n_flagged = 0
    for s in samples:
        image = load_image(s.path)
        res = model.score(image)
        plain = render(res)
        verdict = render(res, evidence=evidence)
        n_regions += len(plain.regions)
        n_flagged += bool(plain.regions)
        position.append(_median_us(lambda: evidence.position(res), args.repeats))
        renders = max(1, args.repeats // 4)
        delta.append(_median_us(lambda: render(res, evidence=evidence), renders)
                     - _median_us(lambda: render(res), renders))
        if plain.regions:
            per_region.append(_median_us(lambda: evidence.annotate(res, plain.regions), args.repeats)
                              / len(plain.regions))
        emb = model.embedder.embed([image], keep=model.knn.keep).features
        queries = emb.reshape(-1, emb.shape[-1]).float().cpu().numpy()  # what the scorer pools, as it does
        pooled_us.append(_median_us(lambda: queries.reshape(1, -1, queries.shape[1]).mean(axis=1), args.repeats))
        for g in verdict.regions:
            nn = g.nearest_normal
            if nn is not None:
                cells.append(np.hypot((nn.box.x + nn.box.width / 2) / nn.image_width
                                      - (nn.patch.x + nn.patch.width / 2) / res.image_width,
                                      (nn.box.y + nn.box.height / 2) / nn.image_height
                                      - (nn.patch.y + nn.patch.height / 2) / res.image_height)
                             * res.matches.nearest.shape[0])

    catalog_bytes = len(model.catalog_.to_bytes())
    map_bytes = sum(a.nbytes for a in model.catalog_.image_map.to_arrays().values())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = {
        "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
                                     f"torch threads",
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "category": str(args.category.name), "backbone": args.backbone, "train_images": len(model.catalog_),
        "bank": model.knn.bank_size, "grid": list(model.catalog_.grids[0]), "kept_dims": d,
        "fit_s": round(fit_s, 1), "map_fit_ms": round(map_fit_ms, 2),
        "test_photos": len(samples), "photos_with_regions": n_flagged, "regions": n_regions,
        "per_region_us": {"median": round(_p(per_region, 50), 1), "p95": round(_p(per_region, 95), 1),
                          "max": round(max(per_region), 1) if per_region else None},
        "position_us": {"median": round(_p(position, 50), 1), "p95": round(_p(position, 95), 1)},
        "render_delta_us": {"median": round(_p(delta, 50), 1), "p95": round(_p(delta, 95), 1)},
        "pooled_us": {"median": round(_p(pooled_us, 50), 1), "p95": round(_p(pooled_us, 95), 1)},
        "match_offset_cells": {"median": round(_p(cells, 50), 2), "p90": round(_p(cells, 90), 2)},
        "catalog_kb": round(catalog_bytes / 1024, 1), "image_map_kb": round(map_bytes / 1024, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
