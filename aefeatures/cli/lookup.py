"""`recommend`, `similar` and `anomalies`: lookups in the live version, or one pinned with
`--version` (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from aefeatures import errors
from aefeatures.cli.options import (
    LOOKUP_EXIT_CODES_HELP,
    READ_EXIT_CODES_HELP,
    json_option,
    k_option,
    name_option,
    open_feature_set,
    store_option,
    version_option,
)
from aefeatures.cli.output import print_json, print_table, ranked, typed, write_parquet

FILTER_HELP = ("Keep only items whose attributes satisfy this SQL boolean expression, e.g. "
               "\"category = 'books' AND in_stock\" (see README, Item attributes and filters).")
ITEMS_FILE_HELP = ("Keep only these items: a Parquet file (column `item_id`, or its only column) or a text file "
                   "with one id per line; unknown ids are ignored.")


def filter_options(command):
    """--filter and --items-file, shared by the lookups that return items."""
    command = click.option("--items-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           default=None, help=ITEMS_FILE_HELP)(command)
    return click.option("--filter", "filter_text", default=None, metavar="EXPR", help=FILTER_HELP)(command)


def history_options(command):
    """--history and --weights: an interaction history given on the command line."""
    command = click.option("--weights", default=None, callback=_split_weights, metavar="W,W,...",
                           help="With --history: the weight of each item (rating, count), in the same order; "
                                "encoded as the job encodes its input.")(command)
    return click.option("--history", default=None, callback=_split_ids, metavar="ID,ID,...",
                        help="Anyone's interaction history: item ids separated by commas (no user id needed; "
                             "ids the version does not know are reported and left out).")(command)


def _split_ids(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _split_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("weights are numbers separated by commas, e.g. 5,4,3.5") from None


@click.command(epilog=LOOKUP_EXIT_CODES_HELP)
@store_option
@name_option
@version_option
@click.option("--user", default=None, help="One user id.")
@click.option("--users-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Many users: a Parquet file (column `user_id`, or its only column) or a text file "
                   "with one id per line.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --users-file: write `user_id, item_id, rank, score` rows to this Parquet file.")
@history_options
@k_option
@click.option("--include-seen", is_flag=True, help="Do not leave out the items the user (or history) already has.")
@filter_options
@json_option
def recommend(store_dir: Path, name: str | None, version: str | None, user: str | None, users_file: Path | None,
              history: list[str] | None, weights: list[float] | None, output: Path | None, k: int, include_seen: bool,
              filter_text: str | None, items_file: Path | None, as_json: bool) -> None:
    """Items for a user (best model score first), without the items they already have; or for
    anyone from their interaction history (embedded now by the version's encoder, no training).

    \b
    aefeatures recommend --store store --user 42 -k 10
    aefeatures recommend --store store --user 42 --filter "category = 'books' AND in_stock"
    aefeatures recommend --store store --history 12,7,99 -k 10
    aefeatures recommend --store store --users-file users.parquet -k 100 --output recs.parquet
    """
    if sum(x is not None for x in (user, users_file, history)) != 1:
        raise click.UsageError("pass exactly one of --user, --users-file or --history")
    if output is not None and users_file is None:
        raise click.UsageError("--output goes with --users-file")
    if weights is not None and history is None:
        raise click.UsageError("--weights goes with --history")
    fs = open_feature_set(store_dir, name, version)
    rules = {"filter": filter_text, "items": _read_ids_file(items_file, "item_id", "items") if items_file else None}
    if history is not None:
        found = fs.recommend_history(history, k, weights=weights, exclude_seen=not include_seen, **rules)
        _print_history_answer(fs, history, found, "item", as_json)
        return
    if user is not None:
        found = fs.recommend(user, k, exclude_seen=not include_seen, **rules)
        if as_json:
            print_json({"feature_set": fs.name, "version": fs.version, "user": typed(fs.user_ids, user),
                         "items": ranked(found.ids, found.scores)})
        else:
            click.echo(f"items for user {user} ({fs.name} version {fs.version}):")
            print_table(["rank", "item_id", "score"], [list(r.values()) for r in ranked(found.ids, found.scores)])
        return
    # One id rule (schema.parse_id); a user listed twice (in any spelling) is answered once.
    users = list(dict.fromkeys(fs.user_id(u) for u in _read_users_file(users_file)))
    recs = fs.recommend_batch(users, k, exclude_seen=not include_seen, skip_unknown=True, **rules)
    known = fs.has_users(users)
    answered = set(recs.get_column("user_id").unique().to_list())
    unknown = [u for u, f in zip(users, known) if not f]
    nothing_left = [u for u, f in zip(users, known) if f and u not in answered]
    if unknown:
        click.echo(f"warning: {len(unknown)} of {len(users)} user(s) not found in {fs.name} version {fs.version} "
                   f"({_some(unknown)}); they are left out", err=True)
    if nothing_left:
        click.echo(f"warning: {len(nothing_left)} of {len(users)} known user(s) have no item left to recommend "
                   f"(every item is seen, excluded or filtered out; {_some(nothing_left)}); they have no rows", err=True)
    if output is not None:
        write_parquet(recs, output)
        click.echo(f"wrote {recs.height:,} rows for {len(answered):,} users to {output}", err=True)
    elif as_json:
        print_json(recs.to_dicts())
    else:
        click.echo(f"items for {len(answered):,} user(s) ({fs.name} version {fs.version}):")
        print_table(recs.columns, recs.rows())


def _print_history_answer(fs, history: list[str], found, kind: str, as_json: bool) -> None:
    """A history lookup's ranked ``kind``s (items or users), its unknown ids warned about on stderr."""
    if found.unknown:
        click.echo(f"warning: {len(found.unknown)} item(s) of the history not found in {fs.name} version "
                   f"{fs.version} ({_some(found.unknown)}); left out", err=True)
    rows = ranked(found.ids, found.scores, f"{kind}_id")
    if as_json:
        print_json({"feature_set": fs.name, "version": fs.version, "history": _typed_items(fs, history),
                    "unknown": _typed_items(fs, found.unknown), f"{kind}s": rows})
        return
    what = "items for" if kind == "item" else "users like"
    click.echo(f"{what} a history of {len(history)} item(s) ({fs.name} version {fs.version}):")
    print_table(["rank", f"{kind}_id", "score"], [list(r.values()) for r in rows])


def _typed_items(fs, ids: list[str]) -> list[Any]:
    """Command-line item ids as the store types them; one that cannot be an item id stays as given."""
    out = []
    for item in ids:
        try:
            out.append(fs.item_id(item))
        except errors.BadInputError:
            out.append(item)
    return out


def _some(ids: list[Any]) -> str:
    return ", ".join(map(str, ids[:5])) + (", …" if len(ids) > 5 else "")


def _read_users_file(path: Path) -> list[Any]:
    """The ids of a users file: Parquet (column `user_id`, or its only column) or text, one id a
    line (UTF-8 with or without a byte-order mark; LF or CRLF; surrounding whitespace and blank
    lines ignored). Ids are raw: the caller parses them by the feature set's id type."""
    return _read_ids_file(path, "user_id", "users")


def _read_ids_file(path: Path, key: str, what: str) -> list[Any]:
    import polars as pl

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for unreadable files
            raise errors.ids_file_unreadable(path, what, exc) from None
        column = key if key in frame.columns else (frame.columns[0] if frame.width == 1 else None)
        if column is None:
            raise errors.ids_file_without_ids(path, what, key, frame.columns)
        series = frame.get_column(column).drop_nulls()
        if series.dtype == pl.Categorical or isinstance(series.dtype, pl.Enum):
            series = series.cast(pl.String)
        return series.to_list()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel, Notepad) is not part of the first id
    except UnicodeDecodeError as exc:
        raise errors.ids_file_not_utf8(path, what, exc) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@click.command(epilog=LOOKUP_EXIT_CODES_HELP)
