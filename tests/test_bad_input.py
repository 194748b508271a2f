"""The bad-input matrix through the real CLI: every case exits 2 with one `error: ` line that says
what is wrong and where, prints no traceback, and publishes nothing (a live version stays live)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from aefeatures.cli.app import cli
from tests.conftest import cli_runner

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "interactions.parquet"
NAME = "movies"
FAST = {"epochs": 1, "dim": 8, "hidden": [16]}


def _toml(value: Any) -> str:
    return "true" if value is True else "false" if value is False else json.dumps(value)


def write_job(folder: Path, input: dict[str, Any], *, model: dict[str, Any] | None = None,
              extra: dict[str, dict[str, Any]] | None = None, raw: str = "", filename: str = "job.toml") -> Path:
    """A job file in ``folder`` publishing `movies` into ``folder/store`` with a tiny, fast model."""
    sections = {"job": {"name": NAME, "store": str(folder / "store")}, "input": input,
                "model": {**FAST, **(model or {})}, **(extra or {})}
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
                   for s, values in sections.items())
    path = folder / filename
    path.write_text(text + raw)
    return path


# With one epoch the model cannot beat popularity; these runs only need *a* live version.
NO_GATE = {"gate": {"beat_popularity": False, "min_ratio": 0.0}}


@pytest.fixture()
def runner() -> CliRunner:
    return cli_runner()


def run(runner: CliRunner, job: Path):
    return runner.invoke(cli, ["run", str(job)])


def assert_refused(result, store: Path, *fragments: str) -> str:
    """Exit 2, a single `error:` line on stderr holding every fragment, and nothing published."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    # Training progress lines (logged when stderr is not a terminal) may come before the error.
    lines = [line for line in result.stderr.splitlines() if " INFO aefeatures.progress: " not in line]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (store / NAME / "LATEST").exists()
    assert list((store / NAME / "versions").glob("*")) == []
    assert list((store / NAME / ".staging").glob("*")) == []
    return line


