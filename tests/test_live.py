"""LiveStore: what a service serves while jobs publish (without HTTP in the way)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from aefeatures import errors
from aefeatures.serving.live import LiveStore
from aefeatures.store import layout, publish


@pytest.fixture
def store_copy(trained, tmp_path):
    store_dir, _ = trained
    shutil.copytree(store_dir, tmp_path / "store")
    return tmp_path / "store"


def _copy_version(store, version: str, copy: str) -> None:
    """Publish ``version``'s content again as ``copy`` (its manifest names its own folder, as a
    real publish's does)."""
    target = store / "movies" / layout.VERSIONS / copy
    shutil.copytree(store / "movies" / layout.VERSIONS / version, target)
    manifest = json.loads((target / layout.MANIFEST).read_text())
    publish.write_manifest(target, {**manifest, "version": copy})


def test_a_moved_latest_switches_and_old_objects_keep_answering(store_copy):
    live = LiveStore(store_copy)
    old = live.get("movies")
    user = old.user_ids[0]
    before = old.recommend(user, 5).ids.tolist()
    version = old.version
    copy = "29991231T000000.000000Z"  # a later version id: same content, other name
    _copy_version(store_copy, version, copy)
    publish.atomic_write(store_copy / "movies" / layout.LATEST, copy + "\n")
    assert live.refresh() == ["movies"] and live.get("movies").version == copy
    shutil.rmtree(store_copy / "movies" / layout.VERSIONS / version)  # retention, say
    assert old.recommend(user, 5).ids.tolist() == before  # a request holding the old one finishes
    assert live.refresh() == []


def test_a_version_that_cannot_load_leaves_the_previous_one_serving(store_copy, caplog):
    live = LiveStore(store_copy)
    version = live.get("movies").version
    publish.atomic_write(store_copy / "movies" / layout.LATEST, "29991231T000000.000000Z\n")  # no such folder
    assert live.refresh() == []
    assert live.get("movies").version == version
    assert "feature set movies: cannot read its LATEST" in caplog.text and f"still serving {version}" in caplog.text


def test_unknown_names_and_missing_stores(store_copy, tmp_path):
    live = LiveStore(store_copy)
    assert live.versions() == {"movies": live.get("movies").version}
    with pytest.raises(errors.FeatureSetNotFoundError, match="feature set `nope` is not served here; it serves"):
        live.get("nope")
    with pytest.raises(errors.FeatureSetNotFoundError, match="does not exist"):
        LiveStore(tmp_path / "missing")


def test_the_follower_thread_picks_up_a_publish(store_copy):
    live = LiveStore(store_copy, poll_seconds=0.05)
    live.start()
    try:
        version = live.get("movies").version
        copy = "29991231T000000.000000Z"
        _copy_version(store_copy, version, copy)
        publish.atomic_write(store_copy / "movies" / layout.LATEST, copy + "\n")
        for _ in range(600):
            if live.get("movies").version == copy:
                break
            time.sleep(0.05)
        assert live.get("movies").version == copy
    finally:
        live.stop()


def test_a_feature_set_whose_folder_leaves_the_store_is_no_longer_served(store_copy):
    live = LiveStore(store_copy)
    version = live.get("movies").version
    (store_copy / "movies").rename(store_copy / "movies_moved")
    live.refresh()
    assert live.versions() == {"movies_moved": version}
    with pytest.raises(errors.FeatureSetNotFoundError):
        live.get("movies")
    assert "movies" not in live.status()["feature_sets"]
    (store_copy / "movies_moved").rename(store_copy / "movies")
    live.refresh()
    assert live.versions() == {"movies": version} and live.status()["feature_sets"].keys() == {"movies"}
