"""The SQL catalog over several versions: every view and macro against numpy, as-of queries,
the `aefeatures sql` command with parameters, and the Feast export."""

from __future__ import annotations

import ast
import json
from datetime import datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.export.catalog import connect
from aefeatures.jobs.run import run_job
from tests.conftest import write_job

NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sql")
    results = [run_job(load_job_config(write_job(folder, model={"epochs": e, "dim": 16, "hidden": [64]},
                                                 gate=NO_GATE, filename=f"job{e}.toml")), progress=False)
               for e in (2, 3, 4)]
    return folder / "store", results


@pytest.fixture()
def con(three_versions):
    root, _ = three_versions
    con = duckdb.connect()
    con.execute((root / "catalog.sql").read_text())
    return con


def _vectors(path, table):
    frame = pl.read_parquet(path / f"{table}.parquet")
    return frame.get_column(f"{table[:-1]}_id").to_numpy(), np.stack(frame.get_column("embedding").to_numpy())


def test_versions_view_lists_every_version_with_validity(con, three_versions):
    _, results = three_versions
    rows = con.sql("SELECT version, valid_from, valid_to, live FROM movies_versions ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [r.version for r in results]
    assert [r[3] for r in rows] == [False, False, True]
    assert rows[0][2] == rows[1][1] and rows[-1][2] is None


def test_all_versions_views_hold_every_versions_rows(con, three_versions):
    _, results = three_versions
    counts = dict(con.sql("SELECT version, count(*) FROM movies_users_all GROUP BY 1").fetchall())
    assert counts == {r.version: 2030 for r in results}
    assert con.sql("SELECT typeof(embedding) FROM movies_items_all LIMIT 1").fetchall()[0][0] == "FLOAT[16]"
    first = results[0]
    ids, vectors = _vectors(first.path, "users")
    got = con.execute("SELECT embedding FROM movies_users_all WHERE version = $v AND user_id = 42",
                      {"v": first.version}).fetchall()[0][0]
    np.testing.assert_allclose(got, vectors[np.searchsorted(ids, 42)], rtol=1e-6)


def test_recommend_macro_equals_the_lookup_api(con, three_versions):
    root, _ = three_versions
    fs = aefeatures.open_store(root)["movies"]
    for user in (1, 42, 1999):
        rows = con.execute("SELECT item_id, score FROM movies_recommend($u, 10)", {"u": user}).fetchall()
        expected = fs.recommend(user, k=10)
        assert [r[0] for r in rows] == expected.ids.tolist()
        np.testing.assert_allclose([r[1] for r in rows], expected.scores, rtol=1e-4, atol=1e-4)


def _numpy_top(ids, vectors, query_id, k, *, cosine):
    if cosine:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row = np.searchsorted(ids, query_id)
    scores = vectors @ vectors[row]
    scores[row] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    return ids[top].tolist(), scores[top]


@pytest.mark.parametrize("table, macro, query, cosine", [("items", "movies_similar_items", 7, False),
                                                         ("users", "movies_similar_users", 42, True)])
def test_similarity_macros_equal_numpy(con, three_versions, table, macro, query, cosine):
    _, results = three_versions
    ids, vectors = _vectors(results[-1].path, table)
    expected_ids, expected_scores = _numpy_top(ids, vectors, query, 10, cosine=cosine)
    rows = con.sql(f"SELECT * FROM {macro}({query}, 10)").fetchall()
    assert [r[0] for r in rows] == expected_ids
    np.testing.assert_allclose([r[1] for r in rows], expected_scores, rtol=1e-4)


def test_embedding_as_of_returns_the_version_live_then(con, three_versions):
    _, results = three_versions
    for i, result in enumerate(results):
        live_from = datetime.fromisoformat(result.manifest["valid_from"])
        at = live_from + timedelta(microseconds=1)
        rows = con.execute("SELECT version, embedding FROM movies_user_embedding_asof(42, $t)", {"t": at}).fetchall()
        assert [r[0] for r in rows] == [result.version], i
        ids, vectors = _vectors(result.path, "users")
        np.testing.assert_allclose(rows[0][1], vectors[np.searchsorted(ids, 42)], rtol=1e-6)
    before = datetime.fromisoformat(results[0].manifest["valid_from"]) - timedelta(seconds=1)
    assert con.execute("SELECT * FROM movies_user_embedding_asof(42, $t)", {"t": before}).fetchall() == []


def test_as_of_never_returns_a_version_before_it_existed(con, three_versions):
    """Point-in-time: at any time, the as-of macros answer only with a version whose values had
    been written (valid_from <= t), and valid_from comes after that version's training."""
    _, results = three_versions
    ends = [datetime.fromisoformat(r.manifest["valid_from"]) for r in results[1:]] + [None]
    for result, valid_to in zip(results, ends):
        valid_from = datetime.fromisoformat(result.manifest["valid_from"])
        trained_from = datetime.fromisoformat(result.manifest["created_at"])
        assert valid_from >= trained_from  # taken after training, when the tables were written
        for at in (valid_from - timedelta(microseconds=1), valid_from, valid_from + timedelta(seconds=1)):
            for macro, key in (("movies_user_embedding_asof", 42), ("movies_item_embedding_asof", 7)):
                rows = con.execute(f"SELECT version, event_timestamp FROM {macro}($k, $t)",
                                   {"k": key, "t": at}).fetchall()
                for version, event_time in rows:
                    assert event_time <= at, (macro, version, at)
                live_then = at >= valid_from and (valid_to is None or at < valid_to)
                assert (result.version in [r[0] for r in rows]) == live_then
    # every row of every version: event_timestamp is its version's valid_from, last interaction before it
    bad = con.sql("SELECT count(*) FROM movies_users_all u JOIN movies_versions v USING (version) "
                  "WHERE u.event_timestamp <> v.valid_from OR u.last_interaction > v.valid_from").fetchall()[0][0]
    assert bad == 0


def test_sql_command_formats_and_parameters(three_versions, tmp_path):
    root, _ = three_versions
    runner = CliRunner()
    query = "SELECT item_id, score FROM movies_recommend($user, 5)"
    as_json = runner.invoke(cli, ["sql", "--store", str(root), "-c", query, "--param", "user=42", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    expected = aefeatures.open_store(root)["movies"].recommend(42, k=5).ids.tolist()
    assert [r["item_id"] for r in json.loads(as_json.stdout)] == expected
    as_csv = runner.invoke(cli, ["sql", "--store", str(root), "-c", query, "--param", "user=42", "--format", "csv"])
    assert as_csv.stdout.splitlines()[0] == "item_id,score" and len(as_csv.stdout.splitlines()) == 6
    out = tmp_path / "recs.parquet"
    as_parquet = runner.invoke(cli, ["sql", "--store", str(root), "-c", query, "--param", "user=42",
                                     "--format", "parquet", "--output", str(out)])
    assert as_parquet.exit_code == 0 and pl.read_parquet(out).get_column("item_id").to_list() == expected
    script = tmp_path / "q.sql"
    script.write_text("CREATE TEMP TABLE top AS SELECT * FROM movies_items ORDER BY popularity DESC LIMIT 3;\n"
                      "SELECT count(*) AS n FROM top;\n")
    from_file = runner.invoke(cli, ["sql", "--store", str(root), "-f", str(script), "--format", "csv"])
    assert from_file.stdout.splitlines() == ["n", "3"]
    table = runner.invoke(cli, ["sql", "--store", str(root), "-c", "SELECT 1 AS one"])
    assert "one" in table.stdout


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_everyday_result_types_print_in_every_format(three_versions, fmt):
    """INTERVALs, embeddings (fixed-size lists), structs and timestamps: each format gets them as
    text it can hold (a CSV cell holds a nested value as JSON), never a traceback."""
    root, _ = three_versions
    query = ("SELECT user_id, embedding, INTERVAL 90 MINUTE AS wait, {'a': 1, 'b': [1.5::DOUBLE, 2.5]} AS s, "
             "event_timestamp FROM movies_users ORDER BY user_id LIMIT 2")
    done = CliRunner().invoke(cli, ["sql", "--store", str(root), "-c", query, "--format", fmt])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output
    if fmt == "csv":
        header, first, *_ = done.stdout.splitlines()
        assert header == "user_id,embedding,wait,s,event_timestamp"
        cells = next(iter(__import__("csv").reader([first])))
        assert len(json.loads(cells[1])) == 16 and cells[2] == "01:30:00" and json.loads(cells[3]) == {"a": 1, "b": [1.5, 2.5]}
    elif fmt == "json":
        rows = json.loads(done.stdout)
        assert len(rows) == 2 and len(rows[0]["embedding"]) == 16 and rows[0]["wait"] == "01:30:00"
    else:
        assert "01:30:00" in done.stdout


@pytest.mark.parametrize("hostile", ["42; DROP VIEW movies_users; --", "' OR 1=1 --", 'x"); SELECT 1; --'])
def test_hostile_values_are_data_not_sql(three_versions, hostile):
    root, _ = three_versions
    runner = CliRunner()
    result = runner.invoke(cli, ["sql", "--store", str(root), "-c",
                                 "SELECT count(*) AS n FROM movies_items WHERE CAST(item_id AS VARCHAR) = $v",
                                 "--param", f"v={hostile}", "--format", "csv"])
    assert result.exit_code == 0 and result.stdout.splitlines() == ["n", "0"]
    as_int = runner.invoke(cli, ["sql", "--store", str(root), "-c", "SELECT * FROM movies_users WHERE user_id = $v",
                                 "--param", f"v={hostile}"])
    assert as_int.exit_code == 2 and as_int.stderr.startswith("error: SQL failed: Conversion Error")
    after = connect(root).sql("SELECT count(*) FROM movies_users").fetchall()[0][0]
    assert after == 2030  # the view is still there


def test_sql_errors_are_one_line(three_versions):
    root, _ = three_versions
    result = CliRunner().invoke(cli, ["sql", "--store", str(root), "-c", "SELECT * FROM nowhere"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    bad_param = CliRunner().invoke(cli, ["sql", "--store", str(root), "-c", "SELECT 1", "--param", "no-equals"])
    assert bad_param.exit_code == 2 and "NAME=VALUE" in bad_param.output


def test_interactive_prompt(three_versions):
    root, _ = three_versions
    result = CliRunner().invoke(cli, ["sql", "--store", str(root)],
                                input="SELECT count(*) AS n\nFROM movies_items;\nSELECT nope;\n")
    assert result.exit_code == 0 and "500" in result.stdout and "error:" in result.stderr


def test_feast_export_writes_a_feature_repo(three_versions, tmp_path):
    root, results = three_versions
    out = CliRunner().invoke(cli, ["feast-export", "--store", str(root), "--output", str(tmp_path / "repo")])
    assert out.exit_code == 0, out.output
    code = (tmp_path / "repo" / "movies_features.py").read_text()
    tree = ast.parse(code)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"Entity", "FileSource", "FeatureView", "Field", "Array"} <= calls
    assert str(results[-1].path.resolve() / "users.parquet") in code
    assert 'Field(name="embedding", dtype=Array(Float32))' in code
    assert "project: movies" in (tmp_path / "repo" / "feature_store.yaml").read_text()


def test_parse_param_types_id_parameters_by_the_id_type():
    from aefeatures.errors import InvalidIdError
    from aefeatures.export.catalog import parse_param

    ints, strings = {"user": "int64", "item_id": "uint64"}, {"user": "<U1", "item": "<U1"}
    assert parse_param("user=00042", ints) == ("user", 42)
    assert parse_param(f"item_id={2**64 - 1}", ints) == ("item_id", 2**64 - 1)
    assert parse_param("user=00042", strings) == ("user", "00042")
    assert parse_param("item=38", strings) == ("item", "38")
    with pytest.raises(InvalidIdError, match="'abc' is not a valid user id"):
        parse_param("user=abc", ints)
    # other parameters: an integer only when written as one canonically
    assert parse_param("k=10") == ("k", 10) and parse_param("code=0038") == ("code", "0038")
    assert parse_param("x=1.5") == ("x", 1.5) and parse_param("s=abc") == ("s", "abc")


def _as_schema_1(folder):
    """Rewrite a version as aefeatures wrote it before table schema 2."""
    import pyarrow.parquet as pq

    for table in ("users", "items"):
        path = folder / f"{table}.parquet"
        t = pq.read_table(path)
        last = t.column("last_interaction")
        t = t.drop_columns(["last_interaction", "event_timestamp"])
        t = t.add_column(t.schema.get_field_index("created_timestamp"), "event_timestamp",
                         pa.compute.coalesce(last, t.column("created_timestamp")))
        pq.write_table(t, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 1
    del manifest["valid_from"]
    del manifest["files"]  # fingerprints came later still
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_schema_1_versions_stay_readable_with_schema_2_meaning(three_versions, tmp_path):
    import shutil

    root, results = three_versions
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    old = [_as_schema_1(copy / "movies" / "versions" / r.version) for r in results[:2]]
    con = connect(copy)
    rows = con.execute("SELECT DISTINCT version, event_timestamp, schema_version FROM movies_users_all "
                       "JOIN movies_versions USING (version) ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [r.version for r in results]
    assert [r[2] for r in rows] == [1, 1, 2]
    assert rows[0][1] == datetime.fromisoformat(old[0]["created_at"])
    got = con.execute("SELECT user_id, last_interaction FROM movies_users_all WHERE version = $v ORDER BY user_id",
                      {"v": results[0].version}).fetchall()
    want = pl.read_parquet(results[0].path / "users.parquet").sort("user_id")
    assert [r[0] for r in got] == want.get_column("user_id").to_list()
    assert [r[1] for r in got] == want.get_column("last_interaction").to_list()
    # a schema-1 live version: lookups and the live views work
    _as_schema_1(copy / "movies" / "versions" / results[2].version)
    assert aefeatures.open_store(copy)["movies"].recommend(42, k=5).ids.tolist() == \
        aefeatures.open_store(root)["movies"].recommend(42, k=5).ids.tolist()
    live = connect(copy).sql("SELECT count(*), count(DISTINCT event_timestamp) FROM movies_users").fetchall()[0]
    assert live == (2030, 1)


def test_a_newer_schema_is_refused_clearly(three_versions, tmp_path):
    import shutil

    root, results = three_versions
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    path = copy / "movies" / "versions" / results[-1].version / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(aefeatures.errors.BadInputError, match="schema_version 99.*Upgrade aefeatures"):
        aefeatures.open_store(copy)["movies"].recommend(42, k=5)
