"""The vLLM flavour: OpenAI routes, /health, /version, /load and vLLM 0.3x's /metrics.

Series names, types and the `{engine="0",model_name=...}` label shape follow vLLM's v1 Prometheus logger
(vllm/v1/metrics/loggers.py, `PrometheusStatLogger`) as a vLLM 0.32 server exposes them (see
../shared/REAL_VLLM.md): the KV gauge is `vllm:kv_cache_usage_perc` (a 0-1 fraction), cache geometry is
the `vllm:cache_config_info` info-gauge, latency histograms use the logger's bucket bounds; label order,
HELP/TYPE lines and histogram layout match a captured real vLLM 0.32 (tests/data/real/vllm-cpu-metrics*.txt).
"""

from __future__ import annotations

from aiohttp import web

from capbalancer.sim.http.engine_routes import EngineRoutes
from capbalancer.sim.http.instance import SimInstance
from capbalancer.sim.http.metrics import Exposition
from capbalancer.sim.http.openai_api import OpenAIRoutes
from capbalancer.sim.http.render import add_render_routes

VLLM_VERSION = "0.32.0"


def render_vllm_metrics(inst: SimInstance) -> str:
    eng = inst.engine
    m = inst.metrics
    labels = {"engine": "0", "model_name": inst.model}
    x = Exposition()
    x.metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
             len(eng.running), labels)
    x.metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
             len(eng.waiting), labels)
    x.header("vllm:num_requests_waiting_by_reason", "gauge",
             "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
             "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all "
             "reasons equals vllm:num_requests_waiting.")
    x.sample("vllm:num_requests_waiting_by_reason", len(eng.waiting), {**labels, "reason": "capacity"})
    x.sample("vllm:num_requests_waiting_by_reason", 0, {**labels, "reason": "deferred"})
    x.metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
             eng.kv_usage_fraction(), labels)
    cache = eng.prefix_cache
    # Counted when a request is scheduled (re-counted after a preemption), in tokens; 0 with caching off.
    x.metric("vllm:prefix_cache_queries_total", "counter",
             "Prefix cache queries, in terms of number of queried tokens.",
             cache.queries_tokens_total if cache else 0, labels)
    x.metric("vllm:prefix_cache_hits_total", "counter",
             "Prefix cache hits, in terms of number of cached tokens.", cache.hits_tokens_total if cache else 0,
             labels)
    x.metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
             eng.preemptions_total, labels)
    x.metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             eng.prompt_tokens_total, labels)
    x.metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
             eng.generation_tokens_total, labels)
    # Of prompt_tokens_total (counted once per request, when its prefill completes): computed vs found cached.
    cached = eng.prompt_tokens_cached_total
    x.header("vllm:prompt_tokens_by_source_total", "counter", "Number of prompt tokens by source.")
    for source, value in (("external_kv_transfer", 0), ("local_cache_hit", cached),
                          ("local_compute", eng.prompt_tokens_total - cached)):
        x.sample("vllm:prompt_tokens_by_source_total", value, {**labels, "source": source})
    x.metric("vllm:prompt_tokens_cached_total", "counter", "Number of cached prompt tokens (local + external).",
             cached, labels)
    x.header("vllm:prompt_tokens_cached_by_source_total", "counter",
             "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to "
             "DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at "
             "admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.")
    for source in ("device", "disk", "external_unspecified", "host", "p2p"):
        x.sample("vllm:prompt_tokens_cached_by_source_total", cached if source == "device" else 0,
                 {**labels, "source": source})
    x.header("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in ("stop", "length", "abort", "error"):
        count = m.requests_failed if reason == "abort" else m.success_by_reason.get(reason, 0)
        x.sample("vllm:request_success_total", count, {**labels, "finished_reason": reason})
    x.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens, labels)
    x.histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                m.generation_tokens, labels)
    x.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m.ttft, labels)
    x.histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m.itl, labels)
    x.histogram("vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.", m.time_per_output_token, labels)
    x.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m.e2e, labels)
    x.histogram("vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.", m.queue_time, labels)
    x.histogram("vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.", m.inference_time, labels)
    x.histogram("vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.", m.prefill_time, labels)
    x.histogram("vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.", m.decode_time, labels)
    cfg = eng.config
    info = {
        "block_size": str(cfg.block_size), "cache_dtype": "auto", "enable_prefix_caching": str(cache is not None),
        "engine": "0",
        "gpu_memory_utilization": str(cfg.gpu_memory_utilization), "kv_cache_size_tokens": str(cfg.kv_capacity_tokens),
        "kv_cache_max_concurrency": f"{cfg.kv_capacity_tokens / max(1, eng.max_model_len):.1f}",
        "num_cpu_blocks": "None", "num_gpu_blocks": str(cfg.num_gpu_blocks), "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256", "sliding_window": "None",
    }
    x.metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", 1.0, info)
    return x.render()


def build_vllm_app(inst: SimInstance, with_metrics: bool = True) -> web.Application:
    """vLLM's routes; without metrics (and /load, /version) it stands for a plain OpenAI-compatible server."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    api = OpenAIRoutes(inst, owned_by="vllm" if with_metrics else "openai")
    api.add_to(app)
    EngineRoutes(api).add_to(app)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": inst.profile.engine_version or VLLM_VERSION})

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"server_load": inst.in_flight})

    async def metrics(request: web.Request) -> web.Response:
        # The step loop keeps the engine's state current; a scrape only reads it.
        return web.Response(text=render_vllm_metrics(inst), content_type="text/plain", charset="utf-8")

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        # vLLM serves it with VLLM_SERVER_DEV_MODE=1: drop every cached free block (refused while in use).
        cache = inst.engine.prefix_cache
        if cache is not None and not cache.reset():
            return web.json_response({"error": {"message": "Failed to reset prefix cache: blocks in use",
                                                "type": "InternalServerError", "param": None, "code": 500}},
                                     status=500)
        return web.Response(status=200)

    app.router.add_get("/health", health)
    if with_metrics:
        add_render_routes(app, api)  # vLLM's own routes (a plain OpenAI server has none)
        app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
        app.router.add_get("/ping", health)
        app.router.add_get("/version", version)
        app.router.add_get("/load", load)
        app.router.add_get("/metrics", metrics)
    return app
