"""The prefix index's memory per cached block and the scheduler's decision cost per request at 100 backends.

    .venv/bin/python bench/prefix_index_speed.py [--backends 100] [--requests 3000]

1. Memory: fill one backend's cache (sched/prefix_index.py) with N blocks and measure the traced allocation
   per block (tracemalloc), against the documented BYTES_PER_BLOCK and the default cap.
2. Decision cost: a Scheduler with `capacity` over 100 profiled backends, each holding warm caches, routes
   multi-turn requests (2,000-token prompts, 125 blocks, a third of them with a prefix cached somewhere);
   the same requests with no prefix key (prefix-free), side by side in one run: the index's extra cost per
   request.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.prefix_hash import token_block_hashes
from capbalancer.sched.prefix_index import (
    BYTES_PER_BLOCK,
    DEFAULT_MAX_BLOCKS_PER_BACKEND,
    DEFAULT_MAX_TOTAL_BLOCKS,
    BackendPrefixCache,
)
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, PoolSettings


def bytes_per_block(n: int = 200_000) -> float:
    rng = random.Random(1)
    hashes = tuple(rng.getrandbits(64) for _ in range(n))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = BackendPrefixCache(n)
    for i in range(0, n, 128):
        cache.touch(hashes[i:i + 128], pin=False)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cache) == n
    # The hash ints themselves are shared with the request's PrefixKey while it is alive; once cached they
    # are owned by the index, so count them (they are allocated before tracing starts here: add 32 bytes).
    return (after - before) / n + 32


def profile(i: int) -> Profile:
    scale = 1.0 + (i % 5) * 0.5
    return Profile(name=f"g{i % 5}", gpu="x", model="m", tp=1, engine="vllm", kv_capacity_tokens=400_000,
                   step=StepTimeModel(fixed_seconds=0.01 * scale, prefill_seconds_per_token=0.0001 * scale,
                                      decode_seconds_per_seq=0.0002 * scale, context_seconds_per_token=1e-7 * scale),
                   max_num_seqs=256, max_num_batched_tokens=2048)


def decision_cost(backends: int, requests: int, with_prefix: bool) -> float:
    sched = Scheduler([PoolSettings(name="m", hold_timeout_s=60.0)])
    for i in range(backends):
        sched.add_backend(BackendSpec(backend_id=f"b{i}", pool="m", engine="vllm", profile=profile(i)), 0.0)
    rng = random.Random(2)
    sessions = [[rng.randrange(32000) for _ in range(2000)] for _ in range(300)]
    demands = []
    for r in range(requests):
        ids = sessions[r % len(sessions)] if r % 3 else [rng.randrange(32000) for _ in range(2000)]
        key = token_block_hashes(ids) if with_prefix else None
        demands.append(Demand(request_id=f"r{r}", pool="m", prompt_tokens=2000, max_tokens=200,
                              arrival_s=r * 0.01, **({"prefix": key} if key is not None else {})))
    started = time.perf_counter()
    for r, d in enumerate(demands):
        now = r * 0.01
        sched.submit(d, now)
        if r >= 200:  # keep ~200 in flight
            sched.finish(f"r{r - 200}", now, output_tokens=200)
    return (time.perf_counter() - started) / requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=int, default=100)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    bpb = bytes_per_block()
    print(f"index memory: {bpb:.0f} bytes per cached block measured (BYTES_PER_BLOCK documents {BYTES_PER_BLOCK}); "
          f"caps: {DEFAULT_MAX_BLOCKS_PER_BACKEND:,} blocks per backend, {DEFAULT_MAX_TOTAL_BLOCKS:,} in all "
          f"-> at most {DEFAULT_MAX_TOTAL_BLOCKS * bpb / 1e6:.0f} MB")
    plain = decision_cost(args.backends, args.requests, with_prefix=False)
    prefixed = decision_cost(args.backends, args.requests, with_prefix=True)
    print(f"decision cost per request, capacity over {args.backends} backends (submit + finish, 2,000-token "
          f"prompts, 125 blocks): prefix-free {plain * 1e6:.0f} us, with prefix keys {prefixed * 1e6:.0f} us "
          f"({prefixed / plain:.2f}x); hashing the prompt is the proxy's, not counted here")


if __name__ == "__main__":
    main()
