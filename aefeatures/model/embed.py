"""Stage 4: user embeddings (the bottleneck), item vectors (the decoder) and each user's
reconstruction error, computed batch by batch without gradients.

:func:`encode` embeds any interaction vectors — users of the training data or users the model
never saw — which is how held-out users are evaluated and new users embedded without retraining.
:func:`embed` keeps only a scalar per user in memory: the users' vectors are computed again, a
slice at a time, when they are written (the encoder is a small part of a forward pass), so
memory does not grow with the number of users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from aefeatures.data.matrix import CSR, InteractionMatrix
from aefeatures.model import kernels
from aefeatures.model.autoencoder import Autoencoder, SparseBatch
from aefeatures.model.device import to_batch

LOGITS_PER_BATCH = 64 * 2**20  # float32 scores held at once while embedding
MAX_USERS_PER_BATCH = 4096


class UserVectors:
    """The (n_users, dim) float32 embeddings of the rows of ``vectors``, computed when indexed.

    ``user_vectors[start:stop]`` or ``user_vectors[rows]`` runs the encoder on those users only,
    in eval mode (no dropout, a vae's mean), like :func:`encode`.
    """

    def __init__(self, model: Autoencoder, vectors: CSR):
        self._model, self._vectors = model, vectors

    @property
    def shape(self) -> tuple[int, int]:
        return self._vectors.n_rows, self._model.shape.dim

    def __len__(self) -> int:
        return self._vectors.n_rows

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            picked = range(len(self))[rows]
            rows = np.arange(picked.start, picked.stop, picked.step, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for where, vectors, _ in _encoded_batches(self._model, self._vectors, np.asarray(rows), errors=False):
            out[where] = vectors
        return out


@dataclass(frozen=True)
class Embeddings:
    user_vectors: np.ndarray | UserVectors  # (n_users, dim) float32: the bottleneck (the mean for a vae)
    reconstruction_error: np.ndarray  # (n_users,) float32: multinomial NLL per unit of weight
    item_vectors: np.ndarray  # (n_items, dim) float32: decoder weights
    item_bias: np.ndarray  # (n_items,) float32: decoder bias

    @property
    def dim(self) -> int:
        return self.user_vectors.shape[1]


def batch_size_for(n_items: int) -> int:
    """Users per batch that keep one batch's dense item scores near 256 MB."""
    return max(1, min(MAX_USERS_PER_BATCH, LOGITS_PER_BATCH // n_items))


def encode(model: Autoencoder, vectors: CSR) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, dim), reconstruction errors (n,)) of the rows of ``vectors``.

    The model is put in eval mode: no dropout, and a vae's mean instead of a sample.
    """
    n = vectors.n_rows
    out = np.empty((n, model.shape.dim), dtype=np.float32)
    errors = np.empty(n, dtype=np.float32)
    for where, mean, error in _encoded_batches(model, vectors, np.arange(n), errors=True):
        out[where], errors[where] = mean, error
    return out, errors


def embeddings(model: Autoencoder, vectors: CSR) -> np.ndarray:
    """(n, dim) float32 embeddings of the rows of ``vectors``, as :func:`encode` gives them,
    without the reconstruction errors (which score every item: most of encode's time)."""
    return UserVectors(model, vectors)[:]


def reconstruction_errors(model: Autoencoder, vectors: CSR) -> np.ndarray:
    """(n,) float32 reconstruction error of every row of ``vectors``, as :func:`encode` gives it."""
    errors = np.empty(vectors.n_rows, dtype=np.float32)
    for where, _, error in _encoded_batches(model, vectors, np.arange(vectors.n_rows), errors=True):
        errors[where] = error
    return errors


@torch.no_grad()
def _encoded_batches(model: Autoencoder, vectors: CSR, rows: np.ndarray, *,
                     errors: bool) -> Iterator[tuple[slice, np.ndarray, np.ndarray | None]]:
    """(positions in ``rows``, embeddings, reconstruction errors or None) a batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    # Only the reconstruction errors score every item; embeddings alone take full-size batches.
    batch_size = batch_size_for(model.shape.n_items) if errors else MAX_USERS_PER_BATCH
    workspace = kernels.Workspace()  # one (batch x items) score buffer for all batches
    for start in range(0, len(rows), batch_size):
        where = slice(start, min(start + batch_size, len(rows)))
        batch = to_batch(vectors, rows[where], device)
        mean, _ = model.encode(batch)
        error = None
        if errors:
            nll = denoised_nll(model, batch, workspace) if model.shape.kind in DENOISED_KINDS \
                else kernels.decoded_multinomial_nll(mean, model.decoder, batch, workspace)
            weight = torch.zeros(batch.size, device=device).index_add_(0, batch.rows, batch.values)
            error = (nll / weight.clamp_min(1e-12)).float().cpu().numpy()
        yield where, mean.float().cpu().numpy(), error


# Kinds whose reconstruction error is the denoising one: RecVAE weighs a user's KL term by their
# total weight, so a one-item user is almost unregularised and its plain reconstruction is near
# the identity (on the planted test data the plain error flagged none of 10 one-rare-item
# spammers; the denoising error all 10, and 26 of the 30 planted bots in the top 30).
DENOISED_KINDS = ("recvae",)
DENOISED_MASKS = 16  # input-dropout masks averaged per user


def denoised_nll(model: Autoencoder, batch: SparseBatch, workspace: kernels.Workspace | None = None) -> torch.Tensor:
    """(batch,) each user's multinomial NLL of their items reconstructed from their vector with
    entries dropped at ``model.shape.dropout``, averaged over :data:`DENOISED_MASKS` masks — the
    quantity a denoising autoencoder is trained on (Vincent et al., JMLR 2010). Entry e of a user
    is dropped in mask k where a hash of (its item, its position among the user's items, k) is
    below the rate, so a user's error never depends on the batch it is in."""
    device, workspace = batch.values.device, workspace or kernels.Workspace()
    position = torch.arange(len(batch.indices), device=device) - batch.offsets[batch.rows]
    total = torch.zeros(batch.size, device=device)
    for k in range(DENOISED_MASKS):
        keep = _uniform_hash(batch.indices, position, k) >= model.shape.dropout
        masked = SparseBatch(batch.indices, batch.offsets, batch.values * keep, batch.rows)
        mean, _ = model.encode(masked)
        total += kernels.decoded_multinomial_nll(mean, model.decoder, batch, workspace).float()
    return total / DENOISED_MASKS


def _uniform_hash(items: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) float32 in [0, 1): a fixed pseudo-random draw per (item, position, k) (a 31-bit
    multiply-xorshift mix; int64 arithmetic, so it is the same on every device)."""
    h = (items.long() * 2654435761 + position.long() * 40503 + (k + 1) * 2246822519) & 0x7FFFFFFF
    h = ((h ^ (h >> 15)) * 2246822519) & 0x7FFFFFFF
    h = ((h ^ (h >> 13)) * 3266489917) & 0x7FFFFFFF
    return (h ^ (h >> 16)).float() / float(1 << 31)


def embed(model: Autoencoder, matrix: InteractionMatrix) -> Embeddings:
    """Embed every user of ``matrix`` with ``model``.

    The reconstruction errors are computed now; the user vectors when ``user_vectors`` is
    indexed (see :class:`UserVectors`). The model's score of item j for user u equals
    ``user_vectors[u] @ item_vectors[j] + item_bias[j]``.
    """
    return Embeddings(
        user_vectors=UserVectors(model, matrix.csr),
        reconstruction_error=reconstruction_errors(model, matrix.csr),
        item_vectors=model.decoder.weight.detach().float().cpu().numpy().copy(),
        item_bias=model.decoder.bias.detach().float().cpu().numpy().copy(),
    )
