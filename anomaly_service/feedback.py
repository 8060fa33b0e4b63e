"""Feedback into a fitted model: add good images an operator confirmed, without a re-fit and without downtime.

Users of the open tools ask for this (add good images to a fitted PatchCore, learn from wrong predictions). An
update embeds only the new images, adds to the bank only the patches it does not already cover (the fit's greedy
k-center continues from the bank and stops at the coverage radius the fit reached), and re-calibrates on the
held-out calibration grids a fit keeps in ``calibration.npz`` (so the original images are not needed). Images
reviewed as defects guard it: one offered as good is refused, and an update that would let any of them pass is
refused unless forced. The result is a new model; saving it writes a new version and archives the old one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .autoencoder import ReconstructionScorer
from .bit_depth import above_white, white_described
from .calibration_set import CALIBRATION_FILE, CalibrationSet
from .compression import fitted_as_read, learnt_harder, said_with
from .decision import GATED_RULES, KNN, Decision, calibration_sample, raise_to_learnt
from .errors import ConfigError, ContaminationError, ModelFormatError, UpdateRefusedError, UpdateUnavailableError
from .grain import TurnedView, photo_cells
from .images import DEPTH_WARNING_START, ImageInput, blank_spread
from .manifest import FORMAT_REVISION, REVISION_KEY, Manifest
from .orientation import (TurnedCopies, left_out_turned, own_pixels, row_cells, update_copies, with_turned_copies,
                          worst_pose)
from .preprocessing import channels_of, joined_channels, photo_channels
from .progress import RESTATED_BY_CLI, progress_bar
from .provenance import patch_sources
from .scorer import RawScore
from .timing import StageTimer
from .training_set import LISTED_NAMES, FirstCopies, digest_inputs, hash_inputs, listing, load_inputs

if TYPE_CHECKING:
    from .model import AnomalyModel  # noqa: F401 - also imported above, at run time, for the helpers

log = logging.getLogger(__name__)

def update_model(model: AnomalyModel, good_images: Sequence[ImageInput],
                 known_defects: Sequence[ImageInput] = (), force: bool = False, *,
                 names: Sequence[str] | None = None, defect_names: Sequence[str] | None = None,
                 contamination: str = "warn") -> AnomalyModel:
    """A new model whose bank also covers ``good_images``, re-calibrated; this model is left untouched.

    Only the patches the bank does not already cover are added: the fit's greedy k-center continues with the
    bank as the chosen set and stops at the coverage radius the fit reached. The threshold is re-calibrated by
    re-scoring the stored held-out calibration grids against the grown bank (and the autoencoder, if any).

    ``known_defects`` are images reviewed as defects. One of them offered as good is refused; and when any
    would score below the new threshold the update raises :class:`UpdateRefusedError` listing them, unless
    ``force``. A good image unlike the photos the model was fitted on (:meth:`AnomalyModel.unlike_fit`) is
    left out and listed in ``unlike_``. ``contamination`` says what becomes of added images the updated model still
    flags (``still_flagged_``), as the fit's option of that name does of its suspects: ``warn`` keeps them, ``drop``
    learns again without them (listed in ``left_out_``), ``fail`` raises :class:`ContaminationError`. Save the
    result with ``save(path, keep_versions=...)`` to keep the version it replaces.
    """
    from .options import MODEL_OPTIONS

    MODEL_OPTIONS["contamination"].check("contamination", contamination)
    model._check_fitted()
    assert model.manifest_ is not None
    if not model.updatable:
        raise UpdateUnavailableError(
            "this model was saved before updates existed and has no calibration data to re-calibrate with; "
            "re-fit once with this release to enable updates (anomaly fit)")
    if model.knn.selector is None:
        raise UpdateUnavailableError(f"selection={model.config.selection} is no longer offered; re-fit the model "
                                     "with this release to enable updates")
    if model.manifest_.format_revision > FORMAT_REVISION:
        # it reads the model (the fields it does not know are ignored) but would re-calibrate it without them
        raise UpdateUnavailableError(
            f"this model was written by a newer release (format revision {model.manifest_.format_revision}; this "
            f"release writes {FORMAT_REVISION}): an update here would re-calibrate it without what that release "
            "added; update it with the release that wrote it, or re-fit it with this one (anomaly fit)")
    calibration_set = CalibrationSet.of(model)  # refused here, before any work, when it is not what is described
    t0 = time.perf_counter()
    # a 16-bit photo above the white the good images were read with would be learnt clipped to white (bit_depth.py)
    brighter = above_white(good_images, names, model.limits)
    if brighter:
        raise ConfigError(f"{len(brighter)} good image(s) hold values above this model's "
                          f"{white_described(model.limits)}, read from its good images, and would be learnt clipped "
                          f"to white: {', '.join(brighter)}. Fit again with them (--bit-depth auto, or the camera's)")
    notes: list[tuple[str, ...]] = []  # what decoding said of each (which frame was read): the pixels do not say
    qualities: list[int | None] = []  # and each file's JPEG quality: what the bank learns lowers the good photos'
    arrays, digests, g_names, skipped = load_inputs(good_images, names, model.limits, model.progress, "image",
                                                    notes=notes, qualities=qualities)
    if not arrays:
        raise ConfigError("no readable good image to add" + (f" ({skipped[0]})" if skipped else ""))
    defects, defect_digests, d_names = digest_inputs(known_defects, defect_names, model.limits, model.progress,
                                                     "defect")
    known = set(defect_digests)
    as_good = sorted({g_names[i] for i, d in enumerate(digests) if d in known})
    if as_good:
        raise UpdateRefusedError(f"{len(as_good)} image(s) offered as good are reviewed as defects and are "
                                 f"never added: {', '.join(as_good)}", as_good, reason="defect_as_good")
    # an image the model already has (or one given twice) teaches nothing and would count twice: skipped, as a fit
    # leaves exact duplicates out (training_set.Repeat). So is an image the threshold was read from (holdout
    # calibration): learnt, it would be re-scored as if new and move the threshold
    learnt = list(zip(model.catalog_.names, model.catalog_.digests)) if model.catalog_ is not None else []
    held_out = [(f"{h.name} (held out for the threshold)", h.sha256)
                for h in (model.manifest_.training.held_out if model.manifest_ is not None else [])]
    firsts = FirstCopies(learnt + held_out)
    fresh = [i for i, (n, d) in enumerate(zip(g_names, digests)) if firsts.keep(n, d)]
    if firsts.repeats:
        if not fresh:
            raise ConfigError(f"no new good image to add: {len(firsts.repeats)} exact duplicate(s) of images the "
                              f"model already has ({firsts.listing(LISTED_NAMES)})")
        log.warning("update: %d exact duplicate image(s) skipped: %s", len(firsts.repeats),
                    firsts.listing(LISTED_NAMES), extra={RESTATED_BY_CLI: True})
        arrays, digests, g_names, notes, qualities = _taken(fresh, arrays, digests, g_names, notes, qualities)
    # a photo unlike the good ones (far from their size, grey where they were colour or the reverse, another shape
    # than the mask's frame) is left out, as scoring it warns: learnt, the bank would hold a part seen at another
    # zoom, in other colours or under a stretched mask, and the warning's advice (re-fit on the new camera's photos)
    # would come after the update had already taken it
    # A 16-bit photo read darker than its camera gave it (images.depth_warning) is left out likewise: learnt, the
    # bank would hold near-black patches of a part it never saw
    why = [" ".join([*(n for n in said if n.startswith(DEPTH_WARNING_START)), *model.unlike_fit(a)])
           for a, said in zip(arrays, notes)]
    unlike = [(name, w) for name, w in zip(g_names, why) if w]
    if unlike:
        said = [f"{name}: {w}" for name, w in unlike]
        if len(unlike) == len(arrays):
            raise ConfigError(f"no good image to add: {len(unlike)} photo(s) unlike the photos the model was fitted "
                              f"on, left out: {'; '.join(said)}")
        # the log (the service's: the command line says it itself) names the first few: the answer lists them all
        log.warning("update: %d good image(s) not added, unlike the photos the model was fitted on: %s",
                    len(unlike), listing(said, LISTED_NAMES), extra={RESTATED_BY_CLI: True})
        like = [i for i, w in enumerate(why) if not w]
        arrays, digests, g_names, notes, qualities = _taken(like, arrays, digests, g_names, notes, qualities)
    left_out: list[str] = []  # still flagged after the update, and left out (contamination="drop")
    while True:
        learnt = learnt_model(model, arrays, digests, g_names, calibration_set)
        flagged = [j for j, r in enumerate(learnt.checked) if r.is_anomaly]
        if not flagged or contamination == "warn":
            break
        # the update's own outliers: good images it learnt and still flags (a defective part marked good, say), as
        # the fit's contamination guard lists the training images that look unlike the others
        still = [g_names[j] for j in flagged]
        if contamination == "fail":
            raise ContaminationError(f"{len(still)} of the {len(arrays)} added good image(s) are still flagged by the "
                                     f"updated model and may be defective: {', '.join(still)}. Check them, leave them "
                                     "out of the good images, or update with --contamination drop", still)
        left_out += still
        keep = [j for j in range(len(arrays)) if j not in flagged]
        if not keep:
            raise ConfigError("no good image left to add: the updated model still flags every one it learnt "
                              f"(--contamination drop left out {', '.join(left_out)})")
        log.warning("update: contamination=drop: %d added good image(s) still flagged, learnt again without them: %s",
                    len(still), listing(still, LISTED_NAMES), extra={RESTATED_BY_CLI: True})
        arrays, digests, g_names, notes, qualities = _taken(keep, arrays, digests, g_names, notes, qualities)
    new, checked = learnt.new, learnt.checked
    # 4. the guard: no image reviewed as a defect may pass
    passing, new.defects_checked_ = defects_passing(new, defects, d_names)
    if passing and not force:
        raise UpdateRefusedError(
            f"refused: after this update {len(passing)} image(s) reviewed as defects would score below the "
            f"threshold: {', '.join(passing)} (force overrides: --force on the command line, force=true over HTTP)",
            passing)
    # what the operators said is good and the model still flags (a second opinion that an update does not teach)
    new.still_flagged_ = [name for name, r in zip(g_names, checked) if r.is_anomaly]
    # what scoring would still say of an added photo (which frame of a file was read): said with the update
    new.update_warnings_ = [f"{name}: {w}" for name, said, r in zip(g_names, notes, checked)
                            for w in (*said_with(said, r.is_anomaly), *r.warnings)]
    # a line each for the first few, then how many more: an HTTP update of a thousand photos, each warned of, wrote
    # a thousand lines to the service's log (the answer's ``warnings`` lists them all)
    for line in new.update_warnings_[:LISTED_NAMES]:
        log.warning("update: %s", line, extra={RESTATED_BY_CLI: True})
    if len(new.update_warnings_) > LISTED_NAMES:
        log.warning("update: and %d more warning(s) of the added images", len(new.update_warnings_) - LISTED_NAMES,
                    extra={RESTATED_BY_CLI: True})
    if new.still_flagged_:
        log.warning("update: %d of the %d added good image(s) are still flagged: %s", len(new.still_flagged_),
                    len(arrays), listing(new.still_flagged_, LISTED_NAMES), extra={RESTATED_BY_CLI: True})
    harder = learnt_harder(notes)  # the bank learns harder JPEGs: the model's quality no longer says what it has seen
    new.manifest_ = updated_manifest(new, len(arrays), learnt.n_added, digests, skipped, learnt.radius,
                                     force and bool(passing), time.perf_counter() - t0, learnt.turned_counts,
                                     [r.to_dict() for r in firsts.repeats],
                                     channels_of({photo_channels(p) for p in arrays}), harder,
                                     min((blank_spread(p) for p in arrays), default=None),
                                     lowered := lowered_quality(model, qualities))
    if harder:
        new.limits = dataclasses.replace(new.limits, jpeg_quality=None)
    elif lowered is not None:
        new.limits = dataclasses.replace(new.limits, jpeg_quality=lowered)
    new.version_id_ = None
    new.defects_passing_ = passing  # known defects below the threshold (non-empty only when forced)
    new.duplicates_ = firsts.repeats
    new.unlike_ = unlike
    new.left_out_ = left_out
    log.info("update: %d images, %d of %d patches added (bank %d), threshold %.4g -> %.4g", len(arrays),
             learnt.n_added, learnt.n_patches, new.knn.bank_size,
             model.decision.calibration.threshold,  # type: ignore[union-attr]
             new.decision.calibration.threshold)  # type: ignore[union-attr]
    return new


def lowered_quality(model: AnomalyModel, qualities: list[int | None]) -> int | None:
    """The good photos' lowest JPEG quality once the bank has learnt photos of ``qualities`` (None: unchanged):
    photos within the warning's margin below it are learnt without a warning, and the quality stayed where it was, so
    the drift window counted the line's photos saved as those were as compressed harder than every good photo.
    Unchanged where the model's is unknown, and where its build read qualities otherwise (a value this build writes
    would be read back as that build's)."""
    fitted = model.limits.jpeg_quality
    lowest = min((q for q in qualities if q is not None), default=None)
    if fitted is None or lowest is None or lowest >= fitted or model.manifest_ is None:
        return None
    if fitted_as_read(lowest, model.manifest_.library_versions.get("anomaly_service")) != lowest:
        return None
    return lowest


