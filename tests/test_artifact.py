import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from anomaly_service import AnomalyModel, ModelFormatError
from anomaly_service import artifact
from conftest import flock_held_elsewhere, write_manifest


def service_rescan(directory: Path) -> list[str]:
    """What a service's re-scan does with what saves left (registry.py, each model within its own bound): every
    model listed by its leftovers, settled; the models put back."""
    return [name for name in artifact.leftover_names(directory) if artifact.recover_model(directory, name)]


@pytest.fixture
def saved(fitted_model, tmp_path):
    return fitted_model.save(tmp_path / "model")


def test_truncated_and_corrupt_files_are_detected(saved):
    data = (saved / "index.faiss").read_bytes()
    (saved / "index.faiss").write_bytes(data[: len(data) // 2])
    # each message by its sentence: "truncated" and "corrupt" alone are found in the test's own directory's name
    with pytest.raises(ModelFormatError, match=rf"index\.faiss is truncated or altered: {len(data) // 2} bytes, "
                                               rf"manifest says {len(data)}"):
        AnomalyModel.load(saved)
    (saved / "index.faiss").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ModelFormatError, match=r"index\.faiss is corrupt: its SHA-256 does not match the manifest"):
        AnomalyModel.load(saved)


def test_a_model_cloned_without_its_git_lfs_files_is_named_so(saved):
    """A model kept in Git with LFS and cloned without it holds small text pointers in its files' places: each is
    named as a pointer, with what to do, not only as a file of the wrong size or a manifest that is not JSON."""
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 155693\n").encode()
    (saved / "index.faiss").write_bytes(pointer)
    with pytest.raises(ModelFormatError, match=r"index\.faiss: it is a Git LFS pointer.*git lfs pull"):
        AnomalyModel.load(saved)
    (saved / "manifest.json").write_bytes(pointer)
    with pytest.raises(ModelFormatError, match=r"manifest\.json .*Git LFS pointer"):
        AnomalyModel.load(saved)


def test_missing_files_and_bad_manifest(saved, tmp_path):
    with pytest.raises(ModelFormatError, match="no model"):
        AnomalyModel.load(tmp_path / "nothing")
    (saved / "arrays.npz").unlink()
    # the sentence, not a word: "missing" alone matched the test's own temporary directory in every message
    with pytest.raises(ModelFormatError, match="is incomplete: arrays.npz is missing"):
        AnomalyModel.load(saved)
    (saved / "manifest.json").write_text("{ not json")
    with pytest.raises(ModelFormatError, match="corrupt"):
        AnomalyModel.load(saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        AnomalyModel.load(saved)


def test_an_altered_manifest_is_refused_and_one_without_a_checksum_loads(saved):
    """The files' checksums live in the manifest, so it carries its own: a flipped digit in the threshold would
    otherwise load and change every decision. Manifests from before the checksum have none and load as before."""
    from anomaly_service.manifest import DIGEST_KEY

    text = (saved / "manifest.json").read_text()
    m = json.loads(text)
    assert len(m[DIGEST_KEY]) == 64
    threshold = repr(m["calibration"]["threshold"])
    (saved / "manifest.json").write_text(text.replace(threshold, "9" + threshold, 1))
    with pytest.raises(ModelFormatError, match="altered or is corrupt"):
        AnomalyModel.load(saved)
    m["format_version"] = True  # equals 1 in Python, and is still not a format version
    write_manifest(saved, m)
    with pytest.raises(ModelFormatError, match="version True"):
        AnomalyModel.load(saved)
    m["format_version"] = 1
    del m[DIGEST_KEY], m["format_revision"]
    write_manifest(saved, m, sign=False)  # as releases before the checksum wrote it
    AnomalyModel.load(saved)


def test_a_manifest_of_a_revision_that_always_carries_its_checksum_is_refused_without_it(saved):
    """With the checksum deleted, an edited threshold loaded silently through the path kept for models from before
    the checksum. Every manifest of the revision that writes it must carry it; older revisions still load."""
    from anomaly_service.manifest import DIGEST_KEY

    m = json.loads((saved / "manifest.json").read_text())
    del m[DIGEST_KEY]
    m["calibration"]["threshold"] *= 10
    write_manifest(saved, m, sign=False)
    with pytest.raises(ModelFormatError, match=rf"{saved}: manifest.json has no checksum \({DIGEST_KEY}\).*"
                                               "format revision 2"):
        AnomalyModel.load(saved)
    with pytest.raises(ModelFormatError, match="has no checksum"):
        artifact.list_versions(saved)  # every reader refuses it, not the loader alone
    for revision in ("2", 2.0, True, None):  # a revision that is no whole number is no older revision
        m["format_revision"] = revision
        write_manifest(saved, m, sign=False)
        with pytest.raises(ModelFormatError, match="has no checksum"):
            AnomalyModel.load(saved)


def test_a_model_saved_again_is_written_in_the_revision_that_carries_the_checksum(saved, tmp_path):
    """An update or re-save of a model from before the checksum writes the checksum, so it says the revision that
    promises one: deleting the checksum of the copy is then refused too."""
    from anomaly_service.manifest import DIGEST_KEY

    m = json.loads((saved / "manifest.json").read_text())
    del m[DIGEST_KEY], m["format_revision"]
    write_manifest(saved, m, sign=False)
    again = AnomalyModel.load(saved).save(tmp_path / "again")
    m = json.loads((again / "manifest.json").read_text())
    assert (m["format_version"], m.get("format_revision")) == (1, 2) and len(m[DIGEST_KEY]) == 64


def test_incompatible_version_is_explained(saved):
    m = json.loads((saved / "manifest.json").read_text())
    m["format_version"] = 99
    write_manifest(saved, m)
    with pytest.raises(ModelFormatError, match="version 99.*Re-fit"):
        AnomalyModel.load(saved)


def test_crash_mid_save_keeps_the_good_model(fitted_model, saved, monkeypatch):
    before = (saved / "manifest.json").read_bytes()
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_swap(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after the old model moved aside, before the new one is in place
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="cannot write the model .*simulated crash.*unchanged"):
        fitted_model.save(saved)
    monkeypatch.undo()
    assert (saved / "manifest.json").read_bytes() == before
    AnomalyModel.load(saved)
    # nothing of the save is left beside it but its swap lock (an empty file that stays, as the write lock does)
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".model.")] == [".model.swap-lock"]


def test_refuses_to_overwrite_a_non_model_directory(fitted_model, tmp_path):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "keep.png").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="not a model directory"):
        fitted_model.save(victim)
    assert (victim / "keep.png").exists()


