"""The HTTP service in-process (httpx via Starlette's TestClient): results, heatmaps, errors, security, admin."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from anomaly_service.api import create_app
from anomaly_service.api.schemas import ErrorOut, RegionOut
from anomaly_service.settings import ServiceSettings
from conftest import add_defect, pages_file, png_bytes, textured_part

RNG = np.random.default_rng(42)
GOOD = textured_part(RNG)
BAD, BAD_MASK = add_defect(textured_part(RNG), 64, 64, radius=12)


def client_for(model_dir, **settings) -> TestClient:
    settings.setdefault("reload_interval", 0)
    return TestClient(create_app(ServiceSettings(model_dir=model_dir, **settings)))


@pytest.fixture(scope="module")
def client(model_dir):
    with client_for(model_dir) as c:
        yield c


def post(client, data: bytes, name: str = "x.png", ctype: str = "image/png", **params):
    return client.post("/score", params=params, files={"file": (name, data, ctype)})


def test_score_json_fields_and_decision(client):
    good, bad = post(client, png_bytes(GOOD)).json(), post(client, png_bytes(BAD)).json()
    for r in (good, bad):
        assert {"model", "model_version", "score", "normalized_score", "is_anomaly", "threshold", "image_width",
                "image_height", "timing_ms", "regions", "heatmap"} <= set(r)
        assert r["model"] == "part" and (r["image_width"], r["image_height"]) == (128, 128) and r["heatmap"] is None
        assert {"decode", "queue", "backbone", "knn", "map", "render", "total"} <= set(r["timing_ms"])
    assert bad["is_anomaly"] and not good["is_anomaly"]
    assert bad["normalized_score"] > 1.0 > good["normalized_score"]
    assert good["regions"] == []
    box = bad["regions"][0]  # the defect's centre (64, 64) lies in the strongest region, near its peak
    assert box["x"] <= 64 < box["x"] + box["width"] and box["y"] <= 64 < box["y"] + box["height"]
    assert abs(box["peak_x"] - 64) < 20 and abs(box["peak_y"] - 64) < 20 and box["peak_score"] > 1.0


def test_heatmap_png_overlay_and_array(client):
    rect = np.ascontiguousarray(BAD[:, :96])  # non-square: 96 wide, 128 high
    for kind in ("png", "overlay"):
        hm = post(client, png_bytes(rect), heatmap=kind).json()["heatmap"]
        img = Image.open(io.BytesIO(base64.b64decode(hm["data"])))
        assert hm["kind"] == kind and img.format == "PNG" and img.size == (96, 128)
        assert img.mode == ("P" if kind == "png" else "RGB")  # color map as a palette PNG: same colors, fewer bytes
    hm = post(client, png_bytes(rect), heatmap="array").json()["heatmap"]
    arr = np.frombuffer(base64.b64decode(hm["data"]), dtype="<f2").reshape(hm["shape"])
    assert hm["dtype"] == "float16" and hm["shape"] == [128, 96] and (hm["width"], hm["height"]) == (96, 128)
    # the hottest cell is on the defect, and the scale is normalized (threshold = 1.0)
    y, x = np.unravel_index(np.argmax(arr), arr.shape)
    assert abs(y - 64) < 20 and abs(x - 64) < 20 and arr.max() > 1.0
    assert post(client, png_bytes(GOOD), heatmap="bogus").status_code == 422
    # an empty value is the default, as an empty model= is none: a script's unset variable was a 422
    blank = post(client, png_bytes(GOOD), heatmap="", photo="")
    assert blank.status_code == 200 and blank.json()["heatmap"] is None and blank.json()["photo"] is None


def test_max_side_draws_the_pictures_smaller_and_keeps_the_regions_in_the_photos_pixels(client):
    """A dashboard shows the overlay a few hundred pixels wide: ``max_side`` draws the png and overlay heatmaps, and
    the overlay picture, at most that many pixels a side (never larger than the photo), their ``shape`` saying
    their own size; the regions, width and height stay the photo's. Out of range is 422, blank is not given."""
    rect = np.ascontiguousarray(BAD[:, :96])  # 96 wide, 128 high
    plain = post(client, png_bytes(rect)).json()
    for kind in ("png", "overlay"):
        answer = post(client, png_bytes(rect), heatmap=kind, max_side=64).json()
        hm = answer["heatmap"]
        assert Image.open(io.BytesIO(base64.b64decode(hm["data"]))).size == (48, 64)
        assert (hm["width"], hm["height"], hm["shape"]) == (96, 128, [64, 48])
        assert answer["regions"] == plain["regions"] and answer["regions"]
        whole = post(client, png_bytes(rect), heatmap=kind, max_side=128).json()["heatmap"]
        assert whole["shape"] is None and Image.open(io.BytesIO(base64.b64decode(whole["data"]))).size == (96, 128)
    for r in (client.post("/score", params={"max_side": 32}, files={"file": ("x.png", png_bytes(BAD), "image/png")},
                          headers={"Accept": "image/png"}),
              client.post("/score/image", params={"max_side": 32},
                          files={"file": ("x.png", png_bytes(BAD), "image/png")})):
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (32, 32)
    batch = client.post("/score/batch", params={"heatmap": "overlay", "max_side": 32},
                        files=[("files", ("a.png", png_bytes(BAD), "image/png"))]).json()["results"][0]["result"]
    assert batch["heatmap"]["shape"] == [32, 32]
    assert post(client, png_bytes(GOOD), heatmap="png", max_side=8).status_code == 422
    assert post(client, png_bytes(GOOD), heatmap="png", max_side="x").status_code == 422
    assert post(client, png_bytes(GOOD), heatmap="png", max_side="").json()["heatmap"]["shape"] is None


def test_png_answer_by_accept_header_and_by_path(client):
    for r in (client.post("/score", files={"file": ("x.png", png_bytes(BAD), "image/png")},
                          headers={"Accept": "image/png"}),
              client.post("/score/image", files={"file": ("x.png", png_bytes(BAD), "image/png")})):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (128, 128)
        assert r.headers["x-anomaly-decision"] == "anomaly" and float(r.headers["x-anomaly-normalized-score"]) > 1
        assert r.headers["x-anomaly-model"] == "part"


