"""Capacity model and policy on a virtual clock: pure, no sockets."""

import pytest

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, Hold, PoolSettings, Route


def profile(name, step_scale=1.0, kv_tokens=100_000, max_num_seqs=256):
    return Profile(
        name=name, gpu=name, model="m", tp=1, engine="vllm", kv_capacity_tokens=kv_tokens,
        step=StepTimeModel(fixed_seconds=0.010 * step_scale, prefill_seconds_per_token=0.0001 * step_scale,
                           decode_seconds_per_seq=0.0002 * step_scale, context_seconds_per_token=1e-7 * step_scale),
        max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
    )


def make(backends, policy="capacity", **options):
    sched = Scheduler([PoolSettings(name="m", policy=policy, policy_options=options, hold_timeout_s=60.0)])
    for name, prof in backends:
        sched.add_backend(BackendSpec(backend_id=name, pool="m", engine="vllm", profile=prof), 0.0)
    return sched


def demand(i, prompt=500, max_tokens=200, now=0.0):
    return Demand(request_id=f"r{i}", pool="m", prompt_tokens=prompt, max_tokens=max_tokens, arrival_s=now)


def test_idle_cluster_sends_the_first_request_to_the_fast_gpu():
    sched = make([("slow", profile("slow", 8.0)), ("fast", profile("fast", 1.0))])
    assert sched.submit(demand(0), 0.0) == Route("fast")


def test_fast_gpu_takes_work_until_its_batch_makes_it_as_slow_as_the_other():
    # fast is 4x faster per step; with per-sequence cost the fast one should take most, but not all.
    sched = make([("slow", profile("slow", 4.0)), ("fast", profile("fast", 1.0))])
    picks = [sched.submit(demand(i), 0.0) for i in range(200)]
    share_fast = sum(1 for p in picks if p == Route("fast")) / len(picks)
    assert 0.6 < share_fast < 0.97


def test_memory_short_backend_is_not_overfilled_and_requests_are_held_then_released():
    # Each request needs ~500 prompt + 0.5*100 reserved = 550 tokens: 10,000 KV tokens fit ~17 of them.
    small = profile("small", 1.0, kv_tokens=10_000)
    sched = make([("small", small)])
    decisions = [sched.submit(demand(i, max_tokens=100), 0.0) for i in range(30)]
    routed = [d for d in decisions if isinstance(d, Route)]
    held = [d for d in decisions if isinstance(d, Hold)]
    assert 14 <= len(routed) <= 18 and len(held) == 30 - len(routed)
    # A completion frees room: the head of the hold queue goes out at once.
    events = sched.finish("r0", 1.0, output_tokens=100)
    dispatched = [e for e in events if isinstance(e, Dispatch)]
    assert dispatched and dispatched[0].request_id == f"r{len(routed)}"


def test_compute_cap_holds_when_tpot_slo_would_break():
    # decode step = 10 ms + 0.2 ms/seq (+ 0.05 ms context), plus prefill churn: each sequence pays
    # 0.1 ms/token x 500 prompt tokens / 100 expected output tokens = 0.5 ms per token. A 20 ms TPOT
    # SLO therefore allows about 10 / 0.75 = 13 sequences.
    sched = make([("a", profile("a", 1.0, kv_tokens=10_000_000))], tpot_slo_ms=20)
    decisions = [sched.submit(demand(i), 0.0) for i in range(100)]
    routed = sum(isinstance(d, Route) for d in decisions)
    assert 11 <= routed <= 15


def test_snapshot_of_external_load_counts_against_the_backend():
    sched = make([("a", profile("a", 1.0, kv_tokens=100_000)), ("b", profile("b", 1.0, kv_tokens=100_000))])
    sched.observe("a", EngineSnapshot(taken_at_s=0.0, engine="vllm", running=60, waiting=0,
                                      kv_usage_fraction=0.6, kv_capacity_tokens=100_000), 0.0)
    sched.observe("b", EngineSnapshot(taken_at_s=0.0, engine="vllm", running=0, waiting=0,
                                      kv_usage_fraction=0.0, kv_capacity_tokens=100_000), 0.0)
    assert sched.submit(demand(0), 0.1) == Route("b")


def test_calibration_converges_on_a_profile_that_is_twice_too_optimistic():
    prof = profile("a", 1.0, kv_tokens=10_000_000)
    sched = make([("a", prof)])
    state = sched.backends["a"]
    now = 0.0
    for i in range(40):
        assert sched.submit(demand(i, prompt=100, max_tokens=50), now) == Route("a")
        true_tpot = 2.0 * prof.step.decode_step_seconds(1, 150)
        true_ttft = 2.0 * (100 * prof.step.prefill_seconds_per_token + prof.step.decode_step_seconds(0, 0))
        sched.on_first_token(f"r{i}", now + true_ttft)
        now += true_ttft + 49 * true_tpot
        sched.finish(f"r{i}", now, output_tokens=50)
        now += 0.01
    assert state.tpot_correction.value == pytest.approx(2.0, rel=0.1)
    assert state.ttft_correction.value == pytest.approx(2.0, rel=0.2)
    # After calibration the prediction the admin API shows matches what is observed.
    sched.submit(demand(999, prompt=100, max_tokens=50), now)
    req = state.inflight["r999"]
    assert req.predicted_tpot_s == pytest.approx(true_tpot, rel=0.15)
    described = sched.describe(now)["backends"]["a"]
    assert described["tpot_seconds"]["observed"] == pytest.approx(true_tpot, rel=0.05)


def test_backend_without_profile_is_still_routed_and_learns_its_speed():
    sched = make([("noprof", None)])
    assert sched.submit(demand(0), 0.0) == Route("noprof")


def test_weighted_follows_profile_throughput():
    sched = make([("slow", profile("slow", 4.0)), ("fast", profile("fast", 1.0))], policy="weighted")
    picks = [sched.submit(demand(i), 0.0).backend_id for i in range(100)]
    assert 70 <= picks.count("fast") <= 90


def test_cache_aware_switches_to_least_loaded_past_both_thresholds():
    sched = make([("a", None), ("b", None)], policy="cache_aware")
    # Fill 'a' by hand well past the absolute threshold of 64 and 1.5x ratio.
    for i in range(100):
        sched.submit(demand(i, prompt=1), 0.0)
    loads = {b: len(s.inflight) for b, s in sched.backends.items()}
    assert abs(loads["a"] - loads["b"]) <= 64


def test_llm_d_prefers_lower_queue_and_kv():
    sched = make([("a", None), ("b", None)], policy="llm_d")
    sched.observe("a", EngineSnapshot(taken_at_s=0.0, engine="vllm", running=10, waiting=5,
                                      kv_usage_fraction=0.9, kv_capacity_tokens=1000), 0.0)
    sched.observe("b", EngineSnapshot(taken_at_s=0.0, engine="vllm", running=10, waiting=0,
                                      kv_usage_fraction=0.2, kv_capacity_tokens=1000), 0.0)
    assert sched.submit(demand(0), 0.1) == Route("b")
