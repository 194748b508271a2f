"""Stage 7: staging, publishing (moving LATEST), refusing, retention and atomic file writes.

A version is written under `.staging/`, renamed into `versions/` only once complete, and goes
live when LATEST is replaced (write aside, fsync, rename). Retention and the clean-up of killed
runs first rename a version into `.trash/` (atomic: readers see all of it or none), then delete
it. Nothing here follows a symbolic link inside a feature set's folder (:func:`check_no_links`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from aefeatures import errors
from aefeatures.store.layout import (
    FILES,
    LATEST,
    LOCK,
    MANIFEST,
    REFUSED,
    STAGING,
    TRASH,
    VERSIONS,
    fingerprint_files,
    list_refused,
    list_versions,
    live_version,
    never_live,
    trashed_name,
)
from aefeatures.store.runlog import RUN_LOG, published_versions

log = logging.getLogger(__name__)


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

    First the manifest gets every file's size and hash (``files``,
    :func:`aefeatures.store.layout.fingerprint_files`), which readers check when they open the
    version. If LATEST cannot be replaced the version is taken back out of `versions/`, so a
    failed publish leaves the store exactly as it was.
    """
    check_no_links(store, name)
    final = store / name / VERSIONS / staging.name
    final.parent.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
    manifest[FILES] = fingerprint_files(staging)
    write_manifest(staging, manifest)
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
    check_no_links(store, name)
    kept = store / name / REFUSED / staging.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, kept)
    return kept


# The folders of a feature set that runs create, rename into and delete inside, and the files
# they write in place: none may be a symbolic link (it would point those writes elsewhere).
_NO_LINKS = (STAGING, VERSIONS, REFUSED, TRASH, LOCK, RUN_LOG)
_FOLDERS = (STAGING, VERSIONS, REFUSED, TRASH)


def check_no_links(store: Path, name: str) -> None:
    """Refuse a feature set whose folder, or whose `.staging/`, `versions/`, `refused/`, `.trash/`,
    `.lock` or `runs.jsonl`, is a symbolic link, or one of those folders a file: runs write, rename
    and delete there, and would do it in the link's target. (The store directory itself may be a
    link; LATEST is replaced, never written through.)

    Raises
    ------
    StoreError
        Naming the link and its target (exit code 2).
    """
    folder = store / name
    for path in (folder, *(folder / part for part in _NO_LINKS)):
        if path.is_symlink():
            raise errors.linked_store_path(path, os.readlink(path))
        if (path == folder or path.name in _FOLDERS) and path.exists() and not path.is_dir():
            raise errors.not_a_folder(path)


def _remove(path: Path) -> None:
    """Delete ``path``: a link or file by unlinking it (never its target), a folder with
    everything in it (links inside are unlinked, not followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _to_trash(store: Path, name: str, folder: str, version: str) -> str:
    """Rename ``folder``/``version`` into `.trash/` in one step (a link is moved, not followed);
    returns its name there. Readers never see part of it."""
    trash = store / name / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / trashed_name(folder, version)
    if os.path.lexists(target):  # left by a run that could not finish deleting it
        _remove(target)
    os.rename(store / name / folder / version, target)
    return target.name


def empty_trash(store: Path, name: str) -> list[str]:
    """Delete what `.trash/` holds (versions retention or a clean-up took out of sight); returns
    their names there. A version that cannot be deleted now is logged and left for the next run
    (readers never see it)."""
    trash = store / name / TRASH
    removed = []
    if not trash.is_dir() or trash.is_symlink():
        return removed
    for path in sorted(trash.iterdir()):
        if _removed(path):
            removed.append(f"{TRASH}/{path.name}")
    return removed


def _removed(path: Path) -> bool:
    """:func:`_remove` ``path``; a failure is a warning (the next run tries again), never fatal."""
    try:
        _remove(path)
    except OSError as exc:
        log.warning("could not delete %s (%s); the next run tries again", path, exc.strerror or exc)
        return False
    return True


def clean_leftovers(store: Path, name: str) -> list[str]:
    """Remove what killed runs left behind; call it holding the feature set's lock.

    That is every staged version, whatever retention had moved into `.trash/`, and any version
    renamed into `versions/` by a run killed before it moved LATEST: newer than the live version
    and never recorded as published (none is removed while LATEST is broken: which version was
    live is then unknown). Links are unlinked, never followed.

    Raises
    ------
    StoreError
        A folder of the feature set is a link (:func:`check_no_links`).
    """
    check_no_links(store, name)
    removed = []
    staging = store / name / STAGING
    if staging.is_dir():
        for path in sorted(staging.iterdir()):
            if _removed(path):
                removed.append(f"{STAGING}/{path.name}")
    removed += empty_trash(store, name)
    if not os.path.lexists(store / name / LATEST):
        live = ""
    else:
        try:
            live = live_version(store, name)
        except errors.FeatureSetNotFoundError:  # a broken LATEST: `run --force` repairs it
            return removed
    published = published_versions(store / name)
    for version in list_versions(store, name):
        if never_live(version, live, published):
            try:
                _to_trash(store, name, VERSIONS, version)
            except OSError as exc:
                log.warning("could not remove %s/%s (%s); the next run tries again", VERSIONS, version,
                            exc.strerror or exc)
                continue
            removed.append(f"{VERSIONS}/{version}")
    empty_trash(store, name)
    return removed


def apply_retention(store: Path, name: str, keep: int, *, problems: list[str] | None = None) -> list[str]:
    """Take all but the newest ``keep`` published versions (never the live one) and all but the
    newest ``keep`` refused ones out of sight, by renaming each into `.trash/` in one step;
    returns them as `versions/ID` or `refused/ID`. ``keep = 0`` keeps everything. The caller
    deletes them with :func:`empty_trash` (a run killed before that leaves them to the next
    run's :func:`clean_leftovers`, never half a version where readers look).

    A version that cannot be moved stays where it is, with a line in ``problems`` (when given)
    and a warning: retention is housekeeping, never the reason a run fails.

    Raises
    ------
    StoreError
        A folder of the feature set is a link (:func:`check_no_links`).
    """
    if keep <= 0:
        return []
    check_no_links(store, name)
    live = live_version(store, name)
    removed = []
    for folder, versions in ((VERSIONS, list_versions(store, name)), (REFUSED, list_refused(store, name))):
        for version in versions[:-keep]:
            if version == live:
                continue
            try:
                _to_trash(store, name, folder, version)
            except OSError as exc:
                problem = f"retention could not remove {folder}/{version} ({exc.strerror or exc}); it is kept"
                log.warning("%s", problem)
                if problems is not None:
                    problems.append(problem)
                continue
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

    Raises
    ------
    StorageError
        The file system refused the write (full, read-only, over the file size limit, not
        permitted, a folder missing or a file in its place; also when the block's own writer,
        Arrow or Polars, reports it), naming ``path``.
    """
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _storage_error(exc, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and errors.storage_errno(exc, frozenset(errors.STORAGE_ERRNOS)) is not None:
            raise _storage_error(exc, path) from None
        raise
    _fsync_dir(path.parent)


def _storage_error(exc: BaseException, path: Path) -> BaseException:
    code = errors.storage_errno(exc, frozenset(errors.STORAGE_ERRNOS))
    if code is None or isinstance(exc, errors.StorageError):
        return exc
    return errors.StorageError(path, code, f"`{path.name}` was not written or replaced")


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
