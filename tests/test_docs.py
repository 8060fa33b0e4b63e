"""The docs' links and contents lists: README.md and docs/ point at each other by heading, and a heading renamed
in one file silently breaks the links in the others. And the docs against the code: the flags, the manifest's fields,
the metrics, the endpoints and the answers' fields they list, the tests they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
CONTENTS = ["benchmarks.md", "decisions.md"]  # the long ones open with a list of their sections


def _prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\]\([^)]*\)|[`*\[\]]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6} (.+)$", _prose(path), re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_follows_github():
    assert slug("Threshold: leave-one-out scores, an exponential tail fit") == \
        "threshold-leave-one-out-scores-an-exponential-tail-fit"
    assert slug("The dashboard's stats (session 31)") == "the-dashboards-stats-session-31"
    assert slug("ivf: fp16 lists `found` by a graph") == "ivf-fp16-lists-found-by-a-graph"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", _prose(doc)):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no such heading in {file.name}")
    assert not broken, broken


@pytest.mark.parametrize("name", CONTENTS)
def test_contents_list_every_section_in_order(name):
    text = _prose(ROOT / "docs" / name)
    listed = re.search(r"^\*\*Contents\.\*\*\n((?:[-*] .*\n)+)", text, re.M)
    assert listed, f"{name} has no **Contents.** list"
    links = re.findall(r"\]\(#([^)]+)\)", listed.group(1))
    sections = [slug(h) for h in re.findall(r"^## (.+)$", text, re.M)]
    assert links == sections


def _options(command) -> list[list[str]]:
    """The names of each option of a click command (``["-q", "--quiet"]``) and, for a group, of its sub-commands."""
    import click

    out = [p.opts + p.secondary_opts for p in command.params if isinstance(p, click.Option) and p.name != "help"]
    for sub in getattr(command, "commands", {}).values():
        out += _options(sub)
    return out


def _synopsis(readme: str) -> dict[str, str]:
    """The README's command synopsis by command (``score``, ``db backup``): the lines that start with it and the
    indented lines after them, comments included."""
    out: dict[str, str] = {}
    name = None
    for line in readme.splitlines():
        m = re.match(r"anomaly (?:\[[^]]*\] )?((?:db|records|models) )?([a-z]+)", line)
        if m:
            name = (m.group(1) or "") + m.group(2)
        if name and (m or line.startswith(" ")):
            out[name] = out.get(name, "") + line + "\n"
    return out


def test_every_command_line_flag_is_in_the_docs():
    """The README's command synopsis is where a user looks for a flag; serve's many settings are in service.md.
    A flag added to a command and not to its synopsis is one nobody finds (the group's own -v and --version had
    none), and each command's own lines must name it: score's --weights (a resnet model on an air-gapped machine)
    and update's --keep-versions were only found under fit."""
    import click

    from anomaly_service.cli import app

    readme = re.search(r"## Command line\n+```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    service = (ROOT / "docs" / "service.md").read_text()
    lines = _synopsis(readme)
    lines["evaluate"] += lines["fit"]  # "[--model PATH | fit options]"
    named = lambda flag, text: re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)  # noqa: E731
    commands = {(f"{name} {sub}" if isinstance(cmd, click.Group) else name): c
                for name, cmd in app.commands.items()
                for sub, c in (cmd.commands.items() if isinstance(cmd, click.Group) else [(None, cmd)])}
    missing = {name: [o[-1] for o in _options(cmd)
                      if not any(named(f, service if name == "serve" else lines.get(name, "")) for f in o)]
               for name, cmd in commands.items()}
    own = _options(click.Group(params=app.params))  # the group's own: -v, --version
    missing["anomaly"] = [o[-1] for o in own if not any(named(f, readme) for f in o)]
    assert not {name: flags for name, flags in missing.items() if flags}


