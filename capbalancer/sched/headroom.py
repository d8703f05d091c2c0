"""How much more load a pool can take now: the signal for an autoscaler (pure; no clock of its own).

For each routable backend the capacity model says how many sequences of a typical request's size it can
run at once (its seats: engine limit, KV capacity at that size, and the batch where its TPOT objective stops
admission) and how many it runs now; the free seats,
summed over the pool, less the requests already held at the proxy, are the pool's headroom. Negative
headroom is demand the pool cannot serve yet: add instances. The ratio scales it by the pool's seats, so
one target (say 0.2) fits pools of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import Demand

DEFAULT_PROMPT_TOKENS = 512  # before the pool has seen a request


@dataclass(frozen=True, slots=True)
class Headroom:
    seats: int  # sequences the pool's routable backends can run at once, for a typical request
    busy_seats: int  # sequences they run now (the proxy's estimate between polls)
    held: int  # requests waiting at the proxy

    @property
    def requests(self) -> int:
        """Typical requests the pool could start now (negative: held demand it cannot start)."""
        return max(0, self.seats - self.busy_seats) - self.held

    @property
    def ratio(self) -> float:
        """`requests` over the pool's seats: 1 idle, 0 full, below 0 overloaded; -held with no seats."""
        return self.requests / self.seats if self.seats > 0 else float(-self.held)


def pool_headroom(scheduler: Scheduler, pool_name: str, now: float,
                  typical_prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> Headroom:
    pool = scheduler.pools[pool_name]
    max_tokens = pool.settings.default_max_tokens
    expected_out = pool.output_lengths.expected(max_tokens)
    probe = Demand(request_id="headroom-probe", pool=pool_name, prompt_tokens=max(1, typical_prompt_tokens),
                   max_tokens=max_tokens, arrival_s=now)
    # Free seats past a backend's TPOT objective are not headroom: the pool's own settings say where it is.
    model = scheduler.pool_model(pool)
    seats = busy = 0
    for backend in scheduler.routable_backends(pool_name):
        est = model.estimate(backend, probe, expected_out, now)
        cap = est.batch_cap
        seats += cap
        busy += min(cap, est.seqs_after - 1)
    return Headroom(seats=seats, busy_seats=busy, held=len(pool.hold))
