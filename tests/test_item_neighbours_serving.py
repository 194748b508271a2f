"""Serving a version with a sparse item-item part (`item_neighbours.parquet`): every lookup that
recommends (for stored users and for request-time histories, Python, HTTP and SQL) ranks by

    user · item + bias + sum over the user's items i of x_i * weight(item, neighbour i)

exactly, checked against a brute-force numpy computation over the whole catalogue. The part is
added by hand to a real published version (random sparse weights of the dense scores' size, so
rankings change), its manifest re-fingerprinted as a publish does."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import aefeatures
from aefeatures import errors
from aefeatures.export import catalog
from aefeatures.schema import neighbours_schema
from aefeatures.serving.lookup import SUBSET_SHARE, FeatureSet
from aefeatures.store import layout, publish
from tests.conftest import FIXTURES, write_job

PER_ITEM = 5


def _version_folder(root: Path, name: str = "movies") -> Path:
    return layout.version_dir(root, name, layout.live_version(root, name))


def _refingerprint(folder: Path, manifest: dict) -> None:
    """Record the folder's files in the manifest as :func:`aefeatures.store.publish.publish` does."""
    manifest = dict(manifest)
    manifest[layout.FILES] = layout.fingerprint_files(folder)
    publish.write_manifest(folder, manifest)


def _dense(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users (n_users, dim), items (n_items, dim), bias (n_items,)) as float64, from the tables."""
    users = pq.read_table(fs.path / layout.USERS, columns=["embedding"]).column("embedding")
    items = pq.read_table(fs.path / layout.ITEMS, columns=["embedding", "bias"])
    as_matrix = lambda column: np.asarray(column.to_pylist(), np.float64)  # noqa: E731
    return as_matrix(users), as_matrix(items.column("embedding")), items.column("bias").to_numpy().astype(np.float64)


def _interaction_matrix(fs: FeatureSet) -> np.ndarray:
    """(n_users, n_items) float64: each stored user's interaction values (`weight`), 0 elsewhere."""
    table = pq.read_table(fs.path / layout.INTERACTIONS, columns=["user_row", "item_row", "weight"])
    x = np.zeros((fs.n_users, fs.n_items))
    x[table.column("user_row").to_numpy(), table.column("item_row").to_numpy()] = table.column("weight").to_numpy()
    return x


def write_neighbours(folder: Path, rng: np.random.Generator, scale: float, per_item: int = PER_ITEM) -> np.ndarray:
    """Write a random `item_neighbours.parquet` for the items of the version in ``folder``: each
    item gets ``per_item`` distinct neighbours other than itself, weights normal × ``scale``, rows
    sorted by (neighbour_row, item_row). Returns the dense (n_items, n_items) float64 matrix W
    with W[neighbour, item] = weight."""
    items = pq.read_table(folder / layout.ITEMS, columns=["item_id"]).column("item_id")
    n = len(items)
    item_rows = np.repeat(np.arange(n), per_item)
    neighbour_rows = np.concatenate([rng.choice(np.delete(np.arange(n), j), per_item, replace=False) for j in range(n)])
    weights = (rng.normal(size=len(item_rows)) * scale).astype(np.float32)
    order = np.lexsort((item_rows, neighbour_rows))
    item_rows, neighbour_rows, weights = item_rows[order], neighbour_rows[order], weights[order]
    table = pa.Table.from_arrays([items.take(pa.array(item_rows)), items.take(pa.array(neighbour_rows)),
                                  pa.array(item_rows.astype(np.int32)), pa.array(neighbour_rows.astype(np.int32)),
                                  pa.array(weights)], schema=neighbours_schema(items.type))
    pq.write_table(table, folder / layout.NEIGHBOURS)
    w = np.zeros((n, n))
    w[neighbour_rows, item_rows] = weights
    return w


