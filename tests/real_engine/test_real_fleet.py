"""The real-engine fixtures deliver what the other real tests rely on: two healthy vLLM servers whose KV
caches differ, where the small one really preempts under a load the large one absorbs."""

from __future__ import annotations

import asyncio

import pytest

from tests.real_engine.conftest import SMALL_KV_BLOCKS, VllmPair
from tests.real_engine.load import PROMPT_150, burst, cache_config, scrape

pytestmark = pytest.mark.real_engine


def test_pair_has_different_kv_capacities(vllm_pair: VllmPair) -> None:
    small = cache_config(vllm_pair.small.url)
    large = cache_config(vllm_pair.large.url)
    assert int(small["num_gpu_blocks"]) == SMALL_KV_BLOCKS
    assert int(small["kv_cache_size_tokens"]) == SMALL_KV_BLOCKS * int(small["block_size"])
    assert int(large["num_gpu_blocks"]) >= 16 * SMALL_KV_BLOCKS


def test_small_instance_preempts_where_large_does_not(vllm_pair: VllmPair) -> None:
    # 8 requests x (~150 prompt + 300 output) tokens ≈ 3600 KV tokens: past the small cache's 2048,
    # a sliver of the large one's.
    before = {s.name: scrape(s.url)["vllm:num_preemptions_total"] for s in vllm_pair.both}
    for server in vllm_pair.both:
        outcomes = asyncio.run(burst(server.base_url, 8, PROMPT_150, 300))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    after = {s.name: scrape(s.url)["vllm:num_preemptions_total"] for s in vllm_pair.both}
    assert after["small"] - before["small"] > 0
    assert after["large"] - before["large"] == 0
