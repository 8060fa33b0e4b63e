"""Offline validation of the deployment files (no container engine here): schemas, lint rules, and drift checks.

A test fails if the app's port, probe paths, metric names or setting names drift from what the Dockerfiles,
docker-compose.yml, Prometheus, Grafana and the Kubernetes manifests reference.
"""

import copy
import io
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from dockerfile_parse import DockerfileParser

from anomaly_service.api import create_app
from anomaly_service.cli import app as cli
from anomaly_service.settings import ServiceSettings
from anomaly_service.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.30.0"
SETTINGS = {f"ANOMALY_{name.upper()}" for name in ServiceSettings.model_fields}
# read by the package in every command, not a setting of the service: the backbone graph cache's folder
PACKAGE_ENV = {"ANOMALY_CACHE_DIR"}
PORT = ServiceSettings().port
UID = 10001


@pytest.fixture(scope="module")
def routes() -> set[str]:
    """Paths the app serves, as its OpenAPI document lists them (the app is built, not started)."""
    return set(create_app(ServiceSettings(model_dir=REPO / "models")).openapi()["paths"])


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ----------------------------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_rules(name):
    text = (DEPLOY / name).read_text()
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    froms = [v for k, v in instructions if k == "FROM"]
    assert len(froms) >= 2 and any(" AS runtime" in f for f in froms), "multi-stage, with a runtime stage"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for f in froms:  # every base image pinned to an explicit version, never latest
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest") and re.search(r":\S*\d+\.\d+", image), image
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1].split(":")[0] == str(UID), "runs as the unprivileged user"
    assert any(k == "HEALTHCHECK" and "anomaly healthcheck" in v.replace('", "', " ").replace('"', "")
               for k, v in final)
    assert ("EXPOSE", str(PORT)) in final
    assert not any(k == "ADD" for k, _ in instructions), "COPY only: no remote ADD"
    env = " ".join(v for k, v in final if k == "ENV")
    for var in re.findall(r"\b(ANOMALY_\w+)=", env):
        assert var in SETTINGS or var in PACKAGE_ENV, f"{var} is not a ServiceSettings field"
    assert re.search(rf"ANOMALY_PORT={PORT}\b", env) and "ANOMALY_MODEL_DIR=/models" in env
    assert '"serve"' in dict(final)["CMD"] and '"anomaly"' in dict(final)["ENTRYPOINT"]
    pip_installs = [v for k, v in instructions if k == "RUN" and "pip install" in v and " ." in v]
    assert pip_installs and all("--constraint deploy/constraints.txt" in v for v in pip_installs)
    for line in re.findall(r"pip install ([^&\\;]+)", text):  # any other package installed is pinned
        words = line.split()
        pkgs = [w for i, w in enumerate(words) if not w.startswith("-") and w != "."
                and not (i and words[i - 1] in ("--constraint", "--index-url", "-c"))]
        for pkg in pkgs:
            assert "==" in pkg, f"unpinned package {pkg} in {name}"
            package, version = pkg.split("==")
            # installed before the constrained step (torch from another index): the version the constraints test
            assert constraint_pins().get(key(package), version) == version, f"{pkg} in {name} is not constraints.txt's"
    for k, v in instructions:  # everything copied from the context exists and passes .dockerignore
        if k == "COPY" and "--from" not in v:
            for src in v.split()[:-1]:
                assert (REPO / src).exists(), src


def test_dockerignore_lets_in_only_what_the_images_need():
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "deploy/constraints.txt", "anomaly_service"}


def key(name: str) -> str:
    """A distribution's name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.lower())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for ln in (DEPLOY / "constraints.txt").read_text().splitlines():
        if ln and not ln.startswith("#"):
            name, version = ln.split("==")
            pins[key(name)] = version
    return pins


def test_constraints_pin_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement

    pins = constraint_pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        assert key(req.name) in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[key(req.name)], prereleases=True), \
            f"{req.name}=={pins[key(req.name)]} violates {req.specifier}"


# the newest release of a dependency the service was found to fail on, and the release that fixed it (decisions.md
# "The libraries' own known faults"): a lower bound below the fix lets a fresh install or a plant's mirror bring it
KNOWN_FAULTS = {
    # a part's headers unbounded (one of 15 MB: 10 s of CPU on the event loop); a url-encoded field of ';' passed
    # the 64 KB field limit (test_api.py: the body the form parser would spend seconds on)
    "python-multipart": ("0.0.29", "0.0.30"),
    # an upload over 1 MiB moved to its temporary file on the event loop (test_hung_share.py: the temporary
    # directory that hangs)
    "starlette": ("0.47.1", "0.47.2"),
    "fastapi": ("0.116.0", "0.116.1"),  # the newest whose Starlette range stops below 0.47.2, the first past it
}


def test_lower_bounds_keep_out_the_releases_the_service_failed_on():
    import tomllib

    from packaging.requirements import Requirement

    ranges = {key(Requirement(d).name): Requirement(d).specifier
              for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, (faulty, fixed) in KNOWN_FAULTS.items():
        assert not ranges[key(name)].contains(faulty), f"{name} {ranges[key(name)]} admits {faulty}"
        assert ranges[key(name)].contains(fixed), f"{name} {ranges[key(name)]} refuses {fixed}, which fixed it"


def declared_ranges() -> dict[str, "SpecifierSet"]:  # noqa: F821 (packaging's, imported where it is used)
    """Every range pyproject.toml declares, the runtime dependencies' and the test extra's, by name."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {key(Requirement(d).name): Requirement(d).specifier
            for d in project["dependencies"] + project["optional-dependencies"]["test"]}


