"""Stage 1 and 2 on real Parquet files: every way an input can be laid out, the canonical frame
`read_interactions` makes of it, every error it raises, and the CSR matrix built from it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from aefeatures import errors
from aefeatures.config import InputConfig
from aefeatures.data.matrix import build_matrix
from aefeatures.data.read import InputFile, read_interactions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FIXTURE = FIXTURES / "interactions.parquet"
FIXTURE_STR = FIXTURES / "interactions_str.parquet"
UTC = dt.timezone.utc
CANONICAL = {"user_id": pl.Int64, "item_id": pl.Int64, "weight": pl.Float32,
             "timestamp": pl.Datetime("us", "UTC")}


def read(path: Path | str, **kw):
    return read_interactions(InputConfig(path=str(path), **kw))


def sorted_frame(interactions) -> pl.DataFrame:
    return interactions.frame.sort("user_id", "item_id")


@pytest.fixture(scope="module")
def source() -> pl.DataFrame:
    return pl.read_parquet(FIXTURE)


@pytest.fixture(scope="module")
def expected(source) -> pl.DataFrame:
    """What the fixture collapses to: one row per pair, max rating, latest timestamp."""
    return (source.group_by("user_id", "item_id")
            .agg(pl.col("rating").max().cast(pl.Float32).alias("weight"), pl.col("timestamp").max())
            .sort("user_id", "item_id"))


@pytest.fixture(scope="module")
def from_file(expected):
    """The committed fixture read as one file, with weights and timestamps."""
    return read(FIXTURE, weight_col="rating", timestamp_col="timestamp")


# --- layouts: file, directory, hive partitions, glob -------------------------------------------


def test_single_file_gives_canonical_deduplicated_frame(from_file, source, expected):
    got = from_file
    assert dict(got.frame.schema) == CANONICAL
    assert got.n_rows_read == source.height == 57879
    assert got.n_rows_kept == 57879  # no min_weight: nothing dropped before collapsing
    assert got.frame.height == expected.height == 56648  # the fixture holds 1123 repeated pairs
    assert got.has_timestamps
    assert sorted_frame(got).equals(expected)
    stat = FIXTURE.stat()
    assert got.files == (InputFile(str(FIXTURE), stat.st_size, stat.st_mtime_ns),)


def test_directory_of_files_ignores_success_hidden_and_underscore_entries(tmp_path, source, from_file):
    folder = tmp_path / "dir"
    folder.mkdir()
    for i, start in enumerate((0, 20000, 40000)):
        source.slice(start, 20000).write_parquet(folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.parquet.crc").write_bytes(b"\x00crc")
    (folder / "_temporary" / "0").mkdir(parents=True)  # a Spark attempt left behind: not data
    source.head(100).write_parquet(folder / "_temporary" / "0" / "part-9.parquet")
    got = read(folder, weight_col="rating", timestamp_col="timestamp")
    assert [Path(f.path).name for f in got.files] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert got.n_rows_read == 57879
    assert sorted_frame(got).equals(sorted_frame(from_file))


def test_directory_of_files_without_extension(tmp_path, source, from_file):
    folder = tmp_path / "spark"
    folder.mkdir()
    source.head(30000).write_parquet(folder / "part-00000")
    source.slice(30000).write_parquet(folder / "part-00001")
    got = read(folder, weight_col="rating", timestamp_col="timestamp")
    assert got.n_rows_read == 57879 and len(got.files) == 2
    assert sorted_frame(got).equals(sorted_frame(from_file))


def _hive(root: Path, source: pl.DataFrame) -> Path:
    for day in (1, 2):
        (root / f"day={day}").mkdir(parents=True)
        source.filter(pl.col("user_id") % 2 == day - 1).write_parquet(root / f"day={day}" / "part.parquet")
    (root / "_SUCCESS").write_text("")
    (root / "_common_metadata").write_bytes(b"not parquet at all")
    (root / ".hidden.crc").write_bytes(b"crc")
    (root / "day=1" / "_SUCCESS").write_text("")
    (root / "day=1" / ".part.parquet.crc").write_bytes(b"crc")
    return root


def test_hive_partitioned_directory_ignores_success_and_hidden_files(tmp_path, source, from_file):
    root = _hive(tmp_path / "hive", source)
    got = read(root, weight_col="rating", timestamp_col="timestamp")
    assert [f.path for f in got.files] == [str(root / "day=1" / "part.parquet"), str(root / "day=2" / "part.parquet")]
    assert got.n_rows_read == 57879
    assert sorted_frame(got).equals(sorted_frame(from_file))


def test_hive_partition_key_can_be_the_weight_column(tmp_path, source):
    # Files partitioned by rating hold no `rating` column: it comes from the folder names.
    root = tmp_path / "by_rating"
    for rating in range(1, 6):
        (root / f"rating={rating}").mkdir(parents=True)
        (source.filter(pl.col("rating") == rating).drop("rating")
         .write_parquet(root / f"rating={rating}" / "part.parquet"))
    got = read(root, weight_col="rating", min_weight=4.0)
    assert got.n_rows_read == 57879
    assert got.n_rows_kept == int((source["rating"] >= 4).sum()) == 42359
    assert got.frame.height == source.filter(pl.col("rating") >= 4).unique(["user_id", "item_id"]).height
    assert got.frame["weight"].min() == 4.0 and got.frame["weight"].max() == 5.0


def test_glob_reads_only_matching_files(tmp_path, source, from_file):
    folder = tmp_path / "g"
    folder.mkdir()
    for i, start in enumerate((0, 20000, 40000)):
        source.slice(start, 20000).write_parquet(folder / f"part-{i}.parquet")
    (folder / "notes.txt").write_text("not data")
    source.head(10).write_parquet(folder / "other.parquet")  # does not match `part-*`
    everything = read(str(folder / "part-*.parquet"), weight_col="rating", timestamp_col="timestamp")
    assert len(everything.files) == 3 and everything.n_rows_read == 57879
    assert sorted_frame(everything).equals(sorted_frame(from_file))
    two = read(str(folder / "part-[01].parquet"), weight_col="rating")
    assert [Path(f.path).name for f in two.files] == ["part-0.parquet", "part-1.parquet"]
    assert two.n_rows_read == 40000
    assert two.frame.height == source.head(40000).unique(["user_id", "item_id"]).height


@pytest.mark.parametrize("as_glob", [False, True])
def test_later_files_may_add_columns_the_job_does_not_read(tmp_path, source, from_file, as_glob):
    folder = tmp_path / "evolving"
    folder.mkdir()
    source.head(30000).write_parquet(folder / "a.parquet")
    source.slice(30000).with_columns(device=pl.lit("phone")).write_parquet(folder / "b.parquet")
    got = read(str(folder / "*.parquet") if as_glob else folder, weight_col="rating", timestamp_col="timestamp")
    assert got.n_rows_read == 57879
    assert sorted_frame(got).equals(sorted_frame(from_file))


def test_recursive_glob_over_hive_folders(tmp_path, source, from_file):
    root = _hive(tmp_path / "hive", source)
    got = read(str(root / "**" / "*.parquet"), weight_col="rating", timestamp_col="timestamp")
    assert len(got.files) == 2 and got.n_rows_read == 57879
    assert sorted_frame(got).equals(sorted_frame(from_file))


# --- columns and id types ---------------------------------------------------------------------


def test_renamed_columns(tmp_path, source, from_file):
    path = tmp_path / "renamed.parquet"
    source.rename({"user_id": "uid", "item_id": "iid", "rating": "stars", "timestamp": "when"}).write_parquet(path)
    got = read(path, user_col="uid", item_col="iid", weight_col="stars", timestamp_col="when")
    assert got.frame.columns == ["user_id", "item_id", "weight", "timestamp"]
    assert sorted_frame(got).equals(sorted_frame(from_file))


def test_string_ids_keep_their_type_and_match_the_integer_fixture(from_file):
    got = read(FIXTURE_STR, weight_col="rating", timestamp_col="timestamp")
    assert got.frame.schema["user_id"] == pl.String and got.frame.schema["item_id"] == pl.String
    assert got.frame.height == from_file.frame.height
    as_ints = got.frame.with_columns(pl.col("user_id").str.slice(1).cast(pl.Int64),
                                     pl.col("item_id").str.slice(1).cast(pl.Int64))
    assert as_ints.sort("user_id", "item_id").equals(sorted_frame(from_file))


@pytest.mark.parametrize("dtype", [pl.Int8, pl.Int32, pl.UInt16, pl.UInt32, pl.UInt64])
def test_any_integer_id_type_becomes_int64_but_uint64_stays(tmp_path, dtype):
    path = tmp_path / "ids.parquet"
    pl.DataFrame({"user_id": [3, 1, 2], "item_id": [1, 2, 1]},
                 schema={"user_id": dtype, "item_id": dtype}).write_parquet(path)
    got = read(path)
    want = pl.UInt64 if dtype == pl.UInt64 else pl.Int64  # hashes >= 2**63 keep their value
    assert got.frame.schema["user_id"] == want and got.frame.schema["item_id"] == want
    assert sorted(got.frame["user_id"].to_list()) == [1, 2, 3]


def test_uint64_hashes_above_int64_keep_their_value(tmp_path):
    path = tmp_path / "ids.parquet"
    users = [2**64 - 1, 2**63, 2**63 + 7]
    pl.DataFrame({"user_id": users, "item_id": [1, 2, 1]}, schema={"user_id": pl.UInt64, "item_id": pl.Int64}
                 ).write_parquet(path)
    assert sorted(read(path).frame["user_id"].to_list()) == sorted(users)


def test_id_columns_of_one_kind_spelled_differently_across_files_are_read_as_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def categorical(values, index_type):
        dictionary = sorted(set(values), reverse=index_type == pa.int32())
        return pa.DictionaryArray.from_arrays(pa.array([dictionary.index(v) for v in values], index_type),
                                              pa.array(dictionary))

    pq.write_table(pa.table({"user_id": categorical(["a", "b"], pa.int8()), "item_id": pa.array([1, 2], pa.int32())}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": categorical(["c", "a"], pa.int32()), "item_id": pa.array([3, 2**40], pa.int64())}),
                   tmp_path / "b.parquet")
    pq.write_table(pa.table({"user_id": pa.array(["d"], pa.large_string()), "item_id": pa.array([1], pa.int16())}),
                   tmp_path / "c.parquet")
    got = read(tmp_path)
    assert got.frame.schema["user_id"] == pl.String and got.frame.schema["item_id"] == pl.Int64
    assert sorted(got.frame.select("user_id", "item_id").rows()) == [("a", 1), ("a", 2**40), ("b", 2), ("c", 3), ("d", 1)]


def test_timestamps_of_different_units_and_zones_across_files_are_read_as_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(name, user, when, typ, **kw):
        pq.write_table(pa.table({"user_id": [user], "item_id": [user % 2], "when": pa.array([when], typ)}),
                       tmp_path / name, **kw)

    write("a.parquet", 1, dt.datetime(2024, 1, 1), pa.timestamp("us"), use_deprecated_int96_timestamps=True)  # Spark
    write("b.parquet", 2, dt.datetime(2024, 1, 2, tzinfo=UTC), pa.timestamp("ms", "Europe/Paris"))
    write("c.parquet", 3, dt.datetime(2024, 1, 3), pa.timestamp("us"))  # naive: UTC
    got = read(tmp_path, timestamp_col="when")
    assert sorted_frame(got)["timestamp"].to_list() == [dt.datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2, 3)]


def test_categorical_ids_become_strings(tmp_path):
    path = tmp_path / "cat.parquet"
    pl.DataFrame({"user_id": ["b", "a", "b"], "item_id": ["x", "y", "y"]},
                 schema={"user_id": pl.Categorical, "item_id": pl.Categorical}).write_parquet(path)
    got = read(path)
    assert got.frame.schema["user_id"] == pl.String and got.frame.schema["item_id"] == pl.String
    assert set(got.frame.select("user_id", "item_id").iter_rows()) == {("b", "x"), ("a", "y"), ("b", "y")}


def test_without_weight_or_timestamp_columns_weights_are_one_and_times_null():
    got = read(FIXTURE)
    assert dict(got.frame.schema) == CANONICAL
    assert not got.has_timestamps
    assert got.frame["weight"].unique().to_list() == [1.0]
    assert got.frame["timestamp"].null_count() == got.frame.height == 56648


# --- min_weight and duplicates ----------------------------------------------------------------


@pytest.mark.parametrize("min_weight, kept", [(4.0, 42359), (3.5, 42359), (5.0, 24278), (1.0, 57879),
                                              (0.0, 57879)])
def test_min_weight_drops_rows_below(source, min_weight, kept):
    got = read(FIXTURE, weight_col="rating", min_weight=min_weight)
    assert got.n_rows_read == 57879
    assert got.n_rows_kept == kept == int((source["rating"] >= min_weight).sum())
    assert got.frame.height == source.filter(pl.col("rating") >= min_weight).unique(["user_id", "item_id"]).height
    assert got.frame["weight"].min() >= min_weight


def _tiny_duplicates(path: Path) -> Path:
    day = lambda d: dt.datetime(2024, 1, d, 12, tzinfo=UTC)  # noqa: E731
    pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2],
        "item_id": [10, 10, 10, 11, 10, 12],
        "w": [5.0, 2.0, 3.0, 1.0, 4.0, 3.5],
        "ts": [day(1), day(3), day(2), day(5), day(4), day(6)],
    }).write_parquet(path)
    return path


def test_duplicates_collapse_to_max_weight_and_latest_timestamp(tmp_path):
    got = read(_tiny_duplicates(tmp_path / "dup.parquet"), weight_col="w", timestamp_col="ts")
    assert got.n_rows_read == got.n_rows_kept == 6
    assert sorted_frame(got).rows() == [
        (1, 10, 5.0, dt.datetime(2024, 1, 3, 12, tzinfo=UTC)),  # weight of day 1, time of day 3
        (1, 11, 1.0, dt.datetime(2024, 1, 5, 12, tzinfo=UTC)),
        (2, 10, 4.0, dt.datetime(2024, 1, 4, 12, tzinfo=UTC)),
        (2, 12, 3.5, dt.datetime(2024, 1, 6, 12, tzinfo=UTC)),
    ]


def test_min_weight_filters_rows_before_duplicates_collapse(tmp_path):
    got = read(_tiny_duplicates(tmp_path / "dup.parquet"), weight_col="w", timestamp_col="ts", min_weight=3.0)
    assert got.n_rows_read == 6 and got.n_rows_kept == 4
    # The weight-2 row of day 3 is gone before collapsing, so (1, 10) is last seen on day 2.
    assert sorted_frame(got).rows() == [
        (1, 10, 5.0, dt.datetime(2024, 1, 2, 12, tzinfo=UTC)),
        (2, 10, 4.0, dt.datetime(2024, 1, 4, 12, tzinfo=UTC)),
        (2, 12, 3.5, dt.datetime(2024, 1, 6, 12, tzinfo=UTC)),
    ]


# --- timestamps -------------------------------------------------------------------------------

NOONS = [dt.datetime(2024, 1, 1, 12), dt.datetime(2024, 1, 2, 13, 30), dt.datetime(2024, 1, 3, 14, 0, 5)]


EPOCHS = [dt.datetime(2001, 9, 9, 1, 46, 40), dt.datetime(2020, 9, 13, 12, 26, 40),
          dt.datetime(2023, 11, 14, 22, 13, 20)]
SECONDS = [1_000_000_000, 1_600_000_000, 1_700_000_000]


@pytest.mark.parametrize("column, expected", [
    (pl.Series(SECONDS, dtype=pl.Int64), EPOCHS),
    (pl.Series(SECONDS, dtype=pl.Int32), EPOCHS),
    (pl.Series(SECONDS, dtype=pl.UInt32), EPOCHS),
    (pl.Series([s * 1_000 for s in SECONDS], dtype=pl.Int64), EPOCHS),
    (pl.Series([s * 1_000_000 for s in SECONDS], dtype=pl.Int64), EPOCHS),
    (pl.Series([s * 1_000_000_000 for s in SECONDS], dtype=pl.Int64), EPOCHS),
    (pl.Series([s * 1_000_000_000 for s in SECONDS], dtype=pl.UInt64), EPOCHS),
    (pl.Series([dt.date(2024, 1, 1), dt.date(2024, 2, 29), dt.date(2024, 12, 31)]),
     [dt.datetime(2024, 1, 1), dt.datetime(2024, 2, 29), dt.datetime(2024, 12, 31)]),
    (pl.Series(NOONS), NOONS),  # naive datetimes are taken as UTC
    (pl.Series(NOONS).cast(pl.Datetime("ms")), NOONS),
    (pl.Series(NOONS).cast(pl.Datetime("ns")), NOONS),
    (pl.Series(NOONS).dt.replace_time_zone("Europe/Paris"),  # UTC+1 in winter
     [t - dt.timedelta(hours=1) for t in NOONS]),
    (pl.Series(NOONS).dt.replace_time_zone("America/Los_Angeles").cast(pl.Datetime("ns", "America/Los_Angeles")),
     [t + dt.timedelta(hours=8) for t in NOONS]),
], ids=["epoch-s-int64", "epoch-s-int32", "epoch-s-uint32", "epoch-ms", "epoch-us", "epoch-ns", "epoch-ns-uint64",
        "date", "naive-us", "naive-ms", "naive-ns", "paris", "los-angeles-ns"])
def test_timestamp_types_become_utc_datetimes(tmp_path, column, expected):
    path = tmp_path / "ts.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 1], "when": column}).write_parquet(path)
    got = read(path, timestamp_col="when")
    assert got.has_timestamps
    assert got.frame.schema["timestamp"] == pl.Datetime("us", "UTC")
    assert sorted_frame(got)["timestamp"].to_list() == [t.replace(tzinfo=UTC) for t in expected]
    if column.dtype.is_integer():  # the unit was inferred from the magnitude, and recorded
        assert got.timestamps["inferred"] and got.timestamps["unit"] == {
            1_000_000_000: "s", 10**12: "ms", 10**15: "us", 10**18: "ns"}[int(column[0])]


def test_spark_int96_timestamps_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "spark.parquet"
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 1],
                             "when": pa.array(NOONS, pa.timestamp("us"))}), path,
                   use_deprecated_int96_timestamps=True)
    assert "int96" in str(pq.ParquetFile(path).metadata.schema).lower()
    got = read(path, timestamp_col="when")
    assert sorted_frame(got)["timestamp"].to_list() == [t.replace(tzinfo=UTC) for t in NOONS]


@pytest.mark.parametrize("values, cfg, message", [
    ([5, 6, 7], {}, r"run from 5 to 7: as epochs within \[1971-01-01, 2100-01-01\) it fits none of s, ms, us, ns"),
    ([1_000_000_000, 1_000_000_001, 1_000_000_002], {"timestamp_min": "1970-01-01"},
     r"it fits several units \(s, ms, us, ns\)"),
    ([1_000_000_000, 1_700_000_000_000, 1_700_000_000], {}, "fits none"),  # mixed s and ms
], ids=["tiny", "ambiguous-with-a-wide-window", "mixed-units"])
def test_integer_epochs_of_unknown_unit_are_refused(tmp_path, values, cfg, message):
    path = tmp_path / "ts.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 1], "when": values}).write_parquet(path)
    with pytest.raises(errors.TimestampUnitError, match=message) as caught:
        read(path, timestamp_col="when", **cfg)
    assert caught.value.exit_code == 2 and "Set `input.timestamp_unit`" in str(caught.value)


def test_integer_epochs_outside_the_window_in_the_named_unit_are_refused_not_wrapped(tmp_path):
    path = tmp_path / "ts.parquet"
    millis = [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 1], "when": millis}).write_parquet(path)
    with pytest.raises(errors.ImplausibleTimestampsError,
                       match=rf"column `when` has 3 timestamp\(s\) outside \[1971-01-01, 2100-01-01\); the first is "
                             rf"1700000000000 \(epoch s\) at row 0 of `{path}`"):
        read(path, timestamp_col="when", timestamp_unit="s")
    got = read(path, timestamp_col="when", timestamp_unit="ms")
    assert got.timestamps == {"column": "when", "type": "Int64", "unit": "ms", "inferred": False,
                              "window": ["1971-01-01T00:00:00+00:00", "2100-01-01T00:00:00+00:00"]}
    assert sorted_frame(got)["timestamp"][0] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_datetimes_outside_the_window_are_refused_naming_file_and_row(tmp_path):
    path = tmp_path / "ts.parquet"
    when = pl.Series([dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 2), dt.datetime(1900, 1, 1)]).cast(pl.Datetime("ms"))
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 1], "when": when}).write_parquet(path)
    with pytest.raises(errors.ImplausibleTimestampsError,
                       match=rf"1 timestamp\(s\) outside .* the first is '1900-01-01 00:00:00' \(Datetime\(time_unit='ms', "
                             rf"time_zone=None\)\) at row 2 of `{path}`"):
        read(path, timestamp_col="when")
    assert read(path, timestamp_col="when", timestamp_min="1899-01-01").has_timestamps


@pytest.mark.parametrize("column, shown", [
    (pl.Series([1.5, 2.5]), "Float64"),
    (pl.Series(["2024-01-01", "2024-01-02"]), "String"),
    (pl.Series([dt.time(1), dt.time(2)]), "Time"),
    (pl.Series([dt.timedelta(1), dt.timedelta(2)]), "Duration"),
])
def test_unusable_timestamp_types_are_rejected(tmp_path, column, shown):
    path = tmp_path / "ts.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "when": column}).write_parquet(path)
    with pytest.raises(errors.UnsupportedTypeError,
                       match=rf"column `when` in `{path}` has type {shown}.*; timestamps must be datetimes, "
                             "dates or integer epochs"):
        read(path, timestamp_col="when")


# --- errors: where the input is -------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(errors.InputNotFoundError, match=rf"^input `{path}` does not exist\. Check `input.path`") as e:
        read(path)
    assert isinstance(e.value, FileNotFoundError) and e.value.exit_code == 2 and e.value.path == str(path)


def test_glob_matching_no_files(tmp_path):
    (tmp_path / "only_a_dir.parquet").mkdir()  # a folder matching the glob is not a file
    (tmp_path / "data.csv").write_text("user_id,item_id\n1,2\n")
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(errors.InputNotFoundError, match=r"input `.*/\*\.parquet` matches no files"):
        read(pattern)


@pytest.mark.parametrize("junk", [[], ["_SUCCESS", ".DS_Store", "_temporary/0/part-0.parquet"]])
def test_directory_without_data_files(tmp_path, junk):
    folder = tmp_path / "empty"
    folder.mkdir()
    for name in junk:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"user_id": [1], "item_id": [1]}).write_parquet(folder / name)
    with pytest.raises(errors.InputNotFoundError, match=rf"input `{folder}` is a directory with no data files"):
        read(folder)


# --- errors: what the files hold ------------------------------------------------------------


def _good(path: Path, n: int = 20) -> Path:
    pl.DataFrame({"user_id": list(range(n)), "item_id": [i % 5 for i in range(n)],
                  "rating": [float(1 + i % 5) for i in range(n)]}).write_parquet(path)
    return path


def test_text_file_named_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(errors.NotParquetError,
                       match=rf"^input file `{path}` is not a readable Parquet file \(.*magic bytes.*\)\. Remove"):
        read(path)


def test_truncated_file_among_good_ones_is_named(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    good = _good(folder / "a.parquet")
    _good(folder / "c.parquet")
    raw = good.read_bytes()
    (folder / "b.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(errors.NotParquetError, match=r"input file `[^`]*/b\.parquet` is not a readable") as e:
        read(folder)
    assert e.value.path == str(folder / "b.parquet")


def test_corrupt_data_pages_among_good_ones_are_named(tmp_path):
    # The footer is intact (the schema reads fine) but the compressed column data is garbage.
    folder = tmp_path / "d"
    folder.mkdir()
    _good(folder / "a.parquet", 1000)
    bad = folder / "b.parquet"
    _good(bad, 1000)
    raw = bytearray(bad.read_bytes())
    raw[20:200] = b"\x5a" * 180
    bad.write_bytes(bytes(raw))
    _good(folder / "c.parquet", 1000)
    with pytest.raises(errors.NotParquetError, match=r"input file `[^`]*/b\.parquet` is not a readable Parquet"):
        read(folder, weight_col="rating")


def test_corrupt_timestamp_pages_are_named(tmp_path):
    # Only the timestamp column is damaged: the id and weight checks pass, the final read fails.
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    path = tmp_path / "ts.parquet"
    pl.DataFrame({"user_id": rng.integers(0, 300, 2000), "item_id": rng.integers(0, 40, 2000),
                  "ts": rng.integers(0, 2**40, 2000).astype("datetime64[us]")}).write_parquet(path)
    chunk = pq.read_metadata(path).row_group(0).column(2)
    assert chunk.path_in_schema == "ts"
    raw = bytearray(path.read_bytes())
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 30
    raw[start:start + 100] = b"\x5a" * 100
    path.write_bytes(bytes(raw))
    assert read(path).frame.height > 0  # without the timestamp the file reads fine
    with pytest.raises(errors.NotParquetError, match=rf"input file `{path}` is not a readable Parquet file"):
        read(path, timestamp_col="ts")


def test_footer_that_only_pyarrow_accepts_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "meta.parquet"
    table = pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 1]}).replace_schema_metadata({b"origin": b"ABCDEFGH"})
    pq.write_table(table, path)
    path.write_bytes(path.read_bytes().replace(b"ABCDEFGH", bytes(range(0xF8, 0x100))))  # not UTF-8
    assert pq.read_schema(path).names == ["user_id", "item_id"]
    with pytest.raises(errors.NotParquetError, match=rf"input file `{path}` is not a readable Parquet file \(.*utf8"):
        read(path)


def test_a_read_failure_no_single_file_explains_is_not_blamed_on_a_file(tmp_path, monkeypatch):
    _good(tmp_path / "a.parquet")
    _good(tmp_path / "b.parquet")
    real_collect = pl.LazyFrame.collect
    calls = []

    def collect_failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise pl.exceptions.ComputeError("out of memory, say")
        return real_collect(self, *args, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "collect", collect_failing_once)
    with pytest.raises(pl.exceptions.ComputeError, match="out of memory, say"):
        read(tmp_path)
    assert len(calls) == 3  # the failed scan, then each file read alone (both fine)


def test_schema_drift_names_both_files_and_types(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2]})
    frame.write_parquet(folder / "a.parquet")
    frame.with_columns(pl.col("user_id").cast(pl.String)).write_parquet(folder / "b.parquet")
    with pytest.raises(errors.SchemaDriftError,
                       match=rf"column `user_id` is int64 in `{folder / 'a.parquet'}` but string in "
                             rf"`{folder / 'b.parquet'}`\.") as e:
        read(folder)
    assert e.value.column == "user_id"


def test_string_columns_from_different_writers_are_one_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": pa.array(["a", "b"], pa.string()), "item_id": [1, 2]}), tmp_path / "a.parquet")
    pl.DataFrame({"user_id": ["c", "a"], "item_id": [3, 4]}).write_parquet(tmp_path / "b.parquet")  # large_string
    assert str(pq.read_schema(tmp_path / "b.parquet").field("user_id").type) == "large_string"
    got = read(tmp_path)
    assert got.frame.schema["user_id"] == pl.String
    assert sorted(got.frame.select("user_id", "item_id").rows()) == [("a", 1), ("a", 4), ("b", 2), ("c", 3)]


def test_schema_drift_of_an_integer_width(tmp_path):
    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1, 2]})
    frame.write_parquet(tmp_path / "a.parquet")
    frame.with_columns(pl.col("rating").cast(pl.Float32)).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(errors.SchemaDriftError, match=r"column `rating` is int64 in `.*a\.parquet` but float in"):
        read(str(tmp_path / "*.parquet"), weight_col="rating")


@pytest.mark.parametrize("cfg, missing, keys", [
    ({"user_col": "uid"}, "['uid']", "`input.user_col`"),
    ({"item_col": "iid"}, "['iid']", "`input.item_col`"),
    ({"weight_col": "stars", "timestamp_col": "when"}, "['stars', 'when']",
     "`input.weight_col` or `input.timestamp_col`"),
])
def test_missing_columns_list_the_columns_present(tmp_path, cfg, missing, keys):
    path = _good(tmp_path / "a.parquet")
    with pytest.raises(errors.MissingColumnsError) as e:
        read(path, **cfg)
    assert str(e.value) == (f"input `{path}` is missing column(s) {missing}; found ['user_id', 'item_id', 'rating']. "
                            f"Set {keys} in the job file to the right column name.")
    assert isinstance(e.value, KeyError) and e.value.exit_code == 2


def test_column_missing_from_one_file_of_several_names_that_file(tmp_path):
    _good(tmp_path / "a.parquet")
    pl.read_parquet(tmp_path / "a.parquet").drop("rating").write_parquet(tmp_path / "b.parquet")
    with pytest.raises(errors.MissingColumnsError,
                       match=rf"input `{tmp_path / 'b.parquet'}` is missing column\(s\) \['rating'\]; "
                             r"found \['user_id', 'item_id'\]\. Set `input.weight_col`"):
        read(tmp_path, weight_col="rating")


def test_many_columns_are_listed_with_a_count_of_the_rest(tmp_path):
    path = tmp_path / "wide.parquet"
    pl.DataFrame({f"c{i:02d}": [1] for i in range(40)}).write_parquet(path)
    with pytest.raises(errors.MissingColumnsError, match=r"found \['c00', .*'c29', … 10 more\]") as e:
        read(path)
    assert e.value.missing == ["user_id", "item_id"] and len(e.value.found) == 40


def test_hive_key_missing_when_read_through_a_glob(tmp_path, source):
    # Partition keys are columns only when the input is the partitioned directory itself.
    root = _hive(tmp_path / "hive", source)
    with pytest.raises(errors.MissingColumnsError, match=r"is missing column\(s\) \['day'\]"):
        read(str(root / "*" / "*.parquet"), timestamp_col="day")
    # the keys are small integers: epoch seconds only with a window reaching back to 1970
    assert read(root, timestamp_col="day", timestamp_unit="s", timestamp_min="1970-01-01").has_timestamps


@pytest.mark.parametrize("column, values, count, row", [
    ("user_id", [1, 2, None, 4, None], 2, 2),
    ("item_id", [None, 2, 3, 4, 5], 1, 0),
])
def test_null_ids_name_column_count_file_and_row(tmp_path, column, values, count, row):
    path = tmp_path / "nulls.parquet"
    frame = pl.DataFrame({"user_id": [1, 2, 3, 4, 5], "item_id": [1, 2, 1, 2, 1]})
    frame.with_columns(pl.Series(column, values, dtype=pl.Int64)).write_parquet(path)
    with pytest.raises(errors.NullValuesError) as e:
        read(path)
    assert str(e.value) == (f"column `{column}` has {count} null value(s); the first is row {row} (0-based) of `{path}`. "
                            "Drop or fill those rows before the job runs.")


def test_null_ids_in_the_second_file_give_its_own_row(tmp_path):
    _good(tmp_path / "a.parquet")
    pl.DataFrame({"user_id": [7, 8, 9, None], "item_id": ["x", "y", "z", "w"]}).write_parquet(tmp_path / "b.parquet")
    pl.DataFrame({"user_id": [7], "item_id": ["x"]}).write_parquet(tmp_path / "c.parquet")
    (tmp_path / "a.parquet").unlink()
    with pytest.raises(errors.NullValuesError,
                       match=rf"column `user_id` has 1 null value\(s\); the first is row 3 \(0-based\) of "
                             rf"`{tmp_path / 'b.parquet'}`"):
        read(tmp_path)


def test_null_weights_are_rejected(tmp_path):
    path = tmp_path / "w.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 1], "w": [1.0, 2.0, None]}).write_parquet(path)
    with pytest.raises(errors.NullValuesError,
                       match=rf"column `w` has 1 null value\(s\); the first is row 2 \(0-based\) of `{path}`"):
        read(path, weight_col="w")


@pytest.mark.parametrize("values, what, count, row, shown", [
    ([1.0, float("nan"), 2.0, float("nan")], "NaN", 2, 1, "nan"),
    ([1.0, 2.0, -0.5, 3.0], "negative", 1, 2, "-0.5"),
    ([-3, 2, -1, 3], "negative", 2, 0, "-3.0"),
])
def test_invalid_weights_name_column_row_and_value(tmp_path, values, what, count, row, shown):
    path = tmp_path / "w.parquet"
    pl.DataFrame({"user_id": [1, 2, 3, 4], "item_id": [1, 2, 1, 2], "score": values}).write_parquet(path)
    with pytest.raises(errors.InvalidWeightsError) as e:
        read(path, weight_col="score", min_weight=0.0)  # checked before filtering, so min_weight hides nothing
    assert str(e.value) == (f"column `score` has {count} {what} value(s); the first is {shown} at row {row} of "
                            f"`{path}`. Weights must be finite and >= 0: clean the input or drop `input.weight_col`.")
    assert (e.value.column, e.value.count, e.value.file, e.value.row) == ("score", count, str(path), row)


def test_without_weight_col_a_weird_column_is_not_read(tmp_path):
    path = tmp_path / "w.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "score": [float("nan"), -1.0]}).write_parquet(path)
    assert read(path).frame["weight"].to_list() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [pl.Float64, pl.Boolean, pl.List(pl.Int64)])
def test_unsupported_id_types(tmp_path, dtype):
    path = tmp_path / "ids.parquet"
    values = {pl.Float64: [1.0, 2.0], pl.Boolean: [True, False], pl.List(pl.Int64): [[1], [2]]}[dtype]
    pl.DataFrame({"user_id": [1, 2], "item_id": pl.Series(values, dtype=dtype)}).write_parquet(path)
    with pytest.raises(errors.UnsupportedTypeError,
                       match=rf"column `item_id` in `{path}` has type .*; ids must be integers or strings") as e:
        read(path)
    assert isinstance(e.value, TypeError) and e.value.exit_code == 2


def test_string_weights_are_rejected(tmp_path):
    path = tmp_path / "w.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "w": ["5", "4"]}).write_parquet(path)
    with pytest.raises(errors.UnsupportedTypeError, match=r"column `w` in .* has type String; weights must be numeric"):
        read(path, weight_col="w")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64}).write_parquet(path)
    with pytest.raises(errors.EmptyInputError) as e:
        read(path)
    assert str(e.value) == (f"no interactions to train on: `{path}` matched 1 file(s) with 0 row(s) but they are "
                            "empty. Check the input or lower `input.min_weight`.")


def test_nothing_left_after_min_weight(tmp_path):
    with pytest.raises(errors.EmptyInputError,
                       match=r"matched 1 file\(s\) with 57879 row\(s\) but none has `rating` >= 6\.0\.") as e:
        read(FIXTURE, weight_col="rating", min_weight=6.0)
    assert (e.value.n_files, e.value.n_rows) == (1, 57879)


def test_fewer_than_two_items(tmp_path):
    path = _good(tmp_path / "a.parquet")
    with pytest.raises(errors.TooFewItemsError,
                       match=rf"input `{path}` has 1 distinct item\(s\) after filtering; at least 2 are needed"):
        read(path, weight_col="rating", min_weight=5.0)  # only item 4 has rating 5


# --- the CSR matrix ---------------------------------------------------------------------------

TINY = pl.DataFrame({
    "user_id": [30, 10, 20, 10, 30, 30, 10, -5],
    "item_id": [7, 5, 7, 9, 5, 9, 5, 9],
    "w": [2.0, 1.0, 4.0, 3.0, 5.0, 0.5, 1.5, 2.5],
    "ts": [dt.datetime(2024, 1, d) for d in (1, 2, 3, 4, 5, 6, 7, 8)],
})


def _dense(frame: pl.DataFrame, users: list, items: list, binarize: bool) -> np.ndarray:
    """The user × item matrix written out by hand: max weight per pair, rows/columns in id order."""
    out = np.zeros((len(users), len(items)), dtype=np.float32)
    for u, i, w, _ in frame.iter_rows():
        r, c = users.index(u), items.index(i)
        out[r, c] = 1.0 if binarize else max(out[r, c], w)
    return out


def _to_dense(m) -> np.ndarray:
    out = np.zeros(m.shape, dtype=np.float32)
    for r in range(m.shape[0]):
        cols = m.indices[m.indptr[r]:m.indptr[r + 1]]
        out[r, cols] = m.values[m.indptr[r]:m.indptr[r + 1]]
    return out


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.parquet"
    TINY.write_parquet(path)
    return read(path, weight_col="w", timestamp_col="ts")


def test_csr_arrays_on_a_tiny_example(tiny):
    m = build_matrix(tiny, binarize=False)
    assert m.user_ids.to_list() == [-5, 10, 20, 30] and m.item_ids.to_list() == [5, 7, 9]
    assert m.shape == (4, 3) and m.nnz == 7  # (10, 5) appears twice
    # rows: -5 → {9}, 10 → {5, 9}, 20 → {7}, 30 → {5, 7, 9}
    assert m.indptr.tolist() == [0, 1, 3, 4, 7]
    assert m.indices.tolist() == [2, 0, 2, 1, 0, 1, 2]
    assert m.values.tolist() == [2.5, 1.5, 3.0, 4.0, 5.0, 2.0, 0.5]
    assert (m.indptr.dtype, m.indices.dtype, m.values.dtype) == (np.int64, np.int32, np.float32)
    np.testing.assert_array_equal(_to_dense(m), _dense(TINY, [-5, 10, 20, 30], [5, 7, 9], binarize=False))
    assert m.row_lengths().tolist() == [1, 2, 1, 3]


def test_binarize_stores_ones(tiny):
    binary, weighted = build_matrix(tiny, binarize=True), build_matrix(tiny, binarize=False)
    assert binary.values.tolist() == [1.0] * 7 and binary.values.dtype == np.float32
    np.testing.assert_array_equal(binary.indptr, weighted.indptr)
    np.testing.assert_array_equal(binary.indices, weighted.indices)
    np.testing.assert_array_equal(_to_dense(binary), _dense(TINY, [-5, 10, 20, 30], [5, 7, 9], binarize=True))
    assert build_matrix(tiny).values.tolist() == binary.values.tolist()  # binarize is the default


def test_item_popularity_counts_users_per_item(tiny):
    m = build_matrix(tiny)
    dense = _dense(TINY, [-5, 10, 20, 30], [5, 7, 9], binarize=True)
    assert m.item_popularity().tolist() == (dense > 0).sum(axis=0).tolist() == [2, 2, 3]
    assert m.item_popularity().dtype == np.int32


def test_last_seen_is_the_latest_timestamp(tiny):
    m = build_matrix(tiny)
    day = lambda d: np.datetime64(f"2024-01-0{d}T00:00:00", "us")  # noqa: E731
    assert m.user_last_seen.tolist() == [day(8), day(7), day(3), day(6)]
    assert m.item_last_seen.tolist() == [day(7), day(3), day(8)]


def test_last_seen_is_nat_without_timestamps(tmp_path):
    path = tmp_path / "t.parquet"
    TINY.write_parquet(path)
    m = build_matrix(read(path))
    assert np.isnat(m.user_last_seen).all() and np.isnat(m.item_last_seen).all()
    assert m.user_last_seen.shape == (4,) and m.item_last_seen.shape == (3,)


@pytest.mark.parametrize("rows", [[3], [0, 3], [3, 0, 3, 1], [2, 2], [0, 1, 2, 3], []])
def test_gather_returns_the_rows_slices(tiny, rows):
    m = build_matrix(tiny, binarize=False)
    rows = np.array(rows, dtype=np.int64)
    offsets, items, values = m.gather(rows)
    assert len(offsets) == len(rows)
    ends = list(offsets[1:]) + [len(items)]
    for k, r in enumerate(rows):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        assert items[offsets[k]:ends[k]].tolist() == m.indices[lo:hi].tolist()
        assert values[offsets[k]:ends[k]].tolist() == m.values[lo:hi].tolist()
    assert len(items) == len(values) == int(m.row_lengths()[rows].sum())


def test_string_vocabularies_are_sorted(tmp_path):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"user_id": ["b", "a", "C", "aa", "b"], "item_id": ["z", "y", "z", "x", "x"]}).write_parquet(path)
    m = build_matrix(read(path))
    assert m.user_ids.to_list() == ["C", "a", "aa", "b"] and m.item_ids.to_list() == ["x", "y", "z"]
    dense = _dense(pl.read_parquet(path).with_columns(w=1.0, t=None), ["C", "a", "aa", "b"], ["x", "y", "z"], True)
    np.testing.assert_array_equal(_to_dense(m), dense)


def test_matrix_of_the_fixture_matches_the_frame(from_file):
    m = build_matrix(from_file, binarize=False)
    frame = from_file.frame
    assert m.user_ids.to_list() == sorted(frame["user_id"].unique().to_list())
    assert m.item_ids.to_list() == sorted(frame["item_id"].unique().to_list())
    assert m.shape == (2030, 500) and m.nnz == frame.height
    rows = np.searchsorted(m.user_ids.to_numpy(), frame["user_id"].to_numpy())
    cols = np.searchsorted(m.item_ids.to_numpy(), frame["item_id"].to_numpy())
    dense = np.zeros(m.shape, dtype=np.float32)
    dense[rows, cols] = frame["weight"].to_numpy()
    np.testing.assert_array_equal(_to_dense(m), dense)
    for r in range(m.shape[0]):  # items sorted within every row
        assert np.all(np.diff(m.indices[m.indptr[r]:m.indptr[r + 1]]) > 0)
    assert m.item_popularity().tolist() == (dense > 0).sum(axis=0).tolist()
    picked = np.random.default_rng(0).choice(2030, 64, replace=True)
    offsets, items, values = m.gather(picked)
    ends = np.append(offsets[1:], len(items))
    for k, r in enumerate(picked):
        np.testing.assert_array_equal(items[offsets[k]:ends[k]], np.flatnonzero(dense[r]))
        np.testing.assert_array_equal(values[offsets[k]:ends[k]], dense[r][dense[r] > 0])


@pytest.mark.parametrize("marker, what", [("_delta_log/", "a Delta Lake table"), (".hoodie/", "an Apache Hudi table"),
                                          ("metadata/v1.metadata.json", "an Apache Iceberg table")])
@pytest.mark.parametrize("spelled", ["folder", "glob", "partition"])
def test_a_table_formats_folder_is_refused_however_the_path_names_it(tmp_path, source, marker, what, spelled):
    table = tmp_path / "table"
    data = table / ("data" if marker.startswith("metadata") else "") / "dt=1"
    data.mkdir(parents=True)
    source.write_parquet(data / "part-0.parquet")
    (table / marker).parent.mkdir(parents=True, exist_ok=True)
    (table / marker).mkdir() if marker.endswith("/") else (table / marker).write_text("{}")
    path = {"folder": str(table), "glob": str(table / "**" / "*.parquet"), "partition": str(data)}[spelled]
    with pytest.raises(errors.InputNotFoundError, match=f"is inside {what}"):
        read_interactions(InputConfig(path))
