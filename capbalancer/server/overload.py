"""Refusal at arrival under overload: what the front door needs to answer 429 without the event loop (issue 14).

Under a 10x overload the event loop is the bottleneck: a request waits in its socket buffer until the loop gets
round to it. Measured on bench/overload.py (3,000 connections, uvloop): the scheduler refused 7,506 requests
the moment it saw them, yet the clients got those 429s after p50 4.3 s, all of it spent waiting for the loop
(and every refusal the loop parses makes that wait longer). So the refusal must happen where the request
arrives: the front-door thread (server/frontdoor.py). The thread cannot run the scheduler (single-threaded,
pure, mutated by the loop), so it relies on the scheduler's latest verdict:

- every time the scheduler decides on a newly arrived request, the loop records it (`on_decision`): a refusal
  (429: it cannot start within its TTFT objective, or the queue is full) starts or extends a streak, unless the
  request set its own deadline (a refusal of that deadline says nothing of the pool); anything
  else (routed or held) ends it, except a Hold that filled the queue to its standing-overload bound (the next
  newcomer is refused then too);
- the door refuses a new API request with 429 + Retry-After only while, in every pool, a streak is under
  `STREAK_FRESH_S` old, the request is no smaller than the smallest one refused in that streak, and it has
  already handed the loop one request for each piece of room freed since the streak's last refusal (each
  completion, failure or cancel on a backend of the pool, each fresher metrics snapshot or health change).
  The scheduler's state is then what refused those requests, less room that the requests passed on since will
  claim first, so it would refuse this one too: every freed seat still sends a request to the scheduler, which
  decides exactly;
- requests that may outrank the queue (a priority header) or bring their own deadline (a deadline header, longer
  or shorter than the pool's objective), whose size is unknown (no Content-Length), or whose
  prompt may be long enough for a longer objective than the floor (`PoolView`) are always left to the loop.

The door also refuses what the hold queue would refuse for its length (`QueueView`): the loop publishes each
pool's queue (length, the standing-overload bound of sched/admission.py, the hold limit) every PUBLISH_EVERY_S,
and the door counts the requests it passed on since and the room freed since. A newcomer of the default
priority meets the queue (it cannot go ahead of held requests), so while the queue, counted that way, stands at
its bound, the scheduler would refuse it for that alone. Measured before this rule (bench/overload.py, 3,000
connections): 7,500 of 7,750 refusals were made by the scheduler, 0.3-0.8 s after arrival (the loop's lag), 260
by the door in 8 ms. The door's refusals count as offered load in the pool's overload ratio (they are demand
the queue did not take; left out, the ratio read ~1.2 under a 3x overload and the bound grew to hundreds).
Before the loop has published a queue (an onset burst), the door passes at most what the queue and the
backends' free seats can take; before a drain rate is
measured, at most what the seats' forecast (sched/admission.py) starts within the objective.

While a pool refuses, the loop's successful answers close their connection (`congested`), so that keep-alive
clients' next requests come through the door rather than past it. The loop's lag (how late its timers fire)
is measured and shown in /admin/backends: the wait that nobody inside the loop can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from capbalancer.sched.admission import FORECAST_MIN_OUTPUTS, queue_waits
from capbalancer.sched.capacity import CapacityModel
from capbalancer.sched.headroom import DEFAULT_PROMPT_TOKENS, pool_headroom
from capbalancer.sched.retry_spread import next_slot
from capbalancer.sched.scheduler import PoolState, Scheduler
from capbalancer.sched.types import Decision, Hold, Reject

PUBLISH_EVERY_S = 0.01  # how often the loop measures its lag and looks for fresher snapshots/health
LAG_WINDOW_S = 0.5  # the lag shown is the largest seen over about this long
STREAK_FRESH_S = 0.25  # a verdict older than this is not trusted: the next request goes to the scheduler
FREE_SEATS_EVERY_S = 0.1  # how often the free seats of a pool with no queue are re-estimated
CONGESTED_HOLD_S = 5.0  # answers close their connection this long after the queue last stood at its bound: overload
# comes in waves (refused clients return at their Retry-After), and an answer that starts in a lull is followed
# by its client's next request in the next wave (1 s left 1,900 kept-alive requests to the scheduler)
# A body of n bytes is taken as up to 2n + 256 prompt tokens: a token is at least one byte of text, the proxy's
# character-based estimate may run high, and a chat template adds tokens. Larger is safer (a later refusal).
PROMPT_TOKENS_PER_BYTE = 2
PROMPT_TOKEN_MARGIN = 256


@dataclass(frozen=True, slots=True)
class Streak:
    """The scheduler refused every newly arrived request of a pool since `since_s` (immutable: replaced)."""

    since_s: float
    last_s: float
    freed: int  # `OverloadGate.freed()` at the last refusal: room freed since breaks the streak
    min_body_bytes: int
    retry_after_s: float
    count: int


@dataclass(frozen=True, slots=True)
class PoolView:
    """What bounds a pool's TTFT objective (immutable: the loop replaces it, the door reads it whole)."""

    slo_s: float | None  # a configured objective
    floor_s: float  # derived objective: max(floor, factor x idle TTFT)
    factor: float  # 0: no derived objective (held until the hold timeout: never refused at the door)
    # Per routable backend (fixed, per-token): idle TTFT of an n-token prompt <= fixed + per_token x n.
    idle_bounds: tuple[tuple[float, float], ...]

    @property
    def objective_s(self) -> float:
        """The objective a request of the pool's common size is judged by: the configured one, else the floor."""
        return self.slo_s if self.slo_s is not None else self.floor_s

    def floor_bound(self, prompt_tokens: int) -> bool:
        """True when no request of at most `prompt_tokens` has an objective longer than the pool's common one
        (the floor, or the configured objective): such requests are alike enough to be judged by a streak."""
        if self.slo_s is not None:
            return True
        if self.factor <= 0 or not self.idle_bounds:
            return False
        # The slowest backend's bound: the scheduler takes the fastest candidate it may use (outliers ejected,
        # pinned backends), so any one of them bounds that from above.
        idle = max(fixed + per_token * prompt_tokens for fixed, per_token in self.idle_bounds)
        return self.factor * idle <= self.floor_s