def test_normalization_comes_from_the_manifest(saved):
    """A model keeps the input normalization it was fitted with, even if a backbone's default changes later."""
    m = json.loads((saved / "manifest.json").read_text())
    m["preprocessing"]["mean"], m["preprocessing"]["std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    write_manifest(saved, m)
    assert AnomalyModel.load(saved).preprocessing.mean == (0.5, 0.5, 0.5)
    m["preprocessing"]["std"] = [0.5, 0.0]
    write_manifest(saved, m)
    with pytest.raises(ModelFormatError, match="preprocessing.std"):
        AnomalyModel.load(saved)


def test_manifest_from_before_layer_balance_loads_unbalanced(saved):
    """Models fitted before the option existed used unbalanced layers; the new default must not re-weigh them."""
    assert AnomalyModel.load(saved).config.layer_balance is True  # today's default is saved explicitly
    m = json.loads((saved / "manifest.json").read_text())
    del m["config"]["layer_balance"]
    write_manifest(saved, m)
    assert AnomalyModel.load(saved).config.layer_balance is False


def test_a_save_after_one_that_died_between_its_renames_archives_the_model_it_set_aside(fitted_model, tmp_path):
    """A save killed after the old model moved aside: the next save puts it back first and archives it as the
    version it replaces, where a rollback finds it; it used to be deleted as a stale copy."""
    from anomaly_service.artifact import list_versions

    path = fitted_model.save(tmp_path / "m")
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = "2020-01-01T00:00:00+00:00"  # a distinct earlier version
    write_manifest(path, m)
    earlier = list_versions(path)[0]["id"]
    os.replace(path, path.parent / ".m.old-0dead000")  # what a crash between the two renames leaves
    (path.parent / ".m.tmp-0dead000").mkdir()  # and its half-written copy, from long ago
    os.utime(path.parent / ".m.tmp-0dead000", (0, 0))
    fitted_model.save(path, keep_versions=3)
    versions = list_versions(path)
    assert [v["id"] for v in versions[1:]] == [earlier] and versions[0]["id"] != earlier
    assert [p.name for p in tmp_path.glob(".m.*")] == [".m.swap-lock"]


def _earlier_version(fitted_model, path) -> str:
    """Save the model at ``path`` as a version of its own (an earlier creation time); returns its id."""
    path = fitted_model.save(path)
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = "2020-01-01T00:00:00+00:00"
    write_manifest(path, m)
    return artifact.model_version_id(path)


def _save_version(fitted_model, path, created_at: str, keep: int) -> str:
    """Save the model at ``path`` (archiving the one there) as a version made at ``created_at``; returns its id."""
    fitted_model.save(path, keep_versions=keep)
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = created_at
    write_manifest(path, m)
    return artifact.model_version_id(path)


def test_a_save_after_the_clock_stepped_back_keeps_the_version_it_replaced(fitted_model, tmp_path, monkeypatch):
    """Archived versions were pruned by their archive times, the clock's: after the clock stepped back (a host a
    year ahead, corrected), the ones archived before the step were stamped ahead of it, every version archived
    after looked the oldest, and each save's own prune deleted the version it had just replaced, the one its
    rollback needs. The archive's stamps only grow now."""
    path = tmp_path / "m"
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 365 * 86400 * 10**9)  # a host a year ahead
    first = _save_version(fitted_model, path, "2026-01-01T00:00:00+00:00", keep=2)
    second = _save_version(fitted_model, path, "2026-01-02T00:00:00+00:00", keep=2)
    third = _save_version(fitted_model, path, "2026-01-03T00:00:00+00:00", keep=2)  # archives the first two ahead
    monkeypatch.setattr(time, "time_ns", real_ns)
    fitted_model.save(path, keep_versions=2)  # the clock put right: this save archives the third version
    assert sorted(v["id"] for v in artifact.list_versions(path)[1:]) == sorted([second, third])
    artifact.rollback(path, third, keep_versions=2)
    assert artifact.model_version_id(path) == third
    assert first not in [v["id"] for v in artifact.list_versions(path)]


def _archived_in_order(fitted_model, path, n: int = 4) -> list[str]:
    """Save ``n`` + 1 versions at ``path`` keeping all; returns the archived ids, the most recently archived first.
    Their ids' times run backwards (made on hosts whose clocks disagree), so no order by name is theirs."""
    made = [_save_version(fitted_model, path, f"2026-01-{20 - day:02d}T00:00:00+00:00", keep=10)
            for day in range(n + 1)]
    archived = made[-2::-1]
    assert [v["id"] for v in artifact.list_versions(path)[1:]] == archived
    return archived


def _prune_and_roll_back(fitted_model, copy, archived: list[str]) -> None:
    """In a copied model folder: listed in the order archived, a save's prune keeps the newest, and a rollback
    to the version served before the current works and can be undone."""
    current = artifact.model_version_id(copy)
    assert [v["id"] for v in artifact.list_versions(copy)] == [current, *archived]
    fitted_model.save(copy, keep_versions=2)  # archives `current`; keeps it and the newest archived before it
    assert [v["id"] for v in artifact.list_versions(copy)[1:]] == [current, archived[0]]
    saved = artifact.model_version_id(copy)
    artifact.rollback(copy, archived[0], keep_versions=2)  # the version it replaces leads the archive
    assert [v["id"] for v in artifact.list_versions(copy)] == [archived[0], saved, current]


def test_a_model_folder_copied_without_its_file_times_keeps_its_versions_order(fitted_model, tmp_path):
    """Which version is newest, which the prune deletes and which a rollback wants were read from each archived
    directory's time: a copy that drops file times (cp -r, scp -r, an unzip, a Windows share) gave each version the
    time of its copy, in whatever order the tool walked the folder, and the prune then deleted the newest versions
    and kept the oldest. The order is recorded in each archived version now (archived.json)."""
    path = tmp_path / "models" / "m"
    archived = _archived_in_order(fitted_model, path)
    copy = tmp_path / "copy" / "models"
    shutil.copytree(path.parent, copy)
    root = artifact.versions_dir(copy / "m")
    for i, vid in enumerate(archived):  # as a copy that walked the folder oldest last stamps them
        os.utime(root / vid, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    _prune_and_roll_back(fitted_model, copy / "m", archived)


def test_versions_copied_one_by_one_with_cp_r_keep_their_order(fitted_model, tmp_path):
    """A real copy without times (``cp -r``; ``shutil.copytree`` keeps a directory's times whatever it copies
    files with), version by version in an order unlike the archive's: each copy's directory has the time it was
    written."""
    path = tmp_path / "models" / "m"
    archived = _archived_in_order(fitted_model, path)
    copy = tmp_path / "copy" / "m"
    root = artifact.versions_dir(copy)
    root.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(path), str(copy)], check=True)
    for vid in archived:  # the newest first: it gets the oldest time
        subprocess.run(["cp", "-r", str(artifact.versions_dir(path) / vid), str(root / vid)], check=True)
        time.sleep(0.02)  # a file system's time steps apart
    assert sorted(archived, key=lambda v: (root / v).stat().st_mtime_ns) == archived  # reversed by the copy
    _prune_and_roll_back(fitted_model, copy, archived)


def test_versions_an_earlier_release_archived_keep_their_directory_times_order(fitted_model, tmp_path):
    """An archive made by an earlier release records no order in its versions: listed and pruned by their directory
    times as before, and the next save writes those times into them, so a later copy without times keeps it."""
    path = tmp_path / "m"
    archived = _archived_in_order(fitted_model, path)
    root = artifact.versions_dir(path)
    for i, vid in enumerate(archived):  # as an earlier release left them: directory times alone
        (root / vid / "archived.json").unlink(missing_ok=True)
        os.utime(root / vid, ns=(10**18 - i * 10**9, 10**18 - i * 10**9))
    current = artifact.model_version_id(path)
    assert [v["id"] for v in artifact.list_versions(path)] == [current, *archived]
    fitted_model.save(path, keep_versions=10)
    for vid in archived:
        os.utime(root / vid, ns=(0, 0))  # copied without times: all alike
    assert [v["id"] for v in artifact.list_versions(path)[1:]] == [current, *archived]


def test_versions_are_listed_as_archived_whatever_the_clock_that_made_them(fitted_model, tmp_path):
    """Replicas whose clocks disagree: a version made on a host two hours behind (an update over HTTP that reached
    that replica) has an id two hours before the versions made earlier elsewhere. Listed by id, it sat under them,
    not as the version served before the current one, which a rollback wants (reproduced with `anomaly fit` under
    libfaketime); listed as archived, it leads."""
    path = tmp_path / "m"
    first = _save_version(fitted_model, path, "2026-12-07T04:00:00+00:00", keep=5)
    second = _save_version(fitted_model, path, "2026-12-07T04:10:00+00:00", keep=5)
    behind = _save_version(fitted_model, path, "2026-12-07T02:20:00+00:00", keep=5)  # on the host two hours behind
    current = _save_version(fitted_model, path, "2026-12-07T04:30:00+00:00", keep=5)
    assert [v["id"] for v in artifact.list_versions(path)] == [current, behind, second, first]


