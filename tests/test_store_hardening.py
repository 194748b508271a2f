"""The store under damage: versions whose files changed after publishing, a kill during retention,
symbolic links inside a feature set, broken LATEST pointers, and writes the file system refuses.

Every case runs on real files and processes; the store is small (400 users) so runs are quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import polars as pl
import pytest

import aefeatures
from aefeatures import errors
from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.jobs.run import _build_and_publish, run_job, scheduled
from aefeatures.store import layout, publish
from aefeatures.store.runlog import read_runs
from tests.conftest import FIXTURES, REPO, cli_runner, write_job

TINY = {"epochs": 2, "dim": 8, "hidden": [16]}
NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}
NO_EVALUATION = {"valid_share": 0.0}


def _small_input(folder: Path) -> Path:
    path = folder / "interactions.parquet"
    if not path.exists():
        pl.read_parquet(FIXTURES / "interactions.parquet").filter(pl.col("user_id") <= 400).write_parquet(path)
    return path


def _job(folder: Path, *, seed: int = 0, filename: str = "job.toml", keep: int = 0) -> Path:
    source = {"path": str(_small_input(folder)), "weight_col": "rating", "min_weight": 4.0}
    job = write_job(folder, input=source, model={**TINY, "seed": seed}, gate=NO_GATE, evaluation=NO_EVALUATION,
                    filename=filename)
    if keep:
        job.write_text(job.read_text() + f"[retention]\nkeep = {keep}\n")
    return job


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, list[str]]:
    """A store with two versions of `movies` trained with different seeds (so their files
    differ): (its folder, [older, live])."""
    folder = tmp_path_factory.mktemp("base")
    versions = [run_job(load_job_config(_job(folder, seed=seed, filename=f"job{seed}.toml")), progress=False).version
                for seed in (0, 1)]
    return folder / "store", versions


@pytest.fixture()
def store(base, tmp_path) -> tuple[Path, list[str]]:
    """A copy of :func:`base` to damage: (store, [older, live])."""
    root, versions = base
    shutil.copytree(root, tmp_path / "store", symlinks=True)
    return tmp_path / "store", versions


def _one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _strip_fingerprints(folder: Path) -> None:
    """Make the version in ``folder`` look published by a release before fingerprints."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("files", None)
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))


# --- 6: a version's files changed after publishing -------------------------------------------------


def test_another_versions_index_in_a_version_is_refused_not_answered(store, tmp_path):
    root, (older, live) = store
    folder = root / "movies" / "versions"
    shutil.copy(folder / older / layout.INDEX, folder / live / layout.INDEX)  # same width and size
    result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", "1", "-k", "3"])
    assert result.exit_code == 2 and "`items.faiss` is not the file that was published" in _one_error_line(result)
    with pytest.raises(errors.DamagedVersionError, match=f"version `{live}` of feature set `movies` is damaged: "
                       "`items.faiss` is not the file that was published"):
        aefeatures.open_store(root)["movies"].recommend(1, k=3)
    # an older version is still readable by pin
    assert aefeatures.open_store(root)["movies", older].recommend(1, k=3).ids.size == 3
    # a run refuses to build on it (nothing is "up to date" over a damaged live version) ...
    job = _job(tmp_path)
    refused = cli_runner().invoke(cli, ["run", str(job)])
    assert refused.exit_code == 2 and f"run --force {job}" in _one_error_line(refused)
    # ... and --force publishes a fresh version over it
    repaired = cli_runner().invoke(cli, ["run", "--force", str(job)])
    assert repaired.exit_code == 0, repaired.output
    assert aefeatures.open_store(root)["movies"].recommend(1, k=3).ids.size == 3


def test_a_version_from_before_fingerprints_is_checked_against_its_items(store):
    root, (older, live) = store
    folder = root / "movies" / "versions"
    _strip_fingerprints(folder / live)
    shutil.copy(folder / older / layout.INDEX, folder / live / layout.INDEX)
    # nothing recorded to compare the files with, but the index's first rows are not the items'
    result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", "1", "-k", "3"])
    assert result.exit_code == 2 and "holds other vectors than items.parquet" in _one_error_line(result)
    # an index over fewer items than items.parquet has
    rows = faiss.read_index(str(folder / older / layout.INDEX)).reconstruct_n(0, 400)
    short = faiss.IndexFlatIP(rows.shape[1])
    short.add(rows)
    faiss.write_index(short, str(folder / live / layout.INDEX))
    with pytest.raises(errors.DamagedVersionError, match="holds 400 items but items.parquet has"):
        aefeatures.open_store(root)["movies"].similar_items(1, k=3)


