"""Learned interference on a shared GPU, in the discrete-event runner: the real H200 co-location lesson.

    .venv/bin/python bench/interference.py [--n 6000] [--interference 2.0] [--users 256] [--jobs 2]

On a real H200 two vLLM instances of one model shared the card without MPS: B with a large KV cache (0.45 of the
memory) and C with a small one (0.14). C beside B cost B about 3x its TPOT — more than sum-of-steps (each step
waiting for one of the other's) says — and `capacity` kept sending C 25-38% of the traffic, reaching 0.63 of the
throughput of simply leaving C idle (issue 14).

Here B and C are the profiles of that run (deploy/fleets/h200-x2-shared/), on one simulated GPU whose
`interference` (sim/gpu_share.py) makes each engine's steps wait for `interference` x its busy sibling's step.
A closed loop of `--users` users saturates the pair; the figure is the steady output throughput (10th-90th
percentile completions). Plans:

  B alone                 C absent: the GPU is B's
  static f                `weighted` with C's share f of the requests (0.05 .. 0.4): every split one could deploy
  capacity, judging off   `policy_options: {judge_net_negative: 0}`: interference learned for predictions only
  capacity                the default: interference learned from TPOTs, C judged net-negative once learned

The target (issue 14): capacity >= 0.95 of the best static plan, leaving C idle when that is the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from des_rows import steady_throughput  # bench/ is on sys.path when run as a script

from capbalancer.sim.des import DesInstance, DesOptions, instances_from_fleet, run_des

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "deploy" / "fleets" / "h200-x2-shared.yaml"
WORKLOAD = "prompt=lognormal:mean=660:sigma=0.8:max=2650,output=lognormal:mean=200:sigma=0.8:max=512"
SPLITS = (0.05, 0.1, 0.2, 0.3, 0.4)


def pair(interference: float) -> list[DesInstance]:
    """B and C of the real run, alone on one GPU (gpu_group g)."""
    out = []
    for inst in instances_from_fleet(FLEET):
        if inst.name in ("B", "C"):
            out.append(dataclasses.replace(inst, gpu_group="g", interference=interference))
    return out


def run_plan(task: tuple[str, float, int, int, int]) -> dict[str, Any]:
    plan, interference, n, users, seed = task
    workload = f"{WORKLOAD},n={n},concurrency={users},seed={seed}"
    instances = pair(interference)
    opts = DesOptions(poll_interval_s=1.0, hold_timeout_s=30.0)
    policy = "capacity"
    if plan == "B alone":
        instances = [i for i in instances if i.name == "B"]
    elif plan.startswith("static"):
        f = float(plan.split()[1])
        instances = [dataclasses.replace(i, weight=(f if i.name == "C" else 1.0 - f)) for i in instances]
        policy = "weighted"
    elif plan == "capacity, judging off":
        opts = dataclasses.replace(opts, policy_options={"judge_net_negative": 0})
    result = run_des(instances, workload, policy, opts)
    tok_s, req_s = steady_throughput(result.records)
    shares = {k: v.get("share") or 0.0 for k, v in result.instances.items()}
    return {"plan": plan, "interference": interference, "users": users, "seed": seed,
            "steady_output_throughput": tok_s, "steady_request_throughput": req_s,
            "share_C": shares.get("C", 0.0), "p50_tpot_ms": result.summary.get("p50_tpot_ms"),
            "failed": result.summary.get("failed"), "wall_s": result.wall_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000, help="requests per run")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--interference", default="1.0,2.0", help="the simulated GPU's factor(s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    plans = ["B alone", *(f"static {f}" for f in SPLITS), "capacity, judging off", "capacity"]
    factors = [float(x) for x in args.interference.split(",") if x]
    tasks = [(p, k, args.n, args.users, args.seed) for k in factors for p in plans]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_plan, tasks))
    print(f"fleet: B and C of {FLEET.relative_to(REPO)} on one GPU; workload {WORKLOAD} (ignore_eos), "
          f"closed loop of {args.users} users, n={args.n}, seed {args.seed}")
    for k in factors:
        sub = [r for r in rows if r["interference"] == k]
        best_static = max(r["steady_output_throughput"] for r in sub
                          if r["plan"] == "B alone" or r["plan"].startswith("static"))
        print(f"\n### interference {k:g}\n")
        print("| plan | steady output tok/s | of best static | req/s | C's share | TPOT p50 ms | failed |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in sub:
            print(f"| {r['plan']} | {r['steady_output_throughput']:,.0f} | "
                  f"{r['steady_output_throughput'] / best_static:.3f} | {r['steady_request_throughput']:.1f} | "
                  f"{r['share_C']:.3f} | {r['p50_tpot_ms'] or 0:.1f} | {r['failed']} |")
    print(f"\n({time.perf_counter() - started:.0f} s wall)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
