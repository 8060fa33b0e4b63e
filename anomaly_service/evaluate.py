"""Evaluate a model on an MVTec-AD-layout category and, optionally, write a visual report.

Layout: ``train/good/*``, ``test/good/*``, ``test/<defect>/*``, ``ground_truth/<defect>/<stem>_mask.png`` (other
spellings a plant uses: :func:`list_category`).
"""

from __future__ import annotations

import io
import itertools
import logging
import resource
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from .compression import said_with
from .errors import ConfigError, ImageLoadError
from .images import (DEFAULT_LIMITS, IMAGE_EXTENSIONS, ImageLimits, decodable_admitted, decode_each, list_images,
                     load_image, opened_admitted, path_text, skip_reason, transparent)
from .metrics import image_auroc, image_roc, numbered_regions, pixel_auroc, pro_curve, pro_score
from .model import AnomalyModel
from .report_page import write_page
from .heatmap import DISPLAY_MAX, color_table
from .render import overlay_pixels
from .spellings import composed, entry_spelt, spelling_hint
from .training_set import pixel_digest
from .whole_file import write_whole

log = logging.getLogger(__name__)


@dataclass
class Sample:
    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask_path: Path | None


@dataclass
class Category:
    """One category's listing: training images, labelled test samples, and what its test folders hold that is not
    an image file (left out, and said so: a plant's folder of photos gathers notes and exports)."""

    train: list[Path]
    samples: list[Sample]
    not_images: list[Path] = field(default_factory=list)


def read_category(data_dir: str | Path) -> tuple[list[Path], list[Sample]]:
    """Training images and labelled test samples of one category."""
    category = list_category(data_dir)
    return category.train, category.samples


def list_category(data_dir: str | Path) -> Category:
    """:func:`read_category`, with the test folders' files that are not images, for ``anomaly evaluate`` to report.

    ``good`` is matched in any letter case (``Good``, ``GOOD``: a folder made on Windows or macOS, where case does
    not count), in ``train/`` and ``test/``: read as a defect type, a plant's ``test/Good`` made every good part a
    missed defect and the good-part metrics NaN. A defect's mask is found as :func:`find_mask` says."""
    root = Path(data_dir)
    if not (root / "test").is_dir():
        if not root.exists():  # "no test/ directory" sent a plant looking inside a folder that was not there
            raise ConfigError(f"{root}: no such directory{spelling_hint(root)}")
        # the layout named, and where a folder of good/ and defect folders (anomalib's Folder dataset) is turned
        # into it: "no test/ directory" alone left a user of another tool guessing at the rest
        raise ConfigError(f"{root} is not an MVTec-layout category: it has no test/ directory (anomaly evaluate "
                          "reads train/good/, test/good/, test/<defect>/ and ground_truth/<defect>/; links lay a "
                          "folder of good/ and defect folders, as anomalib's Folder dataset takes, out so: "
                          "docs/coming-from-anomalib.md)")
    train: list[Path] = []
    for folder in _good_folders(root / "train"):
        train += list_images(folder)[0]
    samples: list[Sample] = []
    not_images: list[Path] = []
    for sub in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        files, others = list_images(sub)
        not_images += others
        masks = _mask_files(_same_name(root / "ground_truth", sub.name))
        for f in files:
            if _is_good(sub):
                samples.append(Sample(f, 0, "good", None))
            else:
                samples.append(Sample(f, 1, sub.name, find_mask(masks, f.stem)))
    if not samples:
        raise ConfigError(f"{root}/test has no images")
    if not any(s.label == 0 for s in samples):
        log.warning("%s/test has no good/ folder of images: image AUROC and the good false-alarm rate cannot be "
                    "measured", root)
    if not any(s.label == 1 for s in samples):  # the metrics that need a defect were NaN or "-" with nothing said
        log.warning("%s/test has no defect folder of images (only good/): image AUROC, the defect recall and the "
                    "pixel metrics cannot be measured", root)
    missing = [s.path for s in samples if s.label == 1 and s.mask_path is None]
    if missing:  # their image scores count; the pixel metrics are over the defects that have a mask
        log.warning("%d defect image(s) have no ground-truth mask (ground_truth/<type>/<name>_mask.png, or "
                    "<name>_mask or <name> with any image extension), e.g. %s: left out of pixel AUROC and PRO",
                    len(missing), missing[0])
    return Category(sorted(train), samples, not_images)


def _is_good(folder: Path) -> bool:
    return folder.name.lower() == "good"


