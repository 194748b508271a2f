"""Request-time lookups from a history against a known user's lookup, at 100k items.

    python benchmarks/history_lookup.py                 # 100k items, ~1 minute
    python benchmarks/history_lookup.py --items 20000 --lookups 200   # a smoke run

A version is written as ``filtered_lookup.py`` writes one (``--items`` items, ``--users``
users, 64-dim vectors, the flat index `auto` picks at 100k), plus a stored encoder of the dlae's
form (one (items × dim) input layer, no hidden layer) or, with ``--hidden``, a dae's (the input
layer to ``--hidden`` wide, tanh, a linear layer to dim). Its weights are random: latency does
not depend on their values. Then, interleaved, for random known users: ``recommend(user, k=10)``
(the floor: the stored embedding) and ``recommend_history(50 item ids, k=10)`` (the history
encoded in numpy, then the same search) through the Python API, and the same two through the
HTTP service (`aefeatures serve`, one process, GET ?user= against POST {"history": ...}).
Reports p50/p99 and the history's p99 as a ratio of the known user's. FAISS runs on one thread.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import faiss
import numpy as np
from filtered_lookup import add_version_args, write_version
from pipeline import RESULTS, machine, say, versions

from aefeatures.store import layout
from aefeatures.store.encoder import ENCODER_DIR, write_encoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_args(parser)
    parser.add_argument("--hidden", type=int, default=0, help="a dae's hidden width (0: the dlae's form)")
    parser.add_argument("--history", type=int, default=50, help="items per history")
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "history-lookup.json")
    return parser.parse_args(argv)


def add_encoder(path: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed + 2)
    width = args.hidden or args.dim
    arrays = {"input.weight": rng.normal(size=(args.items, width)).astype(np.float32) / np.sqrt(width),
              "input.bias": np.zeros(width, np.float32)}
    if args.hidden:
        arrays["layer.0.weight"] = rng.normal(size=(args.dim, width)).astype(np.float32) / np.sqrt(width)
        arrays["layer.0.bias"] = np.zeros(args.dim, np.float32)
    write_encoder(path / layout.MODEL_DIR / ENCODER_DIR, kind="dae" if args.hidden else "dlae", dim=args.dim,
                  arrays=arrays)


def python_times(fs, users, histories) -> tuple[np.ndarray, np.ndarray]:
    known, history = np.empty(len(users)), np.empty(len(users))
    for n, (user, items) in enumerate(zip(users.tolist(), histories)):
        start = time.perf_counter()
        assert len(fs.recommend(user, k=10).ids) == 10
        known[n] = time.perf_counter() - start
        start = time.perf_counter()
        assert len(fs.recommend_history(items, k=10).ids) == 10
        history[n] = time.perf_counter() - start
    return known, history


def http_times(root: Path, users, histories) -> tuple[np.ndarray, np.ndarray]:
    proc = subprocess.Popen([sys.executable, "-m", "aefeatures", "serve", "--store", str(root), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def call(method: str, path: str, body: bytes | None = None) -> float:
            start = time.perf_counter()
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            answer = conn.getresponse()
            payload = answer.read()
            assert answer.status == 200, payload[:200]
            return time.perf_counter() - start

        call("GET", f"/v1/bench/recommend?user={int(users[0])}&k=10")
        call("POST", "/v1/bench/recommend", json.dumps({"history": histories[0], "k": 10}).encode())
        known, history = np.empty(len(users)), np.empty(len(users))
        for n, (user, items) in enumerate(zip(users.tolist(), histories)):
            known[n] = call("GET", f"/v1/bench/recommend?user={user}&k=10")
            history[n] = call("POST", "/v1/bench/recommend", json.dumps({"history": items, "k": 10}).encode())
        conn.close()
        return known, history
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faiss.omp_set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fs = write_version(Path(tmp), args, "flat")
        add_encoder(fs.path, args)
        rng = np.random.default_rng(args.seed + 1)
        users = rng.choice(fs.user_ids, args.lookups)
        histories = [[int(i) for i in rng.choice(fs.item_ids, args.history, replace=False)] for _ in users]
        fs.recommend(int(users[0]), k=10)
        fs.recommend_history(histories[0], k=10)  # warm: the index pages and the encoder's first rows
        for via, (known, history) in (("python", python_times(fs, users, histories)),
                                      ("http", http_times(Path(tmp), users, histories))):
            row = {"via": via, "known_p50_ms": 1e3 * np.median(known), "known_p99_ms": 1e3 * np.percentile(known, 99),
                   "history_p50_ms": 1e3 * np.median(history), "history_p99_ms": 1e3 * np.percentile(history, 99)}
            row["ratio_p50"] = row["history_p50_ms"] / row["known_p50_ms"]
            row["ratio_p99"] = row["history_p99_ms"] / row["known_p99_ms"]
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            say(json.dumps(rows[-1]))
    result = {"date": date.today().isoformat(), "machine": machine(), "versions": versions(),
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
