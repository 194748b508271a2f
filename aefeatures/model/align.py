"""One embedding space per feature set: rotate a newly trained model onto the live version's
space before publishing, and measure what changed (drift and churn).

A model's score is ``z · w_j + b_j`` (user bottleneck z, decoder row w_j), so for any orthogonal
Q the model with ``z → z Q`` and ``w_j → w_j Q`` scores every (user, item) pair the same: the
bottleneck's coordinate system is arbitrary, and two trainings land in unrelated ones. The
orthogonal Procrustes solution (Schönemann, 1966) gives the Q that best carries the new user and
item vectors onto the live ones over the users and items both versions share; folding it into
the last encoder layer (a vae's mean half) and the decoder makes the saved model produce the
aligned vectors itself, so `aefeatures embed` of a new user lands in the same space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from aefeatures.data.matrix import InteractionMatrix
from aefeatures.model.autoencoder import Autoencoder
from aefeatures.model.embed import Embeddings, UserVectors
from aefeatures.quality import drift
from aefeatures.schema import ITEM, USER
from aefeatures.store import layout

log = logging.getLogger(__name__)

FIT_USERS = 50_000  # shared users sampled for the Procrustes fit and the cosine figures
CHURN_USERS = 1_000  # shared users whose top-k are compared
SCORES_PER_BLOCK = 1 << 24  # float32 scores held at once for the churn (64 MiB)


@dataclass(frozen=True)
class LiveVectors:
    """The live version's ids and vectors, as published."""

    version: str
    user_ids: np.ndarray  # (n_users,) sorted ids
    user_vectors: np.ndarray  # (n_users, dim) float32
    user_anomaly: np.ndarray  # (n_users,) float32
    item_ids: np.ndarray  # (n_items,) sorted ids
    item_vectors: np.ndarray  # (n_items, dim) float32
    item_bias: np.ndarray  # (n_items,) float32

    @classmethod
    def read(cls, folder: Path) -> "LiveVectors":
        """Read a published version's users and items (ids, embeddings, biases, anomaly scores)."""
        users = pl.read_parquet(folder / layout.USERS, columns=[USER, "embedding", "anomaly_score"], glob=False)
        items = pl.read_parquet(folder / layout.ITEMS, columns=[ITEM, "embedding", "bias"], glob=False)
        return cls(folder.name, users.get_column(USER).to_numpy(), _stack(users),
                   users.get_column("anomaly_score").to_numpy(), items.get_column(ITEM).to_numpy(),
                   _stack(items), items.get_column("bias").to_numpy())


def _stack(frame: pl.DataFrame) -> np.ndarray:
    return np.ascontiguousarray(frame.get_column("embedding").to_numpy(), dtype=np.float32).reshape(frame.height, -1)


