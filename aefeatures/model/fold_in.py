"""New items folded into a trained model without retraining: an item first seen after training
gets its rows (the decoder's item vector and bias, and the encoder's input row, so histories
that hold it count it) from the users who interacted with it, with the live model fixed.

dlae (:mod:`aefeatures.model.linear`): block coordinate descent on the DLAE objective
||X - X P Rᵀ||² + ||Λ^½ P Rᵀ||² over the new items' rows, every trained row fixed. With the
encoder P (items × d) fixed the objective is a ridge regression for each decoder row, whose
solution for an item with user column y is

    r = (Zᵀ Z + Pᵀ Λ P)⁻¹ Zᵀ y,   Z = X P (the users' bottlenecks on the trained items),

which for a trained item on its training data is its trained row (R = (Pᵀ M P)⁻¹ Pᵀ G, since
P = M⁻¹ G R). Its encoder row is the stationarity condition M P = G R of the item's row with
every other row fixed:

    (G_jj + Λ_jj) p = yᵀ X R (RᵀR)⁻¹ + G_jj p - yᵀ Z,   G_jj = yᵀ y,  Λ_jj = p/(1-p) G_jj + λ

(Z here includes the new rows' contributions). The two steps alternate :data:`FOLD_ROUNDS`
times from p = 0. Stopping after the first decoder step (Z without the new items' own rows)
left the folded vectors at half the scale of a retrain's on the example data; five rounds give
0.94 of it, and their user-score columns correlate 0.9996 with the retrain's.

A published dlae's item vectors are R's rows times the softmax temperature and the popularity
correction (n + 1)^-β, and its biases a tie-break rising with log(n + 1): both are read off the
trained items (log of each row's scale against log(n + 1), and the bias against log(n + 1), by
least squares) and applied to the new ones.

dae, vae, RecVAE: the encoder is not linear, so no row has a closed form. Each per-item array
(item vector, bias, input row) is regressed, over the trained items, on features of the item's
users — the mean of their bottlenecks, that mean times log(n + 1), log(n + 1) and 1 — and the
regression applied to the new items (ridge, the "feature-based fold-in" of cold-start items).

Both report ``refit_residual``: the trained items' vectors refitted the same way, against their
trained ones (relative Frobenius error): 0 for a dlae on its training data, and a measure of how
far the model's items follow from their users otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from aefeatures.data.matrix import CSR
from aefeatures.model.autoencoder import Autoencoder
from aefeatures.model.linear import csr_pair, spmm

# Fewest users (with an embedding) a new item's fit rests on; items with fewer are listed, not
# embedded. With 10% of the items hidden from training and folded in (benchmarks/fold_in.py,
# BENCHMARKS.md "New users and new items, folded in"): Last.fm's NDCG@100 was highest at 2-3
# (0.3779; 0.3772 at 1, 0.3764 at 10), MovieLens-100k's flat, and agreement with a retrain rose
# with the users (0.938 at one, 0.953 at 3-4); 3 also keeps one or two accounts from placing an item.
MIN_USERS = 3
RIDGE = 1e-6  # relative ridge of the least-squares maps (a share of their Gram's mean diagonal)
FOLD_ROUNDS = 5  # rounds of block coordinate descent on a dlae's new rows
ROWS_PER_BLOCK = 65_536  # item rows per block of the float64 sums over items


@dataclass(frozen=True)
class FoldedIn:
    """A model over the matrix's items: the trained model's rows, and fitted ones for new items."""

    model: Autoencoder  # eval mode, n_items = the matrix's columns, in its (sorted) column order
    users: np.ndarray  # (n_items,) int32: users a folded-in item rests on; 0 for trained items
    refit_residual: float  # the trained items' vectors refitted, against theirs (relative)


def fold_in_items(model: Autoencoder, csr: CSR, trained_row: np.ndarray, *, dropout: float, l2: float) -> FoldedIn:
    """Fold the matrix's new items into ``model``.

    Parameters
    ----------
    model
        The live model (any kind), on the CPU.
    csr
        (n_users, n_columns) the users' interactions, values as the model reads them (the job's
        input encoding applied). A new item rests on its users who have a trained item (the
        others have no embedding yet); ``users`` counts them, and the caller keeps only items
        with enough of them.
    trained_row
        (n_columns,) int64: each column's row in ``model``, -1 for a new item.
    dropout, l2
        The dlae's p and λ (its Λ); unused for the other kinds.

    Raises
    ------
    ValueError
        ``trained_row`` does not have one entry per column, or names a row twice.
    """
    trained_row = np.asarray(trained_row, dtype=np.int64)
    n_columns = len(trained_row)
    is_new = trained_row < 0
    known = trained_row[~is_new]
    if len(np.unique(known)) != len(known) or (len(known) and known.max() >= model.shape.n_items):
        raise ValueError("trained_row must name distinct rows of the model")
    x, xt = _columns(csr, np.where(is_new, -1, trained_row), model.shape.n_items)
    new_rows = np.full(n_columns, -1, np.int64)
    new_rows[is_new] = np.arange(int(is_new.sum()))
    y, yt = _columns(csr, new_rows, int(is_new.sum()))
    counts = _column_counts(csr, n_columns)
    counts[is_new] = _column_counts(_rows_with(csr, ~is_new), n_columns)[is_new]  # users with an embedding
    known_counts = np.zeros(model.shape.n_items, np.int64)
    known_counts[known] = counts[~is_new]
    with torch.no_grad():
        fit = _fit_dlae if model.shape.kind == "dlae" else _fit_by_features
        rows, residual = fit(model, x, xt, y, yt, known_counts, counts[is_new], dropout=dropout, l2=l2)
    out = Autoencoder(dataclasses.replace(model.shape, n_items=n_columns))
    state = model.state_dict()
    for name, new_value in rows.items():
        old = state[name]
        merged = torch.empty((n_columns, *old.shape[1:]), dtype=old.dtype)
        merged[torch.from_numpy(~is_new)] = old[torch.from_numpy(known)]
        merged[torch.from_numpy(is_new)] = new_value.to(old.dtype)
        state[name] = merged
    out.load_state_dict(state)
    users = np.where(is_new, counts, 0).astype(np.int32)
    return FoldedIn(out.eval(), users, residual)


def _fit_dlae(model: Autoencoder, x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, yt: torch.Tensor,
              known_counts: np.ndarray, new_counts: np.ndarray, *, dropout: float, l2: float
              ) -> tuple[dict[str, torch.Tensor], float]:
    # a dlae wider than its data's rank has zero columns (linear.Solver.fit): they stay zero, and
    # the d × d systems below are solved on the others
    width = model.input_layer.weight.shape[1]
    used = torch.nonzero(model.input_layer.weight.abs().sum(0) > 0).flatten()
    p = model.input_layer.weight.float()[:, used]
    z_known = spmm(x, p)  # (users, d): X P on the trained items, before the encoder's L2 normalisation
    shrink = dropout / (1 - dropout)
    omega_known = _weighted_gram(p, shrink * _squares(xt) + l2)
    r_known = (spmm(xt, z_known).double() @ torch.linalg.inv(z_known.double().T @ z_known.double()
                                                                + omega_known)).float()  # R, refitted
    xr = spmm(x, r_known)  # X R on the trained items
    g_new = _squares(yt)
    lam_new = shrink * g_new + l2
    p_new = torch.zeros(yt.shape[0], p.shape[1])
    for _ in range(FOLD_ROUNDS):  # block coordinate descent on the new rows; the first round: P fixed
        z = z_known + spmm(y, p_new)
        a = z.double().T @ z.double() + omega_known + _weighted_gram(p_new, lam_new)
        yz = spmm(yt, z)  # Yᵀ Z: each new item's users' bottlenecks, summed
        r_new = (yz.double() @ torch.linalg.inv(a)).float()
        gram_r = r_known.double().T @ r_known.double() + r_new.double().T @ r_new.double()
        target = (spmm(yt, xr + spmm(y, r_new)).double() @ torch.linalg.inv(gram_r)).float()
        p_new = (target - yz + g_new[:, None].float() * p_new) / (g_new + lam_new)[:, None].float()
    weight = model.decoder.weight.float()[:, used]
    scale = _scale_law(weight, r_known, known_counts)
    bias = _bias_law(model.decoder.bias.double(), known_counts)
    refit = r_known * scale(known_counts)[:, None]

    def full(block: torch.Tensor) -> torch.Tensor:  # back to the model's width, zero where P is
        out = torch.zeros(block.shape[0], width, dtype=block.dtype)
        out[:, used] = block
        return out

    return ({"decoder.weight": full(r_new * scale(new_counts)[:, None]), "decoder.bias": bias(new_counts),
             "input_layer.weight": full(p_new)}, _relative_error(refit, weight, known_counts))


def _fit_by_features(model: Autoencoder, x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, yt: torch.Tensor,
                     known_counts: np.ndarray, new_counts: np.ndarray, **_) -> tuple[dict[str, torch.Tensor], float]:
    from aefeatures.model.embed import embeddings  # the model's own bottlenecks, in eval mode

    crow, col, val = x.crow_indices().numpy(), x.col_indices().numpy().astype(np.int32), x.values().numpy()
    z = torch.from_numpy(embeddings(model, CSR(crow, col, val)))
    f_known = _features(spmm(xt, z), known_counts)
    f_new = _features(spmm(yt, z), new_counts)
    gram = f_known.T @ f_known
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    targets = {"decoder.weight": model.decoder.weight, "decoder.bias": model.decoder.bias[:, None],
               "input_layer.weight": model.input_layer.weight}
    maps = {name: torch.linalg.solve(gram, f_known.T @ t.double()) for name, t in targets.items()}
    rows = {name: (f_new @ m).float() for name, m in maps.items()}
    rows["decoder.bias"] = rows["decoder.bias"][:, 0]
    refit = (f_known @ maps["decoder.weight"]).float()
    return rows, _relative_error(refit, model.decoder.weight.float(), known_counts)


def _features(user_sums: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """(items, 2 d + 2) float64: the mean bottleneck of each item's users, it times log(n + 1),
    log(n + 1) and 1."""
    logn = torch.from_numpy(np.log1p(counts.astype(np.float64)))[:, None]
    mean = user_sums.double() / torch.from_numpy(np.maximum(counts, 1).astype(np.float64))[:, None]
    return torch.cat([mean, mean * logn, logn, torch.ones_like(logn)], dim=1)


def _scale_law(weight: torch.Tensor, refit: torch.Tensor, counts: np.ndarray):
    """log of each trained item's scale (its vector against its refitted unscaled one, by least
    squares) fitted as a + b log(n + 1): the temperature and the popularity correction."""
    dot = (weight.double() * refit.double()).sum(1).numpy()
    norm = (refit.double() ** 2).sum(1).numpy()
    ok = (counts > 0) & (norm > 0) & (dot > 0)
    logn = np.log1p(counts.astype(np.float64))
    if ok.sum() < 2:
        return lambda n: torch.ones(len(n))
    design = np.stack([np.ones(int(ok.sum())), logn[ok]], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.log(dot[ok] / norm[ok]), rcond=None)
    return lambda n: torch.from_numpy(np.exp(a + b * np.log1p(np.asarray(n, np.float64)))).float()


def _bias_law(bias: torch.Tensor, counts: np.ndarray):
    """The trained items' bias fitted as a + b log(n + 1) (a dlae's popularity tie-break)."""
    logn = np.log1p(counts.astype(np.float64))
    design = np.stack([np.ones(len(logn)), logn], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, bias.numpy(), rcond=None)
    return lambda n: torch.from_numpy(a + b * np.log1p(np.asarray(n, np.float64))).float()


def _relative_error(refit: torch.Tensor, trained: torch.Tensor, counts: np.ndarray) -> float:
    """||refit - trained|| / ||trained|| over the trained items with users in this data."""
    seen = torch.from_numpy(counts > 0)
    den = float(torch.linalg.norm(trained[seen].double()))
    return float(torch.linalg.norm((refit - trained)[seen].double())) / den if den > 0 else 0.0


def _squares(xt: torch.Tensor) -> torch.Tensor:
    """(columns,) float64: each column's sum of squared values (the Gram's diagonal)."""
    crow = xt.crow_indices()
    lengths = (crow[1:] - crow[:-1])
    owner = torch.repeat_interleave(torch.arange(xt.shape[0]), lengths)
    return torch.zeros(xt.shape[0], dtype=torch.float64).index_add_(0, owner, xt.values().double() ** 2)


def _weighted_gram(p: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pᵀ diag(weights) P (d × d, float64), a block of item rows at a time."""
    out = torch.zeros(p.shape[1], p.shape[1], dtype=torch.float64)
    for start in range(0, p.shape[0], ROWS_PER_BLOCK):
        block = p[start:start + ROWS_PER_BLOCK].double()
        out += block.T @ (block * weights[start:start + ROWS_PER_BLOCK, None])
    return out


