"""Feedback into the model: update with good images, versions, rollback, and the known-defect guard.

The session ``fitted_model`` is never changed (``update`` returns a new model); tests that save work on copies
in their own directories.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service import AnomalyModel, ModelFormatError
from anomaly_service.artifact import list_versions, model_version_id, rollback
from anomaly_service.errors import UpdateRefusedError, UpdateUnavailableError

from conftest import add_defect, png_bytes, textured_part, write_manifest

LEGACY = Path(__file__).parent / "data" / "legacy_v1"


def variant(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A good part the fit never saw: same texture, a darker, lower-contrast lighting (a new lamp, say)."""
    return np.clip(textured_part(rng, size, size).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def variants() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [variant(rng) for _ in range(5)]


@pytest.fixture(scope="module")
def defect(variants) -> np.ndarray:
    return add_defect(variants[-1], 60, 60)[0]


@pytest.fixture(scope="module")
def updated(fitted_model, variants, defect):
    return fitted_model.update(variants[:3], known_defects=[defect])


def train_images(fitted_model, rng_images) -> list[np.ndarray]:
    """The session model's training images (those not held out for calibration), as fit() splits them."""
    n = len(rng_images)
    order = np.random.default_rng(fitted_model.config.seed).permutation(n)
    n_cal = int(round(n * fitted_model.config.calibration_fraction))
    held = set(order[:n_cal].tolist())
    return [im for i, im in enumerate(rng_images) if i not in held]


def review(client, iid: str, verdict: str, reviewer: str = "qa") -> None:
    r = client.post(f"/inspections/{iid}/review", json={"verdict": verdict}, headers={"X-Reviewer": reviewer})
    assert r.status_code == 200, r.text


def scored_and_reviewed(client, photos: list, verdicts: str | list[str | None] = "good", *,
                        flagged: bool = False) -> list[str]:
    """Score each photo (an image, or a file's bytes) with the service's model ``part``, wait for the records, and
    review each part as ``verdicts`` says (one verdict for all, or one a photo, None leaving it unreviewed). Every
    photo is scored (and, ``flagged``, flagged) and every review taken; the inspection ids in the photos' order."""
    ids = []
    for photo in photos:
        data = photo if isinstance(photo, bytes) else png_bytes(photo)
        r = client.post("/score?model=part", files={"file": ("p.png", data)})
        assert r.status_code == 200 and (r.json()["is_anomaly"] or not flagged), r.text
        ids.append(r.json()["inspection_id"])
    assert client.app.state.service.recorder.flush()
    for iid, verdict in zip(ids, [verdicts] * len(ids) if isinstance(verdicts, str) else verdicts, strict=True):
        if verdict:
            review(client, iid, verdict)
    return ids


def test_update_makes_a_flagged_good_variant_pass_while_a_defect_still_fails(fitted_model, updated, variants, defect,
                                                                               rng_images):
    unseen = variants[3]
    assert fitted_model.score(unseen).is_anomaly  # a false alarm before the update
    assert not updated.score(unseen).is_anomaly  # learned from three like it
    assert updated.score(defect).is_anomaly
    assert updated.score(add_defect(rng_images[1], 40, 80)[0]).is_anomaly
    assert fitted_model.score(unseen).is_anomaly  # the original model is untouched (it may be serving)
    lineage = updated.manifest_.lineage
    assert lineage.made_by == "update" and lineage.images_added == 3 and lineage.updates == 1
    assert updated.knn.bank_size == fitted_model.knn.bank_size + lineage.patches_added
    assert 0 < lineage.patches_added < 3 * 16 * 16  # only what the bank did not cover, not every patch
    assert updated.manifest_.calibration.threshold != fitted_model.manifest_.calibration.threshold


def nudged(image: np.ndarray) -> np.ndarray:
    """The image with one pixel's lowest bit flipped: what the bank already covers, though not the exact duplicate an
    update skips (test_duplicates.py)."""
    out = image.copy()
    out[0, 0, 0] ^= 1
    return out


def test_images_already_covered_add_nothing_and_keep_the_threshold(fitted_model, rng_images):
    again = fitted_model.update([nudged(im) for im in train_images(fitted_model, rng_images)])
    assert again.manifest_.lineage.patches_added <= 2
    # re-scored from the float16 calibration grids: the threshold is the fit's to rounding
    assert again.calibration_.threshold == pytest.approx(fitted_model.calibration_.threshold, rel=1e-3)
    radius = fitted_model.manifest_.coreset.coverage_radius
    assert radius is not None and radius > 0
    # the documented fallback recovers the recorded radius from the bank alone
    import torch

    bank = torch.from_numpy(fitted_model.knn.bank())
    assert fitted_model.knn.sampler.radius_from_bank(bank) == pytest.approx(radius, rel=1e-4)


def test_guard_refuses_and_lists_known_defects_that_would_pass_force_overrides(fitted_model, variants):
    reviewed_bad = variants[4]  # an operator called this lighting a defect: adding its like as good must not pass
    with pytest.raises(UpdateRefusedError) as err:
        fitted_model.update(variants[:3], known_defects=[reviewed_bad], defect_names=["lamp-off.png"])
    assert err.value.images == ["lamp-off.png"] and err.value.reason == "defect_would_pass"
    assert "lamp-off.png" in str(err.value)
    forced = fitted_model.update(variants[:3], known_defects=[reviewed_bad], defect_names=["lamp-off.png"],
                                 force=True)
    assert forced.defects_passing_ == ["lamp-off.png"] and forced.manifest_.lineage.forced
    # an image reviewed as a defect is never added as good, force or not
    with pytest.raises(UpdateRefusedError, match="never added") as err:
        fitted_model.update([variants[0], reviewed_bad], known_defects=[reviewed_bad], names=["a", "b"], force=True)
    assert err.value.images == ["b"] and err.value.reason == "defect_as_good"


def test_the_guard_reads_known_defects_a_few_at_a_time(fitted_model, variants, tmp_path):
    """Every defect the operators reviewed over months guards each update (the records hold them all): decoded at once
    they took more memory than the service has (a 5 MP photo is 15 MB of pixels). They are read a chunk at a time,
    and every one still counts."""
    import tracemalloc

    from anomaly_service.feedback import DEFECT_CHUNK

    side, n = 1024, 5 * DEFECT_CHUNK
    photo = np.asarray(Image.fromarray(add_defect(variants[4], 64, 64, radius=14)[0]).resize((side, side)))
    encoded = png_bytes(photo)  # the same photo in every file, encoded once: encoding a PNG this large is slow
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"defect-{i}.png")
        paths[-1].write_bytes(encoded)
    paths.append(tmp_path / "lamp-off.png")  # one a reviewer called a defect that the update lets pass
    Image.fromarray(variants[4]).save(paths[-1])
    tracemalloc.start()
    try:
        new = fitted_model.update(variants[:3], known_defects=paths, force=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert new.defects_passing_ == [str(paths[-1])]
    assert peak < n * side * side * 3 / 2  # all of them decoded at once are twice this


def test_versions_listed_and_rollback_restores_scores_exactly(fitted_model, updated, variants, tmp_path):
    path = fitted_model.save(tmp_path / "part")
    fit_id = model_version_id(path)
    probes = [variants[3], variants[4], textured_part(np.random.default_rng(3))]
    before = [AnomalyModel.load(path, runtime="torch").score(p) for p in probes]
    updated.save(path, keep_versions=3)
    listed = list_versions(path)
    assert [v["current"] for v in listed] == [True, False]
    assert listed[0]["made_by"] == "update" and listed[0]["images_added"] == 3 and listed[1]["id"] == fit_id
    assert listed[0]["bank_size"] == updated.knn.bank_size and listed[1]["made_by"] == "fit"
    assert (tmp_path / ".versions" / "part" / fit_id / "manifest.json").is_file()  # hidden from the registry
    rollback(path, fit_id)
    assert model_version_id(path) == fit_id
    after = [AnomalyModel.load(path, runtime="torch").score(p) for p in probes]
    for a, b in zip(before, after):
        assert a.score == b.score and a.threshold == b.threshold
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    listed = list_versions(path)
    assert listed[0]["id"] == fit_id and listed[1]["made_by"] == "update"  # the rollback can be undone
    with pytest.raises(LookupError, match="no archived version"):
        rollback(path, "20000101T000000Z-000000000000")
    for _ in range(2):  # at most keep_versions old versions are kept
        fitted_model.save(path, keep_versions=2)
        updated.save(path, keep_versions=2)
    assert len(list_versions(path)) <= 3


def test_calibration_file_is_listed_and_verified_by_checksum(fitted_model, tmp_path):
    path = fitted_model.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["calibration_set"]["file"] == "calibration.npz" and "calibration.npz" in manifest["files"]
    assert manifest["lineage"] == {"made_by": "fit", "parent": None, "images_added": 0, "patches_added": 0,
                                   "updates": 0, "forced": False, "seconds": None}
    data = (path / "calibration.npz").read_bytes()
    (path / "calibration.npz").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ModelFormatError, match="calibration.npz is corrupt"):
        AnomalyModel.load(path)


def test_legacy_models_refuse_update_with_the_way_out():
    legacy = AnomalyModel.load(LEGACY / "default", device="cpu")
    with pytest.raises(UpdateUnavailableError, match="re-fit once with this release to enable updates"):
        legacy.update([np.zeros((64, 64, 3), np.uint8)])


def test_a_model_of_a_newer_format_revision_scores_but_refuses_an_update(fitted_model, variants, tmp_path):
    """A later release adds manifest fields that this one keeps but does not act on (the branch's learnt bound,
    once): scoring ignores them, but an update here would re-calibrate without them and write the model back as
    if it were whole. So it is refused, naming both revisions, and the model is left as it was."""
    from anomaly_service.manifest import FORMAT_REVISION

    path = fitted_model.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_revision"] = FORMAT_REVISION + 1
    manifest["a_later_release_field"] = {"bound": 1.0}
    write_manifest(path, manifest)
    newer = AnomalyModel.load(path, device="cpu")
    assert newer.score(variants[0]).score == pytest.approx(fitted_model.score(variants[0]).score)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(UpdateUnavailableError, match=f"format revision {FORMAT_REVISION + 1}; this release writes "
                                                     f"{FORMAT_REVISION}"):
        newer.update(variants[:2])
    from anomaly_service.cli import app

    good = tmp_path / "good"
    good.mkdir()
    for i, im in enumerate(variants[:2]):
        Image.fromarray(im).save(good / f"{i}.png")
    res = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "-q"])
    assert res.exit_code != 0 and "newer release" in res.output, res.output
    assert (path / "manifest.json").read_bytes() == before


