"""`aefeatures run`: read → matrix → train (+ validate) → embed → write → index → gate → publish.

Nothing is visible in the store until every file of the version is written; any failure
discards the staged version and leaves LATEST where it was. A version the quality gate refuses
is kept in `refused/` for inspection and never goes live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import polars as pl

from aefeatures import __version__, errors, schema
from aefeatures.config import JobConfig
from aefeatures.data.attributes import align_attributes, read_attributes
from aefeatures.data.matrix import InteractionMatrix, build_matrix
from aefeatures.data.read import Interactions, input_files, read_interactions
from aefeatures.jobs.lock import feature_set_lock
from aefeatures.quality import gate, report
from aefeatures.quality.anomaly import anomaly_scores
from aefeatures.quality.evaluate import (
    KS,
    RankingTotals,
    Split,
    metrics_of_totals,
    popularity_ranking,
    ranking_totals,
    scaled_embedding_totals,
    split_folds,
    split_items,
    split_users,
    without_hidden,
)
from aefeatures.quality.reference import ease_reference
from aefeatures.schema import KEY_METRIC
from aefeatures.store import layout, publish, runlog, tables
from aefeatures.store.index import build_index, item_rows, save_index, user_queries

if TYPE_CHECKING:  # the training modules import torch: loaded only once a run trains
    from aefeatures.model import distributed
    from aefeatures.model.align import LiveVectors
    from aefeatures.model.autoencoder import Autoencoder
    from aefeatures.model.embed import Embeddings
    from aefeatures.model.result import TrainResult

log = logging.getLogger(__name__)

RECALL_SAMPLE = 1000  # user queries used to measure an approximate index against exact search
REPORT = "report.html"


@dataclass
class RunResult:
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "published"  # or "up_to_date": the live version already has this input and config


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)
    log.info("stage %s done in %.2fs", stage, timings[stage])


def run_job(cfg: JobConfig, *, force: bool = False, progress: bool | None = None) -> RunResult:
    """Run a job as a scheduler would: locked, idempotent, recorded in the run log.

    Holding the feature set's lock it cleans what killed runs left, then compares the input's
    fingerprint (file paths, sizes, modification times) and the resolved config with the live
    version's: when they match nothing is done (``status == "up_to_date"``) unless ``force``.
    Otherwise it builds and publishes a version and applies `[retention]`.

    Under torchrun (``torchrun --nproc_per_node=N -m aefeatures run JOB.toml``) every rank
    reads, trains on and writes its share of users (:mod:`aefeatures.model.distributed`); rank 0 alone
    takes the lock and publishes, and the other ranks end with ``SystemExit(0)`` once their
    part is written.

    torch is imported only once the run trains: a config error, a locked feature set or an
    "up to date" answer comes without its import time.

    Raises
    ------
    BadInputError, GateRefusedError, LockHeldError, Interrupted
        Each recorded in the run log with its exit code.
    """
    if not _launched_by_torchrun():
        return scheduled(cfg, "run", "fingerprint",
                         lambda fingerprint, live: _build_and_publish(cfg, fingerprint, progress, None), force=force)
    from aefeatures.model import distributed

    with distributed.process_group(cfg.model.device) as group:
        signal = distributed.TrainSignal(group)
        if group is not None and not group.is_leader:
            _follow(cfg, signal, group)
            raise SystemExit(0)  # rank 0 publishes and reports

        def work(fingerprint: str, live: dict[str, Any] | None) -> RunResult:
            signal.start()
            return _build_and_publish(cfg, fingerprint, progress, group)

        try:
            return scheduled(cfg, "run", "fingerprint", work, force=force)
        finally:
            signal.cancel()  # up to date, locked or failed before training: the other ranks stop too


def _launched_by_torchrun() -> bool:
    """:func:`aefeatures.model.distributed.launched_by_torchrun`, without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _follow(cfg: JobConfig, signal: "distributed.TrainSignal", group: distributed.Group) -> None:
    """A rank other than 0: if rank 0 says the run trains, read, train, embed and write this
    rank's share of users into the version rank 0 stages; then leave the group."""
    from aefeatures.model import distributed

    if signal.wait():
        built = _build_shard(cfg, False, group)
        staging, version, created = group.from_leader(None)
        _write_shard(built, Path(staging), cfg.job.name, version, created, group)
    distributed.leave()


