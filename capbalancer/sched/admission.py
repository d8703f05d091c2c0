"""Admission for goodput: when a request that no backend can take now may wait, and when it is refused.

Users measure goodput (requests that meet their TTFT objective), not completions. So a request is held only
while it can still start in time: its TTFT objective runs from its arrival (time held counts), the hold ends
when what is left of it is less than the fastest idle backend's TTFT, and a request the queue ahead cannot
clear in time is refused at once with 429 + Retry-After instead of being served late.

Under sustained overload the queue is also kept short (`standing_queue_limit`): a hold queue turns bursts into
throughput (work waits for a lull), but when arrivals stay well above what the pool serves there is no lull, and
a queue that stands at the length the objective allows is only latency: every held request waits up to its
objective and as many are refused either way. What such a queue must do is keep the backends busy, and a few
requests do that: with the pool's measured overload ratio (requests asking to join the queue per request it
released to a backend), the queue is bounded at the length that leaves the backends without held work no more
than a small fraction of the time. The rest are refused at once. Before any drain has been measured (an onset, the
first moments after a lull), the seats' forecast (`SeatForecast`: when the capacity model says the running
requests end) says how many held requests can start in time. Pure and clock-driven.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DRAIN_WINDOW_S = 2.0  # a drain rate is only trusted once measured over this much backlogged time
# ... except for a provisional one, taken once this many releases came over at least this long: at an onset of
# hundreds of requests a second, 2 s without an estimate filled the queue to its 1,024 limit, and hundreds of
# those held were refused at their release ~2 s later (bench/overload.py, 3,000 connections: 250-600 a run).
# At 16 releases the rate is known to about 25%; a pool draining a few a second takes seconds to get there.
EARLY_MIN_RELEASES = 16
EARLY_MIN_S = 0.25
# The overload ratio's counts decay with this time constant: long enough to span the waves of refused clients
# coming back, short enough to follow a ramp within a few seconds.
RATIO_TIME_CONSTANT_S = 2.0
RATIO_MIN_RELEASES = 8.0  # decayed releases below which there is no ratio (no standing queue to bound)
# The queue must have stood (never emptied) this long before it is bounded: a burst onto a quiet pool (128 clients
# at once) is held for tens of ms and then served, and a ratio remembered from before the lull read it as sustained
# overload and refused its last ~40 requests (measured: wrk -c128 in 5-s rounds, 12-26 ms holds, 0-151 wrongful
# 429s a round). Under a sustained overload the bounded queue almost never empties (that is what the bound is
# sized for), so the bound applies after this long and stays.
STANDING_MIN_S = 0.5
# The queue holds at most this many lumps' worth: in the DES the lumps are 2-5 requests and the bound needs them
# (without: -1 to -2 points of 2x attainment); the live proxy measured lumps of 17-112 (room its model had
# withheld, freed at once), which made the bound 300-1,900 and the queue ~1 s long. A lump that large is
# refilled by the arrivals of an overload (hundreds a second) about as fast as by held work.
MAX_BULK = 16.0
# A queue that empties for less than this and fills again still stands: under a sustained overload room frees in
# lumps, and a lump larger than the queue empties it for a moment. Each such moment restarted the standing time
# (STANDING_MIN_S) and the drain measurement, so the bound and the drain estimate were off half of the time and
# the queue grew to hundreds in between (measured live, bench/overload.py: 0-500 held, a bound of ~150-250). A
# lull of this length is not one: the burst-after-a-lull case above idles for seconds. 1 s rather than 0.25 s: the
# refused clients of a live overload come back in waves a second or so apart (their Retry-After), and the queue
# emptied between waves. DES (bench/goodput_defaults.py, capacity, 30 s) against no grace: kv-short 1.5x 81 -> 77%
# attainment, 2x 65 -> 67%, ramp 83 -> 85%; speed-gap and three-type within -0..+2 points.
EMPTY_GRACE_S = 1.0
# ... and only while requests wait in it: its head has waited this share of the objective. A closed loop of clients
# on a fast backend whose model holds each request for ~13 ms keeps a queue that never empties (it stands), at a
# ratio a little over 1; bounded, it refused hundreds of requests a round that would have started within 20 ms
# (bench/dataplane.py, wrk -c128). Under a real overload the head waits hundreds of ms.
STANDING_WAIT_FRACTION = 0.05


@dataclass(slots=True)
class DrainRate:
    """How fast held requests leave the queue for a backend, measured only while there is a backlog.

    The window starts when the queue stops being empty, never at the scheduler's epoch: a window that began
    at clock 0 on a live proxy (a monotonic clock reads thousands of seconds) once measured ~0.2 releases/s
    for a pool draining 200/s and refused every newcomer. Until one window has passed there is no estimate
    and nobody is refused on it: a false refusal loses a request that would have met its objective.
    """

    rate_per_s: float | None = None
    window_start_s: float | None = None
    window_count: int = 0
    provisional: bool = False  # rate_per_s is the early estimate of a first window not yet complete
    backlog_since_s: float | None = None  # when the queue last stopped being empty (None: empty)
    emptied_at_s: float | None = None  # when the queue was seen to empty, while the backlog may still resume

    def on_backlog(self, now: float) -> None:
        """A request joins an empty queue: a backlog (and a measuring window) starts, or the one that emptied
        within EMPTY_GRACE_S resumes."""
        emptied = self.emptied_at_s
        if emptied is None or now - emptied >= EMPTY_GRACE_S:
            self.on_empty_for_good()
        self.emptied_at_s = None
        if self.backlog_since_s is None:
            self.backlog_since_s = now
        if self.window_start_s is None:
            self.window_start_s = now
            self.window_count = 0

    def standing(self, now: float) -> bool:
        """Whether the queue has stood (not emptied for EMPTY_GRACE_S) for STANDING_MIN_S: a sustained overload,
        not a burst."""
        since = self.backlog_since_s
        return since is not None and now >= since + STANDING_MIN_S and not self.over(now)

    def over(self, now: float) -> bool:
        """The backlog ended (the queue has been empty for EMPTY_GRACE_S) though nothing has reset it yet: that
        happens at the next release pass or backlog, and after a lull with neither, the front door read the old
        backlog's rate and standing live and refused the first of a new burst (bench/dataplane.py: 6-14 a round)."""
        return self.emptied_at_s is not None and now - self.emptied_at_s >= EMPTY_GRACE_S

    def current_rate_per_s(self, now: float) -> float | None:
        """The drain rate, unless its backlog is over."""
        return None if self.over(now) else self.rate_per_s

    def on_release(self, now: float) -> None:
        if self.window_start_s is None:
            self.window_start_s = now
        self.window_count += 1
        elapsed = now - self.window_start_s
        if elapsed >= DRAIN_WINDOW_S:
            rate = self.window_count / elapsed
            prev = None if self.provisional else self.rate_per_s
            self.rate_per_s = rate if prev is None else 0.5 * prev + 0.5 * rate
            self.provisional = False
            self.window_start_s = now
            self.window_count = 0
        elif (self.rate_per_s is None or self.provisional) and self.window_count >= EARLY_MIN_RELEASES \
                and elapsed >= EARLY_MIN_S:
            self.rate_per_s = self.window_count / elapsed
            self.provisional = True

    def on_empty(self, now: float) -> None:
        """The queue is empty at `now`: past EMPTY_GRACE_S of that, no congestion, and the next backlog is judged
        afresh; within it, a backlog that forms again resumes this one."""
        if self.emptied_at_s is None:
            self.emptied_at_s = now
        elif now - self.emptied_at_s >= EMPTY_GRACE_S:
            self.on_empty_for_good()

    def on_empty_for_good(self) -> None:
        self.rate_per_s = None
        self.provisional = False
        self.window_start_s = None
        self.window_count = 0
        self.backlog_since_s = None
        self.emptied_at_s = None

    def wait_s(self, ahead: int) -> float | None:
        """Expected seconds until a request with `ahead` requests in front of it leaves the queue."""
        rate = self.rate_per_s
        if rate is None or rate <= 0:
            return None
        return (ahead + 1) / rate


