"""Capacity model and policy on a virtual clock: pure, no sockets."""

import pytest

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.capacity import CapacityModel, CapacitySettings
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, HealthSettings, Hold, PoolSettings, Route


def profile(name, step_scale=1.0, kv_tokens=100_000, max_num_seqs=256):
    return Profile(
        name=name, gpu=name, model="m", tp=1, engine="vllm", kv_capacity_tokens=kv_tokens,
        step=StepTimeModel(fixed_seconds=0.010 * step_scale, prefill_seconds_per_token=0.0001 * step_scale,
                           decode_seconds_per_seq=0.0002 * step_scale, context_seconds_per_token=1e-7 * step_scale),
        max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
    )


def make(backends, policy="capacity", **options):
    if policy == "capacity":
        # These tests pin routing with no TTFT objective (they never complete anything, so a default
        # objective would refuse most of their burst): goodput admission has its own tests.
        options.setdefault("ttft_objective_factor", 0)
        options.setdefault("tpot_objective_factor", 0)  # nor the default TPOT objective (its own tests)
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
    # SLO therefore allows about 10 / 0.75 = 13 sequences with no margin; the default 10% margin admits up to
    # 18 ms: about 8 / 0.75 = 10.
    def routed(**options):
        sched = make([("a", profile("a", 1.0, kv_tokens=10_000_000))], tpot_slo_ms=20, **options)
        return sum(isinstance(sched.submit(demand(i), 0.0), Route) for i in range(100))

    assert 11 <= routed(tpot_slo_margin=0) <= 15
    assert 8 <= routed() <= 11 < routed(tpot_slo_margin=0)


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


def test_non_streamed_answers_lower_a_too_slow_tpot_model_and_never_raise_it():
    """A non-streamed answer shows no first token, but its time over its tokens bounds its TPOT from above: a
    model slower than that bound is corrected down to it (instant backends were held by a 154 ms prediction);
    a slow answer says nothing (its queue and prefill may be all of it), so it never raises the correction."""
    prof = profile("a", 1.0, kv_tokens=10_000_000)
    sched = make([("a", prof)])
    state = sched.backends["a"]
    model_tpot = prof.step.decode_step_seconds(1, 150)
    now = 0.0
    for i in range(30):  # ten times faster than the model, whole answers only
        assert sched.submit(demand(i, prompt=100, max_tokens=50), now) == Route("a")
        now += 49 * model_tpot / 10
        sched.finish(f"r{i}", now, output_tokens=50)
        now += 0.01
    assert sched.capacity.tpot_factor(state) < 0.2
    low = sched.capacity.tpot_factor(state)
    for i in range(30, 60):  # then slow answers (say, queued): no evidence either way
        assert sched.submit(demand(i, prompt=100, max_tokens=50), now) == Route("a")
        now += 49 * model_tpot * 5
        sched.finish(f"r{i}", now, output_tokens=50)
    assert sched.capacity.tpot_factor(state) == low
    assert state.ttft_correction.value is None  # no first token seen: TTFT learns nothing


def test_backend_without_profile_is_still_routed_and_learns_its_speed():
    sched = make([("noprof", None)])
    assert sched.submit(demand(0), 0.0) == Route("noprof")


def test_weighted_follows_profile_throughput():
    sched = make([("slow", profile("slow", 4.0)), ("fast", profile("fast", 1.0))], policy="weighted")
    picks = [sched.submit(demand(i), 0.0).backend_id for i in range(100)]
    assert 70 <= picks.count("fast") <= 90


def test_weighted_obeys_configured_weights_over_profiles_even_a_weight_of_one():
    # A weight of exactly 1 once meant "unset" when a profile was present, so 2/1/1 sent nothing to the 2.
    sched = Scheduler([PoolSettings(name="m", policy="weighted")])
    for name, w in (("a", 2.0), ("b", 1.0), ("c", 1.0)):
        sched.add_backend(BackendSpec(backend_id=name, pool="m", profile=profile(name), weight=w), 0.0)
    picks = [sched.submit(demand(i), 0.0).backend_id for i in range(100)]
    assert (picks.count("a"), picks.count("b"), picks.count("c")) == (50, 25, 25)


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


