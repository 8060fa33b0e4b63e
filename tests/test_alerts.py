"""The provisioned Grafana alert rules, run by Prometheus's own rule engine (Debian's ``promtool``): each rule's query
and threshold become a Prometheus alerting rule, ``promtool check rules`` parses them, and ``promtool test rules``
evaluates them over input series where the alert must fire and where it must not (a counter reset by a restart, a
model with no traffic, a blip shorter than the rule's ``for``). ``promtool check metrics`` lints the real /metrics of
a running service, and ``promtool`` evaluates the dashboard's process panels' queries. Grafana evaluates the same
PromQL on the same Prometheus, so what fires here fires there.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from anomaly_service.api import create_app
from anomaly_service.settings import ServiceSettings
from conftest import add_defect, png_bytes, textured_part

ALERTING = Path(__file__).resolve().parents[1] / "deploy/grafana/provisioning/alerting"
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/anomaly.json"
PROMTOOL = shutil.which("promtool")
SCRAPED = 'job="anomaly",instance="api:8000"'  # the labels Prometheus adds to what it scrapes from a replica
DAY = 1440  # minutes


def grafana_rules() -> dict[str, dict]:
    """Every provisioned rule, by uid."""
    rules = {}
    for path in sorted(ALERTING.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules[rule["uid"]] = rule
    return rules


def as_prometheus_rule(rule: dict) -> dict:
    """A Grafana rule (query A, a threshold C on it) as the Prometheus alerting rule that means the same."""
    data = {d["refId"]: d["model"] for d in rule["data"]}
    condition = data[rule["condition"]]
    assert condition["type"] == "threshold" and condition["expression"] in data
    [evaluator] = [c["evaluator"] for c in condition["conditions"]]
    op = {"gt": ">", "lt": "<"}[evaluator["type"]]
    expr = data[condition["expression"]]["expr"]
    return {"alert": rule["uid"], "expr": f"({expr}) {op} {evaluator['params'][0]}", "for": rule["for"],
            "labels": rule["labels"]}


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed; .ci/run installs it (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus) - the alert rule tests skipped")
    return PROMTOOL


@pytest.fixture
def rule_file(tmp_path) -> Path:
    return prometheus_rule_file(tmp_path)


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def expect(promtool: str, rule_file: Path, series: dict[str, str], alerts: dict[tuple[str, str], list[dict]],
           interval: str = "1m") -> None:
    """``promtool test rules``: ``series`` (selector: promtool's expanding notation) as scraped every ``interval``;
    ``alerts`` maps (uid, evaluation time) to the label sets that must be firing then (an empty list: none is)."""
    rules = grafana_rules()
    cases = [{"eval_time": at, "alertname": uid,
              "exp_alerts": [{"exp_labels": {**labels, **rules[uid]["labels"]}} for labels in firing]}
             for (uid, at), firing in alerts.items()]
    test = {"rule_files": [rule_file.name], "evaluation_interval": "1m",
            "tests": [{"interval": interval, "input_series": [{"series": s, "values": v} for s, v in series.items()],
                       "alert_rule_test": cases}]}
    path = rule_file.with_name("test.yml")
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = run_promtool(promtool, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_every_provisioned_rule(promtool, rule_file):
    done = run_promtool(promtool, "check", "rules", str(rule_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(grafana_rules())} rules found" in done.stdout


# ------------------------------------------------------------------------------------------------ records lost
def test_records_lost_fires_on_the_first_loss_and_ends_after_its_window(promtool, rule_file):
    where = {"instance": "api:8000", "reason": "database"}
    expect(promtool, rule_file, {f'anomaly_records_dropped_total{{{SCRAPED},reason="database"}}': "0x10 3x20"},
           {("anomaly-records-lost", "5m"): [], ("anomaly-records-lost", "11m"): [where],
            ("anomaly-records-lost", "19m"): [where], ("anomaly-records-lost", "25m"): []})


def test_records_lost_is_quiet_when_a_restart_resets_the_count(promtool, rule_file):
    """A restart starts the counter at 0 again: that fall is no loss; a loss right after the restart still is."""
    expect(promtool, rule_file, {
        f'anomaly_records_dropped_total{{{SCRAPED},reason="buffer_full"}}': "7x10 0x20",
        f'anomaly_records_dropped_total{{{SCRAPED},reason="unavailable"}}': "7x10 2x20"},
        {("anomaly-records-lost", "12m"): [{"instance": "api:8000", "reason": "unavailable"}],
         ("anomaly-records-lost", "25m"): []})


# ------------------------------------------------------------------------------------------------ model loading
def test_model_load_failure_fires_while_the_model_does_not_load(promtool, rule_file):
    """A model broken for good fires after the rule's minute; one whose gauge goes (a re-scan loaded it: the
    series ends, and Prometheus marks it stale) does not."""
    expect(promtool, rule_file, {
        f'anomaly_model_load_failed{{{SCRAPED},model="broken"}}': "1x30",
        f'anomaly_model_load_failed{{{SCRAPED},model="refitting"}}': "1 stale"},
        {("anomaly-model-load-failed", "0m"): [], ("anomaly-model-load-failed", "2m"): [{"model": "broken"}],
         ("anomaly-model-load-failed", "30m"): [{"model": "broken"}]})



def test_model_directory_stuck_fires_while_the_directory_does_not_answer(promtool, rule_file):
    """A replica whose model directory hangs serves its loaded models from memory: no model fails to load, so only
    its own gauge can say it. Held past the rule's minute it fires for that replica; a blip (one scrape) does not,
    nor does a replica whose directory answers."""
    expect(promtool, rule_file, {
        f"anomaly_model_directory_stuck{{{SCRAPED}}}": "0x3 1x30",
        'anomaly_model_directory_stuck{job="anomaly",instance="api-2:8000"}': "0x5 1 0x30",
        f'anomaly_model_load_failed{{{SCRAPED},model="a"}}': "stale"},
        {("anomaly-model-directory-stuck", "3m"): [], ("anomaly-model-directory-stuck", "4m"): [],
         ("anomaly-model-directory-stuck", "6m"): [{"instance": "api:8000"}],
         ("anomaly-model-directory-stuck", "30m"): [{"instance": "api:8000"}],
         ("anomaly-model-load-failed", "30m"): []})


def fires_on_scraped(promtool: str, rule_file: Path, text: str, uid: str, labels: list[dict]) -> None:
    """``text`` (a real /metrics exposition) scraped every minute for an hour: rule ``uid`` fires with ``labels``
    after half an hour, and every other rule stays quiet."""
    series = {name: f"{value}x60" for name, value in scraped_series(text).items()}
    series[f"up{{{SCRAPED}}}"] = "1x60"
    quiet = {(other, "30m"): [] for other in grafana_rules() if other != uid}
    expect(promtool, rule_file, series, {(uid, "30m"): labels, **quiet})


def prometheus_rule_file(where: Path) -> Path:
    """The provisioned rules as one Prometheus rule file in ``where`` (the ``rule_file`` fixture, for other
    modules' tests that have a real exposition to run them on)."""
    path = where / "rules.yml"
    rules = [as_prometheus_rule(rule) for rule in grafana_rules().values()]
    path.write_text(yaml.safe_dump({"groups": [{"name": "anomaly", "interval": "1m", "rules": rules}]}))
    return path


def scraped_series(text: str) -> dict[str, float]:
    """A /metrics exposition as the series Prometheus stores from it (its job and instance labels added)."""
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            series[f"{sample.name}{{{SCRAPED}{',' if labels else ''}{labels}}}"] = sample.value
    return series


def test_a_real_service_with_a_broken_model_fires_that_alert_and_no_other(promtool, rule_file, model_dir, tmp_path):
    """The real /metrics of a service with one good and one broken model, scraped every minute for an hour: the
    load-failure alert fires for the broken model, every other rule stays quiet (a running service that scored
    a part is no excursion, no loss, no overload)."""
    models = tmp_path / "models"
    for name in ("part", "broken"):
        shutil.copytree(model_dir / "part", models / name)
    index = models / "broken" / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with TestClient(create_app(ServiceSettings(model_dir=models, reload_interval=0))) as c:
        part = png_bytes(textured_part(np.random.default_rng(5)))
        assert c.post("/score", files={"file": ("x.png", part)}).status_code == 200
        text = c.get("/metrics").text
    fires_on_scraped(promtool, rule_file, text, "anomaly-model-load-failed", [{"model": "broken"}])


# ------------------------------------------------------------------------------------------------ overload
def test_overload_fires_when_refusals_go_on(promtool, rule_file):
    expect(promtool, rule_file, {f"anomaly_overloaded_total{{{SCRAPED}}}": "0+3x30"},
           {("anomaly-overloaded", "4m"): [], ("anomaly-overloaded", "8m"): [{"instance": "api:8000"}]})


def test_overload_is_quiet_for_a_burst_and_for_a_restart(promtool, rule_file):
    """A burst of refusals in one minute (a batch of big photos at once) is under the rule's five minutes; a restart
    that takes the count back to 0 refused nothing."""
    burst = {f"anomaly_overloaded_total{{{SCRAPED}}}": "0x5 40x25",
             'anomaly_overloaded_total{job="anomaly",instance="api-2:8000"}': "50x5 0x25"}
    expect(promtool, rule_file, burst,
           {("anomaly-overloaded", at): [] for at in ("5m", "6m", "7m", "8m", "11m", "20m")})


# ------------------------------------------------------------------------------------------------ scrape target
def test_target_down_fires_when_a_replica_stays_down(promtool, rule_file):
    expect(promtool, rule_file, {f"up{{{SCRAPED}}}": "1x3 0x10"},
           {("anomaly-target-down", "5m"): [], ("anomaly-target-down", "7m"): [{"instance": "api:8000",
                                                                                "job": "anomaly"}]})


def test_target_down_is_quiet_for_a_restart_and_loud_with_no_replica_at_all(promtool, rule_file):
    """Down two minutes (a restart loading its models) is under the rule's three; a service with no replica
    left has no target and no `up` series at all (compose finds replicas by DNS), and that fires too."""
    expect(promtool, rule_file, {f"up{{{SCRAPED}}}": "1x3 0 0 1x10"},
           {("anomaly-target-down", at): [] for at in ("4m", "5m", "7m", "10m")})
    expect(promtool, rule_file, {'up{job="prometheus",instance="localhost:9090"}': "1x10"},
           {("anomaly-target-down", "2m"): [], ("anomaly-target-down", "5m"): [{"job": "anomaly"}]})


# ------------------------------------------------------------------------------------------------ anomaly rate
def decisions(model: str, anomaly: str, normal: str) -> dict[str, str]:
    return {f'anomaly_decisions_total{{{SCRAPED},model="{model}",decision="anomaly"}}': anomaly,
            f'anomaly_decisions_total{{{SCRAPED},model="{model}",decision="normal"}}': normal}


def test_anomaly_rate_excursion_fires_above_the_models_own_usual_rate(promtool, rule_file):
    """A day at 2 % flagged, then 40 %: fires for that model. A model whose usual rate is 20 % and stays there, one
    that had flagged nothing and now flags a fifth of its parts, and one with no traffic at all: the first and the
    last are quiet, the one that never flagged fires (its anomaly series is there at 0 from its first part)."""
    series = {**decisions("usual2", f"0+1x{DAY} {DAY}+20x40", f"0+49x{DAY} {49 * DAY}+30x40"),
              **decisions("usual20", f"0+10x{DAY + 40}", f"0+40x{DAY + 40}"),
              **decisions("never", f"0x{DAY} 0+10x40", f"0+50x{DAY} {50 * DAY}+40x40"),
              **decisions("idle", f"3x{DAY + 40}", f"90x{DAY + 40}")}
    expect(promtool, rule_file, series, {
        ("anomaly-rate-excursion", f"{DAY}m"): [],
        ("anomaly-rate-excursion", f"{DAY + 20}m"): [{"model": "usual2"}, {"model": "never"}],
        ("anomaly-rate-excursion", f"{DAY + 35}m"): [{"model": "usual2"}, {"model": "never"}]})


def test_anomaly_rate_excursion_is_quiet_for_a_restart_a_trickle_and_a_second_replica(promtool, rule_file):
    """A restart that takes both counts back to 0 changes no rate; a model that saw six parts in half an hour, three
    of them flagged, is under the rule's five flagged parts; two replicas sharing a model's parts at its usual rate
    are that rate."""
    series = {**decisions("restarted", f"0+1x{DAY} 0+1x40", f"0+49x{DAY} 0+49x40"),
              'anomaly_decisions_total{job="anomaly",instance="api-2:8000",model="restarted",decision="anomaly"}':
                  f"0+1x{DAY + 40}",
              'anomaly_decisions_total{job="anomaly",instance="api-2:8000",model="restarted",decision="normal"}':
                  f"0+49x{DAY + 40}"}
    expect(promtool, rule_file, series,
           {("anomaly-rate-excursion", f"{DAY + m}m"): [] for m in (5, 20, 35)})
    trickle = decisions("trickle", f"0x{DAY // 10} 1+1x3", f"0+2x{DAY // 10} {DAY // 5 + 1}+1x3")
    expect(promtool, rule_file, trickle, {("anomaly-rate-excursion", f"{DAY + 30}m"): []}, interval="10m")


# ------------------------------------------------------------------------------------------------ photos
def test_photos_not_kept_fires_for_an_hour_after_the_last(promtool, rule_file):
    expect(promtool, rule_file, {f'anomaly_record_files_not_stored_total{{{SCRAPED},reason="low_disk"}}':
                                 "0x10 4x80"},
           {("anomaly-photos-not-kept", "5m"): [],
            ("anomaly-photos-not-kept", "12m"): [{"instance": "api:8000", "reason": "low_disk"}],
            ("anomaly-photos-not-kept", "75m"): []})


# ------------------------------------------------------------------------------------------------ open files
def open_files(target: str, count: str, limit: str, served: bool = True) -> dict[str, str]:
    """A target's descriptors in use and its limit; ``served``: it is a replica of the service (its own gauge)."""
    series = {f"process_open_fds{{{target}}}": count, f"process_max_fds{{{target}}}": limit}
    return series | ({f"anomaly_models_loaded{{{target}}}": "1x40"} if served else {})


def test_open_files_near_the_limit_fires_for_a_replica_that_stays_there(promtool, rule_file):
    """A replica whose clients hold connections open past four fifths of its descriptor limit fires after the rule's
    five minutes, per replica: at the limit it accepts no connection and its parts wait."""
    expect(promtool, rule_file, {**open_files(SCRAPED, "15x5 900x35", "1024x40"),
                                 **open_files('job="anomaly",instance="api-2:8000"', "15x40", "1024x40")},
           {("anomaly-open-files-near-limit", "5m"): [], ("anomaly-open-files-near-limit", "9m"): [],
            ("anomaly-open-files-near-limit", "12m"): [{"instance": "api:8000"}],
            ("anomaly-open-files-near-limit", "30m"): [{"instance": "api:8000"}]})


def test_open_files_near_the_limit_is_quiet_for_a_burst_a_wide_limit_and_other_targets(promtool, rule_file):
    """Clients reconnecting at once (a line's restart) for under five minutes; a replica with as many descriptors
    open under a wider limit; Prometheus itself near its own limit (the standard process series are every
    target's): none fires."""
    expect(promtool, rule_file, {**open_files(SCRAPED, "15x5 1000x3 15x30", "1024x40"),
                                 **open_files('job="anomaly",instance="api-2:8000"', "900x40", "65536x40"),
                                 **open_files('job="prometheus",instance="localhost:9090"', "1000x40", "1024x40",
                                              served=False)},
           {("anomaly-open-files-near-limit", at): [] for at in ("7m", "9m", "12m", "30m")})


# ------------------------------------------------------------------------------------------------ exposition
def test_promtool_lints_the_real_metrics_of_a_running_service(promtool, server):
    """promtool check metrics reads the exposition a running `anomaly serve` gives after scoring a good and a bad
    part (every family then has samples) and finds nothing to say about format or naming."""
    url, _ = server
    rng = np.random.default_rng(11)
    for image in (textured_part(rng), add_defect(textured_part(rng), 60, 60)[0]):
        assert httpx.post(f"{url}/score", files={"file": ("x.png", png_bytes(image))}, timeout=60).status_code == 200
    text = httpx.get(f"{url}/metrics", timeout=60).text
    assert re.search(r'anomaly_decisions_total\{decision="anomaly"', text)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ dashboard
def test_the_process_panels_show_each_replica_of_the_service_and_no_other_target(promtool, tmp_path):
    """The dashboard's memory, open files and threads panels read the standard process names, which Prometheus
    itself and any other target scraped beside the service export too: each query keeps the targets that also
    export the service's own gauge, a line per replica, whatever the scrape's job is called (compose's ``anomaly``, a
    cluster's pod job)."""
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"] if "process_" in t["expr"]]
    ours = ['job="anomaly",instance="api:8000"', 'job="anomaly",instance="api-2:8000"',
            'job="kubernetes-pods",instance="10.1.0.7:8000"']
    others = ['job="prometheus",instance="localhost:9090"', 'job="grafana",instance="grafana:3000"']
    values = {"process_resident_memory_bytes": 9.5e8, "process_open_fds": 15, "process_threads": 18}
    series = {f"{name}{{{target}}}": f"{value}x10" for name, value in values.items() for target in ours + others}
    series |= {f"anomaly_models_loaded{{{target}}}": "1x10" for target in ours}
    cases = []
    for query in queries:
        [name] = re.findall(r"\bprocess_[a-z_]+", query)
        cases.append({"expr": query, "eval_time": "5m",
                      "exp_samples": [{"labels": f"{name}{{{target}}}", "value": values[name]} for target in ours]})
    assert {c["exp_samples"][0]["labels"].split("{")[0] for c in cases} == set(values)
    test = {"rule_files": [], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series.items()],
                       "promql_expr_test": cases}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = run_promtool(promtool, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
