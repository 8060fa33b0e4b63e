"""Quality and cost benchmark on real MVTec-layout categories.

Prints one row per (category, configuration): image AUROC, pixel AUROC, PRO, good FPR and defect recall at the
calibrated threshold, fit seconds, score ms/image, bank size and the peak RSS of the process that ran it (each
configuration runs in a fresh process so peaks do not leak between rows).

    python benchmarks/quality.py                      # defaults on the three shared categories
    python benchmarks/quality.py --ablation           # + selection none/random, coreset 0.01, unbalanced layers
    python benchmarks/quality.py --categories mvtec_ad/bottle --set image_size=320 --json out.json
    python benchmarks/quality.py --backbone efficientnet_lite2 --layers blocks.2,blocks.3   # + other tapped stages
    python benchmarks/quality.py --stream-chunk 262144 100000000   # + the coreset's chunk at other sizes
    python benchmarks/quality.py --protocol rotated --orientation fixed any --tta 8 --align --latency
    # surface copies mirrored:
    python benchmarks/quality.py --protocol rotated --orientation any any,orient_surface=fill

The rotated protocol scores the same fitted model on the test set as it is (upright) and turned: each test image and
its mask turned by a seeded random angle and mirrored half of the time, on a grown canvas so nothing is cut (the
uncovered corners show the plain background, or the surface mirrored; orientation.py), and turned then cut to the
largest upright rectangle of real pixels (no fill at all; defects the cut loses leave that set, and the upright test
is scored on the same samples). The turned photos are also judged on the part's own pixels: each map turned back onto
its upright photo and read against the upright mask, so the fill leaves the pixel metrics. Two controls score the same
frames without the turn (each photo upright on a canvas the size of its turn's, filled the same way, and cut upright to
the size of its turn's rectangle): against them the turn is all that differs. It prints image AUROC, pixel AUROC and PRO
of each, and with ``--tta N`` also the test-time lever: each photo scored in N turns, the minimum kept (maps turned
back), and with ``--align`` the alignment lever (:class:`Aligner`). ``--latency`` then times the fitted models' scoring
of the same upright photos back to back in one process and prints each one's latency relative to the first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
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


# benchmark-only knobs of orientation="any" (orientation.py's constants), set in the fitting process
ORIENT_KNOBS = {"orient_copies": "COPIES_PER_IMAGE", "orient_share": "COPY_PATCH_SHARE",
                "orient_factor": "BANK_FACTOR", "orient_surface": "SURFACE_COPIES",
                "orient_read_error": "MAX_READ_ERROR", "orient_read_rounds": "READ_ROUNDS",
                "orient_fill_rows": "FILL_ROWS"}
# of those, grain.py's: the alignment's gate (orient_read_error=0 keeps every fit on turned copies alone)
GRAIN_KNOBS = {"orient_read_error", "orient_read_rounds"}
PROTOCOL_SEED = 0


def _run(category_dir: str, params: dict[str, Any], train_limit: int | None, protocol: str | None = None,
         tta: int = 0, save_to: str | None = None, align: bool = False) -> list[tuple[str, dict[str, Any]]]:
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
    from anomaly_service import grain, orientation

    for knob, constant in ORIENT_KNOBS.items():
        if knob in params:
            setattr(grain if knob in GRAIN_KNOBS else orientation, constant, params.pop(knob))
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
    metrics["layout_strength"] = model.manifest_.training.layout_strength
    if model.manifest_.training.second_opinion is not None:
        suffix = " (fused)" if model.manifest_.training.second_opinion["fused"] else " (not fused)"
    if model.autoencoder_ is not None:
        assert model.manifest_ is not None and model.manifest_.autoencoder is not None
        metrics["ae_seconds"] = model.manifest_.autoencoder.model_extra["training"]["seconds"]
        metrics["ae_epochs"] = model.manifest_.autoencoder.model_extra["training"]["epochs"]
        suffix += f" -> {model.decision.fusion}"
    if protocol == "rotated":
        aligner = Aligner(train) if align else None
        metrics["protocol"] = rotated_protocol(model, samples, tta, aligner)
    if save_to:
        model.save(save_to)
    return [(suffix, metrics)]


class Aligner:
    """The alignment lever: each photo turned to a reference orientation before scoring. The turn is read by
    phase correlation of log-polar magnitude spectra (scikit-image) against the mean spectrum of the training
    images: translation-free, but only modulo 180 degrees, and a mirror is told by which of the photo and its
    mirror image correlates better."""

    SIDE = 256

    def __init__(self, train: list[Any], n_ref: int = 50):
        import numpy as np

        from anomaly_service.images import load_image

        pick = train[:: max(1, len(train) // n_ref)][:n_ref]
        self.ref = np.mean([self.spectrum(load_image(p)) for p in pick], axis=0)

    def spectrum(self, img: Any) -> Any:
        import numpy as np
        from PIL import Image
        from skimage.transform import warp_polar

        side = self.SIDE
        g = Image.fromarray(img).convert("L")
        scale = side / max(g.size)
        g = np.asarray(g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))),
                                Image.Resampling.BILINEAR), np.float32)
        g = (g - g.mean()) * np.outer(np.hanning(g.shape[0]), np.hanning(g.shape[1]))
        pad = np.zeros((side, side), np.float32)
        pad[: g.shape[0], : g.shape[1]] = g
        mag = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(pad))))
        return warp_polar(mag, radius=side // 2, output_shape=(360, side // 2), scaling="log")[:, 8:]

    def undo(self, img: Any) -> Any:
        """The turn that brings ``img`` to the reference orientation (modulo 180 degrees)."""
        from skimage.registration import phase_cross_correlation

        from anomaly_service.orientation import Turn

        best = None
        for flip in (False, True):
            shift, err, _ = phase_cross_correlation(self.ref, self.spectrum(img[:, ::-1] if flip else img),
                                                    normalization=None)
            if best is None or err < best[0]:
                best = (err, float(shift[0]) % 180.0, flip)
        assert best is not None
        return Turn(-best[1], best[2])


def _scored(model: Any, images: list[Any], tta: list[Any] | None, aligner: Aligner | None = None
            ) -> tuple[list[float], list[Any], float]:
    """Each of ``images``' normalized score and map, and the milliseconds an image took; with ``tta`` turns, each
    image's score is the minimum over its turns and its map the pixelwise minimum of the maps turned back."""
    import numpy as np

    t0 = time.perf_counter()
    scores, maps = [], []
    if aligner is not None:
        for img in images:
            turn = aligner.undo(img)
            r = model.score(turn.image(img))
            scores.append(r.normalized_score)
            maps.append(turn.map_back(r.normalized_map(), img.shape))
    elif not tta:
        for r in model.score_many(images, desc="evaluate"):
            scores.append(r.normalized_score)
            maps.append(r.normalized_map())
    else:
        for img in images:
            results = list(model.score_many([t.image(img) for t in tta]))
            scores.append(min(r.normalized_score for r in results))
            maps.append(np.min([t.map_back(r.normalized_map(), img.shape) for t, r in zip(tta, results)], axis=0))
    return scores, maps, (time.perf_counter() - t0) * 1000 / len(images)


