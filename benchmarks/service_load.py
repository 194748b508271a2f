"""The HTTP lookup service under load on loopback, next to the in-process Python API (the floor).

    python benchmarks/service_load.py                    # 100k-item store, 10 s per point
    python benchmarks/service_load.py --items 5000 --users 3000 --seconds 2   # smoke run

Needs `wrk` (Debian/Ubuntu: `apt-get install wrk`): a bounded, closed-loop load generator
(`-d` seconds, `-c` connections) that costs the machine far less than a Python client would.
A real job builds the store once (cached under --cache); then, for `recommend` and `similar`,
the same random ids go (1) through the Python API in a loop, one call at a time, and (2) through
`aefeatures serve` at concurrency 1, 8 and 32. Prints a Markdown table; --json-out keeps it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
import psutil

import aefeatures

NAME = "bench"
ENDPOINTS = {"recommend": "/v1/{name}/recommend?user={id}&k=10", "similar": "/v1/{name}/similar?item={id}&k=10"}


def build_store(cache: Path, n_users: int, n_items: int, epochs: int) -> Path:
    """A store with one published version trained on planted synthetic data (cached)."""
    folder = cache / f"service_{n_users}u_{n_items}i_{epochs}e_h128"
    store = folder / "store"
    if (store / NAME / "LATEST").is_file():
        return store
    import polars as pl  # noqa: F401  (the job reads Parquet through polars)

    from aefeatures.config import load_job_config
    from aefeatures.data.synthetic import generate
    from aefeatures.jobs.run import run_job

    folder.mkdir(parents=True, exist_ok=True)
    generate(n_users=n_users, n_items=n_items, n_communities=50, mean_items=30, seed=0).interactions.write_parquet(
        folder / "interactions.parquet")
    (folder / "job.toml").write_text(f"""
[job]
name = "{NAME}"
store = "store"
[input]
path = "interactions.parquet"
weight_col = "rating"
timestamp_col = "timestamp"
[model]
kind = "dae"
dim = 64
hidden = [128]
epochs = {epochs}
batch_size = 512
[index]
kind = "auto"
[gate]
beat_popularity = false
""")
    run_job(load_job_config(folder / "job.toml"), progress=False)
    return store


def api_floor(fs, endpoint: str, ids: list, calls: int) -> dict:
    """The Python API answering the same lookups one at a time: latency and throughput."""
    call = (lambda i: fs.recommend(i, 10)) if endpoint == "recommend" else (lambda i: fs.similar_items(i, 10))
    for i in ids[:50]:
        call(i)  # warm caches and pages
    latencies = []
    start = time.perf_counter()
    for n in range(calls):
        t = time.perf_counter()
        call(ids[n % len(ids)])
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"path": "python api", "workers": "-", "concurrency": 1, "requests_per_s": calls / elapsed,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "errors": 0}


def start_service(store: Path, workers: int = 1) -> tuple[subprocess.Popen, int]:
    """`aefeatures serve` on a free port, once every worker answers /healthz: (process, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "aefeatures", "serve", "--store", str(store), "--port", "0",
                             "--workers", str(workers)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"http://[\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            port = int(match.group(1))
            deadline = time.monotonic() + 120
            while not _healthy(port):  # every worker has loaded the store once all answer
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not answer /healthz")
                time.sleep(0.2)
            return proc, port
    raise SystemExit(f"the service did not start (exit {proc.wait()})")


def _healthy(port: int, tries: int = 8) -> bool:
    try:
        for _ in range(tries):  # new connections, so they spread over the workers
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
        return True
    except OSError:
        return False


def wrk(port: int, endpoint: str, ids: list, concurrency: int, seconds: float, folder: Path) -> dict:
    script = folder / f"{endpoint}.lua"
    path = ENDPOINTS[endpoint].format(name=NAME, id="%s")
    script.write_text("ids = {" + ",".join(json.dumps(str(i)) for i in ids) + "}\n"
                      "math.randomseed(7)\n"
                      "request = function()\n"
                      f'  return wrk.format("GET", string.format("{path}", ids[math.random(#ids)]))\n'
                      "end\n")
    command = ["wrk", "-t1", f"-c{concurrency}", "--latency", "-s", str(script), f"http://127.0.0.1:{port}"]
    subprocess.run([*command, "-d1s"], capture_output=True, check=True)  # warm-up, not measured
    out = subprocess.run([*command, f"-d{seconds}s"], capture_output=True, text=True, check=True).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _ms(percentiles["50"]), "p99_ms": _ms(percentiles["99"]), "errors": errors}


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=30_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aefeatures-bench")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (or your system's package), then run again.")

    import faiss

    faiss.omp_set_num_threads(1)  # as the service does
    store = build_store(args.cache, args.users, args.items, args.epochs)
    fs = aefeatures.open_store(store)[NAME].load()
    rng = np.random.default_rng(0)
    ids = {"recommend": rng.choice(fs.user_ids, 1000).tolist(), "similar": rng.choice(fs.item_ids, 1000).tolist()}
    rows = []
    for endpoint in ENDPOINTS:
        rows.append({"endpoint": endpoint, **api_floor(fs, endpoint, ids[endpoint], 2000)})
        print(json.dumps(rows[-1]), flush=True)
    service_rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in map(int, args.workers.split(",")):
            proc, port = start_service(store, workers)
            try:
                for endpoint in ENDPOINTS:
                    for c in map(int, args.concurrency.split(",")):
                        result = wrk(port, endpoint, ids[endpoint], c, args.seconds, Path(tmp))
                        rows.append({"endpoint": endpoint, "path": "http", "workers": workers, "concurrency": c, **result})
                        print(json.dumps(rows[-1]), flush=True)
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                service_rss[workers] = sum(p.memory_info().rss for p in tree) / 2**20
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)

    floor = {r["endpoint"]: r for r in rows if r["path"] == "python api"}
    print(f"\n{fs.n_items:,}-item store ({fs.manifest['index']['factory']} index), {fs.n_users:,} users, "
          f"{date.today()}, {platform.machine()} {psutil.cpu_count()} cores, wrk -t1, {args.seconds:g} s a point\n")
    print("| endpoint | path | workers | concurrency | requests/s | p50 ms | p99 ms | p50 × API | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["p50_ms"] / floor[r["endpoint"]]["p50_ms"]
        print(f"| {r['endpoint']} | {r['path']} | {r['workers']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio:.1f}× | {r['errors']} |")
    print("\nservice RSS after the load (all processes): " +
          ", ".join(f"{w} worker(s) {mb:,.0f} MiB" for w, mb in service_rss.items()))
    if args.json_out:
        args.json_out.write_text(json.dumps({"date": date.today().isoformat(), "items": fs.n_items,
                                             "users": fs.n_users, "index": fs.manifest["index"], "rows": rows,
                                             "service_rss_mb": service_rss}, indent=2))


if __name__ == "__main__":
    main()
