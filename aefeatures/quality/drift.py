"""What changed between the live version and a new one, in numbers a person reads: the cosine
similarity of each shared user's and item's vectors, the churn of recommendations and the
movement of anomaly-score ranks. Numpy only; the caller pairs the shared rows.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CHURN_K = 10


def cosine_quantiles(live: np.ndarray, new: np.ndarray) -> dict[str, float | int]:
    """Quantiles, mean and count of the row-wise cosine similarity of ``live`` and ``new``
    ((n, dim) float32 each, row i the same entity in both versions). Empty input: count 0."""
    if len(live) == 0:
        return {"count": 0}
    num = np.einsum("ij,ij->i", live.astype(np.float64), new.astype(np.float64))
    den = np.linalg.norm(live, axis=1) * np.linalg.norm(new, axis=1)
    cos = num / np.maximum(den, 1e-12)
    out: dict[str, float | int] = {"count": int(len(cos)), "mean": float(cos.mean())}
    out.update({f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(cos, QUANTILES))})
    return out


def top_k(users: np.ndarray, items: np.ndarray, bias: np.ndarray, k: int) -> np.ndarray:
    """(n_users, k) item rows with the highest model score ``users @ items.T + bias``, best first
    (ties: lower row first). users (n, dim), items (m, dim), bias (m,)."""
    scores = users @ items.T + bias
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def churn(live_top: np.ndarray, new_top: np.ndarray) -> dict[str, float | int]:
    """Recommendation churn between two (n_users, k) top-k lists of shared item ids (the same
    users in the same order): 1 − |live ∩ new| / k per user, summarised (mean, median, share of
    users whose whole top-k changed). Ids must be comparable across versions (item ids, not rows)."""
    if len(live_top) == 0:
        return {"users": 0}
    k = live_top.shape[1]
    overlap = np.array([len(np.intersect1d(a, b)) for a, b in zip(live_top, new_top)]) / k
    changed = 1.0 - overlap
    return {"users": int(len(changed)), "k": int(k), "mean": float(changed.mean()),
            "median": float(np.median(changed)), "all_changed": float((overlap == 0).mean())}


def rank_change(live_scores: np.ndarray, new_scores: np.ndarray) -> dict[str, float | int]:
    """How far shared users moved in the anomaly ranking: Spearman's rank correlation of the two
    score arrays ((n,) each, same users), and the mean / 95th percentile absolute change of each
    user's percentile rank (0 to 1)."""
    n = len(live_scores)
    if n < 2:
        return {"users": int(n)}
    a = np.argsort(np.argsort(live_scores, kind="stable"), kind="stable") / (n - 1)
    b = np.argsort(np.argsort(new_scores, kind="stable"), kind="stable") / (n - 1)
    moved = np.abs(a - b)
    return {"users": int(n), "spearman": float(np.corrcoef(a, b)[0, 1]),
            "mean_abs_percentile_change": float(moved.mean()), "p95_abs_percentile_change": float(np.quantile(moved, 0.95))}


def describe(alignment: dict | None, drift: dict | None) -> list[str]:
    """Plain-text lines on a version's alignment and drift against the version live before it
    (the manifest's `alignment` and `drift` records); none for a feature set's first version."""
    lines = []
    if alignment:
        if alignment.get("aligned"):
            lines.append(f"aligned to {alignment['to_version']} over {alignment['shared_users']:,} users and "
                         f"{alignment['shared_items']:,} items: residual {alignment['residual']:.3f} "
                         f"(unaligned {alignment['residual_unaligned']:.3f})")
        else:
            lines.append(f"not aligned to {alignment['to_version']}: {alignment.get('reason')}")
    if drift and "user_cosine" in drift:
        for what in ("user", "item"):
            c = drift[f"{what}_cosine"]
            if c.get("count"):
                lines.append(f"{what} cosine vs live: median {c['q50']:.3f}, 5%–95% {c['q05']:.3f}–{c['q95']:.3f} "
                             f"over {c['count']:,} shared {what}s")
        ch = drift["churn"]
        if ch.get("users"):
            lines.append(f"top-{ch['k']} churn: mean {ch['mean']:.3f}, median {ch['median']:.3f}, "
                         f"{ch['all_changed']:.1%} of {ch['users']:,} users with a wholly new top-{ch['k']}")
        ar = drift["anomaly_rank"]
        if "spearman" in ar:
            lines.append(f"anomaly ranks: Spearman {ar['spearman']:.3f}, mean percentile move "
                         f"{ar['mean_abs_percentile_change']:.3f} (95th {ar['p95_abs_percentile_change']:.3f})")
    elif drift:
        lines.append(f"drift not measured: {drift.get('reason')}")
    return lines


def public(alignment: dict | None) -> dict | None:
    """The `alignment` record without its rotation matrix (for listings and the HTTP API)."""
    return None if alignment is None else {k: v for k, v in alignment.items() if k != "rotation"}
