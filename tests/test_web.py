"""The page at / in a real headless browser (Debian's chromium driven by Playwright; no browser download): the
inspection station's live view (with the evidence for flagged regions and the part among the training images),
history, review queue, drift banner, and the page on a server that records nothing. Screenshots go to the test's
tmp dir; the last live, evidence and queue views are also copied to /tmp/page_live.png, /tmp/page_evidence.png
and /tmp/page_queue.png for a person to look at."""

import hashlib
import json
import shutil
import signal
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import (SIDE, add_defect, allow_connections, board, eventually, flock_held_elsewhere, launch_server,
                      png_bytes, stop_server, textured_part)

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def open_page(browser, url, viewport=DESKTOP, **context):
    """A fresh page on the station, with its uncaught errors and console errors collected; ``context``: the
    browser context's options (its time zone, say)."""
    # the tests wait with string predicates, which Playwright evaluates with eval(): the page's policy refuses that,
    # as it should; test_the_page_runs_under_its_policy... drives the page under it
    context.setdefault("bypass_csp", True)
    page = browser.new_page(viewport=viewport, **context)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)
    return page, errors


def unexpected(errors: list[str], *statuses: int) -> list[str]:
    """The errors, less Chromium's own log line for an API answer the test provoked on purpose (the page shows
    those to the user; Chromium logs every failed load, fetch included)."""
    return [e for e in errors if not any(f"status of {s} " in e for s in statuses)]


def shot(page, tmp_path, name, copy_to=None):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    if copy_to:
        shutil.copy(path, copy_to)


def list_line(page, line: str, n: int) -> None:
    """History's list filtered to ``line``, once it shows ``n`` parts."""
    page.click("#tab-history")
    page.fill("#h-line", line)
    page.click("#hfilters button[type=submit]")
    page.wait_for_function(f"document.querySelectorAll('#hlist li').length === {n}", timeout=10000)


def history_of(browser, url: str, line: str, n: int):
    """The page opened on History, filtered to ``line``, once it lists ``n`` parts: (page, errors)."""
    page, errors = open_page(browser, url)
    list_line(page, line, n)
    return page, errors


def recorded_on(url: str, line: str, n: int) -> list[dict]:
    """The records of ``line``, newest first, once ``n`` are there (they are written off the request path)."""
    items: list[dict] = []
    for _ in range(50):
        items = httpx.get(f"{url}/inspections", params={"line": line}).json()["items"]
        if len(items) >= n:
            break
        time.sleep(0.1)
    return items


def defect_png(seed: int) -> bytes:
    return png_bytes(add_defect(textured_part(np.random.default_rng(seed)), 64, 40)[0])


def parts_recorded(url: str, line: str, parts: tuple[tuple[str, int], ...]) -> list[dict]:
    """Each ``(part id, seed)`` scored as a defect on ``line`` (each placed on the map), and their records, newest
    first."""
    for name, seed in parts:
        r = httpx.post(f"{url}/score", params={"line": line, "part_id": name}, files={"file": (name, defect_png(seed))},
                       timeout=30)
        assert r.status_code == 200 and r.json()["embedding"] is not None
    return recorded_on(url, line, len(parts))


def twelve_bit_models(tmp_path: Path, model_dir: Path) -> Path:
    """A models directory holding the session's part model as if fitted on 12-bit photos."""
    from conftest import write_manifest

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    manifest = json.loads((models / "part" / "manifest.json").read_text())
    manifest["preprocessing"]["bit_depth"] = 12  # fitted on 12-bit photos
    write_manifest(models / "part", manifest)
    return models


def recorded_defect(url: str, part: str, seed: int) -> None:
    """Score a defect photo as part ``part`` and wait for its record, which is written off the request path."""
    r = httpx.post(f"{url}/score", params={"part_id": part}, files={"file": ("x.png", defect_png(seed))}, timeout=30)
    assert r.status_code == 200 and r.json()["is_anomaly"]
    for _ in range(50):
        if httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"]:
            return
        time.sleep(0.1)


def _history_of(page, part: str) -> None:
    """The page's History, filtered to one part id, which names one record."""
    page.click("#tab-history")
    page.fill("#h-part_id", part)
    page.click("#hfilters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#hlist li').length === 1", timeout=10000)


def _teach_from_queue(browser, url: str) -> tuple:
    """The page opened by reviewer m.keller, who teaches the model the parts the queue offers (the confirmation
    accepted); returns ``(page, errors)`` once the teaching is asked for, its answer not waited on."""
    page, errors = open_page(browser, url)
    page.fill("#reviewer", "m.keller")
    page.click("#tab-queue")
    page.wait_for_selector("#teach:not([hidden])", timeout=10000)
    page.once("dialog", lambda d: d.accept())
    page.click("#teach-go")
    return page, errors


def _lamp_parts_taught(browser, url: str) -> tuple:
    """The two lamp parts (:func:`_lamp_parts_reviewed_good`) taught from the queue; ``(page, errors)`` once learnt."""
    _lamp_parts_reviewed_good(url)
    page, errors = _teach_from_queue(browser, url)
    page.wait_for_function("document.getElementById('teach-said').textContent.includes('2 parts learnt')",
                           timeout=60000)
    return page, errors


def _lamp_parts_reviewed_good(url: str) -> None:
    """Two good parts under a new lamp, which the model flags, scored on line L1 and reviewed good by qa: the
    queue then offers to teach them."""
    rng = np.random.default_rng(7)
    for name in ("lamp-1", "lamp-2"):
        photo = np.clip(textured_part(rng).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8)
        r = httpx.post(f"{url}/score", params={"part_id": name, "line": "L1"},
                       files={"file": (name, png_bytes(photo))}, timeout=30)
        assert r.status_code == 200 and r.json()["is_anomaly"], name
    for item in recorded_on(url, "L1", 2):
        r = httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good"},
                       headers={"X-Reviewer": "qa"})
        assert r.status_code == 200, r.text


def test_station_scores_lists_and_reviews_a_part(browser, server, tmp_path):
    url, _ = server
    tag = uuid.uuid4().hex[:8]  # the session's records are shared with other test modules: find ours by it
    bad, good, notes = tmp_path / "bad.png", tmp_path / "good.png", tmp_path / "notes.png"
    bad.write_bytes(defect_png(8))
    good.write_bytes(png_bytes(textured_part(np.random.default_rng(9))))
    notes.write_bytes(b"this is not an image")

    page, errors = open_page(browser, url)
    # live view: the part's fields go with the photo; decision, score, model, boxes and overlay come back
    page.fill("#line", f"line-{tag}")
    page.fill("#station", "cam-top")
    page.fill("#part_id", f"GOOD-{tag}")
    page.set_input_files("#file", str(good))
    page.wait_for_function("document.getElementById('decision').textContent === 'normal'", timeout=30000)
    # a normal part: no region to explain, but its place among the training images shows
    page.wait_for_selector("#embfig:not([hidden])", timeout=10000)
    assert page.is_hidden("#evidence")
    page.fill("#part_id", f"BAD-{tag}")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
    assert float(page.inner_text("#nscore")) > 1.0
    assert page.inner_text("#rmodel") == "part" and page.inner_text("#rversion")
    assert "⚠" in page.inner_text("#verdictbox")  # not color alone
    page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
    assert page.evaluate("[document.getElementById('overlay').naturalWidth, "
                         "document.getElementById('overlay').naturalHeight]") == [128, 128]
    page.wait_for_function("document.getElementById('photo') && document.getElementById('photo').naturalWidth > 0")
    boxes = page.locator("#livephoto .box")
    assert boxes.count() >= 1 and page.locator("#regions tr").count() == boxes.count() + 1
    box = boxes.first.bounding_box()
    photo = page.locator("#photo").bounding_box()
    assert box["width"] > 2 and photo["x"] <= box["x"] and box["x"] + box["width"] <= photo["x"] + photo["width"] + 1
    # why flagged: each region beside the closest good region seen in training, its matching patch boxed
    page.wait_for_selector("#evidence:not([hidden])", timeout=10000)
    page.wait_for_function("(() => { const i = document.querySelector('#evlist .train-thumb');"
                           " return i && i.naturalWidth === 128; })()", timeout=10000)
    pairs = page.locator("#evlist .evpair")
    assert pairs.count() == boxes.count()
    caption = pairs.first.locator("figure.nearest figcaption").inner_text()
    assert caption.startswith("closest good region seen in training: image[")  # the session model's names
    for side in ("figure:not(.nearest) .pic", "figure.nearest .pic"):
        pic, mark = pairs.first.locator(side), pairs.first.locator(f"{side} .box")
        assert mark.count() == 1
        outer, inner = pic.bounding_box(), mark.bounding_box()
        assert inner["width"] > 2
        assert outer["x"] - 1 <= inner["x"] <= inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 1
    # the good region is framed as the region is (the session's photos and training images are one size): the same
    # extent of the part, side by side at one scale; a button shows the whole training image and goes back
    near, region = pairs.first.locator("figure.nearest .pic"), pairs.first.locator(".crop").first
    shape = lambda loc: (lambda b: b["width"] / b["height"])(loc.bounding_box())  # noqa: E731
    assert shape(near) == pytest.approx(shape(region), rel=0.02)
    toggle = pairs.first.locator("figure.nearest button")
    assert toggle.inner_text() == "Whole image"
    toggle.click()
    assert toggle.inner_text() == "Close-up" and shape(near) == pytest.approx(1.0, rel=0.02)
    outer, inner = near.bounding_box(), near.locator(".box").bounding_box()
    assert outer["y"] - 1 <= inner["y"] <= inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1
    toggle.click()
    assert toggle.inner_text() == "Whole image" and shape(near) == pytest.approx(shape(region), rel=0.02)
    # where the part falls among the training images: every training image a dot, the part marked
    assert page.locator("#embmap circle.train, #embmap circle.cited").count() == 14
    assert page.locator("#embmap circle.cited").count() >= 1 and page.locator("#embpart").count() == 1
    assert "this part" in page.inner_text("#embmap") and "training images" in page.inner_text("#embcap")
    page.locator("#evidence").scroll_into_view_if_needed()
    shot(page, tmp_path, "live_evidence", "/tmp/page_evidence.png")
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, tmp_path, "live", "/tmp/page_live.png")
    page.set_viewport_size(PHONE)
    shot(page, tmp_path, "live_phone")
    page.set_viewport_size(DESKTOP)

    # a non-image: the service's detail is shown
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.includes('415')", timeout=30000)
    assert "not_image" in page.inner_text("#error")

    # history: both parts, newest first, the defect with its thumbnail, the good one says why it has none
    page.click("#tab-history")
    page.fill("#h-line", f"line-{tag}")
    page.click("#hfilters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#hlist li').length === 2", timeout=10000)
    rows = page.locator("#hlist li")
    assert f"BAD-{tag}" in rows.nth(0).inner_text() and f"GOOD-{tag}" in rows.nth(1).inner_text()
    page.wait_for_function("(() => { const i = document.querySelector('#hlist li .thumb img');"
                           " return i && i.naturalWidth === 128; })()", timeout=10000)
    assert "not kept" in rows.nth(1).locator(".thumb").inner_text()
    # the defect opened shows its evidence; the good part opened after it shows none of the defect's
    rows.nth(0).locator("button").click()
    page.wait_for_selector("#d-evidence:not([hidden])", timeout=10000)
    rows.nth(1).locator("button").click()
    page.wait_for_function("document.getElementById('d-title').innerText.includes('normal')", timeout=10000)
    assert page.is_hidden("#d-evidence")
    # a picture URL that answers 404 (not kept) or 410 (retention) becomes a placeholder that says why
    good_id = httpx.get(f"{url}/inspections", params={"part_id": f"GOOD-{tag}"}).json()["items"][0]["id"]
    assert page.evaluate(f"picture('inspections/{good_id}/image', 'x').then((p) => p.textContent)") == "photo not kept"
    page.select_option("#h-decision", "anomaly")
    page.click("#hfilters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#hlist li').length === 1", timeout=10000)
    shot(page, tmp_path, "history")

    # review queue: our anomaly is the newest unreviewed one; D reviews it and moves on to the next part
    page.fill("#reviewer", "t.tester")
    page.click("#tab-queue")
    page.wait_for_function(f"document.querySelector('#qlist li') && "
                           f"document.querySelector('#qlist li').innerText.includes('BAD-{tag}')", timeout=10000)
    page.wait_for_selector("#d-photo img", timeout=10000)
    assert page.locator("#d-photo .box").count() >= 1
    page.wait_for_function("document.getElementById('d-photocap').textContent.endsWith('boxed')", timeout=10000)
    # where the reviewer decides, each region beside the closest good region, cropped from the stored photo
    page.wait_for_selector("#d-evidence:not([hidden])", timeout=10000)
    page.wait_for_function("(() => { const i = document.querySelector('#d-evlist .train-thumb');"
                           " return i && i.naturalWidth === 128; })()", timeout=10000)
    assert page.locator("#d-evlist .evpair").count() == page.locator("#d-photo .box").count()
    assert page.get_attribute("#d-evlist .crop img", "src") == page.get_attribute("#d-photo img", "src")
    page.wait_for_selector("#d-overlay img", timeout=10000)
    # the review history arrives after the pictures (a second request): wait for it rather than race it
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    shot(page, tmp_path, "queue_before")
    page.fill("#note", "scratch near the edge")
    page.locator("#detail").click(position={"x": 5, "y": 5})  # leave the note field: shortcuts are off while typing
    page.keyboard.press("d")
    page.wait_for_function("document.querySelector('#qlist li').innerText.includes('real defect')", timeout=10000)
    record = httpx.get(f"{url}/inspections", params={"part_id": f"BAD-{tag}"}).json()["items"][0]
    assert record["verdict"] == "defect"
    full = httpx.get(f"{url}/inspections/{record['id']}").json()
    assert [(r["reviewer"], r["note"]) for r in full["reviews"]] == [("t.tester", "scratch near the edge")]
    assert page.locator("#qlist li button").nth(0).get_attribute("aria-current") is None  # moved to the next one
    page.keyboard.press("k")  # back: its review history shows
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('t.tester')", timeout=10000)
    assert "scratch near the edge" in page.inner_text("#d-reviews")
    # a row clicked, then J: the keyboard focus moves with the selection (it stayed on the clicked row)
    page.locator("#qlist li button").nth(0).click()
    page.keyboard.press("j")
    page.wait_for_function("document.querySelector('#qlist li:nth-child(2) button[aria-current]')", timeout=10000)
    assert page.evaluate("document.activeElement.getAttribute('aria-current')") == "true"
    page.keyboard.press("k")
    page.wait_for_function("document.querySelector('#qlist li:nth-child(1) button[aria-current]')", timeout=10000)
    assert page.evaluate("document.activeElement.getAttribute('aria-current')") == "true"
    # its ring shows whole: drawn inside the row, since the list's scroll box clipped a ring drawn outside it
    assert page.evaluate("(() => { const e = document.activeElement; return e.matches(':focus-visible')"
                         " && parseFloat(getComputedStyle(e).outlineOffset) < 0; })()")
    shot(page, tmp_path, "queue", "/tmp/page_queue.png")
    page.set_viewport_size(PHONE)
    shot(page, tmp_path, "queue_phone")
    assert not page.is_hidden("#tab-history") and page.is_hidden("#drift")
    assert unexpected(errors, 415, 404) == []


