"""How often a dlae's search chooses the setting the test items like best (#27, item 1).

    python benchmarks/choice.py --data lastfm --seeds 0,1,2
    python benchmarks/choice.py --data file --file BOOKS.parquet --seeds 1 --neighbours 1,3

The protocol of `benchmarks/quality.py` (20% of each user's items hidden as the test items),
then the run's own validation split inside the training rows and the default search
(:mod:`aefeatures.model.dlae_search`). Every fit of the search is scored twice at every
popularity exponent β: on validation (what the search sees) and on the test items (every user
embedded from their training items, the model fitted on the search's users). With
``--neighbours`` every fit below full rank also gets the sparse item-item part at each γ given,
scored the same way. Each row of ``--json-out`` is one (fit, γ, β): its validation and test
NDCG@100. The summary says, per seed, what validation chose, what the test items liked best,
and the chosen setting's test NDCG@100 over the best's: 1.000 when the search chose the
test-best setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from aefeatures.config import EvaluationConfig, ModelConfig
from aefeatures.jobs.run import _Validator
from aefeatures.model import dlae_search, neighbours
from aefeatures.model.embed import embeddings
from aefeatures.quality.evaluate import KS, rank_by_scaled_embeddings, split_users

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_data_args, load, metrics, split_matrix  # noqa: E402  (benchmarks/ is not a package)


class Probe(dlae_search._Search):
    """The default search, every fit (and its sparse parts) also scored on the test items."""

    def __init__(self, *args, test: tuple, weights: list[float], rows_out: list[dict], seed: int):
        super().__init__(*args)
        self.test, self.weights, self.rows_out, self.seed = test, weights, rows_out, seed

    def fit(self, dropout: float, l2: float) -> float | None:
        fitted = []
        solve = self.solver.fit
        self.solver.fit = lambda *a, **k: fitted.append(solve(*a, **k)) or fitted[-1]
        try:
            score = super().fit(dropout, l2)
        finally:
            self.solver.fit = solve
        if score is None or not fitted:
            return score
        p, r = fitted[0].p, fitted[0].r
        model = dlae_search._dlae_model(self.matrix.shape[1], self.cfg, p, self.device)
        self._probe(model, r, dropout, l2, 0.0)
        if self.cfg.dim < min(len(self.fit_rows), self.matrix.shape[1]):
            parts = neighbours.fit_weights(self.solver.item_gram(), p, r, self.solver.penalty(dropout, l2 * self.share),
                                           per_item=self.cfg.neighbours, weights=self.weights)
            for weight, part in zip(self.weights, parts):
                model.neighbours = part
                self._probe(model, r, dropout, l2, weight)
        return score

    def _probe(self, model, r, dropout: float, l2: float, weight: float) -> None:
        csr, held, n_items = self.test
        dlae_search._set_item_vectors(model, r, self.counts, 0.0)
        scales = [(self.counts.astype(np.float64) + 1.0) ** -e for e in self.exponents]
        valid = self.validate.scaled(model, scales)
        vectors = embeddings(model, csr)
        part = model.neighbours
        ranked = rank_by_scaled_embeddings(vectors, model.decoder.weight.detach().float().numpy(),
                                           np.zeros(n_items, np.float32), (csr.indptr, csr.indices), max(KS), scales,
                                           extra=None if part is None else part.row_scores(*csr))
        for exponent, v, ranks in zip(self.exponents, valid, ranked):
            row = {"seed": self.seed, "dropout": dropout, "l2": l2, "neighbour_weight": weight,
                   "popularity_exponent": exponent, "valid": v["ndcg@100"],
                   "test": metrics(ranks, held, n_items)["ndcg@100"]}
            self.rows_out.append(row)
            print(json.dumps(row), flush=True)


def run_seed(frame, seed: int, args: argparse.Namespace) -> list[dict]:
    matrix, held = split_matrix(frame, seed)
    n_items = matrix.shape[1]

    ev = EvaluationConfig()
    valid_split = split_users(matrix.indptr, matrix.indices, share=ev.valid_share, max_users=ev.max_valid_users,
                              holdout=ev.holdout, seed=seed, min_users=ev.min_valid_users)
    cfg = ModelConfig(kind="dlae", seed=seed)
    nnz = int(matrix.csr.indptr[-1])
    cfg = replace(cfg, dim=args.dim or dlae_search.dlae_width(matrix.shape[0], n_items, nnz))
    out: list[dict] = []
    probe = Probe(matrix, cfg, valid_split.train_rows, _Validator(valid_split, None), None, None,
                  test=(matrix.csr, held, n_items), weights=args.neighbours, rows_out=out, seed=seed)
    probe.run()
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Per seed: the validation's choice, the test-best, and the choice's test over the best's."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        chosen = max(mine, key=lambda r: r["valid"])
        best = max(mine, key=lambda r: r["test"])
        out.append({"seed": seed, "chosen": chosen, "test_best": best, "chosen_over_best": chosen["test"] / best["test"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--neighbours", default="", help="comma-separated γ: each fit also with the item-item part")
    parser.add_argument("--dim", type=int, default=0, help="model.dim (0: by the data, as the default)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.neighbours = [float(v) for v in args.neighbours.split(",") if v]
    frame = load(args)
    rows = [row for seed in args.seeds.split(",") for row in run_seed(frame, int(seed), args)]
    result = {"rows": rows, "summary": summary(rows)}
    for s in result["summary"]:
        print(json.dumps(s))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
