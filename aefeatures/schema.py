"""Data contracts, written down once: the interaction frame inside the pipeline and the tables
a published version holds (see README "Store layout").
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from aefeatures import errors

KS = (10, 20, 100)  # cut-offs of the ranking metrics (Recall@k, NDCG@k, coverage@k)
KEY_METRIC = "ndcg@100"  # the metric that chooses epochs, gates versions and compares them

# 2: `event_timestamp` is when the version's values became valid (the moment its tables were
#    written, after training), not the entity's latest interaction, which moved to its own column
#    `last_interaction`. Readers accept every version up to SCHEMA_VERSION (see `Manifest.from_json`).
SCHEMA_VERSION = 2


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
            raw: Any = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise errors.bad_manifest(where, f"it is not JSON ({exc})") from None
        except ValueError as exc:  # NaN or Infinity: aefeatures never writes a non-finite number
            raise errors.bad_manifest(where, str(exc)) from None
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
        problem = _wrong_fact(raw, Path(where))
        if problem:
            raise errors.bad_manifest(where, problem)
        return cls(raw)


MAX_DIM = 65_536  # the widest embedding a manifest may claim
_VERSION_ID = re.compile(r"\d{8}T\d{6}\.\d{6}Z")  # store.layout.VERSION_FORMAT
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # store.layout.VERSION_PATTERN: one path component


def _no_constant(name: str) -> None:
    raise ValueError(f"it holds `{name}`, a number aefeatures never writes")


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)


def _wrong_fact(raw: dict[str, Any], where: Path) -> str | None:
    """The first fact of a manifest that readers rely on and that is not what aefeatures writes
    (a hand edit or damage), as a phrase; None when all hold. Keys a reader does not need may be
    absent (older versions lack some)."""
    version = raw["version"]
    if not isinstance(version, str) or not _PLAIN_NAME.fullmatch(version):
        return f"`version` is {version!r}, not a version id like 20261207T120000.000000Z"
    if _VERSION_ID.fullmatch(where.parent.name) and where.parent.name != version:
        return f"`version` is {version!r} but the manifest is in version {where.parent.name}'s folder"
    if not _is_int(raw["dim"], 1, MAX_DIM):
        return f"`dim` is {raw['dim']!r}, not a whole number from 1 to {MAX_DIM}"
    for key in ("feature_set", "created_at", "valid_from"):
        if key in raw and not isinstance(raw[key], str):
            return f"`{key}` is {raw[key]!r}, not text"
    for key in ("created_at", "valid_from"):
        if isinstance(raw.get(key), str):
            try:
                datetime.fromisoformat(raw[key])
            except ValueError:
                return f"`{key}` is {raw[key]!r}, not an ISO 8601 time"
    for key in ("config", "counts", "training", "evaluation", "gate", "index", "id_types", "input"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            return f"`{key}` is {type(raw[key]).__name__}, not an object"
    for key, count in (raw.get("counts") or {}).items():
        if not _is_int(count, 0):
            return f"`counts.{key}` is {count!r}, not a whole number of 0 or more"
    for kind, type_name in (raw.get("id_types") or {}).items():
        if type_name not in ("Int64", "UInt64", "String"):
            return f"`id_types.{kind}` is {type_name!r}, not Int64, UInt64 or String"
    return None

# Canonical column names of the interaction frame after reading (whatever the input calls them).
USER, ITEM, WEIGHT, TIMESTAMP = "user_id", "item_id", "weight", "timestamp"

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


def closed_form(training: dict[str, Any]) -> bool:
    """Whether a manifest's ``training`` section is a dlae's closed-form fits (one ``history``
    record per fit, each with its dropout p) rather than epochs of a trained kind."""
    history = training.get("history") or []
    return training.get("stop_reason") == "fitted" or bool(history) and "dropout" in history[0]


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
            # users the vector rests on for an item folded in after training (`aefeatures embed`,
            # aefeatures.model.fold_in); null for a trained item
            pa.field("folded_in", pa.int32(), nullable=True),
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


def neighbours_schema(item_type: pa.DataType) -> pa.Schema:
    """`item_neighbours.parquet`: a dlae's sparse item–item part, present in a version whose
    manifest has an `item_neighbours` section. Rows are sorted by (`neighbour_row`, `item_row`).

    A user's model score for item j is then ``user.embedding · item.embedding + item.bias`` plus,
    over the rows with `item_id` j whose `neighbour_id` the user has, ``x · weight``, x the
    interaction's `weight` in `interactions.parquet` (the value the model reads: 1 when the job
    binarizes). `item_row` / `neighbour_row` are row numbers in items.parquet. No item is its own
    neighbour; every weight is finite.
    """
    return pa.schema(
        [
            pa.field(ITEM, item_type, nullable=False),
            pa.field("neighbour_id", item_type, nullable=False),
            pa.field("item_row", pa.int32(), nullable=False),
            pa.field("neighbour_row", pa.int32(), nullable=False),
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


def strict_json(value: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON (RFC 8259: no NaN, Infinity or -Infinity).

    JSON has no number for NaN or ±inf, so such a float (Python or NumPy) is written as
    ``null``: the one rule of every JSON answer of the CLI and the HTTP service. Published
    versions never hold one (a run refuses to publish them); only results of user SQL or versions
    written by older releases can.
    """
    try:
        return json.dumps(value, default=default, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite_or_null(value, default), allow_nan=False, **kwargs)


