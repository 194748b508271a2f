"""Every failure a user can meet, with the message it shows.

All errors derive from :class:`AEFeaturesError` and carry the CLI exit code that reports them
(:data:`EXIT_CODES`, the one list of them; the CLI's help is made from it). Each class also derives
from the matching built-in so callers can catch ``KeyError`` / ``ValueError`` as usual. Messages
are built here, from typed fields, and nowhere else: one or two sentences saying what is wrong,
where, and what to do.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_REFUSED = 3
EXIT_LOCKED = 4
EXIT_NOT_FOUND = 5
EXIT_INTERRUPTED = (130, 143)  # 128 + SIGINT, 128 + SIGTERM

EXIT_CODES: dict[int | tuple[int, ...], str] = {
    EXIT_OK: "done",
    EXIT_FAILURE: "unexpected failure",
    EXIT_BAD_INPUT: "bad input, config or store",
    EXIT_GATE_REFUSED: "quality gate refused publishing",
    EXIT_LOCKED: "another run holds the lock",
    EXIT_NOT_FOUND: "user or item not found",
    EXIT_INTERRUPTED: "stopped by Ctrl-C/SIGTERM",
}


def exit_codes_help(codes: Sequence[int | tuple[int, ...]] | None = None) -> str:
    """"Exit codes: 0 done, …" for ``codes`` (default: all of :data:`EXIT_CODES`), in their order."""
    shown = [c for c in EXIT_CODES if codes is None or c in codes]
    return "Exit codes: " + ", ".join(
        f"{'/'.join(map(str, c)) if isinstance(c, tuple) else c} {EXIT_CODES[c]}" for c in shown) + "."


def _show(values: Sequence[object], limit: int = 12) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    more = len(values) - limit
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"


class AEFeaturesError(Exception):
    """Root of every error aefeatures raises on purpose."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.message


class BadInputError(AEFeaturesError, ValueError):
    """The input data or the job file cannot be used as given (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


# --- job file -------------------------------------------------------------------------------


class ConfigError(BadInputError):
    """The job file is missing, unreadable, or holds a wrong key or value."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"job file `{path}`: {problem}")


def unknown_key(path: Path | str, key: str, valid: Sequence[str], suggestion: str | None) -> ConfigError:
    hint = f"did you mean `{suggestion}`? " if suggestion else ""
    return ConfigError(path, f"unknown key `{key}`; {hint}valid keys here: {', '.join(valid)}.")


def wrong_type(path: Path | str, key: str, expected: str, value: object) -> ConfigError:
    return ConfigError(
        path, f"`{key}` must be {expected}, got {type(value).__name__} {value!r}. Fix the value."
    )


def bad_value(path: Path | str, key: str, value: object, rule: str) -> ConfigError:
    return ConfigError(path, f"`{key}` = {value!r} is not allowed: {rule}.")


def bad_index_kind(path: Path | str, kind: str, width: int, reason: str, kinds: Sequence[str],
                   suggestion: str | None) -> ConfigError:
    hint = f'did you mean "{suggestion}"? ' if suggestion else ""
    return ConfigError(
        path, f"`index.kind` = {kind!r} is neither a named kind nor a FAISS factory string FAISS can make "
        f"for {width}-wide rows ({reason}); {hint}use one of {', '.join(kinds)} or a factory string such "
        'as "HNSW32,Flat".'
    )


def sparse_updates_under_torchrun() -> BadInputError:
    return BadInputError(
        '`model.sparse_updates` = "on" does not work under torchrun: DistributedDataParallel '
        "all-reduces dense gradients only. Set it to \"auto\" (dense updates under torchrun) or train "
        "in one process."
    )


def recvae_unsupported(where: str, what_to_do: str) -> BadInputError:
    return BadInputError(f"`model.kind` = \"recvae\" does not train {where}; {what_to_do}.")


# --- interactions input ---------------------------------------------------------------------


