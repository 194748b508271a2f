"""The quality gate: a bad model is refused, kept aside, listed, and LATEST stays put."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures.cli.app import cli
from aefeatures.config import GateConfig, load_job_config
from aefeatures.errors import GateRefusedError
from aefeatures.jobs.run import run_job
from aefeatures.quality.gate import check
from aefeatures.store import layout
from tests.conftest import write_job


def _evaluation(score, popularity):
    return {"model": {"ndcg@100": score}, "popularity": {"ndcg@100": popularity}}


def test_gate_rules():
    previous = {"version": "v1", "evaluation": _evaluation(0.5, 0.1)}
    assert check(GateConfig(), _evaluation(0.46, 0.1), previous).passed
    refused = check(GateConfig(min_ratio=0.95), _evaluation(0.46, 0.1), previous)
    assert not refused.passed and "below 0.95 × the live version's 0.5000" in refused.reasons[0]
    below_pop = check(GateConfig(), _evaluation(0.09, 0.1), None)
    assert not below_pop.passed and "not above popularity's 0.1000" in below_pop.reasons[0]
    assert check(GateConfig(beat_popularity=False, min_ratio=0), _evaluation(0.01, 0.1), previous).passed
    assert check(GateConfig(), None, previous).passed  # evaluation off: nothing to compare


def test_max_churn_refuses_unstable_recommendations():
    drift = {"churn": {"users": 1000, "k": 10, "mean": 0.4}}
    assert check(GateConfig(), _evaluation(0.5, 0.1), None, drift=drift).passed  # 1.0: off
    assert check(GateConfig(max_churn=0.5), _evaluation(0.5, 0.1), None, drift=drift).passed
    refused = check(GateConfig(max_churn=0.3), _evaluation(0.5, 0.1), None, drift=drift)
    assert not refused.passed and "churn against the live version is 0.400, above `gate.max_churn` = 0.3" \
        in refused.reasons[0]
    assert check(GateConfig(max_churn=0.3), _evaluation(0.5, 0.1), None, drift=None).passed  # first version


def test_the_gate_can_require_a_share_of_the_ease_reference():
    evaluation = {**_evaluation(0.30, 0.1), "reference": {"method": "EASE", "lambda": 100.0, "ndcg@100": 0.40}}
    verdict = check(GateConfig(), evaluation, None)  # off by default, the ratio still recorded
    assert verdict.passed and verdict.checked["vs_reference"] == 0.75
    refused = check(GateConfig(min_vs_reference=0.9), evaluation, None)
    assert not refused.passed
    assert refused.reasons == ["validation ndcg@100 0.3000 is below 0.9 × EASE's 0.4000 (= 0.3600, "
                               "`gate.min_vs_reference`)"]
    assert check(GateConfig(min_vs_reference=0.7), evaluation, None).passed
    skipped = {**_evaluation(0.30, 0.1), "reference": {"method": "EASE", "skipped": "too large"}}
    assert check(GateConfig(min_vs_reference=0.9), skipped, None).passed  # nothing to compare with


def test_a_run_below_the_reference_share_is_refused(tmp_path):
    job = write_job(tmp_path, model={"epochs": 1}, gate={"min_vs_reference": 0.99, "beat_popularity": False})
    with pytest.raises(GateRefusedError, match="min_vs_reference"):
        run_job(load_job_config(job), progress=False)


def test_a_bad_model_is_refused_and_latest_stays_on_the_good_version(tmp_path):
    good = run_job(load_job_config(write_job(tmp_path, model={"epochs": 20})), progress=False)
    bad_job = write_job(tmp_path, model={"epochs": 0}, filename="bad.toml")
    with pytest.raises(GateRefusedError, match="quality gate refused version") as caught:
        run_job(load_job_config(bad_job), progress=False)
    root = tmp_path / "store"
    assert layout.live_version(root, "movies") == good.version
    assert layout.list_versions(root, "movies") == [good.version]
    kept = root / "movies" / "refused" / caught.value.version
    assert (kept / "manifest.json").is_file() and (kept / "report.html").is_file()
    assert not json.loads((kept / "manifest.json").read_text())["gate"]["passed"]
    assert aefeatures.open_store(root)["movies"].version == good.version

    result = CliRunner().invoke(cli, ["run", str(bad_job)])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: quality gate refused version") and "LATEST stays on" in result.stderr
    listed = json.loads(CliRunner().invoke(cli, ["versions", "--store", str(root), "--json"]).stdout)["versions"]
    assert [v["status"] for v in listed] == ["live", "refused", "refused"]


def test_evaluate_shows_metrics_and_the_report_exists(trained):
    root, result = trained
    out = CliRunner().invoke(cli, ["evaluate", "--store", str(root), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["version"] == result.version and data["gate"]["passed"]
    assert set(data["evaluation"]["model"]) >= {"recall@20", "ndcg@10", "ndcg@100", "coverage@20"}
    human = CliRunner().invoke(cli, ["evaluate", "--store", str(root)])
    assert "popularity" in human.stdout and "quality gate: passed" in human.stdout
    reference = data["evaluation"]["reference"]  # EASE on the same split, shown everywhere
    assert reference["method"] == "EASE" and 0 < reference["ndcg@100"] <= 1
    assert f"EASE (λ={reference['lambda']:g})" in human.stdout and "model / EASE ndcg@100" in human.stdout
    versions = CliRunner().invoke(cli, ["versions", "--store", str(root), "--json"])
    assert json.loads(versions.stdout)["versions"][-1]["ease_ndcg@100"] == reference["ndcg@100"]
    page = (result.path / "report.html").read_text()
    assert "<svg" in page and "validation ndcg@100" in page and "popularity" in page
    assert "EASE (λ=" in page and "× EASE's validation ndcg@100" in page


def test_an_index_below_the_recall_floor_is_refused(tmp_path):
    assert not check(GateConfig(), None, None, index_recall=0.5, min_recall=0.95).passed
    job = write_job(tmp_path, model={"epochs": 5}, index={"kind": "IVF16,PQ1x4", "min_recall": 0.99})
    with pytest.raises(GateRefusedError, match=r"recall@10 against exact search is 0\.\d+, below `index.min_recall` = 0.99"):
        run_job(load_job_config(job), progress=False)
    assert not (tmp_path / "store" / "movies" / "LATEST").exists()


def test_a_refused_first_version_is_listed_and_its_runs_shown(tmp_path):
    job = write_job(tmp_path, model={"epochs": 0})
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(job)]).exit_code == 3
    root = str(tmp_path / "store")
    for args in (["--name", "movies"], []):
        out = runner.invoke(cli, ["versions", "--store", root, "--json", *args])
        assert out.exit_code == 0, out.output
        assert [v["status"] for v in json.loads(out.stdout)["versions"]] == ["refused"]
    table = runner.invoke(cli, ["versions", "--store", root])
    assert table.exit_code == 0 and "refused" in table.stdout
    runs = runner.invoke(cli, ["runs", "--store", root, "--json"])
    assert runs.exit_code == 0 and json.loads(runs.stdout)["runs"][-1]["status"] == "refused"

    (tmp_path / "empty").mkdir()
    empty = runner.invoke(cli, ["runs", "--store", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "holds no feature set yet" in empty.stderr and "(any)" not in empty.stderr


@pytest.mark.parametrize("trained_kind", ["dlae"], indirect=True)
def test_a_dlae_report_tables_its_closed_form_fits(trained_kind):
    _, result = trained_kind
    page = (result.path / "report.html").read_text()
    training = result.manifest["training"]
    assert "Closed-form fits" in page and "training loss per user" not in page  # no loss curve: no epochs
    rows = re.findall(r"<tr( style=\"font-weight:bold\")?><th>(\d+)</th>", page)
    assert [int(n) for _, n in rows] == [h["epoch"] for h in training["history"]]
    assert [int(n) for bold, n in rows if bold] == [training["best_epoch"]]  # the kept fit in bold
    chosen = training["chosen"]
    kept = page.split('<tr style="font-weight:bold">', 1)[1].split("</tr>", 1)[0]
    assert f"<td>{chosen['dropout']:g}</td><td>{chosen['l2']:g}</td><td>{chosen['popularity_exponent']:g}</td>" in kept


def test_the_ease_ratio_line_warns_when_eases_lambda_is_at_its_grid_edge(capsys):
    from aefeatures.cli.output import echo_metrics

    row = {"recall@20": 0.3, "ndcg@10": 0.3, "ndcg@100": 0.4, "coverage@20": 0.1}
    evaluation = {"valid_users": 100, "holdout": 0.2, "model": row, "popularity": row,
                  "reference": {"method": "EASE", "lambda": 1e6, **row, "ndcg@100": 0.2, "at_grid_edge": True}}
    echo_metrics(evaluation)
    assert "model / EASE ndcg@100: 2.000 (EASE's λ is at the edge of its grid" in capsys.readouterr().out
    evaluation["reference"]["at_grid_edge"] = False
    echo_metrics(evaluation)
    assert "model / EASE ndcg@100: 2.000\n" in capsys.readouterr().out
