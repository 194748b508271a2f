"""Property tests: over random stores, lookups return exactly k, never a seen item, never -1."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.random_store import publish_random

# IVF2 is searched with nprobe = 1 below, so it often finds fewer than k candidates (FAISS pads
# with -1): the lookups must notice and still answer exactly.
KINDS = st.sampled_from(["flat", "HNSW4,Flat", "IVF2,Flat"])


def make_store(root, seed: int, n_users: int, n_items: int, dim: int, kind: str):
    """A published version with random interactions and random (untrained) vectors."""
    def tune(index):
        if kind.startswith("IVF"):
            faiss.extract_index_ivf(index).nprobe = 1

    return publish_random(root, f"v{seed}", np.random.default_rng(seed), n_users, n_items, dim, kind, tune=tune)


def excluded_ids(fs, fraction: float, seed: int) -> list:
    """A random share of the catalogue plus two ids that are not in it (ignored by lookups)."""
    rng = np.random.default_rng(seed)
    chosen = fs.item_ids[rng.random(fs.n_items) < fraction].tolist()
    return chosen + [-7, 10**9]


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 12), n_items=st.integers(2, 40),
       dim=st.integers(1, 6), kind=KINDS, k=st.integers(1, 60), fraction=st.sampled_from([0.0, 0.2, 0.6, 1.0]))
def test_recommend_is_exact_k_and_never_returns_seen_or_excluded_items(tmp_path_factory, seed, n_users, n_items,
                                                                       dim, kind, k, fraction):
    fs, matrix = make_store(tmp_path_factory.mktemp("p"), seed, n_users, n_items, dim, kind)
    exclude = excluded_ids(fs, fraction, seed)
    batch = fs.recommend_batch(list(fs.user_ids), k=k, exclude=exclude)
    catalogue = set(fs.item_ids.tolist())
    for row, user in enumerate(fs.user_ids):
        seen = set(fs.item_ids[matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]].tolist())
        skipped = seen | (set(exclude) & catalogue)
        recs = fs.recommend(user, k=k, exclude=exclude)
        assert len(recs.ids) == min(k, fs.n_items - len(skipped))
        assert not skipped & set(recs.ids.tolist())
        assert len(set(recs.ids.tolist())) == len(recs.ids)
        assert set(recs.ids.tolist()) <= catalogue  # never a FAISS -1
        assert np.all(np.diff(recs.scores) <= 1e-5)
        if kind == "flat":  # exact search: the scores are the best the model gives the candidates
            exact = fs._index_rows @ np.append(fs.user_embedding(user), 1.0)
            candidates = [j for j, item in enumerate(fs.item_ids.tolist()) if item not in skipped]
            best = np.sort(exact[candidates])[::-1][: len(recs.ids)]
            np.testing.assert_allclose(recs.scores, best, rtol=1e-4, atol=1e-4)
        rows = batch.filter(pl.col("user_id") == user)
        assert rows.get_column("item_id").to_list() == recs.ids.tolist()


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_items=st.integers(2, 40), kind=KINDS, k=st.integers(1, 60),
       fraction=st.sampled_from([0.0, 0.3, 1.0]))
def test_similar_items_is_exact_k_without_the_item_or_excluded(tmp_path_factory, seed, n_items, kind, k, fraction):
    fs, _ = make_store(tmp_path_factory.mktemp("p"), seed, 3, n_items, 4, kind)
    exclude = excluded_ids(fs, fraction, seed)
    catalogue = set(fs.item_ids.tolist())
    for item in fs.item_ids[:5]:
        skipped = {item} | (set(exclude) & catalogue)
        for metric in ("ip", "cosine"):
            found = fs.similar_items(item, k=k, metric=metric, exclude=exclude)
            assert len(found.ids) == min(k, fs.n_items - len(skipped))
            assert not skipped & set(found.ids.tolist()) and len(set(found.ids.tolist())) == len(found.ids)
