"""The autoencoder: a sparse input layer, an encoder to a `dim`-wide bottleneck, and a single
linear decoder back to one score per item.

The decoder is linear on purpose: the model's score of item j for a user is then exactly
``z · W[j] + b[j]`` with ``z`` the user's bottleneck, so the user embedding, the item vectors
and the FAISS index all live in one space and exact inner-product search returns the model's
own top-k. (RecVAE made the same choice and found no loss from dropping decoder hidden layers.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class AutoencoderShape:
    n_items: int
    dim: int
    hidden: tuple[int, ...]
    kind: str  # "dae" | "vae"
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


class Autoencoder(nn.Module):
    def __init__(self, shape: AutoencoderShape):
        super().__init__()
        self.shape = shape
        code_width = shape.dim * (2 if shape.kind == "vae" else 1)  # vae: mean and log-variance
        widths = [*shape.hidden, code_width]
        self.input_layer = nn.EmbeddingBag(shape.n_items, widths[0], mode="sum")
        self.input_bias = nn.Parameter(torch.zeros(widths[0]))
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.decoder = nn.Linear(shape.dim, shape.n_items)
        for layer in [*self.encoder, self.decoder]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=0.001)
        nn.init.xavier_uniform_(self.input_layer.weight)

    def encode(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean (batch, dim), log-variance or None): the bottleneck of each user's vector."""
        # L2-normalise each user's vector, then drop entries (the denoising corruption).
        norms = torch.zeros(batch.size, device=batch.values.device).index_add_(0, batch.rows, batch.values**2)
        weights = batch.values / norms.sqrt().clamp_min(1e-12)[batch.rows]
        if self.training and self.shape.dropout > 0:
            keep = torch.rand_like(weights) >= self.shape.dropout
            weights = weights * keep / (1 - self.shape.dropout)
        h = self.input_layer(batch.indices, batch.offsets, per_sample_weights=weights) + self.input_bias
        for layer in self.encoder:
            h = layer(torch.tanh(h))
        if self.shape.kind == "vae":
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar
        return h, None

    def forward(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(item logits (batch, n_items), mean, log-variance) — sampling z when a vae trains."""
        mean, logvar = self.encode(batch)
        z = mean
        if logvar is not None and self.training:
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.decoder(z), mean, logvar


def multinomial_nll(logits: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """(batch,) negative multinomial log-likelihood of each user's observed items."""
    log_probs = F.log_softmax(logits, dim=1)
    picked = log_probs[batch.rows, batch.indices] * batch.values
    return -torch.zeros(batch.size, device=logits.device, dtype=picked.dtype).index_add_(0, batch.rows, picked)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(batch,) KL(q(z|x) || N(0, I))."""
    return -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp(), dim=1)


def save_model(model: Autoencoder, folder: Path) -> None:
    """Weights as a plain tensor dict (loadable with ``weights_only=True``) plus a JSON shape."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(model.shape), indent=2))


def load_model(folder: Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Load a saved model without executing any pickled code."""
    raw = json.loads((folder / CONFIG_FILE).read_text())
    model = Autoencoder(AutoencoderShape(**{**raw, "hidden": tuple(raw["hidden"])}))
    state = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
