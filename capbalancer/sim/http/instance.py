"""One simulated instance on real time: an EngineModel stepped by a background task, with token streams.

The engine runs on modelled time; real time = modelled time x `time_scale` (5 = five times slower than
the modelled GPU). Everything the instance reports in seconds (latency histograms) is in real seconds,
i.e. scaled, so that what clients and the proxy measure and what /metrics says agree: a sim instance at
time_scale X looks exactly like a GPU X times slower than its profile.

Instances sharing a GPU (`gpu=SharedGpu`, fleet `gpu_group`) run on one clock: the group's first instance to
start sets the time origin of all, and they must have one time scale. A sibling's change of step time wakes
this instance's step loop, whose next step end it moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass, field

from capbalancer.background import stop_task
from capbalancer.profiling.schema import Profile
from capbalancer.sim import tokenizer
from capbalancer.sim.engine import (
    EngineConfig,
    EngineEvent,
    EngineModel,
    Finished,
    FirstToken,
    SimRequest,
    Token,
    output_length,
)
from capbalancer.sim.gpu_share import SharedGpu
from capbalancer.sim.http.metrics import Histogram

# Bucket bounds as vLLM's v1 Prometheus logger sets them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# The generated words' token ids (one token per word), cached with the prompt when a request ends.
_WORD_IDS = tuple(tokenizer.encode(w)[0] for w in tokenizer.WORDS)


@dataclass(slots=True)
class RequestStream:
    """What a handler reads: token counts as they are produced, then the finish."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_real_s: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    finish_reason: str | None = None
    last_token_real_s: float | None = None
    scheduled_real_s: float | None = None
    first_token_real_s: float | None = None


