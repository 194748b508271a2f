"""What training hands back: the trained model and its account (:class:`TrainResult`), and the
validator a run passes in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from aefeatures.model.autoencoder import Autoencoder

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
    threads: int = 0  # torch's intra-op threads (model.threads, or the CPUs the process may use)
    best_step: int = 0  # optimizer steps taken when the kept weights were
    max_epochs: int = 0  # the epoch cap this run had (cfg.epochs, raised to reach cfg.min_steps)
    # why training ended: "patience" (no better validation for model.patience epochs), "epochs"
    # (the cap), "max_minutes" (the wall-clock budget ran out; the best weights so far are kept),
    # "fitted" (dlae: every candidate fitted in closed form)
    stop_reason: str = "epochs"
    chosen: dict[str, float] = field(default_factory=dict)  # hyperparameters validation chose (dlae: dropout)
    refit: dict | None = None  # set by the job: how the published model was retrained on every user
    # dlae: the solver's state (linear.Warm: subspace, Gram), from which a refit on every user starts
    warm: Any = None