def test_a_rescan_after_the_clock_stepped_forward_leaves_a_save_under_way_alone(fitted_model, tmp_path,
                                                                                monkeypatch):
    """A save writes the new version into .NAME.tmp-* before its renames, and a rescan (the service's, at every
    --reload-interval) deleted such a directory as a dead save's once it looked ten minutes old by the clock. A
    clock stepped forward while a save wrote (a host that booted in 1970 syncing its time) made a save under way
    look that old: the rescan deleted the version being written, and the save failed. A live save holds a lock on
    its directory, and a rescan leaves a locked one alone, however old it looks; a dead save's still goes."""
    import threading

    path = fitted_model.save(tmp_path / "m")
    real_sync_dir = artifact.sync_dir
    rescans: list[list[str]] = []

    def rescan_while_writing(directory: Path) -> None:
        real_sync_dir(directory)
        if Path(directory).name.startswith(".m.tmp-") and not rescans:
            os.utime(directory, (0, 0))  # stamped before the clock stepped forward: it looks decades old
            rescan = threading.Thread(target=lambda: rescans.append(service_rescan(tmp_path)))
            rescan.start()
            rescan.join()

    monkeypatch.setattr(artifact, "sync_dir", rescan_while_writing)
    fitted_model.save(path, keep_versions=1)
    monkeypatch.undo()
    assert rescans == [[]]
    AnomalyModel.load(path)
    dead = tmp_path / ".m.tmp-0dead000"  # a save that died: nobody holds it
    dead.mkdir()
    os.utime(dead, (0, 0))
    service_rescan(tmp_path)
    assert not dead.exists()


def _settled(path, previous: str) -> None:
    """Nothing a save sets aside is left beside the model, and the ``previous`` version is the current one or is in
    the archive (looked up on disk: list_versions would recover what is left first)."""
    assert not list(path.parent.glob(f".{path.name}.old-*"))
    archived = [p.name for p in artifact.versions_dir(path).glob("*") if p.is_dir()]
    assert artifact.model_version_id(path) == previous or previous in archived, archived


@pytest.mark.parametrize("step", ["moved aside", "swapped in", "archiving", "archived"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_at_any_step_of_a_save_leaves_the_previous_version_current_or_archived(fitted_model, tmp_path,
                                                                                      monkeypatch, step, sig):
    """A Ctrl-C or a container stop (real signals, SIGTERM as the CLI takes it) between the swap and the archive
    left the previous version in a hidden .NAME.old-* directory until the next save: not in the archive, so no
    rollback could find it. The stop now waits for the swap and the archive, then stops the save."""
    import signal

    from anomaly_service.rescore import sigterm_as_interrupt

    path = tmp_path / "m"
    previous = _earlier_version(fitted_model, path)
    real_replace, fired = os.replace, []

    def stop(at: str) -> None:
        if at == step and not fired:
            fired.append(at)
            signal.raise_signal(getattr(signal, sig))  # its handler runs before the next line does

    def replace(src, dst, **kwargs):
        src, dst = Path(src), Path(dst)
        archiving = artifact.VERSIONS_DIR in dst.parts and src.name.startswith(".m.old-")
        if archiving:
            stop("archiving")
        real_replace(src, dst, **kwargs)
        if src.name == "m" and dst.name.startswith(".m.old-"):
            stop("moved aside")
        elif src.name.startswith(".m.tmp-") and dst.name == "m":
            stop("swapped in")
        elif archiving:
            stop("archived")

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(artifact.os, "replace", replace)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
            fitted_model.save(path, keep_versions=3)
        assert fired == [step]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the save's own handlers are gone
    finally:
        monkeypatch.undo()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    _settled(path, previous)
    assert not list(tmp_path.glob(".m.tmp-*"))
    artifact.read_artifact(path)


def test_a_ctrl_c_during_the_prune_after_a_save_stops_it_at_once(fitted_model, tmp_path, monkeypatch):
    """Signals were held for the whole archive step, the prune's deletes included: after --keep-versions was
    lowered (or on a slow share) Ctrl-C did nothing while old versions were deleted, one after another. Only the
    swap and moving the replaced version into the archive hold them; the prune, safe to stop, stops at once."""
    import shutil
    import signal

    path = tmp_path / "m"
    for year in (2018, 2019, 2020):
        fitted_model.save(path, keep_versions=5)
        m = json.loads((path / "manifest.json").read_text())
        m["created_at"] = f"{year}-01-01T00:00:00+00:00"
        write_manifest(path, m)
    previous = artifact.model_version_id(path)
    real_rmtree, deleted = shutil.rmtree, []

    def stop_at_the_first_delete(target, *args, **kwargs):
        if Path(target).name.startswith(artifact.PRUNED):
            deleted.append(Path(target).name)
            if len(deleted) == 1:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C: its handler runs before the next line does
        return real_rmtree(target, *args, **kwargs)

    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(artifact.shutil, "rmtree", stop_at_the_first_delete)
    try:
        with pytest.raises(KeyboardInterrupt):
            fitted_model.save(path, keep_versions=1)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, handler)
    assert len(deleted) == 1  # held, the Ctrl-C waited for the second delete too
    _settled(path, previous)
    artifact.read_artifact(path)


def test_a_prune_that_fails_after_the_swap_does_not_fail_the_save(fitted_model, tmp_path, monkeypatch, caplog):
    """The prune runs once the new model is in place: a failure there (a share that refuses a delete) is a warning,
    not a save reported failed about a model that is the current one."""
    path = tmp_path / "m"
    fitted_model.save(path, keep_versions=2)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(artifact, "prune_versions", refuse)
    fitted_model.save(path, keep_versions=2)
    assert "could not prune the old versions" in caplog.text
    assert len(artifact.list_versions(path)) >= 1 and artifact.read_artifact(path)

def _stranded(fitted_model, tmp_path) -> tuple:
    """What a save killed (SIGKILL: no handler runs) after its second rename, before its archive, leaves: the new
    version in place, the previous one in ``.m.old-*``. Returns the model's path and the previous version's id."""
    import shutil

    path = tmp_path / "m"
    previous = _earlier_version(fitted_model, path)
    shutil.copytree(path, tmp_path / ".m.old-0dead000")
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = "2021-01-01T00:00:00+00:00"
    write_manifest(path, m)
    return path, previous


@pytest.mark.parametrize("how", ["load", "list versions", "info", "next save", "service rescan"])
def test_a_version_a_killed_save_left_aside_is_archived_by_the_next_reader(fitted_model, tmp_path, caplog, how):
    """The previous version a killed save left in .m.old-* stayed there until the next save, and the service's
    rescan deleted it: every reader now moves it into the archive, where a rollback finds it, and says so."""
    import logging

    path, previous = _stranded(fitted_model, tmp_path)
    current = artifact.model_version_id(path) if how == "next save" else None
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        {"load": lambda: AnomalyModel.load(path),
         "list versions": lambda: artifact.list_versions(path),
         "info": lambda: artifact.read_manifest(path),
         "next save": lambda: fitted_model.save(path, keep_versions=3),
         "service rescan": lambda: service_rescan(tmp_path)}[how]()
    assert not list(tmp_path.glob(".m.old-*"))
    assert ".m.old-0dead000" in caplog.text and previous in caplog.text and "archive" in caplog.text
    ids = [v["id"] for v in artifact.list_versions(path)]
    assert previous in ids[1:] and (current is None or current in ids[1:])
    artifact.rollback(path, previous)  # whole: it verifies
    assert artifact.model_version_id(path) == previous


def test_a_half_deleted_copy_a_killed_save_left_aside_is_removed_not_archived(fitted_model, tmp_path, caplog):
    """A save that keeps no versions deletes the one it replaced; killed midway, the rest of it is no version to
    roll back to: it is removed, said so, and never listed."""
    import logging

    path, _ = _stranded(fitted_model, tmp_path)
    (tmp_path / ".m.old-0dead000" / "index.faiss").unlink()
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        versions = artifact.list_versions(path)
    assert len(versions) == 1 and not list(tmp_path.glob(".m.old-*"))
    assert ".m.old-0dead000" in caplog.text and "removed" in caplog.text


KILLED_UNKEPT_SAVE = """
import json, os, shutil, signal, sys
from pathlib import Path
from anomaly_service import artifact

path, when = Path(sys.argv[1]), sys.argv[2]
real_replace, real_rmtree = os.replace, shutil.rmtree

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: what a power cut leaves

def replace(src, dst, **kwargs):
    if when == "between the renames" and Path(src).name.startswith(".m.tmp-"):
        die()  # the previous model set aside, the new one not yet in its place
    return real_replace(src, dst, **kwargs)

def rmtree(target, *args, **kwargs):
    if when == "after the swap" and Path(target).name.startswith(".m.old-"):
        die()  # the new model in place, the one it replaced not yet deleted
    return real_rmtree(target, *args, **kwargs)

artifact.os.replace, artifact.shutil.rmtree = replace, rmtree
_, files = artifact.read_artifact(path)
manifest = json.loads((path / "manifest.json").read_text())
manifest["created_at"] = "2021-01-01T00:00:00+00:00"
artifact.write_artifact(path, manifest, files, keep_versions=0)
"""


def _killed_unkept_save(fitted_model, tmp_path, when: str) -> tuple:
    """A model with one archived version, then a save with keep_versions=0 killed (a real SIGKILL) ``when``.
    Returns the model's path, the archived version's id and the id of the version that save replaced."""
    import subprocess
    import sys

    path = tmp_path / "m"
    archived = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=3)  # an archive kept by an earlier save is the user's, not this save's
    replaced = artifact.model_version_id(path)
    done = subprocess.run([sys.executable, "-c", KILLED_UNKEPT_SAVE, str(path), when], timeout=300)
    assert done.returncode == -9 and len(list(tmp_path.glob(".m.old-*"))) == 1
    return path, archived, replaced


