"""Stage 3: train the autoencoder on the CSR matrix (CUDA when available, else CPU)."""

from __future__ import annotations

import logging
import math
import sys
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from aefeatures import errors
from aefeatures.config import ModelConfig
from aefeatures.data.matrix import InteractionMatrix
from aefeatures.model import distributed, kernels
from aefeatures.model.autoencoder import (
    Autoencoder,
    AutoencoderShape,
    Noise,
    SparseBatch,
    kl_divergence,
    multinomial_nll,
    sampled_multinomial_nll,
)
from aefeatures.model.device import autocast, autocast_dtype, batch_cutter, select_device
from aefeatures.model.optim import DenseAndLazyAdam, LazyAdam, fused_adam
from aefeatures.model.result import TrainResult, Validator
from aefeatures.model.threads import training_threads
from aefeatures.schema import KEY_METRIC

log = logging.getLogger(__name__)
# Progress lines for runs without a terminal (cron, systemd, Airflow): the CLI lets this logger
# through at INFO even without -v, so a scheduled run is never silent for long.
progress_log = logging.getLogger("aefeatures.progress")
PROGRESS_EVERY = 30.0  # seconds between progress lines (the first and last epoch always log one)


def train(matrix: InteractionMatrix, cfg: ModelConfig, *, rows: np.ndarray | None = None,
          validate: Validator | None = None, progress: bool | None = None, epochs: int | None = None,
          deadline: float | None = None, warm: Any = None, folds: Any = (), keep: np.ndarray | None = None
          ) -> TrainResult:
    """Train an autoencoder on the users at ``rows`` of ``matrix`` (default: all of them).

    The budget fits the data: at most ``cfg.epochs`` epochs, a cap raised so that training takes
    at least ``cfg.min_steps`` optimizer steps when an epoch is a few steps (1,000 users at
    batch 512 make 2 steps an epoch: 50 epochs were 100 steps, cut off while still improving).
    ``epochs`` given (a refit for a budget chosen on validation) runs exactly that many.

    With ``validate``, the model is scored after every epoch (every few epochs when the cap was
    raised and an epoch is under :data:`VALIDATE_EVERY_STEPS` steps); once ``cfg.min_steps`` steps are done, training
    stops when ``cfg.patience`` epochs pass without a better ``validate(model)[KEY_METRIC]``,
    and the best epoch's weights are restored. ``deadline`` (a ``time.perf_counter()`` value;
    default ``cfg.max_minutes`` from now, when set) ends training within one optimizer step of
    it, keeping the best weights so far; ``stop_reason`` says which rule ended it. Seeded: the
    same matrix and config give the same weights on the same device. ``progress=None`` shows a
    bar only on a terminal.

    In a torchrun process group (:mod:`aefeatures.model.distributed`) every rank calls this with its
    own shard of users (the same items): each step every rank trains on ``cfg.batch_size /
    world_size`` of its users and the gradients are averaged, so one step sees a global batch of
    ``cfg.batch_size`` users. Every rank runs ``validate``, which must combine all ranks'
    results, so all ranks decide alike when to stop. The group stays joined.

    ``cfg.kind = "recvae"`` trains RecVAE (:mod:`aefeatures.model.recvae`): an epoch is its
    encoder passes and one decoder pass, every step of which counts toward ``cfg.min_steps``;
    validation, patience, the deadline and ``epochs`` work as above. It refuses torchrun and
    catalogues above ``cfg.full_softmax_max_items`` (``BadInputError``).

    ``cfg.kind = "dlae"`` is fitted in closed form instead (:func:`aefeatures.model.dlae_search.train_dlae`,
    ``warm`` a search's state to start from, ``folds`` further (rows, validator) pairs of a
    k-fold cross-validation, ``keep`` the rows a sampled search must fit: the validation users
    under held-out items), on the device and under torchrun alike; one too large for memory
    is refused (``BadInputError``), never silently replaced by another kind.
    """
    if cfg.kind == "dlae":  # closed form, on the device, across ranks under torchrun (aefeatures.model.dlae_search)
        from aefeatures.model.dlae_search import train_dlae

        return train_dlae(matrix, cfg, rows=rows, validate=validate, deadline=deadline, warm=warm, folds=folds,
                          keep=keep)
    # --- setup: seed, device, precision, model, optimizer, fixed once here
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    threads = training_threads(cfg.threads)
    torch.set_num_threads(threads)  # not the host's cores: a CPU set or cgroup quota may allow fewer
    group = distributed.current()
    device = select_device(cfg.device)
    shape = AutoencoderShape(matrix.shape[1], cfg.dim, tuple(cfg.hidden), cfg.kind, cfg.dropout)
    if cfg.kind == "recvae":  # its own alternating passes, on plain autograd (aefeatures.model.recvae)
        from aefeatures.model import recvae

        recvae.check_supported(matrix.shape[1], cfg, under_torchrun=group is not None)
    model = Autoencoder(shape, device=device)
    if cfg.kind == "recvae":
        step: _Step | recvae.Phases = recvae.Phases(model, batch_cutter(matrix, device), cfg, device,
                                                    autocast=autocast_dtype(cfg.precision, device))
    else:
        step = _Step(model, matrix, cfg, device, group)
    result = TrainResult(model=model, device=str(device), threads=threads)
    rows = np.arange(matrix.shape[0]) if rows is None else rows
    best_score, best_state = -np.inf, None
    # Under torchrun every rank must take the same number of steps: those of the largest shard.
    users_per_epoch = len(rows) if group is None else int(group.reduce_array(np.array([len(rows)]), "max")[0])
    started = time.perf_counter()
    if deadline is None and cfg.max_minutes > 0:
        deadline = started + 60.0 * cfg.max_minutes
    steps_per_epoch = max(1, -(-users_per_epoch // step.batch_size)) * step.passes
    result.max_epochs = max_epochs = epochs if epochs is not None else budget_epochs(cfg, steps_per_epoch)
    # epochs between validations: every epoch, unless the cap was raised for epochs of a few steps
    every = max(1, -(-VALIDATE_EVERY_STEPS // steps_per_epoch)) if max_epochs > cfg.epochs else 1

    # --- training loop: one shuffled pass over the users per epoch, then validation
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(1, max_epochs + 1), desc="train", unit="epoch",
               disable=not show_bar or not distributed.is_leader())
    lines = _ProgressLines(max_epochs, started) if not show_bar and distributed.is_leader() else None
    for epoch in bar:
        model.train()
        if isinstance(step, _Step):
            loss, beta, out_of_time = _epoch(step, _epoch_order(rng, rows, users_per_epoch), result, deadline)
        else:  # recvae: encoder passes, the prior's update, a decoder pass, each freshly shuffled
            loss, beta, out_of_time = step.epoch(partial(_epoch_order, rng, rows, users_per_epoch), result,
                                                 deadline)
        if not math.isfinite(loss):  # every later weight would be NaN: stop, publish nothing
            raise errors.TrainingDivergedError(epoch, loss)
        record = {"epoch": epoch, "loss": round(loss, 5), "beta": round(beta, 5), "steps": result.steps}
        if validate is not None and (epoch % every == 0 or epoch == max_epochs or out_of_time):
            record.update(_validated(model, validate, group))
            if record[KEY_METRIC] > best_score:
                best_score, result.best_epoch, result.best_step = record[KEY_METRIC], epoch, result.steps
                best_state = _kept_copy(model, best_state)
            elif cfg.patience and epoch - result.best_epoch >= cfg.patience and result.steps >= cfg.min_steps:
                result.stopped_early, result.stop_reason = True, "patience"
        elif validate is None:
            result.best_epoch, result.best_step = epoch, result.steps
        result.epoch_losses.append(loss)
        result.history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", KEY_METRIC)})
        if out_of_time:
            result.stopped_early, result.stop_reason = True, "max_minutes"
            log.warning("model.max_minutes = %g reached after %d steps: training stopped, keeping the best "
                        "weights so far (epoch %d)", cfg.max_minutes, result.steps, result.best_epoch)
        if lines is not None:
            lines.epoch_done(record, best_epoch=result.best_epoch, last=result.stopped_early or epoch == max_epochs)
        if result.stopped_early:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.workspace = None  # the step's buffers go with the step
    result.seconds = time.perf_counter() - started
    model.eval()
    log.info("trained %d epochs (%d steps) on %s (%d threads) in %.1fs; best epoch %d", len(result.history),
             result.steps, device, threads, result.seconds, result.best_epoch)
    return result


def _kept_copy(model: Autoencoder, kept: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model's weights, copied into ``kept``'s buffers when there are some: two copies of a
    large catalogue's item layers (2.6 GB at 1M items) are never held at once."""
    if kept is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in model.state_dict().items():
        kept[key].copy_(value)
    return kept


def _epoch_order(rng: np.random.Generator, rows: np.ndarray, users: int) -> np.ndarray:
    """``users`` of this rank's ``rows`` for one epoch, shuffled: a rank with fewer rows (a
    smaller shard under torchrun) goes round them again, reshuffled."""
    order = rng.permutation(rows)
    while len(order) < users:
        order = np.concatenate([order, rng.permutation(rows)])
    return order[:users]


def _epoch(step: "_Step", order: np.ndarray, result: TrainResult,
           deadline: float | None = None) -> tuple[float, float, bool]:
    """One pass over the users in ``order``: (mean loss per user, last KL weight, whether the
    ``deadline`` passed and the pass was cut short). Under torchrun the ranks agree on the
    deadline through rank 0's clock, checked once a step."""
    cfg = step.cfg
    total, beta, users, out_of_time = torch.zeros((), device=step.device), 0.0, 0, False
    for start in range(0, len(order), step.batch_size):
        if deadline is not None and _past(deadline, step.group):
            out_of_time = True
            break
        if cfg.kind == "vae":
            beta = kl_weight(result.steps, cfg)
        batch = order[start : start + step.batch_size]
        total += step(batch, beta)
        users += len(batch)
        result.steps += 1
    if step.group is not None:
        total = step.group.total(total)
        users *= step.world
    return float(total) / max(users, 1), beta, out_of_time  # the epoch's one host sync


def _past(deadline: float, group: distributed.Group | None) -> bool:
    late = time.perf_counter() >= deadline
    return late if group is None else bool(group.from_leader(late))


VALIDATE_EVERY_STEPS = 8  # with smaller epochs, validate every few epochs (each ranks every item)


def budget_epochs(cfg: ModelConfig, steps_per_epoch: int) -> int:
    """The epoch cap: ``cfg.epochs``, raised to reach ``cfg.min_steps`` optimizer steps when an
    epoch is ``steps_per_epoch`` steps (never lowered)."""
    return max(cfg.epochs, -(-cfg.min_steps // max(1, steps_per_epoch))) if cfg.epochs else 0


def _validated(model: Autoencoder, validate: Validator, group: distributed.Group | None) -> dict[str, float]:
    """``validate(model)``; under torchrun rank 0's result, shared, so every rank decides alike
    even if floating-point sums differed in the last bit."""
    metrics = validate(model)
    return metrics if group is None else group.from_leader(metrics)


class _Step:
    """One optimizer step per batch of this rank's users (under torchrun, gradients averaged
    over the ranks' batches)."""

    passes = 1  # shuffled passes over the users per epoch

    def __init__(self, model: Autoencoder, matrix: InteractionMatrix, cfg: ModelConfig,
                 device: torch.device, group: distributed.Group | None):
        self.model, self.cfg, self.device, self.group = model, cfg, device, group
        self.cut = batch_cutter(matrix, device)
        self.world = group.world_size if group else 1
        self.batch_size = max(1, cfg.batch_size // self.world)  # users per rank and step
        self.net: torch.nn.Module = model
        if group is not None:
            self.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net, dynamic=True)
        # Sparse updates: the input layer, and with the sampled softmax the decoder, get sparse
        # gradients, and a lazy Adam moves only the rows a batch read.
        sampled = matrix.shape[1] > cfg.full_softmax_max_items
        self.sparse = sparse_updates(cfg, sampled=sampled, under_torchrun=group is not None)
        model.input_layer.sparse = self.sparse  # encode() then sums through model._BagSum
        lazy = [model.input_layer.weight, *([model.decoder.weight, model.decoder.bias] if sampled else [])]
        self.optimizer = _adam(model, cfg, sparse=lazy if self.sparse else [])
        low_precision = autocast_dtype(cfg.precision, device)
        # On a CPU the step's largest intermediates go into buffers kept from step to step
        # (aefeatures.model.kernels), and with bf16 the decoder's products run in bf16 there; only the
        # sampled softmax, which does not use them, keeps autocast. GPUs keep torch's own
        # kernels, with bf16 autocast and compile.
        on_cpu = device.type == "cpu" and not cfg.compile
        self.workspace = kernels.Workspace(low_precision or torch.float32) if on_cpu else None
        self.autocast = None if self.workspace is not None and not sampled else low_precision
        model.workspace = None if self.sparse else self.workspace
        # Every rank draws its own dropout masks and vae noise, from a seed of its own.
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * (group.rank if group else 0))
        self.sampler = NegativeSampler(matrix, cfg, device) if sampled else None
        if self.sampler is not None:
            log.info("%d items > model.full_softmax_max_items = %d: training with a sampled softmax over "
                     "%d shared negatives per batch", matrix.shape[1], cfg.full_softmax_max_items,
                     cfg.sampled_negatives)

    def __call__(self, users: np.ndarray, beta: float) -> torch.Tensor:
        """Train on the rows ``users``; returns their summed loss (no host sync)."""
        batch = self.cut(users)
        noise = Noise.draw(batch, self.cfg.dim, self.generator)
        with autocast(self.device, self.autocast):
            losses = self._losses(batch, noise, beta)
        loss = losses.sum() / len(users)  # DDP averages it over the ranks' batches
        if self.workspace is not None:  # the input layer's gradient is handed over, not accumulated
            self.workspace.reclaim("input_grad", self.model.input_layer.weight)
        self.optimizer.zero_grad(set_to_none=False)  # zero the gradient buffers, not reallocate them
        loss.backward()
        self.optimizer.step()
        return losses.detach().sum()

    def _losses(self, batch: SparseBatch, noise: Noise, beta: float) -> torch.Tensor:
        """(users,) loss of each user of this rank's slice."""
        if self.sampler is None and self.workspace is not None:
            z, mean, logvar = self.net(batch, noise, decode=False)
            losses = kernels.decoded_multinomial_nll(z, self.model.decoder, batch, self.workspace)
        elif self.sampler is None:
            logits, mean, logvar = self.net(batch, noise)
            losses = multinomial_nll(logits, batch)
        else:
            z, mean, logvar = self.net(batch, noise, decode=False)
            negatives, log_q = self.sampler.draw(self.generator)
            losses = sampled_multinomial_nll(z, self.model.decoder, batch, negatives, log_q,
                                             sparse_grad=self.sparse)
        if logvar is not None:
            losses = losses + beta * kl_divergence(mean.float(), logvar.float())
        return losses



class NegativeSampler:
    """Shared negatives for a sampled softmax: items drawn with probability ∝ (popularity + 1)^0.75,
    as in word2vec (every item can be drawn): popular items are the hard negatives, and the logQ
    correction in :func:`sampled_multinomial_nll` removes the bias this sampling brings."""

    def __init__(self, matrix: InteractionMatrix, cfg: ModelConfig, device: torch.device):
        weights = (matrix.item_popularity().astype(np.float64) + 1.0) ** 0.75
        self.probs = torch.from_numpy(weights / weights.sum()).float().to(device)
        self.log_q = torch.log(self.probs)
        self.k = cfg.sampled_negatives

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(item rows (k,), their log-probabilities (k,)), drawn with replacement."""
        items = torch.multinomial(self.probs, self.k, replacement=True, generator=generator)
        return items, self.log_q[items]


def sparse_updates(cfg: ModelConfig, *, sampled: bool, under_torchrun: bool) -> bool:
    """Whether to train with sparse gradients and a lazy Adam: ``cfg.sparse_updates``, where
    ``auto`` means with the sampled softmax. Never under torchrun: DistributedDataParallel
    all-reduces the decoder's gradient as a dense one and fails on a sparse one.

    ``auto`` leaves the full softmax dense: there the decoder's gradient is dense anyway, and
    with the dense input layer's gradient written into a kept buffer (:mod:`aefeatures.model.kernels`)
    a step at the ML-20M shape (26,744 items, batch 512, 2 cores) takes ~111 ms against ~190 ms
    with sparse updates.

    Raises
    ------
    BadInputError
        ``cfg.sparse_updates`` is ``on`` in a torchrun process group.
    """
    if cfg.sparse_updates == "off":
        return False
    if under_torchrun:
        if cfg.sparse_updates == "on":
            raise errors.sparse_updates_under_torchrun()
        return False
    return cfg.sparse_updates == "on" or sampled


def _adam(model: Autoencoder, cfg: ModelConfig, *,
          sparse: list[torch.nn.Parameter]) -> torch.optim.Optimizer | DenseAndLazyAdam:
    """Adam over ``model``'s parameters, lazy over those in ``sparse`` (:mod:`aefeatures.model.optim`)."""
    dense = [p for p in model.parameters() if not any(p is q for q in sparse)]
    if not sparse:
        return fused_adam(dense, cfg)
    if cfg.weight_decay > 0:
        log.warning("model.weight_decay = %g decays the encoder layers only: with sparse updates the "
                    "input layer and the decoder are not decayed (lazy Adam has no weight decay). "
                    'Set model.sparse_updates = "off" to decay every parameter.', cfg.weight_decay)
    log.info("sparse updates: lazy Adam over %s, Adam over the rest",
             ", ".join(f"{n} {tuple(p.shape)}" for n, p in model.named_parameters() if any(p is q for q in sparse)))
    return DenseAndLazyAdam(fused_adam(dense, cfg), LazyAdam(sparse, lr=cfg.lr))


def kl_weight(step: int, cfg: ModelConfig) -> float:
    """β of a vae at optimizer ``step``: linear from 0, reaching ``cfg.beta_cap`` after
    ``cfg.anneal_steps`` steps and staying there."""
    return min(cfg.beta_cap, cfg.beta_cap * step / cfg.anneal_steps)


class _ProgressLines:
    """Progress as log lines where no bar shows: the first epoch, then at most one line every
    :data:`PROGRESS_EVERY` seconds, and the last epoch. Each names the epoch, the loss, the
    validation NDCG@100 (when validated) and the time left if every epoch runs (early stopping
    may end sooner)."""

    def __init__(self, epochs: int, started: float):
        self.epochs, self.started, self.last_line = epochs, started, None

    def epoch_done(self, record: dict[str, float], *, best_epoch: int, last: bool) -> None:
        now = time.perf_counter()
        if not (self.last_line is None or last or now - self.last_line >= PROGRESS_EVERY):
            return
        self.last_line = now
        epoch = int(record["epoch"])
        per_epoch = (now - self.started) / epoch
        metric = f", validation {KEY_METRIC} {record[KEY_METRIC]:.4f} (best epoch {best_epoch})" \
            if KEY_METRIC in record else ""
        left = "done" if last else f"at most {_duration(per_epoch * (self.epochs - epoch))} left"
        progress_log.info("train epoch %d/%d: loss %.4f%s; %.1fs per epoch, %s", epoch, self.epochs,
                          record["loss"], metric, per_epoch, left)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
