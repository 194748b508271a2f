"""Shared fixtures: paths to the committed data, a job-file writer, and one trained store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import settings

# CI runs a fixed set of property-test examples (a failure reproduces on every run);
# `pytest --hypothesis-profile explore` searches more widely, with fresh random examples.
settings.register_profile("default", max_examples=40, derandomize=True)
settings.register_profile("explore", max_examples=400)
settings.load_profile("default")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per CPU this process may use, the cgroup's
    quota included (:func:`aefeatures.model.threads.available_cpus`), not the host's count."""
    from aefeatures.model.threads import available_cpus

    return available_cpus()


def _pin_this_worker() -> None:
    """Under pytest-xdist, keep worker gwN (and the processes it starts) on one CPU of its own:
    the code under test sizes its thread pools by the CPUs it may use, so two workers never
    run four threads on two cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if count <= len(cpus):
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


_pin_this_worker()


def _refuse_constant(name: str):
    raise ValueError(f"non-strict JSON: {name} is not a JSON number (RFC 8259)")


_loads = json.loads


def _strict_loads(text, *args, **kwargs):
    kwargs.setdefault("parse_constant", _refuse_constant)
    return _loads(text, *args, **kwargs)


@pytest.fixture(autouse=True)
def strict_json_everywhere(monkeypatch):
    """Every JSON the suite parses (CLI output, HTTP answers, manifests) must be strict RFC 8259:
    NaN, Infinity and -Infinity fail the test that reads them. (Published tables are checked
    finite by every run itself, before it publishes: `store.publish.check_finite`.)"""
    monkeypatch.setattr(json, "loads", _strict_loads)


REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"

# Small but real: enough epochs for the planted structure to show, fast on 2 cores.
FAST_MODEL = {"kind": "dae", "dim": 32, "hidden": [128], "epochs": 30, "batch_size": 256, "seed": 0,
              "min_steps": 0}  # tests run exactly `epochs`
# Held-out items validates every user with 2 items (2,018 of the fixture's 2,030); 1,000 of them
# rank as many users as held-out users did, at half the suite's validation cost.
FAST_EVALUATION = {"max_valid_users": 1000}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_job(folder: Path, *, name: str = "movies", store: Path | None = None,
              input: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
              index: dict[str, Any] | None = None, gate: dict[str, Any] | None = None,
              evaluation: dict[str, Any] | None = None, filename: str = "job.toml") -> Path:
    """Write a job file into ``folder`` (defaults: the committed fixture, a fast model)."""
    sections = {
        "job": {"name": name, "store": str(store or folder / "store")},
        "input": input or {"path": str(FIXTURES / "interactions.parquet"), "weight_col": "rating",
                           "timestamp_col": "timestamp", "min_weight": 4.0},
        "model": {**FAST_MODEL, **(model or {})},
        "index": index or {"kind": "flat"},
        "gate": gate or {},
        "evaluation": {**FAST_EVALUATION, **(evaluation or {})},
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path = folder / filename
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def fixtures_path() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def planted() -> tuple[dict[int, int], dict[int, int]]:
    """(user → community, item → cluster) planted in the committed fixture."""
    users = dict(pl.read_parquet(FIXTURES / "truth_users.parquet").iter_rows())
    items = dict(pl.read_parquet(FIXTURES / "truth_items.parquet").iter_rows())
    return users, items


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One real run of the pipeline on the committed fixture: (store dir, RunResult)."""
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job

    folder = tmp_path_factory.mktemp("trained")
    result = run_job(load_job_config(write_job(folder)), progress=False)
    return folder / "store", result


@pytest.fixture(scope="session", params=["dae", "dlae", "recvae"])
def trained_kind(request, tmp_path_factory):
    """:func:`trained` for every model kind that publishes (vae shares dae's layers): (store dir,
    RunResult)."""
    if request.param == "dae":
        return request.getfixturevalue("trained")
    from aefeatures.config import load_job_config
    from aefeatures.jobs.run import run_job

    folder = tmp_path_factory.mktemp(f"trained_{request.param}")
    result = run_job(load_job_config(write_job(folder, model={"kind": request.param})), progress=False)
    return folder / "store", result


def cli_runner():
    """A CliRunner whose result keeps stdout and stderr apart on every click version."""
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by itself


def strict_loads(text: str):
    """``json.loads`` that fails on NaN, Infinity and -Infinity, which strict JSON has not."""
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)