LATE = "overloaded: this request cannot start within its time-to-first-token objective; retry later"
QUEUE_AT_BOUND = "overloaded: the hold queue is as long as this sustained overload needs; retry later"
QUEUE_FULL = "overloaded: the hold queue is full; retry later"


@dataclass(frozen=True, slots=True)
class DoorRefusal:
    """What the door answers a request it refuses: 429 with this message and Retry-After."""

    retry_after_s: float
    message: str


class HeadFields(NamedTuple):
    """What the door reads from a request's head (`head_fields`)."""

    end: int  # where the head's blank line starts
    content_length: int | None  # None: no Content-Length header
    chunked: bool  # a Transfer-Encoding header
    # An x-capbalancer-priority or x-capbalancer-deadline-ms header: the request brings its own terms (it may
    # outrank the queue, or wait longer or shorter than the pool's objective), so the scheduler judges it.
    own_terms: bool


def head_fields(head: bytes) -> HeadFields | None:
    """The framing headers of the request that starts `head` (the door's peek); None while its head is not all
    there, or when its Content-Length is not a number."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = None
    chunked = own_terms = False
    for line in head[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        low = name.strip().lower()
        if low == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
        elif low == b"transfer-encoding":
            chunked = True
        elif low in (b"x-capbalancer-priority", b"x-capbalancer-deadline-ms"):
            own_terms = True
    return HeadFields(end, length, chunked, own_terms)


@dataclass(frozen=True, slots=True)
class QueueView:
    """A pool's hold queue as the loop last published it: what a newcomer of the default priority meets there
    (immutable: the loop replaces it, the door reads it whole)."""

    held: int  # requests in the queue when published (the door reads the live length)
    hold_max: int  # `hold.max_requests`: a queue this long refuses everyone
    # The pool's `overload_idle_fraction` when its standing-overload bound (sched/admission.py) may apply (held
    # under an objective shorter than the hold timeout), else None. The bound and whether the queue stands are
    # read live: the loop publishes once per iteration, and under a 300 ms lag a published "not standing yet"
    # passed on hundreds that the scheduler then refused for the queue's length.
    idle_fraction: float | None
    # The pool's common TTFT objective under the same condition (else None): the scheduler refuses a newcomer the
    # queue ahead would keep past it at the measured drain rate (read live), so the queue takes at most that many.
    objective_s: float | None
    free_seats: int  # typical requests the routable backends could start at once (capacity model), with no queue
    head_held_at_s: float | None  # when the queue's head was held (None: no queue): whether requests wait in it
    fair_exempt: bool  # a size class is under-served: its requests skip the queue, so the scheduler judges
    start_rate_per_s: float  # the pool's start rate: refusals' Retry-After are spread at it (sched/retry_spread.py)
    least_retry_after_s: float  # the pool's configured Retry-After
    # Until a drain rate is measured: the held requests the seats are forecast to start within the objective
    # (sched/admission.py SeatForecast), as of the publication; None: no forecast (or a rate is measured).
    forecast_limit: int | None = None
    # The door's count of requests passed on, and of those in transit, at the publication: the free seats were
    # counted then, so every request passed on since (sent to a backend since, or not) meets them first.
    passed_at: int = 0
    transit_at: int = 0

    def bound(self, pool: PoolState, now: float) -> int | None:
        """The pool's standing-overload bound if it applies at `now` (when the scheduler will judge the request:
        the door's clock plus the loop's lag)."""
        if self.idle_fraction is None or self.objective_s is None:
            return None
        if not pool.drain.standing(now) or not queue_waits(self.head_held_at_s, now, self.objective_s):
            return None
        return pool.overload.last_hold_limit(self.idle_fraction)

    def drain_limit(self, pool: PoolState, now: float) -> int | None:
        """The longest queue the measured drain rate clears within the objective (None: no rate or objective).
        The scheduler's own test is stricter (it leaves room for the loaded TTFT): this never refuses more."""
        rate = pool.drain.current_rate_per_s(now)
        if self.objective_s is None:
            return None
        if rate is None:
            # No drain measured yet (an onset, a lull just over): the seats' forecast, which the scheduler applies
            # too (and more strictly: by when each request must leave the queue, not by its objective).
            return self.forecast_limit
        if rate <= 0:
            return None
        return math.ceil(rate * self.objective_s)

    def limit(self, bound: int | None, held: int) -> int:
        """Newcomers the queue takes in all, counting the `held` ones: the `bound` (None: none applies to this
        request), the hold limit for everyone; with no queue, every free seat may take one at once too."""
        limit = self.hold_max if bound is None else min(self.hold_max, bound)
        return limit + (self.free_seats if held == 0 else 0)


