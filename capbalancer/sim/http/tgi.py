"""The TGI flavour: /generate, /generate_stream, /info, /health, /metrics, and 429 past
`max_concurrent_requests`, as text-generation-inference 3.x's router serves them.

Sources (huggingface/text-generation-inference): router/src/server.rs (routes, SSE frames, the
`{"error": "Model is overloaded", "error_type": "overloaded"}` 429, validation 422s), router/src/lib.rs
(`StreamResponse`, `Details`, `Info` shapes), docs/source/reference/metrics.md and
backends/v3/src/backend.rs (`tgi_batch_max_total_tokens`). TGI's counters carry no `_total` suffix.
Its OpenAI-compatible Messages API (/v1/chat/completions) is served with the vLLM shapes.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from capbalancer.sim import tokenizer
from capbalancer.sim.engine import RequestTooLong
from capbalancer.sim.http.instance import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    SimInstance,
)
from capbalancer.sim.http.metrics import Exposition, Histogram
from capbalancer.sim.http.openai_api import OpenAIRoutes, count_text_tokens, token_text, tokens_text

TGI_VERSION = "3.3.6"
DEFAULT_MAX_CONCURRENT_REQUESTS = 128
_TOKEN_ID_BASE = 1000


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


class TgiState:
    def __init__(self, inst: SimInstance, max_concurrent_requests: int) -> None:
        self.inst = inst
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0
        self.request_count = 0
        self.success = 0
        self.failures: dict[str, int] = {}
        self.duration = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue_duration = Histogram(REQUEST_LATENCY_BUCKETS)
        self.mean_time_per_token = Histogram(ITL_BUCKETS)
        self.generated_tokens = Histogram(TOKEN_COUNT_BUCKETS)
        self.input_length = Histogram(TOKEN_COUNT_BUCKETS)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


def render_tgi_metrics(state: TgiState) -> str:
    inst = state.inst
    eng = inst.engine
    x = Exposition()
    x.metric("tgi_request_count", "counter", "Total number of requests", state.request_count)
    x.metric("tgi_request_success", "counter", "Number of successful requests", state.success)
    x.header("tgi_request_failure", "counter", "Number of failed requests")
    for kind, count in sorted(state.failures.items()):
        x.sample("tgi_request_failure", count, {"err": kind})
    x.metric("tgi_queue_size", "gauge", "Current queue size", len(eng.waiting))
    x.metric("tgi_batch_current_size", "gauge", "Current batch size", len(eng.running))
    # The batch's token budget: what its requests may still grow to (inputs + max_new_tokens).
    batch_max_tokens = sum(r.prompt_tokens + r.max_tokens for r in eng.running.values())
    x.metric("tgi_batch_current_max_tokens", "gauge", "Maximum tokens for the current batch", batch_max_tokens)
    x.metric("tgi_batch_max_total_tokens", "gauge", "Maximum amount of tokens in the batch",
             eng.config.kv_capacity_tokens)
    x.histogram("tgi_request_duration", "Request duration", state.duration)
    x.histogram("tgi_request_queue_duration", "Time spent in the queue per request", state.queue_duration)
    x.histogram("tgi_request_mean_time_per_token_duration", "Mean time per token per request",
                state.mean_time_per_token)
    x.histogram("tgi_request_generated_tokens", "Generated tokens per request", state.generated_tokens)
    x.histogram("tgi_request_input_length", "Input token length per request", state.input_length)
    return x.render()


def build_tgi_app(inst: SimInstance, max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    state = TgiState(inst, max_concurrent_requests)
    OpenAIRoutes(inst, owned_by="tgi").add_to(app)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def info(request: web.Request) -> web.Response:
        eng = inst.engine
        return _json({
            "model_id": inst.model, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": state.max_concurrent_requests, "max_best_of": 2, "max_stop_sequences": 4,
            "max_input_tokens": eng.max_model_len - 1, "max_total_tokens": eng.max_model_len,
            "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
            "version": TGI_VERSION, "sha": None, "docker_label": None,
            "model_device_type": "cuda", "model_dtype": "torch.float16",
            "max_batch_total_tokens": eng.config.kv_capacity_tokens, "max_waiting_tokens": 20,
            "max_batch_size": None, "waiting_served_ratio": 0.3})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render_tgi_metrics(state), content_type="text/plain", charset="utf-8")

    def parse(body: Any) -> tuple[int, int, dict[str, Any]] | web.Response:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            state.fail("validation")
            return _json({"error": "Input validation error: `inputs` must be a string", "error_type": "validation"},
                         422)
        params = body.get("parameters") or {}
        prompt_tokens = count_text_tokens(body["inputs"])
        max_new = params.get("max_new_tokens")
        if max_new is None:
            max_new = max(1, inst.engine.max_model_len - prompt_tokens)
        if not isinstance(max_new, int) or max_new < 1:
            state.fail("validation")
            return _json({"error": "Input validation error: `max_new_tokens` must be strictly positive",
                          "error_type": "validation"}, 422)
        try:
            inst.check_fits(prompt_tokens, max_new)
        except RequestTooLong:
            state.fail("validation")
            return _json({"error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                                   f"{inst.engine.max_model_len}. Given: {prompt_tokens} `inputs` tokens and "
                                   f"{max_new} `max_new_tokens`", "error_type": "validation"}, 422)
        return prompt_tokens, max_new, params

    async def generate(request: web.Request, stream_mode: bool) -> web.StreamResponse:
        state.request_count += 1
        if state.in_flight >= state.max_concurrent_requests:
            state.fail("overloaded")
            return _json({"error": "Model is overloaded", "error_type": "overloaded"}, 429)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            state.fail("validation")
            return _json({"error": "Failed to parse the request body as JSON", "error_type": "validation"}, 422)
        parsed = parse(body)
        if isinstance(parsed, web.Response):
            return parsed
        prompt_tokens, max_new, params = parsed
        seed = params.get("seed")
        # TGI has no ignore_eos; the simulator honours it as an extension so benchmarks can fix lengths.
        # TGI 3 caches prefixes (on by default with its flashinfer/flashdecoding attention) but exports no
        # prefix-cache series: the cache runs, /metrics says nothing of it.
        stream = inst.submit(prompt_tokens, max_new, ignore_eos=bool(params.get("ignore_eos", False)),
                             seed=seed if isinstance(seed, int) else None,
                             token_ids=tokenizer.encode(body["inputs"]) or None)
        state.in_flight += 1
        started = time.monotonic()
        first_token_at: float | None = None
        finished = False
        resp: web.StreamResponse | None = None
        try:
            if stream_mode:
                resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                await resp.prepare(request)
            sent = 0
            while not finished:
                # A step's tokens and its finish are queued together: drain them so the last token's
                # frame is the one that carries generated_text and details, as TGI's is.
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                finished = None in items
                upto = stream.generated if finished else max(items)
                if first_token_at is None and upto > 0:
                    first_token_at = time.monotonic()
                if resp is not None:
                    for i in range(sent, upto):
                        last = finished and i == upto - 1
                        frame = {"index": i + 1,
                                 "token": {"id": _TOKEN_ID_BASE + i % 24, "text": token_text(i), "logprob": -0.5,
                                           "special": False},
                                 "generated_text": tokens_text(0, upto) if last else None,
                                 "details": {"finish_reason": _finish(stream.finish_reason),
                                             "generated_tokens": upto, "seed": seed,
                                             "input_length": prompt_tokens} if last else None,
                                 "top_tokens": None}
                        await resp.write(b"data:" + orjson.dumps(frame) + b"\n\n")
                sent = upto
        finally:
            state.in_flight -= 1
            if not finished:
                inst.abort(stream.request_id)
                state.fail("aborted")
        ended = time.monotonic()
        state.success += 1
        state.duration.observe(ended - started)
        state.input_length.observe(prompt_tokens)
        state.generated_tokens.observe(stream.generated)
        if first_token_at is not None:
            state.queue_duration.observe(max(0.0, first_token_at - started))
            if stream.generated > 1:
                state.mean_time_per_token.observe((ended - first_token_at) / (stream.generated - 1))
        if resp is not None:
            await resp.write_eof()
            return resp
        out: dict[str, Any] = {"generated_text": tokens_text(0, stream.generated)}
        if params.get("details"):
            out["details"] = {"finish_reason": _finish(stream.finish_reason), "generated_tokens": stream.generated,
                              "seed": seed, "prefill": [], "tokens": [
                                  {"id": _TOKEN_ID_BASE + i % 24, "text": token_text(i), "logprob": -0.5,
                                   "special": False} for i in range(stream.generated)]}
        return _json(out)

    async def generate_plain(request: web.Request) -> web.StreamResponse:
        return await generate(request, stream_mode=False)

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        return await generate(request, stream_mode=True)

    async def compat(request: web.Request) -> web.StreamResponse:
        # TGI's `/` (compat_generate in router/src/server.rs) takes the same body, streams when
        # `"stream": true`, and otherwise wraps the answer in a one-element list, as the HF Inference API
        # does (huggingface_hub.InferenceClient reads it that way).
        try:
            wants_stream = bool(orjson.loads(await request.read()).get("stream"))
        except (orjson.JSONDecodeError, AttributeError):
            wants_stream = False
        resp = await generate(request, stream_mode=wants_stream)
        if wants_stream or not isinstance(resp, web.Response) or resp.status != 200 or resp.body is None:
            return resp
        return web.Response(status=200, body=b"[" + bytes(resp.body) + b"]", content_type="application/json")

    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/generate", generate_plain)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat)
    return app


def _finish(reason: str | None) -> str:
    return {"length": "length", "stop": "eos_token"}.get(reason or "", "length")