def _judged(samples: list[Any], scores: list[float], maps: list[Any], masks: list[Any], ms: float) -> dict[str, Any]:
    """Image AUROC, pixel AUROC, PRO, good FPR and defect recall at the threshold of scored images with their
    ``masks`` (None: no mask). A mask of
    int32 holds the upright mask's regions carried through a turn or a cut (``metrics.numbered_regions``): PRO
    reads them as the part's regions, not as the pieces a resampling left."""
    import numpy as np

    from anomaly_service.metrics import image_auroc, pixel_auroc, pro_score

    labels = np.array([s.label for s in samples])
    scores_a = np.array(scores)
    kept = [(m, k) for m, k in zip(maps, masks) if k is not None]
    has_masks = any(k.any() for _, k in kept)
    numbered = bool(kept) and all(k.dtype == np.int32 for _, k in kept)
    maps_k, masks_k = [m for m, _ in kept], [k for _, k in kept]
    return {"image_auroc": image_auroc(labels, scores_a),
            "pixel_auroc": pixel_auroc(maps_k, masks_k) if has_masks else None,
            "pro": pro_score(maps_k, masks_k, regions=masks_k if numbered else None) if has_masks else None,
            "good_fpr": float((scores_a[labels == 0] > 1.0).mean()),
            "defect_recall": float((scores_a[labels == 1] > 1.0).mean()) if (labels == 1).any() else None,
            "ms_per_image": ms}


