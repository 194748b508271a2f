"""The autoencoder: a sparse input layer, an encoder to a `dim`-wide bottleneck, and a single
linear decoder back to one score per item.

The decoder is linear on purpose: the model's score of item j for a user is then exactly
``z · W[j] + b[j]`` with ``z`` the user's bottleneck, so the user embedding, the item vectors
and the FAISS index all live in one space and exact inner-product search returns the model's
own top-k. (RecVAE made the same choice and found no loss from dropping decoder hidden layers.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aefeatures.model import kernels
from aefeatures.model.neighbours import ItemNeighbours
from aefeatures.store.encoder import ENCODER_DIR, write_encoder

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class AutoencoderShape:
    n_items: int
    dim: int
    hidden: tuple[int, ...]
    # "dae" | "vae" | "dlae" (no hidden layer, fitted in closed form: aefeatures.model.linear) |
    # "recvae" (RecVAE's encoder: 5 dense-residual layers of width hidden[0], see Autoencoder)
    kind: str
    dropout: float


@dataclass
class SparseBatch:
    """A batch of users as the CSR slice the model reads (all tensors on the model's device)."""

    indices: torch.Tensor  # (nnz,) int64 item rows
    offsets: torch.Tensor  # (batch,) int64 start of each user in `indices`
    values: torch.Tensor  # (nnz,) float32 interaction weights
    rows: torch.Tensor  # (nnz,) int64 position of each entry's user in the batch

    @property
    def size(self) -> int:
        return len(self.offsets)


@dataclass
class Noise:
    """The random draws of one training batch, made by the caller from its seeded generator."""

    uniform: torch.Tensor  # (nnz,) in [0, 1): an entry is dropped where it is below the dropout rate
    normal: torch.Tensor  # (batch, dim) standard normal: the vae's reparameterisation noise

    @classmethod
    def draw(cls, batch: "SparseBatch", dim: int, generator: torch.Generator) -> "Noise":
        """The draws for ``batch`` and a ``dim``-wide bottleneck, from ``generator`` (on its device)."""
        device = generator.device
        return cls(torch.rand(len(batch.indices), generator=generator, device=device),
                   torch.randn(batch.size, dim, generator=generator, device=device))


RECVAE_LAYERS = 5  # RecVAE's encoder depth (Shenbin et al. 2020)
RECVAE_LAYER_NORM_EPS = 0.1  # as in the authors' code


class Autoencoder(nn.Module):
    """The encoder of ``shape.kind`` and one linear decoder (``decoder``: dim → n_items).

    dae, vae, dlae: the input layer then ``shape.hidden`` tanh layers to the bottleneck (a vae's
    last layer writes mean and log-variance). recvae (RecVAE, Shenbin, Alekseev, Tutubalina,
    Nikolenko, WSDM 2020): the input layer is fc1, then fc2..fc5 of width H = ``hidden[0]`` with
    dense residual connections, swish and LayerNorm(eps 0.1) — h1 = ln1(swish(fc1(x))),
    hk = ln_k(swish(fc_k(h_{k-1}) + h1 + ... + h_{k-1})) — and one layer writing the mean and
    log-variance (the paper's fc_mu and fc_logvar, side by side). Its composite prior's old
    encoder is training state only (:mod:`aefeatures.model.recvae`), not part of the model.
    """

    def __init__(self, shape: AutoencoderShape, device: str | torch.device = "cpu"):
        """The layers are made on ``device`` and initialised there: made on the CPU and moved, a
        1M-item model took ~9 s of CPU time before a GPU run could start. The input layer skips
        torch's default initialisation, which the one below overwrites (600M normal draws at 1M
        items); ``torch.nn.utils.skip_init`` would skip the linear layers' too, but its first use
        imports ~0.4 s of symbolic-shape machinery."""
        super().__init__()
        self.shape = shape
        code_width = shape.dim * (2 if shape.kind in ("vae", "recvae") else 1)  # mean and log-variance
        widths = [*shape.hidden, code_width]
        if shape.kind == "recvae":  # fc2..fc5 (H → H), then mean and log-variance (H → 2 dim)
            widths = [*shape.hidden * RECVAE_LAYERS, code_width]
        self.input_layer = nn.EmbeddingBag(shape.n_items, widths[0], mode="sum",
                                           _weight=torch.empty(shape.n_items, widths[0], device=device))
        self.input_bias = nn.Parameter(torch.zeros(widths[0], device=device))
        self.encoder = nn.ModuleList(nn.Linear(a, b, device=device) for a, b in zip(widths[:-1], widths[1:]))
        self.decoder = nn.Linear(shape.dim, shape.n_items, device=device)
        # recvae: ln1..ln5 (no parameters for the other kinds, so their saved weights are unchanged)
        self.norms = nn.ModuleList(nn.LayerNorm(widths[0], eps=RECVAE_LAYER_NORM_EPS, device=device)
                                   for _ in range(RECVAE_LAYERS if shape.kind == "recvae" else 0))
        # Set by training on a CPU: the input layer's gradient is then written into a kept buffer.
        self.workspace: kernels.Workspace | None = None
        # A dlae's sparse item-item part (aefeatures.model.neighbours), its scores added to the
        # decoder's; not a parameter: the version stores it as item_neighbours.parquet.
        self.neighbours: ItemNeighbours | None = None
        for layer in [*self.encoder, self.decoder]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=0.001)
        nn.init.xavier_uniform_(self.input_layer.weight)

    def encode(self, batch: SparseBatch, noise: Noise | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean (batch, dim), log-variance or None): the bottleneck of each user's vector."""
        # L2-normalise each user's vector, then drop entries (the denoising corruption).
        norms = torch.zeros(batch.size, device=batch.values.device).index_add_(0, batch.rows, batch.values**2)
        weights = batch.values / norms.sqrt().clamp_min(1e-12)[batch.rows]
        if self.training and self.shape.dropout > 0:
            uniform = torch.rand_like(weights) if noise is None else noise.uniform
            keep = uniform >= self.shape.dropout
            weights = weights * keep / (1 - self.shape.dropout)
        if self.input_layer.sparse or (self.workspace is not None and self.training and torch.is_grad_enabled()):
            # training: the same sum, with a sparse gradient or a dense one into a kept buffer
            h = _BagSum.apply(self.input_layer.weight, batch.indices, batch.offsets, batch.rows, weights,
                              None if self.input_layer.sparse else self.workspace)
        else:
            h = self.input_layer(batch.indices, batch.offsets, per_sample_weights=weights)
        h = h + self.input_bias
        if self.shape.kind == "recvae":
            return self._dense_residual(h)
        for layer in self.encoder:
            h = layer(torch.tanh(h))
        if self.shape.kind == "vae":
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar
        return h, None

    def _dense_residual(self, fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RecVAE's layers after fc1 (batch, H): (mean, log-variance), each (batch, dim)."""
        h = self.norms[0](F.silu(fc1))  # silu is swish: x · sigmoid(x)
        earlier = h  # h1 + ... + h_{k-1}
        for layer, norm in zip(self.encoder[:-1], self.norms[1:]):
            h = norm(F.silu(layer(h) + earlier))
            earlier = earlier + h
        mean, logvar = self.encoder[-1](h).chunk(2, dim=1)
        return mean, logvar

    def forward(self, batch: SparseBatch, noise: Noise | None = None, *, decode: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(item logits (batch, n_items), mean, log-variance) — sampling z when a vae trains.

        ``decode=False`` returns z (batch, dim) in place of the logits, for losses that score
        only some items (a sampled softmax).
        """
        mean, logvar = self.encode(batch, noise)
        z = mean
        if logvar is not None and self.training:
            normal = torch.randn_like(mean) if noise is None else noise.normal
            z = mean + normal * torch.exp(0.5 * logvar)
        return (self.decoder(z) if decode else z), mean, logvar


class _BagSum(torch.autograd.Function):
    """The input layer's weighted sum of each user's item rows (``embedding_bag``, mode sum),
    whose gradient is (items × users) @ grad, the batch transposed. The per-entry weights get
    no gradient.

    Without a ``workspace`` the gradient is sparse, one row per item that a nonzero weight
    read: on 2 CPU cores ~10x faster than embedding_bag's own sparse backward, whose one row per
    entry (nnz × width) must then be summed into rows (750k items, batch 512: 11 vs 110 ms).
    With one it is dense, written into the workspace's kept buffer
    (:func:`aefeatures.model.kernels.dense_bag_gradient`).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                entry_weights: torch.Tensor, workspace: kernels.Workspace | None = None) -> torch.Tensor:
        keep = entry_weights != 0  # entries the dropout removed read nothing
        ctx.save_for_backward(indices[keep], rows[keep], entry_weights[keep])
        ctx.shape, ctx.workspace = (weight.shape, len(offsets)), workspace
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=entry_weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # grad: (batch, width)
        indices, rows, entry_weights = ctx.saved_tensors
        weight_shape, n_users = ctx.shape
        grad = grad.to(entry_weights.dtype)
        if ctx.workspace is not None:
            return kernels.dense_bag_gradient(ctx.workspace, indices, rows, entry_weights, grad,
                                            n_items=weight_shape[0]), None, None, None, None, None
        items, position = torch.unique(indices, return_inverse=True)  # sorted: a coalesced gradient
        by_item = torch.sparse_coo_tensor(torch.stack([position, rows]), entry_weights, (len(items), n_users),
                                          check_invariants=False)
        values = torch.sparse.mm(by_item, grad)  # (items read, width)
        weight_grad = torch.sparse_coo_tensor(items[None], values, weight_shape, is_coalesced=True,
                                              check_invariants=False)
        return weight_grad, None, None, None, None, None


def multinomial_nll(logits: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """(batch,) negative multinomial log-likelihood of each user's observed items (in float32
    even for bf16 logits: CPU autocast would keep the log-softmax over the catalogue in bf16)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    picked = log_probs[batch.rows, batch.indices] * batch.values
    return -torch.zeros(batch.size, device=logits.device, dtype=picked.dtype).index_add_(0, batch.rows, picked)


def sampled_multinomial_nll(z: torch.Tensor, decoder: nn.Linear, batch: SparseBatch,
                            negatives: torch.Tensor, log_q: torch.Tensor, *,
                            sparse_grad: bool = False) -> torch.Tensor:
    """(batch,) multinomial NLL with the softmax normaliser estimated from shared samples.

    ``negatives`` (k,) are items drawn for the whole batch with probabilities ``exp(log_q)``
    (k,). Each user's log-normaliser is a log-sum-exp over their own observed items and the
    negatives with the logQ correction ``logit - log(k q)``, so no (batch, n_items) logits are
    ever formed. A negative that is one of the user's own items (an accidental hit) is left out
    of that user's sum: the negatives then estimate the sum over the items the user did not
    show, and the observed items add theirs exactly, instead of being counted twice. With
    ``sparse_grad`` the decoder's weight and bias get sparse gradients holding only the rows read.
    """
    def weights(items: torch.Tensor) -> torch.Tensor:  # (len(items), dim)
        return F.embedding(items, decoder.weight, sparse=sparse_grad)

    def biases(items: torch.Tensor) -> torch.Tensor:  # (len(items),)
        return torch.gather(decoder.bias, 0, items, sparse_grad=sparse_grad)

    pos = (z[batch.rows] * weights(batch.indices)).sum(dim=1) + biases(batch.indices)  # (nnz,)
    neg = z @ weights(negatives).T + biases(negatives)  # (batch, k)
    pos, neg = pos.float(), neg.float() - (log_q + math.log(len(negatives)))
    neg = neg.masked_fill(_accidental_hits(batch, negatives, n_items=decoder.out_features), -torch.inf)
    peak = torch.maximum(neg.detach().amax(dim=1), torch.full_like(neg[:, 0], -torch.inf).scatter_reduce(
        0, batch.rows, pos.detach(), "amax"))  # (batch,) for a stable exp
    mass = torch.exp(neg - peak[:, None]).sum(dim=1).index_add(0, batch.rows, torch.exp(pos - peak[batch.rows]))
    log_norm = peak + torch.log(mass)  # (batch,)
    return torch.zeros_like(log_norm).index_add(0, batch.rows, batch.values * (log_norm[batch.rows] - pos))


def _accidental_hits(batch: SparseBatch, negatives: torch.Tensor, *, n_items: int) -> torch.Tensor:
    """(batch, k) bool: True where negative j is one of user u's observed items."""
    return _hits_by_pairs(batch, negatives, n_items) if negatives.is_cuda else _hits_by_entries(batch, negatives)


def _hits_by_pairs(batch: SparseBatch, negatives: torch.Tensor, n_items: int) -> torch.Tensor:
    """One binary search per (user, negative) pair among the batch's (row, item) keys, which
    are sorted as the entries are in CSR order: no sync with the host."""
    keys = batch.rows * n_items + batch.indices  # (nnz,) ascending
    asked = torch.arange(batch.size, device=keys.device)[:, None] * n_items + negatives[None, :]
    found = torch.searchsorted(keys, asked).clamp_max(max(len(keys) - 1, 0))
    return keys[found] == asked if len(keys) else torch.zeros_like(asked, dtype=torch.bool)


def _hits_by_entries(batch: SparseBatch, negatives: torch.Tensor) -> torch.Tensor:
    """One binary search per entry among the sorted negatives (on a CPU ~20x cheaper than one
    per pair); each entry marks every copy of its item (negatives are drawn with replacement)."""
    order = torch.argsort(negatives)
    drawn = negatives[order]
    first = torch.searchsorted(drawn, batch.indices)
    copies = torch.searchsorted(drawn, batch.indices, right=True) - first  # (nnz,) mostly 0
    entry = torch.repeat_interleave(copies)
    nth = torch.arange(len(entry), device=entry.device) - torch.repeat_interleave(torch.cumsum(copies, 0) - copies,
                                                                                   copies)
    hits = torch.zeros(batch.size, len(negatives), dtype=torch.bool, device=negatives.device)
    hits[batch.rows[entry], order[first[entry] + nth]] = True
    return hits


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(batch,) KL(q(z|x) || N(0, I))."""
    return -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp(), dim=1)


def save_model(model: Autoencoder, folder: Path) -> None:
    """Weights as a plain tensor dict (loadable with ``weights_only=True``) plus a JSON shape,
    and the encoder as numpy arrays for the read side (:mod:`aefeatures.store.encoder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(model.shape), indent=2))
    write_encoder(folder / ENCODER_DIR, kind=model.shape.kind, dim=model.shape.dim, arrays=encoder_arrays(model))


def encoder_arrays(model: Autoencoder) -> dict[str, np.ndarray]:
    """The encoder's parameters as float32 numpy arrays, named as :func:`write_encoder` reads them."""
    def plain(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    arrays = {"input.weight": plain(model.input_layer.weight), "input.bias": plain(model.input_bias)}
    for k, layer in enumerate(model.encoder):
        arrays[f"layer.{k}.weight"], arrays[f"layer.{k}.bias"] = plain(layer.weight), plain(layer.bias)
    for k, norm in enumerate(model.norms):
        arrays[f"norm.{k}.weight"], arrays[f"norm.{k}.bias"] = plain(norm.weight), plain(norm.bias)
    return arrays


def load_model(folder: Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Load a saved model without executing any pickled code."""
    raw = json.loads((folder / CONFIG_FILE).read_text())
    model = Autoencoder(AutoencoderShape(**{**raw, "hidden": tuple(raw["hidden"])}), device=device)
    state = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