def test_cli_update_versions_rollback(fitted_model, variants, defect, tmp_path):
    from anomaly_service.cli import app

    path = fitted_model.save(tmp_path / "part")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    for i, im in enumerate(variants[:3]):
        Image.fromarray(im).save(good / f"{i}.png")
    Image.fromarray(variants[4]).save(bad / "lamp-off.png")
    runner = CliRunner()
    refused = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--defects", str(bad), "-q",
                                  "--runtime", "torch"])
    assert refused.exit_code == 3 and "lamp-off.png" in refused.output
    assert "--force" in refused.output  # it said "force to update anyway", and the flag is --force
    Image.fromarray(defect).save(bad / "lamp-off.png")  # a real defect: the update keeps flagging it
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--defects", str(bad), "-q",
                              "--runtime", "torch", "--by", "ann", "--note", "new lamp on line 2\nsee ticket 7"])
    assert res.exit_code == 0, res.output
    assert "patches added" in res.output
    listed = json.loads(runner.invoke(app, ["versions", str(path), "--json"]).output)
    assert [v["made_by"] for v in listed] == ["update", "fit"]
    res = runner.invoke(app, ["rollback", str(path), "--to", listed[1]["id"]])
    assert res.exit_code == 0, res.output
    assert model_version_id(path) == listed[1]["id"]
    # the change log: who changed the model, from which version to which, and why; newest first
    import getpass

    rolled, updated = json.loads(runner.invoke(app, ["versions", str(path), "--history", "--json"]).output)
    assert (updated["action"], updated["by"], updated["note"], updated["via"]) == \
        ("update", "ann", "new lamp on line 2 see ticket 7", "cli")  # one line, whatever was typed
    assert (updated["previous"], updated["version"]) == (listed[1]["id"], listed[0]["id"])
    assert updated["images_added"] == 3 and len(updated["images"]) == 3 and not updated["forced"]
    assert (rolled["action"], rolled["previous"], rolled["version"], rolled["by"]) == \
        ("rollback", listed[0]["id"], listed[1]["id"], getpass.getuser())
    text = runner.invoke(app, ["versions", str(path), "--history"]).output
    assert text.index("rollback") < text.index("update +3 images") and "note: new lamp" in text


def test_a_change_logged_from_another_code_page_keeps_the_versions_answer(fitted_model, variants, tmp_path):
    """`anomaly update --by` typed in a terminal set to Latin-1 (an SSH client's default on a plant's Windows PC),
    or a good photo named in another code page, reached the change log as lone surrogates, Python's form for bytes
    that are no UTF-8: JSON wrote them, and no UTF-8 answer can carry them, so GET /models/{name}/versions was a 500
    for that model from then on. Such bytes are logged as \\xNN text, and a log an earlier release wrote so is
    read the same way."""
    import os

    from fastapi.testclient import TestClient

    from anomaly_service import model_history
    from anomaly_service.api import create_app
    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(variants[0]).save(good / os.fsdecode(b"Pr\xfcf.png"))
    latin1 = [os.fsdecode(b"J\xfcrgen"), os.fsdecode(b"Fehlalarm am \xd8-Rand")]  # argv bytes as Python reads them
    res = CliRunner().invoke(app, ["update", str(models / "part"), "--add-good", str(good), "-q", "--runtime", "torch",
                                   "--by", latin1[0], "--note", latin1[1]])
    assert res.exit_code == 0, res.output
    with open(model_history.history_path(models / "part"), "a") as f:  # as an earlier release logged a rollback
        f.write(json.dumps({"at": "2026-12-01T08:00:00+00:00", "action": "rollback", "version": "v0",
                            "previous": None, "by": latin1[0], "note": None, "via": "cli"}) + "\n")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.get("/models/part/versions")
        assert r.status_code == 200, r.text
        earlier, update = r.json()["history"][:2]
    assert (update["by"], update["note"]) == ("J\\xfcrgen", "Fehlalarm am \\xd8-Rand")
    assert update["images"][0].endswith("Pr\\xfcf.png") and earlier["by"] == "J\\xfcrgen"
    model_history.history_path(models / "part").read_bytes().decode("utf-8")  # valid UTF-8 to any reader


