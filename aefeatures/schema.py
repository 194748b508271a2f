"""Data contracts, written down once: the interaction frame inside the pipeline and the tables
a published version holds (see README "Store layout").
"""

from __future__ import annotations

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
