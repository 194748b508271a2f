"""Feast reads a real store: `feast apply` and `get_historical_features` on the exported repo.

Needs the optional `feast` extra (installed by .ci/run)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

import aefeatures
from aefeatures.export.feast import export_feast_repo

pytestmark = pytest.mark.slow  # trains or benchmarks whole jobs; the fast lane leaves it out

pytest.importorskip("feast", reason="the optional `feast` extra is not installed")


def test_feast_apply_and_historical_features(trained, tmp_path):
    root, _ = trained
    repo = tmp_path / "repo"
    export_feast_repo(root, "movies", repo)
    subprocess.run([sys.executable, "-m", "feast.cli.cli", "apply"], cwd=repo, check=True, capture_output=True)

    import pandas as pd
    from feast import FeatureStore

    entity_df = pd.DataFrame({"user_id": [42, 7], "event_timestamp": [datetime.now(timezone.utc)] * 2})
    frame = FeatureStore(repo_path=str(repo)).get_historical_features(
        entity_df=entity_df, features=["movies_user_embeddings:embedding", "movies_user_embeddings:anomaly_score"],
    ).to_df().set_index("user_id")
    fs = aefeatures.open_store(root)["movies"]
    for user in (42, 7):
        np.testing.assert_allclose(np.asarray(frame.loc[user, "embedding"], np.float32), fs.user_embedding(user))


def _feast(repo, *args):
    done = subprocess.run([sys.executable, "-m", "feast.cli.cli", *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_day_feast_workflow_leaves_only_the_live_version_online(tmp_path):
    """Day 1: run, export, apply, materialize-incremental. Day 2: new events for some users
    only, retrain, export, apply, materialize-incremental. Every user and item in the online
    store then holds the live version's vector (none left from day 1), and the registry's
    feature views name the live version."""
    import polars as pl
    from feast import FeatureStore

    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job
    from tests.conftest import FIXTURES, write_job

    inputs = tmp_path / "input"
    inputs.mkdir()
    day1 = pl.read_parquet(FIXTURES / "interactions.parquet")
    day1.write_parquet(inputs / "day1.parquet")
    job = write_job(tmp_path, input={"path": str(inputs), "weight_col": "rating", "timestamp_col": "timestamp",
                                     "min_weight": 4.0},
                    model={"epochs": 2, "dim": 8, "hidden": [32]}, gate={"beat_popularity": False, "min_ratio": 0.0},
                    evaluation={"valid_share": 0.0})
    repo, root = tmp_path / "repo", tmp_path / "store"

    def publish_and_materialize():
        result = run_job(load_job_config(job), progress=False)
        export_feast_repo(root, "movies", repo)
        _feast(repo, "apply")
        _feast(repo, "materialize-incremental", datetime.now(timezone.utc).isoformat())
        return result

    first = publish_and_materialize()
    # day 2: new, later events for 100 users only
    late = day1.filter(pl.col("user_id") <= 100).with_columns(
        (pl.col("timestamp").max() + pl.duration(days=1)).alias("timestamp"))
    late.write_parquet(inputs / "day2.parquet")
    second = publish_and_materialize()
    assert second.version != first.version

    fs = aefeatures.open_store(root)["movies"]
    assert fs.version == second.version
    store = FeatureStore(repo_path=str(repo))
    users = pl.read_parquet(second.path / "users.parquet")
    items = pl.read_parquet(second.path / "items.parquet")
    for view, key, table in (("movies_user_embeddings", "user_id", users), ("movies_item_embeddings", "item_id", items)):
        assert store.get_feature_view(view).tags["aefeatures_version"] == second.version
        online = store.get_online_features(features=[f"{view}:embedding"],
                                           entity_rows=[{key: k} for k in table.get_column(key).to_list()]).to_dict()
        got = np.array(online["embedding"], dtype=np.float32)
        want = np.stack(table.get_column("embedding").to_numpy())
        stale = int((~np.isclose(got, want, atol=1e-6).all(axis=1)).sum())
        assert stale == 0, f"{stale} of {len(want)} {key}s hold another version's vector online"


def test_historical_features_never_come_from_before_the_version_existed(trained, tmp_path):
    root, result = trained
    repo = tmp_path / "repo"
    export_feast_repo(root, "movies", repo)
    _feast(repo, "apply")

    import pandas as pd
    from feast import FeatureStore

    valid_from = datetime.fromisoformat(result.manifest["valid_from"])
    last = pq.read_table(result.path / "users.parquet", columns=["user_id", "last_interaction"]).to_pandas()
    users = last["user_id"].head(50).tolist()
    # times between a user's last interaction and the version's existence must not see the version
    before = [ts + (valid_from - ts) / 2 for ts in last["last_interaction"].head(50)]
    entity_df = pd.DataFrame({"user_id": users * 2,
                              "event_timestamp": before + [valid_from + timedelta(seconds=1)] * len(users)})
    frame = FeatureStore(repo_path=str(repo)).get_historical_features(
        entity_df=entity_df, features=["movies_user_embeddings:embedding"]).to_df()
    fs = aefeatures.open_store(root)["movies"]
    for row in frame.itertuples():
        if row.event_timestamp < valid_from:
            assert row.embedding is None or (isinstance(row.embedding, float) and np.isnan(row.embedding)), row
        else:
            np.testing.assert_allclose(np.asarray(row.embedding, np.float32), fs.user_embedding(row.user_id))
