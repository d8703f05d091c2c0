"""SchedulerDriver: the one place where the pure Scheduler meets the event loop and the clock.

The scheduler returns Dispatch/Expire events from *any* call (a completion, a snapshot, a health change,
a timer tick). The driver resolves the future of the held request each event names, so a held request is
released by whatever freed room, at once. It is also the fleet monitor's sink (`on_snapshot`,
`on_health`): every input reaches the scheduler stamped with the same clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from capbalancer.background import stop_task
from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.sched.backend import Health
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Decision, Demand, Dispatch, Event, Expire, Hold, Reject
from capbalancer.server.metrics import ProxyMetrics

log = logging.getLogger("capbalancer.driver")

# While anything is held, tick at least this often: snapshots age and deadlines pass between events.
HELD_TICK_S = 0.1


class SchedulerDriver:
    def __init__(self, scheduler: Scheduler, metrics: ProxyMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.clock = clock
        self._waiters: dict[str, asyncio.Future[Event]] = {}
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        # request id -> what to call if its first token is overdue (the relay cancels and retries it).
        self._first_token_watch: dict[str, Callable[[], None]] = {}
        # Read when scraped, not set on every hold and release (a count over the pools and a gauge's lock each time).
        metrics.held.set_function(lambda: float(self.scheduler.held_count()))

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._run_timer(), name="scheduler-timer")

    async def stop(self) -> None:
        if self._timer is not None:
            await stop_task(self._timer)
            self._timer = None

    # --- requests --------------------------------------------------------------------------------
    def submit(self, demand: Demand, exclude: Iterable[str] = ()) -> Decision:
        decision = self.scheduler.submit(demand, self.clock(), exclude)
        if isinstance(decision, Hold):
            self._waiters[demand.request_id] = asyncio.get_running_loop().create_future()
            self._wake.set()
        elif not isinstance(decision, Reject) and not self._wake.is_set():
            self._wake.set()  # a request in flight: its first-token timer needs the timer task
        return decision

    async def wait_released(self, request_id: str) -> Dispatch | Expire:
        """Wait for a held request's Dispatch or Expire. Cancelled (client gone): it leaves the queue."""
        fut = self._waiters[request_id]
        try:
            return await fut
        except asyncio.CancelledError:
            self._waiters.pop(request_id, None)
            if fut.done() and not fut.cancelled() and isinstance(fut.result(), Dispatch):
                # Dispatched in the same loop turn as the cancel: release what it was given.
                self.finish(request_id, ok=False)
            else:
                self.cancel(request_id)
            raise

    def finish(self, request_id: str, *, output_tokens: int | None = None, prompt_tokens: int | None = None,
               ok: bool = True, fault: bool | None = None) -> None:
        self._handle(self.scheduler.finish(request_id, self.clock(), output_tokens=output_tokens,
                                           prompt_tokens=prompt_tokens, ok=ok, fault=fault))

    def cancel(self, request_id: str) -> None:
        self._handle(self.scheduler.cancel(request_id, self.clock()))

    def watch_first_token(self, request_id: str, on_overdue: Callable[[], None] | None) -> None:
        """Call `on_overdue` if the request's first-token timer runs out (None: stop watching)."""
        if on_overdue is None:
            self._first_token_watch.pop(request_id, None)
        else:
            self._first_token_watch[request_id] = on_overdue

    def on_first_token(self, request_id: str) -> None:
        self.scheduler.on_first_token(request_id, self.clock())

    def on_progress(self, request_id: str, output_tokens: int) -> None:
        self.scheduler.on_progress(request_id, output_tokens, self.clock())

    def report_failure(self, backend_id: str, reason: str) -> None:
        self._handle(self.scheduler.report_failure(backend_id, self.clock(), reason))
        self._publish_health(backend_id)

    # --- fleet monitor sink ----------------------------------------------------------------------
    def on_snapshot(self, backend_id: str, snapshot: EngineSnapshot) -> None:
        state = self.scheduler.backends.get(backend_id)
        if state is not None and state.spec.engine != snapshot.engine:
            # `engine: auto` reaches the scheduler as "openai" (config.backend_spec) until the monitor has
            # detected the engine; a snapshot is read by that engine's adapter and names it. Same name:
            # the scheduler keeps the backend's live state and takes the new spec.
            log.info("backend %s: engine %s (was %s)", backend_id, snapshot.engine, state.spec.engine)
            self.add_backend(dataclasses.replace(state.spec, engine=snapshot.engine))
        self._handle(self.scheduler.observe(backend_id, snapshot, self.clock()))

    def on_health(self, backend_id: str, ok: bool, reason: str = "") -> None:
        self._handle(self.scheduler.observe_health(backend_id, ok, self.clock(), reason))
        self._publish_health(backend_id)

    # --- fleet changes (config reload, admin API) -------------------------------------------------
    def add_backend(self, spec: BackendSpec) -> None:
        self._handle(self.scheduler.add_backend(spec, self.clock()))
        self._publish_health(spec.backend_id)

    def remove_backend(self, backend_id: str) -> None:
        self._handle(self.scheduler.remove_backend(backend_id, self.clock()))
        self.metrics.forget_backend(backend_id)

    def set_draining(self, backend_id: str, draining: bool) -> None:
        self._handle(self.scheduler.set_draining(backend_id, draining, self.clock()))

    def remove_pool(self, name: str) -> None:
        self._handle(self.scheduler.remove_pool(name, self.clock()))

    def handle(self, events: list[Event]) -> None:
        self._handle(events)

    # --- internals -------------------------------------------------------------------------------
    def _publish_health(self, backend_id: str) -> None:
        state = self.scheduler.backends.get(backend_id)
        if state is not None:
            self.metrics.set_health(backend_id, state.health is Health.UP)

    def _handle(self, events: list[Event]) -> None:
        if not events:
            return
        pending = list(events)
        while pending:
            event = pending.pop()
            fut = self._waiters.pop(event.request_id, None)
            if fut is None or fut.done():
                if isinstance(event, Dispatch):
                    # Its client left between the decision and now: give the room back at once.
                    pending.extend(self.scheduler.cancel(event.request_id, self.clock()))
                continue
            fut.set_result(event)

    async def _run_timer(self) -> None:
        while True:
            try:
                first_token_due = self.scheduler.next_first_token_due_s()
                if self.scheduler.held_count() == 0 and first_token_due is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = self.clock()
                wake_at = self.scheduler.next_wakeup_s()
                if first_token_due is not None:
                    wake_at = first_token_due if wake_at is None else min(wake_at, first_token_due)
                delay = HELD_TICK_S if wake_at is None else min(HELD_TICK_S, max(0.0, wake_at - now))
                await asyncio.sleep(delay)
                now = self.clock()
                self._handle(self.scheduler.check_first_tokens(now))
                for request_id in self.scheduler.take_overdue():
                    on_overdue = self._first_token_watch.pop(request_id, None)
                    if on_overdue is not None:
                        on_overdue()
                if self.scheduler.held_count():
                    self._handle(self.scheduler.tick(now))
            except asyncio.CancelledError:
                raise
            except Exception:  # the timer must outlive a bug in one tick, or held requests hang
                log.exception("scheduler tick failed")
                await asyncio.sleep(HELD_TICK_S)
