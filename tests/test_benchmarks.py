"""The stage benchmark at its smallest scale: the harness runs and reports every stage with a
floor and a ratio. Checks the harness's correctness only, never how fast anything is."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.slow  # trains or benchmarks whole jobs; the fast lane leaves it out

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = ["read_csr", "train_epoch", "embed", "write", "index_build", "lookup_single", "lookup_batch"]


def load(name: str):
    """A module of benchmarks/ (scripts, not a package) under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pipeline.py"), "--scale", "0.005", "--data-dir", str(out / "data"),
         "--work-dir", str(out / "work"), "--json-out", str(out / "result.json"),
         "--markdown-out", str(out / "result.md"), "--lookups", "50", "--batch-lookups", "300"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text()), (out / "result.md").read_text()


def test_every_stage_has_a_time_a_floor_and_a_ratio(smoke):
    result, _ = smoke
    (run,) = result["runs"]
    assert [row["stage"] for row in run["stages"]] == STAGES
    for row in run["stages"]:
        assert row["seconds"] > 0, row["stage"]
        assert row["floor"]["seconds"] > 0 and row["floor"]["what"], row["stage"]
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor"]["seconds"]), row["stage"]


def test_memory_and_conditions_are_recorded(smoke):
    result, _ = smoke
    (run,) = result["runs"]
    assert run["job_peak_rss_mb"] >= max(row["peak_rss_mb"] for row in run["stages"]) > 0
    assert all(row["peak_rss_mb"] >= row["rss_before_mb"] * 0.5 for row in run["stages"])
    train = run["stages"][STAGES.index("train_epoch")]
    assert train["floor"]["gflops"] > 0 and train["floor"]["bf16"]["gflops"] > 0
    assert train["detail"]["start_up_seconds"] > 0  # paid before the epoch, reported apart
    assert run["matrix"]["nnz"] == run["data"]["rows"]  # the generator writes distinct pairs
    assert result["machine"]["cores"] >= 1 and result["versions"]["torch"]


def test_markdown_has_a_row_per_stage(smoke):
    result, table = smoke
    labels = [row["label"] for row in result["runs"][0]["stages"]]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| stage", "| ---"))]
    assert len(rows) == len(STAGES)
    assert all(label in row for label, row in zip(labels, rows))
    assert "of one-time start-up" in table


def test_data_is_ml20m_shaped_and_cached_by_its_parameters(tmp_path):
    mlshape = load("mlshape")
    shape = mlshape.shape_for(0.002, seed=3)
    folder, facts = mlshape.ensure(shape, tmp_path)
    assert not facts["cached"] and facts["files"] >= 2
    frame = pl.read_parquet(mlshape.part_files(folder))
    assert frame.columns == ["user_id", "item_id", "rating", "timestamp"]
    assert frame.height == facts["rows"] == frame.n_unique(["user_id", "item_id"])
    assert abs(frame.height - shape.interactions) < 0.02 * shape.interactions
    assert frame.get_column("user_id").n_unique() == shape.users
    assert frame.group_by("user_id").len().get_column("len").min() >= mlshape.MIN_PER_USER
    assert frame.get_column("timestamp").is_sorted()  # logs arrive in time order

    again, facts_again = mlshape.ensure(shape, tmp_path)
    assert again == folder and facts_again["cached"]
    other, _ = mlshape.ensure(mlshape.shape_for(0.002, seed=4), tmp_path)
    assert other != folder


