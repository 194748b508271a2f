"""A low-rank linear autoencoder in closed form: the rank-`dim` denoising linear autoencoder
(DLAE) of Steck, "Autoencoders that don't overfit towards the Identity", NeurIPS 2020.

DLAE minimises the expected loss of reconstructing X from a copy with each entry dropped with
probability p, which is a weighted L2 penalty:

    min_B ||X - X B||² + ||Λ^½ B||²,   Λ = diag(p/(1-p) · diag(XᵀX) + λ),   rank(B) ≤ d

The full-rank optimum is B = (XᵀX + Λ)⁻¹ XᵀX; the rank-d optimum is B = P Rᵀ with P, R
(items × d) from one eigendecomposition, computed here on the smaller side (Y = X Λ^-½):

    Ĝ = YᵀY = W diag(e) Wᵀ,   Z = diag(e / √(e+1)) Wᵀ Λ^½   (r × items),   Z = Q S Rᵀ (top d)
    P = Λ^-½ W diag(1/√(e+1)) Q S,   R = Zᵀ Q S⁻¹   (orthonormal columns)

Why: with G = XᵀX and M = G + Λ = L Lᵀ, L = Λ^½ (Ĝ + I)^½, the objective is ||LᵀB - L⁻¹G||²
plus a constant, so the rank-d optimum is B = L⁻ᵀ [L⁻¹G]_d (Eckart–Young), and
L⁻¹G = (Ĝ + I)^-½ Ĝ Λ^½ = W Z, whose truncated SVD is W Q_d S_d R_dᵀ (W has orthonormal columns).

In the product's terms: the user embedding is the bottleneck x P (d wide), the item vectors are
R's rows and the score of item j is exactly x P · R[j], so the FAISS inner-product index returns
the model's own top-k, and any new user is embedded by one product. The model is an
:class:`~aefeatures.model.autoencoder.Autoencoder` with no hidden layer: input layer P, decoder
weight R scaled by a temperature (below), zero biases. (The autoencoder reads each user's x
L2-normalised, as for every kind: that scales a user's scores and changes none of their ranking.)

Above :data:`EXACT_MAX_SIDE` users and items, Ĝ's top eigenpairs come from a randomized SVD of
the sparse Y in float32 (Halko et al. 2011, ``torch.svd_lowrank``) with ``OVERSAMPLE × d``
components; the rest is float64.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from aefeatures.data.matrix import CSR

EXACT_MAX_SIDE = 4000  # users or items: below this on either side, the dense eigendecomposition
MAX_DENSE_ENTRIES = 150_000_000  # float64 (users × items) for the exact path: 1.2 GB
# randomized path: components of Ĝ per bottleneck unit. On Last.fm at dim 256, 2 × 256 gave
# NDCG@100 0.3703 and 4 × 256 0.3698 against 0.3705 for the exact factors, 2 at a quarter of the
# cost (the QR steps are O(rows × components²)).
OVERSAMPLE = 2
TEMPERATURES = tuple(2.0 ** k for k in range(0, 16))
MAX_BYTES = 6 << 30  # float64 working memory the fit may take; above it `fits` says no


def working_bytes(n_users: int, n_items: int, dim: int) -> int:
    """Float64 bytes a fit of ``dim`` takes, roughly: the randomized path's dense (users + items)
    × components blocks (a few copies) and Z (components × items); the exact path is bounded
    by :data:`MAX_DENSE_ENTRIES` and the smaller side's square."""
    if min(n_users, n_items) <= EXACT_MAX_SIDE and n_users * n_items <= MAX_DENSE_ENTRIES:
        return 8 * (2 * n_users * n_items + 2 * min(n_users, n_items) ** 2)
    q = min(OVERSAMPLE * dim, n_users, n_items)
    return 8 * q * (3 * n_items + 2 * n_users)  # float64 bounds the float32 SVD's blocks


def fits(n_users: int, n_items: int, dim: int) -> bool:
    """Whether a dlae of ``dim`` on this many users and items stays within :data:`MAX_BYTES`."""
    return working_bytes(n_users, n_items, dim) <= MAX_BYTES


