"""``anomaly serve`` and ``anomaly healthcheck``: the HTTP service and the probe a container runs against it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..errors import validation_message
from .flags import serve_options, setting_default
from .group import app
from .shell import fail, friendly, temporary_directory_usable


@app.command()
@serve_options
@friendly
def serve(**flags: Any) -> None:
    """Run the HTTP scoring service over every model under --model-dir (see docs/service.md)."""
    from pydantic import ValidationError

    from ..api import create_app
    from ..api.server import serve as run_service
    from ..settings import ServiceSettings

    temporary_directory_usable()
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = ServiceSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid setting {_named(first['loc'], given)}: {validation_message(first)}")
        return
    from ..images import admit_in_pillow

    admit_in_pillow(settings.max_pixels)  # the service's process is its own: Pillow's checks agree with ours
    # the group configured the root logger for CLI use (warnings only); the service's own lines (serving,
    # loaded, directory changed) must show at the level the operator chose
    logging.getLogger("anomaly_service").setLevel(settings.log_level.upper())
    if settings.log_format == "json":
        from ..api.logs import use_json_lines

        use_json_lines()
    if not _model_dir_there(settings.model_dir, settings.load_timeout):
        from ..spellings import spelling_hint

        fail(f"model directory {settings.model_dir} does not exist" + (
            spelling_hint(settings.model_dir)
            or f"; fit a model first (anomaly fit --normal-dir DIR --out {settings.model_dir}/NAME)"))
    app = create_app(settings, load_in_background=True)  # /healthz answers while the models load
    # connection limits and timeouts (head, keep-alive, concurrency) and the stop delay come with the settings:
    # api/server.py
    run_service(app, settings)


def _model_dir_there(model_dir: Path, bound: float) -> bool:
    """Whether the model directory is there, looked at within --load-timeout: on a share whose stat hangs the look
    held the start before the port opened, and no signal could stop it. One that does not answer counts as there
    (said once, stuck_io): the service starts, and loads its models once it answers."""
    from ..stuck_io import LISTING, StorageStuck, StorageWork

    try:
        return bool(StorageWork(bound).run(LISTING, "looking for it at start-up", model_dir.is_dir))
    except StorageStuck:
        return True


def _named(loc: tuple, given: dict[str, Any]) -> str:
    """A setting as the operator set it: its flag when given, else its environment variable. The field name alone
    left them to guess where a bad value came from (a ConfigMap, a unit file, the command line)."""
    name = ".".join(map(str, loc))
    if not loc:
        return "(settings)"
    field = str(loc[0])
    return f"{name} ({'--' + field.replace('_', '-') if field in given else 'ANOMALY_' + field.upper()})"


@app.command()
@click.option("--url", default=None, help="Default: http://127.0.0.1:$ANOMALY_PORT/healthz (the port "
              f"`anomaly serve` listens on: {setting_default('port')} unless set).")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def healthcheck(url: str | None, timeout: float) -> None:
    """Exit 0 if the local service answers /healthz (for container HEALTHCHECKs: no curl needed)."""
    import os
    import urllib.error
    import urllib.request

    url = url or f"http://127.0.0.1:{os.environ.get('ANOMALY_PORT', setting_default('port'))}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a local URL we build
            ok = r.status == 200
    except (urllib.error.URLError, OSError) as exc:
        fail(f"{url}: {exc}", 1)
        return
    if not ok:
        fail(f"{url}: status {r.status}", 1)
    click.echo("ok")