def small(n_users: int = 60, n_items: int = 12, seed: int = 0) -> pl.DataFrame:
    """A valid little input: every user rates 4 distinct items 1..5."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, n_users + 1), 4)
    items = np.concatenate([rng.choice(n_items, 4, replace=False) + 1 for _ in range(n_users)])
    return pl.DataFrame({"user_id": users, "item_id": items, "rating": rng.integers(1, 6, len(users))})


# --- where the input is -------------------------------------------------------------------------


def _missing_path(tmp: Path):
    path = tmp / "nope.parquet"
    return {"path": str(path)}, [f"input `{path}` does not exist", "input.path"]


def _glob_without_match(tmp: Path):
    (tmp / "data").mkdir()
    (tmp / "data" / "x.csv").write_text("user_id,item_id\n")
    pattern = str(tmp / "data" / "*.parquet")
    return {"path": pattern}, [f"input `{pattern}` matches no files"]


def _empty_directory(tmp: Path):
    (tmp / "data").mkdir()
    (tmp / "data" / "_SUCCESS").write_text("")
    return {"path": str(tmp / "data")}, [f"input `{tmp / 'data'}` is a directory with no data files"]


# --- what the files are -------------------------------------------------------------------------


def _text_file(tmp: Path):
    path = tmp / "x.parquet"
    path.write_text("user_id,item_id\n1,2\n")
    return {"path": str(path)}, [f"input file `{path}` is not a readable Parquet file"]


def _truncated_among_good(tmp: Path):
    folder = tmp / "data"
    folder.mkdir()
    small(seed=1).write_parquet(folder / "a.parquet")
    small(seed=2).write_parquet(folder / "c.parquet")
    raw = (folder / "a.parquet").read_bytes()
    (folder / "b.parquet").write_bytes(raw[: len(raw) - 40])
    return {"path": str(folder)}, [f"input file `{folder / 'b.parquet'}` is not a readable Parquet file"]


def _corrupt_pages_among_good(tmp: Path):
    folder = tmp / "data"
    folder.mkdir()
    small(seed=1).write_parquet(folder / "a.parquet")
    small(seed=2).write_parquet(folder / "b.parquet")
    raw = bytearray((folder / "b.parquet").read_bytes())
    raw[20:200] = b"\x5a" * 180  # the zstd column chunks, the footer stays intact
    (folder / "b.parquet").write_bytes(bytes(raw))
    small(seed=3).write_parquet(folder / "c.parquet")
    return ({"path": str(folder), "weight_col": "rating"},
            [f"input file `{folder / 'b.parquet'}` is not a readable Parquet file"])


def _schema_drift(tmp: Path):
    folder = tmp / "data"
    folder.mkdir()
    small().write_parquet(folder / "a.parquet")
    small().with_columns(pl.format("u{}", "user_id").alias("user_id")).write_parquet(folder / "b.parquet")
    return {"path": str(folder)}, ["column `user_id` is int64 in", f"`{folder / 'a.parquet'}`",
                                   f"`{folder / 'b.parquet'}`"]


# --- columns and values ---------------------------------------------------------------------


def _missing_user_column(tmp: Path):
    path = tmp / "x.parquet"
    small().rename({"user_id": "customer"}).write_parquet(path)
    return {"path": str(path)}, [f"input `{path}` is missing column(s) ['user_id']",
                                 "found ['customer', 'item_id', 'rating']", "`input.user_col`"]


def _missing_item_column(tmp: Path):
    path = tmp / "x.parquet"
    small().rename({"item_id": "movie"}).write_parquet(path)
    return {"path": str(path)}, ["missing column(s) ['item_id']", "found ['user_id', 'movie', 'rating']",
                                 "`input.item_col`"]


def _null_user_ids(tmp: Path):
    path = tmp / "x.parquet"
    frame = small()
    ids = frame["user_id"].to_list()
    ids[5] = ids[9] = ids[11] = None
    frame.with_columns(pl.Series("user_id", ids, dtype=pl.Int64)).write_parquet(path)
    return {"path": str(path)}, [f"column `user_id` has 3 null value(s); the first is row 5 (0-based) of `{path}`"]


def _float_ids(tmp: Path):
    path = tmp / "x.parquet"
    small().with_columns(pl.col("user_id").cast(pl.Float64)).write_parquet(path)
    return {"path": str(path)}, [f"column `user_id` in `{path}` has type Float64", "ids must be integers or strings"]


def _nothing_after_min_weight(tmp: Path):
    path = tmp / "x.parquet"
    small().write_parquet(path)
    return ({"path": str(path), "weight_col": "rating", "min_weight": 9.0},
            [f"no interactions to train on: `{path}` matched 1 file(s) with 240 row(s)",
             "none has `rating` >= 9.0"])


def _one_item(tmp: Path):
    path = tmp / "x.parquet"
    small().with_columns(item_id=pl.lit(7, pl.Int64)).write_parquet(path)
    return {"path": str(path)}, [f"input `{path}` has 1 distinct item(s) after filtering; at least 2 are needed"]


def _negative_weights(tmp: Path):
    path = tmp / "x.parquet"
    frame = small().with_columns(pl.col("rating").cast(pl.Float64))
    ratings = frame["rating"].to_list()
    ratings[17], ratings[30] = -1.0, -2.0
    frame.with_columns(pl.Series("rating", ratings)).write_parquet(path)
    return ({"path": str(path), "weight_col": "rating"},
            [f"column `rating` has 2 negative value(s); the first is -1.0 at row 17 of `{path}`"])


def _nan_weights(tmp: Path):
    path = tmp / "x.parquet"
    frame = small().with_columns(pl.col("rating").cast(pl.Float64))
    ratings = frame["rating"].to_list()
    ratings[3] = float("nan")
    frame.with_columns(pl.Series("rating", ratings)).write_parquet(path)
    return ({"path": str(path), "weight_col": "rating"},
            [f"column `rating` has 1 NaN value(s); the first is nan at row 3 of `{path}`"])


def _infinite_weights(tmp: Path):
    path = tmp / "x.parquet"
    frame = small().with_columns(pl.col("rating").cast(pl.Float64))
    ratings = frame["rating"].to_list()
    ratings[5], ratings[9] = float("-inf"), float("inf")
    frame.with_columns(pl.Series("rating", ratings)).write_parquet(path)
    return ({"path": str(path), "weight_col": "rating", "binarize": False},
            [f"column `rating` has 2 infinite value(s); the first is -inf at row 5 of `{path}`"])


def _float32_overflow_weights(tmp: Path):
    path = tmp / "x.parquet"
    frame = small().with_columns(pl.col("rating").cast(pl.Float64))
    ratings = frame["rating"].to_list()
    ratings[11] = 1e39  # finite in float64, infinite in the float32 training uses
    frame.with_columns(pl.Series("rating", ratings)).write_parquet(path)
    return ({"path": str(path), "weight_col": "rating", "binarize": False},
            ["column `rating` has 1 too large for float32", f"the first is 1e+39 at row 11 of `{path}`"])


def _millis_read_as_seconds(tmp: Path):
    path = tmp / "x.parquet"
    small().with_columns(ts=pl.lit(1_700_000_000_000, pl.Int64)).write_parquet(path)
    return ({"path": str(path), "timestamp_col": "ts", "timestamp_unit": "s"},
            ["column `ts` has 240 timestamp(s) outside [1971-01-01, 2100-01-01); the first is 1700000000000 "
             f"(epoch s) at row 0 of `{path}`"])


def _bad_timestamp_unit(tmp: Path):
    path = tmp / "x.parquet"
    small().write_parquet(path)
    return ({"path": str(path), "timestamp_unit": "days"},
            ["`input.timestamp_unit` = 'days' is not allowed: choose one of auto, s, ms, us, ns"])


def _bad_timestamp_window(tmp: Path):
    path = tmp / "x.parquet"
    small().write_parquet(path)
    return ({"path": str(path), "timestamp_min": "yesterday"},
            ["`input.timestamp_min` = 'yesterday' is not allowed: write an ISO 8601 date or time"])


def _empty_timestamp_window(tmp: Path):
    path = tmp / "x.parquet"
    small().write_parquet(path)
    return ({"path": str(path), "timestamp_min": "2030-01-01", "timestamp_max": "2020-01-01"},
            ["`input.timestamp_max` = '2020-01-01' is not allowed: it must be later than `input.timestamp_min`"])


CASES: dict[str, Callable[[Path], tuple[dict[str, Any], list[str]]]] = {
    "missing-path": _missing_path,
    "glob-without-match": _glob_without_match,
    "empty-directory": _empty_directory,
    "text-file": _text_file,
    "truncated-among-good": _truncated_among_good,
    "corrupt-pages-among-good": _corrupt_pages_among_good,
    "schema-drift": _schema_drift,
    "missing-user-column": _missing_user_column,
    "missing-item-column": _missing_item_column,
    "null-user-ids": _null_user_ids,
    "float-ids": _float_ids,
    "nothing-after-min-weight": _nothing_after_min_weight,
    "one-item": _one_item,
    "negative-weights": _negative_weights,
    "nan-weights": _nan_weights,
    "infinite-weights": _infinite_weights,
    "float32-overflow-weights": _float32_overflow_weights,
    "millis-read-as-seconds": _millis_read_as_seconds,
    "bad-timestamp-unit": _bad_timestamp_unit,
    "bad-timestamp-window": _bad_timestamp_window,
    "empty-timestamp-window": _empty_timestamp_window,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_publishes_nothing(tmp_path, runner, case):
    input, fragments = CASES[case](tmp_path)
    result = run(runner, write_job(tmp_path, input))
    assert_refused(result, tmp_path / "store", *fragments)


def test_corrupt_file_message_does_not_blame_the_good_files(tmp_path, runner):
    input, _ = _truncated_among_good(tmp_path)
    line = assert_refused(run(runner, write_job(tmp_path, input)), tmp_path / "store")
    assert "a.parquet" not in line and "c.parquet" not in line


# --- the job file ---------------------------------------------------------------------------


def _good_input(tmp: Path) -> dict[str, Any]:
    small(n_users=200, n_items=20).write_parquet(tmp / "good.parquet")
    return {"path": str(tmp / "good.parquet")}


def test_unknown_job_file_key(tmp_path, runner):
    job = write_job(tmp_path, _good_input(tmp_path), model={"epoch": 1})
    assert_refused(run(runner, job), tmp_path / "store", f"error: job file `{job}`: unknown key `model.epoch`",
                   "did you mean `model.epochs`?")


def test_wrong_value_type_in_job_file(tmp_path, runner):
    job = write_job(tmp_path, _good_input(tmp_path), model={"dim": "8"})
    assert_refused(run(runner, job), tmp_path / "store",
                   f"error: job file `{job}`: `model.dim` must be an integer, got str '8'")


def test_invalid_toml_job_file(tmp_path, runner):
    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "movies\n')
    assert_refused(run(runner, job), tmp_path / "store", f"error: job file `{job}`: is not valid TOML")


def test_missing_job_file(tmp_path, runner):
    job = tmp_path / "nope.toml"
    assert_refused(run(runner, job), tmp_path / "store", f"error: job file `{job}`: file not found")


def test_index_kind_faiss_cannot_parse(tmp_path, runner):
    job = write_job(tmp_path, _good_input(tmp_path), extra={"index": {"kind": "NotAnIndex"}, **NO_GATE})
    assert_refused(run(runner, job), tmp_path / "store",
                   f"error: job file `{job}`: `index.kind` = 'NotAnIndex' is neither a named kind nor a FAISS factory")


def test_index_that_cannot_be_trained_on_the_catalogue(tmp_path, runner):
    job = write_job(tmp_path, _good_input(tmp_path), extra={"index": {"kind": "IVF4096,Flat"}, **NO_GATE})
    assert_refused(run(runner, job), tmp_path / "store",
                   "`index.kind` = 'IVF4096,Flat' (IVF4096,Flat) cannot be built over")


# --- a live version survives bad runs ---------------------------------------------------------


def test_bad_runs_leave_the_previous_version_live(tmp_path, runner):
    store = tmp_path / "store"
    good = write_job(tmp_path, {"path": str(FIXTURE)}, extra=NO_GATE, filename="good.toml")
    first = run(runner, good)
    assert first.exit_code == 0, first.output
    live = (store / NAME / "LATEST").read_text().strip()
    assert [p.name for p in (store / NAME / "versions").iterdir()] == [live]

    bad_jobs = [
        write_job(tmp_path, {"path": str(tmp_path / "missing.parquet")}, extra=NO_GATE, filename="bad1.toml"),
        write_job(tmp_path, {"path": str(FIXTURE), "item_col": "movie"}, extra=NO_GATE, filename="bad2.toml"),
        # fails after training, while the new version is being staged
        write_job(tmp_path, {"path": str(FIXTURE)}, extra={"index": {"kind": "NotAnIndex"}, **NO_GATE},
                  filename="bad3.toml"),
    ]
    for job in bad_jobs:
        result = run(runner, job)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if " INFO aefeatures.progress: " not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "Traceback" not in result.output
        assert (store / NAME / "LATEST").read_text().strip() == live
        assert [p.name for p in (store / NAME / "versions").iterdir()] == [live]
        assert list((store / NAME / ".staging").glob("*")) == []

    versions = runner.invoke(cli, ["versions", "--store", str(store), "--name", NAME, "--json"])
    assert versions.exit_code == 0, versions.output
    assert [(v["version"], v["live"]) for v in json.loads(versions.stdout)["versions"]] == [(live, True)]


def test_a_diverging_loss_fails_the_run_and_publishes_nothing(tmp_path, runner):
    """Weights finite in float32 but huge: the loss overflows; the run fails (exit 1), no version."""
    path = tmp_path / "x.parquet"
    small().with_columns(pl.col("rating").cast(pl.Float64) * 3e37).write_parquet(path)
    job = write_job(tmp_path, {"path": str(path), "weight_col": "rating", "binarize": False}, model={"epochs": 2, "kind": "dae"})
    result = run(runner, job)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line, = result.stderr.splitlines()
    assert line.startswith("error: training diverged: the loss of epoch 1 is ")
    assert "Lower `model.lr`" in line
    store = tmp_path / "store"
    assert not (store / NAME / "LATEST").exists()
    assert list((store / NAME / "versions").glob("*")) == []
