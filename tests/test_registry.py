"""The registry under broken and changing model directories: one bad model never blocks the others, errors
are current and carry no server paths, and an interrupted save is recovered."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from anomaly_service.artifact import read_manifest
from anomaly_service.registry import ModelRegistry
from conftest import textured_part, write_manifest


def registry(root: Path) -> ModelRegistry:
    reg = ModelRegistry(root, device="cpu", runtime="torch")
    reg.load_all()
    return reg


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    write_manifest(path, m)


def test_one_malformed_manifest_blocks_nothing_else(models):
    _edit_manifest(models / "a", lambda m: m.pop("config"))
    reg = registry(models)
    assert reg.names() == ["b"]
    errors = reg.errors()
    assert set(errors) == {"a"} and "config" in errors["a"]
    assert str(models) not in errors["a"] and "/" not in errors["a"].split(":")[0]  # names and reasons only
    assert reg.refresh() == {}  # unchanged and broken: not retried, no exception


def test_error_clears_when_the_manifest_is_restored(models):
    reg = registry(models)
    good = (models / "a" / "manifest.json").read_bytes()
    (models / "a" / "manifest.json").write_text('{"format": "anomaly-service/patchcore-model", "format_version": 1}')
    assert reg.refresh()["a"].startswith("failed")
    assert "a" in reg.errors() and "a" in reg.names()  # the last good version keeps serving
    (models / "a" / "manifest.json").write_bytes(good)
    reg.refresh()
    assert reg.errors() == {} and reg.names() == ["a", "b"]


def test_truncated_data_file_is_noticed_by_the_watcher(models):
    reg = registry(models)
    before = reg.get("a")
    data = (models / "a" / "index.faiss").read_bytes()
    (models / "a" / "index.faiss").write_bytes(data[: len(data) // 2])
    change = reg.refresh()["a"]
    assert change.startswith("failed") and "truncated" in change
    assert reg.get("a") is before  # still serving what was loaded
    (models / "a" / "arrays.npz").unlink()
    assert "missing" in reg.refresh()["a"]


def test_unloadable_directories_are_listed(models, tmp_path):
    shutil.copytree(models / "b", models / "bad name!")
    outside = tmp_path / "elsewhere"
    shutil.copytree(models / "b", outside)
    os.symlink(outside, models / "linked")
    reg = registry(models)
    errors = reg.errors()
    assert "valid model name" in errors["bad name!"]
    assert "outside the model directory" in errors["linked"]
    assert reg.names() == ["a", "b"]


def test_a_save_that_died_between_its_renames_is_recovered(models):
    reg = registry(models)
    os.replace(models / "a", models / ".a.old-deadbeef")  # the first rename happened, the second never did
    assert reg.refresh() == {"a": "recovered"}
    assert (models / "a" / "manifest.json").is_file() and reg.names() == ["a", "b"]
    os.replace(models / "b", models / ".b.old-cafe0000")
    assert read_manifest(models / "b").coreset.size > 0  # loading recovers as well
    assert not list(models.glob(".b.old-*"))


def test_a_deleted_model_is_dropped_by_one_rescan_and_a_saving_one_is_not(models):
    """POST /models/reload promises to drop deleted models: one re-scan does it. A model whose save is between its two
    renames (its temporary copy beside it) is absent for an instant and is kept until a second scan misses it."""
    reg = registry(models)
    shutil.rmtree(models / "a")
    assert reg.refresh() == {"a": "removed"} and reg.names() == ["b"]
    (models / ".b.tmp-0badc0de").mkdir()  # the new copy is written, the renames are under way
    shutil.rmtree(models / "b")
    assert reg.refresh() == {} and reg.names() == ["b"]
    assert reg.refresh() == {"b": "removed"}


def test_a_deleted_model_is_dropped_at_once_whatever_another_models_name_holds(models, fitted_model):
    """Whether a model missing from a scan may be mid-save was asked of a pattern made of its name: ``b``'s matched
    the swap lock every save of a model named ``b.old-1`` leaves, so deleting ``b`` took two re-scans and a reload
    did not drop it as it says."""
    fitted_model.save(models / "b.old-1")
    reg = registry(models)
    assert reg.names() == ["a", "b", "b.old-1"]
    shutil.rmtree(models / "b")
    assert reg.refresh() == {"b": "removed"} and reg.names() == ["a", "b.old-1"]


def test_concurrent_refreshes_keep_the_books_straight(models):
    reg = registry(models)
    errors: list[BaseException] = []
    changes: list[dict[str, str]] = []
    shutil.copytree(models / "b", models / "c")

    def refresh() -> None:
        try:
            changes.append(reg.refresh())
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and reg.names() == ["a", "b", "c"] and reg.errors() == {}
    # one refresh at a time: the new model is loaded once, and the refreshes after it find nothing to do
    assert sorted(changes, key=len) == [{}, {}, {}, {"c": "loaded"}]


def test_a_good_version_saved_during_a_failed_start_up_load_is_loaded_by_the_next_scan(models, fitted_model):
    """load_all took a failed model's state after the load: a re-fit swapped in meanwhile was recorded as the
    failure and never retried until its files changed again. It takes the state before, as refresh does."""
    from anomaly_service.errors import AnomalyError

    class SavedDuringLoad(ModelRegistry):
        def _load(self, name: str):  # the load itself, on the model's own thread (stuck_io.py)
            try:
                return super()._load(name)
            except AnomalyError:
                fitted_model.save(self.model_dir / name)  # the re-fit lands after the loader read the broken files
                raise

    _edit_manifest(models / "a", lambda m: m.pop("config"))
    reg = SavedDuringLoad(models, device="cpu", runtime="torch")
    assert reg.load_all()["a"].startswith("failed")
    assert reg.refresh() == {"a": "loaded"}
    assert reg.names() == ["a", "b"] and reg.errors() == {}


def test_a_load_error_names_no_server_path_for_a_relative_model_dir(tmp_path, monkeypatch):
    """/readyz and /models are unauthenticated: a reason shows the model's own path, never where the server keeps
    its models (a relative --model-dir is also the tail of its resolved path)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    reg = ModelRegistry(Path("models"), device="cpu", runtime="torch")
    error = OSError(f"{tmp_path / 'models' / 'a' / 'index.faiss'} is truncated")
    assert reg._reason(error) == "a/index.faiss is truncated"
    assert reg._reason(OSError("models/a/index.faiss is truncated")) == "a/index.faiss is truncated"


