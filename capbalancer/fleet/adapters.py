"""Engine adapters: one engine's /metrics text → the one normalized `EngineSnapshot` (DESIGN invariant 2).

This module and capbalancer/fleet/detect.py are the only places that know metric names. Every field an
engine did not report stays None (unknown is never zero); a page with none of the engine's series raises
`MetricsUnavailable`, so the monitor sends no snapshot rather than an empty one.

Sources of the names:
- vLLM: vllm-project/vllm `vllm/v1/metrics/loggers.py` (PrometheusStatLogger; one series per data-parallel
  engine, label `engine`), `vllm/engine/metrics.py` for the V0 names, `vllm/config/cache.py`
  (`CacheConfig.metrics_info`: every field becomes a label of `vllm:cache_config_info`).
- TGI: huggingface/text-generation-inference `docs/source/reference/metrics.md`, `backends/v3/src/lib.rs`
  (`tgi_batch_max_total_tokens`, set after warmup), `router/src/lib.rs` (`Info.max_batch_total_tokens`).
- SGLang: sgl-project/sglang `python/sglang/srt/metrics/collector.py` (SchedulerMetricsCollector,
  TokenizerMetricsCollector).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from capbalancer.fleet.promtext import Sample, parse
from capbalancer.fleet.snapshot import EngineSnapshot

__all__ = ["ENGINES", "MetricsUnavailable", "Adapter", "adapter_for", "snapshot_from_metrics",
           "openai_snapshot"]

Samples = dict[str, list[Sample]]


class MetricsUnavailable(Exception):
    """The page parsed but holds none of the series this engine's adapter reads."""


@dataclass(frozen=True, slots=True)
class CapacityHints:
    """KV capacity from outside the metrics page. The engine's own figures come first (its page, then TGI's
    /info); the configured one (the backend's profile) only when the engine says nothing."""

    configured_tokens: int | None = None  # PollTarget.kv_capacity_tokens (the backend's profile)
    info_tokens: int | None = None  # TGI /info max_batch_total_tokens (old TGI)


@dataclass(frozen=True, slots=True)
class Adapter:
    engine: str
    wanted: tuple[str, ...]  # sample names the adapter reads; the parser skips everything else
    build: Callable[[Samples, float, CapacityHints], EngineSnapshot]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _count(v: float | None) -> int | None:
    """Gauges and counters of whole things arrive as floats ('6.0', '8.128902e+06')."""
    if v is None or not math.isfinite(v) or v < 0:
        return None
    return int(round(v))


