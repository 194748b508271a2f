"""The closed-form low-rank DLAE: full rank equals the direct solve, the rank-d factors are the
constrained optimum, and the randomized path agrees with the exact one."""

from __future__ import annotations

import numpy as np
import pytest

from aefeatures.data.matrix import CSR
from aefeatures.model import linear


def _data(users: int, items: int, seed: int = 0) -> tuple[np.ndarray, CSR]:
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < 0.25).astype(np.float64)
    dense[:, 0] = 1.0  # no empty column
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(users + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=users), out=indptr[1:])
    return dense, CSR(indptr, cols.astype(np.int32), np.ones(len(cols), np.float32))


def _lam(x: np.ndarray, p: float, l2: float) -> np.ndarray:
    return p / (1 - p) * (x**2).sum(0) + l2


def _objective(x: np.ndarray, b: np.ndarray, lam: np.ndarray) -> float:
    return float(((x - x @ b) ** 2).sum() + (lam[:, None] * b**2).sum())


@pytest.mark.parametrize("users, items", [(60, 20), (15, 30)])  # item-side and user-side decomposition
def test_full_rank_factors_equal_the_direct_dlae_solve(users, items):
    x, csr = _data(users, items)
    p, r = linear.dlae_factors(csr, np.arange(users), items, dim=items, dropout=0.5, l2=3.0)
    lam = _lam(x, 0.5, 3.0)
    gram = x.T @ x
    direct = np.linalg.solve(gram + np.diag(lam), gram)  # Steck 2020, eq. for the full-rank DLAE
    np.testing.assert_allclose(p.astype(np.float64) @ r.T, direct, atol=2e-5)
    np.testing.assert_allclose(r.T @ r, np.eye(items)[: r.shape[1], : r.shape[1]] * (np.abs(r).sum(0) > 0), atol=1e-5)


def test_rank_d_factors_are_the_constrained_optimum():
    x, csr = _data(80, 25, seed=1)
    lam = _lam(x, 0.67, 1.0)
    p, r = linear.dlae_factors(csr, np.arange(80), 25, dim=5, dropout=0.67, l2=1.0)
    ours = _objective(x, p.astype(np.float64) @ r.T, lam)
    full = np.linalg.solve(x.T @ x + np.diag(lam), x.T @ x)
    u, s, vt = np.linalg.svd(full)
    truncated = (u[:, :5] * s[:5]) @ vt[:5]  # a rank-5 candidate that is not the optimum
    assert ours <= _objective(x, truncated, lam) + 1e-6
    assert ours >= _objective(x, full, lam) - 1e-6
    rng = np.random.default_rng(0)
    for _ in range(5):  # nearby rank-5 matrices are no better
        nudged = (p + 1e-3 * rng.standard_normal(p.shape)).astype(np.float64) @ r.T
        assert ours <= _objective(x, nudged, lam) + 1e-6


