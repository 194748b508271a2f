"""Stage 1: read interactions from Parquet with Polars, validate them, collapse duplicates.

The input is read once and checked in memory. The result is one row per distinct (user, item)
pair, held coded in CSR order (see :mod:`aefeatures.data.matrix`) and shown as a frame with canonical
columns (`user_id`, `item_id`, `weight` float32, `timestamp` UTC or null) whatever the input
calls them.
"""

from __future__ import annotations

import glob as globlib
import inspect
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from aefeatures import errors
from aefeatures.config import InputConfig, timestamp_bound
from aefeatures.data.matrix import Pairs, collapse_pairs, pairs_of_frame
from aefeatures.schema import ITEM, TIMESTAMP, USER, WEIGHT

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # training runs in float32: larger weights become inf
_T = TypeVar("_T")
# Arrow spellings of one type: pyarrow and Spark write `string`, Polars `large_string`.
_SAME_TYPE = {"large_string": "string", "string_view": "string", "large_binary": "binary"}
# Later files may add columns the job does not read (schema evolution): recent Polars rejects
# them unless told to ignore them; older Polars has no such option.
_SCAN_OPTIONS = {"extra_columns": "ignore"} if "extra_columns" in inspect.signature(pl.scan_parquet).parameters \
    else {}


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int


class Interactions:
    """Validated interactions: one row per distinct (user, item) pair.

    :func:`read_interactions` holds them as coded :class:`Pairs` and makes the ``frame`` (columns
    user_id, item_id, weight (f32), timestamp (datetime UTC), in CSR order) only when asked. A
    caller may pass a frame with those columns instead; it is coded on first use.
    """

    def __init__(self, frame: pl.DataFrame | None, files: tuple[InputFile, ...], n_rows_read: int,
                 n_rows_kept: int, has_timestamps: bool, *, pairs: Pairs | None = None,
                 timestamps: dict[str, object] | None = None):
        if (frame is None) == (pairs is None):
            raise TypeError("Interactions takes either a frame or pairs")
        self.files = files  # what was read: the input's fingerprint
        self.n_rows_read = n_rows_read  # rows in the input before filtering
        self.n_rows_kept = n_rows_kept  # rows after `min_weight`, before collapsing duplicates
        self.has_timestamps = has_timestamps
        # How the timestamp column was read: {"column", "type", "unit", "inferred", "window"}
        # (recorded in the manifest); None without a timestamp column.
        self.timestamps = timestamps
        if frame is not None:
            self.__dict__["frame"] = frame
        if pairs is not None:
            self.__dict__["pairs"] = pairs

    @cached_property
    def frame(self) -> pl.DataFrame:
        return self.pairs.frame()

    @cached_property
    def pairs(self) -> Pairs:
        return pairs_of_frame(self.frame)


def read_interactions(cfg: InputConfig, *, shard: tuple[int, int] | None = None) -> Interactions:
    """Read, validate and deduplicate the interactions that ``cfg`` points at.

    Duplicated (user, item) rows collapse to one with the largest weight and the latest
    timestamp. Rows whose weight is below ``cfg.min_weight`` are dropped first.

    ``shard = (rank, world_size)`` keeps only that rank's users: the sorted distinct users cut
    into ``world_size`` contiguous ranges of about equal interaction counts (a first pass reads
    the user column alone), so the shards of all ranks, in rank order, are the whole input in
    user order and each rank holds only its own share in memory.

    Raises
    ------
    BadInputError
        Any of its subclasses, naming the file, column and row at fault.
    """
    files, source = _resolve_files(cfg.path)
    id_types = _check_file_schemas(files, cfg)
    _verify_page_checksums(files, cfg)
    # A directory is read as the exact files listed above, so hidden and `_` files stay out.
    is_dir = Path(source).is_dir()
    lazy = pl.scan_parquet([str(f) for f in files] if is_dir else source, hive_partitioning=is_dir or None,
                           glob=not (is_dir or Path(source).is_file()),  # `[`, `*`, `?` in a file's name are its own
                           **_SCAN_OPTIONS, **_unified(files, cfg, id_types))
    schema = _blaming_files(lazy.collect_schema, files)
    _check_columns(cfg, schema)
    timestamps = _timestamp_reading(cfg, lazy, schema, files)
    canonical = lazy.select(_canonical_columns(cfg, schema, timestamps and timestamps["unit"]))
    if shard is not None and shard[1] > 1:
        canonical = canonical.filter(_users_of_shard(canonical, files, *shard))
    rows = _blaming_files(canonical.collect, files)
    n_rows_read = _check_values(rows, cfg, files)
    if timestamps is not None:
        _check_timestamp_window(rows, cfg, files, timestamps["unit"])
    if cfg.min_weight is not None:
        rows = rows.filter(pl.col(WEIGHT) >= cfg.min_weight)
    if rows.height == 0:
        why = f"none has `{cfg.weight_col}` >= {cfg.min_weight}" if cfg.min_weight is not None else "they are empty"
        raise errors.EmptyInputError(cfg.path, len(files), n_rows_read, why)
    pairs = collapse_pairs(rows.get_column(USER), rows.get_column(ITEM),
                           weights=rows.get_column(WEIGHT) if cfg.weight_col else None,
                           timestamps=rows.get_column(TIMESTAMP) if cfg.timestamp_col else None)
    if len(pairs.item_ids) < 2:
        raise errors.TooFewItemsError(cfg.path, len(pairs.item_ids))
    log.info("read %d rows from %d file(s); %d kept, %d distinct pairs",
             n_rows_read, len(files), rows.height, len(pairs))
    return Interactions(None, _describe(files), n_rows_read, rows.height, cfg.timestamp_col is not None,
                        pairs=pairs, timestamps=timestamps)


