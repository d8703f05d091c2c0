"""The pool headroom (/metrics, the autoscaler's signal) counts only the seats the TPOT objective lets a backend
fill (issue 15 §4): under the default derived objective a slow backend stops admitting long before its
max_num_seqs, and counting those seats as free told an autoscaler there was room when requests were held."""

from __future__ import annotations

from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.headroom import pool_headroom
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Hold, PoolSettings, Route

# A slow decoder: 20 ms + 2 ms per sequence, so 100 ms (the derived objective's floor) at ~40 sequences.
SLOW = Profile(name="slow", gpu="g", model="m", tp=1, engine="vllm", kv_capacity_tokens=10_000_000,
               step=StepTimeModel(0.02, 1e-5, 0.002, 0.0), max_num_seqs=256, max_num_batched_tokens=2048)


def scheduler(**options) -> Scheduler:
    sched = Scheduler([PoolSettings(name="m", policy="capacity", policy_options=options, default_max_tokens=100,
                                    hold_timeout_s=60.0)])
    sched.add_backend(BackendSpec(backend_id="slow", pool="m", engine="vllm", profile=SLOW), 0.0)
    return sched


def test_headroom_seats_stop_at_the_tpot_objective():
    sched = scheduler()
    idle = pool_headroom(sched, "m", 0.0, typical_prompt_tokens=100)
    assert 30 <= idle.seats <= 45, idle  # not the 256 seats
    decisions = [sched.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=100,
                                     arrival_s=0.0), 0.0) for i in range(60)]
    routed = sum(isinstance(d, Route) for d in decisions)
    held = sum(isinstance(d, Hold) for d in decisions)
    assert held > 0 and abs(routed - idle.seats) <= 2, (routed, idle.seats)
    full = pool_headroom(sched, "m", 0.0, typical_prompt_tokens=100)
    assert full.requests < 0 and full.held == held  # held demand shows as negative headroom: scale out


def test_without_an_objective_every_seat_counts():
    assert pool_headroom(scheduler(tpot_objective_factor=0), "m", 0.0, typical_prompt_tokens=100).seats == 256