def _good_folders(parent: Path) -> list[Path]:
    """The folders named ``good`` in any letter case under ``parent`` (none when it is no directory)."""
    return sorted(p for p in parent.iterdir() if p.is_dir() and _is_good(p)) if parent.is_dir() else []


def _same_name(parent: Path, name: str) -> Path:
    """``parent / name``, or the entry of ``parent`` that spells ``name`` the other Unicode way (spellings.py): a
    defect type's test folder made on macOS (``Kratzer_ü`` decomposed) and its ground-truth folder made on Windows
    (composed) are one type."""
    if (parent / name).exists():
        return parent / name
    return entry_spelt(parent, name) or parent / name


def _mask_files(folder: Path) -> dict[tuple[str, str], Path]:
    """A ground-truth folder's files by (stem, lower-case extension): by the stem as it is spelt, and by its
    composed spelling where no file is spelt so (:func:`find_mask` looks an image's stem up both ways); empty when it
    is no directory. Composed only, two files whose names differ only in spelling (two photos' masks, from a Mac
    and from Windows) took one key, and both photos were measured against one of the masks."""
    if not folder.is_dir():
        return {}
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    by_composed = {(composed(p.stem), p.suffix.lower()): p for p in files}
    return {**by_composed, **{(p.stem, p.suffix.lower()): p for p in files}}


def find_mask(masks: dict[tuple[str, str], Path], stem: str) -> Path | None:
    """The mask of the image ``stem`` among a ground-truth folder's files (:func:`_mask_files`): MVTec's
    ``<stem>_mask.png`` first, then ``<stem>_mask`` and ``<stem>`` with any image extension in any case (a plant's
    masks are exported as BMP or TIFF, or named as their image, as other datasets name them). Only the MVTec name
    was looked for: every other mask was reported missing and the pixel metrics left out."""
    extensions = [".png"] + sorted(IMAGE_EXTENSIONS - {".png"})
    for spelt in dict.fromkeys((stem, composed(stem))):  # its own spelling first, then the other's
        for name in (f"{spelt}_mask", spelt):
            for ext in extensions:
                if (name, ext) in masks:
                    return masks[(name, ext)]
    return None


def _same_frame(sample: Sample, size: tuple[int, int], shape: tuple[int, int]) -> None:
    """Raise :class:`ConfigError` unless a mask of ``size`` (width, height) is its image's frame (``shape``, height
    and width) or a scaled copy of it."""
    if abs(size[0] / size[1] - shape[1] / shape[0]) > 0.02 * shape[1] / shape[0]:
        raise ConfigError(f"ground-truth mask {sample.mask_path} is {size[0]}x{size[1]} but its image "
                          f"{sample.path.name} is {shape[1]}x{shape[0]}: not the same frame")