def _users_of_shard(canonical: pl.LazyFrame, files: list[Path], rank: int, world: int) -> pl.Expr:
    """The predicate of rank ``rank``'s users: a contiguous range of the sorted distinct users
    holding about 1/``world`` of the rows. Null ids are left in every shard, to be reported."""
    counts = _blaming_files(canonical.group_by(USER).len().drop_nulls(USER).sort(USER).collect, files)
    ids, cumulative = counts.get_column(USER), counts.get_column("len").cum_sum().to_numpy()
    total = int(cumulative[-1]) if len(cumulative) else 0
    bounds = np.searchsorted(cumulative, np.arange(world + 1) * total / world, side="right")
    first, stop = int(bounds[rank]), int(bounds[rank + 1])  # this rank: users first .. stop-1
    user = pl.col(USER)
    if first == stop:
        return user.is_null()
    inside = user >= ids[first]
    if stop < len(ids):
        inside = inside & (user < ids[stop])
    return inside | user.is_null()


def input_files(path: str) -> tuple[InputFile, ...]:
    """The files ``path`` stands for, with size and modification time: the input's fingerprint
    (cheap: no data is read). Raises :class:`InputNotFoundError` like a read would."""
    return _describe(_resolve_files(path)[0])


def _describe(files: list[Path]) -> tuple[InputFile, ...]:
    return tuple(InputFile(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _resolve_files(path: str) -> tuple[list[Path], str]:
    """The Parquet files behind ``path`` and the source string to hand to Polars; files inside a
    table format's folder (Delta Lake, Iceberg, Hudi) are refused (:func:`_refuse_table_formats`)."""
    files, source = _listed_files(path)
    _refuse_table_formats(path, files)
    return files, source


# A table format keeps a log of which of its folder's files are live: its folder read as loose
# Parquet files resurrects deleted and overwritten rows (a deletion request undone).
def _table_format(folder: Path) -> tuple[str, str] | None:
    """(what, its marker) when ``folder`` is the root of a Delta Lake, Hudi or Iceberg table."""
    if (folder / "_delta_log").is_dir():
        return "a Delta Lake table", "_delta_log/"
    if (folder / ".hoodie").is_dir():
        return "an Apache Hudi table", ".hoodie/"
    if (folder / "data").is_dir() and any((folder / "metadata").glob("*.metadata.json")):
        return "an Apache Iceberg table", "metadata/*.metadata.json"
    return None


def _refuse_table_formats(path: str, files: list[Path]) -> None:
    for folder in sorted({parent for f in files for parent in f.parents}, key=lambda p: len(p.parts)):
        found = _table_format(folder)
        if found:
            raise errors.InputNotFoundError(
                path, f"is inside {found[0]} (`{folder}` has `{found[1]}`), whose folder keeps files its log has "
                      "deleted or replaced: read as plain Parquet, those rows would come back. Export the table's "
                      "current snapshot to Parquet (Spark, or the `deltalake` / `pyiceberg` packages) and point the "
                      "job at that")


def _listed_files(path: str) -> tuple[list[Path], str]:
    if any(c in path for c in _GLOB_CHARS) and not Path(path).exists():  # a name that exists is itself
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise errors.InputNotFoundError(path, "matches no files")
        return files, path
    p = Path(path)
    if p.is_file():
        return [p], str(p)
    if p.is_dir():
        files = sorted(f for f in _walk(p) if f.is_file() and not _hidden(f.relative_to(p)))
        if not files:
            raise errors.InputNotFoundError(path, "is a directory with no data files")
        return files, str(p)
    raise errors.InputNotFoundError(path, "does not exist")


def _walk(root: Path) -> list[Path]:
    """Every file below ``root``, entering linked folders as Polars and DuckDB do (a backfilled
    or shared day is often `dt=2024-06-02 -> /elsewhere/...`), each real folder once (a link
    back up is not a loop). Paths stay under ``root``, so hive keys come from them."""
    files, seen = [], set()
    for folder, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names]
    return files


def _hidden(relative: Path) -> bool:
    # Spark/Hive leave `_SUCCESS`, `_metadata` and `.crc` files beside the data.
    return any(part.startswith((".", "_")) for part in relative.parts)


def _check_file_schemas(files: list[Path], cfg: InputConfig) -> dict[str, pl.DataType]:
    """Every file must be Parquet, and the columns the job reads must agree on type.

    Id columns need only agree on their kind (see :func:`_id_kind`): integers of any width,
    unsigned 64-bit integers, or text (string, large_string, string_view, dictionary/categorical
    with any index width or dictionary). Returns the type to read each id column as, when the
    files spell it differently (else an empty dict: Polars reads them as they are)."""
    keys = {"user_col": cfg.user_col, "item_col": cfg.item_col,
            "weight_col": cfg.weight_col, "timestamp_col": cfg.timestamp_col}
    wanted = {c: k for k, c in keys.items() if c}
    kinds_of = {cfg.user_col: _id_kind, cfg.item_col: _id_kind}
    if cfg.timestamp_col:
        kinds_of[cfg.timestamp_col] = _timestamp_kind
    first_seen: dict[str, tuple[str, str, str]] = {}
    spellings: dict[str, set[str]] = {c: set() for c in kinds_of}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as exc:  # pyarrow raises several types for a bad footer
            raise errors.NotParquetError(str(f), str(exc).splitlines()[0][:160]) from None
        absent = [c for c in wanted if c not in schema.names and not _hive_key(f, c)]
        if absent and len(files) > 1:  # one file lacks what others have: name that file
            raise errors.MissingColumnsError(str(f), absent, schema.names, [wanted[c] for c in absent])
        for col in wanted:
            if col not in schema.names:
                continue  # a hive partition key, or missing everywhere: checked on the frame
            shown = str(schema.field(col).type)
            shown = typ = _SAME_TYPE.get(shown, shown)
            if col in kinds_of:  # ids and timestamps need only agree on their kind
                spellings[col].add(shown)
                typ = kinds_of[col](schema.field(col).type)
            if col not in first_seen:
                first_seen[col] = (str(f), typ, shown)
            elif first_seen[col][1] != typ:
                first_file, _, first_shown = first_seen[col]
                raise errors.SchemaDriftError(col, first_file, first_shown, str(f), shown)
    return {col: _READ_AS[first_seen[col][1]] for col in kinds_of
            if len(spellings[col]) > 1 and first_seen.get(col, ("", ""))[1] in _READ_AS}


def _verify_page_checksums(files: list[Path], cfg: InputConfig) -> None:
    """Decode the job's columns of every file with page CRC verification (pyarrow), so a page
    that rotted in a file written with checksums (as Spark writes them) is refused, naming the
    file, instead of decoding into invented ids; Polars does not check them. Pages written
    without a checksum pass. Costs one more decode of those columns (0.7 s at the ML-20M shape
    on 2 cores, against 2.4 s for the whole read)."""
    wanted = [c for c in (cfg.user_col, cfg.item_col, cfg.weight_col, cfg.timestamp_col) if c]
    for f in files:
        parquet = pq.ParquetFile(f, page_checksum_verification=True)
        columns = [c for c in wanted if c in parquet.schema_arrow.names]
        try:
            for _ in parquet.iter_batches(batch_size=1 << 20, columns=columns):
                pass
        except OSError as exc:
            raise errors.NotParquetError(str(f), f"a data page fails its checksum: {str(exc).splitlines()[0][:120]}; "
                                                 "the file is damaged") from None


_READ_AS = {"integer": pl.Int64, "uint64": pl.UInt64, "text": pl.String, "datetime": pl.Datetime("us", "UTC")}


def _timestamp_kind(typ) -> str:
    """The kind of an Arrow timestamp column: "datetime" for every unit and zone (Spark's INT96
    reads as ns; naive values are UTC), "integer"/"uint64" for epochs, or the type itself."""
    import pyarrow as pa

    return "datetime" if pa.types.is_timestamp(typ) else _id_kind(typ) if pa.types.is_integer(typ) else str(typ)


def _id_kind(typ) -> str:
    """The kind of an Arrow id type: "integer" (signed, or unsigned below 64 bits: read as
    Int64), "uint64" (read as UInt64, so hashes >= 2**63 keep their value), "text", or the
    type itself (refused later)."""
    import pyarrow as pa

    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_uint64(typ):
        return "uint64"
    if pa.types.is_integer(typ):
        return "integer"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or str(typ) == "string_view":
        return "text"
    return str(typ)


def _unified(files: list[Path], cfg: InputConfig, id_types: dict[str, pl.DataType]) -> dict[str, object]:
    """Scan options reading id and timestamp columns spelled differently across files (Int32
    here, Int64 there; categorical here, string there; INT96 here, ms in Europe/Paris there)
    as one type. Naive datetimes are taken as UTC, as everywhere."""
    if not id_types:
        return {}
    first = pl.read_parquet_schema(files[0])
    columns = [c for c in (cfg.user_col, cfg.item_col, cfg.weight_col, cfg.timestamp_col) if c and c in first]
    schema = {c: id_types.get(c, first[c]) for c in dict.fromkeys(columns)}
    return {"schema": schema, "cast_options": pl.ScanCastOptions(
        integer_cast="upcast", categorical_to_string="allow",
        datetime_cast=["nanosecond-downcast", "millisecond-upcast", "convert-timezone"])}


def _hive_key(file: Path, column: str) -> bool:
    return any(part.startswith(f"{column}=") for part in file.parent.parts)


def _check_columns(cfg: InputConfig, schema: pl.Schema) -> None:
    keys = {"user_col": cfg.user_col, "item_col": cfg.item_col,
            "weight_col": cfg.weight_col, "timestamp_col": cfg.timestamp_col}
    missing = {k: c for k, c in keys.items() if c and c not in schema}
    if missing:
        raise errors.MissingColumnsError(cfg.path, list(missing.values()), schema.names(), list(missing))
    for col in (cfg.user_col, cfg.item_col):
        dtype = schema[col]
        if not (dtype.is_integer() or dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)):
            raise errors.UnsupportedTypeError(cfg.path, col, str(dtype), "ids must be integers or strings")
    if cfg.weight_col and not schema[cfg.weight_col].is_numeric():
        raise errors.UnsupportedTypeError(cfg.path, cfg.weight_col, str(schema[cfg.weight_col]),
                                          "weights must be numeric")
    if cfg.timestamp_col:
        dtype = schema[cfg.timestamp_col]
        if not (dtype.is_temporal() and dtype != pl.Duration and dtype != pl.Time) and not dtype.is_integer():
            raise errors.UnsupportedTypeError(cfg.path, cfg.timestamp_col, str(dtype),
                                              "timestamps must be datetimes, dates or integer epochs")


