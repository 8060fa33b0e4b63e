"""What a user coming from anomalib's PatchCore does first: its flag names, its backbone names and its Folder
dataset, each answered with this product's (docs/coming-from-anomalib.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service.cli import app

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "coming-from-anomalib.md"


@pytest.mark.parametrize("args, ours", [
    (["fit", "--coreset_sampling_ratio", "0.1"], "--coreset-ratio"),
    (["fit", "--coreset-sampling-ratio", "0.1"], "--coreset-ratio"),
    (["fit", "--num_neighbors", "9"], "leave it at 1"),
    (["fit", "--layers", "layer2"], "layer2 + layer3"),
    (["fit", "--pre-trained"], "--weights names a file"),
    (["fit", "--pre_trained"], "--weights names a file"),
    (["fit", "--backbone", "tf_efficientnet_lite0"], "tf_efficientnet_lite0 is efficientnet_lite0 here"),
    (["evaluate", "DIR", "--abnormal-dir", "crack"], "MVTec layout"),
    (["evaluate", "DIR", "--normal-dir", "good", "--abnormal-dir", "crack"], "MVTec layout"),
    (["evaluate", "--root", "DIR"], "MVTec layout"),
    (["evaluate", "DIR", "--coreset_sampling_ratio", "0.1"], "--coreset-ratio"),
    (["score", "--model", "m", "x.png", "--threshold", "0.5"], "1.0 is that threshold, not 0.5"),
])
def test_anomalib_spellings_are_answered_with_ours(args, ours):
    """anomalib's names were refused with click's guess of a near flag, which pointed elsewhere (``--pre-trained``:
    "did you mean --projection-dim?", ``--num-neighbors``: no guess, ``--layers``: "--layer-balance") or with the
    backbone choices alone. Each is now one error line naming what stands for it here, and the guide."""
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert ours in lines[0] and "docs/coming-from-anomalib.md" in lines[0], lines[0]
    assert "Did you mean" not in lines[0] and "--projection-dim" not in lines[0]


@pytest.mark.parametrize("params, ours", [
    ({"coreset_sampling_ratio": 0.1}, "is coreset_ratio here"),
    ({"num_neighbors": 9}, "k is not it"),
    ({"layers": ("layer2", "layer3")}, "choose them with backbone"),
    ({"pre_trained": True}, "always ImageNet-pretrained"),
    ({"backbone": "tf_efficientnet_lite0"}, "tf_efficientnet_lite0 is efficientnet_lite0 here"),
])
def test_the_python_api_answers_anomalib_s_names_too(params, ours):
    """In Python, ``AnomalyModel(num_neighbors=9)`` listed every parameter, ``layers`` and ``pre_trained`` too, and
    timm's backbone name got the list of ours: as on the command line, each now says what stands for it here."""
    from anomaly_service import AnomalyModel
    from anomaly_service.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        AnomalyModel(**params)
    assert ours in str(caught.value) and "docs/coming-from-anomalib.md" in str(caught.value), str(caught.value)
    assert "parameters: backbone" not in str(caught.value)


