"""A request only some backends can ever serve (issue 14 §4), DEFAULT capacity policy, on the pure scheduler the
live proxy and the DES both run: it goes only where it fits (never to a backend whose max model length it
exceeds, where the engine would answer 400 after it waited) and, held, waits for those backends alone while the
requests behind it take the others."""

from __future__ import annotations

import dataclasses

from test_goodput_admission import T0, seats_profile

from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, Hold, PoolSettings, Route


def fleet() -> Scheduler:
    sched = Scheduler([PoolSettings(name="m", policy="capacity")])
    big = dataclasses.replace(seats_profile(1), name="big", max_model_len=16_384)
    small = dataclasses.replace(seats_profile(1), name="small", max_model_len=2_048)
    sched.add_backend(BackendSpec(backend_id="big", pool="m", engine="vllm", profile=big), T0)
    sched.add_backend(BackendSpec(backend_id="small", pool="m", engine="vllm", profile=small), T0)
    return sched


def ask(i: int, prompt: int, now: float = T0) -> Demand:
    return Demand(request_id=f"r{i}", pool="m", prompt_tokens=prompt, max_tokens=50, arrival_s=now,
                  prompt_tokens_exact=True, max_tokens_explicit=True)


def test_a_long_prompt_never_goes_to_a_backend_too_short_for_it():
    sched = fleet()
    # Both idle: the small one is never chosen for a prompt beyond its max model length, however idle.
    for i in range(6):
        decision = sched.submit(ask(i, 4_000), T0)
        assert not isinstance(decision, Route) or decision.backend_id == "big", decision
        sched.cancel(f"r{i}", T0)


def test_a_held_long_prompt_blocks_only_the_backends_that_can_serve_it():
    sched = fleet()
    assert sched.submit(ask(1, 4_000), T0) == Route("big")  # the big backend is busy now
    long_held = sched.submit(ask(2, 4_000), T0)
    assert isinstance(long_held, Hold)  # waits for the big one, never sent to the small one
    assert isinstance(sched.submit(ask(3, 100), T0), Hold)  # behind it in the queue
    events = sched.tick(T0 + 0.05)
    # The short one behind goes to the small backend at the next pass; the long one keeps its place.
    assert [(type(e), e.request_id, e.backend_id) for e in events] == [(Dispatch, "r3", "small")]
    assert sched.is_held("r2")
    # The big backend frees: the long one is next there, not anything that arrived after it.
    assert isinstance(sched.submit(ask(4, 100, T0 + 0.06), T0 + 0.06), Hold)
    events = sched.finish("r1", T0 + 0.07, output_tokens=50)
    assert (Dispatch, "r2", "big") in [(type(e), e.request_id, getattr(e, "backend_id", None)) for e in events]
