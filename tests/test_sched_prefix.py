"""Prefix index and the capacity policy's prefix accounting, on a virtual clock: pure, no sockets."""

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.prefix_hash import token_block_hashes
from capbalancer.sched.prefix_index import BackendPrefixCache, PrefixIndex, PrefixSettings
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, PoolSettings, Route


def profile(name, step_scale=1.0, kv_tokens=200_000):
    return Profile(
        name=name, gpu=name, model="m", tp=1, engine="vllm", kv_capacity_tokens=kv_tokens,
        step=StepTimeModel(fixed_seconds=0.010 * step_scale, prefill_seconds_per_token=0.0001 * step_scale,
                           decode_seconds_per_seq=0.0002 * step_scale, context_seconds_per_token=1e-7 * step_scale),
        max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=kv_tokens,
    )


def make(backends, policy="capacity", prefix=None):
    # No TTFT objective: these bursts never complete anything (goodput admission has its own tests).
    options = {"ttft_objective_factor": 0, "tpot_objective_factor": 0} if policy == "capacity" else {}
    sched = Scheduler([PoolSettings(name="m", policy=policy, hold_timeout_s=60.0, policy_options=options)],
                      prefix=prefix)
    for name, prof in backends:
        sched.add_backend(BackendSpec(backend_id=name, pool="m", engine="vllm", profile=prof), 0.0)
    return sched


def tokens(seed, n):
    return [(seed * 7919 + i * 31) % 32000 for i in range(n)]


def demand(rid, ids, max_tokens=100, session=None, now=0.0):
    return Demand(request_id=rid, pool="m", prompt_tokens=len(ids), max_tokens=max_tokens, arrival_s=now,
                  prefix=token_block_hashes(ids, 16), session_id=session)


def test_cache_matches_leading_blocks_and_evicts_tails_before_heads():
    cache = BackendPrefixCache(capacity_blocks=6)
    a = token_block_hashes(tokens(1, 64)).hashes  # 4 blocks
    cache.touch(a, pin=False)
    assert cache.match(a).cached_blocks == 4
    assert cache.match(a[:2] + (123,)).cached_blocks == 2
    b = token_block_hashes(tokens(1, 32) + tokens(9, 32)).hashes  # shares a's first 2 blocks
    cache.touch(b, pin=False)
    assert len(cache) == 6
    c = token_block_hashes(tokens(5, 32)).hashes
    cache.touch(c, pin=False)  # 2 more blocks: a's tail goes first, the shared head stays
    assert cache.match(b).cached_blocks == 4
    assert cache.match(a).cached_blocks == 2


def test_pinned_blocks_are_never_evicted_and_unpin_on_finish():
    index = PrefixIndex(PrefixSettings(max_blocks_per_backend=4))
    index.add_backend("x")
    a = token_block_hashes(tokens(1, 64)).hashes
    index.on_dispatch("r1", "x", a, 64, None, 0, None)
    b = token_block_hashes(tokens(2, 64)).hashes
    index.on_dispatch("r2", "x", b, 64, None, 0, None)
    # Both pinned: nothing could be evicted, the cap is exceeded only by pinned blocks.
    assert index.caches["x"].match(a).pinned_blocks == 4
    index.on_finish("r1")
    index.on_finish("r2")
    c = token_block_hashes(tokens(3, 64)).hashes
    index.on_dispatch("r3", "x", c, 64, None, 0, None)
    assert len(index.caches["x"]) == 4 and index.caches["x"].match(c).cached_blocks == 4


def test_total_block_cap_bounds_memory_across_backends():
    index = PrefixIndex(PrefixSettings(max_blocks_per_backend=1000, max_total_blocks=100))
    for i in range(4):
        index.add_backend(f"b{i}")
    for i in range(4):
        for j in range(50):
            index.on_dispatch(f"r{i}.{j}", f"b{i}", token_block_hashes(tokens(i * 100 + j, 160)).hashes,
                              160, None, 0, None)
            index.on_finish(f"r{i}.{j}")
    assert index.blocks_total() <= 100


