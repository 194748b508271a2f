"""Stage 6: the FAISS inner-product index over item vectors.

Index rows are item rows (the row order of `items.parquet`). Item j is indexed as
``[W[j], b[j]]`` and a user queries with ``[z, 1]``, so the inner product is exactly the
model's score ``z · W[j] + b[j]``; an item queries with ``[W[i], 0]`` for "items like i".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from aefeatures import errors
from aefeatures.config import INDEX_KINDS
from aefeatures.store import layout

HNSW_EF_SEARCH = 128  # starting search effort; raised until the recall target is met
IVF_NPROBE = 16
MAX_EF_SEARCH = 4096
SATURATED = 0.002  # recall gained by doubling the effort below which tuning stops
AUTO_EXACT_UP_TO = 100_000  # items; exact search stays fast enough below this
AUTO_FULL_VECTORS_UP_TO = 4 << 30  # bytes of float32 vectors; beyond, `auto` compresses them


@dataclass(frozen=True)
class BuiltIndex:
    index: faiss.Index
    factory: str  # the FAISS factory string that built it
    recall_at_10: float  # against exact search on sampled user queries (1.0 for exact)
    search: dict[str, int]  # the search effort it was saved with, e.g. {"efSearch": 256}


def item_rows(item_vectors: np.ndarray, item_bias: np.ndarray) -> np.ndarray:
    """(n_items, dim + 1) float32: what the index stores for each item."""
    return np.ascontiguousarray(np.hstack([item_vectors, item_bias[:, None]]), dtype=np.float32)


def on_sphere(rows: np.ndarray) -> np.ndarray:
    """(n, width + 1) ``rows`` with a last column ``sqrt(M² - |row|²)``, M the largest norm.

    Every row then has norm M, and a query padded with 0 scores each row exactly as before, so
    inner-product search on these rows is search by angle, which IVF lists and HNSW graphs
    partition well. On the raw rows they do not: an item's bias is part of its row, and for
    weakly trained models whose item vectors are small next to their biases, IVF over the raw
    rows found none of the exact top 10 (recall@10 0.000 at 983k items) where the same index
    over these rows found all of them (after Bachrach et al. 2014, Xbox recommender)."""
    squares = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    lift = np.sqrt(np.maximum(squares.max(initial=0.0) - squares, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([rows, lift[:, None]]), dtype=np.float32)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, item rows) of ``index.search`` for queries of any width up to the index's."""
    return index.search(padded(queries, index.d), k)