def test_a_model_name_is_one_path_component_with_no_trailing_newline():
    from anomaly_service.registry import valid_name

    assert valid_name("bottle") and valid_name("line-2.top_cam")
    for bad in ("bottle\n", "../bottle", ".versions", "a/b", "", "a..b", "x" * 129):
        assert not valid_name(bad), bad


# ------------------------------------------------------------------------------------- saves and rescans at once
def _version(path: Path, created_at: str, other_bytes: bool = False) -> tuple[dict, dict[str, bytes]]:
    """The model at ``path`` as another version (its manifest says another time), as ``write_artifact`` takes it.
    ``other_bytes``: its arrays file differs too (an array nothing reads), as a re-fit's files do."""
    from anomaly_service.artifact import arrays_to_bytes, bytes_to_arrays, read_artifact
    from anomaly_service.manifest import DIGEST_KEY

    _, files = read_artifact(path)
    if other_bytes:
        arrays = bytes_to_arrays(files["arrays.npz"])
        files["arrays.npz"] = arrays_to_bytes({**arrays, "unread": np.arange(3)})
    raw = json.loads((path / "manifest.json").read_text())
    raw["created_at"] = created_at
    raw.pop("files"), raw.pop(DIGEST_KEY)
    return raw, files


class PausedSaves:
    """Saves of model ``name`` (the real ``write_artifact``, in threads) that stop right after their first rename, the
    previous model set aside and the new one not yet in place, until ``resume`` is set or ``hold`` seconds pass: the
    instant between a save's renames, widened so that a rescan lands in it."""

    def __init__(self, monkeypatch, name: str, hold: float = 1.0):
        self.resume = threading.Event()
        self.errors: list[BaseException] = []
        self._paused = threading.Semaphore(0)
        rename = os.replace

        def replace(src, dst, **kwargs):
            rename(src, dst, **kwargs)
            if Path(src).name == name and Path(dst).name.startswith(f".{name}.old-"):
                self._paused.release()
                self.resume.wait(hold)

        monkeypatch.setattr(os, "replace", replace)

    def start(self, path: Path, version: tuple[dict, dict[str, bytes]]) -> threading.Thread:
        """A save of ``version`` at ``path``, returned once it stands between its renames."""
        from anomaly_service.artifact import write_artifact

        def save() -> None:
            try:
                write_artifact(path, *version)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                self.errors.append(exc)

        thread = threading.Thread(target=save)
        thread.start()
        assert self._paused.acquire(timeout=60)
        return thread


