"""The O(1) load views of a backend agree with a brute-force recomputation, whatever the order of
dispatches, progress, completions and snapshots (including scrapes sent before a dispatch that arrive
after it)."""

import random

import pytest

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, HealthSettings, PoolSettings


class Shadow:
    """The naive model: remember every request's KV when each snapshot was taken."""

    def __init__(self):
        self.live = {}  # id -> [dispatched_at, kv]
        self.snap = None  # (taken_at, used, running+waiting)
        self.at_snap = {}  # id -> kv counted by the snapshot
        self.released = 0
        self.finished = 0

    def requests(self):
        if self.snap is None:
            return len(self.live)
        sent_after = sum(1 for rid in self.live if rid not in self.at_snap)
        return max(len(self.live), self.snap[2] + sent_after - self.finished)

    def kv(self):
        own = sum(kv for _, kv in self.live.values())
        if self.snap is None:
            return own
        growth = sum(kv - self.at_snap.get(rid, 0) for rid, (_, kv) in self.live.items())
        return max(own, self.snap[1] + growth - self.released)


@pytest.mark.parametrize("seed", range(25))
def test_incremental_views_match_brute_force(seed):
    rng = random.Random(seed)
    health = HealthSettings(stale_after_s=1e9)
    sched = Scheduler([PoolSettings(name="m", policy="round_robin", hold_timeout_s=1e9)], health=health)
    sched.add_backend(BackendSpec(backend_id="b", pool="m"), 0.0)
    state = sched.backends["b"]
    shadow = Shadow()
    now, next_id, pending_scrape = 0.0, 0, None
    for _ in range(400):
        now += rng.uniform(0.0, 0.05)
        op = rng.random()
        if op < 0.35:
            rid = f"r{next_id}"
            next_id += 1
            prompt = rng.randint(1, 500)
            sched.submit(Demand(rid, "m", prompt, 100, now), now)
            shadow.live[rid] = [now, prompt]
        elif op < 0.65 and shadow.live:
            rid = rng.choice(list(shadow.live))
            out = state.inflight[rid].output_tokens + rng.randint(1, 20)
            sched.on_progress(rid, out, now)
            shadow.live[rid][1] = state.inflight[rid].kv_tokens
        elif op < 0.8 and shadow.live:
            rid = rng.choice(list(shadow.live))
            out = state.inflight[rid].output_tokens + rng.randint(0, 5)
            sched.finish(rid, now, output_tokens=out)
            if rid in shadow.at_snap:
                shadow.released += shadow.at_snap.pop(rid)
                shadow.finished += 1
            del shadow.live[rid]
        elif op < 0.9:
            # A scrape is sent now; its answer arrives later, after more dispatches maybe.
            pending_scrape = (now, None)
        elif pending_scrape is not None:
            taken_at, seen = pending_scrape
            pending_scrape = None
            used = rng.randint(0, 5000)
            running = rng.randint(0, 50)
            sched.observe("b", EngineSnapshot(taken_at_s=taken_at, engine="vllm", running=running, waiting=0,
                                              kv_usage_fraction=used / 100_000, kv_capacity_tokens=100_000), now)
            shadow.snap = (taken_at, used, running)
            # What the snapshot counts: live requests dispatched before the scrape was sent, at their
            # size when the answer is applied. (Growth between sending the scrape and applying it, a
            # poll's round trip, is the one thing neither the engine's figure nor ours includes.)
            shadow.at_snap = {rid: kv for rid, (t, kv) in shadow.live.items() if t <= taken_at}
            shadow.released = 0
            shadow.finished = 0
        assert state.requests_estimate(now, health) == shadow.requests()
        assert state.kv_used_estimate(now, health) == shadow.kv()
        assert state.own_kv_tokens == sum(kv for _, kv in shadow.live.values())
