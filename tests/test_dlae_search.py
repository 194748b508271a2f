"""A dlae's validated search (aefeatures.model.dlae_search): the dropout grid, the λ walks, the
popularity exponent's walk, the item vectors it publishes, and the sampled search of large data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model import dlae_search, linear
from aefeatures.model.dlae_search import DLAE_DROPOUTS, DLAE_L2_FACTOR, DLAE_POPULARITY_EXPONENTS
from aefeatures.model.train import train
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"),
                                                      weight_col="rating", min_weight=4.0)))


def test_a_dlae_walks_the_popularity_exponent_while_validation_rises_and_scales_the_item_vectors(matrix):
    scripted = iter([0.30, 0.31, 0.32, 0.315] + [0.20] * 100)  # the first p: β rises for 3 steps, then falls
    calls = []

    def validate(model):
        calls.append(model.decoder.weight.detach().clone())
        return {"ndcg@100": next(scripted)}

    cfg = ModelConfig(kind="dlae", dim=8, dropout=DLAE_DROPOUTS[0], neighbours=0)
    result = train(matrix, cfg, validate=validate, progress=False)
    chosen = DLAE_POPULARITY_EXPONENTS[2]
    assert result.chosen == {"dropout": DLAE_DROPOUTS[0], "l2": cfg.l2, "popularity_exponent": chosen}
    assert result.history[0]["popularity_exponent"] == chosen and result.history[0]["ndcg@100"] == 0.32
    # every later fit stopped at its second exponent (no rise): the other p, then at the two best
    # p λ once up and once down
    assert len(calls) == 4 + 2 * (len(DLAE_DROPOUTS) - 1) + 2 * (2 + 2)
    assert [h["dropout"] for h in result.history[-4:]] == [DLAE_DROPOUTS[0]] * 2 + [DLAE_DROPOUTS[1]] * 2
    assert [h["l2"] for h in result.history[-4:]] == [300.0, 33.33] * 2
    # the item vectors are R's rows × (n_j + 1)^-β, times one temperature: the index's inner
    # products stay the model's own scores
    rows = np.arange(matrix.shape[0])
    _, r = linear.dlae_factors(matrix.csr, rows, matrix.shape[1], dim=8, dropout=DLAE_DROPOUTS[0], l2=cfg.l2)
    counts = np.bincount(matrix.csr.indices, minlength=matrix.shape[1])
    expected = r * (counts + 1.0)[:, None] ** -chosen
    weight = result.model.decoder.weight.detach().numpy()
    t = float((weight * expected).sum() / (expected * expected).sum())
    np.testing.assert_allclose(weight, t * expected, rtol=1e-4, atol=1e-6 * np.abs(weight).max())
    # without validation the configured p, λ and exponent are used as they are
    plain = train(matrix, ModelConfig(kind="dlae", dim=8, popularity_exponent=0.0), progress=False)
    assert plain.chosen == {} and len(plain.history) == 1
    _, r0 = linear.dlae_factors(matrix.csr, rows, matrix.shape[1], dim=8, dropout=0.5, l2=cfg.l2)
    w0 = plain.model.decoder.weight.detach().numpy()
    t0 = float((w0 * r0).sum() / (r0 * r0).sum())
    np.testing.assert_allclose(w0, t0 * r0, rtol=1e-4, atol=1e-6 * np.abs(w0).max())


def test_a_dlae_walks_l2_up_from_the_best_dropout_while_validation_rises(matrix):
    # per fit: the first exponent's score, then a lower one (the exponent walk stops at once)
    # p: the first best, the second next; λ at the first rises twice, at the second never
    per_fit = [0.30, 0.25] + [0.20] * (len(DLAE_DROPOUTS) - 2) + [0.31, 0.33, 0.32] + [0.24, 0.24]
    scripted = iter([v for score in per_fit for v in (score, score - 0.01)])
    result = train(matrix, ModelConfig(kind="dlae", dim=8, dropout=DLAE_DROPOUTS[0], l2=50.0, neighbours=0),
                   validate=lambda model: {"ndcg@100": next(scripted)}, progress=False)
    walked = result.history[len(DLAE_DROPOUTS):]
    assert [h["dropout"] for h in walked] == [DLAE_DROPOUTS[0]] * 3 + [DLAE_DROPOUTS[1]] * 2
    assert [h["l2"] for h in walked] == pytest.approx([50.0 * DLAE_L2_FACTOR**k for k in (1, 2, 3)]
                                                      + [50.0 * DLAE_L2_FACTOR, 16.67])
    assert result.chosen == {"dropout": DLAE_DROPOUTS[0], "l2": pytest.approx(50.0 * DLAE_L2_FACTOR**2),
                             "popularity_exponent": 0.0}
    assert result.best_epoch == len(DLAE_DROPOUTS) + 2 and result.stop_reason == "fitted"


def test_above_search_users_the_search_fits_a_sample_with_lambda_scaled_then_every_user(matrix, monkeypatch):
    monkeypatch.setattr(dlae_search, "SEARCH_USERS", 500)
    monkeypatch.setattr(linear, "TOLERANCE", 1e-9)  # warm- and cold-started fits then agree to float precision
    fitted = []
    real = linear.Solver.fit

    def recording(solver, dropout, l2):
        fitted.append((solver.n_users, dropout, l2))
        return real(solver, dropout, l2)

    monkeypatch.setattr(linear.Solver, "fit", recording)
    rows = np.arange(1, matrix.shape[0], 2)  # the training rows: every other user (1,015)
    scores = iter(np.linspace(0.1, 0.9, 200))  # every validation better than the last: the walks go far
    result = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=0), rows=rows,
                   validate=lambda model: {"ndcg@100": float(next(scores))}, progress=False)
    *search, final = fitted
    share = 500 / len(rows)
    assert all(n == 500 for n, _, _ in search) and final[0] == len(rows)
    assert [h["users"] for h in result.history] == [500] * len(search) + [len(rows)]
    for (_, dropout, l2), record in zip(fitted, result.history):  # λ in the whole data's units
        assert dropout == record["dropout"] and l2 == pytest.approx(record["l2"] * (share if record["users"] == 500 else 1))
    # the published model is the last fit, on every training user, with the chosen (p, λ, β)
    assert result.best_epoch == len(result.history) and result.stop_reason == "fitted"
    last = result.history[-1]
    assert result.chosen == {"dropout": last["dropout"], "l2": last["l2"],
                             "popularity_exponent": last["popularity_exponent"]}
    best_search = max(result.history[:-1], key=lambda h: h["ndcg@100"])
    assert (best_search["dropout"], best_search["l2"], best_search["popularity_exponent"]) == \
        (last["dropout"], last["l2"], last["popularity_exponent"])
    _, r = linear.dlae_factors(matrix.csr, rows, matrix.shape[1], dim=8, dropout=last["dropout"], l2=last["l2"])
    counts = np.bincount(matrix.csr.gather(rows)[1], minlength=matrix.shape[1])
    expected = r * (counts + 1.0)[:, None] ** -last["popularity_exponent"]
    weight = result.model.decoder.weight.detach().numpy().astype(np.float64)
    # item–item inner products: the same whatever sign or rotation each fit gave its columns
    got, want = weight @ weight.T, expected.astype(np.float64) @ expected.T
    t2 = float((got * want).sum() / (want * want).sum())
    np.testing.assert_allclose(got, t2 * want, rtol=1e-3, atol=1e-4 * np.abs(got).max())


def test_below_search_users_every_fit_uses_every_training_user(matrix):
    rows = np.arange(0, matrix.shape[0], 3)
    result = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=0), rows=rows,
                   validate=lambda model: {"ndcg@100": 0.5}, progress=False)
    assert {h["users"] for h in result.history} == {len(rows)}
    assert result.best_epoch == 1  # ties keep the first fit


def test_the_run_summary_says_when_the_search_was_sampled(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from aefeatures.cli.app import cli
    from tests.conftest import write_job

    monkeypatch.setattr(dlae_search, "SEARCH_USERS", 400)
    out = CliRunner().invoke(cli, ["run", str(write_job(tmp_path, model={"kind": "dlae", "dim": 8}))])
    assert out.exit_code == 0, out.output
    assert "searched on 400 sampled users, then fitted on all 2,030 training users" in out.stdout


def test_a_user_whose_items_nobody_else_has_gets_the_popular_items(tmp_path):
    """Their embedding is ~0, so every score would tie at 0: the popularity tie-break decides."""
    import polars as pl

    import aefeatures
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job
    from tests.conftest import write_job

    frame = pl.read_parquet(FIXTURES / "interactions.parquet").filter(pl.col("rating") >= 4)
    loner = pl.DataFrame({"user_id": [999_999] * 3, "item_id": [900_001, 900_002, 900_003], "rating": [5.0] * 3,
                          "timestamp": frame["timestamp"][:3]}).cast(frame.schema)
    frame.vstack(loner).write_parquet(tmp_path / "data.parquet")
    job = write_job(tmp_path, model={"kind": "dlae", "dim": 8},
                    input={"path": str(tmp_path / "data.parquet"), "weight_col": "rating", "timestamp_col": "timestamp"})
    result = run_job(load_job_config(job), progress=False)
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    top = fs.recommend(999_999, k=5).ids.tolist()
    users_of = dict(frame.group_by("item_id").agg(pl.col("user_id").n_unique()).iter_rows())
    assert sorted((users_of[i] for i in top), reverse=True) == sorted(users_of.values(), reverse=True)[:5]
    assert result.manifest["evaluation"]["model"]["ndcg@100"] > result.manifest["evaluation"]["popularity"]["ndcg@100"]


def test_a_dlae_width_follows_the_data_shape():
    def width(users, items, nnz=100_000, **kw):
        return dlae_search.dlae_width(users, items, nnz, **kw)
    # an exact path: the next power of two at or above min(users, items), from 256 to 2048
    assert width(591, 14_188) == 1024 and width(1_877, 17_617) == 2048 and width(938, 1_447) == 1024
    assert width(120, 500) == 256 and width(5_148, 714) == 1024 and width(2_048, 3_500) == 2048
    # a larger rank on an exact path (a wide block costs side² × width a pass): the narrow width
    assert width(6_000, 3_500) == width(2_049, 17_617) == 256
    assert width(600, 12_600) == width(1_000, 12_600) == 1024  # steady while the users grow within a power
    # the item vectors kept within 256 MiB: a few users and many items narrow it
    assert width(1_500, 100_000) == 512 and width(1_500, 1_000_000) == 256 and width(1_877, 32_768) == 2048
    # both sides large (the sketch path): 1024 up to 2M interactions, 256 above (the ML-20M shape)
    assert width(13_808, 18_318, 456_182) == 1024 and width(13_808, 18_318, 2_000_001) == 256
    assert width(138_000, 20_000, 10_000_000) == dlae_search.NARROW_DIM == 256
    # under torch.distributed only the items path is exact
    assert width(1_877, 17_617, 5_000_000, distributed=True) == 256
    assert width(50_000, 2_000, distributed=True) == 2048 and width(50_000, 3_000, distributed=True) == 256


def test_a_dlae_of_width_0_is_the_full_rank_dlae_below_the_wide_width(matrix):
    """dim 0 on the fixture (≈2k users × 500 items: the items path): width 512, the data's rank
    500 of it used and the last columns zero; its scores are the full-rank DLAE's, M⁻¹ G."""
    result = train(matrix, ModelConfig(kind="dlae", dropout=0.5, l2=100.0, popularity_exponent=0.0), progress=False)
    n_items = matrix.shape[1]
    assert result.model.shape.dim == 512 and n_items <= 512
    p = result.model.input_layer.weight.detach().double().numpy()
    r = result.model.decoder.weight.detach().double().numpy()
    assert np.all(p[:, n_items:] == 0) and np.abs(p[:, :n_items]).sum(axis=0).min() > 0
    x = np.zeros(matrix.shape)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.csr.indptr))
    x[rows, matrix.csr.indices] = matrix.csr.values
    gram = x.T @ x
    full = np.linalg.solve(gram + np.diag(gram.diagonal() + 100.0), gram)  # p 0.5: p/(1-p) = 1
    b = p @ r.T
    t = float((b * full).sum() / (full * full).sum())  # the temperature scales the item vectors
    np.testing.assert_allclose(b, t * full, atol=2e-3 * np.abs(t * full).max())


