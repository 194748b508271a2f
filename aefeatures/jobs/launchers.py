"""Running a job on a torch.distributed process group that another launcher started.

``torchrun -m aefeatures run JOB.toml`` needs none of this. Launchers that start the workers and
their process group themselves — Ray Train's ``TorchTrainer``, Spark's ``TorchDistributor``, a
Kubernetes PyTorchJob whose pods call Python — call :func:`run_on_this_rank` on every worker
(or hand :func:`ray_train_loop` to ``TorchTrainer``). Each rank then reads and fits its own
users exactly as under torchrun (:mod:`aefeatures.model.distributed`), and rank 0 publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aefeatures.config import load_job_config
from aefeatures.jobs.run import run_job


def run_on_this_rank(job: str | Path, *, force: bool = False) -> dict[str, Any] | None:
    """Run the job file ``job`` (an absolute path: launchers move workers' working folders) as
    this rank of the process group the launcher set up, or of the one its ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` describe.

    Returns rank 0's summary ``{"name", "version", "status", "path"}`` on rank 0 and None on
    the other ranks, once their part is written. Raises what :func:`aefeatures.jobs.run.run_job`
    raises (``BadInputError``, ``GateRefusedError``, ``LockHeldError``...).
    """
    try:
        result = run_job(load_job_config(Path(job)), force=force, progress=False)
    except SystemExit as exc:  # a rank other than 0, its part written: run_job's torchrun exit
        if exc.code not in (0, None):
            raise
        return None
    return {"name": result.name, "version": result.version, "status": result.status, "path": str(result.path)}


def ray_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for Ray Train's ``TorchTrainer``: ``config`` is
    ``{"job": "/abs/path/job.toml", "force": False}``. Every worker reports once
    (``ray.train.report``; rank 0's report carries the published version, which Ray keeps in
    ``Result.metrics`` where its version keeps metrics without a checkpoint); the store and its
    run log are the record."""
    from ray import train  # the `ray` extra: `pip install 'aefeatures[ray]'`

    summary = run_on_this_rank(config["job"], force=bool(config.get("force", False)))
    train.report(summary or {})
