"""Synthetic interactions shaped like MovieLens-20M, written as numbered Parquet parts and cached.

At scale 1.0: 138,493 users, 26,744 items, ~20,000,263 interactions, every user with at least
20 (as in ML-20M). Users' activity is long-tailed (log-normal above the minimum) and so is item
popularity (a shifted power law over a random item order). Planted structure: users belong to
communities and items to clusters, one per community; a share of each user's items is drawn from
their community's cluster, so a model has something to learn. In-cluster items get higher ratings.

Columns as in ML-20M's ratings: ``user_id`` (int64, dense 1..n), ``item_id`` (int64, sparse ids),
``rating`` (float32, half stars 0.5-5.0), ``timestamp`` (int64 epoch seconds). Rows are in
timestamp order, as logs arrive, so they are in random order with respect to users.

Everything is vectorised numpy: 20M rows generate in about half a minute on 2 cores with under
2 GB of memory. A finished data set is cached in a folder named after its parameters; the marker
``_shape.json`` (which readers skip, like Spark's ``_SUCCESS``) is written last.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GENERATOR_VERSION = 1  # bump when the rows a shape generates change, so caches are not reused
ML20M_USERS, ML20M_ITEMS, ML20M_INTERACTIONS = 138_493, 26_744, 20_000_263
MIN_PER_USER = 20  # every ML-20M user rated at least 20 movies
ACTIVITY_SIGMA = 1.1  # log-normal spread of activity above the minimum: median ~half the mean
POPULARITY_EXPONENT, POPULARITY_OFFSET = 2.0, 300  # item of rank r drawn ∝ (r + offset)^-exponent
ROWS_PER_FILE = 2_000_000
MARKER = "_shape.json"
START_EPOCH_S = 1_420_070_400  # 2015-01-01
SPAN_S = 3 * 365 * 86_400


@dataclass(frozen=True)
class Shape:
    users: int
    items: int
    interactions: int  # target number of distinct (user, item) pairs
    communities: int = 40
    in_cluster: float = 0.6  # share of a user's items drawn from their community's cluster
    seed: int = 0
    # Lower is a longer tail: at 2.0 only ~13% of a 1M catalogue gets an interaction from 20M
    # draws, at 1.0 (Zipf's law) ~98%.
    popularity_exponent: float = POPULARITY_EXPONENT

    @property
    def cache_name(self) -> str:
        tail = "" if self.popularity_exponent == POPULARITY_EXPONENT else f"-pe{self.popularity_exponent:g}"
        return (f"ml20m-shape-v{GENERATOR_VERSION}-{self.users}u-{self.items}i-{self.interactions}n"
                f"-c{self.communities}-in{self.in_cluster:g}-seed{self.seed}{tail}")


def shape_for(scale: float, *, items: int | None = None, seed: int = 0,
              popularity_exponent: float = POPULARITY_EXPONENT) -> Shape:
    """ML-20M's shape at ``scale``: users and interactions scale, the catalogue stays 26,744
    items unless ``items`` is given (a user never has more than half the catalogue)."""
    n_items = items or ML20M_ITEMS
    users = max(2, round(ML20M_USERS * scale))
    interactions = max(round(ML20M_INTERACTIONS * scale), users * min(MIN_PER_USER, n_items // 2))
    return Shape(users=users, items=n_items, interactions=interactions,
                 communities=min(40, max(1, n_items // 10)), seed=seed,
                 popularity_exponent=popularity_exponent)


def ensure(shape: Shape, cache_dir: Path) -> tuple[Path, dict]:
    """The folder holding ``shape``'s Parquet parts (generated unless cached) and its facts."""
    folder = cache_dir / shape.cache_name
    if (folder / MARKER).is_file():
        facts = json.loads((folder / MARKER).read_text())
        return folder, {**facts, "cached": True}
    partial = cache_dir / f".{shape.cache_name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    rows = write_parts(shape, partial)
    facts = {"shape": asdict(shape), "rows": rows, "files": len(part_files(partial)),
             "bytes": sum(f.stat().st_size for f in part_files(partial)),
             "generate_seconds": round(time.perf_counter() - started, 3)}
    (partial / MARKER).write_text(json.dumps(facts, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder, {**facts, "cached": False}


def part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def write_parts(shape: Shape, folder: Path) -> int:
    """Generate ``shape`` and write it as ``part-NNNNN.parquet`` files; return the row count."""
    rng = np.random.default_rng(shape.seed)
    users, items, ratings = generate_pairs(shape, rng)
    item_ids = np.sort(rng.choice(5 * shape.items, shape.items, replace=False) + 1).astype(np.int64)
    item_ids = item_ids[rng.permutation(shape.items)]  # id order says nothing about popularity
    n = len(users)
    order = rng.permutation(n)
    gaps = rng.exponential(SPAN_S / n, n)
    n_files = max(2, math.ceil(n / ROWS_PER_FILE))
    bounds = np.linspace(0, n, n_files + 1).astype(np.int64)
    clock = float(START_EPOCH_S)
    for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = order[a:b]
        stamps = clock + np.cumsum(gaps[a:b])
        clock = float(stamps[-1]) if len(stamps) else clock
        table = pa.table({
            "user_id": pa.array(users[rows].astype(np.int64) + 1),
            "item_id": pa.array(item_ids[items[rows]]),
            "rating": pa.array(ratings[rows]),
            "timestamp": pa.array(stamps.astype(np.int64)),
        })
        pq.write_table(table, folder / f"part-{part:05d}.parquet", compression="zstd")
    return n


def generate_pairs(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user rows, item rows, ratings) of distinct pairs, sorted by user then item."""
    community = rng.integers(0, shape.communities, shape.users).astype(np.int32)
    cluster = (rng.permutation(shape.items) % shape.communities).astype(np.int32)
    popularity = 1.0 / (np.arange(shape.items) + POPULARITY_OFFSET) ** shape.popularity_exponent
    popularity = popularity[rng.permutation(shape.items)]  # which item is popular is random
    wanted = user_activity(shape, rng)

    users = np.repeat(np.arange(shape.users, dtype=np.int32), wanted)
    in_cluster = rng.random(len(users)) < in_cluster_share(shape, wanted)[users]
    items = np.empty(len(users), dtype=np.int32)
    items[in_cluster] = draw_in_cluster(community[users[in_cluster]], cluster, popularity, rng)
    items[~in_cluster] = draw_global(int((~in_cluster).sum()), popularity, rng)
    codes = sorted_unique(users.astype(np.int64) * shape.items + items)
    del users, items, in_cluster
    codes = top_up(codes, wanted, shape.items, popularity, rng)

    users, items = (codes // shape.items).astype(np.int32), (codes % shape.items).astype(np.int32)
    return users, items, ratings_for(cluster[items] == community[users], rng)


def in_cluster_share(shape: Shape, wanted: np.ndarray) -> np.ndarray:
    """(users,) share of in-cluster draws: ``shape.in_cluster``, less for users so active that
    they would otherwise draw most of their cluster again and again."""
    cluster_size = shape.items / shape.communities
    return np.minimum(shape.in_cluster, 0.3 * cluster_size / wanted)


def user_activity(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """(users,) interactions per user: the minimum plus a log-normal share of the rest."""
    floor = min(MIN_PER_USER, shape.items // 2)
    spread = rng.lognormal(0.0, ACTIVITY_SIGMA, shape.users)
    extra = max(shape.interactions - floor * shape.users, 0)
    share = spread / spread.sum() * extra
    wanted = floor + np.floor(share + rng.random(shape.users)).astype(np.int64)  # rounds to the target on average
    return np.minimum(wanted, shape.items // 2)


def draw_global(n: int, popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(popularity)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(cdf) - 1).astype(np.int32)


def draw_in_cluster(clusters: np.ndarray, cluster: np.ndarray, popularity: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """One item per entry of ``clusters``, by popularity within that cluster.

    Items are laid out cluster by cluster on one axis where cluster c spans (c, c + 1]: a single
    ``searchsorted`` of ``c + uniform`` then samples every draw at once.
    """
    by_cluster = np.argsort(cluster, kind="stable")
    c = cluster[by_cluster]
    weights = popularity[by_cluster]
    cum = np.cumsum(weights)
    starts = np.searchsorted(c, np.arange(c.max() + 1))
    before = np.concatenate([[0.0], cum])[starts][c]  # cumulative weight before each cluster
    totals = np.bincount(c, weights=weights)[c]
    axis = c + (cum - before) / totals
    ends = np.append(starts[1:], len(c)) - 1
    axis[ends] = np.arange(len(ends)) + 1.0  # exact right edges: no draw falls into the next cluster
    positions = np.searchsorted(axis, clusters + rng.random(len(clusters)), side="right")
    return by_cluster[positions.clip(max=len(c) - 1)].astype(np.int32)


def top_up(codes: np.ndarray, wanted: np.ndarray, n_items: int, popularity: np.ndarray,
           rng: np.random.Generator, rounds: int = 6) -> np.ndarray:
    """Replace the pairs lost to duplicate draws by fresh draws from global popularity, at most
    the missing number per user (drawn 1.5× over, the surplus dropped at random)."""
    for _ in range(rounds):
        missing = np.maximum(wanted - np.bincount(codes // n_items, minlength=len(wanted)), 0)
        if not missing.any():
            break
        users = np.repeat(np.arange(len(wanted), dtype=np.int64), np.ceil(1.5 * missing).astype(np.int64))
        fresh = sorted_unique(users * n_items + draw_global(len(users), popularity, rng))
        fresh = fresh[~contains(codes, fresh)]
        fresh = at_most_per_user(fresh, missing, n_items, rng)
        codes = np.concatenate([codes, fresh])
        codes.sort(kind="stable")  # two sorted runs: a merge
    return codes


def sorted_unique(codes: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a plain sort: numpy's hash-based ``unique`` is slower here)."""
    codes = np.sort(codes)
    keep = np.ones(len(codes), dtype=bool)
    keep[1:] = codes[1:] != codes[:-1]
    return codes[keep]


def contains(sorted_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_codes, codes).clip(max=len(sorted_codes) - 1)
    return sorted_codes[pos] == codes


def at_most_per_user(codes: np.ndarray, limit: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of sorted ``codes`` with at most ``limit[u]`` pairs of each user u."""
    shuffled = codes[rng.permutation(len(codes))]
    shuffled = shuffled[np.argsort(shuffled // n_items, kind="stable")]  # by user, random within
    users = shuffled // n_items
    first = np.searchsorted(users, users)  # position of each user's first pair
    kept = shuffled[np.arange(len(users)) - first < limit[users]]
    return np.sort(kept)


def ratings_for(in_cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half-star ratings: ~4.1 on average in-cluster, ~3.1 elsewhere (ML-20M averages 3.5)."""
    liked = rng.choice(np.array([3.0, 3.5, 4.0, 4.5, 5.0], np.float32), len(in_cluster),
                       p=[0.1, 0.2, 0.3, 0.2, 0.2])
    other = rng.choice(np.arange(1, 11, dtype=np.float32) / 2, len(in_cluster),
                       p=[0.02, 0.04, 0.06, 0.1, 0.13, 0.2, 0.18, 0.14, 0.08, 0.05])
    return np.where(in_cluster, liked, other)