@pytest.fixture(scope="module")
def unkept_copy_left(fitted_model, tmp_path_factory) -> tuple:
    """The store a save that keeps no versions leaves when killed after its swap, before deleting the version it
    replaced (made once: each test works on a copy)."""
    where = tmp_path_factory.mktemp("unkept")
    path, archived, replaced = _killed_unkept_save(fitted_model, where, "after the swap")
    return where, archived, replaced


@pytest.mark.parametrize("how", ["load", "list versions", "info", "next save", "service rescan"])
def test_a_version_a_killed_save_that_kept_none_left_aside_is_removed_not_archived(unkept_copy_left, fitted_model,
                                                                                   tmp_path, caplog, how):
    """With --keep-versions 0 (AnomalyModel.save's default) a save deletes the version it replaces. Killed before
    the delete, its copy was archived by whichever reader found it, and with every save keeping none nothing ever
    pruned the archive: the copy stayed on disk for good. It is removed, as that save would have, and the archive
    an earlier save kept is left as it was."""
    import logging
    import shutil

    where, archived, replaced = unkept_copy_left
    shutil.copytree(where, tmp_path, dirs_exist_ok=True, symlinks=True)
    path = tmp_path / "m"
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        {"load": lambda: AnomalyModel.load(path),
         "list versions": lambda: artifact.list_versions(path),
         "info": lambda: artifact.read_manifest(path),
         "next save": lambda: fitted_model.save(path),
         "service rescan": lambda: service_rescan(tmp_path)}[how]()
    assert not list(tmp_path.glob(".m.old-*"))
    assert [p.name for p in artifact.versions_dir(path).iterdir() if p.is_dir()] == [archived]
    assert ".m.old-unkept-" in caplog.text and "removed" in caplog.text and "kept no versions" in caplog.text
    artifact.read_artifact(path)
    assert [v["id"] for v in artifact.list_versions(path)][1:] == [archived]
    assert how == "next save" or artifact.model_version_id(path) != replaced


def test_a_save_that_kept_none_killed_between_its_renames_is_undone(fitted_model, tmp_path):
    """The copy a save that keeps no versions sets aside is still the model until the new one is in place: killed
    between the two renames, it is put back, whatever its name says becomes of it afterwards."""
    path, archived, replaced = _killed_unkept_save(fitted_model, tmp_path, "between the renames")
    assert not path.exists()
    AnomalyModel.load(path)
    assert artifact.model_version_id(path) == replaced and not list(tmp_path.glob(".m.old-*"))
    assert [v["id"] for v in artifact.list_versions(path)] == [replaced, archived]


@pytest.mark.parametrize("store", ["read-only mount", "archive unwritable"])
def test_a_set_aside_copy_that_cannot_be_archived_is_said_once_not_on_every_read(fitted_model, tmp_path, caplog,
                                                                                 store):
    """A model store mounted read-only (as the deployments mount it) that holds a copy a killed save left aside:
    every load and every re-scan tried to archive it again and logged the same warning, a line per read."""
    import logging
    import subprocess

    path, _ = _stranded(fitted_model, tmp_path)
    if store == "archive unwritable":
        artifact.versions_dir(path).parent.write_text("")  # a file where the archive goes: no mkdir, even as root
    elif subprocess.run(["mount", "--bind", str(tmp_path), str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs privileges this run has not")
    else:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(tmp_path)], check=True, capture_output=True)
    try:
        with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
            for _ in range(3):
                AnomalyModel.load(path)
                service_rescan(tmp_path)
    finally:
        if store == "read-only mount":
            subprocess.run(["umount", str(tmp_path)], check=True)
    assert caplog.text.count(".m.old-0dead000") == 1, caplog.text
    assert ("the model directory is read-only here" in caplog.text) == (store == "read-only mount"), caplog.text
    assert list(tmp_path.glob(".m.old-*"))  # left for a reader where the store is writable


def test_a_save_whose_archive_cannot_be_written_leaves_the_version_it_replaces_for_the_next_reader(
        fitted_model, tmp_path, caplog):
    """A save that keeps versions and cannot archive the one it replaces (the archive unwritable, say) deleted it
    after a warning, though the user had asked to keep it. It is left aside instead, and the first reader that can
    archives it, where a rollback finds it."""
    import logging

    path = tmp_path / "m"
    previous = _earlier_version(fitted_model, path)
    archive_parent = artifact.versions_dir(path).parent
    archive_parent.write_text("")  # a file where the archive goes: no mkdir, even as root
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        fitted_model.save(path, keep_versions=3)
    assert "could not archive the previous version" in caplog.text
    assert len(list(tmp_path.glob(".m.old-*"))) == 1 and artifact.model_version_id(path) != previous
    archive_parent.unlink()
    AnomalyModel.load(path)  # a reader where the archive can be written archives it
    _settled(path, previous)
    artifact.rollback(path, previous)
    assert artifact.model_version_id(path) == previous


def test_a_prune_cut_short_leaves_no_half_version_in_the_list(fitted_model, tmp_path, monkeypatch):
    """A prune deletes the archived versions past --keep-versions; stopped or killed midway through one, the rest
    of it was listed (and counted) as a broken version. Each is moved out of sight first, and the next prune
    deletes what is left of it."""
    import shutil

    path = tmp_path / "m"
    previous = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=3)
    current = artifact.model_version_id(path)
    real_rmtree = shutil.rmtree

    def cut_short(target, *args, **kwargs):
        target = Path(target)
        if artifact.VERSIONS_DIR in target.parts:
            (target / "index.faiss").unlink()
            raise KeyboardInterrupt
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(artifact.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        artifact.prune_versions(path, 0)
    monkeypatch.undo()
    assert [v["id"] for v in artifact.list_versions(path)] == [current]
    assert artifact.prune_versions(path, 0) == []
    assert [p.name for p in artifact.versions_dir(path).iterdir()] == [], previous


@pytest.mark.parametrize("locked", [False, True], ids=["a save", "a save under the model's write lock"])
def test_a_version_an_earlier_releases_killed_rollback_hid_is_put_back_by_the_next_prune(fitted_model, tmp_path,
                                                                                         locked):
    """Rollbacks of the previous release moved the version they restored to .versions/NAME/.restoring-*; killed
    midway, it stayed there, in no list. This release's prune only cleared its own .pruned-* leftovers, so after
    the upgrade such a version stayed hidden for good: the next save's prune puts it back, also where the save
    holds the model's write lock itself (as `anomaly update` and the service do)."""
    import contextlib

    path = tmp_path / "m"
    hidden = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=5)  # the 2020 version archived
    root = artifact.versions_dir(path)
    (root / hidden).rename(root / ".restoring-0dead000")  # as the earlier release's rollback left it
    assert hidden not in [v["id"] for v in artifact.list_versions(path)]
    with artifact.model_lock(path) if locked else contextlib.nullcontext():
        fitted_model.save(path, keep_versions=5)
    assert hidden in [v["id"] for v in artifact.list_versions(path)]
    assert not list(root.glob(".restoring-*"))
    artifact.rollback(path, hidden)
    assert artifact.model_version_id(path) == hidden


