"""Scheduled runs: idempotence, --force, the lock, crash safety, run log, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import duckdb
import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.errors import LockHeldError
from aefeatures.jobs.lock import LOCK_FILE, feature_set_lock
from aefeatures.jobs.run import run_job
from aefeatures.store import layout
from aefeatures.store.runlog import read_runs
from tests.conftest import REPO, write_job

FAST = {"epochs": 3, "dim": 16, "hidden": [32]}
NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}


@pytest.fixture()
def job(tmp_path):
    return write_job(tmp_path, model=FAST, gate=NO_GATE)


def test_an_unchanged_input_and_config_is_up_to_date(job, tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(job)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["run", str(job)])
    assert again.exit_code == 0 and "is up to date" in again.stdout
    root = tmp_path / "store"
    assert len(layout.list_versions(root, "movies")) == 1
    forced = runner.invoke(cli, ["run", "--force", str(job)])
    assert forced.exit_code == 0 and "published movies version" in forced.stdout
    assert len(layout.list_versions(root, "movies")) == 2
    assert [r["status"] for r in read_runs(root / "movies")] == ["published", "up_to_date", "published"]


@pytest.mark.parametrize("damage", ["files deleted", "manifest garbled"])
def test_a_live_version_a_cleaner_broke_is_refused_with_the_way_out_and_force_repairs_it(job, tmp_path, damage):
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(job)]).exit_code == 0
    folder = tmp_path / "store" / "movies"
    broken = (folder / "LATEST").read_text().strip()
    if damage == "files deleted":
        for path in (folder / "versions" / broken).iterdir():
            path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    else:
        (folder / "versions" / broken / "manifest.json").write_text("{")
    refused = runner.invoke(cli, ["run", str(job)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (line,) = refused.stderr.strip().splitlines()
    assert f"live version `{broken}` (LATEST) is missing or damaged" in line and f"run --force {job}" in line
    assert (folder / "LATEST").read_text().strip() == broken  # nothing published
    repaired = runner.invoke(cli, ["run", "--force", str(job)])
    assert repaired.exit_code == 0, repaired.output
    live = (folder / "LATEST").read_text().strip()
    assert live != broken and aefeatures.open_store(tmp_path / "store")["movies"].recommend(1, k=3).ids.size == 3
    assert runner.invoke(cli, ["run", str(job)]).stdout.count("is up to date") == 1


@pytest.mark.parametrize("err, code", [(28, 1), (30, 2)])  # ENOSPC, EROFS
def test_a_disk_that_fills_during_publish_ends_in_one_line_and_publishes_nothing(job, tmp_path, monkeypatch, err, code):
    import os as _os

    from aefeatures.store import tables

    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(job)]).exit_code == 0
    folder = tmp_path / "store" / "movies"
    live = (folder / "LATEST").read_text()

    def full(*args, **kwargs):
        raise OSError(err, _os.strerror(err), str(folder / ".staging" / "users.parquet"))

    monkeypatch.setattr(tables, "write_tables", full)
    failed = runner.invoke(cli, ["run", "--force", str(job)])
    assert failed.exit_code == code and "Traceback" not in failed.output
    (line,) = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: {_os.strerror(err)} writing `") and failed.stderr.count("error:") == 1
    assert (folder / "LATEST").read_text() == live and len(layout.list_versions(tmp_path / "store", "movies")) == 1
    assert read_runs(folder)[-1]["status"] == "failed"


def test_a_name_that_differs_only_in_case_from_another_in_the_store_is_refused_and_sql_keeps_working(tmp_path):
    runner = CliRunner()
    first = write_job(tmp_path, name="case", model=FAST, gate=NO_GATE, filename="lower.toml")
    assert runner.invoke(cli, ["run", str(first)]).exit_code == 0
    twin = write_job(tmp_path, name="Case", model=FAST, gate=NO_GATE, filename="upper.toml")
    refused = runner.invoke(cli, ["run", str(twin)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "feature set `Case` differs only in case from feature set `case`" in refused.stderr
    assert layout.known_feature_sets(tmp_path / "store") == ["case"]
    # a folder someone made by hand with a name SQL cannot use is left out of the catalog, not fatal
    crafted = tmp_path / "store" / "7day"
    __import__("shutil").copytree(tmp_path / "store" / "case", crafted)
    done = runner.invoke(cli, ["sql", "--store", str(tmp_path / "store"), "-c", "SELECT count(*) AS n FROM case_items",
                               "--format", "csv"])
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == ["n", "500"]


def test_a_changed_input_file_or_config_runs_again(job, tmp_path):
    first = run_job(load_job_config(job), progress=False)
    changed = write_job(tmp_path, model={**FAST, "epochs": 4}, gate=NO_GATE, filename="other.toml")
    assert run_job(load_job_config(changed), progress=False).status == "published"
    data = tmp_path / "copy.parquet"
    data.write_bytes((REPO / "fixtures" / "interactions.parquet").read_bytes())
    on_copy = write_job(tmp_path, input={"path": str(data)}, model=FAST, gate=NO_GATE, filename="copy.toml")
    assert run_job(load_job_config(on_copy), progress=False).status == "published"
    assert run_job(load_job_config(on_copy), progress=False).status == "up_to_date"
    os.utime(data, ns=(1, 1))  # touched: a new modification time is a new input
    assert run_job(load_job_config(on_copy), progress=False).version != first.version


def test_a_second_run_exits_4_naming_the_holder(job, tmp_path):
    folder = tmp_path / "store" / "movies"
    with feature_set_lock(folder) as holder:
        result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 4
    assert f"pid {holder['pid']} on {holder['host']}" in result.stderr
    assert not (folder / "LATEST").exists()
    assert read_runs(folder)[-1]["status"] == "locked" and read_runs(folder)[-1]["exit_code"] == 4
    with pytest.raises(LockHeldError), feature_set_lock(folder), feature_set_lock(folder):
        pass


def test_a_stale_lock_from_a_dead_holder_is_recovered_with_a_warning(job, tmp_path, caplog):
    folder = tmp_path / "store" / "movies"
    folder.mkdir(parents=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01"}))
    result = run_job(load_job_config(job), progress=False)
    assert result.status == "published"
    assert "recovered a stale lock" in caplog.text and "pid 999999 on gone" in caplog.text
    assert (folder / LOCK_FILE).read_text() == ""  # released cleanly


@pytest.mark.slow
@pytest.mark.parametrize("point", ["read", "train", "write", "publish"])
def test_a_run_killed_at_any_point_leaves_a_readable_store(job, tmp_path, point):
    root = tmp_path / "store"
    good = run_job(load_job_config(job), progress=False)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "killable_run.py"), str(job), point],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == f"PAUSED AT {point}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    fs = aefeatures.open_store(root)["movies"]  # LATEST readable, on the good version
    assert fs.version == good.version and len(fs.recommend(42, k=5).ids) == 5
    listed = [v["version"] for v in aefeatures.open_store(root).versions("movies")]
    assert listed == [good.version]  # nothing half-done is listed
    after = run_job(load_job_config(job), force=True, progress=False)  # the next run succeeds ...
    assert aefeatures.open_store(root)["movies"].version == after.version
    assert not any((root / "movies" / ".staging").iterdir())  # ... and cleans the leftovers
    assert layout.list_versions(root, "movies") == [good.version, after.version]


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly(job, tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "killable_run.py"), str(job), "train"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "PAUSED AT train"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    code = subprocess.run([sys.executable, "-m", "aefeatures", "run", str(job)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert code.returncode == 0, code.stderr


@pytest.mark.slow
def test_cli_turns_sigterm_into_exit_143(job, tmp_path):
    script = ("import os, signal, sys, aefeatures.model.train as t\n"
              "from aefeatures.cli.app import main\n"
              "real = t._epoch\n"
              "def epoch(*a):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a)\n"
              "t._epoch = epoch\n"
              f"sys.argv = ['aefeatures', 'run', {str(job)!r}]\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; nothing was published and the live version is unchanged.")
    folder = tmp_path / "store" / "movies"
    assert not (folder / "LATEST").exists() and not (folder / ".staging").exists()
    assert read_runs(folder)[-1]["status"] == "interrupted" and read_runs(folder)[-1]["exit_code"] == 143


def test_retention_keeps_the_newest_versions_and_never_the_live_one(tmp_path):
    job = load_job_config(write_job(tmp_path, model=FAST, gate=NO_GATE))
    kept = write_job(tmp_path, model=FAST, gate=NO_GATE, filename="kept.toml")
    kept.write_text(kept.read_text() + "[retention]\nkeep = 2\n")
    versions = [run_job(job, force=True, progress=False).version for _ in range(3)]
    versions.append(run_job(load_job_config(kept), progress=False).version)
    root = tmp_path / "store"
    assert layout.list_versions(root, "movies") == versions[-2:]
    assert layout.live_version(root, "movies") == versions[-1]
    assert read_runs(root / "movies")[-1]["removed_by_retention"] == [f"versions/{v}" for v in versions[:2]]
    con = duckdb.connect()
    con.execute((root / "catalog.sql").read_text())
    assert con.sql("SELECT count(DISTINCT version) FROM movies_users_all").fetchall()[0][0] == 2


def test_runs_command_shows_the_history(job, tmp_path):
    run_job(load_job_config(job), progress=False)
    run_job(load_job_config(job), progress=False)
    out = CliRunner().invoke(cli, ["runs", "--store", str(tmp_path / "store"), "--name", "movies", "--json"])
    runs = json.loads(out.stdout)["runs"]
    assert [r["status"] for r in runs] == ["published", "up_to_date"]
    assert runs[0]["counts"]["users"] == 2030 and set(runs[0]["timings"]) >= {"read", "train", "publish"}
    assert runs[0]["ended"] >= runs[0]["started"]
    human = CliRunner().invoke(cli, ["runs", "--store", str(tmp_path / "store"), "--name", "movies"])
    assert "up_to_date" in human.stdout


def test_json_logs_for_schedulers(job):
    result = CliRunner().invoke(cli, ["--log-format", "json", "run", str(job)])
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["message"].startswith("stage train done") for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_a_store_that_is_a_feature_set_folder_is_refused(job, tmp_path):
    run_job(load_job_config(job), progress=False)
    wrong = write_job(tmp_path, store=tmp_path / "store" / "movies", model=FAST, filename="wrong.toml")
    result = CliRunner().invoke(cli, ["run", str(wrong)])
    assert result.exit_code == 2 and "is the folder of a feature set, not a store" in result.stderr


def test_a_store_that_cannot_be_written_is_a_bad_input(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # even root cannot create a directory inside a file
    result = CliRunner().invoke(cli, ["run", str(write_job(tmp_path, store=blocker / "store", model=FAST))])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: store directory `{blocker / 'store'}` is not writable")


def _cli_in_a_fresh_process(*args: str) -> tuple[subprocess.CompletedProcess, bool]:
    """Run the CLI in a new interpreter: (the process, whether torch was imported by the end)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
            "from aefeatures.cli.app import main\n"
            f"sys.argv = ['aefeatures', *{list(args)!r}]\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "torch imported:" in done.stderr, done.stderr
    return done, "torch imported: True" in done.stderr


