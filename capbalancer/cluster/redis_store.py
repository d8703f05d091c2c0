"""The shared store: Redis or Valkey, one round trip per sharing interval.

One Lua script publishes this replica's state (a key with a TTL, so a replica that dies vanishes on its own)
and returns every other live replica's state in the same call: one store operation per replica per
interval, whatever the request rate. All keys carry one hash tag, so the script also runs on a cluster.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# KEYS[1]: the set of replica ids; ARGV: namespace prefix, this replica's id, its payload, TTL in ms.
_EXCHANGE = """
local ids_key = KEYS[1]
local prefix, me, payload, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('SET', prefix .. me, payload, 'PX', ttl)
redis.call('SADD', ids_key, me)
local ids = redis.call('SMEMBERS', ids_key)
local out = {}
for _, id in ipairs(ids) do
  if id ~= me then
    local v = redis.call('GET', prefix .. id)
    if v then
      out[#out + 1] = id
      out[#out + 1] = v
    else
      redis.call('SREM', ids_key, id)
    end
  end
end
return out
"""

_LEAVE = """
redis.call('DEL', ARGV[1] .. ARGV[2])
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""

StoreError = (RedisError, OSError, TimeoutError, ConnectionError)


class RedisStore:
    def __init__(self, url: str, namespace: str = "capbalancer", timeout_s: float = 0.2) -> None:
        self.url = url
        tag = "{" + namespace + "}"
        self._ids_key = f"{tag}:replicas"
        self._prefix = f"{tag}:replica:"
        kwargs = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                  # A failed call is answered by degrading at once, not by retrying inside the client.
                  "retry_on_timeout": False, "health_check_interval": 0}
        if urlsplit(url).scheme == "unix":
            self._client = aioredis.Redis(unix_socket_path=urlsplit(url).path, **kwargs)
        else:
            self._client = aioredis.Redis.from_url(url, **kwargs)
        self._exchange = self._client.register_script(_EXCHANGE)
        self._leave = self._client.register_script(_LEAVE)

    async def exchange(self, replica_id: str, payload: bytes, ttl_ms: int) -> list[tuple[str, bytes]]:
        """Publish ours, read the others' (live ones only), in one round trip."""
        flat = await self._exchange(keys=[self._ids_key], args=[self._prefix, replica_id, payload, int(ttl_ms)])
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def leave(self, replica_id: str) -> None:
        await self._leave(keys=[self._ids_key], args=[self._prefix, replica_id])

    async def close(self) -> None:
        await self._client.aclose()
