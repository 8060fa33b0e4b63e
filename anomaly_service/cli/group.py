"""The ``anomaly`` command group: logging for a terminal, warnings nobody can act on kept quiet, and threads sized to
the CPU quota, before any command."""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import sys
import warnings
from typing import Any, Callable, Iterator

import click

from .anomalib_names import message as anomalib_message


class TerminalFormatter(logging.Formatter):
    """A library warning as the commands' own are written (``warning: ...``): ``WARNING anomaly_service.evaluate:``
    in front of one, beside the command's ``warning:`` lines, read as another kind of message. ``-v`` keeps the
    level and the module, for a report of a fault."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.message}"


class OneLineError(click.ClickException):
    """A usage error said as every other bad input is: one ``error: ...`` line and exit code 2. Click's own was the
    usage, a hint and ``Error: ...`` on three lines, which a script looking for ``error:`` did not see."""

    def __init__(self, exc: click.ClickException, command_path: str | None = None):
        ctx = getattr(exc, "ctx", None)
        # click's parser raises "requires an argument" without its context: the caller names the command then
        command_path = ctx.command_path if ctx is not None else command_path
        hint = f"; see '{command_path} --help'" if command_path else ""
        # anomalib's spelling of a flag or backbone is answered with what stands for it here
        said = anomalib_message(exc) or exc.format_message()
        super().__init__(said.rstrip(".") + hint)
        self.exit_code = exc.exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@contextlib.contextmanager
def _one_line(command_path: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    try:
        yield
    except (OneLineError, *_HELP_ERRORS):  # a command given no arguments shows its help, as it should
        raise
    except click.ClickException as exc:
        raise OneLineError(exc, command_path()) from exc


_HELP_ERRORS = tuple(e for e in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if e is not None)


_START = "anomaly.start"  # the group's start-up work for the command it invokes, kept in the context's meta


class Command(click.Command):
    """A command that runs the start-up work its group left it (:func:`app`) once its own flags have parsed, so
    ``--help`` and a misspelt flag answer at once rather than after seconds of importing torch."""

    def invoke(self, ctx: click.Context) -> Any:
        start = ctx.meta.pop(_START, None)
        if start is not None:
            start(ctx.info_name)
        return super().invoke(ctx)


class Commands(click.Group):
    """The group that parses every command's flags: their usage errors, and those a command raises as
    ``click.BadParameter``, come out as one line (:class:`OneLineError`)."""

    command_class = Command
    group_class = type  # ``anomaly db`` and ``anomaly records`` parse their commands' flags the same way

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _one_line(lambda: info_name):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line(lambda: _invoked_path(ctx)):
            return super().invoke(ctx)


def _invoked_path(ctx: click.Context) -> str | None:
    """The path of the command ``ctx``'s group was invoking, which an error raised without a context came from."""
    sub = ctx.invoked_subcommand
    return f"{ctx.command_path} {sub}" if sub else ctx.command_path


# Commands that run no network and score nothing: their start skips torch's thread set-up, which imported torch
# (seconds and hundreds of MB) for a container's health probe every few seconds and for a database command
NO_NETWORK = frozenset({"healthcheck", "db", "records"})
# Commands that need a temporary directory (shell.temporary_directory_usable): checked before torch is imported,
# so a misspelt TMPDIR is one line at once
NEEDS_TMPDIR = frozenset({"serve", "fit", "evaluate", "score", "update"})
# Commands whose log keeps the library's records that the others say again in their own words
# (progress.RESTATED_BY_CLI)
RESTATE_NOTHING = frozenset({"serve"})


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anomaly-service")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def app(verbose: bool) -> None:
    """Industrial visual anomaly detection: fit on good parts, score new photos, get heatmaps."""
    from ..progress import RESTATED_BY_CLI

    ctx = click.get_current_context(silent=True)  # none when a program sets its logging up as the group does
    # the service restates nothing: with the filter below its log said nothing of the images an HTTP update
    # skipped, left out or still flags (only the answer to the client did)
    restates = ctx is None or ctx.invoked_subcommand not in RESTATE_NOTHING
    before = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in set(logging.getLogger().handlers) - before:  # ours only: what a command restates is said once
        if restates:
            handler.addFilter(lambda record: not getattr(record, RESTATED_BY_CLI, False))
        if not verbose:
            handler.setFormatter(TerminalFormatter())
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from ..images import quiet_pillow_tag_warnings

    quiet_pillow_tag_warnings()  # a broken EXIF tag is read as absent: Pillow's complaint only garbles the output
    if ctx is None:
        _start(None)
    elif ctx.invoked_subcommand not in NO_NETWORK:
        ctx.meta[_START] = _start  # run by the command once its flags have parsed (Command)


def _start(command: str | None) -> None:
    """A network command's start: its temporary directory checked, then torch's threads fitted to the CPU quota
    (containers: as many threads as the quota, not the host's cores), which imports torch."""
    if command in NEEDS_TMPDIR:
        from .shell import friendly, temporary_directory_usable

        friendly(temporary_directory_usable)()
    from ..parallelism import fit_threads_to_cpu_quota

    fit_threads_to_cpu_quota()


def main() -> None:
    # a file name that is not UTF-8 (another code page) is read as lone surrogates, which a strict UTF-8 stdout
    # (a UTF-8 locale other than C.UTF-8) refused mid-run with a traceback: write its bytes back as they came. A
    # stdout in another encoding (LANG=de_DE, ISO-8859-1, on an older plant host) refused every name it cannot
    # spell (a reviewer named in Chinese in `versions --history`): those are written as \u escapes
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        utf8 = codecs.lookup(sys.stdout.encoding).name == "utf-8"
        sys.stdout.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
    # Pillow warns of a header's pixel count past its own limit, which is above ours: a photo refused by ours got
    # Python's raw two-line warning in a cron log beside the one line that names it. Once, before any thread runs.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image")
    app()
