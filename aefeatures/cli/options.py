"""Options and exit codes shared by the commands."""

from __future__ import annotations

from pathlib import Path

import click

from aefeatures import errors

EXIT_CODES_HELP = errors.exit_codes_help()  # every code; the commands list the ones they can return
RUN_EXIT_CODES_HELP = errors.exit_codes_help([errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT,
                                              errors.EXIT_GATE_REFUSED, errors.EXIT_LOCKED, errors.EXIT_INTERRUPTED])
EMBED_EXIT_CODES_HELP = errors.exit_codes_help([errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT,
                                                errors.EXIT_LOCKED, errors.EXIT_INTERRUPTED])
LOOKUP_EXIT_CODES_HELP = errors.exit_codes_help([errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT,
                                                 errors.EXIT_NOT_FOUND, errors.EXIT_INTERRUPTED])
READ_EXIT_CODES_HELP = errors.exit_codes_help([errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT,
                                               errors.EXIT_INTERRUPTED])


store_option = click.option("--store", "store_dir", required=True, type=click.Path(path_type=Path),
                            help="Store directory.")
name_option = click.option("--name", default=None,
                           help="Feature set (may be left out when the store holds just one).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
k_option = click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
                        help="How many results.")


def open_feature_set(store_dir: Path, name: str | None):
    from aefeatures.serving.lookup import open_store

    return open_store(store_dir).open(name)
