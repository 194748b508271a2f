"""Where a feature set's versions live and how readers find them (LATEST, versions/, refused/).

Layout (see README "Store layout")::

    STORE/<name>/LATEST                    the live version id, replaced atomically
    STORE/<name>/versions/<version_id>/    complete, immutable versions
    STORE/<name>/refused/<version_id>/     complete versions the quality gate refused
    STORE/<name>/.staging/<version_id>/    a version being written (never listed)

Readers resolve LATEST once and then read inside that version only. No torch import.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aefeatures import errors
from aefeatures.store.runlog import RUN_LOG, published_versions, read_runs

if TYPE_CHECKING:
    from aefeatures.schema import Manifest
LATEST = "LATEST"
VERSIONS = "versions"
STAGING = ".staging"
REFUSED = "refused"
MANIFEST = "manifest.json"
USERS, ITEMS, INTERACTIONS = "users.parquet", "items.parquet", "interactions.parquet"
ATTRIBUTES = "attributes.parquet"  # optional: item attributes in item-row order (`[items]` in the job)
INDEX = "items.faiss"
MODEL_DIR = "model"
VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"
VERSION_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # one plain path component (ids are VERSION_FORMAT)


def feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` that have a live version."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / LATEST).is_file())


def known_feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` with anything to inspect: a live version, a
    version the quality gate refused, or a run log (a first run may have published nothing)."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / LATEST).is_file() or list_refused(store, p.name) or (p / RUN_LOG).is_file()))


def live_version(store: Path, name: str) -> str:
    """The version id LATEST points at."""
    pointer = store / name / LATEST
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise errors.no_feature_set(store, name, feature_sets(store)) from None


def version_dir(store: Path, name: str, version: str) -> Path:
    """The folder of published ``version``. Raises ``VersionGoneError`` when retention deleted
    it (the run log says so), ``StoreError`` when it never was published."""
    if not VERSION_PATTERN.fullmatch(version):  # also keeps a pinned id from naming another path
        raise errors.no_such_version(store, name, version)
    path = store / name / VERSIONS / version
    if not (path / MANIFEST).is_file():
        for run in reversed(read_runs(store / name)):
            if f"{VERSIONS}/{version}" in (run.get("removed_by_retention") or []):
                raise errors.version_gone(store, name, version, run.get("ended"))
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


def valid_from(manifest: dict[str, Any]) -> str:
    """ISO time from which a version's values are valid (its rows' `event_timestamp`). Schema 1
    manifests have no `valid_from`: their `created_at` (the run's start) stands in."""
    return manifest.get("valid_from") or manifest["created_at"]


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
