"""Precise mode: vLLM-shaped KV events published on a real ZMQ PUB socket, read by the proxy's subscriber,
applied to the scheduler's prefix index. Both wire layouts vLLM has used (structs as arrays, as maps)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from capbalancer.fleet.kv_events import AllBlocksCleared, KvEventSubscriber, decode_batch
from capbalancer.sched.prefix_hash import token_block_hashes
from capbalancer.sched.prefix_index import prefix_salt
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, PoolSettings


# vLLM's event structs (vllm/distributed/kv_events.py), in the map layout of recent releases...
class MapEvent(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class BlockStored(MapEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(MapEvent):
    block_hashes: list[int | bytes]
    medium: str | None


class AllCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class Batch(msgspec.Struct, omit_defaults=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllCleared]
    data_parallel_rank: int | None = None


# ... and the array layout of older ones.
class ArrayStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class ArrayBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[ArrayStored]


def ids(n, seed=0):
    return [(seed * 131 + i * 7) % 30000 for i in range(n)]


def test_decode_both_layouts_and_reject_garbage():
    enc = msgspec.msgpack.encode
    tokens = ids(32)
    _, evs = decode_batch(enc(Batch(1.0, [BlockStored([b"\x01" * 32, b"\x02" * 32], None, tokens, 16, None, "GPU",
                                                      "ad1"), BlockRemoved([5], None), AllCleared()])))
    assert [type(e).__name__ for e in evs] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert evs[0].lora_name == "ad1" and evs[0].block_hashes[0] == b"\x01" * 32
    _, evs = decode_batch(enc(ArrayBatch(2.0, [ArrayStored([1, 2], 7, tokens, 16, None, None)])))
    assert evs[0].parent_block_hash == 7 and evs[0].token_ids == tuple(tokens)
    from capbalancer.fleet.kv_events import KvEventError

    for bad in (b"\xc1", enc({"ts": 1.0, "events": "x"}), enc(Batch(1.0, [BlockStored([1], None, [], 0, None,
                                                                                      None, None)]))):
        with pytest.raises(KvEventError):
            decode_batch(bad)


def make_sched():
    sched = Scheduler([PoolSettings(name="m")])
    sched.add_backend(BackendSpec(backend_id="a", pool="m", engine="vllm"), 0.0)
    return sched


def cached(sched, tokens, adapter=None):
    d = Demand(request_id="q", pool="m", prompt_tokens=len(tokens), max_tokens=10, arrival_s=0.0,
               prefix=token_block_hashes(tokens, salt=prefix_salt("m", adapter)))
    return sched.capacity.cached_tokens(sched.backends["a"], d)[0]


async def _publish_until(pub, frames_of, done, timeout_s=10.0):
    """ZMQ drops messages until the subscription has propagated: resend the first until it lands."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not done() and loop.time() < end:
        await pub.send_multipart(frames_of())
        await asyncio.sleep(0.05)
    assert done(), "subscriber never received the publisher's messages"


async def test_events_from_a_zmq_publisher_drive_the_index():
    sched = make_sched()
    seen: list[list] = []

    def sink(backend_id, events):
        seen.append(events)
        sched.observe_kv_events(backend_id, events, 0.0)

    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = KvEventSubscriber("a", f"tcp://127.0.0.1:{port}", sink, topic="kv")
    sub.start()
    seq = 0

    def frames(batch):
        nonlocal seq
        seq += 1
        return [b"kv", (seq - 1).to_bytes(8, "big"), msgspec.msgpack.encode(batch)]

    try:
        await _publish_until(pub, lambda: frames(Batch(0.0, [AllCleared()])), lambda: bool(seen))
        n = len(seen)
        prompt = ids(64)  # four 16-token blocks, stored as two 32-token engine blocks
        await pub.send_multipart(frames(Batch(1.0, [BlockStored([101, 102], None, prompt, 32, None, "GPU", None)])))
        # A LoRA adapter's blocks: a different salt, never a hit for the base model's prompt.
        await pub.send_multipart(frames(Batch(1.1, [BlockStored([201], None, ids(32, 9), 32, 3, "GPU", "ad")])))
        await _wait(lambda: len(seen) >= n + 2)
        assert cached(sched, prompt + ids(5, 3)) == 64
        assert cached(sched, ids(32, 9)) == 0 and cached(sched, ids(32, 9), "ad") == 31
        # Evicted: the tail block goes, the head stays.
        await pub.send_multipart(frames(Batch(2.0, [BlockRemoved([102], "GPU")])))
        await _wait(lambda: len(seen) >= n + 3)
        assert cached(sched, prompt + ids(5, 3)) == 32
        # A gap in sequence numbers (lost batches): the index drops what it cannot vouch for.
        seq += 5
        await pub.send_multipart(frames(Batch(3.0, [])))
        await _wait(lambda: len(seen) >= n + 4)
        assert isinstance(seen[-1][0], AllBlocksCleared)
        assert cached(sched, prompt) == 0
        assert sub.errors == 0 and sub.batches >= 4
    finally:
        await sub.stop()
        pub.close(linger=0)


