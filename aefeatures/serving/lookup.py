"""Lookups for services: items for a user, items like an item, embeddings. No torch import.

A :class:`FeatureSet` is pinned to one version: it resolves LATEST once and reads only inside
that version, so a job publishing meanwhile never changes what it answers. Tables load on first
use; :meth:`FeatureSet.load` loads everything up front (what a long-running service wants: it
then never touches the version's files again, and retention may delete them).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from aefeatures import errors
from aefeatures.quality import drift
from aefeatures.schema import KEY_METRIC, distinct, parse_id, parse_ids  # noqa: F401 (public here too)
from aefeatures.serving.filters import FilterEngine, empty_attributes
from aefeatures.serving.history import Histories, encode_histories
from aefeatures.store import layout
from aefeatures.store.encoder import Encoder
from aefeatures.store.index import (
    EmbeddingIndex,
    item_queries,
    item_rows,
    open_version_index,
    search_selected,
    user_queries,
)

# Filtered lookups: when at most this share of the catalogue may be returned, the allowed items
# are scored exactly (one matrix product over their vectors); above it the index is searched as
# usual for OVERFETCH / share times more candidates and the others dropped; a user left short
# is searched again among the allowed items alone (FAISS bitmap selector), then scored exactly
# if still short. Either way exactly min(k, items left) results come back. (FAISS's selector
# on a Flat index was 2.7× slower than the plain search at 100k items, so it is the fallback.)
SUBSET_SHARE = 0.25
OVERFETCH = 2.0  # above SUBSET_SHARE: candidates fetched per result wanted, × 1 / the filter's share
SUBSET_BLOCK = 1 << 22  # scores computed at once when scoring a subset for many users
FILTER_CACHE = 256  # distinct filters whose item sets a version keeps at most ...
FILTER_CACHE_BYTES = 64 << 20  # ... and at most this many bytes of them (masks, rows, bitmaps)
SUBSET_CACHE_BYTES = 256 << 20  # at most this much of cached filters' item vectors per version
PINNED_VERSIONS = 4  # versions asked for by id that a service keeps loaded beside the live ones
PINNED_LOADS = 1  # versions a service loads (or looks up) at once; a request for yet another gets a 503
RESIDUAL_BLOCK = 1 << 22  # item-item contributions summed at once when scoring many users


class Allowed:
    """The item rows a filtered lookup may return: ``rows`` (sorted int64) and ``mask``
    (n_items,) bool; a FAISS bitmap is made on first use, and the allowed items' vectors are
    kept once made where the version's budget allows (``keep_vectors``)."""

    def __init__(self, rows: np.ndarray, n_items: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.mask = np.zeros(n_items, bool)
        self.mask[self.rows] = True
        self._vectors: np.ndarray | None = None
        self.keep_vectors: Callable[[int], bool] = lambda nbytes: True
        self.reserved_bytes = 0  # of vectors, counted in its version's budget (see FeatureSet._keep_filter)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows, the mask and the bitmap (counted before it is made); the kept
        vectors are counted apart (:attr:`vector_bytes`)."""
        return self.rows.nbytes + self.mask.nbytes + (len(self.mask) + 7) // 8

    @cached_property
    def bitmap(self) -> np.ndarray:
        return np.packbits(self.mask, bitorder="little")

    def vectors(self, index_rows: np.ndarray) -> np.ndarray:
        """(len, dim + 1) float32: the index rows of the allowed items (kept once made)."""
        if self._vectors is not None:
            return self._vectors
        vectors = np.ascontiguousarray(index_rows[self.rows], dtype=np.float32)
        if self.keep_vectors(vectors.nbytes):
            self._vectors = vectors
        return vectors

    @property
    def vector_bytes(self) -> int:
        return 0 if self._vectors is None else self._vectors.nbytes


class Neighbours(NamedTuple):
    """Ranked results: ``ids`` best first and their ``scores`` (float32): the model's scores
    for recommendations (inner product plus bias, plus the item-item part where the version has
    one), inner products or cosines of vectors for similar items and users."""

    ids: np.ndarray
    scores: np.ndarray


class HistoryNeighbours(NamedTuple):
    """Ranked results for an interaction history, and the history's item ids the version does not know."""

    ids: np.ndarray
    scores: np.ndarray
    unknown: list[Any]


class _Residual(NamedTuple):
    """The item-item part's residuals for n queries (users or histories), as a CSR over query
    positions: ``indptr`` (n + 1,) int64, ``items`` (entries,) int64 sorted within each query,
    ``scores`` (entries,) float64, and per entry its query ``owners`` and sorted ``codes``
    ``owner * n_items + item`` for vectorised membership tests."""

    indptr: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    owners: np.ndarray
    codes: np.ndarray


class HistoryEmbedding(NamedTuple):
    """A history's (dim,) float32 embedding, and its item ids the version does not know."""

    vector: np.ndarray
    unknown: list[Any]


class IdIndex:
    """Maps ids to row numbers by binary search over the sorted ids of a table."""

    def __init__(self, ids: np.ndarray, kind: str = "id"):
        self.ids = ids  # sorted ascending: tables are written sorted by id
        self.is_int = ids.dtype.kind in "iu"
        self.kind = kind

    def __len__(self) -> int:
        return len(self.ids)

    def parse(self, ids: Sequence[Any]) -> list[Any]:
        """The ids typed by :func:`parse_id`; raises :class:`InvalidIdError`."""
        return parse_ids(ids, self.ids.dtype, self.kind)

    def rows(self, ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): the row of each id, and whether the id exists. Raises
        :class:`InvalidIdError` for a value that cannot be an id of this type."""
        parsed = self.parse(ids)
        query = np.array(parsed, dtype=self.ids.dtype if self.is_int else str)
        if not len(self.ids) or not len(query):
            return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
        pos = np.searchsorted(self.ids, query).clip(0, len(self.ids) - 1)
        return pos, self.ids[pos] == query


class FeatureSet:
    """One published version of a feature set, loaded lazily, read-only.

    ``filter_cache_bytes`` bounds the item sets of distinct filters it keeps (default
    :data:`FILTER_CACHE_BYTES`; least recently used first out). Thread-safe.
    """

    def __init__(self, root: Path, name: str, version: str, *, filter_cache_bytes: int | None = None):
        self.root, self.name, self.version = root, name, version
        self.path = layout.version_dir(root, name, version)
        self.manifest = layout.read_manifest(self.path)
        layout.check_files(self.path, self.manifest)  # sizes and hashes recorded at publish
        self.dim: int = int(self.manifest["dim"])
        self.filter_cache_bytes = FILTER_CACHE_BYTES if filter_cache_bytes is None else int(filter_cache_bytes)
        self._filter_cache: OrderedDict[str, Allowed] = OrderedDict()
        self._filter_lock = threading.Lock()  # held only to read or change the cache, never to evaluate
        self._filters_pending: dict[str, Future] = {}  # filters being evaluated, for callers asking meanwhile
        self._filter_bytes = 0  # Allowed.nbytes of the filters in _filter_cache
        self._cached_vector_bytes = 0  # of the filters in _filter_cache

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r}, version={self.version!r}, path={str(self.path)!r})"

    # --- tables, loaded on first use -------------------------------------------------------

    @cached_property
    def _users(self) -> tuple[IdIndex, np.ndarray]:
        table = pq.read_table(self.path / layout.USERS, columns=["user_id", "embedding"])
        return IdIndex(_ids(table.column("user_id")), "user"), _matrix(table.column("embedding"), self.dim)

    @cached_property
    def _item_ids(self) -> IdIndex:
        return IdIndex(_ids(pq.read_table(self.path / layout.ITEMS, columns=["item_id"]).column("item_id")), "item")

    @cached_property
    def _item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, bias). Where the index holds the rows whole (Flat, HNSW-Flat, IVF-Flat)
        they come from it, read-only, instead of being decoded from Parquet (nested columns
        decode slowly: 2 s and 0.8 GB for 1M items)."""
        rows = self._stored_rows
        if rows is not None and rows.shape == (self.n_items, self.dim + 1):
            return rows[:, : self.dim], rows[:, self.dim]
        table = pq.read_table(self.path / layout.ITEMS, columns=["embedding", "bias"])
        return _matrix(table.column("embedding"), self.dim), table.column("bias").to_numpy()

    def _index_holds_items(self) -> bool:
        """Whether item vectors can come from the (memory-mapped) index at any later time."""
        return self.index.holds_items()

    @cached_property
    def _interactions(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None]:
        """(:attr:`_seen`, :attr:`_seen_values`) from one read of `interactions.parquet`; the
        values are read only where the version has an item-item part (see :attr:`_neighbours`)."""
        columns = ["user_row", "item_row"] + (["weight"] if self.has_item_neighbours else [])
        table = pq.read_table(self.path / layout.INTERACTIONS, columns=columns)
        users = table.column("user_row").to_numpy().astype(np.int64)
        items = table.column("item_row").to_numpy()
        indptr = np.zeros(self.n_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=self.n_users), out=indptr[1:])
        values = table.column("weight").to_numpy().astype(np.float32) if self.has_item_neighbours else None
        return (indptr, items, users * self.n_items + items), values  # codes sorted: the file is in CSR order

    @property
    def _seen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr (n_users + 1,), item rows, codes): what each user already has, as a CSR and
        as sorted ``user_row * n_items + item_row`` codes for vectorised membership tests."""
        return self._interactions[0]

    @property
    def _seen_values(self) -> np.ndarray | None:
        """(nnz,) float32 the value the model reads for each of :attr:`_seen`'s interactions
        (their `weight`), or None for a version without an item-item part."""
        return self._interactions[1]

    @property
    def has_item_neighbours(self) -> bool:
        """Whether this version's scores have a sparse item-item part (its manifest's
        ``item_neighbours`` section, the file `item_neighbours.parquet`)."""
        return self.manifest.get("item_neighbours") is not None

    @cached_property
    def _neighbours(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The item-item part as a CSR keyed by neighbour row: (indptr (n_items + 1,) int64,
        item rows (entries,) int64, weights (entries,) float32): a user holding item i with value
        x adds ``x * weights[p]`` to the score of item ``item rows[p]`` for every p in
        ``indptr[i]:indptr[i + 1]``. None for a version without one. Raises
        :class:`DamagedVersionError` when the manifest promises one that is missing or malformed."""
        if not self.has_item_neighbours:
            return None
        return _read_neighbours(self.path, self.manifest, self.name, self.version, self.n_items)

    @cached_property
    def index(self) -> EmbeddingIndex:
        """The item index, read into memory (mapped only when very large) and checked when
        opened: the file published, the manifest's ``dim``, one row per item, the items'
        vectors (:func:`aefeatures.store.index.open_version_index`; ``DamagedVersionError``)."""
        return open_version_index(self.path, self.manifest, self.n_items)

    @cached_property
    def _anomaly_table(self) -> pl.DataFrame | None:
        """Users by anomaly score, highest first; None for a version written before scores existed."""
        columns = ["user_id", "n_interactions", "reconstruction_error", "anomaly_score"]
        if not set(columns) <= set(pq.read_schema(self.path / layout.USERS).names):
            return None
        return pl.read_parquet(self.path / layout.USERS, columns=columns).sort("anomaly_score", descending=True)

    @cached_property
    def attributes(self) -> pl.DataFrame:
        """(n_items, 1 + attributes) the item attributes in item-row order: ``item_id`` and the
        columns of the job's `[items]` table (nulls for items it did not describe); ``item_id``
        alone for a version without attributes."""
        return pl.from_arrow(self._attribute_table)

    @cached_property
    def _attribute_table(self) -> pa.Table:
        path = self.path / layout.ATTRIBUTES
        return pq.read_table(path) if path.is_file() else empty_attributes(pa.array(self._item_ids.ids))

    @cached_property
    def _filters(self) -> FilterEngine:
        return FilterEngine(self._attribute_table)

    def filter_items(self, filter: str) -> np.ndarray:
        """The ids of the items for which ``filter`` (a SQL boolean expression over the
        attribute columns and ``item_id``; see :mod:`aefeatures.serving.filters`) is true, in
        row order. Raises :class:`FilterError`."""
        return self._item_ids.ids[self._filter_set(filter).rows]

    def has_cached_filter(self, filter: str) -> bool:
        """Whether ``filter``'s item set is already known (a lookup with it costs no evaluation)."""
        return filter in self._filter_cache

    @property
    def filter_cache_size(self) -> tuple[int, int]:
        """(filters, bytes) the filter cache holds now (bytes as :attr:`Allowed.nbytes`; the
        kept vectors are bounded apart, by :data:`SUBSET_CACHE_BYTES`)."""
        with self._filter_lock:
            return len(self._filter_cache), self._filter_bytes

    def is_warm(self, lookup: str, filter: str | None = None, items: Sequence[Any] | None = None) -> bool:
        """Whether one ``lookup`` costs about what the search itself costs now: no filter to
        evaluate and nothing to read or derive on first use. ``lookup`` is "recommend",
        "similar", "similar_cosine", "similar_users", "history" (recommend for a history) or
        "similar_users_history". A service answers warm lookups on its event loop and sends the
        others to threads (see :mod:`aefeatures.serving.http`)."""
        needs = _WARM_NEEDS[lookup]
        if filter is not None or items is not None:
            if filter is not None and not (isinstance(filter, str) and self.has_cached_filter(filter)):
                return False
            needs = (*needs, "_index_rows")
        elif lookup in ("recommend", "history") and self.has_item_neighbours:
            needs = (*needs, "_index_rows")  # items the item-item part reaches are scored from them
        return all(part in self.__dict__ for part in needs)  # cached_property values live there

    def load(self) -> "FeatureSet":
        """Read every table, the stored encoder (where the version has one) and open the index
        now, so that no later call reads a file (what is derived from them, such as normalised
        vectors for cosine, is computed on first use, from memory: see :meth:`is_warm`).
        Returns self."""
        for name in ("_users", "_item_ids", "_interactions", "_neighbours", "index", "_anomaly_table", "_filters"):
            getattr(self, name)
        if not self._index_holds_items():  # else copied out of the mapped index when first needed
            getattr(self, "_item_vectors")
        if self.has_item_neighbours:  # recommendations score the items the item-item part reaches from them
            getattr(self, "_index_rows")
        try:
            getattr(self, "_encoder")  # its files are read now; the history lookups need it
        except errors.StoreError:
            pass  # a version without a usable encoder: said when a history lookup asks for it
        return self

    @property
    def user_ids(self) -> np.ndarray:
        """(n_users,) every user id of this version, sorted (row order of `users.parquet`)."""
        return self._users[0].ids

    @property
    def item_ids(self) -> np.ndarray:
        """(n_items,) every item id, sorted (row order of `items.parquet` = FAISS ids)."""
        return self._item_ids.ids

    @property
    def n_users(self) -> int:
        return len(self._users[0])

    @property
    def n_items(self) -> int:
        return len(self._item_ids)

    # --- lookups -----------------------------------------------------------------------------

    def user_embedding(self, user: Any) -> np.ndarray:
        """(dim,) float32 embedding of ``user``; raises :class:`NotFoundError`."""
        return self._users[1][self._user_rows([user])[0]]

    def item_embedding(self, item: Any) -> np.ndarray:
        """(dim,) float32 vector of ``item`` (its decoder row); raises :class:`NotFoundError`."""
        return self._item_vectors[0][self._item_rows([item])[0]].copy()  # never a view of the index's memory

    def user_embeddings(self, users: Sequence[Any]) -> np.ndarray:
        """(n, dim) embeddings of ``users``, in order; raises :class:`NotFoundError` naming
        every unknown one."""
        return self._users[1][self._user_rows(users)]

    def item_embeddings(self, items: Sequence[Any]) -> np.ndarray:
        """(n, dim) vectors of ``items``, in order; raises :class:`NotFoundError`."""
        return self._item_vectors[0][self._item_rows(items)]

    def user_id(self, raw: Any) -> Any:
        """``raw`` as this version types user ids (see :func:`parse_id`)."""
        return parse_id(raw, self.user_ids.dtype, "user")

    def item_id(self, raw: Any) -> Any:
        """``raw`` as this version types item ids (see :func:`parse_id`)."""
        return parse_id(raw, self.item_ids.dtype, "item")

    def has_users(self, users: Sequence[Any]) -> np.ndarray:
        """(n,) bool: whether each of ``users`` has an embedding in this version."""
        return self._users[0].rows(users)[1]

    def recommend(self, user: Any, k: int = 10, *, exclude_seen: bool = True,
                  exclude: Sequence[Any] = (), filter: str | None = None,
                  items: Sequence[Any] | None = None) -> Neighbours:
        """The ``k`` best-scored items for ``user``, without the items they already have and
        without the items in ``exclude`` (ids not in the catalogue are ignored there).

        Scores (float32) are the model's: ``user · item + bias``, plus, where the version has an
        item-item part (:attr:`has_item_neighbours`), ``x * weight`` for every row of
        `item_neighbours.parquet` with that item whose neighbour the user has (x the
        interaction's `weight`); the top k is exact for that score wherever the index is exact.

        ``filter`` keeps only items whose attributes satisfy a SQL boolean expression (e.g.
        ``"category = 'books' AND in_stock"``, see :mod:`aefeatures.serving.filters`), and
        ``items`` only the items of an allow-list (unknown ids ignored; an empty list allows
        none). Returns exactly ``min(k, items left after every rule)`` results, best first;
        raises :class:`FilterError` for an invalid filter.
        """
        rows = self._user_rows([user])
        ids, scores, counts = self._recommend_rows(rows, k, exclude_seen, exclude, self._allowed(filter, items))
        return Neighbours(ids[0, : counts[0]], scores[0, : counts[0]])

    def recommend_batch(self, users: Sequence[Any], k: int = 10, *, exclude_seen: bool = True,
                        exclude: Sequence[Any] = (), skip_unknown: bool = False, filter: str | None = None,
                        items: Sequence[Any] | None = None) -> pl.DataFrame:
        """Recommendations for many users at once, as rows ``user_id, item_id, rank, score``.

        ``exclude``, ``filter`` and ``items`` apply to every user (as in :meth:`recommend`).
        Unknown users raise :class:`NotFoundError`, or are left out with ``skip_unknown``. A user
        named twice (in any spelling, 42 and "42") is answered once, in first-seen order. A known
        user with nothing left to recommend has no rows.
        """
        users = distinct(self._users[0].parse(users))
        allowed = self._allowed(filter, items)
        rows, found = self._users[0].rows(users)
        if not found.all() and not skip_unknown:
            raise errors.NotFoundError("user", [u for u, f in zip(users, found) if not f], self.name, self.version)
        user_ids = self._users[0].ids[rows[found]]
        ids, scores, counts = self._recommend_rows(rows[found], k, exclude_seen, exclude, allowed)
        return _ranked_frame("user_id", user_ids, ids, scores, counts)

    def similar_items(self, item: Any, k: int = 10, *, metric: str = "ip",
                      exclude: Sequence[Any] = (), filter: str | None = None,
                      items: Sequence[Any] | None = None) -> Neighbours:
        """The ``k`` items most like ``item`` (the item itself and ``exclude`` left out).

        ``metric="ip"`` (default) ranks by the inner product of item vectors through the FAISS
        index, which favours items the model scores strongly overall; ``metric="cosine"``
        ranks by the angle alone (exact search over normalised vectors). Either way only the
        vectors count, never a version's item-item part. ``filter`` and ``items`` restrict the
        answer as in :meth:`recommend`.
        """
        _check_k(k)
        row = self._item_rows([item])[0]
        allowed = self._allowed(filter, items)
        skip = np.union1d([row], self._known_item_rows(exclude))
        if metric == "cosine":
            return self._cosine_neighbours(self._unit_items, self._item_ids.ids, self._unit_items[row], skip, k, allowed)
        if metric != "ip":
            raise errors.bad_metric(metric)
        queries = item_queries(self._item_vectors[0][[row]])
        if allowed is not None:
            return self._similar_allowed(queries, skip, k, allowed)
        k = min(k, self.n_items - len(skip))
        scores, found = self.index.search(queries, max(min(k + len(skip), self.n_items), 1))
        keep = ~np.isin(found[0], skip) & (found[0] >= 0)
        rows, scores = found[0][keep][:k], scores[0][keep][:k]
        if len(rows) < k:  # an approximate index came back short: score exactly
            rows, scores = self._exact_top(queries[0], skip, k)
        return Neighbours(self._item_ids.ids[rows], scores.astype(np.float32))

    def similar_users(self, user: Any, k: int = 10) -> Neighbours:
        """The ``k`` users whose embeddings are closest to ``user``'s by cosine similarity
        (exact; the user left out)."""
        _check_k(k)
        row = self._user_rows([user])[0]
        return self._cosine_neighbours(self._unit_users, self._users[0].ids, self._unit_users[row], np.array([row]), k)

    # --- histories: anyone, embedded from their interactions at request time -----------------

    @cached_property
    def _encoder(self) -> Encoder:
        encoder = Encoder.open(self.path / layout.MODEL_DIR, self.name, self.version)
        if (encoder.n_items, encoder.dim) != (self.n_items, self.dim):
            raise errors.StoreError(f"version {self.version} of {self.name!r}: its stored encoder reads "
                                    f"{encoder.n_items:,} items into {encoder.dim} dims, but the version has "
                                    f"{self.n_items:,} items of {self.dim}; republish it with `aefeatures run --force`.")
        return encoder

    def _histories(self, histories: Sequence[Sequence[Any]], weights: Sequence[Any] | None) -> Histories:
        encoding = (self.manifest.get("config") or {}).get("input") or {}
        return encode_histories(histories, weights, self._item_ids.rows, encoding, name=self.name, version=self.version)

    def embed_histories(self, histories: Sequence[Sequence[Any]], *,
                        weights: Sequence[Sequence[float] | None] | None = None) -> tuple[np.ndarray, list[list[Any]]]:
        """((n, dim) float32 embeddings, the unknown item ids of each history) of n interaction
        histories (lists of item ids; ``weights``: None or one list of numbers or None per
        history), by the version's stored encoder in numpy: what `aefeatures embed` would give
        users with these interactions, without retraining or torch. See
        :mod:`aefeatures.serving.history` for the encoding and the errors it raises."""
        parsed = self._histories(histories, weights)
        return self._encoder.embed(parsed.indptr, parsed.items, parsed.values), parsed.unknown

    def embed_history(self, history: Sequence[Any], *, weights: Sequence[float] | None = None) -> HistoryEmbedding:
        """The (dim,) float32 embedding of one history and its unknown item ids (see :meth:`embed_histories`)."""
        vectors, unknown = self.embed_histories([history], weights=None if weights is None else [weights])
        return HistoryEmbedding(vectors[0], unknown[0])

    def recommend_history(self, history: Sequence[Any], k: int = 10, *, weights: Sequence[float] | None = None,
                          exclude_seen: bool = True, exclude: Sequence[Any] = (), filter: str | None = None,
                          items: Sequence[Any] | None = None) -> HistoryNeighbours:
        """The ``k`` best items for whoever has ``history`` (item ids, ``weights`` optional), as
        :meth:`recommend` answers a known user: the history's own items left out (unless
        ``exclude_seen`` is False), ``exclude``, ``filter`` and ``items`` as there, exactly
        ``min(k, items left)`` results. Also returns the history's ids this version does not know."""
        ids, scores, counts, unknown = self.rank_histories([history], k, None if weights is None else [weights],
                                                                 exclude_seen, exclude, filter, items)
        return HistoryNeighbours(ids[0, : counts[0]], scores[0, : counts[0]], unknown[0])

    def recommend_histories(self, histories: Sequence[Sequence[Any]], k: int = 10, *,
                            weights: Sequence[Sequence[float] | None] | None = None, exclude_seen: bool = True,
                            exclude: Sequence[Any] = (), filter: str | None = None,
                            items: Sequence[Any] | None = None) -> pl.DataFrame:
        """:meth:`recommend_history` for many histories at once, as rows ``history`` (its
        position in ``histories``), ``item_id, rank, score``."""
        ids, scores, counts, _ = self.rank_histories(histories, k, weights, exclude_seen, exclude, filter, items)
        return _ranked_frame("history", np.arange(len(counts), dtype=np.int32), ids, scores, counts)

    def rank_histories(self, histories: Sequence[Sequence[Any]], k: int, weights: Sequence[Any] | None = None,
                       exclude_seen: bool = True, exclude: Sequence[Any] = (), filter: str | None = None,
                       items: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[Any]]]:
        """(item ids (n, w), scores (n, w) float32, counts (n,), unknown ids per history): history
        h's results are the first counts[h] of row h, best first (what :meth:`recommend_histories`
        and the HTTP service build their answers from; arguments as :meth:`recommend_history`)."""
        _check_k(k)
        allowed = self._allowed(filter, items)
        parsed = self._histories(histories, weights)
        queries = user_queries(self._encoder.embed(parsed.indptr, parsed.items, parsed.values))
        ids, scores, counts = self._recommend_rows(np.arange(len(queries)), k, exclude_seen, exclude, allowed,
                                                   queries=queries, seen=parsed.seen(self.n_items),
                                                   values=parsed.values)
        return ids, scores, counts, parsed.unknown

    def similar_users_to_history(self, history: Sequence[Any], k: int = 10, *,
                                 weights: Sequence[float] | None = None) -> HistoryNeighbours:
        """The ``k`` users of this version whose embeddings are closest by cosine similarity to
        the embedding of ``history`` (exact), and the history's unknown item ids."""
        _check_k(k)
        vector, unknown = self.embed_history(history, weights=weights)
        found = self._cosine_neighbours(self._unit_users, self._users[0].ids, _normalised(vector[None, :])[0],
                                        np.zeros(0, np.int64), k)
        return HistoryNeighbours(found.ids, found.scores, unknown)

    @cached_property
    def _unit_users(self) -> np.ndarray:
        return _normalised(self._users[1])

    @cached_property
    def _unit_items(self) -> np.ndarray:
        return _normalised(self._item_vectors[0])

    @staticmethod
    def _cosine_neighbours(unit: np.ndarray, ids: np.ndarray, query: np.ndarray, skip: np.ndarray, k: int,
                           allowed: Allowed | None = None) -> Neighbours:
        """Exact top ``k`` by cosine to the unit vector ``query``, leaving out the rows in ``skip`` and
        those ``allowed`` does not allow."""
        scores = unit @ query
        scores[skip] = -np.inf
        left = len(unit) - len(skip)
        if allowed is not None:
            scores[~allowed.mask] = -np.inf
            left = len(allowed) - int(allowed.mask[skip].sum())
        k = min(k, left)
        top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.flatnonzero(np.isfinite(scores))
        top = top[np.isfinite(scores[top])][: max(k, 0)]
        top = top[np.lexsort((top, -scores[top]))]  # best first, ties by row
        return Neighbours(ids[top], scores[top].astype(np.float32))

    def anomalies(self, k: int = 20) -> pl.DataFrame:
        """The ``k`` users the model explains worst (highest anomaly score first): bots, random
        clickers, fraud. Columns `user_id, n_interactions, reconstruction_error, anomaly_score`."""
        _check_k(k)
        if self._anomaly_table is None:
            raise errors.no_anomaly_scores(self.name, self.version)
        return self._anomaly_table.head(k)

    # --- internals ---------------------------------------------------------------------------

    def _user_rows(self, users: Sequence[Any]) -> np.ndarray:
        rows, found = self._users[0].rows(users)
        if not found.all():
            raise errors.NotFoundError("user", [u for u, f in zip(users, found) if not f], self.name, self.version)
        return rows

    def _known_item_rows(self, items: Sequence[Any]) -> np.ndarray:
        """Sorted unique rows of the ``items`` that exist; unknown ids are dropped."""
        if not len(items):
            return np.zeros(0, np.int64)
        rows, found = self._item_ids.rows(items)
        return np.unique(rows[found])

    def _item_rows(self, items: Sequence[Any]) -> np.ndarray:
        rows, found = self._item_ids.rows(items)
        if not found.all():
            raise errors.NotFoundError("item", [i for i, f in zip(items, found) if not f], self.name, self.version)
        return rows

    def _allowed(self, filter: str | None, items: Sequence[Any] | None) -> Allowed | None:
        """What a filter and an allow-list together allow; None when neither is given."""
        if filter is None and items is None:
            return None
        allowed = self._filter_set(filter) if filter is not None else None
        if items is not None:
            if isinstance(items, (str, bytes)):
                raise errors.BadInputError("`items` is a list of item ids, not one string.")
            rows = self._known_item_rows(list(items))
            if allowed is not None:
                rows = np.intersect1d(rows, allowed.rows, assume_unique=True)
            allowed = Allowed(rows, self.n_items)
        return allowed

    def _filter_set(self, filter: str) -> Allowed:
        """The rows ``filter`` allows, evaluated once per distinct filter text and version.

        Distinct filters are evaluated side by side (no lock is held while one runs); a caller
        asking for a filter another is evaluating waits for that evaluation and shares its
        answer or its error. The item sets are kept within :attr:`filter_cache_bytes`.
        """
        if not isinstance(filter, str):  # refused by the engine, with the reason
            return Allowed(np.flatnonzero(self._filters.mask(filter)), self.n_items)
        with self._filter_lock:
            hit = self._filter_cache.get(filter)
            if hit is not None:
                self._filter_cache.move_to_end(filter)
                return hit
            pending = self._filters_pending.get(filter)
            if pending is None:
                pending = self._filters_pending[filter] = Future()
                pending.set_running_or_notify_cancel()
                evaluate = True
            else:
                evaluate = False
        if not evaluate:
            return pending.result()
        try:
            allowed = Allowed(np.flatnonzero(self._filters.mask(filter)), self.n_items)
        except BaseException as exc:
            with self._filter_lock:
                del self._filters_pending[filter]
            pending.set_exception(exc)
            raise
        with self._filter_lock:
            del self._filters_pending[filter]
            self._keep_filter(filter, allowed)
        pending.set_result(allowed)
        return allowed

    def _keep_filter(self, filter: str, allowed: Allowed) -> None:
        """Cache ``allowed`` (the caller holds the filter lock), dropping the least recently used
        filters until the cache is within :data:`FILTER_CACHE` filters and
        :attr:`filter_cache_bytes` bytes. An item set larger than the whole budget is not kept."""
        if allowed.nbytes > self.filter_cache_bytes:
            return
        allowed.keep_vectors = partial(self._reserve_vector_bytes, allowed)
        self._filter_cache[filter] = allowed
        self._filter_bytes += allowed.nbytes
        while len(self._filter_cache) > FILTER_CACHE or self._filter_bytes > self.filter_cache_bytes:
            _, dropped = self._filter_cache.popitem(last=False)
            dropped.keep_vectors = _keep_none  # a request still holding it makes its vectors per call
            self._filter_bytes -= dropped.nbytes
            self._cached_vector_bytes -= dropped.reserved_bytes
            dropped.reserved_bytes = 0

    def _reserve_vector_bytes(self, allowed: Allowed, nbytes: int) -> bool:
        """Whether the cached filter set ``allowed`` may keep ``nbytes`` of item vectors (the
        version's budget is :data:`SUBSET_CACHE_BYTES`); counted if so, until it leaves the cache."""
        with self._filter_lock:
            if allowed.reserved_bytes or allowed.keep_vectors is _keep_none \
                    or self._cached_vector_bytes + nbytes > SUBSET_CACHE_BYTES:
                return False
            self._cached_vector_bytes += nbytes
            allowed.reserved_bytes = nbytes
            return True

    def _seen_in(self, rows: np.ndarray, mask: np.ndarray, seen: tuple) -> np.ndarray:
        """(len(rows),) how many of each user's items (``seen``: see :attr:`_seen`) ``mask`` allows."""
        indptr, seen_items, _ = seen
        starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
        total = int(lengths.sum())
        if not total:
            return np.zeros(len(rows), np.int64)
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        hit = mask[seen_items[offsets + np.arange(total)]]
        return np.bincount(np.repeat(np.arange(len(rows)), lengths), weights=hit, minlength=len(rows)).astype(np.int64)

    def _recommend_rows(self, rows: np.ndarray, k: int, exclude_seen: bool, exclude: Sequence[Any] = (),
                        allowed: Allowed | None = None, *, queries: np.ndarray | None = None,
                        seen: tuple | None = None, values: np.ndarray | None = None):
        """(item ids (n, w), scores (n, w) float32, counts (n,)) for user rows, where row r's first
        counts[r] entries are its results, best first.

        ``queries`` (n, dim + 1), ``seen`` (as :attr:`_seen`, over ``rows``) and ``values`` (as
        :attr:`_seen_values`, aligned with ``seen``'s items) stand in for the users' stored
        embeddings, items and interaction values when the queries are histories, not users.

        The items a user has (and ``exclude``) are skipped by over-fetching that many extra
        candidates. Users are searched in groups of similar over-fetch width (k plus what they
        skip, rounded up to a power of two), so one heavy user does not widen everyone's
        search (measured: 5.9× faster than one search at the widest, on 5,000 long-tailed users).

        With ``allowed`` only those rows count: few of them (at most :data:`SUBSET_SHARE` of the
        catalogue) are scored exactly, without the index; for more, the index search over-fetches
        by :data:`OVERFETCH` / (their share) as well, and users it leaves short are searched again
        among the allowed rows alone (see :meth:`_top_from_index`).

        Where the version has an item-item part (:attr:`_neighbours`), the items it reaches from a
        user's items (R) score their dense score plus the residual and every other item its dense
        score alone. The index then supplies the best items outside R (over-fetching by the usable
        items of R as well) and every usable item of R is scored exactly from :attr:`_index_rows`;
        the best of both are the results: the exact top k wherever the index is exact.
        """
        _check_k(k)
        seen = self._seen if seen is None else seen
        indptr, _, seen_codes = seen
        excluded = self._known_item_rows(exclude)
        pool = self.n_items
        if allowed is not None:
            excluded, pool = excluded[allowed.mask[excluded]], len(allowed)
            n_seen = self._seen_in(rows, allowed.mask, seen) if exclude_seen else np.zeros(len(rows), np.int64)
        else:
            n_seen = indptr[rows + 1] - indptr[rows] if exclude_seen else np.zeros(len(rows), np.int64)
        n_skip = n_seen + len(excluded)
        if exclude_seen and len(excluded):  # an excluded item the user has is skipped once
            n_skip -= _is_seen(seen_codes, self.n_items, rows, np.broadcast_to(excluded, (len(rows), len(excluded)))).sum(axis=1)
        want = np.maximum(np.minimum(k, pool - n_skip), 0)  # exactly this many per user
        width = max(int(want.max()) if len(rows) else 0, 1)
        out_rows = np.zeros((len(rows), width), np.int64)
        out_scores = np.zeros((len(rows), width), np.float32)
        queries = user_queries(self._users[1][rows]) if queries is None else queries
        residual = None
        if self._neighbours is not None:
            residual = self._residual(rows, seen, self._seen_values if values is None else values)
        if allowed is not None and len(allowed) <= SUBSET_SHARE * self.n_items:
            indptr, seen_items, _ = seen
            skips = [np.union1d(seen_items[indptr[r]: indptr[r + 1]], excluded) if exclude_seen else excluded
                     for r in rows.tolist()]
            self._subset_top(queries, allowed, want, skips, out_rows, out_scores, residual)
            return self._item_ids.ids[out_rows], out_scores, want
        usable, n_reached = None, np.zeros(len(rows), np.int64)
        if residual is not None:
            usable = self._usable(residual, rows, exclude_seen, excluded, seen_codes, allowed)
            n_reached = np.bincount(residual.owners[usable], minlength=len(rows)).astype(np.int64)
        want_dense = np.maximum(np.minimum(k, pool - n_skip - n_reached), 0)  # from outside R
        widths = k + n_skip + n_reached
        if allowed is not None:  # over-fetch for what the filter drops: OVERFETCH × its expected share
            widths = np.ceil(widths * OVERFETCH * self.n_items / len(allowed)).astype(np.int64)
        groups = 2 ** np.ceil(np.log2(widths)).astype(np.int64)
        for fetch in np.unique(groups):
            part = np.flatnonzero(groups == fetch)
            sub_rows, sub_scores = out_rows[part], out_scores[part]
            self._top_from_index(queries[part], rows[part], want_dense[part], int(min(fetch, self.n_items)),
                                 exclude_seen, excluded, sub_rows, sub_scores, seen, allowed,
                                 (k + n_skip + n_reached)[part], positions=part, residual=residual)
            out_rows[part], out_scores[part] = sub_rows, sub_scores
        if residual is not None and usable.any():
            self._add_reached(queries, residual, usable, want, want_dense, out_rows, out_scores)
        return self._item_ids.ids[out_rows], out_scores, want

    def _residual(self, rows: np.ndarray, seen: tuple, values: np.ndarray) -> "_Residual":
        """The item-item part's residuals for the users (or histories) ``rows``: for each, the
        items R its items reach through :attr:`_neighbours` and ``r_j = sum x_i * w_ij`` over
        them (x from ``values``, aligned with ``seen``'s items), summed for blocks of users of
        about :data:`RESIDUAL_BLOCK` contributions at a time."""
        nb_indptr, nb_items, nb_weights = self._neighbours
        indptr, seen_items, _ = seen
        n = len(rows)
        lengths = indptr[rows + 1] - indptr[rows]
        at = _ranges(indptr[rows], lengths)
        items = seen_items[at].astype(np.int64)
        x = np.asarray(values)[at].astype(np.float64)
        fan = nb_indptr[items + 1] - nb_indptr[items]  # contributions of each interaction
        query_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
        item_ends = np.cumsum(lengths)
        entry_ends = np.bincount(query_of, weights=fan, minlength=n).cumsum() if n else np.zeros(0)
        cuts = np.searchsorted(entry_ends, np.arange(RESIDUAL_BLOCK, entry_ends[-1] if n else 0, RESIDUAL_BLOCK))
        bounds = np.unique(np.concatenate([[0], cuts + 1, [n]]).clip(0, n))  # blocks [a, b) of whole users
        found_items, found_scores, counts = [], [], np.zeros(n, np.int64)
        for a, b in zip(bounds[:-1], bounds[1:]):
            lo, hi = (item_ends[a - 1] if a else 0), (item_ends[b - 1] if b else 0)
            part_fan = fan[lo:hi]
            pos = _ranges(nb_indptr[items[lo:hi]], part_fan)
            codes = np.repeat(query_of[lo:hi] - a, part_fan) * self.n_items + nb_items[pos]
            contributions = np.repeat(x[lo:hi], part_fan) * nb_weights[pos]
            span = int(b - a) * self.n_items
            if span <= min(RESIDUAL_BLOCK, 4 * len(codes)):  # dense enough: add up in place instead of sorting
                sums = np.bincount(codes, weights=contributions, minlength=span)
                codes = np.flatnonzero(np.bincount(codes, minlength=span))
                sums = sums[codes]
            else:
                codes, inverse = np.unique(codes, return_inverse=True)
                sums = np.bincount(inverse, weights=contributions, minlength=len(codes))
            found_scores.append(sums)
            found_items.append(codes % self.n_items)
            counts[a:b] += np.bincount(codes // self.n_items, minlength=int(b - a))
        res_indptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=res_indptr[1:])
        res_items = np.concatenate(found_items) if found_items else np.zeros(0, np.int64)
        owners = np.repeat(np.arange(n, dtype=np.int64), counts)
        return _Residual(res_indptr, res_items, np.concatenate(found_scores) if found_scores else np.zeros(0),
                         owners, owners * self.n_items + res_items)

    def _usable(self, residual: "_Residual", rows: np.ndarray, exclude_seen: bool, excluded: np.ndarray,
                seen_codes: np.ndarray, allowed: Allowed | None) -> np.ndarray:
        """(entries,) bool: which items of ``residual`` may be returned (not seen where
        ``exclude_seen``, not ``excluded``, allowed)."""
        ok = np.ones(len(residual.items), bool)
        if allowed is not None:
            ok &= allowed.mask[residual.items]
        if exclude_seen:
            ok &= ~_member(seen_codes, rows[residual.owners].astype(np.int64) * self.n_items + residual.items)
        if len(excluded):
            ok &= ~np.isin(residual.items, excluded)
        return ok

    def _add_reached(self, queries: np.ndarray, residual: "_Residual", usable: np.ndarray, want: np.ndarray,
                     want_dense: np.ndarray, out_rows: np.ndarray, out_scores: np.ndarray) -> None:
        """Merge each user's usable items of ``residual``, scored exactly (dense + residual), into
        the ``want_dense`` best items from outside R that out_rows/out_scores hold: the best
        ``want`` of both, best first (ties by item row)."""
        owners, items = residual.owners[usable], residual.items[usable]
        dense = np.empty(len(items), np.float32)
        for start in range(0, len(items), SUBSET_BLOCK // max(self.dim + 1, 1)):
            stop = start + SUBSET_BLOCK // max(self.dim + 1, 1)
            dense[start:stop] = np.einsum("ij,ij->i", self._index_rows[items[start:stop]],
                                          queries[owners[start:stop]])
        scores = (dense.astype(np.float64) + residual.scores[usable]).astype(np.float32)
        users = np.unique(owners)
        have = np.arange(out_rows.shape[1])[None, :] < want_dense[users][:, None]
        which, _ = np.nonzero(have)
        all_owners = np.concatenate([users[which], owners])
        all_items = np.concatenate([out_rows[users][have], items])
        all_scores = np.concatenate([out_scores[users][have], scores])
        order = np.lexsort((all_items, -all_scores, all_owners))
        all_owners, all_items, all_scores = all_owners[order], all_items[order], all_scores[order]
        rank = np.arange(len(order)) - np.searchsorted(all_owners, all_owners)
        keep = rank < want[all_owners]
        out_rows[all_owners[keep], rank[keep]] = all_items[keep]
        out_scores[all_owners[keep], rank[keep]] = all_scores[keep]

    def _subset_top(self, queries: np.ndarray, allowed: Allowed, want: np.ndarray, skips: Sequence[np.ndarray],
                    out_rows: np.ndarray, out_scores: np.ndarray, residual: "_Residual | None" = None) -> None:
        """Exact top ``want[i]`` of ``allowed`` for each query, leaving out the rows in
        ``skips[i]``: one (queries × allowed) product over the allowed items' vectors, in blocks,
        plus each query's ``residual`` (the item-item part) on the allowed items it reaches."""
        vectors = allowed.vectors(self._index_rows)
        block = max(1, SUBSET_BLOCK // max(len(allowed), 1))
        for start in range(0, len(queries), block):
            scores = queries[start:start + block] @ vectors.T
            for i, row_scores in enumerate(scores):
                n = int(want[start + i])
                if n <= 0:
                    continue
                if residual is not None:
                    lo, hi = residual.indptr[start + i], residual.indptr[start + i + 1]
                    reached = residual.items[lo:hi]
                    pos = np.searchsorted(allowed.rows, reached).clip(0, len(allowed) - 1)
                    hit = allowed.rows[pos] == reached
                    row_scores[pos[hit]] = row_scores[pos[hit]] + residual.scores[lo:hi][hit]
                skip = skips[start + i]
                if len(skip):
                    pos = np.searchsorted(allowed.rows, skip).clip(0, len(allowed) - 1)
                    row_scores[pos[allowed.rows[pos] == skip]] = -np.inf
                top = _best(row_scores, n)
                out_rows[start + i, :n], out_scores[start + i, :n] = allowed.rows[top], row_scores[top]

    def _similar_allowed(self, queries: np.ndarray, skip: np.ndarray, k: int, allowed: Allowed) -> Neighbours:
        """Items like the one of ``queries`` (1, dim + 1) among ``allowed``, ``skip`` left out."""
        n = max(min(k, len(allowed) - int(allowed.mask[skip].sum())), 0)
        out_rows, out_scores = np.zeros((1, max(n, 1)), np.int64), np.zeros((1, max(n, 1)), np.float32)
        if n and len(allowed) <= SUBSET_SHARE * self.n_items:
            self._subset_top(queries, allowed, np.array([n]), [skip], out_rows, out_scores)
        elif n:
            width = n + int(allowed.mask[skip].sum())
            over = int(min(np.ceil(width * OVERFETCH * self.n_items / len(allowed)), self.n_items))
            for selected, fetch in ((False, over), (True, min(width, self.n_items))):
                scores, found = (search_selected(self.index.faiss, queries, fetch, allowed.bitmap) if selected
                                 else self.index.search(queries, fetch))
                keep = (found[0] >= 0) & ~np.isin(found[0], skip)
                keep &= allowed.mask[np.where(keep, found[0], 0)]
                rows, got = found[0][keep][:n], scores[0][keep][:n]
                if len(rows) == n or over >= self.n_items:
                    break
            if len(rows) < n:  # an approximate index came back short: score exactly
                rows, got = self._exact_top(queries[0], skip, n, allowed)
            out_rows[0, :n], out_scores[0, :n] = rows, got
        return Neighbours(self._item_ids.ids[out_rows[0, :n]], out_scores[0, :n].astype(np.float32))

    def _top_from_index(self, queries, rows, want, fetch: int, exclude_seen: bool, excluded,
                        out_rows, out_scores, seen: tuple, allowed: Allowed | None = None,
                        widths: np.ndarray | None = None, *, positions: np.ndarray | None = None,
                        residual: "_Residual | None" = None) -> None:
        """Fill out_rows/out_scores from one index search of ``fetch`` candidates per user.

        With ``allowed``, candidates it does not allow are dropped; a user left short is searched
        again among the allowed items alone (FAISS bitmap selector, ``widths`` candidates: k
        plus what the user skips). Any user still short (an approximate index) is scored exactly.
        With ``residual`` (over the queries at ``positions`` of it), the items it reaches are
        left out too: :meth:`_add_reached` scores them."""
        indptr, seen_items, _ = seen
        reached = None if residual is None else (residual.codes, positions)
        scores, found = self.index.search(queries, max(fetch, 1))
        counts = self._take(scores, found, rows, want, exclude_seen, excluded, seen, allowed, out_rows, out_scores,
                            reached)
        short = np.flatnonzero(counts < want)
        if allowed is not None and len(short) and fetch < self.n_items:
            width = int(min(widths[short].max(), self.n_items))
            again, found = search_selected(self.index.faiss, queries[short], max(width, 1), allowed.bitmap)
            sub_rows, sub_scores = out_rows[short], out_scores[short]
            counts = self._take(again, found, rows[short], want[short], exclude_seen, excluded, seen, allowed,
                                sub_rows, sub_scores, None if reached is None else (reached[0], positions[short]))
            out_rows[short], out_scores[short] = sub_rows, sub_scores
            short = short[counts < want[short]]
        for r in short:  # an approximate index came back short
            skip = seen_items[indptr[rows[r]]: indptr[rows[r] + 1]] if exclude_seen else excluded[:0]
            skip = np.union1d(skip, excluded)
            if residual is not None:
                p = positions[r]
                skip = np.union1d(skip, residual.items[residual.indptr[p]: residual.indptr[p + 1]])
            n = int(want[r])
            out_rows[r, :n], out_scores[r, :n] = self._exact_top(queries[r], skip, n, allowed)

    def _take(self, scores, found, rows, want, exclude_seen: bool, excluded, seen: tuple, allowed: Allowed | None,
              out_rows, out_scores, reached: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Copy each user's first ``want`` usable candidates of a search into out_rows/out_scores;
        returns how many each got. ``reached``: (sorted ``position * n_items + item`` codes, the
        users' positions) of items to leave out as well."""
        _, _, seen_codes = seen
        valid = found >= 0
        if allowed is not None:
            valid &= allowed.mask[np.where(valid, found, 0)]
        if exclude_seen:
            valid &= ~_is_seen(seen_codes, self.n_items, rows, found)
        if len(excluded):
            valid &= ~np.isin(found, excluded)
        if reached is not None:
            valid &= ~_is_seen(reached[0], self.n_items, reached[1], found)
        take = valid & (np.cumsum(valid, axis=1) <= want[:, None])
        counts = take.sum(axis=1)
        dest = np.arange(out_rows.shape[1])[None, :] < counts[:, None]
        out_rows[dest], out_scores[dest] = found[take], scores[take]
        return counts

    @cached_property
    def _index_rows(self) -> np.ndarray:
        """(n_items, dim + 1) what the index holds, for exact scoring when it comes back short."""
        rows = self._stored_rows
        return rows if rows is not None and len(rows) == self.n_items else item_rows(*self._item_vectors)

    @cached_property
    def _stored_rows(self) -> np.ndarray | None:
        """(n_items, dim + 1) the index's rows, without the last column an approximate index's
        rows on a sphere add (see :func:`aefeatures.store.index.on_sphere`)."""
        return self.index.stored_rows()

    def _exact_top(self, query: np.ndarray, skip, n: int,
                   allowed: Allowed | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores = self._index_rows @ query
        scores[skip] = -np.inf
        if allowed is not None:
            scores[~allowed.mask] = -np.inf
        order = np.argsort(-scores, kind="stable")[:n]
        return order, scores[order]


def _keep_none(nbytes: int) -> bool:
    return False


# What each lookup derives or reads on first use (cached properties), for FeatureSet.is_warm.
_WARM_NEEDS = {
    "recommend": ("_users", "_item_ids", "_interactions", "_neighbours", "index"),
    "similar": ("_item_ids", "_item_vectors", "index"),
    "similar_cosine": ("_item_ids", "_item_vectors", "_unit_items"),
    "similar_users": ("_users", "_unit_users"),
    "history": ("_item_ids", "_encoder", "_neighbours", "index"),
    "similar_users_history": ("_item_ids", "_encoder", "_users", "_unit_users"),
}


def _ranked_frame(key: str, keys: np.ndarray, ids: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> pl.DataFrame:
    """Rows ``key, item_id, rank, score``: the first counts[r] results of row r of ``ids`` and
    ``scores`` (as :meth:`FeatureSet._recommend_rows` gives them), for ``keys[r]``."""
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    return pl.DataFrame({
        key: np.repeat(keys, counts),
        "item_id": ids[keep],
        "rank": np.broadcast_to(np.arange(1, ids.shape[1] + 1, dtype=np.int32), ids.shape)[keep],
        "score": scores[keep],
    })


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= errors.MAX_K:
        raise errors.bad_k(k)


def _best(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` highest ``scores``, best first, ties by position."""
    top = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return top[np.lexsort((top, -scores[top]))]


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _is_seen(seen_codes: np.ndarray, n_items: int, rows: np.ndarray, found: np.ndarray) -> np.ndarray:
    """(n, f) bool: whether item row found[i, j] is among the items of user row rows[i]."""
    if not len(seen_codes):
        return np.zeros(found.shape, bool)
    codes = rows[:, None].astype(np.int64) * n_items + found
    pos = np.searchsorted(seen_codes, codes).clip(0, len(seen_codes) - 1)
    return seen_codes[pos] == codes


def _member(sorted_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Whether each of ``codes`` is in ``sorted_codes`` (sorted ascending), elementwise."""
    if not len(sorted_codes):
        return np.zeros(np.shape(codes), bool)
    pos = np.searchsorted(sorted_codes, codes).clip(0, len(sorted_codes) - 1)
    return sorted_codes[pos] == codes


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(lengths.sum(),) int64: the ranges ``starts[i] .. starts[i] + lengths[i]``, concatenated."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    offsets = np.repeat(np.asarray(starts, np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def _ids(column) -> np.ndarray:
    values = column.to_numpy()
    return values if values.dtype.kind in "iu" else values.astype(str)


def _matrix(column, dim: int) -> np.ndarray:
    flat = column.combine_chunks().values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def _read_neighbours(folder: Path, manifest: dict, name: str, version: str,
                     n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR of :attr:`FeatureSet._neighbours` from ``folder``'s `item_neighbours.parquet`,
    checked against :func:`aefeatures.schema.neighbours_schema`'s rules: rows in range, sorted by
    (neighbour_row, item_row) without repeats, no item its own neighbour, finite weights, as many
    rows as the manifest's ``item_neighbours.entries``. Raises :class:`DamagedVersionError`."""
    name, version = manifest.get("feature_set", name), manifest.get("version", version)
    file = layout.NEIGHBOURS

    def damaged(problem: str) -> errors.DamagedVersionError:
        return errors.damaged_version(name, version, file, problem)

    section = manifest.get("item_neighbours")
    if not isinstance(section, dict):
        raise errors.damaged_version(name, version, layout.MANIFEST, f"has `item_neighbours` {errors.brief(section)}, "
                                     "not an object")
    path = folder / file
    if not path.is_file():
        raise damaged("is missing, though the manifest's `item_neighbours` says the version has an item-item part")
    try:
        table = pq.read_table(path, columns=["item_row", "neighbour_row", "weight"])
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise damaged(f"does not read as an item-neighbours table ({reason})") from None
    items, neighbours, weights = (table.column(c).to_numpy() for c in ("item_row", "neighbour_row", "weight"))
    if items.dtype.kind not in "iu" or neighbours.dtype.kind not in "iu" or weights.dtype.kind != "f":
        raise damaged("has other column types than int32 `item_row`, `neighbour_row` and float32 `weight`")
    entries = section.get("entries")
    if isinstance(entries, int) and not isinstance(entries, bool) and entries != len(items):
        raise damaged(f"holds {len(items):,} rows where the manifest's `item_neighbours.entries` says {entries:,}")
    items, neighbours = items.astype(np.int64), neighbours.astype(np.int64)
    if len(items) and (min(items.min(), neighbours.min()) < 0 or max(items.max(), neighbours.max()) >= n_items):
        raise damaged(f"names item rows outside the version's {n_items:,} items")
    if (items == neighbours).any():
        raise damaged("makes an item its own neighbour")
    if not np.isfinite(weights).all():
        raise damaged("holds a weight that is not a finite number")
    step = np.diff(neighbours)
    if (step < 0).any() or ((step == 0) & (np.diff(items) <= 0)).any():
        raise damaged("is not sorted by (neighbour_row, item_row), or repeats a pair")
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(neighbours, minlength=n_items), out=indptr[1:])
    return indptr, items, weights.astype(np.float32)


class Store:
    """A store directory: ``store[name]`` opens the live version of a feature set."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise errors.no_store(self.root)

    def names(self) -> list[str]:
        return layout.feature_sets(self.root)

    def __getitem__(self, key: str | tuple[str, str]) -> FeatureSet:
        """``store[name]``: the live version; ``store[name, version]``: that version, pinned
        (``StoreError`` if it never was published, ``VersionGoneError`` once retention deleted it)."""
        if isinstance(key, tuple):
            name, version = key
            return self.open(name, version)
        return self.open(key)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def open(self, name: str | None = None, version: str | None = None) -> FeatureSet:
        """A feature set pinned to ``version`` (default: the live one). ``name`` may be left
        out when the store holds exactly one feature set."""
        name = self.default_name() if name is None else name
        return FeatureSet(self.root, name, version or layout.live_version(self.root, name))

    def default_name(self, *, unpublished: bool = False) -> str:
        """The store's one feature set: with a live version, or with ``unpublished`` also one
        that only has refused versions or a run log (for `versions` and `runs`).

        Raises StoreError when the store holds none or several."""
        names = layout.known_feature_sets(self.root) if unpublished else self.names()
        if len(names) == 1:
            return names[0]
        if not names:
            raise errors.empty_store(self.root)
        raise errors.ambiguous_feature_set(self.root, names)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every published or refused version of ``name``, oldest first, with its key facts.

        ``status`` is "live", "published" (superseded), "refused" (by the quality gate) or
        "damaged" (a non-live version whose manifest does not read: ``problem`` says why, ``was``
        its status otherwise; it has no other keys).
        """
        refused = layout.list_refused(self.root, name)
        if not refused or (self.root / name / layout.LATEST).is_file():
            live = layout.live_version(self.root, name)  # raises for a feature set with nothing
            found = [(v, layout.VERSIONS) for v in layout.listed_versions(self.root, name)]
        else:  # only refused versions so far: a first run the gate turned down is visible too
            live, found = "", []
        found += [(v, layout.REFUSED) for v in refused]
        out = []
        for version, folder in sorted(found):
            status = "refused" if folder == layout.REFUSED else "live" if version == live else "published"
            try:
                m = layout.read_manifest(self.root / name / folder / version)
            except (errors.DamagedManifestError, OSError) as exc:
                if version == live:
                    raise
                # one damaged old version must not hide the others: listed with what is wrong
                out.append({"version": version, "status": "damaged", "live": False, "was": status,
                            "problem": str(exc).split(". The version")[0]})
                continue
            out.append({
                "version": version, "status": status, "live": version == live,
                # "embedded": users embedded by `aefeatures embed` with the model (and metrics) of
                # the version named in `embedded_with`; "attributes": fresh item attributes by
                # `aefeatures attributes` (`attributes_from`); "trained": a full run.
                "built": "attributes" if m.get("attributes_from") else "embedded" if m.get("embedded_with")
                else "trained",
                "embedded_with": (m.get("embedded_with") or {}).get("version"),
                "created_at": m["created_at"], "valid_from": layout.valid_from(m),
                "schema_version": int(m.get("schema_version", 1)),
                "users": m["counts"]["users"], "items": m["counts"]["items"],
                "dim": m["dim"], "kind": m["config"]["model"]["kind"], "index": m["index"]["factory"],
                KEY_METRIC: ((m.get("evaluation") or {}).get("model") or {}).get(KEY_METRIC),
                "popularity_" + KEY_METRIC: ((m.get("evaluation") or {}).get("popularity") or {}).get(KEY_METRIC),
                "alignment": drift.public(m.get("alignment")), "drift": m.get("drift"),
                "ease_" + KEY_METRIC: ((m.get("evaluation") or {}).get("reference") or {}).get(KEY_METRIC),
            })
        return out

    def manifest(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The manifest of a version (default: the live one), published or refused."""
        version = version or layout.live_version(self.root, name)
        for folder in (layout.VERSIONS, layout.REFUSED):
            path = self.root / name / folder / version
            if (path / layout.MANIFEST).is_file():
                return layout.read_manifest(path)
        raise errors.no_such_version(self.root, name, version)


def open_store(root: Path | str) -> Store:
    """Open a store directory for lookups (does not import torch)."""
    return Store(root)


class PinnedVersions:
    """Versions asked for by id (HTTP ``?version=``) of the feature sets in the store at
    ``root``, for a service: each is looked up and loaded whole on a thread of this object's,
    never the caller's, at most ``loads`` at once, and kept loaded, the ``keep`` most recently
    used (least recently used first out).

    Errors name no path of the store: they go to clients.
    """

    def __init__(self, root: Path | str, *, keep: int = PINNED_VERSIONS, loads: int = PINNED_LOADS):
        self.root, self.keep, self.loads = Path(root), keep, loads
        self._loaded: OrderedDict[tuple[str, str], FeatureSet] = OrderedDict()
        self._loading: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()  # held only to read or change the two dicts, never to load
        self._pool = ThreadPoolExecutor(max_workers=loads, thread_name_prefix="aefeatures-pinned",
                                        initializer=_yield_cpu)

    def get(self, name: str, version: str) -> FeatureSet | Future | None:
        """At once, without reading a file: version ``version`` of ``name`` if it is loaded; else
        a future of it (a load started now, or the one under way for it), whose result raises
        :class:`FeatureSetNotFoundError` for a version never published, :class:`VersionGoneError`
        for one retention deleted; None when ``loads`` loads of other versions are under way
        (the caller says so and that the client may retry shortly)."""
        if not isinstance(version, str) or not layout.VERSION_PATTERN.fullmatch(version):
            raise self._public(errors.no_such_version(self.root, name, str(version)))
        key = (name, version)
        with self._lock:
            found = self._loaded.get(key)
            if found is not None:
                self._loaded.move_to_end(key)
                return found
            pending = self._loading.get(key)
            if pending is not None:
                return pending
            if len(self._loading) >= self.loads:
                return None
            pending = self._loading[key] = self._pool.submit(self._load, name, version)
        # Outside the lock: a load that has already finished runs the callback at once, and
        # `_done` takes the lock.
        pending.add_done_callback(partial(self._done, key))
        return pending

    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of the versions kept loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _load(self, name: str, version: str) -> FeatureSet:
        try:
            found = FeatureSet(self.root, name, version).load()
        except errors.BadInputError as exc:
            raise self._public(exc) from None
        with self._lock:
            self._loaded[(name, version)] = found
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        return found

    def _done(self, key: tuple[str, str], future: Future) -> None:
        with self._lock:
            if self._loading.get(key) is future:
                del self._loading[key]

    def _public(self, exc: Exception) -> Exception:
        """``exc`` with the store's path left out of its message (it goes to clients)."""
        message = str(exc)
        for root in sorted({str(self.root), str(self.root.resolve())}, key=len, reverse=True):
            message = message.replace(f" in `{root}`", "").replace(f"`{root}`", "the store")
            if Path(root).is_absolute():  # within another path, say a file's
                message = message.replace(root, "STORE")
        if message == str(exc):
            return exc
        public = type(exc).__new__(type(exc))  # the same class and fields (`missing`), another message
        public.__dict__.update(exc.__dict__)
        public.args = (message,)
        if "message" in public.__dict__:  # AEFeaturesError's str()
            public.message = message
        return public


def _yield_cpu() -> None:
    """Lower the calling thread's CPU priority (Linux gives each thread a nice value of its own):
    loading a pinned version yields the CPU to the lookups being answered meanwhile."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: load at the usual priority
        pass