@dataclass(slots=True)
class OverloadRatio:
    """How many requests asked to join the hold queue (held or refused there) per request the queue released
    to a backend: ~1 while the queue absorbs a burst, ~10 under a 10x overload. Refused requests count (they
    are demand the queue did not take).

    Both are counts decayed with a time constant of RATIO_TIME_CONSTANT_S, and the ratio is theirs: refused
    clients come back in waves (their Retry-After), and a ratio taken per short window swung from ~60 within a
    wave to ~0.2 between two (measured live, bench/overload.py), dropping the bound exactly when the next wave
    came. Also how many requests leave together (`bulk`): room frees in lumps (a fresher snapshot, several
    sequences ending at once), and a queue shorter than a lump leaves seats empty until newcomers arrive; `bulk`
    is the size of the lump a released request was part of, on average (decayed sum of squares over sum)."""

    offered: float = 0.0
    released: float = 0.0
    released_sq: float = 0.0
    at_s: float | None = None

    def on_offered(self, now: float, n: float = 1.0) -> None:
        """`n` requests asked to join the queue (the front door reports those it refused itself in bulk)."""
        self._decay(now)
        self.offered += n

    def on_released(self, n: int, now: float) -> None:
        """`n` held requests left for backends together (one release pass)."""
        self._decay(now)
        self.released += n
        self.released_sq += n * n

    def current(self, now: float) -> float | None:
        """The ratio, or None while too few releases were seen lately to tell (no standing queue)."""
        self._decay(now)
        if self.released < RATIO_MIN_RELEASES:
            return None
        return self.offered / self.released

    @property
    def bulk(self) -> float:
        return self.released_sq / self.released if self.released > 0 else 1.0

    def _decay(self, now: float) -> None:
        if self.at_s is not None and now > self.at_s:
            k = math.exp(-(now - self.at_s) / RATIO_TIME_CONSTANT_S)
            self.offered *= k
            self.released *= k
            self.released_sq *= k
        if self.at_s is None or now > self.at_s:
            self.at_s = now

    def last_hold_limit(self, idle_fraction: float) -> int | None:
        """`hold_limit` as of the last count, reading only (another thread may call it): both counts decay
        alike, so the ratio is unchanged since; only whether enough releases are recent may have changed."""
        released = self.released
        if released < RATIO_MIN_RELEASES:
            return None
        k = standing_queue_limit(self.offered / released, idle_fraction)
        return None if k is None else math.ceil(k * min(MAX_BULK, max(1.0, self.released_sq / released)))

    def hold_limit(self, now: float, idle_fraction: float) -> int | None:
        """The most requests worth holding now (None: no bound): `standing_queue_limit` in lumps of `bulk`."""
        k = standing_queue_limit(self.current(now), idle_fraction)
        return None if k is None else math.ceil(k * min(MAX_BULK, max(1.0, self.bulk)))


