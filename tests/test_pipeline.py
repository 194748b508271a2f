"""End to end on the planted fixture: what a run publishes and how good it is."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import aefeatures
from aefeatures.config import load_job_config
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.jobs.run import run_job
from aefeatures.model.autoencoder import load_model
from aefeatures.model.device import to_batch
from aefeatures.store import layout, publish
from aefeatures.store.index import load_index, search, user_queries
from tests.conftest import FIXTURES, write_job


def test_recommendations_come_from_the_users_planted_cluster(trained, planted):
    root, result = trained
    user_community, item_cluster = planted
    fs = aefeatures.open_store(root)["movies"]
    users = sorted(user_community)[:400]
    recs = fs.recommend_batch(users, k=10)
    in_cluster = np.mean([item_cluster[i] == user_community[u] for u, i in recs.select("user_id", "item_id").iter_rows()])
    chance = 1 / len(set(item_cluster.values()))
    popular = np.argsort(-pq.read_table(result.path / "items.parquet").column("popularity").to_numpy())[:10]
    popular_ids = fs.item_ids[popular]
    baseline = np.mean([item_cluster[i] == user_community[u] for u in users for i in popular_ids])
    assert recs.height == 10 * len(users)
    assert in_cluster > 0.8, f"only {in_cluster:.2f} of recommendations in the planted cluster"
    assert in_cluster > 4 * chance and in_cluster > 4 * baseline


def test_similar_items_come_from_the_items_planted_cluster(trained, planted):
    root, _ = trained
    _, item_cluster = planted
    fs = aefeatures.open_store(root)["movies"]
    hits = [item_cluster[j] == item_cluster[i] for i in sorted(item_cluster)[:200] for j in fs.similar_items(i, 10).ids]
    assert np.mean(hits) > 0.8


def test_exact_faiss_top10_equals_the_models_own_top10(trained):
    root, result = trained
    cfg = load_job_config(write_job(result.path.parent.parent.parent.parent, filename="again.toml"))
    matrix = build_matrix(read_interactions(cfg.input))
    model = load_model(result.path / layout.MODEL_DIR)
    rows = np.random.default_rng(1).choice(matrix.shape[0], 200, replace=False)
    with torch.no_grad():
        batch = to_batch(matrix, rows, torch.device("cpu"))
        logits = model.decoder(model.encode(batch)[0]).numpy()
    users = pq.read_table(result.path / "users.parquet").column("embedding")
    vectors = np.stack(users.to_numpy(zero_copy_only=False))[rows].astype(np.float32)
    scores, found = search(load_index(result.path / layout.INDEX), user_queries(vectors), 10)
    model_top = np.argsort(-logits, axis=1, kind="stable")[:, :10]
    for r in range(len(rows)):
        if set(found[r]) != set(model_top[r]):  # only a float tie at the 10th place may differ
            tenth = np.sort(logits[r])[::-1][9]
            assert abs(scores[r, -1] - tenth) < 1e-4
    np.testing.assert_allclose(scores, np.take_along_axis(logits, found, axis=1), rtol=1e-4, atol=1e-4)


def test_published_tables_follow_the_schema(trained):
    _, result = trained
    users = pq.read_table(result.path / "users.parquet")
    items = pq.read_table(result.path / "items.parquet")
    dim = result.manifest["dim"]
    assert users.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert users.schema.field("user_id").type == pa.int64()
    assert users.schema.field("n_interactions").type == pa.int32()
    assert users.schema.field("reconstruction_error").type == pa.float32()
    for table in (users, items):
        for col in ("last_interaction", "event_timestamp", "created_timestamp"):
            assert table.schema.field(col).type == pa.timestamp("us", tz="UTC")
        assert table.schema.metadata[b"aefeatures.dim"] == str(dim).encode()
        assert table.schema.metadata[b"aefeatures.schema_version"] == b"2"
        # point-in-time: every row is valid from the version's valid_from, when it was written
        valid_from = datetime.fromisoformat(result.manifest["valid_from"])
        assert set(table.column("event_timestamp").to_pylist()) == {valid_from}
        assert table.column("event_timestamp").equals(table.column("created_timestamp"))
        assert pa.compute.max(table.column("last_interaction")).as_py() <= valid_from
    assert items.schema.field("popularity").type == pa.int32()
    assert users.column("user_id").to_numpy().tolist() == sorted(users.column("user_id").to_numpy().tolist())
    assert np.isfinite(users.column("reconstruction_error").to_numpy()).all()


def test_index_rows_are_item_rows_with_the_bias_folded_in(trained):
    _, result = trained
    items = pq.read_table(result.path / "items.parquet")
    index = load_index(result.path / layout.INDEX)
    vectors = np.stack(items.column("embedding").to_numpy(zero_copy_only=False))
    expected = np.hstack([vectors, items.column("bias").to_numpy()[:, None]])
    assert index.ntotal == items.num_rows
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), expected, rtol=1e-6)


def test_manifest_records_config_input_and_training(trained):
    _, result = trained
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["version"] == result.version
    assert manifest["config"]["model"]["dim"] == 32
    assert manifest["input"]["files"][0]["path"].endswith("interactions.parquet")
    assert manifest["input"]["rows_read"] > manifest["input"]["rows_kept"] >= manifest["input"]["pairs"]
    assert manifest["counts"] == {"users": 2030, "items": 500, "interactions": manifest["input"]["pairs"]}
    training = manifest["training"]
    assert len(training["epoch_losses"]) == training["epochs"] == len(training["history"])  # one per epoch
    assert training["epochs"] == 30 or training["stop_reason"] == "patience"  # `epochs`, or patience first
    assert manifest["training"]["epoch_losses"][-1] < manifest["training"]["epoch_losses"][0]
    assert manifest["index"]["factory"] == "Flat"


def test_saved_model_loads_without_pickles_and_reproduces_the_embeddings(trained):
    _, result = trained
    state = torch.load(result.path / "model" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    cfg = load_job_config(write_job(result.path.parent.parent.parent.parent, filename="again.toml"))
    matrix = build_matrix(read_interactions(cfg.input))
    model = load_model(result.path / "model")
    with torch.no_grad():
        z = model.encode(to_batch(matrix, np.arange(50), torch.device("cpu")))[0].numpy()
    stored = np.stack(pq.read_table(result.path / "users.parquet").column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(z, stored[:50], rtol=1e-5, atol=1e-5)


def test_same_seed_same_embeddings(tmp_path):
    job = write_job(tmp_path, model={"epochs": 3})
    first = run_job(load_job_config(job), progress=False)
    second = run_job(load_job_config(job), force=True, progress=False)
    assert first.version < second.version
    a = pq.read_table(first.path / "users.parquet").column("embedding").to_pylist()
    b = pq.read_table(second.path / "users.parquet").column("embedding").to_pylist()
    assert a == b


def test_string_ids_end_to_end(tmp_path):
    job = write_job(tmp_path, input={"path": str(FIXTURES / "interactions_str.parquet"), "weight_col": "rating",
                                     "min_weight": 4.0}, model={"epochs": 5})
    result = run_job(load_job_config(job), progress=False)
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    assert pq.read_schema(result.path / "users.parquet").field("user_id").type == pa.string()
    recs = fs.recommend("u0042", k=5)
    assert len(recs.ids) == 5 and all(str(i).startswith("i") for i in recs.ids)
    assert fs.user_embedding("u0042").shape == (32,)


def _store_state(root):
    folder = root / "movies"
    return ((folder / "LATEST").read_text(), layout.list_versions(root, "movies"),
            sorted(p.name for p in (folder / ".staging").iterdir()) if (folder / ".staging").exists() else [])


@pytest.mark.parametrize("fail_at", ["index", "pointer"])
def test_failure_mid_publish_keeps_the_previous_version_live(tmp_path, monkeypatch, fail_at):
    job = load_job_config(write_job(tmp_path, model={"epochs": 2}))
    good = run_job(job, progress=False)
    before = _store_state(tmp_path / "store")

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    if fail_at == "index":
        monkeypatch.setattr("aefeatures.jobs.run.save_index", boom)
    else:  # the version is complete and renamed in, but LATEST cannot be replaced
        real = publish.atomic_write
        monkeypatch.setattr(publish, "atomic_write",
                            lambda path, text: boom() if path.name == "LATEST" else real(path, text))
    with pytest.raises(OSError, match="injected"):
        run_job(job, force=True, progress=False)
    assert _store_state(tmp_path / "store") == before
    assert before[1] == [good.version] and before[2] == []
    assert aefeatures.open_store(tmp_path / "store")["movies"].version == good.version


def test_an_open_feature_set_stays_on_its_version_while_a_new_one_publishes(tmp_path):
    job = load_job_config(write_job(tmp_path, model={"epochs": 2}))
    first = run_job(job, progress=False)
    pinned = aefeatures.open_store(tmp_path / "store")["movies"]
    before = pinned.recommend(42, k=5)
    second = run_job(load_job_config(write_job(tmp_path, model={"epochs": 4})), progress=False)
    assert pinned.version == first.version
    np.testing.assert_array_equal(pinned.recommend(42, k=5).ids, before.ids)
    assert aefeatures.open_store(tmp_path / "store")["movies"].version == second.version


def test_lookups_do_not_import_torch(trained):
    root, _ = trained
    code = ("import sys, aefeatures; fs = aefeatures.open_store(sys.argv[1])['movies']; "
            "fs.recommend(42, k=3); fs.similar_items(7, k=3); fs.recommend_batch([1, 2], k=3); "
            "fs.recommend_history([7, 12], k=3); fs.embed_history([7]); fs.similar_users_to_history([7], k=3); "
            "from aefeatures import cli; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)


def test_vae_trains_and_its_recommendations_follow_the_planted_clusters(tmp_path, planted):
    user_community, item_cluster = planted
    job = write_job(tmp_path, model={"kind": "vae", "epochs": 30, "anneal_steps": 50})
    result = run_job(load_job_config(job), progress=False)
    assert result.manifest["config"]["model"]["kind"] == "vae"
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    recs = fs.recommend_batch(sorted(user_community)[:300], k=10)
    in_cluster = np.mean([item_cluster[i] == user_community[u] for u, i in recs.select("user_id", "item_id").iter_rows()])
    assert in_cluster > 0.6


def test_event_time_is_after_training_and_last_interaction_null_without_timestamps(tmp_path):
    job = write_job(tmp_path, input={"path": str(FIXTURES / "interactions.parquet")}, model={"epochs": 1},
                    evaluation={"valid_share": 0.0})
    started = datetime.now(timezone.utc)
    result = run_job(load_job_config(job), progress=False)
    users = pq.read_table(result.path / "users.parquet")
    assert users.column("event_timestamp").equals(users.column("created_timestamp"))
    valid_from = users.column("event_timestamp")[0].as_py()
    assert valid_from.isoformat() == result.manifest["valid_from"]
    # the values did not exist before training ended
    assert valid_from >= started + timedelta(seconds=result.timings["train"])
    assert users.column("last_interaction").null_count == users.num_rows


def test_asking_for_cuda_without_one_is_a_config_error(monkeypatch):
    from aefeatures.errors import BadInputError
    from aefeatures.model.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInputError, match="no CUDA device is available"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
