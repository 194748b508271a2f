"""`versions`, `evaluate` and `runs`: what a feature set holds and how it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from aefeatures.cli.options import READ_EXIT_CODES_HELP, json_option, name_option, store_option
from aefeatures.cli.output import echo_curve, echo_metrics, gate_summary, or_dash, print_json, print_table


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@name_option
@json_option
def versions(store_dir: Path, name: str | None, as_json: bool) -> None:
    """Versions of a feature set, oldest first: live, published (superseded) or refused by the
    quality gate, with validation NDCG@100 beside popularity's and EASE's."""
    from aefeatures.serving.lookup import open_store

    store = open_store(store_dir)
    name = name or store.default_name(unpublished=True)
    rows = store.versions(name)
    if as_json:
        print_json({"feature_set": name, "versions": rows})
        return
    readable = [r for r in rows if r["status"] != "damaged"]
    print_table(["version", "status", "built", "valid_from", "users", "items", "dim", "kind", "index",
                  "ndcg@100", "popularity", "EASE", "aligned", "user_cos50", "churn@10"],
                 [[r["version"], r["status"], r["built"], r["valid_from"][:19], r["users"], r["items"], r["dim"],
                   r["kind"], r["index"], or_dash(r["ndcg@100"]), or_dash(r["popularity_ndcg@100"]),
                   or_dash(r.get("ease_ndcg@100")),
                   "-" if not r["alignment"] else ("yes" if r["alignment"]["aligned"] else "no"),
                   or_dash(((r["drift"] or {}).get("user_cosine") or {}).get("q50")),
                   or_dash(((r["drift"] or {}).get("churn") or {}).get("mean"))]
                  for r in readable])
    for r in rows:
        if r["status"] == "damaged":
            click.echo(f"warning: version {r['version']} ({r['was']}) is damaged: {r['problem']}; remove its folder "
                       "or run the job again", err=True)


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@name_option
@click.option("--version", "version", default=None, help="A version id (default: the live one).")
@json_option
def evaluate(store_dir: Path, name: str | None, version: str | None, as_json: bool) -> None:
    """Validation metrics of a version (held-out items or users), against popularity, with its
    training curve and the quality gate's verdict."""
    from aefeatures.serving.lookup import open_store

    store = open_store(store_dir)
    name = name or store.default_name()
    m = store.manifest(name, version)
    out = {"feature_set": name, "version": m["version"], "evaluation": m.get("evaluation"),
           "evaluation_skipped": m.get("evaluation_skipped"), "gate": m.get("gate"),
           "best_epoch": m["training"].get("best_epoch"),
           "history": m["training"].get("history", [])}
    if as_json:
        print_json(out)
        return
    from aefeatures.schema import closed_form

    fitted = closed_form(m["training"])
    click.echo(f"{name} version {m['version']}: {'kept fit' if fitted else 'best epoch'} {out['best_epoch']} of "
               f"{len(out['history'])}")
    echo_curve(out["history"], out["best_epoch"], closed_form=fitted)
    if not out["evaluation"]:
        why = out["evaluation_skipped"] or "evaluation was off (`evaluation.valid_share` = 0)"
        click.echo(f"no validation for this version, so the quality gate's metric checks were skipped: {why}")
        return
    echo_metrics(out["evaluation"])
    click.echo("quality gate: " + gate_summary(out["gate"]))


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@name_option
@click.option("-n", "last", type=click.IntRange(min=1), default=20, show_default=True, help="How many recent runs.")
@json_option
def runs(store_dir: Path, name: str | None, last: int, as_json: bool) -> None:
    """The run history of a feature set, newest last: status, exit code, version, timings."""
    from aefeatures.serving.lookup import open_store
    from aefeatures.store.runlog import read_runs

    name = name or open_store(store_dir).default_name(unpublished=True)
    history = read_runs(store_dir / name)[-last:]
    if as_json:
        print_json({"feature_set": name, "runs": history})
        return
    if not history:
        click.echo(f"no runs recorded for `{name}` in {store_dir}")
        return
    print_table(["started", "seconds", "status", "exit", "version", "error"],
                 [[r["started"][:19], _seconds(r), r["status"], r["exit_code"], r.get("version") or "-",
                   r.get("error") or ""] for r in history])  # the whole error: it names the cause


def _seconds(run: dict[str, Any]) -> str:
    from datetime import datetime

    start, end = (datetime.fromisoformat(run[k]) for k in ("started", "ended"))
    return f"{(end - start).total_seconds():.1f}"
