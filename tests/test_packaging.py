"""The package as a plant's IT installs it: not the editable checkout every other test imports, but the sdist and the
wheel built from it, as `python -m build` and `pip install anomaly_service-*.tar.gz` make them. What the package reads
at run time besides its modules (the web page, the Alembic scripts, the colour table) must be inside the wheel, or an
installed service answers its page or its first migration with a missing file; the tests, fitted models and records
of a working checkout must not be. The lists are taken from the source tree, so a new template cannot be forgotten.

The builds run setuptools' own PEP 517 hooks without isolation (no index needed, a few seconds each) on a copy of the
checkout, so no build/ or egg-info is written into it. Installing the wheel into a fresh venv is minutes of
dependency installs: docs/development.md, "Releasing", has that check by hand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anomaly_service"
PRETEND = "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_ANOMALY_SERVICE"  # what a build with no git is told (the Dockerfiles)
# what a working checkout holds beside its sources, ignored by git (.gitignore): none of it may reach a release
CHECKOUT_LITTER = ("models/bottle/index.faiss", "reports/bottle/roc.png", "data/records.db", "out/a_heatmap.png",
                   ".venv/pyvenv.cfg", f"{PACKAGE}/__pycache__/model.cpython-311.pyc", "build/lib/stale.py")


def _source_files() -> list[str]:
    """The checkout's files as a build sees them: tracked or new, not ignored (.gitignore), still on disk."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to tell sources from the build's and the runs' own files")
    listed = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(f for f in listed if f and (ROOT / f).is_file())


def _copy(files: list[str], into: Path) -> Path:
    for name in files:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, into / name)
    return into


