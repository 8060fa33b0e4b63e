"""The page at / in a real headless browser (Debian's chromium driven by Playwright; no browser download)."""

import os
import shutil

import numpy as np
import pytest

from conftest import add_defect, png_bytes, textured_part

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed machine with no network: no background connections, no GPU, no first-run UI.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium) - browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_page_scores_a_dropped_image(browser, server, tmp_path):
    url, _ = server
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes(add_defect(textured_part(np.random.default_rng(8)), 64, 40)[0]))
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(textured_part(np.random.default_rng(9))))
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"this is not an image")

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#model option[value=part]", state="attached", timeout=15000)

    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#result:not([hidden])", timeout=30000)
    assert page.inner_text("#decision") == "ANOMALY"
    assert float(page.inner_text("#nscore")) > 1.0
    page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
    assert page.evaluate("[document.getElementById('overlay').naturalWidth, "
                         "document.getElementById('overlay').naturalHeight]") == [128, 128]
    assert page.locator("#regions tr").count() >= 2  # header + at least one box
    page.screenshot(path=str(tmp_path / "page.png"))

    page.set_input_files("#file", str(good))
    page.wait_for_function("document.getElementById('decision').textContent === 'normal'", timeout=30000)

    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.includes('415')", timeout=30000)
    assert "not_image" in page.inner_text("#error")
    assert errors == []