def test_batch_keeps_order_and_isolates_bad_files(client):
    files = [("files", ("good.png", png_bytes(GOOD), "image/png")),
             ("files", ("notes.txt", b"definitely not an image", "text/plain")),
             ("files", ("bad.png", png_bytes(BAD), "image/png")),
             ("files", ("empty.png", b"", "image/png"))]
    r = client.post("/score/batch", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["good.png", "notes.txt", "bad.png", "empty.png"]
    assert [x["ok"] for x in res] == [True, False, True, False]
    assert [x["status"] for x in res] == [200, 415, 200, 400]
    assert res[1]["error"]["error"] == "not_image" and not res[0]["result"]["is_anomaly"]
    assert res[2]["result"]["is_anomaly"]
    single = post(client, png_bytes(BAD)).json()
    assert res[2]["result"]["score"] == pytest.approx(single["score"], rel=1e-5)


@pytest.mark.parametrize("data,ctype,status,code", [
    (b"", "image/png", 400, "empty"),
    (png_bytes(GOOD)[:60] + b"\xff" * 400, "image/png", 400, "corrupt"),  # valid header, garbage pixels
    (b"<html>hello</html>", "image/png", 415, "not_image"),  # content type lies: bytes decide
    (b"%PDF-1.4 not an image", "application/pdf", 415, "not_image"),
])
def test_bad_uploads_get_clear_errors(client, data, ctype, status, code):
    r = post(client, data, ctype=ctype)
    assert r.status_code == status and r.json()["error"] == code and r.json()["detail"]


def test_truncated_tiny_and_unaccepted_formats(client):
    data = png_bytes(textured_part(RNG))
    r = post(client, data[: len(data) // 2])
    assert r.status_code == 400 and r.json()["error"] == "corrupt"
    r = post(client, png_bytes(np.zeros((4, 4, 3), np.uint8)))
    assert r.status_code == 422 and r.json()["error"] == "too_small"
    buf = io.BytesIO()
    Image.fromarray(GOOD[:64, :64]).save(buf, format="ICO")
    r = post(client, buf.getvalue(), name="x.png")
    assert r.status_code == 415 and r.json()["error"] == "unsupported_format"
    for mode, rle in (("RGB", False), ("L", True)):  # a TGA was refused as a cursor (CUR), or as no image at all
        Image.fromarray(GOOD[:64, :64]).convert(mode).save(buf := io.BytesIO(), format="TGA", rle=rle)
        r = post(client, buf.getvalue(), name="x.tga")
        assert r.status_code == 415 and r.json()["error"] == "unsupported_format", r.json()
        assert "format TGA is not accepted" in r.json()["detail"], r.json()
    assert client.post("/score").status_code == 422  # no file field
    assert client.get("/healthz").json() == {"status": "ok"}  # and the service keeps serving


def test_several_files_to_a_one_photo_route_are_refused_not_one_scored(client):
    """A client that puts two photos in /score's ``file`` field was answered for the last one, and the first part
    went unjudged without a word. Both one-photo routes refuse the form and name the batch route."""
    def scored() -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('anomaly_decisions_total{') and 'model="part"' in line)

    before = scored()
    two = [("file", ("first.png", png_bytes(BAD), "image/png")), ("file", ("second.png", png_bytes(GOOD), "image/png"))]
    for path in ("/score", "/score/image"):
        r = client.post(path, files=two)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
        assert "2 files" in r.json()["detail"] and "/score/batch" in r.json()["detail"]
    assert scored() == before  # neither photo was scored
    assert post(client, png_bytes(BAD)).json()["is_anomaly"]  # one file is scored as always


def _without_file_name(field: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body whose ``field`` part has no file name, as curl -F 'file=<photo.png' (for @) and .NET's
    MultipartFormDataContent.Add(content, "file") send a photo; and its headers."""
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"" + field.encode() + b"\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b0undary--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=b0undary"}


@pytest.mark.parametrize("path,field", [("/score", "file"), ("/score/batch", "files")])
def test_a_photo_sent_without_a_file_name_is_told_how_to_send_it(client, path, field):
    """A part with no file name is a text field to the parser. A photo over the form's 64 KB text limit (every line
    camera's) was refused as 'Part exceeded maximum size of 64KB.', a smaller one with FastAPI's 'Expected
    UploadFile, received: <class 'str'>': neither says that the part needs a file name."""
    small, large = png_bytes(GOOD[:32, :32]), png_bytes(RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    assert len(small) < 64 * 1024 < len(large)
    for data, status, code in ((small, 422, "invalid_request"), (large, 400, "malformed_request")):
        body, headers = _without_file_name(field, data)
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == status and r.json()["error"] == code, r.text
        assert "needs a file name" in r.json()["detail"] and "curl -F file=@photo.png" in r.json()["detail"]
        assert "UploadFile" not in r.json()["detail"]


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", None])
def test_a_photo_posted_as_the_raw_body_is_told_to_come_as_a_form(client, content_type):
    """curl --data-binary @photo.png, or a camera's HTTP push, sends the photo as the whole body: it was told
    'form field file: Field required', about a form it never meant to send. The answer names the body it got."""
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/score", content=png_bytes(GOOD), headers=headers)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    detail = r.json()["detail"]
    assert detail.startswith("form field file: Field required") and "multipart/form-data" in detail
    assert (content_type or "no declared type") in detail
    # a form with the photo in another field (image; file on /score/batch, copied from /score): says where it went
    r = client.post("/score", files={"image": ("x.png", png_bytes(GOOD), "image/png")})
    assert r.json()["detail"].startswith("form field file: Field required (this form sends its file(s) in image, "
                                         "not file: /score takes one photo in the field file")
    r = client.post("/score/batch", files={"file": ("x.png", png_bytes(GOOD), "image/png")})
    assert "sends its file(s) in file, not files" in r.json()["detail"]


def test_a_photo_posted_as_curls_default_form_body_is_told_to_come_as_a_form(client):
    """`curl --data-binary @photo.png URL` declares the photo a url-encoded form: a real photo holds hundreds of
    '&', so the answer was only Starlette's "Too many fields. Maximum number of fields is 256." """
    photo = png_bytes(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert photo.count(b"&") > 256
    r = client.post("/score", content=photo, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_request", r.text
    assert "multipart/form-data" in r.json()["detail"] and "curl -F file=@photo.png" in r.json()["detail"]


def _exif_rotated_jpeg(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return png_bytes(image, format="JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("make", ["gray", "gray16", "palette", "rgba", "cmyk", "exif", "large", "small"])
def test_odd_images_score(client, make):
    img = GOOD
    if make == "gray":
        data = png_bytes(img[:, :, 0])
    elif make == "gray16":
        data = png_bytes((img[:, :, 0].astype(np.uint16) * 257))
    elif make == "palette":
        buf = io.BytesIO(); Image.fromarray(img).convert("P").save(buf, format="PNG"); data = buf.getvalue()
    elif make == "rgba":
        data = png_bytes(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]))
    elif make == "cmyk":
        buf = io.BytesIO(); Image.fromarray(img).convert("CMYK").save(buf, format="JPEG"); data = buf.getvalue()
    elif make == "exif":
        data = _exif_rotated_jpeg(np.ascontiguousarray(img[:, :100]))  # stored 100x128, displayed 128x100
    elif make == "large":
        data = png_bytes(np.array(Image.fromarray(img).resize((1600, 1200))))
    else:
        data = png_bytes(np.ascontiguousarray(img[:16, :24]))
    r = post(client, data, heatmap="png")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = {"exif": (128, 100), "large": (1600, 1200), "small": (24, 16)}.get(make, (128, 128))
    assert (body["image_width"], body["image_height"]) == expected
    hm = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["data"])))
    assert hm.size == expected  # heatmap in the displayed orientation and size
    assert body["is_anomaly"] == (body["normalized_score"] > 1.0)  # one decision, whatever the input's shape


def test_cli_shows_the_same_verdict_and_pictures_as_the_api(client, model_dir, tmp_path):
    """``anomaly score --json --heatmap-dir`` and the API render one result the same way: score, decision,
    regions, and the very same overlay and heatmap pictures."""
    from anomaly_service.cli import app as cli

    path = tmp_path / "bad.png"
    path.write_bytes(png_bytes(BAD))
    heat = tmp_path / "heat"
    res = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(path), "--json",
                                   "--heatmap-dir", str(heat)])
    assert res.exit_code == 0, res.output
    cli_row = json.loads(res.stdout.splitlines()[0])
    api = post(client, path.read_bytes(), heatmap="png").json()
    assert api["score"] == pytest.approx(cli_row["score"], rel=1e-5)
    assert api["is_anomaly"] == cli_row["is_anomaly"]
    # regions: the API's field names and values, with the same evidence; the defect at (64, 64) lies in the
    # strongest one. Only the API names the thumbnail's URL (the CLI has no server to point at)
    assert cli_row["regions"] and len(cli_row["regions"]) == len(api["regions"])
    floats = ("peak_score", "nearest_normal")
    for mine, theirs in zip(cli_row["regions"], api["regions"]):
        assert set(mine) == set(theirs) == set(RegionOut.model_fields)
        assert {k: v for k, v in mine.items() if k not in floats} == {k: v for k, v in theirs.items()
                                                                        if k not in floats}
        assert mine["peak_score"] == pytest.approx(theirs["peak_score"], rel=1e-5)
        ours, api_nn = mine["nearest_normal"], dict(theirs["nearest_normal"])
        assert api_nn.pop("thumbnail_url").startswith(f"/models/part/training-images/{ours['image']}/thumbnail")
        assert {k: v for k, v in ours.items() if k != "distance"} == {k: v for k, v in api_nn.items()
                                                                        if k != "distance"}
        assert ours["distance"] == pytest.approx(api_nn["distance"], rel=1e-5)
    assert cli_row["embedding"] == pytest.approx(api["embedding"], rel=1e-4, abs=1e-5)
    box = cli_row["regions"][0]
    assert box["x"] <= 64 < box["x"] + box["width"] and box["y"] <= 64 < box["y"] + box["height"]
    # pictures: pixel for pixel what /score/image and heatmap=png send
    picture = client.post("/score/image", files={"file": ("bad.png", path.read_bytes(), "image/png")})
    assert picture.status_code == 200
    api_overlay = np.asarray(Image.open(io.BytesIO(picture.content)))
    cli_overlay = np.asarray(Image.open(heat / "bad_overlay.png"))
    assert cli_overlay.shape == api_overlay.shape == (128, 128, 3)
    np.testing.assert_array_equal(cli_overlay, api_overlay)
    api_heatmap = Image.open(io.BytesIO(base64.b64decode(api["heatmap"]["data"]))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(Image.open(heat / "bad_heatmap.png").convert("RGB")),
                                  np.asarray(api_heatmap))


def test_regions_show_the_closest_good_region_with_a_thumbnail_to_fetch(client, fitted_model):
    body = post(client, png_bytes(BAD)).json()
    nn = body["regions"][0]["nearest_normal"]
    n_train = len(fitted_model.catalog_)
    assert 0 <= nn["image"] < n_train and nn["name"] == fitted_model.catalog_.names[nn["image"]]
    assert nn["sha256"] == fitted_model.catalog_.digests[nn["image"]]
    assert (nn["image_width"], nn["image_height"]) == (128, 128) and nn["distance"] > 0
    for box in (nn["box"], nn["patch"]):
        assert 0 <= box["x"] < box["x"] + box["width"] <= 128 and 0 <= box["y"] < box["y"] + box["height"] <= 128
    # the thumbnail: a JPEG of the training image, cacheable for good because its URL names the image
    thumb = client.get(nn["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "immutable" in thumb.headers["cache-control"]
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)  # smaller than the thumbnail side: as is
    again = client.get(nn["thumbnail_url"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304 and not again.content
    plain = client.get(f"/models/part/training-images/{nn['image']}/thumbnail")
    assert plain.status_code == 200 and plain.headers["cache-control"] == "private, no-cache"
    for path, status, code in [(f"/models/part/training-images/{n_train}/thumbnail", 404, "unknown_training_image"),
                               ("/models/part/training-images/-1/thumbnail", 404, "unknown_training_image"),
                               (f"/models/part/training-images/{nn['image']}/thumbnail?sha256={'0' * 64}", 404,
                                "unknown_training_image"),
                               ("/models/part/training-images/first/thumbnail", 422, "invalid_request"),
                               ("/models/nope/training-images/0/thumbnail", 404, "unknown_model")]:
        r = client.get(path)
        assert (r.status_code, r.json()["error"]) == (status, code), path
        assert r.json()["detail"]
    # where the part sits among the training images: one point each, the part in the same coordinates
    emb = client.get("/models/part/embedding").json()
    assert [p["image"] for p in emb["points"]] == list(range(n_train))
    assert [p["name"] for p in emb["points"]] == fitted_model.catalog_.names
    # each point names its image's digest, by which its thumbnail is that image or a 404, never another image
    assert [p["sha256"] for p in emb["points"]] == list(fitted_model.catalog_.digests)
    last = emb["points"][-1]
    assert client.get(f"/models/part/training-images/{last['image']}/thumbnail",
                      params={"sha256": last["sha256"]}).status_code == 200
    assert emb["model_version"] == body["model_version"] and len(emb["explained_variance"]) == 2
    assert set(body["embedding"]) == {"x", "y"}
    good = post(client, png_bytes(GOOD)).json()
    assert good["regions"] == [] and good["embedding"] is not None


def test_a_model_without_evidence_scores_and_answers_null(tmp_path):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent / "data" / "legacy_v1" / "default", tmp_path / "old")
    with client_for(tmp_path) as c:
        body = post(c, png_bytes(BAD)).json()
        assert body["is_anomaly"] and body["regions"] and body["embedding"] is None
        assert all(r["nearest_normal"] is None for r in body["regions"])
        r = c.get("/models/old/training-images/0/thumbnail")
        assert r.status_code == 404 and r.json()["error"] == "no_evidence" and "re-fit" in r.json()["detail"]
        r = c.get("/models/old/embedding")
        assert r.status_code == 404 and r.json()["error"] == "no_embedding"


def test_models_listing_and_unknown_or_escaping_names(client):
    body = client.get("/models").json()
    assert [m["name"] for m in body["models"]] == ["part"] and body["models"][0]["backbone"] == "efficientnet_lite0"
    one = client.get("/models/part").json()
    assert one["manifest"]["format_version"] == 1
    assert one["summary"]["bank_size"] == one["manifest"]["coreset"]["size"] == one["manifest"]["index"]["ntotal"]
    assert one["summary"]["runtime"] == "onnx"  # runtime auto on a CPU with onnxruntime installed
    assert one["summary"]["knn_search"].startswith("exact")
    assert client.get("/models/nope").status_code == 404
    for name in ["../part", "..", "%2e%2e", ".hidden", "a/b"]:
        r = post(client, png_bytes(GOOD), model=name)
        assert r.status_code == 404 and r.json()["error"] == "unknown_model", name
    assert client.get("/models/..%2F..%2Fetc").status_code == 404
    assert client.post("/models/..%2Fpart/reload").status_code == 404


def test_health_ready_and_metrics(client, tmp_path):
    assert client.get("/healthz").status_code == 200
    # uptime monitors that probe with HEAD: the same status, no body
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["part"]
    post(client, png_bytes(BAD))
    text = client.get("/metrics").text
    assert 'anomaly_decisions_total{decision="anomaly",model="part"}' in text
    assert 'anomaly_stage_duration_seconds_bucket{le="0.002",stage="backbone"}' in text
    assert 'anomaly_http_requests_total{method="POST",route="/score",status="200"}' in text
    assert "anomaly_normalized_score_bucket" in text and "anomaly_batch_size_count" in text
    with client_for(tmp_path) as empty:  # no models: alive but not ready
        assert empty.get("/healthz").status_code == 200
        assert empty.get("/readyz").status_code == 503 and empty.head("/readyz").status_code == 503
        r = post(empty, png_bytes(GOOD))
        assert r.status_code == 404 and "no model is loaded" in r.json()["detail"]


def test_every_app_exports_its_own_process_once(tmp_path, monkeypatch):
    """Several apps in one process (the tests, workers) each have a registry of their own, so each carries its own
    process, Python and thread collectors and its scrape has every family once. The thread count is the OS's for this
    process; where there is no /proc it is left out, not exported as 0. Should the library come to export
    ``process_threads`` itself, the service's own stands down rather than doubling the series."""
    from prometheus_client import ProcessCollector
    from prometheus_client.metrics_core import GaugeMetricFamily

    from anomaly_service.telemetry import Telemetry, ThreadCollector

    def families(telemetry: Telemetry) -> list[str]:
        names = [family.name for family in telemetry.registry.collect()]
        assert len(names) == len(set(names)), names
        return names

    for telemetry in (Telemetry(), Telemetry()):
        assert {"process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds", "process_threads",
                "python_info", "python_gc_collections"} <= set(families(telemetry))

    def os_threads() -> int:
        return int(Path("/proc/self/status").read_text().split("\nThreads:", 1)[1].split()[0])

    for _ in range(5):  # a count between two equal reads of the kernel's own (a thread may start or end between)
        before, [family], after = os_threads(), ThreadCollector().collect(), os_threads()
        if before == after:
            assert family.samples[0].value == before
            break
    else:
        pytest.fail("the thread count never held still")
    assert list(ThreadCollector(proc=tmp_path).collect()) == []

    library = ProcessCollector.collect
    monkeypatch.setattr(ProcessCollector, "collect", lambda self: [*library(self), GaugeMetricFamily(
        "process_threads", "Number of OS threads in the process.", value=1)])
    assert families(Telemetry()).count("process_threads") == 1


def test_api_key_guards_scoring_and_admin(model_dir):
    with client_for(model_dir, api_key="s3cret") as c:
        assert post(c, png_bytes(GOOD)).status_code == 401
        assert c.get("/models").status_code == 401
        assert c.post("/models/reload").status_code == 401
        assert c.get("/models/part/training-images/0/thumbnail").status_code == 401
        assert c.get("/models/part/embedding").status_code == 401
        wrong = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        ok = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
        assert c.get("/").status_code == 200  # the page itself; it sends the key the user types


def test_readyz_keeps_load_errors_for_the_key_holder(model_dir, tmp_path):
    """With an API key, /readyz answers every probe with the same status, and names a model that failed to load, but
    its reason (file names, the loader's words) only to a request with the key."""
    import shutil

    shutil.copytree(model_dir / "part", tmp_path / "broken")
    (tmp_path / "broken" / "index.faiss").write_bytes(b"truncated")
    with client_for(tmp_path, api_key="s3cret") as c:  # only the broken model: not ready
        bare, keyed = c.get("/readyz"), c.get("/readyz", headers={"X-API-Key": "s3cret"})
        assert bare.status_code == keyed.status_code == 503
        wrong = c.get("/readyz", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 503 and wrong.json()["errors"] == bare.json()["errors"]
        reason = keyed.json()["errors"]["broken"]
        assert "index.faiss" in reason
        assert list(bare.json()["errors"]) == ["broken"] and "index.faiss" not in bare.text
    shutil.copytree(model_dir / "part", tmp_path / "part")
    with client_for(tmp_path, api_key="s3cret") as c:  # ready beside the broken one, with or without the key
        assert c.get("/readyz").status_code == 200 and "index.faiss" not in c.get("/readyz").text
    with client_for(tmp_path) as c:  # no key configured: the reason for everyone, as before
        assert c.get("/readyz").json()["errors"]["broken"] == reason


def test_readyz_is_not_ready_while_the_default_model_is_not_loaded(model_dir, tmp_path):
    """A load balancer routes by /readyz: a replica whose --default-model was missing or failed to load said ready
    while every request naming no model got a 404. Now it is not ready, and says which model it waits for, until a
    re-scan of the model directory loads that model; GET and HEAD agree."""
    import shutil

    shutil.copytree(model_dir / "part", tmp_path / "other")
    with client_for(tmp_path, default_model="part") as c:  # the default's folder is missing
        r = c.get("/readyz")
        assert r.status_code == 503 and c.head("/readyz").status_code == 503
        assert r.json()["ready"] is False and r.json()["models"] == ["other"]
        assert "default model 'part'" in r.json()["reason"]
        assert post(c, png_bytes(GOOD)).status_code == 404  # what the load balancer would have sent here
        shutil.copytree(model_dir / "part", tmp_path / "part")
        assert c.post("/models/reload").json()["changes"] == {"part": "loaded"}
        r = c.get("/readyz")
        assert r.status_code == 200 and c.head("/readyz").status_code == 200
        assert r.json()["ready"] is True and r.json()["reason"] is None
        assert post(c, png_bytes(GOOD)).json()["model"] == "part"
    (tmp_path / "part" / "index.faiss").write_bytes(b"truncated")
    with client_for(tmp_path, default_model="part", api_key="s3cret") as c:  # the default failed to load
        r = c.get("/readyz")
        assert r.status_code == 503 and c.head("/readyz").status_code == 503
        assert "default model 'part'" in r.json()["reason"] and "part" in r.json()["errors"]
        assert "index.faiss" not in r.text  # why it failed stays for the key holder, as in errors
    with client_for(tmp_path, default_model="other") as c:  # a broken model beside a loaded default: ready
        assert c.get("/readyz").status_code == 200 and c.head("/readyz").status_code == 200


def test_a_keyless_upload_is_refused_before_its_body_is_read():
    """FastAPI parses a multipart body before any dependency runs: without this, a client with no key made the
    server receive and spool a 300 MB upload before its 401. Now a photo's worth at most is read (so a client with a
    wrong key and a photo still sees the 401, not a reset connection), and nothing reaches the app."""
    import asyncio

    from anomaly_service.api.middleware import KEYLESS_DRAIN_BYTES, KeyBeforeBody

    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def call(method: str, key: bytes | None, chunks: int = 300) -> tuple[int, int]:
        pulled, statuses = [0], []

        async def receive():
            pulled[0] += 1
            return {"type": "http.request", "body": b"x" * 2**20, "more_body": pulled[0] < chunks}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
        headers = [(b"x-api-key", key)] if key is not None else []
        asyncio.run(KeyBeforeBody(app, "s3cret")({"type": "http", "method": method, "headers": headers},
                                                 receive, send))
        return statuses[0], pulled[0]

    for key in (None, b"nope", b""):
        status, pulled = call("POST", key)
        assert status == 401 and pulled <= KEYLESS_DRAIN_BYTES // 2**20 + 1 and reached == []
    assert call("POST", b"s3cret")[0] == 200 and reached == ["POST"]
    assert call("OPTIONS", None)[0] == 200 and call("GET", None)[0] == 200  # preflights; GET routes check it


def test_cors_origins_are_taken_as_browsers_send_them(model_dir):
    """CORS compares origins as text: a host without its scheme, or with a path, let no dashboard in and said
    nothing. Such a setting is refused at start, and a trailing slash (no part of an origin) is dropped, so that the
    dashboard's reads are let in as its writes were."""
    from pydantic import ValidationError

    for bad in ("dash.plant.example", "https://dash.plant.example/grafana", "https://"):
        with pytest.raises(ValidationError, match="is not an origin"):
            ServiceSettings(model_dir=model_dir, cors_origins=bad)
    settings = ServiceSettings(model_dir=model_dir, cors_origins="https://dash.plant.example/, *, http://10.0.0.5:3000")
    assert settings.cors_origins == ["https://dash.plant.example", "*", "http://10.0.0.5:3000"]
    with client_for(model_dir, cors_origins="https://dash.plant.example/") as c:
        r = c.get("/models", headers={"Origin": "https://dash.plant.example"})
        assert r.headers["access-control-allow-origin"] == "https://dash.plant.example"


def test_allowed_hosts_refuse_a_rebound_name_and_keep_the_probes(model_dir):
    """A keyless service answered any Host: a web page an operator opened could have its own name resolve to the
    service (DNS rebinding) and, taken by the browser for its own site, read the records and reload models (the
    cross-site check sees a same-origin request). With --allowed-hosts only the listed names are answered; health
    probes, which name the pod's address, are exempt; the default answers any host, as before."""
    from pydantic import ValidationError

    for bad in ("https://inspect.plant.example", "inspect.plant.example:8000", "a/b"):
        with pytest.raises(ValidationError, match="is not a host name"):
            ServiceSettings(model_dir=model_dir, allowed_hosts=bad)
    assert ServiceSettings(model_dir=model_dir, allowed_hosts="").allowed_hosts == ["*"]  # unset, as compose sends it
    with client_for(model_dir, allowed_hosts="inspect.plant.example, *.line2.example, 10.0.0.5, [::1]") as c:
        for host in ("inspect.plant.example", "INSPECT.plant.example:8000", "cam.line2.example", "10.0.0.5:8000",
                     "[::1]:8000"):
            assert c.get("/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "line2.example", "inspect.plant.example.evil.example", "10.0.0.6", ""):
            r = c.get("/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"] == "invalid_host", host
            r = c.post("/models/reload", headers={"Host": host, "Sec-Fetch-Site": "same-origin"})
            assert r.status_code == 400 and r.json()["error"] == "invalid_host", host
        for probe in ("/healthz", "/readyz"):
            assert c.get(probe, headers={"Host": "10.244.1.7:8000"}).status_code == 200
    with client_for(model_dir) as c:
        assert c.get("/models", headers={"Host": "evil.example"}).status_code == 200


def test_a_cors_preflight_for_a_host_not_served_is_refused_as_the_host_first(model_dir):
    """The host check stood inside CORS: a preflight naming a host --allowed-hosts refuses was answered 200 with
    the allowed origin's headers (with --cors-origins) or 400 cors_refused (without), so a rebound name learnt what
    the service would let a page send. Every request is checked for its host first, preflights too."""
    pre = {"Origin": "https://dash.plant.example", "Access-Control-Request-Method": "POST"}
    for cors in ("https://dash.plant.example", ""):
        with client_for(model_dir, allowed_hosts="inspect.plant.example", cors_origins=cors) as c:
            r = c.options("/score", headers={"Host": "evil.example", **pre})
            assert r.status_code == 400 and r.json()["error"] == "invalid_host", cors
            assert not any(h.startswith("access-control-") for h in r.headers), cors
            r = c.get("/models", headers={"Host": "evil.example", "Origin": pre["Origin"]})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
            served = c.options("/score", headers={"Host": "inspect.plant.example", **pre})
            assert served.status_code == (200 if cors else 400), cors
            assert served.status_code == 200 or served.json()["error"] == "cors_refused"


def test_requests_refused_before_the_router_are_counted_under_their_route(model_dir):
    """A host not served, a malformed request id and a keyless upload are refused before the router: the request
    metrics name the route from the app's routes, and with FastAPI listing an included router as one entry (with no
    path of its own) every such refusal was counted as ``unmatched``, a dashboard's panel per route showing none."""
    with client_for(model_dir, allowed_hosts="inspect.plant.example", api_key="k" * 32) as c:
        assert c.get("/models", headers={"Host": "evil.example"}).status_code == 400
        assert c.get("/models/part", headers={"Host": "evil.example"}).status_code == 400
        keyless = c.post("/score", files={"file": ("x.png", b"x", "image/png")},
                         headers={"Host": "inspect.plant.example"})
        assert keyless.status_code == 401  # refused before its body is read
        text = c.get("/metrics", headers={"Host": "inspect.plant.example", "X-API-Key": "k" * 32}).text
    assert 'anomaly_http_requests_total{method="GET",route="/models",status="400"} 1.0' in text, text
    assert 'anomaly_http_requests_total{method="GET",route="/models/{name}",status="400"} 1.0' in text
    assert 'anomaly_http_requests_total{method="POST",route="/score",status="401"} 1.0' in text
    assert 'route="unmatched"' not in text


def test_allowed_hosts_read_a_fully_qualified_name_and_an_ipv6_port_as_the_host(model_dir):
    """A name with its final dot (``inspect.plant.example.``, as an address bar or a cluster's search path gives a
    fully qualified name) names the same host, yet it was refused with 400 invalid_host, and a listed one with the
    dot matched no request; after an IPv6 literal only a port is read, not a name a request tacked on."""
    from anomaly_service.api.middleware import host_name

    listed = "inspect.plant.example, svc.cluster.local., *.line2.example, [::1]"
    assert ServiceSettings(model_dir=model_dir, allowed_hosts=listed).allowed_hosts[1] == "svc.cluster.local"
    with client_for(model_dir, allowed_hosts=listed) as c:
        for host in ("inspect.plant.example.", "Inspect.Plant.Example.:8000", "svc.cluster.local",
                     "svc.cluster.local.", "cam.line2.example.", "[::1]:8000"):
            assert c.get("/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example.", "[::1]evil.example", "[::1].evil.example:80", ".", "inspect.plant.example.."):
            r = c.get("/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"] == "invalid_host", host
    assert host_name("[::1]") == "[::1]" and host_name("[::1]:") == "[::1]"


def test_host_names_beyond_ascii_are_matched_as_browsers_send_them(model_dir):
    """A plant's host 'prüfstand.werk.example' reaches the service as a browser and curl send it, in IDNA form
    ('xn--prfstand-75a...'). Listed as typed, --allowed-hosts refused to start ("is not a host name"), and a
    --cors-origins 'https://dash.müller.example' started and matched no Origin: the dashboard was let in by
    nothing, silently. Both are read in the form on the wire."""
    listed = "prüfstand.werk.example, *.müller.example"
    assert ServiceSettings(model_dir=model_dir, allowed_hosts=listed).allowed_hosts == \
        ["xn--prfstand-75a.werk.example", "*.xn--mller-kva.example"]
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"}
    with client_for(model_dir, allowed_hosts=listed, cors_origins="https://dash.müller.example:3000") as c:
        for host in ("xn--prfstand-75a.werk.example", "Linie1.XN--MLLER-KVA.example:8000"):
            assert c.get("/models", headers={"Host": host}).status_code == 200, host
        assert c.get("/models", headers={"Host": "xn--prfstand-75b.werk.example"}).status_code == 400
        origin = "https://dash.xn--mller-kva.example:3000"
        ok = c.options("/score", headers={"Origin": origin, "Host": "xn--prfstand-75a.werk.example", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("given", ["prüfstand.werk.example:8000", "https://prüfstand.werk.example"])
def test_a_host_beyond_ascii_given_with_a_port_or_scheme_is_told_what_to_give(model_dir, given):
    """A host name beyond ASCII given with its port or as a URL (the usual slips) was refused with the IDNA codec's
    'Codepoint U+003A ... not allowed' instead of the guidance an ASCII name gets: without scheme, port or path."""
    with pytest.raises(ValueError, match="without scheme, port or path"):
        ServiceSettings(model_dir=model_dir, allowed_hosts=given)


def test_an_ipv6_address_alone_is_a_host_not_a_json_list(model_dir):
    """docs/service.md gives '[::1]' as an --allowed-hosts value; given alone or first it was read as a JSON list
    ('Expecting value') and the service did not start. A JSON list is still read as one."""
    for given, hosts in (("[::1]", ["[::1]"]), ("[::1], prüfstand.werk.example", ["[::1]", "xn--prfstand-75a.werk."
                                                                                             "example"]),
                         ('["[::1]", "localhost"]', ["[::1]", "localhost"]), ("[]", ["*"])):
        assert ServiceSettings(model_dir=model_dir, allowed_hosts=given).allowed_hosts == hosts, given


def test_cors_for_configured_dashboard_origins(model_dir):
    with client_for(model_dir, cors_origins="https://dash.plant.example, https://grafana.plant.example") as c:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"}
        ok = c.options("/score", headers={"Origin": "https://grafana.plant.example", **pre})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://grafana.plant.example"
        other = c.options("/score", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in other.headers
        # refused in the service's one error shape, as every other error (it was plain text)
        assert other.status_code == 400 and other.json()["error"] == "cors_refused", other.text
        assert "Disallowed CORS origin" in other.json()["detail"]
        r = c.post("/score/image", files={"file": ("x.png", png_bytes(GOOD))},
                   headers={"Origin": "https://dash.plant.example"})
        assert "X-Anomaly-Decision" in r.headers["access-control-expose-headers"]
        assert "Retry-After" in r.headers["access-control-expose-headers"]  # when to come back after a 503
        # a dashboard that reviews parts sends the reviewer's name (the review route requires it)
        review = {"Access-Control-Request-Method": "POST",
                  "Access-Control-Request-Headers": "content-type,x-api-key,x-reviewer"}
        ok = c.options("/inspections/x/review", headers={"Origin": "https://dash.plant.example", **review})
        assert ok.status_code == 200, ok.text


def test_without_cors_origins_a_preflight_is_refused_as_cors_refused(model_dir):
    """service.md: a preflight from an origin `--cors-origins` does not allow is 400 `cors_refused`. With none
    listed (the default) it was 405 `method_not_allowed`, which names no setting: a dashboard's developer read it
    as a route that takes no POST, not as CORS being off."""
    pre = {"Origin": "https://dash.plant.example", "Access-Control-Request-Method": "POST"}
    with client_for(model_dir) as c:
        r = c.options("/score", headers=pre)
        assert r.status_code == 400 and r.json()["error"] == "cors_refused", r.text
        assert "--cors-origins" in r.json()["detail"] and "access-control-allow-origin" not in r.headers
        assert c.options("/score").status_code == 405  # no preflight: a wrong method, as before
        same_site = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))},
                           headers={"Origin": "http://testserver"})
        assert same_site.status_code == 200 and "access-control-expose-headers" not in same_site.headers


def test_an_empty_default_model_setting_means_none(model_dir):
    """docker-compose passes ANOMALY_DEFAULT_MODEL empty when it is unset: a request naming no model is then
    scored by the only model, not refused as a model named ''."""
    with client_for(model_dir, default_model="") as c:
        r = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))})
        assert r.status_code == 200, r.text