def _fraction(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return min(1.0, max(0.0, v))


def _int_label(labels: dict[str, str], key: str) -> int | None:
    raw = labels.get(key)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:  # "None" for fields the engine has not resolved
        return None
    return value if value > 0 else None


def _sum_values(series: list[Sample] | None) -> float | None:
    """Sum over label sets (vLLM data-parallel engines); None if absent or any value is NaN."""
    if not series:
        return None
    total = 0.0
    for s in series:
        v = _finite(s.value)
        if v is None:
            return None
        total += v
    return total


def _first_present(samples: Samples, *names: str) -> list[Sample] | None:
    for name in names:
        if samples.get(name):
            return samples[name]
    return None


# --------------------------------------------------------------------------------------------- vLLM
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"  # a 0..1 fraction despite the name
VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"  # V0 and V1 <= 0.10 (hidden in 0.11, gone after)
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens_total"
VLLM_CACHE_INFO = "vllm:cache_config_info"
# Prefix caching, in tokens (vllm/v1/metrics/loggers.py; `vllm:gpu_prefix_cache_*` before 0.9.2).
VLLM_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_PREFIX_HITS = "vllm:prefix_cache_hits_total"
VLLM_PREFIX_QUERIES_OLD = "vllm:gpu_prefix_cache_queries_total"
VLLM_PREFIX_HITS_OLD = "vllm:gpu_prefix_cache_hits_total"


def _vllm_engine_capacity(labels: dict[str, str]) -> int | None:
    # kv_cache_size_tokens is per DP engine and group-aware (hybrid models); blocks x block size is
    # what older servers give.
    tokens = _int_label(labels, "kv_cache_size_tokens")
    if tokens is not None:
        return tokens
    blocks, block_size = _int_label(labels, "num_gpu_blocks"), _int_label(labels, "block_size")
    if blocks is None or block_size is None:
        return None
    return blocks * block_size


def _vllm(samples: Samples, taken_at_s: float, hints: CapacityHints) -> EngineSnapshot:
    # Capacity per engine label ("" when the server has no `engine` label: V0, one engine).
    capacity_by_engine: dict[str, int | None] = {}
    for s in samples.get(VLLM_CACHE_INFO, ()):
        capacity_by_engine[s.labels.get("engine", "")] = _vllm_engine_capacity(s.labels)

    usage_series = _first_present(samples, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD) or []
    kv_usage: float | None = None
    kv_capacity: int | None = None
    if usage_series:
        caps = [capacity_by_engine.get(s.labels.get("engine", ""), capacity_by_engine.get("")) for s in usage_series]
        usages = [_fraction(s.value) for s in usage_series]
        if all(u is not None for u in usages):
            if all(c is not None for c in caps):
                kv_capacity = sum(c for c in caps if c is not None)
                # Engines may differ in size: the fraction of the total is the capacity-weighted mean.
                kv_usage = sum(u * c for u, c in zip(usages, caps, strict=True)
                               if u is not None and c is not None) / kv_capacity
            else:
                kv_usage = sum(u for u in usages if u is not None) / len(usages)
    elif capacity_by_engine and all(c is not None for c in capacity_by_engine.values()):
        kv_capacity = sum(c for c in capacity_by_engine.values() if c is not None)
    if kv_capacity is None:
        kv_capacity = hints.configured_tokens

    return EngineSnapshot(
        taken_at_s=taken_at_s, engine="vllm",
        running=_count(_sum_values(samples.get(VLLM_RUNNING))),
        waiting=_count(_sum_values(samples.get(VLLM_WAITING))),
        kv_usage_fraction=_fraction(kv_usage),
        kv_capacity_tokens=kv_capacity,
        preemptions_total=_count(_sum_values(samples.get(VLLM_PREEMPTIONS))),
        prompt_tokens_total=_count(_sum_values(samples.get(VLLM_PROMPT_TOKENS))),
        generation_tokens_total=_count(_sum_values(samples.get(VLLM_GENERATION_TOKENS))),
        prefix_cache_queries_tokens_total=_count(_sum_values(
            _first_present(samples, VLLM_PREFIX_QUERIES, VLLM_PREFIX_QUERIES_OLD))),
        prefix_cache_hits_tokens_total=_count(_sum_values(
            _first_present(samples, VLLM_PREFIX_HITS, VLLM_PREFIX_HITS_OLD))),
    )


# ---------------------------------------------------------------------------------------------- TGI
TGI_QUEUE = "tgi_queue_size"
TGI_BATCH_SIZE = "tgi_batch_current_size"
TGI_BATCH_MAX_TOKENS = "tgi_batch_current_max_tokens"
TGI_MAX_TOTAL_TOKENS = "tgi_batch_max_total_tokens"


def _tgi(samples: Samples, taken_at_s: float, hints: CapacityHints) -> EngineSnapshot:
    """TGI has no KV-cache gauge. Its KV use is derived from the batch's token budget, the way TGI's own
    router admits work:

    - `tgi_batch_current_max_tokens` is the running batch's `max_tokens`, the sum of input + max_new_tokens
      of its requests (backends/v3/src/queue.rs `next_batch`); v3 allocates a request's KV blocks for all of
      them when it joins the batch (`block_allocator.allocate(input + max_new_tokens + speculate - 1)`).
    - the router admits new requests only within `max_batch_total_tokens - batch_max_tokens`
      (backends/v3/src/backend.rs `token_budget`), `tgi_batch_max_total_tokens` being that total.

    So `kv_usage_fraction` is the share of KV *reserved* by the batch: the room TGI itself sees as taken,
    an upper bound on the KV written so far (a request that stops early never grows into its reserve).
    The gauge is set once per decode step and back to 0 when the batch empties."""
    # TGI's Rust exporter registers a gauge on its first `set`: a fresh server may lack the queue and
    # batch gauges until its first request. Absent stays None (unknown), not 0.
    batch_tokens = _count(_sum_values(samples.get(TGI_BATCH_MAX_TOKENS)))
    capacity = _count(_sum_values(samples.get(TGI_MAX_TOTAL_TOKENS))) or hints.info_tokens or hints.configured_tokens
    kv_usage: float | None = None
    if batch_tokens is not None and capacity:
        kv_usage = _fraction(batch_tokens / capacity)
    return EngineSnapshot(
        taken_at_s=taken_at_s, engine="tgi",
        running=_count(_sum_values(samples.get(TGI_BATCH_SIZE))),
        waiting=_count(_sum_values(samples.get(TGI_QUEUE))),
        kv_usage_fraction=kv_usage,
        kv_capacity_tokens=capacity or None,
        batch_tokens=batch_tokens,
    )


# ------------------------------------------------------------------------------------------- SGLang
SGL_RUNNING = "sglang:num_running_reqs"
SGL_QUEUE = "sglang:num_queue_reqs"
SGL_TOKEN_USAGE = "sglang:token_usage"
SGL_USED_TOKENS = "sglang:num_used_tokens"
SGL_MAX_TOKENS = "sglang:max_total_num_tokens"
SGL_RETRACTED = "sglang:num_retracted_requests_total"
SGL_PROMPT_TOKENS = "sglang:prompt_tokens_total"
SGL_GENERATION_TOKENS = "sglang:generation_tokens_total"
SGL_CACHED_TOKENS = "sglang:cached_tokens_total"  # prompt tokens found in the radix cache (tokenizer collector)


def _per_dp_rank(series: list[Sample] | None) -> dict[str, float] | None:
    """One value per data-parallel rank. Tensor/pipeline ranks of one DP rank report the same scheduler
    state, so the first series seen for a DP rank stands for all of them."""
    if not series:
        return None
    out: dict[str, float] = {}
    for s in series:
        v = _finite(s.value)
        if v is None:
            return None
        out.setdefault(s.labels.get("dp_rank", ""), v)
    return out


def _sglang_sum(samples: Samples, name: str) -> float | None:
    ranks = _per_dp_rank(samples.get(name))
    return None if ranks is None else sum(ranks.values())


def _sglang(samples: Samples, taken_at_s: float, hints: CapacityHints) -> EngineSnapshot:
    used = _sglang_sum(samples, SGL_USED_TOKENS)
    capacity = _count(_sglang_sum(samples, SGL_MAX_TOKENS)) or None
    usage_by_rank = _per_dp_rank(samples.get(SGL_TOKEN_USAGE))
    usage: float | None = None
    if usage_by_rank is not None:
        usage = sum(usage_by_rank.values()) / len(usage_by_rank)
    if capacity is not None and used is not None:
        usage = used / capacity  # exact over all DP ranks
    if capacity is None and used is not None and usage is not None and usage > 0:
        capacity = _count(used / usage)  # token_usage = used / max_total_num_tokens
    if capacity is None:
        capacity = hints.configured_tokens
    return EngineSnapshot(
        taken_at_s=taken_at_s, engine="sglang",
        running=_count(_sglang_sum(samples, SGL_RUNNING)),
        waiting=_count(_sglang_sum(samples, SGL_QUEUE)),
        kv_usage_fraction=_fraction(usage),
        kv_capacity_tokens=capacity,
        preemptions_total=_count(_sglang_sum(samples, SGL_RETRACTED)),
        prompt_tokens_total=_count(_sum_values(samples.get(SGL_PROMPT_TOKENS))),
        generation_tokens_total=_count(_sum_values(samples.get(SGL_GENERATION_TOKENS))),
        prefix_cache_queries_tokens_total=(_count(_sum_values(samples.get(SGL_PROMPT_TOKENS)))
                                           if samples.get(SGL_CACHED_TOKENS) else None),
        prefix_cache_hits_tokens_total=_count(_sum_values(samples.get(SGL_CACHED_TOKENS))),
    )


ENGINES: dict[str, Adapter] = {
    "vllm": Adapter("vllm", (VLLM_RUNNING, VLLM_WAITING, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD, VLLM_PREEMPTIONS,
                             VLLM_PROMPT_TOKENS, VLLM_GENERATION_TOKENS, VLLM_CACHE_INFO, VLLM_PREFIX_QUERIES,
                             VLLM_PREFIX_HITS, VLLM_PREFIX_QUERIES_OLD, VLLM_PREFIX_HITS_OLD), _vllm),
    "tgi": Adapter("tgi", (TGI_QUEUE, TGI_BATCH_SIZE, TGI_BATCH_MAX_TOKENS, TGI_MAX_TOTAL_TOKENS), _tgi),
    "sglang": Adapter("sglang", (SGL_RUNNING, SGL_QUEUE, SGL_TOKEN_USAGE, SGL_USED_TOKENS, SGL_MAX_TOKENS,
                                 SGL_RETRACTED, SGL_PROMPT_TOKENS, SGL_GENERATION_TOKENS, SGL_CACHED_TOKENS),
                      _sglang),
}


def adapter_for(engine: str) -> Adapter:
    try:
        return ENGINES[engine]
    except KeyError:
        raise ValueError(f"no metrics adapter for engine {engine!r} (known: {', '.join(ENGINES)})") from None


def snapshot_from_metrics(engine: str, text: str, taken_at_s: float, *, configured_capacity_tokens: int | None = None,
                          info_capacity_tokens: int | None = None) -> EngineSnapshot:
    """Parse `text` (a /metrics page) for `engine`. Raises ParseError (malformed where read) or
    MetricsUnavailable (none of the engine's series present)."""
    adapter = adapter_for(engine)
    samples = parse(text, adapter.wanted)
    if not samples:
        raise MetricsUnavailable(f"no {engine} series on the metrics page")
    return adapter.build(samples, taken_at_s, CapacityHints(configured_capacity_tokens, info_capacity_tokens))


def openai_snapshot(taken_at_s: float) -> EngineSnapshot:
    """A server with no metrics: fresh, but every load field unknown (proxy-side accounting only)."""
    return EngineSnapshot(taken_at_s=taken_at_s, engine="openai")
