"""Refusal at arrival under overload (issue 14): the front door's verdict (server/overload.py) against the
scheduler's own, on the DEFAULT capacity configuration, and live: a 10x-overloaded proxy refuses at its door.

The door refuses only what the scheduler would refuse too: while every newly arrived request was refused and no
room has been freed since (nothing finished, no fresher snapshot) that a request passed on has not claimed.
"""

from __future__ import annotations

import time

from test_goodput_admission import T0, demand, make, seats_profile

from capbalancer.config import PoolSettings
from capbalancer.sched.admission import STANDING_MIN_S
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Hold, Reject, Route
from capbalancer.server.overload import (
    CONGESTED_HOLD_S,
    LATE,
    QUEUE_AT_BOUND,
    QUEUE_FULL,
    STREAK_FRESH_S,
    OverloadGate,
)


def head(body_bytes: int, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % body_bytes)


def refuse_one(sched, gate: OverloadGate, i: int, now: float, body: int = 500) -> Reject:
    d = demand(i, now)
    decision = sched.submit(d, now)
    assert isinstance(decision, Reject) and decision.status == 429, decision
    gate.on_decision("m", decision, body, time.monotonic())
    return decision


def full_scheduler():
    """One backend, one seat, taken; a user objective of 100 ms: a newcomer cannot start in time (its seat
    frees only when the running request ends, predicted far later)."""
    sched = make(seats=1, ttft_slo_ms=100)
    first = demand(0, T0)
    assert isinstance(sched.submit(first, T0), Route)
    return sched