def add_neighbours(folder: Path, rng: np.random.Generator, scale: float) -> np.ndarray:
    """:func:`write_neighbours` into a published version, with the manifest's section and its
    files re-fingerprinted. Returns W."""
    w = write_neighbours(folder, rng, scale)
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    manifest["item_neighbours"] = {"per_item": PER_ITEM, "entries": int((w != 0).sum())}
    _refingerprint(folder, manifest)
    return w


class Truth:
    """Brute-force scores of a version: dense part from its tables, item-item part ``w``."""

    def __init__(self, fs: FeatureSet, w: np.ndarray | None):
        self.fs = fs
        self.users, self.items, self.bias = _dense(fs)
        self.x = _interaction_matrix(fs)
        self.w = np.zeros((fs.n_items, fs.n_items)) if w is None else w
        self.dense = self.users @ self.items.T + self.bias
        self.scores = self.dense + self.x @ self.w

    def for_vector(self, vector: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(n_items,) scores of a user embedded as ``vector`` whose interaction values are ``values``."""
        return self.items @ vector.astype(np.float64) + self.bias + values @ self.w


def assert_exact_top(ids, scores, expected: np.ndarray, usable: np.ndarray, k: int, fs: FeatureSet) -> None:
    """``ids``/``scores`` are the exact top min(k, usable items) of ``expected`` among ``usable``
    (n_items,) bool: every id usable and distinct, scores float32 equal to the expected scores
    of these ids and to the best scores there are, best first (near-ties may come in any order)."""
    rows, found = fs._item_ids.rows(list(ids))
    assert found.all() and len(set(rows.tolist())) == len(rows)
    assert len(rows) == min(k, int(usable.sum()))
    assert usable[rows].all()
    scores = np.asarray(scores)
    assert scores.dtype == np.float32
    assert (np.diff(scores) <= 0).all()
    tol = 2e-5 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(scores, expected[rows], rtol=0, atol=tol)
    best = np.sort(expected[usable])[::-1][: len(rows)]
    np.testing.assert_allclose(scores, best, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(store with an item-item part, the same store without, W): a real run of a weighted
    (non-binarized) job with item attributes, copied before the part is added."""
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job

    folder = tmp_path_factory.mktemp("neighbours")
    job = write_job(folder, input={"path": str(FIXTURES / "interactions.parquet"), "weight_col": "rating",
                                   "timestamp_col": "timestamp", "binarize": False},
                    model={"kind": "dae", "dim": 16, "epochs": 2}, gate={"beat_popularity": False})
    job.write_text(job.read_text() + f'[items]\npath = "{FIXTURES / "truth_items.parquet"}"\n'
                                     'id_col = "item_id"\ncolumns = ["cluster"]\n')
    run_job(load_job_config(job), progress=False)
    root = folder / "store"
    plain = folder / "plain"
    shutil.copytree(root, plain)
    fs = aefeatures.open_store(root)["movies"]
    dense = _dense(fs)
    scale = float((dense[0] @ dense[1].T + dense[2]).std())
    w = add_neighbours(fs.path, np.random.default_rng(0), scale)
    catalog.write_catalog(root)
    return root, plain, w


@pytest.fixture(scope="module")
def fs(stores):
    return aefeatures.open_store(stores[0])["movies"].load()


@pytest.fixture(scope="module")
def truth(stores, fs):
    return Truth(fs, stores[2])


def _usable(truth: Truth, user_row: int, *, exclude_seen: bool = True, exclude=(), allowed=None) -> np.ndarray:
    ok = np.ones(truth.fs.n_items, bool)
    if exclude_seen:
        ok &= truth.x[user_row] == 0
    if len(exclude):
        ok[truth.fs._known_item_rows(list(exclude))] = False
    if allowed is not None:
        ok &= allowed
    return ok


def test_the_fixture_is_weighted_and_the_part_changes_rankings(fs, truth):
    values = truth.x[truth.x > 0]
    assert len(np.unique(values)) > 1  # not binarized: x is the rating
    assert fs.has_item_neighbours and fs._neighbours is not None
    changed = sum(not np.array_equal(np.argsort(-np.where(truth.x[u] > 0, -np.inf, truth.scores[u]))[:10],
                                     np.argsort(-np.where(truth.x[u] > 0, -np.inf, truth.dense[u]))[:10])
                  for u in range(fs.n_users))
    assert changed > fs.n_users // 2


@pytest.mark.parametrize("k", [10, 300])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_and_batch_are_the_exact_top_k_for_every_user(fs, truth, k, exclude_seen):
    batch = fs.recommend_batch(list(fs.user_ids), k, exclude_seen=exclude_seen)
    by_user = batch.partition_by("user_id", as_dict=True, maintain_order=True)
    for row, user in enumerate(fs.user_ids.tolist()):
        usable = _usable(truth, row, exclude_seen=exclude_seen)
        one = fs.recommend(user, k, exclude_seen=exclude_seen)
        assert_exact_top(one.ids, one.scores, truth.scores[row], usable, k, fs)
        rows = by_user[(user,)]
        assert rows["item_id"].to_list() == one.ids.tolist()
        np.testing.assert_array_equal(rows["score"].to_numpy(), one.scores)


def test_exclude_and_filters_keep_the_score_exact(fs, truth):
    attributes = fs.attributes
    many = (attributes["cluster"] < 5).to_numpy()  # above SUBSET_SHARE: the index branch
    few = (attributes["cluster"] == 2).to_numpy()  # below: allowed items scored exactly
    assert many.mean() > SUBSET_SHARE > few.mean()
    allow_list = [int(i) for i in fs.item_ids[::3]]
    listed = np.isin(fs.item_ids, allow_list)
    for row in range(0, fs.n_users, 5):
        user = fs.user_ids[row]
        top = fs.recommend(user, 20).ids
        exclude = [int(i) for i in top[:4]] + [10**9]
        for k in (7, 200):
            got = fs.recommend(user, k, exclude=exclude)
            assert_exact_top(got.ids, got.scores, truth.scores[row], _usable(truth, row, exclude=exclude), k, fs)
            for rule, allowed in (({"filter": "cluster < 5"}, many), ({"filter": "cluster = 2"}, few),
                                  ({"items": allow_list}, listed)):
                got = fs.recommend(user, k, exclude=exclude, **rule)
                assert_exact_top(got.ids, got.scores, truth.scores[row],
                                 _usable(truth, row, exclude=exclude, allowed=allowed), k, fs)
            got = fs.recommend(user, k, exclude_seen=False, filter="cluster = 2")
            assert_exact_top(got.ids, got.scores, truth.scores[row],
                             _usable(truth, row, exclude_seen=False, allowed=few), k, fs)
    batch = fs.recommend_batch(list(fs.user_ids[:50]), 9, filter="cluster < 5", exclude=[int(fs.item_ids[0])])
    for row, user in enumerate(fs.user_ids[:50].tolist()):
        rows = batch.filter(batch["user_id"] == user)
        assert_exact_top(rows["item_id"].to_numpy(), rows["score"].to_numpy(), truth.scores[row],
                         _usable(truth, row, exclude=[int(fs.item_ids[0])], allowed=many), 9, fs)


@pytest.mark.parametrize("block", [1, 300, 1 << 30])
def test_summing_in_blocks_changes_no_answer(fs, truth, monkeypatch, block):
    """Users' residuals are summed a block of users at a time, sorted or added up in place
    (:data:`aefeatures.serving.lookup.RESIDUAL_BLOCK`): the answers do not depend on it."""
    from aefeatures.serving import lookup

    users = list(fs.user_ids[::3])
    before = fs.recommend_batch(users, 25)
    monkeypatch.setattr(lookup, "RESIDUAL_BLOCK", block)
    after = fs.recommend_batch(users, 25)
    assert after["item_id"].to_list() == before["item_id"].to_list()
    np.testing.assert_allclose(after["score"].to_numpy(), before["score"].to_numpy(), rtol=1e-6, atol=1e-6)


def test_weighted_histories_score_with_their_values(fs, truth):
    rng = np.random.default_rng(1)
    histories, weights = [], []
    for _ in range(30):
        items = rng.choice(fs.item_ids, rng.integers(1, 40), replace=False)
        histories.append([int(i) for i in items])
        weights.append([float(v) for v in rng.integers(1, 6, len(items))])
    for history, hw in zip(histories, weights):
        vector = fs.embed_history(history, weights=hw).vector
        values = np.zeros(fs.n_items)
        values[fs._item_rows(history)] = hw  # the job feeds the weights themselves (binarize = false)
        expected = truth.for_vector(vector, values)
        for k, rule, allowed in ((10, {}, None), (250, {}, None), (10, {"filter": "cluster = 2"},
                                                                     (fs.attributes["cluster"] == 2).to_numpy())):
            got = fs.recommend_history(history, k, weights=hw, **rule)
            usable = values == 0 if allowed is None else (values == 0) & allowed
            assert_exact_top(got.ids, got.scores, expected, usable, k, fs)
        unweighted = fs.recommend_history(history, 10)  # weights 1: another score, checked the same way
        ones = (values > 0).astype(float)
        assert_exact_top(unweighted.ids, unweighted.scores, truth.for_vector(fs.embed_history(history).vector, ones),
                         values == 0, 10, fs)
    batch = fs.recommend_histories(histories, 6, weights=weights)
    for h, (history, hw) in enumerate(zip(histories, weights)):
        assert batch.filter(batch["history"] == h)["item_id"].to_list() == \
            fs.recommend_history(history, 6, weights=hw).ids.tolist()


def test_a_stored_users_history_answers_as_the_user(fs, truth):
    table = pq.read_table(fs.path / layout.INTERACTIONS, columns=["user_row", "item_id", "weight"])
    users = table.column("user_row").to_numpy()
    for row in range(0, fs.n_users, 97):
        mine = users == row
        history = table.column("item_id").to_numpy()[mine].tolist()
        values = table.column("weight").to_numpy()[mine].astype(float).tolist()
        ours, theirs = fs.recommend_history(history, 10, weights=values), fs.recommend(fs.user_ids[row], 10)
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-4, atol=1e-4)
        assert_exact_top(ours.ids, ours.scores, truth.scores[row], truth.x[row] == 0, 10, fs)


