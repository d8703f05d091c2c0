"""The SGLang flavour: OpenAI routes, /health, /get_model_info, /get_load and SGLang's /metrics.

Series names follow SGLang's collector (python/sglang/srt/metrics/collector.py, `SchedulerMetricsCollector`
and `TokenizerMetricsCollector`): `sglang:num_running_reqs`, `sglang:num_queue_reqs`,
`sglang:num_used_tokens`, `sglang:token_usage` (used / max_total_num_tokens), `sglang:gen_throughput`,
`sglang:cache_hit_rate`, `sglang:max_total_num_tokens`, token counters and latency histograms, labelled
by `model_name` plus the rank labels the collector adds.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from capbalancer.sim.http.engine_routes import EngineRoutes
from capbalancer.sim.http.instance import SimInstance
from capbalancer.sim.http.metrics import Exposition
from capbalancer.sim.http.openai_api import (
    OpenAIRoutes,
    bad_request,
    count_text_tokens,
    read_json,
    tokens_text,
)

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SamplingParams.max_new_tokens in sglang/srt/sampling/sampling_params.py


class _HitRate:
    """SGLang's `cache_hit_rate` is the hit rate of its recent prefill batches: here, cached over queried prompt
    tokens since the previous scrape (kept when nothing was queried since)."""

    def __init__(self) -> None:
        self.last = (0, 0)
        self.value = 0.0

    def update(self, queries: int, hits: int) -> float:
        dq, dh = queries - self.last[0], hits - self.last[1]
        if dq > 0:
            self.value = dh / dq
        self.last = (queries, hits)
        return self.value


class _Throughput:
    """Generation tokens/s since the previous scrape (SGLang logs it per interval)."""

    def __init__(self) -> None:
        self.last_tokens = 0
        self.last_real_s: float | None = None
        self.value = 0.0

    def update(self, tokens: int, real_s: float) -> float:
        if self.last_real_s is not None and real_s > self.last_real_s:
            self.value = (tokens - self.last_tokens) / (real_s - self.last_real_s)
        self.last_tokens, self.last_real_s = tokens, real_s
        return self.value


def render_sglang_metrics(inst: SimInstance, throughput: _Throughput, hit_rate: _HitRate | None = None) -> str:
    eng = inst.engine
    m = inst.metrics
    labels = {"model_name": inst.model, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
    capacity = eng.config.kv_capacity_tokens
    used = eng.used_blocks * eng.block_size
    x = Exposition()
    x.metric("sglang:num_running_reqs", "gauge", "The number of running requests.", len(eng.running), labels)
    x.metric("sglang:num_used_tokens", "gauge", "The number of used tokens.", min(used, capacity), labels)
    x.metric("sglang:token_usage", "gauge", "The token usage.", min(1.0, used / capacity) if capacity else 0.0,
             labels)
    x.metric("sglang:max_total_num_tokens", "gauge", "Maximum total number of tokens in the KV cache pool.",
             capacity, labels)
    x.metric("sglang:gen_throughput", "gauge", "The generation throughput (token/s).",
             throughput.update(eng.generation_tokens_total, inst.real_now()), labels)
    x.metric("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.",
             len(eng.waiting), labels)
    cache = eng.prefix_cache
    queries, hits = (cache.queries_tokens_total, cache.hits_tokens_total) if cache else (0, 0)
    x.metric("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.",
             (hit_rate or _HitRate()).update(queries, hits), labels)
    x.metric("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             eng.prompt_tokens_total, labels)
    x.metric("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.",
             eng.generation_tokens_total, labels)
    x.metric("sglang:cached_tokens_total", "counter", "Number of cached prompt tokens.",
             eng.prompt_tokens_cached_total, labels)
    x.metric("sglang:num_requests_total", "counter", "Number of requests processed.",
             sum(m.success_by_reason.values()) + m.requests_failed, labels)
    x.metric("sglang:num_retracted_requests_total", "counter", "Total number of retracted requests.",
             eng.preemptions_total, labels)
    x.histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m.ttft,
                labels)
    x.histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m.itl, labels)
    x.histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                m.e2e, labels)
    return x.render()


def build_sglang_app(inst: SimInstance) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    api = OpenAIRoutes(inst, owned_by="sglang")
    api.add_to(app)
    EngineRoutes(api).add_to(app)
    throughput = _Throughput()
    hit_rate = _HitRate()

    async def generate(request: web.Request) -> web.StreamResponse:
        # SGLang's native API: {"text" | "input_ids", "sampling_params": {...}, "stream"}; the answer is
        # {"text", "meta_info"}, streamed as SSE frames of the text so far, ended by [DONE].
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        text, ids = body.get("text"), body.get("input_ids")
        if isinstance(text, str):
            prompt_tokens = count_text_tokens(text)
        elif isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
            prompt_tokens = len(ids)
        else:
            return bad_request("text (a string) or input_ids (token ids) is required", "text")
        params = body.get("sampling_params") or {}
        max_new = params.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)
        stream = api._submit({"max_tokens": max_new, "ignore_eos": bool(params.get("ignore_eos"))}, prompt_tokens,
                             SGLANG_DEFAULT_MAX_NEW_TOKENS)
        if isinstance(stream, web.Response):
            return stream
        rid = uuid.uuid4().hex
        started = time.monotonic()

        def frame(upto: int, finished: bool) -> dict[str, Any]:
            reason = ({"type": "length", "length": upto} if stream.finish_reason == "length"
                      else {"type": "stop", "matched": 2}) if finished else None
            return {"text": tokens_text(0, upto), "output_ids": [1000 + i % 24 for i in range(upto)],
                    "meta_info": {"id": rid, "finish_reason": reason, "prompt_tokens": prompt_tokens,
                                  "completion_tokens": upto, "cached_tokens": 0,
                                  "e2e_latency": time.monotonic() - started}}

        if not body.get("stream"):
            await api._await_finish(stream)
            return web.Response(body=orjson.dumps(frame(stream.generated, True)), content_type="application/json")
        return await api._run_stream(
            request, stream, lambda _text, reason: b"data: " + orjson.dumps(
                frame(stream.generated, reason is not None)) + b"\n\n", None, None)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def model_info(request: web.Request) -> web.Response:
        return web.json_response({"model_path": inst.model, "tokenizer_path": inst.model, "is_generation": True})

    async def encode(request: web.Request) -> web.Response:
        # SGLang's native embedding route: {"text"} -> {"embedding", "meta_info"}; a prefill and one step.
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        text = body.get("text")
        if not isinstance(text, str):
            return bad_request("text (a string) is required", "text")
        prompt_tokens = count_text_tokens(text)
        stream = api._submit({"max_tokens": 1, "ignore_eos": True}, prompt_tokens, 1)
        if isinstance(stream, web.Response):
            return stream
        await api._await_finish(stream)
        return web.json_response({"embedding": [0.0] * 8, "meta_info": {
            "id": uuid.uuid4().hex, "prompt_tokens": prompt_tokens, "cached_tokens": 0}})

    async def get_load(request: web.Request) -> web.Response:
        eng = inst.engine
        return web.json_response([{"dp_rank": 0, "num_reqs": len(eng.running) + len(eng.waiting),
                                   "num_waiting_reqs": len(eng.waiting),
                                   "num_tokens": eng.used_blocks * eng.block_size}])

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render_sglang_metrics(inst, throughput, hit_rate), content_type="text/plain",
                            charset="utf-8")

    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/get_load", get_load)
    app.router.add_post("/generate", generate)
    app.router.add_post("/encode", encode)
    app.router.add_get("/metrics", metrics)
    return app
