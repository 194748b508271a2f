"""Time each stage of a run on synthetic planted data, next to floors measured in the same run.

    python benchmarks/pipeline.py --users 20000 --items 5000 --mean-items 50 --epochs 1

Floors: a raw `pl.read_parquet` of the same file (for read + CSR), and dense matmuls of the
model's shapes at this machine's measured GFLOP/s (for one training epoch). Prints a Markdown
table and writes JSON with `--json-out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.embed import embed
from aefeatures.index import build_index, item_rows, user_queries
from aefeatures.matrix import build_matrix
from aefeatures.read import read_interactions
from aefeatures.store import write_tables
from aefeatures.synthetic import generate
from aefeatures.train import train


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def epoch_flops(n_users: int, n_items: int, nnz: int, cfg: ModelConfig) -> float:
    """Forward + backward (×3) FLOPs of one epoch: sparse input layer, encoder, dense decoder."""
    widths = [*cfg.hidden, cfg.dim]
    sparse = 2 * nnz * widths[0]
    dense = sum(2 * n_users * a * b for a, b in zip(widths[:-1], widths[1:]))
    decoder = 2 * n_users * cfg.dim * n_items
    return 3 * (sparse + dense + decoder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--mean-items", type=float, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    cfg = ModelConfig(dim=args.dim, epochs=args.epochs, batch_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(n_users=args.users, n_items=args.items, mean_items=args.mean_items, seed=1)
        path = tmp / "interactions.parquet"
        data.interactions.write_parquet(path, compression="zstd")

        _, raw_read = timed(pl.read_parquet, path)
        interactions, t_read = timed(read_interactions, InputConfig(str(path), weight_col="rating",
                                                                    timestamp_col="timestamp"))
        matrix, t_matrix = timed(build_matrix, interactions)
        trained, t_train = timed(train, matrix, cfg, progress=False)
        emb, t_embed = timed(embed, trained.model, matrix)
        (tmp / "v").mkdir()
        _, t_write = timed(write_tables, tmp / "v", matrix, emb, name="bench", version="v",
                           created=datetime.now(timezone.utc))
        built, t_index = timed(build_index, item_rows(emb.item_vectors, emb.item_bias), "flat")
        queries = user_queries(emb.user_vectors[:2000])
        _, t_search = timed(built.index.search, queries, 20)

    gflops = matmul_gflops(cfg.batch_size, cfg.dim, args.items)
    floor_epoch = epoch_flops(matrix.shape[0], matrix.shape[1], matrix.nnz, cfg) / (gflops * 1e9)
    per_epoch = t_train / max(args.epochs, 1)
    rows = [
        ("read + validate", t_read, raw_read, "raw pl.read_parquet"),
        ("CSR + vocabularies", t_matrix, raw_read, "raw pl.read_parquet"),
        ("train, one epoch", per_epoch, floor_epoch, f"FLOP floor at {gflops:.0f} GFLOP/s fp32"),
        ("embed all users", t_embed, None, ""),
        ("write Parquet", t_write, None, ""),
        ("index build (Flat)", t_index, None, ""),
        ("search 2,000 users, k=20", t_search, None, ""),
    ]
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "users": matrix.shape[0], "items": matrix.shape[1], "interactions": matrix.nnz,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages": [{"stage": s, "seconds": round(t, 4), "floor_seconds": f and round(f, 4), "floor": n}
                   for s, t, f, n in rows],
    }
    print(f"{result['users']:,} users × {result['items']:,} items, {result['interactions']:,} interactions; "
          f"{result['machine']}; peak RSS {result['peak_rss_mb']:.0f} MB; {result['date']}\n")
    print("| stage | seconds | floor | ratio |\n| --- | ---: | --- | ---: |")
    for s, t, f, n in rows:
        ratio = f"{t / f:.1f}×" if f else "–"
        print(f"| {s} | {t:.3f} | {f'{f:.3f} s ({n})' if f else '–'} | {ratio} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