def test_multi_turn_stays_on_the_backend_that_holds_the_conversation():
    sched = make([("a", profile("a")), ("b", profile("b"))])
    convs = {s: tokens(s, 1024) for s in range(8)}
    first = {}
    for s, ids in convs.items():
        d = sched.submit(demand(f"s{s}.0", ids), 0.0)
        first[s] = d.backend_id
    assert set(first.values()) == {"a", "b"}  # load still spreads sessions
    for s in convs:
        sched.finish(f"s{s}.0", 1.0, output_tokens=100)
    for s, ids in convs.items():
        ids2 = ids + tokens(s + 50, 256)
        assert sched.submit(demand(f"s{s}.1", ids2), 2.0) == Route(first[s])


def test_prefix_free_requests_see_no_cached_tokens():
    sched = make([("a", profile("a")), ("b", profile("b"))])
    d = Demand(request_id="x", pool="m", prompt_tokens=1000, max_tokens=100, arrival_s=0.0)
    for name in ("a", "b"):
        assert sched.capacity.cached_tokens(sched.backends[name], d) == (0, 0)


def test_affinity_yields_when_the_holder_is_much_slower():
    # The prefix sits on a GPU 20x slower per step: recomputing 1k tokens on the fast one is cheaper.
    sched = make([("slow", profile("slow", 20.0)), ("fast", profile("fast", 1.0))])
    ids = tokens(1, 1024)
    sched.prefix.on_dispatch("seed", "slow", token_block_hashes(ids, 16).hashes, 1024, None, 0, None)
    sched.prefix.on_finish("seed")
    assert sched.submit(demand("r", ids + tokens(2, 64)), 0.0) == Route("fast")


def test_affinity_wins_on_equal_gpus_and_yields_when_the_holder_is_busy():
    sched = make([("a", profile("a")), ("b", profile("b"))])
    ids = tokens(1, 2048)
    sched.prefix.on_dispatch("seed", "a", token_block_hashes(ids, 16).hashes, 2048, None, 0, None)
    sched.prefix.on_finish("seed")
    assert sched.submit(demand("r0", ids + tokens(2, 64)), 0.0) == Route("a")
    sched.finish("r0", 0.5, output_tokens=10)
    # Load `a` with long-prompt work of its own: its prefill backlog outweighs the hit.
    for i in range(12):
        sched.submit(Demand(request_id=f"bulk{i}", pool="m", prompt_tokens=4000, max_tokens=200,
                            arrival_s=1.0), 1.0)
    placed_on_a = sum(1 for r in sched.backends["a"].inflight if r.startswith("bulk"))
    assert 0 < placed_on_a < 12
    busy, other = ("a", "b") if placed_on_a > 6 else ("b", "a")
    ids_busy = tokens(3, 512)
    sched.prefix.on_dispatch("seed2", busy, token_block_hashes(ids_busy, 16).hashes, 512, None, 0, None)
    sched.prefix.on_finish("seed2")
    # A long prefill backlog on the holder (another client's work): the other wins even without the hit.
    sched.backends[busy].own_pending_prefill_tokens += 60_000
    assert sched.submit(demand("r1", ids_busy + tokens(4, 64)), 1.0) == Route(other)


def test_index_forgets_what_a_full_kv_cache_must_have_evicted():
    # 4,096-token KV: after prompts of 8,000 other tokens, the first prompt's blocks are gone.
    sched = make([("a", profile("a", kv_tokens=4096))])
    first = tokens(1, 2048)
    sched.submit(demand("r0", first, max_tokens=10), 0.0)
    sched.finish("r0", 1.0, output_tokens=10)
    for i in range(4):
        sched.submit(demand(f"o{i}", tokens(10 + i, 2000), max_tokens=10), 2.0 + i)
        sched.finish(f"o{i}", 2.5 + i, output_tokens=10)
    d = demand("r1", first, max_tokens=10)
    assert sched.capacity.cached_tokens(sched.backends["a"], d) == (0, 0)