def search_selected(index: faiss.Index, queries: np.ndarray, k: int, bitmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, item rows) of a search that only considers the rows whose bit is set in
    ``bitmap`` (``np.packbits(mask, bitorder="little")``, uint8), through FAISS's
    ``IDSelectorBitmap`` at the index's own search effort (efSearch, nprobe). Like
    :func:`search`, rows come back -1 where fewer than ``k`` were found."""
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(inner.nprobe))
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(padded(queries, index.d), k, params=params)


def padded(queries: np.ndarray, width: int) -> np.ndarray:
    """(n, width) float32 ``queries``, with a zero column added where the index holds
    :func:`on_sphere` rows, one column wider than the queries. Any other width is refused
    (:class:`BadInputError`): zeros would score a narrower query silently wrong."""
    if queries.ndim != 2 or queries.shape[1] not in (width, width - 1):
        raise errors.query_width(queries.shape, width)
    if queries.shape[1] < width:
        queries = np.hstack([queries, np.zeros((len(queries), 1), np.float32)])
    return np.ascontiguousarray(queries, dtype=np.float32)


def user_queries(user_vectors: np.ndarray) -> np.ndarray:
    """(n_users, dim + 1) float32: the query that scores items as the model does."""
    ones = np.ones((len(user_vectors), 1), dtype=np.float32)
    return np.ascontiguousarray(np.hstack([user_vectors, ones]), dtype=np.float32)


def item_queries(item_vectors: np.ndarray) -> np.ndarray:
    """(n, dim + 1) float32: the query for "items like these" (inner product of item vectors)."""
    zeros = np.zeros((len(item_vectors), 1), dtype=np.float32)
    return np.ascontiguousarray(np.hstack([item_vectors, zeros]), dtype=np.float32)


def factory_string(kind: str, n_items: int, width: int) -> str:
    """Translate the job file's `index.kind` into a FAISS factory string.

    ``auto``: exact search up to 100k items; IVF with full vectors while they fit in 4 GiB;
    beyond that IVF with product quantization, about ``width / 8`` bytes per item instead of
    ``4 * width``. IVF rather than HNSW because the search is by inner product with the bias
    folded in, where an HNSW graph finds the best items poorly: at 1M clustered items HNSW32
    needed efSearch 1024 for recall@20 0.97 at 530 queries/s, IVF reached 0.985 at nprobe 16
    and 6,400 queries/s (BENCHMARKS.md; both over the raw rows, before :func:`on_sphere`). The
    build measures recall and raises the search effort to `index.min_recall`.
    """
    nlist = max(1, min(int(4 * math.sqrt(n_items)), n_items // 39))
    if kind == "auto":
        if n_items <= AUTO_EXACT_UP_TO:
            kind = "flat"
        else:
            kind = "ivf" if n_items * width * 4 <= AUTO_FULL_VECTORS_UP_TO else "ivfpq"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        padded_width, m = pq_split(width)
        pad = f"Pad{padded_width}," if padded_width != width else ""
        return f"{pad}IVF{nlist},PQ{m}"
    return kind  # a FAISS factory string given verbatim


PQ_SUB_DIMS = (4, 16)  # dims a product-quantization sub-vector may have; 8 is the aim


def pq_split(width: int) -> tuple[int, int]:
    """(padded width, sub-quantizer count M) for product quantization of ``width``-wide rows.

    Each of the M sub-quantizers codes ``padded width / M`` dims in one byte (256 centroids),
    so about 8 dims each keeps the codes ~``width / 8`` bytes an item (Jégou et al. 2011,
    "Product quantization for nearest neighbor search"). M divides the width, with the
    sub-vector width closest to 8 among 4..16; a width with no such divisor (a prime such as
    17) is padded with zero columns to the nearest one that has (FAISS ``PadN``), rather than
    cut into one-dimensional sub-vectors (17 one-byte codes, each training its own k-means).
    """
    low, high = PQ_SUB_DIMS
    padded_width = max(width, low)
    while True:
        splits = [m for m in range(1, padded_width + 1)
                  if padded_width % m == 0 and low <= padded_width // m <= high]
        if splits:
            return padded_width, min(splits, key=lambda m: (abs(padded_width // m - 8), -m))
        padded_width += 1


def build_index(rows: np.ndarray, kind: str, *, sample_queries: np.ndarray | None = None,
                target_recall: float | None = None) -> BuiltIndex:
    """Build an inner-product index over ``rows`` (n_items, width).

    With ``sample_queries``, recall@10 against exact search is measured on them; with
    ``target_recall`` as well, the search effort (HNSW efSearch, IVF nprobe) is raised step by
    step until that recall is met or the effort reaches its ceiling. The index is saved with
    its effort, so every later search runs at it.

    Raises
    ------
    BadInputError
        ``kind`` is not a FAISS factory string FAISS accepts.
    """
    n, width = rows.shape
    factory = factory_string(kind, n, width)
    exact_rows = rows
    if holds_rows_on_sphere(kind, factory):  # a verbatim factory string indexes the rows as they are
        rows = on_sphere(rows)
        factory = factory_string(kind, n, width + 1)
    try:
        index = faiss.index_factory(rows.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise errors.BadInputError(
            f"`index.kind` = {kind!r} is not a FAISS index FAISS can build ({str(exc).splitlines()[0][:120]}). "
            "Use auto, flat, hnsw, ivf, ivfpq or a valid factory string such as \"HNSW32,Flat\"."
        ) from None
    _skip_polysemous_training(index)
    try:
        if not index.is_trained:
            index.train(rows)
        index.add(rows)
    except RuntimeError as exc:  # e.g. more IVF lists than items to train them on
        reason = str(exc).splitlines()[-1].split("Error: ")[-1][:160]
        raise errors.BadInputError(
            f"`index.kind` = {kind!r} ({factory}) cannot be built over {n} items ({reason}). "
            'Use index.kind = "flat" for a catalogue this small, or a factory string with fewer lists.'
        ) from None
    _set_effort(index, HNSW_EF_SEARCH, IVF_NPROBE)
    _keep_item_positions(index)
    if factory == "Flat" or sample_queries is None:
        return BuiltIndex(index, factory, 1.0, search_effort(index))
    truth = exact_neighbours(exact_rows, sample_queries)
    recall = (tune_search(index, sample_queries, truth, target_recall) if target_recall
              else measure_recall(index, sample_queries, truth))
    return BuiltIndex(index, factory, recall, search_effort(index))


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Train an IVF-PQ index's codebooks without FAISS's polysemous step, which reorders each
    sub-quantizer's centroids for Hamming-distance filtering (Douze et al., "Polysemous codes",
    ECCV 2016) that lookups never use (``polysemous_ht`` stays 0): the codes and every search's
    answers are the same, and training at 5,000 items × 72 dims took 1.3 s instead of 20 s here."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # no IVF inside
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def tune_search(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target: float) -> float:
    """Double the index's search effort until recall@k on ``queries`` reaches ``target``; stop
    early at the effort's ceiling or once doubling no longer helps (compressed codes cap the
    recall whatever the effort), keeping the last effort that did. Returns the recall reached.
    A no-op for exact indexes."""
    recall = measure_recall(index, queries, truth)
    while recall < target:
        effort = search_effort(index)
        ef, nprobe = effort.get("efSearch", 0), effort.get("nprobe", 0)
        nlist = faiss.extract_index_ivf(index).nlist if nprobe else 0
        if (not ef or ef >= MAX_EF_SEARCH) and (not nprobe or nprobe >= nlist):
            break
        _set_effort(index, min(2 * ef, MAX_EF_SEARCH), min(2 * nprobe, nlist))
        better = measure_recall(index, queries, truth)
        if better < recall + SATURATED:
            _set_effort(index, ef, nprobe)
            break
        recall = better
    return recall


def search_effort(index: faiss.Index) -> dict[str, int]:
    effort = {}
    hnsw = _hnsw(index)
    if hnsw is not None:
        effort["efSearch"] = int(hnsw.hnsw.efSearch)
    try:
        effort["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        pass  # not an IVF index
    return effort


def _set_effort(index: faiss.Index, ef_search: int, nprobe: int) -> None:
    hnsw = _hnsw(index)
    if hnsw is not None and ef_search:
        hnsw.hnsw.efSearch = ef_search
    try:
        if nprobe:
            faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index


def _hnsw(index: faiss.Index):
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def exact_neighbours(rows: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """(n_queries, min(k, n_items)) the true top-k item rows of each query."""
    exact = faiss.IndexFlatIP(rows.shape[1])
    exact.add(rows)
    return exact.search(queries, min(k, len(rows)))[1]


def measure_recall(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k of ``index`` on ``queries`` against their exact top-k ``truth``."""
    _, found = search(index, queries, truth.shape[1])
    hits = [len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist())]
    return float(np.mean(hits)) / truth.shape[1]


