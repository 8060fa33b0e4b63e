"""``anomaly`` command line: fit, score, evaluate, info. A thin shell over :class:`AnomalyModel`."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from .errors import AnomalyError, ConfigError, ImageLoadError

log = logging.getLogger("anomaly")


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _friendly(fn: Callable) -> Callable:
    """Turn expected failures into one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AnomalyError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


def _sigterm_stops(fn: Callable) -> Callable:
    """For commands that write a model: SIGTERM (a container stop, ``kill``) stops them as Ctrl-C does, so a save
    under way removes its half-written copy instead of leaving it beside the model (rescore.sigterm_as_interrupt).
    Inside :func:`_friendly`, which says "interrupted"."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .rescore import sigterm_as_interrupt

        with sigterm_as_interrupt():
            return fn(*args, **kwargs)

    return wrapper


def _table_option(name: str, option: Any, default: Any, **extra: Any) -> Callable:
    """A click option built from the options table (options.py): the one list of allowed values."""
    flag = "--" + name.replace("_", "-")
    if option.boolean:
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=default, show_default=True,
                            help=option.help, **extra)
    if option.choices is not None and option.pattern is None:
        kind: Any = click.Choice(list(option.choices))
    else:
        kind = int if option.integer else (float if option.choices is None else str)
    # ranges are checked by the same table when the model or settings are built: one message for every surface
    return click.option(flag, name, type=kind, default=default, show_default=default is not None,
                        help=option.help, **extra)


def _runtime_options(fn: Callable) -> Callable:
    """How a model runs on this machine (not saved with it): device, kNN precision, backbone runtime."""
    from .options import RUNTIME_OPTIONS

    for name in reversed(RUNTIME_OPTIONS):
        fn = _table_option(name, RUNTIME_OPTIONS[name], "auto")(fn)
    return click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Local backbone weights file (air-gapped machines); otherwise download + cache.")(fn)


def _fit_options(fn: Callable) -> Callable:
    """Every fit option of the options table, shared by ``fit`` and ``evaluate``; defaults from ModelConfig."""
    import dataclasses

    from .config import ModelConfig
    from .options import MODEL_OPTIONS

    defaults = ModelConfig()
    # a bare --autoencoder means the feature autoencoder
    extra = {"autoencoder": {"is_flag": False, "flag_value": "features"}, "mask": {"metavar": "FILE|auto"}}
    for f in reversed(dataclasses.fields(ModelConfig)):
        fn = _table_option(f.name, MODEL_OPTIONS[f.name], getattr(defaults, f.name), **extra.get(f.name, {}))(fn)
    return _runtime_options(fn)


def _build_model(opts: dict[str, Any], quiet: bool):
    import dataclasses

    from .model import AnomalyModel, ModelConfig

    # every option named like a ModelConfig field is a fit parameter; no second list to keep in sync
    params = {f.name: opts[f.name] for f in dataclasses.fields(ModelConfig) if f.name in opts}
    return AnomalyModel(weights=opts["weights"], device=opts["device"], progress=not quiet,
                        knn_precision=opts["knn_precision"], runtime=opts["runtime"], **params)


def _writable_dir(path: Path, what: str) -> None:
    """Fail before any work when an output directory cannot be one: a file is in the way, or the nearest existing
    directory takes no new entry (permissions, a read-only or special file system). Probed by making one, since
    permission bits say nothing to root; a fit must not run for minutes and then fail to save."""
    import tempfile

    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what} {path}: {p} is a file, not a directory")
            try:
                tempfile.TemporaryDirectory(dir=p, prefix=".anomaly-probe-").cleanup()
            except OSError as exc:
                raise ConfigError(f"{what} {path}: cannot write in {p} ({exc.strerror or exc})") from None
            break


def _keep_versions_option(fn: Callable) -> Callable:
    from .artifact import DEFAULT_KEEP_VERSIONS

    return click.option("--keep-versions", type=click.IntRange(min=0), default=DEFAULT_KEEP_VERSIONS,
                        show_default=True, help="Earlier versions kept under <dir>/.versions/<name>/ when this "
                        "replaces a model (0: none).")(fn)


def _store_options(required: bool, keep: bool = False) -> Callable:
    """Where records are: --data-dir (SQLite + files) and/or --database-url, as the service's settings."""

    def wrap(fn: Callable) -> Callable:
        from .options import SERVICE_OPTIONS

        option = SERVICE_OPTIONS["keep_images"]
        if keep:
            fn = click.option("--keep-images", type=click.Choice(list(option.choices or ())), default="anomalies",
                              show_default=True, help=option.help)(fn)
        fn = click.option("--database-url", envvar="ANOMALY_DATABASE_URL", default=None,
                          help="Records database (postgresql+psycopg://...); default SQLite under --data-dir. "
                               "[env ANOMALY_DATABASE_URL]")(fn)
        return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                            envvar="ANOMALY_DATA_DIR" if required else None, default=Path("data") if required else None,
                            show_default=required, help="Records' directory: SQLite file and stored pictures"
                            + (" [env ANOMALY_DATA_DIR]" if required else "; recording is on when given"))(fn)

    return wrap


