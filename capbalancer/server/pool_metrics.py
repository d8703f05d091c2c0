"""Per-pool metrics for dashboards and autoscalers, in the proxy's own registry.

Held, rejected and expired requests and the headroom are read from the scheduler when Prometheus scrapes
(nothing on the request path); tokens are counted per request when it ends (server/observe.py).

    capbalancer_pool_held_requests{pool}            requests held now
    capbalancer_pool_held_total{pool}               requests that had to wait (counter)
    capbalancer_pool_rejected_total{pool}           answered 429/503 at once: queue full, no backend, too slow
    capbalancer_pool_expired_total{pool}            left the hold queue at their deadline unserved
    capbalancer_pool_seats{pool}                    sequences the routable backends run at once (typical size)
    capbalancer_pool_headroom_requests{pool}        typical requests the pool could start now (< 0: overloaded)
    capbalancer_pool_headroom_ratio{pool}           the same over the seats: scale out below a target
    capbalancer_tokens_total{pool,backend,kind}     prompt and completion tokens (the engines' usage when given)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from capbalancer.sched.headroom import DEFAULT_PROMPT_TOKENS, pool_headroom
from capbalancer.server.driver import SchedulerDriver

_PROMPT_EWMA_ALPHA = 0.05
# Every series name this module exports (the dashboard's test checks it reads only exported ones).
EXPORTED_NAMES = ("capbalancer_pool_held_requests", "capbalancer_pool_held", "capbalancer_pool_rejected",
                  "capbalancer_pool_expired", "capbalancer_pool_seats", "capbalancer_pool_headroom_requests",
                  "capbalancer_pool_headroom_ratio", "capbalancer_tokens")


class PoolMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, driver: SchedulerDriver) -> None:
        self.driver = driver
        self.tokens = Counter("capbalancer_tokens", "Tokens by pool, backend and kind (prompt, completion)",
                              ("pool", "backend", "kind"), registry=registry)
        self._token_children: dict[tuple[str, str, str], Counter] = {}
        self.mean_prompt_tokens: dict[str, float] = {}  # per pool: sizes the headroom's typical request
        registry.register(self)

    def count_tokens(self, pool: str, backend: str, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        # The counts come from the engine's `usage`, which a broken engine can fill with anything: only
        # positive integers are counted (a Prometheus counter refuses to go down).
        prompt_tokens = prompt_tokens if type(prompt_tokens) is int and prompt_tokens > 0 else None
        completion_tokens = completion_tokens if type(completion_tokens) is int and completion_tokens > 0 else None
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:
                key = (pool, backend, kind)
                child = self._token_children.get(key)
                if child is None:
                    child = self._token_children[key] = self.tokens.labels(pool, backend, kind)
                child.inc(n)
        if prompt_tokens:
            mean = self.mean_prompt_tokens.get(pool)
            self.mean_prompt_tokens[pool] = (float(prompt_tokens) if mean is None
                                             else mean + _PROMPT_EWMA_ALPHA * (prompt_tokens - mean))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sched = self.driver.scheduler
        now = self.driver.clock()
        held = GaugeMetricFamily("capbalancer_pool_held_requests", "Requests held in the proxy's queue", labels=["pool"])
        held_total = CounterMetricFamily("capbalancer_pool_held", "Requests that were held", labels=["pool"])
        rejected = CounterMetricFamily("capbalancer_pool_rejected", "Requests answered 429/503 without being served",
                                       labels=["pool"])
        expired = CounterMetricFamily("capbalancer_pool_expired", "Held requests that reached their deadline",
                                      labels=["pool"])
        seats = GaugeMetricFamily("capbalancer_pool_seats", "Sequences the routable backends run at once",
                                  labels=["pool"])
        room = GaugeMetricFamily("capbalancer_pool_headroom_requests",
                                 "Typical requests the pool could start now (negative: overloaded)", labels=["pool"])
        ratio = GaugeMetricFamily("capbalancer_pool_headroom_ratio",
                                  "Headroom over seats: 1 idle, 0 full, below 0 overloaded", labels=["pool"])
        for name, pool in list(sched.pools.items()):
            h = pool_headroom(sched, name, now, int(self.mean_prompt_tokens.get(name, DEFAULT_PROMPT_TOKENS)))
            held.add_metric([name], h.held)
            held_total.add_metric([name], pool.held_total)
            rejected.add_metric([name], pool.rejected_total)
            expired.add_metric([name], pool.expired_total)
            seats.add_metric([name], h.seats)
            room.add_metric([name], h.requests)
            ratio.add_metric([name], h.ratio)
        yield from (held, held_total, rejected, expired, seats, room, ratio)

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(())  # collected only at scrape time (reading the scheduler then)
