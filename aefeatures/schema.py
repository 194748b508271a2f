"""Data contracts, written down once: the interaction frame inside the pipeline and the tables
a published version holds (see README "Store layout").
"""

from __future__ import annotations

import pyarrow as pa

from aefeatures import errors

KS = (10, 20, 100)  # cut-offs of the ranking metrics (Recall@k, NDCG@k, coverage@k)
KEY_METRIC = "ndcg@100"  # the metric that chooses epochs, gates versions and compares them

# 2: `event_timestamp` is when the version's values became valid (the moment its tables were
#    written, after training), not the entity's latest interaction, which moved to its own column
#    `last_interaction`. Readers accept every version up to SCHEMA_VERSION (see `check_schema_version`).
SCHEMA_VERSION = 2

# Canonical column names of the interaction frame after reading (whatever the input calls them).
USER, ITEM, WEIGHT, TIMESTAMP = "user_id", "item_id", "weight", "timestamp"

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


def embedding_type(dim: int) -> pa.DataType:
    """The `embedding` column: a fixed-size list of float32, so readers know the width."""
    return pa.list_(pa.float32(), dim)


def users_schema(id_type: pa.DataType, dim: int) -> pa.Schema:
    """`users.parquet`: one row per user, sorted by `user_id`.

    Point-in-time semantics (schema 2): `event_timestamp` is when the version's values became
    valid — the same instant on every row of a version, taken after training, when the tables
    are written — because a model-made embedding did not exist before the model (Feast's
    point-in-time join returns, for an entity row at time t, the latest row with
    `event_timestamp` <= t). `created_timestamp` is when the row was written (equal here; Feast
    uses it to break ties between rows with the same event timestamp). `last_interaction` is
    the user's latest interaction in the input (null without a timestamp column).
    """
    return pa.schema(
        [
            pa.field(USER, id_type, nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
            pa.field("n_interactions", pa.int32(), nullable=False),
            pa.field("reconstruction_error", pa.float32(), nullable=False),
            pa.field("anomaly_score", pa.float32(), nullable=False),
            pa.field("last_interaction", TIMESTAMP_TYPE, nullable=True),  # null without timestamps
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
            pa.field("last_interaction", TIMESTAMP_TYPE, nullable=True),  # null without timestamps
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


def check_schema_version(found: object, where: str) -> int:
    """The schema version a manifest declares, checked readable: 1 (before `last_interaction`;
    its `event_timestamp` was the latest interaction) up to :data:`SCHEMA_VERSION`.

    Raises ``errors.StoreError`` (exit 2) for a version written by a newer aefeatures.
    """
    version = int(found) if isinstance(found, (int, str)) and str(found).isdigit() else 1
    if version > SCHEMA_VERSION:
        raise errors.newer_schema(where, version, SCHEMA_VERSION)
    return version
