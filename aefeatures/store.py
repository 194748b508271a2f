"""Stage 5 and 7: write a version's tables, then publish it by moving the LATEST pointer.

Layout (see README "Store layout")::

    STORE/<name>/LATEST                    the live version id, replaced atomically
    STORE/<name>/versions/<version_id>/    complete, immutable versions
    STORE/<name>/refused/<version_id>/     complete versions the quality gate refused
    STORE/<name>/.staging/<version_id>/    a version being written (never listed)

A version is written under `.staging/`, renamed into `versions/` only once complete, and goes
live when LATEST is replaced (write aside, fsync, rename). Readers resolve LATEST once and then
read inside that version only. This module does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aefeatures import errors, schema
from aefeatures.anomaly import anomaly_scores
from aefeatures.runlog import published_versions

if TYPE_CHECKING:
    from aefeatures.embed import Embeddings
    from aefeatures.matrix import InteractionMatrix

LATEST = "LATEST"
VERSIONS = "versions"
STAGING = ".staging"
REFUSED = "refused"
MANIFEST = "manifest.json"
USERS, ITEMS, INTERACTIONS = "users.parquet", "items.parquet", "interactions.parquet"
INDEX = "items.faiss"
MODEL_DIR = "model"
VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"
USERS_PER_ROW_GROUP = 65_536  # users.parquet row groups: 16 MiB of 64-dim vectors
PAIRS_PER_ROW_GROUP = 1 << 20  # interactions.parquet row groups (whole users each)
_PARTS = ".parts"  # a version's part files while several ranks write it


# --- reading the layout ---------------------------------------------------------------------


def feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` that have a live version."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / LATEST).is_file())


def live_version(store: Path, name: str) -> str:
    """The version id LATEST points at."""
    pointer = store / name / LATEST
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise errors.no_feature_set(store, name, feature_sets(store)) from None


def version_dir(store: Path, name: str, version: str) -> Path:
    path = store / name / VERSIONS / version
    if not (path / MANIFEST).is_file():
        raise errors.no_such_version(store, name, version)
    return path


def list_versions(store: Path, name: str) -> list[str]:
    """Published version ids of ``name``, oldest first."""
    folder = store / name / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file())


def listed_versions(store: Path, name: str) -> list[str]:
    """Published versions as readers should see them: without a version left by a run killed
    after renaming it into `versions/` but before moving LATEST (it never went live)."""
    live = live_version(store, name)
    published = published_versions(store / name)
    return [v for v in list_versions(store, name) if not _never_live(v, live, published)]


def _never_live(version: str, live: str, published: set[str]) -> bool:
    # Newer than the live version and never recorded as published by a run.
    return version > live and version not in published


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


# --- writing a version ----------------------------------------------------------------------


def new_version_id(store: Path, name: str, now: datetime) -> str:
    """A version id that sorts by time and is later than every existing one."""
    moment = now.astimezone(timezone.utc)
    existing = list_versions(store, name)
    if existing:
        last = datetime.strptime(existing[-1], VERSION_FORMAT).replace(tzinfo=timezone.utc)
        moment = max(moment, last + timedelta(microseconds=1))
    return moment.strftime(VERSION_FORMAT)


@contextmanager
def staged_version(store: Path, name: str, version: str) -> Iterator[Path]:
    """A staging folder for ``version``, removed if the block fails (a version the block
    published or refused has already moved out of it)."""
    staging = start_version(store, name, version)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise


def start_version(store: Path, name: str, version: str) -> Path:
    """Create and return the staging folder for ``version``."""
    staging = store / name / STAGING / version
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise errors.StoreError(
            f"cannot create `{staging}` ({exc.strerror}). Make the store directory writable "
            "or point `job.store` elsewhere."
        ) from None
    return staging


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
                 name: str, version: str, created: datetime, shard: Shard | None = None) -> dict[str, int]:
    """Write users, items and interactions Parquet files; return their row counts.

    Users and interactions are written a row group at a time, and user vectors are taken from
    ``emb`` a row group at a time (:func:`aefeatures.embed.embed` computes them then), so
    memory holds one row group's vectors and pairs whatever the number of users.

    With a ``shard`` of several the users and interactions go to this rank's part files (the
    counts are the shard's), and rank 0 alone writes the items.
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
            _timestamps(shard.item_last_seen, created_us),
            _timestamps(np.full(matrix.shape[1], created_us), created_us),
        ], schema=schema.items_schema(item_ids.type, emb.dim).with_metadata(meta))
        pq.write_table(items, folder / ITEMS, compression=_compression(items.schema))
    return {"users": matrix.shape[0], "items": matrix.shape[1], "interactions": matrix.nnz}


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
    last_seen = _timestamps(matrix.user_last_seen, created_us)
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
                _timestamps(np.full(stop - start, created_us), created_us),
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


def _ids(series) -> pa.Array:
    """Ids as int64 or plain utf8 (Polars hands out string views, which some readers lack)."""
    arr = series.to_arrow()
    return arr.cast(pa.string()) if pa.types.is_string_view(arr.type) or pa.types.is_large_string(arr.type) else arr


def _fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def _timestamps(values: np.ndarray, fallback: np.datetime64) -> pa.Array:
    filled = np.where(np.isnat(values), fallback, values).astype("datetime64[us]")
    return pa.array(filled, type=pa.timestamp("us")).cast(schema.TIMESTAMP_TYPE)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


# --- publishing -----------------------------------------------------------------------------


def publish(store: Path, name: str, staging: Path) -> Path:
    """Move a complete staged version into `versions/` and point LATEST at it.

    If LATEST cannot be replaced the version is taken back out of `versions/`, so a failed
    publish leaves the store exactly as it was.
    """
    final = store / name / VERSIONS / staging.name
    final.parent.mkdir(parents=True, exist_ok=True)
    _fsync_tree(staging)
    os.rename(staging, final)
    try:
        atomic_write(store / name / LATEST, staging.name + "\n")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def refuse(store: Path, name: str, staging: Path) -> Path:
    """Set a complete version the gate refused aside in `refused/`; it never goes live."""
    kept = store / name / REFUSED / staging.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, kept)
    return kept


def list_refused(store: Path, name: str) -> list[str]:
    folder = store / name / REFUSED
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file()) if folder.is_dir() else []


def clean_leftovers(store: Path, name: str) -> list[str]:
    """Remove what killed runs left behind; call it holding the feature set's lock.

    That is every staged version, and any version renamed into `versions/` by a run killed
    before it moved LATEST: newer than the live version and never recorded as published.
    """
    removed = []
    staging = store / name / STAGING
    if staging.is_dir():
        for path in staging.iterdir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{STAGING}/{path.name}")
    live = live_version(store, name) if (store / name / LATEST).is_file() else ""
    published = published_versions(store / name)
    for version in list_versions(store, name):
        if _never_live(version, live, published):
            shutil.rmtree(store / name / VERSIONS / version, ignore_errors=True)
            removed.append(f"{VERSIONS}/{version}")
    return removed


def apply_retention(store: Path, name: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` published versions (never the live one) and all but
    the newest ``keep`` refused ones. ``keep = 0`` keeps everything."""
    if keep <= 0:
        return []
    live = live_version(store, name)
    removed = []
    for folder, versions in ((VERSIONS, list_versions(store, name)), (REFUSED, list_refused(store, name))):
        for version in versions[:-keep]:
            if version != live:
                shutil.rmtree(store / name / folder / version)
                removed.append(f"{folder}/{version}")
    return removed


def discard(staging: Path) -> None:
    """Remove a staged version that will not be published."""
    shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
