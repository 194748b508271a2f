"""Floors for each stage, measured on this machine: what the stage cannot beat.

    python benchmarks/floors.py STAGES_JSON --json-out floors.json

Reads what ``benchmarks/stages.py`` recorded (data files, model shape, the published version)
and measures, with the package left out:

- read + CSR: a raw ``pl.read_parquet`` of the same files (all their columns), as the first
  read of a fresh process, as the stage is (the files in the page cache for both);
- one training epoch: its FLOPs (the sparse input layer's, and for every step the forward,
  input-gradient and weight-gradient matmuls of every linear layer) at the rate this machine
  runs that step's matmuls, in fp32 and in bf16; the one that counts is the precision the
  training ran in (on the training's device);
- embedding all users: the forward matmuls of the same layers (the decoder included: the
  reconstruction error needs every item's score);
- writing: ``pq.write_table`` of the three tables just written, read back into memory,
  and a plain write of the model's files;
- index build: adding the same item rows to an exact FAISS inner-product index, saved;
- lookups: exact FAISS search of the same users' queries, one at a time and in one batch.

Cheap floors take the best of a few repeats. Softmax, Adam and other memory-bound work is in
no floor, so a stage can approach its floor but never reach it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

LOOKUP_SEED = 7
EMBED_BATCH = 2048  # users per forward batch in the embedding floor
MIN_TIMED_S = 0.3  # matmul loops repeat until they run at least this long


def lookup_rows(n_users: int, n: int) -> np.ndarray:
    """The user rows that both the lookups and their floors query (same seed, same rows)."""
    return np.random.default_rng(LOOKUP_SEED).choice(n_users, min(n, n_users), replace=False)


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_widths(model: dict) -> list[tuple[int, int]]:
    """(in, out) of every dense linear layer of the encoder (the decoder comes separately)."""
    code = model["dim"] * (2 if model["kind"] in ("vae", "recvae") else 1)
    widths = [*model["hidden"] * (5 if model["kind"] == "recvae" else 1), code]  # recvae: 5 layers of width H
    return list(zip(widths[:-1], widths[1:]))


def decoder_width(model: dict, n_items: int) -> int:
    """Item scores per user in a training step: every item, or the shared sampled negatives
    once the catalogue is past the model's full-softmax limit."""
    if n_items > model.get("full_softmax_max_items", n_items):
        return min(n_items, model["sampled_negatives"])
    return n_items


