"""Sparse updates: with the sampled softmax the input layer and the decoder get sparse gradients
and a lazy Adam moves only the rows a batch read; the trained model is the same kind of model."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import aefeatures
from aefeatures import errors
from aefeatures.config import InputConfig, ModelConfig, load_job_config
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.jobs.run import run_job
from aefeatures.model.autoencoder import (
    Autoencoder,
    AutoencoderShape,
    _BagSum,
    _hits_by_entries,
    _hits_by_pairs,
    load_model,
    multinomial_nll,
    sampled_multinomial_nll,
    save_model,
)
from aefeatures.model.device import to_batch
from aefeatures.model.embed import encode
from aefeatures.model.train import _Step, sparse_updates, train
from aefeatures.store import layout
from tests.conftest import FIXTURES, write_job

# The fixture's ~500 items are above a lowered threshold, so the sampled softmax (and with it,
# under "auto", sparse updates) runs on it.
SAMPLED = {"full_softmax_max_items": 100, "sampled_negatives": 64}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"),
                                                      weight_col="rating", min_weight=4.0)))


def _step(matrix, **model) -> _Step:
    cfg = ModelConfig(**{"kind": "dae", "dim": 16, "hidden": (32,), "batch_size": 128, **SAMPLED, **model})
    torch.manual_seed(cfg.seed)
    net = Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, cfg.hidden, cfg.kind, cfg.dropout))
    return _Step(net, matrix, cfg, CPU, None)


def _recording_negatives(step: _Step) -> list[torch.Tensor]:
    """The negatives ``step`` draws from now on, one tensor per batch."""
    drawn, draw = [], step.sampler.draw

    def record(generator):
        items, log_q = draw(generator)
        drawn.append(items)
        return items, log_q

    step.sampler.draw = record
    return drawn


def test_the_sampled_softmax_gives_the_item_layers_sparse_gradients(matrix):
    step = _step(matrix)
    step(np.arange(128), 0.0)
    model = step.model
    assert step.sparse
    for param in (model.input_layer.weight, model.decoder.weight, model.decoder.bias):
        assert param.grad.is_sparse
    for param in (model.input_bias, *model.encoder.parameters()):
        assert not param.grad.is_sparse


def test_rows_a_batch_did_not_read_keep_their_exact_values_only_when_lazy(matrix):
    users = np.random.default_rng(0).permutation(matrix.shape[0])
    first, second = users[:128], users[128:136]  # a few users, so that many items go unread
    moved = {}
    for mode in ("on", "off"):
        step = _step(matrix, sparse_updates=mode)
        negatives = _recording_negatives(step)
        step(first, 0.0)
        before = {k: v.clone() for k, v in step.model.state_dict().items()}
        step(second, 0.0)
        after = step.model.state_dict()
        read = torch.from_numpy(np.unique(matrix.gather(second)[1]).astype(np.int64))
        unread_inputs = np.setdiff1d(np.arange(matrix.shape[1]), read)
        unread_outputs = np.setdiff1d(unread_inputs, negatives[-1].numpy())
        moved[mode] = [
            ~torch.all(after["input_layer.weight"][unread_inputs] == before["input_layer.weight"][unread_inputs], dim=1),
            ~torch.all(after["decoder.weight"][unread_outputs] == before["decoder.weight"][unread_outputs], dim=1),
            after["decoder.bias"][unread_outputs] != before["decoder.bias"][unread_outputs],
        ]
        assert len(unread_inputs) > 50 and len(unread_outputs) > 10  # the test has rows to look at
    assert not any(rows.any() for rows in moved["on"])
    # Dense Adam moves a row read by the first batch only, by its momentum, in the second step.
    assert all(rows.any() for rows in moved["off"])


def test_the_input_layers_sparse_gradient_equals_embedding_bags(matrix):
    model = _step(matrix).model
    batch = to_batch(matrix, np.arange(64), CPU)
    weights = batch.values * (torch.rand(len(batch.values), generator=torch.Generator().manual_seed(0)) > 0.5)
    upstream = torch.randn(batch.size, model.input_layer.weight.shape[1])
    expected = torch.autograd.grad(
        (F.embedding_bag(batch.indices, model.input_layer.weight, batch.offsets, mode="sum",
                         per_sample_weights=weights) * upstream).sum(), model.input_layer.weight)[0]
    (_BagSum.apply(model.input_layer.weight, batch.indices, batch.offsets, batch.rows, weights) * upstream).sum().backward()
    grad = model.input_layer.weight.grad
    assert grad.is_sparse
    assert grad._indices()[0].tolist() == sorted(set(batch.indices[weights != 0].tolist()))  # one row per item read
    torch.testing.assert_close(grad.to_dense(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting, sampled, under_torchrun, expected", [
    ("auto", True, False, True),
    ("auto", False, False, False),
    ("on", False, False, True),
    ("off", True, False, False),
    ("auto", True, True, False),
])
def test_sparse_updates_follow_the_setting_and_the_softmax(setting, sampled, under_torchrun, expected):
    cfg = ModelConfig(sparse_updates=setting)
    assert sparse_updates(cfg, sampled=sampled, under_torchrun=under_torchrun) is expected


def test_sparse_updates_on_under_torchrun_is_refused():
    with pytest.raises(errors.BadInputError, match='`model.sparse_updates` = "on" does not work under torchrun'):
        sparse_updates(ModelConfig(sparse_updates="on"), sampled=True, under_torchrun=True)


def test_an_unknown_sparse_updates_value_is_refused_when_the_job_loads(tmp_path):
    with pytest.raises(errors.ConfigError, match="`model.sparse_updates` = 'yes' is not allowed: choose one of auto, on, off"):
        load_job_config(write_job(tmp_path, model={"sparse_updates": "yes"}))


def test_weight_decay_with_sparse_updates_warns_that_it_skips_the_item_layers(matrix, caplog):
    with caplog.at_level("WARNING", logger="aefeatures.model.train"):
        _step(matrix, weight_decay=0.01)
    assert "model.weight_decay = 0.01 decays the encoder layers only" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="aefeatures.model.train"):
        _step(matrix, weight_decay=0.01, sparse_updates="off")
    assert caplog.text == ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sampled softmax on the fixture with sparse and with dense updates: {mode: (root, RunResult)}."""
    out = {}
    for mode in ("on", "off"):
        folder = tmp_path_factory.mktemp(f"sparse-{mode}")
        job = write_job(folder, model={**SAMPLED, "sparse_updates": mode})
        out[mode] = folder / "store", run_job(load_job_config(job), progress=False)
    return out


