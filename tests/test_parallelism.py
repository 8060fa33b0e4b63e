"""How the package shares the CPU's threads between torch and FAISS."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _imports(*programs: str) -> list[subprocess.CompletedProcess]:
    """Run each program in a fresh interpreter, all at once (each spends its time importing torch)."""
    cwd = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=cwd) for code in programs]
    out = []
    for proc, code in zip(procs, programs):
        stdout, stderr = proc.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(code, proc.returncode, stdout, stderr))
    return out


def _faiss_importers() -> list[str]:
    """The package's modules that import FAISS when they are imported (a top-level ``import faiss``)."""
    root = Path(__file__).resolve().parents[1] / "anomaly_service"
    return sorted("anomaly_service." + ".".join(p.relative_to(root).with_suffix("").parts)
                  for p in root.rglob("*.py") if re.search(r"^import faiss\b", p.read_text(), re.MULTILINE))


def _imports_torch_before_faiss(module: str) -> bool:
    """Whether the module's own top-level imports bring torch in before FAISS: imported on its own, that is the
    order it loads them in (the static form of running ``import module`` in a fresh interpreter, which costs a torch
    import per module)."""
    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / Path(*module.split("."))).with_suffix(".py").read_text())
    names = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    return "torch" in names and names.index("torch") < names.index("faiss")


def test_the_package_loads_faiss_after_torch_and_warns_when_it_cannot():
    """FAISS loaded after torch shares torch's OpenMP threads (parallelism.py); loaded first it keeps a second
    pool, which the package cannot undo, so it says how to avoid it. The package no longer imports either with
    itself (a health probe needs neither): the public names bring them in order, and so does each module that
    imports FAISS, imported on its own. (FAISS first, then the public names: the last program of the test below.)"""
    importers = _faiss_importers()
    assert "anomaly_service.index" in importers and "anomaly_service.model" in importers
    assert [m for m in importers if not _imports_torch_before_faiss(m)] == []
    check = "import sys; mods = list(sys.modules); print(mods.index('torch') < mods.index('faiss'))"
    order, late_both, torch_first = _imports(
        f"from anomaly_service import AnomalyModel; {check}",
        "import faiss, torch; from anomaly_service import AnomalyModel",  # torch there too, but after FAISS
        "import torch, faiss; from anomaly_service import AnomalyModel")
    assert order.returncode == 0 and order.stdout.strip() == "True" and "faiss was imported" not in order.stderr
    assert late_both.returncode == 0 and "faiss was imported before torch" in late_both.stderr
    assert torch_first.returncode == 0 and "faiss was imported" not in torch_first.stderr


def test_commands_that_run_no_network_start_without_torch(tmp_path):
    """A container runs `anomaly healthcheck` every few seconds; the package imported torch with itself, and the
    command group set torch's threads, so each probe took seconds of CPU and hundreds of MB beside the service it
    probed (and a loaded host could pass the probe's timeout). The probe, the records' commands and the package's
    own import load neither torch nor FAISS.

    The group set torch's threads before a command's flags were read, so `fit --help`, a misspelt flag and a
    TMPDIR that cannot be one each waited seconds for torch before their answer: they load neither now, and a
    command that runs still has its threads fitted to the CPU quota first."""
    data = tmp_path / "records"
    run = ("import sys; from click.testing import CliRunner; from anomaly_service.cli import app; "
           "r = CliRunner().invoke(app, {args!r}{env}); print(r.exit_code, 'torch' in sys.modules, "
           "'faiss' in sys.modules)")
    quota_of_one = ("import joblib; joblib.cpu_count = lambda: 1; "  # the CPU quota a container would give it
                    + run.format(args=["score", "--model", str(tmp_path / "none"), "x.png"], env="")
                    + "; import torch; print(torch.get_num_threads())")
    package, probe, upgrade, helped, misspelt, tmpdir, quota = _imports(
        "import sys, anomaly_service, anomaly_service.cli; print('torch' in sys.modules, 'faiss' in sys.modules)",
        run.format(args=["healthcheck", "--url", "http://127.0.0.1:9/healthz", "--timeout", "0.5"], env=""),
        run.format(args=["db", "upgrade", "--data-dir", str(data)], env=""),
        run.format(args=["fit", "--help"], env=""),
        run.format(args=["fit", "--normal-dir", str(tmp_path), "--no-such-flag"], env=""),
        run.format(args=["score", "--model", str(tmp_path / "none"), "x.png"], env=", env={'TMPDIR': 'scratch'}"),
        quota_of_one)
    export, = _imports(run.format(args=["records", "export", "--data-dir", str(data), "--format", "jsonl"], env=""))
    assert package.stdout.split() == ["False", "False"], package.stderr[-500:]
    assert probe.stdout.split() == ["1", "False", "False"], probe.stderr[-500:]  # refused: exit 1, said plainly
    assert upgrade.stdout.split() == ["0", "False", "False"], upgrade.stderr[-500:]
    assert export.stdout.split() == ["0", "False", "False"], export.stderr[-500:]
    assert helped.stdout.split() == ["0", "False", "False"], helped.stderr[-500:]
    assert misspelt.stdout.split() == ["2", "False", "False"], misspelt.stderr[-500:]
    assert tmpdir.stdout.split() == ["2", "False", "False"], tmpdir.stderr[-500:]
    assert quota.stdout.split()[:2] == ["2", "True"] and quota.stdout.split()[-1] == "1", quota.stdout


