"""How many CPU threads training may use: the CPUs this process can actually run on.

torch sizes its intra-op pool by the host's core count. A scheduled job often shares a machine
or runs in a container with a CPU quota; threads beyond the CPUs it gets spin on shared cores
and wait for scheduler slices (a run beside one busy-looping process was 30-50x slower). The
budget here is the smallest of the process's CPU set (``sched_getaffinity``) and its cgroup
CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up, at least 1.
This module does not import torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: min(CPU set size, ceil(cgroup quota / period)), at least 1.

    ``cgroup_root`` and ``proc_cgroup`` are parameters for tests; a missing or unreadable file
    means no limit from that source.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The cgroup CPU quota in CPUs (quota / period), or None when there is none.

    Looks at the process's own cgroup and its ancestors (the tightest quota wins), for cgroup v2
    (``cpu.max``: ``"max 100000"`` or ``"200000 100000"``) and v1 (``cpu.cfs_quota_us``, -1 for
    none, and ``cpu.cfs_period_us``).
    """
    limits = []
    for folder in _cgroup_folders(cgroup_root, proc_cgroup):
        v2 = _read(folder / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
            continue
        quota_us, period_us = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota_us and period_us and int(quota_us) > 0:
            limits.append(int(quota_us) / int(period_us))
    return min(limits) if limits else None


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup folder and its ancestors up to ``root``, for v2 and v1's cpu
    controller. Inside a container the path in /proc/self/cgroup is often "/", and ``root``
    itself is the container's cgroup."""
    folders = [root, root / "cpu", root / "cpu,cpuacct"]
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        bases = [root] if not controllers else [root / "cpu", root / "cpu,cpuacct", root / controllers]
        parts = [p for p in path.strip("/").split("/") if p]
        for base in bases:
            for n in range(1, len(parts) + 1):
                folders.append(base.joinpath(*parts[:n]))
    return list(dict.fromkeys(folders))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def training_threads(requested: int) -> int:
    """``requested`` when the job file sets ``model.threads``; else ``OMP_NUM_THREADS`` when the
    environment sets it (an operator's explicit choice); else :func:`available_cpus`, shared
    among the torchrun ranks on this machine (``LOCAL_WORLD_SIZE``)."""
    if requested > 0:
        return requested
    try:
        from_env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        from_env = 0
    if from_env > 0:
        return from_env
    # torchrun ranks on one machine share its CPUs
    return max(1, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