def test_an_empty_model_parameter_means_none(client, model_dir, tmp_path):
    """docs: ``model`` is optional when one model is loaded. A form or script that sends ``?model=`` empty got
    404 "invalid model name ''" instead."""
    r = post(client, png_bytes(GOOD), model="")
    assert r.status_code == 200 and r.json()["model"] == "part", r.text
    r = client.post("/score/batch?model=", files=[("files", ("a.png", png_bytes(GOOD)))])
    assert r.status_code == 200 and r.json()["results"][0]["ok"]
    import shutil

    for name in ("a", "b"):  # with several, an empty name is still no name: the answer says to name one
        shutil.copytree(model_dir / "part", tmp_path / name)
    with client_for(tmp_path) as c:
        r = post(c, png_bytes(GOOD), model="")
        assert r.status_code == 404 and "name one with ?model=" in r.json()["detail"]


def test_upload_and_pixel_limits(model_dir):
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))  # ~120 kB
    with client_for(model_dir, max_upload_bytes=100_000, max_pixels=30_000, max_batch_files=2) as c:
        r = post(c, big)  # declared Content-Length above the limit: refused before the body is read
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert "--max-upload-bytes" in r.json()["detail"]  # the setting that raises it, for line-camera photos

        def chunks():  # no Content-Length: counted while streaming
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 8192
        r = c.post("/score", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413
        # the per-file limit as configured, not the body limit with the multipart framing's allowance in it
        assert "limit of 100000 bytes per file" in r.json()["detail"] and "165536" not in r.json()["detail"]
        # a 12 MP mono camera's uncompressed 16-bit TIFF is 24 MB: "send a JPEG" would drop the bits it reads
        assert "a 16-bit one would lose the bits its camera gives" in r.json()["detail"]
        r = c.post("/score/batch", files=[("files", (f"{i}.png", big)) for i in range(3)])
        assert r.status_code == 413 and "at most 2 files (--max-batch-files) of at most 100000 bytes each" in \
            r.json()["detail"]
        r = post(c, png_bytes(np.array(Image.fromarray(GOOD).resize((200, 200)))))  # 40k pixels > 30k
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
        r = c.post("/score/batch", files=[("files", ("a.png", png_bytes(GOOD)))] * 3)
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"
        assert post(c, png_bytes(GOOD)).status_code == 200  # still serving


def test_uploads_refused_as_too_large_are_counted_in_the_metrics(model_dir):
    """A camera whose photos outgrew --max-upload-bytes had every part refused with 413 while the request and
    rejected-input metrics (the dashboard's panels) showed nothing: the body limit answers outside them."""
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))  # ~120 kB
    with client_for(model_dir, max_upload_bytes=100_000) as c:
        assert post(c, big).status_code == 413  # refused from its Content-Length

        def chunks():  # no Content-Length: refused while streaming
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 8192
        assert c.post("/score", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}) \
            .status_code == 413
        text = c.get("/metrics").text
    assert 'anomaly_http_requests_total{method="POST",route="/score",status="413"} 2.0' in text
    assert 'anomaly_rejected_inputs_total{reason="too_large"} 2.0' in text


