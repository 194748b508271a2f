"""`versions`, `evaluate` and `runs`: what a feature set holds and how it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from aefeatures.cli.options import EXIT_CODES_HELP, json_option, name_option, store_option
from aefeatures.cli.output import echo_metrics, or_dash, print_json, print_table


@click.command(epilog=EXIT_CODES_HELP)
@store_option
@name_option
@json_option
def versions(store_dir: Path, name: str | None, as_json: bool) -> None:
    """Versions of a feature set, oldest first: live, published (superseded) or refused by the
    quality gate, with validation NDCG@100 beside popularity's and EASE's."""
    from aefeatures.serving.lookup import open_store

    store = open_store(store_dir)
    name = name or store.default_name()
    rows = store.versions(name)
    if as_json:
        print_json({"feature_set": name, "versions": rows})
        return
    print_table(["version", "status", "built", "created_at", "users", "items", "dim", "kind", "index",
                  "ndcg@100", "popularity", "EASE"],
                 [[r["version"], r["status"], r["built"], r["created_at"][:19], r["users"], r["items"], r["dim"],
                   r["kind"], r["index"], or_dash(r["ndcg@100"]), or_dash(r["popularity_ndcg@100"]),
                   or_dash(r.get("ease_ndcg@100"))]
                  for r in rows])


@click.command(epilog=EXIT_CODES_HELP)
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
        print_json(out)
        return
    click.echo(f"{name} version {m['version']}: best epoch {out['best_epoch']} of {len(out['history'])}")
    if not out["evaluation"]:
        click.echo("evaluation was off for this version (evaluation.valid_share = 0)")
        return
    echo_metrics(out["evaluation"])
    gate = out["gate"] or {}
    click.echo("quality gate: " + ("passed" if gate.get("passed", True) else "refused: " + "; ".join(gate["reasons"])))


@click.command(epilog=EXIT_CODES_HELP)
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
        print_json({"feature_set": name, "runs": history})
        return
    if not history:
        click.echo(f"no runs recorded for `{name}` in {store_dir}")
        return
    print_table(["started", "seconds", "status", "exit", "version", "error"],
                 [[r["started"][:19], _seconds(r), r["status"], r["exit_code"], r.get("version") or "-",
                   (r.get("error") or "")[:60]] for r in history])


def _seconds(run: dict[str, Any]) -> str:
    from datetime import datetime

    start, end = (datetime.fromisoformat(run[k]) for k in ("started", "ended"))
    return f"{(end - start).total_seconds():.1f}"
