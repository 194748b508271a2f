"""Data contracts, written down once: the interaction frame inside the pipeline and the tables
a published version holds (see README "Store layout").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from aefeatures import errors

KS = (10, 20, 100)  # cut-offs of the ranking metrics (Recall@k, NDCG@k, coverage@k)
KEY_METRIC = "ndcg@100"  # the metric that chooses epochs, gates versions and compares them

SCHEMA_VERSION = 1  # of the tables and of manifest.json; a reader refuses newer ones


class Manifest(dict):
    """A version's ``manifest.json``: the JSON object itself (keys unchanged, so every reader
    that indexes it by key keeps working), with typed accessors for the facts every reader
    needs. Made only by :meth:`from_json`, which checks ``schema_version``.
    """

    REQUIRED = ("version", "dim")  # what opening a version needs; other keys are read where used

    @property
    def schema_version(self) -> int:
        return int(self.get("schema_version", 1))  # the first manifests had no such key

    @property
    def feature_set(self) -> str:
        return str(self["feature_set"])

    @property
    def version(self) -> str:
        return str(self["version"])

    @property
    def dim(self) -> int:
        """Width of the user and item embeddings."""
        return int(self["dim"])

    @property
    def embedded_with(self) -> str | None:
        """The version whose model embedded this one's users (`aefeatures embed`), or None for a
        trained version."""
        return (self.get("embedded_with") or {}).get("version")

    @classmethod
    def from_json(cls, text: str, where: Path | str) -> "Manifest":
        """Parse ``text`` (the manifest at ``where``).

        Raises
        ------
        BadInputError
            Not a JSON object, a required key missing, or a ``schema_version`` newer than
            this aefeatures reads (written by a newer release).
        """
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise errors.bad_manifest(where, f"it is not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise errors.bad_manifest(where, "it is not a JSON object")
        found = raw.get("schema_version", 1)
        if not isinstance(found, int) or isinstance(found, bool) or found < 1:
            raise errors.bad_manifest(where, f"`schema_version` is {found!r}, not a positive integer")
        if found > SCHEMA_VERSION:
            raise errors.newer_manifest(where, found, SCHEMA_VERSION)
        missing = [key for key in cls.REQUIRED if key not in raw]
        if missing:
            raise errors.bad_manifest(where, f"it lacks {', '.join(f'`{k}`' for k in missing)}")
        return cls(raw)

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