def _normal_images(normal_dir: Path) -> list[Path]:
    from .images import list_images, skip_reason

    if not normal_dir.is_dir():
        raise ImageLoadError(f"--normal-dir {normal_dir} is not a directory")
    images, skipped = list_images(normal_dir)
    for s in skipped:
        click.echo(f"warning: skipping {s}: {skip_reason(s)}", err=True)
    if not images:
        raise ImageLoadError(f"--normal-dir {normal_dir} contains no image files")
    return images


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anomaly-service")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def app(verbose: bool) -> None:
    """Industrial visual anomaly detection: fit on good parts, score new photos, get heatmaps."""
    from .progress import RESTATED_BY_CLI

    before = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in set(logging.getLogger().handlers) - before:  # ours only: what a command restates is said once
        handler.addFilter(lambda record: not getattr(record, RESTATED_BY_CLI, False))
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from .parallelism import fit_threads_to_cpu_quota

    fit_threads_to_cpu_quota()  # containers: as many threads as the CPU quota, not the host's cores


@app.command()
@click.option("--normal-dir", required=True, type=click.Path(path_type=Path), help="Directory of normal images.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("models/default"), show_default=True,
              help="Model directory to write (replaced atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_keep_versions_option
@_fit_options
@_friendly
@_sigterm_stops
def fit(normal_dir: Path, out: Path, quiet: bool, keep_versions: int, **opts: Any) -> None:
    """Fit a model on a directory of normal (good) images."""
    from .artifact import check_replaceable

    _writable_dir(out, "--out")
    check_replaceable(out)  # before minutes of fitting, not after
    model = _build_model(opts, quiet)
    model.backbone  # noqa: B018 - resolve weights before reading any image, so that failure comes first
    images = _normal_images(normal_dir)
    t0 = time.perf_counter()
    model.fit(images)
    with _model_write_lock(out):  # after an update or rollback of this model that is under way, not inside it
        path = model.save(out, keep_versions=keep_versions)
    m = model.manifest_
    assert m is not None
    how = ("threshold from leave-one-out scores" if m.training.calibration == "leave-one-out"
           else f"+{m.training.n_calibration_images} held out for the threshold")
    click.echo(f"fitted {m.training.n_images} images ({how}) in {time.perf_counter() - t0:.1f}s: bank "
               f"{m.coreset.size} of {m.coreset.from_patches} patches, {m.selection.n_selected} of "
               f"{m.selection.of} dims, threshold {m.calibration.threshold:.4g}")
    _echo_fit_warnings(m)
    if m.training.n_skipped:
        click.echo(f"warning: {m.training.n_skipped} unreadable image(s) skipped", err=True)
    layout_line = _layout_line(m)
    if layout_line:
        click.echo(layout_line)
    click.echo(f"saved to {path}")


def _suspect_lines(m: Any) -> list[str]:
    """The contamination guard's listing (contamination.py): a heading, then one line per training image it flagged,
    with its score, the threshold the other images set and how far above the median it lies. Empty: none."""
    suspects = m.training.suspects
    if not suspects:
        return []
    done = ("left out of the model" if m.training.suspects_action == "drop"
            else "kept in the model; --contamination drop re-fits without them")
    return [f"{len(suspects)} training image(s) look unlike the other good ones and may be defective ({done}):",
            *(f"  {s.name}  score {s.score:.4g} (threshold set by the others "
              f"{'-' if s.threshold is None else f'{s.threshold:.4g}'}, {s.ratio:.2f}x the median)" for s in suspects)]


def _echo_fit_warnings(m: Any) -> None:
    """After a fit (fit, evaluate), on stderr: the suspects, and the surface warning of an orientation=any fit. The
    fit's own log records of both are left out (progress.RESTATED_BY_CLI)."""
    lines = _suspect_lines(m)
    if lines:
        click.echo("warning: " + "\n".join(lines), err=True)
    surface = _surface_warning(m, rise=True)
    if surface is not None:
        click.echo(f"warning: {surface}", err=True)


def _surface_warning(m: Any, rise: bool = False) -> str | None:
    """orientation.surface_warning for a model's manifest (None unless orientation any on a surface). ``rise``:
    with how far the turned pose moved the threshold, which only a fit's own manifest can say (an update
    re-calibrates, while ``upright_threshold`` stays the fit's)."""
    from .orientation import surface_warning

    turned = m.training.turned_copies or {}
    return surface_warning(turned.get("surface_images", 0), m.training.n_images,
                           m.calibration.threshold if rise else None, turned.get("upright_threshold"))


def _layout_line(m: Any) -> str | None:
    """What the layout strength (layout.py) says about the whole-image branch, for this model's user."""
    from .layout import LAYOUT_STRENGTH

    strength, second = m.training.layout_strength, m.training.second_opinion
    if strength is None:
        return None
    if second is not None:
        why_not = {"tile": "not trained: the kNN decides alone (--tile has no one layout)",
                   "orientation any": "not trained: the kNN decides alone (--orientation any has no one layout)",
                   "calibration": "not fused: the kNN decides alone (too few good images it did not learn to set "
                                  "its threshold)"}.get(second.get("why_not"))
        verdict = "fused" if second.get("fused") else why_not or "not trained: the kNN decides alone"
        return f"layout {strength:.2f} (position's share of the good images' pixel variance): whole-image branch " \
               f"{verdict}"
    # models fitted without a second opinion: suggested only where it combines (not with turned copies or tiles)
    if strength >= LAYOUT_STRENGTH and m.config.get("orientation", "fixed") == "fixed" and m.config.get("tile") is None:
        return f"layout {strength:.2f}: the part lies one way, so --autoencoder global can also catch missing, " \
               "extra or moved components (docs/decisions.md)"
    return f"layout {strength:.2f}: no fixed layout (a surface, or parts that lie any way round); the kNN alone fits"


@app.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="Model directory.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--heatmap-dir", type=click.Path(path_type=Path), default=None,
              help="Write <stem>_heatmap.png and <stem>_overlay.png for each image here "
              "(<parent>_<stem>_... when two inputs share a stem).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--shard", "shard_text", default=None, metavar="K/N",
              help="Score shard K of N (K from 0) of the inputs, listed recursively; auto/N takes K from "
              "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job). Run it again to resume: what --output and the "
              "records already hold is not scored or written again.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Results as JSON lines: this .jsonl file, or a directory holding shard-K-of-N.jsonl (one file "
              "per shard: use a directory when shards run at once). Appended and resumed, as with --shard.")