def test_no_page_of_the_service_loads_a_script_from_another_host(client):
    """FastAPI's /docs and /redoc loaded Swagger UI and ReDoc from a public CDN (unpinned, no integrity check) into
    the service's origin, where the page keeps the API key in localStorage: a script served for them read the key
    (chromium, the CDN answered by a stand-in). They are gone; the schema stays for viewers and generators."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert client.get("/openapi.json").json()["info"]["title"] == "anomaly"
    page = client.get("/").text
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?(https?:)?//", page)


def test_every_answer_says_nosniff_and_the_page_runs_only_its_own_script(client):
    """Error bodies repeat what a client sent (`invalid model name '<script>...'`) on the origin where the page keeps
    the API key, and only pictures said nosniff; the page's policy said only frame-ancestors, so any markup that
    reached it could run script with the key."""
    answers = [client.get("/"), client.get("/metrics"), client.get("/nope"),
               client.post("/score", params={"model": "<script>alert(1)</script>"},
                           files={"file": ("x.png", png_bytes(GOOD))}),
               client.post("/models/reload", content=b" " * 70_000)]  # the body limit's own 413
    assert [r.status_code for r in answers] == [200, 200, 404, 404, 413]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
    policy = dict(d.strip().split(" ", 1) for d in answers[0].headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    scripts = re.findall(r"<script>(.*?)</script>", answers[0].text, re.DOTALL)
    digest = base64.b64encode(__import__("hashlib").sha256(scripts[0].encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"  # the page's one script, nothing inline besides
    assert "unsafe" not in answers[0].headers["content-security-policy"]
    assert answers[0].headers["x-frame-options"] == "DENY"


def test_a_route_that_takes_no_file_refuses_a_body_larger_than_json_it_reads(client):
    """The upload limit (20 MiB) held on the review, undo, rollback and reload routes too: a 16 MB JSON body was
    parsed whole before its 422 (+180 MB resident on a real server). Those take a few kilobytes of JSON at most."""
    import json as json_module

    headers = {"Content-Type": "application/json", "X-Reviewer": "m.keller"}
    # the largest body a client sends: a 2,000-character note, every character an escaped astral one (12 bytes)
    note = json_module.dumps({"version": "nope", "note": "\U0001F600" * 2000})  # ensure_ascii: \ud83d\ude00
    assert len(note) > 24_000
    r = client.post("/models/part/rollback", content=note, headers=headers)
    assert r.status_code == 404 and r.json()["error"] == "unknown_version"  # read, not refused for its size
    padded = json_module.dumps({"version": "nope", "note": "x" * 100_000})
    for path in ("/models/part/rollback", "/models/reload", "/inspections/01a2470a-0a07-7000-b2aa-a0cf0035a1e7/review"):
        r = client.post(path, content=padded, headers=headers)
        assert r.status_code == 413 and r.json()["error"] == "too_large", path
        assert "not a photo" in r.json()["detail"]


    def chunks():  # no Content-Length: counted as the route reads it
        for _ in range(20):
            yield b" " * 8192
    r = client.post("/models/part/rollback", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert post(client, png_bytes(GOOD)).status_code == 200  # an upload still takes the upload limit


def test_a_body_limit_refusal_carries_the_cors_headers(model_dir):
    """A dashboard whose upload outgrew --max-upload-bytes saw an opaque network error, not the 413 saying which
    setting to raise: the body limit answered outside CORS, so its refusal had no Access-Control-* headers and the
    browser withheld it from the page. Now it carries those any answer to an allowed origin does, and is still
    counted in the metrics."""
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))  # ~120 kB
    dash = {"Origin": "https://dash.example"}

    def cors(r) -> dict[str, str]:
        return {k: v for k, v in r.headers.items() if k.startswith("access-control-") or k == "vary"}

    def chunks():  # no Content-Length: refused while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 8192
    with client_for(model_dir, max_upload_bytes=100_000, cors_origins=["https://dash.example"]) as c:
        scored = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))}, headers=dash)
        assert scored.status_code == 200 and cors(scored)["access-control-allow-origin"] == "https://dash.example"
        declared = c.post("/score", files={"file": ("x.png", big)}, headers=dash)  # refused from Content-Length
        streamed = c.post("/score", content=chunks(),
                          headers={**dash, "Content-Type": "multipart/form-data; boundary=b"})
        for r in (declared, streamed):
            assert r.status_code == 413 and r.json()["error"] == "too_large"
            assert cors(r) == cors(scored)
        # an origin not listed: a browser's write from it is refused as cross-site, with no allow-origin, as any
        # answer to it
        evil = {"Origin": "https://evil.example"}
        other, refused = (c.post("/score", files={"file": ("x.png", data)}, headers=evil)
                          for data in (big, png_bytes(GOOD)))
        assert other.status_code == refused.status_code == 403 and cors(other) == cors(refused)
        assert "access-control-allow-origin" not in cors(other)
        text = c.get("/metrics").text
    assert 'anomaly_http_requests_total{method="POST",route="/score",status="413"} 2.0' in text


def test_reload_after_refit_and_watch(fitted_model, tmp_path):
    import time

    from anomaly_service import AnomalyModel

    fitted_model.save(tmp_path / "part")
    with client_for(tmp_path, reload_interval=0.2) as c:
        before = post(c, png_bytes(BAD)).json()
        old_entry = c.app.state.service.model_entry("part")
        refit = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.05, progress=False,
                             calibration_fraction=0.25, seed=3)
        rng = np.random.default_rng(9)  # eight different parts: copies of one are left out as duplicates
        refit.fit([textured_part(rng) for _ in range(8)]).save(tmp_path / "part")
        deadline = time.time() + 30
        while c.get("/models").json()["models"][0]["version"] == before["model_version"] and time.time() < deadline:
            time.sleep(0.1)
        after = post(c, png_bytes(BAD)).json()
        assert after["model_version"] != before["model_version"]
        assert after["threshold"] != pytest.approx(before["threshold"])
        # a request that resolved the old entry before the swap still scores on the old model
        assert old_entry.model.score(BAD).score == pytest.approx(before["score"], rel=1e-5)
        # explicit reload and rescan endpoints
        assert c.post("/models/part/reload").json()["changes"] == {"part": "reloaded"}
        (tmp_path / "part" / "manifest.json").write_text("{broken")
        r = c.post("/models/part/reload")
        assert r.status_code == 422 and "previous version" in r.json()["detail"]
        assert post(c, png_bytes(BAD)).json()["model_version"] == after["model_version"]  # old one still serves


def test_start_up_loads_and_failures_are_counted(model_dir, tmp_path):
    """docs/service.md and deploy/README.md: a broken model is counted in anomaly_model_reloads_total
    {outcome="failed"}. Start-up loaded every model without counting, so a model broken from the start (a
    truncated index) only showed in the log."""
    import shutil

    for name in ("part", "broken"):
        shutil.copytree(model_dir / "part", tmp_path / name)
    index = tmp_path / "broken" / "index.faiss"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with client_for(tmp_path) as c:
        assert "broken" in c.get("/models").json()["errors"]
        text = c.get("/metrics").text
        assert 'anomaly_model_reloads_total{model="broken",outcome="failed"} 1.0' in text
        assert 'anomaly_model_reloads_total{model="part",outcome="loaded"} 1.0' in text
        assert "anomaly_models_loaded 1.0" in text
        assert post(c, png_bytes(GOOD), model="part").status_code == 200
        # asking for the broken one says why it is not served, not only that it is not
        r = post(c, png_bytes(GOOD), model="broken")
        assert r.status_code == 404 and r.json()["error"] == "unknown_model"
        assert c.get("/models").json()["errors"]["broken"] in r.json()["detail"]


def test_a_model_that_does_not_load_is_a_gauge_while_it_does_not(model_dir, tmp_path):
    """The load-failure alert reads anomaly_model_load_failed: 1 for as long as a model does not load. The failed
    count alone could not carry it: after a failed start-up its first sample already reads 1 (no increase), and a
    broken model is not retried until its files change (so no further count either)."""
    import shutil

    for name in ("part", "broken"):
        shutil.copytree(model_dir / "part", tmp_path / name)
    index = tmp_path / "broken" / "index.faiss"
    good_index = index.read_bytes()
    index.write_bytes(good_index[: len(good_index) // 2])
    with client_for(tmp_path) as c:
        text = c.get("/metrics").text
        assert 'anomaly_model_load_failed{model="broken"} 1.0' in text
        assert 'anomaly_model_load_failed{model="part"}' not in text
        assert 'anomaly_model_load_failed{model="broken"} 1.0' in c.get("/metrics").text  # still, scrape after scrape
        index.write_bytes(good_index)  # fixed: the next re-scan loads it, and the gauge goes
        assert c.post("/models/reload").json()["changes"] == {"broken": "loaded"}
        assert "anomaly_model_load_failed{" not in c.get("/metrics").text


def test_the_series_the_alerts_increase_on_exist_at_zero_before_the_first_event(model_dir):
    """An alert on increase() sees a counter's first sample as its start: a series born at 1 (a model's first
    flagged part, a record lost for a reason not seen before) was no increase, and that event went unalerted."""
    with client_for(model_dir) as c:  # a service of its own: no part flagged yet
        assert post(c, png_bytes(GOOD)).json()["is_anomaly"] is False
        text = c.get("/metrics").text
    flagged = re.search(r'anomaly_decisions_total{decision="anomaly",model="part"} (\S+)', text)
    assert flagged and float(flagged.group(1)) == 0, "the anomaly series of a model that has flagged no part"
    normal = re.search(r'anomaly_decisions_total{decision="normal",model="part"} (\S+)', text)
    assert normal and float(normal.group(1)) == 1
    dropped = dict(re.findall(r'anomaly_records_dropped_total{reason="(\w+)"} (\S+)', text))
    assert set(dropped) == {"buffer_full", "database", "unavailable", "invalid", "shutdown", "stopped", "error"}


def test_a_default_model_that_is_not_loaded_is_warned_of_at_start_up(model_dir, caplog):
    """--default-model naming no loaded model sends every request without ?model= to a 404: say so at start-up."""
    import logging

    with caplog.at_level(logging.WARNING, logger="anomaly_service.api.lifecycle"):
        with client_for(model_dir, default_model="nope") as c:
            assert c.get("/healthz").status_code == 200
    assert any("default model 'nope' is not loaded" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- every error answer has one shape
@pytest.mark.parametrize("method,path,status,code", [
    ("get", "/no/such/page", 404, "not_found"),  # routing raises Starlette's HTTPException
    ("get", "/score", 405, "method_not_allowed"),
    ("delete", "/models", 405, "method_not_allowed"),
])
def test_routing_errors_have_the_error_shape(client, method, path, status, code):
    r = client.request(method, path)
    assert r.status_code == status
    assert set(r.json()) == {"error", "detail"} and r.json()["error"] == code and r.json()["detail"]
    if status == 405:
        assert r.headers["allow"]  # the methods that would work


def test_invalid_parameters_have_the_error_shape(client):
    r = post(client, png_bytes(GOOD), heatmap="bogus")
    assert r.status_code == 422 and set(r.json()) == {"error", "detail"}
    assert r.json()["error"] == "invalid_request" and "query parameter heatmap" in r.json()["detail"]
    r = client.post("/score")  # no file field
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"].startswith("form field file: Field required (this request has no body: ")


def test_json_body_errors_name_body_fields_not_form_fields(client):
    """A JSON body has no form fields: a rollback without its version was told 'form field version'."""
    r = client.post("/models/part/rollback", json={})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"] == "body field version: Field required"
    r = client.post("/models/part/rollback", json={"version": "v", "by": "x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body field by: ")
    r = client.post("/models/part/rollback")
    assert r.status_code == 422 and r.json()["detail"] == "request body: Field required"
    r = client.post("/models/part/rollback", content=b"{bad", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("request body: JSON decode error at character 1")


def test_a_json_body_sent_as_another_content_type_is_told_to_say_json(client):
    """A review or rollback whose JSON came as text/plain (.NET's StringContent, curl --data without -H) was told
    "Input should be a valid dictionary", naming neither the header nor the type: a PLC developer could not tell
    that the JSON itself was right. The refusal now names the body's type and the one to send."""
    review = "/inspections/01a243f1-a1bc-7000-8cdf-790e2bb20ab3/review"  # the body is read before the record
    for path, headers, body in [("/models/part/rollback", {}, b'{"version": "v"}'),
                                (review, {"X-Reviewer": "ann"}, b'{"verdict": "good"}')]:
        for kind in ("text/plain; charset=utf-8", "application/x-www-form-urlencoded"):
            r = client.post(path, content=body, headers={**headers, "Content-Type": kind})
            assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
            assert f"this request's body is {kind.split(';')[0]}" in r.json()["detail"], r.json()
            assert "Content-Type: application/json" in r.json()["detail"]
    r = client.post("/models/part/rollback", content=b'{"version": "v"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_version"  # the same body, declared JSON, is read


FILE_PART = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
             b"Content-Type: image/png\r\n\r\n")


@pytest.mark.parametrize("path,content_type,body", [
    ("/score", "multipart/form-data", b"no boundary declared"),
    ("/score", "multipart/form-data; boundary=b",
     b"--b\r\nContent-Disposition: form-data; filename=\"x.png\"\r\n\r\nabc\r\n--b--\r\n"),
    # cut off: the file part started, no closing boundary (it was 422 "form field file: Field required")
    ("/score", "multipart/form-data; boundary=b", FILE_PART + png_bytes(GOOD)[:200]),
    ("/score", "multipart/form-data; boundary=b", FILE_PART + png_bytes(GOOD) + b"\r\n--b\r\n"),
    ("/score/batch", "multipart/form-data; boundary=b", FILE_PART.replace(b'"file"', b'"files"') + b"abc"),
    ("/models/part/update", "multipart/form-data; boundary=b", FILE_PART.replace(b'"file"', b'"files"') + b"abc"),
])
def test_malformed_multipart_body_has_the_error_shape(client, path, content_type, body):
    r = client.post(path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == 400 and set(r.json()) == {"error", "detail"}
    assert r.json()["error"] == "malformed_request" and r.json()["detail"]
    assert client.get("/healthz").status_code == 200
    whole = FILE_PART + png_bytes(GOOD) + b"\r\n--b--\r\n"  # the same body, whole, still scores
    assert client.post("/score", content=whole, headers={"Content-Type": "multipart/form-data; boundary=b"}
                       ).status_code == 200


def test_the_closing_boundary_is_found_across_chunks():
    """A body streams in chunks: a closing boundary split between two of them still closes it, and a body that
    is only its closing boundary (no parts) is whole too."""
    import asyncio

    from anomaly_service.api.multipart import WholeMultipartRequest
    from starlette.formparsers import MultiPartException

    def read(chunks: list[bytes]) -> bytes:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        async def run() -> bytes:
            scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                     "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")]}
            return b"".join([c async for c in WholeMultipartRequest(scope, receive).stream()])
        return asyncio.run(run())

    body = b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--xyz--\r\n"
    for cut in range(1, len(body)):
        assert read([body[:cut], body[cut:]]) == body
    assert read([b"--xyz--"]) == b"--xyz--"
    with pytest.raises(MultiPartException, match="closing boundary"):
        read([body[:-9], b"\r\n"])


