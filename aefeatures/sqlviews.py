"""Render the DuckDB views in `sql/` for a store, and keep `STORE/catalog.sql` current.

`duckdb -init STORE/catalog.sql` (or ``con.execute(open(...).read())``) defines, for every
feature set, `<name>_users`, `<name>_items` and `<name>_interactions` over its live version.
Paths are absolute, so the script works from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

from aefeatures import store

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
CATALOG = "catalog.sql"


def _template() -> Template:
    packaged = Path(__file__).resolve().parent / "sql" / "views.sql"  # inside a built wheel
    source = packaged if packaged.is_file() else SQL_DIR / "views.sql"
    return Template(source.read_text(encoding="utf-8"))


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def render_views(root: Path, name: str) -> str:
    """The views of feature set ``name``'s live version, as DuckDB SQL."""
    folder = store.version_dir(root, name, store.live_version(root, name))
    dim = int(store.read_manifest(folder)["dim"])
    return _template().substitute(
        name=name,  # validated as [A-Za-z0-9_]+ by the job file
        dim=dim,
        users=_literal(folder.resolve() / store.USERS),
        items=_literal(folder.resolve() / store.ITEMS),
        interactions=_literal(folder.resolve() / store.INTERACTIONS),
    )


def render_catalog(root: Path) -> str:
    return "\n".join(render_views(root, name) for name in store.feature_sets(root))


def write_catalog(root: Path) -> Path:
    """Rewrite `STORE/catalog.sql` atomically for the live versions."""
    path = root / CATALOG
    store.atomic_write(path, render_catalog(root))
    return path