def test_a_full_rank_fit_on_the_users_path_is_the_full_rank_dlae_without_iterating(matrix):
    """Fewer users than items and a block as wide as the users: the users path takes the Ritz
    pairs of the whole user space at once (one pass) and its P Rᵀ is M⁻¹ G."""
    rows = np.arange(0, matrix.shape[0], 7)  # 290 users × 500 items: the users path
    solver = linear.Solver(matrix.csr, rows, matrix.shape[1], dim=512)
    factors = solver.fit(0.5, 100.0)
    assert solver.method == "users" and factors.iterations == 1
    x = np.zeros((len(rows), matrix.shape[1]))
    for i, row in enumerate(rows):
        lo, hi = matrix.csr.indptr[row], matrix.csr.indptr[row + 1]
        x[i, matrix.csr.indices[lo:hi]] = matrix.csr.values[lo:hi]
    gram = x.T @ x
    full = np.linalg.solve(gram + np.diag(gram.diagonal() + 100.0), gram)
    b = factors.p.double().numpy() @ factors.r.double().numpy().T
    np.testing.assert_allclose(b, full, atol=2e-3 * np.abs(full).max())
    again = solver.fit(0.8, 300.0)  # the next fit reuses the user-space basis
    assert again.iterations == 1 and torch.isfinite(again.p).all()


