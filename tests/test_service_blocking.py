"""What could stall the HTTP service: loading a pinned version (`?version=`), an unknown version
against a large run log, and slow filters. Each is shown on real stores by the order of recorded
events (and bytes read), never by how long anything took."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import polars as pl
import pytest

import aefeatures
import aefeatures.serving.lookup as lookup
from aefeatures import errors
from aefeatures.data.attributes import align_attributes
from aefeatures.serving.http import create_app
from aefeatures.serving.live import LiveStore
from aefeatures.serving.lookup import FeatureSet, PinnedVersions
from aefeatures.store import layout, tables
from tests.random_store import publish_random

VERSIONS = ["v1", "v2", "v3", "v4"]  # v4 is live
SAFETY_S = 60  # a blocked step is released after this long, so a regression fails instead of hanging
# Two distinct filters DuckDB takes a while over (backtracking LIKE over 5,000-character strings).
SLOW = ["text LIKE '%a_a_a_a_a_b%'", "text LIKE '%a_a_a_a_a_c%'"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Four versions of feature set "p", 2,000 items each with a long `text` attribute."""
    root = tmp_path_factory.mktemp("blocking") / "store"

    def attributes(staging, matrix):
        ids = matrix.item_ids.to_numpy()
        frame = pl.DataFrame({"item_id": ids, "text": ["a" * 5000] * len(ids), "n": np.arange(len(ids))})
        tables.write_attributes(staging, align_attributes(frame, matrix.item_ids)[0])
        return {}

    rng = np.random.default_rng(0)
    for version in VERSIONS:
        publish_random(root, version, rng, 3, 2000, 4, "Flat", extra=attributes)
    return root


@pytest.fixture()
def events(caplog):
    """The filter engine's debug records ("evaluating" / "finished"), in the order they happened."""
    caplog.set_level(logging.DEBUG, logger="aefeatures.serving.filters")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "aefeatures.serving.filters"]


def side_by_side(*calls):
    """Run the calls on threads released together; their results (or exceptions), in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(n, call):
        barrier.wait()
        try:
            results[n] = call()
        except Exception as exc:  # noqa: BLE001 — handed back to the test
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- filters -------------------------------------------------------------------------------------------

def test_distinct_slow_filters_are_evaluated_side_by_side(store, events):
    fs = aefeatures.open_store(store)["p", "v1"]
    first, second = side_by_side(*(lambda text=text: fs.filter_items(text) for text in SLOW))
    assert len(first) == len(second) == 0  # every text ends in "a": neither keeps an item
    log = events()
    starts = [log.index(f"filter `{text}`: evaluating") for text in SLOW]
    ends = [next(i for i, m in enumerate(log) if m.startswith(f"filter `{text}`: finished")) for text in SLOW]
    assert max(starts) < min(ends), log  # each began before the other ended: they overlapped


def test_one_filter_asked_for_by_two_callers_at_once_is_evaluated_once(store, events):
    fs = aefeatures.open_store(store)["p", "v1"]
    first, second = side_by_side(*(lambda: fs.filter_items(SLOW[0] + " OR n < 3") for _ in range(2)))
    assert first.tolist() == second.tolist() == fs.item_ids[:3].tolist()
    assert sum(m.endswith(": evaluating") for m in events()) == 1, events()


def test_a_filter_error_reaches_every_caller_waiting_for_it(store):
    fs = aefeatures.open_store(store)["p", "v1"]
    results = side_by_side(*(lambda: fs.filter_items(SLOW[0] + " AND colour = 1") for _ in range(2)))
    assert all(isinstance(r, errors.FilterError) and "unknown column `colour`" in str(r) for r in results)
    assert not fs.has_cached_filter(SLOW[0] + " AND colour = 1")


def test_the_filter_cache_stays_within_its_byte_budget(store, monkeypatch):
    probe = aefeatures.open_store(store)["p", "v2"]
    n = probe.n_items
    one = 8 * (n - 1) + n + (n + 7) // 8  # `item_id <> i` keeps all but one: its rows, mask and bitmap
    budget = 4 * one + one // 2
    monkeypatch.setattr(lookup, "FILTER_CACHE_BYTES", budget, raising=False)
    fs = aefeatures.open_store(store)["p", "v2"]
    ids = fs.item_ids.tolist()
    for n, item in enumerate(ids[:30]):
        kept = fs.filter_items(f"item_id <> {item}")
        assert len(kept) == fs.n_items - 1 and item not in kept
        held = sum(a.rows.nbytes + a.mask.nbytes + (len(a.mask) + 7) // 8 for a in fs._filter_cache.values())
        assert held <= budget
    assert fs.filter_cache_size == (4, held)
    assert len(fs._filter_cache) == 4  # the most recent four, and an evicted one is evaluated again
    assert list(fs._filter_cache) == [f"item_id <> {i}" for i in ids[26:30]]
    assert ids[0] not in fs.filter_items(f"item_id <> {ids[0]}").tolist()
    assert fs.recommend(fs.user_ids[0], k=3, filter=f"item_id <> {ids[5]}").ids.tolist() == \
        fs.recommend(fs.user_ids[0], k=3, items=[i for i in ids if i != ids[5]]).ids.tolist()


def test_an_item_set_larger_than_the_whole_budget_is_answered_not_kept(store):
    fs = FeatureSet(store, "p", "v2", filter_cache_bytes=100)
    assert len(fs.filter_items("n >= 0")) == fs.n_items
    assert fs.filter_cache_size == (0, 0) and not fs.has_cached_filter("n >= 0")


# --- pinned versions over HTTP, in-process: the event loop's view ---------------------------------------

async def asgi(app, path: str, **params) -> tuple[int, dict, dict]:
    """One GET through the ASGI app on the running loop: (status, headers, JSON body)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": urlencode(params).encode(), "root_path": "",
             "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


