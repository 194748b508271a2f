"""Filtered lookups: over random stores, attributes, filters, allow-lists and k, every answer
equals brute force ("score every item, apply every rule, take the top k"), for every index kind."""

from __future__ import annotations

from datetime import datetime, timezone

import faiss
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import aefeatures
import aefeatures.serving.lookup as lookup
from aefeatures.data.attributes import align_attributes
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import Interactions
from aefeatures.model.embed import Embeddings
from aefeatures.store import layout, publish, tables
from aefeatures.store.index import EmbeddingIndex, build_index, item_rows, save_index
from tests.random_store import publish_random

CATEGORIES = ["books", "toys", "food"]
TAGS = ["kids", "new", "sale"]


def random_attributes(rng: np.random.Generator, item_ids: np.ndarray) -> pl.DataFrame:
    """Attributes for most items (some left out, some fields null) and a row for an unknown id."""
    n = len(item_ids)
    described = rng.random(n) < 0.85
    frame = pl.DataFrame({
        "item_id": item_ids,
        "category": [CATEGORIES[i] if rng.random() > 0.1 else None for i in rng.integers(0, 3, n)],
        "price": [float(p) if rng.random() > 0.1 else None for p in np.round(rng.random(n) * 100, 1)],
        "in_stock": (rng.random(n) < 0.6).tolist(),
        "tags": [[t for t in TAGS if rng.random() < 0.4] for _ in range(n)],
        "released": [datetime(2020 + int(y), 1, 1).date() for y in rng.integers(0, 5, n)],
    }).filter(pl.Series(described))
    return pl.concat([frame, frame.head(1).with_columns(pl.lit(-999, pl.Int64).alias("item_id"))])


def make_store(root, seed: int, n_users: int, n_items: int, dim: int, kind: str):
    """A published version with random interactions, vectors and attributes."""
    rng = np.random.default_rng(seed)

    def tune(index):
        if kind.startswith("IVF"):  # every list probed: the index is exact, as brute force is
            faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(index).nlist
        if kind.startswith("HNSW"):  # a search list longer than the catalogue visits every item
            faiss.downcast_index(index).hnsw.efSearch = 256

    def attributes(staging, matrix):
        aligned, summary = align_attributes(random_attributes(rng, matrix.item_ids.to_numpy()), matrix.item_ids)
        tables.write_attributes(staging, aligned)
        return {"attributes": summary}

    return publish_random(root, f"v{seed}", rng, n_users, n_items, dim, kind, tune=tune, extra=attributes)


# --- filters with an independent evaluator (SQL three-valued logic) --------------------------------

def _and(a, b):
    return False if a is False or b is False else None if a is None or b is None else True


def _or(a, b):
    return True if a is True or b is True else None if a is None or b is None else False


def _cmp(value, op, const):
    if value is None:
        return None
    return {"<": value < const, ">=": value >= const, "=": value == const}[op]


@st.composite
def filters(draw, depth: int = 0):
    """(SQL text, predicate over an attribute row dict returning True/False/None)."""
    leaves = [
        st.sampled_from(CATEGORIES + ["none"]).map(
            lambda c: (f"category = '{c}'", lambda r, c=c: _cmp(r["category"], "=", c))),
        st.integers(0, 100).map(lambda p: (f"price < {p}", lambda r, p=p: _cmp(r["price"], "<", p))),
        st.just(("in_stock", lambda r: r["in_stock"])),
        st.sampled_from(TAGS).map(lambda t: (f"list_contains(tags, '{t}')",
                                             lambda r, t=t: None if r["tags"] is None else t in r["tags"])),
        st.integers(2020, 2025).map(lambda y: (f"released >= DATE '{y}-01-01'",
                                               lambda r, y=y: _cmp(r["released"] and r["released"].year, ">=", y))),
        st.just(("price IS NULL", lambda r: r["price"] is None)),
        st.sampled_from(["books", "toys"]).map(lambda c: (f"category LIKE '{c[0]}%'",
                                                          lambda r, c=c: None if r["category"] is None
                                                          else r["category"].startswith(c[0]))),
    ]
    if depth >= 2:
        return draw(st.one_of(leaves))
    kind = draw(st.sampled_from(["leaf", "leaf", "and", "or", "not"]))
    if kind == "leaf":
        return draw(st.one_of(leaves))
    if kind == "not":
        text, pred = draw(filters(depth + 1))
        return f"NOT ({text})", lambda r: None if pred(r) is None else not pred(r)
    (ta, pa_), (tb, pb) = draw(filters(depth + 1)), draw(filters(depth + 1))
    op = _and if kind == "and" else _or
    return f"({ta}) {kind.upper()} ({tb})", lambda r: op(pa_(r), pb(r))


