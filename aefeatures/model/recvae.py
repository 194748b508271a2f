"""RecVAE's training: alternating encoder and decoder passes under a composite prior.

Follows Shenbin, Alekseev, Tutubalina, Nikolenko, "RecVAE: a New Variational Autoencoder for
Top-N Recommendations with Implicit Feedback" (WSDM 2020) and the authors' reference code
(github.com/ilya-shenbin/RecVAE). The model itself is :class:`aefeatures.model.autoencoder.Autoencoder`
with ``kind = "recvae"`` (its dense-residual encoder, one linear decoder); what is here is
training state and the losses:

- the composite prior p(z | φ_old, x) = 3/20 N(0, I) + 3/4 q_φold(z | x) + 1/10 N(0, e^10 I),
  taken per coordinate as the reference code does, where q_φold is the encoder as it was after
  the previous epoch's encoder passes (the *old encoder*: a frozen copy, never published; before
  the first epoch a copy of the initial encoder);
- the KL term estimated with the sampled z, log q(z|x) − log p(z), weighted per user by
  γ · Σ_j x_uj (``model.gamma`` times the user's total interaction weight);
- one epoch = ``model.encoder_passes`` shuffled passes updating only the encoder (input dropout
  ``model.dropout``), the old encoder set to the encoder, then one pass updating only the
  decoder (no dropout), each part with its own Adam (``model.lr``, ``model.weight_decay``).

This path uses plain autograd on every device: no kernels workspace, no sparse updates, no
torch.compile (the job refuses those settings for recvae), no sampled softmax and no torchrun
(refused when training starts, :func:`check_supported`).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch

from aefeatures import errors
from aefeatures.config import ModelConfig
from aefeatures.model.autoencoder import Autoencoder, Noise, SparseBatch, multinomial_nll
from aefeatures.model.device import autocast as autocast_context
from aefeatures.model.optim import fused_adam
from aefeatures.model.result import TrainResult

PRIOR_WEIGHTS = (3 / 20, 3 / 4, 1 / 10)  # N(0, I), the old encoder's posterior, the wide N(0, e^10 I)
WIDE_LOGVAR = 10.0  # log-variance of the prior's wide component
_LOG_2PI = math.log(2 * math.pi)


def check_supported(n_items: int, cfg: ModelConfig, *, under_torchrun: bool) -> None:
    """Refuse what RecVAE's training does not do.

    Raises
    ------
    BadInputError
        Under torchrun, or ``n_items`` above ``cfg.full_softmax_max_items`` (no sampled softmax).
    """
    if under_torchrun:
        raise errors.recvae_unsupported("under torchrun", "train it in one process, or use kind dae or vae")
    if n_items > cfg.full_softmax_max_items:
        raise errors.recvae_unsupported(
            f"with {n_items:,} items (> model.full_softmax_max_items = {cfg.full_softmax_max_items:,}), which "
            "needs a sampled softmax", "use kind dae or vae, or raise model.full_softmax_max_items")


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(logvar)) (same shape as ``z``)."""
    return -0.5 * (logvar + _LOG_2PI + (z - mean).pow(2) / logvar.exp())


def log_composite_prior(z: torch.Tensor, old_mean: torch.Tensor, old_logvar: torch.Tensor) -> torch.Tensor:
    """(batch,) log p(z | φ_old, x) of samples ``z`` (batch, dim): the mixture of
    :data:`PRIOR_WEIGHTS` per coordinate, summed over the coordinates."""
    zeros = torch.zeros_like(z)
    parts = [log_normal(z, zeros, zeros), log_normal(z, old_mean, old_logvar),
             log_normal(z, zeros, torch.full_like(z, WIDE_LOGVAR))]
    weighted = torch.stack([p + math.log(w) for p, w in zip(parts, PRIOR_WEIGHTS)], dim=-1)
    return torch.logsumexp(weighted, dim=-1).sum(dim=1)


def kl_weights(batch: SparseBatch, gamma: float) -> torch.Tensor:
    """(batch,) float32 KL weight of each user: ``gamma`` × the sum of the user's interaction weights."""
    totals = torch.zeros(batch.size, device=batch.values.device).index_add_(0, batch.rows, batch.values.float())
    return gamma * totals


def encoder_parameters(model: Autoencoder) -> list[torch.nn.Parameter]:
    """Every parameter but the decoder's: input layer (fc1), fc2..fc5, the mean/log-variance layer, ln1..ln5."""
    decoder = {id(p) for p in model.decoder.parameters()}
    return [p for p in model.parameters() if id(p) not in decoder]


