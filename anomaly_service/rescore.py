"""Re-scoring an archive one shard at a time (``anomaly score --shard K/N``), resumable.

Each result has up to two destinations, the shard's JSON lines and the inspection records, and a killed run can
leave them apart: lines are flushed one by one while records are written by a background writer in batches. So
each destination is resumed on its own: an image is skipped only when every destination asked for has it, and
is otherwise scored again and written only where it is missing. A resumed shard thus ends with every image once
in each destination. Images are recognised by key (path relative to the listing root) and model version: a
file changed in place under the same name is not noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compression import said_with
from .errors import AnomalyError, ImageLoadError
from .images import ImageLimits, decode_image
from .progress import progress_bar
from .sharding import ArchiveImage, ResultsFile, Shard, chunks
from .timing import charge_decode

if TYPE_CHECKING:
    import numpy as np

    from .decision import ScoreResult
    from .evidence import MapPoint
    from .model import AnomalyModel
    from .records.recorder import Recorder
    from .render import Verdict
    from .records.store import RecordStore

RECORD_SOURCE = "rescore"  # the records' ``source``: what a resumed run looks for
PART_ID_MAX = 200  # width of the records' part_id column


def model_identity(model_path: Path, model: AnomalyModel) -> tuple[str, tuple[str, ...]]:
    """(name, the version's names) as the service records them: the directory's name; the loaded model's version
    id (what this run writes), then what records and results of earlier releases call that version
    (artifact.recorded_names), which a resumed run finds as its own."""
    from .artifact import recorded_names

    assert model.version_id_ is not None and model.manifest_sha256_ is not None  # a loaded model has both
    return Path(model_path).resolve().name, recorded_names(model.version_id_, model.manifest_sha256_)


def part_id(key: str) -> str:
    """A record's part id for an image key: the key, or if the column cannot hold it, its head and a hash of the
    whole (unique and still readable; the full key is in the record's ``meta.archive_key``)."""
    if len(key) <= PART_ID_MAX:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key[:PART_ID_MAX - len(digest) - 1]}~{digest}"


def recorded(store: RecordStore, model: str, model_versions: Sequence[str], keys: Iterable[str]) -> dict[str, str]:
    """Part ids among ``keys``' that earlier re-scoring runs recorded for this model version, under any of its
    names, each with its record's id (only this shard's are kept, so memory follows the shard, not the whole
    archive)."""
    wanted = {part_id(k) for k in keys}
    return {p: id_ for p, id_ in store.recorded_parts(model, model_versions, RECORD_SOURCE) if p in wanted}


@dataclass(frozen=True)
class Task:
    """An image of the shard and where its result is still missing. ``record_id``: the record the other destination
    already names (a results line's ``inspection_id``, or the record made before the line was written), so that
    the one written now names the same: a kill between the two left a line naming a record never written, and its
    resume recorded the image under another id."""

    image: ArchiveImage
    to_file: bool
    to_records: bool
    record_id: str | None = None


@dataclass
class Plan:
    shard: Shard
    listed: int  # images in the whole listing
    mine: int  # of them, this shard's
    tasks: list[Task]

    @property
    def skipped(self) -> int:
        return self.mine - len(self.tasks)

    def start_line(self) -> str:
        return (f"shard {self.shard}: {self.mine} of {self.listed} listed images; {self.skipped} already done, "
                f"{len(self.tasks)} to score")


def plan(images: Sequence[ArchiveImage], shard: Shard, in_file: Mapping[str, str | None] | None,
         in_records: Mapping[str, str] | None) -> Plan:
    """This shard's images and what each still needs. ``in_file``: keys in the results file, each with the record
    id its line names; ``in_records``: part ids in the records, each with its record's id (None: that destination
    was not asked for)."""
    mine = [im for im in images if shard.owns(im.key)]
    tasks = []
    for im in mine:
        to_file = in_file is not None and im.key not in in_file
        to_records = in_records is not None and part_id(im.key) not in in_records
        if to_file or to_records:
            named = (in_file.get(im.key) if to_records and in_file is not None else
                     in_records.get(part_id(im.key)) if to_file and in_records is not None else None)
            tasks.append(Task(im, to_file, to_records, named))
    return Plan(shard, len(images), len(mine), tasks)


@dataclass
class Summary:
    shard: Shard
    listed: int
    mine: int
    skipped: int
    scored: int = 0
    failed: int = 0
    seconds: float = 0.0
    unreadable: int = 0  # folders of the archive that could not be listed: their images are in no count

    def line(self) -> str:
        rate = f", {self.scored / self.seconds:.2f} images/s" if self.scored and self.seconds > 0 else ""
        unlisted = (f"; {self.unreadable} folder(s) could not be read, their images not listed" if self.unreadable
                    else "")
        return (f"shard {self.shard}: {self.scored} scored, {self.skipped} skipped as already done, {self.failed} "
                f"failed, of {self.mine} images in this shard ({self.listed} listed); {self.seconds:.1f} s{rate}"
                f"{unlisted}")


@dataclass
class _Decoded:
    task: Task
    data: bytes  # the file as read: hashed and, if kept, stored by the records
    array: np.ndarray
    decode_ms: float
    warnings: tuple[str, ...] = ()  # how the file was read (which frame of several), for its row's warnings


def _decode(task: Task, limits: ImageLimits) -> _Decoded:
    t0 = time.perf_counter()
    path = task.image.path
    if path.stat().st_size > limits.max_bytes:  # before reading it: an archive may hold anything
        raise ImageLoadError(f"{path}: file is larger than the limit of {limits.max_bytes} bytes", "too_large")
    data = path.read_bytes()
    decoded = decode_image(data, limits, name=str(path))
    return _Decoded(task, data, decoded.array, (time.perf_counter() - t0) * 1000, decoded.warnings)


def _score(model: AnomalyModel, decoded: list[_Decoded]) -> list[ScoreResult | AnomalyError]:
    """Results in order, batched through the backbone; if the batch fails, image by image, so one image that
    cannot be scored costs only itself."""
    try:
        return list(model.score_many([d.array for d in decoded]))
    except AnomalyError:
        out: list[ScoreResult | AnomalyError] = []
        for d in decoded:
            try:
                out.append(model.score(d.array))
            except AnomalyError as exc:
                out.append(exc)
        return out


def result_row(image: ArchiveImage, res: ScoreResult, verdict: Verdict, model: str,
               model_version: str, inspection_id: str | None = None) -> dict[str, Any]:
    """One line of the results: what ``anomaly score --json`` prints for the image, plus its key and the model.
    ``inspection_id``: the record this run made of it (None: not recorded by this run). The key comes first: a
    resume tells a line a kill cut short from another tool's file by how it begins (sharding.LINE_START)."""
    return {"key": image.key, "path": str(image.path), **res.to_dict(),
            "regions": [r.to_dict() for r in verdict.regions],
            "embedding": verdict.embedding.to_dict() if verdict.embedding else None, "inspection_id": inspection_id,
            "model": model, "model_version": model_version}


def _record(recorder: Recorder, d: _Decoded, res: ScoreResult, regions: list[dict[str, Any]], model: str,
            model_version: str, place: MapPoint | None = None) -> str | None:
    """Record one re-scored image (``place``: its verdict's place on the image map), under the id its results line
    already names if it has one; the id it is recorded under (None: the recorder had stopped)."""
    from .records.recorder import PartContext, PendingRecord

    keep = recorder.keeps(res.is_anomaly)
    key = d.task.image.key
    pending = PendingRecord(
        data=d.data, model=model, model_version=model_version, score=float(res.score),
        normalized_score=float(res.normalized_score), threshold=float(res.threshold), is_anomaly=bool(res.is_anomaly),
        regions=regions, image_width=res.image_width, image_height=res.image_height,
        timing_ms={k: round(v, 3) for k, v in res.timing_ms.items()},
        context=PartContext(part_id=part_id(key), meta={"archive_key": key}), warnings=list(res.warnings),
        scorers=res.scorers or None, scored_with=res.scored_with, embedding=place,
        normalized_map=res.normalized_map if keep else None, pixels=d.array if keep else None, source=RECORD_SOURCE,
        map_bytes=int(res.anomaly_map.nbytes) if keep else 0)
    if d.task.record_id is not None:
        pending.id = d.task.record_id
    return pending.id if recorder.submit_wait(pending) else None


def run(work: Plan, model: AnomalyModel, model_name: str, model_version: str, results: ResultsFile | None,
        recorder: Recorder | None, warn: Callable[[str], None], progress: bool = True) -> Summary:
    """Score the plan's images in batches and write each result where it is missing. Unreadable images are
    warned about, counted and left for the next run; they never stop the shard."""
    from .evidence import TrainingEvidence
    from .render import render

    evidence = TrainingEvidence.of(model)  # regions carry their closest good region, as `score --json` shows them
    summary = Summary(work.shard, work.listed, work.mine, work.skipped)
    t0 = time.perf_counter()
    with progress_bar(progress, total=work.mine, initial=work.skipped, desc=f"shard {work.shard}",
                      unit="img") as bar:
        for batch in chunks(work.tasks, model.config.batch_size):
            decoded = []
            for task in batch:
                try:
                    decoded.append(_decode(task, model.limits))
                except ImageLoadError as exc:
                    summary.failed += 1
                    warn(f"skipping {exc}")
                    bar.update(1)
                except OSError as exc:  # unreadable file (permissions, a vanished mount): this image only
                    summary.failed += 1
                    warn(f"skipping {task.image.path}: {exc.strerror or exc}")
                    bar.update(1)
            for d, res in zip(decoded, _score(model, decoded) if decoded else []):
                bar.update(1)
                if isinstance(res, AnomalyError):
                    summary.failed += 1
                    warn(f"skipping {d.task.image.path}: {res}")
                    continue
                # decoding happened here, from the bytes read once: charge it to this image's timing
                charge_decode(res.timing_ms, d.decode_ms)
                res.warnings[:0] = said_with(d.warnings, res.is_anomaly)
                verdict = render(res, evidence=evidence)
                recorded = None if d.task.to_records else d.task.record_id
                if d.task.to_records and recorder is not None:  # first: its line names the record
                    recorded = _record(recorder, d, res, [r.to_dict() for r in verdict.regions], model_name,
                                       model_version, verdict.embedding)
                if d.task.to_file and results is not None:
                    results.write(result_row(d.task.image, res, verdict, model_name, model_version, recorded))
                summary.scored += 1
    summary.seconds = time.perf_counter() - t0
    return summary


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Kubernetes stops a pod with SIGTERM: raise KeyboardInterrupt instead of dying at once, so the records
    buffered so far are written and the results file closed (a SIGKILL loses those, and the resume makes them
    up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
