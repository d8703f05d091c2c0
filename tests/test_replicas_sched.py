"""Remote replicas' reservations in the pure scheduler (sched/remote.py): virtual clock, no sockets."""

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, Hold, PoolSettings, Reject, Route


def profile(name, step_scale=1.0, kv_tokens=100_000):
    return Profile(
        name=name, gpu=name, model="m", tp=1, engine="vllm", kv_capacity_tokens=kv_tokens,
        step=StepTimeModel(fixed_seconds=0.010 * step_scale, prefill_seconds_per_token=0.0001 * step_scale,
                           decode_seconds_per_seq=0.0002 * step_scale, context_seconds_per_token=1e-7 * step_scale),
        max_num_seqs=256, max_num_batched_tokens=2048,
    )


def make(backends, hold_timeout_s=60.0):
    # No TTFT objective (these bursts never complete): the hold rules under test are the replicas' own.
    sched = Scheduler([PoolSettings(name="m", hold_timeout_s=hold_timeout_s,
                                    policy_options={"ttft_objective_factor": 0})])
    for name, prof in backends:
        sched.add_backend(BackendSpec(backend_id=name, pool="m", engine="vllm", profile=prof), 0.0)
    return sched


def demand(i, prompt=500, max_tokens=100, now=0.0):
    return Demand(request_id=f"r{i}", pool="m", prompt_tokens=prompt, max_tokens=max_tokens, arrival_s=now)


def fill(sched, n, now=0.0, prefix="x"):
    return [sched.submit(Demand(f"{prefix}{i}", "m", 500, 100, now), now) for i in range(n)]


def test_two_replicas_sharing_do_not_overfill_a_small_backend_together():
    # ~550 KV tokens a request, 10k tokens of KV: ~17 fit. Alone, each replica would send 17.
    a, b = make([("small", profile("small", kv_tokens=10_000))]), make([("small", profile("small", kv_tokens=10_000))])
    routed_a = sum(isinstance(d, Route) for d in fill(a, 30, prefix="a"))
    assert 14 <= routed_a <= 18
    b.observe_remote([a.local_state("A", 0.0)], 0.01)
    routed_b = sum(isinstance(d, Route) for d in fill(b, 30, now=0.01, prefix="b"))
    assert routed_b <= 1  # the room is taken by A's requests

    unshared = make([("small", profile("small", kv_tokens=10_000))])
    assert sum(isinstance(d, Route) for d in fill(unshared, 30)) == routed_a  # without sharing: twice the load


def test_remote_finishes_release_held_requests_and_stale_replicas_stop_counting():
    a, b = make([("small", profile("small", kv_tokens=10_000))]), make([("small", profile("small", kv_tokens=10_000))])
    routed = [f"a{i}" for i, d in enumerate(fill(a, 30, prefix="a")) if isinstance(d, Route)]
    b.observe_remote([a.local_state("A", 0.0)], 0.0, staleness_s=0.5)
    assert isinstance(b.submit(demand(1), 0.0), Hold)
    # A's requests finish: its next publication frees the room and B's held request goes out at once.
    for rid in routed:
        a.finish(rid, 0.2, output_tokens=100)
    events = b.observe_remote([a.local_state("A", 0.0)], 0.25)
    assert [e.request_id for e in events if isinstance(e, Dispatch)] == ["r1"]
    # A goes quiet (left, or the store is unreachable): past the staleness bound it no longer counts.
    a.observe_remote([b.local_state("B", 0.0)], 0.3)
    n = len(a.backends["small"].inflight)
    assert n >= 10
    b.observe_remote([a.local_state("A", 0.0)], 0.3)
    assert b.backends["small"].remote_requests == n
    b.tick(0.9)
    assert b.backends["small"].remote_requests == 0 and b.remote.replica_ids() == []
    b.observe_remote([a.local_state("A", 0.0)], 1.0)
    b.forget_remote(1.0)
    assert b.backends["small"].remote_requests == 0