def test_a_missing_job_file_is_answered_without_importing_torch(tmp_path):
    done, torch_imported = _cli_in_a_fresh_process("run", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "nope.toml" in done.stderr
    assert not torch_imported


def test_an_up_to_date_run_is_answered_without_importing_torch(trained):
    store, _ = trained
    done, torch_imported = _cli_in_a_fresh_process("run", str(store.parent / "job.toml"))
    assert done.returncode == 0 and "is up to date" in done.stdout, done.stderr
    assert not torch_imported
    done, torch_imported = _cli_in_a_fresh_process("run", "--json", str(store.parent / "job.toml"))
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "up_to_date"
    assert not torch_imported


def test_store_files_and_folders_get_the_modes_the_umask_gives(trained):
    """A service or analyst running as another user must be able to read the live version."""
    store, _ = trained
    umask = os.umask(0o022)
    os.umask(umask)
    wrong = []
    for path in [store, *store.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != expected:
            wrong.append(f"{path.relative_to(store)}: {oct(mode)} (expected {oct(expected)})")
    assert not wrong, wrong
    assert (store / "catalog.sql").is_file() and any(store.rglob("report.html"))


def test_a_run_without_a_terminal_logs_training_progress(tmp_path):
    """As cron, systemd or Airflow run it: stderr is a pipe and no -v is given."""
    job = write_job(tmp_path, model={**FAST, "epochs": 4}, gate=NO_GATE)
    done = subprocess.run([sys.executable, "-m", "aefeatures", "run", str(job)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "aefeatures.progress" in line]
    assert lines and "train epoch 1/4: loss " in lines[0] and "validation ndcg@100" in lines[0], done.stderr
    assert " left" in lines[0] and "train epoch 4/4" in lines[-1] and lines[-1].endswith("done")
    assert "INFO aefeatures.jobs" not in done.stderr  # the stages still log with -v only
