"""`aefeatures embed`: users embedded with the live model, no training."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.data.matrix import CSR
from aefeatures.jobs.embed import embed_job
from aefeatures.jobs.run import run_job
from aefeatures.model.autoencoder import load_model
from aefeatures.model.embed import encode
from tests.conftest import FIXTURES, write_job

FAST = {"epochs": 3, "dim": 16, "hidden": [32]}
NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}


@pytest.fixture(params=["dae", "dlae", "recvae"])
def setup(tmp_path, request):
    """A trained version (of each kind), and a newer input with a new user and a user of
    unknown items only."""
    model = {**FAST, "kind": request.param}
    base = pl.read_parquet(FIXTURES / "interactions.parquet")
    extra = pl.DataFrame({"user_id": [9001, 9001, 9001, 9002], "item_id": [3, 17, 42, 123456],
                          "rating": [5, 5, 4, 5], "timestamp": base["timestamp"][:4]}).cast(base.schema)
    newer = tmp_path / "newer.parquet"
    pl.concat([base, extra]).write_parquet(newer)
    trained = run_job(load_job_config(write_job(tmp_path, model=model, gate=NO_GATE)), progress=False)
    later = write_job(tmp_path, model=model, gate=NO_GATE, filename="later.toml",
                      input={"path": str(newer), "weight_col": "rating", "timestamp_col": "timestamp",
                             "min_weight": 4.0})
    return tmp_path / "store", trained, later


def test_a_new_user_is_embedded_as_a_full_embed_of_the_same_model_would(setup):
    root, trained, later = setup
    result = embed_job(load_job_config(later))
    fs = aefeatures.open_store(root)["movies"]
    assert fs.version == result.version != trained.version
    model = load_model(trained.path / "model")
    items = np.searchsorted(fs.item_ids, [3, 17, 42]).astype(np.int32)
    expected, _ = encode(model, CSR(np.array([0, 3]), items, np.ones(3, np.float32)))
    np.testing.assert_allclose(fs.user_embedding(9001), expected[0], rtol=1e-5, atol=1e-6)
    assert len(fs.recommend(9001, k=5).ids) == 5 and not {3, 17, 42} & set(fs.recommend(9001, k=5).ids.tolist())
    old = aefeatures.open_store(root).open("movies", trained.version)
    np.testing.assert_allclose(fs.user_embedding(42), old.user_embedding(42), rtol=1e-5, atol=1e-6)


def test_the_new_user_recommended_from_their_history_without_an_embed_run_gets_what_embed_gives(setup):
    root, trained, later = setup
    before = aefeatures.open_store(root)["movies"]  # the trained version: user 9001 unknown to it
    with pytest.raises(aefeatures.NotFoundError, match="recommend from their history now"):
        before.recommend(9001, k=5)
    now = before.recommend_history([3, 17, 42], k=5)
    embed_job(load_job_config(later))
    after = aefeatures.open_store(root)["movies"]
    np.testing.assert_array_equal(now.ids, after.recommend(9001, k=5).ids)
    np.testing.assert_allclose(before.embed_history([3, 17, 42]).vector, after.user_embedding(9001), rtol=1e-5,
                               atol=1e-6)


def test_an_embed_of_a_version_stored_without_an_encoder_stores_one(setup):
    import shutil

    root, trained, later = setup
    shutil.rmtree(trained.path / "model" / "encoder")  # as a version published by an older aefeatures ...
    manifest = json.loads((trained.path / "manifest.json").read_text())
    del manifest["files"]  # ... which recorded no fingerprints either
    (trained.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(aefeatures.errors.StoreError, match="without a stored encoder"):
        aefeatures.open_store(root)["movies"].recommend_history([3, 17], k=5)
    embed_job(load_job_config(later))
    assert len(aefeatures.open_store(root)["movies"].recommend_history([3, 17], k=5).ids) == 5


def test_users_with_only_unknown_items_are_reported_and_left_out(setup):
    root, _, later = setup
    result = embed_job(load_job_config(later))
    assert result.manifest["embedded_with"]["unknown_only_users"] == 1
    assert result.manifest["embedded_with"]["unknown_only_sample"] == [9002]
    with pytest.raises(aefeatures.NotFoundError):
        aefeatures.open_store(root)["movies"].user_embedding(9002)


def test_the_model_and_index_are_reused_and_training_is_not_skipped_later(setup):
    root, trained, later = setup
    result = embed_job(load_job_config(later))
    for part in ("items.faiss", "model/weights.pt"):
        assert (result.path / part).read_bytes() == (trained.path / part).read_bytes()
    np.testing.assert_array_equal(pl.read_parquet(result.path / "items.parquet")["embedding"].to_numpy(),
                                  pl.read_parquet(trained.path / "items.parquet")["embedding"].to_numpy())
    assert embed_job(load_job_config(later)).status == "up_to_date"
    assert run_job(load_job_config(later), progress=False).status == "published"  # a real training


def test_embed_command(setup):
    root, _, later = setup
    out = CliRunner().invoke(cli, ["embed", str(later)])
    assert out.exit_code == 0, out.output
    assert "embedded with the model of version" in out.stdout and "only unknown items" in out.stdout
    again = CliRunner().invoke(cli, ["embed", "--json", str(later)])
    assert json.loads(again.stdout)["status"] == "up_to_date"


def test_embed_needs_a_live_version(tmp_path):
    out = CliRunner().invoke(cli, ["embed", str(write_job(tmp_path, model=FAST))])
    assert out.exit_code == 2 and "has no feature set `movies`" in out.stderr


def test_an_embedded_version_records_its_own_input_no_gate_the_running_release_and_a_report(setup):
    root, trained, later = setup
    live_manifest = trained.path / "manifest.json"
    stale = json.loads(live_manifest.read_text())
    live_manifest.write_text(json.dumps({**stale, "aefeatures_version": "0.0.1-older"}))  # made by an older release
    result = embed_job(load_job_config(later))
    m = aefeatures.open_store(root).manifest("movies", result.version)
    cfg = load_job_config(later)
    assert m["config"]["input"]["path"] == cfg.input.path != stale["config"]["input"]["path"]
    assert m["config"]["input"] == cfg.to_dict()["input"]  # its min_weight and columns too
    assert m["config"]["model"] == stale["config"]["model"]  # the model that embedded the users
    assert m["gate"]["skipped"] is True and m["gate"]["passed"] is None
    assert m["aefeatures_version"] == aefeatures.__version__
    assert m.embedded_with == trained.version
    page = (result.path / "report.html").read_text()
    assert result.version in page and f"not run: users embedded with the model of version {trained.version}" in page
