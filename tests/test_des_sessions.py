"""Session workloads in the DES (shape=multi-turn|shared-prompt|agentic): the engines' prefix caches hit, and the
default capacity policy keeps conversations where their prefixes are at least as well as round_robin does."""

from pathlib import Path

import pytest

from capbalancer.loadtest.workloads import parse_length
from capbalancer.profiling.schema import load_profile
from capbalancer.sim.des import DesOptions, run_des
from capbalancer.sim.des_sessions import sessions_from_shape
from capbalancer.sim.workload import WorkloadSpecError, parse_workload

PROFILES = Path(__file__).parent / "data" / "profiles"
FLEET = [("fast", load_profile(PROFILES / "fast-13b.yaml")), ("slow-a", load_profile(PROFILES / "slow-13b.yaml")),
         ("slow-b", load_profile(PROFILES / "slow-13b.yaml"))]
SPEC = "shape=multi-turn,n=200,rate=4,output=lognormal:mean=150:sigma=0.5,seed=1"


def test_multi_turn_sessions_grow_their_context_turn_by_turn():
    sessions = sessions_from_shape("multi-turn:turns=3-5", 40, 4.0, 1, parse_length("50"), 4096)
    assert sum(len(s.turns) for s in sessions) == 40
    for s in sessions:
        for prev, nxt in zip(s.turns, s.turns[1:], strict=False):
            assert nxt.text.startswith(prev.text) and len(nxt.prompt_ids) > len(prev.prompt_ids)
            # a turn's prompt extends the previous one byte for byte: every full token of it is shared
            assert nxt.prompt_ids[:len(prev.prompt_ids) - 1] == prev.prompt_ids[:-1]
    assert all(a.start_s <= b.start_s for a, b in zip(sessions, sessions[1:], strict=False))


def test_capacity_hit_rate_on_multi_turn_is_at_least_round_robins():
    opts = DesOptions(poll_interval_s=0.25)
    cap = run_des(FLEET, SPEC, "capacity", opts)
    rr = run_des(FLEET, SPEC, "round_robin", opts)
    assert cap.summary["completed"] == rr.summary["completed"] == 200
    assert rr.summary["prefix_hit_rate"] > 0.1  # the engines' own caches hit even when routing ignores prefixes
    assert cap.summary["prefix_hit_rate"] >= rr.summary["prefix_hit_rate"]
    assert cap.workload["shape"] == "multi-turn"


def test_shape_spec_errors_name_the_problem():
    with pytest.raises(WorkloadSpecError, match="shape 'chat'"):
        parse_workload("shape=chat,n=10")
    with pytest.raises(WorkloadSpecError, match="rate, not concurrency"):
        parse_workload("shape=agentic,concurrency=4")
    assert parse_workload("shape=shared-prompt:tenants=2,n=10").shape == "shared-prompt:tenants=2"


def test_refused_turns_end_there_and_the_session_goes_on():
    # Past the fleet's capacity with a short hold queue, turns are refused (429): each refused turn is resolved
    # once and its session's next turn still comes (the run used to crash on the first refusal).
    res = run_des(FLEET, "shape=multi-turn:turns=2-3:think=0.1,n=200,rate=300,output=lognormal:mean=150:sigma=0.5,"
                  "seed=1", "capacity",
                  DesOptions(poll_interval_s=0.25, hold_max_requests=4, hold_timeout_s=0.5))
    assert res.summary["failed"] > 0
    assert res.summary["completed"] + res.summary["failed"] == 200
