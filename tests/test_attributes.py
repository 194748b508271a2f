"""Item attributes: `[items]` in the job file, validated, stored with the version in item-row order,
seen in the `<name>_items` SQL view and usable in filters."""

from __future__ import annotations

from datetime import date

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aefeatures
from aefeatures import errors
from aefeatures.config import ItemsConfig, load_job_config
from aefeatures.data.attributes import align_attributes, read_attributes
from aefeatures.jobs.run import input_fingerprint, run_job
from aefeatures.store import layout
from tests.conftest import write_job
from tests.test_lookup_filters import filters

TINY = {"kind": "dae", "dim": 8, "hidden": [32], "epochs": 2, "batch_size": 512, "seed": 0}


def catalogue_attributes(n_items: int = 500) -> pl.DataFrame:
    """Attributes for items 0..n-1 of the committed fixture but every tenth, plus two unknown ids."""
    ids = [i for i in range(n_items) if i % 10] + [10_001, 10_002]
    return pl.DataFrame({
        "item_id": ids,
        "category": [("books", "toys", "food")[i % 3] for i in ids],
        "price": [float(i % 50) for i in ids],
        "in_stock": [i % 4 != 0 for i in ids],
        "tags": [["kids"] if i % 5 == 0 else ["new", "sale"] for i in ids],
        "released": [date(2020 + i % 5, 1, 1) for i in ids],
    })


def items_job(folder, attributes: pl.DataFrame | None = None, items_section: str | None = None, **kw):
    path = folder / "items.parquet"
    (attributes if attributes is not None else catalogue_attributes()).write_parquet(path)
    job = write_job(folder, name="shop", model=TINY, evaluation={"valid_share": 0.0}, **kw)
    job.write_text(job.read_text() + (items_section or '[items]\npath = "items.parquet"\n'))
    return job


def test_items_section_loads_and_resolves_its_path(tmp_path):
    cfg = load_job_config(items_job(tmp_path, items_section='[items]\npath = "items.parquet"\nid_col = "sku"\n'
                                                          'columns = ["category", "price"]\n'))
    assert cfg.items == ItemsConfig(str(tmp_path / "items.parquet"), "sku", ("category", "price"))
    assert cfg.to_dict()["items"]["columns"] == ["category", "price"]


def test_a_job_without_items_keeps_its_config_and_fingerprint(tmp_path):
    cfg = load_job_config(write_job(tmp_path))
    assert "items" not in cfg.to_dict() and cfg.items.path is None
    assert input_fingerprint(cfg)  # no attributes file to look at


@pytest.mark.parametrize("section, key", [
    ('[items]\ncolumns = ["category"]\n', "items.columns"),
    ('[items]\npath = "items.parquet"\ncolumns = ["score"]\n', "items.columns"),
    ('[items]\npath = "items.parquet"\ncolumns = ["9lives"]\n', "items.columns"),
    ('[items]\npath = "items.parquet"\nid_col = ""\n', "items.id_col"),
    ('[items]\npath = "items.parquet"\ncolum = ["x"]\n', "items.colum"),
])
def test_bad_items_sections_name_the_key(tmp_path, section, key):
    with pytest.raises(errors.ConfigError, match=key.replace(".", r"\.")) as info:
        load_job_config(items_job(tmp_path, items_section=section))
    assert info.value.exit_code == 2


def test_types_are_kept_and_recorded_and_unknown_ids_counted(tmp_path):
    catalogue_attributes().write_parquet(tmp_path / "a.parquet")
    frame = read_attributes(ItemsConfig(str(tmp_path / "a.parquet")))
    table, summary = align_attributes(frame, pl.Series("item_id", list(range(500))))
    assert table.height == 500 and table.get_column("item_id").to_list() == list(range(500))
    assert summary["columns"] == {"category": "String", "price": "Float64", "in_stock": "Boolean",
                                  "tags": "List(String)", "released": "Date"}
    assert (summary["rows"], summary["matched"], summary["unknown_ids"], summary["items_without"]) == \
        (452, 450, 2, 50)
    assert summary["unknown_examples"] == [10_001, 10_002]
    assert table.filter(pl.col("item_id") % 10 == 0).drop("item_id").null_count().row(0) == (50,) * 5
    assert table.row(7, named=True)["tags"] == ["new", "sale"]


