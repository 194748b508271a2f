"""Each FAISS index kind on a large catalogue: build time, size, opening time, recall, speed.

    python benchmarks/faiss_kinds.py                          # 1M items x 64 dims (minutes)
    python benchmarks/faiss_kinds.py --items 20000 --json-out /tmp/f.json   # smoke run

Item rows are ``[w, b]`` and queries ``[z, 1]``, exactly as the store indexes them. The data is
clustered (a mixture of Gaussians, users mixing a few clusters) because on unclustered random
vectors approximate search loses its recall and the numbers would say nothing. Recall@20 is
against exact search over the same rows; the exact (Flat) index is the floor for speed.
Prints a Markdown table; ``--json-out`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import psutil

from aefeatures.store.index import (
    build_index,
    exact_neighbours,
    item_rows,
    load_index,
    padded,
    save_index,
    search_effort,
    tune_search,
    user_queries,
)

K = 20


def clustered(n_items: int, n_users: int, dim: int, seed: int = 0):
    """(item rows (n_items, dim+1), user queries (n_users, dim+1)) with cluster structure."""
    rng = np.random.default_rng(seed)
    n_clusters = max(16, int(np.sqrt(n_items)))
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    items = np.empty((n_items, dim), np.float32)
    for start in range(0, n_items, 100_000):  # in chunks: no full-size float64 temporaries
        stop = min(start + 100_000, n_items)
        items[start:stop] = centers[rng.integers(n_clusters, size=stop - start)]
        items[start:stop] += rng.standard_normal((stop - start, dim), dtype=np.float32)
    bias = (0.5 * rng.standard_normal(n_items)).astype(np.float32)
    mix = rng.integers(n_clusters, size=(n_users, 2))
    users = centers[mix].mean(axis=1) + 0.5 * rng.standard_normal((n_users, dim), dtype=np.float32)
    return item_rows(items, bias), user_queries(users.astype(np.float32))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def qps_single(index, queries: np.ndarray, seconds: float = 3.0) -> float:
    """Queries a second, one query per call on one thread (as the service answers one user:
    its parallelism comes from concurrent requests, not from splitting one search)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        index.search(queries[done % len(queries)][None, :], K)
        done += 1
    faiss.omp_set_num_threads(threads)
    return done / (time.perf_counter() - start)


def qps_batch(index, queries: np.ndarray) -> float:
    start = time.perf_counter()
    index.search(queries, K)
    return len(queries) / (time.perf_counter() - start)


def measure(kind: str, rows: np.ndarray, queries: np.ndarray, truth: np.ndarray, folder: Path,
            tuning: tuple[np.ndarray, np.ndarray], target: float) -> list[dict]:
    """One row at the package's starting search effort and, for approximate kinds, one after
    raising the effort to ``target`` recall@10 on separate tuning queries (as a run does)."""
    start = time.perf_counter()
    built = build_index(rows, kind)
    build_s = time.perf_counter() - start
    path = folder / f"{kind}.faiss"
    save_index(built.index, path)
    del built
    process = psutil.Process()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    index = load_index(path)
    open_ms = (time.perf_counter() - start) * 1000
    rss_open = process.memory_info().rss - rss_before
    queries = padded(queries, index.d)  # searched as lookups search it
    _, found = index.search(queries, K)
    result = {
        "kind": kind, "factory": faiss_factory(index), "build_s": round(build_s, 2),
        "file_mb": round(path.stat().st_size / 2**20, 1), "open_ms": round(open_ms, 1),
        "rss_after_open_mb": round(rss_open / 2**20, 1), f"recall@{K}": round(recall(found, truth), 4),
        "single_qps": round(qps_single(index, queries)), "batch_qps": round(qps_batch(index, queries)),
        "rss_after_search_mb": round((process.memory_info().rss - rss_before) / 2**20, 1),
        "search": search_effort(index),
    }
    rows_out = [result]
    if search_effort(index):
        start = time.perf_counter()
        tune_search(index, *tuning, target)  # pads its own queries
        _, found = index.search(queries, K)
        rows_out.append({**result, "kind": f"{kind} tuned", "build_s": round(build_s + time.perf_counter() - start, 2),
                         f"recall@{K}": round(recall(found, truth), 4), "search": search_effort(index),
                         "single_qps": round(qps_single(index, queries)), "batch_qps": round(qps_batch(index, queries))})
    del index
    return rows_out


OPEN_SCRIPT = """
import json, sys, time, psutil
import aefeatures
process = psutil.Process()
before = process.memory_info().rss
start = time.perf_counter()
fs = aefeatures.open_store(sys.argv[1])["bench"].load()
opened = time.perf_counter() - start
after = process.memory_info().rss
start = time.perf_counter()
fs.recommend(fs.user_ids[0], 10)
first = time.perf_counter() - start
print(json.dumps({"open_s": round(opened, 3), "rss_mb": round(after / 2**20), "rss_added_mb": round((after - before) / 2**20),
                  "first_recommend_ms": round(first * 1000, 2), "items": fs.n_items, "users": fs.n_users}))
"""