def _served(reg: ModelRegistry, name: str) -> str:
    return reg.get(name).model.manifest_.created_at


def test_a_rescan_during_a_saves_renames_waits_for_it_and_never_puts_the_old_model_back(models, monkeypatch):
    """The rescan's recovery took the model a save had just set aside for one that died mid-swap and put it back:
    the save's second rename then failed (the service counted a 'recovered' model, the re-fit was lost). A
    rescan now waits for a save between its renames, then loads what it saved."""
    reg = registry(models)
    saves = PausedSaves(monkeypatch, "a")
    saver = saves.start(models / "a", _version(models / "a", "2030-01-01T00:00:00+00:00"))
    changes: dict[str, str] = {}
    scan = threading.Thread(target=lambda: changes.update(reg.refresh()))
    scan.start()
    scan.join(0.3)  # the rescan meets the save between its renames
    saves.resume.set()
    scan.join()
    saver.join()
    assert saves.errors == []
    changes.update(reg.refresh())
    assert changes == {"a": "reloaded"} and reg.errors() == {} and reg.names() == ["a", "b"]
    assert _served(reg, "a") == "2030-01-01T00:00:00+00:00"


def test_a_model_listed_by_a_rescan_and_then_set_aside_by_a_save_is_waited_for_not_missing(models, monkeypatch):
    """A save that set the model aside after the rescan listed it: the load found no model and the rescan reported
    'failed: no model named ...' for a model that was being re-fitted. It now waits for the save and loads it."""
    saves = PausedSaves(monkeypatch, "a")
    after_listing = threading.Event()
    savers: list[threading.Thread] = []

    class SavedAfterListing(ModelRegistry):
        def _scan(self):
            found = super()._scan()
            if after_listing.is_set():
                after_listing.clear()
                savers.append(saves.start(models / "a", _version(models / "a", "2030-01-01T00:00:00+00:00")))
            return found

    reg = SavedAfterListing(models, device="cpu", runtime="torch")
    reg.load_all()
    after_listing.set()
    changes = reg.refresh()
    savers[0].join()
    assert saves.errors == [] and changes == {"a": "reloaded"} and reg.errors() == {}
    assert _served(reg, "a") == "2030-01-01T00:00:00+00:00"


def test_rescans_that_land_between_the_renames_of_two_saves_never_unload_the_model(models, monkeypatch):
    """A model absent from two rescans in a row is dropped (a deleted one goes); two saves each caught by a rescan
    between their renames made a good model look deleted. A rescan that misses a model waits for a save under way
    and looks again."""
    from anomaly_service import registry as registry_module

    reg = registry(models)
    saves = PausedSaves(monkeypatch, "a")
    savers: list[threading.Thread] = []
    listed = registry_module.leftover_names

    def list_then_save(directory):  # a save starts once the rescan has looked for leftovers
        out = listed(directory)
        savers.append(saves.start(models / "a", _version(models / "a", f"203{len(savers)}-01-01T00:00:00+00:00")))
        return out

    monkeypatch.setattr(registry_module, "leftover_names", list_then_save)
    changes = [reg.refresh(), reg.refresh()]
    for saver in savers:
        saver.join()
    monkeypatch.undo()
    assert saves.errors == [] and "removed" not in [c for change in changes for c in change.values()]
    assert reg.names() == ["a", "b"]
    reg.refresh()
    assert _served(reg, "a") == "2031-01-01T00:00:00+00:00" and reg.errors() == {}


