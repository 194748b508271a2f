"""Fold-in on real data: users and items the model never trained on, against a retrain that saw them.

    python benchmarks/fold_in.py --data lastfm --seeds 0,1,2        # ../shared/data/lastfm-hetrec2k
    python benchmarks/fold_in.py --data ml100k --ml100k recbole-1.2.1-py3-none-any.whl --seeds 0,1,2
    python benchmarks/fold_in.py --data synthetic --users 2000 --items 500   # quick look

The data and its loading are benchmarks/quality.py's (every distinct pair a positive, users with
at least 5 items). The model is the default dlae, trained as `aefeatures run` trains it
(``jobs.run._train_and_evaluate``); ``--kind`` picks another.

(a) **Held-out users** (strong generalisation): 20% of the users are left out of training; 80%
    of each one's items are their history, 20% their test items. *fold-in*: the model trained
    on the other users embeds each history at request time through the version's stored encoder
    (numpy, :class:`aefeatures.store.encoder.Encoder`, what the service runs). *retrain*: a model
    trained on the other users and these histories embeds the same users as a published version
    does. Both rank the whole catalogue without the history; NDCG@100 and Recall@20 on the test
    items, and fold-in / retrain.
(b) **Hidden items**: 10% of the items (seeded) are left out of training; the split is quality.py's
    (20% of each user's items are test items). *retrain*: a model trained on every training
    pair. *fold-in*: the model trained without the hidden items, which are then folded in from
    the training pairs (:func:`aefeatures.model.fold_in.fold_in_items`) — those with at least
    ``t`` users for each threshold ``t`` of ``--min-users``; an item below it is never
    recommended and does not count in a history. *no fold-in*: the hidden items never
    recommended. *popularity*. NDCG@100 on all test items, and on the test items that are hidden
    items (how well new items are recommended).

Prints a JSON line per measurement and a markdown summary; ``--json-out`` keeps the lines.
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
from quality import add_data_args, data_absent, load, split  # noqa: E402  (benchmarks/ is not a package)

from aefeatures.config import EvaluationConfig, InputConfig, JobConfig, JobSection, ModelConfig  # noqa: E402
from aefeatures.data.matrix import CSR, InteractionMatrix, build_matrix  # noqa: E402
from aefeatures.data.read import read_interactions  # noqa: E402
from aefeatures.jobs.run import _train_and_evaluate  # noqa: E402
from aefeatures.model.autoencoder import Autoencoder, encoder_arrays  # noqa: E402
from aefeatures.model.embed import encode  # noqa: E402
from aefeatures.model.fold_in import fold_in_items  # noqa: E402
from aefeatures.quality.evaluate import metrics_of_totals, ranking_totals, top_k  # noqa: E402
from aefeatures.store.encoder import Encoder, write_encoder  # noqa: E402

K = 100
HELD_OUT_USERS = 0.2
HIDDEN_ITEMS = 0.1


def matrix_of(pairs: pl.DataFrame, items: pl.Series) -> InteractionMatrix:
    """The binary user × item matrix of ``pairs`` over the sorted vocabulary ``items``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        pairs.write_parquet(path)
        return build_matrix(read_interactions(InputConfig(str(path))), item_ids=items)


def held_csr(pairs: pl.DataFrame, users: pl.Series, items: pl.Series) -> CSR:
    """``pairs`` as a CSR over the sorted ``users`` (rows) and ``items`` (columns)."""
    rows = users.search_sorted(pairs["user_id"]).to_numpy()
    cols = items.search_sorted(pairs["item_id"]).to_numpy()
    order = np.lexsort((cols, rows))
    indptr = np.zeros(len(users) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(users)), out=indptr[1:])
    return CSR(indptr, cols[order].astype(np.int32), np.ones(len(order), np.float32))