def _taken(ids: Sequence[int], *lists: list) -> tuple[list, ...]:
    """The items ``ids`` of each of ``lists`` (an update's images, digests, names and notes stay aligned)."""
    return tuple([items[i] for i in ids] for items in lists)


@dataclasses.dataclass
class Learnt:
    """One pass of an update over its good images: the new model, what it added, and each image scored by it."""

    new: AnomalyModel
    n_added: int  # patches the bank took
    n_patches: int  # patches it was offered
    radius: float
    turned_counts: dict[str, int]
    checked: list  # ScoreResult of each image, in order


def learnt_model(model: AnomalyModel, photos: list[np.ndarray], digests: list[str], g_names: list[str],
                 calibration_set: CalibrationSet) -> Learnt:
    """``model`` with ``photos`` (decoded good images, as they came) learnt and re-calibrated, and each photo scored
    by it: one pass, which an update with contamination="drop" makes again without the photos it still flags."""
    arrays = photos
    # the bank learns a turned good photo as scoring sees it (grain.py): the canvas scoring embeds, a large photo's
    # turned back from its shrunk copy, at the full-size canvas's working size
    views: list[TurnedView | None] = [None] * len(arrays)
    if model.alignment_ is not None:
        views = [model.alignment_.view(a, model.embedder.preprocessing.working_size) for a in arrays]
        arrays = [a if v is None else v.canvas for a, v in zip(arrays, views)]
    sizes = [None if v is None else v.work for v in views]

    # 1. patch embeddings of the new good images (kept dimensions only, as scoring computes them)
    feats: list[torch.Tensor] = []
    pooled: list[np.ndarray] = []  # each image's mean patch feature: its place on the image map
    grids: list[tuple[int, ...]] = []  # (h, w), or (tiles, h, w) for a tiled model
    layouts: list = []  # tiled: each image's tiles (tiling.py)
    order: list[int] = []
    added_grids: list[torch.Tensor] = []  # untiled: each image's grid, for the whole-image branch
    with progress_bar(model.progress, total=len(arrays), desc="features", unit="img") as bar:
        for batch in model.embedder.groups(arrays, sizes=sizes):
            emb = model.embedder.embed([arrays[i] for i in batch], keep=model.knn.keep, size=sizes[batch[0]])
            e = emb.features
            feats.append(e.reshape(-1, e.shape[-1]).float().cpu())
            if emb.tiles is None:
                added_grids += [g.float().cpu() for g in e]
                pooled.append(e.float().mean(dim=(1, 2)).cpu().numpy())
                grids += [(e.shape[1], e.shape[2])] * len(batch)
            else:
                per = emb.per_image()
                pooled.append(np.stack([p.float().reshape(-1, p.shape[-1]).mean(0).cpu().numpy() for p in per]))
                grids += [tuple(p.shape[:-1]) for p in per]
                layouts += emb.tiles
            order += batch
            bar.update(len(batch))
    patches = torch.cat(feats)
    # the rows of a photo the alignment turned back stand for a turned view, as the turned copies' do (knn_scorer.py)
    copies = np.repeat([views[i] is not None for i in order], [int(np.prod(g)) for g in grids])
    # 2. the uncovered ones join the bank, with where they came from
    catalog = copy.deepcopy(model.catalog_) if model.catalog_ is not None else None
    sources = None
    first_image = len(catalog) if catalog is not None else 0
    if catalog is not None:
        sources = patch_sources(grids, first_image=first_image, layouts=layouts or None)
    photo_grids = list(grids)  # each image's grid as it came
    for j, i in enumerate(order):
        if views[i] is not None:  # learnt from its canvas: its rows and its entry name the photo as it came
            photo_grids[j] = on_photo(model, sources, first_image + j, views[i], grids[j], photos[i].shape)
    rows = np.concatenate([offered_rows(views[i], g) for i, g in zip(order, grids)])
    if not rows.all():  # a turned canvas's pure fill, which scoring never searches
        patches, copies = patches[torch.from_numpy(rows)], copies[rows]
        sources = None if sources is None else sources[rows]
    turned_counts: dict[str, int] = {}  # what the new images' turned copies add to the manifest's counts
    made = None  # which rows are turned copies made from the photos
    # turned copies of the new images too, tagged with them (orientation.py); after a leave-one-out fit each image's
    # first copy is kept whole, for the threshold to read its worse pose as the fit reads its images'
    turned = update_copies(model, first_image, reads_added(model, calibration_set) and sources is not None) \
        if model.config.orientation == "any" else None
    with turned if turned is not None else contextlib.nullcontext():
        if turned is not None:
            # of the photos as they came, as the fit's are of its good photos: a canvas's filled corners are no
            # surface
            patches, sources, turned_counts = with_turned_copies(model, [photos[i] for i in order], photo_grids,
                                                                 patches, sources, first_image, turned)
            made = np.concatenate([np.zeros(len(copies), bool), np.ones(turned_counts["patches"], bool)])
            copies = np.concatenate([copies, made[len(copies):]])
        if catalog is not None:
            for j, i in enumerate(order):
                catalog.add(g_names[i], digests[i], photos[i], layouts[j].grid if layouts else photo_grids[j])
            if catalog.image_map is not None:  # placed on the fitted map: the training images keep their places
                catalog.image_map = catalog.image_map.extended(np.concatenate(pooled))
        # the made copies stay within the fit's cap on the bank (older models recorded none and keep growing)
        factor = (model.manifest_.training.turned_copies or {}).get("bank_factor") if made is not None else None
        knn, n_added, radius = model.knn.extended(patches, model.manifest_.coreset.coverage_radius, sources, copies,
                                                  made, factor)
        new = copy.copy(model)  # shares the embedder (frozen); the whole-image branch learns the images (below)
        new.knn = knn
        new._place_search()
        tuned = fine_tuned_branch(model, added_grids, calibration_set)
        if tuned is not None:
            new.autoencoder_ = tuned
        new.catalog_ = catalog if knn.provenance_ is not None else None
        # the rule the model was fitted with (a model of the release that introduced the branch keeps "gated")
        new.decision = Decision(model.config.threshold_sigma, model.decision.fusion, model.config.fusion_weight,
                                model.decision.pixel_sample)  # its maps sampled as its drift reference was
        # 3. re-calibrate on the stored grids (and, after a leave-one-out fit, the other images' fitted scores)
        raws, known, ids = rescore_calibration_set(new, calibration_set)
        check_rescored(model, calibration_set, [raw[KNN][0] for raw in raws])
        if reads_added(model, calibration_set) and len(added_grids) == len(order) and new.knn.provenance_ is not None:
            # the added images' own leave-one-out opinions join the stored grids' and the kept scores, as a fit of
            # every image would calibrate on them all (docs/decisions.md, "Feedback"); untiled photos learnt as they
            # came, that the bank took rows of. The next update keeps their scores, as it keeps the fit's
            joined = set(knn.provenance_[model.knn.bank_size:, 0].tolist())
            mine = added_opinions(new, [photos[i] for i in order],
                                  [views[i] is None and first_image + j in joined for j, i in enumerate(order)],
                                  added_grids, first_image, turned)
            mine = screened(mine, raws, known, model.config.threshold_sigma)
            ids = ids[:len(raws)] + [o.image for o in mine] + ids[len(raws):]
            raws = raws + [o.raw for o in mine]
        # after a leave-one-out fit the stored grids are training images, which the whole-image branch has learnt:
        # its threshold stays the one its unseen images gave (it is not retrained either)
        # A held-out model's branch, trained further on its stored grids as well (fine_tuned_branch), keeps its
        # threshold the same way: re-read from grids it has just learnt, it would sink under its good parts' scores
        kept = ({"autoencoder": model.decision.scorer_calibrations["autoencoder"]}
                if model.autoencoder_ is not None and (ids is not None or tuned is not None) else None)
        new.decision.calibrate(raws, known, kept=kept)
        if kept is None and new.autoencoder_ is not None and new.decision.fusion in GATED_RULES:
            # a branch not trained further (a model saved before the catalog) is calibrated again on the held-out
            # grids; the bound the images it learnt gave at the fit still holds
            training = (model.manifest_.autoencoder.model_extra or {}).get("training") or {}
            raise_to_learnt(new.decision.scorer_calibrations["autoencoder"], training.get("learnt_bound"))
        if ids is not None:  # the scores' images, in the new calibration's order, for the next update
            new.calibration_set_ = calibration_set.with_calibrated_ids(ids)
        # the photos as they came: scoring turns them itself, and a canvas's filled corners would be read again
        return Learnt(new, n_added, len(patches), radius, turned_counts, list(new.score_many(photos)))


