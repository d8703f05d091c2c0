"""Which prompt prefixes each backend probably holds in its KV cache (DESIGN invariant 7).

The proxy cannot see an engine's cache, but it sent every prompt the engine holds (from this proxy). For each
backend the index keeps the chained block hashes (sched/prefix_hash.py) of what was dispatched there in an LRU
that mimics vLLM's automatic prefix caching:

* a block used by a running request is pinned (vLLM never evicts it); a finished request's blocks stay cached
  but evictable, least recently used first, the tail of a chain before its head (vLLM frees a request's blocks
  in reverse order, so a shared head outlives the tails that hang from it);
* the LRU holds at most what the engine's KV can keep: its capacity in tokens minus the KV that is not prompt
  prefix (generated tokens, other clients' requests), so the index does not believe in blocks the engine must
  have evicted; and never more than `max_blocks_per_backend`, nor a `max_total_blocks` share (bounded memory,
  whatever clients send);
* where the engine publishes KV events (precise mode, fleet/kv_events.py) they add and remove blocks as truth.

A match costs O(prompt blocks): a chained hash stands for its whole prefix, so the walk stops at the first
block the backend lacks. `HitRateEstimate` learns how far the belief holds (invariant 8): the engine's own
prefix-cache hit counter against the cached tokens the index predicted for what was sent there.

Memory: one cached block is one OrderedDict entry (an int key and an int pin count), about
`BYTES_PER_BLOCK` bytes (bench/prefix_index_speed.py measures it), so the index is bounded by
`max_total_blocks * BYTES_PER_BLOCK` (default 2M blocks, about 280 MB) plus sessions (`max_sessions`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capbalancer.fleet.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from capbalancer.sched.prefix_hash import DEFAULT_BLOCK_TOKENS

# Measured by bench/prefix_index_speed.py (CPython 3.11/3.12, 64-bit): an entry of the per-backend OrderedDict.
BYTES_PER_BLOCK = 140
DEFAULT_MAX_BLOCKS_PER_BACKEND = 65536  # 1M tokens of 16-token blocks: more than one large GPU's KV
DEFAULT_MAX_TOTAL_BLOCKS = 2_000_000  # all backends together: ~280 MB
DEFAULT_MAX_SESSIONS = 100_000


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    enabled: bool = True
    max_blocks_per_backend: int = DEFAULT_MAX_BLOCKS_PER_BACKEND
    max_total_blocks: int = DEFAULT_MAX_TOTAL_BLOCKS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    # A session's last backend is believed to hold this fraction of the session's previous prompt when the
    # request carries no block hashes (no prompt text to hash): a soft hint, discounted like the index.
    session_trust: float = 0.8


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """What one backend probably holds of a prompt: leading blocks cached, and of those, pinned by running work."""

    cached_blocks: int = 0
    pinned_blocks: int = 0


NO_MATCH = PrefixMatch()


def prefix_salt(pool: str, adapter: str | None = None, cache_salt: str | None = None) -> str:
    """The hash salt of a pool's prompts: the pool, the LoRA adapter (or other model) a request names, and its
    `cache_salt` (vLLM's per-tenant prefix-cache salt). The engine's own block hash includes the adapter and the
    cache salt; pools never share a cache."""
    base = f"{pool}\x00{adapter or ''}"
    return f"{base}\x00{cache_salt}" if cache_salt else base


def chain_token_block(parent: int | None, token_ids: Sequence[int], salt: str) -> int:
    """One block's chained hash, exactly as sched/prefix_hash.token_block_hashes computes it."""
    parent_bytes = (hashlib.blake2b(salt.encode(), digest_size=8).digest() if parent is None
                    else parent.to_bytes(8, "little"))
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(parent_bytes + data, digest_size=8).digest(), "little")