def _quality(model: Any, images: list[Any], samples: list[Any], masks: list[Any], tta: list[Any] | None,
             aligner: Aligner | None = None) -> dict[str, Any]:
    """The metrics (:func:`_judged`) of ``images`` scored by ``model`` (:func:`_scored`)."""
    scores, maps, ms = _scored(model, images, tta, aligner)
    return _judged(samples, scores, maps, masks, ms)


def same_frame(turn: Any, image: Any) -> tuple[Any, int, int]:
    """The control for ``turn``: ``image`` not turned, centred on a canvas at least the size of the turn's, the
    rest filled as the turn fills its corners (the plain background, or the image mirrored at its edges). Returns
    the canvas and the image's top-left offset in it. Scored against the turned canvas, it leaves the turn as the
    only difference between the two."""
    import numpy as np

    from anomaly_service.orientation import plain_background

    h, w = image.shape[:2]
    oh, ow = turn.out_shape(image.shape)
    big_h, big_w = max(h, oh), max(w, ow)
    top, left = (big_h - h) // 2, (big_w - w) // 2
    colour = plain_background(image)
    if colour is not None:
        canvas = np.empty((big_h, big_w, image.shape[2]), image.dtype)
        canvas[:] = colour
        canvas[top : top + h, left : left + w] = image
        return canvas, top, left
    pads = ((top, big_h - h - top), (left, big_w - w - left), (0, 0))
    return np.pad(image, pads, mode="symmetric"), top, left


@dataclass
class ProtocolPhotos:
    """The rotated protocol's photos of a test set (:func:`protocol_photos`), index-aligned with its samples except
    the cut ones, which follow ``keep``."""

    upright: list[Any]
    masks: list[Any]  # numbered regions (metrics.numbered_regions), None where a sample has no mask
    turns: list[Any]
    turned: list[Any]  # on the grown canvas, corners filled (orientation.py)
    turned_masks: list[Any]
    boxes: list[tuple[int, int, int, int]]  # each turned photo's largest upright rectangle of real pixels
    keep: list[int]  # the samples the cut keeps: every good one, and defects whose defect the cut still shows
    cut: list[Any]
    cut_masks: list[Any]


def protocol_photos(samples: list[Any]) -> ProtocolPhotos:
    """The test photos upright, turned by the protocol's seeded random angles (mirrored half of the time), and
    turned then cut to the largest upright rectangle of real pixels, with their masks carried through."""
    import numpy as np

    from anomaly_service.evaluate import _load_mask
    from anomaly_service.images import load_image
    from anomaly_service.metrics import numbered_regions
    from anomaly_service.orientation import random_turns

    upright = [load_image(s.path) for s in samples]
    # each mask as its numbered regions, carried through every turn and cut below: a thin crack that the turn's
    # nearest-neighbour resampling breaks into pieces stays one region for PRO, as on the upright part
    masks = [None if m is None else numbered_regions(m)
             for m in (_load_mask(s, img.shape[:2]) for s, img in zip(samples, upright))]
    turns = random_turns(len(samples), np.random.default_rng(PROTOCOL_SEED))
    turned = [t.image(img) for t, img in zip(turns, upright)]
    turned_masks = [None if m is None else t.regions(m, img) for t, m, img in zip(turns, masks, upright)]
    # a surface runs out of the frame: a camera turned over it sees more surface, not fill. The turned photo cut to
    # the largest upright rectangle of real pixels; defects the cut loses leave the set, and the upright test is
    # scored on the same samples
    boxes = [t.inscribed_box(img.shape) for t, img in zip(turns, upright)]
    keep = [i for i, (m, (y, x, h, w)) in enumerate(zip(turned_masks, boxes))
            if samples[i].label == 0 or (m is not None and m[y : y + h, x : x + w].any())]
    cut = [turned[i][y : y + h, x : x + w] for i in keep for y, x, h, w in [boxes[i]]]
    cut_masks = [None if turned_masks[i] is None else turned_masks[i][y : y + h, x : x + w]
                 for i in keep for y, x, h, w in [boxes[i]]]
    return ProtocolPhotos(upright, masks, turns, turned, turned_masks, boxes, keep, cut, cut_masks)


