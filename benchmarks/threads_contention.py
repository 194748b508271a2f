"""Training in a container with a CPU quota, alone and beside a CPU hog: torch's default thread
count (the CPU set's size) against the count aefeatures chooses (the cgroup quota).

Needs root and a writable cgroup (v1 ``/sys/fs/cgroup/cpu`` or v2 ``/sys/fs/cgroup``): it makes
a cgroup with a quota of ``--quota`` CPUs, and runs each training in it, alone or next to one
busy-looping process in the same cgroup (a container's other work). Each training is a fixed
number of epochs on the committed fixture, timed in a fresh process; the best of ``--repeat``.

    python benchmarks/threads_contention.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
with open(os.environ["BENCH_CGROUP_PROCS"], "w") as f:
    f.write(str(os.getpid()))
from aefeatures.config import load_job_config
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model.train import train
cfg = load_job_config(sys.argv[1])
matrix = build_matrix(read_interactions(cfg.input), binarize=True)
start = time.perf_counter()
result = train(matrix, cfg.model, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "threads": result.threads}))
"""

HOG = "import os\nopen(os.environ['BENCH_CGROUP_PROCS'], 'w').write(str(os.getpid()))\nwhile True: pass\n"


def make_cgroup(quota: float) -> tuple[Path, str]:
    """A fresh cgroup limited to ``quota`` CPUs: (its folder, the file that takes a pid)."""
    name = f"aefeatures-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        folder = v1 / name
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        return folder, str(folder / "cgroup.procs")
    folder = Path("/sys/fs/cgroup") / name
    folder.mkdir()
    (folder / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
    return folder, str(folder / "cgroup.procs")


def train_once(job: Path, procs: str, threads: int, hog: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), BENCH_CGROUP_PROCS=procs)
    job.write_text(job.read_text().split("threads =")[0] + f"threads = {threads}\n")
    hogger = subprocess.Popen([sys.executable, "-c", HOG], env=env) if hog else None
    try:
        time.sleep(0.2 if hog else 0)
        done = subprocess.run([sys.executable, "-c", CHILD, str(job)], env=env, capture_output=True, text=True,
                              timeout=900, check=True)
    finally:
        if hogger is not None:
            hogger.kill()
            hogger.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=float, default=1.0, help="CPUs the cgroup may use")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    cpus = len(os.sched_getaffinity(0))
    folder, procs = make_cgroup(args.quota)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(
            f'[job]\nname = "bench"\nstore = "{tmp}/store"\n'
            f'[input]\npath = "{REPO}/fixtures/interactions.parquet"\n'
            f"[model]\ndim = 64\nhidden = [600]\nepochs = {args.epochs}\nbatch_size = 256\n"
            "threads = 0\n")
        rows = []
        try:
            for label, threads in (("torch default (CPU set)", cpus), ("aefeatures (quota)", 0)):
                times = {}
                for hog in (False, True):
                    runs = [train_once(job, procs, threads, hog) for _ in range(args.repeat)]
                    times[hog] = min(r["seconds"] for r in runs)
                    used = runs[0]["threads"]
                rows.append((label, used, times[False], times[True]))
        finally:
            folder.rmdir()  # every process started here has ended: the cgroup is empty
    load = os.getloadavg()[0]
    print(f"machine: {cpus} CPUs in the CPU set, cgroup quota {args.quota} CPU, load average {load:.1f}")
    print(f"training: {args.epochs} epochs on the fixture, best of {args.repeat}")
    print("| threads chosen by | threads | alone (s) | beside a hog (s) | hog / alone |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, used, alone, hogged in rows:
        print(f"| {label} | {used} | {alone:.2f} | {hogged:.2f} | {hogged / alone:.2f} |")
    print(f"beside the hog, default / aefeatures: {rows[0][3] / rows[1][3]:.2f}")


if __name__ == "__main__":
    main()
