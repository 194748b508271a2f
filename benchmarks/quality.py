"""Recommendation quality of every model kind with its default settings, against popularity and
a tuned EASE, on a planted synthetic dataset and on real Last.fm listening data.

    python benchmarks/quality.py                                   # synthetic 20k users × 5k items
    python benchmarks/quality.py --data synthetic --users 4000 --items 1000   # quick look
    python benchmarks/quality.py --data lastfm --seeds 0,1,2       # ../shared/data/lastfm-hetrec2k
    python benchmarks/quality.py --data lastfm --kinds dlae --dims 64,128,256
    python benchmarks/quality.py --data ml100k --ml100k recbole-1.2.1-py3-none-any.whl --seeds 0,1,2

MovieLens-100k ships inside the `recbole` wheel on PyPI (`recbole/dataset_example/ml-100k/`):
`pip download --no-deps recbole==1.2.1 -d DIR` fetches the wheel (nothing else is installed);
`--ml100k` takes that wheel or the extracted `ml-100k.inter`. Ratings of 4 and 5 are positives.

Protocol (the Last.fm README's, weak generalisation): every (user, item) pair is a positive,
users with at least 5 items are kept, 20% of each user's items (at least one) are hidden with
the seed, every method fits on the rest and ranks the whole catalogue excluding the user's
other items. Recall@20 (normalised by min(20, hidden)), NDCG@100, coverage@20.

- popularity: items by number of training users.
- EASE (Steck 2019): closed form on all training rows, λ picked on the hidden items themselves
  from a geometric grid (an upper bound for EASE, so a conservative comparison).
- each kind: trained exactly as `aefeatures run` trains it with the default settings
  (``jobs.run._train_and_evaluate``: its own held-out-user validation inside the training
  rows, early stopping, then the refit on every user), then every user is embedded from their
  training items and ranked by the model's scores — what the published features give.

The seed changes the split and the model's seed. "train s" is the kind's whole training
(validation, refit) or EASE's fit at the chosen λ, on this machine's threads.
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
import polars as pl
import torch

from aefeatures.config import EvaluationConfig, InputConfig, JobConfig, JobSection, ModelConfig
from aefeatures.data.matrix import CSR, build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.data.synthetic import generate
from aefeatures.jobs.run import _train_and_evaluate
from aefeatures.model.embed import encode
from aefeatures.quality.evaluate import KS, metrics_of_totals, rank_by_embeddings, ranking_totals, top_k
from aefeatures.quality.reference import EASE, LAMBDAS, dense_rows

ROW_NAMES = ("recall@20", "ndcg@100", "coverage@20")
# `../shared/data/lastfm-hetrec2k/` beside the project root (or one folder further up, for a
# checkout nested one level deeper); --lastfm points elsewhere.
LASTFM = next((p for p in (Path(__file__).resolve().parents[n] / "shared/data/lastfm-hetrec2k/user_artists.parquet"
                           for n in (2, 3)) if p.is_file()),
              Path(__file__).resolve().parents[2] / "shared/data/lastfm-hetrec2k/user_artists.parquet")

IBM = LASTFM.parents[1] / "ibm-articles/interactions.parquet"

ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


def load_ml100k(path: Path) -> pl.DataFrame:
    """MovieLens-100k ratings of 4 or more as (user_id, item_id), from the recbole wheel (a zip)
    or the extracted tab-separated `ml-100k.inter` (header `user_id:token item_id:token ...`)."""
    import io
    import zipfile

    raw = zipfile.ZipFile(path).read(ML100K_MEMBER) if zipfile.is_zipfile(path) else path.read_bytes()
    frame = pl.read_csv(io.BytesIO(raw), separator="\t")
    frame = frame.rename({c: c.split(":")[0] for c in frame.columns})
    return frame.filter(pl.col("rating") >= 4).select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64))


def load(args: argparse.Namespace) -> pl.DataFrame:
    """(user_id, item_id) pairs of users with at least 5 items (after ``--min-item-users`` and
    ``--cut-users``)."""
    if args.data == "lastfm":
        frame = pl.read_parquet(args.lastfm).select(user_id="user_id", item_id="artist_id")
    elif args.data == "ml100k":
        frame = load_ml100k(args.ml100k)
    elif args.data == "ibm":
        frame = pl.read_parquet(args.ibm).select("user_id", "item_id")
    elif args.data == "file":
        frame = pl.read_parquet(args.file).select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64))
    else:
        frame = generate(n_users=args.users, n_items=args.items, mean_items=args.mean_items,
                         n_communities=args.communities, in_cluster=args.in_cluster, zipf=1.1,
                         seed=3).interactions.select("user_id", "item_id")
    frame = frame.unique(["user_id", "item_id"])
    if args.cut_users:
        users = frame["user_id"].unique().sort().sample(args.cut_users, seed=7)
        frame = frame.filter(pl.col("user_id").is_in(users.implode()))
    if args.min_item_users > 1:
        frame = frame.filter(pl.len().over("item_id") >= args.min_item_users)
    return frame.filter(pl.len().over("user_id") >= 5).sort("user_id", "item_id")


def split(frame: pl.DataFrame, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training pairs, hidden pairs): per user, max(1, round(0.2 n)) of its items hidden."""
    rng = np.random.default_rng(1000 + seed)
    keyed = frame.with_columns(r=pl.Series(rng.random(len(frame))))
    ranked = keyed.with_columns(rank=pl.col("r").rank("ordinal").over("user_id"),
                                n=pl.len().over("user_id"))
    hidden = pl.col("rank") <= (pl.col("n") * 0.2).round().clip(lower_bound=1)
    return ranked.filter(~hidden).select("user_id", "item_id"), ranked.filter(hidden).select("user_id", "item_id")


