import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service.cli import app
from conftest import as_other_user, textured_part, write_manifest

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
    assert "layout " in res.output  # every fit says whether the part has a fixed layout (layout.py)
    return out


def test_fit_score_info(fitted_dir, synthetic_category, tmp_path):
    heat = tmp_path / "heat"
    res = run("score", "--model", str(fitted_dir), str(synthetic_category / "test/blob"),
              str(synthetic_category / "test/good/000.png"), "--json", "--heatmap-dir", str(heat))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 5
    assert {"path", "score", "normalized_score", "is_anomaly"} <= set(rows[0])
    assert all(r["inspection_id"] is None for r in rows)  # nothing recorded without --data-dir / --database-url
    assert sum(r["is_anomaly"] for r in rows[:4]) >= 3
    overlay = Image.open(heat / "000_overlay.png")
    assert overlay.size == (128, 128)
    assert (heat / "good_000_overlay.png").exists()  # same stem from another directory is not overwritten
    info = run("info", str(fitted_dir))
    assert info.exit_code == 0 and "efficientnet_lite0" in info.output and "threshold" in info.output
    assert "layout " in info.output
    import getpass

    from anomaly_service.artifact import model_version_id

    (fit,) = json.loads(run("versions", str(fitted_dir), "--history", "--json").output)  # the fit, in its log
    assert (fit["action"], fit["version"], fit["previous"], fit["by"], fit["via"]) == \
        ("fit", model_version_id(fitted_dir), None, getpass.getuser(), "cli")


def test_info_shows_the_jpeg_quality_the_model_was_fitted_at(model_dir, tmp_path):
    """The fit keeps its good photos' lowest JPEG quality and scoring warns of a flagged JPEG well below it, but
    `info` did not say it (only `--json` held it): an operator reading a compression warning could not see where
    it starts. A line right after the input says it; a model without it (older, or fitted on arrays) has none."""
    model = shutil.copytree(model_dir / "part", tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["preprocessing"]["jpeg_quality"] is None  # the session model is fitted on arrays
    assert "JPEG quality" not in run("info", str(model)).output
    manifest["preprocessing"].pop("jpeg_quality")  # as a model saved before the quality was kept
    write_manifest(model, manifest)
    assert "JPEG quality" not in run("info", str(model)).output
    for quality, said in ((80, "80, the good photos were JPEG at quality 80 or better: a flagged JPEG below "
                                "quality 70 is scored with a warning"),
                          (100, "100, the good photos were uncompressed (PNG, TIFF or BMP): a flagged JPEG below "
                                "quality 90")):
        write_manifest(model, {**manifest, "preprocessing": {**manifest["preprocessing"], "jpeg_quality": quality}})
        lines = run("info", str(model)).output.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("JPEG quality"))
        assert lines[at - 1].startswith("input ") and said in lines[at]
        assert json.loads(run("info", str(model), "--json").output)["preprocessing"]["jpeg_quality"] == quality


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
    assert {p.name for p in report.iterdir()} >= {"score_histogram.png", "roc.png", "worst_cases.png",
                                                  "embedding_map.png"}


