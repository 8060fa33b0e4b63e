"""``anomaly update``, ``versions`` and ``rollback``: a fitted model learns from reviewed false alarms, and any
earlier version can be served again."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .. import model_history
from ..errors import ConfigError
from .describe import describe_surface
from .fit import normal_images
from .flags import (audit_options, keep_versions_option, model_dir_option, runtime_options, store_options,
                    update_contamination_option)
from .group import app
from .records import open_store
from .shell import (fail, friendly, image_limits, model_write_lock, save_and_log, sigterm_stops,
                    temporary_directory_usable)


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--add-good", "good_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of good images to add (e.g. false alarms reviewed as good).")
@click.option("--recursive", is_flag=True,
              help="Read the images in the folders under --add-good too (e.g. one per day); hidden ones are passed "
                   "over.")
@click.option("--defects", "defects_dir", type=click.Path(path_type=Path), default=None,
              help="Directory of images reviewed as defects (its subfolders too, e.g. one per defect type): the "
                   "update is refused if any would pass.")
@click.option("--force", is_flag=True, help="Update even if known defects would score below the new threshold.")
@update_contamination_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@keep_versions_option
@audit_options
@store_options(required=False, when_given="its photos reviewed as defects guard the update")
@runtime_options
@friendly
@sigterm_stops
def update(model_path: Path, good_dir: Path, recursive: bool, defects_dir: Path | None, force: bool, contamination: str,
           quiet: bool, keep_versions: int, by: str | None, note: str | None, weights: Path | None, device: str,
           knn_precision: str, runtime: str, data_dir: Path | None, database_url: str | None) -> None:
    """Add good images to a fitted model and re-calibrate it; the previous version is kept (see rollback).

    Known defects guard the update: images under --defects, and with --data-dir or --database-url every recorded
    photo of this model (by its directory name) whose latest review says defect. Added images the updated model
    still flags are kept, left out or refuse the update as --contamination says."""
    from ..errors import UpdateRefusedError
    from ..model import AnomalyModel

    temporary_directory_usable()

    good = normal_images(good_dir, "--add-good", recursive=recursive)
    defects: list[Path] = []
    if defects_dir is not None:
        # its subfolders searched: reviewed defects are kept sorted by type (scratch/, dent/), and each guards the
        # update. Read flat, such a folder guarded nothing and the update said nothing; one that holds no image is
        # an error, as a guard that checks nothing is
        defects = normal_images(defects_dir, "--defects", recursive=True, none_found="holds no image files (its "
                                "subfolders searched too): no known defect would guard the update")
    unguarded = 0  # the model's inspections reviewed as defects whose photo is not stored: they guard nothing
    photos = "--data-dir"  # where the photos' directory came from, for the messages
    if data_dir is None and database_url is not None and os.environ.get("ANOMALY_DATA_DIR"):
        # the service's photos, where its database's rows point: a pod sets both variables, and an update run
        # there (kubectl exec) would otherwise be refused for want of a flag its environment already answers
        data_dir, photos = Path(os.environ["ANOMALY_DATA_DIR"]), "ANOMALY_DATA_DIR"
        if not data_dir.is_dir():  # a variable left from elsewhere: no defect would be checked, as with the URL alone
            raise ConfigError(f"ANOMALY_DATA_DIR {data_dir} is no directory here, so the photos reviewed as defects "
                              "that guard the update cannot be read: give the service's --data-dir")
    if data_dir is not None or database_url is not None:
        if data_dir is None:  # the rows are in the database, the photos under the service's --data-dir
            raise ConfigError("the photos reviewed as defects that guard the update are stored under the service's "
                              "--data-dir, not in the database: give --data-dir (or ANOMALY_DATA_DIR) too (without "
                              "it no recorded defect would be checked)")
        store = open_store(data_dir, database_url, "read")
        try:
            name = Path(model_path).resolve().name
            pairs, unguarded = store.reviewed_photos(name, "defect")
            defects += [path for _, path in pairs]
        finally:
            store.close()
    if unguarded:
        click.echo(f"warning: {unguarded} inspection(s) reviewed as defects have no stored photo under {photos} "
                   f"{data_dir} (not kept by --keep-images, removed by retention, or this is not the service's "
                   "--data-dir) and cannot guard this update", err=True)
    with model_write_lock(model_path):
        # loaded under the lock: the update applies to the version that is current now
        model = AnomalyModel.load(model_path, weights=weights, device=device, knn_precision=knn_precision,
                                  runtime=runtime, progress=not quiet, limits=image_limits())
        t0 = time.perf_counter()
        try:
            new = model.update(good, defects, force=force, contamination=contamination)
        except UpdateRefusedError as exc:  # its message names the images; exit 3 tells a refusal from bad input
            click.echo(f"error: {exc}", err=True)
            sys.exit(3)

        def save() -> str:
            new.save(model_path, keep_versions=keep_versions)
            assert new.version_id_ is not None
            return new.version_id_

        def log_change(version: str) -> None:
            new.version_id_ = version  # the version in place, also where an interrupt came before save() returned
            model_history.record_update(model_path, new, model.version_id_, [str(p) for p in good], forced=force,
                                        by=by or model_history.default_author(), note=note)

        save_and_log(model_path, model.version_id_, save, log_change)
    m, old = new.manifest_, model.manifest_
    assert m is not None and m.lineage is not None and old is not None
    click.echo(f"updated with {m.lineage.images_added} images in {time.perf_counter() - t0:.1f}s: "
               f"{m.lineage.patches_added} patches added (bank {old.coreset.size} -> {m.coreset.size}), "
               f"threshold {old.calibration.threshold:.4g} -> {m.calibration.threshold:.4g}")
    if new.unlike_:
        click.echo(f"warning: {len(new.unlike_)} good image(s) not added, unlike the photos the model was fitted on "
                   "(re-fit on photos from the new camera to learn them):\n"
                   + "\n".join(f"  {name}: {why}" for name, why in new.unlike_), err=True)
    if new.duplicates_:
        # a repeat of another image of this update is one the model had not: "already has them" sent the user
        # looking for it among the model's images
        known = sum(r.known for r in new.duplicates_)
        whose = ("the model already has them" if known == len(new.duplicates_) else
                 "each repeats another image of this update" if not known else
                 "the model already has them or they repeat another image of this update")
        # one line each, as the fit lists those it leaves out: in one line, a folder of one photo copied hundreds of
        # times made a warning of kilobytes no terminal or log viewer shows whole
        click.echo(f"warning: {len(new.duplicates_)} exact duplicate image(s) skipped, {whose}:\n"
                   + "\n".join(f"  {r}" for r in new.duplicates_), err=True)
    for name in new.defects_passing_:
        click.echo(f"warning: forced: known defect now below the threshold: {name}", err=True)
    if new.left_out_:
        click.echo(f"warning: {len(new.left_out_)} added good image(s) still flagged by the updated model were left "
                   f"out (--contamination drop): {', '.join(new.left_out_)}", err=True)
    if new.still_flagged_:
        click.echo(f"warning: {len(new.still_flagged_)} of the added good image(s) are still flagged by the updated "
                   "model (added anyway; --contamination drop leaves them out, fail refuses the update): "
                   f"{', '.join(new.still_flagged_)}", err=True)
    for line in new.update_warnings_:
        click.echo(f"warning: {line}", err=True)
    surface = describe_surface(m)
    if surface is not None and describe_surface(old) is None:  # this update's images made the model a surface's
        click.echo(f"warning: {surface}", err=True)
    click.echo(f"version {new.version_id_} saved to {Path(model_path).resolve()} (previous: {model.version_id_})")


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@click.option("--history", is_flag=True, help="The model's change log instead: every fit, update and rollback, "
              "newest first, with who made it and why.")
@friendly
def versions(model_path: Path, as_json: bool, history: bool) -> None:
    """List a model's current version and its archived ones, the most recently archived first."""
    from ..artifact import list_versions

    if history:
        changes = model_history.read(model_path)
        if as_json:
            click.echo(json.dumps(changes, indent=2))
        elif not changes:
            click.echo(f"no changes recorded for {Path(model_path).resolve()} (its log: "
                       f"{model_history.history_path(model_path)})")
        for c in changes if not as_json else []:
            what = {"fit": f"fit on {c.get('images', '?')} images",
                    "update": f"update +{c.get('images_added', '?')} images" + (", forced" if c.get("forced") else ""),
                    "rollback": "rollback"}[c["action"]]
            click.echo(f"{c['at']}  {c['version']}  {what:30s} by {c.get('by') or '?'} ({c.get('via', '?')})"
                       f"{'  from ' + c['previous'] if c.get('previous') else ''}"
                       f"{chr(10) + '    note: ' + c['note'] if c.get('note') else ''}")
        return
    listed = list_versions(model_path)
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    for v in listed:
        if "error" in v:
            click.echo(f"  {v['id']}  unreadable: {v['error']}")
            continue
        what = (f"update +{v['images_added']} images, +{v['patches_added']} patches" if v["made_by"] == "update"
                else f"fit on {v['images_added']} images")
        click.echo(f"{'*' if v['current'] else ' '} {v['id']}  {v['created_at']}  {what:38s} "
                   f"threshold {v['threshold']:.4g}  bank {v['bank_size']}")


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--to", "version", required=True, help="Archived version id (see `anomaly versions`).")
@keep_versions_option
@audit_options
@friendly
@sigterm_stops
def rollback(model_path: Path, version: str, keep_versions: int, by: str | None, note: str | None) -> None:
    """Make an archived version of a model current again (the replaced one is archived)."""
    from ..artifact import model_version_id
    from ..artifact import rollback as rollback_artifact

    try:
        seen = model_history.current_version(model_path)
        with model_write_lock(model_path):
            previous = model_history.current_version(model_path)
            if previous != seen and previous != version:  # a change landed while this waited: it is rolled back too
                click.echo(f"note: {Path(model_path).resolve().name} changed while this waited, from {seen} to "
                           f"{previous} (anomaly versions --history says by whom); rolling back to {version} "
                           f"archives {previous} too", err=True)

            def save() -> str:
                rollback_artifact(model_path, version, keep_versions)
                return model_version_id(model_path)

            save_and_log(model_path, previous, save, lambda current: model_history.record(
                model_path, "rollback", current, previous, by=by or model_history.default_author(), note=note))
    except LookupError as exc:
        fail(str(exc))
    click.echo(f"{Path(model_path).resolve()} is now version {model_version_id(model_path)}")


