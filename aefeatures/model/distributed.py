"""Training on several processes or machines under `torchrun`; rank 0 publishes.

``torchrun --nproc_per_node=N -m aefeatures run JOB.toml`` starts N copies of the run. Each
joins torch's process group (NCCL on GPUs, gloo on CPUs), or uses the one another launcher
already set up (Ray Train's ``TorchTrainer``, Spark's ``TorchDistributor``:
:mod:`aefeatures.jobs.launchers`); rank 0 alone takes the feature set's
lock and decides whether to train (the input may be up to date) and tells the others
(:class:`TrainSignal`). If it trains, each rank reads only its own contiguous range of users
(``read_interactions(shard=...)``) with the union of all ranks' items, and trains a
DistributedDataParallel copy of the model on batches of its own users, gradients averaged over
the ranks. Validation totals are summed over all ranks' validation users, so every rank makes the
same early-stopping decision. Each rank then embeds its users and writes their part files into
the version rank 0 staged; rank 0 joins the parts and publishes, and the other ranks exit
quietly with code 0.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# The other ranks wait for rank 0 while it takes the lock and reads, and while it validates each
# epoch: generous, so a slow validation never reads as a hung collective.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Group:
    """This process's place in the torchrun process group."""

    rank: int
    world_size: int
    local_rank: int  # the GPU this rank drives on its machine

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def from_leader(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the other ranks' ``value`` is ignored)."""
        box = [value if self.is_leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def reduce_array(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """The element-wise ``op`` ("sum" or "max") of ``values`` over all ranks."""
        tensor = torch.from_numpy(np.ascontiguousarray(values)).clone()
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.cpu().numpy()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over all ranks (a new tensor; NCCL needs it on the rank's GPU)."""
        summed = value.clone()
        dist.all_reduce(summed)
        return summed

    def summed(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over all ranks, on ``value``'s device, whatever the backend
        needs (NCCL sums on the rank's GPU, gloo anywhere): the dlae's reduce."""
        if dist.get_backend() == "nccl" and value.device.type != "cuda":
            return self.total(value.cuda()).to(value.device)
        return self.total(value)


_launcher_owns_group = False  # the process group was set up before aefeatures ran (not by torchrun's env)


def launched_by_torchrun() -> bool:
    """True in a process torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> Group | None:
    """The process group this process has joined, or None (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_leader() -> bool:
    """True unless this process is a rank other than 0 of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def process_group(device: str) -> Iterator[Group | None]:
    """Join torchrun's process group for the block; None when torchrun did not start this process.

    ``device`` is the job's ``model.device``: ranks that will train on CUDA use NCCL (each on
    the GPU numbered by its ``LOCAL_RANK``), others gloo. Leaving the block leaves the group
    (:func:`leave`) unless training already did.
    """
    global _launcher_owns_group
    if not launched_by_torchrun():
        yield None
        return
    if dist.is_available() and dist.is_initialized():  # Ray Train, TorchDistributor...: theirs to end
        _launcher_owns_group = True
        yield current()
        leave()
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    group = current()
    log.info("rank %d of %d joined the process group (%s)", group.rank, group.world_size, dist.get_backend())
    try:
        yield group
    except BaseException:
        # No barrier: the other ranks may be inside a different collective. torchrun stops them
        # once this rank exits with an error.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    leave()


def leave() -> None:
    """Leave the process group, if this process is in one; every rank must call it. A group
    another launcher started (Ray Train, Spark's TorchDistributor) is left to it: only the
    barrier, no destruction.

    The barrier first: on gloo, destroying the group without one sometimes crashed a rank
    on exit after it had finished.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if not _launcher_owns_group:
            dist.destroy_process_group()


class TrainSignal:
    """Rank 0 tells the other ranks, once, whether this run trains; they wait for the word."""

    def __init__(self, group: Group | None):
        self.group = group
        self.sent = False

    def start(self) -> None:
        """Rank 0: the run trains; every rank goes on to read and train."""
        self._send(True)

    def cancel(self) -> None:
        """Rank 0: the run does not train (up to date, locked, or failed before training); all
        ranks leave the group. Does nothing once :meth:`start` was sent."""
        if self._send(False):
            leave()

    def wait(self) -> bool:
        """Another rank: whether rank 0 decided to train."""
        return bool(self.group is not None and self.group.from_leader(None))

    def _send(self, train: bool) -> bool:
        if self.group is None or not self.group.is_leader or self.sent:
            return False
        self.sent = True
        self.group.from_leader(train)
        return True