def brute_force(fs, query, skip: set, allowed: set, k: int):
    """(ids, scores): score every item exactly, drop what the rules drop, best k first."""
    scores = fs._index_rows[:, : len(query)] @ query
    keep = [j for j, item in enumerate(fs.item_ids.tolist()) if item not in skip and item in allowed]
    order = sorted(keep, key=lambda j: (-scores[j], j))[:k]
    return fs.item_ids[order], scores[order]


def assert_same(found, expected, tol: float = 1e-4):
    """Equal lists, up to the order of items whose scores tie within float rounding."""
    ids, scores = expected
    assert len(found.ids) == len(ids)
    assert np.allclose(found.scores, scores, atol=tol)
    padded = np.concatenate([[np.inf], scores, [-np.inf]])
    clear = (padded[:-2] - padded[1:-1] > tol) & (padded[1:-1] - padded[2:] > tol)
    assert found.ids[clear].tolist() == ids[clear].tolist()
    assert set(found.ids.tolist()) == set(ids.tolist()) or not clear.all()


KINDS = st.sampled_from(["flat", "HNSW4,Flat", "IVF2,Flat"])


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 8), n_items=st.integers(2, 60),
       dim=st.integers(1, 6), kind=KINDS, k=st.integers(1, 40), flt=st.none() | filters(),
       allow_share=st.sampled_from([None, 0.0, 0.1, 0.5, 1.0]), exclude_share=st.sampled_from([0.0, 0.2]),
       exclude_seen=st.booleans())
