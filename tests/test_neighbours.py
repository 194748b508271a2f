"""A dlae's sparse item–item part (aefeatures.model.neighbours): its fit against a direct
least-squares solve of the DLAE objective, the search that keeps it only where validation
rises, the refit, and the version that stores it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model import linear, neighbours
from aefeatures.model.dlae_search import NEIGHBOUR_FITS, NEIGHBOUR_WEIGHTS
from aefeatures.model.train import train
from aefeatures.store import layout
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"),
                                                      weight_col="rating", min_weight=4.0)))


def _dense(matrix) -> np.ndarray:
    x = np.zeros(matrix.shape, np.float64)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.csr.indptr))
    x[rows, matrix.csr.indices] = matrix.csr.values
    return x


def _fit(matrix, dim=8, dropout=0.5, l2=100.0, per_item=6, weight=1.0):
    solver = linear.Solver(matrix.csr, np.arange(matrix.shape[0]), matrix.shape[1], dim=dim)
    factors = solver.fit(dropout, l2)
    lam = solver.penalty(dropout, l2)
    part = neighbours.fit(solver.item_gram(), factors.p, factors.r, lam, per_item=per_item, weight=weight)
    return part, factors.p.double().numpy(), factors.r.double().numpy(), lam.double().numpy()


def _objective(x, b, lam):
    return float(((x - x @ b) ** 2).sum() + (lam[:, None] * b * b).sum())


def test_each_items_weights_solve_the_dlae_objective_over_its_neighbours_with_the_bottleneck_fixed(matrix):
    part, p, r, lam = _fit(matrix)
    x = _dense(matrix)
    b = p @ r.T
    assert part.per_item == 6 and np.all(part.sources != part.targets)
    assert np.all(np.bincount(part.targets, minlength=matrix.shape[1]) <= 6)
    for j in np.random.default_rng(0).choice(matrix.shape[1], 12, replace=False):
        entries = part.targets == j
        support, got = part.sources[entries], part.weights[entries]
        if not len(support):
            continue
        # min_s ||x_j - X b_j - X_N s||² + ||Λ^½ (b_j + s on N)||², as one least-squares system
        design = np.vstack([x[:, support], np.diag(np.sqrt(lam[support]))])
        target = np.concatenate([x[:, j] - x @ b[:, j], -np.sqrt(lam[support]) * b[support, j]])
        want, *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * max(np.abs(want).max(), 1e-6))


def test_the_part_lowers_the_objective_the_bottleneck_left(matrix):
    part, p, r, lam = _fit(matrix, per_item=16)
    x = _dense(matrix)
    b = p @ r.T
    s = np.zeros_like(b)
    s[part.sources, part.targets] = part.weights
    assert _objective(x, b + s, lam) < 0.999 * _objective(x, b, lam)
    # its scores are x S, the same from the sparse product used by evaluation and the store
    scores = part.row_scores(*matrix.csr)(0, 50).double().numpy()
    np.testing.assert_allclose(scores, x[:50] @ s, atol=1e-4)


def test_the_search_keeps_the_part_only_where_validation_rises_and_the_refit_fits_it_again(matrix):
    rows = np.arange(0, matrix.shape[0], 2)

    def validate(model):  # scores the fit alone 0.3; with the part, higher
        return {"ndcg@100": 0.4 if model.neighbours is not None else 0.3}

    result = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=5), rows=rows, validate=validate,
                   progress=False)
    assert result.chosen["neighbour_weight"] == NEIGHBOUR_WEIGHTS[0]
    tried = [h for h in result.history if h["method"] == "neighbours"]
    # the best fits alone, each with the part at every weight; the first that rose is kept
    assert len(tried) == NEIGHBOUR_FITS * len(NEIGHBOUR_WEIGHTS) and tried == result.history[-len(tried):]
    fits = sorted(result.history[:-len(tried)], key=lambda h: -h["ndcg@100"])[:NEIGHBOUR_FITS]
    assert [(h["dropout"], h["l2"]) for h in tried[::len(NEIGHBOUR_WEIGHTS)]] == [(h["dropout"], h["l2"]) for h in fits]
    assert result.history[result.best_epoch - 1] is tried[0]
    assert (result.chosen["dropout"], result.chosen["l2"]) == (tried[0]["dropout"], tried[0]["l2"])
    part = result.model.neighbours
    assert part is not None and part.per_item == 5
    # its column scale is the item vectors' own: (n_j + 1)^-β × the temperature
    counts = np.bincount(matrix.csr.gather(rows)[1], minlength=matrix.shape[1])
    ratio = part.column_scale / (counts + 1.0) ** -result.chosen["popularity_exponent"]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)

    refused = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=5), rows=rows,
                    validate=lambda model: {"ndcg@100": 0.2 if model.neighbours is not None else 0.3},
                    progress=False)
    assert refused.chosen["neighbour_weight"] == 0.0 and refused.model.neighbours is None
    # the part lowered the best fit at every γ: the next fits are not tried
    assert [h["method"] for h in refused.history].count("neighbours") == len(NEIGHBOUR_WEIGHTS)

    refit = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=5, neighbour_weight=1.0), progress=False)
    assert refit.model.neighbours is not None and refit.model.neighbours.nnz > 0
    none = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=5), progress=False)
    assert none.model.neighbours is None  # no validation and no weight: no part


def test_a_fit_below_the_best_may_win_with_its_part(matrix):
    rows, first = np.arange(0, matrix.shape[0], 2), []

    def validate(model):  # alone the first fit is best; with the part the second one wins
        if model.neighbours is None:
            first.append(first[0] if first else model)
            return {"ndcg@100": 0.3 if model is first[0] else 0.29}
        return {"ndcg@100": 0.31 if model is first[0] else 0.4}

    result = train(matrix, ModelConfig(kind="dlae", dim=8, neighbours=5), rows=rows, validate=validate,
                   progress=False)
    second = result.history[1]  # the best of the fits scored 0.29: the first of them
    assert result.model is not first[0] and result.model.neighbours is not None
    assert (result.chosen["dropout"], result.chosen["l2"]) == (second["dropout"], second["l2"])
    assert result.history[result.best_epoch - 1]["method"] == "neighbours"


def test_the_parts_of_several_weights_share_one_residual_and_match_one_fit_each(matrix):
    solver = linear.Solver(matrix.csr, np.arange(matrix.shape[0]), matrix.shape[1], dim=8)
    factors = solver.fit(0.5, 100.0)
    lam = solver.penalty(0.5, 100.0)
    parts = neighbours.fit_weights(solver.item_gram(), factors.p, factors.r, lam, per_item=6, weights=(0.5, 3.0))
    for weight, part in zip((0.5, 3.0), parts):
        one = neighbours.fit(solver.item_gram(), factors.p, factors.r, lam, per_item=6, weight=weight)
        np.testing.assert_array_equal(part.sources, one.sources)
        np.testing.assert_allclose(part.weights, one.weights, rtol=1e-5, atol=1e-7)
    # a larger γ shrinks the weights
    assert np.abs(parts[1].weights).sum() < np.abs(parts[0].weights).sum()


def test_at_full_rank_there_is_nothing_left_to_fit(matrix):
    result = train(matrix, ModelConfig(kind="dlae", dim=0), rows=np.arange(matrix.shape[0]),
                   validate=lambda model: {"ndcg@100": 0.3}, progress=False)
    assert "neighbour_weight" not in result.chosen and result.model.neighbours is None
    # and the residual the part would fit is zero there
    part, *_ = _fit(matrix, dim=min(matrix.shape), per_item=4)
    assert np.abs(part.weights).max() < 1e-3


def test_a_run_publishes_the_part_and_its_scores_are_the_validated_ones(tmp_path):
    from aefeatures.config import load_job_config as load_job
    from aefeatures.jobs.run import run_job
    from tests.conftest import write_job

    job = write_job(tmp_path, model={"kind": "dlae", "dim": 8, "neighbours": 6, "neighbour_weight": 1.0},
                    evaluation={"valid_share": 0.0})
    result = run_job(load_job(job))
    manifest = result.manifest
    assert manifest["item_neighbours"]["per_item"] == 6
    table = pq.read_table(result.path / layout.NEIGHBOURS)
    assert table.num_rows == manifest["item_neighbours"]["entries"] > 0
    assert table.column_names == ["item_id", "neighbour_id", "item_row", "neighbour_row", "weight"]
    rows = np.column_stack([table.column("neighbour_row").to_numpy(), table.column("item_row").to_numpy()])
    assert np.all(np.diff(rows[:, 0]) >= 0) and np.all(rows[:, 0] != rows[:, 1])
    assert np.isfinite(table.column("weight").to_numpy()).all()
    items = pq.read_table(result.path / layout.ITEMS, columns=["item_id"]).column("item_id").to_numpy()
    np.testing.assert_array_equal(items[rows[:, 1]], table.column("item_id").to_numpy())
    np.testing.assert_array_equal(items[rows[:, 0]], table.column("neighbour_id").to_numpy())


def test_a_version_without_the_part_has_no_file(tmp_path):
    from aefeatures.config import load_job_config as load_job
    from aefeatures.jobs.run import run_job
    from tests.conftest import write_job

    job = write_job(tmp_path, model={"kind": "dlae", "dim": 8, "neighbours": 0}, evaluation={"valid_share": 0.0})
    result = run_job(load_job(job))
    assert result.manifest["item_neighbours"] is None and not (result.path / layout.NEIGHBOURS).exists()


def test_item_scores_of_a_tensor_product_match_the_transpose(matrix):
    part, *_ = _fit(matrix, per_item=3)
    dense = torch.zeros(2, matrix.shape[1])
    dense[0, part.sources[0]] = 1.0
    got = part.scores(dense)
    want = np.zeros(matrix.shape[1])
    mine = part.sources == part.sources[0]
    np.add.at(want, part.targets[mine], part.weights[mine])
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6)
    assert float(got[1].abs().sum()) == 0.0


def test_embed_carries_the_part_into_its_version_with_item_rows_renumbered(tmp_path):
    import polars as pl

    from aefeatures.config import load_job_config as load_job
    from aefeatures.jobs.embed import embed_job
    from aefeatures.jobs.run import run_job
    from tests.conftest import write_job

    model = {"kind": "dlae", "dim": 8, "neighbours": 6, "neighbour_weight": 1.0}
    trained = run_job(load_job(write_job(tmp_path, model=model, evaluation={"valid_share": 0.0})))
    # the next day's file, with items the live version does not know (folded in: rows move)
    day2 = write_job(tmp_path, model=model, evaluation={"valid_share": 0.0}, filename="day2.toml",
                     input={"path": str(FIXTURES / "interactions_next_day.parquet"), "weight_col": "rating",
                            "timestamp_col": "timestamp", "min_weight": 4.0})
    embedded = embed_job(load_job(day2), force=True)
    assert embedded.manifest["item_neighbours"] == trained.manifest["item_neighbours"]
    assert embedded.manifest["folded_in"]["items"] > 0 and embedded.manifest["counts"]["items"] > \
        trained.manifest["counts"]["items"]

    def entries(path):
        return pl.read_parquet(path / layout.NEIGHBOURS).sort("item_id", "neighbour_id")

    before, after = entries(trained.path), entries(embedded.path)
    assert before.select("item_id", "neighbour_id", "weight").equals(after.select("item_id", "neighbour_id", "weight"))
    items = pl.read_parquet(embedded.path / layout.ITEMS, columns=["item_id"]).get_column("item_id").to_numpy()
    np.testing.assert_array_equal(items[after.get_column("item_row").to_numpy()], after.get_column("item_id").to_numpy())
    np.testing.assert_array_equal(items[after.get_column("neighbour_row").to_numpy()],
                                  after.get_column("neighbour_id").to_numpy())


def test_the_run_summary_says_the_part_was_kept_and_its_sample_is_the_lookups_answer(tmp_path):
    from click.testing import CliRunner

    import aefeatures
    from aefeatures.cli.app import cli
    from tests.conftest import write_job

    job = write_job(tmp_path, model={"kind": "dlae", "dim": 8, "neighbours": 6, "neighbour_weight": 1.0},
                    evaluation={"valid_share": 0.0})
    out = CliRunner().invoke(cli, ["run", str(job), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    sample = summary["sample"]
    live = aefeatures.open_store(tmp_path / "store")["movies"]
    assert sample["recommend"] == live.recommend(sample["user"], 5).ids.tolist()
    text = CliRunner().invoke(cli, ["run", str(job), "--force"])
    assert text.exit_code == 0 and "item-item part kept" in text.output
