"""Time every stage of a job on ML-20M-shaped synthetic data, each next to a floor measured in
the same run on this machine.

    python benchmarks/pipeline.py                          # ML-20M scale: 138k users, 20M interactions
    python benchmarks/pipeline.py --scale 0.005            # a smoke run: 100k interactions
    python benchmarks/pipeline.py --scales 0.05,0.25,1     # several scales and a log-log plot

For each scale: generate the data (or reuse it from the cache), run the package's stages in a
process of their own (``stages.py``: read + validate + CSR, one training epoch, embed, write,
index build, single and batch lookups), then measure the floors in another (``floors.py``).
Writes JSON, a Markdown table and, with several scales, a PNG plot of time per stage against
interactions (needs the ``bench`` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlshape
import report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aefeatures" / "benchmark-data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ML-20M (default 1.0; >1 is larger)")
    parser.add_argument("--scales", help="comma-separated scales, e.g. 0.05,0.25,1: run each and plot")
    parser.add_argument("--items", type=int, help="catalogue size (default ML-20M's 26,744 at every scale)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="a [model] setting of the job file, e.g. batch_size=1024, precision=bf16, "
                             "hidden=[600,200] (repeatable; the rest keep the package's defaults)")
    parser.add_argument("--lookups", type=int, default=1000, help="single-user recommend calls")
    parser.add_argument("--batch-lookups", type=int, default=10000, help="users in one recommend_batch call")
    parser.add_argument("-k", type=int, default=10, help="results per lookup")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE, help=f"data cache (default {DEFAULT_CACHE})")
    parser.add_argument("--work-dir", type=Path, help="where the store is written (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path, help="default benchmarks/results/pipeline-SCALES.json")
    parser.add_argument("--markdown-out", type=Path, help="default benchmarks/results/pipeline-SCALES.md")
    parser.add_argument("--plot-out", type=Path, help="default benchmarks/results/pipeline-SCALES.png (several scales)")
    parser.add_argument("--from-json", type=Path, help="write the table and plot of an earlier run's JSON; run nothing")
    return parser.parse_args(argv)


def model_overrides(settings: list[str]) -> dict:
    """``KEY=VALUE`` settings as a dict; values are JSON where they parse as JSON, else strings."""
    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--model {setting!r}: expected KEY=VALUE, e.g. batch_size=1024")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value
    return overrides


def run_scale(scale: float, args: argparse.Namespace) -> dict:
    shape = mlshape.shape_for(scale, items=args.items, seed=args.seed)
    say(f"scale {scale:g}: data {shape.users:,} users × {shape.items:,} items, ~{shape.interactions:,} interactions")
    folder, data = mlshape.ensure(shape, args.data_dir)
    say(f"  {'cached' if data['cached'] else 'generated'} in {folder} ({data['rows']:,} rows)")
    files = [str(f) for f in mlshape.part_files(folder)]
    warm_page_cache(files)
    load_before = os.getloadavg()[0]
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="aefeatures-bench-") as work:
        stages_json, floors_json = Path(work) / "stages.json", Path(work) / "floors.json"
        say("  running the stages")
        child("stages.py", str(folder), work, "--json-out", str(stages_json), "--model",
              json.dumps(model_overrides(args.model)), "--single", str(args.lookups),
              "--batch", str(args.batch_lookups), "-k", str(args.k))
        say("  measuring the floors")
        child("floors.py", str(stages_json), "--json-out", str(floors_json), "--data-files", *files)
        stages, floors = json.loads(stages_json.read_text()), json.loads(floors_json.read_text())
    run = report.merge_run(scale, {**data, "path": str(folder)}, stages, floors)
    return {**run, "load_average": {"before": load_before, "after": os.getloadavg()[0]}}


def warm_page_cache(files: list[str]) -> None:
    """Read the input once, so the read stage and its floor (best of 3) both find it in memory."""
    for name in files:
        with open(name, "rb") as f:
            while f.read(1 << 24):
                pass


def child(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(HERE / script), *args])
    if done.returncode:
        raise SystemExit(f"benchmarks/{script} failed with exit code {done.returncode} (its output is above)")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "arch": platform.machine(), "cores": cores, "memory_gib": round(memory, 1),
            "python": platform.python_version()}


def versions() -> dict:
    found = {}
    for package in ("aefeatures", "torch", "polars", "pyarrow", "faiss-cpu", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def output_paths(args: argparse.Namespace, scales: list[float]) -> tuple[Path, Path, Path]:
    stem = "pipeline-" + "-".join(f"{s:g}" for s in scales)
    return (args.json_out or RESULTS / f"{stem}.json", args.markdown_out or RESULTS / f"{stem}.md",
            args.plot_out or RESULTS / f"{stem}.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        scales = [float(s) for s in args.scales.split(",")] if args.scales else [args.scale]
        runs = [run_scale(scale, args) for scale in scales]
        result = {"date": date.today().isoformat(), "machine": machine(), "versions": versions(),
                  "command": " ".join(sys.argv), "runs": runs}
    write_outputs(result, args)


def write_outputs(result: dict, args: argparse.Namespace) -> None:
    """JSON, Markdown and (with several scales, or when asked) the plot."""
    json_out, markdown_out, plot_out = output_paths(args, [run["scale"] for run in result["runs"]])
    written = [markdown_out]
    if not args.from_json:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        written.insert(0, json_out)
    markdown_out.parent.mkdir(parents=True, exist_ok=True)
    markdown_out.write_text(report.markdown(result))
    if len(result["runs"]) > 1 or args.plot_out:
        report.plot(result, plot_out)
        written.append(plot_out)
    say("wrote " + ", ".join(str(p) for p in written))
    print(report.markdown(result))  # last: a closed pipe cannot cost the files


if __name__ == "__main__":
    main()
