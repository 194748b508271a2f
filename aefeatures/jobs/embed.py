"""`aefeatures embed`: embed users from fresh interactions with the live model, no training.

The autoencoder embeds any user from their interaction vector, so new users, and users whose
history changed, get embeddings between nightly trainings. The new version reuses the live
version's model, item vectors and FAISS index; users.parquet and interactions.parquet come
from the new input. Items the model does not know are dropped; users left with no known item
are reported and get no embedding.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from aefeatures import __version__, errors, schema
from aefeatures.config import JobConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import Interactions, read_interactions
from aefeatures.jobs.run import REPORT, RunResult, _refresh_sql_catalog, _timed, scheduled
from aefeatures.quality import report
from aefeatures.schema import ITEM, USER
from aefeatures.store import layout, publish, tables
from aefeatures.store.encoder import ENCODER_DIR, write_encoder

log = logging.getLogger(__name__)


def embed_job(cfg: JobConfig, *, force: bool = False) -> RunResult:
    """Embed the users of ``cfg``'s input with the live model and publish a new version.

    Raises
    ------
    StoreError
        The feature set has no live version to embed with.
    """
    def work(fingerprint: str, live: dict[str, Any] | None) -> RunResult:
        if live is None:
            raise errors.no_feature_set(cfg.job.store, cfg.job.name, layout.feature_sets(cfg.job.store))
        return _embed_and_publish(cfg, fingerprint, live)

    return scheduled(cfg, "embed", "embed_fingerprint", work, force=force)


def _embed_and_publish(cfg: JobConfig, fingerprint: str, live: dict[str, Any]) -> RunResult:
    from aefeatures.model.autoencoder import encoder_arrays, load_model  # torch: only once there is work to do
    from aefeatures.model.embed import embed

    root, name = cfg.job.store, cfg.job.name
    source = layout.version_dir(root, name, live["version"])
    timings: dict[str, float] = {}
    with _timed(timings, "read"):
        interactions = read_interactions(cfg.input)
    with _timed(timings, "matrix"):
        known = pl.read_parquet(source / layout.ITEMS, columns=[ITEM]).get_column(ITEM)
        kept, unknown_only = _known_items_only(interactions, known)
        matrix = build_matrix(kept, binarize=cfg.input.binarize, weight_transform=cfg.input.weight_transform,
                              item_ids=known)
    with _timed(timings, "embed"):
        model = load_model(source / layout.MODEL_DIR)
        emb = embed(model, matrix)
    created = datetime.now(timezone.utc)  # the values exist from now on: every row's event_timestamp

    version = layout.new_version_id(root, name, created)
    with publish.staged_version(root, name, version) as staging:
        with _timed(timings, "write"):
            counts = tables.write_tables(staging, matrix, emb, name=name, version=version, created=created)
            shutil.copytree(source / layout.MODEL_DIR, staging / layout.MODEL_DIR, copy_function=_link_or_copy)
            if not (staging / layout.MODEL_DIR / ENCODER_DIR).is_dir():  # a version from before encoders were stored
                write_encoder(staging / layout.MODEL_DIR / ENCODER_DIR, kind=model.shape.kind, dim=model.shape.dim,
                              arrays=encoder_arrays(model))
            _link_or_copy(source / layout.INDEX, staging / layout.INDEX)
            if (source / layout.ATTRIBUTES).is_file():  # the items are the live version's: so are their attributes
                _link_or_copy(source / layout.ATTRIBUTES, staging / layout.ATTRIBUTES)
        with _timed(timings, "check"):
            publish.check_finite(staging)  # a NaN embedding, bias or score is never published
        manifest = {
            **live,
            "aefeatures_version": __version__,
            # this job's own file: its input (path, min_weight, …); model and index are the live
            # version's, which made the vectors and the index this version reuses
            "config": {**cfg.to_dict(), "model": live["config"]["model"], "index": live["config"]["index"]},
            # no gate ran: the model, its metrics and the index are the live version's
            "gate": {"passed": None, "skipped": True, "reasons": [],
                     "why": f"not run: users embedded with the model of version {live['version']}"},
            "version": version,
            "created_at": created.isoformat(),
            "schema_version": schema.SCHEMA_VERSION,
            "valid_from": created.isoformat(),
            "alignment": None,  # the live version's model, unchanged: already in its space
            "drift": None,  # not measured for an embedded version
            "fingerprint": None,  # not trained on this input: a later `run` must still train
            "embed_fingerprint": fingerprint,
            "embedded_with": {"version": live["version"], "unknown_only_users": len(unknown_only),
                              "unknown_only_sample": unknown_only[:20]},
            "input": {"files": [vars(f) for f in interactions.files], "rows_read": interactions.n_rows_read,
                      "rows_kept": interactions.n_rows_kept, "pairs": matrix.nnz,
                      "timestamps": interactions.timestamps},
            "counts": counts,
            "timings": timings,
        }
        manifest.pop("attributes_from", None)  # this version's users are new, not only its attributes
        with _timed(timings, "publish"):
            publish.write_manifest(staging, manifest)
            publish.atomic_write(staging / REPORT, report.render(manifest, live))
            final = publish.publish(root, name, staging)
            _refresh_sql_catalog(root)
    if unknown_only:
        log.info("%d user(s) have only items the model does not know and got no embedding, e.g. %s",
                    len(unknown_only), unknown_only[:5])
    return RunResult(name, version, final, manifest, timings)


def _known_items_only(interactions: Interactions, known: pl.Series) -> tuple[Interactions, list[Any]]:
    """(the interactions with known items, ids of users who had only unknown ones)."""
    frame = interactions.frame
    is_known = frame.get_column(ITEM).is_in(known.implode())
    kept = frame.filter(is_known)
    if kept.height == 0:
        raise errors.EmptyInputError(str(interactions.files[0].path), len(interactions.files),
                                     interactions.n_rows_read, "none of their items is known to the live model")
    lost = frame.get_column(USER).unique().filter(~frame.get_column(USER).unique().is_in(
        kept.get_column(USER).unique().implode()))
    return Interactions(kept, interactions.files, interactions.n_rows_read, interactions.n_rows_kept,
                        interactions.has_timestamps), sorted(lost.to_list())


def _link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Hard-link an immutable file into the new version (copy across filesystems)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
