"""How commands print: tables for people, strict JSON for machines, Parquet files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import click

from aefeatures.schema import KEY_METRIC
from aefeatures.store.publish import atomic_file


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=json_default))


def json_default(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        click.echo("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def ranked(ids, scores, key: str = "item_id") -> list[dict[str, Any]]:
    return [{"rank": n + 1, key: plain(i), "score": float(s)} for n, (i, s) in enumerate(zip(ids, scores))]


def typed(ids, value: str) -> Any:
    """A command-line id as the store types it (42, not "42", for integer ids)."""
    return int(value) if ids.dtype.kind in "iu" else value


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_parquet(frame, path: Path) -> None:
    """Write a Polars frame to ``path`` atomically (readers never see half a file)."""
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)


def or_dash(value: float | None) -> Any:
    return "-" if value is None else value


def echo_metrics(evaluation: dict[str, Any], indent: str = "") -> None:
    click.echo(f"{indent}validation on {evaluation['valid_users']:,} held-out users "
               f"({evaluation['holdout']:.0%} of their items hidden):")
    names = ["recall@20", "ndcg@10", "ndcg@100", "coverage@20"]
    rows = [("model", "model"), ("popularity", "popularity")]
    reference = evaluation.get("reference") or {}
    if KEY_METRIC in reference:
        rows.append((f"EASE (λ={reference['lambda']:g})", "reference"))
    print_table(["", *names], [[f"{indent}{label}", *(evaluation[key][n] for n in names)] for label, key in rows])
    if KEY_METRIC in reference and reference[KEY_METRIC] > 0:
        click.echo(f"{indent}model / EASE {KEY_METRIC}: {evaluation['model'][KEY_METRIC] / reference[KEY_METRIC]:.3f}")
    elif reference.get("skipped"):
        click.echo(f"{indent}EASE reference skipped: {reference['skipped']}")