class InputNotFoundError(BadInputError, FileNotFoundError):
    """The input path does not exist or matches no Parquet files."""

    def __init__(self, path: str, detail: str):
        self.path = path
        super().__init__(
            f"input `{path}` {detail}. Check `input.path` in the job file "
            "(a Parquet file, a directory of Parquet files, or a glob)."
        )


class NotParquetError(BadInputError):
    """A file in the input is not a readable Parquet file."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(
            f"input file `{path}` is not a readable Parquet file ({reason}). "
            "Remove or replace it, or narrow `input.path`."
        )


class SchemaDriftError(BadInputError):
    """Two input files disagree on the type of a column the job reads."""

    def __init__(self, column: str, first: str, first_type: str, other: str, other_type: str):
        self.column = column
        super().__init__(
            f"column `{column}` is {first_type} in `{first}` but {other_type} in `{other}`. "
            "Rewrite the files with one type for the column, or read them with separate jobs."
        )


class MissingColumnsError(BadInputError, KeyError):
    """A column the job file names is not in the input."""

    def __init__(self, path: str, missing: Sequence[str], found: Sequence[str], keys: Sequence[str]):
        self.path, self.missing, self.found = path, list(missing), list(found)
        settings = " or ".join(f"`input.{k}`" for k in keys)
        super().__init__(
            f"input `{path}` is missing column(s) {_show(missing)}; found {_show(found, 30)}. "
            f"Set {settings} in the job file to the right column name."
        )


class NullValuesError(BadInputError):
    """An id (or weight) column holds nulls."""

    def __init__(self, column: str, count: int, file: str, row: int):
        self.column, self.count, self.file, self.row = column, count, file, row
        if row < 0:  # a hive partition folder whose key is null (`file` is that folder)
            super().__init__(
                f"column `{column}` has {count} null value(s): they come from the hive partition folder "
                f"`{Path(file).name}` (`{file}`), whose key is null. Move that folder out of the input, or "
                "rewrite its rows with a key, before the job runs."
            )
            return
        super().__init__(
            f"column `{column}` has {count} null value(s); the first is row {row} (0-based) of `{file}`. "
            "Drop or fill those rows before the job runs."
        )


class UnsupportedTypeError(BadInputError, TypeError):
    """A column has a type the job cannot use (ids must be integers or strings)."""

    def __init__(self, path: str, column: str, found: str, expected: str):
        self.column, self.found = column, found
        super().__init__(
            f"column `{column}` in `{path}` has type {found}; {expected}. "
            "Cast the column when writing the input, or point the job at another column."
        )


class InvalidWeightsError(BadInputError):
    """The weight column holds negative or NaN values."""

    def __init__(self, column: str, what: str, count: int, file: str, row: int, value: object):
        self.column, self.count, self.file, self.row = column, count, file, row
        super().__init__(
            f"column `{column}` has {count} {what} value(s); the first is {value!r} at row {row} "
            f"of `{file}`. Weights must be finite and >= 0: clean the input or drop `input.weight_col`."
        )


class ImplausibleTimestampsError(BadInputError):
    """Event timestamps fall outside the plausible window (refused, never wrapped or clamped)."""

    def __init__(self, column: str, count: int, file: str, row: int, value: object, read_as: str,
                 low: str, high: str):
        self.column, self.count, self.file, self.row = column, count, file, row
        super().__init__(
            f"column `{column}` has {count} timestamp(s) outside [{low}, {high}); the first is {value!r} "
            f"({read_as}) at row {row} of `{file}`. If the unit is wrong set `input.timestamp_unit`; "
            "if the times are real widen `input.timestamp_min` / `input.timestamp_max`; else clean the input."
        )


class TimestampUnitError(BadInputError):
    """`input.timestamp_unit = "auto"` cannot tell the unit of an integer epoch column."""

    def __init__(self, column: str, path: str, low: int, high: int, fits: Sequence[str], window: str):
        self.column, self.fits = column, list(fits)
        why = (f"it fits several units ({', '.join(fits)})" if fits else
               "it fits none of s, ms, us, ns")
        super().__init__(
            f"integer timestamps in column `{column}` of `{path}` run from {low} to {high}: as epochs within "
            f"{window} {why}. Set `input.timestamp_unit` to \"s\", \"ms\", \"us\" or \"ns\"."
        )


class EmptyInputError(BadInputError):
    """Nothing is left to train on."""

    def __init__(self, path: str, n_files: int, n_rows: int, why: str):
        self.path, self.n_files, self.n_rows = path, n_files, n_rows
        super().__init__(
            f"no interactions to train on: `{path}` matched {n_files} file(s) with {n_rows} row(s) "
            f"but {why}. Check the input or lower `input.min_weight`."
        )


class TooFewItemsError(BadInputError):
    """An autoencoder over fewer than two items has nothing to learn."""

    def __init__(self, path: str, n_items: int):
        self.n_items = n_items
        super().__init__(
            f"input `{path}` has {n_items} distinct item(s) after filtering; at least 2 are needed "
            "to learn anything. Check `input.item_col` and `input.min_weight`."
        )


# --- training and publishing ---------------------------------------------------------------


class TrainingDivergedError(AEFeaturesError):
    """The training loss became NaN or infinite (exit code 1); nothing was published."""

    def __init__(self, epoch: int, loss: float):
        self.epoch, self.loss = epoch, loss
        super().__init__(
            f"training diverged: the loss of epoch {epoch} is {loss}, so nothing was published. "
            "Lower `model.lr`, scale large weights down (or set `input.binarize = true`), or try "
            "`model.precision = \"fp32\"`."
        )


class NonFiniteOutputError(AEFeaturesError):
    """A value about to be published is NaN or infinite (exit code 1); nothing was published."""

    def __init__(self, what: str, count: int, version: str):
        self.what, self.count, self.version = what, count, version
        super().__init__(
            f"version {version} was not published: {count} value(s) of {what} are NaN or infinite. "
            "Lower `model.lr` or check the input's weights; the live version is unchanged."
        )


def non_finite_json(where: str) -> AEFeaturesError:
    return AEFeaturesError(f"{where} holds a NaN or infinite value, which JSON cannot carry; "
                           "it was written by a version published before such values were refused. "
                           "Run the job again to replace it.")


# --- store and lookups ----------------------------------------------------------------------


class StoreError(BadInputError):
    """The store cannot be written where a job needs to (exit code 2): not writable, or the
    folder of a feature set given as a store."""

    def __init__(self, message: str):
        super().__init__(message)


def store_not_writable(root: Path, reason: str) -> StoreError:
    return StoreError(f"store directory `{root}` is not writable ({reason}). Fix its permissions or "
                      "point `job.store` elsewhere.")


def cannot_create(path: Path, reason: str) -> StoreError:
    return StoreError(f"cannot create `{path}` ({reason}). Make the store directory writable "
                      "or point `job.store` elsewhere.")


class FeatureSetNotFoundError(BadInputError, LookupError):
    """What a lookup asked to read is not there: the store, a feature set in it, or a version
    of it (exit code 2; the HTTP service answers 404). ``missing`` is "store", "name" or
    "version", which the CLI turns into the option to fix."""

    def __init__(self, message: str, missing: str):
        self.missing = missing
        super().__init__(message)


def no_store(store: Path) -> FeatureSetNotFoundError:
    return FeatureSetNotFoundError(f"store `{store}` does not exist; run a job first.", "store")


def no_feature_set(store: Path, name: str, available: Sequence[str]) -> FeatureSetNotFoundError:
    have = f"it holds {_show(available)}" if available else "it holds no published feature set"
    return FeatureSetNotFoundError(
        f"store `{store}` has no feature set `{name}`; {have}. Run its job first or name one it holds.",
        "name")


def not_served(name: str, served: Sequence[str]) -> FeatureSetNotFoundError:
    """An HTTP request named a feature set the service does not serve (no CLI flags here)."""
    have = f"it serves {_show(served)}" if served else "it serves no feature set yet (run a job into its store)"
    return FeatureSetNotFoundError(f"feature set `{name}` is not served here; {have}. GET /healthz lists them.",
                                   "name")


def empty_store(store: Path) -> FeatureSetNotFoundError:
    return FeatureSetNotFoundError(
        f"store `{store}` holds no feature set yet. Run a job into it first (`aefeatures run JOB.toml`), "
        "or point at the store the job file names (`job.store`).", "store")


class VersionGoneError(FeatureSetNotFoundError):
    """A pinned version existed but retention has deleted it (exit code 2; HTTP 410)."""

    def __init__(self, message: str):
        super().__init__(message, "version")


def version_gone(store: Path, name: str, version: str, removed_at: str | None) -> VersionGoneError:
    when = f" by the run ended {removed_at}" if removed_at else ""
    return VersionGoneError(
        f"version `{version}` of feature set `{name}` in `{store}` was deleted by retention{when}. "
        "Pin a retained version (listed by `Store.versions`, `aefeatures versions`) or read the live one."
    )


def no_such_version(store: Path, name: str, version: str) -> FeatureSetNotFoundError:
    return FeatureSetNotFoundError(
        f"feature set `{name}` in `{store}` has no version `{version}`; its versions are listed by "
        "`Store.versions` (`aefeatures versions`).", "version")


class AmbiguousFeatureSetError(BadInputError):
    """No feature set was named and the store holds several (exit code 2)."""

    def __init__(self, store: Path, available: Sequence[str]):
        self.available = list(available)
        super().__init__(f"store `{store}` holds several feature sets {_show(available)}; name one of them.")


def ambiguous_feature_set(store: Path, available: Sequence[str]) -> AmbiguousFeatureSetError:
    return AmbiguousFeatureSetError(store, available)


# What the CLI adds after a library message to name the option to change (the library itself
# speaks of arguments, not flags: an HTTP client or a Python caller has no `--name`).
CLI_HINTS = {"store": "Pass an existing `--store`.", "name": "Pass an existing `--name`.",
             "version": "", "ambiguous": "Pass `--name` to pick one."}


def cli_message(exc: AEFeaturesError) -> str:
    """``exc``'s message as the CLI shows it: with the option to fix where the library's
    message names an argument."""
    key = exc.missing if isinstance(exc, FeatureSetNotFoundError) else (
        "ambiguous" if isinstance(exc, AmbiguousFeatureSetError) else None)
    hint = CLI_HINTS.get(key, "") if key else ""
    return f"{exc} {hint}" if hint else str(exc)


def query_width(shape: tuple, width: int) -> BadInputError:
    return BadInputError(f"index queries must be {width} wide (the embedding plus one column), got an array "
                         f"of shape {tuple(shape)}; build them with user_queries or item_queries.")


def index_width_mismatch(path: Path | str, index_width: int, dim: int, widths: Sequence[int]) -> BadInputError:
    return BadInputError(f"index `{path}` holds {index_width}-wide rows but its version's manifest says "
                         f"dim {dim} (rows {' or '.join(map(str, widths))} wide); the version's files disagree: "
                         "run the job again to rebuild it.")


def index_metric_mismatch(path: Path | str, metric: int) -> BadInputError:
    return BadInputError(f"index `{path}` does not score by inner product (FAISS metric {metric}); "
                         "run the job again to rebuild it.")


class DamagedManifestError(BadInputError):
    """A version's manifest.json is not what aefeatures wrote (exit code 2)."""


