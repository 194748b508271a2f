"""`aefeatures attributes`: republish the live version with fresh item attributes, no training.

Attributes (stock, price, category) change faster than models. The new version links every
file of the live version (model, users, items, interactions, index, report) and writes only a
new `attributes.parquet` from the job's `[items]` table, validated as a run validates it. Locked,
logged in the run log and idempotent like `run` and `embed`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import polars as pl

from aefeatures import errors
from aefeatures.config import JobConfig
from aefeatures.data.attributes import align_attributes, read_attributes
from aefeatures.data.read import input_files
from aefeatures.jobs.embed import _link_or_copy
from aefeatures.jobs.run import RunResult, _refresh_sql_catalog, _timed, input_fingerprint, scheduled
from aefeatures.schema import ITEM
from aefeatures.store import layout, publish, tables

log = logging.getLogger(__name__)

_REWRITTEN = {layout.MANIFEST, layout.ATTRIBUTES}


def attributes_job(cfg: JobConfig, *, force: bool = False) -> RunResult:
    """Publish a version with the live version's model, vectors and index and the attributes
    of ``cfg``'s `[items]` table.

    Up to date (nothing done) when the live version was published from the same attribute
    files (paths, sizes, modification times) and `[items]` settings, unless ``force``.

    Raises
    ------
    BadInputError
        The job has no `[items]` section, or its attributes are unusable (see
        :func:`aefeatures.data.attributes.read_attributes`).
    StoreError
        The feature set has no live version.
    """
    if cfg.items.path is None:
        raise errors.BadInputError(f"job file `{cfg.source}` has no `[items]` section with a `path`; add one to "
                                   "name the item attributes (see README, Item attributes and filters).")

    def work(fingerprint: str, live: dict[str, Any] | None) -> RunResult:
        if live is None:
            raise errors.no_feature_set(cfg.job.store, cfg.job.name, layout.feature_sets(cfg.job.store))
        return _republish(cfg, fingerprint, live)

    return scheduled(cfg, "attributes", "attributes_fingerprint", work, force=force,
                     fingerprint=attributes_fingerprint(cfg))


def attributes_fingerprint(cfg: JobConfig) -> str:
    """sha256 of the attribute files' paths, sizes and modification times and `[items]`."""
    files = [vars(f) for f in input_files(str(cfg.items.path))]
    blob = json.dumps({"files": files, "items": cfg.to_dict()["items"]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _republish(cfg: JobConfig, fingerprint: str, live: dict[str, Any]) -> RunResult:
    created = datetime.now(timezone.utc)
    root, name = cfg.job.store, cfg.job.name
    source = layout.version_dir(root, name, live["version"])
    timings: dict[str, float] = {}
    with _timed(timings, "read"):
        frame = read_attributes(cfg.items)
        item_ids = pl.read_parquet(source / layout.ITEMS, columns=[ITEM], glob=False).get_column(ITEM)
        aligned, summary = align_attributes(frame, item_ids, str(cfg.items.path))
    version = layout.new_version_id(root, name, created)
    with publish.staged_version(root, name, version) as staging:
        with _timed(timings, "write"):
            for path in source.rglob("*"):
                target = staging / path.relative_to(source)
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif path.relative_to(source).as_posix() not in _REWRITTEN:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(path, target)
            tables.write_attributes(staging, aligned)
        manifest = {
            **live,
            "version": version,
            "created_at": created.isoformat(),
            # A later `run` on the same interactions and config need not train again: the model
            # is the one such a run would rebuild, the attributes are these.
            "fingerprint": input_fingerprint(cfg) if _trained_on_same_input(cfg, live) else None,
            "attributes_fingerprint": fingerprint,
            "attributes_from": {"version": live["version"]},
            "attributes": {"files": [vars(f) for f in input_files(str(cfg.items.path))], **summary},
            "config": {**live["config"], "items": cfg.to_dict()["items"]},
            "timings": timings,
        }
        with _timed(timings, "publish"):
            publish.write_manifest(staging, manifest)
            final = publish.publish(root, name, staging)
            _refresh_sql_catalog(root)
    log.info("published %s/%s with fresh attributes (model of %s)", name, version, live["version"])
    return RunResult(name, version, final, manifest, timings)


def _trained_on_same_input(cfg: JobConfig, live: dict[str, Any]) -> bool:
    """Whether the live version's model came from this job's interactions and config (its run
    fingerprint, recomputed with the attribute files it was published with, matches)."""
    old_files = (live.get("attributes") or {}).get("files")
    if not live.get("fingerprint") or old_files is None:
        return False
    return live["fingerprint"] == input_fingerprint(cfg, attribute_files=old_files)
