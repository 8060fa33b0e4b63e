"""Click options built from the tables the config and settings read (options.py, settings.py): one list of
allowed values for every surface."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Callable

import click


def table_option(name: str, option: Any, default: Any, **extra: Any) -> Callable:
    """A click option built from the options table (options.py): the one list of allowed values. ``help`` in
    ``extra``: the command's own words for it (update's --contamination), else the table's."""
    flag = "--" + name.replace("_", "-")
    extra.setdefault("help", option.help)
    if option.boolean:
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=default, show_default=True,
                            **extra)
    if option.choices is not None and option.pattern is None:
        kind: Any = click.Choice(list(option.choices))
    elif option.regex:
        kind, extra = str, {"metavar": "REGEX", **extra}
    else:
        kind = int if option.integer else (float if option.choices is None else str)
    # ranges are checked by the same table when the model or settings are built: one message for every surface
    return click.option(flag, name, type=kind, default=default, show_default=default is not None, **extra)


def setting_default(name: str) -> Any:
    """The service's default of a setting that the CLI offers too: one default, so ``anomaly score`` runs and
    records as ``anomaly serve`` does unless told otherwise."""
    from ..settings import ServiceSettings

    return ServiceSettings.model_fields[name].default


def runtime_options(fn: Callable) -> Callable:
    """How a model runs on this machine (not saved with it): device, kNN precision, backbone runtime."""
    from ..options import RUNTIME_OPTIONS

    for name in reversed(RUNTIME_OPTIONS):
        fn = table_option(name, RUNTIME_OPTIONS[name], setting_default(name))(fn)
    return click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Local backbone weights file (air-gapped machines); otherwise download + cache.")(fn)


def fit_options(fn: Callable) -> Callable:
    """Every fit option of the options table, shared by ``fit`` and ``evaluate``; defaults from ModelConfig."""
    import dataclasses

    from ..config import ModelConfig
    from ..options import MODEL_OPTIONS

    defaults = ModelConfig()
    # a bare --autoencoder means the feature autoencoder
    extra = {"autoencoder": {"is_flag": False, "flag_value": "features"}, "mask": {"metavar": "FILE|auto"}}
    for f in reversed(dataclasses.fields(ModelConfig)):
        fn = table_option(f.name, MODEL_OPTIONS[f.name], getattr(defaults, f.name), **extra.get(f.name, {}))(fn)
    return runtime_options(fn)


def update_contamination_option(fn: Callable) -> Callable:
    """``update --contamination``: the fit's option (its choices and default from the options table and ModelConfig),
    applied to the added good images the updated model still flags, the update's own outliers."""
    from ..config import ModelConfig
    from ..options import MODEL_OPTIONS

    return table_option("contamination", MODEL_OPTIONS["contamination"], ModelConfig().contamination,
                        help="Added good images the updated model still flags (what it could not teach; a "
                        "defective part marked good is learnt like any other: --defects guard against that): "
                        "warn adds them and lists them, drop updates without them, fail refuses the update and "
                        "leaves the model as it was.")(fn)


def keep_versions_option(fn: Callable) -> Callable:
    return click.option("--keep-versions", type=click.IntRange(min=0), default=setting_default("keep_versions"),
                        show_default=True, help="Earlier versions kept under <dir>/.versions/<name>/ when this "
                        "replaces a model (0: an update or re-fit deletes the version it replaces and leaves the "
                        "archive as it is; a rollback keeps 1, so that it can be undone).")(fn)


def model_dir_option(fn: Callable) -> Callable:
    """``--model-dir``: the directory the service serves, with the service's default and environment variable."""
    return click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=setting_default("model_dir"), show_default=True, envvar="ANOMALY_MODEL_DIR",
                        help="The directory the service serves models from.")(fn)


def audit_options(fn: Callable) -> Callable:
    """Who changes a model and why, for its change log (model_history.py)."""
    fn = click.option("--note", default=None, help="Why: kept in the model's change log (anomaly versions "
                      "--history).")(fn)
    return click.option("--by", default=None, help="Who makes this change, for the model's change log "
                        "[default: the system user]")(fn)


def store_options(required: bool, keep: bool = False, when_given: str = "recording is on when given") -> Callable:
    """Where records are: --data-dir (SQLite + files) and/or --database-url, as the service's settings;
    ``when_given``: what an optional --data-dir does for the command."""

    def wrap(fn: Callable) -> Callable:
        from ..options import SERVICE_OPTIONS

        option = SERVICE_OPTIONS["keep_images"]
        if keep:
            fn = click.option("--keep-images", type=click.Choice(list(option.choices or ())),
                              default=setting_default("keep_images"),
                              show_default=True, help=option.help)(fn)
        fn = click.option("--database-url", envvar="ANOMALY_DATABASE_URL", default=None,
                          help="Records database (postgresql+psycopg://...); default SQLite under --data-dir. "
                               "[env ANOMALY_DATABASE_URL]")(fn)
        return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                            envvar="ANOMALY_DATA_DIR" if required else None,
                            default=setting_default("data_dir") if required else None,
                            show_default=required, help="Records' directory: SQLite file and stored pictures"
                            + (" [env ANOMALY_DATA_DIR]" if required else f"; {when_given}"))(fn)

    return wrap


def _click_type(annotation: Any) -> Any:
    """The click type of a setting's annotation, so ``serve --help`` shows what a flag takes (the choices of one
    of the options table's ``Literal`` values, a number where ``None`` means "not set"); the settings validate."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in args])
    base = args[0] if len(args) == 1 else annotation  # X | None
    return base if base in (int, float) else str


def serve_options(fn: Callable) -> Callable:
    """One flag per ServiceSettings field; unset flags fall back to ANOMALY_* environment variables."""
    from ..settings import ServiceSettings

    for name, f in reversed(list(ServiceSettings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind = _click_type(f.annotation)
        env = f"ANOMALY_{name.upper()}"
        default = f.default if f.default is not None and not callable(f.default_factory) else None
        help_ = f"{f.description or ''} [env {env}" + (f"; default {default}]" if default is not None else "]")
        fn = click.option(flag, name, type=kind, default=None, help=help_.strip())(fn)
    return fn
