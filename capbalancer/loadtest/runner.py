"""Drive a load test: send the workload's requests on schedule, bounded, and collect their records.

Open loop: requests leave at their arrival times (Poisson/gamma at `request_rate_per_s`, or a trace's
timestamps) whether or not earlier ones finished. `max_concurrency` caps requests in flight; with rate
`inf` it is a closed loop of that many users. A run ends after `num_requests`, or when `duration_s` has
passed (no new sends after it, and requests still in flight get `drain_s` more before they are
cancelled), and no request outlives `request_timeout_s`, so every run stops by itself.
"""

from __future__ import annotations

import asyncio
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp

from capbalancer.loadtest.arrivals import arrival_times_s
from capbalancer.loadtest.client import ApiSettings, RequestRecord, endpoint_url, send_request
from capbalancer.loadtest.stats import (
    DEFAULT_PERCENTILES,
    Slo,
    backend_shares,
    errors_by_kind,
    summarize,
)
from capbalancer.loadtest.workloads import Workload


@dataclass(slots=True)
class LoadtestConfig:
    url: str
    workload: Workload
    api: str = "completions"
    model: str | None = None  # None: ask GET /v1/models (OpenAI APIs), none for TGI
    endpoint: str | None = None
    request_rate_per_s: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    request_timeout_s: float = 300.0
    drain_s: float | None = None  # after duration_s: how long in-flight requests may finish (default timeout)
    trace_speed: float = 1.0  # trace replay: 2.0 sends twice as fast as recorded
    slo: Slo = field(default_factory=Slo)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    headers: dict[str, str] = field(default_factory=dict)
    label: str = ""

    def validate(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a load test needs num_requests or duration_s, so it stops by itself")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if (self.duration_s is not None and self.num_requests is None and math.isinf(self.request_rate_per_s)
                and self.max_concurrency is None and not self.workload.is_trace):
            raise ValueError("request rate inf with only a duration would send without limit: "
                             "give a rate, max concurrency or a number of requests")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be >= 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request timeout must be > 0")
        if self.trace_speed <= 0:
            raise ValueError("trace speed must be > 0")

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url, "api": self.api, "model": self.model,
            "endpoint": endpoint_url(self.url, self.api, self.endpoint),
            "request_rate": "inf" if math.isinf(self.request_rate_per_s) else self.request_rate_per_s,
            "burstiness": self.burstiness, "max_concurrency": self.max_concurrency,
            "num_requests": self.num_requests, "duration_s": self.duration_s, "seed": self.seed,
            "ignore_eos": self.ignore_eos, "temperature": self.temperature,
            "request_timeout_s": self.request_timeout_s, "trace_speed": self.trace_speed,
            "slo": self.slo.to_dict(), "percentiles": list(self.percentiles),
            "workload": self.workload.describe(), "label": self.label,
        }


@dataclass(slots=True)
class LoadtestResult:
    config: dict[str, Any]
    started_at: str  # ISO 8601 UTC
    duration_s: float
    records: list[RequestRecord]
    summary: dict[str, Any]
    errors: dict[str, int]
    backends: dict[str, dict[str, float]]
    stopped_by: str  # "num_requests" | "duration" | "workload"

    @property
    def label(self) -> str:
        return str(self.config.get("label") or "")