def test_openapi_documents_the_error_shape(client):
    """Every documented error answer (except the readiness probe's own 503 body) is an ErrorOut."""
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    documented = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    body = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
                    # ErrorOut itself, or a body that adds to it (409 update_refused lists the blocking images)
                    assert {"error", "detail"} <= set(body["properties"]), (method, path, status)
                    documented += 1
    assert documented >= 20
    assert set(spec["components"]["schemas"]["ErrorOut"]["properties"]) == set(ErrorOut.model_fields)


def test_unexpected_failures_have_the_error_shape(client, monkeypatch):
    from anomaly_service.api.routes import operations

    def broken() -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(operations, "page", broken)
    r = TestClient(client.app, raise_server_exceptions=False).get("/")
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert "disk on fire" not in r.json()["detail"]  # internals stay in the server log


def test_a_photo_far_from_the_training_size_is_scored_with_a_warning(client, fitted_model, model_dir):
    """A plant trial: after a camera change a photo at another resolution is seen at the training photos' zoom,
    looks larger than any good part and is flagged whole, and nothing said why. The decision stands; the answer
    (API and CLI) carries the reason, and a photo of the training size carries none."""
    from anomaly_service.cli import app as cli
    from anomaly_service.preprocessing import SCALE_TOLERANCE

    assert fitted_model.embedder.preprocessing.sides == (128.0, 128.0)  # the training photos' longer sides
    big = np.asarray(Image.fromarray(GOOD).resize((256, 256), Image.BICUBIC))
    near = np.asarray(Image.fromarray(GOOD).resize((150, 150), Image.BICUBIC))  # within the margin
    assert 128 * SCALE_TOLERANCE < 256 and 150 <= 128 * SCALE_TOLERANCE
    r = post(client, png_bytes(big)).json()
    assert len(r["warnings"]) == 1 and "256 px" in r["warnings"][0] and "128 px" in r["warnings"][0]
    assert "2.0x larger" in r["warnings"][0] and "re-fit" in r["warnings"][0]
    assert post(client, png_bytes(near)).json()["warnings"] == []
    assert post(client, png_bytes(GOOD)).json()["warnings"] == []
    tiny = np.asarray(Image.fromarray(GOOD).resize((64, 64), Image.BICUBIC))
    assert "2.0x smaller" in fitted_model.score(tiny).warnings[0]

    path = model_dir.parent / "big.png"
    path.write_bytes(png_bytes(big))
    out = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(path), "--json"])
    assert out.exit_code == 0 and "warning:" in out.stderr and json.loads(out.stdout)["warnings"]
    # no warning: the key is there all the same, an empty list, as the API sends it
    path.write_bytes(png_bytes(GOOD))
    out = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(path), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["warnings"] == []