def dotnet_form(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart body as .NET's HttpClient writes it (MultipartFormDataContent.Add(content, name, fileName)): a
    name beyond ASCII as an RFC 2047 encoded word in ``filename`` and percent-encoded UTF-8 in ``filename*``.
    ``parts``: (field, file name, bytes); an ASCII name (a ``=?...?=`` word among them) is sent as it is."""
    import base64
    from urllib.parse import quote

    boundary = "0f5e7c4a-dotnet"
    body = b""
    for field, name, data in parts:
        if name.isascii():  # an ASCII name, or the word alone, is sent as it is
            disposition = f'form-data; name={field}; filename="{name}"'
        else:
            word = "=?utf-8?B?" + base64.b64encode(name.encode()).decode() + "?="
            disposition = f"form-data; name={field}; filename=\"{word}\"; filename*=utf-8''{quote(name)}"
        body += (f"--{boundary}\r\nContent-Type: image/png\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                 + data + b"\r\n")
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_file_named_by_a_dotnet_client_keeps_its_name(fitted_model, variants, tmp_path):
    """.NET's HttpClient, which many a plant's MES is written with, sends a file name beyond ASCII twice: RFC 5987's
    filename* (the name) and an RFC 2047 word in filename for old mail readers. The service read only the word:
    an update's image went into the change log, and every later version's catalog, as '=?utf-8?B?UHLDvGYucG5n?=',
    and /score/batch answered each item's filename so."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    photo = png_bytes(variants[0])
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        body, headers = dotnet_form([("files", "Prüf Ø12.png", photo), ("files", "=?utf-8?Q?Teil_=C3=BC.png?=", photo),
                                     ("files", "plain.png", photo)])
        r = client.post("/score/batch?model=part", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert [item["filename"] for item in r.json()["results"]] == ["Prüf Ø12.png", "Teil ü.png", "plain.png"]
        body, headers = dotnet_form([("files", "Fehlalarm 零件.png", photo)])
        r = client.post("/models/part/update", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert client.get("/models/part/versions").json()["history"][0]["images"] == ["Fehlalarm 零件.png"]


def test_a_quoted_file_name_that_spells_filename_star_is_one_name(fitted_model, variants, tmp_path):
    """The file name is a quoted string, and a quoted string may hold anything, "; filename*=" too: the search for
    RFC 5987's parameter looked inside it and took the tail for the name ('evil.png' for the file a client named
    "report; filename*=UTF-8''evil.png")."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    boundary, name = "b0undary", "report; filename*=UTF-8''evil.png"
    body = (f'--{boundary}\r\nContent-Type: image/png\r\nContent-Disposition: form-data; name=files; '
            f'filename="{name}"\r\n\r\n').encode() + png_bytes(variants[0]) + f"\r\n--{boundary}--\r\n".encode()
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/score/batch?model=part", content=body,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 200, r.text
        assert [item["filename"] for item in r.json()["results"]] == [name]


def test_api_update_versions_rollback_with_a_concurrent_scorer(fitted_model, variants, defect, tmp_path):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    legacy_src = LEGACY / "default"
    models = tmp_path / "models"
    fitted_model.save(models / "part")
    import shutil

    shutil.copytree(legacy_src, models / "legacy")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    probe = png_bytes(variants[3])
    with TestClient(create_app(settings)) as client:
        assert client.post("/score?model=part", files={"file": ("p.png", probe)}).json()["is_anomaly"]
        statuses: list[int] = []
        stop = threading.Event()

        def score_loop() -> None:
            while not stop.is_set():
                statuses.append(client.post("/score?model=part", files={"file": ("p.png", probe)}).status_code)

        scorer = threading.Thread(target=score_loop)
        scorer.start()
        try:
            # refused: the uploaded known defect would pass; the answer lists it
            r = client.post("/models/part/update", data={"force": "false"},
                            files=[("files", (f"g{i}.png", png_bytes(im))) for i, im in enumerate(variants[:3])]
                            + [("defects", ("lamp-off.png", png_bytes(variants[4])))])
            assert r.status_code == 409 and r.json()["error"] == "update_refused"
            assert r.json()["images"] == ["lamp-off.png"]
            r = client.post("/models/part/update", data={"note": "lamp replaced"}, headers={"X-Reviewer": "m.keller"},
                            files=[("files", (f"g{i}.png", png_bytes(im))) for i, im in enumerate(variants[:3])]
                            + [("defects", ("scratch.png", png_bytes(defect)))])
            assert r.status_code == 200, r.text
            report = r.json()
            assert report["patches_added"] > 0 and report["bank_size"] > report["previous_bank_size"]
        finally:
            stop.set()
            scorer.join()
        assert statuses and set(statuses) == {200}  # no failed request while the new version was swapped in
        assert not client.post("/score?model=part", files={"file": ("p.png", probe)}).json()["is_anomaly"]
        listed = client.get("/models/part/versions").json()
        assert listed["current"] == report["version"] and listed["versions"][1]["id"] == report["previous"]
        assert listed["versions"][0]["made_by"] == "update" and listed["versions"][0]["images_added"] == 3
        assert [(c["action"], c["by"], c["note"], c["via"], c["images"]) for c in listed["history"]] == \
            [("update", "m.keller", "lamp replaced", "api", ["g0.png", "g1.png", "g2.png"])]  # a refusal logs nothing
        r = client.post("/models/part/rollback", json={"version": report["previous"], "note": "recall spike"})
        assert r.status_code == 200 and r.json()["current"] == report["previous"]
        change = r.json()["history"][0]  # no X-Reviewer: logged, with nobody named
        assert (change["action"], change["version"], change["previous"], change["by"], change["note"]) == \
            ("rollback", report["previous"], report["version"], None, "recall spike")
        for body, headers in (({"version": report["version"]}, {"X-Reviewer": "a\tb"}),
                              ({"version": report["version"]}, {"X-Reviewer": "\xa0".encode()}),  # nobody
                              ({"version": report["version"], "by": "x"}, {})):  # an unknown field
            assert client.post("/models/part/rollback", json=body, headers=headers).status_code == 422
        assert len(client.get("/models/part/versions").json()["history"]) == 2  # none of them rolled back
        assert client.post("/score?model=part", files={"file": ("p.png", probe)}).json()["is_anomaly"]
        assert client.post("/models/part/rollback", json={"version": "nope"}).status_code == 404
        long = client.post("/models/part/rollback", json={"version": "v" * 60_000})  # not echoed back in full
        assert long.status_code == 422 and len(long.text) < 2000, len(long.text)
        assert ".versions" not in client.get("/models").json()["errors"]  # archived versions are never served
        many = [("files", (f"g{i}.png", png_bytes(variants[0]))) for i in range(settings.max_batch_files + 1)]
        r = client.post("/models/part/update", files=many)  # each decoded image is held: a bounded number
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"
        r = client.post("/models/legacy/update", files=[("files", ("g.png", png_bytes(variants[0])))])
        assert r.status_code == 409 and r.json()["error"] == "update_unavailable"
        assert "re-fit once" in r.json()["detail"]
        assert "part" in [m["name"] for m in client.get("/models").json()["models"]]


def test_api_update_counts_a_recorded_defect_unread_at_the_guard_as_without_photo(fitted_model, variants, defect,
                                                                                   tmp_path):
    """A reviewed defect whose photo the records list as stored but which no longer reads when the guard scores it
    guarded nothing, and the answer says so: two replicas on one picture volume, the other's retention pass removed
    it between the listing and the read (seen in the soak of two replicas), or a file cut short. The answer said
    the guard had scored it (``defects_checked``) and counted it in no ``defects_without_photo``."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        _, cut = scored_and_reviewed(client, [defect, defect[:, ::-1].copy()], "defect")
        records = client.app.state.service.records
        photo = records.files.locate(records.get(cut).image_file)
        photo.write_bytes(photo.read_bytes()[:40])  # listed as stored, and no longer a photo
        r = client.post("/models/part/update", files=[("files", ("g.png", png_bytes(variants[4])))])
        assert r.status_code == 200, r.text
        assert r.json()["defects_checked"] == 1 and r.json()["defects_without_photo"] == 1, r.json()


def test_api_update_from_reviewed_inspections(fitted_model, variants, defect, tmp_path):
    """Through the record store: inspections reviewed as good are added; one reviewed as a defect is refused as
    good and, as a known defect, must stay flagged."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        ids = scored_and_reviewed(client, [*variants[:3], defect], ["good", "good", "good", "defect"])
        assert len(ids) == 4
        r = client.post("/models/part/update", data={"inspection_ids": f"{ids[0]},{ids[3]}"})
        assert r.status_code == 409 and r.json()["images"] == [f"inspection {ids[3]}"]
        r = client.post("/models/part/update", data={"inspection_ids": ids[:3]})
        assert r.status_code == 200, r.text
        assert r.json()["images_added"] == 3 and r.json()["defects_passing"] == [] and r.json()["still_flagged"] == []
        assert r.json()["warnings"] == []
        assert r.json()["defects_checked"] == 1 and r.json()["defects_without_photo"] == 0
        r = client.post("/models/part/update", data={"inspection_ids": "nope"})
        assert r.status_code == 422 and r.json()["error"] == "not_reviewed_good"
        assert "nope (no inspection of model part)" in r.json()["detail"]
        # each id says why it gives no good photo: one reviewed good whose photo retention removed was said to be
        # "not reviewed as good", and the operator went looking for a review
        assert client.post("/score?model=part", files={"file": ("p.png", png_bytes(variants[3]))}).status_code == 200
        assert client.app.state.service.recorder.flush()
        fresh = client.get("/inspections?model=part").json()["items"][0]["id"]
        records = client.app.state.service.records
        records.mark_files([records.get(ids[2]).image_file], "expired")
        r = client.post("/models/part/update", data={"inspection_ids": f"{fresh},{ids[2]}"})
        assert r.status_code == 422 and r.json()["error"] == "not_reviewed_good"
        assert f"{fresh} (not reviewed)" in r.json()["detail"]
        assert f"{ids[2]} (retention removed its photo)" in r.json()["detail"]
        # a known defect whose photo retention removed guards nothing: the answer says so, not a guard it never ran
        records.mark_files([records.get(ids[3]).image_file], "removed")
        r = client.post("/models/part/update", files=[("files", ("g.png", png_bytes(variants[4])))])
        assert r.status_code == 200, r.text
        assert r.json()["defects_checked"] == 0 and r.json()["defects_without_photo"] == 1
        # each named inspection's photo is decoded and held for the whole update, as an upload is: a bounded number
        # (a script naming a month of reviewed parts took the service's memory with it)
        many = ",".join([ids[0]] * settings.max_batch_files + [ids[1]])
        r = client.post("/models/part/update", data={"inspection_ids": many})
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"
        uploads = [("files", (f"g{i}.png", png_bytes(variants[0]))) for i in range(settings.max_batch_files)]
        r = client.post("/models/part/update", data={"inspection_ids": ids[1]}, files=uploads)
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"


def test_false_alarms_reviewed_good_are_offered_until_the_served_version_learns_them(fitted_model, variants, defect,
                                                                                       rng_images, tmp_path):
    """GET /models/{name}/false-alarms lists the parts the model flagged that were reviewed as actually good and
    that the served version has not learnt: not a defect, not a part it passed, not one unreviewed; none once an
    update learnt them, and again after a rollback past that update; a photo gone is counted, not offered."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    with TestClient(create_app(settings)) as client:
        passed = train_images(fitted_model, rng_images)[0]
        ids = scored_and_reviewed(client, [*variants[:3], defect, passed], ["good", "good", None, "defect", "good"])
        items = client.get("/inspections?model=part").json()["items"][::-1]  # oldest first
        assert [i["id"] for i in items] == ids
        assert [i["decision"] for i in items] == ["anomaly"] * 4 + ["normal"]
        listed = client.get("/models/part/false-alarms").json()
        fit_version = listed["version"]
        assert listed["to_learn"] == ids[:2] and listed["learnt"] == 0 and listed["without_photo"] == 0
        assert listed["per_update"] == settings.max_batch_files
        r = client.post("/models/part/update", data={"inspection_ids": listed["to_learn"]})
        assert r.status_code == 200, r.text
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == [] and listed["learnt"] == 2 and listed["version"] == r.json()["version"]
        r = client.post("/models/part/rollback", json={"version": fit_version})
        assert r.status_code == 200, r.text
        assert client.get("/models/part/false-alarms").json()["to_learn"] == ids[:2]  # that version never learnt them
        records = client.app.state.service.records
        records.mark_files([records.get(ids[1]).image_file], "expired")
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[:1] and listed["without_photo"] == 1
        assert client.get("/models/nope/false-alarms").status_code == 404
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.get("/models/part/false-alarms")
        assert r.status_code == 503 and r.json()["error"] == "recording_off"


def test_false_alarms_a_photo_sent_again_is_learnt_with_its_first_copy(fitted_model, variants, tmp_path):
    """The same photo recorded three times (an MES that re-sent it), two reviewed as actually good and taught: the
    update learns the first and skips the second as its exact duplicate; the third, reviewed later, is the photo
    learnt too. The queue offers none of them: it offered the copies for ever, and every teaching of them was
    refused (no new good image to add)."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    with TestClient(create_app(settings)) as client:
        ids = scored_and_reviewed(client, [variants[0]] * 3, ["good", "good", None], flagged=True)
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[:2]
        r = client.post("/models/part/update", data={"inspection_ids": listed["to_learn"]})
        assert r.status_code == 200 and r.json()["images_added"] == 1 and len(r.json()["duplicates"]) == 1, r.text
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == [] and listed["learnt"] == 2
        review(client, ids[2], "good")
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == [] and listed["learnt"] == 3
        r = client.post("/models/part/update", data={"inspection_ids": ids[2:]})  # what offering it led to
        assert r.status_code == 422 and "no new good image" in r.json()["detail"], r.text


def test_false_alarms_a_photo_of_the_fits_own_images_is_learnt_in_any_encoding(fitted_model, variants, rng_images,
                                                                               tmp_path):
    """Two flagged parts reviewed as actually good whose photo has the pixels of an image the model was then fitted on
    again (the plant copied the reviewed photo into ./good and re-fitted the model of that name): the very file, and
    the same pixels in another encoding. The update skips both as images the model has, yet the queue offered them
    after every teaching: the records kept the file's digest, the model its images' pixel digests. The records keep
    the pixels' digest too now; a record made before it (none) is read by its file's digest as before."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    good = tmp_path / "good"
    good.mkdir()
    for i, im in enumerate(rng_images[:6]):
        Image.fromarray(im).save(good / f"{i}.png")
    photo = good / "reviewed.png"
    Image.fromarray(variants[0]).save(photo)
    again = png_bytes(variants[0], compress_level=0)  # the same pixels, another file
    assert again != photo.read_bytes()
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    with TestClient(create_app(settings)) as client:
        ids = scored_and_reviewed(client, [photo.read_bytes(), again, variants[1]], flagged=True)
        assert client.get("/models/part/false-alarms").json()["to_learn"] == ids
        AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False
                     ).fit(sorted(good.iterdir())).save(models / "part")
        assert client.post("/models/part/reload").status_code == 200
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[2:] and listed["learnt"] == 2 and listed["to_learn_total"] == 1
        r = client.post("/models/part/update", data={"inspection_ids": ids[:2]})  # what offering them led to
        assert r.status_code == 422 and "no new good image" in r.json()["detail"], r.text
        records = client.app.state.service.records
        with records.engine.begin() as conn:  # as a record made before the pixels' digest was kept
            conn.execute(sa.text("UPDATE inspections SET pixels_sha256 = NULL WHERE id = :i"), {"i": ids[1]})
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[1:] and listed["learnt"] == 1


def test_false_alarms_looks_on_disk_only_for_the_parts_it_lists(fitted_model, variants, tmp_path, monkeypatch):
    """The queue asks after every review: the answer lists the first ``limit`` parts to learn and counts the rest,
    and only the listed ones' photos are looked for on disk, not the learnt ones'. It listed every part and looked
    for every photo twice: tens of thousands reviewed in a plant's months took seconds of the records' time (a
    slot of the records gate) after each review, and answered megabytes. A part taught and reviewed as a real
    defect since is named: the version serving passes it, which nothing said until the next teaching was refused."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    with TestClient(create_app(settings)) as client:
        ids = scored_and_reviewed(client, variants[:3])
        assert client.post("/models/part/update", data={"inspection_ids": ids[:1]}).status_code == 200
        files = client.app.state.service.records.files
        looked: list[str] = []
        locate = files.locate
        monkeypatch.setattr(files, "locate", lambda key: looked.append(key) or locate(key))
        listed = client.get("/models/part/false-alarms?limit=1").json()
        assert listed["to_learn"] == ids[1:2] and listed["to_learn_total"] == 2 and listed["learnt"] == 1
        assert len(looked) == 1
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[1:] and listed["to_learn_total"] == 2 and listed["without_photo"] == 0
        assert client.get("/models/part/false-alarms?limit=0").status_code == 422
        # the part taught, reviewed as a real defect since: the version serving passes it, and the answer says so
        review(client, ids[0], "defect", "qb")
        listed = client.get("/models/part/false-alarms?limit=1").json()
        assert listed["learnt_defects"] == ids[:1] and listed["learnt"] == 0 and listed["to_learn_total"] == 2


def test_false_alarms_a_photo_of_another_size_is_not_offered(fitted_model, tmp_path):
    """A flagged part photographed at another size (a new camera) and reviewed as actually good is counted as
    unlike, not offered: an update leaves such a photo out, so it was offered after every teaching, and a teaching
    of it alone was refused (no good image to add)."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    bigger = variant(np.random.default_rng(3), 192)
    with TestClient(create_app(settings)) as client:
        (iid,) = scored_and_reviewed(client, [bigger], flagged=True)
        assert client.get(f"/inspections/{iid}").json()["warnings"]  # as scoring answered it
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == [] and listed["unlike"] == 1 and listed["without_photo"] == 0
        r = client.post("/models/part/update", data={"inspection_ids": [iid]})  # what offering it led to
        assert r.status_code == 422 and "unlike" in r.json()["detail"], r.text


def test_false_alarms_a_photo_unlike_the_good_ones_in_its_pixels_is_not_offered(fitted_model, variants, tmp_path):
    """Flagged parts reviewed as actually good whose photo is grey to a colour model, has red and blue swapped, or
    is one level throughout (a lamp off) are counted as unlike, not offered: an update leaves each out as it leaves
    out a photo of another size, so they were offered after every teaching, and a teaching of them alone was
    refused. What scoring said of the photo (its record's warnings) says so without reading it again."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    rng = np.random.default_rng(11)
    grey = np.repeat(textured_part(rng).mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    swapped = np.ascontiguousarray(textured_part(rng)[..., ::-1])
    blank = np.full((128, 128, 3), 90, np.uint8)
    with TestClient(create_app(settings)) as client:
        ids = scored_and_reviewed(client, [grey, swapped, blank, variants[0]], flagged=True)
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == ids[3:] and listed["unlike"] == 3 and listed["to_learn_total"] == 1
        r = client.post("/models/part/update", data={"inspection_ids": ids[:3]})  # what offering them led to
        assert r.status_code == 422 and "unlike" in r.json()["detail"], r.text


def test_false_alarms_of_a_model_that_kept_no_training_images_are_counted_not_offered(fitted_model, variants,
                                                                                        tmp_path):
    """A version saved before models kept their training images cannot say which parts it learnt, and its update
    cannot tell a part it has from a new one: the parts are counted, none offered. Every teaching of them made a
    new version that added the same parts again, and the queue offered them again after each."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(tmp_path / "kept")
    old = AnomalyModel.load(tmp_path / "kept")  # as a model saved before the evidence was kept
    old.catalog_, old.knn.provenance_ = None, None
    assert old.manifest_ is not None
    old.manifest_ = old.manifest_.model_copy(update={"evidence": None})
    old.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data",
                               keep_images="all")
    with TestClient(create_app(settings)) as client:
        assert client.app.state.service.registry.get("part").model.catalog_ is None
        scored_and_reviewed(client, [variants[0]], flagged=True)
        listed = client.get("/models/part/false-alarms").json()
        assert listed["to_learn"] == [] and listed["to_learn_total"] == 1 and listed["names_kept"] is False


@pytest.mark.parametrize("reviewed", ["good", "defect"])
def test_a_recorded_photo_retention_deletes_as_the_update_reads_it_is_a_photo_gone(fitted_model, variants, defect,
                                                                                 tmp_path, monkeypatch, caplog,
                                                                                 reviewed):
    """The records hand an update the path of each reviewed photo (FileStore.locate: under its own name, or set
    aside by a retention chunk that died), and the update reads it later. A live pass deleting it between the
    reader's look and its read raised FileNotFoundError: a 500 for the whole update. It is a photo gone, said as
    one deleted before the look is: a good one leaves nothing to add (422), a known defect is skipped. The file is
    real and really deleted; the look only picks the moment, after the records located it."""
    import logging
    import os

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.records.files import ASIDE_PREFIX
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", data_dir=tmp_path / "data")
    photo = variants[0] if reviewed == "good" else defect
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        (iid,) = scored_and_reviewed(client, [photo], reviewed)
        service = client.app.state.service
        path = service.records.files.path(service.records.get(iid).image_file)
        aside = path.with_name(ASIDE_PREFIX + path.name)
        os.rename(path, aside)  # a chunk that died with it set aside: the records locate it there
        real_is_file, real_update = Path.is_file, service.registry.update

        def deleted_once_looked_at(self: Path) -> bool:
            there = real_is_file(self)
            if there and self == aside:
                os.unlink(aside)  # the live pass's delete, right after the reader found the file there
            return there

        def update(*args, **kwargs):  # the records have located the photo: the update's reads begin
            monkeypatch.setattr(Path, "is_file", deleted_once_looked_at)
            try:
                return real_update(*args, **kwargs)
            finally:
                monkeypatch.setattr(Path, "is_file", real_is_file)

        monkeypatch.setattr(service.registry, "update", update)
        with caplog.at_level(logging.WARNING):
            if reviewed == "good":
                r = client.post("/models/part/update", data={"inspection_ids": iid})
                assert r.status_code == 422 and r.json()["error"] == "update_failed", r.text
                assert r.json()["detail"] == f"no readable good image to add (inspection {iid}: no such file)"
            else:
                r = client.post("/models/part/update", files=[("files", ("g.png", png_bytes(variants[1])))])
                assert r.status_code == 200, r.text
        assert not aside.exists() and f"inspection {iid}: no such file" in caplog.text


def test_an_added_photo_far_from_the_good_parts_size_is_left_out_and_said_so(fitted_model, variants, tmp_path):
    """A photo at another zoom would be learnt at the model's zoom, and scoring it warns that the camera changed: the
    update leaves it out and says why (in the model, the CLI's output, its change log), naming the image; one of
    nothing but such photos changes nothing."""
    from anomaly_service import model_history
    from anomaly_service.cli import app

    small = np.asarray(Image.fromarray(variants[0]).resize((16, 16)))
    new = fitted_model.update([small, variants[1]], force=True, names=["tiny.png", "fine.png"])
    assert new.manifest_.lineage.images_added == 1 and new.update_warnings_ == []
    assert [name for name, _ in new.unlike_] == ["tiny.png"] and new.unlike_[0][1].startswith("this photo is 16 px")
    assert "tiny.png" not in new.catalog_.names and "fine.png" in new.catalog_.names
    path = fitted_model.save(tmp_path / "m")
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(small).save(good / "tiny.png")
    before = model_version_id(path)
    only = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "--force", "-q"])
    assert only.exit_code == 2 and "no good image to add" in only.output and "tiny.png" in only.output, only.output
    assert model_version_id(path) == before and model_history.read(path) == []
    Image.fromarray(variants[1]).save(good / "fine.png")
    out = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "--force", "-q"])
    assert out.exit_code == 0, out.output
    assert "1 good image(s) not added" in out.output and f"{good / 'tiny.png'}: this photo is 16 px" in out.output
    assert "updated with 1 images" in out.output
    (change,) = model_history.read(path)
    assert change["images"] == [str(good / "fine.png")] and change["images_added"] == 1
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    fitted_model.save(tmp_path / "models" / "part")
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/models/part/update", files=[("files", ("tiny.png", png_bytes(small))),
                                                      ("files", ("fine.png", png_bytes(variants[1])))])
        assert r.status_code == 200, r.text
        assert r.json()["images_added"] == 1 and r.json()["warnings"] == []
        assert [line.split(": ", 1)[0] for line in r.json()["not_added"]] == ["tiny.png"]
        r = client.post("/models/part/update", files=[("files", ("tiny.png", png_bytes(small)))])
        assert r.status_code == 422 and r.json()["error"] == "update_failed" and "tiny.png" in r.json()["detail"]


