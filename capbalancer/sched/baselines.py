"""Baseline policies: what other routers do, reproduced faithfully so that we measure against them.

Each reads only the signals its original reads (documented per class, with the source), so a comparison
in the discrete-event runner is a comparison of algorithms, not of inputs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from capbalancer.sched.backend import BackendState
from capbalancer.sched.policies import PolicyContext, register
from capbalancer.sched.types import Demand

# Mean context per sequence at which static weights compare profiles' decode throughput.
WEIGHT_REFERENCE_CONTEXT_TOKENS = 800.0


def _kv_usage(b: BackendState, ctx: PolicyContext) -> float:
    capacity = b.kv_capacity_tokens()
    used = b.kv_used_estimate(ctx.now, ctx.health)
    if not capacity:
        return float(used)
    return used / capacity


class LeastKv:
    """Lowest KV-cache usage (AIBrix `least-kv-cache`, llm-d's kv-cache-utilization scorer alone);
    usage is the snapshot's moved by the proxy's own accounting. Ties: fewer requests, then in turn."""

    name = "least_kv"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        self._turn += 1
        n = len(candidates)
        return min((candidates[(self._turn + i) % n] for i in range(n)),
                   key=lambda b: (round(_kv_usage(b, ctx), 4), b.requests_estimate(ctx.now, ctx.health)))


class PowerOfTwo:
    """Two backends drawn at random, the less loaded wins (vllm-router / SGLang gateway `power_of_two`:
    the engine-reported load plus the router's own in-flight count; here the snapshot's running+waiting
    moved by our accounting)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(list(candidates), 2)
        load_a = a.requests_estimate(ctx.now, ctx.health)
        load_b = b.requests_estimate(ctx.now, ctx.health)
        return a if load_a <= load_b else b


class Weighted:
    """Smooth weighted round-robin (nginx's algorithm) with static weights: the backend's configured
    weight, or its profile's best decode throughput when it sets none (LiteLLM `weight`, and the
    weighted round-robin asked for in vLLM production-stack PR #213)."""

    name = "weighted"

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    @staticmethod
    def weight(b: BackendState) -> float:
        if b.spec.weight is not None:
            return b.spec.weight
        if b.spec.profile is not None:
            return max(1e-9, b.spec.profile.max_decode_tokens_per_second(WEIGHT_REFERENCE_CONTEXT_TOKENS))
        return 1.0

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        total = 0.0
        best: BackendState | None = None
        for b in candidates:
            w = self.weight(b)
            total += w
            self._current[b.backend_id] = self._current.get(b.backend_id, 0.0) + w
            if best is None or self._current[b.backend_id] > self._current[best.backend_id]:
                best = b
        assert best is not None
        self._current[best.backend_id] -= total
        return best


class CacheAware:
    """vllm-router's and the SGLang model gateway's default `cache_aware` policy, load-balancing part.

    Source: vllm-project/router docs/load_balancing/README.md and cli_reference.md (defaults
    --balance-abs-threshold 64, --balance-rel-threshold 1.5, --cache-threshold 0.3). If the router's own
    in-flight counts are imbalanced (max - min > abs AND max > min * rel) the least-loaded worker wins;
    otherwise the worker with the longest prefix match if above the cache threshold, else the worker with
    the smallest approximate radix tree. With no shared prefixes (our synthetic workloads) no match passes
    the threshold, so the tree-size rule decides: the tree grows by each routed prompt's characters and is
    evicted only past 2^26 characters, so it is the worker that has received the fewest prompt tokens.
    """

    name = "cache_aware"

    def __init__(self, abs_threshold: float = 64, rel_threshold: float = 1.5) -> None:
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self._tree_tokens: dict[str, int] = {}

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        loads = [len(b.inflight) for b in candidates]
        max_load, min_load = max(loads), min(loads)
        if max_load - min_load > self.abs_threshold and max_load > min_load * self.rel_threshold:
            pick = candidates[loads.index(min_load)]
        else:
            pick = min(candidates, key=lambda b: self._tree_tokens.get(b.backend_id, 0))
        self._tree_tokens[pick.backend_id] = self._tree_tokens.get(pick.backend_id, 0) + demand.prompt_tokens
        return pick


class LlmD:
    """llm-d / Gateway API inference extension EPP default profile: weighted scorers, max-score picker.

    Source: llm-d-inference-scheduler config/charts/epplib/templates/_config.yaml (queue-scorer 2,
    kv-cache-utilization-scorer 2, prefix-cache-scorer 3) and the scorers in pkg/epp/scheduling. Queue
    score is min-max normalised `num_requests_waiting` (fewer is better); KV score is 1 - usage. It reads
    engine metrics only (refreshed every 50 ms there); a stale or missing snapshot scores as saturated.
    The prefix scorer contributes nothing on workloads without shared prefixes.
    """

    name = "llm_d"

    def __init__(self, rng: random.Random, queue_weight: float = 2.0, kv_weight: float = 2.0) -> None:
        self._rng = rng
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        waiting: list[float] = []
        kv: list[float] = []
        for b in candidates:
            snap = b.fresh_snapshot(ctx.now, ctx.health)
            waiting.append(float("inf") if snap is None or snap.waiting is None else float(snap.waiting))
            kv.append(1.0 if snap is None or snap.kv_usage_fraction is None else snap.kv_usage_fraction)
        finite = [w for w in waiting if w != float("inf")]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        best_score = -1.0
        best: list[BackendState] = []
        for b, w, u in zip(candidates, waiting, kv, strict=True):
            if w == float("inf"):
                queue_score = 0.0
            elif hi > lo:
                queue_score = (hi - w) / (hi - lo)
            else:
                queue_score = 1.0
            score = self.queue_weight * queue_score + self.kv_weight * (1.0 - u)
            if score > best_score + 1e-12:
                best_score, best = score, [b]
            elif abs(score - best_score) <= 1e-12:
                best.append(b)
        return self._rng.choice(best)


register("least_kv")(lambda options, rng: LeastKv())
register("power_of_two")(lambda options, rng: PowerOfTwo(rng))
register("weighted")(lambda options, rng: Weighted())
register("cache_aware")(lambda options, rng: CacheAware(options.get("balance_abs_threshold", 64),
                                                        options.get("balance_rel_threshold", 1.5)))
register("llm_d")(lambda options, rng: LlmD(rng))
