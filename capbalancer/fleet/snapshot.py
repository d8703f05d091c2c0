"""One normalized view of an engine instance's load, whatever engine it is (DESIGN invariant 2).

Engine adapters (vLLM, TGI, SGLang) produce it from `/metrics`; the simulator produces it directly from
its engine model; the scheduler consumes it. Nothing above the adapters knows a metric name.
Every field the engine did not report is None: unknown is never taken for zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    taken_at_s: float  # scheduler-clock time at which the scrape was sent (state is at least this fresh)
    engine: str  # vllm | tgi | sglang | openai
    running: int | None = None  # sequences in the running batch
    waiting: int | None = None  # requests queued inside the engine
    kv_usage_fraction: float | None = None  # 0..1 of the KV cache in use (TGI: reserved by the batch's budget)
    kv_capacity_tokens: int | None = None  # total KV cache, in tokens
    preemptions_total: int | None = None  # cumulative preemptions (a counter)
    prompt_tokens_total: int | None = None  # cumulative prefill tokens (a counter)
    generation_tokens_total: int | None = None  # cumulative generated tokens (a counter)
    batch_tokens: int | None = None  # TGI: the running batch's token budget (inputs + max_new_tokens)
    # Prefix caching (vllm:prefix_cache_queries_total / _hits_total; SGLang: sglang:cached_tokens_total and the
    # prompt tokens): cumulative prompt tokens looked up and found cached. The prefix index learns from the hits.
    prefix_cache_queries_tokens_total: int | None = None
    prefix_cache_hits_tokens_total: int | None = None

    @property
    def kv_used_tokens(self) -> int | None:
        if self.kv_usage_fraction is None or self.kv_capacity_tokens is None:
            return None
        return int(round(self.kv_usage_fraction * self.kv_capacity_tokens))

    @property
    def kv_free_tokens(self) -> int | None:
        used = self.kv_used_tokens
        if used is None or self.kv_capacity_tokens is None:
            return None
        return max(0, self.kv_capacity_tokens - used)