def test_the_randomized_path_agrees_with_the_exact_one(monkeypatch):
    monkeypatch.setattr(linear, "TOLERANCE", 1e-9)  # the exact path converged all the way
    x, csr = _data(120, 40, seed=2)
    lam = _lam(x, 0.8, 10.0)
    whole = -(-40 // linear.OVERSAMPLE)  # OVERSAMPLE × whole components: the whole spectrum
    exact = {d: linear.dlae_factors(csr, np.arange(120), 40, dim=d, dropout=0.8, l2=10.0) for d in (6, whole)}
    monkeypatch.setattr(linear, "EXACT_MAX_SIDE", 0)
    approx = {d: linear.dlae_factors(csr, np.arange(120), 40, dim=d, dropout=0.8, l2=10.0) for d in (6, whole)}
    np.testing.assert_allclose(approx[whole][0] @ approx[whole][1].T, exact[whole][0] @ exact[whole][1].T,
                               atol=1e-4)
    # OVERSAMPLE × 6 of 40: Ĝ's top components only, an objective within 1% of the optimum's
    ours, best = (_objective(x, f[0].astype(np.float64) @ f[1].T, lam) for f in (approx[6], exact[6]))
    assert best <= ours <= 1.01 * best


def test_the_temperature_minimises_the_nll_and_keeps_the_ranking():
    import torch

    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    t = linear.best_temperature(z, items, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert t >= 64  # each user's own item is the unique best: sharper is better (until the NLL is 0)
    t = linear.best_temperature(z, items, torch.tensor([2, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert t == min(linear.TEMPERATURES)  # the users' item is never their best: the flattest softmax


class _TwoRanks:
    """Two ranks in two threads of one process, summing like an all-reduce: the solver's
    distributed arithmetic without processes."""

    def __init__(self):
        import threading

        self.barrier, self.slots = threading.Barrier(2), [None, None]

    def reduce_for(self, rank: int):
        def reduce(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return reduce


@pytest.mark.parametrize("method", ["items", "sketch"])
def test_ranks_that_each_hold_half_the_users_fit_what_one_process_fits(method, monkeypatch):
    import threading

    monkeypatch.setattr(linear, "TOLERANCE", 1e-10)
    x, csr = _data(90, 30, seed=3)
    one = linear.Solver(csr, np.arange(90), 30, dim=4, method=method).fit(0.67, 5.0)
    ranks, results = _TwoRanks(), [None, None]

    def rank(r: int) -> None:
        solver = linear.Solver(csr, np.arange(r * 45, (r + 1) * 45), 30, dim=4, method=method,
                               reduce=ranks.reduce_for(r))
        results[r] = solver.fit(0.67, 5.0)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    whole = (one.p @ one.r.T).numpy()
    for result in results:
        assert result.method == method
        np.testing.assert_allclose((result.p @ result.r.T).numpy(), whole, atol=1e-4 * np.abs(whole).max())
    np.testing.assert_array_equal(results[0].p.numpy(), results[1].p.numpy())  # every rank: the same factors


def test_a_warm_started_fit_needs_fewer_iterations_and_lands_on_the_same_model(monkeypatch):
    monkeypatch.setattr(linear, "DIRECT_MAX_ITEMS", 0)  # iterate, as on a catalogue above it
    x, csr = _data(200, 60, seed=4)
    solver = linear.Solver(csr, np.arange(200), 60, dim=6)
    cold = solver.fit(0.5, 10.0)
    warm = solver.fit(0.67, 10.0)
    fresh = linear.Solver(csr, np.arange(200), 60, dim=6).fit(0.67, 10.0)
    assert warm.iterations < cold.iterations
    lam = _lam(x, 0.67, 10.0)
    ours, theirs = (_objective(x, f.p.double().numpy() @ f.r.double().numpy().T, lam) for f in (warm, fresh))
    assert ours == pytest.approx(theirs, rel=linear.TOLERANCE)  # converged alike, to the tolerance


def test_a_small_catalogue_is_decomposed_directly_and_agrees_with_the_iteration(monkeypatch):
    x, csr = _data(300, 50, seed=5)
    direct = linear.Solver(csr, np.arange(300), 50, dim=5).fit(0.67, 10.0)
    monkeypatch.setattr(linear, "DIRECT_MAX_ITEMS", 0)
    monkeypatch.setattr(linear, "TOLERANCE", 1e-10)
    monkeypatch.setattr(linear, "MAX_ITERATIONS", 500)
    iterated = linear.Solver(csr, np.arange(300), 50, dim=5).fit(0.67, 10.0)
    assert direct.method == iterated.method == "items" and direct.iterations == 1 < iterated.iterations
    np.testing.assert_allclose((direct.p @ direct.r.T).numpy(), (iterated.p @ iterated.r.T).numpy(), atol=1e-4)


def test_the_users_path_iterates_in_user_space_and_fits_what_the_items_path_fits(monkeypatch):
    monkeypatch.setattr(linear, "TOLERANCE", 1e-10)
    monkeypatch.setattr(linear, "MAX_ITERATIONS", 500)
    monkeypatch.setattr(linear, "DIRECT_MAX_ITEMS", 0)
    x, _ = _data(40, 120, seed=6)
    x = np.vstack([x, x[:3]])  # 3 users twice: H = X Xᵀ is singular
    rows, cols = np.nonzero(x)
    csr = CSR(np.append(0, np.cumsum(np.bincount(rows, minlength=43))), cols.astype(np.int32),
              np.ones(len(cols), np.float32))
    users = linear.Solver(csr, np.arange(43), 120, dim=8)
    items = linear.Solver(csr, np.arange(43), 120, dim=8, method="items")
    assert users.method == "users"
    for p, l2 in ((0.5, 4.0), (0.67, 4.0)):  # the second one warm-started, from user space
        ours, theirs = users.fit(p, l2), items.fit(p, l2)
        np.testing.assert_allclose((ours.p @ ours.r.T).numpy(), (theirs.p @ theirs.r.T).numpy(), atol=2e-4)
        np.testing.assert_allclose((ours.r.T @ ours.r).numpy(), np.eye(8), atol=1e-4)  # orthonormal item vectors
    assert users.user_start[0].shape == (43, users.q)  # the start it keeps is user-sized, never item-sized
    handed = linear.Solver(csr, np.arange(43), 120, dim=8, warm=users.warm())  # a refit starts from it
    assert handed.fit(0.67, 4.0).iterations < linear.Solver(csr, np.arange(43), 120, dim=8).fit(0.67, 4.0).iterations


def test_a_warm_gram_is_reused_only_where_its_rows_hold_the_entries_it_summed():
    x, csr = _data(60, 40)
    rows = np.arange(50)
    search = linear.Solver(csr, rows, 40, dim=8, method="items")
    search.item_gram()
    added = linear.Solver(csr, np.arange(60), 40, dim=8, method="items", warm=search.warm())
    assert added.gram is not None  # only the 10 new users' products were summed
    np.testing.assert_allclose(added.item_gram().numpy(), x.T @ x, rtol=1e-5, atol=1e-4)
    fewer = x.copy()
    fewer[rows, np.argmax(x[rows] > 0, axis=1)] = 0  # each searched user loses an item (held-out items)
    kept = np.nonzero(fewer)
    masked = CSR(np.append(0, np.cumsum(np.bincount(kept[0], minlength=60))), kept[1].astype(np.int32),
                 fewer[kept].astype(np.float32))
    search = linear.Solver(masked, rows, 40, dim=8, method="items")
    search.item_gram()
    refit = linear.Solver(csr, np.arange(60), 40, dim=8, method="items", warm=search.warm())
    assert refit.gram is None  # summed again, over the entries the search never saw
    np.testing.assert_allclose(refit.item_gram().numpy(), x.T @ x, rtol=1e-5, atol=1e-4)
