"""Time `aefeatures run` end to end with the default settings on ML-20M-shaped data, as an
operator's nightly job runs it: one process of the CLI, from reading the Parquet parts to the
published version (validation, the model's search, the refit, embedding, the EASE reference
where the catalogue allows it, tables, index, report).

    python benchmarks/whole_run.py                 # ML-20M scale: 138k users, 20M interactions
    python benchmarks/whole_run.py --scale 0.05    # ~1M interactions, a few minutes
    python benchmarks/whole_run.py --nproc 2       # under torchrun, 2 gloo ranks on this machine

The data comes from ``benchmarks/mlshape.py`` (generated once, cached like ``pipeline.py``'s).
The peer measured in the same run is one training fit of the published model on every user
(the refit, from the manifest): the table gives the whole run as a multiple of it, and the
manifest's own account of every validation fit. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import mlshape

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aefeatures" / "benchmark-data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ML-20M (default 1.0)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--work-dir", type=Path, help="where the store is written (default: a temporary folder)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="a [model] setting for the job, TOML value syntax (default: none, the defaults)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks: above 1 the run is launched by torchrun")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--markdown-out", type=Path)
    args = parser.parse_args()
    shape = mlshape.shape_for(args.scale)
    folder, data = mlshape.ensure(shape, args.data_dir)
    print(f"data: {shape.users:,} users × {shape.items:,} items, {data['rows']:,} rows in {folder}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="aefeatures-run-") as work:
        job = Path(work) / "ml20m.toml"
        model = "".join(f"{setting}\n" for setting in args.model)
        job.write_text(f'[job]\nname = "ml20m"\nstore = "{work}/store"\n\n'
                       f'[input]\npath = "{folder}"\nuser_col = "user_id"\nitem_col = "item_id"\n'
                       f'timestamp_col = "timestamp"\n\n[model]\n{model}')
        started = time.perf_counter()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"] \
            if args.nproc > 1 else [sys.executable]
        done = subprocess.run([*launcher, "-m", "aefeatures", "run", str(job)], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if done.returncode:
            raise SystemExit(f"aefeatures run failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
        manifest = json.loads(next((Path(work) / "store" / "ml20m" / "versions").glob("*/manifest.json")).read_text())
    training = manifest["training"]
    refit_seconds = (training.get("refit") or {}).get("seconds")
    result = {
        "date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "scale": args.scale, "ranks": args.nproc, "timings": manifest["timings"],
        "users": manifest["counts"]["users"], "items": manifest["counts"]["items"],
        "interactions": data["rows"], "model": manifest["config"]["model"], "run_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb), "training_seconds": training["seconds"], "refit": training.get("refit"),
        "fits": training["history"], "chosen": training.get("chosen"), "evaluation": manifest.get("evaluation"),
        "run_over_one_fit": round(seconds / refit_seconds, 2) if refit_seconds else None,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]}, "stdout": done.stdout,
    }
    name = f"whole-run-{args.scale:g}" + (f"-{args.nproc}ranks" if args.nproc > 1 else "")
    (args.json_out or RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.markdown_out or RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    model = r["model"]
    lines = [f"**`aefeatures run`, default settings, scale {r['scale']:g}: {r['users']:,} users × {r['items']:,} "
             f"items, {r['interactions']:,} interactions** ({r['date']}, {r['machine']}; load average "
             f"{r['load_average']['before']:.1f} before, {r['load_average']['after']:.1f} after)", "",
             f"kind `{model['kind']}`, dim {model['dim']}, {r.get('ranks', 1)} rank(s). Stages (rank 0): "
             + ", ".join(f"{k} {v:.1f} s" for k, v in r.get("timings", {}).items())
             + f". Whole run **{r['run_seconds'] / 60:.1f} min**, peak RSS "
             f"{r['peak_rss_mb']:,} MB; training (validation fits and refit) {r['training_seconds'] / 60:.1f} min; "
             f"chosen {r['chosen']}; the run is {r['run_over_one_fit']}× one fit on every user (the refit, "
             f"{(r['refit'] or {}).get('seconds', 0):.0f} s).", "",
             "| fit | users | path | iterations | dropout | l2 | popularity exponent | validation NDCG@100 | fit s "
             "| with validation s | all-reduced MB (per rank) |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for h in r["fits"]:
        lines.append(f"| {h['epoch']} | {h.get('users', '')} | {h.get('method', '')} | {h.get('iterations', '')} | "
                     f"{h.get('dropout', '')} | {h.get('l2', '')} | {h.get('popularity_exponent', '')} | "
                     f"{h.get('ndcg@100', '')} | {h.get('fit_seconds', '')} | {h.get('seconds', '')} | "
                     f"{h.get('reduced_mb', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