def test_the_door_refuses_only_what_the_scheduler_refuses():
    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    assert gate.judge_head(head(500)) is None  # no verdict yet: the scheduler judges
    refuse_one(sched, gate, 1, T0)
    after = gate.judge_head(head(500))
    assert after is not None and after.retry_after_s >= 1.0 and after.message == LATE
    # ... and the scheduler, asked the same, refuses it too.
    assert isinstance(sched.submit(demand(2, T0), T0), Reject)
    assert gate.judge_head(head(100)) is None  # smaller than anything refused: the scheduler judges it
    assert gate.judge_head(head(500, b"x-capbalancer-priority: 5\r\n")) is None  # may outrank the queue
    assert gate.judge_head(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n") is None  # size unknown
    assert gate.shed == 1


def test_freed_room_sends_one_request_per_freed_seat_to_the_scheduler():
    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    refuse_one(sched, gate, 1, T0)
    assert gate.judge_head(head(500)) is not None
    sched.finish("r0", T0 + 0.01, output_tokens=10)  # the seat is free
    assert gate.judge_head(head(500)) is None  # passed on: it may take the seat
    assert gate.judge_head(head(500)) is not None  # the freed seat is claimed by the one passed on
    # The scheduler admits the one passed on: the streak ends and the door passes everything on again.
    d = demand(3, T0 + 0.01)
    decision = sched.submit(d, T0 + 0.01)
    assert isinstance(decision, Route)
    gate.on_decision("m", decision, 500, time.monotonic())
    assert gate.judge_head(head(500)) is None
    assert gate.judge_head(head(500)) is None


def test_a_verdict_goes_stale():
    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    refuse_one(sched, gate, 1, T0)
    assert gate.judge_head(head(500)) is not None
    time.sleep(STREAK_FRESH_S + 0.05)
    assert gate.judge_head(head(500)) is None


def test_a_fresher_snapshot_counts_as_freed_room():
    from capbalancer.fleet.snapshot import EngineSnapshot

    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    refuse_one(sched, gate, 1, T0)
    assert gate.judge_head(head(500)) is not None
    sched.observe("b", EngineSnapshot(engine="vllm", taken_at_s=T0 + 0.01, running=0, waiting=0), T0 + 0.01)
    gate.publish()
    assert gate.judge_head(head(500)) is None
    assert gate.judge_head(head(500)) is not None


def test_no_objective_means_never_refused_at_the_door():
    sched = make(seats=1, ttft_objective_factor=0)
    gate = OverloadGate(sched)
    gate.publish()
    gate.on_decision("m", Reject(429, "hold queue is full", 1.0), 500, time.monotonic())
    assert gate.judge_head(head(500)) is None


def test_a_verdict_stays_fresh_while_the_loop_lags():
    """The scheduler's state changes only when the loop runs: a loop lagging 0.5 s cannot have freed room
    since its last verdict, so that verdict holds for the lag too (issue 14: under a loop lag of ~300 ms a
    fixed 0.25 s made every streak stale between two of its iterations)."""
    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    refuse_one(sched, gate, 1, T0)
    gate.note_lag(0.5, time.monotonic())
    time.sleep(STREAK_FRESH_S + 0.05)
    assert gate.judge_head(head(500)) is not None
    gate.note_lag(0.0, time.monotonic() + 1.0)  # the loop has caught up: the usual freshness again
    assert gate.judge_head(head(500)) is None


def test_a_hold_that_fills_the_queue_to_its_bound_keeps_the_streak():
    """Sustained overload (sched/admission.py): the queue is bounded at a few requests; a Hold that fills it
    to the bound leaves the scheduler refusing the next newcomer, so the door goes on refusing (ending the
    streak sent everything to the loop until its next refusal). One below the bound ends it."""
    sched = make(seats=1)
    now = T0
    assert isinstance(sched.submit(demand(0, now), now), Route)
    pool = sched.pools["m"]
    # A measured 10x overload: 10 offered per release, one at a time.
    for _ in range(20):
        for _ in range(10):
            pool.overload.on_offered(now)
        pool.overload.on_released(1, now)
    limit = pool.overload.hold_limit(now, 1e-4)
    assert limit == 4
    gate = OverloadGate(sched)
    gate.publish()
    held = []
    for i in range(1, limit + 1):
        d = demand(i, now)
        decision = sched.submit(d, now)
        assert isinstance(decision, Hold), decision
        held.append(decision)
    # The bound applies once the queue has stood (a burst onto a quiet pool is not bounded: test below).
    assert isinstance(sched.submit(demand(98, now), now), Hold)
    sched.pools["m"].hold.pop()  # (taken back: only the time the queue stood was in question)
    now += STANDING_MIN_S
    refused = sched.submit(demand(99, now), now)
    assert isinstance(refused, Reject) and refused.status == 429
    gate.on_decision("m", refused, 500, time.monotonic())
    # The last Hold filled the queue to its bound: the streak stands, and the scheduler agrees.
    gate.on_decision("m", held[-1], 500, time.monotonic())
    assert gate.judge_head(head(500)) is not None
    assert isinstance(sched.submit(demand(100, now), now), Reject)
    # Room freed and claimed by the head of the queue: a Hold that leaves it below the bound ends the streak.
    sched.finish("r0", now + 0.01, output_tokens=10)
    assert len(pool.hold) == limit - 1
    gate.on_decision("m", Hold(reason="capacity", queue_position=limit - 1), 500, time.monotonic())
    assert gate.judge_head(head(500)) is None


def standing_at_bound(seats: int = 1) -> tuple[Scheduler, int, float]:
    """A pool under a measured 10x overload whose queue has stood at its bound (sched/admission.py)."""
    sched = make(seats=seats)
    now = T0
    for i in range(seats):
        assert isinstance(sched.submit(demand(i, now), now), Route)
    pool = sched.pools["m"]
    for _ in range(20):  # 10 offered per release, one at a time
        for _ in range(10):
            pool.overload.on_offered(now)
        pool.overload.on_released(1, now)
    limit = pool.overload.hold_limit(now, 1e-4)
    for i in range(100, 100 + limit):
        assert isinstance(sched.submit(demand(i, now), now), Hold)
    now += STANDING_MIN_S
    assert isinstance(sched.submit(demand(999, now), now), Reject)  # the scheduler refuses for the length
    return sched, limit, now


def test_the_door_refuses_for_the_queue_length_and_passes_one_per_freed_seat():
    """Sustained overload with the queue at its bound: a newcomer meets the queue, so the door refuses it as
    the scheduler would, with no verdict of the scheduler's needed (issue 14: 6,600 of 7,750 refusals were the
    scheduler's, 0.3-0.8 s late, the loop's lag)."""
    sched, limit, now = standing_at_bound()
    gate = OverloadGate(sched, clock=lambda: now)
    gate.publish()
    q = gate.queues["m"]
    assert q.held == limit and q.bound(sched.pools["m"], now) == limit
    refusal = gate.judge_head(head(500))
    assert refusal is not None and refusal.message == QUEUE_AT_BOUND and refusal.retry_after_s >= 1.0
    assert gate.judge_head(head(500, b"x-capbalancer-priority: 5\r\n")) is None  # may outrank the queue
    # A completion releases the queue's head: one newcomer fits again, and the scheduler holds it.
    sched.finish("r0", now + 0.01, output_tokens=10)
    assert gate.judge_head(head(500)) is None
    assert isinstance(sched.submit(demand(1000, now + 0.01), now + 0.01), Hold)
    assert gate.judge_head(head(500)) is not None  # that room is taken by the one passed on
    # Each refusal at the door is demand the queue did not take: the overload ratio counts it.
    offered = sched.pools["m"].overload.offered
    gate.publish()
    assert sched.pools["m"].overload.offered == offered + gate.shed


def test_the_door_spreads_its_refusals_retries_at_the_pools_start_rate():
    sched, _, now = standing_at_bound()
    for _ in range(50):  # the pool starts ~10 requests a second
        sched.pools["m"].retry.on_start(now)
    gate = OverloadGate(sched, clock=lambda: now)
    gate.publish()
    waits = [gate.judge_head(head(500)).retry_after_s for _ in range(5)]
    assert waits == sorted(waits) and waits[-1] - waits[0] > 0.3  # one after another, not all at 1 s


def test_an_onset_burst_is_passed_on_only_as_far_as_the_queue_and_the_seats_reach():
    """Before the loop has published a queue, thousands of connections arriving at once were all handed to it,
    and 1,900 were refused there as the queue filled, ~0.7 s late (bench/overload.py)."""
    sched = Scheduler([PoolSettings(name="m", policy="capacity", hold_max_requests=8)])
    sched.add_backend(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=seats_profile(3)), T0)
    gate = OverloadGate(sched, clock=lambda: T0)
    gate.publish()
    assert [gate.judge_head(head(500)) is None for _ in range(11)] == [True] * 11  # 8 held + 3 seats
    refusal = gate.judge_head(head(500))
    assert refusal is not None and refusal.message == QUEUE_FULL
    gate.publish()  # the loop has adopted them, not yet read them: still counted
    assert gate.judge_head(head(500)) is not None
    for _ in range(3):  # a lagging loop publishes again and again before it reads them: still counted
        gate.publish()
        assert gate.judge_head(head(500)) is not None
    for _ in range(11):  # the loop read them (and took none of them here)
        gate.pass_read()
    # Until the loop publishes, the seats counted at the last publication count as taken by what passed since
    # (test_requests_sent_since_the_publication_took_the_free_seats_it_counted); then: room again.
    assert gate.judge_head(head(500)) is not None
    gate.publish()
    assert gate.judge_head(head(500)) is None


