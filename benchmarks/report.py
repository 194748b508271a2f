"""Turn the stage timings and floors of a benchmark run into JSON rows, Markdown and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# stage key -> (label, what its floor is)
STAGES: dict[str, tuple[str, str]] = {
    "read_csr": ("read + validate + CSR", "raw `pl.read_parquet` of the same files, first read of a fresh process"),
    "train_epoch": ("train, one epoch", "FLOPs at the rate of the model's matmuls"),
    "embed": ("embed all users", "fp32 forward matmuls of the model's shapes"),
    "write": ("write Parquet + model", "raw `pq.write_table` of the same tables, raw write of the model"),
    "index_build": ("index build", "exact FAISS index of the same rows, saved"),
    "lookup_single": ("recommend, one user per call", "exact FAISS search, one query per call"),
    "lookup_batch": ("recommend_batch", "exact FAISS search of the same batch"),
}


def merge_run(scale: float, data: dict, stages: dict, floors: dict) -> dict[str, Any]:
    """One scale's result: every stage with its time, peak RSS, floor and ratio."""
    rows = []
    for key, (label, floor_what) in STAGES.items():
        stage, floor = stages["stages"][key], floors[key]
        rows.append({
            "stage": key,
            "label": label,
            "seconds": stage["seconds"],
            "rss_before_mb": stage["rss_before_mb"],
            "peak_rss_mb": stage["peak_rss_mb"],
            "floor": {"what": floor_what, **floor},
            "ratio": stage["seconds"] / floor["seconds"],
            "detail": stage.get("detail", {}),
        })
    return {
        "scale": scale,
        "data": data,
        "matrix": stages["matrix"],
        "model": stages["model"],
        "lookups": stages["lookups"],
        "job_peak_rss_mb": stages["peak_rss_mb"],
        "rss_at_start_mb": stages["rss_at_start_mb"],
        "torch_threads": stages["torch_threads"],
        "stages": rows,
    }


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def stage_label(row: dict, run: dict) -> str:
    detail, lookups = row["detail"], run["lookups"]
    if row["stage"] == "index_build":
        return f"{row['label']} ({detail['factory']})"
    if row["stage"] == "lookup_single":
        return f"{row['label']} (k={lookups['k']}; mean of {lookups['single']:,} calls)"
    if row["stage"] == "lookup_batch":
        return f"{row['label']} ({lookups['batch']:,} users, k={lookups['k']})"
    return row["label"]


def floor_label(row: dict) -> str:
    floor = row["floor"]
    if row["stage"] == "train_epoch":
        other = "bf16" if floor["precision"] == "fp32" else "fp32"
        return (f"{floor['what']}, {floor['precision']}: {floor['gflops']:.0f} GFLOP/s "
                f"({other}: {format_time(floor[other]['seconds'])} at {floor[other]['gflops']:.0f} GFLOP/s)")
    if row["stage"] == "embed":
        return f"{floor['what']} at {floor['gflops']:.0f} GFLOP/s"
    return floor["what"]


def run_heading(run: dict) -> str:
    m = run["matrix"]
    return f"Scale {run['scale']:g}: {m['users']:,} users × {m['items']:,} items, {m['nnz']:,} interactions"


def run_conditions(result: dict, run: dict) -> str:
    machine, versions, model, data = result["machine"], result["versions"], run["model"], run["data"]
    train = next(r for r in run["stages"] if r["stage"] == "train_epoch")
    return (
        f"{result['date']}; {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB; "
        f"torch {versions['torch']} ({run['torch_threads']} threads, device {train['detail']['device']}), "
        f"polars {versions['polars']}, pyarrow {versions['pyarrow']}, faiss-cpu {versions['faiss-cpu']}. "
        f"Data: ML-20M-shaped synthetic (seed {data['shape']['seed']}), {data['files']} Parquet files, "
        f"{data['bytes'] / 2**20:.0f} MiB. Model: `{model['kind']}`, hidden {model['hidden']}, dim {model['dim']}, "
        f"batch {model['batch_size']}, {train['floor']['precision']}. Job peak RSS {run['job_peak_rss_mb']:,.0f} MB "
        f"(the process that runs every stage, from import to lookups; {run['rss_at_start_mb']:,.0f} MB after imports)."
        + start_up_note(train) + load_note(run)
    )


def start_up_note(train: dict) -> str:
    """What the process paid once before its first step (runs from before this note have none)."""
    seconds = train["detail"].get("start_up_seconds")
    if seconds is None:
        return ""
    return (f" Before the epoch, {format_time(seconds)} of one-time start-up (torch.optim's first import of "
            f"torch._dynamo, the device's context), not in the epoch.")


def load_note(run: dict) -> str:
    """The 1-minute load average around the run: above the core count, other work shared the CPUs."""
    load = run.get("load_average")
    if not load:
        return ""
    return f" Load average {load['before']:.1f} before, {load['after']:.1f} after."


def stage_table(run: dict) -> str:
    lines = ["| stage | time | peak RSS (MB) | floor | floor time | ratio |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for row in run["stages"]:
        lines.append(f"| {stage_label(row, run)} | {format_time(row['seconds'])} | {row['peak_rss_mb']:,.0f} | "
                     f"{floor_label(row)} | {format_time(row['floor']['seconds'])} | {row['ratio']:.2f}× |")
    return "\n".join(lines)


def scale_summary(runs: list[dict]) -> str:
    """Time (ratio to floor) of every stage, one column per scale."""
    head = "| stage | " + " | ".join(f"{r['matrix']['nnz']:,} interactions" for r in runs) + " |"
    lines = [head, "| --- |" + " ---: |" * len(runs)]
    for i, (key, (label, _)) in enumerate(STAGES.items()):
        cells = [f"{format_time(r['stages'][i]['seconds'])} ({r['stages'][i]['ratio']:.1f}×)" for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| job peak RSS | " + " | ".join(f"{r['job_peak_rss_mb']:,.0f} MB" for r in runs) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The report: a summary across scales when there are several, then one table per scale."""
    parts = []
    if len(result["runs"]) > 1:
        parts += ["Time per stage (ratio to its floor) by scale:", "", scale_summary(result["runs"]), ""]
    for run in result["runs"]:
        parts += [f"**{run_heading(run)}**", "", run_conditions(result, run), "", stage_table(run), ""]
    return "\n".join(parts)


def plot(result: dict, path: Path) -> None:
    """Log-log time per stage (solid) and its floor (dashed) against interactions."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(result["runs"], key=lambda r: r["matrix"]["nnz"])
    x = [r["matrix"]["nnz"] for r in runs]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (key, (label, _)) in enumerate(STAGES.items()):
        color = f"C{i}"
        ax.plot(x, [r["stages"][i]["seconds"] for r in runs], "o-", color=color, label=label)
        ax.plot(x, [r["stages"][i]["floor"]["seconds"] for r in runs], "--", color=color, alpha=0.5, linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="interactions", ylabel="seconds (one call for single lookups)",
           title=f"aefeatures stages vs scale ({result['date']}; dashed: floors)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