def test_an_added_file_of_several_frames_says_which_frame_was_learnt(fitted_model, variants, tmp_path):
    """The update's ``warnings`` are documented as what scoring says of an added photo, e.g. which frame of a file
    of several was read; the images were decoded to pixels first, which no longer say it, so the list was always
    empty and a stack of exposures was learnt at its first frame without a word."""
    import io

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    buf = io.BytesIO()
    Image.fromarray(variants[0]).save(buf, format="TIFF", save_all=True, append_images=[Image.fromarray(variants[1])])
    stack = buf.getvalue()
    new = fitted_model.update([stack, variants[2]], force=True, names=["stack.tif", "fine.png"])
    assert new.manifest_.lineage.images_added == 2
    (line,) = new.update_warnings_
    assert line.startswith("stack.tif: the file holds 2 frames") and "frame 1 (the first" in line
    fitted_model.save(tmp_path / "models" / "part")
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/models/part/update", data={"force": "true"},
                        files=[("files", ("stack.tif", stack)), ("files", ("fine.png", png_bytes(variants[2])))])
        assert r.status_code == 200, r.text
        assert [w.split(": ", 1)[0] for w in r.json()["warnings"]] == ["stack.tif"]


def _recorded_and_reviewed_as_defect(model, photo, tmp_path, database_url=None):
    """``model`` saved, ``photo`` (flagged today) scored by `anomaly score` into the records (SQLite under the data
    dir, or PostgreSQL with the photos under it) and reviewed as a defect; the same photo waits in a good folder."""
    from anomaly_service.cli import app
    from anomaly_service.records.store import RecordStore

    path = model.save(tmp_path / "part")
    data, good = tmp_path / "data", tmp_path / "good"
    good.mkdir()
    Image.fromarray(photo).save(good / "lamp-off.png")
    url = ["--database-url", database_url] if database_url else []
    res = CliRunner().invoke(app, ["score", "--model", str(path), str(good / "lamp-off.png"), *url,
                                   "--data-dir", str(data), "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    store = RecordStore.open(database_url, data)
    store.upgrade()
    (inspection,) = store.query(limit=5)
    store.review(inspection.id, "defect", "qa")
    return path, data, good, store, inspection.id


def test_cli_update_known_defects_sorted_into_subfolders_guard_it(fitted_model, variants, tmp_path):
    """Reviewed defects are kept one folder per type: --defects read only its top level, so they guarded nothing
    and the update went through without a word. A --defects with no image at all is an error, not no guard."""
    from anomaly_service.cli import app

    path = fitted_model.save(tmp_path / "part")
    before = model_version_id(path)
    good, bad = tmp_path / "good", tmp_path / "bad"
    (bad / "lamp off").mkdir(parents=True)
    good.mkdir()
    for i, im in enumerate(variants[:3]):
        Image.fromarray(im).save(good / f"{i}.png")
    (bad / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    runner = CliRunner()
    empty = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--defects", str(bad), "-q"])
    assert empty.exit_code == 2 and "holds no image files" in empty.output, empty.output
    Image.fromarray(variants[4]).save(bad / "lamp off" / "part 7.png")  # passes once the lamp variants are learnt
    refused = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--defects", str(bad), "-q",
                                  "--runtime", "torch"])
    assert refused.exit_code == 3 and "part 7.png" in refused.output, refused.output
    assert "skipping" in refused.output and "Thumbs.db" in refused.output
    assert model_version_id(path) == before  # refused: the model is as it was


def test_cli_update_reads_known_defects_from_the_records(fitted_model, variants, tmp_path):
    """Photos recorded by `anomaly score --data-dir` and reviewed as defects guard `anomaly update --data-dir`."""
    from anomaly_service.cli import app

    path, data, good, store, _ = _recorded_and_reviewed_as_defect(fitted_model, variants[4], tmp_path)
    store.close()
    refused = CliRunner().invoke(app, ["update", str(path), "--add-good", str(good), "--data-dir", str(data), "-q",
                                       "--runtime", "torch"])
    assert refused.exit_code == 3 and "reviewed as defects" in refused.output


def test_cli_update_from_postgresql_records_needs_the_photos_directory(fitted_model, variants, postgres_url,
                                                                       tmp_path, monkeypatch):
    """With the records in PostgreSQL the rows are in the database and the photos under the service's --data-dir.
    `anomaly update --database-url URL` alone (the README's alternative to --data-dir, and what ANOMALY_DATABASE_URL
    gives) read no photo: it checked no recorded defect and added a photo the operators had reviewed as a defect.
    It is now an error that names the flag; a defect whose photo is gone is said to guard nothing."""
    from anomaly_service.cli import app

    path, data, good, store, iid = _recorded_and_reviewed_as_defect(fitted_model, variants[4], tmp_path,
                                                                    postgres_url)
    runner = CliRunner()
    update = ["update", str(path), "--add-good", str(good), "--database-url", postgres_url, "-q", "--runtime", "torch"]
    monkeypatch.delenv("ANOMALY_DATA_DIR", raising=False)  # the suite points it at a scratch directory
    alone = runner.invoke(app, update)
    assert alone.exit_code == 2 and "give --data-dir (or ANOMALY_DATA_DIR) too" in alone.output, alone.output
    with monkeypatch.context() as env:  # in the service's pod both variables are set: the update reads its photos
        env.setenv("ANOMALY_DATA_DIR", str(data))
        in_the_pod = runner.invoke(app, update)
    assert in_the_pod.exit_code == 3 and "reviewed as defects" in in_the_pod.output, in_the_pod.output
    refused = runner.invoke(app, [*update, "--data-dir", str(data)])
    assert refused.exit_code == 3 and "reviewed as defects" in refused.output, refused.output
    store.mark_files([store.get(iid).image_file], "expired")
    store.close()
    done = runner.invoke(app, [*update, "--data-dir", str(data)])
    assert done.exit_code == 0, done.output
    assert "1 inspection(s) reviewed as defects have no stored photo under --data-dir" in done.output


def test_cli_update_does_not_take_an_ANOMALY_DATA_DIR_that_is_no_directory(fitted_model, variants, postgres_url,
                                                                           tmp_path, monkeypatch):
    """`anomaly update --database-url URL` reads ANOMALY_DATA_DIR for the photos, as in the service's pod. One left
    in a shell pointing at no directory (another host's path, a typo) was made as an empty directory, and the
    update added the very photo the operators had reviewed as a defect (exit 0, a warning about a --data-dir nobody
    gave), where the URL alone had been refused. A variable that names no directory is refused as the URL alone is;
    one that is a directory is named as the variable in the warning."""
    from anomaly_service.cli import app

    path, data, good, store, iid = _recorded_and_reviewed_as_defect(fitted_model, variants[4], tmp_path,
                                                                    postgres_url)
    update = ["update", str(path), "--add-good", str(good), "--database-url", postgres_url, "-q", "--runtime", "torch"]
    typo = tmp_path / "dat"
    monkeypatch.setenv("ANOMALY_DATA_DIR", str(typo))
    res = CliRunner().invoke(app, update)
    assert res.exit_code == 2 and f"ANOMALY_DATA_DIR {typo}" in res.output, res.output
    assert not typo.exists()
    store.mark_files([store.get(iid).image_file], "expired")
    store.close()
    monkeypatch.setenv("ANOMALY_DATA_DIR", str(data))
    done = CliRunner().invoke(app, update)
    assert done.exit_code == 0, done.output
    assert f"no stored photo under ANOMALY_DATA_DIR {data}" in done.output, done.output


def test_cli_update_with_a_data_dir_that_is_not_the_services_says_the_defects_guard_nothing(fitted_model, variants,
                                                                                             postgres_url, tmp_path):
    """A --data-dir that is not the service's (a host where the picture volume is elsewhere, a typo) found none of
    the photos the records say are stored: the update counted them neither as checked nor as without a photo, and
    added the very photo the operators had reviewed as a defect, exit 0, without a word. It warns now."""
    from anomaly_service.cli import app
    from anomaly_service.records.store import RecordStore

    path = fitted_model.save(tmp_path / "part")
    data, elsewhere, good = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "good"
    elsewhere.mkdir()
    good.mkdir()
    Image.fromarray(variants[4]).save(good / "lamp-off.png")  # flagged today: its photo is recorded
    runner = CliRunner()
    res = runner.invoke(app, ["score", "--model", str(path), str(good / "lamp-off.png"), "--database-url",
                              postgres_url, "--data-dir", str(data), "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    store = RecordStore.open(postgres_url, data)
    (inspection,) = store.query(limit=5)
    store.review(inspection.id, "defect", "qa")
    assert store.reviewed_without_photo("part", "defect") == 0  # the service's own directory has it
    store.close()
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--database-url", postgres_url,
                              "--data-dir", str(elsewhere), "-q", "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    assert (f"1 inspection(s) reviewed as defects have no stored photo under --data-dir {elsewhere}" in res.output
            and "not the service's --data-dir" in res.output), res.output


def test_cli_score_to_postgresql_without_a_picture_directory_says_it_keeps_no_pictures(fitted_model, variants,
                                                                                      postgres_url, tmp_path):
    """`anomaly score --database-url URL` alone recorded a flagged part as `not_kept` under --keep-images anomalies
    without a word: the photo was nowhere, so the part could never be seen again nor, reviewed as a defect, guard
    an update. It says so; with --keep-images none there is nothing to say."""
    from anomaly_service.cli import app
    from anomaly_service.records.store import RecordStore

    path = fitted_model.save(tmp_path / "part")
    photo = tmp_path / "lamp-off.png"
    Image.fromarray(variants[4]).save(photo)  # flagged today
    score = ["score", "--model", str(path), str(photo), "--database-url", postgres_url, "--runtime", "torch"]
    res = CliRunner().invoke(app, score)
    assert res.exit_code == 0, res.output
    assert "--database-url without --data-dir keeps no pictures" in res.output
    store = RecordStore.open(postgres_url, None)
    (inspection,) = store.query(limit=5)
    assert inspection.decision == "anomaly" and inspection.files_state == "not_kept"
    store.close()
    quiet = CliRunner().invoke(app, [*score, "--keep-images", "none"])
    assert quiet.exit_code == 0 and "keeps no pictures" not in quiet.output, quiet.output


def test_info_shows_the_lineage_of_an_update(fitted_model, variants, tmp_path):
    from anomaly_service.cli import app

    path = fitted_model.update(variants[:2]).save(tmp_path / "part")
    out = CliRunner().invoke(app, ["info", str(path)]).output
    assert "lineage          update 1 of" in out and "+2 images" in out


def test_an_ivf_model_updates_saves_and_loads_like_an_exact_one(rng_images, variants, defect, tmp_path):
    """ivf is the default on real-size banks: an update adds the new rows to its lists and its exact re-rank, the
    threshold is recalibrated, and the saved model scores as it did."""
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                         index="ivf").fit(rng_images)
    updated = model.update(variants[:3], known_defects=[defect])
    assert updated.manifest_.index.kind == "ivf" and "exact re-rank" in updated.knn.search_description
    added = updated.manifest_.lineage.patches_added
    assert added > 0 and updated.knn.bank_size == model.knn.bank_size + added
    np.testing.assert_array_equal(updated.knn.bank()[: model.knn.bank_size], model.knn.bank())
    assert not updated.score(variants[3]).is_anomaly and updated.score(defect).is_anomaly
    loaded = AnomalyModel.load(updated.save(tmp_path / "m"))
    assert loaded.score(variants[3]).score == pytest.approx(updated.score(variants[3]).score, rel=1e-5)


def test_two_replicas_updating_one_model_at_once_both_land(fitted_model, variants, tmp_path):
    """Two serving replicas share the model directory (two registries here, each with its own thread lock). Both
    updates at once: each read the same current version and wrote its own next one, and the first was lost (a
    plant trial). With the model's write lock across processes the second updates the first's version."""
    from anomaly_service.registry import ModelRegistry

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    replicas = [ModelRegistry(models, device="cpu", runtime="torch") for _ in range(2)]
    for r in replicas:
        r.load_all()
    n0 = fitted_model.manifest_.training.n_images
    errors: list[BaseException] = []

    def update(replica: ModelRegistry, images: list[np.ndarray]) -> None:
        try:
            replica.update("part", images)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=update, args=(r, imgs))
               for r, imgs in zip(replicas, (variants[:2], variants[2:4]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    from anomaly_service.artifact import read_manifest

    m = read_manifest(models / "part")
    assert m.training.n_images == n0 + 4 and m.lineage.updates == 2


def test_an_update_where_the_model_directory_cannot_be_written_is_unavailable(fitted_model, variants, tmp_path):
    """A read-only model store (as the deployments mounted it): the update says why, as update_unavailable (409 over
    HTTP), instead of failing at the save. Here the lock file's place is taken by a directory, which no process
    can open for writing either (root ignores permission bits)."""
    from anomaly_service.registry import ModelRegistry

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    (models / ".part.lock").mkdir()
    reg = ModelRegistry(models, device="cpu", runtime="torch")
    reg.load_all()
    with pytest.raises(UpdateUnavailableError, match="mount it writable"):
        reg.update("part", variants[:1])
    with pytest.raises(UpdateUnavailableError, match="mount it writable"):
        reg.rollback("part", "anything")


def test_a_cli_rollback_says_it_waits_and_what_landed_meanwhile(fitted_model, updated, tmp_path):
    """`anomaly rollback` run while a serving replica's update holds the model's lock (the operations drill of
    session 59): it stood silent for as long as the update took, then rolled back past the version that update
    made without a word, though the operator named the version to go back to before that one existed."""
    from anomaly_service.artifact import model_lock
    from anomaly_service.cli import app

    path = fitted_model.save(tmp_path / "part")
    updated.save(path, keep_versions=5)
    newest, fit_id = [v["id"] for v in list_versions(path)]
    rollback(path, fit_id, 5)  # the fit is served; the update is archived
    held, release = threading.Event(), threading.Event()

    def another_replica() -> None:  # takes the lock, then puts the update back while the command waits
        with model_lock(path):
            held.set()
            release.wait(30)
            rollback(path, newest, 5)

    t = threading.Thread(target=another_replica)
    t.start()
    held.wait(30)
    threading.Timer(0.5, release.set).start()
    res = CliRunner().invoke(app, ["rollback", str(path), "--to", fit_id])
    t.join()
    assert res.exit_code == 0, res.output
    assert "waiting: another update or rollback of part is under way" in res.output
    assert f"changed while this waited, from {fit_id} to {newest}" in res.output
    assert model_version_id(path) == fit_id


def test_the_write_lock_is_one_file_however_the_model_path_is_spelled(tmp_path, monkeypatch):
    """A replica locks models/part; `anomaly update current` (a symlink to it) or `anomaly update .` inside it must
    wait for the same lock, not take one of their own (an adversarial review: both went ahead)."""
    import fcntl
    import os

    from anomaly_service.artifact import model_lock

    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    (tmp_path / "current").symlink_to(model)
    monkeypatch.chdir(model)
    for spelling in (tmp_path / "current", Path("."), model):
        with model_lock(spelling):
            fd = os.open(tmp_path / "models" / ".part.lock", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".part.lock", "part"]
    assert not list(model.glob("*.lock")) and not list(tmp_path.glob(".*.lock"))


def test_rollbacks_back_and_forth_with_a_full_archive_can_always_be_undone(fitted_model, variants, tmp_path):
    """docs/model-format.md: a rollback archives the version it replaces, "so it can be undone", and at most
    keep_versions are kept. With the archive full, pruning by creation time deleted the version a rollback had just
    replaced (the oldest), and the archive ended one short (a plant trial)."""
    path = fitted_model.save(tmp_path / "part")
    ids, model = [], fitted_model
    for i in range(3):
        model = model.update([variants[i]])
        model.save(path, keep_versions=2)
        ids.append(model_version_id(path))
    u1, u2, u3 = ids
    archived = lambda: sorted(v["id"] for v in list_versions(path)[1:])  # noqa: E731
    assert archived() == sorted([u1, u2])
    rollback(path, u1, keep_versions=2)  # replaces u3
    assert model_version_id(path) == u1 and u3 in archived() and len(archived()) == 2
    rollback(path, u3, keep_versions=2)  # undo: replaces u1, the oldest of them all
    assert model_version_id(path) == u3 and u1 in archived() and len(archived()) == 2
    rollback(path, u1, keep_versions=2)  # and undo again
    assert model_version_id(path) == u1 and u3 in archived() and len(archived()) == 2


def test_a_rollback_to_the_current_version_says_it_is_current(fitted_model, tmp_path):
    """It answered 404 "no archived version ... of part", as if the id were wrong: the id is right, the model
    already serves it (409 already_current), and nothing is archived or logged."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.cli import app
    from anomaly_service.errors import AlreadyCurrentError
    from anomaly_service.settings import ServiceSettings

    path = fitted_model.save(tmp_path / "models" / "part")
    current = model_version_id(path)
    with pytest.raises(AlreadyCurrentError, match="already the current version"):
        rollback(path, current)
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/models/part/rollback", json={"version": current})
        assert r.status_code == 409 and r.json()["error"] == "already_current"
        assert f"{current!r} is already the current version of part" in r.json()["detail"]
        listed = client.get("/models/part/versions").json()
        assert listed["current"] == current and len(listed["versions"]) == 1 and listed["history"] == []
    res = CliRunner().invoke(app, ["rollback", str(path), "--to", current])
    assert res.exit_code != 0 and "already the current version" in res.output


def test_an_api_rollback_is_counted_in_the_reload_metric(fitted_model, updated, tmp_path):
    """docs/service.md: an API update counted as outcome="updated", an API rollback not at all on the replica that
    made it (other replicas counted it as reloaded). A refused rollback loads nothing and is not counted."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    path = fitted_model.save(tmp_path / "models" / "part")
    first = model_version_id(path)
    updated.save(path, keep_versions=2)  # the fitted version archived, as an update leaves it
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    counted = 'anomaly_model_reloads_total{model="part",outcome="rolled_back"}'
    with TestClient(create_app(settings)) as client:
        assert counted not in client.get("/metrics").text
        assert client.post("/models/part/rollback", json={"version": "nope"}).status_code == 404
        long = client.post("/models/part/rollback", json={"version": "v" * 60_000})  # not echoed back in full
        assert long.status_code == 422 and len(long.text) < 2000, len(long.text)
        # a rollback that names the version it replaces is made only while that version serves (the review queue's
        # undo of a teaching: a change made while its confirmation was open was taken back unseen)
        served = model_version_id(path)
        r = client.post("/models/part/rollback", json={"version": first, "replaces": first})
        assert r.status_code == 409 and r.json()["error"] == "version_conflict" and served in r.json()["detail"]
        assert model_version_id(path) == served
        r = client.post("/models/part/rollback", json={"version": first, "replaces": served})
        assert r.status_code == 200 and r.json()["current"] == first
        assert client.post("/models/part/rollback", json={"version": first}).status_code == 409
        assert client.post("/models/reload").status_code == 200  # this replica already serves it: not reloaded
        text = client.get("/metrics").text
        assert f"{counted} 1.0" in text
        assert 'anomaly_model_reloads_total{model="part",outcome="reloaded"}' not in text


def test_api_update_answers_a_bad_upload_as_scoring_does_and_as_documented(fitted_model, variants, tmp_path):
    """An upload that does not load is refused before the update begins, with the code /score gives it; the
    Feedback section of docs/service.md names each of those answers."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    fitted_model.save(tmp_path / "models" / "part")
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    good = png_bytes(variants[0])
    docs = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    feedback = docs.split("## Feedback")[1].split("\n## ")[0]
    with TestClient(create_app(settings)) as client:
        before = client.get("/models/part/versions").json()["current"]
        for field in ("files", "defects"):
            for data, code in ((b"", "empty"), (good[: len(good) // 2], "corrupt"), (b"not an image", "not_image")):
                r = client.post("/models/part/update", files=[("files", ("g.png", good)), (field, ("bad.png", data))])
                assert (r.status_code, r.json()["error"]) == ({"not_image": 415}.get(code, 400), code), r.text
                assert f"`{r.status_code} {code}`" in feedback
        assert client.get("/models/part/versions").json()["current"] == before  # nothing was changed
    assert "an image that does not load" not in feedback


def test_api_update_refuses_a_file_name_it_would_store_unbounded(fitted_model, variants, tmp_path):
    """An update keeps each upload's file name in the new version (catalog, manifest, change log): one longer than a
    file system gives a file, or unprintable, is refused before any image is decoded; the model is not changed."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.api.deps import FILENAME_MAX
    from anomaly_service.settings import ServiceSettings

    fitted_model.save(tmp_path / "models" / "part")
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    good = png_bytes(variants[0])
    with TestClient(create_app(settings)) as client:
        before = client.get("/models/part/versions").json()["current"]
        for field in ("files", "defects"):
            for bad in ("g" * (FILENAME_MAX - 3) + ".png", "g\u202egnp.png"):
                r = client.post("/models/part/update", files=[("files", ("g.png", good)), (field, (bad, good))])
                assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), r.text
                assert f"at most {FILENAME_MAX} printable characters" in r.json()["detail"]
                assert len(r.text) < 1000  # the name is not echoed whole
        longest = "g" * (FILENAME_MAX - 4) + ".png"  # passes the name check: the empty defect is what is refused
        r = client.post("/models/part/update", files=[("files", (longest, good)), ("defects", (longest, b""))])
        assert (r.status_code, r.json()["error"]) == (400, "empty"), r.text
        assert client.get("/models/part/versions").json()["current"] == before


def _with_calibration_set(path: Path, edit) -> None:
    """Rewrite the model's calibration.npz with ``edit`` applied to its arrays, listed with its new checksum in a
    re-signed manifest: a file that passes every checksum but does not hold what the manifest describes."""
    import hashlib

    from conftest import write_manifest

    with np.load(path / "calibration.npz") as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(path / "calibration.npz", "wb") as f:
        np.savez(f, **arrays)
    data = (path / "calibration.npz").read_bytes()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["calibration.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(path, manifest)


def _drop(*keys: str):
    return lambda a: [a.pop(k) for k in keys]


def _put(key: str, value: np.ndarray):
    return lambda a: a.__setitem__(key, value)


MALFORMED_CALIBRATION_SETS = {
    "no shapes": _drop("shapes"),
    "a grid missing": _drop("grid_0001"),
    "image ids without calibrated ids": _drop("calibrated_ids"),
    "image ids for fewer grids": lambda a: a.__setitem__("image_ids", a["image_ids"][:-1]),
    "an image id past the catalog": lambda a: a.__setitem__("image_ids", a["image_ids"] + 10_000),
    "calibrated ids for fewer scores": lambda a: a.__setitem__("calibrated_ids", a["calibrated_ids"][:-1]),
    "shapes of two sides": lambda a: a.__setitem__("shapes", a["shapes"][:, :2]),
    "a grid of text": lambda a: a.__setitem__("grid_0000", np.full(a["grid_0000"].shape, "x")),
    "a grid of another width": lambda a: a.__setitem__("grid_0000", a["grid_0000"][..., :-1]),
    "a pixel mask without its shape": _put("real_0000", np.zeros(4, np.uint8)),
    "a pixel mask of the wrong size": lambda a: a.update(real_0000=np.zeros(4, np.uint8),
                                                          real_shape_0000=np.array([128, 128])),
}


@pytest.mark.parametrize("case", MALFORMED_CALIBRATION_SETS)
def test_an_update_names_a_malformed_calibration_set(fitted_model, variants, tmp_path, case):
    """calibration.npz is verified by its checksum at load; one that passes it but does not hold what the manifest
    describes fails the update with a ModelFormatError naming the file, before any image is embedded."""
    path = fitted_model.save(tmp_path / "m")
    _with_calibration_set(path, MALFORMED_CALIBRATION_SETS[case])
    model = AnomalyModel.load(path, device="cpu")  # loads and scores: only an update reads the set
    assert model.score(variants[0]).score > 0
    with pytest.raises(ModelFormatError, match="calibration.npz"):
        model.update(variants[:1])


def test_the_api_answers_a_malformed_calibration_set_with_a_4xx_naming_it(fitted_model, variants, tmp_path):
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    path = fitted_model.save(tmp_path / "models" / "part")
    _with_calibration_set(path, MALFORMED_CALIBRATION_SETS["a pixel mask without its shape"])
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/models/part/update", files=[("files", ("g.png", png_bytes(variants[0])))])
        assert (r.status_code, r.json()["error"]) == (422, "update_failed"), r.text
        assert "calibration.npz" in r.json()["detail"] and "real_shape_0000" in r.json()["detail"]
        assert client.post("/score?model=part", files={"file": ("p.png", png_bytes(variants[0]))}).status_code == 200


def test_an_update_reads_its_calibration_set_once(fitted_model, variants, monkeypatch):
    """The check, the grids, the ids, the masks and the turned flags are all read from one parse of calibration.npz,
    which every reader of the update is handed, not the file parsed again by each."""
    from anomaly_service import artifact, calibration_set

    parsed: list[str] = []
    real_read = artifact.bytes_to_arrays

    def counted(data: bytes, name: str = "model arrays"):
        parsed.append(name)
        return real_read(data, name)

    monkeypatch.setattr(calibration_set, "bytes_to_arrays", counted)
    updated = fitted_model.update(variants[:1], force=True)
    assert parsed == ["calibration.npz"]
    before = calibration_set.CalibrationSet.of(fitted_model)
    after = calibration_set.CalibrationSet.of(updated)
    assert len(after.grids) == len(before.grids) and after.turned == before.turned


@pytest.fixture(scope="module")
def second_opinion(rng_images) -> AnomalyModel:
    """A model with the feature autoencoder, which an update does not train further: a defective part offered as good
    joins the kNN's bank, and the autoencoder still flags it after the update."""
    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                        autoencoder="features", ae_epochs=10, calibration_fraction=0.25).fit(rng_images)


@pytest.fixture(scope="module")
def offered() -> dict[str, np.ndarray]:
    """Good photos to add, two of them defective parts an operator marked good by mistake."""
    from conftest import textured_part

    rng = np.random.default_rng(3)
    goods = {f"g{i}.png": textured_part(rng) for i in range(2)}
    return {**goods, "b0.png": add_defect(textured_part(rng), 60, 60, 14)[0],
            "b1.png": add_defect(textured_part(rng), 30, 90, 20)[0]}


def test_added_images_still_flagged_are_kept_left_out_or_refused_as_contamination_says(second_opinion, offered):
    """The update's own outliers: added good images the updated model still flags (maybe defective parts). As the
    fit's contamination guard: warn keeps them and lists them, drop leaves them out, fail refuses the update."""
    from anomaly_service.errors import ConfigError, ContaminationError

    images, names = list(offered.values()), list(offered)
    warned = second_opinion.update(images, names=names)
    assert warned.still_flagged_ == ["b0.png", "b1.png"] and warned.manifest_.lineage.images_added == 4
    dropped = second_opinion.update(images, names=names, contamination="drop")
    assert dropped.left_out_ == ["b0.png", "b1.png"] and dropped.still_flagged_ == []
    assert dropped.manifest_.lineage.images_added == 2
    assert not any(r.is_anomaly for r in dropped.score_many(images[:2]))
    with pytest.raises(ContaminationError, match="b0.png, b1.png") as err:
        second_opinion.update(images, names=names, contamination="fail")
    assert err.value.suspects == ["b0.png", "b1.png"]
    with pytest.raises(ConfigError, match="contamination must be one of 'warn', 'drop', 'fail'"):
        second_opinion.update(images, names=names, contamination="nope")
    with pytest.raises(ConfigError, match="no good image left to add"):
        second_opinion.update(images[2:], names=names[2:], contamination="drop")


def test_cli_update_contamination_refuses_leaves_out_or_says_it_added_them(second_opinion, offered, tmp_path):
    """`anomaly update --contamination` as `anomaly fit` reads it: fail refuses and leaves the model as it was, drop
    leaves the images still flagged out (and out of the change log), warn (the default) says plainly they were
    added anyway."""
    from anomaly_service import model_history
    from anomaly_service.cli import app

    path = second_opinion.save(tmp_path / "m")
    good = tmp_path / "good"
    good.mkdir()
    for name, image in offered.items():
        Image.fromarray(image).save(good / name)
    before = model_version_id(path)
    runner = CliRunner()
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--contamination", "fail"])
    assert res.exit_code == 2 and "b0.png" in res.output and "b1.png" in res.output, res.output
    assert model_version_id(path) == before and model_history.read(path) == []
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "-q", "--contamination", "drop"])
    assert res.exit_code == 0, res.output
    assert "2 added good image(s) still flagged by the updated model were left out (--contamination drop)" \
        in res.output and "updated with 2 images" in res.output
    (change,) = model_history.read(path)
    assert change["images"] == [str(good / "g0.png"), str(good / "g1.png")]
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "-q"])  # the two left out, added now
    assert res.exit_code == 0, res.output
    assert "2 of the added good image(s) are still flagged by the updated model (added anyway; --contamination " \
        "drop leaves them out, fail refuses the update)" in res.output
    res = runner.invoke(app, ["update", str(path), "--add-good", str(good), "--contamination", "nope"])
    assert res.exit_code == 2 and "'nope' is not one of 'warn', 'drop', 'fail'" in res.output