async def _wait(cond, timeout_s=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "timed out waiting for events"
        await asyncio.sleep(0.01)


def test_config_takes_a_zmq_endpoint_per_backend_and_refuses_others():
    from capbalancer.config import ConfigError, parse_config

    def cfg(value):
        return parse_config({"models": {"m": {"backends": [{"url": "http://127.0.0.1:8000",
                                                             "kv_events": value}]}}})

    assert cfg("tcp://127.0.0.1:5557").models["m"].backends[0].kv_events == "tcp://127.0.0.1:5557"
    with pytest.raises(ConfigError, match="kv_events"):
        cfg("http://127.0.0.1:5557")


def test_extra_keys_give_the_cache_salt_and_stop_at_opaque_blocks():
    # vLLM's extra_keys, one entry per block, untagged: [lora name], (image digest, offset) pairs, the cache salt
    # (first block only), prompt-embedding digests.
    enc = msgspec.msgpack.encode

    def stored(extra, lora=None, parent=None):
        raw = {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": parent, "token_ids": ids(32),
               "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": lora, "extra_keys": extra}
        return decode_batch(enc({"ts": 0.0, "events": [raw]}))[1][0]

    ev = stored([["tenant-a"], None])
    assert (ev.cache_salt, ev.opaque_from) == ("tenant-a", None)
    ev = stored([["ad", "tenant-a"], ["ad"]], lora="ad")
    assert (ev.lora_name, ev.cache_salt, ev.opaque_from) == ("ad", "tenant-a", None)
    assert stored([[["img-digest", 0]], None]).opaque_from == 0
    assert stored([None, [["img-digest", 16]]]).opaque_from == 1
    assert stored([["x"], None], parent=7).opaque_from == 0  # not a prompt's head: no salt there
    assert (stored(None).cache_salt, stored(None).opaque_from) == (None, None)


def test_a_salted_prompt_matches_only_its_own_salt():
    from capbalancer.fleet.kv_events import BlockStored as Stored

    sched = make_sched()
    prompt = ids(64)
    sched.observe_kv_events("a", [Stored((11, 12), None, tuple(prompt), 32, None, "tenant-a")], 0.0)

    def cached_with(salt):
        d = Demand(request_id="q", pool="m", prompt_tokens=70, max_tokens=10, arrival_s=0.0,
                   prefix=token_block_hashes(prompt + ids(6, 4), salt=prefix_salt("m", None, salt)))
        return sched.capacity.cached_tokens(sched.backends["a"], d)[0]

    assert cached_with("tenant-a") == 64 and cached_with(None) == 0 and cached_with("tenant-b") == 0
    # An image's block (opaque past its tokens) is never taken for the text prompt that shares its tokens.
    sched.observe_kv_events("a", [Stored((21, 22), None, tuple(prompt), 32, opaque_from=1)], 0.0)
    assert cached_with(None) == 32


def test_the_request_cache_salt_keys_the_prefix():
    from capbalancer.server.parsing import parse_body, prefix_key

    def key(body):
        return prefix_key(parse_body("/v1/completions", msgspec.json.encode(body), keep_text=True), "m").hashes

    base = {"model": "m", "prompt": "x" * 256}
    assert key(base) == key(dict(base)) and key(base) != key({**base, "cache_salt": "t1"})
    assert key({**base, "cache_salt": "t1"}) != key({**base, "cache_salt": "t2"})
    assert key({**base, "cache_salt": 5}) == key(base)  # not a string: the engine refuses it, no salt here
