"""Stage 5: a version's Parquet tables (users, items, interactions), written a row group at a time."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aefeatures import schema
from aefeatures.quality.anomaly import anomaly_scores
from aefeatures.store.layout import ATTRIBUTES, INTERACTIONS, ITEMS, NEIGHBOURS, USERS

if TYPE_CHECKING:
    from aefeatures.data.matrix import InteractionMatrix
    from aefeatures.model.embed import Embeddings
    from aefeatures.model.neighbours import ItemNeighbours
USERS_PER_ROW_GROUP = 65_536  # users.parquet row groups: 16 MiB of 64-dim vectors
PAIRS_PER_ROW_GROUP = 1 << 20  # interactions.parquet row groups (whole users each)
_PARTS = ".parts"  # a version's part files while several ranks write it


def _compression(table_schema: pa.Schema) -> dict[str, str]:
    """zstd, but for embeddings: float vectors gain ~10% from it, and decoding it made opening
    a 1M-item version 2.8× slower (1.09 s against 0.39 s to read the vectors)."""
    return {name: "none" if name == "embedding" else "zstd" for name in table_schema.names}


@dataclass(frozen=True)
class Shard:
    """The users a process writes: all of them, or under torchrun one rank's contiguous range,
    written to part files that :func:`join_parts` joins. Item statistics and anomaly scores are
    always over all users."""

    rank: int
    world_size: int
    first_user_row: int  # the row of the shard's first user among all users
    anomaly: np.ndarray  # (shard users,) anomaly scores against all users
    item_popularity: np.ndarray  # (n_items,) users per item, over all shards
    item_last_seen: np.ndarray  # (n_items,) datetime64[us], over all shards

    @classmethod
    def whole(cls, matrix: InteractionMatrix, emb: Embeddings) -> "Shard":
        """Every user, written by one process."""
        return cls(0, 1, 0, anomaly_scores(emb.reconstruction_error, matrix.row_lengths()),
                   matrix.item_popularity(), matrix.item_last_seen)


def write_tables(folder: Path, matrix: InteractionMatrix, emb: Embeddings, *,
                 name: str, version: str, created: datetime, shard: Shard | None = None,
                 folded_in: np.ndarray | None = None) -> dict[str, int]:
    """Write users, items and interactions Parquet files; return their row counts.

    ``created`` is the instant the version's values became valid: every row's
    `event_timestamp` and `created_timestamp` (schema 2, see :func:`aefeatures.schema.users_schema`);
    callers take it after training, just before writing, and record it as the manifest's
    `valid_from`. Each row's latest interaction goes to `last_interaction`.

    Users and interactions are written a row group at a time, and user vectors are taken from
    ``emb`` a row group at a time (:func:`aefeatures.model.embed.embed` computes them then), so
    memory holds one row group's vectors and pairs whatever the number of users.

    With a ``shard`` of several the users and interactions go to this rank's part files (the
    counts are the shard's), and rank 0 alone writes the items.

    ``folded_in`` (n_items,) int32: the users a folded-in item's vector rests on, 0 for a trained
    item (written as null); None: every item trained.
    """
    shard = shard or Shard.whole(matrix, emb)
    meta = schema.table_metadata(name, version, emb.dim)
    created_us = np.datetime64(created.astimezone(timezone.utc).replace(tzinfo=None), "us")
    user_ids, item_ids = _ids(matrix.user_ids), _ids(matrix.item_ids)
    users_path, interactions_path = (folder / USERS, folder / INTERACTIONS) if shard.world_size == 1 else \
        _part_paths(folder, shard.rank, create=True)
    _write_users(users_path, matrix, emb, user_ids, shard.anomaly,
                 schema.users_schema(user_ids.type, emb.dim).with_metadata(meta), created_us)
    _write_interactions(interactions_path, matrix, user_ids, item_ids, shard.first_user_row,
                        schema.interactions_schema(user_ids.type, item_ids.type).with_metadata(meta))
    if shard.rank == 0:
        items = pa.Table.from_arrays([
            item_ids,
            _fixed_list(emb.item_vectors),
            pa.array(emb.item_bias),
            pa.array(shard.item_popularity.astype(np.int32)),
            _timestamps(shard.item_last_seen),
            _timestamps(np.full(matrix.shape[1], created_us)),
            _timestamps(np.full(matrix.shape[1], created_us)),
            _folded_in(folded_in, matrix.shape[1]),
        ], schema=schema.items_schema(item_ids.type, emb.dim).with_metadata(meta))
        pq.write_table(items, folder / ITEMS, compression=_compression(items.schema))
    return {"users": matrix.shape[0], "items": matrix.shape[1], "interactions": matrix.nnz}


def write_attributes(folder: Path, table) -> None:
    """Write a version's item attributes (a Polars frame from
    :func:`aefeatures.data.attributes.align_attributes`: ``item_id`` first, one row per item in
    item-row order) to `attributes.parquet`."""
    table.write_parquet(folder / ATTRIBUTES, compression="zstd")


def write_neighbours(folder: Path, part: ItemNeighbours, item_ids, *, name: str, version: str, dim: int) -> dict[str, int]:
    """Write a dlae's sparse item-item part to `item_neighbours.parquet`
    (:func:`aefeatures.schema.neighbours_schema`: its weights with their column scale, as the
    model scores) and return the manifest's `item_neighbours` section. ``item_ids``: the
    version's item ids in item-row order (a Polars Series)."""
    ids = _ids(item_ids)
    meta = schema.table_metadata(name, version, dim)
    sources, targets = part.sources.astype(np.int32), part.targets.astype(np.int32)
    table = pa.Table.from_arrays([
        ids.take(pa.array(targets)),
        ids.take(pa.array(sources)),
        pa.array(targets),
        pa.array(sources),
        pa.array(part.scaled_weights()),
    ], schema=schema.neighbours_schema(ids.type).with_metadata(meta))
    pq.write_table(table, folder / NEIGHBOURS, compression="zstd")
    return {"per_item": part.per_item, "entries": part.nnz}


