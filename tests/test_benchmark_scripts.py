"""The benchmark scripts as a reviewer runs them: docs/benchmarks.md gives, under each table, the command that printed
it, and nothing else runs those scripts, so a flag renamed, a choice dropped or an import moved breaks them unseen.
Each script imports and answers ``--help``, and every ``python benchmarks/X.py ...`` the docs and the scripts' own
usage lines give parses with that script's own parser (its flags, their values' choices and counts) and names only
fit options and backbones the product knows."""

from __future__ import annotations

import argparse
import os
import functools
import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
SOURCES = [*DOCS, *SCRIPTS]


class _Parsing(Exception):
    """Raised where the script would parse its arguments: the parser is what is checked, nothing is run."""


@pytest.fixture
def run_script(monkeypatch):
    """Run a benchmark script as ``python benchmarks/X.py ARGS`` does, in this process (the imports are shared, so
    two dozen scripts take seconds), and forget the sibling modules it imported afterwards."""
    before = set(sys.modules)

    def run(script: Path, args: list[str]) -> None:
        monkeypatch.setattr(sys, "argv", [str(script), *args])
        monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # as python puts the script's folder
        runpy.run_path(str(script), run_name="__main__")

    yield run
    for name in set(sys.modules) - before:
        if str(BENCHMARKS) in str(getattr(sys.modules[name], "__file__", None) or ""):
            del sys.modules[name]


def _parser(run_script, monkeypatch, script: Path) -> argparse.ArgumentParser:
    """The script's own parser, caught as its main starts parsing (parse_args goes through parse_known_args)."""
    caught: list[argparse.ArgumentParser] = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsing

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Parsing):
            run_script(script, [])
    return caught[0]


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of each benchmark command the docs and the usage lines give. Placeholders stay as
    words (``DIR``, ``<mt any model>``); optional parts in ``[...]`` and ``...`` repeats are read as given."""
    out = []
    for source in SOURCES:
        text = source.read_text().replace("\\\n", " ")  # a usage line continued on the next
        blocks = re.findall(r"```.*?```", text, flags=re.S) if source.suffix == ".md" else [text]
        spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)) if source.suffix == ".md" else []
        spans += [line for block in blocks for line in block.splitlines() if "python benchmarks/" in line]
        for span in spans:
            m = re.search(r"\bpython (benchmarks/[\w.]+\.py)\b(.*)", " ".join(span.split()))
            if m:
                words = re.sub(r"<[^>]*>", "X", m.group(2).split(" #")[0]).replace("[", " ").replace("]", " ")
                out.append((str(source.relative_to(ROOT)), m.group(1), [w for w in shlex.split(words) if w != "..."]))
    return out


@functools.cache
def _fit_options() -> set[str]:
    """What ``--set`` and an orientation's knobs may name: the product's fit options and quality.py's knobs."""
    import dataclasses

    from anomaly_service.config import ModelConfig

    knobs = runpy.run_path(str(BENCHMARKS / "quality.py"))["ORIENT_KNOBS"]
    return {f.name for f in dataclasses.fields(ModelConfig)} | set(knobs)