def rotated_protocol(model: Any, samples: list[Any], tta: int, aligner: Aligner | None = None
                     ) -> dict[str, dict[str, Any]]:
    """The model on the upright and on the turned test (seeded random angle, mirrored half of the time, masks
    turned with their images); with ``tta`` > 0 also both through the test-time-turns lever."""
    from anomaly_service.orientation import Turn

    p = protocol_photos(samples)
    upright, masks, turns, turned, turned_masks = p.upright, p.masks, p.turns, p.turned, p.turned_masks
    out = {"upright": _quality(model, upright, samples, masks, None)}  # first, as before: its ms/img is the column
    scores, maps, ms = _scored(model, turned, None)
    out["turned"] = _judged(samples, scores, maps, turned_masks, ms)
    # the same turned photos, judged on the part's own pixels: each map turned back onto the upright photo and read
    # against its own mask, so the fill (which no camera sees) and the defects mirrored into it leave the pixel
    # metrics; the image score is still the product's over the whole turned canvas
    back = [t.map_back(m, img.shape) for t, m, img in zip(turns, maps, upright)]
    out["turned, own pixels"] = _judged(samples, scores, back, masks, ms)
    boxes, keep, cut, cut_masks = p.boxes, p.keep, p.cut, p.cut_masks
    out["upright, cut set"] = _quality(model, [upright[i] for i in keep], [samples[i] for i in keep],
                                       [masks[i] for i in keep], None)
    cut_scores, cut_maps, cut_ms = _scored(model, cut, None)
    out["turned, cut"] = _judged([samples[i] for i in keep], cut_scores, cut_maps, cut_masks, cut_ms)
    out["turned, cut"]["n_dropped"] = len(samples) - len(keep)
    # controls: the same frames without the turn. Each photo upright on a canvas the size of its turn's, filled the
    # same way (judged on its own pixels, the image score over the canvas), and each photo cut upright to a box of
    # its turn's box's size (its sides swapped where that fits the photo better: near a quarter turn a tall strip's
    # turned box is wide). Turned against control, on the samples both keep, the turn is all that differs
    framed = [same_frame(t, img) for t, img in zip(turns, upright)]
    scores, maps, ms = _scored(model, [c for c, _, _ in framed], None)
    own = [m[y : y + img.shape[0], x : x + img.shape[1]] for m, (_, y, x), img in zip(maps, framed, upright)]
    out["no turn, same canvas"] = _judged(samples, scores, own, masks, ms)
    boxed = {}
    for i, (img, (_, _, bh, bw)) in enumerate(zip(upright, boxes)):
        h, w = img.shape[:2]
        if min(h / bw, w / bh, 1.0) > min(h / bh, w / bw, 1.0):
            bh, bw = bw, bh
        bh, bw = min(bh, h), min(bw, w)
        y, x = (h - bh) // 2, (w - bw) // 2
        if samples[i].label == 0 or (masks[i] is not None and masks[i][y : y + bh, x : x + bw].any()):
            boxed[i] = (img[y : y + bh, x : x + bw], None if masks[i] is None else masks[i][y : y + bh, x : x + bw])
    both = [j for j, i in enumerate(keep) if i in boxed]  # places in ``keep``
    box_scores, box_maps, box_ms = _scored(model, [boxed[keep[j]][0] for j in both], None)
    judged = [samples[keep[j]] for j in both]
    out["no turn, same box"] = _judged(judged, box_scores, box_maps, [boxed[keep[j]][1] for j in both], box_ms)
    out["turned, cut, both sets"] = _judged(judged, [cut_scores[j] for j in both], [cut_maps[j] for j in both],
                                            [cut_masks[j] for j in both], cut_ms)
    out["turned, cut, both sets"]["n_dropped"] = len(samples) - len(both)
    if tta:
        # the dihedral group first (exact quarter turns and mirrors), then half-way angles
        angles = [0.0, 90.0, 180.0, 270.0, 45.0, 135.0, 225.0, 315.0]
        turns_tta = [Turn(a, f) for f in (False, True) for a in angles][: tta] if tta > 8 else \
            [Turn(a, f) for a in angles[:4] for f in (False, True)][: tta]
        out["upright tta"] = _quality(model, upright, samples, masks, turns_tta)
        out["turned tta"] = _quality(model, turned, samples, turned_masks, turns_tta)
    if aligner is not None:
        out["upright align"] = _quality(model, upright, samples, masks, None, aligner)
        out["turned align"] = _quality(model, turned, samples, turned_masks, None, aligner)
    return out


