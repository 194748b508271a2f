"""Item attributes (`[items]` in the job file): read with Polars, validated, aligned to item rows.

The attributes table of a version has one row per item, in item-row order (the row order of
`items.parquet`, which is the FAISS id), with ``item_id`` first and nulls for items the file
does not describe. Lookup filters (:mod:`aefeatures.serving.filters`) evaluate over it.
"""

from __future__ import annotations

import logging
from typing import Any

import polars as pl

from aefeatures import errors
from aefeatures.config import ATTRIBUTE_NAME, RESERVED_ATTRIBUTES, ItemsConfig, attribute_name_rule
from aefeatures.data.read import input_files
from aefeatures.schema import ITEM

log = logging.getLogger(__name__)

SUPPORTED = "string, integer, float, boolean, date, datetime or list of string"
_INTEGERS = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def read_attributes(cfg: ItemsConfig) -> pl.DataFrame:
    """Read and validate the attributes file(s) of ``cfg`` (before any training starts).

    Returns a frame with the id column renamed ``item_id`` and the chosen attribute columns, in
    their Polars types (categoricals become strings).

    Raises
    ------
    BadInputError
        The path matches nothing or is not Parquet; the id column or a named column is missing;
        a column's name or type is not usable; an id is null or appears twice.
    """
    path = str(cfg.path)
    try:
        files = input_files(path)
    except errors.InputNotFoundError as exc:
        raise errors.bad_attributes(path, str(exc).split("` ", 1)[-1].split(".")[0],
                                    "Check `items.path` in the job file.") from None
    try:
        frame = pl.read_parquet([f.path for f in files], glob=False)
    except Exception as exc:  # polars raises several types for unreadable files
        raise errors.bad_attributes(path, f"cannot be read as Parquet ({str(exc).splitlines()[0][:160]})",
                                    "Point `items.path` at Parquet files.") from None
    if cfg.id_col not in frame.columns:
        raise errors.bad_attributes(path, f"has no id column `{cfg.id_col}` (found {', '.join(frame.columns)})",
                                    "Set `items.id_col` to the column holding the item ids.")
    columns = list(cfg.columns) or [c for c in frame.columns if c != cfg.id_col]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise errors.bad_attributes(path, f"has no column {', '.join(f'`{c}`' for c in missing)} "
                                          f"(found {', '.join(frame.columns)})", "Fix `items.columns`.")
    if cfg.id_col in columns:
        raise errors.bad_attributes(path, f"lists its id column `{cfg.id_col}` as an attribute",
                                    "Leave it out of `items.columns`.")
    folded = [c.lower() for c in columns]
    clash = sorted({c for c in columns if folded.count(c.lower()) > 1})
    if clash:
        raise errors.bad_attributes(path, f"has columns whose names differ only in case ({', '.join(clash)})",
                                    "SQL names ignore case: rename or leave out all but one.")
    out = {ITEM: frame.get_column(cfg.id_col)}
    for name in columns:
        if not ATTRIBUTE_NAME.fullmatch(name) or name.lower() in RESERVED_ATTRIBUTES:
            raise errors.bad_attributes(path, f"has a column named `{name}`", attribute_name_rule() + ".")
        out[name] = _supported(path, frame.get_column(name))
    frame = pl.DataFrame(out)
    ids = frame.get_column(ITEM)
    if ids.dtype not in (*_INTEGERS, pl.String, pl.Categorical):
        raise errors.bad_attributes(path, f"has ids of type {ids.dtype} in `{cfg.id_col}`",
                                    "Item ids must be integers or strings, as in the interactions.")
    if ids.null_count():
        raise errors.bad_attributes(path, f"has {ids.null_count():,} null id(s) in `{cfg.id_col}`",
                                    "Drop those rows or give them ids.")
    duplicated = ids.is_duplicated()
    if duplicated.any():
        shown = ", ".join(map(str, ids.filter(duplicated).unique(maintain_order=True).head(5).to_list()))
        raise errors.bad_attributes(path, f"has {int(duplicated.sum()):,} rows with a repeated id in "
                                          f"`{cfg.id_col}` (e.g. {shown})",
                                    "Keep one row per item.")
    return frame


def _supported(path: str, column: pl.Series) -> pl.Series:
    dtype = column.dtype
    if dtype in (pl.Categorical, pl.Enum) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return column.cast(pl.String)
    if dtype in (*_INTEGERS, pl.Float32, pl.Float64, pl.Boolean, pl.String, pl.Date) or isinstance(dtype, pl.Datetime):
        if dtype in (pl.Float32, pl.Float64) and column.is_nan().any():
            raise errors.bad_attributes(path, f"has NaN in column `{column.name}`",
                                        "Use null for a missing value.")
        return column
    if isinstance(dtype, pl.List) and dtype.inner in (pl.String, pl.Categorical):
        return column.cast(pl.List(pl.String))
    raise errors.bad_attributes(path, f"column `{column.name}` has type {dtype}",
                                f"Attributes may be {SUPPORTED}; cast it or leave it out of `items.columns`.")


def align_attributes(frame: pl.DataFrame, item_ids: pl.Series, path: str = "") -> tuple[pl.DataFrame, dict[str, Any]]:
    """The attributes of every catalogue item, in item-row order, and what the alignment found.

    Parameters
    ----------
    frame
        From :func:`read_attributes`: ``item_id`` and the attribute columns.
    item_ids
        (n_items,) the version's sorted item ids (int64 or string).

    Returns
    -------
    (table, summary)
        ``table`` has ``n_items`` rows, ``item_id`` first, nulls where the file has no row for
        an item. ``summary`` (for the manifest): ``columns`` (name → type), ``rows`` read,
        ``matched``, ``unknown_ids`` (rows whose id the catalogue lacks: counted, reported,
        dropped), a few ``unknown_examples`` and ``items_without`` attributes.
    """
    ids = frame.get_column(ITEM)
    target = item_ids.dtype
    if ids.dtype != target:
        try:
            ids = ids.cast(target, strict=True)
        except Exception:
            raise errors.bad_attributes(path, f"has {ids.dtype} ids but the interactions have {target} ids",
                                        "Use the same item ids in both.") from None
        frame = frame.with_columns(ids)
    catalogue = pl.DataFrame({ITEM: item_ids}).with_row_index("_row")
    known = frame.get_column(ITEM).is_in(item_ids.implode()) if len(item_ids) else pl.Series([False] * frame.height)
    unknown = frame.filter(~known).get_column(ITEM)
    table = catalogue.join(frame, on=ITEM, how="left").sort("_row").drop("_row")
    summary = {
        "columns": {c: str(frame.schema[c]) for c in frame.columns if c != ITEM},
        "rows": frame.height,
        "matched": int(known.sum()),
        "unknown_ids": len(unknown),
        "unknown_examples": unknown.head(5).to_list(),
        "items_without": len(item_ids) - int(known.sum()),
    }
    if len(unknown):
        log.warning("item attributes: %d row(s) name items the interactions do not have (e.g. %s); they are "
                    "left out", len(unknown), ", ".join(map(str, summary["unknown_examples"])))
    return table, summary
