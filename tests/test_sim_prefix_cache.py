"""The simulator's vLLM-style prefix cache: hits, blocks shared by running requests, LRU eviction of freed
blocks, the off switch, and conservation of KV blocks throughout a random shared-prefix workload."""

import random

import pytest

from capbalancer.profiling.schema import StepTimeModel
from capbalancer.sim.engine import EngineConfig, EngineModel, Finished, FirstToken, SimRequest
from capbalancer.sim.prefix_cache import PrefixCache, block_hashes

STEP = StepTimeModel(fixed_seconds=0.01, prefill_seconds_per_token=0.001, decode_seconds_per_seq=0.001,
                     context_seconds_per_token=0.0)


def engine(blocks=64, caching=True, block_size=16, max_run_steps=1 << 30):
    cfg = EngineConfig(block_size=block_size, num_gpu_blocks=blocks, max_num_seqs=16, max_num_batched_tokens=4096,
                       max_model_len=blocks * block_size, step=STEP, enable_prefix_caching=caching)
    return EngineModel(cfg, max_run_steps=max_run_steps)


def run(eng, rid, ids, output, now, output_ids=None):
    """Add one request and run the engine until it finishes; returns (ttft, finish time)."""
    events = eng.add_request(SimRequest(rid, len(ids), output, output, now, token_ids=ids, output_ids=output_ids), now)
    first = None
    while True:
        for ev in events:
            if isinstance(ev, FirstToken) and ev.request_id == rid:
                first = ev.time_s - now
            if isinstance(ev, Finished) and ev.request_id == rid:
                eng.check_invariants()
                return first, ev.time_s
        eng.check_invariants()
        events = eng.advance_to(eng.next_event_s())


def test_a_repeated_prompt_hits_every_full_block_but_the_last_token_and_prefills_less():
    eng = engine()
    ids = list(range(100, 260))  # 160 tokens = 10 blocks
    ttft1, t = run(eng, "a", ids, 4, 0.0)
    cache = eng.prefix_cache
    assert (cache.queries_tokens_total, cache.hits_tokens_total) == (160, 0)
    ttft2, _ = run(eng, "b", ids, 4, t + 1.0)
    # 9 blocks: the tenth would leave no token to compute, and vLLM always computes the last one
    assert cache.hits_tokens_total == 144 and cache.queries_tokens_total == 320
    assert ttft2 == pytest.approx(STEP.fixed_seconds + 16 * STEP.prefill_seconds_per_token)
    assert ttft1 == pytest.approx(STEP.fixed_seconds + 160 * STEP.prefill_seconds_per_token)
    assert eng.prompt_tokens_total == 320 and eng.prompt_tokens_cached_total == 144
    snap = eng.snapshot(t + 2.0)
    assert snap.prefix_cache_hits_tokens_total == 144 and snap.prefix_cache_queries_tokens_total == 320


def test_a_diverging_prompt_hits_only_the_shared_blocks():
    eng = engine()
    ids = list(range(160))
    _, t = run(eng, "a", ids, 2, 0.0)
    other = ids[:40] + [9999] + ids[41:]  # differs inside block 2 (tokens 32-47)
    run(eng, "b", other, 2, t + 1)
    assert eng.prefix_cache.hits_tokens_total == 32


def test_running_requests_share_cached_blocks_and_count_them_once():
    eng = engine(max_run_steps=1)  # one step at a time: no blocks reserved ahead for a run of decodes
    prefix = list(range(128))  # 8 blocks
    _, t = run(eng, "warm", prefix + [1], 2, 0.0)
    now = t + 1
    used_before = eng.used_blocks
    eng.add_request(SimRequest("x", 129 + 16, 50, 50, now, token_ids=prefix + list(range(500, 517))), now)
    eng.add_request(SimRequest("y", 129 + 16, 50, 50, now, token_ids=prefix + list(range(700, 717))), now)
    eng.advance_to(now + 0.2)  # both prefilled, decoding
    eng.check_invariants()
    assert set(eng.running) == {"x", "y"}
    # 8 shared blocks, then each its own 17 + decoded tokens (2 blocks): 8 + 2 + 2, not 2 x 10
    assert all(eng.generated_of(r) > 2 for r in eng.running.values())
    assert eng.used_blocks - used_before == 12
    assert eng.prefix_cache.refs[block_hashes(prefix, 16)[0]] == 2


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_used_first():
    eng = engine(blocks=20)  # 320 tokens of KV
    a, b, c = list(range(0, 128)), list(range(1000, 1128)), list(range(2000, 2128))
    _, t = run(eng, "a", a, 1, 0.0)
    _, t = run(eng, "b", b, 1, t + 1)
    assert len(eng.prefix_cache.lru) == 16 and eng.free_blocks == 20  # cached blocks count as free KV
    _, t = run(eng, "c", c, 1, t + 1)  # needs 8 blocks: 4 never-used ones, then a's (the oldest) go
    hashes = eng.prefix_cache.refs
    assert all(h in hashes for h in block_hashes(b, 16)) and all(h in hashes for h in block_hashes(c, 16))
    a_hashes = block_hashes(a, 16)
    # a's tail went first (freed in reverse order): its head is still there
    assert a_hashes[0] in hashes and a_hashes[-1] not in hashes
    assert eng.prefix_cache.evictions_total == 4
    run(eng, "a2", a, 1, t + 1)
    assert eng.prefix_cache.hits_tokens_total == 4 * 16