def test_with_k_folds_a_dlae_chooses_by_the_mean_over_folds_and_says_how_sure(tmp_path):
    """evaluation.folds = 3: every fit is scored on 3 folds, the chosen setting has the best
    mean, and the manifest keeps each fold's NDCG@100 and how many folds' own best it is."""
    import json

    from click.testing import CliRunner

    from aefeatures.cli.app import cli
    from tests.conftest import write_job

    job = write_job(tmp_path, model={"kind": "dlae", "dim": 8}, evaluation={"folds": 3, "protocol": "held-out users"})
    out = CliRunner().invoke(cli, ["run", str(job)])
    assert out.exit_code == 0, out.output
    manifest = json.loads(next((tmp_path / "store" / "movies" / "versions").glob("*/manifest.json")).read_text())
    history = manifest["training"]["history"]
    assert all(len(h["folds"]) == 3 for h in history)
    means = [sum(h["folds"]) / 3 for h in history]
    chosen = manifest["training"]["best_epoch"] - 1
    assert means[chosen] == max(means)
    assert abs(history[chosen]["ndcg@100"] - means[chosen]) < 1e-4
    folds = manifest["evaluation"]["folds"]
    assert folds["k"] == 3 and folds["ndcg@100"] == history[chosen]["folds"]
    assert 0 <= folds["folds_choosing_it"] <= 3 and folds["spread"] >= 0