@_store_options(required=False, keep=True)
@_runtime_options
@_friendly
def score(model_path: Path, inputs: tuple[Path, ...], heatmap_dir: Path | None, as_json: bool,
          shard_text: str | None, output: Path | None, weights: Path | None, device: str, knn_precision: str,
          runtime: str, data_dir: Path | None, database_url: str | None, keep_images: str) -> None:
    """Score images (files or directories) with a fitted model; with --data-dir or --database-url each one is
    recorded, as the service records it.

    With --shard or --output it re-scores an archive: directories are listed recursively, the shard's images
    are scored in batches with a progress bar, results go to the --output file and/or the records, and a run
    that was stopped resumes where it left off (see deploy/README.md for a Kubernetes Indexed Job)."""
    if shard_text is not None or output is not None:
        if heatmap_dir or as_json:
            raise ConfigError("--heatmap-dir and --json go with plain scoring, not with --shard/--output "
                              "(results go to --output and the records)")
        _score_archive(model_path, inputs, shard_text, output, data_dir, database_url, keep_images,
                       dict(weights=weights, device=device, knn_precision=knn_precision, runtime=runtime))
        return
    if heatmap_dir:
        _writable_dir(heatmap_dir, "--heatmap-dir")
    recorder = _cli_recorder(data_dir, database_url, keep_images)
    from .evidence import TrainingEvidence
    from .images import list_images, load_image, skip_reason
    from .model import AnomalyModel
    from .render import render

    model = AnomalyModel.load(model_path, weights=weights, device=device, knn_precision=knn_precision,
                              runtime=runtime)
    evidence = TrainingEvidence.of(model)  # None for models saved before it was kept: no evidence shown
    images, skipped = list_images(list(inputs))
    for s in skipped:
        click.echo(f"warning: skipping {s}: {skip_reason(s)}", err=True)
    if not images:
        raise ImageLoadError(f"no image files in {', '.join(map(str, inputs))}")
    if heatmap_dir:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    used_names: set[str] = set()
    for path in images:
        try:
            image = load_image(path, model.limits)  # decoded once: scored and, if asked, drawn under the heatmap
            res = model.score(image)
        except ImageLoadError as exc:
            failures += 1
            click.echo(f"warning: skipping {exc}", err=True)
            continue
        # the same verdict and pictures as the API's: regions (with their evidence) as in its JSON, overlay as
        # /score/image draws it
        verdict = render(res, image, ("png", "overlay") if heatmap_dir else (), evidence=evidence)
        if recorder is not None:
            _record_cli(recorder, model_path, path, res, verdict.regions)
        if heatmap_dir:
            name = _unique_name(path, used_names)
            (heatmap_dir / f"{name}_heatmap.png").write_bytes(verdict.heatmaps["png"].data)
            (heatmap_dir / f"{name}_overlay.png").write_bytes(verdict.heatmaps["overlay"].data)
        if as_json:
            click.echo(json.dumps({"path": str(path), **res.to_dict(),
                                   "regions": [r.to_dict() for r in verdict.regions],
                                   "embedding": verdict.embedding.to_dict() if verdict.embedding else None}))
        else:
            click.echo(f"{path}\t{res.score:.4f}\t{res.normalized_score:.3f}\t{verdict.label}")
    if recorder is not None:
        recorder.stop()
        recorder.store.close()
        lost = sum(recorder.dropped.values())
        click.echo(f"recorded {recorder.written} inspection(s)" + (f", {lost} lost" if lost else ""), err=True)
    if failures and failures == len(images):
        _fail("no image could be scored")