@app.group()
def models() -> None:
    """The model directory as a whole."""


@models.command("backup")
@model_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The backup directory: new, empty or an earlier backup (replaced); written beside it and "
              "renamed into place once whole")
@friendly
def models_backup(model_dir: Path, out: Path) -> None:
    """Copy every model, its archived versions and change log while the service runs: each model is copied under
    the lock its updates and rollbacks take, so no copy mixes two versions, and is verified. Exit code 1 when a
    version did not verify (the same in the model directory: the copy is not at fault)."""
    from ..model_backup import ModelBackupError, backup_models

    try:
        done = backup_models(model_dir, out, waiting=lambda name: click.echo(
            f"waiting: {name} is being changed (an update, a rollback or a fit holds its write lock); its copy goes "
            "on once that ends", err=True))
    except ModelBackupError as exc:
        raise ConfigError(str(exc)) from None
    problems = [p for m in done.models for p in m.problems]
    for m in done.models:
        current = (f"version {m.version}" if m.version else
                   "a current version this release does not read (copied as it is)" if m.has_current else
                   "no current version")
        aside = f", {m.set_aside} set aside by a save that died (put back when served)" if m.set_aside else ""
        click.echo(f"{m.name}: {current}, {m.archived} archived{aside}")
    for problem in problems:
        click.echo(f"warning: does not verify in {model_dir} either: {problem}", err=True)
    click.echo(f"{done.path}: {len(done.models)} model(s) in {done.seconds:.1f} s")
    if done.kept is not None:
        click.echo(f"warning: {done.kept} is kept as it was, not replaced: its copy of what does not verify now "
                   f"does; this backup is {done.path} (the next backup that verifies replaces {done.kept} and removes "
                   "it)", err=True)
    if problems:
        sys.exit(1)