class HeldLoad:
    """Spies on FeatureSet.load: a load of ``version`` records its start, then waits for
    :meth:`release` (or SAFETY_S) before it goes on, and records its end."""

    def __init__(self, monkeypatch, version: str):
        self.version, self.log = version, []
        self.started, self.released = threading.Event(), threading.Event()
        self.threads: list[int] = []
        original = FeatureSet.load

        def load(fs):
            if fs.version == self.version:
                self.threads.append(threading.get_ident())
                self.log.append("load started")
                self.started.set()
                self.released.wait(SAFETY_S)
                self.log.append("load ended")
            return original(fs)

        monkeypatch.setattr(FeatureSet, "load", load)

    def release(self) -> None:
        self.released.set()

    async def wait_started(self) -> None:
        for _ in range(100 * SAFETY_S):
            if self.started.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the pinned version was never loaded")


def test_a_pinned_version_loads_off_the_event_loop(store, monkeypatch):
    live = LiveStore(store)
    app = create_app(live, follow=False)
    held = HeldLoad(monkeypatch, "v1")
    user = int(live.get("p").user_ids[0])

    async def scenario():
        pinned = asyncio.create_task(asgi(app, "/v1/p/recommend", user=user, k=3, version="v1"))
        await held.wait_started()
        status, _, body = await asgi(app, "/v1/p/recommend", user=user, k=3)  # the live version, meanwhile
        held.log.append("live answered")
        busy = await asgi(app, "/v1/p/similar", item=2, k=3, version="v2")  # one load at a time
        joined = asyncio.create_task(asgi(app, "/v1/p/version", version="v1"))  # joins the load under way
        held.release()
        return (status, body), busy, await pinned, await joined, threading.get_ident()

    (status, body), busy, pinned, joined, loop_thread = asyncio.run(scenario())
    assert held.log == ["load started", "live answered", "load ended"]
    assert held.threads and loop_thread not in held.threads
    assert status == 200 and body["version"] == "v4"
    assert busy[0] == 503 and busy[1]["retry-after"] == "1" and busy[2]["error"]["code"] == "busy"
    assert pinned[0] == 200 and pinned[2]["version"] == "v1"
    assert joined[0] == 200 and joined[2]["version"] == "v1"
    assert held.log.count("load started") == 1  # loaded once, then kept
    assert asyncio.run(asgi(app, "/v1/p/similar", item=2, k=3, version="v1"))[0] == 200