def test_before_a_drain_is_measured_the_door_refuses_past_the_seat_forecast():
    """No drain measured (an onset, the first moments after a lull): the door bounded the queue by the hold limit
    alone and passed on what the scheduler then refused for the seats' forecast, a loop lag late. The loop
    publishes the forecast; the door refuses past it, and passes again once answers are short enough."""
    sched = make()  # 2 seats
    for _ in range(16):  # answers of ~300 tokens: both seats busy for ~3 s, past the 2 s objective
        sched.pools["m"].output_lengths.observe(300)
    def long(i: int) -> Demand:
        return Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=300, arrival_s=T0)

    for i in range(2):
        assert isinstance(sched.submit(long(i), T0), Route)
    gate = OverloadGate(sched, clock=lambda: T0)
    gate.publish()
    assert gate.queues["m"].forecast_limit == 0
    refusal = gate.judge_head(head(500))
    assert refusal is not None and refusal.message == QUEUE_AT_BOUND
    assert isinstance(sched.submit(long(9), T0), Reject)  # the scheduler agrees
    quick = make()
    for _ in range(16):
        quick.pools["m"].output_lengths.observe(5)
    for i in range(2):
        quick.submit(demand(i, T0), T0)
    gate = OverloadGate(quick, clock=lambda: T0)
    gate.publish()
    assert (gate.queues["m"].forecast_limit or 0) > 10 and gate.judge_head(head(500)) is None


def test_an_under_served_size_class_is_left_to_the_scheduler():
    sched, _, now = standing_at_bound()
    fair = sched.pools["m"].policy.fair
    for _ in range(20):
        fair.on_arrival(100, now)
        fair.on_start(100, now)
        fair.on_arrival(3000, now)
    gate = OverloadGate(sched, clock=lambda: now)
    gate.publish()
    assert gate.queues["m"].fair_exempt
    assert gate.judge_head(head(500)) is None  # long prompts go ahead of the queue: the scheduler decides


