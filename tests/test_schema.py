"""The manifest's one reader: keys unchanged, schema_version checked."""

from __future__ import annotations

import json

import pytest

from aefeatures.errors import BadInputError
from aefeatures.schema import SCHEMA_VERSION, Manifest
from aefeatures.store.layout import read_manifest

FACTS = {"feature_set": "movies", "version": "v1", "created_at": "2026-01-01T00:00:00+00:00", "dim": 8,
         "counts": {"users": 3, "items": 4}, "config": {}, "index": {}}


def test_a_manifest_reads_as_its_json_with_typed_facts(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, **FACTS}))
    m = read_manifest(tmp_path)
    assert isinstance(m, Manifest) and m == {"schema_version": SCHEMA_VERSION, **FACTS}
    assert (m.dim, m.version, m.feature_set, m.schema_version, m.embedded_with) == (8, "v1", "movies", 1, None)


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
