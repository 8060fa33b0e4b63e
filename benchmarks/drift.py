"""Drift detection on real images: how many parts until a changed line is reported, and how often a clean one is.

For each shared category: fit the defaults (efficientnet_lite0), score every good test image as it is and as a line
changes it (brighter, darker, lower contrast, blurred, camera shifted, camera rotated, a color cast; and, with nothing
changed at the camera, the photos saved as JPEGs by the client), then simulate
streams by drawing parts at random from those scores:

* clean streams: ``--clean-parts`` good parts (bootstrapped); a stream that alarms anywhere is a false alarm;
* changed streams: ``--window`` clean parts, then changed parts until the monitor alarms; the delay is the number of
  changed parts it took (censored at ``--max-delay``).

Three tests are compared on the same streams: the product's KS test over its three quantities
(anomaly_service/drift.py: one-sided, the window above the reference), the same test two-sided (the monitor before
it was made one-sided), and the population-stability index over the three with the customary 0.25 alarm level.

``--fit-images N`` fits on N evenly spaced training images instead of all of them, as a plant starting a line does;
the parts streamed are then the training images left out of the fit and the good test images.

    python benchmarks/drift.py                         # the three shared categories
    python benchmarks/drift.py --categories mvtec_ad/bottle --streams 50
    python benchmarks/drift.py --fit-images 20         # a small fit: its leave-one-out reference runs high
    python benchmarks/drift.py --candidates            # which per-part statistics a change moves at all
    python benchmarks/drift.py --cost                  # what tracking adds per scored part
    python benchmarks/drift.py --lighting              # a lighting rule the monitor does not have (issue #18)

``--candidates`` prints, per change, the KS statistic of the changed good test images against the training images
for the monitor's statistics and for candidates it does not track (the pooled feature's distance to the training
mean, plain and whitened over its main directions; the raw image's mean grey level and contrast): a change no
statistic moves further than a clean line does cannot be alarmed on without false alarms (docs/decisions.md).

``--lighting`` measures a rule the product was not given (docs/decisions.md, drift): each part's mean grey level
and contrast (grey std) against the training images', alarming where a two-sided KS test is significant (the
monitor's alpha and p-values) and the window's median moved by at least a stated fraction of the training images'
median. No model is fitted: the streams are of the photos' grey statistics, built as above, and beside them clean
streams whose parts come in runs of ``--run`` alike in brightness (each clean stream sorted by grey level, cut
into runs, the runs shuffled), as a line that makes parts in batches sends them.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]


def _pil(fn: Callable[[Image.Image], Image.Image]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: np.asarray(fn(Image.fromarray(a)).convert("RGB"))


def _shift(a: np.ndarray) -> np.ndarray:
    dy, dx = max(1, a.shape[0] // 25), max(1, a.shape[1] // 25)  # 4% of the frame
    return np.roll(np.roll(a, dy, axis=0), dx, axis=1)


def _jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    """The photo as a client that saves it as a JPEG at ``quality`` sends it (decoded as the service decodes it)."""
    from anomaly_service.images import load_image

    def saved(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=quality)
        return load_image(buf.getvalue())

    return saved


def _cast(a: np.ndarray) -> np.ndarray:
    return np.clip(a.astype(np.float32) * np.array([1.12, 1.0, 0.88]), 0, 255).astype(np.uint8)


CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "brightness +20%": _pil(lambda im: ImageEnhance.Brightness(im).enhance(1.2)),
    "brightness -20%": _pil(lambda im: ImageEnhance.Brightness(im).enhance(0.8)),
    "contrast -25%": _pil(lambda im: ImageEnhance.Contrast(im).enhance(0.75)),
    "blur (sigma 1.5 px)": _pil(lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
    "camera shift 4%": _shift,
    "camera rotation 3 deg": _pil(lambda im: im.rotate(3, resample=Image.BILINEAR)),
    "color cast (R+12%, B-12%)": _cast,
    # no change at the camera: the client saves the photos as JPEGs (the good ones were PNGs)
    "saved as JPEG, quality 92": _jpeg(92),
    "saved as JPEG, quality 75": _jpeg(75),
}


METHODS = {"ks": "KS one-sided (product)", "ks-two": "KS two-sided", "psi": "PSI"}


def _scores(model, images: list[np.ndarray]) -> np.ndarray:
    """Per part, the monitor's three quantities (columns in STATISTICS order)."""
    from anomaly_service.drift import feature_distance, typical_distance

    image_map = model.catalog_.image_map
    return np.array([(r.normalized_score, typical_distance(r.anomaly_map, r.calibration.pixel_sample),
                      feature_distance(image_map, r.matches.pooled)) for r in model.score_many(images)], dtype=float)


