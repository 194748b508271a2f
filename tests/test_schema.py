"""The schema module: strict JSON for every answer, and the manifest's one reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aefeatures.errors import BadInputError
from aefeatures.schema import SCHEMA_VERSION, Manifest, strict_json
from aefeatures.store.layout import read_manifest
from tests.conftest import strict_loads


def test_finite_values_pass_unchanged():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert strict_loads(strict_json(value)) == value


def test_non_finite_floats_become_null_anywhere():
    value = {"score": float("nan"), "items": [{"s": float("inf")}, {"s": -float("inf")}, (1.0, float("nan"))],
             "np": np.float32("nan")}
    out = strict_loads(strict_json(value, default=lambda v: v.item()))
    assert out == {"score": None, "items": [{"s": None}, {"s": None}, [1.0, None]], "np": None}


def test_the_suite_parses_json_strictly():
    """conftest makes every json.loads in the tests strict: a NaN answer fails its test."""
    for text in ("NaN", "[1, Infinity]", '{"s": -Infinity}'):
        with pytest.raises(ValueError, match="non-strict JSON"):
            json.loads(text)



FACTS = {"feature_set": "movies", "version": "v1", "created_at": "2026-01-01T00:00:00+00:00", "dim": 8,
         "counts": {"users": 3, "items": 4}, "config": {}, "index": {}}


def test_a_manifest_reads_as_its_json_with_typed_facts(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, **FACTS}))
    m = read_manifest(tmp_path)
    assert isinstance(m, Manifest) and m == {"schema_version": SCHEMA_VERSION, **FACTS}
    assert (m.dim, m.version, m.feature_set, m.schema_version, m.embedded_with) == (8, "v1", "movies", SCHEMA_VERSION, None)


def test_a_manifest_from_a_newer_release_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, **FACTS}))
    with pytest.raises(BadInputError, match=rf"has schema_version {SCHEMA_VERSION + 1}, newer than the "
                                            rf"{SCHEMA_VERSION} this aefeatures reads.*Upgrade aefeatures"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text, problem", [
    ("{", "it is not JSON"),
    ("[1]", "it is not a JSON object"),
    (json.dumps({"schema_version": "1", **FACTS}), "`schema_version` is '1', not a positive integer"),
    (json.dumps({"schema_version": 1, "feature_set": "movies"}), "it lacks `version`, `dim`"),
])
def test_a_damaged_manifest_is_one_clear_error(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BadInputError, match=f"manifest `.*manifest.json` cannot be read: {problem}"):
        read_manifest(tmp_path)
