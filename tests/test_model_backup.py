"""``anomaly models backup``: a copy of the model directory, taken while updates and rollbacks go on, that loads on a
new host with every archived version and the change log."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from anomaly_service import AnomalyModel
from anomaly_service.artifact import list_versions, model_lock, model_version_id, read_artifact, rollback
from anomaly_service.cli import app as cli
from anomaly_service.dir_lock import BACKUP_LOCK
from anomaly_service.model_backup import MARK
from anomaly_service.registry import ModelRegistry
from conftest import as_other_user, cli_under_flock, flock_held_elsewhere, mounted, write_manifest


def _two_versions(fitted_model, model_dir: Path) -> tuple[str, str]:
    """The session model saved as ``part`` twice: an earlier version archived, a later one current."""
    path = fitted_model.save(model_dir / "part")
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = "2020-01-01T00:00:00+00:00"
    write_manifest(path, m)
    earlier = model_version_id(path)
    fitted_model.save(path, keep_versions=3)
    return earlier, model_version_id(path)


def test_a_backup_waits_for_an_update_under_way_and_copies_one_whole_version(fitted_model, tmp_path):
    """A file tool copying the store while an update swapped a model in took the manifest of one version and the
    arrays of the other: the copy did not load on the new host. The backup takes the lock every save holds, so it
    copies the model before or after the save, never across it."""
    models, out = tmp_path / "models", tmp_path / "backup"
    earlier, current = _two_versions(fitted_model, models)
    result: dict = {}
    with model_lock(models / "part"):  # an update under way
        runner = threading.Thread(target=lambda: result.setdefault(
            "run", CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])))
        runner.start()
        runner.join(1.0)
        assert runner.is_alive() and not out.exists()  # waits for the save
        rollback(models / "part", earlier, keep_versions=3)  # the save it waits for: the files change now
    runner.join(60)
    run = result["run"]
    assert run.exit_code == 0, run.output
    # said, not a backup standing still unsaid behind a long update
    assert "waiting: part is being changed (an update, a rollback or a fit holds its write lock)" in run.output
    assert f"part: version {earlier}, 1 archived" in run.output
    read_artifact(out / "part")  # whole: every file of the version its manifest names
    assert model_version_id(out / "part") == earlier
    assert [v["id"] for v in list_versions(out / "part")] == [earlier, current]
    assert AnomalyModel.load(out / "part").version_id_ == earlier
    assert not list(tmp_path.glob(".backup.*"))  # nothing left beside it


def test_a_backup_restores_on_another_path_and_rolls_back_there(fitted_model, tmp_path):
    """The backup is a model directory: served and rolled back from wherever it is put, with its change log."""
    models = tmp_path / "old-host" / "models"
    earlier, current = _two_versions(fitted_model, models)
    (models / ".versions" / "part" / "history.jsonl").write_text('{"action": "fit"}\n')
    (models / "part.README").write_text("line 3")
    first = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(tmp_path / "b")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output  # an earlier backup at that path is replaced once the new one is whole
    new_home = tmp_path / "new-host" / "srv"
    new_home.mkdir(parents=True)
    (tmp_path / "b").rename(new_home / "models")
    assert (new_home / "models" / ".versions" / "part" / "history.jsonl").read_text() == '{"action": "fit"}\n'
    assert (new_home / "models" / "part.README").read_text() == "line 3"
    rollback(new_home / "models" / "part", earlier)
    assert model_version_id(new_home / "models" / "part") == earlier
    assert current in [v["id"] for v in list_versions(new_home / "models" / "part")]


def test_a_backup_into_the_model_directory_or_of_none_is_refused(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    inside = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(models / "b")])
    assert inside.exit_code == 2 and "inside the model directory" in inside.output
    missing = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(tmp_path / "no"), "--out",
                                       str(tmp_path / "b")])
    assert missing.exit_code == 2 and "no model directory" in missing.output


def test_a_backup_never_replaces_a_directory_that_is_no_earlier_backup(fitted_model, tmp_path):
    """The backup replaces ``--out`` whole: given the model directory's parent (``--out /srv`` for /srv/models) it
    deleted the models and the records beside them, and given a stick's mount point all the stick held. Only a
    new or empty directory, or an earlier backup, is replaced."""
    srv = tmp_path / "srv"
    models = srv / "models"
    fitted_model.save(models / "part")
    (srv / "data").mkdir()
    (srv / "data" / "records.db").write_text("the plant's records")
    stick = tmp_path / "usb"
    stick.mkdir()
    (stick / "notes.txt").write_text("kept")
    for out in (srv, stick):
        run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
        assert run.exit_code == 2 and run.output.startswith("error: ") and str(out) in run.output, run.output
    assert (srv / "data" / "records.db").read_text() == "the plant's records" and (models / "part").is_dir()
    assert (stick / "notes.txt").read_text() == "kept" and not (stick / "part").exists()
    assert [p.name for p in tmp_path.glob(".*")] == [BACKUP_LOCK]  # no partial copy left beside either
    (stick / "empty").mkdir()
    for _ in range(2):  # an empty directory, then the backup made there
        run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(stick / "empty")])
        assert run.exit_code == 0, run.output
        read_artifact(stick / "empty" / "part")


def test_a_model_a_dead_host_left_between_a_saves_renames_is_backed_up_and_comes_back(fitted_model, tmp_path):
    """Power lost between a save's two renames leaves no model at its name, only the copy set aside: a backup of
    that disk kept it, and the service loading the restored store puts it back, as the old host's would have."""
    models = tmp_path / "models"
    earlier, _ = _two_versions(fitted_model, models)
    version = model_version_id(models / "part")
    (models / "part").rename(models / ".part.old-0dead000")
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(tmp_path / "b")])
    assert run.exit_code == 0, run.output
    assert "part: no current version, 1 archived, 1 set aside by a save that died" in run.output
    registry = ModelRegistry(tmp_path / "b", device="cpu")
    registry.load_all()
    assert registry.get("part").model.version_id_ == version
    assert model_version_id(tmp_path / "b" / "part") == version
    assert earlier in [v["id"] for v in list_versions(tmp_path / "b" / "part")]


