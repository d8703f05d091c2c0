"""The overload's onset in the discrete-event runner (issue 14): bench/overload.py's fleet (4 x A100 with
Llama-2-7B) meets 3,000 clients at once, in a closed loop of 20,000 requests, with the default capacity policy.
The pool has seen 16 answers of the same workload first, as a proxy that served before has (its output-length
estimate is warm; before any answer, the seat forecast stays off by design).

    .venv/bin/python bench/onset_des.py [--clients 3000] [--requests 20000]

Per workload and profile error: requests held and then refused at their TTFT objective (the slow 429s), requests
refused at arrival, and requests served within a 2 s TTFT a simulated second.
"""

from __future__ import annotations

import argparse
import sys

from capbalancer.profiling.library import resolve_profile
from capbalancer.sim.des import DesInstance, DesOptions, _Run
from capbalancer.sim.workload import generate_requests, parse_workload

PROFILE = "a100-80g/llama-2-7b-tp1"
WARM_ANSWERS = 16
WORKLOADS = ("prompt=100,output=32,max_tokens=32", "prompt=50,output=256,max_tokens=256")
LATE = ("held past its deadline", "cannot start before its deadline")


def run(workload: str, clients: int, requests: int, profile_error: float) -> dict[str, float]:
    instances = [DesInstance(f"a100-{i}", resolve_profile(PROFILE)) for i in range(4)]
    wl = parse_workload(f"{workload},n={requests},concurrency={clients},seed=2")
    reqs = generate_requests(wl, 4096)
    r = _Run(instances, reqs, wl, "capacity", DesOptions(profile_error=profile_error))
    pool = r.sched.pools[r.model]
    for q in generate_requests(parse_workload(f"{workload},n={WARM_ANSWERS},seed=7"), 4096):
        pool.output_lengths.observe(q.output_tokens)
    end_s = r.run()
    records = r.records
    late = sum(1 for x in records if x.status == 429 and any(k in (x.error_detail or "") for k in LATE))
    refused = sum(1 for x in records if x.status == 429) - late
    on_time = sum(1 for x in records if x.success and x.ttft_s is not None and x.ttft_s <= 2.0)
    return {"held_then_refused": late, "refused_at_arrival": refused, "on_time_per_s": on_time / max(end_s, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args(argv)
    print("| workload | profile error | held then refused | refused at arrival | on time a second |")
    print("|---|---|---|---|---|")
    for workload in WORKLOADS:
        for error in (0.0, 0.15):
            row = run(workload, args.clients, args.requests, error)
            print(f"| {workload} | {error:g} | {row['held_then_refused']} | {row['refused_at_arrival']} | "
                  f"{row['on_time_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