def make_grouped(backends, groups):
    sched = Scheduler([PoolSettings(name="m", policy="capacity", hold_timeout_s=60.0,
                                    policy_options={"ttft_objective_factor": 0})])
    for name, prof in backends:
        sched.add_backend(BackendSpec(backend_id=name, pool="m", engine="vllm", profile=prof,
                                      gpu_group=groups.get(name)), 0.0)
    return sched


def busy(sched, name, running, now=0.0):
    sched.observe(name, EngineSnapshot(taken_at_s=now, engine="vllm", running=running, waiting=0,
                                       kv_usage_fraction=0.05, kv_capacity_tokens=100_000), now)


def test_a_busy_neighbour_on_the_same_gpu_makes_a_backend_slower():
    # b is a little faster than a on paper, but shares its GPU with c, which is busy.
    backends = [("a", profile("a", 1.0)), ("b", profile("b", 0.9)), ("c", profile("c", 1.0))]
    apart = make_grouped(backends, {})
    shared = make_grouped(backends, {"b": "gpu1", "c": "gpu1"})
    for sched in (apart, shared):
        busy(sched, "c", 40)
    # The prediction on b carries c's whole step: 10 ms + 40 x 0.2 ms + 5,000 context tokens x 1e-7 s.
    est = shared.capacity.estimate(shared.backends["b"], demand(1), 100, 0.1)
    est_apart = apart.capacity.estimate(apart.backends["b"], demand(1), 100, 0.1)
    assert est.tpot_s - est_apart.tpot_s == pytest.approx(0.010 + 40 * 0.0002 + 5_000 * 1e-7, rel=0.01)
    assert apart.submit(demand(0), 0.1) == Route("b")
    assert shared.submit(demand(0), 0.1) == Route("a")


def test_an_idle_neighbour_costs_nothing():
    backends = [("b", profile("b", 1.0)), ("c", profile("c", 1.0))]
    apart = make_grouped(backends, {})
    shared = make_grouped(backends, {"b": "gpu1", "c": "gpu1"})
    a = apart.capacity.estimate(apart.backends["b"], demand(0), 100, 0.0)
    s = shared.capacity.estimate(shared.backends["b"], demand(0), 100, 0.0)
    assert s.tpot_s == a.tpot_s and s.ttft_s == a.ttft_s


def test_a_whole_gpu_takes_more_than_each_of_two_engines_sharing_one():
    # Three equal engines, two of them on one GPU: the lone one is worth about as much as the pair together.
    backends = [("a", profile("a", 1.0)), ("b", profile("b", 1.0)), ("c", profile("c", 1.0))]
    apart = make_grouped(backends, {})
    shared = make_grouped(backends, {"b": "gpu1", "c": "gpu1"})
    share_a = {}
    for label, sched in (("apart", apart), ("shared", shared)):
        picks = [sched.submit(demand(i), 0.0) for i in range(150)]
        share_a[label] = sum(p == Route("a") for p in picks) / len(picks)
    assert share_a["apart"] == pytest.approx(1 / 3, abs=0.02)
    assert 0.42 < share_a["shared"] < 0.6


def test_gpu_siblings_follow_backends_added_and_removed():
    sched = make_grouped([("b", profile("b")), ("c", profile("c")), ("d", profile("d"))], {"b": "g", "c": "g", "d": "g"})
    assert {s.backend_id for s in sched.backends["b"].gpu_siblings} == {"c", "d"}
    sched.remove_backend("c", 1.0)
    assert [s.backend_id for s in sched.backends["b"].gpu_siblings] == ["d"]
    sched.add_backend(BackendSpec(backend_id="d", pool="m", engine="vllm", profile=profile("d")), 2.0)  # moved off
    assert sched.backends["b"].gpu_siblings == [] and sched.backends["d"].gpu_siblings == []
    assert sched.describe(2.0)["backends"]["b"]["gpu_group"] == "g"