def test_a_backup_to_a_full_disk_says_so_once_and_keeps_the_earlier_one(fitted_model, tmp_path):
    """A disk that fills during the copy: one reason, not shutil's list of every file with its error twice (a line
    per file of every model and version), and the earlier backup there is kept, nothing left beside it."""
    models = tmp_path / "models"
    for name in ("part", "other"):
        fitted_model.save(models / name)
    with mounted(tmp_path / "disk", "2m") as disk:
        first = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(disk / "b")])
        assert first.exit_code == 0, first.output
        (models / "part" / "notes.txt").write_bytes(bytes(600 * 1024))  # the next copy does not fit beside it
        run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(disk / "b")])
        assert run.exit_code == 2 and len(run.output.splitlines()) == 1, run.output
        assert "No space left on device" in run.output and run.output.count("No space") == 1, run.output
        assert "nothing was replaced" in run.output and len(run.output) < 400, run.output
        read_artifact(disk / "b" / "part")
        assert _listed(disk) == ["b"]


def _killed_waiting(models: Path, out: Path) -> None:
    """A real ``models backup`` process, SIGKILLed once it has begun its copy (it waits for the model's lock, which
    the caller holds: an update under way)."""
    partials = f"{glob.escape('.' + out.name)}.partial-*"
    before = set(out.parent.glob(partials))
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "models", "backup", "--model-dir",
                             str(models), "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not {p.parent for p in out.parent.glob(f"{partials}/{MARK}")} - before \
                and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["models", "models[A]"])
def test_what_a_killed_backup_leaves_is_cleared_by_the_next_and_the_earlier_one_put_back(fitted_model, tmp_path,
                                                                                        name):
    """A backup killed during its copy left its partial copy of every model and version beside ``--out``, and each
    backup killed after it another: nothing removed them and the backups' volume filled. One killed between its
    two renames left no backup at ``--out``: the next one puts the earlier one back before it copies. Leftovers
    were found by a pattern made of ``--out``'s name: ``models[A]`` matched ``.modelsA.partial-*``, never its own,
    and those stayed however many backups ran after the kill."""
    models, out = tmp_path / "models", tmp_path / "backups" / name
    fitted_model.save(models / "part")
    first = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert first.exit_code == 0, first.output
    with model_lock(models / "part"):
        _killed_waiting(models, out)
    assert len(_listed(out.parent)) == 2  # the earlier backup and what the kill left
    out.rename(out.parent / f".{name}.replaced-0dead000")  # a backup killed between its renames
    with model_lock(models / "part"):
        _killed_waiting(models, out)
    read_artifact(out / "part")  # the earlier backup is back at --out, though this one too was killed
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 0, run.output
    read_artifact(out / "part")
    assert _listed(out.parent) == [name]


