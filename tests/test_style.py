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


# docs/how-it-works.md's flow, as modules: image -> features -> selection -> bank/index -> scores -> decision ->
# heatmap. A stage imports its own or earlier stages and the helpers; the facade (model.py and what a fit, an update
# or the service build around it), the records, the API and the CLI come after all of them.
STAGES = {
    "image": ("compression colour_profile images float_tiff bit_depth preprocessing tiling inputs training_set "
              "part_groups"),
    "features": "backbone_specs backbones onnx_backbone features embedder patch_store",
    "selection": "selection",
    "bank/index": "coreset coreset_kernel index provenance",
    "scores": "scoring anomaly_map scorer knn_scorer autoencoder inspection_mask foreground",
    "decision": "calibration contamination decision",
    "heatmap": "heatmap regions evidence render",
}
# what any stage may use: errors, the option table and the config, timers and bars, persistence of a model's files
HELPERS = ("errors options config manifest artifact timing progress parallelism packing jit map_sample image_map "
           "device interrupts log_throttle whole_file graph_cache instants spellings steady_clock anomalib_names "
           "dir_lock cgroups memory_room stuck_io row_blocks").split()
AFTER = ("anomaly_service model fitting branch_beside feedback calibration_set orientation grain grain_kernel layout "
         "drift registry batching telemetry settings rescore sharding evaluate report_page metrics model_backup "
         "model_history").split()
AFTER_PACKAGES = ("records", "api", "cli")


def _imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) of every import between the package's modules that runs: at the top of a module
    or inside a function. Imports under ``if TYPE_CHECKING`` are only for annotations and are left out."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                ast.unparse(block.test) for n in ast.walk(block)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
                targets = [t if t in modules else base for t in targets]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    found.append((name, target, node.lineno))
    return found


def _short(name: str) -> str:
    return name.removeprefix("anomaly_service.")


def test_every_module_has_its_place_in_the_flow():
    placed = [m for mods in STAGES.values() for m in mods.split()] + HELPERS + AFTER
    assert len(placed) == len(set(placed)), "a module placed twice"
    unplaced = [m for m in map(_short, _modules()) if m not in placed and m.split(".")[0] not in AFTER_PACKAGES]
    assert not unplaced, f"place {unplaced} in STAGES, HELPERS or AFTER (tests/test_style.py)"


def test_no_stage_imports_a_later_one():
    """The scorers built their maps from heatmap.py (the colouring for a person), the decision imported the drift
    monitor for its typical distance: a stage leaned on one after it."""
    stage = {m: i for i, mods in enumerate(STAGES.values()) for m in mods.split()}
    wrong = []
    for importer, imported, line in _imports():
        a, b = _short(importer), _short(imported)
        if a in stage and b not in HELPERS and stage.get(b, len(STAGES)) > stage[a]:
            wrong.append(f"{a}:{line} imports {b}")
    assert not wrong, "against the flow: " + "; ".join(wrong)


def test_no_import_cycles():
    """Two modules that import each other (inspection_mask and foreground did, through a function-level import)
    are one idea split in two or a function in the wrong module. The package's own ``__init__`` is left out: a
    module reads ``__version__`` from it, set before it imports anything."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in _imports():
        if "anomaly_service" not in (importer, imported):
            graph.setdefault(importer, set()).add(imported)
    cycles = []
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join(map(_short, path[path.index(node):] + [node])))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        walk(node, [])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_every_relative_import_names_a_module_of_the_package():
    """api/schemas.py's annotation-only imports climbed one package too far (``from ... import``): nothing ran them,
    so nothing said so, and a type checker read none of those names."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                if node.level > len(package) or base not in modules:
                    wrong.append(f"{_short(name)}:{node.lineno} {'.' * node.level}{node.module or ''}")
    assert not wrong, "imports of no module: " + "; ".join(wrong)


def test_every_choice_list_is_written_in_one_module():
    """A list of allowed words (a tuple, list, set or ``Literal`` of names) written out in two modules is two lists to
    keep in step: the API spelt the records' buckets and verdicts, the decision's two words and the heatmap kinds
    again; the manifest the map samples and channels; ``anomaly info`` the fusion rules. Each lives where its idea
    does and the others read it (options.py for the options)."""
    import re

    word = re.compile(r"/?[A-Za-z][\w./:;-]*")
    seen: dict[frozenset[str], set[str]] = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            items = None
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = node.elts
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
                items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if items and len(items) > 1 and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                and word.fullmatch(e.value) for e in items):
                seen.setdefault(frozenset(e.value for e in items), set()).add(f"{_short(name)}:{node.lineno}")
    twice = [f"{sorted(words)} in {', '.join(sorted(where))}" for words, where in seen.items()
             if len({w.split(':')[0] for w in where}) > 1]
    assert not twice, "choice lists written twice: " + "; ".join(twice)


def test_no_router_imports_another():
    """One router per resource (FastAPI's layout): what two routers share lives beside them in ``api/`` (the scoring
    routes imported needs_drawing from the inspections router)."""
    wrong = [f"{_short(a)}:{line} imports {_short(b)}" for a, b, line in _imports()
             if a.startswith("anomaly_service.api.routes.") and b.startswith("anomaly_service.api.routes.")]
    assert not wrong, "; ".join(wrong)
