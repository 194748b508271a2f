"""Held-out evaluation: the splits, full-ranking metrics, and the popularity baseline.

Two protocols. In both, each validation user hides a random ``holdout`` share of their items;
the model reads the rest (the fold-in part) and ranks every item it has not seen, and metrics
compare that ranking with the hidden items.

- Held-out items (:func:`split_items`, weak generalisation, the protocol most recommender
  papers and the EASE baselines report): every user with 2 or more items validates, and the
  model is fitted on every user's shown items (:func:`without_hidden`). It measures what a
  nightly run publishes: recommendations for users who are in its fit.
- Held-out users (:func:`split_users`, strong generalisation, Liang et al. 2018): a share of
  users is left out of training entirely and embedded from their shown items, as any new user
  is. It measures what the product does for users it never trained on.

The popularity baseline breaks ties by item row (lower first); the model's rankings come from
torch's top-k, which orders equal scores the same way every run on a machine. Metrics are
deterministic either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from aefeatures.data.matrix import CSR
from aefeatures.schema import KS

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class Split:
    """Which users train and which validate, and what validation users show and hide."""

    train_rows: np.ndarray  # (n_train,) user rows the model trains on
    valid_rows: np.ndarray  # (n_valid,) user rows that validate (out of train_rows with held-out users)
    fold_in: CSR  # (n_valid rows) the items each validation user shows: what the model reads
    held_out: tuple[np.ndarray, np.ndarray]  # CSR of the hidden items to rank


def split_users(indptr: np.ndarray, indices: np.ndarray, *, share: float, max_users: int,
                holdout: float, seed: int, min_users: int = 0) -> Split:
    """Hold out ``share`` of the users (at most ``max_users``) that have at least 2 items.

    With ``share > 0``, at least ``min_users`` are held out when there are enough, but never
    more than half of all users: on small data a 10% share is too few users to decide on.

    Parameters
    ----------
    indptr, indices
        The user × item CSR, shape (n_users, n_items).
    """
    rng = np.random.default_rng(seed)
    lengths = np.diff(indptr)
    eligible = np.flatnonzero(lengths >= 2)
    n_valid = int(round(share * len(indptr[:-1])))
    if share > 0:
        n_valid = max(n_valid, min(min_users, len(lengths) // 2))
    n_valid = min(n_valid, max_users, len(eligible))
    valid = np.sort(rng.choice(eligible, n_valid, replace=False)) if n_valid else np.array([], np.int64)
    return _hiding(indptr, indices, valid, holdout, rng)


def split_items(indptr: np.ndarray, indices: np.ndarray, *, max_users: int, holdout: float, seed: int) -> Split:
    """The held-out-items split: every user with at least 2 items (at most ``max_users`` of
    them, drawn at random) hides ``holdout`` of their items, and every user trains
    (``train_rows`` is every row): a model fits :func:`without_hidden` of the matrix.

    Parameters
    ----------
    indptr, indices
        The user × item CSR, shape (n_users, n_items).
    """
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(np.diff(indptr) >= 2)
    valid = np.sort(rng.choice(eligible, min(max_users, len(eligible)), replace=False))
    return dataclasses.replace(_hiding(indptr, indices, valid, holdout, rng), train_rows=np.arange(len(indptr) - 1))


def split_folds(indptr: np.ndarray, indices: np.ndarray, *, folds: int, holdout: float, seed: int) -> list[Split]:
    """``folds`` splits (k-fold cross-validation over users): the users with at least 2 items
    dealt at random into ``folds`` groups of sizes within one, each group the validation users
    of one split (``holdout`` of their items hidden, as :func:`split_users` hides them) and
    every other user its training users. Every eligible user validates exactly once.

    Raises ``ValueError`` when ``folds`` < 2 or there are fewer eligible users than folds."""
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(np.diff(indptr) >= 2)
    if folds < 2 or len(eligible) < folds:
        raise ValueError(f"{folds} folds need at least 2 and as many users with 2 items ({len(eligible)})")
    groups = np.array_split(rng.permutation(eligible), folds)
    return [_hiding(indptr, indices, np.sort(group), holdout, rng) for group in groups]


def _hiding(indptr: np.ndarray, indices: np.ndarray, valid: np.ndarray, holdout: float,
            rng: np.random.Generator) -> Split:
    """The split validating ``valid``: per user at least one item hidden, at least one shown."""
    train = np.setdiff1d(np.arange(len(indptr) - 1), valid)
    shown, hidden = [], []
    for row in valid:  # per user: hide at least one item, show at least one
        items = indices[indptr[row]:indptr[row + 1]]
        n_hide = min(max(1, int(round(holdout * len(items)))), len(items) - 1)
        mask = np.zeros(len(items), bool)
        mask[rng.choice(len(items), n_hide, replace=False)] = True
        shown.append(items[~mask])
        hidden.append(items[mask])
    fold_in = _csr(shown)
    return Split(train, valid, CSR(*fold_in, np.ones(len(fold_in[1]), np.float32)), _csr(hidden))


def without_hidden(csr: CSR, split: Split) -> CSR:
    """``csr`` (n_users rows) without each validation user's hidden items: what a model fits
    under the held-out-items protocol. Values and row order are kept; rows outside
    ``split.valid_rows`` are unchanged (only the validation rows' entries are looked at)."""
    n_items = int(csr.indices.max()) + 1 if len(csr.indices) else 1
    valid = split.valid_rows.astype(np.int64)
    starts, lengths = csr.indptr[valid], np.diff(csr.indptr)[valid]
    owner = np.repeat(valid, lengths)
    positions = np.arange(len(owner), dtype=np.int64) + np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    held_indptr, hidden = split.held_out
    hidden_keys = np.repeat(valid, np.diff(held_indptr)) * n_items + hidden
    dropped = np.isin(owner * n_items + csr.indices[positions], hidden_keys)
    keep = np.ones(len(csr.indices), bool)
    keep[positions[dropped]] = False
    out_indptr = csr.indptr.copy()
    out_indptr[1:] -= np.cumsum(np.bincount(owner[dropped], minlength=csr.n_rows))
    return CSR(out_indptr, csr.indices[keep], csr.values[keep])


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    return indptr, (np.concatenate(rows).astype(np.int32) if rows else np.array([], np.int32))


def top_k(scores: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], k: int) -> np.ndarray:
    """(n, k) item rows with the highest scores per row, ``exclude`` CSR items left out.

    ``scores`` is (n, n_items); it is modified in place (excluded items set to -inf).
    ``exclude`` is (indptr, item rows, ...): extra fields such as CSR values are ignored.
    """
    indptr, items = exclude[0], exclude[1]
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    scores[rows, items] = -np.inf
    k = min(k, scores.shape[1])
    # Negate and sort stably over the candidate set so ties go to the lower item row.
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    part.sort(axis=1)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def ranking_metrics(ranked: np.ndarray, held_out: tuple[np.ndarray, np.ndarray], n_items: int,
                    ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k (normalised by min(k, |held-out|)), NDCG@k and item coverage@k.

    Parameters
    ----------
    ranked
        (n_users, K) item rows, best first, with K >= max(ks) (or the whole catalogue).
    held_out
        CSR (indptr (n_users + 1,), item rows) of each user's relevant items. Users with no
        held-out items are skipped.
    """
    return metrics_of_totals(ranking_totals(ranked, held_out, n_items, ks), ks)


@dataclass(frozen=True)
class RankingTotals:
    """What :func:`ranking_metrics` averages, kept as sums so that the totals of several groups
    of users (the ranks of a distributed run) add up to those of all of them."""

    users: np.ndarray  # (1,) float64: users with held-out items
    sums: np.ndarray  # (2, len(ks)) float64: summed recall@k and NDCG@k
    covered: np.ndarray  # (len(ks), n_items) int32: 1 where an item is in someone's top k


def ranking_totals(ranked: np.ndarray, held_out: tuple[np.ndarray, np.ndarray], n_items: int,
                   ks: tuple[int, ...] = KS) -> RankingTotals:
    """The sums behind :func:`ranking_metrics` (same parameters)."""
    indptr, items = held_out
    sizes = np.diff(indptr)
    keep = sizes > 0
    codes = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes) * n_items + items
    codes.sort()
    asked = np.arange(len(ranked), dtype=np.int64)[:, None] * n_items + ranked
    pos = np.searchsorted(codes, asked).clip(0, max(len(codes) - 1, 0))
    hits = (codes[pos] == asked) if len(codes) else np.zeros(ranked.shape, bool)
    hits, sizes, ranked_kept = hits[keep], sizes[keep], ranked[keep]
    discounts = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    sums = np.zeros((2, len(ks)))
    covered = np.zeros((len(ks), n_items), np.int32)
    for i, k in enumerate(ks):
        kk = min(k, ranked.shape[1])
        found = hits[:, :kk]
        dcg = (found * discounts[:kk]).sum(axis=1)
        ideal = np.cumsum(discounts)[np.minimum(sizes, kk) - 1]
        sums[0, i] = (found.sum(axis=1) / np.minimum(sizes, k)).sum()
        sums[1, i] = (dcg / ideal).sum()
        covered[i, ranked_kept[:, :kk].ravel()] = 1
    return RankingTotals(np.array([float(keep.sum())]), sums, covered)


def metrics_of_totals(totals: RankingTotals, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean recall@k and NDCG@k per user and coverage@k of ``totals``."""
    users = int(totals.users[0])
    out: dict[str, float] = {"users": users}
    for i, k in enumerate(ks):
        out[f"recall@{k}"] = float(totals.sums[0, i] / users) if users else 0.0
        out[f"ndcg@{k}"] = float(totals.sums[1, i] / users) if users else 0.0
        out[f"coverage@{k}"] = float(np.count_nonzero(totals.covered[i]) / totals.covered.shape[1]) if users else 0.0
    return out


def popularity_ranking(item_counts: np.ndarray, split: Split, k: int, *,
                       chunk_scores: int = 32 * 2**20) -> np.ndarray:
    """(n_valid, k) the items with the most training users (``item_counts`` (n_items,)) that
    each validation user has not seen. Scores in chunks of users, so memory stays bounded
    whatever the catalogue."""
    n_items = len(item_counts)
    counts = item_counts.astype(np.float64)
    step = max(1, chunk_scores // max(n_items, 1))
    indptr, items = split.fold_in[0], split.fold_in[1]
    out = []
    for start in range(0, len(split.valid_rows), step):
        stop = min(start + step, len(split.valid_rows))
        scores = np.broadcast_to(counts, (stop - start, n_items)).copy()
        out.append(top_k(scores, (indptr[start:stop + 1] - indptr[start], items[indptr[start]:indptr[stop]]), k))
    return np.concatenate(out) if out else np.zeros((0, min(k, n_items)), np.int64)


def rank_by_embeddings(user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray,
                       exclude: tuple[np.ndarray, np.ndarray], k: int, *,
                       extra: Callable[[int, int], Any] | None = None,
                       chunk_scores: int = 32 * 2**20) -> np.ndarray:
    """(n_users, k) item rows ranked by the model's score ``u · W[j] + b[j]`` (plus ``extra``):
    the one ranking of :func:`rank_by_scaled_embeddings` with every item's scale 1."""
    return rank_by_scaled_embeddings(user_vectors, item_vectors, item_bias, exclude, k, [None], extra=extra,
                                     chunk_scores=chunk_scores)[0]


def rank_by_scaled_embeddings(user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray,
                              exclude: tuple[np.ndarray, np.ndarray], k: int,
                              column_scales: Sequence[np.ndarray | None], *,
                              extra: Callable[[int, int], Any] | None = None,
                              chunk_scores: int = 32 * 2**20) -> list[np.ndarray]:
    """For each of ``column_scales`` (an (n_items,) float array s, or None for all ones), the
    (n_users, k) int64 item rows ranked by the score ``(u · W[j]) s[j] + b[j]``, best first,
    ``exclude`` CSR items (what each user showed) left out; equal scores in any order. The
    products u · W are computed once for all the scales (a dlae's search tries several
    popularity corrections of the same fit, each a per-item scale of its item vectors).
    ``extra(start, stop)``, where given, is a (stop - start, n_items) float32 tensor added to
    u · W of those users before the scale (a dlae's sparse item-item part:
    :meth:`aefeatures.model.neighbours.ItemNeighbours.row_scores`).

    Scores a chunk of users at a time into one kept buffer, and takes each row's top k with
    torch on every core: validation ranks every item for up to 10,000 users after each epoch,
    and NumPy's one-core ``argpartition`` took 5.5 s of it at 27k items (torch: 1.5 s) and
    about 250 s at 1M items.
    """
    import torch  # here, not above: lookups import this module and never need torch

    n_items = len(item_vectors)
    k = min(k, n_items)
    step = max(1, chunk_scores // max(n_items, 1))
    indptr, items = exclude[0], exclude[1]
    vectors, bias = _tensor(item_vectors), _tensor(item_bias)
    scales = [None if c is None else _tensor(c) for c in column_scales]
    raw = torch.empty(min(step, len(user_vectors)), n_items)
    scaled = torch.empty_like(raw) if any(c is not None for c in scales) else None
    out: list[list[np.ndarray]] = [[] for _ in scales]
    for start in range(0, len(user_vectors), step):
        stop = min(start + step, len(user_vectors))
        products = torch.mm(_tensor(user_vectors[start:stop]), vectors.t(), out=raw[:stop - start])
        if extra is not None:
            products += extra(start, stop)
        rows = torch.from_numpy(np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1])))
        shown = torch.from_numpy(items[indptr[start]:indptr[stop]].astype(np.int64))
        for ranked, scale in zip(out, scales):
            chunk = products + bias if scale is None else torch.addcmul(bias, products, scale, out=scaled[:stop - start])
            chunk[rows, shown] = -np.inf
            ranked.append(torch.topk(chunk, k, dim=1).indices.numpy())
    return [np.concatenate(r) if r else np.zeros((0, k), np.int64) for r in out]


