"""The `aefeatures` command line: thin commands that compose the stages.

Exit codes: 0 done, 1 unexpected failure, 2 bad input or config, 3 quality gate refused
publishing, 5 id not found.
Lookup commands never import torch, so they start fast.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import click

from aefeatures.errors import AEFeaturesError, BadInputError, Interrupted

EXIT_CODES_HELP = (
    "Exit codes: 0 done, 1 unexpected failure, 2 bad input or config, "
    "3 quality gate refused publishing, 4 another run holds the lock, 5 user or item not found, "
    "130/143 stopped by Ctrl-C/SIGTERM."
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AEFeaturesError as exc:
            click.echo(f"error: {exc}", err=True)
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


# --- shared options ---------------------------------------------------------------------------

store_option = click.option("--store", "store_dir", required=True, type=click.Path(path_type=Path),
                            help="Store directory.")
name_option = click.option("--name", default=None,
                           help="Feature set (may be left out when the store holds just one).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
k_option = click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
                        help="How many results.")


def _open(store_dir: Path, name: str | None):
    from aefeatures.serving.lookup import open_store

    return open_store(store_dir).open(name)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        click.echo("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _ranked(ids, scores, key: str = "item_id") -> list[dict[str, Any]]:
    return [{"rank": n + 1, key: _plain(i), "score": float(s)} for n, (i, s) in enumerate(zip(ids, scores))]


def _typed(ids, value: str) -> Any:
    """A command-line id as the store types it (42, not "42", for integer ids)."""
    return int(value) if ids.dtype.kind in "iu" else value


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# --- commands ---------------------------------------------------------------------------------


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Run even if the live version has the same input and config.")
@json_option
def run(job_file: Path, force: bool, as_json: bool) -> None:
    """Run JOB_FILE (TOML) end to end: read interactions, train, embed, index, publish.

    One run per feature set at a time (a second exits 4). A run whose input files (paths,
    sizes, modification times) and config equal the live version's does nothing and exits 0
    ("up to date"). The version goes live only when every file is written; on any failure,
    SIGTERM or Ctrl-C the previous version stays live. Every run appends a line to the feature
    set's run log (`aefeatures runs`). Progress bars show on a terminal only.
    """
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job

    cfg = load_job_config(job_file)
    with _signals_as_errors():
        result = run_job(cfg, force=force)
    summary = _run_summary(result)
    if as_json:
        _print_json(summary)
        return
    if result.status == "up_to_date":
        click.echo(f"{result.name} is up to date: live version {result.version} was built from the same "
                   "input files and config (use --force to run anyway)")
        return
    m = result.manifest
    train = m["training"]
    click.echo(f"published {result.name} version {result.version}: {m['counts']['users']:,} users × "
               f"{m['counts']['items']:,} items, dim {m['dim']}")
    click.echo(f"  input     {m['input']['rows_read']:,} rows from {len(m['input']['files'])} file(s), "
               f"{m['input']['rows_kept']:,} kept, {m['input']['pairs']:,} distinct (user, item) pairs")
    final = f", final loss {train['epoch_losses'][-1]:.3f}" if train["epoch_losses"] else ""
    click.echo(f"  training  {train['epochs']} epochs on {train['device']} in {train['seconds']:.1f}s{final}")
    click.echo(f"  training  best epoch {train['best_epoch']}"
               + (" (stopped early)" if train["stopped_early"] else ""))
    if m["evaluation"]:
        _echo_metrics(m["evaluation"], indent="  ")
    click.echo(f"  index     {m['index']['factory']}, recall@10 vs exact {m['index']['recall_at_10']:.3f}")
    click.echo(f"  stored in {result.path}")
    sample = summary["sample"]
    click.echo(f"  items for user {sample['user']!r}: {', '.join(map(str, sample['recommend']))}")
    click.echo(f"  items like item {sample['item']!r}: {', '.join(map(str, sample['similar']))}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Embed even if the live version was embedded from the same input.")
@json_option
def embed(job_file: Path, force: bool, as_json: bool) -> None:
    """Embed the users of JOB_FILE's input with the live model, without training, and publish.

    New users and users whose history changed get embeddings between trainings. The version
    reuses the live model, item vectors and index; items the model does not know are dropped,
    and users left with none are reported. Locked, logged and idempotent like `run`.
    """
    from aefeatures.config import load_job_config
    from aefeatures.jobs.embed import embed_job

    with _signals_as_errors():
        result = embed_job(load_job_config(job_file), force=force)
    info = result.manifest.get("embedded_with", {})
    if as_json:
        _print_json({"name": result.name, "version": result.version, "status": result.status,
                     "counts": result.manifest["counts"], "embedded_with": info})
    elif result.status == "up_to_date":
        click.echo(f"{result.name} is up to date: live version {result.version} was embedded from the same input")
    else:
        click.echo(f"published {result.name} version {result.version}: {result.manifest['counts']['users']:,} "
                   f"users embedded with the model of version {info['version']} (no training)")
        if info["unknown_only_users"]:
            click.echo(f"  {info['unknown_only_users']:,} user(s) had only unknown items and got no embedding, "
                       f"e.g. {', '.join(map(str, info['unknown_only_sample'][:5]))}")


@contextmanager
def _signals_as_errors() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted`, so a run stops cleanly with 128 + signal."""
    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name, signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _echo_metrics(evaluation: dict[str, Any], indent: str = "") -> None:
    click.echo(f"{indent}validation on {evaluation['valid_users']:,} held-out users "
               f"({evaluation['holdout']:.0%} of their items hidden):")
    names = ["recall@20", "ndcg@10", "ndcg@100", "coverage@20"]
    _print_table(["", *names], [[f"{indent}{label}", *(evaluation[key][n] for n in names)]
                                for label, key in (("model", "model"), ("popularity", "popularity"))])