def test_a_hand_edited_fingerprint_never_reads_outside_the_version(store):
    root, (_, live) = store
    path = root / "movies" / "versions" / live / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64, "hashed": "all"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(errors.DamagedVersionError, match="not a path inside the version's folder"):
        aefeatures.open_store(root)["movies"]


@pytest.mark.parametrize("fingerprints", [True, False])
def test_a_truncated_index_is_one_line_not_a_crash(store, fingerprints):
    root, (_, live) = store
    folder = root / "movies" / "versions" / live
    if not fingerprints:
        _strip_fingerprints(folder)
    os.truncate(folder / layout.INDEX, 1000)
    problem = "holds 1,000 bytes where" if fingerprints else "cannot be read by FAISS"
    result = cli_runner().invoke(cli, ["similar", "--store", str(root), "--item", "1", "-k", "3"])
    assert result.exit_code == 2 and problem in _one_error_line(result)


def test_files_truncated_under_a_loaded_version_do_not_kill_the_reader(store):
    root, _ = store
    code = textwrap.dedent(f"""
        import os, aefeatures
        fs = aefeatures.open_store({str(root)!r})["movies"].load()  # what `serve` holds
        history = fs.item_ids[-3:].tolist()  # rows at the end of its input layer (past the first page)
        fs.recommend_history(history, k=3)  # its encoder is read now
        os.truncate(fs.path / "items.faiss", 100)  # e.g. a backup restored over them in place
        os.truncate(fs.path / "model" / "encoder" / "input.weight.npy", 100)
        print(fs.recommend(1, k=3).ids.size, fs.similar_items(fs.item_ids[0], k=3).ids.size,
              fs.recommend_history(history, k=3).ids.size)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # not -SIGBUS
    assert done.stdout.split() == ["3", "3", "3"]


# --- 7: retention ----------------------------------------------------------------------------------

_KILLED_WHILE_DELETING = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job

    real = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if (path / "manifest.json").is_file():  # a version's folder: stop half-way through deleting it
            for f in sorted(path.iterdir()):
                if f.is_file() and f.name != "manifest.json":
                    f.unlink()
            print("PAUSED", flush=True)
            time.sleep(600)
        return real(path, *args, **kwargs)
    shutil.rmtree = rmtree
    run_job(load_job_config(sys.argv[1]), force=True, progress=False)
""")


def test_a_run_killed_during_retention_leaves_no_half_deleted_version(tmp_path):
    job = _job(tmp_path, keep=1)
    root = tmp_path / "store"
    first = run_job(load_job_config(job), progress=False).version
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_DELETING, str(job)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    store = aefeatures.open_store(root)
    listed = [v["version"] for v in store.versions("movies")]
    assert first not in listed and listed == [store["movies"].version]  # the new one, live
    for version in listed:
        assert store["movies", version].load().recommend(1, k=3).ids.size == 3
    with pytest.raises(errors.VersionGoneError):
        store["movies", first]
    sql = ["sql", "--store", str(root), "-c", "SELECT count(DISTINCT version) AS n FROM movies_users_all",
           "--format", "csv"]
    queried = cli_runner().invoke(cli, sql)
    assert queried.exit_code == 0 and queried.stdout.split() == ["n", "1"], queried.output
    # the next run, with nothing to do, finishes the deletion
    again = run_job(load_job_config(job), progress=False)
    assert again.status == "up_to_date"
    assert not any((root / "movies" / layout.TRASH).iterdir())
    assert f"versions/{first}" in read_runs(root / "movies")[-1]["removed_by_retention"]
    with pytest.raises(errors.VersionGoneError):
        aefeatures.open_store(root)["movies", first]


def test_retention_over_a_linked_version_removes_the_link_and_the_run_succeeds(tmp_path):
    job = _job(tmp_path, keep=1)
    root = tmp_path / "store"
    run_job(load_job_config(_job(tmp_path, filename="plain.toml")), progress=False)  # keeps everything
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "movies" / "versions", elsewhere)
    (only,) = os.listdir(elsewhere)
    linked = "20000101T000000.000000Z"  # an old version whose folder is a link out of the store
    (root / "movies" / "versions" / linked).symlink_to(elsewhere / only, target_is_directory=True)
    result = cli_runner().invoke(cli, ["run", "--force", str(job)])
    assert result.exit_code == 0, result.output
    assert not os.path.lexists(root / "movies" / "versions" / linked)
    assert (elsewhere / only / layout.MANIFEST).is_file() and (elsewhere / only / layout.INDEX).is_file()
    entry = read_runs(root / "movies")[-1]
    assert entry["status"] == "published" and entry["exit_code"] == 0
    assert f"versions/{linked}" in entry["removed_by_retention"]


