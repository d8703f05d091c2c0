"""The scheduler: one pure object that the live proxy and the discrete-event runner both drive.

It never awaits, sleeps or reads a clock (DESIGN invariant 1). Every input carries the time it happened
(`now`, in seconds on whatever clock the driver uses), and every method returns its decisions:

    decision = sched.submit(demand, now)          # Route(backend) | Hold | Reject
    events   = sched.observe(backend, snap, now)  # a fresher snapshot may free room: [Dispatch | Expire]
    sched.on_first_token(request_id, now); sched.on_progress(request_id, tokens, now)
    events   = sched.finish(request_id, now, output_tokens=..)   # a completion frees room too
    events   = sched.tick(now)                    # deadlines of held requests
    when     = sched.next_wakeup_s()              # the driver calls tick() no later than this

A driver acts on each Dispatch (send the held request to that backend) and each Expire (answer it with
the status and Retry-After given).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from capbalancer.fleet.kv_events import KvEvent
from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.sched.admission import (
    FORECAST_MIN_OUTPUTS,
    BackendForecast,
    DrainRate,
    OverloadRatio,
    SeatForecast,
    queue_waits,
)
from capbalancer.sched.backend import BackendState, Health, InflightRequest
from capbalancer.sched.capacity import TTFT_MARGIN_FACTOR, TTFT_MARGIN_S, CapacityModel, CapacitySettings
from capbalancer.sched.errors import SchedulerError
from capbalancer.sched.estimates import OutputLengthEstimator
from capbalancer.sched.hold import HoldQueue
from capbalancer.sched.outlier import OutlierDetector, OutlierSettings
from capbalancer.sched.policies import Policy, PolicyContext, make_policy
from capbalancer.sched.prefix_index import PrefixIndex, PrefixSettings
from capbalancer.sched.remote import RemoteView, ReplicaState, local_state
from capbalancer.sched.retry_spread import RetrySpread
from capbalancer.sched.types import (
    BackendSpec,
    Decision,
    Demand,
    Dispatch,
    Event,
    Expire,
    HealthSettings,
    Hold,
    PoolSettings,
    Reject,
    Route,
)

# Held requests looked at past a head that waits for its prefix's backend, per release (each look is O(queue)).
RELEASE_LOOKAHEAD = 16


def _can_ever_take(backend: BackendState, needed_tokens: int | None) -> bool:
    """Whether `backend` can ever serve a request needing this much context (max model length, whole KV): one
    that cannot is never a candidate (the engine would only answer 400 after the request waited for it)."""
    if needed_tokens is None:
        return True
    limit = backend.max_request_tokens()
    return limit is None or needed_tokens <= limit


@dataclass(slots=True)
class PoolState:
    settings: PoolSettings
    policy: Policy
    hold: HoldQueue = field(default_factory=HoldQueue)
    backend_ids: list[str] = field(default_factory=list)  # in insertion order: round-robin is stable
    output_lengths: OutputLengthEstimator = field(default_factory=OutputLengthEstimator)
    held_total: int = 0
    rejected_total: int = 0
    expired_total: int = 0
    # How fast held requests leave the queue for a backend: tells a newcomer whether it could leave the
    # queue before its deadline at all (sched/admission.py).
    drain: DrainRate = field(default_factory=DrainRate)
    # Requests asking to join the queue per request it releases: how short it may be kept (sched/admission.py).
    overload: OverloadRatio = field(default_factory=OverloadRatio)
    # Retry-After of overload refusals, spread at the pool's start rate (sched/retry_spread.py).
    retry: RetrySpread = field(default_factory=RetrySpread)
    starts_total: int = 0  # requests dispatched (routed or released): what a seat forecast's seats were taken by
    # When its seats free, by the capacity model: the drain until one is measured (sched/admission.py).
    forecast: SeatForecast | None = None

    @property
    def release_rate_per_s(self) -> float | None:
        """The measured drain rate (None: no backlog measured yet): what replicas share (sched/remote.py)."""
        return self.drain.rate_per_s

    @release_rate_per_s.setter
    def release_rate_per_s(self, rate: float | None) -> None:
        self.drain.rate_per_s = rate


class Scheduler:
    def __init__(
        self,
        pools: Iterable[PoolSettings],
        backends: Iterable[BackendSpec] = (),
        health: HealthSettings | None = None,
        seed: int = 0,
        prefix: PrefixSettings | None = None,
        outlier: OutlierSettings | None = None,
    ) -> None:
        self.health = health or HealthSettings()
        # Backends failing real requests (5xx, timeouts, no first token) leave their pool for a while, whatever
        # the policy: health polls do not see an engine that answers /health and nothing else.
        self.outlier = OutlierDetector(outlier or OutlierSettings())
        # (due time, request id): requests whose first token is overdue then (`check_first_tokens`).
        self._first_token_due: list[tuple[float, str]] = []
        # Requests found overdue by `check_first_tokens`, until the driver takes them (`take_overdue`): it may
        # cancel one that has sent nothing to its client yet and retry it elsewhere.
        self._overdue: list[str] = []
        # Which prompt prefixes each backend probably holds (DESIGN invariant 7): fed on dispatch and finish,
        # and by KV events where an engine publishes them; the cost model counts what it predicts cached.
        self.prefix = PrefixIndex(prefix or PrefixSettings())
        # Predicts every dispatch's TTFT/TPOT (whatever the policy) and calibrates from completions.
        self.capacity = CapacityModel(self.health)
        if self.prefix.settings.enabled:
            self.capacity.prefix = self.prefix
        self._rng = random.Random(seed)
        self.pools: dict[str, PoolState] = {}
        self.backends: dict[str, BackendState] = {}
        # Backends removed while requests were still on them: kept until those finish.
        self._retired: dict[str, BackendState] = {}
        self._request_backend: dict[str, str] = {}  # in-flight request -> backend id
        self._held_pool: dict[str, str] = {}  # held request -> pool name
        # Other proxy replicas' reservations (sched/remote.py): empty without sharing.
        self.remote = RemoteView()
        for settings in pools:
            self.add_pool(settings)
        for spec in backends:
            self.add_backend(spec, 0.0)

    # --- configuration ------------------------------------------------------------------------
    def add_pool(self, settings: PoolSettings) -> None:
        if settings.name in self.pools:
            self.update_pool(settings)
            return
        policy = make_policy(settings.policy, settings.policy_options, random.Random(self._rng.random()))
        self.pools[settings.name] = PoolState(settings=settings, policy=policy)

    def update_pool(self, settings: PoolSettings) -> None:
        pool = self.pools[settings.name]
        if (settings.policy, settings.policy_options) != (pool.settings.policy, pool.settings.policy_options):
            pool.policy = make_policy(settings.policy, settings.policy_options, random.Random(self._rng.random()))
        pool.settings = settings

    def remove_pool(self, name: str, now: float) -> list[Event]:
        pool = self.pools.pop(name)
        for backend_id in list(pool.backend_ids):
            self._retire(backend_id)
        return [self._expire(d, now, 503, "model removed from configuration", pool.settings)
                for d, _ in pool.hold.drain_all()]

    def add_backend(self, spec: BackendSpec, now: float) -> list[Event]:
        if spec.pool not in self.pools:
            raise SchedulerError(f"backend {spec.backend_id!r} names unknown pool {spec.pool!r}")
        existing = self.backends.get(spec.backend_id)
        if existing is not None:
            # Same name again (config reload): keep its live state, take the new spec.
            if existing.spec.pool != spec.pool:
                self.pools[existing.spec.pool].backend_ids.remove(spec.backend_id)
                self.pools[spec.pool].backend_ids.append(spec.backend_id)
            existing.spec = spec
        else:
            state = self._retired.pop(spec.backend_id, None) or BackendState(spec=spec)
            state.spec = spec
            self.backends[spec.backend_id] = state
            self.pools[spec.pool].backend_ids.append(spec.backend_id)
            self.prefix.add_backend(spec.backend_id)
        self._link_gpu_groups()
        return self._release(spec.pool, now)

    def remove_backend(self, backend_id: str, now: float) -> list[Event]:
        state = self._backend(backend_id)
        self._retire(backend_id)
        return self._expire_if_unservable(state.spec.pool, now)

    def set_draining(self, backend_id: str, draining: bool, now: float) -> list[Event]:
        state = self._backend(backend_id)
        state.draining = draining
        return self._release(state.spec.pool, now) if not draining else self._expire_if_unservable(
            state.spec.pool, now)

    # --- what the fleet monitor and the relay report -----------------------------------------
    def observe(self, backend_id: str, snapshot: EngineSnapshot, now: float) -> list[Event]:
        """A successful metrics poll."""
        state = self.backends.get(backend_id)
        if state is None:
            return []
        state.take_snapshot(snapshot)
        state.kv_reserve.observe(snapshot.preemptions_total, now)
        if state.gpu_siblings:
            self.capacity.refresh_shared(state, now)
        hits = getattr(snapshot, "prefix_cache_hits_tokens_total", None)
        if hits is not None:  # the engine's own count of prefix-cache hits: how far the index's belief holds
            self.prefix.on_hits_counter(backend_id, hits)
        return self._release(state.spec.pool, now)

    def observe_prefix_hits(self, backend_id: str, hits_tokens_total: float, now: float) -> None:
        """The engine's cumulative prefix-cache hit counter, in tokens (vllm:prefix_cache_hits_total): the
        index learns how much of its belief about that backend the engine confirms (invariant 8)."""
        if backend_id in self.backends:
            self.prefix.on_hits_counter(backend_id, hits_tokens_total)

    def observe_kv_events(self, backend_id: str, events: Iterable[KvEvent], now: float) -> None:
        """The engine's KV-cache events (fleet/kv_events.py): truth about what it holds, for the prefix index."""
        state = self.backends.get(backend_id)
        if state is not None and self.prefix.settings.enabled:
            self.prefix.apply_kv_events(backend_id, events, state.spec.pool)

    def observe_health(self, backend_id: str, ok: bool, now: float, reason: str = "") -> list[Event]:
        """A health poll: consecutive results move the backend up or down, with hysteresis."""
        state = self.backends.get(backend_id)
        if state is None:
            return []
        if ok:
            state.consecutive_failures = 0
            state.consecutive_successes += 1
            if state.health is Health.DOWN and state.consecutive_successes >= self.health.success_threshold:
                state.health = Health.UP
                return self._release(state.spec.pool, now)
            return []
        state.consecutive_successes = 0
        state.consecutive_failures += 1
        state.last_failure_reason = reason
        if state.health is Health.UP and state.consecutive_failures >= self.health.failure_threshold:
            state.health = Health.DOWN
            return self._expire_if_unservable(state.spec.pool, now)
        return []

    def report_failure(self, backend_id: str, now: float, reason: str) -> list[Event]:
        """The relay could not reach the backend at all (refused, reset): down at once, not after N polls."""
        state = self.backends.get(backend_id)
        if state is None:
            return []
        state.consecutive_successes = 0
        state.consecutive_failures = max(state.consecutive_failures + 1, self.health.failure_threshold)
        state.last_failure_reason = reason
        if state.health is Health.UP:
            state.health = Health.DOWN
            return self._expire_if_unservable(state.spec.pool, now)
        return []

    # --- other proxy replicas (DESIGN invariant 10) ---------------------------------------------------
    def observe_remote(self, states: Iterable[ReplicaState], now: float, staleness_s: float | None = None
                       ) -> list[Event]:
        """Other replicas' published reservations, received at `now`. Those not heard from within the
        staleness bound stop counting; room they gave back may release held requests."""
        if staleness_s is not None:
            self.remote.staleness_s = staleness_s
        for st in states:
            self.remote.put(st, now)
        self.remote.expire(now)
        return self._apply_remote(now)

    def forget_remote(self, now: float, replica_id: str | None = None) -> list[Event]:
        """Stop counting one replica (it left), or all of them (the store is unreachable)."""
        if replica_id is None:
            for rid in self.remote.replica_ids():
                self.remote.forget(rid)
        else:
            self.remote.forget(replica_id)
        return self._apply_remote(now)

    def local_state(self, replica_id: str, now: float) -> ReplicaState:
        """This replica's own reservations, to publish."""
        return local_state(replica_id, self.backends, self.pools, now)

    def _apply_remote(self, now: float) -> list[Event]:
        events: list[Event] = []
        freed = self.remote.apply(self.backends)
        for pool_name, pool in self.pools.items():
            # Room the others gave back, or their queue heads moved on: ours may go now.
            if pool_name in freed or len(pool.hold):
                events.extend(self._release(pool_name, now))
        return events

    # --- requests --------------------------------------------------------------------------------
    def submit(self, demand: Demand, now: float, exclude: Iterable[str] = ()) -> Decision:
        pool = self.pools.get(demand.pool)
        if pool is None:
            raise SchedulerError(f"unknown pool {demand.pool!r}")
        settings = pool.settings
        header_deadline = demand.deadline_s
        excluded = set(exclude)
        too_long = self._never_servable(pool, demand)
        if too_long is not None:
            pool.rejected_total += 1
            return too_long
        needed = self._needed_tokens(demand)
        candidates = [b for b in self._routable(pool, now) if b.backend_id not in excluded
                      and (demand.only_backends is None or b.backend_id in demand.only_backends)
                      and _can_ever_take(b, needed)]
        if not candidates:
            pool.rejected_total += 1
            return Reject(503, "no healthy backend for this model", settings.retry_after_s)
        ctx = self._ctx(pool, demand, now)
        # The hold timeout bounds the wait for room, not the request's own service: its first token is due that long
        # after it could come on an idle backend, so a request that takes longer than the timeout by itself (a batch
        # of 100,000 embedding inputs) is served rather than refused with a 429 no retry can cure. The deadline
        # header only shortens that, never extends it.
        idle_ttft = getattr(pool.policy, "idle_ttft_s", None)
        idle_s = idle_ttft(demand, candidates, ctx) if idle_ttft is not None else 0.0  # once: used three times
        hold_deadline = now + settings.hold_timeout_s + idle_s
        deadline = hold_deadline if header_deadline is None or header_deadline > hold_deadline else header_deadline
        demand.deadline_s = deadline
        # Fair shedding across prompt sizes (sched/fairness.py): None when the policy sheds by cost.
        fair = getattr(pool.policy, "fair", None)
        if fair is not None:
            fair.on_arrival(demand.prompt_tokens, now)
        # Goodput: the first token is due by the TTFT objective, counted from arrival (sched/admission.py).
        objective = getattr(pool.policy, "ttft_deadline_s", None)
        objective_deadline = (objective(demand, candidates, ctx, idle_s if idle_ttft is not None else None)
                              if objective is not None else None)
        by_objective = False
        if objective_deadline is not None and objective_deadline < deadline:
            by_objective = True
            deadline = demand.deadline_s = objective_deadline
        # Requests already held go first unless this one outranks them: no jumping the queue.
        head_priority = pool.hold.head_priority()
        if (head_priority is None or demand.priority > head_priority) and not (
                len(self.remote) and self.remote.ahead(demand.pool, demand.priority, now)):
            choice = pool.policy.choose(demand, candidates, ctx)
            if choice is not None:
                self._dispatch(choice, demand, pool, now, ctx)
                return Route(choice.backend_id)
            reason = "capacity"
        else:
            reason = "queue-order"
        pool.overload.on_offered(now)
        if len(pool.hold) >= settings.hold_max_requests:
            pool.rejected_total += 1
            return Reject(429, "hold queue is full", pool.retry.retry_after_s(now, settings.retry_after_s))
        # Under a TTFT objective the hold ends when the request could no longer start in time even on the
        # fastest idle backend; under the plain hold timeout (header, or objectives off) it ends at the deadline.
        start_by = deadline
        # When it must leave the queue to be served in time as the backends are loaded now: a request released
        # later is refused at its release (the backends' prefill backlog is the same then), so a drain estimate
        # that only keeps it under the idle-TTFT bound admits requests that are held, then refused (measured: in
        # the DES at 10x, 144 of 206 held requests that expired were refused that way).
        leave_by = deadline
        if by_objective:
            start_by -= idle_s
            loaded_ttft = getattr(pool.policy, "loaded_ttft_s", None)
            leave_by = start_by if loaded_ttft is None else min(start_by, deadline - (
                loaded_ttft(demand, candidates, ctx) * TTFT_MARGIN_FACTOR + TTFT_MARGIN_S))
        if start_by <= now or leave_by <= now:
            # Refused now (429: overloaded, come back later) rather than held only to be served late.
            pool.rejected_total += 1
            return Reject(429, "overloaded: this request cannot start within its time-to-first-token objective",
                          pool.retry.retry_after_s(now, settings.retry_after_s))
        standing = fair.standing(demand.prompt_tokens, now) if fair is not None and by_objective else 0
        if standing > 0 and fair is not None and pool.hold.ahead_count and fair.should_shed(demand.prompt_tokens, now):
            # Its size class is served more than another, whose requests wait: the room goes to them.
            pool.rejected_total += 1
            return Reject(429, "overloaded: shed to keep service fair across request sizes",
                          pool.retry.retry_after_s(now, settings.retry_after_s))
        # An under-served size class goes ahead of the rest of its priority: only those ahead of it count.
        ahead = len(pool.hold) if standing == 0 else pool.hold.count_ahead(demand.priority)
        limit = None
        if by_objective and pool.drain.standing(now):
            head = pool.hold.peek()
            if head is not None and queue_waits(head[1], now, deadline - demand.arrival_s):
                limit = pool.overload.hold_limit(now, getattr(getattr(pool.policy, "settings", None),
                                                              "overload_idle_fraction", 0.0))
        if limit is not None and ahead >= limit and not demand.door_passed:
            # Sustained overload: the queue is as long as it needs to be to keep the backends busy; holding this
            # one too would only make it (and everything behind it) wait, and as many would be refused anyway.
            # (A request the front door passed on under the bound had its place counted there: refusing it now,
            # a lagging loop's half second later, would make its 429 late; the objective's tests below still hold.)
            pool.rejected_total += 1
            return Reject(429, "overloaded: the hold queue is as long as this sustained overload needs",
                          pool.retry.retry_after_s(now, settings.retry_after_s))
        wait_s = pool.drain.wait_s(ahead)
        if len(self.remote):
            # With other replicas, the queue that matters is the fleet's: one replica's share of the releases,
            # measured over a short window, is too noisy to reject on (measured: 92 needless rejections).
            remote_rate = self.remote.pool_release_rate_per_s.get(demand.pool, 0.0)
            if remote_rate > 0:
                ahead += self.remote.pool_held.get(demand.pool, 0)
                wait_s = (ahead + 1) / ((pool.drain.rate_per_s or 0.0) + remote_rate)
        if wait_s is not None and now + wait_s > leave_by:
            # Fail fast: the queue ahead drains too slowly for this request to leave it in time, and
            # holding it would only make everything behind it later too.
            pool.rejected_total += 1
            return Reject(429, f"overloaded: the hold queue would take ~{wait_s:.1f}s, past this request's "
                          "time-to-first-token objective", pool.retry.retry_after_s(now, max(settings.retry_after_s, wait_s)))
        if wait_s is None and by_objective and not len(self.remote) \
                and pool.output_lengths.samples >= FORECAST_MIN_OUTPUTS:
            # No drain measured yet (an onset, or the first moments after a lull): the seats' forecast says how
            # many held requests start in time (sched/admission.py, SeatForecast).
            can_start = self.held_starts_by(demand.pool, leave_by, now, demand.prompt_tokens,
                                            ctx.expected_output_tokens, enough=ahead + 1)
            if ahead >= can_start:
                pool.rejected_total += 1
                return Reject(429, f"overloaded: the backends free ~{can_start} seats for held requests before this "
                              "request's time-to-first-token objective", pool.retry.retry_after_s(
                                  now, settings.retry_after_s))
        if not len(pool.hold):
            pool.drain.on_backlog(now)
        position = pool.hold.push(demand, now, start_by, ahead=standing < 0)
        self._held_pool[demand.request_id] = demand.pool
        pool.held_total += 1
        return Hold(reason=reason, queue_position=position)

    def held_starts_by(self, pool_name: str, horizon_s: float, now: float, prompt_tokens: int,
                       expected_output_tokens: int, enough: int) -> int:
        """How many held requests the pool's seats are forecast to start by `horizon_s` (at most `enough`): the
        forecast's starts, less those taken since it was made (sched/admission.py, SeatForecast)."""
        pool = self.pools[pool_name]
        forecast = pool.forecast
        if forecast is None or not forecast.fresh(now):
            forecast = pool.forecast = self._seat_forecast(pool, pool_name, now, prompt_tokens,
                                                           expected_output_tokens)
        taken = pool.starts_total - forecast.starts_at_build
        return max(0, forecast.starts_by(horizon_s, enough + taken) - taken)

    def pool_model(self, pool: PoolState) -> CapacityModel:
        """A capacity model with the pool's own settings where its policy has them (its TPOT objective, the user's
        or the derived default, caps a backend's batch before its seats run out), else the scheduler's."""
        settings = getattr(pool.policy, "settings", None)
        return CapacityModel(self.health, settings) if isinstance(settings, CapacitySettings) else self.capacity

    def _seat_forecast(self, pool: PoolState, pool_name: str, now: float, prompt_tokens: int,
                       expected_output_tokens: int) -> SeatForecast:
        model = self.pool_model(pool)
        probe = Demand(request_id="seat-forecast", pool=pool_name, prompt_tokens=max(1, prompt_tokens),
                       max_tokens=max(1, expected_output_tokens), arrival_s=now)
        decode_tokens = max(0, expected_output_tokens - 1)
        backends = []
        for b in self._routable(pool, now):
            est = model.estimate(b, probe, expected_output_tokens, now)
            tpot_s = est.tpot_s  # at the batch running now: a request dispatched into a smaller one is slower now
            seats = est.batch_cap
            busy = est.seqs_after - 1
            ends = [now] * max(0, seats - busy)
            running = []
            for r in b.inflight.values():
                first_s = r.first_token_at_s
                if first_s is None:
                    first_s = r.dispatched_at_s + (r.predicted_ttft_s or 0.0)
                end_s = first_s + max(0, r.expected_output_tokens - 1) * tpot_s
                running.append(end_s if end_s > now else now)
            running.sort()
            # More running than seats (requests waiting inside the engine): the first ends free seats for those.
            ends.extend(running[max(0, busy - seats):])
            service_s = model.idle_ttft_s(b, prompt_tokens) + decode_tokens * tpot_s
            # A prefill chunk rides on a decode step of the running batch: its share of that step, and its tokens.
            _, max_batched = CapacityModel._limits(b.spec.profile)
            step = model.base_step(b)
            prefill_s = (prompt_tokens * step.prefill_seconds_per_token * model.ttft_factor(b)
                         + prompt_tokens / max(1, max_batched) * tpot_s)
            backends.append(BackendForecast(ends_s=tuple(ends), service_s=service_s, prefill_s=prefill_s))
        return SeatForecast(built_at_s=now, starts_at_build=pool.starts_total, backends=tuple(backends))

    def on_first_token(self, request_id: str, now: float) -> None:
        found = self._inflight_with_backend(request_id)
        if found is not None:
            state, req = found
            state.set_progress(req, max(1, req.output_tokens), now)

    def on_progress(self, request_id: str, output_tokens: int, now: float) -> None:
        found = self._inflight_with_backend(request_id)
        if found is not None:
            state, req = found
            state.set_progress(req, output_tokens, now)

    def finish(
        self,
        request_id: str,
        now: float,
        *,
        output_tokens: int | None = None,
        prompt_tokens: int | None = None,
        ok: bool = True,
        fault: bool | None = None,
    ) -> list[Event]:
        """The request ended on its backend (complete, failed or aborted): release its accounting.

        `fault`: True when the backend failed it (5xx, timeout, connection), False when the backend answered
        (even a 4xx), None when that says nothing about the backend (the client left): outlier evidence.
        """
        backend_id = self._request_backend.pop(request_id, None)
        if backend_id is None:
            return self.cancel(request_id, now)
        self.prefix.on_finish(request_id)
        state = self.backends.get(backend_id) or self._retired.get(backend_id)
        if state is None:
            return []
        req = state.inflight.get(request_id)
        if req is None:
            return []
        if output_tokens is not None:
            # Not a first token: an answer with none seen before its end was not streamed (or streamed nothing
            # until then), and its end says nothing about when its first token came. Marking it then taught the
            # TTFT correction whole answers' durations (up to 20x) from non-streamed traffic.
            state.set_progress(req, output_tokens, now, mark_first_token=False)
        state.remove_inflight(request_id, now)
        if state.gpu_siblings:
            self.capacity.refresh_shared(state, now)
        if output_tokens is not None:
            req.output_tokens = output_tokens
        if prompt_tokens is not None:
            req.prompt_tokens = prompt_tokens
        pool = self.pools.get(state.spec.pool)
        if fault is True and not req.overdue:  # an overdue request was counted when its timer ran out
            self._outlier_failure(state, now, "request failed")
        elif fault is False:
            self.outlier.on_success(backend_id, now)
        if ok:
            state.completed += 1
            self._record_costs(state, req, now)
            if pool is not None:
                pool.output_lengths.observe(req.output_tokens)
        else:
            state.failed += 1
        if backend_id in self._retired and not state.inflight:
            del self._retired[backend_id]
        return self._release(state.spec.pool, now) if pool is not None else []

    def cancel(self, request_id: str, now: float) -> list[Event]:
        """The client went away. A held request leaves the queue; one in flight is released."""
        pool_name = self._held_pool.pop(request_id, None)
        if pool_name is not None:
            pool = self.pools.get(pool_name)
            if pool is not None:
                pool.hold.remove(request_id)
            return []
        if request_id in self._request_backend:
            return self.finish(request_id, now, ok=False)
        return []

    def tick(self, now: float) -> list[Event]:
        """Expire held requests past their deadline, and retry the queues (snapshots may have aged)."""
        events: list[Event] = []
        if len(self.remote) and self.remote.expire(now):
            events.extend(self._apply_remote(now))
        for name, pool in self.pools.items():
            for demand, _held_at in pool.hold.expired(now):
                self._held_pool.pop(demand.request_id, None)
                pool.expired_total += 1
                events.append(Expire(demand.request_id, 429, "overloaded: held past its deadline with no backend "
                                     "free", pool.retry.retry_after_s(now, pool.settings.retry_after_s)))
            if len(pool.hold):
                events.extend(self._release(name, now))
        return events

    def next_wakeup_s(self) -> float | None:
        deadlines = [d for p in self.pools.values() if (d := p.hold.next_deadline_s()) is not None]
        return min(deadlines) if deadlines else None

    def check_first_tokens(self, now: float) -> list[Event]:
        """Requests whose first token (a plain response: whole answer) is overdue count against their backend
        now: as a slow observation for calibration, so a hung engine looks slow at once although nothing ever
        completes there, and as one failure for outlier ejection. The live driver calls this at
        `next_first_token_due_s`; a simulation whose engines cannot hang need not."""
        due = self._first_token_due
        while due and due[0][0] <= now:
            _, request_id = heapq.heappop(due)
            found = self._inflight_with_backend(request_id)
            if found is None:
                continue
            state, req = found
            if req.first_token_at_s is not None or req.overdue:
                continue
            req.overdue = True
            self._overdue.append(request_id)
            self.capacity.record_overdue(state, req, now)
            if state.backend_id in self.backends:
                self._outlier_failure(state, now, "no first token in time")
        return []

    def take_overdue(self) -> list[str]:
        """The requests `check_first_tokens` found overdue since the last call."""
        taken, self._overdue = self._overdue, []
        return taken

    def next_first_token_due_s(self) -> float | None:
        due = self._first_token_due
        while due and due[0][1] not in self._request_backend:
            heapq.heappop(due)  # finished in time: nothing to check
        return due[0][0] if due else None

    # --- views ---------------------------------------------------------------------------------
    def expected_output_tokens(self, pool_name: str, max_tokens: int) -> int:
        return self.pools[pool_name].output_lengths.expected(max_tokens)

    def held_count(self, pool_name: str | None = None) -> int:
        if pool_name is not None:
            return len(self.pools[pool_name].hold)
        return sum(len(p.hold) for p in self.pools.values())

    def is_held(self, request_id: str) -> bool:
        return request_id in self._held_pool

    def backend_of(self, request_id: str) -> str | None:
        return self._request_backend.get(request_id)

    def routable_backends(self, pool_name: str) -> list[BackendState]:
        return self._routable(self.pools[pool_name])

    def describe(self, now: float) -> dict[str, Any]:
        """Live state for /admin/backends: health, snapshot age, load, predicted vs observed costs."""
        out: dict[str, Any] = {"pools": {}, "backends": {}}
        for name, pool in self.pools.items():
            out["pools"][name] = {
                "policy": pool.settings.policy,
                "backends": list(pool.backend_ids),
                "held": len(pool.hold),
                "held_total": pool.held_total,
                "rejected_total": pool.rejected_total,
                "expired_total": pool.expired_total,
                "expected_output_tokens": pool.output_lengths.mean_output_tokens,
                # Requests asking to join the queue per one it released, lately; the queue length it allows.
                "overload": {"ratio": pool.overload.current(now), "bulk": round(pool.overload.bulk, 2),
                             "hold_limit": pool.overload.hold_limit(now, getattr(
                                 getattr(pool.policy, "settings", None), "overload_idle_fraction", 0.0))},
            }
            fair = getattr(pool.policy, "fair", None)
            if fair is not None:  # share of each prompt-size class started lately (sched/fairness.py)
                out["pools"][name]["fair_service_by_prompt_tokens"] = fair.describe(now)
        for backend_id, b in self.backends.items():
            snap = b.snapshot
            out["backends"][backend_id] = {
                "pool": b.spec.pool,
                "url": b.spec.url,
                "engine": b.spec.engine,
                "profile": b.spec.profile.name if b.spec.profile else None,
                "gpu_group": b.spec.gpu_group,
                "shares_gpu_with": [s.backend_id for s in b.gpu_siblings],
                # Learned: how much its busy siblings' steps slow it (sched/interference.py); 1.0 is sum-of-steps.
                "interference": {"factor": round(b.interference.factor, 3), "observations": b.interference.count}
                if b.gpu_siblings else None,
                "health": b.health.value,
                "outlier": self.outlier.describe(backend_id, now),
                "draining": b.draining,
                "last_failure": b.last_failure_reason or None,
                "snapshot_age_s": None if snap is None else round(now - snap.taken_at_s, 3),
                "snapshot_stale": not b.snapshot_is_fresh(now, self.health),
                "snapshot": None if snap is None else {
                    "running": snap.running, "waiting": snap.waiting,
                    "kv_usage_fraction": snap.kv_usage_fraction, "kv_capacity_tokens": snap.kv_capacity_tokens,
                    "preemptions_total": snap.preemptions_total,
                },
                "inflight": len(b.inflight),
                "remote_inflight": b.remote_requests,
                "requests_estimate": b.requests_estimate(now, self.health),
                "kv_used_estimate_tokens": b.kv_used_estimate(now, self.health),
                "completed": b.completed,
                "failed": b.failed,
                "ttft_seconds": {"predicted": b.predicted_ttft_s.value, "observed": b.observed_ttft_s.value},
                "tpot_seconds": {"predicted": b.predicted_tpot_s.value, "observed": b.observed_tpot_s.value},
                "prefix_index": self.prefix.describe(backend_id),
            }
        return out

    # --- internals -----------------------------------------------------------------------------
    def _backend(self, backend_id: str) -> BackendState:
        try:
            return self.backends[backend_id]
        except KeyError:
            raise SchedulerError(f"unknown backend {backend_id!r}") from None

    def _inflight_with_backend(self, request_id: str) -> tuple[BackendState, InflightRequest] | None:
        backend_id = self._request_backend.get(request_id)
        if backend_id is None:
            return None
        state = self.backends.get(backend_id) or self._retired.get(backend_id)
        if state is None:
            return None
        req = state.inflight.get(request_id)
        return (state, req) if req is not None else None

    def _routable(self, pool: PoolState, now: float | None = None) -> list[BackendState]:
        routable = [b for bid in pool.backend_ids if (b := self.backends[bid]).routable()]
        if now is None or not self.outlier.records:
            return routable
        outlier = self.outlier
        kept = [b for b in routable if not outlier.blocks(b.backend_id, now, len(b.inflight))]
        # Never eject the whole pool (the rest may be down by health polls): then every one is a candidate.
        return kept if kept else routable

    def _ctx(self, pool: PoolState, demand: Demand, now: float) -> PolicyContext:
        return PolicyContext(now=now, health=self.health,
                             expected_output_tokens=pool.output_lengths.expected(demand.max_tokens)
                             if demand.api != "embeddings" else 0,
                             capacity=self.capacity,
                             prefix=self.prefix if self.prefix.settings.enabled else None)

    def _dispatch(self, backend: BackendState, demand: Demand, pool: PoolState, now: float,
                  ctx: PolicyContext | None = None) -> None:
        prediction = ctx.prediction if ctx is not None else None
        if ctx is not None and prediction is not None and prediction[0] is backend:
            # The policy evaluated this backend for this demand just now, as `capacity.estimate` would.
            (ttft_s, tpot_s, e2e_s), cached, shared = prediction[1], prediction[2], prediction[3]
            expected = ctx.expected_output_tokens
        else:
            expected = 0 if demand.api == "embeddings" else pool.output_lengths.expected(demand.max_tokens)
            cached, shared = self.capacity.cached_tokens(backend, demand)
            estimate = self.capacity.estimate(backend, demand, expected, now)
            ttft_s, tpot_s, e2e_s = estimate.ttft_s, estimate.tpot_s, estimate.e2e_s
        req = InflightRequest(
            request_id=demand.request_id,
            backend_id=backend.backend_id,
            prompt_tokens=demand.prompt_tokens,
            max_tokens=demand.max_tokens,
            expected_output_tokens=expected,
            dispatched_at_s=now,
        )
        req.cached_prompt_tokens, req.shared_kv_tokens = cached, shared
        req.predicted_ttft_s = ttft_s
        req.predicted_tpot_s = tpot_s
        req.predicted_ttft_base_s = self.capacity.base_ttft_s(ttft_s, backend)
        self._index_dispatch(backend, demand, cached, now)
        backend.add_inflight(req)
        self._request_backend[demand.request_id] = backend.backend_id
        if backend.gpu_siblings:
            self.capacity.refresh_shared(backend, now)
        # A stream must show its first token within a few predicted TTFTs; a plain response (no first token
        # is seen before the end) its whole answer within a few predicted end-to-end times.
        o = self.outlier.settings
        timeout_s = (o.first_token_timeout_s(ttft_s) if demand.stream
                     else max(o.first_token_timeout_min_s, o.first_token_timeout_factor * e2e_s))
        heapq.heappush(self._first_token_due, (now + timeout_s, demand.request_id))
        fair = getattr(pool.policy, "fair", None)
        if fair is not None:
            fair.on_start(demand.prompt_tokens, now)
        pool.retry.on_start(now)
        pool.starts_total += 1

    def _index_dispatch(self, backend: BackendState, demand: Demand, cached_tokens: int, now: float) -> None:
        """The prompt's blocks are on `backend` now. Its cache holds what its KV can keep besides the KV that
        is not prompt prefix (generated tokens, other clients' requests): the index forgets the rest."""
        if not self.prefix.settings.enabled:
            return
        capacity_blocks = None
        kv_capacity = backend.kv_capacity_tokens()
        if kv_capacity is not None:
            _seqs, kv_used = backend.load_view(now, self.health)
            not_prefix = kv_used - backend.own_kv_tokens  # other clients' KV (our outputs are small)
            capacity_tokens = kv_capacity - (not_prefix if not_prefix > 0 else 0)
            capacity_blocks = capacity_tokens // max(1, demand.prefix.block_tokens)
        self.prefix.on_dispatch(demand.request_id, backend.backend_id, demand.prefix.hashes, demand.prompt_tokens,
                                demand.session_id, cached_tokens, capacity_blocks)

    def _release(self, pool_name: str, now: float) -> list[Event]:
        """Dispatch held requests, head first, while the policy finds them a backend."""
        events = self._release_pass(pool_name, now)
        released = sum(1 for e in events if type(e) is Dispatch)
        if released:  # one lump of freed room (sched/admission.py: OverloadRatio.bulk)
            self.pools[pool_name].overload.on_released(released, now)
        return events

    def _release_pass(self, pool_name: str, now: float) -> list[Event]:
        pool = self.pools.get(pool_name)
        if pool is None:
            return []
        if not len(pool.hold):
            pool.drain.on_empty(now)
            return []
        events: list[Event] = []
        candidates = self._routable(pool, now)
        if not candidates:
            return self._expire_if_unservable(pool_name, now)
        unservable = getattr(pool.policy, "unservable", None)
        while True:
            head = pool.hold.peek()
            if head is None:
                break
            demand, held_at = head
            if len(self.remote) and self.remote.ahead(pool_name, demand.priority, held_at):
                break  # another replica's older request goes first (one queue order across replicas)
            ctx = self._ctx(pool, demand, now)
            ctx.wait_for_prefix = True
            allowed = self._able(candidates, demand)
            choice = pool.policy.choose(demand, allowed, ctx) if allowed else None
            if choice is None and ctx.waiting_for is not None:
                # The head waits for its prefix's backend: the requests behind it may still take the room.
                events.extend(self._release_behind(pool, candidates, now))
                break
            if choice is None:
                if not allowed or (unservable is not None and unservable(demand, allowed, ctx)):
                    # Nothing can start it before its deadline: answer now rather than block the queue.
                    pool.hold.pop()
                    events.append(self._expire(demand, now, 429, "overloaded: cannot start before its deadline",
                                               pool.settings, pool.retry.retry_after_s(now, pool.settings.retry_after_s)))
                    continue
                if len(allowed) < len(candidates):
                    # Only some backends can ever take the head (its prompt is beyond the others' max length): it
                    # waits for those alone, which stay reserved for it (it keeps its place), and the requests
                    # behind it may take the rest (issue 14: no head-of-line blocking).
                    reserved = {b.backend_id for b in allowed}
                    events.extend(self._release_behind(
                        pool, [b for b in candidates if b.backend_id not in reserved], now))
                break
            pool.hold.pop()
            self._held_pool.pop(demand.request_id, None)
            self._dispatch(choice, demand, pool, now, ctx)
            pool.drain.on_release(now)
            events.append(Dispatch(demand.request_id, choice.backend_id, now - held_at))
        if not len(pool.hold):  # emptied now: a backlog that forms again soon resumes (sched/admission.py)
            pool.drain.on_empty(now)
        return events

    def _release_behind(self, pool: PoolState, candidates: list[BackendState], now: float) -> list[Event]:
        """Past a head that waits for the backend holding its prefix (sched/prefix_wait.py): release the next
        few held requests, in queue order, that can go now, skipping those that wait too; stop at the first that
        finds no room at all (queue order holds for the rest)."""
        events: list[Event] = []
        for demand, held_at in pool.hold.first(RELEASE_LOOKAHEAD)[1:]:
            if len(self.remote) and self.remote.ahead(demand.pool, demand.priority, held_at):
                break
            ctx = self._ctx(pool, demand, now)
            ctx.wait_for_prefix = True
            allowed = self._able(candidates, demand)
            choice = pool.policy.choose(demand, allowed, ctx) if allowed else None
            if choice is None:
                if ctx.waiting_for is not None:
                    continue
                break
            pool.hold.remove(demand.request_id)
            self._held_pool.pop(demand.request_id, None)
            self._dispatch(choice, demand, pool, now, ctx)
            pool.drain.on_release(now)
            events.append(Dispatch(demand.request_id, choice.backend_id, now - held_at))
        return events

    def _expire_if_unservable(self, pool_name: str, now: float) -> list[Event]:
        """With no routable backend left, held requests are answered at once rather than left to hang."""
        pool = self.pools.get(pool_name)
        if pool is None or self._routable(pool) or not len(pool.hold):
            return []
        return [self._expire(d, now, 503, "no healthy backend for this model", pool.settings)
                for d, _ in pool.hold.drain_all()]

    def _expire(self, demand: Demand, now: float, status: int, reason: str, settings: PoolSettings,
                retry_after_s: float | None = None) -> Expire:
        self._held_pool.pop(demand.request_id, None)
        pool = self.pools.get(demand.pool)
        if pool is not None:
            pool.expired_total += 1
        return Expire(demand.request_id, status, reason,
                      settings.retry_after_s if retry_after_s is None else retry_after_s)

    def _retire(self, backend_id: str) -> None:
        state = self.backends.pop(backend_id, None)
        if state is None:
            return
        pool = self.pools.get(state.spec.pool)
        if pool is not None and backend_id in pool.backend_ids:
            pool.backend_ids.remove(backend_id)
        if state.inflight:
            self._retired[backend_id] = state
        self.prefix.remove_backend(backend_id)
        self.outlier.forget(backend_id)
        self._link_gpu_groups()

    def _link_gpu_groups(self) -> None:
        """Give every backend the list of the others on its GPU (any pool: two models may share a card)."""
        groups: dict[str, list[BackendState]] = {}
        for state in self.backends.values():
            state.gpu_siblings = []
            if state.spec.gpu_group is not None:
                groups.setdefault(state.spec.gpu_group, []).append(state)
        for members in groups.values():
            for state in members:
                state.gpu_siblings = [m for m in members if m is not state]

    def _outlier_failure(self, state: BackendState, now: float, reason: str) -> None:
        pool = self.pools.get(state.spec.pool)
        if pool is None:
            return
        self.outlier.on_failure(state.backend_id, now, pool.backend_ids, reason)

    def _never_servable(self, pool: PoolState, demand: Demand) -> Reject | None:
        """400 at once for a request longer than every backend of its pool can ever hold (max model length or
        KV capacity): holding it would only block the queue until a backend is idle, and then the engine says
        no anyway. Estimated prompt sizes get a margin, so an estimate never refuses what would have fitted."""
        needed = self._needed_tokens(demand)
        if needed is None:
            return None
        longest = 0
        for bid in pool.backend_ids:
            limit = self.backends[bid].max_request_tokens()
            if limit is None or needed <= limit:
                return None
            longest = max(longest, limit)
        if not pool.backend_ids:
            return None
        return Reject(400, f"this model's maximum context length is {longest} tokens; the request needs about "
                      f"{needed} ({demand.prompt_tokens} in the prompt, max_tokens {demand.max_tokens})",
                      0.0, code="context_length_exceeded")

    @staticmethod
    def _needed_tokens(demand: Demand) -> int | None:
        """Tokens of context one sequence of `demand` needs at the least (None: no limit applies). Estimated
        prompt sizes get a 20% margin, so an estimate never refuses what would have fitted."""
        if demand.api == "embeddings":
            return None
        prompt = demand.prompt_tokens if demand.prompt_tokens_exact else int(demand.prompt_tokens * 0.8)
        # One sequence of an n > 1 request is what must fit in the context.
        return prompt + (demand.max_tokens // max(1, demand.sequences) if demand.max_tokens_explicit else 1)

    def _able(self, candidates: list[BackendState], demand: Demand) -> list[BackendState]:
        """The candidates `demand` may use (its pinned backends) and that can ever take it (max length, KV)."""
        needed = self._needed_tokens(demand)
        return [b for b in candidates if (demand.only_backends is None or b.backend_id in demand.only_backends)
                and _can_ever_take(b, needed)]

    def _record_costs(self, state: BackendState, req: InflightRequest, now: float) -> None:
        self.capacity.record_completion(state, req, now)
