"""Synthetic interactions with planted structure, for fixtures, tests and benchmarks.

Users belong to communities; items to clusters (one per community). Each user picks most of
their items from their community's cluster, the rest from the whole catalogue, always with
Zipf-like popularity. In-cluster items get higher ratings. The planted truth is returned with
the data so recommendations can be checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import polars as pl

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class PlantedData:
    interactions: pl.DataFrame  # user_id, item_id, rating (int8 1-5), timestamp (UTC)
    user_community: pl.DataFrame  # user_id, community
    item_cluster: pl.DataFrame  # item_id, cluster


def generate(
    *,
    n_users: int = 2000,
    n_items: int = 500,
    n_communities: int = 8,
    mean_items: float = 25.0,
    in_cluster: float = 0.8,
    zipf: float = 1.0,
    duplicates: float = 0.02,
    days: int = 90,
    string_ids: bool = False,
    random_clickers: int = 0,
    spammers: int = 0,
    seed: int = 0,
) -> PlantedData:
    """Generate interactions; the same arguments always give the same rows.

    Parameters
    ----------
    in_cluster
        Share of a user's items drawn from their community's cluster (the rest is noise).
    zipf
        Exponent of item popularity (weight of the r-th most popular item ∝ r^-zipf).
    duplicates
        Share of extra rows that repeat an existing (user, item) pair with a new rating.
    string_ids
        Ids like ``"u00042"`` / ``"i0007"`` instead of integers.
    random_clickers, spammers
        Planted anomalous users, appended after the regular ones with community -1: random
        clickers pick items uniformly at random; spammers hit one rarely used item many times.
        All their ratings are 5.
    """
    rng = np.random.default_rng(seed)
    cluster = rng.permutation(n_items) % n_communities  # (n_items,)
    popularity = 1.0 / np.arange(1, n_items + 1) ** zipf
    popularity = popularity[rng.permutation(n_items)]  # which item is popular is random
    community = rng.integers(0, n_communities, n_users)  # (n_users,)
    sizes = np.clip(rng.lognormal(np.log(mean_items), 0.6, n_users).astype(int), 5, n_items // 2)

    members = [np.flatnonzero(cluster == c) for c in range(n_communities)]
    global_p = popularity / popularity.sum()
    users, items, inside = [], [], []
    for u in range(n_users):
        pool = members[community[u]]
        n_in = min(rng.binomial(sizes[u], in_cluster), len(pool))
        chosen_in = rng.choice(pool, n_in, replace=False, p=popularity[pool] / popularity[pool].sum())
        noise = rng.choice(n_items, sizes[u] - n_in, replace=True, p=global_p)
        picked = np.unique(np.concatenate([chosen_in, noise]))
        users.append(np.full(len(picked), u))
        items.append(picked)
        inside.append(cluster[picked] == community[u])
    user, item, hit = np.concatenate(users), np.concatenate(items), np.concatenate(inside)

    extra = rng.choice(len(user), int(duplicates * len(user)), replace=False)
    user, item, hit = (np.concatenate([a, a[extra]]) for a in (user, item, hit))
    rating = np.where(hit, rng.choice([3, 4, 5], len(user), p=[0.15, 0.35, 0.5]),
                      rng.choice([1, 2, 3, 4], len(user), p=[0.3, 0.3, 0.25, 0.15])).astype(np.int8)
    odd_user, odd_item = _anomalies(rng, n_users, n_items, popularity, sizes, random_clickers, spammers)
    user, item = np.concatenate([user, odd_user]), np.concatenate([item, odd_item])
    rating = np.concatenate([rating, np.full(len(odd_user), 5, np.int8)])
    community = np.concatenate([community, np.full(random_clickers + spammers, -1)])
    n_users += random_clickers + spammers
    seconds = rng.integers(0, days * 86400, len(user))
    order = rng.permutation(len(user))  # logs arrive unordered

    uid, iid = _ids(n_users, "u", string_ids), _ids(n_items, "i", string_ids)
    interactions = pl.DataFrame({
        "user_id": uid[user[order]],
        "item_id": iid[item[order]],
        "rating": rating[order],
        "timestamp": (np.datetime64(START.replace(tzinfo=None), "s") + seconds[order]).astype("datetime64[us]"),
    }).with_columns(pl.col("timestamp").dt.replace_time_zone("UTC"))
    return PlantedData(
        interactions=interactions,
        user_community=pl.DataFrame({"user_id": uid, "community": community.astype(np.int32)}),
        item_cluster=pl.DataFrame({"item_id": iid, "cluster": cluster.astype(np.int32)}),
    )


def _anomalies(rng, n_users, n_items, popularity, sizes, n_random, n_spam) -> tuple[np.ndarray, np.ndarray]:
    users, items = [], []
    for k in range(n_random):
        picked = rng.choice(n_items, int(rng.choice(sizes)), replace=False)
        users.append(np.full(len(picked), n_users + k))
        items.append(picked)
    rare = np.argsort(popularity)[: max(n_spam, 1)]
    for k in range(n_spam):
        repeats = int(rng.integers(5, 20))
        users.append(np.full(repeats, n_users + n_random + k))
        items.append(np.full(repeats, rare[k]))
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def _ids(n: int, prefix: str, as_strings: bool) -> np.ndarray:
    if as_strings:
        width = len(str(n))
        return np.array([f"{prefix}{i:0{width}d}" for i in range(1, n + 1)])
    return np.arange(1, n + 1, dtype=np.int64)
