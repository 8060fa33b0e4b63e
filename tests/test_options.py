"""The options table is the one list of allowed values: the config, the CLI and the settings all follow it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service import AnomalyModel, ConfigError, ModelConfig
from anomaly_service.cli import app
from anomaly_service.options import MODEL_OPTIONS, RUNTIME_OPTIONS, Option
from anomaly_service.settings import ServiceSettings


def test_every_config_field_has_exactly_one_entry():
    assert [f.name for f in dataclasses.fields(ModelConfig)] == list(MODEL_OPTIONS)
    ModelConfig().validate()  # the defaults are allowed values


def test_cli_and_settings_offer_the_table_choices():
    fit = app.commands["fit"]
    params = {p.name: p for p in fit.params}
    for name, option in {**MODEL_OPTIONS, **RUNTIME_OPTIONS}.items():
        if option.choices is not None and option.pattern is None:
            assert tuple(params[name].type.choices) == option.choices, name
    for name in ("knn_precision", "runtime"):
        schema = ServiceSettings.model_json_schema()["properties"][name]
        assert tuple(schema["enum"]) == RUNTIME_OPTIONS[name].choices


def test_cli_takes_the_defaults_of_the_settings_it_shares_with_the_service(monkeypatch):
    # the CLI restated "anomalies", 5 and "auto": a change to the service's default left `anomaly score` and
    # `anomaly update` on the old one
    import click

    from anomaly_service.artifact import DEFAULT_KEEP_VERSIONS
    from anomaly_service.cli.flags import keep_versions_option, model_dir_option, runtime_options, store_options

    assert ServiceSettings.model_fields["keep_versions"].default == DEFAULT_KEEP_VERSIONS
    backup = {p.name: p.default for p in app.commands["models"].commands["backup"].params}
    assert backup["model_dir"] == ServiceSettings.model_fields["model_dir"].default  # `models backup` said "models"
    changed = {"keep_images": "all", "keep_versions": 9, "device": "cpu", "knn_precision": "fp32", "runtime": "torch",
               "data_dir": "elsewhere", "model_dir": "other-models"}
    for name, value in changed.items():
        monkeypatch.setattr(ServiceSettings.model_fields[name], "default", value)
    wrap = [keep_versions_option, runtime_options, store_options(required=True, keep=True), model_dir_option]
    fn = lambda **kw: None  # noqa: E731
    for w in wrap:
        fn = w(fn)
    defaults = {p.name: p.default for p in click.command()(fn).params}
    assert {name: defaults[name] for name in changed} == changed


def test_the_manifest_accepts_the_table_choices_of_what_a_fit_did():
    from anomaly_service.manifest import TrainingInfo

    fields = TrainingInfo.model_fields
    assert fields["calibration"].annotation.__args__ == MODEL_OPTIONS["calibration"].choices
    assert fields["suspects_action"].annotation.__args__[0].__args__ == MODEL_OPTIONS["contamination"].choices


@pytest.mark.parametrize("name,value", [("threshold_sigma", math.inf), ("threshold_sigma", math.nan),
                                        ("sigma", -1.0), ("coreset_ratio", 0.0), ("coreset_ratio", 1.5),
                                        ("image_size", 16), ("k", 1.5), ("selection", "random"),
                                        ("image_score", "reweighted"), ("layer_balance", 1)])
def test_values_outside_the_table_are_refused_with_the_option_named(name, value):
    with pytest.raises(ConfigError, match=name):
        AnomalyModel(**{name: value})


def test_legacy_choices_only_when_loading():
    cfg = ModelConfig(selection="random")
    with pytest.raises(ConfigError):
        cfg.validate()
    cfg.validate(loading=True)


def test_device_accepts_cuda_n_and_refuses_the_rest():
    RUNTIME_OPTIONS["device"].check("device", "cuda:1")
    with pytest.raises(ConfigError, match="cuda:N"):
        RUNTIME_OPTIONS["device"].check("device", "tpu")
    with pytest.raises(ValueError, match="device"):
        ServiceSettings(device="tpu")


def test_cli_refuses_non_finite_threshold_before_any_work(tmp_path):
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(tmp_path), "--threshold-sigma", "inf",
                                   "--backbone", "efficientnet_lite0"])
    assert res.exit_code == 2
    assert "threshold_sigma must be a finite number" in res.output
    assert "Traceback" not in res.output


def test_option_descriptions_read_well():
    assert Option("x", low=0, high=1, low_open=True).describe() == "a finite number in (0, 1]"
    assert MODEL_OPTIONS["index"].describe() == "one of 'auto', 'flat', 'ivf', 'ivfpq'"


def test_every_service_setting_is_in_the_settings_table():
    """docs/service.md's table is where a plant engineer looks a setting up: each ANOMALY_* setting has its row (the
    drift settings had none)."""
    from pathlib import Path

    from anomaly_service.settings import ServiceSettings

    doc = (Path(__file__).resolve().parents[1] / "docs/service.md").read_text()
    rows = {line.split("|")[1] for line in doc.splitlines() if line.startswith("| `--")}
    for name in ServiceSettings.model_fields:
        flag, env = "--" + name.replace("_", "-"), f"ANOMALY_{name.upper()}"
        assert f" `{flag}` / `{env}` " in rows, f"{env} has no row in docs/service.md's settings table"


def test_every_error_code_the_service_answers_is_in_the_errors_table():
    """docs/service.md's errors table is the contract a dashboard or MES client codes against: every `error` code
    the service can answer has its row (no_drift_reference, unknown_version, internal_error and three more had
    none). Codes are read from the source, where each one is written once."""
    import re
    from pathlib import Path

    from anomaly_service.api.errors import CODE_FOR_STATUS, STATUS_FOR_KIND

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs/service.md").read_text()
    table = doc.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = " ".join(line.split("|")[2] for line in table.splitlines() if re.match(r"\| \d{3}(, \d{3})? \|", line))
    source = "\n".join(p.read_text() for p in (root / "anomaly_service").rglob("*.py"))
    answers = (r"(?:ApiError|CodedHTTPException|error_response|_send_error\(send,|_refuse\(scope, receive, send,)"
               r"\(?\s*\d{3},\s*\"([a-z_]+)\"")
    raised = set(re.findall(answers, source))
    raised |= set(re.findall(r"ErrorOut\(error=\"([a-z_]+)\"", source))  # the answers below the routes
    assert {"unknown_model", "overloaded", "internal_error", "invalid_request", "invalid_host", "shutting_down",
            "cors_refused", "cross_site_request", "invalid_request_id"} <= raised  # the patterns still read
    # client_closed_request is only logged (nobody receives it; the text under the table says so); 403 and 415 are
    # Starlette statuses no route answers (our 415s are not_image and unsupported_format)
    unanswered = {"client_closed_request", "forbidden", "unsupported_media_type"}
    for code in sorted((raised | set(CODE_FOR_STATUS.values())) - unanswered):
        assert f"`{code}`" in rows, f"error code {code!r} has no row in docs/service.md's errors table"
    # and the other way: a row's code is one the service answers (an upload's decoding kinds, RefusedOut's code)
    answered = raised | set(CODE_FOR_STATUS.values()) | set(STATUS_FOR_KIND) | {"update_refused"}
    assert set(re.findall(r"`([a-z_]+)`", rows)) <= answered


@pytest.mark.parametrize("extra", [["--calibration", "holdout"], ["--autoencoder", "features"]])
def test_contamination_drop_or_fail_without_leave_one_out_is_refused_before_any_work(tmp_path, extra):
    """The guard reads the leave-one-out scores: with a held-out threshold it never ran, so --contamination fail let
    a defective part in the good folder into the bank and the fit ended as if it had checked. A saved model that
    says so still loads (the option only mattered at its fit)."""
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(good / f"{i}.png")
    res = CliRunner().invoke(app, ["fit", "--normal-dir", str(good), "--out", str(tmp_path / "m"), "--backbone",
                                   "efficientnet_lite0", "--contamination", "fail", *extra])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--contamination fail needs the leave-one-out threshold" in res.output and extra[0] in res.output
    assert not (tmp_path / "m").exists()
    ModelConfig(contamination="drop", calibration="holdout").validate(loading=True)


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        yield path + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))


def test_every_cli_choice_and_every_settings_literal_reads_the_table():
    """A choice list a command or a setting spells out itself (records export's --format, serve's --log-level and
    --log-format) is a second list to keep in step: each is an entry of the options table."""
    import typing

    import click

    from anomaly_service.options import SERVICE_OPTIONS

    tables = {**MODEL_OPTIONS, **RUNTIME_OPTIONS, **SERVICE_OPTIONS}
    offered = {option.choices for option in tables.values() if option.choices is not None}
    own = []
    for path, command in _commands(app):
        for param in command.params:
            if isinstance(param.type, click.Choice) and tuple(param.type.choices) not in offered:
                own.append(f"anomaly {' '.join(path)} {param.opts[0]} {tuple(param.type.choices)}")
    for name, field in ServiceSettings.model_fields.items():
        literal = [a for a in (field.annotation, *typing.get_args(field.annotation))
                   if typing.get_origin(a) is typing.Literal]
        if literal and (name not in tables or typing.get_args(literal[0]) != tables[name].choices):
            own.append(f"ServiceSettings.{name} {typing.get_args(literal[0])}")
    assert not own, "choices spelt out beside the options table: " + "; ".join(own)


def test_healthcheck_asks_the_port_the_service_listens_on_by_default(monkeypatch):
    """healthcheck wrote its own 8000 beside the service's default port: a change to the setting's default left the
    container's probe knocking on the old port."""
    import http.server
    import threading

    asked = []

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("ANOMALY_PORT", raising=False)
        monkeypatch.setattr(ServiceSettings.model_fields["port"], "default", server.server_address[1])
        res = CliRunner().invoke(app, ["healthcheck", "--timeout", "5"])
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 0 and res.output.strip() == "ok", res.output
    assert asked == ["/healthz"]


def test_the_stage_objects_default_to_the_config():
    """A stage object built directly (the benchmarks build them) had defaults of its own: KnnScorer searched an ivf
    bank with 8 lists where a fitted model probes ModelConfig's 32, and built a flat index where the config says auto.
    Each default that stands for a config field is that field's."""
    import inspect

    from anomaly_service.anomaly_map import anomaly_map
    from anomaly_service.autoencoder import ReconstructionScorer
    from anomaly_service.decision import Decision, fuse
    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.scoring import image_score, patch_scores

    config = ModelConfig()
    same_name = {"index_kind": "index", "rule": "fusion", "weight": "fusion_weight", "mode": "image_score"}
    checked = 0
    for fn in (KnnScorer.__init__, Decision.__init__, ReconstructionScorer.__init__, ReconstructionScorer.from_bytes,
               anomaly_map, fuse, image_score, patch_scores):
        for name, param in inspect.signature(fn).parameters.items():
            field = same_name.get(name, name)
            if param.default is not inspect.Parameter.empty and hasattr(config, field):
                assert param.default == getattr(config, field), f"{fn.__qualname__}({name}={param.default!r})"
                checked += 1
    assert checked >= 14
