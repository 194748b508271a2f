"""A job fitted across the workers of a local Ray cluster by Ray Train's TorchTrainer: the same
code as under torchrun, on the process group Ray sets up (aefeatures.jobs.launchers)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from aefeatures.config import load_job_config
from aefeatures.jobs.run import run_job
from tests.conftest import write_job

pytestmark = [pytest.mark.slow,  # starts a Ray cluster (~10 s) and two workers
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own, about its settings


def test_ray_train_fits_the_default_dlae_on_two_cpu_workers_and_publishes_once(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aefeatures.jobs.launchers import ray_train_loop
    from aefeatures.model.autoencoder import load_model

    (tmp_path / "one").mkdir()
    single = run_job(load_job_config(write_job(tmp_path / "one", model={"kind": "dlae"})), progress=False)
    job = write_job(tmp_path, model={"kind": "dlae"})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(ray_train_loop, train_loop_config={"job": str(job)},
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                               run_config=RunConfig(name="aefeatures", storage_path=str(tmp_path / "ray")))
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.error is None
    folder = tmp_path / "store" / "movies"
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in runs] == ["published"]  # one run, logged by rank 0 alone
    assert (folder / "LATEST").read_text().strip() == runs[0]["version"]
    version = folder / "versions" / runs[0]["version"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert load_model(version / "model").shape.kind == "dlae"
    # dim 32 is below the data's rank: the search also tried the sparse item-item part, across the workers
    assert set(manifest["training"]["chosen"]) == {"dropout", "l2", "popularity_exponent", "neighbour_weight"}
    assert manifest["counts"] == single.manifest["counts"]  # every user and item, from both workers' shares
    users = pl.read_parquet(version / "users.parquet", columns=["user_id"])
    assert users.equals(pl.read_parquet(single.path / "users.parquet", columns=["user_id"]))
    assert manifest["evaluation"]["model"]["ndcg@100"] == pytest.approx(
        single.manifest["evaluation"]["model"]["ndcg@100"], abs=0.05)  # other validation users, same quality