def _keep_item_positions(index: faiss.Index) -> None:
    """An IVF index with full vectors keeps where each item sits (saved with it), so item
    vectors can be copied out of it rather than decoded from Parquet (see :func:`stored_rows`)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVFFlat):
        index.make_direct_map()


def stored_rows(index: faiss.Index) -> np.ndarray | None:
    """(n_items, width) read-only rows an index stores whole: a view of its storage (in memory
    or memory-mapped) for Flat or HNSW over Flat, a copy out of the lists for IVF-Flat; None for
    compressed codes. A view is valid while ``index`` lives: copy what must outlive it."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVFFlat) and index.direct_map.type != faiss.DirectMap.NoMap and index.ntotal:
        rows = index.reconstruct_n(0, index.ntotal)  # a copy: IVF lists hold items out of order
        rows.flags.writeable = False
        return rows
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
        return None
    rows = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    rows.flags.writeable = False  # the mapping is read-only: a write would crash the process
    return rows


def save_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


READ_WHOLE_UP_TO = 64 << 20  # bytes: an index up to this size is read into memory, a larger one mapped


def load_index(path: Path) -> faiss.Index:
    """The index at ``path``, read whole into memory up to :data:`READ_WHOLE_UP_TO` bytes (a
    flat index of about 250k items at 64 dims), memory-mapped beyond where FAISS can (flat
    codes, HNSW storage, IVF lists): a large index then opens in milliseconds and worker
    processes share its pages instead of each holding a copy (+248 MiB a process at 1M items).

    A mapped file truncated in place under its reader kills the process with SIGBUS at the next
    read of a page past the new end; a file read whole is immune, and deleting either is
    harmless. Versions never change after publishing, and :func:`open_version_index` checks
    the file's recorded size and hash right before this is called, so only a hand-made change
    to a large index while it is served can still do that.

    Raises
    ------
    RuntimeError
        FAISS cannot read the file (truncated, not an index).
    """
    if path.stat().st_size <= READ_WHOLE_UP_TO:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


