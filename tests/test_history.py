"""Recommendations for anyone, at request time: a history of item ids embedded by the version's
stored encoder in numpy equals what the training side's encoder gives, for every kind, and
history lookups follow the rules of a known user's (their items left out, filters, exclude,
exact k), with unknown items reported."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import aefeatures
from aefeatures import errors
from aefeatures.data.matrix import CSR
from aefeatures.model.autoencoder import Autoencoder, AutoencoderShape, encoder_arrays
from aefeatures.model.embed import encode
from aefeatures.store import layout
from aefeatures.store.encoder import Encoder, write_encoder


@pytest.mark.parametrize("kind, hidden", [("dae", (16, 12)), ("vae", (16,)), ("dlae", ()), ("recvae", (16,))])
def test_the_numpy_encoder_equals_the_models_for_every_kind(kind, hidden, tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderShape(n_items=40, dim=6, hidden=hidden, kind=kind, dropout=0.5))
    with torch.no_grad():  # parameters away from their initial values (LayerNorms at 1 and 0 would hide a bug)
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, size=25)
    indptr = np.append(0, np.cumsum(lengths)).astype(np.int64)
    items = np.concatenate([np.sort(rng.choice(40, n, replace=False)) for n in lengths]).astype(np.int32)
    values = rng.uniform(0.5, 5.0, size=len(items)).astype(np.float32)  # weighted, not only 0/1
    expected, _ = encode(model, CSR(indptr, items, values))
    write_encoder(tmp_path / "encoder", kind=kind, dim=6, arrays=encoder_arrays(model))
    ours = Encoder(tmp_path / "encoder").embed(indptr, items, values)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _histories(root, name="movies"):
    """{user id: (item ids)} of the live version, as its interactions table holds them."""
    fs = aefeatures.open_store(root)[name]
    table = pq.read_table(fs.path / layout.INTERACTIONS, columns=["user_row", "item_row"])
    users, items = table.column("user_row").to_numpy(), table.column("item_row").to_numpy()
    return fs, {fs.user_ids[u]: fs.item_ids[items[users == u]] for u in np.unique(users)[:40:4]}


def test_a_known_users_history_is_embedded_and_answered_as_the_user_is(trained_kind):
    root, _ = trained_kind
    fs, histories = _histories(root)
    for user, history in histories.items():
        embedded = fs.embed_history(list(history))
        stored = fs.user_embedding(user)
        np.testing.assert_allclose(embedded.vector, stored, rtol=1e-5, atol=1e-5 * np.abs(stored).max())
        assert embedded.unknown == []
        ours, theirs = fs.recommend_history(list(history), k=10), fs.recommend(user, k=10)
        np.testing.assert_array_equal(ours.ids, theirs.ids)  # its own items left out, as the user's are
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-4, atol=1e-4)
    batch = fs.recommend_histories([list(h) for h in histories.values()], k=5)
    known = fs.recommend_batch(list(histories), k=5)
    assert batch["item_id"].to_list() == known["item_id"].to_list()
    assert batch["history"].to_list() == np.repeat(np.arange(len(histories)), 5).tolist()


def test_weights_follow_the_jobs_input_encoding(trained):
    root, _ = trained  # the job: weight_col rating, min_weight 4, binarized
    fs, histories = _histories(root)
    history = list(next(iter(histories.values())))
    weighted = fs.embed_history(history + [history[0]], weights=[5.0] * len(history) + [4.5]).vector
    np.testing.assert_allclose(weighted, fs.embed_history(history).vector, rtol=1e-6)  # 1 per item, twice is once
    low = fs.embed_history(history + [int(fs.item_ids[0])], weights=[5.0] * len(history) + [2.0]).vector
    np.testing.assert_allclose(low, fs.embed_history(history).vector, rtol=1e-6)  # below min_weight: not counted
    with pytest.raises(errors.BadInputError, match="at least 4"):
        fs.embed_history(history[:2], weights=[1.0, 3.0])
    with pytest.raises(errors.BadInputError, match="finite numbers"):
        fs.embed_history(history[:2], weights=[1.0, float("nan")])
    with pytest.raises(errors.BadInputError, match="list of 2 numbers"):
        fs.embed_history(history[:2], weights=[1.0])


def test_unknown_items_are_reported_and_bad_histories_refused(trained):
    root, _ = trained
    fs, histories = _histories(root)
    history = list(next(iter(histories.values())))
    answer = fs.recommend_history(history + [99_999_999], k=5)
    assert answer.unknown == [99_999_999] and len(answer.ids) == 5
    np.testing.assert_array_equal(answer.ids, fs.recommend_history(history, k=5).ids)
    with pytest.raises(errors.NotFoundError, match="not found"):
        fs.recommend_history([99_999_998, 99_999_999], k=5)
    with pytest.raises(errors.BadInputError, match="empty"):
        fs.recommend_history([], k=5)
    with pytest.raises(errors.BadInputError, match="list of item ids"):
        fs.recommend_history("7", k=5)
    with pytest.raises(errors.BadInputError):
        fs.recommend_history(history, k=0)
    # a string id where ids are integers is an id this version does not know: reported
    assert fs.recommend_history(history + ["abc"], k=5).unknown == ["abc"]
    # a value no feature set could have as an id is a wrong request, even beside known items
    for malformed in ("x" * 5000, 2**64, 1.5, None, [7]):
        with pytest.raises(errors.InvalidIdError, match="is not a valid item id"):
            fs.recommend_history(history + [malformed], k=5)


def test_history_lookups_keep_filters_exclusions_and_exact_k(trained):
    root, _ = trained
    fs, histories = _histories(root)
    history = list(next(iter(histories.values())))
    best = fs.recommend_history(history, k=20)
    assert not set(best.ids) & set(history)
    dropped = fs.recommend_history(history, k=20, exclude=list(best.ids[:3]))
    assert len(dropped.ids) == 20 and not set(dropped.ids) & set(best.ids[:3])
    np.testing.assert_array_equal(dropped.ids[:17], best.ids[3:20])
    allow = [int(i) for i in fs.item_ids[::7]]
    only = fs.recommend_history(history, k=10, items=allow)
    assert set(only.ids) <= set(allow) - set(history) and len(only.ids) == min(10, len(set(allow) - set(history)))
    every = fs.recommend_history(history, k=fs.n_items)  # exactly what is left: the catalogue less the history
    assert len(every.ids) == fs.n_items - len(set(history)) and len(set(every.ids)) == len(every.ids)
    kept = fs.recommend_history(history, k=5, exclude_seen=False)
    assert len(kept.ids) == 5


def test_users_like_a_history(trained):
    root, _ = trained
    fs, histories = _histories(root)
    user, history = next(iter(histories.items()))
    found = fs.similar_users_to_history(list(history), k=3)
    assert found.ids[0] == user and found.scores[0] == pytest.approx(1.0, abs=1e-5)  # itself, at cosine 1
    assert list(found.ids[1:]) == list(fs.similar_users(user, k=2).ids)
