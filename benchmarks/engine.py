"""The dlae engine against a tuned EASE grid, side by side in one run on one machine.

    python benchmarks/engine.py --data ml100k --ml100k recbole-1.2.1-py3-none-any.whl
    python benchmarks/engine.py --data lastfm            # ../shared/data/lastfm-hetrec2k
    python benchmarks/engine.py --data ibm               # ../shared/data/ibm-articles
    python benchmarks/engine.py --data ml1m-shape        # synthetic, 6,040 × 3,700, 1M pairs
    python benchmarks/engine.py --data ml20m-shape --no-ease   # 138,493 × 26,744, 20M pairs

For one data set (every distinct (user, item) pair a positive, as `aefeatures run` reads it):

- **EASE grid**: what a user tuning EASE pays, in numpy float64 — the Gram (or, with fewer
  users than items, the users' kernel) once, then 8 λ values and the final fit, each one dense
  inverse of the smaller side (:class:`aefeatures.quality.reference.EASE`). Scoring is left
  out: only the fits are timed.
- **default training**: the product's whole default training of a dlae as `aefeatures run`
  does it (``jobs.run._train_and_evaluate``: the validated search of (p, λ, β) on held-out
  users, and the refit on every user), with its validation NDCG@100.
- **floors**: each fit of the search against its floor (``linear.flops_floor``: the dense and
  sparse FLOPs one fit cannot do without) at the fp32 GEMM and sparse-product rates measured
  here in the same run.

Prints a JSON line per measurement and a summary; ``--json-out`` keeps them all.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlshape  # noqa: E402  (benchmarks/ is not a package)
from quality import LASTFM, load_ml100k  # noqa: E402

from aefeatures.config import EvaluationConfig, InputConfig, JobConfig, JobSection, ModelConfig  # noqa: E402
from aefeatures.data.matrix import build_matrix  # noqa: E402
from aefeatures.data.read import read_interactions  # noqa: E402
from aefeatures.jobs.run import _train_and_evaluate  # noqa: E402
from aefeatures.model import linear  # noqa: E402
from aefeatures.quality.reference import EASE, LAMBDAS  # noqa: E402

IBM = LASTFM.parents[1] / "ibm-articles" / "interactions.parquet"
SHAPES = {"ml1m-shape": (6_040, 3_700, 1_000_209), "ml20m-shape": (mlshape.ML20M_USERS, mlshape.ML20M_ITEMS,
                                                                   mlshape.ML20M_INTERACTIONS)}
EASE_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)  # 8 λ values, then the final fit


def load(args: argparse.Namespace, cache: Path) -> pl.DataFrame:
    """(user_id, item_id) distinct pairs of the chosen data set."""
    if args.data == "lastfm":
        frame = pl.read_parquet(args.lastfm).select(user_id="user_id", item_id="artist_id")
    elif args.data == "ibm":
        frame = pl.read_parquet(args.ibm).select("user_id", "item_id")
    elif args.data == "ml100k":
        frame = load_ml100k(args.ml100k)
    else:
        users, items, pairs = SHAPES[args.data]
        folder, _ = mlshape.ensure(mlshape.Shape(users, items, pairs), cache)
        frame = pl.read_parquet(mlshape.part_files(folder)).select("user_id", "item_id")
    return frame.unique(["user_id", "item_id"])


def ease_grid(matrix) -> dict:
    """Seconds of the Gram once, 8 λ values and the final fit (float64 numpy)."""
    started = time.perf_counter()
    ease = EASE(matrix.csr, np.arange(matrix.shape[0]), matrix.shape[1])
    gram_s = time.perf_counter() - started
    for lam in (*EASE_GRID, LAMBDAS[FINAL]):
        if ease.items_side:
            ease.weights(lam)
        else:
            np.linalg.solve(ease.gram + lam * np.eye(len(ease.gram)), ease.x)
    return {"seconds": round(time.perf_counter() - started, 2), "gram_seconds": round(gram_s, 2),
            "side": "items" if ease.items_side else "users", "fits": len(EASE_GRID) + 1}


FINAL = 4  # the final fit at λ = LAMBDAS[4] (100): its cost does not depend on λ


def rates(n_items: int, dim: int, matrix) -> dict:
    """fp32 GEMM and sparse CSR × dense rates here, FLOP/s, at the fit's own shapes."""
    side = min(n_items, 4096)
    a, b = torch.randn(side, side), torch.randn(side, dim)
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    dense = 5 * 2.0 * side * side * dim / (time.perf_counter() - started)
    solver = linear.Solver(matrix.csr, np.arange(min(matrix.shape[0], 30_000)), n_items, dim=dim, method="sketch")
    v = torch.randn(n_items, dim)
    solver.x @ v
    started = time.perf_counter()
    for _ in range(3):
        solver.x @ v
        solver.xt @ (solver.x @ v)
    sparse = 3 * 6.0 * solver.nnz * dim / (time.perf_counter() - started)
    return {"gemm_fp32": dense, "spmm_fp32": sparse}