def lower_bound(specifier) -> str:
    """The release a range starts at: its ``>=`` bound, or its ``==`` pin."""
    (bound,) = [s.version for s in specifier if s.operator in (">=", "==")]
    return bound


# lower bounds the floors' install found untrue (decisions.md "The dependency floors, installed together"): the
# newest release that fails and the first that works
FLOORS_FOUND = {
    # a model's index file that declared an array of gigabytes was allocated before the read failed: 1.14.2 is the
    # first FAISS with a bound on it (test_foreign_models.py: std::bad_alloc under 1.8)
    "faiss-cpu": ("1.13.2", "1.14.2"),
    "numpy": ("1.26.0", "1.26.1"),  # FAISS from 1.14.2 imports numpy._core, which 1.26.0 lacks
    # README's test command passes --no-loadscope-reorder, new in 3.8: under 3.6.1 pytest stopped at its usage
    "pytest-xdist": ("3.7.0", "3.8.0"),
    # a build from a tree with no tag yet was numbered 0.1.devN under 8, below the 0.1.0 every earlier release
    # carried (test_packaging.py)
    "setuptools-scm": ("8.3.1", "9.2.0"),
}


def test_lower_bounds_start_where_the_floors_install_found_them():
    ranges = declared_ranges()
    for name, (failing, working) in FLOORS_FOUND.items():
        assert not ranges[key(name)].contains(failing), f"{name} {ranges[key(name)]} admits {failing}"
        assert ranges[key(name)].contains(working), f"{name} {ranges[key(name)]} refuses {working}"


def test_the_pinned_releases_take_every_other_lower_bound():
    """torch and torchvision are pinned, so their own requirements hold at every install: a lower bound of ours below
    what they ask for is a floor that installs with nothing (the test extra's setuptools said 77, torch 2.14 needs
    77.0.3). Read from the installed pins' metadata, which is the pinned releases' own."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    ranges = declared_ranges()
    pinned = {name: lower_bound(spec) for name, spec in ranges.items() if any(s.operator == "==" for s in spec)}
    assert {"torch", "torchvision"} <= set(pinned)
    for name, pin in pinned.items():
        assert version(name) == pin, f"{name} {version(name)} is installed, pyproject.toml pins {pin}"
        for line in requires(name) or []:
            need = Requirement(line)
            if key(need.name) in ranges and (need.marker is None or need.marker.evaluate({"extra": ""})):
                floor = lower_bound(ranges[key(need.name)])
                assert need.specifier.contains(floor, prereleases=True), \
                    f"{name}=={pin} needs {need.name}{need.specifier}; pyproject.toml's lower bound is {floor}"


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A package the code imports by name gets its own range in pyproject.toml, even when another dependency brings
    it: its lower bound is then the release whose API the code uses, not whatever the other one allowed. Starlette
    (imported beside FastAPI) and anyio came that way, and releases their carriers admit lacked what the code calls."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    declared = {key(Requirement(d).name)
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    modules: dict[str, str] = {}
    for path in sorted((REPO / "anomaly_service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            for name in names:
                modules.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    distributions = packages_distributions()
    third_party = {m: p for m, p in modules.items() if m not in sys.stdlib_module_names and m != "anomaly_service"}
    assert {"numpy", "fastapi", "starlette"} <= set(third_party)
    for module, path in third_party.items():
        provided = {key(d) for d in distributions.get(module, [])}
        assert provided, f"{module} (imported in {path}) is installed by no distribution here"
        assert provided & declared, f"{module} (imported in {path}) comes from {sorted(provided)}, not declared in " \
                                    "pyproject.toml's dependencies"


def test_healthcheck_command(server):
    url, _ = server
    ok = CliRunner().invoke(cli, ["healthcheck", "--url", f"{url}/healthz"])
    assert ok.exit_code == 0 and "ok" in ok.output
    down = CliRunner().invoke(cli, ["healthcheck", "--url", "http://127.0.0.1:9/healthz", "--timeout", "1"])
    assert down.exit_code == 1 and "error:" in down.output


# ----------------------------------------------------------------------------------------------- compose
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec():
    schema = json.loads(resources.files("check_jsonschema").joinpath(
        "builtin_schemas/vendor/compose-spec.json").read_text())
    jsonschema.validate(compose(), schema)


def test_compose_services_match_the_app():
    c = compose()
    services = c["services"]
    for name in ("api", "api-gpu"):
        svc = services[name]
        assert svc["build"]["dockerfile"] in ("deploy/Dockerfile", "deploy/Dockerfile.cuda")
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        assert svc["ports"] == [f"{PORT}:{PORT}"]
        assert "./models:/models" in svc["volumes"]  # writable: updates and rollbacks save new versions
        assert svc["healthcheck"]["test"] == ["CMD", "anomaly", "healthcheck"]
        assert svc["restart"] == "unless-stopped"
        assert int(svc["stop_grace_period"].rstrip("s")) >= 35  # requests, then records (deploy/docker-compose.yml)
        assert svc["deploy"]["resources"]["limits"]["memory"]
        for var in svc["environment"]:
            assert var in SETTINGS, f"{name}: {var} is not a ServiceSettings field"
        assert svc["environment"]["ANOMALY_MODEL_DIR"] == "/models"
        assert svc["environment"]["ANOMALY_PORT"] == str(PORT)
    assert services["api-gpu"]["profiles"] == ["gpu"]
    assert services["api-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{image} is not pinned"
        for vol in services[name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src



def _size(text: str) -> int:
    """Docker's log size option (``20m``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", str(text).lower()).groups()
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def test_compose_keeps_every_containers_log_bounded():
    """A soak found the service's log growing with every request (an access line per part, scrape, health check
    and page poll) while compose left Docker's default log driver, which keeps every line for the container's life:
    a station running for months filled its disk with log. Each service now rotates a few files of bounded size."""
    for name, svc in compose()["services"].items():
        logging = svc.get("logging") or {}
        assert logging.get("driver") in ("json-file", "local"), f"{name}: a log driver that rotates on this host"
        options = logging.get("options") or {}
        assert "max-size" in options and "max-file" in options, f"{name}: its log is not bounded"
        assert _size(options["max-size"]) * int(options["max-file"]) <= 1 << 30, f"{name}: keeps more than a GiB"

