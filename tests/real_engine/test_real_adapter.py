"""The vLLM adapter and the fleet monitor read a real vLLM's /metrics: KV capacity from
vllm:cache_config_info, KV usage, running, waiting and preemptions, and the snapshot moves under load."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from capbalancer.fleet.adapters import snapshot_from_metrics
from capbalancer.fleet.monitor import FleetMonitor, PollTarget
from capbalancer.fleet.snapshot import EngineSnapshot
from tests.real_engine.conftest import SMALL_KV_BLOCKS, VllmPair
from tests.real_engine.load import PROMPT_150, burst, scrape
from tests.real_engine.server import BLOCK_SIZE_TOKENS

pytestmark = pytest.mark.real_engine


def _page(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_adapter_reads_capacity_and_idle_state(vllm_pair: VllmPair) -> None:
    small = snapshot_from_metrics("vllm", _page(vllm_pair.small.url), taken_at_s=1.0)
    large = snapshot_from_metrics("vllm", _page(vllm_pair.large.url), taken_at_s=1.0)
    assert small.engine == "vllm" and small.taken_at_s == 1.0
    assert small.kv_capacity_tokens == SMALL_KV_BLOCKS * BLOCK_SIZE_TOKENS
    assert large.kv_capacity_tokens == 2048 * BLOCK_SIZE_TOKENS  # 1 GiB of KV cache
    raw = scrape(vllm_pair.small.url)
    # Idle (no test holds requests between tests): the adapter agrees with the raw page, not with defaults.
    assert small.running == int(raw["vllm:num_requests_running"]) == 0
    assert small.waiting == int(raw["vllm:num_requests_waiting"]) == 0
    assert small.kv_usage_fraction == pytest.approx(raw["vllm:kv_cache_usage_perc"])
    assert small.preemptions_total == int(raw["vllm:num_preemptions_total"])
    assert small.generation_tokens_total == int(raw["vllm:generation_tokens_total"])
    assert small.kv_free_tokens == small.kv_capacity_tokens


class Recorder:
    def __init__(self) -> None:
        self.snapshots: list[EngineSnapshot] = []
        self.health: list[bool] = []

    def on_snapshot(self, backend_id: str, snapshot: EngineSnapshot) -> None:
        self.snapshots.append(snapshot)

    def on_health(self, backend_id: str, ok: bool, reason: str) -> None:
        self.health.append(ok)


async def _load_while_monitoring(url: str) -> tuple[Recorder, list]:
    sink = Recorder()
    monitor = FleetMonitor([PollTarget(backend_id="small", base_url=url, engine="vllm")], sink,
                           interval_s=0.1, timeout_s=2.0)
    await monitor.start()
    try:
        # 20 prompts of ~150 tokens need 40 of the 16 blocks just to start: most wait; and 20 x 450 tokens
        # is four times the cache, so running requests get preempted as they grow.
        outcomes = await burst(url + "/v1", 20, PROMPT_150, 300)
        await asyncio.sleep(1.0)  # let the monitor see the drained state
    finally:
        await monitor.stop()
    return sink, outcomes


def test_monitor_snapshot_moves_under_load(vllm_pair: VllmPair) -> None:
    started = time.monotonic()
    sink, outcomes = asyncio.run(_load_while_monitoring(vllm_pair.small.url))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    snaps = sink.snapshots
    assert len(snaps) >= 5 and True in sink.health
    assert all(s.kv_capacity_tokens == SMALL_KV_BLOCKS * BLOCK_SIZE_TOKENS for s in snaps)
    assert max(s.running for s in snaps) >= 2
    assert max(s.waiting for s in snaps) >= 4          # the cache cannot even start all 20
    assert max(s.kv_usage_fraction for s in snaps) > 0.8
    assert snaps[-1].preemptions_total > snaps[0].preemptions_total
    assert snaps[-1].generation_tokens_total - snaps[0].generation_tokens_total >= 20 * 300 * 0.9
    # Drained at the end, and the snapshots' clock is the monitor's (monotonic) one.
    assert snaps[-1].running == 0 and snaps[-1].waiting == 0
    assert started <= snaps[0].taken_at_s <= snaps[-1].taken_at_s