class Phases:
    """RecVAE's alternating training of ``model`` (CPU or one GPU) on the batches ``cut`` makes
    of user rows (:func:`aefeatures.model.device.batch_cutter`), under autocast to ``autocast``
    (None: fp32).

    :meth:`epoch` runs one epoch; :meth:`encoder_step` and :meth:`decoder_step` one optimizer
    step of each phase; :meth:`update_prior` copies the encoder into the old encoder.
    """

    def __init__(self, model: Autoencoder, cut: Callable[[np.ndarray], SparseBatch], cfg: ModelConfig,
                 device: torch.device, *, autocast: torch.dtype | None = None):
        self.model, self.cut, self.cfg, self.device, self.autocast = model, cut, cfg, device, autocast
        self.batch_size = cfg.batch_size
        self.passes = cfg.encoder_passes + 1  # shuffled passes over the users per epoch
        self.encoder_optimizer = fused_adam(encoder_parameters(model), cfg)
        self.decoder_optimizer = fused_adam(list(model.decoder.parameters()), cfg)
        # The prior's old encoder: a frozen copy of the model whose encoder alone is read (and
        # updated); its decoder's copy sits unused, simpler than a second encoder-only class.
        self.old = copy.deepcopy(model).requires_grad_(False).eval()
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 1)
        self._weight_sum = torch.zeros((), device=device)  # KL weights of the pass so far

    def update_prior(self) -> None:
        """Set the old encoder (the prior's q_φold) to the encoder's current weights."""
        with torch.no_grad():
            for old, new in zip(encoder_parameters(self.old), encoder_parameters(self.model)):
                old.copy_(new)

    def _kl(self, batch: SparseBatch, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """(batch,) the weighted KL estimate γ Σx · (log q(z|x) − log p(z | φ_old, x))."""
        with torch.no_grad():
            old_mean, old_logvar = self.old.encode(batch)  # eval mode: no dropout
        kl = log_normal(z, mean, logvar).sum(dim=1) - log_composite_prior(z, old_mean.float(), old_logvar.float())
        weights = kl_weights(batch, self.cfg.gamma)
        self._weight_sum += weights.sum()
        return weights * kl

    def encoder_step(self, users: np.ndarray) -> torch.Tensor:
        """One step of the encoder's Adam on the negative ELBO of ``users`` (dropout on; the
        decoder takes no gradient). Returns their summed loss (no host sync)."""
        model = self.model.train()
        model.decoder.requires_grad_(False)
        batch = self.cut(users)
        noise = Noise.draw(batch, self.cfg.dim, self.generator)
        with autocast_context(self.device, self.autocast):
            mean, logvar = model.encode(batch, noise)
            mean, logvar = mean.float(), logvar.float()
            z = mean + noise.normal * torch.exp(0.5 * logvar)
            losses = multinomial_nll(model.decoder(z), batch)
        losses = losses + self._kl(batch, z, mean, logvar)
        self.encoder_optimizer.zero_grad(set_to_none=False)
        (losses.sum() / len(users)).backward()
        self.encoder_optimizer.step()
        return losses.detach().sum()

    def decoder_step(self, users: np.ndarray) -> torch.Tensor:
        """One step of the decoder's Adam on the negative ELBO of ``users``, z sampled from the
        fixed encoder without dropout. Returns their summed loss (no host sync)."""
        model = self.model
        model.decoder.requires_grad_(True)
        batch = self.cut(users)
        noise = Noise.draw(batch, self.cfg.dim, self.generator)
        with torch.no_grad(), autocast_context(self.device, self.autocast):
            model.eval()  # no dropout; the sample is drawn here
            mean, logvar = model.encode(batch)
            model.train()
            mean, logvar = mean.float(), logvar.float()
            z = mean + noise.normal * torch.exp(0.5 * logvar)
            kl = self._kl(batch, z, mean, logvar)
        with autocast_context(self.device, self.autocast):
            losses = multinomial_nll(model.decoder(z), batch) + kl
        self.decoder_optimizer.zero_grad(set_to_none=False)
        (losses.sum() / len(users)).backward()
        self.decoder_optimizer.step()
        return losses.detach().sum()

    def epoch(self, order: Callable[[], np.ndarray], result: TrainResult,
              deadline: float | None = None) -> tuple[float, float, bool]:
        """``cfg.encoder_passes`` encoder passes, the prior's update, one decoder pass, each over
        a fresh ``order()`` of the users. Returns (mean loss per user and mean KL weight per user
        of the last pass run, whether the ``deadline`` passed and the epoch was cut short)."""
        loss, beta = 0.0, 0.0
        passes = [self.encoder_step] * self.cfg.encoder_passes + [self.decoder_step]
        try:
            for index, step in enumerate(passes):
                if index == len(passes) - 1:
                    self.update_prior()
                users, done = order(), 0
                self._weight_sum = torch.zeros((), device=self.device)
                total = torch.zeros((), device=self.device)
                for start in range(0, len(users), self.batch_size):
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    batch = users[start : start + self.batch_size]
                    total += step(batch)
                    done += len(batch)
                    result.steps += 1
                if done:
                    loss, beta = float(total) / done, float(self._weight_sum) / done  # one host sync a pass
                if done < len(users):
                    return loss, beta, True
            return loss, beta, False
        finally:
            self.model.decoder.requires_grad_(True)  # an encoder pass turned it off
