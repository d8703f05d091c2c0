"""FleetMonitor: poll every backend's /health and /metrics, turn the page into an EngineSnapshot, tell a sink.

One task per backend, each on its own jittered interval so a large fleet does not scrape in lockstep.
Each poll sends /health and /metrics together and reads the clock as it sends them: the snapshot
is at least as fresh as `taken_at_s`, which is what the scheduler needs to count the requests it sent
after the scrape (DESIGN invariant 3).

What the sink hears:
- `on_health(ok=True)` when /health answers 2xx; `ok=False` with a reason when it answers anything else,
  refuses, resets or times out. Every poll reports; the scheduler applies the hysteresis.
- `on_snapshot` only for a metrics page that parsed and held the engine's series. A failing, slow or
  garbled /metrics sends nothing: the last snapshot goes stale and the scheduler falls back on its own
  accounting. An empty snapshot would look like an idle engine, which is the worst possible guess.
- A plain OpenAI server ("openai") gets a snapshot with every load field None while /health is OK, so
  its freshness is known and the proxy's own accounting is all there is.

Fail-safe: nothing raised inside a poll (network, parsing, a sink that throws) escapes the loop;
every request has a timeout and the whole poll a bound; `stop()` cancels and awaits every task.
No backoff for a down backend: it is polled on the same interval, so its recovery shows within two.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from capbalancer.fleet.adapters import ENGINES, MetricsUnavailable, openai_snapshot, snapshot_from_metrics
from capbalancer.fleet.detect import (
    engine_from_info,
    engine_from_metrics,
    engine_from_model_info,
    tgi_info_capacity,
)
from capbalancer.fleet.promtext import ParseError
from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.server.limits import is_fd_exhaustion, read_body_bounded

__all__ = ["PollTarget", "MonitorSink", "FleetMonitor", "MAX_BODY_BYTES"]

log = logging.getLogger("capbalancer.fleet.monitor")

# A vLLM page is ~60 KB; anything far larger is not a metrics page we want to hold in memory.
MAX_BODY_BYTES = 8 * 1024 * 1024
KNOWN_ENGINES = frozenset({*ENGINES, "openai", "auto"})


@dataclass(frozen=True, slots=True)
class PollTarget:
    backend_id: str
    base_url: str
    engine: str  # vllm | tgi | sglang | openai | auto
    headers: dict[str, str] = field(default_factory=dict)
    kv_capacity_tokens: int | None = None  # used when the engine does not report its KV capacity


class MonitorSink(Protocol):
    def on_snapshot(self, backend_id: str, snapshot: EngineSnapshot) -> None: ...

    def on_health(self, backend_id: str, ok: bool, reason: str) -> None: ...


class _Failed(Exception):
    """A request that got no HTTP answer (refused, reset, timed out, too large)."""


class _ProxyOverloaded(_Failed):
    """The proxy itself is out of file descriptors: no news about the backend, good or bad (issue 14)."""


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes


@dataclass(slots=True)
class _TargetState:
    target: PollTarget
    engine: str  # the configured engine, or the detected one; "auto" until detection settles
    health_path: str = "/health"
    info_capacity_tokens: int | None = None
    info_checked: bool = False
    last_health_ok: bool | None = None
    last_metrics_problem: str | None = None
    stopped: bool = False
    task: asyncio.Task[None] | None = None


class FleetMonitor:
    def __init__(self, targets: Sequence[PollTarget], sink: MonitorSink, interval_s: float = 1.0,
                 timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 session: aiohttp.ClientSession | None = None, jitter_fraction: float = 0.1) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        if not 0 <= jitter_fraction < 1:
            raise ValueError("jitter_fraction must be in [0, 1)")
        self._sink = sink
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._session = session
        self._owns_session = session is None
        self._jitter = jitter_fraction
        self._rng = random.Random()
        self._states: dict[str, _TargetState] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._running = False
        for t in targets:
            self._states[t.backend_id] = self._new_state(t)

    # --- public surface ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        if self._session is None:
            # No global connection cap (the default 100 would throttle a large fleet), a few per backend.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=4))
        self._running = True
        for state in self._states.values():
            self._spawn(state)

    async def stop(self) -> None:
        self._running = False
        for s in self._states.values():
            s.stopped = True
        tasks = [s.task for s in self._states.values() if s.task is not None] + list(self._retired)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._states.values():
            s.task = None
            s.stopped = False  # a later start() polls again
        self._retired.clear()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def add_target(self, target: PollTarget) -> None:
        """Start polling `target` (replacing a target with the same backend_id)."""
        self.remove_target(target.backend_id)
        state = self._new_state(target)
        self._states[target.backend_id] = state
        if self._running:
            self._spawn(state)

    def remove_target(self, backend_id: str) -> None:
        """Stop polling; the sink hears nothing more about this backend from the old task."""
        state = self._states.pop(backend_id, None)
        if state is not None:
            state.stopped = True
        if state is not None and state.task is not None:
            # Cancelled before it next resumes, so it cannot call the sink again; stop() awaits it.
            state.task.cancel()
            self._retired.add(state.task)
            state.task.add_done_callback(self._retired.discard)

    def detected_engine(self, backend_id: str) -> str:
        """The engine in use: as configured, or as detected; "auto" while detection has not settled."""
        return self._states[backend_id].engine

    # --- the loop --------------------------------------------------------------------------------------
    def _new_state(self, target: PollTarget) -> _TargetState:
        engine = target.engine.lower()
        if engine not in KNOWN_ENGINES:
            raise ValueError(f"backend {target.backend_id}: unknown engine {target.engine!r} "
                             f"(one of {', '.join(sorted(KNOWN_ENGINES))})")
        return _TargetState(target=target, engine=engine)

    def _spawn(self, state: _TargetState) -> None:
        state.task = asyncio.get_running_loop().create_task(self._run(state),
                                                            name=f"fleet-monitor:{state.target.backend_id}")

    async def _run(self, state: _TargetState) -> None:
        loop = asyncio.get_running_loop()
        # `state.stopped` as well as cancellation: a cancel that lands as an await completes can be lost
        # in some asyncio versions, and then the loop must still end. Every request has its own timeout,
        # so one poll is bounded (detection: three requests one after another at most).
        while not state.stopped:
            started = loop.time()
            try:
                await self._poll_once(state)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one poll
                log.exception("poll of %s failed unexpectedly", state.target.backend_id)
            period = self._interval_s * (1.0 + self._rng.uniform(-self._jitter, self._jitter))
            await asyncio.sleep(max(0.0, period - (loop.time() - started)))

    async def _poll_once(self, state: _TargetState) -> None:
        taken_at_s = self._clock()  # read as the scrape is sent: the state is at least this fresh
        # Health and metrics run side by side and each reports as soon as it knows: a hanging /metrics
        # must not delay the news that /health is failing (or back).
        health_ok = asyncio.get_running_loop().create_future()

        async def health() -> None:
            ok = False
            try:
                ok, reason = await self._probe_health(state)
                self._report_health(state, ok, reason)
            except _ProxyOverloaded:
                ok = bool(state.last_health_ok)  # the proxy's own fd exhaustion never marks a backend down
            finally:
                if not health_ok.done():
                    health_ok.set_result(ok)

        async def metrics() -> None:
            engine = state.engine
            answer: _Response | _Failed | None
            if engine == "auto":
                detected, answer = await self._detect(state)
                if detected is None:
                    return
                state.engine = engine = detected
                log.info("backend %s runs %s (detected)", state.target.backend_id, detected)
            elif engine in ENGINES:
                answer = await self._get_or_fail(state, "/metrics")
            else:
                answer = None
            if engine == "openai":
                if await health_ok:  # no metrics: a fresh, all-unknown snapshot while it is alive
                    self._emit(state, openai_snapshot(taken_at_s))
                return
            if answer is not None:
                snapshot = await self._snapshot(state, engine, answer, taken_at_s)
                if snapshot is not None:
                    self._emit(state, snapshot)

        for result in await asyncio.gather(health(), metrics(), return_exceptions=True):
            if isinstance(result, Exception):
                log.error("poll of %s failed unexpectedly", state.target.backend_id, exc_info=result)

    async def _snapshot(self, state: _TargetState, engine: str, metrics: _Response | _Failed,
                        taken_at_s: float) -> EngineSnapshot | None:
        if isinstance(metrics, _Failed):
            return self._metrics_problem(state, f"/metrics failed: {metrics}")
        if not 200 <= metrics.status < 300:
            return self._metrics_problem(state, f"/metrics answered {metrics.status}")
        text = metrics.body.decode("utf-8", errors="replace")
        configured = state.target.kv_capacity_tokens
        try:
            if engine == "tgi" and not state.info_checked:
                # An old TGI says its capacity only in /info, which beats a configured (profile) figure:
                # ask once, whether or not one is configured. A TGI with the capacity gauge is never asked.
                if snapshot_from_metrics(engine, text, taken_at_s).kv_capacity_tokens is None:
                    await self._fetch_tgi_info(state)
                else:
                    state.info_checked = True
            snap = snapshot_from_metrics(engine, text, taken_at_s, configured_capacity_tokens=configured,
                                         info_capacity_tokens=state.info_capacity_tokens)
        except (ParseError, MetricsUnavailable) as exc:
            return self._metrics_problem(state, f"/metrics unusable: {exc}")
        if state.last_metrics_problem is not None:
            log.info("backend %s: /metrics usable again", state.target.backend_id)
            state.last_metrics_problem = None
        return snap

    @staticmethod
    def _metrics_problem(state: _TargetState, problem: str) -> None:
        # Log once per kind of problem, not once a second.
        if problem != state.last_metrics_problem:
            log.warning("backend %s: %s; no snapshot (the scheduler uses its own accounting)",
                        state.target.backend_id, problem)
            state.last_metrics_problem = problem
        return None

    # --- requests ----------------------------------------------------------------------------------------
    async def _get(self, state: _TargetState, path: str) -> _Response:
        session = self._session
        if session is None:
            raise _Failed("monitor not started")
        url = state.target.base_url.rstrip("/") + path
        try:
            async with session.get(url, headers=state.target.headers, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=self._timeout_s)) as resp:
                return _Response(resp.status, await read_body_bounded(resp, MAX_BODY_BYTES, _Failed))
        except asyncio.TimeoutError:
            raise _Failed(f"timed out after {self._timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if is_fd_exhaustion(exc):
                raise _ProxyOverloaded(f"{type(exc).__name__}: {exc}"[:200]) from None
            raise _Failed(f"{type(exc).__name__}: {exc}"[:200]) from None

    async def _get_or_fail(self, state: _TargetState, path: str) -> _Response | _Failed:
        try:
            return await self._get(state, path)
        except _Failed as exc:
            return exc

    async def _probe_health(self, state: _TargetState) -> tuple[bool, str]:
        path = state.health_path
        try:
            resp = await self._get(state, path)
        except _ProxyOverloaded:
            raise
        except _Failed as exc:
            return False, f"{path} failed: {exc}"
        if resp.status == 404 and path == "/health":
            # Some OpenAI-compatible servers have no /health: their model list is the liveness probe.
            log.info("backend %s has no /health; probing /v1/models instead", state.target.backend_id)
            state.health_path = "/v1/models"
            return await self._probe_health(state)
        if 200 <= resp.status < 300:
            return True, ""
        return False, f"{path} answered {resp.status}"

    async def _json(self, state: _TargetState, path: str) -> Any:
        """The JSON body of a 2xx answer, else None; raises _Failed when the backend did not answer."""
        resp = await self._get(state, path)
        if not 200 <= resp.status < 300:
            return None
        try:
            return orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return None

    async def _detect(self, state: _TargetState) -> tuple[str | None, _Response | None]:
        """The engine, and the /metrics answer it read (reused for this poll's snapshot). None while the
        backend cannot tell: it did not answer, or /metrics failed with a 5xx."""
        try:
            metrics = await self._get(state, "/metrics")
            if 200 <= metrics.status < 300:
                engine = engine_from_metrics(metrics.body.decode("utf-8", errors="replace"))
                if engine is not None:
                    return engine, metrics
            elif metrics.status >= 500:
                return None, None
            engine = engine_from_info(await self._json(state, "/info"))
            if engine is None:
                engine = engine_from_model_info(await self._json(state, "/get_model_info"))
            return engine or "openai", None
        except _Failed:
            return None, None

    async def _fetch_tgi_info(self, state: _TargetState) -> None:
        try:
            body = await self._json(state, "/info")
        except _Failed:
            return  # try again next poll
        state.info_checked = True
        state.info_capacity_tokens = tgi_info_capacity(body)

    # --- the sink ----------------------------------------------------------------------------------------
    def _report_health(self, state: _TargetState, ok: bool, reason: str) -> None:
        if ok != state.last_health_ok:
            if ok:
                log.info("backend %s: health OK", state.target.backend_id)
            else:
                log.warning("backend %s: health failed: %s", state.target.backend_id, reason)
            state.last_health_ok = ok
        try:
            self._sink.on_health(state.target.backend_id, ok, reason)
        except Exception:
            log.exception("health sink failed for %s", state.target.backend_id)

    def _emit(self, state: _TargetState, snapshot: EngineSnapshot) -> None:
        try:
            self._sink.on_snapshot(state.target.backend_id, snapshot)
        except Exception:
            log.exception("snapshot sink failed for %s", state.target.backend_id)