def test_a_version_a_live_rollback_of_an_earlier_release_hid_is_left_to_it(fitted_model, tmp_path):
    """Mixed releases on one model store: an earlier release's rollback hides the version it restores in
    .restoring-* while it swaps it in. This release's prune put any .restoring-* back into the archive, also one a
    live rollback held, where the same prune could delete it (its archive time is old) before that rollback failed
    to put it back. Every such rollback holds the model's write lock throughout: while another process holds it, the
    prune leaves .restoring-* alone, and the first prune after puts back what a dead rollback left."""

    path = tmp_path / "m"
    hidden = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=5)  # the 2020 version archived
    root = artifact.versions_dir(path)
    (root / hidden).rename(root / ".restoring-0dead000")  # the earlier release's rollback, under way
    with flock_held_elsewhere(tmp_path / ".m.lock"):  # as every release's rollback held it, from before it hid
        fitted_model.save(path, keep_versions=1)  # a save from Python: it takes no lock of its own
        assert [p.name for p in root.glob(".restoring-*")] == [".restoring-0dead000"]
        assert artifact.prune_versions(path, 0) and list(root.glob(".restoring-*"))
    # the rollback ended (here: died, its version still hidden)
    assert artifact.prune_versions(path, 5) == [] and not list(root.glob(".restoring-*"))
    assert hidden in [v["id"] for v in artifact.list_versions(path)]
    artifact.rollback(path, hidden)
    assert artifact.model_version_id(path) == hidden


HIDE_IN_A_ROLLBACK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)  # as every release's rollback held it, from before it hid a version to the end
os.replace(sys.argv[2], sys.argv[3])  # the version it restores, hidden while it is swapped in
print("hidden", flush=True)
sys.stdin.read()  # until the test closes it
"""


def test_a_prune_does_not_borrow_the_write_lock_another_thread_may_let_go(fitted_model, tmp_path, monkeypatch):
    """The model's write lock held by one thread (an update) let a prune on another thread of that process take
    every .restoring-* for a dead rollback's. That thread may let the lock go while the prune is under way, and an
    earlier release's rollback take it and hide the version it restores: the prune put that version back into the
    archive with its old archive time and deleted it as past keep, under the live rollback. Only the pruning
    thread's own hold shuts rollbacks out; another thread's leaves .restoring-* to a later prune. The moment the
    update ends is picked by wrapping the lock check; the threads, the rollback's process and its flock are real."""
    import contextlib
    import subprocess
    import sys
    import threading

    path = tmp_path / "m"
    dead = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=5)  # the 2020 version archived
    m = json.loads((path / "manifest.json").read_text())
    m["created_at"] = "2021-01-01T00:00:00+00:00"
    write_manifest(path, m)
    live = artifact.model_version_id(path)
    fitted_model.save(path, keep_versions=5)  # the 2021 version archived
    root = artifact.versions_dir(path)
    (root / dead).rename(root / ".restoring-0dead000")  # an earlier release's rollback that died
    holding, release = threading.Event(), threading.Event()

    def update() -> None:
        with artifact.model_lock(path):
            holding.set()
            release.wait(60)

    updating = threading.Thread(target=update)
    updating.start()
    assert holding.wait(60)
    rollbacks: list[subprocess.Popen] = []
    real = artifact._rollbacks_shut_out

    @contextlib.contextmanager
    def then_the_update_ends(p: Path):
        with real(p) as shut_out:
            release.set()
            updating.join(60)
            rollback = subprocess.Popen([sys.executable, "-c", HIDE_IN_A_ROLLBACK, str(tmp_path / ".m.lock"),
                                         str(root / live), str(root / ".restoring-1live000")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            rollbacks.append(rollback)
            assert rollback.stdout is not None and rollback.stdout.readline() == "hidden\n"
            yield shut_out

    monkeypatch.setattr(artifact, "_rollbacks_shut_out", then_the_update_ends)
    try:
        artifact.prune_versions(path, 0)
        assert (root / ".restoring-1live000").is_dir() and not artifact._not_whole(root / ".restoring-1live000")
    finally:
        release.set()
        for rollback in rollbacks:
            assert rollback.stdin is not None
            rollback.stdin.close()  # the rollback ends (here: dies, its version still hidden)
            rollback.wait(timeout=60)
    monkeypatch.undo()
    assert artifact.prune_versions(path, 5) == [] and not list(root.glob(".restoring-*"))
    assert {dead, live} <= {v["id"] for v in artifact.list_versions(path)}


KILLED_ROLLBACK = """
import os, signal, sys
from anomaly_service import artifact
swap_in = artifact._swap_in

def killed(*args, **kwargs):
    if sys.argv[3] == "after":
        swap_in(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: what a power cut leaves

artifact._swap_in = killed
artifact.rollback(sys.argv[1], sys.argv[2], keep_versions=3)
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rollback_killed_at_its_swap_loses_no_version_from_the_archive(fitted_model, tmp_path, when):
    """A rollback moved the version it restores out of the archive into a hidden .restoring-* before its swap:
    killed there, that version was gone from `anomaly versions` for good. Whenever it dies, every version is the
    model or listed in the archive."""
    import subprocess
    import sys

    path = tmp_path / "m"
    earlier = _earlier_version(fitted_model, path)
    fitted_model.save(path, keep_versions=3)
    later = artifact.model_version_id(path)
    done = subprocess.run([sys.executable, "-c", KILLED_ROLLBACK, str(path), earlier, when], timeout=300)
    assert done.returncode == -9
    versions = artifact.list_versions(path)
    assert {v["id"] for v in versions} == {earlier, later} and "error" not in str(versions)
    assert versions[0]["id"] == (earlier if when == "after" else later)
    other = later if versions[0]["id"] == earlier else earlier
    artifact.rollback(path, other)  # whole: it verifies
    assert [v["id"] for v in artifact.list_versions(path)][:2] == [other, versions[0]["id"]]


@pytest.mark.parametrize("version", ["a" * 5000, "", ".hidden", "../model", "a\x00b", "a\n"])
def test_rollback_to_a_name_no_archive_holds_is_unknown(saved, version):
    # a version id too long for a file name raised OSError: a 500 from the API, a traceback from the CLI
    with pytest.raises(LookupError, match="no archived version"):
        artifact.rollback(saved, version)


@pytest.mark.parametrize("name", ["arrays.npz", "training_images.npz"])
@pytest.mark.parametrize("cut", [0, 2])
def test_a_cut_npz_with_matching_checksums_is_a_model_format_error_naming_it(saved, name, cut):
    # a release that wrote a short file records its checksum: only the archive reader can tell, and it raised
    # BadZipFile or EOFError, which the CLI printed as a traceback
    import hashlib

    data = (saved / name).read_bytes()
    data = data[: len(data) // 2] if cut else b""
    (saved / name).write_bytes(data)
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(saved, manifest)
    with pytest.raises(ModelFormatError, match=f"{name} is unreadable"):
        AnomalyModel.load(saved)


@pytest.mark.parametrize("key", ["image_score", "sigma", "backbone"])
def test_a_config_key_every_release_writes_is_required(saved, key):
    # it was filled with today's default (image_score was "max" in the first release, is "map-max" now): the model
    # loaded and scored differently from how it was fitted
    manifest = json.loads((saved / "manifest.json").read_text())
    del manifest["config"][key]
    write_manifest(saved, manifest)
    with pytest.raises(ModelFormatError, match=f"config lacks {key}"):
        AnomalyModel.load(saved)


@pytest.mark.parametrize("name, other", [("a[bc]", "ab"), ("a?", "ab"), ("a*", "ab"), ("m", "m.old-1")])
def test_a_model_takes_only_its_own_set_aside_copies_never_another_models(fitted_model, tmp_path, name, other):
    """A save killed between its renames left ``other`` aside (``.OTHER.old-*``, no ``other``). The set-aside
    copies were found by a pattern made of the name: saving ``a[bc]`` (``anomaly fit --out models/a[bc]``) put
    ``ab``'s model back as ``a[bc]`` and archived it as a version of ``a[bc]``, and ``ab`` was gone; ``m``'s pattern
    matched the copies of a model named ``m.old-1``. Each model's own copy is still put back."""
    theirs = _earlier_version(fitted_model, tmp_path / other)
    os.replace(tmp_path / other, tmp_path / f".{other}.old-0dead000")
    fitted_model.save(tmp_path / name, keep_versions=3)
    assert [v["id"] for v in artifact.list_versions(tmp_path / name)][1:] == []
    mine = artifact.model_version_id(tmp_path / name)
    os.replace(tmp_path / name, tmp_path / f".{name}.old-cafe0000")  # and now a save of this one dies likewise
    assert AnomalyModel.load(tmp_path / name) is not None  # its own copy put back, where it found none before
    assert artifact.model_version_id(tmp_path / name) == mine
    assert artifact.model_version_id(tmp_path / other) == theirs  # the other's read puts back its own
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} - {artifact.VERSIONS_DIR} == {name, other}
    assert [v["id"] for v in artifact.list_versions(tmp_path / name)] == [mine]


def test_a_save_removes_only_its_own_abandoned_copies(fitted_model, tmp_path):
    """A save removes the half-written copies killed saves of the same model left; ``a[bc]``'s pattern removed
    ``ab``'s and never its own."""
    for left in (".ab.tmp-0dead000", ".a[bc].tmp-0dead000"):
        (tmp_path / left).mkdir()
        os.utime(tmp_path / left, (0, 0))
    fitted_model.save(tmp_path / "a[bc]")
    assert sorted(p.name for p in tmp_path.glob(".*.tmp-*")) == [".ab.tmp-0dead000"]


def test_a_save_does_not_wait_for_an_update_of_a_model_named_after_its_swap_lock(fitted_model, tmp_path):
    """A model named ``m.swap`` had ``.m.swap.lock`` as its write lock, the file that is ``m``'s swap lock: an update
    of ``m.swap`` (minutes of fitting under that lock) held every save of ``m`` at its first rename, and every
    rescan that found ``m`` mid-save, until it ended. The two locks are now named apart."""
    import threading

    path = fitted_model.save(tmp_path / "m")
    fitted_model.save(tmp_path / "m.swap")
    with flock_held_elsewhere(tmp_path / ".m.swap.lock"):  # m.swap's update, under way
        save = threading.Thread(target=fitted_model.save, args=(path,), daemon=True)
        save.start()
        save.join(timeout=60)
        assert not save.is_alive(), "the save of m waited on the write lock of the model m.swap"
    assert {".m.swap-lock", ".m.swap.swap-lock"} <= {p.name for p in tmp_path.glob(".m.*")}  # each its own


def test_an_archive_stamp_no_file_time_can_hold_is_read_as_none(fitted_model, tmp_path):
    """A version's archived.json corrupted to a stamp past any file time (a flipped digit, a hand edit) is no stamp:
    read as one, the next save stamped its version just past it, which no directory time can be, and every save of
    the model failed with an OverflowError after swapping the new version in. Its directory's time orders it."""
    path = tmp_path / "m"
    archived = _archived_in_order(fitted_model, path, n=2)
    (artifact.versions_dir(path) / archived[0] / "archived.json").write_text('{"archived_ns": %d}' % 10**40)
    current = artifact.model_version_id(path)
    fitted_model.save(path, keep_versions=10)
    assert [v["id"] for v in artifact.list_versions(path)[1:]] == [current, *archived]


def test_a_rollback_returns_the_model_leaves_no_copy_of_it_in_the_archive_and_keeps_what_it_is_told(fitted_model,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fitted_model.save("m") == tmp_path / "m"  # a relative path, resolved as save says
    path = tmp_path / "m"
    versions = [artifact.model_version_id(path)]
    for year in (2021, 2022, 2023):
        versions.append(_save_version(fitted_model, path, f"{year}-01-01T00:00:00+00:00", keep=5))
    with pytest.raises(LookupError, match=", ".join(reversed(versions[:-1]))):  # what it may roll back to
        artifact.rollback(path, "2019")
    assert artifact.rollback("m", versions[0], keep_versions=1) == path
    root = artifact.versions_dir(path)
    # the restored version is the model now, not also a hidden copy in the archive the prune counts
    assert sorted(p.name for p in root.iterdir()) == [versions[-1]]
    assert [v["id"] for v in artifact.list_versions(path)] == [versions[0], versions[-1]]


def test_a_save_that_died_twice_between_its_renames_puts_back_the_newest_copy_that_verifies(fitted_model, tmp_path):
    path = tmp_path / "m"
    older = _earlier_version(fitted_model, path)
    shutil.copytree(path, tmp_path / "held")
    newer = _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=0)
    os.replace(path, tmp_path / ".m.old-0dead002")
    os.replace(tmp_path / "held", tmp_path / ".m.old-0dead001")
    os.utime(tmp_path / ".m.old-0dead001", (1_000_000, 1_000_000))  # the oldest
    (tmp_path / ".m.old-0dead003").mkdir()  # the newest, and no model
    assert artifact.recover(path) is True  # what the service's re-scan says as "recovered"
    assert artifact.recover(path) is False
    assert artifact.model_version_id(path) == newer
    assert [v["id"] for v in artifact.list_versions(path)] == [newer, older]
    assert not list(tmp_path.glob(".m.old-*"))


def test_a_version_an_earlier_rollback_hid_is_left_when_cut_short_and_removed_when_kept_elsewhere(fitted_model,
                                                                                                  tmp_path):
    path = tmp_path / "m"
    hidden = _earlier_version(fitted_model, path)
    current = _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=5)  # the 2020 one archived
    root = artifact.versions_dir(path)
    shutil.copytree(root / hidden, root / ".restoring-0dead001")  # archived too: a copy of it, removed
    shutil.copytree(path, root / ".restoring-0dead002")  # the model itself: removed
    shutil.copytree(root / hidden, root / ".restoring-0dead003")
    (root / ".restoring-0dead003" / "index.faiss").write_bytes(b"cut")  # not whole: left, never archived
    fitted_model.save(path, keep_versions=5)
    assert sorted(p.name for p in root.glob(".restoring-*")) == [".restoring-0dead003"]
    assert [v["id"] for v in artifact.list_versions(path)][1:] == [current, hidden]


