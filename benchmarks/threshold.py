"""Where the threshold comes from: which unseen-normal scores, which rule, and what each gives on the test set.

For each shared category: fit the defaults (efficientnet_lite0) once, then score every training image against the
bank without its own patches (leave-one-out, the product's calibration) and without its whole fold (k contiguous
folds of the listing, which also removes its neighbours in time: same part, same batch), and set the threshold
from those scores by each rule. Report the good test images' false-alarm rate and the defect recall at each, next
to the best the test allows (recall at a 2% false-alarm rate, read off the test itself: not a usable rule, the
ceiling). Each rule's threshold is set as the fit sets its own (:func:`as_the_fit_sets_it`: the outliers screened
out, a first threshold, the images above it left out, the threshold again).

    python benchmarks/threshold.py
    python benchmarks/threshold.py --categories kolektorsdd/kos --folds 5 10
    python benchmarks/threshold.py --cost --rounds 3   # fit seconds: leave-one-out (+ the guard) against holdout
    python benchmarks/threshold.py --seeds 10          # how far each rule's threshold moves between fits

``--levers`` measures what moves recall at a low false-alarm rate where the threshold cannot give both: the layer
weighting (a second fit, unbalanced), and on the default fit the image score (the map's hottest pixel against the
hottest patch), the map smoothing (sigma) and the neighbour count k (scoring-time settings, so the same bank is
re-scored); image AUROC and recall at 1% / 2% / 5% good false alarms, read off the test set (no threshold).

``--seeds N`` fits each category N times, with seeds 0..N-1 (the coreset's sampling and projection), and prints how
far each rule's threshold moves between fits of the same images and what that does to the good false-alarm rate
and the recall on the test: a plant re-fits, and a threshold that moves with the seed moves its decisions.

``--cost`` times the fit both ways in interleaved rounds (run it alone on the machine): the issue's budget is a fit
of at most 1.5x the holdout fit's time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
PRODUCT_RULE = "exponential tail, 1 in 500 (product)"


def rule_functions() -> dict[str, Callable[[np.ndarray], float | None]]:
    """Every rule compared, each a function of a sample of scores (None: no answer on it)."""
    from anomaly_service.calibration import TAIL_P, pareto_tail_threshold, tail_threshold

    out: dict[str, Callable[[np.ndarray], float | None]] = {
        "max(mean+3sd, max)": lambda s: max(float(s.mean() + 3 * s.std(ddof=1)), float(s.max())),
        "99th percentile": lambda s: float(np.quantile(s, 0.99)),
        "99.5th percentile": lambda s: float(np.quantile(s, 0.995))}
    for p in (0.01, TAIL_P):
        out[f"generalized Pareto tail, 1 in {round(1 / p)}" + (" (before)" if p == TAIL_P else "")] = \
            lambda s, p=p: pareto_tail_threshold(s, p)
        out[PRODUCT_RULE if p == TAIL_P else f"exponential tail, 1 in {round(1 / p)}"] = \
            lambda s, p=p: tail_threshold(s, p)
    return out


def as_the_fit_sets_it(scores: np.ndarray, rule: Callable[[np.ndarray], float | None]) -> float | None:
    """``rule``'s threshold on leave-one-out ``scores`` set the way the fit sets it (model.py,
    contamination.find_suspects): the rule on the images within robust z CALIBRATION_SCREEN_Z, then again on the
    images not above that first threshold. The first threshold decides which images the second one sees, so a rule
    that swings moves both."""
    from anomaly_service.contamination import CALIBRATION_SCREEN_Z, robust_z

    first = rule(scores[robust_z(scores) <= CALIBRATION_SCREEN_Z])
    return None if first is None else rule(scores[~(scores > first)])


def left_out_scores(model: Any, name: str, j: int, folds: dict[str, np.ndarray | None]) -> dict[str, float]:
    """Training image ``name`` (the ``j``-th in the model's catalog) scored against the bank without its own patches
    (a fold of None) or without its whole fold, per entry of ``folds``."""
    from anomaly_service.embedder import Embedded
    from anomaly_service.images import load_image

    emb = model.embedder.embed([load_image(name)], keep=model.knn.keep)
    batch = Embedded(emb.features, emb.work_size, emb.shapes, inspect=emb.inspect)
    return {v: model.knn.score_left_out(batch, [j], f)[0][0] for v, f in folds.items()}


def test_set(category: str) -> tuple[list[Any], np.ndarray, list[np.ndarray]]:
    """A category's training paths, and its test images with their labels (1: defective)."""
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image

    train, samples = read_category(DATA / category)
    return train, np.array([s.label for s in samples]), [load_image(s.path) for s in samples]


def run(category: str, folds: list[int]) -> None:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    train, samples = read_category(DATA / category)
    model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in model.score_many([s.path for s in samples])])
    good, bad = scores[labels == 0], scores[labels == 1]
    cat = model.catalog_
    assert cat is not None
    position = {str(p): i for i, p in enumerate(train)}
    where = np.array([position[n] for n in cat.names])
    variants: dict[str, np.ndarray | None] = {"leave-one-out": None}
    variants.update({f"{k} contiguous folds": (where * k) // len(train) for k in folds})
    samples_by: dict[str, list[float]] = {v: [] for v in variants}
    for j, name in enumerate(cat.names):
        for v, score in left_out_scores(model, name, j, variants).items():
            samples_by[v].append(score)
    ceiling = float(np.quantile(good, 0.98))
    print(f"\n{category}: {len(cat)} training images, {len(good)} good and {len(bad)} defective test images; "
          f"ceiling (test's own 98th percentile of good): recall {np.mean(bad > ceiling):.3f} at FPR "
          f"{np.mean(good > ceiling):.3f}")
    print("| sample | rule | threshold | good FPR | defect recall |")
    print("|---|---|---|---|---|")
    for v, s in samples_by.items():
        arr = np.array(s, dtype=np.float64)
        for rule, f in rule_functions().items():
            t = as_the_fit_sets_it(arr, f)
            if t is not None:
                print(f"| {v} | {rule} | {t:.2f} | {np.mean(good > t):.3f} | {np.mean(bad > t):.3f} |", flush=True)


def seeds(categories: list[str], n: int) -> None:
    """Each rule's threshold over ``n`` fits of the same images (seeds 0..n-1), set from each fit's leave-one-out
    scores as the fit sets its own (:func:`as_the_fit_sets_it`), and the test's good false-alarm rate and recall
    at it."""
    from anomaly_service import AnomalyModel

    print("| category | rule | threshold: mean | sd (% of mean) | good FPR: mean | range | recall: mean | range |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for category in categories:
        train, labels, images = test_set(category)
        by_rule: dict[str, list[tuple[float, float, float]]] = {}
        for seed in range(n):
            model = AnomalyModel(backbone="efficientnet_lite0", progress=False, seed=seed).fit(train)
            assert model.calibration_ is not None and model.catalog_ is not None
            # every training image's leave-one-out score: the calibrated ones, and the outliers the fit set aside
            loo = list(model.calibration_.holdout_scores)
            for name in model.manifest_.training.left_out_of_threshold:
                loo.append(left_out_scores(model, name, model.catalog_.names.index(name), {"": None})[""])
            sample = np.array(loo, dtype=np.float64)
            thresholds = {name: as_the_fit_sets_it(sample, rule) for name, rule in rule_functions().items()}
            mine = thresholds[PRODUCT_RULE]
            if mine is None or not np.isclose(mine, model.calibration_.threshold, rtol=1e-6):
                print(f"| {category} | seed {seed}: the product rule here gives {mine}, the fit "
                      f"{model.calibration_.threshold}: these rows do not reproduce the fit |", flush=True)
            scores = np.array([r.score for r in model.score_many(images)])
            good, bad = scores[labels == 0], scores[labels == 1]
            for name, t in thresholds.items():
                if t is not None:
                    by_rule.setdefault(name, []).append((t, float(np.mean(good > t)), float(np.mean(bad > t))))
        for name, rows in by_rule.items():
            if len(rows) < n:  # a rule that had no answer on some fit
                continue
            a = np.array(rows)
            t_sd = float(a[:, 0].std(ddof=1))
            print(f"| {category} | {name} | {a[:, 0].mean():.2f} | {t_sd:.2f} ({100 * t_sd / a[:, 0].mean():.1f}%) | "
                  f"{a[:, 1].mean():.3f} | {a[:, 1].min():.3f}-{a[:, 1].max():.3f} | {a[:, 2].mean():.3f} | "
                  f"{a[:, 2].min():.3f}-{a[:, 2].max():.3f} |", flush=True)


def levers(categories: list[str]) -> None:
    """Recall at fixed good false-alarm rates for each lever, one at a time from the defaults."""
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import recall_at_fpr
    from anomaly_service.metrics import image_auroc

    print("| category | lever | image AUROC | recall at 1% / 2% / 5% false alarms |")
    print("|---|---|---:|---|")
    for category in categories:
        train, labels, images = test_set(category)

        def row(model: "AnomalyModel", lever: str) -> None:
            scores = np.array([r.score for r in model.score_many(images)])  # raw: the curve needs no threshold
            curve = " / ".join(f"{recall_at_fpr(labels, scores, f):.2f}" for f in (0.01, 0.02, 0.05))
            print(f"| {category} | {lever} | {image_auroc(labels, scores):.3f} | {curve} |", flush=True)

        model = AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train)
        knn = model.knn
        row(model, f"defaults (balanced layers, {knn.image_score}, sigma {knn.sigma:g}, k {knn.k})")
        default = (knn.image_score, knn.sigma, knn.k)
        for attr, value in (("image_score", "max"), ("sigma", 2.0), ("sigma", 8.0), ("k", 3)):
            setattr(knn, attr, value)
            row(model, f"{attr} {value}")
            knn.image_score, knn.sigma, knn.k = default
        row(AnomalyModel(backbone="efficientnet_lite0", progress=False, layer_balance=False).fit(train),
            "unbalanced layers (a second fit)")


def cost(categories: list[str], rounds: int, autoencoder: str = "auto") -> None:
    """Fit seconds with leave-one-out calibration and its contamination guard against the holdout fit (medians of
    interleaved rounds), and the leave-one-out pass's own seconds as the manifest records them. ``autoencoder``:
    ``none`` times the kNN fit alone, as it was when the issue set the budget (the default trains the whole-image
    branch where the part has a layout, bottle among them)."""
    import time

    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    print("| category | training images | holdout fit s | leave-one-out fit s | of which leave-one-out + guard s "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for category in categories:
        train, _ = read_category(DATA / category)
        took: dict[str, list[float]] = {"holdout": [], "leave-one-out": []}
        left_out: list[float] = []
        for _ in range(rounds):
            for how in took:
                t0 = time.perf_counter()
                model = AnomalyModel(backbone="efficientnet_lite0", progress=False, calibration=how,
                                     autoencoder=autoencoder).fit(train)
                took[how].append(time.perf_counter() - t0)
                if how == "leave-one-out":
                    left_out.append(model.manifest_.training.left_out_seconds)
        h, lo = float(np.median(took["holdout"])), float(np.median(took["leave-one-out"]))
        print(f"| {category} | {len(train)} | {h:.1f} | {lo:.1f} | {np.median(left_out):.1f} | {lo / h:.2f} |",
              flush=True)


def main() -> None:
    from anomaly_service.options import MODEL_OPTIONS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--folds", nargs="*", type=int, default=[10])
    ap.add_argument("--cost", action="store_true", help="Time the fit with leave-one-out against holdout instead.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--autoencoder", default="auto", choices=MODEL_OPTIONS["autoencoder"].choices,
                    help="With --cost: none times the kNN fit alone, as when the budget was set.")
    ap.add_argument("--levers", action="store_true", help="Recall at 1/2/5%% false alarms per lever instead.")
    ap.add_argument("--seeds", type=int, default=0, metavar="N",
                    help="How far each rule's threshold moves over N fits (seeds 0..N-1) instead.")
    args = ap.parse_args()
    if args.seeds:
        if args.seeds < 2:
            ap.error("--seeds needs at least 2 fits to measure how far a threshold moves")
        seeds(args.categories, args.seeds)
        return
    if args.levers:
        levers(args.categories)
        return
    if args.cost:
        cost(args.categories, args.rounds, args.autoencoder)
        return
    for c in args.categories:
        run(c, args.folds)


if __name__ == "__main__":
    main()