def test_snapshot_counts_remote_requests_once():
    # The engine's snapshot already includes what A had sent when it was taken: only A's change since moves it.
    b = make([("g", profile("g"))])
    remote = ReplicaState("A", {"g": BackendLoad(requests=10, kv_tokens=5000, reserved_kv_tokens=6000)})
    b.observe_remote([remote], 0.0)
    b.observe("g", EngineSnapshot(taken_at_s=0.05, engine="vllm", running=10, waiting=0, kv_usage_fraction=0.05,
                                  kv_capacity_tokens=100_000), 0.05)
    seqs, kv = b.backends["g"].load_view(0.06, b.health)
    assert seqs == 10 and kv == 5000
    more = ReplicaState("A", {"g": BackendLoad(requests=14, kv_tokens=7000, reserved_kv_tokens=8400)})
    b.observe_remote([more], 0.1)
    seqs, kv = b.backends["g"].load_view(0.11, b.health)
    assert seqs == 14 and kv == 7000


def test_remote_load_steers_the_choice_to_the_other_backend():
    b = make([("a", profile("a")), ("b", profile("b"))])
    busy = ReplicaState("A", {"a": BackendLoad(requests=200, kv_tokens=60_000, reserved_kv_tokens=80_000,
                                               prompt_tokens=100_000, expected_output_tokens=20_000)})
    b.observe_remote([busy], 0.0)
    assert all(b.submit(demand(i), 0.0) == Route("b") for i in range(5))


def test_fail_fast_uses_the_fleet_drain_rate():
    sched = make([("small", profile("small", kv_tokens=1_000))], hold_timeout_s=2.0)
    fill(sched, 1)
    # This replica alone measured a slow drain (1 release/s): with 3 held, a 2 s deadline cannot be met.
    pool = sched.pools["m"]
    pool.release_rate_per_s = 1.0
    for i in range(3):
        assert isinstance(sched.submit(demand(10 + i, now=0.0), 0.0), Hold | Reject)
    assert isinstance(sched.submit(demand(20), 0.0), Reject)
    # The fleet drains at 20/s with 5 more held elsewhere: (3 + 5 + 1) / 21 s is well inside 2 s.
    sched.observe_remote([ReplicaState("A", pools={"m": PoolLoad(held=5, release_rate_per_s=20.0)})], 0.0)
    assert isinstance(sched.submit(demand(21), 0.0), Hold)


def test_local_state_publishes_only_own_requests():
    a = make([("g", profile("g"))])
    fill(a, 3)
    a.observe_remote([ReplicaState("B", {"g": BackendLoad(requests=7, kv_tokens=700)})], 0.0)
    st = a.local_state("A", 0.0)
    assert st.replica_id == "A" and st.backends["g"].requests == 3
    assert st.backends["g"].kv_tokens == a.backends["g"].own_kv_tokens


def test_one_queue_order_across_replicas():
    # B holds a request since t=0; A, with an empty queue and room, must not let a newcomer jump it.
    a = make([("small", profile("small", kv_tokens=10_000))])
    older = ReplicaState("B", pools={"m": PoolLoad(held=1, release_rate_per_s=0.0, head_age_s=0.5)})
    a.observe_remote([older], 0.5)
    assert isinstance(a.submit(demand(1, now=0.5), 0.5), Hold)
    # B's head went out (its next publication has no queue): A's request goes at once.
    events = a.observe_remote([ReplicaState("B")], 0.55)
    assert [e.request_id for e in events if isinstance(e, Dispatch)] == ["r1"]
    # A head held for less than the slack (the sharing delay) is not "older": no needless wait.
    a.observe_remote([ReplicaState("B", pools={"m": PoolLoad(held=1, head_age_s=0.05)})], 0.6)
    assert a.submit(demand(2, now=0.6), 0.6) == Route("small")
    # A higher priority held elsewhere goes first even when newer.
    a.observe_remote([ReplicaState("B", pools={"m": PoolLoad(held=1, head_age_s=0.0, head_priority=5)})], 0.7)
    assert isinstance(a.submit(demand(3, now=0.7), 0.7), Hold)