def test_the_live_view_says_why_a_score_may_not_mean_what_the_threshold_says(browser, server, tmp_path):
    """A photo three times the training photos' size is flagged whole: the answer's warning (a camera change) shows
    under the decision, where the operator reads it; the next photo, of the usual size, clears it."""
    url, _ = server
    wide, good = tmp_path / "wide.png", tmp_path / "good.png"
    wide.write_bytes(png_bytes(textured_part(np.random.default_rng(31), 128, 384)))
    good.write_bytes(png_bytes(textured_part(np.random.default_rng(32))))
    page, errors = open_page(browser, url)
    page.set_input_files("#file", str(wide))
    page.wait_for_selector("#warnings:not([hidden])", timeout=30000)
    assert "384 px on its longer side" in page.inner_text("#warnings") and "re-fit" in page.inner_text("#warnings")
    shot(page, tmp_path, "warning")
    # flagged whole, its box starts at the photo's top edge: the region's number sits inside the photo, not over
    # the model's name above it
    label, photo = page.locator("#livephoto .box span").first.bounding_box(), page.locator("#livephoto").bounding_box()
    assert photo["y"] <= label["y"] and label["y"] + label["height"] <= photo["y"] + photo["height"]
    page.set_input_files("#file", str(good))
    page.wait_for_function("document.getElementById('warnings').hidden", timeout=30000)
    # a multi-page TIFF: which of its pages was scored is said where the decision is read
    from PIL import Image

    stack = tmp_path / "stack.tif"
    Image.open(good).save(stack, save_all=True, append_images=[Image.open(wide)])
    page.set_input_files("#file", str(stack))
    page.wait_for_selector("#warnings:not([hidden])", timeout=30000)
    assert "2 frames" in page.inner_text("#warnings") and "frame 1 (the first" in page.inner_text("#warnings")
    assert unexpected(errors) == []


def test_pictures_of_a_twelve_bit_photo_are_drawn_as_its_model_reads_it(browser, model_dir, tmp_path):
    """A 12-bit camera's photo in a 16-bit PNG: the browser draws the file near black (4095 of 65535) and a TIFF not
    at all, so the live photo, its boxes and the region crops are the photo as the model read it (the answer's
    `photo`); an 8-bit PNG, which the browser shows as the model reads it, is shown from the file itself.

    Such a part in the history: its thumbnail and photo are drawn as the model reads them. The model is re-fitted to
    read all 16 bits (the same photo is then near black); the operator reloads the page: the browser shows the new
    drawings, not the ones it cached for good under the same URLs."""
    import io

    from PIL import Image

    from anomaly_service.images import ImageLimits, load_image
    from conftest import write_manifest

    models = twelve_bit_models(tmp_path, model_dir)
    bad = add_defect(textured_part(np.random.default_rng(41)), 64, 40)[0]
    grey = np.asarray(Image.fromarray(bad).convert("L"), np.float64)
    buf = io.BytesIO()
    Image.fromarray(np.round(grey / 255 * 4095).astype(np.uint16)).save(buf, format="PNG")
    (tmp_path / "mono.png").write_bytes(buf.getvalue())
    (tmp_path / "part.tiff").write_bytes(png_bytes(bad, format="TIFF"))
    (tmp_path / "part.png").write_bytes(png_bytes(bad))
    model_reads = load_image(buf.getvalue(), ImageLimits(bit_depth=12))
    assert model_reads.mean() > 60 > 16 > load_image(buf.getvalue()).mean()  # a browser: a sixteenth of white
    mean = ("(s) => { const i = document.querySelector(s), c = document.createElement('canvas');"
            " c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0);"
            " const d = g.getImageData(0, 0, c.width, c.height).data; let t = 0;"
            " for (let k = 0; k < d.length; k += 4) t += d[k]; return t / (d.length / 4); }")
    # records of its own: the session's servers share one data directory, whose newest part is another test's
    url, proc = launch_server(models, tmp_path / "server.log", "--keep-images", "all", "--data-dir",
                              str(tmp_path / "data"))
    try:
        page, errors = open_page(browser, url)
        for name in ("mono.png", "part.tiff", "part.png"):
            page.evaluate("document.getElementById('decision').textContent = ''")
            page.set_input_files("#file", str(tmp_path / name))
            page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
            page.wait_for_function("(() => { const i = document.getElementById('photo');"
                                   " return i && i.complete && i.naturalWidth === 128; })()", timeout=10000)
            assert page.locator("#livephoto .box").count() >= 1
            shown = page.evaluate(mean, "#photo")
            want = model_reads[..., 0].mean() if name == "mono.png" else bad[..., 0].mean()
            assert abs(shown - want) < 2, (name, shown, want)
            src = page.get_attribute("#photo", "src")
            assert src.startswith("blob:" if name == "part.png" else "data:image/png")
            page.wait_for_selector("#evidence:not([hidden])", timeout=10000)
            assert page.get_attribute("#evlist .crop img", "src") == src  # the region crops: the same picture
            if name == "mono.png":
                shot(page, tmp_path, "mono", "/tmp/page_mono.png")
        assert unexpected(errors) == []
        # closed: on Live it would show the part scored next, drawing its photo and overlay beside History's
        page.close()

        grey = np.asarray(Image.fromarray(bad).convert("L").resize((400, 300)), np.float64)
        buf = io.BytesIO()
        Image.fromarray(np.round(grey / 255 * 4095).astype(np.uint16)).save(buf, format="PNG")
        r = httpx.post(f"{url}/score", params={"part_id": "MONO"}, files={"file": ("m.png", buf.getvalue())},
                       timeout=60)
        assert r.status_code == 200
        deadline = time.time() + 10  # the record is written off the request path
        while [i["part_id"] for i in httpx.get(f"{url}/inspections").json()["items"][:1]] != ["MONO"]:
            assert time.time() < deadline
            time.sleep(0.1)
        page, errors = open_page(browser, url)

        def drawn() -> tuple[float, float]:
            page.click("#tab-history")
            page.wait_for_function("(() => { const i = document.querySelector('#hlist li .thumb img');"
                                   " return i && i.complete && i.naturalWidth === 256; })()", timeout=20000)
            page.wait_for_function("(() => { const i = document.querySelector('#d-photo img');"
                                   " return i && i.complete && i.naturalWidth === 400; })()", timeout=20000)
            return page.evaluate(mean, "#hlist li .thumb img"), page.evaluate(mean, "#d-photo img")

        thumb, photo = drawn()
        assert thumb > 60 and photo > 60  # 12 bits: the part as the model reads it, not black
        # every thumbnail drawn: one still drawing when the page reloads holds its place on the picture thread
        page.wait_for_function("[...document.querySelectorAll('#hlist li .thumb')].every((t) => {"
                               " const i = t.querySelector('img'); return i && i.complete; })", timeout=20000)
        manifest = json.loads((models / "part" / "manifest.json").read_text())
        manifest["preprocessing"]["bit_depth"] = 16  # re-fitted: photos read against all 16 bits
        write_manifest(models / "part", manifest)
        assert httpx.post(f"{url}/models/part/reload", timeout=60).status_code == 200
        page.reload()
        page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)
        thumb, photo = drawn()
        assert thumb < 20 and photo < 20, (thumb, photo)  # what the model reads now, not the browser's old copy
        assert unexpected(errors) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_drift_banner_and_a_server_that_records_nothing(browser, server_with, tmp_path):
    # a small window and a loose alpha: the session model holds out only four calibration images
    url, _ = server_with("--record", "false", "--drift-window", "10", "--drift-min-parts", "5",
                         "--drift-alpha", "0.05")
    page, errors = open_page(browser, url)
    page.wait_for_selector("#recnote:not([hidden])", timeout=10000)
    assert "--record false" in page.inner_text("#recnote")
    assert page.is_hidden("#tab-history") and page.is_hidden("#tab-queue") and page.is_hidden("#drift")

    rng = np.random.default_rng(5)
    for _ in range(7):  # the line changes: brighter parts
        bright = np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)
        assert httpx.post(f"{url}/score", files={"file": ("x.png", png_bytes(bright))}, timeout=30).status_code == 200
    assert httpx.get(f"{url}/models/part/drift").json()["alarm"]
    bright_file = tmp_path / "bright.png"
    bright_file.write_bytes(png_bytes(np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)))
    page.set_input_files("#file", str(bright_file))  # each scoring asks for drift
    page.wait_for_selector("#drift:not([hidden])", timeout=30000)
    assert "Line drift" in page.inner_text("#drift") and "training images" in page.inner_text("#drift")
    words = {"normalized_score": "mostly in the scores", "typical_distance": "mostly in the typical patch distance",
             "feature_distance": "mostly in the whole image's features"}
    drift = httpx.get(f"{url}/models/part/drift").json()
    assert words[drift["driven_by"]] in page.inner_text("#drift")  # the quantity the server says drives the alarm
    shot(page, tmp_path, "drift")
    # a quantity of a few parts with the largest statistic: the banner named it; it names the one the server names,
    # and none when the server names none
    few = {**drift, "statistics": {**drift["statistics"], "feature_distance": 1.0, "typical_distance": 0.8},
           "quantity_parts": {**drift["quantity_parts"], "feature_distance": 3}, "driven_by": "typical_distance"}
    for parts, answer, said in ((901, few, words["typical_distance"]),
                                (902, {**few, "driven_by": None}, "over 902 parts; median"),
                                # parts compressed harder than the good photos: the server's words, not the camera
                                (903, {**few, "compression": "7 of the window's 10 parts were JPEGs"},
                                 words["typical_distance"])):
        page.route("**/models/part/drift",
                   (lambda body: lambda route: route.fulfill(json=body))({**answer, "parts": parts}))
        page.click("#refresh")  # the model list is read again, and drift with it
        page.wait_for_function(f"document.getElementById('drift').textContent.includes('over {parts} parts')",
                               timeout=10000)
        assert said in page.inner_text("#drift") and words["feature_distance"] not in page.inner_text("#drift")
        compressed = answer.get("compression")
        assert (compressed or "Check the camera") in page.inner_text("#drift")
        assert compressed is None or "Check the camera" not in page.inner_text("#drift")
        page.unroute("**/models/part/drift")
    # a drift read that fails says nothing of the line: the banner hid while the alarm was on; the last answer stands
    said = page.inner_text("#drift")
    page.route("**/models/part/drift", lambda route: route.fulfill(status=500, json={"error": "internal_error",
                                                                                      "detail": "x"}))
    page.evaluate("() => checkDrift()")  # the page's own drift check, waited for to its end
    assert page.is_visible("#drift") and page.inner_text("#drift") == said
    page.unroute("**/models/part/drift")
    # the Model view needs no records: it is there, says the line drifts, and stays when the records are asked again
    page.click("#tab-modelview")
    page.wait_for_selector("#m-versions tbody tr", timeout=10000)
    assert "ALARM" in page.inner_text("#m-facts")
    page.evaluate("async () => { await probeRecords(); }")
    assert page.is_visible("#modelview") and page.is_hidden("#live")
    # recording off: the only failed loads are the probe's 503 answers (and the drift read failed on purpose)
    assert unexpected(errors, 503, 500) == []


def test_a_part_flagged_for_its_layout_says_so(browser, tmp_path_factory, tmp_path):
    """On a part with a layout the default fit fuses the whole-image branch; a board whose lug is missing is flagged
    and the page says the part's layout differs (and, where the patches alone look normal, that it was flagged for
    its layout only). The part's record says so too: its detail in History lists each opinion against its own
    threshold, where it showed the kNN's score and threshold alone beside the fused decision, and Live says why of
    a part the line recorded as of an upload."""
    from anomaly_service import AnomalyModel

    rng = np.random.default_rng(5)
    models = tmp_path_factory.mktemp("layout_models")
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=SIDE, coreset_ratio=0.25, progress=False,
                         device="cpu", ae_epochs=20).fit([board(rng) for _ in range(24)])
    assert model.autoencoder_ is not None  # the default: the branch where the part has a layout
    model.save(models / "part")
    missing = tmp_path / "missing.png"
    missing.write_bytes(png_bytes(board(np.random.default_rng(77), lug_at="none")))
    url, proc = launch_server(models, tmp_path / "server.log")
    try:
        page, errors = open_page(browser, url)
        tag = f"LUG-{uuid.uuid4().hex[:8]}"  # the session's records are shared: find ours by it
        page.fill("#part_id", tag)
        page.set_input_files("#file", str(missing))
        page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
        assert "the part's layout" in page.inner_text("#why")
        shot(page, tmp_path, "layout", "/tmp/page_layout.png")
        for _ in range(50):  # the record is written off the request path
            if httpx.get(f"{url}/inspections", params={"part_id": tag}).json()["items"]:
                break
            time.sleep(0.1)
        _history_of(page, tag)
        page.wait_for_function("document.getElementById('d-meta').innerText.includes('Whole-image branch')",
                               timeout=10000)
        facts = page.inner_text("#d-meta")
        assert "Why flagged" in facts and "the part's layout" in facts and "kNN (each patch)" in facts, facts
        recorded = httpx.get(f"{url}/inspections", params={"part_id": tag}).json()["items"][0]["scorers"]
        assert f"threshold {recorded['autoencoder']['threshold']:.4f}" in facts, facts
        shot(page, tmp_path, "layout_history", "/tmp/page_layout_history.png")
        # a part the line records shows in Live as an upload does, and says why from its record
        page.click("#tab-live")
        page.evaluate("document.getElementById('why').textContent = ''")
        line_part = f"LINE-{tag}"
        assert httpx.post(f"{url}/score", params={"part_id": line_part}, timeout=30,
                          files={"file": ("m.png", missing.read_bytes())}).json()["is_anomaly"]
        page.wait_for_function(f"document.getElementById('rpart').textContent.includes('{line_part}')",
                               timeout=15000)
        assert "the part's layout" in page.inner_text("#why")
        # the three cases of the line, as the page words them (at this size the kNN also sees the missing lug)
        ask = ("(s) => whyFlagged({is_anomaly: true, scorers: {knn: {is_anomaly: s[0]}, "
               "autoencoder: {is_anomaly: s[1], reads: 'layout'}}})")
        assert "flagged for the part's layout" in page.evaluate(ask, [False, True])
        assert "both differ" in page.evaluate(ask, [True, True])
        assert page.evaluate(ask, [True, False]) == ""
        # a feature autoencoder's alarm is about patches: the page never blames the layout for it
        assert page.evaluate("whyFlagged({is_anomaly: true, scorers: {knn: {is_anomaly: false}, "
                             "autoencoder: {is_anomaly: true, reads: 'patches'}}})") == ""
        assert page.evaluate("whyFlagged({is_anomaly: true})") == ""  # a model without the branch
        assert not unexpected(errors)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_the_lists_show_thumbnails_not_full_size_photos(browser, server, tmp_path):
    """History and queue rows downloaded each recorded photo at full size (5-20 MP from a line camera) for a 56 px
    picture and kept hundreds of them in the tab. The rows ask for the server's small /thumbnail; only the part the
    operator opens is fetched at full size."""
    from PIL import Image

    url, _ = server
    line = f"thumbs-{uuid.uuid4().hex[:8]}"
    ids = []
    for seed in (51, 52, 53):  # larger than any thumbnail; flagged (another size than training), so kept
        big = np.asarray(Image.fromarray(add_defect(textured_part(np.random.default_rng(seed)), 64, 40)[0])
                         .resize((600, 400)))
        r = httpx.post(f"{url}/score", params={"line": line}, files={"file": ("x.png", png_bytes(big))}, timeout=60)
        assert r.status_code == 200 and r.json()["is_anomaly"]
    ids = [i["id"] for i in recorded_on(url, line, 3)]
    assert len(ids) == 3
    page, errors = open_page(browser, url)
    asked: list[str] = []
    page.on("request", lambda req: asked.append(req.url))
    list_line(page, line, 3)
    page.wait_for_function("[...document.querySelectorAll('#hlist li .thumb img')].filter((i) => i.complete"
                           " && i.naturalWidth === 256).length === 3", timeout=20000)
    page.wait_for_selector("#d-photo img", timeout=10000)  # the first part opens: its photo at full size
    # ours only: the tab first lists every record of the session (unfiltered), then ours
    # (the overlay is asked for at the screen's size: its query says so; the path says what it is)
    ours = [u.split("/inspections/")[1].split("?")[0] for u in asked if any(f"/inspections/{i}/" in u for i in ids)]
    assert {p for p in ours if p.endswith("/thumbnail")} == {f"{i}/thumbnail" for i in ids}
    assert {p for p in ours if not p.endswith(("/thumbnail", "/overlay.png"))} == {f"{ids[0]}/display"}
    # the overlay drawn at most the screen's longer side in device pixels: a line camera's photo's is not drawn whole
    side = page.evaluate("Math.ceil(Math.max(screen.width, screen.height) * (window.devicePixelRatio || 1))")
    assert any(u.endswith(f"/inspections/{ids[0]}/overlay.png?max_side={side}") for u in asked)
    assert page.evaluate("blobBytes") <= page.evaluate("BLOB_BUDGET")
    shot(page, tmp_path, "history_thumbnails")
    assert unexpected(errors) == []