def test_a_retention_failure_after_publishing_is_a_warning_not_a_failed_run(tmp_path, caplog):
    cfg = load_job_config(_job(tmp_path, keep=1))
    root = tmp_path / "store"
    run_job(cfg, progress=False)

    def work(fingerprint, live):
        built = _build_and_publish(cfg, fingerprint, False, None)
        (root / "movies" / ".trash").write_text("a file where retention puts versions")  # it cannot now
        return built

    result = scheduled(cfg, "run", "fingerprint", work, force=True)
    assert result.status == "published" and layout.live_version(root, "movies") == result.version
    entry = read_runs(root / "movies")[-1]
    assert entry["status"] == "published" and entry["exit_code"] == 0 and entry["version"] == result.version
    assert entry["warnings"] and "retention did not finish" in entry["warnings"][0]
    assert "retention did not finish" in caplog.text


# --- 8: links in the store, broken LATEST -----------------------------------------------------------


@pytest.mark.parametrize("part", [".staging", "versions", "refused", ".lock", "runs.jsonl"])
def test_a_link_inside_a_feature_set_is_refused_before_anything_is_deleted_or_written(store, tmp_path, part):
    root, _ = store
    place = root / "movies" / part
    elsewhere = tmp_path / "elsewhere"
    if part == "versions":
        shutil.copytree(place, elsewhere)
        shutil.rmtree(place)
    elif part in (".lock", "runs.jsonl"):
        elsewhere.write_text("precious\n")
        place.unlink(missing_ok=True)
    else:
        (elsewhere / "precious").mkdir(parents=True)
        (elsewhere / "precious" / "keep.txt").write_text("precious\n")
        shutil.rmtree(place, ignore_errors=True)
    before = sorted(str(p.relative_to(tmp_path)) for p in [elsewhere, *elsewhere.rglob("*")])
    content = {p: p.read_bytes() for p in [elsewhere, *elsewhere.rglob("*")] if p.is_file()}
    place.symlink_to(elsewhere)
    result = cli_runner().invoke(cli, ["run", str(_job(tmp_path))])
    line = _one_error_line(result)
    assert result.exit_code == 2 and f"`{place}` is a symbolic link (to `{elsewhere}`)" in line
    assert sorted(str(p.relative_to(tmp_path)) for p in [elsewhere, *elsewhere.rglob("*")]) == before
    assert all(path.read_bytes() == data for path, data in content.items())


def test_clean_leftovers_and_retention_never_follow_links_out_of_the_store(store, tmp_path):
    root, (older, live) = store
    folder = root / "movies"
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "keep.txt").write_text("precious\n")
    shutil.copytree(folder / "versions" / older, outside / "version")
    (folder / layout.STAGING).mkdir(exist_ok=True)
    (folder / layout.STAGING / "20990101T000000.000000Z").symlink_to(outside / "data")  # a staged "version"
    never_live = "20990101T000000.000000Z"  # newer than the live one, never published: a leftover
    (folder / "versions" / never_live).symlink_to(outside / "version")
    (folder / "versions" / older / "extra").symlink_to(outside / "data")  # a link inside a version
    removed = publish.clean_leftovers(root, "movies")
    assert f"{layout.STAGING}/20990101T000000.000000Z" in removed and f"versions/{never_live}" in removed
    assert not os.path.lexists(folder / layout.STAGING / "20990101T000000.000000Z")
    assert not os.path.lexists(folder / "versions" / never_live)
    linked_old = "20000101T000000.000000Z"  # an old version that is a link: retention unlinks it
    (folder / "versions" / linked_old).symlink_to(outside / "version")
    assert publish.apply_retention(root, "movies", 1) == [f"versions/{linked_old}", f"versions/{older}"]
    publish.empty_trash(root, "movies")
    assert layout.list_versions(root, "movies") == [live]
    assert (outside / "data" / "keep.txt").read_text() == "precious\n"
    assert (outside / "version" / layout.MANIFEST).is_file() and (outside / "version" / layout.INDEX).is_file()
    assert aefeatures.open_store(root)["movies"].recommend(1, k=3).ids.size == 3
    # a folder that is a link is refused outright, before anything is deleted in its target
    (folder / layout.STAGING).rmdir()
    (folder / layout.STAGING).symlink_to(outside)
    with pytest.raises(errors.StoreError, match="is a symbolic link"):
        publish.clean_leftovers(root, "movies")
    assert (outside / "data" / "keep.txt").is_file()


