"""Index choice and loading: the `auto` rule, factory strings, memory-mapped opening."""

from __future__ import annotations

import numpy as np
import pytest

from aefeatures.index import build_index, factory_string, item_rows, load_index, save_index, user_queries


@pytest.mark.parametrize("n_items,width,expected", [
    (500, 65, "Flat"),
    (100_000, 65, "Flat"),
    (100_001, 65, "HNSW32,Flat"),
    (16_000_000, 65, "HNSW32,Flat"),  # 4.16e9 bytes of vectors: within 4 GiB
    (20_000_000, 65, "IVF17888,PQ13"),  # 5.2e9 bytes: compressed to 13 bytes an item
])
def test_auto_is_exact_for_small_catalogues_then_hnsw_then_compressed(n_items, width, expected):
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
