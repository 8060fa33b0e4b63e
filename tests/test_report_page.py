"""The page of ``anomaly evaluate --report`` (index.html) as a quality engineer opens it: in headless Chromium from the
folder, offline (every request a file of the report itself), readable (headings, captioned tables with header cells,
alternative text, axe-core's WCAG rules), and saying what sign-off needs: the data folder, the date, the model's
version, the threshold and how it was set, each test folder's count and flagged share, and the metrics as --json
gives them."""

import json
import shutil

from click.testing import CliRunner

from anomaly_service.artifact import model_version_id
from anomaly_service.cli import app
from test_web_access import violations


def test_the_report_page_opens_offline_and_says_what_sign_off_needs(browser, model_dir, synthetic_category, tmp_path):
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json",
                                   str(out), "--report", str(report)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["model"]["version"] == model_version_id(model_dir / "part")
    assert m["data_dir"] == str(synthetic_category.resolve())
    page = browser.new_page()
    asked, failed = [], []
    page.on("request", lambda request: asked.append(request.url))
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto((report / "index.html").as_uri())
    page.wait_for_load_state("load")
    try:
        assert failed == []
        assert asked and all(url.startswith(report.as_uri() + "/") for url in asked), asked
        shown = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth > 0, i.alt])")
        assert [s for s, _, _ in shown] == ["score_histogram.png", "roc.png", "pro.png", "worst_cases.png",
                                            "embedding_map.png"]
        assert all(loaded and alt for _, loaded, alt in shown), shown
        assert page.locator("h1").count() == 1 and page.locator("h2").count() >= 4
        assert page.locator("table caption").count() == page.locator("table").count() == 3
        assert violations(page) == []
        facts = dict(zip(page.locator("table").nth(0).locator("th").all_inner_texts(),
                         page.locator("table").nth(0).locator("td").all_inner_texts()))
        assert facts["Data folder"] == m["data_dir"] and facts["Model version"] == m["model"]["version"]
        assert facts["Evaluated at (UTC)"] == m["evaluated_at"]
        assert facts["Threshold"].startswith(f"{m['threshold']:.4f} raw score")
        assert m["model"]["threshold_method"] in facts["How the threshold was set"]
        folders = page.locator("table").nth(1).locator("tbody tr")
        rows = [folders.nth(i).locator("th, td").all_inner_texts() for i in range(folders.count())]
        assert [r[:3] for r in rows] == [[t, str(v["n"]), str(v["flagged"])] for t, v in m["by_type"].items()]
        numbers = dict(zip(page.locator("table").nth(2).locator("th").all_inner_texts(),
                           page.locator("table").nth(2).locator("td").all_inner_texts()))
        assert numbers["Image AUROC"] == f"{m['image_auroc']:.4f}" and numbers["PRO (area up to 30% false-positive "
                                                                          "pixels, normalized)"] == f"{m['pro']:.4f}"
        assert numbers["Defective images flagged at the threshold (recall)"] == f"{m['defect_recall']:.1%}"
        links = page.evaluate("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
        assert links == ["per_image.csv"]  # the CSV files this run wrote, and no other
        shutil.rmtree(synthetic_category / "ground_truth")  # no masks: no PRO, and no earlier run's curve shown
        res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                       "--report", str(report)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert not (report / "pro.png").exists() and 'src="pro.png"' not in (report / "index.html").read_text()
    finally:
        page.close()
