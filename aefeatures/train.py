"""Stage 3: train the autoencoder on the CSR matrix (CUDA when available, else CPU)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from aefeatures import errors
from aefeatures.config import ModelConfig
from aefeatures.matrix import InteractionMatrix
from aefeatures.model import Autoencoder, AutoencoderShape, SparseBatch, kl_divergence, multinomial_nll

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Autoencoder  # in eval mode
    device: str
    epoch_losses: list[float] = field(default_factory=list)  # mean loss per user, per epoch
    steps: int = 0
    seconds: float = 0.0


def select_device(requested: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise errors.BadInputError(
            f"`model.device` = {requested!r} but no CUDA device is available on this machine. "
            'Set `model.device = "auto"` to fall back to the CPU.'
        )
    return torch.device(requested)


def to_batch(matrix: InteractionMatrix, rows: np.ndarray, device: torch.device) -> SparseBatch:
    """The users at ``rows`` as a :class:`SparseBatch` on ``device`` (never densified)."""
    offsets, indices, values = matrix.gather(rows)
    lengths = np.diff(np.append(offsets, len(indices)))
    positions = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return SparseBatch(put(indices.astype(np.int64)), put(offsets), put(values), put(positions))


def train(matrix: InteractionMatrix, cfg: ModelConfig, *, progress: bool | None = None) -> TrainResult:
    """Train an autoencoder on every user of ``matrix`` for ``cfg.epochs`` epochs.

    Seeded: the same matrix and config give the same weights on the same device.
    ``progress=None`` shows a bar only on a terminal.
    """
    # --- setup: seed, device, model, optimizer, fixed once here
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = select_device(cfg.device)
    shape = AutoencoderShape(matrix.shape[1], cfg.dim, tuple(cfg.hidden), cfg.kind, cfg.dropout)
    model = Autoencoder(shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult(model=model, device=str(device))
    n_users = matrix.shape[0]
    started = time.perf_counter()

    # --- training loop: one shuffled pass over the users per epoch
    model.train()
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=_bar_off(progress))
    for _ in bar:
        order = rng.permutation(n_users)
        total = torch.zeros((), device=device)
        for start in range(0, n_users, cfg.batch_size):
            batch = to_batch(matrix, order[start : start + cfg.batch_size], device)
            logits, mean, logvar = model(batch)
            loss = multinomial_nll(logits, batch)
            if logvar is not None:
                beta = min(cfg.beta_cap, cfg.beta_cap * result.steps / cfg.anneal_steps)
                loss = loss + beta * kl_divergence(mean, logvar)
            loss = loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * batch.size  # stays on the device: no sync per step
            result.steps += 1
        result.epoch_losses.append(float(total) / n_users)
        bar.set_postfix(loss=f"{result.epoch_losses[-1]:.3f}")

    result.seconds = time.perf_counter() - started
    model.eval()
    log.info("trained %d epochs (%d steps) on %s in %.1fs", cfg.epochs, result.steps, device, result.seconds)
    return result


def _bar_off(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
