"""Anomaly scores from reconstruction error, comparable across users of any activity.

A user's reconstruction error (multinomial NLL per interaction) depends on how many items
they have, so raw errors of a heavy and a light user do not compare. The score is the robust
z-score of the error against what is typical for that activity level: the median error of
users with a similar number of items (buckets of log2 activity with at least 50 users,
interpolated between bucket centres and flat beyond the outer ones), divided by the median absolute deviation of all residuals.
Bots and random clickers
— whose items the model cannot explain — get the highest scores.
"""

from __future__ import annotations

import numpy as np

# Users a bucket needs before its median is trusted: large enough that a group of anomalous
# users (bots with one item each, say) cannot form a bucket of their own and look typical.
MIN_BUCKET = 50


def anomaly_scores(errors: np.ndarray, n_interactions: np.ndarray) -> np.ndarray:
    """(n_users,) float32 robust z-scores of ``errors`` given ``n_interactions`` (both (n_users,))."""
    if len(errors) == 0:
        return np.zeros(0, np.float32)
    activity = np.log2(np.maximum(n_interactions, 1))
    buckets = np.floor(activity).astype(int)
    centres, medians = [], []
    for b in np.unique(buckets):
        members = buckets == b
        if members.sum() >= MIN_BUCKET:
            centres.append(activity[members].mean())
            medians.append(np.median(errors[members]))
    if not centres:  # too few users to model activity: compare with everyone
        centres, medians = [0.0], [float(np.median(errors))]
    expected = np.interp(activity, centres, medians)  # flat beyond the outer buckets
    residual = errors - expected
    scale = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    return (residual / (scale if scale > 0 else 1.0)).astype(np.float32)
