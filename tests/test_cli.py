"""The command line: run, recommend, similar, versions — output, --json, files, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from tests.conftest import write_job


@pytest.fixture()
def runner():
    return CliRunner()


def _seen(root, user) -> set:
    fs_path = next((root / "movies" / "versions").iterdir())
    pairs = pl.read_parquet(fs_path / "interactions.parquet")
    return set(pairs.filter(pl.col("user_id") == user).get_column("item_id").to_list())


def test_run_publishes_and_prints_a_summary_with_a_sample_lookup(tmp_path, runner):
    result = runner.invoke(cli, ["run", str(write_job(tmp_path, model={"epochs": 2}))])
    assert result.exit_code == 0, result.output
    assert "published movies version" in result.output
    assert "items for user 1:" in result.output and "items like item 1:" in result.output
    assert "  gate      passed: validation ndcg@100 " in result.output and " thread" in result.output
    assert (tmp_path / "store" / "movies" / "LATEST").is_file()

    again = runner.invoke(cli, ["run", "--json", str(write_job(tmp_path, model={"epochs": 2}))])
    summary = json.loads(again.stdout)
    assert summary["counts"]["users"] == 2030 and summary["status"] == "up_to_date"
    assert summary["sample"] is None  # nothing ran: no table is read for a sample


def test_the_run_sample_equals_the_lookups_without_loading_a_feature_set(trained, monkeypatch):
    from aefeatures.cli.run import _sample
    from aefeatures.serving import lookup

    root, result = trained
    fs = aefeatures.open_store(root)["movies"]
    user, item = fs.user_ids[0], fs.item_ids[0]
    expected = {"user": user, "recommend": fs.recommend(user, 5).ids.tolist(),
                "item": item, "similar": fs.similar_items(item, 5).ids.tolist()}

    def refuse(*args, **kwargs):
        raise AssertionError("the sample must not load whole tables")

    monkeypatch.setattr(lookup.FeatureSet, "__init__", refuse)
    monkeypatch.setattr(lookup.pq, "read_table", refuse)
    assert _sample(fs.path, fs.dim) == expected


def test_recommend_json_prints_k_unseen_items(trained, runner):
    root, _ = trained
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--name", "movies", "--user", "42",
                                 "-k", "10", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    items = [row["item_id"] for row in out["items"]]
    assert out["user"] == 42 and len(items) == 10 and len(set(items)) == 10
    assert not set(items) & _seen(root, 42)
    assert [row["rank"] for row in out["items"]] == list(range(1, 11))


def test_recommend_human_output_is_a_table(trained, runner):
    root, _ = trained
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--user", "42", "-k", "3"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert lines[0].startswith("items for user 42 (movies version")
    assert lines[1].split() == ["rank", "item_id", "score"] and len(lines) == 5


def test_recommend_users_file_writes_a_parquet_of_ranked_rows(trained, runner, tmp_path):
    root, _ = trained
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [1, 2, 3, 999_999]}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users), "-k", "4",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 of 4 user(s) not found" in result.stderr
    recs = pl.read_parquet(out)
    assert recs.columns == ["user_id", "item_id", "rank", "score"]
    assert recs.height == 12 and sorted(set(recs["user_id"].to_list())) == [1, 2, 3]
    for user in (1, 2, 3):
        assert not set(recs.filter(pl.col("user_id") == user)["item_id"].to_list()) & _seen(root, user)


def test_recommend_users_text_file(trained, runner, tmp_path):
    root, _ = trained
    users = tmp_path / "users.txt"
    users.write_text("1\n42\n\n")
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["user_id"] for r in json.loads(result.stdout)] == [1, 1, 42, 42]


def test_users_text_file_with_bom_crlf_spaces_and_repeats(trained, runner, tmp_path):
    root, _ = trained
    users = tmp_path / "users.txt"
    users.write_bytes("\ufeff42\r\n  1 \r\n\r\n+42\r\n0001\r\n".encode("utf-8"))
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # nobody "not found": the BOM is not glued to the first id
    assert [r["user_id"] for r in json.loads(result.stdout)] == [42, 42, 1, 1]  # each user once, first-seen order


def test_users_file_with_an_invalid_id_is_refused(trained, runner, tmp_path):
    root, _ = trained
    users = tmp_path / "users.txt"
    users.write_text("1\nabc\n")
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: 'abc' is not a valid user id") and len(result.stderr.splitlines()) == 1


def test_similar_json(trained, runner):
    root, _ = trained
    result = runner.invoke(cli, ["similar", "--store", str(root), "--item", "7", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["item"] == 7 and len(out["items"]) == 5 and 7 not in [r["item_id"] for r in out["items"]]


def test_versions_lists_the_live_version(trained, runner):
    root, result_ = trained
    result = runner.invoke(cli, ["versions", "--store", str(root), "--json"])
    out = json.loads(result.stdout)
    assert out["feature_set"] == "movies"
    assert [v["version"] for v in out["versions"] if v["live"]] == [result_.version]
    human = runner.invoke(cli, ["versions", "--store", str(root)])
    assert any(line.split()[:2] == [result_.version, "live"] for line in human.stdout.splitlines())


@pytest.mark.parametrize("args, code, message", [
    (["recommend", "--user", "999999"], 5, "error: user `999999` not found in feature set `movies`"),
    (["recommend", "--user", "abc"], 2, "error: 'abc' is not a valid user id: user ids of this feature set are integers"),
    (["similar", "--item", "123456"], 5, "error: item `123456` not found"),
    (["recommend", "--name", "books", "--user", "1"], 2, "error: store `"),
    (["recommend", "--user", "1", "-k", "0"], 2, "Invalid value for '-k'"),
    (["recommend"], 2, "pass exactly one of --user, --users-file or --history"),
    (["recommend", "--history", "999998,999999"], 5, "error: items ['999998', '999999'] not found"),
    (["recommend", "--history", ""], 2, "error: the history is empty"),
    (["recommend", "--history", "7,12", "--weights", "5"], 2, "must be a list of 2 numbers"),
    (["recommend", "--history", "7,12", "--weights", "5,x"], 2, "weights are numbers separated by commas"),
    (["recommend", "--user", "42", "--weights", "5"], 2, "--weights goes with --history"),
])
def test_lookup_errors_are_one_line_with_their_exit_code(trained, runner, args, code, message):
    root, _ = trained
    result = runner.invoke(cli, [args[0], "--store", str(root), *args[1:]])
    assert result.exit_code == code
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_missing_store_is_a_bad_input(runner, tmp_path):
    result = runner.invoke(cli, ["versions", "--store", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: store `") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["run", "recommend", "similar", "versions", "evaluate", "runs", "anomalies", "embed",
                                     "sql", "feast-export"])
def test_every_command_has_help_with_exit_codes(runner, command):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.output and "Usage: " in result.output


def test_similar_users_and_cosine_items(trained, runner):
    root, _ = trained
    users = runner.invoke(cli, ["similar", "--store", str(root), "--user", "42", "-k", "4", "--json"])
    assert users.exit_code == 0, users.output
    out = json.loads(users.stdout)
    assert out["user"] == 42 and len(out["users"]) == 4 and 42 not in [r["user_id"] for r in out["users"]]
    cosine = runner.invoke(cli, ["similar", "--store", str(root), "--item", "7", "--metric", "cosine"])
    assert cosine.exit_code == 0 and cosine.stdout.startswith("items like item 7")
    neither = runner.invoke(cli, ["similar", "--store", str(root)])
    assert neither.exit_code == 2 and "exactly one of --item, --user or --history" in neither.output


def test_recommend_and_similar_from_a_history(trained, runner):
    root, _ = trained
    fs = aefeatures.open_store(root)["movies"]
    history = [int(i) for i in fs.recommend(42, k=4, exclude_seen=False).ids]
    args = ["--store", str(root), "--history", ",".join(map(str, history + [10**9])), "-k", "5", "--json"]
    recs = runner.invoke(cli, ["recommend", *args])
    assert recs.exit_code == 0, recs.output
    out = json.loads(recs.stdout)
    assert out["history"] == history + [10**9] and out["unknown"] == [10**9]
    assert [r["item_id"] for r in out["items"]] == fs.recommend_history(history, k=5).ids.tolist()
    assert "1 item(s) of the history not found" in recs.stderr
    users = runner.invoke(cli, ["similar", *args[:4], "-k", "3"])
    assert users.exit_code == 0 and users.stdout.startswith("users like a history of 5 item(s)")


def test_logging_options_after_the_command_and_a_json_final_error(runner, tmp_path):
    missing = str(tmp_path / "missing.toml")
    for args in (["--log-format", "json", "run", missing], ["run", missing, "--log-format", "json"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2
        line = json.loads(result.stderr.strip().splitlines()[-1])
        assert line["level"] == "ERROR" and "missing.toml" in line["message"] and line["exit_code"] == 2
    result = runner.invoke(cli, ["run", missing, "-v"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    for command in cli.commands:
        help_text = runner.invoke(cli, [command, "--help"]).output
        assert "--verbose" in help_text and "--log-format" in help_text, command


def test_evaluate_shows_the_training_curve(trained, runner):
    root, result = trained
    out = runner.invoke(cli, ["evaluate", "--store", str(root)])
    assert out.exit_code == 0, out.output
    assert "training curve:" in out.stdout and "ndcg@100" in out.stdout
    best = result.manifest["training"]["best_epoch"]
    marked = [line.split() for line in out.stdout.splitlines() if line.rstrip().endswith("*")]
    assert [int(row[0]) for row in marked] == [best]
    assert "quality gate: passed: validation ndcg@100" in out.stdout


def test_runs_table_shows_the_whole_error(tmp_path, runner):
    job = write_job(tmp_path, input={"path": str(tmp_path / "nothing_here_at_all" / "*.parquet")})
    assert runner.invoke(cli, ["run", str(job)]).exit_code == 2
    error = json.loads(runner.invoke(cli, ["runs", "--store", str(tmp_path / "store"), "--json"]).stdout)
    message = error["runs"][-1]["error"]
    assert len(message) > 60
    table = runner.invoke(cli, ["runs", "--store", str(tmp_path / "store")])
    assert message in table.stdout


def test_sql_and_feast_export_have_json(trained, runner, tmp_path):
    root, _ = trained
    out = runner.invoke(cli, ["sql", "--store", str(root), "-c", "SELECT count(*) AS n FROM movies_items", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == [{"n": 500}]
    out = runner.invoke(cli, ["feast-export", "--store", str(root), "--output", str(tmp_path / "feast"), "--json"])
    assert out.exit_code == 0, out.output
    files = json.loads(out.stdout)["files"]
    assert files and all((tmp_path / "feast" / Path(f).name).is_file() for f in files)
    umask = os.umask(0o022)
    os.umask(umask)
    assert all((Path(f).stat().st_mode & 0o777) == 0o666 & ~umask for f in files)  # readable by other users


def test_users_file_without_output_prints_a_titled_table(trained, runner, tmp_path):
    root, _ = trained
    users = tmp_path / "users.txt"
    users.write_text("1\n42\n")
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users), "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("items for 2 user(s) (movies version ")
    assert lines[1].split() == ["user_id", "item_id", "rank", "score"] and len(lines) == 6


def test_similar_users_refuses_a_metric_instead_of_ignoring_it(trained, runner):
    root, _ = trained
    result = runner.invoke(cli, ["similar", "--store", str(root), "--user", "1", "--metric", "ip"])
    assert result.exit_code == 2 and "cosine" in result.output
    assert runner.invoke(cli, ["similar", "--store", str(root), "--item", "1", "--metric", "ip"]).exit_code == 0


def test_anomalies_default_k_matches_python(trained, runner):
    import aefeatures

    root, _ = trained
    out = json.loads(runner.invoke(cli, ["anomalies", "--store", str(root), "--json"]).stdout)
    assert len(out["users"]) == aefeatures.open_store(root)["movies"].anomalies().height == 20


def test_an_unknown_user_is_pointed_to_embed(trained, runner):
    root, _ = trained
    result = runner.invoke(cli, ["recommend", "--store", str(root), "--user", "999999"])
    assert result.exit_code == 5 and "aefeatures embed" in result.stderr
