"""The page at / for operators unlike its developer (WCAG 2.1 AA, and 2.2's 24 px targets): axe-core run in the real
browser over each state of the page (a good part, a flagged one with its heatmap and regions, an error, History,
the review queue, the model, the drift banner), and what axe cannot see: the decision said to a screen reader, the
focus kept after an action, one-letter keys that act only where the operator is, targets a gloved finger can hit,
and the page at 200 % zoom. One server and one browser page go through the states in turn."""

import signal
import uuid

import httpx
import numpy as np
import pytest

from conftest import launch_server, png_bytes, textured_part
from test_web import defect_png, open_page, unexpected

# The WCAG 2.0/2.1 A and AA rules, 2.2's target size (AA) and axe's best practices (headings in order among them).
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]

# Visible controls smaller than 24 by 24 CSS px, named; WCAG 2.5.8 lets a small one pass for the space around it,
# a gloved finger on a tablet does not, so every control is held to the size itself.
SMALL_TARGETS = """() => [...document.querySelectorAll('button, input, select, textarea, [role=button]')]
  .filter((e) => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden')
  .map((e) => [e.id || e.outerHTML.slice(0, 60), e.getBoundingClientRect()])
  .filter(([, r]) => r.width < 24 || r.height < 24).map(([n, r]) => `${n} ${r.width}x${r.height}`)"""

# What the page's live regions (aria-live, or a status or alert role) say, where they are shown.
SPOKEN = """() => [...document.querySelectorAll('[aria-live]:not([aria-live=off]), [role=status], [role=alert]')]
  .filter((e) => !e.closest('[hidden]')).map((e) => e.textContent).join(' | ')"""


