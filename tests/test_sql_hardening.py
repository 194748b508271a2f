"""The SQL side under attack and damage: nothing read from a store (folder names, manifests,
paths) reaches SQL as code, a broken version or feature set is left out instead of taking
`aefeatures sql` down, every macro casts its id argument to the id column's type, and
`aefeatures sql --safe` refuses what a less trusted user must not do while the README's
queries still answer."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.export.catalog import connect
from aefeatures.jobs.run import run_job
from tests.conftest import FIXTURES, REPO, cli_runner, write_job

NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}
SMALL = {"dim": 8, "hidden": [32]}
README = (REPO / "README.md").read_text()


def _attributes(n_items: int = 500) -> pl.DataFrame:
    ids = list(range(n_items))
    return pl.DataFrame({"item_id": ids, "category": [("books", "toys", "food", None)[i % 4] for i in ids],
                         "in_stock": [i % 3 != 0 for i in ids], "tags": [["kids"] if i % 5 == 0 else ["new"] for i in ids],
                         "price": [float(i % 40) for i in ids]})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(int-id store "example" with attributes and two versions, string-id store "strs")."""
    folder = tmp_path_factory.mktemp("sql-hardening")
    _attributes().write_parquet(folder / "items.parquet")
    for epochs in (2, 3):
        job = write_job(folder, name="example", model={"epochs": epochs, **SMALL}, gate=NO_GATE,
                        evaluation={"valid_share": 0.0}, filename=f"job{epochs}.toml")
        job.write_text(job.read_text() + f'[items]\npath = "{folder / "items.parquet"}"\nid_col = "item_id"\n')
        run_job(load_job_config(job), progress=False)
    strs = tmp_path_factory.mktemp("sql-hardening-str")
    job = write_job(strs, name="strs", model={"epochs": 2, **SMALL}, gate=NO_GATE, evaluation={"valid_share": 0.0},
                    input={"path": str(FIXTURES / "interactions_str.parquet"), "weight_col": "rating",
                           "timestamp_col": "timestamp", "min_weight": 4.0})
    run_job(load_job_config(job), progress=False)
    return folder / "store", strs / "store"


@pytest.fixture()
def store(built, tmp_path):
    """A private copy of the int-id store, free to damage."""
    return Path(shutil.copytree(built[0], tmp_path / "store"))


def _versions(store: Path, name: str = "example") -> list[Path]:
    return sorted((store / name / "versions").iterdir())


def _sql(store: Path, *args: str, input: str | None = None):
    return cli_runner().invoke(cli, ["sql", "--store", str(store), *args], input=input)


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "WARNING" in line]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


# --- 11: names, manifests and paths never reach SQL as code ---------------------------------------