# how far above the score the model keeps for an image its stored grid may score again: the bank only grew, so an
# honest grid scores no higher, but for its float16 rounding and an approximate index's misses
RESCORED_SLACK = 1.5


def check_rescored(model: AnomalyModel, calibration_set: CalibrationSet, rescored: list[float],
                   both_ways: bool = False) -> None:
    """Refuse an update whose stored grids score far above the scores ``model`` keeps for their images: such grids
    are not the images its threshold was set from, and the threshold they set would be theirs (grids of 6e4 in a
    model scoring near 20 set one of 5e5, which passed every defect; an infinite value one just above the floor).
    ``rescored``: each grid's kNN score against the updated bank, in the set's order. ``both_ways``: against the
    bank the kept scores were read from (``anomaly info --verify``), where a grid scores as its image did, so one
    far below it says the kept scores, and the threshold set from them, were raised (1e4 times, with the threshold
    recomputed from them, passed every part); not with ``orientation any``, whose kept score is an image's worse
    pose."""
    assert model.manifest_ is not None
    fusion = model.manifest_.fusion
    kept = (fusion.knn_calibration if fusion is not None else model.manifest_.calibration).holdout_scores
    ids = calibration_set.left_out_ids
    if ids is None:  # held-out grids: the calibration's scores, in the grids' order
        stored = list(kept[:len(rescored)])
    else:  # a leave-one-out fit's: each grid's training image's score
        at = {int(i): float(s) for i, s in zip(ids[1], kept)}
        stored = [at[int(i)] for i in ids[0]]
    below = both_ways and model.config.orientation != "any"
    for j, (now, then) in enumerate(zip(rescored, stored)):
        if below and not now * RESCORED_SLACK + 1e-6 >= then:
            raise ModelFormatError(
                f"{CALIBRATION_FILE}: grid_{j:04d} scores {now:.6g} against the bank, where the model's calibration "
                f"keeps {then:.6g} for its image: the scores its threshold was set from are not its images'")
        if not now <= RESCORED_SLACK * abs(then) + 1e-6:
            raise ModelFormatError(
                f"{CALIBRATION_FILE}: grid_{j:04d} scores {now:.6g} against the bank, where the model's calibration "
                f"keeps {then:.6g} for its image: the grids are not the images its threshold was set from, so this "
                "model cannot be updated; it scores as before. Re-fit it to enable updates")