def test_compose_bakes_in_no_password_and_publishes_no_unauthenticated_port_beyond_the_host():
    """POSTGRES_PASSWORD and GRAFANA_ADMIN_PASSWORD fell back to `change-me`: a `docker compose up` without them
    published Grafana on :3000 with admin / change-me (its data source reads every record) and made the records
    database with a password anyone could read here. Prometheus, which has no login, was published on every
    interface. Now compose refuses to start without the passwords, and Prometheus answers on the host only."""
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|API_KEY)[A-Z_]*:?-", text), "a secret with a default value"
    for var in ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "ANOMALY_API_KEY"):
        assert re.search(rf"\$\{{{var}:\?", text), f"{var} must be required"
    services = compose()["services"]
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    for name in ("api", "api-gpu"):
        assert services[name]["read_only"] is True and services[name]["tmpfs"] == ["/tmp"], name
        assert "no-new-privileges:true" in services[name]["security_opt"], name


def test_prometheus_scrapes_the_metrics_route(routes):
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and "/metrics" in routes
    services = set(compose()["services"])
    [sd] = job["dns_sd_configs"]  # by DNS: a service compose does not run is no target, not a down one
    assert sd["type"] == "A" and sd["port"] == PORT
    assert set(sd["names"]) == {name for name in services if name.startswith("api")}


# the sample names a Prometheus family of each type exposes (a labelled family has no samples until first use, so the
# names come from the families, not from their samples)
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                   "_created"), "summary": ("_sum", "_count", "_created"), "info": ("_info",),
                   "stateset": ("",), "enum": ("",), "unknown": ("",)}


def test_grafana_dashboard_queries_only_metrics_we_export():
    """Every series a panel reads is one the service exports: its own, and the process's under their standard
    names. Each process query keeps to the service's own targets (any other target Prometheus scrapes, Prometheus
    itself among them, exports the same process names)."""
    dash = json.loads((DEPLOY / "grafana/dashboards/anomaly.json").read_text())
    exported = set()
    for metric in Telemetry().registry.collect():  # every family, with or without samples yet
        exported |= {metric.name + suffix for suffix in SAMPLE_SUFFIXES[metric.type]}
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:anomaly|process|python)_[a-z_]+)", target["expr"]))
            if re.search(r"\b(?:process|python)_", target["expr"]):
                assert target["expr"].endswith(" and on (job, instance) anomaly_models_loaded"), target["expr"]
    assert used and used <= exported, used - exported
    assert {"process_resident_memory_bytes", "process_open_fds", "process_threads"} <= used
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("anomaly rate", "latency", "score distribution", "requests", "drift", "memory", "threads"):
        assert topic in titles