def test_the_http_service_answers_the_full_score(stores, fs, truth):
    from tests.test_service import Service

    svc = Service(stores[0])
    try:
        row = 11
        user = int(fs.user_ids[row])
        status, body = svc.get("/v1/movies/recommend", user=user, k=12)
        assert status == 200
        ids = [r["item_id"] for r in body["items"]]
        scores = np.array([r["score"] for r in body["items"]], np.float32)
        expected = fs.recommend(user, 12)
        assert ids == expected.ids.tolist()
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-6)
        assert_exact_top(ids, scores, truth.scores[row], truth.x[row] == 0, 12, fs)
        history = [int(i) for i in fs.item_ids[[3, 40, 77]]]
        status, body = svc.request("POST", "/v1/movies/recommend", {"history": history, "weights": [5, 1, 3],
                                                                    "k": 5})
        assert status == 200
        [result] = body["results"]
        assert [r["item_id"] for r in result["items"]] == \
            fs.recommend_history(history, 5, weights=[5, 1, 3]).ids.tolist()
    finally:
        svc.stop()


def test_the_sql_macros_rank_as_the_lookups(stores, fs, truth):
    con = catalog.connect(stores[0])
    count, = con.execute("SELECT count(*) FROM movies_item_neighbours").fetchone()
    assert count == PER_ITEM * fs.n_items
    for row in range(0, fs.n_users, 101):
        user = int(fs.user_ids[row])
        got = con.execute("SELECT item_id, score FROM movies_recommend($u, 15)", {"u": user}).fetchall()
        ids, scores = [i for i, _ in got], np.array([s for _, s in got], np.float32)
        assert_exact_top(ids, scores, truth.scores[row], truth.x[row] == 0, 15, fs)
        np.testing.assert_allclose(scores, fs.recommend(user, 15).scores, rtol=1e-5, atol=1e-5)
        got = con.execute("SELECT item_id, score FROM movies_recommend_where($u, 8, cluster = 2)", {"u": user}).fetchall()
        few = (fs.attributes["cluster"] == 2).to_numpy()
        assert_exact_top([i for i, _ in got], np.array([s for _, s in got], np.float32), truth.scores[row],
                         (truth.x[row] == 0) & few, 8, fs)
        # a filter naming item_id: the residual adds no column it could be confused with
        got = con.execute("SELECT item_id, score FROM movies_recommend_where($u, 8, item_id > 100)",
                          {"u": user}).fetchall()
        assert_exact_top([i for i, _ in got], np.array([s for _, s in got], np.float32), truth.scores[row],
                         (truth.x[row] == 0) & (fs.item_ids > 100), 8, fs)
    written = (stores[0] / catalog.CATALOG).read_text()
    assert "movies_item_neighbours" in written and layout.NEIGHBOURS in written
    # the README's written-out query (user 42 of feature set `example`) equals the macro here too
    from tests.test_readme import _blocks

    query = _blocks("sql")[0].replace("example_", "movies_").replace("= 42", "= $u")
    for user in fs.user_ids[:300:37].tolist():
        ours, macro = (con.execute(q, {"u": user}).fetchall() for q in (query, "SELECT * FROM movies_recommend($u, 10)"))
        assert [i for i, _ in ours] == [i for i, _ in macro]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in macro], rtol=1e-6)