def _finite_or_null(value: Any, default: Callable[[Any], Any] | None) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, default) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if default is not None:
        return _finite_or_null(default(value), default)
    return value


# --- ids: one rule for every entry point ---------------------------------------------------

_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
MAX_ID_CHARS = 4096  # the longest id any entry point accepts (an integer id's text included)


def parse_id(value: Any, id_dtype: np.dtype, kind: str = "id") -> Any:
    """A raw id (from Python, a CLI option or file, a URL or JSON) as the feature set types it:
    the one rule every entry point follows.

    - Integer ids (int64, or uint64 for hashed ids up to 2**64 - 1): an integer, or a string of
      one written in decimal (surrounding whitespace allowed: "42", " +42 ", "0042" → 42).
      Booleans, floats and anything else are refused; so is a value outside the id type's range.
    - String ids: a string, as it is ("0038" and "38" are different ids). A number is refused,
      so that 38 can never stand for "0038".
    - Nothing longer than :data:`MAX_ID_CHARS` characters is an id.

    Raises :class:`InvalidIdError` (exit code 2, HTTP 422) naming the value, the id type and the fix.
    """
    dtype = np.dtype(id_dtype)
    if dtype.kind in "iu":
        number: int | None = None
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            number = int(value)
        elif isinstance(value, str) and len(value) <= MAX_ID_CHARS and _WHOLE_NUMBER.fullmatch(value.strip()):
            number = int(value.strip())
        info = np.iinfo(dtype)
        if number is None or not info.min <= number <= info.max:
            raise errors.InvalidIdError(kind, value, f"integers ({dtype.name}, {info.min} to {info.max})")
        return number
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return str(value)
    raise errors.InvalidIdError(kind, value, f"strings of at most {MAX_ID_CHARS:,} characters")


def parse_ids(values: Sequence[Any], id_dtype: np.dtype, kind: str = "id") -> list[Any]:
    """:func:`parse_id` of each of ``values``, in order (a list of plain ints in range is
    checked at once: a 50-item history is parsed in microseconds, not a quarter millisecond)."""
    dtype = np.dtype(id_dtype)
    if dtype.kind in "iu" and all(type(v) is int for v in values):
        info = np.iinfo(dtype)
        if all(info.min <= v <= info.max for v in values):
            return list(values)
    return [parse_id(v, dtype, kind) for v in values]


def distinct(ids: Sequence[Any]) -> list[Any]:
    """Parsed ids without repeats, in first-seen order (a batch answers each id once)."""
    return list(dict.fromkeys(ids))

