"""One fit of an :class:`~.model.AnomalyModel`, stage by stage, in the order the data flows.

The facade's ``fit`` hands its model to a :class:`Fit`, which runs the stages and leaves the fitted parts on the
model: patch embeddings of every training image (embedder.py, patch_store.py), selection, coreset and index
(knn_scorer.py), leave-one-out scores and the contamination guard (contamination.py), the training catalog
(provenance.py), the optional second opinion (autoencoder.py, branch_beside.py), the calibration (decision.py) and
the manifest (manifest.py). What one fit learns about itself along the way (how the branch was decided, which
images the threshold left out) lives on the :class:`Fit` until the manifest records it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch  # first: FAISS then shares its OpenMP pool (parallelism.load_faiss_after_torch)
import faiss
import numpy as np
from PIL import Image

from . import __version__, bit_depth
from .autoencoder import AEConfig, ReconstructionScorer
from .bit_depth import with_depth
from .branch_beside import BranchBeside, StoredGrids, train_timed
from .calibration import TAIL_MIN_IMAGES, threshold_rule
from .calibration_set import CALIBRATION_FILE, CALIBRATION_SET_SIZE, calibration_set_bytes
from .compression import fitted_quality
from .contamination import GUARD_TAIL, MIN_IMAGES, MIN_RATIO, SUPPORT, Suspect, find_suspects, threshold_sample
from .decision import KNN, calibration_sample, raise_to_learnt
from .errors import ConfigError, ContaminationError
from .features import layer_dims
from .foreground import estimate_foreground
from .grain import CHECK_IMAGES, GrainAlignment
from .image_map import ImageMap
from .images import ImageInput, blank_spread, flattest_part, source_quality
from .inspection_mask import AUTO as MASK_AUTO, mask_for_fit
from .layout import LAYOUT_STRENGTH, layout_strength, sample_ids
from .manifest import FORMAT_NAME, FORMAT_REVISION, FORMAT_VERSION, Manifest
from .orientation import (TurnedCopies, left_out_turned, posed_grids, surface_warning, upright_only_threshold,
                          worst_pose)
from .parallelism import intra_op_threads
from .part_groups import PartGroups
from .patch_store import PatchStore
from .preprocessing import channels_of, photo_channels, red_blue, red_blue_of
from .progress import RESTATED_BY_CLI, progress_bar
from .provenance import CATALOG_FILE, THUMBNAIL_SIDE, TrainingCatalog, thumbnail
from .scorer import RawScore
from .tiling import check_tile, tile_section
from .timing import StageTimer
from .training_set import LISTED_NAMES, FirstCopies, TrainingImages, hash_inputs, listing, pixel_digest

if TYPE_CHECKING:
    from .model import AnomalyModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SeenImage:
    """What a fit keeps of a training image after its patches are stored: the catalog's entry."""

    name: str
    digest: str
    shape: tuple[int, ...]
    thumbnail: bytes


