"""Metrics against hand-computed cases, the split, and the popularity baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aefeatures.data.matrix import CSR
from aefeatures.quality.evaluate import (
    popularity_ranking,
    rank_by_embeddings,
    rank_by_scaled_embeddings,
    ranking_metrics,
    split_folds,
    split_items,
    split_users,
    top_k,
    without_hidden,
)


def csr(rows):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    return indptr, np.array([i for r in rows for i in r], dtype=np.int32)


def test_hand_computed_recall_ndcg_coverage():
    ranked = np.array([[0, 1, 2, 3], [4, 3, 2, 1]])
    held = csr([[1, 3], [5]])  # user 0: hits at ranks 2 and 4; user 1: no hit
    m = ranking_metrics(ranked, held, n_items=6, ks=(2, 4))
    # user 0: recall@2 = 1 / min(2, 2); ndcg@2 = (1/log2(3)) / (1 + 1/log2(3))
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 0) / 2)
    assert m["recall@4"] == pytest.approx((2 / 2 + 0) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert m["ndcg@4"] == pytest.approx((dcg / (1 + 1 / math.log2(3))) / 2)
    assert m["coverage@2"] == pytest.approx(4 / 6)  # items {0, 1, 4, 3}
    assert m["coverage@4"] == pytest.approx(5 / 6)
    assert m["users"] == 2


def test_recall_is_normalised_by_held_out_size_when_smaller_than_k():
    ranked = np.array([[7, 0, 1, 2, 3, 4, 5, 6, 8, 9]])
    m = ranking_metrics(ranked, csr([[7]]), n_items=10, ks=(10,))
    assert m["recall@10"] == 1.0 and m["ndcg@10"] == 1.0  # one relevant item, ranked first


def test_users_with_nothing_held_out_are_skipped():
    ranked = np.array([[0, 1], [2, 3]])
    m = ranking_metrics(ranked, csr([[0], []]), n_items=4, ks=(1,))
    assert m["users"] == 1 and m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0
    assert m["coverage@1"] == pytest.approx(1 / 4)  # only counted users' lists


def test_k_larger_than_the_ranking_uses_what_there_is():
    m = ranking_metrics(np.array([[1, 0]]), csr([[0, 1]]), n_items=2, ks=(100,))
    assert m["recall@100"] == 1.0 and m["ndcg@100"] == pytest.approx(1.0)


def test_top_k_breaks_ties_by_item_row_and_excludes_shown_items():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ranked = top_k(scores.copy(), csr([[2], []]), 3)
    assert ranked.tolist() == [[1, 4, 3], [0, 1, 2]]


def test_split_holds_out_whole_users_and_hides_part_of_their_items():
    indptr, indices = csr([list(range(10))] * 50 + [[1]] * 10)
    split = split_users(indptr, indices, share=0.2, max_users=1000, holdout=0.2, seed=0)
    assert len(split.valid_rows) == 12 and not set(split.valid_rows) & set(split.train_rows)
    assert max(split.valid_rows) < 50  # users with a single item cannot be split
    assert len(split.train_rows) + len(split.valid_rows) == 60
    shown, hidden = np.diff(split.fold_in[0]), np.diff(split.held_out[0])
    assert (shown == 8).all() and (hidden == 2).all()
    for r in range(12):  # shown and hidden partition the user's items
        a = split.fold_in[1][split.fold_in[0][r]:split.fold_in[0][r + 1]]
        b = split.held_out[1][split.held_out[0][r]:split.held_out[0][r + 1]]
        assert sorted([*a, *b]) == list(range(10))
    again = split_users(indptr, indices, share=0.2, max_users=1000, holdout=0.2, seed=0)
    assert np.array_equal(again.valid_rows, split.valid_rows)
    assert len(split_users(indptr, indices, share=0.2, max_users=3, holdout=0.2, seed=0).valid_rows) == 3


def test_held_out_items_validate_every_user_with_two_items_and_train_everyone_on_the_rest():
    rows = [list(range(r % 7, 10 + r % 7)) for r in range(50)] + [[1]] * 10
    indptr, indices = csr(rows)
    split = split_items(indptr, indices, max_users=1000, holdout=0.2, seed=0)
    assert list(split.valid_rows) == list(range(50))  # single-item users cannot be split
    assert list(split.train_rows) == list(range(60))  # every user is in the fit
    fit = without_hidden(CSR(indptr, indices, np.arange(len(indices), dtype=np.float32)), split)
    for i, r in enumerate(split.valid_rows):  # the fit keeps exactly what the user shows
        shown = split.fold_in[1][split.fold_in[0][i]:split.fold_in[0][i + 1]]
        hidden = split.held_out[1][split.held_out[0][i]:split.held_out[0][i + 1]]
        kept = fit.indices[fit.indptr[r]:fit.indptr[r + 1]]
        assert list(kept) == sorted(shown) and len(hidden) == 2 and not set(hidden) & set(kept)
        values = fit.values[fit.indptr[r]:fit.indptr[r + 1]]  # each kept pair keeps its value
        assert list(values) == [indptr[r] + rows[r].index(item) for item in kept]
    for r in range(50, 60):  # rows that do not validate are untouched
        assert list(fit.indices[fit.indptr[r]:fit.indptr[r + 1]]) == rows[r]
    assert len(fit.indices) == len(indices) - 100
    capped = split_items(indptr, indices, max_users=5, holdout=0.2, seed=0)
    assert len(capped.valid_rows) == 5 and len(capped.train_rows) == 60
    again = split_items(indptr, indices, max_users=5, holdout=0.2, seed=0)
    assert np.array_equal(again.valid_rows, capped.valid_rows)


def test_k_folds_validate_every_user_with_two_items_exactly_once():
    indptr, indices = csr([list(range(10))] * 52 + [[1]] * 10)
    folds = split_folds(indptr, indices, folds=5, holdout=0.2, seed=0)
    valid = np.concatenate([f.valid_rows for f in folds])
    assert sorted(valid) == list(range(52))  # single-item users never validate
    assert sorted(len(f.valid_rows) for f in folds) == [10, 10, 10, 11, 11]
    for f in folds:
        assert not set(f.valid_rows) & set(f.train_rows) and len(f.valid_rows) + len(f.train_rows) == 62
        assert (np.diff(f.fold_in[0]) == 8).all() and (np.diff(f.held_out[0]) == 2).all()
    again = split_folds(indptr, indices, folds=5, holdout=0.2, seed=0)
    assert all(np.array_equal(a.valid_rows, b.valid_rows) for a, b in zip(folds, again))
    with pytest.raises(ValueError):
        split_folds(indptr, indices, folds=1, holdout=0.2, seed=0)


def test_popularity_ranks_training_counts_without_the_users_items():
    indptr, indices = csr([[0, 1], [0, 2], [0, 1], [3, 4]])
    split = split_users(indptr, indices, share=0.25, max_users=1, holdout=0.5, seed=1)
    train_items = np.concatenate([indices[indptr[r]:indptr[r + 1]] for r in split.train_rows])
    ranked = popularity_ranking(np.bincount(train_items, minlength=5), split, 3)
    shown = set(split.fold_in[1].tolist())
    assert not set(ranked[0].tolist()) & shown
    counts = np.bincount(train_items, minlength=5)
    assert list(counts[ranked[0]]) == sorted(counts[ranked[0]], reverse=True)


def test_popularity_ranking_in_chunks_equals_one_pass():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 12, 300)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.sort(rng.choice(50, n, replace=False)) for n in lengths]).astype(np.int32)
    split = split_users(indptr, indices, share=0.3, max_users=1000, holdout=0.3, seed=0)
    counts = np.bincount(indices, minlength=50)
    whole = popularity_ranking(counts, split, 10)
    assert whole.shape == (len(split.valid_rows), 10)
    np.testing.assert_array_equal(popularity_ranking(counts, split, 10, chunk_scores=120), whole)


@pytest.mark.parametrize("chunk_scores", [32 * 2**20, 700])  # one chunk; chunks of 7 users, the last shorter
def test_rank_by_embeddings_is_the_full_sort_of_scores_without_the_excluded(chunk_scores):
    rng = np.random.default_rng(3)
    users, items = rng.standard_normal((40, 8), dtype=np.float32), rng.standard_normal((100, 8), dtype=np.float32)
    bias = rng.standard_normal(100, dtype=np.float32)
    exclude = csr([rng.choice(100, rng.integers(0, 30), replace=False).tolist() for _ in range(40)])
    got = rank_by_embeddings(users, items, bias, exclude, 20, chunk_scores=chunk_scores)
    scores = users.astype(np.float64) @ items.T.astype(np.float64) + bias
    for u in range(40):
        seen = set(exclude[1][exclude[0][u]:exclude[0][u + 1]].tolist())
        expected = [i for i in np.argsort(-scores[u], kind="stable") if i not in seen][:20]
        assert got[u].tolist() == expected


def test_rank_by_embeddings_ranks_the_whole_catalogue_when_k_exceeds_it():
    got = rank_by_embeddings(np.ones((2, 1), np.float32), np.arange(5, dtype=np.float32)[:, None],
                             np.zeros(5, np.float32), csr([[4], []]), 100)
    assert got.shape == (2, 5)
    assert got[0].tolist()[:4] == [3, 2, 1, 0] and got[1].tolist() == [4, 3, 2, 1, 0]  # excluded: last


def test_scaled_rankings_equal_rankings_of_scaled_item_vectors():
    """One product u·W for several per-item scales: each ranking is that of the item vectors
    scaled beforehand (a dlae's popularity-correction walk), the bias added after scaling."""
    rng = np.random.default_rng(0)
    users, items, bias = rng.normal(size=(37, 6)), rng.normal(size=(50, 6)), rng.normal(size=50) * 1e-3
    exclude = csr([sorted(rng.choice(50, 3, replace=False)) for _ in range(37)])
    scales = [None, (np.arange(50) + 1.0) ** -0.2, rng.uniform(0.5, 2.0, 50)]
    rankings = rank_by_scaled_embeddings(users, items, bias, exclude, 10, scales, chunk_scores=500)
    for scale, ranked in zip(scales, rankings):
        scaled = items if scale is None else items * scale[:, None]
        np.testing.assert_array_equal(ranked, rank_by_embeddings(users, scaled, bias, exclude, 10))