def _break_latest(root: Path, how: str) -> None:
    latest = root / "movies" / layout.LATEST
    latest.unlink()
    if how == "garbage":
        latest.write_bytes(b"\x00\xffnot text\n")
    elif how == "dangling link":
        latest.symlink_to(root / "nowhere")
    elif how == "outside the store":
        latest.write_text("../../../etc\n")
    elif how == "a version that is gone":
        latest.write_text("20000101T000000.000000Z\n")


BROKEN = ["garbage", "dangling link", "outside the store", "a version that is gone"]


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_latest_is_one_line_everywhere(store, tmp_path, how):
    root, _ = store
    _break_latest(root, how)
    run = cli_runner().invoke(cli, ["run", str(_job(tmp_path))])
    assert run.exit_code == 2 and "(LATEST) is missing or damaged" in _one_error_line(run)
    lookup = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", "1"])
    assert lookup.exit_code == 2 and "has no servable live version" in _one_error_line(lookup)
    assert layout.feature_sets(root) == ["movies"]  # still a feature set, with a broken pointer
    with pytest.raises(errors.BrokenLatestError, match="run --force"):
        layout.live_version(root, "movies")  # what a service calls (see aefeatures.serving.live)


@pytest.mark.parametrize("how", ["garbage", "dangling link"])
def test_run_force_repairs_a_broken_latest(store, tmp_path, how):
    root, versions = store
    _break_latest(root, how)
    result = cli_runner().invoke(cli, ["run", "--force", str(_job(tmp_path))])
    assert result.exit_code == 0, result.output
    latest = root / "movies" / layout.LATEST
    assert not latest.is_symlink() and latest.read_text().strip() not in versions
    assert layout.list_versions(root, "movies")[:2] == versions  # nothing was removed as a leftover
    assert aefeatures.open_store(root)["movies"].recommend(1, k=3).ids.size == 3


# --- 10: writes the file system refuses --------------------------------------------------------------

_SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["aefeatures", *sys.argv[2:]]
    from aefeatures.cli.app import main
    main()
""")


def _size_limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(limit), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _only_error(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors_ = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors_) == 1 and done.stderr.strip().splitlines()[-1] == errors_[0], done.stderr[-3000:]
    return errors_[0]


def test_a_run_past_the_file_size_limit_ends_in_one_line_and_publishes_nothing(store, tmp_path):
    root, (_, live) = store
    done = _size_limited(20_000, "run", "--force", str(_job(tmp_path)))  # users.parquet is larger
    line = _only_error(done)
    assert done.returncode == 1 and line.startswith("error: File too large writing `") and "nothing was published" in line
    assert layout.live_version(root, "movies") == live and len(layout.list_versions(root, "movies")) == 2
    assert not any((root / "movies" / layout.STAGING).iterdir())
    entry = read_runs(root / "movies")[-1]
    assert entry["status"] == "failed" and entry["exit_code"] == 1 and "File too large" in entry["error"]


OUTPUTS = {
    "sql csv": ["sql", "-c", "SELECT * FROM movies_users", "--format", "csv", "--output"],
    "sql parquet": ["sql", "-c", "SELECT * FROM movies_users", "--format", "parquet", "--output"],
    "recommend": ["recommend", "--users-file", "USERS", "-k", "50", "--output"],
}
FOLDER_OUTPUTS = {**OUTPUTS, "feast-export": ["feast-export", "--output"]}


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_output_past_the_file_size_limit_ends_in_one_line(store, tmp_path, command):
    root, _ = store
    users = tmp_path / "users.txt"
    users.write_text("\n".join(map(str, range(1, 301))) + "\n")
    output = tmp_path / "out"
    args = [a.replace("USERS", str(users)) for a in OUTPUTS[command]]
    done = _size_limited(2_000, args[0], "--store", str(root), *args[1:], str(output))
    line = _only_error(done)
    assert done.returncode == 1 and line.startswith(f"error: File too large writing `{output}`"), line
    assert sorted(os.listdir(tmp_path)) == ["store", "users.txt"]  # no output, no temporary file left


@pytest.mark.parametrize("command", FOLDER_OUTPUTS)
def test_an_output_whose_folder_is_a_file_is_a_bad_input(store, tmp_path, command):
    root, _ = store
    users = tmp_path / "users.txt"
    users.write_text("1\n2\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [a.replace("USERS", str(users)) for a in FOLDER_OUTPUTS[command]]
    result = cli_runner().invoke(cli, [args[0], "--store", str(root), *args[1:], str(blocker / "out")])
    line = _one_error_line(result)
    assert result.exit_code == 2 and line.startswith("error: Not a directory ") and f"`{blocker / 'out'}`" in line
    assert "a part of that path is a file" in line and sorted(os.listdir(tmp_path)) == ["a-file", "store", "users.txt"]
