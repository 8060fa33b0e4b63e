"""The model's change log (model_history.py): append-only, newest first, readable after a torn write, and never
in the way of the change it records."""

from __future__ import annotations

import json
import logging

import pytest

from anomaly_service import model_history


def test_entries_read_newest_first_and_a_torn_line_is_skipped(tmp_path):
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    model_history.record(model, "fit", "v1", None, by="ann", images=20)
    model_history.record(model, "update", "v2", "v1", by="bob\x1b[31m", note="x" * 5000, via="api")
    with open(model_history.history_path(model), "a") as f:
        f.write('{"at": "2025-01-01T00:00:00+00:00", "action": "rollb')  # a crash mid-write
    changes = model_history.read(model)
    assert [c["version"] for c in changes] == ["v2", "v1"]
    assert changes[0]["by"] == "bob [31m" and len(changes[0]["note"]) == model_history.MAX_NOTE
    assert changes[1]["images"] == 20 and model_history.read(model, limit=1) == changes[:1]
    assert model_history.history_path(model) == tmp_path / "models" / ".versions" / "part" / "history.jsonl"
    assert model_history.read(tmp_path / "models" / "other") == []


def test_a_log_that_cannot_be_written_is_warned_about_not_raised(tmp_path, caplog):
    model = tmp_path / "part"
    model_history.history_path(model).mkdir(parents=True)  # a directory where the file should be
    with caplog.at_level(logging.WARNING):
        assert model_history.record(model, "rollback", "v3", "v2", by="ann") is None
    assert "could not record the rollback of part" in caplog.text


def test_a_line_separator_in_a_note_neither_hides_the_entry_nor_splits_it(tmp_path):
    """U+2028 is a line break to str.splitlines: a note carrying it hid its rollback from every reader."""
    model = tmp_path / "part"
    model_history.record(model, "rollback", "v2", "v3", by="ann", note="evil\u2028x",
                         images=["a\u2029b.png", "c\x85d.png"])
    (change,) = model_history.read(model)
    assert change["note"] == "evil x" and change["images"] == ["a\u2029b.png", "c\x85d.png"]
    assert "\u2028" not in model_history.history_path(model).read_text()


def test_an_entry_after_a_torn_write_is_kept_and_odd_lines_are_skipped(tmp_path):
    """A disk-full write left half a line, and the next entry was glued to it and lost; a line without its time
    made the versions answer a 500 (an adversarial review)."""
    model = tmp_path / "part"
    model_history.record(model, "fit", "v1", None, by="alice")
    path = model_history.history_path(model)
    with open(path, "a") as f:
        f.write('{"at": "2025-01-01T00:00:00+00:00", "action": "upd')  # cut off by a full disk
    model_history.record(model, "rollback", "v1", "v2", by="bob")
    with open(path, "a") as f:
        f.write('{"action": "fit", "version": "v0", "note": "imported"}\n')  # no time
        f.write('{"action": "fit", "at": "x", "version": "v0", "n": ' + "9" * 5000 + "}\n")  # past int parsing
        f.write("[" * 100000 + "\n")
    assert [(c["action"], c["by"]) for c in model_history.read(model)] == [("rollback", "bob"), ("fit", "alice")]


def test_a_long_log_is_read_a_page_at_a_time(tmp_path, model_dir):
    """A model a line has taught for months logs more changes than the versions answer carries (the newest 50);
    the rest were only in `anomaly versions --history`, on the host. GET /models/{name}/history pages through them
    all, newest first, and the versions answer says there are more."""
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        for i in range(50):  # as many as the versions answer carries, and a page of that size: no more
            model_history.record(models / "part", "update", f"v{i + 1}", f"v{i}", by="ann", note=f"batch {i}")
        full = client.get("/models/part/versions").json()
        assert len(full["history"]) == 50 and not full["history_more"]
        page = client.get("/models/part/history", params={"limit": 50}).json()
        assert len(page["items"]) == 50 and not page["more"]
        for i in range(50, 120):
            model_history.record(models / "part", "update", f"v{i + 1}", f"v{i}", by="ann", note=f"batch {i}")
        assert [c["version"] for c in model_history.read(models / "part", 3, skip=118)] == ["v2", "v1"]
        end = client.get("/models/part/history", params={"offset": 100, "limit": 20}).json()
        assert [c["version"] for c in end["items"]] == [f"v{i}" for i in range(20, 0, -1)] and not end["more"]
        versions = client.get("/models/part/versions").json()
        assert len(versions["history"]) == 50 and versions["history_more"]
        seen, offset, more = [], 0, True
        while more:
            page = client.get("/models/part/history", params={"offset": offset, "limit": 45}).json()
            seen += [c["version"] for c in page["items"]]
            offset, more = offset + len(page["items"]), page["more"]
        assert seen == [f"v{i}" for i in range(120, 0, -1)]
        assert [c["version"] for c in client.get("/models/part/history").json()["items"]] == [
            c["version"] for c in versions["history"]]
        past = client.get("/models/part/history", params={"offset": 500}).json()
        assert past["items"] == [] and not past["more"]
        for what in ("history", "versions"):
            unknown = client.get(f"/models/nope/{what}")
            assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_model"
        for bad in ({"limit": 0}, {"offset": -1}, {"limit": 5000}):
            assert client.get("/models/part/history", params=bad).status_code == 422
        # the versions of a model whose files no longer read (its manifest overwritten under the service): a 422
        (models / "part" / "manifest.json").write_text("{ not json")
        broken = client.get("/models/part/versions")
        assert broken.status_code == 422 and broken.json()["error"] == "model_invalid", broken.text