@dataclass
class _Built:
    """What one process made of the input: its users' matrix (all of them, or its shard),
    the trained model with its evaluation, and the embeddings."""

    interactions: Interactions
    matrix: InteractionMatrix
    trained: TrainResult
    evaluation: dict[str, Any] | None
    emb: Embeddings
    timings: dict[str, float]
    evaluation_skipped: str | None = None  # why there is no validation (and so no metric gate)
    live: LiveVectors | None = None  # the live version's vectors (rank 0), when there is one
    alignment: dict[str, Any] | None = None  # the manifest's `alignment` record


def _build_shard(cfg: JobConfig, progress: bool | None, group: distributed.Group | None) -> _Built:
    """Read, build the matrix, train and evaluate, embed: the whole input in one process, or
    under torchrun this rank's users (with every rank's items, so all share one model)."""
    from aefeatures.model.align import LiveVectors, align_model, rotate
    from aefeatures.model.embed import embed

    timings: dict[str, float] = {}
    with _timed(timings, "read"):
        interactions = read_interactions(cfg.input, shard=group and (group.rank, group.world_size))
    with _timed(timings, "matrix"):
        matrix = build_matrix(interactions, binarize=cfg.input.binarize,
                              weight_transform=cfg.input.weight_transform, item_ids=_all_items(interactions, group))
    with _timed(timings, "train"):
        trained, evaluation, skipped = _train_and_evaluate(matrix, cfg, progress, group)
    live, alignment = None, None
    with _timed(timings, "align"):
        live_manifest = _live_manifest(cfg.job.store, cfg.job.name) if group is None or group.is_leader else None
        if live_manifest is not None:
            live = LiveVectors.read(layout.version_dir(cfg.job.store, cfg.job.name, live_manifest["version"]))
            alignment = align_model(trained.model, matrix, live, seed=cfg.model.seed) if cfg.publish.align else \
                {"to_version": live.version, "aligned": False, "reason": "`publish.align` is off"}
        if group is not None:  # every rank folds rank 0's rotation into its copy of the model
            alignment = group.from_leader(alignment)
            if alignment and alignment["aligned"] and not group.is_leader:
                rotate(trained.model, np.asarray(alignment["rotation"]))
    with _timed(timings, "embed"):
        emb = embed(trained.model, matrix)
    return _Built(interactions, matrix, trained, evaluation, emb, timings, skipped, live, alignment)


def _all_items(interactions: Interactions, group: distributed.Group | None) -> pl.Series | None:
    """Under torchrun the sorted union of every rank's items; None (the input's own) otherwise."""
    if group is None:
        return None
    return pl.concat(group.gather(interactions.pairs.item_ids)).unique().sort()


def _write_shard(built: _Built, staging: Path, name: str, version: str, created: datetime,
                 group: distributed.Group) -> dict[str, int]:
    """Write this rank's users and interactions as part files of the staged version (rank 0 also
    writes the items); returns every rank's counts, in rank order, once all parts are written.
    Anomaly scores, item popularity and last-seen times are computed over all ranks' users."""
    matrix, emb = built.matrix, built.emb
    errors_and_lengths = group.gather((emb.reconstruction_error, matrix.row_lengths()))
    sizes = [len(e) for e, _ in errors_and_lengths]
    first_user_row = sum(sizes[: group.rank])
    anomaly = anomaly_scores(np.concatenate([e for e, _ in errors_and_lengths]),
                             np.concatenate([n for _, n in errors_and_lengths]))
    last_seen = group.reduce_array(matrix.item_last_seen.view(np.int64), "max").view("datetime64[us]")
    shard = tables.Shard(group.rank, group.world_size, first_user_row,
                        anomaly[first_user_row:first_user_row + matrix.shape[0]],
                        group.reduce_array(matrix.item_popularity().astype(np.int64)), last_seen)
    counts = tables.write_tables(staging, matrix, emb, name=name, version=version, created=created, shard=shard)
    input_counts = {"rows_read": built.interactions.n_rows_read, "rows_kept": built.interactions.n_rows_kept}
    return group.gather({**counts, **input_counts})