def version_open(rows: np.ndarray, index_file: Path, folder: Path, n_users: int = 100_000) -> dict:
    """Write a store version over these item rows (and synthetic users with 20 items each)
    through the package's own writer, then time how long a service takes to open it whole,
    in a fresh process (so its RSS is the service's)."""
    from datetime import datetime, timezone

    import polars as pl

    from aefeatures.data.matrix import build_matrix
    from aefeatures.data.read import Interactions
    from aefeatures.model.embed import Embeddings
    from aefeatures.store import layout, publish, tables

    n_items, dim = rows.shape[0], rows.shape[1] - 1
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(n_users), 20)
    items = rng.permutation(np.arange(len(users)) % n_items)  # every item appears
    frame = pl.DataFrame({"user_id": users, "item_id": items, "weight": np.ones(len(users), np.float32),
                          "timestamp": pl.Series([None] * len(users), dtype=pl.Datetime("us", "UTC"))}
                         ).unique(["user_id", "item_id"])
    matrix = build_matrix(Interactions(frame, (), frame.height, frame.height, False))
    emb = Embeddings(rng.standard_normal((n_users, dim), dtype=np.float32), np.zeros(n_users, np.float32),
                     np.ascontiguousarray(rows[:, :dim]), np.ascontiguousarray(rows[:, dim]))
    root = folder / "store"
    with publish.staged_version(root, "bench", "v1") as staging:
        tables.write_tables(staging, matrix, emb, name="bench", version="v1", created=datetime.now(timezone.utc))
        shutil.copy(index_file, staging / layout.INDEX)
        publish.write_manifest(staging, {"dim": dim, "counts": {}, "version": "v1"})
        publish.publish(root, "bench", staging)
    done = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(root)], capture_output=True, text=True, check=True)
    return {"index_file": index_file.name, **json.loads(done.stdout)}


def faiss_factory(index) -> str:
    return type(faiss.downcast_index(index)).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000, help="user queries for recall and batch speed")
    parser.add_argument("--kinds", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-recall", type=float, default=0.95, help="as `index.min_recall`")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    rows, queries = clustered(args.items, args.queries + 1000, args.dim)
    queries, tuning_queries = queries[: args.queries], queries[args.queries:]  # the same users' mixture
    tuning = (tuning_queries, exact_neighbours(rows, tuning_queries))
    exact = faiss.IndexFlatIP(rows.shape[1])
    exact.add(rows)
    _, truth = exact.search(queries, K)
    del exact
    results = []
    opened = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            for row in measure(kind, rows, queries, truth, Path(tmp), tuning, args.target_recall):
                results.append(row)
                print(json.dumps(row), flush=True)
        for served in [kind for kind in ("ivf", "hnsw", "flat") if kind in args.kinds.split(",")]:
            opened.append(version_open(rows, Path(tmp) / f"{served}.faiss", Path(tmp) / served))
            print(json.dumps(opened[-1]), flush=True)

    flat = next((r for r in results if r["kind"] == "flat"), None)
    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {psutil.cpu_count()} cores",
              "faiss": faiss.__version__, "items": args.items, "dim": args.dim, "threads": args.threads,
              "results": results, "version_open": opened}
    print(f"\n{args.items:,} items x {args.dim} dims (+ bias), {args.threads} threads, "
          f"{args.queries} user queries, {report['date']}, {report['machine']}\n")
    print("| kind | FAISS index | search | build s | file MB | open ms | RSS at open MB | recall@20 | single q/s | "
          "× Flat | batch q/s | × Flat |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        single = f"{r['single_qps'] / flat['single_qps']:.1f}×" if flat else "–"
        batch = f"{r['batch_qps'] / flat['batch_qps']:.1f}×" if flat else "–"
        effort = " ".join(f"{k}={v}" for k, v in r["search"].items()) or "exact"
        print(f"| {r['kind']} | {r['factory']} | {effort} | {r['build_s']} | {r['file_mb']} | {r['open_ms']} | "
              f"{r['rss_after_open_mb']} | {r[f'recall@{K}']:.3f} | {r['single_qps']:,} | {single} | "
              f"{r['batch_qps']:,} | {batch} |")
    for o in opened:
        print(f"\nOpening a whole version ({o['items']:,} items, {o['users']:,} users, {o['index_file']} index) "
              f"in a fresh process: {o['open_s']} s, RSS {o['rss_mb']:,} MiB ({o['rss_added_mb']:,} MiB for the "
              f"version); first recommend {o['first_recommend_ms']} ms")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
