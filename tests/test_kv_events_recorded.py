"""Precise mode against a real vLLM's own KV events: the stream a vLLM 0.32 (CPU build) published while it served
seven prompts, evicted, and cleared its cache (recorded by tests/real_engine/capture_kv_events.py), replayed
frame by frame on a real ZMQ PUB socket to the proxy's subscriber, which feeds the scheduler's prefix index.

The oracle is the engine's own record, independent of our translation: after each step, the engine blocks
stored and not yet removed; a prompt's leading engine blocks among them are what the engine would hit, and
the index must match exactly that many of our 16-token blocks (each 128-token engine block is eight of ours).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from capbalancer.fleet.kv_events import KvEventSubscriber
from capbalancer.sched.prefix_hash import token_block_hashes
from capbalancer.sched.prefix_index import prefix_salt
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, PoolSettings

RECORDING = Path(__file__).parent / "data" / "real" / "vllm-cpu-kv-events.json"
OURS_PER_BLOCK = 16


def engine_blocks_alive(steps: list[dict]) -> list[tuple[set, dict]]:
    """Per step: the engine hashes stored and not removed, and each stored hash's (cache salt, token ids): the
    oracle. A chain's salt is its head block's extra key; the blocks below a head inherit it."""
    alive: set = set()
    tokens_of: dict = {}
    out = []
    for step in steps:
        for frame in step["frames"]:
            _ts, events = msgspec.msgpack.decode(bytes.fromhex(frame[2]))[:2]
            for ev in events:
                if ev["type"] == "BlockStored":
                    size = ev["block_size"]
                    parent = ev["parent_block_hash"]
                    head_keys = (ev.get("extra_keys") or [None])[0]
                    salt = (head_keys[0] if head_keys else None) if parent is None else tokens_of[parent][0]
                    for i, h in enumerate(ev["block_hashes"]):
                        alive.add(h)
                        tokens_of[h] = (salt, tuple(ev["token_ids"][i * size:(i + 1) * size]))
                elif ev["type"] == "BlockRemoved":
                    alive.difference_update(ev["block_hashes"])
                elif ev["type"] == "AllBlocksCleared":
                    alive.clear()
        out.append((set(alive), dict(tokens_of)))
    return out


def leading_alive_blocks(token_ids: list[int], salt: str | None, alive: set, tokens_of: dict,
                         block_size: int) -> int:
    """How many of the prompt's leading engine blocks the engine still holds under this salt (by their tokens)."""
    held = {tokens_of[h] for h in alive}
    n = 0
    while (n + 1) * block_size <= len(token_ids) and (salt, tuple(token_ids[n * block_size:(n + 1) * block_size])
                                                      ) in held:
        n += 1
    return n


async def _until(cond, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "timed out waiting for the subscriber"
        await asyncio.sleep(0.01)


async def test_a_real_vllm_event_stream_drives_the_index_to_what_the_engine_holds(tmp_path):
    data = json.loads(RECORDING.read_text())
    steps = data["steps"]
    block_size = data["block_size"]
    assert data["vllm_version"] and block_size % OURS_PER_BLOCK == 0
    sched = Scheduler([PoolSettings(name="m")])
    sched.add_backend(BackendSpec(backend_id="a", pool="m", engine="vllm"), 0.0)
    batches: list[list] = []

    def sink(backend_id, events):
        batches.append(events)
        sched.observe_kv_events(backend_id, events, 0.0)

    endpoint = f"ipc://{tmp_path}/kv.sock"
    pub = zmq.asyncio.Context.instance().socket(zmq.PUB)
    pub.bind(endpoint)
    sub = KvEventSubscriber("a", endpoint, sink, topic=data["topic"])
    sub.start()
    prompts = [(s["token_ids"], s.get("cache_salt")) for s in steps if "token_ids" in s]
    oracle = engine_blocks_alive(steps)
    try:
        # ZMQ drops what is published before the subscription lands: announce with sequence -1 (an empty
        # batch) until one arrives, so the recording's sequence 0 follows without a gap.
        empty = msgspec.msgpack.encode([0.0, []])
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not batches and loop.time() < end:
            await pub.send_multipart([data["topic"].encode(), (-1).to_bytes(8, "big", signed=True), empty])
            await asyncio.sleep(0.05)
        assert batches, "the subscriber never joined"
        primed = len(batches)
        sent = 0
        nonempty_steps = 0
        for k, step in enumerate(steps):
            for frame in step["frames"]:
                await pub.send_multipart([bytes.fromhex(f) for f in frame])
                sent += 1
            target = primed + sent
            await _until(lambda target=target: len(batches) >= target)
            alive, tokens_of = oracle[k]
            nonempty_steps += bool(alive)
            for ids, cache_salt in prompts:
                expected = leading_alive_blocks(ids, cache_salt, alive, tokens_of, block_size) * block_size
                key = token_block_hashes(ids, salt=prefix_salt("m", None, cache_salt))
                got = sched.prefix.caches["a"].match(key.hashes).cached_blocks * OURS_PER_BLOCK
                assert got == expected, (k, step["action"], got, expected)
        cache = sched.prefix.caches["a"]
        assert cache.precise and sub.errors == 0 and sub.batches == primed + sent
        # What /admin/backends shows an operator: the index's belief and the stream's health.
        row = sched.describe(0.0)["backends"]["a"]["prefix_index"]
        assert row["precise"] is True and row["blocks"] == len(cache) > 0
        stream = sub.describe(asyncio.get_running_loop().time())
        assert stream["batches"] == primed + sent and stream["gaps"] == primed - 1  # the -1 probes, then none
        assert stream["errors"] == 0 and 0 <= stream["last_batch_age_s"] < 10
        assert nonempty_steps == len(steps)
        # The recording covers what precise mode must handle: stores, evictions and a clear.
        kinds = {ev["type"] for s in steps for f in s["frames"] for ev in msgspec.msgpack.decode(bytes.fromhex(f[2]))[1]}
        assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
        # After the clear, only the prompt sent after it is held, five full engine blocks of it, once plain and once
        # under the tenant's salt; a third salt holds nothing.
        first = prompts[0][0]
        for cache_salt in (None, "tenant-b"):
            key = token_block_hashes(first, salt=prefix_salt("m", None, cache_salt))
            assert cache.match(key.hashes).cached_blocks == (len(first) // block_size) * 8
        assert cache.match(token_block_hashes(first, salt=prefix_salt("m", None, "tenant-c")).hashes).cached_blocks == 0
        salt = prefix_salt("m")
        assert all(cache.match(token_block_hashes(p, salt=salt).hashes).cached_blocks == 0 for p, _ in prompts[2:-2])
    finally:
        await sub.stop()
        pub.close(linger=0)
