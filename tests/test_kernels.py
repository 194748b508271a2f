"""The CPU training kernels that reuse buffers give the values and gradients of the plain
torch computation they replace, whatever the kept buffers held before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model import kernels
from aefeatures.model.autoencoder import Autoencoder, AutoencoderShape, _BagSum, multinomial_nll
from aefeatures.model.device import to_batch
from aefeatures.model.train import _Step
from tests.conftest import FIXTURES

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def matrix():
    return build_matrix(read_interactions(InputConfig(str(FIXTURES / "interactions.parquet"),
                                                      weight_col="rating", min_weight=4.0)))


def _poisoned_workspace(roles: dict[str, tuple[int, int]]) -> kernels.Workspace:
    """A workspace whose buffers hold NaN, as a buffer left from another step may hold anything."""
    workspace = kernels.Workspace()
    for role, (rows, cols) in roles.items():
        workspace.take(role, rows, cols, torch.empty(0)).fill_(float("nan"))
    return workspace


def test_the_decoded_nll_equals_the_multinomial_nll_of_the_decoders_logits(matrix):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(8, matrix.shape[1])
    workspace = _poisoned_workspace({"scores": (64, matrix.shape[1])})
    for users in (np.arange(64), np.arange(100, 130)):  # the second batch is smaller: a view of the buffer
        batch = to_batch(matrix, users, CPU)
        z = torch.randn(len(users), 8, requires_grad=True)
        upstream = torch.rand(len(users))  # any weighting of the users' losses, not just their sum
        params = [z, decoder.weight, decoder.bias]
        expected = multinomial_nll(decoder(z), batch)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
        losses = kernels.decoded_multinomial_nll(z, decoder, batch, workspace)
        grads = torch.autograd.grad((losses * upstream).sum(), params)
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-4)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_decoded_nll_is_stable_for_large_scores(matrix):
    batch = to_batch(matrix, np.arange(16), CPU)
    decoder = torch.nn.Linear(4, matrix.shape[1])
    z = torch.full((16, 4), 300.0)  # scores in the thousands: exp without the peak overflows
    losses = kernels.decoded_multinomial_nll(z, decoder, batch, kernels.Workspace())
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, multinomial_nll(decoder(z), batch), rtol=1e-5, atol=1e-2)


def test_the_input_layers_gradient_in_the_workspace_equals_embedding_bags(matrix):
    model = Autoencoder(AutoencoderShape(matrix.shape[1], 8, (32,), "dae", 0.5))
    weight = model.input_layer.weight
    workspace = _poisoned_workspace({"input_grad": tuple(weight.shape)})
    batch = to_batch(matrix, np.arange(64), CPU)
    # dropped entries (weight 0) read nothing and get nothing
    weights = batch.values * (torch.rand(len(batch.values), generator=torch.Generator().manual_seed(0)) > 0.5)
    upstream = torch.randn(batch.size, weight.shape[1])
    sums = F.embedding_bag(batch.indices, weight, batch.offsets, mode="sum", per_sample_weights=weights)
    expected = torch.autograd.grad((sums * upstream).sum(), weight)[0]
    got_sums = _BagSum.apply(weight, batch.indices, batch.offsets, batch.rows, weights, workspace)
    got = torch.autograd.grad((got_sums * upstream).sum(), weight)[0]
    torch.testing.assert_close(got_sums, sums)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dae", "vae"])
def test_training_steps_with_the_workspace_follow_the_plain_steps(matrix, kind):
    """The same seed and batches give the same gradients and losses with and without the kept
    buffers (to float32 rounding): the kernels change where the numbers live, not what they are.
    (Weights are not compared: Adam's first steps move a weight by ±lr whatever its gradient's
    size, so rounding in a near-zero gradient can flip a step.)"""
    def run(with_workspace: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        cfg = ModelConfig(kind=kind, dim=16, hidden=(32,), batch_size=128)
        torch.manual_seed(cfg.seed)
        model = Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, cfg.hidden, cfg.kind, cfg.dropout)).train()
        step = _Step(model, matrix, cfg, CPU, None)
        assert step.workspace is not None and model.workspace is step.workspace  # on by default on a CPU
        if not with_workspace:
            step.workspace = model.workspace = None
        losses = [float(step(np.arange(128), 0.1))]
        first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        losses += [float(step(np.arange(start, start + 128), 0.1)) for start in (128, 256, 0)]
        return losses, first_grads

    plain_losses, plain_grads = run(False)
    losses, grads = run(True)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_input_layers_gradient_is_handed_over_each_step_not_accumulated(matrix):
    """With the learning rate at 0 the weights stay put, so every step's gradient must equal a
    plain step's: a lent buffer that was accumulated into, or kept stale, would show. Its address
    stays the same from step to step: autograd adopts the lent buffer as ``.grad`` (a copy would
    be made while the lent buffer is alive, at another address)."""
    def run(with_workspace: bool) -> tuple[list[torch.Tensor], set[int]]:
        cfg = ModelConfig(kind="dae", dim=16, hidden=(32,), batch_size=128)
        torch.manual_seed(cfg.seed)
        model = Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, cfg.hidden, cfg.kind, cfg.dropout)).train()
        step = _Step(model, matrix, cfg, CPU, None)
        if not with_workspace:
            step.workspace = model.workspace = None
        for group in step.optimizer.param_groups:
            group["lr"] = 0.0
        grads, addresses = [], set()
        for start in (0, 128, 256, 0):
            step(np.arange(start, start + 128), 0.0)
            grads.append(model.input_layer.weight.grad.clone())
            addresses.add(model.input_layer.weight.grad.data_ptr())
        return grads, addresses

    plain, _ = run(False)
    lent, addresses = run(True)
    for got, want in zip(lent, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(addresses) == 1


def test_bf16_on_a_cpu_runs_the_decoders_products_in_bf16_inside_the_fused_kernel(matrix):
    """bf16 on a CPU keeps the kept buffers and runs the decoder's three products in bf16 there,
    not under autocast, whose unfused kernels took twice as long per step."""
    cfg = ModelConfig(kind="dae", dim=16, hidden=(32,), batch_size=128, precision="bf16")
    model = Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, cfg.hidden, cfg.kind, cfg.dropout))
    step = _Step(model, matrix, cfg, CPU, None)
    assert step.workspace.matmul_dtype is torch.bfloat16 and step.autocast is None
    assert model.workspace is step.workspace


def test_the_decoded_nll_with_bf16_products_stays_within_bf16_rounding_of_fp32(matrix):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(16, matrix.shape[1])
    batch = to_batch(matrix, np.arange(64), CPU)
    z = torch.randn(64, 16, requires_grad=True)
    params = [z, decoder.weight, decoder.bias]
    expected = multinomial_nll(decoder(z), batch)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    workspace = kernels.Workspace(torch.bfloat16)
    for _ in range(2):  # the second time through kept buffers
        losses = kernels.decoded_multinomial_nll(z, decoder, batch, workspace)
        grads = torch.autograd.grad(losses.sum(), params)
        assert losses.dtype is torch.float32 and all(g.dtype is torch.float32 for g in grads)
        torch.testing.assert_close(losses, expected, rtol=5e-3, atol=0.0)
        for got, want in zip(grads, expected_grads):
            assert float((got - want).norm() / want.norm()) < 1e-2  # bf16 keeps ~3 significant digits