def train(matrix: InteractionMatrix, kind: str, seed: int) -> tuple[Autoencoder, dict, float]:
    job = JobConfig(JobSection("fold_in", Path(tempfile.gettempdir())), InputConfig("unused.parquet"),
                    model=ModelConfig(kind=kind, seed=seed), evaluation=EvaluationConfig(reference_max_items=0))
    started = time.perf_counter()
    trained, _, _ = _train_and_evaluate(matrix, job, progress=False)
    return trained.model, trained.chosen or {}, time.perf_counter() - started


def ranked(user_vectors: np.ndarray, model: Autoencoder, columns: np.ndarray, n_items: int,
           seen: CSR) -> np.ndarray:
    """(users, K) item ids' rows by the model's scores; ``columns`` maps the model's items to
    the catalogue's rows; items the model lacks are never recommended."""
    scores = np.full((len(user_vectors), n_items), -np.inf, np.float32)
    scores[:, columns] = user_vectors @ model.decoder.weight.detach().numpy().T + model.decoder.bias.detach().numpy()
    return top_k(scores, (seen.indptr, seen.indices), K)


def metrics(rank: np.ndarray, held: CSR, n_items: int) -> dict[str, float]:
    m = metrics_of_totals(ranking_totals(rank, (held.indptr, held.indices), n_items))
    return {"ndcg@100": round(m["ndcg@100"], 5), "recall@20": round(m["recall@20"], 5), "users": m["users"]}


def restricted(held: CSR, keep: np.ndarray) -> CSR:
    """``held`` with only the entries whose item row is in ``keep`` (bool over items)."""
    mask = keep[held.indices]
    n = len(held.indptr) - 1
    owner = np.repeat(np.arange(n), np.diff(held.indptr))[mask]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=indptr[1:])
    return CSR(indptr, held.indices[mask], held.values[mask])