def bad_manifest(path: Path | str, problem: str) -> DamagedManifestError:
    return DamagedManifestError(f"manifest `{path}` cannot be read: {problem}. The version is damaged: run the "
                                "job again, or remove that version's folder.")


class DamagedVersionError(DamagedManifestError):
    """A published version's files are not the ones its manifest recorded when it was published
    (truncated, replaced by another version's, missing), or its index disagrees with its tables
    (exit code 2). Names the file relative to the store, never the store's absolute path."""

    problem = ""  # the file and what is wrong with it, as a phrase


def damaged_version(name: str, version: str, file: str, problem: str) -> DamagedVersionError:
    exc = DamagedVersionError(
        f"version `{version}` of feature set `{name}` is damaged: `{file}` {problem}. A published version's "
        "files never change: restore the folder from a backup, or publish a fresh version with "
        "`aefeatures run --force JOB.toml` (and read or pin another version meanwhile).")
    exc.problem = f"`{file}` {problem}"
    return exc


class BrokenLatestError(FeatureSetNotFoundError):
    """A feature set's LATEST pointer is not a version id naming a published version (garbage,
    empty, a link, or naming a folder that is gone): nothing of it can be served (exit code 2)."""

    def __init__(self, message: str, problem: str, version: str | None):
        super().__init__(message, "version")
        self.problem = problem  # what is wrong with LATEST, as a phrase ("LATEST holds …")
        self.version = version  # the version id LATEST names, when it names one