def test_a_file_where_a_model_should_be_is_named_so(tmp_path):
    (tmp_path / "m").write_text("not a model")
    with pytest.raises(ModelFormatError, match="is not a model directory"):
        artifact.read_manifest(tmp_path / "m")


@pytest.mark.parametrize("content", ["[]", '"manifest"', "null", "1"])
def test_a_manifest_file_holding_no_json_object_is_refused_so(saved, content):
    (saved / "manifest.json").write_text(content)  # no checksum to check: the reader says what it is
    with pytest.raises(ModelFormatError, match="is not a JSON object"):
        artifact.read_manifest(saved)


def test_a_save_that_keeps_no_versions_deletes_none_of_the_archive_on_a_full_volume(fitted_model, tmp_path):
    """A save with --keep-versions 0 leaves the archive as it is (no prune runs), so a volume too full for it
    gives way with none of the archived versions: only a save that keeps versions prunes, and only past its own."""
    from anomaly_service import ModelSaveError
    from conftest import fill, mounted

    with mounted(tmp_path / "models", "16m") as models:
        path = fitted_model.save(models / "part")
        _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=5)  # the fit's version archived
        archived = [v["id"] for v in artifact.list_versions(path)[1:]]
        assert len(archived) == 1
        fill(models)
        with pytest.raises(ModelSaveError, match="No space left on device"):
            fitted_model.save(path, keep_versions=0)
        assert [v["id"] for v in artifact.list_versions(path)[1:]] == archived


def test_a_folder_of_models_and_a_manifest_that_cannot_be_read_are_named_so(saved, tmp_path):
    with pytest.raises(ModelFormatError, match=r"is a folder of models \(model\), not a model: name one"):
        artifact.read_manifest(tmp_path)
    (saved / "manifest.json").unlink()
    (saved / "manifest.json").mkdir()
    with pytest.raises(ModelFormatError, match=r"manifest\.json cannot be read \(Is a directory\)"):
        artifact.read_manifest(saved)


def test_a_read_that_must_leave_a_copy_as_it_was_made_settles_nothing(fitted_model, tmp_path):
    path, previous = _stranded(fitted_model, tmp_path)
    artifact.read_manifest(path, settle=False)  # a backup's verification of its copy
    assert (tmp_path / ".m.old-0dead000").is_dir()
    artifact.read_manifest(path)
    assert not (tmp_path / ".m.old-0dead000").exists() and previous in [v["id"] for v in artifact.list_versions(path)]


