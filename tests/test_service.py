"""The HTTP lookup service, started as users start it (`aefeatures serve --port 0`), on real stores."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import polars as pl
import pytest

import aefeatures
from tests.conftest import write_job

START_TIMEOUT = 120  # seconds; generous for a loaded CI machine, never a timing assertion


class Service:
    """`aefeatures serve` in a subprocess, on a free port."""

    def __init__(self, store: Path, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aefeatures", "serve", "--store", str(store), "--port", "0", "--poll", "0.1", *extra],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.announced = self._wait_for_address()
        host, port = re.search(r"http://([\d.]+):(\d+)", self.announced).groups()
        self.host, self.port = host, int(port)

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "http://" in line:
                self.log: list[str] = []
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return line
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"service did not start: {self.proc.stderr.read()}")

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def get(self, path: str, **params):
        query = urlencode(params, doseq=True)
        return self.request("GET", f"{path}?{query}" if query else path)

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown and exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0
        assert not any("Traceback" in line for line in self.log), "".join(self.log)


@pytest.fixture(scope="module")
def service(trained):
    store_dir, result = trained
    svc = Service(store_dir)
    yield svc, aefeatures.open_store(store_dir)["movies"]
    svc.stop()


def ranked(items, key="item_id"):
    return [row[key] for row in items]


# --- every endpoint answers what the Python API answers ---------------------------------------------

def test_it_listens_on_loopback_by_default(service):
    svc, _ = service
    assert svc.host == "127.0.0.1"


def test_healthz_names_the_version_served(service):
    svc, fs = service
    assert svc.get("/healthz") == (200, {"status": "ok", "feature_sets": {"movies": fs.version}})


def test_version(service):
    svc, fs = service
    status, body = svc.get("/v1/movies/version")
    assert status == 200
    assert body["version"] == fs.version and body["dim"] == fs.dim
    assert body["users"] == fs.n_users and body["items"] == fs.n_items
    assert body["index"]["factory"] == "Flat" and body["ndcg@100"] > 0


def test_recommend_matches_the_python_api(service):
    svc, fs = service
    user = int(fs.user_ids[5])
    status, body = svc.get("/v1/movies/recommend", user=user, k=7)
    assert status == 200 and body["version"] == fs.version and body["user"] == user
    expected = fs.recommend(user, 7)
    assert ranked(body["items"]) == expected.ids.tolist()
    np.testing.assert_allclose([r["score"] for r in body["items"]], expected.scores, rtol=1e-6)
    assert [r["rank"] for r in body["items"]] == list(range(1, 8))


def test_recommend_with_exclusions_and_seen_items(service):
    svc, fs = service
    user = int(fs.user_ids[9])
    first = fs.recommend(user, 3).ids.tolist()
    status, body = svc.get("/v1/movies/recommend", user=user, k=5, exclude=[*first, 10**9])
    assert status == 200
    assert ranked(body["items"]) == fs.recommend(user, 5, exclude=first).ids.tolist()
    assert not set(first) & set(ranked(body["items"])) and len(body["items"]) == 5
    _, body = svc.get("/v1/movies/recommend", user=user, k=5, exclude_seen="false")
    assert ranked(body["items"]) == fs.recommend(user, 5, exclude_seen=False).ids.tolist()


def test_k_larger_than_the_catalogue_returns_every_unseen_item(trained):
    store_dir, _ = trained
    fs = aefeatures.open_store(store_dir)["movies"]
    svc = Service(store_dir, "--max-k", str(fs.n_items + 50))
    try:
        user = int(fs.user_ids[0])
        status, body = svc.get("/v1/movies/recommend", user=user, k=fs.n_items + 50)
        seen = pl.read_parquet(fs.path / "interactions.parquet").filter(pl.col("user_id") == user).height
        assert status == 200 and len(body["items"]) == fs.n_items - seen
        assert set(ranked(body["items"])) == set(fs.item_ids.tolist()) - set(
            pl.read_parquet(fs.path / "interactions.parquet").filter(pl.col("user_id") == user)["item_id"].to_list())
    finally:
        svc.stop()


def test_batch_recommend_matches_single_calls_and_lists_unknown_users(service):
    svc, fs = service
    users = [int(u) for u in fs.user_ids[:6]]
    status, body = svc.request("POST", "/v1/movies/recommend", {"users": users + [users[0]], "k": 4})
    assert status == 200 and body["version"] == fs.version and body["not_found"] == []
    assert [r["user"] for r in body["results"]] == users  # request order, each user once
    for result in body["results"]:
        assert ranked(result["items"]) == fs.recommend(result["user"], 4).ids.tolist()
    status, body = svc.request("POST", "/v1/movies/recommend", {"users": users[:2] + [-5], "k": 2})
    assert status == 404 and body["error"]["code"] == "not_found" and "-5" in body["error"]["message"]
    status, body = svc.request("POST", "/v1/movies/recommend",
                               {"users": users[:2] + [-5], "k": 2, "skip_unknown": True})
    assert status == 200 and body["not_found"] == [-5] and len(body["results"]) == 2


def test_similar_items_both_metrics(service):
    svc, fs = service
    item = int(fs.item_ids[3])
    for metric in ("ip", "cosine"):
        status, body = svc.get("/v1/movies/similar", item=item, k=6, metric=metric, exclude=[int(fs.item_ids[4])])
        assert status == 200 and body["item"] == item
        expected = fs.similar_items(item, 6, metric=metric, exclude=[int(fs.item_ids[4])])
        assert ranked(body["items"]) == expected.ids.tolist()


def test_similar_users(service):
    svc, fs = service
    user = int(fs.user_ids[2])
    status, body = svc.get("/v1/movies/similar_users", user=user, k=5)
    assert status == 200 and ranked(body["users"], "user_id") == fs.similar_users(user, 5).ids.tolist()


def test_embeddings_of_users_and_items(service):
    svc, fs = service
    users, items = [int(u) for u in fs.user_ids[:3]], [int(i) for i in fs.item_ids[-2:]]
    status, body = svc.request("POST", "/v1/movies/embeddings", {"users": users})
    assert status == 200 and body["dim"] == fs.dim and [r["user_id"] for r in body["users"]] == users
    np.testing.assert_allclose([r["embedding"] for r in body["users"]], fs.user_embeddings(users))
    status, body = svc.request("POST", "/v1/movies/embeddings", {"items": items})
    np.testing.assert_allclose([r["embedding"] for r in body["items"]], fs.item_embeddings(items))
    status, body = svc.request("POST", "/v1/movies/embeddings", {"items": [items[0], 10**9]})
    assert status == 404 and str(10**9) in body["error"]["message"]


def test_recommendations_from_a_history_match_the_python_api(service):
    svc, fs = service
    user = int(fs.user_ids[5])
    history = [int(i) for i in fs.recommend(user, k=5, exclude_seen=False).ids]
    status, body = svc.request("POST", "/v1/movies/recommend", {"history": history + [10**9], "k": 7})
    expected = fs.recommend_history(history, k=7)
    assert status == 200 and body["version"] == fs.version
    [result] = body["results"]
    assert result["unknown"] == [10**9] and result["history"] == 0
    assert ranked(result["items"]) == expected.ids.tolist() and not set(ranked(result["items"])) & set(history)
    np.testing.assert_allclose([r["score"] for r in result["items"]], expected.scores, rtol=1e-6)
    rules = {"k": 4, "exclude": [int(expected.ids[0])], "filter": "item_id > 100"}
    status, body = svc.request("POST", "/v1/movies/recommend", {"histories": [history, history[:2]],
                                                                 "weights": [[5.0] * 5, None], **rules})
    assert status == 200 and [r["history"] for r in body["results"]] == [0, 1]
    for result, h in zip(body["results"], (history, history[:2])):
        assert ranked(result["items"]) == fs.recommend_history(h, **rules).ids.tolist()
    status, body = svc.request("POST", "/v1/movies/similar_users", {"history": history, "k": 3})
    assert status == 200 and ranked(body["users"], "user_id") == fs.similar_users_to_history(history, k=3).ids.tolist()
    status, body = svc.request("POST", "/v1/movies/embeddings", {"histories": [history]})
    assert status == 200 and body["histories"][0]["unknown"] == []
    np.testing.assert_allclose(body["histories"][0]["embedding"], fs.embed_history(history).vector, rtol=1e-6)


@pytest.mark.parametrize("body,expected", [
    ({"history": []}, 400),  # empty: one clear line
    ({"history": [10**9, 10**9 + 1]}, 404),  # no item known
    ({"history": [1, 2], "weights": [1.0]}, 400),
    ({"history": [1], "users": [1]}, 422),
    ({"history": "1"}, 422),
    ({"history": [1], "weights": [[1.0]]}, 400),  # a list where a number goes: named in one line
    ({"history": [1], "skip_unknown": True}, 422),
    ({"history": list(range(10_001))}, 422),
])
def test_bad_histories_get_a_json_4xx(service, body, expected):
    svc, _ = service
    status, answer = svc.request("POST", "/v1/movies/recommend", body)
    assert status == expected, answer
    assert answer["error"]["status"] == expected and answer["error"]["message"]


def test_anomalies_lead_with_the_planted_bots(service):
    svc, fs = service
    status, body = svc.get("/v1/movies/anomalies", k=30)
    assert status == 200
    assert [r["user_id"] for r in body["users"]] == fs.anomalies(30).get_column("user_id").to_list()
    assert sum(2001 <= r["user_id"] <= 2030 for r in body["users"]) >= 20


def test_openapi_describes_every_endpoint(service):
    svc, _ = service
    status, spec = svc.get("/openapi.json")
    assert status == 200
    paths = spec["paths"]
    for path, method in [("/v1/{name}/recommend", "get"), ("/v1/{name}/recommend", "post"),
                         ("/v1/{name}/similar", "get"), ("/v1/{name}/similar_users", "get"),
                         ("/v1/{name}/embeddings", "post"), ("/v1/{name}/version", "get"),
                         ("/v1/{name}/similar_users", "post"),
                         ("/v1/{name}/anomalies", "get"), ("/healthz", "get")]:
        assert method in paths[path], (path, method)
    assert "404" in paths["/v1/{name}/recommend"]["get"]["responses"]


# --- malformed and hostile requests: 4xx JSON, never a 5xx ------------------------------------------

HOSTILE = [
    ("GET", "/v1/movies/recommend?user=1&k=abc", 422),
    ("GET", "/v1/movies/recommend?user=1&k=-3", 422),
    ("GET", "/v1/movies/recommend?user=1&k=0", 422),
    ("GET", "/v1/movies/recommend?user=1&k=99999999999999999999999", 422),
    ("GET", "/v1/movies/recommend?user=1&k=1.5", 422),
    ("GET", "/v1/movies/recommend?k=3", 422),  # no user
    ("GET", "/v1/movies/recommend?user=notanumber&k=3", 422),
    ("GET", "/v1/movies/recommend?user=1e3&k=3", 422),
    ("GET", "/v1/movies/recommend?user=" + "9" * 200, 422),
    ("GET", "/v1/movies/recommend?user=" + "9" * 300, 422),
    ("GET", "/v1/movies/recommend?user=%00%ff&k=3", 422),
    ("GET", "/v1/movies/recommend?user=1&exclude_seen=maybe", 422),
    ("GET", "/v1/movies/recommend?user=1&" + "&".join(["exclude=1"] * 1001), 422),
    ("GET", "/v1/movies/similar?item=1&metric=euclid", 422),
    ("GET", "/v1/movies/similar?item=-1", 404),
    ("GET", "/v1/movies/similar_users?user=", 422),
    ("GET", "/v1/nope/recommend?user=1", 404),
    ("GET", "/v1/movies;rm%20-rf/recommend?user=1", 404),
    ("GET", "/v1/..%2F..%2Fetc%2Fpasswd/recommend?user=1", 404),
    ("GET", "/v1/../../etc/passwd", 404),
    ("GET", "/v1/%2e%2e/version", 404),
    ("GET", "/v1/" + "a" * 5000 + "/version", 404),
    ("GET", "/v1/movies/nothing", 404),
    ("DELETE", "/v1/movies/recommend", 405),
    ("POST", "/v1/movies/recommend", 422),  # no body
]
BODIES = [
    ({"users": [], "k": 3}, 422),
    ({"users": [1], "k": -1}, 422),
    ({"users": [1], "k": 10**6}, 422),
    ({"users": [1], "k": "10"}, 422),
    ({"users": [1], "k": True}, 422),
    ({"users": [1.5]}, 422),
    ({"users": [True]}, 422),
    ({"users": [[1]]}, 422),
    ({"users": [None]}, 422),
    ({"users": "1"}, 422),
    ({"users": [1], "surprise": 1}, 422),
    ({"users": list(range(1001))}, 422),
    ([1, 2, 3], 422),
    ("just a string", 422),
]


@pytest.mark.parametrize("method,path,expected", HOSTILE)
def test_malformed_requests_get_a_json_4xx(service, method, path, expected):
    svc, _ = service
    status, body = svc.request(method, path)
    assert status == expected, body
    assert body["error"]["status"] == expected and body["error"]["message"]


@pytest.mark.parametrize("body,expected", BODIES)
def test_malformed_bodies_get_a_json_4xx(service, body, expected):
    svc, _ = service
    status, answer = svc.request("POST", "/v1/movies/recommend", body)
    assert status == expected, answer
    assert answer["error"]["code"] == "invalid_request"


def test_broken_json_and_wrong_media_type(service):
    svc, _ = service
    status, body = svc.request("POST", "/v1/movies/recommend", raw=b'{"users": [1,')
    assert status == 422 and body["error"]["code"] == "invalid_request"
    for unreadable in (b'{"users": [' + b"9" * 5000 + b"]}", b'{"users": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        status, body = svc.request("POST", "/v1/movies/recommend", raw=unreadable)  # json.loads itself fails
        assert status == 422 and body["error"]["code"] == "invalid_request", body
    for both_or_neither in ({"users": [1], "items": [1]}, {}, {"users": None}):
        status, body = svc.request("POST", "/v1/movies/embeddings", both_or_neither)
        assert status == 422 and ("exactly one" in body["error"]["message"] or "list" in body["error"]["message"])
    status, body = svc.request("POST", "/v1/movies/recommend", {"users": [1], "k": 3.0})  # a JSON integer
    assert status in (200, 404)
    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=60)
    try:
        conn.request("OPTIONS", "/v1/movies/recommend")
        response = conn.getresponse()
        assert response.status == 405 and response.getheader("allow") == "GET, HEAD, POST"  # HEAD: as GET
        response.read()
    finally:
        conn.close()


def test_oversized_bodies_are_refused_before_parsing(service):
    svc, _ = service
    big = b'{"users": [' + b"1," * 600_000 + b"1]}"
    status, body = svc.request("POST", "/v1/movies/recommend", raw=big)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = svc.request("POST", "/v1/movies/recommend", raw=b"{}", headers={"content-length": "999999999"})
    assert status == 413

    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=60)  # chunked: no length announced
    try:
        conn.request("POST", "/v1/movies/recommend", body=iter([b"[" + b"1," * 100_000] * 10),
                     headers={"content-type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()
    assert svc.get("/healthz")[0] == 200  # and the service is still there


def test_a_busy_port_is_one_line_and_exit_2(service, trained):
    svc, _ = service
    store_dir, _ = trained
    done = subprocess.run([sys.executable, "-m", "aefeatures", "serve", "--store", str(store_dir), "--port", str(svc.port)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and f"127.0.0.1:{svc.port}" in done.stderr


def test_a_missing_store_is_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "aefeatures", "serve", "--store", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_several_worker_processes(trained):
    store_dir, _ = trained
    fs = aefeatures.open_store(store_dir)["movies"]
    svc = Service(store_dir, "--workers", "2")
    try:
        user = int(fs.user_ids[1])
        for _ in range(6):  # connections land on either worker; each answers the same
            status, body = svc.get("/v1/movies/recommend", user=user, k=3)
            assert status == 200 and ranked(body["items"]) == fs.recommend(user, 3).ids.tolist()
    finally:
        svc.stop()


# --- a publish under traffic ----------------------------------------------------------------------

class Traffic:
    """Threads calling the service on kept-alive connections until stopped; every answer kept."""

    def __init__(self, svc: Service, users: list[int], items: list[int], threads: int = 4):
        self.svc, self.users, self.items = svc, users, items
        self.answers: list[tuple[str, object, int, dict]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection(self.svc.host, self.svc.port, timeout=60)
        while not self._stop.is_set():
            kind = ("recommend", "similar", "batch")[int(rng.integers(3))]
            if kind == "recommend":
                key = self.users[int(rng.integers(len(self.users)))]
                method, path, body = "GET", f"/v1/movies/recommend?user={key}&k=5", None
            elif kind == "similar":
                key = self.items[int(rng.integers(len(self.items)))]
                method, path, body = "GET", f"/v1/movies/similar?item={key}&k=5", None
            else:
                key = [self.users[int(i)] for i in rng.integers(len(self.users), size=3)]
                method, path, body = "POST", "/v1/movies/recommend", json.dumps({"users": key, "k": 5})
            try:
                conn.request(method, path, body=body, headers={"content-type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
            except Exception as exc:  # noqa: BLE001 — a dropped connection counts as a failure
                self.failures.append(f"{method} {path}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(self.svc.host, self.svc.port, timeout=60)
                continue
            if response.status != 200:
                self.failures.append(f"{method} {path}: {response.status} {payload}")
            self.answers.append((kind, key, response.status, payload))
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.mark.slow
def test_a_publish_under_traffic_switches_versions_without_failing_or_mixing(trained, tmp_path):
    store_dir, _ = trained
    store_copy = tmp_path / "store"
    shutil.copytree(store_dir, store_copy)
    old = aefeatures.open_store(store_copy)["movies"].load()  # kept whole: retention deletes its files
    users, items = [int(u) for u in old.user_ids[:200]], [int(i) for i in old.item_ids[:100]]
    job = write_job(tmp_path, store=store_copy, model={"epochs": 3, "seed": 7}, gate={"min_ratio": 0.0})
    with job.open("a") as f:
        f.write("[retention]\nkeep = 1\n")

    svc = Service(store_copy)
    traffic = Traffic(svc, users, items)
    try:
        while len(traffic.answers) < 50:  # traffic flowing on the old version
            time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "aefeatures", "run", str(job), "--force"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        new = aefeatures.open_store(store_copy)["movies"]
        assert new.version != old.version
        assert not old.path.exists()  # retention removed the old version while it was being served
        deadline = time.monotonic() + START_TIMEOUT
        while not any(a[3].get("version") == new.version for a in traffic.answers[-20:]):
            assert time.monotonic() < deadline, "the service never switched to the new version"
            time.sleep(0.05)
        seen_after_switch = len(traffic.answers)
        while len(traffic.answers) < seen_after_switch + 50:
            time.sleep(0.05)
    finally:
        traffic.stop()
        svc.stop()

    assert traffic.failures == []
    versions = {old.version: old, new.version: new}
    by_version = {v: 0 for v in versions}
    for kind, key, status, payload in traffic.answers:
        fs = versions[payload["version"]]  # exactly one version per answer ...
        by_version[fs.version] += 1
        if kind == "recommend":  # ... and its content is that version's, not a mix
            assert ranked(payload["items"]) == fs.recommend(key, 5).ids.tolist()
        elif kind == "similar":
            assert ranked(payload["items"]) == fs.similar_items(key, 5).ids.tolist()
        else:
            for result in payload["results"]:
                assert ranked(result["items"]) == fs.recommend(result["user"], 5).ids.tolist()
    assert by_version[old.version] > 0 and by_version[new.version] > 0


def test_the_readme_lists_exactly_the_served_endpoints(service):
    svc, _ = service
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## HTTP lookup service", 1)[1].split("\n## ", 1)[0]
    listed = {(m.lower(), p.replace("NAME", "{name}")) for m, p in re.findall(r"\| `(GET|POST) (/[^?` ]*)", section)}
    _, spec = svc.get("/openapi.json")
    served = {(method, path) for path, methods in spec["paths"].items() for method in methods}
    assert listed - {("get", "/openapi.json"), ("get", "/docs")} == served


def test_access_log_logs_each_request_without_verbose(trained):
    store_dir, _ = trained
    svc = Service(store_dir, "--access-log")
    try:
        assert svc.get("/healthz")[0] == 200
        deadline = time.monotonic() + START_TIMEOUT
        while not any("GET /healthz" in line for line in svc.log) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        svc.stop()
    assert any("GET /healthz" in line and "200" in line for line in svc.log), svc.log


def test_bodies_are_json_whatever_the_content_type_and_broken_json_is_named(service):
    svc, fs = service
    user = int(fs.user_ids[0])
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d, and others
        status, body = svc.request("POST", "/v1/movies/recommend", {"users": [user], "k": 3},
                                   headers={"content-type": content_type})
        assert status == 200 and len(body["results"][0]["items"]) == 3, body
        status, body = svc.request("POST", "/v1/movies/embeddings", {"items": [int(fs.item_ids[0])]},
                                   headers={"content-type": content_type})
        assert status == 200 and body["dim"] == fs.dim
    status, body = svc.request("POST", "/v1/movies/recommend", raw=b'{"users": [1,')
    message = body["error"]["message"]
    assert status == 422 and message.startswith("body: not valid JSON (") and "character" in message
    assert "`" not in message.split(";")[0]  # no offset shown as if it were a field


def test_http_errors_speak_http_and_defaults_match_the_api(service):
    svc, fs = service
    status, body = svc.get("/v1/nothing/recommend", user=1)
    assert status == 404 and "--" not in body["error"]["message"] and "/healthz" in body["error"]["message"]
    status, body = svc.get("/v1/movies/recommend", user=999_999)
    assert status == 404 and "aefeatures embed" in body["error"]["message"]
    status, body = svc.get("/v1/movies/anomalies")
    assert status == 200 and len(body["users"]) == fs.anomalies().height == 20


def test_docs_page_works_offline(service):
    svc, _ = service
    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=60)
    try:
        conn.request("GET", "/docs")
        response = conn.getresponse()
        page = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200 and response.getheader("content-type").startswith("text/html")
    assert "/v1/{name}/recommend" in page and "skip_unknown" in page and "/openapi.json" in page
    assert not re.search(r"<script|<link|src=|https?://", page)  # nothing to fetch: works offline