def violations(page) -> list[str]:
    """axe-core's violations of the page as it is now, one line each: rule, impact and the elements."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS}, "resultTypes": ["violations"]})
    return [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]}" for v in found.response["violations"]]


def check_state(page, name: str, seen: dict) -> None:
    """axe and the target sizes of one state of the page, kept under its name."""
    seen[name] = violations(page) + [f"target under 24 px: {t}" for t in page.evaluate(SMALL_TARGETS)]


def focused(page) -> str:
    return page.evaluate("document.activeElement === document.body ? 'BODY' : "
                         "(document.activeElement.id || document.activeElement.closest('[id]').id)")


@pytest.fixture(scope="module")
def station(model_dir, tmp_path_factory):
    """One service of its own records (a queue of this module's parts only) and a drift window small enough for the
    session model's four calibration images."""
    tmp = tmp_path_factory.mktemp("access")
    url, proc = launch_server(model_dir, tmp / "server.log", "--data-dir", str(tmp / "data"), "--drift-window", "10",
                              "--drift-min-parts", "5", "--drift-alpha", "0.05")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def test_each_state_of_the_page_holds_for_a_screen_reader_a_keyboard_and_a_glove(browser, station, tmp_path):
    url, tag = station, uuid.uuid4().hex[:8]
    good, bad, notes = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "notes.png"
    good.write_bytes(png_bytes(textured_part(np.random.default_rng(9))))
    bad.write_bytes(defect_png(8))
    notes.write_bytes(b"this is not an image")
    seen: dict[str, list[str]] = {}
    page, errors = open_page(browser, url)
    check_state(page, "empty", seen)

    # live view: the decision arrives, drawn and said (a screen reader is told through a live region)
    page.fill("#part_id", f"GOOD-{tag}")
    page.set_input_files("#file", str(good))
    page.wait_for_function("document.getElementById('decision').textContent === 'normal'", timeout=30000)
    page.wait_for_selector("#embfig:not([hidden])", timeout=10000)
    page.wait_for_function(f"({SPOKEN})().includes('normal')", timeout=5000)
    assert page.get_attribute("#overlay", "alt") == "heatmap over the photo: no region above the threshold"
    check_state(page, "good part", seen)
    page.fill("#part_id", f"BAD-{tag}")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('decision').textContent === 'ANOMALY'", timeout=30000)
    page.wait_for_function("document.querySelector('#evlist .train-thumb')", timeout=10000)
    regions = page.locator("#regions tr").count() - 1
    assert regions >= 1
    page.wait_for_function(f"({SPOKEN})().includes('ANOMALY')", timeout=5000)
    assert f"BAD-{tag}" in page.evaluate(SPOKEN) and "above the threshold" in page.evaluate(SPOKEN)
    # the heatmap in words, and its regions boxed on it: not orange against yellow-green, one colour to a deuteranope
    assert page.get_attribute("#overlay", "alt").startswith(f"heatmap over the photo: {regions} region")
    assert page.locator("#liveover .box").count() == regions
    check_state(page, "flagged part", seen)
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.includes('415')", timeout=30000)
    check_state(page, "error", seen)

    # History and the queue, each with a part open
    page.click("#tab-history")
    page.wait_for_function("document.querySelectorAll('#hlist li').length === 2", timeout=10000)
    page.wait_for_selector("#d-overlay img", timeout=10000)
    assert "above the threshold" in page.get_attribute("#d-overlay img", "alt")
    check_state(page, "history", seen)
    page.fill("#reviewer", "t.tester")
    page.click("#tab-queue")
    page.wait_for_function(f"document.querySelector('#qlist li')?.innerText.includes('BAD-{tag}')", timeout=10000)
    page.wait_for_selector("#d-overlay img", timeout=10000)
    page.wait_for_function("document.getElementById('d-reviews').innerText.includes('not reviewed yet')",
                           timeout=10000)
    check_state(page, "queue", seen)

    # a one-letter key pressed with the focus outside the view (say, a word a speech-input user dictates) reviews
    # nothing (WCAG 2.1.4); inside it, D reviews as before
    bad_id = httpx.get(f"{url}/inspections", params={"part_id": f"BAD-{tag}"}).json()["items"][0]["id"]
    page.locator("header h1").click()
    assert focused(page) == "BODY"
    page.keyboard.press("d")
    page.wait_for_timeout(700)
    assert httpx.get(f"{url}/inspections/{bad_id}").json()["verdict"] is None

    # a keyboard user's Enter on a review button, then on Undo: the focus stays in the view, not on the page's body
    page.focus("#btn-good")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status-text').textContent.includes('Saved')", timeout=10000)
    assert httpx.get(f"{url}/inspections/{bad_id}").json()["verdict"] == "good"
    assert focused(page) == "btn-good"
    check_state(page, "reviewed", seen)
    page.focus("#undo")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status-text').textContent.includes('Undone')", timeout=10000)
    assert focused(page) == "qlist"  # on the part's row again
    page.keyboard.press("d")  # and the keys work from there
    page.wait_for_function("document.getElementById('status-text').textContent.includes('real defect')",
                           timeout=10000)

    # Load more, pressed from the keyboard, brings the last page and goes away: the focus goes on to the first row
    # it brought, not to the page's body
    rng = np.random.default_rng(11)
    for i in range(30):  # a page of the list is thirty parts
        r = httpx.post(f"{url}/score", params={"part_id": f"MORE-{i}-{tag}"},
                       files={"file": ("x.png", png_bytes(textured_part(rng)))}, timeout=30)
        assert r.status_code == 200
    for _ in range(100):  # the records are written off the request path
        if len(httpx.get(f"{url}/inspections", params={"limit": 100}).json()["items"]) == 32:
            break
        page.wait_for_timeout(100)
    page.click("#tab-history")
    page.click("#hfilters button[type=submit]")
    page.wait_for_selector("#hmore:not([hidden])", timeout=10000)
    page.focus("#hmore")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#hlist li').length === 32", timeout=10000)
    page.wait_for_selector("#hmore", state="hidden", timeout=10000)
    assert page.evaluate("document.activeElement === document.querySelectorAll('#hlist li button')[30]")

    # the model: what it is, its versions (each earlier one with a button to serve it again) and its change log
    page.click("#tab-modelview")
    page.wait_for_selector("#m-versions tbody tr", timeout=10000)
    check_state(page, "model", seen)

    # 200 % zoom of a 1280 x 800 window, and 320 px (400 %): no view needs scrolling sideways
    for width, height in ((640, 400), (320, 640)):
        page.set_viewport_size({"width": width, "height": height})
        for view in ("modelview", "queue", "history", "live"):
            page.click(f"#tab-{view}")
            assert page.evaluate("document.documentElement.scrollWidth") <= width, (view, width)
    page.set_viewport_size({"width": 1280, "height": 800})

    # the drift banner: an alert, said once, not again at every poll while its words stay the same
    rng = np.random.default_rng(5)
    for _ in range(8):  # the line changes: brighter parts
        bright = np.clip(textured_part(rng).astype(np.int16) + 45, 0, 255).astype(np.uint8)
        assert httpx.post(f"{url}/score", files={"file": ("x.png", png_bytes(bright))}, timeout=30).status_code == 200
    page.evaluate("checkDrift()")
    page.wait_for_selector("#drift:not([hidden])", timeout=30000)
    check_state(page, "drift banner", seen)
    rewrites = page.evaluate("""async () => {
      let n = 0;
      new MutationObserver((m) => { n += m.length; }).observe($('drift'), {childList: true, subtree: true,
                                                                           characterData: true});
      await checkDrift(); await checkDrift();
      return n; }""")
    assert rewrites == 0

    assert {name: found for name, found in seen.items() if found} == {}
    assert unexpected(errors, 415) == []