@pytest.mark.parametrize("frame, message", [
    (pl.DataFrame({"item_id": [1, 2, 2, 3], "c": ["a", "b", "c", "d"]}), r"1 rows|2 rows with a repeated id .*e\.g\. 2"),
    (pl.DataFrame({"item_id": [1, None], "c": ["a", "b"]}), "1 null id"),
    (pl.DataFrame({"sku": [1, 2], "c": ["a", "b"]}), "no id column `item_id`"),
    (pl.DataFrame({"item_id": [1, 2], "s": [{"a": 1}, {"a": 2}]}), "column `s` has type Struct"),
    (pl.DataFrame({"item_id": [1, 2], "x": [1.0, float("nan")]}), "NaN in column `x`"),
    (pl.DataFrame({"item_id": [1, 2], "bias": [1.0, 2.0]}), "column named `bias`"),
    (pl.DataFrame({"item_id": [1, 2], "Price": [1.0, 2.0], "price": [1.0, 2.0]}), "differ only in case"),
])
def test_unusable_attributes_are_refused_with_one_clear_line(tmp_path, frame, message):
    frame.write_parquet(tmp_path / "a.parquet")
    with pytest.raises(errors.BadInputError, match=message) as info:
        read_attributes(ItemsConfig(str(tmp_path / "a.parquet")))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_ids_of_another_type_are_refused(tmp_path):
    frame = pl.DataFrame({"item_id": ["a1", "b2"], "c": ["x", "y"]})
    with pytest.raises(errors.BadInputError, match="String ids but the interactions have Int64 ids"):
        align_attributes(frame, pl.Series("item_id", [1, 2]), "a.parquet")
    table, _ = align_attributes(pl.DataFrame({"item_id": ["1"], "c": ["x"]}), pl.Series("item_id", [1, 2]))
    assert table.get_column("c").to_list() == ["x", None]


def test_uint64_item_ids_with_an_attributes_table_publish_their_attributes(tmp_path):
    """Hash ids at or above 2**63, as uint64 in both the interactions and the attributes."""
    rng = np.random.default_rng(0)
    big = np.uint64(2**63) + np.arange(40, dtype=np.uint64) * np.uint64(7919)
    users = np.repeat(np.arange(120), 6)
    items = big[(users * 7 + np.tile(np.arange(6), 120) * 3 + rng.integers(0, 2, len(users))) % 40]
    pairs = pl.DataFrame({"user_id": users, "item_id": items}, schema={"user_id": pl.Int64, "item_id": pl.UInt64})
    pairs.unique(["user_id", "item_id"]).write_parquet(tmp_path / "pairs.parquet")
    attributes = pl.DataFrame({"item_id": big, "category": [("a", "b")[i % 2] for i in range(40)]},
                              schema={"item_id": pl.UInt64, "category": pl.String})
    job = items_job(tmp_path, attributes, input={"path": str(tmp_path / "pairs.parquet")})
    result = run_job(load_job_config(job), progress=False)
    items = pl.read_parquet(result.path / layout.ATTRIBUTES, columns=["item_id", "category"])
    assert items.schema["item_id"] == pl.UInt64 and items.get_column("item_id").min() >= 2**63
    assert items.get_column("item_id").equals(pl.read_parquet(result.path / layout.ITEMS).get_column("item_id"))
    expected = dict(zip(attributes.get_column("item_id").to_list(), attributes.get_column("category").to_list()))
    assert all(expected[i] == c for i, c in items.iter_rows())
    assert result.manifest["attributes"]["matched"] == items.height


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shop")
    result = run_job(load_job_config(items_job(folder)), progress=False)
    return folder, result


def test_a_run_stores_attributes_in_item_row_order(shop):
    folder, result = shop
    stored = pl.read_parquet(result.path / layout.ATTRIBUTES)
    items = pl.read_parquet(result.path / layout.ITEMS, columns=["item_id"])
    assert stored.get_column("item_id").to_list() == items.get_column("item_id").to_list()
    expected = catalogue_attributes().join(items, on="item_id", how="right").select(stored.columns)
    assert stored.equals(expected)
    m = result.manifest["attributes"]
    assert m["unknown_ids"] == 2 and m["columns"]["tags"] == "List(String)"
    assert m["files"][0]["path"].endswith("items.parquet")


