"""The default TPOT objective (issue 15 §2, issue 14 §6): with no `tpot_slo_ms`, `capacity` stops filling a
backend's seats where its predicted TPOT passes max(100 ms, 1.5x its one-sequence TPOT).

Unit tests on the pure capacity model, and a DES check on a real slow profile (L4) that the default keeps the
served requests' TPOT near the objective where filling every seat (the old default) did not.
"""

from __future__ import annotations

from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.backend import BackendState, InflightRequest
from capbalancer.sched.capacity import CapacityModel, CapacitySettings
from capbalancer.sched.capacity_policy import settings_from_options
from capbalancer.sched.objectives import derived_tpot_objective_s
from capbalancer.sched.types import BackendSpec, Demand, HealthSettings
from capbalancer.sim.des import DesInstance, DesOptions, run_des

STEP = StepTimeModel(fixed_seconds=0.02, prefill_seconds_per_token=1e-5, decode_seconds_per_seq=0.002,
                     context_seconds_per_token=0.0)


def profile(step: StepTimeModel = STEP) -> Profile:
    return Profile(name="p", gpu="test", model="m", tp=1, engine="vllm", kv_capacity_tokens=1_000_000, step=step,
                   max_num_seqs=256, max_num_batched_tokens=2048)


def test_objective_is_the_floor_or_a_multiple_of_the_idle_step():
    # Idle TPOT 22 ms: the 100 ms floor applies.
    assert derived_tpot_objective_s(STEP, 0, 1.5, 0.1) == 0.1
    # A backend whose idle step is 80 ms could never reach 100 ms with a batch worth having: 1.5x its own step.
    slow = StepTimeModel(fixed_seconds=0.078, prefill_seconds_per_token=1e-5, decode_seconds_per_seq=0.002,
                         context_seconds_per_token=0.0)
    assert abs(derived_tpot_objective_s(slow, 0, 1.5, 0.1) - 0.12) < 1e-9
    # Calibration scales the step the objective is taken from.
    assert abs(derived_tpot_objective_s(slow, 0, 1.5, 0.1, correction=2.0) - 0.24) < 1e-9
    assert derived_tpot_objective_s(STEP, 0, 0.0, 0.1) is None  # factor 0: off


def test_options_parse_and_default_on():
    s, _ = settings_from_options({})
    assert s.tpot_objective_factor == 1.5 and s.tpot_objective_floor_s == 0.1
    s, _ = settings_from_options({"tpot_objective_factor": 0, "tpot_objective_floor_ms": 50})
    assert s.tpot_objective_factor == 0.0 and s.tpot_objective_floor_s == 0.05


def loaded(seqs: int) -> BackendState:
    state = BackendState(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=profile()))
    for i in range(seqs):
        state.add_inflight(InflightRequest(request_id=f"r{i}", backend_id="b", prompt_tokens=10, max_tokens=100,
                                           expected_output_tokens=100, dispatched_at_s=0.0))
    return state


def test_default_stops_admitting_past_the_objective_and_factor_zero_fills_seats():
    health = HealthSettings()
    d = Demand(request_id="new", pool="m", prompt_tokens=10, max_tokens=100, arrival_s=0.0)
    default = CapacityModel(health, CapacitySettings())
    off = CapacityModel(health, CapacitySettings(tpot_objective_factor=0.0))
    # TPOT = 20 ms + 2 ms x batch: 30 sequences (~80 ms) fit under 100 ms, 60 (~140 ms) do not.
    assert default.estimate(loaded(30), d, 100, 0.0).admits
    est = default.estimate(loaded(60), d, 100, 0.0)
    assert est.tpot_s > 0.1 and not est.admits
    assert off.estimate(loaded(60), d, 100, 0.0).admits  # the old default: every seat is filled
    # A user's objective overrides the derived one.
    user = CapacityModel(health, CapacitySettings(tpot_slo_s=0.2))
    assert user.estimate(loaded(60), d, 100, 0.0).admits


def test_des_default_keeps_a_slow_gpu_near_its_tpot_objective():
    """An L4 serving Llama-3.1-8B at 2x its capacity: filling all 256 seats runs ~300 ms per token; the default
    keeps the requests it serves near 100 ms, so more of them meet a 100 ms TPOT objective."""
    inst = [DesInstance("l4", resolve_profile("l4/llama-3.1-8b-tp1"))]
    wl = "rate=16,n=400,prompt=300,output=150,seed=3"

    def run(options: dict[str, float]):
        return run_des(inst, wl, "capacity", DesOptions(profile_error=0.0, policy_options=options)).records

    def tpot_ok(records) -> int:
        return sum(1 for x in records if x.success and x.tpot_s is not None and x.tpot_s <= 0.11)

    default, off = run({}), run({"tpot_objective_factor": 0})
    served = [x.tpot_s for x in default if x.success and x.tpot_s is not None]
    assert served and sorted(served)[int(0.9 * len(served))] <= 0.12, sorted(served)[-5:]
    assert tpot_ok(default) > 1.5 * tpot_ok(off), (tpot_ok(default), tpot_ok(off))
