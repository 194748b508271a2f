"""`aefeatures run` and `aefeatures embed`: the scheduled jobs."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from aefeatures.cli.options import EMBED_EXIT_CODES_HELP, RUN_EXIT_CODES_HELP, json_option
from aefeatures.cli.output import echo_metrics, gate_summary, plain, print_json
from aefeatures.errors import Interrupted


@click.command(epilog=RUN_EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Run even if the live version has the same input and config.")
@click.option("--fold-in", "fold_in", is_flag=True,
              help="If the feature set has a live version, fold the input's new items and users into its model "
                   "instead of training (as `aefeatures embed`); otherwise train.")
@json_option
def run(job_file: Path, force: bool, fold_in: bool, as_json: bool) -> None:
    """Run JOB_FILE (TOML) end to end: read interactions, train, embed, index, publish.

    One run per feature set at a time (a second exits 4). A run whose input files (paths,
    sizes, modification times) and config equal the live version's does nothing and exits 0
    ("up to date"). The version goes live only when every file is written; on any failure,
    SIGTERM or Ctrl-C the previous version stays live. Every run appends a line to the feature
    set's run log (`aefeatures runs`). Training shows a progress bar on a terminal; without one
    (cron, systemd, Airflow) it logs a progress line every 30 s instead.
    """
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job
    from aefeatures.store import layout

    cfg = load_job_config(job_file)
    if fold_in and cfg.job.name in layout.feature_sets(cfg.job.store):
        from aefeatures.jobs.embed import embed_job

        with _signals_as_errors():
            result = embed_job(cfg, force=force, fold_in=True)
        _print_embedded(result, as_json)
        return
    with _signals_as_errors():
        result = run_job(cfg, force=force)
    summary = _run_summary(result)
    if as_json:
        print_json(summary)
        return
    if result.status == "up_to_date":
        click.echo(f"{result.name} is up to date: live version {result.version} was built from the same "
                   "input files and config (use --force to run anyway)")
        return
    from aefeatures.schema import closed_form

    m = result.manifest
    train = m["training"]
    click.echo(f"published {result.name} version {result.version}: {m['counts']['users']:,} users × "
               f"{m['counts']['items']:,} items, dim {m['dim']}")
    click.echo(f"  input     {m['input']['rows_read']:,} rows from {len(m['input']['files'])} file(s), "
               f"{m['input']['rows_kept']:,} kept, {m['input']['pairs']:,} distinct (user, item) pairs")
    final = f", final loss {train['epoch_losses'][-1]:.3f}" if train["epoch_losses"] else ""
    fitted = closed_form(train)  # a dlae: closed-form fits, no epochs
    if fitted:
        chosen = {**m["config"]["model"], **train.get("chosen", {})}
        click.echo(f"  training  {train['epochs']} closed-form fit(s) on {train['device']} in {train['seconds']:.1f}s, "
                   f"dropout {chosen['dropout']:g}, l2 {chosen['l2']:g}, popularity exponent "
                   f"{chosen.get('popularity_exponent', 0):g}")
        part = m.get("item_neighbours")
        if part:
            click.echo(f"            item-item part kept: {part['entries']:,} entries, up to {part['per_item']} "
                       f"neighbours an item (weight {chosen.get('neighbour_weight', 0):g})")
        elif any(h.get("method") == "neighbours" for h in train.get("history", [])):
            click.echo("            item-item part tried, not kept: validation NDCG@100 did not rise")
        fitted_on = [h.get("users") for h in train.get("history", [])]
        if fitted_on and min(fitted_on) < fitted_on[-1]:  # a sampled search, then every training user
            click.echo(f"            searched on {min(fitted_on):,} sampled users, then fitted on all "
                       f"{fitted_on[-1]:,} training users")
    else:
        threads = f" ({train['threads']} thread{'s' * (train['threads'] != 1)})" if train.get("threads") else ""
        click.echo(f"  training  {train['epochs']} epochs on {train['device']}{threads} in {train['seconds']:.1f}s{final}")
    if not fitted:
        click.echo(f"  training  best epoch {train['best_epoch']} of at most {train.get('max_epochs', '?')}, "
                   f"stopped by {train.get('stop_reason', '?')}")
    refit = train.get("refit")
    if refit:
        done = f" on all {refit['users']:,} users" + ("" if fitted else
                                                      f", {refit['epochs']} epochs") + f" in {refit['seconds']:.1f}s"
        click.echo(f"  refit     {refit['status']}" + (done if refit["status"] == "published" else f": {refit['reason']}"))
    if m["evaluation"]:
        echo_metrics(m["evaluation"], indent="  ")
    elif m.get("evaluation_skipped"):
        click.echo(f"  gate      metric checks skipped: {m['evaluation_skipped']}")
    click.echo(f"  index     {m['index']['factory']}, recall@10 vs exact {m['index']['recall_at_10']:.3f}")
    click.echo(f"  gate      {gate_summary(m['gate'])}")

    from aefeatures.quality.drift import describe

    for line in describe(m.get("alignment"), m.get("drift")):
        click.echo(f"  drift     {line}")
    click.echo(f"  stored in {result.path}")
    sample = summary["sample"]  # a published run always has one
    click.echo(f"  items for user {sample['user']!r}: {', '.join(map(str, sample['recommend']))}")
    click.echo(f"  items like item {sample['item']!r}: {', '.join(map(str, sample['similar']))}")


@click.command(epilog=EMBED_EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Embed even if the live version was embedded from the same input.")
@click.option("--fold-in/--no-fold-in", "fold_in", default=True, show_default=True,
              help="Fold items the live model lacks into it (vectors from their users), or drop them.")
@json_option
def embed(job_file: Path, force: bool, fold_in: bool, as_json: bool) -> None:
    """Embed the users of JOB_FILE's input with the live model, without training, and publish.

    New users and users whose history changed get embeddings between trainings. Items first
    seen after training are folded in: each gets a vector from the users who interacted with it
    (the live model fixed), is marked `folded_in` in items.parquet, and can be recommended,
    found by `similar` and counted in histories at once; an item with too few users for a stable
    fit is listed and dropped. Users left with no known item are reported. Without new items the
    version reuses the live model, item vectors and index. Locked, logged and idempotent like `run`.
    """
    from aefeatures.config import load_job_config
    from aefeatures.jobs.embed import embed_job

    with _signals_as_errors():
        result = embed_job(load_job_config(job_file), force=force, fold_in=fold_in)
    _print_embedded(result, as_json)


def _print_embedded(result, as_json: bool) -> None:
    """What `embed` (or `run --fold-in`) published."""
    info = result.manifest.get("embedded_with", {})
    folded = result.manifest.get("folded_in") or {}
    if as_json:
        print_json({"name": result.name, "version": result.version, "status": result.status,
                     "counts": result.manifest["counts"], "embedded_with": info, "folded_in": folded})
    elif result.status == "up_to_date":
        click.echo(f"{result.name} is up to date: live version {result.version} was embedded from the same input")
    else:
        click.echo(f"published {result.name} version {result.version}: {result.manifest['counts']['users']:,} "
                   f"users embedded with the model of version {info['version']} (no training)")
        if folded.get("items"):
            click.echo(f"  {folded['items']:,} new item(s) folded in from their users; the index was rebuilt")
        if folded.get("too_few_users"):
            click.echo(f"  {folded['too_few_users']:,} new item(s) with fewer than {folded['min_users']} users were "
                       f"left out, e.g. {', '.join(str(x['item_id']) for x in folded['too_few_sample'][:5])}")
        if info["unknown_only_users"]:
            click.echo(f"  {info['unknown_only_users']:,} user(s) had only unknown items and got no embedding, "
                       f"e.g. {', '.join(map(str, info['unknown_only_sample'][:5]))}")


@click.command(epilog=EMBED_EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Republish even if the live version has the same attribute files.")
@json_option
def attributes(job_file: Path, force: bool, as_json: bool) -> None:
    """Republish the live version with fresh item attributes from JOB_FILE's `[items]`, without
    training: the same model, vectors and index. Locked, logged and idempotent like `run`."""
    from aefeatures.config import load_job_config
    from aefeatures.jobs.attributes import attributes_job

    with _signals_as_errors():
        result = attributes_job(load_job_config(job_file), force=force)
    info = result.manifest.get("attributes") or {}
    if as_json:
        print_json({"name": result.name, "version": result.version, "status": result.status,
                     "attributes": {k: v for k, v in info.items() if k != "files"}})
    elif result.status == "up_to_date":
        click.echo(f"{result.name} is up to date: live version {result.version} has the same attributes")
    else:
        click.echo(f"published {result.name} version {result.version}: attributes of {info['matched']:,} items "
                   f"({', '.join(info['columns'])}) with the model of version "
                   f"{result.manifest['attributes_from']['version']} (no training)")
        if info["unknown_ids"]:
            click.echo(f"  {info['unknown_ids']:,} row(s) named items the version does not have, e.g. "
                       f"{', '.join(map(str, info['unknown_examples']))}; they are left out")


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


def _run_summary(result) -> dict[str, Any]:
    """What `run` prints: the manifest's facts and, when a version was published, a sample
    lookup (:func:`_sample`); an up-to-date run reads no table."""
    return {
        "name": result.name, "version": result.version, "path": str(result.path),
        "counts": result.manifest["counts"], "dim": result.manifest["dim"],
        "training": result.manifest["training"], "index": result.manifest["index"],
        "evaluation": result.manifest["evaluation"], "gate": result.manifest["gate"], "status": result.status,
        "alignment": _public_alignment(result.manifest.get("alignment")), "drift": result.manifest.get("drift"),
        "timings": result.timings,
        "sample": None if result.status == "up_to_date" else _sample(
            result.path, int(result.manifest["dim"]), neighbours=result.manifest.get("item_neighbours") is not None),
    }


def _public_alignment(alignment):
    from aefeatures.quality.drift import public

    return public(alignment)


def _sample(path: Path, dim: int, k: int = 5, *, neighbours: bool = False) -> dict[str, Any]:
    """The first user's ``k`` best unseen items and the first item's ``k`` nearest items (by
    inner product), as :meth:`FeatureSet.recommend` and :meth:`FeatureSet.similar_items` give
    them, read cheaply: the first rows of the users, items and interactions tables, the item id
    column, and the memory-mapped index; not the whole tables a :class:`FeatureSet` loads.
    Fewer than ``k`` ids where an approximate index returns fewer. With ``neighbours`` (a
    version with an item-item part, whose scores the index alone does not give) the user's
    items come from :meth:`FeatureSet.recommend` itself."""
    import numpy as np
    import pyarrow.parquet as pq

    from aefeatures.store import layout
    from aefeatures.store.index import EmbeddingIndex, item_queries, user_queries

    def first_row(table: str, columns: list[str]):
        return next(pq.ParquetFile(path / table).iter_batches(batch_size=1, columns=columns))

    def vector(batch) -> np.ndarray:
        return np.asarray(batch.column("embedding")[0].as_py(), np.float32).reshape(1, dim)

    user, item = first_row(layout.USERS, ["user_id", "embedding"]), first_row(layout.ITEMS, ["item_id", "embedding"])
    seen: list[int] = []  # item rows of user row 0: the first rows of the interactions (CSR order)
    for batch in pq.ParquetFile(path / layout.INTERACTIONS).iter_batches(batch_size=4096, columns=["user_row", "item_row"]):
        rows = batch.column("user_row").to_numpy()
        seen += batch.column("item_row").to_numpy()[rows == 0].tolist()
        if (rows != 0).any():
            break
    index = EmbeddingIndex.open(path / layout.INDEX, dim)
    item_ids = pq.ParquetFile(path / layout.ITEMS).read(columns=["item_id"]).column("item_id")

    def top(query: np.ndarray, skip: set[int]) -> list[Any]:
        found = index.search(query, min(index.ntotal, k + len(skip)))[1][0]
        return [plain(item_ids[int(r)].as_py()) for r in found if r >= 0 and int(r) not in skip][:k]

    user_id = plain(user.column("user_id")[0].as_py())
    if neighbours:
        from aefeatures.serving.lookup import FeatureSet

        recommended = [plain(i) for i in FeatureSet(path.parents[2], path.parents[1].name, path.name)
                       .recommend(user_id, k).ids.tolist()]
    else:
        recommended = top(user_queries(vector(user)), set(seen))
    return {"user": user_id, "recommend": recommended,
            "item": plain(item.column("item_id")[0].as_py()), "similar": top(item_queries(vector(item)), {0})}