class Fit:
    """One fit of ``model``: :meth:`run` fits it on good images and sets its fitted parts (bank, index,
    calibration, catalog, second opinion, suspects, manifest)."""

    def __init__(self, model: AnomalyModel):
        self.model, self.cfg = model, model.config
        self.second: dict[str, Any] = {}  # the whole-image branch: trained or not, and why
        self.layout: float | None = None  # how much of the part's look its place in the frame fixes (layout.py)
        self.left_out_seconds = 0.0
        self.guarded = 0  # training images the contamination guard judged (0: it did not run)
        self.outliers: list[str] = []  # images plain leave-one-out set aside from the threshold
        self.turned: dict[str, Any] = {}  # orientation="any": what the manifest says of the copies
        self.alignment: dict[str, Any] = {}  # orientation="any": what the grain check measured (grain.py)
        self.ae_stats: dict[str, Any] = {}
        self.branch_learnt: dict[int, float] = {}  # the branch's image score of each image it learnt, by place in kept
        self.firsts = FirstCopies()  # exact duplicates are left out of the bank and the calibration
        self.held_out_repeats = 0  # of them, images the hold-out had set aside for the threshold
        self.learnt_ids: list[int] = []  # the source indices of the images the bank learnt (repeats left out)
        self.held_out: list[dict[str, str]] = []  # holdout calibration: the images it calibrated on, by pixels
        self.channels: set[str] = set()  # grey and/or colour: what the bank's photos were (channels_warning)
        self.parts: PartGroups | None = None  # part_id: each good image's part (by source index), part_groups.py
        self.part_summary: dict[str, Any] | None = None  # what the manifest records of the kept images' groups
        self.leans: list[float] = []  # each colour photo's red-minus-blue lean (swap_warning)
        self.spreads: list[float] = []  # each photo's blocks' spread (images.blank_spread)
        self.qualities: list[int | None] = []  # each good photo's JPEG quality (compression_warning)

    def run(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
            root: str | Path | None = None) -> None:
        """Fit on ``images`` (named ``names``); ``root``: the folder ``part_id`` reads their paths relative to
        (None: their common folder)."""
        m, cfg = self.model, self.cfg
        if m.knn.selector is None:
            raise ConfigError(f"selection={cfg.selection} is no longer offered for new fits; use std or none")
        t_start = time.perf_counter()
        m.autoencoder_ = None  # a re-fit starts clean: this fit decides again whether there is a second opinion
        m.decision.scorer_calibrations = {}
        # and whether photos are turned to a grain (fit_alignment, orientation any only): one kept from an earlier
        # fit would turn photos that this fit's threshold, read from them as they came, never saw turned
        m.alignment_ = None
        m.embedder.backbone  # noqa: B018 - fails here, before any image work, if weights are unavailable
        source = TrainingImages(images, names, m.limits)
        # 16-bit images read with the white of the bits they carry (grey and colour each their own), here and for
        # every photo the model scores
        depths = bit_depth.resolve(cfg.bit_depth, source.sources, m.progress, source.names)
        # and no JPEG quality until this fit's photos set it: a re-fit's photos are not measured against the last's
        # (and a transparency key read as transparent, a colour profile as sRGB, whatever the model re-fitted had
        # read: recorded below)
        m.limits = source.limits = dataclasses.replace(with_depth(m.limits, depths.grey, depths.colour),
                                                       jpeg_quality=None, depths_kept=True, transparency_keys=True,
                                                       colour_profiles=True)
        if len(source) < 2:  # a header that reads is not an image that decodes: count (and skip) only those that do
            raise self.too_few(len(source.decoded(range(len(source)))[0]), source.skipped)
        if cfg.part_id is not None:  # refused before any image work when it leaves nothing to calibrate against
            self.parts = PartGroups.of(cfg.part_id, source.names, root)
            self.parts.check()
        # the whole-image branch calibrates on the images it did not learn, beside the kNN's leave-one-out threshold
        # (decision.py, rule "excess"); the feature autoencoder's fusion needs one held-out sample for both
        left_out = cfg.calibration == "leave-one-out" and cfg.autoencoder != "features"
        if cfg.calibration == "leave-one-out" and not left_out:
            log.warning("the feature autoencoder is calibrated on held-out images: calibration=holdout for this fit")
        order = np.random.default_rng(cfg.seed).permutation(len(source))
        n_cal = 0 if left_out else int(round(len(source) * cfg.calibration_fraction))
        if not left_out:
            n_cal = min(max(n_cal, 1 if cfg.calibration_fraction > 0 else 0), len(source) - 1)
            if len(source) - n_cal < 2:  # else "need at least 2 readable images" blamed images that all read
                # the feature autoencoder chose the held-out threshold, not the user: the leave-one-out one, which
                # they already asked for, is no way out while it stays
                why, way_out = (("the feature autoencoder's held-out threshold (--autoencoder features, ",
                                 "fit without --autoencoder features (the leave-one-out threshold)")
                                if cfg.calibration == "leave-one-out" else
                                ("the held-out threshold (", "use the leave-one-out threshold"))
                raise ConfigError(
                    f"{why}--calibration-fraction {cfg.calibration_fraction:g}) keeps {n_cal} of the "
                    f"{len(source)} good images out of the memory bank, which leaves {len(source) - n_cal}; the bank "
                    "needs at least 2: add good images, lower --calibration-fraction (0: the threshold from the "
                    f"training images, expect more false alarms), or {way_out}")
        cal_ids, train_ids = np.sort(order[:n_cal]), np.sort(order[n_cal:])
        check_tile(cfg.tile, cfg.image_size, m.embedder.preprocessing.stride, source.shapes)
        m.embedder.fit_scale(source.shapes, cfg.resize)
        if cfg.mask == MASK_AUTO:
            m.embedder.inspect = None  # the foreground is looked for in the whole frame
            m.mask_ = estimate_foreground(m.embedder, source.subset(train_ids))
        else:
            m.mask_ = mask_for_fit(cfg.mask, source, m.embedder)
        # orientation="any": turned and mirrored copies of every image join the bank as its own (orientation.py)
        copies = TurnedCopies(m.embedder, cfg.seed, alignment=self.fit_alignment(source, train_ids)) \
            if cfg.orientation == "any" else None
        with (PatchStore() as store, copies if copies is not None else contextlib.nullcontext(),
              contextlib.ExitStack() as cleanup):
            # 1. patch embeddings of every training image, decoded one batch at a time (training_set.py)
            seen = self.embed_training(source, train_ids, store, copies)
            # the manifest's images_sha256 covers every decoded image, repeats included
            digests = [s.digest for s in seen] + [r.digest for r in self.firsts.repeats]
            # the whole-image branch is trained only where the part has a layout, measured on the kept thumbnails
            # (their inspected pixels: the branch sees no others)
            self.layout = layout_strength([np.asarray(Image.open(io.BytesIO(seen[i].thumbnail)).convert("RGB"))
                                           for i in sample_ids(len(seen))], m.mask_)
            second_opinion = self.trains_second_opinion(self.layout)
            if len(store) < 2:
                raise self.too_few(len(store), source.skipped)
            # 2-4. selection, coreset and index
            kept = list(range(len(store)))  # the images of the bank, as store indices (catalog order)
            # on a CPU the whole-image branch trains beside the coreset greedy (branch_beside.py)
            beside = (BranchBeside(store, kept, AEConfig.for_kind(cfg.ae_kind, cfg.ae_epochs, cfg.seed), cfg.sigma,
                                   m.progress)
                      if second_opinion and cfg.ae_kind == "global" and m.device.type == "cpu" else None)
            if beside is not None:  # on the way out, before the store closes; after result(), it does nothing
                cleanup.callback(beside.cancel)
            m.knn.fit(store, extra=copies, on_selected=beside.start if beside is not None else None)
            self.set_groups(kept)
            m.suspects_, m.guard_scores_ = [], {}
            raws: list[dict[str, RawScore]] = []
            if left_out:  # 5. leave-one-out scores of every training image; the guard on what went into ./good
                kept, raws = self.guarded_left_out(store, kept, seen, copies, beside)
            branch = beside.result() if beside is not None else None
            m.knn.place(m.device, m.knn_precision)
            self.catalog(store, kept, seen)
            if second_opinion:  # 6. the second opinion, on the same patches
                self.second_opinion(store, kept, seen, branch, raws if left_out else None)
            # 7. calibration: leave-one-out scores of the training images (outliers left out), or held-out normals
            if left_out:
                n_set = self.calibrate_left_out(store, kept, seen, raws, copies)
            else:
                n_set = self.calibrate_holdout(source, cal_ids, digests)
            if copies is not None:
                self.describe_copies(copies, kept, left_out, len(raws))
            self.warn_if_few(left_out)
            n_train, streamed = len(kept), store.spilled
        if self.firsts.repeats:
            log.warning("%d exact duplicate image(s) left out of the bank and the threshold: %s",
                        len(self.firsts.repeats), self.firsts.listing(), extra={RESTATED_BY_CLI: True})
        fit_seconds = time.perf_counter() - t_start
        m.manifest_ = self.manifest(n_train, n_cal - self.held_out_repeats, digests, source.skipped, fit_seconds,
                                    n_set, "leave-one-out" if left_out else "holdout", streamed)
        m.limits = dataclasses.replace(m.limits, jpeg_quality=m.manifest_.preprocessing.jpeg_quality)
        log.info("fitted on %d images (%s) in %.1fs; bank %d of %d patches", n_train,
                 "leave-one-out calibration" if left_out else f"{n_cal} held out", fit_seconds,
                 m.knn.bank_size, m.knn.stats_["from_patches"])

    def set_groups(self, kept: list[int], dropped: Sequence[str] = ()) -> None:
        """The part group of each image the bank numbers (its place in ``kept``, store indices), which its
        leave-one-out scores leave out whole (part_groups.py); none without ``part_id``. ``dropped``: the suspects
        contamination="drop" left out, which a refusal of the groups names with the exact repeats: the pattern was
        checked on the whole folder before, and a refusal that counted only the images left blamed the pattern."""
        if self.parts is None:
            self.model.knn.groups_ = None
            return
        # store index i is the i-th image the fit embedded, source index learnt_ids[i] (exact repeats left out)
        sub = PartGroups(self.parts.pattern, tuple(self.parts.parts[self.learnt_ids[i]] for i in kept))
        try:
            sub.check()
        except ConfigError as exc:
            left = [f"{len(self.firsts.repeats)} exact duplicate(s)"] if self.firsts.repeats else []
            if dropped:
                left.append(f"{len(dropped)} suspect image(s) (--contamination drop: {', '.join(dropped)}; "
                            "--contamination warn keeps them)")
            if not left:
                raise
            raise ConfigError(f"of the {len(self.parts.parts)} good images the fit read, it left out "
                              f"{' and '.join(left)}; of the {len(kept)} left, {exc}") from None
        self.model.knn.groups_ = sub.numbers()
        self.part_summary = sub.summary()
        info = self.part_summary
        log.info("leave-one-out by part (part_id '%s'): %d images in %d groups, the largest of %d; %d image(s) the "
                 "pattern did not match, each a group of its own", info["pattern"], len(kept), info["n_groups"],
                 info["largest"], info["unmatched"])

    def warn_if_few(self, left_out: bool) -> None:
        """A fit on a handful of good images works, but its threshold rests on a handful of scores (no tail to fit)
        and the guard cannot tell an outlier from the spread: say so, with what would fix it. Whether the guard ran
        is what it judged, not what a drop left: a drop can leave fewer images than the guard needs, after it ran."""
        cal = self.model.decision.calibration
        assert cal is not None
        if cal.n_images >= TAIL_MIN_IMAGES:
            return
        guard = (f"; the contamination guard needs {MIN_IMAGES} images and did not run"
                 if left_out and self.guarded < MIN_IMAGES else "")
        # a fit of six that rests on four: which two, and why (else only the manifest said)
        aside = (f", {len(self.outliers)} set aside as outliers among the good images' scores "
                 f"({listing(self.outliers, LISTED_NAMES)})"
                 if self.outliers else "")
        log.warning("the threshold rests on the scores of %d good image(s) (%s%s): %d or more give it a fit to their "
                    "tail that holds on a line%s. Add good images and fit again.", cal.n_images, cal.method, aside,
                    TAIL_MIN_IMAGES, guard)

    def fit_alignment(self, source: TrainingImages, train_ids: np.ndarray) -> GrainAlignment | None:
        """orientation="any" on a surface whose grain runs one way: the turn that brings a photo's grain to the
        good images' (grain.py), kept when the fit reads known turns back reliably. Not with tiles or an
        inspection mask, whose frames are the photo's own."""
        m, cfg = self.model, self.cfg
        m.alignment_ = None
        if cfg.tile is not None or m.mask_ is not None:
            return None
        if cfg.image_score != "map-max":  # a turned photo's score is its map's hottest pixel on its own pixels
            self.alignment = {"kept": False, "why": f"image_score {cfg.image_score}: only map-max reads a map"}
            return None
        ids = list(train_ids[:: max(1, len(train_ids) // CHECK_IMAGES)][:CHECK_IMAGES])
        _, sample = source.decoded(ids)
        # grains read at a multiple of the size the network sees, whatever the camera's resolution
        m.alignment_, self.alignment = GrainAlignment.fit(sample, cfg.seed, m.embedder.preprocessing.working_size)
        return m.alignment_

    # ------------------------------------------------------------------ 1. features
    def embed_training(self, source: TrainingImages, train_ids: np.ndarray, store: PatchStore,
                       copies: TurnedCopies | None = None) -> list[SeenImage]:
        """Decode, embed and store the training images ``train_ids`` of ``source``, one batch of a working size at
        a time, and their turned ``copies`` when given; returns, per stored image, what the catalog keeps of it
        (its pixels are not kept)."""
        embedder = self.model.embedder
        train = source.subset(train_ids)
        seen: list[SeenImage] = []
        with progress_bar(self.model.progress, total=len(train), desc="features", unit="img") as bar:
            for batch in embedder.groups_by_shape(train.shapes):
                ok, arrays = train.decoded(batch)
                digests = [pixel_digest(img) for img in arrays]
                new = [p for p, (j, d) in enumerate(zip(ok, digests)) if self.firsts.keep(train.names[j], d)]
                ok, arrays, digests = [ok[p] for p in new], [arrays[p] for p in new], [digests[p] for p in new]
                if arrays:
                    first = len(store)
                    for e, img in zip(embedder.embed(arrays).per_image(), arrays):
                        store.add(e, embedder.layout(img.shape))  # tiled: (tiles, h, w, d) and its layout
                    if copies is not None:
                        copies.add(arrays, store.grids[first:])
                    for j, img, digest in zip(ok, arrays, digests):
                        seen.append(SeenImage(train.names[j], digest, img.shape, thumbnail(img)))
                        self.channels.add(photo_channels(img))
                        if self.channels == {"colour"}:
                            self.leans.append(red_blue(img))
                        self.qualities.append(source_quality(train.sources[j]))
                        self.spreads.append(blank_spread(img))
                        self.learnt_ids.append(int(train_ids[j]))
                bar.update(len(batch))
        return seen

    # ------------------------------------------------------------------ 5. leave-one-out and the guard
    def guarded_left_out(self, store: PatchStore, kept: list[int], seen: list[SeenImage],
                         copies: TurnedCopies | None, beside: BranchBeside | None
                         ) -> tuple[list[int], list[dict[str, RawScore]]]:
        """Leave-one-out scores of the ``kept`` images and the contamination guard's verdict on them; with
        ``contamination=drop`` the bank is re-fitted without the suspects. The images the bank keeps, and their
        leave-one-out opinions."""
        m, cfg = self.model, self.cfg
        raws, support_scores = self.left_out_raws(store, kept, seen, SUPPORT if len(kept) >= MIN_IMAGES else 0,
                                                  beside)
        names = [seen[i].name for i in kept]
        self.guarded = len(kept) if len(kept) >= MIN_IMAGES else 0
        m.guard_scores_ = dict(zip(names, map(float, support_scores)))
        m.suspects_ = find_suspects(support_scores, names, cfg.threshold_sigma, min_ratio=MIN_RATIO, tail=GUARD_TAIL)
        self._guard(m.suspects_)
        if m.suspects_ and cfg.contamination == "drop":
            if beside is not None:  # it learnt the suspects too: one for the kept images trains later
                beside.cancel()
            suspect_names = {s.name for s in m.suspects_}
            kept = [i for i in kept if seen[i].name not in suspect_names]
            self.set_groups(kept, [s.name for s in m.suspects_])  # refused before the bank is built again
            m.knn.fit(store, images=kept, extra=copies)
            raws, _ = self.left_out_raws(store, kept, seen)  # the branch was cancelled above
            log.warning("contamination=drop: re-fitted without %d suspect image(s)", len(m.suspects_))
        return kept, raws

    def left_out_raws(self, store: PatchStore, kept: list[int], seen: list[SeenImage], support: int = 0,
                      beside: BranchBeside | None = None) -> tuple[list[dict[str, RawScore]], list[float]]:
        """Each of the ``kept`` training images' kNN opinion against the bank without its own patches
        (knn_scorer.py; the bank numbers them by their place in ``kept``) and, with ``support`` > 0, its support
        score for the contamination guard (contamination.py), from the same search. On one thread while the
        whole-image branch ``beside`` still trains: it holds the other core. An aligned model scores them against
        its images' own rows, as it scores a photo it leaves as it came (knn_scorer.py)."""
        m = self.model
        t0 = time.perf_counter()
        m.knn.place(m.device, m.knn_precision)
        keep = torch.from_numpy(m.knn.selected_)
        own = m.alignment_ is not None
        shortlist = m.knn.left_out_search(len(kept), own=own)
        out: list[dict[str, RawScore]] = [{} for _ in kept]
        supported: list[float] = [0.0] * len(kept) if support > 0 else []
        shapes = [tuple(seen[i].shape) for i in kept]
        # several images to a search (one image's patches are too few to pay for a search call), grouped as the
        # backbone groups them; a tiled image's grid is its own, so those go one at a time
        groups = (m.embedder.groups_by_shape(shapes) if m.embedder.tile is None
                  else ([p] for p in range(len(kept))))
        with progress_bar(m.progress, total=len(kept), desc="leave-one-out", unit="img") as bar:
            for ids in groups:
                emb = m.embedder.wrap_many([store.grid(kept[p], keep) for p in ids], [shapes[p] for p in ids])
                with intra_op_threads(1) if beside is not None and beside.running() else contextlib.nullcontext():
                    if support > 0:
                        raws, scores = m.knn.score_left_out_supported(emb, ids, support, shortlist=shortlist,
                                                                      own=own)
                        for p, v in zip(ids, scores):
                            supported[p] = v
                    else:
                        raws = m.knn.score_left_out(emb, ids, shortlist=shortlist, own=own)
                for p, (score, amap) in zip(ids, raws):
                    # all the calibration reads of the map
                    out[p] = {KNN: (score, calibration_sample(amap, m.decision.pixel_sample))}
                bar.update(len(ids))
        self.left_out_seconds += time.perf_counter() - t0
        return out, supported

    def too_few(self, n: int, skipped: list[str]) -> ConfigError:
        """The error of a fit left with fewer than 2 images to learn (``n``), saying how many did not decode
        (``skipped``; the log names each) and naming the exact duplicates it left out."""
        repeats = self.firsts.repeats
        unreadable = f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""
        if not repeats:
            return ConfigError(f"need at least 2 readable normal images to fit, got {n}{unreadable}")
        return ConfigError(f"need at least 2 distinct readable normal images to fit, got {n}{unreadable}: "
                           f"{len(repeats)} exact duplicate(s) left out ({self.firsts.listing(LISTED_NAMES)})")

    def _guard(self, suspects: list[Suspect]) -> None:
        """Tell about training images that look unlike the rest; stop the fit when asked to."""
        if not suspects:
            return
        listing = "; ".join(f"{s.name} (score {s.score:.4g} > {s.threshold:.4g} set by the others, "
                            f"{s.ratio:.2f}x the median)" for s in suspects)
        if self.cfg.contamination == "fail":
            raise ContaminationError(f"{len(suspects)} training image(s) look unlike the other good ones and may be "
                                     f"defective: {listing}. Check them, remove them from the training folder, or "
                                     "fit with --contamination drop", suspects)
        log.warning("%d training image(s) look unlike the other good ones and may be defective: %s", len(suspects),
                    listing, extra={RESTATED_BY_CLI: True})

    # ------------------------------------------------------------------ the evidence a flagged region cites
    def catalog(self, store: PatchStore, kept: list[int], seen: list[SeenImage]) -> None:
        """The training images the bank's patches came from (provenance.py), and the page's map of them."""
        m = self.model
        m.catalog_ = TrainingCatalog()
        for i in kept:
            lay = store.layouts[i]  # tiled: the boxes are cells of the image's stitched grid
            m.catalog_.add_entry(seen[i].name, seen[i].digest, seen[i].shape,
                                 lay.grid if lay is not None else store.grids[i], seen[i].thumbnail)
        # the page's map (image_map.py): each image's mean patch, in the kept dimensions
        m.catalog_.image_map = ImageMap.fit(np.stack([store.pooled[i][m.knn.selected_] for i in kept]))

    # ------------------------------------------------------------------ 6. the second opinion
    def trains_second_opinion(self, strength: float | None) -> bool:
        """Whether this fit trains a second opinion: the feature autoencoder when asked; the whole-image branch
        where the part has a layout (layout.py), or with ``ae_keep=always``. Without one, the fit calibrates
        leave-one-out as a plain kNN fit does."""
        cfg = self.cfg
        if cfg.ae_kind != "global":
            return cfg.ae_kind is not None
        always = cfg.autoencoder == "global" and cfg.ae_keep == "always"
        # auto gives way to what the branch does not combine with: turned parts and tiles have no one layout
        clash = cfg.autoencoder == "auto" and (cfg.orientation == "any" or cfg.tile is not None)
        fused = always or (not clash and strength is not None and strength >= LAYOUT_STRENGTH)
        self.second = {"branch": "global", "rule": "always" if always else "layout",
                       "layout_strength": strength, "needs": LAYOUT_STRENGTH, "fused": fused}
        if clash:
            log.info("whole-image branch not trained: it reads one layout per part, which %s does not give",
                     "--orientation any" if cfg.orientation == "any" else "--tile")
            self.second["why_not"] = "orientation any" if cfg.orientation == "any" else "tile"
        elif not fused:
            why = ("too few images to tell" if strength is None else
                   f"position explains {strength:.2f} of the good images' pixel variance, below {LAYOUT_STRENGTH}")
            # a warning only where the branch was asked for by name; by default this is the usual case of a surface
            log.log(logging.WARNING if cfg.autoencoder == "global" else logging.INFO,
                    "whole-image branch not trained, the kNN decides alone (a plain kNN fit): the part shows no fixed "
                    "layout (%s: a surface, or parts that lie any way round); --autoencoder global --ae-keep always "
                    "trains it anyway", why)
        else:
            log.info("whole-image branch fused: layout strength %s", "not tested" if strength is None
                     else f"{strength:.2f} >= {LAYOUT_STRENGTH}")
        return fused

    def second_opinion(self, store: PatchStore, kept: list[int], seen: list[SeenImage],
                       branch: tuple[ReconstructionScorer, dict[str, Any]] | None,
                       raws: list[dict[str, RawScore]] | None) -> None:
        """The second opinion over each kept image's grid in the kept dimensions: the branch trained beside the
        greedy, or one trained now. With leave-one-out ``raws``, its opinion of the images it kept out of training
        joins them (its own threshold)."""
        m, cfg = self.model, self.cfg
        samples = StoredGrids(store, kept, torch.from_numpy(m.knn.selected_))
        if branch is not None and kept == list(range(len(store))):
            m.autoencoder_, self.ae_stats = branch
        else:  # not on a CPU, or contamination=drop left images out: trained now, on the kept images
            ae_config = AEConfig.for_kind(cfg.ae_kind, cfg.ae_epochs, cfg.seed)
            m.autoencoder_ = ReconstructionScorer(ae_config, samples[0].shape[-1], sigma=cfg.sigma)
            self.ae_stats = train_timed(m.autoencoder_, samples, m.progress, device=m.device)
        if raws is not None:
            for j, opinion in zip(m.autoencoder_.val_ids_, self.branch_raws(samples, m.autoencoder_.val_ids_, seen,
                                                                             kept)):
                raws[j]["autoencoder"] = opinion
        if m.autoencoder_.config.kind == "global":  # what bounds its threshold (bound_branch)
            unseen = set(m.autoencoder_.val_ids_)
            learnt = [p for p in range(len(kept)) if p not in unseen]
            self.branch_learnt = {p: score for p, (score, _) in zip(learnt, self.branch_raws(samples, learnt, seen,
                                                                                             kept))}

    def branch_raws(self, grids: Sequence[torch.Tensor], ids: list[int], seen: list[SeenImage], kept: list[int]
                    ) -> list[RawScore]:
        """The second opinion of the images ``ids`` (places in ``kept``) from their kept-dimension ``grids``, each
        map reduced to what calibration reads, as :meth:`left_out_raws` keeps the kNN's."""
        m = self.model
        assert m.autoencoder_ is not None
        timer, out = StageTimer(), []
        for p in ids:
            emb = m.embedder.wrap_many([grids[p]], [tuple(seen[kept[p]].shape)])
            score, amap = m.autoencoder_.score(emb, timer)[0]
            out.append((score, calibration_sample(amap, m.decision.pixel_sample)))
        return out

    def bound_branch(self, learnt: list[float]) -> None:
        """Raise the branch's threshold to the one its ``learnt`` images' scores give, where that is higher.

        Its own threshold comes from the few good images it kept out of training, and on a small fit so few scores
        do not reach the tail of a good part's: its excess lifted many other good photos over the decision's
        threshold (docs/decisions.md has the bottle measurements). The images it learnt score no higher than ones
        it did not (it was fitted to them), so their threshold never asks more of a good part than unseen ones
        would give, and there are many more of them.
        """
        m = self.model
        if m.autoencoder_ is None or m.autoencoder_.config.kind != "global" or not learnt:
            return
        own = m.decision.scorer_calibrations["autoencoder"]
        bound, method = threshold_rule(np.array(learnt), self.cfg.threshold_sigma)
        self.ae_stats["learnt_bound"] = {"threshold": bound, "n_images": len(learnt), "method": method,
                                         "unseen_threshold": own.threshold, "raised": bound > own.threshold}
        raise_to_learnt(own, self.ae_stats["learnt_bound"])

    # ------------------------------------------------------------------ 7. calibration
    def calibrate_left_out(self, store: PatchStore, kept: list[int], seen: list[SeenImage],
                           raws: list[dict[str, RawScore]], copies: TurnedCopies | None) -> int:
        """Calibrate the decision on the kept images' leave-one-out opinions (each in its worse pose with
        ``orientation=any``), outliers left out; keep the sample an update re-scores. Returns its size."""
        m, cfg = self.model, self.cfg
        keep = torch.from_numpy(m.knn.selected_)
        # orientation="any": each image's whole turned copy, scored leave-one-out; the threshold takes each image's
        # worse pose, so good parts that arrive turned pass
        t_turned = time.perf_counter()
        turned = [] if copies is None else left_out_turned(m.knn, m.embedder, copies, kept,
                                                           m.knn.left_out_search(len(kept)))
        self.left_out_seconds += time.perf_counter() - t_turned
        posed = worst_pose(raws, turned)
        self.n_turned_poses = sum(1 for a, b in zip(raws, posed) if a is not b)
        # the threshold leaves out the images plain leave-one-out marks as outliers (contamination.py), each in the
        # pose that sets its score
        names = [seen[i].name for i in kept]
        self.outliers, calibrated_ids = threshold_sample([r[KNN][0] for r in posed], names, cfg.threshold_sigma)
        unseen_good = sum("autoencoder" in posed[j] for j in calibrated_ids)
        if m.autoencoder_ is not None and unseen_good < min(3, len(m.autoencoder_.val_ids_)):
            # the images the branch kept out of its training are (nearly) all kNN outliers (defects in ./good): too
            # few good images it has not learnt are left to set its threshold, so it is not fused
            log.warning("whole-image branch not fused: %d of the %d images it kept out of training are left out of "
                        "the threshold as outliers, too few good ones remain to set its own",
                        len(m.autoencoder_.val_ids_) - unseen_good, len(m.autoencoder_.val_ids_))
            m.autoencoder_, self.ae_stats = None, {}
            self.second.update(fused=False, why_not="calibration")
            posed = [{KNN: p[KNN]} for p in posed]  # the kNN's opinions alone calibrate the decision
        m.decision.calibrate([posed[j] for j in calibrated_ids])
        self.bound_branch([self.branch_learnt[j] for j in calibrated_ids if j in self.branch_learnt])
        # what the upright photos alone would set, the same way: how far the turned pose raised it
        self.upright_threshold = upright_only_threshold(raws, names, cfg.threshold_sigma) if turned else None
        # what an update re-scores: a spread-out sample of the training images' grids, with their ids
        cal_arr = np.array(calibrated_ids)
        pick = cal_arr[np.unique(np.linspace(0, len(cal_arr) - 1, min(len(cal_arr), CALIBRATION_SET_SIZE))
                                 .astype(int))]
        upright = [store.grid(kept[j], keep).to(torch.float16).numpy() for j in pick]
        half, shapes, reals = posed_grids(pick, upright, [seen[kept[j]].shape for j in pick], turned, posed,
                                          lambda p: copies.checks.grid(kept[p], keep).to(torch.float16).numpy(),
                                          lambda p: copies.check_real[kept[p]])
        # which grids are turned copies: an update searches them as the fit did (a part on a plain background's
        # copy has no own-pixel mask to tell it by)
        m.calibration_set_ = calibration_set_bytes(
            half, shapes, image_ids=pick, calibrated_ids=cal_arr, reals=reals,
            turned=[h is not g for g, h in zip(upright, half)] if copies is not None else None)
        return len(pick)

    def calibrate_holdout(self, source: TrainingImages, cal_ids: np.ndarray, digests: list[str]) -> int:
        """Calibrate the decision on the held-out images' scores (their digests join ``digests``); returns how
        many. A held-out image that repeats a training image (or an earlier held-out one) is left out: it would
        score as if learnt.

        The images are scored as they came, which is how scoring scores them: a model that turns photos to a grain
        is never calibrated here. Its alignment comes only with orientation any, which the leave-one-out threshold
        alone serves (ModelConfig.validate refuses holdout with it, at fit and at load): only that threshold reads
        the turned copies, so that turned good parts pass (docs/decisions.md)."""
        m = self.model
        if len(cal_ids):
            ok, decoded = source.decoded(cal_ids)
            held = [pixel_digest(a) for a in decoded]
            digests.extend(held)
            first = [p for p, (i, d) in enumerate(zip(ok, held)) if self.firsts.keep(source.names[i], d)]
            self.held_out_repeats = len(decoded) - len(first)
            cal_images = [decoded[p] for p in first]
            self.held_out = [{"name": source.names[ok[p]], "sha256": held[p]} for p in first]
            if not cal_images:  # whether a fit works must not depend on where the split put a copy
                log.warning("every held-out image repeats a training image (%s): threshold from training images, "
                            "expect more false alarms", self.firsts.listing())
        else:  # no hold-out asked for: scores of training images are optimistic, so the threshold is too
            log.warning("calibration_fraction=0: threshold from training images, expect more false alarms")
            cal_images = []
        if not cal_images:  # the images the bank learnt, by index: a repeat's name may be its first copy's too
            _, cal_images = source.decoded(self.learnt_ids[:20])
        cal_grids: dict[int, np.ndarray] = {}
        m.decision.calibrate([raw for raw, _, _ in m._raw_many(cal_images, desc="calibration", grids=cal_grids)])
        self.bound_branch(list(self.branch_learnt.values()))
        m.calibration_set_ = calibration_set_bytes([cal_grids[i] for i in range(len(cal_images))],
                                                   [a.shape for a in cal_images])
        return len(cal_images)

    # ------------------------------------------------------------------ what the manifest records
    def describe_copies(self, copies: TurnedCopies, kept: list[int], left_out: bool, n_posed: int) -> None:
        """orientation="any": the manifest's account of the turned copies, and the surface warning."""
        self.turned = {
            "per_image": copies.per_image, "patch_share": copies.patch_share, "bank_factor": copies.factor,
            "patches": sum(len(copies.cells[i]) for i in kept),  # the copies the bank was offered
            "surface_images": sum(copies.surface[i] for i in kept), "surface_copies": copies.surface_copies,
            "alignment": self.alignment,
            # the copies' rows the bank holds: an aligned model searches a photo it leaves as it came without them
            **({"bank_patches": int(self.model.knn.copies_.sum())} if self.model.knn.copies_ is not None else {}),
            # of the images the fit scored in both poses (an update adds images, not poses)
            **({"n_turned_poses": self.n_turned_poses, "n_posed_images": n_posed} if left_out else {}),
            **({"upright_threshold": self.upright_threshold}
               if left_out and self.upright_threshold is not None else {})}
        # over the images the model keeps (a drop re-fit leaves suspects out), as the manifest's n_images counts
        warning = surface_warning(self.turned["surface_images"], len(kept),
                                  self.model.decision.calibration.threshold,
                                  self.upright_threshold if left_out else None, bool(self.alignment.get("kept")))
        if warning is not None:
            log.warning(warning, extra={RESTATED_BY_CLI: True})

    def manifest(self, n_train: int, n_cal: int, digests: list[str], skipped: list[str], fit_seconds: float,
                 n_set: int, calibration: str, streamed: bool = False) -> Manifest:
        import torchvision

        m, cfg = self.model, self.cfg
        backbone = m.embedder.backbone
        spec = backbone.spec
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "format_revision": FORMAT_REVISION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            # without tile when it is off: such models load in releases before it; likewise without autoencoder
            # "auto" where it trained nothing: a plain kNN model, which a release before "auto" reads as "none" and
            # this one as the default it was fitted with
            "config": {k: v for k, v in cfg.to_dict().items()
                       if not (k == "autoencoder" and v == "auto" and m.autoencoder_ is None)
                       and not (k == "bit_depth" and v == "auto" and m.limits.bit_depth is None
                                and m.limits.colour_bit_depth is None)},
            "backbone": {"name": spec.name, "layers": list(spec.layers), "weights_source": backbone.source,
                         "weights_sha256": backbone.checksum},
            "preprocessing": {**m.embedder.preprocessing.to_dict(), **tile_section(cfg.tile, cfg.image_size),
                              **({"bit_depth": m.limits.bit_depth} if m.limits.bit_depth is not None else {}),
                              **({"colour_bit_depth": m.limits.colour_bit_depth}
                                 if m.limits.colour_bit_depth is not None else {}),
                              "channels": channels_of(self.channels),
                              "transparency_key": "transparent" if m.limits.transparency_keys else "opaque",
                              "colour_profile": "srgb" if m.limits.colour_profiles else "as_stored",
                              **({"red_blue": lean} if (lean := red_blue_of(self.leans, channels_of(self.channels)))
                                 is not None else {}),
                              **({"jpeg_quality": q} if (q := fitted_quality(self.qualities)) is not None else {}),
                              **({"flattest": round(f, 2)} if (f := flattest_part(self.spreads)) is not None
                                 else {})},
            "features": {"aggregation": "3x3 average pool per layer, deeper layer resized to the first grid",
                         "layer_dims": layer_dims(spec.channels, cfg.target_dim), "dim": m.knn.stats_["full_dim"]},
            **m.knn.describe(),
            **m.decision.sections(),
            "training": {"n_images": n_train, "n_calibration_images": n_cal, "n_skipped": len(skipped),
                         "images_sha256": hash_inputs(digests), "fit_seconds": round(fit_seconds, 2),
                         "device": str(m.device), "calibration": calibration,
                         "left_out_seconds": round(self.left_out_seconds, 2),
                         "patches_on_disk": streamed,
                         "suspects": [s.to_dict() for s in m.suspects_],
                         "suspects_action": cfg.contamination if m.suspects_ else None,
                         "left_out_of_threshold": self.outliers,
                         "duplicates": [r.to_dict() for r in self.firsts.repeats],
                         **({"held_out": self.held_out} if self.held_out else {}),
                         **({"turned_copies": self.turned} if self.turned else {}),
                         **({"second_opinion": self.second} if self.second else {}),
                         **({"layout_strength": round(self.layout, 4)} if self.layout is not None else {}),
                         **({"part_groups": self.part_summary} if self.part_summary is not None else {})},
            "library_versions": {"anomaly_service": __version__, "torch": torch.__version__,
                                 "torchvision": torchvision.__version__, "faiss": faiss.__version__,
                                 "numpy": np.__version__, "python": platform.python_version()},
        }
        if m.autoencoder_ is not None:
            out["autoencoder"] = {"version": 1, **m.autoencoder_.describe(), "training": self.ae_stats,
                                  "calibration": m.decision.scorer_calibrations["autoencoder"].to_dict()}
        out["calibration_set"] = {"file": CALIBRATION_FILE, "n_images": n_set, "dtype": "float16",
                                  "dim": int(m.knn.index_.d)}
        if m.catalog_ is not None and m.knn.provenance_ is not None:
            out["evidence"] = {"file": CATALOG_FILE, "n_images": len(m.catalog_), "thumbnail_side": THUMBNAIL_SIDE}
        if m.mask_ is not None:
            out["mask"] = m.mask_.describe()
        out["lineage"] = {"made_by": "fit"}
        return Manifest.model_validate(out)
