"""A normal request's latency while other clients churn pinned versions, against the same service idle.

    python benchmarks/service_churn.py                        # 100k items, 6 versions, a 33 MB run log
    python benchmarks/service_churn.py --items 20000 --users 5000 --seconds 2 --rounds 1   # a smoke run

A version is written as ``filtered_lookup.py`` writes one (``--items`` items, ``--users`` users,
a Flat index) and cloned (hard links, a manifest of its own) into ``--versions`` versions, the
last one live; the feature set's ``runs.jsonl`` is padded with ``--runlog-mb`` of run entries
that name none of the versions asked for. One `aefeatures serve` process answers:

- the **normal** client: one connection, `GET /v1/bench/recommend?user=U&k=10` for random
  users, one request at a time; its latencies are what is reported;
- the **churn** clients (``--churn`` connections, each its own process), during churn windows
  only: the same request pinned with `?version=` to the old versions in turn (more of them
  than the service keeps loaded) and to versions that do not exist (a new id each time, so
  each reads the run log's tail to tell "deleted by retention" from "never published").

Windows of ``--seconds`` alternate ``--rounds`` times (idle, control, churn), so a pause of
the shared machine lands on all alike; the control window has as many other clients asking the
live version only, to tell the cost of pinned versions from that of more clients. Reports the
normal request's p50/p99 in each, the churn/idle ratios (the goal: p99 under churn within 2× of
idle) and what the churn clients got (status counts: 200, 404 for unknown versions, 503 while
the service was loading another version). Writes JSON to benchmarks/results/service-churn.json
(``--json-out``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sys.path.insert(0, str(HERE))
    from filtered_lookup import add_version_args  # heavy imports only in the parent, not in the clients

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_args(parser)
    parser.add_argument("--versions", type=int, default=6, help="published versions, the last one live")
    parser.add_argument("--runlog-mb", type=float, default=33.0, help="size of the padded runs.jsonl")
    parser.add_argument("--churn", type=int, default=2, help="churn connections (processes)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    parser.add_argument("--rounds", type=int, default=3, help="idle + churn window pairs")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aefeatures-bench")
    parser.add_argument("--json-out", type=Path, default=HERE / "results" / "service-churn.json")
    return parser.parse_args(argv)


def build_store(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """(store, version ids oldest first), cached under --cache by its parameters."""
    from filtered_lookup import write_version  # noqa: E402

    folder = args.cache / f"churn_{args.users}u_{args.items}i_{args.seen}s_{args.dim}d_{args.versions}v"
    store = folder / "store"
    ids = [f"20260101T{n:06d}.000000Z" for n in range(args.versions)]
    if not (store / NAME / "LATEST").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        staging = folder / "first"
        write_version(staging, args, "flat")
        source = staging / NAME / "versions" / "v1"
        for version in ids:
            target = store / NAME / "versions" / version
            shutil.copytree(source, target, copy_function=os.link)
            manifest = json.loads((source / "manifest.json").read_text())
            (target / "manifest.json").unlink()  # a file of its own, not a link to the source's
            (target / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
        (store / NAME / "LATEST").write_text(ids[-1] + "\n")
        shutil.rmtree(staging)
    pad_run_log(store / NAME / "runs.jsonl", args.runlog_mb)
    return store, ids


def pad_run_log(path: Path, megabytes: float) -> None:
    """A run log of about ``megabytes`` MB: run entries that removed versions no client asks for."""
    if path.is_file() and abs(path.stat().st_size - megabytes * 1e6) < 1e6:
        return
    lines, size, n = [], 0, 0
    while size < megabytes * 1e6:
        entry = {"started": f"2025-01-01T00:00:{n % 60:02d}+00:00", "command": "run", "job": "/jobs/bench.toml",
                 "pid": 1000 + n, "force": False, "status": "published", "exit_code": 0,
                 "version": f"2025{n:011d}", "removed_by_retention": [f"versions/2024{n:011d}"],
                 "counts": {"users": 20000, "items": 100000, "interactions": 400000},
                 "timings": {"read": 0.03, "matrix": 0.02, "train": 12.5, "write": 0.5, "publish": 0.02},
                 "ended": "2025-01-01T00:01:00+00:00"}
        line = json.dumps(entry) + "\n"
        lines.append(line)
        size += len(line)
        n += 1
    path.write_text("".join(lines))


# --- clients: plain http.client over one keep-alive connection, each in its own process ---------

def client(port: int, paths: list[str], seconds: float, out, seed: int) -> None:
    """Send GET ``paths`` (chosen at random; ``{rand}`` replaced by a random number) one at a
    time for ``seconds``; put [(seconds, status), ...] on ``out``."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    got = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        path = rng.choice(paths).replace("{rand}", str(rng.randrange(10**9)))
        start = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            status = 0
        got.append((time.perf_counter() - start, status))
        if status == 503:
            time.sleep(0.001 * rng.randrange(5, 20))  # what a client told Retry-After would do, shortened
    conn.close()
    out.put(got)


