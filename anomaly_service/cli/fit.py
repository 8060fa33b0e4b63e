"""``anomaly fit`` and ``anomaly evaluate``: fit on good photos (and measure on a labelled category)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import model_history
from ..errors import ConfigError, ImageLoadError
from ..whole_file import write_whole
from .describe import describe_layout, describe_part_groups, echo_fit_warnings
from .flags import audit_options, fit_options, keep_versions_option
from .group import app
from .shell import (fail, friendly, image_limits, model_write_lock, save_and_log, sigterm_stops,
                    temporary_directory_usable, warn_unservable_name, writable_dir)

if TYPE_CHECKING:  # model.py is imported only by the commands that build a model
    from ..model import AnomalyModel


def build_model(opts: dict[str, Any], quiet: bool) -> AnomalyModel:
    import dataclasses

    from ..model import AnomalyModel, ModelConfig

    # every option named like a ModelConfig field is a fit parameter; no second list to keep in sync
    params = {f.name: opts[f.name] for f in dataclasses.fields(ModelConfig) if f.name in opts}
    model = AnomalyModel(weights=opts["weights"], device=opts["device"], progress=not quiet,
                         knn_precision=opts["knn_precision"], runtime=opts["runtime"], limits=image_limits(), **params)
    unread = model.config.unread_second_opinion_option()
    if unread:  # typed on this command line and never read by the fit: refused before any work
        raise ConfigError(unread)
    return model


def fit_only_options_given(ctx: click.Context) -> list[str]:
    """The options on this command line that only a fit reads (every fit option, --save-model): evaluate --model
    scores a saved model as it is, so they would be silently ignored."""
    import dataclasses

    from ..config import ModelConfig

    fit_only = {f.name for f in dataclasses.fields(ModelConfig)} | {"save_model", "keep_versions"}
    return [max(p.opts, key=len) for p in ctx.command.params
            if p.name in fit_only and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]


def normal_images(normal_dir: Path, option: str = "--normal-dir", recursive: bool = False,
                  none_found: str = "contains no image files") -> list[Path]:
    """The image files of a folder of images; errors name the ``option`` it was given with (fit's --normal-dir,
    update's --add-good and --defects) and say ``none_found`` of a folder without any. ``recursive``: its
    subfolders too; without it a subfolder is skipped with the --recursive that reads it."""
    from ..images import list_images, skip_reason

    if not normal_dir.is_dir():
        from ..spellings import spelling_hint

        raise ImageLoadError(f"{option} {normal_dir} is not a directory{spelling_hint(normal_dir)}")
    images, skipped = list_images(normal_dir, recursive=recursive)
    for s in skipped:
        # "name it" is no way out for a command that reads one folder: say the flag that reads its subfolders
        # (a folder skipped when recursive could not be read: skip_reason says so)
        why = ("a folder (give --recursive to read the folders under it too)" if s.is_dir() and not recursive else
               skip_reason(s))
        click.echo(f"warning: skipping {s}: {why}", err=True)
    if not images:
        raise ImageLoadError(f"{option} {normal_dir} {none_found}")
    return images


@app.command()
@click.option("--normal-dir", required=True, type=click.Path(path_type=Path), help="Directory of normal images.")
@click.option("--recursive", is_flag=True,
              help="Read the images in the folders under --normal-dir too (e.g. one per day or camera); hidden "
                   "ones are passed over.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("models/default"), show_default=True,
              help="Model directory to write (replaced atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@keep_versions_option
@audit_options
@fit_options
@friendly
@sigterm_stops
def fit(normal_dir: Path, recursive: bool, out: Path, quiet: bool, keep_versions: int, by: str | None,
        note: str | None, **opts: Any) -> None:
    """Fit a model on a directory of normal (good) images."""
    from ..artifact import check_replaceable

    temporary_directory_usable()
    writable_dir(out, "--out")
    check_replaceable(out)  # before minutes of fitting, not after
    warn_unservable_name(out, "--out")
    model = build_model(opts, quiet)
    model.backbone  # noqa: B018 - resolve weights before reading any image, so that failure comes first
    images = normal_images(normal_dir, recursive=recursive)
    t0 = time.perf_counter()
    model.fit(images, relative_to=normal_dir)  # --part-id reads each path relative to --normal-dir
    m = model.manifest_
    assert m is not None

    def save() -> str:
        model.save(out, keep_versions=keep_versions)
        assert model.version_id_ is not None
        return model.version_id_

    with model_write_lock(out):  # after an update or rollback of this model that is under way, not inside it
        previous = model_history.current_version(out)
        save_and_log(out, previous, save, lambda version: model_history.record(
            out, "fit", version, previous, by=by or model_history.default_author(), note=note,
            images=m.training.n_images))
    path = out.resolve()
    how = ("threshold from leave-one-out scores" if m.training.calibration == "leave-one-out"
           else f"+{m.training.n_calibration_images} held out for the threshold")
    click.echo(f"fitted {m.training.n_images} images ({how}) in {time.perf_counter() - t0:.1f}s: bank "
               f"{m.coreset.size} of {m.coreset.from_patches} patches, {m.selection.n_selected} of "
               f"{m.selection.of} dims, threshold {m.calibration.threshold:.4g}")
    echo_fit_warnings(m)
    if m.training.n_skipped:
        click.echo(f"warning: {m.training.n_skipped} unreadable image(s) skipped", err=True)
    parts = describe_part_groups(m)
    if parts is not None:
        click.echo(parts)
    layout_line = describe_layout(m)
    if layout_line:
        click.echo(layout_line)
    from ..bit_depth import described

    for kind, depth in (("grey", m.preprocessing.bit_depth), ("colour", m.preprocessing.colour_bit_depth)):
        if depth is not None:  # every photo of that kind this model scores is read so (bit_depth.py)
            click.echo(f"16-bit {kind} images {described(depth)} (--bit-depth)")
    click.echo(f"saved to {path}")


@app.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Evaluate this model; without it, fit on DATA_DIR/train/good first.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write metrics here.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write histogram, ROC and worst-case overlays here.")
@click.option("--save-model", type=click.Path(path_type=Path), default=None, help="Also save the fitted model.")
@click.option("-q", "--quiet", is_flag=True)
@keep_versions_option
@fit_options
@friendly
@sigterm_stops
def evaluate(data_dir: Path, model_path: Path | None, json_path: Path | None, report_dir: Path | None,
             save_model: Path | None, quiet: bool, keep_versions: int, **opts: Any) -> None:
    """Evaluate on an MVTec-layout category: image/pixel AUROC, PRO, FPR and recall at the threshold.

    A test file that does not decode, or is no image, is skipped with a warning naming it and counted in the output
    (--json and --report list them); only a category where no test image decodes is an error."""
    from ..evaluate import check_masks, evaluate_model, list_category
    from ..model import AnomalyModel

    temporary_directory_usable()

    if model_path is not None:
        ignored = fit_only_options_given(click.get_current_context())
        if ignored:
            fail(f"{', '.join(ignored)} cannot be used with --model: evaluate scores the saved model as it was "
                 "fitted; these options apply only when it fits one (without --model)")
    if json_path:  # a directory that takes no writes is said before minutes of scoring, not after
        if json_path.is_dir():  # the file is written beside it and renamed over it: a directory is never replaced
            fail(f"--json {json_path} is a directory: give the file's path (e.g. {json_path / 'metrics.json'})")
        writable_dir(json_path.parent, "--json")
    if report_dir:
        writable_dir(report_dir, "--report")
    category = list_category(data_dir)
    train, samples = category.train, category.samples
    check_masks(samples, image_limits())  # before the fit and the scoring, not after them; under the photos' limits
    fit_seconds = None
    if model_path is not None:
        model = AnomalyModel.load(model_path, weights=opts["weights"], device=opts["device"],
                                  knn_precision=opts["knn_precision"], runtime=opts["runtime"], limits=image_limits())
    else:
        if save_model:
            from ..artifact import check_replaceable

            writable_dir(save_model, "--save-model")
            check_replaceable(save_model)  # before the fit, not after
            warn_unservable_name(save_model, "--save-model")
        model = build_model(opts, quiet)
        model.backbone  # noqa: B018
        if not train:
            raise ImageLoadError(f"{data_dir}/train/good has no images to fit on (or pass --model)")
        t0 = time.perf_counter()
        model.fit(train)
        fit_seconds = time.perf_counter() - t0
        echo_fit_warnings(model.manifest_)
        assert model.manifest_ is not None
        parts = describe_part_groups(model.manifest_)
        if parts is not None:  # on stderr, as the layout below: stdout holds the metrics
            click.echo(parts, err=True)
        if model.manifest_.training.n_skipped:  # as fit says it
            click.echo(f"warning: {model.manifest_.training.n_skipped} unreadable image(s) skipped", err=True)
        layout_line = describe_layout(model.manifest_)  # as every fit says it; on stderr, stdout holds the metrics
        if layout_line:
            click.echo(layout_line, err=True)
        if save_model:
            target, n_images = save_model, model.manifest_.training.n_images

            # the model it replaces is archived, as a fit's is: its version stays one to roll back to
            def save() -> str:
                model.save(target, keep_versions=keep_versions)
                assert model.version_id_ is not None
                return model.version_id_

            with model_write_lock(target):
                previous = model_history.current_version(target)
                save_and_log(target, previous, save, lambda version: model_history.record(
                    target, "fit", version, previous, by=model_history.default_author(),
                    note="anomaly evaluate --save-model", images=n_images))
            click.echo(f"saved to {Path(target).resolve()}", err=True)
    unwritten: list[str] = []  # outputs asked for that their volume did not take (a full disk)

    def report_failed(exc: OSError) -> None:
        unwritten.append(f"the report to {report_dir} ({exc.strerror or exc}; the files there are whole, "
                         "some are missing or from an earlier run)")

    metrics = evaluate_model(model, samples, report_dir, fit_seconds, train=train, not_images=category.not_images,
                             warn=lambda message: click.echo(f"warning: {message}", err=True),
                             on_report_error=report_failed, data_dir=data_dir)
    for key in ("image_auroc", "pixel_auroc", "pro", "threshold", "good_fpr", "defect_recall", "fit_seconds",
                "score_ms_per_image", "peak_rss_mb"):
        v = metrics[key]
        if v is None and key in ("pixel_auroc", "pro"):
            # masks there, every defect pixel of them outside the inspection mask: a reader must not look for them
            why = ("every ground-truth defect pixel lies outside the model's inspection mask"
                   if metrics.get("defect_pixels_outside_mask") else
                   f"every ground-truth mask under {data_dir / 'ground_truth'} has nothing drawn on it"
                   if metrics.get("defects_with_empty_mask") else
                   f"no ground-truth masks under {data_dir / 'ground_truth'}")
            click.echo(f"{key:20s} skipped: {why}")
        else:
            click.echo(f"{key:20s} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{key:20s} {v}")
    curve = ", ".join(f"{float(k):.0%} -> {'-' if v is None else f'{v:.3f}'}"
                      for k, v in metrics["recall_at_fpr"].items())
    click.echo(f"{'recall at good FPR':20s} {curve}")
    if metrics["n_skipped"]:  # the metrics above are over the rest: a reader of this output must know
        where = "".join(f"; {text}" for given, text in ((json_path, "listed in --json"),
                                                         (report_dir, "skipped_files.csv in --report")) if given)
        click.echo(f"{'skipped':20s} {metrics['n_skipped']} test file(s) not evaluated (each named in a warning "
                   f"above{where})")
    if json_path:
        # strict JSON: a metric that cannot be computed is null, never NaN; written beside and renamed once whole, so
        # a full disk leaves no short metrics.json for a script to read (nor costs an earlier one)
        text = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                           for k, v in metrics.items()}, indent=2, allow_nan=False)
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(json_path, text.encode("utf-8"))
        except OSError as exc:
            unwritten.insert(0, f"the metrics to {json_path} ({exc.strerror or exc}; "
                             + ("the file there is unchanged)" if json_path.exists() else "no file was left there)"))
    if unwritten:  # the metrics above stand; a run whose files are missing must not pass for one that wrote them
        fail("could not write " + " nor ".join(unwritten) + "; the metrics above stand", 1)
    if report_dir:
        click.echo(f"report written to {report_dir}")