def test_filtered_lookups_equal_brute_force(tmp_path_factory, seed, n_users, n_items, dim, kind, k, flt,
                                            allow_share, exclude_share, exclude_seen):
    assume(flt is not None or allow_share is not None)
    fs, matrix = make_store(tmp_path_factory.mktemp("f"), seed, n_users, n_items, dim, kind)
    rng = np.random.default_rng(seed + 1)
    attrs = fs.attributes.to_dicts()
    text, predicate = flt if flt is not None else (None, lambda r: True)
    allowed = {r["item_id"] for r in attrs if predicate(r) is True}
    items = None
    if allow_share is not None:
        items = fs.item_ids[rng.random(fs.n_items) < allow_share].tolist() + [-5]  # an unknown id is ignored
        allowed &= set(items)
    exclude = fs.item_ids[rng.random(fs.n_items) < exclude_share].tolist()

    batch = fs.recommend_batch(list(fs.user_ids), k=k, exclude=exclude, exclude_seen=exclude_seen,
                               filter=text, items=items)
    for row, user in enumerate(fs.user_ids):
        seen = set(fs.item_ids[matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]].tolist())
        skip = (seen if exclude_seen else set()) | set(exclude)
        found = fs.recommend(user, k=k, exclude=exclude, exclude_seen=exclude_seen, filter=text, items=items)
        expected = brute_force(fs, np.append(fs.user_embedding(user), 1.0).astype(np.float32), skip, allowed, k)
        assert_same(found, expected)
        mine = batch.filter(pl.col("user_id") == user)
        assert mine.get_column("item_id").to_list() == found.ids.tolist()

    item = fs.item_ids[0]
    found = fs.similar_items(item, k=k, exclude=exclude, filter=text, items=items)
    query = np.append(fs.item_embedding(item), 0.0).astype(np.float32)
    assert_same(found, brute_force(fs, query, {item, *exclude}, allowed, k))
    cosine = fs.similar_items(item, k=k, metric="cosine", exclude=exclude, filter=text, items=items)
    assert set(cosine.ids.tolist()) <= allowed - {item, *exclude}
    assert len(cosine.ids) == min(k, len(allowed - {item, *exclude}))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """100,000 items, 8 dimensions, 40 users; `category` names 5 items 'rare'."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    n_items = 100_000
    frame = pl.DataFrame({"user_id": np.arange(n_items) % 40, "item_id": np.arange(n_items),
                          "weight": np.ones(n_items), "timestamp": [None] * n_items},
                         schema={"user_id": pl.Int64, "item_id": pl.Int64, "weight": pl.Float32,
                                 "timestamp": pl.Datetime("us", "UTC")})
    matrix = build_matrix(Interactions(frame, (), n_items, n_items, False))
    emb = Embeddings(rng.normal(size=(40, 8)).astype(np.float32), np.zeros(40, np.float32),
                     rng.normal(size=(n_items, 8)).astype(np.float32), rng.normal(size=n_items).astype(np.float32))
    category = np.where(np.arange(n_items) % 1000 == 0, "common", "other").astype(object)
    rare = [17, 4_001, 50_003, 77_777, 99_999]
    category[rare] = "rare"
    user0 = emb.item_vectors @ emb.user_vectors[0] + emb.item_bias
    rank0 = np.empty(n_items, np.int64)
    rank0[np.argsort(-user0)] = np.arange(n_items)  # 0 = the item user 0 likes best
    attributes = pl.DataFrame({"item_id": np.arange(n_items), "category": category.tolist(), "rank0": rank0})
    with publish.staged_version(root, "p", "v1") as staging:
        tables.write_tables(staging, matrix, emb, name="p", version="v1", created=datetime.now(timezone.utc))
        tables.write_attributes(staging, align_attributes(attributes, matrix.item_ids)[0])
        save_index(build_index(item_rows(emb.item_vectors, emb.item_bias), "flat").index, staging / layout.INDEX)
        publish.write_manifest(staging, {"dim": 8, "counts": {}, "version": "v1"})
        publish.publish(root, "p", staging)
    return aefeatures.open_store(root)["p"], rare


def test_a_filter_selecting_5_of_100k_items_returns_them_without_searching_the_index(big, monkeypatch):
    fs, rare = big

    def no_index(*args, **kwargs):
        raise AssertionError("the index was searched")

    monkeypatch.setattr(EmbeddingIndex, "search", no_index)
    monkeypatch.setattr(lookup, "search_selected", no_index)
    user = fs.user_ids[5]  # user u has the items i with i % 40 == u: user 5 none of the rare ones
    found = fs.recommend(user, k=10, filter="category = 'rare'")
    assert sorted(found.ids.tolist()) == rare
    assert np.all(np.diff(found.scores) <= 0)
    assert sorted(fs.recommend(user, k=3, filter="category = 'rare'").ids.tolist()) == \
        sorted(found.ids[:3].tolist())
    # user 17 has items 17 and 77,777: they are left out as seen
    assert sorted(fs.recommend(fs.user_ids[17], k=10, filter="category = 'rare'").ids.tolist()) == \
        [4_001, 50_003, 99_999]


def test_a_filter_selecting_nothing_answers_empty(big):
    fs, _ = big
    found = fs.recommend(fs.user_ids[0], k=10, filter="category = 'no such'")
    assert len(found.ids) == 0 and len(found.scores) == 0
    assert fs.recommend_batch(list(fs.user_ids[:3]), k=5, filter="category = 'no such'").height == 0
    assert len(fs.similar_items(5, k=5, filter="category = 'no such'").ids) == 0
    assert len(fs.recommend(fs.user_ids[0], k=10, items=[]).ids) == 0


def test_a_broad_filter_returns_exactly_k_through_the_index(big):
    fs, rare = big
    user = fs.user_ids[5]
    found = fs.recommend(user, k=50, filter="category <> 'rare'")
    assert len(found.ids) == 50 and not set(rare) & set(found.ids.tolist())
    scores = fs._index_rows @ np.append(fs.user_embedding(user), 1.0)
    scores[[r for r in rare]] = -np.inf
    scores[np.arange(5, fs.n_items, 40)] = -np.inf  # seen
    assert np.allclose(found.scores, np.sort(scores)[::-1][:50], atol=1e-4)


def test_each_filters_item_set_is_computed_once_per_version(big, monkeypatch):
    fs, _ = big
    fs.recommend(fs.user_ids[0], k=5, filter="category = 'common'")
    calls = []
    original = fs._filters.mask
    monkeypatch.setattr(fs._filters, "mask", lambda text: calls.append(text) or original(text))
    fs.recommend(fs.user_ids[1], k=5, filter="category = 'common'")
    fs.similar_items(7, k=5, filter="category = 'common'")
    assert calls == []
    fs.recommend(fs.user_ids[1], k=5, filter="category = 'other'")
    assert calls == ["category = 'other'"]


def test_when_over_fetching_comes_back_short_the_allowed_items_are_searched_alone(big, monkeypatch):
    """A filter keeping the 30% of items user 0 likes least: the plain search's best candidates
    are all filtered out, so the lookup searches again with FAISS's bitmap selector."""
    fs, _ = big
    calls = []
    original = lookup.search_selected
    monkeypatch.setattr(lookup, "search_selected", lambda *a: calls.append(a[2]) or original(*a))
    user = fs.user_ids[0]
    found = fs.recommend(user, k=10, filter="rank0 >= 70000")
    assert calls, "the selector search was not used"
    scores = fs._index_rows @ np.append(fs.user_embedding(user), 1.0)
    allowed = fs.attributes.get_column("rank0").to_numpy() >= 70_000
    allowed[np.arange(0, fs.n_items, 40)] = False  # user 0's own items
    expected = np.flatnonzero(allowed)[np.argsort(-scores[allowed], kind="stable")[:10]]
    assert found.ids.tolist() == fs.item_ids[expected].tolist()
    similar = fs.similar_items(fs.item_ids[1], k=10, filter="rank0 >= 70000")
    assert len(similar.ids) == 10 and (fs.attributes.get_column("rank0").to_numpy()[similar.ids] >= 70_000).all()


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_items=st.integers(2, 60), k=st.integers(1, 40), flt=filters())
def test_an_approximate_index_that_comes_back_short_still_answers_exactly_k(tmp_path_factory, seed, n_items, k, flt):
    """IVF2 searched with nprobe = 1 often finds fewer candidates than asked for (FAISS pads with
    -1): filtered lookups still return exactly min(k, items left), every one allowed."""
    fs, matrix = make_store(tmp_path_factory.mktemp("a"), seed, 4, n_items, 3, "IVF2,Flat")
    faiss.extract_index_ivf(fs.index.faiss).nprobe = 1
    text, predicate = flt
    allowed = {r["item_id"] for r in fs.attributes.to_dicts() if predicate(r) is True}
    for row, user in enumerate(fs.user_ids):
        seen = set(fs.item_ids[matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]].tolist())
        found = fs.recommend(user, k=k, filter=text)
        assert len(found.ids) == min(k, len(allowed - seen))
        assert set(found.ids.tolist()) <= allowed - seen
    found = fs.similar_items(fs.item_ids[0], k=k, filter=text)
    assert len(found.ids) == min(k, len(allowed - {fs.item_ids[0]}))


def test_cached_item_vectors_stay_within_the_versions_budget(big, monkeypatch):
    fs, _ = big
    monkeypatch.setattr(lookup, "SUBSET_CACHE_BYTES", fs._cached_vector_bytes + 20_000 * 9 * 4)
    first = fs.recommend(fs.user_ids[2], k=5, filter="rank0 < 9000")  # 9,000 × 9 floats: kept
    kept = fs._cached_vector_bytes
    assert fs._filter_cache["rank0 < 9000"].vector_bytes == 9000 * 9 * 4
    again = fs.recommend(fs.user_ids[2], k=5, filter="rank0 < 20000")  # over the budget: made per call
    assert fs._filter_cache["rank0 < 20000"].vector_bytes == 0 and fs._cached_vector_bytes == kept
    assert fs.recommend(fs.user_ids[2], k=5, filter="rank0 < 20000").ids.tolist() == again.ids.tolist()
    assert fs.recommend(fs.user_ids[2], k=5, filter="rank0 < 9000").ids.tolist() == first.ids.tolist()
