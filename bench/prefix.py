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

The engine's prefix cache: until the simulator's own vLLM-style prefix cache is merged (branch prefix-sim),
this runner keeps a ground-truth LRU of block hashes per engine (`EngineCache`) sized by the engine's free
KV, and hands the engine only the uncached part of each prompt (prefill charged only for uncached tokens).
The hit's KV blocks that leave the free pool are taken from the engine model's free blocks while the
request runs, so admission, preemption and the reported KV usage stay honest. The scheduler sees what a live proxy sees: the request's block hashes and session, snapshots, and
the engine's cumulative hit counter (as vllm:prefix_cache_hits_total).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from capbalancer.loadtest.stats import Slo, summarize
from capbalancer.profiling.library import resolve_profile
from capbalancer.sched.prefix_hash import PrefixKey, token_block_hashes
from capbalancer.sched.prefix_index import prefix_salt
from capbalancer.sched.types import Demand, Hold, Route
from capbalancer.sim import des
from capbalancer.sim.des import DesInstance, DesOptions, instance_capacity
from capbalancer.sim.engine import Finished, FirstToken, SimRequest
from capbalancer.sim.workload import DesRequest

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


# --- the engine's prefix cache (ground truth, until the simulator has its own) ---------------------------

class EngineCache:
    """What one engine holds, as vLLM's automatic prefix caching does: every computed prompt block is cached;
    blocks of running requests are pinned (in use, never evicted); freed ones stay cached in the free pool and
    are evicted least recently used (a chain's tail first) when the engine needs the room."""

    def __init__(self) -> None:
        self.blocks: OrderedDict[int, int] = OrderedDict()  # hash -> running requests using it
        self.pinned = 0  # blocks with a user

    def hit_blocks(self, hashes: tuple[int, ...]) -> tuple[int, int]:
        """(leading blocks cached, of those the ones no running request uses: they leave the free pool)."""
        n = idle = 0
        blocks = self.blocks
        for h in hashes:
            pins = blocks.get(h)
            if pins is None:
                break
            n += 1
            if pins == 0:
                idle += 1
        return n, idle

    def use(self, hashes: tuple[int, ...], free_blocks: int) -> None:
        """A request starts with these prompt blocks (hit or computed): pinned, most recent, head last."""
        blocks = self.blocks
        for h in reversed(hashes):
            pins = blocks.pop(h, 0)
            if pins == 0:
                self.pinned += 1
            blocks[h] = pins + 1
        self.evict_to(free_blocks)

    def release(self, hashes: tuple[int, ...], extra: tuple[int, ...], free_blocks: int) -> None:
        """The request finished: its blocks become evictable; the answer's full blocks are cached too."""
        blocks = self.blocks
        for h in hashes:
            pins = blocks.get(h)
            if pins:
                blocks[h] = pins - 1
                if pins == 1:
                    self.pinned -= 1
        for h in reversed(extra):
            if h not in blocks:
                blocks[h] = 0
        self.evict_to(free_blocks)

    def evict_to(self, free_blocks: int) -> None:
        """Unpinned cached blocks live in the engine's free KV: at most `free_blocks` of them."""
        blocks = self.blocks
        budget = len(blocks)
        while len(blocks) - self.pinned > max(0, free_blocks) and budget > 0:
            budget -= 1
            h, pins = blocks.popitem(last=False)
            if pins:
                blocks[h] = pins


