import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service.cli import app

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--coreset-ratio", "0.25",
        "--calibration-fraction", "0.25"]


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def fitted_dir(synthetic_category, tmp_path) -> Path:
    out = tmp_path / "models" / "part"
    res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(out), "-q", *FAST)
    assert res.exit_code == 0, res.output
    assert "saved to" in res.output
    return out


def test_fit_score_info(fitted_dir, synthetic_category, tmp_path):
    heat = tmp_path / "heat"
    res = run("score", "--model", str(fitted_dir), str(synthetic_category / "test/blob"),
              str(synthetic_category / "test/good/000.png"), "--json", "--heatmap-dir", str(heat))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 5
    assert {"path", "score", "normalized_score", "is_anomaly"} <= set(rows[0])
    assert sum(r["is_anomaly"] for r in rows[:4]) >= 3
    overlay = Image.open(heat / "000_overlay.png")
    assert overlay.size == (128, 128)
    assert (heat / "good_000_overlay.png").exists()  # same stem from another directory is not overwritten
    info = run("info", str(fitted_dir))
    assert info.exit_code == 0 and "efficientnet_lite0" in info.output and "threshold" in info.output


def test_evaluate_writes_json_and_report(synthetic_category, tmp_path):
    out = tmp_path / "metrics.json"
    report = tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--json", str(out), "--report", str(report), "-q", *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "threshold", "good_fpr", "defect_recall", "fit_seconds",
                "score_ms_per_image"):
        assert key in m
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert 0.0 <= m[key] <= 1.0
    assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9
    assert {p.name for p in report.iterdir()} >= {"score_histogram.png", "roc.png", "worst_cases.png"}


def test_evaluate_with_saved_model(fitted_dir, synthetic_category):
    res = run("evaluate", str(synthetic_category), "--model", str(fitted_dir))
    assert res.exit_code == 0 and "image_auroc" in res.output


def test_bad_inputs_give_one_line_errors(tmp_path, synthetic_category, fitted_dir):
    res = run("fit", "--normal-dir", str(tmp_path / "missing"), *FAST)
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "not a directory" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("fit", "--normal-dir", str(empty), *FAST)
    assert res.exit_code == 2 and "contains no image files" in res.output
    res = run("score", "--model", str(tmp_path / "nomodel"), str(synthetic_category / "test/good"))
    assert res.exit_code == 2 and "no model at" in res.output
    assert "Traceback" not in res.output


def test_non_image_among_many_is_skipped(synthetic_category, fitted_dir, tmp_path):
    (synthetic_category / "train/good/readme.txt").write_text("not an image")
    (synthetic_category / "train/good/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(tmp_path / "m2"),
              "-q", *FAST)
    assert res.exit_code == 0, res.output
    assert "skipping" in res.output and "1 unreadable image(s) skipped" in res.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = run("score", "--model", str(fitted_dir), str(bad), str(synthetic_category / "test/good/000.png"))
    assert res.exit_code == 0 and "skipping" in res.output
    res = run("score", "--model", str(fitted_dir), str(bad))
    assert res.exit_code == 2 and "no image could be scored" in res.output


def test_offline_resnet_fails_before_work_with_both_ways_out(tmp_path, synthetic_category, monkeypatch):
    import urllib.error

    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(tmp_path / "m"), "-q")
    assert res.exit_code == 2
    assert "--weights FILE" in res.output and "--backbone efficientnet_lite0" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m").exists()


def test_device_cuda_without_gpu(tmp_path, synthetic_category):
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--device", "cuda", *FAST)
    assert res.exit_code == 2 and "no CUDA GPU" in res.output