def scheduled(cfg: JobConfig, command: str, key: str,
              work: Callable[[str, dict[str, Any] | None], RunResult], *, force: bool,
              fingerprint: str | None = None) -> RunResult:
    """Run ``work(fingerprint, live manifest)`` under the feature set's lock, unless the live
    manifest's ``key`` already equals this input's fingerprint (``fingerprint``, default
    :func:`input_fingerprint`); record the run in the run log."""
    root, name = cfg.job.store, cfg.job.name
    folder = root / name
    entry: dict[str, Any] = {"started": _now(), "command": command, "job": str(cfg.source),
                             "pid": os.getpid(), "force": force}
    try:
        _check_store(root, name)
        with feature_set_lock(folder):
            removed = publish.clean_leftovers(root, name)
            if removed:
                log.warning("removed leftovers of interrupted runs in %s: %s", folder, ", ".join(removed))
                entry["removed_leftovers"] = removed
                # a version retention had taken out of sight is gone now: pinning it says so
                finished = [f"{layout.VERSIONS}/{r.split('-', 1)[1]}" for r in removed
                            if r.startswith(f"{layout.TRASH}/{layout.VERSIONS}-")]
                if finished:
                    entry["removed_by_retention"] = finished
                _refresh_sql_catalog(root)  # a killed run may have left it naming what is gone now
            fingerprint = fingerprint or input_fingerprint(cfg)
            live = _checked_live(cfg, force)
            if live and live.get(key) == fingerprint and not force:
                result = RunResult(name, live["version"], layout.version_dir(root, name, live["version"]),
                                   live, status="up_to_date")
            else:
                result = work(fingerprint, live)
                _retain(cfg, entry)
        entry.update(status=result.status, exit_code=0, version=result.version,
                     counts=result.manifest["counts"], timings=result.timings)
        return result
    except errors.AEFeaturesError as exc:
        entry.update(status=_status_of(exc), exit_code=exc.exit_code, error=str(exc),
                     version=getattr(exc, "version", None))
        raise
    except BaseException as exc:
        storage = _storage_error(exc, folder)
        entry.update(status="failed", exit_code=storage.exit_code if storage else 1,
                     error=str(storage) if storage else f"{type(exc).__name__}: {exc}")
        if storage is not None:
            raise storage from None
        raise
    finally:
        entry["ended"] = _now()
        # a store that cannot be created or written has been reported already, and so has a linked log
        if folder.is_dir() and os.access(folder, os.W_OK) and not (folder / runlog.RUN_LOG).is_symlink():
            runlog.append_run(folder, entry)


def _retain(cfg: JobConfig, entry: dict[str, Any]) -> None:
    """Apply `[retention]` after a publish: versions out of sight first (renamed into `.trash/`),
    then the SQL catalog refreshed, then their files deleted. The version is published whatever
    happens here: a failure is a warning in the log and in the run log entry (``warnings``), and
    the next run finishes the job (:func:`aefeatures.store.publish.clean_leftovers`)."""
    root, name = cfg.job.store, cfg.job.name
    problems: list[str] = []
    try:
        entry["removed_by_retention"] = entry.get("removed_by_retention", []) + publish.apply_retention(
            root, name, cfg.retention.keep, problems=problems)
        if entry["removed_by_retention"]:
            _refresh_sql_catalog(root)  # its all-versions views must not name deleted files
        publish.empty_trash(root, name)
    except Exception as exc:  # noqa: BLE001 — housekeeping after the publish: never undoes it
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"retention did not finish ({why}); the next run finishes it")
        log.warning("%s", problems[-1])
    if problems:
        entry["warnings"] = problems


