"""New items folded into the live model without retraining (`aefeatures embed`,
:mod:`aefeatures.model.fold_in`): the dlae's formula reproduces trained items and recovers hidden
ones, the grown model keeps the trained rows, and a folded item is published everywhere a trained
one is (items.parquet's `folded_in`, the index, lookups, histories, SQL, HTTP)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import faiss
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import EvaluationConfig, InputConfig, JobConfig, JobSection, ModelConfig
from aefeatures.data.matrix import CSR, InteractionMatrix, build_matrix
from aefeatures.data.read import Interactions, read_interactions
from aefeatures.export.catalog import render_views
from aefeatures.jobs.run import _train_and_evaluate
from aefeatures.model.autoencoder import Autoencoder, load_model
from aefeatures.model.embed import encode
from aefeatures.model.fold_in import MIN_USERS, FoldedIn, fold_in_items
from aefeatures.serving.http import create_app
from aefeatures.serving.live import LiveStore
from tests.conftest import FIXTURES, REPO, cli_runner, strict_loads, write_job
from tests.test_id_entry_points import _asgi

INPUT = InputConfig(str(FIXTURES / "interactions.parquet"), weight_col="rating", timestamp_col="timestamp",
                    min_weight=4.0)
DLAE = {"kind": "dlae", "dim": 64, "dropout": 0.9, "l2": 300.0, "seed": 0}  # fixed: no search, fast
HIDDEN_SHARE = 0.1


# --- unit: fold_in_items ------------------------------------------------------------------------

def _train(matrix, **model):
    """A model trained as `aefeatures run` trains it (no validation: fixed hyperparameters)."""
    cfg = JobConfig(JobSection("fold", Path(tempfile.gettempdir())), INPUT, model=ModelConfig(**model),
                    evaluation=EvaluationConfig(valid_share=0.0, reference_max_items=0))
    trained, _, _ = _train_and_evaluate(matrix, cfg, progress=False)
    return trained.model.cpu().eval()


def _without(interactions: Interactions, items: np.ndarray) -> Interactions:
    frame = interactions.frame.filter(~pl.col("item_id").is_in(pl.Series(items).implode()))
    return Interactions(frame, interactions.files, interactions.n_rows_read, interactions.n_rows_kept,
                        interactions.has_timestamps)


def _rows_in(trained_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(len(ids),) int64: each id's row among the sorted ``trained_ids``, -1 where it is absent."""
    position = np.searchsorted(trained_ids, ids).clip(0, len(trained_ids) - 1).astype(np.int64)
    return np.where(trained_ids[position] == ids, position, np.int64(-1))


@dataclass
class Hidden:
    full: InteractionMatrix  # the fixture, every item
    model_all: Autoencoder  # a dlae trained on it
    hidden: np.ndarray  # 10% of its columns, hidden from ...
    partial: InteractionMatrix  # ... this matrix
    model_partial: Autoencoder  # a dlae trained on that
    trained_row: np.ndarray  # each column of ``full``'s row in ``model_partial``, -1 if hidden
    folded: FoldedIn  # ``model_partial`` grown by the hidden columns


@pytest.fixture(scope="module")
def hidden_setup() -> Hidden:
    interactions = read_interactions(INPUT)
    full = build_matrix(interactions)
    ids = full.item_ids.to_numpy()
    hidden = np.sort(np.random.default_rng(0).choice(len(ids), int(HIDDEN_SHARE * len(ids)), replace=False))
    partial = build_matrix(_without(interactions, ids[hidden]))
    trained_row = _rows_in(partial.item_ids.to_numpy(), ids)
    assert (trained_row < 0).sum() == len(hidden)
    model_partial = _train(partial, **DLAE)
    folded = fold_in_items(model_partial, full.csr, trained_row, dropout=DLAE["dropout"], l2=DLAE["l2"])
    return Hidden(full, _train(full, **DLAE), hidden, partial, model_partial, trained_row, folded)


def _scores(model, csr: CSR, columns: np.ndarray) -> np.ndarray:
    """(users, len(columns)): the model's scores, user embeddings @ decoder rows + bias."""
    z, _ = encode(model, csr)
    w = model.decoder.weight.detach().numpy()[columns]
    return z @ w.T + model.decoder.bias.detach().numpy()[columns]