def test_api_require_author_refuses_an_unnamed_model_change(fitted_model, variants, tmp_path):
    """With --require-author a model change over HTTP must name who makes it: without X-Reviewer an update or a
    rollback is refused before any work (nothing saved, nothing logged); named, both go through as before."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    fitted_model.save(models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False, require_author=True)
    files = [("files", (f"g{i}.png", png_bytes(im))) for i, im in enumerate(variants[:2])]
    with TestClient(create_app(settings)) as client:
        before = client.get("/models/part/versions").json()
        r = client.post("/models/part/update", files=files)
        assert r.status_code == 422 and r.json()["error"] == "author_required", r.text
        assert client.get("/models/part/versions").json() == before  # no version, no change-log line
        r = client.post("/models/part/update", files=files, headers={"X-Reviewer": "m.keller"})
        assert r.status_code == 200, r.text
        previous = r.json()["previous"]
        r = client.post("/models/part/rollback", json={"version": previous})
        assert r.status_code == 422 and r.json()["error"] == "author_required"
        r = client.post("/models/part/rollback", json={"version": previous}, headers={"X-Reviewer": "m.keller"})
        assert r.status_code == 200 and r.json()["current"] == previous
        assert [(c["action"], c["by"]) for c in r.json()["history"]] == [("rollback", "m.keller"),
                                                                          ("update", "m.keller")]


def test_a_rollback_on_a_full_model_volume_fails_in_one_line_and_the_model_keeps_serving(fitted_model, updated,
                                                                                         variants, tmp_path):
    """A model volume filled to its last byte: an update's save said so (422 update_failed), but a rollback's was a
    500 over HTTP and a traceback on the command line. It says why now, leaves no half-written copy to fill the
    volume further, keeps the model it would replace serving, and goes through once space is freed (no restart)."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    from conftest import fill, mounted

    with mounted(tmp_path / "models", "16m") as models:
        path = fitted_model.save(models / "part")
        updated.save(path, keep_versions=5)
        current, fit_id = model_version_id(path), list_versions(path)[1]["id"]
        filler = fill(models)
        probe = {"file": ("p.png", png_bytes(variants[3]))}
        settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
        with TestClient(create_app(settings)) as client:
            r = client.post("/models/part/rollback", json={"version": fit_id})
            assert r.status_code == 422 and r.json()["error"] == "update_failed", r.text
            assert "No space left on device" in r.json()["detail"]
            res = CliRunner().invoke(app, ["rollback", str(path), "--to", fit_id])
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output  # an exception would exit 1
            assert "error: cannot write the model" in res.output and "No space left on device" in res.output
            assert sorted(p.name for p in models.iterdir() if p.name.startswith(".part.")) == \
                [".part.lock", ".part.swap-lock"]  # no half-written copy left
            assert model_version_id(path) == current and AnomalyModel.load(path).version_id_ == current
            assert client.post("/score?model=part", files=probe).status_code == 200
            filler.unlink()
            r = client.post("/models/part/rollback", json={"version": fit_id})
            assert r.status_code == 200 and r.json()["current"] == fit_id, r.text