def test_cursor_pages_hold_while_changes_are_logged_between_them(tmp_path, model_dir):
    """An integrator (or the Model view's Older changes) pages through the log while the line goes on teaching the
    model. Offsets count from the newest, so every change logged between two pages showed the last entry of the
    page before once more (and a client that de-duplicated by content lost a true repeat). A page's cursor holds:
    every change once, in order, whatever is logged meanwhile; a cursor changed, foreign or another model's is a
    clear 400."""
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.api.cursors import decode_cursor, encode_cursor
    from anomaly_service.api.errors import ApiError
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    shutil.copytree(model_dir / "part", models / "other")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    for i in range(70):  # the same note twice in a row: a true repeat, which no content check may drop
        model_history.record(models / "part", "update", f"v{i + 1}", f"v{i}", by="ann", note=f"batch {i // 2}")
    model_history.record(models / "other", "fit", "o1", None, by="bob")
    with TestClient(create_app(settings)) as client:
        versions = client.get("/models/part/versions").json()
        assert len(versions["history"]) == 50 and versions["history_more"] and versions["history_cursor"]
        seen, cursor, logged = [c["version"] for c in versions["history"]], versions["history_cursor"], 70
        while cursor:
            for _ in range(3):  # taught meanwhile
                model_history.record(models / "part", "update", f"v{logged + 1}", f"v{logged}", by="ann")
                logged += 1
            page = client.get("/models/part/history", params={"cursor": cursor, "limit": 7}).json()
            seen += [c["version"] for c in page["items"]]
            assert page["more"] == (page["next_cursor"] is not None)
            cursor = page["next_cursor"]
        assert seen == [f"v{i}" for i in range(70, 0, -1)]
        newest = client.get("/models/part/history", params={"limit": 5}).json()
        assert [c["version"] for c in newest["items"]] == [f"v{i}" for i in range(logged, logged - 5, -1)]
        after = client.get("/models/part/history", params={"cursor": newest["next_cursor"], "offset": 2}).json()
        assert after["items"][0]["version"] == f"v{logged - 7}"
        every = client.get("/models/part/history", params={"limit": 1000}).json()
        assert len(every["items"]) == logged and not every["more"] and every["next_cursor"] is None
        alone = client.get("/models/other/versions").json()
        assert [c["version"] for c in alone["history"]] == ["o1"] and alone["history_cursor"] is None
        body, mac = newest["next_cursor"].split(".")
        for bad in (body + "." + mac[::-1], "x", newest["next_cursor"] + "A", body):
            refused = client.get("/models/part/history", params={"cursor": bad})
            assert refused.status_code == 400 and refused.json()["error"] == "invalid_cursor", bad
        elsewhere = client.get("/models/other/history", params={"cursor": newest["next_cursor"]})
        assert elsewhere.status_code == 400 and elsewhere.json()["error"] == "invalid_cursor"
        # a records page's cursor is none of the log's, and the reverse (no records here: read by hand)
        service = client.app.state.service
        crossed = client.get("/models/part/history", params={"cursor": encode_cursor(service, '["part", 0]')})
        assert crossed.status_code == 400 and crossed.json()["error"] == "invalid_cursor"
        with pytest.raises(ApiError, match="cursor is not one"):
            decode_cursor(service, newest["next_cursor"])