def check_masks(samples: Sequence[Sample], limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`ConfigError` for the first mask that does not decode or is not its image's frame, from the
    headers alone (EXIF turn included): found after the fit and all the scoring, such a mask cost a plant's
    evaluation its minutes and then stopped it. An image that does not decode is left to the scoring to skip.
    ``limits``: those the photos are read under (a mask the camera's frame is held to them, not the default's)."""
    from .images import declared_shape

    for sample in samples:
        if sample.mask_path is None:
            continue
        try:  # as the mask is read: its own EXIF turn applied, as its image's is
            mask_h, mask_w = declared_shape(sample.mask_path, limits)
        except ImageLoadError as exc:
            raise ConfigError(f"ground-truth mask {sample.mask_path} cannot be read ({exc})") from None
        size = (mask_w, mask_h)
        try:
            shape = declared_shape(sample.path, limits)
        except ImageLoadError:
            continue
        if min(size) > 0 and size != (shape[1], shape[0]):
            _same_frame(sample, size, shape)


def _load_mask(sample: Sample, shape: tuple[int, int], limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray | None:
    if sample.label == 0:
        return np.zeros(shape, dtype=bool)
    if sample.mask_path is None:
        return None
    try:  # a mask saved with an EXIF turn shows turned in every viewer: it is read so, as its image is
        # from a file object and loaded first, as load_image reads its image: Pillow turns a TIFF by its tag as it
        # loads one so opened, but one opened by its path it loads as stored, and drops the tag
        data = sample.mask_path.read_bytes()
        with opened_admitted(data) as stored:  # a mask the photo's size, past Pillow's pixel limit, is read too
            if stored.width * stored.height > limits.max_pixels:  # held to ours, then, before it is decoded
                raise ConfigError(f"ground-truth mask {sample.mask_path} is {stored.width}x{stored.height} pixels, "
                                  f"past the limit of {limits.max_pixels} pixels its photos are read under")
            decodable_admitted(stored)  # a TIFF's page makes Pillow's check again as it decodes
            stored.load()
            turned = ImageOps.exif_transpose(stored)
            mask = turned.convert("L")
            hidden = transparent(turned, data)  # erased in an editor: no defect, whatever colour lies under it
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ConfigError(f"ground-truth mask {sample.mask_path} cannot be read ({exc})") from None
    values = np.asarray(mask)
    if hidden is not None:
        values = np.where(hidden, 0, values)
    # defect where over half the mask's own maximum: 0/255 masks as ever, and 0/1 masks (some datasets store
    # them so) not read as defect-free
    defect = values > values.max() / 2 if values.max() > 0 else np.zeros(values.shape, dtype=bool)
    if defect.shape != tuple(shape):  # a scaled copy of the frame
        _same_frame(sample, mask.size, shape)
        # smaller, each pixel of the photo is defect where any of the mask's it covers is: sampled (nearest), a
        # crack thinner than the scale's step fell between the samples, and its mask read as nothing drawn
        smaller = defect.shape[0] * defect.shape[1] > shape[0] * shape[1]
        scaled = Image.fromarray(defect.astype(np.uint8) * 255).resize(
            (shape[1], shape[0]), Image.Resampling.BOX if smaller else Image.Resampling.NEAREST)
        defect = np.asarray(scaled) > 0
    return defect


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    """Defect recall at the strictest threshold whose false-alarm rate on good images stays at or below ``fpr``
    (the threshold is read from the good scores: a diagnostic of the score, never how the product sets it)."""
    good, bad = np.sort(scores[labels == 0]), scores[labels == 1]
    if good.size == 0 or bad.size == 0:
        return None
    allowed = int(np.floor(fpr * good.size))  # good images that may lie above the threshold
    threshold = good[good.size - 1 - allowed]  # every good image at or below it counts as passed
    return float((bad > threshold).mean())


# what an evaluated result holds in place of its maps, once its normalized map is taken (evaluate_model)
_NO_MAP = np.zeros((0, 0), np.float32)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fitted_on(model: AnomalyModel) -> dict[str, str]:
    """The pixel digests of the images ``model`` was fitted on (its bank's, and those its threshold was read from
    under holdout calibration; an update's too), each with its name: a test photo among them is no unseen part. A
    test folder copied from the good one, or a good image in both, made the metrics read better than any line.
    Empty for a model saved without its catalog."""
    learnt = dict(zip(model.catalog_.digests, model.catalog_.names)) if model.catalog_ is not None else {}
    if model.manifest_ is not None:
        learnt.update((h.sha256, h.name) for h in model.manifest_.training.held_out)
    return learnt


def evaluate_model(model: AnomalyModel, samples: list[Sample], report_dir: str | Path | None = None,
                   fit_seconds: float | None = None, train: list[Path] | None = None, *,
                   not_images: Sequence[Path] = (), warn: Callable[[str], None] | None = None,
                   on_report_error: Callable[[OSError], None] | None = None,
                   data_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every test sample and compute image/pixel metrics and the decision quality at the threshold.

    A sample that does not decode (empty, truncated, not an image) is skipped with ``warn`` (default: the log) and
    listed with ``not_images`` (files of the test folders that are no images) in ``skipped``: one bad file among
    thousands stopped the whole evaluation. Only a category where nothing decodes raises :class:`ImageLoadError`.
    What scoring says of a file evaluated (which frame of a file of several was read, as ``anomaly score`` says it) is
    said with ``warn`` as ``path: warning`` and listed in ``warnings``: a metric over the wrong frame is not silent.
    A report ``report_dir`` does not take (a full disk) is passed to ``on_report_error`` when given, so the metrics of
    minutes of scoring are still returned; each of its files is whole or absent. ``data_dir``, the category's folder,
    is said in the metrics and the report's page."""
    say = warn or (lambda message: log.warning("%s", message))
    # names as text every reader can hold (path_text): one under another code page stopped the CSV with a traceback
    skipped = [{"path": path_text(str(p)), "reason": skip_reason(p)} for p in not_images]
    for entry in skipped:
        say(f"skipping {entry['path']}: {entry['reason']}")
    paths = [s.path for s in samples]

    def skip(i: int, exc: ImageLoadError) -> None:
        say(f"skipping {exc}")
        skipped.append({"path": path_text(str(paths[i])), "reason": path_text(str(exc).removeprefix(f"{paths[i]}: "))})

    t0 = time.perf_counter()
    readable: list[Sample] = []
    notes: list[list[str]] = []
    digests: list[str] = []  # each readable photo's pixels, to tell the images the model was fitted on

    def photos() -> Iterator[np.ndarray]:
        """Each readable test photo, decoded as the model comes to score it: a validation set of megapixel photos,
        all decoded before the first was scored, was held whole beside its maps."""
        for i, decoded in decode_each(paths, model.limits, skip=skip):
            readable.append(samples[i])
            notes.append(decoded.warnings)  # which frame of a file of several was read: the array no longer says
            digests.append(pixel_digest(decoded.array))
            yield decoded.array

    # each result's map is held once, normalized (what the metrics and the report's overlays read), and the result
    # keeps its numbers: with the kNN's map and a fused one beside the normalized copy, a set's maps were held thrice
    results, norm_maps = [], []
    for r in model.score_many(photos(), desc="evaluate"):
        norm_maps.append(r.normalized_map())
        r.anomaly_map, r.decision_map = _NO_MAP, None
        results.append(r)
    skipped.sort(key=lambda entry: entry["path"])
    if not readable:
        raise ImageLoadError(f"no test image could be evaluated: none of the {len(samples)} decodes (see the "
                             "warnings)")
    samples = readable
    score_ms = (time.perf_counter() - t0) * 1000 / len(samples)
    warned = []
    learnt = fitted_on(model)
    seen: list[str] = []
    for s, r, said, digest in zip(samples, results, notes, digests):
        # first, as `anomaly score` puts them: how the file was read, then what scoring says
        r.warnings[:0] = said_with(said, r.is_anomaly)
        if digest in learnt:
            seen.append(path_text(str(s.path)))
            r.warnings.append(f"this image is one the model was fitted on ({learnt[digest]}): it scores as a photo "
                              "the fit learnt, not as an unseen part")
        if r.warnings:
            warned.append({"path": path_text(str(s.path)), "warnings": list(r.warnings)})
            for w in r.warnings:
                say(f"{warned[-1]['path']}: {w}")
    if seen:
        say(f"{len(seen)} of the {len(samples)} test images are images the model was fitted on (e.g. {seen[0]}): "
            "their patches are in its memory bank, or their scores set its threshold, so they score lower than any "
            "unseen part and the metrics read better than the line will see. Evaluate on photos the fit never saw")
    truths = [_load_mask(s, norm.shape, model.limits) for s, norm in zip(samples, norm_maps)]
    # a defect's mask with nothing drawn on it counts every pixel of that defect image as defect-free, as MVTec AD's
    # protocol reads an empty mask: a defect not yet drawn then lowers the pixel metrics where the model finds it,
    # and with every mask so, the pixel metrics were skipped for masks said to be missing, which were there
    empty = sorted(path_text(str(s.path)) for s, truth in zip(samples, truths)
                   if s.label == 1 and truth is not None and not truth.any())
    if empty:
        say(f"{len(empty)} defect image(s) have a ground-truth mask with nothing drawn on it (e.g. {empty[0]}): "
            "every pixel of theirs counts as defect-free in pixel AUROC and PRO; where a defect was not drawn yet, "
            "draw it, or remove its mask to leave the image out of the pixel metrics")
    kept, outside = inspected_truth(model, samples, norm_maps, truths)
    if outside.images:
        say(f"{len(outside.images)} defect image(s) have every ground-truth pixel outside the model's inspection "
            f"mask (e.g. {outside.images[0]}): the model cannot find them by design, so they are left out of the "
            "image metrics and the recall, as their defect pixels are of the pixel metrics")
    samples, results, norm_maps, truths = ([xs[i] for i in kept] for xs in (samples, results, norm_maps, truths))
    labels = np.array([s.label for s in samples])
    # the model's decision, on its calibrated scale (1.0 = threshold): the kNN opinion, or the fused one
    scores = np.array([r.normalized_score for r in results])
    # each map and ground truth on the pixels the model inspects (all of them without a mask), the defect regions
    # numbered on the whole frame first: a region the mask cuts is one region still, over its inspected part
    maps, masks, regions = [], [], []
    for norm, mask in zip(norm_maps, truths):
        if mask is not None:
            numbered = numbered_regions(mask)
            inside = None if model.mask_ is None or model.mask_.everything else model.mask_.at(norm.shape)
            maps.append(norm if inside is None else norm[inside])
            masks.append(mask if inside is None else mask[inside])
            regions.append(numbered if inside is None else numbered[inside])
    cal = model.calibration_
    assert cal is not None and model.manifest_ is not None
    pred = np.array([r.is_anomaly for r in results])
    has_masks = any(m.any() for m in masks)  # defect masks under ground_truth/ (good images' are all zero)
    metrics: dict[str, Any] = {
        "image_auroc": image_auroc(labels, scores),
        # None when the category has no ground-truth masks: the pixel metrics are skipped, not NaN
        "pixel_auroc": pixel_auroc(maps, masks) if has_masks else None,
        "pro": pro_score(maps, masks, regions=regions) if has_masks else None,
        "threshold": cal.threshold,
        "good_fpr": float(pred[labels == 0].mean()) if (labels == 0).any() else float("nan"),
        "defect_recall": float(pred[labels == 1].mean()) if (labels == 1).any() else float("nan"),
        # the operating curve around the threshold: recall when the good parts' false alarms are held to each rate
        "recall_at_fpr": {f"{fpr:g}": recall_at_fpr(labels, scores, fpr) for fpr in (0.01, 0.02, 0.05)},
        "fit_seconds": fit_seconds if fit_seconds is not None else model.manifest_.training.fit_seconds,
        "score_ms_per_image": score_ms,
        "peak_rss_mb": peak_rss_mb(),
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        # each test folder's images and how many the model flagged: a defect type's recall, the good folder's false
        # alarms; the overall recall hid a type the model misses behind the types it catches
        "by_type": by_type(samples, pred),
        "bank_size": int(model.index_.ntotal),
        "backbone": model.config.backbone,
        # what a quality engineer signs off: which data, when, which model and how its threshold was set
        "data_dir": None if data_dir is None else path_text(str(Path(data_dir).resolve())),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"version": model.version_id_, "created_at": model.manifest_.created_at,
                  "n_training_images": model.manifest_.training.n_images,
                  "calibration": model.manifest_.training.calibration, "threshold_method": cal.method,
                  "software": model.manifest_.library_versions.get("anomaly_service")},
        # training images the contamination guard flagged at fit (contamination.py), and what the fit did with them
        "suspects": [s.model_dump(mode="json") for s in model.manifest_.training.suspects],
        "suspects_action": model.manifest_.training.suspects_action,
        # test files left out of every metric above: they do not decode, or are no image files
        "n_skipped": len(skipped),
        "skipped": skipped,
        # defect images with no ground-truth mask found: in the image metrics, left out of pixel AUROC and PRO (the
        # log's warning said so, and no file a script reads did)
        "defects_without_mask": sorted(path_text(str(s.path)) for s in samples if s.label == 1 and s.mask_path is None),
        # defect images whose mask has nothing drawn on it: every pixel of theirs counted as defect-free in pixel
        # AUROC and PRO (the warning says so)
        "defects_with_empty_mask": empty,
        # defect images whose every ground-truth pixel lies outside the model's inspection mask: left out of every
        # metric above (a defect the mask rules out cannot be found by design), and the ground-truth pixels outside
        # it, of these and of the defects it cuts, out of pixel AUROC and PRO
        "defects_outside_mask": outside.images,
        "defect_pixels_outside_mask": outside.pixels,
        # test files evaluated with something to say of them (which frame was read, a photo unlike the fit's), each
        # as `score --json` says it: its path and its warnings
        "warnings": warned,
    }
    if report_dir is not None:
        try:
            write_report(Path(report_dir), samples, results, norm_maps, labels, scores, 1.0, metrics,
                         limits=model.limits)
            write_per_image(Path(report_dir), samples, results)
            write_pro_curve(Path(report_dir), maps, masks, metrics["pro"], regions=regions)
            write_suspects(Path(report_dir), metrics["suspects"], metrics["suspects_action"])
            write_skipped(Path(report_dir), skipped)
            write_warned(Path(report_dir), warned)
            write_embedding_map(Path(report_dir), model, samples, train or [])
            write_page(Path(report_dir), metrics)  # last: it shows and links the files written before it
        except OSError as exc:
            if on_report_error is None:
                raise
            on_report_error(exc)
    return metrics


@dataclass(frozen=True)
class OutsideMask:
    """What of the ground truth lies outside the model's inspection mask: the defect images wholly outside it (their
    paths) and the ground-truth defect pixels outside it, of every image."""

    images: list[str] = field(default_factory=list)
    pixels: int = 0


def inspected_truth(model: AnomalyModel, samples: Sequence[Sample], maps: Sequence[np.ndarray],
                    truths: Sequence[np.ndarray | None]) -> tuple[list[int], OutsideMask]:
    """The samples evaluate keeps (their positions) and what it leaves out: a defect image whose ground truth lies
    wholly outside the model's inspection mask was counted as missed, though a defect the mask rules out cannot be
    found by design (decisions.md, session 65). A defect image without a mask file, or with an empty one, is kept:
    where its defect lies is not known."""
    mask = model.mask_
    if mask is None or mask.everything:
        return list(range(len(samples))), OutsideMask()
    kept, images, pixels = [], [], 0
    for i, (s, norm, truth) in enumerate(zip(samples, maps, truths)):
        if truth is not None and truth.any():
            inside = mask.at(norm.shape)
            pixels += int(np.count_nonzero(truth & ~inside))
            if s.label == 1 and not (truth & inside).any():
                images.append(path_text(str(s.path)))
                continue
        kept.append(i)
    return kept, OutsideMask(sorted(images), pixels)


def by_type(samples: Sequence[Sample], flagged: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per test folder (``good`` and each defect type, as text every reader can hold): its images evaluated
    (``n``), how many the model flagged (``flagged``) and their share (``flagged_rate``: a defect type's recall, the
    good folder's false-alarm rate)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({s.defect_type for s in samples}, key=lambda t: (t != "good", t)):
        ids = [i for i, s in enumerate(samples) if s.defect_type == kind]
        hits = int(np.asarray(flagged)[ids].sum())
        out[path_text(kind)] = {"n": len(ids), "flagged": hits, "flagged_rate": hits / len(ids)}
    return out


def write_pro_curve(out: Path, maps: list[np.ndarray], masks: list[np.ndarray], pro: float | None,
                    fpr_limit: float = 0.3, regions: list[np.ndarray] | None = None) -> None:
    """``pro.png``: the PRO curve up to ``fpr_limit`` whose normalized area is the PRO metric, so the number can be
    read off the curve it summarizes (none without defect masks: an earlier run's is removed); ``regions`` as
    :func:`~anomaly_service.metrics.pro_curve` takes them."""
    if pro is None:
        _drop(out / "pro.png")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, overlap = pro_curve(maps, masks, fpr_limit, regions)
    keep = fpr <= fpr_limit
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr[keep], overlap[keep], lw=2, label=f"PRO {pro:.3f} (area / {fpr_limit:g})")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate over defect-free pixels")
    ax.set_ylabel("mean overlap per defect region")
    ax.legend(loc="lower right")
    _save_figure(fig, out / "pro.png")


def write_per_image(out: Path, samples: Sequence[Sample], results: Sequence[Any]) -> None:
    """``per_image.csv``: every test image evaluated, its folder, the model's score and decision, and the mask its
    pixel metrics used: what every number of the report is computed from, for a reader to recompute or look up."""
    _write_csv(out / "per_image.csv", ["path", "type", "label", "score", "normalized_score", "decision", "mask"],
               ([path_text(str(s.path)), path_text(s.defect_type), "defect" if s.label else "good", f"{r.score:.9g}",
                 f"{r.normalized_score:.9g}", "ANOMALY" if r.is_anomaly else "normal",
                 "" if s.mask_path is None else path_text(str(s.mask_path))] for s, r in zip(samples, results)))


def write_skipped(out: Path, skipped: list[dict[str, str]]) -> None:
    """``skipped_files.csv``: the test files the evaluation left out and why, so that the metrics' sample is known
    (written only when there are any; otherwise one an earlier run left is removed)."""
    if skipped:
        _write_csv(out / "skipped_files.csv", ["path", "reason"], ([e["path"], e["reason"]] for e in skipped))
    else:
        _drop(out / "skipped_files.csv")


def write_warned(out: Path, warned: list[dict[str, Any]]) -> None:
    """``warned_files.csv``: the test files evaluated with something to say of them (which frame of a file of
    several was read, a photo unlike the training ones), a row per warning, so that the report, kept beside the
    metrics, says what the printed warnings said (written only when there are any; otherwise an earlier run's is
    removed)."""
    if warned:
        _write_csv(out / "warned_files.csv", ["path", "warning"],
                   ([e["path"], w] for e in warned for w in e["warnings"]))
    else:
        _drop(out / "warned_files.csv")


def _drop(path: Path) -> None:
    """Remove a report file this run has nothing to put in, left by an earlier run into the same folder: a
    ``skipped_files.csv`` kept from a run that skipped a file said, beside this run's metrics, that it was skipped."""
    path.unlink(missing_ok=True)


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    """One of the report's CSV files, its folder made if need be; written whole or not at all (write_whole)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_whole(path, text.getvalue().encode("utf-8"))


def _save_figure(fig: Any, path: Path, layout: bool = True) -> None:
    """A figure as a PNG written whole or not at all (savefig to the path left a truncated PNG on a full disk), laid
    out first unless the caller laid it out itself, and closed."""

    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_whole(path, buf.getvalue())


def write_suspects(out: Path, suspects: list[dict[str, Any]], action: str | None) -> None:
    """``training_suspects.csv``: the training images the contamination guard flagged, for a person to look at
    (written only when there are any; otherwise one an earlier run left is removed)."""
    if suspects:
        _write_csv(out / "training_suspects.csv",
                   ["image", "score", "threshold_set_by_the_others", "times_the_median", "robust_z", "action"],
                   ([s["name"], f"{s['score']:.6g}", "" if s.get("threshold") is None else f"{s['threshold']:.6g}",
                     f"{s['ratio']:.4g}", f"{s['z']:.4g}", action or "warn"] for s in suspects))
    else:
        _drop(out / "training_suspects.csv")


def write_report(out: Path, samples: list[Sample], results: list, maps: Sequence[np.ndarray], labels: np.ndarray,
                 scores: np.ndarray, threshold: float, metrics: dict[str, Any], n_worst: int = 6,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Score histogram with threshold, ROC curve, and a grid of the worst cases with their heatmap overlays
    (``maps``: each result's normalized map; photos decoded with ``limits``: the model's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(scores.min(), scores.max(), 40)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"good (n={int((labels == 0).sum())})", color="tab:blue")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"defect (n={int((labels == 1).sum())})", color="tab:red")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("normalized image score (1.0 = threshold)")
    ax.set_ylabel("images")
    ax.set_title(f"good FPR {metrics['good_fpr']:.1%}, defect recall {metrics['defect_recall']:.1%}")
    ax.legend()
    _save_figure(fig, out / "score_histogram.png")

    if labels.min() != labels.max():
        fpr, tpr = image_roc(labels, scores)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics['image_auroc']:.3f}")
        # where the model works on that curve: the threshold's false alarms and recall, the numbers beside it
        ax.plot([metrics["good_fpr"]], [metrics["defect_recall"]], "o", color="tab:red", ms=7, zorder=3,
                label=f"threshold: {metrics['good_fpr']:.1%} false alarms, {metrics['defect_recall']:.1%} recall")
        ax.plot([0, 1], [0, 1], color="grey", ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        _save_figure(fig, out / "roc.png")
    else:  # no ROC without both kinds of image: an earlier run's would pass for this one's
        _drop(out / "roc.png")

    # worst cases: the highest-scoring good images (false alarms) and the lowest-scoring defects (misses)
    good = [i for i in np.argsort(-scores) if labels[i] == 0][:n_worst]
    bad = [i for i in np.argsort(scores) if labels[i] == 1][:n_worst]
    rows = [("highest-scoring good", good), ("lowest-scoring defect", bad)]
    ncol = max(1, max(len(r[1]) for r in rows))
    fig, axes = plt.subplots(2, ncol, figsize=(2.6 * ncol, 6), squeeze=False)
    for r, (title, ids) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ids):
                continue
            i = ids[c]
            ax.imshow(overlay_pixels(load_image(samples[i].path, limits), maps[i]))
            verdict = "ANOMALY" if scores[i] > threshold else "ok"
            # as text the font renderer takes: a name in another code page stopped the report (path_text)
            ax.set_title(f"{path_text(samples[i].defect_type)}/{path_text(samples[i].path.name)}\n"
                         f"{results[i].normalized_score:.2f}x thr, {verdict}", fontsize=7)
        axes[r][0].text(-0.05, 0.5, title, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("worst cases (overlay color: blue normal, red far above threshold; one scale for all)")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    # the scale itself, as the overlays are coloured (the heatmaps' own color table), the threshold marked on it
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0, DISPLAY_MAX), ListedColormap(color_table() / 255.0)),
                       cax=fig.add_axes((0.945, 0.12, 0.012, 0.72)))
    bar.set_ticks([0.0, 0.5, 1.0, DISPLAY_MAX])
    bar.ax.axhline(1.0, color="k", lw=2)
    bar.set_label("normalized score (1.0 = threshold, black line)", fontsize=8)
    _save_figure(fig, out / "worst_cases.png", layout=False)  # laid out above, around its colour bar


def image_features(model: AnomalyModel, paths: list[Path]) -> tuple[np.ndarray, list[int]]:
    """One vector per image that decodes: the mean of its patch embeddings in the model's kept dimensions (what the
    bank holds), and the places in ``paths`` of those images. One that does not decode (a training image the fit
    skipped) is left out of the map, not the end of the report. Decoded a backbone batch at a time: every test photo
    and up to a few hundred training ones, all decoded before the first was embedded, held a validation set of
    megapixel photos whole at the report's end, which its scoring had taken care not to."""
    dim = len(model.selected_indices_ if model.selected_indices_ is not None else [])
    rows: list[np.ndarray] = []
    kept: list[int] = []
    pending = decode_each(paths, model.limits)  # one that does not decode is passed over, unsaid
    while chunk := list(itertools.islice(pending, model.embedder.batch_size)):
        kept += [i for i, _ in chunk]
        rows.append(_mean_features(model, [decoded.array for _, decoded in chunk], dim))
        del chunk  # let this batch's pixels go before the next one is decoded
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), kept