def _table_rows(text: str) -> dict[str, str]:
    """A markdown table's rows by the names in their first cell: ``| `a`, `b` | text |`` gives a and b the text (a
    row may wrap onto lines that do not start with ``|``)."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("|") or not lines or not lines[-1].startswith("|") or lines[-1].rstrip().endswith("|"):
            lines.append(line)
        else:
            lines[-1] += " " + line
    rows: dict[str, str] = {}
    for line in lines:
        cells = line.split(" | ", 1)
        if line.startswith("| `") and len(cells) == 2:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_every_manifest_field_is_in_the_model_format_table():
    """docs/model-format.md's manifest table is where someone reading a model.json looks a field up: each section
    the typed reader knows has its row, naming each field it declares, and `config` names every fit option (the
    manifest's `preprocessing.bit_depth` and five config keys had no mention)."""
    import dataclasses
    import typing

    from pydantic import BaseModel

    from anomaly_service.config import ModelConfig
    from anomaly_service.manifest import Manifest

    text = (ROOT / "docs" / "model-format.md").read_text().split("## manifest.json", 1)[1].split("\n## ", 1)[0]
    rows = _table_rows(text)
    missing = [name for name in Manifest.model_fields if name not in rows]
    for name, field in Manifest.model_fields.items():
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel) and name in rows:
                missing += [f"{name}.{sub}" for sub in kind.model_fields if f"`{sub}`" not in rows[name]]
    missing += [f"config.{f.name}" for f in dataclasses.fields(ModelConfig) if f"`{f.name}`" not in rows["config"]]
    assert not missing, missing


