"""The shared store over core NATS: the same exchange as redis_store.py, by publish-subscribe.

Every replica publishes its state on one subject per namespace (`capbalancer.<namespace>.replicas`, the
replica id and the state's time-to-live in message headers) and subscribes to it, keeping the newest state
of each other replica with the time it arrived. `exchange` publishes ours and flushes (one PING/PONG round
trip: a server that is down or stalled is noticed within the timeout, as with Redis), then reads the others'
live states from memory. A replica that dies stops publishing and ages out after its TTL; one that stops
cleanly publishes an empty state, which removes it at once. No JetStream is needed: nothing is persisted,
as with the Redis store (states are republished every interval).

Compared with Redis (measured side by side in bench/sharing_stores.py): the read needs no round
trip, but each replica receives every other's state every interval (N x N messages per interval across the
fleet against N round trips), and nats-server has no server-side script, so "publish and read" is one
publish, one flush and a local read.
"""

from __future__ import annotations

import re
import time

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

REPLICA_HEADER = "Capbalancer-Replica"
TTL_HEADER = "Capbalancer-Ttl-Ms"
MAX_REPLICAS = 10_000  # states kept at most (memory bound whatever is published on the subject)
_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject_for(namespace: str) -> str:
    return f"capbalancer.{_SUBJECT_UNSAFE.sub('_', namespace) or '_'}.replicas"


class NatsStore:
    def __init__(self, url: str, namespace: str = "capbalancer", timeout_s: float = 0.2) -> None:
        self.url = url
        self.subject = subject_for(namespace)
        self.timeout_s = timeout_s
        self._nc: Client | None = None
        # replica id -> (its latest state, when it arrived (monotonic s), its TTL in s)
        self._states: dict[str, tuple[bytes, float, float]] = {}

    async def _client(self) -> Client:
        if self._nc is not None and not self._nc.is_closed:
            return self._nc

        async def quiet(_exc: Exception) -> None:  # failures surface as exchange errors (Sharing logs them)
            return None

        # Reconnects in the background (subscriptions restored) after a server restart; until then the
        # flush in `exchange` fails and the replica counts alone.
        self._nc = await nats.connect(self.url, name="capbalancer", connect_timeout=self.timeout_s,
                                      allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                                      error_cb=quiet, disconnected_cb=None, verbose=False)
        await self._nc.subscribe(self.subject, cb=self._received)
        return self._nc

    async def _received(self, msg: Msg) -> None:
        headers = msg.headers or {}
        rid = headers.get(REPLICA_HEADER)
        if not rid:
            return
        if not msg.data:  # a clean leave
            self._states.pop(rid, None)
            return
        try:
            ttl_s = max(0.0, float(headers.get(TTL_HEADER, "0")) / 1000.0)
        except ValueError:
            return
        if rid not in self._states and len(self._states) >= MAX_REPLICAS:
            self._prune(time.monotonic())
            if len(self._states) >= MAX_REPLICAS:
                return
        self._states[rid] = (msg.data, time.monotonic(), ttl_s)

    def _prune(self, now: float) -> None:
        for rid in [r for r, (_, at, ttl) in self._states.items() if now - at > ttl]:
            del self._states[rid]

    async def exchange(self, replica_id: str, payload: bytes, ttl_ms: int) -> list[tuple[str, bytes]]:
        """Publish ours, read the others' (live ones only): one publish and one flush round trip."""
        nc = await self._connected()
        await nc.publish(self.subject, payload, headers={REPLICA_HEADER: replica_id, TTL_HEADER: str(int(ttl_ms))})
        await nc.flush(timeout=self.timeout_s)
        now = time.monotonic()
        self._prune(now)
        return [(rid, body) for rid, (body, _, _) in self._states.items() if rid != replica_id]

    async def _connected(self) -> Client:
        nc = await self._client()
        if not nc.is_connected:  # reconnecting: nats-py buffers publishes and its flush does not wait then
            raise ConnectionError(f"nats: not connected to {self.url} (reconnecting)")
        return nc

    async def leave(self, replica_id: str) -> None:
        nc = await self._connected()
        await nc.publish(self.subject, b"", headers={REPLICA_HEADER: replica_id})
        await nc.flush(timeout=self.timeout_s)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except RuntimeError:  # its transport already closed (the server went away first)
                pass
