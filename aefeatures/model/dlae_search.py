"""Fitting a dlae (:mod:`aefeatures.model.linear`) as a run does: its dropout p, L2 weight λ and
popularity exponent β chosen on validation, the model an :class:`Autoencoder` with no hidden
layer whose item vectors keep the index's exact inner-product contract.

The search, with a validator:

1. each p of :data:`DLAE_DROPOUTS` (and ``model.dropout``) at λ = ``model.l2``;
2. λ walked by :data:`DLAE_L2_FACTOR` from each of the :data:`DLAE_L2_WALKS` best p, up while
   that p's validation NDCG@100 rises (down when the first step up does not help), at most
   :data:`DLAE_L2_STEPS` fits each way;
3. for every fit, β walked up over :data:`DLAE_POPULARITY_EXPONENTS` while NDCG@100 rises (no
   refit: β only scales the item vectors);
4. below full rank, each of the :data:`NEIGHBOUR_FITS` best fits with a sparse item-item part
   (:mod:`aefeatures.model.neighbours`) at each γ of :data:`NEIGHBOUR_WEIGHTS`, with its own β
   walk, kept only where NDCG@100 rises above every fit alone.

Above :data:`SEARCH_USERS` training users the search fits a seeded sample of that many users,
with λ scaled by the sample's share (the data term and the dropout's penalty both grow with the
users, λ does not: the sample's λ that matches the whole data's λ is λ × share), and the chosen
(p, λ, β) is then fitted once on every training user and validated.

The fits of one set of users share a :class:`aefeatures.model.linear.Solver` (the sparse
matrix on the device, the Gram, and the last fit's subspace, from which the next fit starts),
and the refit on every user starts from the search's subspace. The temperature and the
popularity tie-break are set once, on the kept model. Under torch.distributed every rank runs
the same search on its own users: the solver's sums, the item counts, the temperature's NLLs
and the validation totals are summed over the ranks, and rank 0's validation metrics and clock
decide for all, so every rank ends with the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import torch

from aefeatures.config import ModelConfig
from aefeatures.data.matrix import InteractionMatrix
from aefeatures.model import distributed, linear, neighbours
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
# A dlae's width (model.dim = 0) by the data's shape, dlae_width: NDCG@100 rises with the width
# up to full rank (hyperparameters tuned on the test items, against a tuned EASE: Last.fm 1.029×
# at 256, 1.036× at 512, 1.050× at full rank, 1,877; its 600-user cut 1.021× at 256, 1.048× full;
# a 591-user purchase set 0.975× at 256, 1.015× full; a 13.8k × 18.3k book set, the sketch path,
# 0.76× at 256, 0.94× at 1024). Where an exact path fits: the next power of two above the data's
# rank, up to WIDE_DIM (full rank below it); on the sketch path, whose passes cost in proportion
# to the width times the interactions, SKETCH_WIDE_DIM while there are at most
# SKETCH_WIDE_ENTRIES interactions (the ML-20M shape stays at NARROW_DIM). A wide width keeps
# the item vectors within WIDE_ITEM_BYTES (float32; the model and the index hold them too).
WIDE_DIM, SKETCH_WIDE_DIM, NARROW_DIM, WIDE_ITEM_BYTES = 2048, 1024, 256, 256 << 20
SKETCH_WIDE_ENTRIES = 2_000_000
# γ tried for the sparse item-item part (aefeatures.model.neighbours), each with its own β walk,
# on each of the NEIGHBOUR_FITS best fits (by validation alone), kept only where validation
# NDCG@100 rises above every fit alone. γ multiplies the fit's Λ: a fit with a small λ leaves the
# part too little shrinkage at γ 1. On the book set (seed 1, width 1,024, each fit on 90% of the
# users, scored on the test items at its best β), every p at λ 100 lost with γ 1 (e.g. p 0.67:
# 0.0994 alone, 0.0916 with the part), and gained with γ 3 (0.1049) and γ 10 (0.1031), and
# validation ranked the three γ the same way on every p; at (p 0.8, λ 300) γ 1 gained (seed 0).
# γ 0.5 lost everywhere. Rows: benchmarks/results/choice-books-seed1.json.
NEIGHBOUR_WEIGHTS = (1.0, 3.0, 10.0)
NEIGHBOUR_FITS = 2
SEARCH_USERS = 30_000  # above this many training users the search fits a sample of them
TEMPERATURE_SAMPLE = 2000  # training users that set a dlae's softmax temperature
# the largest item bias: a popularity tie-break (_set_tie_break), far below any score difference
# a ranking depends on (scores of a dlae with its fitted temperature are O(1) to O(10))
TIE_BREAK = 1e-5
QUIET_SECONDS = 5.0  # a search this young logs no progress line (small jobs stay quiet)


def train_dlae(matrix: InteractionMatrix, cfg: ModelConfig, *, rows: np.ndarray | None,
               validate: Validator | None, deadline: float | None, warm: linear.Warm | None = None,
               folds: Sequence[tuple[np.ndarray, Validator]] = (), keep: np.ndarray | None = None) -> TrainResult:
    """The closed-form low-rank DLAE (Steck, "Autoencoders that don't overfit towards the
    identity", NeurIPS 2020) of the users at ``rows`` (default: all), as an eval-mode
    :class:`Autoencoder` in a :class:`TrainResult`, fitted on ``cfg.device`` ("auto": the first
    CUDA device when there is one).

    With ``validate`` the search of this module's docstring chooses (p, λ, β) (``chosen``, λ in
    the whole data's units); "epoch" i of ``history`` is the i-th fit, with its p, λ, β, the
    users it was fitted on, its path, solver iterations, seconds (the fit and its β walk) and
    validation metrics. Without it ``cfg.dropout``, ``cfg.l2`` and ``cfg.popularity_exponent``
    are fitted once on ``rows``, from ``warm`` (a search's ``TrainResult.warm``: its subspace,
    and its Gram when ``rows`` add users to it) when given. A search sampling users fits every
    row of ``keep`` it can (the validation users under held-out items). ``deadline`` (a
    ``time.perf_counter()`` value; default ``cfg.max_minutes`` from now, when set) stops the
    search between fits, keeping the best so far (``stop_reason`` "max_minutes"; a sampled
    search then keeps its sample's model); otherwise ``stop_reason`` is "fitted". Under
    torch.distributed every rank calls this with its own users and the same items (module
    docstring).

    The popularity correction multiplies item j's scores by (n_j + 1)^-β, n_j its users among
    the fitted rows, by scaling its item vector, so the index's inner products stay the model's
    scores. It is the classic re-ranking against popularity bias (Steck, "Item popularity and
    recommendation accuracy", RecSys 2011; Abdollahpouri et al. 2019): a linear model's scores
    favour popular items more than held-out items do, and a small β lifts NDCG@100 and
    coverage; β = 0 is always a candidate, so validation can refuse it.

    Raises ``BadInputError`` when the fit would not fit in memory
    (:func:`aefeatures.model.linear.check_fits`).
    """
    started = time.perf_counter()
    if cfg.dim == 0:
        group = distributed.current()
        local = np.array([matrix.shape[0], matrix.csr.indptr[-1]])
        users, nnz = (local if group is None else group.reduce_array(local)).tolist()
        cfg = dataclasses.replace(cfg, dim=dlae_width(users, matrix.shape[1], nnz, distributed=group is not None,
                                                      cuda=select_device(cfg.device).type == "cuda"))
    if deadline is None and cfg.max_minutes > 0:
        deadline = started + 60.0 * cfg.max_minutes
    rows = np.arange(matrix.shape[0]) if rows is None else rows
    threads = training_threads(cfg.threads)
    torch.set_num_threads(threads)  # the CPUs this process may use, as the trained kinds do
    search = _Search(matrix, cfg, rows, validate, deadline, warm, folds, keep)
    search.result.threads = threads
    if validate is None:
        search.fit(cfg.dropout, cfg.l2)
        if cfg.neighbour_weight > 0 and search.wants_neighbours(chosen=True):
            search.fit_neighbours(cfg.neighbour_weight)
    else:
        search.run()
        if search.wants_neighbours():
            search.try_neighbours()
    search.finish()
    result = search.result
    if result.stop_reason != "max_minutes":
        result.stop_reason = "fitted"  # closed form: every candidate fitted
    result.max_epochs = len(result.history)
    result.seconds = time.perf_counter() - started
    log.info("dlae: %d fit(s) on %s in %.1fs; dropout %s, l2 %s, popularity exponent %s", len(result.history),
             result.device, result.seconds,
             *(result.chosen.get(k, getattr(cfg, k)) for k in ("dropout", "l2", "popularity_exponent")))
    return result


def _sample(rows: np.ndarray, size: int, keep: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``rows`` drawn at random, sorted, with as many of ``keep`` (rows validated on
    their hidden items, which must be in the fit) as the size allows."""
    keep = np.array([], rows.dtype) if keep is None else keep
    if len(keep) >= size:
        return np.sort(rng.choice(keep, size, replace=False))
    others = np.setdiff1d(rows, keep)
    return np.sort(np.concatenate([keep, rng.choice(others, size - len(keep), replace=False)]))


def dlae_width(n_users: int, n_items: int, nnz: int, *, distributed: bool = False, cuda: bool = False) -> int:
    """A dlae's width (its embeddings' size) for ``model.dim = 0``, from the whole data's shape
    (``n_users`` every rank's). Where an exact path fits (:func:`aefeatures.model.linear.choose_method`)
    and the data's rank min(n_users, n_items) is at most :data:`WIDE_DIM`, the next power of two
    at or above it, at least :data:`NARROW_DIM`: the full-rank DLAE, its last columns zero, the
    width steady while the data grows within a power of two. With a larger rank on an exact
    path :data:`NARROW_DIM`: there a wide block costs side² × width a pass (at 3,700 items and
    2,048 the default training took 17× a tuned EASE grid, against 0.7× at 256). On the sketch
    path :data:`SKETCH_WIDE_DIM` up to :data:`SKETCH_WIDE_ENTRIES`
    interactions (``nnz``, every rank's), :data:`NARROW_DIM` above; either halved while the item
    vectors would take more than :data:`WIDE_ITEM_BYTES`."""
    rank = max(1, min(n_users, n_items))
    if linear.choose_method(n_users, n_items, distributed=distributed, cuda=cuda) == "sketch":
        width = SKETCH_WIDE_DIM if nnz <= SKETCH_WIDE_ENTRIES else NARROW_DIM
    else:
        width = 1 << (rank - 1).bit_length() if rank <= WIDE_DIM else NARROW_DIM
    while width > NARROW_DIM and 4 * n_items * width > WIDE_ITEM_BYTES:
        width //= 2
    return max(NARROW_DIM, width)


class _Search:
    """The fits of one search and the best so far (``result``)."""

    def __init__(self, matrix: InteractionMatrix, cfg: ModelConfig, rows: np.ndarray, validate: Validator | None,
                 deadline: float | None, warm: linear.Warm | None,
                 folds: Sequence[tuple[np.ndarray, Validator]] = (), keep: np.ndarray | None = None):
        self.matrix, self.cfg, self.rows, self.validate, self.deadline = matrix, cfg, rows, validate, deadline
        self.device, self.started = select_device(cfg.device), time.perf_counter()
        self.group = distributed.current()
        self.exponents = sorted({*DLAE_POPULARITY_EXPONENTS, cfg.popularity_exponent}) if validate \
            else [cfg.popularity_exponent]
        self.result = TrainResult(model=None, device=str(self.device))  # type: ignore[arg-type]
        self.best_score, self.kept_counts, self.solver = -np.inf, None, None
        self.kept_fit: tuple[torch.Tensor, torch.Tensor, float, float] | None = None  # the kept model's P, R, p, λ
        # the NEIGHBOUR_FITS best fits, (score, model, P, R, p, λ), that try_neighbours gives the part
        self.shortlist: list[tuple] = []
        if folds and (self.group is not None or validate is None):
            raise ValueError("folds need a validator and one process")
        # the other folds: (validator, solver, item counts), fitted beside the first
        self.folds = [(check, linear.Solver(matrix.csr, fold_rows, matrix.shape[1], dim=cfg.dim, device=self.device,
                                            seed=cfg.seed), self._counts(fold_rows)) for fold_rows, check in folds]
        self.n_rows = self._total(len(rows))
        if validate is not None and self.n_rows > SEARCH_USERS and not folds:
            sample = -(-SEARCH_USERS * len(rows) // self.n_rows)  # this rank's part of the sample
            self._fit_on(_sample(rows, sample, keep, np.random.default_rng(cfg.seed)), warm)
        else:
            self._fit_on(rows, warm)

    def _total(self, count: int) -> int:
        """``count`` summed over the ranks."""
        return count if self.group is None else int(self.group.reduce_array(np.array([count]))[0])

    def _reduce(self) -> linear.Reduce | None:
        return None if self.group is None else self.group.summed

    def _fit_on(self, rows: np.ndarray, warm: linear.Warm | None = None) -> None:
        """Fit the next candidates on ``rows``, whose users per item (n_j) the correction reads,
        with a solver warmed by ``warm`` (or by the last solver)."""
        if warm is None and self.solver is not None:
            warm = self.solver.warm()
        self.fit_rows, self.share = rows, self._total(len(rows)) / max(self.n_rows, 1)
        self.solver = None  # its matrix and Gram go before the next solver's come
        self.solver = linear.Solver(self.matrix.csr, rows, self.matrix.shape[1], dim=self.cfg.dim, device=self.device,
                                    seed=self.cfg.seed, reduce=self._reduce(), warm=warm)
        self.counts = self._counts(rows)
        self.part_applies = (self.cfg.neighbours > 0 and not self.folds
                             and self.matrix.shape[1] <= neighbours.MAX_ITEMS
                             and self.cfg.dim < min(self._total(len(rows)), self.matrix.shape[1]))
        # only where a search will try the part are its best fits' factors kept for it
        self.shortlisting = (self.validate is not None and self.part_applies
                             and self.solver.nnz <= neighbours.MAX_ENTRIES)

    def _counts(self, rows: np.ndarray) -> np.ndarray:
        """(n_items,) int64: each item's users among ``rows`` (every rank's)."""
        counts = np.bincount(self.matrix.csr.gather(rows)[1], minlength=self.matrix.shape[1]).astype(np.int64)
        return counts if self.group is None else self.group.reduce_array(counts)

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
        if self.share < 1.0:  # the chosen (p, λ, β) on every training user
            chosen = self.result.chosen
            self._fit_on(self.rows)
            self.exponents = [chosen["popularity_exponent"]]
            self.best_score, self.shortlist = -np.inf, []  # this fit is the result, whatever its score
            self.fit(chosen["dropout"], chosen["l2"])

    def _late(self) -> bool:
        late = self.deadline is not None and time.perf_counter() >= self.deadline
        return late if self.group is None else bool(self.group.from_leader(late))

    def _validated(self, model: Autoencoder) -> dict[str, float]:
        """``validate(model)`` (every rank calls it: it sums the ranks' totals), rank 0's result."""
        metrics = self.validate(model) if self.validate is not None else {}
        return metrics if self.group is None else self.group.from_leader(metrics)

    def fit(self, dropout: float, l2: float) -> float | None:
        """Fit (p, λ) on ``fit_rows``, walk β on validation; the validation NDCG@100 (0 without a
        validator), or None when the deadline passed first."""
        result, cfg = self.result, self.cfg
        if result.model is not None and self._late():
            result.stopped_early, result.stop_reason = True, "max_minutes"
            return None
        started = time.perf_counter()
        factors = self.solver.fit(dropout, l2 * self.share)
        model = _dlae_model(self.matrix.shape[1], cfg, factors.p, self.device)
        counts = self.counts
        others = [(check, _dlae_model(self.matrix.shape[1], cfg, fitted.p, self.device), fitted.r, fold_counts)
                  for check, solver, fold_counts in self.folds for fitted in [solver.fit(dropout, l2)]]
        result.steps += 1
        exponent, metrics, per_fold = self.exponents[0], {}, []
        at_once = self._at_once([(self.validate, model, factors.r, counts), *others])
        for step, candidate in enumerate(self.exponents):
            if at_once is not None:
                scored = [fold[step] for fold in at_once]
            else:
                _set_item_vectors(model, factors.r, counts, candidate)
                scored = [self._validated(model)]
                for check, other, r, fold_counts in others:
                    _set_item_vectors(other, r, fold_counts, candidate)
                    scored.append(check(other))
            mean = {k: float(np.mean([m[k] for m in scored])) for k in scored[0]}
            if metrics and mean.get(KEY_METRIC, 0.0) <= metrics.get(KEY_METRIC, 0.0):
                break
            exponent, metrics, per_fold = candidate, mean, [m.get(KEY_METRIC, 0.0) for m in scored]
        _set_item_vectors(model, factors.r, counts, exponent)
        result.history.append({"epoch": result.steps, "dropout": dropout, "l2": l2, "popularity_exponent": exponent,
                               "users": self._total(len(self.fit_rows)), "method": factors.method,
                               "iterations": factors.iterations, "fit_seconds": round(factors.seconds, 3),
                               "gflop": round(factors.flops / 1e9, 2),
                               **({"reduced_mb": round(factors.reduced_bytes / 2**20, 2)} if self.group else {}),
                               "seconds": round(time.perf_counter() - started, 3), "loss": 0.0, "beta": 0.0, **metrics,
                               **({"folds": per_fold} if self.folds else {})})
        result.epoch_losses.append(0.0)
        score = metrics.get(KEY_METRIC, 0.0)
        if time.perf_counter() - self.started >= QUIET_SECONDS and distributed.is_leader():
            progress_log.info("dlae fit %d on %d users: dropout %g, l2 %g, popularity exponent %g%s (%.1fs)",
                              result.steps, result.history[-1]["users"], dropout, l2, exponent,
                              f", validation {KEY_METRIC} {score:.4f}" if metrics else "",
                              result.history[-1]["seconds"])
        if self.shortlisting:
            self.shortlist = sorted([*self.shortlist, (score, model, factors.p, factors.r, dropout, l2)],
                                    key=lambda fit: -fit[0])[:NEIGHBOUR_FITS]
        if result.model is None or score > self.best_score:
            self.best_score, result.model, self.kept_counts = score, model, counts
            self.kept_fit = (factors.p, factors.r, dropout, l2 * self.share)
            result.best_epoch = result.best_step = result.steps
            if self.validate is not None:
                result.chosen = {"dropout": dropout, "l2": l2, "popularity_exponent": exponent}
        return score

    def wants_neighbours(self, *, chosen: bool = False) -> bool:
        """Whether the sparse item-item part applies: asked for (``model.neighbours``), the
        width below the fitted data's rank (at full rank it adds nothing), at most
        :data:`aefeatures.model.neighbours.MAX_ITEMS` items, one validation split, and for a
        search at most :data:`~aefeatures.model.neighbours.MAX_ENTRIES` interactions (a refit
        of a ``chosen`` part fits it whatever the validation users added)."""
        return self.result.model is not None and (self.part_applies if chosen else self.shortlisting)

    def fit_neighbours(self, weight: float) -> neighbours.ItemNeighbours:
        """Give the kept model its sparse item-item part at γ = ``weight``, scaled as its item vectors."""
        model, (p, r, dropout, l2) = self.result.model, self.kept_fit
        model.neighbours = neighbours.fit(self.solver.item_gram(), p, r, self.solver.penalty(dropout, l2),
                                          per_item=self.cfg.neighbours, weight=weight)
        _set_item_vectors(model, r, self.kept_counts,
                          self.result.chosen.get("popularity_exponent", self.cfg.popularity_exponent))
        return model.neighbours

    def try_neighbours(self) -> None:
        """Validate each of the :data:`NEIGHBOUR_FITS` best fits with a sparse item-item part at
        each γ of :data:`NEIGHBOUR_WEIGHTS` (one residual and one set of neighbours a fit; each
        γ with its own β walk) and keep the best where it scores higher than every fit alone;
        a fit of ``history`` each. Where no γ raised a fit above its score alone, the next fits
        are not tried (on a 6,040 × 3,700 film-shaped set every γ lowered the best fit)."""
        result = self.result
        result.chosen = {**result.chosen, "neighbour_weight": 0.0}
        kept = None  # (model, part, P, R, p, λ, β, γ) of the best fit with a part so far
        gram = self.solver.item_gram()
        for alone, model, p, r, dropout, l2 in self.shortlist:
            if self._late():
                result.stopped_early, result.stop_reason = True, "max_minutes"
                break
            started = time.perf_counter()
            parts = neighbours.fit_weights(gram, p, r, self.solver.penalty(dropout, l2 * self.share),
                                           per_item=self.cfg.neighbours, weights=NEIGHBOUR_WEIGHTS)
            fitted, best_here = (time.perf_counter() - started) / len(parts), -np.inf
            for weight, part in zip(NEIGHBOUR_WEIGHTS, parts):
                started = time.perf_counter()
                model.neighbours = part
                exponent, metrics = self._walk_exponents(model, r)
                model.neighbours = None
                result.steps += 1
                result.history.append({"epoch": result.steps, "dropout": dropout, "l2": l2,
                                       "popularity_exponent": exponent, "neighbours": self.cfg.neighbours,
                                       "neighbour_weight": weight, "entries": part.nnz,
                                       "users": self._total(len(self.fit_rows)), "method": "neighbours",
                                       "fit_seconds": round(fitted, 3),
                                       "seconds": round(time.perf_counter() - started + fitted, 3),
                                       "loss": 0.0, "beta": 0.0, **metrics})
                result.epoch_losses.append(0.0)
                score = metrics.get(KEY_METRIC, 0.0)
                best_here = max(best_here, score)
                if distributed.is_leader():
                    progress_log.info("dlae fit %d: dropout %g, l2 %g with %d neighbours an item at weight %g, "
                                      "popularity exponent %g, validation %s %.4f (%.1fs)", result.steps, dropout, l2,
                                      self.cfg.neighbours, weight, exponent, KEY_METRIC, score,
                                      result.history[-1]["seconds"])
                if score > self.best_score:
                    self.best_score, kept = score, (model, part, p, r, dropout, l2, exponent, weight)
                    result.best_epoch = result.best_step = result.steps
            if best_here <= alone:  # the part lowered the best fit: the data has no tail it finds
                break
        self.shortlist = []
        if kept is not None:
            model, part, p, r, dropout, l2, exponent, weight = kept
            model.neighbours, result.model = part, model
            self.kept_fit, self.kept_counts = (p, r, dropout, l2 * self.share), self.counts
            result.chosen = {"dropout": dropout, "l2": l2, "popularity_exponent": exponent,
                             "neighbour_weight": weight}
        _set_item_vectors(result.model, self.kept_fit[1], self.kept_counts, result.chosen["popularity_exponent"])

    def _walk_exponents(self, model: Autoencoder, r: torch.Tensor) -> tuple[float, dict[str, float]]:
        """β walked up over the search's exponents on validation while NDCG@100 rises, for
        ``model`` (item vectors R): (β, its metrics)."""
        at_once = self._at_once([(self.validate, model, r, self.counts)])
        exponent, metrics = self.exponents[0], {}
        for step, candidate in enumerate(self.exponents):
            if at_once is not None:
                scored = at_once[0][step]
            else:
                _set_item_vectors(model, r, self.counts, candidate)
                scored = self._validated(model)
            if metrics and scored.get(KEY_METRIC, 0.0) <= metrics.get(KEY_METRIC, 0.0):
                break
            exponent, metrics = candidate, scored
        return exponent, metrics

    def _at_once(self, folds: list[tuple]) -> list[list[dict[str, float]]] | None:
        """Each fold's validation metrics at every candidate exponent, from one product of its
        user and item vectors per fold (a validator's ``scaled``), or None when a validator
        has no ``scaled`` (then the walk validates one exponent at a time)."""
        if not folds[0][0] or not all(hasattr(check, "scaled") for check, *_ in folds):
            return None
        out = []
        for check, model, r, counts in folds:
            _set_item_vectors(model, r, counts, 0.0)
            scales = [(counts.astype(np.float64) + 1.0) ** -e for e in self.exponents]
            metrics = check.scaled(model, scales)
            out.append(metrics if self.group is None else self.group.from_leader(metrics))
        return out

    def finish(self) -> None:
        """The kept model's temperature and tie-break (set once: rankings never depend on
        them), and the solver's state for a refit to start from."""
        _set_temperature(self.result.model, self.matrix, self.cfg, self.fit_rows, self.device, self._reduce())
        _set_tie_break(self.result.model, self.kept_counts)
        self.result.warm = self.solver.warm()
        self.solver, self.folds = None, []


def _dlae_model(n_items: int, cfg: ModelConfig, p: torch.Tensor, device: torch.device) -> Autoencoder:
    """An eval-mode :class:`Autoencoder` with input layer P (n_items, dim) and zero biases until
    :func:`_set_tie_break`; :func:`_set_item_vectors` sets its decoder's weight."""
    model = Autoencoder(AutoencoderShape(n_items, cfg.dim, (), "dlae", 0.0), device=device)
    with torch.no_grad():
        model.input_layer.weight.copy_(p)
        model.input_bias.zero_()
        model.decoder.bias.zero_()
    return model.eval()


def _set_item_vectors(model: Autoencoder, factors: torch.Tensor, counts: np.ndarray, exponent: float) -> None:
    """The decoder's weight = R's rows × (n_j + 1)^-``exponent`` (``counts`` (n_items,) n_j),
    and the same column scale on the sparse item-item part, where the model has one."""
    scale = torch.from_numpy((counts.astype(np.float64) + 1.0) ** -exponent).float().to(factors.device)
    with torch.no_grad():
        model.decoder.weight.copy_(factors * scale[:, None])
    if model.neighbours is not None:
        model.neighbours.column_scale = scale.cpu().numpy()


def _set_tie_break(model: Autoencoder, counts: np.ndarray) -> None:
    """Item biases of at most :data:`TIE_BREAK`, rising with log(n_j + 1): they decide only
    between scores tied to ~1e-5, above all for a user whose items no other training user has,
    whose embedding is ~0 and whose scores would otherwise all be 0 — such a user then gets
    the most popular items, the best a model that cannot relate their items can do."""
    logs = np.log1p(counts.astype(np.float64))
    with torch.no_grad():
        model.decoder.bias.copy_(torch.from_numpy(TIE_BREAK * logs / max(logs.max(), 1e-12)).float())


def _set_temperature(model: Autoencoder, matrix: InteractionMatrix, cfg: ModelConfig, rows: np.ndarray,
                     device: torch.device, reduce: linear.Reduce | None) -> None:
    """Scale the decoder's weight by the temperature that best explains a sample of the training
    users (:func:`aefeatures.model.linear.best_temperature`): rankings keep, the softmax's
    reconstruction error (and so the anomaly scores) becomes meaningful. Under torch.distributed
    each rank samples its share and the NLLs are summed (``reduce``)."""
    model.eval()
    with torch.no_grad():
        sample = np.random.default_rng(cfg.seed).choice(rows, min(TEMPERATURE_SAMPLE, len(rows)), replace=False)
        batch = to_batch(matrix, np.sort(sample), device)
        z, _ = model.encode(batch)
        t = linear.best_temperature(z, model.decoder.weight, batch.indices, batch.rows, batch.values, reduce)
        model.decoder.weight.mul_(t)
        if model.neighbours is not None:
            model.neighbours.column_scale = (model.neighbours.column_scale * float(t)).astype(np.float32)