def test_sparse_updates_lower_the_loss_and_learn_as_well_as_dense_ones(runs, planted):
    user_community, item_cluster = planted
    users = sorted(user_community)[:400]
    quality = {}
    for mode, (root, result) in runs.items():
        ev = result.manifest["evaluation"]
        losses = [h["loss"] for h in result.manifest["training"]["history"]]
        assert losses[-1] < 0.9 * losses[0]
        recs = aefeatures.open_store(root)["movies"].recommend_batch(users, k=10)
        in_cluster = np.mean([item_cluster[i] == user_community[u] for u, i in recs.select("user_id", "item_id").iter_rows()])
        quality[mode] = {**ev["model"], "in_cluster": in_cluster}
        assert ev["model"]["ndcg@10"] > 2 * ev["popularity"]["ndcg@10"]
    sparse, dense = quality["on"], quality["off"]
    assert sparse["in_cluster"] > 0.8 and sparse["in_cluster"] > dense["in_cluster"] - 0.05
    for metric in ("recall@20", "ndcg@100"):
        assert sparse[metric] > dense[metric] - 0.03, (metric, sparse, dense)


def test_a_model_trained_with_sparse_updates_saves_loads_and_scores_like_any(matrix, tmp_path):
    cfg = ModelConfig(kind="dae", dim=16, hidden=(32,), epochs=2, batch_size=128, min_steps=0, **SAMPLED)
    trained = train(matrix, cfg, progress=False).model
    save_model(trained, tmp_path)
    loaded = load_model(tmp_path)
    fresh = Autoencoder(loaded.shape)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    batch = to_batch(matrix, np.arange(300), CPU)
    with torch.no_grad():
        (mean, _), (again, _) = trained.encode(batch), loaded.encode(batch)
        assert torch.equal(mean, again)
        assert torch.equal(trained.decoder(mean), loaded.decoder(again))


def test_published_embeddings_are_the_loaded_models_encoding(runs, matrix):
    _, result = runs["on"]
    model = load_model(result.path / layout.MODEL_DIR)
    users = pq.read_table(result.path / "users.parquet").column("embedding")
    published = np.stack(users.to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors, _ = encode(model, matrix.csr)
    np.testing.assert_allclose(published, vectors, rtol=1e-5, atol=1e-6)


def test_accidental_hits_mark_each_users_own_items_among_the_negatives(matrix):
    batch = to_batch(matrix, np.arange(0, 300, 3), CPU)
    # negatives drawn with replacement: some of the users' items, some twice, and others
    negatives = torch.cat([batch.indices[::7], batch.indices[::11], torch.arange(matrix.shape[1])[::5]])
    own = [set(batch.indices[batch.rows == u].tolist()) for u in range(batch.size)]
    expected = torch.tensor([[item in own[u] for item in negatives.tolist()] for u in range(batch.size)])
    assert expected.any(dim=1).all() and not expected.all()  # the case is not trivial
    assert torch.equal(_hits_by_entries(batch, negatives), expected)
    assert torch.equal(_hits_by_pairs(batch, negatives, matrix.shape[1]), expected)


def test_the_sampled_nll_with_the_whole_catalogue_as_negatives_is_the_full_nll(matrix):
    """Each item drawn once with q = 1/n: the logQ correction is 0, and with the users' own
    items left out of the negatives every item counts once in the normaliser, as in the full
    softmax."""
    torch.manual_seed(0)
    n_items = matrix.shape[1]
    decoder = torch.nn.Linear(8, n_items)
    batch = to_batch(matrix, np.arange(40), CPU)
    z = torch.randn(batch.size, 8)
    everything = torch.randperm(n_items)
    sampled = sampled_multinomial_nll(z, decoder, batch, everything, torch.full((n_items,), -math.log(n_items)))
    torch.testing.assert_close(sampled, multinomial_nll(decoder(z), batch), rtol=1e-5, atol=1e-3)