def metrics(ranked: np.ndarray, held: CSR, n_items: int) -> dict[str, float]:
    return metrics_of_totals(ranking_totals(ranked, (held.indptr, held.indices), n_items))


def add_data_args(parser: argparse.ArgumentParser, *, users: int = 20000, items: int = 5000,
                  mean_items: float = 50, communities: int = 40) -> None:
    """The options :func:`load` reads: which data set, where the real ones are, and the shape of
    the synthetic one."""
    parser.add_argument("--data", choices=("synthetic", "lastfm", "ml100k", "ibm", "file"), default="synthetic")
    parser.add_argument("--lastfm", type=Path, default=LASTFM)
    parser.add_argument("--ibm", type=Path, default=IBM)
    parser.add_argument("--file", type=Path, help="--data file: a Parquet table with user_id and item_id (int64)")
    parser.add_argument("--cut-users", type=int, default=0, help="keep this many random users (seed 7) first")
    parser.add_argument("--min-item-users", type=int, default=1, help="keep items with at least this many users")
    parser.add_argument("--ml100k", type=Path, help="the recbole wheel or its ml-100k.inter (benchmarks/quality.py)")
    parser.add_argument("--users", type=int, default=users)
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--mean-items", type=float, default=mean_items)
    parser.add_argument("--communities", type=int, default=communities)
    parser.add_argument("--in-cluster", type=float, default=0.5)


