"""`aefeatures run` and `aefeatures embed`: the scheduled jobs."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from aefeatures.cli.options import EXIT_CODES_HELP, json_option
from aefeatures.cli.output import echo_metrics, plain, print_json
from aefeatures.errors import Interrupted


@click.command(epilog=EXIT_CODES_HELP)
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
        print_json(summary)
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
    if train.get("stop_reason") == "fitted":  # dlae: closed form, one fit per candidate dropout
        chosen = train.get("chosen", {}).get("dropout", m["config"]["model"]["dropout"])
        click.echo(f"  training  {train['epochs']} closed-form fit(s) on {train['device']} in {train['seconds']:.1f}s, "
                   f"dropout {chosen:g}")
    else:
        click.echo(f"  training  {train['epochs']} epochs on {train['device']} in {train['seconds']:.1f}s{final}")
    if train.get("stop_reason") != "fitted":
        click.echo(f"  training  best epoch {train['best_epoch']} of at most {train.get('max_epochs', '?')}, "
                   f"stopped by {train.get('stop_reason', '?')}")
    refit = train.get("refit")
    if refit:
        done = f" on all {refit['users']:,} users" + ("" if train.get("stop_reason") == "fitted" else
                                                      f", {refit['epochs']} epochs") + f" in {refit['seconds']:.1f}s"
        click.echo(f"  refit     {refit['status']}" + (done if refit["status"] == "published" else f": {refit['reason']}"))
    if m["evaluation"]:
        echo_metrics(m["evaluation"], indent="  ")
    click.echo(f"  index     {m['index']['factory']}, recall@10 vs exact {m['index']['recall_at_10']:.3f}")
    click.echo(f"  stored in {result.path}")
    sample = summary["sample"]
    click.echo(f"  items for user {sample['user']!r}: {', '.join(map(str, sample['recommend']))}")
    click.echo(f"  items like item {sample['item']!r}: {', '.join(map(str, sample['similar']))}")


@click.command(epilog=EXIT_CODES_HELP)
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
        print_json({"name": result.name, "version": result.version, "status": result.status,
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


def _run_summary(result) -> dict[str, Any]:
    from aefeatures.serving.lookup import FeatureSet

    fs = FeatureSet(result.path.parent.parent.parent, result.name, result.version)
    user, item = plain(fs.user_ids[0]), plain(fs.item_ids[0])
    return {
        "name": result.name, "version": result.version, "path": str(result.path),
        "counts": result.manifest["counts"], "dim": result.manifest["dim"],
        "training": result.manifest["training"], "index": result.manifest["index"],
        "evaluation": result.manifest["evaluation"], "gate": result.manifest["gate"], "status": result.status,
        "timings": result.timings,
        "sample": {"user": user, "recommend": [plain(i) for i in fs.recommend(user, 5).ids],
                   "item": item, "similar": [plain(i) for i in fs.similar_items(item, 5).ids]},
    }
