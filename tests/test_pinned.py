"""Pinned reads: a consumer reads one version everywhere (Python, CLI, HTTP) while it is
retained, and is told clearly (404 / 410, exit 2) when it never existed or retention deleted it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.jobs.run import run_job
from tests.conftest import write_job
from tests.test_service import Service

NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three versions with `retention.keep = 2`: the first is deleted by the third run."""
    folder = tmp_path_factory.mktemp("pinned")
    results = []
    for seed in (0, 1, 2):
        job = write_job(folder, model={"epochs": 1, "dim": 8, "hidden": [16], "seed": seed}, gate=NO_GATE,
                        filename=f"job{seed}.toml")
        job.write_text(job.read_text() + "[retention]\nkeep = 2\n")
        results.append(run_job(load_job_config(job), progress=False))
    return folder / "store", results


def test_python_pins_a_version(three):
    root, (gone, older, live) = three
    store = aefeatures.open_store(root)
    pinned = store["movies", older.version]
    assert pinned.version == older.version and store["movies"].version == live.version
    assert not np.allclose(pinned.user_embedding(42), store["movies"].user_embedding(42))
    with pytest.raises(aefeatures.errors.VersionGoneError, match="deleted by retention"):
        store["movies", gone.version]
    with pytest.raises(aefeatures.errors.FeatureSetNotFoundError, match="has no version `20990101T000000.000000Z`"):
        store["movies", "20990101T000000.000000Z"]
    with pytest.raises(aefeatures.errors.FeatureSetNotFoundError, match="has no version"):
        store["movies", "../../etc"]


@pytest.mark.parametrize("args", [["recommend", "--user", "42"], ["similar", "--item", "7"], ["anomalies"]])
def test_every_lookup_command_takes_version(three, args):
    root, (gone, older, live) = three
    out = CliRunner().invoke(cli, [*args, "--store", str(root), "--version", older.version, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["version"] == older.version
    missing = CliRunner().invoke(cli, [*args, "--store", str(root), "--version", gone.version])
    assert missing.exit_code == 2 and "deleted by retention" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_http_pins_with_a_query_parameter(three):
    root, (gone, older, live) = three
    fs = aefeatures.open_store(root)["movies", older.version]
    svc = Service(root)
    try:
        status, body = svc.get("/v1/movies/recommend", user=42, k=5, version=older.version)
        assert status == 200 and body["version"] == older.version
        assert [i["item_id"] for i in body["items"]] == fs.recommend(42, k=5).ids.tolist()
        assert svc.get("/v1/movies/recommend", user=42, k=5)[1]["version"] == live.version
        status, body = svc.request("POST", f"/v1/movies/embeddings?version={older.version}", {"users": [42]})
        assert status == 200 and body["version"] == older.version
        np.testing.assert_allclose(body["users"][0]["embedding"], fs.user_embedding(42), atol=1e-6)
        assert svc.get("/v1/movies/version", version=older.version)[1]["version"] == older.version
        status, body = svc.get("/v1/movies/similar", item=7, version=gone.version)
        assert status == 410 and body["error"]["code"] == "version_gone"
        status, body = svc.get("/v1/movies/anomalies", version="20990101T000000.000000Z")
        assert status == 404 and "has no version" in body["error"]["message"]
    finally:
        svc.stop()
