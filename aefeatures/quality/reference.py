"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019) as a reference
beside every run: the strongest simple baseline on many public data sets, in closed form.

    B = I - P / diag(P),   P = (XᵀX + λI)⁻¹,   scores = x B   (B's diagonal is 0)

X is the training users' matrix (the values the model reads) and x a validation user's
fold-in vector, on the same split the model is validated on. λ is tuned on that split by a
walk along a small geometric grid (so the reference is, if anything, flattered). When there are
fewer training users than items, the same scores come from the Woodbury identity with a
(users × users) system: P = (I - Xᵀ(XXᵀ + λI)⁻¹X) / λ.

The cost is one dense inverse of the smaller side per λ: O(n³) for n = min(items, training
users) and two n² float64 arrays (15,000: 3.6 GB; about a minute or two per λ on 2 cores, and
the walk takes 3–4 λ); above ``max_size`` the reference is skipped and the reason recorded.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from aefeatures.data.matrix import CSR
from aefeatures.quality.evaluate import KS, Split, metrics_of_totals, ranking_totals, top_k
from aefeatures.schema import KEY_METRIC

LAMBDAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 1e5, 3e5, 1e6)
FIRST = 5  # λ = 300 first: Steck's ML-20M value is 500, Last.fm's best about 100
MAX_DENSE_ENTRIES = 300_000_000  # float64 (training users × items) for the Woodbury side: 2.4 GB
SCORE_CHUNK = 16 * 2**20  # float64 scores held at once


def dense_rows(csr: CSR, rows: np.ndarray, n_items: int) -> np.ndarray:
    """(len(rows), n_items) float64 of the CSR rows ``rows``."""
    offsets, items, values = csr.gather(rows)
    out = np.zeros((len(rows), n_items))
    lengths = np.diff(np.append(offsets, len(items)))
    out[np.repeat(np.arange(len(rows)), lengths), items] = values
    return out


class EASE:
    """EASE scores for fold-in vectors, for any λ, from the training users ``rows`` of ``csr``.

    With at least as many training users as items the (n_items, n_items) Gram matrix XᵀX is
    summed a block of users at a time (X is never dense); otherwise X (n_train, n_items) is
    made dense and XXᵀ formed (Woodbury).
    """

    def __init__(self, csr: CSR, rows: np.ndarray, n_items: int):
        self.items_side = len(rows) >= n_items
        if self.items_side:
            self.x = None
            self.gram = np.zeros((n_items, n_items))
            step = max(1, SCORE_CHUNK // max(n_items, 1))
            for start in range(0, len(rows), step):
                block = dense_rows(csr, rows[start:start + step], n_items)
                self.gram += block.T @ block
        else:
            self.x = dense_rows(csr, rows, n_items)
            self.gram = self.x @ self.x.T

    def weights(self, lam: float) -> np.ndarray:
        """(n_items, n_items) float64 B with a zero diagonal (items side only)."""
        b = np.linalg.inv(self.gram + lam * np.eye(len(self.gram)))
        b /= -np.diag(b).copy()  # in place: with the Gram matrix, two n² arrays at once
        np.fill_diagonal(b, 0.0)
        return b

    def scorer(self, lam: float):
        """A function: (n, n_items) fold-in rows → (n, n_items) float64 scores x B."""
        if self.items_side:
            b = self.weights(lam)
            return lambda f: f @ b
        kx = np.linalg.solve(self.gram + lam * np.eye(len(self.gram)), self.x)  # (XXᵀ + λI)⁻¹ X
        diag = 1.0 - np.einsum("ij,ij->j", self.x, kx)  # λ diag(P)
        # x B = x - x P / diag(P), with λ P = I - Xᵀ(XXᵀ + λI)⁻¹X
        return lambda f: f - (f - (f @ self.x.T) @ kx) / diag


def ease_reference(csr: CSR, split: Split, n_items: int, *, max_size: int,
                   lambdas: tuple[float, ...] = LAMBDAS) -> dict[str, Any]:
    """EASE's validation metrics on ``split`` (the training users of ``csr`` fit it), λ tuned.

    Returns the manifest's `evaluation.reference` section: ``{"method": "EASE", "lambda", the
    metrics at the best λ, "tried": {λ: NDCG@100}, "seconds"}``, or ``{"method": "EASE",
    "skipped": reason}`` when the system is larger than ``max_size`` (or its dense training
    matrix than :data:`MAX_DENSE_ENTRIES`).
    """
    started = time.perf_counter()
    n_train = len(split.train_rows)
    size = min(n_items, n_train)
    if max_size <= 0:
        return {"method": "EASE", "skipped": "evaluation.reference_max_items = 0"}
    if size > max_size:
        return {"method": "EASE", "skipped": f"its system would be {size:,} × {size:,} (min of {n_items:,} items "
                f"and {n_train:,} training users), above evaluation.reference_max_items = {max_size:,}"}
    if n_train < n_items and n_train * n_items > MAX_DENSE_ENTRIES:
        return {"method": "EASE", "skipped": f"the dense training matrix ({n_train:,} × {n_items:,}) would "
                f"take {n_train * n_items * 8 / 2**30:.1f} GiB"}
    ease = EASE(csr, split.train_rows, n_items)
    fold_in = split.fold_in
    tried: dict[float, dict[str, float]] = {}

    def metrics(i: int) -> float:
        lam = lambdas[i]
        if lam not in tried:
            tried[lam] = _metrics(ease.scorer(lam), fold_in, split, n_items)
        return tried[lam][KEY_METRIC]

    # Walk the grid from FIRST towards the better neighbour until the metric drops.
    best = min(FIRST, len(lambdas) - 1)
    step = 1 if best + 1 < len(lambdas) and (best == 0 or metrics(best + 1) >= metrics(best - 1)) else -1
    while 0 <= best + step < len(lambdas) and metrics(best + step) > metrics(best):
        best += step
    metrics(best)
    lam = lambdas[best]
    return {"method": "EASE", "lambda": lam, **tried[lam],
            "tried": {f"{k:g}": v[KEY_METRIC] for k, v in sorted(tried.items())},
            "at_grid_edge": best in (0, len(lambdas) - 1),  # the best λ may lie beyond the grid
            "seconds": round(time.perf_counter() - started, 3)}


def _metrics(score, fold_in: CSR, split: Split, n_items: int) -> dict[str, float]:
    n_valid = len(split.valid_rows)
    step = max(1, SCORE_CHUNK // max(n_items, 1))
    ranked = []
    for start in range(0, n_valid, step):
        rows = np.arange(start, min(start + step, n_valid))
        f = dense_rows(fold_in, rows, n_items)
        lo, hi = fold_in.indptr[start], fold_in.indptr[rows[-1] + 1]
        ranked.append(top_k(score(f), (fold_in.indptr[start:rows[-1] + 2] - lo, fold_in.indices[lo:hi]), max(KS)))
    totals = ranking_totals(np.concatenate(ranked), split.held_out, n_items)
    return {k: round(v, 5) for k, v in metrics_of_totals(totals).items() if k != "users"}
