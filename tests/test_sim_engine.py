"""The engine model: vLLM-style batching limits, paged KV conservation, preemption, and profile timing."""

import random
from pathlib import Path

import pytest

from capbalancer.profiling.schema import load_profile
from capbalancer.sim.engine import (
    EngineConfig,
    EngineModel,
    Finished,
    FirstToken,
    RequestTooLong,
    SimRequest,
    Token,
    output_length,
)

PROFILES = Path(__file__).parent / "data" / "profiles"


def profile(name):
    return load_profile(PROFILES / f"{name}.yaml")


def run_workload(engine, n=200, rate=20.0, seed=1, prompt=(10, 500), output=(1, 400), step_hook=None):
    rng = random.Random(seed)
    finished, first, tokens = {}, {}, {}
    targets = {}

    def collect(events):
        for ev in events:
            if isinstance(ev, Finished):
                finished[ev.request_id] = ev
            elif isinstance(ev, FirstToken):
                first[ev.request_id] = ev.time_s
            elif isinstance(ev, Token):
                tokens.setdefault(ev.request_id, []).append(ev.time_s)

    t = 0.0
    arrivals = []
    for i in range(n):
        t += rng.expovariate(rate)
        arrivals.append((t, f"r{i}", rng.randint(*prompt), rng.randint(*output)))
    pending = list(arrivals)
    while pending or not engine.is_idle():
        nxt = engine.next_event_s()
        if pending and (nxt is None or pending[0][0] <= nxt):
            at, rid, p, o = pending.pop(0)
            targets[rid] = o
            collect(engine.add_request(SimRequest(rid, p, o, o, at), at))
        else:
            collect(engine.advance_to(nxt))
        if step_hook:
            step_hook(engine)
    return finished, first, tokens, targets


def _limits_hook(cfg, seen):
    def hook(e):
        e.check_invariants()  # allocated + free == total, aggregates match the requests
        step = e.planned_step()
        if step is not None:
            prefill, decodes, steps = step
            assert steps == 1  # per-token mode plans one step at a time
            assert prefill + decodes <= cfg.max_num_batched_tokens
            seen["max_tokens"] = max(seen["max_tokens"], prefill + decodes)
        assert len(e.running) <= cfg.max_num_seqs
        seen["max_running"] = max(seen["max_running"], len(e.running))
    return hook


def test_batching_limits_and_kv_conservation_hold_at_every_step():
    # Memory-bound: long prompts on a 2048-token cache fill the token budget with prefill chunks.
    eng = EngineModel(EngineConfig.from_profile(profile("tiny-kv")), per_token_events=True)
    seen = {"max_running": 0, "max_tokens": 0}
    finished, _, _, _ = run_workload(eng, n=300, rate=40, prompt=(10, 900), output=(1, 100),
                                     step_hook=_limits_hook(eng.config, seen))
    assert len(finished) == 300
    assert seen["max_tokens"] > 1000  # prefill chunks filled the budget, never past it
    assert eng.free_blocks == eng.total_blocks  # everything given back at the end
    # Seat-bound: short requests arriving fast on a large cache reach max_num_seqs, never pass it.
    eng = EngineModel(EngineConfig.from_profile(profile("fast-13b")), per_token_events=True)
    seen = {"max_running": 0, "max_tokens": 0}
    finished, _, _, _ = run_workload(eng, n=1500, rate=400, prompt=(10, 60), output=(50, 150),
                                     step_hook=_limits_hook(eng.config, seen))
    assert len(finished) == 1500
    assert seen["max_running"] == eng.config.max_num_seqs
    assert eng.free_blocks == eng.total_blocks


def test_preemption_under_memory_pressure_and_every_request_still_finishes():
    eng = EngineModel(EngineConfig.from_profile(profile("tiny-kv")))
    finished, first, _, targets = run_workload(eng, n=200, rate=30, prompt=(100, 500), output=(100, 400),
                                               step_hook=lambda e: e.check_invariants())
    assert eng.preemptions_total > 20
    assert len(finished) == 200
    # Preemption by recompute keeps the output already produced: each request still gets its length.
    assert all(finished[rid].output_tokens == targets[rid] for rid in targets)
    assert eng.generation_tokens_total == sum(targets.values())
    assert eng.free_blocks == eng.total_blocks


def test_multi_step_runs_match_step_by_step_exactly():
    """The fast path (runs of identical decode steps) must not change any result."""
    for name in ("tiny-kv", "fast-13b", "slow-13b"):
        results = []
        for per_token in (False, True):
            eng = EngineModel(EngineConfig.from_profile(profile(name)), per_token_events=per_token)
            finished, first, _, _ = run_workload(eng, n=150, rate=15)
            results.append((finished, first, eng.preemptions_total))
        (fa, sa, pa), (fb, sb, pb) = results
        assert pa == pb
        assert fa.keys() == fb.keys()
        for rid in fa:
            assert fa[rid].time_s == pytest.approx(fb[rid].time_s, abs=1e-9)
            assert sa[rid] == pytest.approx(sb[rid], abs=1e-9)