def test_two_operators_on_one_queue_never_overwrite_each_other_unseen(browser, server, tmp_path):
    """Two browser tabs on the review queue: ann marks the newest part a real defect; bob, whose tab still shows it
    unreviewed, presses G: nothing is saved, his tab shows ann's verdict and says so; pressing G again replaces it."""
    url, _ = server
    part = f"TWO-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, part, 21)
    tabs = {}
    for who in ("ann", "bob"):  # each new page is its own browser context: its own reviewer name
        page, errors = open_page(browser, url)
        page.fill("#reviewer", who)
        page.click("#tab-queue")
        page.wait_for_function(f"document.querySelector('#qlist li') && "
                               f"document.querySelector('#qlist li').innerText.includes('{part}')", timeout=10000)
        page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                               timeout=10000)
        page.locator("#detail").click(position={"x": 5, "y": 5})
        tabs[who] = (page, errors)
    ann, bob = tabs["ann"][0], tabs["bob"][0]
    ann.keyboard.press("d")
    ann.wait_for_function("document.querySelector('#qlist li').innerText.includes('real defect')", timeout=10000)
    bob.keyboard.press("g")
    bob.wait_for_function("document.getElementById('error').textContent.includes('ann reviewed this part')",
                          timeout=10000)
    record = httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"][0]
    full = httpx.get(f"{url}/inspections/{record['id']}").json()
    assert full["verdict"] == "defect" and [x["reviewer"] for x in full["reviews"]] == ["ann"]
    assert "real defect" in bob.locator("#qlist li").first.inner_text()  # his list shows ann's verdict
    assert bob.locator("#qlist li button").first.get_attribute("aria-current") == "true"  # still on that part
    bob.wait_for_function("document.getElementById('d-reviews').innerText.includes('ann')", timeout=10000)
    shot(bob, tmp_path, "queue_overtaken")
    bob.keyboard.press("g")  # having seen it, bob replaces ann's verdict on purpose
    bob.wait_for_function("document.querySelector('#qlist li').innerText.includes('actually good')", timeout=10000)
    full = httpx.get(f"{url}/inspections/{record['id']}").json()
    assert full["verdict"] == "good" and [x["reviewer"] for x in full["reviews"]] == ["ann", "bob"]
    assert unexpected(tabs["ann"][1]) == [] and unexpected(tabs["bob"][1], 409) == []