def _unknown_fit_options(args: argparse.Namespace) -> list[str]:
    """The fit options a parsed command hands the product that it does not know: ``--set KEY=VALUE`` keys,
    ``--orientation any,KNOB=VALUE`` knobs and backbones. The parser takes any word there, so an option renamed in
    the product only failed in a fitting process, minutes in."""
    from anomaly_service.backbones import BACKBONES

    known = _fit_options()
    specs = getattr(args, "orientation", None) or []
    keys = [item.partition("=")[0] for item in getattr(args, "set", None) or []]
    keys += [knob.partition("=")[0] for spec in ([specs] if isinstance(specs, str) else specs)
             for knob in spec.split(",")[1:]]
    backbones = [getattr(args, "backbone", None), *(getattr(args, "backbones", None) or [])]
    return ([f"{key}: no such fit option" for key in keys if key not in known]
            + [f"{name}: no such backbone" for name in backbones if name is not None and name not in BACKBONES])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_answers_help(script, run_script, capsys):
    """``--help`` prints the usage and exits: the script imports on this checkout, and asking does not start a
    measurement (heatmap.py took no arguments and timed its maps on any)."""
    with pytest.raises(SystemExit) as exited:
        run_script(script, ["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_every_documented_benchmark_command_parses(run_script, monkeypatch, capsys):
    commands = _commands()
    parsers: dict[str, argparse.ArgumentParser] = {}
    wrong = []
    for where, script, args in commands:
        if not (ROOT / script).is_file():
            wrong.append(f"{where}: {script}: no such script")
            continue
        if script not in parsers:
            parsers[script] = _parser(run_script, monkeypatch, ROOT / script)
        try:
            parsed = parsers[script].parse_args(args)
        except SystemExit:
            error = capsys.readouterr().err.strip().splitlines()[-1]
            wrong.append(f"{where}: python {script} {shlex.join(args)}: {error}")
            continue
        wrong += [f"{where}: python {script} {shlex.join(args)}: {e}" for e in _unknown_fit_options(parsed)]
    assert not wrong, "\n".join(wrong)
    assert len(commands) > 100 and len(parsers) == len(SCRIPTS)  # the patterns still find them, for every script


def test_records_scale_runs_on_a_small_database(run_script, tmp_path, capsys):
    """The records benchmark times the list operations without and with revision 0004's indexes on a real SQLite
    database. It took them out by downgrading to 0003, which also dropped the columns later revisions added, and
    the store's first query failed (no such column: inspections.warnings)."""
    run_script(BENCHMARKS / "records_scale.py", ["--rows", "400", "--data-dir", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| first page, no filter |" in table and "| stats, last 24 h |" in table

    from anomaly_service.records.store import RecordStore

    store = RecordStore.open(None, tmp_path)
    assert store.current_revision() == store.head_revision() and store.count() == 400
    store.close()


@pytest.mark.slow  # a fit
def test_evidence_runs_with_few_repeats(run_script, synthetic_category, capsys):
    """``--repeats`` is the script's own knob for a quick run, and a render took a quarter of them: fewer than four
    left no timed call and the run died on an empty median after the whole fit. Below one is refused up front."""
    import json
    import math

    run_script(BENCHMARKS / "evidence.py", ["--category", str(synthetic_category), "--repeats", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["test_photos"] == 8 and math.isfinite(out["render_delta_us"]["median"])
    with pytest.raises(SystemExit) as refused:
        run_script(BENCHMARKS / "evidence.py", ["--repeats", "0"])
    assert refused.value.code == 2 and "--repeats" in capsys.readouterr().err


def test_anomalib_side_by_side_scores_a_category_of_oblong_photos(tmp_path, monkeypatch):
    """The side-by-side's ``256`` protocol squashes each mask to anomalib's square input, as anomalib scores it. It
    asked the product's mask reader for the square frame, which since refuses a mask of another aspect, so kos and
    mt (oblong photos) stopped after both fits. anomalib is not needed to check the scoring: a map that is its own
    mask is (near) perfect under both protocols."""
    from PIL import Image

    from anomaly_service.evaluate import read_category
    from conftest import add_defect, textured_part

    rng = np.random.default_rng(0)
    root = tmp_path / "oblong"
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(textured_part(rng, 64, 160)).save(root / "test/good" / f"{i}.png")
        image, mask = add_defect(textured_part(rng, 64, 160), 32, 40 + 40 * i, radius=8)
        Image.fromarray(image).save(root / "test/blob" / f"{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth/blob" / f"{i}_mask.png")
    _, samples = read_category(root)
    truth = [np.asarray(Image.open(s.mask_path)) > 0 if s.mask_path else np.zeros((64, 160), bool) for s in samples]

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first
    script = runpy.run_path(str(BENCHMARKS / "anomalib_side_by_side.py"))  # not run: anomalib is not imported
    quality = script["_quality"](samples, [float(t.any()) for t in truth], [t.astype(np.float32) for t in truth],
                                 [(64, 160)] * len(samples))
    assert quality["pixel_auroc_native"] == 1.0 and quality["pro_native"] > 0.99
    assert quality["pixel_auroc_256"] > 0.999 and quality["pro_256"] > 0.99  # the map resized, the mask nearest


def test_quality_refuses_a_command_with_no_row(run_script, capsys):
    """``--set`` changes every row and adds none, so ``--no-default --set KEY=VALUE`` had nothing to fit: it printed
    the table's header and anomalib's reference rows and exited 0, a run that looks done and measured nothing."""
    with pytest.raises(SystemExit) as refused:
        run_script(BENCHMARKS / "quality.py", ["--categories", "mvtec_ad/bottle", "--no-default", "--set", "seed=1"])
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and "no row" in err and "AUROC" not in out


def test_records_sync_times_both_modes_on_a_real_database(run_script, tmp_path, capsys):
    """The sync benchmark commits through the product's store in both modes (it asserts each connection's mode)."""
    run_script(BENCHMARKS / "records_sync.py", ["--data-dir", str(tmp_path), "--commits", "2", "--rounds", "1",
                                                "--batches", "1", "3"])
    table = capsys.readouterr().out
    assert table.count("\n| 1 | ") == 1 and table.count("\n| 3 | ") == 1


@pytest.mark.parametrize("args, why", [
    (["--model-dir", "{tmp}/none"], "no saved model named tiled"),
    (["--model-dir", "{tmp}/untiled"], "fitted without --tile"),
    (["--backbones", "resnet18"], "unknown backbone 'resnet18'"),
    (["--sides", "1024", "0"], "--sides"),
    (["--tile", "4"], "tile must be"),
])
def test_tile_memory_refuses_arguments_that_measure_nothing(run_script, tmp_path, capsys, args, why):
    """A folder without a model named ``tiled`` ended in a traceback, an unknown backbone in one after the imports,
    and a model fitted without --tile was measured as though tiled (its photos counted with no tiles at all): each
    is said at once, with the usage."""
    (tmp_path / "untiled" / "tiled").mkdir(parents=True)
    (tmp_path / "untiled" / "tiled" / "manifest.json").write_text('{"config": {"tile": null}}')
    with pytest.raises(SystemExit) as refused:
        run_script(BENCHMARKS / "tile_memory.py", [a.format(tmp=tmp_path) for a in args])
    assert refused.value.code == 2 and why in capsys.readouterr().err


def test_rolling_restart_says_why_and_measures_nothing_without_haproxy(run_script, tmp_path, monkeypatch, capsys):
    """The drill needs HAProxy, which CI does not install: where ``haproxy`` is not on the PATH the script says so
    and ends before it fits a model or starts a replica (nothing is written in its work folder)."""
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a PATH with no haproxy on it
    run_script(BENCHMARKS / "rolling_restart.py", ["--restarts", "1", "--work", str(tmp_path / "work")])
    out, err = capsys.readouterr()
    assert "haproxy is not installed" in err and "nothing measured" in err and out == ""
    assert not (tmp_path / "work").exists()


def _started_in(work: Path) -> list[int]:
    """The processes whose command line names ``work`` (the drill's replicas and HAProxy: nothing else names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(work) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("haproxy") is None, reason="the drill needs haproxy on the PATH")
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_rolling_restart_stopped_midway_leaves_no_replica_or_haproxy_running(model_dir, tmp_path, stop):
    """Where HAProxy is installed the drill starts two ``anomaly serve`` replicas and HAProxy. Stopped midway (Ctrl-C
    on the script alone, or a SIGTERM from ``timeout``, a CI job's cancel, ``kill``), it must stop them: a SIGTERM
    ended the script at once, and the replicas and HAProxy ran on, holding their ports, with no parent to stop
    them."""
    import signal
    import subprocess
    import time

    work = tmp_path / "work"
    drill = subprocess.Popen([sys.executable, str(BENCHMARKS / "rolling_restart.py"), "--delays", "0", "--retries",
                              "default", "--restarts", "100", "--clients", "1", "--settle", "0.5", "--model-dir",
                              str(model_dir), "--model", "part", "--work", str(work)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_started_in(work)) < 3 and drill.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_started_in(work)) >= 3, drill.stderr.read().decode() if drill.poll() is not None else "slow"
        time.sleep(1)
        drill.send_signal(getattr(signal, stop))
        drill.wait(timeout=120)
        deadline = time.monotonic() + 10  # a process that just exited may stay listed a moment, until reaped
        while _started_in(work) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _started_in(work) == []
    finally:
        for pid in _started_in(work):  # what the script left (the fault): stopped here, not by the test run's end
            os.kill(pid, 9)
        if drill.poll() is None:
            drill.kill()
            drill.wait()


def test_large_photo_times_each_step_of_a_saved_model_at_each_size(run_script, model_dir, capsys):
    """The large-photo table has a row per size, every step's column filled, the JPEG decoded as the service
    decodes it (synthetic where the shared data is absent)."""
    run_script(BENCHMARKS / "large_photo.py", ["--model", str(model_dir / "part"), "--sides", "200", "320",
                                               "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 200x200")
            or line.startswith("| 320x320")]
    assert len(rows) == 2
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert len(cells) == 13 and all(float(c) >= 0 for c in cells[1:]) and float(cells[-2]) > 0
    # with the overlay a page asks for, drawn smaller: the header says what was rendered
    run_script(BENCHMARKS / "large_photo.py", ["--model", str(model_dir / "part"), "--sides", "320", "--rounds", "1",
                                               "--heatmap", "overlay", "--max-side", "64"])
    out = capsys.readouterr().out
    assert "heatmap overlay, max side 64" in out and sum(line.startswith("| 320x320") for line in out.splitlines()) == 1