@dataclass(slots=True)
class LiveCounters:
    """What the progress bar shows; updated by the runner, read by whoever displays it."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    started: float = 0.0


ProgressHook = Callable[[LiveCounters], None]


async def discover_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str | None:
    """The first model the server lists at /v1/models, as vllm bench does when --model is not given."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    try:
        async with session.get(f"{base}/v1/models", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    models = data.get("data") if isinstance(data, dict) else None
    if models and isinstance(models[0], dict) and isinstance(models[0].get("id"), str):
        return models[0]["id"]
    return None


def _raise_fd_limit(wanted: int) -> None:
    # Thousands of concurrent streams need as many sockets; the soft limit is often 1024.
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(hard, max(soft, wanted))
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


async def run_loadtest(config: LoadtestConfig, progress: ProgressHook | None = None,
                       progress_interval_s: float = 0.5) -> LoadtestResult:
    """Run one load test to its end and summarize it. Failed requests are records, not exceptions."""
    config.validate()
    _raise_fd_limit(8192)
    limit = config.max_concurrency or 0  # 0: no pool limit, so open-loop sends never wait for a socket
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False,
                                     enable_cleanup_closed=True, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, config.request_timeout_s))
    counters = LiveCounters()
    records: list[RequestRecord] = []
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        model = config.model
        if model is None and config.api != "tgi":
            model = await discover_model(session, config.url, config.headers)
        config.model = model
        settings = ApiSettings(api=config.api, url=endpoint_url(config.url, config.api, config.endpoint),
                               model=model, ignore_eos=config.ignore_eos, temperature=config.temperature,
                               headers=dict(config.headers))
        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        tasks: set[asyncio.Task] = set()
        run_start = time.perf_counter()
        counters.started = run_start

        async def one(spec, index: int) -> None:
            try:
                record = await send_request(session, settings, spec, index, run_start, config.request_timeout_s)
                records.append(record)
                if record.success:
                    counters.completed += 1
                else:
                    counters.failed += 1
            finally:
                counters.in_flight -= 1
                if semaphore is not None:
                    semaphore.release()

        ticker = asyncio.create_task(_tick(progress, counters, progress_interval_s)) if progress else None
        stopped_by = "workload"
        arrivals = arrival_times_s(config.request_rate_per_s, config.burstiness, config.seed)
        try:
            if config.workload.is_sessions:
                stopped_by = await _drive_sessions(config, counters, semaphore, run_start, one, tasks)
                iterator: Any = ()
            else:
                iterator = enumerate(config.workload)
            for index, spec in iterator:
                if config.num_requests is not None and index >= config.num_requests:
                    stopped_by = "num_requests"
                    break
                if config.workload.is_trace:
                    due_s = (spec.arrival_s or 0.0) / config.trace_speed
                else:
                    due_s = next(arrivals)
                if config.duration_s is not None and due_s >= config.duration_s:
                    stopped_by = "duration"
                    break
                delay = run_start + due_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if semaphore is not None:
                    if config.duration_s is not None:
                        left = run_start + config.duration_s - time.perf_counter()
                        try:
                            await asyncio.wait_for(semaphore.acquire(), timeout=max(0.0, left))
                        except asyncio.TimeoutError:
                            stopped_by = "duration"
                            break
                    else:
                        await semaphore.acquire()
                if config.duration_s is not None and time.perf_counter() - run_start >= config.duration_s:
                    if semaphore is not None:
                        semaphore.release()
                    stopped_by = "duration"
                    break
                counters.sent += 1
                counters.in_flight += 1
                counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
                task = asyncio.create_task(one(spec, index))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                drain = config.drain_s if config.drain_s is not None else config.request_timeout_s
                # Each request times out by itself; the extra second covers the cancellation's own time.
                _, pending = await asyncio.wait(set(tasks), timeout=drain + 1.0)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                progress(counters)
        sent_indices = {r.index for r in records}
        # Requests cancelled by the drain limit leave no record of their own; count them as timeouts.
        duration_s = max((r.start_s + (r.e2el_s or 0.0) for r in records), default=0.0)
        for index in range(counters.sent):
            if index not in sent_indices:
                records.append(RequestRecord(index=index, start_s=0.0, prompt_len=0, max_tokens=0,
                                             error="timeout", error_detail="still running when the run ended"))
    records.sort(key=lambda r: r.index)
    summary = summarize(records, duration_s, config.slo, config.percentiles, counters.max_in_flight)
    return LoadtestResult(config=config.describe(), started_at=started_at, duration_s=duration_s,
                          records=records, summary=summary, errors=errors_by_kind(records),
                          backends=backend_shares(records, config.slo), stopped_by=stopped_by)