def test_a_backup_to_a_symlinked_out_goes_where_the_link_points(fitted_model, tmp_path):
    """``--out`` a link to the backups' volume (``/srv/backup/current`` to a NAS): the link was renamed aside and the
    backup written beside it, on the link's volume, and every later backup said it removed that link, which stayed."""
    models, nas, local = tmp_path / "models", tmp_path / "nas", tmp_path / "local"
    fitted_model.save(models / "part")
    (nas / "backup").mkdir(parents=True)
    local.mkdir()
    (local / "current").symlink_to(nas / "backup")
    for _ in range(2):
        run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(local / "current")])
        assert run.exit_code == 0 and "removed" not in run.output, run.output
        assert [p.name for p in local.iterdir()] == ["current"] and (local / "current").is_symlink()
        read_artifact(nas / "backup" / "part")
        assert _listed(nas) == ["backup"]


def test_a_backup_leaves_what_backups_to_another_out_left(fitted_model, tmp_path):
    """Leftovers were found by a pattern that also matched those of an ``--out`` whose name begins with this one's
    and a leftover's mark: the first backup to ``nightly`` put back the earlier backup of ``nightly.replaced-2``,
    which one killed between its renames had set aside, as its own, and then replaced it: that backup was gone."""
    models, backups = tmp_path / "models", tmp_path / "backups"
    fitted_model.save(models / "part")

    def backup(out: str) -> None:
        run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(backups / out)])
        assert run.exit_code == 0, run.output

    backup("nightly.replaced-2")
    (backups / "nightly.replaced-2").rename(backups / ".nightly.replaced-2.replaced-0dead000")  # killed there
    backup("nightly")
    assert _listed(backups) == [".nightly.replaced-2.replaced-0dead000", "nightly"]
    backup("nightly.replaced-2")  # its own next backup settles it
    assert _listed(backups) == ["nightly", "nightly.replaced-2"]


def _dated(fitted_model, path: Path, year: str) -> str:
    """The session model saved at ``path`` as a version of ``year``, distinct from every other; returns its id."""
    fitted_model.save(path)
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = f"{year}-01-01T00:00:00+00:00"
    write_manifest(path, m)
    return model_version_id(path)


@pytest.mark.parametrize("name, other", [("a[bc]", "ab"), ("m", "m.old-1")])
def test_each_models_set_aside_copy_is_backed_up_as_its_own(fitted_model, tmp_path, name, other):
    """Each model's copies a dead save left aside were found by a pattern made of its name: ``a[bc]`` (a name
    ``anomaly fit --out`` takes, with a warning) copied ``ab``'s as its own, its verify archived it as a version
    of ``a[bc]``, and ``a[bc]``'s own copy was left out of the backup; ``m`` likewise took ``m.old-1``'s."""
    models, out = tmp_path / "models", tmp_path / "b"
    fitted_model.save(models / name)
    mine, version = (_dated(fitted_model, tmp_path / when, when) for when in ("2020", "2021"))
    shutil.copytree(tmp_path / "2020", models / f".{name}.old-0dead000")  # killed after its swap
    theirs = shutil.copytree(tmp_path / "2021", models / other)
    theirs.rename(models / f".{other}.old-cafe0000")  # killed between its renames
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert f"{name}: version {model_version_id(models / name)}, 0 archived, 1 set aside" in run.output
    assert f"{other}: no current version, 0 archived, 1 set aside" in run.output
    # the backup holds what it says, as it was: its verification had archived the copy set aside beside a model
    assert (out / f".{name}.old-0dead000").is_dir() and not (out / ".versions" / name).exists()
    assert model_version_id(out / other) == version  # the restored store puts each back, or archives it, as its own
    kept = [v["id"] for v in list_versions(out / name)]
    assert mine in kept and version not in kept


