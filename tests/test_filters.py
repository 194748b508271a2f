"""The filter engine: valid filters give the right items; hostile or invalid ones are refused
with one line naming the problem, and nothing a filter says can reach a file, the network or an
extension."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from aefeatures import errors
from aefeatures.serving.filters import MAX_DEPTH, MAX_FILTER_CHARS, FilterEngine


@pytest.fixture(scope="module")
def engine():
    return FilterEngine(pa.table({
        "item_id": [1, 2, 3, 4],
        "category": ["books", "toys", None, "books"],
        "price": [5.0, 20.0, 1.0, None],
        "in_stock": [True, False, True, True],
        "tags": [["kids"], ["kids", "new"], None, []],
        "released": [date(2020, 1, 1), date(2021, 6, 1), None, date(2019, 5, 1)],
    }))


@pytest.mark.parametrize("text, expected", [
    ("category = 'books' AND in_stock", [1, 4]),
    ("price < 10", [1, 3]),
    ("NOT in_stock OR price IS NULL", [2, 4]),
    ("price BETWEEN 1 AND 5", [1, 3]),
    ("category IN ('toys', 'food')", [2]),
    ("category NOT IN ('toys')", [1, 4]),  # null is neither in nor out: not kept
    ("category LIKE 'b%'", [1, 4]),
    ("category ILIKE 'TOY%'", [2]),
    ("list_contains(tags, 'kids')", [1, 2]),
    ("len(tags) = 0", [4]),
    ("released >= DATE '2020-01-01'", [1, 2]),
    ("year(released) = 2021", [2]),
    ("item_id IN (2, 3) AND price * 2 > 3", [2]),
    ("\"category\" = 'toys'", [2]),
    ("lower(category) = 'toys' -- a comment is fine at the end? no: it eats the closing bracket", None),
])
def test_valid_filters_keep_the_right_items(engine, text, expected):
    if expected is None:
        with pytest.raises(errors.FilterError):
            engine.mask(text)
        return
    assert (np.flatnonzero(engine.mask(text)) + 1).tolist() == expected


@pytest.mark.parametrize("text, message", [
    ("colour = 'red'", "unknown column `colour`; this version's items have: category, in_stock, item_id"),
    ("category = 5", "Could not convert string 'books' to INT"),
    ("price", "of type DOUBLE, not true/false"),
    ("price >", "not an expression DuckDB can parse"),
    ("", "the filter is empty"),
    ("attributes.price > 1", "unknown column `attributes.price`"),
])
def test_invalid_filters_name_the_problem(engine, text, message):
    with pytest.raises(errors.FilterError, match=message) as info:
        engine.mask(text)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


HOSTILE = [
    # closing the expression to add statements, clauses or columns
    "1=1) AS keep FROM attributes; COPY attributes TO '/tmp/aef-leak.csv'; SELECT (1",
    "true) AS keep FROM attributes; INSTALL httpfs; SELECT (true",
    "true) AS keep FROM attributes; ATTACH '/tmp/aef-leak.db' AS x; SELECT (true",
    "true) AS keep FROM attributes; LOAD httpfs; SELECT (true",
    "true) AS keep FROM attributes; SET enable_external_access = true; SELECT (true",
    "true) AS keep, (1",
    "true) AS keep FROM attributes UNION ALL SELECT (true",
    "true) AS keep FROM read_csv('/etc/passwd') --",
    "true) AS keep FROM attributes WHERE (false",
    "category = 'books'; DROP TABLE attributes",
    "category = 'x' OR '1'='1'; --",
    "x' OR '1'='1",
    # reaching files, the network, settings or the environment from inside the expression
    "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
    "EXISTS (SELECT * FROM read_parquet('/etc/*.parquet'))",
    "read_csv('/etc/passwd') IS NOT NULL",
    "read_text('/etc/passwd') LIKE '%root%'",
    "len(glob('/etc/*')) > 0",
    "getenv('HOME') = '/root'",
    "current_setting('enable_external_access')",
    "category IN (SELECT category FROM attributes)",
    "COPY attributes TO '/tmp/aef-leak.csv'",
    "INSTALL httpfs",
    "ATTACH '/tmp/aef-leak.db'",
    "price > (SELECT max(price) FROM attributes)",
    "sum(price) OVER () > 1",
    "count(*) > 0",
    "list_filter(tags, t -> t = 'kids') = ['kids']",
    "now() > released",
    "price::STRUCT(a INT) IS NULL",
    "main.lower(category) = 'toys'",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_filters_are_refused(engine, text, tmp_path):
    with pytest.raises(errors.FilterError) as info:
        engine.mask(text)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert engine.mask("item_id > 0").all()  # the table is still there, whole
    assert not list(Path("/tmp").glob("aef-leak*"))


def test_huge_and_deep_filters_are_refused(engine):
    with pytest.raises(errors.FilterError, match=f"over the limit of {MAX_FILTER_CHARS:,}"):
        engine.mask("item_id = 1 OR " * 10_000 + "true")
    with pytest.raises(errors.FilterError, match=f"nested deeper than {MAX_DEPTH}"):
        engine.mask("NOT " * (MAX_DEPTH + 1) + "in_stock")
    with pytest.raises(errors.FilterError, match="nested deeper than"):  # past any JSON reader's recursion
        engine.mask("NOT " * 600 + "in_stock")
    with pytest.raises(errors.FilterError, match="is a string"):
        engine.mask(["in_stock"])
    long_in = "item_id IN (" + ", ".join(map(str, range(600))) + ")"  # long but within the limit: fine
    assert engine.mask(long_in).tolist() == [True] * 4


def test_the_sandbox_itself_has_no_file_access_and_a_locked_configuration(engine):
    """Behind the checks: even SQL sent to the engine's connection directly reaches no file."""
    con = engine._con
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.PermissionException):
        con.execute("COPY attributes TO '/tmp/aef-leak.csv'")
    assert [r[0] for r in con.execute("SHOW TABLES").fetchall()] == ["attributes"]


def test_a_filter_running_past_the_time_limit_is_interrupted():
    n = 3_000_000
    slow = FilterEngine(pa.table({"item_id": np.arange(n), "name": pa.array(np.arange(n).astype(str))}),
                        time_limit=0.001)
    with pytest.raises(errors.FilterError, match="took longer than the 0.001 s"):
        slow.mask("upper(lower(upper(lower(name)))) LIKE '%999%' AND lower(name) ILIKE '%99%'")
