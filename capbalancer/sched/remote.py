"""Other proxy replicas' reservations, as the pure scheduler sees them (DESIGN invariant 10).

Every replica publishes what it has on each backend (requests in flight, their KV now and at their
expected end, prompt tokens still to prefill, expected output) and, per pool, how many requests it holds
and how fast its hold queue drains. The others fold that in like a snapshot: stamped with the time it was
received, dropped once older than `staleness_s`, so a replica that went away (or a store that stopped
answering) stops counting after a bounded time and the scheduler falls back to its own accounting.

Decisions stay local: a replica never waits for the others. What it misses is only what they dispatched
since their last publication (one sharing interval).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capbalancer.sched.backend import BackendState
    from capbalancer.sched.scheduler import PoolState


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """One replica's own requests on one backend."""

    requests: int = 0
    kv_tokens: int = 0  # prompt + generated so far
    reserved_kv_tokens: int = 0  # prompt + max(generated, expected output)
    pending_prefill_tokens: int = 0  # uncached prompts of requests with no first token yet
    prompt_tokens: int = 0  # uncached prompt tokens of all its requests there
    expected_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One replica's hold queue for one pool."""

    held: int = 0
    release_rate_per_s: float = 0.0  # 0: no queue, or not measured yet
    head_age_s: float = 0.0  # how long the head of its queue had been held when published
    head_priority: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaState:
    replica_id: str
    backends: dict[str, BackendLoad] = field(default_factory=dict)
    pools: dict[str, PoolLoad] = field(default_factory=dict)


@dataclass(slots=True)
class _Entry:
    state: ReplicaState
    observed_at_s: float


def local_state(replica_id: str, backends: dict[str, BackendState], pools: dict[str, PoolState],
                now: float) -> ReplicaState:
    """What this replica publishes: its own record only, never what it learned from the others."""
    loads = {
        bid: BackendLoad(requests=len(b.inflight), kv_tokens=b.own_kv_tokens,
                         reserved_kv_tokens=b.own_reserved_kv_tokens,
                         pending_prefill_tokens=b.own_pending_prefill_tokens, prompt_tokens=b.own_prompt_tokens,
                         expected_output_tokens=b.own_expected_output_tokens)
        for bid, b in backends.items() if b.inflight
    }
    pool_loads = {}
    for name, p in pools.items():
        if not (len(p.hold) or p.release_rate_per_s):
            continue
        head = p.hold.peek()
        pool_loads[name] = PoolLoad(held=len(p.hold), release_rate_per_s=p.release_rate_per_s or 0.0,
                                    head_age_s=0.0 if head is None else max(0.0, now - head[1]),
                                    head_priority=0 if head is None else head[0].priority)
    return ReplicaState(replica_id, loads, pool_loads)


class RemoteView:
    """The fresh replicas' states, summed into each BackendState's `remote_*` fields and per pool."""

    def __init__(self, staleness_s: float = 1.0, queue_order_slack_s: float = 0.1) -> None:
        self.staleness_s = staleness_s
        # One fleet-wide queue order: a replica does not start a request while another replica holds one of
        # at least its priority that was held this much longer (the slack covers the sharing delay).
        self.queue_order_slack_s = queue_order_slack_s
        self._replicas: dict[str, _Entry] = {}
        self.pool_held: dict[str, int] = {}
        self.pool_release_rate_per_s: dict[str, float] = {}
        self.pool_heads: dict[str, list[tuple[int, float]]] = {}  # pool -> [(priority, held since, our clock)]

    def __len__(self) -> int:
        return len(self._replicas)

    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    def age_s(self, replica_id: str, now: float) -> float | None:
        e = self._replicas.get(replica_id)
        return None if e is None else now - e.observed_at_s

    def put(self, state: ReplicaState, now: float) -> None:
        self._replicas[state.replica_id] = _Entry(state, now)

    def forget(self, replica_id: str) -> bool:
        return self._replicas.pop(replica_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """Drop replicas not heard from within `staleness_s`; returns their ids."""
        gone = [rid for rid, e in self._replicas.items() if now - e.observed_at_s > self.staleness_s]
        for rid in gone:
            del self._replicas[rid]
        return gone

    def ahead(self, pool: str, priority: int, held_since_s: float) -> bool:
        """Whether another replica holds a request of `pool` that goes before one of `priority` held since
        `held_since_s` (a newcomer: now)."""
        heads = self.pool_heads.get(pool)
        if not heads:
            return False
        slack = self.queue_order_slack_s
        return any(p > priority or (p == priority and since < held_since_s - slack) for p, since in heads)

    def apply(self, backends: dict[str, BackendState]) -> set[str]:
        """Write the sums into the backends; returns the pools whose backends' remote load went down."""
        sums: dict[str, list[int]] = {}
        held: dict[str, int] = {}
        rates: dict[str, float] = {}
        heads: dict[str, list[tuple[int, float]]] = {}
        for e in self._replicas.values():
            for bid, load in e.state.backends.items():
                acc = sums.get(bid)
                if acc is None:
                    acc = sums[bid] = [0, 0, 0, 0, 0, 0]
                acc[0] += load.requests
                acc[1] += load.kv_tokens
                acc[2] += load.reserved_kv_tokens
                acc[3] += load.pending_prefill_tokens
                acc[4] += load.prompt_tokens
                acc[5] += load.expected_output_tokens
            for name, pl in e.state.pools.items():
                held[name] = held.get(name, 0) + pl.held
                rates[name] = rates.get(name, 0.0) + pl.release_rate_per_s
                if pl.held:
                    heads.setdefault(name, []).append((pl.head_priority, e.observed_at_s - pl.head_age_s))
        self.pool_held, self.pool_release_rate_per_s, self.pool_heads = held, rates, heads
        freed: set[str] = set()
        zero = [0, 0, 0, 0, 0, 0]
        for bid, b in backends.items():
            total = sums.get(bid, zero)
            if total[0] < b.remote_requests or total[2] < b.remote_reserved_kv_tokens:
                freed.add(b.spec.pool)
            (b.remote_requests, b.remote_kv_tokens, b.remote_reserved_kv_tokens, b.remote_pending_prefill_tokens,
             b.remote_prompt_tokens, b.remote_expected_output_tokens) = total
        return freed