def test_attributes_are_columns_of_the_items_view(shop):
    folder, result = shop
    con = duckdb.connect()
    con.execute((folder / "store" / "catalog.sql").read_text())
    columns = [c[0] for c in con.sql("DESCRIBE shop_items").fetchall()]
    assert columns[-5:] == ["category", "price", "in_stock", "tags", "released"]
    assert con.execute("SELECT count(*) FROM shop_items WHERE category IS NULL").fetchone()[0] == 50
    assert con.execute("SELECT tags FROM shop_items WHERE item_id = 5").fetchone()[0] == ["kids"]


def test_filters_use_the_stored_attributes(shop):
    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    expected = [i for i in fs.item_ids.tolist() if i % 10 and i % 3 == 0 and i % 4 != 0]
    assert fs.filter_items("category = 'books' AND in_stock").tolist() == expected
    user = int(fs.user_ids[0])
    found = fs.recommend(user, k=10, filter="category = 'books' AND in_stock")
    assert len(found.ids) == 10 and set(found.ids.tolist()) <= set(expected)


def test_duplicate_attribute_ids_refuse_the_run_before_training_and_publish_nothing(tmp_path):
    frame = pl.concat([catalogue_attributes(), catalogue_attributes().head(3)])
    with pytest.raises(errors.BadInputError, match="3 rows|6 rows with a repeated id") as info:
        run_job(load_job_config(items_job(tmp_path, frame)), progress=False)
    assert info.value.exit_code == 2
    assert not (tmp_path / "store" / "shop" / layout.LATEST).exists()


def test_a_version_without_attributes_filters_on_item_id_alone(trained):
    root, _ = trained
    fs = aefeatures.open_store(root)["movies"]
    assert fs.attributes.columns == ["item_id"]
    assert fs.filter_items("item_id < 5").tolist() == [i for i in fs.item_ids.tolist() if i < 5]
    with pytest.raises(errors.FilterError, match="unknown column `category`; this version's items have: item_id"):
        fs.recommend(int(fs.user_ids[0]), filter="category = 'x'")
    assert not (pq.read_schema(fs.path / layout.ITEMS).names.count("category"))


# --- the CLI, HTTP and SQL forms agree with the Python API ------------------------------------------

SHOP_FILTER = "category = 'books' AND in_stock AND price < 40"


def test_cli_filter_and_items_file_agree_with_the_api(shop, tmp_path):
    import json

    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    user = int(fs.user_ids[3])
    allow = fs.item_ids[::3].tolist()
    (tmp_path / "allow.txt").write_text("\n".join(map(str, allow)) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["recommend", "--store", str(folder / "store"), "--user", str(user), "-k", "8",
                                 "--filter", SHOP_FILTER, "--items-file", str(tmp_path / "allow.txt"), "--json"])
    assert result.exit_code == 0, result.output
    expected = fs.recommend(user, k=8, filter=SHOP_FILTER, items=allow)
    assert [r["item_id"] for r in json.loads(result.stdout)["items"]] == expected.ids.tolist()

    result = runner.invoke(cli, ["similar", "--store", str(folder / "store"), "--item", "7", "-k", "5",
                                 "--filter", SHOP_FILTER, "--json"])
    assert result.exit_code == 0, result.output
    expected = fs.similar_items(7, k=5, filter=SHOP_FILTER)
    assert [r["item_id"] for r in json.loads(result.stdout)["items"]] == expected.ids.tolist()

    result = runner.invoke(cli, ["recommend", "--store", str(folder / "store"), "--user", str(user),
                                 "--filter", "colour = 'red'"])
    assert result.exit_code == 2
    assert "invalid filter: unknown column `colour`" in result.output and "Traceback" not in result.output


