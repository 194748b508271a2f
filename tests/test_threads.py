"""Training's thread count: the CPU set and cgroup CPU quota, not the host's cores."""

from __future__ import annotations

import json
import os

import pytest

from aefeatures.model.threads import available_cpus, cgroup_cpu_quota, training_threads


def _cgroup(tmp_path, files: dict[str, str], proc: str = "0::/\n"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


def test_cgroup_v2_quota_in_the_process_cgroup(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu.max": "max 100000", "job/cpu.max": "150000 100000"}, "0::/job\n")
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc) == min(len(os.sched_getaffinity(0)), 2)


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu/box/cpu.cfs_quota_us": "100000", "cpu/box/cpu.cfs_period_us": "100000",
                                    "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
                         "4:memory:/x\n1:cpu:/box\n")
    assert cgroup_cpu_quota(root, proc) == 1.0
    assert available_cpus(root, proc) == 1
    root, proc = _cgroup(tmp_path / "none", {"cpu.max": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_the_job_file_and_then_the_environment_override(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert training_threads(5) == 5 and training_threads(0) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert training_threads(0) == available_cpus()


def test_the_manifest_records_the_threads(trained):
    _, result = trained
    manifest = json.loads((result.path / "manifest.json").read_text())
    expected = training_threads(manifest["config"]["model"]["threads"])
    assert manifest["training"]["threads"] == expected >= 1


def test_a_negative_thread_count_is_a_bad_input(tmp_path):
    from aefeatures.config import load_job_config
    from aefeatures.errors import BadInputError
    from tests.conftest import write_job

    with pytest.raises(BadInputError, match="model.threads"):
        load_job_config(write_job(tmp_path, model={"threads": -1}))