def reads_added(model: AnomalyModel, calibration_set: CalibrationSet) -> bool:
    """Whether an update calibrates on the images it adds too: after a leave-one-out fit of a surface with
    ``orientation="any"`` (most good images run out of the frame). There the stored grids' turned copies lose their
    upper tail as the added images' copies fill in the turns around them; elsewhere the re-scored grids track a
    fresh fit, and the added images' scores, read against a sparser bank than the next update's and then kept,
    would only lift the threshold above it (docs/decisions.md, "Feedback")."""
    turned = model.manifest_.training.turned_copies if model.manifest_ is not None else None
    if calibration_set.left_out_ids is None or not turned:
        return False
    return 2 * int(turned.get("surface_images") or 0) > model.manifest_.training.n_images  # type: ignore[union-attr]


def added_opinions(model: AnomalyModel, photos: list[np.ndarray], taken: list[bool], grids: list[torch.Tensor],
                   first_image: int, turned: TurnedCopies | None) -> list[Opinion]:
    """The leave-one-out kNN opinions of an update's added ``photos`` (in the bank's order, numbered from
    ``first_image``; ``grids``: their embeddings) against ``model``'s bank without their own rows, each its worse
    pose with its ``turned`` copy's (orientation any), with their catalog numbers. Only those ``taken`` are read:
    a photo learnt turned back has no upright pose to read, and one whose every patch the bank already covered (a
    near-twin of an image it learnt, say) would be scored by its twin's rows, as no unseen part is.

    Without them an update calibrated on the fit's images alone: their scores fall as the bank grows, while
    parts it has not seen are judged by a bank no denser than the fit's radius allows, and the few images' upper
    tail, which set the threshold, was lost over many updates (docs/decisions.md, "Feedback")."""
    ids = [j for j, ok in enumerate(taken) if ok]
    if not ids:
        return []
    own = model.alignment_ is not None  # an aligned model scores a photo as it came by its own rows (knn_scorer.py)
    raws: dict[int, dict[str, RawScore]] = {}
    for group in model.embedder.groups_by_shape([tuple(photos[j].shape) for j in ids]):
        js = [ids[p] for p in group]
        emb = model.embedder.wrap_many([grids[j].to(model.device) for j in js], [photos[j].shape for j in js])
        if own:
            emb = dataclasses.replace(emb, turned=[False] * len(js))
        for j, (score, amap) in zip(js, model.knn.score_left_out(emb, [first_image + j for j in js], own=own)):
            raws[j] = {KNN: (score, calibration_sample(amap, model.decision.pixel_sample))}
    posed = [raws[j] for j in ids]
    if turned is not None and turned.with_checks:  # sources: places in ``ids``, as worst_pose reads them
        posed = worst_pose(posed, left_out_turned(model.knn, model.embedder, turned, ids,
                                                    numbers=[first_image + j for j in ids]))
    return [Opinion(first_image + j, raw) for j, raw in zip(ids, posed)]