def test_an_archive_that_filled_the_model_volume_gives_way_to_the_next_save(fitted_model, variants, tmp_path):
    """Months of updates fill a model volume with archived versions (and each version is larger than the last). Then
    every update and rollback failed with "No space left on device", and a lower --keep-versions did not help: the
    archive is pruned only after a save that succeeded. A save that finds no room now first deletes the archived
    versions its own prune would delete; where that is not enough, the error says what the archive holds and how
    to make room."""
    from anomaly_service.cli import app

    from conftest import fill, mounted

    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(variants[3]).save(good / "new.png")
    runner = CliRunner()
    update = ["update", "--add-good", str(good), "-q", "--runtime", "torch"]
    with mounted(tmp_path / "models", "16m") as models:
        path = fitted_model.save(models / "part")
        for im in variants[:3]:  # three updates: the fit and two of them archived
            fitted_model.update([im]).save(path, keep_versions=5)
        current, archived = model_version_id(path), [v["id"] for v in list_versions(path)[1:]]
        assert len(archived) == 3
        fill(models)
        res = runner.invoke(app, [update[0], str(path), *update[1:]])  # --keep-versions 5: nothing to give way
        assert res.exit_code == 2 and "No space left on device" in res.output, res.output
        assert "archive holds 3 earlier version(s)" in res.output and "--keep-versions 3 or lower" in res.output
        assert model_version_id(path) == current and [v["id"] for v in list_versions(path)[1:]] == archived
        res = runner.invoke(app, [update[0], str(path), *update[1:], "--keep-versions", "2"])
        assert res.exit_code == 0, res.output
        kept = list_versions(path)[1:]  # as a prune after the save would leave it: the fit's version went first
        assert len(kept) == 2 and current in {v["id"] for v in kept} and {v["made_by"] for v in kept} == {"update"}
        newest, back = model_version_id(path), next(v["id"] for v in kept if v["id"] != current)
        fill(models)  # full again
        res = runner.invoke(app, ["rollback", str(path), "--to", back, "--keep-versions", "1"])
        assert res.exit_code == 0, res.output  # the version it restores is kept, whatever its age
        assert model_version_id(path) == back and [v["id"] for v in list_versions(path)] == [back, newest]
        assert AnomalyModel.load(path).version_id_ == back
        assert sorted(p.name for p in models.iterdir() if p.name.startswith(".part.")) == \
            [".part.lock", ".part.swap-lock"]  # no half-written copy left


