"""One id rule at every entry point (Python API, CLI, HTTP, SQL parameters): the same id, in
any spelling its type allows, gets the same answer everywhere; distinct ids never collide;
a value that cannot be an id is refused (exit 2 / HTTP 422); a known user with nothing left
gets an empty answer, reported apart from unknown users."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aefeatures.cli.app import cli
from aefeatures.serving.http import create_app
from aefeatures.serving.live import LiveStore
from aefeatures.serving.lookup import open_store
from tests.conftest import cli_runner, strict_loads

N_ITEMS = 6
HASH = 2**63 + 12_345  # a uint64 hash above the int64 range


def _train(folder: Path, users: list, items: list) -> Path:
    """A tiny trained store `shop` where users[-1] has every item (nothing left to recommend)."""
    rng = np.random.default_rng(0)
    rows_u, rows_i = [], []
    for n, user in enumerate(users):
        chosen = range(N_ITEMS) if n == len(users) - 1 else rng.choice(N_ITEMS, 3, replace=False)
        rows_u += [user] * len(chosen)
        rows_i += [items[i] for i in chosen]
    typ = pa.uint64() if isinstance(users[0], int) else pa.string()
    pq.write_table(pa.table({"user_id": pa.array(rows_u, typ), "item_id": pa.array(rows_i, typ)}),
                   folder / "in.parquet")
    job = folder / "job.toml"
    job.write_text(f'[job]\nname = "shop"\nstore = "{folder / "store"}"\n[input]\npath = "in.parquet"\n'
                   '[model]\nepochs = 1\ndim = 8\nhidden = [16]\n[index]\nkind = "flat"\n'
                   '[gate]\nbeat_popularity = false\nmin_ratio = 0.0\n')
    result = cli_runner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 0, result.output
    return folder / "store"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[Path, list]]:
    """uint64 ids (hashes >= 2**63, and small ones) and numeric-looking string ids."""
    ints = [1, 42, HASH, HASH + 1, 2**64 - 1, 7]
    strings = ["00042", "42", "0038", "38", "u1", "full"]
    out = {}
    for kind, users, items in (("uint64", ints, [2**63 + i for i in range(N_ITEMS)]),
                               ("string", strings, ["0038", "38", "x", "y", "007", "7"])):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (_train(folder, users, items), users)
    return out


def _asgi(app, method: str, path: str, query: str = "", body: bytes = b"") -> tuple[int, dict]:
    """Call the ASGI app in-process (no sockets): (status, strict-parsed JSON body)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    return status, strict_loads(text)


@pytest.fixture(scope="module")
def apps(stores):
    return {kind: create_app(LiveStore(root), follow=False) for kind, (root, _) in stores.items()}


# --- one answer per entry point: ("items", [...]) | ("not_found",) | ("invalid",) ------------------

def via_api(root: Path, raw) -> tuple:
    from aefeatures.errors import InvalidIdError, NotFoundError

    try:
        return ("items", open_store(root).open("shop").recommend(raw, 3).ids.tolist())
    except NotFoundError:
        return ("not_found",)
    except InvalidIdError:
        return ("invalid",)


def via_cli(root: Path, raw: str) -> tuple:
    result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", raw, "-k", "3", "--json"])
    if result.exit_code == 0:
        return ("items", [r["item_id"] for r in strict_loads(result.stdout)["items"]])
    return {5: ("not_found",), 2: ("invalid",)}[result.exit_code]


def via_http(app, raw: str) -> tuple:
    status, body = _asgi(app, "GET", "/v1/shop/recommend", urlencode({"user": raw, "k": 3}))
    if status == 200:
        return ("items", [r["item_id"] for r in body["items"]])
    return {404: ("not_found",), 422: ("invalid",)}[status]


def via_sql(root: Path, raw: str) -> tuple:
    result = cli_runner().invoke(cli, ["sql", "--store", str(root), "--format", "json", "--param", f"user={raw}",
                                    "-c", "SELECT u.user_id, r.item_id FROM shop_users u "
                                          "LEFT JOIN shop_recommend($user, 3) r ON true WHERE u.user_id = $user"])
    if result.exit_code == 2:
        return ("invalid",)
    assert result.exit_code == 0, result.output
    rows = strict_loads(result.stdout)
    if not rows:
        return ("not_found",)
    return ("items", sorted(r["item_id"] for r in rows if r["item_id"] is not None))