def step_matmuls(batch: int, model: dict, n_scores: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul in one training step: per layer the forward, the input
    gradient and the weight gradient."""
    shapes = []
    for a, b in [*layer_widths(model), (model["dim"], n_scores)]:
        shapes += [(batch, a, b), (batch, b, a), (b, batch, a)]
    return shapes


def forward_matmuls(batch: int, model: dict, n_items: int) -> list[tuple[int, int, int]]:
    return [(batch, a, b) for a, b in [*layer_widths(model), (model["dim"], n_items)]]


def epoch_flops(n_users: int, n_items: int, nnz: int, model: dict) -> float:
    """FLOPs of one training epoch: the sparse input layer (forward and weight gradient) and
    every dense matmul of every step."""
    batch = min(model["batch_size"], n_users)
    dense = sum(2 * m * k * n for m, k, n in step_matmuls(batch, model, decoder_width(model, n_items)))
    return 4 * nnz * model["hidden"][0] + dense * n_users / batch


def time_matmuls(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(seconds for one pass over ``shapes``, GFLOP/s) in ``dtype`` on ``device``."""
    pairs = [(torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype))
             for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one_pass() -> None:
        for a, b in pairs:
            torch.mm(a, b)
        sync()

    one_pass()  # warm up
    first = best_of(one_pass, 1)
    repeats = max(3, min(50, math.ceil(MIN_TIMED_S / max(first, 1e-6))))
    seconds = best_of(one_pass, repeats)
    return seconds, flops / seconds / 1e9


def epoch_floor(stages: dict, dtype: torch.dtype) -> dict[str, Any]:
    """One training epoch's FLOPs at the rate of its step's matmuls in ``dtype``."""
    model, (n_users, n_items, nnz) = stages["model"], matrix_shape(stages)
    batch = min(model["batch_size"], n_users)
    shapes = step_matmuls(batch, model, decoder_width(model, n_items))
    step_s, gflops = time_matmuls(shapes, dtype, training_device(stages))
    flops = epoch_flops(n_users, n_items, nnz, model)
    return {"seconds": flops / (gflops * 1e9), "gflops": gflops, "flops": flops, "step_seconds": step_s,
            "batch": batch}


def training_floor(stages: dict) -> dict[str, Any]:
    """fp32 and bf16 epoch floors; the one that counts is the precision training ran in."""
    fp32, bf16 = epoch_floor(stages, torch.float32), epoch_floor(stages, torch.bfloat16)
    precision = training_precision(stages)
    return {**(bf16 if precision == "bf16" else fp32), "precision": precision, "fp32": fp32, "bf16": bf16}


def training_device(stages: dict) -> str:
    return stages["stages"]["train_epoch"]["detail"]["device"]


def training_precision(stages: dict) -> str:
    """The package's rule: bf16 when asked, or on CUDA when left to ``auto``; else fp32."""
    precision = stages["model"].get("precision", "fp32")
    if precision == "auto":
        return "bf16" if training_device(stages).startswith("cuda") else "fp32"
    return precision


def embed_floor(stages: dict) -> dict[str, Any]:
    """Forward FLOPs over every user (the decoder included) at the fp32 forward rate."""
    model, (n_users, n_items, nnz) = stages["model"], matrix_shape(stages)
    batch = min(EMBED_BATCH, n_users)
    shapes = forward_matmuls(batch, model, n_items)
    _, gflops = time_matmuls(shapes, torch.float32, training_device(stages))
    flops = 2 * nnz * model["hidden"][0] + sum(2 * m * k * n for m, k, n in shapes) * n_users / batch
    return {"seconds": flops / (gflops * 1e9), "gflops": gflops, "flops": flops, "batch": batch}


def matrix_shape(stages: dict) -> tuple[int, int, int]:
    m = stages["matrix"]
    return m["users"], m["items"], m["nnz"]


_FIRST_READ = """
import sys, time
import polars as pl
started = time.perf_counter()
pl.read_parquet(sys.argv[1:])
print(time.perf_counter() - started)
"""


def read_floor(data_files: list[str], processes: int = 3) -> dict[str, Any]:
    """The fastest of ``processes`` fresh processes' first read of the files. The stage reads
    once, in a fresh process, so it pays for the memory its first read takes from the system;
    a repeated read in a warm process does not (~0.25 against ~0.45 s at ML-20M scale here)."""
    frame = pl.read_parquet(data_files)  # also puts the files in the page cache
    first_reads = [float(subprocess.run([sys.executable, "-c", _FIRST_READ, *data_files], check=True,
                                        capture_output=True, text=True).stdout) for _ in range(processes)]
    return {"seconds": min(first_reads), "warm_seconds": best_of(lambda: pl.read_parquet(data_files)),
            "rows": frame.height, "columns": frame.width}


def write_floor(version_dir: Path) -> dict[str, Any]:
    """Writing the version's three tables (zstd, as the store does) and its model's bytes."""
    tables = {f: pq.read_table(version_dir / f) for f in ("users.parquet", "items.parquet", "interactions.parquet")}
    model_files = {f.name: f.read_bytes() for f in (version_dir / "model").iterdir() if f.is_file()}
    with tempfile.TemporaryDirectory() as scratch:
        def write_all() -> None:
            for name, table in tables.items():
                pq.write_table(table, Path(scratch) / name, compression="zstd")
            for name, data in model_files.items():
                (Path(scratch) / name).write_bytes(data)
        return {"seconds": best_of(write_all, 2), "rows": sum(t.num_rows for t in tables.values()),
                "model_bytes": sum(len(d) for d in model_files.values())}


def index_rows(version_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(item rows (n_items, dim + 1), user queries (n_users, dim + 1)) as the index uses them."""
    items = pq.read_table(version_dir / "items.parquet", columns=["embedding", "bias"])
    users = pq.read_table(version_dir / "users.parquet", columns=["embedding"])
    item_vecs, user_vecs = fixed_lists(items.column("embedding")), fixed_lists(users.column("embedding"))
    rows = np.hstack([item_vecs, items.column("bias").to_numpy()[:, None]]).astype(np.float32)
    queries = np.hstack([user_vecs, np.ones((len(user_vecs), 1), np.float32)])
    return np.ascontiguousarray(rows), np.ascontiguousarray(queries)


def fixed_lists(column) -> np.ndarray:
    """(n, dim) float32 from a Parquet fixed-size-list column."""
    flat = column.combine_chunks()
    return flat.values.to_numpy().reshape(len(flat), -1).astype(np.float32)


def index_and_search_floors(version_dir: Path, lookups: dict) -> dict[str, dict[str, Any]]:
    rows, queries = index_rows(version_dir)
    exact = faiss.IndexFlatIP(rows.shape[1])

    with tempfile.TemporaryDirectory() as scratch:
        def build_and_save() -> None:
            exact.reset()
            exact.add(rows)
            faiss.write_index(exact, str(Path(scratch) / "items.faiss"))

        build_s = best_of(build_and_save)
    k = lookups["k"]
    single = queries[lookup_rows(len(queries), lookups["single"])]
    batch = queries[lookup_rows(len(queries), lookups["batch"])]
    single_s = best_of(lambda: [exact.search(single[i : i + 1], k) for i in range(len(single))]) / len(single)
    batch_s = best_of(lambda: exact.search(batch, k))
    return {"index_build": {"seconds": build_s, "items": len(rows)},
            "lookup_single": {"seconds": single_s, "calls": len(single), "k": k},
            "lookup_batch": {"seconds": batch_s, "users": len(batch), "k": k}}


def measure_floors(stages: dict, data_files: list[str]) -> dict[str, Any]:
    version_dir = Path(stages["version_dir"])
    return {
        "read_csr": read_floor(data_files),
        "train_epoch": training_floor(stages),
        "embed": embed_floor(stages),
        "write": write_floor(version_dir),
        **index_and_search_floors(version_dir, stages["lookups"]),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages_json", type=Path)
    parser.add_argument("--data-files", nargs="+", required=True)
    parser.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args()
    floors = measure_floors(json.loads(args.stages_json.read_text()), args.data_files)
    args.json_out.write_text(json.dumps(floors, indent=2) + "\n")


if __name__ == "__main__":
    main()