def _metrics_rows() -> dict[str, str]:
    table = (ROOT / "docs" / "service.md").read_text().split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(anomaly_[^`]+)` \| (.*) \|$", table, re.M)}


def test_every_metric_is_in_the_metrics_table():
    """docs/service.md's metrics table is what alerts and dashboards are written from: it names every series the
    service exports, with its labels, and nothing it does not."""
    from prometheus_client.metrics import MetricWrapperBase

    from anomaly_service.telemetry import Telemetry

    exported = {m._name + ("_total" if m._type == "counter" else "")
                + (f"{{{','.join(m._labelnames)}}}" if m._labelnames else "")
                for m in vars(Telemetry()).values() if isinstance(m, MetricWrapperBase)}
    assert exported == set(_metrics_rows())


def test_every_file_the_records_write_in_the_data_directory_is_listed():
    """docs/service.md lists each file under --data-dir, what writes it and whether it may be deleted or must be
    backed up, as model-format.md lists a model's: an operator cleaning a full volume, or backing it up, reads it.
    The names come from the code: the records' file constants and every name spelt from the database file's."""
    from anomaly_service.records import backup, files, store

    section = (ROOT / "docs" / "service.md").read_text().split("\n### What the data directory holds", 1)[1]
    listed = " ".join(re.findall(r"^\| (.+?) \|", section.split("\n## ", 1)[0], re.M))  # the table's first column
    code = "".join(path.read_text() for path in (ROOT / "anomaly_service").rglob("*.py"))
    db = store.SQLITE_FILE
    written = {db, *(db + side for side in backup.SIDE_FILES), files.ASIDE_PREFIX, files.DERIVED_MARK, ".tmp-",
               "files/"}
    written |= {v for k, v in vars(store).items() if k.endswith("_FILE") and isinstance(v, str)}
    written |= {db + v for k, v in vars(store).items() if k.endswith("_SUFFIX") and isinstance(v, str)}
    written |= {db + m.group(1) for m in re.finditer(r'SQLITE_FILE \+ "([^"]+)"', code)}
    written |= {m.group(1) + db + m.group(2) for m in re.finditer(r'f"(\.?)\{SQLITE_FILE\}([^"{]*)', code)}
    written -= {f".{db}.reading-"}  # a read-only database's copy, made beside the backup, not in the data directory
    assert len(written) >= 14, written
    assert not [name for name in written if name not in listed], sorted(written)


def test_every_process_metric_is_in_the_metrics_tables():
    """The process and Python series the service's registry carries beside its own (the library's collectors and the
    thread count) each have a row in the metrics section, with their labels, as the service's own do."""
    from anomaly_service.telemetry import Telemetry

    exported = set()
    for family in Telemetry().registry.collect():
        if not family.name.startswith("anomaly_"):
            labels = sorted(family.samples[0].labels) if family.samples else []  # as the exposition lists them
            exported.add(family.name + ("_total" if family.type == "counter" else "")
                         + (f"{{{','.join(labels)}}}" if labels else ""))
    table = (ROOT / "docs" / "service.md").read_text().split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `((?:process|python)_[^`]+)` \|", table, re.M))
    assert {"process_resident_memory_bytes", "process_open_fds", "process_threads"} <= exported
    assert exported == documented


def test_every_reason_a_metric_counts_is_documented_and_every_overload_reason_shows_at_zero():
    """Each reason the source counts a refusal or a lost record under is named in its row, and every overload
    reason is exported at 0 before it first happens, so a panel or an alert on it has a series (``pictures``, the
    stored overlays drawn again, was neither seeded nor in the metric's help)."""
    from anomaly_service.telemetry import OVERLOAD_REASONS, Telemetry

    source = "\n".join(p.read_text() for p in (ROOT / "anomaly_service").rglob("*.py"))
    recorder = (ROOT / "anomaly_service" / "records" / "recorder.py").read_text()
    counted = r"(?:_overloaded|_refuse|overloaded_by_reason\.labels)\(\s*\"(\w+)\""
    overloads = set(re.findall(counted, source))
    dropped = set(re.findall(r"(?:_drop|records_dropped\.labels)\(\"(\w+)\"", source))
    dropped |= set(re.findall(r"\breason = \"(\w+)\"", recorder))  # handed to _drop(reason, ...)
    assert {"pixels", "queue", "connections", "pictures"} <= overloads
    assert {"buffer_full", "unavailable", "shutdown"} <= dropped
    rows = _metrics_rows()
    assert not {r for r in overloads if f"`{r}`" not in rows["anomaly_overloaded_by_reason_total{reason}"]}
    assert not {r for r in dropped if f"`{r}`" not in rows["anomaly_records_dropped_total{reason}"]}
    assert overloads <= set(OVERLOAD_REASONS)
    exposition = Telemetry().render().decode()
    for reason in OVERLOAD_REASONS:
        assert f'anomaly_overloaded_by_reason_total{{reason="{reason}"}} 0.0' in exposition


def test_every_endpoint_is_in_the_endpoints_table(tmp_path):
    """docs/service.md's endpoints table lists every operation the app serves (its OpenAPI document, the page at
    ``/`` beside it), and nothing else: a route added without a row is one an integrator never finds."""
    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    paths = create_app(ServiceSettings(model_dir=tmp_path, record=False)).openapi()["paths"]
    served = {f"{method.upper()} {re.sub(r'{inspection_id}', '{id}', path)}"
              for path, ops in paths.items() for method in ops} | {"GET /"}
    table = (ROOT / "docs" / "service.md").read_text().split("\n## Endpoints", 1)[1].split("\n### ", 1)[0]
    documented: set[str] = set()
    for cell in re.findall(r"^\| (`[A-Z]+ /.*?) \| ", table, re.M):
        first, *more = re.findall(r"`([^`]+)`", cell)
        documented.add(first)
        method, path = first.split(" ", 1)
        documented |= {f"{method} {path.rsplit('/', 1)[0]}{tail}" for tail in more if tail.startswith("/")}
    assert served == documented


def test_update_help_says_what_its_records_are_for():
    """README: an update's known defects are `--defects` "or the records under `--data-dir`": the update reads
    them and records nothing, so its help must not promise recording, as score's rightly does."""
    from anomaly_service.cli import app

    help_of = {name: next(p.help for p in app.commands[name].params if p.name == "data_dir")
               for name in ("update", "score")}
    assert "recording" not in help_of["update"] and "defects" in help_of["update"]
    assert "recording is on" in help_of["score"]


