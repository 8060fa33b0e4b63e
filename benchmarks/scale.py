"""How the product's time and memory grow with the work: fits of 100 to 10,000 images, banks of 20k to 2M patches.

``fit``: fit time, per-step seconds, peak memory (RSS of the fitting process), bank size and the model's size on
disk against the number of training images. The shared images are few, so the training sets are *augmented*:
random crops (80-100% of the side), flips and quarter turns of one shared category's good images, written once as
JPEG files under ``--workdir`` (the fit reads files, as on a line). Each size fits in its own process; the table
ends with the exponent of a power-law fit of time against images (1 = linear, 2 = quadratic) per step.

``latency``: the product's own scoring path (``AnomalyModel.score``, one photo at a time) with today's bank (the
default fit of the category's good images, searched exactly as before ``ivf`` became the default there, and with the
default search) against a bank of about a million patches: a fit of ``--large-images`` augmented images that keeps
every patch (``coreset_ratio`` 1, so the bank is the patches themselves, with a hold-out threshold). Both are fitted
and saved by a child process and loaded here, as the service loads them. Per photo: median end-to-end and kNN
milliseconds over interleaved rounds, and the ratio to the exact search of today's bank (the issue's reference); per
search: the share of patches whose neighbour agrees with the exact search over the same bank, and image AUROC on the
category's test photos.

``search``: per-image kNN latency and memory against the bank size for the exact search and the approximate
indexes, with their agreement with the exact nearest neighbour (same neighbour, or one at the same distance to
within 1e-4) and the largest relative distance error at the 99.9th percentile. The banks are random subsets of
the patches of the augmented images (in the kept dimensions), the queries the patches of the category's test
photos.

    python benchmarks/scale.py fit --sizes 100 300 1000 3000 10000
    python benchmarks/scale.py search --banks 20000 200000 1000000 2000000
    python benchmarks/scale.py latency --large-images 1100 --nprobe 16 24 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def augmented_set(category: str, n: int, workdir: Path, seed: int = 0) -> list[Path]:
    """``n`` augmented copies of ``category``'s good training images as JPEG files (made once, reused)."""
    from PIL import Image

    out = workdir / category.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    have = sorted(out.glob("*.jpg"))
    if len(have) >= n:
        return have[:n]
    base = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((DATA / category / "train" / "good").glob("*"))]
    rng = np.random.default_rng(seed + len(have))
    for i in range(len(have), n):
        a = base[int(rng.integers(len(base)))]
        h, w = a.shape[:2]
        s = rng.uniform(0.8, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        a = a[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rng.random() < 0.5:
            a = a[::-1]
        a = np.rot90(a, int(rng.integers(4)))
        Image.fromarray(np.ascontiguousarray(a)).resize((w, h), Image.BILINEAR).save(out / f"{i:05d}.jpg", quality=95)
    return sorted(out.glob("*.jpg"))[:n]


# ------------------------------------------------------------------------------------------------------ fit
def _fit_child(args: argparse.Namespace) -> None:
    """In a fresh process: fit on the first ``--n`` augmented images, print one JSON line."""
    from anomaly_service.model import AnomalyModel

    files = augmented_set(args.category, args.n, args.workdir)
    params: dict[str, Any] = {"backbone": args.backbone}
    if args.index:
        params["index"] = args.index
    t0 = time.perf_counter()
    model = AnomalyModel(progress=args.progress, **params).fit(files)
    seconds = time.perf_counter() - t0
    path = model.save(args.workdir / "models" / f"n{args.n}")
    m = model.manifest_
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(json.dumps({"n": args.n, "fit_s": round(seconds, 1), "coreset_s": m.coreset.seconds,
                      "left_out_s": m.training.left_out_seconds, "bank": m.coreset.size,
                      "patches": m.coreset.from_patches, "chunks": m.coreset.chunks,
                      "on_disk": m.training.patches_on_disk, "index": m.index.kind, "model_mb": round(size / 2**20, 1),
                      "radius": m.coreset.coverage_radius}))


def run_fits(args: argparse.Namespace) -> list[dict[str, Any]]:
    augmented_set(args.category, max(args.sizes), args.workdir)  # made before any timing
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "_fit", "--n", str(n), "--category", args.category, "--workdir",
               str(args.workdir), "--backbone", args.backbone] + (["--index", args.index] if args.index else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"fit of {n} images failed")
        row = json.loads(out.strip().splitlines()[-1])
        # ru_maxrss of children is the largest of any child so far; sizes run in increasing order
        row["peak_gb"] = round(usage.ru_maxrss / 2**20, 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def power_law(ns: list[int], ts: list[float]) -> float:
    """Exponent b of t = a n^b, least squares in log-log (1: linear, 2: quadratic)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.maximum(np.asarray(ts, float), 1e-3))
    return float(np.polyfit(x, y, 1)[0])


def fit_table(rows: list[dict[str, Any]], category: str) -> str:
    head = ("| images | patches | fit s | features + rest s | coreset s | leave-one-out s | chunks | bank | index | "
            "model MB | peak RSS GB |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    lines = [f"Augmented {category} (crops, flips, quarter turns of its good images, JPEG files):", "", head]
    for r in rows:
        rest = r["fit_s"] - r["coreset_s"] - r["left_out_s"]
        lines.append(f"| {r['n']} | {r['patches']} | {r['fit_s']:.0f} | {rest:.0f} | {r['coreset_s']:.0f} | "
                     f"{r['left_out_s']:.0f} | {r['chunks']} | {r['bank']} | {r['index']} | {r['model_mb']} | "
                     f"{r['peak_gb']} |")
    if len(rows) >= 3:
        ns = [r["n"] for r in rows]
        fits = {k: power_law(ns, [r[k] if k != "rest" else r["fit_s"] - r["coreset_s"] - r["left_out_s"]
                                   for r in rows]) for k in ("fit_s", "rest", "coreset_s", "left_out_s")}
        lines += ["", "Growth exponent b of time ~ images^b: " +
                  ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in fits.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- search
def _patches(category: str, n_images: int, workdir: Path, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    """Kept-dimension patches of ``n_images`` augmented images and of the category's test photos (cached)."""
    import torch

    from anomaly_service.images import load_image
    from anomaly_service.model import AnomalyModel
    from anomaly_service.selection import StdSelector

    cache = workdir / f"patches_{category.replace('/', '_')}_{n_images}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["bank"], z["queries"]
    files = augmented_set(category, n_images, workdir)
    model = AnomalyModel(backbone=backbone, progress=False)
    model.embedder.fit_scale([load_image(files[0]).shape], "fixed-scale")
    feats = []
    for i in range(0, len(files), 8):
        e = model.embedder.embed([load_image(f) for f in files[i : i + 8]]).features
        feats.append(e.reshape(-1, e.shape[-1]).to(torch.float16).numpy())
    allf = np.concatenate(feats)
    keep = StdSelector(0.5).select(torch.from_numpy(allf[:: max(1, len(allf) // 500_000)].astype(np.float32)))
    bank = np.ascontiguousarray(allf[:, keep])
    tests = sorted((DATA / category / "test").rglob("*.png"))[::7][:16]
    q = torch.cat([model.embedder.embed([load_image(t)]).features.reshape(-1, allf.shape[1]) for t in tests])
    queries = q.numpy()[:, keep].astype(np.float32)
    np.savez(cache, bank=bank, queries=queries)
    return bank, queries


def _agreement(d: np.ndarray, i: np.ndarray, d0: np.ndarray, i0: np.ndarray) -> tuple[float, float]:
    same = (i == i0) | (np.abs(d - d0) <= 1e-4 * np.maximum(d0, 1e-6))
    rel = (d - d0) / np.maximum(d0, 1e-6)
    return float(same.mean()), float(np.quantile(rel, 0.999))


def run_search(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch  # noqa: F401  (first: FAISS then shares torch's OpenMP threads, parallelism.py)
    import faiss

    from anomaly_service.index import build_index, search, to_search_device

    n_images = max(args.banks) // 1024 + 64
    allf, queries = _patches(args.category, n_images, args.workdir, args.backbone)
    per_image = 1024
    q = np.ascontiguousarray(queries[: 4 * per_image])
    rng = np.random.default_rng(0)
    rows = []
    for n in args.banks:
        bank = np.ascontiguousarray(allf[np.sort(rng.choice(len(allf), n, replace=False))].astype(np.float32))
        flat = build_index(bank, "flat")
        ref = faiss.IndexFlatL2(bank.shape[1])
        ref.add(bank)
        d0, i0 = search(ref, q, 1)
        d0, i0 = d0[:, 0], i0[:, 0]
        candidates: list[tuple[str, Any, float]] = []
        for prec in ("bf16", "fp32"):
            candidates.append((f"exact ({prec})", to_search_device(flat, False, prec), 0.0))
        for nprobe in args.nprobe:
            t0 = time.perf_counter()
            ivf = build_index(bank, "ivf", nprobe=nprobe)
            candidates.append((f"ivf nprobe={nprobe}", ivf, time.perf_counter() - t0))
        for nprobe in args.fp32_lists:  # the structure ivf had before: fp32 lists, a flat scan of 4 sqrt(N) centroids
            t0 = time.perf_counter()
            nlist = max(1, min(4096, int(4 * np.sqrt(n)), n // 39))
            old = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], nlist)
            old.cp.max_points_per_centroid = 128
            old.train(bank)
            old.add(bank)
            old.nprobe = nprobe
            candidates.append((f"ivf fp32 lists, flat centroids, nprobe={nprobe}", old, time.perf_counter() - t0))
        for ef in args.ef:
            t0 = time.perf_counter()
            h = faiss.IndexHNSWFlat(bank.shape[1], 32)
            h.add(bank)
            h.hnsw.efSearch = ef
            candidates.append((f"hnsw M=32 ef={ef}", h, time.perf_counter() - t0))
        for name, index, build_s in candidates:
            search(index, q[:per_image], 1)  # warm
            times = []
            for r in range(len(q) // per_image):
                t0 = time.perf_counter()
                d, i = search(index, q[r * per_image : (r + 1) * per_image], 1)
                times.append((time.perf_counter() - t0) * 1000)
            d, i = search(index, q, 1)
            agree, p999 = _agreement(d[:, 0], i[:, 0], d0, i0)
            mem = len(faiss.serialize_index(index if isinstance(index, faiss.Index) else flat))
            row = {"bank": n, "search": name, "ms_per_image": round(float(np.median(times)), 1),
                   "agree": round(agree, 4), "rel_err_p999": round(p999, 4), "build_s": round(build_s, 1),
                   "index_mb": round(mem / 2**20, 1)}
            rows.append(row)
            print(row, flush=True)
    return rows


def _latency_fit(args: argparse.Namespace) -> None:
    """In a fresh process: fit and save the latency run's two models (today's default, and the large bank)."""
    from anomaly_service.model import AnomalyModel

    cat = DATA / args.category
    small = AnomalyModel(backbone=args.backbone, progress=args.progress).fit(sorted((cat / "train" / "good").glob("*")))
    small.save(args.workdir / "models" / "latency-default")
    files = augmented_set(args.category, args.large_images, args.workdir)
    t0 = time.perf_counter()
    big = AnomalyModel(backbone=args.backbone, coreset_ratio=1.0, calibration="holdout",
                       progress=args.progress).fit(files)
    print(f"fit of {len(files)} images keeping every patch: {time.perf_counter() - t0:.0f} s, "
          f"bank {big.knn.bank_size}, index {big.manifest_.index.kind}", flush=True)
    big.save(args.workdir / "models" / "latency-large")


def _score_all(model: Any, arrays: list[np.ndarray]) -> tuple[list[float], list[float], list[np.ndarray], list[float]]:
    """Each photo scored alone through the product path: wall ms, kNN-stage ms, per-patch distances, score."""
    model.score(arrays[0])  # warm
    wall, knn, dist, scores = [], [], [], []
    for a in arrays:
        t0 = time.perf_counter()
        r = model.score(a)
        wall.append((time.perf_counter() - t0) * 1000)
        knn.append(r.timing_ms.get("knn", float("nan")))
        dist.append(r.matches.distance.ravel())
        scores.append(r.score)
    return wall, knn, dist, scores


def run_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both models are fitted and saved by a child process, then loaded here as the service loads them: a process
    that has just fitted a million rows has a heap and caches no serving process has. The searches are timed in
    ``--rounds`` interleaved rounds (today's bank, then each nprobe), so the machine's drift over the run falls
    on all of them alike; each row is the median over every photo of every round."""
    import torch  # noqa: F401  (first: FAISS then shares torch's OpenMP threads, parallelism.py)
    import faiss

    from anomaly_service.images import load_image
    from anomaly_service.index import build_index, set_nprobe
    from anomaly_service.metrics import image_auroc
    from anomaly_service.model import AnomalyModel

    cmd = [sys.executable, __file__, "_latency_fit", "--category", args.category, "--workdir", str(args.workdir),
           "--backbone", args.backbone, "--large-images", str(args.large_images)]
    if subprocess.run(cmd).returncode:
        raise SystemExit("fitting the latency models failed")
    cat = DATA / args.category
    tests = sorted((cat / "test").rglob("*.png"))
    labels = np.array([p.parent.name != "good" for p in tests])
    arrays = [load_image(p) for p in tests]
    small = AnomalyModel.load(args.workdir / "models" / "latency-default")
    small_exact = AnomalyModel.load(args.workdir / "models" / "latency-default")
    # the same bank searched exactly, as before ivf was the default there
    small_exact.knn.index_ = build_index(small_exact.knn.bank(), "flat")
    small_exact.use_knn_precision(small_exact.knn_precision)
    big = AnomalyModel.load(args.workdir / "models" / "latency-large")
    runs: list[tuple[str, Any, int | None]] = [(f"exact ({small_exact.knn_search})", small_exact, None),
                                                (f"default ({small.knn_search})", small, None)]
    runs += [(f"ivf nprobe {p}", big, p) for p in args.nprobe]
    timed: dict[str, dict[str, list[Any]]] = {}
    results: dict[str, tuple[list[np.ndarray], list[float]]] = {}

    def measure(name: str, model: Any) -> None:
        wall, knn, dist, scores = _score_all(model, arrays)
        timed.setdefault(name, {"wall": [], "knn": []})
        timed[name]["wall"] += wall
        timed[name]["knn"] += knn
        results[name] = (dist, scores)
        print(f"{name}: {np.median(wall):.1f} ms per photo", flush=True)

    for rnd in range(args.rounds):
        print(f"round {rnd + 1}", flush=True)
        for name, model, nprobe in runs:
            if nprobe is not None:
                set_nprobe(model.knn.index_, nprobe)
            measure(name, model)
    # the exact reference last: its minutes of BLAS over the whole bank leave the machine slower for a while
    reference = "exact (fp32, FAISS)"
    flat = faiss.IndexFlatL2(big.knn.index_.d)
    flat.add(big.knn.bank())
    big.knn._search = flat  # FAISS's exact search over the same bank
    measure(reference, big)
    runs.append((reference, big, None))
    d0 = np.concatenate(results[reference][0])
    rows: list[dict[str, Any]] = []
    for name, model, nprobe in runs:
        ms = float(np.median(timed[name]["wall"]))
        d = np.concatenate(results[name][0])
        rows.append({"bank": model.knn.bank_size, "search": name, "ms_per_image": round(ms, 1),
                     "knn_ms": round(float(np.median(timed[name]["knn"])), 1),
                     "ratio": round(ms / float(np.median(timed[runs[0][0]]["wall"])), 2),
                     "agree": None if nprobe is None else
                     round(float((np.abs(d - d0) <= 1e-4 * np.maximum(d0, 1e-6)).mean()), 4),
                     "image_auroc": round(image_auroc(labels, np.array(results[name][1])), 4)})
    return rows


def latency_table(rows: list[dict[str, Any]], category: str) -> str:
    lines = [f"{category} test photos, one at a time through AnomalyModel.score:", "",
             "| bank | search | ms per photo | of which kNN | x exact, today's bank | agreement with exact "
             "| image AUROC |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        agree = "" if r["agree"] is None else f"{r['agree']:.4f}"
        lines.append(f"| {r['bank']} | {r['search']} | {r['ms_per_image']} | {r['knn_ms']} | {r['ratio']} | "
                     f"{agree} | {r['image_auroc']:.4f} |")
    return "\n".join(lines)


def search_table(rows: list[dict[str, Any]], category: str) -> str:
    lines = [f"Banks drawn from augmented {category} patches; 1024 queries (one photo) per search:", "",
             "| bank | search | ms per photo | agreement | distance error p99.9 | build s | index MB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['bank']} | {r['search']} | {r['ms_per_image']} | {r['agree']:.4f} | "
                     f"{r['rel_err_p999']:.4f} | {r['build_s']} | {r['index_mb']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("fit", "search", "latency", "_fit", "_latency_fit"))
    ap.add_argument("--category", default="mvtec_ad/bottle")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/anomaly-scale"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000, 10000])
    ap.add_argument("--index", default=None, help="fit: --index for every fit (default: the model default)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--banks", type=int, nargs="+", default=[20_000, 200_000, 1_000_000, 2_000_000])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--fp32-lists", type=int, nargs="*", default=[],
                    help="search: also the earlier ivf structure (fp32 lists, flat centroid scan) at these nprobe")
    ap.add_argument("--ef", type=int, nargs="*", default=[], help="also HNSW (M=32) at these efSearch")
    ap.add_argument("--large-images", type=int, default=1100, help="latency: augmented images of the large bank")
    ap.add_argument("--rounds", type=int, default=3, help="latency: interleaved rounds over the test photos")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.what in ("_fit", "_latency_fit"):
        {"_fit": _fit_child, "_latency_fit": _latency_fit}[args.what](args)
        return
    import platform

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    run, table = {"fit": (run_fits, fit_table), "search": (run_search, search_table),
                  "latency": (run_latency, latency_table)}[args.what]
    rows = run(args)
    print(f"\n{args.what} at {commit} on {platform.machine()}, {os.cpu_count()} CPUs\n")
    print(table(rows, args.category))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
