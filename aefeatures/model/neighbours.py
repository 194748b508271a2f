"""A dlae's sparse item–item part: what a rank-d bottleneck cannot hold, as a few neighbours an item.

A rank-d DLAE (:mod:`aefeatures.model.linear`) loses the long tail of a catalogue whose rank is
far above d: on a 13.8k-user × 18.3k-book set it scored 0.966× a tuned EASE at width 1,024. The
full-rank models that stay at or above EASE there (EASE, EDLAE; Steck 2019, 2020) are dense
item × item matrices; sparse approximations of them (SANSA, Spišák et al., RecSys 2023;
Steck's sparse MRF, 2019) keep their quality with a few neighbours an item. So a dlae may add a
sparse S to its low-rank B = P Rᵀ, fitted on the DLAE's own objective with B held fixed:

    min_S ||X - X (B + S)||² + ||Λ^½ (B + S)||²,   Λ = diag(p/(1-p) · diag(G) + λ),
    S[:, j] non-zero only on item j's neighbours N(j), j ∉ N(j)

Column j is then one small regularised least-squares problem,

    (G[N, N] + γ Λ[N, N]) s_j = E[N, j],   E = G - M B = G - (G P + Λ P) Rᵀ,   M = G + Λ,

E[:, j] being what the low-rank part leaves of item j's fit; γ = 1 is the exact optimum over
N(j), a larger γ shrinks S more (the search's grid: dlae_search.NEIGHBOUR_WEIGHTS; a fit chosen
with a small λ leaves the part too little shrinkage at γ 1). Item j's neighbours are the k
items with the largest first-order gain E[i, j]² / M[i, i]: the items that explain most of what
the bottleneck missed, not the most co-consumed ones (which B already covers). At full rank
(the width at or above the data's rank) E is 0 and S adds nothing, so it is fitted only below.
On the book set, through the default run (width 1,024, the search's (p, λ)), it lifted
NDCG@100 from 0.1051 to 0.1087 (BENCHMARKS.md, "A sparse item–item part").

A user's score for item j is ``x P · R[j] + Σ_i x_i S[i, j]``: the embedding's inner product
plus the item's neighbours among the user's items. The version stores S as
`item_neighbours.parquet` (:func:`aefeatures.schema.neighbours_schema`), and lookups and SQL add
it exactly (:mod:`aefeatures.serving.lookup`).

The dense Gram G (items² float32) is what limits it: up to :data:`MAX_ITEMS` items (4 GiB) and
:data:`MAX_ENTRIES` interactions (the cost of its sparse products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# k: neighbours an item. On the book set at γ 1 and β 0.2, 32 gave NDCG@100 0.1108 and 128 0.1118
PER_ITEM = 64
MAX_ITEMS = 32_768  # the dense Gram: 4 GiB of float32
# The Gram of a sparse X costs ~2 · nnz · items at the sparse-product rate (linear._gram): at
# 2M interactions and 18k items ~1 minute here, at the ML-20M shape (20M × 20k) over an hour.
# Above this many interactions the part is not fitted (the nightly ML-20M run stays as it was).
MAX_ENTRIES = 2_000_000
COLUMN_BLOCK = 2048  # items whose residual columns are formed and solved at a time


@dataclass
class ItemNeighbours:
    """A sparse item × item matrix S: ``weights[e]`` at (``sources[e]``, ``targets[e]``), so that
    the score of target item j for an input row x adds Σ_e x[sources[e]] · weights[e]
    · ``column_scale[j]`` over the entries with ``targets[e]`` = j.

    ``sources``, ``targets``: (nnz,) int64 item rows, sorted by (source, target); ``weights``:
    (nnz,) float32 as fitted; ``column_scale``: (n_items,) float32, the per-item scale the
    model's item vectors carry too (popularity correction and softmax temperature), 1 when
    fitted.
    """

    sources: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    n_items: int
    column_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.column_scale is None:
            self.column_scale = np.ones(self.n_items, np.float32)

    @property
    def nnz(self) -> int:
        return len(self.weights)

    @property
    def per_item(self) -> int:
        """The most neighbours any item has."""
        return int(np.bincount(self.targets, minlength=1).max()) if self.nnz else 0

    def scaled_weights(self) -> np.ndarray:
        """(nnz,) float32: the weights with their target's column scale, as published."""
        return (self.weights * self.column_scale[self.targets]).astype(np.float32)

    def transposed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sᵀ with the column scale, (n_items, n_items) sparse CSR float32 on ``device``
        (target rows): ``Sᵀ @ Xᵀ`` gives the part of the scores S adds."""
        order = np.lexsort((self.sources, self.targets))
        indptr = np.zeros(self.n_items + 1, np.int64)
        np.cumsum(np.bincount(self.targets, minlength=self.n_items), out=indptr[1:])
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(self.sources[order]),
                                       torch.from_numpy(self.scaled_weights()[order]),
                                       (self.n_items, self.n_items), check_invariants=False).to(device)

    def row_scores(self, indptr: np.ndarray, items: np.ndarray, values: np.ndarray):
        """A function (start, stop) -> (stop - start, n_items) float32 tensor: x S for rows
        start..stop of the CSR (``indptr``, ``items``, ``values``): what
        :func:`aefeatures.quality.evaluate.rank_by_scaled_embeddings` adds to u · W."""
        transposed = self.transposed()

        def scores(start: int, stop: int) -> torch.Tensor:
            dense = torch.zeros(stop - start, self.n_items)
            lo, hi = int(indptr[start]), int(indptr[stop])
            rows = torch.from_numpy(np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1])))
            dense[rows, torch.from_numpy(items[lo:hi].astype(np.int64))] = torch.from_numpy(
                np.asarray(values[lo:hi], np.float32))
            return self.scores(dense, transposed)

        return scores

    def scores(self, dense_rows: torch.Tensor, transposed: torch.Tensor | None = None) -> torch.Tensor:
        """(n, n_items) float32: x S for the rows of ``dense_rows`` (n, n_items) float32
        (``transposed``: :meth:`transposed`, when the caller keeps it across calls)."""
        st = self.transposed(dense_rows.device) if transposed is None else transposed
        return (st @ dense_rows.t()).t()


def fit(gram: torch.Tensor, p: torch.Tensor, r: torch.Tensor, lam: torch.Tensor, *,
        per_item: int = PER_ITEM, weight: float = 1.0) -> ItemNeighbours:
    """The sparse item–item part S of the module docstring for a dlae B = P Rᵀ at γ =
    ``weight``: :func:`fit_weights` with one weight."""
    return fit_weights(gram, p, r, lam, per_item=per_item, weights=(weight,))[0]


def fit_weights(gram: torch.Tensor, p: torch.Tensor, r: torch.Tensor, lam: torch.Tensor, *,
                per_item: int = PER_ITEM, weights: Sequence[float] = (1.0,)) -> list[ItemNeighbours]:
    """The sparse item–item part S of the module docstring for a dlae B = P Rᵀ, one for each γ
    of ``weights``: the neighbours (which do not depend on γ), the residual and the systems are
    formed once, and each γ costs only its solves.

    ``gram``: G = XᵀX, (n_items, n_items) float32 (dense, every rank's users summed); ``p``,
    ``r``: the fit's P and R, (n_items, d) float32; ``lam``: Λ's diagonal, (n_items,) (the
    fit's p/(1-p) · diag(G) + λ); ``per_item``: k ≥ 1; ``weights``: each γ > 0, the L2
    weight's multiplier. Each S has at most ``per_item`` neighbours an item (fewer where fewer
    items co-occur at all: a neighbour whose gain is 0 is dropped). Computed in blocks of
    :data:`COLUMN_BLOCK` items on ``gram``'s device; the systems are solved in float64.
    """
    n = gram.shape[0]
    k = max(1, min(per_item, n - 1))
    lam = lam.to(gram.device, torch.float32)
    fitted_cross = gram @ p + lam[:, None] * p  # M P: E[:, J] = G[:, J] - M P R[J]ᵀ
    diag = gram.diagonal() + lam
    sources, targets, weights_out = [], [], [[] for _ in weights]
    for start in range(0, n, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, n)
        cols = torch.arange(start, stop, device=gram.device)
        residual = gram[:, start:stop] - fitted_cross @ r[start:stop].t()  # (n, block): E[:, J]
        gain = residual.square() / diag[:, None]
        gain[cols, cols - start] = -1.0  # never its own neighbour
        top = torch.topk(gain, k, dim=0)
        keep = top.values.t() > 0  # (block, k)
        nb = top.indices.t()  # (block, k): item j's neighbours
        both = (keep[:, :, None] & keep[:, None, :]).double()
        system = gram[nb[:, :, None], nb[:, None, :]].double() * both
        # a dropped neighbour keeps a unit row so the system stays regular, with no weight
        system += torch.diag_embed((~keep).double())
        penalty = lam[nb].double() * keep.double()
        rhs = residual.t().gather(1, nb).double() * keep.double()
        for out, weight in zip(weights_out, weights):
            s = torch.linalg.solve(system + torch.diag_embed(weight * penalty), rhs).float()
            out.append(s[keep].cpu().numpy())
        sources.append(nb[keep].cpu().numpy())
        targets.append(cols[:, None].expand(-1, k)[keep].cpu().numpy())
    src, tgt = np.concatenate(sources), np.concatenate(targets)
    order = np.lexsort((tgt, src))
    return [ItemNeighbours(src[order].astype(np.int64), tgt[order].astype(np.int64),
                           np.concatenate(w)[order].astype(np.float32), n) for w in weights_out]
