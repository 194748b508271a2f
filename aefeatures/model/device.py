"""Where training runs and how users reach it: the device (CUDA when there is one), its
precision, and batches of users cut from the CSR matrix for it."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np
import torch

from aefeatures import errors
from aefeatures.data.matrix import CSR, InteractionMatrix
from aefeatures.model import distributed
from aefeatures.model.autoencoder import SparseBatch


def select_device(requested: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU. Under torchrun a CUDA
    rank uses the GPU numbered by its ``LOCAL_RANK``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise errors.BadInputError(
            f"`model.device` = {requested!r} but no CUDA device is available on this machine. "
            'Set `model.device = "auto"` to fall back to the CPU.'
        )
    group = distributed.current()
    if requested == "cuda" and group is not None:
        return torch.device("cuda", group.local_rank)
    return torch.device(requested)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32. ``auto`` picks bf16 on CUDA devices that have
    it. On CPUs it stays fp32; ``bf16`` there runs the decoder's products in bf16 inside the
    fused kernel (:class:`aefeatures.model.kernels.Workspace`): on a CPU with bf16 matrix units 12-15%
    faster per step at the ML-20M shape, same validation NDCG within 0.001. Not the default:
    the gain is modest, and on CPUs without those units bf16 products are slower."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def to_batch(vectors: InteractionMatrix | CSR, rows: np.ndarray, device: torch.device) -> SparseBatch:
    """The users at ``rows`` as a :class:`SparseBatch` on ``device`` (never densified).

    For a GPU the CSR slice is copied from pinned memory without blocking the host.
    """
    offsets, indices, values = vectors.gather(rows)
    lengths = np.diff(np.append(offsets, len(indices)))
    positions = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    pin = device.type == "cuda"

    def put(a: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(a)
        return (host.pin_memory() if pin else host).to(device, non_blocking=True)

    return SparseBatch(put(indices.astype(np.int64)), put(offsets), put(values), put(positions))


class DeviceCSR:
    """A CSR copied to a GPU once, from which batches are cut there.

    Cutting each batch on the host (:func:`to_batch`) took ~5 ms at batch 1024, more than the
    GPU's own work for a step at the ML-20M shape; here the host computes only each user's
    start and length, one small copy, and the entries are gathered on the GPU with no sync.
    """

    SHARE_OF_FREE_MEMORY = 0.25  # larger CSRs stay on the host: the model and its state need room

    def __init__(self, csr: CSR, device: torch.device):
        self.indptr, self.device = csr.indptr, device
        self.indices = torch.from_numpy(csr.indices).to(device)  # int32: half the bytes
        self.values = torch.from_numpy(csr.values).to(device)

    @classmethod
    def fits(cls, csr: CSR, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return csr.indices.nbytes + csr.values.nbytes <= cls.SHARE_OF_FREE_MEMORY * free

    def batch(self, rows: np.ndarray) -> SparseBatch:
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        offsets = np.cumsum(lengths) - lengths
        nnz = int(lengths.sum())
        # One pinned copy of (lengths, offsets, shift): entry e of user i is at shift[i] + e.
        small = torch.from_numpy(np.stack([lengths, offsets, starts - offsets]))
        if self.device.type == "cuda":
            small = small.pin_memory()
        lengths_d, offsets_d, shift = small.to(self.device, non_blocking=True)
        positions = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lengths_d,
                                            output_size=nnz)
        entries = torch.arange(nnz, device=self.device) + shift[positions]
        return SparseBatch(self.indices[entries].long(), offsets_d, self.values[entries], positions)


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """torch's autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def batch_cutter(matrix: InteractionMatrix, device: torch.device) -> Callable[[np.ndarray], SparseBatch]:
    """A function from user rows to their :class:`SparseBatch` on ``device``: cut on the GPU from
    a :class:`DeviceCSR` when the matrix fits there, else on the host (:func:`to_batch`)."""
    if DeviceCSR.fits(matrix.csr, device):
        return DeviceCSR(matrix.csr, device).batch
    return lambda users: to_batch(matrix, users, device)