def _rows_with(csr: CSR, columns: np.ndarray) -> CSR:
    """The rows of ``csr`` with an entry in one of ``columns`` (bool over columns); others empty."""
    owner = np.repeat(np.arange(csr.n_rows), np.diff(csr.indptr))
    has = np.zeros(csr.n_rows, bool)
    has[owner[columns[csr.indices]]] = True
    keep = has[owner]
    indptr = np.zeros(csr.n_rows + 1, np.int64)
    np.cumsum(np.bincount(owner[keep], minlength=csr.n_rows), out=indptr[1:])
    return CSR(indptr, csr.indices[keep], csr.values[keep])


def _column_counts(csr: CSR, n_columns: int) -> np.ndarray:
    """(n_columns,) int64 users per column."""
    return np.bincount(csr.indices, minlength=n_columns).astype(np.int64)


def _columns(csr: CSR, target: np.ndarray, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``csr`` whose column has a ``target`` row (>= 0), as (users × n_targets)
    and its transpose, sparse CSR float32: column c becomes column ``target[c]``."""
    moved = target[csr.indices]
    keep = moved >= 0
    owner = np.repeat(np.arange(csr.n_rows), np.diff(csr.indptr))[keep]
    lengths = np.bincount(owner, minlength=csr.n_rows)
    offsets = np.zeros(csr.n_rows, np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    items, values = moved[keep], csr.values[keep]
    order = np.lexsort((items, owner))  # by user, then item
    return csr_pair(offsets, items[order].astype(np.int64), values[order], csr.n_rows, n_targets,
                    torch.device("cpu"))
