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


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def command_store(tmp_path_factory):
    """A second run of the example job, for the commands that change the store (embed)."""
    root = tmp_path_factory.mktemp("readme_commands")
    (root / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "example.toml", root / "jobs" / "example.toml")
    (root / "fixtures").symlink_to(REPO / "fixtures")
    run_job(load_job_config(root / "jobs" / "example.toml"), progress=False)
    import polars as pl

    pl.DataFrame({"user_id": [1, 42, 43]}).write_parquet(root / "users.parquet")  # the example's users.parquet
    return root


def test_every_command_line_example_runs(command_store, monkeypatch):
    """Each line of the Command line block, as written (serve on a free port instead of 8000)."""
    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    monkeypatch.chdir(command_store)
    (block,) = [b for b in _blocks("bash") if b.startswith("aefeatures run jobs/example.toml")]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 15
    for line in lines:
        args = shlex.split(line, comments=True)
        assert args[0] == "aefeatures"
        if args[1] == "serve":
            _serve_and_check(args[1:], command_store)
            continue
        result = CliRunner().invoke(cli, args[1:])
        assert result.exit_code == 0, (line, result.output)
        assert result.stdout.strip() or args[1] == "recommend", line  # --output writes a file instead
    assert (command_store / "recs.parquet").is_file() and (command_store / "feast_repo").is_dir()


def test_new_items_example_runs_verbatim(tmp_path, monkeypatch):
    """The "New items, the same day" block, as written, after the example job: the next day's new
    items are folded in, and a new item's neighbours are items of its planted cluster."""
    import polars as pl
    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    (tmp_path / "jobs").mkdir()
    for job in ("example.toml", "example_next_day.toml"):
        shutil.copy(REPO / "jobs" / job, tmp_path / "jobs" / job)
    (tmp_path / "fixtures").symlink_to(REPO / "fixtures")
    run_job(load_job_config(tmp_path / "jobs" / "example.toml"), progress=False)
    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in _blocks("bash") if b.startswith("aefeatures embed jobs/example_next_day.toml")]
    embedded, similar = (CliRunner().invoke(cli, shlex.split(line, comments=True)[1:]) for line in block.splitlines())
    assert embedded.exit_code == 0, embedded.output
    assert "8 new item(s) folded in" in embedded.output and "left out, e.g. 509" in embedded.output
    assert similar.exit_code == 0, similar.output
    neighbours = [int(line.split()[1]) for line in similar.output.splitlines()[2:]]
    clusters = pl.read_parquet(REPO / "fixtures" / "truth_items.parquet")
    planted = clusters.filter(pl.col("item_id").is_in(neighbours)).get_column("cluster").to_list()
    assert len(neighbours) == 5 and planted == [0] * 5  # item 501 was rated by cluster 0's fans


def _start_service(args: list[str], cwd):
    import re
    import subprocess
    import sys

    port_at = args.index("--port") + 1 if "--port" in args else None
    if port_at:
        args = [*args[:port_at], "0", *args[port_at + 1:]]
    else:
        args = [*args, "--port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "aefeatures", *args], cwd=cwd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert found, line + proc.stderr.read()
    return proc, int(found.group(1))


def _serve_and_check(args: list[str], cwd) -> None:
    import signal
    import urllib.request

    proc, port = _start_service(args, cwd)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as answer:
            assert answer.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


_SAMPLE_VERSION = re.compile(r'"version":"\d{8}T[^"]*"')
_ANY_VERSION = '"version":"\\d{8}T\\d{6}\\.\\d{6}Z"'  # layout.VERSION_FORMAT


def _sample_pattern(shown: str) -> str:
    """A README sample answer as a regex: "…" stands for anything, and a sample's version id for
    any version id (samples are dated the day they were written; the suite runs on any day)."""
    pieces = _SAMPLE_VERSION.split(shown)
    return _ANY_VERSION.join(".*?".join(re.escape(part) for part in piece.split("…")) for piece in pieces)


def test_a_sample_answer_matches_on_any_day():
    shown = '{"version":"20261130T…Z","user":42,"score":6.25…}'
    pattern = _sample_pattern(shown)
    assert re.fullmatch(pattern, '{"version":"20270315T010203.000004Z","user":42,"score":6.2512}')
    assert not re.fullmatch(pattern, '{"version":"latest","user":42,"score":6.2512}')
    assert not re.fullmatch(pattern, '{"version":"20270315T010203.000004Z","user":43,"score":6.2512}')


@pytest.mark.skipif(shutil.which("curl") is None, reason="the HTTP examples are curl commands")
def test_http_examples_run_verbatim_and_answer_as_shown(example_store):
    """The console block: the service as started there, each curl line as written (the port
    aside), and each answer matching the sample printed below it (… stands for anything)."""
    import signal
    import subprocess

    (block,) = re.findall(r"```console\n(\$ aefeatures serve.*?)```", README, flags=re.S)
    lines = block.strip().splitlines()
    serve = shlex.split(lines[0][2:], comments=True)
    proc, port = _start_service(serve[1:], example_store)
    try:
        pairs = [(lines[i][2:], lines[i + 1]) for i in range(1, len(lines)) if lines[i].startswith("$ curl")]
        assert len(pairs) == 4
        for command, shown in pairs:
            command = command.replace("localhost:8000", f"localhost:{port}")
            done = subprocess.run(["bash", "-c", command + " --silent --show-error"], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert re.fullmatch(_sample_pattern(shown), done.stdout.strip()), (command, done.stdout[:300], shown)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