# How long a seat forecast (`SeatForecast`) is reused: rebuilding it reads every request in flight in the pool (1,024
# at the bench's onset), and within this long the requests it misses are counted (`starts_total`).
FORECAST_EVERY_S = 0.05
# A forecast needs the pool's output lengths: before any answer has completed, a request is expected to generate
# half its max_tokens (sched/estimates.py), and a client asking for 4,096 tokens that get 200 would have its seats
# forecast to free 10x too late, refusing what would start in time. Until this many answers were seen, no forecast.
FORECAST_MIN_OUTPUTS = 8
# Beyond this many starts a forecast stops counting: no queue is that long (the hold limit is 1,024 by default).
FORECAST_MAX_STARTS = 1_000_000


@dataclass(frozen=True, slots=True)
class BackendForecast:
    """One backend's part of a `SeatForecast`."""

    ends_s: tuple[float, ...]  # its seats' predicted ends, ascending (clock seconds; a free seat: the forecast's now)
    service_s: float  # how long a request started there then runs (its prefill and expected output)
    prefill_s: float  # the prefill one more request of the typical size costs there, a batch running


@dataclass(frozen=True, slots=True)
class SeatForecast:
    """When the pool's seats are predicted to free, by the capacity model: its drain before any has been measured.

    Until a drain rate is measured (`DrainRate`: 16 releases over 0.25 s at the least, and after every lull of
    EMPTY_GRACE_S), nothing bounded the hold queue but its 1,024 limit. At an onset every seat fills at once, and
    the whole first wave ends together, after its prefill backlog and its decode: a queue that formed meanwhile
    waits for that, and what could not start within its TTFT objective was refused at its release, 2.4 s after
    arriving (bench/overload.py: up to 1,024 a run; the DES of the same fleet: 1,024 of 1,024 held). So each seat
    is forecast from what is known at once: a running request ends when its predicted first token and its
    expected output at the backend's TPOT now say (its first token when seen), a free seat ends now, and a seat
    that frees then takes a request of `service_s` after another. The forecast errs early where it errs (a
    request dispatched into a growing batch is given today's TPOT, one past its expected end frees now), so it
    refuses no request that the seats would start in time as the model sees them.

    A seat is not all a start needs: requests released together are prefilled one after another, and one released
    in time by its seat still came too late by its prefill turn (the onset, live: 120-520 held, then refused at
    their release, though seats had freed). A backend starts in time at most one request per its prefill time
    from now until the horizon (by when a request must leave the queue, its loaded TTFT already allowed for)."""

    built_at_s: float
    starts_at_build: int  # the pool's starts (dispatches) when built: those since then took forecast seats
    backends: tuple[BackendForecast, ...]

    def starts_by(self, horizon_s: float, enough: int = FORECAST_MAX_STARTS) -> int:
        """Requests the seats start (free seats filled, then one per seat each time it frees, one per prefill time
        on each backend) by `horizon_s`; counting stops at `enough` (the caller only asks whether there are that
        many: O(seats) else)."""
        total = 0
        for b in self.backends:
            cap = FORECAST_MAX_STARTS if b.prefill_s <= 0 else 1 + int((horizon_s - self.built_at_s) / b.prefill_s)
            starts = 0
            for end_s in b.ends_s:
                if end_s > horizon_s or starts >= cap:
                    break
                if b.service_s <= 0:
                    starts = cap
                    break
                starts += 1 + int((horizon_s - end_s) / b.service_s)
            total += min(starts, cap)
            if total >= enough:
                return enough
        return total

    def fresh(self, now: float) -> bool:
        return self.built_at_s <= now < self.built_at_s + FORECAST_EVERY_S