def test_the_answers_service_md_spells_out_name_every_field():
    """docs/service.md lists the fields of the score answer, its regions and evidence, heatmaps, batch items, the
    image map, versions and updates one by one, each in its section (other answers are described in prose, with
    /docs for the schema): a field added to one of those and not to its list is one a client never hears of (a
    version's `error` was)."""
    from anomaly_service.api import schemas
    from anomaly_service.api.routes import models

    doc = (ROOT / "docs" / "service.md").read_text()

    def section(heading: str) -> str:
        return re.split(r"\n#", doc.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]

    spelt_out = {"### The score answer": [schemas.ScoreOut, schemas.RegionOut, schemas.ScorerOut],
                 "### Closest normal evidence": [schemas.NearestNormalOut, schemas.EmbeddingOut,
                                                 schemas.TrainingPointOut],
                 "### Heatmaps": [schemas.HeatmapOut], "### Batch answer": [schemas.BatchItemOut],
                 "## Feedback: update, versions, rollback": [models.VersionOut, models.UpdateOut,
                                                             models.DuplicateOut]}
    missing = [f"{shape.__name__}.{name}" for heading, shapes in spelt_out.items() for shape in shapes
               for name in shape.model_fields if f"`{name}`" not in section(heading)
               and not (name.startswith("previous_") and "`previous_`" in section(heading))]
    assert not missing, missing


def test_the_export_s_columns_are_listed_in_their_order():
    """docs/service.md names the export's columns in order: a column added to the export (a CSV read by position in a
    spreadsheet) and not to the list is one an auditor's report never heard of."""
    from anomaly_service.records.store import EXPORT_COLUMNS

    doc = " ".join((ROOT / "docs" / "service.md").read_text().split())
    listed = doc.split("Its columns: ", 1)[1].split(" (who put it on record", 1)[0]
    named = re.findall(r"`([a-z0-9_]+)`", re.sub(r"\([^()]*\)", "", listed))  # a column's note is in brackets
    assert named == EXPORT_COLUMNS[:-2], named  # `reviews` and `pixels_sha256` are described in the sentence after
    after = doc.split("Its columns: ", 1)[1].split(" (who put it on record", 1)[1]
    assert 0 < after.index("`reviews`") < after.index("`pixels_sha256`"), after[:400]


def test_the_export_keeps_the_column_order_of_earlier_releases():
    """A plant's spreadsheet or ETL job reads the CSV export by position: a release adds its columns at the end."""
    from anomaly_service.records.store import EXPORT_COLUMNS

    released = ["id", "created_at", "model", "model_version", "decision", "score", "normalized_score", "threshold",
                "image_width", "image_height", "image_bytes", "image_sha256", "part_id", "line", "station", "meta",
                "regions", "timing_ms", "warnings", "source", "files_state", "verdict", "reviewed_at"]
    assert EXPORT_COLUMNS[: len(released)] == released


def test_the_test_layout_table_names_every_test_file():
    """docs/development.md's test layout is where a contributor finds which file tests what (five files had no
    row)."""
    text = (ROOT / "docs" / "development.md").read_text().split("## Test layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+\.py)`", text))
    assert named == {p.name for p in (ROOT / "tests").glob("test_*.py")}


def _size(text: str) -> float | str | None:
    """A default as the settings table writes it (``20 MiB``, ``40,000,000``, ``0.001``, ``none (...)``), as a
    number where it is one."""
    text = text.strip().strip("`")
    unit = re.fullmatch(r"([\d.]+) (KiB|MiB|GiB)", text)
    if unit:
        return float(unit.group(1)) * 1024 ** ["KiB", "MiB", "GiB"].index(unit.group(2)) * 1024
    if re.fullmatch(r"[\d,]+(?:\.\d+)?", text):
        return float(text.replace(",", ""))
    return None if text.startswith("none") else text


def test_the_settings_table_gives_each_setting_its_variable_and_default():
    """docs/service.md's settings table is what an operator sets a deployment from: each row's environment variable
    is the one the service reads and its default the one it takes (a default changed in settings.py and not in the
    table is a limit nobody expects)."""
    from anomaly_service.settings import ServiceSettings

    text = (ROOT / "docs" / "service.md").read_text().split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `--([\w-]+)` / `(\w+)` \| ([^|]*) \|", text, re.M)
    fields = ServiceSettings.model_fields
    assert {flag.replace("-", "_") for flag, _, _ in rows} == set(fields)
    wrong = []
    for flag, variable, written in rows:
        name = flag.replace("-", "_")
        default = fields[name].get_default(call_default_factory=True)
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, (int, float)):
            default = float(default)
        elif isinstance(default, list):  # --cors-origins: none; --allowed-hosts: *
            default = ", ".join(default) or None
        elif default is not None:
            default = str(default)
        if variable != f"ANOMALY_{name.upper()}":
            wrong.append(f"--{flag}: {variable}")
        if name != "inference_workers" and _size(written) != default:  # its default depends on the device
            wrong.append(f"--{flag}: {written.strip()} (the service's: {default})")
    assert not wrong, wrong