def _tensor(array: np.ndarray) -> torch.Tensor:
    import torch

    array = np.ascontiguousarray(array, dtype=np.float32)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def evaluate_embeddings(user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray,
                        split: Split, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Metrics of validation users embedded from their fold-in items (``user_vectors`` rows
    follow ``split.valid_rows``)."""
    return metrics_of_totals(embedding_totals(user_vectors, item_vectors, item_bias, split, ks), ks)


def embedding_totals(user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray,
                     split: Split, ks: tuple[int, ...] = KS) -> RankingTotals:
    """The sums behind :func:`evaluate_embeddings` (same parameters)."""
    return scaled_embedding_totals(user_vectors, item_vectors, item_bias, split, [None], ks)[0]


def scaled_embedding_totals(user_vectors: np.ndarray, item_vectors: np.ndarray, item_bias: np.ndarray,
                            split: Split, column_scales: Sequence[np.ndarray | None],
                            ks: tuple[int, ...] = KS, *,
                            extra: Callable[[int, int], Any] | None = None) -> list[RankingTotals]:
    """:func:`embedding_totals` for each of ``column_scales`` (:func:`rank_by_scaled_embeddings`,
    ``extra`` as there)."""
    rankings = rank_by_scaled_embeddings(user_vectors, item_vectors, item_bias, split.fold_in, max(ks), column_scales,
                                         extra=extra)
    return [ranking_totals(ranked, split.held_out, len(item_vectors), ks) for ranked in rankings]
