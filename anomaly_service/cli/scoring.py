"""``anomaly score``: photos scored one by one (pictures, JSON, records), or an archive re-scored by shards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import click
import regex

from ..compression import said_with
from ..errors import ConfigError, ImageLoadError
from ..spellings import composed
from ..timing import charge_decode
from ..whole_file import write_whole
from .flags import runtime_options, store_options
from .group import app
from .records import cli_recorder, record_cli
from .shell import fail, friendly, image_limits, temporary_directory_usable, writable_dir


@app.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="Model directory.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--heatmap-dir", type=click.Path(path_type=Path), default=None,
              help="Write <stem>_heatmap.png and <stem>_overlay.png for each image here "
              "(<parent>_<stem>_... for an image whose stem an earlier one took); one colour scale for every photo, "
              "the threshold (orange) two thirds up it, so a good part looks cool.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--shard", "shard_text", default=None, metavar="K/N",
              help="Score shard K of N (K from 0) of the inputs, listed recursively; auto/N takes K from "
              "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job). Run it again to resume: what --output and the "
              "records already hold is not scored or written again.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Results as JSON lines: this .jsonl file, or a directory holding shard-K-of-N.jsonl (one file "
              "per shard: use a directory when shards run at once). Appended and resumed, as with --shard.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (an archive's, with --shard or --output).")
@store_options(required=False, keep=True)
@runtime_options
@friendly
def score(model_path: Path, inputs: tuple[Path, ...], heatmap_dir: Path | None, as_json: bool,
          shard_text: str | None, output: Path | None, quiet: bool, weights: Path | None, device: str,
          knn_precision: str, runtime: str, data_dir: Path | None, database_url: str | None, keep_images: str) -> None:
    """Score images (files or directories) with a fitted model; with --data-dir or --database-url each one is
    recorded, as the service records it.

    Each line: path, raw score (kNN distance), normalized score and decision. On the normalized scale 1.0 is the
    threshold (not 0.5 as in anomalib) and there is no upper bound: above 1.0 the part is flagged.

    With --shard or --output it re-scores an archive: directories are listed recursively, the shard's images
    are scored in batches with a progress bar, results go to the --output file and/or the records, and a run
    that was stopped resumes where it left off (see deploy/README.md for a Kubernetes Indexed Job)."""
    temporary_directory_usable()
    if shard_text is not None or output is not None:
        if heatmap_dir or as_json:
            raise ConfigError("--heatmap-dir and --json go with plain scoring, not with --shard/--output "
                              "(results go to --output and the records)")
        _score_archive(model_path, inputs, shard_text, output, data_dir, database_url, keep_images,
                       dict(weights=weights, device=device, knn_precision=knn_precision, runtime=runtime), not quiet)
        return
    if heatmap_dir:
        writable_dir(heatmap_dir, "--heatmap-dir")
    recorder = cli_recorder(data_dir, database_url, keep_images)
    from .. import rescore
    from ..evidence import TrainingEvidence
    from ..images import list_images, skip_reason
    from ..model import AnomalyModel

    model = AnomalyModel.load(model_path, weights=weights, device=device, knn_precision=knn_precision,
                              runtime=runtime, limits=image_limits())
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
    unwritten: list[Path] = []  # photos scored whose heatmaps the --heatmap-dir did not take (a full disk)
    lost = 0
    try:
        # a stop (SIGTERM: systemd, a container) ends the run as Ctrl-C does, and either writes the records of the
        # parts already printed before the exit: a printed id must name a record
        with rescore.sigterm_as_interrupt():
            for path in images:
                if not _score_one(path, model, evidence, recorder, model_path, heatmap_dir, used_names, as_json,
                                  unwritten):
                    failures += 1
    finally:
        if recorder is not None:
            recorder.stop()
            recorder.store.close()
            lost = sum(recorder.dropped.values())
            click.echo(f"recorded {recorder.written} inspection(s)" + (f", {lost} lost" if lost else ""), err=True)
    if failures and failures == len(images):
        fail("no image could be scored")
    if failures:  # a part that was not judged must not pass as one that was: a script sees it in the exit code
        fail(f"{failures} of {len(images)} images could not be scored (see the warnings); the rest are above", 1)
    if lost:  # nor a part whose record is missing as one that is traceable (its printed id names no record)
        fail(f"{lost} record(s) could not be written (see the log); the scores above stand, those records do not", 1)
    if unwritten:  # nor a run whose pictures were asked for and are missing as one that drew them all
        fail(f"the heatmaps of {len(unwritten)} of {len(images)} images could not be written to {heatmap_dir} (see "
             "the warnings); their scores are above", 1)


def _score_one(path: Path, model: Any, evidence: Any, recorder: Any, model_path: Path, heatmap_dir: Path | None,
               used_names: set[str], as_json: bool, unwritten: list[Path]) -> bool:
    """Score, record, draw and print one photo; False when it does not decode (warned: a part not judged). A
    heatmap the directory does not take (a full disk) is warned about and added to ``unwritten``: the score is
    printed all the same, and the next photos are scored."""
    from ..images import decode_image
    from ..render import render

    try:
        t0 = time.perf_counter()
        decoded = decode_image(path, model.limits)  # decoded once: scored and, if asked, drawn under the heatmap
        image = decoded.array
        decode_ms = (time.perf_counter() - t0) * 1000
        res = model.score(image)
        # how the file was read (which frame): the model saw only the array; a harder JPEG only with a flag
        res.warnings[:0] = said_with(decoded.warnings, res.is_anomaly)
        charge_decode(res.timing_ms, decode_ms)  # the model only re-reads the array it was handed
    except ImageLoadError as exc:
        click.echo(f"warning: skipping {exc}", err=True)
        return False
    # the same verdict and pictures as the API's: regions (with their evidence) as in its JSON, overlay as
    # /score/image draws it
    verdict = render(res, image, ("png", "overlay") if heatmap_dir else (), evidence=evidence)
    inspection_id = (record_cli(recorder, model_path, model.version_id_, path, res, verdict.regions,
                                verdict.embedding, image) if recorder is not None else None)
    if heatmap_dir:
        name = _unique_name(path, used_names)
        try:
            write_whole(heatmap_dir / f"{name}{HEATMAP_SUFFIX}", verdict.heatmaps["png"].data)
            write_whole(heatmap_dir / f"{name}_overlay.png", verdict.heatmaps["overlay"].data)
        except OSError as exc:
            click.echo(f"warning: {path}: its heatmap could not be written to {heatmap_dir}: {exc.strerror or exc}",
                       err=True)
            unwritten.append(path)
    if as_json:
        click.echo(json.dumps({"path": str(path), **res.to_dict(),
                               "regions": [r.to_dict() for r in verdict.regions],
                               "embedding": verdict.embedding.to_dict() if verdict.embedding else None,
                               "inspection_id": inspection_id}))
    else:  # the record's id last, where it is recorded: the columns before it stay where scripts read them
        click.echo(f"{path}\t{res.score:.4f}\t{res.normalized_score:.3f}\t{verdict.label}"
                   + (f"\t{inspection_id}" if inspection_id else ""))
    for warning in res.warnings:
        click.echo(f"warning: {path}: {warning}", err=True)
    return True


def _unique_name(path: Path, used: set[str]) -> str:
    """A heatmap file name for ``path`` no earlier photo of the run took: its stem, then with its folders in
    front (``a_x`` for ``a/x.png``), then numbered; a defect's heatmap is never overwritten by another photo's.
    Each is :func:`fitting_name`: the file system takes it with the heatmap's suffix. The folders are those of the
    path as given, links not followed: a dataset laid out by links (docs/coming-from-anomalib.md) had its
    ``test/good/000.png`` drawn as ``good_test_000``, after the folder the link pointed to."""
    parts = [p for p in Path(os.path.abspath(path)).parent.parts if p not in ("/", "")]
    candidates = [fitting_name("_".join([*parts[len(parts) - n:], path.stem]) if n else path.stem)
                  for n in range(len(parts) + 1)]
    name = next((c for c in candidates if _same_file_name(c) not in used), None)
    n = 2
    while name is None or _same_file_name(name) in used:
        name = fitting_name(f"{path.stem}_{n}")
        n += 1
    used.add(_same_file_name(name))
    return name


def _same_file_name(name: str) -> str:
    """What two names that are one file to some file system share: FAT and exFAT (a USB stick the heatmaps are
    taken away on), NTFS and APFS ignore letter case, and macOS's file systems Unicode's two spellings. ``Part.png``
    and ``part.png`` from two folders had one heatmap there, the second photo's drawn over the first's."""
    return composed(name).casefold()


# the most bytes of one file name on Linux file systems (ext4, XFS, Btrfs), and what a heatmap's name adds
NAME_MAX = 255
HEATMAP_SUFFIX = "_heatmap.png"


def fitting_name(name: str) -> str:
    """``name`` as a heatmap name's stem the file system takes: unchanged where it fits, else its first whole
    characters and a digest of all of it (two long names that begin alike stay apart). Names are counted in
    bytes: a photo named with 82 Chinese characters (3 bytes each), or a long folder in front of a shorter one,
    had no heatmap ("File name too long")."""
    room = NAME_MAX - len(HEATMAP_SUFFIX)
    if len(os.fsencode(name)) <= room:
        return name
    digest = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    kept, size = [], 0
    for shown in regex.findall(r"\X", name):  # what a reader sees as one character (Unicode's grapheme clusters)
        size += len(os.fsencode(shown))
        if size > room - len(digest):
            break
        kept.append(shown)
    return "".join(kept) + digest


def _score_archive(model_path: Path, inputs: tuple[Path, ...], shard_text: str | None, output: Path | None,
                   data_dir: Path | None, database_url: str | None, keep_images: str, runtime: dict[str, Any],
                   progress: bool = True) -> None:
    """``score --shard/--output``: one shard of an archive, resumed from what its destinations already hold."""
    from .. import rescore
    from ..images import skip_reason
    from ..model import AnomalyModel
    from ..sharding import (ResultsFile, ResultsWriteError, Shard, begun_roots, counts_in_turn, done_by_other_counts,
                            keyed_as_begun, list_archive, other_versions, results_path, shard_files)

    shard = Shard.parse(shard_text or "0/1")
    if output is None and data_dir is None and database_url is None:
        raise ConfigError("--shard needs somewhere to write its results and to resume from: --output, and/or "
                          "--data-dir or --database-url for the records")
    if output is not None:
        writable_dir(results_path(output, shard).parent, "--output")
    images, not_images = list_archive(list(inputs))
    for path in not_images:
        click.echo(f"warning: skipping {path}: {skip_reason(path)}", err=True)
    unreadable = sum(1 for path in not_images if path.is_dir())  # searched folders that could not be listed
    if not images:  # an archive's share not mounted (its empty mount point), or another user's: not a done shard
        raise ConfigError(f"no image files in {', '.join(str(p) for p in inputs)}"
                          + (f" ({unreadable} folder(s) could not be read)" if unreadable else ""))
    model = AnomalyModel.load(model_path, **runtime, limits=image_limits())
    name, names = rescore.model_identity(model_path, model)
    version = names[0]
    results = ResultsFile(results_path(output, shard), name, version, earlier=names[1:]) if output is not None else None
    recorder = cli_recorder(data_dir, database_url, keep_images)
    summary = None
    claims, turn = contextlib.ExitStack(), contextlib.ExitStack()
    in_directory = results is not None and output is not None and results.path != output  # shard-K-of-N.jsonl files
    family = f"rescore {name} {version}"
    other_count = (f"by a run that splits the archive into another number of shards than {shard.count} (their images "
                   f"overlap this shard's); this goes on once it ends and skips what it did")
    try:
        if in_directory:  # one count of shards at once; held until its file is closed
            assert output is not None
            turn.enter_context(counts_in_turn(output, family, shard.count, waiting=lambda: click.echo(
                f"waiting: {output} is being written {other_count}", err=True)))
        # one .jsonl file takes every shard's lines: the run holding it may be of another shard or count
        writer = "another run of this shard" if in_directory else "another run (of any shard) into this one file"
        in_file = results.open(waiting=lambda: click.echo(
            f"waiting: {results.path} is being written by {writer}; this goes on once it ends and skips what it did",
            err=True)) if results is not None else None
        if results is not None and output is not None:  # resumed with part of its inputs: keyed as begun
            begun = shard_files(output) if in_directory else [results.path]
            images = keyed_as_begun(images, list(inputs), begun_roots(begun), results.path)
            for path, other in other_versions([b for b in begun if b != results.path], name, names):
                click.echo(f"warning: {path} holds results of {name} version {other}, and this shard scores with "
                           f"version {version} (the model changed since that shard ran): the results in {output} "
                           "mix two versions' scores; re-score into a new --output to have one", err=True)
        if in_directory and in_file is not None:
            assert output is not None  # begun with another N: what its files hold is done, once in the directory
            in_file = {**done_by_other_counts(output, shard, name, names), **in_file}
        if results is not None and results.dropped_partial:
            click.echo(f"warning: {results.path}: cut off a partial last line ({results.dropped_partial} bytes) "
                       f"left by a stopped run; that image is scored again", err=True)
        # the records' hold on this shard, as the results file's (a second run at once scored every image again),
        # let go only once the records buffered are written
        if recorder is not None:
            claims.enter_context(recorder.store.claim(
                f"{family} shard {shard}", waiting=lambda: click.echo(
                    f"waiting: shard {shard} of {name} is being recorded by another run (on this host, or on another "
                    f"writing the same records); this goes on once it ends and skips what it did", err=True),
                turn=(family, shard.count), waiting_turn=lambda: click.echo(
                    f"waiting: {name} is being recorded {other_count}", err=True)))
        in_records = (rescore.recorded(recorder.store, name, names, (im.key for im in images if shard.owns(im.key)))
                      if recorder is not None else None)
        work = rescore.plan(images, shard, in_file, in_records)
        click.echo(work.start_line(), err=True)
        with rescore.sigterm_as_interrupt():
            summary = rescore.run(work, model, name, version, results, recorder,
                                  warn=lambda msg: click.echo(f"warning: {msg}", err=True), progress=progress)
    except ResultsWriteError as exc:  # a full disk: the records made so far are still written (below), then exit 1
        stopped: ResultsWriteError | None = exc
    else:
        stopped = None
    finally:
        if recorder is not None:
            recorder.stop()
            claims.close()
            recorder.store.close()
        if results is not None:  # let go last: a run waiting on it then finds the records' claim free too
            results.close()
        turn.close()
    if stopped is not None:
        fail(str(stopped), 1)
    assert summary is not None
    summary.unreadable = unreadable
    click.echo(summary.line())
    if recorder is not None:
        lost = sum(recorder.dropped.values())
        click.echo(f"recorded {recorder.written} inspection(s)" + (f", {lost} lost" if lost else ""), err=True)
        if lost:
            fail(f"{lost} record(s) could not be written; run the shard again to record them (it resumes)", 1)
    if summary.mine and summary.failed == summary.mine:
        fail(f"no image of shard {shard} could be scored")
