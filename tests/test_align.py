"""One embedding space per feature set: the Procrustes fit, the rotation folded into the model,
and two real trainings with different seeds, aligned and not."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

import aefeatures
from aefeatures.config import load_job_config
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.export.catalog import connect
from aefeatures.jobs.embed import embed_job
from aefeatures.jobs.run import run_job
from aefeatures.model.align import procrustes, rotate
from aefeatures.model.autoencoder import Autoencoder, AutoencoderShape, load_model
from aefeatures.model.embed import encode
from aefeatures.quality import drift
from aefeatures.store.index import load_index, search, user_queries
from tests.conftest import FIXTURES, write_job

NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}
TINY = {"epochs": 5, "dim": 8, "hidden": [32]}


def _random_orthogonal(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    live = rng.normal(size=(200, 6))
    q = _random_orthogonal(6, 1)
    found, residual = procrustes(live @ q.T, live)  # new = live rotated away by qᵀ
    np.testing.assert_allclose(found, q, atol=1e-10)
    assert residual < 1e-10


@pytest.mark.parametrize("kind, hidden", [("dae", (16,)), ("dae", ()), ("vae", (16, 12)), ("recvae", (16,))])
def test_rotation_folded_into_the_model_keeps_every_score(kind, hidden):
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderShape(n_items=500, dim=8, hidden=hidden, kind=kind, dropout=0.5))
    matrix = build_matrix(read_interactions(_input()), binarize=True)
    z, err = encode(model, matrix.csr)
    scores = z @ model.decoder.weight.detach().numpy().T
    q = _random_orthogonal(8, 2)
    rotate(model, q)
    z2, err2 = encode(model, matrix.csr)
    np.testing.assert_allclose(z2, z @ q, atol=1e-5)  # the bottleneck (a vae's mean) is rotated
    np.testing.assert_allclose(z2 @ model.decoder.weight.detach().numpy().T, scores, atol=1e-4)
    np.testing.assert_allclose(err2, err, rtol=1e-4)  # reconstruction errors unchanged


def _input():
    from aefeatures.config import InputConfig

    return InputConfig(path=str(FIXTURES / "interactions.parquet"), weight_col="rating", timestamp_col="timestamp",
                       min_weight=4.0)


def test_drift_figures():
    a = np.eye(3, dtype=np.float32)
    assert drift.cosine_quantiles(a, a)["q50"] == pytest.approx(1.0)
    assert drift.cosine_quantiles(a, -a)["mean"] == pytest.approx(-1.0)
    same = drift.churn(np.array([[1, 2, 3]]), np.array([[3, 2, 1]]))
    assert same["mean"] == 0.0 and same["all_changed"] == 0.0
    assert drift.churn(np.array([[1, 2]]), np.array([[3, 4]]))["all_changed"] == 1.0
    assert drift.rank_change(np.arange(10.0), np.arange(10.0))["spearman"] == pytest.approx(1.0)
    top = drift.top_k(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]), np.zeros(3), 2)
    assert top.tolist() == [[1, 2]]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Version A (seed 0), then seed 1 trained on top of it twice: aligned and not."""
    folder = tmp_path_factory.mktemp("align")
    run_job(load_job_config(write_job(folder, model={**TINY, "seed": 0}, gate=NO_GATE, filename="a.toml")),
            progress=False)
    stores = {}
    for align in (True, False):
        store = folder / f"store_{align}"
        shutil.copytree(folder / "store", store)
        job = write_job(folder, store=store, model={**TINY, "seed": 1}, gate=NO_GATE, filename=f"b_{align}.toml")
        job.write_text(job.read_text() + f"[publish]\nalign = {'true' if align else 'false'}\n")
        stores[align] = (store, run_job(load_job_config(job), progress=False), job)
    return folder, stores


def _users(path):
    frame = pl.read_parquet(path / "users.parquet")
    return frame.get_column("user_id").to_numpy(), np.stack(frame.get_column("embedding").to_numpy())