def test_calibration_does_not_learn_the_neighbours_contention_twice():
    # The profile is right and c's steps are modelled: b's correction must stay near 1 while c is busy.
    backends = [("b", profile("b", 1.0, kv_tokens=10_000_000)), ("c", profile("c", 1.0, kv_tokens=10_000_000))]
    sched = make_grouped(backends, {"b": "g", "c": "g"})
    state = sched.backends["b"]
    now = 0.0
    for i in range(20):
        busy(sched, "c", 30, now)
        d = Demand(request_id=f"x{i}", pool="m", prompt_tokens=500, max_tokens=101, arrival_s=now)
        # only b may take it: c is drained
        sched.set_draining("c", True, now)
        assert sched.submit(d, now) == Route("b")
        own_step = profile("b").step.decode_step_seconds(1, 600)
        c_step = profile("c").step.decode_step_seconds(30, 5_000)
        sched.on_first_token(d.request_id, now + 0.05)
        sched.finish(d.request_id, now + 0.05 + 100 * (own_step + c_step), output_tokens=101)
        now += 60.0
    assert sched.capacity.tpot_factor(state) == pytest.approx(1.0, abs=0.1)
    # The contention went to the learned interference factor, which finds sum-of-steps right here.
    assert state.interference.count == 20
    assert state.interference.factor == pytest.approx(1.0, abs=0.1)


def test_ttft_objective_holds_requests_instead_of_queueing_prefill_on_a_fast_decoder():
    # One fast-decoding backend; long prompts pile up prefill there. With a 1 s TTFT objective the proxy
    # holds what could not start within it instead of letting it queue inside the engine.
    prof = profile("a", 1.0, kv_tokens=10_000_000)
    free = make([("a", prof)])
    bounded = make([("a", prof)], ttft_slo_ms=1000)
    # (Counted aside: a compiled Scheduler, tools/compile_sched.py, takes no attributes of a test's own.)
    routed = {name: sum(isinstance(sched.submit(demand(i, prompt=2000), 0.0), Route) for i in range(60))
              for name, sched in (("free", free), ("bounded", bounded))}
    assert routed["free"] == 60
    # Each 2,000-token prompt costs 0.2 s of prefill on top of its chunk's decode step: about five fit in 1 s.
    assert 3 <= routed["bounded"] <= 6
    model = CapacityModel(HealthSettings(), CapacitySettings(ttft_slo_s=1.0))
    est = model.estimate(bounded.backends["a"], demand(99, prompt=2000), 200, 0.0)
    assert est.ttft_s > 1.0 and not est.admits


def test_a_dispatch_records_the_prediction_the_policy_scored_exactly_as_the_full_estimate_gives_it():
    # The default policy hands its evaluation of the chosen backend to the dispatch (one evaluation per backend
    # per request): what the request records for calibration must be `capacity.estimate`'s numbers, to the bit,
    # while the backends fill and with prefix hits. (Releases take the same path; the DES figures of
    # bench/policies.py --quick were identical before and after.)
    from capbalancer.sched.prefix_hash import PrefixKey

    sched = Scheduler([PoolSettings(name="m", policy="capacity")])  # the default options, as served
    for name, prof in [("slow", profile("slow", 3.0, max_num_seqs=8)), ("fast", profile("fast", 1.0, max_num_seqs=8))]:
        sched.add_backend(BackendSpec(backend_id=name, pool="m", engine="vllm", profile=prof), 0.0)
    checked = 0

    def expect(d: Demand, now: float) -> dict[str, tuple[float, float, float, int]]:
        pool = sched.pools["m"]
        expected = pool.output_lengths.expected(d.max_tokens)
        out = {}
        for name, b in sched.backends.items():
            est = sched.capacity.estimate(b, d, expected, now)
            out[name] = (est.ttft_s, est.tpot_s, sched.capacity.base_ttft(est, b),
                         sched.capacity.cached_tokens(b, d)[0])
        return out

    def recorded(rid: str) -> tuple[float, float, float, int]:
        b = sched.backends[sched.backend_of(rid)]
        r = b.inflight[rid]
        return r.predicted_ttft_s, r.predicted_tpot_s, r.predicted_ttft_base_s, r.cached_prompt_tokens

    now = 0.0
    for i in range(40):
        now += 0.01
        d = Demand(request_id=f"r{i}", pool="m", prompt_tokens=300 + 7 * i, max_tokens=100, arrival_s=now,
                   prefix=PrefixKey(hashes=(1, 2, i % 3), block_tokens=16))
        before = expect(d, now)
        decision = sched.submit(d, now)
        if isinstance(decision, Route):
            assert recorded(d.request_id) == before[decision.backend_id]
            checked += 1
    assert sched.held_count() > 0 and checked >= 10
