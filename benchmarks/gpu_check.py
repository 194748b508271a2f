"""Check training on a GPU against the CPU, then time epochs at the ML-20M shape.

    python benchmarks/gpu_check.py --json-out gpu_check.json

1. The same small planted job (3,000 users × 800 items) trains on the CPU in fp32 and on the
   GPU (fp32 and bf16 autocast), with the full softmax and with the sampled one (its threshold
   lowered below 800 items); validation metrics on the same held-out users must agree with the
   CPU's within ``--tolerance`` (exit 1 when they do not).
2. One epoch at the ML-20M shape (138k users × 27k items, ~20M interactions: 13.8k planted
   synthetic users repeated 10 times) is timed on the GPU in fp32, bf16 (also with the batches
   cut on the host instead of from the CSR's copy on the GPU), and bf16 with
   ``torch.compile``, next to a few CPU steps extrapolated to an epoch.
3. One epoch at ~1M items (the same number of users and interactions: 3.5k planted users
   repeated 40 times, each copy on its own block of items) is timed on the GPU with the
   sampled softmax, with sparse updates (lazy Adam) and with dense ones.
4. Host syncs per training step are counted with ``torch.cuda.set_sync_debug_mode``: the
   difference between a short and a longer epoch, so the epoch's one final sync cancels out.
5. A fresh process's start-up on the CPU and the GPU: imports, the device's context, and the
   small job's first epoch against its second (what a job's first epoch pays once).
6. The default model, the closed-form dlae: the small job's validation NDCG@100 with the same
   (p, λ) fitted on the CPU and on the GPU (must agree within ``--dlae-tolerance``), then at
   the ML-20M shape one fit on each path the device can take (exact on the items, the sketch)
   and the whole default training (the validated search and the refit, as `aefeatures run`
   does it), on the GPU and on the CPU; and one sketch fit at ~1M items on the GPU.

Each epoch is reported with its FLOP floor, measured on the same device. Runs in about a minute
on an H200. Without a GPU it runs the CPU parts (at ``--scale`` of the ML-20M shape) and says
that the GPU parts were skipped. Prints and writes JSON with the card, the date and every
number, saved after each measurement; a measurement that fails is recorded and the rest run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Callable

import floors
import numpy as np
import polars as pl
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import InteractionMatrix, build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.data.synthetic import generate
from aefeatures.model.device import DeviceCSR
from aefeatures.model.embed import encode
from aefeatures.model.train import train
from aefeatures.quality.evaluate import evaluate_embeddings, split_users

SMALL = {"n_users": 3000, "n_items": 800, "mean_items": 30}
SMALL_MODEL = ModelConfig(kind="dae", dim=32, hidden=(128,), epochs=20, batch_size=256, patience=0, seed=0,
                          min_steps=0)
ML20M = {"n_users": 138_000, "n_items": 27_000, "mean_items": 145}
METRICS = ("ndcg@10", "ndcg@100", "recall@20")
SAMPLED = {"full_softmax_max_items": 400, "sampled_negatives": 256}  # the small job, sampled
CPU_TIMED_STEPS = 8
TILES = 10  # the timing data is 1/10 of the users, planted, repeated 10 times
WIDE_TILES = 40  # the 1M-item timing data: 1/40 of the users, repeated on 40 blocks of items
SYNC_STEPS = (4, 12)
DLAE = {"dropout": 0.67, "l2": 100.0}  # one fit's (p, λ) in the dlae comparisons


def planted_matrix(n_users: int, n_items: int, mean_items: float, seed: int = 1) -> InteractionMatrix:
    """The binarised CSR of planted synthetic interactions, through the job's own reader."""
    data = generate(n_users=n_users, n_items=n_items, mean_items=mean_items, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "interactions.parquet"
        data.interactions.write_parquet(path)
        return build_matrix(read_interactions(InputConfig(str(path), timestamp_col="timestamp")))


def tiled(matrix: InteractionMatrix, times: int, *, widen: bool = False) -> InteractionMatrix:
    """``matrix``'s users repeated ``times`` times as new users: the full shape in a fraction of
    the generator's time (it draws users one by one). With ``widen`` each copy reads its own
    block of items, so the catalogue is ``times`` as large."""
    lengths = np.tile(matrix.row_lengths(), times)
    indptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.tile(matrix.indices, times)
    item_ids = matrix.item_ids
    if widen:
        n_items = matrix.shape[1]
        indices = indices + np.repeat(np.arange(times, dtype=indices.dtype) * n_items, matrix.nnz)
        item_ids = pl.Series("item_id", np.arange(n_items * times))
    return dataclasses.replace(matrix, user_ids=pl.Series("user_id", np.arange(len(lengths))), indptr=indptr,
                               indices=indices, values=np.tile(matrix.values, times), item_ids=item_ids,
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
    """Each softmax's GPU runs against its CPU fp32 run."""
    matrix = planted_matrix(**SMALL)
    families = {"full softmax": {}, "sampled softmax": SAMPLED}
    runs, worst = {}, 0.0
    for family, settings in families.items():
        base = dataclasses.replace(SMALL_MODEL, **settings)
        reference = runs[f"{family}: cpu fp32"] = validation_metrics(
            matrix, dataclasses.replace(base, device="cpu", precision="fp32"))
        variants = [("fp32", "auto"), ("bf16", "auto")] + ([("bf16", "off")] if settings else [])
        for precision, sparse in variants if gpu else ():
            label = f"{family}: cuda {precision}" + (f", sparse_updates={sparse}" if sparse != "auto" else "")
            metrics = runs[label] = validation_metrics(
                matrix, dataclasses.replace(base, device="cuda", precision=precision, sparse_updates=sparse))
            worst = max([worst, *(abs(metrics[k] - reference[k]) for k in METRICS)])
    return {"job": {**SMALL, "model": dataclasses.asdict(SMALL_MODEL), "sampled": SAMPLED}, "metrics": runs,
            "max_abs_difference": round(worst, 5), "tolerance": tolerance, "passed": worst <= tolerance}


def dlae_validation(matrix: InteractionMatrix, device: str, dim: int = 64) -> dict:
    """One dlae fit at :data:`DLAE` on 90% of the users on ``device``: its seconds and the held-out
    users' metrics (the run's protocol), and the factors' scores for 50 users (to compare)."""
    from aefeatures.model import linear
    from aefeatures.model.dlae_search import _dlae_model, _set_item_vectors

    split = split_users(matrix.indptr, matrix.indices, share=0.1, max_users=10_000, holdout=0.2, seed=0)
    solver = linear.Solver(matrix.csr, split.train_rows, matrix.shape[1], dim=dim, device=device)
    factors = solver.fit(**DLAE)
    model = _dlae_model(matrix.shape[1], ModelConfig(kind="dlae", dim=dim), factors.p, torch.device(device))
    _set_item_vectors(model, factors.r, np.zeros(matrix.shape[1]), 0.0)
    vectors, _ = encode(model, split.fold_in)
    metrics = evaluate_embeddings(vectors, model.decoder.weight.detach().float().cpu().numpy(),
                                  np.zeros(matrix.shape[1], np.float32), split)
    scores = vectors[:50] @ model.decoder.weight.detach().float().cpu().numpy().T
    return {"device": device, "method": factors.method, "iterations": factors.iterations,
            "seconds": round(factors.seconds, 3), **{k: round(metrics[k], 5) for k in METRICS}, "scores": scores}


def compare_dlae(gpu: bool, tolerance: float) -> dict:
    """The small job's dlae on the GPU against the CPU: NDCG@100 and the scores themselves."""
    matrix = planted_matrix(**SMALL)
    cpu = dlae_validation(matrix, "cpu")
    runs = {"cpu": {k: v for k, v in cpu.items() if k != "scores"}}
    worst = scores_off = 0.0
    if gpu:
        cuda = dlae_validation(matrix, "cuda")
        runs["cuda"] = {k: v for k, v in cuda.items() if k != "scores"}
        worst = max(abs(cuda[k] - cpu[k]) for k in METRICS)
        scores_off = float(np.abs(cuda["scores"] - cpu["scores"]).max() / max(np.abs(cpu["scores"]).max(), 1e-12))
    return {"fit": DLAE, "runs": runs, "max_abs_difference": round(worst, 5),
            "max_relative_score_difference": round(scores_off, 6), "tolerance": tolerance,
            "passed": worst <= tolerance}


def time_dlae_fit(matrix: InteractionMatrix, device: str, method: str | None, dim: int = 256) -> dict:
    """One dlae fit from a cold start (and the Gram, on the items path) on ``device``."""
    from aefeatures.model import linear

    started = time.perf_counter()
    solver = linear.Solver(matrix.csr, np.arange(matrix.shape[0]), matrix.shape[1], dim=dim, device=device,
                           method=method)
    setup = time.perf_counter() - started
    cold = solver.fit(**DLAE)
    warm = solver.fit(DLAE["dropout"], 3 * DLAE["l2"])
    return {"what": "dlae fit", "device": device, "method": cold.method, "users": matrix.shape[0],
            "items": matrix.shape[1], "interactions": matrix.nnz, "dim": dim, "setup_seconds": round(setup, 3),
            "cold_seconds": round(cold.seconds, 3), "cold_iterations": cold.iterations,
            "warm_seconds": round(warm.seconds, 3), "warm_iterations": warm.iterations,
            "gflop_per_s": round(cold.flops / max(cold.seconds, 1e-9) / 1e9, 1)}


def time_default_training(matrix: InteractionMatrix, device: str) -> dict:
    """The whole default training of `aefeatures run` (search and refit) on ``device``."""
    from aefeatures.config import EvaluationConfig, JobConfig, JobSection
    from aefeatures.jobs.run import _train_and_evaluate

    job = JobConfig(JobSection("gpu_check", Path(tempfile.gettempdir())), InputConfig("unused.parquet"),
                    model=ModelConfig(device=device), evaluation=EvaluationConfig(reference_max_items=0))
    started = time.perf_counter()
    trained, evaluation, _ = _train_and_evaluate(matrix, job, progress=False)
    return {"what": "default training", "device": trained.device, "users": matrix.shape[0],
            "items": matrix.shape[1], "seconds": round(time.perf_counter() - started, 2),
            "fits": len(trained.history), "valid_ndcg@100": evaluation["model"]["ndcg@100"],
            "chosen": trained.chosen, "methods": sorted({h["method"] for h in trained.history})}


def time_epoch(matrix: InteractionMatrix, cfg: ModelConfig, *, steps: int | None = None) -> dict:
    """Seconds for one epoch (after a warm-up of a few steps); with ``steps``, time that many
    steps and extrapolate to the epoch."""
    warm = np.arange(min(matrix.shape[0], 3 * cfg.batch_size))
    train(matrix, dataclasses.replace(cfg, epochs=1), rows=warm, progress=False)
    rows = np.arange(matrix.shape[0] if steps is None else min(matrix.shape[0], steps * cfg.batch_size))
    cut_on = "device" if DeviceCSR.fits(matrix.csr, torch.device(cfg.device)) else "host"
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(matrix, dataclasses.replace(cfg, epochs=1), rows=rows, progress=False)
    seconds = time.perf_counter() - started  # train ends with a host sync on the epoch's loss
    per_step = seconds / result.steps
    out = {"device": cfg.device, "precision": cfg.precision, "compile": cfg.compile, "batch_size": cfg.batch_size,
           "items": matrix.shape[1], "sampled": matrix.shape[1] > cfg.full_softmax_max_items,
           "sparse_updates": cfg.sparse_updates, "batches_cut_on": cut_on, "steps_timed": result.steps,
           "ms_per_step": round(per_step * 1000, 2),
           "epoch_seconds": round(per_step * -(-matrix.shape[0] // cfg.batch_size), 2),
           "extrapolated": steps is not None}
    if cfg.device.startswith("cuda"):
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return {**out, **flop_floor(matrix, cfg, out["epoch_seconds"])}


def flop_floor(matrix: InteractionMatrix, cfg: ModelConfig, epoch_seconds: float) -> dict:
    """The epoch's FLOPs at the rate this device runs the step's matmuls (BENCHMARKS.md's floor)."""
    model = dataclasses.asdict(cfg)
    shapes = floors.step_matmuls(cfg.batch_size, model, floors.decoder_width(model, matrix.shape[1]))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    _, gflops = floors.time_matmuls(shapes, dtype, cfg.device)
    seconds = floors.epoch_flops(matrix.shape[0], matrix.shape[1], matrix.nnz, model) / (gflops * 1e9)
    return {"floor_seconds": round(seconds, 3), "matmul_gflops": round(gflops), "ratio_to_floor":
            round(epoch_seconds / seconds, 1)}


def host_syncs_per_step(matrix: InteractionMatrix, cfg: ModelConfig) -> dict:
    """Synchronizing CUDA calls per training step, and the lines that made them."""
    counts, lines = [], set()
    for steps in SYNC_STEPS:
        rows = np.arange(min(matrix.shape[0], steps * cfg.batch_size))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(matrix, dataclasses.replace(cfg, epochs=1), rows=rows, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts.append(len(syncs))
        lines |= {f"{Path(w.filename).name}:{w.lineno}" for w in syncs}
    per_step = (counts[1] - counts[0]) / (SYNC_STEPS[1] - SYNC_STEPS[0])
    return {"precision": cfg.precision, "items": matrix.shape[1], "sparse_updates": cfg.sparse_updates,
            "syncs_per_step": per_step, "syncs_by_epoch_length": dict(zip(map(str, SYNC_STEPS), counts)),
            "lines": sorted(lines)}


_START_UP = """
import json, sys, time
started = time.perf_counter()
import torch
from aefeatures.config import ModelConfig
sys.path.insert(0, sys.argv[2])
from gpu_check import SMALL, planted_matrix
from aefeatures.model.train import train
imported = time.perf_counter()
matrix = planted_matrix(**SMALL)
made = time.perf_counter()
if sys.argv[1].startswith("cuda"):
    torch.zeros(1, device=sys.argv[1])
    torch.cuda.synchronize()
context = time.perf_counter()
cfg = ModelConfig(kind="dae", dim=64, hidden=(600,), epochs=1, batch_size=256, device=sys.argv[1], min_steps=0)
seconds = []
for _ in range(2):
    began = time.perf_counter()
    train(matrix, cfg, progress=False)
    seconds.append(time.perf_counter() - began)
print(json.dumps({"device": sys.argv[1], "import_seconds": round(imported - started, 2),
                  "device_context_seconds": round(context - made, 2), "first_epoch_seconds": round(seconds[0], 2),
                  "second_epoch_seconds": round(seconds[1], 2)}))
"""


def start_up(device: str) -> dict:
    """A fresh process's start-up on ``device``: imports, the device's context, and the small
    job's first epoch against its second (the difference is what first use costs: libraries
    and kernels loaded), as a job's first epoch pays it."""
    done = subprocess.run([sys.executable, "-c", _START_UP, device, str(Path(__file__).parent)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=None,
                        help="share of the ML-20M shape's users to time (default 1 on a GPU, 0.05 without)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest metric difference accepted")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    parser.add_argument("--dlae-tolerance", type=float, default=0.001,
                        help="largest NDCG difference accepted between a dlae fitted on the GPU and on the CPU")
    parser.add_argument("--no-dae", action="store_true", help="skip the dae epochs: only the dlae parts")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    report = {"date": date.today().isoformat(), "torch": torch.__version__, "cpu": platform.processor() or
              platform.machine(), "cpu_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "cuda": torch.version.cuda if gpu else None,
              "epochs": [], "host_syncs": [], "start_up": [], "dlae": [], "failed": []}
    if not gpu:
        print("no CUDA device: skipping the GPU comparison and the GPU epoch timing (CPU parts only)")
    started = time.perf_counter()

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))

    def measured(what: str, run: Callable[[], dict], into: str) -> None:
        """Run one measurement; a failure is recorded and the next measurement still runs."""
        try:
            result = run()
        except Exception as error:  # noqa: BLE001 - every other measurement is still worth having
            report["failed"].append({"what": what, "error": f"{type(error).__name__}: {error}"})
            print(f"  {what}: FAILED {type(error).__name__}: {error}")
        else:
            report[into].append(result)
            print(f"  {what}: {json.dumps(result)}")
        save()

    report["dlae_comparison"] = compare_dlae(gpu, args.dlae_tolerance)
    print(f"dlae, small job: {json.dumps(report['dlae_comparison']['runs'])}; max NDCG difference "
          f"{report['dlae_comparison']['max_abs_difference']} (tolerance {args.dlae_tolerance}): "
          f"{'ok' if report['dlae_comparison']['passed'] else 'MISMATCH'}")
    save()
    report["comparison"] = compare_devices(gpu, args.tolerance) if not args.no_dae else {"passed": True, "metrics": {},
                                                                                         "max_abs_difference": 0.0}
    print(f"validation metrics, small job: {json.dumps(report['comparison']['metrics'])}; max difference "
          f"{report['comparison']['max_abs_difference']} (tolerance {args.tolerance}): "
          f"{'ok' if report['comparison']['passed'] else 'MISMATCH'}")
    save()

    scale = args.scale if args.scale is not None else (1.0 if gpu else 0.05)
    shape = {**ML20M, "n_users": int(ML20M["n_users"] * scale)}
    made = time.perf_counter()
    matrix = tiled(planted_matrix(**{**shape, "n_users": -(-shape["n_users"] // TILES)}), TILES)
    report["timing_data"] = {"users": matrix.shape[0], "items": matrix.shape[1], "interactions": matrix.nnz,
                             "generate_seconds": round(time.perf_counter() - made, 1)}
    print(f"timing data: {matrix.shape[0]:,} users × {matrix.shape[1]:,} items, {matrix.nnz:,} interactions")
    for device in ("cuda", "cpu") if gpu else ("cpu",):
        for method in ("items", "sketch") if device == "cuda" else (None,):
            measured(f"{device} dlae fit ({method or 'its default path'})",
                     lambda: time_dlae_fit(matrix, device, method), "dlae")
        measured(f"{device} dlae default training", lambda: time_default_training(matrix, device), "dlae")
    base = ModelConfig(kind="dae", dim=64, hidden=(600,), batch_size=args.batch_size, seed=0, min_steps=0)
    cpu = dataclasses.replace(base, device="cpu", precision="fp32")
    if not args.no_dae:
        measured("cpu fp32 epoch", lambda: time_epoch(matrix, cpu, steps=CPU_TIMED_STEPS), "epochs")
    measured("cpu start-up in a fresh process", lambda: start_up("cpu"), "start_up")
    if gpu:
        wide = tiled(planted_matrix(**{**shape, "n_users": -(-shape["n_users"] // WIDE_TILES)}), WIDE_TILES, widen=True)
        measured("cuda dlae fit at ~1M items", lambda: time_dlae_fit(wide, "cuda", None), "dlae")
        del wide
    if gpu and not args.no_dae:
        for precision in ("fp32", "bf16"):
            cfg = dataclasses.replace(base, device="cuda", precision=precision)
            measured(f"cuda {precision} epoch", lambda: time_epoch(matrix, cfg), "epochs")
        bf16 = dataclasses.replace(base, device="cuda", precision="bf16")
        measured("cuda start-up in a fresh process", lambda: start_up("cuda"), "start_up")
        share, DeviceCSR.SHARE_OF_FREE_MEMORY = DeviceCSR.SHARE_OF_FREE_MEMORY, 0.0  # batches cut on the host
        measured("cuda bf16 epoch, batches cut on the host", lambda: time_epoch(matrix, bf16), "epochs")
        DeviceCSR.SHARE_OF_FREE_MEMORY = share
        measured("cuda bf16 host syncs", lambda: host_syncs_per_step(matrix, bf16), "host_syncs")

        block = planted_matrix(**{**shape, "n_users": -(-shape["n_users"] // WIDE_TILES)})
        wide = tiled(block, WIDE_TILES, widen=True)
        report["wide_timing_data"] = {"users": wide.shape[0], "items": wide.shape[1], "interactions": wide.nnz}
        print(f"1M-item timing data: {wide.shape[0]:,} users × {wide.shape[1]:,} items, {wide.nnz:,} interactions")
        for sparse in ("on", "off"):
            cfg = dataclasses.replace(bf16, sparse_updates=sparse)
            measured(f"cuda bf16 1M items, sparse_updates={sparse} epoch", lambda: time_epoch(wide, cfg), "epochs")
            measured(f"cuda bf16 1M items, sparse_updates={sparse} host syncs",
                     lambda: host_syncs_per_step(wide, cfg), "host_syncs")
        del wide
        if not args.no_compile:  # last: compiling takes the longest, and is the likeliest to fail
            compiled = dataclasses.replace(bf16, compile=True)
            measured("cuda bf16 compile epoch", lambda: time_epoch(matrix, compiled), "epochs")

    for t in report["epochs"]:
        print(f"  {t['device']:5s} {t['precision']} compile={t['compile']!s:5s} items={t['items']:>9,} "
              f"sparse_updates={t['sparse_updates']}: {t['ms_per_step']:8.2f} ms/step, "
              f"epoch {t['epoch_seconds']:8.2f} s{' (extrapolated)' if t['extrapolated'] else ''}, "
              f"{t['ratio_to_floor']}x its FLOP floor ({t['floor_seconds']} s)")
    for h in report["host_syncs"]:
        print(f"  host syncs per step, {h['precision']} items={h['items']:,} sparse_updates={h['sparse_updates']}: "
              f"{h['syncs_per_step']:g} ({', '.join(h['lines']) or 'none'})")
    for d in report["dlae"]:
        print(f"  {d['device']:5s} {d['what']}: {json.dumps({k: v for k, v in d.items() if k not in ('what', 'device')})}")
    save()
    print(json.dumps(report, indent=2))
    passed = report["comparison"]["passed"] and report["dlae_comparison"]["passed"]
    return 0 if passed and not report["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
