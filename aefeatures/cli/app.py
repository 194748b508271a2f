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
from aefeatures.errors import AEFeaturesError, cli_message


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AEFeaturesError as exc:
            if ctx.meta.get("aefeatures.logging", {}).get("log_format") == "json":
                click.echo(json.dumps({"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "level": "ERROR", "logger": "aefeatures", "message": cli_message(exc),
                                       "exit_code": exc.exit_code}), err=True)
            else:
                click.echo(f"error: {cli_message(exc)}", err=True)
            ctx.exit(exc.exit_code)


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
