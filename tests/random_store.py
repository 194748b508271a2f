"""A published version built from random interactions and random (untrained) vectors, for the
property tests of lookups: what a run would publish, without training."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import polars as pl
from hypothesis import assume

import aefeatures
from aefeatures.data.matrix import InteractionMatrix, build_matrix
from aefeatures.data.read import Interactions
from aefeatures.model.embed import Embeddings
from aefeatures.store import layout, publish, tables
from aefeatures.store.index import build_index, item_rows, save_index


def publish_random(root: Path, version: str, rng: np.random.Generator, n_users: int, n_items: int, dim: int,
                   kind: str, *,
                   tune: Callable[[faiss.Index], None] = lambda index: None,
                   extra: Callable[[Path, InteractionMatrix], dict] = lambda staging, matrix: {}):
    """Publish ``version`` of feature set "p" in ``root``: each user has a random nonempty
    set of items (user ids 3u + 1, item ids 5i + 2), vectors and biases are random normals, and
    the index is ``kind`` (``tune`` sets its search effort). ``extra`` may write more files into
    the staged version and returns manifest entries. Returns (the feature set, the matrix)."""
    pairs = {(u, int(i)) for u in range(n_users) for i in rng.choice(n_items, rng.integers(1, n_items + 1), False)}
    users, items = map(np.array, zip(*sorted(pairs)))
    frame = pl.DataFrame({"user_id": users * 3 + 1, "item_id": items * 5 + 2, "weight": np.ones(len(users)),
                          "timestamp": [None] * len(users)},
                         schema={"user_id": pl.Int64, "item_id": pl.Int64, "weight": pl.Float32,
                                 "timestamp": pl.Datetime("us", "UTC")})
    matrix = build_matrix(Interactions(frame, (), len(frame), len(frame), False))
    assume(matrix.shape[1] >= 2)  # the pipeline refuses fewer items (and IVF2 needs 2 to train)
    emb = Embeddings(rng.normal(size=(matrix.shape[0], dim)).astype(np.float32),
                     rng.random(matrix.shape[0]).astype(np.float32),
                     rng.normal(size=(matrix.shape[1], dim)).astype(np.float32),
                     rng.normal(size=matrix.shape[1]).astype(np.float32))
    with publish.staged_version(root, "p", version) as staging:
        tables.write_tables(staging, matrix, emb, name="p", version=version, created=datetime.now(timezone.utc))
        entries = extra(staging, matrix)
        index = build_index(item_rows(emb.item_vectors, emb.item_bias), kind).index
        tune(index)
        save_index(index, staging / layout.INDEX)
        publish.write_manifest(staging, {"dim": dim, "counts": {}, "version": version, **entries})
        publish.publish(root, "p", staging)
    return aefeatures.open_store(root)["p"], matrix
