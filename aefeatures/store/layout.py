"""Where a feature set's versions live and how readers find them (LATEST, versions/, refused/).

Layout (see README "Store layout")::

    STORE/<name>/LATEST                    the live version id, replaced atomically
    STORE/<name>/versions/<version_id>/    complete, immutable versions
    STORE/<name>/refused/<version_id>/     complete versions the quality gate refused
    STORE/<name>/.staging/<version_id>/    a version being written (never listed)
    STORE/<name>/.trash/<folder>-<id>/     a version retention renamed out of sight, being deleted

Readers resolve LATEST once and then read inside that version only. Each published manifest
records every file's size and hash (`files`), checked when a version is opened. No torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aefeatures import errors
from aefeatures.store.runlog import RUN_LOG, published_versions

if TYPE_CHECKING:
    from aefeatures.schema import Manifest
LATEST = "LATEST"
VERSIONS = "versions"
STAGING = ".staging"
LOCK = ".lock"  # held by the running job (aefeatures.jobs.lock)
TRASH = ".trash"  # versions retention renamed out of sight before deleting them; never read
REFUSED = "refused"
MANIFEST = "manifest.json"
USERS, ITEMS, INTERACTIONS = "users.parquet", "items.parquet", "interactions.parquet"
ATTRIBUTES = "attributes.parquet"  # optional: item attributes in item-row order (`[items]` in the job)
NEIGHBOURS = "item_neighbours.parquet"  # optional: a dlae's sparse item-item part (manifest `item_neighbours`)
INDEX = "items.faiss"
MODEL_DIR = "model"
VERSION_FORMAT = "%Y%m%dT%H%M%S.%fZ"
VERSION_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # one plain path component (ids are VERSION_FORMAT)


def feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` that have a live version (a LATEST pointer, even a
    broken one: :func:`live_version` says what is wrong with it)."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if _has_latest(p))


def _has_latest(folder: Path) -> bool:
    return os.path.lexists(folder / LATEST) and not folder.name.startswith(".")


def known_feature_sets(store: Path) -> list[str]:
    """Names of the feature sets in ``store`` with anything to inspect: a live version, a
    version the quality gate refused, or a run log (a first run may have published nothing)."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (_has_latest(p) or list_refused(store, p.name) or (p / RUN_LOG).is_file()))


def live_version(store: Path, name: str) -> str:
    """The version id LATEST points at.

    Raises
    ------
    FeatureSetNotFoundError
        ``name`` has no LATEST (no feature set of that name was published).
    BrokenLatestError
        LATEST is a link, not UTF-8 text, not a version id, or names a version whose folder or
        manifest is gone: nothing of ``name`` can be served until a run publishes again
        (``aefeatures run --force``, which repairs it).
    """
    pointer = store / name / LATEST
    if pointer.is_symlink():
        raise errors.broken_latest(store, name, f"is a symbolic link (to `{os.readlink(pointer)}`), which "
                                   "aefeatures never writes")
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        raise errors.no_feature_set(store, name, feature_sets(store)) from None
    except OSError as exc:
        raise errors.broken_latest(store, name, f"cannot be read ({exc.strerror})") from None
    try:
        version = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        version = None
    if version is None or not VERSION_PATTERN.fullmatch(version):
        raise errors.broken_latest(store, name, f"holds {errors.brief(raw[:200])}, not a version id")
    if not (store / name / VERSIONS / version / MANIFEST).is_file():
        raise errors.broken_latest(store, name, f"names version `{version}`, whose folder or manifest.json is gone",
                                   version)
    return version


def version_dir(store: Path, name: str, version: str) -> Path:
    """The folder of published ``version``. Raises ``VersionGoneError`` when retention deleted
    it (the run log says so), ``StoreError`` when it never was published."""
    if not VERSION_PATTERN.fullmatch(version):  # also keeps a pinned id from naming another path
        raise errors.no_such_version(store, name, version)
    path = store / name / VERSIONS / version
    if not (path / MANIFEST).is_file():
        if os.path.lexists(store / name / TRASH / trashed_name(VERSIONS, version)):
            raise errors.version_gone(store, name, version, None)  # retention is deleting it now
        removed = _removed_by_retention(store / name, version)
        if removed is not None:
            raise errors.version_gone(store, name, version, removed or None)
        raise errors.no_such_version(store, name, version)
    return path


def trashed_name(folder: str, version: str) -> str:
    """The name under `.trash/` of ``folder``/``version`` (``folder``: `versions` or `refused`)."""
    return f"{folder}-{version}"


RUN_LOG_TAIL = 1 << 20  # bytes at the end of the run log that version_dir searches (a service asks per request)