def test_a_multi_frame_photo_is_scored_on_a_chosen_frame_and_the_answer_says_which(client, fitted_model,
                                                                                   model_dir):
    """A line camera's multi-page TIFF was scored on whatever page came first, with no word. A TIFF with a page
    marked as a reduced-resolution copy is scored on its largest page; a stack of exposures on its first; either
    way the answer's warnings (API, batch, CLI, the Python API) name how many frames there were and which one was
    scored, and the decision is that frame's."""
    from anomaly_service.cli import app as cli

    pyramid = pages_file(Image.fromarray(GOOD).resize((32, 32)), Image.fromarray(BAD), reduced=(0,))
    stack = pages_file(Image.fromarray(GOOD), *[Image.fromarray(BAD)] * 2)

    r = post(client, pyramid, "p.tif", "image/tiff").json()
    assert r["is_anomaly"] and (r["image_width"], r["image_height"]) == (128, 128)  # the full page, not the preview
    assert len(r["warnings"]) == 1 and "2 frames" in r["warnings"][0] and "frame 2 (the largest" in r["warnings"][0]
    r = post(client, stack, "s.tif", "image/tiff").json()
    assert not r["is_anomaly"] and "3 frames" in r["warnings"][0] and "frame 1 (the first" in r["warnings"][0]
    batch = client.post("/score/batch", files=[("files", ("s.tif", stack, "image/tiff")),
                                               ("files", ("g.png", png_bytes(GOOD), "image/png"))]).json()
    assert "3 frames" in batch["results"][0]["result"]["warnings"][0]
    assert batch["results"][1]["result"]["warnings"] == []
    assert "frame 2" in fitted_model.score(pyramid).warnings[0]

    path = model_dir.parent / "stack.tif"
    path.write_bytes(stack)
    out = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(path), "--json"])
    assert out.exit_code == 0 and "3 frames" in json.loads(out.stdout)["warnings"][0]
    out = CliRunner().invoke(cli, ["score", "--model", str(model_dir / "part"), str(path)])
    assert out.exit_code == 0 and f"warning: {path}: the file holds 3 frames" in out.stderr


