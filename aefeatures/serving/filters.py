"""Lookup filters: one SQL boolean expression over a version's item attributes, evaluated safely.

A filter is the text of one DuckDB expression over the attribute columns and ``item_id``, such
as ``category = 'books' AND in_stock AND price < 20`` or ``list_contains(tags, 'kids')``. It is
data, never code that can reach anything but the attributes:

1. Its length is capped (:data:`MAX_FILTER_CHARS`).
2. DuckDB's own parser reads ``SELECT (<filter>) AS keep FROM attributes`` (``json_serialize_sql``,
   which parses without running anything). The result must be that one statement, exactly:
   a filter that closes the parenthesis to add clauses, statements, subqueries or a second
   column is refused.
3. Every node of the expression tree must be a column of the attributes, a literal, a
   comparison, AND/OR/NOT, IN, BETWEEN, IS [NOT] NULL, a cast to a plain type, or a call of a
   function in :data:`FUNCTIONS` (LIKE/ILIKE, ``list_contains``, ``lower``, arithmetic, ...).
   Table functions (``read_csv``, ...), subqueries, aggregates, window functions and anything
   that reads the clock or the environment are not in it. The nesting depth is capped.
4. It runs on an in-memory DuckDB database that holds only the attributes table, one thread,
   with external access (files, network, extensions) switched off and the configuration locked,
   under a per-request time limit (:data:`TIME_LIMIT_S`; the query is interrupted past it).

The answer is one boolean per item row (null counts as false). Invalid filters raise
:class:`aefeatures.errors.FilterError` naming the problem (HTTP 422, exit 2).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aefeatures import errors

log = logging.getLogger(__name__)

MAX_FILTER_CHARS = 4096
MAX_DEPTH = 64  # nested expression levels
TIME_LIMIT_S = 1.0  # per evaluation; a filter's item set is then cached per version

# Scalar functions a filter may call (LIKE and friends are the operators ~~ !~~ ~~* !~~*).
FUNCTIONS = frozenset({
    "~~", "!~~", "~~*", "!~~*", "like", "ilike", "not_like", "not_ilike",
    "+", "-", "*", "/", "//", "%",
    "list_contains", "list_has", "array_contains", "list_has_any", "list_has_all", "list_value",
    "len", "length", "array_length", "lower", "upper", "trim", "starts_with", "ends_with", "contains",
    "prefix", "suffix", "abs", "round", "floor", "ceil", "least", "greatest", "coalesce",
    "year", "month", "day", "date_part", "date_trunc",
})
CAST_TYPES = frozenset({"BOOLEAN", "BOOL", "INTEGER", "INT", "BIGINT", "DOUBLE", "FLOAT", "REAL", "DECIMAL",
                        "VARCHAR", "TEXT", "STRING", "DATE", "TIMESTAMP", "TIMESTAMPTZ"})
OPERATORS = frozenset({"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN",
                       "COMPARE_NOT_IN", "OPERATOR_COALESCE"})
_TEMPLATE = "SELECT ({}) AS keep FROM attributes"


class FilterEngine:
    """Evaluates filters over one version's attributes table (``n_items`` rows, item-row order).

    Parameters
    ----------
    table
        A pyarrow table with ``item_id`` and the attribute columns, one row per item row.
    time_limit
        Seconds one evaluation may take before it is interrupted.

    Thread-safe, and evaluations run side by side: each parses and runs on a cursor of its own
    (a DuckDB connection is not safe to share between threads; its cursors are separate
    connections to the one sandboxed database). Only making a cursor takes a lock, briefly.
    """

    def __init__(self, table: pa.Table, time_limit: float = TIME_LIMIT_S):
        import duckdb

        self.columns = {name.lower(): name for name in table.column_names}
        self.n_rows = table.num_rows
        self.time_limit = time_limit
        self._lock = threading.Lock()
        con = duckdb.connect(":memory:", config={"threads": 1, "autoinstall_known_extensions": False,
                                                 "autoload_known_extensions": False})
        con.register("source", table)
        con.execute("CREATE TABLE attributes AS SELECT * FROM source")
        con.unregister("source")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        self._con = con

    def mask(self, text: str) -> np.ndarray:
        """(n_items,) bool: the item rows for which the filter ``text`` is true.

        Raises
        ------
        FilterError
            Not a string, empty or too long; does not parse; not one expression; uses a column,
            function or construct filters may not use; is not true/false; a type mismatch; or
            runs past the time limit.
        """
        import duckdb

        with self._cursor() as cursor:
            statement = self.validate(text, cursor)
            done = threading.Event()
            timer = threading.Thread(target=_interrupt_past, args=(cursor, self.time_limit, done), daemon=True)
            timer.start()
            log.debug("filter `%s`: evaluating", _short(text))
            start = time.perf_counter()
            try:
                relation = cursor.sql(statement)
                kind = str(relation.types[0])
                if kind not in ("BOOLEAN", '"NULL"', "NULL"):
                    raise errors.FilterError(f"`{_short(text)}` is of type {kind}, not true/false; compare it "
                                             "with something (e.g. `price > 10`).")
                keep = relation.to_arrow_table().column(0)
            except duckdb.InterruptException:
                raise errors.FilterError(f"`{_short(text)}` took longer than the {self.time_limit:g} s a filter "
                                         "may take; simplify it.") from None
            except duckdb.Error as exc:
                raise errors.FilterError(f"`{_short(text)}`: {_duckdb_message(exc)}") from None
            finally:
                done.set()
                timer.join()
                log.debug("filter `%s`: finished in %.1f ms", _short(text), 1e3 * (time.perf_counter() - start))
        keep = pc.fill_null(keep.cast(pa.bool_()), False)
        return np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A cursor of the sandboxed database for one evaluation, closed after it."""
        with self._lock:  # making a cursor registers it with the parent connection
            cursor = self._con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def validate(self, text: Any, cursor: Any = None) -> str:
        """The one statement that evaluates ``text``, once it has passed every check (parsed on
        ``cursor``, or on a cursor of its own). Raises :class:`FilterError` as :meth:`mask` does."""
        if not isinstance(text, str):
            raise errors.FilterError(f"a filter is a string, got {type(text).__name__}.")
        if not text.strip():
            raise errors.FilterError("the filter is empty; leave it out to keep every item.")
        if len(text) > MAX_FILTER_CHARS:
            raise errors.FilterError(f"{len(text):,} characters, over the limit of {MAX_FILTER_CHARS:,}; "
                                     "send an allow-list of item ids (`items`) for long id lists.")
        if "\x00" in text:
            raise errors.FilterError("it contains a NUL character.")
        statement = _TEMPLATE.format(text)
        if cursor is None:
            with self._cursor() as cursor:
                return self.validate(text, cursor)
        serialized = cursor.execute("SELECT json_serialize_sql($1::VARCHAR)", [statement]).fetchall()[0][0]
        try:
            parsed = json.loads(serialized)
        except RecursionError:  # hundreds of nested NOTs or brackets: deeper than any JSON reader goes
            raise errors.FilterError(f"nested deeper than {MAX_DEPTH} levels; simplify it.") from None
        if parsed.get("error"):
            raise errors.FilterError(f"`{_short(text)}` is not an expression DuckDB can parse "
                                     f"({parsed.get('error_message', '').splitlines()[0][:200]}).")
        statements = parsed.get("statements") or []
        if len(statements) != 1:
            raise errors.FilterError("a filter is one expression, not several statements.")
        node = statements[0].get("node") or {}
        expressions = node.get("select_list") or []
        table = node.get("from_table") or {}
        shape_ok = (
            node.get("type") == "SELECT_NODE" and not node.get("modifiers") and not (node.get("cte_map") or {}).get("map")
            and len(expressions) == 1 and expressions[0].get("alias") == "keep"
            and table.get("type") == "BASE_TABLE" and table.get("table_name") == "attributes"
            and not table.get("schema_name") and not table.get("catalog_name") and not table.get("alias")
            and table.get("sample") is None and table.get("at_clause") is None and not table.get("column_name_alias")
            and node.get("where_clause") is None and not node.get("group_expressions") and not node.get("group_sets")
            and node.get("having") is None and node.get("sample") is None and node.get("qualify") is None
            and node.get("aggregate_handling") == "STANDARD_HANDLING"
        )
        if not shape_ok:
            raise errors.FilterError(f"`{_short(text)}` is not one expression (it adds clauses, columns or "
                                     "statements around it).")
        self._check(expressions[0], text)
        return statement

    def _check(self, root: dict[str, Any], text: str) -> None:
        """Walk every node of the parsed expression (iteratively, to any size) and refuse what
        filters may not contain."""
        stack: list[tuple[Any, int]] = [(root, 0)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, list):
                stack.extend((v, depth) for v in value)
                continue
            if not isinstance(value, dict):
                continue
            if "class" in value:
                depth += 1
                if depth > MAX_DEPTH:
                    raise errors.FilterError(f"nested deeper than {MAX_DEPTH} levels; simplify it.")
                self._check_node(value, text)
            stack.extend((v, depth) for key, v in value.items() if isinstance(v, (dict, list)))

    def _check_node(self, node: dict[str, Any], text: str) -> None:
        kind, what = node.get("class"), node.get("type")
        if kind == "COLUMN_REF":
            names = node.get("column_names") or []
            if len(names) != 1 or names[0].lower() not in self.columns:
                name = ".".join(names)
                known = ", ".join(sorted(self.columns.values()))
                raise errors.FilterError(f"unknown column `{name}`; this version's items have: {known}.")
        elif kind in ("CONSTANT", "COMPARISON", "CONJUNCTION", "BETWEEN"):
            pass
        elif kind == "OPERATOR":
            if what not in OPERATORS:
                raise errors.FilterError(f"`{_short(text)}` uses {what}, which filters may not use.")
        elif kind == "CAST":
            pass  # its TYPE node is checked on its own
        elif kind == "TYPE":
            if str(node.get("type_name", "")).upper() not in CAST_TYPES or node.get("children") or \
                    node.get("schema") or node.get("catalog"):
                raise errors.FilterError(f"casts in filters go to plain types ({', '.join(sorted(CAST_TYPES))}).")
        elif kind == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            plain = (not node.get("schema") and not node.get("catalog") and node.get("filter") is None
                     and not (node.get("order_bys") or {}).get("orders") and not node.get("distinct")
                     and not node.get("export_state"))
            if name not in FUNCTIONS or not plain:
                raise errors.FilterError(f"function `{name}` is not allowed in filters; allowed: "
                                         f"{', '.join(sorted(f for f in FUNCTIONS if f[0].isalpha()))}, "
                                         "LIKE, ILIKE and arithmetic.")
        else:
            raise errors.FilterError(f"`{_short(text)}` uses {str(kind).lower()} ({what}), which filters may not "
                                     "use: only columns, literals, comparisons, AND/OR/NOT, IN, BETWEEN, IS NULL, "
                                     "casts and a few functions.")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duckdb_message(exc: Exception) -> str:
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return line.replace("SELECT (", "").strip()[:300]


def empty_attributes(item_ids: pa.Array) -> pa.Table:
    """The attributes table of a version written without `[items]`: ``item_id`` alone."""
    return pa.table({"item_id": item_ids})


def _interrupt_past(cursor, seconds: float, done: threading.Event) -> None:
    """Interrupt ``cursor`` once ``seconds`` have passed, and again every 10 ms until ``done``.

    One interrupt can land between the statement's planning and its execution, where DuckDB
    drops it; repeating it until the evaluation returns makes the time limit hold.
    """
    if done.wait(seconds):
        return
    while True:
        cursor.interrupt()
        if done.wait(0.01):
            return
