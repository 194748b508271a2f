"""The `aefeatures` command line: thin commands that compose the stages.

Each noun's commands live in their own module; this one makes the group and adds them.
Lookup commands never import torch, so they start fast.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click

from aefeatures.cli import inspect, lookup, run, serve, sql
from aefeatures.cli.options import EXIT_CODES_HELP, configure_logging, logging_options
from aefeatures.errors import PATH_ERRNOS, AEFeaturesError, StorageError, cli_message, storage_errno


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AEFeaturesError as exc:
            _fail(ctx, cli_message(exc), exc.exit_code)
        except Exception as exc:
            storage = _storage_failure(exc)
            if storage is None:
                raise
            _fail(ctx, str(storage), storage.exit_code)


def _storage_failure(exc: Exception) -> StorageError | None:
    """A write the file system refused anywhere in any command (disk full, over a quota or the
    file size limit, read-only, an I/O error), from Python, Arrow or Polars, or a path that
    cannot be created (a file where a folder should be, no permission), as one line (exit 1: the
    machine, 2: the setup). Writes go to staging and atomic renames first, so nothing
    half-written is left or published. Any other failure is a bug: its traceback is shown."""
    if isinstance(exc, click.exceptions.ClickException):
        return None
    path = getattr(exc, "filename", None)
    code = storage_errno(exc)
    if code is None and isinstance(exc, OSError) and path and exc.errno in PATH_ERRNOS:
        code = exc.errno  # e.g. an output folder that cannot be created where a file is
    if code is None:
        return None
    return StorageError(path, code, "nothing was published or replaced", verb="at")


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if ctx.meta.get("aefeatures.logging", {}).get("log_format") == "json":
        click.echo(json.dumps({"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "level": "ERROR", "logger": "aefeatures", "message": message,
                               "exit_code": code}), err=True)
    else:
        click.echo(f"error: {message}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="aefeatures")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage to stderr (also accepted after the command).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per log line on stderr, the final error line too, for schedulers "
                   "(implies -v; also accepted after the command).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, log_format: str) -> None:
    """Autoencoder embeddings of users and items, published as a Parquet feature store."""
    ctx.meta["aefeatures.logging"] = {"verbose": verbose, "log_format": log_format}
    configure_logging(verbose, log_format)


def main() -> None:
    cli(prog_name="aefeatures")


for command in (run.run, run.embed, run.attributes, lookup.recommend, lookup.similar, lookup.anomalies, inspect.versions,
                inspect.evaluate, inspect.runs, sql.sql, sql.feast_export, serve.serve):
    cli.add_command(logging_options(command))