def screened(mine: list[Opinion], others: list[dict[str, RawScore]], known: list[tuple[float, float]],
             sigma: float) -> list[Opinion]:
    """The added images' opinions the threshold may read: the fit leaves the outliers of its leave-one-out scores
    out of it (contamination.threshold_sample), and so does an update, among the scores it calibrates on
    (``others``' and the ``known`` kept ones; ``sigma``: the model's); the others' stay, as the fit kept them."""
    from .contamination import threshold_sample

    if not mine:
        return mine
    scores = [r[KNN][0] for r in others] + [s for s, _ in known] + [o.raw[KNN][0] for o in mine]
    start = len(scores) - len(mine)
    outliers, _ = threshold_sample(scores, [str(i) for i in range(len(scores))], sigma)
    out = {int(name) - start for name in outliers if int(name) >= start}
    return [o for j, o in enumerate(mine) if j not in out]


@dataclasses.dataclass(frozen=True)
class Opinion:
    """An added image's leave-one-out opinion in an update's calibration, and its catalog number."""

    image: int
    raw: dict[str, RawScore]


DEFECT_CHUNK = 8  # known defects the guard decodes and scores at once


def defects_passing(model: AnomalyModel, defects: Sequence[ImageInput], names: Sequence[str]
                    ) -> tuple[list[str], int]:
    """The names of the known defects ``model`` does not flag, read and scored :data:`DEFECT_CHUNK` at a time: the
    records hold every defect the operators reviewed (months of them on a line), and all decoded at once took more
    memory than the service has; and how many it scored. One read again in between that no longer decodes
    (retention removed it) is skipped with a log, and not counted: it guarded nothing."""
    scorer = copy.copy(model)
    scorer.progress = False  # one bar over every chunk, below
    passing: list[str] = []
    scored = 0
    with progress_bar(model.progress and len(defects) > 1, total=len(defects), desc="defects", unit="img") as bar:
        for s in range(0, len(defects), DEFECT_CHUNK):
            arrays, _, kept, _ = load_inputs(defects[s:s + DEFECT_CHUNK], names[s:s + DEFECT_CHUNK], model.limits,
                                             False, "defect")
            passing += [n for n, r in zip(kept, scorer.score_many(arrays)) if not r.is_anomaly]
            scored += len(kept)
            bar.update(len(defects[s:s + DEFECT_CHUNK]))
    return passing, scored


