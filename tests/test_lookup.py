"""Lookup semantics: exclusion, exactly k, batch = single, unknown ids, approximate indexes."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

import aefeatures
from aefeatures.config import load_job_config
from aefeatures.data.matrix import CSR
from aefeatures.errors import FeatureSetNotFoundError, NotFoundError
from aefeatures.jobs.run import run_job
from tests.conftest import write_job


@pytest.fixture(scope="module")
def fs(trained):
    root, _ = trained
    return aefeatures.open_store(root)["movies"]


def _seen(fs, user) -> set:
    pairs = pl.read_parquet(fs.path / "interactions.parquet")
    return set(pairs.filter(pl.col("user_id") == user).get_column("item_id").to_list())


@pytest.fixture(scope="module")
def fs_kind(trained_kind):
    root, _ = trained_kind
    return aefeatures.open_store(root)["movies"]


def test_recommend_returns_k_unseen_items_best_first(fs_kind):
    fs = fs_kind
    for user in (1, 42, 1999):
        recs = fs.recommend(user, k=10)
        assert len(recs.ids) == 10 and len(set(recs.ids.tolist())) == 10
        assert not set(recs.ids.tolist()) & _seen(fs, user)
        assert np.all(np.diff(recs.scores) <= 1e-6)


def test_scores_are_the_models_inner_product_plus_bias(fs_kind):
    fs = fs_kind
    recs = fs.recommend(42, k=5)
    items = pl.read_parquet(fs.path / "items.parquet")
    row = {i: r for r, i in enumerate(items.get_column("item_id").to_list())}
    vectors = np.stack(items.get_column("embedding").to_numpy())
    bias = items.get_column("bias").to_numpy()
    u = fs.user_embedding(42)
    expected = [vectors[row[i]] @ u + bias[row[i]] for i in recs.ids]
    np.testing.assert_allclose(recs.scores, expected, rtol=1e-5, atol=1e-5)


def test_the_exact_index_returns_the_models_own_top_k_of_unseen_items(fs_kind, trained_kind):
    import torch

    from aefeatures.model.autoencoder import load_model
    from aefeatures.model.device import to_batch

    fs, (_, result) = fs_kind, trained_kind
    model = load_model(result.path / "model")
    pairs = pl.read_parquet(fs.path / "interactions.parquet")
    for user in (1, 42, 1999):
        items = np.searchsorted(fs.item_ids, sorted(_seen(fs, user)))
        batch = to_batch(CSR(np.array([0, len(items)]), items.astype(np.int32), np.ones(len(items), np.float32)),
                         np.array([0]), torch.device("cpu"))
        with torch.no_grad():
            logits = model(batch)[0][0].double().numpy()
        logits[items] = -np.inf
        expected = fs.item_ids[np.argsort(-logits, kind="stable")[:10]]
        got = fs.recommend(user, k=10)
        np.testing.assert_array_equal(got.ids, expected)
        np.testing.assert_allclose(got.scores, np.sort(logits)[::-1][:10], rtol=1e-4, atol=1e-5)
    assert len(pairs) > 0


def test_k_larger_than_the_catalogue_returns_every_unseen_item(fs):
    recs = fs.recommend(42, k=10_000)
    assert len(recs.ids) == fs.n_items - len(_seen(fs, 42))
    assert set(recs.ids.tolist()) == set(fs.item_ids.tolist()) - _seen(fs, 42)
    assert len(fs.similar_items(7, k=10_000).ids) == fs.n_items - 1


def test_include_seen_may_return_the_users_items(fs):
    with_seen = fs.recommend(42, k=fs.n_items, exclude_seen=False)
    assert len(with_seen.ids) == fs.n_items
    assert _seen(fs, 42) <= set(with_seen.ids.tolist())


def test_batch_equals_one_by_one(fs):
    users = [1, 42, 7, 1999, 500]
    batch = fs.recommend_batch(users, k=7)
    assert batch.columns == ["user_id", "item_id", "rank", "score"]
    for user in users:
        rows = batch.filter(pl.col("user_id") == user).sort("rank")
        single = fs.recommend(user, k=7)
        assert rows.get_column("item_id").to_list() == single.ids.tolist()
        assert rows.get_column("rank").to_list() == list(range(1, 8))
        np.testing.assert_allclose(rows.get_column("score").to_numpy(), single.scores, rtol=1e-5)


def test_similar_items_leave_the_item_out(fs):
    found = fs.similar_items(7, k=10)
    assert 7 not in found.ids.tolist() and len(found.ids) == 10


def test_ids_given_as_strings_resolve_for_integer_stores(fs):
    np.testing.assert_array_equal(fs.recommend("42", k=3).ids, fs.recommend(42, k=3).ids)
    np.testing.assert_array_equal(fs.user_embedding("42"), fs.user_embedding(42))


@pytest.mark.parametrize("call", [
    lambda fs: fs.recommend(999_999),
    lambda fs: fs.similar_items(-1),
    lambda fs: fs.recommend_batch([1, 999_999]),
])
def test_unknown_ids_raise_not_found(fs, call):
    with pytest.raises(NotFoundError, match="not found in feature set `movies`"):
        call(fs)


@pytest.mark.parametrize("call, shown", [
    (lambda fs: fs.recommend("not-a-number"), "'not-a-number' is not a valid user id"),
    (lambda fs: fs.user_embedding(3.5), "3.5 is not a valid user id"),
    (lambda fs: fs.item_embedding("x"), "'x' is not a valid item id"),
    (lambda fs: fs.recommend(True), "True is not a valid user id"),
    (lambda fs: fs.recommend(2**63), "9223372036854775808 is not a valid user id"),
    (lambda fs: fs.recommend("4_2"), "'4_2' is not a valid user id"),
    (lambda fs: fs.recommend(1, exclude=["1.5"]), "'1.5' is not a valid item id"),
])
def test_values_that_cannot_be_ids_of_the_type_are_refused(fs, call, shown):
    from aefeatures.errors import InvalidIdError

    with pytest.raises(InvalidIdError, match=re.escape(shown)) as caught:
        call(fs)
    assert caught.value.exit_code == 2 and "ids of this feature set are integers (int64" in str(caught.value)


def test_parse_id_is_one_rule_for_every_id_type():
    from aefeatures.errors import InvalidIdError
    from aefeatures.serving.lookup import parse_id

    assert [parse_id(v, np.int64) for v in (42, "42", " 42\r", "+42", "0042", np.int32(42))] == [42] * 6
    assert parse_id("-7", np.int64) == -7
    assert parse_id(str(2**64 - 1), np.uint64) == 2**64 - 1 and parse_id(2**63, np.uint64) == 2**63
    assert parse_id("0038", np.dtype("<U1")) == "0038" and parse_id(" 38", np.dtype("<U1")) == " 38"
    for value, dtype in [(-1, np.uint64), (2**64, np.uint64), ("1e3", np.int64), (4.0, np.int64),
                         (38, np.dtype("<U1")), (None, np.int64), ("", np.int64)]:
        with pytest.raises(InvalidIdError):
            parse_id(value, dtype)


def test_batch_can_skip_unknown_users(fs):
    recs = fs.recommend_batch([1, 999_999, 2], k=3, skip_unknown=True)
    assert sorted(set(recs.get_column("user_id").to_list())) == [1, 2]


def test_k_below_one_is_rejected(fs):
    with pytest.raises(ValueError, match="`k` must be an integer from 1 to 1,000,000"):
        fs.recommend(42, k=0)


def test_store_errors_name_what_exists(tmp_path, trained):
    root, _ = trained
    with pytest.raises(FeatureSetNotFoundError, match="does not exist"):
        aefeatures.open_store(tmp_path / "nowhere")
    with pytest.raises(FeatureSetNotFoundError, match=r"has no feature set `books`; it holds \['movies'\]"):
        aefeatures.open_store(root)["books"]
    with pytest.raises(FeatureSetNotFoundError, match="has no version `v0`"):
        aefeatures.open_store(root).open("movies", "v0")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivf", "IVF4,PQ11"])
def test_approximate_indexes_still_return_exactly_k_unseen(tmp_path, kind):
    index = {"kind": kind, "min_recall": 0.0}  # a poor index on purpose: lookups must still be exact-k
    run_job(load_job_config(write_job(tmp_path, model={"epochs": 3}, index=index)), progress=False)
    fs = aefeatures.open_store(tmp_path / "store")["movies"]
    assert fs.manifest["index"]["factory"] != "Flat"
    assert 0 < fs.manifest["index"]["recall_at_10"] <= 1
    batch = fs.recommend_batch(list(range(1, 201)), k=20)
    assert batch.group_by("user_id").len().get_column("len").to_list() == [20] * 200
    for user in (1, 42):
        assert not set(fs.recommend(user, k=50).ids.tolist()) & _seen(fs, user)


def test_similar_users_is_exact_cosine(fs):
    unit = fs._users[1] / np.linalg.norm(fs._users[1], axis=1, keepdims=True)
    row = int(np.searchsorted(fs.user_ids, 42))
    scores = unit @ unit[row]
    scores[row] = -np.inf
    found = fs.similar_users(42, k=10)
    assert 42 not in found.ids.tolist()
    np.testing.assert_array_equal(found.ids, fs.user_ids[np.argsort(-scores, kind="stable")[:10]])
    assert len(fs.similar_users(42, k=100_000).ids) == fs.n_users - 1


def test_similar_users_share_the_planted_community(fs, planted):
    user_community, _ = planted
    hits = [user_community[v] == user_community[u] for u in range(1, 201) for v in fs.similar_users(u, 10).ids]
    assert np.mean(hits) > 0.6


def test_similar_items_by_cosine(fs):
    found = fs.similar_items(7, k=10, metric="cosine")
    vectors = fs.item_embeddings(fs.item_ids)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row = int(np.searchsorted(fs.item_ids, 7))
    scores = unit @ unit[row]
    np.testing.assert_allclose(found.scores, np.sort(np.delete(scores, row))[::-1][:10], rtol=1e-5)
    assert 7 not in found.ids.tolist()
    with pytest.raises(ValueError, match='`metric` must be "ip" or "cosine"'):
        fs.similar_items(7, metric="l2")
    with pytest.raises(ValueError, match="`k` must be an integer"):
        fs.similar_items(7, k=0)
