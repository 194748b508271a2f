"""Render the DuckDB views in `sql/` for a store, and keep `STORE/catalog.sql` current.

`duckdb -init STORE/catalog.sql` (or ``con.execute(open(...).read())``) defines, for every
feature set, views over its live version (`<name>_users`, `<name>_items`,
`<name>_interactions`), over every published version (`<name>_versions`, `<name>_users_all`,
`<name>_items_all`) and macros (`<name>_recommend`, `<name>_similar_items`,
`<name>_similar_users`, `<name>_user_embedding_asof`). Paths are absolute, so the script works
from any working directory; it needs no DuckDB extension.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

from aefeatures.store import layout, publish

CATALOG = "catalog.sql"


def _template() -> Template:
    # The repository's top-level sql/ folder: installed as the data package `aefeatures.sql` by a
    # wheel; an editable install does not map it, so a source tree reads it in place.
    try:
        source = resources.files("aefeatures.sql").joinpath("views.sql")
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parents[2] / "sql" / "views.sql"
    return Template(source.read_text(encoding="utf-8"))


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def render_views(root: Path, name: str) -> str:
    """The views and macros of feature set ``name`` (live version and all published ones)."""
    live = layout.live_version(root, name)
    folder = layout.version_dir(root, name, live).resolve()
    versions = layout.listed_versions(root, name)
    manifests = {v: layout.read_manifest(root / name / layout.VERSIONS / v) for v in versions}
    dims = {int(m["dim"]) for m in manifests.values()}
    paths = {v: (root / name / layout.VERSIONS / v).resolve() for v in versions}
    return _template().substitute(
        name=name,  # validated as [A-Za-z0-9_]+ by the job file
        dim=int(manifests[live]["dim"]),
        live=_literal(live),
        users=_literal(folder / layout.USERS),
        items=_literal(folder / layout.ITEMS),
        interactions=_literal(folder / layout.INTERACTIONS),
        version_rows=", ".join(_version_row(v, m) for v, m in manifests.items()),
        users_all=_list(paths[v] / layout.USERS for v in versions),
        items_all=_list(paths[v] / layout.ITEMS for v in versions),
        all_type=f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]",  # dims changed: lists
    )


def _version_row(version: str, m: dict) -> str:
    ndcg = ((m.get("evaluation") or {}).get("model") or {}).get("ndcg@100")
    return (f"({_literal(version)}, {_literal(m['created_at'])}::TIMESTAMPTZ, {int(m['counts']['users'])}, "
            f"{int(m['counts']['items'])}, {int(m['dim'])}, {'NULL' if ndcg is None else float(ndcg)}::DOUBLE)")


def _list(paths) -> str:
    return "[" + ", ".join(_literal(p) for p in paths) + "]"


def render_catalog(root: Path) -> str:
    return "\n".join(render_views(root, name) for name in layout.feature_sets(root))


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
