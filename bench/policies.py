"""Every routing policy on the same heterogeneous clusters and workloads, in the discrete-event runner.

    .venv/bin/python bench/policies.py [--quick] [--json out/policies.json] [--clusters a,b] [--jobs 2] [--defaults]

For each cluster it prints one table with, per policy:
  * throughput at saturation (closed loop, far more requests outstanding than the cluster can run) as a
    fraction of the ideal: the sum of each instance's own best throughput, measured alone in the runner;
  * goodput under the SLO at Poisson rates rising from 50% to 110% of the ideal request rate;
  * p50/p99 TTFT and TPOT at 80% load, preemptions.
and then checks the issue's targets for `capacity` against the best baseline. Deterministic: the same
seed gives the same requests, arrivals and results for every policy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from des_rows import des_row, steady_throughput  # bench/ is on sys.path when run as a script

from capbalancer.loadtest.stats import Slo
from capbalancer.profiling.library import resolve_profile
from capbalancer.sched.policies import policy_names
from capbalancer.sim.des import DesInstance, DesOptions, instance_capacity, run_des

# ShareGPT-like spread: long-tailed prompts and outputs. Requests ask for max_tokens=512 and stop at
# their drawn length (like an EOS), so the scheduler only knows the bound, as in production.
WORKLOAD = "prompt=lognormal:mean=600:sigma=0.8,output=lognormal:mean=200:sigma=0.7,max_tokens=512"
SLO = Slo(ttft_ms=2000.0, tpot_ms=100.0)
RATE_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5)
SUSTAINABLE_SLO_FRACTION = 0.9  # a rate is sustainable for a policy if >= 90% of requests meet the SLO
BASELINES = ("round_robin", "random", "least_requests", "least_kv", "power_of_two", "weighted",
             "cache_aware", "llm_d")


@dataclass(frozen=True)
class Cluster:
    name: str
    description: str
    instances: tuple[tuple[str, str, int], ...]  # (name prefix, profile, count)

    def des_instances(self) -> list[DesInstance]:
        out = []
        for prefix, profile, count in self.instances:
            prof = resolve_profile(profile)
            out.extend(DesInstance(f"{prefix}-{i}", prof) for i in range(count))
        return out


CLUSTERS = (
    Cluster("hels-llama13b", "Hels poster pair: A100-80G x2 (TP1 each) + P100-16G x2 (one TP2) for Llama-2-13B",
            (("a100", "a100-80g/llama-2-13b-tp1", 2), ("p100x2", "p100-16g/llama-2-13b-tp2", 1))),
    Cluster("hels-opt30b", "Hels poster pair for OPT-30B: A100-80G x2 (TP1 each) + RTX 3090 x4 (one TP4; "
            "two 3090s cannot hold OPT-30B in fp16)",
            (("a100", "a100-80g/opt-30b-tp1", 2), ("3090x4", "rtx3090/opt-30b-tp4", 1))),
    Cluster("speed-gap", "Two machines, large speed gap: H100-80G + L4 for Llama-3.1-8B",
            (("h100", "h100-80g/llama-3.1-8b-tp1", 1), ("l4", "l4/llama-3.1-8b-tp1", 1))),
    Cluster("many-mix", "Many machines: H100 x2, A100-80G x2, A100-40G x2, V100 x2, RTX 3090 x2, L4 x4 "
            "for Llama-3.1-8B (14 instances)",
            (("h100", "h100-80g/llama-3.1-8b-tp1", 2), ("a100", "a100-80g/llama-3.1-8b-tp1", 2),
             ("a100-40g", "a100-40g/llama-3.1-8b-tp1", 2), ("v100", "v100-32g/llama-3.1-8b-tp1", 2),
             ("3090", "rtx3090/llama-3.1-8b-tp1", 2), ("l4", "l4/llama-3.1-8b-tp1", 4))),
)


# --defaults: every policy (capacity included) as a user gets it, with no options: the issue-15 figures.
# Set in main() before the worker processes fork.
DEFAULTS = False


def _options(policy: str, saturation: bool) -> DesOptions:
    if DEFAULTS:
        return DesOptions(poll_interval_s=0.25, slo=SLO)
    # The proxy polls engines every 0.25 s here (llm-d's EPP refreshes every 50 ms, routers poll every
    # 30-60 s). Baselines never hold, so the hold settings only matter to `capacity`, whose pool is
    # configured as a user with this SLO would: hold a request at most as long as its TTFT objective
    # (past it the request is answered 503 + Retry-After rather than served late), and admit to a
    # backend only while its predicted TPOT stays within the objective.
    if saturation:
        # Throughput mode: no objective (the derived TTFT objective off too), requests wait as long as it takes.
        return DesOptions(poll_interval_s=0.25, slo=SLO, hold_max_requests=100_000, hold_timeout_s=3600.0,
                          policy_options={"ttft_objective_factor": 0, "tpot_objective_factor": 0}
                          if policy == "capacity" else {})
    if policy == "capacity":
        return DesOptions(poll_interval_s=0.25, slo=SLO, hold_max_requests=100_000,
                          hold_timeout_s=SLO.ttft_ms / 1000.0, policy_options={"tpot_slo_ms": SLO.tpot_ms})
    return DesOptions(poll_interval_s=0.25, slo=SLO, hold_max_requests=100_000, hold_timeout_s=60.0)


def _run(args: tuple[str, str, str, int]) -> dict[str, Any]:
    cluster_name, policy, workload, seed = args
    cluster = next(c for c in CLUSTERS if c.name == cluster_name)
    saturation = "concurrency=" in workload
    result = run_des(cluster.des_instances(), workload, policy, _options(policy, saturation), seed=seed)
    return {"cluster": cluster_name, "policy": policy, "workload": workload, **des_row(result),
            "share": {k: v.get("requests") for k, v in result.instances.items()},
            "steady_output_throughput": steady_throughput(result.records)[0]}


def ideal_of(cluster: Cluster) -> dict[str, float]:
    per = {i.name: instance_capacity(i.profile, WORKLOAD) for i in cluster.des_instances()}
    return {"output_throughput": sum(p["output_throughput"] for p in per.values()),
            "request_throughput": sum(p["request_throughput"] for p in per.values()),
            "per_instance": {k: round(v["output_throughput"], 1) for k, v in per.items()}}


def evaluate(cluster: Cluster, policies: list[str], n_sat: int, seconds_per_rate: float, jobs: int
             ) -> dict[str, Any]:
    ideal = ideal_of(cluster)
    seats = sum(i.profile.max_num_seqs for i in cluster.des_instances())
    concurrency = 2 * seats  # far more outstanding than the cluster can run at once
    sat_workload = f"{WORKLOAD},n={max(n_sat, 4 * concurrency)},concurrency={concurrency}"
    tasks = [(cluster.name, p, sat_workload, 1) for p in policies]
    for fraction in RATE_FRACTIONS:
        rate = fraction * ideal["request_throughput"]
        n = max(400, int(rate * seconds_per_rate))
        tasks.extend((cluster.name, p, f"{WORKLOAD},n={n},rate={rate:.4f}", 2) for p in policies)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(_run, tasks))
    by_policy: dict[str, dict[str, Any]] = {p: {"rates": {}} for p in policies}
    for task, row in zip(tasks, rows, strict=True):
        policy = task[1]
        if "concurrency" in task[2]:
            by_policy[policy]["saturation"] = row
            row["fraction_of_ideal"] = row["steady_output_throughput"] / ideal["output_throughput"]
        else:
            fraction = next(f for f in RATE_FRACTIONS if f"rate={f * ideal['request_throughput']:.4f}" in task[2])
            by_policy[policy]["rates"][fraction] = row
    return {"cluster": cluster.name, "description": cluster.description, "ideal": ideal, "policies": by_policy}


def sustainable_rate(rates: dict[float, dict[str, Any]]) -> float | None:
    """Highest tested rate (fraction of ideal) at which >= 90% of requests met the SLO, DistServe's
    definition of goodput as a rate; None if even the lowest rate missed it."""
    ok = [f for f, r in rates.items() if (r["slo_attainment"] or 0) >= SUSTAINABLE_SLO_FRACTION]
    return max(ok) if ok else None


def targets(result: dict[str, Any]) -> dict[str, Any]:
    pols = result["policies"]
    base = [p for p in pols if p != "capacity"]
    cap = pols["capacity"]
    ideal_rate = result["ideal"]["request_throughput"]
    out: dict[str, Any] = {"saturation_fraction": cap["saturation"]["fraction_of_ideal"]}

    def sustained_goodput(p: str) -> float:
        f = sustainable_rate(pols[p]["rates"])
        return 0.0 if f is None else (pols[p]["rates"][f]["request_goodput"] or 0.0)

    sustained = {p: sustained_goodput(p) for p in pols}
    best_base = max(base, key=lambda p: sustained[p])
    out["sustainable_rate"] = {p: sustainable_rate(pols[p]["rates"]) for p in pols}
    out["sustained_goodput_req_s"] = {p: round(sustained[p], 3) for p in pols}
    out["goodput_ratio_vs_best_baseline"] = (sustained["capacity"] / sustained[best_base]
                                             if sustained[best_base] else math.inf)
    out["goodput_best_baseline"] = best_base
    top = max(RATE_FRACTIONS)
    over = {p: pols[p]["rates"][top]["request_goodput"] or 0.0 for p in pols}
    best_over = max(base, key=lambda p: over[p])
    out["overload_rate"] = top
    out["overload_goodput_ratio"] = over["capacity"] / over[best_over] if over[best_over] else math.inf
    out["overload_best_baseline"] = best_over
    p99 = {p: pols[p]["rates"][0.8]["p99_ttft_ms"] for p in pols}
    best_p99_name = min(base, key=lambda p: p99[p] if p99[p] is not None else math.inf)
    out["p99_ttft_ratio_at_80pct"] = (p99["capacity"] / p99[best_p99_name]) if p99[best_p99_name] else math.inf
    out["p99_ttft_best_baseline"] = best_p99_name
    out["preemptions_capacity_at_80pct"] = cap["rates"][0.8]["preemptions"]
    out["preemptions_min_baseline_at_80pct"] = min(pols[p]["rates"][0.8]["preemptions"] for p in base)
    out["ideal_request_rate"] = ideal_rate
    out["met"] = {
        "saturation>=0.95": out["saturation_fraction"] >= 0.95,
        "sustained_goodput>=1.3x": out["goodput_ratio_vs_best_baseline"] >= 1.3,
        "p99_ttft<=0.7x": out["p99_ttft_ratio_at_80pct"] <= 0.7,
        "no_routing_preemptions": out["preemptions_capacity_at_80pct"] <= out["preemptions_min_baseline_at_80pct"],
    }
    return out


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x)


def print_cluster(result: dict[str, Any], tgt: dict[str, Any]) -> None:
    ideal = result["ideal"]
    print(f"\n## {result['cluster']}: {result['description']}")
    print(f"ideal = {ideal['output_throughput']:,.0f} output tok/s = {ideal['request_throughput']:.2f} req/s "
          f"(each instance alone: {ideal['per_instance']})")
    rates = " | ".join(f"goodput@{int(f * 100)}%" for f in RATE_FRACTIONS)
    print(f"| policy | sat. tok/s | of ideal | sat. preempt | {rates} | p50/p99 TTFT ms @80% | "
          "p50/p99 TPOT ms @80% | preempt @80% |")
    print("|---" * (8 + len(RATE_FRACTIONS)) + "|")
    for policy, row in result["policies"].items():
        sat = row["saturation"]
        goodputs = " | ".join(_fmt(row["rates"][f]["request_goodput"], 2) for f in RATE_FRACTIONS)
        r80 = row["rates"][0.8]
        print(f"| {policy} | {_fmt(sat['steady_output_throughput'])} | {_fmt(sat['fraction_of_ideal'], 3)} | "
              f"{_fmt(sat['preemptions'])} | {goodputs} | {_fmt(r80['p50_ttft_ms'])} / {_fmt(r80['p99_ttft_ms'])} | "
              f"{_fmt(r80['p50_tpot_ms'], 1)} / {_fmt(r80['p99_tpot_ms'], 1)} | {_fmt(r80['preemptions'])} |")
    print(f"targets for capacity: saturation {tgt['saturation_fraction']:.3f} of ideal; goodput at the highest "
          f"rate sustained with >=90% SLO attainment {tgt['goodput_ratio_vs_best_baseline']:.2f}x best baseline "
          f"({tgt['goodput_best_baseline']}; rates {tgt['sustainable_rate']}); goodput at "
          f"{int(tgt['overload_rate'] * 100)}% load {tgt['overload_goodput_ratio']:.2f}x best baseline "
          f"({tgt['overload_best_baseline']}); p99 TTFT "
          f"at 80% {tgt['p99_ttft_ratio_at_80pct']:.2f}x best baseline ({tgt['p99_ttft_best_baseline']}); "
          f"preemptions at 80% {tgt['preemptions_capacity_at_80pct']} vs min baseline "
          f"{tgt['preemptions_min_baseline_at_80pct']} -> {tgt['met']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--clusters", default=",".join(c.name for c in CLUSTERS))
    parser.add_argument("--policies", default=",".join([*BASELINES, "capacity"]))
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seconds-per-rate", type=float, default=None,
                        help="simulated seconds of arrivals per rate (default 240, --quick 60)")
    parser.add_argument("--defaults", action="store_true",
                        help="every policy in its default configuration (no objective, hold or option set)")
    args = parser.parse_args()
    global DEFAULTS
    DEFAULTS = args.defaults
    known = set(policy_names())
    policies = [p for p in args.policies.split(",") if p]
    missing = [p for p in policies if p not in known]
    if missing:
        print(f"unknown policies {missing}; known {sorted(known)}", file=sys.stderr)
        return 2
    n_sat, seconds = (1500, 60.0) if args.quick else (6000, 240.0)
    if args.seconds_per_rate:
        seconds = args.seconds_per_rate
    started = time.perf_counter()
    report = []
    for cluster in CLUSTERS:
        if cluster.name not in args.clusters.split(","):
            continue
        result = evaluate(cluster, policies, n_sat, seconds, args.jobs)
        tgt = targets(result) if "capacity" in policies else {}
        if tgt:
            print_cluster(result, tgt)
        result["targets"] = tgt
        report.append(result)
    print(f"\nworkload: {WORKLOAD}; SLO TTFT <= {SLO.ttft_ms:.0f} ms, TPOT <= {SLO.tpot_ms:.0f} ms; "
          f"wall {time.perf_counter() - started:.0f} s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
