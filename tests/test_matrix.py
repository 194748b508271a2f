"""Stage 2: the linear CSR build (id codes, one sort of pair keys, adjacent duplicates collapsed)
gives exactly what a plain Polars group_by + sort gives, on the fixture and on random rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aefeatures.config import InputConfig
from aefeatures.data.matrix import _sorted, _sorting_order, build_matrix, code_ids, collapse_pairs
from aefeatures.data.read import Interactions, read_interactions

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "interactions.parquet"
UTC = pl.Datetime("us", "UTC")


def reference_pairs(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per (user, item): largest weight, latest timestamp; sorted by user, then item."""
    return (rows.group_by("user_id", "item_id")
            .agg(pl.col("weight").max().cast(pl.Float32), pl.col("timestamp").max())
            .sort("user_id", "item_id"))


def reference_latest(rows: pl.DataFrame, key: str, ids: pl.Series) -> np.ndarray:
    latest = rows.group_by(key).agg(pl.col("timestamp").max())
    ordered = pl.DataFrame({key: ids}).join(latest, on=key, how="left", maintain_order="left")
    return ordered["timestamp"].dt.replace_time_zone(None).to_numpy().astype("datetime64[us]")


def assert_matches_reference(rows: pl.DataFrame) -> None:
    """``rows`` (user_id, item_id, weight, timestamp, duplicates allowed) collapsed both ways."""
    expected = reference_pairs(rows)
    pairs = collapse_pairs(rows["user_id"], rows["item_id"], weights=rows["weight"], timestamps=rows["timestamp"])
    assert pairs.frame().equals(expected)
    assert pairs.user_ids.to_list() == expected["user_id"].unique().sort().to_list()
    assert pairs.item_ids.to_list() == expected["item_id"].unique().sort().to_list()
    matrix = build_matrix(Interactions(rows, (), rows.height, rows.height, True), binarize=False)
    rows_of_pairs = np.searchsorted(matrix.user_ids.to_numpy(), expected["user_id"].to_numpy())
    np.testing.assert_array_equal(matrix.indptr, np.searchsorted(rows_of_pairs, np.arange(matrix.shape[0] + 1)))
    assert matrix.item_ids.gather(matrix.indices).to_list() == expected["item_id"].to_list()
    np.testing.assert_array_equal(matrix.values, expected["weight"].to_numpy())
    assert (matrix.indptr.dtype, matrix.indices.dtype, matrix.values.dtype) == (np.int64, np.int32, np.float32)
    np.testing.assert_array_equal(matrix.user_last_seen, reference_latest(rows, "user_id", matrix.user_ids))
    np.testing.assert_array_equal(matrix.item_last_seen, reference_latest(rows, "item_id", matrix.item_ids))


def test_the_fixture_collapses_like_a_group_by():
    source = pl.read_parquet(FIXTURE)
    rows = source.select("user_id", "item_id", pl.col("rating").cast(pl.Float64).alias("weight"),
                         pl.col("timestamp").cast(UTC))
    assert (rows.height, reference_pairs(rows).height) == (57879, 56648)  # 1123 pairs repeat
    assert_matches_reference(rows)
    got = read_interactions(InputConfig(str(FIXTURE), weight_col="rating", timestamp_col="timestamp"))
    assert got.frame.equals(reference_pairs(rows))  # in CSR order, without sorting


def test_the_fixture_matrix_is_the_group_by_in_csr_order():
    got = read_interactions(InputConfig(str(FIXTURE), weight_col="rating", timestamp_col="timestamp"))
    expected = reference_pairs(pl.read_parquet(FIXTURE).rename({"rating": "weight"}))
    weighted, binary = build_matrix(got, binarize=False), build_matrix(got)
    assert weighted.item_ids.gather(weighted.indices).to_list() == expected["item_id"].to_list()
    assert weighted.values.tolist() == expected["weight"].to_list()
    assert binary.values.tolist() == [1.0] * len(expected)
    np.testing.assert_array_equal(binary.indices, weighted.indices)


ids = st.integers(0, 12)
ROWS = st.lists(st.tuples(ids, ids, st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.25]),
                          st.one_of(st.none(), st.integers(0, 40))), min_size=1, max_size=80)
