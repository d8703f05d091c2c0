"""How fast the discrete-event runner is: instances x requests -> wall time and events per second.

    .venv/bin/python bench/des_scale.py                      # 10/100 instances x 10k/100k requests
    .venv/bin/python bench/des_scale.py --instances 100 --requests 100000 --policy capacity

The fleet mixes estimated profiles from profiles/ (A100-80G, RTX 3090 x2, L4 x2, P100 x2 for
Llama-2-13B) in fixed proportions; the arrival rate is `--load` times the fleet's ideal throughput (the
sum of each instance's own saturated throughput on the same lengths), so every size runs equally loaded.
Target (issue 3): 100 instances and 100,000 requests in under 60 s on one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capbalancer.profiling.library import resolve_profile  # noqa: E402
from capbalancer.sim.des import DesInstance, DesOptions, instance_capacity, run_des  # noqa: E402

MIX = (  # (profile, share of the fleet)
    ("a100-80g/llama-2-13b-tp1", 0.4),
    ("rtx3090/llama-2-13b-tp2", 0.3),
    ("l4/llama-2-13b-tp2", 0.2),
    ("p100-16g/llama-2-13b-tp2", 0.1),
)
LENGTHS = "prompt=lognormal:mean=600:sigma=0.8:max=3072,output=lognormal:mean=200:sigma=0.7:max=1024"


def fleet(n: int) -> list[DesInstance]:
    out: list[DesInstance] = []
    counts = [max(1, round(n * share)) for _, share in MIX]
    counts[0] += n - sum(counts)  # exact total
    for (name, _), count in zip(MIX, counts, strict=True):
        prof = resolve_profile(name)
        out.extend(DesInstance(f"{prof.gpu}-{i}", prof, prof.model) for i in range(count))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", default="10,100")
    ap.add_argument("--requests", default="10000,100000")
    ap.add_argument("--policy", default="round_robin,capacity")
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the ideal")
    ap.add_argument("--poll-interval", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    capacity_cache: dict[str, float] = {}
    print(f"{'policy':<15}{'instances':>10}{'requests':>10}{'rate/s':>9}{'sim s':>9}{'wall s':>9}{'cpu s':>9}"
          f"{'events':>10}{'events/s':>11}{'req/s wall':>11}{'completed':>10}{'preempt':>9}")
    for policy in args.policy.split(","):
        for n_inst in (int(x) for x in args.instances.split(",")):
            instances = fleet(n_inst)
            ideal = 0.0
            for inst in instances:
                key = inst.profile.name
                if key not in capacity_cache:
                    capacity_cache[key] = instance_capacity(inst.profile, f"{LENGTHS},seed={args.seed}",
                                                            n=1000)["request_throughput"]
                ideal += capacity_cache[key]
            rate = args.load * ideal
            for n_req in (int(x) for x in args.requests.split(",")):
                wl = f"rate={rate:.3f},n={n_req},{LENGTHS},seed={args.seed}"
                started, cpu_started = time.perf_counter(), time.process_time()
                res = run_des(instances, wl, policy, DesOptions(poll_interval_s=args.poll_interval))
                wall = time.perf_counter() - started
                # CPU seconds too: on a shared machine the wall time also counts other processes' turns.
                cpu = time.process_time() - cpu_started
                print(f"{policy:<15}{n_inst:>10}{n_req:>10}{rate:>9.1f}{res.sim_seconds:>9.0f}{wall:>9.2f}{cpu:>9.2f}"
                      f"{res.events:>10}{res.events / wall:>11.0f}{n_req / wall:>11.0f}"
                      f"{res.summary['completed']:>10}{res.summary['preemptions']:>9}", flush=True)


if __name__ == "__main__":
    main()