def test_scale_warning_follows_the_resize_policy():
    """Only policies that keep the training zoom warn: longer-side and squash bring every photo to one size; a model
    saved before the sides were kept compares with its reference side."""
    from anomaly_service.preprocessing import Preprocessing, scale_warning

    base = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 8, reference_side=320.0, sides=(300.0, 340.0))
    assert scale_warning(base, None, 330, 200) is None and scale_warning(base, None, 250, 400) is None
    assert "larger" in scale_warning(base, None, 300, 500) and "smaller" in scale_warning(base, None, 200, 230)
    assert "300-340 px" in scale_warning(base, None, 900, 900)
    longer_side = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 8, sides=(300.0, 340.0))
    assert scale_warning(longer_side, None, 2000, 2000) is None
    assert scale_warning(longer_side, 512, 2000, 2000) is not None  # tiles keep one zoom whatever the policy
    squash = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 8, reference_side=320.0, squash=True, sides=(320.0, 320.0))
    assert scale_warning(squash, None, 2000, 2000) is None
    older = Preprocessing(256, (0.5,) * 3, (0.5,) * 3, 8, reference_side=320.0)
    assert scale_warning(older, None, 320, 390) is None and "320 px" in scale_warning(older, None, 900, 900)


def test_a_multipart_body_holds_no_more_files_or_field_bytes_than_the_routes_take(model_dir, monkeypatch):
    """The batch and update routes take a body of max_batch_files uploads, and Starlette keeps each file up to
    1 MiB (and each text field up to 1 MiB) in memory while it parses. Their count was checked only after the
    whole body was parsed: one request of 300 files or fields of 1 MB held 300 MB, a few of them exhausted memory."""
    import starlette.formparsers

    made = []

    class Counted(starlette.formparsers.UploadFile):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(starlette.formparsers, "UploadFile", Counted)
    tiny = png_bytes(GOOD[:32, :32])
    with client_for(model_dir, max_batch_files=2) as c:
        for path in ("/score/batch", "/models/part/update", "/score"):
            made.clear()
            r = c.post(path, files=[("files" if path != "/score" else "file", (f"{i}.png", tiny))
                                    for i in range(40)])
            assert r.status_code == 413 and r.json()["error"] == "too_many_files", r.text
            assert len(made) <= 3, f"{path}: {len(made)} files parsed for a limit of 2"
        r = c.post("/score/batch", files=[("files", ("a.png", png_bytes(GOOD)))], data={"x": "y" * 200_000})
        assert r.status_code == 400 and r.json()["error"] == "malformed_request", r.text
        r = c.post("/score/batch", files=[("files", ("a.png", png_bytes(GOOD)))],
                   data={f"x{i}": "y" for i in range(300)})
        assert r.status_code == 400 and r.json()["error"] == "malformed_request", r.text
        r = c.post("/score/batch", files=[("files", ("a.png", png_bytes(GOOD)))] * 2,
                   data={"part_id": "P", "meta": json.dumps({"lot": 7})})
        assert r.status_code == 200 and all(x["ok"] for x in r.json()["results"]), r.text


