"""`recommend`, `similar` and `anomalies`: lookups in the live version (no torch import)."""

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
)
from aefeatures.cli.output import print_json, print_table, ranked, typed, write_parquet


@click.command(epilog=LOOKUP_EXIT_CODES_HELP)
@store_option
@name_option
@click.option("--user", default=None, help="One user id.")
@click.option("--users-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Many users: a Parquet file (column `user_id`, or its only column) or a text file "
                   "with one id per line.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --users-file: write `user_id, item_id, rank, score` rows to this Parquet file.")
@k_option
@click.option("--include-seen", is_flag=True, help="Do not leave out the items the user already has.")
@json_option
def recommend(store_dir: Path, name: str | None, user: str | None, users_file: Path | None,
              output: Path | None, k: int, include_seen: bool, as_json: bool) -> None:
    """Items for a user (best model score first), without the items they already have.

    \b
    aefeatures recommend --store store --user 42 -k 10
    aefeatures recommend --store store --users-file users.parquet -k 100 --output recs.parquet
    """
    if (user is None) == (users_file is None):
        raise click.UsageError("pass exactly one of --user or --users-file")
    if output is not None and users_file is None:
        raise click.UsageError("--output goes with --users-file")
    fs = open_feature_set(store_dir, name)
    if user is not None:
        found = fs.recommend(user, k, exclude_seen=not include_seen)
        if as_json:
            print_json({"feature_set": fs.name, "version": fs.version, "user": typed(fs.user_ids, user),
                         "items": ranked(found.ids, found.scores)})
        else:
            click.echo(f"items for user {user} ({fs.name} version {fs.version}):")
            print_table(["rank", "item_id", "score"], [list(r.values()) for r in ranked(found.ids, found.scores)])
        return
    users = _read_users_file(users_file)
    recs = fs.recommend_batch(users, k, exclude_seen=not include_seen, skip_unknown=True)
    unknown = sorted(set(map(str, users)) - set(map(str, recs.get_column("user_id").unique().to_list())))
    missing = len(unknown)
    if missing:
        shown = ", ".join(unknown[:5]) + (", …" if missing > 5 else "")
        click.echo(f"warning: {missing} of {len(users)} user(s) not found in {fs.name} version {fs.version} "
                   f"({shown}); they are left out", err=True)
    if output is not None:
        write_parquet(recs, output)
        click.echo(f"wrote {recs.height:,} rows for {len(users) - missing:,} users to {output}", err=True)
    elif as_json:
        print_json(recs.to_dicts())
    else:
        click.echo(recs.write_csv(separator="\t"), nl=False)


def _read_users_file(path: Path) -> list[Any]:
    import polars as pl

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for unreadable files
            raise errors.users_file_unreadable(path, exc) from None
        column = "user_id" if "user_id" in frame.columns else (frame.columns[0] if frame.width == 1 else None)
        if column is None:
            raise errors.users_file_without_ids(path, frame.columns)
        return frame.get_column(column).drop_nulls().to_list()
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


@click.command(epilog=LOOKUP_EXIT_CODES_HELP)
@store_option
@name_option
@click.option("--item", default=None, help="Items like this item.")
@click.option("--user", default=None, help="Users like this user (cosine similarity of embeddings).")
@click.option("--metric", type=click.Choice(["ip", "cosine"]), default="ip", show_default=True,
              help="For --item: inner product of item vectors (through the index) or cosine.")
@k_option
@json_option
def similar(store_dir: Path, name: str | None, item: str | None, user: str | None, metric: str, k: int,
            as_json: bool) -> None:
    """Items like an item, or users like a user; the item or user itself is left out."""
    if (item is None) == (user is None):
        raise click.UsageError("pass exactly one of --item or --user")
    fs = open_feature_set(store_dir, name)
    if item is not None:
        kind, query, found = "item", typed(fs.item_ids, item), fs.similar_items(item, k, metric=metric)
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
@k_option
@json_option
def anomalies(store_dir: Path, name: str | None, k: int, as_json: bool) -> None:
    """Users the autoencoder explains worst: highest anomaly score (reconstruction error
    compared with users of similar activity, as a robust z-score) first."""
    fs = open_feature_set(store_dir, name)
    rows = fs.anomalies(k)
    if as_json:
        print_json({"feature_set": fs.name, "version": fs.version, "users": rows.to_dicts()})
        return
    click.echo(f"most anomalous users ({fs.name} version {fs.version}):")
    print_table(rows.columns, rows.rows())
