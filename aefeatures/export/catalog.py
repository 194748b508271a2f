"""Render the DuckDB views in `sql/` for a store, and keep `STORE/catalog.sql` current.

`duckdb -init STORE/catalog.sql` (or ``con.execute(open(...).read())``) defines, for every
feature set, views over its live version (`<name>_users`, `<name>_items`,
`<name>_interactions`, `<name>_item_neighbours`: the item-item part, without rows for a version
that has none), over every published version (`<name>_versions`, `<name>_drift`, `<name>_users_all`,
`<name>_items_all`) and macros (`<name>_recommend`, `<name>_similar_items`,
`<name>_similar_users`, `<name>_user_embedding_asof`, `<name>_item_embedding_asof`, and the filtered
`<name>_recommend_where`, `<name>_similar_items_where`). `<name>_items` carries the item attributes,
if the job has any. Paths are absolute, so the script works from any working directory; it needs no
DuckDB extension. Nothing read from the store reaches the SQL as code: names are checked
identifiers and quoted, manifest values typed, paths glob-escaped literals; what does not pass
is left out with one warning. :func:`connect` with ``safe`` is the sandbox of `aefeatures sql --safe`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aefeatures import errors
from aefeatures.schema import parse_id
from aefeatures.store import layout, publish

log = logging.getLogger(__name__)

CATALOG = "catalog.sql"


def _template() -> Template:
    # The repository's top-level sql/ folder: installed as the data package `aefeatures.sql` by a
    # wheel; an editable install does not map it, so a source tree reads it in place.
    try:
        source = resources.files("aefeatures.sql").joinpath("views.sql")
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parents[2] / "sql" / "views.sql"
    return Template(source.read_text(encoding="utf-8"))


class _LeftOut(Exception):
    """Why a version (or a feature set's live version) cannot be shown in SQL: one phrase."""


@dataclass(frozen=True)
class _Version:
    """What the views splice from one version, each fact typed: nothing read from the store
    reaches SQL as text except through :func:`_literal` / :func:`_path_literal`."""

    id: str
    path: Path  # the version's folder, resolved
    manifest: dict
    dim: int
    valid_from: str  # ISO 8601 with an offset, re-rendered from the parsed time
    schema: int
    users: int
    items: int
    items_columns: tuple[str, ...]  # items.parquet's columns, from its footer


def _whole(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _LeftOut(f"its manifest's `{key}` is {value!r}, not a whole number of {low} or more")
    return value


def _time(value: Any, key: str) -> str:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise _LeftOut(f"its manifest's `{key}` is {value!r}, not an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def _table_columns(folder: Path, table: str) -> tuple[str, ...]:
    """The columns of ``folder/table``, read from its Parquet footer only: the cheap proof that
    the file is there and is Parquet. Raises :class:`_LeftOut`."""
    path = folder / table
    if not path.is_file():
        raise _LeftOut(f"its {table} is missing")
    try:
        return tuple(pq.read_schema(path).names)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _LeftOut(f"its {table} does not read as Parquet ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_version(root: Path, name: str, version: str, tables: tuple[str, ...]) -> _Version:
    """The typed facts of published ``version`` of ``name`` whose ``tables`` all read.
    Raises :class:`_LeftOut` (its folder name, manifest or a table is not what aefeatures writes)."""
    if not layout.VERSION_PATTERN.fullmatch(version):
        raise _LeftOut("its folder name is no version id")
    folder = (root / name / layout.VERSIONS / version).resolve()
    try:
        manifest = layout.read_manifest(folder)
    except (errors.BadInputError, OSError, ValueError) as exc:
        raise _LeftOut(_first_line(exc).split(". ")[0]) from None
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        raise _LeftOut("its manifest has no `counts` object")
    for kind in ("user", "item"):
        _id_type(manifest, kind)
    columns = {table: _table_columns(folder, table) for table in tables}
    return _Version(
        id=version, path=folder, manifest=manifest, dim=_whole(manifest["dim"], "dim", 1),
        valid_from=_time(manifest.get("valid_from") or manifest.get("created_at"), "valid_from"),
        schema=_whole(manifest.get("schema_version", 1), "schema_version", 1),
        users=_whole(counts.get("users"), "counts.users", 0), items=_whole(counts.get("items"), "counts.items", 0),
        items_columns=columns.get(layout.ITEMS, ()),
    )


def _readable_versions(root: Path, name: str, versions: list[str], live: str) -> dict[str, _Version]:
    """The versions of ``versions`` other than ``live`` that read, manifest and tables; a damaged
    one is left out of the all-versions views with a warning, so one broken old version never
    takes SQL on the store down."""
    out = {}
    for version in versions:
        if version == live:
            continue
        try:
            out[version] = _read_version(root, name, version, (layout.USERS, layout.ITEMS))
        except _LeftOut as exc:
            log.warning("SQL catalog: version %r of %s is left out of the all-versions views: %s; restore it or "
                        "delete its folder", version, name, exc)
    return out


def _literal(text: object) -> str:
    """``text`` as a SQL string literal (quotes doubled; DuckDB's plain literals have no escapes)."""
    return "'" + str(text).replace("'", "''") + "'"


_GLOB = re.compile(r"([*?\[])")


def _path_literal(path: Path) -> str:
    """``path`` as the literal of a file that DuckDB's readers take literally: they expand
    ``*``, ``?`` and ``[...]`` as a glob, so each is written as a one-character class. (A glob
    also reads ``\\`` as a separator: :func:`render_views` refuses a path with both.)"""
    return _literal(_GLOB.sub(r"[\1]", str(path)))


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def render_views(root: Path, name: str) -> str:
    """The views and macros of feature set ``name`` (live version and all published ones).

    ``name`` must be a feature-set name (:data:`aefeatures.config.NAME_PATTERN`). Old versions
    that do not read are left out of the all-versions views with a warning. Raises
    :class:`aefeatures.errors.StoreError` when the live version cannot be read (LATEST names no
    version id, its manifest or one of its tables does not read), and ``ValueError`` for a
    ``name`` that is not a feature-set name.
    """
    from aefeatures.config import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is no feature-set name")
    live = layout.live_version(root, name)
    where = str((root / name).resolve())
    if "\\" in where and _GLOB.search(where):
        raise errors.StoreError(f"feature set `{name}` has no SQL views: its path holds both `\\` and one of `*?[`, "
                                "which DuckDB cannot read as it is written. Move the store to a path without them.")
    try:
        current = _read_version(root, name, live, (layout.USERS, layout.ITEMS, layout.INTERACTIONS))
        neighbours = _neighbour_parts(name, current)
    except _LeftOut as exc:
        raise errors.StoreError(f"feature set `{name}` has no SQL views: its live version {live!r} cannot be "
                                f"read ({exc}). Publish a new version (run its job again).") from None
    versions = _readable_versions(root, name, layout.listed_versions(root, name), live)
    versions[live] = current
    ordered = sorted(versions)
    dims = {v.dim for v in versions.values()}
    live_v1 = current.schema == 1  # schema 1: event_timestamp held the latest interaction
    folder = current.path
    return _template().substitute(
        live_last="event_timestamp" if live_v1 else "last_interaction",
        live_event=f"{_literal(current.valid_from)}::TIMESTAMPTZ" if live_v1 else "event_timestamp",
        all_last="last_interaction" if max(v.schema for v in versions.values()) > 1 else "NULL::TIMESTAMPTZ",
        # items.parquet gained `folded_in` within schema 2: older files read it as null
        live_folded="i.folded_in" if "folded_in" in current.items_columns else "NULL::INTEGER",
        all_folded="folded_in" if any("folded_in" in v.items_columns for v in versions.values()) else "NULL::INTEGER",
        name=name,  # an identifier (checked above), and quoted where views are named
        dim=current.dim,
        live=_literal(live),
        users=_path_literal(folder / layout.USERS),
        items=_path_literal(folder / layout.ITEMS),
        interactions=_path_literal(folder / layout.INTERACTIONS),
        **_attribute_parts(name, current),
        **neighbours,
        version_rows=", ".join(_version_row(versions[v]) for v in ordered),
        drift_rows=", ".join([_NO_DRIFT] + [_drift_row(versions[v]) for v in ordered]),
        users_all=_list(versions[v].path / layout.USERS for v in ordered),
        items_all=_list(versions[v].path / layout.ITEMS for v in ordered),
        all_type=f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]",  # dims changed: lists
        user_type=_id_type(current.manifest, "user"),
        item_type=_id_type(current.manifest, "item"),
    )


def _attribute_parts(name: str, version: _Version) -> dict[str, str]:
    """The `<name>_items` view's attribute columns and join, empty for a version without them.
    A column is spliced only if it is a plain attribute name (the job's rule) that
    attributes.parquet has; any other is left out with a warning."""
    from aefeatures.config import ATTRIBUTE_NAME, RESERVED_ATTRIBUTES

    listed = (version.manifest.get("attributes") or {}).get("columns") or {}
    if not listed or not (version.path / layout.ATTRIBUTES).is_file():
        return {"attribute_columns": "", "attribute_join": ""}
    try:
        present = set(_table_columns(version.path, layout.ATTRIBUTES))
    except _LeftOut as exc:
        log.warning("SQL catalog: %s_items has no attribute columns (version %s): %s", name, version.id, exc)
        return {"attribute_columns": "", "attribute_join": ""}
    columns = []
    for column in listed if isinstance(listed, (dict, list)) else ():
        if (isinstance(column, str) and ATTRIBUTE_NAME.fullmatch(column) and column.lower() not in RESERVED_ATTRIBUTES
                and column in present):
            columns.append(column)
        else:
            log.warning("SQL catalog: attribute column %r of %s (version %s) is left out of %s_items: it is no plain "
                        "attribute name that attributes.parquet has", column, name, version.id, name)
    if not columns:
        return {"attribute_columns": "", "attribute_join": ""}
    return {  # quoted, a keyword works too
        "attribute_columns": "".join(f", a.{_identifier(c)}" for c in columns),
        "attribute_join": f" LEFT JOIN read_parquet({_path_literal(version.path / layout.ATTRIBUTES)}) a "
                          "ON a.item_id = i.item_id",
    }


_DENSE_SCORE = "array_inner_product(u.embedding, i.embedding) + i.bias"
_NEIGHBOUR_COLUMNS = ("item_id", "neighbour_id", "weight")


def _neighbour_parts(name: str, version: _Version) -> dict[str, str]:
    """The `<name>_item_neighbours` view's query and the recommend macros' score.

    Without an item-item part (no `item_neighbours` in the manifest) the view has no rows (the
    same columns and types) and the macros score exactly as before it existed. With one, the
    macros add ``coalesce(sum(x * weight), 0)`` over the user's interactions joined to it, in
    DOUBLE, and give the score as FLOAT (float32), as the lookups do. Raises :class:`_LeftOut`
    when the manifest promises a file that does not read or lacks a column."""
    item_type, user_type = _id_type(version.manifest, "item"), _id_type(version.manifest, "user")
    if version.manifest.get("item_neighbours") is None:
        return {
            "item_neighbours": f"SELECT NULL::{item_type} AS item_id, NULL::{item_type} AS neighbour_id, "
                               "NULL::FLOAT AS weight WHERE false",
            "score": _DENSE_SCORE,
        }
    missing = [c for c in _NEIGHBOUR_COLUMNS if c not in _table_columns(version.path, layout.NEIGHBOURS)]
    if missing:
        raise _LeftOut(f"its {layout.NEIGHBOURS} lacks {', '.join(missing)}")
    # A scalar subquery, not a join: it adds no column that a `_recommend_where` filter could
    # name (`item_id` would become ambiguous). `user` is the macro's argument.
    residual = (f"(SELECT sum(s.weight::DOUBLE * n.weight) FROM {_identifier(name + '_interactions')} s "
                f"JOIN {_identifier(name + '_item_neighbours')} n ON n.neighbour_id = s.item_id "
                f"WHERE s.user_id = user::{user_type} AND n.item_id = i.item_id)")
    return {
        "item_neighbours": f"SELECT item_id::{item_type} AS item_id, neighbour_id::{item_type} AS neighbour_id, "
                           f"weight::FLOAT AS weight FROM read_parquet({_path_literal(version.path / layout.NEIGHBOURS)})",
        "score": f"({_DENSE_SCORE}\n       + coalesce({residual}, 0))::FLOAT",
    }


_SQL_ID_TYPES = {"Int64": "BIGINT", "UInt64": "UBIGINT", "String": "VARCHAR"}
_NUMPY_ID_TYPES = {"BIGINT": "int64", "UBIGINT": "uint64", "VARCHAR": "<U1"}


def sql_id_type(manifest: dict, kind: str) -> str:
    """The DuckDB type of a version's ``kind`` ("user" or "item") ids: BIGINT, UBIGINT or VARCHAR
    (BIGINT where the manifest records none, as the first versions did not).
    Macros cast their id argument to it, so 38 never matches the string id "0038"."""
    id_types = manifest.get("id_types")
    found = id_types.get(kind, "Int64") if isinstance(id_types, dict) else "Int64"
    return _SQL_ID_TYPES.get(found, "BIGINT") if isinstance(found, str) else "BIGINT"


def _id_type(manifest: dict, kind: str) -> str:
    """:func:`sql_id_type`, but an id type aefeatures never writes raises :class:`_LeftOut`."""
    id_types = manifest.get("id_types") or {}
    found = id_types.get(kind, "Int64") if isinstance(id_types, dict) else None
    if found not in _SQL_ID_TYPES:
        raise _LeftOut(f"its manifest's `id_types.{kind}` is {found!r}, not one of {', '.join(_SQL_ID_TYPES)}")
    return _SQL_ID_TYPES[found]


def id_param_types(root: Path) -> dict[str, str]:
    """SQL parameter name → numpy dtype of the ids it names (`user`, `user_id` → the user id
    type; `item`, `item_id` → the item id type), over the feature sets the catalogue shows
    (a feature set it leaves out does not count). Where they disagree the
    value is bound as text: DuckDB casts text to an integer column's type when comparing, and
    a string column compares it exactly, so it is right for both (a number would make DuckDB
    cast a string column to integers, and "0038" would equal 38)."""
    found: dict[str, set[str]] = {"user": set(), "item": set()}
    for name in _sql_names(root, warn=False):
        try:
            manifest = layout.read_manifest(layout.version_dir(root, name, layout.live_version(root, name)))
            types = {kind: _id_type(manifest, kind) for kind in found}
        except (errors.BadInputError, OSError, ValueError, _LeftOut):
            continue  # left out of the catalogue too, which says why
        for kind, sql_type in types.items():
            found[kind].add(sql_type)
    out = {}
    for kind, types in found.items():
        if types:
            out[kind] = out[f"{kind}_id"] = _NUMPY_ID_TYPES[types.pop() if len(types) == 1 else "VARCHAR"]
    return out


def _number(value: Any) -> str:
    """A manifest's metric as a SQL DOUBLE: NULL unless it is a finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "NULL::DOUBLE"
    return f"{float(value)!r}::DOUBLE"


def _section(manifest: dict, *keys: str) -> dict:
    """``manifest[keys[0]][keys[1]]...``, {} where a level is missing or no object."""
    for key in keys:
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest if isinstance(manifest, dict) else {}


def _version_row(v: _Version) -> str:
    ndcg = _section(v.manifest, "evaluation", "model").get("ndcg@100")
    return (f"({_literal(v.id)}, {_literal(v.valid_from)}::TIMESTAMPTZ, {v.users}, {v.items}, {v.dim}, "
            f"{_number(ndcg)}, {v.schema})")


# A typed row of NULLs, so the view has its column types with no measured version yet.
_NO_DRIFT = "(NULL::VARCHAR, NULL::VARCHAR, NULL::BOOLEAN" + ", NULL::DOUBLE" * 12 + ")"


def _drift_row(v: _Version) -> str:
    a, d = _section(v.manifest, "alignment"), _section(v.manifest, "drift")
    uc, ic = _section(d, "user_cosine"), _section(d, "item_cosine")
    values = [a.get("residual"), *(uc.get(q) for q in ("q05", "q25", "q50", "q75", "q95")),
              *(ic.get(q) for q in ("q05", "q50", "q95")), _section(d, "churn").get("mean"),
              _section(d, "churn").get("all_changed"), _section(d, "anomaly_rank").get("spearman")]
    against = d.get("against") or a.get("to_version")
    aligned = "NULL" if not a else ("true" if a.get("aligned") is True else "false")
    return (f"({_literal(v.id)}, {_literal(against) if isinstance(against, str) else 'NULL'}, {aligned}, "
            + ", ".join(_number(value) for value in values) + ")")


def _list(paths) -> str:
    return "[" + ", ".join(_path_literal(p) for p in paths) + "]"


def _sql_names(root: Path, *, warn: bool = True) -> list[str]:
    """The feature sets of ``root`` whose names can name SQL views: a folder whose name is no
    feature-set name (the job file's rule), or differs only in case from another's, is left out
    (and said, with ``warn``). SQL ignores case, so of `example` and `EXAMPLE` neither is shown:
    keeping one would answer queries about the other with its data."""
    from aefeatures.config import NAME_PATTERN

    found = layout.feature_sets(root)
    cases: dict[str, int] = {}
    for name in found:
        cases[name.lower()] = cases.get(name.lower(), 0) + 1
    names = []
    for name in found:
        if not NAME_PATTERN.fullmatch(name) or cases[name.lower()] > 1:
            if warn:
                log.warning("SQL catalog: feature set folder %r is left out: its name is no SQL identifier, or "
                            "differs only in case from another's; rename it to letters, digits and _", name)
            continue
        names.append(name)
    return names


def _rendered(root: Path) -> list[tuple[str, str]]:
    """(name, views) of every feature set that can be shown; one whose live version does not
    read is left out with a warning, so it never takes the others down."""
    parts = []
    for name in _sql_names(root):
        try:
            parts.append((name, render_views(root, name)))
        except (errors.BadInputError, OSError) as exc:
            log.warning("SQL catalog: %s", _first_line(exc))
    return parts


def render_catalog(root: Path) -> str:
    """The views of every feature set in ``root`` that can be shown (see :func:`connect`)."""
    return "\n".join(text for _, text in _rendered(root))


def write_catalog(root: Path) -> Path:
    """Rewrite `STORE/catalog.sql` atomically for the live versions."""
    path = root / CATALOG
    publish.atomic_write(path, render_catalog(root))
    return path


def connect(root: Path, *, safe: bool = False):
    """An in-memory DuckDB connection with the store's views and macros defined.

    A feature set whose name is no identifier, or whose live version does not read, is left out,
    as is an old version that does not read from the all-versions views: each with one warning.

    ``safe``: the connection reads only the published versions of the feature sets it shows
    (their `versions/` folders): no other file, no network, no ATTACH, no extension install or
    load, and its settings are locked. Statements that write (COPY, EXPORT) are refused by
    :func:`check_safe`, which callers run on every text before executing it in safe mode.
    """
    import duckdb

    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
              "allow_community_extensions": False} if safe else {}
    con = duckdb.connect(config=config)
    shown = []
    for name, text in _rendered(root):
        con.begin()
        try:
            con.execute(text)
        except duckdb.Error as exc:
            con.rollback()
            log.warning("SQL catalog: feature set %s is left out: its views do not build (%s)", name, _first_line(exc))
            continue
        con.commit()
        shown.append(name)
    if safe:
        readable = set()
        for name in shown:
            folder = str((root / name / layout.VERSIONS).resolve()) + "/"
            # the views name their files glob-escaped (see _path_literal), and DuckDB checks that text
            readable |= {folder, _GLOB.sub(r"[\1]", folder)}
        # no spill folder: DuckDB would let SQL read the default one (./.tmp) as well
        con.execute("SET temp_directory = ''")
        con.execute(f"SET allowed_directories = [{', '.join(_literal(d) for d in sorted(readable))}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


# Statements --safe runs: queries (SELECT, WITH, VALUES, FROM-first, TABLE, DESCRIBE, SHOW, SUMMARIZE)
_SAFE_STATEMENTS = ("SELECT",)


def check_safe(con, text: str) -> None:
    """Refuse ``text`` unless every statement in it is a query (DuckDB's own parser decides).

    Raises :class:`aefeatures.errors.BadInputError` naming the first other statement (COPY,
    EXPORT, ATTACH, SET, INSTALL/LOAD, CREATE, PRAGMA, CALL, EXPLAIN, ...), and ``duckdb.Error``
    for text that does not parse."""
    for number, statement in enumerate(con.extract_statements(text), 1):
        kind = statement.type.name
        if kind not in _SAFE_STATEMENTS:
            raise errors.BadInputError(
                f"--safe runs queries only (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE): statement {number} is "
                f"{kind}. Run it without --safe, as a trusted user, if it is meant to")


def parse_param(text: str, id_types: dict[str, str] | None = None) -> tuple[str, object]:
    """``NAME=VALUE`` from the command line → (name, int | float | str). The value only ever
    reaches SQL as a bound parameter (``$NAME``), never as SQL text.

    A parameter naming ids (`user`, `user_id`, `item`, `item_id`, see :func:`id_param_types`)
    is typed by the id column's type with the one id rule
    (:func:`aefeatures.schema.parse_id`): "0038" stays the string "0038" for string ids
    and "00042" is 42 for integer ids. Other values are an integer when written as one
    canonically ("38", not "0038"), else a float, else a string. Raises ``ValueError`` (a
    malformed parameter) or :class:`InvalidIdError`.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"`--param {text}` must look like NAME=VALUE, with NAME a plain identifier")
    if id_types and name in id_types:
        return name, parse_id(value, id_types[name], name.removesuffix("_id"))
    try:
        number = int(value)
        # "0038" or "+38" is text, not 38 (nor 38.0): it may be a string id or a code
        return name, number if str(number) == value else value
    except ValueError:
        pass
    try:
        return name, float(value)
    except ValueError:
        return name, value
