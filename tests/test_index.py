"""Index choice and loading: the `auto` rule, factory strings, memory-mapped opening."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from aefeatures.errors import BadInputError
from aefeatures.store.index import (
    EmbeddingIndex,
    build_index,
    factory_string,
    item_queries,
    item_rows,
    load_index,
    on_sphere,
    pq_split,
    save_index,
    search,
    stored_rows,
    user_queries,
)


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


@pytest.mark.parametrize("width", range(2, 300))
def test_product_quantization_codes_sub_vectors_of_4_to_16_dims_at_every_width(width):
    padded_width, m = pq_split(width)
    assert padded_width >= width and padded_width % m == 0 and 4 <= padded_width // m <= 16
    assert padded_width - width < 4  # padding only as far as the next width with a good split


def test_ivfpq_at_a_prime_width_pads_instead_of_one_dimensional_sub_quantizers():
    # 15 dims + bias + the sphere's column = 17, a prime: it used to give PQ17 (17 one-dim codes)
    assert factory_string("ivfpq", 5000, 17) == "Pad18,IVF128,PQ2"
    assert factory_string("ivfpq", 5000, 16) == "IVF128,PQ2"
    assert factory_string("ivfpq", 5000, 64) == "IVF128,PQ8"


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
    np.testing.assert_array_equal(search(reopened, queries, 10)[1], search(built.index, queries, 10)[1])
    if kind == "ivfpq":  # compressed: the exact rows are not in the index
        assert stored_rows(reopened) is None
    else:  # item vectors come straight from the index, in item-row order (approximate kinds: on a sphere)
        np.testing.assert_array_equal(stored_rows(reopened), rows if kind == "flat" else on_sphere(rows))


def test_rows_on_a_sphere_keep_every_score_and_share_one_norm():
    rng = np.random.default_rng(1)
    rows = item_rows(rng.normal(size=(300, 8)).astype(np.float32) * rng.uniform(0.01, 3, size=(300, 1)),
                     rng.normal(size=300).astype(np.float32))
    lifted = on_sphere(rows)
    assert lifted.shape == (300, 10) and lifted.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(lifted, axis=1), np.linalg.norm(rows, axis=1).max(), rtol=1e-5)
    for queries in (user_queries(rng.normal(size=(20, 8)).astype(np.float32)), item_queries(rows[:20, :8])):
        padded = np.hstack([queries, np.zeros((20, 1), np.float32)])
        np.testing.assert_allclose(padded @ lifted.T, queries @ rows.T, rtol=1e-5, atol=1e-5)


def test_ivf_over_rows_whose_bias_decides_finds_the_exact_top_items():
    """Small item vectors next to their biases, as a weakly trained model leaves them: the
    index is built over the rows on a sphere and search returns the exact top items."""
    rng = np.random.default_rng(2)
    rows = item_rows((0.05 * rng.normal(size=(20_000, 16))).astype(np.float32),
                     (0.01 * rng.standard_t(2, size=20_000)).astype(np.float32))
    queries = user_queries((16 / 4 * rng.normal(size=(200, 16))).astype(np.float32))
    built = build_index(rows, "ivf", sample_queries=queries, target_recall=0.95)
    assert built.index.d == rows.shape[1] + 1 and built.recall_at_10 >= 0.95
    exact = np.argsort(-(queries @ rows.T), axis=1)[:, :10]
    found = search(built.index, queries, 10)[1]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(exact.tolist(), found.tolist())]) / 10 >= 0.95


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
        from aefeatures.store.index import search_effort
        assert search_effort(load_index(tmp_path / "index.faiss")) == tuned.search  # saved with it


def test_the_embedding_index_checks_the_manifests_width_and_refuses_queries_of_another(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32)
    rows = item_rows(vectors, rng.normal(size=3000).astype(np.float32))
    for kind in ("flat", "ivf"):  # 9-wide rows; 10-wide on a sphere
        save_index(build_index(rows, kind).index, tmp_path / f"{kind}.faiss")
        index = EmbeddingIndex.open(tmp_path / f"{kind}.faiss", dim=8)
        queries = user_queries(vectors[:5])
        np.testing.assert_array_equal(index.search(queries, 10)[1], search(index.faiss, queries, 10)[1])
        for wrong in (queries[:, :8], queries[:, :4], np.hstack([queries, queries])):  # no silent zero-padding
            with pytest.raises(BadInputError, match=r"index queries must be 9 wide .* shape \(5, "):
                index.search(wrong, 10)
        for dim in (6, 12):
            with pytest.raises(BadInputError, match=rf"holds {9 if kind == 'flat' else 10}-wide rows but its "
                                                    rf"version's manifest says dim {dim}"):
                EmbeddingIndex.open(tmp_path / f"{kind}.faiss", dim=dim)
    with pytest.raises(BadInputError, match=r"holds 10-wide rows but its version's manifest says dim 8 \(rows 9 wide\)"):
        EmbeddingIndex.open(tmp_path / "ivf.faiss", dim=8, on_sphere=False)  # a manifest saying "flat"
    with pytest.raises(BadInputError, match="does not score by inner product"):
        EmbeddingIndex(faiss.IndexFlatL2(9), dim=8)


def test_search_pads_only_the_spheres_column():
    rows = item_rows(np.eye(6, 4, dtype=np.float32), np.zeros(6, np.float32))
    built = build_index(rows, "HNSW4,Flat")  # verbatim: 5-wide rows, as they are
    with pytest.raises(BadInputError, match="must be 5 wide"):
        search(built.index, user_queries(np.eye(2, 2, dtype=np.float32)), 3)  # used to be padded with zeros


def test_ivfpq_trains_without_the_polysemous_step_and_answers_as_with_it():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    built = build_index(rows, "IVF16,PQ2")
    assert faiss.downcast_index(faiss.extract_index_ivf(built.index)).do_polysemous_training is False
    with_step = faiss.index_factory(16, "IVF16,PQ2", faiss.METRIC_INNER_PRODUCT)
    assert faiss.downcast_index(faiss.extract_index_ivf(with_step)).do_polysemous_training is True
    with_step.train(rows)
    with_step.add(rows)
    for index in (built.index, with_step):
        faiss.extract_index_ivf(index).nprobe = 16
    # the step only relabels each sub-quantizer's centroids: the same scores and items
    ours, theirs = built.index.search(queries, 10), with_step.search(queries, 10)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[1], theirs[1])