def test_without_the_part_nothing_changes(stores):
    plain = aefeatures.open_store(stores[1])["movies"]
    assert not plain.has_item_neighbours
    plain.load()
    assert plain._neighbours is None and plain._seen_values is None  # `weight` is not even read
    assert plain.is_warm("recommend")
    truth = Truth(plain, None)
    for row in range(0, plain.n_users, 50):
        got = plain.recommend(plain.user_ids[row], 10)
        assert_exact_top(got.ids, got.scores, truth.dense[row], truth.x[row] == 0, 10, plain)
    con = catalog.connect(stores[1])
    assert con.execute("SELECT count(*) FROM movies_item_neighbours").fetchone() == (0,)
    types = {r[0]: r[1] for r in con.execute("DESCRIBE movies_item_neighbours").fetchall()}
    assert types == {"item_id": "BIGINT", "neighbour_id": "BIGINT", "weight": "FLOAT"}
    text = catalog.render_views(stores[1], "movies")
    dense_only = ('SELECT i.item_id, array_inner_product(u.embedding, i.embedding) + i.bias AS score\n'
                  'FROM "movies_users" u, "movies_items" i\nWHERE')
    assert text.count(dense_only) == 2 and "coalesce" not in text  # both recommend macros as before


def test_warm_after_load_and_the_part_read_once(stores):
    fs = aefeatures.open_store(stores[0])["movies"]
    assert not fs.is_warm("recommend")
    fs.load()
    assert fs.is_warm("recommend") and fs.is_warm("history")
    first = fs._neighbours
    fs.recommend(fs.user_ids[0], 5)
    assert fs._neighbours is first