def queue_waits(head_held_at_s: float | None, now: float, objective_s: float) -> bool:
    """Whether requests wait in the queue long enough for its length to matter (STANDING_WAIT_FRACTION)."""
    return head_held_at_s is not None and now - head_held_at_s >= STANDING_WAIT_FRACTION * objective_s


def standing_queue_limit(ratio: float | None, idle_fraction: float) -> int | None:
    """The longest hold queue worth keeping when `ratio` times as many requests arrive as it releases: the
    least K for which an M/M/1/K queue (the pool's seats freeing one at a time as the server) leaves the
    backends without held work at most `idle_fraction` of the time, P0 = (r - 1) / (r^(K+1) - 1). Three at 10x,
    seven at 2x, twenty at 1.2x (for 0.5%); None (no bound) when no ratio is known, the bound is off, or the
    queue empties too often for any length to matter (r < 1 - idle_fraction)."""
    if ratio is None or idle_fraction <= 0 or ratio < 1.0 - idle_fraction:
        return None
    if abs(ratio - 1.0) < 1e-9:
        return max(0, math.ceil(1.0 / idle_fraction) - 1)
    # P0 <= f  <=>  r^(K+1) >= 1 + (r - 1) / f  (for r > 1; for r < 1 both sides of the log flip sign)
    target = 1.0 + (ratio - 1.0) / idle_fraction
    if target <= 0:
        return None
    return max(0, math.ceil(math.log(target) / math.log(ratio) - 1e-9) - 1)


def derived_objective_s(idle_ttft_s: float, factor: float, floor_s: float) -> float | None:
    """The default TTFT objective of a request whose user set none: max(floor, factor x its idle TTFT).
    None when factor is 0 (goodput defaults off: hold until the hold timeout, as before)."""
    if factor <= 0:
        return None
    return max(floor_s, factor * idle_ttft_s)
