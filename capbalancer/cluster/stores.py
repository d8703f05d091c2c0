"""Which shared store a `sharing.store_url` names: Redis/Valkey (redis://, rediss://, unix://) or NATS
(nats://, tls://). Both offer the same calls: exchange(replica_id, payload, ttl_ms), leave(replica_id), close().
NATS needs the `nats` extra (nats-py)."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from capbalancer.cluster.redis_store import RedisStore
from capbalancer.cluster.redis_store import StoreError as RedisErrors

REDIS_SCHEMES = ("redis", "rediss", "unix")
NATS_SCHEMES = ("nats", "tls")


class Store(Protocol):
    url: str

    async def exchange(self, replica_id: str, payload: bytes, ttl_ms: int) -> list[tuple[str, bytes]]: ...

    async def leave(self, replica_id: str) -> None: ...

    async def close(self) -> None: ...


def _nats_errors() -> tuple[type[BaseException], ...]:
    try:
        import nats.errors
    except ImportError:
        return ()
    return (nats.errors.Error,)


StoreError: tuple[type[BaseException], ...] = (*RedisErrors, *_nats_errors())


def is_store_url(url: str) -> bool:
    return urlsplit(url).scheme in REDIS_SCHEMES + NATS_SCHEMES


def open_store(url: str, namespace: str, timeout_s: float) -> Store:
    if urlsplit(url).scheme in NATS_SCHEMES:
        try:
            from capbalancer.cluster.nats_store import NatsStore
        except ImportError:
            raise RuntimeError("a nats:// sharing store needs nats-py: pip install 'capbalancer[nats]'") from None
        return NatsStore(url, namespace, timeout_s)
    return RedisStore(url, namespace, timeout_s)
