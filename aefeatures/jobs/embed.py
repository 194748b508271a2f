"""`aefeatures embed`: embed users from fresh interactions with the live model, no training.

The autoencoder embeds any user from their interaction vector, so new users, and users whose
history changed, get embeddings between nightly trainings. Items first seen after training are
folded in (:mod:`aefeatures.model.fold_in`): each gets an item vector, a bias and an encoder row
from the users who interacted with it, the live model fixed, and is marked in items.parquet's
`folded_in` column with the number of users it rests on; an item with fewer than
:data:`~aefeatures.model.fold_in.MIN_USERS` users is listed in the manifest and dropped. The new
version reuses the live model, item vectors and FAISS index when no item was folded in (and
saves the grown model and rebuilds the index when one was); users.parquet and
interactions.parquet come from the new input. Users left with no known item are reported and
get no embedding.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from aefeatures import __version__, errors, schema
from aefeatures.config import JobConfig
from aefeatures.data.attributes import align_attributes, read_attributes
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import Interactions, read_interactions
from aefeatures.jobs.run import (
    RECALL_SAMPLE,
    REPORT,
    RunResult,
    _refresh_sql_catalog,
    _timed,
    input_fingerprint,
    scheduled,
)
from aefeatures.quality import report
from aefeatures.schema import ITEM, USER
from aefeatures.store import layout, publish, tables
from aefeatures.store.encoder import ENCODER_DIR, write_encoder
from aefeatures.store.index import build_index, item_rows, save_index, user_queries

log = logging.getLogger(__name__)


def embed_job(cfg: JobConfig, *, force: bool = False, fold_in: bool = True) -> RunResult:
    """Embed the users of ``cfg``'s input with the live model and publish a new version;
    with ``fold_in``, items the live model lacks are folded in first (module docstring).

    Raises
    ------
    StoreError
        The feature set has no live version to embed with.
    EmptyInputError
        No row of the input has an item the version can use.
    """
    def work(fingerprint: str, live: dict[str, Any] | None) -> RunResult:
        if live is None:
            raise errors.no_feature_set(cfg.job.store, cfg.job.name, layout.feature_sets(cfg.job.store))
        return _embed_and_publish(cfg, fingerprint, live, fold_in)

    fingerprint = input_fingerprint(cfg) + ("" if fold_in else ":no-fold-in")
    return scheduled(cfg, "embed", "embed_fingerprint", work, force=force, fingerprint=fingerprint)


def _embed_and_publish(cfg: JobConfig, fingerprint: str, live: dict[str, Any], fold_in: bool) -> RunResult:
    from aefeatures.model.autoencoder import encoder_arrays, load_model, save_model  # torch: only once there is work
    from aefeatures.model.embed import embed

    root, name = cfg.job.store, cfg.job.name
    source = layout.version_dir(root, name, live["version"])
    timings: dict[str, float] = {}
    with _timed(timings, "read"):
        interactions = read_interactions(cfg.input)
    with _timed(timings, "matrix"):
        live_items = pl.read_parquet(source / layout.ITEMS, columns=[ITEM], glob=False).get_column(ITEM)
        new_items, too_few = _new_items(interactions, live_items) if fold_in else (live_items.clear(), {})
        item_ids = pl.concat([live_items, new_items]).sort() if len(new_items) else live_items
        kept, unknown_only = _known_items_only(interactions, item_ids)
        matrix = build_matrix(kept, binarize=cfg.input.binarize, weight_transform=cfg.input.weight_transform,
                              item_ids=item_ids)
    model = load_model(source / layout.MODEL_DIR)
    folded = None
    if len(new_items):
        with _timed(timings, "fold_in"):
            folded = _fold_in(model, matrix, live_items, live)
            model = folded.model
    with _timed(timings, "embed"):
        emb = embed(model, matrix)
    created = datetime.now(timezone.utc)  # the values exist from now on: every row's event_timestamp

    version = layout.new_version_id(root, name, created)
    index_info = live["index"]
    with publish.staged_version(root, name, version) as staging:
        with _timed(timings, "write"):
            counts = tables.write_tables(staging, matrix, emb, name=name, version=version, created=created,
                                         folded_in=_folded_in_column(source, item_ids, folded))
            if folded is None:
                shutil.copytree(source / layout.MODEL_DIR, staging / layout.MODEL_DIR, copy_function=_link_or_copy)
                if not (staging / layout.MODEL_DIR / ENCODER_DIR).is_dir():  # a version from before encoders
                    write_encoder(staging / layout.MODEL_DIR / ENCODER_DIR, kind=model.shape.kind,
                                  dim=model.shape.dim, arrays=encoder_arrays(model))
                _link_or_copy(source / layout.INDEX, staging / layout.INDEX)
            else:
                save_model(model, staging / layout.MODEL_DIR)
                index_info = _rebuild_index(staging, emb, live, seed=cfg.model.seed)
            _copy_attributes(cfg, source, staging, item_ids, grown=folded is not None)
            _copy_neighbours(source, staging, item_ids, grown=folded is not None)
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
            "folded_in": _fold_summary(folded, too_few, fold_in),
            "index": index_info,
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


def _new_items(interactions: Interactions, live_items: pl.Series) -> tuple[pl.Series, dict[Any, int]]:
    """(items the live version lacks with at least MIN_USERS users, sorted; {item: users} of the
    ones with fewer). Only users with a trained item count: the others have no embedding to fit
    an item on."""
    from aefeatures.model.fold_in import MIN_USERS

    frame = interactions.frame
    is_known = pl.col(ITEM).is_in(live_items.implode())
    embedded = frame.filter(is_known).get_column(USER).unique()
    users = (frame.filter(~is_known).group_by(ITEM)
             .agg(pl.col(USER).filter(pl.col(USER).is_in(embedded.implode())).n_unique().alias("users")).sort(ITEM))
    enough = users.filter(pl.col("users") >= MIN_USERS)
    few = users.filter(pl.col("users") < MIN_USERS)
    return enough.get_column(ITEM), dict(zip(few.get_column(ITEM).to_list(), few.get_column("users").to_list()))


def _fold_in(model, matrix, live_items: pl.Series, live: dict[str, Any]):
    """The live model grown by the matrix's new items (:func:`aefeatures.model.fold_in.fold_in_items`)."""
    from aefeatures.model.fold_in import fold_in_items

    ids = matrix.item_ids
    position = live_items.search_sorted(ids).to_numpy().astype(np.int64).clip(0, max(len(live_items) - 1, 0))
    trained = live_items.gather(position) == ids
    trained_row = np.where(trained.to_numpy(), position, -1)
    training = live.get("training") or {}
    chosen = {**live["config"]["model"], **training.get("chosen", {}), **(training.get("refit") or {}).get("chosen", {})}
    return fold_in_items(model, matrix.csr, trained_row, dropout=float(chosen["dropout"]), l2=float(chosen["l2"]))