def test_http_filter_and_items_agree_with_the_api(shop):
    from tests.test_service import Service

    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    users = [int(u) for u in fs.user_ids[:3]]
    allow = fs.item_ids[::2].tolist()
    svc = Service(folder / "store")
    try:
        status, body = svc.get("/v1/shop/recommend", user=users[0], k=6, filter=SHOP_FILTER, items=allow)
        assert status == 200, body
        expected = fs.recommend(users[0], k=6, filter=SHOP_FILTER, items=allow)
        assert [r["item_id"] for r in body["items"]] == expected.ids.tolist()

        status, body = svc.request("POST", "/v1/shop/recommend",
                                   {"users": users, "k": 4, "filter": SHOP_FILTER, "items": allow})
        assert status == 200, body
        for entry, user in zip(body["results"], users):
            assert [r["item_id"] for r in entry["items"]] == \
                fs.recommend(user, k=4, filter=SHOP_FILTER, items=allow).ids.tolist()

        status, body = svc.get("/v1/shop/similar", item=7, k=5, filter=SHOP_FILTER)
        assert status == 200 and [r["item_id"] for r in body["items"]] == \
            fs.similar_items(7, k=5, filter=SHOP_FILTER).ids.tolist()

        status, body = svc.get("/v1/shop/recommend", user=users[0], filter="category = 5")
        assert status == 422 and body["error"]["code"] == "invalid_filter"
        assert "Could not convert" in body["error"]["message"]
        status, body = svc.get("/v1/shop/recommend", user=users[0],
                               filter="true) AS keep FROM read_csv('/etc/passwd') --")
        assert status == 422 and body["error"]["code"] == "invalid_filter"
        status, body = svc.get("/v1/shop/recommend", user=users[0], filter="x" * 5000)
        assert status == 422
        status, body = svc.get("/v1/shop/recommend", user=users[0], filter="category = 'none'")
        assert status == 200 and body["items"] == []

        status, spec = svc.get("/openapi.json")
        params = {p["name"]: p for p in spec["paths"]["/v1/{name}/recommend"]["get"]["parameters"]}
        assert "SQL boolean expression" in params["filter"]["description"] and "items" in params
    finally:
        svc.stop()


def test_sql_where_macros_agree_with_the_api(shop):
    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    con = duckdb.connect()
    con.execute((folder / "store" / "catalog.sql").read_text())
    for user in [int(u) for u in fs.user_ids[:5]]:
        rows = con.execute(f"SELECT item_id FROM shop_recommend_where($u, 10, {SHOP_FILTER})", {"u": user}).fetchall()
        assert [r[0] for r in rows] == fs.recommend(user, k=10, filter=SHOP_FILTER).ids.tolist()
    rows = con.execute(f"SELECT item_id FROM shop_similar_items_where(7, 10, {SHOP_FILTER} AND item_id < 300)")
    assert [r[0] for r in rows.fetchall()] == \
        fs.similar_items(7, k=10, filter=SHOP_FILTER + " AND item_id < 300").ids.tolist()


# --- `aefeatures attributes`: fresh attributes, same model ------------------------------------------