def test_every_reader_and_writer_takes_the_models_path_as_a_string(saved):
    """The library's callers pass paths as strings as often as not (``AnomalyModel.load("models/bottle")``)."""
    where = str(saved)
    manifest, files = artifact.read_artifact(where)
    assert artifact.read_manifest(where).created_at == manifest.created_at and "index.faiss" in files
    assert artifact.versions_dir(where) == saved.parent / ".versions" / saved.name
    artifact.check_replaceable(where)
    with pytest.raises(ModelFormatError, match="not a model directory"):
        artifact.check_replaceable(str(saved / "index.faiss"))
    assert [v["current"] for v in artifact.list_versions(where)] == [True]
    assert artifact.leftover_names(str(saved.parent)) == [] and artifact.recover_model(str(saved.parent), "m") is False


def test_each_lock_on_a_model_is_let_go_at_the_end_of_its_block(saved):
    """The write lock, a prune's hold of it and the swap lock are each released when their block ends, also where the
    block raised: a lock file left open held every later update, rollback or save of the model (in this process
    too: a new descriptor's flock waits for the old one's)."""
    import fcntl

    def free(lock: Path) -> bool:
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    write_lock, swap = saved.parent / ".model.lock", saved.parent / ".model.swap-lock"
    with artifact.model_lock(saved):
        assert not free(write_lock)
    assert free(write_lock)
    with pytest.raises(RuntimeError), artifact.model_lock(saved):
        raise RuntimeError("an update that failed")
    assert free(write_lock)
    with artifact._rollbacks_shut_out(saved) as shut_out:
        assert shut_out and not free(write_lock)
    assert free(write_lock)
    with artifact.swap_lock(saved, create=True):
        assert not free(swap)
    assert free(swap)


def test_a_save_that_keeps_versions_onto_an_empty_directory_archives_nothing(fitted_model, tmp_path):
    """An empty directory may be saved over (a folder made for the model first); it is no version, so the save that
    keeps versions archives nothing of it and removes it."""
    (tmp_path / "m").mkdir()
    path = fitted_model.save(tmp_path / "m", keep_versions=2)
    assert [v["current"] for v in artifact.list_versions(path)] == [True]
    assert not artifact.versions_dir(path).exists() or not any(artifact.versions_dir(path).iterdir())
    assert not list(tmp_path.glob(".m.old-*"))


def test_a_version_saved_before_lineage_was_kept_is_listed_as_a_fit(saved):
    """Models saved before versions recorded what made them have no lineage: each is listed as the fit it was, with
    its training set and bank as what it added, and as updatable only where it keeps a calibration set."""
    m = json.loads((saved / "manifest.json").read_text())
    m.pop("lineage")
    write_manifest(saved, m)
    listed = artifact.list_versions(saved)[0]
    assert (listed["made_by"], listed["parent"]) == ("fit", None)
    assert (listed["images_added"], listed["patches_added"]) == (m["training"]["n_images"], m["coreset"]["size"])
    assert listed["updatable"] is True
    m.pop("calibration_set")
    m["files"].pop("calibration.npz")
    write_manifest(saved, m)
    assert artifact.list_versions(saved)[0]["updatable"] is False


def test_a_rollback_keeps_the_version_it_replaced_whatever_keep_versions_says(fitted_model, tmp_path):
    """A rollback can always be undone: the version it replaces stays archived, also with --keep-versions 0."""
    path = tmp_path / "m"
    first = _earlier_version(fitted_model, path)
    second = _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=5)
    artifact.rollback(path, first, keep_versions=0)
    assert [v["id"] for v in artifact.list_versions(path)] == [first, second]


def test_a_folder_of_models_names_five_of_them_and_says_when_there_are_more(tmp_path):
    for name in "abcde":
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / ".versions" / "x").mkdir(parents=True)  # hidden: never named as a model
    (tmp_path / ".versions" / "x" / "manifest.json").write_text("{}")
    with pytest.raises(ModelFormatError) as five:
        artifact.read_manifest(tmp_path)
    assert str(five.value) == (f"{tmp_path} is a folder of models (a, b, c, d, e), not a model: name one, e.g. "
                               f"{tmp_path / 'a'}")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "manifest.json").write_text("{}")
    with pytest.raises(ModelFormatError, match=r"is a folder of models \(a, b, c, d, e, \.\.\.\), not a model"):
        artifact.read_manifest(tmp_path)


def _no_inode_left(models: Path, tag: str) -> None:
    filler = models / f"filler-{tag}"
    filler.mkdir()
    with pytest.raises(OSError):
        for i in range(64):
            (filler / str(i)).touch()
    with pytest.raises(OSError, match="No space left"):
        (models / "probe").mkdir()  # not even a directory


def test_a_save_onto_a_volume_with_no_inode_left_makes_room_as_for_bytes(fitted_model, tmp_path, caplog):
    """A volume out of inodes refuses even the save's directory (ENOSPC from mkdir): the archived versions the save's
    prune would delete go first, and the save is made, as on a volume out of bytes; the log says what went."""
    import logging

    from anomaly_service import ModelSaveError
    from conftest import mounted

    with mounted(tmp_path / "models", "64m,nr_inodes=64") as models:
        path = models / "part"
        for year in range(2020, 2025):
            _save_version(fitted_model, path, f"{year}-01-01T00:00:00+00:00", keep=5)
        assert len(artifact.list_versions(path)) == 5
        _no_inode_left(models, "a")
        with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
            caplog.clear()
            fitted_model.save(path, keep_versions=2)
        assert len(artifact.list_versions(path)) == 3  # the model and its two kept versions
        artifact.read_artifact(path)
        assert [r.getMessage().split(" before the save")[0] for r in caplog.records] == [
            "the model volume of part is full: deleted 3 archived version(s)"]
        _save_version(fitted_model, path, "2025-01-01T00:00:00+00:00", keep=2)
        _no_inode_left(models, "b")
        fitted_model.save(path, keep_versions=1)  # one kept: the archive's others give way
        assert len(artifact.list_versions(path)) == 2
        (archived,) = artifact._archived_dirs(path)
        size = sum(f.stat().st_size for f in archived.iterdir())
        _no_inode_left(models, "c")
        with pytest.raises(ModelSaveError) as refused:  # keeping none, it deletes none: what to do is said
            fitted_model.save(path, keep_versions=0)
        assert str(refused.value) == (
            f"cannot write the model to {path}: No space left on device; any model that was there is unchanged. Its "
            f"archive holds 1 earlier version(s) {size / 1e6:.1f} MB: with --keep-versions 1 or lower "
            "(ANOMALY_KEEP_VERSIONS) a save deletes the oldest of them first; or free space on the volume")


