"""The publish-time quality gate: a new version goes live only if it is not clearly worse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aefeatures.config import GateConfig
from aefeatures.schema import KEY_METRIC


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it was refused, one per failed rule
    checked: dict[str, Any] = field(default_factory=dict)  # the numbers compared

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, **self.checked}


def check(cfg: GateConfig, evaluation: dict[str, Any] | None, previous: dict[str, Any] | None, *,
          index_recall: float = 1.0, min_recall: float = 0.0, skipped: str | None = None,
          drift: dict[str, Any] | None = None) -> Verdict:
    """Compare a run's validation metrics with popularity, with the EASE reference (when it was
    computed and `gate.min_vs_reference` is set) and with the live version's, its index's
    measured recall with the floor, and its recommendation churn with `gate.max_churn`.

    ``evaluation`` is the run's manifest `evaluation` section (None when evaluation is off:
    no metric to compare; ``skipped`` says why). ``previous`` is the live version's manifest,
    if any. Without evaluation the metric checks are skipped, and the verdict says so
    (``metric_checks: "skipped"``). ``drift`` is the run's manifest `drift` section (None
    without a live version).
    """
    reasons = []
    checked: dict[str, Any] = {"index_recall_at_10": index_recall, "min_recall": min_recall}
    if index_recall < min_recall:
        reasons.append(f"the index's recall@10 against exact search is {index_recall:.3f}, below "
                       f"`index.min_recall` = {min_recall:g}")
    churn = ((drift or {}).get("churn") or {}).get("mean")
    if cfg.max_churn < 1 and churn is not None:
        checked.update(churn=churn, max_churn=cfg.max_churn)
        if churn > cfg.max_churn:
            reasons.append(f"mean top-{drift['churn']['k']} churn against the live version is {churn:.3f}, above "
                           f"`gate.max_churn` = {cfg.max_churn:g}")
    if not evaluation:
        why = skipped or "evaluation is off"
        return Verdict(not reasons, reasons, {**checked, "metric_checks": "skipped",
                                              "note": f"metric checks skipped: {why}; no metric to check"})
    score = evaluation["model"][KEY_METRIC]
    checked.update(metric=KEY_METRIC, score=score)
    if cfg.beat_popularity:
        baseline = evaluation["popularity"][KEY_METRIC]
        checked["popularity"] = baseline
        if not score > baseline:
            reasons.append(f"validation {KEY_METRIC} {score:.4f} is not above popularity's {baseline:.4f}")
    reference = (evaluation.get("reference") or {}).get(KEY_METRIC)
    if reference is not None:
        checked["reference"] = reference
        checked["vs_reference"] = round(score / reference, 4) if reference > 0 else None
    if cfg.min_vs_reference > 0 and reference is not None:
        floor = cfg.min_vs_reference * reference
        checked["reference_floor"] = floor
        if score < floor:
            reasons.append(f"validation {KEY_METRIC} {score:.4f} is below {cfg.min_vs_reference:g} × EASE's "
                           f"{reference:.4f} (= {floor:.4f}, `gate.min_vs_reference`)")
    before = ((previous or {}).get("evaluation") or {}).get("model", {}).get(KEY_METRIC)
    if cfg.min_ratio > 0 and before is not None:
        floor = cfg.min_ratio * before
        checked.update(previous_version=previous["version"], previous=before, floor=floor)
        if score < floor:
            reasons.append(f"validation {KEY_METRIC} {score:.4f} is below {cfg.min_ratio:g} × the live "
                           f"version's {before:.4f} (= {floor:.4f})")
    return Verdict(not reasons, reasons, checked)
