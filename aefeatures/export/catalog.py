"""Render the DuckDB views in `sql/` for a store, and keep `STORE/catalog.sql` current.

`duckdb -init STORE/catalog.sql` (or ``con.execute(open(...).read())``) defines, for every
feature set, views over its live version (`<name>_users`, `<name>_items`,
`<name>_interactions`), over every published version (`<name>_versions`, `<name>_drift`, `<name>_users_all`,
`<name>_items_all`) and macros (`<name>_recommend`, `<name>_similar_items`,
`<name>_similar_users`, `<name>_user_embedding_asof`, `<name>_item_embedding_asof`, and the filtered
`<name>_recommend_where`, `<name>_similar_items_where`). `<name>_items` carries the item attributes,
if the job has any. Paths are absolute, so the script works from any working directory; it needs no
DuckDB extension.
"""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

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


def _readable_manifests(root: Path, name: str, versions: list[str]) -> dict[str, Any]:
    """The manifests of ``versions`` that read; a damaged one is left out of the all-versions
    views with a warning, so one broken old version never takes SQL on the store down."""
    out = {}
    for version in versions:
        try:
            out[version] = layout.read_manifest(root / name / layout.VERSIONS / version)
        except (errors.DamagedManifestError, OSError) as exc:
            log.warning("SQL catalog: version %s of %s is left out of the all-versions views: %s", version, name,
                        str(exc).split(". ")[0])
    return out


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def render_views(root: Path, name: str) -> str:
    """The views and macros of feature set ``name`` (live version and all published ones)."""
    live = layout.live_version(root, name)
    folder = layout.version_dir(root, name, live).resolve()
    manifests = _readable_manifests(root, name, layout.listed_versions(root, name))
    manifests[live] = layout.read_manifest(folder)  # the live one must read: its views are the point
    versions = sorted(manifests)
    dims = {int(m["dim"]) for m in manifests.values()}
    paths = {v: (root / name / layout.VERSIONS / v).resolve() for v in versions}
    schemas = {v: int(m.get("schema_version", 1)) for v, m in manifests.items()}
    live_v1 = schemas[live] == 1  # schema 1: event_timestamp held the latest interaction
    return _template().substitute(
        live_last="event_timestamp" if live_v1 else "last_interaction",
        live_event=(f"{_literal(layout.valid_from(manifests[live]))}::TIMESTAMPTZ" if live_v1
                    else "event_timestamp"),
        all_last="last_interaction" if max(schemas.values()) > 1 else "NULL::TIMESTAMPTZ",
        # items.parquet gained `folded_in` within schema 2: older files read it as null
        live_folded="i.folded_in" if _has_folded_in(folder) else "NULL::INTEGER",
        all_folded="folded_in" if any(_has_folded_in(paths[v]) for v in versions) else "NULL::INTEGER",
        name=name,  # validated as [A-Za-z0-9_]+ by the job file
        dim=int(manifests[live]["dim"]),
        live=_literal(live),
        users=_literal(folder / layout.USERS),
        items=_literal(folder / layout.ITEMS),
        interactions=_literal(folder / layout.INTERACTIONS),
        **_attribute_parts(folder, manifests[live]),
        version_rows=", ".join(_version_row(v, m) for v, m in manifests.items()),
        drift_rows=", ".join([_NO_DRIFT] + [_drift_row(v, m) for v, m in manifests.items()]),
        users_all=_list(paths[v] / layout.USERS for v in versions),
        items_all=_list(paths[v] / layout.ITEMS for v in versions),
        all_type=f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]",  # dims changed: lists
        user_type=sql_id_type(manifests[live], "user"),
        item_type=sql_id_type(manifests[live], "item"),
    )


def _has_folded_in(folder: Path) -> bool:
    """Whether the version's items.parquet has the `folded_in` column (its footer only)."""
    try:
        return "folded_in" in pq.read_schema(folder / layout.ITEMS).names
    except (OSError, ValueError):
        return False


def _attribute_parts(folder: Path, manifest: dict) -> dict[str, str]:
    """The `<name>_items` view's attribute columns and join, empty for a version without them."""
    columns = list(((manifest.get("attributes") or {}).get("columns") or {}))
    if not columns or not (folder / layout.ATTRIBUTES).is_file():
        return {"attribute_columns": "", "attribute_join": ""}
    return {  # names are validated as plain identifiers by the job; quoted, a keyword works too
        "attribute_columns": "".join(f', a."{c}"' for c in columns),
        "attribute_join": f" LEFT JOIN read_parquet({_literal(folder / layout.ATTRIBUTES)}) a ON a.item_id = i.item_id",
    }