def broken_latest(store: Path, name: str, problem: str, version: str | None = None) -> BrokenLatestError:
    return BrokenLatestError(
        f"feature set `{name}` in `{store}` has no servable live version: its LATEST {problem}. Run "
        "`aefeatures run --force JOB.toml` to publish a fresh version and point LATEST at it.", f"LATEST {problem}",
        version)


def linked_store_path(link: Path, target: str) -> StoreError:
    return StoreError(
        f"`{link}` is a symbolic link (to `{target}`): aefeatures writes and deletes inside a feature set's folders "
        "and follows no link there, so that a link never makes it change files elsewhere. Replace the link with "
        "what it points to (move it in), or point `job.store` at the real location.")


def not_a_folder(path: Path) -> StoreError:
    return StoreError(f"`{path}` is a file where the store keeps a folder: move it away (aefeatures recreates the "
                      "folder), or point `job.store` elsewhere.")


class StorageError(AEFeaturesError, OSError):
    """A write the file system refused: full, over a quota or the file size limit, read-only,
    not permitted, or a path that cannot be a file (``errno`` says which, :data:`STORAGE_ERRNOS`).
    Exit code 1 when the machine is short of space or failing, 2 when the path or its file system
    cannot be written (the setup). Nothing half-written is left: writes go to staging and
    temporary files first, so ``consequence`` says what did not happen."""

    def __init__(self, path: Path | str | None, code: int, consequence: str, verb: str = "writing"):
        fix, self.exit_code = STORAGE_ERRNOS[code]
        where = f" {verb} `{path}`" if path else ""
        super().__init__(f"{os.strerror(code)}{where}: {fix}; {consequence}.")
        self.path, self.errno, self.strerror = path, code, os.strerror(code)