def _storage_error(exc: BaseException, folder: Path) -> errors.StorageError | None:
    """``exc`` as a :class:`StorageError` (one line, naming the file or the feature set's folder)
    when the file system refused a write (full, read-only, file too large), else None."""
    code = errors.storage_errno(exc) if isinstance(exc, Exception) else None
    if code is None:
        return None
    path = getattr(exc, "filename", None) or folder
    return errors.StorageError(path, code, "nothing was published or replaced and the live version is unchanged")


def input_fingerprint(cfg: JobConfig, attribute_files: list[dict[str, Any]] | None = None) -> str:
    """sha256 of the input files' paths, sizes and modification times and the resolved config
    (less `model.threads`, which changes how fast a run is, not what it makes), and the attribute
    files' (``attribute_files`` standing in for the current ones if given)."""
    files = [vars(f) for f in input_files(cfg.input.path)]
    if cfg.items.path is not None:  # fresh attributes make a new version too
        current = attribute_files if attribute_files is not None else [vars(f) for f in _attribute_files(cfg)]
        files += [{"attributes": f} for f in current]
    config = cfg.to_dict()
    config["model"] = {k: v for k, v in config["model"].items() if k != "threads"}
    blob = json.dumps({"files": files, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _attribute_files(cfg: JobConfig):
    try:
        return input_files(str(cfg.items.path))
    except errors.InputNotFoundError:
        return ()  # reported with the right wording when the run reads them


def _status_of(exc: errors.AEFeaturesError) -> str:
    return {errors.GateRefusedError: "refused", errors.LockHeldError: "locked", errors.StorageError: "failed",
            errors.Interrupted: "interrupted"}.get(type(exc), "bad_input" if exc.exit_code == 2 else "failed")


def _check_store(root: Path, name: str) -> None:
    if (root / layout.LATEST).is_file() or (root / layout.VERSIONS).is_dir():
        raise errors.store_is_a_feature_set(root, name)
    twins = [other for other in layout.known_feature_sets(root) if other.lower() == name.lower() and other != name]
    if twins:
        raise errors.name_differs_only_in_case(root, name, twins[0])
    publish.check_no_links(root, name)  # a link there would point the run's deletions elsewhere
    try:
        (root / name).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root / name, prefix=".probe-")
        probe.close()
    except OSError as exc:
        raise errors.store_not_writable(root, exc.strerror) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _build_and_publish(cfg: JobConfig, fingerprint: str, progress: bool | None,
                       group: distributed.Group | None) -> RunResult:
    """Build a version from scratch and publish it (the caller holds the lock). Under torchrun
    every rank builds and writes its share of users; rank 0 joins the parts and publishes."""
    from aefeatures.model.align import measure_drift
    from aefeatures.model.autoencoder import save_model

    name, root = cfg.job.name, cfg.job.store
    attributes = read_attributes(cfg.items) if cfg.items.path is not None else None  # refused before training
    made = _build_shard(cfg, progress, group)
    interactions, matrix, emb, timings = made.interactions, made.matrix, made.emb, made.timings
    # The version's values exist from now on: its event_timestamp (point-in-time), never before
    # training ended (schema 2).
    created = datetime.now(timezone.utc)

    previous = _live_manifest(root, name)
    version = layout.new_version_id(root, name, created)
    with publish.staged_version(root, name, version) as staging:
        with _timed(timings, "write"):
            if group is None:
                counts = tables.write_tables(staging, matrix, emb, name=name, version=version, created=created)
                read_counts = {"rows_read": interactions.n_rows_read, "rows_kept": interactions.n_rows_kept}
            else:
                group.from_leader((str(staging), version, created))
                per_rank = _write_shard(made, staging, name, version, created, group)
                tables.join_parts(staging, group.world_size)
                total = {key: sum(c[key] for c in per_rank) for key in per_rank[0]}
                counts = {"users": total["users"], "items": matrix.shape[1], "interactions": total["interactions"]}
                read_counts = {key: total[key] for key in ("rows_read", "rows_kept")}
            save_model(made.trained.model, staging / layout.MODEL_DIR)
            part = made.trained.model.neighbours
            neighbours = None if part is None else tables.write_neighbours(
                staging, part, matrix.item_ids, name=name, version=version, dim=emb.dim)
            attribute_summary = None
            if attributes is not None:
                aligned, attribute_summary = align_attributes(attributes, matrix.item_ids, str(cfg.items.path))
                tables.write_attributes(staging, aligned)
        with _timed(timings, "index"):
            rng = np.random.default_rng(cfg.model.seed)
            sample = rng.choice(matrix.shape[0], min(RECALL_SAMPLE, matrix.shape[0]), replace=False)
            built = build_index(item_rows(emb.item_vectors, emb.item_bias), cfg.index.kind,
                                sample_queries=user_queries(emb.user_vectors[sample]),
                                target_recall=cfg.index.min_recall)
            save_index(built.index, staging / layout.INDEX)
        with _timed(timings, "check"):
            publish.check_finite(staging)  # a NaN embedding, bias or score is never published
        drift = None
        if made.live is not None:
            with _timed(timings, "drift"):
                drift = measure_drift(emb, matrix, anomaly_scores(emb.reconstruction_error, matrix.row_lengths()),
                                      made.live, seed=cfg.model.seed) if group is None else \
                    {"against": made.live.version, "reason": "not measured under torchrun"}
        verdict = gate.check(cfg.gate, made.evaluation, previous, index_recall=built.recall_at_10,
                             min_recall=cfg.index.min_recall, skipped=made.evaluation_skipped, drift=drift)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "aefeatures_version": __version__,
            "feature_set": name,
            "version": version,
            "created_at": created.isoformat(),
            "valid_from": created.isoformat(),  # every row's event_timestamp
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "input": {"files": [vars(f) for f in interactions.files], **read_counts, "pairs": counts["interactions"],
                      "timestamps": interactions.timestamps},
            "counts": counts,
            "dim": emb.dim,
            "item_neighbours": neighbours,  # a dlae's sparse item-item part (item_neighbours.parquet), or None
            "id_types": {"user": str(matrix.user_ids.dtype), "item": str(matrix.item_ids.dtype)},
            "training": _training_summary(made.trained),
            "evaluation": made.evaluation,
            "evaluation_skipped": made.evaluation_skipped,
            "gate": verdict.to_dict(),
            "alignment": made.alignment,  # None for a feature set's first version
            "drift": drift,
            "index": {"kind": cfg.index.kind, "factory": built.factory, "recall_at_10": built.recall_at_10,
                      "search": built.search},
            "timings": timings,
        }
        if attribute_summary is not None:
            manifest["attributes"] = {"files": [vars(f) for f in input_files(str(cfg.items.path))],
                                      **attribute_summary}
        with _timed(timings, "publish"):
            publish.write_manifest(staging, manifest)
            publish.atomic_write(staging / REPORT, report.render(manifest, previous))
            if not verdict.passed:
                kept = publish.refuse(root, name, staging)
                raise errors.GateRefusedError(name, version, verdict.reasons, kept,
                                              previous and previous["version"])
            final = publish.publish(root, name, staging)
            _refresh_sql_catalog(root)
    log.info("published %s/%s", name, version)
    return RunResult(name, version, final, manifest, timings)