def test_grafana_per_model_panels_follow_the_model_selector():
    """A plant serving twenty variants narrows the dashboard with its model variable: every query of a per-model
    metric filters by it (the drift panel drew all forty lines whatever was picked), and a per-replica copy of one
    number (every replica serves every model) is not summed over replicas (two replicas of 20 showed 40 models)."""
    dash = json.loads((DEPLOY / "grafana/dashboards/anomaly.json").read_text())
    per_model = {m.name for m in Telemetry().registry.collect() if any("model" in s.labels for s in m.samples)}
    per_model |= {"anomaly_decisions", "anomaly_normalized_score", "anomaly_drift", "anomaly_drift_alarm",
                  "anomaly_model_reloads"}  # families with no sample until a model scores or loads
    checked = 0
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\b(anomaly_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b", target["expr"]):
                if metric in per_model:
                    checked += 1
                    assert re.search(rf'{metric}\w*\{{[^}}]*model=~"\$model"', target["expr"]), target["expr"]
            assert not re.search(r"sum\s*\(\s*anomaly_models_loaded", target["expr"]), target["expr"]
    assert checked >= 5
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/anomaly.yml").read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert grafana_mounts["./deploy/grafana/dashboards"] == prov["providers"][0]["options"]["path"]


# ----------------------------------------------------------------------------------------------- Kubernetes
def _merge(base, patch):
    """Strategic-merge subset used by our overlays: dicts merge (a null deletes the key), lists of named items merge
    by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x
                                                                  for x in base + patch):
        out = [dict(x) for x in base]
        for item in patch:
            idx = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = _merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def render(overlay: str) -> dict[tuple[str, str], dict]:
    """Resources of an overlay: base resources, overlay patches applied, image names rewritten."""
    base_k = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    docs = {}
    for res in base_k["resources"]:
        for d in load_yaml_docs(K8S / "base" / res):
            docs[(d["kind"], d["metadata"]["name"])] = d
    k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    assert k["resources"] == ["../../base"]
    for p in k.get("patches", []):
        patch = yaml.safe_load((K8S / "overlays" / overlay / p["path"]).read_text())
        key = (patch["kind"], patch["metadata"]["name"])
        assert key in docs, f"patch {p['path']} targets {key}, which the base does not define"
        docs[key] = _merge(docs[key], patch)
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in k.get("images", [])}
    for d in docs.values():
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name = c["image"].split(":")[0]
            if name in images:
                c["image"] = images[name]
    return docs


def test_every_base_manifest_validates():
    base_k = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    files = sorted(p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    assert set(base_k["resources"]) == set(files) - {"secret.example.yaml", "fit-job.example.yaml",
                                                      "rescore-job.example.yaml"}
    for name in files:
        for doc in load_yaml_docs(K8S / "base" / name):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_fit_job_example_writes_where_the_service_reads():
    (job,) = load_yaml_docs(K8S / "base/fit-job.example.yaml")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    res = CliRunner().invoke(cli, [*c["args"][:1], "--help"])
    assert res.exit_code == 0
    for flag in c["args"][1:]:
        if flag.startswith("--"):
            assert flag in res.output, f"anomaly fit has no {flag}"
    out = c["args"][c["args"].index("--out") + 1]
    assert out.startswith("/models/")
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in job["spec"]["template"]["spec"]["volumes"]}
    assert claims["models"] == "anomaly-models"


def test_rescore_job_example_runs_one_shard_per_index_with_the_service_image_and_store():
    from anomaly_service.cli import score
    from anomaly_service.sharding import Shard

    (job,) = load_yaml_docs(K8S / "base/rescore-job.example.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "score"
    params = score.make_context("score", list(c["args"][1:])).params  # the real command parses these args
    n = spec["completions"]
    assert params["shard_text"] == f"auto/{n}", "one shard per completion index"
    assert Shard.parse(params["shard_text"], {"JOB_COMPLETION_INDEX": str(n - 1)}) == Shard(n - 1, n)
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods writing one shard's results
    fail_index = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index[0]["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [2]}
    # the same image, secret and model store as the service
    dep = load_yaml_docs(K8S / "base/deployment.yaml")[0]["spec"]["template"]["spec"]
    (api,) = dep["containers"]
    assert c["image"] == api["image"]
    assert {e["name"]: e for e in c["env"]}["ANOMALY_DATABASE_URL"] == \
        {e["name"]: e for e in api["env"]}["ANOMALY_DATABASE_URL"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}

    def mount_of(path: Path) -> tuple[dict, dict]:
        """The (mount, claim) that holds ``path`` in the container: the deepest mount above it."""
        above = [m for m in c["volumeMounts"] if Path(m["mountPath"]) in (path, *path.parents)]
        m = max(above, key=lambda m: len(m["mountPath"]))
        return m, claims[m["name"]]

    mount, claim = mount_of(params["model_path"])
    served = {v["name"]: v for v in dep["volumes"]}["models"]["persistentVolumeClaim"]
    assert mount["readOnly"] and claim["claimName"] == served["claimName"]  # the service's store; the job only reads
    for archive in params["inputs"]:
        mount, claim = mount_of(archive)
        assert mount["readOnly"] and claim["readOnly"]
    pvcs = {d["metadata"]["name"]: d for d in load_yaml_docs(K8S / "base/pvc.yaml")}
    for written in (params["output"], params["data_dir"]):  # every pod writes here, from any node
        mount, claim = mount_of(written)
        assert not mount.get("readOnly") and pvcs[claim["claimName"]]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["securityContext"]["runAsUser"] == UID and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_to_valid_consistent_manifests(overlay, routes):
    docs = render(overlay)
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dep = docs[("Deployment", "anomaly-api")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith("-cuda" if overlay == "gpu" else "-cpu")
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == PORT
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes
    assert c["startupProbe"]["httpGet"]["path"] in routes
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # threads are sized from the CPU quota: the serving pod has one, as the replica sizing assumes
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    # a stop: the stop delay, requests (10 s), then records retried against a database that is down (15 s), then
    # retention (5 s)
    cm = docs[("ConfigMap", "anomaly-config")]["data"]
    assert 0 < float(cm["ANOMALY_STOP_DELAY"]) and pod["terminationGracePeriodSeconds"] >= float(
        cm["ANOMALY_STOP_DELAY"]) + 35
    assert c["envFrom"][0]["configMapRef"]["name"] == "anomaly-config"
    for var in list(cm) + [e["name"] for e in c.get("env", [])]:
        assert var in SETTINGS or var in PACKAGE_ENV, f"{var} is not a ServiceSettings field"
    assert cm["ANOMALY_PORT"] == str(PORT) and cm["ANOMALY_MODEL_DIR"] == "/models"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # writable: an update or a rollback through a replica saves a new version (artifact.model_lock orders them)
    assert mounts["models"]["mountPath"] == "/models" and not mounts["models"].get("readOnly")
    claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = docs[("Service", "anomaly-api")]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    hpa = docs[("HorizontalPodAutoscaler", "anomaly-api")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "anomaly-api"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # at the HPA's fewest replicas a node drain can still evict one (a PDB that needs them all blocks it forever)
    pdb = docs[("PodDisruptionBudget", "anomaly-api")]["spec"]
    assert pdb.get("minAvailable", 0) < hpa["spec"]["minReplicas"] or pdb.get("maxUnavailable", 0) >= 1
    assert not ("minAvailable" in pdb and "maxUnavailable" in pdb)  # the API takes one or the other
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and pod["tolerations"]
        assert {e["name"]: e.get("value") for e in c["env"]}["ANOMALY_DEVICE"] == "cuda"
        assert "ANOMALY_API_KEY" in {e["name"] for e in c["env"]}  # the merge kept the base's secret reference


# ----------------------------------------------------------------------------------------------- records
def test_compose_runs_the_records_database():
    services = compose()["services"]
    pg = services["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+", pg["image"]), "official image, pinned"
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    for name in ("api", "api-gpu"):
        svc = services[name]
        env = svc["environment"]
        assert env["ANOMALY_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["ANOMALY_DATABASE_URL"]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert any(v.split(":")[1] == env["ANOMALY_DATA_DIR"] for v in svc["volumes"])
    for vol in ("anomaly-data", "postgres-data"):
        assert vol in compose()["volumes"]
    assert "postgres" in services["grafana"]["depends_on"]


def test_grafana_records_dashboard_reads_real_columns_and_links_real_routes(routes):
    from anomaly_service.records.models import Inspection

    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/records.yml").read_text())["datasources"][0]
    assert ds["type"] == "grafana-postgresql-datasource" and ds["url"] == "postgres:5432"
    grafana_env = compose()["services"]["grafana"]["environment"]
    for value in (ds["user"], ds["secureJsonData"]["password"]):
        assert value.startswith("$") and value[1:] in grafana_env  # expanded from Grafana's environment
    dash = json.loads((DEPLOY / "grafana/dashboards/inspections.json").read_text())
    columns = set(Inspection.__table__.columns.keys())
    sql_words = {"select", "from", "where", "and", "or", "group", "by", "order", "desc", "limit", "as", "case",
                 "when", "then", "else", "end", "in", "is", "null", "not", "count", "avg", "round", "numeric",
                 "coalesce", "distinct", "metric", "time", "score", "unreviewed", "verdict", "parts",
                 "anomaly_rate", "inspections", "model", "anomaly", "escapes", "overturned"}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            sql = re.sub(r"'[^']*'|\$\w+(\([^)]*\))?", " ", target["rawSql"])
            for word in re.findall(r"\b[a-z_]+\b", sql.lower()):
                assert word in columns or word in sql_words, f"{panel['title']}: unknown column {word}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("anomaly rate per line and model", "review backlog", "latest flagged parts",
                  "defects the model passed", "flagged parts overturned"):
        assert topic in titles
    links = json.dumps(dash)
    # the link carries the row's view token: a browser opening it from Grafana sends no X-API-Key
    assert "/inspections/${__value.raw}/overlay.png?token=${__data.fields.view_token}" in links
    assert "/inspections/{inspection_id}/overlay.png" in routes


def grafana_sql(raw: str, model: str) -> str:
    """A records panel's query as Grafana's PostgreSQL data source sends it: its macros expanded (the last day)."""
    seconds = {"m": 60, "h": 3600}

    def group(m: re.Match) -> str:
        step = int(m[2]) * seconds[m[3]]
        return f'floor(extract(epoch from {m[1]})/{step})*{step} AS "time"'

    sql = re.sub(r"\$__timeGroupAlias\((\w+), '(\d+)([mh])'\)", group, raw)
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '1 day' AND now()", sql)
    return sql.replace("$model", f"'{model}'")


def test_grafana_records_dashboard_queries_count_right_on_postgresql(postgres_url, tmp_path):
    """Every records panel's query, run by a real PostgreSQL on parts whose reviews are known: the verdicts, the
    defects the model passed and the share of flagged parts overturned come out as the reviews say (a query read
    only for its words can name real columns and still count the wrong parts)."""
    import sqlalchemy as sa

    from anomaly_service.records import RecordStore
    from anomaly_service.records.models import Inspection, new_id, utcnow

    store = RecordStore.open(postgres_url, tmp_path / "data")
    store.upgrade()
    # flagged: two found actually good, one a real defect, one unreviewed; passed: two real defects, three unreviewed
    parts = [("anomaly", "good"), ("anomaly", "good"), ("anomaly", "defect"), ("anomaly", None),
             ("normal", "defect"), ("normal", "defect"), ("normal", None), ("normal", None), ("normal", None)]
    now = utcnow()
    rows = [Inspection(id=new_id(), created_at=now, model="part", model_version="v1", score=1.0, normalized_score=1.0,
                       threshold=1.0, decision=decision, regions=[], image_width=8, image_height=8, image_bytes=1,
                       image_sha256="0" * 64, timing_ms={}, part_id=f"P{i}", line="L1", source="api",
                       files_state="not_kept") for i, (decision, _) in enumerate(parts)]
    assert store.add_many(rows) == len(rows)
    for r, (_, verdict) in zip(rows, parts):
        if verdict:
            store.review(r.id, verdict, "qa")
    dash = json.loads((DEPLOY / "grafana/dashboards/inspections.json").read_text())
    answers = {}
    with store.engine.connect() as conn:
        for panel in dash["panels"]:
            (target,) = panel["targets"]
            answers[panel["id"]] = conn.execute(sa.text(grafana_sql(target["rawSql"], "part"))).all()
    store.close()
    by_title = {p["title"].split(":")[0].lower(): answers[p["id"]] for p in dash["panels"]}
    assert [tuple(r) for r in by_title["review backlog"]] == [(1,)]
    assert dict(by_title["operator verdicts on flagged parts"]) == {"good": 2, "defect": 1, "unreviewed": 1}
    assert [tuple(r) for r in by_title["defects the model passed"]] == [(2,)]
    ((_, metric, overturned),) = by_title["flagged parts overturned"]
    assert metric == "part" and float(overturned) == pytest.approx(2 / 3)
    ((_, _, rate),) = by_title["anomaly rate per line and model (recorded inspections)"]
    assert float(rate) == pytest.approx(4 / 9)
    assert len(by_title["latest flagged parts (click for the overlay)"]) == 4


def test_kubernetes_takes_the_database_url_from_a_secret():
    docs = render("cpu")
    pod = docs[("Deployment", "anomaly-api")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["ANOMALY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional")  # replicas above one need PostgreSQL: no silent SQLite per pod
    secrets = {d["metadata"]["name"]: d for d in load_yaml_docs(K8S / "base/secret.example.yaml")}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    assert secrets[ref["name"]]["stringData"][ref["key"]].startswith("postgresql+psycopg://")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm = docs[("ConfigMap", "anomaly-config")]["data"]
    assert mounts["data"] == cm["ANOMALY_DATA_DIR"]
    claim = {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    assert docs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]


ALERTING = DEPLOY / "grafana/provisioning/alerting"
# what an alert's query may say besides metric names: PromQL's aggregations, functions and keywords it uses
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "increase", "rate", "absent", "clamp_min", "and", "or", "unless",
                "bool", "on", "ignoring"}
ALERTS = {"anomaly-line-drift", "anomaly-records-lost", "anomaly-model-load-failed", "anomaly-model-directory-stuck",
          "anomaly-overloaded",
          "anomaly-target-down", "anomaly-rate-excursion", "anomaly-photos-not-kept", "anomaly-open-files-near-limit"}
# the standard process series an alert may read beside the service's own (every target exports them: a rule keeps
# the service's replicas with its own gauge, as the dashboard's process panels do)
PROCESS_SERIES = {"process_open_fds", "process_max_fds"}
REPLICAS_ONLY = "and on (job, instance) anomaly_models_loaded"


def alert_rules() -> list[dict]:
    return [dict(rule, folder=group["folder"]) for path in sorted(ALERTING.glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def exported_labels() -> dict[str, set[str]]:
    """Each sample name the service can export, with its labels (from the families' definitions: a labelled family
    has no sample before its first use)."""
    labels = {}
    for metric in vars(Telemetry()).values():
        if hasattr(metric, "_labelnames"):
            family = next(iter(metric.describe()))
            for suffix in SAMPLE_SUFFIXES[family.type]:
                labels[family.name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_grafana_drift_alert_rule_watches_the_exported_gauge():
    """The provisioned alert fires on anomaly_drift_alarm, a gauge the service exports, through the provisioned
    Prometheus datasource, and the provisioning folder is mounted into Grafana."""
    rules = yaml.safe_load((ALERTING / "drift.yml").read_text())
    rule = rules["groups"][0]["rules"][0]
    query = next(d for d in rule["data"] if d["refId"] == "A")
    assert "anomaly_drift_alarm" in query["model"]["expr"]
    assert "anomaly_drift_alarm" in {m.name for m in Telemetry().registry.collect()}
    prom = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert query["datasourceUid"] == prom["uid"]
    assert rule["condition"] in {d["refId"] for d in rule["data"]}
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_every_alert_rule_reads_only_what_the_service_and_the_scrape_give():
    """Each provisioned rule asks the provisioned Prometheus datasource for series the service exports, grouped by
    labels those series have (or the scrape adds); `up` only for the scrape job prometheus.yml defines. A renamed
    metric or label would leave a rule that never fires, with no error anywhere. Each tells an operator how bad
    (severity) and what to check (summary, description); tests/test_alerts.py runs their PromQL through promtool."""
    prom = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    [job] = [j["job_name"] for j in scrape["scrape_configs"]]
    exported = exported_labels()
    rules = alert_rules()
    assert {r["uid"] for r in rules} == ALERTS and len(rules) == len(ALERTS)
    assert PROCESS_SERIES <= {s.name for family in Telemetry().registry.collect() for s in family.samples}
    for rule in rules:
        data = {d["refId"]: d for d in rule["data"]}
        condition = data[rule["condition"]]["model"]
        assert condition["type"] == "threshold" and rule["folder"] == "Inspection", rule["uid"]
        query = data[condition["expression"]]
        assert query["datasourceUid"] == prom["uid"] and query["model"]["instant"], rule["uid"]
        expr = query["model"]["expr"]
        for name, matchers in re.findall(r"\b(anomaly_\w+|up)\b(\{[^}]*\})?", expr):
            assert name == "up" or name in exported, (rule["uid"], name)
            if name == "up":
                assert matchers == f'{{job="{job}"}}', (rule["uid"], expr)
            allowed = exported.get(name, set()) | {"job", "instance"}
            assert set(re.findall(r"(\w+)\s*=", matchers)) <= allowed, (rule["uid"], name, matchers)
        grouped = {label.strip() for by in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in by.split(",")}
        series = set(re.findall(r"\b(anomaly_\w+)", expr))
        assert all(grouped <= exported[name] | {"instance"} for name in series), (rule["uid"], grouped)
        words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", re.sub(r"\{[^}]*\}|\bby\s*\([^)]*\)|\bon\s*\([^)]*\)", "",
                                                                expr)))
        assert words - PROMQL_WORDS - set(exported) - PROCESS_SERIES <= {"up"}, \
            (rule["uid"], words - PROMQL_WORDS - set(exported))
        if words & PROCESS_SERIES:
            assert REPLICAS_ONLY in " ".join(expr.split()), (rule["uid"], expr)
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["uid"]
        assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 80, rule["uid"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["uid"]


def test_pods_set_the_volume_group_once_so_the_graph_cache_stays_trusted():
    """With fsGroup the kubelet, by default at every mount, makes every file of the volume group-writable: the
    backbone graph cache on /data (graph_cache.py) then trusts none of its graphs, and every start exports again."""
    pods = [d["spec"]["template"]["spec"] for overlay in ("cpu", "gpu") for (kind, _), d in render(overlay).items()
            if kind == "Deployment"]
    for name in ("fit-job.example.yaml", "rescore-job.example.yaml"):
        (job,) = load_yaml_docs(K8S / "base" / name)
        pods.append(job["spec"]["template"]["spec"])
    for pod in pods:
        ctx = pod["securityContext"]
        assert "fsGroup" in ctx and ctx.get("fsGroupChangePolicy") == "OnRootMismatch", ctx


NGINX_CONF = """{user}daemon off; pid {d}/nginx.pid; error_log {d}/error.log; worker_processes 1;
events {{}}
http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  server {{ listen 127.0.0.1:{port}; {extra}
    location / {{ proxy_pass {upstream}; }} }} }}
