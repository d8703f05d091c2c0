"""The hold queue: requests that no backend can take now, by priority, then arrival order."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from capbalancer.sched.types import Demand


@dataclass(order=True, slots=True)
class _Entry:
    sort_key: tuple[int, int, int]  # (-priority, 0 if it goes ahead of its priority else 1, arrival sequence)
    demand: Demand = field(compare=False)
    held_at_s: float = field(compare=False)
    deadline_s: float = field(compare=False)
    removed: bool = field(default=False, compare=False)


class HoldQueue:
    """Priority-then-FIFO queue with O(log n) push/pop and lazy removal for cancels and expiries."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._by_id: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, int, _Entry]] = []  # min-heap by deadline, lazily cleaned
        self._seq = itertools.count()
        self.ahead_count = 0  # entries pushed `ahead` still queued
        # Queued entries per priority: a position is then a sum over the few priorities in use, not a scan of the
        # queue (each held request asks for its own).
        self._per_priority: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def push(self, demand: Demand, now: float, deadline_s: float, ahead: bool = False) -> int:
        """Queue `demand`; `ahead`: before every request of its priority not itself ahead (fair shedding's
        under-served size class, sched/fairness.py), in arrival order among those."""
        seq = next(self._seq)
        entry = _Entry((-demand.priority, 0 if ahead else 1, seq), demand, now, deadline_s)
        self.ahead_count += ahead
        heapq.heappush(self._heap, entry)
        heapq.heappush(self._deadlines, (deadline_s, seq, entry))
        self._by_id[demand.request_id] = entry
        per = self._per_priority
        per[demand.priority] = per.get(demand.priority, 0) + 1
        if not ahead:
            # The newest of its priority, not ahead: behind every request of its priority and of any higher one.
            return self._at_or_above(demand.priority) - 1
        return self.position_of(entry)

    def position_of(self, entry: _Entry) -> int:
        # Exact position is O(n); only for entries pushed `ahead` (fair shedding's under-served size class).
        return sum(1 for e in self._by_id.values() if e.sort_key < entry.sort_key)

    def count_ahead(self, priority: int) -> int:
        """Requests that a newcomer of `priority` queued `ahead` would find in front of it."""
        if not self.ahead_count:  # none of its priority is ahead: only the higher priorities
            return self._at_or_above(priority + 1)
        return sum(1 for e in self._by_id.values() if e.sort_key[:2] < (-priority, 1))

    def _at_or_above(self, priority: int) -> int:
        """Queued entries of `priority` or higher."""
        return sum(n for p, n in self._per_priority.items() if p >= priority)

    def _forget(self, entry: _Entry) -> None:
        """`entry` left the queue: the counts follow."""
        per = self._per_priority
        p = entry.demand.priority
        n = per[p] - 1
        if n:
            per[p] = n
        else:
            del per[p]

    def peek(self) -> tuple[Demand, float] | None:
        self._skip_removed()
        if not self._heap:
            return None
        head = self._heap[0]
        return head.demand, head.held_at_s

    def pop(self) -> tuple[Demand, float]:
        self._skip_removed()
        entry = heapq.heappop(self._heap)
        entry.removed = True
        del self._by_id[entry.demand.request_id]
        self.ahead_count -= entry.sort_key[1] == 0
        self._forget(entry)
        return entry.demand, entry.held_at_s

    def remove(self, request_id: str) -> Demand | None:
        entry = self._by_id.pop(request_id, None)
        if entry is None:
            return None
        entry.removed = True
        self.ahead_count -= entry.sort_key[1] == 0
        self._forget(entry)
        return entry.demand

    def first(self, n: int) -> list[tuple[Demand, float]]:
        """The first `n` entries in queue order, left in the queue (O(queue length))."""
        live = [e for e in self._heap if not e.removed]
        return [(e.demand, e.held_at_s) for e in heapq.nsmallest(n, live)]

    def head_priority(self) -> int | None:
        self._skip_removed()
        return self._heap[0].demand.priority if self._heap else None

    def expired(self, now: float) -> list[tuple[Demand, float]]:
        """Remove and return every entry whose deadline has passed."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, entry = heapq.heappop(self._deadlines)
            if not entry.removed:
                self.remove(entry.demand.request_id)
                out.append((entry.demand, entry.held_at_s))
        return out

    def drain_all(self) -> list[tuple[Demand, float]]:
        out = [(e.demand, e.held_at_s) for e in sorted(self._by_id.values(), key=lambda e: e.sort_key)]
        for e in self._by_id.values():
            e.removed = True
        self._heap.clear()
        self._by_id.clear()
        self._deadlines.clear()
        self.ahead_count = 0
        self._per_priority.clear()
        return out

    def next_deadline_s(self) -> float | None:
        while self._deadlines and self._deadlines[0][2].removed:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def _skip_removed(self) -> None:
        while self._heap and self._heap[0].removed:
            heapq.heappop(self._heap)
