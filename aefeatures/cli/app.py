"""The `aefeatures` command line: thin commands that compose the stages.

Each noun's commands live in their own module; this one makes the group and adds them.
Lookup commands never import torch, so they start fast.
"""

from __future__ import annotations

import errno
import json
from datetime import datetime, timezone
from typing import Any

import click

from aefeatures.cli import inspect, lookup, run, serve, sql
from aefeatures.cli.options import EXIT_CODES_HELP, configure_logging, logging_options
from aefeatures.errors import AEFeaturesError, cli_message


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AEFeaturesError as exc:
            _fail(ctx, cli_message(exc), exc.exit_code)
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRORS:
                raise
            where = f" writing `{exc.filename}`" if exc.filename else ""
            what, code = _STORAGE_ERRORS[exc.errno]
            _fail(ctx, f"{exc.strerror}{where}: {what}", code)


# Storage failures every write can meet, as one line (exit 1: the machine, 2: the store's setup).
# Writes go to staging and atomic renames first, so nothing half-written is left or published.
_STORAGE_ERRORS = {
    errno.ENOSPC: ("free space on that file system and run again; nothing was published or replaced", 1),
    errno.EDQUOT: ("raise the quota or free space and run again; nothing was published or replaced", 1),
    errno.EROFS: ("the file system is read-only: point the job or --output at a writable place", 2),
}


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