class PrefixRun(des._Run):
    def __init__(self, instances: list[DesInstance], sessions: list[Session], policy: str, opts: DesOptions,
                 engine_cache: bool = True) -> None:
        self.sessions = sessions
        self.turn_of: list[tuple[int, int]] = []
        requests: list[DesRequest] = []
        for si, s in enumerate(sessions):
            for ti, t in enumerate(s.turns):
                requests.append(DesRequest(len(requests), s.start_s, len(t.prompt_ids), len(t.output_ids), 512))
                self.turn_of.append((si, ti))
        self.first_index = {}
        i = 0
        for si, s in enumerate(sessions):
            self.first_index[si] = i
            i += len(s.turns)
        super().__init__(instances, requests, SimpleNamespace(model=POOL, concurrency=None), policy, opts)
        self.salt = prefix_salt(POOL)
        self.keys: dict[int, PrefixKey] = {}
        self.engine_cache = engine_cache
        self.caches = [EngineCache() for _ in instances]
        self.hit_tokens = [0] * len(instances)
        self.reserved: dict[int, tuple[int, int]] = {}  # request -> (engine, blocks held for its cache hit)
        self.hit_idle_blocks: dict[int, int] = {}  # request -> blocks to take once it runs
        self.query_tokens = [0] * len(instances)

    def key(self, i: int) -> PrefixKey:
        k = self.keys.get(i)
        if k is None:
            si, ti = self.turn_of[i]
            k = self.keys[i] = token_block_hashes(self.sessions[si].turns[ti].prompt_ids, BLOCK_TOKENS, self.salt)
        return k

    def arrive(self, i: int, now: float) -> None:
        r = self.requests[i]
        self.arrival_s[i] = now
        self.records[i].start_s = now
        si, _ = self.turn_of[i]
        demand = Demand(request_id=str(i), pool=POOL, prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens,
                        arrival_s=now, stream=True, prefix=self.key(i), session_id=self.sessions[si].session_id)
        decision = self.sched.submit(demand, now)
        if isinstance(decision, Route):
            self.start_on(i, self.index_of[decision.backend_id], now)
        elif isinstance(decision, Hold):
            self.ensure_tick()
        else:
            self.fail(i, decision.status, decision.reason, now)

    def _capacity_blocks(self, k: int) -> int:
        eng = self.engines[k]
        return eng.free_blocks * eng.block_size // BLOCK_TOKENS

    def start_on(self, i: int, k: int, now: float) -> None:
        r = self.requests[i]
        self.routed_to[i] = k
        self.records[i].backend = self.instances[k].name
        key = self.key(i)
        hit = 0
        eng = self.engines[k]
        if self.engine_cache:
            hit_blocks, idle_blocks = self.caches[k].hit_blocks(key.hashes)
            hit = min(hit_blocks * BLOCK_TOKENS, r.prompt_tokens - 1)
            # The engine model computes only the uncached part, so it never allocates the hit's KV: once the
            # request runs, the blocks that left the free pool (cached, unused by any running request) are taken
            # from the model's free blocks, and given back when it ends, so KV pressure stays honest.
            self.hit_idle_blocks[i] = idle_blocks * BLOCK_TOKENS // eng.block_size
            self.caches[k].use(key.hashes, self._capacity_blocks(k))
        self.hit_tokens[k] += hit
        self.query_tokens[k] += r.prompt_tokens
        events = eng.add_request(SimRequest(str(i), r.prompt_tokens - hit, r.output_tokens, r.max_tokens, now), now)
        if str(i) in eng.running:
            self.reserve(i, k)
        self.handle_engine_events(k, events)
        self.reschedule(k)

    def reserve(self, i: int, k: int) -> None:
        need = self.hit_idle_blocks.pop(i, 0)
        if need:
            eng = self.engines[k]
            take = min(eng.free_blocks, need)
            eng.free_blocks -= take
            self.reserved[i] = (k, take)

    def reschedule(self, k: int) -> None:
        eng = self.engines[k]
        if eng.waiting and eng.next_event_s() is None:
            # Nothing can run and nothing will free blocks (preempted requests keep their reservation): give
            # this engine's reservations back rather than stall the simulation.
            for i, (kk, take) in list(self.reserved.items()):
                if kk == k:
                    eng.free_blocks += take
                    del self.reserved[i]
        super().reschedule(k)

    def handle_engine_events(self, k: int, events: list) -> None:
        for ev in events:
            if isinstance(ev, FirstToken) and int(ev.request_id) in self.hit_idle_blocks:
                self.reserve(int(ev.request_id), k)
        super().handle_engine_events(k, events)
        for ev in events:
            if isinstance(ev, Finished):
                i = int(ev.request_id)
                self.records[i].prompt_tokens = self.requests[i].prompt_tokens
                if self.engine_cache:  # the answer's blocks are cached too: the next turn starts with them
                    si, ti = self.turn_of[i]
                    t = self.sessions[si].turns[ti]
                    key = self.key(i)
                    full = token_block_hashes(t.prompt_ids + t.output_ids, BLOCK_TOKENS, self.salt)
                    self.engines[k].free_blocks += self.reserved.pop(i, (k, 0))[1]
                    self.caches[k].release(key.hashes, full.hashes[len(key.hashes):], self._capacity_blocks(k))
                self.next_turn(i, ev.time_s)

    def fail(self, i: int, status: int, reason: str, now: float) -> None:
        super().fail(i, status, reason, now)
        self.next_turn(i, now)

    def next_turn(self, i: int, now: float) -> None:
        si, ti = self.turn_of[i]
        s = self.sessions[si]
        if ti + 1 < len(s.turns):
            self.push(now + s.turns[ti].think_s, des._ARRIVAL, i + 1)

    def done(self, now: float) -> None:
        self.resolved += 1
        self.last_done_s = max(self.last_done_s, now)

    def poll(self, now: float) -> None:
        sched = self.sched
        for k, eng in enumerate(self.engines):
            self.handle_engine_events(k, eng.advance_to(now))
            inst = self.instances[k]
            self.handle_sched_events(sched.observe(inst.name, eng.snapshot(now, inst.engine), now), now)
            sched.observe_prefix_hits(inst.name, self.hit_tokens[k], now)
            epoch = eng.epoch
            for req in eng.running.values():
                generated = epoch - req.decode_offset if req.decoding else req.generated
                if generated > 1:
                    sched.on_progress(req.request_id, generated, now)
            self.reschedule(k)

    def run(self) -> float:
        for si in range(len(self.sessions)):
            self.push(self.sessions[si].start_s, des._ARRIVAL, self.first_index[si])
        self.push(0.0, des._POLL)
        heap = self.heap
        n = len(self.requests)
        now = 0.0
        import heapq

        while heap and self.resolved < n:
            now, kind, _, a, b = heapq.heappop(heap)
            self.events += 1
            if kind == des._ENGINE:
                if b != self.version[a]:
                    continue
                self.scheduled_at[a] = None
                self.handle_engine_events(a, self.engines[a].advance_to(now))
                self.reschedule(a)
            elif kind == des._ARRIVAL:
                self.arrive(a, now)
            elif kind == des._TICK:
                if self.tick_at is not None and now >= self.tick_at:
                    self.tick_at = None
                self.handle_sched_events(self.sched.tick(now), now)
                self.ensure_tick()
            else:
                self.poll(now)
                self.handle_sched_events(self.sched.tick(now), now)
                self.ensure_tick()
                self.push(now + self.opts.poll_interval_s, des._POLL)
        return now


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
    queries, hits = sum(run.query_tokens), sum(run.hit_tokens)
    ideal_out = ideal * mean_out
    # Sessions are closed loops (a turn waits for the previous answer), so the run's length depends on the
    # policy; goodput and throughput are counted over the same window for all: the span of session starts.
    window_s = sessions[-1].start_s
    in_window = [r for r in run.records if r.success and r.e2el_s is not None and r.start_s + r.e2el_s <= window_s]
    good = sum(1 for r in in_window if SLO.met_by(r))
    out_tokens = sum(r.output_tokens for r in in_window)
    return {"cluster": cluster, "workload": workload, "policy": policy, "load": load,
            "requests": len(run.records), "completed": s["completed"], "failed": s["failed"],
            "hit_rate": hits / queries if queries else 0.0,
            "goodput_rps": good / window_s, "slo_attainment": s["slo_attainment"],
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
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
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
