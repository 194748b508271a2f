"""`report.html`: a run's training curves and metrics, for a person to look at.

A single self-contained file (inline SVG, no scripts, no downloads) written into every version.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from aefeatures.quality.drift import CHURN_K, describe
from aefeatures.schema import KEY_METRIC, KS, closed_form

WIDTH, HEIGHT, PAD = 420, 220, 36


def _chart(title: str, values: Sequence[float], best: int | None) -> str:
    if not values:
        return f"<figure><figcaption>{html.escape(title)}: no epochs</figcaption></figure>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = (WIDTH - 2 * PAD) / max(len(values) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return PAD + i * step, HEIGHT - PAD - (v - lo) / span * (HEIGHT - 2 * PAD)

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(values)))
    marker = ""
    if best:
        bx, by = xy(best - 1, values[best - 1])
        marker = f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="4" fill="#d62728"><title>best epoch {best}</title></circle>'
    return (
        f'<figure><figcaption>{html.escape(title)}</figcaption>'
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#ccc"/>'
        f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>{marker}'
        f'<text x="{PAD}" y="{PAD - 6}" font-size="11">{hi:.4g}</text>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" font-size="11">{lo:.4g} · epochs 1–{len(values)}</text>'
        f"</svg></figure>"
    )


def _drift_chart(drift: dict[str, Any]) -> str:
    """Box plots on a −1…1 axis of the cosine between each shared user's / item's live and new
    vectors (whiskers 5–95%, box 25–75%, tick at the median), and the top-k churn on 0…1."""
    width, row, left = 520, 46, 120
    scale = width - left - 20

    def x(v: float, lo: float = -1.0, hi: float = 1.0) -> float:
        return left + (v - lo) / (hi - lo) * scale

    rows, y = [], 30
    for what in ("user", "item"):
        c = drift.get(f"{what}_cosine") or {}
        if not c.get("count"):
            continue
        label = f"{what} cosine (n={c['count']:,})"
        rows.append(
            f'<text x="4" y="{y + 5}" font-size="12">{html.escape(label)}</text>'
            f'<line x1="{x(c["q05"]):.1f}" x2="{x(c["q95"]):.1f}" y1="{y}" y2="{y}" stroke="#555"/>'
            f'<rect x="{x(c["q25"]):.1f}" y="{y - 10}" width="{x(c["q75"]) - x(c["q25"]):.1f}" height="20" '
            f'fill="#aec7e8" stroke="#1f77b4"><title>25%–75%: {c["q25"]:.3f}–{c["q75"]:.3f}</title></rect>'
            f'<line x1="{x(c["q50"]):.1f}" x2="{x(c["q50"]):.1f}" y1="{y - 12}" y2="{y + 12}" stroke="#d62728" '
            f'stroke-width="3"><title>median {c["q50"]:.3f}</title></line>')
        y += row
    churn = drift.get("churn") or {}
    if churn.get("users"):
        rows.append(
            f'<text x="4" y="{y + 5}" font-size="12">top-{churn["k"]} churn</text>'
            f'<rect x="{left}" y="{y - 10}" width="{churn["mean"] * scale:.1f}" height="20" fill="#ff9896">'
            f'<title>mean churn {churn["mean"]:.3f}</title></rect>'
            f'<text x="{left + churn["mean"] * scale + 4:.1f}" y="{y + 5}" font-size="11">{churn["mean"]:.3f}</text>'
            f'<text x="{left - 3}" y="{y + 24}" font-size="10">0</text>'
            f'<text x="{left + scale - 3}" y="{y + 24}" font-size="10">1</text>')
        y += row
    axis = "".join(f'<text x="{x(v) - 8:.1f}" y="14" font-size="10">{v:g}</text>'
                   f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="18" y2="{y - row + 14}" stroke="#eee"/>'
                   for v in (-1, -0.5, 0, 0.5, 1))
    return (f'<figure><figcaption>cosine between live and new vectors (whiskers 5–95%, box 25–75%, red: median; '
            f'axis −1…1) and mean top-{churn.get("k", CHURN_K)} churn (0: same top-k, 1: all new)'
            f'</figcaption><svg width="{width}" height="{y}" role="img" aria-label="drift against the live version">'
            f"{axis}{''.join(rows)}</svg></figure>")


def _metrics_table(columns: dict[str, dict[str, float] | None]) -> str:
    names = [f"{m}@{k}" for m in ("recall", "ndcg", "coverage") for k in KS]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for metric in names:
        cells = "".join(f"<td>{(col or {}).get(metric, float('nan')):.4f}</td>" for col in columns.values())
        rows.append(f"<tr><th>{metric}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _drift_section(manifest: dict[str, Any]) -> str:
    lines = describe(manifest.get("alignment"), manifest.get("drift"))
    if not lines:
        return ""
    drift = manifest.get("drift") or {}
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    chart = _drift_chart(drift) if "user_cosine" in drift else ""
    return f"<h2>Drift against {html.escape(str(drift.get('against', '')))}</h2><ul>{items}</ul>{chart}"


def render(manifest: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """The report of the version described by ``manifest``, against ``previous`` (or None)."""
    history = manifest["training"].get("history", [])
    evaluation = manifest.get("evaluation") or {}
    best = manifest["training"].get("best_epoch")
    gate = manifest.get("gate", {})
    skipped = ("<p>No validation for this run, so the quality gate's metric checks were skipped: "
               f"{html.escape(manifest.get('evaluation_skipped') or 'evaluation was off')}.</p>")
    columns = {"this version": evaluation.get("model"), "popularity": evaluation.get("popularity")}
    reference = evaluation.get("reference") or {}
    if KEY_METRIC in reference:
        columns[f"EASE (λ={reference['lambda']:g})"] = {k: v for k, v in reference.items()
                                                        if k not in ("method", "lambda", "tried", "seconds")}
    if previous:
        columns[f"previous ({previous['version']})"] = (previous.get("evaluation") or {}).get("model")
    verdict = (gate.get("why", "not run") if gate.get("skipped") else
               "passed" if gate.get("passed", True) else "refused: " + "; ".join(gate.get("reasons", [])))
    if closed_form(manifest["training"]):
        charts = _fits_table(history, best)  # dlae: closed-form fits, no loss curve
    else:
        charts = _chart("training loss per user", [h["loss"] for h in history], best)
        if evaluation:
            charts += _chart(f"validation {KEY_METRIC}", _carried(history), best)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(manifest['feature_set'])} {manifest['version']}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:0 2em 1em 0}}</style>
</head><body>
<h1>{html.escape(manifest['feature_set'])} · version {manifest['version']}</h1>
<p>{manifest['counts']['users']:,} users × {manifest['counts']['items']:,} items · model
{html.escape(manifest['config']['model']['kind'])}, dim {manifest['dim']} · best epoch {best} of
{len(history)} · quality gate {html.escape(verdict)}</p>
{charts}
{_drift_section(manifest)}
<h2>Validation ({html.escape(str(evaluation.get('protocol', 'off')))})</h2>
{_metrics_table(columns) if evaluation else skipped}

{_reference_note(evaluation)}
<p>Training stopped by {html.escape(str(manifest['training'].get('stop_reason', '?')))};
refit on every user: {html.escape(_refit_note(manifest['training'].get('refit')))}.</p>
</body></html>
"""


