"""RecVAE (kind recvae): its encoder, the alternating phases, the composite prior, the per-user
KL weight, what it refuses, and a published run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import InputConfig, ModelConfig, load_job_config
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.errors import BadInputError, ConfigError
from aefeatures.model import recvae
from aefeatures.model.autoencoder import (
    Autoencoder,
    AutoencoderShape,
    Noise,
    load_model,
    multinomial_nll,
    save_model,
)
from aefeatures.model.device import batch_cutter, to_batch
from aefeatures.model.result import TrainResult
from aefeatures.model.train import train
from tests.conftest import FIXTURES, write_job

CFG = ModelConfig(kind="recvae", dim=8, hidden=(16,), batch_size=256, seed=0, min_steps=0)


@pytest.fixture(scope="module")
def matrix():
    """The fixture's ratings as weights (not binarised): users' total weights differ from their counts."""
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"), weight_col="rating")),
                        binarize=False)


def _model(matrix, cfg=CFG) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, cfg.hidden, "recvae", cfg.dropout))


def _phases(model: Autoencoder, matrix, cfg=CFG) -> recvae.Phases:
    cpu = torch.device("cpu")
    return recvae.Phases(model, batch_cutter(matrix, cpu), cfg, cpu)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _encoder_state(model: Autoencoder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _params(model).items() if not k.startswith("decoder.")}


def test_the_encoder_is_five_dense_residual_layers_with_swish_and_layer_norm(matrix):
    model = _model(matrix).eval()
    batch = to_batch(matrix, np.arange(40), torch.device("cpu"))
    mean, logvar = model.encode(batch)
    # the same layers by hand on the dense, L2-normalised input
    x = torch.zeros(40, matrix.shape[1])
    x[batch.rows, batch.indices] = batch.values
    x = x / x.norm(dim=1, keepdim=True)
    fc = [lambda v: v @ model.input_layer.weight + model.input_bias, *model.encoder[:4]]
    hs = []
    for k in range(5):
        pre = fc[k](x if k == 0 else hs[-1]) + sum(hs, torch.zeros(()))
        hs.append(torch.nn.functional.layer_norm(pre * torch.sigmoid(pre), (16,), model.norms[k].weight,
                                                 model.norms[k].bias, eps=0.1))
    out = model.encoder[4](hs[-1])
    torch.testing.assert_close(mean, out[:, :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, out[:, 8:], rtol=1e-4, atol=1e-5)
    assert [layer.weight.shape for layer in model.encoder] == [(16, 16)] * 4 + [(16, 16)]  # H → 2 dim = 16
    assert model.decoder.weight.shape == (matrix.shape[1], 8)


def test_the_encoder_phase_leaves_the_decoder_and_the_decoder_phase_the_encoder(matrix):
    model = _model(matrix)
    phases = _phases(model, matrix)
    users = np.arange(256)
    before = _params(model)
    phases.encoder_step(users)
    after_encoder = _params(model)
    for key in before:
        changed = not torch.equal(before[key], after_encoder[key])
        assert changed == (not key.startswith("decoder.")), key
    phases.decoder_step(users)
    after_decoder = _params(model)
    for key in before:
        changed = not torch.equal(after_encoder[key], after_decoder[key])
        assert changed == key.startswith("decoder."), key


def test_the_priors_old_encoder_is_the_encoder_after_the_encoder_passes(matrix):
    model = _model(matrix)
    phases = _phases(model, matrix)
    initial = _encoder_state(model)
    for key, value in _encoder_state(phases.old).items():  # before any epoch: the initial encoder
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    decoder_step = phases.decoder_step

    def recording_decoder_step(users):  # the encoder as the encoder passes left it
        seen.setdefault("encoder", _encoder_state(model))
        seen.setdefault("old", _encoder_state(phases.old))
        return decoder_step(users)

    phases.decoder_step = recording_decoder_step
    rng = np.random.default_rng(0)
    result = TrainResult(model=model, device="cpu")
    phases.epoch(lambda: rng.permutation(matrix.shape[0]), result)
    assert result.steps == 4 * 8  # 3 encoder passes and 1 decoder pass of 8 batches
    for key, value in seen["old"].items():
        torch.testing.assert_close(value, seen["encoder"][key], rtol=0, atol=0)
        assert not torch.equal(value, initial[key]) or key.startswith("norms")  # the encoder moved
    assert not any(p.requires_grad for p in phases.old.parameters())
    assert "old" not in "".join(model.state_dict())  # training state, not part of the model


def test_the_kl_weight_is_gamma_times_the_users_total_weight(matrix):
    batch = to_batch(matrix, np.arange(30), torch.device("cpu"))
    totals = np.add.reduceat(matrix.values, matrix.indptr[:31])[:30]
    assert not np.allclose(totals, np.diff(matrix.indptr[:31]))  # weights, not counts
    np.testing.assert_allclose(recvae.kl_weights(batch, 0.005).numpy(), 0.005 * totals, rtol=1e-6)


def test_the_encoder_loss_is_the_nll_plus_the_weighted_kl_to_the_composite_prior(matrix):
    """The loss an encoder step reports, rebuilt from the same draws: γ Σx (log q − log p) added
    to the multinomial NLL; with γ = 0 only the NLL is left."""
    losses = {}
    for gamma in (0.0, 0.05):
        model = _model(matrix)
        phases = _phases(model, matrix, replace(CFG, gamma=gamma))
        losses[gamma] = float(phases.encoder_step(np.arange(64)))
    model = _model(matrix).train()
    phases = _phases(model, matrix)
    batch = to_batch(matrix, np.arange(64), torch.device("cpu"))
    noise = Noise.draw(batch, phases.cfg.dim, phases.generator)
    with torch.no_grad():
        mean, logvar = model.encode(batch, noise)
        z = mean + noise.normal * torch.exp(0.5 * logvar)
        nll = multinomial_nll(model.decoder(z), batch)
        old_mean, old_logvar = phases.old.encode(batch)
    z, mean, logvar, old_mean, old_logvar = (t.double().numpy() for t in (z, mean, logvar, old_mean, old_logvar))

    def log_normal(x, m, lv):
        return -0.5 * (lv + math.log(2 * math.pi) + (x - m) ** 2 / np.exp(lv))

    mixture = (3 / 20 * np.exp(log_normal(z, 0, 0)) + 3 / 4 * np.exp(log_normal(z, old_mean, old_logvar))
               + 1 / 10 * np.exp(log_normal(z, 0, 10.0)))
    kl = log_normal(z, mean, logvar).sum(1) - np.log(mixture).sum(1)
    totals = np.add.reduceat(matrix.values, matrix.indptr[:65])[:64]
    assert losses[0.0] == pytest.approx(float(nll.sum()), rel=1e-5)
    assert losses[0.05] == pytest.approx(float(nll.sum()) + float((0.05 * totals * kl).sum()), rel=1e-4)


def test_training_validates_each_epoch_keeps_the_best_and_a_refit_runs_the_epochs_given(matrix):
    cfg = replace(CFG, epochs=6, patience=2)
    curve = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.9])
    snapshots = []

    def validate(model):
        snapshots.append(_params(model))
        return {"ndcg@100": next(curve)}

    result = train(matrix, cfg, validate=validate, progress=False)
    assert (result.best_epoch, result.stop_reason, len(result.history)) == (2, "patience", 4)
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key])
    assert result.steps == 4 * 4 * 8  # 4 epochs of 4 passes of 8 batches
    assert result.history[0]["beta"] > 0 and not result.model.training

    refit = train(matrix, replace(cfg, epochs=50), epochs=3, progress=False)
    assert len(refit.history) == 3 and refit.steps == 3 * 4 * 8 and refit.stop_reason == "epochs"
    again = train(matrix, replace(cfg, epochs=50), epochs=3, progress=False)  # seeded
    for key, value in refit.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value, rtol=0, atol=0)


def test_min_steps_raises_the_epoch_cap_counting_every_pass(matrix):
    result = train(matrix, replace(CFG, epochs=1, min_steps=64), progress=False)
    assert result.max_epochs == 2 and result.steps == 64  # 32 steps an epoch


def test_a_passed_deadline_stops_within_a_step_keeping_the_best_so_far(matrix):
    import time

    result = train(matrix, replace(CFG, epochs=5), validate=lambda m: {"ndcg@100": 0.5}, progress=False,
                   deadline=time.perf_counter())
    assert result.stop_reason == "max_minutes" and result.steps == 0 and len(result.history) == 1


def test_save_and_load_give_the_same_model(matrix, tmp_path):
    model = _model(matrix)
    train_result = train(matrix, replace(CFG, epochs=1), progress=False)
    model = train_result.model
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.shape == model.shape and not loaded.training
    batch = to_batch(matrix, np.arange(100), torch.device("cpu"))
    with torch.no_grad():
        for a, b in zip(model(batch), loaded(batch)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum(k.startswith("norms.") for k in torch.load(tmp_path / "m" / "weights.pt", weights_only=True)) == 10


def test_a_catalogue_that_needs_the_sampled_softmax_is_refused(matrix):
    with pytest.raises(BadInputError, match=r'`model.kind` = "recvae" does not train with 500 items .*sampled '
                       r"softmax; use kind dae or vae, or raise model.full_softmax_max_items\.$"):
        train(matrix, replace(CFG, full_softmax_max_items=100), progress=False)
    with pytest.raises(BadInputError, match=r"does not train under torchrun; train it in one process"):
        recvae.check_supported(500, CFG, under_torchrun=True)


@pytest.mark.parametrize("model, message", [
    ({"hidden": [600, 200]}, r"`model\.hidden` = \[600, 200\] is not allowed: kind recvae takes one width H"),
    ({"hidden": []}, r"`model\.hidden` = \[\] is not allowed: kind recvae takes one width H"),
    ({"sparse_updates": "on"}, r"`model\.sparse_updates` = 'on' is not allowed: kind recvae trains with dense"),
    ({"compile": True}, r"`model\.compile` = True is not allowed: kind recvae trains without torch\.compile"),
    ({"gamma": -0.1}, r"`model\.gamma` = -0\.1 is not allowed: it must be 0 or more"),
    ({"encoder_passes": 0}, r"`model\.encoder_passes` = 0 is not allowed: it must be at least 1"),
])
def test_settings_recvae_does_not_take_are_refused_when_the_job_loads(tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(write_job(tmp_path, model={"kind": "recvae", **model}))


def test_the_kinds_defaults():
    cfg = ModelConfig(kind="recvae")
    assert (cfg.dim, cfg.hidden, cfg.gamma, cfg.encoder_passes, cfg.dropout) == (200, (600,), 0.005, 3, 0.5)


def test_aefeatures_run_publishes_a_recvae_version(tmp_path):
    job = write_job(tmp_path, model={"kind": "recvae", "epochs": 3, "dim": 16, "hidden": [32]},
                    gate={"beat_popularity": False, "min_ratio": 0.0})
    out = CliRunner().invoke(cli, ["run", str(job)])
    assert out.exit_code == 0, out.output
    assert "published movies version" in out.output
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    assert fs.manifest["config"]["model"]["kind"] == "recvae" and fs.dim == 16
    assert fs.manifest["training"]["refit"]["status"] == "published"
    assert len(fs.recommend(42, k=5).ids) == 5


def test_a_run_refused_for_its_catalogue_exits_2_with_one_line_and_publishes_nothing(tmp_path):
    job = write_job(tmp_path, model={"kind": "recvae", "epochs": 2, "full_softmax_max_items": 100})
    out = CliRunner().invoke(cli, ["run", str(job)])
    assert out.exit_code == 2, out.output
    assert out.output.strip().splitlines() == [
        'error: `model.kind` = "recvae" does not train with 500 items (> model.full_softmax_max_items = 100), '
        "which needs a sampled softmax; use kind dae or vae, or raise model.full_softmax_max_items."]
    assert not (tmp_path / "store" / "movies" / "LATEST").exists()
