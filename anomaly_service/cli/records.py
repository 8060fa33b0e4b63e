"""``anomaly db`` and ``anomaly records``: the inspection records database, opened as each command needs it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError
from ..options import SERVICE_OPTIONS
from ..whole_file import open_beside, sync_and_rename
from .flags import store_options
from .group import app
from .shell import fail, friendly, sigterm_stops, writable_dir

if TYPE_CHECKING:  # SQLAlchemy is imported only by the commands that open the records
    from ..records.recorder import Recorder
    from ..records.store import RecordStore


def open_store(data_dir: Path | None, database_url: str | None, mode: str = "write",
               flag: str = "--data-dir") -> RecordStore:
    """The records store, as a command needs it: ``write`` (scoring records: created or upgraded to this release's
    schema), ``read`` (export, an update's reviewed defects: an existing database at this release's schema, never
    created or migrated as a side effect) or ``admin`` (``db upgrade``, which migrates it itself). Every failure is
    one line. ``flag``: the option that named ``data_dir``, as the error asks after it (``db copy``'s
    ``--from-data-dir``: asked after ``--data-dir``, which that command has not)."""
    from ..records.store import SQLITE_FILE, RecordStore, SchemaError, redact, unescaped_database

    where = redact(database_url) if database_url else str(data_dir)
    try:
        # with --database-url the directory holds only pictures, which an export does not read (a plant trial:
        # export from PostgreSQL failed on the default --data-dir that did not exist where it ran)
        if mode == "read" and data_dir is not None and database_url is None and not (
                Path(data_dir) / SQLITE_FILE).is_file() and unescaped_database(Path(data_dir)) is None:
            from ..spellings import spelling_hint

            raise ConfigError(f"no records database under {data_dir}{spelling_hint(Path(data_dir))} (is the "
                              f"{flag} right? scoring with it creates one)")
        store = RecordStore.open(database_url, data_dir)
        if mode == "write":
            store.upgrade()
        elif mode == "read":
            check_schema(store)
    except (ConfigError, SchemaError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - unreachable database, bad URL: one line, no traceback
        raise records_failure(where, exc) from None
    return store


def records_failure(where: str, exc: BaseException) -> ConfigError:
    """One line for a records database that cannot be reached or read: where, and the first line of why."""
    return ConfigError(f"records database {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def check_schema(store: Any) -> None:
    """A database to read must be at this release's schema: an older one is upgraded by ``anomaly db upgrade``
    (its owner decides when), a newer one is another release's. A role that may not read the schema's version
    (a read-only reporting role) is let through: its queries say what they cannot read."""
    from sqlalchemy.exc import ProgrammingError

    try:
        current = store.current_revision()
    except ProgrammingError:
        return
    head = store.head_revision()
    if (refused := store.schema_refusal(current, f"this release reads {head}")) is not None:
        raise ConfigError(str(refused))
    if current != head:
        raise ConfigError(f"the records database is at schema {current or 'empty'}, this release reads {head}: "
                          "run `anomaly db upgrade` first")


def cli_recorder(data_dir: Path | None, database_url: str | None, keep_images: str) -> Recorder | None:
    if data_dir is None and database_url is None:
        return None
    from ..records.recorder import Recorder

    if data_dir is not None:
        not_as_root_in(data_dir)
    if data_dir is None and keep_images != "none":  # the rows go to the database, the pictures to a directory
        click.echo(f"warning: --database-url without --data-dir keeps no pictures (--keep-images {keep_images}): "
                   "give the service's --data-dir to keep them, and let recorded defects guard an update", err=True)

    recorder = Recorder(open_store(data_dir, database_url), keep_images)
    recorder._schema_ready = True
    recorder.start()
    return recorder


def not_as_root_in(data_dir: Path) -> None:
    """Refuse to record as root into a data directory another user owns (the service's): the database, its lock
    and the picture directories this run made were root's, and the service, writing as its own user, could then
    record nothing (a read-only database) or keep no picture in a directory root made. Unlike a restore, a scoring
    run writes for as long as it runs, beside a service that may be writing too, so it is run as that user."""
    if os.geteuid() != 0:
        return
    from ..records.backup import existing_ancestor

    uid = existing_ancestor(Path(data_dir).absolute()).stat().st_uid
    if uid == 0:
        return
    import pwd

    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a container's user with no entry here
        user = f"#{uid}"
    raise ConfigError(f"{data_dir} belongs to user {user} (the service's): record as that user (`sudo -u {user} "
                      "anomaly score ...`); run as root, the records and pictures written there would be root's, "
                      "and the service could no longer write its own")


def record_cli(recorder: Any, model_path: Path, version: str, path: Path, res: Any, shown: list[Any],
               place: Any = None, image: Any = None) -> str | None:
    """Record one scored image with the regions it was shown with (``shown``: the verdict's), its place on the
    image map (``place``: the verdict's ``embedding``, as ``--json`` prints it) and, where its picture is kept, the
    digest of its pixels (``image``: the photo as the model read it) under the version id
    of the model that scored it (``version``); returns the id it is recorded under (None: the recorder had stopped),
    which the output names as the API's ``inspection_id`` does."""
    from ..images import path_text
    from ..records.recorder import PartContext, PendingRecord
    from ..rescore import part_id

    keep = recorder.keeps(res.is_anomaly)
    # a file's name may be longer than the part id column (a file system's longest name, and an escape for each
    # byte that is not UTF-8): PostgreSQL refused such a record, and SQLite kept one no `db copy` could take to
    # PostgreSQL. Its head and a hash of the whole then, as a re-scoring run names a long archive key, and the whole
    # name in the meta
    name = path_text(path.name)
    short = part_id(name)
    context = PartContext(part_id=short, meta={"file_name": name} if short != name else None)
    data = path.read_bytes()
    regions = [r.to_dict() for r in shown]
    pending = PendingRecord(
        data=data, model=Path(model_path).resolve().name, model_version=version, score=float(res.score),
        normalized_score=float(res.normalized_score), threshold=float(res.threshold), is_anomaly=bool(res.is_anomaly),
        regions=regions, image_width=res.image_width, image_height=res.image_height,
        timing_ms={k: round(v, 3) for k, v in res.timing_ms.items()}, context=context,
        warnings=list(res.warnings), scorers=res.scorers or None, scored_with=res.scored_with, embedding=place,
        normalized_map=res.normalized_map if keep else None, pixels=image if keep else None, source="cli")
    return pending.id if recorder.submit_wait(pending) else None


@app.group()
def db() -> None:
    """The inspection records database."""


@db.command("upgrade")
@store_options(required=True)
@friendly
def db_upgrade(data_dir: Path, database_url: str | None) -> None:
    """Create the records database, or upgrade an older one to this release's schema (never recreated)."""
    from ..records.backup import hand_over_database, make_owned_dir
    from ..records.store import SQLITE_FILE, SchemaError, redact

    if database_url is None:  # run with sudo ahead of a rollout: what it makes is the service's, as a restore's is
        try:
            make_owned_dir(data_dir)
        except OSError as exc:
            raise ConfigError(f"cannot make {data_dir}: {exc.strerror or exc}") from None
        target = Path(data_dir) / SQLITE_FILE
        if os.geteuid() == 0 and target.is_symlink() and not target.exists():  # the service's user's link: as
            # root, SQLite made a database where it pointed, anywhere on the host (an /etc/nologin)
            raise ConfigError(f"{target} is a link to {os.readlink(target)}, which does not exist: nothing made "
                              "there; remove the link, or make the database it names first")
    store = open_store(data_dir, database_url, "admin")
    try:
        try:
            before, after = store.upgrade()
            if database_url is None:
                hand_over_database(data_dir)
        except SchemaError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - unreachable database, no such database: one line, no traceback
            raise records_failure(redact(store.url), exc) from None
        click.echo(f"{redact(store.url)}: schema {before or 'empty'} -> {after}" if before != after else
                   f"{redact(store.url)}: schema {after}, up to date")
    finally:
        store.close()


@db.command("downgrade")
@click.option("--to", "revision", required=True, metavar="REVISION",
              help="The schema revision the earlier release reads (its error names it; `db upgrade` printed it)")
@click.option("--yes", is_flag=True, help="Do not ask: what is lost is printed all the same")
@store_options(required=True)
@friendly
def db_downgrade(revision: str, yes: bool, data_dir: Path, database_url: str | None) -> None:
    """Take the records database back to an earlier release's schema, keeping every record it can hold: for going
    back to that release without restoring a backup (which loses the records made since). Stop every service of
    this release that uses the database first: one started again upgrades it back."""
    from ..records.backup import BackupError, hand_over_database, no_service_in
    from ..records.store import SQLITE_FILE, SchemaError, redact

    if database_url is None and not (Path(data_dir) / SQLITE_FILE).is_file():  # before a store is opened: as root
        # it made the directory and an empty database, root's, which the service could then not write
        raise ConfigError(f"no records database under {data_dir} (is the --data-dir right?): nothing to downgrade")
    store = open_store(data_dir, database_url, "admin")
    try:
        try:
            plan = store.downgrade_plan(revision)
        except SchemaError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - unreachable database: one line, no traceback
            raise records_failure(redact(store.url), exc) from None
        if not plan:
            click.echo(f"{redact(store.url)}: schema {revision} already, nothing to undo")
            return
        click.echo(f"{redact(store.url)}: schema {plan[0][0]} -> {revision} loses:")
        for undone, loses in plan:
            click.echo(f"  {undone}: {loses}")
        if not yes:
            click.confirm("Take a backup first (`anomaly db backup`, pg_dump). Downgrade now?", abort=True)
        try:
            with no_service_in(data_dir, "downgrade") if database_url is None else contextlib.nullcontext():
                before, after = store.downgrade(revision)
                if database_url is None:  # run with sudo: the service goes on writing the file as its own user
                    hand_over_database(data_dir)
        except BackupError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the database went away meanwhile: one line, no traceback
            raise records_failure(redact(store.url), exc) from None
        click.echo(f"{redact(store.url)}: schema {before} -> {after}; start the earlier release now (this one "
                   "upgrades it again when it starts)")
    finally:
        store.close()


@db.command("backup")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The backup file (SQLite); written atomically, so a failed backup never replaces an earlier one")
@store_options(required=True)
@friendly
def db_backup(out: Path, data_dir: Path, database_url: str | None) -> None:
    """Copy the SQLite records database while the service runs (one consistent snapshot, checked). The stored
    pictures are plain files: copy --data-dir's other folders after it. PostgreSQL: use pg_dump."""
    import shlex

    from ..records.backup import BackupError, backup
    from ..records.store import libpq_url, redact

    if database_url:
        target = libpq_url(database_url)
        target = shlex.quote(target) if target else "<url>"  # a URL's ? and & would split the command in a shell
        raise ConfigError(f"{redact(database_url)} is PostgreSQL: back it up with its own tools, e.g. "
                          f"`pg_dump --format=custom --file records.dump {target}` (it asks for the password or "
                          "reads ~/.pgpass; restore: pg_restore), or the base backups your database service takes")
    try:
        info = backup(data_dir, out)
    except BackupError as exc:
        raise ConfigError(str(exc)) from None
    click.echo(f"{info.path}: {info.records} inspections, {info.reviews} reviews, schema {info.schema}, "
               f"{info.bytes / 1e6:.1f} MB in {info.seconds:.1f} s")


@db.command("restore")
@click.option("--from", "backup_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A file made by `anomaly db backup`")
@store_options(required=True)
@friendly
def db_restore(backup_file: Path, data_dir: Path, database_url: str | None) -> None:
    """Make a backup the records database of --data-dir (the service stopped). The database it replaces is kept
    beside it; an older backup is upgraded when the service starts."""
    import shlex

    from ..records.backup import BackupError, restore
    from ..records.store import RecordStore, libpq_url, redact

    if database_url:
        target = libpq_url(database_url)
        target = shlex.quote(target) if target else "<url>"
        # into a database a service already made its tables in, pg_restore fails on each and restores nothing
        raise ConfigError(f"{redact(database_url)} is PostgreSQL: restore it with its own tools, into an empty "
                          f"database before any service starts on it: `pg_restore --no-owner --dbname {target} "
                          "records.dump` (with every service stopped, --clean --if-exists replaces what is there)")
    try:
        # not a store of data_dir: opening one made the directory, as root before the restore could hand it over
        info = restore(backup_file, data_dir, RecordStore.known_revisions())
    except BackupError as exc:
        raise ConfigError(str(exc)) from None
    click.echo(f"{info.path}: restored {info.records} inspections, {info.reviews} reviews (schema {info.schema}) "
               f"from {backup_file}")
    if os.geteuid() == 0 and info.path.stat().st_uid == 0:  # nothing there named another user to give it to
        click.echo(f"note: {data_dir} and the restored database are root's, as the directory they are in: a service "
                   f"that runs as its own user cannot record there until `chown -R USER {data_dir}`", err=True)


@db.command("copy")
@click.option("--from-data-dir", "from_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The records' directory copied from: its SQLite file (without --from-database-url) and its "
                   "stored pictures")
@click.option("--from-database-url", "from_url", metavar="URL",
              help="The records database copied from, where it is not the SQLite file of --from-data-dir")
@click.option("--to-data-dir", "to_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The records' directory copied to: its SQLite file (without --to-database-url) and the stored "
                   "pictures (with --to-database-url: the replicas' shared picture volume)")
@click.option("--to-database-url", "to_url", metavar="URL",
              help="The records database copied to (postgresql+psycopg://...): made or upgraded as a service "
                   "starting on it would")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar")
@friendly
@sigterm_stops  # under `timeout` or a supervisor's stop: the picture under way and the database it made cleaned up
def db_copy(from_dir: Path | None, from_url: str | None, to_dir: Path | None, to_url: str | None,
            quiet: bool) -> None:
    """Copy the inspection records, their reviews and their stored pictures into another records database: one
    host's SQLite into the PostgreSQL that several replicas share, or back. Inspections already there are skipped,
    so a copy stopped part way is finished by running it again. Stop the service recording into the source first:
    reviews made after its inspection was copied are not copied. Neither side's environment is read: both are
    named here."""
    from ..progress import progress_bar
    from ..records.backup import make_owned_dir
    from ..records.copy import CopyError, copy_records, count
    from ..records.store import redact

    if from_dir is None and not from_url:
        raise ConfigError("name the records to copy: --from-data-dir DIR (its SQLite file and pictures) and/or "
                          "--from-database-url URL")
    if to_dir is None and not to_url:
        raise ConfigError("name where to copy them: --to-database-url URL (and --to-data-dir for the pictures) or "
                          "--to-data-dir DIR (its SQLite file)")
    if from_dir is not None and not Path(from_dir).is_dir():
        raise ConfigError(f"no directory {from_dir} (is the --from-data-dir right?)")
    if to_dir is not None:  # run with sudo: what it makes is the service's, as a restore's is
        make_owned_dir(to_dir)
    try:  # both sides' refusals read alike ("the records database is at schema ..."): which one is said
        source = open_store(from_dir, from_url, "read", flag="--from-data-dir")
    except ConfigError as exc:
        raise ConfigError(f"the source: {exc}") from None
    try:
        dest = open_store(to_dir, to_url, "admin")
        try:
            where = f"{redact(source.url)} -> {redact(dest.url)}"
            with progress_bar(not quiet, total=count(source), desc="copying records", unit="record") as bar:
                try:
                    info = copy_records(source, dest, step=bar.update)
                except CopyError as exc:
                    raise ConfigError(str(exc)) from None
                except Exception as exc:  # noqa: BLE001 - a database gone meanwhile: one line, no traceback
                    raise records_failure(where, exc) from None
        finally:
            if to_dir is not None and not to_url:  # run with sudo and stopped part way too: the database it made,
                # and the pictures' lock, are the service's, or it records nothing until a run completes
                from ..records.backup import hand_over_database

                hand_over_database(to_dir)
            dest.close()
    finally:
        source.close()
    click.echo(f"{where}: {info.inspections} inspections copied with {info.reviews} reviews, {info.already} already "
               f"there; {info.pictures} pictures copied, {info.pictures_there} already there, in {info.seconds:.1f} s")
    if info.upgraded is not None:
        click.echo(f"note: the destination's records database was upgraded from schema revision {info.upgraded[0]} "
                   f"to {info.upgraded[1]} (this release's): a service of an older release refuses it from its next "
                   "start; run this release there", err=True)
    if info.refused:  # the rest went in; each of these is refused again by every run until its value fits
        shown = "; ".join(f"{rid}: {why}" for rid, why in info.refused[:5])
        more = f" (and {len(info.refused) - 5} more)" if len(info.refused) > 5 else ""
        click.echo(f"error: {len(info.refused)} inspections the destination refused were not copied, the others "
                   f"were: {shown}{more}", err=True)
    if info.pictures_missing:
        click.echo(f"warning: {info.pictures_missing} pictures the copied records say are stored were not in "
                   f"{from_dir}: those records' pictures answer as missing", err=True)
    if (from_dir is None or to_dir is None) and (from_dir is None or (Path(from_dir) / "files").is_dir()):
        folder = Path(from_dir) / "files" if from_dir is not None else "the source's files/ folder"
        click.echo(f"note: no pictures were copied (that needs --from-data-dir and --to-data-dir): copy {folder} to "
                   "the picture volume's files/ keeping the files' times (`rsync -a`), by which retention ages them",
                   err=True)
    if info.reviews_left:  # every run again names them: the destination lacks what the source holds
        shown = ", ".join(rid for rid, _ in info.reviews_left[:5])
        more = f" (and {len(info.reviews_left) - 5} more inspections)" if len(info.reviews_left) > 5 else ""
        click.echo(f"error: {sum(n for _, n in info.reviews_left)} reviews at the source are not in the destination "
                   f"(made after their inspection was copied; a copy adds no review to an inspection already "
                   f"there): {shown}{more}; review those parts again on the replicas' page, and stop the source's "
                   "service before its last copy", err=True)
    if info.refused or info.reviews_left:
        raise SystemExit(1)


@app.group()
def records() -> None:
    """Recorded inspections: quality reports."""


# where a spreadsheet may start a cell in client text: the text's start, and after a semicolon, the separator that
# spreadsheets in decimal-comma locales split a .csv on (quoting for the comma does not keep it in one cell there);
# a formula character after spaces or a quote counts, as a spreadsheet that trims or unquotes the cell reads it
_CELL_START = re.compile(r"(^|;)(?=[ \"]*[=+\-@\t\r])")


def _csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: part ids, lines, stations and meta come from clients, and a cell
    that starts with = + - @ (or a tab or carriage return) would run as a formula when the export is opened. Each
    place a cell can start gets a leading ``'``."""
    if isinstance(value, (dict, list)):
        return _json_cell(value)
    if isinstance(value, str):
        return _CELL_START.sub(r"\1'", value)
    return value


def _json_cell(value: dict[str, Any] | list[Any]) -> str:
    """A JSON text cell (meta, regions, reviews) that reads back as the values recorded and runs as no formula: it
    starts with ``{`` or ``[``, and a ``;`` (only ever inside its strings) is written as JSON's ``\\u003b``, so no
    spreadsheet splits a piece off it to start a cell. The guard's ``'`` went inside the JSON's strings, and a
    script reading ``meta`` from the CSV got values the client never sent."""
    return json.dumps(value).replace(";", "\\u003b")


class _Instant(click.ParamType):
    """An ISO 8601 date or time, as the HTTP API takes it: with an offset or ``Z``, or without one (then UTC)."""

    name = "ISO-8601"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from datetime import datetime

        from ..instants import NotAnInstant, parse_instant

        if isinstance(value, datetime):
            return value
        try:
            return parse_instant(str(value))
        except NotAnInstant as exc:
            self.fail(str(exc), param, ctx)


def _same_access(path: Path, like: Path) -> None:
    """Give ``path`` the mode of ``like`` and, where this user may, its owner and group, before anything is written
    to it: it is about to be renamed over ``like``."""
    import stat

    st = like.stat()
    os.chmod(path, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):  # only root may give a file away; a group of one's own is fine
        os.chown(path, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)


def _named(ctx: Any, param: Any, value: str | None) -> str | None:
    """An export filter's value, refused when empty: the store reads an empty filter as any (an empty dropdown),
    so `--part-id "$SERIAL"` with the variable unset exported every part's inspections as that one's."""
    if value == "":
        raise click.BadParameter(f"{param.opts[0]} is empty: give one, or leave the option out for all of them")
    return value


@records.command("export")
@click.option("--since", type=_Instant(), default=None, help="From this time (UTC unless it has an offset).")
@click.option("--until", type=_Instant(), default=None, help="Before this time (UTC unless it has an offset).")
@click.option("--model", default=None, callback=_named, help="Only this model.")
@click.option("--part-id", default=None, callback=_named,
              help="Only this part (an audit's lookup of one part's inspections).")
@click.option("--request-id", default=None, callback=_named,
              help="Only the inspections of the call with this X-Request-ID.")
@click.option("--format", "fmt", type=click.Choice(list(SERVICE_OPTIONS["export_format"].choices or ())),
              default="csv", show_default=True, help=SERVICE_OPTIONS["export_format"].help)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File (default stdout).")
@click.option("--bom", is_flag=True,
              help="CSV for Excel: start with a UTF-8 byte order mark, without which Excel opens the file as its "
              "own code page and garbles every name beyond ASCII (Prüfteil, 零件).")
@store_options(required=True)
@friendly
def records_export(since: Any, until: Any, model: str | None, part_id: str | None, request_id: str | None, fmt: str,
                   out: Path | None, bom: bool, data_dir: Path, database_url: str | None) -> None:
    """Export inspections, oldest first, with their latest verdict, who gave it and every review: CSV (JSON columns
    as JSON text) or JSONL."""
    import csv

    from ..records.store import EXPORT_COLUMNS, Filters, inspection_dict

    if bom and fmt != "csv":  # a JSON reader refuses the mark: it is for a spreadsheet only
        raise click.BadParameter("goes with --format csv only (a JSON line reader refuses the mark)",
                                 param_hint="--bom")
    if since is not None and until is not None and since > until:  # an empty export would read as "no parts"
        raise click.BadParameter(f"--since {since.isoformat()} is after --until {until.isoformat()}",
                                 param_hint="--since")
    if out:
        writable_dir(out.parent, "--out")
    store = open_store(data_dir, database_url, "read")
    filters = Filters(model=model, since=since, until=until, part_id=part_id, request_id=request_id)
    # a file is written beside --out and renamed over it once whole: a disk that filled up midway left a short
    # export in its place (a quality report missing its latest parts), and an earlier export at that path lost
    # (a pipe, a device such as /dev/stdout, or a symlink is written as it is: nothing is renamed over it)
    plain = out is not None and not out.is_symlink() and (out.is_file() or not out.exists())
    # its own name per run: two exports to one --out at once (cron runs that overlap) wrote one shared partial file,
    # and the one renamed last was a mix of both while the first said it was whole
    partial = None
    if out and plain:
        partial, fd = open_beside(out, suffix=".partial")
        stream = open(fd, "w", newline="", encoding="utf-8")
    elif out:
        stream = open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    elif hasattr(sys.stdout, "buffer"):  # UTF-8 whatever the locale's encoding: a Latin-1 one (LANG=de_DE) stopped
        # at the first name beyond it
        sys.stdout.flush()  # what was printed before comes before the export
        stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
    else:  # a stream of text only (an embedding program's)
        stream = sys.stdout
    if partial is not None and out.is_file():  # the file renamed over it keeps its mode and owner: an export made
        _same_access(partial, out)  # private (0600) came back readable by everyone, with names of reviewers in it
    n = 0
    try:
        if bom:
            stream.write("\ufeff")
        writer = csv.writer(stream) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(EXPORT_COLUMNS)
        for row in store.iter_all(filters, reviews=True):
            d = inspection_dict(row, reviews=True)
            if writer is not None:
                writer.writerow([_csv_cell(d[c]) for c in EXPORT_COLUMNS])
            else:
                stream.write(json.dumps({c: d[c] for c in EXPORT_COLUMNS}) + "\n")
            n += 1
        if out and partial:
            stream.flush()
            sync_and_rename(partial, stream.fileno(), out)  # whole under its name through a power cut too
            stream.close()
    except OSError as exc:
        if not out:
            raise
        fail(f"cannot write the export to {out}: {exc.strerror or exc}; " + (
            "it is incomplete" if not partial else
            "the file already there is unchanged" if out.exists() else "no file was left there"))
    finally:
        if out:
            with contextlib.suppress(OSError):
                stream.close()  # a close that cannot flush what is left raises again: the error above says it
        elif stream is not sys.stdout:
            stream.detach()  # stdout stays open for what follows
        if partial:
            with contextlib.suppress(OSError):
                partial.unlink()
        store.close()
    click.echo(f"exported {n} inspection(s)" + (f" to {out}" if out else ""), err=True)