def _median_cosine(a, b):
    return float(np.median(np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_aligned_versions_share_a_space_and_answer_the_same(two_seeds):
    folder, stores = two_seeds
    (aligned_root, aligned, aligned_job), (plain_root, plain, _) = stores[True], stores[False]
    first = aefeatures.open_store(folder / "store")["movies"]
    ids, vectors_a = _users(first.path)
    _, vectors_aligned = _users(aligned.path)
    _, vectors_plain = _users(plain.path)
    aligned_cos, plain_cos = _median_cosine(vectors_a, vectors_aligned), _median_cosine(vectors_a, vectors_plain)
    print(f"median cosine of a user's vectors, seed 0 vs seed 1: aligned {aligned_cos:.3f}, unaligned {plain_cos:.3f}")
    # measured 0.77 aligned, 0.12 unaligned: the two trainings differ by more than a rotation (a
    # general linear map fits users to 0.99), and only a rotation keeps cosines and item-item scores
    assert aligned_cos > 0.7 and abs(plain_cos) < 0.3

    record = aligned.manifest["alignment"]
    assert record["aligned"] and record["to_version"] == first.version
    assert record["residual"] < record["residual_unaligned"]
    assert plain.manifest["alignment"] == {"to_version": first.version, "aligned": False,
                                           "reason": "`publish.align` is off"}
    q = np.asarray(record["rotation"])
    np.testing.assert_allclose(vectors_plain @ q, vectors_aligned, atol=1e-4)

    # every score, FAISS answer and SQL macro answer is the same with and without alignment
    fa, fp = aefeatures.open_store(aligned_root)["movies"], aefeatures.open_store(plain_root)["movies"]
    for user in (1, 42, 1999):
        ra, rp = fa.recommend(user, k=10), fp.recommend(user, k=10)
        assert ra.ids.tolist() == rp.ids.tolist()
        np.testing.assert_allclose(ra.scores, rp.scores, rtol=1e-4, atol=1e-4)
        assert fa.similar_items(7, k=10).ids.tolist() == fp.similar_items(7, k=10).ids.tolist()
    index_a, index_p = load_index(aligned.path / "items.faiss"), load_index(plain.path / "items.faiss")
    got_a = search(index_a, user_queries(vectors_aligned[:200]), 10)
    got_p = search(index_p, user_queries(vectors_plain[:200]), 10)
    np.testing.assert_array_equal(got_a[1], got_p[1])
    np.testing.assert_allclose(got_a[0], got_p[0], rtol=1e-4, atol=1e-4)
    sql_a = connect(aligned_root).sql("SELECT item_id, score FROM movies_recommend(42, 10)").fetchall()
    sql_p = connect(plain_root).sql("SELECT item_id, score FROM movies_recommend(42, 10)").fetchall()
    assert [r[0] for r in sql_a] == [r[0] for r in sql_p]
    np.testing.assert_allclose([r[1] for r in sql_a], [r[1] for r in sql_p], rtol=1e-4, atol=1e-4)

    # the saved model makes aligned vectors: `embed` (no training) reproduces them
    embedded = embed_job(load_job_config(aligned_job), force=True)
    ids_e, vectors_e = _users(embedded.path)
    np.testing.assert_array_equal(ids_e, ids)
    np.testing.assert_allclose(vectors_e, vectors_aligned, atol=1e-5)
    model = load_model(aligned.path / "model")
    np.testing.assert_allclose(model.decoder.weight.detach().numpy(),
                               np.stack(pl.read_parquet(aligned.path / "items.parquet").get_column("embedding")
                                        .to_numpy()), atol=1e-6)


def test_drift_is_measured_at_every_publish(two_seeds):
    _, stores = two_seeds
    aligned, plain = stores[True][1], stores[False][1]
    for result in (aligned, plain):
        d = result.manifest["drift"]
        assert d["user_cosine"]["count"] == 2030 and d["item_cosine"]["count"] == 500
        assert 0 <= d["churn"]["mean"] <= 1 and d["churn"]["users"] == 1000
        assert -1 <= d["anomaly_rank"]["spearman"] <= 1
    # rotation changes cosines (aligned: high) but neither churn nor anomaly ranks
    assert aligned.manifest["drift"]["user_cosine"]["q50"] > 0.7 > 0.3 > plain.manifest["drift"]["user_cosine"]["q50"]
    assert aligned.manifest["drift"]["churn"] == plain.manifest["drift"]["churn"]
    page = (aligned.path / "report.html").read_text()
    assert f"Drift against {aligned.manifest['drift']['against']}" in page
    assert 'aria-label="drift against the live version"' in page and "top-10 churn" in page


def test_drift_in_every_interface(two_seeds):
    """The SQL view, `versions` (table and JSON) and the HTTP version endpoint show the drift."""
    import json

    from click.testing import CliRunner

    from aefeatures.cli.app import cli
    from tests.test_service import Service

    _, stores = two_seeds
    root, result, _ = stores[True]
    d = result.manifest["drift"]
    rows = connect(root).sql("SELECT version, aligned, user_cos_q50, churn_mean, anomaly_rank_spearman "
                             "FROM movies_drift ORDER BY version").fetchall()
    assert rows[0][1:] == (None, None, None, None)  # the first version: nothing to compare with
    assert [r for r in rows if r[0] == result.version] == [(
        result.version, True, pytest.approx(d["user_cosine"]["q50"]), pytest.approx(d["churn"]["mean"]),
                     pytest.approx(d["anomaly_rank"]["spearman"]))]
    table = CliRunner().invoke(cli, ["versions", "--store", str(root)])
    assert table.exit_code == 0 and "churn@10" in table.stdout and "user_cos50" in table.stdout
    listed = json.loads(CliRunner().invoke(cli, ["versions", "--store", str(root), "--json"]).stdout)["versions"]
    (mine,) = [v for v in listed if v["version"] == result.version]
    assert mine["drift"] == d and "rotation" not in mine["alignment"]
    assert listed[0]["drift"] is None
    plain_root, plain, _ = stores[False]  # its live version is the trained one (no embed after it)
    svc = Service(plain_root)
    try:
        status, body = svc.get("/v1/movies/version")
    finally:
        svc.stop()
    assert status == 200 and body["version"] == plain.version and body["drift"] == plain.manifest["drift"]
    assert body["alignment"]["aligned"] is False and body["valid_from"] == plain.manifest["valid_from"]


def test_run_prints_the_drift(two_seeds):
    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    _, stores = two_seeds
    out = CliRunner().invoke(cli, ["run", str(stores[False][2]), "--force"])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.stdout.splitlines() if line.startswith("  drift")]
    assert "not aligned to" in lines[0] and "`publish.align` is off" in lines[0]
    assert any("user cosine vs live: median" in line for line in lines)
    assert any("top-10 churn: mean" in line for line in lines)
    assert any("anomaly ranks: Spearman" in line for line in lines)
