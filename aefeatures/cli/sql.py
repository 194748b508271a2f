"""`aefeatures sql` and `aefeatures feast-export`: the store seen from SQL tools."""

from __future__ import annotations

from pathlib import Path

import click

from aefeatures import errors
from aefeatures.cli.options import READ_EXIT_CODES_HELP, json_option, name_option, store_option
from aefeatures.cli.output import json_default, print_json, write_parquet
from aefeatures.errors import BadInputError
from aefeatures.store.publish import atomic_write


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@click.option("-c", "command", default=None, help="SQL to run.")
@click.option("-f", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A file of SQL to run (the last statement's result is shown).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Bind $NAME in the SQL to VALUE (as a parameter, never as SQL text). Repeatable.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True, help="Output format (parquet needs --output).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result to this file instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json: the rows as a JSON list.")
@click.option("--safe", is_flag=True,
              help="For less trusted users: queries only (no COPY, ATTACH, SET, INSTALL, CREATE...), reading "
                   "only the store's published versions, no network or extensions, settings locked.")
def sql(store_dir: Path, command: str | None, file: Path | None, params: tuple[str, ...], fmt: str,
        output: Path | None, as_json: bool, safe: bool) -> None:
    """Query the store with DuckDB SQL: the views and macros of `STORE/catalog.sql` are defined.

    \b
    aefeatures sql --store store -c 'SELECT * FROM example_recommend($user, 10)' --param user=42
    aefeatures sql --store store -f report.sql --format parquet --output out.parquet
    With neither -c nor -f, an interactive prompt reads statements ending in `;`.

    Without --safe this is DuckDB with the user's own rights: SQL can read and write any file
    the user can, ATTACH databases, install and load extensions (network) and change settings.
    """
    import duckdb

    from aefeatures.export.catalog import check_safe, connect, id_param_types, parse_param

    fmt = "json" if as_json else fmt

    if command is not None and file is not None:
        raise click.UsageError("pass -c or -f, not both")
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output FILE")
    id_types = id_param_types(store_dir) if params and store_dir.is_dir() else {}
    try:
        bound = dict(parse_param(p, id_types) for p in params)
    except BadInputError:
        raise
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    con = connect(store_dir, safe=safe)
    text = command if command is not None else file.read_text(encoding="utf-8") if file else None
    try:
        if text is None:
            _sql_prompt(con, safe)
            return
        if safe:
            check_safe(con, text)
        relation = con.sql(text, params=bound or None)  # the last statement's result, if a query
        frame = _frame(relation)
    except duckdb.Error as exc:
        raise errors.sql_failed(_reason(exc, safe)) from None
    if frame is not None:
        _write_frame(frame, fmt, output)


def _reason(exc: Exception, safe: bool) -> str:
    """A DuckDB error as one line; in --safe mode a refused file says what --safe reads."""
    import duckdb

    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if safe and isinstance(exc, duckdb.PermissionException):
        reason += " (--safe reads only the published versions of this store's feature sets)"
    return reason


def _sql_prompt(con, safe: bool) -> None:
    import duckdb

    from aefeatures.export.catalog import check_safe

    click.echo("aefeatures sql: end statements with `;`, quit with Ctrl-D.", err=True)
    buffer = ""
    while True:
        try:
            line = input("sql> " if not buffer else "...> ")
        except EOFError:
            return
        buffer += line + "\n"
        if not buffer.rstrip().endswith(";"):
            continue
        try:
            if safe:
                check_safe(con, buffer)
            frame = _frame(con.sql(buffer))
            if frame is not None:
                _write_frame(frame, "table", None)
        except duckdb.Error as exc:
            click.echo(f"error: {_reason(exc, safe)}", err=True)
        except errors.BadInputError as exc:
            click.echo(f"error: {exc}", err=True)
        buffer = ""


# DuckDB types that Arrow or Polars cannot carry as they are: sent as their SQL text
_AS_TEXT = ("INTERVAL", "BIT", "UNION", "TIME WITH TIME ZONE", "TIMETZ", "VARINT", "BIGNUM")


def _frame(relation):
    """A query's result as a Polars frame; columns of :data:`_AS_TEXT` types become their text."""
    import polars as pl

    if relation is None:
        return None
    types = [str(t).upper() for t in relation.types]
    if any(t.startswith(_AS_TEXT) for t in types):
        quoted = ['"' + c.replace('"', '""') + '"' for c in relation.columns]
        relation = relation.project(", ".join(f"CAST({q} AS VARCHAR) AS {q}" if t.startswith(_AS_TEXT) else q
                                              for q, t in zip(quoted, types)))
    return pl.from_arrow(relation.to_arrow_table())


def _csv_cells(frame):
    """``frame`` with nested columns (lists, arrays such as embeddings, structs) as JSON text,
    the only way a CSV cell holds them; NaN and infinities as null, as in --format json."""
    import polars as pl

    from aefeatures.schema import strict_json

    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(pl.Series(name, [None if v is None else strict_json(v, default=json_default)
                                               for v in frame.get_column(name).to_list()], dtype=pl.String)
                              for name in nested)


def _write_frame(frame, fmt: str, output: Path | None) -> None:
    import polars as pl

    if fmt == "parquet":
        write_parquet(frame, output)
        return
    if fmt == "csv":
        text = _csv_cells(frame).write_csv()
    elif fmt == "json":
        from aefeatures.schema import strict_json

        text = strict_json(frame.to_dicts(), indent=2, default=json_default) + "\n"  # NaN/inf as null
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_hide_dataframe_shape=True):
            text = str(frame) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write(output, text)


@click.command("feast-export", epilog=READ_EXIT_CODES_HELP)
@store_option
@name_option
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the Feast feature repository.")
@json_option
def feast_export(store_dir: Path, name: str | None, output: Path, as_json: bool) -> None:
    """Write a Feast feature repository (Entity, FileSource, FeatureView with the embedding as
    Array(Float32)) over the live version's users and items. Export again after a publish."""
    from aefeatures.export.feast import export_feast_repo
    from aefeatures.serving.lookup import open_store

    name = name or open_store(store_dir).default_name()
    written = export_feast_repo(store_dir, name, output)
    if as_json:
        print_json({"feature_set": name, "output": str(output), "files": [str(p) for p in written]})
        return
    for path in written:
        click.echo(f"wrote {path}")