"""


def test_the_deploy_guide_sets_nginxs_body_limit_to_what_the_service_takes(server, tmp_path):
    """nginx refuses a body over 1 MB unless told otherwise, and an nginx Ingress likewise (ingress-nginx#4812): a
    line camera's photo behind it was 413 in nginx's HTML, the service never saw it and nothing of ours said so.
    The guide gives the line and the annotation; with nginx here, the line lets a 1.5 MB photo through to be
    scored, where nginx's default refuses it."""
    import shutil
    import subprocess
    import time

    import httpx
    import numpy as np

    from conftest import free_port, png_bytes

    guide = (DEPLOY / "README.md").read_text()
    line = re.search(r"^client_max_body_size (\d+)m;", guide, re.MULTILINE)
    assert line is not None, "deploy/README.md gives no client_max_body_size line"
    assert int(line.group(1)) * 1024 * 1024 > ServiceSettings().max_upload_bytes  # the file and its form's framing
    assert f'nginx.ingress.kubernetes.io/proxy-body-size: "{line.group(1)}m"' in guide
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    url, _ = server
    photo = png_bytes(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))
    assert 1024 * 1024 < len(photo)
    answers = []
    for extra in ("", line.group(0)):
        port = free_port()
        conf = tmp_path / f"nginx{len(answers)}.conf"
        # run as root, nginx's workers are nobody, who cannot write the test's folder (its bodies' files)
        user = "user root; " if __import__("os").geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, d=tmp_path, port=port, extra=extra, upstream=url))
        proxy = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:  # until it listens
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proxy.poll() is None
                    time.sleep(0.1)
            answers.append(httpx.post(f"http://127.0.0.1:{port}/score", files={"file": ("p.png", photo)},
                                      timeout=120))
        finally:
            proxy.terminate()
            proxy.wait(10)
    assert answers[0].status_code == 413 and "text/html" in answers[0].headers["content-type"]
    assert answers[1].status_code == 200 and answers[1].json()["score"] > 0