def _spellings(kind: str, user) -> list:
    if kind == "uint64":
        return [user, str(user), f" {user} ", f"+{user}", f"000{user}"]
    return [user]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["uint64", "string"]), which=st.integers(0, 5), spelling=st.integers(0, 4))
def test_the_same_id_gets_the_same_answer_at_every_entry_point(stores, apps, kind, which, spelling):
    root, users = stores[kind]
    user = users[which]
    forms = _spellings(kind, user)
    raw = forms[spelling % len(forms)]
    api = via_api(root, raw)
    assert api == via_api(root, user)  # every spelling of one id is that id
    assert api[0] == "items"
    text = str(raw)
    assert via_cli(root, text) == api
    assert via_http(apps[kind], text) == api
    assert via_sql(root, text) == ("items", sorted(api[1]))
    if which == len(users) - 1:
        assert api == ("items", [])  # has every item: nothing left, an empty answer everywhere


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.integers(0, 5), b=st.integers(0, 5))
def test_distinct_string_ids_never_collide(stores, apps, a, b):
    root, users = stores["string"]
    fs = open_store(root).open("shop")
    same = users[a] == users[b]
    assert np.array_equal(fs.user_embedding(users[a]), fs.user_embedding(users[b])) == same
    _, body_a = _asgi(apps["string"], "GET", "/v1/shop/recommend", urlencode({"user": users[a]}))
    assert body_a["user"] == users[a]


@pytest.mark.parametrize("raw", ["abc", "1.5", "-1", str(2**64), ""])
def test_a_value_that_cannot_be_a_uint64_id_is_refused_everywhere(stores, apps, raw):
    root, _ = stores["uint64"]
    assert via_api(root, raw) == via_cli(root, raw) == via_http(apps["uint64"], raw) == via_sql(root, raw) \
        == ("invalid",)


def test_numeric_looking_string_ids_stay_apart(stores, apps):
    root, _ = stores["string"]
    fs = open_store(root).open("shop")
    assert via_api(root, 42) == ("invalid",)  # the number 42 is not the string id "42" nor "00042"
    for raw in ("42", "00042", "38", "0038"):
        assert via_cli(root, raw) == via_http(apps["string"], raw) == via_api(root, raw)
    assert not np.array_equal(fs.user_embedding("42"), fs.user_embedding("00042"))
    # SQL: --param user=00042 is the string id "00042" (not 42, not "42")
    assert via_sql(root, "00042") == ("items", sorted(via_api(root, "00042")[1]))
    result = cli_runner().invoke(cli, ["sql", "--store", str(root), "--format", "json", "--param", "user=00042",
                                    "-c", "SELECT user_id FROM shop_users WHERE user_id = $user"])
    assert result.exit_code == 0 and strict_loads(result.stdout) == [{"user_id": "00042"}]
    # SQL: --param item=38 names the string id "38" only, never "0038" too
    result = cli_runner().invoke(cli, ["sql", "--store", str(root), "--format", "json", "--param", "item=38",
                                    "-c", "SELECT item_id FROM shop_items WHERE item_id = $item"])
    assert result.exit_code == 0, result.output
    assert strict_loads(result.stdout) == [{"item_id": "38"}]
    result = cli_runner().invoke(cli, ["sql", "--store", str(root), "--format", "json", "--param", "item=38",
                                    "-c", "SELECT item_id FROM shop_similar_items($item, 10)"])
    assert result.exit_code == 0, result.output
    assert "38" not in [r["item_id"] for r in strict_loads(result.stdout)] and len(strict_loads(result.stdout)) == 5
    # a literal number handed to a macro is cast to the id type: 38 is "38", not "0038"
    con_rows = cli_runner().invoke(cli, ["sql", "--store", str(root), "--format", "json",
                                      "-c", "SELECT count(*) AS n FROM shop_similar_items(38, 10)"])
    assert strict_loads(con_rows.stdout) == [{"n": 5}]