def held_out_users(frame: pl.DataFrame, seed: int, kind: str, emit) -> None:
    """Row (a)."""
    items = frame["item_id"].unique().sort()
    users = frame["user_id"].unique().sort()
    rng = np.random.default_rng(2000 + seed)
    out_users = pl.Series("user_id", np.sort(rng.choice(users.to_numpy(), int(len(users) * HELD_OUT_USERS),
                                                        replace=False)))
    outside = frame.filter(pl.col("user_id").is_in(out_users.implode()))
    history, test = split(outside, seed)
    inside = frame.filter(~pl.col("user_id").is_in(out_users.implode()))
    history_csr, test_csr = held_csr(history, out_users, items), held_csr(test, out_users, items)
    n_items = len(items)

    model, chosen, seconds = train(matrix_of(inside, items), kind, seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_encoder(Path(tmp), kind=model.shape.kind, dim=model.shape.dim, arrays=encoder_arrays(model))
        started = time.perf_counter()
        z = Encoder(Path(tmp)).embed(history_csr.indptr, history_csr.indices, history_csr.values)
        encode_s = time.perf_counter() - started
    fold = metrics(ranked(z, model, np.arange(n_items), n_items, history_csr), test_csr, n_items)
    emit({"row": "a", "method": "fold-in", "seed": seed, **fold, "train_s": round(seconds, 2),
          "encode_s": round(encode_s, 3), "chosen": chosen})

    both = pl.concat([inside, history])
    retrain_matrix = matrix_of(both, items)
    model, chosen, seconds = train(retrain_matrix, kind, seed)
    rows = retrain_matrix.user_ids.search_sorted(out_users).to_numpy()
    z, _ = encode(model, _rows(retrain_matrix.csr, rows))
    again = metrics(ranked(z, model, np.arange(n_items), n_items, history_csr), test_csr, n_items)
    emit({"row": "a", "method": "retrain", "seed": seed, **again, "train_s": round(seconds, 2), "chosen": chosen})
    emit({"row": "a", "method": "fold-in / retrain", "seed": seed,
          "ndcg@100": round(fold["ndcg@100"] / again["ndcg@100"], 4),
          "recall@20": round(fold["recall@20"] / again["recall@20"], 4)})


def _rows(csr: CSR, rows: np.ndarray) -> CSR:
    offsets, items, values = csr.gather(rows)
    return CSR(np.append(offsets, len(items)).astype(np.int64), items, values)


def hidden_items(frame: pl.DataFrame, seed: int, kind: str, thresholds: list[int], emit) -> None:
    """Row (b)."""
    items = frame["item_id"].unique().sort()
    n_items = len(items)
    train_pairs, test_pairs = split(frame, seed)
    rng = np.random.default_rng(3000 + seed)
    hidden = np.zeros(n_items, bool)
    hidden[rng.choice(n_items, int(n_items * HIDDEN_ITEMS), replace=False)] = True
    full = matrix_of(train_pairs, items)
    users = full.user_ids
    test = held_csr(test_pairs.filter(pl.col("user_id").is_in(users.implode())), users, items)
    test_hidden = restricted(test, hidden)
    seen = full.csr
    counts = np.bincount(seen.indices, minlength=n_items)

    def emit_ranking(method: str, rank: np.ndarray, **extra) -> None:
        emit({"row": "b", "method": method, "seed": seed, **metrics(rank, test, n_items),
              "hidden_ndcg@100": metrics(rank, test_hidden, n_items)["ndcg@100"],
              "hidden_recall@20": metrics(rank, test_hidden, n_items)["recall@20"], **extra})

    pop = np.broadcast_to(counts.astype(np.float32), (full.shape[0], n_items)).copy()
    emit_ranking("popularity", top_k(pop, (seen.indptr, seen.indices), K))

    model, chosen, seconds = train(full, kind, seed)
    z, _ = encode(model, seen)
    emit_ranking("retrain", ranked(z, model, np.arange(n_items), n_items, seen), train_s=round(seconds, 2),
                 chosen=chosen)
    retrain_scores = _scores(z, model, np.flatnonzero(hidden))

    known = np.flatnonzero(~hidden)
    model, chosen, seconds = train(matrix_of(train_pairs.filter(pl.col("item_id").is_in(items.gather(known).implode())),
                                             items.gather(known)), kind, seed)
    for t in [None, *thresholds]:
        columns = known if t is None else np.flatnonzero(~hidden | (counts >= t))
        csr = _columns(seen, columns, n_items)
        trained_row = np.where(hidden[columns], -1, np.searchsorted(known, columns))
        started = time.perf_counter()
        grown = model if t is None else fold_in_items(model, csr, trained_row, dropout=chosen.get("dropout", 0.5),
                                                      l2=chosen.get("l2", 100.0))
        fold_s = time.perf_counter() - started
        grown_model = grown if t is None else grown.model
        z, _ = encode(grown_model, csr)
        if t == min(thresholds):
            folded_rows = columns[hidden[columns]]  # the hidden items folded in, catalogue rows
            emit({"row": "b", "method": "agreement with the retrain", "seed": seed,
                  **agreement(_scores(z, grown_model, np.flatnonzero(hidden[columns])),
                              retrain_scores[:, np.searchsorted(np.flatnonzero(hidden), folded_rows)],
                              counts[folded_rows])})
        emit_ranking("no fold-in" if t is None else f"fold-in, >= {t} users", ranked(z, grown_model, columns, n_items,
                                                                                     seen),
                     folded=int((hidden & (counts >= (t or n_items + 1))).sum()), hidden=int(hidden.sum()),
                     fold_s=round(fold_s, 3), train_s=round(seconds, 2),
                     refit_residual=None if t is None else round(grown.refit_residual, 5))


BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 9), (10, None))


def _scores(z: np.ndarray, model: Autoencoder, rows: np.ndarray) -> np.ndarray:
    """(users, len(rows)) the model's scores of its item rows ``rows``."""
    return z @ model.decoder.weight.detach().numpy()[rows].T + model.decoder.bias.detach().numpy()[rows]


