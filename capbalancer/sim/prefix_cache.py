"""The engine's automatic prefix cache, as vLLM v1 keeps it (vllm/v1/core/kv_cache_manager.py, block_pool.py).

A full KV block is identified by a hash chained over the token ids of every block before it and its own, so two
prompts share their first k block hashes exactly when they share their first k blocks of tokens. What the model
keeps, block by block:

- a block some running request uses has a reference count > 0 and is never evicted; two requests with the same
  prefix use the same physical blocks (the KV is counted once);
- a block whose last user finished (or was preempted) keeps its content and hash and goes back to the free pool
  as *cached*: it still counts as free KV (vLLM's `kv_cache_usage_perc` counts it free) and a later request with
  the same prefix takes it back instead of recomputing it;
- when the engine needs blocks, cached free blocks are evicted least recently freed first; a request's blocks are
  freed tail first (vLLM frees them in reverse order), so a shared head outlives the tails hanging from it.

One simplification: vLLM takes new blocks from the head of one free queue that holds never-used, cached and
uncacheable (partial) blocks in the order they were freed; here new blocks come from the uncached free blocks
first and a cached block is evicted only when none is left (the LRU order among cached blocks is vLLM's).

The engine model (sim/engine.py) owns the block counts; this class owns which blocks hold which hash. Counters
are the engine's `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (tokens, at admission).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from capbalancer.sched.prefix_hash import token_block_hashes


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str = "") -> tuple[int, ...]:
    """The chained hashes of the full blocks of `token_ids` (a partial last block is not cacheable)."""
    return token_block_hashes(token_ids, block_size, salt).hashes


@dataclass(frozen=True, slots=True)
class CacheHit:
    blocks: int  # leading blocks of the prompt found in the cache
    idle_blocks: int  # of those, blocks no running request uses: they leave the free pool when taken


NO_HIT = CacheHit(0, 0)


class PrefixCache:
    """Hash -> reference count of the blocks that hold a hash; `lru` is the evictable ones (count 0)."""

    __slots__ = ("block_size", "refs", "lru", "queries_tokens_total", "hits_tokens_total", "evictions_total")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.refs: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.queries_tokens_total = 0
        self.hits_tokens_total = 0
        self.evictions_total = 0

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def blocks_in_use(self) -> int:
        """Cached blocks some running request uses (they are not free)."""
        return len(self.refs) - len(self.lru)

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> CacheHit:
        """The longest cached run of leading blocks, at most `max_blocks` (vLLM recomputes at least the last
        prompt token, so a caller passes (tokens - 1) // block_size)."""
        refs = self.refs
        n = idle = 0
        for h in hashes[:max_blocks]:
            count = refs.get(h)
            if count is None:
                break
            n += 1
            if count == 0:
                idle += 1
        return CacheHit(n, idle) if n else NO_HIT

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        self.queries_tokens_total += query_tokens
        self.hits_tokens_total += hit_tokens

    def acquire(self, hashes: Iterable[int]) -> None:
        """A request starts with these cached blocks: one more user each; idle ones leave the free pool."""
        refs, lru = self.refs, self.lru
        for h in hashes:
            count = refs[h]
            if count == 0:
                del lru[h]
            refs[h] = count + 1

    def register(self, h: int) -> bool:
        """A block a running request just computed gets its hash. False when another block holds that hash
        already (computed twice at once): vLLM keeps the copy uncached and frees it as a plain block."""
        if h in self.refs:
            return False
        self.refs[h] = 1
        return True

    def release(self, hashes: Sequence[int]) -> int:
        """A request let go of these blocks (it finished or was preempted): tail first, as vLLM frees them.
        Returns how many became free (cached, evictable)."""
        refs, lru = self.refs, self.lru
        freed = 0
        for h in reversed(hashes):
            count = refs.get(h)
            if count is None:
                continue
            if count <= 1:
                refs[h] = 0
                lru[h] = None
                freed += 1
            else:
                refs[h] = count - 1
        return freed

    def evict_to(self, free_blocks: int, evicted: list[int] | None = None) -> None:
        """The free pool shrank to `free_blocks`: cached free blocks beyond it were overwritten, oldest first
        (their hashes appended to `evicted` when given)."""
        lru, refs = self.lru, self.refs
        while len(lru) > free_blocks:
            h, _ = lru.popitem(last=False)
            del refs[h]
            self.evictions_total += 1
            if evicted is not None:
                evicted.append(h)

    def restore(self, hashes: Sequence[int]) -> None:
        """Blocks taken for steps that did not run (a run of decode steps cut short) were never overwritten: their
        cached content is back, as the oldest free blocks (the last evicted, youngest of them, last)."""
        lru, refs = self.lru, self.refs
        for h in reversed(hashes):
            if h in refs:  # cached again meanwhile
                continue
            refs[h] = 0
            lru[h] = None
            lru.move_to_end(h, last=False)
            self.evictions_total -= 1

    def reset(self) -> bool:
        """vLLM's /reset_prefix_cache: drops every cached free block; refused (False) while blocks are in use."""
        if self.blocks_in_use:
            return False
        self.refs.clear()
        self.lru.clear()
        return True
