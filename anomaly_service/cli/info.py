"""``anomaly info``: a model's manifest, readably."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .describe import describe_duplicates, describe_layout, describe_part_groups, describe_surface, describe_suspects
from .group import app
from ..options import MODEL_OPTIONS
from .shell import friendly


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--verify", is_flag=True,
              help="Also load the model as the service does (index, arrays, network, backbone weights) and check "
              "the set an update re-calibrates on: a model copied in from elsewhere is refused here, before it "
              "is served.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local backbone weights file for --verify (air-gapped machines).")
@friendly
def info(model_path: Path, as_json: bool, verify: bool, weights: Path | None) -> None:
    """Print a model's manifest readably (validates the artifact; --verify loads it as the service would)."""
    from ..artifact import read_artifact

    m, _ = read_artifact(model_path)  # every file verified against its checksum, as a load would
    verified = _verified(model_path, weights) if verify else None
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2))
        return
    cal, pp = m.calibration, m.preprocessing
    scale = f" for a {pp.reference_side:g} px image" if pp.reference_side else ""
    tile = (pp.model_extra or {}).get("tile")  # tiled scoring (tiling.py); absent when off
    lines = [
        f"model            {Path(model_path).resolve()}",
        f"format           {m.format} v{m.format_version} (revision {m.format_revision}), created {m.created_at}",
        f"backbone         {m.backbone.name} {'+'.join(m.backbone.layers)}, weights "
        f"{m.backbone.weights_source} (sha256 {m.backbone.weights_sha256[:12]})",
        f"input            {m.fit_config().resize} resize to {pp.image_size} px{scale}, aspect kept, no crop"
        if tile is None else f"input            tiles of {tile['size']} px seen at {pp.image_size} px (zoom "
        f"{tile['zoom']:.3g}), overlapping {tile['overlap']:.0%}, stitched into one map",
        f"features         {m.features.dim} dims -> {m.selection.mode} selection keeps {m.selection.n_selected}",
        f"memory bank      {m.coreset.size} patches (coreset {m.coreset.ratio} of {m.coreset.from_patches}), "
        f"index {m.index.kind}",
        f"scoring          k={m.scoring.k}, image score {m.scoring.image_score}, sigma {m.scoring.sigma}",
        f"threshold        {cal.threshold:.5g} ({cal.method}, {cal.n_images} images); floor {cal.floor:.5g}",
        f"training         {m.training.n_images} images (+{m.training.n_calibration_images} held out), "
        f"{m.training.fit_seconds}s on {m.training.device}, images sha256 {m.training.images_sha256[:12]}",
        "files            " + ", ".join(f"{k} ({v.bytes / 1e6:.2f} MB)" for k, v in m.files.items()),
        "versions         " + ", ".join(f"{k} {v}" for k, v in m.library_versions.items()),
    ]
    if m.lineage is not None and m.lineage.made_by == "update":
        lines.insert(8, f"lineage          update {m.lineage.updates} of {m.lineage.parent or 'a fit'}: "
                        f"+{m.lineage.images_added} images, +{m.lineage.patches_added} patches"
                        + (" (forced past known defects)" if m.lineage.forced else ""))
    if m.autoencoder is not None and m.fusion is not None:
        kind = "whole-image branch" if (m.autoencoder.config or {}).get("kind") == "global" else "feature autoencoder"
        own = m.autoencoder.calibration
        bound = ((m.autoencoder.model_extra or {}).get("training") or {}).get("learnt_bound") or {}
        # an update trains the branch further on the grids it replays, some of which set that threshold: the
        # threshold stays the fit's, and so does what it was read from
        updated = m.lineage is not None and m.lineage.made_by == "update"
        # a held-out fit with no held-out image (--calibration-fraction 0, or every one a copy) read it from the
        # images the bank learnt, which the branch learnt too, but for its own few
        learnt = m.training.calibration == "holdout" and not m.training.n_calibration_images
        # an update of a held-out fit by an earlier release set it again from the held-out grids (its branch not
        # trained further then), and the manifest does not say which release made an update: when is not known
        unknown = m.training.calibration == "holdout"
        unseen = (f"set by {own.n_images} of its training images" if learnt else
                  f"set by {own.n_images} images it had not learnt then, at the fit or by an earlier release's "
                  f"update" if updated and unknown else
                  f"set at the fit by {own.n_images} images it had not learnt then" if updated else
                  f"set by {own.n_images} images it did not learn")
        how = (f"kNN weight {m.fusion.weight}" if m.fusion.rule in MODEL_OPTIONS["fusion"].choices else
               f"adds what it sees beyond its own threshold {own.threshold:.4g}, {unseen}"
               + (f", raised to what the {bound['n_images']} it learnt give" if bound.get("raised") else ""))
        lines.insert(8, f"second opinion   {kind}, fused by {m.fusion.rule} ({how})")
    layout_line = describe_layout(m)
    if layout_line:
        lines.insert(8, f"layout           {layout_line.removeprefix('layout ')}")
    turned = m.training.turned_copies
    if turned:  # orientation any (orientation.py)
        # the fit's count: an update adds images, not poses (models before n_posed_images: their fit's n_images)
        updated = m.lineage is not None and m.lineage.made_by == "update"
        of = turned.get("n_posed_images", None if updated else m.training.n_images)
        posed = (f", threshold from the turned pose for {turned['n_turned_poses']} of "
                 + (f"{of} images" if of is not None else "the fitted images") if "n_turned_poses" in turned else "")
        surfaces = turned.get("surface_images", 0)  # absent from models fitted before it was kept
        surface = (f"; {surfaces} of {m.training.n_images} images run out of the frame: a surface, whose copies "
                   "can set the threshold" if describe_surface(m) else "")
        up = turned.get("upright_threshold")  # the fit's: an update re-calibrates, and this stays the fit's
        if up and not updated:
            posed += f" ({m.calibration.threshold / up - 1:+.0%} on the upright photos' own {up:.4g})"
        aligned = turned.get("alignment") or {}  # a grain the fit reads (grain.py); absent in older models
        grain = (f"; each photo turned to the good images' grain (turns read back within "
                 f"{aligned['read_error_p90']:.1f} degrees)" if aligned.get("kept") else "")
        if aligned.get("kept") and "bank_patches" in turned:  # models saved before: every photo, every row
            grain += (f", one left as it came judged by the {m.coreset.size - turned['bank_patches']} of the bank's "
                      f"{m.coreset.size} patches that are the images' own")
        lines.insert(8, f"orientation      any: {turned['per_image']} turned copies an image, bank up to "
                        f"{turned['bank_factor']:g}x{posed}{grain}{surface}")
    at = next(i for i, line in enumerate(lines) if line.startswith("training")) + 1
    parts = describe_part_groups(m, updated=m.lineage is not None and m.lineage.made_by == "update")
    if parts is not None:  # right after the training line (part_groups.py)
        lines.insert(at, f"part groups      {parts}")
        at += 1
    for label, block in (("suspects", describe_suspects(m)), ("duplicates", describe_duplicates(m))):
        if block:  # right after the training line: the duplicates, then the suspects
            lines[at:at] = [f"{label:<17}{block[0]}", *(" " * 15 + line for line in block[1:])]
    if m.mask is not None:
        extra = m.mask.model_extra or {}
        what = f"{m.mask.source} {extra['from']}" if extra.get("from") else m.mask.source
        if m.mask.source == "auto":
            what += " (foreground of the good images)" if extra.get("found") else " (no background found)"
        lines.insert(7, f"mask             {what}, inspects {m.mask.inspected:.0%} of {m.mask.width}x"
                        f"{m.mask.height} px; outside never counts")
    from ..bit_depth import described

    if pp.jpeg_quality is not None:  # right after the input line (compression.py); absent in older models
        from ..compression import build_named, fitted_as_read, fitted_described

        fitted_by = m.library_versions.get("anomaly_service")
        fitted = fitted_as_read(pp.jpeg_quality, fitted_by)
        assert fitted is not None
        # a build that does not say its number may be of either side of the fix: the higher reading, not a misreading
        why = ("as the release that fitted it misread" if build_named(fitted_by) else
               f"and the build that fitted it ({fitted_by}) does not say whether it was one of the releases that "
               "misread")
        lines.insert(4, f"JPEG quality     {fitted_described(fitted)}" + (
            "" if fitted == pp.jpeg_quality else f" (the manifest says {pp.jpeg_quality}, {why} its photos' lowest and "
            "highest JPEG qualities)"))
    depths = {kind: depth for kind, depth in (("grey", pp.bit_depth), ("colour", pp.colour_bit_depth))
              if depth is not None}
    if depths:  # right after the input line (bit_depth.py)
        lines.insert(4, "16-bit images    " + "; ".join(f"{kind} {described(d)}" for kind, d in depths.items()))
    if verified:
        lines.append(f"verified         {verified}")
    click.echo("\n".join(lines))


def _verified(model_path: Path, weights: Path | None) -> str:
    """Load the model with every check a load makes (the service's, ``score``'s) and those an update makes of its
    calibration set, on the CPU; what was checked, or the one-line refusal (ModelFormatError) of the first fault."""
    from ..calibration_set import CalibrationSet
    from ..decision import KNN
    from ..feedback import check_rescored, rescore_calibration_set
    from ..model import AnomalyModel

    model = AnomalyModel.load(model_path, weights=weights, device="cpu")
    said = "loads as the service loads it (index, arrays, network, weights, calibration)"
    if not model.updatable:
        return said + "; it keeps no calibration set (not updatable)"
    stored = CalibrationSet.of(model)
    raws = rescore_calibration_set(model, stored)[0]
    check_rescored(model, stored, [raw[KNN][0] for raw in raws], both_ways=True)
    return said + f"; its {len(raws)} calibration grids score as the scores it keeps"
