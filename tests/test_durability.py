"""Writes that must survive a power cut: a file's bytes are synced before the rename that names it, and its
directory after, so the disk holds the earlier state or the new one whole, never a new name on bytes that were
still in the page cache. A kill cannot show this (the page cache survives it), so these tests watch the real sync
and rename calls, in order, as they reach the kernel."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from anomaly_service.cli import app as cli
from anomaly_service.records import RecordStore
from anomaly_service.records.files import FileStore
from anomaly_service.whole_file import write_whole
from conftest import png_bytes, textured_part

import numpy as np


class DiskLog:
    """The syncs and renames of this process, in order: each sync names the path its descriptor is open on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def synced_before(self, path: Path, rename_to: Path) -> bool:
        """Whether ``path`` (as named while it was written) was synced before the rename that named it ``rename_to``."""
        for event in self.events:
            if event[0] == "rename" and Path(event[2]) == rename_to:
                return False
            if event[0] == "sync" and Path(event[1]) == path:
                return True
        return False

    def dir_synced_after(self, rename_to: Path) -> bool:
        """Whether the directory of ``rename_to`` was synced after the last rename that named it."""
        last = max((i for i, e in enumerate(self.events) if e[0] == "rename" and Path(e[2]) == rename_to), default=None)
        return last is not None and any(e == ("sync", str(rename_to.parent)) for e in self.events[last + 1:])

    def rename_source(self, rename_to: Path) -> Path:
        return next(Path(e[1]) for e in reversed(self.events) if e[0] == "rename" and Path(e[2]) == rename_to)


@pytest.fixture
def disk(monkeypatch) -> DiskLog:
    """The real ``os.fsync``, ``os.replace`` and ``os.rename``, each noted in a :class:`DiskLog` as it runs."""
    log = DiskLog()
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        log.events.append(("sync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")))
        return real_fsync(fd)

    def renamer(real):
        def rename(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            log.events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return log


def test_a_file_written_whole_is_on_the_disk_before_its_name(disk, tmp_path):
    """write_whole renamed a file whose bytes were only in the page cache: a power cut after the rename left the
    name on an empty file (a report, a heatmap, a stored picture a record already named)."""
    target = tmp_path / "report.json"
    write_whole(target, b'{"auroc": 0.99}')
    assert target.read_bytes() == b'{"auroc": 0.99}'
    tmp = disk.rename_source(target)
    assert tmp.parent == tmp_path and tmp != target
    assert disk.synced_before(tmp, target)
    assert disk.dir_synced_after(target)


def test_a_stored_picture_is_on_the_disk_before_the_record_that_names_it(disk, tmp_path):
    """The recorder stores a part's pictures, then commits the record naming them: a picture still in the page
    cache at a power cut came back empty under a name the record said was stored."""
    data = png_bytes(textured_part(np.random.default_rng(0), 32, 32))
    files = FileStore(tmp_path)
    key = files.put(data, "png", hold=True)
    target = files.path(key)
    assert disk.synced_before(disk.rename_source(target), target)
    assert disk.dir_synced_after(target)


@pytest.mark.parametrize("left", [b"", b"\x89PNG\r\n", "zeros", "zeros at its end"])
def test_a_picture_a_power_cut_cut_short_is_written_again(tmp_path, left):
    """A picture a power cut left short under its key (written by a release that did not sync it first) was only
    touched when the same photo came again: every later record of it served the broken file. So was one of the
    right size and all zeros (XFS logs a file's size before its data is down), which a look at its size let by."""
    data = png_bytes(textured_part(np.random.default_rng(1), 32, 32))
    if left == "zeros":
        left = bytes(len(data))
    elif left == "zeros at its end":  # its last blocks' data not yet down
        left = data[:-100] + bytes(100)
    files = FileStore(tmp_path)
    key = f"{hashlib.sha256(data).hexdigest()[:2]}/{hashlib.sha256(data).hexdigest()}.png"
    files.path(key).parent.mkdir(parents=True)
    files.path(key).write_bytes(left)
    assert files.put(data, "png") == key
    assert files.read(key) == data
    assert files.restore({key: data}) == set() and files.read(key) == data


def test_sqlite_records_sync_their_log_at_every_commit(tmp_path):
    """WAL with synchronous=NORMAL syncs the log only at checkpoints: a power cut rolled back every commit since
    the last one (reviews an operator was told were saved). FULL syncs it at each commit."""
    store = RecordStore.open(None, tmp_path / "data")
    try:
        store.upgrade()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        store.close()


def test_a_saved_model_is_on_the_disk_before_its_name_and_the_version_it_replaced_after(disk, fitted_model, tmp_path):
    """A save's files, and its directory's entries, are synced before the rename that makes them the model, and the
    model directory after it, as the one archived: a power cut leaves the previous model or the new one whole."""
    path = fitted_model.save(tmp_path / "m")
    disk.events.clear()
    fitted_model.save(path, keep_versions=2)
    written = disk.rename_source(path)
    assert written.parent == tmp_path and written != path
    for f in path.iterdir():
        assert disk.synced_before(written / f.name, path), f.name
    assert disk.synced_before(written, path)  # its entries
    assert disk.dir_synced_after(path)
    from anomaly_service.artifact import versions_dir

    archived = [Path(e[2]) for e in disk.events if e[0] == "rename" and Path(e[2]).parent == versions_dir(path)]
    assert archived and disk.dir_synced_after(archived[0])


def test_a_models_backup_is_on_the_disk_before_it_replaces_the_earlier_one(disk, fitted_model, tmp_path):
    """The backup's files were copied into the page cache and renamed into place: a power cut after the command
    said done left files of no bytes in it (and the earlier backup it replaced was deleted)."""
    models, out = tmp_path / "models", tmp_path / "backup"
    fitted_model.save(models / "part")
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 0, run.output
    partial = disk.rename_source(out)
    copied = [p for p in out.rglob("*") if p.is_file()]
    assert copied
    for f in copied:
        assert disk.synced_before(partial / f.relative_to(out), out), f
    assert disk.synced_before(partial / "part", out)  # the directories' entries too
    assert disk.dir_synced_after(out)


def test_a_records_backup_and_its_name_are_on_the_disk_when_it_says_done(disk, tmp_path):
    """The copy was synced but not the rename that put it in place: a power cut took back the backup the command
    reported (and a restore's renames likewise)."""
    data, out = tmp_path / "data", tmp_path / "backups" / "records.db"
    store = RecordStore.open(None, data)
    store.upgrade()
    store.close()
    run = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert disk.synced_before(disk.rename_source(out), out)
    assert disk.dir_synced_after(out)
    run = CliRunner().invoke(cli, ["db", "restore", "--from", str(out), "--data-dir", str(data)])
    assert run.exit_code == 0, run.output
    assert disk.dir_synced_after(data / "records.db")


def test_a_new_change_log_and_its_folders_are_named_on_the_disk(disk, tmp_path):
    """The first entry of a model's change log was synced, but not the names of the new file and the folders made
    for it: a power cut could keep the entry's bytes under no name, and the audit of the first fit was gone."""
    from anomaly_service import model_history

    models = tmp_path / "models"
    models.mkdir()
    assert model_history.record(models / "part", "fit", "v1", None, by="qa") is not None
    log = model_history.history_path(models / "part")
    syncs = [e[1] for e in disk.events if e[0] == "sync"]
    assert syncs.index(str(log)) < syncs.index(str(log.parent))
    assert str(log.parent.parent) in syncs and str(models) in syncs  # the folders .versions/part were made
