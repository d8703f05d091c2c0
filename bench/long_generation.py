"""Long generation at saturation (issue 15 §3): steady output throughput and preemptions of `capacity` against the
KV-aware baselines, in the discrete-event runner with its defaults (profiles 15% off the engines' truth).

    .venv/bin/python bench/long_generation.py [--clusters hels-llama13b,kv-short] [--seeds 1,2,3] [--jobs 1]

A closed loop of twice the sequences the fleet runs at once (seats, or what its KV holds at ~1,100 tokens), prompts ~100 tokens, outputs ~1,000
(lognormal, max_tokens 2,048). `capacity` runs twice: with its defaults, and in throughput mode (no derived
TTFT/TPOT objective, every seat may be filled), which is what "throughput at saturation" compares; the
baselines have no objectives. Figure: output tokens/s between the 10th and 90th percentile completion, the mean
over the seeds (one run varies by a few per cent).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from des_rows import steady_throughput  # bench/ is on sys.path when run as a script
from goodput_defaults import _cluster

from capbalancer.sim.des import DesOptions, run_des

WORKLOAD = "prompt=lognormal:mean=100:sigma=0.5,output=lognormal:mean=1000:sigma=0.5,max_tokens=2048"
MEAN_REQUEST_TOKENS = 1100
THROUGHPUT_MODE = {"ttft_objective_factor": 0, "tpot_objective_factor": 0}
RUNS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("least_kv", "least_kv", {}), ("llm_d", "llm_d", {}),
    ("capacity (defaults)", "capacity", {}),
    ("capacity (throughput mode)", "capacity", THROUGHPUT_MODE),
)


def _run(task: tuple[str, str, str, dict[str, float], int, int]) -> dict[str, Any]:
    cluster_name, label, policy, options, reps, seed = task
    instances = _cluster(cluster_name).des_instances()
    # Twice the sequences the fleet can run at once: its seats, or what its KV holds at the mean request size
    # (~1,100 tokens) where that is fewer. More users only queue at the proxy (or in the engines).
    users = 2 * sum(min(i.profile.max_num_seqs, i.profile.kv_capacity_tokens // MEAN_REQUEST_TOKENS)
                    for i in instances)
    res = run_des(instances, f"{WORKLOAD},n={reps * users},concurrency={users},seed={seed}", policy,
                  DesOptions(poll_interval_s=0.25, policy_options=options, seed=seed), seed=seed)
    tok_s, req_s = steady_throughput(res.records)
    return {"cluster": cluster_name, "label": label, "users": users, "steady_output_tok_s": tok_s,
            "steady_req_s": req_s, "preemptions": res.summary.get("preemptions")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", default="hels-llama13b,kv-short")
    ap.add_argument("--reps", type=int, default=4, help="requests per user")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", default="1,2,3", help="workload seeds; figures are their mean")
    ap.add_argument("--extra", default="", help="more capacity runs: 'label:key=value;key=value,...'")
    args = ap.parse_args(argv)
    runs = list(RUNS)
    for spec in filter(None, args.extra.split(",")):
        label, _, opts = spec.partition(":")
        runs.append((label, "capacity", {k: float(v) for k, v in (kv.split("=") for kv in opts.split(";") if kv)}))
    seeds = [int(x) for x in args.seeds.split(",")]
    tasks = [(c, label, policy, options, args.reps, seed) for c in args.clusters.split(",")
             for label, policy, options in runs for seed in seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        per_seed = list(pool.map(_run, tasks))
    # Mean over the seeds, per cluster and run.
    rows = []
    for i in range(0, len(per_seed), len(seeds)):
        group = per_seed[i:i + len(seeds)]
        rows.append({**group[0], "steady_output_tok_s": sum(r["steady_output_tok_s"] for r in group) / len(group),
                     "preemptions": sum(r["preemptions"] for r in group) // len(group)})
    for c in args.clusters.split(","):
        mine = [r for r in rows if r["cluster"] == c]
        best = max(r["steady_output_tok_s"] for r in mine if r["label"] in ("least_kv", "llm_d"))
        print(f"\n## {c} ({mine[0]['users']} users)\n")
        print("| policy | steady output tok/s | of the best baseline | preemptions |")
        print("|---|---|---|---|")
        for r in mine:
            print(f"| {r['label']} | {r['steady_output_tok_s']:,.0f} | {r['steady_output_tok_s'] / best:.2f} | "
                  f"{r['preemptions']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
