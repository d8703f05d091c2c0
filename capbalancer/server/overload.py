"""Refusal at arrival under overload: what the front door needs to answer 429 without the event loop (issue 14).

Under a 10x overload the event loop is the bottleneck: a request waits in its socket buffer until the loop gets
round to it. Measured on bench/overload.py (3,000 connections, uvloop): the scheduler refused 7,506 requests
the moment it saw them, yet the clients got those 429s after p50 4.3 s, all of it spent waiting for the loop
(and every refusal the loop parses makes that wait longer). So the refusal must happen where the request
arrives: the front-door thread (server/frontdoor.py). The thread cannot run the scheduler (single-threaded,
pure, mutated by the loop), so it relies on the scheduler's latest verdict:

- every time the scheduler decides on a newly arrived request, the loop records it (`on_decision`): a refusal
  (429: it cannot start within its TTFT objective, or the queue is full) starts or extends a streak; anything
  else (routed or held) ends it, except a Hold that filled the queue to its standing-overload bound (the next
  newcomer is refused then too);
- the door refuses a new API request with 429 + Retry-After only while, in every pool, a streak is under
  `STREAK_FRESH_S` old, the request is no smaller than the smallest one refused in that streak, and it has
  already handed the loop one request for each piece of room freed since the streak's last refusal (each
  completion, failure or cancel on a backend of the pool, each fresher metrics snapshot or health change).
  The scheduler's state is then what refused those requests, less room that the requests passed on since will
  claim first, so it would refuse this one too: every freed seat still sends a request to the scheduler, which
  decides exactly;
- requests that may outrank the queue (a priority header), whose size is unknown (no Content-Length), or whose
  prompt may be long enough for a longer objective than the floor (`PoolView`) are always left to the loop.

While a pool refuses, the loop's successful answers close their connection (`congested`), so that keep-alive
clients' next requests come through the door rather than past it. The loop's lag (how late its timers fire)
is measured and shown in /admin/backends: the wait that nobody inside the loop can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from capbalancer.sched.capacity import CapacityModel
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import Decision, Hold, Reject

PUBLISH_EVERY_S = 0.01  # how often the loop measures its lag and looks for fresher snapshots/health
LAG_WINDOW_S = 0.5  # the lag shown is the largest seen over about this long
STREAK_FRESH_S = 0.25  # a verdict older than this is not trusted: the next request goes to the scheduler
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


class OverloadGate:
    """Recorded by the loop (`on_decision`, `publish`), read by the front-door thread (`judge_head`)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.lag_s = 0.0
        self.streaks: dict[str, Streak] = {}  # replaced whole (copy on write): the door reads it unlocked
        self.views: dict[str, PoolView] = {}
        self.shed = 0  # requests the door refused on a streak (tests and the bench read it)
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

    def on_decision(self, pool: str, decision: Decision, body_bytes: int, now: float) -> None:
        """The scheduler's verdict on a newly arrived request of `pool` (not a retry)."""
        streaks = self.streaks
        if isinstance(decision, Reject) and decision.status == 429:
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
        # The bound applies only to a queue that has stood (sched/admission.py STANDING_MIN_S); `now` is the
        # scheduler's clock too (time.monotonic, through the driver).
        return limit is not None and len(state.hold) >= limit and state.drain.standing(now)

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

    def describe(self) -> dict[str, object]:
        now = time.monotonic()
        return {"loop_lag_ms": round(self.lag_s * 1000.0, 1), "shed_at_arrival": self.shed,
                "refusing": sorted(p for p, s in self.streaks.items() if now - s.last_s < STREAK_FRESH_S)}

    def congested(self) -> bool:
        """Every pool refuses newcomers now: close keep-alive connections so the next request meets the door."""
        streaks = self.streaks
        if not streaks:  # the usual case, asked once per answer: no clock read, no scan
            return False
        now = time.monotonic()
        return bool(self.scheduler.pools) and all(
            (s := streaks.get(p)) is not None and now - s.last_s < STREAK_FRESH_S for p in self.scheduler.pools)

    # --- on the front-door thread (only reads what the loop recorded) ----------------------------------
    def freed(self, pool: str) -> int:
        """Requests ended on the pool's backends so far (completed, failed, cancelled), plus fresher snapshots and
        health changes anywhere: each may have freed room."""
        return self._changes + sum(b.completed + b.failed for b in list(self.scheduler.backends.values())
                                   if b.spec.pool == pool)

    def shed_after_s(self, body_bytes: int, now: float) -> float | None:
        """Retry-After seconds when a new request with a body of `body_bytes` would be refused in every pool;
        None when the scheduler must judge it."""
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
            return retry
        # This request goes to the scheduler: it may claim one piece of the freed room of whichever pool it is for.
        for name, (sid, n) in list(self._passed.items()):
            s = streaks.get(name)
            if s is not None and id(s) == sid:
                self._passed[name] = (sid, n + 1)
        return None

    def judge_head(self, head: bytes) -> float | None:
        """`shed_after_s` for the head of an HTTP request (as peeked by the door)."""
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = None
        for line in head[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            if low == b"x-capbalancer-priority":
                return None
            if low == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return None
        if length is None or length < 0:
            return None
        after = self.shed_after_s(length, time.monotonic())
        if after is None:
            return None
        self.shed += 1
        return max(1.0, float(math.ceil(after)))