def test_a_page_left_open_says_when_the_service_is_gone_and_recovers_by_itself(browser, model_dir, tmp_path):
    """The page's 30 s poll: a station whose service had no model when the page opened picks one up once it is
    fitted, says when the service stops answering, and clears that once the service is back on its port."""
    models = tmp_path / "models"
    models.mkdir()
    url, proc = launch_server(models, tmp_path / "server.log", "--reload-interval", "1", ready="/healthz")
    port = int(url.rsplit(":", 1)[1])
    try:
        page = browser.new_page(viewport=DESKTOP, bypass_csp=True)  # string waits use eval()
        page.clock.install()  # the poll's 30 s pass at once
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('error').textContent.includes('No model is loaded')",
                               timeout=15000)
        shutil.copytree(model_dir / "part", models / "part")
        deadline = time.time() + 30
        while not httpx.get(f"{url}/models").json()["models"]:  # the service's own reload
            assert time.time() < deadline
            time.sleep(0.2)
        page.clock.run_for(30_000)
        page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)
        page.wait_for_function("document.getElementById('error').textContent === ''", timeout=15000)

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        page.clock.run_for(30_000)
        page.wait_for_function("document.getElementById('error').textContent.includes('does not answer')",
                               timeout=15000)
        shot(page, tmp_path, "service_gone")
        url, proc = launch_server(models, tmp_path / "server2.log", port=port)
        page.clock.run_for(30_000)
        page.wait_for_function("document.getElementById('error').textContent === ''", timeout=15000)
        assert page.is_hidden("#recnote") and not page.is_hidden("#tab-queue")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_the_page_says_the_models_are_loading_while_the_service_loads_them(browser, model_dir, tmp_path):
    """``anomaly serve`` answers the page before its models are loaded, and the page's model list waits for them:
    the page stood with an empty selector and no word of why. It now says how far the loading is (held here by a
    save's lock, as in test_many_models.py), and the models, and no notice, once they are in."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    (models / ".part.tmp-held").mkdir()  # what a save under way has beside the model
    with flock_held_elsewhere(models / ".part.swap-lock"):
        url, proc = launch_server(models, tmp_path / "server.log", "--record", "false", ready="/healthz")
        try:
            page = browser.new_page(viewport=DESKTOP, bypass_csp=True)  # string waits use eval()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('error').textContent.includes("
                                   "'loading the models at start-up')", timeout=15000)
            shot(page, tmp_path, "models_loading")
        except BaseException:
            proc.kill()  # a stop waits for the load in hand, which waits for the held save
            proc.wait()
            raise
    try:  # the save is done: the loading ends
        page.wait_for_selector("#model option[value=part]", state="attached", timeout=60000)
        page.wait_for_function("document.getElementById('error').textContent === ''", timeout=15000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_the_model_selector_follows_variants_added_and_removed_on_the_server(browser, model_dir, tmp_path):
    """A plant's twenty variants on one service: one added on the server shows in the selector at the next poll,
    and an operator whose variant was removed is not left scoring on the list's first model unsaid: the page
    picks the default model and says so."""
    models = tmp_path / "models"
    for name in ("part", "zinc", "brass"):
        shutil.copytree(model_dir / "part", models / name)
    (models / "brass" / "manifest.json").write_text("{")  # a model whose files do not load
    url, proc = launch_server(models, tmp_path / "server.log", "--default-model", "part", "--record", "false")
    try:
        page = browser.new_page(viewport=DESKTOP, bypass_csp=True)  # string waits use eval()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.clock.install()  # the poll's 30 s pass at once
        page.goto(url + "/")
        page.wait_for_selector("#model option[value=zinc]", state="attached", timeout=15000)
        # the model whose files do not load is said on the page, not only missing from the list
        assert page.is_visible("#models-notice") and "Model brass is not served" in page.text_content("#models-notice")
        page.select_option("#model", "zinc")
        page.click("#tab-modelview")  # an engineer looking at zinc's versions when it goes
        page.wait_for_function("document.getElementById('m-title').textContent === 'Model zinc'", timeout=10000)
        shutil.copytree(model_dir / "part", models / "alloy")
        shutil.rmtree(models / "zinc")
        assert httpx.post(f"{url}/models/reload").json()["changes"] == {"alloy": "loaded", "zinc": "removed"}
        page.clock.run_for(30_000)
        page.wait_for_selector("#model option[value=alloy]", state="attached", timeout=15000)
        assert page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)") == ["alloy", "part"]
        assert page.input_value("#model") == "part"
        assert "Model zinc is no longer served" in page.text_content("#error")
        page.wait_for_function("document.getElementById('m-title').textContent === 'Model part'", timeout=10000)
        assert "part" in page.eval_on_selector("#h-model", "s => [...s.options].map(o => o.value)")
        page.select_option("#model", "alloy")  # the operator picks: the notice has done its work
        assert page.text_content("#error") == ""
        # a served model whose new files do not load, and a model directory that does not answer (as GET /models
        # says them: the page has no other way to hear of either)
        page.evaluate("""applyModels({models: [{name: "part", backbone: "b", bank_size: 1}], default: "part",
                                      errors: {part: "bad manifest"}, directory_stuck: "2026-01-02T03:04:05Z"})""")
        notice = page.text_content("#models-notice")
        assert "the version loaded before keeps scoring" in notice and "has not answered since" in notice
        page.evaluate('applyModels({models: [{name: "part", backbone: "b", bank_size: 1}], default: "part", '
                      'errors: {}})')
        assert not page.is_visible("#models-notice")
        # no model left: the view keeps nothing of the last one shown, as if it still served
        page.evaluate('(async () => { applyModels({models: [], default: null, errors: {}}); await showModel(); })()')
        assert page.text_content("#m-title") == "No model is loaded" and page.text_content("#m-versions") == ""
        assert not unexpected(errors)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_flagged_part_fits_a_narrow_window(browser, server, tmp_path):
    """At 320 CSS px (a phone, or a window zoomed to 400%) the live view of a flagged part, its table of regions
    included, fits the width: nothing needs scrolling sideways."""
    url, _ = server
    bad = tmp_path / "bad.png"
    bad.write_bytes(defect_png(33))
    page, errors = open_page(browser, url, {"width": 320, "height": 700})
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
    assert page.locator("#regions tr").count() >= 2
    page.wait_for_selector("#evidence:not([hidden])", timeout=10000)
    shot(page, tmp_path, "live_320")
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    assert unexpected(errors) == []


def test_the_tabs_keep_one_line_each_at_a_phones_usual_width(browser, server):
    """At 375 CSS px the review queue tab wrapped its label and count over two lines, a tab twice as tall as its
    neighbours' text; at 320 it may wrap, but the page still needs no sideways scrolling. Each of the longest counts
    the page writes is put in once the page's own count has landed (it wrote over the test's, which made the
    check depend on which came first, and a service with a hundred flagged parts says "(100+ flagged)")."""
    url, _ = server
    one_line = """() => { const r = document.createRange(); r.selectNodeContents(document.getElementById('tab-queue'));
        const rects = [...r.getClientRects()].filter(x => x.width > 0);
        return Math.max(...rects.map(x => x.top)) < Math.min(...rects.map(x => x.bottom)); }"""
    for width, single in ((375, True), (320, None)):
        page, errors = open_page(browser, url, {"width": width, "height": 700})
        page.wait_for_function("document.getElementById('qcount').textContent !== ''", timeout=15000)
        for count in ("(100+ flagged)", "(count unknown)"):
            page.evaluate(f"document.getElementById('qcount').textContent = '{count}'")
            if single:
                assert page.evaluate(one_line), (width, count)
            assert page.evaluate("document.documentElement.scrollWidth") <= width, (width, count)
        assert unexpected(errors) == []
        page.close()


def test_lists_whose_database_goes_away_say_so_and_load_again(browser, model_dir, postgres_url, tmp_path):
    """The records database goes away (PostgreSQL refusing connections) while a list is open; one server for both
    lists.

    History: the list says it did not load and how to try again. It named "↻ Refresh", a button only the review
    queue has; History's is Apply. "Load more" beside the message keeps to one line.

    The queue: Refresh shows the service's 503 and says the list did not load, never "Nothing to review"; once the
    database is back, the queue loads again, with the part scored during the outage (recorded from the buffer). Its
    photo was not kept (--keep-images none): the caption said "Photo, 1 region(s) boxed" beside the placeholder; it
    says no boxes."""
    url, proc = launch_server(model_dir, tmp_path / "server.log", "--database-url", postgres_url,
                              "--keep-images", "none")
    try:
        page, errors = open_page(browser, url)
        page.click("#tab-history")
        page.wait_for_function("document.getElementById('hinfo').textContent.includes('No inspection')", timeout=10000)
        allow_connections(postgres_url, False)
        try:
            page.click("#hfilters button[type=submit]")
            page.wait_for_function("document.getElementById('hinfo').textContent.includes('did not load')",
                                   timeout=30000)
            assert "Apply" in page.inner_text("#hinfo") and "Refresh" not in page.inner_text("#hinfo")
            more = page.locator("#hmore")
            lines = "(() => { const r = document.createRange();" \
                    " r.selectNodeContents(document.getElementById('hmore')); return r.getClientRects().length; })()"
            assert more.is_visible() and page.evaluate(lines) == 1, page.evaluate(lines)
        finally:
            allow_connections(postgres_url, True)
        assert unexpected(errors, 503) == []

        page, errors = open_page(browser, url)
        page.fill("#reviewer", "ann")
        page.click("#tab-queue")
        page.wait_for_function("document.getElementById('qinfo').textContent.includes('Nothing to review')",
                               timeout=10000)
        allow_connections(postgres_url, False)
        try:
            r = httpx.post(f"{url}/score", params={"part_id": "OUTAGE"}, files={"file": ("x.png", defect_png(51))},
                           timeout=30)
            assert r.status_code == 200  # scoring never waits for the database
            page.click("#qreload")
            page.wait_for_function("document.getElementById('error').textContent.includes('records_unavailable')",
                                   timeout=30000)
            assert "did not load" in page.inner_text("#qinfo")
            assert "Nothing to review" not in page.inner_text("#qinfo")
            page.evaluate("poll()")  # the page's 30 s poll: the tab's count kept its last number
            page.wait_for_function("document.getElementById('qcount').textContent === '(count unknown)'",
                                   timeout=10000)
            shot(page, tmp_path, "queue_db_down")
        finally:
            allow_connections(postgres_url, True)
        deadline = time.time() + 60
        while True:  # the recorder writes the buffered record once the database answers
            page.click("#qreload")
            page.wait_for_timeout(1000)
            if "OUTAGE" in page.inner_text("#qlist"):
                break
            assert time.time() < deadline, page.inner_text("#qinfo")
        assert page.inner_text("#error") == "" and "1 shown" in page.inner_text("#qinfo")
        page.wait_for_function("document.getElementById('qcount').textContent === '(1 flagged)'", timeout=10000)
        page.wait_for_function("document.getElementById('d-photo').textContent.includes('not kept')", timeout=10000)
        assert page.inner_text("#d-photocap") == "Photo" and page.locator("#d-photo .box").count() == 0
        assert unexpected(errors, 503) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_keyboard_focus_is_visible_on_the_dark_header(browser, server):
    """Keyboard-only use: every control of the header (model, API key, reviewer, the view tabs) shows its focus
    ring with at least 3:1 contrast against the header behind it (WCAG non-text contrast)."""
    url, _ = server
    page, errors = open_page(browser, url)
    contrast = """() => {
      const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
      const lum = (c) => { const [r, g, b] = rgb(c).map((v) => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
      const e = document.activeElement, ring = getComputedStyle(e).outlineColor;
      const bg = getComputedStyle(document.querySelector('header')).backgroundColor;
      const [a, b] = [lum(ring), lum(bg)].sort((x, y) => y - x);
      return [e.id, getComputedStyle(e).outlineStyle, (a + 0.05) / (b + 0.05)];
    }"""
    seen = []
    for _ in range(7):
        page.keyboard.press("Tab")
        seen.append(page.evaluate(contrast))
    assert [s[0] for s in seen] == ["model", "refresh", "apikey", "reviewer", "tab-live", "tab-history", "tab-queue"]
    assert all(style == "solid" and ratio >= 3 for _, style, ratio in seen), seen
    assert unexpected(errors) == []


def test_history_says_which_frame_of_a_recorded_part_was_scored(browser, server, tmp_path):
    """The live view says which page of a multi-page TIFF was scored; a part the line recorded showed in History
    without it. Its record keeps the answer's warnings, and the part's detail shows them."""
    from PIL import Image

    url, _ = server
    line = f"frames-{uuid.uuid4().hex[:8]}"
    bad = Image.fromarray(add_defect(textured_part(np.random.default_rng(62)), 64, 40)[0])
    stack = tmp_path / "stack.tif"
    bad.save(stack, save_all=True, append_images=[Image.fromarray(textured_part(np.random.default_rng(61)))])
    for name, data in (("stack.tif", stack.read_bytes()), ("plain.png", defect_png(63))):
        r = httpx.post(f"{url}/score", params={"line": line, "part_id": name}, files={"file": (name, data)},
                       timeout=30)
        assert r.status_code == 200 and r.json()["is_anomaly"]
    recorded_on(url, line, 2)
    page, errors = history_of(browser, url, line, 2)
    page.wait_for_function("document.getElementById('d-title').innerText.includes('ANOMALY')", timeout=10000)
    assert page.is_hidden("#d-warnings")  # the newest: the plain PNG, one frame
    page.locator("#hlist li button").nth(1).click()
    page.wait_for_selector("#d-warnings:not([hidden])", timeout=10000)
    assert "2 frames" in page.inner_text("#d-warnings") and "frame 1 (the first" in page.inner_text("#d-warnings")
    shot(page, tmp_path, "history_frames")
    page.locator("#hlist li button").nth(0).click()
    page.wait_for_function("document.getElementById('d-warnings').hidden", timeout=10000)
    assert unexpected(errors) == []


def test_history_says_how_a_recorded_part_was_scored(browser, server, model_dir, records_data_dir, tmp_path):
    """A part that passed and fails on a re-score months later: under --runtime torch its score moves with the
    threads, and the part's detail showed the model's version and nothing of the machine. It shows the runtime, the
    kNN search, the device and the threads its record keeps, and says "not recorded" of a record made before they
    were kept (a row of an upgraded database, whose four are null). Its version is the id `anomaly versions` lists,
    and a record made before version ids, which says 16 hex digits of the manifest's digest, says that id's end."""
    import sqlalchemy as sa

    from anomaly_service.records import RecordStore

    url, _ = server
    line = f"how-{uuid.uuid4().hex[:8]}"
    for name, seed in (("march", 81), ("june", 82)):
        r = httpx.post(f"{url}/score", params={"line": line, "part_id": name}, files={"file": (name, defect_png(seed))},
                       timeout=30)
        assert r.status_code == 200
    items = recorded_on(url, line, 2)
    june, march = items  # newest first
    current = httpx.get(f"{url}/models/part/versions").json()["current"]
    assert june["model_version"] == current
    # march's record made before version ids: the first 16 hex digits of the manifest's SHA-256
    digest16 = hashlib.sha256((model_dir / "part" / "manifest.json").read_bytes()).hexdigest()[:16]
    store = RecordStore.open(None, records_data_dir)
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE inspections SET runtime = NULL, knn_search = NULL, device = NULL, "
                                 "threads = NULL, model_version = :v WHERE id = :i"),
                         {"i": march["id"], "v": digest16})
    finally:
        store.close()
    page, errors = history_of(browser, url, line, 2)
    page.wait_for_function("document.getElementById('d-meta').innerText.includes('Scored with')", timeout=10000)
    # the version as `anomaly versions` (the versions route) names it, which is what the record keeps now
    assert f"part · version {current}" in " ".join(page.inner_text("#d-meta").split())
    threads = f"{june['threads']} thread{'' if june['threads'] == 1 else 's'}"
    said = f"{june['runtime']} runtime · {june['knn_search']} · {june['device']} · {threads}"
    assert f"Scored with {said}" in " ".join(page.inner_text("#d-meta").split()), page.inner_text("#d-meta")
    page.locator("#hlist li button").nth(1).click()
    page.wait_for_function("document.getElementById('d-meta').innerText.includes('not recorded')", timeout=10000)
    facts = " ".join(page.inner_text("#d-meta").split())
    assert "Scored with not recorded" in facts and said not in facts, facts
    assert f"version {digest16} (anomaly versions: the id ending -{digest16[:12]})" in facts and \
        current.endswith(f"-{digest16[:12]}"), facts
    shot(page, tmp_path, "history_scored_with")
    assert unexpected(errors) == []


def test_history_draws_a_recorded_part_on_the_map_of_its_version(browser, server, records_data_dir, tmp_path):
    """Operators review flagged parts from their records, in the queue and History, and a recorded part was never
    drawn on the image map: the record kept no place. It keeps the answer's, and the part's detail draws it as the
    live view draws an upload, where the record's coordinates put it among the training images of its version; a
    record of another version than the one served (a re-fit since) is not drawn on the served map, and the caption
    says so."""
    import sqlalchemy as sa

    from anomaly_service.records import RecordStore

    url, _ = server
    line = f"map-{uuid.uuid4().hex[:8]}"
    today, refit = parts_recorded(url, line, (("refit", 91), ("today", 92)))  # newest first
    served = httpx.get(f"{url}/models/part/embedding").json()
    assert today["model_version"] == served["model_version"] and today["embedding"] is not None
    store = RecordStore.open(None, records_data_dir)  # as if scored by a fit since replaced
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE inspections SET model_version = :v WHERE id = :i"),
                         {"i": refit["id"], "v": "20200101T000000Z-0123456789ab"})
    finally:
        store.close()
    page, errors = history_of(browser, url, line, 2)
    page.wait_for_selector("#d-embpart", timeout=15000)
    n = len(served["points"])
    assert page.locator("#d-embmap circle.train, #d-embmap circle.cited").count() == n
    assert f"the {n} training images" in page.inner_text("#d-embcap")
    # where the live view's drawing puts the record's coordinates among the map's points
    me = today["embedding"]
    xs, ys = [p["x"] for p in served["points"]] + [me["x"]], [p["y"] for p in served["points"]] + [me["y"]]
    w, h, m = 340, 220, 16
    cx = m + (w - 2 * m) * (me["x"] - min(xs)) / (max(xs) - min(xs))
    cy = h - m - (h - 2 * m) * (me["y"] - min(ys)) / (max(ys) - min(ys))
    drawn = page.locator("#d-embpart circle")
    assert abs(float(drawn.get_attribute("cx")) - cx) < 0.06 and abs(float(drawn.get_attribute("cy")) - cy) < 0.06
    shot(page, tmp_path, "history_map")
    page.locator("#hlist li button").nth(1).click()
    page.wait_for_function("document.getElementById('d-embcap').textContent.includes('20200101T000000Z')",
                           timeout=10000)
    assert page.locator("#d-embpart").count() == 0 and page.locator("#d-embmap circle").count() == 0
    caption = page.inner_text("#d-embcap")
    assert "changed since this part was scored" in caption and served["model_version"] in caption, caption
    assert page.is_visible("#d-embfig")
    assert unexpected(errors) == []


def test_history_says_why_a_recorded_part_is_not_drawn_on_a_map(browser, server, records_data_dir, tmp_path):
    """A record of a model no longer served (removed, or renamed, since the part was scored), or one that keeps no
    place on the map (a model without one, or recorded before records kept places), showed no map and said
    nothing: the operator could not tell a part drawn nowhere from a map still loading. The detail says why in one
    line, in the figure's caption, as it says so of a version changed since."""
    import sqlalchemy as sa
    from test_web_access import violations  # here: that module imports this one

    from anomaly_service.records import RecordStore

    url, _ = server
    line = f"unmapped-{uuid.uuid4().hex[:8]}"
    placeless, gone = parts_recorded(url, line, (("gone", 93), ("placeless", 94)))  # newest first
    store = RecordStore.open(None, records_data_dir)
    try:
        with store.engine.begin() as conn:  # a model since removed; a record that kept no place
            conn.execute(sa.text("UPDATE inspections SET model = 'retired' WHERE id = :i"), {"i": gone["id"]})
            conn.execute(sa.text("UPDATE inspections SET embedding_x = NULL, embedding_y = NULL WHERE id = :i"),
                         {"i": placeless["id"]})
    finally:
        store.close()
    page, errors = history_of(browser, url, line, 2)
    page.wait_for_function("document.getElementById('d-embcap').textContent.includes('keeps no place')",
                           timeout=10000)
    assert page.is_visible("#d-embfig") and page.locator("#d-embmap *").count() == 0
    assert f"version {placeless['model_version']}" in page.inner_text("#d-embcap")
    page.locator("#hlist li button").nth(1).click()
    page.wait_for_function("document.getElementById('d-embcap').textContent.includes('retired')", timeout=10000)
    caption = page.inner_text("#d-embcap")
    assert "Model retired is not served now" in caption and gone["model_version"] in caption, caption
    assert page.is_visible("#d-embfig") and page.locator("#d-embmap *").count() == 0
    assert violations(page) == []  # the WCAG rules test_web_access.py holds each state of the page to
    shot(page, tmp_path, "history_map_model_gone")
    assert unexpected(errors, 404) == []


def test_history_names_the_time_zone_of_its_times_and_filters_in_it(browser, server, tmp_path):
    """An engineer's browser in Kolkata, a plant in New York: the history showed a part's time in the browser's zone
    without naming it, to be read as the plant's time or set against an export's UTC times. Each time now names its
    zone, and From and Until say the zone they are read in (and are read in it)."""
    from datetime import datetime, timedelta, timezone

    url, _ = server
    line = f"zone-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, line, 71)
    at = datetime.fromisoformat(httpx.get(f"{url}/inspections", params={"part_id": line}).json()["items"][0]
                                ["created_at"])
    local = at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    page, errors = open_page(browser, url, timezone_id="Asia/Kolkata", locale="en-US")
    _history_of(page, line)
    assert page.inner_text("#h-zone") in ("times in Asia/Kolkata", "times in Asia/Calcutta")  # ICU's older name
    shown = page.inner_text("#hlist li")
    assert f"{local.month}/{local.day}/{local.year}" in shown and "GMT+5:30" in shown, shown
    page.wait_for_function("document.getElementById('d-meta').innerText.includes('GMT+5:30')", timeout=10000)
    # From is the browser's local time: the part's own minute keeps it, the next minute leaves it out
    for minute, count in ((local.replace(second=0, microsecond=0), 1),
                          (local.replace(second=0, microsecond=0) + timedelta(minutes=1), 0)):
        page.fill("#h-since", minute.strftime("%Y-%m-%dT%H:%M"))
        page.click("#hfilters button[type=submit]")
        page.wait_for_function(f"document.querySelectorAll('#hlist li').length === {count}", timeout=10000)
    assert unexpected(errors) == []


def test_an_operator_undoes_a_review_made_by_a_slip_of_the_key(browser, server, tmp_path):
    """D pressed on the wrong part: for a short while the page offers Undo (U), which puts the part back to the
    verdict it had (here unreviewed, back in the queue) through the service and selects it again; the history
    keeps both entries. Once another operator has reviewed the part, Undo changes nothing and says who did."""
    url, _ = server
    part = f"UNDO-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, part, 71)
    iid = httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"][0]["id"]
    page = browser.new_page(viewport=DESKTOP, bypass_csp=True)  # string waits use eval()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.clock.install()  # the offer's seconds pass when the test says
    page.goto(url + "/")
    page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)
    page.fill("#reviewer", "ann")
    page.click("#tab-queue")
    first = "document.querySelector('#qlist li')"
    page.wait_for_function(f"{first} && {first}.innerText.includes('{part}')", timeout=10000)
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    assert page.is_hidden("#undo")
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("d")
    page.wait_for_function(f"{first}.innerText.includes('real defect')", timeout=10000)
    assert not page.is_hidden("#undo") and "Saved: real defect" in page.inner_text("#status")
    assert page.locator("#qlist li button").first.get_attribute("aria-current") is None  # moved on
    shot(page, tmp_path, "undo_offered")
    page.keyboard.press("u")
    page.wait_for_function(f"{first}.innerText.includes('unreviewed')", timeout=10000)
    page.wait_for_function("document.getElementById('status').innerText.includes('unreviewed again')", timeout=10000)
    assert page.locator("#qlist li button").first.get_attribute("aria-current") == "true"  # back on the part
    assert page.is_hidden("#undo") and page.inner_text("#error") == ""
    full = httpx.get(f"{url}/inspections/{iid}").json()
    assert full["verdict"] is None
    assert [(x["verdict"], x["reviewer"]) for x in full["reviews"]] == [("defect", "ann"), (None, "ann")]
    assert full["reviews"][1]["undoes"] == full["reviews"][0]["id"]
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('undone by ann')", timeout=10000)

    # offered for a short while only: the next operator action is not undone by a late key press
    page.keyboard.press("g")
    page.wait_for_function(f"{first}.innerText.includes('actually good')", timeout=10000)
    assert not page.is_hidden("#undo")
    page.clock.run_for(11_000)
    page.wait_for_selector("#undo", state="hidden", timeout=5000)
    page.keyboard.press("u")
    page.wait_for_timeout(500)
    assert httpx.get(f"{url}/inspections/{iid}").json()["verdict"] == "good"

    # ann reviews again; bob replaces her verdict before she undoes: her undo takes nothing back
    page.locator("#qlist li button").first.click()
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('actually good')", timeout=10000)
    page.keyboard.press("d")
    page.wait_for_function(f"{first}.innerText.includes('real defect')", timeout=10000)
    r = httpx.post(f"{url}/inspections/{iid}/review", json={"verdict": "good", "replaces": "defect"},
                   headers={"X-Reviewer": "bob"})
    assert r.status_code == 200
    page.click("#undo")
    page.wait_for_function("document.getElementById('error').textContent.includes('Not undone: bob')", timeout=10000)
    full = httpx.get(f"{url}/inspections/{iid}").json()
    assert full["verdict"] == "good" and full["reviews"][-1]["reviewer"] == "bob"
    page.wait_for_function(f"{first}.innerText.includes('actually good')", timeout=10000)  # bob's verdict shows
    shot(page, tmp_path, "undo_overtaken")
    assert unexpected(errors, 409) == []


def test_a_review_and_an_undo_whose_answers_were_lost_are_saved_by_a_second_press(browser, server, tmp_path):
    """The database dropped the connection as a review committed: the review is stored, the page got a 503. The
    operator's second press was refused as a conflict naming their own review ("Not saved: ann reviewed this part
    meanwhile"); an undo's failure took the Undo offer away, so it could not be sent again. Here each answer is
    lost on its way back (the service commits, the page is answered 503); the second press is saved, and the
    history holds each entry once."""
    url, _ = server
    part = f"LOST-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, part, 91)
    iid = httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"][0]["id"]
    page, errors = open_page(browser, url)
    page.fill("#reviewer", "ann")
    _history_of(page, part)
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    lost = {"error": "records_unavailable", "detail": "the records database dropped the connection"}

    def answer_lost(route):
        route.fetch()  # the service takes it and commits; its answer never reaches the page
        route.fulfill(status=503, json=lost)

    for path, press, saved in [("**/review", "d", "Saved: real defect"), ("**/undo", "u", "unreviewed again")]:
        page.route(path, answer_lost)
        page.locator("#detail").click(position={"x": 5, "y": 5})
        page.keyboard.press(press)
        page.wait_for_function("document.getElementById('error').textContent.includes('dropped the connection')",
                               timeout=10000)
        page.unroute(path)
        page.locator("#detail").click(position={"x": 5, "y": 5})
        page.keyboard.press(press)
        page.wait_for_function(f"document.getElementById('status').innerText.includes({saved!r})", timeout=10000)
        assert page.inner_text("#error") == ""
    full = httpx.get(f"{url}/inspections/{iid}").json()
    assert [(x["verdict"], x["reviewer"], x["undoes"] is None) for x in full["reviews"]] == \
        [("defect", "ann", True), (None, "ann", False)]
    assert unexpected(errors, 503) == []


def test_a_failed_action_says_so_until_the_operator_moves_on_and_every_list_shows_a_review(browser, server, tmp_path):
    """A review that failed left its message on screen while the operator went through other parts, until some
    later success; and a part reviewed from History still said "unreviewed" in the queue (and the other way round)
    until a refresh. The message now goes with the part it was about, and a review shows in every list at once."""
    url, _ = server
    part = f"BADGE-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, part + "-prev", 81)  # a part to move on to, then ours, the newest
    recorded_defect(url, part, 82)
    page, errors = open_page(browser, url)
    page.evaluate("localStorage.removeItem('anomaly-reviewer')")
    page.fill("#reviewer", "")
    page.click("#tab-queue")
    first = "document.querySelector('#qlist li')"
    page.wait_for_function(f"{first} && {first}.innerText.includes('{part}')", timeout=10000)
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("d")  # nobody named: refused, and said
    assert "Enter your name" in page.inner_text("#error")
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("j")  # the operator moves on: the message was about the part left behind
    page.wait_for_function("document.querySelectorAll('#qlist li button')[1].getAttribute('aria-current')",
                           timeout=10000)
    page.wait_for_function("document.getElementById('error').textContent === ''", timeout=5000)
    page.keyboard.press("k")
    page.keyboard.press("d")
    page.wait_for_function("document.getElementById('error').textContent.includes('Enter your name')", timeout=5000)
    page.keyboard.press("Escape")  # or put away by hand
    page.wait_for_function("document.getElementById('error').textContent === ''", timeout=5000)
    page.fill("#reviewer", "ann")

    # reviewed in History: the queue, loaded before, shows it at once
    _history_of(page, part)
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("d")
    page.wait_for_function("document.querySelector('#hlist li').innerText.includes('real defect')", timeout=10000)
    page.click("#tab-queue")
    page.wait_for_function(f"{first}.innerText.includes('{part}')", timeout=10000)
    assert "real defect" in page.locator("#qlist li").first.inner_text()
    assert "unreviewed" not in page.locator("#qlist li").first.inner_text()
    # reviewed by another operator meanwhile: opening the part shows their verdict in the row and the title too
    iid = httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"][0]["id"]
    assert httpx.post(f"{url}/inspections/{iid}/review", json={"verdict": "good"},
                      headers={"X-Reviewer": "bob"}).status_code == 200
    page.locator("#qlist li button").nth(1).click()
    page.locator("#qlist li button").first.click()
    page.wait_for_function(f"{first}.innerText.includes('actually good')", timeout=10000)
    assert "actually good" in page.inner_text("#d-title")
    shot(page, tmp_path, "queue_badges")
    assert unexpected(errors) == []


def recorded(url: str, line: str, part_id: str) -> None:
    """Wait until the part is in the records, where the page's next look finds it (written off the request path)."""
    eventually(lambda: any(i.get("part_id") == part_id for i in
                           httpx.get(f"{url}/inspections", params={"line": line}).json()["items"]))


def test_the_live_view_shows_the_parts_the_line_scores(browser, server, tmp_path):
    """The line POSTs its parts to /score; the live view showed only what was dropped on the page, so an operator
    watching Live saw nothing of the line. It now shows each part the line records (decision, photo with its
    regions boxed, overlay, evidence, warnings), of the line typed under Part; a part dropped on the page is shown
    as it was answered and is not replaced by its own record."""
    from PIL import Image

    url, _ = server
    line = f"line-{uuid.uuid4().hex[:8]}"
    page, errors = open_page(browser, url)
    page.fill("#line", line)
    page.wait_for_function("liveNewest !== null", timeout=10000)  # it has looked once: what comes next is new

    def line_scores(name: str, data: bytes, on: str = line) -> dict:
        r = httpx.post(f"{url}/score", params={"line": on, "part_id": name}, files={"file": (name, data)}, timeout=30)
        assert r.status_code == 200
        return r.json()

    answer = line_scores("SN-1", defect_png(91))
    assert answer["is_anomaly"] and answer["inspection_id"]
    page.wait_for_function("document.getElementById('rpart').textContent.includes('SN-1')", timeout=15000)
    assert page.inner_text("#decision") == "ANOMALY" and "scored on the line" in page.inner_text("#rpart")
    assert page.inner_text("#nscore") == f"{answer['normalized_score']:.3f}"
    page.wait_for_function("(() => { const i = document.getElementById('photo');"
                           " return i && i.complete && i.naturalWidth === 128; })()", timeout=10000)
    assert page.locator("#livephoto .box").count() == len(answer["regions"]) >= 1
    page.wait_for_function("document.getElementById('overlay').naturalWidth === 128", timeout=10000)
    page.wait_for_selector("#evidence:not([hidden])", timeout=10000)
    page.wait_for_selector("#embpart", timeout=10000)  # its record's place on the map, drawn as an upload's
    shot(page, tmp_path, "live_follows_the_line")

    line_scores("OTHER", defect_png(92), on=line + "-other")  # another line's part: not this station's
    good = line_scores("SN-2", png_bytes(textured_part(np.random.default_rng(93))))
    assert not good["is_anomaly"]
    page.wait_for_function("document.getElementById('rpart').textContent.includes('SN-2')", timeout=15000)
    assert page.inner_text("#decision") == "normal"
    assert "not kept" in page.inner_text("#livephoto")  # --keep-images anomalies: said, not a broken picture
    stack = tmp_path / "stack.tif"
    Image.fromarray(add_defect(textured_part(np.random.default_rng(94)), 64, 40)[0]).save(
        stack, save_all=True, append_images=[Image.fromarray(textured_part(np.random.default_rng(95)))])
    line_scores("SN-3", stack.read_bytes())
    page.wait_for_function("document.getElementById('rpart').textContent.includes('SN-3')", timeout=15000)
    assert "2 frames" in page.inner_text("#warnings")

    # the operator drops a part: shown as answered (with its place among the training images), and kept shown
    own = tmp_path / "own.png"
    own.write_bytes(defect_png(96))
    page.fill("#part_id", "OWN-1")
    page.set_input_files("#file", str(own))
    page.wait_for_function("document.getElementById('rpart').textContent === 'part OWN-1 · line " + line + "'",
                           timeout=30000)
    page.wait_for_selector("#embfig:not([hidden])", timeout=10000)
    recorded(url, line, "OWN-1")
    page.evaluate("(async () => { await followLine(); await followLine(); })()")  # it looks again, more than once
    assert page.inner_text("#rpart") == f"part OWN-1 · line {line}" and not page.is_hidden("#embfig")
    assert page.get_attribute("#photo", "src").startswith("blob:")

    # the operator can stop following: the next line part leaves the view alone
    page.uncheck("#follow")
    line_scores("SN-4", defect_png(97))
    recorded(url, line, "SN-4")
    page.evaluate("followLine()")  # what its timer would do
    assert "OWN-1" in page.inner_text("#rpart")
    page.check("#follow")
    page.wait_for_function("document.getElementById('rpart').textContent.includes('SN-4')", timeout=15000)
    assert unexpected(errors) == []


def test_a_part_id_goes_with_one_photo_and_a_long_one_fits_the_live_view(browser, server, tmp_path):
    """An operator types a serial number and drops the part's photo; the next photo dropped is another part. The
    part id stayed in its field, so every later photo was recorded under the first part's serial number. It is
    now cleared once its photo is scored (line and station stay: they are the station's). The live view names
    each field it shows (a line given alone read as "part line-2"), and a part id of the 200 characters the API
    takes wraps instead of widening the page."""
    url, _ = server
    tag = uuid.uuid4().hex[:8]
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(defect_png(61))
    second.write_bytes(defect_png(62))
    long_id = f"SN-{tag}-" + "X" * 188
    page, errors = open_page(browser, url, {"width": 800, "height": 800})
    page.fill("#line", f"line-{tag}")
    page.fill("#part_id", long_id)
    page.set_input_files("#file", str(first))
    page.wait_for_function("document.getElementById('rpart').textContent.includes('line-')", timeout=30000)
    assert page.inner_text("#rpart") == f"part {long_id} · line line-{tag}"
    assert page.input_value("#part_id") == "" and page.input_value("#line") == f"line-{tag}"
    assert page.inner_text("#timing").startswith("scored in ")  # every number on the view says what it is
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    page.set_input_files("#file", str(second))
    page.wait_for_function(f"document.getElementById('rpart').textContent === 'line line-{tag}'", timeout=30000)
    deadline = time.time() + 10
    while len(items := httpx.get(f"{url}/inspections", params={"line": f"line-{tag}"}).json()["items"]) < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    assert [it["part_id"] for it in items] == [None, long_id]  # newest first: the second photo has no part id
    assert unexpected(errors) == []


def test_a_service_with_an_api_key_tells_the_operator_where_to_type_it(browser, server_with, tmp_path):
    """A service started with --api-key and a browser that has none: the page said "401 unauthorized: missing or
    wrong X-API-Key header", an HTTP header an operator never sees. It now says to type the key in the API key
    field at the top; once it is typed, the models load and a photo is scored."""
    url, _ = server_with("--api-key", "k-123")
    bad = tmp_path / "bad.png"
    bad.write_bytes(defect_png(71))
    page = browser.new_page(viewport=DESKTOP, bypass_csp=True)  # string waits use eval()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=15000)
    assert "API key field at the top" in page.inner_text("#error")
    page.fill("#apikey", "k-123")
    page.dispatch_event("#apikey", "change")
    page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)
    assert page.inner_text("#error") == ""
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
    page.close()


