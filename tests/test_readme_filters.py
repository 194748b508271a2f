"""The README's "Item attributes and filters" examples run for real against a store built from
its own `[items]` snippet: the Python block, the CLI lines and the SQL blocks."""

from __future__ import annotations

import re
import shlex
from datetime import date

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from aefeatures.cli.app import cli
from aefeatures.config import load_job_config
from aefeatures.jobs.run import run_job
from tests.conftest import REPO, write_job

SECTION = (REPO / "README.md").read_text().split("## Item attributes and filters", 1)[1].split("\n## ", 1)[0]


def blocks(info: str) -> list[str]:
    return re.findall(rf"```{info}\n(.*?)```", SECTION, flags=re.S)


def attributes(n_items: int = 500) -> pl.DataFrame:
    ids = list(range(n_items))
    return pl.DataFrame({
        "item_id": ids,
        "category": [("books", "toys", "food", None)[i % 4] for i in ids],
        "price": [float(i % 40) for i in ids],
        "in_stock": [i % 3 != 0 for i in ids],
        "tags": [["kids"] if i % 5 == 0 else ["new"] for i in ids],
        "released": [date(2020 + i % 6, 1, 1) for i in ids],
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme-filters")
    attributes().write_parquet(folder / "items.parquet")
    job = write_job(folder, name="example", model={"epochs": 3, "dim": 16, "hidden": [64]},
                    evaluation={"valid_share": 0.0})
    (snippet,) = blocks("toml filters")
    job.write_text(job.read_text() + snippet)
    run_job(load_job_config(job), progress=False)
    return folder


def test_the_python_example_runs_and_obeys_its_filters(store, monkeypatch):
    monkeypatch.chdir(store)
    (example,) = blocks("python filters")
    ns: dict = {}
    exec(compile(example, "README.md", "exec"), ns)
    attrs = {r["item_id"]: r for r in ns["fs"].attributes.to_dicts()}
    assert len(ns["books"]) == 10
    assert all(attrs[i]["category"] == "books" and attrs[i]["in_stock"] for i in ns["books"].tolist())
    assert all(attrs[i]["price"] < 20 and "kids" in attrs[i]["tags"] for i in ns["cheap"].tolist())
    assert set(ns["chosen"].tolist()) <= {3, 12, 31, 150, 178} and len(ns["chosen"]) == 3
    assert all(attrs[i]["released"] >= date(2023, 1, 1) for i in ns["recent"].tolist()) and len(ns["recent"]) == 5
    assert ns["batch"].height == 15 and 178 not in ns["batch"].get_column("item_id").to_list()


def test_the_cli_lines_run(store, monkeypatch):
    monkeypatch.chdir(store)
    (store / "candidates.txt").write_text("3\n12\n31\n150\n")
    (console,) = [b for b in re.findall(r"```console\n(.*?)```", SECTION, flags=re.S)]
    lines = [line[2:] for line in console.splitlines() if line.startswith("$ aefeatures ")]
    assert len(lines) == 2
    for line in lines:
        result = CliRunner().invoke(cli, shlex.split(line)[1:])
        assert result.exit_code == 0, result.output
    assert "3" in result.stdout and '"items"' in result.stdout


def test_the_sql_examples_run(store):
    con = duckdb.connect()
    con.execute((store / "store" / "catalog.sql").read_text())
    first, second = (con.execute(q).fetchall() for q in blocks("sql filters"))
    assert len(first) == 10 and len(second) == 5 and all("kids" in row[3] for row in second)