def test_a_backup_waits_for_one_under_way_into_the_same_folder(fitted_model, tmp_path, caplog):
    """Two backups to one ``--out`` (the nightly one and one by hand): the second's clean-up took the first's partial
    copy, made but not yet locked, for a killed backup's and removed it under it. A backup now waits, and says so,
    for one under way into the same folder."""
    models, out = tmp_path / "models", tmp_path / "usb" / "nightly"
    fitted_model.save(models / "part")
    out.parent.mkdir()
    partial = out.parent / ".nightly.partial-0dead000"
    result: dict = {}
    with flock_held_elsewhere(out.parent / BACKUP_LOCK):  # the first, under way
        partial.mkdir()  # the first's copy, made the moment before it locks it
        runner = threading.Thread(target=lambda: result.setdefault(
            "run", CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])))
        runner.start()
        runner.join(3.0)
        assert runner.is_alive() and partial.is_dir()  # waits; the first's copy is left to it
        assert "models backup: another backup into" in caplog.text
    # the first ends (here: dies, its copy left)
    runner.join(60)
    assert result["run"].exit_code == 0, result["run"].output
    read_artifact(out / "part")
    assert not partial.exists()  # a dead backup's copy: cleared by the next


def _listed(folder: Path) -> list[str]:
    """What ``folder`` holds, by name, beside the lock file backups into it take turns on."""
    return sorted(p.name for p in folder.iterdir() if p.name != BACKUP_LOCK)


def test_a_backup_run_under_flock_on_its_folder_ends(fitted_model, tmp_path):
    """A cron line that keeps its jobs apart with ``flock FOLDER anomaly models backup --out FOLDER/x``: the backup
    took the folder's own flock, which ``flock`` holds until the backup exits, and waited for it for ever."""
    models, out = tmp_path / "models", tmp_path / "usb" / "nightly"
    fitted_model.save(models / "part")
    out.parent.mkdir()
    done = cli_under_flock(out.parent, "models", "backup", "--model-dir", str(models), "--out", str(out))
    assert done.returncode == 0, done.stderr
    read_artifact(out / "part")


def test_a_link_inside_a_model_directory_is_left_out_of_the_backup(fitted_model, tmp_path, caplog):
    """A model directory copied in from elsewhere with a symbolic link in it (to ``/``, to a share): the backup's
    copy followed it and copied all it names. No save writes a link: it is left out, and said."""
    models, out, elsewhere = tmp_path / "models", tmp_path / "b", tmp_path / "elsewhere"
    earlier, _ = _two_versions(fitted_model, models)
    (elsewhere / "deep").mkdir(parents=True)
    (elsewhere / "deep" / "secret.bin").write_bytes(b"not the model's")
    (models / "part" / "everything").symlink_to(elsewhere)
    (models / ".versions" / "part" / earlier / "more").symlink_to(elsewhere)
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert not list(out.rglob("secret.bin"))
    assert "left out" in caplog.text and "everything" in caplog.text
    read_artifact(out / "part")
    assert earlier in [v["id"] for v in list_versions(out / "part")]