def fine_tuned_branch(model: AnomalyModel, added: list[torch.Tensor], calibration_set: CalibrationSet
                      ) -> ReconstructionScorer | None:
    """The whole-image branch trained further on the added images' grids, or None where an update leaves the second
    opinion as it is. Without this, the good parts an operator confirmed stayed flagged by the branch: the kNN
    learnt them and the branch, which sees the whole part's layout, did not. The stored calibration grids are
    replayed, so it keeps the layout it learnt, and its threshold stays the one the fit set (the caller keeps it):
    after a leave-one-out fit they are training images, after a held-out one the held-out images, which it would
    otherwise be calibrated on just after learning them. A held-out model's branch was left as it was, and the good
    parts an operator confirmed, update after update, stayed flagged. A feature autoencoder is never trained
    further (its fused score is calibrated on the held-out grids). ``calibration_set``: the model's, read."""
    ae = model.autoencoder_
    if ae is None or ae.config.kind != "global" or not added or model.knn.provenance_ is None:
        return None
    replay = [torch.from_numpy(grid.astype(np.float32)) for grid, _ in calibration_set.grids]
    return ae.fine_tuned(added, [g for g in replay if g.ndim == 3])


def offered_rows(view: TurnedView | None, grid: tuple[int, ...]) -> np.ndarray:
    """Which of an added image's rows (its feature ``grid``'s cells) the bank is offered: every one, but on a turned
    photo's canvas only those scoring searches, as the fit's turned copies' rows are chosen (orientation.row_cells)."""
    every = np.ones(int(np.prod(grid)), bool)
    if view is None or view.alignment is None:
        return every
    out = np.zeros_like(every)
    out[row_cells(view.alignment, view.real, (int(grid[0]), int(grid[1])), view.inner)] = True
    return out