def _two_sided() -> type:
    from anomaly_service.drift import DriftMonitor

    class TwoSided(DriftMonitor):
        alternative = "two-sided"

    return TwoSided


def _run_stream(parts: np.ndarray, reference: dict[str, np.ndarray], method: str, window: int, min_parts: int,
                start: int = 0) -> int | None:
    """Index (from ``start``) of the first part at which the monitor alarms, or None."""
    from anomaly_service.drift import STATISTICS, DriftMonitor, psi

    TwoSided = _two_sided()

    if method in ("ks", "ks-two"):
        mon = (DriftMonitor if method == "ks" else TwoSided)(reference, window=window, min_parts=min_parts)
        for i, row in enumerate(parts):
            mon.observe(*row)
            if i >= start and i + 1 >= min_parts and mon.status().alarm:
                return i - start
        return None
    for i in range(len(parts)):
        lo = max(0, i + 1 - window)
        if i >= start and i + 1 >= min_parts:
            win = parts[lo : i + 1]
            if max(psi(reference[s], win[:, STATISTICS.index(s)]) for s in reference) > 0.25:
                return i - start
    return None


def _grey_stats(a: np.ndarray) -> tuple[float, float]:
    g = a.astype(np.float32).mean(-1) if a.ndim == 3 else a.astype(np.float32)
    return float(g.mean()), float(g.std())