_SQL_ID_TYPES = {"Int64": "BIGINT", "UInt64": "UBIGINT", "String": "VARCHAR"}
_NUMPY_ID_TYPES = {"BIGINT": "int64", "UBIGINT": "uint64", "VARCHAR": "<U1"}


def sql_id_type(manifest: dict, kind: str) -> str:
    """The DuckDB type of a version's ``kind`` ("user" or "item") ids: BIGINT, UBIGINT or VARCHAR.
    Macros cast their id argument to it, so 38 never matches the string id "0038"."""
    return _SQL_ID_TYPES.get((manifest.get("id_types") or {}).get(kind, "Int64"), "BIGINT")


def id_param_types(root: Path) -> dict[str, str]:
    """SQL parameter name → numpy dtype of the ids it names (`user`, `user_id` → the user id
    type; `item`, `item_id` → the item id type). Where the store's feature sets disagree the
    value is bound as text: DuckDB casts text to an integer column's type when comparing, and
    a string column compares it exactly, so it is right for both (a number would make DuckDB
    cast a string column to integers, and "0038" would equal 38)."""
    found: dict[str, set[str]] = {"user": set(), "item": set()}
    for name in layout.feature_sets(root):
        manifest = layout.read_manifest(layout.version_dir(root, name, layout.live_version(root, name)))
        for kind in found:
            found[kind].add(sql_id_type(manifest, kind))
    out = {}
    for kind, types in found.items():
        if types:
            out[kind] = out[f"{kind}_id"] = _NUMPY_ID_TYPES[types.pop() if len(types) == 1 else "VARCHAR"]
    return out


def _version_row(version: str, m: dict) -> str:
    ndcg = ((m.get("evaluation") or {}).get("model") or {}).get("ndcg@100")
    return (f"({_literal(version)}, {_literal(layout.valid_from(m))}::TIMESTAMPTZ, {int(m['counts']['users'])}, "
            f"{int(m['counts']['items'])}, {int(m['dim'])}, {'NULL' if ndcg is None else float(ndcg)}::DOUBLE, "
            f"{int(m.get('schema_version', 1))})")


# A typed row of NULLs, so the view has its column types with no measured version yet.
_NO_DRIFT = "(NULL::VARCHAR, NULL::VARCHAR, NULL::BOOLEAN" + ", NULL::DOUBLE" * 12 + ")"


def _drift_row(version: str, m: dict) -> str:
    a, d = m.get("alignment") or {}, m.get("drift") or {}
    uc, ic = d.get("user_cosine") or {}, d.get("item_cosine") or {}
    values = [a.get("residual"), *(uc.get(q) for q in ("q05", "q25", "q50", "q75", "q95")),
              *(ic.get(q) for q in ("q05", "q50", "q95")), (d.get("churn") or {}).get("mean"),
              (d.get("churn") or {}).get("all_changed"), (d.get("anomaly_rank") or {}).get("spearman")]
    against = d.get("against") or a.get("to_version")
    aligned = "NULL" if not a else ("true" if a.get("aligned") else "false")
    return (f"({_literal(version)}, {'NULL' if against is None else _literal(against)}, {aligned}, "
            + ", ".join(repr(float(v)) if v is not None and math.isfinite(v) else "NULL" for v in values) + ")")


def _list(paths) -> str:
    return "[" + ", ".join(_literal(p) for p in paths) + "]"


def render_catalog(root: Path) -> str:
    """The views of every feature set in ``root`` whose name can name SQL views: a folder whose
    name is no identifier, or differs only in case from one before it, is left out (and said)."""
    from aefeatures.config import NAME_PATTERN

    parts, seen = [], set()
    for name in layout.feature_sets(root):
        if not NAME_PATTERN.fullmatch(name) or name.lower() in seen:
            log.warning("SQL catalog: feature set folder %r is left out: its name is no SQL identifier, or differs "
                        "only in case from another's", name)
            continue
        seen.add(name.lower())
        parts.append(render_views(root, name))
    return "\n".join(parts)


def write_catalog(root: Path) -> Path:
    """Rewrite `STORE/catalog.sql` atomically for the live versions."""
    path = root / CATALOG
    publish.atomic_write(path, render_catalog(root))
    return path


def connect(root: Path):
    """An in-memory DuckDB connection with the store's views and macros defined."""
    import duckdb

    con = duckdb.connect()
    catalog = render_catalog(root)
    if catalog.strip():
        con.execute(catalog)
    return con


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
