"""A hand-edited or damaged manifest is one clear line naming the key, never a traceback; a
damaged old version does not hide the others; `run --force` replaces a damaged live one."""

from __future__ import annotations

import json
import shutil

import pytest

from aefeatures import errors
from aefeatures.cli.app import cli
from aefeatures.schema import Manifest
from aefeatures.store import layout
from tests.conftest import cli_runner, write_job


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """A store with two published versions of `movies` (a fast dlae): (folder, job file)."""
    folder = tmp_path_factory.mktemp("manifests")
    job = write_job(folder, model={"kind": "dlae"})
    for args in (["run", str(job)], ["run", "--force", str(job)]):
        assert cli_runner().invoke(cli, args).exit_code == 0
    return folder, job


@pytest.fixture
def store(two_versions, tmp_path):
    """A fresh copy of the two-version store and its job file: (store dir, job file)."""
    folder, _ = two_versions
    shutil.copytree(folder / "store", tmp_path / "store")
    job = write_job(tmp_path, model={"kind": "dlae"})
    return tmp_path / "store", job


def _edit(store, which: int, change) -> str:
    """Apply ``change`` to the manifest of the ``which``-th version (0 oldest, -1 live); its id."""
    version = layout.listed_versions(store, "movies")[which]
    path = store / "movies" / layout.VERSIONS / version / layout.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))  # Python writes NaN and Infinity as JSON would not
    return version


DAMAGE = {
    "dim text": (lambda m: m.update(dim="abc"), "`dim` is 'abc'"),
    "dim NaN": (lambda m: m.update(dim=float("nan")), "`NaN`"),
    "dim huge": (lambda m: m.update(dim=1e308), "`dim` is 1e+308"),
    "dim zero": (lambda m: m.update(dim=0), "`dim` is 0"),
    "counts inf": (lambda m: m["counts"].update(users=float("inf")), "`Infinity`"),
    "counts negative": (lambda m: m["counts"].update(items=-3), "`counts.items` is -3"),
    "version number": (lambda m: m.update(version=5), "`version` is 5"),
    "version of another": (lambda m: m.update(version="20200101T000000.000000Z"), "version 20"),
    "created_at": (lambda m: m.update(created_at="yesterday"), "`created_at` is 'yesterday'"),
    "id type": (lambda m: m["id_types"].update(item="Float64"), "`id_types.item` is 'Float64'"),
    "config list": (lambda m: m.update(config=[1, 2]), "`config` is list"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_live_manifest_is_one_line_naming_the_key(store, damage, monkeypatch):
    root, _ = store
    change, said = DAMAGE[damage]
    _edit(root, -1, change)
    monkeypatch.chdir(root.parent)
    for args in (["recommend", "--store", "store", "--user", "1", "-k", "3"], ["versions", "--store", "store"]):
        result = cli_runner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0] and "damaged" in lines[0], (args, result.stderr)
        assert "Traceback" not in result.output + result.stderr
    # SQL leaves the feature set out with one warning naming the key; the store's other SQL answers
    result = cli_runner().invoke(cli, ["sql", "--store", "store", "-c", "SELECT 1 AS one"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "movies" in line]
    assert len(warned) == 1 and said in warned[0], result.stderr


def test_from_json_refuses_non_finite_numbers_anywhere(tmp_path):
    where = tmp_path / "20261207T120000.000000Z" / "manifest.json"
    good = {"version": "20261207T120000.000000Z", "dim": 8, "evaluation": {"model": {"ndcg@100": 0.5}}}
    assert Manifest.from_json(json.dumps(good), where).dim == 8
    bad = json.dumps({**good, "evaluation": {"model": {"ndcg@100": float("nan")}}})
    with pytest.raises(errors.DamagedManifestError, match="NaN"):
        Manifest.from_json(bad, where)


def test_a_damaged_old_version_is_listed_as_damaged_and_hides_nothing(store, monkeypatch):
    root, _ = store
    old = _edit(root, 0, lambda m: m.update(dim="abc"))
    monkeypatch.chdir(root.parent)
    result = cli_runner().invoke(cli, ["versions", "--store", "store", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["versions"]
    assert [r["status"] for r in rows] == ["damaged", "live"] and rows[0]["version"] == old
    assert "`dim` is 'abc'" in rows[0]["problem"] and rows[0]["was"] == "published"
    table = cli_runner().invoke(cli, ["versions", "--store", "store"])
    assert table.exit_code == 0 and f"version {old} (published) is damaged" in table.stderr
    lookup = cli_runner().invoke(cli, ["recommend", "--store", "store", "--user", "1", "-k", "3"])
    assert lookup.exit_code == 0, lookup.output  # the live version is sound
    sql = cli_runner().invoke(cli, ["sql", "--store", "store", "-c", "SELECT count(*) AS n FROM movies_items"])
    assert sql.exit_code == 0, sql.output


def test_run_force_replaces_a_damaged_live_version(store):
    root, job = store
    damaged = _edit(root, -1, lambda m: m.update(dim="abc"))
    refused = cli_runner().invoke(cli, ["run", str(job)])
    assert refused.exit_code == 2 and "run --force" in refused.stderr, refused.output
    repaired = cli_runner().invoke(cli, ["run", "--force", str(job)])
    assert repaired.exit_code == 0, repaired.output
    live = layout.live_version(root, "movies")
    assert live != damaged and layout.read_manifest(root / "movies" / layout.VERSIONS / live).dim > 0
