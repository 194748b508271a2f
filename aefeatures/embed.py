"""Stage 4: user embeddings (the bottleneck), item vectors (the decoder) and each user's
reconstruction error, computed batch by batch without gradients.

:func:`encode` embeds any interaction vectors — users of the training data or users the model
never saw — which is how held-out users are evaluated and new users embedded without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aefeatures.matrix import CSR, InteractionMatrix
from aefeatures.model import Autoencoder, multinomial_nll
from aefeatures.train import to_batch

LOGITS_PER_BATCH = 64 * 2**20  # float32 scores held at once while embedding


@dataclass(frozen=True)
class Embeddings:
    user_vectors: np.ndarray  # (n_users, dim) float32: the bottleneck (the mean for a vae)
    reconstruction_error: np.ndarray  # (n_users,) float32: multinomial NLL per unit of weight
    item_vectors: np.ndarray  # (n_items, dim) float32: decoder weights
    item_bias: np.ndarray  # (n_items,) float32: decoder bias

    @property
    def dim(self) -> int:
        return self.user_vectors.shape[1]


def batch_size_for(n_items: int) -> int:
    """Users per batch that keep one batch's dense item scores near 256 MB."""
    return max(1, min(4096, LOGITS_PER_BATCH // n_items))


@torch.no_grad()
def encode(model: Autoencoder, vectors: CSR) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, dim), reconstruction errors (n,)) of the rows of ``vectors``.

    The model is put in eval mode: no dropout, and a vae's mean instead of a sample.
    """
    model.eval()
    device = next(model.parameters()).device
    n, batch_size = vectors.n_rows, batch_size_for(model.shape.n_items)
    out = np.empty((n, model.shape.dim), dtype=np.float32)
    errors = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        batch = to_batch(vectors, rows, device)
        mean, _ = model.encode(batch)
        nll = multinomial_nll(model.decoder(mean), batch)
        weight = torch.zeros(batch.size, device=device).index_add_(0, batch.rows, batch.values)
        out[rows] = mean.float().cpu().numpy()
        errors[rows] = (nll / weight.clamp_min(1e-12)).float().cpu().numpy()
    return out, errors


def embed(model: Autoencoder, matrix: InteractionMatrix) -> Embeddings:
    """Embed every user of ``matrix`` with ``model``.

    The model's score of item j for user u equals
    ``user_vectors[u] @ item_vectors[j] + item_bias[j]``.
    """
    users, errors = encode(model, matrix.csr)
    return Embeddings(
        user_vectors=users,
        reconstruction_error=errors,
        item_vectors=model.decoder.weight.detach().float().cpu().numpy().copy(),
        item_bias=model.decoder.bias.detach().float().cpu().numpy().copy(),
    )
