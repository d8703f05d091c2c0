"""Stateful objects an engine created (a /v1/responses id): which backend holds each, so that retrieving or
cancelling it goes there. Bounded (DESIGN invariant 9): at most `max_entries`, each forgotten after `ttl_s`;
an id it no longer knows is answered 404, as the engine would once it had dropped the object itself."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_MAX_ENTRIES = 100_000  # ~100 bytes each: ~10 MB at most
DEFAULT_TTL_S = 24 * 3600.0


@dataclass(slots=True)
class ObjectAffinity:
    max_entries: int = DEFAULT_MAX_ENTRIES
    ttl_s: float = DEFAULT_TTL_S
    _entries: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)  # id -> (backend, expiry)

    def remember(self, object_id: str, backend: str, now: float) -> None:
        self._entries[object_id] = (backend, now + self.ttl_s)
        self._entries.move_to_end(object_id)
        self._evict(now)

    def backend_of(self, object_id: str, now: float) -> str | None:
        self._evict(now)
        found = self._entries.get(object_id)
        return found[0] if found is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        # Insertion order is expiry order (one TTL for all): expired entries are at the front.
        while entries:
            _, (_, expiry) = next(iter(entries.items()))
            if expiry > now:
                break
            entries.popitem(last=False)