def test_a_page_starts_where_its_cursor_says_at_every_block_size(tmp_path, monkeypatch):
    """model_history.page: each page's cursor is the byte its oldest change's line starts at, so the pages join up
    to the whole log at every block size, across torn and odd lines; a cursor inside a line (none a page gives)
    passes that line over as torn, never reads half of it."""
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    path = model_history.history_path(model)
    for i in range(6):
        model_history.record(model, "fit" if i == 0 else "update", f"v{i + 1}", f"v{i}" if i else None, by="ann")
        if i == 2:
            with open(path, "a") as f:
                f.write('{"action": "update", "at": "t", "vers\n{"action": "fit", "at": 1, "version": "v9"}\n')
    whole = model_history.read(model)
    assert [c["version"] for c in whole] == ["v6", "v5", "v4", "v3", "v2", "v1"]
    for block in range(1, path.stat().st_size + 2):
        monkeypatch.setattr(model_history, "READ_BLOCK", block)
        for size in (1, 2, 4, 6):
            seen, cursor = [], None
            while True:
                items, cursor = model_history.page(model, size, before=cursor)
                seen += items
                if cursor is None:
                    break
            assert seen == whole, (block, size)
    items, cursor = model_history.page(model, 2)
    assert path.read_bytes()[cursor:].startswith(b'{"at"') and b'"version": "v5"' in path.read_bytes()[cursor:][:200]
    assert model_history.page(model, 5, before=cursor + 1) == (whole[2:], None)  # v5's line cut: passed over
    assert model_history.page(model, 5, before=0) == ([], None)
    assert model_history.page(model, 9, before=10 ** 9) == (whole, None)


def test_a_page_of_a_long_log_reads_only_as_far_as_it_goes(tmp_path):
    """Every versions answer (the Model view polls it) and every history page read the whole log into memory and
    decoded it, and a deep page converted every entry it passed over: a model taught for years logs many megabytes
    (an update names up to a hundred images). A page reads the log from its end, as far as it goes; a line longer
    than what is read at a time, a torn last line and a log without a final newline read as before."""
    import tracemalloc

    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    images = [{"name": f"/data/line3/good/part_{i:06d}.png", "sha256": "a" * 64} for i in range(100)]
    path = model_history.history_path(model)
    path.parent.mkdir(parents=True)
    count = 3000
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"action": "update", "at": f"t{i}", "version": f"v{i + 1}", "previous": f"v{i}",
                                "by": "ann", "via": "api", "images": images}) + "\n")
        long = [{"name": "x" * 200, "sha256": "b" * 64}] * 6000  # longer than a block read at a time
        f.write(json.dumps({"action": "update", "at": "late", "version": "long", "images": long}) + "\n")
        f.write('{"action": "rollback", "at": "torn", "vers')  # a write cut off, and no newline
    size = path.stat().st_size
    tracemalloc.start()
    try:
        newest = model_history.read(model, 51)
        shallow = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        deep = model_history.read(model, 51, skip=count - 10)
        deeper = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [c["version"] for c in newest[:3]] == ["long", f"v{count}", f"v{count - 1}"] and len(newest) == 51
    assert len(newest[0]["images"]) == len(long)
    assert [c["version"] for c in deep] == [f"v{i}" for i in range(11, 0, -1)]
    assert shallow < size / 2 and deeper < size / 2, (shallow, deeper, size)
    assert [c["version"] for c in model_history.read(model)][-2:] == ["v2", "v1"]


def test_a_log_that_is_a_symbolic_link_is_not_read_and_is_warned_about(tmp_path, caplog):
    """A ``history.jsonl`` that links elsewhere (an archive copied in from another host) lists no changes, and the
    service's log says why its history is empty, naming the file."""
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps({"action": "fit", "at": "t", "version": "v1"}) + "\n")
    path = model_history.history_path(model)
    path.parent.mkdir(parents=True)
    path.symlink_to(elsewhere)
    caplog.set_level(logging.WARNING, logger="anomaly_service.model_history")
    caplog.clear()
    assert model_history.read(model) == []
    said = [r.getMessage() for r in caplog.records if r.name == "anomaly_service.model_history"]
    assert len(said) == 1 and str(path) in said[0] and "symbolic link" in said[0] and "Errno" not in said[0], said


def test_the_log_reads_the_same_whatever_the_block_it_is_read_by(tmp_path, monkeypatch):
    """Read from its end a block at a time: at every block size, from a byte to more than the log, and so at every
    place a block can begin (the log's first byte included), the same entries in the same order."""
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    for i in range(3):
        model_history.record(model, "fit" if i == 0 else "update", f"v{i + 1}", f"v{i}" if i else None, by="ann")
    with open(model_history.history_path(model), "a") as f:  # lines that hold no change are passed over
        for odd in ({"action": "fit", "at": "t", "version": None}, {"action": "fit", "at": 1, "version": "v9"},
                    {"action": "fit", "at": "t", "version": "v9", "by": 7}):
            f.write(json.dumps(odd) + "\n")
    whole = model_history.read(model)
    assert [c["version"] for c in whole] == ["v3", "v2", "v1"]
    for block in range(1, model_history.history_path(model).stat().st_size + 2):
        monkeypatch.setattr(model_history, "READ_BLOCK", block)
        assert model_history.read(model) == whole, block