def _removed_by_retention(folder: Path, version: str) -> str | None:
    """When the run that deleted ``version`` by retention ended ("" if it did not say), from the
    last :data:`RUN_LOG_TAIL` bytes of the run log in ``folder`` (about 2,000 runs), never the
    whole file; None when they do not say it was deleted."""
    entry = f'"{VERSIONS}/{version}"'.encode()
    try:
        with open(folder / RUN_LOG, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(size - RUN_LOG_TAIL, 0)
            f.seek(start)
            tail = f.read(size - start)
    except OSError:
        return None
    if entry not in tail:
        return None
    lines = tail.split(b"\n")[1 if start else 0:]  # a tail's first line may be cut
    for line in reversed(lines):
        if entry in line:
            try:
                run = json.loads(line)
            except ValueError:  # a torn last line from a crash
                continue
            if f"{VERSIONS}/{version}" in (run.get("removed_by_retention") or []):
                return run.get("ended") or ""
    return None


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


# --- content fingerprints --------------------------------------------------------------------

FILES = "files"  # manifest key: {relative path: fingerprint} of every file but the manifest
HASH_WHOLE_UP_TO = 32 << 20  # bytes; larger files hash their size, head, tail and spread blocks
_EDGE = 1 << 20  # head and tail bytes hashed of a large file
_BLOCKS, _BLOCK = 16, 64 << 10  # blocks spread over a large file's middle


def file_fingerprint(path: Path, sampled: bool | None = None) -> dict[str, Any]:
    """``{"bytes", "sha256", "hashed"}`` of the file at ``path``: sha256 of the whole file up to
    :data:`HASH_WHOLE_UP_TO` bytes (``hashed`` "all"), else of its size, first and last MiB and 16
    blocks spread between ("sampled"): milliseconds whatever the size. ``sampled`` forces the
    rule (a manifest's recorded one). Raises ``OSError`` when the file cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if sampled is None:
            sampled = size > HASH_WHOLE_UP_TO
        if not sampled:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(size.to_bytes(8, "little"))
            step = max(1, (size - 2 * _EDGE) // (_BLOCKS + 1))
            for offset, length in ([(0, _EDGE)] + [(_EDGE + step * (i + 1), _BLOCK) for i in range(_BLOCKS)]
                                   + [(max(0, size - _EDGE), _EDGE)]):
                f.seek(offset)
                digest.update(f.read(length))
    return {"bytes": size, "sha256": digest.hexdigest(), "hashed": "sampled" if sampled else "all"}


def fingerprint_files(folder: Path) -> dict[str, dict[str, Any]]:
    """:func:`file_fingerprint` of every file under ``folder`` but its manifest, by path relative
    to it (``/``-separated), sorted: what :func:`check_files` compares a version against."""
    out = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative != MANIFEST:
            out[relative] = file_fingerprint(path)
    return out


def check_files(folder: Path, manifest: dict[str, Any], only: list[str] | None = None) -> None:
    """Check that the files of the version in ``folder`` are the ones its manifest recorded at
    publish (:data:`FILES`: size, then hash), all of them or ``only`` these. A version published
    before fingerprints were recorded is not checked.

    Raises
    ------
    DamagedVersionError
        A recorded file is missing, of another size (truncated, grown) or another content (e.g.
        another version's file put in its place), naming the file and the version.
    """
    recorded = manifest.get(FILES)
    if not isinstance(recorded, dict):
        return
    name, version = manifest.get("feature_set", folder.parent.parent.name), manifest.get("version", folder.name)
    for relative in (only if only is not None else sorted(recorded)):
        expected = recorded.get(relative)
        if not isinstance(expected, dict):
            continue
        if not isinstance(relative, str) or relative.startswith("/") or ".." in relative.split("/"):
            raise errors.damaged_version(name, version, str(relative), "is named in the manifest's `files` but is "
                                         "not a path inside the version's folder (a hand edit)")
        path = folder / relative
        try:
            size = path.stat().st_size
            found = file_fingerprint(path, sampled=expected.get("hashed") == "sampled") \
                if size == expected.get("bytes") else None
        except OSError as exc:
            raise errors.damaged_version(name, version, relative, f"cannot be read ({exc.strerror})") from None
        if found is None:
            published = expected.get("bytes")
            published = f"{published:,}" if isinstance(published, int) else repr(published)
            raise errors.damaged_version(name, version, relative, f"holds {size:,} bytes where {published} were "
                                         "published (truncated or replaced)")
        if found["sha256"] != expected.get("sha256"):
            raise errors.damaged_version(name, version, relative, "is not the file that was published (its content "
                                         "hash differs: another version's file, or altered)")
