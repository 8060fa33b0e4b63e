"""Inspection records through the HTTP API: what every scoring route records, part context and its limits,
reviews with history, pagination and filters, the stored pictures, restarts, a database outage, and 16
concurrent clients against the real server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from anomaly_service.api import create_app
from anomaly_service.settings import ServiceSettings
from conftest import add_defect, allow_connections, png_bytes, textured_part
from test_admission import metric

RNG = np.random.default_rng(7)
GOOD = png_bytes(textured_part(RNG))
BAD = png_bytes(add_defect(textured_part(RNG), 64, 64, radius=12)[0])


def make_client(model_dir, tmp_path, **settings) -> TestClient:
    settings.setdefault("reload_interval", 0)
    settings.setdefault("data_dir", tmp_path / "data")
    return TestClient(create_app(ServiceSettings(model_dir=model_dir, **settings)))


def flushed(client: TestClient) -> None:
    assert client.app.state.service.recorder.flush(10)


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    with make_client(model_dir, tmp_path_factory.mktemp("insp"), keep_images="anomalies") as c:
        yield c


@pytest.fixture
def own_client(model_dir, tmp_path):
    """A service with records of its own, for a test that asserts on all of them: the module's ``client`` holds
    what the other tests left there, in whatever order they ran."""
    with make_client(model_dir, tmp_path, keep_images="anomalies") as c:
        yield c


def score(client, image=GOOD, path="/score", **kw):
    r = client.post(path, files={"file": ("x.png", image, "image/png")}, **kw)
    assert r.status_code == 200, r.text
    return r


def test_every_scoring_route_records_with_the_part_context(client):
    a = score(client, BAD, params={"part_id": "SN-1", "line": "L1", "station": "top", "meta": '{"shift": "B"}'})
    score(client, GOOD, "/score/image", data={"part_id": "SN-2", "line": "L1", "meta": '{"lot": 7}'})
    r = client.post("/score/batch", params={"line": "L9"},
                    files=[("files", ("a.png", GOOD, "image/png")), ("files", ("b.png", BAD, "image/png")),
                           ("files", ("c.png", b"not an image", "image/png"))])
    assert [x["ok"] for x in r.json()["results"]] == [True, True, False]
    flushed(client)
    items = client.get("/inspections", params={"limit": 500}).json()["items"]
    first = next(i for i in items if i["part_id"] == "SN-1")
    answer = a.json()
    assert first["line"] == "L1" and first["station"] == "top" and first["meta"] == {"shift": "B"}
    assert first["decision"] == "anomaly" and first["score"] == pytest.approx(answer["score"])
    assert first["normalized_score"] == pytest.approx(answer["normalized_score"])
    assert first["threshold"] == pytest.approx(answer["threshold"]) and first["regions"] == answer["regions"]
    assert first["image_sha256"] == hashlib.sha256(BAD).hexdigest() and first["image_bytes"] == len(BAD)
    assert first["model"] == "part" and first["model_version"] == answer["model_version"]
    # one name for the version wherever a person reads it: the answer, the record, the page's model list and
    # `anomaly versions` (the versions route) all say the version id; they said 16 hex digits against that id
    versions = client.get("/models/part/versions").json()
    assert answer["model_version"] == versions["current"] == versions["versions"][0]["id"]
    assert client.get("/models").json()["models"][0]["version"] == versions["current"]
    assert {"decode", "backbone", "render", "total"} <= set(first["timing_ms"])
    assert first["files_state"] == "stored" and first["overlay_url"].split("?")[0].endswith("/overlay.png")
    second = next(i for i in items if i["part_id"] == "SN-2")
    assert second["meta"] == {"lot": 7} and second["decision"] == "normal"
    assert second["files_state"] == "not_kept" and second["image_url"] is None  # keep_images=anomalies
    assert sorted(i["decision"] for i in items if i["line"] == "L9") == ["anomaly", "normal"]  # bad file: none


@pytest.mark.parametrize("params,code", [
    ({"meta": json.dumps({"k": "x" * 250, **{f"k{i}": "y" * 200 for i in range(25)}})}, "invalid_meta"),
    ({"meta": '{"nested": {"a": 1}}'}, "invalid_meta"),
    ({"meta": "[1, 2]"}, "invalid_meta"),
    ({"meta": "{not json"}, "invalid_meta"),
    ({"part_id": "a\x01b"}, "invalid_part_context"),
    ({"part_id": "p" * 201}, "invalid_part_context"),
    # C1 controls and a right-to-left override (a label that reads as another on the operator's screen)
    ({"part_id": "a\x85b"}, "invalid_part_context"),
    ({"line": "L\u202e2-enil"}, "invalid_part_context"),
    ({"meta": '{"a": "\\ud800"}'}, "invalid_meta"),  # a lone surrogate: no UTF-8 form (was a 500)
    ({"meta": '{"\\ud800": 1}'}, "invalid_meta"),
    ({"meta": '{"a": "x\\u2028y"}'}, "invalid_meta"),
])
def test_bad_part_context_is_refused_before_scoring(client, params, code):
    r = client.post("/score", params=params, files={"file": ("x.png", GOOD, "image/png")})
    assert r.status_code == 422 and r.json()["error"] == code and r.json()["detail"]
    r = client.post("/score", data=params, files={"file": ("x.png", GOOD, "image/png")})  # as form fields too
    assert r.status_code == 422 and r.json()["error"] == code


def test_review_end_to_end_with_history(own_client):
    client = own_client
    score(client, BAD, params={"part_id": "REV-1"})
    flushed(client)
    iid = client.get("/inspections", params={"part_id": "REV-1"}).json()["items"][0]["id"]
    assert client.get("/inspections", params={"part_id": "REV-1", "verdict": "unreviewed"}).json()["items"]
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "defect", "note": "crack"},
                    headers={"X-Reviewer": "ann"})
    assert r.status_code == 200 and r.json()["verdict"] == "defect"
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "good"}, headers={"X-Reviewer": "bob"})
    got = client.get(f"/inspections/{iid}").json()
    assert got["verdict"] == "good" and got["reviewed_at"]
    assert [(x["verdict"], x["reviewer"], x["note"]) for x in got["reviews"]] == [("defect", "ann", "crack"),
                                                                                  ("good", "bob", None)]
    assert [i["id"] for i in client.get("/inspections", params={"verdict": "good"}).json()["items"]] == [iid]
    assert not client.get("/inspections", params={"part_id": "REV-1", "verdict": "unreviewed"}).json()["items"]
    for body, headers in (({"verdict": "maybe"}, {"X-Reviewer": "ann"}), ({"verdict": "good"}, {}),
                          ({"verdict": "good", "extra": 1}, {"X-Reviewer": "ann"}),
                          ({"verdict": "good"}, {"X-Reviewer": "\xa0".encode()}),  # names nobody once stripped
                          ({"verdict": "good"}, {"X-Reviewer": "\u00a0\u00a0".encode()}),
                          ({"verdict": "good"}, {"X-Reviewer": "ann\u202e".encode()}),
                          *(({"verdict": "good"}, {"X-Reviewer": blank.encode()})  # invisible: names nobody
                            for blank in ("\u200b", "\ufeff", "\u3164", "\u2800", "\u0301", "ann\u200b")),
                          ({"verdict": "good"}, {"X-Reviewer": ("张" * 201).encode()})):  # over 200 characters
        r = client.post(f"/inspections/{iid}/review", json=body, headers=headers)
        assert r.status_code == 422 and set(r.json()) == {"error", "detail"}
    # a UTF-8 name, as curl and scripts send it (HTTP hands headers over as Latin-1): stored as written
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "good"}, headers={"X-Reviewer": "Jürgen".encode()})
    assert r.status_code == 200 and r.json()["reviews"][-1]["reviewer"] == "Jürgen"
    # the limit counts characters, as the page's field and the database's column do, not the header's UTF-8 bytes
    name = "张伟" * 100
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "good"}, headers={"X-Reviewer": name.encode()})
    assert r.status_code == 200 and r.json()["reviews"][-1]["reviewer"] == name, r.text
    r = client.post("/inspections/nope/review", json={"verdict": "good"}, headers={"X-Reviewer": "ann"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_inspection"
    assert client.get("/inspections/nope").json()["error"] == "unknown_inspection"
    service = client.app.state.service
    assert [i for i, _ in service.records.reviewed_images("part", "good")] == [iid]


def test_a_review_that_another_overtook_is_refused_not_recorded(client):
    """Two operators on one queue: both see the part unreviewed; the second to answer, naming the verdict it saw,
    gets 409 and records nothing, so ann's "defect" is never turned into "good" (an image to learn from) unseen."""
    score(client, BAD, params={"part_id": "REV-2"})
    flushed(client)
    iid = client.get("/inspections", params={"part_id": "REV-2"}).json()["items"][0]["id"]
    ann = client.post(f"/inspections/{iid}/review", json={"verdict": "defect", "replaces": "unreviewed"},
                      headers={"X-Reviewer": "ann"})
    assert ann.status_code == 200 and ann.json()["verdict"] == "defect"
    # ann's page sends it again (its answer lost as it committed): her own review, answered as it was, not a 409
    again = client.post(f"/inspections/{iid}/review", json={"verdict": "defect", "replaces": "unreviewed"},
                        headers={"X-Reviewer": "ann"})
    assert again.status_code == 200 and again.json()["reviews"] == ann.json()["reviews"], again.text
    bob = client.post(f"/inspections/{iid}/review", json={"verdict": "good", "replaces": "unreviewed"},
                      headers={"X-Reviewer": "bob"})
    assert bob.status_code == 409 and bob.json()["error"] == "review_conflict" and "defect" in bob.json()["detail"]
    got = client.get(f"/inspections/{iid}").json()
    assert got["verdict"] == "defect" and [r["reviewer"] for r in got["reviews"]] == ["ann"]
    # having seen ann's verdict, bob replaces it on purpose; without `replaces` a review is recorded as it comes
    bob = client.post(f"/inspections/{iid}/review", json={"verdict": "good", "replaces": "defect"},
                      headers={"X-Reviewer": "bob"})
    assert bob.status_code == 200 and bob.json()["verdict"] == "good"
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "defect"}, headers={"X-Reviewer": "cy"})
    assert r.status_code == 200 and [x["reviewer"] for x in r.json()["reviews"]] == ["ann", "bob", "cy"]
    r = client.post(f"/inspections/{iid}/review", json={"verdict": "good", "replaces": "maybe"},
                    headers={"X-Reviewer": "cy"})
    assert r.status_code == 422