def test_unknown_and_deleted_versions_are_told_apart_without_the_store_path(store):
    (store / "p" / layout.RUN_LOG).write_text(json.dumps({"removed_by_retention": ["versions/v0"],
                                                          "ended": "2026-01-01T00:00:00+00:00"}) + "\n")
    app = create_app(LiveStore(store), follow=False)
    for version, status, code, text in [("v0", 410, "version_gone", "was deleted by retention"),
                                        ("v9", 404, "no_such_version", "has no version `v9`"),
                                        ("../../etc", 404, "no_such_version", "has no version")]:
        got, _, body = asyncio.run(asgi(app, "/v1/p/recommend", user=1, k=3, version=version))
        assert (got, body["error"]["code"]) == (status, code)
        assert text in body["error"]["message"] and str(store) not in body["error"]["message"]
        assert "STORE" not in body["error"]["message"]  # said plainly, not as a placeholder path


def test_pinned_versions_keep_the_most_recently_used(store):
    pins = PinnedVersions(store, keep=2)
    for version in ["v1", "v2", "v1", "v3"]:
        found = pins.get("p", version)
        found = found if isinstance(found, FeatureSet) else found.result()
        assert found.version == version
    assert pins.loaded() == [("p", "v1"), ("p", "v3")]


# --- the run log: an unknown version reads its tail only ------------------------------------------------

TAIL = 2 << 20  # bytes: what looking a version up may read of the run log, at most (layout.RUN_LOG_TAIL: 1 MiB)


def read_bytes_during(call) -> int:
    """Bytes this process passed through read() while ``call`` ran (Linux /proc/self/io)."""
    def rchar() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")).split()[1])

    before = rchar()
    call()
    return rchar() - before


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's /proc/self/io to count bytes read")
def test_an_unknown_version_reads_only_the_tail_of_a_large_run_log(store, tmp_path):
    log_path = store / "p" / layout.RUN_LOG
    entry = {"status": "published", "version": "v0", "removed_by_retention": ["versions/old"], "ended": "then"}
    line = json.dumps({**entry, "timings": {f"stage{n}": n for n in range(40)}}) + "\n"
    gone = json.dumps({"removed_by_retention": ["versions/v0"], "ended": "2026-01-01T00:00:00+00:00"}) + "\n"
    log_path.write_text(line * (24_000_000 // len(line)) + gone)  # 24 MB, the deletion last
    assert log_path.stat().st_size > 10 * TAIL

    def unknown():
        with pytest.raises(errors.FeatureSetNotFoundError, match="has no version `v9`"):
            FeatureSet(store, "p", "v9")

    def deleted():
        with pytest.raises(errors.VersionGoneError, match="ended 2026-01-01"):
            FeatureSet(store, "p", "v0")

    assert read_bytes_during(unknown) <= TAIL
    assert read_bytes_during(deleted) <= TAIL
    log_path.write_text(gone + line * (24_000_000 // len(line)))  # a deletion older than the tail holds
    with pytest.raises(errors.FeatureSetNotFoundError, match="has no version `v0`") as info:
        FeatureSet(store, "p", "v0")
    assert not isinstance(info.value, errors.VersionGoneError)
    log_path.unlink()


# --- lookups that derive data on first use leave the event loop until it is made ---------------------------

def test_lookups_are_warm_only_once_what_they_derive_is_made(store):
    fs = FeatureSet(store, "p", "v3").load()
    assert fs.is_warm("recommend")
    assert not fs.is_warm("history")  # a random version has no stored encoder: a thread says so, not the loop
    assert not fs.is_warm("similar_users") and not fs.is_warm("similar_cosine")
    assert not fs.is_warm("recommend", filter="n < 5")
    fs.similar_users(fs.user_ids[0], k=2)
    fs.similar_items(fs.item_ids[0], k=2, metric="cosine")
    fs.recommend(fs.user_ids[0], k=2, filter="n < 5")
    assert fs.is_warm("similar_users") and fs.is_warm("similar_cosine") and fs.is_warm("recommend", filter="n < 5")