def test_answers_close_their_connection_while_the_queue_stands_at_its_bound():
    sched, _, now = standing_at_bound()
    clock = [now]
    gate = OverloadGate(sched, clock=lambda: clock[0])
    assert not gate.congested()
    gate.publish()
    assert gate.congested()  # keep-alive clients' next requests come through the door
    sched.finish("r0", now + 0.01, output_tokens=10)
    gate.publish()
    assert gate.congested()  # one below the bound: still the door's to judge
    while len(sched.pools["m"].hold):  # the queue drains: each completion starts the next held request
        running = next(iter(sched.backends["b"].inflight))
        sched.finish(running, now + 0.01, output_tokens=10)
    gate.publish()
    assert gate.congested()  # the episode goes on for a moment: lumps of freed room empty the queue briefly
    clock[0] = now + CONGESTED_HOLD_S + 0.01
    gate.publish()
    assert not gate.congested()


def test_the_door_refuses_what_the_measured_drain_cannot_clear_within_the_objective():
    """Before the queue stands (its first half second) the bound does not apply yet, but a drain rate may be
    measured (sched/admission.py: early estimate): a queue longer than it clears within the objective is
    refused by the scheduler, so by the door too (live: 850 such refusals a run, 0.7 s late)."""
    sched = make(seats=1)
    now = T0
    assert isinstance(sched.submit(demand(0, now), now), Route)
    for i in range(1, 11):
        assert isinstance(sched.submit(demand(i, now), now), Hold)
    pool = sched.pools["m"]
    gate = OverloadGate(sched, clock=lambda: now)
    gate.publish()
    assert gate.judge_head(head(500)) is None  # no drain rate measured yet: the scheduler judges
    pool.drain.rate_per_s = 5.0  # 10 held at 5 a second: a newcomer would wait past its 2 s objective
    refusal = gate.judge_head(head(500))
    assert refusal is not None and refusal.message == QUEUE_AT_BOUND
    assert isinstance(sched.submit(demand(99, now), now), Reject)  # the scheduler agrees


def test_requests_sent_since_the_publication_took_the_free_seats_it_counted():
    """The door lets an empty queue take the free seats counted at the last publication, on top of the hold
    limit. Requests the scheduler has sent to a backend since leave the in-transit count without entering the
    queue: before, the door counted their seats free again until the lagging loop published, and the surplus was
    refused by the scheduler at its hard cap, ~0.45 s late (bench/overload.py, the onset)."""
    sched = Scheduler([PoolSettings(name="m", policy="capacity", hold_max_requests=8)])
    sched.add_backend(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=seats_profile(3)), T0)
    gate = OverloadGate(sched, clock=lambda: T0)
    gate.publish()
    for i in range(3):  # three pass and are sent at once: the three seats
        assert gate.judge_head(head(500)) is None
        assert isinstance(sched.submit(demand(i, T0), T0), Route)
        gate.pass_read()
    # No publication since (the loop is busy reading the burst): the queue takes 8, no more.
    passed = [gate.judge_head(head(500)) is None for _ in range(9)]
    assert passed == [True] * 8 + [False]
    for i in range(3, 11):  # and the scheduler holds every one of them: none is refused late
        assert isinstance(sched.submit(demand(i, T0), T0), Hold)
        gate.pass_read()
    refusal = gate.judge_head(head(500))
    assert refusal is not None and refusal.message == QUEUE_FULL


def test_a_request_with_its_own_deadline_neither_feeds_nor_meets_the_doors_streak():
    """A client's own x-capbalancer-deadline-ms makes its refusal about that deadline, not the pool: such refusals
    start no streak (a client sending 1-ms deadlines once had the door refuse everyone else, and a malformed
    deadline its 429 instead of its 400: tests/test_header_values.py), and a request with one is the scheduler's
    to judge."""
    sched = full_scheduler()
    gate = OverloadGate(sched)
    gate.publish()
    d = demand(1, T0)
    d.deadline_s = T0 + 1e-9  # a tiny deadline ("1e-6" ms): past by the time the scheduler judges it
    refused = sched.submit(d, T0 + 1e-6)
    assert isinstance(refused, Reject) and refused.status == 429
    gate.on_decision("m", refused, 500, time.monotonic(), own_deadline=True)
    assert gate.judge_head(head(500)) is None  # no streak: the next newcomer goes to the scheduler
    refuse_one(sched, gate, 2, T0)  # a refusal by the pool's own objective does start one
    assert gate.judge_head(head(500)) is not None
    assert gate.judge_head(head(500, b"x-capbalancer-deadline-ms: 60000\r\n")) is None  # its own terms
    assert gate.judge_head(head(500, b"X-Capbalancer-Deadline-Ms: " + b"1" * 300 + b"\r\n")) is None
