"""Stage 2: the sparse user × item matrix (CSR) and the id vocabularies.

Vocabularies are the sorted distinct ids, so a user's row number is the rank of its id and a
lookup is a binary search. No dense user × item matrix is ever built; batches are gathered
straight from the CSR arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl

from aefeatures.read import Interactions
from aefeatures.schema import ITEM, TIMESTAMP, USER, WEIGHT


@dataclass(frozen=True)
class InteractionMatrix:
    """A CSR user × item matrix with its vocabularies.

    Row ``u`` holds the items of ``user_ids[u]`` in ``indices[indptr[u]:indptr[u+1]]`` (sorted
    item rows) with values ``values[...]``. ``user_ids`` and ``item_ids`` are sorted ascending.
    """

    user_ids: pl.Series  # (n_users,) sorted distinct ids, Int64 or String
    item_ids: pl.Series  # (n_items,) sorted distinct ids
    indptr: np.ndarray  # (n_users + 1,) int64
    indices: np.ndarray  # (nnz,) int32 item rows
    values: np.ndarray  # (nnz,) float32 interaction weights
    user_last_seen: np.ndarray  # (n_users,) datetime64[us] latest interaction, NaT when unknown
    item_last_seen: np.ndarray  # (n_items,) datetime64[us]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def row_lengths(self) -> np.ndarray:
        """(n_users,) number of items per user."""
        return np.diff(self.indptr)

    def item_popularity(self) -> np.ndarray:
        """(n_items,) number of users per item."""
        return np.bincount(self.indices, minlength=self.shape[1]).astype(np.int32)

    @property
    def csr(self) -> "CSR":
        return CSR(self.indptr, self.indices, self.values)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The CSR slice of ``rows`` as (offsets (len(rows),), item rows, values)."""
        return self.csr.gather(rows)


class CSR(NamedTuple):
    """Rows of sparse interaction vectors: row r is ``indices[indptr[r]:indptr[r+1]]``."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int32 item rows
    values: np.ndarray  # (nnz,) float32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The slice of ``rows`` as (offsets (len(rows),), item rows, values), concatenated."""
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        positions = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
        return offsets, self.indices[positions], self.values[positions]


def build_matrix(interactions: Interactions, *, binarize: bool = True,
                 item_ids: pl.Series | None = None) -> InteractionMatrix:
    """Build the CSR matrix from deduplicated interactions.

    Parameters
    ----------
    interactions
        Output of :func:`aefeatures.read.read_interactions` (one row per (user, item)).
    binarize
        Store 1.0 for every pair instead of its weight.
    item_ids
        A fixed, sorted item vocabulary (a trained model's) instead of the input's own; every
        item of ``interactions`` must be in it.
    """
    frame = interactions.frame
    user_ids = frame.get_column(USER).unique().sort()
    if item_ids is None:
        item_ids = frame.get_column(ITEM).unique().sort()
        item_code = pl.col(ITEM).rank("dense").cast(pl.Int32).sub(1)
    else:
        item_code = pl.lit(item_ids.search_sorted(frame.get_column(ITEM)).cast(pl.Int32))
    coded = frame.select(
        pl.col(USER).rank("dense").cast(pl.Int64).sub(1).alias("u"),
        item_code.alias("i"),
        pl.lit(1.0, pl.Float32).alias("w") if binarize else pl.col(WEIGHT).cast(pl.Float32).alias("w"),
        pl.col(TIMESTAMP),
    ).sort("u", "i")
    u = coded.get_column("u").to_numpy()
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=len(user_ids)), out=indptr[1:])
    return InteractionMatrix(
        user_ids=user_ids,
        item_ids=item_ids,
        indptr=indptr,
        indices=coded.get_column("i").to_numpy().astype(np.int32, copy=False),
        values=coded.get_column("w").to_numpy().astype(np.float32, copy=False),
        user_last_seen=_last_seen(coded, "u", len(user_ids)),
        item_last_seen=_last_seen(coded, "i", len(item_ids)),
    )


def _last_seen(coded: pl.DataFrame, key: str, n: int) -> np.ndarray:
    latest = coded.group_by(key).agg(pl.col(TIMESTAMP).max()).sort(key)
    out = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
    stamps = latest.get_column(TIMESTAMP).dt.replace_time_zone(None).to_numpy()
    out[latest.get_column(key).to_numpy()] = stamps.astype("datetime64[us]")
    return out
