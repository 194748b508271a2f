"""Feast reads a real store: `feast apply` and `get_historical_features` on the exported repo.

Needs the optional `feast` extra (installed by .ci/run)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
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