def test_engine_hit_counter_discounts_the_belief():
    sched = make([("a", profile("a"))])
    sched.observe_prefix_hits("a", 0, 0.0)
    ids = tokens(1, 1024)
    sched.submit(demand("r0", ids), 0.1)
    sched.finish("r0", 0.2, output_tokens=100)
    for i in range(1, 20):
        sched.submit(demand(f"r{i}", ids), i)
        sched.finish(f"r{i}", i + 0.5, output_tokens=100)
        sched.observe_prefix_hits("a", 0, i + 0.6)  # the engine never reports a hit
    cached, _ = sched.capacity.cached_tokens(sched.backends["a"], demand("q", ids))
    assert sched.prefix.hit_rates["a"].samples > 5
    assert cached < 0.3 * 1024


def test_session_affinity_is_a_soft_hint_without_hashes():
    sched = make([("a", profile("a")), ("b", profile("b"))])
    d0 = Demand(request_id="t0", pool="m", prompt_tokens=3000, max_tokens=50, arrival_s=0.0, session_id="u1")
    first = sched.submit(d0, 0.0).backend_id
    sched.finish("t0", 1.0, output_tokens=50)
    for i in range(1, 4):
        d = Demand(request_id=f"t{i}", pool="m", prompt_tokens=3000 + 500 * i, max_tokens=50, arrival_s=i,
                   session_id="u1")
        assert sched.submit(d, float(i)) == Route(first)
        sched.finish(f"t{i}", i + 0.5, output_tokens=50)