def test_score_s_help_says_where_the_threshold_is():
    """An anomalib user reads 0.5 as the threshold: 9 of bottle's 20 good test photos score above it. ``score
    --help``, where they look first, said nothing of the scale of the numbers it prints."""
    res = CliRunner().invoke(app, ["score", "--help"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "1.0 is the threshold (not 0.5 as in anomalib)" in text, text


def test_k_s_help_says_it_is_not_num_neighbors():
    """``--k`` is where a user looking for anomalib's ``num_neighbors=9`` lands; set to 9 it averages nine distances
    into every patch score, which anomalib never does. Its help now says so."""
    res = CliRunner().invoke(app, ["fit", "--help"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "Not anomalib's num_neighbors" in text, text


def test_other_unknown_flags_and_backbones_keep_click_s_answer():
    """Only anomalib's spellings are answered so: a typo keeps click's guess, an unknown backbone the choices."""
    res = CliRunner().invoke(app, ["fit", "--coreset-ratiox", "3"])
    # click's guess names the flag meant: 8.2 asks "Did you mean", 8.1 lists "(Possible options: ...)"
    guess = res.output.replace("--coreset-ratiox", "")
    assert res.exit_code == 2 and "--coreset-ratio" in guess and "anomalib" not in res.output, res.output
    res = CliRunner().invoke(app, ["fit", "--backbone", "vgg16"])
    assert res.exit_code == 2 and "'vgg16' is not one of" in res.output and "anomalib" not in res.output


def write_folder_dataset(root: Path, normal_test: bool = True, masks: bool = True) -> Path:
    """A dataset as anomalib's Folder datamodule takes it: ``good/``, ``good_test/``, one folder per defect type and
    ``mask/<type>/`` with each mask named as its image, as anomalib's Folder dataset names them."""
    from conftest import add_defect, textured_part

    rng = np.random.default_rng(3)
    for sub in ["good", "crack", "scratch", "mask/crack", "mask/scratch"] + (["good_test"] if normal_test else []):
        (root / sub).mkdir(parents=True)
    for i in range(15):
        Image.fromarray(textured_part(rng)).save(root / "good" / f"{i:03d}.png")
    for i in range(3 if normal_test else 0):
        Image.fromarray(textured_part(rng)).save(root / "good_test" / f"{i:03d}.png")
    for kind in ("crack", "scratch"):
        for i in range(2):
            image, mask = add_defect(textured_part(rng), int(rng.integers(24, 104)), int(rng.integers(24, 104)))
            Image.fromarray(image).save(root / kind / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "mask" / kind / f"{i:03d}.png")
    if not masks:  # a classification dataset: anomalib's Folder without mask_dir
        shutil.rmtree(root / "mask")
    return root


def test_a_folder_dataset_is_refused_with_the_layout_named(tmp_path):
    """``anomaly evaluate`` on a Folder dataset said only "it has no test/ directory": nothing of what it reads
    instead, nor how to get there from the layout the user has."""
    folder = write_folder_dataset(tmp_path / "part")
    res = CliRunner().invoke(app, ["evaluate", str(folder), "--backbone", "efficientnet_lite0"])
    assert res.exit_code == 2, res.output
    assert "it has no test/ directory" in res.output
    assert "train/good/" in res.output and "ground_truth/<defect>/" in res.output
    assert "docs/coming-from-anomalib.md" in res.output


def _recipes() -> list[str]:
    """The guide's two shell blocks: the links for a Folder dataset, and the split for one without good_test/."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 2, "the guide's recipes moved: update this test with them"
    return blocks


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("normal_test, masks", [(True, True), (False, True), (True, False)],
                         ids=["good_test", "split", "no_masks"])
def test_the_guide_s_links_recipe_lays_a_folder_dataset_out_for_evaluate(tmp_path, model_dir, normal_test, masks):
    """The guide's commands, as written but for the paths and the defect names it says to set and the command it
    ends with, turn a Folder dataset into what ``evaluate`` reads: every photo in its place, every mask found by its
    image's name, nothing copied, and the metrics measured."""
    src = write_folder_dataset(tmp_path / "folder", normal_test, masks)
    dst = tmp_path / "mvtec"
    links, split = _recipes()
    script = "\n".join(line for line in links.splitlines()
                       if not re.match(r"(src|dst|defects)=|anomaly evaluate", line))
    if not normal_test:  # the split's block stands in for the two links of good/, as the guide says
        good = [line for line in script.splitlines() if line.startswith('ln -s "$src/good')]
        assert len(good) == 2, script
        script = script.replace("\n".join(good), split)
    env = {**os.environ, "src": str(src), "dst": str(dst), "defects": "crack scratch"}
    done = subprocess.run(["bash", "-euc", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    from anomaly_service.evaluate import list_category

    category = list_category(dst)
    good_test = 3 if normal_test else 15 // 5
    assert len(category.train) == 15 - (0 if normal_test else good_test)
    assert sorted((s.defect_type, s.path.name) for s in category.samples if s.label == 1) == \
        [(k, f"{i:03d}.png") for k in ("crack", "scratch") for i in range(2)]
    assert sum(s.label == 0 for s in category.samples) == good_test
    for s in category.samples:
        expected = src / "mask" / s.defect_type / s.path.name if masks and s.label else None
        assert (s.mask_path and s.mask_path.resolve()) == expected  # found through the link
    assert not any(p.is_file() and not p.is_symlink() for p in dst.rglob("*"))  # nothing copied

    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(app, ["evaluate", str(dst), "--model", str(model_dir / "part"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert metrics["n_defect"] == 4 and metrics["n_good"] == good_test and metrics["image_auroc"] is not None
    assert len(metrics["defects_without_mask"]) == (0 if masks else 4)
    assert (metrics["pixel_auroc"] is not None and metrics["pro"] is not None) == masks