def _run_summary(result) -> dict[str, Any]:
    from aefeatures.serving.lookup import FeatureSet

    fs = FeatureSet(result.path.parent.parent.parent, result.name, result.version)
    user, item = _plain(fs.user_ids[0]), _plain(fs.item_ids[0])
    return {
        "name": result.name, "version": result.version, "path": str(result.path),
        "counts": result.manifest["counts"], "dim": result.manifest["dim"],
        "training": result.manifest["training"], "index": result.manifest["index"],
        "evaluation": result.manifest["evaluation"], "gate": result.manifest["gate"], "status": result.status,
        "timings": result.timings,
        "sample": {"user": user, "recommend": [_plain(i) for i in fs.recommend(user, 5).ids],
                   "item": item, "similar": [_plain(i) for i in fs.similar_items(item, 5).ids]},
    }


@cli.command(epilog=EXIT_CODES_HELP)
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
    fs = _open(store_dir, name)
    if user is not None:
        found = fs.recommend(user, k, exclude_seen=not include_seen)
        if as_json:
            _print_json({"feature_set": fs.name, "version": fs.version, "user": _typed(fs.user_ids, user),
                         "items": _ranked(found.ids, found.scores)})
        else:
            click.echo(f"items for user {user} ({fs.name} version {fs.version}):")
            _print_table(["rank", "item_id", "score"], [list(r.values()) for r in _ranked(found.ids, found.scores)])
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
        _write_parquet_atomically(recs, output)
        click.echo(f"wrote {recs.height:,} rows for {len(users) - missing:,} users to {output}", err=True)
    elif as_json:
        _print_json(recs.to_dicts())
    else:
        click.echo(recs.write_csv(separator="\t"), nl=False)