def data_absent(args: argparse.Namespace) -> str | None:
    """Why the chosen real data set cannot be read here ("skipped: ..."), or None when it can."""
    if args.data == "lastfm" and not args.lastfm.is_file():
        return f"skipped: {args.lastfm} is absent (the Last.fm data is read from there, never downloaded)"
    if args.data == "ibm" and not args.ibm.is_file():
        return f"skipped: {args.ibm} is absent (read from there, never downloaded)"
    if args.data == "file" and (args.file is None or not args.file.is_file()):
        return "skipped: --data file needs --file with a Parquet table of user_id, item_id"
    if args.data == "ml100k" and (args.ml100k is None or not args.ml100k.is_file()):
        return ("skipped: pass --ml100k with the recbole wheel (`pip download --no-deps recbole==1.2.1`) or its "
                "ml-100k.inter; nothing is downloaded here")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--kinds", default="dlae,dae,vae,recvae", help="comma-separated model kinds, default settings")
    parser.add_argument("--dims", default=str(ModelConfig.dim), help="comma-separated model.dim values")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (split and model)")
    parser.add_argument("--model", action="append", default=[], help="KEY=VALUE overriding a model default")
    parser.add_argument("--folds", type=int, default=1,
                        help='evaluation.folds: k >= 2 for a dlae\'s k-fold search (with --protocol "held-out users")')
    parser.add_argument("--protocol", default=EvaluationConfig.protocol, help="evaluation.protocol of the search")
    parser.add_argument("--valid-share", type=float, default=EvaluationConfig.valid_share,
                        help="evaluation.valid_share (held-out users)")
    parser.add_argument("--reference", action="store_true",
                        help="keep the run's own EASE reference on its validation split (valid_reference in each row)")
    parser.add_argument("--ease-lambdas", default=",".join(f"{v:g}" for v in LAMBDAS[3:8]),
                        help="EASE's λ grid (a fit each: ~3 min at 18k items here), or 'none' (no EASE row)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    absent = data_absent(args)
    if absent:
        print(absent)
        return
    overrides = {k: type(getattr(ModelConfig, k))(v) for k, v in (o.split("=", 1) for o in args.model)}
    frame = load(args)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        results += run_seed(frame, seed, args, overrides)
    print(f"{args.data}: {frame['user_id'].n_unique():,} users × {frame['item_id'].n_unique():,} items, "
          f"{len(frame):,} pairs; {platform.machine()}, {torch.get_num_threads()} threads; {date.today()}\n")
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


def split_matrix(frame: pl.DataFrame, seed: int) -> tuple:
    """(the training pairs' InteractionMatrix over every item of ``frame``, the hidden pairs as a
    CSR over its user rows): :func:`split` as a model and the metrics read it."""
    train_pairs, hidden_pairs = split(frame, seed)
    items = frame["item_id"].unique().sort()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        train_pairs.write_parquet(path)
        matrix = build_matrix(read_interactions(InputConfig(str(path))), item_ids=items)
    user_row = {u: i for i, u in enumerate(matrix.user_ids.to_list())}
    item_row = {v: i for i, v in enumerate(items.to_list())}
    rows = np.array([user_row[u] for u in hidden_pairs["user_id"].to_list()])
    cols = np.array([item_row[v] for v in hidden_pairs["item_id"].to_list()])
    order = np.lexsort((cols, rows))
    indptr = np.zeros(matrix.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=indptr[1:])
    held = CSR(indptr, cols[order].astype(np.int32), np.ones(len(cols), np.float32))
    return matrix, held


def run_seed(frame: pl.DataFrame, seed: int, args: argparse.Namespace, overrides: dict) -> list[dict]:
    matrix, held = split_matrix(frame, seed)
    n_items = matrix.shape[1]
    seen = (matrix.csr.indptr, matrix.csr.indices)
    out = []

    def record(method: str, m: dict, seconds: float, **extra) -> None:
        out.append({"method": method, "seed": seed, **{k: m[k] for k in ROW_NAMES}, "seconds": seconds, **extra})
        print(json.dumps(out[-1]), flush=True)

    counts = np.bincount(matrix.csr.indices, minlength=n_items).astype(np.float64)
    ranked = top_k(np.broadcast_to(counts, (matrix.shape[0], n_items)).copy(), seen, max(KS))
    record("popularity", metrics(ranked, held, n_items), 0.0)

    if args.ease_lambdas != "none":
        record_ease(matrix, held, seen, args.ease_lambdas, record)

    for kind in [k for k in args.kinds.split(",") if k]:
        for dim in [int(d) for d in args.dims.split(",")]:
            model_cfg = replace(ModelConfig(kind=kind, dim=dim, seed=seed), **overrides)
            checks = EvaluationConfig(protocol=args.protocol, valid_share=args.valid_share, folds=args.folds,
                                      reference_max_items=EvaluationConfig.reference_max_items if args.reference else 0)
            job = JobConfig(JobSection("quality", Path(tempfile.gettempdir())), InputConfig(str(LASTFM)),
                            model=model_cfg, evaluation=checks)
            start = time.perf_counter()
            trained, evaluation, _ = _train_and_evaluate(matrix, job, progress=False)
            seconds = time.perf_counter() - start
            vectors, _ = encode(trained.model, matrix.csr)
            part = trained.model.neighbours  # a dlae's sparse item-item part: its scores are the model's too
            ranked = rank_by_embeddings(vectors, trained.model.decoder.weight.detach().float().numpy(),
                                        trained.model.decoder.bias.detach().float().numpy(), seen, max(KS),
                                        extra=None if part is None else part.row_scores(*matrix.csr))
            record(f"{kind} d={model_cfg.dim}", metrics(ranked, held, n_items), seconds,
                   best_epoch=trained.best_epoch, stop=trained.stop_reason, chosen=trained.chosen,
                   refit=(trained.refit or {}).get("status"), valid_ndcg=evaluation["model"]["ndcg@100"],
                   valid_reference=evaluation["reference"].get("ndcg@100"),
                   neighbours=0 if part is None else part.nnz)
    return out


def record_ease(matrix, held: CSR, seen: tuple, lambdas: str, record) -> None:
    """EASE on all training rows with λ picked on the hidden items from ``lambdas`` (comma-separated)."""
    n_items = matrix.shape[1]
    everyone = np.arange(matrix.shape[0])
    ease = EASE(matrix.csr, everyone, n_items)
    x = dense_rows(matrix.csr, everyone, n_items)
    best = None
    for lam in [float(v) for v in lambdas.split(",")]:
        start = time.perf_counter()
        scores = ease.scorer(lam)(x)
        seconds = time.perf_counter() - start
        m = metrics(top_k(scores, seen, max(KS)), held, n_items)
        if best is None or m["ndcg@100"] > best[0]["ndcg@100"]:
            best = (m, seconds, lam)
    record("EASE", best[0], best[1], **{"lambda": best[2]})


def table(results: list[dict]) -> str:
    """Markdown: mean ± spread (max - min over seeds) per method, and NDCG@100 / EASE's."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    ease = np.mean([r["ndcg@100"] for r in results if r["method"] == "EASE"] or [np.nan])
    lines = ["| method | seeds | " + " | ".join(ROW_NAMES) + " | NDCG@100 / EASE | train s |",
             "| --- | --- |" + " ---: |" * (len(ROW_NAMES) + 2)]
    for method in methods:
        rs = [r for r in results if r["method"] == method]

        def cell(key: str) -> str:
            values = [r[key] for r in rs]
            return f"{np.mean(values):.4f}" + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")

        lines.append(f"| {method} | {','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(cell(k) for k in ROW_NAMES)
                     + f" | {np.mean([r['ndcg@100'] for r in rs]) / ease:.3f} | {np.mean([r['seconds'] for r in rs]):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