# Each spelling of the same ids takes a different coding path: a lookup table from 0, one
# shifted to negative ids, a hash table for sparse (wide) integers, and one for strings.
SPELLINGS = {
    "small": lambda i: i,
    "negative": lambda i: i - 1000,
    "sparse": lambda i: i * 10**15 - 7,
    "string": lambda i: f"id-{i:x}",
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@given(rows=ROWS)
def test_random_rows_with_duplicates_collapse_like_a_group_by(spelling, rows):
    spell = SPELLINGS[spelling]
    frame = pl.DataFrame({
        "user_id": [spell(u) for u, _, _, _ in rows],
        "item_id": [spell(i) for _, i, _, _ in rows],
        "weight": [w for _, _, w, _ in rows],
        "timestamp": [None if t is None else dt.datetime(2024, 1, 1) + dt.timedelta(hours=t) for *_, t in rows],
    }, schema_overrides={"weight": pl.Float64, "timestamp": UTC})
    assert_matches_reference(frame)


def test_a_catalogue_past_32_bit_pair_keys_collapses_like_a_group_by():
    n = 70_000  # 70,000 users × 70,000 items: pair keys need 64 bits
    rng = np.random.default_rng(0)
    users = np.concatenate([np.arange(n), rng.integers(0, n, 5000)])
    items = np.concatenate([rng.permutation(n), rng.integers(0, n, 5000)])
    frame = pl.DataFrame({"user_id": users, "item_id": items, "weight": rng.random(len(users)),
                          "timestamp": rng.integers(0, 10**12, len(users))},
                         schema_overrides={"timestamp": pl.Datetime("us")}).with_columns(pl.col("timestamp").cast(UTC))
    frame = pl.concat([frame, frame.head(3000)])  # exact duplicates too
    assert_matches_reference(frame)


def test_rows_already_in_csr_order_give_the_same_pairs():
    rows = pl.DataFrame({"user_id": [1, 1, 1, 2, 5, 5], "item_id": [3, 3, 4, 1, 2, 9],
                         "weight": [1.0, 2.0, 1.0, 4.0, 1.0, 1.0],
                         "timestamp": [dt.datetime(2024, 1, d) for d in (5, 2, 3, 4, 1, 6)]},
                        schema_overrides={"timestamp": UTC})
    assert_matches_reference(rows)
    assert_matches_reference(rows.reverse())


@pytest.mark.parametrize("values", [
    [5, 3, 5, -2, 0, 3],
    [10**18, -(10**18), 7, 7],
    ["b", "a", "C", "aa", "b"],
])
def test_codes_are_rows_in_the_sorted_distinct_ids(values):
    series = pl.Series("id", values)
    vocabulary, codes = code_ids(series)
    assert vocabulary.to_list() == sorted(set(values))
    assert codes.dtype == np.int32
    assert vocabulary.gather(codes).to_list() == values


@pytest.mark.parametrize("keys", [
    np.array([9, 2, 9, 0, 2, 2, 7], dtype=np.uint32),
    np.array([2**40, 3, 2**40, 3, 1], dtype=np.uint64),
    np.array([2**63 + 5, 1, 2**63 + 5, 2**63, 1], dtype=np.uint64),  # too wide to pack positions
    np.array([1, 1, 2, 5], dtype=np.uint32),  # already sorted
])
def test_sorting_order_is_a_stable_argsort(keys):
    np.testing.assert_array_equal(_sorting_order(keys), np.argsort(keys, kind="stable"))


def test_without_weights_or_timestamps_pairs_weigh_one_and_have_no_time():
    pairs = collapse_pairs(pl.Series([3, 1, 3]), pl.Series(["x", "y", "x"]))
    assert pairs.weights.tolist() == [1.0, 1.0] and pairs.weights.dtype == np.float32
    assert np.isnat(pairs.timestamps).all() and np.isnat(pairs.user_last_seen).all()
    assert pairs.frame()["timestamp"].null_count() == 2


@pytest.mark.parametrize("keys", [
    np.random.default_rng(2).integers(0, 2**32, 1_500_000).astype(np.uint32),
    np.random.default_rng(3).integers(0, 3, 1_500_000).astype(np.uint64),  # parts of equal keys
    np.full(1_200_000, 9, dtype=np.uint32),
])
def test_large_key_arrays_sorted_in_parts_are_sorted(keys):
    np.testing.assert_array_equal(_sorted(keys), np.sort(keys))


@pytest.mark.parametrize("values, dtype", [
    ([2**63 + 3, 2**63, 2**63 + 3, 2**64 - 1], pl.UInt64),  # hashes: sparse, above the int64 range
    ([2**63 + 3, 2**63, 2**63 + 3, 2**63 + 1], pl.UInt64),  # dense near 2**63: the lookup-table path
    ([-5, -3, -5, -4], pl.Int64),
])
def test_code_ids_keeps_every_integer_id_exact(values, dtype):
    from aefeatures.data.matrix import code_ids

    vocabulary, codes = code_ids(pl.Series(values, dtype=dtype))
    assert vocabulary.dtype == dtype and vocabulary.to_list() == sorted(set(values))
    assert [vocabulary[int(c)] for c in codes] == values


def test_log1p_feeds_the_log_of_one_plus_each_weight(tmp_path):
    path = tmp_path / "plays.parquet"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 20, 10], "plays": [0.0, 99.0, 352_000.0]}).write_parquet(path)
    interactions = read_interactions(InputConfig(str(path), weight_col="plays"))
    raw = build_matrix(interactions, binarize=False)
    logged = build_matrix(interactions, binarize=False, weight_transform="log1p")
    np.testing.assert_allclose(logged.values, np.log1p(raw.values), rtol=1e-6)
    assert logged.values.dtype == np.float32 and list(raw.values) == [0.0, 99.0, 352_000.0]
    assert list(build_matrix(interactions, weight_transform="log1p").values) == [1.0, 1.0, 1.0]  # binarized