def test_a_feature_set_folder_whose_name_is_no_identifier_is_left_out_not_spliced(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crafted = "x AS SELECT 1; COPY (SELECT 42) TO 'pwned.csv'; CREATE VIEW y"
    shutil.copytree(store / "example", store / crafted)
    result = _sql(store, "-c", "SELECT count(*) AS n FROM example_users", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "pwned.csv").exists()
    (warning,) = _warnings(result)
    assert "left out" in warning and "COPY" in warning


def test_folders_that_differ_only_in_case_are_both_left_out_never_one_answering_for_the_other(store):
    """SQL names ignore case: with `example` and a hand-made `EXAMPLE`, `example_items` must not
    answer with `EXAMPLE`'s rows (it did: the first in sort order was kept)."""
    shutil.copytree(store / "example", store / "EXAMPLE")
    result = _sql(store, "-c", "SELECT count(*) AS n FROM example_items", "--format", "csv")
    assert result.exit_code == 2, result.stdout  # no such view: neither is shown
    warned = " ".join(_warnings(result))
    assert "'EXAMPLE' is left out" in warned and "'example' is left out" in warned


def test_an_attribute_column_name_in_a_hand_edited_manifest_cannot_inject_sql(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    live = _versions(store)[-1]
    evil = (f"x\" FROM read_parquet('{live / 'items.parquet'}') i, (SELECT 1 AS x) a; "
            "COPY (SELECT 42) TO 'pwned.csv'; SELECT 1 AS \"y")
    pl.DataFrame({"item_id": list(range(500)), evil: list(range(500))}).write_parquet(live / "attributes.parquet")
    manifest = _manifest(live)
    manifest["attributes"]["columns"] = {evil: "Int64"}
    _write_manifest(live, manifest)
    result = _sql(store, "-c", "SELECT count(*) AS n FROM example_items", "--format", "csv")
    assert not (tmp_path / "pwned.csv").exists()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["n", "500"]
    (warning,) = _warnings(result)
    assert "attribute column" in warning and "left out" in warning


def test_a_keyword_attribute_name_is_quoted(store):
    live = _versions(store)[-1]
    ids = pl.read_parquet(live / "items.parquet").get_column("item_id")
    pl.DataFrame({"item_id": ids, "select": [i % 2 == 0 for i in range(len(ids))]}).write_parquet(
        live / "attributes.parquet")
    manifest = _manifest(live)
    manifest["attributes"]["columns"] = {"select": "Boolean"}
    _write_manifest(live, manifest)
    con = connect(store)
    assert con.sql('SELECT count(*) FROM example_items WHERE "select"').fetchall() == [((len(ids) + 1) // 2,)]


@pytest.mark.parametrize("edit", [
    {"counts": {"users": "1); COPY (SELECT 42) TO 'pwned.csv'; --", "items": 1}},
    {"dim": "8); COPY (SELECT 42) TO 'pwned.csv'; --"},
    {"valid_from": "yesterday'); COPY (SELECT 42) TO 'pwned.csv'; --"},
    {"schema_version": True},
], ids=["counts", "dim", "valid_from", "schema_version"])
def test_a_hand_edited_old_manifest_is_left_out_of_the_all_versions_views(store, tmp_path, monkeypatch, edit):
    monkeypatch.chdir(tmp_path)
    old, live = _versions(store)
    _write_manifest(old, {**_manifest(old), **edit})
    result = _sql(store, "-c", "SELECT version FROM example_versions", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["version", live.name]
    assert not (tmp_path / "pwned.csv").exists()
    (warning,) = _warnings(result)
    assert old.name in warning and "left out" in warning


def test_non_numeric_metrics_are_null_and_text_is_a_literal(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old, live = _versions(store)
    manifest = _manifest(live)
    manifest["evaluation"] = {"model": {"ndcg@100": "0.5); COPY (SELECT 42) TO 'pwned.csv'; --"}}
    manifest["alignment"] = {"aligned": True, "residual": "oops"}
    manifest["drift"] = {"against": "it's'); COPY (SELECT 42) TO 'pwned.csv'; --",
                         "user_cosine": {"q50": [1]}, "churn": {"mean": 0.25}}
    _write_manifest(live, manifest)
    con = connect(store)
    assert con.sql("SELECT ndcg_at_100 FROM example_versions WHERE live").fetchall() == [(None,)]
    row = con.execute("SELECT against, residual, user_cos_q50, churn_mean FROM example_drift WHERE version = $v",
                      {"v": live.name}).fetchall()
    assert row == [(manifest["drift"]["against"], None, None, 0.25)]
    assert not (tmp_path / "pwned.csv").exists()


def test_a_version_folder_whose_name_is_no_version_id_is_left_out(store):
    old, live = _versions(store)
    shutil.copytree(old, old.parent / "0[x]")
    result = _sql(store, "-c", "SELECT DISTINCT version FROM example_users_all ORDER BY 1", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["version", old.name, live.name]
    (warning,) = _warnings(result)
    assert "0[x]" in warning


def test_a_store_path_with_glob_characters_reads_its_own_files(built, tmp_path):
    ours = Path(shutil.copytree(built[0], tmp_path / "s[1]" / "store"))
    decoy = Path(shutil.copytree(built[0], tmp_path / "s1" / "store"))  # what `s[1]` matches as a glob
    for version in _versions(decoy):
        for table in ("users", "items"):
            path = version / f"{table}.parquet"
            pq.write_table(pq.read_table(path).slice(0, 1), path)
    con = connect(ours)
    assert con.sql("SELECT count(*) FROM example_users").fetchall() == [(2030,)]
    assert con.sql("SELECT count(*) FROM example_users_all").fetchall() == [(4060,)]
    assert con.sql("SELECT count(*) FROM example_items").fetchall() == [(500,)]
    assert _sql(ours, "--safe", "-c", "SELECT count(*) AS n FROM example_items_all", "--format", "csv"
                ).stdout.splitlines() == ["n", "1000"]


# --- 7: a damaged version or feature set is left out, not fatal -----------------------------------


@pytest.mark.parametrize("damage", ["users_missing", "items_truncated", "manifest_garbage"])
def test_a_damaged_old_version_is_left_out_of_the_all_versions_views(store, damage):
    old, live = _versions(store)
    if damage == "users_missing":
        (old / "users.parquet").unlink()
    elif damage == "items_truncated":
        data = (old / "items.parquet").read_bytes()
        (old / "items.parquet").write_bytes(data[: len(data) // 2])
    else:
        (old / "manifest.json").write_text("{not json")
    result = _sql(store, "-c", "SELECT DISTINCT version FROM example_items_all", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["version", live.name]
    (warning,) = _warnings(result)
    assert old.name in warning and "example" in warning


def test_a_feature_set_with_a_broken_live_version_is_left_out_and_the_others_answer(store):
    shutil.copytree(store / "example", store / "broken")
    _, live = _versions(store, "broken")
    (live / "items.parquet").unlink()
    result = _sql(store, "-c", "SELECT * FROM example_recommend($user, 3)", "--param", "user=42", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4
    (warning,) = _warnings(result)
    assert "broken" in warning and live.name in warning
    (live / "manifest.json").write_text("[]")  # and a live manifest that does not read: --param still works
    result = _sql(store, "-c", "SELECT * FROM example_recommend($user, 3)", "--param", "user=42", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4


# --- 12: every macro casts its id argument to the id column's type --------------------------------


def test_filtered_and_asof_macros_on_string_ids_follow_the_id_rule(built):
    con = connect(built[1])
    assert con.sql("SELECT * FROM strs_recommend_where(42, 5, true)").fetchall() == []
    assert con.sql("SELECT * FROM strs_similar_items_where(7, 5, true)").fetchall() == []
    assert con.sql("SELECT * FROM strs_item_embedding_asof(7, now())").fetchall() == []
    assert con.sql("SELECT * FROM strs_user_embedding_asof(42, now())").fetchall() == []
    assert con.sql("SELECT * FROM strs_recommend_where('0042', 5, true)").fetchall() == []
    user = con.sql("SELECT user_id FROM strs_users ORDER BY user_id LIMIT 1").fetchall()[0][0]
    item = con.sql("SELECT item_id FROM strs_items ORDER BY item_id LIMIT 1").fetchall()[0][0]
    assert isinstance(user, str) and isinstance(item, str)
    assert (con.execute("SELECT * FROM strs_recommend_where($u, 5, true)", {"u": user}).fetchall()
            == con.execute("SELECT * FROM strs_recommend($u, 5)", {"u": user}).fetchall() != [])
    assert (con.execute("SELECT * FROM strs_similar_items_where($i, 5, true)", {"i": item}).fetchall()
            == con.execute("SELECT * FROM strs_similar_items($i, 5)", {"i": item}).fetchall() != [])
    assert [r[0] for r in con.execute("SELECT * FROM strs_item_embedding_asof($i, now())", {"i": item}).fetchall()] \
        == [item]


def test_filtered_and_asof_macros_on_integer_ids_follow_the_id_rule(built):
    con = connect(built[0])
    expected = con.sql("SELECT * FROM example_recommend(42, 5)").fetchall()
    assert con.sql("SELECT * FROM example_recommend_where('0042', 5, true)").fetchall() == expected
    assert con.sql("SELECT * FROM example_recommend_where(42::UTINYINT, 5, true)").fetchall() == expected
    similar = con.sql("SELECT * FROM example_similar_items(7, 5)").fetchall()
    assert con.sql("SELECT * FROM example_similar_items_where('007', 5, true)").fetchall() == similar
    assert [r[0] for r in con.sql("SELECT * FROM example_item_embedding_asof('007', now())").fetchall()] == [7]
    with pytest.raises(duckdb.ConversionException):
        con.sql("SELECT * FROM example_item_embedding_asof('i007', now())").fetchall()


# --- 13: aefeatures sql --safe -----------------------------------------------------------------------


def _attacks(store: Path, tmp_path: Path) -> dict[str, str]:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(_versions(store)[-1] / "users.parquet", other / "users.parquet")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("secret")
    return {
        "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
        "read_text": "SELECT * FROM read_text('/etc/passwd')",
        "copy_out": f"COPY (SELECT 42) TO '{tmp_path / 'out.csv'}'",
        "copy_into_store": f"COPY (SELECT 42) TO '{store / 'example' / 'versions' / 'out.csv'}'",
        "second_statement": f"SELECT 1; COPY (SELECT 42) TO '{tmp_path / 'out.csv'}'",
        "export": f"EXPORT DATABASE '{tmp_path / 'dump'}'",
        "attach": f"ATTACH '{tmp_path / 'x.db'}' AS x",
        "install": "INSTALL httpfs",
        "load": "LOAD httpfs",
        "remote": "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "set_access": "SET enable_external_access = true",
        "unlock": "SET lock_configuration = false",
        "other_parquet": f"SELECT count(*) FROM read_parquet('{other / 'users.parquet'}')",
        "store_outside_versions": f"SELECT * FROM read_text('{store / 'example' / 'LATEST'}')",
        "dotdot": f"SELECT * FROM read_text('{_versions(store)[-1]}/../../LATEST')",
        "create": "CREATE TABLE t AS SELECT 1",
        "spill_folder": "SELECT * FROM read_text('.tmp/secret.txt')",  # DuckDB's default temp folder
    }


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_safe_mode_refuses_every_attack_with_one_line(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attacks = _attacks(store, tmp_path)
    before, outside = _tree(store), _tree(tmp_path)
    for what, text in attacks.items():
        line = _one_line_error(_sql(store, "--safe", "-c", text))
        assert line.startswith("error:") and ("--safe" in line or "locked" in line), (what, line)
    assert _tree(store) == before and _tree(tmp_path) == outside


def test_safe_mode_refuses_the_same_at_the_prompt_and_goes_on(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _sql(store, "--safe", input=f"COPY (SELECT 42) TO '{tmp_path / 'out.csv'}';\n"
                                          "SET enable_external_access = true;\nSELECT 7 AS seven;\n")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "out.csv").exists()
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 2
    assert "seven" in result.stdout


def test_the_trusted_default_still_reads_and_writes_anywhere(store, tmp_path, monkeypatch):
    """Without --safe the command is a trusted analyst's tool, as the README says."""
    monkeypatch.chdir(tmp_path)
    result = _sql(store, "-c", f"COPY (SELECT 42 AS x) TO '{tmp_path / 'out.csv'}'")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.csv").read_text().splitlines() == ["x", "42"]


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_every_readme_sql_example_answers_in_safe_mode(store, monkeypatch):
    queries = re.findall(r"```sql\n(.*?)```", _section("Query with SQL"), flags=re.S)
    queries += re.findall(r"```sql filters\n(.*?)```", _section("Item attributes and filters"), flags=re.S)
    assert len(queries) == 7
    for query in queries:
        result = _sql(store, "--safe", "-c", query, "--format", "csv")
        assert result.exit_code == 0, (query, result.stderr)
        assert len(result.stdout.splitlines()) >= 2, query
    monkeypatch.chdir(store.parent)
    lines = [line for block in re.findall(r"```bash\n(.*?)```", _section("Query with SQL"), flags=re.S)
             for line in block.splitlines() if line.startswith("aefeatures sql --safe")]
    assert lines
    for line in lines:
        result = cli_runner().invoke(cli, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.stderr)
        assert len(result.stdout.splitlines()) == 11


# --- a sibling: the Feast export writes the feature set's name into Python source ------------------


def test_feast_export_refuses_a_feature_set_folder_whose_name_is_no_identifier(built, tmp_path):
    store = tmp_path / "store"
    crafted = 'x"); __import__("os").system("touch pwned"); ("'
    shutil.copytree(built[0] / "example", store / crafted)
    result = cli_runner().invoke(cli, ["feast-export", "--store", str(store), "--output", str(tmp_path / "repo")])
    assert "no identifier" in _one_line_error(result)
    assert not (tmp_path / "repo").exists()
