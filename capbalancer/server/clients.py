"""Client API keys: who may call the proxy, at what priority, and how fast.

Keys are compared in constant time (`hmac.compare_digest`, every configured key checked whatever matches)
so a caller cannot learn a key from response timing. Each key has a token bucket: `rate_limit_rps`
tokens a second up to `rate_limit_burst`; an empty bucket answers 429 with the seconds until a token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from capbalancer.config import ClientKey
from capbalancer.server.errors import ProxyError


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_s: float


class ClientAuth:
    def __init__(self, keys: tuple[ClientKey, ...]) -> None:
        self.keys = keys
        self._encoded = [(k, k.key.encode()) for k in keys]
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ClientKey:
        """The client key this `Authorization` header carries, or 401."""
        presented = b""
        if authorization and authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip().encode()
        found: ClientKey | None = None
        for key, encoded in self._encoded:
            if hmac.compare_digest(presented, encoded) and found is None:
                found = key
        if found is None:
            raise ProxyError(401, "a valid API key is required (Authorization: Bearer KEY)",
                             code="invalid_api_key")
        return found

    def admit(self, key: ClientKey, now_s: float) -> None:
        """Take one token from the key's bucket, or answer 429 with when to retry."""
        if key.rate_limit_rps is None:
            return
        rate = key.rate_limit_rps
        burst = key.rate_limit_burst or max(1.0, 2.0 * rate)
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = _Bucket(tokens=burst, at_s=now_s)
        bucket.tokens = min(burst, bucket.tokens + (now_s - bucket.at_s) * rate)
        bucket.at_s = now_s
        if bucket.tokens < 1.0:
            wait_s = (1.0 - bucket.tokens) / rate
            raise ProxyError(429, f"rate limit of {rate:g} requests/s for this API key exceeded",
                             code="rate_limit_exceeded", retry_after_s=wait_s)
        bucket.tokens -= 1.0

    @staticmethod
    def check_model(key: ClientKey, model: str) -> None:
        if key.models and model not in key.models:
            raise ProxyError(403, f"this API key may not use model {model!r}", param="model",
                             code="model_not_allowed")