class OverloadGate:
    """Recorded by the loop (`on_decision`, `publish`), read by the front-door thread (`judge_head`)."""

    def __init__(self, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.clock = clock  # the scheduler's clock (the driver's: monotonic); tests give theirs
        self.lag_s = 0.0
        self.streaks: dict[str, Streak] = {}  # replaced whole (copy on write): the door reads it unlocked
        self.views: dict[str, PoolView] = {}
        self.queues: dict[str, QueueView] = {}  # replaced whole by `publish`
        self.shed = 0  # requests the door refused on a streak or for the queue's length (tests, the bench)
        self.shed_for_queue = 0  # of which for the queue's length
        self._shed_counted = 0  # `shed` already told to the pools' overload ratios (loop)
        # Requests the door judged and passed on (door only), and of those the ones the loop has read (loop only):
        # the difference is in transit, in no queue yet. A handed connection is adopted an iteration or more later
        # and read after that; counting only the passes of the last two publications (as before) forgot those the
        # loop, lagging, read three or more iterations later, and the door let too many through.
        self.passed_total = 0
        self.read_total = 0
        self._congested_until_s: dict[str, float] = {}  # loop: pool -> end of its overload episode (sticky)
        self._free_seats_at: dict[str, tuple[float, int]] = {}  # loop: pool -> (when, free seats then)
        self._retry_slot_s: dict[str, float] = {}  # door only: pool -> next free Retry-After slot (monotonic)
        self._lags: list[tuple[float, float]] = []
        self._signature: tuple[object, ...] = ()
        self._changes = 0  # fresher snapshots and health changes seen (loop), counted as freed room
        self._passed: dict[str, tuple[int, int]] = {}  # door only: pool -> (id of its streak, requests passed)
        self._task: asyncio.Task[None] | None = None

    # --- on the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.publish()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="overload-gate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(PUBLISH_EVERY_S)
            now = time.monotonic()
            self.note_lag(max(0.0, now - asked - PUBLISH_EVERY_S), now)
            self.publish()

    def note_lag(self, lag_s: float, now: float) -> None:
        lags = self._lags
        lags.append((now, lag_s))
        while lags and lags[0][0] < now - LAG_WINDOW_S:
            lags.pop(0)
        self.lag_s = max(v for _, v in lags)

    def on_decision(self, pool: str, decision: Decision, body_bytes: int, now: float,
                    own_deadline: bool = False) -> None:
        """The scheduler's verdict on a newly arrived request of `pool` (not a retry). `own_deadline`: the request
        set its own deadline (x-capbalancer-deadline-ms), so a refusal says only that this deadline was too short,
        nothing of the pool: it neither starts nor extends a streak (a client sending 1-ms deadlines would
        otherwise have the door refuse everyone else)."""
        streaks = self.streaks
        if isinstance(decision, Reject) and decision.status == 429:
            if own_deadline:
                return
            prev = streaks.get(pool)
            fresh = prev is not None and now - prev.last_s < STREAK_FRESH_S
            self.streaks = {**streaks, pool: Streak(
                since_s=prev.since_s if fresh and prev else now, last_s=now, freed=self.freed(pool),
                min_body_bytes=min(prev.min_body_bytes, body_bytes) if fresh and prev else body_bytes,
                retry_after_s=decision.retry_after_s, count=prev.count + 1 if fresh and prev else 1)}
        elif pool in streaks and not self._filled_to_bound(pool, decision, now):
            self.streaks = {k: v for k, v in streaks.items() if k != pool}

    def _filled_to_bound(self, pool: str, decision: Decision, now: float) -> bool:
        """A Hold that filled the queue to its standing-overload bound (sched/admission.py): the scheduler refuses
        the next newcomer as it refused those before, unless room is freed first, and freed room lets a request
        through anyway. So it does not end the streak: ending it sent every request to the loop until the next
        refusal was recorded there, a loop-lag later (measured: 956 of ~8,000 refusals made at the door)."""
        if not isinstance(decision, Hold):
            return False
        state = self.scheduler.pools.get(pool)
        if state is None:
            return False
        fraction = getattr(getattr(state.policy, "settings", None), "overload_idle_fraction", 0.0)
        limit = state.overload.last_hold_limit(fraction)
        # The bound applies only to a queue that has stood and in which requests wait (sched/admission.py); `now`
        # is the scheduler's clock too (time.monotonic, through the driver).
        if limit is None or len(state.hold) < limit or not state.drain.standing(now):
            return False
        view, head = self.views.get(pool), state.hold.peek()
        return view is not None and head is not None and queue_waits(head[1], now, view.objective_s)

    def publish(self) -> None:
        """Each pool's objective bounds; and a fresher snapshot or a health change counts as freed room (the
        engine may run fewer requests than the proxy's accounting said: one request goes to the scheduler)."""
        sched = self.scheduler
        signature = tuple((bid, id(b.snapshot), b.routable()) for bid, b in sched.backends.items())
        if signature != self._signature:
            self._signature = signature
            self._changes += 1
        model = sched.capacity
        views = {}
        for name, pool in sched.pools.items():
            settings = getattr(pool.policy, "settings", None)
            if settings is None or not hasattr(settings, "ttft_objective_factor"):
                continue  # not capacity: no objective, never refused at the door
            bounds = []
            for b in sched.routable_backends(name):
                step = model.base_step(b)
                _, max_batched = CapacityModel._limits(b.spec.profile)
                # Calibration may be off in the policy (factor 1): the larger of the two bounds both.
                k = max(1.0, model.ttft_factor(b))
                # idle(n) = k (n p + ceil(n / M) f) <= k f + n k (p + f / M)
                bounds.append((k * step.fixed_seconds,
                               k * (step.prefill_seconds_per_token + step.fixed_seconds / max(1, max_batched))))
            views[name] = PoolView(slo_s=settings.ttft_slo_s, floor_s=settings.ttft_objective_floor_s,
                                   factor=settings.ttft_objective_factor, idle_bounds=tuple(bounds))
        self.views = views
        self._publish_queues(self.clock())

    def _publish_queues(self, now: float) -> None:
        """Each pool's QueueView; and the door's refusals since the last call, counted as offered load."""
        sched = self.scheduler
        shed = self.shed
        refused, self._shed_counted = shed - self._shed_counted, shed
        pools = sched.pools
        queues = {}
        for name, pool in pools.items():
            if refused > 0:
                # The door cannot tell a request's pool; it refuses only while every pool would: share them out.
                pool.overload.on_offered(now, refused / len(pools))
            settings = getattr(pool.policy, "settings", None)
            view = self.views.get(name)
            idle_fraction = objective = None
            if view is not None and settings is not None and view.objective_s < pool.settings.hold_timeout_s:
                # Held under the objective: the bound applies.
                idle_fraction = getattr(settings, "overload_idle_fraction", 0.0)
                objective = view.objective_s
            free = self._free_seats(name, now) if not len(pool.hold) else 0
            forecast = None
            # Only where no seat is free (else the door passes one per free seat and a forecast would be long).
            if objective is not None and (len(pool.hold) or not free) and pool.drain.rate_per_s is None \
                    and not len(sched.remote) and pool.output_lengths.samples >= FORECAST_MIN_OUTPUTS:
                expected = pool.output_lengths.expected(pool.settings.default_max_tokens)
                forecast = sched.held_starts_by(name, now + objective, now, DEFAULT_PROMPT_TOKENS, expected,
                                                enough=pool.settings.hold_max_requests)
            fair = getattr(pool.policy, "fair", None)
            queue = QueueView(
                passed_at=self.passed_total, transit_at=self.in_transit,
                held=len(pool.hold), hold_max=pool.settings.hold_max_requests, idle_fraction=idle_fraction,
                objective_s=objective, head_held_at_s=head[1] if (head := pool.hold.peek()) is not None else None,
                free_seats=free,
                fair_exempt=fair is not None and fair.any_under_served(now),
                start_rate_per_s=pool.retry.start_rate_per_s(now),
                least_retry_after_s=pool.settings.retry_after_s, forecast_limit=forecast)
            queues[name] = queue
            if queue.held and (queue.bound(pool, now) is not None or queue.held >= queue.hold_max):
                self._congested_until_s[name] = now + CONGESTED_HOLD_S
        self.queues = queues

    def _free_seats(self, pool: str, now: float) -> int:
        """Typical requests the pool's backends could start now, by the capacity model (sched/headroom.py):
        what an empty queue lets through before it forms. The engines' own limits (max_num_seqs) were ~1,000
        here, far above what the model routes, and every moment the queue emptied the door passed that many
        for the scheduler to refuse (bench/overload.py: bursts of 700-800 refusals a second, 0.9 s late).
        Computed at most every FREE_SEATS_EVERY_S (~25 µs a backend)."""
        cached = self._free_seats_at.get(pool)
        if cached is not None and now - cached[0] < FREE_SEATS_EVERY_S:
            return cached[1]
        headroom = pool_headroom(self.scheduler, pool, now)
        free = max(0, headroom.seats - headroom.busy_seats)
        self._free_seats_at[pool] = (now, free)
        return free

    def describe(self) -> dict[str, object]:
        now = time.monotonic()
        return {"loop_lag_ms": round(self.lag_s * 1000.0, 1), "shed_at_arrival": self.shed,
                "shed_for_queue_length": self.shed_for_queue,
                # Requests the door judged and passed on, and of those the ones not read by the loop yet.
                "passed_on": self.passed_total, "in_transit": self.in_transit,
                "refusing": sorted(p for p, s in self.streaks.items() if now - s.last_s < STREAK_FRESH_S)}

    def congested(self) -> bool:
        """Every pool refuses newcomers now, or its queue stands under its overload bound: close keep-alive
        connections so that the next request meets the door."""
        streaks, until = self.streaks, self._congested_until_s
        if not streaks and not until:  # the usual case, asked once per answer: no clock read, no scan
            return False
        now = self.clock()
        pools = self.scheduler.pools
        # A queue under its standing-overload bound is at the bound or a completion away from it, and in lumpy
        # releases it empties for moments: whether the next request fits is the door's to judge for the whole
        # episode (closing only while it stood at the bound left 2,400 kept-alive requests to the scheduler, 0.3 s
        # late: bench/overload.py).
        return bool(pools) and all(
            ((s := streaks.get(p)) is not None and now - s.last_s < STREAK_FRESH_S) or now < until.get(p, 0.0)
            for p in pools)

    # --- on the front-door thread (only reads what the loop recorded) ----------------------------------
    def freed(self, pool: str) -> int:
        """Requests ended on the pool's backends so far (completed, failed, cancelled), plus fresher snapshots and
        health changes anywhere: each may have freed room."""
        return self._changes + sum(b.completed + b.failed for b in list(self.scheduler.backends.values())
                                   if b.spec.pool == pool)

    def shed_after_s(self, body_bytes: int, now: float) -> DoorRefusal | None:
        """The refusal of a new request with a body of `body_bytes` that every pool would refuse; None when the
        scheduler must judge it."""
        streaks, views = self.streaks, self.views
        pools = list(self.scheduler.pools)
        if not pools:
            return None
        tokens = PROMPT_TOKENS_PER_BYTE * body_bytes + PROMPT_TOKEN_MARGIN
        # The scheduler's state (and what counts as freed room) changes only when the loop runs: a verdict is as
        # fresh as the loop can make it. A fixed 0.25 s under a loop lagging ~300 ms (measured, bench/overload.py)
        # made every streak stale between two of its iterations, and the door refused ~1 in 8 of the refusals.
        fresh_s = STREAK_FRESH_S + self.lag_s
        retry = 0.0
        shed = True
        for name in pools:
            s, view = streaks.get(name), views.get(name)
            if (s is None or view is None or now - s.last_s >= fresh_s or body_bytes < s.min_body_bytes
                    or not view.floor_bound(tokens)):
                shed = False
                break
            passed = self._passed.get(name)
            if passed is None or passed[0] != id(s):
                passed = self._passed[name] = (id(s), 0)
            if passed[1] < self.freed(name) - s.freed:
                shed = False  # room freed since the last refusal that no request passed on has claimed yet
                break
            retry = max(retry, s.retry_after_s)
        if shed:
            return DoorRefusal(max(1.0, float(math.ceil(retry))), LATE)
        refusal = self._queue_refusal(pools, tokens, now)
        if refusal is not None:
            self.shed_for_queue += 1
            return refusal
        # This request goes to the scheduler: it may claim one piece of the freed room of whichever pool it is for.
        for name, (sid, n) in list(self._passed.items()):
            s = streaks.get(name)
            if s is not None and id(s) == sid:
                self._passed[name] = (sid, n + 1)
        self.passed_total += 1
        return None

    def pass_read(self) -> None:
        """(loop) A request the door passed on is in the scheduler's counts now (held or sent), or never will be (it
        ended first, or aiohttp's server took its connection): it is out of transit."""
        self.read_total += 1

    @property
    def in_transit(self) -> int:
        """Requests the door passed on that the scheduler has not seen yet (unread, or read and not yet submitted):
        in no queue. (The two counts are moved on two threads, each read without a lock, so a read may see the
        loop's count ahead for a moment.)"""
        unseen = self.passed_total - self.read_total
        return unseen if unseen > 0 else 0

    def _queue_refusal(self, pools: list[str], tokens: int, now: float) -> DoorRefusal | None:
        """A refusal when, in every pool, the hold queue as published, plus the requests passed on since, less
        the room freed since, is at the length that refuses a newcomer of `tokens` prompt tokens."""
        queues, views = self.queues, self.views
        unseen = self.in_transit
        retry = None
        full = True
        for name in pools:
            q = queues.get(name)
            if q is None or q.fair_exempt:
                return None
            view = views.get(name)
            pool = self.scheduler.pools.get(name)
            if pool is None:
                return None
            # The queue as it is (its length is read live), and the requests passed on that it has not seen yet.
            held = len(pool.hold)
            held_now = held + unseen
            if not held and q.free_seats:
                # An empty queue also takes the free seats counted at the publication. Requests the scheduler has
                # sent to a backend since left the transit count without entering the queue, yet took those
                # seats: count every request passed on since then. (A loop reading a burst publishes rarely: at
                # an onset the seats were counted twice and the surplus met the scheduler's hard cap.)
                held_now = max(held_now, q.transit_at + self.passed_total - q.passed_at)
            # The scheduler judges it a loop lag from now: by then the queue may stand (measured: a request passed
            # 0.3 s before the queue's standing time was refused for its length once the loop read it).
            common = view is not None and view.floor_bound(tokens)  # judged by the pool's common objective
            bound = q.bound(pool, now + self.lag_s) if common else None
            drain = q.drain_limit(pool, now) if common else None
            if drain is not None:
                bound = drain if bound is None else min(bound, drain)
            limit = q.limit(bound, held)
            if held_now < limit:
                return None
            full = full and limit >= q.hold_max
            after = self._spread_retry(name, q, now)
            retry = after if retry is None else max(retry, after)
        return None if retry is None else DoorRefusal(retry, QUEUE_FULL if full else QUEUE_AT_BOUND)

    def _spread_retry(self, pool: str, q: QueueView, now: float) -> float:
        """The next free slot at the pool's start rate, at least its Retry-After from now (as the scheduler's
        own refusals get theirs, sched/retry_spread.py): refused together, clients come back one by one."""
        wait_s, self._retry_slot_s[pool] = next_slot(now, q.least_retry_after_s, q.start_rate_per_s,
                                                     self._retry_slot_s.get(pool, 0.0))
        return wait_s

    def judge_head(self, head: bytes) -> DoorRefusal | None:
        """`shed_after_s` for the head of an HTTP request (as peeked by the door)."""
        fields = head_fields(head)
        if fields is None or fields.own_terms:
            return None
        length = fields.content_length
        if length is None or length < 0:
            return None
        refusal = self.shed_after_s(length, self.clock())
        if refusal is not None:
            self.shed += 1
        return refusal
