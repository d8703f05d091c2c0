"""Baseline policies: what other routers do, reproduced faithfully so that we measure against them.

Each reads only the signals its original reads (documented per class, with the source), so a comparison
in the discrete-event runner is a comparison of algorithms, not of inputs.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from capbalancer.sched.backend import BackendState
from capbalancer.sched.policies import PolicyContext, register
from capbalancer.sched.prefix_index import BackendPrefixCache
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
    """vllm-router's and the SGLang model gateway's default `cache_aware` policy.

    Source: sgl-project/sglang sgl-router src/policies/cache_aware.rs (vllm-project/router is a fork of it) and
    their CLI references. Per request:

    1. Load is the router's own in-flight count per worker. If it is imbalanced, `max - min >
       balance_abs_threshold` AND `max > min * balance_rel_threshold` (defaults 64 and 1.5), the least-loaded
       worker wins (shortest queue).
    2. Otherwise the request text is matched against an approximate radix tree per worker: if the best
       match ratio (matched / request length) exceeds `cache_threshold` (default 0.3, the current CLI default;
       older releases and their README used 0.5) the worker with that match wins, else the worker with the
       smallest tree.
    3. Either way the request text is inserted into the chosen worker's tree; every `eviction_interval_s`
       (120) the trees are cut, least recently used first, down to `max_tree_size` (2^26 characters each).

    Where this differs: the peer matches characters; here the tree is the request's chained 64-character
    block hashes (sched/prefix_hash.py, what the proxy hashes), so a match counts whole blocks (a shorter
    match, by under one block, than the peer's) and a prompt under one block never matches. A chained hash
    stands for its whole prefix, so a per-worker set of hashes answers the same longest-prefix question as
    their shared tree. Requests with no hashes (no prompt text) grow the tree by their prompt length, as
    their text would. Sizes are counted in tokens (a block's `block_tokens`, ~4 characters each).
    """

    name = "cache_aware"

    def __init__(self, abs_threshold: float = 64, rel_threshold: float = 1.5, cache_threshold: float = 0.3,
                 eviction_interval_s: float = 120.0, max_tree_size_chars: int = 2**26) -> None:
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.cache_threshold = cache_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_tokens = max_tree_size_chars // 4
        self._trees: dict[str, OrderedDict[int, int]] = {}  # worker -> block hash -> tokens it stands for
        self._tree_tokens: dict[str, int] = {}
        self._next_eviction_s: float | None = None

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        self._maybe_evict(ctx.now)
        loads = [len(b.inflight) for b in candidates]
        max_load, min_load = max(loads), min(loads)
        hashes = demand.prefix.hashes
        pick: BackendState | None = None
        if max_load - min_load > self.abs_threshold and max_load > min_load * self.rel_threshold:
            pick = candidates[loads.index(min_load)]
        else:
            if hashes and demand.prompt_tokens > 0:
                best_blocks = 0
                for b in candidates:
                    tree = self._trees.get(b.backend_id)
                    if not tree:
                        continue
                    n = 0
                    for h in hashes:
                        if h not in tree:
                            break
                        n += 1
                    if n > best_blocks:
                        pick, best_blocks = b, n
                ratio = best_blocks * demand.prefix.block_tokens / demand.prompt_tokens
                if ratio <= self.cache_threshold:
                    pick = None
            if pick is None:
                pick = min(candidates, key=lambda b: self._tree_tokens.get(b.backend_id, 0))
        self._insert(pick.backend_id, demand)
        return pick

    def _insert(self, worker: str, demand: Demand) -> None:
        tree = self._trees.setdefault(worker, OrderedDict())
        hashes = demand.prefix.hashes
        added = 0
        if hashes:
            block_tokens = demand.prefix.block_tokens
            for h in reversed(hashes):  # the head most recent: a shared head outlives the tails
                if tree.pop(h, None) is None:
                    added += block_tokens
                tree[h] = block_tokens
        else:
            added = demand.prompt_tokens
        self._tree_tokens[worker] = self._tree_tokens.get(worker, 0) + added

    def _maybe_evict(self, now: float) -> None:
        if self._next_eviction_s is None:
            self._next_eviction_s = now + self.eviction_interval_s
            return
        if now < self._next_eviction_s:
            return
        self._next_eviction_s = now + self.eviction_interval_s
        for worker, size in self._tree_tokens.items():
            tree = self._trees.get(worker)
            while size > self.max_tree_tokens and tree:
                size -= tree.popitem(last=False)[1]
            self._tree_tokens[worker] = min(size, self.max_tree_tokens)


class LlmD:
    """llm-d / Gateway API inference extension EPP default profile: weighted scorers, max-score picker.

    Source: llm-d-inference-scheduler config/charts/epplib/templates/_config.yaml (queue-scorer 2,
    kv-cache-utilization-scorer 2, prefix-cache-scorer 3) and the scorers in pkg/epp/scheduling. Queue
    score is min-max normalised `num_requests_waiting` (fewer is better); KV score is 1 - usage. It reads
    engine metrics only (refreshed every 50 ms there); a stale or missing snapshot scores as saturated.

    The prefix-cache scorer (approximate mode, GIE pkg/epp/scheduling/framework/plugins/multi/prefix): the
    prompt is hashed in chained blocks, each server has an LRU of the block hashes the EPP sent it
    (`lruCapacityPerServer` 31250 blocks), at most `maxPrefixBlocksToMatch` (256) blocks are matched, and
    the score is matched blocks / the request's blocks; the chosen server's LRU gets the request's blocks.
    Where this differs: the blocks are the proxy's (64 characters, GIE's default `blockSize`; llm-d's
    token-block variant needs a tokenizer), and the hashes are ours, not xxhash.
    """

    name = "llm_d"

    def __init__(self, rng: random.Random, queue_weight: float = 2.0, kv_weight: float = 2.0,
                 prefix_weight: float = 3.0, lru_capacity_per_server: int = 31250,
                 max_prefix_blocks: int = 256) -> None:
        self._rng = rng
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.prefix_weight = prefix_weight
        self.lru_capacity_per_server = lru_capacity_per_server
        self.max_prefix_blocks = max_prefix_blocks
        self._lru: dict[str, BackendPrefixCache] = {}

    def _prefix_scores(self, demand: Demand, candidates: Sequence[BackendState]) -> list[float]:
        hashes = demand.prefix.hashes[: self.max_prefix_blocks]
        if not hashes or self.prefix_weight == 0:
            return [0.0] * len(candidates)
        out = []
        for b in candidates:
            lru = self._lru.get(b.backend_id)
            out.append(0.0 if lru is None else lru.match(hashes).cached_blocks / len(hashes))
        return out

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        waiting: list[float] = []
        kv: list[float] = []
        for b in candidates:
            snap = b.fresh_snapshot(ctx.now, ctx.health)
            waiting.append(float("inf") if snap is None or snap.waiting is None else float(snap.waiting))
            kv.append(1.0 if snap is None or snap.kv_usage_fraction is None else snap.kv_usage_fraction)
        prefix = self._prefix_scores(demand, candidates)
        finite = [w for w in waiting if w != float("inf")]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        best_score = -1.0
        best: list[BackendState] = []
        for b, w, u, p in zip(candidates, waiting, kv, prefix, strict=True):
            if w == float("inf"):
                queue_score = 0.0
            elif hi > lo:
                queue_score = (hi - w) / (hi - lo)
            else:
                queue_score = 1.0
            score = self.queue_weight * queue_score + self.kv_weight * (1.0 - u) + self.prefix_weight * p
            if score > best_score + 1e-12:
                best_score, best = score, [b]
            elif abs(score - best_score) <= 1e-12:
                best.append(b)
        pick = self._rng.choice(best)
        hashes = demand.prefix.hashes[: self.max_prefix_blocks]
        if hashes:
            lru = self._lru.get(pick.backend_id)
            if lru is None:
                lru = self._lru[pick.backend_id] = BackendPrefixCache(self.lru_capacity_per_server)
            lru.touch(hashes, pin=False)
        return pick


register("least_kv")(lambda options, rng: LeastKv())
register("power_of_two")(lambda options, rng: PowerOfTwo(rng))
register("weighted")(lambda options, rng: Weighted())
register("cache_aware")(lambda options, rng: CacheAware(options.get("balance_abs_threshold", 64),
                                                        options.get("balance_rel_threshold", 1.5),
                                                        options.get("cache_threshold", 0.3),
                                                        options.get("eviction_interval_s", 120.0)))
register("llm_d")(lambda options, rng: LlmD(rng, prefix_weight=options.get("prefix_weight", 3.0)))
