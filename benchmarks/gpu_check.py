"""Check training on a GPU against the CPU, then time epochs at the ML-20M shape.

    python benchmarks/gpu_check.py --json-out gpu_check.json

1. The same small planted job (3,000 users × 800 items) trains on the CPU in fp32 and on the
   GPU (fp32 and bf16 autocast); validation metrics on the same held-out users must agree
   within ``--tolerance`` (exit 1 when they do not).
2. One epoch at the ML-20M shape (138k users × 27k items, ~20M interactions: 13.8k planted
   synthetic users repeated 10 times) is timed on the GPU in fp32, bf16, and bf16 with ``torch.compile``, next to a few CPU
   steps extrapolated to an epoch.

Runs in under 5 minutes on one GPU. Without a GPU it runs the CPU parts (at ``--scale`` of the
ML-20M shape) and says that the GPU parts were skipped. Prints and writes JSON with the card,
the date and every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.embed import encode
from aefeatures.evaluate import evaluate_embeddings, split_users
from aefeatures.matrix import InteractionMatrix, build_matrix
from aefeatures.read import read_interactions
from aefeatures.synthetic import generate
from aefeatures.train import train

SMALL = {"n_users": 3000, "n_items": 800, "mean_items": 30}
SMALL_MODEL = ModelConfig(dim=32, hidden=(128,), epochs=20, batch_size=256, patience=0, seed=0)
ML20M = {"n_users": 138_000, "n_items": 27_000, "mean_items": 145}
METRICS = ("ndcg@10", "ndcg@100", "recall@20")
CPU_TIMED_STEPS = 8
TILES = 10  # the timing data is 1/10 of the users, planted, repeated 10 times


def planted_matrix(n_users: int, n_items: int, mean_items: float, seed: int = 1) -> InteractionMatrix:
    """The binarised CSR of planted synthetic interactions, through the job's own reader."""
    data = generate(n_users=n_users, n_items=n_items, mean_items=mean_items, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "interactions.parquet"
        data.interactions.write_parquet(path)
        return build_matrix(read_interactions(InputConfig(str(path), timestamp_col="timestamp")))


def tiled(matrix: InteractionMatrix, times: int) -> InteractionMatrix:
    """``matrix``'s users repeated ``times`` times as new users: the full shape in a tenth of
    the generator's time (it draws users one by one)."""
    lengths = np.tile(matrix.row_lengths(), times)
    indptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return dataclasses.replace(matrix, user_ids=pl.Series("user_id", np.arange(len(lengths))), indptr=indptr,
                               indices=np.tile(matrix.indices, times), values=np.tile(matrix.values, times),
                               user_last_seen=np.tile(matrix.user_last_seen, times))


def validation_metrics(matrix: InteractionMatrix, cfg: ModelConfig) -> dict[str, float]:
    """Train on 90% of the users and score the held-out 10% (the run's own protocol)."""
    split = split_users(matrix.indptr, matrix.indices, share=0.1, max_users=10_000, holdout=0.2, seed=cfg.seed)
    model = train(matrix, cfg, rows=split.train_rows, progress=False).model
    vectors, _ = encode(model, split.fold_in)
    metrics = evaluate_embeddings(vectors, model.decoder.weight.detach().float().cpu().numpy(),
                                  model.decoder.bias.detach().float().cpu().numpy(), split)
    return {k: round(metrics[k], 5) for k in METRICS}


def compare_devices(gpu: bool, tolerance: float) -> dict:
    matrix = planted_matrix(**SMALL)
    runs = {"cpu fp32": validation_metrics(matrix, dataclasses.replace(SMALL_MODEL, device="cpu", precision="fp32"))}
    if gpu:
        for precision in ("fp32", "bf16"):
            cfg = dataclasses.replace(SMALL_MODEL, device="cuda", precision=precision)
            runs[f"cuda {precision}"] = validation_metrics(matrix, cfg)
    reference = runs["cpu fp32"]
    worst = max((abs(m[k] - reference[k]) for m in runs.values() for k in METRICS), default=0.0)
    return {"job": {**SMALL, "model": dataclasses.asdict(SMALL_MODEL)}, "metrics": runs,
            "max_abs_difference": round(worst, 5), "tolerance": tolerance, "passed": worst <= tolerance}


def time_epoch(matrix: InteractionMatrix, cfg: ModelConfig, *, steps: int | None = None) -> dict:
    """Seconds for one epoch (after a warm-up of a few steps); with ``steps``, time that many
    steps and extrapolate to the epoch."""
    warm = np.arange(min(matrix.shape[0], 3 * cfg.batch_size))
    train(matrix, dataclasses.replace(cfg, epochs=1), rows=warm, progress=False)
    rows = np.arange(matrix.shape[0] if steps is None else min(matrix.shape[0], steps * cfg.batch_size))
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(matrix, dataclasses.replace(cfg, epochs=1), rows=rows, progress=False)
    seconds = time.perf_counter() - started  # train ends with a host sync on the epoch's loss
    per_step = seconds / result.steps
    out = {"device": cfg.device, "precision": cfg.precision, "compile": cfg.compile, "batch_size": cfg.batch_size,
           "steps_timed": result.steps, "ms_per_step": round(per_step * 1000, 2),
           "epoch_seconds": round(per_step * -(-matrix.shape[0] // cfg.batch_size), 2),
           "extrapolated": steps is not None}
    if cfg.device.startswith("cuda"):
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=None,
                        help="share of the ML-20M shape's users to time (default 1 on a GPU, 0.05 without)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest metric difference accepted")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    report = {"date": date.today().isoformat(), "torch": torch.__version__, "cpu": platform.processor() or
              platform.machine(), "cpu_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "cuda": torch.version.cuda if gpu else None}
    if not gpu:
        print("no CUDA device: skipping the GPU comparison and the GPU epoch timing (CPU parts only)")

    started = time.perf_counter()
    report["comparison"] = compare_devices(gpu, args.tolerance)
    print(f"validation metrics, small job: {json.dumps(report['comparison']['metrics'])}; max difference "
          f"{report['comparison']['max_abs_difference']} (tolerance {args.tolerance}): "
          f"{'ok' if report['comparison']['passed'] else 'MISMATCH'}")

    scale = args.scale if args.scale is not None else (1.0 if gpu else 0.05)
    shape = {**ML20M, "n_users": int(ML20M["n_users"] * scale)}
    made = time.perf_counter()
    matrix = tiled(planted_matrix(**{**shape, "n_users": -(-shape["n_users"] // TILES)}), TILES)
    report["timing_data"] = {"users": matrix.shape[0], "items": matrix.shape[1], "interactions": matrix.nnz,
                             "generate_seconds": round(time.perf_counter() - made, 1)}
    print(f"timing data: {matrix.shape[0]:,} users × {matrix.shape[1]:,} items, {matrix.nnz:,} interactions")
    base = ModelConfig(dim=64, hidden=(600,), batch_size=args.batch_size, seed=0)
    timings = [time_epoch(matrix, dataclasses.replace(base, device="cpu", precision="fp32"), steps=CPU_TIMED_STEPS)]
    if gpu:
        for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
            if compiled and args.no_compile:
                continue
            cfg = dataclasses.replace(base, device="cuda", precision=precision, compile=compiled)
            timings.append(time_epoch(matrix, cfg))
    report["epochs"] = timings
    for t in timings:
        print(f"  {t['device']:5s} {t['precision']} compile={t['compile']!s:5s}: {t['ms_per_step']:8.2f} ms/step, "
              f"epoch {t['epoch_seconds']:8.2f} s{' (extrapolated)' if t['extrapolated'] else ''}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0 if report["comparison"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
