"""Probe a live engine and measure its step times: the measuring half of `capbalancer profile`.

The probe plan is light and bounded:
  * prefill: prompts of a few lengths, one at a time (concurrency 1), max_tokens 1; the time to first
    token is one prefill step (plus HTTP overhead, which the fit folds into the fixed cost);
  * decode: B concurrent streams (B bounded by --max-concurrency and by the KV cache) with ignore_eos,
    at two prompt lengths so per-sequence and per-context-token costs separate; the inter-token times
    while all B streams are decoding are B-sequence decode steps.
Prompts are random token ids (distinct first tokens), so prefix caching cannot shorten a prefill.

Engine facts come from the engine itself: KV capacity and cache flags from vLLM's `vllm:cache_config_info`
(num_gpu_blocks x block_size, or kv_cache_size_tokens), TGI's `tgi_batch_max_total_tokens` and /info,
SGLang's /get_server_info; the version from /version or /info; max_model_len from /v1/models.

Times are divided by --time-scale, so a simulated instance slowed down to keep up on a small host
measures as the GPU it models.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from capbalancer.profiling.fit import StepSample

REQUEST_TIMEOUT_S = 120.0


class ProbeError(RuntimeError):
    """The engine did not answer a probe as expected; the message says which and how."""


@dataclass
class EngineInfo:
    model: str | None = None
    kv_capacity_tokens: int | None = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tp: int | None = None
    version: str | None = None
    flags: dict[str, str] = field(default_factory=dict)
    kv_source: str = ""


@dataclass(frozen=True, slots=True)
class ProbePlan:
    prefill_lengths: tuple[int, ...]
    prefill_repeats: int
    decode_batches: tuple[int, ...]
    decode_prompt_lengths: tuple[int, ...]
    decode_tokens: int
    decode_repeats: int = 2

    @property
    def total_requests(self) -> int:
        return (1 + len(self.prefill_lengths) * self.prefill_repeats
                + sum(self.decode_batches) * len(self.decode_prompt_lengths) * self.decode_repeats)


@dataclass
class StreamTiming:
    """When each streamed chunk arrived and how many tokens had arrived by then (an engine that falls
    behind sends several tokens in one chunk, so chunks are not tokens)."""

    sent_s: float
    chunk_times_s: list[float]
    tokens_after_chunk: list[int]
    prompt_tokens: int

    @property
    def first_token_s(self) -> float:
        return self.chunk_times_s[0]


def make_probe_plan(max_concurrency: int, max_model_len: int, kv_capacity_tokens: int | None,
                    decode_tokens: int = 48) -> ProbePlan:
    """Prompt lengths stay within one 2048-token chunk (the smallest vLLM default of max_num_batched_tokens)
    and leave room for the output; decode batches double up to the concurrency the user allows and the KV
    cache holds (with a margin, so the probe itself never preempts)."""
    room = max(16, max_model_len - decode_tokens - 1)
    longest = min(2048, room)
    prefill = tuple(sorted({max(16, longest // 8), max(16, longest // 4), max(16, longest // 2), longest}))
    short, long_ = min(64, room), min(512, room)
    prompts = (short, long_) if long_ > short else (short,)
    batches = []
    b = 1
    while b <= max_concurrency:
        if kv_capacity_tokens is None or b * (long_ + decode_tokens) <= 0.8 * kv_capacity_tokens:
            batches.append(b)
        b *= 4
    if max_concurrency not in batches and max_concurrency > 1 and (
            kv_capacity_tokens is None or max_concurrency * (long_ + decode_tokens) <= 0.8 * kv_capacity_tokens):
        batches.append(max_concurrency)
    batches = sorted(set(batches)) or [1]
    return ProbePlan(prefill_lengths=prefill, prefill_repeats=3, decode_batches=tuple(batches),
                     decode_prompt_lengths=prompts, decode_tokens=decode_tokens)


# ---------------------------------------------------------------------------------------------------------
# Engine facts

_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = dict(_LABEL_RE.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
        return None


async def _get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def read_engine_info(session: aiohttp.ClientSession, url: str, engine: str) -> EngineInfo:
    info = EngineInfo()
    models = await _get_json(session, f"{url}/v1/models")
    if models and models.get("data"):
        card = models["data"][0]
        info.model = card.get("id")
        info.max_model_len = _int(str(card.get("max_model_len"))) if card.get("max_model_len") else None
    metrics = await _get_text(session, f"{url}/metrics") or ""
    samples = parse_prometheus(metrics)
    if engine == "vllm":
        version = await _get_json(session, f"{url}/version")
        info.version = (version or {}).get("version")
        for name, labels, _ in samples:
            if name == "vllm:cache_config_info":
                info.flags.update({k: v for k, v in labels.items() if k != "engine"})
                info.block_size = _int(labels.get("block_size"))
                blocks = _int(labels.get("num_gpu_blocks"))
                tokens = _int(labels.get("kv_cache_size_tokens"))
                if tokens:
                    info.kv_capacity_tokens, info.kv_source = tokens, "vllm:cache_config_info kv_cache_size_tokens"
                elif blocks and info.block_size:
                    info.kv_capacity_tokens = blocks * info.block_size
                    info.kv_source = "vllm:cache_config_info num_gpu_blocks x block_size"
                util = labels.get("gpu_memory_utilization")
                info.gpu_memory_utilization = float(util) if util not in (None, "", "None") else None
                break
    elif engine == "tgi":
        tgi = await _get_json(session, f"{url}/info") or {}
        info.version = tgi.get("version")
        info.model = info.model or tgi.get("model_id")
        info.max_model_len = info.max_model_len or _int(str(tgi.get("max_total_tokens")))
        info.max_num_seqs = _int(str(tgi.get("max_concurrent_requests")))
        for key in ("max_concurrent_requests", "max_input_tokens", "max_total_tokens", "max_best_of",
                    "model_sha", "router", "sha", "docker_label"):
            if tgi.get(key) is not None:
                info.flags[key] = str(tgi[key])
        for name, _, value in samples:
            if name in ("tgi_batch_max_total_tokens", "tgi_batch_total_tokens") and value > 0:
                info.kv_capacity_tokens, info.kv_source = int(value), name
                break
        if info.kv_capacity_tokens is None and tgi.get("max_batch_total_tokens"):
            info.kv_capacity_tokens = _int(str(tgi["max_batch_total_tokens"]))
            info.kv_source = "/info max_batch_total_tokens"
    elif engine == "sglang":
        server = await _get_json(session, f"{url}/get_server_info") or {}
        info.version = server.get("version")
        tokens = _int(str(server.get("max_total_num_tokens")))
        if tokens:
            info.kv_capacity_tokens, info.kv_source = tokens, "/get_server_info max_total_num_tokens"
        info.max_num_seqs = _int(str(server.get("max_running_requests")))
        info.max_num_batched_tokens = _int(str(server.get("chunked_prefill_size")))
        info.tp = _int(str(server.get("tp_size")))
        info.block_size = _int(str(server.get("page_size")))
        mem = server.get("mem_fraction_static")
        info.gpu_memory_utilization = float(mem) if isinstance(mem, (int, float)) else None
        info.max_model_len = info.max_model_len or _int(str(server.get("context_length")))
        for key in ("tp_size", "mem_fraction_static", "max_running_requests", "chunked_prefill_size",
                    "schedule_policy", "kv_cache_dtype", "page_size"):
            if server.get(key) is not None:
                info.flags[key] = str(server[key])
        if info.kv_capacity_tokens is None:
            for name, _, value in samples:
                if name == "sglang:max_total_num_tokens" and value > 0:
                    info.kv_capacity_tokens, info.kv_source = int(value), name
    return info


# ---------------------------------------------------------------------------------------------------------
# Timed requests

def random_prompt(rng: random.Random, tokens: int) -> list[int]:
    # Ids below 1000 exist in every vocabulary; a random first token defeats prefix caching.
    return [rng.randrange(100, 1000) for _ in range(tokens)]


async def timed_stream(session: aiohttp.ClientSession, url: str, engine: str, model: str | None,
                       prompt_tokens: int, max_tokens: int, rng: random.Random) -> StreamTiming:
    if engine == "tgi":
        # TGI takes text: random single letters are about one token each (the stream's details report the
        # true count), and random ones keep TGI 3's prefix cache from shortening the prefill.
        text = "".join(f" {rng.choice('abcdefghijklmnopqrstuvwxyz')}" for _ in range(prompt_tokens))
        body = {"inputs": text, "parameters": {"max_new_tokens": max_tokens, "details": True, "do_sample": False}}
        path = "/generate_stream"
    else:
        # logprobs 0 makes vLLM/SGLang list each chunk's tokens, so coalesced chunks are counted right.
        body = {"prompt": random_prompt(rng, prompt_tokens), "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0.0, "logprobs": 0}
        if model:
            body["model"] = model
        path = "/v1/completions"
    sent = time.perf_counter()
    times: list[float] = []
    counts: list[int] = []
    reported_prompt = prompt_tokens
    async with session.post(f"{url}{path}", json=body) as resp:
        if resp.status != 200:
            raise ProbeError(f"POST {path} answered {resp.status}: {(await resp.text())[:300]}")
        buffer = b""
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    payload = json.loads(data)
                    if "error" in payload:
                        raise ProbeError(f"stream error from {path}: {payload['error']}")
                    if engine == "tgi":
                        if payload.get("token") is not None and not payload["token"].get("special", False):
                            times.append(now)
                            counts.append((counts[-1] if counts else 0) + 1)
                        details = payload.get("details") or {}
                        if details.get("input_length"):
                            reported_prompt = int(details["input_length"])
                    elif payload.get("choices"):
                        n = _chunk_tokens(payload["choices"][0])
                        if n > 0:
                            times.append(now)
                            counts.append((counts[-1] if counts else 0) + n)
    if not times:
        raise ProbeError(f"POST {path} streamed no token")
    return StreamTiming(sent_s=sent, chunk_times_s=times, tokens_after_chunk=counts, prompt_tokens=reported_prompt)


def _chunk_tokens(choice: dict) -> int:
    """Tokens in one OpenAI completion chunk: its logprobs' token list when the engine sent one; else one
    for a chunk with text (a server without logprobs), none for a bare finish/usage chunk."""
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


async def probe_prefill(session: aiohttp.ClientSession, url: str, engine: str, model: str | None,
                        plan: ProbePlan, rng: random.Random, time_scale: float,
                        progress: Callable[[str], None]) -> list[StepSample]:
    samples = []
    for length in plan.prefill_lengths:
        ttfts = []
        for _ in range(plan.prefill_repeats):
            timing = await timed_stream(session, url, engine, model, length, 1, rng)
            ttfts.append((timing.first_token_s - timing.sent_s) / time_scale)
            prompt = timing.prompt_tokens
        # Delays only ever add (a busy client or server), so the fastest repeat is the best estimate.
        ttft = min(ttfts)
        samples.append(StepSample(prefill_tokens=prompt, decode_seqs=0, context_tokens=0, seconds=ttft,
                                  kind="prefill"))
        progress(f"prefill {prompt:>5} tokens: TTFT {ttft * 1e3:8.2f} ms (best of {len(ttfts)})")
    return samples


def robust_slope(times_s: list[float], tokens: list[int]) -> float | None:
    """Seconds per token through (tokens, time) points: the median of pairwise slopes (Theil-Sen).

    A client or server that is briefly descheduled delivers some tokens late; a few late points move a
    least-squares line or an endpoint-to-endpoint slope, but not the median of all pairwise slopes."""
    slopes = []
    for i in range(len(times_s)):
        for j in range(i + 1, len(times_s)):
            dn = tokens[j] - tokens[i]
            if dn > 0:
                slopes.append((times_s[j] - times_s[i]) / dn)
    return statistics.median(slopes) if slopes else None


def steady_decode_sample(streams: list[StreamTiming], time_scale: float) -> StepSample | None:
    """The decode step time while every stream is decoding (after the last first token, before the first
    stream ends), and the batch's mean context over that window: per stream the robust slope of its token
    arrival times over the window, then the median over the streams."""
    start = max(s.first_token_s for s in streams)
    end = min(s.chunk_times_s[-1] for s in streams)
    slopes: list[float] = []
    contexts: list[float] = []
    for s in streams:
        inside = [k for k, t in enumerate(s.chunk_times_s) if start <= t <= end]
        if len(inside) < 3:
            continue
        first, last = inside[0], inside[-1]
        if s.tokens_after_chunk[last] - s.tokens_after_chunk[first] < 2:
            continue
        slope = robust_slope([s.chunk_times_s[k] for k in inside], [s.tokens_after_chunk[k] for k in inside])
        if slope is None or slope <= 0:
            # Tokens that arrived in one burst (a starved API server or client on a busy host) carry no
            # timing: a zero slope is not a zero-cost step.
            continue
        slopes.append(slope)
        contexts.append(s.prompt_tokens + (s.tokens_after_chunk[first] + s.tokens_after_chunk[last]) / 2)
    if len(slopes) < max(1, len(streams) // 2):
        return None
    batch = len(streams)
    return StepSample(prefill_tokens=0, decode_seqs=batch, context_tokens=batch * statistics.fmean(contexts),
                      seconds=statistics.median(slopes) / time_scale, kind="decode")


async def probe_decode(session: aiohttp.ClientSession, url: str, engine: str, model: str | None,
                       plan: ProbePlan, rng: random.Random, time_scale: float,
                       progress: Callable[[str], None]) -> list[StepSample]:
    samples = []
    for prompt in plan.decode_prompt_lengths:
        for batch in plan.decode_batches:
            # Interference (other traffic, a busy host) only ever slows a step: keep the fastest repeat.
            sample = None
            for _ in range(plan.decode_repeats):
                streams = await asyncio.gather(*(timed_stream(session, url, engine, model, prompt,
                                                              plan.decode_tokens, rng) for _ in range(batch)))
                got = steady_decode_sample(list(streams), time_scale)
                if got is not None and (sample is None or got.seconds < sample.seconds):
                    sample = got
            if sample is None:
                progress(f"decode batch {batch:>4} x {prompt} prompt: no steady window (streams too short)")
                continue
            samples.append(sample)
            progress(f"decode batch {batch:>4} x {prompt:>5} prompt: step {sample.seconds * 1e3:8.2f} ms, "
                     f"context {sample.context_tokens:,.0f} tokens")
    return samples


@dataclass
class ProbeResult:
    info: EngineInfo
    plan: ProbePlan
    samples: list[StepSample]
    elapsed_s: float


async def run_probes(url: str, engine: str, max_concurrency: int, time_scale: float = 1.0,
                     max_model_len: int | None = None, seed: int | None = None, decode_tokens: int = 48,
                     progress: Callable[[str], None] = lambda _: None) -> ProbeResult:
    started = time.perf_counter()
    # A fresh seed per run by default: a second profile of the same instance must not find the first run's
    # prompts in its prefix cache (measured on a real H100: cached 2048-token prefills "took" 15 ms, not 56).
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    url = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S * max(1.0, time_scale))
    connector = aiohttp.TCPConnector(limit=max_concurrency + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        info = await read_engine_info(session, url, engine)
        model_len = max_model_len or info.max_model_len or 4096
        plan = make_probe_plan(max_concurrency, model_len, info.kv_capacity_tokens, decode_tokens)
        progress(f"engine {engine} {info.version or '(version unknown)'} model {info.model or '?'}: "
                 f"KV {info.kv_capacity_tokens or '?'} tokens; probe plan: {plan.total_requests} requests")
        await timed_stream(session, url, engine, info.model, 16, 2, rng)  # warm-up (first-request costs)
        samples = await probe_prefill(session, url, engine, info.model, plan, rng, time_scale, progress)
        samples += await probe_decode(session, url, engine, info.model, plan, rng, time_scale, progress)
    return ProbeResult(info=info, plan=plan, samples=samples, elapsed_s=time.perf_counter() - started)
