"""The job on real-world-shaped exports (fixtures/real_world.py): each case trains correctly
(published values checked against the input, through Python and DuckDB) or is refused with
exit 2, one line, nothing published and LATEST unchanged."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from aefeatures.cli.app import cli
from aefeatures.store import publish

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
import real_world  # noqa: E402

from tests.conftest import cli_runner, strict_loads

TINY = {"epochs": 1, "dim": 8, "hidden": [16], "batch_size": 64}
NO_GATE = {"beat_popularity": False, "min_ratio": 0.0}
OK = [n for n in real_world.CASES if n not in ("epoch_ms_said_to_be_seconds", "hive_null_partition_as_weight",
                                               "hive_null_partition_as_item_id", "delta_table_after_a_deletion",
                                               "rotted_page_with_checksums",
                                               "ids_integer_in_one_file_text_in_another")]
REFUSED = [n for n in real_world.CASES if n not in OK]


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")


def job_file(folder: Path, store: Path, input: dict) -> Path:
    sections = {"job": {"name": "shop", "store": str(store)}, "input": input, "model": TINY,
                "index": {"kind": "flat"}, "gate": NO_GATE}
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
                   for s, values in sections.items())
    path = folder / "job.toml"
    path.write_text(text)
    return path


def _expected_per_user(truth: dict) -> tuple[dict, dict]:
    items, latest = defaultdict(set), {}
    for n, (u, i) in enumerate(zip(truth["user"], truth["item"])):
        key = u.item() if hasattr(u, "item") else u
        items[key].add(i.item() if hasattr(i, "item") else i)
        if "timestamp" in truth:
            t = truth["timestamp"][n]
            latest[key] = max(latest.get(key, t), t)
    return items, latest


@pytest.mark.parametrize("name", OK)
def test_real_world_export_trains_and_publishes_the_right_values(tmp_path, name):
    case = real_world.write_case(name, tmp_path)
    result = cli_runner().invoke(cli, ["run", str(job_file(tmp_path, tmp_path / "store", case.input))])
    assert result.exit_code == 0, result.output
    version = (tmp_path / "store" / "shop" / "LATEST").read_text().strip()
    folder = tmp_path / "store" / "shop" / "versions" / version
    publish.check_finite(folder)
    manifest = strict_loads((folder / "manifest.json").read_text())
    items, latest = _expected_per_user(case.truth)

    users = pq.read_table(folder / "users.parquet").to_pylist()
    assert {u["user_id"] for u in users} == set(items)
    assert all(u["n_interactions"] == len(items[u["user_id"]]) for u in users)
    published_items = set(pq.read_table(folder / "items.parquet", columns=["item_id"]).column(0).to_pylist())
    assert published_items == set().union(*items.values())
    if latest:  # each user's latest interaction (`last_interaction`), read back by Python and DuckDB
        assert {u["user_id"]: u["last_interaction"] for u in users} == latest
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        back = dict(con.execute(f"SELECT user_id, last_interaction FROM read_parquet('{folder / 'users.parquet'}')")
                    .fetchall())
        assert back == latest
        assert all(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) < t < dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
                   for t in back.values())
        if name.startswith("epoch_"):
            assert manifest["input"]["timestamps"]["unit"] == name.removeprefix("epoch_")
            assert manifest["input"]["timestamps"]["inferred"] is True
    if name == "hashed_uint64":
        assert manifest["id_types"] == {"user": "UInt64", "item": "UInt64"}
        assert str(pq.read_schema(folder / "users.parquet").field("user_id").type) == "uint64"
        # embedding with the live model (no training) keeps the uint64 ids too
        embedded = cli_runner().invoke(cli, ["embed", str(tmp_path / "job.toml"), "--force"])
        assert embedded.exit_code == 0, embedded.output
        version = (tmp_path / "store" / "shop" / "LATEST").read_text().strip()
        again = pq.read_table(tmp_path / "store" / "shop" / "versions" / version / "users.parquet")
        assert set(again.column("user_id").to_pylist()) == set(items)


@pytest.fixture(scope="module")
def live_store(tmp_path_factory) -> Path:
    """A store with one live version of `shop`, for refusals to leave untouched."""
    folder = tmp_path_factory.mktemp("live")
    case = real_world.write_case("epoch_s", folder)
    result = cli_runner().invoke(cli, ["run", str(job_file(folder, folder / "store", case.input))])
    assert result.exit_code == 0, result.output
    return folder / "store"


@pytest.mark.parametrize("name", REFUSED)
def test_real_world_export_that_cannot_be_read_is_refused_leaving_latest(tmp_path, live_store, name):
    store = tmp_path / "store"
    shutil.copytree(live_store, store)
    before = (store / "shop" / "LATEST").read_text()
    versions = sorted(p.name for p in (store / "shop" / "versions").iterdir())
    case = real_world.write_case(name, tmp_path / "data")
    case.input["path"] = str(tmp_path / "data" / case.input["path"])
    result = cli_runner().invoke(cli, ["run", str(job_file(tmp_path, store, case.input))])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    line, = result.stderr.splitlines()
    assert line.startswith("error: ") and case.fragment in line
    assert (store / "shop" / "LATEST").read_text() == before
    assert sorted(p.name for p in (store / "shop" / "versions").iterdir()) == versions
    assert list((store / "shop" / ".staging").glob("*")) == []


def test_every_user_with_one_item_says_why_validation_and_the_gate_metrics_are_skipped(tmp_path):
    import pyarrow as pa

    users = [u for u in range(300) for _ in range(3)]  # each user's one item, repeated
    pq.write_table(pa.table({"user_id": users, "item_id": [u % 7 for u in users]}), tmp_path / "x.parquet")
    result = cli_runner().invoke(cli, ["run", str(job_file(tmp_path, tmp_path / "store", {"path": "x.parquet"}))])
    assert result.exit_code == 0, result.output
    assert "metric checks skipped: no user has 2 or more items (all 300 have one), so no validation split is " \
           "possible" in result.stdout
    version = (tmp_path / "store" / "shop" / "LATEST").read_text().strip()
    manifest = strict_loads((tmp_path / "store" / "shop" / "versions" / version / "manifest.json").read_text())
    assert manifest["evaluation"] is None
    assert manifest["evaluation_skipped"].startswith("no user has 2 or more items")
    assert manifest["gate"]["metric_checks"] == "skipped"
    page = (tmp_path / "store" / "shop" / "versions" / version / "report.html").read_text()
    assert "metric checks were skipped: no user has 2 or more items" in page
    shown = cli_runner().invoke(cli, ["evaluate", "--store", str(tmp_path / "store")])
    assert shown.exit_code == 0, shown.output
    assert "metric checks were skipped: no user has 2 or more items" in shown.stdout


def test_a_file_behind_a_linked_partition_changes_the_fingerprint(tmp_path):
    """A backfilled day behind a link is part of the input: when it changes, the run is not up to date."""
    import os

    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import input_fingerprint

    case = real_world.write_case("hive_with_a_linked_partition", tmp_path / "case")
    job = load_job_config(job_file(tmp_path / "case", tmp_path / "store", {**case.input, "path": "linked"}))
    before = input_fingerprint(job)
    target = tmp_path / "case" / "backfill" / "day2" / "part-0.parquet"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert input_fingerprint(job) != before