def test_a_part_id_goes_with_its_photo_when_the_next_is_dropped_before_the_answer(browser, server, tmp_path):
    """A slow answer (a busy CPU, or a line part the live view follows meanwhile): the part id was cleared only
    once its photo's answer was shown, so the next photo, dropped before that, was recorded under the first
    part's serial number too (and an answer the view had moved past cleared nothing at all). It goes with its
    photo as that is sent; a photo that is not scored gives it back for the retry."""
    url, _ = server
    tag = uuid.uuid4().hex[:8]
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(defect_png(63))
    second.write_bytes(defect_png(64))
    held: list = []
    page, errors = open_page(browser, url)
    scoring = lambda u: "/score?" in u  # noqa: E731
    page.route(scoring, lambda route: held.append(route))  # each upload waits until both are sent
    page.fill("#line", f"line-{tag}")
    page.fill("#part_id", f"SN-{tag}")
    for n, photo in enumerate((first, second), 1):
        page.set_input_files("#file", str(photo))
        deadline = time.time() + 10
        while len(held) < n:
            assert time.time() < deadline
            page.wait_for_timeout(50)
    for route in held:
        route.continue_()
    deadline = time.time() + 30
    while len(items := httpx.get(f"{url}/inspections", params={"line": f"line-{tag}"}).json()["items"]) < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    assert sorted(str(it["part_id"]) for it in items) == ["None", f"SN-{tag}"]

    # a photo the service did not score: the part id is there again to send with the next try
    page.unroute(scoring)
    page.route(scoring, lambda route: route.fulfill(status=503, json={
        "error": "overloaded", "detail": "busy"}))
    page.fill("#part_id", f"SN2-{tag}")
    page.set_input_files("#file", str(first))
    page.wait_for_function("document.getElementById('error').textContent.includes('busy')", timeout=15000)
    assert page.input_value("#part_id") == f"SN2-{tag}"
    assert unexpected(errors, 503) == []


@pytest.mark.parametrize("name", ["张伟", "Jürgen Ø 👷", "👷" * 150])
def test_an_operator_reviews_under_a_name_in_any_script(browser, server, tmp_path, name):
    """A plant's operators sign reviews with their own names. The page refused any name beyond Latin-1 ("can only
    use Latin letters": an HTTP header travels as bytes), so an operator named in Chinese, Greek or Cyrillic could
    not review at all. The page sends the name's UTF-8, as curl and MES clients do, and the trail keeps it whole.
    Typed, a name is held to the service's 200 characters as the service counts them: the field's maxlength
    counted UTF-16 units and cut 150 emoji to 100."""
    url, _ = server
    part = f"NAME-{uuid.uuid4().hex[:8]}"
    recorded_defect(url, part, 72)
    iid = httpx.get(f"{url}/inspections", params={"part_id": part}).json()["items"][0]["id"]
    page, errors = open_page(browser, url)
    page.click("#reviewer")
    page.keyboard.insert_text(name)  # as typed or pasted: a field's limit holds for what the operator enters
    _history_of(page, part)
    page.locator("#hlist li button").first.click()
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("d")
    page.wait_for_function("document.getElementById('status').innerText.includes('Saved: real defect')",
                           timeout=10000)
    assert [(r["verdict"], r["reviewer"]) for r in httpx.get(f"{url}/inspections/{iid}").json()["reviews"]] == \
        [("defect", name)]
    page.wait_for_function(f"document.getElementById('d-reviews').innerText.includes('by {name}')", timeout=10000)
    page.keyboard.press("u")
    page.wait_for_function("document.getElementById('status').innerText.includes('unreviewed again')", timeout=10000)
    assert [r["reviewer"] for r in httpx.get(f"{url}/inspections/{iid}").json()["reviews"]] == [name, name]
    assert page.inner_text("#error") == "" and unexpected(errors) == []


def test_a_part_whose_pictures_wait_for_the_drawing_thread_is_shown_once_it_is_free(browser, server):
    """The service draws stored pictures one at a time with a few waiting, and answers 503 `overloaded` beyond. The
    page waited that out for the list's thumbnails only: the photo and overlay of a part opened in History, and of
    a line part on Live, showed "picture unavailable (503)" for good whenever another tab was drawing too (two
    views of the station were enough, and on a slow machine more so). Each waits out the refusal now."""
    url, _ = server
    line = f"line-{uuid.uuid4().hex[:8]}"
    refused: list[str] = []

    def busy_once(route):
        """The first ask for each picture: the answer of a drawing thread with all its places taken."""
        if route.request.url in refused:
            route.continue_()
            return
        refused.append(route.request.url)
        route.fulfill(status=503, headers={"Retry-After": "1"}, json={
            "error": "overloaded", "detail": "4 stored pictures are being drawn or wait for it; retry in 1 s"})

    page, errors = open_page(browser, url)
    page.fill("#line", line)
    page.wait_for_function("liveNewest !== null", timeout=10000)  # it has looked once: what comes next is new
    for what in ("display", "overlay.png"):
        page.route(f"**/inspections/*/{what}*", busy_once)  # the overlay's URL ends in its max_side
    r = httpx.post(f"{url}/score", params={"line": line, "part_id": "BUSY-1"},
                   files={"file": ("x.png", defect_png(93))}, timeout=30)
    assert r.status_code == 200
    page.wait_for_function("document.getElementById('rpart').textContent.includes('BUSY-1')", timeout=15000)
    page.wait_for_function("(() => { const i = document.getElementById('photo');"
                           " return i && i.complete && i.naturalWidth === 128; })()", timeout=15000)
    page.wait_for_function("document.getElementById('overlay').naturalWidth === 128", timeout=15000)
    assert len(refused) == 2  # Live's photo and overlay: each refused once, each shown

    refused.clear()  # and History's, of the same part
    _history_of(page, "BUSY-1")
    page.locator("#hlist li button").first.click()
    page.wait_for_function("(() => { const i = document.querySelector('#d-photo img'), o = document.querySelector("
                           "'#d-overlay img'); return i && i.complete && i.naturalWidth === 128 && o && o.complete"
                           " && o.naturalWidth === 128; })()", timeout=15000)
    assert len(refused) == 2
    assert page.inner_text("#error") == "" and unexpected(errors, 503) == []


