"""N proxy replicas with and without shared reservations (issue 17), against one proxy.

    .venv/bin/python bench/replicas.py [--parts des,scale,latency] [--n 3000] [--json out.json]

Parts:
  des      the discrete-event runner (sim/des_replicas.py) on a six-instance fleet of three GPU types
           (H100, A100, L4 for Llama-3.1-8B), default policy `capacity`: one proxy; 3 replicas each taking a
           third of the load, unshared (today) and shared; shared with the store down for the middle third
           of the run; then the fleet and the load tripled. Open loop at 120% of the fleet's ideal request
           rate, and a saturating closed loop. Checks the targets: preemptions and SLO attainment within 10%
           of one proxy, p99 TTFT within 1.2x; store down no worse than unshared.
  scale    10, 20 and 50 replicas on a fleet scaled to 5x (30 instances), shared vs unshared.
  latency  what sharing adds per request: the scheduler's decision with 2 remote replicas folded in against
           without (Scheduler.submit+finish), and one publish-and-read round trip to a real redis-server on
           loopback (redis-py + hiredis; the store is started by the benchmark).
Deterministic for the DES parts (same seeds); the latency part is a measurement on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from des_rows import des_row  # noqa: E402

from capbalancer.loadtest.stats import Slo  # noqa: E402
from capbalancer.profiling.library import resolve_profile  # noqa: E402
from capbalancer.sim.des import DesInstance, DesOptions, instance_capacity, run_des  # noqa: E402
from capbalancer.sim.des_replicas import ReplicaOptions, run_des_replicas  # noqa: E402

WORKLOAD = "prompt=lognormal:mean=600:sigma=0.8,output=lognormal:mean=200:sigma=0.7,max_tokens=512"
SLO = Slo(ttft_ms=2000.0, tpot_ms=100.0)
FLEET = (("h100", "h100-80g/llama-3.1-8b-tp1", 2), ("a100", "a100-80g/llama-3.1-8b-tp1", 2),
         ("l4", "l4/llama-3.1-8b-tp1", 2))
LOAD_FRACTION = 1.2
CLOSED_RAMP_S = 5.0  # the closed loop's users start over this long (all at one instant no store can share)


def fleet(scale: int = 1) -> list[DesInstance]:
    out = []
    for prefix, ref, count in FLEET:
        prof = resolve_profile(ref)
        out.extend(DesInstance(f"{prefix}-{i}", prof) for i in range(count * scale))
    return out


def options(closed_loop: bool = False) -> DesOptions:
    # The proxy's defaults: polls every 0.5 s, holds a request up to 30 s; the SLO only scores the run. A
    # saturating closed loop measures throughput: requests wait as long as it takes (as bench/policies.py).
    return DesOptions(poll_interval_s=0.5, slo=SLO, hold_max_requests=100_000,
                      hold_timeout_s=1e6 if closed_loop else 30.0)


def ideal_rate(scale: int = 1) -> float:
    per_profile = {ref: instance_capacity(resolve_profile(ref), WORKLOAD)["request_throughput"] for _, ref, _ in FLEET}
    return sum(per_profile[ref] * count * scale for _, ref, count in FLEET)


def _run(task: tuple[str, int, str, int, dict[str, Any] | None]) -> dict[str, Any]:
    label, scale, workload, seed, replica_kwargs = task
    opts = options(closed_loop="concurrency=" in workload)
    if replica_kwargs is None:
        res = run_des(fleet(scale), workload, "capacity", opts, seed=seed)
    else:
        kw = dict(replica_kwargs)
        if kw.get("store_down") is not None:
            kw["store_down"] = tuple(kw["store_down"])
        res = run_des_replicas(fleet(scale), workload, "capacity", opts, ReplicaOptions(**kw), seed=seed)
    row = des_row(res)
    row["rejected"] = res.summary.get("rejected")
    return {"label": label, "scale": scale, "workload": workload, **row}


def des_tasks(n: int) -> list[tuple[str, int, str, int, dict[str, Any] | None]]:
    tasks: list[tuple[str, int, str, int, dict[str, Any] | None]] = []
    for scale, tag in ((1, "load of one"), (3, "3x load, 3x fleet")):
        rate = LOAD_FRACTION * ideal_rate(scale)
        wl_open = f"{WORKLOAD},n={n * scale},rate={rate:.3f}"
        seats = sum(i.profile.max_num_seqs for i in fleet(scale))
        wl_closed = f"{WORKLOAD},n={4 * seats},concurrency={seats}"
        duration_s = n * scale / rate
        for wl, kind in ((wl_open, f"open {LOAD_FRACTION:.0%}"), (wl_closed, f"closed loop ({CLOSED_RAMP_S:g} s ramp)")):
            ramp = {} if kind.startswith("open") else {"ramp_s": CLOSED_RAMP_S}
            # One proxy through the same runner (replicas=1 is run_des exactly), so the ramp is the same.
            tasks.append((f"{tag} | {kind} | one proxy", scale, wl, 1, {"replicas": 1, **ramp}))
            tasks.append((f"{tag} | {kind} | 3 unshared", scale, wl, 1, {"replicas": 3, "sharing": False, **ramp}))
            tasks.append((f"{tag} | {kind} | 3 shared", scale, wl, 1, {"replicas": 3, "sharing": True, **ramp}))
            if kind.startswith("open"):
                tasks.append((f"{tag} | {kind} | 3 shared, store down 1/3-2/3", scale, wl, 1,
                              {"replicas": 3, "sharing": True, "store_down": (duration_s / 3, 2 * duration_s / 3)}))
    return tasks


def scale_tasks(n: int) -> list[tuple[str, int, str, int, dict[str, Any] | None]]:
    scale = 5
    rate = LOAD_FRACTION * ideal_rate(scale)
    wl = f"{WORKLOAD},n={n * scale},rate={rate:.3f}"
    tasks: list[tuple[str, int, str, int, dict[str, Any] | None]] = [(f"{scale}x fleet | one proxy", scale, wl, 1, None)]
    for replicas in (10, 20, 50):
        for sharing in (False, True):
            tasks.append((f"{scale}x fleet | {replicas} {'shared' if sharing else 'unshared'}", scale, wl, 1,
                          {"replicas": replicas, "sharing": sharing}))
    return tasks


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    by = {r["label"]: r for r in rows}
    for tag in ("load of one", "3x load, 3x fleet"):
        for kind in (f"open {LOAD_FRACTION:.0%}", f"closed loop ({CLOSED_RAMP_S:g} s ramp)"):
            one = by.get(f"{tag} | {kind} | one proxy")
            shared = by.get(f"{tag} | {kind} | 3 shared")
            unshared = by.get(f"{tag} | {kind} | 3 unshared")
            if not (one and shared and unshared):
                continue
            pre_ok = shared["preemptions"] <= max(one["preemptions"] * 1.1, one["preemptions"] + 2)
            slo_ok = shared["slo_attainment"] >= 0.9 * one["slo_attainment"]
            ttft_ok = shared["p99_ttft_ms"] <= 1.2 * one["p99_ttft_ms"]
            out.append(f"{tag} / {kind}: preemptions {shared['preemptions']} vs one {one['preemptions']} "
                       f"(unshared {unshared['preemptions']}) {'OK' if pre_ok else 'MISSED'}; "
                       f"SLO {shared['slo_attainment']:.3f} vs {one['slo_attainment']:.3f} "
                       f"(unshared {unshared['slo_attainment']:.3f}) {'OK' if slo_ok else 'MISSED'}; "
                       f"p99 TTFT {shared['p99_ttft_ms']:.0f} vs {one['p99_ttft_ms']:.0f} ms = "
                       f"{shared['p99_ttft_ms'] / one['p99_ttft_ms']:.2f}x "
                       f"(unshared {unshared['p99_ttft_ms'] / one['p99_ttft_ms']:.2f}x) {'OK' if ttft_ok else 'MISSED'}")
            down = by.get(f"{tag} | {kind} | 3 shared, store down 1/3-2/3")
            if down:
                no_worse = (down["preemptions"] <= unshared["preemptions"] * 1.1 + 2
                            and down["slo_attainment"] >= unshared["slo_attainment"] - 0.02)
                out.append(f"{tag} / {kind} store down mid-run: failed {down['failed']}, preemptions "
                           f"{down['preemptions']} (unshared {unshared['preemptions']}), SLO "
                           f"{down['slo_attainment']:.3f} (unshared {unshared['slo_attainment']:.3f}) "
                           f"{'OK: no worse than unshared' if no_worse else 'WORSE than unshared'}")
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"| {'run':58s} | done | failed | preempt | SLO att. | p50 TTFT ms | p99 TTFT ms | p99 TPOT ms | req/s |")
    print(f"|{'-' * 60}|------|--------|---------|----------|-------------|-------------|-------------|-------|")
    for r in rows:
        print(f"| {r['label']:58s} | {r['completed']:4d} | {r['failed']:6d} | {r['preemptions']:7d} | "
              f"{r['slo_attainment']:8.3f} | {r['p50_ttft_ms']:11.0f} | {r['p99_ttft_ms']:11.0f} | "
              f"{r['p99_tpot_ms']:11.1f} | {r['request_throughput']:5.1f} |")


# --- latency --------------------------------------------------------------------------------------------

def decision_overhead_ms(n: int = 20_000) -> dict[str, float]:
    """Scheduler.submit + finish per request on the six-instance fleet, alone vs with two remote replicas'
    reservations folded in (re-applied every 50 requests, as a 50 ms interval at 1000 req/s would)."""
    from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState
    from capbalancer.sched.scheduler import Scheduler
    from capbalancer.sched.types import BackendSpec, Demand, PoolSettings

    def make() -> Scheduler:
        s = Scheduler([PoolSettings(name="m")])
        for inst in fleet(1):
            s.add_backend(BackendSpec(inst.name, "m", engine="vllm", profile=inst.profile), 0.0)
        return s

    remote = [ReplicaState(f"r{k}", {i.name: BackendLoad(8, 6000, 8000, 500, 4800, 1600) for i in fleet(1)},
                           {"m": PoolLoad(0, 0.0)}) for k in range(2)]

    def run(sched: Scheduler, shared: bool) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            now = i * 0.001
            if shared and i % 50 == 0:
                sched.observe_remote(remote, now)
            sched.submit(Demand(f"q{i}", "m", 600, 512, now), now)
            if i >= 16:
                sched.finish(f"q{i - 16}", now, output_tokens=200)
        return (time.perf_counter() - t0) / n * 1000

    alone, shared = [], []
    for _ in range(3):  # interleaved: the two see the same machine state
        alone.append(run(make(), False))
        shared.append(run(make(), True))
    return {"alone_ms": min(alone), "shared_ms": min(shared), "added_ms": min(shared) - min(alone)}


def exchange_latency_ms(n: int = 3000) -> dict[str, float]:
    from capbalancer.cluster import wire
    from capbalancer.cluster.localstore import LocalRedis
    from capbalancer.cluster.redis_store import RedisStore
    from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState

    state = ReplicaState("me", {i.name: BackendLoad(8, 6000, 8000, 500, 4800, 1600) for i in fleet(1)},
                         {"m": PoolLoad(3, 12.5, 0.2, 0)})
    payload = wire.encode(state)

    async def main(url: str) -> list[float]:
        stores = [RedisStore(url, "bench") for _ in range(3)]
        for k, s in enumerate(stores[1:]):
            await s.exchange(f"other{k}", payload, 5000)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            others = await stores[0].exchange("me", payload, 5000)
            [wire.decode(rid, body) for rid, body in others]
            out.append((time.perf_counter() - t0) * 1000)
        for s in stores:
            await s.close()
        return out

    with LocalRedis() as store:
        times = sorted(asyncio.run(main(store.url)))
    return {"payload_bytes": len(payload), "p50_ms": statistics.median(times),
            "p99_ms": times[int(0.99 * len(times)) - 1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="des,scale,latency")
    ap.add_argument("--n", type=int, default=3000, help="requests per run (times the fleet scale)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {}
    started = time.time()
    tasks = []
    if "des" in parts:
        tasks += des_tasks(args.n)
    if "scale" in parts:
        tasks += scale_tasks(args.n)
    if tasks:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(_run, tasks))
        out["des"] = rows
        print(f"fleet: H100x2, A100-80Gx2, L4x2 (x scale), Llama-3.1-8B; workload {WORKLOAD}; "
              f"SLO TTFT<={SLO.ttft_ms:.0f} ms, TPOT<={SLO.tpot_ms:.0f} ms; policy capacity (default); "
              f"sharing every 50 ms, 0.2 ms store round trip; polls every 0.5 s on each replica's own phase\n")
        print_rows(rows)
        print()
        for line in check_targets(rows):
            print(line)
    if "latency" in parts:
        out["decision"] = decision_overhead_ms()
        out["exchange"] = exchange_latency_ms()
        d, e = out["decision"], out["exchange"]
        print(f"\nper decision (submit+finish): alone {d['alone_ms']:.4f} ms, with 2 remote replicas "
              f"{d['shared_ms']:.4f} ms, added {d['added_ms']:+.4f} ms")
        print(f"store exchange (publish + read 2 others, {e['payload_bytes']} B state), real redis-server on "
              f"loopback: p50 {e['p50_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms (once per 50 ms interval, off the "
              f"request path)")
    print(f"\n({time.time() - started:.0f} s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