def _unique_name(path: Path, used: set[str]) -> str:
    """A heatmap file name for ``path`` no earlier photo of the run took: its stem, then with its folders in
    front (``a_x`` for ``a/x.png``), then numbered; a defect's heatmap is never overwritten by another photo's."""
    parts = [p for p in path.resolve().parent.parts if p not in ("/", "")]
    candidates = ["_".join([*parts[len(parts) - n:], path.stem]) if n else path.stem for n in range(len(parts) + 1)]
    name = next((c for c in candidates if c not in used), None)
    n = 2
    while name is None or name in used:
        name = f"{path.stem}_{n}"
        n += 1
    used.add(name)
    return name


def _score_archive(model_path: Path, inputs: tuple[Path, ...], shard_text: str | None, output: Path | None,
                   data_dir: Path | None, database_url: str | None, keep_images: str, runtime: dict[str, Any]) -> None:
    """``score --shard/--output``: one shard of an archive, resumed from what its destinations already hold."""
    from . import rescore
    from .model import AnomalyModel
    from .sharding import ResultsFile, Shard, list_archive, results_path

    shard = Shard.parse(shard_text or "0/1")
    if output is None and data_dir is None and database_url is None:
        raise ConfigError("--shard needs somewhere to write its results and to resume from: --output, and/or "
                          "--data-dir or --database-url for the records")
    if output is not None:
        _writable_dir(results_path(output, shard).parent, "--output")
    images, not_images = list_archive(list(inputs))
    for path in not_images:
        click.echo(f"warning: skipping {path}: not an image file", err=True)
    model = AnomalyModel.load(model_path, **runtime)
    name, version = rescore.model_identity(model_path)
    results = ResultsFile(results_path(output, shard), name, version) if output is not None else None
    recorder = _cli_recorder(data_dir, database_url, keep_images)
    summary = None
    try:
        in_file = results.open() if results is not None else None
        if results is not None and results.dropped_partial:
            click.echo(f"warning: {results.path}: cut off a partial last line ({results.dropped_partial} bytes) "
                       f"left by a stopped run; that image is scored again", err=True)
        in_records = (rescore.recorded(recorder.store, name, version, (im.key for im in images if shard.owns(im.key)))
                      if recorder is not None else None)
        work = rescore.plan(images, shard, in_file, in_records)
        click.echo(work.start_line(), err=True)
        with rescore.sigterm_as_interrupt():
            summary = rescore.run(work, model, name, version, results, recorder,
                                  warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    finally:
        if results is not None:
            results.close()
        if recorder is not None:
            recorder.stop()
            recorder.store.close()
    assert summary is not None
    click.echo(summary.line())
    if recorder is not None:
        lost = sum(recorder.dropped.values())
        click.echo(f"recorded {recorder.written} inspection(s)" + (f", {lost} lost" if lost else ""), err=True)
        if lost:
            _fail(f"{lost} record(s) could not be written; run the shard again to record them (it resumes)", 1)
    if summary.mine and summary.failed == summary.mine:
        _fail(f"no image of shard {shard} could be scored")


@app.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Evaluate this model; without it, fit on DATA_DIR/train/good first.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write metrics here.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write histogram, ROC and worst-case overlays here.")
@click.option("--save-model", type=click.Path(path_type=Path), default=None, help="Also save the fitted model.")
@click.option("-q", "--quiet", is_flag=True)
@_fit_options
@_friendly
@_sigterm_stops
def evaluate(data_dir: Path, model_path: Path | None, json_path: Path | None, report_dir: Path | None,
             save_model: Path | None, quiet: bool, **opts: Any) -> None:
    """Evaluate on an MVTec-layout category: image/pixel AUROC, PRO, FPR and recall at the threshold."""
    from .evaluate import evaluate_model, read_category
    from .model import AnomalyModel

    train, samples = read_category(data_dir)
    fit_seconds = None
    if model_path is not None:
        model = AnomalyModel.load(model_path, weights=opts["weights"], device=opts["device"],
                                  knn_precision=opts["knn_precision"], runtime=opts["runtime"])
    else:
        if save_model:
            from .artifact import check_replaceable

            _writable_dir(save_model, "--save-model")
            check_replaceable(save_model)  # before the fit, not after
        model = _build_model(opts, quiet)
        model.backbone  # noqa: B018
        if not train:
            raise ImageLoadError(f"{data_dir}/train/good has no images to fit on (or pass --model)")
        t0 = time.perf_counter()
        model.fit(train)
        fit_seconds = time.perf_counter() - t0
        _echo_fit_warnings(model.manifest_)
        if save_model:
            with _model_write_lock(save_model):
                model.save(save_model)
    metrics = evaluate_model(model, samples, report_dir, fit_seconds, train=train)
    for key in ("image_auroc", "pixel_auroc", "pro", "threshold", "good_fpr", "defect_recall", "fit_seconds",
                "score_ms_per_image", "peak_rss_mb"):
        v = metrics[key]
        if v is None and key in ("pixel_auroc", "pro"):
            click.echo(f"{key:20s} skipped: no ground-truth masks under {data_dir / 'ground_truth'}")
        else:
            click.echo(f"{key:20s} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{key:20s} {v}")
    curve = ", ".join(f"{float(k):.0%} -> {'-' if v is None else f'{v:.3f}'}" for k, v in metrics["recall_at_fpr"].items())
    click.echo(f"{'recall at good FPR':20s} {curve}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        # strict JSON: a metric that cannot be computed is null, never NaN
        json_path.write_text(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                         for k, v in metrics.items()}, indent=2, allow_nan=False))
    if report_dir:
        click.echo(f"report written to {report_dir}")


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@_friendly
def info(model_path: Path, as_json: bool) -> None:
    """Print a model's manifest readably (validates the artifact, does not load the backbone)."""
    from .artifact import read_artifact

    m, _ = read_artifact(model_path)  # every file verified against its checksum, as a load would
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2))
        return
    cal, pp = m.calibration, m.preprocessing
    scale = f" for a {pp.reference_side:g} px image" if pp.reference_side else ""
    tile = (pp.model_extra or {}).get("tile")  # tiled scoring (tiling.py); absent when off
    lines = [
        f"model            {Path(model_path).resolve()}",
        f"format           {m.format} v{m.format_version}, created {m.created_at}",
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
        how = (f"kNN weight {m.fusion.weight}" if m.fusion.rule in ("mean", "max") else
               f"adds what it sees beyond its own threshold {own.threshold:.4g}, set by {own.n_images} images it did "
               "not learn")
        lines.insert(8, f"second opinion   {kind}, fused by {m.fusion.rule} ({how})")
    layout_line = _layout_line(m)
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
                   "can set the threshold" if _surface_warning(m) else "")
        up = turned.get("upright_threshold")  # the fit's: an update re-calibrates, and this stays the fit's
        if up and not updated:
            posed += f" ({m.calibration.threshold / up - 1:+.0%} on the upright photos' own {up:.4g})"
        lines.insert(8, f"orientation      any: {turned['per_image']} turned copies an image, bank up to "
                        f"{turned['bank_factor']:g}x{posed}{surface}")
    suspects = _suspect_lines(m)
    if suspects:  # after the training line
        at = next(i for i, line in enumerate(lines) if line.startswith("training")) + 1
        lines[at:at] = [f"suspects         {suspects[0]}", *(" " * 15 + line for line in suspects[1:])]
    if m.mask is not None:
        extra = m.mask.model_extra or {}
        what = f"{m.mask.source} {extra['from']}" if extra.get("from") else m.mask.source
        if m.mask.source == "auto":
            what += " (foreground of the good images)" if extra.get("found") else " (no background found)"
        lines.insert(7, f"mask             {what}, inspects {m.mask.inspected:.0%} of {m.mask.width}x"
                        f"{m.mask.height} px; outside never counts")
    click.echo("\n".join(lines))