def test_the_page_runs_under_its_policy_and_a_script_slipped_into_it_does_not(browser, server, tmp_path):
    """The page's Content-Security-Policy admits its own script and style only (by hash): a flagged part is scored
    and shown (the photo, the overlay, the training images' thumbnails beside its regions, fetched with the key),
    with no violation reported; a script that reached the page as markup is refused, so it cannot read
    the API key the page keeps. Waits poll through page.evaluate: Playwright's own wait_for_function uses eval()."""
    url, _ = server
    bad = tmp_path / "bad.png"
    bad.write_bytes(defect_png(8))
    page, errors = open_page(browser, url, bypass_csp=False)

    def wait(expression: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not page.evaluate(expression):
            assert time.monotonic() < deadline, (expression, page.evaluate("window.violations"), errors)
            time.sleep(0.1)

    page.evaluate("window.violations = []; document.addEventListener('securitypolicyviolation', "
                  "e => window.violations.push(e.violatedDirective + ' ' + e.blockedURI))")
    page.set_input_files("#file", str(bad))
    wait("document.getElementById('decision').textContent === 'ANOMALY'")
    wait("document.getElementById('overlay').naturalWidth > 0 && document.getElementById('photo') && "
         "document.getElementById('photo').naturalWidth > 0")
    wait("!document.getElementById('evidence').hidden && document.querySelector('#evlist .train-thumb') && "
         "document.querySelector('#evlist .train-thumb').naturalWidth > 0")
    assert page.evaluate("window.violations") == []
    assert [e for e in unexpected(errors) if "Content Security Policy" in e] == []
    page.evaluate("localStorage.setItem('anomaly-api-key', 'k'); const d = document.createElement('div');"
                  "d.innerHTML = '<img src=x onerror=\"window.stolen = localStorage.getItem(\\'anomaly-api-key\\')\">';"
                  "document.body.append(d); const s = document.createElement('script');"
                  "s.textContent = 'window.stolen = 1'; document.body.append(s);")
    wait("window.violations.length >= 2", 10)
    assert page.evaluate("window.stolen") is None
    assert {v.split()[0] for v in page.evaluate("window.violations")} <= {"script-src-attr", "script-src-elem"}


def _score_while_a_change_lands(page, url: str, tmp_path: Path, change) -> tuple[str, list[str], Path]:
    """Score a defective part on the page with ``change`` (a re-fit, an update) saved and loaded between the score
    answer and the page's request for the image map; returns the version that scored it, the map requests made and
    the photo."""
    before = httpx.get(f"{url}/models").json()["models"][0]["version"]
    asked: list[str] = []

    def change_lands_first(route) -> None:
        if not asked:
            change()
        asked.append(route.request.url)
        route.continue_()

    page.route("**/models/part/embedding", change_lands_first)
    bad = tmp_path / "bad.png"
    bad.write_bytes(defect_png(8))
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
    assert page.inner_text("#rversion") == before
    return before, asked, bad


def test_a_part_is_drawn_on_the_map_of_the_version_that_scored_it_when_a_change_lands_first(browser, model_dir,
                                                                                             tmp_path):
    """The page asks for the model's image map after the score answer; a change can load between the two. One
    server for both changes, the update first.

    An update (an operator teaching the model a good part) answered the update's map: the page said the model
    changed and drew nothing, though an update keeps the map's axes and its images' indices. The update's map names
    the version it extends, whose map is its first points: the part is drawn among them, and the caption says the
    served version added an image since.

    A re-fit (`fit --out` onto the served model) answered the new fit's map, which the page drew the part on (its
    cited training images highlighted by the old fit's indices) and kept under the answer's version. The map of
    another version is not drawn on: the page says the model changed since the part was scored."""
    from anomaly_service import AnomalyModel

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    rng = np.random.default_rng(9)  # eight other parts: another fit, another map
    fitted = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.05, progress=False,
                          calibration_fraction=0.25, seed=3).fit([textured_part(rng) for _ in range(8)])
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        page, errors = open_page(browser, url)
        n = httpx.get(f"{url}/models").json()["models"][0]["training_images"]
        taught = png_bytes(textured_part(np.random.default_rng(21)))

        def update() -> None:
            r = httpx.post(f"{url}/models/part/update", files={"files": ("taught.png", taught)}, timeout=120)
            assert r.status_code == 200, r.text

        before, asked, bad = _score_while_a_change_lands(page, url, tmp_path, update)
        page.wait_for_selector("#embpart", timeout=15000)
        after = httpx.get(f"{url}/models").json()["models"][0]["version"]
        assert asked and after != before
        # drawn among the images of the version that scored it, its closest good regions' images marked
        assert page.locator("#embmap circle.train, #embmap circle.cited").count() == n
        assert page.locator("#embmap circle.cited").count() >= 1
        caption = page.inner_text("#embcap")
        assert f"the {n} training images" in caption and f"map of version {before}" in caption, caption
        assert f"version {after}, served now, is an update of it that added 1 good image " in caption, caption
        # the next part is the update's: drawn among its images, the taught one with them, on the map already asked
        page.set_input_files("#file", str(bad))
        page.wait_for_function(f"document.getElementById('rversion').textContent === '{after}'", timeout=30000)
        page.wait_for_function(f"document.querySelectorAll('#embmap circle.train, #embmap circle.cited').length "
                               f"=== {n + 1}", timeout=15000)
        assert "is an update of it" not in page.inner_text("#embcap")
        assert len(asked) == 1, asked
        assert unexpected(errors) == []

        page, errors = open_page(browser, url)

        def refit() -> None:
            fitted.save(models / "part")
            assert httpx.post(f"{url}/models/part/reload", timeout=60).status_code == 200

        before, asked, bad = _score_while_a_change_lands(page, url, tmp_path, refit)
        page.wait_for_function("document.getElementById('embcap').textContent !== ''", timeout=15000)
        after = httpx.get(f"{url}/models").json()["models"][0]["version"]
        assert asked and after != before
        # not drawn on the new fit's eight images, and said in words
        assert page.locator("#embpart").count() == 0 and page.locator("#embmap circle").count() == 0
        caption = page.inner_text("#embcap")
        assert after in caption and before in caption and "score the part again" in caption, caption
        # the part scored again is drawn on its own version's map, which the page then asks for no second time
        page.set_input_files("#file", str(bad))
        page.wait_for_function(f"document.getElementById('rversion').textContent === '{after}'", timeout=30000)
        page.wait_for_selector("#embpart", timeout=15000)
        assert page.locator("#embmap circle.train, #embmap circle.cited").count() == 8
        assert len(asked) == 1, asked  # the new version's map was kept under its own version
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)


def test_the_queue_teaches_the_model_the_false_alarms_reviewed_as_actually_good(browser, model_dir, tmp_path):
    """Parts the model flagged that operators reviewed as actually good are offered to teach it (one update, a new
    version), once the reviewer names themselves; the part reviewed as a real defect is not offered, and guards
    the update. Once learnt, nothing is offered."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        rng = np.random.default_rng(7)  # good parts under a new lamp: darker, less contrast; the model flags them
        lit = [np.clip(textured_part(rng).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8) for _ in range(2)]
        for name, photo in [("lamp-1", png_bytes(lit[0])), ("lamp-2", png_bytes(lit[1])), ("crack", defect_png(8))]:
            r = httpx.post(f"{url}/score", params={"part_id": name, "line": "L1"}, files={"file": (name, photo)},
                           timeout=30)
            assert r.status_code == 200 and r.json()["is_anomaly"], name
        verdicts = {"lamp-1": "good", "lamp-2": "good", "crack": "defect"}
        for item in recorded_on(url, "L1", 3):
            r = httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": verdicts[item["part_id"]]},
                           headers={"X-Reviewer": "qa"})
            assert r.status_code == 200, r.text
        before = httpx.get(f"{url}/models").json()["models"][0]["version"]
        page, errors = open_page(browser, url)
        page.click("#tab-queue")
        page.wait_for_selector("#teach:not([hidden])", timeout=10000)
        assert "flagged 2 parts that were reviewed as actually good" in page.inner_text("#teach")
        assert page.inner_text("#teach-go") == "Teach part them"
        page.fill("#reviewer", "")
        page.click("#teach-go")  # who changes the model is recorded: no name, no change
        assert "Enter your name in Reviewer" in page.inner_text("#error")
        page.fill("#reviewer", "m.keller")
        asked = []

        def answer(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept()
        page.on("dialog", answer)
        # pressed again as soon as the teaching is done, before the page has asked what is left to learn: the
        # button still offered the parts just learnt, and taught them again (refused: nothing new to add)
        page.evaluate("(async () => { await teach(); await teach(); })()")
        page.remove_listener("dialog", answer)
        page.wait_for_selector("#teach-done:not([hidden])", timeout=60000)
        assert len(asked) == 1 and "new version" in asked[0] and "restored" in asked[0], asked
        assert page.inner_text("#error") == ""
        done = page.inner_text("#teach-done")
        after = httpx.get(f"{url}/models").json()["models"][0]["version"]
        assert after != before and f"version {after} serves now: 2 parts learnt" in done, done
        page.wait_for_selector("#teach", state="hidden", timeout=10000)
        assert httpx.get(f"{url}/models/part/false-alarms").json()["to_learn"] == []
        change = httpx.get(f"{url}/models/part/versions").json()["history"][0]
        assert change["action"] == "update" and change["by"] == "m.keller" and "review queue" in change["note"]
        # a teaching regretted is one button away: the version before it serves again, and the parts are offered
        undo = page.locator("#teach-undo")
        assert undo.inner_text() == f"Undo: serve {before} again"
        page.once("dialog", lambda d: d.accept())
        undo.click()
        page.wait_for_function("document.getElementById('teach-said').textContent.includes('again')", timeout=60000)
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == before
        assert page.is_hidden("#teach-undo")
        page.wait_for_selector("#teach:not([hidden])", timeout=10000)  # that version never learnt them
        change = httpx.get(f"{url}/models/part/versions").json()["history"][0]
        assert change["action"] == "rollback" and change["by"] == "m.keller" and "undone" in change["note"]
        # taught again, then the model changed by someone else: the undo would take their change back too, so it
        # says so and changes nothing
        page.once("dialog", lambda d: d.accept())
        page.click("#teach-go")
        page.wait_for_selector("#teach-undo:not([hidden])", timeout=60000)
        r = httpx.post(f"{url}/models/part/update", files={"files": ("g.png", png_bytes(lit[0][::-1]))}, timeout=120)
        assert r.status_code == 200, r.text
        undo.click()
        page.wait_for_function("document.getElementById('error').textContent.includes('changed since')", timeout=10000)
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == r.json()["version"]
        # ... and changed while the undo's confirmation was open: the rollback took that change back with the
        # teaching, since the page looked before it asked. The service refuses a rollback whose model changed since
        dimmer = np.clip(textured_part(rng).astype(np.float32) * 0.4 + 20, 0, 255).astype(np.uint8)  # a dimmer lamp
        r = httpx.post(f"{url}/score", params={"part_id": "lamp-3", "line": "L1"},
                       files={"file": ("lamp-3", png_bytes(dimmer))}, timeout=30)
        assert r.status_code == 200 and r.json()["is_anomaly"], r.text
        item = next(i for i in recorded_on(url, "L1", 4) if i["part_id"] == "lamp-3")
        assert httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good"},
                          headers={"X-Reviewer": "qa"}).status_code == 200
        page.evaluate("offerTeaching()")
        page.wait_for_function("document.getElementById('teach-go').textContent === 'Teach part it'", timeout=10000)
        page.once("dialog", lambda d: d.accept())
        page.click("#teach-go")
        page.wait_for_function("document.getElementById('teach-said').textContent.includes('1 part learnt')",
                               timeout=60000)
        changed = []

        def meanwhile(dialog) -> None:  # another operator updates the model while this one reads the question
            turned = np.ascontiguousarray(lit[0].transpose(1, 0, 2))
            changed.append(httpx.post(f"{url}/models/part/update", files={"files": ("h.png", png_bytes(turned))},
                                      timeout=120))
            dialog.accept()
        page.once("dialog", meanwhile)
        page.evaluate("showError('')")
        undo.click()
        page.wait_for_function("document.getElementById('error').textContent.includes('changed since')", timeout=60000)
        assert changed and changed[0].status_code == 200, changed and changed[0].text
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == changed[0].json()["version"]
        assert httpx.get(f"{url}/models/part/versions").json()["history"][0]["action"] == "update"
        assert unexpected(errors, 409) == []
    finally:
        stop_server(proc, 20)


def test_the_undo_of_a_teaching_reads_the_model_folder_not_a_replica_that_has_not_reloaded(browser, model_dir,
                                                                                           tmp_path):
    """Two replicas on one model folder behind a load balancer: the page teaches through one, and its look at the
    model before the undo lands on the other, which has not loaded the taught version yet. The undo said the model
    had changed since and sent the operator to the command line; the version on disk, which the rollback checks
    under its lock, is the one to compare with."""
    import re

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "a.log", "--data-dir", str(tmp_path / "data"))
    other, proc_b = launch_server(models, tmp_path / "b.log", "--reload-interval", "0", "--record", "false")
    try:
        rng = np.random.default_rng(7)  # good parts under a new lamp, flagged; reviewed as actually good
        lit = np.clip(textured_part(rng).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8)
        r = httpx.post(f"{url}/score", params={"part_id": "lamp", "line": "L1"}, files={"file": ("l", png_bytes(lit))},
                       timeout=30)
        assert r.status_code == 200 and r.json()["is_anomaly"], r.text
        (item,) = recorded_on(url, "L1", 1)
        assert httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good"},
                          headers={"X-Reviewer": "qa"}).status_code == 200
        before = httpx.get(f"{url}/models").json()["models"][0]["version"]
        page, errors = _teach_from_queue(browser, url)
        page.wait_for_selector("#teach-undo:not([hidden])", timeout=60000)
        assert httpx.get(f"{other}/models").json()["models"][0]["version"] == before  # not reloaded there
        # the load balancer sends the page's looks at the model to the other replica
        page.route(re.compile(r".*/models/part(/versions)?$"),
                   lambda route: route.continue_(url=other + "/" + route.request.url.split("/", 3)[3]))
        page.once("dialog", lambda d: d.accept())
        page.click("#teach-undo")
        page.wait_for_function("document.getElementById('teach-said').textContent.includes('again') || "
                               "document.getElementById('error').textContent.includes('changed since')", timeout=60000)
        assert "changed since" not in page.inner_text("#error"), page.inner_text("#error")
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == before
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)
        stop_server(proc_b, 20)


def test_a_second_tabs_teaching_bar_follows_a_teaching_made_in_the_first(browser, model_dir, tmp_path):
    """Two tabs on the queue offer the same parts; one teaches them. The other offered them until its next review,
    and a press there answered "no new good image to add", which did not say that the bar was stale. Its poll of
    the models now re-asks the bar when the chosen model's version changed (and asks nothing while it stays), and a
    press refused because the model changed meanwhile says so; the bar then shows what is left."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        rng = np.random.default_rng(7)  # good parts under a new lamp: the model flags them
        photos = {f"lamp-{i}": np.clip(textured_part(rng).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8)
                  for i in (1, 2)}
        # a dimmer lamp still: flagged by the version that learnt the first two too
        photos["dim-3"] = np.clip(textured_part(rng).astype(np.float32) * 0.4 + 20, 0, 255).astype(np.uint8)

        def reviewed_good(names: list[str], n: int) -> None:
            for name in names:
                r = httpx.post(f"{url}/score", params={"part_id": name, "line": "L1"},
                               files={"file": (name, png_bytes(photos[name]))}, timeout=30)
                assert r.status_code == 200 and r.json()["is_anomaly"], name
            for item in recorded_on(url, "L1", n):
                if item["part_id"] in names:
                    r = httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good"},
                                   headers={"X-Reviewer": "qa"})
                    assert r.status_code == 200, r.text
        reviewed_good(["lamp-1", "lamp-2"], 2)
        tabs = [open_page(browser, url) for _ in range(2)]
        for page, _ in tabs:
            page.fill("#reviewer", "m.keller")
            page.click("#tab-queue")
            page.wait_for_selector("#teach:not([hidden])", timeout=10000)
            assert "flagged 2 parts" in page.inner_text("#teach")
        (first, first_errors), (second, second_errors) = tabs
        asked: list[str] = []
        second.on("request", lambda r: asked.append(r.url) if "false-alarms" in r.url else None)
        for _ in range(2):  # the version has not changed: the poll asks the bar nothing
            second.evaluate("poll()")
        assert asked == []
        first.once("dialog", lambda d: d.accept())
        first.click("#teach-go")
        first.wait_for_function("document.getElementById('teach-said').textContent.includes('2 parts learnt')",
                                timeout=60000)
        assert second.is_visible("#teach-go")  # nothing has told it yet
        second.evaluate("poll()")  # the page's own 30 s poll, called now
        second.wait_for_selector("#teach", state="hidden", timeout=10000)
        assert len(asked) == 1

        # a part reviewed since, offered by both; taught in the first, pressed in the second before its poll
        reviewed_good(["dim-3"], 3)
        for page in (first, second):
            page.evaluate("offerTeaching()")
            page.wait_for_function("document.getElementById('teach-go').textContent === 'Teach part it'",
                                   timeout=10000)
        first.once("dialog", lambda d: d.accept())
        first.click("#teach-go")
        first.wait_for_function("document.getElementById('teach-said').textContent.includes('1 part learnt')",
                                timeout=60000)
        second.once("dialog", lambda d: d.accept())
        second.click("#teach-go")
        second.wait_for_function("document.getElementById('error').textContent.includes('changed since this bar')",
                                 timeout=60000)
        assert "nothing was changed by this press" in second.inner_text("#error")
        second.wait_for_selector("#teach", state="hidden", timeout=10000)
        assert httpx.get(f"{url}/models/part/versions").json()["history"][0]["action"] == "update"
        assert len(httpx.get(f"{url}/models/part/versions").json()["history"]) == 2  # the refused press made none
        assert unexpected(first_errors) == [] and unexpected(second_errors, 422) == []
    finally:
        stop_server(proc, 20)