def test_an_operator_undoes_their_review_and_the_verdict_before_it_comes_back(client):
    """A review could only be replaced by another verdict, so a part sent to "real defect" by a slip of the key
    could not go back to the queue. An undo withdraws the latest review: the verdict before it (unreviewed for the
    first) is on record again, and the history keeps both entries. Only the latest entry can be undone: once
    another operator reviewed since, the undo is refused and nothing changes."""
    score(client, BAD, params={"part_id": "UNDO-1"})
    flushed(client)
    iid = client.get("/inspections", params={"part_id": "UNDO-1"}).json()["items"][0]["id"]
    ann = client.post(f"/inspections/{iid}/review", json={"verdict": "defect", "replaces": "unreviewed"},
                      headers={"X-Reviewer": "ann"}).json()
    first = ann["reviews"][-1]
    assert first["verdict"] == "defect" and first["undoes"] is None and isinstance(first["id"], int)
    r = client.post(f"/inspections/{iid}/reviews/{first['id']}/undo", headers={"X-Reviewer": "ann"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["verdict"] is None and got["reviewed_at"] is None  # unreviewed again: back in the queue
    assert [(x["verdict"], x["undoes"], x["reviewer"]) for x in got["reviews"]] == [("defect", None, "ann"),
                                                                                    (None, first["id"], "ann")]
    assert [i["id"] for i in client.get("/inspections", params={"part_id": "UNDO-1", "verdict": "unreviewed"})
            .json()["items"]] == [iid]
    assert client.get(f"/inspections/{iid}").json()["reviews"] == got["reviews"]
    undo = got["reviews"][-1]["id"]
    r = client.post(f"/inspections/{iid}/reviews/{undo}/undo", headers={"X-Reviewer": "ann"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"  # an undo is not undone: review again
    r = client.post(f"/inspections/{iid}/reviews/{first['id']}/undo", headers={"X-Reviewer": "ann"})
    assert r.status_code == 200 and r.json()["reviews"] == got["reviews"]  # sent again (answer lost): as it stands
    r = client.post(f"/inspections/{iid}/reviews/{first['id']}/undo", headers={"X-Reviewer": "bob"})
    assert r.status_code == 409 and r.json()["error"] == "review_conflict"  # not the latest entry any more

    # ann's verdict, then bob's: bob's undo brings ann's back
    client.post(f"/inspections/{iid}/review", json={"verdict": "defect"}, headers={"X-Reviewer": "ann"})
    bob = client.post(f"/inspections/{iid}/review", json={"verdict": "good", "replaces": "defect"},
                      headers={"X-Reviewer": "bob"}).json()["reviews"][-1]
    got = client.post(f"/inspections/{iid}/reviews/{bob['id']}/undo", headers={"X-Reviewer": "bob"}).json()
    assert got["verdict"] == "defect" and got["reviewed_at"] and got["reviews"][-1]["verdict"] == "defect"
    assert [i for i, _ in client.app.state.service.records.reviewed_images("part", "good")].count(iid) == 0

    # cy reviews; ann's undo of her own earlier review would take cy's decision back unseen: refused
    mine = client.post(f"/inspections/{iid}/review", json={"verdict": "good"},
                       headers={"X-Reviewer": "ann"}).json()["reviews"][-1]
    client.post(f"/inspections/{iid}/review", json={"verdict": "defect"}, headers={"X-Reviewer": "cy"})
    r = client.post(f"/inspections/{iid}/reviews/{mine['id']}/undo", headers={"X-Reviewer": "ann"})
    assert r.status_code == 409 and r.json()["error"] == "review_conflict" and "defect" in r.json()["detail"]
    got = client.get(f"/inspections/{iid}").json()
    assert got["verdict"] == "defect" and got["reviews"][-1]["reviewer"] == "cy"

    for path, headers, status, code in ((f"/inspections/{iid}/reviews/999999999/undo", {"X-Reviewer": "ann"}, 404,
                                         "unknown_review"),
                                        ("/inspections/nope/reviews/1/undo", {"X-Reviewer": "ann"}, 404,
                                         "unknown_inspection"),
                                        (f"/inspections/{iid}/reviews/{mine['id']}/undo", {}, 422, "invalid_request"),
                                        (f"/inspections/{iid}/reviews/0/undo", {"X-Reviewer": "ann"}, 422,
                                         "invalid_request")):
        r = client.post(path, headers=headers)
        assert (r.status_code, r.json()["error"]) == (status, code), path
    # another inspection's review id is no review of this one
    score(client, BAD, params={"part_id": "UNDO-2"})
    flushed(client)
    other = client.get("/inspections", params={"part_id": "UNDO-2"}).json()["items"][0]["id"]
    theirs = client.post(f"/inspections/{other}/review", json={"verdict": "good"},
                         headers={"X-Reviewer": "ann"}).json()["reviews"][-1]
    r = client.post(f"/inspections/{iid}/reviews/{theirs['id']}/undo", headers={"X-Reviewer": "ann"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_review"


def test_stats_until_the_first_day_is_a_422_not_a_500(client):
    # the default since is 24 hours before until: there are none before the first representable day
    r = client.get("/inspections/stats", params={"until": "0001-01-01T00:00:00Z"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    r = client.get("/inspections/stats", params={"since": "0001-01-01T00:00:00Z", "until": "0001-01-01T01:00:00Z"})
    assert r.status_code == 200, r.text


def test_a_range_that_ends_before_it_starts_is_a_422_not_an_empty_page(client):
    """An empty list for since after until reads as "no parts in that time" on a dashboard: it is refused, and a
    range in order still answers."""
    backwards = {"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00+01:00"}
    for path in ("/inspections", "/inspections/stats"):
        r = client.get(path, params=backwards)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request" and "after until" in r.json()["detail"]
        assert client.get(path, params={**backwards, "since": "2026-11-30T00:00:00Z"}).status_code == 200


def test_since_and_until_read_iso_8601_as_the_export_does_never_a_number_as_unix_time(client):
    """The same instant written in any ISO 8601 form selects the same records, since inclusive and until exclusive.
    A compact date (20261205, ISO 8601's basic form, which the export reads as that day) was read by the API as Unix
    seconds, 1970-08-23, so since=<tomorrow> listed every record; a bare number now is a 422 there, as in the CLI."""
    score(client, GOOD, params={"part_id": "WHEN"})
    flushed(client)
    at = datetime.fromisoformat(client.get("/inspections", params={"part_id": "WHEN"}).json()["items"][0]["created_at"])
    assert at.utcoffset() == timedelta(0)

    def parts(**when: str) -> list[str]:
        r = client.get("/inspections", params={"part_id": "WHEN", **when})
        assert r.status_code == 200, (when, r.text)
        return [i["part_id"] for i in r.json()["items"]]

    same = [at.isoformat(), at.isoformat().replace("+00:00", "Z"), at.replace(tzinfo=None).isoformat(),
            at.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
            at.astimezone(timezone(timedelta(hours=-5))).isoformat(),
            at.astimezone(timezone(timedelta(hours=5, minutes=30))).strftime("%Y%m%dT%H%M%S.%f%z")]
    for text in same:
        assert parts(since=text) == ["WHEN"] and parts(until=text) == [], text
    day = at.date()
    for form in ("%Y-%m-%d", "%Y%m%d"):
        assert parts(since=day.strftime(form)) == ["WHEN"]
        assert parts(since=(day + timedelta(days=1)).strftime(form)) == [], form
        assert parts(until=(day + timedelta(days=1)).strftime(form)) == ["WHEN"]
    for route in ("/inspections", "/inspections/stats"):
        for number in ("0", "-1", str(int(at.timestamp())), str(int(at.timestamp() * 1000))):
            r = client.get(route, params={"since": number})
            assert r.status_code == 422 and "ISO 8601" in r.json()["detail"], (route, number, r.text)
            assert r.json()["detail"].startswith(f"query parameter since: '{number}' is not"), r.text
        # an offset's "+" sent unescaped arrives as a space: the answer says how to send it
        r = client.get(f"{route}?since=2026-12-01T08:00:00+05:30")
        assert r.status_code == 422 and "%2B" in r.json()["detail"], r.text
    assert client.get("/inspections/stats", params={"since": day.strftime("%Y%m%d"), "bucket": "day"}).json()[
        "since"] == f"{day.isoformat()}T00:00:00+00:00"


def test_stats_by_the_plants_local_day(client):
    """A plant asks for its own days: ``tz`` cuts the buckets at its midnight, a since without a zone is read there,
    and each start says its offset. An unknown zone is a 422 that names what it wants."""
    from zoneinfo import ZoneInfo

    kolkata = ZoneInfo("Asia/Kolkata")
    for attempt in range(2):  # parts scored across Kolkata's midnight fall into two days: score them again
        line, before = f"TZ{attempt or ''}", datetime.now(kolkata).date()
        for i in range(3):
            score(client, GOOD, params={"line": line, "part_id": f"tz{i}"})
        flushed(client)
        today = datetime.now(kolkata).date()
        if today == before:
            break
    local = client.get("/inspections/stats", params={"tz": "Asia/Kolkata", "bucket": "day", "line": line,
                                                     "since": today.isoformat()})
    assert local.status_code == 200, local.text
    body = local.json()
    midnight = datetime(today.year, today.month, today.day, tzinfo=kolkata)
    assert body["tz"] == "Asia/Kolkata" and body["since"] == midnight.astimezone(timezone.utc).isoformat()
    assert [(b["start"], b["count"]) for b in body["buckets"]] == [(midnight.isoformat(), 3)]
    assert body["buckets"][0]["start"].endswith("+05:30")
    hours = client.get("/inspections/stats", params={"tz": "Asia/Kolkata", "line": line}).json()["buckets"]
    assert sum(b["count"] for b in hours) == 3 and all(b["start"].endswith(":00:00+05:30") for b in hours)
    utc = client.get("/inspections/stats", params={"tz": "", "line": line}).json()
    assert utc["tz"] == "UTC" and all(b["start"].endswith("+00:00") for b in utc["buckets"])
    # at the ends of the calendar a zone's offset would take the time past year 1 or 9999: an answer, not a 500
    edge = client.get("/inspections/stats", params={"tz": "America/New_York", "since": "0001-01-01T00:00:00Z",
                                                    "until": "0001-01-01T01:00:00Z"})
    assert edge.status_code == 200 and edge.json()["buckets"] == [], edge.text
    for bad in ("Mars/Olympus", "../../etc/passwd", "/usr/share/zoneinfo/UTC", "Europe", "zone.tab", "a\x00b"):
        r = client.get("/inspections/stats", params={"tz": bad})
        assert r.status_code == 422 and "IANA time zone" in r.json()["detail"], (bad, r.text)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_stats_through_the_clock_change_nights(model_dir, tmp_path, request, db):
    """A Berlin plant through both of 2026's clock changes, and Newfoundland (half-hour offsets) through its spring
    one, on the real service: the 23-hour day has 23 hourly buckets and starts at local midnight, the 25-hour day
    counts every hour, the repeated 02:00 is two buckets with their own offsets. A since or until without an offset
    that falls in the skipped hour is read with the offset before the change (02:30 is 03:30 summer time), in the
    repeated hour as its first time; the answer said neither, only the UTC instants, so it now gives the range on
    the plant's clock too."""
    from zoneinfo import ZoneInfo

    from anomaly_service.records import Inspection, new_id

    url = request.getfixturevalue("postgres_url") if db == "postgresql" else None
    with make_client(model_dir, tmp_path, database_url=url) as c:
        store = c.app.state.service.records
        rows, t = [], datetime(2026, 3, 7, 12, tzinfo=timezone.utc)
        while t < datetime(2026, 10, 26, 12, tzinfo=timezone.utc):
            if t.month in (3, 10) and t.day in (7, 8, 9, 24, 25, 26, 28, 29, 30):  # every quarter hour of the nights
                rows.append(Inspection(
                    id=new_id(int(t.timestamp() * 1000)), created_at=t, model="part", model_version="v1", score=1.0,
                    normalized_score=0.5, threshold=2.0, decision="normal", regions=[], image_width=8,
                    image_height=8, image_bytes=10, image_sha256="0" * 64, timing_ms={"total": 1.0}, line="DST",
                    source="api", files_state="not_kept"))
            t += timedelta(minutes=15)
        store.add_many(rows)

        def stats(tz: str, bucket: str, since: str, until: str) -> dict:
            r = c.get("/inspections/stats", params={"tz": tz, "bucket": bucket, "since": since, "until": until,
                                                    "line": "DST"})
            assert r.status_code == 200, r.text
            return r.json()

        for tz, day, hours in (("Europe/Berlin", "2026-03-29", 23), ("Europe/Berlin", "2026-10-25", 25),
                               ("America/St_Johns", "2026-03-08", 23)):
            zone = ZoneInfo(tz)
            midnight = datetime.fromisoformat(day).replace(tzinfo=zone)
            nxt = (midnight + timedelta(days=1)).replace(tzinfo=zone)
            want = sum(midnight <= r.created_at < nxt for r in rows)
            assert want == 4 * hours
            whole = stats(tz, "day", day, nxt.date().isoformat())
            assert [(b["start"], b["count"]) for b in whole["buckets"]] == [(midnight.isoformat(), want)], tz
            assert whole["since_local"] == midnight.isoformat() and whole["until_local"] == nxt.isoformat()
            by_hour = stats(tz, "hour", day, nxt.date().isoformat())["buckets"]
            assert len(by_hour) == hours and all(b["count"] == 4 for b in by_hour), tz
            first_hour = midnight.astimezone(timezone.utc)
            assert [b["start"] for b in by_hour] == [
                (first_hour + timedelta(hours=h)).astimezone(zone).isoformat() for h in range(hours)]
        night = stats("Europe/Berlin", "hour", "2026-10-25T01:00", "2026-10-25T04:00")["buckets"]
        assert [b["start"] for b in night] == ["2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00",
                                               "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"]
        # without an offset: the repeated hour's first time, the skipped hour's time on the clock before the change
        first = stats("Europe/Berlin", "hour", "2026-10-25T02:30", "2026-10-25T03:00")
        assert (first["since"], first["since_local"]) == ("2026-10-25T00:30:00+00:00", "2026-10-25T02:30:00+02:00")
        assert [(b["start"], b["count"]) for b in first["buckets"]] == [("2026-10-25T02:00:00+02:00", 2),
                                                                        ("2026-10-25T02:00:00+01:00", 4)]
        second = stats("Europe/Berlin", "hour", "2026-10-25T02:30+01:00", "2026-10-25T03:00")
        assert second["since_local"] == "2026-10-25T02:30:00+01:00" and len(second["buckets"]) == 1
        skipped = stats("Europe/Berlin", "hour", "2026-03-29T02:30", "2026-03-29T04:00")
        assert (skipped["since"], skipped["since_local"]) == ("2026-03-29T01:30:00+00:00",
                                                              "2026-03-29T03:30:00+02:00")
        assert [(b["start"], b["count"]) for b in skipped["buckets"]] == [("2026-03-29T03:00:00+02:00", 2)]
        newfoundland = stats("America/St_Johns", "hour", "2026-03-08T02:30", "2026-03-08T03:30")
        assert newfoundland["since_local"] == "2026-03-08T03:30:00-02:30"
        assert newfoundland["until_local"] == "2026-03-08T03:30:00-02:30" and newfoundland["buckets"] == []


def test_stats_refuse_zone_files_that_are_no_plants_clock(client):
    """ZoneInfo opens any file under the system's zone folders: tz=localtime cut on the server's own zone (whatever
    its host has) and tz=right/Europe/Berlin, a leap-second clock, kept Berlin in summer time through its fall-back
    night. Both are a 422 now; the zones the tz database lists, old names and Etc/ ones too, still answer."""
    from zoneinfo import ZoneInfo

    from anomaly_service.records.stats import Zone

    night = (datetime(2026, 10, 24, tzinfo=timezone.utc), datetime(2026, 10, 26, tzinfo=timezone.utc))
    assert len(Zone.over(ZoneInfo("Europe/Berlin"), *night).spans) == 2
    for name in ("localtime", "right/Europe/Berlin"):
        r = client.get("/inspections/stats", params={"tz": name})
        assert r.status_code == 422 and "IANA time zone" in r.json()["detail"], (name, r.text)
    for name in ("Europe/Berlin", "America/St_Johns", "US/Eastern", "Etc/GMT+5", "EST5EDT", "utc"):
        r = client.get("/inspections/stats", params={"tz": name})
        assert r.status_code == 200 and r.json()["tz"] == ("UTC" if name == "utc" else name), (name, r.text)


def test_keyset_pagination_filters_and_tampered_cursor(client):
    for route in ("/inspections", "/inspections/stats"):  # a valid time with no UTC equivalent: 422, not 500
        for when in ({"since": "0001-01-01T00:00:00+14:00"}, {"until": "9999-12-31T23:59:59-14:00"}):
            r = client.get(route, params=when)
            assert r.status_code == 422 and r.json()["error"] == "invalid_request", (route, when, r.text)
    for i in range(7):
        score(client, GOOD, params={"line": "PAGE", "part_id": f"pg{i}"})
    flushed(client)
    seen, cursor = [], None
    while True:
        page = client.get("/inspections", params={"line": "PAGE", "limit": 3, **({"cursor": cursor} if cursor
                                                                                  else {})}).json()
        seen += [i["part_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"pg{i}" for i in reversed(range(7))]
    page = client.get("/inspections", params={"line": "PAGE", "limit": 3}).json()
    body, mac = page["next_cursor"].split(".")
    for bad in (body[:-2] + "AA." + mac, body + "." + mac[::-1], "garbage", page["next_cursor"] + "x"):
        r = client.get("/inspections", params={"cursor": bad})
        assert r.status_code == 400 and r.json()["error"] == "invalid_cursor"
    assert client.get("/inspections", params={"decision": "maybe"}).status_code == 422
    assert client.get("/inspections", params={"since": "yesterday"}).json()["error"] == "invalid_request"
    # an empty filter (a dashboard's "any" in a dropdown) filters nothing, where it matched a model named ""
    everything = client.get("/inspections", params={"line": "PAGE", "limit": 50}).json()["items"]
    assert client.get("/inspections", params={"line": "PAGE", "model": "", "limit": 50}).json()["items"] == everything
    # the dropdowns with choices too: an empty decision, verdict or time was a 422 for an option not chosen
    blank = {"decision": "", "verdict": "", "since": "", "until": ""}
    assert client.get("/inspections", params={"line": "PAGE", **blank, "limit": 50}).json()["items"] == everything
    assert len(client.get("/inspections", params={"line": "PAGE", "limit": ""}).json()["items"]) == 7  # up to 50
    assert client.get("/inspections/stats", params={"bucket": "", "since": ""}).json()["bucket"] == "hour"
    future = client.get("/inspections", params={"since": "2999-01-01T00:00:00Z"}).json()
    assert future["items"] == [] and future["next_cursor"] is None
    stats = client.get("/inspections/stats", params={"bucket": "minute"}).json()
    page_rows = [b for b in stats["buckets"] if b["line"] == "PAGE"]
    assert sum(b["count"] for b in page_rows) == 7 and all(b["anomaly_rate"] == 0 for b in page_rows)
    # a range is bounded by its number of buckets, not of records: three days of minutes is refused, of hours not
    days = {"since": "2025-01-01T00:00:00Z", "until": "2025-01-04T00:00:00Z"}
    refused = client.get("/inspections/stats", params={**days, "bucket": "minute"})
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_request"
    assert "2880 minute buckets" in refused.json()["detail"]
    assert client.get("/inspections/stats", params={**days, "bucket": "hour"}).json()["buckets"] == []
    # until alone: the 24 hours before it (it was the 24 hours before now, empty for any until in the past)
    until = client.get("/inspections/stats", params={"until": "2025-01-04T00:00:00Z"}).json()
    assert until["since"] == "2025-01-03T00:00:00+00:00"


def test_stored_pictures_and_their_urls(client):
    picture = score(client, BAD, "/score/image", params={"part_id": "PIC"}).content
    flushed(client)
    item = client.get("/inspections", params={"part_id": "PIC"}).json()["items"][0]
    photo = client.get(item["image_url"])
    assert photo.status_code == 200 and photo.content == BAD and photo.headers["content-type"] == "image/png"
    assert photo.headers["x-content-type-options"] == "nosniff"  # the uploaded bytes never read as a page
    heat = Image.open(io.BytesIO(client.get(item["heatmap_url"]).content))
    assert heat.mode == "P" and heat.size == (128, 128)
    overlay = np.asarray(Image.open(io.BytesIO(client.get(item["overlay_url"]).content)), np.int16)
    answered = np.asarray(Image.open(io.BytesIO(picture)), np.int16)
    assert overlay.shape == answered.shape and np.abs(overlay - answered).max() <= 2  # drawn as /score/image
    score(client, GOOD, params={"part_id": "NOPIC"})
    flushed(client)
    nopic = client.get("/inspections", params={"part_id": "NOPIC"}).json()["items"][0]["id"]
    r = client.get(f"/inspections/{nopic}/overlay.png")
    assert r.status_code == 404 and r.json()["error"] == "image_not_kept"
    store = client.app.state.service.records
    store.apply_retention(max_age_days=None, max_bytes=1)  # everything over budget
    r = client.get(item["image_url"])
    assert r.status_code == 410 and r.json()["error"] == "image_expired"
    assert client.get(f"/inspections/{item['id']}").json()["files_state"] == "removed"


def test_the_page_is_shown_a_sixteen_bit_photo_as_its_model_reads_it(model_dir, tmp_path):
    """A 12-bit camera's photo in a 16-bit PNG shows near black as uploaded (4095 of 65535): /display draws it with
    the model's white, as the overlay is; /image keeps the uploaded bytes; a photo a browser shows as the model
    reads it (8-bit PNG) is sent as uploaded, one it does not show (TIFF) drawn."""
    import shutil

    from anomaly_service.images import ImageLimits, load_image
    from conftest import write_manifest

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    manifest["preprocessing"]["bit_depth"] = 12  # fitted on 12-bit photos
    write_manifest(models / "part", manifest)
    grey = np.asarray(Image.open(io.BytesIO(GOOD)).convert("L"), np.float64)
    buf = io.BytesIO()
    Image.fromarray(np.round(grey / 255 * 4095).astype(np.uint16)).save(buf, format="PNG")
    mono = buf.getvalue()
    tiff = png_bytes(np.asarray(Image.open(io.BytesIO(GOOD))), format="TIFF")  # no browser but Safari shows one
    with make_client(models, tmp_path, keep_images="all", api_key="s3cret") as c:
        key = {"X-API-Key": "s3cret"}
        for photo, part in ((mono, "MONO"), (GOOD, "RGB"), (tiff, "TIFF")):
            score(c, photo, params={"part_id": part}, headers=key)
        flushed(c)
        items = {i["part_id"]: i for i in c.get("/inspections", headers=key).json()["items"]}
        token = items["MONO"]["image_url"].split("?token=")[1]
        assert c.get(items["MONO"]["image_url"]).content == mono  # the download is the upload
        shown = c.get(f"/inspections/{items['MONO']['id']}/display", params={"token": token})
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
        assert shown.headers["x-content-type-options"] == "nosniff"
        pixels = np.asarray(Image.open(io.BytesIO(shown.content)).convert("RGB"))
        np.testing.assert_array_equal(pixels, load_image(mono, ImageLimits(bit_depth=12)))
        assert pixels.max() > 150 > 16 >= load_image(mono).max()  # read against 16 bits: a sixteenth of white
        same = c.get(f"/inspections/{items['RGB']['id']}/display", headers=key)
        assert same.content == GOOD and same.headers["content-type"] == "image/png"
        assert c.get(f"/inspections/{items['RGB']['id']}/display").status_code == 401  # neither key nor token
        drawn = c.get(f"/inspections/{items['TIFF']['id']}/display", headers=key)
        assert drawn.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(drawn.content))), load_image(tiff))


def test_the_page_is_shown_a_sixteen_bit_colour_photo_as_its_model_reads_it(model_dir, tmp_path):
    """A colour camera's 12-bit values in a 16-bit PNG show near black in a browser as in Pillow's reading: for a
    model that keeps a colour depth, /display, the live view's `photo` and /thumbnail draw it with that white, and
    the kept thumbnail is named by both depths (one drawn for another colour depth is not reused)."""
    import shutil

    from anomaly_service.images import ImageLimits, load_image
    from anomaly_service.records.files import DERIVED_MARK
    from conftest import write_manifest
    from test_bit_depth import colour_bits, colour_png16

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    manifest["preprocessing"]["colour_bit_depth"] = 12  # fitted on 12-bit colour photos
    write_manifest(models / "part", manifest)
    photo = colour_png16(colour_bits(np.asarray(Image.open(io.BytesIO(GOOD))), 12))
    reads = load_image(photo, ImageLimits(colour_bit_depth=12))
    assert reads.mean() > 60 > 16 > load_image(photo).mean()  # as a browser and Pillow read it: near black
    with make_client(models, tmp_path, keep_images="all", retention_min_free_bytes=0) as c:
        live = score(c, photo, params={"part_id": "RGB12", "photo": "true"}).json()["photo"]
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(live["data"]))).convert("RGB"))
        np.testing.assert_array_equal(shown, reads)
        flushed(c)
        item = c.get("/inspections", params={"part_id": "RGB12"}).json()["items"][0]
        drawn = c.get(f"/inspections/{item['id']}/display")
        assert drawn.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB")), reads)
        thumb = c.get(f"/inspections/{item['id']}/thumbnail")
        assert thumb.status_code == 200, thumb.text
        assert abs(np.asarray(Image.open(io.BytesIO(thumb.content)), np.float64).mean() - reads.mean()) < 3
        kept = [p.name for p in c.app.state.service.records.files.root.rglob(f"*{DERIVED_MARK}*")]
        assert len(kept) == 1 and kept[0].endswith("-16bit-colour12bit-trns-srgb.jpg")


def test_a_photo_drawn_for_another_colour_depth_has_another_etag(model_dir, tmp_path):
    """/display's ETag names how the model reads the photo, so a browser's copy drawn for one reading is never kept
    for another: it named the grey depth but not the colour depth, so one stored 16-bit colour photo drawn by a
    model of 12-bit colour (bright) and by one of 16 (dark) had one tag, and a browser holding the first was told
    304 for the second (as after a re-fit to another colour depth)."""
    import shutil

    from conftest import write_manifest
    from test_bit_depth import colour_bits, colour_png16

    models = tmp_path / "models"
    for name, bits in (("twelve", 12), ("sixteen", 16)):
        shutil.copytree(model_dir / "part", models / name)
        manifest = json.loads((models / name / "manifest.json").read_text())
        manifest["preprocessing"]["colour_bit_depth"] = bits
        write_manifest(models / name, manifest)
    photo = colour_png16(colour_bits(np.asarray(Image.open(io.BytesIO(GOOD))), 12))
    with make_client(models, tmp_path, keep_images="all", retention_min_free_bytes=0) as c:
        for name in ("twelve", "sixteen"):
            score(c, photo, params={"model": name, "part_id": name})
        flushed(c)
        drawn = {}
        for item in c.get("/inspections").json()["items"]:
            r = c.get(f"/inspections/{item['id']}/display")
            assert r.status_code == 200, r.text
            drawn[item["part_id"]] = (r.headers["etag"], np.asarray(Image.open(io.BytesIO(r.content))).mean())
        again = c.get(f"/inspections/{item['id']}/display", headers={"If-None-Match": drawn[item["part_id"]][0]})
        assert again.status_code == 304  # the same reading: the browser's copy stands
    assert drawn["twelve"][1] > 4 * drawn["sixteen"][1]  # two pictures
    assert drawn["twelve"][0] != drawn["sixteen"][0]


def _turned(fmt: str, orientation: int, xmp: bool = False) -> bytes:
    """A photo of the good part stored as ``fmt`` and turned by ``orientation``, in its EXIF block or in XMP."""
    image = Image.open(io.BytesIO(GOOD)).crop((0, 0, 100, 128))  # not square: a quarter turn shows in the size
    buf = io.BytesIO()
    if xmp:
        image.save(buf, format=fmt, xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                   b'1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
                   b'tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % orientation)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


def test_the_page_is_shown_a_turned_photo_in_the_frame_of_its_regions(model_dir, tmp_path):
    """The model reads a photo turned by its EXIF orientation, and its regions and heatmap are in that frame. A
    browser turns a JPEG by its EXIF block too, so that one is sent as uploaded; but no browser reads an XMP
    orientation (Pillow does) and Chromium turns no WebP: those were sent as uploaded and shown unturned, the
    regions boxed beside the part. /display draws them as the model reads them."""
    from anomaly_service.images import load_image

    photos = {"JPEG": _turned("JPEG", 6), "WEBP": _turned("WEBP", 6), "XMP": _turned("JPEG", 8, xmp=True)}
    with make_client(model_dir, tmp_path, keep_images="all") as c:
        for part, photo in photos.items():
            body = score(c, photo, params={"part_id": part}).json()
            assert (body["image_width"], body["image_height"]) == (128, 100)  # the model reads each one turned
        flushed(c)
        items = {i["part_id"]: i for i in c.get("/inspections").json()["items"]}
        shown = {part: c.get(f"/inspections/{items[part]['id']}/display") for part in photos}
    assert shown["JPEG"].content == photos["JPEG"]  # a browser turns it as the model does
    for part in ("WEBP", "XMP"):
        assert shown[part].headers["content-type"] == "image/png", part
        drawn = Image.open(io.BytesIO(shown[part].content))
        assert "exif" not in drawn.info and drawn.size == (128, 100)
        np.testing.assert_array_equal(np.asarray(drawn.convert("RGB")), load_image(photos[part]))


def test_restart_keeps_every_record(model_dir, tmp_path):
    with make_client(model_dir, tmp_path) as c:
        for i in range(5):
            score(c, GOOD if i % 2 else BAD, params={"line": "R"})
        # no flush: stopping the service (the lifespan's end, as on SIGTERM) writes what is buffered
    with make_client(model_dir, tmp_path) as c:
        assert len(c.get("/inspections", params={"line": "R"}).json()["items"]) == 5
        score(c, GOOD, params={"line": "R"})
    with make_client(model_dir, tmp_path) as c:
        assert len(c.get("/inspections", params={"line": "R"}).json()["items"]) == 6


def test_api_key_guards_the_records(model_dir, tmp_path):
    with make_client(model_dir, tmp_path, api_key="s3cret") as c:
        for path in ("/inspections", "/inspections/stats", "/inspections/x", "/inspections/x/image"):
            assert c.get(path).status_code == 401
        assert c.get("/inspections", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_picture_urls_open_with_their_view_token_only(model_dir, tmp_path):
    """A dashboard's <img> or link cannot send X-API-Key: the URLs an inspection lists carry its own view token,
    which opens that inspection's pictures and nothing else."""
    key = {"X-API-Key": "s3cret"}
    with make_client(model_dir, tmp_path, api_key="s3cret") as c:
        assert c.post("/score", files={"file": ("bad.png", BAD)}, headers=key).status_code == 200
        assert c.post("/score", files={"file": ("bad2.png", png_bytes(add_defect(textured_part(
            np.random.default_rng(8)), 40, 40)[0]))}, headers=key).status_code == 200
        flushed(c)
        first, second = c.get("/inspections", headers=key).json()["items"][:2]
        for url in (first["image_url"], first["heatmap_url"], first["overlay_url"]):
            assert "?token=" in url and c.get(url).status_code == 200  # no key needed
        path, token = first["overlay_url"].split("?token=")
        assert c.get(path).status_code == 401
        assert c.get(f"{path}?token=wrong").status_code == 401
        other = second["overlay_url"].split("?token=")[0]
        assert c.get(f"{other}?token={token}").status_code == 401  # one inspection's token opens only its own
        assert c.get(f"/inspections/{first['id']}?token={token}").status_code == 401  # pictures only, not the record
        assert c.get(f"/inspections/no-such-id/image?token={token}").status_code == 401  # ids cannot be probed


def test_recording_off(model_dir, tmp_path):
    with make_client(model_dir, tmp_path, record=False) as c:
        score(c)
        assert c.app.state.service.records is None
        assert c.get("/inspections").json()["error"] == "recording_off"
    assert not (tmp_path / "data").exists()


def test_recording_that_cannot_start_is_counted_and_said(model_dir, tmp_path):
    """Asked for, recording that cannot start (here --data-dir is a file) leaves scoring on, and every part it
    loses is counted as a drop, so the drop alert fires; the inspection routes and /readyz say why."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with make_client(model_dir, tmp_path, data_dir=blocker) as c:
        score(c)
        score(c)
        assert metric(c.get("/metrics").text, 'anomaly_records_dropped_total{reason="unavailable"}') == 2
        r = c.get("/inspections")
        assert r.status_code == 503 and r.json()["error"] == "records_unavailable"
        assert "not-a-dir" in r.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["recording"] == "unavailable"
    with make_client(model_dir, tmp_path, record=False) as c:  # off by choice: nothing lost, nothing counted
        score(c)
        assert metric(c.get("/metrics").text, 'anomaly_records_dropped_total{reason="unavailable"}') == 0
        assert c.get("/readyz").json()["recording"] == "off"


def test_a_data_volume_full_at_start_up_is_retried_not_recording_lost_until_a_restart(model_dir, tmp_path,
                                                                                       monkeypatch):
    """A first start with --data-dir on a volume already full: the lock file's write failed and recording was
    "unavailable" until a restart, though the same full disk later is retried (docs/service.md). It is retried
    now: the part scored while the disk is full is recorded once space is freed, with no restart."""
    from anomaly_service.records import recorder as recorder_module
    from conftest import fill, mounted

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    with mounted(tmp_path / "vol", "2m") as vol:
        filler = fill(vol)
        with make_client(model_dir, tmp_path, data_dir=vol / "data") as c:
            # nor "on": the database could not be made (readyz said "on" until a part came and was refused)
            assert c.get("/readyz").json()["recording"] == "retrying"
            part = score(c).json()["inspection_id"]
            assert part is not None
            time.sleep(0.5)  # the writer tries, and is refused
            assert c.get(f"/inspections/{part}").status_code != 200
            filler.unlink()
            flushed(c)
            assert c.get(f"/inspections/{part}").status_code == 200
            assert c.get("/readyz").json()["recording"] == "on"
            dropped = metric(c.get("/metrics").text, 'anomaly_records_dropped_total{reason="unavailable"}')
            assert not dropped


def test_a_data_directory_a_full_volume_did_not_take_at_start_up_is_held_once_made(model_dir, tmp_path,
                                                                                   monkeypatch):
    """A volume out of inodes refuses the data directory itself at start-up, so the lock that says a service
    records there was never taken, and nothing took it once the writer made the directory: ``anomaly db restore``
    then replaced the database under the running service. The writer takes the lock when it first gets through."""
    from click.testing import CliRunner

    from anomaly_service.cli import app as cli
    from anomaly_service.records import recorder as recorder_module
    from conftest import mounted

    monkeypatch.setattr(recorder_module, "RETRY_BACKOFF_S", (0.05, 0.1))
    with mounted(tmp_path / "vol", "2m,nr_inodes=64") as vol:
        fillers = []
        with contextlib.suppress(OSError):  # every inode taken: no directory or file can be made
            while True:
                fillers.append(vol / f"f{len(fillers)}")
                fillers[-1].touch()
        data = vol / "data"
        with make_client(model_dir, tmp_path, data_dir=data) as c:
            assert not data.exists() and c.get("/readyz").json()["recording"] == "retrying"
            part = score(c).json()["inspection_id"]
            for f in fillers:
                f.unlink(missing_ok=True)
            flushed(c)
            assert c.get(f"/inspections/{part}").status_code == 200
            copy = tmp_path / "copy.db"
            taken = CliRunner().invoke(cli, ["db", "backup", "--data-dir", str(data), "--out", str(copy)])
            assert taken.exit_code == 0, taken.output
            refused = CliRunner().invoke(cli, ["db", "restore", "--from", str(copy), "--data-dir", str(data)])
            assert refused.exit_code != 0 and "stop the service first" in refused.output, refused.output


@pytest.mark.parametrize("url", ["postgresql+psycopg2://postgres@127.0.0.1:1/x",  # a driver not installed
                                 "mysql://u@127.0.0.1:1/x", "bogus", "postgres+psycopg://u@127.0.0.1:1/x",
                                 "postgresql+psycopg://u:p@ss:w0rd9@127.0.0.1:1/x"])  # an '@' not written %40
def test_a_database_url_the_service_cannot_use_leaves_scoring_on(model_dir, tmp_path, url, caplog):
    """A --database-url whose driver is not installed or whose scheme is wrong failed the service's start-up (a
    ModuleNotFoundError or SQLAlchemy's ArgumentError): every part unscored for a records setting. A password
    holding an '@' before a ':' was read as a host and a port: the answer and the log said "invalid literal for
    int() with base 10: 'w0rd9@127.0.0.1:1'", the password's tail, and not which setting was wrong."""
    with make_client(model_dir, tmp_path, database_url=url) as c:
        assert score(c).status_code == 200
        assert c.get("/readyz").json()["recording"] == "unavailable"
        answer = c.get("/inspections")
        assert answer.json()["error"] == "records_unavailable"
    if "w0rd9" in url:
        assert "database URL" in answer.json()["detail"], answer.json()
        assert "w0rd9" not in answer.text and "w0rd9" not in caplog.text, answer.text


def test_a_database_that_refuses_the_url_makes_recording_unavailable(model_dir, tmp_path, postgres_url):
    """A login PostgreSQL refuses or a database that does not exist is the URL's fault, not an outage: /readyz
    said recording was on while the writer retried it for ten minutes."""
    base = postgres_url.rsplit("/", 1)[0]
    for url in (base + "/no_such_database", base.replace("postgres@", "no_such_role@") + "/postgres"):
        with make_client(model_dir, tmp_path, database_url=url) as c:
            assert score(c).status_code == 200
            assert c.get("/readyz").json()["recording"] == "unavailable"
            assert "does not exist" in c.get("/inspections").json()["detail"]


def test_a_database_from_a_newer_release_makes_recording_unavailable_not_on(model_dir, tmp_path):
    """No retry can write into another release's schema: /readyz says unavailable (it said "on" while every record
    was dropped), the records routes say why, and the lost parts are counted as such."""
    from sqlalchemy import text

    from anomaly_service.records import RecordStore

    data = tmp_path / "newer"
    store = RecordStore.open(None, data)
    store.upgrade()
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with make_client(model_dir, tmp_path, data_dir=data) as c:
        score(c)
        assert c.get("/readyz").json()["recording"] == "unavailable"
        r = c.get("/inspections")
        assert r.status_code == 503 and "9999" in r.json()["detail"]
        assert metric(c.get("/metrics").text, 'anomaly_records_dropped_total{reason="unavailable"}') == 1


def test_a_full_data_volume_keeps_the_records_without_their_pictures(model_dir, tmp_path):
    """The service's floor of free space (here above what the volume has): the part is recorded, its pictures are
    not, and the metric says so."""
    import shutil

    floor = shutil.disk_usage(tmp_path).free + 2**30
    with make_client(model_dir, tmp_path, keep_images="all", retention_min_free_bytes=floor) as c:
        score(c)
        flushed(c)
        [record] = c.get("/inspections").json()["items"]
        assert record["files_state"] == "failed"
        assert metric(c.get("/metrics").text, 'anomaly_record_files_not_stored_total{reason="low_disk"}') == 1


def test_database_outage_never_fails_scoring_and_shows_in_metrics(model_dir, tmp_path, postgres_url):
    def allow(on: bool) -> None:
        allow_connections(postgres_url, on)

    with make_client(model_dir, tmp_path, database_url=postgres_url, record_buffer_size=3) as c:
        score(c, params={"line": "before"})
        flushed(c)
        assert c.get("/readyz").json()["recording"] == "on"
        allow(False)
        try:
            for _ in range(8):
                score(c, params={"line": "during"})  # 200 every time
            # it said "on" while nothing reached the database: the truth is that the records wait (still ready)
            deadline = time.time() + 10
            while c.get("/readyz").json()["recording"] != "retrying" and time.time() < deadline:
                time.sleep(0.1)
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["recording"] == "retrying"
            metrics = c.get("/metrics").text
            dropped = float(metrics.split('anomaly_records_dropped_total{reason="buffer_full"} ')[1].split()[0])
            assert dropped >= 1  # the buffer (3) and the batch being retried hold the rest
            assert "anomaly_record_buffer_depth" in metrics
            r = c.get("/inspections")
            assert r.status_code == 503 and r.json()["error"] == "records_unavailable"
        finally:
            allow(True)
        flushed(c)
        during = len(c.get("/inspections", params={"line": "during"}).json()["items"])
        assert during == 8 - dropped  # nothing lost that was not counted
        metrics = c.get("/metrics").text
        assert f"anomaly_records_written_total {1 + during:.1f}" in metrics
        assert c.get("/readyz").json()["recording"] == "on"  # back without a restart


def test_sixteen_concurrent_clients_lose_no_record(server):
    """Through the real HTTP server: every successful answer has its record."""
    url, _ = server
    tag = f"conc-{time.time_ns()}"

    async def client(i: int, c: httpx.AsyncClient) -> int:
        ok = 0
        for k in range(4):
            r = await c.post(f"{url}/score", params={"line": tag, "part_id": f"{i}-{k}"},
                             files={"file": ("x.png", BAD if (i + k) % 3 == 0 else GOOD, "image/png")})
            ok += r.status_code == 200
        return ok

    async def run() -> int:
        async with httpx.AsyncClient(timeout=120) as c:
            return sum(await asyncio.gather(*(client(i, c) for i in range(16))))

    answered = asyncio.run(run())
    assert answered > 0
    deadline, recorded = time.time() + 20, -1
    while time.time() < deadline:
        recorded = len(httpx.get(f"{url}/inspections", params={"line": tag, "limit": 500}).json()["items"])
        if recorded >= answered:
            break
        time.sleep(0.2)
    assert recorded == answered
    metrics = httpx.get(f"{url}/metrics").text
    assert 'anomaly_records_dropped_total{reason="buffer_full"} 0.0' in metrics


def test_openapi_documents_the_record_shapes(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("InspectionOut", "ReviewIn", "ReviewOut", "StatsBucketOut", "InspectionPage"):
        props = schemas[name]["properties"]
        for field, prop in props.items():
            documented = "examples" in prop or "description" in prop or "$ref" in prop or "items" in prop
            assert documented, (name, field)
    assert schemas["InspectionOut"].get("examples") and schemas["ReviewIn"].get("examples")
    params = {p["name"] for p in spec["paths"]["/score"]["post"]["parameters"]}
    assert {"part_id", "line", "station", "meta"} <= params
    body = spec["paths"]["/score"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    assert {"part_id", "meta"} <= set(schemas[body.rsplit("/", 1)[1]]["properties"])


def test_an_unusable_data_dir_never_stops_scoring(model_dir, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with make_client(model_dir, tmp_path, data_dir=blocker) as c:
        score(c)
        assert c.app.state.service.records is None
    assert "WITHOUT records" in caplog.text


def test_stored_overlays_are_drawn_one_at_a_time_beside_scoring(client, monkeypatch):
    """An overlay link needs no API key and each request draws from the full-size photo: eight at once took
    scoring's render threads and memory outside its budget (an adversarial pass: scoring p99 12 s). They are drawn
    on a thread of their own, a few waiting, and the rest refused at once."""
    import threading

    from anomaly_service.api import lifecycle
    from anomaly_service.api.routes import inspections

    score(client, BAD, params={"part_id": "DRAW"})
    flushed(client)
    url = client.get("/inspections", params={"part_id": "DRAW"}).json()["items"][0]["overlay_url"]
    entered, release = threading.Semaphore(0), threading.Event()
    real = inspections.overlay_from_files

    def slow_overlay(*args):
        entered.release()
        release.wait(20)
        return real(*args)

    monkeypatch.setattr(inspections, "overlay_from_files", slow_overlay)
    answers = _slots_taken(client, [url] * lifecycle.PICTURE_SLOTS, url, entered, release)
    assert answers == [200] * lifecycle.PICTURE_SLOTS


def _slots_taken(client, urls: list[str], extra_url: str, entered, release) -> list[int]:
    """Request ``urls`` at once while the drawing is held (``entered`` is released as one starts, ``release``
    lets it go): one draws, the others wait their turn; ``extra_url`` meanwhile is refused with 503 overloaded,
    and scoring's own threads are free. Returns the held requests' status codes."""
    import threading

    answers: list[int] = []
    waiting = [threading.Thread(target=lambda u=u: answers.append(client.get(u).status_code)) for u in urls]
    for t in waiting:
        t.start()
    try:
        assert entered.acquire(timeout=20)
        time.sleep(0.3)
        extra = client.get(extra_url)
        scored = score(client, GOOD)
    finally:
        release.set()
        for t in waiting:
            t.join(30)
    assert extra.status_code == 503 and extra.json()["error"] == "overloaded" and extra.headers["retry-after"]
    assert scored.status_code == 200
    return answers


def _big_mono(side: tuple[int, int] = (600, 400)) -> bytes:
    """A 12-bit camera's photo in a 16-bit PNG, larger than a thumbnail: near black as a browser draws the file."""
    grey = np.asarray(Image.open(io.BytesIO(GOOD)).convert("L").resize(side, Image.BICUBIC), np.float64)
    buf = io.BytesIO()
    Image.fromarray(np.round(grey / 255 * 4095).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_list_thumbnail_is_small_drawn_as_the_model_reads_it_and_goes_with_its_photo(model_dir, tmp_path):
    """The page's lists downloaded every recorded photo at full size (5-20 MP from a line camera) for a 56 px
    picture. /thumbnail is a JPEG of at most 256 px drawn as the model reads the photo (a 12-bit photo in a 16-bit
    file is not black), under the same token and key rules and cache headers as the other pictures, drawn once
    and kept beside the photo; retention removes it with the photo, and a photo gone answers as the others do."""
    import shutil

    from anomaly_service.images import ImageLimits, load_image
    from anomaly_service.records.files import DERIVED_MARK
    from conftest import write_manifest

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    manifest["preprocessing"]["bit_depth"] = 12  # fitted on 12-bit photos
    write_manifest(models / "part", manifest)
    mono = _big_mono()
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(GOOD)).resize((1200, 800)).save(jpeg, format="JPEG", quality=95)
    key = {"X-API-Key": "s3cret"}
    with make_client(models, tmp_path, keep_images="all", api_key="s3cret", retention_min_free_bytes=0) as c:
        for photo, part in ((mono, "MONO"), (jpeg.getvalue(), "JPEG"), (GOOD, "SMALL")):
            score(c, photo, params={"part_id": part}, headers=key)
        flushed(c)
        items = {i["part_id"]: i for i in c.get("/inspections", headers=key).json()["items"]}
        thumb = {}
        for part, item in items.items():
            token = item["image_url"].split("?token=")[1]
            r = c.get(f"/inspections/{item['id']}/thumbnail", params={"token": token})
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
            assert r.headers["cache-control"] == "private, no-cache" and r.headers["etag"]  # drawn: revalidated
            assert r.headers["x-content-type-options"] == "nosniff"
            thumb[part] = Image.open(io.BytesIO(r.content))
            assert thumb[part].format == "JPEG" and len(r.content) < 40_000
        assert thumb["MONO"].size == (256, 171) and thumb["JPEG"].size == (256, 171)
        assert thumb["SMALL"].size == (128, 128)  # never enlarged
        reads = load_image(mono, ImageLimits(bit_depth=12))
        shown = np.asarray(thumb["MONO"].convert("L"), np.float64)
        assert reads.mean() > 60 and abs(shown.mean() - reads.mean()) < 3  # as the model reads it: not black
        want = np.asarray(Image.fromarray(load_image(jpeg.getvalue())).resize((256, 171), Image.BICUBIC), np.float64)
        assert np.abs(np.asarray(thumb["JPEG"], np.float64) - want).mean() < 6  # the photo, smaller

        # token and key rules, as for the other pictures
        mono_id, token = items["MONO"]["id"], items["MONO"]["image_url"].split("?token=")[1]
        other = items["JPEG"]["id"]
        assert c.get(f"/inspections/{mono_id}/thumbnail").status_code == 401
        assert c.get(f"/inspections/{mono_id}/thumbnail", params={"token": "wrong"}).status_code == 401
        assert c.get(f"/inspections/{other}/thumbnail", params={"token": token}).status_code == 401
        assert c.get("/inspections/no-such-id/thumbnail", params={"token": token}).status_code == 401
        assert c.get("/inspections/no-such-id/thumbnail", headers=key).status_code == 404
        assert c.get(f"/inspections/{mono_id}/thumbnail", headers=key).content == \
            c.get(f"/inspections/{mono_id}/thumbnail", params={"token": token}).content

        # drawn once and kept beside its photo; a photo removed outside the service takes its thumbnail's answer
        files = c.app.state.service.records.files
        store = c.app.state.service.records
        kept = sorted(p.name for p in files.root.rglob(f"*{DERIVED_MARK}*"))
        assert len(kept) == 3 and all(n.endswith("-12bit-trns-srgb.jpg") for n in kept)
        jpeg_row = store.get(other)
        files.path(jpeg_row.image_file).unlink()
        r = c.get(f"/inspections/{other}/thumbnail", headers=key)
        assert r.status_code == 410 and r.json()["error"] == "image_missing"
        # retention: every photo over the budget goes, and each thumbnail with it; the record says so
        store.apply_retention(max_age_days=None, max_bytes=1)
        assert list(files.root.rglob(f"*{DERIVED_MARK}*")) == []
        r = c.get(f"/inspections/{mono_id}/thumbnail", params={"token": token})
        assert r.status_code == 410 and r.json()["error"] == "image_expired"


def test_a_keyed_photos_thumbnail_is_drawn_as_its_model_reads_the_key(model_dir, tmp_path):
    """A PNG whose transparency key names a band reads that band black for a model that reads keys as transparent
    (every fit since it is recorded), and as the key's colour for a model saved before (docs/decisions.md, session
    70). Each draws the thumbnail so, kept under a name of its own: one drawn with the key's colour (the older
    model's, as every thumbnail kept before) is never handed to the newer model, nor the other way round, and the
    two readings give two ETags."""
    import shutil

    from anomaly_service.records.files import DERIVED_MARK
    from conftest import write_manifest

    photo = textured_part(np.random.default_rng(8))
    photo[photo.min(axis=2) == 255] = 254
    photo[:40] = 255  # the key: white, which no other pixel is
    keyed = png_bytes(photo, transparency=(255, 255, 255))
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    shutil.copytree(model_dir / "part", models / "older")
    manifest = json.loads((models / "older" / "manifest.json").read_text())
    manifest["preprocessing"].pop("transparency_key", None)
    write_manifest(models / "older", manifest)
    with make_client(models, tmp_path, keep_images="all", retention_min_free_bytes=0) as c:
        for model in ("part", "older"):
            score(c, keyed, params={"model": model, "part_id": model})
        flushed(c)
        shown, tags = {}, {}
        for item in c.get("/inspections").json()["items"]:
            r = c.get(f"/inspections/{item['id']}/thumbnail")
            assert r.status_code == 200, r.text
            shown[item["part_id"]] = np.asarray(Image.open(io.BytesIO(r.content)).convert("L"), np.float64)
            tags[item["part_id"]] = r.headers["etag"]
        kept = sorted(p.name.split(DERIVED_MARK)[1] for p in c.app.state.service.records.files.root.rglob(
            f"*{DERIVED_MARK}*"))
    assert shown["part"][:30].mean() < 10 and shown["older"][:30].mean() > 245  # black, or the key's white
    assert kept == ["thumb256-16bit-srgb.jpg", "thumb256-16bit-trns-srgb.jpg"] and tags["part"] != tags["older"]


def test_thumbnails_are_drawn_on_the_picture_thread_beside_scoring(client, monkeypatch):
    """A thumbnail not drawn yet decodes the full-size photo: like an overlay, one at a time with a few waiting on
    the picture thread, the rest refused at once with 503 overloaded, and scoring goes on."""
    import threading

    from anomaly_service.api import lifecycle
    from anomaly_service.api.routes import inspections

    ids = []
    for i in range(lifecycle.PICTURE_SLOTS + 1):
        score(client, png_bytes(add_defect(textured_part(np.random.default_rng(100 + i)), 64, 64, radius=12)[0]),
              params={"part_id": f"THUMB-{i}"})
    flushed(client)
    for i in range(lifecycle.PICTURE_SLOTS + 1):
        ids.append(client.get("/inspections", params={"part_id": f"THUMB-{i}"}).json()["items"][0]["id"])
    entered, release = threading.Semaphore(0), threading.Event()
    real = inspections.thumbnail_jpeg
    threads: list[str] = []

    def slow_thumbnail(*args):
        threads.append(threading.current_thread().name)
        entered.release()
        release.wait(20)
        return real(*args)

    monkeypatch.setattr(inspections, "thumbnail_jpeg", slow_thumbnail)
    answers = _slots_taken(client, [f"/inspections/{i}/thumbnail" for i in ids[:-1]],
                           f"/inspections/{ids[-1]}/thumbnail", entered, release)
    assert answers == [200] * lifecycle.PICTURE_SLOTS and set(threads) == {"picture_0"}
    r = client.get(f"/inspections/{ids[0]}/thumbnail")  # kept: no drawing, no slot
    assert r.status_code == 200 and len(threads) == lifecycle.PICTURE_SLOTS
    score(client, GOOD, params={"part_id": "THUMB-NOT-KEPT"})  # keep_images=anomalies
    flushed(client)
    nopic = client.get("/inspections", params={"part_id": "THUMB-NOT-KEPT"}).json()["items"][0]["id"]
    r = client.get(f"/inspections/{nopic}/thumbnail")
    assert r.status_code == 404 and r.json()["error"] == "image_not_kept"


def test_pictures_drawn_as_the_model_reads_them_are_revalidated_not_cached_for_good(model_dir, tmp_path):
    """/display, /thumbnail and /overlay.png are drawn as the served model reads the photo; they were sent as
    immutable for a year, so after a re-fit to another bit depth a browser kept the old drawing. Each now carries an
    ETag of what it is drawn from: the same tag gets a 304 (no drawing), and the re-fit changes it. /image and
    /heatmap.png are the stored files themselves and stay immutable."""
    import shutil

    from conftest import write_manifest

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    manifest["preprocessing"]["bit_depth"] = 12
    write_manifest(models / "part", manifest)
    drawn = ("display", "thumbnail", "overlay.png")
    with make_client(models, tmp_path, keep_images="all") as c:
        score(c, _big_mono((200, 150)), params={"part_id": "MONO"})
        flushed(c)
        item = c.get("/inspections", params={"part_id": "MONO"}).json()["items"][0]
        base = f"/inspections/{item['id']}"
        first = {}
        for what in drawn:
            r = c.get(f"{base}/{what}")
            assert r.status_code == 200 and r.headers["cache-control"] == "private, no-cache", what
            first[what] = r
            again = c.get(f"{base}/{what}", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == r.headers["etag"]
        assert len({r.headers["etag"] for r in first.values()}) == 3
        for what in ("image", "heatmap.png"):
            assert "immutable" in c.get(f"{base}/{what}").headers["cache-control"]
        assert c.post("/models/part/reload").status_code == 200  # the same model again: the same pictures
        for what in drawn:
            assert c.get(f"{base}/{what}", headers={"If-None-Match": first[what].headers["etag"]}).status_code == 304

        manifest["preprocessing"]["bit_depth"] = 16  # re-fitted to read all 16 bits: the photo is near black
        write_manifest(models / "part", manifest)
        assert c.post("/models/part/reload").status_code == 200
        for what in drawn:
            r = c.get(f"{base}/{what}", headers={"If-None-Match": first[what].headers["etag"]})
            assert r.status_code == 200 and r.headers["etag"] != first[what].headers["etag"], what
            assert r.content != first[what].content
        dark = np.asarray(Image.open(io.BytesIO(c.get(f"{base}/thumbnail").content)).convert("L"), np.float64)
        assert dark.mean() < 20


def test_a_record_keeps_the_warnings_its_score_was_answered_with(client):
    """A multi-page TIFF is scored on one page and the answer says which; the record said nothing of it, so a part
    looked up later (History, an export) lost the reason its score may not mean what the threshold says."""
    stack = io.BytesIO()
    Image.open(io.BytesIO(GOOD)).save(stack, format="TIFF", save_all=True,
                                      append_images=[Image.open(io.BytesIO(BAD))])
    answer = score(client, stack.getvalue(), params={"part_id": "STACK"}).json()
    assert any("2 frames" in w for w in answer["warnings"])
    score(client, GOOD, params={"part_id": "PLAIN"})
    flushed(client)
    stacked = client.get("/inspections", params={"part_id": "STACK"}).json()["items"][0]
    assert stacked["warnings"] == answer["warnings"]
    assert client.get(f"/inspections/{stacked['id']}").json()["warnings"] == answer["warnings"]
    assert client.get("/inspections", params={"part_id": "PLAIN"}).json()["items"][0]["warnings"] == []


def test_a_record_keeps_the_parts_place_on_the_map_the_answer_gave(client):
    """The page draws a reviewed part on the image map from its record, which kept no place: every record now
    keeps the answer's ``embedding``, a photo's and each of a batch's, and GET /inspections and /inspections/{id}
    give it as the answer did, in the coordinates of the map of the record's version."""
    one = score(client, BAD, params={"part_id": "MAP-1"}).json()
    batch = client.post("/score/batch", params={"part_id": "MAP-B"},
                        files=[("files", ("a.png", GOOD, "image/png")), ("files", ("b.png", BAD, "image/png"))])
    assert batch.status_code == 200, batch.text
    flushed(client)
    answers = [one, *(item["result"] for item in batch.json()["results"])]
    assert all(a["embedding"] is not None for a in answers)  # the session model keeps its map
    for answer in answers:
        got = client.get(f"/inspections/{answer['inspection_id']}").json()
        assert got["embedding"] == answer["embedding"] and got["model_version"] == answer["model_version"]
    listed = {i["id"]: i for i in client.get("/inspections", params={"limit": 500}).json()["items"]}
    assert [listed[a["inspection_id"]]["embedding"] for a in answers] == [a["embedding"] for a in answers]
    served = client.get("/models/part/embedding").json()
    assert served["model_version"] == one["model_version"]  # drawn on this map, as the page draws the answer


def test_a_record_says_how_its_part_was_scored_as_get_models_says_it(model_dir, tmp_path):
    """Under --runtime torch a score moves with the threads of its pass and differs from ONNX Runtime's; the record
    did not say which scored it, so an audit of a part that passed then and fails on a re-score could not tell the
    machine from the model. Every record, one photo's or a batch's, says it as GET /models does (runtime,
    knn_search, device), with the intra-op threads of its pass: every thread for a pass that runs alone, a share
    for one beside another."""
    with make_client(model_dir, tmp_path, runtime="torch", knn_precision="fp32") as c:
        one = score(c, BAD, params={"part_id": "HOW-1"}).json()
        batch = c.post("/score/batch", files=[("files", ("a.png", GOOD, "image/png")),
                                              ("files", ("b.png", BAD, "image/png"))])
        assert batch.status_code == 200, batch.text
        flushed(c)
        summary = c.get("/models").json()["models"][0]
        how = {"runtime": "torch", "knn_search": "exact, fp32", "device": "cpu",
               "threads": c.app.state.service.batcher.threads}
        served = ("runtime", "knn_search", "device")  # what GET /models says of the model as it serves
        assert {k: summary[k] for k in served} == {k: how[k] for k in served}
        got = c.get(f"/inspections/{one['inspection_id']}").json()
        assert {k: got[k] for k in how} == how
        # the answer says it too, as its record does, the batch's items each as their own record
        assert one["scored_with"] == how
        for item in batch.json()["results"]:
            rec = c.get(f"/inspections/{item['result']['inspection_id']}").json()
            assert item["result"]["scored_with"] == {k: rec[k] for k in how}
        listed = c.get("/inspections").json()["items"]
        assert len(listed) == 3 and [{k: i[k] for k in served} for i in listed] == [{k: how[k] for k in served}] * 3
        # a batch's photos may be scored by two passes at once, each then with its share of the threads (CI's
        # loaded machine recorded one of them so)
        batcher = c.app.state.service.batcher
        assert {i["threads"] for i in listed} <= {batcher.threads, batcher.shared_threads}


def test_a_record_of_a_runtime_this_release_does_not_know_is_listed_as_it_is(own_client):
    """Two releases share one PostgreSQL database during a rolling update; a later one may record a runtime this
    one's options table does not offer. That record is listed and read with its runtime as it was written: held to
    this release's runtimes, one such row made the whole list a 500."""
    from anomaly_service.decision import ScoredWith
    from anomaly_service.records import PartContext, PendingRecord

    later = ScoredWith(runtime="openvino", knn_search="exact, fp32", device="npu:0", threads=4)
    pending = PendingRecord(data=GOOD, model="part", model_version="v9", score=1.0, normalized_score=0.5,
                            threshold=2.0, is_anomaly=False, regions=[], image_width=128, image_height=128,
                            timing_ms={}, context=PartContext(part_id="LATER"), scored_with=later)
    assert own_client.app.state.service.recorder.submit(pending)
    score(own_client, GOOD, params={"part_id": "NOW"})
    flushed(own_client)
    listed = own_client.get("/inspections")
    assert listed.status_code == 200, listed.text
    assert [(i["part_id"], i["runtime"], i["device"]) for i in listed.json()["items"]][-1] == \
        ("LATER", "openvino", "npu:0")
    assert own_client.get(f"/inspections/{pending.id}").json()["runtime"] == "openvino"


def test_a_score_answer_names_the_record_of_its_part(client, model_dir, tmp_path):
    """A client that scored a part, the page's live view among them, can tell its record from the line's: the
    answer carries the record's id (null where nothing is recorded)."""
    one = score(client, BAD, params={"part_id": "ID-1"}).json()
    batch = client.post("/score/batch", params={"part_id": "ID-B"},
                        files=[("files", ("a.png", GOOD, "image/png")), ("files", ("b.png", BAD, "image/png"))])
    ids = [x["result"]["inspection_id"] for x in batch.json()["results"]]
    flushed(client)
    assert client.get(f"/inspections/{one['inspection_id']}").json()["part_id"] == "ID-1"
    recorded = [i["id"] for i in client.get("/inspections", params={"part_id": "ID-B"}).json()["items"]]
    assert sorted(recorded) == sorted(ids) and len(set(ids)) == 2
    with make_client(model_dir, tmp_path, record=False) as c:
        assert score(c, GOOD).json()["inspection_id"] is None


def test_every_format_of_a_score_answer_names_its_record_in_a_header(client, model_dir, tmp_path):
    """Only the JSON answer named its record: the overlay PNG (``/score/image``, or ``/score`` with ``Accept:
    image/png``) has no field for it, so a client that shows the picture could not lead an operator to the record.
    Every single image's answer now names it in ``X-Inspection-Id`` (the JSON one too, the same id as its body),
    declared in the OpenAPI schema and exposed to a dashboard's browser; nothing is named where nothing is
    recorded."""
    as_json = score(client, BAD, params={"part_id": "HDR-JSON"})
    assert as_json.headers["X-Inspection-Id"] == as_json.json()["inspection_id"]
    as_picture = score(client, BAD, params={"part_id": "HDR-ACCEPT"}, headers={"Accept": "image/png"})
    assert as_picture.headers["content-type"] == "image/png"
    overlay = score(client, GOOD, "/score/image", data={"part_id": "HDR-IMAGE"})
    assert overlay.headers["content-type"] == "image/png"
    flushed(client)
    for answer, part in ((as_json, "HDR-JSON"), (as_picture, "HDR-ACCEPT"), (overlay, "HDR-IMAGE")):
        got = client.get(f"/inspections/{answer.headers['X-Inspection-Id']}")
        assert got.status_code == 200 and got.json()["part_id"] == part
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/score", "/score/image"):
        assert "X-Inspection-Id" in paths[path]["post"]["responses"]["200"]["headers"]
    with make_client(model_dir, tmp_path, record=False, cors_origins=["http://dash.example"]) as c:
        for path, headers in (("/score", {}), ("/score", {"Accept": "image/png"}), ("/score/image", {})):
            answer = score(c, GOOD, path, headers={"Origin": "http://dash.example", **headers})
            assert "X-Inspection-Id" not in answer.headers
            assert "x-inspection-id" in answer.headers["access-control-expose-headers"].lower()


def test_a_smaller_answer_keeps_the_records_heatmap_whole_and_the_stored_overlay_draws_smaller_on_asking(own_client):
    """An answer drawn smaller (``max_side``) must not leave its smaller heatmap as the record's: the stored overlay
    is drawn from the photo and the heatmap at the photo's size. The stored overlay takes ``max_side`` too, with an
    ETag of its own, so a browser's copy of one size is never taken for the other."""
    r = score(own_client, BAD, params={"heatmap": "png", "max_side": 32})
    assert r.json()["heatmap"]["shape"] == [32, 32]
    flushed(own_client)
    rid = r.headers["X-Inspection-Id"]
    heat = own_client.get(f"/inspections/{rid}/heatmap.png")
    assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).size == (128, 128)
    whole = own_client.get(f"/inspections/{rid}/overlay.png")
    small = own_client.get(f"/inspections/{rid}/overlay.png", params={"max_side": 40})
    assert Image.open(io.BytesIO(whole.content)).size == (128, 128)
    assert Image.open(io.BytesIO(small.content)).size == (40, 40)
    assert whole.headers["ETag"] != small.headers["ETag"]
    again = own_client.get(f"/inspections/{rid}/overlay.png", params={"max_side": 40},
                           headers={"If-None-Match": small.headers["ETag"]})
    assert again.status_code == 304
    assert own_client.get(f"/inspections/{rid}/overlay.png", params={"max_side": 0}).status_code == 422


def test_a_release_started_on_records_a_newer_one_upgraded_scores_and_leaves_them_as_they_are(model_dir, tmp_path):
    """Rolled back to the release before, a service found its database at a revision it did not know: Alembic's
    "Can't locate revision", and the service crash-looped (conda-store#590; SignalPilot#303 booted on a warning).
    Ours scores on, says in /readyz and on the records routes that the records were made by a newer release and how
    to take them back, counts each part it cannot record, and leaves the database at its revision."""
    import sqlalchemy as sa

    from anomaly_service.records import RecordStore

    newer = RecordStore.open(None, tmp_path / "data")
    newer.upgrade()
    with newer.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    newer.close()
    with make_client(model_dir, tmp_path) as c:
        score(c)
        assert c.get("/readyz").json()["recording"] == "unavailable"
        r = c.get("/inspections")
        assert r.status_code == 503 and r.json()["error"] == "records_unavailable", r.text
        assert "newer release" in r.json()["detail"] and "anomaly db downgrade --to" in r.json()["detail"], r.text
        assert metric(c.get("/metrics").text, 'anomaly_records_dropped_total{reason="unavailable"}') == 1
    kept = RecordStore.open(None, tmp_path / "data")
    try:
        with kept.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0099"
    finally:
        kept.close()
