"""The EASE reference: its closed form against a direct NumPy solve, on either side of the
Woodbury identity, and the λ walk over the grid."""

from __future__ import annotations

import numpy as np
import pytest

from aefeatures.data.matrix import CSR
from aefeatures.quality.evaluate import split_users
from aefeatures.quality.reference import EASE, LAMBDAS, ease_reference


def _direct_ease(x: np.ndarray, lam: float) -> np.ndarray:
    """B minimising ||X - XB||² + λ||B||² subject to diag(B) = 0, by Lagrange multipliers
    solved directly (Steck 2019, eq. 4): B = I - P diag(1/diag P)."""
    n = x.shape[1]
    p = np.linalg.solve(x.T @ x + lam * np.eye(n), np.eye(n))
    return np.eye(n) - p / np.diag(p)[None, :]


@pytest.mark.parametrize("users, items", [(40, 12), (8, 30)])  # Gram side; Woodbury side
def test_ease_scores_match_a_direct_numpy_solve(users, items):
    rng = np.random.default_rng(0)
    x = (rng.random((users, items)) < 0.3).astype(np.float64)
    f = (rng.random((5, items)) < 0.3).astype(np.float64)
    ease = EASE(_csr(x), np.arange(users), items)
    assert ease.items_side == (users >= items)
    for lam in (0.5, 10.0):
        expected = f @ _direct_ease(x, lam)
        np.testing.assert_allclose(ease.scorer(lam)(f), expected, rtol=1e-8, atol=1e-10)
        b = _direct_ease(x, lam)
        np.testing.assert_allclose(np.diag(b), 0.0, atol=1e-12)
        # B is the constrained least-squares optimum: the KKT condition (XᵀX + λI)B - XᵀX is
        # diagonal (its off-diagonal part vanishes)
        kkt = (x.T @ x + lam * np.eye(items)) @ b - x.T @ x
        np.testing.assert_allclose(kkt - np.diag(np.diag(kkt)), 0.0, atol=1e-8)


def _csr(dense: np.ndarray) -> CSR:
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(len(dense) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(dense)), out=indptr[1:])
    return CSR(indptr, cols.astype(np.int32), dense[rows, cols].astype(np.float32))


def test_the_reference_tunes_lambda_on_the_split_and_beats_chance():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 4, 300)  # four communities, each with its own 10 of 40 items
    dense = np.zeros((300, 40))
    for u, g in enumerate(groups):
        dense[u, rng.choice(10, 5, replace=False) + 10 * g] = 1
    csr = _csr(dense)
    split = split_users(csr.indptr, csr.indices, share=0.2, max_users=1000, holdout=0.4, seed=0)
    ref = ease_reference(csr, split, 40, max_size=100)
    assert ref["method"] == "EASE" and ref["lambda"] in [float(k) for k in ref["tried"]]
    assert ref["ndcg@100"] == max(ref["tried"].values())
    assert ref["at_grid_edge"] == (ref["lambda"] in (LAMBDAS[0], LAMBDAS[-1]))
    assert ref["recall@10"] > 0.9  # the hidden items are the rest of the user's community
    skipped = ease_reference(csr, split, 40, max_size=39)
    assert "above evaluation.reference_max_items = 39" in skipped["skipped"]