def test_the_teaching_bar_follows_the_model_chosen_for_it_when_the_one_it_offered_is_removed(browser, model_dir,
                                                                                              tmp_path):
    """The bar offered to teach model part; part is removed on the server, and the poll moves the choice to the
    other model (saying so), but the bar went on offering part's parts ("Teach part it") beside the other's name,
    and once part came back (a fresh copy under the same name) it still did: its re-offer looked only at the model
    it had offered for. It now follows the model chosen: the other's offer, asked once; and when part is served
    again under the other's choice, nothing more."""
    models = tmp_path / "models"
    for name in ("part", "other"):
        shutil.copytree(model_dir / "part", models / name)
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        rng = np.random.default_rng(7)
        dim = np.clip(textured_part(rng).astype(np.float32) * 0.6 + 40, 0, 255).astype(np.uint8)  # flagged
        r = httpx.post(f"{url}/score", params={"model": "part", "part_id": "lamp-1", "line": "L1"},
                       files={"file": ("lamp-1.png", png_bytes(dim))}, timeout=30)
        assert r.status_code == 200 and r.json()["is_anomaly"]
        item = recorded_on(url, "L1", 1)[0]
        assert httpx.post(f"{url}/inspections/{item['id']}/review", json={"verdict": "good"},
                          headers={"X-Reviewer": "qa"}).status_code == 200
        page, errors = open_page(browser, url)
        page.fill("#reviewer", "m.keller")
        page.select_option("#model", "part")
        page.click("#tab-queue")
        page.wait_for_function("document.getElementById('teach-go').textContent === 'Teach part it'", timeout=10000)
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url) if "false-alarms" in r.url else None)
        shutil.rmtree(models / "part")
        assert httpx.post(f"{url}/models/reload").status_code == 200
        page.evaluate("poll()")  # the page's own 30 s poll, called now
        page.wait_for_function("document.getElementById('model').value === 'other'", timeout=10000)
        page.wait_for_selector("#teach", state="hidden", timeout=10000)  # the other has nothing to learn
        assert [u.split("/models/")[1].split("/")[0] for u in asked] == ["other"]
        shutil.copytree(model_dir / "part", models / "part")  # part again, under the same name
        assert httpx.post(f"{url}/models/reload").status_code == 200
        for _ in range(2):
            page.evaluate("poll()")
        assert page.input_value("#model") == "other" and page.is_hidden("#teach")
        assert [u.split("/models/")[1].split("/")[0] for u in asked] == ["other"]  # its version stays: nothing more
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)


def test_a_map_that_did_not_load_once_is_asked_for_again(browser, server, tmp_path):
    """The page kept a failed request for the image map as the version's map for good: one network blip after a
    score left every later part of that version without its place among the training images until the page was
    reloaded. A failure is not kept; the next part asks again."""
    url, _ = server
    page, errors = open_page(browser, url)
    asked: list[str] = []

    def blip_once(route) -> None:
        asked.append(route.request.url)
        route.abort() if len(asked) == 1 else route.continue_()

    page.route("**/models/part/embedding", blip_once)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(textured_part(np.random.default_rng(9))))
    page.set_input_files("#file", str(good))
    page.wait_for_function("document.getElementById('decision').textContent === 'normal'", timeout=30000)
    for _ in range(100):  # the map's request failed: the figure stays hidden
        if asked:
            break
        page.wait_for_timeout(50)
    assert asked and page.is_hidden("#embfig")
    page.set_input_files("#file", str(good))
    page.wait_for_selector("#embpart", timeout=15000)
    assert len(asked) == 2
    assert [e for e in unexpected(errors) if "ERR_FAILED" not in e] == []  # the blip, said by Chromium


def test_the_model_view_pages_through_a_long_change_log(browser, model_dir, tmp_path):
    """The Model view showed the newest 50 changes and no more: an engineer auditing a model taught for months
    could not see who changed it before that on the page. Older changes come a page at a time, in order, each once:
    the pages count from the newest change, and a change logged after the view was built (an update from another
    station) moved the older ones down a place, so the next page began with the oldest change shown again. Each page
    now goes on from the cursor where the one before ended."""
    from anomaly_service import model_history

    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    for i in range(120):  # three views' worth: the second page goes on from the first page's cursor
        model_history.record(models / "part", "update", f"v{i + 1}", f"v{i}", by=f"reviewer {i}", note=f"batch {i}")
    url, proc = launch_server(models, tmp_path / "server.log", "--record", "false")
    try:
        page, errors = open_page(browser, url)
        page.click("#tab-modelview")
        page.wait_for_selector("#m-history li", timeout=10000)
        assert page.locator("#m-history li").count() == 50 and page.is_visible("#m-older")
        assert "batch 119" in page.locator("#m-history li").first.inner_text()
        logged = 120
        for shown in (100, 120):
            for _ in range(3):  # logged while the engineer reads the view
                model_history.record(models / "part", "update", f"v{logged + 1}", f"v{logged}", by="ann",
                                     note=f"batch {logged}")
                logged += 1
            page.click("#m-older")
            page.wait_for_function(f"document.querySelectorAll('#m-history li').length >= {shown}", timeout=10000)
            page.wait_for_function("!document.getElementById('m-older').disabled", timeout=10000)
        items = page.locator("#m-history li").all_inner_texts()
        assert len(items) == 120 and [f"“batch {i}”" in t for i, t in zip(range(119, -1, -1), items)] == [True] * 120
        assert page.is_hidden("#m-older") and unexpected(errors, 503) == []  # its records are off
        page.close()
    finally:
        stop_server(proc)


def test_the_model_view_shows_the_versions_and_serves_an_earlier_one_again(browser, model_dir, tmp_path):
    """A plant engineer whose update went wrong had to find the command line (`anomaly rollback`) or the API. The
    Model view shows what the model is, the versions kept and its change log (who, when, why), and serves an
    earlier version again under the reviewer's name, once confirmed; a change made elsewhere shows at the next look."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    lagging, proc_b = launch_server(models, tmp_path / "b.log", "--reload-interval", "0", "--record", "false")
    try:
        fitted = httpx.get(f"{url}/models").json()["models"][0]["version"]
        rng = np.random.default_rng(31)
        r = httpx.post(f"{url}/models/part/update", files=[("files", (f"g{i}.png", png_bytes(textured_part(rng))))
                                                           for i in range(2)],
                       data={"note": "two parts of the new batch"}, headers={"X-Reviewer": "k.tanaka"}, timeout=120)
        assert r.status_code == 200, r.text
        updated = r.json()["version"]
        # a replica that has not reloaded yet serves the version before: its view says the folder holds another
        page, errors = open_page(browser, lagging)
        page.click("#tab-modelview")
        page.wait_for_selector("#m-versions button", timeout=10000)
        assert f"{fitted} (the model folder holds {updated} now" in page.inner_text("#m-facts")
        assert unexpected(errors, 503) == []  # its records are off
        page.close()
        page, errors = open_page(browser, url)
        page.click("#tab-modelview")
        page.wait_for_selector("#m-versions button", timeout=10000)
        facts = page.inner_text("#m-facts")
        assert updated in facts and "Trained on" in facts and "Threshold" in facts
        rows = page.locator("#m-versions tbody tr")
        assert rows.count() == 2 and "serving" in rows.nth(0).inner_text() and updated in rows.nth(0).inner_text()
        assert fitted in rows.nth(1).inner_text() and page.locator("#m-versions button").count() == 1
        # the button beside the version, on a phone too (the table scrolls sideways there)
        page.set_viewport_size({"width": 390, "height": 844})
        box = page.locator("#m-versions button").bounding_box()
        assert box["x"] + box["width"] <= 390
        page.set_viewport_size(DESKTOP)
        log = page.inner_text("#m-history")
        assert "update (+2 images)" in log and "k.tanaka" in log and "two parts of the new batch" in log, log

        page.fill("#reviewer", "")
        page.click("#m-versions button")  # who changes the model is recorded: no name, no change
        assert "Enter your name in Reviewer" in page.inner_text("#error")
        page.fill("#reviewer", "m.keller")
        page.fill("#m-note", "the update passes a crack")
        asked = []
        page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
        page.click("#m-versions button")  # asked first; dismissed, nothing changes
        assert asked and fitted in asked[0] and "decides which parts ship" in asked[0]
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == updated
        page.once("dialog", lambda d: d.accept())
        page.click("#m-versions button")
        page.wait_for_function("document.getElementById('m-said').textContent.includes('serves again')",
                               timeout=60000)
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == fitted
        page.wait_for_function(f"document.querySelector('#m-versions tbody tr').innerText.includes('{fitted}')",
                               timeout=10000)
        assert "serving" in rows.nth(0).inner_text() and page.input_value("#m-note") == ""
        change = httpx.get(f"{url}/models/part/versions").json()["history"][0]
        assert (change["action"], change["by"], change["note"], change["version"]) == (
            "rollback", "m.keller", "the update passes a crack", fitted)
        assert "rollback" in page.inner_text("#m-history").splitlines()[0]

        # rolled forward again elsewhere (the command line, another station): the view's next look shows it
        r = httpx.post(f"{url}/models/part/rollback", json={"version": updated}, headers={"X-Reviewer": "cli"})
        assert r.status_code == 200, r.text
        page.evaluate("showModel()")  # what the 30 s poll does while the view is shown
        page.wait_for_function(f"document.querySelector('#m-versions tbody tr').innerText.includes('{updated}')",
                               timeout=10000)
        assert updated in page.inner_text("#m-facts") and "model folder holds" not in page.inner_text("#m-facts")

        # changed elsewhere while the view is open, before its next look: a Serve again pressed on what it shows
        # takes back nothing it did not show; it says so and shows the versions as they are
        r = httpx.post(f"{url}/models/part/rollback", json={"version": fitted}, headers={"X-Reviewer": "cli"})
        assert r.status_code == 200, r.text
        page.once("dialog", lambda d: d.accept())
        page.click("#m-versions button")  # the view still shows `updated` serving and `fitted` to serve again
        page.wait_for_function("document.getElementById('error').textContent.includes('changed while this view')",
                               timeout=10000)
        assert httpx.get(f"{url}/models").json()["models"][0]["version"] == fitted
        page.wait_for_function(f"document.querySelector('#m-versions tbody tr').innerText.includes('{fitted}')",
                               timeout=10000)
        assert unexpected(errors, 409) == []
    finally:
        stop_server(proc, 20)
        stop_server(proc_b, 20)


def test_the_model_view_shows_the_training_images_the_guard_listed(browser, tmp_path):
    """A defective part in ./good is learnt as normal; the fit's guard lists the images that look unlike the others,
    but only in its output and the report, by path, where an engineer who did not run the fit never looks. The Model
    view shows each with its picture and how far it stands out, the worst first."""
    from anomaly_service import AnomalyModel

    from conftest import SMALL

    rng = np.random.default_rng(7)
    goods = [textured_part(rng) for _ in range(16)]
    hidden = add_defect(textured_part(np.random.default_rng(8)), 64, 64, radius=14)[0]
    names = [f"line3/good/{i:02d}.png" for i in range(16)] + ["line3/good/hidden_defect.png"]
    model = AnomalyModel(**SMALL).fit(goods + [hidden], names=names)
    assert "line3/good/hidden_defect.png" in [s.name for s in model.suspects_]
    model.save(tmp_path / "models" / "part")
    url, proc = launch_server(tmp_path / "models", tmp_path / "server.log", "--record", "false")
    try:
        page, errors = open_page(browser, url)
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url) if "/training-images/" in r.url else None)
        page.click("#tab-modelview")
        page.wait_for_selector("#m-suspects:not([hidden])", timeout=10000)
        assert "They are in the model" in page.inner_text("#m-suspects-say")
        first = page.locator("#m-suspects-list figure").first
        assert first.locator("figcaption").inner_text().startswith("hidden_defect.png: ")  # the worst first
        page.wait_for_function("(() => { const i = document.querySelector('#m-suspects-list figure img');"
                               " return i && i.complete && i.naturalWidth > 0; })()", timeout=10000)
        assert first.locator("img").get_attribute("alt") == "training image line3/good/hidden_defect.png"
        # asked by digest, as a region's evidence is: behind replicas serving different versions, that image or none
        digest = model.catalog_.digests[model.catalog_.names.index("line3/good/hidden_defect.png")]
        assert asked and all("sha256=" in u for u in asked) and any(digest in u for u in asked), asked
        assert f"({len(model.suspects_)} looked unlike the others at the fit: kept)" in page.inner_text("#m-facts")
        from test_web_access import violations  # the pictures named for a screen reader, as the other views' are

        assert violations(page) == []
        assert unexpected(errors, 503) == []  # the records are off: the probe's 503 answers
    finally:
        stop_server(proc, 20)


def test_the_model_views_poll_leaves_the_keyboard_on_the_button_it_was_on(browser, model_dir, tmp_path):
    """The Model view's 30 s look rebuilt the whole view whenever anything in it changed, and the line's drift
    changes with every part scored: on a running line each poll took the keyboard's focus off the Serve again an
    engineer had tabbed to and dropped it onto the page's top. The versions table is rebuilt only when the versions
    change, and then the focus goes back to that version's button, or to the view where that version serves now."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        fitted = httpx.get(f"{url}/models").json()["models"][0]["version"]
        rng = np.random.default_rng(41)
        r = httpx.post(f"{url}/models/part/update", files=[("files", ("g.png", png_bytes(textured_part(rng))))],
                       headers={"X-Reviewer": "k.tanaka"}, timeout=120)
        assert r.status_code == 200, r.text
        page, errors = open_page(browser, url)
        page.click("#tab-modelview")
        page.wait_for_selector("#m-versions button", timeout=10000)
        page.focus("#m-versions button")
        r = httpx.post(f"{url}/score", files={"file": ("p.png", png_bytes(textured_part(rng)))}, timeout=30)
        assert r.status_code == 200, r.text
        page.evaluate("showModel()")  # what the 30 s poll does while the view is shown
        assert "1 of the" in page.inner_text("#m-facts")  # the line ran: the drift's count moved on
        assert page.evaluate("document.activeElement.dataset.version") == fitted

        # served again elsewhere: its button goes, and the focus with it to the view, not to the page's top
        r = httpx.post(f"{url}/models/part/rollback", json={"version": fitted}, headers={"X-Reviewer": "cli"})
        assert r.status_code == 200, r.text
        page.evaluate("showModel()")
        assert "serving" in page.locator("#m-versions tbody tr").nth(0).inner_text()
        assert page.evaluate("document.activeElement.id") == "modelview"
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)