def test_the_readme_synopsis_shows_each_flags_default_and_choices():
    """The README's synopsis shows a flag's default (``[--nprobe 32]``) and its values (``[--index
    auto|flat|ivf|ivfpq]``): each must be the command's own (serve's defaults are the service's settings)."""
    import click

    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    readme = re.search(r"## Command line\n+```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = {(f"{name} {sub}" if isinstance(cmd, click.Group) else name): c
                for name, cmd in app.commands.items()
                for sub, c in (cmd.commands.items() if isinstance(cmd, click.Group) else [(None, cmd)])}
    wrong, checked = [], 0
    for name, text in _synopsis(readme).items():
        flags = {o: p for p in commands[name].params if isinstance(p, click.Option) for o in p.opts}
        for flag, value in re.findall(r"\[(--[\w-]+)(?:\|--[\w-]+)? ([\w.|-]+)\]", text):
            param = flags[flag]
            if "|" in value:
                if isinstance(param.type, click.Choice):
                    checked += 1
                    if value.split("|") != list(param.type.choices):
                        wrong.append(f"{name} {flag} {value}: takes {'|'.join(param.type.choices)}")
                continue
            default = ServiceSettings.model_fields[param.name].default if name == "serve" else param.default
            if re.fullmatch(r"[\d.]+", value) or value == str(default):
                checked += 1
                if not (str(default) == value or isinstance(default, (int, float)) and default == float(value)):
                    wrong.append(f"{name} {flag} {value}: the default is {default}")
    assert not wrong, wrong
    assert checked > 30  # the pattern still reads the synopsis