def agreement(folded: np.ndarray, retrained: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Median correlation, over users, of each hidden item's folded-in scores with the retrain's,
    by the item's number of training users: how far a fold-in on that few users can be trusted."""
    out = {}
    for low, high in BUCKETS:
        picked = np.flatnonzero((counts >= low) & (counts <= (high or counts.max())))
        corr = [np.corrcoef(folded[:, j], retrained[:, j])[0, 1] for j in picked if folded[:, j].std() > 0]
        out[f"users {low}" + ("+" if high is None else f"-{high}" if high > low else "")] = \
            round(float(np.median(corr)), 4) if corr else None
        out[f"n {low}" + ("+" if high is None else f"-{high}" if high > low else "")] = len(picked)
    return out


def _columns(csr: CSR, columns: np.ndarray, n_items: int) -> CSR:
    """``csr`` with only the item rows ``columns`` (sorted), renumbered 0..len(columns)-1."""
    position = np.full(n_items, -1, np.int64)
    position[columns] = np.arange(len(columns))
    moved = position[csr.indices]
    keep = moved >= 0
    owner = np.repeat(np.arange(csr.n_rows), np.diff(csr.indptr))[keep]
    indptr = np.zeros(csr.n_rows + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=csr.n_rows), out=indptr[1:])
    return CSR(indptr, moved[keep].astype(np.int32), csr.values[keep])


def summary(lines: list[dict]) -> str:
    """Markdown: mean ± spread (max - min over seeds) per (row, method)."""
    out = ["| row | method | NDCG@100 | Recall@20 | hidden items' NDCG@100 |", "|---|---|---|---|---|"]
    agree = [r for r in lines if r["method"] == "agreement with the retrain"]
    lines = [r for r in lines if r["method"] != "agreement with the retrain"]
    keys = list(dict.fromkeys((r["row"], r["method"]) for r in lines))
    for row, method in keys:
        group = [r for r in lines if (r["row"], r["method"]) == (row, method)]

        def cell(name: str) -> str:
            values = [r[name] for r in group if r.get(name) is not None]
            if not values:
                return ""
            return f"{np.mean(values):.4f}" + (f" ± {max(values) - min(values):.4f}" if len(values) > 1 else "")
        out.append(f"| {row} | {method} | {cell('ndcg@100')} | {cell('recall@20')} | {cell('hidden_ndcg@100')} |")
    if agree:
        buckets = [k for k in agree[0] if k.startswith("users ")]
        out += ["", "| hidden items' training users | " + " | ".join(b[6:] for b in buckets) + " |",
                "|---|" + "---|" * len(buckets),
                "| items (all seeds) | " + " | ".join(str(sum(r["n " + b[6:]] for r in agree)) for b in buckets) + " |",
                "| median score correlation with the retrain | " + " | ".join(
                    f"{np.mean([r[b] for r in agree if r[b] is not None]):.3f}" if any(r[b] is not None for r in agree)
                    else "" for b in buckets) + " |"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, users=4000, items=1000, mean_items=30, communities=20)
    parser.add_argument("--kind", default="dlae")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rows", default="a,b", help="which rows: a (held-out users), b (hidden items)")
    parser.add_argument("--min-users", default="1,2,3,5,10", help="fold-in thresholds measured in row (b)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    absent = data_absent(args)
    if absent:
        print(absent)
        return
    frame = load(args)
    header = {"data": args.data, "users": frame["user_id"].n_unique(), "items": frame["item_id"].n_unique(),
              "pairs": len(frame), "kind": args.kind, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "date": str(date.today())}
    print(json.dumps(header), flush=True)
    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    thresholds = [int(t) for t in args.min_users.split(",")]
    for seed in [int(s) for s in args.seeds.split(",")]:
        if "a" in args.rows:
            held_out_users(frame, seed, args.kind, emit)
        if "b" in args.rows:
            hidden_items(frame, seed, args.kind, thresholds, emit)
    print()
    print(summary(lines))
    if args.json_out:
        args.json_out.write_text(json.dumps({"header": header, "lines": lines}, indent=2))


if __name__ == "__main__":
    main()