@store_option
@name_option
@version_option
@click.option("--item", default=None, help="Items like this item.")
@click.option("--user", default=None, help="Users like this user (cosine similarity of embeddings).")
@history_options
@click.option("--metric", type=click.Choice(["ip", "cosine"]), default=None,
              help="For --item: inner product of item vectors (through the index, the default) or cosine. "
                   "Users are always compared by cosine.")
@k_option
@filter_options
@json_option
def similar(store_dir: Path, name: str | None, version: str | None, item: str | None, user: str | None,
            history: list[str] | None, weights: list[float] | None, metric: str | None, k: int,
            filter_text: str | None, items_file: Path | None, as_json: bool) -> None:
    """Items like an item, or users like a user (the item or user itself left out), or users
    like an interaction history (``--history``, embedded now by the version's encoder)."""
    if sum(x is not None for x in (item, user, history)) != 1:
        raise click.UsageError("pass exactly one of --item, --user or --history")
    if item is None and (filter_text is not None or items_file is not None):
        raise click.UsageError("--filter and --items-file go with --item")
    if item is None and metric is not None:
        raise click.UsageError("--metric goes with --item: users are compared by cosine similarity only")
    if weights is not None and history is None:
        raise click.UsageError("--weights goes with --history")
    metric = metric or "ip"
    fs = open_feature_set(store_dir, name, version)
    if history is not None:
        _print_history_answer(fs, history, fs.similar_users_to_history(history, k, weights=weights), "user", as_json)
        return
    if item is not None:
        items = _read_ids_file(items_file, "item_id", "items") if items_file else None
        kind, query = "item", typed(fs.item_ids, item)
        found = fs.similar_items(item, k, metric=metric, filter=filter_text, items=items)
    else:
        kind, query, found = "user", typed(fs.user_ids, user), fs.similar_users(user, k)
    rows = ranked(found.ids, found.scores, f"{kind}_id")
    if as_json:
        print_json({"feature_set": fs.name, "version": fs.version, kind: query, f"{kind}s": rows})
        return
    click.echo(f"{kind}s like {kind} {query} ({fs.name} version {fs.version}):")
    print_table(["rank", f"{kind}_id", "score"], [list(r.values()) for r in rows])


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@name_option
@version_option
@click.option("-k", "k", type=click.IntRange(min=1, max=errors.MAX_K), default=20, show_default=True, help="How many users.")
@json_option
def anomalies(store_dir: Path, name: str | None, version: str | None, k: int, as_json: bool) -> None:
    """Users the autoencoder explains worst: highest anomaly score (reconstruction error
    compared with users of similar activity, as a robust z-score) first."""
    fs = open_feature_set(store_dir, name, version)
    rows = fs.anomalies(k)
    if as_json:
        print_json({"feature_set": fs.name, "version": fs.version, "users": rows.to_dicts()})
        return
    click.echo(f"most anomalous users ({fs.name} version {fs.version}):")
    print_table(rows.columns, rows.rows())