def test_ci_runs_the_readme_test_command_verbatim():
    """README says its test command is exactly what ``.ci/run`` runs: a step added to one and not the other (a
    system package, a pytest flag) makes the newcomer's run and CI's differ."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests.*?\n```bash\n(.*?)\n```", readme, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci


def test_every_doc_the_code_and_deploy_files_point_to_resolves():
    """Help texts, error messages, comments in the deploy files and the benchmarks send a reader to
    ``docs/how-it-works.md#large-photos-tiles`` and the like: that file and heading must exist, as the links in the
    docs themselves must (a heading renamed in a doc left the help text pointing at nothing)."""
    sources = [*(ROOT / "anomaly_service").rglob("*.py"), *(ROOT / "anomaly_service" / "web").glob("*.html"),
               *(ROOT / "benchmarks").glob("*.py"), ROOT / "docker-compose.yml",
               *(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix != ".md")]
    broken, seen = [], 0
    for source in sources:
        for path, fragment in re.findall(r"\b((?:docs|deploy)/[\w-]+\.md)(?:#([\w-]+))?", source.read_text()):
            seen += 1
            if not (ROOT / path).exists():
                broken.append(f"{source.relative_to(ROOT)}: {path}: no such file")
            elif fragment and fragment not in anchors(ROOT / path):
                broken.append(f"{source.relative_to(ROOT)}: {path}#{fragment}: no such heading")
    assert not broken, broken
    assert seen > 50  # the pattern still finds them


def test_every_commit_the_docs_name_is_in_the_history():
    """Each measurement names the commit it was taken at, for someone to check it out and run it again: a hash from
    a helper's clone, never merged as such (the memory-per-model table named one), cannot be checked out. Reachable
    from HEAD, not merely present: a local clone copies a fetched helper's unreachable commits, a fresh CI clone
    does not (one such hash passed here and failed there)."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    shallow = subprocess.run([git, "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("a shallow clone holds only part of the history")
    named = {h for doc in DOCS for h in re.findall(r"(?<![\w./-])([0-9a-f]{7,12})(?![\w.-])", doc.read_text())
             if re.search(r"\d", h) and re.search(r"[a-f]", h)}
    history = subprocess.run([git, "rev-list", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    missing = sorted(h for h in named if sum(c.startswith(h) for c in history) != 1)
    assert len(named) > 100 and not missing, missing


def test_the_code_map_names_every_module():
    """docs/how-it-works.md's code map is where a new maintainer looks a module up: twenty of them had no row
    (bit_depth.py, patch_store.py, training_set.py, rescore.py, the API's openapi.py and request_id.py among them)."""
    code_map = (ROOT / "docs/how-it-works.md").read_text().split("## Code map", 1)[1]
    package = ROOT / "anomaly_service"
    unnamed = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if "migrations" in rel.parts or path.name == "__init__.py":
            continue
        names = {f"`{rel.name}`", f"`{'/'.join(rel.parts[1:])}`"} if len(rel.parts) > 1 else {f"`{rel.name}`"}
        if not any(name in code_map for name in names):
            unnamed.append(str(rel))
    assert not unnamed, f"docs/how-it-works.md's code map has no row for {unnamed}"


# The pages a user copies commands, requests and names from (session 63's run of them, as written): each name they
# give must be one the product knows, whatever table it is missing from.
USER_DOCS = [ROOT / p for p in ("README.md", "docs/cli.md", "docs/service.md", "docs/coming-from-anomalib.md",
                                "docs/model-format.md", "docs/how-it-works.md")]
# flags of the other tools these pages show (pip, apt-get, pg_restore, rsync, pytest-xdist)
OTHER_TOOLS_FLAGS = {"--index-url", "--no-cache-dir", "--no-install-recommends", "--upgrade", "--constraint",
                     "--force-reinstall", "--no-deps", "--no-owner", "--clean", "--if-exists", "--link-dest",
                     "--dist", "--no-loadscope-reorder"}


def test_every_flag_the_docs_name_is_one_the_command_line_takes():
    """The other direction of the synopsis test: a flag a page names (`--keep-images`, `--require-author true`)
    that no command takes is one a user copies into an error. The flags of other tools the pages show are listed
    above, and anomalib's spellings that coming-from-anomalib.md says are refused must be the ones the CLI answers."""
    import click

    from anomaly_service import anomalib_names
    from anomaly_service.cli import app

    def flags(command) -> set[str]:
        out = {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
        for sub in getattr(command, "commands", {}).values():
            out |= flags(sub)
        return out

    ours = flags(app) | {"--help"}
    anomalib = {"--" + name.replace("_", "-") for name in anomalib_names._SAID} | \
               {"--" + name for name in anomalib_names._SAID}
    unknown = {}
    for doc in USER_DOCS:
        named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", doc.read_text()))
        refused = anomalib if doc.name == "coming-from-anomalib.md" else set()
        wrong = sorted(named - ours - OTHER_TOOLS_FLAGS - refused)
        if wrong:
            unknown[doc.name] = wrong
    assert not unknown, unknown


def test_every_route_the_docs_name_is_served(tmp_path):
    """The endpoints table is checked against the app; a route named in the prose (`GET /inspections/stats?...`,
    `/models/{name}/training-images/{index}/thumbnail`, a `HEAD` probe) must be one the app serves too, with that
    method: a renamed route left in a sentence is a request that answers 404."""
    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings

    paths = create_app(ServiceSettings(model_dir=tmp_path, record=False)).openapi()["paths"]
    served = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"), {m.upper() for m in ops})
              for path, ops in paths.items()]
    served.append((re.compile("^/openapi\\.json$"), {"GET"}))
    tops = {p.strip("/").split("/")[0] for p in paths} | {"openapi.json"}
    wrong, seen = [], 0
    for doc in USER_DOCS:
        for m in re.finditer(r"`(?:(GET|POST|HEAD|PUT|PATCH|DELETE) )?(/[\w{}./-]+)(?:\?[^`]*)?`", doc.read_text()):
            method, path = m.group(1), m.group(2).rstrip(".")
            if path.strip("/").split("/")[0] not in tops:  # a file path, or a page suffix (`/display`) of a row
                continue
            seen += 1
            methods = set().union(*(ms for rx, ms in served if rx.match(path)))
            if not methods:
                wrong.append(f"{doc.name}: {path}: no such route")
            elif method and method not in methods:
                wrong.append(f"{doc.name}: {method} {path}: the route takes {sorted(methods)}")
    assert not wrong, wrong
    assert seen > 50  # the pattern still finds them


def test_every_environment_variable_the_docs_name_is_read():
    """An `ANOMALY_*` variable a page names (in the settings table, or in a sentence such as `ANOMALY_DATABASE_URL`
    for `score`) is one the service's settings or the command line read: a variable nobody reads is a setting an
    operator sets and nothing follows."""
    import click

    from anomaly_service.cli import app
    from anomaly_service.settings import ServiceSettings

    def env(command) -> set[str]:
        out = {p.envvar for p in command.params if isinstance(p, click.Option) and isinstance(p.envvar, str)}
        for sub in getattr(command, "commands", {}).values():
            out |= env(sub)
        return out

    source = "\n".join(p.read_text() for p in (ROOT / "anomaly_service").rglob("*.py"))
    read = {f"ANOMALY_{name.upper()}" for name in ServiceSettings.model_fields} | env(app) | \
        set(re.findall(r"[\"'](ANOMALY_[A-Z0-9_]+)[\"']", source))
    named = {(doc.name, v) for doc in USER_DOCS for v in re.findall(r"\bANOMALY_[A-Z0-9_]*[A-Z0-9]", doc.read_text())}
    assert len(named) > 20
    assert not sorted(f"{doc}: {v}" for doc, v in named if v not in read)


def test_every_metric_the_docs_name_is_exported():
    """A series a sentence names (`anomaly_model_reloads_total{outcome="failed"}`, `anomaly_record_buffer_depth`)
    is one the service exports, with those labels: an alert or a panel written from a sentence reads nothing
    otherwise. The metrics table itself is checked against the exporter above."""
    from prometheus_client.metrics import MetricWrapperBase

    from anomaly_service.telemetry import Telemetry

    labels = {m._name + ("_total" if m._type == "counter" else ""): set(m._labelnames)
              for m in vars(Telemetry()).values() if isinstance(m, MetricWrapperBase)}
    wrong, seen = [], 0
    for doc in USER_DOCS:
        for name, given in re.findall(r"\b(anomaly_[a-z_]+)(?:\{([^}`]*)\})?", doc.read_text()):
            if name in ("anomaly_map", "anomaly_service", "anomaly_names") or name.startswith("anomaly_service"):
                continue  # the result's map, the package
            seen += 1
            if name not in labels:
                wrong.append(f"{doc.name}: {name}: not exported")
            elif given and not set(re.findall(r"(\w+)(?:=|,|$)", given)) <= labels[name]:
                wrong.append(f"{doc.name}: {name}{{{given}}}: its labels are {sorted(labels[name])}")
    assert not wrong, wrong
    assert seen > 30


def test_the_values_a_review_takes_are_named_where_its_fields_are():
    """A client sends back the verdict it saw as `replaces`; the record says `verdict` null for a part nobody
    reviewed, and `replaces` null is no check at all, so a client that sent what it saw overwrote a colleague's
    review unseen. service.md and the OpenAPI description must name every value a review's fields take."""
    import typing

    from anomaly_service.api import schemas

    doc = (ROOT / "docs" / "service.md").read_text()
    missing = []
    for name, field in schemas.ReviewIn.model_fields.items():
        values = [v for arg in typing.get_args(field.annotation) for v in typing.get_args(arg)] or \
            list(typing.get_args(field.annotation))
        if not values or not all(isinstance(v, str) for v in values):
            continue
        spots = [doc[m.end(): m.end() + 200] for m in re.finditer(rf"[`\"]{name}[`\"]", doc)]
        if not any(all(re.search(rf"[`\"]{v}[`\"]", spot) for v in values) for spot in spots):
            missing.append(f"service.md: {name}: {values}")
        if name == "replaces" and not all(f"`{v}`" in (field.description or "") for v in values):
            missing.append(f"OpenAPI: {name}: {values}")
    assert not missing, missing
