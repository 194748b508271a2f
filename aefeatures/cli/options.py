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
k_option = click.option("-k", "k", type=click.IntRange(min=1, max=errors.MAX_K), default=10, show_default=True,
                        help="How many results.")


version_option = click.option("--version", "version", default=None,
                              help="Read this version (see `aefeatures versions`) instead of the live one.")


def open_feature_set(store_dir: Path, name: str | None, version: str | None = None):
    from aefeatures.serving.lookup import open_store

    return open_store(store_dir).open(name, version)


def configure_logging(verbose: bool, log_format: str) -> None:
    """Log to stderr: each stage at INFO with ``verbose`` (or ``log_format == "json"``), else
    warnings only; training progress lines (shown when stderr is no terminal) always pass."""
    import json
    import logging
    import sys

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()})

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose or log_format == "json" else logging.WARNING,
                        handlers=[handler], force=True)
    logging.getLogger("aefeatures.progress").setLevel(logging.INFO)
    # FAISS logs which of its builds it loads, and the ones it failed to find, at INFO on every
    # import: noise in an operator's log, not a stage of the job
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _logging_setting(ctx: click.Context, param: click.Parameter, value) -> None:
    """-v / --log-format given after the subcommand: merged with those given before it."""
    settings = ctx.find_root().meta.setdefault("aefeatures.logging", {"verbose": False, "log_format": "text"})
    if param.name == "verbose" and value:
        settings["verbose"] = True
    elif param.name == "log_format" and value is not None:
        settings["log_format"] = value
    else:
        return
    configure_logging(settings["verbose"], settings["log_format"])


VERBOSE_HELP = "Log each stage to stderr (also accepted before the command)."
LOG_FORMAT_HELP = ("json: one JSON object per log line on stderr, the final error line too, for schedulers "
                   "(implies -v; also accepted before the command).")


def logging_options(command):
    """``-v`` and ``--log-format`` on a subcommand, as on the group."""
    command = click.option("--log-format", type=click.Choice(["text", "json"]), default=None, expose_value=False,
                           callback=_logging_setting, help=LOG_FORMAT_HELP)(command)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_logging_setting,
                        help=VERBOSE_HELP)(command)