def test_one_user_spelled_twice_in_a_batch_is_answered_once(stores, apps):
    root, users = stores["uint64"]
    body = json.dumps({"users": [HASH, str(HASH), f" {HASH}", 42, "42"], "k": 2}).encode()
    status, out = _asgi(apps["uint64"], "POST", "/v1/shop/recommend", body=body)
    assert status == 200, out
    assert [r["user"] for r in out["results"]] == [HASH, 42]
    assert [[i["rank"] for i in r["items"]] for r in out["results"]] == [[1, 2], [1, 2]]
    status, out = _asgi(apps["uint64"], "POST", "/v1/shop/embeddings", body=json.dumps({"users": [HASH, str(HASH)]}).encode())
    assert status == 200 and [r["user_id"] for r in out["users"]] == [HASH]
    recs = open_store(root).open("shop").recommend_batch([1, "1", " 1"], k=2)
    assert recs.get_column("user_id").to_list() == [1, 1] and recs.get_column("rank").to_list() == [1, 2]


def test_a_known_user_with_nothing_left_is_not_reported_as_not_found(stores, apps, tmp_path):
    root, users = stores["uint64"]
    full = users[-1]
    status, out = _asgi(apps["uint64"], "POST", "/v1/shop/recommend",
                        body=json.dumps({"users": [full, 1, 5], "k": 3, "skip_unknown": True}).encode())
    assert status == 200
    assert out["not_found"] == [5] and out["nothing_left"] == [full]
    assert [r["user"] for r in out["results"]] == [full, 1] and out["results"][0]["items"] == []
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"{full}\n1\n5\n")
    result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--users-file", str(users_file), "--json"])
    assert result.exit_code == 0, result.output
    assert "1 of 3 user(s) not found in shop" in result.stderr and "(5)" in result.stderr
    assert ("1 of 3 known user(s) have no item left to recommend "
            f"(every item is seen, excluded or filtered out; {full})") in result.stderr
    assert {r["user_id"] for r in strict_loads(result.stdout)} == {1}


def test_uint64_ids_round_trip_every_interface(stores, apps):
    root, _ = stores["uint64"]
    result = cli_runner().invoke(cli, ["similar", "--store", str(root), "--user", str(HASH), "--json"])
    assert result.exit_code == 0, result.output
    out = strict_loads(result.stdout)
    assert out["user"] == HASH and HASH not in [u["user_id"] for u in out["users"]]
    assert {u["user_id"] for u in out["users"]} <= {1, 42, HASH + 1, 2**64 - 1, 7}
    status, body = _asgi(apps["uint64"], "GET", "/v1/shop/similar_users", urlencode({"user": str(2**64 - 1)}))
    assert status == 200 and body["user"] == 2**64 - 1


def test_feast_export_of_uint64_ids_is_refused_in_one_line(stores, tmp_path):
    root, _ = stores["uint64"]
    result = cli_runner().invoke(cli, ["feast-export", "--store", str(root), "--output", str(tmp_path / "repo")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line, = result.stderr.splitlines()
    assert line.startswith("error: feature set `shop` has UInt64 user ids, which Feast cannot hold")


@pytest.mark.parametrize("kind", ["uint64", "string"])
def test_ids_longer_than_the_limit_are_invalid_in_one_short_line_at_every_entry_point(stores, apps, kind):
    from aefeatures.schema import MAX_ID_CHARS

    root, _ = stores[kind]
    raw = "9" * (MAX_ID_CHARS + 1000)  # Python's int() refuses past 4,300 digits: no traceback here
    assert via_api(root, raw) == via_cli(root, raw) == via_http(apps[kind], raw) == ("invalid",)
    result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", raw, "-k", "3"])
    (line,) = result.stderr.strip().splitlines()
    assert "characters)" in line and len(line) < 400  # the id is cut in the message, its length said


def test_k_beyond_its_limit_is_refused_in_one_line_and_k_up_to_it_answers(stores, apps):
    from aefeatures.errors import MAX_K, BadInputError

    root, users = stores["uint64"]
    fs = open_store(root).open("shop")
    assert 0 < len(fs.recommend(users[0], MAX_K).ids) <= N_ITEMS  # k at its limit: what the catalogue has
    for k in (MAX_K + 1, 10**30):
        with pytest.raises(BadInputError, match=r"`k` must be an integer from 1 to 1,000,000"):
            fs.recommend(users[0], k)
        result = cli_runner().invoke(cli, ["recommend", "--store", str(root), "--user", str(users[0]), "-k", str(k)])
        assert result.exit_code == 2 and "Traceback" not in result.output
    status, _ = _asgi(apps["uint64"], "GET", "/v1/shop/recommend", urlencode({"user": users[0], "k": 10**30}))
    assert status == 422
