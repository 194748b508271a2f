"""Fitting a dlae (:mod:`aefeatures.model.linear`) as a run does: its dropout p, L2 weight λ and
popularity exponent β chosen on validation, the model an :class:`Autoencoder` with no hidden
layer whose item vectors keep the index's exact inner-product contract.

The search, with a validator:

1. each p of :data:`DLAE_DROPOUTS` (and ``model.dropout``) at λ = ``model.l2``;
2. λ walked by :data:`DLAE_L2_FACTOR` from each of the :data:`DLAE_L2_WALKS` best p, up while
   that p's validation NDCG@100 rises (down when the first step up does not help), at most
   :data:`DLAE_L2_STEPS` fits each way;
3. for every fit, β walked up over :data:`DLAE_POPULARITY_EXPONENTS` while NDCG@100 rises (no
   refit: β only scales the item vectors).

Above :data:`SEARCH_USERS` training users the search fits a seeded sample of that many users,
with λ scaled by the sample's share (the data term and the dropout's penalty both grow with the
users, λ does not: the sample's λ that matches the whole data's λ is λ × share), and the chosen
(p, λ, β) is then fitted once on every training user and validated. At the ML-20M shape
(138,493 users) a whole default run took 8.3 minutes on 2 cores: 8 search fits on the sample,
one on every training user, and the refit (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from aefeatures.config import ModelConfig
from aefeatures.data.matrix import InteractionMatrix
from aefeatures.model import linear
from aefeatures.model.autoencoder import Autoencoder, AutoencoderShape
from aefeatures.model.device import select_device, to_batch
from aefeatures.model.result import TrainResult, Validator
from aefeatures.model.threads import training_threads
from aefeatures.schema import KEY_METRIC

log = logging.getLogger(__name__)
progress_log = logging.getLogger("aefeatures.progress")  # let through by the CLI even without -v

DLAE_DROPOUTS = (0.5, 0.67, 0.8, 0.9)  # p tried on validation; Last.fm and ML-100k chose 0.67-0.9
# On MovieLens-100k (p 0.8, λ 300) beat the best at λ 100 (p 0.9) on every seed's validation,
# and (p 0.9, λ 300) did not, so one walk from the best p alone missed it.
DLAE_L2_FACTOR, DLAE_L2_STEPS, DLAE_L2_WALKS = 3.0, 3, 2
# On Last.fm β 0.1 gave NDCG@100 0.3765 against 0.3724 and coverage@20 0.110 against 0.092; on
# MovieLens-100k 0.4526 against 0.4511, coverage 0.33 against 0.28 (dim 256, p 0.8, λ 100).
# Validation on held-out users asks for more than held-out items reward: β 0.3 lost ~2.5% on
# the test items of both data sets, and with it in the grid validation chose it on 3 of 6
# seeds, so the walk stops at 0.2 (Last.fm 1.015× -> 1.024× a tuned EASE).
DLAE_POPULARITY_EXPONENTS = (0.0, 0.05, 0.1, 0.15, 0.2)
SEARCH_USERS = 30_000  # above this many training users the search fits a sample of them
TEMPERATURE_SAMPLE = 2000  # training users that set a dlae's softmax temperature
# the largest item bias: a popularity tie-break (_set_tie_break), far below any score difference
# a ranking depends on (scores of a dlae with its fitted temperature are O(1) to O(10))
TIE_BREAK = 1e-5
QUIET_SECONDS = 5.0  # a search this young logs no progress line (small jobs stay quiet)


def train_dlae(matrix: InteractionMatrix, cfg: ModelConfig, *, rows: np.ndarray | None,
               validate: Validator | None, deadline: float | None) -> TrainResult:
    """The closed-form low-rank DLAE (Steck, "Autoencoders that don't overfit towards the
    identity", NeurIPS 2020) of the users at ``rows`` (default: all), as an eval-mode
    :class:`Autoencoder` in a :class:`TrainResult`.

    With ``validate`` the search of this module's docstring chooses (p, λ, β) (``chosen``, λ in
    the whole data's units); "epoch" i of ``history`` is the i-th fit, with its p, λ, β, the
    users it was fitted on, its seconds (the fit and its β walk) and its validation metrics.
    Without it ``cfg.dropout``, ``cfg.l2`` and ``cfg.popularity_exponent`` are fitted once on
    ``rows``. ``deadline`` (a ``time.perf_counter()`` value; default ``cfg.max_minutes`` from
    now, when set) stops the search between fits, keeping the best so far (``stop_reason`` "max_minutes"; a sampled
    search then keeps its sample's model); otherwise ``stop_reason`` is "fitted".

    The popularity correction multiplies item j's scores by (n_j + 1)^-β, n_j its users among
    the fitted rows, by scaling its item vector, so the index's inner products stay the model's
    scores. It is the classic re-ranking against popularity bias (Steck, "Item popularity and
    recommendation accuracy", RecSys 2011; Abdollahpouri et al. 2019): a linear model's scores
    favour popular items more than held-out items do, and a small β lifts NDCG@100 and
    coverage; β = 0 is always a candidate, so validation can refuse it.
    """
    started = time.perf_counter()
    if deadline is None and cfg.max_minutes > 0:
        deadline = started + 60.0 * cfg.max_minutes
    rows = np.arange(matrix.shape[0]) if rows is None else rows
    threads = training_threads(cfg.threads)
    torch.set_num_threads(threads)  # the CPUs this process may use, as the trained kinds do
    search = _Search(matrix, cfg, rows, validate, deadline)
    search.result.threads = threads
    if validate is None:
        search.fit(cfg.dropout, cfg.l2)
    else:
        search.run()
    result = search.result
    if result.stop_reason != "max_minutes":
        result.stop_reason = "fitted"  # closed form: every candidate fitted
    result.max_epochs = len(result.history)
    result.seconds = time.perf_counter() - started
    log.info("dlae: %d fit(s) in %.1fs; dropout %s, l2 %s, popularity exponent %s", len(result.history),
             result.seconds, *(result.chosen.get(k, getattr(cfg, k)) for k in ("dropout", "l2", "popularity_exponent")))
    return result


class _Search:
    """The fits of one search and the best so far (``result``)."""

    def __init__(self, matrix: InteractionMatrix, cfg: ModelConfig, rows: np.ndarray, validate: Validator | None,
                 deadline: float | None):
        self.matrix, self.cfg, self.rows, self.validate, self.deadline = matrix, cfg, rows, validate, deadline
        self.device, self.started = select_device(cfg.device), time.perf_counter()
        self.exponents = sorted({*DLAE_POPULARITY_EXPONENTS, cfg.popularity_exponent}) if validate \
            else [cfg.popularity_exponent]
        self.result = TrainResult(model=None, device=str(self.device))  # type: ignore[arg-type]
        self.best_score = -np.inf
        if validate is not None and len(rows) > SEARCH_USERS:
            self._fit_on(np.sort(np.random.default_rng(cfg.seed).choice(rows, SEARCH_USERS, replace=False)))
        else:
            self._fit_on(rows)

    def _fit_on(self, rows: np.ndarray) -> None:
        """Fit the next candidates on ``rows``, whose users per item (n_j) the correction reads."""
        self.fit_rows = rows
        self.counts = np.bincount(self.matrix.csr.gather(rows)[1], minlength=self.matrix.shape[1])

    def run(self) -> None:
        cfg, history = self.cfg, self.result.history
        for dropout in sorted({*DLAE_DROPOUTS, cfg.dropout}):
            if self.fit(dropout, cfg.l2) is None:
                return
        by_score = sorted(history, key=lambda h: -h.get(KEY_METRIC, 0.0))
        for dropout in [h["dropout"] for h in by_score[:DLAE_L2_WALKS]]:
            for factor in (DLAE_L2_FACTOR, 1.0 / DLAE_L2_FACTOR):
                rose, last = False, max(h.get(KEY_METRIC, 0.0) for h in history if h["dropout"] == dropout)
                for step in range(1, DLAE_L2_STEPS + 1):
                    score = self.fit(dropout, float(f"{cfg.l2 * factor**step:.4g}"))
                    if score is None:
                        return
                    if score <= last:
                        break
                    rose, last = True, score
                if rose:
                    break
        if self.fit_rows is not self.rows:  # the chosen (p, λ, β) on every training user
            chosen = self.result.chosen
            self._fit_on(self.rows)
            self.exponents = [chosen["popularity_exponent"]]
            self.best_score = -np.inf  # this fit is the result, whatever its score
            self.fit(chosen["dropout"], chosen["l2"])

    def fit(self, dropout: float, l2: float) -> float | None:
        """Fit (p, λ) on ``fit_rows``, walk β on validation; the validation NDCG@100 (0 without a
        validator), or None when the deadline passed first."""
        result, cfg = self.result, self.cfg
        if self.deadline is not None and time.perf_counter() >= self.deadline and result.model is not None:
            result.stopped_early, result.stop_reason = True, "max_minutes"
            return None
        started = time.perf_counter()
        share = len(self.fit_rows) / len(self.rows)
        model, factors = _dlae_model(self.matrix, cfg, self.fit_rows, dropout, l2 * share, self.device)
        counts = self.counts
        result.steps += 1
        exponent, metrics = self.exponents[0], {}
        for candidate in self.exponents:
            _set_item_vectors(model, factors, counts, candidate)
            scored = self.validate(model) if self.validate is not None else {}
            if metrics and scored.get(KEY_METRIC, 0.0) <= metrics.get(KEY_METRIC, 0.0):
                break
            exponent, metrics = candidate, scored
        _set_item_vectors(model, factors, counts, exponent)
        _set_temperature(model, self.matrix, cfg, self.fit_rows, self.device)
        _set_tie_break(model, counts)
        result.history.append({"epoch": result.steps, "dropout": dropout, "l2": l2, "popularity_exponent": exponent,
                               "users": len(self.fit_rows), "seconds": round(time.perf_counter() - started, 3),
                               "loss": 0.0, "beta": 0.0, **metrics})
        result.epoch_losses.append(0.0)
        score = metrics.get(KEY_METRIC, 0.0)
        if time.perf_counter() - self.started >= QUIET_SECONDS:
            progress_log.info("dlae fit %d on %d users: dropout %g, l2 %g, popularity exponent %g%s (%.1fs)",
                              result.steps, len(self.fit_rows), dropout, l2, exponent,
                              f", validation {KEY_METRIC} {score:.4f}" if metrics else "",
                              result.history[-1]["seconds"])
        if result.model is None or score > self.best_score:
            self.best_score, result.model = score, model
            result.best_epoch = result.best_step = result.steps
            if self.validate is not None:
                result.chosen = {"dropout": dropout, "l2": l2, "popularity_exponent": exponent}
        return score


def _dlae_model(matrix: InteractionMatrix, cfg: ModelConfig, rows: np.ndarray, dropout: float, l2: float,
                device: torch.device) -> tuple[Autoencoder, np.ndarray]:
    """The rank-``cfg.dim`` DLAE of ``rows`` as an eval-mode :class:`Autoencoder` (input layer P,
    zero biases until :func:`_set_tie_break`) and its item factors R (n_items, dim), which :func:`_set_item_vectors` turns
    into the decoder's weight."""
    p, r = linear.dlae_factors(matrix.csr, rows, matrix.shape[1], dim=cfg.dim, dropout=dropout, l2=l2,
                               seed=cfg.seed)
    model = Autoencoder(AutoencoderShape(matrix.shape[1], cfg.dim, (), "dlae", 0.0), device=device)
    with torch.no_grad():
        model.input_layer.weight.copy_(torch.from_numpy(p))
        model.input_bias.zero_()
        model.decoder.bias.zero_()
    return model.eval(), r


def _set_item_vectors(model: Autoencoder, factors: np.ndarray, counts: np.ndarray, exponent: float) -> None:
    """The decoder's weight = R's rows × (n_j + 1)^-``exponent`` (``counts`` (n_items,) n_j)."""
    scale = (counts.astype(np.float64) + 1.0) ** -exponent
    with torch.no_grad():
        model.decoder.weight.copy_(torch.from_numpy((factors * scale[:, None]).astype(np.float32)))


def _set_tie_break(model: Autoencoder, counts: np.ndarray) -> None:
    """Item biases of at most :data:`TIE_BREAK`, rising with log(n_j + 1): they decide only
    between scores tied to ~1e-5, above all for a user whose items no other training user has,
    whose embedding is ~0 and whose scores would otherwise all be 0 — such a user then gets
    the most popular items, the best a model that cannot relate their items can do."""
    logs = np.log1p(counts.astype(np.float64))
    with torch.no_grad():
        model.decoder.bias.copy_(torch.from_numpy(TIE_BREAK * logs / max(logs.max(), 1e-12)).float())


def _set_temperature(model: Autoencoder, matrix: InteractionMatrix, cfg: ModelConfig, rows: np.ndarray,
                     device: torch.device) -> None:
    """Scale the decoder's weight by the temperature that best explains a sample of the training
    users (:func:`aefeatures.model.linear.best_temperature`): rankings keep, the softmax's
    reconstruction error (and so the anomaly scores) becomes meaningful."""
    model.eval()
    with torch.no_grad():
        sample = np.random.default_rng(cfg.seed).choice(rows, min(TEMPERATURE_SAMPLE, len(rows)), replace=False)
        batch = to_batch(matrix, np.sort(sample), device)
        z, _ = model.encode(batch)
        t = linear.best_temperature(z, model.decoder.weight, batch.indices, batch.rows, batch.values)
        model.decoder.weight.mul_(t)