def test_a_save_swapped_in_while_a_rescan_reads_the_model_is_loaded_whole(models, monkeypatch):
    """A rescan read the new manifest, then a second save swapped its directory in, then the rescan read the data
    files of that one: 'corrupt', a failed reload of a good model. A load whose files changed under it loads again."""
    from anomaly_service import artifact

    reg = registry(models)
    artifact.write_artifact(models / "a", *_version(models / "a", "2030-01-01T00:00:00+00:00"))  # a re-fit to load
    second = _version(models / "a", "2031-01-01T00:00:00+00:00", other_bytes=True)
    read = artifact.read_manifest
    saved: list[Path] = []

    def read_then_save(path, settle=True, digest=None):
        manifest = read(path, settle, digest)
        if Path(path).name == "a" and not saved:  # between the manifest and the files the loader reads
            saved.append(artifact.write_artifact(models / "a", *second))
        return manifest

    monkeypatch.setattr(artifact, "read_manifest", read_then_save)
    changes = reg.refresh()
    assert changes == {"a": "reloaded"} and reg.errors() == {}
    entry = reg.get("a")
    assert entry.model.manifest_.created_at == "2031-01-01T00:00:00+00:00"
    assert entry.version == artifact.fingerprint(models / "a")  # the version it says is the one it serves


def test_a_directory_whose_name_is_not_utf8_is_listed_and_readyz_still_answers(models):
    """A model folder named under another code page is refused as a model name, and listed with why; its name, read
    as lone surrogates, made every /readyz (the readiness probe) a 500 when JSON encoded it as UTF-8."""
    from starlette.responses import JSONResponse

    shutil.copytree(models / "b", models / os.fsdecode(b"caf\xe9"))
    reg = registry(models)
    errors = reg.errors()
    assert "valid model name" in errors["caf\\xe9"]
    assert JSONResponse({"errors": errors}).status_code == 200  # renders as /readyz and /models do
    assert reg.names() == ["a", "b"]


def test_a_manifest_naming_a_training_file_in_another_code_page_reads_as_text(models):
    """Models fitted before training names were made text kept such a name as a lone surrogate (here among the
    images the threshold was set without): /models/{name} then failed to encode the manifest, a 500."""
    _edit_manifest(models / "a", lambda m: m["training"].__setitem__("left_out_of_threshold", ["good/p\udce9.png"]))
    manifest = read_manifest(models / "a")
    assert manifest.training.left_out_of_threshold == ["good/p\\xe9.png"]
    json.dumps(manifest.model_dump(mode="json"), ensure_ascii=False).encode("utf-8")
    assert registry(models).names() == ["a", "b"]


def test_a_model_directory_that_is_not_there_keeps_the_loaded_models_serving(models, caplog):
    """An unmounted or unreachable model volume (a network share's outage, a remount) says nothing about the models,
    which are whole in memory: two re-scans without it unloaded every one, and the line's parts all got 404
    unknown_model until the volume was back. They keep serving; a model deleted from a listed directory still goes."""
    reg = registry(models)
    away = models.with_name("models.away")
    models.rename(away)
    for _ in range(3):
        assert reg.refresh() == {} and reg.names() == ["a", "b"]
    assert "is not there" in caplog.text
    away.rename(models)
    assert reg.refresh() == {} and reg.names() == ["a", "b"]
    shutil.rmtree(models / "a")
    assert reg.refresh() == {"a": "removed"} and reg.names() == ["b"]


def test_an_unknown_models_404_names_at_most_twenty_loaded_ones():
    """A 404 for a model not loaded lists the loaded ones: a plant serving hundreds of variants got every name in
    each answer and each log line. It names twenty and points to GET /models for the rest."""
    from anomaly_service.registry import _some

    names = [f"variant{i:03d}" for i in range(230)]
    text = _some(names)
    assert text.startswith("variant000, variant001") and "variant019" in text and "variant020" not in text
    assert text.endswith("and 210 more: GET /models lists them")
    assert _some(names[:3]) == "variant000, variant001, variant002" and _some([]) == "none"


@pytest.mark.parametrize("change", ["update", "rollback"])
def test_a_rescan_during_an_update_or_rollback_leaves_its_version_to_it(models, monkeypatch, change):
    """An update or rollback here loads the version it writes; a re-scan (the watcher, POST /models/reload) that
    came between its save and that load loaded the same version a second time and reported it "reloaded": every
    change was counted twice in anomaly_model_reloads_total, loaded and warmed twice, and its drift window restarted
    twice (a hunt with the watcher at 0.05 s counted 59 reloads for 77 updates and rollbacks). The re-scan is run
    at that very point, from the change log's write, which comes between the two."""
    from anomaly_service import model_history

    reg = registry(models)
    rng = np.random.default_rng(5)
    good = [textured_part(rng) for _ in range(2)]  # parts the fit never saw
    if change == "rollback":  # an archived version to go back to
        reg.update("a", good[:1])
    before = reg.get("a")
    during: list[dict[str, str]] = []
    hook = "record_update" if change == "update" else "record"
    real = getattr(model_history, hook)

    def rescan_meanwhile(*args, **kwargs):
        during.append(reg.refresh())
        return real(*args, **kwargs)

    monkeypatch.setattr(model_history, hook, rescan_meanwhile)
    if change == "update":
        entry = reg.update("a", good[1:])[0]
    else:
        entry = reg.rollback("a", [v["id"] for v in reg.versions("a") if not v["current"]][0])
    assert during == [{}]  # the change's own load serves the version: nothing for the re-scan to do
    assert reg.get("a") is entry and entry.version != before.version
    assert reg.refresh() == {}