def default_training(matrix, seed: int) -> dict:
    job = JobConfig(JobSection("engine", Path(tempfile.gettempdir())), InputConfig("unused.parquet"),
                    model=ModelConfig(seed=seed), evaluation=EvaluationConfig(reference_max_items=0))
    started = time.perf_counter()
    trained, evaluation, _ = _train_and_evaluate(matrix, job, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "valid_ndcg@100": evaluation["model"]["ndcg@100"],
            "chosen": trained.chosen, "refit_seconds": (trained.refit or {}).get("seconds"),
            "device": trained.device, "threads": trained.threads, "dim": job.model.dim or trained.model.shape.dim,
            "fits": trained.history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("ml100k", "lastfm", "ibm", *SHAPES), default="ml1m-shape")
    parser.add_argument("--lastfm", type=Path, default=LASTFM)
    parser.add_argument("--ibm", type=Path, default=IBM)
    parser.add_argument("--ml100k", type=Path, help="the recbole wheel or its ml-100k.inter (benchmarks/quality.py)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aefeatures-mlshape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ease", action="store_true", help="skip the EASE grid (ML-20M: ~15 min on 2 cores)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    for name, path in (("lastfm", args.lastfm), ("ibm", args.ibm), ("ml100k", args.ml100k)):
        if args.data == name and (path is None or not path.is_file()):
            print(f"skipped: {path} is absent (nothing is downloaded here; see the module docstring)")
            return
    frame = load(args, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        frame.write_parquet(path)
        matrix = build_matrix(read_interactions(InputConfig(str(path))))
    n_users, n_items = matrix.shape
    header = {"data": args.data, "users": n_users, "items": n_items, "pairs": len(matrix.csr.indices),
              "machine": platform.machine(), "threads": torch.get_num_threads(), "date": str(date.today())}
    print(json.dumps(header), flush=True)
    out: dict = {"header": header}
    if not args.no_ease:
        out["ease_grid"] = ease_grid(matrix)
        print(json.dumps({"ease_grid": out["ease_grid"]}), flush=True)
    out["default_training"] = training = default_training(matrix, args.seed)
    dim = training["dim"]
    out["rates"] = measured = rates(n_items, dim, matrix)
    for fit in training["fits"]:
        dense, sparse = linear.flops_floor(fit["method"], fit["users"], n_items,
                                           int(len(matrix.csr.indices) * fit["users"] / n_users), dim)
        fit["floor_seconds"] = round(dense / measured["gemm_fp32"] + sparse / measured["spmm_fp32"], 3)
        fit["vs_floor"] = round(fit["fit_seconds"] / max(fit["floor_seconds"], 1e-9), 2)
    print(json.dumps({"default_training": {k: v for k, v in training.items() if k != "fits"}}), flush=True)
    for fit in training["fits"]:
        print(json.dumps({k: fit.get(k) for k in ("epoch", "users", "method", "iterations", "dropout", "l2",
                                                   "popularity_exponent", "fit_seconds", "seconds", "floor_seconds",
                                                   "vs_floor", "ndcg@100")}))
    if "ease_grid" in out:
        out["ratio_to_ease_grid"] = round(training["seconds"] / out["ease_grid"]["seconds"], 3)
        print(f"default training / EASE grid: {out['ratio_to_ease_grid']}x "
              f"({training['seconds']} s against {out['ease_grid']['seconds']} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