def test_a_process_that_loaded_faiss_first_is_told_whatever_of_the_package_it_imports(tmp_path):
    """The package's import brought torch, and its import warned where FAISS came first; with the public names
    imported when first asked for, `import anomaly_service` before FAISS no longer puts torch first (as
    benchmarks/equivalence.py and scale.py relied on), and a process that imported FAISS and then a module of the
    package directly was no longer told. Every module that imports FAISS says it once, in words that are true;
    the benchmarks that time FAISS import torch before it."""
    told = "faiss was imported before torch"
    programs = [*(f"import faiss; import {module}" for module in _faiss_importers()),
                "import anomaly_service, faiss; import anomaly_service.index",
                "import faiss; from anomaly_service import AnomalyModel; import anomaly_service.index"]
    (tmp_path / "patches_c_64.npz").write_bytes(b"not an npz")  # run_search fails at its cache, past its imports
    order = "import sys; mods = list(sys.modules); print(mods.index('torch') < mods.index('faiss'))"
    benchmarks = [f"import runpy; runpy.run_path('benchmarks/equivalence.py', run_name='bench'); {order}",
                  "import argparse, pathlib, runpy; g = runpy.run_path('benchmarks/scale.py', run_name='bench')\n"
                  f"try: g['run_search'](argparse.Namespace(banks=[1], category='c', workdir=pathlib.Path("
                  f"{str(tmp_path)!r}), backbone='efficientnet_lite0'))\nexcept Exception: pass\n{order}"]
    *late, equivalence, scale = _imports(*programs, *benchmarks)
    assert [(p.args, p.returncode, p.stderr.count(told)) for p in late] == [(p.args, 0, 1) for p in late]
    assert all("import torch before faiss" in p.stderr for p in late), late[0].stderr[-300:]
    assert "import anomaly_service" not in late[0].stderr  # which no longer helps
    assert [p.stdout.strip() for p in (equivalence, scale)] == ["True", "True"], scale.stderr[-500:]
    assert told not in equivalence.stderr + scale.stderr


def test_the_public_names_are_listed_before_use_and_a_misspelt_one_does_not_type_check():
    """`dir(anomaly_service)` (an interpreter's completion) lists the names imported when first asked for, and
    the module's __getattr__ is hidden from type checkers: with it in view, mypy took any name imported from the
    package (`from anomaly_service import AnomalyModle`) as Any and said nothing."""
    import anomaly_service

    assert {"AnomalyModel", "ModelConfig", "ScoreResult", "ConfigError", "__version__"} <= set(dir(anomaly_service))
    tree = ast.parse(Path(anomaly_service.__file__).read_text())
    top = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    hidden = [n.name for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "not TYPE_CHECKING"
              for n in node.body if isinstance(n, ast.FunctionDef)]
    assert "__getattr__" not in top and hidden == ["__getattr__"]


def test_openmp_threads_spin_briefly_unless_the_user_chose_otherwise():
    """torch's OpenMP threads spin, by default, long enough to hold a core between two parallel regions; beside
    other work that made a photo take several times as long (benchmarks/wait_policy.py). The package shortens the
    spin before anything imports torch (libgomp reads it then), and leaves a user's own choice alone."""
    cwd = str(Path(__file__).resolve().parents[1])
    code = "import os, anomaly_service; print(os.environ.get('GOMP_SPINCOUNT'), anomaly_service.OMP_SPIN_COUNT)"
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def spin(**env: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=cwd, capture_output=True,
                             text=True, timeout=60, check=True)
        return out.stdout.split()

    default, ours = spin()
    assert default == ours and int(ours) < 300_000  # libgomp's own spin, when no wait policy is given
    assert spin(GOMP_SPINCOUNT="5")[0] == "5"
    assert spin(OMP_WAIT_POLICY="ACTIVE")[0] == "None"  # an explicit policy sets libgomp's spin itself
    # an empty one (compose's unset variable) is none: libgomp said "Invalid value" at every start and spun its default
    code = "import os, anomaly_service; print(os.environ.get('GOMP_SPINCOUNT'), 'OMP_WAIT_POLICY' in os.environ)"
    assert spin(GOMP_SPINCOUNT="") == spin(OMP_WAIT_POLICY=" ") == spin() == [ours, "False"]