def test_a_backup_by_an_account_that_only_reads_the_models_waits_for_an_update_too(fitted_model, tmp_path):
    """The service's user owns the models; a backup account may read them, not write them. The write lock's check
    that the directory takes writes said no to that account, and the backup copied without the lock, across an
    update under way. It now holds the saves' lock file shared through a read-only descriptor."""
    prefix = as_other_user(tmp_path)
    models, out = tmp_path / "models", tmp_path / "backup"
    earlier, current = _two_versions(fitted_model, models)
    with model_lock(models / "part"):  # its lock file made, as the service's first save makes it
        pass
    for path in [models, *models.rglob("*")]:
        if path.name != ".part.lock":
            os.chown(path, 65534, 65534)  # the service's user's: readable, not writable, by the backup
    with model_lock(models / "part"):  # the service's update under way
        backup = subprocess.Popen([*prefix, sys.executable, "-m", "anomaly_service.cli", "models", "backup",
                                   "--model-dir", str(models), "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert backup.stderr is not None
            said = backup.stderr.readline()  # the backup's first word; one that copied at once said none
            assert said.startswith("waiting: part is being changed"), said + backup.stderr.read()
            assert backup.poll() is None and not out.exists()
            rollback(models / "part", earlier, keep_versions=3)  # the save it waits for: the files change now
        except BaseException:
            backup.kill()
            raise
    stdout, stderr = backup.communicate(timeout=120)
    assert backup.returncode == 0, stdout + stderr
    assert f"part: version {earlier}, 1 archived" in stdout
    read_artifact(out / "part")
    assert model_version_id(out / "part") == earlier
    assert [v["id"] for v in list_versions(out / "part")] == [earlier, current]


def test_a_model_gone_bad_in_the_store_never_replaces_the_backup_whose_copy_of_it_verifies(fitted_model, tmp_path):
    """A model file truncated in the store (a disk's error, a copy by hand cut short): the night's backup said so
    and exit 1, but had already replaced the last backup, whose copy of that model was the plant's only good one."""
    models, out = tmp_path / "models", tmp_path / "backup"
    fitted_model.save(models / "part")
    version = model_version_id(models / "part")
    backup = ["models", "backup", "--model-dir", str(models), "--out", str(out)]
    assert CliRunner().invoke(cli, backup).exit_code == 0
    arrays = models / "part" / "arrays.npz"
    whole = arrays.read_bytes()
    arrays.write_bytes(whole[: len(whole) // 2])
    bad = CliRunner().invoke(cli, backup)
    assert bad.exit_code == 1, bad.output
    assert "arrays.npz is truncated or altered" in bad.output
    assert f"warning: {out} is kept as it was, not replaced" in bad.output
    read_artifact(out / "part")  # the good copy, still there
    assert model_version_id(out / "part") == version
    beside = tmp_path / "backup.unverified"
    assert f"this backup is {beside}" in bad.output and (beside / "part").is_dir()
    again = CliRunner().invoke(cli, backup)  # the next night's, the store still bad: the good one still kept
    assert again.exit_code == 1 and f"{out} is kept as it was" in again.output
    read_artifact(out / "part")
    arrays.write_bytes(whole)  # the model put right: a backup that verifies replaces it and removes the one beside
    fixed = CliRunner().invoke(cli, backup)
    assert fixed.exit_code == 0, fixed.output
    read_artifact(out / "part")
    assert not beside.exists()


def test_a_backup_whose_earlier_copy_was_bad_too_replaces_it(fitted_model, tmp_path):
    # broken in the store since before the earlier backup: nothing better is kept by not replacing it
    models, out = tmp_path / "models", tmp_path / "backup"
    fitted_model.save(models / "part")
    (models / "part" / "arrays.npz").write_bytes(b"")
    backup = ["models", "backup", "--model-dir", str(models), "--out", str(out)]
    assert CliRunner().invoke(cli, backup).exit_code == 1
    (models / "notes.txt").write_text("new")
    second = CliRunner().invoke(cli, backup)
    assert second.exit_code == 1 and "kept as it was" not in second.output
    assert (out / "notes.txt").read_text() == "new" and not (tmp_path / "backup.unverified").exists()


def test_a_model_whose_manifest_does_not_read_is_copied_as_it_is_and_the_others_backed_up(fitted_model, tmp_path):
    """One model's manifest gone bad (cut short, edited) ended the whole backup with exit 2, naming the copy's
    temporary path: not one model of the store was backed up that night."""
    models, out = tmp_path / "models", tmp_path / "backup"
    fitted_model.save(models / "good")
    fitted_model.save(models / "bad")
    (models / "bad" / "manifest.json").write_text('{"cut sh')
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 1, run.output
    assert "bad: a current version this release does not read (copied as it is)" in run.output
    assert "warning: does not verify in" in run.output and "manifest.json is corrupt" in run.output
    assert ".partial-" not in run.output
    read_artifact(out / "good")
    assert (out / "bad" / "manifest.json").read_text() == '{"cut sh'
    assert not list(tmp_path.glob(".backup.*"))


def test_a_model_of_an_option_this_release_removed_does_not_stop_the_backup(tmp_path):
    # an older artifact the service refuses (fitted with image_score=reweighted): the rest of the store is backed up
    legacy = Path(__file__).parent / "data" / "legacy_v1"
    models, out = tmp_path / "models", tmp_path / "backup"
    for name in ("default", "image_score_reweighted"):
        shutil.copytree(legacy / name, models / name)
    run = CliRunner().invoke(cli, ["models", "backup", "--model-dir", str(models), "--out", str(out)])
    assert run.exit_code == 1, run.output
    assert "image_score_reweighted: a current version this release does not read (copied as it is)" in run.output
    assert "image_score=reweighted, which this release no longer offers" in run.output
    read_artifact(out / "default")
