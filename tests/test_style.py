"""The code stays as pyproject.toml's ruff settings describe it: no unused or undefined names (an undefined one is a
crash waiting on the path that reaches it), no line past 120 characters; and as docs/development.md's rules describe
it: type hints on every public function, data flowing one way through the stages, no import cycles, each choice list
written once."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "anomaly_service"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (the Alembic scripts are Alembic's, not ours)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_ruff_passes_on_the_package_tests_and_benchmarks():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", "--no-cache", "anomaly_service", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_public_function_has_type_hints():
    """A public function or method of a public class says what it takes and gives (build_model, open_store,
    cli_recorder and decision.fuse did not)."""
    missing = []

    def visit(body: list[ast.stmt], where: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{where}.{node.name}", True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") and node.name not in ("__init__", "__call__"):
                    continue
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if in_class and args and args[0].arg in ("self", "cls"):
                    args = args[1:]
                args += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                bare = [a.arg for a in args if a.annotation is None]
                if node.returns is None and node.name != "__init__":
                    bare.append("return")
                if bare:
                    missing.append(f"{where}.{node.name}:{node.lineno} ({', '.join(bare)})")

    for name, path in _modules().items():
        visit(ast.parse(path.read_text()).body, name, False)
    assert not missing, "no type hint: " + "; ".join(missing)
