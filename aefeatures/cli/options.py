"""Options and exit codes shared by the commands."""

from __future__ import annotations

from pathlib import Path

import click

EXIT_CODES_HELP = (
    "Exit codes: 0 done, 1 unexpected failure, 2 bad input or config, "
    "3 quality gate refused publishing, 4 another run holds the lock, 5 user or item not found, "
    "130/143 stopped by Ctrl-C/SIGTERM."
)


store_option = click.option("--store", "store_dir", required=True, type=click.Path(path_type=Path),
                            help="Store directory.")
name_option = click.option("--name", default=None,
                           help="Feature set (may be left out when the store holds just one).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
k_option = click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
                        help="How many results.")


version_option = click.option("--version", "version", default=None,
                              help="Read this version (see `aefeatures versions`) instead of the live one.")


def open_feature_set(store_dir: Path, name: str | None, version: str | None = None):
    from aefeatures.serving.lookup import open_store

    return open_store(store_dir).open(name, version)
