"""Where a feature set's versions live and how readers find them (LATEST, versions/, refused/).

Layout (see README "Store layout")::

    STORE/<name>/LATEST                    the live version id, replaced atomically
    STORE/<name>/versions/<version_id>/    complete, immutable versions
    STORE/<name>/refused/<version_id>/     complete versions the quality gate refused
    STORE/<name>/.staging/<version_id>/    a version being written (never listed)

Readers resolve LATEST once and then read inside that version only. No torch import.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from aefeatures import errors
from aefeatures.store.runlog import published_versions

if TYPE_CHECKING:
    from aefeatures.schema import Manifest
LATEST = "LATEST"
VERSIONS = "versions"
STAGING = ".staging"
REFUSED = "refused"
MANIFEST = "manifest.json"
USERS, ITEMS, INTERACTIONS = "users.parquet", "items.parquet", "interactions.parquet"
INDEX = "items.faiss"
MODEL_DIR = "model"
VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` that have a live version."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / LATEST).is_file())


def live_version(store: Path, name: str) -> str:
    """The version id LATEST points at."""
    pointer = store / name / LATEST
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise errors.no_feature_set(store, name, feature_sets(store)) from None


def version_dir(store: Path, name: str, version: str) -> Path:
    path = store / name / VERSIONS / version
    if not (path / MANIFEST).is_file():
        raise errors.no_such_version(store, name, version)
    return path


def list_versions(store: Path, name: str) -> list[str]:
    """Published version ids of ``name``, oldest first."""
    folder = store / name / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file())


def listed_versions(store: Path, name: str) -> list[str]:
    """Published versions as readers should see them: without a version left by a run killed
    after renaming it into `versions/` but before moving LATEST (it never went live)."""
    live = live_version(store, name)
    published = published_versions(store / name)
    return [v for v in list_versions(store, name) if not never_live(v, live, published)]


def never_live(version: str, live: str, published: set[str]) -> bool:
    # Newer than the live version and never recorded as published by a run.
    return version > live and version not in published


def read_manifest(folder: Path) -> "Manifest":
    """The manifest of the version in ``folder``: the one reader, which checks its
    ``schema_version`` (see :class:`aefeatures.schema.Manifest`)."""
    from aefeatures.schema import Manifest  # pyarrow, which schema needs, only once a manifest is read

    path = folder / MANIFEST
    return Manifest.from_json(path.read_text(encoding="utf-8"), path)


def new_version_id(store: Path, name: str, now: datetime) -> str:
    """A version id that sorts by time and is later than every existing one."""
    moment = now.astimezone(timezone.utc)
    existing = list_versions(store, name)
    if existing:
        last = datetime.strptime(existing[-1], VERSION_FORMAT).replace(tzinfo=timezone.utc)
        moment = max(moment, last + timedelta(microseconds=1))
    return moment.strftime(VERSION_FORMAT)


def list_refused(store: Path, name: str) -> list[str]:
    folder = store / name / REFUSED
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file()) if folder.is_dir() else []
