"""Training under torchrun: each rank reads its own users, 2 CPU processes (gloo) train a model
as good as one process's (a dae, and the default dlae fitted across the ranks), and the version
they write together is the one a process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import aefeatures
from aefeatures.config import InputConfig, load_job_config
from aefeatures.data.read import read_interactions
from aefeatures.jobs.run import run_job
from tests.conftest import FIXTURES, REPO, write_job

pytestmark = pytest.mark.slow  # trains or benchmarks whole jobs; the fast lane leaves it out

# A trained kind: few epochs keep the test fast; dropout stays on, so the shared random draws are
# exercised.
MODEL = {"kind": "dae", "epochs": 6, "batch_size": 200, "patience": 0, "min_steps": 0}


@pytest.mark.parametrize("fixture, world", [("interactions.parquet", 2), ("interactions.parquet", 3),
                                            ("interactions_str.parquet", 2), ("interactions.parquet", 7)])
def test_each_rank_reads_a_contiguous_range_of_users_and_the_shards_make_the_whole_input(fixture, world):
    cfg = InputConfig(str(FIXTURES / fixture), weight_col="rating", timestamp_col="timestamp")
    whole = read_interactions(cfg).frame
    shards = [read_interactions(cfg, shard=(rank, world)).frame for rank in range(world)]

    assert pl.concat(shards).equals(whole)  # in rank order: every pair once, in user order
    users = [set(s.get_column("user_id").to_list()) for s in shards]
    assert all(not (a & b) for i, a in enumerate(users) for b in users[i + 1:])  # a user lives on one rank
    sizes = np.array([s.height for s in shards])
    assert sizes.max() - sizes.min() <= 0.05 * whole.height  # balanced by interactions


def _torchrun(job, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "aefeatures", "run", str(job), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_each_train_on_their_users_and_publish_one_version_like_one_process(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    single = run_job(load_job_config(write_job(tmp_path / "one", model=MODEL)), progress=False)
    job = write_job(tmp_path / "two", model=MODEL)

    done = _torchrun(job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("published movies version") == 1  # rank 0 reports; rank 1 is quiet
    folder = tmp_path / "two" / "store" / "movies"
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in runs] == ["published"]  # one run, logged by rank 0 alone
    version = folder / "versions" / runs[0]["version"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert sorted(p.name for p in version.iterdir()) == sorted(p.name for p in single.path.iterdir())  # no parts left

    # Each rank wrote its users' rows; joined, the tables are those of one process.
    assert manifest["counts"] == single.manifest["counts"]
    assert manifest["input"] == single.manifest["input"]
    for table, columns in (("interactions.parquet", None), ("users.parquet", ["user_id", "n_interactions", "last_interaction"]),
                           ("items.parquet", ["item_id", "popularity", "last_interaction"])):
        assert pl.read_parquet(version / table, columns=columns).equals(
            pl.read_parquet(single.path / table, columns=columns)), table
    users = pl.read_parquet(version / "users.parquet")
    assert users.get_column("anomaly_score").is_finite().all()

    # Different shards, dropout draws and validation users: the same quality within noise, measured
    # on about as many validation users.
    assert abs(manifest["evaluation"]["valid_users"] - single.manifest["evaluation"]["valid_users"]) <= 2
    for key in ("recall@20", "ndcg@100"):
        assert manifest["evaluation"]["model"][key] == pytest.approx(single.manifest["evaluation"]["model"][key],
                                                                      abs=0.04), key
    losses = np.array(manifest["training"]["epoch_losses"])
    np.testing.assert_allclose(losses, single.manifest["training"]["epoch_losses"], rtol=0.05)
    assert np.all(np.diff(losses) < 0)

    store = aefeatures.open_store(tmp_path / "two" / "store")["movies"]
    first_user = users.get_column("user_id")[0]
    assert len(store.recommend(first_user, k=5).ids) == 5

    again = _torchrun(job)  # up to date: rank 0 says so, rank 1 stops without training
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date" in again.stdout
    runs = (folder / "runs.jsonl").read_text().splitlines()
    assert [json.loads(r)["status"] for r in runs] == ["published", "up_to_date"]


def test_every_rank_folds_the_same_alignment(tmp_path):
    """A second two-rank run aligns to the first: rank 0 fits the rotation and every rank folds
    it, so all users' published vectors (rank 1's too) are what the saved model makes."""
    from aefeatures.jobs.embed import embed_job

    first = write_job(tmp_path, model={**MODEL, "epochs": 2}, filename="first.toml",
                      gate={"beat_popularity": False, "min_ratio": 0.0})
    assert _torchrun(first).returncode == 0
    second = write_job(tmp_path, model={**MODEL, "epochs": 2, "seed": 1}, filename="second.toml",
                       gate={"beat_popularity": False, "min_ratio": 0.0})
    done = _torchrun(second)
    assert done.returncode == 0, done.stderr[-3000:]
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    assert fs.manifest["alignment"]["aligned"] and fs.manifest["drift"]["reason"] == "not measured under torchrun"
    published = pl.read_parquet(fs.path / "users.parquet")
    embedded = pl.read_parquet(embed_job(load_job_config(second), force=True).path / "users.parquet")
    assert published.get_column("user_id").equals(embedded.get_column("user_id"))
    np.testing.assert_allclose(np.stack(published.get_column("embedding").to_numpy()),
                               np.stack(embedded.get_column("embedding").to_numpy()), atol=1e-5)


def _fold_in_ndcg(version, matrix) -> float:
    """NDCG@100 of a published version's model on one fixed split of ``matrix``'s users: 20%
    of their items hidden, the rest folded in — the same users and items for every version."""
    from aefeatures.model.autoencoder import load_model
    from aefeatures.model.embed import encode
    from aefeatures.quality.evaluate import embedding_totals, metrics_of_totals, split_users

    model = load_model(version / "model")
    split = split_users(matrix.indptr, matrix.indices, share=0.5, max_users=10_000, holdout=0.2, seed=7, min_users=0)
    vectors, _ = encode(model, split.fold_in)
    totals = embedding_totals(vectors, model.decoder.weight.detach().numpy(), model.decoder.bias.detach().numpy(),
                              split)
    return metrics_of_totals(totals)["ndcg@100"]


def test_two_gloo_ranks_fit_the_default_dlae_across_the_ranks_like_one_process(tmp_path):
    from aefeatures.data.matrix import build_matrix
    from aefeatures.model.autoencoder import load_model

    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    single = run_job(load_job_config(write_job(tmp_path / "one", model={"kind": "dlae"})), progress=False)
    job = write_job(tmp_path / "two", model={"kind": "dlae"})
    done = _torchrun(job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a dae is trained instead" not in done.stderr
    folder = tmp_path / "two" / "store" / "movies"
    version = folder / "versions" / (folder / "LATEST").read_text().strip()
    manifest = json.loads((version / "manifest.json").read_text())

    # the dlae itself, searched and refitted across the ranks: no other kind stands in
    assert load_model(version / "model").shape.kind == "dlae" == manifest["config"]["model"]["kind"]
    # dim 32 is below the data's rank: the search also tried the sparse item-item part, across the ranks
    assert set(manifest["training"]["chosen"]) == {"dropout", "l2", "popularity_exponent", "neighbour_weight"}
    assert manifest["training"]["refit"]["status"] == "published"
    assert manifest["training"]["refit"]["users"] == single.manifest["training"]["refit"]["users"]  # every rank's
    # the Gram, summed over ranks (the item-item part's fit reads it too)
    methods = [fit["method"] for fit in manifest["training"]["history"]]
    tried = methods.count("neighbours")  # the best fits, each with the part at every γ, last
    assert tried > 0 and methods[-tried:] == ["neighbours"] * tried and set(methods[:-tried]) == {"items"}
    assert manifest["training"]["history"][0]["users"] == single.manifest["training"]["history"][0]["users"] + \
        single.manifest["evaluation"]["valid_users"] - manifest["evaluation"]["valid_users"]  # all ranks' users
    # every user and item present, as in one process
    assert manifest["counts"] == single.manifest["counts"]
    for table in ("users.parquet", "items.parquet"):
        key = "user_id" if table == "users.parquet" else "item_id"
        assert pl.read_parquet(version / table, columns=[key]).equals(pl.read_parquet(single.path / table, columns=[key]))
    # the same quality: each version's model scored on the same fixed split (validation users
    # differ between the runs, so the search may choose another (p, λ, β))
    cfg = load_job_config(job).input
    matrix = build_matrix(read_interactions(cfg), binarize=cfg.binarize, weight_transform=cfg.weight_transform).csr
    assert _fold_in_ndcg(version, matrix) == pytest.approx(_fold_in_ndcg(single.path, matrix), abs=0.02)

    # with the same (p, λ, β) on every user, the ranks' model is one process's
    fixed = {"kind": "dlae", "dropout": 0.8, "l2": 300.0}
    for folder in ("one_fixed", "two_fixed"):
        (tmp_path / folder).mkdir()
    alone = run_job(load_job_config(write_job(tmp_path / "one_fixed", model=fixed, evaluation={"valid_share": 0})),
                    progress=False)
    done = _torchrun(write_job(tmp_path / "two_fixed", model=fixed, evaluation={"valid_share": 0}))
    assert done.returncode == 0, done.stderr[-3000:]
    together = tmp_path / "two_fixed" / "store" / "movies"
    together = together / "versions" / (together / "LATEST").read_text().strip()
    assert _fold_in_ndcg(together, matrix) == pytest.approx(_fold_in_ndcg(alone.path, matrix), abs=0.002)
    ours, theirs = (load_model(v / "model").decoder.weight.detach().double() for v in (together, alone.path))
    np.testing.assert_allclose((ours @ ours.T).numpy(), (theirs @ theirs.T).numpy(),
                               atol=1e-3 * float((theirs @ theirs.T).abs().max()))  # item-item scores