def on_photo(model: AnomalyModel, sources: np.ndarray | None, image: int, view: TurnedView,
             canvas_grid: tuple[int, ...], photo_shape: tuple[int, ...]) -> tuple[int, int]:
    """The cells of the bank rows ``sources`` names for ``image`` (learnt from the photo of ``photo_shape`` turned
    back to the grain on the canvas of ``view``) moved, in place, from the canvas's grid to the photo's own: the
    evidence is a box in the photo as it came. Returns the photo's grid, which scoring it as it came gives
    (``sources`` None: that alone)."""
    photo_grid = model.embedder.preprocessing.grid(*photo_shape[:2])
    if sources is None:
        return photo_grid
    assert model.alignment_ is not None  # only an aligned model turns a photo back
    cells = photo_cells(model.alignment_, view.turn, (int(canvas_grid[0]), int(canvas_grid[1])), view.canvas.shape,
                        view.shape, photo_grid, view.inner)
    rows = sources[:, 0] == image
    sources[rows, 1:] = cells[sources[rows, 1], sources[rows, 2]]
    return photo_grid


def rescore_calibration_set(model: AnomalyModel, calibration_set: CalibrationSet | None = None
                            ) -> tuple[list[dict[str, RawScore]], list[tuple[float, float]], list[int] | None]:
    """Each scorer's raw opinion of every stored calibration grid, ``(score, typical distance)`` of the other
    images the calibration counted, and (leave-one-out) the training image of each score in that order.

    Held-out grids (calibration=holdout) are scored against the bank as they are. After a leave-one-out fit the
    grids are training images: each is scored against the bank without its own patches, and the other training
    images keep the scores the fit gave them. The bank only grew since, so those can only have gone down: the
    threshold stays on the safe side. ``calibration_set``: the model's, read (None: read here)."""
    assert model.manifest_ is not None
    stored = CalibrationSet.of(model) if calibration_set is None else calibration_set
    items = stored.grids
    ids = stored.left_out_ids if model.knn.provenance_ is not None else None
    embedded = [model.embedder.wrap(torch.from_numpy(grid.astype(np.float32)).to(model.device), shape)
                for grid, shape in items]
    # an aligned model's upright grids against its images' own rows, as the fit scored them (knn_scorer.py)
    aligned = model.alignment_ is not None
    if ids is None:
        timer = StageTimer()
        upright = [dataclasses.replace(e, turned=[False]) if aligned else e for e in embedded]
        return [{s.name: s.score(emb, timer)[0] for s in model.scorers} for emb in upright], [], None
    image_ids, calibrated_ids = ids
    reals = stored.real_masks  # aligned turned copies: read on their own pixels, as fitted
    # the turned copies, which the fit searched against every row; a set written before it said so marks them by
    # their own-pixel masks alone (a copy of a part on a plain background then reads as upright)
    turned = stored.turned
    if turned is None:
        turned = set(reals)
    shortlists = {own: model.knn.left_out_search(len(image_ids), own=own)  # exact while cheap, as in the fit
                  for own in {False, aligned}}
    raws = []
    for j, (emb, i) in enumerate(zip(embedded, image_ids)):
        own = aligned and j not in turned
        if aligned and j in reals:  # an aligned copy's pure fill takes its scores as the fit's did
            grid = tuple(emb.features.shape[1:3])
            emb = dataclasses.replace(emb, copied=[model.alignment_.fill_cells(reals[j], grid)])
        raw = model.knn.score_left_out(emb, [int(i)], shortlist=shortlists[own], own=own)[0]
        raws.append({KNN: own_pixels(raw, reals.get(j))})
    cal = model.manifest_.calibration
    rescored = {int(i) for i in image_ids}
    kept = [(int(i), s, d) for i, s, d in zip(calibrated_ids, cal.holdout_scores, cal.holdout_distances)
            if int(i) not in rescored]
    return raws, [(s, d) for _, s, d in kept], [int(i) for i in image_ids] + [i for i, _, _ in kept]


