"""Publishing refuses non-finite values: `check_finite` over staged tables, strict manifests."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aefeatures import errors
from aefeatures.store import publish


def _users(path, embedding: list[float], error: float) -> None:
    pq.write_table(pa.table({
        "user_id": pa.array([1, 2], pa.int64()),
        "embedding": pa.array([embedding, [0.0, 1.0]], pa.list_(pa.float32(), 2)),
        "reconstruction_error": pa.array([error, 0.5], pa.float32()),
    }), path / "users.parquet")


def test_finite_tables_pass(tmp_path):
    _users(tmp_path, [0.5, 1.5], 0.1)
    publish.check_finite(tmp_path)


@pytest.mark.parametrize("embedding, error, column", [
    ([float("nan"), 1.0], 0.1, "embedding"),
    ([0.0, float("-inf")], 0.1, "embedding"),
    ([0.0, 1.0], float("inf"), "reconstruction_error"),
])
def test_a_non_finite_value_stops_publishing(tmp_path, embedding, error, column):
    _users(tmp_path, embedding, error)
    with pytest.raises(errors.NonFiniteOutputError, match=f"`{column}` in users.parquet") as caught:
        publish.check_finite(tmp_path)
    assert caught.value.exit_code == 1


def test_manifest_with_nan_metric_is_refused(tmp_path):
    with pytest.raises(errors.NonFiniteOutputError, match="manifest"):
        publish.write_manifest(tmp_path, {"evaluation": {"ndcg@100": float("nan")}})
    assert not (tmp_path / "manifest.json").exists()
    publish.write_manifest(tmp_path, {"evaluation": {"ndcg@100": np.float32(0.5).item()}})
    json.loads((tmp_path / "manifest.json").read_text(), parse_constant=_no_constant)


def _no_constant(name: str):
    raise AssertionError(f"non-strict JSON constant {name}")