def test_plot_draws_every_scale(smoke, tmp_path):
    pytest.importorskip("matplotlib")
    report = load("report")
    result, _ = smoke
    bigger = copy.deepcopy(result["runs"][0])
    bigger["matrix"]["nnz"] *= 10
    for row in bigger["stages"]:
        row["seconds"] *= 10
    report.plot({**result, "runs": [result["runs"][0], bigger]}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Time per stage" in report.markdown({**result, "runs": [result["runs"][0], bigger]})


def test_a_longer_tail_reaches_more_of_a_large_catalogue(tmp_path):
    mlshape = load("mlshape")
    default, zipf = mlshape.shape_for(0.01, items=50_000), mlshape.shape_for(0.01, items=50_000, popularity_exponent=1.0)
    assert default.cache_name != zipf.cache_name and "-pe" not in default.cache_name  # old caches stay valid
    seen = {}
    for shape in (default, zipf):
        folder, _ = mlshape.ensure(shape, tmp_path)
        seen[shape.popularity_exponent] = pl.read_parquet(mlshape.part_files(folder)).get_column("item_id").n_unique()
    assert seen[1.0] > 2 * seen[mlshape.POPULARITY_EXPONENT]


def test_the_large_catalogue_benchmark_times_sparse_training_and_compares_the_softmaxes(tmp_path):
    # Tiny shapes; the large part's threshold lowered so that it takes the sampled, sparse path.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "large_catalogue.py"), "--large-items", "20000", "--large-scale", "0.02",
         "--full-softmax-max-items", "1000", "--compare-items", "2000", "--compare-scale", "0.01", "--epochs", "2",
         "--compare-epochs", "2", "--compare-seeds", "2", "--valid-users", "100", "--data-dir", str(tmp_path / "data"),
         "--json-out", str(tmp_path / "result.json"), "--markdown-out", str(tmp_path / "result.md")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    large, compare = result["large"], result["compare"]
    assert large["sparse_updates"] and large["valid_users"] == 100
    assert [len(large["result"]["epochs"]), large["peak_rss_mb"] > 0] == [2, True]
    for epoch in large["result"]["epochs"]:
        assert epoch["seconds_per_step"] > 0 and 0 <= epoch["ndcg@100"] <= 1
    assert 0 < large["popularity"]["recall@20"] < 1
    assert list(compare["arms"]) == ["full softmax, dense Adam", "sampled softmax, dense updates",
                                     "sampled softmax, sparse updates"]
    for arm in compare["arms"].values():  # one training per seed, the mean between the extremes
        assert len(arm["runs"]) == 2 and arm["recall@20 range"][0] <= arm["recall@20"] <= arm["recall@20 range"][1]
    table = (tmp_path / "result.md").read_text()
    assert "| popularity |" in table and "| sampled softmax, sparse updates |" in table


def test_the_faiss_kinds_benchmark_searches_every_kind_as_lookups_do(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "faiss_kinds.py"), "--items", "5000", "--queries", "100",
         "--json-out", str(tmp_path / "kinds.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {row["kind"]: row for row in json.loads((tmp_path / "kinds.json").read_text())["results"]}
    assert results["flat"]["recall@20"] == 1.0
    for kind in ("hnsw", "ivf", "ivfpq"):  # approximate, over rows on a sphere one column wider than the queries
        assert 0 < results[kind]["recall@20"] <= 1 and results[kind]["single_qps"] > 0


def test_the_gpu_check_runs_its_cpu_parts_without_a_gpu(tmp_path):
    """CI has no GPU: the check still trains the small job on the CPU with both softmaxes and
    times CPU steps against their floor, and says the GPU parts were skipped."""
    done = subprocess.run(
        # 0.002 of the ML-20M shape (280 users × 3,045 items) still runs every CPU part: the dlae fit
        # and default training, a dae epoch against its floor, the start-up in a fresh process
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--scale", "0.002", "--json-out", str(tmp_path / "gpu.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "skipping the GPU comparison" in done.stdout
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["gpu"] is None and report["failed"] == [] and report["comparison"]["passed"]
    assert list(report["comparison"]["metrics"]) == ["full softmax: cpu fp32", "sampled softmax: cpu fp32"]
    [epoch] = report["epochs"]
    assert epoch["device"] == "cpu" and epoch["batches_cut_on"] == "host" and epoch["extrapolated"]
    assert epoch["floor_seconds"] > 0 and epoch["ratio_to_floor"] > 0


def test_the_gpu_checks_wide_data_puts_each_copy_on_its_own_items(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # gpu_check imports floors as a script does
    gpu_check = load("gpu_check")
    block = gpu_check.planted_matrix(n_users=60, n_items=40, mean_items=6)
    wide, tall = gpu_check.tiled(block, 3, widen=True), gpu_check.tiled(block, 3)
    n_users, n_items = block.shape
    assert wide.shape == (3 * n_users, 3 * n_items) and tall.shape == (3 * n_users, n_items)
    for copy_ in range(3):
        for user in (0, n_users // 2, n_users - 1):
            row = copy_ * n_users + user
            original = block.indices[block.indptr[user]:block.indptr[user + 1]]
            assert list(wide.indices[wide.indptr[row]:wide.indptr[row + 1]]) == list(original + copy_ * n_items)
            assert list(tall.indices[tall.indptr[row]:tall.indptr[row + 1]]) == list(original)


def test_the_quality_benchmark_compares_a_kind_with_popularity_and_ease(tmp_path):
    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality.py"), "--data", "synthetic", "--users", "400", "--items", "120",
         "--mean-items", "12", "--communities", "4", "--kinds", "dlae", "--seeds", "0", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {row["method"].split(" ")[0].rstrip(","): row for row in json.loads(out.read_text())}
    assert {"popularity", "EASE", "dlae"} <= set(rows)
    for row in rows.values():
        assert 0 < row["ndcg@100"] <= 1 and 0 < row["coverage@20"] <= 1
    assert rows["dlae"]["ndcg@100"] > rows["popularity"]["ndcg@100"]  # planted communities: far above popularity


def test_the_choice_benchmark_scores_every_fit_of_the_search_on_validation_and_test(tmp_path):
    out = tmp_path / "choice.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "choice.py"), "--data", "synthetic", "--users", "400", "--items", "120",
         "--mean-items", "12", "--communities", "4", "--dim", "16", "--neighbours", "3", "--seeds", "0",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    fits = {(r["dropout"], r["l2"]) for r in result["rows"]}
    assert len(fits) >= 4  # every dropout of the search at least
    # each fit alone and with the part, at every popularity exponent
    assert {r["neighbour_weight"] for r in result["rows"]} == {0.0, 3.0}
    for row in result["rows"]:
        assert 0 < row["valid"] <= 1 and 0 < row["test"] <= 1
    (summary,) = result["summary"]
    assert summary["chosen"]["valid"] == max(r["valid"] for r in result["rows"])
    assert summary["chosen_over_best"] == summary["chosen"]["test"] / max(r["test"] for r in result["rows"]) <= 1


def test_movielens_100k_is_read_from_the_recbole_wheel_or_its_inter_file(tmp_path):
    import zipfile

    quality = load("quality")
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t1\n1\t11\t3\t2\n2\t10\t4\t3\n"
    inter = tmp_path / "ml-100k.inter"
    inter.write_text(text)
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(quality.ML100K_MEMBER, text)
    for path in (inter, wheel):
        frame = quality.load_ml100k(path)
        assert frame.sort("user_id", "item_id").rows() == [(1, 10), (2, 10)]  # ratings of 4 and 5 only


def test_the_whole_run_benchmark_times_the_cli_job_and_reports_every_fit(tmp_path):
    out = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "whole_run.py"), "--scale", "0.003", "--data-dir", str(tmp_path / "data"),
         "--work-dir", str(tmp_path), "--json-out", str(out), "--markdown-out", str(tmp_path / "run.md"),
         "--model", "dim = 32"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["model"]["kind"] == "dlae" and result["model"]["dim"] == 32
    assert result["run_seconds"] > result["training_seconds"] > 0 and result["peak_rss_mb"] > 0
    assert result["refit"]["status"] == "published" and result["run_over_one_fit"] > 1
    chosen = result["chosen"]
    assert any(fit["dropout"] == chosen["dropout"] and fit["l2"] == chosen["l2"] for fit in result["fits"])
    assert "published ml20m version" in result["stdout"]
    table = (tmp_path / "run.md").read_text()
    assert table.count("\n| ") == len(result["fits"]) + 2  # the header, its rule and one row per fit


def test_the_engine_benchmark_times_the_default_training_beside_an_ease_grid_on_real_data(tmp_path):
    """On the IBM articles (../shared/data): the EASE grid's 9 fits, the default training with
    its validation NDCG@100, and every search fit with its path and a positive floor."""
    engine = load("engine")
    assert engine.IBM.is_file(), f"{engine.IBM}: the shared real data the benchmark reads"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "engine.py"), "--data", "ibm",
                           "--json-out", str(tmp_path / "engine.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "engine.json").read_text())
    assert report["header"]["users"] == 5148 and report["header"]["items"] == 714
    assert report["ease_grid"]["fits"] == 9 and report["ease_grid"]["seconds"] > 0
    training = report["default_training"]
    assert 0 < training["valid_ndcg@100"] < 1 and set(training["chosen"]) == {"dropout", "l2", "popularity_exponent"}
    assert len(training["fits"]) >= 5 and all(f["method"] == "items" and f["floor_seconds"] > 0 for f in training["fits"])
    assert report["ratio_to_ease_grid"] > 0


def test_the_history_lookup_benchmark_times_both_entry_points_beside_a_known_user(tmp_path):
    out = tmp_path / "history.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "history_lookup.py"), "--items", "3000", "--users", "1500", "--lookups", "20",
         "--hidden", "32", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["via"] for r in rows] == ["python", "http"]
    for row in rows:
        assert row["known_p99_ms"] > 0 and row["history_p99_ms"] > 0
        assert row["ratio_p99"] == pytest.approx(row["history_p99_ms"] / row["known_p99_ms"], rel=0.01)


def test_the_fold_in_benchmark_measures_held_out_users_and_hidden_items(tmp_path):
    out = tmp_path / "fold_in.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fold_in.py"), "--data", "synthetic", "--users", "1500", "--items", "400",
         "--min-users", "1,5", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = json.loads(out.read_text())["lines"]
    by = {(r["row"], r["method"]): r for r in lines}
    assert by[("a", "fold-in / retrain")]["ndcg@100"] == pytest.approx(
        by[("a", "fold-in")]["ndcg@100"] / by[("a", "retrain")]["ndcg@100"], rel=1e-3)
    assert by[("b", "no fold-in")]["hidden_ndcg@100"] == 0  # hidden items are never recommended without it
    folded = by[("b", "fold-in, >= 1 users")]
    assert folded["folded"] == folded["hidden"] == 40 and folded["hidden_ndcg@100"] > by[("b", "popularity")][
        "hidden_ndcg@100"]
    assert "| b | fold-in, >= 5 users |" in done.stdout
