"""Filtered `recommend` against unfiltered, at 100k items, for selectivities from 0.1% to 90%.

    python benchmarks/filtered_lookup.py                     # 100k items, flat and ivf, ~2 minutes
    python benchmarks/filtered_lookup.py --items 20000 --lookups 200 --kinds flat   # a smoke run

A store version is written with the package's own writer: ``--items`` items and ``--users``
users (``--seen`` interactions each), 64-dim vectors from a mixture of Gaussians (users mix two
clusters, as in ``faiss_kinds.py``), an index built by ``build_index`` (``flat`` is what `auto`
picks at 100k; ``ivf`` as well, to show the approximate path), and item attributes with an
integer ``bucket`` drawn uniformly from [0, 100000), so ``bucket < s × 100000`` keeps a share
``s`` of the catalogue. For each selectivity, ``--lookups`` single-user ``recommend(k=10)``
calls on random users (the same users for every filter), after one call that fills the
filter's cache (its time is reported as "first call": it evaluates the filter in DuckDB). FAISS
runs on one thread, as the README advises for a service. Reports p50 and p99 latency and the
ratio of the filtered p99 to the unfiltered p99 (the floor). Writes JSON and Markdown to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import polars as pl
from pipeline import RESULTS, machine, say, versions

import aefeatures
from aefeatures.data.attributes import align_attributes
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import Interactions
from aefeatures.model.embed import Embeddings
from aefeatures.store import layout, publish, tables
from aefeatures.store.index import build_index, item_rows, save_index, user_queries

SELECTIVITIES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9)
BUCKETS = 100_000


def add_version_args(parser: argparse.ArgumentParser) -> None:
    """The options of the version :func:`write_version` writes (shared with history_lookup.py)."""
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seen", type=int, default=20, help="interactions per user")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_args(parser)
    parser.add_argument("--lookups", type=int, default=1000, help="single-user calls per filter")
    parser.add_argument("--kinds", default="flat,ivf", help="index kinds, comma-separated")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "filtered-lookup.json")
    parser.add_argument("--markdown-out", type=Path, default=RESULTS / "filtered-lookup.md")
    return parser.parse_args(argv)


def write_version(root: Path, args: argparse.Namespace, kind: str) -> aefeatures.FeatureSet:
    rng = np.random.default_rng(args.seed)
    clusters = rng.normal(size=(64, args.dim)).astype(np.float32)
    item_cluster = rng.integers(0, len(clusters), args.items)
    item_vectors = clusters[item_cluster] + 0.5 * rng.normal(size=(args.items, args.dim)).astype(np.float32)
    pair = rng.integers(0, len(clusters), (args.users, 2))
    user_vectors = (clusters[pair[:, 0]] + clusters[pair[:, 1]]) / 2 + 0.3 * rng.normal(size=(args.users, args.dim))
    users = np.repeat(np.arange(args.users), args.seen)
    items = rng.integers(0, args.items, len(users))
    items[: args.items] = np.arange(args.items)  # every item has an interaction, so all are in the catalogue
    frame = pl.DataFrame({"user_id": users, "item_id": items, "weight": np.ones(len(users)),
                          "timestamp": [None] * len(users)},
                         schema={"user_id": pl.Int64, "item_id": pl.Int64, "weight": pl.Float32,
                                 "timestamp": pl.Datetime("us", "UTC")})
    matrix = build_matrix(Interactions(frame, (), len(frame), len(frame), False))
    emb = Embeddings(user_vectors.astype(np.float32), np.zeros(args.users, np.float32), item_vectors,
                     (0.1 * rng.normal(size=args.items)).astype(np.float32))
    attributes = pl.DataFrame({"item_id": np.arange(args.items), "bucket": rng.integers(0, BUCKETS, args.items),
                               "category": [f"c{c % 20}" for c in item_cluster]})
    version = "v1"
    with publish.staged_version(root, "bench", version) as staging:
        tables.write_tables(staging, matrix, emb, name="bench", version=version, created=datetime.now(timezone.utc))
        tables.write_attributes(staging, align_attributes(attributes, matrix.item_ids)[0])
        sample = user_queries(emb.user_vectors[rng.choice(args.users, 1000, replace=False)])
        built = build_index(item_rows(emb.item_vectors, emb.item_bias), kind, sample_queries=sample,
                            target_recall=0.95)
        save_index(built.index, staging / layout.INDEX)
        publish.write_manifest(staging, {"dim": args.dim, "counts": {}, "version": version})
        publish.publish(root, "bench", staging)
    say(f"{kind}: {built.factory}, recall@10 {built.recall_at_10:.3f}, search {built.search}")
    return aefeatures.open_store(root)["bench"].load()


def latencies(fs, users, filters: list[str | None]) -> tuple[np.ndarray, list[float]]:
    """((len(filters), len(users)) seconds per call, each filter's first call's seconds).

    Calls are interleaved (each user asks with every filter in turn), so a pause of the shared
    machine lands on all filters alike rather than on one row of the table."""
    first = []
    for text in filters:
        start = time.perf_counter()
        fs.recommend(int(users[0]), k=10, filter=text)
        first.append(time.perf_counter() - start)
    out = np.empty((len(filters), len(users)))
    for n, user in enumerate(users.tolist()):
        for f, text in enumerate(filters):
            start = time.perf_counter()
            found = fs.recommend(user, k=10, filter=text)
            out[f, n] = time.perf_counter() - start
            assert len(found.ids) == 10
    return out, first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.users * args.seen < args.items:
        raise SystemExit("--users × --seen must be at least --items: every item needs an interaction")
    faiss.omp_set_num_threads(1)
    rows = []
    began = time.perf_counter()
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            fs = write_version(Path(tmp), args, kind)
            users = np.random.default_rng(args.seed + 1).choice(fs.user_ids, args.lookups)
            fs.recommend(int(users[0]), k=10)  # warm: the index pages and the seen matrix
            filters = [None] + [f"bucket < {int(share * BUCKETS)}" for share in SELECTIVITIES]
            times, firsts = latencies(fs, users, filters)
            base_p99 = float(np.percentile(times[0], 99))
            for text, share, row_times, first in zip(filters, (1.0, *SELECTIVITIES), times, firsts):
                p99 = float(np.percentile(row_times, 99))
                rows.append({"kind": kind, "filter": text or "(none)", "selectivity": share,
                             "passing": fs.n_items if text is None else len(fs.filter_items(text)),
                             "p50_ms": 1e3 * float(np.median(row_times)), "p99_ms": 1e3 * p99,
                             "ratio_p99": p99 / base_p99, "first_ms": None if text is None else 1e3 * first})
                say(f"{kind} {rows[-1]['filter']}: p50 {rows[-1]['p50_ms']:.2f} ms, p99 {rows[-1]['p99_ms']:.2f} ms, "
                    f"{rows[-1]['ratio_p99']:.2f}x unfiltered")
    result = {"date": date.today().isoformat(), "machine": machine(), "versions": versions(),
              "args": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.perf_counter() - began, 1),
              "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{result['date']}, {result['machine']['cpu']}, {result['machine']['cores']} cores; "
             f"{args.items:,} items × {args.dim} dims, {args.users:,} users × {args.seen} seen, k = 10, "
             f"{args.lookups:,} single-user calls per row; {result['seconds']} s in all.", "",
             "| index | filter | items passing | p50 ms | p99 ms | p99 × unfiltered | first call ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        first = "" if r["first_ms"] is None else f"{r['first_ms']:.1f}"
        lines.append(f"| {r['kind']} | `{r['filter']}` | {r['passing']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['ratio_p99']:.2f}× | {first} |")
    args.markdown_out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