def text_demand(rid, text, now=0.0):
    from capbalancer.sched.prefix_hash import text_block_hashes

    key = text_block_hashes(text)
    return Demand(request_id=rid, pool="m", prompt_tokens=max(1, len(text) // 4), max_tokens=50, arrival_s=now,
                  prefix=key)


def test_cache_aware_follows_the_longest_match_above_its_threshold():
    sched = make([("a", profile("a")), ("b", profile("b"))], policy="cache_aware")
    system = "You are a careful assistant. " * 40  # ~1,100 characters shared
    first = sched.submit(text_demand("r0", system + "question zero"), 0.0).backend_id
    # A different prompt goes to the other (smallest) tree; the shared prefix then follows the first.
    other = sched.submit(text_demand("r1", "unrelated " * 100), 0.0).backend_id
    assert other != first
    for i in range(2, 8):
        assert sched.submit(text_demand(f"r{i}", system + f"question {i} " * 20), 0.0) == Route(first)
    # Under the threshold (a short shared head, a long new tail): the smallest tree wins instead.
    d = text_demand("r9", system[:128] + "new material " * 200)
    assert sched.submit(d, 0.0) == Route(other)


def test_cache_aware_falls_back_to_the_shortest_queue_when_load_is_imbalanced():
    sched = make([("a", profile("a")), ("b", profile("b"))], policy="cache_aware")
    system = "Shared instructions for every tenant. " * 40
    holder = sched.submit(text_demand("h", system + "x"), 0.0).backend_id
    # 70 requests in flight on the holder, none on the other: imbalanced (70 - 0 > 64 and 70 > 0 * 1.5).
    for i in range(70):
        sched.backends[holder].inflight[f"fake{i}"] = sched.backends[holder].inflight["h"]
    other = "b" if holder == "a" else "a"
    assert sched.submit(text_demand("q", system + "y"), 0.0) == Route(other)


def test_llm_d_prefix_scorer_sends_a_shared_prompt_back_to_its_server():
    sched = make([("a", profile("a")), ("b", profile("b"))], policy="llm_d")
    for name in ("a", "b"):  # equal, fresh metrics: only the prefix scorer separates them
        sched.observe(name, EngineSnapshot(taken_at_s=0.0, engine="vllm", running=0, waiting=0,
                                           kv_usage_fraction=0.1, kv_capacity_tokens=200_000), 0.0)
    system = "Long tenant system prompt with rules. " * 60
    first = sched.submit(text_demand("r0", system + "a"), 0.0).backend_id
    picks = {sched.submit(text_demand(f"r{i}", system + f"q{i}"), 0.0).backend_id for i in range(1, 10)}
    assert picks == {first}


def test_proxy_keys_share_across_aliases_and_never_across_pools_or_adapters():
    import orjson

    from capbalancer.server.parsing import parse_body, prefix_key, session_of

    def key(model, pool="m", aliases=("m-alias",)):
        body = {"model": model, "messages": [{"role": "user", "content": "the same long prompt " * 20}],
                "user": "alice"}
        parsed = parse_body("/v1/chat/completions", orjson.dumps(body), keep_text=True)
        return prefix_key(parsed, pool, aliases), parsed

    base, parsed = key("m")
    assert len(base) >= 5 and key("m-alias")[0] == base
    assert key("my-lora")[0].hashes[0] != base.hashes[0]
    assert key("m", pool="other")[0].hashes[0] != base.hashes[0]
    assert session_of(None, parsed) == "alice" and session_of("s-1", parsed) == "s-1"
    assert session_of("x" * 1000, parsed) == "x" * 256


def _two_full_backends(max_tokens):
    """a and b, two seats each, both full; a holds the prefix `shared`. Returns (sched, shared ids)."""
    prof = Profile(name="p", gpu="p", model="m", tp=1, engine="vllm", kv_capacity_tokens=200_000,
                   step=StepTimeModel(fixed_seconds=0.010, prefill_seconds_per_token=0.0001,
                                      decode_seconds_per_seq=0.0002, context_seconds_per_token=1e-7),
                   max_num_seqs=2, max_num_batched_tokens=2048, max_model_len=200_000)
    sched = make([("a", prof), ("b", prof)])
    shared = tokens(1, 1792)
    for rid, ids, where in (("a0", shared, "a"), ("b0", tokens(2, 64), "b"), ("a1", tokens(3, 64), "a"),
                            ("b1", tokens(4, 64), "b")):
        d = demand(rid, ids, max_tokens)
        d.only_backends = frozenset({where})
        assert sched.submit(d, 0.0) == Route(where)
    return sched, shared


def test_a_held_request_waits_for_its_prefix_holder_while_the_ones_behind_take_the_room():
    sched, shared = _two_full_backends(max_tokens=20)
    turn = demand("turn", shared + tokens(5, 64), 20, now=0.1)
    other = demand("other", tokens(6, 64), 20, now=0.1)
    assert not isinstance(sched.submit(turn, 0.1), Route) and not isinstance(sched.submit(other, 0.1), Route)
    # b frees a seat first: recomputing 1,792 tokens there costs more than waiting for one of a's short
    # requests to end, so the turn stays held and the request behind it takes b's seat.
    events = sched.finish("b0", 0.2, output_tokens=20)
    assert [(e.request_id, e.backend_id) for e in events] == [("other", "b")]
    assert sched.is_held("turn")
    events = sched.finish("a1", 0.3, output_tokens=20)
    assert [(e.request_id, e.backend_id) for e in events] == [("turn", "a")]


def test_a_held_request_does_not_wait_for_a_holder_that_frees_room_too_late():
    # a's requests are long (2,000 expected tokens each): waiting for one to end costs more than the recompute.
    sched, shared = _two_full_backends(max_tokens=2000)
    assert not isinstance(sched.submit(demand("turn", shared + tokens(5, 64), 2000, now=0.1), 0.1), Route)
    events = sched.finish("b0", 0.2, output_tokens=2000)
    assert [(e.request_id, e.backend_id) for e in events] == [("turn", "b")]