def candidates(categories: list[str], directions: int = 20) -> None:
    """KS of each statistic, changed (and clean) good test images against the training images."""
    from scipy.stats import ks_2samp

    from anomaly_service import AnomalyModel
    from anomaly_service.drift import typical_distance
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    names = ["normalized score", "typical distance", "pooled: distance to mean",
             f"pooled: whitened ({directions} dirs)", "grey mean", "grey std"]
    print("| category | change | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for cat in categories:
        train, samples = read_category(DATA / cat)
        model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
        cal = model.calibration_
        train_images = [load_image(p) for p in train]
        # the training images' pooled features (scoring them only reads the mean of their patch features)
        pooled = np.stack([r.matches.pooled for r in model.score_many(train_images)]).astype(np.float64)
        n, mean = len(pooled), pooled.mean(0)
        _, sv, vt = np.linalg.svd(pooled - mean, full_matrices=False)
        k = min(directions, len(sv))
        scale = np.maximum(sv[:k] / np.sqrt(n - 1), 1e-9)

        def pooled_stats(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            d = p - mean
            return np.linalg.norm(d, axis=1), np.linalg.norm((d @ vt[:k].T) / scale, axis=1)

        ref_plain, ref_white = pooled_stats(pooled)
        reference = [np.asarray(cal.normalize(np.asarray(cal.holdout_scores))), np.asarray(cal.holdout_distances),
                     ref_plain * n / (n - 1),  # each image's distance to the mean of the others
                     ref_white, *np.array([_grey_stats(a) for a in train_images]).T]

        def stats(images: list[np.ndarray]) -> list[np.ndarray]:
            results = list(model.score_many(images))
            plain, white = pooled_stats(np.stack([r.matches.pooled for r in results]).astype(np.float64))
            grey = np.array([_grey_stats(a) for a in images]).T
            return [np.array([r.normalized_score for r in results]),
                    np.array([typical_distance(r.anomaly_map, r.calibration.pixel_sample) for r in results]), plain,
                    white, *grey]

        goods = [load_image(s.path) for s in samples if s.label == 0]
        for name, change in [("none (clean test)", None), *CHANGES.items()]:
            got = stats(goods if change is None else [change(g) for g in goods])
            cells = [f"{ks_2samp(a, b).statistic:.2f}" for a, b in zip(got, reference)]
            print(f"| {cat} | {name} | " + " | ".join(cells) + " |", flush=True)


# (name, least relative move of the grey level's median, of the contrast's; None: that quantity not judged)
LIGHTING_RULES = [("level 10%", 0.10, None), ("level 15%", 0.15, None), ("contrast 20%", None, 0.20),
                  ("contrast 25%", None, 0.25), ("level 10% or contrast 20%", 0.10, 0.20)]


def _lighting_trace(parts: np.ndarray, reference: np.ndarray, window: int, min_parts: int,
                    start: int = 0) -> np.ndarray:
    """Per part from ``start`` (and from ``min_parts`` on): for the grey level and the contrast, the two-sided KS
    p-value of the window against the training images and its median's move as a fraction of theirs."""
    from scipy.stats import ks_2samp

    from anomaly_service.drift import EXACT_PAIRS

    ref_median = np.median(reference, axis=0)
    rows = []
    for i in range(max(start, min_parts - 1), len(parts)):
        win = parts[max(0, i + 1 - window) : i + 1]
        row = []
        for q in range(2):
            exact = len(win) * len(reference) <= EXACT_PAIRS
            row += [ks_2samp(win[:, q], reference[:, q], method="exact" if exact else "asymp").pvalue,
                    np.median(win[:, q]) / ref_median[q] - 1.0]
        rows.append(row)
    return np.array(rows).reshape(-1, 4)


def _lighting_alarm(trace: np.ndarray, level: float | None, contrast: float | None, alpha: float) -> int | None:
    """Parts (from the trace's start) until the rule alarms, or None."""
    hit = np.zeros(len(trace), bool)
    for q, least in enumerate((level, contrast)):
        if least is not None:
            hit |= (trace[:, 2 * q] < alpha) & (np.abs(trace[:, 2 * q + 1]) >= least)
    found = np.flatnonzero(hit)
    return None if not found.size else int(found[0])


def lighting_rule(categories: list[str], streams: int, clean_parts: int, window: int, min_parts: int,
                  max_delay: int, run: int, pixels: str = "grid", alpha: float = 1e-3) -> None:
    """Detection delay and false alarms of the lighting rule per category, change and least move. ``pixels``:
    ``grid`` reads each photo's grey values on the maps' grid of about 4,096 pixels (map_sample.py), as a
    service would to keep the cost per photo small; ``all`` reads every pixel, as ``--candidates`` does."""
    from scipy.stats import ks_2samp

    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image
    from anomaly_service.map_sample import sample

    def grey(images: list[np.ndarray]) -> np.ndarray:
        if pixels == "all":
            return np.array([_grey_stats(a) for a in images]).reshape(-1, 2)
        return np.array([_grey_stats(sample(a.astype(np.float32).mean(-1), "grid")) for a in images]).reshape(-1, 2)

    header = "| category | stream | " + " | ".join(name for name, _, _ in LIGHTING_RULES) + " |"
    notes, lines = [], [header, "| --- | --- |" + " ---: |" * len(LIGHTING_RULES)]
    for cat in categories:
        train, samples = read_category(DATA / cat)
        reference = grey([load_image(p) for p in train])
        goods = [load_image(s.path) for s in samples if s.label == 0]
        clean = grey(goods)
        cv = reference.std(0) / reference.mean(0)
        moved = np.median(clean, 0) / np.median(reference, 0) - 1
        ks = [ks_2samp(clean[:, q], reference[:, q]).statistic for q in range(2)]
        rng = np.random.default_rng(0)
        cleans = [clean[rng.integers(0, len(clean), clean_parts)] for _ in range(streams)]
        runs = []
        for p in cleans:
            p = p[np.argsort(p[:, 0], kind="stable")]
            blocks = [p[j : j + run] for j in range(0, len(p), run)]
            runs.append(np.concatenate([blocks[b] for b in rng.permutation(len(blocks))]))
        rows: dict[str, list[str]] = {}
        largest = {}
        for label, group in (("clean (false alarms)", cleans), (f"clean, in runs of {run} (false alarms)", runs)):
            traces = [_lighting_trace(p, reference, window, min_parts) for p in group]
            rows[label] = [f"{sum(_lighting_alarm(t, lv, ct, alpha) is not None for t in traces)}/{streams}"
                           for _, lv, ct in LIGHTING_RULES]
            largest[label] = [max(float(np.max(np.where(t[:, 2 * q] < alpha, np.abs(t[:, 2 * q + 1]), 0.0)))
                                  for t in traces) for q in range(2)]
        for name, change in CHANGES.items():
            changed = grey([change(g) for g in goods])
            parts = [np.concatenate([clean[rng.integers(0, len(clean), window)],
                                     changed[rng.integers(0, len(changed), max_delay)]]) for _ in range(streams)]
            traces = [_lighting_trace(p, reference, window, min_parts, start=window) for p in parts]
            cells = []
            for _, lv, ct in LIGHTING_RULES:
                found = [d for d in (_lighting_alarm(t, lv, ct, alpha) for t in traces) if d is not None]
                cells.append(f"{len(found)}/{streams}" + (f", {np.median(found):.0f}" if found else ""))
            rows[name] = cells
        for label, cells in rows.items():
            lines.append(f"| {cat} | {label} | " + " | ".join(cells) + " |")
        big = [" / ".join(f"{v:.3f}" for v in vs) for vs in largest.values()]
        notes.append(f"* {cat}: training images' grey level CV {cv[0]:.3f}, contrast CV {cv[1]:.3f}; good test "
                     f"against them: level {moved[0]:+.3f} (KS {ks[0]:.2f}), contrast {moved[1]:+.3f} "
                     f"(KS {ks[1]:.2f}); largest significant move of a window's median, level / contrast: clean "
                     f"{big[0]}, in runs of {run} {big[1]}")
        print(f"{cat} done", file=sys.stderr, flush=True)
    print("\n".join(lines + [""] + notes), flush=True)


def cost(categories: list[str], repeats: int = 200) -> None:
    """Microseconds the service spends on drift per scored part (DriftBook.observe on the part's real map, as the
    scoring route calls it) and per status read (the KS tests over a full window; /metrics and the drift route)."""
    import time

    from anomaly_service import AnomalyModel
    from anomaly_service.drift import DriftBook
    from anomaly_service.evaluate import read_category

    print("| category | map (px) | observe per part, us: median / p95 | status per read, us: median |")
    print("|---|---|---|---:|")
    for cat in categories:
        train, samples = read_category(DATA / cat)
        model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train[:: max(1, len(train) // 60)])
        results = list(model.score_many([s.path for s in samples[:: max(1, len(samples) // 20)]]))
        book, cal, image_map = DriftBook(), model.calibration_, model.catalog_.image_map
        r = results[0]  # the monitor is made once
        book.observe("m", 1, cal, image_map, r.normalized_score, r.anomaly_map, r.matches.pooled)
        per_part = []
        for i in range(repeats):
            r = results[i % len(results)]
            t0 = time.perf_counter()
            book.observe("m", 1, cal, image_map, r.normalized_score, r.anomaly_map, r.matches.pooled)
            per_part.append(time.perf_counter() - t0)
        reads = []
        for _ in range(20):
            t0 = time.perf_counter()
            book.status("m", 1, cal, image_map)
            reads.append(time.perf_counter() - t0)
        us = 1e6 * np.array(per_part)
        print(f"| {cat} | {'x'.join(map(str, results[0].anomaly_map.shape))} | {np.median(us):.0f} / "
              f"{np.quantile(us, 0.95):.0f} | {1e6 * np.median(reads):.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--streams", type=int, default=40, help="Simulated streams per change and for clean runs")
    ap.add_argument("--clean-parts", type=int, default=1000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--min-parts", type=int, default=30)
    ap.add_argument("--max-delay", type=int, default=300)
    ap.add_argument("--fit-images", type=int, default=0,
                    help="Fit on this many evenly spaced training images (0: all); stream the rest with the test's")
    ap.add_argument("--candidates", action="store_true", help="KS of candidate statistics per change instead.")
    ap.add_argument("--cost", action="store_true", help="Time what drift tracking adds per part instead.")
    ap.add_argument("--lighting", action="store_true",
                    help="Delays and false alarms of a grey level / contrast rule (not in the product) instead.")
    ap.add_argument("--run", type=int, default=20, help="With --lighting: parts alike in brightness in a row")
    ap.add_argument("--grey-pixels", choices=["grid", "all"], default="grid",
                    help="With --lighting: a photo's grey values on a grid of about 4,096 pixels, or all of them")
    args = ap.parse_args()
    if args.lighting:
        lighting_rule(args.categories, args.streams, args.clean_parts, args.window, args.min_parts, args.max_delay,
                      args.run, args.grey_pixels)
        return
    if args.cost:
        cost(args.categories)
        return
    if args.candidates:
        candidates(args.categories)
        return

    from anomaly_service import AnomalyModel
    from anomaly_service.drift import DriftMonitor
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    print("| category | stream | " + " | ".join(f"{t}: alarmed | {t}: median delay (parts)" for t in METHODS.values())
          + " |")
    print("| --- | --- |" + " ---: | ---: |" * len(METHODS))
    for cat in args.categories:
        train, samples = read_category(DATA / cat)
        left: list[Path] = []
        if 0 < args.fit_images < len(train):
            picked = set(np.linspace(0, len(train) - 1, args.fit_images).round().astype(int).tolist())
            train, left = [p for i, p in enumerate(train) if i in picked], [p for i, p in enumerate(train)
                                                                             if i not in picked]
        model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
        # the service's own reference, as DriftBook builds it for a served model
        reference = DriftMonitor.for_model(model.calibration_, model.catalog_.image_map).reference
        goods = [load_image(p) for p in left] + [load_image(s.path) for s in samples if s.label == 0]
        clean = _scores(model, goods)
        rng = np.random.default_rng(0)
        rows = {}
        # the same streams for every method, so their columns differ by the test alone
        streams = [clean[rng.integers(0, len(clean), args.clean_parts)] for _ in range(args.streams)]
        for method in METHODS:
            alarms = sum(_run_stream(p, reference, method, args.window, args.min_parts) is not None for p in streams)
            rows.setdefault("clean (false alarms)", {})[method] = (alarms, None)
        for name, change in CHANGES.items():
            changed = _scores(model, [change(g) for g in goods])
            streams = [np.concatenate([clean[rng.integers(0, len(clean), args.window)],
                                       changed[rng.integers(0, len(changed), args.max_delay)]])
                       for _ in range(args.streams)]
            for method in METHODS:
                delays = [_run_stream(p, reference, method, args.window, args.min_parts, start=args.window)
                          for p in streams]
                found = [d for d in delays if d is not None]
                rows.setdefault(name, {})[method] = (len(found), float(np.median(found)) if found else None)
        for name, res in rows.items():
            cells = []
            for method in METHODS:
                n, med = res[method]
                cells += [f"{n}/{args.streams}", "-" if med is None else f"{med:.0f}"]
            fit = f" ({len(train)} fitted)" if left else ""
            print(f"| {cat}{fit} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