def test_every_provisioned_dashboard_names_a_provisioned_datasource_by_uid():
    """A dashboard exported "for sharing external" names its data source as an input (``__inputs``,
    ``${DS_PROMETHEUS}``) that only the import dialog fills in: provisioned from files it opens with "Datasource
    ${DS_PROMETHEUS} was not found" and every panel empty (grafana#11018, ingress-nginx#4190, dcgm-exporter#90). Each
    dashboard the provisioning loads, its panels, queries and variables, names a data source the provisioning makes,
    by its uid, and carries no such input or a fixed ``id`` of another Grafana's database."""
    provisioned = {}
    for path in (DEPLOY / "grafana/provisioning/datasources").glob("*.yml"):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            provisioned[ds["uid"]] = ds["type"]
    dashboards = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
    assert dashboards and provisioned

    def named(node) -> list:
        if isinstance(node, dict):
            own = [node["datasource"]] if "datasource" in node else []
            return own + [d for v in node.values() for d in named(v)]
        return [d for v in node for d in named(v)] if isinstance(node, list) else []

    for path in dashboards:
        text = path.read_text()
        dash = json.loads(text)
        assert "__inputs" not in dash and "__requires" not in dash and dash.get("id") is None, path.name
        assert not re.search(r"\$\{DS_\w*\}", text), path.name
        sources = [d for d in named(dash) if d is not None]
        assert sources, path.name
        for ds in sources:
            assert isinstance(ds, dict) and provisioned.get(ds["uid"]) == ds["type"], (path.name, ds)
    for path in (DEPLOY / "grafana/provisioning/alerting").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for query in rule["data"]:
                    assert query["datasourceUid"] in provisioned or query["datasourceUid"] == "__expr__", rule["uid"]