def test_held_out_items_fit_every_user_without_the_hidden_items_and_refit_with_them(tmp_path, monkeypatch):
    """The default protocol: the search fits every user's shown items (each validation user's
    hidden items removed, nothing else), and the refit fits the whole matrix."""
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job
    from aefeatures.model import train as train_module
    from tests.conftest import write_job

    calls, real = [], train_module.train

    def recording(matrix, cfg, **kwargs):
        calls.append((matrix.nnz, kwargs.get("rows"), kwargs.get("keep")))
        return real(matrix, cfg, **kwargs)

    monkeypatch.setattr(train_module, "train", recording)
    job = load_job_config(write_job(tmp_path, model={"kind": "dlae", "dim": 8}, evaluation={"max_valid_users": 10000}))
    full = build_matrix(read_interactions(job.input))
    result = run_job(job, progress=False)
    evaluation = result.manifest["evaluation"]
    assert evaluation["protocol"] == "held-out items"
    assert evaluation["valid_users"] == int((full.row_lengths() >= 2).sum())  # all of them, up to the cap
    (searched, rows, keep), (refitted, refit_rows, _) = calls
    hidden = sum(min(max(1, round(0.2 * int(n))), int(n) - 1) for n in full.row_lengths()[keep])  # holdout 0.2
    assert list(rows) == list(range(full.shape[0])) and searched == full.nnz - hidden
    assert refitted == full.nnz and refit_rows is None
    assert {h["users"] for h in result.manifest["training"]["history"]} == {full.shape[0]}


def test_a_sampled_search_keeps_the_rows_it_must_fit():
    rng = np.random.default_rng(0)
    rows, keep = np.arange(1000), np.arange(0, 1000, 10)
    sample = dlae_search._sample(rows, 300, keep, rng)
    assert len(sample) == 300 == len(set(sample)) and set(keep) <= set(sample) and list(sample) == sorted(sample)
    assert set(dlae_search._sample(rows, 50, keep, rng)) <= set(keep)  # fewer places than kept rows
    assert np.array_equal(dlae_search._sample(rows, 300, None, np.random.default_rng(1)),
                          np.sort(np.random.default_rng(1).choice(rows, 300, replace=False)))