_FULL = ("free space on that file system (or raise the quota) and run again", EXIT_FAILURE)
_UNWRITABLE = ("point the job's store or --output at a place this user can write", EXIT_BAD_INPUT)
STORAGE_ERRNOS: dict[int, tuple[str, int]] = {  # errno → (what to do, exit code)
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: ("the file would pass the file size limit (`ulimit -f`) or the file system's: raise it or "
                  "write elsewhere", EXIT_FAILURE),
    errno.EIO: ("the device reported an I/O error: check it and run again", EXIT_FAILURE),
    errno.EROFS: ("the file system is read-only: point the job's store or --output at a writable place",
                  EXIT_BAD_INPUT),
    errno.EACCES: _UNWRITABLE,
    errno.EPERM: _UNWRITABLE,
    errno.ENOTDIR: ("a part of that path is a file, not a folder: fix the path", EXIT_BAD_INPUT),
    errno.EISDIR: ("that path is a folder: name a file", EXIT_BAD_INPUT),
    errno.ENOENT: ("its folder does not exist: create it or fix the path", EXIT_BAD_INPUT),
    errno.ENAMETOOLONG: ("the name is too long for the file system: shorten it", EXIT_BAD_INPUT),
}
# Errnos that mean the machine's storage refused a write wherever they come from; the others in
# STORAGE_ERRNOS (a missing folder, a permission) count only where a known path is written.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
# ... or where an OSError names the path it could not create or open (never a missing file: that
# may be a bug reading the store, whose traceback must show).
PATH_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG})