def test_generated_tokens_are_cached_so_the_next_turn_hits_the_answer_too():
    eng = engine()
    prompt, answer = list(range(40)), list(range(5000, 5030))
    _, t = run(eng, "t1", prompt, 30, 0.0, output_ids=answer)
    second = prompt + answer + list(range(9000, 9010))
    run(eng, "t2", second, 2, t + 1)
    # KV of 40 + 29 tokens (the last answer token never entered the cache): 4 full blocks
    assert eng.prefix_cache.hits_tokens_total == 64


def test_prefix_caching_off_computes_everything_and_counts_nothing():
    eng = engine(caching=False)
    ids = list(range(160))
    ttft1, t = run(eng, "a", ids, 2, 0.0)
    ttft2, _ = run(eng, "b", ids, 2, t + 1)
    assert ttft2 == pytest.approx(ttft1)
    assert eng.prefix_cache is None
    snap = eng.snapshot(t + 2)
    assert snap.prefix_cache_hits_tokens_total == 0 and snap.prefix_cache_queries_tokens_total == 0


def test_blocks_are_conserved_under_a_random_shared_prefix_load_with_preemption():
    eng = engine(blocks=48)
    rng = random.Random(3)
    systems = [[rng.randrange(30000) for _ in range(rng.randint(20, 200))] for _ in range(4)]
    pending = []
    t = 0.0
    for i in range(150):
        t += rng.expovariate(30)
        ids = systems[rng.randrange(4)] + [rng.randrange(30000) for _ in range(rng.randint(1, 120))]
        out = rng.randint(1, 120)
        pending.append((t, f"r{i}", ids, out, [rng.randrange(30000) for _ in range(out)]))
    finished = 0
    while pending or not eng.is_idle():
        nxt = eng.next_event_s()
        if pending and (nxt is None or pending[0][0] <= nxt):
            at, rid, ids, out, oids = pending.pop(0)
            events = eng.add_request(SimRequest(rid, len(ids), out, out, at, token_ids=ids, output_ids=oids), at)
        else:
            events = eng.advance_to(nxt)
        finished += sum(isinstance(e, Finished) for e in events)
        eng.check_invariants()
    assert finished == 150
    assert eng.preemptions_total > 0, "the load should have forced preemptions"
    assert eng.prefix_cache.hits_tokens_total > 0
    assert eng.free_blocks == 48 and eng.prefix_cache.blocks_in_use == 0


def test_cache_reset_is_refused_while_blocks_are_in_use():
    cache = PrefixCache(16)
    assert cache.register(1) and not cache.register(1)
    assert not cache.reset()
    assert cache.release([1]) == 1 and cache.reset() and len(cache) == 0


def test_a_decode_run_cut_short_gives_back_the_cached_blocks_it_reserved():
    eng = engine(blocks=20)
    a = list(range(128))  # 8 blocks, cached once "a" is done
    _, t = run(eng, "a", a, 1, 0.0)
    now = t + 1
    # 1 block of prompt, then 200 decode steps planned as one run: it reserves 13 blocks, 2 more than the 11
    # uncached free ones, so two of a's cached blocks (its tail) are evicted for steps that have not run yet
    eng.add_request(SimRequest("long", 16, 200, 200, now, token_ids=list(range(5000, 5016))), now)
    eng.advance_to(now + 0.05)
    assert eng.prefix_cache.evictions_total == 2
    # an arrival cuts the run after a few steps: the unused reservations come back with their cached content
    run(eng, "a2", a, 1, now + 0.1)
    assert eng.prefix_cache.hits_tokens_total == 7 * 16


@pytest.mark.parametrize(("flavour", "shared_hit_tokens", "block_size"),
                         [("vllm", 96, 16), ("sglang", 100, 1), ("tgi", 100, 1)])
def test_each_engine_flavour_matches_a_shared_prefix_at_its_own_granularity(flavour, shared_hit_tokens, block_size):
    # vLLM caches whole 16-token blocks; SGLang's radix cache and TGI's flashinfer KV page a token at a time, so
    # a 100-token shared prefix hits 96 tokens on vLLM and all 100 on the other two (same KV capacity in tokens).
    from capbalancer.profiling.library import resolve_profile

    prof = resolve_profile("a100-80g/llama-2-13b-tp1")
    eng = EngineModel(EngineConfig.from_profile(prof, flavour))
    assert eng.block_size == block_size
    assert eng.config.kv_capacity_tokens == prof.num_gpu_blocks * prof.block_size
    ids = list(range(1000, 1160))
    _, t = run(eng, "a", ids, 3, 0.0)
    run(eng, "b", ids[:100] + [7] * 60, 3, t + 1.0)
    assert eng.prefix_cache.hits_tokens_total == shared_hit_tokens
    snap = eng.snapshot(t + 2.0, flavour)
    if flavour != "tgi":  # TGI exports no prefix-cache counters
        assert snap.prefix_cache_hits_tokens_total == shared_hit_tokens