def _model_write_lock(model_path: Path) -> contextlib.AbstractContextManager:
    """The write lock of a model directory that a serving replica's update or rollback takes too
    (artifact.model_lock); none for a path that is not a directory (loading it says what is wrong)."""
    from .artifact import model_lock

    return model_lock(model_path) if Path(model_path).is_dir() else contextlib.nullcontext()


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--add-good", "good_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of good images to add (e.g. false alarms reviewed as good).")
@click.option("--defects", "defects_dir", type=click.Path(path_type=Path), default=None,
              help="Directory of images reviewed as defects: the update is refused if any would pass.")
@click.option("--force", is_flag=True, help="Update even if known defects would score below the new threshold.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_keep_versions_option
@_store_options(required=False, keep=False)
@_runtime_options
@_friendly
@_sigterm_stops
def update(model_path: Path, good_dir: Path, defects_dir: Path | None, force: bool, quiet: bool, keep_versions: int,
           weights: Path | None, device: str, knn_precision: str, runtime: str, data_dir: Path | None,
           database_url: str | None) -> None:
    """Add good images to a fitted model and re-calibrate it; the previous version is kept (see rollback).

    Known defects guard the update: images under --defects, and with --data-dir or --database-url every recorded
    photo of this model (by its directory name) whose latest review says defect."""
    from .errors import UpdateRefusedError
    from .model import AnomalyModel

    good = _normal_images(good_dir)
    defects: list[Path] = []
    if defects_dir is not None:
        from .images import list_images

        if not defects_dir.is_dir():
            raise ImageLoadError(f"--defects {defects_dir} is not a directory")
        defects = list_images(defects_dir)[0]
    if data_dir is not None or database_url is not None:
        store = _open_store(data_dir, database_url, "read")
        try:
            defects += [path for _, path in store.reviewed_images(Path(model_path).resolve().name, "defect")]
        finally:
            store.close()
    with _model_write_lock(model_path):
        # loaded under the lock: the update applies to the version that is current now
        model = AnomalyModel.load(model_path, weights=weights, device=device, knn_precision=knn_precision,
                                  runtime=runtime, progress=not quiet)
        t0 = time.perf_counter()
        try:
            new = model.update(good, defects, force=force)
        except UpdateRefusedError as exc:  # its message names the images; exit 3 tells a refusal from bad input
            click.echo(f"error: {exc}", err=True)
            sys.exit(3)
        new.save(model_path, keep_versions=keep_versions)
    m, old = new.manifest_, model.manifest_
    assert m is not None and m.lineage is not None and old is not None
    click.echo(f"updated with {m.lineage.images_added} images in {time.perf_counter() - t0:.1f}s: "
               f"{m.lineage.patches_added} patches added (bank {old.coreset.size} -> {m.coreset.size}), "
               f"threshold {old.calibration.threshold:.4g} -> {m.calibration.threshold:.4g}")
    for name in new.defects_passing_:
        click.echo(f"warning: forced: known defect now below the threshold: {name}", err=True)
    surface = _surface_warning(m)
    if surface is not None and _surface_warning(old) is None:  # this update's images made the model a surface's
        click.echo(f"warning: {surface}", err=True)
    click.echo(f"version {new.version_id_} saved to {Path(model_path).resolve()} (previous: {model.version_id_})")


@app.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@_friendly
def versions(model_path: Path, as_json: bool) -> None:
    """List a model's current and archived versions, newest first."""
    from .artifact import list_versions

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
@_keep_versions_option
@_friendly
@_sigterm_stops
def rollback(model_path: Path, version: str, keep_versions: int) -> None:
    """Make an archived version of a model current again (the replaced one is archived)."""
    from .artifact import model_version_id
    from .artifact import rollback as rollback_artifact

    try:
        with _model_write_lock(model_path):
            rollback_artifact(model_path, version, keep_versions)
    except LookupError as exc:
        _fail(str(exc))
    click.echo(f"{Path(model_path).resolve()} is now version {model_version_id(model_path)}")


def _serve_options(fn: Callable) -> Callable:
    """One flag per ServiceSettings field; unset flags fall back to ANOMALY_* environment variables."""
    from .settings import ServiceSettings

    types = {int: int, float: float}
    for name, f in reversed(list(ServiceSettings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind = types.get(f.annotation, str)  # type: ignore[arg-type]
        env = f"ANOMALY_{name.upper()}"
        default = f.default if f.default is not None and not callable(f.default_factory) else None
        help_ = f"{f.description or ''} [env {env}" + (f"; default {default}]" if default is not None else "]")
        fn = click.option(flag, name, type=kind, default=None, help=help_.strip())(fn)
    return fn


@app.command()
@_serve_options
@_friendly
def serve(**flags: Any) -> None:
    """Run the HTTP scoring service over every model under --model-dir (see docs/service.md)."""
    import uvicorn
    from pydantic import ValidationError

    from .api import create_app
    from .api.server import uvicorn_options
    from .settings import ServiceSettings

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = ServiceSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")
        return
    # the group configured the root logger for CLI use (warnings only); the service's own lines (serving,
    # loaded, directory changed) must show at the level the operator chose
    logging.getLogger("anomaly_service").setLevel(settings.log_level.upper())
    if not settings.model_dir.is_dir():
        _fail(f"model directory {settings.model_dir} does not exist; fit a model first "
              f"(anomaly fit --normal-dir DIR --out {settings.model_dir}/NAME)")
    app = create_app(settings)
    # connection limits and timeouts (head, keep-alive, concurrency) come with the settings: api/server.py
    uvicorn.run(app, **uvicorn_options(settings, app))


@app.command()
@click.option("--url", default=None, help="Default: http://127.0.0.1:$ANOMALY_PORT/healthz (port 8000).")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def healthcheck(url: str | None, timeout: float) -> None:
    """Exit 0 if the local service answers /healthz (for container HEALTHCHECKs: no curl needed)."""
    import os
    import urllib.error
    import urllib.request

    url = url or f"http://127.0.0.1:{os.environ.get('ANOMALY_PORT', '8000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a local URL we build
            ok = r.status == 200
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"{url}: {exc}", 1)
        return
    if not ok:
        _fail(f"{url}: status {r.status}", 1)
    click.echo("ok")


# ------------------------------------------------------------------------------------------------ records
def _open_store(data_dir: Path | None, database_url: str | None, mode: str = "write"):
    """The records store, as a command needs it: ``write`` (scoring records: created or upgraded to this release's
    schema), ``read`` (export, an update's reviewed defects: an existing database at this release's schema, never
    created or migrated as a side effect) or ``admin`` (``db upgrade``, which migrates it itself). Every failure is
    one line."""
    from .records.store import SQLITE_FILE, RecordStore, SchemaError, redact

    where = redact(database_url) if database_url else str(data_dir)
    try:
        if mode == "read" and data_dir is not None and (
                not Path(data_dir).is_dir() or (database_url is None and not (Path(data_dir) / SQLITE_FILE).is_file())):
            raise ConfigError(f"no records {'directory' if database_url else 'database'} under {data_dir} (is the "
                              "--data-dir right? scoring with it creates one)")
        store = RecordStore.open(database_url, data_dir)
        if mode == "write":
            store.upgrade()
        elif mode == "read":
            _check_schema(store)
    except (ConfigError, SchemaError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - unreachable database, bad URL: one line, no traceback
        raise _records_failure(where, exc) from None
    return store


def _records_failure(where: str, exc: BaseException) -> ConfigError:
    """One line for a records database that cannot be reached or read: where, and the first line of why."""
    return ConfigError(f"records database {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _check_schema(store: Any) -> None:
    """A database to read must be at this release's schema: an older one is upgraded by ``anomaly db upgrade``
    (its owner decides when), a newer one is another release's. A role that may not read the schema's version
    (a read-only reporting role) is let through: its queries say what they cannot read."""
    from sqlalchemy.exc import ProgrammingError

    try:
        current = store.current_revision()
    except ProgrammingError:
        return
    head = store.head_revision()
    if current != head:
        raise ConfigError(f"the records database is at schema {current or 'empty'}, this release reads {head}: "
                          + ("run `anomaly db upgrade` first" if current is None or current in store.known_revisions()
                             else "it was made by a newer release"))


def _cli_recorder(data_dir: Path | None, database_url: str | None, keep_images: str):
    if data_dir is None and database_url is None:
        return None
    from .records.recorder import Recorder

    recorder = Recorder(_open_store(data_dir, database_url), keep_images)
    recorder._schema_ready = True
    recorder.start()
    return recorder


def _record_cli(recorder: Any, model_path: Path, path: Path, res: Any, shown: list[Any]) -> None:
    """Record one scored image with the regions it was shown with (``shown``: the verdict's)."""
    import hashlib

    from .records.recorder import PartContext, PendingRecord

    keep = recorder.keeps(res.is_anomaly)
    data = path.read_bytes()
    manifest = Path(model_path) / "manifest.json"
    version = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else ""
    regions = [r.to_dict() for r in shown]
    pending = PendingRecord(
        data=data, model=Path(model_path).resolve().name, model_version=version, score=float(res.score),
        normalized_score=float(res.normalized_score), threshold=float(res.threshold), is_anomaly=bool(res.is_anomaly),
        regions=regions, image_width=res.image_width, image_height=res.image_height,
        timing_ms={k: round(v, 3) for k, v in res.timing_ms.items()}, context=PartContext(part_id=path.name),
        normalized_map=res.normalized_map if keep else None, source="cli")
    recorder.submit_wait(pending)


@app.group()
def db() -> None:
    """The inspection records database."""


@db.command("upgrade")
@_store_options(required=True)
@_friendly
def db_upgrade(data_dir: Path, database_url: str | None) -> None:
    """Create the records database, or upgrade an older one to this release's schema (never recreated)."""
    from .records.store import SchemaError, redact

    store = _open_store(data_dir, database_url, "admin")
    try:
        try:
            before, after = store.upgrade()
        except SchemaError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - unreachable database, no such database: one line, no traceback
            raise _records_failure(redact(store.url), exc) from None
        click.echo(f"{redact(store.url)}: schema {before or 'empty'} -> {after}" if before != after else
                   f"{redact(store.url)}: schema {after}, up to date")
    finally:
        store.close()


@app.group()
def records() -> None:
    """Recorded inspections: quality reports."""


def _csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: part ids, lines and notes come from clients, and a cell that
    starts with = + - @ (or a tab or carriage return) would run as a formula when the export is opened."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class _Instant(click.ParamType):
    """An ISO 8601 date or time, as the HTTP API takes it: with an offset or ``Z``, or without one (then UTC)."""

    name = "ISO-8601"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from datetime import datetime, timezone

        if isinstance(value, datetime):
            return value
        try:
            t = datetime.fromisoformat(str(value).strip())
            return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
        except (ValueError, OverflowError):  # not a time, or one with no UTC equivalent (year 1 at +01:00)
            self.fail(f"{value!r} is not an ISO 8601 date or time in range (2026-12-01, 2026-12-01T08:00:00, "
                      "2026-12-01T08:00:00+01:00 or ...Z)", param, ctx)


@records.command("export")
@click.option("--since", type=_Instant(), default=None, help="From this time (UTC unless it has an offset).")
@click.option("--until", type=_Instant(), default=None, help="Before this time (UTC unless it has an offset).")
@click.option("--model", default=None, help="Only this model.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File (default stdout).")
@_store_options(required=True)
@_friendly
def records_export(since: Any, until: Any, model: str | None, fmt: str, out: Path | None, data_dir: Path,
                   database_url: str | None) -> None:
    """Export inspections, oldest first, with their latest verdict: CSV (JSON columns as JSON text) or JSONL."""
    import csv

    from .records.store import EXPORT_COLUMNS, Filters, inspection_dict

    if out:
        _writable_dir(out.parent, "--out")
    store = _open_store(data_dir, database_url, "read")
    filters = Filters(model=model, since=since, until=until)
    stream = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
    n = 0
    try:
        writer = csv.writer(stream) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(EXPORT_COLUMNS)
        for row in store.iter_all(filters):
            d = inspection_dict(row)
            if writer is not None:
                writer.writerow([_csv_cell(json.dumps(d[c]) if isinstance(d[c], (dict, list)) else d[c])
                                 for c in EXPORT_COLUMNS])
            else:
                stream.write(json.dumps({c: d[c] for c in EXPORT_COLUMNS}) + "\n")
            n += 1
    finally:
        if out:
            stream.close()
        store.close()
    click.echo(f"exported {n} inspection(s)" + (f" to {out}" if out else ""), err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
