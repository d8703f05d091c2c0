"""Scheduler core on a virtual clock: routing, holding, release order, deadlines, health."""

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, Expire, Hold, PoolSettings, Reject, Route


def make(policy="round_robin", n=2, **pool_kw):
    sched = Scheduler([PoolSettings(name="m", policy=policy, **pool_kw)])
    for i in range(n):
        sched.add_backend(BackendSpec(backend_id=f"b{i}", pool="m"), 0.0)
    return sched


def demand(i, prompt=100, max_tokens=50, priority=0, now=0.0, deadline=None):
    return Demand(request_id=f"r{i}", pool="m", prompt_tokens=prompt, max_tokens=max_tokens,
                  arrival_s=now, priority=priority, deadline_s=deadline)


def test_round_robin_alternates_and_skips_down_backends():
    sched = make()
    picks = [sched.submit(demand(i), 0.0) for i in range(4)]
    assert picks == [Route("b0"), Route("b1"), Route("b0"), Route("b1")]
    sched.report_failure("b0", 1.0, "connection refused")
    assert {sched.submit(demand(i), 1.0).backend_id for i in range(10, 14)} == {"b1"}


def test_least_requests_prefers_the_emptier_backend():
    sched = make("least_requests")
    assert sched.submit(demand(1), 0.0) == Route("b0")
    assert sched.submit(demand(2), 0.0) == Route("b1")
    sched.finish("r1", 1.0, output_tokens=5)
    assert sched.submit(demand(3), 1.0) == Route("b0")


def test_all_down_rejects_at_once_with_retry_after():
    sched = make()
    for b in ("b0", "b1"):
        sched.report_failure(b, 0.0, "refused")
    decision = sched.submit(demand(1), 0.0)
    assert isinstance(decision, Reject) and decision.status == 503 and decision.retry_after_s > 0


def test_health_hysteresis_needs_consecutive_failures():
    sched = make()
    sched.observe_health("b0", False, 0.0)
    sched.observe_health("b0", False, 1.0)
    sched.observe_health("b0", True, 2.0)
    sched.observe_health("b0", False, 3.0)
    assert sched.backends["b0"].routable()  # never three in a row
    sched.observe_health("b0", False, 4.0)
    sched.observe_health("b0", False, 5.0)
    assert not sched.backends["b0"].routable()
    sched.observe_health("b0", True, 6.0)
    assert sched.backends["b0"].routable()


class _HoldAll:
    """A test policy that holds while `open` is False."""

    name = "hold_all"

    def __init__(self):
        self.open = False

    def choose(self, demand, candidates, ctx):
        return candidates[0] if self.open and candidates else None


def test_hold_priority_release_order_and_deadline():
    sched = make(hold_timeout_s=10.0)
    gate = _HoldAll()
    sched.pools["m"].policy = gate
    assert isinstance(sched.submit(demand(1, priority=0), 0.0), Hold)
    assert isinstance(sched.submit(demand(2, priority=5), 0.1), Hold)
    assert isinstance(sched.submit(demand(3, priority=0), 0.2), Hold)
    assert isinstance(sched.submit(demand(4, deadline=1.0), 0.3), Hold)
    expired = sched.tick(1.5)
    assert expired == [Expire("r4", 429, "overloaded: held past its deadline with no backend free", 1.0)]
    gate.open = True
    events = sched.observe("b0", EngineSnapshot(taken_at_s=2.0, engine="vllm", running=0, waiting=0), 2.0)
    assert [e.request_id for e in events if isinstance(e, Dispatch)] == ["r2", "r1", "r3"]
    assert sched.held_count() == 0


def test_full_hold_queue_answers_429():
    sched = make(hold_max_requests=1)
    sched.pools["m"].policy = _HoldAll()
    assert isinstance(sched.submit(demand(1), 0.0), Hold)
    decision = sched.submit(demand(2), 0.0)
    assert isinstance(decision, Reject) and decision.status == 429


def test_held_requests_fail_fast_when_every_backend_goes_down():
    sched = make()
    sched.pools["m"].policy = _HoldAll()
    sched.submit(demand(1), 0.0)
    sched.report_failure("b0", 1.0, "refused")
    events = sched.report_failure("b1", 1.0, "refused")
    assert [(e.request_id, e.status) for e in events] == [("r1", 503)]


def test_accounting_between_polls_counts_what_was_sent_and_freed():
    sched = make("least_requests", n=1)
    health = sched.health
    b0 = sched.backends["b0"]
    sched.observe("b0", EngineSnapshot(taken_at_s=0.0, engine="vllm", running=3, waiting=1,
                                       kv_usage_fraction=0.5, kv_capacity_tokens=1000), 0.0)
    sched.submit(demand(1, prompt=100), 0.1)
    sched.on_progress("r1", 10, 0.2)
    assert b0.requests_estimate(0.2, health) == 5
    assert b0.kv_used_estimate(0.2, health) == 500 + 110
    sched.observe("b0", EngineSnapshot(taken_at_s=0.3, engine="vllm", running=5, waiting=0,
                                       kv_usage_fraction=0.61, kv_capacity_tokens=1000), 0.3)
    sched.finish("r1", 0.4, output_tokens=12)
    assert b0.requests_estimate(0.4, health) == 4
    assert b0.kv_used_estimate(0.4, health) == 610 - 110
    # A stale snapshot is unknown, not empty: only our own accounting remains.
    assert b0.requests_estimate(10.0, health) == 0


def test_hold_queue_positions_and_counts_match_a_scan_of_the_queue():
    # Positions come from per-priority counts (not a scan of the queue per held request): the same numbers.
    import random

    from capbalancer.sched.hold import HoldQueue

    rng = random.Random(7)
    q = HoldQueue()
    ids: list[str] = []
    for i in range(600):
        op = rng.random()
        if op < 0.6 or not ids:
            d = Demand(request_id=f"h{i}", pool="m", prompt_tokens=10, max_tokens=10, arrival_s=float(i),
                       priority=rng.choice((0, 0, 0, 1, -1, 5)))
            ahead = rng.random() < 0.1
            key = (-d.priority, 0 if ahead else 1)
            expected = sum(1 for e in q._by_id.values() if e.sort_key[:2] <= key)  # the newest of its key
            assert q.push(d, float(i), float(i) + 10.0, ahead=ahead) == expected
            ids.append(d.request_id)
        elif op < 0.8 and len(q):
            q.pop()
        else:
            q.remove(ids.pop(rng.randrange(len(ids))))
        for p in (-1, 0, 1, 5):
            assert q.count_ahead(p) == sum(1 for e in q._by_id.values() if e.sort_key[:2] < (-p, 1))
    assert len(q) > 0
