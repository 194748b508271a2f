"""Training under torchrun: 2 CPU processes (gloo) train the same model as one process, and
only rank 0 publishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from aefeatures.config import load_job_config
from aefeatures.distributed import Group
from aefeatures.jobs import run_job
from tests.conftest import REPO, write_job

# Few epochs keep the test fast; dropout stays on, so the shared random draws are exercised.
MODEL = {"epochs": 6, "batch_size": 200, "patience": 0}


@pytest.mark.parametrize("n, world, expected", [(10, 2, [5, 5]), (7, 2, [4, 3]), (2, 3, [1, 1, 0])])
def test_a_global_batch_splits_into_contiguous_rank_slices(n, world, expected):
    slices = [Group(rank, world, 0).my_slice(n) for rank in range(world)]
    assert [s.stop - s.start for s in slices] == expected
    assert slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def _torchrun(job, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "aefeatures", "run", str(job), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_train_the_model_one_process_trains_and_rank_0_alone_publishes(tmp_path):
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
    manifest = json.loads((folder / "versions" / runs[0]["version"] / "manifest.json").read_text())

    # Same global batches and random draws: the same model, up to summation order (measured:
    # equal metrics, losses within 2e-7 relative, embeddings within 1.2e-6).
    losses = np.array(manifest["training"]["epoch_losses"])
    np.testing.assert_allclose(losses, single.manifest["training"]["epoch_losses"], rtol=1e-5)
    for key, value in single.manifest["evaluation"]["model"].items():
        assert manifest["evaluation"]["model"][key] == pytest.approx(value, abs=1e-4), key
    two = pl.read_parquet(folder / "versions" / runs[0]["version"] / "users.parquet")
    one = pl.read_parquet(single.path / "users.parquet")
    np.testing.assert_allclose(np.stack(two["embedding"].to_numpy()), np.stack(one["embedding"].to_numpy()),
                               atol=1e-4)

    again = _torchrun(job)  # up to date: rank 0 says so, rank 1 stops without training
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date" in again.stdout
    runs = (folder / "runs.jsonl").read_text().splitlines()
    assert [json.loads(r)["status"] for r in runs] == ["published", "up_to_date"]
