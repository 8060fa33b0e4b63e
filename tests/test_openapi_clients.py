"""A client generated from ``/openapi.json`` (a plant's MES or PLC developer reads nothing else) builds its requests
and parses its answers by the spec alone: every line operation, against a real ``anomaly serve``, is sent as the
spec says and its real answer is validated against the spec's own schema for that status and content type."""

from __future__ import annotations

import shutil
import signal
import time
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import add_defect, launch_server, png_bytes, textured_part

MAGIC = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8"}
TIMES = FormatChecker(formats=())  # date-time as a generated client parses it: ISO 8601 with an offset


@TIMES.checks("date-time", raises=ValueError)
def _a_time(value: object) -> bool:
    return not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is not None


class Spec:
    """The service's OpenAPI document, used as a generator uses it: to build requests and to check answers."""

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.registry = Registry().with_resource("urn:spec", Resource.from_contents(doc, DRAFT202012))

    def form(self, method: str, path: str, fields: dict[str, Any]) -> dict[str, Any]:
        """httpx arguments for a multipart body: a field the spec types ``format: binary`` is sent as a file part,
        any other as a text part, which is what a generated client does with it."""
        body = self.doc["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]["schema"]
        if "$ref" not in body and len(body.get("allOf", [])) == 1:  # the one shape it is, beside a title: how the
            body = body["allOf"][0]  # range's lowest FastAPI and pydantic write a body none of whose fields is required
        props = self.doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
        files, data = [], []
        for name, value in fields.items():
            prop = props[name]
            binary = (prop.get("items") or prop).get("format") == "binary"
            for item in value if isinstance(value, list) else [value]:
                if binary:
                    files.append((name, (f"{name}.png", item, "image/png")))
                else:
                    data.append((name, item if isinstance(item, str) else item.decode("latin-1")))
        return {"files": files + [(k, (None, v)) for k, v in data]}

    def check(self, method: str, path: str, answer: httpx.Response) -> None:
        """``answer`` is documented for ``path``'s operation: its status, its content type, and its body valid
        against that answer's schema (JSON), or the binary the schema says (pictures)."""
        where = f"{method.upper()} {path} {answer.status_code}"
        documented = self.doc["paths"][path][method]["responses"]
        assert str(answer.status_code) in documented, (where, "status not in the spec", answer.text[:300])
        for header in ("X-Request-ID", "X-Inspection-Id", "Retry-After"):  # what a client reads off the answer
            if header.lower() in answer.headers:
                assert header in documented[str(answer.status_code)].get("headers", {}), (where, header)
        content = documented[str(answer.status_code)].get("content", {})
        kind = answer.headers.get("content-type", "").split(";")[0]
        declared = next((k for k in content if k == kind or (k.endswith("/*") and kind.startswith(k[:-1]))), None)
        assert declared, (where, f"answers {kind}, the spec says {sorted(content)}")  # image/* is a media range
        schema = content[declared].get("schema")
        assert schema, (where, "no schema for the answer")
        if kind == "application/json":
            # a named shape, not a free-form object: a generated client has nothing to read fields by in that
            assert "$ref" in schema, (where, "the answer's schema is not a named shape", schema)
            pointer = "/".join(["#/paths", path.replace("~", "~0").replace("/", "~1"), method, "responses",
                                str(answer.status_code), "content", "application~1json", "schema"])
            errors = list(Draft202012Validator({"$ref": "urn:spec" + pointer}, registry=self.registry,
                                               format_checker=TIMES)
                          .iter_errors(answer.json()))
            assert not errors, (where, [(list(e.absolute_path), e.message[:200]) for e in errors[:5]])
        elif kind.startswith("image/"):
            assert schema.get("format") == "binary" and answer.content.startswith(MAGIC[kind]), where
        else:
            assert schema.get("type") == "string" and answer.text, where


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    """A real server over a copy of the session's model (updates and rollbacks change it), keeping every photo."""
    root = tmp_path_factory.mktemp("openapi_clients")
    shutil.copytree(model_dir, root / "models")
    url, proc = launch_server(root / "models", root / "server.log", "--data-dir", str(root / "data"),
                              "--keep-images", "all")
    yield url, Spec(httpx.get(f"{url}/openapi.json", timeout=30).json())
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_a_generated_client_sends_the_photo_as_a_file(service):
    """The upload fields were typed ``contentMediaType`` only, which openapi-python-client reads as text: its
    client sent the photo as a text part without a file name and every score was a 400 malformed_request."""
    url, spec = service
    part = png_bytes(textured_part(np.random.default_rng(40)))
    for path, fields in (("/score", {"file": part, "part_id": "GEN-1"}), ("/score/image", {"file": part}),
                         ("/score/batch", {"files": [part, part], "line": "L1"})):
        answer = httpx.post(url + path, timeout=60, **spec.form("post", path, fields))
        assert answer.status_code == 200, (path, answer.text[:300])
        spec.check("post", path, answer)


def test_the_times_the_service_writes_are_typed_date_time(service):
    """A record's, a review's and the stats' times were plain strings in the spec: a generated client handed the
    MES text to parse where it can give a datetime. (The real values are checked to parse, in every answer.)"""
    schemas = service[1].doc["components"]["schemas"]
    for shape, field in (("InspectionOut", "created_at"), ("InspectionOut", "reviewed_at"), ("ReviewOut", "created_at"),
                         ("StatsBucketOut", "start"), ("StatsOut", "since"), ("StatsOut", "until"),
                         ("StatsOut", "since_local"), ("StatsOut", "until_local"), ("ModelSummary", "loaded_at"),
                         ("ReadyOut", "directory_stuck"), ("ModelsOut", "directory_stuck")):
        prop = schemas[shape]["properties"][field]
        assert "date-time" in [p.get("format") for p in (prop, *prop.get("anyOf", []))], (shape, field, prop)


def _wait_recorded(url: str, inspection_id: str) -> None:
    deadline = time.time() + 20
    while httpx.get(f"{url}/inspections/{inspection_id}", timeout=30).status_code != 200:
        assert time.time() < deadline, "the record was not written"
        time.sleep(0.2)


def test_every_line_operation_answers_as_the_spec_says(service):
    """Score, the records, their pictures, reviews, models, stats and probes: each real answer, refusals too, is
    documented with a schema it validates against (``/readyz`` and ``/metrics`` had none)."""
    url, spec = service
    rng = np.random.default_rng(41)
    bad, _ = add_defect(textured_part(rng), 60, 60)
    good = [png_bytes(textured_part(rng)) for _ in range(2)]
    checked: list[str] = []

    def call(method: str, path: str, real_path: str | None = None, **kwargs: Any) -> httpx.Response:
        answer = httpx.request(method, url + (real_path or path), timeout=120, **kwargs)
        spec.check(method.lower(), path, answer)
        checked.append(f"{method} {path} {answer.status_code}")
        return answer

    def form(path: str, fields: dict[str, Any]) -> dict[str, Any]:
        return spec.form("post", path, fields)

    scored = None
    for heatmap in ("none", "png", "overlay", "array"):
        scored = call("POST", "/score", params={"heatmap": heatmap, "photo": "true", "line": "L9"},
                      **form("/score", {"file": png_bytes(bad), "part_id": "SN-9", "meta": '{"shift": null}'}))
    call("POST", "/score", headers={"Accept": "image/png"}, **form("/score", {"file": good[0]}))
    call("POST", "/score/image", **form("/score/image", {"file": good[1], "station": "cam-2"}))
    call("POST", "/score/batch", **form("/score/batch", {"files": [good[0], b"not an image"]}))
    for refused in ({"file": b"not an image"}, {"file": good[0], "meta": "[1]"}):
        call("POST", "/score", **form("/score", refused))
    call("POST", "/score", params={"model": "nope"}, **form("/score", {"file": good[0]}))
    assert scored is not None
    rid = scored.json()["inspection_id"]
    _wait_recorded(url, rid)
    first = call("GET", "/inspections", params={"limit": 1, "line": "L9"}).json()
    call("GET", "/inspections", params={"limit": 1, "line": "L9", "cursor": first["next_cursor"]})
    call("GET", "/inspections", params={"cursor": "forged"})
    call("GET", "/inspections/stats", params={"bucket": "minute"})
    one = "/inspections/{inspection_id}"
    call("GET", one, f"/inspections/{rid}")
    call("GET", one, "/inspections/01a243f1-a1bc-7000-8cdf-790e2bb20ab3")
    for picture in ("image", "display", "thumbnail", "heatmap.png", "overlay.png"):
        call("GET", f"{one}/{picture}", f"/inspections/{rid}/{picture}")
    reviewed = call("POST", f"{one}/review", f"/inspections/{rid}/review", json={"verdict": "defect", "note": "n"},
                    headers={"X-Reviewer": "ann"}).json()
    call("POST", f"{one}/review", f"/inspections/{rid}/review", json={"verdict": "good", "replaces": "unreviewed"},
         headers={"X-Reviewer": "bob"})
    review = reviewed["reviews"][-1]["id"]
    call("POST", f"{one}/reviews/{{review_id}}/undo", f"/inspections/{rid}/reviews/{review}/undo",
         headers={"X-Reviewer": "ann"})
    call("GET", "/models")
    for sub in ("", "/drift", "/embedding", "/versions", "/history", "/training-images/0/thumbnail", "/false-alarms"):
        template = "/models/{name}" + sub.replace("/0/", "/{index}/")
        call("GET", template, f"/models/part{sub}")
    call("GET", "/models/{name}", "/models/nope")
    call("POST", "/models/{name}/reload", "/models/part/reload")
    call("POST", "/models/reload")
    call("POST", "/models/{name}/update", "/models/part/update", headers={"X-Reviewer": "ann"},
         **form("/models/{name}/update", {"files": good, "note": "more goods"}))
    versions = httpx.get(f"{url}/models/part/versions", timeout=30).json()["versions"]
    earlier = next(v["id"] for v in versions if not v["current"])
    call("POST", "/models/{name}/rollback", "/models/part/rollback", json={"version": earlier})
    call("POST", "/models/{name}/rollback", "/models/part/rollback", json={"version": "none-such"})
    for probe in ("/healthz", "/readyz", "/metrics"):
        call("GET", probe)
    for path in ("/models", "/inspections", "/healthz"):  # any operation: the spec lists the 400 it can get
        assert call("GET", path, headers={"X-Request-ID": "two words"}).json()["error"] == "invalid_request_id"
    operations = {f"{m.upper()} {p}" for p, ops in spec.doc["paths"].items() for m in ops if m != "head"}
    assert operations == {c.rsplit(" ", 1)[0] for c in checked}  # every operation of the spec, none left out