def _y(csr: CSR, rows: np.ndarray, n_items: int, lam: np.ndarray) -> torch.Tensor:
    """Sparse (len(rows), n_items) float64 Y = X Λ^-½ of the rows ``rows``."""
    offsets, items, values = csr.gather(rows)
    lengths = np.diff(np.append(offsets, len(items)))
    index = torch.from_numpy(np.stack([np.repeat(np.arange(len(rows)), lengths), items.astype(np.int64)]))
    vals = torch.from_numpy(values.astype(np.float64) / np.sqrt(lam[items]))
    return torch.sparse_coo_tensor(index, vals, (len(rows), n_items), check_invariants=False).coalesce()


def dlae_factors(csr: CSR, rows: np.ndarray, n_items: int, *, dim: int, dropout: float, l2: float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(P, R), each (n_items, dim) float32: the rank-``dim`` DLAE of the users at ``rows``.

    ``dropout`` is p in [0, 1) and ``l2`` is λ > 0 (Steck 2020's notation). When the data's
    rank is below ``dim`` the last columns are zero. Float64 throughout the decomposition.
    """
    offsets, items, values = csr.gather(rows)
    colsq = np.bincount(items, weights=values.astype(np.float64) ** 2, minlength=n_items)
    lam = dropout / (1.0 - dropout) * colsq + l2  # (n_items,)
    y = _y(csr, rows, n_items, lam)
    n = len(rows)
    if min(n, n_items) <= EXACT_MAX_SIDE and n * n_items <= MAX_DENSE_ENTRIES:
        dense = y.to_dense()
        if n <= n_items:  # eig of Y Yᵀ (users × users), W = Yᵀ U e^-½
            e, u = torch.linalg.eigh(dense @ dense.T)
            keep = e > 1e-9 * e.max().clamp_min(1e-300)
            e, u = e[keep], u[:, keep]
            w = (dense.T @ u) / e.sqrt()
        else:
            e, w = torch.linalg.eigh(dense.T @ dense)
            keep = e > 1e-9 * e.max().clamp_min(1e-300)
            e, w = e[keep], w[:, keep]
    else:
        torch.manual_seed(seed)
        q = min(OVERSAMPLE * dim, n, n_items)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": its products are what we use
            warnings.simplefilter("ignore", UserWarning)
            # float32: half the time and memory; CSR: its products took half the COO's time
            # (ML-20M shape at scale 0.05, q 512: 13.1 against 26.4 s on 2 cores)
            _, s, v = torch.svd_lowrank(y.float().to_sparse_csr(), q=q, niter=4)
        e, w = s.double() ** 2, v.double()
        keep = e > 1e-9 * e.max().clamp_min(1e-300)
        e, w = e[keep], w[:, keep]
    root = torch.from_numpy(np.sqrt(lam))
    z = ((e / (e + 1).sqrt())[:, None] * w.T) * root[None, :]  # (r, n_items)
    s2, qv = torch.linalg.eigh(z @ z.T)
    order = torch.argsort(s2, descending=True)[:dim]
    s, qv = s2[order].clamp_min(1e-300).sqrt(), qv[:, order]
    r = (z.T @ qv) / s
    p = (w / root[:, None]) @ ((qv * s) / (e + 1).sqrt()[:, None])
    out_p, out_r = np.zeros((n_items, dim), np.float32), np.zeros((n_items, dim), np.float32)
    out_p[:, : p.shape[1]], out_r[:, : r.shape[1]] = p.numpy(), r.numpy()
    return out_p, out_r


def best_temperature(user_vectors: torch.Tensor, item_vectors: torch.Tensor, batch_items: torch.Tensor,
                     batch_rows: torch.Tensor, batch_values: torch.Tensor) -> float:
    """The scale t of the item vectors that minimises the mean multinomial NLL of the users'
    items under softmax(t · z Rᵀ): rankings do not depend on it, but the reconstruction error
    (and so the anomaly scores) does; a linear model's raw scores make a near-uniform softmax.

    ``user_vectors`` (n, d), ``item_vectors`` (n_items, d); the users' items as (nnz,) item
    rows, user positions and weights. Searched on a grid of powers of 2.
    """
    logits = user_vectors.double() @ item_vectors.double().T  # (n, n_items)
    best, best_nll = 1.0, math.inf
    for t in TEMPERATURES:
        log_probs = torch.log_softmax(t * logits, dim=1)
        nll = -(log_probs[batch_rows, batch_items] * batch_values).sum().item()
        if nll < best_nll:
            best, best_nll = t, nll
    return best