def _read_users_file(path: Path) -> list[Any]:
    import polars as pl

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for unreadable files
            raise BadInputError(f"users file `{path}` is not a readable Parquet file ({exc}).") from None
        column = "user_id" if "user_id" in frame.columns else (frame.columns[0] if frame.width == 1 else None)
        if column is None:
            raise BadInputError(f"users file `{path}` has no `user_id` column; found {frame.columns}. "
                                "Name the column `user_id` or keep a single column.")
        return frame.get_column(column).drop_nulls().to_list()
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _write_parquet_atomically(frame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


@cli.command(epilog=EXIT_CODES_HELP)
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
    fs = _open(store_dir, name)
    if item is not None:
        kind, query, found = "item", _typed(fs.item_ids, item), fs.similar_items(item, k, metric=metric)
    else:
        kind, query, found = "user", _typed(fs.user_ids, user), fs.similar_users(user, k)
    rows = _ranked(found.ids, found.scores, f"{kind}_id")
    if as_json:
        _print_json({"feature_set": fs.name, "version": fs.version, kind: query, f"{kind}s": rows})
        return
    click.echo(f"{kind}s like {kind} {query} ({fs.name} version {fs.version}):")
    _print_table(["rank", f"{kind}_id", "score"], [list(r.values()) for r in rows])


@cli.command(epilog=EXIT_CODES_HELP)
@store_option
@name_option
@json_option
def versions(store_dir: Path, name: str | None, as_json: bool) -> None:
    """Versions of a feature set, oldest first: live, published (superseded) or refused by the
    quality gate, with validation NDCG@100."""
    from aefeatures.serving.lookup import open_store

    store = open_store(store_dir)
    name = name or store.default_name()
    rows = store.versions(name)
    if as_json:
        _print_json({"feature_set": name, "versions": rows})
        return
    _print_table(["version", "status", "built", "created_at", "users", "items", "dim", "kind", "index",
                  "ndcg@100", "popularity"],
                 [[r["version"], r["status"], r["built"], r["created_at"][:19], r["users"], r["items"], r["dim"],
                   r["kind"], r["index"], _or_dash(r["ndcg@100"]), _or_dash(r["popularity_ndcg@100"])]
                  for r in rows])


def _or_dash(value: float | None) -> Any:
    return "-" if value is None else value


@cli.command(epilog=EXIT_CODES_HELP)
@store_option
@name_option
@click.option("--version", "version", default=None, help="A version id (default: the live one).")
@json_option
def evaluate(store_dir: Path, name: str | None, version: str | None, as_json: bool) -> None:
    """Validation metrics of a version (held-out users), against popularity, with its
    training curve and the quality gate's verdict."""
    from aefeatures.serving.lookup import open_store

    store = open_store(store_dir)
    name = name or store.default_name()
    m = store.manifest(name, version)
    out = {"feature_set": name, "version": m["version"], "evaluation": m.get("evaluation"),
           "gate": m.get("gate"), "best_epoch": m["training"].get("best_epoch"),
           "history": m["training"].get("history", [])}
    if as_json:
        _print_json(out)
        return
    click.echo(f"{name} version {m['version']}: best epoch {out['best_epoch']} of {len(out['history'])}")
    if not out["evaluation"]:
        click.echo("evaluation was off for this version (evaluation.valid_share = 0)")
        return
    _echo_metrics(out["evaluation"])
    gate = out["gate"] or {}
    click.echo("quality gate: " + ("passed" if gate.get("passed", True) else "refused: " + "; ".join(gate["reasons"])))


@cli.command(epilog=EXIT_CODES_HELP)
@store_option
@name_option
@k_option
@json_option
def anomalies(store_dir: Path, name: str | None, k: int, as_json: bool) -> None:
    """Users the autoencoder explains worst: highest anomaly score (reconstruction error
    compared with users of similar activity, as a robust z-score) first."""
    fs = _open(store_dir, name)
    rows = fs.anomalies(k)
    if as_json:
        _print_json({"feature_set": fs.name, "version": fs.version, "users": rows.to_dicts()})
        return
    click.echo(f"most anomalous users ({fs.name} version {fs.version}):")
    _print_table(rows.columns, rows.rows())


@cli.command(epilog=EXIT_CODES_HELP)
@store_option
@name_option
@click.option("-n", "last", type=click.IntRange(min=1), default=20, show_default=True, help="How many recent runs.")
@json_option
def runs(store_dir: Path, name: str | None, last: int, as_json: bool) -> None:
    """The run history of a feature set, newest last: status, exit code, version, timings."""
    from aefeatures.serving.lookup import open_store
    from aefeatures.store.runlog import read_runs

    name = name or open_store(store_dir).default_name()
    history = read_runs(store_dir / name)[-last:]
    if as_json:
        _print_json({"feature_set": name, "runs": history})
        return
    if not history:
        click.echo(f"no runs recorded for `{name}` in {store_dir}")
        return
    _print_table(["started", "seconds", "status", "exit", "version", "error"],
                 [[r["started"][:19], _seconds(r), r["status"], r["exit_code"], r.get("version") or "-",
                   (r.get("error") or "")[:60]] for r in history])


def _seconds(run: dict[str, Any]) -> str:
    from datetime import datetime

    start, end = (datetime.fromisoformat(run[k]) for k in ("started", "ended"))
    return f"{(end - start).total_seconds():.1f}"


from aefeatures.cli import sql  # noqa: E402,F401  (registers `sql` and `feast-export`)
from aefeatures.cli import serve  # noqa: E402,F401  (registers `serve`)
