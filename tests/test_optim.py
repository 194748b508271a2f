"""LazyAdam: torch's SparseAdam arithmetic, rows outside a step's gradient untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aefeatures.model.optim import LazyAdam


def _sparse_loss(weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A loss that reads ``rows`` (with repeats) of a 2-D weight and a 1-D bias, through sparse gradients."""
    picked = F.embedding(rows, weight, sparse=True)
    return ((picked * x).sum(dim=1) ** 2 + torch.gather(bias, 0, rows, sparse_grad=True)).sum()


def test_lazy_adam_takes_the_steps_of_torchs_sparse_adam():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(50))]
    torchs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = [LazyAdam(ours, lr=0.01), torch.optim.SparseAdam(torchs, lr=0.01)]
    for _ in range(20):
        rows, x = torch.randint(0, 50, (30,)), torch.randn(30, 8)  # repeated rows: an uncoalesced gradient
        for (weight, bias), optimizer in zip([ours, torchs], optimizers):
            optimizer.zero_grad(set_to_none=True)
            _sparse_loss(weight, bias, rows, x).backward()
            optimizer.step()
    for mine, theirs in zip(ours, torchs):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_rows_outside_the_gradient_keep_their_value_and_moments():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(20, 4)), torch.nn.Parameter(torch.randn(20))
    optimizer = LazyAdam([weight, bias], lr=0.1)
    _sparse_loss(weight, bias, torch.arange(10), torch.randn(10, 4)).backward()
    optimizer.step()
    before = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    optimizer.zero_grad()
    _sparse_loss(weight, bias, torch.tensor([0, 1, 1]), torch.randn(3, 4)).backward()
    optimizer.step()
    assert torch.equal(weight[2:], before[0][2:]) and torch.equal(optimizer.state[weight]["exp_avg"][2:], before[1][2:])
    assert not torch.equal(weight[:2], before[0][:2])
