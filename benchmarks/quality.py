"""Quality and cost benchmark on real MVTec-layout categories.

Prints one row per (category, configuration): image AUROC, pixel AUROC, PRO, good FPR and defect recall at the
calibrated threshold, fit seconds, score ms/image, bank size and the peak RSS of the process that ran it (each
configuration runs in a fresh process so peaks do not leak between rows).

    python benchmarks/quality.py                      # defaults on the three shared categories
    python benchmarks/quality.py --ablation           # + selection none/random, coreset 0.01, unbalanced layers
    python benchmarks/quality.py --categories mvtec_ad/bottle --set image_size=320 --json out.json
    python benchmarks/quality.py --backbone efficientnet_lite2 --layers blocks.2,blocks.3   # + other tapped stages
    python benchmarks/quality.py --stream-chunk 262144 100000000   # + the coreset's chunk at other sizes
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
# anomalib 2.7.0 PatchCore, tf_efficientnet_lite0 blocks.2+blocks.4, 256x256, coreset 0.1 (measured on this machine
# class). mt was fitted on every second training image there to keep its fit under an hour.
ANOMALIB = {
    "mvtec_ad/bottle": {"image_auroc": 1.000, "pixel_auroc": 0.988, "pro": 0.939},
    "kolektorsdd/kos": {"image_auroc": 0.819, "pixel_auroc": 0.872, "pro": 0.393},
    "magnetic_tile/mt": {"image_auroc": 0.883, "pixel_auroc": 0.805, "pro": 0.707},
}


def _run(category_dir: str, params: dict[str, Any], train_limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """Fit once and evaluate; with an autoencoder, evaluate every fusion rule on the same fit."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import evaluate_model, peak_rss_mb, read_category

    chunk = params.pop("stream_chunk", None)
    if chunk:  # the streamed coreset's chunk (and threshold): a benchmark choice, set in this process
        from anomaly_service import knn_scorer

        knn_scorer.STREAM_CHUNK_ROWS = knn_scorer.STREAM_ABOVE_ROWS = int(chunk)
    train, samples = read_category(category_dir)
    if train_limit:
        train = train[:: max(1, len(train) // train_limit)][:train_limit]
    layers = params.pop("layers", None)
    if layers:  # which two stages to tap: a benchmark choice, made by swapping the backbone's spec in this process
        import dataclasses

        from anomaly_service import backbones

        spec = backbones.BACKBONES[params["backbone"]]
        widths = LITE_STAGE_CHANNELS[params["backbone"]]
        channels = tuple(widths[int(layer.removeprefix("blocks."))] for layer in layers)
        backbones.BACKBONES[spec.name] = dataclasses.replace(spec, layers=tuple(layers), channels=channels)
    random_selection = params.get("selection") == "random"
    if random_selection:  # not a product option: the stage object is injected below
        params = {k: v for k, v in params.items() if k != "selection"}
    model = AnomalyModel(progress=False, device="auto", **params)
    if random_selection:  # the ablation's control: the same number of dimensions, chosen at random
        model.knn.selector = RandomSelector(model.config.selection_keep, model.config.seed)
    model.backbone  # noqa: B018 - weights load is not part of fit time
    t0 = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - t0
    from anomaly_service.index import serialize

    metrics = evaluate_model(model, samples, fit_seconds=fit_seconds)
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["index_mb"] = len(serialize(model.index_)) / 1e6
    metrics["n_train"] = len(train)
    suffix = ""
    if model.autoencoder_ is not None:
        assert model.manifest_ is not None and model.manifest_.autoencoder is not None
        metrics["ae_seconds"] = model.manifest_.autoencoder.model_extra["training"]["seconds"]
        metrics["ae_epochs"] = model.manifest_.autoencoder.model_extra["training"]["epochs"]
        suffix = f" -> {model.config.fusion}"
    return [(suffix, metrics)]


# output channels of each EfficientNet-Lite stage (timm's blocks.0 .. blocks.6)
LITE_STAGE_CHANNELS = {
    "efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite1": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite2": (16, 24, 48, 88, 120, 208, 352),
}


class RandomSelector:
    """Ablation control for std selection: the same count of dimensions, chosen by a seeded random draw."""

    mode = "random"

    def __init__(self, keep: float, seed: int):
        self.keep, self.seed = keep, seed

    def select(self, bank: Any) -> Any:
        import numpy as np

        from anomaly_service.selection import n_keep

        d = bank.shape[1]
        return np.sort(np.random.default_rng(self.seed).choice(d, size=n_keep(d, self.keep), replace=False))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "keep": self.keep}


def run_isolated(category_dir: str, params: dict[str, Any], train_limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run, category_dir, params, train_limit).result()


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if value in ("True", "False"):
            out[key] = value == "True"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = None if value == "None" else value
    return out


def _curve(m: dict[str, Any]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in m.get("recall_at_fpr", {}).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--ablation", action="store_true",
                    help="Also run selection none/random, coreset 0.01 and unbalanced layers.")
    ap.add_argument("--autoencoder", nargs="*", default=[], metavar="FUSION",
                    help="Also fit with the feature autoencoder, fused by each of these rules (mean, max).")
    ap.add_argument("--no-default", action="store_true", help="Skip the plain default configuration row.")
    ap.add_argument("--layers", nargs="*", default=[], metavar="A,B",
                    help="Also run with these tapped stages of an EfficientNet-Lite, e.g. blocks.2,blocks.3.")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override ModelConfig fields.")
    ap.add_argument("--train-limit", type=int, default=None, help="Fit on at most N evenly spaced train images.")
    ap.add_argument("--stream-chunk", nargs="*", type=int, default=[], metavar="ROWS",
                    help="Also fit with the streamed coreset's chunk (and threshold) at ROWS patches (a huge value "
                         "gives the single greedy over every patch).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = {"backbone": args.backbone, **_parse_set(args.set)}
    variants: list[tuple[str, dict[str, Any]]] = [] if args.no_default else [("default", {})]
    variants += [(f"ae fused by {rule}", {"autoencoder": "features", "fusion": rule}) for rule in args.autoencoder]
    variants += [(f"layers={pair}", {"layers": pair.split(",")}) for pair in args.layers]
    variants += [(f"stream_chunk={rows}", {"stream_chunk": rows}) for rows in args.stream_chunk]
    if args.ablation:
        variants += [
            ("selection=none", {"selection": "none"}),
            ("selection=random", {"selection": "random"}),
            ("coreset_ratio=0.01", {"coreset_ratio": 0.01}),
            ("layer_balance=False", {"layer_balance": False}),
        ]
    rows = []
    header = (f"| {'category':18s} | {'config':26s} | img AUROC | pix AUROC |  PRO  | good FPR | recall | "
              f"fit s | ms/img | bank  | index MB | peak MB | recall @1/2/5% FPR |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for cat in args.categories:
        for name, extra in variants:
            params = {**base, **extra}
            for suffix, m in run_isolated(str(args.data / cat), params, args.train_limit):
                label = name + suffix
                rows.append({"category": cat, "config": label, "params": params, **m})
                print(f"| {cat:18s} | {label:26s} | {m['image_auroc']:9.3f} | {m['pixel_auroc']:9.3f} | "
                      f"{m['pro']:5.3f} | {m['good_fpr']:8.3f} | {m['defect_recall']:6.3f} | {m['fit_seconds']:5.1f} | "
                      f"{m['score_ms_per_image']:6.1f} | {m['bank_size']:5d} | {m['index_mb']:8.1f} | "
                      f"{m['peak_rss_mb']:7.0f} | {_curve(m):18s} |", flush=True)
        ref = ANOMALIB.get(cat)
        if ref and args.backbone == "efficientnet_lite0":
            print(f"| {cat:18s} | {'anomalib 2.7 (ref)':26s} | {ref['image_auroc']:9.3f} | {ref['pixel_auroc']:9.3f} | "
                  f"{ref['pro']:5.3f} |          |        |       |        |       |          |         |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
