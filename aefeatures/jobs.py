"""`aefeatures run`: read → matrix → train → embed → write → index → publish, timed per stage.

Nothing is visible in the store until every file of the version is written; any failure
discards the staged version and leaves LATEST where it was.
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

from aefeatures import __version__, schema, store
from aefeatures.config import JobConfig
from aefeatures.embed import embed
from aefeatures.index import build_index, item_rows, save_index, user_queries
from aefeatures.matrix import build_matrix
from aefeatures.model import save_model
from aefeatures.read import read_interactions
from aefeatures.train import train

log = logging.getLogger(__name__)

RECALL_SAMPLE = 1000  # user queries used to measure an approximate index against exact search


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
    """Run a whole job and publish its version; return where it went and its manifest."""
    created = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    name, root = cfg.job.name, cfg.job.store

    with _timed(timings, "read"):
        interactions = read_interactions(cfg.input)
    with _timed(timings, "matrix"):
        matrix = build_matrix(interactions, binarize=cfg.input.binarize)
    with _timed(timings, "train"):
        trained = train(matrix, cfg.model, progress=progress)
    with _timed(timings, "embed"):
        emb = embed(trained.model, matrix)

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
            "training": {
                "device": trained.device,
                "epochs": len(trained.epoch_losses),
                "steps": trained.steps,
                "seconds": round(trained.seconds, 3),
                "epoch_losses": [round(x, 5) for x in trained.epoch_losses],
            },
            "index": {"kind": cfg.index.kind, "factory": built.factory, "recall_at_10": built.recall_at_10},
            "timings": timings,
        }
        with _timed(timings, "publish"):
            store.write_manifest(staging, manifest)
            final = store.publish(root, name, staging)
            _refresh_sql_catalog(root)
    except BaseException:
        store.discard(staging)
        raise
    log.info("published %s/%s", name, version)
    return RunResult(name, version, final, manifest, timings)


def _refresh_sql_catalog(root: Path) -> None:
    # The catalog is a convenience for SQL users; a failure here must not undo the publish.
    from aefeatures.sqlviews import write_catalog

    try:
        write_catalog(root)
    except OSError as exc:
        log.warning("could not refresh the SQL catalog in %s: %s", root, exc)
