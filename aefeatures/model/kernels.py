"""Kernels that write their large intermediates into buffers kept from batch to batch.

On a CPU a fresh (batch x items) or (items x width) tensor every step costs more than the
arithmetic done on it: buffers this large are handed back to the kernel when freed, and every
new one is page-faulted in again. At the ML-20M shape (512 users x 26,744 items, hidden 600)
the step's fresh logits, log-probabilities, their gradients and the input layer's dense
gradient made up about half of a ~200 ms step. These kernels overwrite one kept buffer per role
of a :class:`Workspace` instead, and the decoder's kernel reads its (batch x items) scores
fewer times than ``log_softmax`` and its backward do.

Each kernel's backward reads the workspace its forward wrote: a graph may use each kernel once
per backward (one training step), which is how the training step uses them. Embedding computes
the reconstruction errors with the decoder's kernel too, without gradients.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from aefeatures.model.autoencoder import SparseBatch


class Workspace:
    """One reusable buffer per role, grown when a step needs more rows than it holds.

    ``matmul_dtype`` bfloat16 runs the decoder's three (batch x items) matrix products in bf16
    (fp32 accumulation inside, as autocast does); the softmax and its gradient stay fp32.
    """

    def __init__(self, matmul_dtype: torch.dtype = torch.float32) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._lent: set[str] = set()
        self.matmul_dtype = matmul_dtype

    def take(self, role: str, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype | None = None
             ) -> torch.Tensor:
        """A (rows, cols) tensor on ``like``'s device, of ``like``'s dtype unless ``dtype`` is
        given, contents undefined."""
        dtype = dtype or like.dtype
        kept = self._buffers.get(role)
        if (kept is None or kept.shape[0] < rows or kept.shape[1] != cols
                or kept.dtype != dtype or kept.device != like.device):
            kept = self._buffers[role] = torch.empty(rows, cols, dtype=dtype, device=like.device)
        return kept[:rows]

    def lend(self, role: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """:meth:`take`, keeping no reference: returned as a parameter's gradient, autograd adopts
        the buffer as that parameter's ``.grad`` instead of copying it into a zeroed one.
        :meth:`reclaim` takes it back for the next step."""
        buffer = self.take(role, rows, cols, like)
        del self._buffers[role]
        self._lent.add(role)
        return buffer

    def reclaim(self, role: str, param: torch.Tensor) -> None:
        """Keep ``param``'s gradient (a buffer lent for ``role``) for the next :meth:`lend`, and
        clear it, so that the next backward hands a buffer over instead of accumulating."""
        if role in self._lent and param.grad is not None:
            self._buffers[role] = param.grad
            param.grad = None
        self._lent.discard(role)


def decoded_multinomial_nll(z: torch.Tensor, decoder: nn.Linear, batch: SparseBatch,
                            workspace: Workspace) -> torch.Tensor:
    """(batch,) ``multinomial_nll(decoder(z), batch)``, the same values and gradients, computed in
    one (batch x items) buffer of ``workspace``."""
    scores = workspace.take("scores", len(z), decoder.out_features, z)
    low = None  # bf16 products: the scores and their gradient pass through a bf16 buffer
    if workspace.matmul_dtype != torch.float32:
        low = workspace.take("scores_low", len(z), decoder.out_features, z, dtype=workspace.matmul_dtype)
    return _DecodedNLL.apply(z, decoder.weight, decoder.bias, batch.rows, batch.indices, batch.values, scores, low)


class _DecodedNLL(torch.autograd.Function):
    """Each user's NLL is ``total · logsumexp(s) - Σ x_j s_j`` for scores ``s = z Wᵀ + b``, and its
    gradient with respect to ``s`` is ``total · softmax(s) - x``. The forward keeps
    ``exp(s - max)`` in the buffer; the backward scales it in place into that gradient and
    multiplies it out into the gradients of z, W and b."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor,
                indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                low: torch.Tensor | None) -> torch.Tensor:
        if low is None:
            torch.addmm(bias, z, weight.t(), out=scores)
        else:
            torch.addmm(bias.to(low.dtype), z.to(low.dtype), weight.t().to(low.dtype), out=low)
            scores.copy_(low)
        observed = scores[rows, indices]  # (nnz,) the scores of each user's items
        peak = scores.amax(dim=1, keepdim=True)
        scores.sub_(peak).exp_()
        mass = scores.sum(dim=1)  # (batch,) Σ exp(s - peak)
        log_norm = mass.log() + peak.squeeze(1)
        totals = torch.zeros_like(mass).index_add_(0, rows, values)
        losses = totals * log_norm - torch.zeros_like(mass).index_add_(0, rows, values * observed)
        ctx.save_for_backward(z, weight, rows, indices, values, totals, mass)
        ctx.scores, ctx.low = scores, low
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # grad: (batch,)
        z, weight, rows, indices, values, totals, mass = ctx.saved_tensors
        scores, low = ctx.scores, ctx.low
        scores.mul_((grad * totals / mass)[:, None])  # grad · total · softmax(s)
        scores.index_put_((rows, indices), -(grad[rows] * values), accumulate=True)
        needs = ctx.needs_input_grad
        grad_bias = scores.sum(dim=0) if needs[2] else None
        if low is not None:  # the products in bf16, from a bf16 copy of the gradient
            low.copy_(scores)
            scores, weight, z = low, weight.to(low.dtype), z.to(low.dtype)
        grad_z = torch.mm(scores, weight).float() if needs[0] else None
        grad_weight = torch.mm(scores.t(), z).float() if needs[1] else None
        return grad_z, grad_weight, grad_bias, None, None, None, None, None


def dense_bag_gradient(workspace: Workspace, indices: torch.Tensor, rows: torch.Tensor, entry_weights: torch.Tensor,
                       grad: torch.Tensor, *, n_items: int) -> torch.Tensor:
    """(n_items, width) the input layer's gradient (items × users) @ ``grad`` (users, width),
    the entries (item ``indices``, user ``rows``, ``entry_weights``) transposed into a CSR matrix:
    one sparse-dense product into the workspace's kept buffer (at the ML-20M shape ~5 ms, against
    ~30 ms for ``embedding_bag``'s dense backward into a fresh tensor). The buffer is lent: it
    becomes the weight's ``.grad`` as it is, where adding it into a zeroed ``.grad`` cost ~10 ms
    a step."""
    order = torch.argsort(indices)
    starts = torch.zeros(n_items + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(indices, minlength=n_items), 0, out=starts[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        by_item = torch.sparse_csr_tensor(starts, rows[order], entry_weights[order], (n_items, len(grad)),
                                          check_invariants=False)
    weight_grad = workspace.lend("input_grad", n_items, grad.shape[1], grad)
    return torch.addmm(weight_grad, by_item, grad, beta=0, out=weight_grad)
