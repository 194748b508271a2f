"""Index choice and loading: the `auto` rule, factory strings, memory-mapped opening."""

from __future__ import annotations

import numpy as np
import pytest

from aefeatures.index import (build_index, factory_string, item_rows, load_index, save_index, stored_rows,
                              user_queries)


@pytest.mark.parametrize("n_items,width,expected", [
    (500, 65, "Flat"),
    (100_000, 65, "Flat"),
    (100_001, 65, "IVF1264,Flat"),
    (16_000_000, 65, "IVF16000,Flat"),  # 4.16e9 bytes of vectors: within 4 GiB
    (20_000_000, 65, "IVF17888,PQ13"),  # 5.2e9 bytes: compressed to 13 bytes an item
])
def test_auto_is_exact_for_small_catalogues_then_ivf_then_compressed(n_items, width, expected):
    assert factory_string("auto", n_items, width) == expected


def test_named_kinds_and_verbatim_factory_strings():
    assert factory_string("flat", 10, 9) == "Flat"
    assert factory_string("ivf", 10_000, 9) == "IVF256,Flat"
    assert factory_string("ivfpq", 10_000, 65) == "IVF256,PQ13"
    assert factory_string("IVF64,SQ8", 10_000, 65) == "IVF64,SQ8"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_every_kind_reopens_memory_mapped_with_the_same_answers(tmp_path, kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 15)).astype(np.float32)
    vectors = centers[rng.integers(20, size=5000)] + 0.1 * rng.normal(size=(5000, 15)).astype(np.float32)
    rows = item_rows(vectors, rng.normal(size=5000).astype(np.float32))
    queries = user_queries(centers[rng.integers(20, size=50)])
    built = build_index(rows, kind, sample_queries=queries)
    assert 0.0 < built.recall_at_10 <= 1.0
    save_index(built.index, tmp_path / "index.faiss")
    reopened = load_index(tmp_path / "index.faiss")
    np.testing.assert_array_equal(reopened.search(queries, 10)[1], built.index.search(queries, 10)[1])
    if kind == "ivfpq":  # compressed: the exact rows are not in the index
        assert stored_rows(reopened) is None
    else:  # item vectors come straight from the index, in item-row order
        np.testing.assert_array_equal(stored_rows(reopened), rows)


def test_search_effort_rises_until_the_recall_target_is_met(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(30, 15)).astype(np.float32)
    vectors = centers[rng.integers(30, size=20000)] + rng.normal(size=(20000, 15)).astype(np.float32)
    rows = item_rows(vectors, rng.normal(size=20000).astype(np.float32))
    queries = user_queries(centers[rng.integers(30, size=200)] + rng.normal(size=(200, 15)).astype(np.float32))
    for kind, knob in (("HNSW8,Flat", "efSearch"), ("IVF256,Flat", "nprobe")):
        plain = build_index(rows, kind, sample_queries=queries)
        tuned = build_index(rows, kind, sample_queries=queries, target_recall=0.99)
        assert tuned.recall_at_10 >= min(0.99, plain.recall_at_10)
        assert tuned.search[knob] >= plain.search[knob]
        if plain.recall_at_10 < 0.99:
            assert tuned.search[knob] > plain.search[knob] and tuned.recall_at_10 > plain.recall_at_10
        save_index(tuned.index, tmp_path / "index.faiss")
        from aefeatures.index import search_effort
        assert search_effort(load_index(tmp_path / "index.faiss")) == tuned.search  # saved with it