def storage_errno(exc: BaseException, codes: frozenset[int] | None = None) -> int | None:
    """The errno of a storage failure behind ``exc`` (itself, its cause or context): an ``OSError``'s
    ``errno``, or the "os error N" / "[Errno N]" that Arrow and Polars put in their messages. Only
    errnos in ``codes`` (default :data:`DISK_ERRNOS`) count; None when there is none."""
    codes = DISK_ERRNOS if codes is None else codes
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return exc.errno
        for found in re.findall(r"(?:os error|errno)\s*(\d+)", str(exc), flags=re.IGNORECASE):
            if int(found) in codes:
                return int(found)
        exc = exc.__cause__ or exc.__context__
    return None


def broken_live_version(store: Path, name: str, version: str | None, reason: str, job: str) -> StoreError:
    named = f" `{version}`" if version else ""
    return StoreError(f"feature set `{name}` in `{store}`: its live version{named} (LATEST) is missing or "
                      f"damaged: {reason}. Run `aefeatures run --force {job}` to build a new version "
                      "and point LATEST at it.")


def newer_manifest(path: Path | str, found: int, supported: int) -> BadInputError:
    return BadInputError(f"manifest `{path}` has schema_version {found}, newer than the {supported} this "
                         "aefeatures reads: it was written by a newer release. Upgrade aefeatures to read it.")


def bad_metric(metric: object) -> BadInputError:
    return BadInputError(f"`metric` must be \"ip\" or \"cosine\", got {metric!r}.")


MAX_K = 1_000_000  # results one lookup may ask for (the HTTP service's own default cap is lower: --max-k)


def bad_k(k: object) -> BadInputError:
    return BadInputError(f"`k` must be an integer from 1 to {MAX_K:,}, got {brief(k)}.")


def no_anomaly_scores(name: str, version: str) -> BadInputError:
    return BadInputError(f"version {version} of `{name}` has no anomaly scores (it was written by an "
                         "older aefeatures); run the job again to add them.")


def cannot_listen(host: str, port: int, reason: str) -> BadInputError:
    return BadInputError(f"cannot listen on {host}:{port} ({reason}). "
                         "Use another port (0 picks a free one) or host.")


def ids_file_unreadable(path: Path, what: str, reason: object) -> BadInputError:
    return BadInputError(f"{what} file `{path}` is not a readable Parquet file ({reason}).")


def ids_file_without_ids(path: Path, what: str, key: str, columns: Sequence[str]) -> BadInputError:
    return BadInputError(f"{what} file `{path}` has no `{key}` column; found {list(columns)}. "
                         f"Name the column `{key}` or keep a single column.")