def _canonical_columns(cfg: InputConfig, schema: pl.Schema, unit: str | None = None) -> list[pl.Expr]:
    def ids(col: str, name: str) -> pl.Expr:
        expr = pl.col(col)
        # uint64 stays uint64 (hashed ids >= 2**63); other integers become Int64; text, String
        typ = pl.UInt64 if schema[col] == pl.UInt64 else pl.Int64 if schema[col].is_integer() else pl.String
        return expr.cast(typ).alias(name)

    weight = pl.col(cfg.weight_col).cast(pl.Float64) if cfg.weight_col else pl.lit(1.0, pl.Float64)
    return [ids(cfg.user_col, USER), ids(cfg.item_col, ITEM), weight.alias(WEIGHT),
            _timestamp(cfg, schema, unit).alias(TIMESTAMP)]


def _timestamp(cfg: InputConfig, schema: pl.Schema, unit: str | None = None) -> pl.Expr:
    utc = pl.Datetime("us", "UTC")
    if not cfg.timestamp_col:
        return pl.lit(None, utc)
    col, dtype = pl.col(cfg.timestamp_col), schema[cfg.timestamp_col]
    if dtype.is_integer():
        # the unit was chosen and every value checked inside the window first: nothing wraps
        return pl.from_epoch(col, time_unit=unit or "s").dt.replace_time_zone("UTC").cast(utc)
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if getattr(dtype, "time_zone", None):
        return col.dt.convert_time_zone("UTC").cast(utc)
    return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")  # naive: taken as UTC


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _window(cfg: InputConfig) -> tuple[datetime, datetime]:
    return timestamp_bound(cfg.timestamp_min), timestamp_bound(cfg.timestamp_max)


