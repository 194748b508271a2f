"""The `aefeatures` command line: thin commands that compose the stages.

Each noun's commands live in their own module; this one makes the group and adds them.
Lookup commands never import torch, so they start fast.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from aefeatures.cli import inspect, lookup, run, serve, sql
from aefeatures.cli.options import EXIT_CODES_HELP
from aefeatures.errors import AEFeaturesError, cli_message


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AEFeaturesError as exc:
            click.echo(f"error: {cli_message(exc)}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="aefeatures")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage to stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per log line on stderr, for schedulers (implies -v).")
def cli(verbose: bool, log_format: str) -> None:
    """Autoencoder embeddings of users and items, published as a Parquet feature store."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose or log_format == "json" else logging.WARNING,
                        handlers=[handler], force=True)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def main() -> None:
    cli(prog_name="aefeatures")


for command in (run.run, run.embed, lookup.recommend, lookup.similar, lookup.anomalies, inspect.versions,
                inspect.evaluate, inspect.runs, sql.sql, sql.feast_export, serve.serve):
    cli.add_command(command)