def _mean_features(model: AnomalyModel, arrays: list[np.ndarray], dim: int) -> np.ndarray:
    """Each image's mean patch embedding in the model's kept dimensions (every tile's patches when tiled)."""
    out = np.zeros((len(arrays), dim), np.float32)
    for batch in model.embedder.groups(arrays):
        emb = model.embedder.embed([arrays[i] for i in batch], keep=model.knn.keep)
        if emb.tiles is None:
            out[batch] = emb.features.float().mean(dim=(1, 2)).cpu().numpy()
        else:  # every tile's patches of each image
            out[batch] = np.stack([e.float().reshape(-1, e.shape[-1]).mean(0).cpu().numpy() for e in emb.per_image()])
    return out


def group_styles(n: int) -> list[tuple[Any, str]]:
    """``(colour, marker)`` of the embedding map's ``n`` groups: the training goods grey, the test goods blue, then
    each defect type a colour of tab10's other nine and, past them, the same colours with another marker. The nine
    colours were drawn from one iterator, so a test folder of ten defect types stopped the report at its last
    picture, its page unwritten."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors[1:]
    markers = "osD^v<>ph*"
    fixed: list[tuple[Any, str]] = [("lightgray", "o"), ("tab:blue", "o")]
    defects = [(palette[k % len(palette)], markers[(k // len(palette)) % len(markers)]) for k in range(max(0, n - 2))]
    return (fixed + defects)[:n]


def write_embedding_map(out: Path, model: AnomalyModel, samples: list[Sample], train: list[Path],
                        max_train: int = 300) -> None:
    """Where parts sit among the good ones: image features of training goods, test goods and each defect type,
    reduced by PCA (fast, keeps the main directions) and then t-SNE to two dimensions (none, and an earlier run's
    removed, when too few parts decode to draw it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    train = train[:: max(1, len(train) // max_train)][:max_train]
    # a defect folder named in another code page is a legend the font renderer takes (path_text)
    groups = ["train good"] * len(train) + [("test good" if s.label == 0 else path_text(s.defect_type))
                                            for s in samples]
    feats, kept = image_features(model, list(train) + [s.path for s in samples])
    groups = [groups[i] for i in kept]
    if len(feats) < 5:
        _drop(out / "embedding_map.png")
        return
    # the map places parts among the category's training goods, read from train/good: with --model they may be
    # gone since the fit (moved, deleted), and a map of the test parts alone must not pass for one among them
    alone = "train good" not in groups
    if alone:
        log.warning("embedding_map.png shows the test parts alone: the category's train/good holds no image that "
                    "decodes to place them among (the model keeps no features of its training images to draw)")
    reduced = PCA(n_components=min(50, len(feats) - 1, feats.shape[1]), random_state=0).fit_transform(feats)
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(feats) - 1) / 3), init="pca", random_state=0
              ).fit_transform(reduced)
    fig, ax = plt.subplots(figsize=(7, 6))
    names = ["train good", "test good"] + sorted({g for g in groups} - {"train good", "test good"})
    for name, (color, marker) in zip(names, group_styles(len(names))):
        idx = [i for i, g in enumerate(groups) if g == name]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=14 if name != "train good" else 8, label=f"{name} ({len(idx)})",
                       color=color, marker=marker, alpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    where = "where test parts sit, no training good found" if alone else "where parts sit among the good ones"
    ax.set_title(f"{where} (PCA, then t-SNE of mean patch features)")
    ax.legend(fontsize=7, loc="best")
    _save_figure(fig, out / "embedding_map.png")