def ids_file_not_utf8(path: Path, what: str, exc: UnicodeDecodeError) -> BadInputError:
    return BadInputError(f"{what} file `{path}` is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                         "Save it as UTF-8, or pass a Parquet file.")


def sql_failed(reason: str) -> BadInputError:
    return BadInputError(f"SQL failed: {reason}")


def job_file_missing(path: Path) -> ConfigError:
    return ConfigError(path, "file not found. Pass the path of an existing job file.")


def job_file_unreadable(path: Path, reason: object) -> ConfigError:
    return ConfigError(path, f"cannot be read ({reason}).")


def job_file_not_toml(path: Path, reason: object) -> ConfigError:
    return ConfigError(path, f"is not valid TOML ({reason}). Fix the syntax.")


def missing_section(path: Path, section: str) -> ConfigError:
    return ConfigError(path, f"missing section `[{section}]`. Add it (see jobs/example.toml).")


def missing_key(path: Path, key: str, section: str) -> ConfigError:
    return ConfigError(path, f"missing key `{key}`. Add it to the `[{section}]` section.")


class InvalidIdError(BadInputError):
    """A value that cannot be an id of the feature set's id type (exit code 2, HTTP 422)."""

    def __init__(self, kind: str, value: object, expected: str):
        self.kind, self.value = kind, value
        super().__init__(
            f"{brief(value)} is not a valid {kind} id: {kind} ids of this feature set are {expected}. "
            f"Pass the {kind} id as the input spelled it."
        )


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters with its length said: an error line stays one
    readable line whatever a client sent."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(shown):,} characters)"


class NotFoundError(AEFeaturesError, KeyError):
    """A lookup named a user or item id the live version does not know (exit code 5)."""

    exit_code = EXIT_NOT_FOUND

    def __init__(self, kind: str, ids: Sequence[object], name: str, version: str):
        self.kind, self.ids, self.name, self.version = kind, list(ids), name, version
        label = f"{kind} `{brief(self.ids[0]).strip(chr(39))}`" if len(self.ids) == 1 else \
            f"{kind}s {_show([brief(i).strip(chr(39)) for i in self.ids])}"
        super().__init__(
            f"{label} not found in feature set `{name}` (version {version}). "
            f"Only {kind}s present in the input of that version have embeddings"
            + ("; for a user new since then, recommend from their history now (`recommend --history`, "
               "`recommend_history`, HTTP `{\"history\": [...]}`), or embed them with `aefeatures embed JOB.toml` "
               "(the live model, no training)." if kind == "user" else
               "; fold an item new since then into the live model with `aefeatures embed JOB.toml` (no training).")
        )


class GateRefusedError(AEFeaturesError):
    """The quality gate refused to publish a version (exit code 3); LATEST did not move."""

    exit_code = EXIT_GATE_REFUSED

    def __init__(self, name: str, version: str, reasons: Sequence[str], kept: Path, live: str | None):
        self.name, self.version, self.reasons, self.kept, self.live = name, version, list(reasons), kept, live
        stays = f"LATEST stays on {live}" if live else "nothing is live"
        super().__init__(
            f"quality gate refused version {version} of `{name}`: {'; '.join(reasons)}. "
            f"The version is kept in `{kept}` for inspection and {stays}. "
            "Check the input and model settings, or relax `[gate]` in the job file."
        )


class LockHeldError(AEFeaturesError):
    """Another run of the same feature set is in progress (exit code 4)."""

    exit_code = EXIT_LOCKED

    def __init__(self, path: str, holder: dict):
        self.path, self.holder = path, holder
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
               if holder else "another process")
        super().__init__(
            f"another run holds the lock `{path}` ({who}). Wait for it to finish; "
            "if that process is gone the lock frees itself."
        )


class Interrupted(AEFeaturesError):
    """The run was stopped by a signal (SIGINT/SIGTERM); exit code 128 + the signal number."""

    def __init__(self, signal_name: str, signal_number: int):
        self.exit_code = 128 + signal_number
        super().__init__(f"stopped by {signal_name}; nothing was published and the live version is unchanged.")


def name_differs_only_in_case(store: Path, name: str, other: str) -> StoreError:
    return StoreError(f"feature set `{name}` differs only in case from feature set `{other}` already in `{store}`: "
                      "SQL names ignore case (and so do some file systems), so one would answer for the other. "
                      "Choose another `job.name` or another `job.store`.")


def store_is_a_feature_set(store: Path, name: str) -> StoreError:
    return StoreError(
        f"`job.store` = `{store}` is the folder of a feature set, not a store (it holds LATEST or "
        f"versions/). Set `job.store` to its parent, `{store.parent}`, to run `{name}` there."
    )


def bad_attributes(path: str, problem: str, fix: str) -> BadInputError:
    """The job's item attributes (`[items]`) cannot be used; nothing is published."""
    return BadInputError(f"item attributes `{path}` {problem}. {fix}")


class FilterError(BadInputError):
    """A lookup filter that cannot be used: not one expression, a column the attributes lack, a
    function or construct filters may not use, a type mismatch, or over a limit. HTTP 422, exit 2."""

    def __init__(self, problem: str):
        super().__init__(f"invalid filter: {problem}")
