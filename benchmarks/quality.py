"""Recommendation quality on a planted synthetic dataset of realistic sparsity.

    python benchmarks/quality.py                       # 20k users × 5k items, ~1M interactions
    python benchmarks/quality.py --users 4000 --items 1000 --epochs 20   # quick look
    python benchmarks/quality.py --precisions fp32,bf16 --seeds 0,1      # bf16 against fp32

Compares, on one held-out-user split (the protocol of every `aefeatures run`): popularity,
EASE (Steck 2019, closed form, λ picked on the validation users from a small grid), and the
`dae` and `vae` models with their default settings and early stopping. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.data.synthetic import generate
from aefeatures.model.embed import encode
from aefeatures.model.train import train
from aefeatures.quality.evaluate import KS, evaluate_embeddings, popularity_ranking, ranking_metrics, split_users, top_k

ROW_NAMES = ("recall@20", "ndcg@10", "ndcg@100", "coverage@20")


def ease_metrics(matrix, split, lam: float) -> dict[str, float]:
    """EASE: B = I - P / diag(P) with P = (XᵀX + λI)⁻¹ over the training users, diag(B) = 0."""
    n_items = matrix.shape[1]
    x = np.zeros((len(split.train_rows), n_items), np.float32)  # items are few: dense is fine here
    offsets, items, _ = matrix.gather(split.train_rows)
    lengths = np.diff(np.append(offsets, len(items)))
    x[np.repeat(np.arange(len(split.train_rows)), lengths), items] = 1.0
    gram = (x.T @ x).astype(np.float64)
    gram[np.diag_indices(n_items)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    b[np.diag_indices(n_items)] = 0.0
    fold = np.zeros((len(split.valid_rows), n_items), np.float32)
    indptr, shown = split.fold_in.indptr, split.fold_in.indices
    fold[np.repeat(np.arange(len(split.valid_rows)), np.diff(indptr)), shown] = 1.0
    ranked = top_k(fold @ b.astype(np.float32), split.fold_in, max(KS))
    return ranking_metrics(ranked, split.held_out, n_items)


def model_metrics(matrix, split, cfg: ModelConfig) -> tuple[dict[str, float], float, int]:
    def validate(model):
        vectors, _ = encode(model, split.fold_in)
        out = evaluate_embeddings(vectors, model.decoder.weight.detach().numpy(),
                                  model.decoder.bias.detach().numpy(), split)
        model.train()
        return out

    start = time.perf_counter()
    result = train(matrix, cfg, rows=split.train_rows, validate=validate, progress=False)
    seconds = time.perf_counter() - start
    return validate(result.model), seconds, result.best_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--mean-items", type=float, default=50)
    parser.add_argument("--communities", type=int, default=40)
    parser.add_argument("--in-cluster", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=ModelConfig.epochs, help="cap; early stopping decides")
    parser.add_argument("--dim", type=int, default=ModelConfig.dim)
    parser.add_argument("--kinds", default="dae,vae", help="comma-separated model kinds to train")
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated `model.precision` values to train each kind in, e.g. fp32,bf16")
    parser.add_argument("--seeds", default="0", help="comma-separated model seeds (the data and split stay)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    data = generate(n_users=args.users, n_items=args.items, mean_items=args.mean_items,
                    n_communities=args.communities, in_cluster=args.in_cluster, zipf=1.1, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "interactions.parquet"
        data.interactions.write_parquet(path)
        matrix = build_matrix(read_interactions(InputConfig(str(path))))
    split = split_users(matrix.indptr, matrix.indices, share=0.1, max_users=10000, holdout=0.2, seed=0)

    rows: dict[str, dict] = {}
    start = time.perf_counter()
    ranked = popularity_ranking(np.bincount(matrix.gather(split.train_rows)[1], minlength=matrix.shape[1]), split,
                                max(KS))
    rows["popularity"] = {**ranking_metrics(ranked, split.held_out, matrix.shape[1]),
                          "seconds": time.perf_counter() - start}
    best = None
    for lam in (50.0, 200.0, 500.0, 2000.0):
        start = time.perf_counter()
        metrics = ease_metrics(matrix, split, lam)
        if best is None or metrics["ndcg@100"] > best[0]["ndcg@100"]:
            best = (metrics, time.perf_counter() - start, lam)
    rows[f"EASE (λ={best[2]:g})"] = {**best[0], "seconds": best[1]}
    seeds, precisions = [int(x) for x in args.seeds.split(",")], args.precisions.split(",")
    for kind in args.kinds.split(","):
        for precision in precisions:
            for seed in seeds:
                cfg = replace(ModelConfig(kind=kind), epochs=args.epochs, dim=args.dim, precision=precision, seed=seed)
                metrics, seconds, best_epoch = model_metrics(matrix, split, cfg)
                name = f"{kind}, dim {args.dim}" + (f", {precision}" if len(precisions) > 1 else "") + \
                    (f", seed {seed}" if len(seeds) > 1 else "") + f" (best epoch {best_epoch})"
                rows[name] = {**metrics, "seconds": seconds}

    print(f"{matrix.shape[0]:,} users × {matrix.shape[1]:,} items, {matrix.nnz:,} interactions; "
          f"{len(split.valid_rows):,} held-out users, 20% of their items hidden; "
          f"{platform.machine()}, {torch.get_num_threads()} threads; {date.today()}\n")
    print("| model | " + " | ".join(ROW_NAMES) + " | train seconds |")
    print("| --- |" + " ---: |" * (len(ROW_NAMES) + 1))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in ROW_NAMES) + f" | {m['seconds']:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
