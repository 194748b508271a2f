"""`[`, `*` and `?` in a store's or an input file's path are part of the name, never a glob: a
store under `s[1]/` reads its own files, not `s1/`'s (Polars and DuckDB both glob by default)."""

from __future__ import annotations

import shutil

import polars as pl

from aefeatures.cli.app import cli
from tests.conftest import FIXTURES, cli_runner, write_job


def test_a_store_and_inputs_with_glob_characters_run_embed_and_answer(tmp_path):
    folder = tmp_path / "data[1]"
    folder.mkdir()
    shutil.copy(FIXTURES / "interactions_next_day.parquet", folder / "next[day].parquet")
    shutil.copy(FIXTURES / "interactions.parquet", folder / "in[1]*.parquet")
    attributes = folder / "items?.parquet"
    shutil.copy(FIXTURES / "truth_items.parquet", attributes)
    store = tmp_path / "s[1]"
    (tmp_path / "s1").mkdir()  # what `s[1]` matches as a glob: must stay untouched and unread
    inputs = {"weight_col": "rating", "timestamp_col": "timestamp", "min_weight": 4.0}
    job = write_job(tmp_path, store=store, model={"kind": "dlae"},
                    input={"path": str(folder / "in[1]*.parquet"), **inputs})
    job.write_text(job.read_text() + f'\n[items]\npath = "{attributes}"\ncolumns = ["cluster"]\n')
    for args in (["run", str(job)], ["run", "--force", str(job)]):  # the second aligns with the first
        result = cli_runner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    later = write_job(tmp_path, store=store, model={"kind": "dlae"}, filename="later.toml",
                      input={"path": str(folder / "next[day].parquet"), **inputs})
    later.write_text(later.read_text() + f'\n[items]\npath = "{attributes}"\ncolumns = ["cluster"]\n')
    result = cli_runner().invoke(cli, ["embed", str(later)])
    assert result.exit_code == 0 and "8 new item(s) folded in" in result.output, result.output
    result = cli_runner().invoke(cli, ["similar", "--store", str(store), "--item", "501", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "s1").iterdir()) == []
    assert pl.read_parquet(attributes, glob=False).height == 500