def _damaged_copy(stores, tmp_path, change) -> Path:
    root = tmp_path / "store"
    shutil.copytree(stores[0], root)
    folder = _version_folder(root)
    change(folder)
    return root


def test_a_version_claiming_the_part_without_its_file_is_damaged(stores, tmp_path, caplog):
    def drop(folder):
        (folder / layout.NEIGHBOURS).unlink()
        _refingerprint(folder, json.loads((folder / layout.MANIFEST).read_text()))

    root = _damaged_copy(stores, tmp_path, drop)
    fs = aefeatures.open_store(root)["movies"]
    for call in (fs.load, lambda: fs.recommend(fs.user_ids[0], 5), lambda: fs.recommend_history([1, 2], 5)):
        with pytest.raises(errors.DamagedVersionError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and layout.NEIGHBOURS in message and "missing" in message
    with caplog.at_level(logging.WARNING):
        con = catalog.connect(root)
    assert not con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'movies_items'").fetchone()[0]
    assert any(layout.NEIGHBOURS in r.getMessage() for r in caplog.records)


def test_a_file_removed_after_publish_is_damaged_at_open(stores, tmp_path):
    root = _damaged_copy(stores, tmp_path, lambda folder: (folder / layout.NEIGHBOURS).unlink())
    with pytest.raises(errors.DamagedVersionError, match="item_neighbours.parquet` cannot be read"):
        aefeatures.open_store(root)["movies"]


@pytest.mark.parametrize("rows, weights, problem", [
    ([(0, 0)], [1.0], "its own neighbour"),
    ([(1, 0), (0, 10**6)], [1.0, 1.0], "outside the version"),
    ([(1, 2), (0, 1)], [1.0, 1.0], "not sorted"),
    ([(1, 0), (2, 0)], [1.0, float("nan")], "finite"),
])
def test_a_malformed_part_is_damaged(stores, tmp_path, rows, weights, problem):
    def write(folder):
        items = pq.read_table(folder / layout.ITEMS, columns=["item_id"]).column("item_id")
        item_rows = np.array([r[0] for r in rows], np.int32)
        neighbour_rows = np.array([r[1] for r in rows], np.int32)
        ids = lambda r: items.take(pa.array(np.minimum(r, len(items) - 1)))  # noqa: E731
        pq.write_table(pa.Table.from_arrays([ids(item_rows), ids(neighbour_rows), pa.array(item_rows),
                                             pa.array(neighbour_rows), pa.array(np.array(weights, np.float32))],
                                            schema=neighbours_schema(items.type)), folder / layout.NEIGHBOURS)
        manifest = json.loads((folder / layout.MANIFEST).read_text())
        manifest["item_neighbours"]["entries"] = len(rows)
        _refingerprint(folder, manifest)

    root = _damaged_copy(stores, tmp_path, write)
    fs = aefeatures.open_store(root)["movies"]
    with pytest.raises(errors.DamagedVersionError, match=problem) as info:
        fs.recommend(fs.user_ids[0], 5)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Using `assume` outside")  # tests/random_store.py, not a property test
@pytest.mark.parametrize("kind, exhaustive", [("IVF4,Flat", True), ("HNSW32,Flat", True), ("IVF8,Flat", False)])
def test_approximate_indexes(tmp_path, kind, exhaustive):
    """Searched exhaustively, an approximate index gives the exact top k of the full score; searched
    narrowly (one IVF list), still exactly min(k, usable) distinct usable items, each with its full score."""
    import faiss

    from tests.random_store import publish_random

    holder = {}

    def extra(staging, matrix):
        holder["w"] = write_neighbours(staging, np.random.default_rng(4), 1.0)
        return {"item_neighbours": {"per_item": PER_ITEM, "entries": int((holder["w"] != 0).sum())}}

    def tune(index):
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = inner.nlist if exhaustive else 1
        else:
            inner.hnsw.efSearch = 4096

    fs, _ = publish_random(tmp_path, "v1", np.random.default_rng(3), 40, 60, 4, kind, tune=tune, extra=extra)
    truth = Truth(fs, holder["w"])
    every_other = np.arange(fs.n_items) % 2 == 0
    for row in range(fs.n_users):
        answers = [(k, fs.recommend(fs.user_ids[row], k), truth.x[row] == 0) for k in (3, 60)]
        answers.append((4, fs.recommend(fs.user_ids[row], 4, items=[int(i) for i in fs.item_ids[every_other]],
                                        exclude_seen=False), every_other))
        for k, got, usable in answers:
            if exhaustive:
                assert_exact_top(got.ids, got.scores, truth.scores[row], usable, k, fs)
                continue
            rows, _ = fs._item_ids.rows(list(got.ids))
            assert len(set(rows.tolist())) == len(rows) == min(k, int(usable.sum())) and usable[rows].all()
            np.testing.assert_allclose(got.scores, truth.scores[row][rows], rtol=0, atol=1e-4)
