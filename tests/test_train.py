"""Training: KL annealing, early stopping with the best weights restored, both model kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aefeatures
from aefeatures.config import InputConfig, ModelConfig, load_job_config
from aefeatures.data.matrix import CSR, build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.jobs.run import run_job
from aefeatures.model.device import DeviceCSR, to_batch
from aefeatures.model.train import kl_weight, train
from tests.conftest import FIXTURES, write_job


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"),
                                                      weight_col="rating", min_weight=4.0)))


def test_kl_weight_anneals_linearly_to_its_cap_and_stays():
    cfg = ModelConfig(kind="vae", beta_cap=0.3, anneal_steps=100)
    assert kl_weight(0, cfg) == 0
    assert kl_weight(50, cfg) == pytest.approx(0.15)
    assert kl_weight(100, cfg) == pytest.approx(0.3)
    assert kl_weight(10_000, cfg) == pytest.approx(0.3)


def test_a_vae_run_reaches_the_beta_cap(matrix):
    cfg = ModelConfig(kind="vae", dim=16, hidden=(32,), epochs=6, batch_size=256, beta_cap=0.25, anneal_steps=10,
                      min_steps=0)
    result = train(matrix, cfg, progress=False)
    betas = [h["beta"] for h in result.history]
    assert betas[0] < 0.25 and betas[-1] == pytest.approx(0.25)
    assert all(a <= b for a, b in zip(betas, betas[1:]))


def test_early_stopping_restores_the_best_epochs_weights(matrix):
    cfg = ModelConfig(kind="dae", dim=8, hidden=(16,), epochs=20, batch_size=256, patience=3, min_steps=0)
    curve = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.45, 0.6])
    snapshots = []

    def validate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"ndcg@100": next(curve)}

    result = train(matrix, cfg, validate=validate, progress=False)
    assert result.best_epoch == 2 and result.stopped_early and len(result.history) == 5
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key])
    assert not torch.equal(result.model.decoder.weight, snapshots[-1]["decoder.weight"])


@pytest.mark.parametrize("kind", ["dae", "vae"])
def test_both_kinds_beat_popularity_on_the_planted_fixture(tmp_path, kind):
    model = {"kind": kind, "epochs": 40, "dim": 32, "hidden": [128], "anneal_steps": 200}
    result = run_job(load_job_config(write_job(tmp_path, model=model)), progress=False)
    ev = result.manifest["evaluation"]
    assert ev["valid_users"] == 1000  # held-out items: evaluation.max_valid_users of the 2,018 with 2+ items
    assert ev["model"]["ndcg@10"] > 3 * ev["popularity"]["ndcg@10"]
    assert ev["model"]["ndcg@10"] > ev["popularity"]["ndcg@10"] + 0.2
    history = result.manifest["training"]["history"]
    assert ev["model"]["ndcg@100"] == max(h["ndcg@100"] for h in history if "ndcg@100" in h)  # the best epoch
    assert result.manifest["training"]["refit"]["status"] == "published"  # then trained on every user


def test_training_without_evaluation_has_no_metrics(tmp_path):
    job = write_job(tmp_path, model={"epochs": 2}, evaluation={"valid_share": 0.0})
    result = run_job(load_job_config(job), progress=False)
    assert result.manifest["evaluation"] is None and result.manifest["gate"]["passed"]
    assert aefeatures.open_store(tmp_path / "store")["movies"].n_users == 2030


def test_a_sampled_softmax_above_the_item_threshold_beats_popularity(tmp_path, caplog):
    # The fixture's ~500 items are above a lowered threshold: training scores 64 shared
    # negatives per batch instead of the whole catalogue.
    model = {"epochs": 30, "full_softmax_max_items": 100, "sampled_negatives": 64}
    with caplog.at_level("INFO", logger="aefeatures.model.train"):
        result = run_job(load_job_config(write_job(tmp_path, model=model)), progress=False)
    assert "training with a sampled softmax over 64 shared negatives" in caplog.text
    ev = result.manifest["evaluation"]
    assert ev["model"]["ndcg@10"] > 2 * ev["popularity"]["ndcg@10"]
    assert ev["model"]["recall@20"] > ev["popularity"]["recall@20"] + 0.1


@pytest.mark.parametrize("key, value, rule", [
    ("precision", "fp16", "choose one of auto, fp32, bf16"),
    ("full_softmax_max_items", 0, "it must be at least 1"),
    ("sampled_negatives", 0, "it must be at least 1"),
])
def test_training_options_are_checked_when_the_job_loads(tmp_path, key, value, rule):
    from aefeatures.errors import ConfigError

    with pytest.raises(ConfigError, match=f"`model.{key}` = {value!r} is not allowed: {rule}"):
        load_job_config(write_job(tmp_path, model={key: value}))


def test_bf16_autocast_is_chosen_only_where_asked_or_on_cuda():
    from aefeatures.model.device import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16



def test_batches_cut_from_a_device_copy_equal_those_cut_on_the_host(matrix):
    """The GPU's batch cutting, run on CPU tensors: same entries, offsets and rows as the host's,
    for shuffled users with repeats and users without interactions."""
    csr = matrix.csr
    lengths = np.diff(csr.indptr)
    lengths[::7] = 0  # every 7th user empty
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    keep = np.concatenate([np.arange(a, a + n) for a, n in zip(csr.indptr[:-1], lengths)])
    sparse = CSR(indptr, csr.indices[keep], csr.values[keep])
    cpu = torch.device("cpu")
    on_device = DeviceCSR(sparse, cpu)
    rng = np.random.default_rng(0)
    for rows in (rng.permutation(sparse.n_rows)[:300], np.array([0, 7, 7, 3, 0]), np.array([14])):
        expected, got = to_batch(sparse, rows, cpu), on_device.batch(rows)
        for field in ("indices", "offsets", "values", "rows"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert not DeviceCSR.fits(sparse, cpu)  # on a CPU the batches are the host's own


@pytest.mark.slow
def test_small_data_trains_to_convergence_where_the_epoch_cap_cut_it_off(tmp_path):
    # 1,800 training users at batch 512: 4 steps an epoch, as on small real data (1,500 items,
    # ~15 per user). The old budget (50 epochs, no step floor) ends at the cap while validation
    # still improves; the step floor trains on until patience stops it, and validates better.
    from aefeatures.data.synthetic import generate

    data = generate(n_users=2000, n_items=1500, mean_items=15, n_communities=20, in_cluster=0.5, zipf=1.1, seed=3)
    data.interactions.write_parquet(tmp_path / "small.parquet")
    old_defaults = {"kind": "dae", "dim": 64, "hidden": [600], "batch_size": 512, "epochs": 50, "patience": 10}
    runs = {}
    for name, min_steps in (("old", 0), ("new", 1000)):
        folder = tmp_path / name
        folder.mkdir()
        job = write_job(folder, input={"path": str(tmp_path / "small.parquet")},
                        model={**old_defaults, "min_steps": min_steps},
                        evaluation={"refit": False, "protocol": "held-out users"})
        runs[name] = run_job(load_job_config(job), progress=False).manifest
    old, new = runs["old"]["training"], runs["new"]["training"]
    assert old["stop_reason"] == "epochs" and old["best_epoch"] > 50 - 10  # patience had not stopped it
    assert new["stop_reason"] == "patience" and new["steps"] >= 1000 and new["max_epochs"] > 50
    assert new["best_step"] > old["steps"]  # its best weights came after the old budget's last step
    assert runs["new"]["evaluation"]["model"]["ndcg@100"] > runs["old"]["evaluation"]["model"]["ndcg@100"]


def test_the_time_budget_stops_within_a_step_and_keeps_the_best_weights(matrix, monkeypatch):
    import aefeatures.model.train as train_module

    checks = iter(range(10_000))
    monkeypatch.setattr(train_module, "_past", lambda deadline, group: next(checks) >= 21)  # 21 steps fit
    cfg = ModelConfig(kind="dae", dim=8, hidden=(16,), epochs=50, batch_size=256, patience=0, min_steps=0,
                      max_minutes=60.0)
    curve = iter([0.1, 0.5, 0.3, 0.2])
    snapshots = []

    def validate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"ndcg@100": next(curve)}

    result = train(matrix, cfg, validate=validate, progress=False)
    # 8 steps an epoch: epochs 1 and 2 whole, epoch 3 cut after 5 steps and still validated
    assert result.steps == 21 and len(result.history) == 3 and result.stop_reason == "max_minutes"
    assert result.stopped_early and result.best_epoch == 2 and result.best_step == 16
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key])


def test_a_run_out_of_time_says_so_and_publishes_the_validated_model(tmp_path):
    job = write_job(tmp_path, model={"max_minutes": 1e-9}, gate={"beat_popularity": False, "min_ratio": 0.0})
    manifest = run_job(load_job_config(job), progress=False).manifest
    training = manifest["training"]
    assert training["stop_reason"] == "max_minutes" and training["steps"] == 0
    assert training["refit"] == {"status": "skipped", "reason": "model.max_minutes ran out during validation"}
    assert manifest["config"]["model"]["max_minutes"] == 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dae", "dlae", "recvae"])
def test_refit_trains_the_published_model_on_every_user(tmp_path, kind, monkeypatch):
    from dataclasses import replace

    from aefeatures.model import linear
    from aefeatures.model.autoencoder import load_model

    monkeypatch.setattr(linear, "TOLERANCE", 1e-9)  # a dlae refit (warm-started) and a cold fit converge alike
    monkeypatch.setattr(linear, "MAX_ITERATIONS", 500)
    job = load_job_config(write_job(tmp_path, model={"kind": kind, "epochs": 4}))
    result = run_job(job, progress=False)
    training = result.manifest["training"]
    assert training["refit"]["status"] == "published" and training["refit"]["users"] == 2030
    assert result.manifest["evaluation"]["valid_users"] == 1000  # validated on held-out items first
    published = load_model(result.path / "model")
    # the same training on all users, for the chosen budget, gives the published weights
    matrix = build_matrix(read_interactions(job.input))
    direct = train(matrix, replace(job.model, **training.get("chosen", {})), epochs=training["best_epoch"],
                   progress=False).model
    if kind == "dlae":  # its factors are unique up to a rotation: compare the model they make, B = P Rᵀ
        ours, theirs = (m.input_layer.weight.detach().double() @ m.decoder.weight.detach().double().T
                        for m in (published, direct))
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
        torch.testing.assert_close(published.decoder.bias, direct.decoder.bias)
    else:
        for key, value in direct.state_dict().items():
            torch.testing.assert_close(published.state_dict()[key], value)
    # and the model validation chose (without the hidden items) is a different one
    (tmp_path / "norefit").mkdir()
    unrefit = run_job(load_job_config(write_job(tmp_path / "norefit", model={"kind": kind, "epochs": 4},
                                                evaluation={"refit": False})), progress=False)
    assert unrefit.manifest["training"]["refit"] is None
    other = load_model(unrefit.path / "model")
    assert not torch.equal(other.decoder.weight, published.decoder.weight)


def test_a_dlae_too_large_for_memory_is_refused_in_one_line_never_replaced_by_another_kind(matrix, monkeypatch):
    from aefeatures import errors
    from aefeatures.model import linear

    monkeypatch.setattr(linear, "MAX_BYTES", 1 << 20)
    with pytest.raises(errors.BadInputError) as refused:
        train(matrix, ModelConfig(kind="dlae", dim=8), progress=False)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 2
    assert "GiB of working memory" in message and "`model.dim`" in message and 'model.kind = "dae"' in message

