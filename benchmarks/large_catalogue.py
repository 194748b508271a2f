"""Training with a large catalogue: the sampled softmax with sparse updates, timed at 1M items,
its quality next to the full softmax where that is still affordable.

    python benchmarks/large_catalogue.py            # both parts, ~15 minutes on 2 cores
    python benchmarks/large_catalogue.py --dlae     # the default dlae at 1M items: two fits, peak RSS
    python benchmarks/large_catalogue.py --large-items 20000 --large-scale 0.02 \\
        --compare-items 2000 --compare-scale 0.01 --epochs 1 --compare-epochs 1   # smoke run

Data: ML-20M-shaped synthetic interactions (``mlshape.py``) with Zipf item popularity (exponent
1.0). ML-20M's own tail (2.0) would leave ~87% of a 1M catalogue without any interaction, and
the model only knows items that have one.

1. ``large``: 1M items at ML-20M's user count (138,493), trained as a job above
   ``model.full_softmax_max_items`` is: sampled softmax, sparse updates, otherwise the package's
   defaults. Per epoch: seconds, seconds per step, validation Recall@20 / NDCG@100, next to the
   popularity baseline on the same held-out users. Peak RSS of the whole process.
2. ``compare``: a catalogue small enough for the full softmax (50k items, a quarter of the users),
   one held-out-user split, the same epochs for full softmax (dense Adam), sampled softmax with
   dense updates, and sampled softmax with sparse updates, each with ``--compare-seeds`` model
   seeds (initialisation, dropout, negatives), so a gap between them can be told from noise.

Validation uses ``--valid-users`` held-out users (ranking 1M items per user costs ~10 ms), with the
split and metrics of every ``aefeatures run``. Writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import mlshape
import numpy as np
from pipeline import DEFAULT_CACHE, RESULTS, machine, say, versions
from stages import high_water_mb

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import InteractionMatrix, build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model.embed import encode
from aefeatures.model.train import sparse_updates, train
from aefeatures.quality.evaluate import KS, Split, evaluate_embeddings, popularity_ranking, ranking_metrics, split_users

ZIPF = 1.0
REPORTED = ("recall@20", "ndcg@100")
ARMS = {  # compare: name -> [model] overrides
    "full softmax, dense Adam": {},
    "sampled softmax, dense updates": {"full_softmax_max_items": 1, "sparse_updates": "off"},
    "sampled softmax, sparse updates": {"full_softmax_max_items": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-items", type=int, default=1_000_000)
    parser.add_argument("--large-scale", type=float, default=1.0, help="share of ML-20M's users and interactions")
    parser.add_argument("--epochs", type=int, default=4, help="epochs at the large catalogue")
    parser.add_argument("--full-softmax-max-items", type=int, default=ModelConfig.full_softmax_max_items,
                        help="the large part's model.full_softmax_max_items (lower it for a small smoke run)")
    parser.add_argument("--compare-items", type=int, default=50_000)
    parser.add_argument("--compare-scale", type=float, default=0.25)
    parser.add_argument("--compare-epochs", type=int, default=10)
    parser.add_argument("--compare-seeds", type=int, default=3,
                        help="model seeds per compared training (the same held-out users for all)")
    parser.add_argument("--valid-users", type=int, default=1000, help="held-out validation users per part")
    parser.add_argument("--dlae", action="store_true",
                        help="only the default model (dlae) at the large catalogue: its fits' time and peak RSS")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "large-catalogue.json")
    parser.add_argument("--markdown-out", type=Path, default=RESULTS / "large-catalogue.md")
    return parser.parse_args(argv)


def load(scale: float, items: int, data_dir: Path) -> tuple[InteractionMatrix, dict]:
    shape = mlshape.shape_for(scale, items=items, popularity_exponent=ZIPF)
    folder, facts = mlshape.ensure(shape, data_dir)
    matrix = build_matrix(read_interactions(InputConfig(str(folder), weight_col="rating", timestamp_col="timestamp")))
    say(f"  {shape.users:,} users x {shape.items:,} items: {matrix.shape[1]:,} items with interactions, "
        f"{matrix.nnz:,} interactions")
    return matrix, {"shape": asdict(shape), "users": matrix.shape[0], "items": matrix.shape[1], "nnz": matrix.nnz,
                    "generated_seconds": None if facts["cached"] else facts["generate_seconds"]}


def held_out(matrix: InteractionMatrix, valid_users: int) -> Split:
    return split_users(matrix.indptr, matrix.indices, share=0.1, max_users=valid_users, holdout=0.2, seed=0)


def trained(matrix: InteractionMatrix, split: Split, cfg: ModelConfig) -> dict[str, Any]:
    """Train on the split's training users; per epoch: training seconds, steps and validation
    metrics (the validation's own time is left out of the epoch's)."""
    epochs: list[dict[str, Any]] = []
    clock = {"since": time.perf_counter()}

    def validate(model) -> dict[str, float]:
        epochs.append({"train_seconds": time.perf_counter() - clock["since"], "peak_rss_mb": round(high_water_mb())})
        started = time.perf_counter()
        vectors, _ = encode(model, split.fold_in)
        metrics = evaluate_embeddings(vectors, model.decoder.weight.detach().numpy(),
                                      model.decoder.bias.detach().numpy(), split)
        model.train()
        epochs[-1].update({k: round(metrics[k], 5) for k in REPORTED}, validate_seconds=time.perf_counter() - started)
        clock["since"] = time.perf_counter()
        return {"ndcg@100": metrics["ndcg@100"]}

    result = train(matrix, cfg, rows=split.train_rows, validate=validate, progress=False)
    # Small epochs are validated every few epochs: each record covers the steps since the last one.
    validated = [h for h in result.history if "ndcg@100" in h]
    done = 0
    for record, history in zip(epochs, validated):
        steps, done = history["steps"] - done, history["steps"]
        record.update(epoch=history["epoch"], loss=history["loss"], steps=steps,
                      seconds_per_step=record["train_seconds"] / max(steps, 1))
    best = next(r for r, h in zip(epochs, validated) if h["epoch"] == result.best_epoch)
    return {"epochs": epochs, "best_epoch": result.best_epoch, **{k: best[k] for k in REPORTED},
            "train_users": len(split.train_rows)}


def popularity(matrix: InteractionMatrix, split: Split) -> dict[str, float]:
    """The popularity baseline of every run (the package's, ranked in chunks of users)."""
    counts = np.bincount(matrix.gather(split.train_rows)[1], minlength=matrix.shape[1])
    metrics = ranking_metrics(popularity_ranking(counts, split, max(KS)), split.held_out, matrix.shape[1])
    return {k: round(metrics[k], 5) for k in REPORTED}


def large_part(args: argparse.Namespace) -> dict[str, Any]:
    say(f"large: {args.large_items:,} items, scale {args.large_scale:g}")
    matrix, data = load(args.large_scale, args.large_items, args.data_dir)
    split = held_out(matrix, args.valid_users)
    cfg = ModelConfig(kind="dae", epochs=args.epochs, patience=0, min_steps=0, full_softmax_max_items=args.full_softmax_max_items)
    sparse = sparse_updates(cfg, sampled=matrix.shape[1] > cfg.full_softmax_max_items, under_torchrun=False)
    rss_before = high_water_mb()
    model = trained(matrix, split, cfg)
    out = {"data": data, "model": {**asdict(cfg), "hidden": list(cfg.hidden)}, "sparse_updates": sparse,
           "valid_users": len(split.valid_rows), "result": model, "popularity": popularity(matrix, split),
           "peak_rss_mb_before_training": round(rss_before),
           "peak_rss_mb_first_epoch": model["epochs"][0]["peak_rss_mb"] if model["epochs"] else None,
           "peak_rss_mb": round(high_water_mb())}
    say(f"  {json.dumps(out['result']['epochs'])}\n  popularity {out['popularity']}, peak RSS {out['peak_rss_mb']:,} MB")
    return out


def dlae_part(args: argparse.Namespace) -> dict[str, Any]:
    """The default model at the large catalogue: one dlae fit of the default dim on the training
    users from a cold start, then one warm (λ × 3), with their passes, seconds, validation
    metrics and the process's peak RSS (the 24 GB question)."""
    from aefeatures.model import linear
    from aefeatures.model.dlae_search import _dlae_model, _set_item_vectors

    say(f"dlae: {args.large_items:,} items, scale {args.large_scale:g}")
    matrix, data = load(args.large_scale, args.large_items, args.data_dir)
    split = held_out(matrix, args.valid_users)
    dim, rss_before = ModelConfig(kind="dlae").dim or 256, high_water_mb()
    started = time.perf_counter()
    solver = linear.Solver(matrix.csr, split.train_rows, matrix.shape[1], dim=dim)
    fits = []
    for l2 in (300.0, 900.0):
        factors = solver.fit(0.8, l2)
        model = _dlae_model(matrix.shape[1], ModelConfig(kind="dlae", dim=dim), factors.p, factors.p.device)
        _set_item_vectors(model, factors.r, np.zeros(matrix.shape[1]), 0.0)
        vectors, _ = encode(model, split.fold_in)
        metrics = evaluate_embeddings(vectors, model.decoder.weight.detach().numpy(), model.decoder.bias.detach().numpy(),
                                      split)
        fits.append({"dropout": 0.8, "l2": l2, "method": factors.method, "passes": factors.iterations,
                     "seconds": round(factors.seconds, 1), **{k: round(metrics[k], 5) for k in REPORTED},
                     "peak_rss_mb": round(high_water_mb())})
        say(f"  {json.dumps(fits[-1])}")
    return {"data": data, "dim": dim, "q": solver.q, "fits": fits, "popularity": popularity(matrix, split),
            "solver_setup_and_fits_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb_before": round(rss_before), "peak_rss_mb": round(high_water_mb()),
            "working_bytes_estimate_mb": round(linear.working_bytes(matrix.shape[0], matrix.shape[1], dim, matrix.nnz,
                                                                    method=solver.method) / 2**20)}


def compare_part(args: argparse.Namespace) -> dict[str, Any]:
    say(f"compare: {args.compare_items:,} items, scale {args.compare_scale:g}, {args.compare_seeds} seed(s)")
    matrix, data = load(args.compare_scale, args.compare_items, args.data_dir)
    split = held_out(matrix, args.valid_users)
    arms = {}
    for name, overrides in ARMS.items():
        runs = [trained(matrix, split, ModelConfig(kind="dae", epochs=args.compare_epochs, patience=0, min_steps=0,
                                                   seed=seed, **overrides))
                for seed in range(args.compare_seeds)]
        arms[name] = {"runs": runs, **{k: float(np.mean([r[k] for r in runs])) for k in REPORTED},
                      **{f"{k} range": [min(r[k] for r in runs), max(r[k] for r in runs)] for k in REPORTED},
                      "seconds_per_step": float(np.median([e["seconds_per_step"] for r in runs for e in r["epochs"]]))}
        say(f"  {name}: {json.dumps({k: arms[name][k] for k in (*REPORTED, 'seconds_per_step')})}")
    return {"data": data, "valid_users": len(split.valid_rows), "seeds": args.compare_seeds, "arms": arms,
            "popularity": popularity(matrix, split)}


def markdown(result: dict[str, Any]) -> str:
    large, compare = result["large"], result["compare"]
    lines = [
        f"# Large catalogue — {result['date']}", "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB; "
        f"torch {result['versions']['torch']}. Command: `{result['command']}`. Load average "
        f"{result['load_average']['before']:.2f} before, {result['load_average']['after']:.2f} after; "
        f"{result['seconds'] / 60:.1f} minutes in all.", "",
        f"## {large['data']['items']:,} items × {large['data']['users']:,} users, "
        f"{large['data']['nnz']:,} interactions", "",
        f"Sampled softmax ({large['model']['sampled_negatives']} negatives), sparse updates: "
        f"{large['sparse_updates']}; batch {large['model']['batch_size']}, hidden {large['model']['hidden']}, "
        f"dim {large['model']['dim']}. {large['result']['train_users']:,} training users, "
        f"{large['valid_users']:,} validation users. Peak RSS {large['peak_rss_mb']:,} MB: "
        f"{large['peak_rss_mb_before_training']:,} MB before training (data, CSR), "
        f"{large['peak_rss_mb_first_epoch']:,} MB at the end of the first epoch's steps, the rest while "
        "validating and keeping the best epoch's weights.", "",
        "| epoch | train seconds | steps | s / step | loss | recall@20 | ndcg@100 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, e in enumerate(large["result"]["epochs"], 1):
        lines.append(f"| {i} | {e['train_seconds']:.1f} | {e['steps']} | {e['seconds_per_step']:.3f} | {e['loss']:.1f} "
                     f"| {e['recall@20']:.4f} | {e['ndcg@100']:.4f} |")
    pop = large["popularity"]
    lines += [f"| popularity | | | | | {pop['recall@20']:.4f} | {pop['ndcg@100']:.4f} |", "",
              f"## Against the full softmax: {compare['data']['items']:,} items × {compare['data']['users']:,} users, "
              f"{compare['data']['nnz']:,} interactions", "",
              f"{compare['valid_users']:,} validation users; metrics of the best epoch of "
              f"{len(next(iter(compare['arms'].values()))['runs'][0]['epochs'])}, mean (lowest–highest) over "
              f"{compare['seeds']} model seed(s).", "",
              "| training | recall@20 | ndcg@100 | s / step (median) |",
              "| --- | ---: | ---: | ---: |"]
    for name, arm in compare["arms"].items():
        cells = [f"{arm[k]:.4f} ({arm[k + ' range'][0]:.4f}–{arm[k + ' range'][1]:.4f})" for k in REPORTED]
        lines.append(f"| {name} | {' | '.join(cells)} | {arm['seconds_per_step']:.3f} |")
    pop = compare["popularity"]
    lines.append(f"| popularity | {pop['recall@20']:.4f} | {pop['ndcg@100']:.4f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if args.dlae:
        result = {"date": date.today().isoformat(), "machine": machine(), "versions": versions(),
                  "load_average_before": load_before, "dlae": dlae_part(args)}
        out = args.json_out.with_name(args.json_out.stem + "-dlae.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {out}")
        return
    large = large_part(args)  # first: the process's peak RSS is then this part's
    compare = compare_part(args)
    result = {"date": date.today().isoformat(), "machine": machine(), "versions": versions(),
              "command": " ".join(["python", "benchmarks/large_catalogue.py", *sys.argv[1:]]),
              "load_average": {"before": load_before, "after": os.getloadavg()[0]},
              "seconds": time.perf_counter() - started, "large": large, "compare": compare}
    for path in (args.json_out, args.markdown_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    args.markdown_out.write_text(markdown(result))
    say(f"wrote {args.json_out}, {args.markdown_out}")
    print(markdown(result))


if __name__ == "__main__":
    main()