def test_a_model_read_while_a_save_has_it_set_aside_is_waited_for_not_missing(models):
    """GET /models/{name}/versions, an update's, a rollback's and POST /models/{name}/reload's look-up of the model
    on disk: between a save's two renames (an update or rollback here, by the CLI or on another replica) the model
    is set aside for an instant, and they answered 404 unknown_model; the listing, which read the manifest and its
    fingerprint apart, answered a 500 (a real service's versions route under back-to-back rollbacks: 2 of each in
    4,000 reads). Here the save is held between its renames, under its swap lock as a save holds it; the reads
    wait for it and list the version it put in place."""
    from anomaly_service.artifact import swap_lock

    reg = registry(models)
    path = models / "a"
    want = reg.versions("a")[0]["id"]
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["path"] = reg.model_path("a")
            got["versions"] = reg.versions("a")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            got["error"] = exc

    aside = models / ".a.old-test"
    with swap_lock(path, create=True):
        path.rename(aside)  # the save's first rename: no model at its name until the second
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(2)  # a bound, not a measure: the reader waits for the lock, or has failed at once
        aside.rename(path)  # the second rename (the same version put back, to name what is listed)
    reader.join()
    assert "error" not in got, got.get("error")
    assert got["path"] == path and [v["id"] for v in got["versions"] if v["current"]] == [want]  # type: ignore[union-attr]


def test_a_save_between_the_fingerprint_and_the_load_is_served_under_its_own_version(models, monkeypatch):
    """A load read the model's fingerprint, then loaded the files: a save in between (the CLI, another replica)
    made an entry that named the replaced version while it held the new one's bank and threshold, and every answer
    and record named that wrong version until the next change (a watcher beside a process rolling a model back and
    forth: 4 of 19 loads mislabelled). The version is now the one the load read. The save is made at that very
    point, from the fingerprint's read."""
    from anomaly_service import registry as registry_module
    from anomaly_service.artifact import fingerprint

    reg = registry(models)
    path = models / "a"
    newer = reg.get("a").model.update([textured_part(np.random.default_rng(5))])
    real = registry_module._fingerprint
    saved: list[bool] = []

    def save_meanwhile(where: Path) -> str | None:
        version = real(where)
        if not saved:
            saved.append(True)
            newer.save(where)
        return version

    monkeypatch.setattr(registry_module, "_fingerprint", save_meanwhile)
    entry = reg.load("a")
    on_disk = fingerprint(path)
    assert saved and entry.version == on_disk and entry.model.version_id_.endswith(on_disk[:12])
    assert entry.model.manifest_.calibration.threshold == newer.manifest_.calibration.threshold


_TWO_LOADS = """
import sys, threading
from pathlib import Path
from anomaly_service.registry import ModelRegistry
reg = ModelRegistry(Path(sys.argv[1]), device="cpu", runtime="onnx", load_timeout=600)
go = threading.Barrier(2)
def load(name):
    go.wait()
    reg.load(name)
threads = [threading.Thread(target=load, args=(name,)) for name in ("a", "b")]
for t in threads:
    t.start()
for t in threads:
    t.join()
a, b = reg.get("a").model.embedder, reg.get("b").model.embedder
print(a.backbone is b.backbone, a._onnx is b._onnx)
"""


def test_two_models_loaded_at_once_share_one_backbone(models):
    """Loads of two models run at once since each model's files are read on a thread of its own (the registry-wide
    load lock is gone): both missed the shared backbone and each built one, so a service held the network and its
    ONNX export once per model. In a fresh process (this one already holds the backbone), two loads at once."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TWO_LOADS, str(models)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
