"""A small inspection PC beside the line: a read-only root file system, with only a data volume that takes writes.

Scoring and drawing a heatmap must write nothing outside the directories it is given (the home, the working
directory) and must work where neither they nor ``/tmp`` take writes. Before, importing matplotlib for the color
table made ``~/.config/matplotlib`` (or a temporary directory, left behind when the service was killed), and where
none could be made the service did not start; ONNX Runtime wrote a telemetry database under ``~/.cache``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly_service.heatmap import color_table
from conftest import free_port

# Scores one photo with the session model on the default runtime (ONNX Runtime on a CPU) and draws its heatmap.
PROBE = """
import sys
import numpy as np
from anomaly_service import AnomalyModel
from anomaly_service.heatmap import heatmap_png
model = AnomalyModel.load(sys.argv[1])
res = model.score(np.full((128, 128, 3), 128, np.uint8))
png = heatmap_png(res.anomaly_map / res.threshold)
print("ok" if png.startswith(b"\\x89PNG") else "no png")
"""


def probe_env(home: Path) -> dict[str, str]:
    """This run's environment with ``home`` as the home and none of the variables that would move the writes."""
    moved = {"MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY", "TMPDIR", "TEMP", "TMP"}
    return {**{k: v for k, v in os.environ.items() if k not in moved}, "HOME": str(home)}


def test_the_color_table_is_matplotlibs_turbo():
    """The shipped table is the one the heatmaps were drawn with (matplotlib's turbo at 256 points)."""
    from matplotlib import colormaps

    expected = (colormaps["turbo"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(color_table(), expected)
    with pytest.raises(ValueError, match="unknown color map"):
        color_table("no-such-map")


def test_scoring_writes_nothing_in_the_home_or_the_working_directory(model_dir, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", PROBE, str(model_dir / "part")], cwd=work, env=probe_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in [*home.rglob("*"), *work.rglob("*")]) == []


def test_scoring_on_a_read_only_root_with_no_writable_directory(model_dir, tmp_path):
    """The whole root read-only (a private mount namespace: the machine's own is untouched) and the working
    directory ``/``, as a systemd unit runs: the heatmap is drawn, and nothing warns about a directory."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    script = f'mount -o remount,bind,ro / && cd / && {sys.executable} -c "$PROBE" {model_dir / "part"}'
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env={**probe_env(tmp_path), "PROBE": PROBE}, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr
    assert "writable" not in done.stderr and "telemetry" not in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["serve", "fit"])
def test_no_usable_temporary_directory_is_one_error_line_at_start(model_dir, tmp_path, command):
    """With no usable temporary directory the service started all the same: every upload over 1 MiB was then
    refused, and a model whose loading imports torch's compiler package (which makes its cache directory there)
    failed, every later one with an error about torch's cache registry (mvtec bottle's fit: none of three models
    loaded). Now the command stops at once, naming TMPDIR."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    data = tmp_path / "data"
    data.mkdir()
    args = {"serve": f"serve --model-dir {model_dir} --port {free_port()} --data-dir {data}",
            "fit": f"fit --normal-dir {data} --out {data / 'model'} --backbone efficientnet_lite0"}[command]
    script = (f"mount -o remount,bind,ro / && mount --bind {data} {data} && mount -o remount,bind,rw {data} && "
              f"cd / && exec {sys.executable} -m anomaly_service.cli {args}")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=probe_env(tmp_path))
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{command} did not stop: {err[-2000:]}")
    if proc.returncode != 0 and "mount" in err and "Traceback" not in err and "error:" not in err:
        pytest.skip(f"cannot mount here: {err.strip()}")
    assert proc.returncode == 2, err
    assert err.startswith("error: no usable temporary directory") and "TMPDIR" in err and len(err.splitlines()) == 1


def _in_read_only_root(tmp_path: Path, data: Path, env: dict[str, str], args: str,
                       also: str = "", cwd: str = "/") -> subprocess.CompletedProcess:
    """``anomaly ARGS`` in a private mount namespace whose root is read-only but for ``data`` (the data volume),
    from the working directory ``cwd`` (``/``, as a systemd unit on an edge PC runs it); ``also``: more mounts."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    script = (f"mount -o remount,bind,ro / && mount --bind {data} {data} && mount -o remount,bind,rw {data} {also}"
              f"&& cd {cwd} && exec {sys.executable} -m anomaly_service.cli {args}")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env={**probe_env(tmp_path), **env}, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr and "Traceback" not in done.stderr and \
            "error:" not in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    return done


def test_a_tmpdir_on_the_data_volume_that_does_not_exist_yet_is_made(model_dir, tmp_path):
    """deploy/README.md's unit sets ``TMPDIR=/data/tmp`` and nothing made that directory: the command stopped
    saying to set TMPDIR (which was set), because tempfile passes a missing one over in silence, and on a writable
    root its writes went to ``/tmp`` on the root instead of the data volume. Now it is made and used."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(data / "part.png")
    done = _in_read_only_root(tmp_path, data, {"TMPDIR": str(data / "tmp")},
                              f"score --model {model_dir / 'part'} {data / 'part.png'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(data / "part.png")) and (data / "tmp").is_dir()


def test_a_tmpdir_that_takes_no_writes_is_named_not_passed_over(model_dir, tmp_path):
    """A TMPDIR that cannot be made (under the read-only root), or that exists and takes no writes while the
    working directory would: each is named with its reason, in one line, instead of being passed over."""
    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    args = f"score --model {model_dir / 'part'} {data / 'none.png'}"
    done = _in_read_only_root(tmp_path, data, {"TMPDIR": "/no-such-dir"}, args)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: TMPDIR /no-such-dir is no directory and could not be made "
                                  "(Read-only file system)"), done.stderr
    locked = data / "locked"
    done = _in_read_only_root(tmp_path, data, {"TMPDIR": str(locked)}, args, cwd=str(data),
                              also=f"&& mount --bind {locked} {locked} && mount -o remount,bind,ro {locked} ")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: TMPDIR {locked} takes no writes (Read-only file system)"), done.stderr


def test_a_tmpdir_is_made_only_as_the_last_folder_of_an_absolute_path(model_dir, tmp_path):
    """A misspelt TMPDIR (or one on a volume not mounted) had its whole chain of folders made, on the root's card,
    and a relative one was made under the working directory: each is named instead, and nothing is made."""
    args = ["score", "--model", str(model_dir / "part"), str(tmp_path / "none.png")]
    (tmp_path / "gone").symlink_to(tmp_path / "elsewhere")
    cases = [(str(tmp_path / "dta" / "tmp"), "No such file or directory"), ("scratch/tmp", "a relative path"),
             ("scratch", "a relative path"),
             (str(tmp_path / "gone"), f"a link to {tmp_path / 'elsewhere'}, which is missing")]
    runs = [subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**probe_env(tmp_path), "TMPDIR": named},
                             cwd=tmp_path) for named, _ in cases]  # at once: each spends its time importing torch
    for (named, why), run in zip(cases, runs):
        _, stderr = run.communicate(timeout=300)
        done = subprocess.CompletedProcess(run.args, run.returncode, "", stderr)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"error: TMPDIR {named} is no directory and could not be made ({why}"), \
            done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == [], \
        list(tmp_path.iterdir())
