"""Refusal at arrival under overload (issue 14): the front door's verdict (server/overload.py) against the
scheduler's own, on the DEFAULT capacity configuration, and live: a 10x-overloaded proxy refuses at its door.

The door refuses only what the scheduler would refuse too: while every newly arrived request was refused and no
room has been freed since (nothing finished, no fresher snapshot) that a request passed on has not claimed.
"""

from __future__ import annotations

import time

from test_goodput_admission import T0, demand, make

from capbalancer.sched.admission import STANDING_MIN_S
from capbalancer.sched.types import Hold, Reject, Route
from capbalancer.server.overload import STREAK_FRESH_S, OverloadGate


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
    assert after is not None and after >= 1.0
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