def window(port: int, normal: list[str], others: list[str] | None, args: argparse.Namespace,
           seed: int) -> tuple[list, list]:
    """One window: the normal client alone (``others`` None), or with --churn clients sending
    ``others``; (normal, others) results."""
    ctx = multiprocessing.get_context("spawn")
    out_normal, out_churn = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=client, args=(port, others, args.seconds + 0.5, out_churn, seed + 1 + c))
             for c in range(args.churn if others else 0)]
    for p in procs:
        p.start()
    if procs:
        time.sleep(0.5)  # the other clients are under way before the measured requests start
    measured = ctx.Process(target=client, args=(port, normal, args.seconds, out_normal, seed))
    measured.start()
    got_normal = out_normal.get()
    got_churn = [x for _ in procs for x in out_churn.get()]
    for p in [measured, *procs]:
        p.join()
    return got_normal, got_churn


def percentiles(latencies: list[float]) -> dict:
    import numpy as np

    ms = 1e3 * np.asarray(latencies)
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline import machine, say, versions  # noqa: E402

    began = time.perf_counter()
    store, ids = build_store(args)
    import pyarrow.parquet as pq

    users = pq.read_table(store / NAME / "versions" / ids[-1] / "users.parquet", columns=["user_id"])
    users = users.column("user_id").to_pylist()
    rng = random.Random(args.seed)
    sample = rng.sample(users, min(500, len(users)))
    normal = [f"/v1/{NAME}/recommend?user={u}&k=10" for u in sample]
    churn = ([f"/v1/{NAME}/recommend?user={u}&k=10&version={v}" for v in ids[:-1] for u in sample[:20]]
             + [f"/v1/{NAME}/recommend?user={sample[0]}&k=10&version=20990101T{{rand}}Z"] * 20 * (len(ids) - 1))
    control = [f"/v1/{NAME}/recommend?user={u}&k=10" for u in sample[:100]]  # as many clients, live version
    say(f"store {store}: {len(ids)} versions, run log {(store / NAME / 'runs.jsonl').stat().st_size / 1e6:.1f} MB")
    from service_load import start_service  # a sibling script, on sys.path since parse_args

    proc, port = start_service(store)
    phases: dict[str, list] = {"idle": [], "live": [], "churn": []}
    churned: list = []
    try:
        window(port, normal, None, argparse.Namespace(**{**vars(args), "seconds": 1.0}), 0)  # warm-up
        for r in range(args.rounds):
            for n, (phase, others) in enumerate((("idle", None), ("live", control), ("churn", churn))):
                got, other = window(port, normal, others, args, 100 * r + 10 * n)
                bad = [s for _, s in got if s != 200]
                if bad:
                    raise SystemExit(f"the normal client got {len(bad)} answers that are not 200: {sorted(set(bad))}")
                phases[phase] += [t for t, _ in got]
                if phase == "churn":
                    churned += other
                say(f"round {r + 1} {phase}: {percentiles([t for t, _ in got])}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    idle, live, busy = (percentiles(phases[p]) for p in ("idle", "live", "churn"))
    statuses: dict[str, int] = {}
    for _, status in churned:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    result = {
        "date": date.today().isoformat(), "machine": machine(), "versions": versions(),
        "args": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.perf_counter() - began, 1),
        "store": {"items": args.items, "users": args.users, "versions": len(ids),
                  "run_log_mb": round((store / NAME / "runs.jsonl").stat().st_size / 1e6, 1)},
        "normal_idle": idle, "normal_churn": busy, "normal_beside_live_clients": live,
        "ratio_p50": busy["p50_ms"] / idle["p50_ms"], "ratio_p99": busy["p99_ms"] / idle["p99_ms"],
        "control_ratio_p99": live["p99_ms"] / idle["p99_ms"],
        "churn_requests": {"count": len(churned), "by_status": statuses,
                           **({"p50_ms": percentiles([t for t, _ in churned])["p50_ms"]} if churned else {})},
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"normal request, idle:  p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms ({idle['requests']} requests)")
    print(f"normal request, beside as many clients of the live version: p50 {live['p50_ms']:.2f} ms, "
          f"p99 {live['p99_ms']:.2f} ms ({live['requests']} requests)")
    print(f"normal request, churn: p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms ({busy['requests']} requests)")
    print(f"ratio under churn: p50 {result['ratio_p50']:.2f}x, p99 {result['ratio_p99']:.2f}x (goal: p99 within 2x)")
    print(f"churn requests: {len(churned)}, by status {statuses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
