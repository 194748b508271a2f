"""DuckDB over the published tables: raw Parquet and the views in sql/ (STORE/catalog.sql)."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

import aefeatures
from aefeatures.export.catalog import render_views


@pytest.fixture()
def con(trained):
    root, _ = trained
    con = duckdb.connect()
    con.execute((root / "catalog.sql").read_text())  # the documented one step
    yield con
    con.close()


def test_duckdb_reads_the_raw_embedding_as_a_float_list(trained):
    _, result = trained
    path = str(result.path / "users.parquet")
    typ = duckdb.sql("SELECT typeof(embedding) FROM read_parquet($p) LIMIT 1", params={"p": path}).fetchall()[0][0]
    assert typ in ("FLOAT[]", "FLOAT[32]")
    sim = duckdb.sql("SELECT list_cosine_similarity(embedding, embedding) FROM read_parquet($p) LIMIT 1",
                     params={"p": path}).fetchall()[0][0]
    assert sim == pytest.approx(1.0, abs=1e-5)


def test_views_expose_fixed_size_arrays_for_array_functions(con):
    assert con.sql("SELECT typeof(embedding) FROM movies_users LIMIT 1").fetchall()[0][0] == "FLOAT[32]"
    assert con.sql("SELECT typeof(embedding) FROM movies_items LIMIT 1").fetchall()[0][0] == "FLOAT[32]"
    assert con.sql("SELECT count(*) FROM movies_users").fetchall()[0][0] == 2030
    sim = con.sql("""SELECT array_cosine_similarity(a.embedding, b.embedding)
                     FROM movies_users a, movies_users b WHERE a.user_id = 1 AND b.user_id = 1""").fetchall()[0][0]
    assert sim == pytest.approx(1.0, abs=1e-5)


def test_sql_items_for_a_user_match_the_lookup_api(con, trained):
    root, _ = trained
    fs = aefeatures.open_store(root)["movies"]
    rows = con.execute("""
        SELECT i.item_id, array_inner_product(u.embedding, i.embedding) + i.bias AS score
        FROM movies_users u, movies_items i
        WHERE u.user_id = $user
          AND i.item_id NOT IN (SELECT item_id FROM movies_interactions WHERE user_id = $user)
        ORDER BY score DESC LIMIT 10""", {"user": 42}).fetchall()
    expected = fs.recommend(42, k=10)
    assert [r[0] for r in rows] == expected.ids.tolist()
    np.testing.assert_allclose([r[1] for r in rows], expected.scores, rtol=1e-4, atol=1e-4)


def test_catalog_uses_absolute_paths_and_works_from_any_directory(trained, tmp_path, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect()
    con.execute(render_views(root, "movies"))
    assert con.sql("SELECT count(*) FROM movies_items").fetchall()[0][0] == 500
