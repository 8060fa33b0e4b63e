"""The package as a plant's IT installs it: not the editable checkout every other test imports, but the sdist and the
wheel built from it, as `python -m build` and `pip install anomaly_service-*.tar.gz` make them. What the package reads
at run time besides its modules (the web page, the Alembic scripts, the colour table) must be inside the wheel, or an
installed service answers its page or its first migration with a missing file; the tests, fitted models and records
of a working checkout must not be. The lists are taken from the source tree, so a new template cannot be forgotten.

The builds run setuptools' own PEP 517 hooks without isolation (no index needed, a few seconds each) on a copy of the
checkout, so no build/ or egg-info is written into it. Installing the wheel into a fresh venv is minutes of
dependency installs: docs/development.md, "Releasing", has that check by hand."""

from __future__ import annotations

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


def _build(kind: str, source: Path, out: Path) -> Path:
    """setuptools' build_sdist or build_wheel hook run in ``source``, as a PEP 517 frontend calls it."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
                           f"print(b.build_{kind}(sys.argv[1]))", str(out)], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _package_files(files: list[str]) -> set[str]:
    return {f for f in files if f.startswith(f"{PACKAGE}/") and "__pycache__" not in f.split("/")}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """The sdist built from a copy of the checkout with a working checkout's litter planted in it, and the wheel
    built from that sdist unpacked (what pip does with an sdist, and `python -m build` by default)."""
    files = _source_files()
    tmp = tmp_path_factory.mktemp("release")
    source = _copy(files, tmp / "checkout")
    for name in CHECKOUT_LITTER:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"not a release file")
    sdist = _build("sdist", source, tmp / "dist")
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
                metadata=metadata, entry_points=entry_points)


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
    assert meta["Name"] == project["name"] and meta["Version"] == project["version"]
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
    stray = [n for n in sdist if n.split("/")[0] in ("tests", "models", "reports", "data", "out", ".venv", "build")
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
    wheel = _build("wheel", _copy(context, tmp_path / "context"), tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {n for n in names if n.startswith(f"{PACKAGE}/")} == _package_files(files)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the image's package carries no licence"