def test_a_rollback_on_a_full_volume_gives_advice_that_makes_room(fitted_model, variants, tmp_path):
    """A rollback that finds the volume full names what the archive holds and the --keep-versions that makes room.
    The version it restores was counted, though no --keep-versions deletes it for the rollback: the advice named
    one more than deletes anything, and the rollback run as advised failed again. Followed now, it goes through."""
    import re

    from anomaly_service.cli import app

    from conftest import fill, mounted

    runner = CliRunner()
    with mounted(tmp_path / "models", "16m") as models:
        path = fitted_model.save(models / "part")
        for im in variants[:3]:  # the fit and two updates archived
            fitted_model.update([im]).save(path, keep_versions=5)
        oldest = list_versions(path)[-1]["id"]
        fill(models)
        res = runner.invoke(app, ["rollback", str(path), "--to", oldest])
        assert res.exit_code == 2 and "No space left on device" in res.output, res.output
        advised = re.search(r"--keep-versions (\d+) or lower", res.output)
        assert advised and f"besides {oldest}" in res.output, res.output
        assert f"Its archive holds 2 earlier version(s) besides {oldest}, the one restored," in res.output, res.output
        res = runner.invoke(app, ["rollback", str(path), "--to", oldest, "--keep-versions", advised.group(1)])
        assert res.exit_code == 0, res.output
        assert model_version_id(path) == oldest


def test_a_model_directory_remounted_read_only_refuses_update_and_rollback_before_the_work(fitted_model, updated,
                                                                                         variants, tmp_path):
    """docs/service.md: a read-only model directory is 409 update_unavailable. Where an earlier update had left its
    lock file (which still opens for reading), an update did all its work and then failed at the save (422), and a
    rollback was a 500. Both are refused up front now; scoring goes on."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    from conftest import mounted

    models = tmp_path / "models"
    path = fitted_model.save(models / "part")
    updated.save(path, keep_versions=5)
    fit_id = list_versions(path)[1]["id"]
    (models / ".part.lock").touch()  # as every update and rollback leaves it
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client, mounted(models):
        r = client.post("/models/part/update", files=[("files", ("g.png", png_bytes(variants[4])))])
        assert r.status_code == 409 and r.json()["error"] == "update_unavailable", r.text
        assert "Read-only file system" in r.json()["detail"] and "mount it writable" in r.json()["detail"]
        r = client.post("/models/part/rollback", json={"version": fit_id})
        assert r.status_code == 409 and r.json()["error"] == "update_unavailable", r.text
        assert client.post("/score?model=part", files={"file": ("p.png", png_bytes(variants[3]))}).status_code == 200



def test_update_reads_good_photos_kept_in_dated_subfolders_with_recursive(fitted_model, variants, tmp_path):
    """False alarms reviewed as good are filed one folder per day; update skipped each folder with "name it to use
    its images", which one --add-good cannot do. It says --recursive now, which reads them."""
    from anomaly_service.cli import app

    path = fitted_model.save(tmp_path / "m")
    day = tmp_path / "good" / "2026-12-04"
    day.mkdir(parents=True)
    Image.fromarray(variants[1]).save(day / "fine.png")
    flat = CliRunner().invoke(app, ["update", str(path), "--add-good", str(tmp_path / "good"), "--force", "-q"])
    assert flat.exit_code == 2 and "give --recursive" in flat.output and "name it" not in flat.output, flat.output
    deep = CliRunner().invoke(app, ["update", str(path), "--add-good", str(tmp_path / "good"), "--recursive",
                                    "--force", "-q"])
    assert deep.exit_code == 0 and "updated with 1 images" in deep.output, deep.output