def _build(kind: str, source: Path, out: Path, version: str | None = None) -> Path:
    """setuptools' build_sdist or build_wheel hook run in ``source``, as a PEP 517 frontend calls it; ``version`` is
    the number a build with no git is told (as the Dockerfiles tell it)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM_PRETEND_VERSION")}
    if version is not None:
        env[PRETEND] = version
    done = subprocess.run([sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
                           f"print(b.build_{kind}(sys.argv[1]))", str(out)], cwd=source, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _scm_version(root: Path) -> str:
    """The number setuptools-scm gives a build of the git checkout at ``root``."""
    done = subprocess.run([sys.executable, "-m", "setuptools_scm"], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def _package_files(files: list[str]) -> set[str]:
    return {f for f in files if f.startswith(f"{PACKAGE}/") and "__pycache__" not in f.split("/")}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """The sdist built from a copy of the checkout with a working checkout's litter planted in it, and the wheel
    built from that sdist unpacked (what pip does with an sdist, and `python -m build` by default)."""
    files = _source_files()
    tmp = tmp_path_factory.mktemp("release")
    source = _copy(files, tmp / "checkout")
    # a repository of its own holding those files, as the checkout's does: setuptools-scm puts every file git tracks
    # into the sdist unless MANIFEST.in takes it out; the number is the checkout's own, as a build there gives it
    _git(source, "init", "-q")
    _git(source, "add", "-A")
    _git(source, "commit", "-q", "-m", "release")
    version = _scm_version(ROOT)
    for name in CHECKOUT_LITTER:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"not a release file")
    sdist = _build("sdist", source, tmp / "dist", version)
    with tarfile.open(sdist) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
        tar.extractall(tmp / "unpacked", filter="data")
    top = sdist.name.removesuffix(".tar.gz")
    wheel = _build("wheel", tmp / "unpacked" / top, tmp / "wheel")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    return dict(files=files, sdist=[m.removeprefix(f"{top}/") for m in members], wheel=names, dist_info=dist_info,
                metadata=metadata, entry_points=entry_points, version=version, wheel_name=wheel.name)


def test_the_wheel_holds_every_file_of_the_package_and_nothing_else(release):
    """Every file under anomaly_service/ (templates, migrations, colour tables, py.typed: whatever is there, not a
    list kept by hand) is in the wheel built from the sdist, and the wheel holds nothing outside the package and
    its dist-info: no tests, models, records or compiled leftovers."""
    in_wheel = {n for n in release["wheel"] if not n.startswith(release["dist_info"] + "/")}
    source = _package_files(release["files"])
    assert sorted(source - in_wheel) == [], "package files missing from the wheel (pyproject's package-data)"
    assert sorted(in_wheel - source) == [], "files in the wheel that are not the package's sources"
    # the page, the migrations and the colour table are read at run time; the type hints are for the package's users
    for needed in ("web/index.html", "records/migrations/env.py", "records/migrations/script.py.mako",
                   "colormaps/turbo.hex", "py.typed"):
        assert f"{PACKAGE}/{needed}" in in_wheel, needed
    assert any(n.startswith(f"{PACKAGE}/records/migrations/versions/") for n in in_wheel)


def test_the_wheel_carries_its_licence_and_metadata(release):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = release["metadata"]
    assert meta["Name"] == project["name"] and meta["Version"] == release["version"]  # through the sdist's PKG-INFO
    assert release["wheel_name"].startswith(f"anomaly_service-{release['version']}-")
    assert meta["Requires-Python"] == project["requires-python"]
    assert meta["License-Expression"] == project["license"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert f"{release['dist_info']}/licenses/LICENSE" in release["wheel"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert meta["Description-Content-Type"] == "text/markdown" and "# anomaly" in meta.get_payload()
    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[\w.-]+", r).group().lower() for r in requirements if "extra ==" not in r}

    assert names(meta.get_all("Requires-Dist")) == names(project["dependencies"])
    assert re.search(r"^anomaly = anomaly_service\.cli:main$", release["entry_points"], re.M)


def test_the_sdist_holds_the_sources_and_documents_but_no_tests_or_checkout_files(release):
    """The sdist builds the wheel and carries the documents the package's messages name; the tests stay in the
    checkout (without conftest.py, tests/data and the benchmarks they cannot collect), and nothing a working
    checkout holds beside its sources (fitted models, reports, records, a venv, bytecode) gets in."""
    sdist = set(release["sdist"])
    assert {"pyproject.toml", "README.md", "LICENSE", "deploy/constraints.txt"} <= sdist
    assert sorted(_package_files(release["files"]) - sdist) == []
    named = set()
    for path in _package_files(release["files"]):
        if path.endswith(".py"):
            named |= set(re.findall(r"\b((?:docs|deploy)/[\w./-]+?\.md)\b", (ROOT / path).read_text()))
    named |= set(re.findall(r"\]\(((?:docs|deploy)/[\w./-]+?\.md)", (ROOT / "README.md").read_text()))
    assert named and sorted(named - sdist) == [], "documents the messages or the README name, not in the sdist"
    stray = [n for n in sdist if n.split("/")[0] in ("tests", "benchmarks", ".ci", "models", "reports", "data", "out",
                                                   ".venv", "build", ".gitignore", ".dockerignore")
             or "__pycache__" in n.split("/") or n.endswith((".pyc", ".faiss", ".db"))]
    assert stray == []


def test_the_image_build_context_builds_the_same_wheel(tmp_path):
    """The Dockerfiles install from what .dockerignore lets in, not from the sdist: those files alone must build a
    wheel with the whole package and its licence (a license-files entry the context lacks leaves the image's package
    without the text, with a deprecation warning only, which setuptools means to make an error)."""
    files = _source_files()
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    context = [f for f in files if any(f == a or f.startswith(a + "/") for a in allowed)
               and "__pycache__" not in f.split("/")]
    told = re.search(r"^ARG PACKAGE_VERSION=(\S+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M).group(1)
    wheel = _build("wheel", _copy(context, tmp_path / "context"), tmp_path / "wheel", told)
    assert wheel.name.startswith(f"anomaly_service-{told}-")  # the number it was told: the context has no git
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {n for n in names if n.startswith(f"{PACKAGE}/")} == _package_files(files)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the image's package carries no licence"


def _metadata_version(root: Path, tmp: Path) -> str:
    """The version a wheel built from the checkout at ``root`` carries (setuptools' metadata hook, as pip calls it)."""
    out = tmp / "metadata"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM_PRETEND_VERSION")}
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = out / done.stdout.strip().splitlines()[-1] / "METADATA"
    return Parser().parsestr(meta.read_text())["Version"]


def test_each_commit_builds_under_a_number_of_its_own_and_a_later_one_under_a_greater(tmp_path):
    """Every release was numbered 0.1.0: `anomaly --version` could not tell a plant which code it ran, and pip, given
    another release's wheel of the same number, kept the code already installed and exited 0. The number is now
    setuptools-scm's: the distance from the last release tag (before one, from 0.1.0) and the commit's own hash."""
    from packaging.version import Version

    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(clone)], check=True, timeout=120)
    if subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD~1"], cwd=clone, capture_output=True).returncode:
        pytest.skip("a clone of one commit (shallow): no earlier commit to number")
    head = _git(clone, "rev-parse", "--short=7", "HEAD")
    later = _metadata_version(clone, tmp_path)
    _git(clone, "checkout", "-q", "HEAD~1")
    earlier = _metadata_version(clone, tmp_path)
    assert Version(later) > Version(earlier) >= Version("0.1.0"), (earlier, later)
    if not _git(clone, "tag", "--points-at", head):  # a tagged commit is named by its tag
        assert f"+g{head}" in later, later