def test_a_dlae_refits_its_own_trained_items(hidden_setup):
    full, model = hidden_setup.full, hidden_setup.model_all
    folded = fold_in_items(model, full.csr, np.arange(full.shape[1]), dropout=DLAE["dropout"], l2=DLAE["l2"])
    assert folded.refit_residual < 1e-3
    assert (folded.users == 0).all()
    for name, value in model.state_dict().items():  # nothing new: the same model
        torch.testing.assert_close(folded.model.state_dict()[name], value, rtol=0, atol=0)


def test_hidden_items_folded_in_score_users_as_a_dlae_trained_on_them(hidden_setup):
    h = hidden_setup
    full, hidden, folded = h.full, h.hidden, h.folded
    assert folded.refit_residual < 1e-3
    owner = np.repeat(np.arange(full.shape[0]), np.diff(full.csr.indptr))
    is_hidden = np.zeros(full.shape[1], bool)
    is_hidden[hidden] = True
    embedded = np.zeros(full.shape[0], bool)  # users with a trained item: the ones a fit rests on
    embedded[owner[~is_hidden[full.csr.indices]]] = True
    counts = np.bincount(full.csr.indices[embedded[owner]], minlength=full.shape[1])
    np.testing.assert_array_equal(folded.users[hidden], counts[hidden])
    assert (np.delete(folded.users, hidden) == 0).all()
    ours, theirs = _scores(folded.model, full.csr, hidden), _scores(h.model_all, full.csr, hidden)
    correlations = [np.corrcoef(ours[:, j], theirs[:, j])[0, 1] for j in range(len(hidden))]
    assert min(correlations) > 0.99, sorted(correlations)[:5]


def test_the_grown_model_keeps_every_trained_row_exactly(hidden_setup):
    h = hidden_setup
    full, hidden, trained_row, folded = h.full, h.hidden, h.trained_row, h.folded
    assert folded.model.shape.n_items == full.shape[1] and not folded.model.training
    old, new = h.model_partial.state_dict(), folded.model.state_dict()
    trained = trained_row >= 0
    for name in ("decoder.weight", "decoder.bias", "input_layer.weight"):
        torch.testing.assert_close(new[name][torch.from_numpy(trained)], old[name][torch.from_numpy(trained_row[trained])],
                                   rtol=0, atol=0)
        assert torch.isfinite(new[name][torch.from_numpy(hidden)]).all()
    for name in set(old) - {"decoder.weight", "decoder.bias", "input_layer.weight"}:
        torch.testing.assert_close(new[name], old[name], rtol=0, atol=0)


def test_a_dlae_wider_than_its_rank_folds_in_on_its_used_columns(hidden_setup):
    """dim 0 on the fixture: width 512 over ~450 trained items, the last columns zero; folding in
    keeps them zero and scores the hidden items as the full-rank dlae trained on them."""
    h = hidden_setup
    wide = _train(h.partial, **{**DLAE, "dim": 0})
    assert wide.shape.dim == 512 and (wide.input_layer.weight.abs().sum(0) == 0).any()
    folded = fold_in_items(wide, h.full.csr, h.trained_row, dropout=DLAE["dropout"], l2=DLAE["l2"])
    assert folded.refit_residual < 1e-3
    unused = wide.input_layer.weight.abs().sum(0) == 0
    for name in ("decoder.weight", "input_layer.weight"):
        rows = folded.model.state_dict()[name][torch.from_numpy(h.hidden)]
        assert torch.isfinite(rows).all() and (rows[:, unused] == 0).all()
    ours = _scores(folded.model, h.full.csr, h.hidden)
    theirs = _scores(_train(h.full, **{**DLAE, "dim": 0}), h.full.csr, h.hidden)
    correlations = [np.corrcoef(ours[:, j], theirs[:, j])[0, 1] for j in range(len(h.hidden))]
    assert min(correlations) > 0.99, sorted(correlations)[:5]


def test_a_dae_gets_finite_rows_for_its_new_items(hidden_setup):
    full, hidden, trained_row = hidden_setup.full, hidden_setup.hidden, hidden_setup.trained_row
    dae = _train(hidden_setup.partial, kind="dae", dim=16, hidden=(32,), epochs=2, min_steps=0, seed=0)
    folded = fold_in_items(dae, full.csr, trained_row, dropout=0.5, l2=100.0)
    assert np.isfinite(folded.refit_residual)
    new, trained = folded.model.state_dict(), trained_row >= 0
    for name in ("decoder.weight", "decoder.bias", "input_layer.weight"):
        assert torch.isfinite(new[name]).all()
        torch.testing.assert_close(new[name][torch.from_numpy(trained)],
                                   dae.state_dict()[name][torch.from_numpy(trained_row[trained])], rtol=0, atol=0)
    scores = _scores(folded.model, full.csr, hidden)
    assert np.isfinite(scores).all() and scores.std() > 0


