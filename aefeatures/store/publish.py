"""Stage 7: staging, publishing (moving LATEST), refusing, retention and atomic file writes.

A version is written under `.staging/`, renamed into `versions/` only once complete, and goes
live when LATEST is replaced (write aside, fsync, rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from aefeatures import errors
from aefeatures.store.layout import (
    LATEST,
    MANIFEST,
    REFUSED,
    STAGING,
    VERSIONS,
    list_refused,
    list_versions,
    live_version,
    never_live,
)
from aefeatures.store.runlog import published_versions

if TYPE_CHECKING:
    pass


@contextmanager
def staged_version(store: Path, name: str, version: str) -> Iterator[Path]:
    """A staging folder for ``version``, removed if the block fails (a version the block
    published or refused has already moved out of it)."""
    staging = start_version(store, name, version)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise


def start_version(store: Path, name: str, version: str) -> Path:
    """Create and return the staging folder for ``version``."""
    staging = store / name / STAGING / version
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise errors.cannot_create(staging, exc.strerror) from None
    return staging


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` as strict JSON (RFC 8259). Raises :class:`NonFiniteOutputError`
    when a metric or loss in it is NaN or infinite: such a version must not be published."""
    try:
        text = json.dumps(manifest, indent=2, default=str, allow_nan=False)
    except ValueError:
        raise errors.NonFiniteOutputError("the manifest (metrics or losses)", 1, folder.name) from None
    atomic_write(folder / MANIFEST, text + "\n")


def check_finite(folder: Path) -> None:
    """Refuse a staged version holding any NaN or infinite float (embedding, bias,
    reconstruction error, anomaly score, weight) in its Parquet tables.

    Reads the written files back batch by batch, so it checks exactly what would be published
    (all ranks' parts included). Raises :class:`NonFiniteOutputError` naming table and column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in sorted(folder.glob("*.parquet")):
        pf = pq.ParquetFile(path)
        columns = [f.name for f in pf.schema_arrow
                   if pa.types.is_floating(f.type) or (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))
                   and pa.types.is_floating(f.type.value_type)]
        bad: dict[str, int] = {}
        for batch in pf.iter_batches(columns=columns, batch_size=1 << 16):
            for name, column in zip(batch.schema.names, batch.columns):
                values = column.flatten() if not pa.types.is_floating(column.type) else column
                n = pc.sum(pc.invert(pc.is_finite(values))).as_py() or 0  # nulls (no attribute) are not counted
                if n:
                    bad[name] = bad.get(name, 0) + int(n)
        if bad:
            column, count = next(iter(bad.items()))
            raise errors.NonFiniteOutputError(f"`{column}` in {path.name}", count, folder.name)


def publish(store: Path, name: str, staging: Path) -> Path:
    """Move a complete staged version into `versions/` and point LATEST at it.

    If LATEST cannot be replaced the version is taken back out of `versions/`, so a failed
    publish leaves the store exactly as it was.
    """
    final = store / name / VERSIONS / staging.name
    final.parent.mkdir(parents=True, exist_ok=True)
    _fsync_tree(staging)
    os.rename(staging, final)
    try:
        atomic_write(store / name / LATEST, staging.name + "\n")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def refuse(store: Path, name: str, staging: Path) -> Path:
    """Set a complete version the gate refused aside in `refused/`; it never goes live."""
    kept = store / name / REFUSED / staging.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, kept)
    return kept


def clean_leftovers(store: Path, name: str) -> list[str]:
    """Remove what killed runs left behind; call it holding the feature set's lock.

    That is every staged version, and any version renamed into `versions/` by a run killed
    before it moved LATEST: newer than the live version and never recorded as published.
    """
    removed = []
    staging = store / name / STAGING
    if staging.is_dir():
        for path in staging.iterdir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{STAGING}/{path.name}")
    live = live_version(store, name) if (store / name / LATEST).is_file() else ""
    published = published_versions(store / name)
    for version in list_versions(store, name):
        if never_live(version, live, published):
            shutil.rmtree(store / name / VERSIONS / version, ignore_errors=True)
            removed.append(f"{VERSIONS}/{version}")
    return removed


def apply_retention(store: Path, name: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` published versions (never the live one) and all but
    the newest ``keep`` refused ones. ``keep = 0`` keeps everything."""
    if keep <= 0:
        return []
    live = live_version(store, name)
    removed = []
    for folder, versions in ((VERSIONS, list_versions(store, name)), (REFUSED, list_refused(store, name))):
        for version in versions[:-keep]:
            if version != live:
                shutil.rmtree(store / name / folder / version)
                removed.append(f"{folder}/{version}")
    return removed


def discard(staging: Path) -> None:
    """Remove a staged version that will not be published."""
    shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it replaces ``path`` atomically.

    The file is fsynced before the rename and the folder after it, and gets the permissions a
    plain ``open(path, "w")`` would (0666 less the umask), so readers running as another user can
    open it. Concurrent writers each use their own temporary name: the last rename wins whole.
    On failure the temporary file is removed and ``path`` is untouched.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _default_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