def _train_and_evaluate(matrix: InteractionMatrix, cfg: JobConfig, progress: bool | None,
                        group: distributed.Group | None = None
                        ) -> tuple[TrainResult, dict[str, Any] | None, str | None]:
    """Train with validation (if evaluation is on: `evaluation.protocol`'s split, module
    :mod:`aefeatures.quality.evaluate`) and early stopping, then (with `evaluation.refit`) train
    again on every user, every item, for the chosen budget.

    Validation chooses the epoch (and a dlae's dropout); the manifest keeps the metrics that
    chose it. With refit the published model is trained on all users for that many epochs;
    without it, it is the validated model, which never saw the hidden items (nor, with held-out
    users, the validation users: they get their embeddings like any new user, from their full
    interaction vector). Under torchrun each rank draws its validation users from its own users
    and the metrics are those of all ranks' validation users together. `model.max_minutes`
    bounds both phases together. The third value says why there is no validation (None when
    there is).
    """
    from aefeatures.model.train import train

    ev = cfg.evaluation
    world = group.world_size if group else 1
    deadline = time.perf_counter() + 60.0 * cfg.model.max_minutes if cfg.model.max_minutes > 0 else None
    max_users = -(-ev.max_valid_users // world)
    if ev.protocol == "held-out items" and ev.valid_share > 0:
        split = split_items(matrix.indptr, matrix.indices, max_users=max_users, holdout=ev.holdout, seed=cfg.model.seed)
    else:
        split = split_users(matrix.indptr, matrix.indices, share=ev.valid_share, max_users=max_users,
                            holdout=ev.holdout, seed=cfg.model.seed,
                            min_users=-(-ev.min_valid_users // world) if ev.refit else 0)
    n_valid = len(split.valid_rows) if group is None else int(group.reduce_array(np.array([len(split.valid_rows)]))[0])
    if n_valid == 0:
        why = _why_no_validation(matrix, cfg, group)
        if ev.valid_share > 0:
            log.warning("%s; training without evaluation, so the quality gate's metric checks are skipped", why)
        return train(matrix, cfg.model, progress=progress, deadline=deadline), None, why

    folds = _folds(matrix, cfg, group)
    split = folds[0] if folds else split
    items_held_out = ev.protocol == "held-out items"  # every user fits, on what they show
    fitted = dataclasses.replace(matrix, **without_hidden(matrix.csr, split)._asdict()) if items_held_out else matrix
    validate = _Validator(split, group)
    trained = train(fitted, cfg.model, rows=split.train_rows, validate=validate, progress=progress,
                    deadline=deadline, folds=[(f.train_rows, _Validator(f, group)) for f in folds[1:]],
                    keep=split.valid_rows if items_held_out else None)
    final = validate(trained.model)  # the restored best weights (or untrained, with 0 epochs)
    trained.model.eval()
    evaluation = {
        "protocol": ev.protocol,
        "valid_users": n_valid,
        "holdout": ev.holdout,
        "model": final,
        "popularity": _popularity(fitted, split, group),
        "reference": _reference(fitted, split, ev.reference_max_items, group),
        **({"folds": _fold_summary(trained, len(folds))} if folds else {}),
    }
    if ev.refit:
        users = matrix.shape[0] if group is None else int(group.reduce_array(np.array([matrix.shape[0]]))[0])
        trained.refit = _refit(matrix, cfg, trained, progress, deadline, users)
    return trained, evaluation, None


class _Validator:
    """``_Validator(split, group)(model)``: the model's validation metrics on ``split`` (every
    rank's users together under torchrun); ``.scaled(model, scales)``: those of the model with its
    item vectors scaled per item by each of ``scales``, its user vectors and their products
    computed once (a dlae's popularity-correction walk)."""

    def __init__(self, split: Split, group: distributed.Group | None):
        self.split, self.group = split, group

    def __call__(self, model: Autoencoder) -> dict[str, float]:
        return self.scaled(model, [None])[0]

    def scaled(self, model: Autoencoder, scales: list[np.ndarray | None]) -> list[dict[str, float]]:
        from aefeatures.model.embed import embeddings

        vectors = embeddings(model, self.split.fold_in)
        rows = self.split.fold_in
        extra = None if model.neighbours is None else model.neighbours.row_scores(rows.indptr, rows.indices, rows.values)
        totals = scaled_embedding_totals(vectors, model.decoder.weight.detach().float().cpu().numpy(),
                                         model.decoder.bias.detach().float().cpu().numpy(), self.split, scales,
                                         extra=extra)
        model.train()
        return [_rounded(metrics_of_totals(_summed(t, self.group))) for t in totals]


def _folds(matrix: InteractionMatrix, cfg: JobConfig, group: distributed.Group | None) -> list[Split]:
    """The k-fold splits (k = `evaluation.folds`) a dlae's search chooses on, or [] for the one
    split: one process only (under torchrun each rank keeps its own split); other kinds, which
    would train k times, keep the one split (the run says so)."""
    k = cfg.evaluation.folds
    if k < 2:
        return []
    if cfg.model.kind != "dlae" or group is not None:
        log.warning("evaluation.folds = %d applies to a dlae in one process; this run validates on one split", k)
        return []
    eligible = int((matrix.row_lengths() >= 2).sum())
    if eligible < 2 * k:
        log.warning("evaluation.folds = %d needs %d users with 2 items, there are %d: one split", k, 2 * k, eligible)
        return []
    return split_folds(matrix.indptr, matrix.indices, folds=k, holdout=cfg.evaluation.holdout, seed=cfg.model.seed)


def _fold_summary(trained: TrainResult, k: int) -> dict[str, Any]:
    """The manifest's `evaluation.folds`: each fold's NDCG@100 at the chosen setting, their mean
    and spread, and how sure the choice is: the folds whose own best fit is the chosen one."""
    fits = [h for h in trained.history if "folds" in h]
    if not fits or trained.best_epoch == 0:
        return {"k": k}
    best = trained.history[trained.best_epoch - 1]
    chosen = best["folds"]
    agree = sum(max(fits, key=lambda h: h["folds"][i]) is best for i in range(k))
    return {"k": k, KEY_METRIC: chosen, "mean": round(float(np.mean(chosen)), 5),
            "spread": round(float(np.ptp(chosen)), 5), "folds_choosing_it": agree}


def _refit(matrix: InteractionMatrix, cfg: JobConfig, validated: TrainResult, progress: bool | None,
           deadline: float | None, users: int) -> dict[str, Any]:
    """Train on every user for the validated budget (``validated.best_epoch`` epochs, with the
    hyperparameters validation chose) and put that model in ``validated``; returns the
    manifest's `training.refit` section (``users``: every rank's together). The same number of epochs, not steps: each user is
    seen as often as in the validated run. When the time budget ran out during validation, or
    runs out during the refit, the validated model is published instead and the section says so."""
    from aefeatures.model.train import train

    if validated.best_epoch == 0:
        return {"status": "skipped", "reason": "validation chose the untrained model"}
    if validated.stop_reason == "max_minutes":
        return {"status": "skipped", "reason": "model.max_minutes ran out during validation"}
    model_cfg = dataclasses.replace(cfg.model, **validated.chosen)
    refit = train(matrix, model_cfg, progress=progress, epochs=validated.best_epoch, deadline=deadline,
                  warm=validated.warm)
    section = {"users": users, "epochs": len(refit.history), "steps": refit.steps,
               "seconds": round(refit.seconds, 3), **({"chosen": validated.chosen} if validated.chosen else {})}
    if refit.stop_reason == "max_minutes":
        return {"status": "skipped", "reason": "model.max_minutes ran out during the refit; the validated model "
                "is published", **section}
    validated.model = refit.model
    return {"status": "published", **section}


def _reference(matrix: InteractionMatrix, split: Split, max_items: int,
               group: distributed.Group | None) -> dict[str, Any]:
    if group is not None:
        return {"method": "EASE", "skipped": "not computed under torchrun (each rank holds a share of the users)"}
    reference = ease_reference(matrix.csr, split, matrix.shape[1], max_size=max_items)
    if "skipped" in reference:
        log.info("EASE reference skipped: %s", reference["skipped"])
    else:
        log.info("EASE reference (λ=%g): %s %.4f in %.1fs", reference["lambda"], KEY_METRIC,
                 reference[KEY_METRIC], reference["seconds"])
    return reference


def _why_no_validation(matrix: InteractionMatrix, cfg: JobConfig, group: distributed.Group | None) -> str:
    """The real reason no user was held out for validation, in words."""
    ev = cfg.evaluation
    if ev.valid_share == 0:
        return "evaluation is off (`evaluation.valid_share` = 0)"
    eligible = np.array([int((matrix.row_lengths() >= 2).sum()), matrix.shape[0]])
    if group is not None:
        eligible = group.reduce_array(eligible)
    n_eligible, n_users = int(eligible[0]), int(eligible[1])
    if n_eligible == 0:
        return (f"no user has 2 or more items (all {n_users:,} have one), so no validation split is possible "
                "(a validation user needs one item shown and one hidden)")
    return (f"`evaluation.valid_share` = {ev.valid_share:g} of {n_users:,} users rounds to no validation user; "
            "raise it to evaluate")


def _popularity(matrix: InteractionMatrix, split: Split, group: distributed.Group | None) -> dict[str, float]:
    counts = np.bincount(matrix.csr.gather(split.train_rows)[1], minlength=matrix.shape[1])
    if group is not None:
        counts = group.reduce_array(counts.astype(np.int64))
    ranked = popularity_ranking(counts, split, max(KS))
    return _rounded(metrics_of_totals(_summed(ranking_totals(ranked, split.held_out, matrix.shape[1]), group)))


def _summed(totals: RankingTotals, group: distributed.Group | None) -> RankingTotals:
    """``totals`` over every rank's validation users (under torchrun)."""
    if group is None:
        return totals
    return RankingTotals(group.reduce_array(totals.users), group.reduce_array(totals.sums),
                         group.reduce_array(totals.covered, "max"))


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in metrics.items() if k != "users"}


def _training_summary(trained: TrainResult) -> dict[str, Any]:
    return {
        "device": trained.device,
        "threads": trained.threads,
        "epochs": len(trained.history),
        "best_epoch": trained.best_epoch,
        "best_step": trained.best_step,
        "max_epochs": trained.max_epochs,
        "stopped_early": trained.stopped_early,
        "stop_reason": trained.stop_reason,
        "steps": trained.steps,
        "seconds": round(trained.seconds, 3),
        **({"chosen": trained.chosen} if trained.chosen else {}),
        "refit": trained.refit,
        "epoch_losses": [round(x, 5) for x in trained.epoch_losses],
        "history": trained.history,
    }


def _live_manifest(root: Path, name: str) -> dict[str, Any] | None:
    """The live version's manifest; None when the feature set has none, or when its live
    version is missing or damaged (:func:`_checked_live` has refused that already, or been
    told with --force to build over it)."""
    if name not in layout.feature_sets(root):
        return None
    try:
        folder = layout.version_dir(root, name, layout.live_version(root, name))
        manifest = layout.read_manifest(folder)
        layout.check_files(folder, manifest)  # a damaged one is neither aligned to nor gated against
        return manifest
    except (errors.FeatureSetNotFoundError, errors.DamagedManifestError):
        return None


def _checked_live(cfg: JobConfig, force: bool) -> dict[str, Any] | None:
    """:func:`_live_manifest`, but a live version that is missing or damaged (a cleaner deleted
    its files, a file truncated or replaced, LATEST garbage, a link or naming nothing) refuses the
    run in one line saying how to get out, unless ``force``: then the run builds a new version
    and LATEST moves to it."""
    root, name = cfg.job.store, cfg.job.name
    if name not in layout.feature_sets(root):
        return None
    version = None
    try:
        version = layout.live_version(root, name)
        folder = layout.version_dir(root, name, version)
        manifest = layout.read_manifest(folder)
        layout.check_files(folder, manifest)  # its files are the ones published (sizes, hashes)
        return manifest
    except (errors.FeatureSetNotFoundError, errors.DamagedManifestError) as exc:
        if isinstance(exc, errors.BrokenLatestError):
            version, reason = exc.version, "its folder or manifest.json is gone" if exc.version else exc.problem
        elif isinstance(exc, errors.DamagedVersionError):
            reason = exc.problem
        else:
            reason = "its manifest cannot be read" if isinstance(exc, errors.DamagedManifestError) else \
                "its folder or manifest.json is gone"
        if not force:
            raise errors.broken_live_version(root, name, version, reason, str(cfg.source)) from None
        log.warning("the live version%s of %s is missing or damaged (%s): --force builds a new one and moves "
                    "LATEST to it", f" {version}" if version else "", name, reason)
        return None


def _refresh_sql_catalog(root: Path) -> None:
    # The catalog is a convenience for SQL users; a failure here must not undo the publish.
    from aefeatures.export.catalog import write_catalog

    try:
        write_catalog(root)
    except (OSError, errors.AEFeaturesError) as exc:  # e.g. another feature set's live version is broken
        log.warning("could not refresh the SQL catalog in %s: %s", root, exc)
