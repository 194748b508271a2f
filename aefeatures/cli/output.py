"""How commands print: tables for people, strict JSON for machines, Parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from aefeatures.store.publish import atomic_file


def print_json(value: Any) -> None:
    """Strict JSON (RFC 8259): a NaN or infinite float is written as null."""
    from aefeatures.schema import strict_json  # schema needs pyarrow: not on the --help path

    click.echo(strict_json(value, indent=2, default=json_default))


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
    """A command-line id as the store types it (42, not "42", for integer ids); the one rule
    of :func:`aefeatures.schema.parse_id`."""
    from aefeatures.schema import parse_id

    return parse_id(value, ids.dtype)


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_parquet(frame, path: Path) -> None:
    """Write a Polars frame to ``path`` atomically (readers never see half a file)."""
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)


def or_dash(value: float | None) -> Any:
    return "-" if value is None else value


def echo_metrics(evaluation: dict[str, Any], indent: str = "") -> None:
    from aefeatures.schema import KEY_METRIC  # schema needs pyarrow: not on the --help path

    if evaluation.get("protocol") == "held-out items":
        click.echo(f"{indent}validation on {evaluation['valid_users']:,} users' held-out items "
                   f"({evaluation['holdout']:.0%} of their items hidden, the rest in training):")
    else:
        click.echo(f"{indent}validation on {evaluation['valid_users']:,} held-out users "
                   f"({evaluation['holdout']:.0%} of their items hidden):")
    names = ["recall@20", "ndcg@10", "ndcg@100", "coverage@20"]
    rows = [("model", "model"), ("popularity", "popularity")]
    reference = evaluation.get("reference") or {}
    if KEY_METRIC in reference:
        rows.append((f"EASE (λ={reference['lambda']:g})", "reference"))
    print_table(["", *names], [[f"{indent}{label}", *(evaluation[key][n] for n in names)] for label, key in rows])
    if KEY_METRIC in reference and reference[KEY_METRIC] > 0:
        edge = (" (EASE's λ is at the edge of its grid, where its metric was still rising: EASE may be "
                "under-tuned and this ratio too high)") if reference.get("at_grid_edge") else ""
        click.echo(f"{indent}model / EASE {KEY_METRIC}: {evaluation['model'][KEY_METRIC] / reference[KEY_METRIC]:.3f}"
                   f"{edge}")
    elif reference.get("skipped"):
        click.echo(f"{indent}EASE reference skipped: {reference['skipped']}")


def gate_summary(gate: dict[str, Any] | None) -> str:
    """The quality gate's verdict in one line: what was checked, and passed or why refused."""
    gate = gate or {}
    if not gate:
        return "not recorded"
    if gate.get("skipped"):  # a version `aefeatures embed` made: no gate ran
        return gate.get("why", "not run")
    if not gate.get("passed", True):
        return "refused: " + "; ".join(gate.get("reasons", []))
    checks = []
    if "score" in gate:
        metric = gate.get("metric", "ndcg@100")
        if "popularity" in gate:
            checks.append(f"validation {metric} {gate['score']:.4f} > popularity's {gate['popularity']:.4f}")
        if "floor" in gate:
            checks.append(f"≥ {gate['floor']:.4f} (the floor from live version {gate['previous_version']})")
    elif gate.get("note"):
        checks.append(gate["note"])
    if gate.get("min_recall"):
        checks.append(f"index recall@10 {gate['index_recall_at_10']:.3f} ≥ {gate['min_recall']:g}")
    return "passed" + (": " + "; ".join(checks) if checks else "")


def echo_curve(history: list[dict[str, Any]], best_epoch: int | None, most: int = 25, *,
               closed_form: bool = False) -> None:
    """The training curve, one row per epoch (at most ``most``: then evenly spaced, with the
    first, the best and the last); the best epoch is marked. ``closed_form`` (a dlae): one row
    per fit, with its p, λ, β and users, the kept fit marked."""
    if not history:
        click.echo("training curve: no epochs")
        return
    if closed_form:  # no epochs or losses
        columns = ["users", "dropout", "l2", "popularity_exponent", "ndcg@100", "seconds"]
        click.echo("closed-form fits:")
        print_table(["fit", *columns, "kept"], [[r["epoch"], *(r.get(c, "-") for c in columns),
                                                 "*" if r["epoch"] == best_epoch else ""] for r in history])
        return
    keep = set(range(0, len(history), max(1, -(-len(history) // most)))) | {len(history) - 1}
    keep |= {i for i, r in enumerate(history) if r.get("epoch") == best_epoch}
    metrics = [k for k in history[0] if k not in ("epoch", "loss", "beta")]
    headers = ["epoch", "loss", *metrics, "best"]
    click.echo("training curve:")
    print_table(headers, [[r["epoch"], r["loss"], *(r.get(m, "-") for m in metrics),
                           "*" if r["epoch"] == best_epoch else ""] for i, r in enumerate(history) if i in keep])