async def _drive_sessions(config: LoadtestConfig, counters: LiveCounters, semaphore: asyncio.Semaphore | None,
                          run_start: float, one: Callable[[Any, int], Any], tasks: set[asyncio.Task]) -> str:
    """Sessions (loadtest/sessions.py): each turn waits for the previous answer and a think time.

    Open loop (a finite --request-rate): sessions start as Poisson/gamma arrivals at rate / mean turns, so requests
    arrive at about the given rate. Closed loop (rate inf with --max-concurrency N): N users, each running one
    session after another. Either way nothing is sent after --duration or past --num-requests; the session tasks
    are added to `tasks` so the caller's drain waits for them."""
    workload = config.workload
    sessions = workload.sessions()  # type: ignore[attr-defined]
    stop = {"why": ""}

    def over() -> bool:
        if config.num_requests is not None and counters.sent >= config.num_requests:
            stop["why"] = stop["why"] or "num_requests"
        elif config.duration_s is not None and time.perf_counter() - run_start >= config.duration_s:
            stop["why"] = stop["why"] or "duration"
        return bool(stop["why"])

    async def run_session(sess: Any, first_turn: int = 0, first_wait_s: float = 0.0) -> None:
        for k, spec in enumerate(sess.turns):
            if k < first_turn:
                continue
            think_s = first_wait_s if k == first_turn and first_turn > 0 else sess.think_times_s[k]
            if think_s > 0:
                left = (run_start + config.duration_s - time.perf_counter()) if config.duration_s else think_s
                await asyncio.sleep(max(0.0, min(think_s, left)))
            if over():
                return
            if semaphore is not None:
                await semaphore.acquire()
            index = counters.sent
            counters.sent += 1
            counters.in_flight += 1
            counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
            await one(spec, index)

    def start(coro: Any) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if math.isinf(config.request_rate_per_s):
        users = config.max_concurrency or 1

        async def user() -> None:
            while not over():
                await run_session(next(sessions))

        # Users carry their own in-flight limit (one request each): the per-request semaphore would only
        # serialise them further.
        semaphore = None
        for _ in range(users):
            start(user())
        while not over() and tasks:
            await asyncio.sleep(0.05)
        return stop["why"] or "workload"
    session_rate = config.request_rate_per_s / max(1.0, workload.mean_turns)  # type: ignore[attr-defined]
    # Warm start: a session lasts many seconds (turns x (think time + answer)), so sessions starting at t=0 would
    # send well below the rate for the first session-lifetime of the run. Sessions that "started" before t=0 are
    # joined in progress instead, at the turn they would have reached (each turn taken as its think time plus
    # WARM_TURN_S of answer), so the request rate is near its target from the start. Their first turn is sent
    # with its whole context, which no engine holds yet: the cache starts cold, as on a fresh fleet.
    for sess, first_turn, wait_s in _sessions_in_progress(sessions, session_rate, config.seed):
        start(run_session(sess, first_turn, wait_s))
    for due_s in arrival_times_s(session_rate, config.burstiness, config.seed):
        delay = run_start + due_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if over():
            break
        start(run_session(next(sessions)))
    return stop["why"] or "workload"


WARM_TURN_S = 3.0  # an answer's nominal duration when joining sessions in progress (warm start)


def _sessions_in_progress(sessions: Any, session_rate_per_s: float, seed: int) -> list[tuple[Any, int, float]]:
    """Sessions that started before t=0 (Poisson at the session rate, looking back 120 s) and would still be
    running at t=0: each with the turn it would have reached and how long until that turn is due."""
    rng = random.Random(f"warm-start-{seed}")
    out: list[tuple[Any, int, float]] = []
    age_s = 0.0
    while True:
        age_s += rng.expovariate(session_rate_per_s)
        if age_s > 120.0 or len(out) >= 10_000:
            return out
        sess = next(sessions)
        t = 0.0
        for k in range(len(sess.turns)):
            t += sess.think_times_s[k] + (WARM_TURN_S if k > 0 else 0.0)
            if t >= age_s:
                out.append((sess, k, t - age_s))
                break


async def _tick(progress: ProgressHook, counters: LiveCounters, interval_s: float) -> None:
    while True:
        progress(counters)
        await asyncio.sleep(interval_s)
