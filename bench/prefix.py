"""Prefix-aware routing on unequal GPUs, in the discrete-event runner (issue 13, item 6, DES part).

    .venv/bin/python bench/prefix.py [--quick] [--clusters a,b] [--workloads a,b] [--policies a,b]
                                     [--loads 0.6,1.0,1.4] [--jobs 2] [--json out.json]

Workloads (token ids, so hits are exact): multi-turn chat (each turn resends the conversation, think time
between turns), shared system prompts (K tenants, each a long system prompt), agentic loops (many short
calls appending to one long context), and prefix-free traffic. Per cluster, workload and load level (a
fraction of the cluster's ideal request rate for the same lengths with no cache), each policy's prefix hit
rate (engine-side: hit tokens / prompt tokens), goodput under the SLO (TTFT <= 2 s, TPOT <= 100 ms: requests
meeting it per second, counted over the span of session starts, the same window for every policy), SLO
attainment over all requests, TTFT p50/p99, output throughput in that window against the no-cache ideal,
and preemptions.

The engine's prefix cache is the simulator's own (capbalancer/sim/prefix_cache.py, vLLM-style: chained block
hashes over token ids at the profile's block size, blocks shared by running requests, freed blocks cached and
evicted LRU, prefill only for uncached tokens); the engine also caches each answer's blocks, so a turn hits the
previous answer as well. The runner is capbalancer/sim/des_sessions.SessionRun (a closed loop per session). The
scheduler sees what a live proxy sees: the request's block hashes and session, snapshots (which carry the
engine's cumulative hit counter, vllm:prefix_cache_hits_total), progress and completions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from capbalancer.loadtest.stats import Slo, summarize
from capbalancer.profiling.library import resolve_profile
from capbalancer.sim.des import DesInstance, DesOptions, instance_capacity
from capbalancer.sim.des_sessions import DesSession, SessionRun, SessionTurn, token_key
from capbalancer.sim.engine import Finished

SLO = Slo(ttft_ms=2000.0, tpot_ms=100.0)
POLICIES = ("capacity", "cache_aware", "llm_d", "least_kv", "round_robin")
BLOCK_TOKENS = 16
POOL = "sim"

CLUSTERS: dict[str, tuple[str, tuple[tuple[str, str, int], ...]]] = {
    "hels-llama13b": ("A100-80G x2 + P100-16G x2 (one TP2), Llama-2-13B",
                      (("a100", "a100-80g/llama-2-13b-tp1", 2), ("p100x2", "p100-16g/llama-2-13b-tp2", 1))),
    "speed-gap": ("H100-80G + L4, Llama-3.1-8B",
                  (("h100", "h100-80g/llama-3.1-8b-tp1", 1), ("l4", "l4/llama-3.1-8b-tp1", 1))),
    "many-mix": ("H100 x2, A100-80G x2, A100-40G x2, V100 x2, RTX 3090 x2, L4 x4, Llama-3.1-8B",
                 (("h100", "h100-80g/llama-3.1-8b-tp1", 2), ("a100", "a100-80g/llama-3.1-8b-tp1", 2),
                  ("a100-40g", "a100-40g/llama-3.1-8b-tp1", 2), ("v100", "v100-32g/llama-3.1-8b-tp1", 2),
                  ("3090", "rtx3090/llama-3.1-8b-tp1", 2), ("l4", "l4/llama-3.1-8b-tp1", 4))),
}


def instances_of(cluster: str) -> list[DesInstance]:
    out = []
    for prefix, profile, count in CLUSTERS[cluster][1]:
        prof = resolve_profile(profile)
        out.extend(DesInstance(f"{prefix}-{i}", prof, model=POOL) for i in range(count))
    return out


# --- workloads -------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Turn:
    prompt_ids: list[int]
    output_ids: list[int]
    think_s: float  # after this turn finishes, before the session's next one


@dataclass(slots=True)
class Session:
    start_s: float
    session_id: str | None
    turns: list[Turn] = field(default_factory=list)


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, int(rng.lognormvariate(mu, sigma))))


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(32000) for _ in range(n)]


def make_sessions(kind: str, n_sessions: int, start_rate_per_s: float, seed: int, max_prompt: int = 7500
                  ) -> list[Session]:
    """Deterministic sessions of `kind`; starts are Poisson at `start_rate_per_s`; a conversation ends when its
    context would pass `max_prompt` (the smallest instance's model length minus the output bound)."""
    rng = random.Random(seed)
    t = 0.0
    tenants = [_ids(rng, _lognormal(rng, 1500, 0.3, 800, 3000)) for _ in range(8)]
    out = []
    for s in range(n_sessions):
        t += rng.expovariate(start_rate_per_s)
        sess = Session(t, None)
        if kind == "multi_turn":  # ShareGPT-like turns: the context grows by each answer and question
            sess.session_id = f"chat-{s}"
            history = _ids(rng, _lognormal(rng, 400, 0.8, 16, min(3000, max_prompt)))
            for _ in range(rng.randint(2, 8)):
                out_ids = _ids(rng, _lognormal(rng, 200, 0.7, 8, 512))
                sess.turns.append(Turn(list(history), out_ids, rng.expovariate(1 / 3.0)))
                history = history + out_ids + _ids(rng, _lognormal(rng, 100, 0.8, 8, 1000))
                if len(history) > max_prompt:
                    break
        elif kind == "shared_prompt":  # one request per session; 8 tenants' long system prompts
            tenant = tenants[min(7, int(rng.paretovariate(1.2)) - 1)]
            sess.turns.append(Turn((tenant + _ids(rng, _lognormal(rng, 200, 0.8, 8, 2000)))[:max_prompt],
                                   _ids(rng, _lognormal(rng, 150, 0.7, 8, 512)), 0.0))
        elif kind == "agentic":  # one long context, many short calls appending tool results
            sess.session_id = f"agent-{s}"
            context = _ids(rng, _lognormal(rng, 3000, 0.3, 1000, min(6000, max_prompt)))
            for _ in range(10):
                out_ids = _ids(rng, _lognormal(rng, 60, 0.5, 4, 256))
                sess.turns.append(Turn(list(context), out_ids, rng.expovariate(1 / 0.5)))
                context = context + out_ids + _ids(rng, _lognormal(rng, 150, 0.8, 8, 800))
                if len(context) > max_prompt:
                    break
        elif kind == "prefix_free":
            sess.turns.append(Turn(_ids(rng, _lognormal(rng, 600, 0.8, 4, min(4000, max_prompt))),
                                   _ids(rng, _lognormal(rng, 200, 0.7, 1, 512)), 0.0))
        else:
            raise ValueError(f"unknown workload {kind!r}")
        out.append(sess)
    return out


WORKLOADS = ("multi_turn", "shared_prompt", "agentic", "prefix_free")


def max_prompt_of(cluster: str) -> int:
    return min(min(i.profile.max_model_len, i.profile.kv_capacity_tokens) for i in instances_of(cluster)) - 512


def mean_lengths(kind: str, max_prompt: int) -> tuple[float, float, float]:
    """(mean prompt tokens, mean output tokens, mean turns per session) of a workload."""
    sessions = make_sessions(kind, 400, 1.0, 12345, max_prompt)
    turns = [t for s in sessions for t in s.turns]
    return (sum(len(t.prompt_ids) for t in turns) / len(turns), sum(len(t.output_ids) for t in turns) / len(turns),
            len(turns) / len(sessions))


# --- the run: the simulator's own prefix cache in every engine (capbalancer/sim/prefix_cache.py) ----------

def des_sessions(sessions: list[Session]) -> list[DesSession]:
    """The bench's sessions as the DES runs them: the engines get token ids (prompt and answer), the scheduler the
    prompt's 16-token block hashes, as a proxy with the model's tokenizer computes them."""
    return [DesSession(s.start_s, s.session_id, [SessionTurn(t.prompt_ids, t.output_ids, t.think_s, max_tokens=512)
                                                 for t in s.turns]) for s in sessions]


class PrefixRun(SessionRun):
    def __init__(self, instances: list[DesInstance], sessions: list[Session], policy: str, opts: DesOptions) -> None:
        self.bench_sessions = sessions
        super().__init__(instances, des_sessions(sessions), POOL, policy, opts, key_of=token_key)

    def handle_engine_events(self, k: int, events: list) -> None:
        super().handle_engine_events(k, events)
        for ev in events:
            if isinstance(ev, Finished):
                i = int(ev.request_id)
                self.records[i].prompt_tokens = self.requests[i].prompt_tokens


def options(policy: str) -> DesOptions:
    # As bench/policies.py: capacity is configured as a user with this SLO would (hold at most the TTFT
    # objective, admit while predicted TPOT stays within it); the baselines never hold.
    if policy == "capacity":
        return DesOptions(poll_interval_s=0.25, slo=SLO, hold_max_requests=100_000,
                          hold_timeout_s=SLO.ttft_ms / 1000.0, policy_options={"tpot_slo_ms": SLO.tpot_ms})
    return DesOptions(poll_interval_s=0.25, slo=SLO, hold_max_requests=100_000, hold_timeout_s=60.0)


def run_one(args: tuple[str, str, str, float, int, float]) -> dict[str, Any]:
    cluster, workload, policy, load, seed, sim_seconds = args
    instances = instances_of(cluster)
    ideal = ideal_rate(cluster, workload)
    max_prompt = max_prompt_of(cluster)
    _mean_prompt, mean_out, turns = mean_lengths(workload, max_prompt)
    start_rate = load * ideal / turns
    n_sessions = max(60, int(start_rate * sim_seconds))
    sessions = make_sessions(workload, n_sessions, start_rate, seed, max_prompt)
    started = time.perf_counter()
    run = PrefixRun(instances, sessions, policy, options(policy))
    end = run.run()
    wall = time.perf_counter() - started
    duration = max(run.last_done_s - min(run.arrival_s), 1e-9)
    s = summarize(run.records, duration, SLO)
    caches = [e.prefix_cache for e in run.engines if e.prefix_cache is not None]
    queries, hits = sum(c.queries_tokens_total for c in caches), sum(c.hits_tokens_total for c in caches)
    ideal_out = ideal * mean_out
    # Sessions are closed loops (a turn waits for the previous answer), so the run's length depends on the
    # policy; goodput and throughput are counted over the same window for all: the span of session starts.
    window_s = sessions[-1].start_s
    in_window = [r for r in run.records if r.success and r.e2el_s is not None and r.start_s + r.e2el_s <= window_s]
    good = sum(1 for r in in_window if SLO.met_by(r))
    # What was asked in the window: no policy's goodput can pass it (a ratio bound when every policy is near it).
    offered = sum(1 for r in run.records if r.start_s <= window_s)
    out_tokens = sum(r.output_tokens for r in in_window)
    return {"cluster": cluster, "workload": workload, "policy": policy, "load": load,
            "requests": len(run.records), "completed": s["completed"], "failed": s["failed"],
            "hit_rate": hits / queries if queries else 0.0,
            "goodput_rps": good / window_s, "offered_rps": offered / window_s, "slo_attainment": s["slo_attainment"],
            "p50_ttft_ms": s.get("p50_ttft_ms"), "p99_ttft_ms": s.get("p99_ttft_ms"),
            "p50_tpot_ms": s.get("p50_tpot_ms"),
            "throughput_vs_ideal": out_tokens / window_s / ideal_out if ideal_out else None,
            "preemptions": sum(e.preemptions_total for e in run.engines),
            "held": sum(p.held_total for p in run.sched.pools.values()),
            "sim_s": end, "wall_s": wall}


_IDEAL: dict[tuple[str, str], float] = {}


def ideal_rate(cluster: str, workload: str) -> float:
    """The cluster's request rate at saturation for this workload's mean lengths with no prefix cache: the sum
    of each instance's own best (bench/policies.py's `ideal`)."""
    key = (cluster, workload)
    if key not in _IDEAL:
        mp, mo, _ = mean_lengths(workload, max_prompt_of(cluster))
        spec = (f"prompt=lognormal:mean={mp:.0f}:sigma=0.5,output=lognormal:mean={mo:.0f}:sigma=0.5,"
                f"max_tokens=512")
        _IDEAL[key] = sum(instance_capacity(i.profile, spec, n=600)["request_throughput"]
                          for i in instances_of(cluster))
    return _IDEAL[key]


def fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", default=",".join(CLUSTERS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--loads", default="0.7,1.0,1.4")
    ap.add_argument("--seconds", type=float, default=120.0, help="simulated seconds of session starts per run")
    ap.add_argument("--quick", action="store_true", help="60 s per run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    seconds = 60.0 if args.quick else args.seconds
    loads = [float(x) for x in args.loads.split(",")]
    tasks = [(c, w, p, load, 7, seconds) for c in args.clusters.split(",") for w in args.workloads.split(",")
             for load in loads for p in args.policies.split(",")]
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, tasks):
            rows.append(r)
            print(f"[{len(rows)}/{len(tasks)}] {r['cluster']} {r['workload']} {r['load']} {r['policy']}: hit "
                  f"{r['hit_rate']:.3f} goodput {r['goodput_rps']:.2f} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(f"SLO TTFT <= {SLO.ttft_ms:.0f} ms, TPOT <= {SLO.tpot_ms:.0f} ms; load = fraction of the no-cache ideal "
          f"request rate; {seconds:.0f} s of session starts per run")
    header = ("| cluster | workload | load | policy | hit rate | goodput req/s | SLO met | TTFT p50 / p99 ms "
              "| throughput / ideal | preemptions | held |")
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['cluster']} | {r['workload']} | {r['load']:.1f} | {r['policy']} | {r['hit_rate']:.3f} "
              f"| {fmt(r['goodput_rps'])} | {fmt(r['slo_attainment'])} | {fmt(r['p50_ttft_ms'], 0)} / "
              f"{fmt(r['p99_ttft_ms'], 0)} | {fmt(r['throughput_vs_ideal'])} | {r['preemptions']} | {r['held']} |")
    print()
    print(targets(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def targets(rows: list[dict[str, Any]]) -> str:
    """capacity's goodput against the best of cache_aware and llm_d, and its hit rate against the best's."""
    lines = ["| cluster | workload | load | capacity goodput / best peer (which) | capacity hit rate / best |",
             "|---|---|---|---|---|"]
    groups: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["cluster"], r["workload"], r["load"]), {})[r["policy"]] = r
    for (c, w, load), by in groups.items():
        cap = by.get("capacity")
        peers = [by[p] for p in ("cache_aware", "llm_d") if p in by]
        if cap is None or not peers:
            continue
        best = max(peers, key=lambda r: r["goodput_rps"] or 0.0)
        ratio = (cap["goodput_rps"] or 0.0) / best["goodput_rps"] if best["goodput_rps"] else float("inf")
        best_hit = max(r["hit_rate"] for r in by.values())
        lines.append(f"| {c} | {w} | {load:.1f} | {ratio:.2f}x ({best['policy']}) | "
                     f"{cap['hit_rate'] / best_hit if best_hit else 1.0:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