def join_parts(folder: Path, world_size: int) -> None:
    """Join the ranks' user and interaction part files, in rank order (which is user order),
    into the version's single tables, a row group at a time, and remove the parts."""
    for table, final in enumerate((USERS, INTERACTIONS)):
        parts = [pq.ParquetFile(_part_paths(folder, rank)[table]) for rank in range(world_size)]
        with pq.ParquetWriter(folder / final, parts[0].schema_arrow,
                              compression=_compression(parts[0].schema_arrow)) as writer:
            for part in parts:
                for group in range(part.num_row_groups):
                    writer.write_table(part.read_row_group(group))
    shutil.rmtree(folder / _PARTS)


def _part_paths(folder: Path, rank: int, *, create: bool = False) -> tuple[Path, Path]:
    """(users part, interactions part) of ``rank``."""
    parts = folder / _PARTS
    if create:
        parts.mkdir(exist_ok=True)
    return parts / f"users-{rank:05d}.parquet", parts / f"interactions-{rank:05d}.parquet"


def _write_users(path: Path, matrix: InteractionMatrix, emb: Embeddings, user_ids: pa.Array,
                 anomaly: np.ndarray, table_schema: pa.Schema, created_us: np.datetime64) -> None:
    n_interactions = matrix.row_lengths().astype(np.int32)
    last_seen = _timestamps(matrix.user_last_seen)
    with pq.ParquetWriter(path, table_schema, compression=_compression(table_schema)) as writer:
        for start in range(0, matrix.shape[0], USERS_PER_ROW_GROUP):
            stop = min(start + USERS_PER_ROW_GROUP, matrix.shape[0])
            writer.write_table(pa.Table.from_arrays([
                user_ids[start:stop],
                _fixed_list(emb.user_vectors[start:stop]),
                pa.array(n_interactions[start:stop]),
                pa.array(emb.reconstruction_error[start:stop]),
                pa.array(anomaly[start:stop]),
                last_seen[start:stop],
                _timestamps(np.full(stop - start, created_us)),
                _timestamps(np.full(stop - start, created_us)),
            ], schema=table_schema))


def _write_interactions(path: Path, matrix: InteractionMatrix, user_ids: pa.Array, item_ids: pa.Array,
                        first_user_row: int, table_schema: pa.Schema) -> None:
    """The pairs in CSR order, a row group of whole users at a time."""
    lengths = matrix.row_lengths()
    with pq.ParquetWriter(path, table_schema, compression="zstd") as writer:
        for start, stop in _user_ranges(matrix.indptr, PAIRS_PER_ROW_GROUP):
            user_rows = np.repeat(np.arange(start, stop, dtype=np.int32), lengths[start:stop])
            item_rows = pa.array(matrix.indices[matrix.indptr[start]:matrix.indptr[stop]])
            writer.write_table(pa.Table.from_arrays([
                user_ids.take(pa.array(user_rows)),
                item_ids.take(item_rows),
                pa.array(user_rows + np.int32(first_user_row)),
                item_rows,
                pa.array(matrix.values[matrix.indptr[start]:matrix.indptr[stop]]),
            ], schema=table_schema))


def _user_ranges(indptr: np.ndarray, pairs_per_range: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [start, stop) of about ``pairs_per_range`` pairs each."""
    cuts = np.searchsorted(indptr, np.arange(pairs_per_range, indptr[-1], pairs_per_range))
    bounds = np.unique(np.concatenate([[0], cuts, [len(indptr) - 1]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _folded_in(users: np.ndarray | None, n_items: int) -> pa.Array:
    """The `folded_in` column: users per folded-in item, null for trained items."""
    if users is None:
        return pa.nulls(n_items, pa.int32())
    users = np.asarray(users, dtype=np.int32)
    return pa.array(users, type=pa.int32(), mask=users == 0)


def _ids(series) -> pa.Array:
    """Ids as int64 or plain utf8 (Polars hands out string views, which some readers lack)."""
    arr = series.to_arrow()
    return arr.cast(pa.string()) if pa.types.is_string_view(arr.type) or pa.types.is_large_string(arr.type) else arr


def _fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def _timestamps(values: np.ndarray) -> pa.Array:
    """datetime64 values as UTC timestamps, NaT as null."""
    values = values.astype("datetime64[us]")
    return pa.array(values, type=pa.timestamp("us"), mask=np.isnat(values)).cast(schema.TIMESTAMP_TYPE)