def test_a_body_the_form_parser_would_spend_seconds_on_is_refused_at_once(client):
    """python-multipart parses every upload on the event loop. Before 0.0.27 it read a part's headers with no bound
    (GHSA-pp6c-gr5w-3c5g): a 20 MB upload whose file part carried one header of 15 MB, or two million short ones,
    was scored after 10-16 s of the server's CPU; before 0.0.30 a url-encoded body also split at ';' and dropped
    empty fields, so one field of 16 MB of ';' passed the 64 KB field limit and was parsed for 5 s; 0.0.17 spent
    minutes on 15 MB after the closing boundary (CVE-2024-53981). pyproject.toml's floor keeps those releases out
    (test_deploy.py's floors)."""
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'.encode()
    tail = b"Content-Type: image/png\r\n\r\n" + png_bytes(GOOD) + f"\r\n--{boundary}--\r\n".encode()
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    for headers in (b"X-A: " + b"a" * 2**20 + b"\r\n", b"X-A: a\r\n" * 2**14):
        r = client.post("/score", content=head + headers + tail, headers=multipart)
        assert r.status_code == 400 and r.json()["error"] == "malformed_request", r.text
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    r = client.post("/score", content=b"a=" + b";" * 2**18, headers=urlencoded)
    assert r.status_code == 400 and "Field exceeded maximum size" in r.json()["detail"], r.text


def test_request_metrics_keep_a_bounded_set_of_methods(model_dir):
    """The method label was the request's own: HTTP takes any token as a method, so a client with no key made a new
    series per request (each as long as the request line allows), growing memory and /metrics without bound."""
    with client_for(model_dir, api_key="k") as c:
        for i in range(3):
            assert c.request(f"{'X' * 1000}{i}", "/healthz").status_code == 405
        assert c.request("BREW", "/nowhere").status_code == 404
        text = c.get("/metrics").text
        series = [line for line in text.splitlines() if line.startswith("anomaly_http_requests_total{")]
        assert not any("XXX" in line or "BREW" in line for line in series), series
        assert 'anomaly_http_requests_total{method="other",route="/healthz",status="405"} 3.0' in text


def test_a_web_page_elsewhere_cannot_make_a_browser_change_the_service(model_dir):
    """With no API key (the default) every route is open to whoever reaches the port, and a browser on the plant
    network reaches it for any site its user opens: a multipart POST needs no CORS preflight, so a page elsewhere
    could reload or update (teach defects as good) a model through an operator's browser. Browsers say where a
    request comes from (Sec-Fetch-Site, Origin); writes from another site are refused unless --cors-origins lets
    that origin in. Clients that are no browser send neither header and are not affected."""
    evil = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    with client_for(model_dir) as c:
        r = c.post("/models/reload", headers=evil)
        assert r.status_code == 403 and r.json()["error"] == "cross_site_request", r.text
        r = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))},
                   headers={**evil, "Sec-Fetch-Site": "same-site"})
        assert r.status_code == 403
        assert c.get("/models", headers=evil).status_code == 200  # reads: the browser keeps the answer from the page
        assert c.post("/models/reload", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200  # the page
        assert c.post("/models/reload").status_code == 200  # curl, a line's client
    with client_for(model_dir, cors_origins=["https://dash.example"]) as c:
        assert c.post("/models/reload", headers={**evil, "Origin": "https://dash.example"}).status_code == 200
        assert c.post("/models/reload", headers=evil).status_code == 403


def test_a_browser_without_fetch_metadata_is_judged_by_its_origin(model_dir):
    """A browser that sends no Sec-Fetch-Site (Safari before 16.4, Firefox before 90, a panel PC's old WebView)
    let a page elsewhere reload a keyless service's models or update them through it: its form POST carried only
    Origin, which the check did not read. Origin names the page's site; the service's own page names its host."""
    with client_for(model_dir) as c:  # TestClient calls the service as host "testserver"
        for origin in ("https://evil.example", "null", "http://testserver.evil.example"):
            r = c.post("/models/reload", headers={"Origin": origin})
            assert r.status_code == 403 and r.json()["error"] == "cross_site_request", origin
            r = c.post("/score", files={"file": ("x.png", png_bytes(GOOD))}, headers={"Origin": origin})
            assert r.status_code == 403, origin
        assert c.post("/models/reload", headers={"Origin": "http://testserver"}).status_code == 200  # the page
        assert c.post("/models/reload", headers={"Origin": "http://TestServer"}).status_code == 200
        assert c.post("/models/reload").status_code == 200  # curl, a line's client: no Origin
    with client_for(model_dir, cors_origins=["https://dash.example"]) as c:
        assert c.post("/models/reload", headers={"Origin": "https://dash.example"}).status_code == 200


def test_the_page_is_never_shown_inside_another_sites_frame(client):
    """The inspection station acts with the key and reviewer its browser keeps: framed by another site under a
    decoy, its clicks and D/G keys would record reviews (which updates read) that the operator never meant."""
    r = client.get("/")
    assert r.status_code == 200 and "inspection station" in r.text
    assert r.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_no_answer_field_collides_with_an_older_pydantics_reserved_names():
    """pydantic before 2.10 reserved every name that starts with ``model_`` unless a model says otherwise, and warned
    at each import of the answers' module (a service's start, a CLI command) for ``model_version``: the ranges in
    pyproject.toml admit those releases. Every model of the package keeps its fields out of its reserved names as
    those releases read them."""
    from pydantic import BaseModel

    import anomaly_service.api.app  # noqa: F401  (every answer's model, the routes' own among them)

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    models = [c for c in subclasses(BaseModel) if c.__module__.startswith("anomaly_service.")]
    assert any(c.__name__ == "ScoreOut" for c in models)
    for cls in models:
        reserved = cls.model_config.get("protected_namespaces", ("model_",))  # the default before 2.10
        clashes = [f for f in cls.model_fields for ns in reserved if isinstance(ns, str) and f.startswith(ns)]
        assert not clashes, f"{cls.__module__}.{cls.__name__}: {clashes} warn under {reserved}"
