"""Routing policies on engines that share a GPU, in the discrete-event runner: bench/gpu's real-GPU layout.

    .venv/bin/python bench/gpu_share.py [--seconds 180] [--seeds 1,2,3] [--jobs 2] [--json out/gpu_share.json]

The fleet is deploy/fleets/h200-x2-shared.yaml: A alone on one H200 (large KV), B (0.45 of the memory) and C
(0.14) sharing a second one (gpu_group gpu1; the simulator makes each step of one wait for the other's while
both are busy, capbalancer/sim/gpu_share.py). The proxy is configured as in the real run (bench/gpu/driver.py):
every backend with its profile, `gpu_group` for the pair, serve's defaults otherwise (metrics polled every
1 s, held requests wait up to 30 s, at most 1,024 held). Policies:

  capacity          told the pair shares a GPU (BackendSpec.gpu_group)
  capacity-indep    the same fleet, still simulated sharing, but the groups hidden from the scheduler
  capacity-slo      capacity (told) configured with the SLO, as bench/policies.py does: `tpot_slo_ms: 50`
                    and held requests wait at most the TTFT objective (1 s), then 503 (counted as failed)
  round_robin, least_requests, least_kv, llm_d
  weighted          the static split's weights, as in the real run: A 2, B 1, C 1

Loads: closed loops of 256 users (the real run's) and of 1,024 users; Poisson arrivals at 75%, 95% and 110%
of the fleet's capacity, which is the best static split measured in the same simulator: A saturated alone
plus B and C saturated together on their shared GPU (`ideal_throughput`). The workload is the real run's:
lognormal prompts (mean 660, sigma 0.8, at most 2,650 tokens) and outputs (mean 200, sigma 0.8, at most 512),
generated to the end (ignore_eos). SLO: TTFT <= 1 s and TPOT <= 50 ms. Deterministic: same seed, same
requests and arrivals for every policy, same results on every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from des_rows import des_row, steady_throughput  # bench/ is on sys.path when run as a script

from capbalancer.loadtest.stats import Slo
from capbalancer.sim.des import DesInstance, DesOptions, ideal_throughput, instances_from_fleet, run_des

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "deploy" / "fleets" / "h200-x2-shared.yaml"
WORKLOAD = "prompt=lognormal:mean=660:sigma=0.8:max=2650,output=lognormal:mean=200:sigma=0.8:max=512"
SLO = Slo(ttft_ms=1000.0, tpot_ms=50.0)
CLOSED_LOOPS = (256, 1024)
RATE_FRACTIONS = (0.75, 0.95, 1.10)
ABLATION = "capacity-indep"
WITH_SLO = "capacity-slo"
# capacity (told) with only the TTFT objective (`ttft_slo_ms: 1000`, serve's hold defaults); not in the default
# list: `--policies capacity,capacity-ttft` (RESULTS §10: no effect in the DES)
WITH_TTFT = "capacity-ttft"
POLICIES = ("capacity", ABLATION, WITH_SLO, "round_robin", "least_requests", "least_kv", "llm_d", "weighted")
STATIC_SPLIT_WEIGHTS = {"A": 2.0, "B": 1.0, "C": 1.0}  # a whole GPU, half a GPU each


def fleet_instances(policy: str) -> list[DesInstance]:
    instances = instances_from_fleet(FLEET)
    if policy == "weighted":
        instances = [dataclasses.replace(i, weight=STATIC_SPLIT_WEIGHTS[i.name]) for i in instances]
    return instances


def options(policy: str) -> DesOptions:
    if policy == WITH_SLO:
        return DesOptions(poll_interval_s=1.0, slo=SLO, hold_timeout_s=SLO.ttft_ms / 1000.0, hold_max_requests=1024,
                          policy_options={"tpot_slo_ms": SLO.tpot_ms})
    if policy == WITH_TTFT:
        return DesOptions(poll_interval_s=1.0, slo=SLO, hold_timeout_s=30.0, hold_max_requests=1024,
                          policy_options={"ttft_slo_ms": SLO.ttft_ms})
    return DesOptions(poll_interval_s=1.0, slo=SLO, hold_timeout_s=30.0, hold_max_requests=1024,
                      gpu_groups_to_scheduler=policy != ABLATION)


def run_one(task: tuple[str, str, str, int]) -> dict[str, Any]:
    policy, load, workload, seed = task
    engine_policy = "capacity" if policy in (ABLATION, WITH_SLO, WITH_TTFT) else policy
    result = run_des(fleet_instances(policy), workload, engine_policy, options(policy), seed=seed)
    row = {"policy": policy, "load": load, "seed": seed, "workload": workload, **des_row(result),
           "share": {k: v.get("share") for k, v in result.instances.items()},
           "preemptions_per_instance": {k: v.get("preemptions") for k, v in result.instances.items()}}
    if load.startswith("closed"):
        row["steady_output_throughput"], row["steady_request_throughput"] = steady_throughput(result.records)
    return row


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def print_table(load: str, rows: list[dict[str, Any]], closed: bool) -> None:
    print(f"\n### {load}\n")
    first = "steady tok/s | steady req/s | " if closed else ""
    print(f"| policy | {first}req/s | goodput req/s | SLO met | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "preemptions A/B/C | share A/B/C | failed |")
    print("|---|" + ("---:|---:|" if closed else "") + "---:|---:|---:|---|---|---|---|---:|")
    for r in rows:
        lead = (f"{_fmt(r['steady_output_throughput'])} | {_fmt(r['steady_request_throughput'], 1)} | "
                if closed else "")
        pre = "/".join(str(r["preemptions_per_instance"][k]) for k in ("A", "B", "C"))
        share = "/".join(f"{r['share'][k]:.2f}" for k in ("A", "B", "C"))
        print(f"| {r['policy']} | {lead}{_fmt(r['request_throughput'], 1)} | {_fmt(r['request_goodput'], 1)} | "
              f"{_fmt(100 * (r['slo_attainment'] or 0), 1)}% | {_fmt(r['p50_ttft_ms'])} / {_fmt(r['p99_ttft_ms'])} | "
              f"{_fmt(r['p50_tpot_ms'], 1)} / {_fmt(r['p99_tpot_ms'], 1)} | {pre} | {share} | {r['failed']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0, help="simulated seconds of Poisson arrivals per run")
    parser.add_argument("--closed-n", type=int, default=8000, help="requests per closed-loop run")
    parser.add_argument("--seeds", default="1,2,3", help="the tables show the first; goodput is summarized over all")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    ideal = ideal_throughput(FLEET, f"{WORKLOAD},seed={seeds[0]}", n=3000)
    rate_ideal = ideal["request_throughput"]
    loads: list[tuple[str, str]] = [(f"closed loop, {c} users", f"{WORKLOAD},n={args.closed_n},concurrency={c}")
                                    for c in CLOSED_LOOPS]
    for f in RATE_FRACTIONS:
        rate = f * rate_ideal
        loads.append((f"Poisson {int(round(f * 100))}% ({rate:.1f} req/s)",
                       f"{WORKLOAD},n={int(rate * args.seconds)},rate={rate:.4f}"))
    tasks = [(p, load, wl, seed) for seed in seeds for load, wl in loads for p in policies]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    wall = time.perf_counter() - started
    per = {k: round(v["request_throughput"], 2) for k, v in ideal["instances"].items()}
    print(f"fleet {FLEET.relative_to(REPO)}; capacity (best static split: A alone + B and C saturated together) "
          f"= {rate_ideal:.2f} req/s, {ideal['output_throughput']:,.0f} output tok/s (A/B/C req/s: {per})")
    print(f"workload {WORKLOAD} (ignore_eos); SLO TTFT <= {SLO.ttft_ms:.0f} ms, TPOT <= {SLO.tpot_ms:.0f} ms; "
          f"tables: seed {seeds[0]}")
    for load, _ in loads:
        print_table(load, [r for r in rows if r["load"] == load and r["seed"] == seeds[0]],
                    closed=load.startswith("closed"))
    print(f"\n### goodput req/s per seed ({', '.join(map(str, seeds))})\n")
    print("| policy | " + " | ".join(load.split(" (")[0] for load, _ in loads) + " |")
    print("|---|" + "---|" * len(loads))
    for p in policies:
        cells = []
        for load, _ in loads:
            vals = [r["request_goodput"] for r in rows if r["policy"] == p and r["load"] == load]
            cells.append(" / ".join(_fmt(v, 1) for v in vals))
        print(f"| {p} | " + " | ".join(cells) + " |")
    print(f"\n{len(tasks)} runs, wall {wall:.0f} s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"ideal": ideal, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