def test_ttft_and_tpot_follow_the_profile_at_low_load():
    prof = profile("slow-13b")
    eng = EngineModel(EngineConfig.from_profile(prof), per_token_events=True)
    prompt, out = 600, 50
    events = eng.add_request(SimRequest("a", prompt, out, out, 10.0), 10.0)
    assert events == []
    times = []
    first = None
    done = None
    while not eng.is_idle():
        for ev in eng.advance_to(eng.next_event_s()):
            if isinstance(ev, FirstToken):
                first = ev.time_s
            elif isinstance(ev, Token):
                times.append(ev.time_s)
            elif isinstance(ev, Finished):
                done = ev
    assert first - 10.0 == pytest.approx(prof.step.step_seconds(prompt, 0, 0), rel=1e-9)
    assert done.output_tokens == out and done.finish_reason == "length"
    # Each decode step of a lone request: fixed + per-seq + its context (prompt + tokens so far).
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    expected = [prof.step.decode_step_seconds(1, prompt + g) for g in range(1, out)]
    assert gaps == pytest.approx(expected, rel=1e-9)
    tpot = (done.time_s - first) / (out - 1)
    assert tpot == pytest.approx(prof.step.decode_step_seconds(1, prompt + out // 2), rel=0.01)


def test_long_prompt_is_chunked_within_the_token_budget():
    prof = profile("slow-13b")  # max_num_batched_tokens 4096
    eng = EngineModel(EngineConfig.from_profile(prof), per_token_events=True)
    eng.add_request(SimRequest("a", 3000, 2, 2, 0.0), 0.0)
    eng.add_request(SimRequest("b", 3000, 2, 2, 0.0), 0.0)
    chunks = []
    while not eng.is_idle():
        chunks.append(eng.planned_step()[0])
        eng.advance_to(eng.next_event_s())
    assert chunks[0] == 4096  # a's 3000 and the first 1096 of b
    assert chunks[1] == 1904  # the rest of b (a is now decoding)
    assert max(chunks) <= prof.max_num_batched_tokens


def test_requests_longer_than_max_model_len_are_refused():
    eng = EngineModel(EngineConfig.from_profile(profile("tiny-kv")))  # max_model_len 1024
    with pytest.raises(RequestTooLong) as info:
        eng.add_request(SimRequest("a", 1000, 100, 100, 0.0), 0.0)
    assert "maximum context length is 1024 tokens" in str(info.value)
    assert eng.is_idle()


def test_abort_frees_blocks_and_emits_nothing_more():
    eng = EngineModel(EngineConfig.from_profile(profile("tiny-kv")))
    eng.add_request(SimRequest("a", 500, 300, 300, 0.0), 0.0)
    eng.add_request(SimRequest("b", 100, 100, 100, 0.0), 0.0)
    assert eng.advance_to(0.2)  # both have their first token

    assert eng.used_blocks > 0
    eng.abort("a", 0.2)
    events = []
    while not eng.is_idle():
        events += eng.advance_to(eng.next_event_s())
        eng.check_invariants()
    assert [e.request_id for e in events if isinstance(e, Finished)] == ["b"]
    assert eng.free_blocks == eng.total_blocks


def test_output_length_is_seeded_and_bounded():
    assert output_length(100, ignore_eos=True, seed=5) == 100
    draws = [output_length(500, ignore_eos=False, seed=s) for s in range(200)]
    assert draws == [output_length(500, ignore_eos=False, seed=s) for s in range(200)]
    assert all(1 <= d <= 500 for d in draws)
    assert len(set(draws)) > 50  # a spread, not a constant


def test_tgi_snapshot_is_what_the_live_adapter_reads_from_the_simulated_tgi_page():
    # The discrete-event runner hands the scheduler engine.snapshot(); the live proxy parses the sim's /metrics.
    # For TGI (no KV gauge) both must derive KV usage from the batch's token budget in the same way.
    from capbalancer.fleet.adapters import snapshot_from_metrics
    from capbalancer.sim.http.instance import SimInstance
    from capbalancer.sim.http.tgi import TgiState, render_tgi_metrics

    inst = SimInstance(profile("fast-13b"), engine_kind="tgi")
    eng = inst.engine
    for i in range(3):
        eng.add_request(SimRequest(f"r{i}", 800, 300, 400, 0.0), 0.0)
    eng.advance_to(0.05)
    live = snapshot_from_metrics("tgi", render_tgi_metrics(TgiState(inst, 128)), 0.05)
    des = eng.snapshot(0.05, "tgi")
    assert des.batch_tokens == live.batch_tokens == 3 * (800 + 400)
    assert des.kv_usage_fraction == live.kv_usage_fraction == 3 * 1200 / des.kv_capacity_tokens
    assert (des.running, des.waiting, des.kv_capacity_tokens) == (live.running, live.waiting, live.kv_capacity_tokens)
