"""`strict_json`: every JSON answer is RFC 8259 (a NaN or infinite float becomes null)."""

from __future__ import annotations

import json

import numpy as np

from aefeatures.schema import strict_json


def _strict(text: str):
    def refuse(name: str):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_finite_values_pass_unchanged():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert _strict(strict_json(value)) == value


def test_non_finite_floats_become_null_anywhere():
    value = {"score": float("nan"), "items": [{"s": float("inf")}, {"s": -float("inf")}, (1.0, float("nan"))],
             "np": np.float32("nan")}
    out = _strict(strict_json(value, default=lambda v: v.item()))
    assert out == {"score": None, "items": [{"s": None}, {"s": None}, [1.0, None]], "np": None}


def test_the_suite_parses_json_strictly():
    """conftest makes every json.loads in the tests strict: a NaN answer fails its test."""
    import pytest

    for text in ("NaN", "[1, Infinity]", '{"s": -Infinity}'):
        with pytest.raises(ValueError, match="non-strict JSON"):
            json.loads(text)
