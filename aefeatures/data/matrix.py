"""Stage 2: the sparse user × item matrix (CSR) and the id vocabularies.

Vocabularies are the sorted distinct ids, so a user's row number is the rank of its id and a
lookup is a binary search. No dense user × item matrix is ever built; batches are gathered
straight from the CSR arrays.

Building it takes a few passes over the interactions: ids become codes through a lookup table
(a hash table for strings and sparse integer ids), each row gets one 32-bit (user, item) key
(64-bit for huge catalogues), and one sort of those keys puts the rows in CSR order, where
duplicated pairs sit side by side and collapse. Only the keys are sorted: a pair's largest
weight and latest timestamp are reduced when something asks for them (binarized training needs
neither), and the latest interaction per user and per item needs no order at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import polars as pl

from aefeatures.schema import ITEM, TIMESTAMP, USER, WEIGHT

if TYPE_CHECKING:
    from aefeatures.data.read import Interactions

NAT = np.iinfo(np.int64).min  # NaT as datetime64[us] integers: below every real time
UTC_MICROS = pl.Datetime("us", "UTC")
# Integer ids spanning at most this many values per row (plus a little) are coded through a
# lookup table over their range; wider ids (hashes, say) go through a hash table.
_TABLE_SLOTS_PER_ROW = 2
_TABLE_MIN_SLOTS = 1 << 20
_COUNT_CHUNK = 1 << 22


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
        counts = np.zeros(self.shape[1], dtype=np.int64)
        for start in range(0, self.nnz, _COUNT_CHUNK):  # bincount copies its input to int64
            counts += np.bincount(self.indices[start:start + _COUNT_CHUNK], minlength=self.shape[1])
        return counts.astype(np.int32)

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


class Pairs:
    """The distinct (user, item) pairs of interaction rows, in CSR order: by user, then item.

    Made by :func:`collapse_pairs`. The CSR structure (``indptr``, ``items``) and the latest
    interaction per user and per item are computed at once; each pair's largest weight and latest
    timestamp (``weights``, ``timestamps``) on first use.
    """

    def __init__(self, user_ids: pl.Series, item_ids: pl.Series, indptr: np.ndarray, items: np.ndarray,
                 user_last_seen: np.ndarray, item_last_seen: np.ndarray, row_keys: np.ndarray,
                 row_weights: pl.Series | None, row_times: pl.Series | None):
        self.user_ids = user_ids  # (n_users,) sorted distinct ids
        self.item_ids = item_ids  # (n_items,) sorted distinct ids
        self.indptr = indptr  # (n_users + 1,) int64
        self.items = items  # (n_pairs,) int32 item rows, ascending within each user
        self.user_last_seen = user_last_seen  # (n_users,) datetime64[us], NaT when unknown
        self.item_last_seen = item_last_seen  # (n_items,) datetime64[us]
        self._row_keys = row_keys  # (n_rows,) pair key of every input row, in input order
        self._row_weights = row_weights  # (n_rows,) numeric; None: all 1
        self._row_times = row_times  # (n_rows,) datetimes; None: no timestamps

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def weights(self) -> np.ndarray:
        """(n_pairs,) float32: the largest weight of each pair's rows."""
        if self._row_weights is None:
            return np.ones(len(self), dtype=np.float32)
        return self._largest_per_pair(self._row_weights.cast(pl.Float32).to_numpy())

    @cached_property
    def timestamps(self) -> np.ndarray:
        """(n_pairs,) datetime64[us]: the latest timestamp of each pair's rows (NaT if none)."""
        if self._row_times is None:
            return np.full(len(self), NAT, dtype=np.int64).view("datetime64[us]")
        return self._largest_per_pair(epoch_micros(self._row_times)).view("datetime64[us]")

    def _largest_per_pair(self, row_values: np.ndarray) -> np.ndarray:
        order, starts = self._runs
        return np.maximum.reduceat(row_values[order], starts) if len(starts) else row_values[:0]

    @cached_property
    def _runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(the input rows in CSR order, where each pair's run of rows starts in that order)."""
        order = _sorting_order(self._row_keys)
        return order, np.flatnonzero(_first_of_runs(self._row_keys[order]))

    def frame(self) -> pl.DataFrame:
        """The pairs as canonical columns (user_id, item_id, weight, timestamp), in CSR order."""
        rows = np.repeat(np.arange(len(self.user_ids), dtype=np.int64), np.diff(self.indptr))
        return pl.DataFrame([
            self.user_ids.gather(rows).alias(USER),
            self.item_ids.gather(self.items).alias(ITEM),
            pl.Series(WEIGHT, self.weights, dtype=pl.Float32),
            pl.Series(TIMESTAMP, self.timestamps).dt.replace_time_zone("UTC"),
        ])


def collapse_pairs(users: pl.Series, items: pl.Series, *, weights: pl.Series | None = None,
                   timestamps: pl.Series | None = None) -> Pairs:
    """Collapse interaction rows into their distinct (user, item) pairs, in CSR order.

    Parameters
    ----------
    users, items
        (n_rows,) ids of each row: integers or strings, no nulls.
    weights
        (n_rows,) numeric weights, or None for 1 everywhere. A pair keeps its largest.
    timestamps
        (n_rows,) datetimes (null for unknown), or None. A pair, a user and an item keep their
        latest.
    """
    user_ids, user_codes = code_ids(users)
    item_ids, item_codes = code_ids(items)
    n_users, n_items = len(user_ids), len(item_ids)
    keys = _pair_keys(user_codes, item_codes, n_items, key_type=_key_type(n_users, n_items))
    distinct = keys if _is_sorted(keys) else _sorted(keys)  # inputs written in user order need no sort
    distinct = distinct[_first_of_runs(distinct)]
    row_starts = np.arange(n_users, dtype=keys.dtype) * keys.dtype.type(n_items)  # key of (u, item 0)
    indptr = np.empty(n_users + 1, dtype=np.int64)
    indptr[:-1] = np.searchsorted(distinct, row_starts)
    indptr[-1] = len(distinct)
    distinct -= np.repeat(row_starts, np.diff(indptr))  # each key minus its row's first: the item
    pair_items = distinct.astype(np.int32, copy=False) if distinct.dtype == np.uint64 else distinct.view(np.int32)
    micros = None if timestamps is None else epoch_micros(timestamps)
    return Pairs(user_ids, item_ids, indptr, pair_items,
                 _latest(user_codes, micros, n_users), _latest(item_codes, micros, n_items),
                 keys, weights, timestamps)


def pairs_of_frame(frame: pl.DataFrame) -> Pairs:
    """:func:`collapse_pairs` of a frame with the canonical columns (see :mod:`aefeatures.data.read`)."""
    times = frame.get_column(TIMESTAMP)
    return collapse_pairs(frame.get_column(USER), frame.get_column(ITEM), weights=frame.get_column(WEIGHT),
                          timestamps=None if times.null_count() == len(times) else times)


def epoch_micros(times: pl.Series) -> np.ndarray:
    """(n,) int64 microseconds since the epoch of a datetime column; ``NAT`` for null."""
    micros = times.cast(UTC_MICROS).to_physical()
    return (micros.fill_null(NAT) if micros.null_count() else micros).to_numpy()


def code_ids(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """(the sorted distinct ids, (n,) int32 code of every id: its row in them).

    Integer ids over a range not much wider than their count go through a lookup table over
    that range; others (strings, sparse integers such as hashes) through a hash table.
    """
    if ids.dtype.is_integer() and len(ids):
        low, high = int(ids.min()), int(ids.max())
        if high - low < _TABLE_SLOTS_PER_ROW * len(ids) + _TABLE_MIN_SLOTS:
            return _code_by_table(ids, low, high)
    return _code_by_hash(ids)


def _code_by_table(ids: pl.Series, low: int, high: int) -> tuple[pl.Series, np.ndarray]:
    values = ids.to_numpy()
    first_slot = 0 if 0 <= low <= high - low else low  # ids from 0 (or near it) index the table as they are
    # Offsets from the first slot, in the ids' own dtype (uint64 ids above 2**63 included).
    slots = values - values.dtype.type(first_slot) if first_slot else values
    present = np.zeros(high - first_slot + 1, dtype=bool)
    present[slots] = True
    code_of_slot = np.cumsum(present, dtype=np.int32)
    code_of_slot -= 1
    vocabulary = pl.Series(ids.name, np.flatnonzero(present).astype(values.dtype) + values.dtype.type(first_slot),
                           dtype=ids.dtype)
    return vocabulary, code_of_slot[slots]


def _code_by_hash(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    vocabulary = ids.unique().sort()
    codes = ids.replace_strict(vocabulary, pl.int_range(len(vocabulary), dtype=pl.Int32, eager=True),
                               return_dtype=pl.Int32)
    return vocabulary, codes.to_numpy()


def _key_type(n_users: int, n_items: int) -> type:
    return np.uint32 if n_users * n_items <= 2**32 else np.uint64


def _pair_keys(users: np.ndarray, items: np.ndarray, n_items: int, *, key_type: type) -> np.ndarray:
    """(n,) ``user * n_items + item``: sorting the keys sorts by user, then item."""
    keys = users.astype(key_type)
    keys *= key_type(n_items)
    np.add(keys, items, out=keys, casting="unsafe")  # item codes are >= 0
    return keys


def _is_sorted(keys: np.ndarray) -> bool:
    return bool(np.all(keys[1:] >= keys[:-1]))


def _sorted(keys: np.ndarray) -> np.ndarray:
    """A sorted copy of ``keys``: Polars sorts unsigned integers on every core, NumPy on one."""
    return pl.Series(keys, dtype=pl.UInt64 if keys.dtype == np.uint64 else pl.UInt32).sort().to_numpy()


def _first_of_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """(n,) bool: True where a run of equal keys starts."""
    first = np.ones(len(sorted_keys), dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return first


def _sorting_order(keys: np.ndarray) -> np.ndarray:
    """(n,) the positions of ``keys`` in sorted order (equal keys by position).

    Sorting keys with their position packed into the low bits is much faster here than an
    argsort; it needs the two to fit in 64 bits together.
    """
    if _is_sorted(keys):
        return np.arange(len(keys))
    position_bits = max(len(keys) - 1, 1).bit_length()
    key_bits = int(keys.max()).bit_length() if len(keys) else 0
    if key_bits + position_bits > 64:
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.uint64) << np.uint64(position_bits)
    packed |= np.arange(len(keys), dtype=np.uint64)
    return (_sorted(packed) & np.uint64((1 << position_bits) - 1)).view(np.int64)


def _latest(codes: np.ndarray, micros: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) datetime64[us]: the latest of ``micros`` (epoch microseconds) per code, NaT where there is none."""
    latest = np.full(n, NAT, dtype=np.int64)
    if micros is not None:
        np.maximum.at(latest, codes, micros)
    return latest.view("datetime64[us]")


def build_matrix(interactions: Interactions, *, binarize: bool = True, weight_transform: str = "none",
                 item_ids: pl.Series | None = None) -> InteractionMatrix:
    """Build the CSR matrix from deduplicated interactions.

    Parameters
    ----------
    interactions
        Output of :func:`aefeatures.data.read.read_interactions` (one row per (user, item)).
    binarize
        Store 1.0 for every pair instead of its weight.
    weight_transform
        Without ``binarize``: "none" stores the weights, "log1p" log(1 + weight) (float32).
    item_ids
        A fixed, sorted item vocabulary (a trained model's) instead of the input's own; every
        item of ``interactions`` must be in it.
    """
    pairs = interactions.pairs
    indices, item_last_seen = pairs.items, pairs.item_last_seen
    if item_ids is None:
        item_ids = pairs.item_ids
    else:  # both vocabularies are sorted, so the items stay sorted within each row
        row_in_fixed = item_ids.search_sorted(pairs.item_ids).to_numpy().astype(np.int32)
        indices = row_in_fixed[indices]
        item_last_seen = np.full(len(item_ids), np.datetime64("NaT"), dtype="datetime64[us]")
        item_last_seen[row_in_fixed] = pairs.item_last_seen
    return InteractionMatrix(
        user_ids=pairs.user_ids,
        item_ids=item_ids,
        indptr=pairs.indptr,
        indices=indices,
        values=np.ones(len(pairs), dtype=np.float32) if binarize else
        np.log1p(pairs.weights).astype(np.float32) if weight_transform == "log1p" else pairs.weights,
        user_last_seen=pairs.user_last_seen,
        item_last_seen=item_last_seen,
    )