def test_attributes_command_republishes_with_the_same_model_and_fresh_attributes(tmp_path):
    import json
    import os

    from click.testing import CliRunner

    from aefeatures.cli.app import cli
    from aefeatures.jobs.embed import embed_job

    job = items_job(tmp_path)
    first = run_job(load_job_config(job), progress=False)
    fresh = catalogue_attributes().with_columns(pl.lit("books").alias("category"), pl.lit(True).alias("in_stock"))
    fresh.write_parquet(tmp_path / "items.parquet")
    os.utime(tmp_path / "items.parquet", ns=(1, 2))  # a different modification time, whatever the clock
    runner = CliRunner()
    result = runner.invoke(cli, ["attributes", str(job), "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["status"] == "published" and answer["attributes"]["unknown_ids"] == 2
    second = layout.version_dir(tmp_path / "store", "shop", answer["version"])
    for name in (layout.ITEMS, layout.USERS, layout.INTERACTIONS, layout.INDEX, "model/weights.pt"):
        assert (second / name).read_bytes() == (first.path / name).read_bytes(), name
    fs = aefeatures.open_store(tmp_path / "store")["shop"]
    assert fs.version == answer["version"]
    assert len(fs.filter_items("category = 'books' AND in_stock")) == 450  # every described item now
    manifest = layout.read_manifest(second)
    assert manifest["attributes_from"]["version"] == first.version and manifest["training"] == first.manifest["training"]
    con = duckdb.connect()
    con.execute((tmp_path / "store" / "catalog.sql").read_text())
    assert con.execute("SELECT count(*) FROM shop_items WHERE category = 'books'").fetchone()[0] == 450

    again = runner.invoke(cli, ["attributes", str(job)])
    assert again.exit_code == 0 and "up to date" in again.output
    rerun = run_job(load_job_config(job), progress=False)  # same interactions and config: no training
    assert rerun.status == "up_to_date" and rerun.version == answer["version"]

    built = {v["version"]: v["built"] for v in aefeatures.open_store(tmp_path / "store").versions("shop")}
    assert built == {first.version: "trained", answer["version"]: "attributes"}
    embedded = embed_job(load_job_config(job), force=True)  # new users, same items: attributes kept
    assert aefeatures.open_store(tmp_path / "store").versions("shop")[-1]["built"] == "embedded"
    assert pl.read_parquet(embedded.path / layout.ATTRIBUTES).equals(pl.read_parquet(second / layout.ATTRIBUTES))

    pl.concat([fresh, fresh.head(2)]).write_parquet(tmp_path / "items.parquet")
    refused = runner.invoke(cli, ["attributes", str(job)])
    assert refused.exit_code == 2 and "repeated id" in refused.output and "Traceback" not in refused.output
    assert aefeatures.open_store(tmp_path / "store")["shop"].version == embedded.version


def test_attributes_command_needs_an_items_section(trained, tmp_path):
    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    root, _ = trained
    result = CliRunner().invoke(cli, ["attributes", str(write_job(tmp_path, store=root))])
    assert result.exit_code == 2 and "no `[items]` section" in result.output


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sql_where_macro_and_api_agree_over_random_filters(shop, data):
    """Random filters (those of the brute-force property test) and users: the SQL macro, which
    DuckDB evaluates with no sandbox or strategy of ours, ranks as the Python API does."""
    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    con = _catalog(folder)
    text, _ = data.draw(filters())
    user = int(data.draw(st.sampled_from(fs.user_ids[:50].tolist())))
    k = data.draw(st.integers(1, 30))
    rows = con.execute(f"SELECT item_id, score FROM shop_recommend_where($u, {k}, {text})", {"u": user}).fetchall()
    found = fs.recommend(user, k=k, filter=text)
    assert len(rows) == len(found.ids)
    assert np.allclose([r[1] for r in rows], found.scores, atol=1e-4)
    scores = np.array([r[1] for r in rows])
    padded = np.concatenate([[np.inf], scores, [-np.inf]])
    clear = (padded[:-2] - padded[1:-1] > 1e-4) & (padded[1:-1] - padded[2:] > 1e-4)
    assert np.array([r[0] for r in rows])[clear].tolist() == found.ids[clear].tolist()


_CONNECTIONS: dict = {}


def _catalog(folder):
    if folder not in _CONNECTIONS:
        con = duckdb.connect()
        con.execute((folder / "store" / "catalog.sql").read_text())
        _CONNECTIONS[folder] = con
    return _CONNECTIONS[folder]


@pytest.fixture(scope="module")
def shop_service(shop):
    from tests.test_service import Service

    folder, _ = shop
    svc = Service(folder / "store")
    yield svc
    svc.stop()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cli_and_http_agree_with_the_api_over_random_filters(shop, shop_service, data):
    import json

    from click.testing import CliRunner

    from aefeatures.cli.app import cli

    folder, _ = shop
    fs = aefeatures.open_store(folder / "store")["shop"]
    text, _ = data.draw(filters())
    user = int(data.draw(st.sampled_from(fs.user_ids[:50].tolist())))
    k = data.draw(st.integers(1, 30))
    allow = data.draw(st.none() | st.lists(st.sampled_from(fs.item_ids.tolist()), max_size=60))
    expected = fs.recommend(user, k=k, filter=text, items=allow).ids.tolist()

    args = ["recommend", "--store", str(folder / "store"), "--user", str(user), "-k", str(k), "--filter", text, "--json"]
    if allow is not None:
        allow_file = folder / f"allow-{len(allow)}-{user}.txt"
        allow_file.write_text("".join(f"{i}\n" for i in allow))
        args += ["--items-file", str(allow_file)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert [r["item_id"] for r in json.loads(result.stdout)["items"]] == expected

    if allow is None or allow:  # an empty allow-list cannot be written as query parameters
        params = {"user": user, "k": k, "filter": text, **({"items": allow} if allow else {})}
        status, body = shop_service.get("/v1/shop/recommend", **params)
        assert status == 200, body
        assert [r["item_id"] for r in body["items"]] == expected
    status, body = shop_service.request("POST", "/v1/shop/recommend",
                                        {"users": [user], "k": k, "filter": text, "items": allow})
    assert status == 200, body
    assert [r["item_id"] for r in body["results"][0]["items"]] == expected