def test_a_copy_set_aside_whose_manifest_does_not_verify_is_removed_not_archived(fitted_model, tmp_path, caplog):
    """What a stopped save left aside is archived only when whole: a copy whose manifest was altered after its save
    (its checksum no longer matches) is removed, never made a version a rollback could be asked for; the log says
    so once, and why."""
    import logging

    path, previous = _stranded(fitted_model, tmp_path)
    aside = tmp_path / ".m.old-0dead000"
    m = json.loads((aside / "manifest.json").read_text())
    m["created_at"] = "2019-01-01T00:00:00+00:00"  # the checksum left as it was
    (aside / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        caplog.clear()
        artifact.read_manifest(path)
    assert not aside.exists() and [v["current"] for v in artifact.list_versions(path)] == [True]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("m: removed .m.old-0dead000, what a stopped save left of a replaced version (") and \
        "checksum" in said, said


def _open_on(path: Path) -> list[str]:
    """This process's descriptors open on ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                found.append(fd)
    return found


def test_a_refused_update_and_an_abandoned_copy_leave_no_descriptor_open(saved, tmp_path):
    """The lock file of a model on a read-only directory (left there by an earlier update) and the directory of a save
    that died, asked whether its save still writes it, are closed again: each refused update and each re-scan held
    one more descriptor for the life of the service."""
    from anomaly_service.errors import UpdateUnavailableError
    from conftest import mounted

    tmp = saved.parent / ".model.tmp-0dead000"
    tmp.mkdir()
    os.utime(tmp, (0, 0))
    assert artifact._abandoned(tmp, time.time()) and _open_on(tmp) == []
    for made in (False, True):  # no lock file yet: it cannot be made; one an earlier update left: it opens
        if made:
            with artifact.model_lock(saved):
                pass
        with mounted(saved.parent):
            with pytest.raises(UpdateUnavailableError, match=r"model directory \S+ \(Read-only file system\)"):
                with artifact.model_lock(saved):
                    pass
            assert _open_on(saved.parent / ".model.lock") == []


def test_a_rescan_of_a_read_only_store_passes_over_an_abandoned_copy_it_cannot_remove(saved, tmp_path):
    from conftest import mounted

    tmp = saved.parent / ".model.tmp-0dead000"
    tmp.mkdir()
    (tmp / "index.faiss").write_bytes(b"half")
    os.utime(tmp, (0, 0))
    with mounted(saved.parent):
        assert service_rescan(saved.parent) == []  # nothing raised: left for a rescan where it is writable
        assert tmp.is_dir()
    assert service_rescan(saved.parent) == [] and not tmp.exists()


def test_a_first_save_that_keeps_versions_onto_a_full_volume_says_so_with_no_archive_to_offer(fitted_model, tmp_path):
    from anomaly_service import ModelSaveError
    from conftest import fill, mounted

    with mounted(tmp_path / "models", "16m") as models:
        fill(models)
        with pytest.raises(ModelSaveError) as refused:
            fitted_model.save(models / "part", keep_versions=5)
        assert str(refused.value) == (f"cannot write the model to {models / 'part'}: No space left on device; any "
                                      "model that was there is unchanged")
        assert not (models / "part").exists() and not artifact.leftover_names(models)


def test_a_save_after_one_that_died_between_its_renames_archives_the_model_it_had_set_aside(fitted_model, tmp_path,
                                                                                            caplog):
    """A save killed between its two renames leaves the model set aside and none in its place: the next save puts it
    back before its own swap (and says so), so that it is archived (and pruned) as the version that save replaces,
    not left beside the new model for a later reader to find."""
    import logging

    path = tmp_path / "m"
    _earlier_version(fitted_model, path)
    previous = _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=5)  # the 2020 one archived
    os.replace(path, tmp_path / ".m.old-0dead000")
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        caplog.clear()
        fitted_model.save(path, keep_versions=1)  # the set-aside model archived, and the 2020 one pruned
    assert [r.getMessage() for r in caplog.records] == [
        "m: put back the model a save that died between its renames had set aside (.m.old-0dead000)"]
    assert not list(tmp_path.glob(".m.old-*"))
    assert [v["id"] for v in artifact.list_versions(path)][1:] == [previous]


def test_an_archive_stamp_is_the_clocks_in_its_file_and_its_directory_and_a_listing_writes_none(fitted_model,
                                                                                                 tmp_path):
    """The first version archived is stamped with the clock's time, in archived.json and as its directory's time
    (what earlier releases order by); a stamp reads only within a file time's range; listing the versions of an
    archive an earlier release made reads it and writes nothing into it (the next save does)."""
    path = tmp_path / "m"
    first = _earlier_version(fitted_model, path)
    before = time.time_ns()
    fitted_model.save(path, keep_versions=5)
    version = artifact.versions_dir(path) / first
    stamp = artifact._recorded_stamp(version)
    assert stamp is not None and before <= stamp <= time.time_ns() and version.stat().st_mtime_ns == stamp
    for recorded, read in ((1, 1), (0, None), (2**63 - 1, 2**63 - 1), (2**63, None), (-5, None)):
        (version / "archived.json").write_text('{"archived_ns": %d}' % recorded)
        assert artifact._recorded_stamp(version) == read, recorded
    (version / "archived.json").unlink()  # as an earlier release left it
    assert [v["id"] for v in artifact.list_versions(path)][1:] == [first]
    assert not (version / "archived.json").exists()


def test_a_version_id_is_the_utc_time_and_twelve_digits_whatever_its_created_at_says():
    digest = "0123456789abcdef" * 4
    assert artifact.version_id("2026-01-02T04:04:05+01:00", digest) == "20260102T030405Z-0123456789ab"
    # a created_at no release wrote (an earlier manifest read raw, before its checks): its letters and digits
    said = "made on line 7, shift B, a long while ago"
    assert artifact.version_id(said, digest) == "madeonline7shiftBalo-0123456789ab"
    assert artifact.version_id("", digest) == "unknown-0123456789ab"


def test_a_listing_marks_only_the_current_version_and_lists_an_unreadable_one_with_its_error(fitted_model, tmp_path):
    path = tmp_path / "m"
    first = _earlier_version(fitted_model, path)
    second = _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=5)
    fitted_model.save(path, keep_versions=5)
    (artifact.versions_dir(path) / first / "manifest.json").write_text("{ cut")
    listed = artifact.list_versions(path)
    assert [(v["id"], v["current"]) for v in listed[1:]] == [(second, False), (first, False)] and listed[0]["current"]
    assert listed[2]["error"].startswith(f"{first}/manifest.json is corrupt (")


def test_a_save_over_a_model_deletes_what_it_replaces_itself_and_names_its_copy_for_what_becomes_of_it(
        fitted_model, tmp_path, caplog, monkeypatch):
    """A save that keeps no versions deletes the model it replaced itself, with nothing to say; left to the read after
    it, every such save logged a stopped save's leftover. The copy it sets aside while it swaps is named for what
    becomes of it should the save be killed there: ``.old-unkept-`` (deleted by whoever settles it) with none kept,
    ``.old-`` (archived) with one or more."""
    import logging
    import re

    path = fitted_model.save(tmp_path / "m")
    _save_version(fitted_model, path, "2021-01-01T00:00:00+00:00", keep=0)
    aside: list[str] = []
    real = artifact._swap_locked
    monkeypatch.setattr(artifact, "_swap_locked", lambda p, tmp, old, keep: (aside.append(old.name),
                                                                              real(p, tmp, old, keep))[1])
    with caplog.at_level(logging.WARNING, logger="anomaly_service.artifact"):
        caplog.clear()
        fitted_model.save(path)
    assert caplog.records == [] and not list(tmp_path.glob(".m.old-*"))
    assert artifact.list_versions(path)[1:] == []
    _save_version(fitted_model, path, "2022-01-01T00:00:00+00:00", keep=0)
    fitted_model.save(path, keep_versions=1)
    assert re.fullmatch(r"\.m\.old-unkept-[0-9a-f]+", aside[0]), aside
    assert re.fullmatch(r"\.m\.old-[0-9a-f]+", aside[2]), aside


def test_a_listing_counts_a_fits_training_set_and_what_an_update_added(fitted_model, tmp_path):
    import numpy as np

    from conftest import textured_part

    rng = np.random.default_rng(99)
    path = fitted_model.save(tmp_path / "m")
    fitted_model.update([textured_part(rng) for _ in range(2)]).save(path, keep_versions=5)
    update, fit = artifact.list_versions(path)
    assert (update["made_by"], update["images_added"]) == ("update", 2) and update["patches_added"] > 0
    assert (fit["made_by"], fit["images_added"], fit["patches_added"]) == (
        "fit", fitted_model.manifest_.training.n_images, fitted_model.manifest_.coreset.size)
    assert update["patches_added"] < update["bank_size"]


def test_a_listed_file_that_is_no_file_is_named_so_not_missing(saved):
    (saved / "arrays.npz").unlink()
    (saved / "arrays.npz").mkdir()  # an unpacked archive, say
    with pytest.raises(ModelFormatError, match=r"arrays\.npz is not a file \(a directory\), which the manifest lists"):
        AnomalyModel.load(saved)


def test_the_swap_lock_is_one_file_however_the_model_path_is_spelled(saved, monkeypatch):
    """A rescan reaches a model by its own name, a save may be given a link to it or a relative path: both take the
    same swap lock, or the rescan took a save's set-aside model for a dead one's."""
    import fcntl

    (saved.parent / "current").symlink_to(saved)
    monkeypatch.chdir(saved)
    for spelling in (str(saved.parent / "current"), "."):
        with artifact.swap_lock(spelling, create=True):
            fd = os.open(saved.parent / ".model.swap-lock", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