def updated_manifest(model: AnomalyModel, n_images: int, n_added: int, digests: list[str], skipped: list[str],
                     radius: float, forced: bool, seconds: float, turned_counts: dict[str, int] | None = None,
                     duplicates: list[dict[str, str]] | None = None, channels: str | None = None,
                     harder: bool = False, flattest: float | None = None, lowered: int | None = None) -> Manifest:
    """The manifest of ``model``, an update of the model whose manifest it holds; ``channels``: what the added good
    photos were (grey, colour or both), which the good photos' own now include; ``harder``: some were JPEGs
    compressed harder than the good ones (compression.learnt_harder); ``lowered``: the good photos' lowest JPEG
    quality now, where the added photos brought it down within the warning's margin (:func:`lowered_quality`);
    ``flattest``: the added photos' least blocks' spread, which lowers the good photos' own where the model keeps it
    (images.is_blank)."""
    assert model.manifest_ is not None
    old = model.manifest_
    out = old.to_dict()
    out["preprocessing"]["channels"] = joined_channels(old.preprocessing.channels, channels)
    if harder:
        out["preprocessing"].pop("jpeg_quality", None)
    elif lowered is not None:  # the added good photos' lowest quality, below the good ones' (lowered_quality)
        out["preprocessing"]["jpeg_quality"] = lowered
    if flattest is not None and old.preprocessing.flattest is not None:
        out["preprocessing"]["flattest"] = round(min(old.preprocessing.flattest, flattest), 2)
    out.pop("files", None)
    out[REVISION_KEY] = FORMAT_REVISION  # written by this release, whichever wrote the model it updates
    out["created_at"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    out["coreset"]["size"] = out["index"]["ntotal"] = model.knn.bank_size
    out["coreset"]["coverage_radius"] = radius
    out.update(model.decision.sections())
    if model.autoencoder_ is not None:
        out["autoencoder"]["calibration"] = model.decision.scorer_calibrations["autoencoder"].to_dict()
    training = out["training"]
    training["n_images"] += n_images
    training["n_skipped"] = training.get("n_skipped", 0) + len(skipped)
    training["images_sha256"] = hash_inputs([training["images_sha256"], *digests])
    if duplicates:  # the images it skipped as exact duplicates join the fit's
        training["duplicates"] = [*training.get("duplicates", []), *duplicates]
    turned = training.get("turned_copies")
    for key, n in (turned_counts or {}).items():  # over all the model's images, as n_images
        if turned and key in turned:  # (older fits kept no surface count)
            turned[key] += n
    if turned and model.knn.copies_ is not None:  # the bank's copy rows, as the fit counts them (knn_scorer.py)
        turned["bank_patches"] = int(model.knn.copies_.sum())
    updates = old.lineage.updates if old.lineage is not None else 0
    if out.get("evidence") is not None and model.catalog_ is not None:
        out["evidence"]["n_images"] = len(model.catalog_)
    out["lineage"] = {"made_by": "update", "parent": model.version_id_, "images_added": n_images,
                      "patches_added": n_added, "updates": updates + 1, "forced": forced,
                      "seconds": round(seconds, 2)}
    return Manifest.model_validate(out)