def shared(new_ids: pl.Series, live_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in the new version, rows in the live one) of the ids both hold; both id arrays are
    sorted. Ids of different types (the input changed from integers to strings) share nothing."""
    new = new_ids.to_numpy()
    if len(new) == 0 or len(live_ids) == 0 or (new.dtype.kind == "O") != (live_ids.dtype.kind == "O"):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, new_rows, live_rows = np.intersect1d(new, live_ids, assume_unique=True, return_indices=True)
    return new_rows.astype(np.int64), live_rows.astype(np.int64)


def procrustes(new: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, float]:
    """(Q (dim, dim) float64 orthogonal, relative residual) minimising ‖new Q − live‖_F.

    ``new`` and ``live`` are (n, dim), row i the same entity. Q = U Vᵀ for the SVD
    U Σ Vᵀ = newᵀ live (Schönemann, 1966). The residual is ‖new Q − live‖_F / ‖live‖_F.
    """
    u, _, vt = np.linalg.svd(new.astype(np.float64).T @ live.astype(np.float64))
    q = u @ vt
    residual = float(np.linalg.norm(new @ q - live) / max(np.linalg.norm(live), 1e-12))
    return q, residual


@torch.no_grad()
def rotate(model: Autoencoder, q: np.ndarray) -> None:
    """Fold the orthogonal ``q`` (dim, dim) into ``model`` in place: its bottleneck becomes
    ``z q`` (for a vae the mean; the log-variance half is left as it is) and its decoder rows
    ``w q``, so every score ``z · w + b`` is unchanged."""
    dim = model.shape.dim
    rot = torch.as_tensor(q, dtype=model.decoder.weight.dtype, device=model.decoder.weight.device)
    if len(model.encoder):  # the last linear layer writes the bottleneck: out = x Wᵀ + b
        last = model.encoder[-1]
        last.weight[:dim] = rot.T.to(last.weight.dtype) @ last.weight[:dim]
        last.bias[:dim] = last.bias[:dim] @ rot.to(last.bias.dtype)
    else:  # no hidden layer: the input layer's sum is the bottleneck
        model.input_layer.weight[:, :dim] = model.input_layer.weight[:, :dim] @ rot
        model.input_bias[:dim] = model.input_bias[:dim] @ rot
    model.decoder.weight.copy_(model.decoder.weight @ rot)


def align_model(model: Autoencoder, matrix: InteractionMatrix, live: LiveVectors, *, seed: int) -> dict[str, Any]:
    """Rotate ``model`` onto ``live``'s space (in place) by orthogonal Procrustes over the shared
    users (at most :data:`FIT_USERS`, sampled) and all shared items; return the manifest's
    `alignment` record (Q, residuals before and after, counts). Not aligned — and said why —
    when the dims differ or fewer than ``dim`` users and items are shared."""
    record: dict[str, Any] = {"to_version": live.version, "aligned": False}
    dim = model.shape.dim
    if live.user_vectors.shape[1] != dim:
        return {**record, "reason": f"the live version has dim {live.user_vectors.shape[1]}, this one {dim}"}
    new_u, live_u = _sample(shared(matrix.user_ids, live.user_ids), FIT_USERS, seed)
    new_i, live_i = shared(matrix.item_ids, live.item_ids)
    if len(new_u) + len(new_i) < dim:
        return {**record, "reason": f"only {len(new_u)} users and {len(new_i)} items are shared"}
    a = np.concatenate([UserVectors(model, matrix.csr)[new_u],
                        model.decoder.weight.detach().float().cpu().numpy()[new_i]])
    b = np.concatenate([live.user_vectors[live_u], live.item_vectors[live_i]])
    q, residual = procrustes(a, b)
    before = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
    rotate(model, q)
    log.info("aligned to %s over %d users and %d items: residual %.3f (unaligned %.3f)",
             live.version, len(new_u), len(new_i), residual, before)
    return {**record, "aligned": True, "shared_users": int(len(new_u)), "shared_items": int(len(new_i)),
            "residual": residual, "residual_unaligned": before, "rotation": q.tolist()}


def measure_drift(emb: Embeddings, matrix: InteractionMatrix, anomaly: np.ndarray, live: LiveVectors,
                  *, seed: int, k: int = drift.CHURN_K) -> dict[str, Any]:
    """The manifest's `drift` record against ``live``: cosine quantiles of shared users' (sampled)
    and items' vectors, top-``k`` churn over :data:`CHURN_USERS` sampled shared users (the model's
    top-k over each version's whole catalogue, already-seen items included), and the change of
    shared users' anomaly-score ranks. ``anomaly`` (n_users,) is this version's scores."""
    out: dict[str, Any] = {"against": live.version}
    if live.user_vectors.shape[1] != emb.dim:
        return {**out, "reason": "the dims differ"}
    new_u, live_u = shared(matrix.user_ids, live.user_ids)
    new_i, live_i = shared(matrix.item_ids, live.item_ids)
    fit_new, fit_live = _sample((new_u, live_u), FIT_USERS, seed)
    out["user_cosine"] = drift.cosine_quantiles(live.user_vectors[fit_live], emb.user_vectors[fit_new])
    out["item_cosine"] = drift.cosine_quantiles(live.item_vectors[live_i], emb.item_vectors[new_i])
    churn_new, churn_live = _sample((new_u, live_u), CHURN_USERS, seed + 1)
    live_top, new_top = [], []
    new_item_ids, live_item_ids = matrix.item_ids.to_numpy(), live.item_ids
    block = max(1, min(256, SCORES_PER_BLOCK // max(len(live_item_ids), len(new_item_ids), 1)))
    for start in range(0, len(churn_new), block):
        stop = start + block
        live_top.append(live_item_ids[drift.top_k(live.user_vectors[churn_live[start:stop]], live.item_vectors,
                                                  live.item_bias, k)])
        new_top.append(new_item_ids[drift.top_k(emb.user_vectors[churn_new[start:stop]], emb.item_vectors,
                                                emb.item_bias, k)])
    out["churn"] = drift.churn(np.concatenate(live_top) if live_top else np.zeros((0, k)),
                               np.concatenate(new_top) if new_top else np.zeros((0, k)))
    out["anomaly_rank"] = drift.rank_change(live.user_anomaly[live_u], anomaly[new_u])
    return out


def _sample(pairs: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = pairs
    if len(a) <= n:
        return a, b
    pick = np.sort(np.random.default_rng(seed).choice(len(a), n, replace=False))
    return a[pick], b[pick]