def test_an_empty_thread_count_is_none_given():
    """An empty or blank OMP_NUM_THREADS (compose's unset variable) is none given, as the wait policy's: libgomp
    refused it on stderr at every start, and a blank one was taken for the user's count, the CPU quota unread."""
    code = ("import os, anomaly_service.parallelism as p; print('OMP_NUM_THREADS' in os.environ, "
            "p.fit_threads_to_cpu_quota(1))")
    for blank in ("", " "):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": blank},
                             cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True,
                             timeout=60, check=True)
        assert "libgomp" not in out.stderr and out.stdout.split() == ["False", "1"], (blank, out.stderr)


# what a container's start-up reads of the CPUs it may use: torch's threads and the service's passes at a time
_CPU_BUDGET = ("import anomaly_service.cli.group as g; g._start('serve'); import torch; "
               "from anomaly_service.api.lifecycle import _default_workers; "
               "print(torch.get_num_threads(), _default_workers('cpu'))")
CPU_V1 = Path("/sys/fs/cgroup/cpu")


def _cpu_budget(*prefix: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([*prefix, sys.executable, "-c", _CPU_BUDGET], env=env, capture_output=True, text=True,
                         timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not (shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2),
                    reason="needs taskset and 2 cores")
def test_a_process_held_to_one_core_runs_one_thread_and_onnx_runtime_sets_no_affinity(model_dir, tmp_path):
    """A container given a cpuset (``docker run --cpuset-cpus``, a Kubernetes pod under the static CPU manager)
    sees every host core in ``os.cpu_count()`` but may run on its own: libraries that size their threads from the
    count start a thread per host core, and ONNX Runtime, left to size its own pool, pins each thread to a core the
    set does not hold ("pthread_setaffinity_np failed", AudioMuse-AI#315). Held to one core, the service starts one
    thread and one pass, and a score runs on one thread with no such error and the answer of the whole machine."""
    from conftest import png_bytes, textured_part

    import numpy as np

    one = str(min(os.sched_getaffinity(0)))
    assert _cpu_budget("taskset", "-c", one) == [1, 1]
    photo = tmp_path / "part.png"
    photo.write_bytes(png_bytes(textured_part(np.random.default_rng(5))))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    answers = []
    for prefix in (["taskset", "-c", one], []):
        out = subprocess.run([*prefix, sys.executable, "-m", "anomaly_service.cli", "score", "--json", "--model",
                              str(model_dir / "part"), str(photo)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert "setaffinity" not in out.stderr, out.stderr
        answers.append(__import__("json").loads(out.stdout))
    assert answers[0]["scored_with"]["threads"] == 1
    assert answers[0]["score"] == answers[1]["score"]


@pytest.mark.skipif(not (os.access(CPU_V1 / "cgroup.procs", os.W_OK) and shutil.which("unshare")
                         and (os.cpu_count() or 1) >= 2), reason="needs a writable cgroup v1 cpu hierarchy, "
                    "unshare and 2 cores")
def test_a_container_or_unit_with_one_cpu_of_quota_runs_one_thread_and_one_pass_at_a_time():
    """A container given one CPU of quota on a larger host (``docker run --cpus 1``), or a systemd unit with
    ``CPUQuota=100%``, sees every host core but may run one at a time: threads past the quota stall for the rest
    of each period. A real cgroup with that quota is read at start-up, bind-mounted over the hierarchy's root as a
    container runtime shows it and as the group a unit's process is in."""
    cgroup = CPU_V1 / f"anomaly-test-{os.getpid()}"
    try:
        cgroup.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        (cgroup / "cpu.cfs_quota_us").write_text((cgroup / "cpu.cfs_period_us").read_text())
        inside = f"echo $$ > {cgroup}/cgroup.procs && mount --bind {cgroup} {CPU_V1} || exit 77; exec \"$@\""
        probe = subprocess.run(["unshare", "-m", "sh", "-c", inside, "sh", "true"], capture_output=True, timeout=30)
        if probe.returncode == 77:
            pytest.skip(f"cannot bind-mount a cgroup here: {probe.stderr.decode().strip()}")
        assert _cpu_budget("unshare", "-m", "sh", "-c", inside, "sh") == [1, 1]
        # a systemd unit's CPUQuota= (or any group below the root): the group is where the process is, not mounted
        assert _cpu_budget("sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec \"$@\"", "sh") == [1, 1]
        threads, passes = _cpu_budget()  # the same machine without the quota
        assert threads >= 2 and passes == 2
    finally:
        cgroup.rmdir()


def test_the_tightest_cpu_quota_up_the_hierarchy_is_read(tmp_path):
    """The cgroup files as the kernel lays them out: a quota on the unit's own group or on a slice above it, "no
    quota" in either version's spelling, and a container's group at the mount's root."""
    from anomaly_service.cgroups import cpu_limit

    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"

    def tree(files: dict[str, str]) -> None:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)

    tree({"proc/self/cgroup": "3:cpuset:/\n2:cpu,cpuacct:/plant.slice/anomaly.service\n0::/\n",
          "cgroup/cpu/plant.slice/anomaly.service/cpu.cfs_quota_us": "-1\n",
          "cgroup/cpu/plant.slice/anomaly.service/cpu.cfs_period_us": "100000\n",
          "cgroup/cpu/plant.slice/cpu.cfs_quota_us": "150000\n", "cgroup/cpu/plant.slice/cpu.cfs_period_us": "100000\n",
          "cgroup/cpu/cpu.cfs_quota_us": "-1\n", "cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu_limit(proc, cgroups) == 1.5  # the slice's, which the unit's "-1" does not lift
    tree({"cgroup/cpu/plant.slice/anomaly.service/cpu.cfs_quota_us": "50000\n"})
    assert cpu_limit(proc, cgroups) == 0.5  # the unit's own, tighter
    tree({"proc/self/cgroup": "0::/system.slice/anomaly.service\n",
          "cgroup/system.slice/anomaly.service/cpu.max": "200000 100000\n",
          "cgroup/system.slice/cpu.max": "max 100000\n"})
    assert cpu_limit(proc, cgroups) == 2.0
    tree({"proc/self/cgroup": "0::/kubepods/pod1/ctr\n", "cgroup/cpu.max": "25000 100000\n"})
    assert cpu_limit(proc, cgroups) == 0.25  # a container: its group is the mount's root, the path not found
    tree({"proc/self/cgroup": "0::/\n", "cgroup/cpu.max": "max 100000\n"})
    assert cpu_limit(proc, cgroups) is None


def _score_in_child(model, image) -> float:
    return float(model.score(image).score)


def test_a_model_that_scored_scores_in_a_child_that_fork_made(fitted_model, rng_images):
    """A pool forked after the parent scored (Linux's default start method) used to hang on its first score: the
    child inherited OpenMP's state but not its threads. Its children now run one thread and score as the parent."""
    import multiprocessing

    if not hasattr(os, "register_at_fork"):
        pytest.skip("no fork here")
    expected = float(fitted_model.score(rng_images[0]).score)  # the parent's thread pool has run
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_score_in_child, (fitted_model, rng_images[0])).get(timeout=60)
    assert got == expected


_FORK_AND_END = """
import os, sys, time
import numpy as np
from anomaly_service import AnomalyModel
from anomaly_service.parallelism import intra_op_threads

model = AnomalyModel.load(sys.argv[1], runtime="onnx")
image = np.full((64, 64, 3), 128, np.uint8)
with intra_op_threads(2):  # a session with a pool of threads, as on any machine of two cores or more
    model.score(image)
pid = os.fork()
if pid == 0:
    if sys.argv[2] == "drop":
        del model
    else:
        model.score(image)
    sys.exit(0)  # a normal end: the interpreter frees what the child still holds
for _ in range(300):
    if os.waitpid(pid, os.WNOHANG)[0]:
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit("the forked child did not end")
"""


@pytest.mark.parametrize("child", ["score", "drop"])
def test_a_child_that_fork_made_from_a_process_holding_a_model_ends(model_dir, child):
    """ONNX Runtime's sessions inherited by a forked child could not be freed there: each waited for ever on its
    thread pool's condition variable, whose threads stayed in the parent. A child that scored and ended normally
    (a ``gunicorn --preload`` worker at its stop), or that dropped the model, hung until it was killed."""
    if not hasattr(os, "register_at_fork"):
        pytest.skip("no fork here")
    done = subprocess.run([sys.executable, "-c", _FORK_AND_END, str(model_dir / "part"), child], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