def _folded_in_column(source: Path, item_ids: pl.Series, folded) -> np.ndarray:
    """(n_items,) int32 users each item's vector rests on if folded in, 0 if trained: the live
    version's marks carried over, and this version's new items."""
    out = np.zeros(len(item_ids), np.int32) if folded is None else folded.users.copy()
    path = source / layout.ITEMS
    if "folded_in" in pq.read_schema(path).names:  # the footer only: the vectors are not read
        earlier = pl.from_arrow(pq.read_table(path, columns=[ITEM, "folded_in"])).filter(
            pl.col("folded_in").is_not_null())
        rows = item_ids.search_sorted(earlier.get_column(ITEM)).to_numpy()
        out[rows] = earlier.get_column("folded_in").to_numpy()
    return out


def _rebuild_index(staging: Path, emb, live: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """The index of the grown catalogue, of the live version's kind and recall target."""
    index_cfg = live["config"]["index"]
    n_users = emb.user_vectors.shape[0]
    sample = np.sort(np.random.default_rng(seed).choice(n_users, min(RECALL_SAMPLE, n_users), replace=False))
    built = build_index(item_rows(emb.item_vectors, emb.item_bias), index_cfg["kind"],
                        sample_queries=user_queries(emb.user_vectors[sample]), target_recall=index_cfg["min_recall"])
    save_index(built.index, staging / layout.INDEX)
    return {"kind": index_cfg["kind"], "factory": built.factory, "recall_at_10": built.recall_at_10,
            "search": built.search}


def _copy_attributes(cfg: JobConfig, source: Path, staging: Path, item_ids: pl.Series, *, grown: bool) -> None:
    """The live version's item attributes; for a grown catalogue re-aligned from the job's
    `[items]` file (or, without one, the live table with empty rows for the new items)."""
    if not (source / layout.ATTRIBUTES).is_file():
        return
    if not grown:  # the items are the live version's: so are their attributes
        _link_or_copy(source / layout.ATTRIBUTES, staging / layout.ATTRIBUTES)
        return
    frame = read_attributes(cfg.items) if cfg.items.path is not None else pl.read_parquet(source / layout.ATTRIBUTES, glob=False)
    aligned, _ = align_attributes(frame, item_ids, str(cfg.items.path or source / layout.ATTRIBUTES))
    tables.write_attributes(staging, aligned)


def _copy_neighbours(source: Path, staging: Path, item_ids: pl.Series, *, grown: bool) -> None:
    """The live version's sparse item-item part, where it has one: the same file, or for a grown
    catalogue the same entries with their item rows renumbered (a folded-in item has none)."""
    path = source / layout.NEIGHBOURS
    if not path.is_file():
        return
    if not grown:
        _link_or_copy(path, staging / layout.NEIGHBOURS)
        return
    table = pq.read_table(path)
    rows = [pa.array(item_ids.search_sorted(pl.from_arrow(table.column(c))).to_numpy().astype(np.int32))
            for c in (ITEM, "neighbour_id")]
    table = table.set_column(2, "item_row", rows[0]).set_column(3, "neighbour_row", rows[1])
    order = np.lexsort((rows[0].to_numpy(), rows[1].to_numpy()))
    pq.write_table(table.take(pa.array(order)), staging / layout.NEIGHBOURS, compression="zstd")


def _fold_summary(folded, too_few: dict[Any, int], enabled: bool) -> dict[str, Any]:
    """The manifest's `folded_in`: what this version folded in, and what it left out."""
    from aefeatures.model.fold_in import MIN_USERS

    return {"enabled": enabled, "items": 0 if folded is None else int((folded.users > 0).sum()),
            "min_users": MIN_USERS, "refit_residual": None if folded is None else round(folded.refit_residual, 5),
            "too_few_users": len(too_few), "too_few_sample": [{"item_id": k, "users": v}
                                                              for k, v in list(too_few.items())[:20]]}


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
