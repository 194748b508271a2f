"""Stage 4: user embeddings (the bottleneck), item vectors (the decoder) and each user's
reconstruction error, computed batch by batch without gradients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aefeatures.matrix import InteractionMatrix
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


@torch.no_grad()
def embed(model: Autoencoder, matrix: InteractionMatrix, *, batch_size: int | None = None) -> Embeddings:
    """Embed every user of ``matrix`` with ``model`` (which stays in eval mode).

    The model's score of item j for user u equals
    ``user_vectors[u] @ item_vectors[j] + item_bias[j]``. ``batch_size`` defaults to what keeps
    one batch's dense item scores near 256 MB, so memory does not grow with the catalogue.
    """
    batch_size = batch_size or max(1, min(4096, LOGITS_PER_BATCH // matrix.shape[1]))
    model.eval()
    device = next(model.parameters()).device
    n_users = matrix.shape[0]
    users = np.empty((n_users, model.shape.dim), dtype=np.float32)
    errors = np.empty(n_users, dtype=np.float32)
    for start in range(0, n_users, batch_size):
        rows = np.arange(start, min(start + batch_size, n_users))
        batch = to_batch(matrix, rows, device)
        mean, _ = model.encode(batch)
        nll = multinomial_nll(model.decoder(mean), batch)
        weight = torch.zeros(batch.size, device=device).index_add_(0, batch.rows, batch.values)
        users[rows] = mean.float().cpu().numpy()
        errors[rows] = (nll / weight.clamp_min(1e-12)).float().cpu().numpy()
    return Embeddings(
        user_vectors=users,
        reconstruction_error=errors,
        item_vectors=model.decoder.weight.detach().float().cpu().numpy().copy(),
        item_bias=model.decoder.bias.detach().float().cpu().numpy().copy(),
    )
