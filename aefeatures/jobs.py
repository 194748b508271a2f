"""`aefeatures run`: read → matrix → train (+ validate) → embed → write → index → gate → publish.

Nothing is visible in the store until every file of the version is written; any failure
discards the staged version and leaves LATEST where it was. A version the quality gate refuses
is kept in `refused/` for inspection and never goes live.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from aefeatures import __version__, errors, gate, report, schema, store
from aefeatures.config import JobConfig
from aefeatures.embed import embed, encode
from aefeatures.evaluate import KS, Split, evaluate_embeddings, popularity_ranking, ranking_metrics, split_users
from aefeatures.index import build_index, item_rows, save_index, user_queries
from aefeatures.matrix import CSR, InteractionMatrix, build_matrix
from aefeatures.model import Autoencoder, save_model
from aefeatures.read import read_interactions
from aefeatures.train import TrainResult, train

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


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)
    log.info("stage %s done in %.2fs", stage, timings[stage])


def run_job(cfg: JobConfig, *, progress: bool | None = None) -> RunResult:
    """Run a whole job and publish its version; return where it went and its manifest.

    Raises
    ------
    BadInputError
        The input or config cannot be used (nothing is written).
    GateRefusedError
        The quality gate refused the version (kept in `refused/`, LATEST unchanged).
    """
    created = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    name, root = cfg.job.name, cfg.job.store

    with _timed(timings, "read"):
        interactions = read_interactions(cfg.input)
    with _timed(timings, "matrix"):
        matrix = build_matrix(interactions, binarize=cfg.input.binarize)
    with _timed(timings, "train"):
        trained, evaluation = _train_and_evaluate(matrix, cfg, progress)
    with _timed(timings, "embed"):
        emb = embed(trained.model, matrix)

    previous = _live_manifest(root, name)
    version = store.new_version_id(root, name, created)
    staging = store.start_version(root, name, version)
    try:
        with _timed(timings, "write"):
            counts = store.write_tables(staging, matrix, emb, name=name, version=version, created=created)
            save_model(trained.model, staging / store.MODEL_DIR)
        with _timed(timings, "index"):
            rng = np.random.default_rng(cfg.model.seed)
            sample = rng.choice(matrix.shape[0], min(RECALL_SAMPLE, matrix.shape[0]), replace=False)
            built = build_index(item_rows(emb.item_vectors, emb.item_bias), cfg.index.kind,
                                sample_queries=user_queries(emb.user_vectors[sample]))
            save_index(built.index, staging / store.INDEX)
        verdict = gate.check(cfg.gate, evaluation, previous)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "aefeatures_version": __version__,
            "feature_set": name,
            "version": version,
            "created_at": created.isoformat(),
            "config": cfg.to_dict(),
            "input": {
                "files": [vars(f) for f in interactions.files],
                "rows_read": interactions.n_rows_read,
                "rows_kept": interactions.n_rows_kept,
                "pairs": matrix.nnz,
            },
            "counts": counts,
            "dim": emb.dim,
            "id_types": {"user": str(matrix.user_ids.dtype), "item": str(matrix.item_ids.dtype)},
            "training": _training_summary(trained),
            "evaluation": evaluation,
            "gate": verdict.to_dict(),
            "index": {"kind": cfg.index.kind, "factory": built.factory, "recall_at_10": built.recall_at_10},
            "timings": timings,
        }
        with _timed(timings, "publish"):
            store.write_manifest(staging, manifest)
            store.atomic_write(staging / REPORT, report.render(manifest, previous))
            if not verdict.passed:
                kept = store.refuse(root, name, staging)
                raise errors.GateRefusedError(name, version, verdict.reasons, kept,
                                              previous and previous["version"])
            final = store.publish(root, name, staging)
            _refresh_sql_catalog(root)
    except errors.GateRefusedError:
        raise
    except BaseException:
        store.discard(staging)
        raise
    log.info("published %s/%s", name, version)
    return RunResult(name, version, final, manifest, timings)


def _train_and_evaluate(matrix: InteractionMatrix, cfg: JobConfig,
                        progress: bool | None) -> tuple[TrainResult, dict[str, Any] | None]:
    """Train with validation users held out (if evaluation is on) and early stopping.

    The published model is the best epoch's, trained without the validation users; they get
    their embeddings like any user the model never saw, from their full interaction vector.
    """
    ev = cfg.evaluation
    if ev.valid_share == 0:
        return train(matrix, cfg.model, progress=progress), None
    split = split_users(matrix.indptr, matrix.indices, share=ev.valid_share, max_users=ev.max_valid_users,
                        holdout=ev.holdout, seed=cfg.model.seed)
    if len(split.valid_rows) == 0:
        log.warning("too few users to hold any out for validation; training without evaluation")
        return train(matrix, cfg.model, progress=progress), None
    fold_in = CSR(split.fold_in[0], split.fold_in[1], np.ones(len(split.fold_in[1]), np.float32))

    def validate(model: Autoencoder) -> dict[str, float]:
        vectors, _ = encode(model, fold_in)
        metrics = evaluate_embeddings(vectors, model.decoder.weight.detach().cpu().numpy(),
                                      model.decoder.bias.detach().cpu().numpy(), split)
        model.train()
        return {k: round(v, 5) for k, v in metrics.items() if k != "users"}

    trained = train(matrix, cfg.model, rows=split.train_rows, validate=validate, progress=progress)
    final = validate(trained.model)  # the restored best weights (or untrained, with 0 epochs)
    trained.model.eval()
    return trained, {
        "protocol": "held-out users",
        "valid_users": int(len(split.valid_rows)),
        "holdout": ev.holdout,
        "model": final,
        "popularity": _popularity(matrix, split),
    }


def _popularity(matrix: InteractionMatrix, split: Split) -> dict[str, float]:
    train_items = matrix.csr.gather(split.train_rows)[1]
    ranked = popularity_ranking(train_items, matrix.shape[1], split, max(KS))
    metrics = ranking_metrics(ranked, split.held_out, matrix.shape[1])
    return {k: round(v, 5) for k, v in metrics.items() if k != "users"}


def _training_summary(trained: TrainResult) -> dict[str, Any]:
    return {
        "device": trained.device,
        "epochs": len(trained.history),
        "best_epoch": trained.best_epoch,
        "stopped_early": trained.stopped_early,
        "steps": trained.steps,
        "seconds": round(trained.seconds, 3),
        "epoch_losses": [round(x, 5) for x in trained.epoch_losses],
        "history": trained.history,
    }


def _live_manifest(root: Path, name: str) -> dict[str, Any] | None:
    if name not in store.feature_sets(root):
        return None
    return store.read_manifest(store.version_dir(root, name, store.live_version(root, name)))


def _refresh_sql_catalog(root: Path) -> None:
    # The catalog is a convenience for SQL users; a failure here must not undo the publish.
    from aefeatures.sqlviews import write_catalog

    try:
        write_catalog(root)
    except OSError as exc:
        log.warning("could not refresh the SQL catalog in %s: %s", root, exc)