def _fits_table(history: list[dict[str, Any]], best: int | None) -> str:
    """A dlae's search as a table: one row per closed-form fit, the kept one in bold."""
    keys = [("users", "users", "{:,}"), ("dropout", "dropout p", "{:g}"), ("l2", "λ", "{:g}"),
            ("popularity_exponent", "popularity β", "{:g}"), (KEY_METRIC, f"validation {KEY_METRIC}", "{:.4f}"),
            ("seconds", "seconds", "{:.1f}")]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in keys)
    rows = []
    for h in history:
        cells = "".join(f"<td>{fmt.format(h[key]) if key in h else ''}</td>" for key, _, fmt in keys)
        style = ' style="font-weight:bold"' if h.get("epoch") == best else ""
        rows.append(f"<tr{style}><th>{h.get('epoch', '')}</th>{cells}</tr>")
    return f"<h2>Closed-form fits</h2><table><tr><th>fit</th>{head}</tr>{''.join(rows)}</table>"


def _reference_note(evaluation: dict[str, Any]) -> str:
    reference = evaluation.get("reference") or {}
    if reference.get("skipped"):
        return f"<p>EASE reference skipped: {html.escape(reference['skipped'])}.</p>"
    if reference.get(KEY_METRIC):
        ratio = evaluation["model"][KEY_METRIC] / reference[KEY_METRIC]
        return f"<p>This version reaches {ratio:.3f}× EASE's validation {KEY_METRIC} (Steck 2019, λ tuned).</p>"
    return ""


def _refit_note(refit: dict[str, Any] | None) -> str:
    if not refit:
        return "off"
    if refit["status"] == "published":
        return f"{refit['epochs']} epochs on all {refit['users']:,} users, published"
    return f"skipped ({refit.get('reason', '')})"


def _carried(history: list[dict[str, Any]]) -> list[float]:
    """Validation metric per epoch; epochs that were not validated (small data validates every
    few epochs) carry the last validated value."""
    out, last = [], 0.0
    for h in history:
        last = h.get(KEY_METRIC, last)
        out.append(last)
    return out
