"""Every proxied request leaves one JSON access-log line and one OpenTelemetry span; per-pool metrics.

In-process proxy (so the SDK's in-memory exporter sees the spans) on a real socket, in front of real
backend processes, driven by the openai client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from backends import Backend, ProxyProcess
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import free_port, stop_process, wait_http

from capbalancer.config import parse_config
from capbalancer.server.access_log import ACCESS_LOGGER
from capbalancer.server.app import build_app, build_state
from capbalancer.server.observe import TRACER

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
FIELDS = {"ts", "request_id", "method", "path", "status", "model", "pool", "backend", "retries", "held_ms",
          "ttft_ms", "duration_ms", "tokens_in", "tokens_out"}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


class InProcessProxy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.state = build_state(parse_config(config))
        self.app = build_app(self.state)
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.app[TRACER].tracer = provider.get_tracer("test")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Lines()

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=20)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[InProcessProxy, Backend, Backend]]:
    with Backend(name="bad", chunks=6, fail_status=503) as bad, Backend(name="good", chunks=6) as good:
        p = InProcessProxy({"server": {"tracing": True}, "models": {
            "m": {"default": True, "backends": [{"url": good.url, "name": "good"}]},
            "rr": {"policy": "round_robin", "backends": [{"url": bad.url, "name": "bad"},
                                                          {"url": good.url, "name": "good2"}]}}})
        logger = logging.getLogger(ACCESS_LOGGER)
        logger.addHandler(p.log)
        logger.setLevel(logging.INFO)
        runner = web.AppRunner(p.app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", p.port).start()
        try:
            yield p, bad, good
        finally:
            logger.removeHandler(p.log)
            await runner.cleanup()


async def test_one_line_and_one_span_per_request(proxy) -> None:
    p, _bad, good = proxy
    c = p.client()
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    done = await c.completions.create(model="m", prompt="hello", max_tokens=6,
                                      extra_headers={"traceparent": traceparent, "x-request-id": "req-1"})
    assert done.choices[0].text
    seen_upstream = good.stats()["last_headers"]["traceparent"]
    stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                             stream_options={"include_usage": True})
    assert [ch async for ch in stream]
    await c.embeddings.create(model="m", input="hello")
    with pytest.raises(openai.NotFoundError):
        await c.completions.create(model="nope", prompt="x", max_tokens=1)
    retried = await c.completions.create(model="rr", prompt="hello", max_tokens=6)  # bad answers 503 first
    assert retried.choices[0].text

    lines, spans = p.log.lines, p.exporter.get_finished_spans()
    assert len(lines) == 5 and len(spans) == 5
    assert all(FIELDS <= set(line) for line in lines)
    first, streamed, emb, missing, retry = lines
    assert first["request_id"] == "req-1" and first["status"] == 200 and first["model"] == "m"
    assert first["pool"] == "m" and first["backend"] == "good" and first["retries"] == 0
    assert first["held_ms"] == 0 and first["tokens_out"] == 6 and first["tokens_in"] >= 1
    assert streamed["path"] == "/v1/chat/completions" and streamed["tokens_out"] == 6
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert emb["path"] == "/v1/embeddings" and emb["status"] == 200
    assert missing["status"] == 404 and missing["backend"] is None and missing["request_id"]
    assert retry["backend"] == "good2" and retry["retries"] == 1 and retry["status"] == 200

    by_id = {s.attributes.get("capbalancer.request_id"): s for s in spans}
    span = by_id["req-1"]
    assert format(span.context.trace_id, "032x") == CALLER_TRACE  # the caller's trace goes on
    assert format(span.parent.span_id, "016x") == CALLER_SPAN
    # ... and the engine is told the proxy's span is its parent
    assert seen_upstream == f"00-{CALLER_TRACE}-{format(span.context.span_id, '016x')}-01"
    assert span.attributes["capbalancer.backend"] == "good" and span.attributes["gen_ai.usage.output_tokens"] == 6
    assert {s.attributes["http.response.status_code"] for s in spans} == {200, 404}
    assert len({s.context.trace_id for s in spans}) == 5  # no traceparent: a trace of its own

    async with aiohttp.ClientSession() as session, session.get(p.url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'capbalancer_tokens_total{backend="good",kind="completion",pool="m"} 12.0' in metrics
    assert 'capbalancer_pool_rejected_total{pool="m"} 0.0' in metrics
    assert 'capbalancer_pool_headroom_ratio{pool="m"}' in metrics
    assert 'capbalancer_pool_held_requests{pool="rr"} 0.0' in metrics
    from capbalancer.server.pool_metrics import EXPORTED_NAMES

    assert all(f"\n{name}" in metrics for name in EXPORTED_NAMES)  # the names the dashboard test trusts


async def test_access_log_switches_off_live(proxy) -> None:
    p, _, _ = proxy
    server = dataclasses.replace(p.state.config.server, access_log=False, tracing=False)
    p.state.config = dataclasses.replace(p.state.config, server=server)  # what a reload does
    await p.client().completions.create(model="m", prompt="hello", max_tokens=2)
    assert p.log.lines == [] and p.exporter.get_finished_spans() == ()


def test_serve_writes_json_lines_to_stdout() -> None:
    with Backend(name="a", chunks=3) as a, ProxyProcess({"models": {"m": {"backends": [{"url": a.url}]}}}) as proxy:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, timeout=20)
        for _ in range(3):
            c.completions.create(model="m", prompt="hello", max_tokens=3)
        deadline = time.monotonic() + 10  # lines are written by a thread of their own, a moment later
        while True:
            lines = [json.loads(ln) for ln in proxy.log().splitlines() if ln.startswith("{")]
            if len(lines) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert len(lines) == 3 and {ln["status"] for ln in lines} == {200} and {ln["tokens_out"] for ln in lines} == {3}


def test_headroom_falls_as_a_pool_fills_and_goes_negative_with_held_requests() -> None:
    """Pure: the scheduler on a virtual clock, one backend whose KV holds about 17 typical requests."""
    from capbalancer.profiling.schema import Profile, StepTimeModel
    from capbalancer.sched.headroom import pool_headroom
    from capbalancer.sched.scheduler import Scheduler
    from capbalancer.sched.types import BackendSpec, Demand, Hold, PoolSettings

    prof = Profile(name="small", gpu="g", model="m", tp=1, engine="vllm", kv_capacity_tokens=10_000,
                   step=StepTimeModel(0.01, 1e-4, 2e-4, 1e-7), max_num_seqs=256, max_num_batched_tokens=2048)
    sched = Scheduler([PoolSettings(name="m", policy="capacity", default_max_tokens=100, hold_timeout_s=60.0)])
    sched.add_backend(BackendSpec(backend_id="small", pool="m", engine="vllm", profile=prof), 0.0)
    idle = pool_headroom(sched, "m", 0.0, typical_prompt_tokens=500)
    assert idle.busy_seats == 0 and idle.requests == idle.seats > 10 and idle.ratio == 1.0
    held = 0
    for i in range(30):
        d = Demand(request_id=f"r{i}", pool="m", prompt_tokens=500, max_tokens=100, arrival_s=0.0)
        held += isinstance(sched.submit(d, 0.0), Hold)
    full = pool_headroom(sched, "m", 0.0, typical_prompt_tokens=500)
    assert held > 0 and full.held == held
    assert full.requests < 0 and full.ratio < 0  # demand the pool cannot start: scale out


def test_a_stdout_nobody_reads_never_stalls_the_proxy() -> None:
    """The access log goes to stdout; here stdout is a pipe never read (64 KiB fills in ~200 lines)."""
    port = free_port()
    with Backend(name="a", chunks=1) as a:
        proc = subprocess.Popen([sys.executable, "-m", "capbalancer.cli", "serve", "--port", str(port),
                                 "--backend", a.url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/ready", 60, None)
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=10)
            for i in range(400):  # each would hang once the pipe is full if a line were written in the loop
                c.completions.create(model="m", prompt="hello", max_tokens=1,
                                     extra_headers={"x-request-id": f"req-{i:04d}-" + "z" * 100})
        finally:
            stop_process(proc)
            if proc.stdout:
                proc.stdout.close()