def test_the_deploy_guide_has_access_lines_name_the_station_behind_a_proxy(tmp_path, monkeypatch):
    """Behind a proxy on another host every access line named the proxy (uvicorn#1223, flatnotes#101): uvicorn
    believes ``X-Forwarded-For`` only from 127.0.0.1. The guide says how the lines name the stations, and a real
    server told its proxy's address by ``FORWARDED_ALLOW_IPS`` (here the test itself, as the proxy) logs the
    station the proxy names, not an address the station wrote into the header itself."""
    import httpx

    from conftest import eventually, launch_server, stop_server

    guide = (DEPLOY / "README.md").read_text()
    setting = re.search(r"^FORWARDED_ALLOW_IPS=\S+", guide, re.MULTILINE)
    assert setting is not None, "deploy/README.md does not say how access lines name the stations behind a proxy"
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in guide and "option forwardfor" in guide
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")
    (tmp_path / "models").mkdir()
    log = tmp_path / "server.log"
    url, proc = launch_server(tmp_path / "models", log, ready="/healthz")
    try:
        # what nginx sends for a station at 10.20.30.40 that wrote its own header naming 6.6.6.6
        forwarded = {"X-Forwarded-For": "6.6.6.6, 10.20.30.40", "X-Request-ID": "behind-the-proxy"}
        assert httpx.get(f"{url}/healthz", headers=forwarded).status_code == 200
        eventually(lambda: "behind-the-proxy" in log.read_text(), patience=30)
        line = next(x for x in log.read_text().splitlines() if "behind-the-proxy" in x)
        assert "10.20.30.40" in line and "6.6.6.6" not in line and "127.0.0.1" not in line, line
    finally:
        stop_server(proc)