def test_a_row_named_twice_or_outside_the_model_is_refused(hidden_setup):
    full, model = hidden_setup.full, hidden_setup.model_all
    twice = np.arange(full.shape[1])
    twice[1] = 0
    with pytest.raises(ValueError, match="distinct rows"):
        fold_in_items(model, full.csr, twice, dropout=DLAE["dropout"], l2=DLAE["l2"])
    outside = np.arange(full.shape[1])
    outside[-1] = model.shape.n_items
    with pytest.raises(ValueError, match="distinct rows"):
        fold_in_items(model, full.csr, outside, dropout=DLAE["dropout"], l2=DLAE["l2"])


# --- end to end: `aefeatures embed` on an input with new items ----------------------------------

# new item -> its users (the fixture's items are 1..500: item 0 comes first, so every trained item's
# row moves); 100002 has fewer than MIN_USERS
NEW = {0: 20, 100002: 2, 600: 5}
FOLDED = {0: 20, 600: 5}


def example_job(folder: Path, store: Path, input_path: Path, filename: str = "example.toml") -> Path:
    """jobs/example.toml with absolute paths: ``store``, ``input_path`` and the fixture's item clusters."""
    text = (REPO / "jobs" / "example.toml").read_text()
    for old, new in (('"../store"', f'"{store}"'), ('"../fixtures/interactions.parquet"', f'"{input_path}"'),
                     ('"../fixtures/truth_items.parquet"', f'"{FIXTURES / "truth_items.parquet"}"')):
        assert old in text, old
        text = text.replace(old, new)
    path = folder / filename
    path.write_text(text)
    return path


def input_with_new_items(path: Path, new: dict[int, int] = NEW) -> Path:
    """The fixture's interactions and, for each new item, that many known users rating it 5;
    the users of different new items do not overlap."""
    base = pl.read_parquet(FIXTURES / "interactions.parquet")
    users = base.get_column("user_id").unique().sort().to_list()
    rows, start = [], 0
    for item, n in new.items():
        rows += [(u, item) for u in users[start:start + n]]
        start += n + 5
    extra = pl.DataFrame({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
                          "rating": [5.0] * len(rows), "timestamp": [base["timestamp"].max()] * len(rows)})
    pl.concat([base, extra.cast(base.schema)]).write_parquet(path)
    return path


