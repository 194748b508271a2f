"""A normal client's latency while slow clients flood `aefeatures serve`, next to the same
client on the idle service, in one run on one machine.

    python benchmarks/service_flood.py                          # 500 slow clients, 3 rounds of 1,000 requests
    python benchmarks/service_flood.py --stalled 100 --requests 300 --rounds 1   # smoke run

A real job builds a small store once (cached under --cache, as benchmarks/service_load.py
does). The service runs with its default limits. One client sends `recommend` requests one
after the other, on one kept-alive connection and on a new connection each, and their
latencies are recorded, first with the service idle, then under a flood: --stalled slow
clients, from a process of their own — four in five send a request's headers one byte a
second (slowloris), one in five sends headers and then its body one byte a second — kept at
that number (a client the service closes is replaced; the first are closed after the 10 s
header deadline, so timing starts --settle seconds in, with clients cycling). Idle and flood
alternate for --rounds rounds, so a load that other processes put on the machine falls on
both alike. Prints p50/p99 of each (all rounds pooled), the flood ÷ idle ratios (the goal: p99
within 2× of idle), what the service did to the slow clients and its open descriptors;
--json-out keeps it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import NAME, build_store, start_service  # noqa: E402  (a sibling script, not a package)


class Flood:
    """``n`` slow clients kept connected to 127.0.0.1:``port`` from a thread of their own
    (run it in a process of its own: see :func:`flood_process`)."""

    def __init__(self, port: int, n: int, user: int):
        self.port, self.n = port, n
        self.header = f"GET /v1/{NAME}/recommend?user={user}&k=10 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        self.body_head = (f"POST /v1/{NAME}/recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          "Content-Length: 100000\r\n\r\n").encode()
        self.selector = selectors.DefaultSelector()
        self.clients: dict[socket.socket, list] = {}  # socket -> [kind, bytes sent]
        self.opened = self.closed_by_service = self.answered_408 = self.refused_503 = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        while len(self.clients) < self.n:
            self._open()
        self.thread.start()

    def _open(self) -> None:
        kind = "body" if self.opened % 5 == 4 else "header"
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        if kind == "body":
            sock.send(self.body_head)
        self.clients[sock] = [kind, 0]
        self.selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        next_byte = time.monotonic()
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    self.answered_408 += 1
                elif data.startswith(b"HTTP/1.1 503"):
                    self.refused_503 += 1
                self._drop(sock)
                self.closed_by_service += 1
            if time.monotonic() >= next_byte:  # one more byte from every slow client, once a second
                next_byte += 1.0
                for sock, state in list(self.clients.items()):
                    kind, sent = state
                    payload = self.header[sent:sent + 1] if kind == "header" else b"x"
                    try:
                        sock.send(payload or b"X")
                    except OSError:
                        continue
                    state[1] += 1
            while len(self.clients) < self.n and not self.stop.is_set():
                try:
                    self._open()
                except OSError:
                    break

    def _drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        self.clients.pop(sock, None)
        sock.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in list(self.clients):
            self._drop(sock)


def flood_process(port: int, n: int, user: int, started, stop, stats) -> None:
    """A :class:`Flood` in a separate process, so the timed client never waits for its GIL."""
    flood = Flood(port, n, user)
    flood.start()
    started.set()
    stop.wait()
    flood.close()
    stats.put({"kept_connected": n, "opened": flood.opened, "closed_by_service": flood.closed_by_service,
               "answered_408": flood.answered_408, "refused_503": flood.refused_503})


def timed_requests(port: int, users: list, n: int, keep_alive: bool) -> tuple[list[float], int]:
    """``n`` GET recommend requests one after another: their latencies (ms) and how many failed."""
    latencies, errors = [], 0
    conn = None
    for i in range(n):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start = time.perf_counter()
        try:
            conn.request("GET", f"/v1/{NAME}/recommend?user={users[i % len(users)]}&k=10")
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except OSError:
            ok = False
        latencies.append(time.perf_counter() - start)
        errors += not ok
        if not keep_alive or not ok:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return [1000 * t for t in latencies], errors


def open_descriptors(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--stalled", type=int, default=500, help="slow clients kept connected during the flood")
    parser.add_argument("--requests", type=int, default=1000,
                        help="timed requests per round, phase and connection mode")
    parser.add_argument("--rounds", type=int, default=3, help="idle-then-flood rounds")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds the flood runs before timing (past the 10 s header deadline: clients cycle)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "aefeatures-bench")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import aefeatures

    store = build_store(args.cache, args.users, args.items, args.epochs)
    fs = aefeatures.open_store(store)[NAME]
    users = np.random.default_rng(0).choice(fs.user_ids, 1000).tolist()
    proc, port = start_service(store)
    modes = (("keep-alive", True), ("new connection", False))
    latencies: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    slow, fds = [], {"idle": None, "flood": None}
    try:
        timed_requests(port, users, 200, keep_alive=True)  # warm-up, not measured
        for round_ in range(args.rounds):
            for mode, keep_alive in modes:
                ms, errs = timed_requests(port, users, args.requests, keep_alive)
                latencies.setdefault(("idle", mode), []).extend(ms)
                errors[("idle", mode)] = errors.get(("idle", mode), 0) + errs
            fds["idle"] = open_descriptors(proc.pid)
            started, stop, stats = mp.Event(), mp.Event(), mp.Queue()
            flood = mp.Process(target=flood_process, args=(port, args.stalled, users[0], started, stop, stats))
            flood.start()
            try:
                if not started.wait(120):
                    raise SystemExit("the slow clients could not connect")
                time.sleep(args.settle)
                fds["flood"] = open_descriptors(proc.pid)
                for mode, keep_alive in modes:
                    ms, errs = timed_requests(port, users, args.requests, keep_alive)
                    latencies.setdefault(("flood", mode), []).extend(ms)
                    errors[("flood", mode)] = errors.get(("flood", mode), 0) + errs
            finally:
                stop.set()
                slow.append(stats.get(timeout=120))
                flood.join(timeout=60)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    rows = []
    for (phase, mode), ms in latencies.items():
        values = np.array(ms)
        rows.append({"phase": phase, "connection": mode, "requests": len(values),
                     "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
                     "max_ms": float(values.max()), "errors": errors[(phase, mode)]})
    slow = {key: sum(s[key] for s in slow) for key in slow[0]} | {"kept_connected": args.stalled}
    ratios = {}
    for mode in ("keep-alive", "new connection"):
        idle, flooded = (next(r for r in rows if r["phase"] == p and r["connection"] == mode) for p in ("idle", "flood"))
        ratios[mode] = {"p50": flooded["p50_ms"] / idle["p50_ms"], "p99": flooded["p99_ms"] / idle["p99_ms"]}
    print(f"\n{fs.n_items:,}-item store, {fs.n_users:,} users, {date.today()}, {platform.machine()} "
          f"{os.cpu_count()} cores; {args.stalled} slow clients; {args.rounds} rounds of {args.requests} requests\n")
    print("| phase | connection | p50 ms | p99 ms | max ms | errors |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['connection']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
              f"{r['errors']} |")
    for mode, ratio in ratios.items():
        print(f"\nflood ÷ idle, {mode}: p50 {ratio['p50']:.2f}×, p99 {ratio['p99']:.2f}× (goal: p99 within 2×)")
    print(f"slow clients: {json.dumps(slow)}; service descriptors idle {fds['idle']}, under the flood {fds['flood']}")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "items": fs.n_items, "users": fs.n_users, "stalled": args.stalled, "settle_s": args.settle,
            "rounds": args.rounds, "load_average_after": os.getloadavg(), "rows": rows,
            "ratio_flood_over_idle": ratios, "p99_within_2x": all(r["p99"] <= 2 for r in ratios.values()),
            "slow_clients": slow, "service_descriptors": fds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