def latency_ratio(paths: list[str], category_dir: str, rounds: int = 3, turned: bool = False
                  ) -> dict[str, list[float]]:
    """Median milliseconds per test photo of each saved model, timed in turns in this one process: on the upright
    photos, and with ``turned`` also on the same photos turned by the rotated protocol's angles (a surface cut to
    its own pixels, as a turned camera frames it; a part on a background whole), where an aligned model turns
    each photo back before scoring it."""
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category
    from anomaly_service.images import load_image
    from anomaly_service.orientation import plain_background, random_turns

    import numpy as np

    _, samples = read_category(category_dir)
    step = max(1, len(samples) // 60)
    images = [load_image(s.path) for s in samples[::step]]
    sets = {"upright": images}
    if turned:
        photos = []
        for img, t in zip(images, random_turns(len(samples), np.random.default_rng(PROTOCOL_SEED))[::step]):
            y, x, h, w = t.inscribed_box(img.shape)
            whole = plain_background(img) is not None or min(h, w) < 32
            photos.append(t.image(img) if whole else np.ascontiguousarray(t.image(img)[y : y + h, x : x + w]))
        sets["turned"] = photos
    models = [AnomalyModel.load(p) for p in paths]
    for m in models:  # warm-up: first-call costs (ONNX sessions, allocations) out of the timing
        list(m.score_many(images[:4]))
    out = {}
    for name, photos in sets.items():
        # each photo through every model in turn, so a neighbour's burst slows them alike; the median per model
        ms: list[list[float]] = [[] for _ in models]
        for _ in range(rounds):
            for img in photos:
                for i, m in enumerate(models):
                    t0 = time.perf_counter()
                    m.score(img)
                    ms[i].append((time.perf_counter() - t0) * 1000)
        out[name] = [float(np.median(v)) for v in ms]
    return out


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


def run_isolated(category_dir: str, params: dict[str, Any], train_limit: int | None, protocol: str | None = None,
                 tta: int = 0, save_to: str | None = None, align: bool = False) -> list[tuple[str, dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run, category_dir, params, train_limit, protocol, tta, save_to, align).result()


def latency_isolated(paths: list[str], category_dir: str, turned: bool = False) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(latency_ratio, paths, category_dir, 3, turned).result()


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
    ap.add_argument("--global-branch", nargs="*", default=[], choices=("auto", "always"),
                    help="Also fit with the whole-image branch (--autoencoder global), fused by the layout rule "
                         "(auto) or always; the layout strength is printed per row.")
    ap.add_argument("--no-default", action="store_true", help="Skip the plain default configuration row.")
    ap.add_argument("--layers", nargs="*", default=[], metavar="A,B",
                    help="Also run with these tapped stages of an EfficientNet-Lite, e.g. blocks.2,blocks.3.")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override ModelConfig fields.")
    ap.add_argument("--train-limit", type=int, default=None, help="Fit on at most N evenly spaced train images.")
    ap.add_argument("--stream-chunk", nargs="*", type=int, default=[], metavar="ROWS",
                    help="Also fit with the streamed coreset's chunk (and threshold) at ROWS patches (a huge value "
                         "gives the single greedy over every patch).")
    ap.add_argument("--protocol", choices=("rotated",), default=None,
                    help="Also score every fit on its test set turned (see above).")
    ap.add_argument("--orientation", nargs="*", default=[], metavar="fixed|any[,KNOB=VALUE...]",
                    help="Rows with these orientation settings instead of the plain default row; knobs of any: "
                         + ", ".join(ORIENT_KNOBS) + " (orient_surface=fill: surface copies mirror-filled, as before "
                         "they were cut to real pixels) (e.g. any,orient_factor=1).")
    ap.add_argument("--tta", type=int, default=0, metavar="N",
                    help="With --protocol rotated: also the test-time lever with N turns (on orientation=fixed).")
    ap.add_argument("--align", action="store_true",
                    help="With --protocol rotated: also the alignment lever (on orientation=fixed; scikit-image).")
    ap.add_argument("--latency", action="store_true",
                    help="Time every row's model on the same photos back to back in one process (ratio to the "
                         "first row of the category).")
    ap.add_argument("--keep-models", type=Path, default=None, metavar="DIR",
                    help="Save each row's fitted model in DIR (CATEGORY-ROW), e.g. for benchmarks/turned_latency.py.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = {"backbone": args.backbone, **_parse_set(args.set)}
    variants: list[tuple[str, dict[str, Any]]] = [] if args.no_default or args.orientation else [("default", {})]
    for spec in args.orientation:
        setting, *knobs = spec.split(",")
        variants.append((f"orientation={spec}", {"orientation": setting, **_parse_set(knobs)}))
    variants += [(f"ae fused by {rule}", {"autoencoder": "features", "fusion": rule}) for rule in args.autoencoder]
    variants += [(f"global branch, ae_keep={keep}", {"autoencoder": "global", "ae_keep": keep})
                 for keep in args.global_branch]
    variants += [(f"layers={pair}", {"layers": pair.split(",")}) for pair in args.layers]
    variants += [(f"stream_chunk={rows}", {"stream_chunk": rows}) for rows in args.stream_chunk]
    if args.ablation:
        variants += [
            ("selection=none", {"selection": "none"}),
            ("selection=random", {"selection": "random"}),
            ("coreset_ratio=0.01", {"coreset_ratio": 0.01}),
            ("layer_balance=False", {"layer_balance": False}),
        ]
    if not variants:
        ap.error("no row to run: --no-default leaves out the default row and no other flag adds one (--set changes "
                 "every row; it adds none)")
    rows = []
    header = (f"| {'category':18s} | {'config':26s} | img AUROC | pix AUROC |  PRO  | good FPR | recall | "
              f"fit s | ms/img | bank  | index MB | peak MB | recall @1/2/5% FPR |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="quality-")
    proto_rows: list[tuple[str, str, dict[str, Any]]] = []
    for cat in args.categories:
        saved: list[tuple[str, str]] = []
        for vi, (name, extra) in enumerate(variants):
            params = {**base, **extra}
            keep = args.keep_models or (Path(scratch.name) if args.latency else None)
            save_to = str(keep / f"{cat.replace('/', '_')}-{vi}") if keep else None
            fixed = params.get("orientation", "fixed") == "fixed"
            tta = args.tta if fixed else 0
            for suffix, m in run_isolated(str(args.data / cat), dict(params), args.train_limit, args.protocol, tta,
                                          save_to, args.align and fixed):
                label = name + suffix
                if save_to:
                    saved.append((label, save_to))
                if "protocol" in m:
                    proto_rows.append((cat, label, m))
                rows.append({"category": cat, "config": label, "params": params, **m})
                print(f"| {cat:18s} | {label:26s} | {m['image_auroc']:9.3f} | {m['pixel_auroc']:9.3f} | "
                      f"{m['pro']:5.3f} | {m['good_fpr']:8.3f} | {m['defect_recall']:6.3f} | {m['fit_seconds']:5.1f} | "
                      f"{m['score_ms_per_image']:6.1f} | {m['bank_size']:5d} | {m['index_mb']:8.1f} | "
                      f"{m['peak_rss_mb']:7.0f} | {_curve(m):18s} |"
                      + (f" layout {m['layout_strength']:.2f} |" if m.get("layout_strength") is not None else ""),
                      flush=True)
        ref = ANOMALIB.get(cat)
        if ref and args.backbone == "efficientnet_lite0":
            print(f"| {cat:18s} | {'anomalib 2.7 (ref)':26s} | {ref['image_auroc']:9.3f} | {ref['pixel_auroc']:9.3f} | "
                  f"{ref['pro']:5.3f} |          |        |       |        |       |          |         |", flush=True)
        if saved and args.latency:
            lat = latency_isolated([p for _, p in saved], str(args.data / cat), args.protocol == "rotated")
            for i, (label, _) in enumerate(saved):
                for r in rows:
                    if r["category"] == cat and r["config"] == label:
                        ms = lat["upright"][i]
                        r["latency_ms"], r["latency_ratio"] = ms, ms / lat["upright"][0]
                        line = f"| {cat} | {label} | latency {ms:.1f} ms/img, {r['latency_ratio']:.2f}x the first row"
                        if "turned" in lat:
                            tms = lat["turned"][i]
                            r["turned_latency_ms"], r["turned_latency_ratio"] = tms, tms / lat["turned"][0]
                            line += (f"; turned photos {tms:.1f} ms/img, {r['turned_latency_ratio']:.2f}x the first "
                                     "row's on them")
                        print(line + " (back to back, one process) |", flush=True)
    scratch.cleanup()
    if proto_rows:
        print_protocol(proto_rows, rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _triple(q: dict[str, Any]) -> str:
    return " / ".join("-" if q.get(k) is None else f"{q[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro"))


def print_protocol(proto_rows: list[tuple[str, str, dict[str, Any]]], rows: list[dict[str, Any]]) -> None:
    """Upright against turned, per row and lever: the triples, the largest drop in points, good FPR and defect
    recall at the threshold (printed under the table), cost."""
    print()
    print("| category | config | lever | upright img / pix / PRO | turned img / pix / PRO | worst drop (pts) | "
          "good FPR up / turned | recall up / turned | bank | ms/img | latency x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cat, label, m in proto_rows:
        p = m["protocol"]
        lat = next((r.get("latency_ratio") for r in rows if r["category"] == cat and r["config"] == label), None)
        for lever, up_key, turned_key in (("bank", "upright", "turned"),
                                          ("bank, scored on the part's own pixels", "upright", "turned, own pixels"),
                                          ("bank, turned photo cut to real pixels", "upright, cut set", "turned, cut"),
                                          ("the turn alone, on the canvas (control: no turn, same canvas)",
                                           "no turn, same canvas", "turned, own pixels"),
                                          ("the turn alone, cut (control: no turn, cut to the same box)",
                                           "no turn, same box", "turned, cut, both sets"),
                                          ("tta", "upright tta", "turned tta"),
                                          ("align", "upright align", "turned align")):
            if up_key not in p:
                continue
            up, tu = p[up_key], p[turned_key]
            drop = max((up[k] - tu[k]) * 100 for k in ("image_auroc", "pixel_auroc", "pro") if up.get(k) is not None)
            lat_s = "" if lat is None or lever != "bank" else f"{lat:.2f}"
            if "n_dropped" in tu:
                lever += f" ({tu['n_dropped']} defects cut away)"
            print(f"| {cat} | {label} | {lever} | {_triple(up)} | {_triple(tu)} | {drop:.1f} | "
                  f"{up['good_fpr']:.3f} / {tu['good_fpr']:.3f} | {_rate(up)} / {_rate(tu)} | {m['bank_size']} | "
                  f"{up['ms_per_image']:.1f} | {lat_s} |", flush=True)
    for cat, label, m in proto_rows:
        print(f"{cat}, {label}: threshold {m['threshold']:.4g}", flush=True)


def _rate(q: dict[str, Any]) -> str:
    """A set's defect recall at the threshold, or - where the set holds no defect."""
    return "-" if q.get("defect_recall") is None else f"{q['defect_recall']:.3f}"


if __name__ == "__main__":
    main()