def new_item_users(item: int) -> list[int]:
    frame = pl.read_parquet(FIXTURES / "interactions.parquet")
    users = frame.get_column("user_id").unique().sort().to_list()
    start = 0
    for other, n in NEW.items():
        if other == item:
            return users[start:start + n]
        start += n + 5
    raise KeyError(item)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A store trained by the example job: (folder, store, trained version)."""
    folder = tmp_path_factory.mktemp("example")
    job = example_job(folder, folder / "store", FIXTURES / "interactions.parquet")
    out = cli_runner().invoke(cli, ["run", str(job)])
    assert out.exit_code == 0, out.output
    return folder, folder / "store", aefeatures.open_store(folder / "store")["example"].version


def copied_store(example, folder: Path) -> Path:
    _, store, _ = example
    shutil.copytree(store, folder / "store")
    return folder / "store"


@pytest.fixture(scope="module")
def folded(example, tmp_path_factory):
    """The example store after `aefeatures embed` of an input with three new items:
    (store, job file, trained version, folded version, the command's output)."""
    folder = tmp_path_factory.mktemp("folded")
    store = copied_store(example, folder)
    job = example_job(folder, store, input_with_new_items(folder / "newer.parquet"), "newer.toml")
    out = cli_runner().invoke(cli, ["embed", str(job)])
    assert out.exit_code == 0, out.output + (out.stderr or "")
    return store, job, example[2], aefeatures.open_store(store)["example"].version, out.stdout


def test_embed_says_what_it_folded_in_and_what_it_left_out(folded):
    _, _, trained, version, stdout = folded
    assert version != trained
    assert "(no training)" in stdout
    assert "2 new item(s) folded in from their users; the index was rebuilt" in stdout
    assert f"1 new item(s) with fewer than {MIN_USERS} users were left out, e.g. 100002" in stdout


def test_items_parquet_marks_the_folded_items_and_drops_the_one_with_too_few_users(folded):
    store, _, trained, _, _ = folded
    fs = aefeatures.open_store(store)["example"]
    items = pl.read_parquet(fs.path / "items.parquet", columns=["item_id", "folded_in"])
    old = pl.read_parquet(store / "example" / "versions" / trained / "items.parquet", columns=["item_id"])
    assert items.height == old.height + 2 == fs.n_items
    marked = dict(items.filter(pl.col("folded_in").is_not_null()).iter_rows())
    assert marked == FOLDED
    assert items.filter(pl.col("item_id").is_in(old["item_id"].implode()))["folded_in"].null_count() == old.height
    assert 100002 not in items["item_id"].to_list()
    assert items.schema["folded_in"] == pl.Int32
    popularity = dict(pl.read_parquet(fs.path / "items.parquet", columns=["item_id", "popularity"]).iter_rows())
    assert {item: popularity[item] for item in FOLDED} == FOLDED


def test_trained_items_and_users_without_new_items_keep_their_vectors(folded):
    store, _, trained, _, _ = folded
    fs, old = aefeatures.open_store(store)["example"], aefeatures.open_store(store).open("example", trained)
    ids = old.item_ids.tolist()
    assert fs.item_ids[0] == 0 and fs.item_ids[1:501].tolist() == ids  # every trained item's row moved by one
    np.testing.assert_array_equal(fs.item_embeddings(ids), old.item_embeddings(ids))
    touched = set(new_item_users(0) + new_item_users(600) + new_item_users(100002))
    users = [int(u) for u in old.user_ids[::50] if int(u) not in touched]
    np.testing.assert_allclose(fs.user_embeddings(users), old.user_embeddings(users), rtol=1e-5, atol=1e-6)
    changed = new_item_users(0)[0]
    assert not np.allclose(fs.user_embedding(changed), old.user_embedding(changed), rtol=1e-3, atol=1e-6)


def test_the_manifest_summarises_the_fold_in(folded):
    store, _, trained, version, _ = folded
    m = aefeatures.open_store(store).manifest("example", version)
    assert m["embedded_with"]["version"] == trained
    summary = m["folded_in"]
    assert summary["enabled"] is True and summary["items"] == 2 and summary["min_users"] == MIN_USERS
    assert summary["too_few_users"] == 1 and summary["too_few_sample"] == [{"item_id": 100002, "users": 2}]
    assert summary["refit_residual"] < 1e-3
    assert m["counts"]["items"] == 502


def test_the_rebuilt_index_holds_one_vector_per_item(folded):
    store, _, _, _, _ = folded
    fs = aefeatures.open_store(store)["example"]
    index = faiss.read_index(str(fs.path / "items.faiss"))
    assert index.ntotal == pl.read_parquet(fs.path / "items.parquet", columns=["item_id"]).height == 502


def test_similar_items_of_a_folded_item(folded):
    store, _, _, _, _ = folded
    out = cli_runner().invoke(cli, ["similar", "--store", str(store), "--item", "0", "-k", "5", "--json"])
    assert out.exit_code == 0, out.output
    body = strict_loads(out.stdout)
    ids = [row["item_id"] for row in body["items"]]
    assert len(ids) == 5 and 0 not in ids
    fs = aefeatures.open_store(store)["example"]
    assert set(ids) <= set(fs.item_ids.tolist())
    assert fs.similar_items(0, k=5).ids.tolist() == ids


def test_a_known_user_is_recommended_folded_items_from_an_allow_list(folded):
    store, _, _, _, _ = folded
    fs = aefeatures.open_store(store)["example"]
    user = int(fs.user_ids[-1])
    assert user not in new_item_users(0) + new_item_users(600)
    found = fs.recommend(user, k=5, items=list(NEW))
    assert sorted(found.ids.tolist()) == sorted(FOLDED)  # 100002 is unknown to the version: ignored
    vectors = fs.item_embeddings(found.ids.tolist())
    assert np.isfinite(vectors).all() and np.isfinite(found.scores).all()
    assert 0 not in fs.recommend(new_item_users(0)[0], k=500, items=list(FOLDED)).ids.tolist()  # seen


def test_sql_views_show_folded_in(folded):
    store, _, trained, version, _ = folded
    con = duckdb.connect()
    try:
        con.execute((store / "catalog.sql").read_text())
        for item, users in FOLDED.items():
            assert con.execute("SELECT folded_in FROM example_items WHERE item_id = $i", {"i": item}).fetchall() \
                == [(users,)]
        assert con.sql("SELECT count(*), count(folded_in) FROM example_items").fetchall() == [(502, 2)]
        assert con.execute("SELECT count(*), count(folded_in) FROM example_items_all WHERE version = $v",
                           {"v": trained}).fetchall() == [(500, 0)]
        assert con.execute("SELECT item_id, folded_in FROM example_items_all WHERE version = $v "
                           "AND folded_in IS NOT NULL ORDER BY item_id", {"v": version}).fetchall() \
            == sorted(FOLDED.items())
    finally:
        con.close()


def test_sql_reads_an_items_file_from_before_folded_in_as_null(folded, tmp_path):
    store, _, trained, version, _ = folded
    shutil.copytree(store, tmp_path / "store")
    old_items = tmp_path / "store" / "example" / "versions" / trained / "items.parquet"
    pq.write_table(pq.read_table(old_items).drop_columns(["folded_in"]), old_items)  # as an older release wrote it
    con = duckdb.connect()
    try:
        con.execute(render_views(tmp_path / "store", "example"))
        assert con.execute("SELECT count(*), count(folded_in) FROM example_items_all WHERE version = $v",
                           {"v": trained}).fetchall() == [(500, 0)]
        assert con.execute("SELECT count(folded_in) FROM example_items_all WHERE version = $v",
                           {"v": version}).fetchall() == [(2,)]
    finally:
        con.close()


def test_a_history_with_a_folded_item_embeds_as_the_grown_model_encodes_it(folded):
    store, _, _, _, _ = folded
    fs = aefeatures.open_store(store)["example"]
    history = [int(i) for i in fs.item_ids[[3, 50, 120]]] + [600]
    embedded = fs.embed_history(history)
    assert embedded.unknown == []
    model = load_model(fs.path / "model")
    assert model.shape.n_items == fs.n_items
    rows = np.searchsorted(fs.item_ids, list(FOLDED))
    np.testing.assert_array_equal(model.decoder.weight.detach().numpy()[rows], fs.item_embeddings(list(FOLDED)))
    rows = np.sort(np.searchsorted(fs.item_ids, history)).astype(np.int32)
    expected, _ = encode(model, CSR(np.array([0, len(rows)]), rows, np.ones(len(rows), np.float32)))
    np.testing.assert_allclose(embedded.vector, expected[0], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    without = fs.embed_history(history[:-1]).vector
    assert not np.allclose(embedded.vector, without, rtol=1e-3, atol=1e-3 * np.abs(without).max())


def test_http_version_reports_the_fold_in(folded):
    store, _, _, version, _ = folded
    status, body = _asgi(create_app(LiveStore(store), follow=False), "GET", "/v1/example/version")
    assert status == 200 and body["version"] == version and body["items"] == 502
    assert body["folded_in"]["items"] == 2 and body["folded_in"]["too_few_users"] == 1


# --- other paths: --no-fold-in, run --fold-in, marks carried over --------------------------------

def test_embed_without_fold_in_drops_the_new_items(example, tmp_path):
    store = copied_store(example, tmp_path)
    job = example_job(tmp_path, store, input_with_new_items(tmp_path / "newer.parquet"), "newer.toml")
    out = cli_runner().invoke(cli, ["embed", "--no-fold-in", str(job)])
    assert out.exit_code == 0, out.output
    assert "folded in" not in out.stdout
    fs = aefeatures.open_store(store)["example"]
    assert fs.version != example[2] and fs.n_items == 500
    assert not set(NEW) & set(fs.item_ids.tolist())
    assert fs.manifest["folded_in"]["enabled"] is False and fs.manifest["folded_in"]["items"] == 0
    assert pl.read_parquet(fs.path / "items.parquet")["folded_in"].null_count() == 500


def test_run_with_fold_in_and_a_live_version_embeds_instead_of_training(example, tmp_path):
    store = copied_store(example, tmp_path)
    job = example_job(tmp_path, store, input_with_new_items(tmp_path / "newer.parquet"), "newer.toml")
    out = cli_runner().invoke(cli, ["run", "--fold-in", str(job)])
    assert out.exit_code == 0, out.output
    assert "(no training)" in out.stdout and "2 new item(s) folded in" in out.stdout
    s = aefeatures.open_store(store)
    m = s.manifest("example")
    assert m["embedded_with"]["version"] == example[2] and m["folded_in"]["items"] == 2
    assert m["training"] == s.manifest("example", example[2])["training"]  # the live version's: none ran
    assert m["fingerprint"] is None  # a later plain `run` still trains
    assert s.versions("example")[-1]["built"] == "embedded"


def test_run_with_fold_in_on_an_empty_store_trains(tmp_path):
    job = write_job(tmp_path, name="example", model={"kind": "dlae", "dim": 16},
                    evaluation={"valid_share": 0.0})
    out = cli_runner().invoke(cli, ["run", "--fold-in", str(job)])
    assert out.exit_code == 0, out.output
    assert "closed-form fit" in out.stdout and "no training" not in out.stdout
    s = aefeatures.open_store(tmp_path / "store")
    m = s.manifest("example")
    assert "embedded_with" not in m and m["training"]["seconds"] >= 0
    assert s.versions("example")[-1]["built"] == "trained"
    assert pl.read_parquet(s["example"].path / "items.parquet")["folded_in"].null_count() == 500


def test_a_later_embed_carries_the_folded_marks_over(folded, tmp_path):
    store, _, _, version, _ = folded
    shutil.copytree(store, tmp_path / "store")
    store = tmp_path / "store"
    same = input_with_new_items(tmp_path / "same.parquet", FOLDED)  # no item the live version lacks
    job = example_job(tmp_path, store, same, "same.toml")
    out = cli_runner().invoke(cli, ["embed", str(job)])
    assert out.exit_code == 0, out.output
    fs = aefeatures.open_store(store)["example"]
    assert fs.version != version and fs.manifest["embedded_with"]["version"] == version
    assert fs.manifest["folded_in"]["items"] == 0 and fs.manifest["folded_in"]["too_few_users"] == 0
    items = pl.read_parquet(fs.path / "items.parquet", columns=["item_id", "folded_in", "embedding"])
    assert dict(items.filter(pl.col("folded_in").is_not_null()).select("item_id", "folded_in").iter_rows()) \
        == FOLDED
    assert items.height == 502
    before = pl.read_parquet(store / "example" / "versions" / version / "items.parquet", columns=["embedding"])
    np.testing.assert_array_equal(items["embedding"].to_numpy(), before["embedding"].to_numpy())
    for part in ("items.faiss", "model/weights.pt"):  # nothing new folded in: the live files reused
        assert (fs.path / part).read_bytes() == (store / "example" / "versions" / version / part).read_bytes()


def test_a_further_fold_in_keeps_the_earlier_marks(folded, tmp_path):
    store, _, _, version, _ = folded
    shutil.copytree(store, tmp_path / "store")
    store = tmp_path / "store"
    job = example_job(tmp_path, store, input_with_new_items(tmp_path / "more.parquet", {**NEW, 700: 4}), "more.toml")
    out = cli_runner().invoke(cli, ["embed", "--json", str(job)])
    assert out.exit_code == 0, out.output
    assert strict_loads(out.stdout)["folded_in"]["items"] == 1
    fs = aefeatures.open_store(store)["example"]
    marked = dict(pl.read_parquet(fs.path / "items.parquet", columns=["item_id", "folded_in"])
                  .filter(pl.col("folded_in").is_not_null()).iter_rows())
    assert marked == {**FOLDED, 700: 4} and fs.n_items == 503
    earlier = aefeatures.open_store(store).open("example", version)
    np.testing.assert_array_equal(fs.item_embeddings(list(FOLDED)), earlier.item_embeddings(list(FOLDED)))


def test_an_item_whose_users_have_no_trained_item_is_left_out(example, tmp_path):
    """Item 777's three users are new users with no item the live model knows: they have no
    embedding for the fit to rest on, so the item is left out (with 0 users), not published with
    a zero vector, and its users are reported as having only unknown items."""
    store = copied_store(example, tmp_path)
    base = pl.read_parquet(FIXTURES / "interactions.parquet")
    extra = pl.DataFrame({"user_id": [9001, 9002, 9003], "item_id": [777] * 3, "rating": [5] * 3,
                          "timestamp": [base["timestamp"].max()] * 3}).cast(base.schema)
    pl.concat([base, extra]).write_parquet(tmp_path / "cold.parquet")
    job = example_job(tmp_path, store, tmp_path / "cold.parquet", "cold.toml")
    out = cli_runner().invoke(cli, ["embed", str(job)])
    assert out.exit_code == 0, out.output
    fs = aefeatures.open_store(store)["example"]
    assert 777 not in fs.item_ids.tolist()
    folded = fs.manifest["folded_in"]
    assert folded["items"] == 0 and folded["too_few_sample"] == [{"item_id": 777, "users": 0}]
    assert fs.manifest["embedded_with"]["unknown_only_sample"] == [9001, 9002, 9003]