def test_the_model_view_of_a_model_with_the_longest_name_fits_a_phone(browser, fitted_model, tmp_path):
    """A model's name may be 128 characters with no space (a line, a part number and a variant run together). The
    Model view's title, what it says after a Serve again and the message of a change made elsewhere meanwhile did
    not wrap: the whole page scrolled sideways at a phone's width (and at 200 % zoom), its controls off the screen."""
    name = ("Line3_housing_A2_" * 8)[:128]
    fitted_model.save(tmp_path / "models" / name)
    url, proc = launch_server(tmp_path / "models", tmp_path / "server.log", "--record", "false")
    try:
        fitted = httpx.get(f"{url}/models").json()["models"][0]["version"]
        r = httpx.post(f"{url}/models/{name}/update",
                       files=[("files", ("g.png", png_bytes(textured_part(np.random.default_rng(43)))))], timeout=120)
        assert r.status_code == 200, r.text
        updated = r.json()["version"]
        page = browser.new_page(viewport=PHONE, bypass_csp=True)
        page.goto(url + "/")
        page.wait_for_selector(f"#model option[value='{name}']", state="attached", timeout=15000)
        page.fill("#reviewer", "m.keller")
        page.click("#tab-modelview")
        page.wait_for_selector("#m-versions button", timeout=10000)
        wide = "document.documentElement.scrollWidth"
        assert name in page.inner_text("#m-title") and page.evaluate(wide) <= PHONE["width"]
        # rolled back elsewhere meanwhile: the page's Serve again says so, naming the model
        r = httpx.post(f"{url}/models/{name}/rollback", json={"version": fitted})
        assert r.status_code == 200, r.text
        page.once("dialog", lambda d: d.accept())
        page.click("#m-versions button")
        page.wait_for_function("document.getElementById('error').textContent.includes('changed while this view')",
                               timeout=10000)
        assert page.evaluate(wide) <= PHONE["width"]
        page.wait_for_selector(f"#m-versions button[aria-label='Serve version {updated} again']", timeout=10000)
        page.once("dialog", lambda d: d.accept())
        page.click("#m-versions button")
        page.wait_for_function("document.getElementById('m-said').textContent.includes('serves again')",
                               timeout=60000)
        assert page.evaluate(wide) <= PHONE["width"]
        page.set_viewport_size({"width": 640, "height": 400})  # a 1280 px window at 200 % zoom
        assert page.evaluate(wide) <= 640
    finally:
        stop_server(proc, 20)


def test_a_serve_again_in_flight_leaves_the_model_the_engineer_moved_on_to_be(browser, model_dir, tmp_path):
    """A Serve again takes seconds (the version is loaded and warmed). An engineer who picked another model meanwhile
    and pressed its Serve again got nothing (the page waited on the first, and said nothing); when the first
    answered, the page emptied the Why they were typing for the other model and took the keyboard's focus from it.
    A press while one is under way is told so; the answer leaves another model's note and the focus where they are."""
    models = tmp_path / "models"
    for name in ("part", "part_b"):
        shutil.copytree(model_dir / "part", models / name)
    url, proc = launch_server(models, tmp_path / "server.log", "--record", "false")
    try:
        fitted = httpx.get(f"{url}/models/part").json()["summary"]["version"]
        rng = np.random.default_rng(47)
        for name in ("part", "part_b"):
            r = httpx.post(f"{url}/models/{name}/update", files=[("files", ("g.png", png_bytes(textured_part(rng))))],
                           timeout=120)
            assert r.status_code == 200, r.text
        page, errors = open_page(browser, url)
        held = []
        page.route("**/models/part/rollback", lambda route: held.append(route))  # the answer, held back a while
        page.fill("#reviewer", "m.keller")
        page.select_option("#model", "part")
        page.click("#tab-modelview")
        page.wait_for_selector("#m-versions button", timeout=10000)
        page.once("dialog", lambda d: d.accept())
        page.click("#m-versions button")
        page.wait_for_function("document.getElementById('m-said').textContent.includes('Loading')", timeout=10000)
        assert held
        page.select_option("#model", "part_b")
        page.wait_for_function("document.getElementById('m-title').textContent === 'Model part_b'", timeout=10000)
        page.click("#m-versions button")
        assert "under way" in page.inner_text("#error")  # said, not a press that does nothing
        page.fill("#m-note", "the new supplier's parts")
        held[0].continue_()
        page.wait_for_function("document.getElementById('m-said').textContent.includes('serves again')",
                               timeout=60000)
        assert httpx.get(f"{url}/models/part").json()["summary"]["version"] == fitted
        assert page.input_value("#m-note") == "the new supplier's parts"
        assert page.evaluate("document.activeElement.id") == "m-note"
        assert unexpected(errors, 503) == []  # the records are off: the probe's 503 answers
    finally:
        stop_server(proc, 20)


# ----------------------------------------------------------------------------------------------- an operator's shift
# (docs/decisions.md, "An operator's shift in the browser (session 74)")


def test_the_teaching_bar_says_when_the_version_it_taught_serves_no_more(browser, model_dir, tmp_path):
    """The queue teaches the model; then another station serves the version before the teaching again. The bar went
    on saying "Model part version ... serves now", with "Undo: serve ... again", for the rest of the shift: a version
    label that lied. The poll that finds another version served now says the model changed since, and offers no
    undo (the Model view lists every version)."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        page, errors = _lamp_parts_taught(browser, url)
        assert page.is_visible("#teach-undo")
        history = httpx.get(f"{url}/models/part/versions").json()["history"]
        taught, before = history[0]["version"], history[0]["previous"]
        page.evaluate("poll()")  # nothing changed: the bar stands
        assert page.is_visible("#teach-undo") and "serves now" in page.inner_text("#teach-said")

        r = httpx.post(f"{url}/models/part/rollback", json={"version": before, "replaces": taught},
                       headers={"X-Reviewer": "a.other"}, timeout=60)  # another station
        assert r.status_code == 200, r.text
        page.evaluate("poll()")  # the page's own 30 s poll, called now
        page.wait_for_function("document.getElementById('teach-said').textContent.includes('changed since')",
                               timeout=10000)
        said = page.inner_text("#teach-said")
        assert f"version {before} serves now" in said and taught in said
        assert page.is_hidden("#teach-undo")
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)


def test_the_page_says_when_the_records_database_takes_no_writes(browser, model_dir, tmp_path):
    """The records' volume fills mid-shift: the service goes on scoring and holds the records, and the lists read
    the database as before. The page said nothing: the line's parts stopped coming to Live, History and the queue
    had none of them, as on a quiet line. It now says so while /readyz says the writer is retrying, and stops once
    the records go in again."""
    from conftest import fill, mounted

    with mounted(tmp_path / "vol", "16m") as vol:
        url, proc = launch_server(model_dir, tmp_path / "server.log", "--data-dir", str(vol / "data"))
        try:
            page, errors = open_page(browser, url)
            page.wait_for_function("document.getElementById('qcount').textContent === '(0 flagged)'", timeout=10000)
            filler = fill(vol)
            r = httpx.post(f"{url}/score", params={"line": "full"}, files={"file": ("x.png", defect_png(3))},
                           timeout=30)
            assert r.status_code == 200
            eventually(lambda: httpx.get(f"{url}/readyz").json()["recording"] == "retrying", 60)
            page.evaluate("poll()")  # the page's own 30 s poll, called now
            page.wait_for_selector("#recnote:not([hidden])", timeout=10000)
            assert "cannot write its records database" in page.inner_text("#recnote")
            filler.unlink()
            eventually(lambda: httpx.get(f"{url}/readyz").json()["recording"] == "on", 120)
            page.evaluate("poll()")
            page.wait_for_selector("#recnote", state="hidden", timeout=10000)
            assert recorded_on(url, "full", 1)
            assert unexpected(errors) == []
        finally:
            stop_server(proc, 30)


def test_a_records_probe_answered_late_does_not_undo_a_newer_ones_word(browser, server, tmp_path):
    """The review of session 74: two probes of the records overlap (the 30 s poll, a review, a flagged line part),
    and the older one's /readyz answers last. It said "retrying" from before the writer recovered, and showed the
    note the newer probe had just hidden, for up to a poll. Only the newest probe's answers write the note."""
    url, _ = server
    page, errors = open_page(browser, url)
    page.wait_for_function("recording === true", timeout=10000)
    held: list = []

    def hold_first(route) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/readyz", hold_first)
    page.evaluate("() => { window.olderProbe = probeRecords(); }")  # its /readyz held
    page.wait_for_function("true")  # the route handler has run by the next round trip
    assert len(held) == 1
    page.evaluate("async () => { await probeRecords(); }")  # the newer probe: the writer is well
    assert page.is_hidden("#recnote")
    held[0].fulfill(json={"status": "ready", "recording": "retrying"})  # the older answer, from before
    page.evaluate("async () => { await window.olderProbe; }")
    assert page.is_hidden("#recnote"), page.inner_text("#recnote")
    page.unroute("**/readyz")
    assert unexpected(errors) == []


def test_the_queues_count_follows_the_flagged_parts_live_shows(browser, model_dir, tmp_path):
    """Live shows each flagged part the line scores, while the queue's tab under it went on saying "(0 flagged)"
    until the next 30 s poll. A flagged part shown asks the count again."""
    url, proc = launch_server(model_dir, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        page, errors = open_page(browser, url)
        page.wait_for_function("document.getElementById('qcount').textContent === '(0 flagged)'", timeout=10000)
        page.wait_for_function("liveNewest !== null", timeout=10000)  # the line followed from now on
        recorded_defect(url, "count-1", 5)
        page.wait_for_function("document.getElementById('rpart').textContent.includes('count-1')", timeout=10000)
        # well within the 30 s poll
        page.wait_for_function("document.getElementById('qcount').textContent === '(1 flagged)'", timeout=5000)
        assert unexpected(errors) == []
    finally:
        stop_server(proc, 20)


def test_an_operator_who_moves_on_while_a_review_is_saved_stays_on_the_part_they_went_to(browser, server, tmp_path):
    """On a slow network the operator presses D, then J to the next part and types its note before the answer
    comes. The answer moved them on again, one part past the one they were on, and emptied the note typed there.
    They now stay where they went, note and all."""
    url, _ = server
    line = f"SLOW-{uuid.uuid4().hex[:8]}"
    parts_recorded(url, line, (("s-1", 61), ("s-2", 62), ("s-3", 63)))
    page, errors = open_page(browser, url)
    page.fill("#reviewer", "ann")
    list_line(page, line, 3)  # newest first: s-3, s-2, s-1
    page.click("#hlist li:first-child button")
    page.wait_for_function("shown && shown.part_id === 's-3' && document.getElementById('d-reviews').innerText"
                           ".includes('not reviewed yet')", timeout=10000)
    held = []
    page.route("**/review", lambda route: held.append(route))  # the answer comes late
    page.keyboard.press("d")
    page.wait_for_function("document.getElementById('btn-defect').getAttribute('aria-disabled') === 'true'")
    page.keyboard.press("j")
    page.wait_for_function("shown.part_id === 's-2'", timeout=10000)
    page.fill("#note", "a scratch on this one")
    held[0].continue_()
    page.wait_for_function("document.getElementById('status').innerText.includes('Saved: real defect (s-3)')",
                           timeout=10000)
    page.wait_for_function("document.getElementById('btn-defect').getAttribute('aria-disabled') === 'false'")
    assert page.evaluate("shown.part_id") == "s-2"
    assert page.input_value("#note") == "a scratch on this one"
    assert "✖ real defect" in page.inner_text("#hlist li:first-child")
    assert unexpected(errors) == []


def test_a_review_answered_after_the_operator_changed_views_leaves_the_other_views_part_shown(browser, server,
                                                                                              tmp_path):
    """The operator presses D in the queue and, before the answer, opens History and a part there. The answer
    selected the queue's next part into the one detail card: History showed a queue part's photo, heatmap and
    verdict under its own selected row. The card now stays History's part, and the queue, shown again, is on the
    part reviewed."""
    url, _ = server
    line = f"VIEWS-{uuid.uuid4().hex[:8]}"
    parts_recorded(url, line, (("v-1", 71), ("v-2", 72)))
    page, errors = open_page(browser, url)
    page.fill("#reviewer", "ann")
    page.click("#tab-queue")
    page.wait_for_function("shown !== null", timeout=10000)
    in_queue = page.evaluate("shown.id")
    held = []
    page.route("**/review", lambda route: held.append(route))
    page.locator("#detail").click(position={"x": 5, "y": 5})
    page.keyboard.press("d")
    page.wait_for_function("document.getElementById('btn-defect').getAttribute('aria-disabled') === 'true'")
    list_line(page, line, 2)
    page.click("#hlist li:first-child button")
    page.wait_for_function("shown.part_id === 'v-2'", timeout=10000)
    held[0].continue_()
    page.wait_for_function("document.getElementById('btn-defect').getAttribute('aria-disabled') === 'false'",
                           timeout=10000)
    page.wait_for_timeout(500)  # a selection the answer would make is drawn at once
    assert page.evaluate("shown.part_id") == "v-2"
    assert page.evaluate("document.querySelector('#hslot #detail') !== null && !$('detail').hidden")
    assert "v-2" in page.inner_text("#d-meta")
    assert httpx.get(f"{url}/inspections/{in_queue}").json()["verdict"] == "defect"
    page.click("#tab-queue")  # the queue, shown again, on the part reviewed, with its verdict
    page.wait_for_function(f"shown.id === {in_queue!r}", timeout=10000)
    assert "reviewed: real defect" in page.inner_text("#d-title")
    assert unexpected(errors) == []


def test_the_teaching_bar_says_when_the_model_it_taught_is_removed(browser, model_dir, tmp_path):
    """The review: the model the queue taught is taken off the server (its folder removed, the models reloaded).
    The poll finds it served no more; the bar says so and offers no undo, with no error on the page."""
    models = tmp_path / "models"
    shutil.copytree(model_dir / "part", models / "part")
    url, proc = launch_server(models, tmp_path / "server.log", "--data-dir", str(tmp_path / "data"))
    try:
        page, errors = _lamp_parts_taught(browser, url)
        shutil.rmtree(models / "part")
        r = httpx.post(f"{url}/models/reload", timeout=60)
        assert r.status_code == 200, r.text
        assert "part" not in [m["name"] for m in httpx.get(f"{url}/models").json()["models"]]
        page.evaluate("poll()")  # the page's own 30 s poll, called now
        page.wait_for_function("document.getElementById('teach-said').textContent.includes('no longer served')",
                               timeout=10000)
        assert page.is_hidden("#teach-undo")
        assert "no model is loaded" in page.inner_text("#error").lower()
        # the model's own routes answer 404 and the page's readiness 503 now, as the page then says; nothing else
        assert all(("404" in e or "503" in e) and "Failed to load resource" in e for e in unexpected(errors)), errors
    finally:
        stop_server(proc, 20)