HEAD_ROWS = 8  # rows of items.parquet compared with the index when a version's index is opened


def open_version_index(folder: Path, manifest: dict, n_items: int) -> "EmbeddingIndex":
    """The item index of the published version in ``folder`` (its ``manifest``, ``n_items``
    rows in `items.parquet`), checked before it is used: the file is the one published (size and
    hash, :func:`aefeatures.store.layout.check_files`), FAISS reads it, its rows are as wide as
    the manifest's ``dim`` says, it holds exactly ``n_items`` rows, and where it stores rows whole
    its first :data:`HEAD_ROWS` rows equal `items.parquet`'s ``[embedding, bias]`` (which also
    catches another version's index in a version published before fingerprints).

    Raises
    ------
    DamagedVersionError
        Any of these checks fails; the message names the file and the version.
    """
    layout.check_files(folder, manifest, [layout.INDEX])
    name, version = manifest.get("feature_set", folder.parent.parent.name), manifest.get("version", folder.name)
    built = manifest.get("index") or {}
    sphere = holds_rows_on_sphere(built["kind"], built["factory"]) if {"kind", "factory"} <= set(built) else None
    path = folder / layout.INDEX
    try:
        index = EmbeddingIndex(load_index(path), int(manifest["dim"]), on_sphere=sphere, source=path)
    except (RuntimeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[-1].split("Error: ")[-1][:160] if str(exc).strip() else type(exc).__name__
        raise errors.damaged_version(name, version, layout.INDEX, f"cannot be read by FAISS ({reason})") from None
    if index.ntotal != n_items:
        raise errors.damaged_version(name, version, layout.INDEX, f"holds {index.ntotal:,} items but "
                                     f"{layout.ITEMS} has {n_items:,} rows: it is not this version's index")
    head = index.head_rows(HEAD_ROWS)
    if head is not None and len(head):
        expected = _items_head(folder / layout.ITEMS, len(head), index.dim)
        if expected is not None and not np.allclose(head, expected, rtol=1e-6, atol=1e-6):
            raise errors.damaged_version(name, version, layout.INDEX, f"holds other vectors than {layout.ITEMS} "
                                         "for its first items: it is not this version's index")
    return index


def _items_head(path: Path, n: int, dim: int) -> np.ndarray | None:
    """(n, dim + 1) ``[embedding, bias]`` of the first ``n`` rows of an `items.parquet`; None for
    a table without a bias column. Reads the first pages only, through a small buffer (the
    default reads the whole row group's column: 1.2 s and 340 MiB at 1M items × 64 dims)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path, buffer_size=1 << 16, pre_buffer=False)
    if "bias" not in table.schema_arrow.names:
        return None
    batch = next(table.iter_batches(batch_size=n, columns=["embedding", "bias"]))
    vectors = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return item_rows(vectors.astype(np.float32), batch.column(1).to_numpy(zero_copy_only=False).astype(np.float32))


def holds_rows_on_sphere(kind: str, factory: str) -> bool:
    """Whether :func:`build_index` built ``factory`` (from the job file's ``kind``) over the
    :func:`on_sphere` rows, one column wider than the queries."""
    return factory != "Flat" and kind in INDEX_KINDS


class EmbeddingIndex:
    """The read side's item index: a FAISS inner-product index over ``(n_items, dim + 1)``
    item rows ``[W[j], b[j]]`` (plus the :func:`on_sphere` column for approximate kinds), with
    the embedding width ``dim`` its queries must have.

    Queries are ``(n, dim + 1)`` float32 (:func:`user_queries`, :func:`item_queries`); any
    other width raises :class:`BadInputError` rather than being padded. Scores are inner
    products (``metric`` "ip"), exactly the model's ``z · W[j] + b[j]`` for exact kinds.
    """

    metric = "ip"

    def __init__(self, index: faiss.Index, dim: int, *, on_sphere: bool | None = None,
                 source: Path | str = "(in memory)"):
        widths = {None: (dim + 1, dim + 2), False: (dim + 1,), True: (dim + 2,)}[on_sphere]
        if index.d not in widths:
            raise errors.index_width_mismatch(source, index.d, dim, widths)
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise errors.index_metric_mismatch(source, int(index.metric_type))
        self.faiss, self.dim = index, dim

    @classmethod
    def open(cls, path: Path, dim: int, *, on_sphere: bool | None = None) -> "EmbeddingIndex":
        """The index at ``path`` (memory-mapped where FAISS can, see :func:`load_index`),
        checked against ``dim``, the embedding width the version's manifest records, and,
        where known (:func:`holds_rows_on_sphere`), whether it holds rows on a sphere.

        Raises
        ------
        BadInputError
            The index holds rows of another width than ``dim`` + 1 (or + 2 on a sphere), or
            does not score by inner product: the files of the version disagree.
        """
        return cls(load_index(path), dim, on_sphere=on_sphere, source=path)

    @property
    def ntotal(self) -> int:
        """Number of items indexed."""
        return int(self.faiss.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k) float32, item rows (n, k) int64, -1 where fewer were found) of the
        ``k`` best items for ``(n, dim + 1)`` ``queries``."""
        if queries.ndim != 2 or queries.shape[1] != self.dim + 1:
            raise errors.query_width(queries.shape, self.dim + 1)
        return search(self.faiss, queries, k)

    def head_rows(self, n: int) -> np.ndarray | None:
        """(min(n, n_items), dim + 1) the first item rows where the index stores rows whole (a
        view, or a copy of only these out of IVF lists), else None."""
        inner = faiss.downcast_index(self.faiss)
        if isinstance(inner, faiss.IndexIVFFlat):
            if inner.direct_map.type == faiss.DirectMap.NoMap or not inner.ntotal:
                return None
            return inner.reconstruct_n(0, min(n, int(inner.ntotal)))[:, : self.dim + 1]
        rows = stored_rows(self.faiss)
        return None if rows is None else rows[:n, : self.dim + 1]

    def stored_rows(self) -> np.ndarray | None:
        """(n_items, dim + 1) the item rows where the index stores them whole, else None
        (see :func:`stored_rows`; the sphere's column is dropped)."""
        rows = stored_rows(self.faiss)
        return None if rows is None else rows[:, : self.dim + 1]

    def holds_items(self) -> bool:
        """Whether item rows can come from the index (in memory or memory-mapped) at any later time."""
        index = faiss.downcast_index(self.faiss)
        if isinstance(index, faiss.IndexHNSW):
            index = faiss.downcast_index(index.storage)
        return isinstance(index, faiss.IndexFlat) or (
            isinstance(index, faiss.IndexIVFFlat) and index.direct_map.type != faiss.DirectMap.NoMap)