def test_evaluate_report_lists_every_image_it_scored_and_each_defect_types_recall(model_dir, synthetic_category,
                                                                                   tmp_path):
    """The report held pictures and no per-image outputs, and nothing said how each defect type fared: a quality
    engineer could neither recompute its numbers nor see a type the model misses behind the overall recall.
    per_image.csv lists every image scored with its score, decision and mask, and --json's by_type each folder's
    count and flagged share; both agree with the headline metrics."""
    import csv

    from sklearn.metrics import roc_auc_score

    blob, scratch = synthetic_category / "test/blob", synthetic_category / "test/scratch"
    (synthetic_category / "ground_truth/scratch").mkdir()
    scratch.mkdir()
    for name in ("002", "003"):  # a second defect type
        (blob / f"{name}.png").rename(scratch / f"{name}.png")
        (synthetic_category / f"ground_truth/blob/{name}_mask.png").rename(
            synthetic_category / f"ground_truth/scratch/{name}_mask.png")
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out),
              "--report", str(report))
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    with open(report / "per_image.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in synthetic_category.glob("test/*/*.png"))
    for r in rows:
        assert r["type"] == Path(r["path"]).parent.name and r["label"] == ("good" if r["type"] == "good" else "defect")
        assert (r["decision"] == "ANOMALY") == (float(r["normalized_score"]) > 1.0)
        expected = synthetic_category / "ground_truth" / r["type"] / f"{Path(r['path']).stem}_mask.png"
        assert r["mask"] == ("" if r["type"] == "good" else str(expected))
    labels = [r["label"] == "defect" for r in rows]
    assert roc_auc_score(labels, [float(r["normalized_score"]) for r in rows]) == pytest.approx(m["image_auroc"])
    flagged = {t: sum(r["decision"] == "ANOMALY" for r in rows if r["type"] == t) for t in ("good", "blob", "scratch")}
    assert m["by_type"] == {t: {"n": 2 if t != "good" else 4, "flagged": flagged[t],
                                "flagged_rate": flagged[t] / (2 if t != "good" else 4)}
                            for t in ("good", "blob", "scratch")}
    assert list(m["by_type"]) == ["good", "blob", "scratch"]  # good first, then the defect types by name
    assert m["good_fpr"] == pytest.approx(m["by_type"]["good"]["flagged_rate"])
    assert m["defect_recall"] == pytest.approx((flagged["blob"] + flagged["scratch"]) / 4)


def test_evaluate_report_shows_its_colour_scale_and_where_the_threshold_sits_on_the_roc(model_dir,
                                                                                       synthetic_category, tmp_path):
    """worst_cases.png said its overlays were on one scale but showed none, so a reader could not tell which colour
    is the threshold; roc.png drew the curve but not where the model works on it. The worst cases now carry the
    heatmaps' own colour table as a bar (its colours drawn exactly), and the ROC the threshold's point in red."""
    import numpy as np

    from anomaly_service.heatmap import color_table

    report = tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--report", str(report))
    assert res.exit_code == 0, res.output
    cases = np.asarray(Image.open(report / "worst_cases.png").convert("RGB")).reshape(-1, 3)
    drawn = {tuple(c) for c in np.unique(cases, axis=0)}
    assert sum(tuple(c) in drawn for c in color_table()) >= 200  # the overlays blend them; only a bar shows them
    roc = np.asarray(Image.open(report / "roc.png").convert("RGB")).reshape(-1, 3)
    assert (np.abs(roc.astype(int) - (214, 39, 40)).sum(1) < 30).sum() > 20  # tab:red, the operating point


def test_evaluate_with_saved_model(model_dir, synthetic_category):
    """The saved model is scored, not re-fitted (the fit time reported is the saved model's own), and the synthetic
    defects are found."""
    from anomaly_service.artifact import read_manifest

    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"))
    assert res.exit_code == 0, res.output
    printed = dict(line.split(None, 1) for line in res.output.splitlines() if line.split(None, 1)[0] in
                   ("image_auroc", "pixel_auroc", "fit_seconds"))
    assert float(printed["image_auroc"]) >= 0.9 and float(printed["pixel_auroc"]) >= 0.9
    assert float(printed["fit_seconds"]) == pytest.approx(read_manifest(model_dir / "part").training.fit_seconds,
                                                          abs=1e-4)


def test_evaluate_says_which_test_images_the_model_was_fitted_on(model_dir, synthetic_category, rng_images,
                                                                 tmp_path):
    """A good test image the model learnt (a test folder copied from the good one, or one image in both) scores as
    no unseen part does, and the metrics read better than the line will see: before session 64 nothing said so.
    Each such image is named with the training image it repeats, in the output and the --json warnings, and the
    count is said once; the other test images carry no such warning."""
    Image.fromarray(rng_images[3]).save(synthetic_category / "test" / "good" / "learnt.png")
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
              "--json", str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    assert "learnt.png: this image is one the model was fitted on (image[3])" in res.output
    assert "1 of the 9 test images are images the model was fitted on" in res.output
    warned = json.loads((tmp_path / "m.json").read_text())["warnings"]
    assert [Path(w["path"]).name for w in warned if any("fitted on" in x for x in w["warnings"])] == ["learnt.png"]


def test_evaluate_with_a_saved_model_refuses_the_fit_options_it_cannot_honour(model_dir, synthetic_category,
                                                                            tmp_path):
    saved = tmp_path / "saved"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--backbone", "resnet50",
              "--coreset-ratio", "0.5", "--save-model", str(saved))
    assert res.exit_code == 2 and res.output.startswith("error: --save-model, --backbone, --coreset-ratio cannot be "
                                                        "used with --model")
    assert "image_auroc" not in res.output and not saved.exists()
    # what a saved model can be run with still applies
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--device", "cpu",
              "--runtime", "torch", "--knn-precision", "fp32", "-q", "--json", str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    assert "image_auroc" in json.loads((tmp_path / "m.json").read_text())


def test_fit_reads_good_photos_kept_in_dated_subfolders_with_recursive(synthetic_category, tmp_path):
    """A plant keeps its good photos one folder per day or camera. fit skipped every folder and told to "name it",
    which a fit of one --normal-dir cannot; it now says --recursive, which reads them (hidden folders passed over)."""
    good = synthetic_category / "train/good"
    for i, photo in enumerate(sorted(good.iterdir())):
        folder = good / f"2024-0{i % 3 + 1}" / ("cam 1" if i % 2 else "cam 2")
        folder.mkdir(parents=True, exist_ok=True)
        photo.rename(folder / photo.name)
    (good / ".Trash-1000").mkdir()
    (good / "2024-01" / "cam 2" / "000.png").rename(good / ".Trash-1000" / "000.png")  # deleted: not a good part
    flat = run("fit", "--normal-dir", str(good), "--out", str(tmp_path / "m"), "-q", *FAST)
    assert flat.exit_code == 2 and "give --recursive" in flat.output and "name it" not in flat.output, flat.output
    res = run("fit", "--normal-dir", str(good), "--recursive", "--out", str(tmp_path / "m"), "-q", *FAST)
    assert res.exit_code == 0 and "fitted 11 images" in res.output, res.output


def test_evaluate_without_masks_skips_pixel_metrics_and_writes_strict_json(model_dir, synthetic_category, tmp_path):
    import shutil

    shutil.rmtree(synthetic_category / "ground_truth")
    out = tmp_path / "m.json"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "pixel_auroc          skipped: no ground-truth masks" in res.output
    m = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert m["pixel_auroc"] is None and m["pro"] is None and m["image_auroc"] > 0.5


def test_a_library_warning_reads_as_the_commands_own_and_verbose_names_its_module(model_dir, synthetic_category):
    """evaluate's warning of defects without a mask came as ``WARNING anomaly_service.evaluate: ...`` among the
    command's ``warning: ...`` lines; -v keeps the level and the module (a real process: the CLI's logging set-up
    is what is tested, which pytest's own log handlers would replace)."""
    import subprocess
    import sys

    next((synthetic_category / "ground_truth").rglob("*.png")).unlink()
    command = [sys.executable, "-m", "anomaly_service.cli", "evaluate", str(synthetic_category), "--model",
               str(model_dir / "part")]
    cases = (([], "warning: 1 defect image(s) have no ground-truth mask"),
             (["-v"], "WARNING anomaly_service.evaluate: 1 defect image(s) have no ground-truth mask"))
    # both at once: each process spends most of its time importing torch and loading the model, on one core
    runs = [subprocess.Popen(command[:3] + flags + command[3:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for flags, _ in cases]
    try:
        for run_, (_, says) in zip(runs, cases):
            _, stderr = run_.communicate(timeout=300)
            assert run_.returncode == 0 and says in stderr, stderr
    finally:
        for run_ in runs:
            if run_.poll() is None:
                run_.kill()
                run_.wait()


def test_evaluate_json_lists_the_defects_left_out_of_the_pixel_metrics(model_dir, synthetic_category, tmp_path):
    """A defect without a mask counts in image AUROC and not in pixel AUROC and PRO: only the log said so, which a
    script reading --json never saw."""
    gone = next((synthetic_category / "ground_truth").rglob("*_mask.png"))
    gone.unlink()
    out = tmp_path / "m.json"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out))
    assert res.exit_code == 0, res.output
    (left,) = json.loads(out.read_text())["defects_without_mask"]
    assert Path(left).name == gone.name.replace("_mask", "") and Path(left).parent.name == gone.parent.name


def test_evaluate_names_defect_masks_with_nothing_drawn_not_masks_missing(model_dir, synthetic_category, tmp_path):
    """A defect's mask left black (a defect not drawn yet, a tool that saved an empty layer) counts every pixel of
    its image as defect-free, which lowers the pixel metrics where the model finds the defect: nothing said so, and
    with every mask so the pixel metrics were skipped for "no ground-truth masks under ...", which were there."""
    import numpy as np

    masks = sorted((synthetic_category / "ground_truth").rglob("*_mask.png"))
    for mask in masks:
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(mask)
    out = tmp_path / "m.json"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out))
    assert res.exit_code == 0, res.output
    assert f"{len(masks)} defect image(s) have a ground-truth mask with nothing drawn on it" in res.output
    assert "no ground-truth masks" not in res.output and "has nothing drawn on it" in res.output, res.output
    listed = json.loads(out.read_text())["defects_with_empty_mask"]
    assert sorted(Path(p).name for p in listed) == sorted(m.name.replace("_mask", "") for m in masks)


def test_evaluate_on_a_full_volume_keeps_the_metrics_and_leaves_no_short_file(model_dir, synthetic_category,
                                                                              tmp_path):
    """--json and --report on a volume that is full: the run ended in a traceback after all its scoring, left a
    0-byte metrics.json in place of the earlier one (and a full --report lost the metrics, written after it) and a
    0-byte PNG. Now the metrics are printed, the other output is written, no file is short, and the exit is 1."""
    from conftest import fill, mounted

    with mounted(tmp_path / "vol", "1m") as vol:
        earlier = vol / "m.json"
        earlier.write_text('{"image_auroc": 0.5}')
        filler = fill(vol)
        res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                       "--json", str(earlier)])
        assert res.exit_code == 1 and not isinstance(res.exception, OSError), res.output
        assert "image_auroc" in res.stdout and f"error: could not write the metrics to {earlier}" in res.output
        assert earlier.read_text() == '{"image_auroc": 0.5}'  # unchanged, and no temporary file beside it
        assert sorted(p.name for p in vol.iterdir()) == ["filler", "m.json"]

        out = tmp_path / "m.json"
        res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                       "--json", str(out), "--report", str(vol / "report")])
        assert res.exit_code == 1 and not isinstance(res.exception, OSError), res.output
        assert f"error: could not write the report to {vol / 'report'}" in res.output
        assert json.loads(out.read_text())["image_auroc"] > 0.5  # the metrics are kept all the same
        assert not any((vol / "report").iterdir())  # no truncated PNG
        filler.unlink()

        # over an earlier report: what was not written is that run's, and the message must not call it missing
        earlier = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                           "--report", str(vol / "report")])
        assert earlier.exit_code == 0, earlier.output
        filler = fill(vol)
        res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                       "--report", str(vol / "report")])
        assert res.exit_code == 1 and "from an earlier run" in res.output, res.output
        filler.unlink()


def test_evaluate_json_that_is_a_directory_is_refused_before_the_scoring(model_dir, synthetic_category, tmp_path):
    """--json naming a directory (``--json out/``) was found only after all the scoring, and then said "the file
    there is unchanged" of a directory. It is refused first, as a directory that takes no writes is."""
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--model", str(model_dir / "part"),
                                   "--json", str(out)])
    assert res.exit_code == 2 and "image_auroc" not in res.output, res.output
    assert f"error: --json {out} is a directory" in res.output


def test_evaluate_says_which_ground_truth_masks_are_missing_unreadable_or_of_another_frame(
        model_dir, synthetic_category, caplog):
    gt = synthetic_category / "ground_truth/blob"
    (gt / "000_mask.png").unlink()
    with caplog.at_level("WARNING"):
        res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"))
    assert res.exit_code == 0 and "1 defect image(s) have no ground-truth mask" in caplog.text
    Image.new("L", (50, 70)).save(gt / "001_mask.png")  # not the 128x128 frame of its image
    _fails_cleanly(run("evaluate", str(synthetic_category), "--model", str(model_dir / "part")),
                   "001_mask.png is 50x70 but its image 001.png is 128x128")
    (gt / "001_mask.png").write_bytes(b"not a png")
    _fails_cleanly(run("evaluate", str(synthetic_category), "--model", str(model_dir / "part")),
                   "001_mask.png cannot be read")


def test_evaluate_refuses_a_mask_of_another_frame_before_it_fits(synthetic_category, tmp_path):
    """A mask not of its image's frame stopped the evaluation only after the fit and all the scoring (a plant's
    run of minutes, its --save-model written all the same). It is found from the headers first."""
    Image.new("L", (50, 70)).save(synthetic_category / "ground_truth/blob/001_mask.png")
    saved = tmp_path / "saved"
    res = run("evaluate", str(synthetic_category), "--save-model", str(saved), "-q", *FAST)
    _fails_cleanly(res, "001_mask.png is 50x70 but its image 001.png is 128x128")
    assert "fitted" not in res.output and not saved.exists()


def test_evaluate_warns_of_a_test_folder_without_defects(synthetic_category, caplog):
    """A plant's first category often has no defect photos yet (anomalib's users met it as a validation set of
    normal images only): image AUROC and the defect recall came out NaN and "-" with no word, where a test/ without
    good/ was warned of. Both are said now."""
    from anomaly_service.evaluate import read_category

    shutil.rmtree(synthetic_category / "test/blob")
    with caplog.at_level("WARNING"):
        read_category(synthetic_category)
    assert "test has no defect folder of images (only good/): image AUROC, the defect recall" in caplog.text
    caplog.clear()
    (synthetic_category / "test/blob").mkdir()  # an empty defect folder is no defect either
    with caplog.at_level("WARNING"):
        read_category(synthetic_category)
    assert "no defect folder" in caplog.text


def test_evaluate_reads_a_plants_good_folders_in_any_case_and_masks_named_otherwise(model_dir, synthetic_category,
                                                                                   tmp_path, caplog):
    """A plant's category: folders made on Windows (``Good``), masks exported as BMP or TIFF or named as their image.
    test/Good was read as a defect type (every good part a missed defect, image AUROC NaN) and every mask but
    ``<name>_mask.png`` as missing (pixel metrics left out); the metrics must be those of the MVTec spelling."""
    model = str(model_dir / "part")
    assert run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "mvtec.json")
               ).exit_code == 0
    gt = synthetic_category / "ground_truth/blob"
    (synthetic_category / "test/good").rename(synthetic_category / "test/Good")
    (gt / "000_mask.png").rename(gt / "000.png")
    Image.open(gt / "001_mask.png").convert("RGB").save(gt / "001_mask.bmp")  # an RGB export
    Image.open(gt / "002_mask.png").save(gt / "002_mask.TIF")
    for name in ("001_mask.png", "002_mask.png"):
        (gt / name).unlink()
    with caplog.at_level("WARNING"):
        res = run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "plant.json"))
    assert res.exit_code == 0 and "no ground-truth mask" not in caplog.text, res.output
    mvtec, plant = (json.loads((tmp_path / name).read_text()) for name in ("mvtec.json", "plant.json"))
    for key in ("image_auroc", "pixel_auroc", "pro", "good_fpr", "defect_recall", "n_good", "n_defect"):
        assert plant[key] == mvtec[key], key
    (synthetic_category / "train/good").rename(synthetic_category / "train/GOOD")  # fitted from it all the same
    res = run("evaluate", str(synthetic_category), "-q", *FAST, "--autoencoder", "none")
    assert res.exit_code == 0 and "image_auroc" in res.output, res.output


def test_evaluate_finds_masks_named_in_the_other_unicode_spelling(model_dir, synthetic_category, tmp_path, caplog):
    """Test photos copied from a Mac (a defect type 'Kratzer_ü' and photos 'Teil_ä_0.png' decomposed, NFD) and masks
    drawn on Windows (composed, NFC): every mask was reported missing ("skipped: no ground-truth masks" under a
    ground_truth/ full of them) and the pixel metrics left out. The metrics are those of one spelling throughout."""
    import unicodedata

    model = str(model_dir / "part")
    assert run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "one.json")
               ).exit_code == 0
    spelt = {form: (lambda text, form=form: unicodedata.normalize(form, text)) for form in ("NFC", "NFD")}
    test, gt = synthetic_category / "test", synthetic_category / "ground_truth"
    test_type, gt_type = test / spelt["NFD"]("Kratzer_ü"), gt / spelt["NFC"]("Kratzer_ü")
    (test / "blob").rename(test_type)
    (gt / "blob").rename(gt_type)
    for photo in sorted(test_type.iterdir()):
        photo.rename(test_type / spelt["NFD"](f"Teil_ä_{photo.name}"))
    for mask in sorted(gt_type.iterdir()):
        mask.rename(gt_type / spelt["NFC"](f"Teil_ä_{mask.name}"))
    with caplog.at_level("WARNING"):
        res = run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "two.json"))
    assert res.exit_code == 0 and "no ground-truth mask" not in caplog.text, res.output
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for key in ("image_auroc", "pixel_auroc", "pro", "n_defect"):
        assert two[key] == one[key], key


def test_evaluate_keeps_apart_two_photos_named_alike_in_two_spellings(model_dir, synthetic_category, tmp_path):
    """Two photos whose names differ only in Unicode spelling (one from a Mac, decomposed, one from Windows), each
    with its own mask so spelt: masks were looked up by the composed name alone, so both photos were measured
    against one mask (the other's defect pixels) and the pixel metrics were wrong. Each spelling finds its own."""
    import unicodedata

    model = str(model_dir / "part")
    assert run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "one.json")
               ).exit_code == 0
    test, gt = synthetic_category / "test/blob", synthetic_category / "ground_truth/blob"
    for form, stem in zip(("NFC", "NFD"), sorted(p.stem for p in test.iterdir())):
        name = unicodedata.normalize(form, "Teil_ä")
        (test / f"{stem}.png").rename(test / f"{name}.png")
        (gt / f"{stem}_mask.png").rename(gt / f"{name}_mask.png")
    assert len([p for p in test.iterdir() if unicodedata.normalize("NFC", p.stem) == "Teil_ä"]) == 2  # two files
    res = run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "two.json"))
    assert res.exit_code == 0, res.output
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for key in ("image_auroc", "pixel_auroc", "pro", "n_defect"):
        assert two[key] == one[key], key


def test_evaluate_reads_a_masks_own_exif_turn(model_dir, synthetic_category, tmp_path):
    """A mask saved with an EXIF orientation shows turned in every viewer, and its image's turn was applied, but the
    mask was read as stored: its defect scored against the wrong pixels. The metrics must be those of the mask
    stored upright."""
    import numpy as np

    model = str(model_dir / "part")
    assert run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "upright.json")
               ).exit_code == 0
    for path in sorted((synthetic_category / "ground_truth/blob").glob("*_mask.png")):
        upright = Image.open(path)
        stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6: turned back by a quarter turn
        assert not np.array_equal(np.asarray(stored), np.asarray(upright))
        exif = Image.Exif()
        exif[0x0112] = 6
        stored.save(path, exif=exif)
    res = run("evaluate", str(synthetic_category), "--model", model, "--json", str(tmp_path / "turned.json"))
    assert res.exit_code == 0, res.output
    upright, turned = (json.loads((tmp_path / name).read_text()) for name in ("upright.json", "turned.json"))
    assert (turned["pixel_auroc"], turned["pro"]) == (upright["pixel_auroc"], upright["pro"])


def test_evaluate_checks_masks_against_the_pixel_limit_its_photos_are_read_under(model_dir, synthetic_category,
                                                                                 tmp_path, monkeypatch):
    """A plant whose camera's photos are past the default pixel limit raises it once (ANOMALY_MAX_PIXELS) for the
    service and the command line, and `evaluate` reads its photos under it; but each mask was checked from its
    header against the default, and a mask of the camera's frame stopped the evaluation as too large before the
    fit. Checked here with a mask drawn at a finer scale than its photo (a scaled copy of the frame is read)."""
    import numpy as np

    path = sorted((synthetic_category / "ground_truth/blob").glob("*_mask.png"))[0]
    fine = Image.open(path).resize((6500, 6500), Image.Resampling.NEAREST)  # past the default's 40 M pixels
    fine.save(path)
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", "50000000")
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json",
              str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    assert np.isfinite(json.loads((tmp_path / "m.json").read_text())["pixel_auroc"])


def test_an_evaluation_through_the_library_refuses_a_mask_past_the_photos_pixel_limit(model_dir, synthetic_category):
    """A mask is opened past Pillow's own pixel limit since session 70, so only ours stands between a mask whose
    header declares a huge frame and its decoding; the command checks every mask's header first, but an evaluation
    through the library (evaluate_model) decoded it whole. Refused by its header against the limit the model reads
    its photos under, and named."""
    from anomaly_service import AnomalyModel
    from anomaly_service.errors import ConfigError
    from anomaly_service.evaluate import evaluate_model, list_category
    from anomaly_service.images import ImageLimits

    path = sorted((synthetic_category / "ground_truth/blob").glob("*_mask.png"))[0]
    Image.open(path).resize((150, 150), Image.Resampling.NEAREST).save(path)  # a scaled copy of its 128 x 128 frame
    model = AnomalyModel.load(model_dir / "part", limits=ImageLimits(max_pixels=150 * 150 - 1))
    with pytest.raises(ConfigError, match=r"_mask\.png is 150x150 pixels, past the limit of 22499 pixels") as refused:
        evaluate_model(model, list_category(synthetic_category).samples)
    assert "cannot be read" not in str(refused.value)


def test_evaluate_skips_test_files_that_do_not_decode_and_says_which(model_dir, synthetic_category, tmp_path):
    """A zero-byte photo, a truncated one and a file that is no image among the test photos: each is skipped with a
    warning naming it, the rest are evaluated, and the output, --json and --report say how many were skipped and
    which. Only a folder where nothing decodes is an error."""
    good, blob = synthetic_category / "test/good", synthetic_category / "test/blob"
    (good / "empty.png").write_bytes(b"")
    data = (blob / "000.png").read_bytes()
    (blob / "cut.png").write_bytes(data[: len(data) // 2])
    (good / "notes.txt").write_text("shift 2: lamp replaced")
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out),
              "--report", str(report))
    assert res.exit_code == 0, res.output
    for path in (good / "empty.png", blob / "cut.png", good / "notes.txt"):
        assert f"warning: skipping {path}" in res.output
    assert "skipped              3 test file(s) not evaluated" in res.output
    m = json.loads(out.read_text())
    assert (m["n_good"], m["n_defect"], m["n_skipped"]) == (4, 4, 3)
    assert [s["path"] for s in m["skipped"]] == [str(blob / "cut.png"), str(good / "empty.png"),
                                                 str(good / "notes.txt")]
    assert all(s["reason"] for s in m["skipped"]) and m["image_auroc"] >= 0.9
    listed = (report / "skipped_files.csv").read_text()
    assert "cut.png" in listed and "empty.png" in listed and "notes.txt" in listed
    for path in [*good.glob("*.png"), *blob.glob("*.png")]:
        path.write_bytes(b"not an image")
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"))
    assert res.exit_code == 2 and "error: no test image could be evaluated" in res.output, res.output


def test_evaluate_into_an_earlier_runs_report_leaves_none_of_its_lists_or_pictures_that_this_run_did_not_make(
        model_dir, synthetic_category, tmp_path):
    """A report folder used again (reports/bottle, as the README runs it): skipped_files.csv, warned_files.csv and
    roc.png are written only when there is something to put in them, and an earlier run's stayed, listing as skipped
    a file this run evaluated beside this run's metrics. Each is now removed when this run has nothing for it."""
    import numpy as np

    good = synthetic_category / "test/good"
    (good / "broken.png").write_bytes(b"not an image")
    rng = np.random.default_rng(7)
    frames = [Image.fromarray(textured_part(rng)) for _ in range(2)]
    frames[0].save(good / "stack.tif", save_all=True, append_images=frames[1:])
    report = tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--report", str(report))
    assert res.exit_code == 0, res.output
    assert {"skipped_files.csv", "warned_files.csv", "roc.png"} <= {p.name for p in report.iterdir()}
    (good / "broken.png").unlink()
    (good / "stack.tif").unlink()
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--report", str(report))
    assert res.exit_code == 0, res.output
    left = {p.name for p in report.iterdir()}
    assert "skipped_files.csv" not in left and "warned_files.csv" not in left and "roc.png" in left
    shutil.rmtree(good)  # defects only: no ROC can be drawn
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--report", str(report))
    assert res.exit_code == 0, res.output
    assert "roc.png" not in {p.name for p in report.iterdir()}
    from anomaly_service.evaluate import write_suspects

    write_suspects(report, [{"name": "a.png", "score": 2.0, "threshold": 1.0, "ratio": 2.0, "z": 5.0}], "warn")
    write_suspects(report, [], None)  # a model whose fit flagged no training image: the earlier list goes
    assert not (report / "training_suspects.csv").exists()


def test_evaluate_says_which_frame_of_a_test_file_of_several_it_read(model_dir, synthetic_category, tmp_path):
    """A test photo that is a stack of frames (a TIFF of exposures, an animated GIF) is evaluated at one frame.
    `anomaly score` says which; evaluate dropped it. It now warns as score does (`warning: PATH: ...`) and --json
    lists each such file with its path and warnings, as score --json gives them."""
    import numpy as np

    rng = np.random.default_rng(7)
    frames = [Image.fromarray(textured_part(rng)) for _ in range(3)]
    good = synthetic_category / "test/good"
    tif, gif = good / "stack.tif", good / "anim.gif"
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    frames[0].convert("P").save(gif, save_all=True, append_images=[frames[1].convert("P")])
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out),
              "--report", str(report))
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert (m["n_good"], m["n_skipped"]) == (6, 0)
    listed = {e["path"]: e["warnings"] for e in m["warnings"]}
    import csv

    with open(report / "warned_files.csv", newline="", encoding="utf-8") as f:  # the report keeps them too
        rows = list(csv.DictReader(f))
    assert {(r["path"], r["warning"]) for r in rows} == {(p, w) for p, ws in listed.items() for w in ws}
    assert set(listed) == {str(tif), str(gif)}  # the single-frame photos have nothing to say
    assert "3 frames" in listed[str(tif)][0] and "frame 1 (the first" in listed[str(tif)][0]
    assert "2 frames" in listed[str(gif)][0]
    for path, said in listed.items():
        assert f"warning: {path}: {said[0]}" in res.output


def test_evaluate_reports_a_skipped_file_whose_name_is_not_utf8(model_dir, synthetic_category, tmp_path):
    """A file named under another code page (a plant's Windows share) that does not decode: the evaluation scored
    everything else and then stopped with a traceback writing skipped_files.csv, and --json held the name as lone
    surrogates, which strict JSON readers refuse. The name is spelt as records spell such names (path_text)."""
    import os

    good = synthetic_category / "test/good"
    bad = Path(os.fsdecode(bytes(good) + b"/caf\xe9.png"))
    bad.write_bytes(b"")
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out),
              "--report", str(report))
    assert res.exit_code == 0, res.output
    spelt = str(good / "caf\\xe9.png")
    assert [s["path"] for s in json.loads(out.read_text(encoding="utf-8"))["skipped"]] == [spelt]
    out.read_bytes().decode("utf-8").encode("utf-8")  # no lone surrogate escapes either
    assert "\\udc" not in out.read_text() and spelt in (report / "skipped_files.csv").read_text(encoding="utf-8")


def test_evaluate_draws_its_report_for_test_files_and_defect_folders_whose_names_are_not_utf8(model_dir,
                                                                                              synthetic_category,
                                                                                              tmp_path):
    """A photo and a defect folder named under another code page (a plant's Windows share) that decode: every part
    was scored, then drawing the report stopped with a TypeError from the font renderer, which takes no lone
    surrogates (the worst cases' titles, the embedding map's legend), and neither the metrics nor --json came out.
    The names are drawn as records spell them (path_text)."""
    import os

    good = synthetic_category / "test/good"
    os.rename(good / "000.png", os.fsdecode(bytes(good) + b"/caf\xe9.png"))
    for parent in ("test", "ground_truth"):
        os.rename(synthetic_category / parent / "blob", os.fsdecode(bytes(synthetic_category / parent) + b"/ray\xe9"))
    out, report = tmp_path / "m.json", tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--json", str(out),
              "--report", str(report))
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text(encoding="utf-8"))
    assert (m["n_good"], m["n_defect"], m["n_skipped"]) == (4, 4, 0) and m["pixel_auroc"] is not None
    assert {"worst_cases.png", "embedding_map.png"} <= {p.name for p in report.iterdir()}


def test_evaluate_fits_past_a_training_photo_that_does_not_decode_and_still_draws_its_report(synthetic_category,
                                                                                            tmp_path):
    """The fit skips a training photo that does not decode, as `anomaly fit` does and says; the report's map of
    where parts sit among the training images leaves it out instead of stopping at it."""
    (synthetic_category / "train/good/cut.png").write_bytes(b"\x89PNG\r\n")
    report = tmp_path / "report"
    res = run("evaluate", str(synthetic_category), "--report", str(report), "-q", *FAST)
    assert res.exit_code == 0, res.output
    assert "warning: 1 unreadable image(s) skipped" in res.output and "skipped   " not in res.output
    assert (report / "embedding_map.png").is_file() and not (report / "skipped_files.csv").exists()


def test_evaluate_with_a_model_whose_training_images_are_gone_says_its_map_shows_the_test_parts_alone(
        synthetic_category, model_dir, tmp_path, caplog):
    """With --model, the report's map places the test parts among the category's train/good images, read from
    disk: moved or deleted since the fit, the map was drawn of the test parts alone under its usual title, and
    nothing said so."""
    import shutil

    shutil.rmtree(synthetic_category / "train")
    report = tmp_path / "report"
    with caplog.at_level("WARNING"):
        res = run("evaluate", str(synthetic_category), "--model", str(model_dir / "part"), "--report", str(report))
    assert res.exit_code == 0, res.output
    assert "embedding_map.png shows the test parts alone" in caplog.text and "train/good" in caplog.text
    assert (report / "embedding_map.png").is_file()
    res = run("evaluate", str(tmp_path / "absent"), "--model", str(model_dir / "part"))  # the category itself gone
    assert res.exit_code == 2 and "absent: no such directory" in res.output  # not "no test/ directory"

def _fails_cleanly(res, *phrases: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1
    for phrase in phrases:
        assert phrase in res.output


def test_outputs_are_checked_before_the_work(model_dir, synthetic_category, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(a_file / "model"), "-q", *FAST])
    _fails_cleanly(res, "is a file")
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(synthetic_category / "test"),
                                   "--heatmap-dir", str(a_file)])
    _fails_cleanly(res, "--heatmap-dir", "is a file")
    # a directory that takes no new entry (permission bits say nothing to root; /proc refuses everyone)
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   "/proc/anomaly-model", "-q", *FAST])
    _fails_cleanly(res, "--out /proc/anomaly-model: cannot write in /proc")


@pytest.mark.parametrize("names", [
    ["r/x.png", "p/a/x.png", "q/a/x.png", "r/a_x.png"],
    # FAT and exFAT (a USB stick the heatmaps go away on), NTFS and APFS take Part and part for one file, and macOS's
    # file systems the two Unicode spellings of a name: the second photo's heatmap was drawn over the first's there
    ["a/Part.png", "b/part.png", "c/Pr\u00fcfteil.png", "d/Pru\u0308fteil.png"]])
def test_heatmaps_of_photos_with_one_name_never_overwrite_each_other(model_dir, synthetic_category, tmp_path,
                                                                      names):
    import shutil
    import unicodedata

    photos = [tmp_path / n for n in names]
    for p in photos:
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_category / "test/good/000.png", p)
    heat = tmp_path / "heat"
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), *map(str, photos), "--heatmap-dir",
                                   str(heat)])
    assert res.exit_code == 0, res.output
    for kind in ("overlay", "heatmap"):  # one file each, by the names any file system tells apart
        shown = [unicodedata.normalize("NFC", p.name).casefold() for p in heat.glob(f"*_{kind}.png")]
        assert len(shown) == len(set(shown)) == len(photos), shown


def test_a_heatmap_is_named_by_the_folder_given_not_the_one_a_link_points_to(model_dir, synthetic_category,
                                                                             tmp_path):
    """The anomalib guide lays a Folder dataset out by links (``test/good`` -> ``good_test``): the second
    ``000.png`` was drawn as ``good_test_000``, a name the printed path ``.../test/good/000.png`` did not give."""
    import shutil

    src = tmp_path / "src"
    for folder in ("good_test", "broken"):
        (src / folder).mkdir(parents=True)
        shutil.copy(synthetic_category / "test/good/000.png", src / folder / "000.png")
    (tmp_path / "dst/test").mkdir(parents=True)
    (tmp_path / "dst/test/good").symlink_to(src / "good_test")
    (tmp_path / "dst/test/broken").symlink_to(src / "broken")
    heat = tmp_path / "heat"
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(tmp_path / "dst/test/broken"),
                                   str(tmp_path / "dst/test/good"), "--heatmap-dir", str(heat)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in heat.glob("*_overlay.png")) == ["000_overlay.png", "good_000_overlay.png"]


def test_a_full_heatmap_dir_costs_the_heatmaps_not_the_scores(model_dir, synthetic_category, tmp_path):
    """A --heatmap-dir whose volume fills up: the run ended in a traceback at the first heatmap that did not fit,
    with the rest of the photos unscored, and left a truncated PNG under that photo's name. Every photo is scored
    and printed now, each heatmap not written is warned about and leaves no file, and the exit code says so."""
    from conftest import fill, mounted

    photos = sorted((synthetic_category / "test/blob").glob("*.png"))
    with mounted(tmp_path / "heat", "1m") as heat:
        filler = fill(heat)
        res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), *map(str, photos),
                                       "--heatmap-dir", str(heat)])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert len(res.stdout.splitlines()) == len(photos)  # every score printed
        assert res.output.count("its heatmap could not be written") == len(photos)
        assert f"error: the heatmaps of {len(photos)} of {len(photos)} images could not be written" in res.output
        assert [p.name for p in heat.iterdir()] == ["filler"]  # no truncated PNG, no temporary file
        filler.unlink()
        res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), *map(str, photos),
                                       "--heatmap-dir", str(heat)])
        assert res.exit_code == 0 and len(list(heat.glob("*_overlay.png"))) == len(photos), res.output


def test_a_photo_with_a_long_name_still_gets_its_heatmaps(model_dir, synthetic_category, tmp_path):
    """A photo whose heatmap's name fits the file system (255 bytes) but not with the whole-file writer's temporary
    name around it (".NAME.<hex>.tmp"): its heatmaps were "File name too long" and the run exited 1, where the
    earlier writer's short temporary name had written them."""
    photo = tmp_path / ("p" * 230 + ".png")
    shutil.copy(sorted((synthetic_category / "test/blob").glob("*.png"))[0], photo)
    heat = tmp_path / "heat"
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(photo), "--heatmap-dir",
                                   str(heat)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in heat.iterdir()) == ["p" * 230 + "_heatmap.png", "p" * 230 + "_overlay.png"]


def test_photos_with_long_non_ascii_names_get_their_heatmaps(model_dir, synthetic_category, tmp_path):
    """A file name's limit is 255 bytes, not characters: a photo named with 82 Chinese characters (246 bytes, a
    name the file system takes) and one of the same stem under a folder of 70 (whose heatmap gets the folder in
    front) had no heatmaps ("File name too long") and the run exited 1. Both get theirs, and they stay apart."""
    import os

    stem = "零" * 82
    photos = [tmp_path / f"{stem}.png", tmp_path / ("件" * 70) / f"{stem}.png"]
    for photo in photos:
        photo.parent.mkdir(exist_ok=True)
        shutil.copy(sorted((synthetic_category / "test/blob").glob("*.png"))[0], photo)
    heat = tmp_path / "heat"
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), *map(str, photos), "--heatmap-dir",
                                   str(heat)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in heat.iterdir())
    assert len(names) == 4 and all(len(os.fsencode(n)) <= 255 for n in names), names
    assert len({n.rsplit("_", 1)[0] for n in names}) == 2  # one stem per photo, never one over the other
    assert all(n.startswith("零" * 60) or n.startswith("件" * 60) for n in names)  # still says whose it is


def test_a_name_typed_in_the_other_unicode_spelling_says_which_one_is_there(model_dir, synthetic_category, tmp_path):
    """A folder made on macOS and copied to Linux spells 'ü' as 'u' and a combining mark; the same name typed on
    Linux is one character. Both look alike in every listing, and the commands said only "no such file", "is not
    a directory", "no model at", "does not exist; fit a model first", "no records database" and, for a category,
    "it has no test/ directory" of a folder that was there. Each now names the path that is there, in the bytes a
    user can copy from the line."""
    import unicodedata

    nfc = lambda text: unicodedata.normalize("NFC", text)  # noqa: E731
    nfd = lambda text: unicodedata.normalize("NFD", text)  # noqa: E731
    mac = tmp_path / nfd("Prüfteil Ø12")
    shutil.copytree(synthetic_category, mac)
    shutil.copytree(model_dir / "part", tmp_path / nfd("Modell ü"))
    typed = tmp_path / nfc("Prüfteil Ø12")
    assert not typed.exists()
    photo = "test/good/000.png"
    for args, said, there in (
            (["score", "--model", str(model_dir / "part"), str(typed / photo)], "no such file", mac / photo),
            (["fit", "--normal-dir", str(typed / "train/good"), "--out", str(tmp_path / "m"), *FAST],
             "is not a directory", mac / "train/good"),
            (["evaluate", str(typed), "--model", str(model_dir / "part")], "no such directory", mac),
            (["score", "--model", str(tmp_path / nfc("Modell ü")), str(mac / photo)], "no model at",
             tmp_path / nfd("Modell ü")),
            (["serve", "--model-dir", str(typed)], "does not exist", mac),
            (["records", "export", "--data-dir", str(typed)], "no records database", mac)):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and said in res.output, res.output
        assert f"(but {there} is: the same name in another Unicode spelling" in res.output, res.output
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(tmp_path / "elsewhere.png")])
    assert res.exit_code == 2 and "no such file" in res.output and "Unicode" not in res.output


def test_a_latin1_terminal_gets_every_name_and_an_export_in_utf8(model_dir, synthetic_category, tmp_path):
    """An older plant host runs under LANG=de_DE (ISO-8859-1): `records export` to stdout and `versions --history`
    stopped with a UnicodeEncodeError traceback at the first name Latin-1 cannot spell (a part id or a reviewer in
    Chinese). The export is UTF-8 whatever the locale (it is a file format); what is printed for a person spells
    such characters as escapes."""
    import os
    import subprocess
    import sys

    from anomaly_service import model_history

    photo = tmp_path / "零件 Ø12.png"
    shutil.copy(synthetic_category / "test/good/000.png", photo)
    model = tmp_path / "models" / "part"
    shutil.copytree(model_dir / "part", model)
    res = run("score", "--model", str(model), str(photo), "--data-dir", str(tmp_path / "data"))
    assert res.exit_code == 0, res.output
    model_history.record(model, "rollback", "v2", "v1", by="张伟", note="Kratzer 😀")
    latin1 = {**os.environ, "PYTHONIOENCODING": "iso8859-1"}  # as a Latin-1 locale sets stdout
    cli = [sys.executable, "-m", "anomaly_service.cli"]
    export = subprocess.run([*cli, "records", "export", "--data-dir", str(tmp_path / "data"), "--format", "csv"],
                            capture_output=True, env=latin1)
    assert export.returncode == 0, export.stderr.decode(errors="replace")[-500:]
    assert ",零件 Ø12.png," in export.stdout.decode("utf-8")
    versions = subprocess.run([*cli, "versions", str(model), "--history"], capture_output=True, env=latin1)
    assert versions.returncode == 0, versions.stderr.decode(errors="replace")[-500:]
    assert "by \\u5f20\\u4f1f" in versions.stdout.decode("latin-1")


def test_a_long_heatmap_name_is_cut_between_the_characters_a_reader_sees(model_dir, synthetic_category, tmp_path):
    """A photo named in Korean on a Mac comes with each syllable decomposed into its letters (jamo: '한' is three).
    The long name's cut fell between a syllable's letters, so the heatmap's name read as other words ('한' became
    '하', the next syllable's first letter left over). It is cut where a syllable (a mark, an emoji) ends."""
    import unicodedata

    stem = "p" * 10 + unicodedata.normalize("NFD", "한국" * 13)  # 244 bytes: past what fits with the suffix
    photo = tmp_path / f"{stem}.png"
    shutil.copy(sorted((synthetic_category / "test/blob").glob("*.png"))[0], photo)
    heat = tmp_path / "heat"
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(photo), "--heatmap-dir",
                                   str(heat)])
    assert res.exit_code == 0, res.output
    (name,) = {p.name.rsplit("~", 1)[0] for p in heat.iterdir()}
    assert stem.startswith(name) and len(name) > 60, name
    assert "\u1100" <= stem[len(name)] <= "\u115f", repr(stem[len(name) - 1 : len(name) + 1])  # a syllable starts


def test_heatmaps_are_written_with_the_mode_a_plain_write_gives(model_dir, synthetic_category, tmp_path):
    """Heatmaps written through a temporary file came out 0600 (mkstemp's mode) where they had been 0644 under the
    usual umask: another user, or a web server showing them, could no longer read them."""
    import os
    import stat

    photo = sorted((synthetic_category / "test/blob").glob("*.png"))[0]
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(photo),
                                       "--heatmap-dir", str(tmp_path / "heat")])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    written = sorted((tmp_path / "heat").iterdir())
    assert [p.name for p in written] == [f"{photo.stem}_heatmap.png", f"{photo.stem}_overlay.png"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


def test_scoring_a_folder_without_images_is_an_error_that_names_the_subfolder(model_dir, tmp_path):
    (tmp_path / "batch" / "inner").mkdir(parents=True)
    res = CliRunner().invoke(app, ["score", "--model", str(model_dir / "part"), str(tmp_path / "batch")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "skipping" in res.output and "inner: a folder (folders are not searched" in res.output
    assert "error: no image files in" in res.output


def test_the_folder_of_models_given_as_a_model_names_the_models_in_it(model_dir, synthetic_category):
    """`serve --model-dir models` takes the folder, every other command one model in it: `score --model models`
    answered "has no manifest.json: not a model directory, or an incomplete copy", as if the model were broken."""
    for args in (["score", "--model", str(model_dir), str(synthetic_category / "test/good")],
                 ["info", str(model_dir)], ["versions", str(model_dir)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"is a folder of models (part), not a model: name one, e.g. {model_dir / 'part'}" in res.output


def test_structurally_bad_manifest_is_one_error_line(model_dir, synthetic_category, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir / "part", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["calibration"] = {}
    write_manifest(bad, m)
    for args in (["score", "--model", str(bad), str(synthetic_category / "test/good")], ["info", str(bad)]):
        _fails_cleanly(CliRunner().invoke(app, args), "calibration")


def test_serve_refuses_an_empty_api_key(model_dir):
    res = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir)], env={"ANOMALY_API_KEY": ""})
    _fails_cleanly(res, "api_key", "is set but empty")


def test_serve_refuses_an_api_key_no_header_can_carry(model_dir):
    """A key read from a file keeps its final newline (a Secret made --from-file): HTTP trims a header's outer
    whitespace, so no client could ever send it, and the service started and answered 401 to every keyed request
    with nothing said. A non-ASCII key was matched by no GET (headers are read as Latin-1). Refused at start."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    keys = ["s3cret\n", " s3cret", "pässwört"]
    runs = [subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(model_dir),
                              "--port", str(free_port()), "--record", "false"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "ANOMALY_API_KEY": key})
            for key in keys]  # at once: each spends its time importing torch
    for key, run in zip(keys, runs):
        try:
            _, stderr = run.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for other in runs:
                other.kill()
            pytest.fail(f"the service started with a key no request can send: {key!r}")
        assert run.returncode == 2 and "Traceback" not in stderr, (key, stderr)
        assert "api_key" in stderr and "X-API-Key header cannot carry" in stderr, (key, stderr)
        assert key.strip() not in stderr  # the message never shows the secret


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


def test_update_errors_name_the_add_good_option(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, why in ((tmp_path / "missing", "is not a directory"), (empty, "contains no image files")):
        res = run("update", str(tmp_path / "model"), "--add-good", str(folder))
        assert res.exit_code == 2 and res.output.strip() == f"error: --add-good {folder} {why}"


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
    # the good photo is scored, and the exit code says a part was left unjudged
    assert res.exit_code == 1 and "skipping" in res.output and "000.png\t" in res.output
    assert "error: 1 of 2 images could not be scored" in res.output
    res = run("score", "--model", str(fitted_dir), str(synthetic_category / "test/good/000.png"))
    assert res.exit_code == 0
    res = run("score", "--model", str(fitted_dir), str(bad))
    assert res.exit_code == 2 and "no image could be scored" in res.output


def test_the_command_line_reads_photos_under_the_services_limits_where_they_are_set(fitted_dir, synthetic_category,
                                                                                   monkeypatch):
    """The command line read every photo under the library's fixed limits, which no flag or setting could change:
    a line camera past them could be served (--max-pixels) but not fitted or scored from the command line. It now
    reads the service's ANOMALY_MAX_PIXELS and ANOMALY_MAX_UPLOAD_BYTES where they are set."""
    photo = synthetic_category / "test/good/000.png"
    with Image.open(photo) as im:
        pixels = im.width * im.height
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", str(pixels - 1))
    res = run("score", "--model", str(fitted_dir), str(photo))
    assert res.exit_code == 2 and f"exceeds the limit of {pixels - 1} pixels" in res.output
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", str(pixels))
    assert run("score", "--model", str(fitted_dir), str(photo)).exit_code == 0
    monkeypatch.setenv("ANOMALY_MAX_UPLOAD_BYTES", "100")
    res = run("update", str(fitted_dir), "--add-good", str(photo.parent), "-q")
    assert res.exit_code == 2 and "larger than the limit of 100 bytes" in res.output, res.output
    monkeypatch.setenv("ANOMALY_MAX_PIXELS", "lots")
    res = run("score", "--model", str(fitted_dir), str(photo))
    assert res.exit_code == 2 and "ANOMALY_MAX_PIXELS='lots': give a whole number above 0" in res.output


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


def test_device_past_the_visible_gpus(tmp_path, synthetic_category, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as torch would see it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(tmp_path / "m"), "--device", "cuda:1", *FAST])
    _fails_cleanly(res, "--device cuda:1 was requested but this process sees 1 CUDA GPU(s)")
    assert not (tmp_path / "m").exists()



def test_a_bad_setting_names_where_it_was_set(model_dir):
    """A setting refused at start named its field only: the engineer was left to guess whether the flag, a
    ConfigMap's ANOMALY_* variable or a unit file set it."""
    from_env = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir)], env={"ANOMALY_DRIFT_MIN_PARTS": "500"})
    _fails_cleanly(from_env, "invalid setting drift_min_parts (ANOMALY_DRIFT_MIN_PARTS): ", "drift window")
    from_flag = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir), "--drift-min-parts", "500"])
    _fails_cleanly(from_flag, "invalid setting drift_min_parts (--drift-min-parts): ")
    # the validator's own sentence, as service.md shows it and the API gives it: without pydantic's tag
    assert "Value error" not in from_env.output + from_flag.output
    assert "(ANOMALY_DRIFT_MIN_PARTS): must be at most the drift window" in from_env.output


def test_serve_refuses_an_unknown_device(model_dir):
    res = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir), "--device", "tpu"])
    _fails_cleanly(res, "device", "cuda:N")


def test_score_json_times_the_real_decode(model_dir, synthetic_category, monkeypatch):
    """score decodes each photo before the model sees it: that decode is what timing_ms.decode reports."""
    import anomaly_service.images as images

    load = images.decode_image  # what score calls: the decode and what it says (which frame of several)

    def slow_load(*args, **kwargs):
        time.sleep(0.05)
        return load(*args, **kwargs)

    monkeypatch.setattr(images, "decode_image", slow_load)
    res = run("score", "--model", str(model_dir / "part"), "--json", str(synthetic_category / "test/good/000.png"))
    assert res.exit_code == 0, res.output
    timing = json.loads(res.output.splitlines()[0])["timing_ms"]
    assert timing["decode"] >= 50
    assert timing["total"] == pytest.approx(sum(v for k, v in timing.items() if k != "total"), abs=0.01)


def test_score_json_carries_the_evidence_or_null_for_older_models(model_dir, tmp_path):
    """Each region's closest good region seen in training and the part's map place; null for a model saved
    before they were kept, which still scores."""
    import shutil

    import numpy as np

    from conftest import add_defect, png_bytes, textured_part

    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes(add_defect(textured_part(np.random.default_rng(4)), 64, 64, radius=12)[0]))
    old = shutil.copytree(Path(__file__).parent / "data" / "legacy_v1" / "default", tmp_path / "old")
    rows = {}
    for name, model in (("new", model_dir / "part"), ("old", old)):
        res = run("score", "--model", str(model), str(bad), "--json")
        assert res.exit_code == 0, res.output
        rows[name] = json.loads(res.stdout.splitlines()[0])
    new, old_row = rows["new"], rows["old"]
    assert new["is_anomaly"] and new["regions"] and set(new["embedding"]) == {"x", "y"}
    nn = new["regions"][0]["nearest_normal"]
    assert {"image", "name", "sha256", "image_width", "image_height", "box", "patch", "distance"} == set(nn)
    assert old_row["is_anomaly"] and old_row["regions"] and old_row["embedding"] is None
    assert all(r["nearest_normal"] is None for r in old_row["regions"])


def test_fit_with_orientation_any_on_a_surface_says_to_use_fixed(synthetic_category, tmp_path):
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(tmp_path / "m"), "-q", "--orientation", "any", *FAST])
    assert res.exit_code == 0, res.output
    # the synthetic texture has a grain the fit reads, so the warning says each photo is turned back to it
    assert ("warning: orientation any on a surface (12 of 12 good images run out of the frame, each photo turned to "
            "the good images' grain first)") in res.output
    assert "--orientation fixed" in res.output
    info = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    line = next(x for x in info.output.splitlines() if x.startswith("orientation "))
    assert "any: 4 turned copies an image, bank up to 2x" in line and "12 of 12 images run out of the frame" in line
    assert re.search(r"turned pose for \d+ of 12 images \([+-]\d+% on the upright photos' own [\d.]+\)", line)
    assert re.search(r"[+-]\d+% on the [\d.]+ the upright photos alone set", res.output)
    # an update adds images (and their surface count), not turned poses: the poses stay counted over the fit's
    add = tmp_path / "add"
    add.mkdir()
    shutil.copy(sorted((synthetic_category / "test/good").iterdir())[0], add / "new.png")  # one it has not seen
    res = CliRunner().invoke(app, ["update", str(tmp_path / "m"), "--add-good", str(add), "-q"])
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    line = next(x for x in info.output.splitlines() if x.startswith("orientation "))
    assert re.search(r"turned pose for \d+ of 12 images", line) and "13 of 13 images run out of the frame" in line


def test_fit_into_a_folder_that_is_not_a_model_stops_before_fitting(synthetic_category, tmp_path, monkeypatch):
    """--out (or evaluate --save-model) naming a folder of other files: the error comes first, not after the fit."""
    from anomaly_service.model import AnomalyModel

    def no_fit(self, *args, **kwargs):
        raise AssertionError("fitted before checking --out")

    monkeypatch.setattr(AnomalyModel, "fit", no_fit)
    taken = tmp_path / "photos"
    taken.mkdir()
    (taken / "keep.txt").write_text("not a model")
    res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(taken), "-q", *FAST)
    assert res.exit_code == 2 and "not a model directory" in res.output
    res = run("evaluate", str(synthetic_category), "--save-model", str(taken), "-q", *FAST)
    assert res.exit_code == 2 and "not a model directory" in res.output
    assert (taken / "keep.txt").read_text() == "not a model"


def test_evaluate_save_model_keeps_the_model_it_replaces_to_roll_back_to(synthetic_category, fitted_dir):
    """The README's main job re-run (evaluate --save-model over the served model) deleted the version it replaced:
    its change log line named a previous version that no rollback could reach. It is archived as a fit's is."""
    before = json.loads(run("versions", str(fitted_dir), "--json").output)
    res = run("evaluate", str(synthetic_category), "--save-model", str(fitted_dir), "-q", *FAST)
    assert res.exit_code == 0, res.output
    # as a fit says them: where the model went, and whether the whole-image branch was fused
    assert f"saved to {fitted_dir.resolve()}" in res.output and "layout " in res.output
    after = json.loads(run("versions", str(fitted_dir), "--json").output)
    assert len(after) == 2 and after[1]["id"] == before[0]["id"] and not after[1]["current"]
    res = run("rollback", str(fitted_dir), "--to", before[0]["id"])
    assert res.exit_code == 0 and f"is now version {before[0]['id']}" in res.output, res.output
    res = run("evaluate", str(synthetic_category), "--model", str(fitted_dir), "--keep-versions", "2")
    assert res.exit_code == 2 and "--keep-versions cannot be used with --model" in res.output


def test_fit_warns_before_the_work_when_the_service_could_not_serve_the_name(synthetic_category, tmp_path,
                                                                             monkeypatch):
    """The service serves models by directory name and takes only plain names: a model saved as "bottle line 1"
    would only show up in /models' errors. The fit says so before it starts; the model is still written. The rule
    said "letters", and a plant read its 'Flasche-ü' as letters: it says ASCII letters."""
    from anomaly_service.model import AnomalyModel

    def no_fit(self, *args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(AnomalyModel, "fit", no_fit)
    for out in (tmp_path / "models" / "bottle line 1", tmp_path / "models" / "Flasche-ü"):
        res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                       str(out), "-q", *FAST])
        assert "the service will not serve a model named" in res.output and repr(out.name) in res.output
        assert "ASCII letters" in res.output  # "letters" alone: a plant took its 'ü' for one
    res = CliRunner().invoke(app, ["evaluate", str(synthetic_category), "--save-model", str(tmp_path / "a b"),
                                   "-q", *FAST])
    assert "--save-model" in res.output and "the service will not serve a model named 'a b'" in res.output
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(tmp_path / "models" / "bottle_1.v2"), "-q", *FAST])
    assert "will not serve" not in res.output


def test_a_fit_stopped_by_sigterm_cleans_up_and_keeps_the_previous_model(fitted_dir, synthetic_category, tmp_path):
    """A container stop (SIGTERM) during a re-fit onto a model: it stops as Ctrl-C does, says so, leaves no
    half-written copy beside the model, and the model it was replacing still loads (a plant trial found a
    .NAME.tmp-* directory left for good after a SIGTERM during the save)."""
    import os
    import signal
    import subprocess
    import sys

    from anomaly_service import AnomalyModel

    before = (fitted_dir / "manifest.json").read_bytes()
    log = tmp_path / "fit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "fit", "--normal-dir",
                                 str(synthetic_category / "train/good"), "--out", str(fitted_dir), *FAST],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while "features" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    assert code == 130 and "error: interrupted" in text, text
    assert "Traceback" not in text
    assert not [p.name for p in fitted_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert (fitted_dir / "manifest.json").read_bytes() == before
    AnomalyModel.load(fitted_dir)


def test_serve_help_shows_what_each_typed_flag_takes():
    """A setting with a fixed set of values shows them, a number shows its type (not TEXT), and a value outside the
    set is refused by the flag itself, naming the choices."""
    out = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "--knn-precision [auto|fp32|bf16]" in out and "--runtime [auto|torch|onnx]" in out
    assert "--log-level [critical|error|warning|info|debug]" in out
    assert re.search(r"--inference-workers INTEGER", out)
    res = CliRunner().invoke(app, ["serve", "--runtime", "tensorrt"])
    assert res.exit_code == 2 and "'tensorrt' is not one of 'auto', 'torch', 'onnx'" in res.output


def _broken_exif_jpeg(path: Path) -> None:
    """A photo whose EXIF block is cut short: its directory declares five tags and holds one (Pillow reads the one
    and complains of the rest)."""
    import io
    import struct

    import numpy as np

    from conftest import textured_part

    buf = io.BytesIO()
    Image.fromarray(textured_part(np.random.default_rng(5))).save(buf, "JPEG", quality=95)
    directory = struct.pack("<H", 5) + struct.pack("<HHLL", 0x0112, 3, 1, 1)
    exif = b"Exif\0\0II*\0" + struct.pack("<L", 8) + directory
    jpeg = buf.getvalue()
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])


def test_a_photo_with_a_broken_exif_block_is_scored_without_pillows_complaint_in_the_output(model_dir, tmp_path):
    """`anomaly score` printed Pillow's "UserWarning: Corrupt EXIF data" (with its source path and line) into its
    output, between a script's result lines. Decoding reads the photo as if the unreadable tags were absent, so the
    command scores it and says nothing of it. A real process: Python prints warnings outside pytest's capture."""
    import os
    import subprocess
    import sys

    photo = tmp_path / "broken_exif.jpg"
    _broken_exif_jpeg(photo)
    done = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model_dir / "part"),
                           str(photo)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{photo}\t") and len(done.stdout.splitlines()) == 1
    assert "Warning" not in done.stderr and "EXIF" not in done.stderr, done.stderr


def test_score_prints_a_file_name_that_is_not_utf8_under_a_strict_utf8_stdout(model_dir, tmp_path):
    """Under a UTF-8 locale Python's stdout refuses the lone surrogates a Latin-1 file name is read as: the run
    stopped at that photo with a traceback and the parts after it went unjudged. Its name is printed as its bytes."""
    import os
    import subprocess
    import sys

    from conftest import png_bytes, textured_part
    import numpy as np

    folder = tmp_path / "parts"
    folder.mkdir()
    for name in (b"a.png", b"caf\xe9.png", b"z.png"):
        (folder / os.fsdecode(name)).write_bytes(png_bytes(textured_part(np.random.default_rng(len(name)))))
    done = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model_dir / "part"),
                           str(folder)], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    names = [line.split(b"\t")[0] for line in done.stdout.splitlines()]
    assert names == [os.fsencode(folder) + b"/" + n for n in (b"a.png", b"caf\xe9.png", b"z.png")]


def test_a_stop_that_lands_after_the_new_model_is_in_place_says_so_and_logs_the_fit(fitted_dir, synthetic_category,
                                                                                   monkeypatch):
    """A SIGTERM that arrives once the re-fit's model has been swapped in (during the archive, the clean-up or the
    change log) cannot bring the previous model back: the fit said "interrupted" as if it stood, and its change was
    missing from the log. The signal is real; it is sent the moment the real save returns."""
    import os
    import signal

    from anomaly_service import model_history
    from anomaly_service.artifact import model_version_id
    from anomaly_service.model import AnomalyModel

    real_save = AnomalyModel.save

    def save_then_sigterm(self, *args, **kwargs):
        out = real_save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next line of the caller runs
        return out

    monkeypatch.setattr(AnomalyModel, "save", save_then_sigterm)
    before = model_version_id(fitted_dir)
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(fitted_dir), "-q", "--seed", "5", *FAST])
    now = model_version_id(fitted_dir)
    assert now != before  # the new model is in place: the message must not say otherwise
    assert res.exit_code == 130, res.output
    assert "interrupted after the save" in res.output and now in res.output, res.output
    assert [e["version"] for e in model_history.read(fitted_dir) if e["action"] == "fit"][0] == now


def test_a_stop_while_the_replaced_model_is_archived_leaves_it_in_the_archive(fitted_dir, synthetic_category,
                                                                             monkeypatch):
    """A SIGTERM that arrived as a re-fit archived the model it replaced left that version in a hidden
    .part.old-* directory: `anomaly versions` did not list it and no rollback could reach it. The signal is real,
    sent the moment the archive begins; the fit still ends saying the new version is in place."""
    import os
    import signal

    from anomaly_service import artifact

    real_archive = artifact.archive_version

    def sigterm_then_archive(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_archive(*args, **kwargs)

    monkeypatch.setattr(artifact, "archive_version", sigterm_then_archive)
    before = artifact.model_version_id(fitted_dir)
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(fitted_dir), "-q", "--seed", "5", *FAST])
    assert res.exit_code == 130 and "interrupted after the save" in res.output, res.output
    assert not list(fitted_dir.parent.glob(".part.old-*"))
    assert before in os.listdir(artifact.versions_dir(fitted_dir))
    monkeypatch.undo()
    listed = run("versions", str(fitted_dir))
    assert listed.exit_code == 0 and before in listed.output, listed.output


def test_an_image_size_too_large_for_memory_is_one_error_line(synthetic_category, tmp_path):
    """--image-size 1000000 asks for terabytes: the allocation failed with a traceback instead of saying which
    option to lower."""
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(synthetic_category / "train/good"), "--out",
                                   str(tmp_path / "m"), "-q", "--backbone", "efficientnet_lite0", "--image-size",
                                   "1000000"])
    assert res.exit_code == 2, res.output
    assert "error: out of memory" in res.output and "--image-size" in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, says", [
    (["fit"], "Missing option '--normal-dir'; see 'anomaly fit --help'"),
    (["fit", "--normal-dir", ".", "--backbone", "vgg"], "Invalid value for '--backbone'"),
    (["records", "export", "--since", "1700000000"], "is not an ISO 8601 date or time"),
    (["records", "export", "--since", "2026-12-02", "--until", "2026-12-01"], "is after --until"),
    # click 8.1 says "No such option: --bogus", 8.2 "No such option '--bogus'"
    (["db", "upgrade", "--bogus"], ("No such option", "--bogus", "; see 'anomaly db upgrade --help'")),
    (["nope"], "No such command 'nope'; see 'anomaly --help'"),
    # click's parser raises these without a context: the hint named no command, or the group's
    (["fit", "--normal-dir", ".", "--mask"], "requires an argument; see 'anomaly fit --help'"),
    (["db", "backup", "--out"], "requires an argument; see 'anomaly db backup --help'"),
    (["records", "export", "--nope"], "see 'anomaly records export --help'"),
])
def test_a_flag_click_refuses_is_one_error_line_as_any_bad_input(args, says):
    """README and cli.md: bad input is one line ``error: ...`` and exit code 2. A flag click itself refuses (missing,
    unknown, a value not among the choices, a date that does not parse) was click's usage, a hint and a capitalised
    ``Error:`` on three lines, which a script looking for ``error:`` missed."""
    res = CliRunner().invoke(app, args, prog_name="anomaly")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    assert all(part in res.output for part in ([says] if isinstance(says, str) else says)), res.output


def test_a_command_given_nothing_still_shows_its_help():
    res = CliRunner().invoke(app, ["db"])
    assert "Commands:" in res.output and "upgrade" in res.output and "error:" not in res.output


def test_two_fits_of_the_same_bytes_in_one_second_are_two_versions(synthetic_category, tmp_path, monkeypatch):
    """CI found it: a fit and an `evaluate --save-model` that gave the same model in the same second wrote the same
    manifest (its time said the second), so one version id, and the version replaced was not archived: the change
    log named a previous version no rollback could reach. The fit's time now says the microsecond."""
    import datetime as real
    import types

    import anomaly_service.branch_beside as branch_beside
    import anomaly_service.fitting as fitting
    import anomaly_service.knn_scorer as knn_scorer

    ticks = iter(range(100, 10**6, 100))

    class SameSecond(real.datetime):  # a fast machine: both fits in one second
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 12, 6, 8, 0, 0, next(ticks), tzinfo=real.timezone.utc)

    monkeypatch.setattr(fitting, "datetime", SameSecond)
    for timed in (fitting, knn_scorer, branch_beside):  # and as fast: the seconds the manifest keeps are alike
        monkeypatch.setattr(timed, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))
    out = tmp_path / "models" / "part"
    ids = []
    for _ in range(2):
        res = run("fit", "--normal-dir", str(synthetic_category / "train/good"), "--out", str(out), "-q", *FAST)
        assert res.exit_code == 0, res.output
        ids.append(json.loads(run("versions", str(out), "--json").output)[0]["id"])
    assert ids[0] != ids[1] and ids[0][:16] == ids[1][:16] == "20261206T080000Z"  # told apart by their digests
    assert [v["id"] for v in json.loads(run("versions", str(out), "--json").output)] == [ids[1], ids[0]]


def test_fit_recursive_names_a_folder_it_cannot_read_and_why(tmp_path):
    """With --recursive, a subfolder of another user's (mode 700) was passed over unsaid by the listing, and once
    said, was told to give --recursive, which was given."""
    prefix = as_other_user(tmp_path)
    good = tmp_path / "good"
    (good / "closed").mkdir(parents=True)
    Image.fromarray(textured_part(np.random.default_rng(0))).save(good / "closed" / "0.png")
    os.chmod(good / "closed", 0o700)
    os.chown(good / "closed", 65534, 65534)
    res = subprocess.run([*prefix, sys.executable, "-m", "anomaly_service.cli", "fit", "--normal-dir", str(good),
                          "--recursive", "--backbone", "efficientnet_lite0", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert (f"warning: skipping {good / 'closed'}: a folder that cannot be read (Permission denied): its images are "
            "left out") in res.stderr
