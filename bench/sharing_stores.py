"""Redis against NATS as the replicas' shared store, side by side on real servers on 127.0.0.1.

N replicas (one client each, in this process, each on its own sharing loop every `--interval-ms`) exchange
a state of the proxy's real size through a real redis-server and a real nats-server, interleaved (redis,
nats, redis, nats) so both see the same machine load. Per store and N:
- exchange p50/p99: one publish-and-read as the sharing loop sees it (off the request path);
- view age p50/p99: how old the others' states are when read (the staleness the scheduler works with);
- CPU per exchange: this process's CPU time over all exchanges (NATS also pays for delivering every
  state to every replica: N x N messages per interval against N round trips for Redis);
- failover: the store is killed, then restarted on the same port: time until a replica's exchange fails
  (it then counts alone) and, after the restart, until it reads every other replica again.

    .venv/bin/python bench/sharing_stores.py --replicas 3,20 --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capbalancer.cluster import wire  # noqa: E402
from capbalancer.cluster.localstore import LocalNats, LocalRedis  # noqa: E402
from capbalancer.cluster.stores import StoreError, open_store  # noqa: E402
from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState  # noqa: E402

TTL_MS = 1000


def state_size_bytes(n_backends: int = 6) -> int:
    state = ReplicaState("r", {f"b{i}": BackendLoad(8, 6000, 8000, 500, 4800, 1600) for i in range(n_backends)},
                         {"m": PoolLoad(3, 12.5, 0.2, 0)})
    return len(wire.encode(state))


def _payload(size: int) -> bytes:
    """The publish time (for the view age) padded to the real state's size."""
    head = struct.pack("!d", time.time())
    return head + b"x" * max(0, size - len(head))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _steady(url: str, n: int, seconds: float, interval_s: float, size: int) -> dict[str, float]:
    stores = [open_store(url, "bench", 0.2) for _ in range(n)]
    exchange_ms: list[float] = []
    age_ms: list[float] = []
    count = 0

    async def loop(i: int, stop_at: float) -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            started = time.monotonic()
            t0 = time.perf_counter()
            others = await stores[i].exchange(f"r{i}", _payload(size), TTL_MS)
            exchange_ms.append((time.perf_counter() - t0) * 1000)
            now = time.time()
            age_ms.extend((now - struct.unpack("!d", body[:8])[0]) * 1000 for _, body in others)
            count += 1
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    try:
        await asyncio.gather(*(loop(i, time.monotonic() + 0.5) for i in range(n)))  # join, warm up
        exchange_ms.clear()
        age_ms.clear()
        count = 0
        cpu0 = time.process_time()
        await asyncio.gather(*(loop(i, time.monotonic() + seconds) for i in range(n)))
        cpu_us = (time.process_time() - cpu0) * 1e6 / max(1, count)
    finally:
        for s in stores:
            await s.close()
    return {"exchanges": count, "exchange_p50_ms": statistics.median(exchange_ms), "exchange_p99_ms":
            _pct(exchange_ms, 0.99), "view_age_p50_ms": statistics.median(age_ms), "view_age_p99_ms":
            _pct(age_ms, 0.99), "cpu_us_per_exchange": cpu_us}


async def _failover(server: Any, n: int, interval_s: float, size: int) -> dict[str, float]:
    stores = [open_store(server.url, "bench", 0.1) for _ in range(n)]
    done = asyncio.Event()
    whole_at: list[float] = []
    failed_at: list[float] = []
    phase = {"name": "before"}

    async def loop(i: int) -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                others = await stores[i].exchange(f"r{i}", _payload(size), TTL_MS)
                if i == 0 and phase["name"] == "restarted" and len(others) == n - 1 and not whole_at:
                    whole_at.append(time.monotonic())
            except StoreError:
                if i == 0 and phase["name"] == "killed" and not failed_at:
                    failed_at.append(time.monotonic())
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    tasks = [asyncio.ensure_future(loop(i)) for i in range(n)]
    try:
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        phase["name"] = "killed"
        server.kill()
        await asyncio.sleep(1.0)
        restarted = time.monotonic()
        server.start()
        phase["name"] = "restarted"
        deadline = time.monotonic() + 10
        while not whole_at and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in stores:
            await s.close()
    return {"detect_ms": (failed_at[0] - killed) * 1000 if failed_at else float("nan"),
            "rejoin_ms": (whole_at[0] - restarted) * 1000 if whole_at else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="3,20")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved redis/nats rounds (the best is kept)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    size = state_size_bytes()
    interval_s = args.interval_ms / 1000.0
    out: dict[str, Any] = {"state_bytes": size, "interval_ms": args.interval_ms, "steady": {}, "failover": {}}
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with LocalRedis() as redis_server, LocalNats() as nats_server:
        servers = {"redis": redis_server, "nats": nats_server}
        for n in [int(x) for x in args.replicas.split(",")]:
            for _ in range(args.rounds):
                for name, server in servers.items():
                    row = run(_steady(server.url, n, args.seconds, interval_s, size))
                    best = out["steady"].setdefault(name, {}).get(str(n))
                    if best is None or row["exchange_p50_ms"] < best["exchange_p50_ms"]:
                        out["steady"][name][str(n)] = row
        for name, server in servers.items():
            out["failover"][name] = run(_failover(server, 3, interval_s, size))
    print(f"state {size} B, every {args.interval_ms:g} ms, TTL {TTL_MS} ms; real servers on 127.0.0.1, "
          f"interleaved, best of {args.rounds}\n")
    print("| store | replicas | exchange p50 / p99 ms | view age p50 / p99 ms | CPU µs per exchange |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in out["steady"].items():
        for n, r in rows.items():
            print(f"| {name} | {n} | {r['exchange_p50_ms']:.3f} / {r['exchange_p99_ms']:.3f} | "
                  f"{r['view_age_p50_ms']:.1f} / {r['view_age_p99_ms']:.1f} | {r['cpu_us_per_exchange']:.0f} |")
    print("\n| store | store killed: exchange fails after ms | restarted: all others read again after ms |")
    print("|---|---:|---:|")
    for name, r in out["failover"].items():
        print(f"| {name} | {r['detect_ms']:.0f} | {r['rejoin_ms']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