@dataclass(slots=True)
class InstanceMetrics:
    """Latency histograms and request counters, in real (scaled) seconds."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    decode_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    success_by_reason: dict[str, int] = field(default_factory=dict)
    requests_received: int = 0
    requests_failed: int = 0


class SimInstance:
    def __init__(self, profile: Profile, *, engine_kind: str = "vllm", model: str = "sim",
                 time_scale: float = 1.0, seed: int = 0, eos_mean_tokens: float = 200.0,
                 max_concurrent_requests: int | None = None, gpu: SharedGpu | None = None,
                 enable_prefix_caching: bool = True, interference: float = 1.0,
                 lora_modules: dict[str, str] | None = None, frontend_seconds: float | None = None,
                 frontend_seconds_per_prompt_token: float | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.profile = profile
        self.engine_kind = engine_kind
        self.model = model
        self.time_scale = time_scale
        self.eos_mean_tokens = eos_mean_tokens
        self.max_concurrent_requests = max_concurrent_requests  # TGI's router limit (None: its default)
        # LoRA adapters served besides the base model (name -> path), as vLLM's --lora-modules; /v1/models
        # lists them with the base model as `parent`, and load/unload change them at run time.
        self.adapters: dict[str, str] = dict(lora_modules or {})
        # The API server's time before the engine sees a request (None: the profile's figure): host CPU, not GPU,
        # so it is not scaled by time_scale.
        self.frontend_seconds = profile.frontend_seconds if frontend_seconds is None else frontend_seconds
        self.frontend_seconds_per_prompt_token = (profile.frontend_seconds_per_prompt_token
                                                  if frontend_seconds_per_prompt_token is None
                                                  else frontend_seconds_per_prompt_token)
        if self.frontend_seconds < 0 or self.frontend_seconds_per_prompt_token < 0:
            raise ValueError("front-end latency must be >= 0")
        self.engine = EngineModel(EngineConfig.from_profile(profile, engine_kind,
                                                            enable_prefix_caching=enable_prefix_caching),
                                  per_token_events=True)
        self.metrics = InstanceMetrics()
        self._seed = seed
        self._counter = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._t0: float | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.gpu = gpu
        if gpu is not None:
            self.engine.share_gpu(gpu, self._sibling_moved, interference)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        if self.gpu is not None:
            if self.gpu.origin_s is None:
                self.gpu.origin_s = self._t0
            self._t0 = self.gpu.origin_s
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._step_loop(), name=f"sim-steps-{self.model}")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    # --- clocks --------------------------------------------------------------------------------
    def real_now(self) -> float:
        return asyncio.get_running_loop().time()

    def model_now(self) -> float:
        assert self._t0 is not None, "instance not started"
        return (self.real_now() - self._t0) / self.time_scale

    def to_real(self, model_s: float) -> float:
        assert self._t0 is not None
        return self._t0 + model_s * self.time_scale

    # --- requests ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def front_end(self, prompt_tokens: int) -> None:
        """Wait what the real API server spends on a request before its engine queues it: clients see it in
        their TTFT, the engine's own histograms (queue, prefill, TTFT from arrival at the engine) do not."""
        delay_s = self.frontend_seconds + self.frontend_seconds_per_prompt_token * prompt_tokens
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        self.engine.check_fits(prompt_tokens, max_tokens)

    def submit(self, prompt_tokens: int, max_tokens: int, *, ignore_eos: bool = False,
               seed: int | None = None, token_ids: list[int] | None = None) -> RequestStream:
        """Queue a request now; raises RequestTooLong (vLLM's 400) when it does not fit. With `token_ids` the
        prompt can hit the engine's prefix cache, and the answer's tokens are cached after it."""
        n = next(self._counter)
        request_id = uuid.uuid4().hex
        draw_seed = seed if seed is not None else (self._seed << 32) + n
        target = output_length(max_tokens, ignore_eos, draw_seed, self.eos_mean_tokens)
        now = self.model_now()
        stream = RequestStream(request_id, prompt_tokens, max_tokens, arrival_real_s=self.real_now())
        output_ids = None
        if token_ids is not None and self.engine.prefix_cache is not None:
            output_ids = [_WORD_IDS[i % len(_WORD_IDS)] for i in range(target)]
        events = self.engine.add_request(SimRequest(request_id, prompt_tokens, target, max_tokens, now,
                                                    token_ids=token_ids, output_ids=output_ids), now)
        self._streams[request_id] = stream
        self.metrics.requests_received += 1
        self._dispatch(events)
        assert self._wake is not None
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """The client went away before the end: free its place in the engine."""
        if self._streams.pop(request_id, None) is None:
            return
        self.metrics.requests_failed += 1
        self._dispatch(self.engine.abort(request_id, self.model_now()))
        assert self._wake is not None
        self._wake.set()

    def _sibling_moved(self, _now: float) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the step loop ---------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        assert self._wake is not None
        while True:
            now = self.model_now()
            self._dispatch(self.engine.advance_to(now))
            nxt = self.engine.next_event_s()
            if nxt is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = (nxt - now) * self.time_scale
            if delay > 0:
                # Wake early if a request arrives: nothing changes for the step in flight, but an idle
                # engine's clock and the new request's plan must be taken at arrival.
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    def _dispatch(self, events: list[EngineEvent]) -> None:
        metrics = self.metrics
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is None:
                continue
            t_real = self.to_real(ev.time_s)
            if isinstance(ev, Token):
                if stream.last_token_real_s is not None:
                    metrics.itl.observe(t_real - stream.last_token_real_s)
                stream.last_token_real_s = t_real
                stream.generated = ev.generated
                stream.queue.put_nowait(ev.generated)
            elif isinstance(ev, FirstToken):
                stream.first_token_real_s = t_real
                stream.scheduled_real_s = max(stream.arrival_real_s, self.to_real(ev.scheduled_s))
                metrics.ttft.observe(t_real - stream.arrival_real_s)
                metrics.queue_time.observe(stream.scheduled_real_s - stream.arrival_real_s)
                metrics.prefill_time.observe(t_real - stream.scheduled_real_s)
            elif isinstance(ev, Finished):
                del self._streams[ev.request_id]
                stream.generated = ev.output_tokens
                stream.finish_reason = ev.finish_reason
                metrics.e2e.observe(t_real - stream.arrival_real_s)
                if stream.first_token_real_s is not None and stream.scheduled_real_s is not None:
                    metrics.decode_time.observe(t_real - stream.first_token_real_s)
                    metrics.inference_time.observe(t_real - stream.scheduled_real_s)
                    if ev.output_tokens > 1:
                        metrics.time_per_output_token.observe(
                            (t_real - stream.first_token_real_s) / (ev.output_tokens - 1))
                metrics.prompt_tokens.observe(ev.prompt_tokens)
                metrics.generation_tokens.observe(ev.output_tokens)
                metrics.success_by_reason[ev.finish_reason] = metrics.success_by_reason.get(ev.finish_reason, 0) + 1
                stream.queue.put_nowait(None)