def _epoch_bounds(cfg: InputConfig, unit: str) -> tuple[int, int]:
    """[low, high) of the plausible window as integer epochs in ``unit``."""
    def count(moment: datetime) -> int:
        micros = (moment - _EPOCH) // timedelta(microseconds=1)
        return micros * 1000 if unit == "ns" else -(-micros // (1_000_000 // _PER_SECOND[unit]))
    low, high = _window(cfg)
    return count(low), count(high)


def _timestamp_reading(cfg: InputConfig, lazy: pl.LazyFrame, schema: pl.Schema,
                       files: list[Path]) -> dict[str, object] | None:
    """How the timestamp column is read: for integer epochs the unit (named, or inferred from
    the column's range: the one unit in which every value lies in the plausible window).
    Raises :class:`TimestampUnitError` or :class:`ImplausibleTimestampsError`."""
    if not cfg.timestamp_col:
        return None
    dtype = schema[cfg.timestamp_col]
    low, high = _window(cfg)
    reading: dict[str, object] = {"column": cfg.timestamp_col, "type": str(dtype), "unit": None, "inferred": False,
                                  "window": [low.isoformat(), high.isoformat()]}
    if not dtype.is_integer():
        return reading
    col = pl.col(cfg.timestamp_col)
    lo, hi = _blaming_files(lazy.select(col.min().alias("lo"), col.max().alias("hi")).collect, files).row(0)
    if lo is None:  # all null: nothing to read
        return {**reading, "unit": cfg.timestamp_unit if cfg.timestamp_unit != "auto" else "s"}
    if cfg.timestamp_unit == "auto":
        fits = [u for u in _PER_SECOND if _epoch_bounds(cfg, u)[0] <= lo and hi < _epoch_bounds(cfg, u)[1]]
        if len(fits) != 1:
            raise errors.TimestampUnitError(cfg.timestamp_col, cfg.path, lo, hi, fits,
                                            f"[{cfg.timestamp_min}, {cfg.timestamp_max})")
        return {**reading, "unit": fits[0], "inferred": True}
    unit = cfg.timestamp_unit
    first, stop = _epoch_bounds(cfg, unit)
    outside = (col < first) | (col >= stop)
    count = _blaming_files(lazy.select(outside.sum()).collect, files).item()
    if count:
        file, row, value = _first_raw_offender(files, cfg.timestamp_col, outside)
        raise errors.ImplausibleTimestampsError(cfg.timestamp_col, count, file, row, value, f"epoch {unit}",
                                                cfg.timestamp_min, cfg.timestamp_max)
    return {**reading, "unit": unit}


def _check_timestamp_window(rows: pl.DataFrame, cfg: InputConfig, files: list[Path], unit: str | None) -> None:
    """Every (non-null) event timestamp must lie in [timestamp_min, timestamp_max)."""
    low, high = _window(cfg)
    ts = pl.col(TIMESTAMP)
    count = rows.select(((ts < low) | (ts >= high)).sum()).item()
    if not count:
        return
    for f in files:
        frame = pl.scan_parquet(f, glob=False)
        schema = frame.collect_schema()
        if cfg.timestamp_col not in schema:
            continue
        hit = (frame.select(pl.col(cfg.timestamp_col).alias("raw"), _timestamp(cfg, schema, unit).alias(TIMESTAMP))
               .with_row_index("row").filter((ts < low) | (ts >= high)).head(1).collect())
        if hit.height:
            raise errors.ImplausibleTimestampsError(cfg.timestamp_col, count, str(f), int(hit["row"][0]),
                                                    str(hit["raw"][0]), str(schema[cfg.timestamp_col]),
                                                    cfg.timestamp_min, cfg.timestamp_max)
    raise errors.ImplausibleTimestampsError(cfg.timestamp_col, count, str(files[0]), -1, None, "",
                                            cfg.timestamp_min, cfg.timestamp_max)


def _first_raw_offender(files: list[Path], column: str, pred: pl.Expr) -> tuple[str, int, object]:
    for f in files:
        frame = pl.scan_parquet(f, glob=False)
        if column not in frame.collect_schema():
            continue
        hit = frame.select(pl.col(column)).with_row_index("row").filter(pred).head(1).collect()
        if hit.height:
            return str(f), int(hit["row"][0]), hit[column][0]
    return str(files[0]), -1, None


def _check_values(rows: pl.DataFrame, cfg: InputConfig, files: list[Path]) -> int:
    """Null ids, null/NaN/negative weights: count in memory, then locate the first offender."""
    w = pl.col(WEIGHT)
    counts = rows.select(
        pl.len().alias("rows"),
        pl.col(USER).null_count().alias(cfg.user_col),
        pl.col(ITEM).null_count().alias(cfg.item_col),
        w.null_count().alias("weight_null"),
        w.is_nan().sum().alias("weight_nan"),
        w.is_infinite().sum().alias("weight_infinite"),
        (w.is_finite() & (w.abs() > FLOAT32_MAX)).sum().alias("weight_float32"),
        (w < 0).sum().alias("weight_negative"),
    ).row(0, named=True)
    for col, name in ((cfg.user_col, USER), (cfg.item_col, ITEM)):
        if counts[col]:
            file, row, _ = _first_offender(files, cfg, name, pl.col(name).is_null())
            raise errors.NullValuesError(col, counts[col], file, row)
    if cfg.weight_col and counts["weight_null"]:
        file, row, _ = _first_offender(files, cfg, WEIGHT, w.is_null())
        raise errors.NullValuesError(cfg.weight_col, counts["weight_null"], file, row)
    checks = (("NaN", "weight_nan", w.is_nan()), ("infinite", "weight_infinite", w.is_infinite()),
              ("too large for float32 (beyond ±3.4e38)", "weight_float32", w.is_finite() & (w.abs() > FLOAT32_MAX)),
              ("negative", "weight_negative", w < 0))
    for what, key, pred in checks:
        if cfg.weight_col and counts[key]:
            file, row, value = _first_offender(files, cfg, WEIGHT, pred)
            raise errors.InvalidWeightsError(cfg.weight_col, what, counts[key], file, row, value)
    return counts["rows"]


def _blaming_files(run: Callable[[], _T], files: list[Path]) -> _T:
    """``run()`` (a Polars scan); when it fails on a file Polars cannot decode, name that file."""
    try:
        return run()
    except pl.exceptions.PolarsError:
        for f in files:  # the footers were fine (checked above): find the file whose data is not
            try:
                pl.scan_parquet(f, glob=False).collect()
            except pl.exceptions.PolarsError as exc:
                raise errors.NotParquetError(str(f), str(exc).splitlines()[0][:160]) from None
        raise


NULL_PARTITIONS = ("__HIVE_DEFAULT_PARTITION__", "")  # a hive folder `key=<this>/` holds a null key


def _first_offender(files: list[Path], cfg: InputConfig, name: str, pred: pl.Expr) -> tuple[str, int, object]:
    """(file, 0-based row in that file, value) of the first row matching ``pred``; for a null
    that a hive partition folder's key gives (`item_id=__HIVE_DEFAULT_PARTITION__/`), (that
    folder, -1, None)."""
    source = {USER: cfg.user_col, ITEM: cfg.item_col, WEIGHT: cfg.weight_col}[name]
    for f in files:
        frame = pl.scan_parquet(f, glob=False)
        if source not in frame.collect_schema():  # the column is a hive partition key here
            null_key = next((p for p in f.parents if p.name in {f"{source}={v}" for v in NULL_PARTITIONS}), None)
            if null_key is not None:
                return str(null_key), -1, None
            continue
        hit = (frame.select(pl.col(source).cast(pl.Float64 if name == WEIGHT else pl.String).alias(name))
               .with_row_index("row").filter(pred).head(1).collect())
        if hit.height:
            return str(f), int(hit["row"][0]), hit[name][0]
    return str(files[0]), -1, None
