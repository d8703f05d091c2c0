"""vLLM's KV-cache events: what an engine really stored and evicted, for the prefix index's precise mode.

vLLM started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'` publishes on a ZMQ PUB socket (vllm/distributed/kv_events.py,
ZmqEventPublisher): each message is three frames, (topic, 8-byte big-endian sequence number, payload), the
payload a msgpack-encoded `KVEventBatch` (ts, events, data_parallel_rank) of tagged events:

* `BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, ...)`
* `BlockRemoved(block_hashes, medium, ...)`
* `AllBlocksCleared()`

Releases differ in the struct layout: older ones encode structs as arrays (`array_like`, the tag first),
newer ones as maps with a `type` tag. `decode_batch` reads both, and ignores fields it does not know.

The engine's block hashes are its own (sha256 or Python hashes over its tokens and extra keys); the
scheduler maps them to the proxy's chained hashes through the token ids each BlockStored carries
(sched/prefix_index.py `PrefixIndex.apply_kv_events`). This module does the I/O only: a subscriber task per
backend hands decoded batches to a sink (the driver calls `Scheduler.observe_kv_events`).

Needs the optional extra `kv-events` (pyzmq, msgspec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("capbalancer.kv_events")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a batch larger than this is dropped by ZMQ (memory stays bounded)
MAX_EVENTS_PER_BATCH = 65536
BlockHash = int | bytes


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    cache_salt: str | None = None  # the request's `cache_salt`, which vLLM hashes into a prompt's first block
    # Blocks from this index on carry hash keys beyond their tokens (images' or prompt embeddings' digests): the
    # proxy's keys over token ids cannot name them. None: every block is its tokens (and the salts above).
    opaque_from: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared

# Field order of the array-encoded structs (after the tag), as vLLM declares them.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys")
_REMOVED_FIELDS = ("block_hashes", "medium")


class KvEventError(ValueError):
    pass


def _hash(value: Any) -> BlockHash:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise KvEventError(f"a block hash must be an int or bytes, got {type(value).__name__}")
    return value


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        return str(raw.get("type", "")), raw
    if isinstance(raw, list | tuple) and raw:
        return str(raw[0]), dict(zip(names, raw[1:], strict=False))
    raise KvEventError("an event must be a map or an array")


def _extra_keys(extra: Any, lora: str | None, first_is_head: bool) -> tuple[str | None, int | None]:
    """(cache salt, index of the first opaque block) from a BlockStored's `extra_keys`: one entry per block, None or
    the block's keys untagged, in vLLM's order: the LoRA name (when the event has one), (image digest, offset)
    pairs, the cache salt (a prompt's first block only), prompt-embedding digests. Past the LoRA name, the head
    block's first string is the salt; any other key makes the block opaque (multimodal or embeddings)."""
    if not isinstance(extra, list | tuple):
        return None, None
    salt: str | None = None
    for i, keys in enumerate(extra):
        if not keys:
            continue
        rest = list(keys) if isinstance(keys, list | tuple) else [keys]
        if lora is not None and rest and rest[0] == lora:
            rest = rest[1:]
        if i == 0 and first_is_head and rest and isinstance(rest[0], str):
            salt, rest = rest[0], rest[1:]
        if rest:
            return salt, i
    return salt, None


def decode_event(raw: Any) -> KvEvent | None:
    """One event, from its decoded msgpack form; None for an event type this proxy does not use."""
    tag = raw.get("type") if isinstance(raw, dict) else (raw[0] if isinstance(raw, list | tuple) and raw else None)
    if tag == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        parent = f.get("parent_block_hash")
        block_size = f.get("block_size")
        if not isinstance(block_size, int) or block_size <= 0:
            raise KvEventError("BlockStored needs a positive block_size")
        tokens = f.get("token_ids") or []
        if not isinstance(tokens, list | tuple) or not all(isinstance(t, int) for t in tokens):
            raise KvEventError("BlockStored token_ids must be integers")
        lora = f.get("lora_name")
        lora = lora if isinstance(lora, str) else None
        salt, opaque_from = _extra_keys(f.get("extra_keys"), lora, first_is_head=parent is None)
        return BlockStored(tuple(_hash(h) for h in f.get("block_hashes") or ()),
                           None if parent is None else _hash(parent), tuple(tokens), block_size, lora, salt,
                           opaque_from)
    if tag == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        return BlockRemoved(tuple(_hash(h) for h in f.get("block_hashes") or ()))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes) -> tuple[float, list[KvEvent]]:
    """A KVEventBatch payload -> (engine timestamp, events). Raises KvEventError on a malformed one."""
    import msgspec

    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise KvEventError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        ts, events = raw.get("ts", 0.0), raw.get("events")
    elif isinstance(raw, list | tuple) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
    else:
        raise KvEventError("a batch must be a map or an array (ts, events, ...)")
    if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_BATCH:
        raise KvEventError("a batch's events must be a list of bounded length")
    out = [e for e in (decode_event(r) for r in events) if e is not None]
    return float(ts) if isinstance(ts, int | float) else 0.0, out


Sink = Callable[[str, list[KvEvent]], None]


class KvEventSubscriber:
    """Subscribes to one backend's KV-event publisher and hands each decoded batch to `sink(backend_id, events)`.

    A SUB socket reconnects by itself if the engine restarts; a gap in sequence numbers (dropped messages, a
    restart) is reported as an `AllBlocksCleared` first, so the index drops what it can no longer vouch for
    and rebuilds from what the proxy sends and the next events.
    """

    def __init__(self, backend_id: str, endpoint: str, sink: Sink, topic: str = "") -> None:
        self.backend_id = backend_id
        self.endpoint = endpoint
        self.topic = topic
        self._sink = sink
        self._task: asyncio.Task[None] | None = None
        self._next_seq: int | None = None
        self.batches = 0
        self.events = 0
        self.errors = 0
        self.gaps = 0  # breaks in the sequence numbers: batches lost, or the engine restarted
        self.last_batch_at_s: float | None = None  # the loop's clock

    def describe(self, now_s: float) -> dict[str, object]:
        """For /admin/backends: the stream's health (a silent or gapped stream means the index guesses)."""
        last = self.last_batch_at_s
        return {"endpoint": self.endpoint, "batches": self.batches, "events": self.events, "gaps": self.gaps,
                "errors": self.errors, "last_batch_age_s": None if last is None else round(now_s - last, 3)}

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self.backend_id}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def handle(self, frames: list[bytes]) -> None:
        """One message (topic, seq, payload): decode it and feed the sink."""
        if len(frames) != 3:
            self.errors += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        try:
            _ts, events = decode_batch(frames[2])
        except KvEventError as exc:
            self.errors += 1
            log.warning("kv events from %s: dropped a malformed batch (%s)", self.backend_id, exc)
            return
        if self._next_seq is not None and seq != self._next_seq:
            self.gaps += 1
            events = [AllBlocksCleared(), *events]  # missed batches: what we knew may be wrong
        self._next_seq = seq + 1
        self.batches += 1
        self.events += len(events)
        with contextlib.suppress(RuntimeError):  # no loop: called directly (tests, replays)
            self.last_batch_at_s = asyncio.get_running_loop().time()
        self._sink(self.backend_id, events)

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sock.connect(self.endpoint)
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    self.handle(frames)
                except Exception:  # a bad batch must never end the subscription
                    self.errors += 1
                    log.exception("kv events from %s: batch failed", self.backend_id)
        finally:
            sock.close(linger=0)
