"""Run the package's stages once on a data folder, timing each and sampling its memory.

    python benchmarks/stages.py DATA_DIR WORK_DIR --json-out stages.json [--model '{"batch_size": 1024}']

Started by ``benchmarks/pipeline.py`` as its own process, so the process's peak RSS is the job's
alone (not the data generator's, not the floors'). Calls only the package's stage functions —
read_interactions, build_matrix, train (one epoch), embed, write_tables, build_index — and looks
up through ``aefeatures.open_store``, so it measures whatever the package currently does.

Memory per stage: the peak RSS while the stage ran, taken from the kernel's high-water mark when
the stage raised it and otherwise from sampling /proc/self/statm every few milliseconds (so a
short spike below the process's earlier peak may be missed). It includes everything the process
still holds from earlier stages; ``rss_before_mb`` says how much that was.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from floors import lookup_rows

import aefeatures
from aefeatures.config import InputConfig, ModelConfig
from aefeatures.data.matrix import InteractionMatrix, build_matrix
from aefeatures.data.read import read_interactions
from aefeatures.model.autoencoder import Autoencoder, save_model
from aefeatures.model.device import select_device
from aefeatures.model.embed import Embeddings, embed
from aefeatures.model.train import train
from aefeatures.store import layout, publish, tables
from aefeatures.store.index import build_index, item_rows, save_index, user_queries

NAME = "bench"
STAGES = ("read_csr", "train_epoch", "embed", "write", "index_build", "lookup_single", "lookup_batch")
RECALL_QUERIES = 1000  # what a run measures an approximate index's recall on
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryWatch:
    """Peak RSS per stage: the kernel's high-water mark, or a sampling thread below it."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = current_rss_mb()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    @contextmanager
    def stage(self, name: str, record: dict[str, Any]) -> Iterator[None]:
        """Time the block and store seconds, rss_before_mb and peak_rss_mb in ``record``."""
        before, high_water = current_rss_mb(), high_water_mb()
        self.peak_mb = before
        start = time.perf_counter()
        yield
        record["seconds"] = time.perf_counter() - start
        raised = high_water_mb()
        record["rss_before_mb"] = round(before, 1)
        record["peak_rss_mb"] = round(raised if raised > high_water else max(self.peak_mb, current_rss_mb()), 1)
        print(f"    {name}: {record['seconds']:.3f} s, peak RSS {record['peak_rss_mb']:,.0f} MB",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_MB


def high_water_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_start_up(device: str) -> float:
    """Seconds of what a process pays once before its first training step, kept out of the
    epoch: torch.optim's first use imports torch._dynamo (~1 s), and a GPU's context is made."""
    started = time.perf_counter()
    import torch._dynamo  # noqa: F401 - what the first torch.optim optimizer would import

    chosen = select_device(device)
    if chosen.type == "cuda":
        torch.zeros(1, device=chosen)
        torch.cuda.synchronize(chosen)
    return time.perf_counter() - started


def run_stages(data_dir: Path, work: Path, model: ModelConfig, *, single: int, batch: int, k: int) -> dict[str, Any]:
    """Every stage once, in job order; returns the facts the report and the floors need."""
    watch = MemoryWatch()
    rss_at_start = current_rss_mb()
    stages: dict[str, dict] = {name: {} for name in STAGES}

    with watch.stage("read_csr", stages["read_csr"]):
        read_started = time.perf_counter()
        interactions = read_interactions(InputConfig(str(data_dir), weight_col="rating", timestamp_col="timestamp"))
        read_seconds = time.perf_counter() - read_started
        matrix = build_matrix(interactions)
    stages["read_csr"]["detail"] = {"read_seconds": read_seconds,
                                    "matrix_seconds": stages["read_csr"]["seconds"] - read_seconds,
                                    "rows_read": interactions.n_rows_read}
    start_up = process_start_up(model.device)
    with watch.stage("train_epoch", stages["train_epoch"]):
        trained = train(matrix, model, progress=False)
    stages["train_epoch"]["detail"] = {"steps": trained.steps, "device": trained.device,
                                       "loss": trained.epoch_losses[-1], "start_up_seconds": start_up}
    with watch.stage("embed", stages["embed"]):
        emb = embed(trained.model, matrix)
    root = work / "store"
    version_dir = write_version(watch, stages, root, matrix, emb, trained.model, seed=model.seed)

    shape, nnz, user_ids = matrix.shape, matrix.nnz, matrix.user_ids
    del interactions, matrix, emb, trained  # a lookup service holds none of these
    gc.collect()
    lookups = measure_lookups(watch, stages, root, user_ids, single=single, batch=batch, k=k)
    watch.close()
    return {
        "matrix": {"users": shape[0], "items": shape[1], "nnz": nnz},
        "model": {**asdict(model), "hidden": list(model.hidden)},
        "version_dir": str(version_dir),
        "lookups": lookups,
        "stages": stages,
        "rss_at_start_mb": round(rss_at_start, 1),
        # the kernel's high-water mark, or a stage's sampled peak where /proc's resident count read
        # a little above it (the two count shared pages apart)
        "peak_rss_mb": round(max([high_water_mb(), *(row.get("peak_rss_mb", 0.0) for row in stages.values())]), 1),
        "torch_threads": torch.get_num_threads(),
        "aefeatures_version": aefeatures.__version__,
    }


def write_version(watch: MemoryWatch, stages: dict, root: Path, matrix: InteractionMatrix, emb: Embeddings,
                  model: Autoencoder, *, seed: int) -> Path:
    """Time writing the tables and model, then building and saving the index; publish the
    version (untimed) so lookups open it like any store."""
    version = datetime.now(timezone.utc).strftime(layout.VERSION_FORMAT)
    staging = publish.start_version(root, NAME, version)
    with watch.stage("write", stages["write"]):
        counts = tables.write_tables(staging, matrix, emb, name=NAME, version=version,
                                    created=datetime.now(timezone.utc))
        save_model(model, staging / layout.MODEL_DIR)
    with watch.stage("index_build", stages["index_build"]):
        n_users = matrix.shape[0]
        sample = np.random.default_rng(seed).choice(n_users, min(RECALL_QUERIES, n_users), replace=False)
        built = build_index(item_rows(emb.item_vectors, emb.item_bias), "auto",
                            sample_queries=user_queries(emb.user_vectors[sample]))
        save_index(built.index, staging / layout.INDEX)
    stages["index_build"]["detail"] = {"factory": built.factory, "recall_at_10": built.recall_at_10}
    publish.write_manifest(staging, {"feature_set": NAME, "version": version, "dim": emb.dim, "counts": counts,
                                   "index": {"kind": "auto", "factory": built.factory}})
    return publish.publish(root, NAME, staging)


def measure_lookups(watch: MemoryWatch, stages: dict, root: Path, user_ids, *,
                    single: int, batch: int, k: int) -> dict[str, Any]:
    """Open the store (loading tables and index on the first call), then time recommend calls."""
    single_ids = user_ids.gather(lookup_rows(len(user_ids), single)).to_list()
    batch_ids = user_ids.gather(lookup_rows(len(user_ids), batch)).to_list()
    opened = time.perf_counter()
    features = aefeatures.open_store(root)[NAME]
    features.recommend(single_ids[0], k=k)  # loads users, items, interactions and the index
    open_seconds = time.perf_counter() - opened
    with watch.stage("lookup_single", stages["lookup_single"]):
        for user in single_ids:
            features.recommend(user, k=k)
    stages["lookup_single"]["detail"] = {"calls": len(single_ids), "k": k,
                                         "total_seconds": stages["lookup_single"]["seconds"]}
    stages["lookup_single"]["seconds"] /= len(single_ids)  # per call
    with watch.stage("lookup_batch", stages["lookup_batch"]):
        recs = features.recommend_batch(batch_ids, k=k)
    stages["lookup_batch"]["detail"] = {"users": len(batch_ids), "k": k, "rows": recs.height}
    return {"open_seconds": open_seconds, "single": len(single_ids), "batch": len(batch_ids), "k": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--model", default="{}", help="ModelConfig fields as JSON (epochs is always 1)")
    parser.add_argument("--single", type=int, default=1000, help="single-user recommend calls")
    parser.add_argument("--batch", type=int, default=10000, help="users in one recommend_batch call")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    overrides = json.loads(args.model)
    if "hidden" in overrides:
        overrides["hidden"] = tuple(overrides["hidden"])
    # The dae: the epoch's floor (floors.py) counts a dae's FLOPs; a dlae has no epochs.
    model = replace(ModelConfig(kind=overrides.pop("kind", "dae")), **{**overrides, "epochs": 1, "patience": 0,
                                                                      "min_steps": 0})
    result = run_stages(args.data_dir, args.work_dir, model, single=args.single, batch=args.batch, k=args.k)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
