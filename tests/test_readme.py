"""The README's commands and examples stay true: the Quickstart matches CI, and the example job,
the Python API example and the SQL example run for real."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import fields

import duckdb
import pytest

from aefeatures.config import JobConfig, load_job_config, tomllib
from aefeatures.jobs.run import run_job
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "aefeatures run jobs/example.toml" in commands[0] and "aefeatures recommend" in commands[0]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def example_store(tmp_path_factory):
    """The committed example job, run as is from a copy of the repository layout."""
    root = tmp_path_factory.mktemp("readme")
    (root / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "example.toml", root / "jobs" / "example.toml")
    (root / "fixtures").symlink_to(REPO / "fixtures")
    run_job(load_job_config(root / "jobs" / "example.toml"), progress=False)
    return root


def test_python_example_runs(example_store, monkeypatch, capsys):
    monkeypatch.chdir(example_store)
    (example,) = _blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.split()[-1] == "30"  # recs.height: 3 users × 10


def test_sql_examples_run(example_store):
    con = duckdb.connect()
    con.execute((example_store / "store" / "catalog.sql").read_text())
    queries = _blocks("sql")
    results = [con.sql(q).fetchall() for q in queries]
    assert len(results) == 5 and len(results[0]) == 10 and results[0][0][1] >= results[0][-1][1]
    assert [r[0] for r in results[1]] == [r[0] for r in results[0]]  # the macro = the written-out query
    assert len(results[2]) == 10 and len(results[3]) == 1 and len(results[4]) == 1


def test_sql_command_example_runs(example_store, monkeypatch):
    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    monkeypatch.chdir(example_store)
    (line,) = [b for b in _blocks("bash") if b.startswith("aefeatures sql -") and "\n" not in b.strip()]
    args = shlex.split(line)[1:]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "item_id,score" and len(result.stdout.splitlines()) == 11


def test_the_job_file_reference_is_a_valid_job_file_with_every_key(tmp_path):
    (reference,) = _blocks("toml")
    path = tmp_path / "reference.toml"
    path.write_text(reference)
    cfg = load_job_config(path)
    written = tomllib.loads(reference)
    for section in (f.name for f in fields(JobConfig) if f.name != "source"):
        assert set(written[section]) == {f.name for f in fields(type(getattr(cfg, section)))}, section