def test_a_cursor_into_a_log_replaced_since_is_refused_not_read_from_elsewhere(tmp_path, model_dir):
    """A cursor is a byte of the log, and held only while the log was appended to. A models backup restored over the
    model (its log older and shorter, or another host's and longer) or the model removed and fitted anew under its
    name put another log there: the cursor then read the newest changes again as the older ones (past the end of a
    shorter log) or another log's changes from the middle of one of its lines, and said nothing. Such a cursor is
    now a 400 saying the log changed; a restored log that still holds the cursor's line where it was (an older
    copy of the same log) goes on as before."""
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    path = model_history.history_path(models / "part")
    for i in range(60):
        model_history.record(models / "part", "update", f"v{i + 1}", f"v{i}", by="ann", note=f"batch {i}")
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        cursor = client.get("/models/part/versions").json()["history_cursor"]  # after v11: v10 .. v1 older
        old = path.read_bytes()
        for replaced in (old[:len(old) // 10], old.replace(b'"ann"', b'"bobby"')):  # shorter; longer, shifted
            path.write_bytes(replaced)
            refused = client.get("/models/part/history", params={"cursor": cursor})
            assert refused.status_code == 400 and refused.json()["error"] == "invalid_cursor", refused.text
            assert "change log" in refused.json()["detail"]
        path.write_bytes(old[:old.index(b'"version": "v12"')].rsplit(b"\n", 1)[0] + b"\n")  # a copy up to v11
        page = client.get("/models/part/history", params={"cursor": cursor}).json()
        assert [c["version"] for c in page["items"]] == [f"v{i}" for i in range(10, 0, -1)]
        path.unlink()  # removed, and fitted again: a new log
        model_history.record(models / "part", "fit", "n1", None, by="cy")
        refused = client.get("/models/part/history", params={"cursor": cursor})
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_cursor", refused.text
        # the newest change's line break cut off by a full disk: it reads, and so does a cursor at it
        path.write_bytes(path.read_bytes() + json.dumps({"at": "t", "action": "update", "version": "n2"}).encode())
        newest = client.get("/models/part/history", params={"limit": 1}).json()
        assert [c["version"] for c in newest["items"]] == ["n2"] and newest["next_cursor"]
        page = client.get("/models/part/history", params={"cursor": newest["next_cursor"]})
        assert page.status_code == 200 and [c["version"] for c in page.json()["items"]] == ["n1"], page.text


def test_a_cursor_checks_the_start_of_a_line_not_a_change_inside_one(tmp_path):
    """model_history.entry_at, the check of a cursor: the change on the line that starts at the byte, and None at a
    byte inside a line, even where the rest of the line reads as a change (a write torn and glued to the next),
    past the log's end, or in a log that is a symbolic link."""
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    path = model_history.history_path(model)
    path.parent.mkdir(parents=True)
    line = json.dumps({"at": "t", "action": "fit", "version": "v1"})
    path.write_text(f"x{line}\n{{\"at\": \"t\", \"ver{line}\n{line}\n")
    glued, whole = path.read_text().index(f"ver{line}") + 3, path.read_text().rindex(line)
    assert model_history.entry_at(model, whole) == json.loads(line)
    assert [model_history.entry_at(model, at) for at in (0, 1, glued, whole + 1, path.stat().st_size,
                                                         path.stat().st_size + 5)] == [None] * 6
    path.rename(tmp_path / "elsewhere")
    path.symlink_to(tmp_path / "elsewhere")
    assert model_history.entry_at(model, whole) is None


def test_a_change_logged_without_the_later_fields_reads_with_them_empty(tmp_path):
    """A line written before an entry named its author, note or channel (or by hand) has only its action, time and
    version: it reads with ``previous``, ``by`` and ``note`` empty and ``via`` "?", as every listing of the log (the
    versions answer, the history pages, ``anomaly versions --history``) shows each of them."""
    model = tmp_path / "models" / "part"
    model.mkdir(parents=True)
    path = model_history.history_path(model)
    path.parent.mkdir(parents=True)
    path.write_text('{"at": "2024-01-01T00:00:00+00:00", "action": "fit", "version": "v1"}\n')
    model_history.record(model, "update", "v2", "v1", by="ann", note="more good parts", via="api")
    (old,), older = model_history.page(model, before=model_history.page(model, 1)[1])
    assert old == {"at": "2024-01-01T00:00:00+00:00", "action": "fit", "version": "v1", "previous": None, "by": None,
                   "note": None, "via": "?"} and older is None
    assert model_history.entry_at(model, 0) == {"at": "2024-01-01T00:00:00+00:00", "action": "fit", "version": "v1"}


def test_a_records_cursor_is_made_and_read_as_before_cursors_moved():
    """api/cursors.py took the records' cursors over from routes/inspections.py and signs each listing apart: a
    records cursor must be the very token the release before made (an integrator's saved cursor goes on after an
    upgrade), with the API key and without one, and any text a listing puts in a cursor comes back as it went in."""
    import base64
    import hashlib
    import hmac
    import types

    from anomaly_service.api.cursors import HISTORY, decode_cursor, encode_cursor
    from anomaly_service.settings import ServiceSettings

    def before(key: str, last_id: str) -> str:  # routes/inspections.py's encode_cursor, as it was
        signing = hashlib.sha256(b"anomaly-cursor:" + key.encode()).digest()
        body = base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")
        mac = hmac.new(signing, body.encode(), hashlib.sha256).digest()[:12]
        return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    for key in ("", "k1"):
        service = types.SimpleNamespace(settings=ServiceSettings(api_key=key or None))
        ids = [f"01J{i:023d}" for i in range(120)]  # among them, tokens whose checksum ends in an "x"
        assert [encode_cursor(service, i) for i in ids] == [before(key, i) for i in ids]
        assert [decode_cursor(service, before(key, i)) for i in ids] == ids
        for text in ("101", '["part", 101]', "x", ""):  # "101" is "MTAx": a token ending in an "x"
            assert decode_cursor(service, encode_cursor(service, text, HISTORY), HISTORY) == text


def test_a_cursor_of_the_wrong_shape_or_model_is_a_400_on_a_service_without_a_key(tmp_path, model_dir):
    """Without an API key the cursors' key is known to anyone, so a client can sign a cursor of any shape: each is a
    400, never a 500 or a page read from a byte no page ended at; another model's cursor is refused even where its
    log is a copy of this one's (a model copied under a new name with its archive). And the cursor is checked by its
    change's time as well as its version: changes logged a second apart page as changes logged in one."""
    import shutil

    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.api.cursors import HISTORY, encode_cursor
    from anomaly_service.settings import ServiceSettings

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    shutil.copytree(model_dir / "part", models / "copy")
    path = model_history.history_path(models / "part")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"at": f"2025-01-0{i}T00:00:00+00:00", "action": "update", "version": f"v{i}",
                                        "previous": f"v{i - 1}"}) + "\n" for i in range(1, 8)))
    model_history.history_path(models / "copy").parent.mkdir(parents=True)
    shutil.copy(path, model_history.history_path(models / "copy"))
    settings = ServiceSettings(model_dir=models, reload_interval=0, device="cpu", record=False, api_key=None)
    with TestClient(create_app(settings)) as client:
        first = client.get("/models/part/history", params={"limit": 2}).json()
        cursor = first["next_cursor"]
        rest = client.get("/models/part/history", params={"cursor": cursor}).json()
        assert [c["version"] for c in first["items"] + rest["items"]] == [f"v{i}" for i in range(7, 0, -1)]
        service = client.app.state.service
        older = path.read_text().index('{"at": "2025-01-06')
        at = "2025-01-06T00:00:00+00:00"
        for text in ("not json", '["part", 1]', '{"a": 1}', json.dumps(["part", str(older), at, "v6"]),
                     json.dumps(["part", older + 0.5, at, "v6"]), json.dumps(["part", True, at, "v6"]),
                     json.dumps(["part", -1, at, "v6"]), json.dumps(["part", older, "2025-01-07T00:00:00+00:00", "v6"]),
                     json.dumps(["part", older, at, "v7"]), json.dumps(["copy", older, at, "v6"])):
            refused = client.get("/models/part/history", params={"cursor": encode_cursor(service, text, HISTORY)})
            assert refused.status_code == 400 and refused.json()["error"] == "invalid_cursor", (text, refused.text)
        assert client.get("/models/copy/history", params={"cursor": cursor}).status_code == 400
        good = encode_cursor(service, json.dumps(["part", older, at, "v6"]), HISTORY)
        assert client.get("/models/part/history", params={"cursor": good}).json() == rest
