"""Data contracts, written down once: the interaction frame inside the pipeline and the tables
a published version holds (see README "Store layout").
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pyarrow as pa

KS = (10, 20, 100)  # cut-offs of the ranking metrics (Recall@k, NDCG@k, coverage@k)
KEY_METRIC = "ndcg@100"  # the metric that chooses epochs, gates versions and compares them

SCHEMA_VERSION = 1

# Canonical column names of the interaction frame after reading (whatever the input calls them).
USER, ITEM, WEIGHT, TIMESTAMP = "user_id", "item_id", "weight", "timestamp"

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


def embedding_type(dim: int) -> pa.DataType:
    """The `embedding` column: a fixed-size list of float32, so readers know the width."""
    return pa.list_(pa.float32(), dim)


def users_schema(id_type: pa.DataType, dim: int) -> pa.Schema:
    """`users.parquet`: one row per user, sorted by `user_id`."""
    return pa.schema(
        [
            pa.field(USER, id_type, nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
            pa.field("n_interactions", pa.int32(), nullable=False),
            pa.field("reconstruction_error", pa.float32(), nullable=False),
            pa.field("anomaly_score", pa.float32(), nullable=False),
            pa.field("event_timestamp", TIMESTAMP_TYPE, nullable=False),
            pa.field("created_timestamp", TIMESTAMP_TYPE, nullable=False),
        ]
    )


def items_schema(id_type: pa.DataType, dim: int) -> pa.Schema:
    """`items.parquet`: one row per item, sorted by `item_id`; row number = FAISS id.

    A user's model score for item j is ``user.embedding · item.embedding + item.bias``.
    """
    return pa.schema(
        [
            pa.field(ITEM, id_type, nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
            pa.field("bias", pa.float32(), nullable=False),
            pa.field("popularity", pa.int32(), nullable=False),
            pa.field("event_timestamp", TIMESTAMP_TYPE, nullable=False),
            pa.field("created_timestamp", TIMESTAMP_TYPE, nullable=False),
        ]
    )


def interactions_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    """`interactions.parquet`: the deduplicated pairs the version learned from, in CSR order.

    `user_row` / `item_row` are row numbers in users/items.parquet, so lookups rebuild the
    "already seen" matrix without a join.
    """
    return pa.schema(
        [
            pa.field(USER, user_type, nullable=False),
            pa.field(ITEM, item_type, nullable=False),
            pa.field("user_row", pa.int32(), nullable=False),
            pa.field("item_row", pa.int32(), nullable=False),
            pa.field("weight", pa.float32(), nullable=False),
        ]
    )


def table_metadata(name: str, version: str, dim: int) -> dict[bytes, bytes]:
    """Parquet key-value metadata carried by every table of a version."""
    return {
        b"aefeatures.schema_version": str(SCHEMA_VERSION).encode(),
        b"aefeatures.feature_set": name.encode(),
        b"aefeatures.version": version.encode(),
        b"aefeatures.dim": str(dim).encode(),
    }


def strict_json(value: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON (RFC 8259: no NaN, Infinity or -Infinity).

    JSON has no number for NaN or ±inf, so such a float (Python or NumPy) is written as
    ``null``: the one rule of every JSON answer of the CLI and the HTTP service. Published
    versions never hold one (a run refuses to publish them); only results of user SQL or versions
    written by older releases can.
    """
    try:
        return json.dumps(value, default=default, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite_or_null(value, default), allow_nan=False, **kwargs)


def _finite_or_null(value: Any, default: Callable[[Any], Any] | None) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, default) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if default is not None:
        return _finite_or_null(default(value), default)
    return value