class BackendPrefixCache:
    """The LRU of block hashes one backend probably holds; value = how many of our running requests pin it."""

    __slots__ = ("blocks", "capacity_blocks", "precise", "engine_blocks")

    def __init__(self, capacity_blocks: int) -> None:
        self.blocks: OrderedDict[int, int] = OrderedDict()
        self.capacity_blocks = capacity_blocks
        self.precise = False  # fed by the engine's KV events: those, not our guesses, decide eviction
        # Precise mode: the engine's block hash -> our hashes for the same tokens (bounded like `blocks`).
        self.engine_blocks: OrderedDict[int | bytes, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.blocks)

    def match(self, hashes: Sequence[int]) -> PrefixMatch:
        blocks = self.blocks
        cached = pinned = 0
        for h in hashes:
            pins = blocks.get(h)
            if pins is None:
                break
            cached += 1
            if pins > 0:
                pinned += 1
        return PrefixMatch(cached, pinned) if cached else NO_MATCH

    def touch(self, hashes: Sequence[int], pin: bool) -> None:
        """The prompt's blocks are on the engine now (hit or computed): most recent, the head last."""
        blocks = self.blocks
        add = 1 if pin else 0
        for h in reversed(hashes):
            pins = blocks.pop(h, 0)
            blocks[h] = pins + add
        self.evict_to(self.capacity_blocks)

    def unpin(self, hashes: Iterable[int]) -> None:
        blocks = self.blocks
        for h in hashes:
            pins = blocks.get(h)
            if pins:
                blocks[h] = pins - 1

    def store(self, hashes: Iterable[int]) -> None:
        """Blocks the engine says it stored (KV events): present, most recent, pins kept."""
        blocks = self.blocks
        for h in hashes:
            blocks[h] = blocks.pop(h, 0)
        self.evict_to(self.capacity_blocks)

    def remove(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self.blocks.pop(h, None)

    def clear(self) -> None:
        self.blocks.clear()

    def resize(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.evict_to(capacity_blocks)

    def evict_to(self, capacity_blocks: int) -> None:
        """Drop least recently used unpinned blocks until at most `capacity_blocks` remain. Pinned blocks are
        in use on the engine and cannot be evicted there: they move to the recent end and count as kept."""
        blocks = self.blocks
        budget = len(blocks)  # each entry is looked at once at most
        while len(blocks) > capacity_blocks and budget > 0:
            budget -= 1
            h, pins = blocks.popitem(last=False)
            if pins > 0:
                blocks[h] = pins


@dataclass(slots=True)
class HitRateEstimate:
    """How many of the cached tokens the index predicts the engine really reports as hits (invariant 8).

    Between two readings of the engine's cumulative hit counter, the hits it gained are compared with the
    cached tokens the index predicted for the requests sent there in between; the ratio, smoothed and capped
    at 1, discounts the index's belief on that backend. Unknown (no counter) leaves the belief as is.
    """

    alpha: float = 0.2
    factor: float = 1.0
    samples: int = 0
    predicted_since_reading: float = 0.0
    last_hits_total: float | None = None
    min_predicted_tokens: float = 256.0  # compare only over enough predicted hits to mean something

    def predicted(self, tokens: float) -> None:
        self.predicted_since_reading += tokens

    def reading(self, hits_total: float) -> None:
        last = self.last_hits_total
        if last is None or hits_total < last:  # first reading, or the engine restarted (counter reset)
            self.last_hits_total = hits_total
            self.predicted_since_reading = 0.0
            return
        if self.predicted_since_reading < self.min_predicted_tokens:
            return  # keep accumulating: compare over a meaningful window
        ratio = (hits_total - last) / self.predicted_since_reading
        ratio = 0.0 if ratio < 0.0 else (1.0 if ratio > 1.0 else ratio)
        self.factor += self.alpha * (ratio - self.factor)
        self.samples += 1
        self.last_hits_total = hits_total
        self.predicted_since_reading = 0.0


@dataclass(slots=True)
class Session:
    backend_id: str
    prompt_tokens: int


@dataclass(slots=True)
class PrefixIndex:
    """Per-backend prefix caches, session hints and hit-rate estimates: pure state owned by the Scheduler."""

    settings: PrefixSettings = field(default_factory=PrefixSettings)
    caches: dict[str, BackendPrefixCache] = field(default_factory=dict)
    hit_rates: dict[str, HitRateEstimate] = field(default_factory=dict)
    sessions: OrderedDict[str, Session] = field(default_factory=OrderedDict)
    # Requests in flight -> (backend, the hashes they pin there): unpinned when they finish.
    pins: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    # --- backends ---------------------------------------------------------------------------------------
    def _cap(self) -> int:
        s = self.settings
        n = max(1, len(self.caches))
        return max(0, min(s.max_blocks_per_backend, s.max_total_blocks // n))

    def add_backend(self, backend_id: str) -> None:
        if backend_id not in self.caches:
            self.caches[backend_id] = BackendPrefixCache(0)
            self.hit_rates[backend_id] = HitRateEstimate()
            cap = self._cap()
            for cache in self.caches.values():  # a newcomer shrinks everyone's share of the total cap
                cache.resize(min(cache.capacity_blocks, cap) if cache.capacity_blocks else cap)

    def remove_backend(self, backend_id: str) -> None:
        self.caches.pop(backend_id, None)
        self.hit_rates.pop(backend_id, None)

    def cache(self, backend_id: str) -> BackendPrefixCache | None:
        return self.caches.get(backend_id)

    # --- the cost model's question ------------------------------------------------------------------
    def expected_cached_tokens(self, backend_id: str, hashes: Sequence[int], block_tokens: int,
                               prompt_tokens: int, session_id: str | None) -> tuple[int, int]:
        """(cached, pinned) prompt tokens the backend probably holds, discounted by its learned hit rate.

        Never the whole prompt: the engine always computes at least its last token (vLLM recomputes it).
        """
        cache = self.caches.get(backend_id)
        if cache is None:
            return 0, 0
        cached_tokens = pinned_tokens = 0
        if hashes:
            m = cache.match(hashes)
            if not m.cached_blocks:
                return 0, 0
            cached_tokens = m.cached_blocks * block_tokens
            pinned_tokens = m.pinned_blocks * block_tokens
        elif session_id is not None:
            s = self.sessions.get(session_id)
            if s is None or s.backend_id != backend_id:
                return 0, 0
            cached_tokens = int(self.settings.session_trust * min(s.prompt_tokens, prompt_tokens))
        else:
            return 0, 0
        factor = self.hit_rates[backend_id].factor
        limit = prompt_tokens - 1 if prompt_tokens > 0 else 0
        cached = int(cached_tokens * factor)
        cached = cached if cached < limit else limit
        pinned = int(pinned_tokens * factor)
        return cached, (pinned if pinned < cached else cached)

    def session_backend(self, session_id: str | None) -> str | None:
        """The backend a session's last request went to (None: no session, or forgotten)."""
        s = self.sessions.get(session_id) if session_id is not None else None
        return s.backend_id if s is not None else None

    # --- what the scheduler did ---------------------------------------------------------------------
    def on_dispatch(self, request_id: str, backend_id: str, hashes: Sequence[int], prompt_tokens: int,
                    session_id: str | None, predicted_cached_tokens: int, capacity_blocks: int | None) -> None:
        cache = self.caches.get(backend_id)
        if cache is None:
            return
        cap = self._cap()
        # Precise mode: the engine's events say what it evicted; only the memory cap applies here.
        cache.capacity_blocks = cap if capacity_blocks is None or cache.precise else max(0, min(cap, capacity_blocks))
        if hashes:
            key = tuple(hashes)
            cache.touch(key, pin=True)
            self.pins[request_id] = (backend_id, key)
        self.hit_rates[backend_id].predicted(predicted_cached_tokens)
        if session_id is not None:
            sessions = self.sessions
            sessions.pop(session_id, None)
            sessions[session_id] = Session(backend_id, prompt_tokens)
            while len(sessions) > self.settings.max_sessions:
                sessions.popitem(last=False)

    def on_finish(self, request_id: str) -> None:
        pinned = self.pins.pop(request_id, None)
        if pinned is None:
            return
        cache = self.caches.get(pinned[0])
        if cache is not None:
            cache.unpin(pinned[1])

    def apply_kv_events(self, backend_id: str, events: Iterable[KvEvent], pool: str) -> None:
        """The engine's own record of its cache (precise mode): stored blocks become present, removed ones
        absent, a clear empties it. A stored block is translated to our hashes through its token ids (our
        16-token blocks chained from its parent's), salted by pool and LoRA adapter as the proxy's keys are.
        Blocks whose parent we never saw (events before we subscribed) or whose size is not a multiple of
        ours cannot be translated and are skipped: the proxy's own record still covers them."""
        cache = self.caches.get(backend_id)
        if cache is None:
            return
        cache.precise = True
        emap = cache.engine_blocks
        ours_per = DEFAULT_BLOCK_TOKENS
        for ev in events:
            if isinstance(ev, BlockStored):
                if ev.block_size % ours_per:
                    continue
                if ev.parent_block_hash is None:
                    parent: int | None = None
                else:
                    known = emap.get(ev.parent_block_hash)
                    if not known:
                        continue
                    parent = known[-1]
                salt = prefix_salt(pool, ev.lora_name, ev.cache_salt)
                stored: list[int] = []
                tokens = ev.token_ids
                for i, engine_hash in enumerate(ev.block_hashes):
                    chunk = tokens[i * ev.block_size:(i + 1) * ev.block_size]
                    if len(chunk) < ev.block_size or (ev.opaque_from is not None and i >= ev.opaque_from):
                        break  # (an image's or an embedding's block: its tokens alone do not name it)
                    ours: list[int] = []
                    for j in range(0, ev.block_size, ours_per):
                        parent = chain_token_block(parent, chunk[j:j + ours_per], salt)
                        ours.append(parent)
                    emap.pop(engine_hash, None)
                    emap[engine_hash] = tuple(ours)
                    stored.extend(ours)
                cache.store(reversed(stored))  # the head most recent, as the engine frees tails first
                while len(emap) > max(1, cache.capacity_blocks):
                    emap.popitem(last=False)
            elif isinstance(ev, BlockRemoved):
                for engine_hash in ev.block_hashes:
                    ours_t = emap.pop(engine_hash, None)
                    if ours_t:
                        cache.remove(ours_t)
            elif isinstance(ev, AllBlocksCleared):
                cache.clear()
                emap.clear()

    def describe(self, backend_id: str) -> dict[str, Any] | None:
        """What the index believes `backend_id` holds (for /admin/backends): its blocks (of 16 tokens or 64
        characters), its cap, whether the engine's KV events (precise mode) or our own record decide evictions,
        and the learned share of predicted hits the engine really reported."""
        cache = self.caches.get(backend_id)
        if cache is None:
            return None
        rate = self.hit_rates.get(backend_id)
        return {"blocks": len(cache), "capacity_blocks": cache.capacity_blocks, "precise": cache.precise,
                "hit_rate_factor": None if rate is None else round(rate.factor, 3)}

    def on_hits_counter(self, backend_id: str, hits_tokens_total: float) -> None:
        est = self.hit_rates.get(backend_id)
        if est is not None:
            est.reading(hits_tokens_total)

    def blocks_total(self) -> int:
        return sum(len(c) for c in self.caches.values())