def test_a_stored_set_unlike_its_manifest_is_refused_at_each_bound():
    """What an update checks of calibration.npz before it re-calibrates, read without a model: each bound of the
    check, where the malformed files above each break one thing by a wide margin. A set just inside every bound
    reads; one a step outside any is refused, naming what is wrong, and a set the fit wrote reads back as written."""
    from anomaly_service.calibration_set import CalibrationSet, calibration_set_bytes

    rng = np.random.default_rng(0)
    grids = [rng.normal(size=(4, 5, 8)).astype(np.float32), rng.normal(size=(2, 3, 3, 8)).astype(np.float32)]
    real = np.zeros((20, 24), bool)  # the second image's own pixels (a turned copy's)
    real[2:5] = True
    ok = dict(grids=grids, shapes=[(30, 40, 3), (20, 24)], image_ids=np.array([0, 4]),
              calibrated_ids=np.array([4, 2, 0]), reals=[None, real], turned=[False, True])
    counts = dict(n_images=2, dim=8, n_scores=3, n_training=5)

    def read(n_training: int | None = 5, **change):
        return CalibrationSet.read(calibration_set_bytes(**{**ok, **change}), **{**counts, "n_training": n_training})

    stored = read()
    assert [s for _, s in stored.grids] == [(30, 40, 3), (20, 24, 1)]
    assert np.array_equal(stored.grids[1][0], grids[1].astype(np.float16))
    assert [a.tolist() for a in stored.left_out_ids] == [[0, 4], [4, 2, 0]] and stored.turned == {1}
    assert list(stored.real_masks) == [1] and np.array_equal(stored.real_masks[1], real)
    assert read(shapes=[(20, 24, 3), (20, 24)], reals=[real, None]).real_masks.keys() == {0}
    assert read(image_ids=None, calibrated_ids=None).left_out_ids is None and read(n_training=None) is not None
    assert read(turned=None).turned is None
    assert read(calibrated_ids=np.array([4, 0, 0])).left_out_ids is not None  # an id may repeat
    refused = {
        "a size of 0": dict(shapes=[(30, 0, 3), (20, 24)]),
        "one grid fewer": dict(grids=grids[:1], shapes=[(30, 40, 3)]),
        "a flag too few": dict(turned=[True]),
        "a grid of 2 dimensions": dict(grids=[grids[0][0], grids[1]]),
        "a grid of 5 dimensions": dict(grids=[grids[0], grids[1][None]]),
        "an infinite feature": dict(grids=[grids[0], np.where(grids[1] > 2, np.inf, grids[1])]),
        "a mask of another size": dict(reals=[None, real[:-1]]),
        "an image id no score names": dict(image_ids=np.array([0, 3])),
        "a calibrated id before the first image": dict(calibrated_ids=np.array([4, 2, -1])),
        "a calibrated id past the last image": dict(calibrated_ids=np.array([5, 2, 0]), image_ids=np.array([0, 2])),
        "a score more": dict(calibrated_ids=np.array([4, 2, 0, 0])),
    }
    for case, change in refused.items():
        with pytest.raises(ModelFormatError, match="calibration.npz does not hold"):
            read(**change)
            pytest.fail(case)
    with pytest.raises(ModelFormatError, match="calibrated id names no training image"):
        read(n_training=4)
    from anomaly_service.artifact import arrays_to_bytes, bytes_to_arrays

    packed = bytes_to_arrays(calibration_set_bytes(**ok))
    for bits in (packed["real_0001"][:-1], packed["real_0001"].astype(np.int16)):  # its shape says 480 pixels
        with pytest.raises(ModelFormatError, match="real_0001 does not hold one bit a pixel"):
            CalibrationSet.read(arrays_to_bytes({**packed, "real_0001": bits}), **counts)
    assert read(n_training=5) is not None  # the highest id names the last image


def test_an_unfitted_model_refuses_an_update_as_it_refuses_to_score():
    """Not "saved before updates existed, re-fit once" (what an unfitted model would otherwise be told): it has no
    fit to update."""
    from anomaly_service import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):
        AnomalyModel(backbone="efficientnet_lite0").update([np.zeros((32, 32, 3), np.uint8)])


def test_an_update_is_no_saved_version_until_it_is_saved(fitted_model, variants, tmp_path):
    """The updated model is not the version it was loaded from: left with its parent's id, a report of it (anomaly
    evaluate's) named the parent, whose threshold and bank it no longer has. Saved, it is a version of its own, whose
    parent is the one it came from."""
    fitted_model.save(tmp_path / "part")
    parent = AnomalyModel.load(tmp_path / "part")
    new = parent.update(variants[:1], force=True)
    assert parent.version_id_ is not None and new.version_id_ is None
    lineage = new.manifest_.lineage
    assert lineage.parent == parent.version_id_
    assert lineage.forced is False  # forced only where the force let a known defect pass: here none was given
    assert 0 <= lineage.seconds < 3600  # the update's own time, not the clock's
    new.save(tmp_path / "part", keep_versions=1)
    assert new.version_id_ not in (None, parent.version_id_)


def _stub_model(kept: list[float], *, turned: dict | None = None, n_images: int = 10, fused: list[float] | None = None,
                orientation: str = "fixed"):
    """What reads_added and check_rescored read of a model, without one: its manifest's kept scores (the fused
    model's kNN ones apart), its turned copies' counts and its orientation."""
    from types import SimpleNamespace as NS

    training = NS(turned_copies=turned, n_images=n_images)
    fusion = None if fused is None else NS(knn_calibration=NS(holdout_scores=fused))
    return NS(manifest_=NS(fusion=fusion, calibration=NS(holdout_scores=kept), training=training),
              config=NS(orientation=orientation))


def test_an_update_reads_its_added_images_only_after_a_left_out_fit_of_a_surface():
    """The added images join the threshold's scores after a leave-one-out fit whose good images mostly ran out of the
    frame (more than half surface images), and only then: the tests that fit such a model pass either way at the
    one share they fit."""
    from types import SimpleNamespace as NS

    from anomaly_service.feedback import reads_added

    left_out = NS(left_out_ids=(np.array([0]), np.array([0])))
    assert reads_added(_stub_model([], turned={"surface_images": 6}), left_out)
    assert not reads_added(_stub_model([], turned={"surface_images": 5}), left_out)  # half: not most
    assert not reads_added(_stub_model([], turned={"surface_images": 10}), NS(left_out_ids=None))  # held out
    assert not reads_added(_stub_model([], turned=None), left_out)
    assert not reads_added(_stub_model([], turned={"surface_images": None, "patches": 4}), left_out)


def test_the_added_images_outliers_are_left_out_of_the_threshold_the_others_stay():
    """Among the scores an update calibrates on (the stored grids', the kept ones, the added images'), the added
    images' outliers are screened out, as a fit screens its own; an outlier among the others is the fit's to keep."""
    from anomaly_service.decision import KNN
    from anomaly_service.feedback import Opinion, screened

    rng = np.random.default_rng(1)
    others = [{KNN: (float(s), None)} for s in [40.0, *rng.normal(1, 0.02, 9)]]  # the first an outlier
    known = [(float(s), 0.5) for s in rng.normal(1, 0.02, 5)]
    mine = [Opinion(20 + j, {KNN: (s, None)}) for j, s in enumerate([50.0, 1.01, 0.99, 60.0])]
    assert [o.image for o in screened(mine, others, known, 3.0)] == [21, 22]
    assert screened([], others, known, 3.0) == []


def test_stored_grids_scoring_far_from_their_kept_scores_refuse_the_update():
    """Each stored grid against the score its image has in the calibration, at the slack's edge: held-out grids in
    the scores' order, a leave-one-out fit's by their images' ids, a fused model's by its kNN scores, and (anomaly
    info --verify) below as well as above, except with orientation any."""
    from types import SimpleNamespace as NS

    from anomaly_service.feedback import RESCORED_SLACK, check_rescored

    assert RESCORED_SLACK == 1.5
    held_out = NS(left_out_ids=None)
    check_rescored(_stub_model([10.0, 20.0, 5.0]), held_out, [15.0, 30.0])
    for rescored, grid in (([15.1, 30.0], "grid_0000"), ([10.0, 30.1], "grid_0001")):
        with pytest.raises(ModelFormatError, match=f"{grid} scores .* the grids are not the images"):
            check_rescored(_stub_model([10.0, 20.0, 5.0]), held_out, rescored)
    check_rescored(_stub_model([-2.0]), held_out, [2.9])  # a score below 0: its size is what counts
    with pytest.raises(ModelFormatError):
        check_rescored(_stub_model([-2.0]), held_out, [3.1])
    left_out = NS(left_out_ids=(np.array([7, 3]), np.array([3, 5, 7])))  # grids of images 7 and 3
    check_rescored(_stub_model([10.0, 99.0, 20.0]), left_out, [30.0, 15.0])
    with pytest.raises(ModelFormatError, match="grid_0001"):
        check_rescored(_stub_model([10.0, 99.0, 20.0]), left_out, [30.0, 15.1])
    fused = _stub_model([1e6, 1e6], fused=[10.0, 20.0])  # the fused scores are not the kNN's
    check_rescored(fused, held_out, [15.0, 30.0])
    with pytest.raises(ModelFormatError):
        check_rescored(fused, held_out, [15.0, 30.1])
    check_rescored(_stub_model([10.0, 20.0]), held_out, [6.67, 13.34], both_ways=True)
    with pytest.raises(ModelFormatError, match="grid_0001 scores .* not its images'"):
        check_rescored(_stub_model([10.0, 20.0]), held_out, [6.67, 13.3], both_ways=True)
    check_rescored(_stub_model([10.0, 20.0], orientation="any"), held_out, [6.67, 1.0], both_ways=True)
    check_rescored(_stub_model([10.0, 20.0]), held_out, [6.67, 1.0])  # an update's bank only grew: lower is fine


def test_an_update_logs_a_line_for_the_first_few_warned_photos_then_how_many_more(fitted_model, caplog):
    """An HTTP update of a thousand photos each warned of wrote a thousand lines to the service's log: the log names
    the first few, then counts the rest, while the model's ``update_warnings_`` (the answer's) lists them all."""
    import io
    import logging

    from anomaly_service.training_set import LISTED_NAMES

    rng = np.random.default_rng(11)
    stacks = []
    for _ in range(LISTED_NAMES + 2):
        buf = io.BytesIO()
        second = Image.fromarray(variant(rng))
        Image.fromarray(variant(rng)).save(buf, format="TIFF", save_all=True, append_images=[second])
        stacks.append(buf.getvalue())
    names = [f"stack{i}.tif" for i in range(len(stacks))]
    with caplog.at_level(logging.WARNING, logger="anomaly_service.feedback"):
        new = fitted_model.update(stacks, force=True, names=names)
    assert [w.split(":", 1)[0] for w in new.update_warnings_] == names
    lines = [r.getMessage() for r in caplog.records if r.name == "anomaly_service.feedback"]
    assert [line.split(":", 2)[1].strip() for line in lines if "frames" in line] == names[:LISTED_NAMES]
    assert "update: and 2 more warning(s) of the added images" in lines


def test_a_model_whose_selection_is_no_longer_offered_refuses_an_update_with_the_way_out(fitted_model, variants):
    """A model whose bank was chosen by a selection this release no longer has cannot grow it: refused before any
    work, saying to re-fit, not failed midway in the k-center's continuation."""
    import copy

    old = copy.copy(fitted_model)
    old.knn = copy.copy(fitted_model.knn)
    old.knn.selector = None
    with pytest.raises(UpdateUnavailableError, match="is no longer offered; re-fit"):
        old.update(variants[:1])
