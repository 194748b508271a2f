"""Stage 3: train the autoencoder on the CSR matrix (CUDA when available, else CPU)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from aefeatures import errors
from aefeatures.config import ModelConfig
from aefeatures.evaluate import KEY_METRIC
from aefeatures.matrix import CSR, InteractionMatrix
from aefeatures.model import Autoencoder, AutoencoderShape, SparseBatch, kl_divergence, multinomial_nll

log = logging.getLogger(__name__)


Validator = Callable[[Autoencoder], dict[str, float]]


@dataclass
class TrainResult:
    model: Autoencoder  # in eval mode, with the best epoch's weights when validated
    device: str
    epoch_losses: list[float] = field(default_factory=list)  # mean loss per user, per epoch
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, beta, metrics
    best_epoch: int = 0  # 1-based epoch whose weights the model holds (0: untrained)
    stopped_early: bool = False
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


def to_batch(vectors: InteractionMatrix | CSR, rows: np.ndarray, device: torch.device) -> SparseBatch:
    """The users at ``rows`` as a :class:`SparseBatch` on ``device`` (never densified)."""
    offsets, indices, values = vectors.gather(rows)
    lengths = np.diff(np.append(offsets, len(indices)))
    positions = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return SparseBatch(put(indices.astype(np.int64)), put(offsets), put(values), put(positions))


def train(matrix: InteractionMatrix, cfg: ModelConfig, *, rows: np.ndarray | None = None,
          validate: Validator | None = None, progress: bool | None = None) -> TrainResult:
    """Train an autoencoder on the users at ``rows`` of ``matrix`` (default: all of them).

    With ``validate``, the model is scored after every epoch; training stops once
    ``cfg.patience`` epochs pass without a better ``validate(model)[KEY_METRIC]``, and the
    best epoch's weights are restored. Seeded: the same matrix and config give the same
    weights on the same device. ``progress=None`` shows a bar only on a terminal.
    """
    # --- setup: seed, device, model, optimizer, fixed once here
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = select_device(cfg.device)
    shape = AutoencoderShape(matrix.shape[1], cfg.dim, tuple(cfg.hidden), cfg.kind, cfg.dropout)
    model = Autoencoder(shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult(model=model, device=str(device))
    rows = np.arange(matrix.shape[0]) if rows is None else rows
    best_score, best_state = -np.inf, None
    started = time.perf_counter()

    # --- training loop: one shuffled pass over the users per epoch, then validation
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=_bar_off(progress))
    for epoch in bar:
        model.train()
        loss, beta = _epoch(model, optimizer, matrix, rng.permutation(rows), cfg, result, device)
        record = {"epoch": epoch, "loss": round(loss, 5), "beta": round(beta, 5)}
        if validate is not None:
            record.update(validate(model))
            if record[KEY_METRIC] > best_score:
                best_score, result.best_epoch = record[KEY_METRIC], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif cfg.patience and epoch - result.best_epoch >= cfg.patience:
                result.stopped_early = True
        else:
            result.best_epoch = epoch
        result.epoch_losses.append(loss)
        result.history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", KEY_METRIC)})
        if result.stopped_early:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    model.eval()
    log.info("trained %d epochs (%d steps) on %s in %.1fs; best epoch %d", len(result.history),
             result.steps, device, result.seconds, result.best_epoch)
    return result


def _epoch(model: Autoencoder, optimizer: torch.optim.Optimizer, matrix: InteractionMatrix,
           order: np.ndarray, cfg: ModelConfig, result: TrainResult, device: torch.device) -> tuple[float, float]:
    """One pass over the users in ``order``: (mean loss per user, last KL weight)."""
    total, beta = torch.zeros((), device=device), 0.0
    for start in range(0, len(order), cfg.batch_size):
        batch = to_batch(matrix, order[start : start + cfg.batch_size], device)
        logits, mean, logvar = model(batch)
        loss = multinomial_nll(logits, batch)
        if logvar is not None:
            beta = kl_weight(result.steps, cfg)
            loss = loss + beta * kl_divergence(mean, logvar)
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * batch.size  # stays on the device: no host sync per step
        result.steps += 1
    return float(total) / max(len(order), 1), beta


def kl_weight(step: int, cfg: ModelConfig) -> float:
    """β of a vae at optimizer ``step``: linear from 0, reaching ``cfg.beta_cap`` after
    ``cfg.anneal_steps`` steps and staying there."""
    return min(cfg.beta_cap, cfg.beta_cap * step / cfg.anneal_steps)


def _bar_off(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
